"""The GPU benchmarks' own code, run on the CPU at tiny shapes (``BENCH_SMOKE=1``, bench/common.py).

A GPU machine is lent to this project rarely and briefly: a Python error in a benchmark's GPU path
(a wrong keyword, a shape mismatch, a field JSON cannot hold) must fail here, not there. Each test
runs the benchmarks in a subprocess, as bench/device_run.sh does, with results in a tmp dir.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

# suite → (rows written, implementations every case must have). liger and the csrc ops join when
# importable / built, so these are lower bounds on the implementations.
EXPECTED = {
    "masked_loss": ((3 + 1) * 2, {"torch", "triton"}),  # 3 target fractions + 1 AnyRes batch, × (torch, triton)
    "projector": (2 * 3 * 2, {"torch", "triton"}),      # 2 modes × 3 image counts × (torch, triton)
    "scatter": ((4 + 4 * 2) * 2, {"torch", "triton"}),  # (3 + 1 AnyRes) × (fwd + 2 bwd stages), × (torch, triton)
    # decode b1, b32, ttft, shared prefix, burst, behind long, AnyRes (ttft + whole generation)
    "generate": (2 + 2 + 2 + 3 + 3 + 3 + 4, {"hf", "ours"}),
    "train_step": (2 + 1, {"transformers", "ours"}),   # the 1B step (both); the 7B QLoRA memory case (ours)
    "paged_decode": (2 * 2, {"torch", "triton"}),      # b1, b32 × (torch, triton), one head layout
}


def _env(out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAVA_KERNEL_BACKEND", "PYTEST_"))}
    env.update(BENCH_SMOKE="1", BENCH_OUT=out, PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_gpu_benchmarks_smoke(tmp_path):
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark (the dev extra) runs the benchmarks")
    out = str(tmp_path / "smoke")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", ".", "--benchmark-only", "-q", "-p", "no:cacheprovider",
           "-rs", "--tb=short", "--benchmark-columns=median,rounds", f"--basetemp={tmp_path / 'basetemp'}"]
    proc = subprocess.run(cmd, cwd=BENCH, env=_env(out), capture_output=True, text=True, timeout=300)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    if importlib.util.find_spec("liger_kernel") is None:          # the peer row skips with its reason
        assert "liger-kernel is not importable" in proc.stdout, log

    assert sorted(os.listdir(out)) == sorted(f"{s}.json" for s in EXPECTED), os.listdir(out)
    for suite, (n_rows, impls) in EXPECTED.items():
        with open(os.path.join(out, f"{suite}.json")) as f:
            doc = json.load(f)
        rows = doc["rows"]
        assert doc["smoke"] is True and doc["env"]["smoke"] is True and "not measurements" in doc["note"]
        assert len(rows) >= n_rows, (suite, len(rows))
        assert all(r["smoke"] is True and r["suite"] == suite for r in rows), suite
        assert all(r["ms"] > 0 and r["peak_mem_mb"] is None for r in rows), suite
        by_case: dict[str, set] = {}
        for r in rows:
            by_case.setdefault(r["case"], set()).add(r["impl"])
        # a QLoRA case measures our memory alone: no other implementation trains that model
        assert all((impls & {"ours"} if "qlora" in case else impls) <= got for case, got in by_case.items()), \
            (suite, by_case)
        for r in rows:                                             # a ratio where there is a reference
            if r["ref_ms"] is not None:
                assert r["speedup_vs_ref"] > 0, (suite, r)


def test_smoke_refuses_a_device_results_folder(tmp_path):
    """Smoke rows are not measurements: they may not be written where device results live."""
    code = "import common"
    env = _env(os.path.join(BENCH, "results", "h100-dev"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "must not go to a device folder" in proc.stderr, proc.stderr
