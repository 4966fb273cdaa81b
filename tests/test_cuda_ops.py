"""The csrc/ CUDA ops (llava_kernels/_cuda.py) against the pure-torch references and a float64 truth.

Letters: N projector rows, Dv vision width, Dh projector hidden width, Dt text width; T packed tokens,
D model width, V vocab, M image rows, B sequences.

GPU tests need the built extension (llava_kernels/_C.so, see csrc/README.md) and skip, saying why, without it.
The CPU tests check that a missing or broken build is reported as "not available", never an exception.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, rel_err

from llava_kernels import _cuda
from llava_kernels.masked_loss import masked_lm_loss_ref
from llava_kernels.projector import projector_ref
from llava_kernels.scatter import scatter_image_tokens_ref

OPS = ("projector", "scatter", "masked_loss")


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if all(_cuda.available(op) for op in OPS):
        return None
    return f"the csrc CUDA extension is not loaded: {_cuda.load_error()}"


_REASON = _skip_reason()
needs_ext = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _poison_allocator(*shapes: tuple[int, torch.dtype]) -> None:
    """NaN-fill freed cache blocks of these (numel, dtype) sizes so an op's at::empty output likely lands
    on NaNs: an unwritten row then fails the comparison instead of passing on stale values."""
    bufs = [torch.full((n,), float("nan"), dtype=dt, device="cuda") for n, dt in shapes]
    del bufs


def _fwd_bwd(fn, tensors, needs, upstream):
    """(output, grads) of fn(*tensors) for an upstream gradient; grads None where not needed."""
    pairs = list(zip(tensors, needs, strict=True))
    leaves = [None if t is None else t.detach().clone().requires_grad_(n) for t, n in pairs]
    out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return out.detach(), [leaf.grad if leaf is not None and n else None
                          for leaf, n in zip(leaves, needs, strict=True)]


def _check(got, truth, ref, dtype, what, floor=1e-6):
    if dtype == torch.float32:
        assert_close_rule(got, truth, what=what)  # the rule's 1e-5: fp32 GEMMs go to cuBLAS, no TF32
    else:
        assert_close_rule(got, truth, ref, floor=floor, what=what)


# ---- CPU: loading ---------------------------------------------------------------------------------------

def test_missing_library_is_not_available_and_does_not_raise(tmp_path):
    loader = _cuda._Loader(tmp_path)
    for op in (*OPS, "no_such_op"):
        assert loader.available(op) is False
    assert loader.load() is False
    assert loader.error and ("no CUDA" in loader.error or str(tmp_path) in loader.error)


def test_broken_library_is_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "_C.so").write_bytes(b"not an ELF file")
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # get past the CPU-wheel early exit
    loader = _cuda._Loader(tmp_path)
    assert loader.load() is False
    assert "loading the CUDA extension failed" in loader.error


def test_wrappers_raise_with_the_reason_when_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(_cuda, "_LOADER", _cuda._Loader(tmp_path))
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="not available"):
        _cuda.projector(x, torch.randn(4, 3), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_available_is_false_on_a_cpu_machine():
    assert [_cuda.available(op) for op in OPS] == [False, False, False]


def test_fake_kernels_give_the_contract_shapes():
    m = dict(device="meta")
    x, w1, w2 = torch.empty(7, 5, **m), torch.empty(9, 5, **m), torch.empty(3, 9, **m)
    out, h = _cuda._projector_fake(x, w1, None, w2, None)
    assert out.shape == (7, 3) and h.shape == (7, 9)
    out, h = _cuda._projector_fake(x, w1, None, None, None)
    assert out.shape == (7, 9) and h.numel() == 0
    grads = _cuda._projector_backward_fake(out, x, w1, w2, h, [True, False, True, True, False])
    assert [tuple(g.shape) for g in grads] == [(7, 5), (0,), (9,), (3, 9), (0,)]
    ids, pos = torch.empty(11, dtype=torch.long, **m), torch.empty(4, dtype=torch.long, **m)
    g = torch.empty(11, 6, **m)
    d_embed, d_image = _cuda._scatter_backward_fake(g, ids, pos, 50, [True, True])
    assert d_embed.shape == (50, 6) and d_image.shape == (4, 6)
    hid, head, tg = torch.empty(11, 6, **m), torch.empty(50, 6, **m), torch.empty(11, dtype=torch.long, **m)
    cu = torch.empty(4, dtype=torch.int32, **m)
    res = _cuda._masked_lm_loss_fake(hid, head, tg, cu, None, [False, True])
    assert [tuple(r.shape) for r in res] == [(), (3,), (3,), (0,), (50, 6)]
    assert [r.dtype for r in res[:3]] == [torch.float32, torch.float32, torch.int64]


def test_masked_loss_backward_scales_saved_grads_in_place_in_fp32():
    """The CUDA op's backward multiplies its saved grads in place (no second [V, D]: the H200 run's 1130 MB
    peak), by the upstream read in fp32 (not first rounded to bf16), skips an exact 1, and stays traceable."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    grad = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).bfloat16()
    want = (grad.float() * 0.7).bfloat16()
    assert (grad * torch.tensor(0.7).bfloat16()).ne(want).any(), "the case must tell the two roundings apart"
    out = _cuda._scale_grad_(grad, torch.tensor(0.7))
    assert out is grad and torch.equal(grad, want)
    before = grad.clone()
    assert _cuda._scale_grad_(grad, torch.tensor(1.0)) is grad and torch.equal(grad, before)
    with FakeTensorMode():
        fake = _cuda._scale_grad_(torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(()))
    assert fake.shape == (4, 8) and fake.dtype == torch.bfloat16


