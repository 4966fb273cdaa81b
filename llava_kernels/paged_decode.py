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
[s·BPS, (s+1)·BPS) for the R query heads that share KV head hkv. With one split it writes the
output itself; with several it writes a partial (max m, sum l, unnormalised output acc) and a
second small kernel combines the S partials of each (b, h): two launches at most per call.
The split count comes from B, Hkv, nb and the device's SM count (`split_plan`): enough programs
to fill the GPU (batch 1 with GQA has only Hkv programs per split), each reading 4..16 blocks.
The grid depends only on B, Hkv and nb (host ints) and lengths are read on the device, so the op
never syncs and a CUDA graph can capture it (the decode step's graph buckets fix B and nb).

On the CPU (fp32), ``llava_kernels/cpu/paged_decode.cpp`` also reads the blocks in place: one task per
(sequence, KV head) on torch's threads, an exact two-pass softmax. In a batch-1 decode step of the CPU
benchmark model (12 layers, ~100 cached tokens, 2026-12-05) the reference's gather + mask + SDPA took
~2.1 ms of an ~18.5 ms step; the kernel (eight positions a reduction, a vectorised exp) ~35 µs a layer.

Timing note (the H200 run of 2026-12-04): 0.14-0.25 ms for 2-400 MB of K/V, far below bandwidth,
was launch overhead timed outside a CUDA graph (then: one kernel plus ~8 torch ops for the combine),
while the runtime replays decode steps as graphs; bench/bench_paged_decode.py times graph replays.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_kernels import _cpu, dispatch
from llava_kernels._triton_util import store_cast

_MIN_BLOCKS_PER_SPLIT = 4    # a split's partial (R·(Dh+2) fp32 written, read back) stays small next to its K/V
_MAX_BLOCKS_PER_SPLIT = 16   # 256 tokens at Bs = 16: bounds the longest program when contexts differ
_PROGRAMS_PER_SM = 4         # enough resident programs per SM to keep loads in flight


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
                         nb, scale, S, BPS, stride_table,
                         HKV: tl.constexpr, R: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                         R_PAD: tl.constexpr, DH_PAD: tl.constexpr, BS_PAD: tl.constexpr,
                         ONE_SPLIT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Split s of (b, KV head g). ONE_SPLIT: out[b, heads] = acc / l in out's dtype; else the partial
    (m, l, acc) of each head goes to [B, H, S] (+ [Dh]) fp32 buffers for _combine_kernel."""
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
    if ONE_SPLIT:
        # seq_len >= 1 (the contract), so l > 0 for every real head.
        out = acc / tl.where(rmask, l, 1.0)[:, None]
        store_cast(out_ptr + (b * HKV * R + heads)[:, None] * DH + dims[None, :], out,
                   rmask[:, None] & dmask[None, :], ROUND_BF16)
    else:
        part = (b * HKV * R + heads) * S + s                                         # [R_PAD]
        tl.store(m_ptr + part, m, mask=rmask)
        tl.store(l_ptr + part, l, mask=rmask)
        tl.store(acc_ptr + part[:, None] * DH + dims[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, S, DH: tl.constexpr, DH_PAD: tl.constexpr,
                    S_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Program (b·H + h): out = Σ_s w_s·acc_s / Σ_s w_s·l_s, w_s = exp(m_s - max m), in out's dtype.
    S_BLOCK partials at a time, merged online (a long context has hundreds of splits)."""
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, DH_PAD)
    dmask = dims < DH
    m_run = tl.full([1], -1e30, tl.float32)            # the splits' own floor (see _paged_decode_kernel)
    l_run = tl.zeros([1], tl.float32)
    acc_run = tl.zeros([DH_PAD], tl.float32)
    for s0 in range(0, S, S_BLOCK):
        sp = s0 + tl.arange(0, S_BLOCK)
        smask = sp < S
        m = tl.load(m_ptr + row * S + sp, mask=smask, other=-float("inf"))
        lsum = tl.load(l_ptr + row * S + sp, mask=smask, other=0.0)
        acc = tl.load(acc_ptr + (row * S + sp)[:, None] * DH + dims[None, :],
                      mask=smask[:, None] & dmask[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        alpha = tl.exp(m_run - m_new)
        w = tl.exp(m - m_new)                                                         # [S_BLOCK]
        l_run = l_run * alpha + tl.sum(w * lsum, axis=0)
        acc_run = acc_run * alpha + tl.sum(w[:, None] * acc, axis=0)
        m_run = m_new
    store_cast(out_ptr + row * DH + dims, acc_run / l_run, dmask, ROUND_BF16)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_plan(b: int, hkv: int, nb: int, sms: int) -> tuple[int, int]:
    """(S splits, BPS blocks per split) for B·Hkv (b, hkv) programs over nb context blocks on `sms` SMs:
    about _PROGRAMS_PER_SM·sms programs in all, each split reading _MIN.._MAX_BLOCKS_PER_SPLIT blocks
    (fewer only when nb is smaller). Host ints only: no sync, the same plan for every graph replay."""
    want = -(-_PROGRAMS_PER_SM * sms // (b * hkv))
    lo, hi = -(-nb // _MAX_BLOCKS_PER_SPLIT), max(1, -(-nb // _MIN_BLOCKS_PER_SPLIT))
    bps = -(-nb // min(max(want, lo), hi))
    return -(-nb // bps), bps


def paged_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, *, num_sms: int | None = None) -> torch.Tensor:
    """Launch the split kernel (and the combine when there are several splits): [B, H, Dh] in q's dtype.
    num_sms: the device's SM count by default (1 on the CPU interpreter); tests pass others."""
    b, h, dh = q.shape
    _, bs, hkv, _ = k_cache.shape
    nb = block_table.shape[1]
    r = h // hkv
    if num_sms is None:
        num_sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.is_cuda else 1
    splits, bps = split_plan(b, hkv, nb, num_sms)
    out = torch.empty((b, h, dh), dtype=q.dtype, device=q.device)
    if splits > 1:
        m = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)       # (B, H, S)
        lsum = torch.empty_like(m)
        acc = torch.empty(b, h, splits, dh, dtype=torch.float32, device=q.device)  # (B, H, S, Dh)
    else:
        m = lsum = acc = out                                                       # unused by ONE_SPLIT
    r_pad, dh_pad, bs_pad = max(2, triton.next_power_of_2(r)), triton.next_power_of_2(dh), triton.next_power_of_2(bs)
    # The [R, Bs, Dh] fp32 product tiles live in registers: spread wide ones (GQA) over 8 warps.
    warps = 8 if r_pad * bs_pad * dh_pad > 8192 else 4
    round_bf16 = dispatch.triton_interpreting() and q.dtype == torch.bfloat16
    _paged_decode_kernel[(b, hkv, splits)](
        q.contiguous(), k_cache, v_cache, block_table, seq_lens, m, lsum, acc, out, nb, scale, splits, bps,
        block_table.stride(0), HKV=hkv, R=r, DH=dh, BS=bs, R_PAD=r_pad, DH_PAD=dh_pad, BS_PAD=bs_pad,
        ONE_SPLIT=splits == 1, ROUND_BF16=round_bf16, num_warps=warps)
    if splits > 1:
        _combine_kernel[(b * h,)](m, lsum, acc, out, splits, DH=dh, DH_PAD=dh_pad, S_BLOCK=16,
                                  ROUND_BF16=round_bf16, num_warps=4)
    return out


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
                           length_mask: torch.Tensor | None = None, backend: str | None = None,
                           workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context; nothing is mutated but ``workspace``.

    q [B, H, Dh]; k_cache, v_cache [NB, Bs, Hkv, Dh] (one layer, contiguous); block_table int
    [B, nb] (nb·Bs ≥ every seq_len); seq_lens int [B] ≥ 1 (positions < seq_len are attended, the
    query's own included). ``length_mask``: ``key_mask(seq_lens, nb·Bs)`` when the caller has it
    already (a decode step builds it once for all layers); only the reference reads it, and gathers into
    ``workspace`` (two [B·nb, Bs, Hkv, Dh] buffers, overwritten) when given instead of new tensors.
    Returns [B, H, Dh] in q's dtype, accumulated in fp32. Inference only (no autograd).
    ValueError for mismatched shapes, dtypes or devices (no device sync).
    """
    _validate(q, k_cache, v_cache, block_table, seq_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    which = dispatch.resolve("paged_decode", q.device, backend)
    if which == "triton":
        return paged_decode_fwd(q, k_cache, v_cache, block_table, seq_lens, scale)
    if which == "cpu":
        if q.dtype == k_cache.dtype == torch.float32:
            return _cpu.ops().paged_decode(q.contiguous(), k_cache, v_cache, block_table, seq_lens, scale)
        if backend == "cpu":
            raise ValueError(f"backend 'cpu' of paged_decode is fp32 only; got {q.dtype} and {k_cache.dtype}")
    return paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale=scale,
                                      length_mask=length_mask, workspace=workspace)


def key_mask(seq_lens: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, 1, 1, ctx] bool: True where the key position is < the sequence's length."""
    return (torch.arange(ctx, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                               scale: float | None = None, length_mask: torch.Tensor | None = None,
                               workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Reference: gather each sequence's blocks into [B, Hkv, nb·Bs, Dh], then one SDPA call with a
    length mask (query heads grouped per KV head, so GQA needs no K/V repeat). ``workspace``: the two
    [B·nb, Bs, Hkv, Dh] buffers to gather into (see ``paged_decode_attention``)."""
    b, h, dh = q.shape
    _, bs, hkv, _ = k_cache.shape
    nb = block_table.shape[1]
    idx = block_table.reshape(-1)
    if workspace is None:
        keys, vals = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
    else:
        keys = torch.index_select(k_cache, 0, idx, out=workspace[0])
        vals = torch.index_select(v_cache, 0, idx, out=workspace[1])
    keys = keys.view(b, nb * bs, hkv, dh).transpose(1, 2)
    vals = vals.view(b, nb * bs, hkv, dh).transpose(1, 2)
    mask = key_mask(seq_lens, nb * bs) if length_mask is None else length_mask          # (B, 1, 1, ctx)
    q4 = q.view(b, hkv, h // hkv, dh)                     # (B, Hkv, R, Dh): R queries per KV head
    out = F.scaled_dot_product_attention(q4, keys, vals, attn_mask=mask, scale=scale)
    return out.reshape(b, h, dh)
