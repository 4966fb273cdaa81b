"""RMSNorm of fp32 rows for CPU inference: ``y = w · (x · rsqrt(mean(x²) + eps))``, x [..., D], w [D].

The reference is ``rms_norm_ref``, the LLaMA formula as ``engine.model.RMSNorm`` computes it in training.
Ours is ``llava_kernels/cpu/rms_norm.cpp`` (``torch.ops.llava_cpu.rms_norm``, built by
``llava_kernels._cpu``): one pass for the sum of squares, one for the output. Why: in a decode step a
row of 768 floats through ``torch.rms_norm`` (six ops inside) cost ~43 µs, 25 of them a step (1.1 ms of
a 20 ms step of the CPU benchmark model, 2026-12-05).

Numerics: the sum of squares in eight lane-wise fp32 partial sums, then the rest as the formula; within
the formula's own rounding of its fp32 mean (tests/test_rms_norm.py).
"""
from __future__ import annotations

import torch

from llava_kernels import _cpu


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (normalised in fp32), w [D] → [..., D] in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], w [D]: fp32, CPU, contiguous, no autograd (an inference op). Raises RuntimeError when
    the CPU ops are not available (ask ``available()`` first)."""
    return _cpu.ops().rms_norm(x, w, eps)


available, load_error = _cpu.available, _cpu.load_error
