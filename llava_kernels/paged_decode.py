"""Paged decode attention: one new query token per sequence attends to its cached context, read in
place through the block table (no gathered copy of K/V).

Letters: B sequences, H query heads, Hkv key/value heads, R = H / Hkv queries per KV head, Dh head
dim, NB cache blocks, Bs tokens per block, nb blocks per sequence in this call, S context splits.

    out[b, h] = softmax(scale · q[b, h] · K[b]ᵀ) · V[b]   over positions p < seq_lens[b]
    K[b][p] = k_cache[block_table[b, p // Bs], p % Bs, h // R]   (V likewise)

Why a kernel: the reference gathers every sequence's blocks into a contiguous [B, Hkv, nb·Bs, Dh]
copy before one SDPA call, so each decode step reads the context K/V three times (read, write,
read again). Decode is bound by memory bandwidth, and at batch 32 with a few hundred tokens of
context the K/V bytes rival the weights'. The kernel reads each cached K/V row once.

Split-K ("flash decoding"): program (b, hkv, s) runs an online softmax over context blocks
[s·BPS, (s+1)·BPS) for the R query heads that share KV head hkv, and writes a partial (max m,
sum l, unnormalised output acc); a few torch ops combine the S partials. The grid depends only
on B, Hkv and nb, and lengths are read on the device, so a CUDA graph can capture it (the decode
step's graph buckets fix B and nb).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_kernels import dispatch

_BLOCKS_PER_SPLIT = 16  # context blocks per program (256 tokens at the runtime's default Bs = 16)


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
                         nb, scale, S, stride_table,
                         HKV: tl.constexpr, R: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                         R_PAD: tl.constexpr, DH_PAD: tl.constexpr, BS_PAD: tl.constexpr, BPS: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)          # KV head
    s = tl.program_id(2)          # context split
    rows = tl.arange(0, R_PAD)    # query heads g·R + rows
    dims = tl.arange(0, DH_PAD)
    toks = tl.arange(0, BS_PAD)
    rmask = rows < R
    dmask = dims < DH
    tmask = toks < BS
    heads = g * R + rows
    q = tl.load(q_ptr + (b * HKV * R + heads)[:, None] * DH + dims[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)   # [R_PAD, DH_PAD]
    seq_len = tl.load(lens_ptr + b)
    # A finite floor, not -inf: a split whose positions are all past seq_len keeps m = -1e30, l = 0,
    # and exp(m - m_new) stays well defined (the combine gives such a split weight exp(-1e30 - M) = 0).
    m = tl.full([R_PAD], -1e30, tl.float32)
    l = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, DH_PAD], tl.float32)
    first = s * BPS
    for j in range(first, tl.minimum(first + BPS, nb)):
        blk = tl.load(table_ptr + b * stride_table + j).to(tl.int64)
        pos = j * BS + toks
        valid = tmask & (pos < seq_len)
        kv_off = ((blk * BS + toks) * HKV + g)[:, None] * DH + dims[None, :]     # [BS_PAD, DH_PAD]
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        # Broadcast-multiply-reduce instead of tl.dot: R can be 1 and Bs small, below tl.dot's 16;
        # decode is bound by the K/V reads, not by these FLOPs.
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale               # [R_PAD, BS_PAD]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    part = (b * HKV * R + heads) * S + s                                             # [R_PAD]
    tl.store(m_ptr + part, m, mask=rmask)
    tl.store(l_ptr + part, l, mask=rmask)
    tl.store(acc_ptr + part[:, None] * DH + dims[None, :], acc, mask=rmask[:, None] & dmask[None, :])


def paged_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Launch the split kernel, then combine the splits: [B, H, Dh] in q's dtype."""
    b, h, dh = q.shape
    _, bs, hkv, _ = k_cache.shape
    nb = block_table.shape[1]
    r = h // hkv
    splits = max(1, math.ceil(nb / _BLOCKS_PER_SPLIT))
    m = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)       # (B, H, S)
    lsum = torch.empty_like(m)
    acc = torch.empty(b, h, splits, dh, dtype=torch.float32, device=q.device)  # (B, H, S, Dh)
    r_pad, dh_pad, bs_pad = max(2, triton.next_power_of_2(r)), triton.next_power_of_2(dh), triton.next_power_of_2(bs)
    # The [R, Bs, Dh] fp32 product tiles live in registers: spread wide ones (GQA) over 8 warps.
    warps = 8 if r_pad * bs_pad * dh_pad > 8192 else 4
    _paged_decode_kernel[(b, hkv, splits)](
        q.contiguous(), k_cache, v_cache, block_table, seq_lens, m, lsum, acc, nb, scale, splits,
        block_table.stride(0), HKV=hkv, R=r, DH=dh, BS=bs, R_PAD=r_pad, DH_PAD=dh_pad, BS_PAD=bs_pad,
        BPS=_BLOCKS_PER_SPLIT, num_warps=warps)
    w = torch.exp(m - m.amax(-1, keepdim=True))                                  # (B, H, S)
    out = (w[..., None] * acc).sum(-2) / (w * lsum).sum(-1, keepdim=True)        # (B, H, Dh)
    return out.to(q.dtype)


