"""What every benchmark reports: reference and ours side by side, the ratio, achieved
GB/s or TFLOP/s from a stated formula, peak memory, device and versions (CONVENTIONS.md, 9).

Results are appended to ``$BENCH_OUT/<suite>.json`` (default ``bench/results/local``), one
JSON document per suite, and printed as a table line.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch

OUT_DIR = os.environ.get("BENCH_OUT", os.path.join(os.path.dirname(__file__), "results", "local"))


def environment() -> dict:
    """Device name, library versions and commit: the provenance saved with every number."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit or os.environ.get("BENCH_COMMIT", ""),
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


@dataclass
class Row:
    """One measured case. ``work`` is bytes (unit GB/s) or FLOPs (unit TFLOP/s) per call."""
    suite: str
    case: str
    impl: str
    ms: float
    work: float = 0.0
    unit: str = "GB/s"
    formula: str = ""
    peak_mem_mb: float | None = None
    ref_ms: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        scale = 1e9 if self.unit == "GB/s" else 1e12
        return self.work / (self.ms * 1e-3) / scale if self.ms > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["rate"] = self.rate
        d["speedup_vs_ref"] = (self.ref_ms / self.ms) if self.ref_ms else None
        return d


def save(suite: str, rows: list[Row]) -> str:
    """Print the rows and merge them into the suite's JSON file; returns its path."""
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{suite}.json")
    doc = {"env": environment(), "rows": []}
    if os.path.exists(path):
        with open(path) as f:
            doc["rows"] = json.load(f).get("rows", [])
    for r in rows:
        ratio = f"{r.ref_ms / r.ms:5.2f}x" if r.ref_ms else "  ref "
        mem = f"{r.peak_mem_mb:9.1f} MB" if r.peak_mem_mb is not None else ""
        print(f"[{suite}] {r.case:<40} {r.impl:<10} {r.ms:9.3f} ms {ratio} {r.rate:9.1f} {r.unit} {mem}")
        doc["rows"].append(r.to_json())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def cuda_time_ms(fn, *, warmup: int = 5, rep: int = 20) -> float:
    """Median time of ``fn()`` in ms: CUDA events on GPU, a synchronous clock on CPU."""
    if torch.cuda.is_available():
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(max(1, warmup // 5)):
        fn()
    times = []
    for _ in range(max(3, rep // 5)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


@contextlib.contextmanager
def track_peak_memory():
    """``with track_peak_memory() as peak:`` → ``peak["mb"]``: peak CUDA memory allocated inside the
    block above what was allocated before it (None without CUDA). For timed calls that cannot be
    repeated just to measure memory."""
    peak = {"mb": None}
    if not torch.cuda.is_available():
        yield peak
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield peak
    torch.cuda.synchronize()
    peak["mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory_mb(fn) -> float | None:
    """Peak CUDA memory allocated during one ``fn()`` above what was allocated before."""
    with track_peak_memory() as peak:
        fn()
    return peak["mb"]


@functools.cache
def copy_bandwidth_gbps(device: str = "cuda", mib: int = 1024) -> float:
    """Achieved GB/s of copying ``mib`` MiB on ``device``, counting bytes read + written: the yardstick
    for memory-bound ops. CUDA: median of CUDA-event timings; CPU: the best of 5 wall-clock copies."""
    src = torch.ones(mib << 18, device=device)        # fp32: 4 bytes × 2**18 per MiB
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    if src.is_cuda:
        return nbytes / (cuda_time_ms(lambda: dst.copy_(src), warmup=10, rep=50) * 1e-3) / 1e9
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
