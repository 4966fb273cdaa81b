"""The decoder's inference GEMM: ``F.linear``, except for the few-row fp32 GEMMs of decoding on the CPU,
which our kernel (``llava_kernels.small_gemm``, up to 64 rows) or oneDNN (up to 96) runs.

Why: at decoding's row counts PyTorch's CPU ``F.linear`` (MKL sgemm) leaves one of the cores idle. On this
project's 2-core development machine (2026-12-05, torch 2.13.0+cpu, quiet), the 49 weight matrices of the
CPU benchmark model (12 × 768 decoder, 32k vocab, 438 MB fp32) read at 17.4 GB/s with one thread and 17.4
GB/s with two at one row (batch-1 decode), while a plain ``sum`` over the same bytes reads at 31-41 GB/s
with two threads (the figure moves between machines of this kind); oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, the op Inductor emits for CPU linears) reads them at 27-33 GB/s
and our AVX2 kernel at 32-36 GB/s, as fast as the ``sum`` (its docstring has the table up to 64 rows).
All 49 matrices, MKL vs oneDNN: 1 row 26.0 vs 15.2 ms, 8 rows 69.1 vs 36.6 ms, 32 rows 100.1 vs 70.1 ms.
From ~128 rows on MKL is the faster (one layer's four matrices: 64 rows 8.7 vs 7.0 ms, 128 rows 13.1 vs
13.7 ms, 640 rows 51.4 vs 60.5 ms, 2048 rows 173 vs 213 ms), so prefill keeps ``F.linear``: oneDNN takes
at most ``ONEDNN_MAX_ROWS`` rows. All accumulate in fp32 in their own order: results agree to ~1e-6
relative (tests/test_linear.py holds the bound).

Only where no gradient is wanted (inference: the runtime, ``generate``, evaluation) and the weight is
a plain fp32 tensor: training keeps ``F.linear`` and its autograd; a quantized weight (a tensor subclass)
dispatches through ``F.linear`` to its own kernel. ``ONEDNN = False`` / ``SMALL_GEMM = False`` turn the
routes off (tests); where the kernel cannot be built, ``llava_kernels.small_gemm.load_error()`` says why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_kernels import small_gemm as _small

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MAX_ROWS = 96   # between the 64 rows where oneDNN was 1.25x MKL and the 128 where it was 0.96x
SMALL_GEMM = True      # our kernel for up to _small.MAX_ROWS rows, where it builds
_PLAIN = (torch.Tensor, nn.Parameter)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]ᵀ → [..., N] (no bias)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or type(w) not in _PLAIN
            or torch.is_grad_enabled()):
        return F.linear(x, w)
    rows = x.numel() // max(x.shape[-1], 1)
    if SMALL_GEMM and rows <= _small.MAX_ROWS and w.is_contiguous() and _small.available():
        return _small.small_gemm(x.reshape(rows, x.shape[-1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    if ONEDNN and rows <= ONEDNN_MAX_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def apply(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for a decoder projection, through ``linear`` in inference when ``m`` is exactly a bias-free
    ``nn.Linear`` without hooks; otherwise the module's own call (training, a PEFT LoRA layer or any
    other wrapper, a module someone hooked)."""
    if (torch.is_grad_enabled() or type(m) is not nn.Linear or m.bias is not None or m._forward_hooks
            or m._forward_pre_hooks):
        return m(x)
    return linear(x, m.weight)
