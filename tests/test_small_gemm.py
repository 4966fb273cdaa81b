"""llava_kernels.small_gemm: our few-row fp32 CPU GEMM against its reference, on odd shapes.

Tolerance rule (as tests/test_linear.py): an fp32 dot product of length K in any summation order is within
γ_K · Σ|x_i·w_i| of the exact value (γ_K = K·u / (1 − K·u), u = 2⁻²⁴); the exact value is taken in fp64.
"""
import os
import subprocess
import sys

import pytest
import torch

from llava_kernels import small_gemm as sg

U = 2.0**-24

needs_kernel = pytest.mark.skipif(not sg.available(), reason=f"the CPU GEMM kernel is not built: {sg.load_error()}")


def exact_and_bound(x, w):
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    return x.double() @ w.double().T, gamma * (x.abs().double() @ w.abs().double().T)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (4, 8), (7, 9), (301, 129), (67, 1000), (1030, 768)])
def test_small_gemm_within_the_summation_bound(m, n, k):
    torch.manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k), torch.randn(n, k)
    out = sg.small_gemm(x, w)
    assert out.shape == (m, n) and out.dtype == torch.float32
    exact, bound = exact_and_bound(x, w)
    assert ((out.double() - exact).abs() <= bound).all()
    ref = sg.small_gemm_ref(x, w)                       # and so within twice the bound of F.linear
    assert ((out - ref).abs().double() <= 2 * bound).all()


@needs_kernel
def test_a_row_does_not_depend_on_its_batch_or_the_thread_count():
    """Bit for bit: row i of a 7-row call equals the 1-row call on that row (paired and unpaired rows sum
    in one order), with one thread or several."""
    torch.manual_seed(0)
    x, w = torch.randn(7, 771), torch.randn(517, 771)
    full = sg.small_gemm(x, w)
    for i in range(7):
        assert torch.equal(full[i:i + 1], sg.small_gemm(x[i:i + 1].contiguous(), w))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(sg.small_gemm(x, w), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_empty_sizes():
    assert sg.small_gemm(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    assert sg.small_gemm(torch.randn(2, 8), torch.randn(0, 8)).shape == (2, 0)
    assert torch.equal(sg.small_gemm(torch.randn(2, 0), torch.randn(3, 0)), torch.zeros(2, 3))


@needs_kernel
@pytest.mark.parametrize("x,w,message", [
    (torch.randn(2, 8), torch.randn(3, 9), "K differs"),
    (torch.randn(2, 8).double(), torch.randn(3, 8).double(), "fp32 only"),
    (torch.randn(8, 2).T, torch.randn(3, 8), "contiguous"),
    (torch.randn(2, 2, 8), torch.randn(3, 8), r"x \[M, K\]"),
])
def test_bad_input_says_what(x, w, message):
    with pytest.raises(RuntimeError, match=message):
        sg.small_gemm(x, w)


def test_switched_off_it_says_why_and_linear_still_works():
    """LLAVA_CPU_NATIVE=0: not available, the reason given, engine.linear falls back (oneDNN / F.linear)."""
    code = ("import torch, torch.nn.functional as F\n"
            "from llava_kernels import small_gemm as sg\n"
            "from engine import linear\n"
            "x, w = torch.randn(1, 16), torch.randn(8, 16)\n"
            "with torch.no_grad(): y = linear.linear(x, w)\n"
            "assert not sg.available() and sg.load_error() == 'LLAVA_CPU_NATIVE=0', sg.load_error()\n"
            "assert (y - F.linear(x, w)).abs().max() < 1e-5\n")
    env = dict(os.environ, LLAVA_CPU_NATIVE="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "CPU ops" not in out.stderr                        # asked for by the user: no notice
