"""Few-row GEMM with weight-only int8 weights for decoding on the CPU:
``y[M, N] = (x[M, K] · q[N, K]ᵀ) · scale[N]``, x fp32, q int8, one fp32 scale per output row (symmetric, no zero
point: torchao's ``Int8WeightOnlyConfig`` with ``PerRow``, what ``engine.quantize`` makes), M ≤ ``MAX_ROWS``.

The reference is ``small_gemm_int8_ref`` (dequantize, then ``F.linear``: what torchao's linear computes). Ours is
``llava_kernels/cpu/small_gemm_int8.cpp`` (``torch.ops.llava_cpu.small_gemm_int8``, built by
``llava_kernels._cpu``): ``small_gemm``'s layout reading 1 byte per weight, each 8 weights widened to fp32 in
registers. Why: torchao 0.18's int8 linear, run eagerly on the CPU, casts the whole int8 weight to fp32 on every
call, then runs a float GEMM: it moves more bytes than the fp32 model does, and int8 decoded at 0.31× fp32
(``bench/results/cpu/README.md``). Where the kernel cannot be built, ``engine.linear`` leaves torchao's path.

Numerics: the products x·q are exact in fp32 only up to rounding of x·q (|q| ≤ 127), summed in eight lane-wise
partial sums, a fixed horizontal add and the tail in order, then one multiply by the scale; torchao rounds
q·scale per weight first. Both are within the fp32 summation bound of the exact result (tests/test_small_gemm_int8.py),
and every output element is summed the same way whatever M is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_kernels import _cpu

MAX_ROWS = 64     # as small_gemm: above, torchao's path (a float GEMM after its dequantization)


def small_gemm_int8_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32, q [N, K] int8, scale [N] → [M, N]."""
    return F.linear(x, q.to(x.dtype) * scale[:, None].to(x.dtype))


def small_gemm_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """As ``small_gemm_int8_ref``: CPU, contiguous, no autograd (an inference op). Raises RuntimeError when the
    kernel is not available (ask ``available()`` first) or a shape or dtype is wrong."""
    return _cpu.ops().small_gemm_int8(x, q, scale)


available, load_error = _cpu.available, _cpu.load_error