def test_masked_loss_autograd_hands_back_the_forward_grads_without_copies():
    """_cuda's autograd functions on a CPU stand-in for llava::masked_lm_loss (same schema, computed by
    llava_kernels.masked_loss on the interpreter): the backward gets no materialized zero grads for the
    [T, D] and [V, D] outputs, returns the op's own grad tensors scaled in place, and autograd moves them
    into .grad without a copy (the H200 bench: 848 MB, three grad-sized sets, vs 312 for Triton)."""
    from llava_kernels.masked_loss import masked_loss_fwd

    lib = torch.library.Library("llava_cpu_stand_in", "FRAGMENT")
    lib.define("masked_lm_loss(Tensor hidden, Tensor head_weight, Tensor targets, Tensor? cu_seqlens, "
               "Tensor? num_targets, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
    made, seen = {}, {}

    def impl(hidden, head_weight, targets, cu_seqlens, num_targets, needs):
        out = masked_loss_fwd(hidden, head_weight, targets, cu_seqlens=cu_seqlens, need_grad_hidden=needs[0],
                              need_grad_weight=needs[1])
        made.update(dh=out.grad_hidden.data_ptr(), dw=out.grad_weight.data_ptr())
        return out.loss, out.seq_loss_sum, out.seq_count, out.grad_hidden, out.grad_weight

    def backward(ctx, grad_loss, *unused):
        seen["unused"] = unused
        return _cuda._masked_lm_loss_backward(ctx, grad_loss, *unused)

    lib.impl("masked_lm_loss", impl, "CPU")
    torch.library.register_autograd("llava_cpu_stand_in::masked_lm_loss", backward,
                                    setup_context=_cuda._masked_lm_loss_setup, lib=lib)
    g = torch.Generator().manual_seed(4)
    hidden, head = torch.randn(97, 24, generator=g), torch.randn(131, 24, generator=g) * 0.4
    targets = torch.randint(0, 131, (97,), generator=g)
    targets[::3] = -100

    def op(h, w):
        loss, _s, _c, _dh, _dw = torch.ops.llava_cpu_stand_in.masked_lm_loss(h, w, targets, None, None,
                                                                              [True, True])
        return loss

    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    (op(h, w) * 0.7).backward()
    assert all(u is None for u in seen["unused"]), "non-differentiable outputs got materialized grads"
    assert h.grad.data_ptr() == made["dh"] and w.grad.data_ptr() == made["dw"], "grads were copied"
    h2, w2 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    (masked_lm_loss_ref(h2, w2, targets) * 0.7).backward()
    assert_close_rule(h.grad, h2.grad, what="grad hidden")
    assert_close_rule(w.grad, w2.grad, what="grad head")


# ---- GPU: opcheck (schema, fake kernels, autograd registration, aot dispatch) ---------------------------

@pytest.mark.gpu
@needs_ext
def test_opcheck_all_ops():
    dev, g = "cuda", torch.Generator().manual_seed(1)

    def rnd(*s, rg=True):
        return torch.randn(*s, generator=g).to(dev).requires_grad_(rg)

    ops = torch.ops.llava
    x, w1, b1, w2, b2 = rnd(9, 16), rnd(24, 16), rnd(24), rnd(8, 24), rnd(8)
    torch.library.opcheck(ops.projector, (x, w1, b1, w2, b2))
    torch.library.opcheck(ops.projector, (x.detach().bfloat16(), w1.detach().bfloat16(), None, None, None))
    h = torch.nn.functional.linear(x, w1, b1).detach()
    torch.library.opcheck(ops.projector_backward,
                          (rnd(9, 8, rg=False), x.detach(), w1.detach(), w2.detach(), h, [True] * 5))
    ids = torch.randint(0, 30, (13,), generator=g).to(dev)
    pos = torch.tensor([0, 5, 12], device=dev)
    torch.library.opcheck(ops.scatter_image_tokens, (ids, rnd(30, 16), rnd(3, 16), pos))
    torch.library.opcheck(ops.scatter_image_tokens_backward,
                          (rnd(13, 16, rg=False), ids, pos, 30, [True, True]))
    targets = torch.randint(0, 50, (13,), generator=g).to(dev)
    targets[2:6] = -100
    cu = torch.tensor([0, 4, 9, 13], dtype=torch.int32, device=dev)
    torch.library.opcheck(ops.masked_lm_loss, (rnd(13, 16), rnd(50, 16), targets, cu, None, [True, True]))


# ---- GPU: projector ------------------------------------------------------------------------------------

# (N, Dv, Dh, Dt): odd row counts; K % 8 != 0 (scalar tile loads) and N % 8 != 0 (scalar epilogue) too.
PROJ_SHAPES = [(1, 64, 128, 96), (97, 72, 136, 40), (577, 100, 130, 70), (1025, 1024, 512, 256)]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["mlp2x_gelu", "linear", "mlp_no_bias"])
def test_projector_matches_reference(shape, dtype, variant):
    n, dv, dh, dt = shape
    g = torch.Generator().manual_seed(n + dv)
    x = torch.randn(n, dv, generator=g).cuda()
    w1 = (torch.randn(dh, dv, generator=g) / dv**0.5).cuda()
    b1 = (torch.randn(dh, generator=g) * 0.1).cuda()
    w2 = (torch.randn(dt, dh, generator=g) / dh**0.5).cuda()
    b2 = (torch.randn(dt, generator=g) * 0.1).cuda()
    if variant == "linear":
        w2 = b2 = None
    if variant == "mlp_no_bias":
        b1 = b2 = None
    tensors = [x, w1, b1, w2, b2]
    needs = [t is not None for t in tensors]
    out_dim = dt if w2 is not None else dh
    upstream = torch.randn(n, out_dim, generator=g).cuda()

    def cast(dt_):
        return [None if t is None else t.to(dt_) for t in tensors]

    _poison_allocator((n * out_dim, dtype), (n * dh, dtype), (n * dh, dtype))
    got = _fwd_bwd(_cuda.projector, cast(dtype), needs, upstream)
    truth = _fwd_bwd(projector_ref, cast(torch.float64), needs, upstream)
    ref = _fwd_bwd(projector_ref, cast(dtype), needs, upstream)
    assert got[0].dtype == dtype and got[0].shape == (n, out_dim)
    _check(got[0], truth[0], ref[0], dtype, f"out {variant} {dtype}")
    for name, a, b, c in zip(("x", "w1", "b1", "w2", "b2"), got[1], truth[1], ref[1], strict=True):
        if b is not None:
            _check(a, b, c, dtype, f"grad {name} {variant} {dtype}")


