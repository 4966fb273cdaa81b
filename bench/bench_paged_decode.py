"""Paged decode attention (one decode step's attention, one layer): the gather + SDPA reference vs the
Triton kernel that reads the cache in place.

Letters: B sequences, H query heads, Hkv KV heads, Dh head dim, Bs tokens per block, L_b context of
sequence b, elt bytes per element. Shapes: LLaVA-1.5-7B's decoder (32 heads of 128, MHA) and a
GQA 8:1 variant, bf16, block size 16 as the runtime's default; batch 1 at 1024 tokens of context
and batch 32 with contexts drawn from 16..1024 (the decode benchmark's mix).

Bytes per call (ideal traffic, the same formula for both): Σ_b L_b · 2 · Hkv · Dh · elt (every
cached K and V row read once) + 2 · B · H · Dh · elt (q read, output written). The yardstick is
the device's measured copy bandwidth (``common.copy_bandwidth_gbps``). The reference's real
traffic is about three times the context bytes (gathered copy written, then read again).
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
from common import bench_device, measure_memory_bound, pick

from llava_kernels import paged_decode_attention, paged_decode_attention_ref

SUITE = "paged_decode"
DTYPE = torch.bfloat16
BS = pick(16, 4)
COPY_MIB = pick(1024, 1)
HEADS = pick([(32, 32, 128), (64, 8, 128)], [(4, 2, 16)])   # (H, Hkv, Dh)
CONTEXTS = {"b1": pick([1024], [40]), "b32": pick([random.Random(32).randint(16, 1024) for _ in range(32)],
                                                  [random.Random(32).randint(1, 40) for _ in range(3)])}


def make_inputs(lens: list[int], h: int, hkv: int, dh: int):
    """A cache holding exactly these contexts in shuffled blocks (plus the reserved block 0)."""
    dev = bench_device()
    nb = max(-(-n // BS) for n in lens)
    total = len(lens) * nb + 1
    table = (torch.randperm(total - 1, device=dev) + 1)[:len(lens) * nb].view(len(lens), nb).to(torch.int32)
    k_cache = torch.randn(total, BS, hkv, dh, device=dev, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(len(lens), h, dh, device=dev, dtype=DTYPE)
    return q, k_cache, v_cache, table, torch.tensor(lens, device=dev)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", HEADS, ids=lambda x: f"H{x[0]}-Hkv{x[1]}")
@pytest.mark.parametrize("batch", sorted(CONTEXTS))
def test_paged_decode(benchmark, batch, heads):
    h, hkv, dh = heads
    lens = CONTEXTS[batch]
    args = make_inputs(lens, h, hkv, dh)
    fns = {"torch": functools.partial(paged_decode_attention_ref, *args),
           "triton": functools.partial(paged_decode_attention, *args, backend="triton")}
    expect = fns["torch"]().float()
    got = fns["triton"]().float()  # validate before timing (bf16 outputs of two fp32-accumulating paths)
    assert torch.allclose(got, expect, rtol=2e-2, atol=2e-2), (got - expect).abs().max()
    elt = torch.empty(0, dtype=DTYPE).element_size()
    work = sum(lens) * 2 * hkv * dh * elt + 2 * len(lens) * h * dh * elt
    formula = "sum(L)*2*Hkv*Dh*elt + 2*B*H*Dh*elt"
    measure_memory_bound(benchmark, SUITE, f"{batch} H={h} Hkv={hkv} Dh={dh} Bs={BS} ctx={sum(lens)}", fns, work,
                         formula, dict(B=len(lens), context_tokens=sum(lens), dtype=str(DTYPE)), COPY_MIB)
