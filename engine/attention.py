"""One varlen attention API over several backends.

Letters: T packed tokens, B sequences, H query heads, Hkv key/value heads, Dh head dim.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)`` attends within each packed
sequence only. Backends, in the order ``auto`` tries them:

1. ``flash_attn``   — ``flash_attn_varlen_func`` (CUDA, when the package is importable);
2. ``torch_varlen`` — ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch ≥ 2.10);
3. ``xformers``     — ``BlockDiagonalCausalMask`` (CUDA, when importable);
4. ``sdpa``         — per-sequence ``scaled_dot_product_attention``: the reference and the CPU path.

The choice can be forced with ``backend=`` or ``LLAVA_ATTENTION_BACKEND``.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "xformers", "sdpa")


@functools.cache
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _xformers():
    try:
        from xformers.ops import fmha
    except ImportError:
        return None
    return fmha


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device``, in preference order."""
    found = []
    if device.type == "cuda":
        for name, probe in (("flash_attn", _flash_attn), ("torch_varlen", _torch_varlen),
                            ("xformers", _xformers)):
            if probe() is not None:
                found.append(name)
    found.append("sdpa")
    return found


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    choice = backend or os.environ.get("LLAVA_ATTENTION_BACKEND") or "auto"
    found = available_backends(device)
    if choice == "auto":
        return found[0]
    if choice not in BACKENDS:
        raise ValueError(f"unknown attention backend {choice!r}; expected one of {BACKENDS} or 'auto'")
    if choice not in found:
        raise ValueError(f"attention backend {choice!r} is not available on {device} (available: {found})")
    return choice


def _check(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool = True, *, backend: str | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Attention within each packed sequence.

    q ``[T, H, Dh]``, k/v ``[T, Hkv, Dh]`` (H a multiple of Hkv: GQA), ``cu_seqlens`` int32
    ``[B+1]`` with ``cu_seqlens[-1] == T``, ``max_seqlen`` the longest sequence. Returns
    ``[T, H, Dh]`` in q's dtype. Nothing is mutated.
    """
    _check(q, k, v, cu_seqlens)
    name = resolve_backend(q.device, backend)
    if name == "flash_attn":
        return _flash_attn()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                             softmax_scale=scale)
    if name == "torch_varlen":
        return _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if name == "xformers":
        return _xformers_call(q, k, v, cu_seqlens, causal, scale)
    return varlen_attention_ref(q, k, v, cu_seqlens, causal, scale=scale)


@functools.cache
def _torch_varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    params = _torch_varlen_params()
    kwargs = {"scale": scale}
    # torch 2.10 takes ``is_causal``; 2.11 replaced it with ``window_size`` ((-1, 0) = causal).
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _xformers_call(q, k, v, cu_seqlens, causal, scale):
    fmha = _xformers()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = (fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask)
    bias = bias.from_seqlens(lens)
    hkv, rep = k.shape[1], q.shape[1] // k.shape[1]
    # xformers takes GQA as [1, T, Hkv, rep, Dh] ("BMGHK").
    q5 = q.unflatten(1, (hkv, rep)).unsqueeze(0)
    k5 = k.unsqueeze(2).expand(-1, -1, rep, -1).unsqueeze(0)
    v5 = v.unsqueeze(2).expand(-1, -1, rep, -1).unsqueeze(0)
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale)
    return out.squeeze(0).flatten(1, 2)


def varlen_attention_ref(q, k, v, cu_seqlens, causal=True, *, scale=None) -> torch.Tensor:
    """Reference: one ``scaled_dot_product_attention`` per sequence (math on CPU)."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e == s:
            continue
        # 4-D inputs: CPU SDPA takes its fast flash path only with a batch dimension (~7x).
        qs = q[s:e].transpose(0, 1)[None]                          # (1, H, L, Dh)
        ks = k[s:e].transpose(0, 1).repeat_interleave(rep, 0)[None]  # (1, H, L, Dh)
        vs = v[s:e].transpose(0, 1).repeat_interleave(rep, 0)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
    return out
