"""One place that picks the implementation of each fused op.

Order for CUDA tensors: per op in ``AUTO_ORDER`` (the design order is ``cuda`` → ``triton`` →
``torch``; the table records where measurements, or their absence, say otherwise).
CPU tensors get the pure-torch reference unless ``triton`` is asked for explicitly and the
Triton interpreter is on (``TRITON_INTERPRET=1``), which is how the CPU tests run kernels.

Override, strongest first: the ``backend=`` argument of the public op; the environment
variable ``LLAVA_KERNEL_BACKEND_<OP>`` (e.g. ``LLAVA_KERNEL_BACKEND_MASKED_LOSS=triton``);
``LLAVA_KERNEL_BACKEND`` for every op. Values: ``torch``, ``triton``, ``cuda``, ``auto``.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
OPS = ("projector", "scatter", "masked_loss", "paged_decode")

# What ``auto`` tries on a GPU, per op, fastest measured first. The fused projector is correct
# but slower than two cuBLAS GEMMs on an H100 (0.21-0.83x fwd+bwd, bench/results/h100-dev/
# projector.json), so automatic dispatch keeps torch for it. The csrc/ ops have not been run on a
# GPU yet (compile-checked only), so Triton, measured correct and fast, comes first; move "cuda"
# ahead once bench/device_run.sh shows it passing and faster. The paged decode attention kernel
# (generation) has not been timed on a GPU either: the reference (gather + SDPA) stays automatic
# until bench/bench_paged_decode.py shows the kernel faster. Explicit backend= always wins.
AUTO_ORDER = {"projector": ("torch",), "scatter": ("triton", "cuda", "torch"),
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
            return "torch"
        for name in AUTO_ORDER[op]:
            if name == "torch" or (name == "cuda" and cuda_ops_available(op)) or (
                    name == "triton" and triton_available()):
                return name
    if choice == "cuda" and not (on_gpu and cuda_ops_available(op)):
        why = "tensors are not on a CUDA device" if not on_gpu else "the csrc extension is not built"
        raise ValueError(f"backend 'cuda' requested for {op} but {why}")
    if choice == "triton" and not (triton_available() and (on_gpu or triton_interpreting())):
        raise ValueError(f"backend 'triton' requested for {op} on {device} but Triton cannot run there "
                         "(set TRITON_INTERPRET=1 to run kernels on the CPU interpreter)")
    return choice


def describe(device: torch.device, backend: str | None = None) -> dict[str, str]:
    """The backend each op would use on ``device``: for logging the effective config."""
    return {op: resolve(op, device, backend) for op in OPS}