@pytest.mark.gpu
@needs_ext
def test_projector_grads_only_where_required():
    x = torch.randn(33, 64, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(40, 96, device="cuda", dtype=torch.bfloat16)
    _cuda.projector(x, w1, None, w2, None).float().square().sum().backward()
    assert w1.grad is not None and w1.grad.shape == w1.shape and torch.isfinite(w1.grad).all()
    assert x.grad is None and w2.grad is None


@pytest.mark.gpu
@needs_ext
def test_projector_misaligned_operands_take_the_scalar_path():
    # K % 8 == 0 but x starts 2 bytes past a 16-byte boundary: the cp.async path must not be taken
    g = torch.Generator().manual_seed(5)
    n, dv, dh, dt = 37, 64, 96, 40
    flat = torch.randn(n * dv + 1, generator=g).to(torch.bfloat16).cuda()
    x = flat[1:].view(n, dv)
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    w1 = (torch.randn(dh, dv, generator=g) / 8).to(torch.bfloat16).cuda()
    w2 = (torch.randn(dt, dh, generator=g) / 10).to(torch.bfloat16).cuda()
    got = _cuda.projector(x, w1, None, w2, None)
    truth = projector_ref(x.double(), w1.double(), None, w2.double(), None)
    _check(got, truth, projector_ref(x, w1, None, w2, None), torch.bfloat16, "misaligned x")


# ---- GPU: scatter --------------------------------------------------------------------------------------

def _scatter_case(T, D, V, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(V, 40), (T,), generator=g)  # few distinct ids: long segments in the backward
    pos = torch.randperm(T, generator=g)[:M]
    if M >= 2:  # image rows at the first and the last position
        pos[0], pos[-1] = 0, T - 1
        pos = torch.unique(pos)[torch.randperm(torch.unique(pos).numel(), generator=g)]
    ids[pos] = V + 7  # the image token id, outside the table: must never be read
    embed = torch.randn(V, D, generator=g).to(dtype)
    image = torch.randn(pos.numel(), D, generator=g).to(dtype)
    return ids.cuda(), embed.cuda(), image.cuda(), pos.cuda()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 70])  # 16-byte vector path and scalar path
