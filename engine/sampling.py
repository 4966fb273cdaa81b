"""Sampling for the generation runtime: per-request settings and one on-device draw for all rows.

Letters: B rows (sequences sampling in a step), V vocab.

Temperature, top-k, top-p and repetition penalty follow HF's order and semantics. The random choice
is the Gumbel-max trick with noise hashed from (seed, position, token id), so a seeded sequence
samples the same tokens whatever batch it is in, and nothing depends on a global generator state
(which a CUDA graph could not advance). Temperature 0 is greedy (argmax), deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request decoding settings (validated: ValueError naming the field)."""
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # 1 = off
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.0   # 1 = off; HF semantics (divide positive logits, multiply negative)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None           # None: drawn from torch's global generator at submit

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of int64 values in [0, 2^32) (constants < 2^31: products never overflow int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] as a pure function of (seed [B], counter [B], token id)."""
    base = _mix32(_mix32(seeds & _M32) ^ (counters & _M32))                       # (B,)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32(base[:, None] ^ ids[None, :]) ^ 0x5BD1E995)                  # (B, V)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))                     # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor,
                  penalty: torch.Tensor | None = None, seen: torch.Tensor | None = None,
                  greedy_only: bool = False, filtered: bool = True) -> torch.Tensor:
    """Next tokens [B] (int64) from fp32 logits [B, V], all rows at once, on the logits' device.

    Per row: repetition penalty on the tokens marked in ``seen`` [B, V] (HF: positive logits
    divided, negative multiplied) → greedy argmax where temperature is 0; else logits /
    temperature → top-k (0 = off) → top-p on what top-k kept (1 = off; the most likely token is
    always kept) → Gumbel-max draw seeded by (seed, counter). ``greedy_only`` / ``filtered`` are
    host-known shortcuts (no row samples / no row filters) that skip work, never change results.
    """
    if penalty is not None:
        pen = penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    greedy = logits.argmax(-1)
    if greedy_only:
        return greedy
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if filtered:
        sorted_l, order = scaled.sort(-1, descending=True)                          # (B, V)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)
        k = top_k[:, None]
        sorted_l = sorted_l.masked_fill((k > 0) & (rank[None, :] >= k), float("-inf"))
        probs = sorted_l.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        drop[:, 0] = False
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_l)
    sampled = (scaled + gumbel_noise(seeds, counters, scaled.shape[-1])).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)
