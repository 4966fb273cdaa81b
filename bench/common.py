"""What every benchmark reports: reference and ours side by side, the ratio, achieved
GB/s or TFLOP/s from a stated formula, peak memory, device and versions (CONVENTIONS.md, 9).

Results are appended to ``$BENCH_OUT/<suite>.json`` (default ``bench/results/local``), one
JSON document per suite, and printed as a table line.

Smoke mode (``BENCH_SMOKE=1``): every GPU benchmark runs its own code on the CPU at tiny shapes
(``pick(real, smoke)``), Triton kernels on the interpreter, so a Python error in a rarely run GPU
path shows up here and in CI rather than in a scarce GPU run. The CUDA-only calls are swapped here:
``bench_device``, ``sync``, ``cuda_time_ms`` (one timed call), the peak-memory helpers (None); the
only other smoke branches are bench_train's GPU-size check and bench_projector's round count.
Smoke results go to ``$BENCH_OUT`` (default ``bench/results/local/smoke``, never a device folder
of ``bench/results``), marked ``"smoke": true`` in the document and every row: they are not
measurements.
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

SMOKE = os.environ.get("BENCH_SMOKE", "0") not in ("", "0")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUT_DIR = os.path.abspath(os.environ.get("BENCH_OUT") or os.path.join(RESULTS, "local", *(["smoke"] if SMOKE else [])))
SMOKE_NOTE = ("BENCH_SMOKE=1: the GPU benchmarks' code run on the CPU at tiny shapes, Triton on its interpreter; "
              "times and rates are not measurements, peak memory is None (no CUDA)")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _smoke_setup() -> None:
    """Smoke mode's process-wide settings; runs when conftest.py imports this module, before the suites."""
    if _inside(OUT_DIR, RESULTS) and not _inside(OUT_DIR, os.path.join(RESULTS, "local")):
        raise ValueError(f"BENCH_SMOKE=1 with BENCH_OUT={OUT_DIR}: smoke results must not go to a device folder "
                         f"of {RESULTS}; use {os.path.join(RESULTS, 'local', 'smoke')} or a tmp dir")
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function exists (tests/conftest.py does the same)
    # The kernels that automatic dispatch picks on a GPU without the csrc/ extension
    # (llava_kernels.dispatch.AUTO_ORDER), so the training step and the runtime run them here too (auto
    # gives torch for CPU tensors).
    from llava_kernels.dispatch import AUTO_ORDER
    for op, order in AUTO_ORDER.items():
        os.environ.setdefault(f"LLAVA_KERNEL_BACKEND_{op.upper()}", next(b for b in order if b != "cuda"))


if SMOKE:
    _smoke_setup()


def pick(real, smoke):
    """``real`` for a measurement, ``smoke`` (tiny shapes, one round) under BENCH_SMOKE=1."""
    return smoke if SMOKE else real


# LLaVA-1.6 (NeXT) AnyRes at its 336-px tower (24×24 patches a tile) with its grid pinpoints, and image sizes
# whose row counts are what such a model's packed batches hold (672×672 → 2,928 rows, HF LlavaNext's count;
# 480×640 → 2,340; 336×1008 → 2,328). Smoke: a 28-px tower of 2×2 patches, rows 14..24.
ANYRES_TILE, ANYRES_SIDE, ANYRES_PINPOINTS = pick(
    (336, 24, ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))), (28, 2, ((28, 56), (56, 28), (56, 56))))
ANYRES_SIZES = pick(((672, 672), (480, 640), (336, 1008), (1024, 768), (500, 375)), ((56, 56), (30, 70), (70, 30)))


def anyres_rows(height: int, width: int) -> int:
    """Text rows of one AnyRes image of this original size (engine.anyres: base tile, unpadded grid, newlines)."""
    from engine.anyres import num_rows

    return num_rows(height, width, ANYRES_PINPOINTS, ANYRES_TILE, ANYRES_SIDE)


def bench_device() -> str:
    """Where the GPU benchmarks run: ``cuda``, or ``cpu`` in smoke mode."""
    return pick("cuda", "cpu")


def _on_cuda() -> bool:
    return torch.cuda.is_available() and not SMOKE


