"""One varlen attention API over several backends.

Letters: T packed tokens, B sequences, H query heads, Hkv key/value heads, Dh head dim.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)`` attends within each packed
sequence only. With ``cu_seqlens_k`` the keys are packed separately and may be longer than the
queries (prefill after a cached prefix): the queries are then the *last* positions of their
sequence, and causal masking is aligned bottom-right (query i of Lq sees keys j ≤ i + Lk − Lq),
the convention of FlashAttention ≥ 2.1 and of xformers' ``…FromBottomRightMask``. Backends, in
the order ``auto`` tries them:

1. ``flash_attn``   — ``flash_attn_varlen_func`` (CUDA, when the package is importable);
2. ``torch_varlen`` — ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch ≥ 2.10);
3. ``xformers``     — ``BlockDiagonalCausalMask`` (CUDA, when importable);
4. ``sdpa``         — per-sequence ``scaled_dot_product_attention``: the reference and the CPU path.

The choice can be forced with ``backend=`` or ``LLAVA_ATTENTION_BACKEND``. ``auto`` skips the two
FlashAttention backends for inputs they cannot take (float32, head dims that are not a multiple of 8
or above 256). Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as autocast
does for ``scaled_dot_product_attention`` (q/k may arrive in float32 after RoPE while v is bf16).
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


# The FlashAttention kernels (flash_attn and torch's varlen_attn, which calls aten's copy of FA2) take
# only half precision and head dims that are multiples of 8 up to 256.
_FLASH = ("flash_attn", "torch_varlen")


def _flash_can_take(dtype: torch.dtype | None, head_dim: int | None) -> bool:
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False
    return head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)


def available_backends(device: torch.device, dtype: torch.dtype | None = None,
                       head_dim: int | None = None) -> list[str]:
    """Backends that can run on ``device`` (and, when given, ``dtype`` / ``head_dim``), in preference order."""
    found = []
    if device.type == "cuda":
        for name, probe in (("flash_attn", _flash_attn), ("torch_varlen", _torch_varlen),
                            ("xformers", _xformers)):
            if probe() is not None and (name not in _FLASH or _flash_can_take(dtype, head_dim)):
                found.append(name)
    found.append("sdpa")
    return found


def resolve_backend(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None,
                    head_dim: int | None = None) -> str:
    """The backend ``varlen_attention`` runs; ValueError for an unknown or unusable explicit choice."""
    choice = backend or os.environ.get("LLAVA_ATTENTION_BACKEND") or "auto"
    found = available_backends(device, dtype, head_dim)
    if choice == "auto":
        return found[0]
    if choice not in BACKENDS:
        raise ValueError(f"unknown attention backend {choice!r}; expected one of {BACKENDS} or 'auto'")
    if choice not in found:
        what = f"{device}" + (f" with {dtype}" if dtype is not None else "") + (
            f", head dim {head_dim}" if head_dim is not None else "")
        raise ValueError(f"attention backend {choice!r} is not available on {what} (available: {found})")
    return choice


def _check(q, k, v, cu_seqlens, cu_seqlens_k):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    same_rows = cu_seqlens_k is not None or q.shape[0] == k.shape[0]
    if k.shape != v.shape or not same_rows or q.shape[2] != k.shape[2]:
        raise ValueError(f"k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None and (cu.dim() != 1 or cu.dtype != torch.int32):
            raise ValueError(f"{name} must be a 1-D int32 tensor; got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} and cu_seqlens {tuple(cu_seqlens.shape)} "
                         f"describe different numbers of sequences")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool = True, *, backend: str | None = None,
                     scale: float | None = None, cu_seqlens_k: torch.Tensor | None = None,
                     max_seqlen_k: int | None = None) -> torch.Tensor:
    """Attention within each packed sequence.

    q ``[T, H, Dh]``, k/v ``[T, Hkv, Dh]`` (H a multiple of Hkv: GQA), ``cu_seqlens`` int32
    ``[B+1]`` with ``cu_seqlens[-1] == T``, ``max_seqlen`` the longest sequence. With
    ``cu_seqlens_k`` (int32 [B+1]) and ``max_seqlen_k``, k/v are ``[Tk, Hkv, Dh]`` packed by
    their own offsets, each sequence having at least as many keys as queries (causal masking
    bottom-right aligned). Returns ``[T, H, Dh]`` in q's dtype (the autocast dtype under
    ``torch.autocast``). Nothing is mutated. Raises ValueError for mismatched shapes or dtypes
    and for an unknown or unusable ``backend``.
    """
    _check(q, k, v, cu_seqlens, cu_seqlens_k)
    if cu_seqlens_k is None:
        cu_k, max_k = cu_seqlens, max_seqlen
    else:
        cu_k, max_k = cu_seqlens_k, max_seqlen if max_seqlen_k is None else max_seqlen_k
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    elif not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype outside autocast; got {q.dtype}, {k.dtype}, {v.dtype}")
    name = resolve_backend(q.device, backend, q.dtype, q.shape[2])
    if name == "flash_attn":
        return _flash_attn()(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal=causal, softmax_scale=scale)
    if name == "torch_varlen":
        return _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal, scale, cu_k, max_k)
    if name == "xformers":
        return _xformers_call(q, k, v, cu_seqlens, causal, scale, cu_k)
    return varlen_attention_ref(q, k, v, cu_seqlens, causal, scale=scale, cu_seqlens_k=cu_k)


@functools.cache
def _torch_varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal, scale, cu_k=None, max_k=None):
    """torch's varlen_attn across versions (it has autograd: dq, dk, dv through aten's FA2 backward).

    2.10: ``(…, max_q, max_k, is_causal=False, return_aux=None)``, no ``scale``;
    2.11: keyword-only ``return_aux, scale, window_size`` — causal is ``window_size=(-1, 0)`` and must be
    that exact tuple (varlen_attn tests ``window_size == (-1, 0)``; a list would silently run non-causal);
    2.12+: adds ``enable_gqa`` (and paged-cache arguments).
    """
    params = _torch_varlen_params()
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel applies 1/sqrt(Dh): fold the rest of the requested scale into q
            q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # 2.10/2.11 check no head counts; repeat K/V so every version gets a plain MHA call
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # FA2 needs the head dim contiguous (q, k, v arrive as views of the projections)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu_k, max_k = (cu_seqlens, max_seqlen) if cu_k is None else (cu_k, max_k)
    return _torch_varlen()(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, **kwargs)


def _xformers_call(q, k, v, cu_seqlens, causal, scale, cu_k=None):
    fmha = _xformers()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    lens_k = lens if cu_k is None else (cu_k[1:] - cu_k[:-1]).tolist()
    if not causal:
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens, lens_k)
    elif lens_k == lens:
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lens)
    else:
        bias = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(lens, lens_k)
    hkv, rep = k.shape[1], q.shape[1] // k.shape[1]
    # xformers takes GQA as [1, T, Hkv, rep, Dh] ("BMGHK").
    q5 = q.unflatten(1, (hkv, rep)).unsqueeze(0)
    k5 = k.unsqueeze(2).expand(-1, -1, rep, -1).unsqueeze(0)
    v5 = v.unsqueeze(2).expand(-1, -1, rep, -1).unsqueeze(0)
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale)
    return out.squeeze(0).flatten(1, 2)


def varlen_attention_ref(q, k, v, cu_seqlens, causal=True, *, scale=None, cu_seqlens_k=None) -> torch.Tensor:
    """Reference: one ``scaled_dot_product_attention`` per sequence (math on CPU)."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    bounds_k = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0]:  # rows outside [0, T) would stay unwritten
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[0]}; got {bounds[:1]} ... {bounds[-1:]}")
    if bounds_k[0] != 0 or bounds_k[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens_k must run from 0 to Tk={k.shape[0]}; got {bounds_k[:1]} ... {bounds_k[-1:]}")
    for i in range(len(bounds) - 1):
        s, e, sk, ek = bounds[i], bounds[i + 1], bounds_k[i], bounds_k[i + 1]
        if e == s:
            continue
        if ek - sk < e - s:
            raise ValueError(f"sequence {i} has {e - s} queries but only {ek - sk} keys")
        # 4-D inputs: CPU SDPA takes its fast flash path only with a batch dimension (~7x).
        qs = q[s:e].transpose(0, 1)[None]                              # (1, H, Lq, Dh)
        ks = k[sk:ek].transpose(0, 1).repeat_interleave(rep, 0)[None]  # (1, H, Lk, Dh)
        vs = v[sk:ek].transpose(0, 1).repeat_interleave(rep, 0)[None]
        if causal and ek - sk != e - s:  # SDPA's is_causal is top-left aligned: give the bottom-right mask
            mask = torch.ones(e - s, ek - sk, dtype=torch.bool, device=q.device).tril(ek - sk - (e - s))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
    return out
