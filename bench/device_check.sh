#!/usr/bin/env bash
# Re-checks on one GPU what the 2026-12-04 H200 run flagged: masked-loss precision and memory, CUDA ops, paged decode, dispatch, scatter.
#
# Short follow-up to bench/device_run.sh (same OUT handling, liger wheel from .whl/, PYTHONPATH, CMake
# build): builds csrc/, runs only the affected GPU tests and benchmarks, and ENDS WITHIN 240 s (every step
# has a `timeout` cut to what is left of the budget). Writes 5 plain files into $OUT: device_check.log (the
# build's output included), gpu_tests.xml, masked_loss.json, paged_decode.json, scatter.json.
#   configure + build of csrc/ (fresh machine: ~35 s)                       cap 75 s
#   pytest -m gpu: test_kernel_masked_loss, test_cuda_ops,
#     test_kernel_paged_decode, test_dispatch (4 xdist workers if present)  cap 95 s
#   benchmarks: bench_masked_loss (T=4096 and 16384 only), bench_paged_decode
#     (CUDA-graph replays), bench_scatter, in that order                    the rest, ends by 235 s
#
#   run on the device machine from the repository root, carrying .whl (liger-kernel):
#     bash bench/device_check.sh
set -uo pipefail
OUT="${OUT:-bench/results/device_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"          # absolute: the benchmark step runs from bench/
exec > >(tee "$OUT/device_check.log") 2>&1
# The device tool copies the working tree, and its .git may be stale (the 2026-12-04 re-check reported the
# previous HEAD): pass BENCH_COMMIT=$(git rev-parse --short HEAD) from here in the command.
export PYTHONUNBUFFERED=1 BENCH_OUT="$OUT" BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
T0=$SECONDS
END=230                             # seconds after start by which every step has ended (+5 s kill grace)
stamp() { echo "== [$((SECONDS - T0)) s] $*"; }
# left CAP: the smaller of CAP and the seconds left before END (at least 1)
left() { local l=$(( T0 + END - SECONDS )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }

stamp "device (commit $BENCH_COMMIT)"
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

stamp "optional peers (liger-kernel) from .whl/"
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout -k 5 20 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

XDIST=(); PER_TEST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 4)
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=80)

stamp "build the CUDA ops"
timeout -k 5 "$(left 25)" cmake -S . -B build -G Ninja -DPython3_EXECUTABLE="$(command -v python3)" \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" 2>&1 && \
  timeout -k 5 "$(left 50)" cmake --build build -j 16 2>&1
echo "build exit: $?"
timeout -k 5 30 python3 -c "import torch, triton, transformers; from llava_kernels import dispatch; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, \
'cuda', torch.version.cuda); print('csrc ops:', {op: dispatch.cuda_ops_available(op) for op in dispatch.OPS}); \
print('auto:', dispatch.describe(torch.device('cuda')))"

stamp "GPU tests"
# CHECK_TESTS / CHECK_BENCH / CHECK_K replace the default selection (a later re-check of other files).
read -r -a TESTS <<< "${CHECK_TESTS:-tests/test_kernel_masked_loss.py tests/test_cuda_ops.py tests/test_kernel_paged_decode.py tests/test_dispatch.py}"
read -r -a BENCHES <<< "${CHECK_BENCH:-bench_masked_loss.py bench_paged_decode.py bench_scatter.py}"
timeout -k 5 "$(left 95)" python3 -m pytest -q -m gpu "${TESTS[@]}" -p no:cacheprovider --tb=short -rfEs \
  ${XDIST[@]+"${XDIST[@]}"} ${PER_TEST[@]+"${PER_TEST[@]}"} --junitxml="$OUT/gpu_tests.xml"
echo "GPU tests exit: $?"

# Each case saves its JSON rows as it ends: if the timeout cuts this short, what finished is kept.
stamp "GPU benchmarks"
BENCH_S=$(left 240)
(cd bench && timeout -k 5 "$BENCH_S" python3 -m pytest -q -m gpu "${BENCHES[@]}" \
  -k "${CHECK_K:-not T8192}" --benchmark-only -p no:cacheprovider --tb=short -rfEs \
  --benchmark-columns=min,median,max,rounds)
echo "GPU benchmarks exit: $? (timeout ${BENCH_S} s)"
stamp "done"
ls -la "$OUT"