def sync() -> None:
    """``torch.cuda.synchronize()``; nothing in smoke mode (CPU ops are synchronous)."""
    if _on_cuda():
        torch.cuda.synchronize()


def max_memory_mb() -> float | None:
    """``torch.cuda.max_memory_allocated()`` in MiB since the last reset; None without CUDA (smoke)."""
    return torch.cuda.max_memory_allocated() / 2**20 if _on_cuda() else None


def environment() -> dict:
    """Device name, library versions and commit: the provenance saved with every number."""
    import triton

    # BENCH_COMMIT first: the device tool's copy of the tree can carry a stale .git (2026-12-04).
    commit = os.environ.get("BENCH_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__)).stdout.strip()
        except OSError:
            commit = ""
    info = {
        "device": torch.cuda.get_device_name() if _on_cuda() else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit,
        "smoke": SMOKE,
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
    if SMOKE:
        doc.update(smoke=True, note=SMOKE_NOTE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if bool(old.get("smoke")) != SMOKE:  # smoke rows and measurements never share a file
            raise ValueError(f"{path} holds {'smoke' if old.get('smoke') else 'measured'} rows; this run is "
                             f"{'smoke' if SMOKE else 'measured'}: use another BENCH_OUT")
        doc["rows"] = old.get("rows", [])
    tag = f"{suite} SMOKE" if SMOKE else suite
    for r in rows:
        ratio = f"{r.ref_ms / r.ms:5.2f}x" if r.ref_ms else "  ref "
        mem = f"{r.peak_mem_mb:9.1f} MB" if r.peak_mem_mb is not None else ""
        print(f"[{tag}] {r.case:<40} {r.impl:<10} {r.ms:9.3f} ms {ratio} {r.rate:9.1f} {r.unit} {mem}")
        doc["rows"].append({**r.to_json(), "smoke": True} if SMOKE else r.to_json())
    text = json.dumps(doc, indent=1)  # before any file is touched: a field JSON cannot hold fails here
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def cuda_time_ms(fn, *, warmup: int = 5, rep: int = 20) -> float:
    """Median time of ``fn()`` in ms: CUDA events on GPU, a synchronous clock on CPU; in smoke mode the
    wall time of a single call (no warm-up)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
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
    if not _on_cuda():
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
    return nbytes / _best_seconds(lambda: dst.copy_(src)) / 1e9


def _best_seconds(fn, n: int = 5) -> float:
    """The shortest of ``n`` wall-clock runs of ``fn`` (CPU)."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth_gbps(mib: int = 256) -> float:
    """Achieved GB/s of reading ``mib`` MiB once on the CPU (``sum``, best of 5): the yardstick of a read-only
    op such as a decode step's weight stream, beside ``copy_bandwidth_gbps`` (on the 2-core development machine
    the two differed by -4% to +17% within a run)."""
    src = torch.ones(mib << 18)
    return src.numel() * src.element_size() / _best_seconds(src.sum) / 1e9


def measure_memory_bound(benchmark, suite: str, case: str, fns: dict, work: float, formula: str, extra: dict,
                         copy_mib: int) -> None:
    """Time each implementation of a memory-bound op (``fns``: name -> call, "torch" first as the
    reference), save one row each with GB/s and its fraction of the device's copy bandwidth, then
    hand the "triton" call to pytest-benchmark."""
    copy_bw = copy_bandwidth_gbps(bench_device(), copy_mib)
    rows, ref_ms = [], None
    for name, fn in fns.items():
        ms = cuda_time_ms(fn, warmup=10, rep=50)
        row = Row(suite=suite, case=case, impl=name, ms=ms, work=work, formula=formula,
                  peak_mem_mb=peak_memory_mb(fn), ref_ms=ref_ms, extra=dict(extra))
        row.extra.update(copy_GBps=copy_bw, fraction_of_copy=row.rate / copy_bw)
        ref_ms = ms if name == "torch" else ref_ms
        rows.append(row)
    save(suite, rows)
    timed = fns["triton"]
    benchmark.pedantic(lambda: (timed(), sync()), rounds=pick(20, 1), warmup_rounds=pick(3, 0))
