"""The inference GEMM route (engine/linear.py) and the fused fp32 RMSNorm, on the CPU.

Tolerance rule for two fp32 dot products of length K summed in different orders: each is within
γ_K · Σ|x_i·w_i| of the exact value (γ_K = K·u / (1 − K·u), u = 2⁻²⁴), so they differ by at most twice that.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from engine import linear as dense
from engine.model import RMSNorm
from llava_kernels import small_gemm

U = 2.0**-24


def bound(x, w):
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    return 2 * gamma * (x.abs() @ w.abs().T)


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("shape", [(5, 7), (301, 129), (96, 1000)])
def test_linear_equals_f_linear_within_the_summation_bound(rows, shape):
    torch.manual_seed(rows)
    n, k = shape
    x, w = torch.randn(rows, k), torch.randn(n, k)
    with torch.no_grad():
        ours = dense.linear(x, w)
    assert ours.shape == (rows, n)
    assert ((ours - F.linear(x, w)).abs() <= bound(x, w)).all()


def test_linear_takes_the_small_gemm_then_onednn_only_for_few_row_fp32_inference_on_plain_weights(monkeypatch):
    if not dense.ONEDNN:
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn) linear: F.linear everywhere")
    small = small_gemm.available()
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.no_grad():
        ran = ops_run(lambda: dense.linear(x, w))
        if small:                                                      # decode rows: our kernel
            assert "llava_cpu::small_gemm" in ran and "mkldnn::_linear_pointwise" not in ran
        else:
            assert "mkldnn::_linear_pointwise" in ran
        between = torch.randn(small_gemm.MAX_ROWS + 1, 16)              # above our kernel's rows: oneDNN
        ran = ops_run(lambda: dense.linear(between, w))
        assert "mkldnn::_linear_pointwise" in ran and "llava_cpu::small_gemm" not in ran
        for other in (x.bfloat16(), torch.randn(dense.ONEDNN_MAX_ROWS + 1, 16)):  # bf16, prefill: F.linear
            ran = ops_run(lambda o=other: dense.linear(o, w.to(o.dtype)))
            assert not {"mkldnn::_linear_pointwise", "llava_cpu::small_gemm"} & ran
        monkeypatch.setattr(dense, "SMALL_GEMM", False)               # the switch turns our kernel off
        assert "llava_cpu::small_gemm" not in ops_run(lambda: dense.linear(x, w))
    # with gradients: F.linear and its autograd, the weight's gradient as before
    w.requires_grad_(True)
    ran = ops_run(lambda: dense.linear(x, w))
    assert not {"mkldnn::_linear_pointwise", "llava_cpu::small_gemm"} & ran
    dense.linear(x, w).sum().backward()
    assert torch.equal(w.grad, x.sum(0).expand(8, 16))


def test_linear_keeps_leading_dims_and_takes_strided_weights():
    """A [B, T, K] input comes back [B, T, N]; a weight that is a non-contiguous view (a transposed
    tensor) still gets a right answer (our kernel needs contiguous rows and is skipped)."""
    torch.manual_seed(3)
    x, w = torch.randn(2, 3, 24), torch.randn(24, 10).T
    with torch.no_grad():
        out = dense.linear(x, w)
    assert out.shape == (2, 3, 10)
    assert ((out - F.linear(x, w)).abs() <= bound(x, w)).all()


def test_apply_keeps_the_module_call_for_hooks_wrappers_and_bias():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    plain, biased = nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
    seen = []
    hooked = nn.Linear(16, 8, bias=False)
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        assert ((dense.apply(plain, x) - plain(x)).abs() <= bound(x, plain.weight)).all()
        assert torch.equal(dense.apply(biased, x), biased(x))
        dense.apply(hooked, x)
    assert seen == [(3, 8)]


@pytest.mark.parametrize("rows,dim", [(1, 768), (5, 13), (33, 4096)])
def test_fused_rmsnorm_equals_the_llama_formula_in_fp32_inference(rows, dim):
    torch.manual_seed(dim)
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(rows, dim) * 3
    with torch.no_grad():
        fused = norm(x)                                # torch.rms_norm
    with torch.enable_grad():
        formula = norm(x)                              # the six-op fp32 path training runs
    # the same fp32 formula; only the mean's summation order may differ: 2·γ_D relative on the mean
    # square, half of that through rsqrt, and one rounding each for the two products
    tol = (dim * U + 3 * U) * formula.detach().abs()
    assert ((fused - formula.detach()).abs() <= tol + 1e-30).all()
