"""Paged KV cache and the two attention contexts that read and write it (prefill, decode).

Letters: L decoder layers, NB cache blocks, Bs tokens per block, Hkv key/value heads, Dh head
dim, H query heads, T packed prefill tokens, B decoding sequences, nb blocks per sequence in a
decode step.

Layout: one ``k`` and one ``v`` tensor ``[L, NB, Bs, Hkv, Dh]`` (the paged layout of
``flash_attn_with_kvcache``). A sequence owns a list of blocks (its block table); token ``p`` of
a sequence lives at slot ``table[p // Bs] * Bs + p % Bs``. Block 0 is never handed out: padded
rows of a CUDA-graph batch write to it and attend to it, so a graph never needs a branch.

Both contexts implement ``engine.model.AttentionContext``: the decoder layer hands over q/k/v
with RoPE applied, the context writes k/v into the cache and returns the attention output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.attention import varlen_attention
from engine.config import TextConfig


class PagedKVCache:
    """Preallocated paged K/V storage plus a host-side free list of blocks.

    Not thread-safe: one runtime (one scheduler thread) owns a cache.
    """

    def __init__(self, cfg: TextConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (block 0 is reserved); got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros, not empty: masked slots are still multiplied by a zero attention weight, and a NaN bit
        # pattern left in uninitialised memory would turn 0 · NaN into a NaN output.
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, NB, Bs, Hkv, Dh)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, 0, -1))  # block 0 reserved; pop() hands out low ids first

    @staticmethod
    def bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V bytes of one block over all layers."""
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @classmethod
    def from_budget(cls, cfg: TextConfig, *, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    device: torch.device, max_blocks: int | None = None) -> PagedKVCache:
        """The largest cache that fits ``budget_bytes`` (capped at ``max_blocks`` + the reserved block)."""
        n = budget_bytes // cls.bytes_per_block(cfg, block_size, dtype)
        if max_blocks is not None:
            n = min(n, max_blocks + 1)
        if n < 2:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds fewer than 2 blocks of "
                             f"{cls.bytes_per_block(cfg, block_size, dtype)} bytes")
        return cls(cfg, num_blocks=int(n), block_size=block_size, dtype=dtype, device=device)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; ValueError if fewer are free (callers check ``free_blocks`` first)."""
        if n > len(self._free):
            raise ValueError(f"KV cache has {len(self._free)} free blocks, {n} requested")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def slot(self, table: list[int], pos: int) -> int:
        """Cache slot of token position ``pos`` of a sequence with block table ``table``."""
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end) of a sequence with block table ``table``."""
        return [self.slot(table, p) for p in range(start, end)]


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


class DecodeAttention:
    """One new token per sequence attending to its cached context.

    block_table int32/int64 [B, nb]; positions int64 [B] (the new token's position = tokens
    already cached); slot_mapping int64 [B]. Static shapes and no host reads, so a CUDA graph
    can capture it. Reads the context by gathering the sequence's blocks, then one SDPA call
    with a length mask (query heads grouped per key/value head, so GQA needs no K/V repeat).
    """

    def __init__(self, cache: PagedKVCache, block_table: torch.Tensor, positions: torch.Tensor,
                 slot_mapping: torch.Tensor):
        self.cache, self.block_table, self.slot_mapping = cache, block_table, slot_mapping
        ctx = block_table.shape[1] * cache.block_size
        # (B, 1, 1, ctx): True where the key is part of the sequence (positions ≤ the new token's).
        keys = torch.arange(ctx, device=positions.device)
        self.mask = (keys[None, :] <= positions[:, None])[:, None, None, :]

    def __call__(self, layer, q, k, v):  # q (B, H, Dh); k, v (B, Hkv, Dh)
        _write(self.cache, layer, self.slot_mapping, k, v)
        b, h, dh = q.shape
        hkv = k.shape[1]
        keys = _gather(self.cache.k[layer], self.block_table)    # (B, Hkv, ctx, Dh)
        vals = _gather(self.cache.v[layer], self.block_table)
        q4 = q.view(b, hkv, h // hkv, dh)                      # (B, Hkv, rep, Dh): rep queries per kv head
        out = F.scaled_dot_product_attention(q4, keys, vals, attn_mask=self.mask)
        return out.reshape(b, h, dh)


def _gather(cache_layer: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[NB, Bs, Hkv, Dh] cache of one layer + [B, nb] table → [B, Hkv, nb·Bs, Dh] context."""
    b, nb = block_table.shape
    _, bs, hkv, dh = cache_layer.shape
    blocks = cache_layer.index_select(0, block_table.reshape(-1))  # (B·nb, Bs, Hkv, Dh)
    return blocks.view(b, nb * bs, hkv, dh).transpose(1, 2)

