"""Paged KV cache: the block allocator and the prefix index (the attention contexts that read and
write it are in ``engine.kv_attention``).

Letters: L decoder layers, NB cache blocks, Bs tokens per block, Hkv key/value heads, Dh head
dim, H query heads, T packed prefill tokens, B decoding sequences, nb blocks per sequence in a
decode step.

Layout: one ``k`` and one ``v`` tensor ``[L, NB, Bs, Hkv, Dh]`` (the paged layout of
``flash_attn_with_kvcache``). A sequence owns a list of blocks (its block table); token ``p`` of
a sequence lives at slot ``table[p // Bs] * Bs + p % Bs``. Block 0 is never handed out: padded
rows of a CUDA-graph batch write to it and attend to it, so a graph never needs a branch.

Prefix reuse: a full block's contents are named by a chained digest of everything up to its
end (``block_keys``: the token ids and the pixels of the images whose rows they hold). Blocks
are reference-counted; a full block, once written, is registered under its key, and a later
prompt that starts with the same tokens and images shares it instead of recomputing it (the
same system prompt, the earlier turns of a chat). Registered blocks that no sequence uses stay
in the cache as "idle" and are handed out again, least recently used first, only when the
free list is empty, so reuse never costs capacity.
"""
from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from typing import NamedTuple

import torch

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
        self._refs = [0] * num_blocks                     # sequences using each block
        self._block_of: dict[bytes, int] = {}             # prefix key -> registered block
        self._key_of: dict[int, bytes] = {}               # registered block -> its key
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, unused; least recently used first
        self._gather: torch.Tensor | None = None           # (2, n, Bs, Hkv, Dh) CPU decode gather buffers

    def gather_workspace(self, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Two [n_blocks, Bs, Hkv, Dh] buffers the decode attention's reference gathers K and V into, kept
        from step to step (grown, never shrunk); None off the CPU.

        Why on the CPU: a batch-32 step gathers ~50 MB of K and of V per layer, above glibc's largest mmap
        threshold (32 MB), so every fresh gather was a new mapping whose pages the kernel faults in and zeroes:
        batch-32 decode ran at 57-80 tok/s, at 125-138 tok/s with mmap disabled by MALLOC_MMAP_MAX_=0
        (CPU bench model, 2026-12-05). On CUDA the caching allocator already reuses memory, and a buffer
        that could be reallocated must not be baked into a captured graph."""
        if self.k.device.type != "cpu":
            return None
        if self._gather is None or self._gather.shape[1] < n_blocks:
            grow = max(n_blocks, 2 * (0 if self._gather is None else self._gather.shape[1]))
            self._gather = torch.empty((2, grow, *self.k.shape[2:]), dtype=self.k.dtype, device=self.k.device)
        return self._gather[0, :n_blocks], self._gather[1, :n_blocks]

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
        """Blocks ``allocate`` can hand out: never used, or idle prefix blocks it may evict."""
        return len(self._free) + len(self._idle)

    @property
    def cached_blocks(self) -> int:
        """Registered prefix blocks (in use or idle)."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, evicting idle prefix blocks (least recently used first) only when no
        never-used block is left; ValueError if fewer are free (callers check ``free_blocks`` first)."""
        if n > self.free_blocks:
            raise ValueError(f"KV cache has {self.free_blocks} free blocks, {n} requested")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one sequence's hold on ``blocks``. A registered block nobody uses becomes idle (a
        sequence's last blocks first in the eviction order: they are the least likely to be shared)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if b in self._key_of:
                self._idle[b] = None
            else:
                self._free.append(b)

    # ---- prefix reuse -------------------------------------------------------------------------------

    def lookup(self, keys: list[bytes], pending: dict[bytes, int] | None = None) -> list[int]:
        """Blocks holding the longest run of ``keys`` from the first (no hold taken): registered ones,
        or ``pending`` ones (key -> block that the coming prefill writes before any attention reads
        it: an earlier request of the same packed batch)."""
        out = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None and pending:
                b = pending.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def idle_among(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are idle (sharing them takes them out of ``free_blocks``)."""
        return sum(b in self._idle for b in blocks)

    def share(self, blocks: list[int]) -> None:
        """Take a hold on ``blocks`` (from ``lookup``: registered, or pending in this prefill) for one
        more sequence; an idle one leaves the idle list."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1

    def register(self, block: int, key: bytes) -> None:
        """Name a full, written block by its prefix key; a key or block already registered is kept."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key], self._key_of[block] = block, key

    def forget_prefixes(self) -> None:
        """Unregister every block (the weights changed): idle ones return to the free list."""
        self._free.extend(reversed(sorted(self._idle)))
        self._idle.clear()
        self._block_of.clear()
        self._key_of.clear()

    def slot(self, table: list[int], pos: int) -> int:
        """Cache slot of token position ``pos`` of a sequence with block table ``table``."""
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end) of a sequence with block table ``table``."""
        return [self.slot(table, p) for p in range(start, end)]


class ImageSpan(NamedTuple):
    """One image of a prompt: its placeholder rows [start, end), a digest of its pixels (and size), its
    tiles [first_tile, end_tile) in the prompt's pixel_values, and its original (height, width) (None
    when the caller gave no sizes)."""
    start: int
    end: int
    digest: bytes
    first_tile: int = 0
    end_tile: int = 1
    size: tuple[int, int] | None = None


def image_digest(pixels: torch.Tensor, size: tuple[int, int] | None = None) -> bytes:
    """A content digest of one image: its pixels (one tile [3, H, W] or its tiles [K, 3, H, W]; dtype
    and shape included) and its original size (two AnyRes images can share tiles, not rows)."""
    raw = pixels.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{pixels.dtype}{tuple(pixels.shape)}{size}".encode() + raw).digest()


def block_keys(tokens: list[int], block_size: int, images: list[ImageSpan], start: int, end: int,
               parent: bytes = b"") -> list[bytes]:
    """Prefix keys of blocks [start, end) of a sequence (tokens covers them; ``parent`` is block
    start-1's key): each key digests the previous one, the block's token ids and the pixels of
    every image with rows in the block, so equal keys mean equal K/V for the whole prefix."""
    keys = []
    for i in range(start, end):
        lo, hi = i * block_size, (i + 1) * block_size
        h = hashlib.sha256(parent)
        h.update(array("q", tokens[lo:hi]).tobytes())
        for im in images:
            if im.start < hi and im.end > lo:
                h.update(im.digest)
        parent = h.digest()
        keys.append(parent)
    return keys
