"""The attention contexts of the generation runtime: they write each step's K/V into the paged cache
(``engine.kv_cache``) and attend over it (prefill, prefill after a cached prefix or chunk, decode,
and a step mixing decode rows with prefill chunks).

Letters: T packed prefill tokens, B decoding sequences, H query heads, Hkv key/value heads, Dh head
dim, nb blocks per sequence in a decode step.

The contexts implement ``engine.model.AttentionContext``: the decoder layer hands over q/k/v
with RoPE applied, the context writes k/v into the cache and returns the attention output.
"""
from __future__ import annotations

import torch

import llava_kernels
from engine.attention import varlen_attention
from engine.kv_cache import PagedKVCache
from llava_kernels import _cpu, dispatch
from llava_kernels.paged_decode import key_mask

WHOLE_LAYER = True  # CPU decode: whole layers as one llava_kernels.decode_layer call where they can (False: tests, A/B)


def _write(cache: PagedKVCache, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor) -> None:
    hkv, dh = k.shape[1:]
    cache.k[layer].view(-1, hkv, dh).index_copy_(0, slot_mapping, k)  # (NB·Bs, Hkv, Dh)
    cache.v[layer].view(-1, hkv, dh).index_copy_(0, slot_mapping, v)


class PrefillAttention:
    """Packed prefill of fresh sequences: write k/v of all T tokens, then causal varlen attention.

    slot_mapping int64 [T]; cu_seqlens int32 [B+1]. The attention runs on the fresh q/k/v (no
    cache read), so it is exactly the training path's attention.
    """

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, backend: str | None = None):
        self.cache, self.slot_mapping = cache, slot_mapping
        self.cu_seqlens, self.max_seqlen, self.backend = cu_seqlens, max_seqlen, backend

    def __call__(self, layer, q, k, v):
        _write(self.cache, layer, self.slot_mapping, k, v)
        return varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, causal=True, backend=self.backend)


class PrefixPrefillAttention:
    """Packed prefill of sequences whose first tokens are already cached (a shared prefix).

    q/k/v arrive for the uncached suffixes only (T rows, cu_seqlens int32 [B+1]); their k/v are
    written at ``slot_mapping`` [T], then each sequence's whole context is read back from the
    cache through ``key_slots`` int64 [Tk] (cu_seqlens_k int32 [B+1]: every position of each
    sequence, prefix then suffix) and attended with bottom-right causal masking.
    """

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 key_slots: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int, backend: str | None = None):
        self.cache, self.slot_mapping, self.key_slots = cache, slot_mapping, key_slots
        self.cu_seqlens, self.max_seqlen, self.backend = cu_seqlens, max_seqlen, backend
        self.cu_seqlens_k, self.max_seqlen_k = cu_seqlens_k, max_seqlen_k

    def __call__(self, layer, q, k, v):
        _write(self.cache, layer, self.slot_mapping, k, v)
        hkv, dh = k.shape[1:]
        keys = self.cache.k[layer].view(-1, hkv, dh).index_select(0, self.key_slots)  # (Tk, Hkv, Dh)
        vals = self.cache.v[layer].view(-1, hkv, dh).index_select(0, self.key_slots)
        return varlen_attention(q, keys, vals, self.cu_seqlens, self.max_seqlen, causal=True, backend=self.backend,
                                cu_seqlens_k=self.cu_seqlens_k, max_seqlen_k=self.max_seqlen_k)


