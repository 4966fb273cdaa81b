"""Small ``@triton.jit`` helpers shared by the kernels in this package.

Kept apart from ``llava_kernels.dispatch`` on purpose: dispatch must import without Triton installed
(``triton_available()`` asks), and a jit function needs ``triton`` at import time.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_bf16_rtne(x):
    """fp32 tensor -> bf16 tensor of the same shape, rounded to nearest, ties to even.

    Why by hand: GPUs round fp32 -> bf16 casts so, but the triton 3.8 interpreter's cast truncates (and
    flushes subnormals to zero), and the CPU tests must see the GPU's bits. On a GPU the plain
    ``.to(tl.bfloat16)`` already rounds so: the projector and the masked loss call this only under the
    interpreter (through ``store_cast``); the scatter's embedding grad calls it on every backend (same
    bits as the GPU's cast, a few integer ops on one store).
    Same result as torch's ``.to(torch.bfloat16)`` for every input: finite values (subnormals and ±0
    included) round on their bit pattern, values past the bf16 max round to ±Inf, ±Inf stay, and a
    NaN stays a quiet NaN with its sign (torch returns one canonical NaN; NaN bits are not compared).
    """
    bits = x.to(tl.uint32, bitcast=True)
    # The rounding add must skip NaNs: adding 0x7FFF (+1) to a NaN's bits can carry through the
    # exponent into the sign (0x7FFFFFFF -> -0.0), and a NaN whose payload lives only in the low 16
    # bits (0x7F807FFF) would be cut down to the Inf pattern.
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    bits = tl.where(is_nan, (bits >> 16) | 0x40, rounded)  # 0x40: the bf16 quiet bit
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_cast(ptrs, x, mask, ROUND_BF16: tl.constexpr):
    """Store fp32 ``x`` in the pointers' dtype. ROUND_BF16 (the pointers must be bf16) rounds with
    ``to_bf16_rtne`` instead of the plain cast; kernels set it only where the plain cast is wrong."""
    if ROUND_BF16:
        tl.store(ptrs, to_bf16_rtne(x), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
