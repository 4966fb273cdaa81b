"""llava_kernels.rms_norm: our fp32 CPU RMSNorm against the LLaMA formula, on odd sizes.

Tolerance rule: both compute mean(x²) in fp32 in their own order, each within γ_D of the exact mean
(relative: the terms are non-negative); half of that survives rsqrt, and the two products add one
rounding each: |ours − formula| ≤ (D·u + 3u) · |formula| (as tests/test_linear.py), u = 2⁻²⁴.
"""
import pytest
import torch

from engine.model import RMSNorm
from llava_kernels import rms_norm as rn

U = 2.0**-24
needs_kernel = pytest.mark.skipif(not rn.available(), reason=f"the CPU ops are not built: {rn.load_error()}")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 768), (3, 1), (5, 13), (2, 7, 9), (200, 4096)])
def test_rms_norm_equals_the_formula_within_its_rounding(shape):
    torch.manual_seed(shape[-1])
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    ours = rn.rms_norm(x, w, 1e-6)
    ref = rn.rms_norm_ref(x, w, 1e-6)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert ((ours - ref).abs() <= (shape[-1] * U + 3 * U) * ref.abs() + 1e-30).all()


@needs_kernel
def test_zero_rows_and_eps():
    """An all-zero row stays zero (eps keeps it finite); eps enters as in the formula."""
    x, w = torch.zeros(2, 16), torch.ones(16)
    assert torch.equal(rn.rms_norm(x, w, 1e-6), torch.zeros(2, 16))
    x = torch.full((1, 16), 1e-3)
    for eps in (1e-6, 1e-2):
        assert torch.allclose(rn.rms_norm(x, w, eps), rn.rms_norm_ref(x, w, eps), rtol=1e-6, atol=0)


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    x, w = torch.randn(300, 771), torch.randn(771)        # enough rows to be split between threads
    full = rn.rms_norm(x, w, 1e-5)
    for i in (0, 7, 299):
        assert torch.equal(full[i:i + 1], rn.rms_norm(x[i:i + 1].contiguous(), w, 1e-5))


@needs_kernel
@pytest.mark.parametrize("x,w,message", [
    (torch.randn(2, 8), torch.randn(9), r"x \[\.\.\., D\]"),
    (torch.randn(2, 8).double(), torch.randn(8).double(), "fp32 only"),
    (torch.randn(8, 2).T, torch.randn(8), "contiguous"),
])
def test_bad_input_says_what(x, w, message):
    with pytest.raises(RuntimeError, match=message):
        rn.rms_norm(x, w, 1e-6)


def test_the_module_takes_our_op_only_in_fp32_cpu_inference():
    """Training (grad on) runs the formula (autograd, bit-identical to before); inference uses ours."""
    torch.manual_seed(2)
    norm = RMSNorm(24, 1e-6)
    x = torch.randn(3, 24)
    train = norm(x)
    assert train.grad_fn is not None and torch.equal(train, rn.rms_norm_ref(x, norm.weight, 1e-6))
    with torch.no_grad():
        infer = norm(x)
    assert ((infer - train.detach()).abs() <= (24 * U + 3 * U) * train.detach().abs() + 1e-30).all()
