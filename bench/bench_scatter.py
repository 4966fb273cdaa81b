"""Image-token scatter: torch reference vs Triton (vs CUDA when built), forward and backward.

Letters: T packed tokens, D model width, V vocab, M image rows, elt bytes. Two families of cases:
LLaVA-1.5 (k images of 576 rows) and LLaVA-1.6 AnyRes (rows vary per image, 2,328..2,928 at the 336-px
tower: mixes of sizes packed until T, up to 32k, is full; bench/common.py ``anyres_rows``).
The op is a copy, so the yardstick is the device's own copy bandwidth: a 1 GiB device-to-device
``Tensor.copy_`` timed the same way (``common.copy_bandwidth_gbps``, bytes read + written).
Target: forward >= 80% of it.

Bytes per call (ideal traffic, the same formula for every implementation):
  forward: T·D·elt (write) + T·D·elt (read of the copied rows) + T·8 (ids) + M·8 (positions)
           + 2·T·4 (row map, written then read)
  backward, stage 1 (image rows only): 2·M·D·elt + M·8
  backward, stage 2 (+ embedding table): stage 1 + V·D·elt (every table row written once)
           + (T−M)·D·elt (text-row grads read) + T·24 (keys, sort, permutation) + V·16 (id bounds)
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from common import ANYRES_SIZES, anyres_rows, bench_device, measure_memory_bound, pick

from llava_kernels import dispatch
from llava_kernels.scatter import scatter_image_tokens, scatter_image_tokens_ref

SUITE = "scatter"
V, D, ROWS_PER_IMAGE = pick((32064, 4096, 576), (100, 24, 5))
DTYPE = torch.bfloat16
COPY_MIB = pick(1024, 1)        # the yardstick copy's size
TEXT_ROWS = pick(64, 4)          # text rows of each AnyRes sequence (BOS first)


def anyres_mix(T: int) -> tuple[int, ...]:
    """Rows of the AnyRes images (sizes cycled) that fit in T tokens with TEXT_ROWS of text each."""
    rows: list[int] = []
    for size in itertools.cycle(ANYRES_SIZES):
        r = anyres_rows(*size)
        if sum(rows) + r + (len(rows) + 1) * TEXT_ROWS > T:
            return tuple(rows)
        rows.append(r)


# (T, rows of each image, case tag). LLaVA-1.5: at most T // (S + 1) images, so each sequence has room for
# its BOS before the image (real shapes: 7, 16).
CASES = ([(T, (ROWS_PER_IMAGE,) * min(k, T // (ROWS_PER_IMAGE + 1)), "") for T in pick((4096, 16384), (48,))
          for k in (1, 4, 16)]
         + [(T, anyres_mix(T), " anyres") for T in pick((4096, 16384, 32768), (96,))])
CASE_IDS = [f"T{T}-{len(rows)}img{tag.replace(' ', '-')}" for T, rows, tag in CASES]


def make_inputs(T: int, rows: tuple[int, ...]):
    """Packed batch of one sequence per image: BOS, the image's rows, then text; 30% common ids."""
    k = len(rows)
    gap = (T - sum(rows)) // k         # text rows per sequence
    dev = bench_device()
    starts = [1 + j * gap + sum(rows[:j]) for j in range(k)]
    pos = torch.cat([torch.arange(a, a + r) for a, r in zip(starts, rows, strict=True)]).to(dev)
    ids = torch.randint(0, V, (T,), device=dev)
    hot = torch.rand(T, device=dev) < 0.3
    ids[hot] = torch.randint(0, 64, (T,), device=dev)[hot]
    ids[pos] = V  # the image token id, outside the table: must never be read
    w = torch.randn(V, D, device=dev, dtype=DTYPE)
    img = torch.randn(pos.numel(), D, device=dev, dtype=DTYPE)
    return ids, w, img, pos


def implementations():
    impls = {"torch": scatter_image_tokens_ref,
             "triton": functools.partial(scatter_image_tokens, backend="triton")}
    if dispatch.cuda_ops_available("scatter"):
        impls["cuda"] = functools.partial(scatter_image_tokens, backend="cuda")
    return impls


@pytest.mark.gpu
@pytest.mark.parametrize("T, rows, tag", CASES, ids=CASE_IDS)
def test_scatter_forward(benchmark, T, rows, tag):
    ids, w, img, pos = make_inputs(T, rows)
    M, elt = pos.numel(), w.element_size()
    impls = implementations()
    expect = scatter_image_tokens_ref(ids, w, img, pos)
    fns = {}
    for name, op in impls.items():  # validate before timing
        assert torch.equal(op(ids, w, img, pos), expect), name
        fns[name] = functools.partial(op, ids, w, img, pos)
    work = 2 * T * D * elt + T * 8 + M * 8 + 2 * T * 4
    measure_memory_bound(benchmark, SUITE, f"fwd T={T} D={D} M={M}{tag}", fns, work,
                         "2*T*D*elt + 8*T + 8*M + 2*4*T",
                         {"T": T, "D": D, "M": M, "V": V, "dtype": str(DTYPE), "image_rows": list(rows)}, COPY_MIB)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("T, rows, tag", CASES, ids=CASE_IDS)
def test_scatter_backward(benchmark, T, rows, tag, stage):
    ids, w, img, pos = make_inputs(T, rows)
    M, elt = pos.numel(), w.element_size()
    w.requires_grad_(stage == 2)
    img.requires_grad_(True)
    inputs = (w, img) if stage == 2 else (img,)
    g = torch.randn(T, D, device=bench_device(), dtype=DTYPE)
    fns, expect = {}, None
    for name, op in implementations().items():
        out = op(ids, w, img, pos)
        got = torch.autograd.grad(out, inputs, g, retain_graph=True)
        if expect is None:
            expect = got
        else:  # image grads are a gather: exact; embedding grads: a sum, order may differ from torch
            assert torch.equal(got[-1], expect[-1]), name
            if stage == 2:
                assert torch.allclose(got[0].float(), expect[0].float(), rtol=2e-2, atol=2e-2), name
        fns[name] = functools.partial(torch.autograd.grad, out, inputs, g, retain_graph=True)
    work = 2 * M * D * elt + M * 8
    formula = "2*M*D*elt + 8*M"
    extra = {"T": T, "D": D, "M": M, "V": V, "dtype": str(DTYPE), "stage": stage, "image_rows": list(rows)}
    if stage == 2:
        text = torch.ones(T, dtype=torch.bool, device=bench_device())
        text[pos] = False
        U = int(ids[text].unique().numel())
        work += V * D * elt + (T - M) * D * elt + 24 * T + 16 * V
        formula += " + V*D*elt + (T-M)*D*elt + 24*T + 16*V"
        extra["U"] = U
    measure_memory_bound(benchmark, SUITE, f"bwd{stage} T={T} D={D} M={M}{tag}", fns, work, formula, extra, COPY_MIB)
