"""Image-token scatter: Triton (interpreter on CPU) and torch paths vs the reference.

Letters: T packed tokens, D model width, V vocab, M image rows.
A copy must be exact in every dtype; the embedding grad is a sum, compared to an fp64 truth by
the tolerance rule, and must be bit-identical run to run. Image positions hold an id >= V, so a
kernel that reads it fails (out-of-range read or a NaN row).
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, poison_

from llava_kernels.scatter import (
    ScatterConfig,
    embed_grad,
    gather_rows,
    scatter_bwd,
    scatter_fwd,
    scatter_image_tokens,
    scatter_image_tokens_ref,
)

V_SMALL, D_SMALL = 61, 40  # neither a multiple of a power-of-2 block
# Small cases run on the GPU when there is one, else on the CPU (Triton interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (T, list of (start, length) image spans). Positions are passed shuffled: order is free.
LAYOUTS = {
    "T1_text": (1, []),
    "T1_image": (1, [(0, 1)]),
    "T97_first_last": (97, [(0, 9), (90, 7)]),
    "T577_bos_image": (577, [(1, 576)]),
    "T1025_three": (1025, [(0, 100), (400, 77), (1000, 25)]),
    "T1025_text": (1025, []),
}


def make_case(T, spans, dtype, *, V=V_SMALL, D=D_SMALL, device=DEVICE, image_id=None, common_ids=0):
    """Random ids / table / image rows; ids at image positions = ``image_id`` (default V + 7)."""
    pos = torch.cat([torch.arange(s, s + n) for s, n in spans]) if spans else torch.zeros(0, dtype=torch.long)
    pos = pos[torch.randperm(pos.numel())].to(device)
    ids = torch.randint(0, V, (T,), device=device)
    if common_ids:  # realistic repeats: long segments in the embedding backward
        hot = torch.rand(T, device=device) < 0.3
        ids[hot] = torch.randint(0, common_ids, (int(hot.sum()),), device=device)
    ids[pos] = V + 7 if image_id is None else image_id
    w = torch.randn(V, D, device=device).to(dtype)
    img = torch.randn(pos.numel(), D, device=device).to(dtype)
    return ids, w, img, pos


def grads(out, w, img, g):
    return torch.autograd.grad(out, (w, img), g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_backward_match_reference(layout, dtype):
    T, spans = LAYOUTS[layout]
    ids, w, img, pos = make_case(T, spans, dtype)
    w.requires_grad_(True)
    img.requires_grad_(True)
    ref = scatter_image_tokens_ref(ids, w, img, pos)
    for backend in ("triton", "torch"):
        out = scatter_image_tokens(ids, w, img, pos, backend=backend)
        assert out.dtype == dtype and out.shape == (T, D_SMALL)
        assert torch.equal(out, ref), backend

    g = torch.randn(T, D_SMALL, device=DEVICE).to(dtype)
    out = scatter_image_tokens(ids, w, img, pos, backend="triton")
    gw, gi = grads(out, w, img, g)
    assert torch.equal(gi, g[pos])  # a gather: exact
    w64, img64 = w.detach().double().requires_grad_(True), img.detach().double().requires_grad_(True)
    gw_truth, _ = grads(scatter_image_tokens_ref(ids, w64, img64, pos), w64, img64, g.double())
    gw_ref, _ = grads(ref, w, img, g)
    if dtype == torch.float32:
        assert_close_rule(gw, gw_truth, fp32_tol=1e-6, what="grad embed fp32")
    else:
        assert_close_rule(gw, gw_truth, gw_ref, what="grad embed bf16")
    untouched = torch.ones(V_SMALL, dtype=torch.bool, device=DEVICE)
    untouched[ids[ids < V_SMALL]] = False
    assert (gw[untouched] == 0).all()
    # Bit-identical across runs.
    gw2, gi2 = grads(scatter_image_tokens(ids, w, img, pos, backend="triton"), w, img, g)
    assert torch.equal(gw, gw2) and torch.equal(gi, gi2)


def test_reference_against_loop():
    ids, w, img, pos = make_case(97, [(0, 9), (90, 7)], torch.float32)
    expect = torch.empty(97, D_SMALL, device=DEVICE)
    for t in range(97):
        expect[t] = w[ids[t]] if ids[t] < V_SMALL else float("nan")
    for j, t in enumerate(pos.tolist()):
        expect[t] = img[j]
    assert torch.equal(scatter_image_tokens_ref(ids, w, img, pos), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launchers_write_every_row_and_column_block(dtype):
    # block_d=16 with D=40: three column blocks, the last partial. Outputs start as NaN.
    cfg = ScatterConfig(block_d=16, num_warps=1, block_r=4)  # frequent ids span several row tiles
    ids, w, img, pos = make_case(97, [(0, 9), (90, 7)], dtype, common_ids=5)
    poisoned = poison_(torch.empty(97, D_SMALL, dtype=dtype, device=DEVICE))
    out, row_img = scatter_fwd(ids, w, img, pos, out=poisoned, config=cfg)
    assert torch.equal(out, scatter_image_tokens_ref(ids, w, img, pos))
    expect_map = torch.full((97,), -1, dtype=torch.int32, device=DEVICE)
    expect_map[pos] = torch.arange(pos.numel(), dtype=torch.int32, device=DEVICE)
    assert torch.equal(row_img, expect_map)

    g = torch.randn(97, D_SMALL, device=DEVICE).to(dtype)
    gi = gather_rows(g, pos, out=poison_(torch.empty_like(g[pos])), config=cfg)
    assert torch.equal(gi, g[pos])
    gw, gi2 = scatter_bwd(g, ids, pos, row_img, V_SMALL, need_embed=True, need_image=True, config=cfg)
    gw_again, _ = scatter_bwd(g, ids, pos, row_img, V_SMALL, need_embed=True, need_image=False, config=cfg)
    assert torch.equal(gi2, gi) and torch.equal(gw, gw_again)  # a fixed summation order
    # The kernel rounds its fp32 sums to bf16 to nearest-even (the interpreter alone would truncate,
    # doubling the error): within 1.5× the error of an fp32 sum rounded by torch; and a row that is
    # a single grad row is bit-exact, overflow, ties, inf and NaN included.
    # bf16 of these: inf (overflow), 1.0 and 1.015625 (ties to even)
    g[20, :3] = torch.tensor([3.4e38, 1.00390625, 1.01171875]).to(DEVICE, dtype)
    g[20, 3:5] = torch.tensor([float("inf"), float("nan")]).to(DEVICE, dtype)
    ids[20] = V_SMALL - 1  # an id of its own: the sum is the value itself
    ids[(ids == V_SMALL - 1) & (torch.arange(97, device=DEVICE) != 20) & (row_img < 0)] = 0
    gw = embed_grad(g, ids, row_img, V_SMALL, config=cfg,  # poisoned: every row must be written
                    out=poison_(torch.empty(V_SMALL, D_SMALL, dtype=dtype, device=DEVICE)))
    text = (row_img < 0).cpu()  # on the CPU: CUDA's index_add_ sums in no fixed order
    truth = torch.zeros(V_SMALL, D_SMALL).index_add_(0, ids.cpu()[text], g.cpu()[text].float()).to(dtype)
    gw = gw.cpu()
    assert torch.equal(gw[-1].isnan(), truth[-1].isnan()) and gw[-1].isnan().sum() == 1
    assert torch.equal(gw[-1].nan_to_num(), truth[-1].nan_to_num())
    rest = text & (ids.cpu() < V_SMALL - 1)
    truth64 = torch.zeros(V_SMALL, D_SMALL, dtype=torch.float64).index_add_(0, ids.cpu()[rest],
                                                                            g.cpu()[rest].double())[:-1]
    if dtype == torch.float32:
        assert_close_rule(gw[:-1], truth64, fp32_tol=1e-6, what="grad embed fp32")
    else:
        assert_close_rule(gw[:-1], truth64, truth[:-1], factor=1.5, floor=1e-6, what="grad embed bf16")


def test_grad_only_for_inputs_that_require_it():
    ids, w, img, pos = make_case(97, [(3, 20)], torch.float32, image_id=5)  # valid id at image rows
    img.requires_grad_(True)  # stage 1: table frozen
    out = scatter_image_tokens(ids, w, img, pos, backend="triton")
    # The frozen-table backward is torch's gather (fastest on the H200), after the kernel's forward.
    assert type(out.grad_fn).__name__ == "ScatterImageGradOnlyFunctionBackward"
    assert torch.equal(out.detach(), scatter_image_tokens_ref(ids, w, img, pos))
    g = torch.randn_like(out)
    (gi,) = torch.autograd.grad(out, (img,), g)
    assert torch.equal(gi, g[pos])
    w.requires_grad_(True)  # stage 2: the image rows' grads never reach the table row of id 5
    out = scatter_image_tokens(ids, w, img, pos, backend="triton")
    gw, _ = grads(out, w, img, g)
    text = torch.ones(97, dtype=torch.bool, device=DEVICE)
    text[pos] = False
    expect5 = g[text & (ids == 5)].double().sum(0)
    assert torch.allclose(gw[5].double(), expect5, rtol=1e-6, atol=1e-6)


def test_unchecked_bad_text_id_gives_nan_row_not_a_wild_read():
    ids, w, img, pos = make_case(97, [(0, 9)], torch.float32)
    ids[40] = 10**9
    out = scatter_image_tokens(ids, w, img, pos, backend="triton", check=False)
    assert torch.isnan(out[40]).all()
    keep = torch.ones(97, dtype=torch.bool, device=DEVICE)
    keep[40] = False
    ids_ok = ids.clone()
    ids_ok[40] = 0
    assert torch.equal(out[keep], scatter_image_tokens_ref(ids_ok, w, img, pos)[keep])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mutate, match", [
    (lambda c: c["pos"].__setitem__(1, -1), r"image_positions\[1\] = -1"),
    (lambda c: c["pos"].__setitem__(2, 97), r"image_positions\[2\] = 97"),
    (lambda c: c["pos"].__setitem__(3, int(c["pos"][1])), r"image_positions\[1\] and image_positions\[3\]"),
    (lambda c: c["ids"].__setitem__(50, V_SMALL), r"input_ids\[50\] = 61"),
    (lambda c: c["ids"].__setitem__(60, -2), r"input_ids\[60\] = -2"),
    (lambda c: c.__setitem__("img", c["img"][:, :-1]), r"image_rows must be \[M, 40\]"),
    (lambda c: c.__setitem__("img", c["img"].double()), r"image_rows dtype"),
    (lambda c: c.__setitem__("img", c["img"].to("meta")), r"one device"),
    (lambda c: c.__setitem__("pos", c["pos"][:-1]), r"image_positions has 8 entries"),
    (lambda c: c.__setitem__("pos", c["pos"].int()), r"image_positions must be 1-D int64"),
    (lambda c: c.__setitem__("ids", c["ids"][None]), r"input_ids must be 1-D int64"),
    (lambda c: c.__setitem__("w", c["w"].long()), r"embed_weight must be a 2-D floating"),
    (lambda c: c.update(ids=c["ids"][:5]), r"9 image rows do not fit in 5"),
])
def test_bad_inputs_raise_value_error(backend, mutate, match):
    ids, w, img, pos = make_case(97, [(10, 9)], torch.float32)
    case = {"ids": ids, "w": w, "img": img, "pos": pos}
    mutate(case)
    with pytest.raises(ValueError, match=match):
        scatter_image_tokens(case["ids"], case["w"], case["img"], case["pos"], backend=backend, check=True)


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 4, 14])
def test_gpu_llava_shapes(k):
    from llava_kernels import dispatch

    T, D, V = 8192, 4096, 32064
    spans = [(1 + i * 585, 576) for i in range(k)]  # one image per ~585-token sequence
    ids, w, img, pos = make_case(T, spans, torch.bfloat16, V=V, D=D, device="cuda", common_ids=20)
    w.requires_grad_(True)
    img.requires_grad_(True)
    g = torch.randn(T, D, device="cuda").to(torch.bfloat16)
    ref = scatter_image_tokens_ref(ids, w, img, pos)
    gw_ref, gi_ref = grads(ref, w, img, g)
    w64, img64 = w.detach().double().requires_grad_(True), img.detach().double().requires_grad_(True)
    gw_truth, _ = grads(scatter_image_tokens_ref(ids, w64, img64, pos), w64, img64, g.double())
    backends = ["triton"] + (["cuda"] if dispatch.cuda_ops_available("scatter") else [])
    for backend in backends:
        out = scatter_image_tokens(ids, w, img, pos, backend=backend)
        assert torch.equal(out, ref), backend
        gw, gi = grads(out, w, img, g)
        assert torch.equal(gi, gi_ref), backend
        assert_close_rule(gw, gw_truth, gw_ref, what=f"grad embed {backend}")
        gw2, _ = grads(scatter_image_tokens(ids, w, img, pos, backend=backend), w, img, g)
        assert torch.equal(gw, gw2), f"{backend}: embedding grad not bit-identical across runs"
    out = poison_(torch.empty(T, D, device="cuda", dtype=torch.bfloat16))
    assert torch.equal(scatter_fwd(ids, w.detach(), img.detach(), pos, out=out)[0], ref)
