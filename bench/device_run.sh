#!/usr/bin/env bash
# One prepared GPU run: build the CUDA ops, run the GPU tests, run the GPU benchmarks, leave JSON
# and logs in $OUT (at most 8 files come back from the device tool). Budget: well under 8 minutes
# on one H100 (each step has its own timeout so a hang cannot eat the whole lease).
#
#   run on the device machine from the repository root, carrying .whl (liger-kernel, nvtx):
#     bash bench/device_run.sh
# Copy $OUT/*.json into bench/results/<device>/ afterwards, with the commit it measured.
set -uo pipefail
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_run.log") 2>&1
export PYTHONUNBUFFERED=1 BENCH_OUT="$OUT" BENCH_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"

echo "== optional peers (liger-kernel, nvtx) from .whl/"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

echo "== build the CUDA ops"
timeout 240 cmake -S . -B build -G Ninja -DPython3_EXECUTABLE="$(command -v python3)" \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" >"$OUT/build.log" 2>&1 && \
  timeout 240 cmake --build build -j 16 >>"$OUT/build.log" 2>&1
echo "build exit: $?"; tail -5 "$OUT/build.log"

echo "== GPU tests"
timeout 240 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40

echo "== GPU benchmarks"
(cd bench && timeout 300 python3 -m pytest -q -m gpu . --benchmark-only -p no:cacheprovider 2>&1 | grep -E "^\[|passed|failed|error" )
ls -la "$OUT"
