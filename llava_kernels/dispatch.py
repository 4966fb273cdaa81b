"""One place that picks the implementation of each fused op.

Order for CUDA tensors: per op in ``AUTO_ORDER`` (the design order is ``cuda`` → ``triton`` →
``torch``; the table records where measurements, or their absence, say otherwise).
CPU tensors get our CPU kernel where the op has one (``CPU_OPS``: llava_kernels/cpu/*.cpp, built on first
use; ``cpu``) and it is built, else the pure-torch reference; ``triton`` only when asked for explicitly and
the Triton interpreter is on (``TRITON_INTERPRET=1``), which is how the CPU tests run kernels.

Override, strongest first: the ``backend=`` argument of the public op; the environment
variable ``LLAVA_KERNEL_BACKEND_<OP>`` (e.g. ``LLAVA_KERNEL_BACKEND_MASKED_LOSS=triton``);
``LLAVA_KERNEL_BACKEND`` for every op. Values: ``torch``, ``triton``, ``cuda``, ``cpu``, ``auto``.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
OPS = ("projector", "scatter", "masked_loss", "paged_decode")
# Ops with a CPU kernel of ours (fp32; the op falls back to its reference for other dtypes). paged_decode:
# a decode step of the CPU benchmark model spent ~2.1 ms of ~18.5 in the reference's gather + SDPA (12
# layers, 2026-12-05); the kernel reads the blocks in place (llava_kernels/paged_decode.py has the numbers).
CPU_OPS = ("paged_decode",)

# What ``auto`` tries on a GPU, per op, fastest measured first (bench/results/h200/, H200, bf16, the
# run of 2026-12-04 at commit 0e4beaf; bench/results/h100-dev/ before it):
#   projector: torch. Two cuBLAS GEMMs beat both fused kernels everywhere (fwd+bwd: Triton 0.26-0.77x,
#     CUDA 0.22-0.76x on the H200; 0.21-0.83x on an H100).
#   scatter: cuda, then triton. Forward: CUDA 0.025-0.073 ms, Triton 0.098-0.108, torch 0.11-0.35.
#     Backward with the embedding grad ("bwd2"): CUDA 1.9-3.3x torch, Triton 1.0-2.6x. Backward of the
#     image rows only ("bwd1", frozen table): torch's gather is fastest (0.04-0.07 ms vs CUDA 0.06-0.11),
#     so the op pairs the kernel forward with a torch gather there (llava_kernels/scatter.py).
#   masked_loss: triton, then cuda. Both 1.4-3.5x torch and 1.5-3x Liger; CUDA slightly faster at 50-60%
#     targets, Triton at 30%. That run failed both on the GPU test (CUDA: 2.5x Triton's memory; the
#     grad_head failure was the test's upstream-0.7 rescale). Re-measured after the fixes
#     (bench/results/h200/recheck/): equal memory, CUDA within 15% of Triton either way, GPU tests pass
#     (final/), so the path that needs no build stays first.
#   paged_decode: torch (gather + SDPA). The Triton kernel was 0.81-0.86x the reference at batch 1,
#     0.82x at b32 MHA, 1.26x at b32 GQA 8:1, all ~0.14-0.25 ms: launch overhead, timed outside a CUDA
#     graph. The kernel now picks its split count from B, Hkv, context and SM count and combines splits
#     in one kernel (2 launches at most, was ~9); timed as CUDA-graph replays (recheck/, final/) it is
#     1.27-1.31x the reference at batch 1 and 1.18x at b32 MHA but 0.39x at b32 GQA 8:1, so the
#     reference stays automatic until the GQA case is fixed.
# Explicit backend= always wins.
AUTO_ORDER = {"projector": ("torch",), "scatter": ("cuda", "triton", "torch"),
              "masked_loss": ("triton", "cuda", "torch"), "paged_decode": ("torch",)}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_ops_available(op: str) -> bool:
    """True when the compiled csrc/ extension is loaded and registers ``op``."""
    try:
        from llava_kernels import _cuda
    except ImportError:
        return False
    return _cuda.available(op)


def cpu_ops_available() -> bool:
    """True when our CPU ops (llava_kernels/cpu/*.cpp) are built and loaded (builds them on first call)."""
    from llava_kernels import _cpu
    return _cpu.available()


def cpu_ops_error() -> str | None:
    from llava_kernels import _cpu
    return _cpu.load_error()


def _requested(op: str, backend: str | None) -> str:
    choice = backend or os.environ.get(f"LLAVA_KERNEL_BACKEND_{op.upper()}") or os.environ.get(
        "LLAVA_KERNEL_BACKEND") or "auto"
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"unknown kernel backend {choice!r} for op {op!r}; expected one of "
                         f"{BACKENDS + ('auto',)}")
    return choice


def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    Raises ValueError when an explicitly requested backend cannot run there (e.g. ``cuda``
    for CPU tensors, or ``triton`` on the CPU without the interpreter).
    """
    assert op in OPS, op
    choice = _requested(op, backend)
    on_gpu = device.type == "cuda"
    if choice == "auto":
        if not on_gpu:
            return "cpu" if device.type == "cpu" and op in CPU_OPS and cpu_ops_available() else "torch"
        for name in AUTO_ORDER[op]:
            if name == "torch" or (name == "cuda" and cuda_ops_available(op)) or (
                    name == "triton" and triton_available()):
                return name
    if choice == "cuda" and not (on_gpu and cuda_ops_available(op)):
        why = "tensors are not on a CUDA device" if not on_gpu else "the csrc extension is not built"
        raise ValueError(f"backend 'cuda' requested for {op} but {why}")
    if choice == "cpu" and not (device.type == "cpu" and op in CPU_OPS and cpu_ops_available()):
        why = ("tensors are not on the CPU" if device.type != "cpu" else f"{op} has no CPU kernel"
               if op not in CPU_OPS else f"the CPU ops are not built: {cpu_ops_error()}")
        raise ValueError(f"backend 'cpu' requested for {op} but {why}")
    if choice == "triton" and not (triton_available() and (on_gpu or triton_interpreting())):
        raise ValueError(f"backend 'triton' requested for {op} on {device} but Triton cannot run there "
                         "(set TRITON_INTERPRET=1 to run kernels on the CPU interpreter)")
    return choice


def describe(device: torch.device, backend: str | None = None) -> dict[str, str]:
    """The backend each op would use on ``device``: for logging the effective config."""
    return {op: resolve(op, device, backend) for op in OPS}