class DecodeAttention:
    """One new token per sequence attending to its cached context.

    block_table int32/int64 [B, nb]; positions int64 [B] (the new token's position = tokens
    already cached); slot_mapping int64 [B]. Static shapes and no host reads, so a CUDA graph
    can capture it. The attention is ``llava_kernels.paged_decode_attention`` (the reference gathers
    the blocks for one SDPA call; the Triton kernel reads them in place), ``backend`` as there.
    """

    def __init__(self, cache: PagedKVCache, block_table: torch.Tensor, positions: torch.Tensor,
                 slot_mapping: torch.Tensor, backend: str | None = None):
        self.cache, self.block_table, self.slot_mapping = cache, block_table, slot_mapping
        self.backend = dispatch.resolve("paged_decode", positions.device, backend)
        if self.backend == "cpu" and cache.k[0].dtype != torch.float32:
            if backend == "cpu":
                raise ValueError(f"decode attention 'cpu' is fp32 only; the KV cache is {cache.k[0].dtype}")
            self.backend = "torch"                      # automatic: the reference for a bf16 cache
        self.scale = cache.k[0].shape[-1] ** -0.5
        self.seq_lens = positions + 1  # the new token attends to itself
        # The reference's key mask, once per step, not per layer: on a GPU these are kernels in every
        # replay of the graph (the Triton kernel masks by seq_lens itself).
        ctx = block_table.shape[1] * cache.block_size
        self.mask = key_mask(self.seq_lens, ctx) if self.backend == "torch" else None  # (B, 1, 1, ctx)
        # The reference's gathered K/V, reused by every layer (and step) on the CPU; None elsewhere.
        self.workspace = cache.gather_workspace(block_table.numel()) if self.backend == "torch" else None
        # On our CPU kernel, engine.model.Decoder runs each plain layer as one C++ call (whole_layer)
        self.whole_layer = self._whole_layer if self.backend == "cpu" and WHOLE_LAYER else None

    def __call__(self, layer, q, k, v):  # q (B, H, Dh); k, v (B, Hkv, Dh)
        _write(self.cache, layer, self.slot_mapping, k, v)
        if self.backend == "cpu":  # our CPU kernel, without the public op's per-call checks (shapes are ours)
            return _cpu.ops().paged_decode(q.contiguous(), self.cache.k[layer], self.cache.v[layer], self.block_table,
                                           self.seq_lens, self.scale)
        return llava_kernels.paged_decode_attention(q, self.cache.k[layer], self.cache.v[layer], self.block_table,
                                                    self.seq_lens, length_mask=self.mask, backend=self.backend,
                                                    workspace=self.workspace)

    def _whole_layer(self, layer: int, x: torch.Tensor, weights: tuple, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer`` on x [B, D] through ``llava_kernels.decode_layer``, its K/V written and
        attended here as ``__call__`` would (``weights``: ``engine.model.Block.whole_layer_weights``)."""
        attn_norm, mlp_norm, w_qkv, w_o, w_gate_up, w_down, heads, eps, scales = weights
        return _cpu.ops().decode_layer(x, attn_norm, mlp_norm, w_qkv, w_o, w_gate_up, w_down, cos, sin,
                                       self.cache.k[layer], self.cache.v[layer], self.block_table, self.seq_lens,
                                       self.slot_mapping, heads, eps, self.scale, *(scales or ()))


class MixedAttention:
    """A step of ``n_decode`` decode rows (first) and prefill rows (after them) in one packed batch: each
    part goes to its own context (``decode``: a ``DecodeAttention``; ``prefill``: a prefill context over
    the prefill rows' own cu_seqlens), so the projections and MLPs run as one GEMM over all rows.

    The prefill part runs first: a readmitted (preempted) sequence can be a decode row whose shared
    prefix blocks another sequence's chunk writes in this very step; nothing a prefill row reads is
    written by a decode row (those write only their own, partly filled, never shared blocks)."""

    def __init__(self, decode: DecodeAttention | None, prefill, n_decode: int):
        self.decode, self.prefill, self.n_decode = decode, prefill, n_decode

    def __call__(self, layer, q, k, v):  # q (T, H, Dh); k, v (T, Hkv, Dh)
        nd = self.n_decode
        if nd == 0:
            return self.prefill(layer, q, k, v)
        tail = self.prefill(layer, q[nd:], k[nd:], v[nd:])
        return torch.cat([self.decode(layer, q[:nd], k[:nd], v[:nd]), tail])
