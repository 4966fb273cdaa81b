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
from llava_kernels import small_gemm_int8 as _int8

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MAX_ROWS = 96   # between the 64 rows where oneDNN was 1.25x MKL and the 128 where it was 0.96x
SMALL_GEMM = True      # our kernel for up to _small.MAX_ROWS rows, where it builds
_PLAIN = (torch.Tensor, nn.Parameter)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]ᵀ → [..., N] (no bias)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or torch.is_grad_enabled():
        return F.linear(x, w)
    rows = x.numel() // max(x.shape[-1], 1)
    if type(w) not in _PLAIN:  # a quantized weight: ours for torchao's per-row int8 at few rows, else its own kernel
        int8 = int8_rows(w) if int8_route(x) else None
        return F.linear(x, w) if int8 is None else linear_int8(x, *int8)
    if SMALL_GEMM and rows <= _small.MAX_ROWS and w.is_contiguous() and _small.available():
        return _small.small_gemm(x.reshape(rows, x.shape[-1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    if ONEDNN and rows <= ONEDNN_MAX_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def int8_route(x: torch.Tensor) -> bool:
    """Whether a per-row int8 weight's GEMM on ``x`` runs our kernel (``linear_int8``): fp32 CPU inference of
    at most ``small_gemm_int8.MAX_ROWS`` rows, the kernel built."""
    return (SMALL_GEMM and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.numel() // max(x.shape[-1], 1) <= _int8.MAX_ROWS and _int8.available())


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] · scale [N])ᵀ → [..., N] on our kernel (``int8_route(x)`` holds)."""
    out = _int8.small_gemm_int8(x.reshape(-1, x.shape[-1]).contiguous(), q, scale)
    return out.view(*x.shape[:-1], out.shape[-1])


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [N, K], scale fp32 [N]) when ``w`` is torchao's symmetric per-row int8 weight (``Int8Tensor``
    with block size [1, K], no activation quantization, zero points all 0: ``engine.quantize``'s int8), else
    None. The check reads the zero points once; the verdict is kept on the tensor, valid while its ``qdata``
    and ``scale`` are the same objects (``engine.model.fuse_linears`` re-points them into one fused tensor)."""
    seen = w.__dict__.get("_llava_int8")
    if seen is not None and (seen is False or (seen[2] is w.qdata and seen[3] is w.scale)):
        return seen[:2] if seen else None
    ok = (type(w).__name__ == "Int8Tensor" and getattr(w, "act_quant_kwargs", 1) is None
          and list(getattr(w, "block_size", ())) == [1, w.shape[-1]] and w.dim() == 2)
    q, scale, zero = (getattr(w, a, None) for a in ("qdata", "scale", "zero_point"))
    ok = (ok and q is not None and q.dtype == torch.int8 and q.device.type == "cpu" and q.is_contiguous()
          and scale is not None and scale.dtype == torch.float32 and scale.numel() == q.shape[0]
          and scale.is_contiguous() and (zero is None or not bool(zero.any())))
    w.__dict__["_llava_int8"] = (q, scale.view(-1), q, scale) if ok else False
    return (q, scale.view(-1)) if ok else None


def apply(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for a decoder projection, through ``linear`` in inference when ``m`` is exactly a bias-free
    ``nn.Linear`` without hooks; otherwise the module's own call (training, a PEFT LoRA layer or any
    other wrapper, a module someone hooked)."""
    if (torch.is_grad_enabled() or type(m) is not nn.Linear or m.bias is not None or m._forward_hooks
            or m._forward_pre_hooks):
        return m(x)
    return linear(x, m.weight)
