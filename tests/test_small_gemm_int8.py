"""llava_kernels.small_gemm_int8 (weight-only int8, one scale per output row) against the exact result, and
engine.linear's route to it for torchao's int8 weights (engine.quantize).

Tolerance rule: the int8 weights are exact in fp32, so the kernel's sum Σ x_k·q_k in any order is within
γ_K · Σ|x_k·q_k| of the exact one (γ_K = K·u / (1 − K·u), u = 2⁻²⁴), and the multiply by the scale adds one
rounding: |ours − exact| ≤ (γ_K + u)·|s|·Σ|x·q| + u·|exact|. torchao dequantizes first (q·s rounded per weight),
so it is held to the bound of its own order, γ_{K+1}; ours and torchao's differ by at most the two bounds.
"""
import pytest
import torch
from torch import nn

from engine import linear as dense
from llava_kernels import small_gemm_int8 as g

U = 2.0**-24
needs_kernel = pytest.mark.skipif(not g.available(), reason=f"the CPU ops are not built: {g.load_error()}")


def case(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-4
    return x, q, scale


def exact_and_bound(x, q, scale):
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    dot = x.double() @ q.double().T
    absdot = x.abs().double() @ q.abs().double().T
    exact = dot * scale.double()
    return exact, (gamma + U) * absdot * scale.double() + U * exact.abs()


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 64])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (4, 8), (7, 9), (301, 129), (1030, 768)])
def test_within_the_summation_bound(m, n, k):
    x, q, scale = case(m, n, k, seed=m * 7 + n + k)
    out = g.small_gemm_int8(x, q, scale)
    assert out.shape == (m, n) and out.dtype == torch.float32
    exact, bound = exact_and_bound(x, q, scale)
    assert ((out.double() - exact).abs() <= bound).all()


@needs_kernel
def test_a_row_does_not_depend_on_its_batch_or_the_thread_count():
    x, q, scale = case(7, 517, 771)
    full = g.small_gemm_int8(x, q, scale)
    for i in range(7):
        assert torch.equal(full[i:i + 1], g.small_gemm_int8(x[i:i + 1].contiguous(), q, scale))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(g.small_gemm_int8(x, q, scale), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_bad_inputs_are_named():
    x, q, scale = case(2, 8, 16)
    with pytest.raises(RuntimeError, match="int8 q"):
        g.small_gemm_int8(x, q.float(), scale)
    with pytest.raises(RuntimeError, match="shapes differ"):
        g.small_gemm_int8(x, q, scale[:-1])
    torch.library.opcheck(torch.ops.llava_cpu.small_gemm_int8, (x, q, scale))


def torchao_int8(n, k, seed=0):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerRow
    torch.manual_seed(seed)
    m = nn.Linear(k, n, bias=False)
    quantize_(m, Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False))
    return m


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_engine_linear_routes_torchao_int8_weights_to_the_kernel(rows, monkeypatch):
    """At ≤ 64 rows engine.linear runs our kernel on torchao's int8 weight (within both bounds of torchao's
    own result), above it torchao's path; with gradients on, always torchao's."""
    m = torchao_int8(37, 96)
    w = m.weight
    x = torch.randn(rows, 96)
    calls = []
    real = g.small_gemm_int8
    monkeypatch.setattr(g, "small_gemm_int8", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ours, theirs = dense.apply(m, x), m(x)
    assert len(calls) == (rows <= g.MAX_ROWS)
    q, scale = w.qdata, w.scale.reshape(-1)
    exact, bound = exact_and_bound(x, q, scale)
    k = x.shape[-1] + 1
    theirs_bound = k * U / (1 - k * U) * (x.abs().double() @ (q.double() * scale.double()[:, None]).abs().T)
    assert ((ours.double() - theirs.double()).abs() <= bound + theirs_bound + 1e-12).all()
    calls.clear()
    dense.apply(m, x.requires_grad_())
    assert not calls


@needs_kernel
def test_weights_the_kernel_cannot_take_keep_torchao():
    m = torchao_int8(16, 32)
    w = m.weight
    assert dense.int8_rows(w) is not None
    w.zero_point.fill_(1)                      # an asymmetric weight (not what engine.quantize makes)
    w.__dict__.pop("_llava_int8")
    assert dense.int8_rows(w) is None
    with torch.no_grad():
        x = torch.randn(2, 32)
        assert torch.equal(dense.apply(m, x), m(x))