def _validate(q, k_cache, v_cache, block_table, seq_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, H, Dh] and k/v caches one [NB, Bs, Hkv, Dh] shape; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, h, dh = q.shape
    if k_cache.shape[3] != dh or h % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} (head dim, or "
                         f"query heads not a multiple of KV heads)")
    if block_table.dim() != 2 or block_table.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_table must be [B={b}, nb] and seq_lens [B]; got {tuple(block_table.shape)}, "
                         f"{tuple(seq_lens.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table and seq_lens must be integer tensors; got {block_table.dtype}, "
                         f"{seq_lens.dtype}")
    if len({t.device for t in (q, k_cache, v_cache, block_table, seq_lens)}) != 1:
        raise ValueError("q, the caches, block_table and seq_lens must be on one device")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the k/v caches must be contiguous [NB, Bs, Hkv, Dh] tensors")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           length_mask: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context; nothing is mutated.

    q [B, H, Dh]; k_cache, v_cache [NB, Bs, Hkv, Dh] (one layer, contiguous); block_table int
    [B, nb] (nb·Bs ≥ every seq_len); seq_lens int [B] ≥ 1 (positions < seq_len are attended, the
    query's own included). ``length_mask``: ``key_mask(seq_lens, nb·Bs)`` when the caller has it
    already (a decode step builds it once for all layers); only the reference reads it.
    Returns [B, H, Dh] in q's dtype, accumulated in fp32. Inference only (no autograd).
    ValueError for mismatched shapes, dtypes or devices (no device sync).
    """
    _validate(q, k_cache, v_cache, block_table, seq_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dispatch.resolve("paged_decode", q.device, backend) == "triton":
        return paged_decode_fwd(q, k_cache, v_cache, block_table, seq_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale=scale,
                                      length_mask=length_mask)


def key_mask(seq_lens: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, 1, 1, ctx] bool: True where the key position is < the sequence's length."""
    return (torch.arange(ctx, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                               scale: float | None = None, length_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: gather each sequence's blocks into [B, Hkv, nb·Bs, Dh], then one SDPA call with a
    length mask (query heads grouped per KV head, so GQA needs no K/V repeat)."""
    b, h, dh = q.shape
    _, bs, hkv, _ = k_cache.shape
    nb = block_table.shape[1]
    keys = k_cache.index_select(0, block_table.reshape(-1)).view(b, nb * bs, hkv, dh).transpose(1, 2)
    vals = v_cache.index_select(0, block_table.reshape(-1)).view(b, nb * bs, hkv, dh).transpose(1, 2)
    mask = key_mask(seq_lens, nb * bs) if length_mask is None else length_mask          # (B, 1, 1, ctx)
    q4 = q.view(b, hkv, h // hkv, dh)                     # (B, Hkv, R, Dh): R queries per KV head
    out = F.scaled_dot_product_attention(q4, keys, vals, attn_mask=mask, scale=scale)
    return out.reshape(b, h, dh)
