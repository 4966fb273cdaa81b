"""Few-row fp32 GEMM for decoding on the CPU: ``y[M, N] = x[M, K] · w[N, K]ᵀ``, M ≤ ``MAX_ROWS``.

The reference is ``small_gemm_ref`` (``F.linear``). Ours is ``llava_kernels/cpu/small_gemm.cpp``, an
AVX2/FMA kernel built on first use (``llava_kernels._cpu``) as ``torch.ops.llava_cpu.small_gemm``; where it
cannot be built, ``available()`` is False, ``load_error()`` says why, and ``engine.linear`` takes oneDNN.

Why a kernel of our own: a decode step reads every weight once for a few rows, so it runs at the speed the
weights stream from memory. On the 2-core development machine (2026-12-05, torch 2.13.0+cpu, quiet), the 49
matrices of the CPU benchmark model (438 MB) at one row: MKL (``F.linear``) 17 GB/s, oneDNN
(``torch.ops.mkldnn._linear_pointwise``) 27-34 GB/s, this kernel 32-40 GB/s, a plain ``sum`` over the same
bytes 31-40 GB/s (three runs; the machine's bandwidth moves from run to run, the order never did). At
2/3/8/32/64 rows, all 49 matrices: 12.7/15.2/21.6/58.3/108.8 ms against oneDNN's 24.9/28.7/33.7/66.5/118.4.

Numerics: fp32 FMAs in eight lane-wise partial sums, then a fixed horizontal add and the tail in order;
another order than MKL's or oneDNN's, so results agree to the summation bound (tests/test_small_gemm.py),
and every output element is summed the same way whatever M is (a row does not depend on its batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_kernels import _cpu

MAX_ROWS = 64     # at 64 rows it was 1.1x oneDNN (the measurements above); above, oneDNN or MKL


def small_gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]ᵀ → [M, N]."""
    return F.linear(x, w)


def small_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]ᵀ → [M, N]: fp32, CPU, contiguous, no autograd (an inference op). Raises
    RuntimeError when the kernel is not available (ask ``available()`` first)."""
    return _cpu.ops().small_gemm(x, w)


available, load_error = _cpu.available, _cpu.load_error
