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

Timing: each implementation is captured in a CUDA graph and the replay is timed, as the runtime replays
its decode steps. Timed eagerly (the H200 run of 2026-12-04) both took 0.14-0.25 ms whatever the bytes
(2-400 MB of K/V, far below bandwidth): that was Python and kernel-launch time, not attention; the eager
times are kept in each row's ``extra`` (eager_ms_<impl>). A replay allocates nothing (the graph's pool
is reserved at capture), so the rows' peak memory is that of a replay: 0.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
from common import SMOKE, bench_device, cuda_time_ms, measure_memory_bound, pick

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


def graphed(fn):
    """``fn`` captured in a CUDA graph: its replay (smoke mode: ``fn`` itself). Warmed up on a side
    stream first, so Triton compiles and the allocator settle outside the capture."""
    if SMOKE:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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
    extra = dict(B=len(lens), context_tokens=sum(lens), dtype=str(DTYPE), timing="CUDA graph replay",
                 **{f"eager_ms_{name}": cuda_time_ms(fn, warmup=10, rep=50) for name, fn in fns.items()})
    measure_memory_bound(benchmark, SUITE, f"{batch} H={h} Hkv={hkv} Dh={dh} Bs={BS} ctx={sum(lens)}",
                         {name: graphed(fn) for name, fn in fns.items()}, work, formula, extra, COPY_MIB)
