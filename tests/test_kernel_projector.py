"""Fused projector (llava_kernels/projector.py) vs a float64 truth: every output and every gradient.

CPU: the Triton interpreter on tiny widths that are not multiples of the 32×32×16 interpreter block
(Dv=40, Dh=72 → masked K tails; Dt=48 → the mask-free EVEN_K path). GPU: the real LLaVA-1.5 shape.
Tolerance rule (tests/helpers.py): fp32 rel err ≤ 1e-5 vs fp64 (tl.dot runs with input_precision="ieee"
for fp32, so no TF32 relaxation is needed on GPU either); bf16/fp16 within 2× the eager reference's own
error vs the same fp64 truth.
"""
import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close_rule, poison_

from llava_kernels._triton_util import store_cast
from llava_kernels.projector import ACT_GELU, ACT_GELU_BWD, fused_gemm, projector, projector_fwd, projector_ref

NAMES = ("x", "w1", "b1", "w2", "b2")
# The small-shape tests run the interpreter on the CPU and the real kernels on a GPU machine.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(n, dv, dh, dt, *, mlp=True, bias=True, device=DEVICE, scale=1.0):
    """fp64 master tensors (never zeros); w2/b2 None for the linear projector, biases None if not bias."""
    g = torch.Generator().manual_seed(n * 7 + dv)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = {"x": rnd(n, dv) * scale, "w1": rnd(dh, dv) / dv**0.5, "b1": rnd(dh) * 0.5 if bias else None,
         "w2": rnd(dt, dh) / dh**0.5 if mlp else None, "b2": rnd(dt) * 0.5 if mlp and bias else None}
    return {k: (v.to(device) if v is not None else None) for k, v in t.items()}


def run(master, dtype, backend, grad_x=True, fn=None):
    """Output and grads of ``fn`` (projector with ``backend``) with inputs cast to ``dtype``."""
    args = {}
    for k, v in master.items():
        if v is not None:
            v = v.detach().to(dtype, copy=True).requires_grad_(k != "x" or grad_x)
        args[k] = v
    y = projector(*[args[k] for k in NAMES], backend=backend) if fn is None else fn(*[args[k] for k in NAMES])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    (y * dy).sum().backward()
    grads = {k: (args[k].grad if args[k] is not None else None) for k in NAMES}
    return y, grads


def check(master, dtype, grad_x=True, backend="triton"):
    truth_y, truth_g = run(master, torch.float64, None, grad_x, fn=projector_ref)
    y, g = run(master, dtype, backend, grad_x)
    ref = (None, {k: None for k in NAMES}) if dtype == torch.float32 else \
        run(master, dtype, None, grad_x, fn=projector_ref)
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert_close_rule(y, truth_y, ref[0], what="y")
    for k in NAMES:
        if master[k] is None or (k == "x" and not grad_x):
            assert g[k] is None, f"grad {k} should not exist"
            continue
        assert g[k] is not None and g[k].dtype == dtype, f"grad {k}: {None if g[k] is None else g[k].dtype}"
        assert_close_rule(g[k], truth_g[k], ref[1][k], what=f"grad {k}")


@pytest.mark.parametrize("n", [1, 97, 577])
@pytest.mark.parametrize("mlp", [True, False], ids=["mlp2x", "linear"])
def test_fp32_matches_fp64_truth(n, mlp):
    master = make(n, 40, 72, 48, mlp=mlp)
    check(master, torch.float32)