@pytest.mark.parametrize("T,M", [(1, 0), (1, 1), (97, 10), (577, 576), (1025, 300)])
def test_scatter_matches_reference(T, M, D, dtype):
    V = 500
    ids, embed, image, pos = _scatter_case(T, D, V, M, dtype, seed=T + M)
    upstream = torch.randn(T, D, device="cuda")
    _poison_allocator((T * D, dtype))
    out, (_, g_embed, g_image, _) = _fwd_bwd(_cuda.scatter_image_tokens, [ids, embed, image, pos],
                                             [False, True, True, False], upstream)
    want, (_, w_embed, w_image, _) = _fwd_bwd(scatter_image_tokens_ref, [ids, embed, image, pos],
                                              [False, True, True, False], upstream)
    assert torch.equal(out, want), "forward is a copy: bit-exact"
    assert torch.equal(g_image, w_image), "image-row grads are a gather: bit-exact"
    truth = _fwd_bwd(scatter_image_tokens_ref, [ids, embed.double(), image.double(), pos],
                     [False, True, True, False], upstream)[1][1]
    _check(g_embed, truth, w_embed, dtype, f"grad embed {dtype}")
    again = _fwd_bwd(_cuda.scatter_image_tokens, [ids, embed, image, pos], [False, True, True, False],
                     upstream)
    assert torch.equal(again[1][1], g_embed), "embedding grad must be bit-identical run to run"


@pytest.mark.gpu
@needs_ext
def test_scatter_frozen_embedding_and_bad_id_gives_nan_row():
    ids, embed, image, pos = _scatter_case(50, 64, 100, 5, torch.bfloat16)
    image.requires_grad_()
    text_row = next(t for t in range(50) if t not in set(pos.tolist()))
    ids[text_row] = 100  # == V: unchecked on the device, must give NaNs, not a wild read
    out = _cuda.scatter_image_tokens(ids, embed, image, pos)
    assert torch.isnan(out[text_row].float()).all()
    others = torch.ones(50, dtype=torch.bool, device="cuda")
    others[text_row] = False
    assert torch.isfinite(out[others].float()).all()
    out[others].float().sum().backward()
    assert image.grad is not None and embed.grad is None


# ---- GPU: masked loss ----------------------------------------------------------------------------------

