"""The decoder's inference GEMM: ``F.linear``, except for the few-row fp32 GEMMs of decoding on the CPU,
which oneDNN runs.

Why: at decoding's row counts PyTorch's CPU ``F.linear`` (MKL sgemm) leaves one of the cores idle. On this
project's 2-core development machine (2026-12-05, torch 2.13.0+cpu, quiet), the 49 weight matrices of the
CPU benchmark model (12 × 768 decoder, 32k vocab, 438 MB fp32) read at 17.4 GB/s with one thread and 17.4
GB/s with two at one row (batch-1 decode), while a plain ``sum`` over the same bytes reads at 41.5 GB/s
with two threads; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op Inductor emits for CPU
linears) reads them at ~33 GB/s. All 49 matrices, MKL vs oneDNN: 1 row 26.0 vs 15.2 ms, 8 rows 69.1 vs
36.6 ms, 32 rows 100.1 vs 70.1 ms. From ~128 rows on MKL is the faster (one layer's four matrices: 64 rows
8.7 vs 7.0 ms, 128 rows 13.1 vs 13.7 ms, 640 rows 51.4 vs 60.5 ms, 2048 rows 173 vs 213 ms), so prefill
keeps ``F.linear``: oneDNN takes at most ``ONEDNN_MAX_ROWS`` rows. Both accumulate in fp32 in their own
order: results agree to ~1e-6 relative (tests/test_linear.py holds the bound).

Only where no gradient is wanted (inference: the runtime, ``generate``, evaluation) and the weight is
a plain fp32 tensor: training keeps ``F.linear`` and its autograd; a quantized weight (a tensor subclass)
dispatches through ``F.linear`` to its own kernel. ``ONEDNN = False`` turns the route off (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MAX_ROWS = 96   # between the 64 rows where oneDNN was 1.25x MKL and the 128 where it was 0.96x
_PLAIN = (torch.Tensor, nn.Parameter)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]ᵀ → [..., N] (no bias)."""
    if (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and type(w) in _PLAIN and not torch.is_grad_enabled() and x.numel() <= ONEDNN_MAX_ROWS * x.shape[-1]):
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