@pytest.mark.parametrize("mlp", [True, False], ids=["mlp2x", "linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_ref_error(mlp, dtype):
    master = make(97, 40, 72, 48, mlp=mlp, scale=2.0)  # scale 2: GELU's curved region and tails
    check(master, dtype)


@pytest.mark.parametrize("mlp", [True, False], ids=["mlp2x", "linear"])
def test_no_bias(mlp):
    master = make(97, 40, 72, 48, mlp=mlp, bias=False)
    check(master, torch.float32)


def test_stage1_frozen_input_no_dx():
    """Stage 1: the vision features do not require grad; weights and biases still get exact grads."""
    master = make(97, 40, 72, 48)
    check(master, torch.float32, grad_x=False)


def test_only_second_layer_trains():
    master = make(33, 40, 72, 48)
    truth_y, truth_g = run(master, torch.float64, None, fn=projector_ref)
    args = {k: v.float() for k, v in master.items()}
    args["w2"].requires_grad_(True)
    y = projector(*[args[k] for k in NAMES], backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    (y * dy).sum().backward()
    assert_close_rule(args["w2"].grad, truth_g["w2"], what="grad w2")


def test_launchers_write_every_element():
    """Outputs and epilogue side outputs are NaN-poisoned first, so an unwritten element fails."""
    master = make(97, 40, 72, 48)
    x, w1, b1, w2, b2 = (master[k].float() for k in NAMES)
    y = poison_(torch.empty(97, 48, device=DEVICE))
    y_out, h = projector_fwd(x, w1, b1, w2, b2, out=y)
    assert y_out.data_ptr() == y.data_ptr()
    h64 = master["x"] @ master["w1"].T + master["b1"]
    assert_close_rule(y, projector_ref(*master.values()), what="y")
    assert_close_rule(h, h64, what="saved pre-activation")

    g, pre = poison_(torch.empty(97, 72, device=DEVICE)), poison_(torch.empty(97, 72, device=DEVICE))
    fused_gemm(x, w1.t(), bias=b1, act=ACT_GELU, store_aux=True, out=g, aux_out=pre)
    assert_close_rule(pre, h64, what="aux pre-activation")
    assert_close_rule(g, torch.nn.functional.gelu(h64), what="gelu")

    dy64 = torch.randn(97, 48, dtype=torch.float64, device=DEVICE)
    cdf = 0.5 * (1 + torch.erf(h64 / 2**0.5))
    dh64 = (dy64 @ master["w2"]) * (cdf + h64 * torch.exp(-0.5 * h64**2) / (2 * torch.pi) ** 0.5)
    dh, g2 = poison_(torch.empty(97, 72, device=DEVICE)), poison_(torch.empty(97, 72, device=DEVICE))
    _, _, db1 = fused_gemm(dy64.float(), w2, act=ACT_GELU_BWD, aux=h64.float(), store_aux=True, colsum=True,
                           out=dh, aux_out=g2)
    assert_close_rule(dh, dh64, what="dH")
    assert_close_rule(g2, h64 * cdf, what="recomputed gelu")
    assert_close_rule(db1, dh64.sum(0), what="db1 column sums")


def test_empty_batch():
    master = make(1, 40, 72, 48)
    x = torch.empty(0, 40, device=DEVICE)
    y = projector(x, *(master[k].float() for k in NAMES[1:]), backend="triton")
    assert y.shape == (0, 48)


def test_dispatch_cpu_default_is_reference():
    master = make(5, 40, 72, 48, device="cpu")
    args = [master[k].float() for k in NAMES]
    assert torch.equal(projector(*args), projector_ref(*args))
    assert torch.equal(projector(*args, backend="torch"), projector_ref(*args))


@pytest.mark.parametrize("case,match", [
    (lambda a: a.update(x=a["x"][0]), "2-D"),
    (lambda a: a.update(x=a["x"].long()), "dtype"),
    (lambda a: a.update(w1=a["w1"][:, :-1]), "w1 must have shape"),
    (lambda a: a.update(b1=a["b1"][:-1]), "b1 must have shape"),
    (lambda a: a.update(w2=a["w2"][:, :-1]), "w2 must have shape"),
    (lambda a: a.update(b2=a["b2"][:-1]), "b2 must have shape"),
    (lambda a: a.update(w2=None), "b2 given without w2"),
    (lambda a: a.update(w1=None), "w1 is required"),
    (lambda a: a.update(b1=a["b1"].double()), "b1 dtype"),
    (lambda a: a.update(w2=a["w2"].to("meta")), "w2 is on meta"),
])
def test_bad_input_raises_value_error(case, match):
    master = make(5, 40, 72, 48)
    args = {k: v.float() for k, v in master.items()}
    case(args)
    with pytest.raises(ValueError, match=match):
        projector(*[args[k] for k in NAMES], backend="triton")


def test_unusable_backend_raises():
    master = make(5, 40, 72, 48, device="cpu")
    with pytest.raises(ValueError, match="cuda"):
        projector(*[master[k].float() for k in NAMES], backend="cuda")


def _bits_to_f32(bits: list[int]) -> torch.Tensor:
    """uint32 bit patterns -> float32 tensor (CPU)."""
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def _bf16_bits(bits: list[int]) -> torch.Tensor:
    """uint16 bit patterns -> bfloat16 tensor (CPU)."""
    return torch.tensor([b - (1 << 16) if b >= 1 << 15 else b for b in bits], dtype=torch.int16).view(torch.bfloat16)


# fp32 bit patterns where a hand-written fp32 -> bf16 rounding goes wrong, with what torch gives.
TRICKY_F32 = [
    0x3F808000, 0x3F818000,              # 1 + 2^-8 (tie, even: down to 1.0), 1 + 3·2^-8 (tie, odd: up)
    0x3F807FFF, 0x3F808001,              # just under / over a tie
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # near the bf16 max: stays max finite, tie rounds up to Inf, FLT_MAX -> Inf
    0xFF7F8000, 0xFF7FFFFF,              # the same, negative: -Inf
    0x00000001, 0x00008000, 0x00018000,  # subnormals: to 0, tie (even: 0), tie (odd: up)
    0x007FFFFF, 0x807FFFFF, 0x80008001,  # largest subnormal -> smallest normal; negative ones
    0x00000000, 0x80000000,              # ±0
    0x7F800000, 0xFF800000,              # ±Inf
    0x7FC00000, 0xFFC00000,              # the quiet NaNs arithmetic makes
    0x7FFFFFFF, 0xFFFFFFFF,              # NaNs whose +0x7FFF carries into the sign (old code: -0.0, +0.0)
    0x7F800001, 0x7F807FFF, 0xFF807FFF,  # NaNs with only low payload bits (old code: ±Inf)
    0x7FBFFFFF, 0x7F80FFFF,              # a signalling NaN with a full payload; one whose rounding carries
]


@triton.jit
def _store_cast_kernel(x_ptr, y_ptr, n, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = bf16(x[i]) through store_cast, the store of the projector's epilogue."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    store_cast(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask, ROUND_BF16)


def assert_same_bf16(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN in the same places (torch makes one canonical NaN, so NaN bits are not compared); every other
    element bit-identical (the sign of zero and subnormals included)."""
    got, want = got.cpu(), want.cpu()
    nan = want.isnan()
    bad = (got.isnan() != nan) | (~nan & (got.view(torch.int16) != want.view(torch.int16)))
    assert not bad.any(), f"{what}: {int(bad.sum())} differ, e.g. {got[bad][:4].tolist()} != {want[bad][:4].tolist()}"


# ROUND_BF16 is what the projector sets under the interpreter; the plain cast (False) is the GPU path.
@pytest.mark.parametrize("round_bf16", [True, pytest.param(False, marks=pytest.mark.gpu)],
                         ids=["by_hand", "plain_cast"])
def test_bf16_store_rounds_like_torch(round_bf16):
    g = torch.Generator().manual_seed(3)
    random_bits = torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([_bits_to_f32(TRICKY_F32), random_bits.view(torch.float32)])
    y = torch.full(x.shape, -3.0, dtype=torch.bfloat16, device=DEVICE)  # not NaN: NaNs are expected
    _store_cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), y, x.numel(), ROUND_BF16=round_bf16,
                                                        BLOCK=1024)
    assert_same_bf16(y, x.to(torch.bfloat16), "fp32 -> bf16")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_bf16_nan_and_inf_inputs_propagate_like_reference():
    """NaN (quiet, signalling, either sign) and ±Inf in x: the same output elements are NaN as in the
    eager bf16 reference (an Inf row turns to NaN through gelu(-Inf) = -Inf·0), and the other rows still
    meet the tolerance rule."""
    master = make(97, 40, 72, 48)
    args = {k: v.to(torch.bfloat16) for k, v in master.items()}
    bad_rows = [0, 11, 45, 60, 96]
    args["x"][bad_rows, [3, 39, 0, 17, 20]] = _bf16_bits([0x7FC0, 0xFFFF, 0x7F81, 0xFF80, 0x7F80]).to(DEVICE)
    y = projector(*[args[k] for k in NAMES], backend="triton")
    ref = projector_ref(*[args[k] for k in NAMES])
    assert y.isnan().any(1).tolist() == [i in bad_rows for i in range(97)]
    assert torch.equal(y.isnan(), ref.isnan()) and not y.isinf().any()
    ok = [i for i in range(97) if i not in bad_rows]
    truth = projector_ref(*[args[k].double() for k in NAMES])
    assert_close_rule(y[ok], truth[ok], ref[ok], what="finite rows")


@pytest.mark.gpu
# 576 rows (one image) and 1025 (odd: masked M tails, its own Triton specialization). Four images (2304
# rows) are left to bench_projector.py, which validates N = 576·{1, 4, 16} before timing: another M
# bucket here costs a full autotune round of every kernel variant in the time-boxed device run.
@pytest.mark.parametrize("n", [576, 1025])
def test_gpu_llava15_shape_bf16(n):
    master = make(n, 1024, 4096, 4096, device="cuda")
    check(master, torch.bfloat16, grad_x=True)


@pytest.mark.gpu
@pytest.mark.parametrize("mlp", [True, False], ids=["mlp2x", "linear"])
def test_gpu_fp32_ieee(mlp):
    master = make(1025, 1024, 1000, 520, mlp=mlp, device="cuda")
    check(master, torch.float32)