def _loss_case(T, V, D, dtype, *, B=3, frac_ignored=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    head = (torch.randn(V, D, generator=g) * 0.5 / D**0.25).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[torch.rand(T, generator=g) < frac_ignored] = -100
    B = min(B, T)
    inner = torch.randperm(T - 1, generator=g)[:B - 1].add(1).sort().values
    cu = torch.cat([torch.tensor([0]), inner, torch.tensor([T])]).to(torch.int32)
    if B > 1:
        targets[cu[1]:cu[2]] = -100  # a sequence with no target token
    return hidden.cuda(), head.cuda(), targets.cuda(), cu.cuda()


def _loss_run(fn, hidden, head, targets, cu, upstream=0.7, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = head.detach().clone().requires_grad_()
    loss, s, c = fn(h, w, targets, cu, **kw)
    (loss * upstream).backward()
    return loss.detach(), s, c, h.grad, w.grad


def _ref_fn(h, w, targets, cu, num_targets=None):
    return masked_lm_loss_ref(h, w, targets, cu_seqlens=cu, num_targets=num_targets, return_per_sequence=True)


def _compare_loss(got, truth, ref, dtype, what):
    assert torch.equal(got[2].cpu(), truth[2].cpu()), f"{what}: seq_count"
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    # loss and seq_sum are one to a few numbers: their low-precision error is one random draw, so "2x the
    # reference's error" alone fails by chance whenever the reference happens to land close to the truth
    # (the two logits GEMMs have different M and may round differently). A 1e-4 relative floor stays
    # below what a real bug costs: a wrong normaliser is O(1), a lost or doubled row ~1/R (>= 1.6e-4 at
    # the 6k-row LLaVA case, >= 1e-3 in the others).
    for name, i, floor in (("loss", 0, 1e-4), ("seq_sum", 1, 1e-4), ("grad hidden", 3, 1e-6),
                           ("grad head", 4, 1e-6)):
        _check(got[i], truth[i], ref[i], dtype, f"{what} {name}", floor=floor)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [32064, 1001])  # vector path; odd V (scalar path)
@pytest.mark.parametrize("T", [1, 97, 577, 1025])
def test_masked_loss_matches_reference(T, V, dtype):
    case = _loss_case(T, V, 72, dtype, frac_ignored=0.0 if T == 1 else 0.4, seed=T)
    got = _loss_run(_cuda.masked_lm_loss, *case)
    truth = _loss_run(_ref_fn, case[0].double(), case[1].double(), case[2], case[3])
    ref = _loss_run(_ref_fn, *case)
    _compare_loss(got, truth, ref, dtype, f"T={T} V={V} {dtype}")
    assert got[3].dtype == dtype and got[4].dtype == dtype
    if T > 1:
        assert got[2][1] == 0 and got[1][1] == 0  # the no-target sequence


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("num_targets", [None, 0, "tensor0"])
def test_masked_loss_no_targets_is_zero_not_nan(num_targets):
    hidden, head, targets, cu = _loss_case(97, 1001, 64, torch.bfloat16)
    if num_targets is None:
        targets = torch.full_like(targets, -100)  # all-ignored batch
    elif num_targets == "tensor0":
        num_targets = torch.tensor(0, device="cuda")
    loss, s, c, gh, gw = _loss_run(_cuda.masked_lm_loss, hidden, head, targets, cu, num_targets=num_targets)
    assert loss.item() == 0.0
    assert not gh.float().abs().sum().item() and not gw.float().abs().sum().item()
    if num_targets is None:
        assert c.sum().item() == 0 and s.abs().sum().item() == 0


@pytest.mark.gpu
@needs_ext
def test_masked_loss_gradient_accumulation_equals_one_batch():
    hidden, head, targets, _ = _loss_case(400, 1001, 64, torch.float32, B=1)
    total = int((targets != -100).sum())
    # upstream 1.0: the micro-batch pieces below call backward() with an upstream of 1 (the default 0.7
    # would make the two grads differ by exactly 0.7x)
    whole = _loss_run(_cuda.masked_lm_loss, hidden, head, targets, None, upstream=1.0)
    h = hidden.clone().requires_grad_()
    w = head.clone().requires_grad_()
    loss = 0.0
    for part in range(4):
        sl = slice(part * 100, (part + 1) * 100)
        piece, _, _ = _cuda.masked_lm_loss(h[sl], w, targets[sl], None, total)
        piece.backward()
        loss += piece.item()
    assert loss == pytest.approx(whole[0].item(), rel=1e-5)
    assert rel_err(h.grad, whole[3]) < 1e-5 and rel_err(w.grad, whole[4]) < 1e-5


# ---- GPU: empty inputs ---------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_empty_inputs_are_no_ops(dtype):
    """numel-0 tensors have a null data_ptr: a batch without image rows (N = 0 projector rows), an empty
    packed batch (T = 0) must give empty outputs and zero grads, not a launcher error."""
    kw = dict(device="cuda", dtype=dtype)
    x = torch.empty(0, 64, **kw)
    w1, b1 = torch.randn(96, 64, **kw).requires_grad_(), torch.randn(96, **kw).requires_grad_()
    w2 = torch.randn(40, 96, **kw).requires_grad_()
    out = _cuda.projector(x, w1, b1, w2, None)
    assert out.shape == (0, 40) and out.dtype == dtype
    out.float().sum().backward()
    assert not w1.grad.any() and not b1.grad.any() and not w2.grad.any()
    assert _cuda.projector(x, w1.detach(), None).shape == (0, 96)

    ids = pos = torch.empty(0, dtype=torch.long, device="cuda")
    embed, image = torch.randn(10, 64, **kw).requires_grad_(), torch.empty(0, 64, **kw).requires_grad_()
    out = _cuda.scatter_image_tokens(ids, embed, image, pos)
    assert out.shape == (0, 64)
    out.float().sum().backward()
    assert not embed.grad.any() and image.grad.shape == (0, 64)

    hidden, head = torch.empty(0, 64, **kw).requires_grad_(), torch.randn(50, 64, **kw).requires_grad_()
    loss, seq_sum, seq_count = _cuda.masked_lm_loss(hidden, head, torch.empty(0, dtype=torch.long, device="cuda"))
    assert loss.item() == 0.0 and seq_sum.tolist() == [0.0] and seq_count.tolist() == [0]
    loss.backward()
    assert hidden.grad.shape == (0, 64) and not head.grad.any()


# ---- GPU: real LLaVA-1.5 shapes (bf16) -----------------------------------------------------------------

@pytest.mark.gpu
@needs_ext
def test_llava15_shapes_bf16():
    g = torch.Generator().manual_seed(7)
    bf = torch.bfloat16
    # projector: 576 patches x 1024 (CLIP ViT-L/14-336) -> 4096 -> 4096
    x = torch.randn(576, 1024, generator=g).cuda()
    w1, b1 = (torch.randn(4096, 1024, generator=g) / 32).cuda(), (torch.randn(4096, generator=g) * 0.1).cuda()
    w2, b2 = (torch.randn(4096, 4096, generator=g) / 64).cuda(), (torch.randn(4096, generator=g) * 0.1).cuda()
    up = torch.randn(576, 4096, generator=g).cuda()
    tensors, needs = [x, w1, b1, w2, b2], [False, True, True, True, True]  # stage 1: x is frozen
    got = _fwd_bwd(_cuda.projector, [t.to(bf) for t in tensors], needs, up)
    ref = _fwd_bwd(projector_ref, [t.to(bf) for t in tensors], needs, up)
    truth = _fwd_bwd(projector_ref, [t.double() for t in tensors], needs, up)
    _check(got[0], truth[0], ref[0], bf, "projector out")
    for i in range(1, 5):
        _check(got[1][i], truth[1][i], ref[1][i], bf, f"projector grad {i}")

    # scatter: 2 sequences of 1200 tokens with 576 image rows each, D = 4096, V = 32064
    T, D, V = 2400, 4096, 32064
    ids = torch.randint(0, V, (T,), generator=g)
    pos = torch.cat([torch.arange(35, 35 + 576), torch.arange(1235, 1235 + 576)])
    ids[pos] = 32000
    embed, image = torch.randn(V, D, generator=g).to(bf).cuda(), got[0].detach()[torch.arange(1152) % 576]
    up = torch.randn(T, D, generator=g).cuda()
    args = [ids.cuda(), embed, image, pos.cuda()]
    out, (_, g_embed, g_image, _) = _fwd_bwd(_cuda.scatter_image_tokens, args, [False, True, True, False], up)
    want, (_, w_embed, w_image, _) = _fwd_bwd(scatter_image_tokens_ref, args, [False, True, True, False], up)
    assert torch.equal(out, want) and torch.equal(g_image, w_image)
    truth_e = _fwd_bwd(scatter_image_tokens_ref, [args[0], embed.double(), image.double(), args[3]],
                       [False, True, True, False], up)[1][1]
    _check(g_embed, truth_e, w_embed, bf, "scatter grad embed")

    # masked loss: 8192 packed tokens (2 logits chunks at V = 32064), D = 4096
    case = _loss_case(8192, V, D, bf, B=8, frac_ignored=0.25, seed=3)
    got = _loss_run(_cuda.masked_lm_loss, *case)
    ref = _loss_run(_ref_fn, *case)
    truth = _loss_run(_ref_fn, case[0].double(), case[1].double(), case[2], case[3])
    _compare_loss(got, truth, ref, bf, "masked loss LLaVA-1.5")
