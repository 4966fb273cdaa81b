"""Our CPU ops (``llava_kernels/cpu/*.cpp``) as ``torch.ops.llava_cpu.*``: built on first use, loaded once.

``torch.utils.cpp_extension.load`` compiles the sources with g++ and ninja (-O3 -mavx2 -mfma, and
-ffp-contract=off: an FMA only where a kernel writes one), ~10 s once per machine: torch caches the build
under ``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``) and rebuilds when a source
changes. Where they cannot be built or run (no compiler or ninja, a CPU without AVX2,
``LLAVA_CPU_NATIVE=0``) ``available()`` is False, ``load_error()`` says why, and each caller keeps its
torch path (the op files say which).

The ops: ``small_gemm`` and ``small_gemm_int8`` (decode GEMMs, fp32 and weight-only int8 weights,
``engine.linear``), ``rms_norm`` (``engine.model.RMSNorm``),
``rope`` (``engine.model.apply_rope``), ``paged_decode`` (decode attention, ``llava_kernels.dispatch``'s
``cpu`` backend) and ``decode_layer`` (a whole decoder layer of a decode step from those four, called by
``engine.model.Decoder``; ``cpu/ops.h`` declares the four for it): fp32 inference only; training and other
dtypes keep torch.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).resolve().parent / "cpu").glob("*.cpp"))
ENV = "LLAVA_CPU_NATIVE"   # "0": never build or use them
OPS = ("small_gemm", "small_gemm_int8", "rms_norm", "paged_decode", "rope", "decode_layer")  # what they register


class _Loader:
    """Builds (torch caches the build) and loads the library once per process; remembers why it could not."""

    def __init__(self):
        self.error: str | None = None
        self._ok: bool | None = None
        self._lock = threading.Lock()

    def load(self) -> bool:
        if self._ok is not None:
            return self._ok
        with self._lock:
            if self._ok is None:
                self.error = self._why_not() or self._build()
                if self.error is None:
                    _register_fakes()
                self._ok = self.error is None
                if not self._ok and os.environ.get(ENV) != "0":
                    print(f"llava_kernels: the CPU ops are off ({self.error}); using torch's", file=sys.stderr)
        return self._ok

    @staticmethod
    def _registered() -> bool:
        return all(hasattr(torch.ops.llava_cpu, op) for op in OPS)

    def _why_not(self) -> str | None:
        if os.environ.get(ENV) == "0":
            return f"{ENV}=0"
        if self._registered():
            return None
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith(("AVX2", "AVX512")):
            return f"they need AVX2 and FMA; this CPU's capability is {capability}"
        if not SOURCES:
            return "their sources (llava_kernels/cpu/*.cpp) are missing"
        return None

    def _build(self) -> str | None:
        if self._registered():
            return None
        try:
            from torch.utils import cpp_extension
            cpp_extension.verify_ninja_availability()
            t0 = time.perf_counter()
            cpp_extension.load(name="llava_cpu_ops", sources=[str(s) for s in SOURCES], is_python_module=False,
                               extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"],
                               verbose=False)
            if time.perf_counter() - t0 > 2:   # a fresh build, not torch's cache: say where the pause went
                print(f"llava_kernels: built the CPU ops in {time.perf_counter() - t0:.0f} s (cached for later runs)",
                      file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - any build or load failure means "use torch's path"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"building {', '.join(s.name for s in SOURCES)} failed: {type(e).__name__}: {first}"
        missing = [op for op in OPS if not hasattr(torch.ops.llava_cpu, op)]
        return f"the built library did not register llava_cpu::{', '.join(missing)}" if missing else None


# ---- fake (meta) kernels: output shapes only, for FakeTensor / torch.compile / opcheck ------------------

def _small_gemm_fake(x, w, *_):
    return x.new_empty(x.shape[0], w.shape[0])


def _same_shape_fake(x, *_):  # rms_norm, rope, paged_decode (out like q), decode_layer (out like x)
    return torch.empty_like(x)


def _register_fakes() -> None:
    for op, fake in (("small_gemm", _small_gemm_fake), ("small_gemm_int8", _small_gemm_fake),
                     ("rms_norm", _same_shape_fake), ("rope", _same_shape_fake),
                     ("paged_decode", _same_shape_fake), ("decode_layer", _same_shape_fake)):
        name = f"llava_cpu::{op}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"):
            continue  # a second load in this process (the library's registrations are process-wide)
        torch.library.register_fake(name, fake)


_LOADER = _Loader()


def available() -> bool:
    """True when the ops are built and loaded (builds them on the first call); never raises."""
    try:
        return _LOADER.load()
    except Exception:  # noqa: BLE001 - available() must never raise
        return False


def load_error() -> str | None:
    """Why the ops are not available (None when they are, or before the first ``available()``)."""
    return _LOADER.error


def ops():
    if not _LOADER.load():
        raise RuntimeError(f"the llava CPU ops are not available: {_LOADER.error}")
    return torch.ops.llava_cpu
