"""The decoder's inference GEMM: ``F.linear`` everywhere except fp32 on the CPU, where oneDNN runs it.

Why: at generation's row counts PyTorch's CPU ``F.linear`` (MKL sgemm) leaves one of the cores idle.
On this project's 2-core development machine (2026-12-05, torch 2.13.0+cpu, quiet), the 49 weight
matrices of the CPU benchmark model (12 × 768 decoder, 32k vocab, 438 MB fp32) read at 17.4 GB/s with one
thread and 17.4 GB/s with two at one row (batch-1 decode), while a plain ``sum`` over the same bytes
reads at 41.5 GB/s with two threads; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op
Inductor emits for CPU linears) reads at 33 GB/s. Per step of all 49 matrices, MKL vs oneDNN: 1 row 26.0
vs 15.2 ms, 8 rows 69.1 vs 36.6 ms, 32 rows 100.1 vs 70.1 ms, 128 rows 260.0 vs 207.7 ms. Both accumulate
in fp32 in their own order: results agree to ~1e-6 relative (tests/test_linear.py holds the bound).

Only where no gradient is wanted (inference: the runtime, ``generate``, evaluation) and the weight is
a plain fp32 tensor: training keeps ``F.linear`` and its autograd; a quantized weight (a tensor subclass)
dispatches through ``F.linear`` to its own kernel. ``ONEDNN = False`` turns the route off (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PLAIN = (torch.Tensor, nn.Parameter)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]ᵀ → [..., N] (no bias)."""
    if (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and type(w) in _PLAIN and not torch.is_grad_enabled()):
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
