"""Rotary position embedding, rotate-half (the HF LLaMA convention), of rows x [T, heads, Dh] with the position's
cos, sin [T, Dh]: ``out = x · cos + rotate_half(x) · sin``, ``rotate_half(a | b) = (−b | a)``.

The reference is ``rope_ref``, the formula ``engine.model.apply_rope`` runs in training and wherever the op does
not apply. Ours is ``llava_kernels/cpu/rope.cpp`` (``torch.ops.llava_cpu.rope``, built by ``llava_kernels._cpu``):
fp32 CPU inference in one pass instead of the formula's six ops (~30 µs a call for one decode row of 24 heads of
64 on the 2-core development machine), with the formula's roundings (a product, a product, a sum, each rounded;
never an FMA), so it equals ``rope_ref`` bit for bit (tests/test_rope.py).
"""
from __future__ import annotations

import torch

from llava_kernels import _cpu


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh], cos/sin [T, Dh] (cast to x's dtype: under autocast the residual stream is fp32 but q/k
    are bf16) → [T, heads, Dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """As ``rope_ref``: fp32, CPU, contiguous x, Dh even, no autograd (an inference op). Raises RuntimeError when
    the CPU ops are not available (ask ``available()`` first) or a shape is wrong."""
    return _cpu.ops().rope(x, cos, sin)


available, load_error = _cpu.available, _cpu.load_error
