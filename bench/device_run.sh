#!/usr/bin/env bash
# One prepared GPU run: build the CUDA ops, run the GPU tests, run the GPU benchmarks, leave JSON
# and logs in $OUT. At most 8 files come back from the device tool; this writes exactly 8:
# device_run.log (the build's output included), gpu_tests.xml, and generate / masked_loss /
# paged_decode / projector / scatter / train_step .json. The benchmarks' Python paths are checked
# on the CPU first (tests/test_bench_smoke.py, BENCH_SMOKE=1), so this run should meet no Python
# error. Budget: under ~7.5 minutes on one H100 (each step has its own timeout, and each
# test a per-test timeout when pytest-timeout is installed, so a hang cannot eat the whole lease):
#   configure + build of csrc/ (3 .cu + bindings.cpp, -j16)         ~1-1.5 min  (cap 60 + 150 s)
#   pytest -m gpu tests/ (Triton autotune compiles dominate: the
#     projector's ~140 s serial; spread over 4 xdist workers)         ~1.5-2.5 min (cap 200 s)
#   pytest -m gpu bench/ (7B-shaped generate ~60-90 s plus ~20-30 s for
#     its decode-b1 int4 row (engine.quantize: a quantized copy of the
#     same weights, a row of generate.json, no ninth file), 1B train
#     step ~45 s, 7B QLoRA step peak memory (bench_train.py, into
#     train_step.json; not yet run: estimate ~40 s), masked loss
#     ~30 s, scatter ~25 s, projector ~20 s, paged decode ~10 s),
#     in priority order                                               ~3.5-4.5 min (cap 240 s, ends by 560 s)
#
#   run on the device machine from the repository root, carrying .whl (liger-kernel):
#     bash bench/device_run.sh
# Copy $OUT/*.json into bench/results/<device>/ afterwards, with the commit it measured.
set -uo pipefail
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"          # absolute: the benchmark step runs from bench/
exec > >(tee "$OUT/device_run.log") 2>&1
# The device tool copies the working tree, and its .git may be stale (the 2026-12-04 re-check reported the
# previous HEAD): pass BENCH_COMMIT=$(git rev-parse --short HEAD) from here in the command.
export PYTHONUNBUFFERED=1 BENCH_OUT="$OUT" BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
T0=$SECONDS
stamp() { echo "== [$((SECONDS - T0)) s] $*"; }

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"

stamp "optional peers (liger-kernel) from .whl/"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

# Optional pytest plugins of the device image: parallel GPU tests (Triton compiles run on the CPU, so
# 4 workers overlap them) and a per-test timeout. Each is used only when importable.
XDIST=(); PER_TEST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 4)
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=170)

stamp "build the CUDA ops"
# Build output goes into device_run.log (the -Xptxas -v register/spill report with it): a separate
# file would be a ninth, and only 8 come back.
timeout 60 cmake -S . -B build -G Ninja -DPython3_EXECUTABLE="$(command -v python3)" \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" 2>&1 && \
  timeout 150 cmake --build build -j 16 2>&1
echo "build exit: $?"
python3 -c "from llava_kernels import dispatch; print({op: dispatch.cuda_ops_available(op) for op in dispatch.OPS})"

stamp "GPU tests"
timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --tb=short -rfEs ${XDIST[@]+"${XDIST[@]}"} \
  ${PER_TEST[@]+"${PER_TEST[@]}"} --junitxml="$OUT/gpu_tests.xml"
echo "GPU tests exit: $?"

# Files in priority order (pytest keeps the command line's order), the never-measured first: the 1B
# training step (#4), the 7B generation runtime (#5), the paged decode kernel, the masked loss, the
# scatter, then the projector (measured before). Each case saves its rows as it ends, so if the
# timeout cuts the run short, what finished is kept and only the lowest priorities are lost. The
# timeout is 240 s, or less so the script ends by 560 s.
stamp "GPU benchmarks"
BENCH_S=$(( T0 + 560 - SECONDS )); [ "$BENCH_S" -gt 240 ] && BENCH_S=240
(cd bench && timeout "$BENCH_S" python3 -m pytest -q -m gpu bench_train.py bench_generate.py bench_paged_decode.py \
  bench_masked_loss.py bench_scatter.py bench_projector.py --benchmark-only -p no:cacheprovider --tb=short -rfEs \
  --benchmark-columns=min,median,max,rounds ${PER_TEST[@]+"${PER_TEST[@]}"})
echo "GPU benchmarks exit: $? (timeout ${BENCH_S} s)"
stamp "done"
ls -la "$OUT"
