#!/usr/bin/env bash
# Compile-check the CUDA sources on a machine without a GPU (CI runs this).
#
#   scripts/check_cuda.sh            # every csrc/*.cu for sm_90a and sm_80, with ptxas resource reports
#
# Writes the full nvcc/ptxas output to $LLAVA_CHECK_LOG (default build/check_cuda.log), prints it, then a
# per-kernel table (registers, spills, shared memory). Also syntax-checks csrc/bindings.cpp against the
# installed torch headers when python can import torch (CPU wheels lack one generated c10/cuda header;
# an empty stand-in is supplied). Exits non-zero if any compile fails; skips (exit 0) without nvcc.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: nvcc not found (set NVCC or install the CUDA toolkit); skipping the CUDA compile check"
  exit 0
fi
PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
LOG="${LLAVA_CHECK_LOG:-$ROOT/build/check_cuda.log}"
mkdir -p "$(dirname "$LOG")"
: >"$LOG"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

ARCHS=("compute_90a,code=sm_90a" "compute_80,code=sm_80")
failed=()
{
  echo "# $("$NVCC" --version | tail -n 2 | head -n 1)"
  for arch in "${ARCHS[@]}"; do
    for src in "$ROOT"/csrc/*.cu; do
      name="$(basename "$src")"
      echo "== $name [$arch]"
      if ! "$NVCC" -std=c++17 -O3 -lineinfo -Xcompiler -Wall "-gencode=arch=$arch" -Xptxas -v \
          -c "$src" -o "$WORK/${name%.cu}.${arch##*=}.o" 2>&1; then
        echo "!! FAILED: $name [$arch]"
      fi
    done
  done
  if [[ -n "$PYTHON" ]] && TORCH_INC="$("$PYTHON" -c \
      'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)"; then
    echo "== bindings.cpp [syntax only, host compiler, torch headers]"
    mkdir -p "$WORK/shim/c10/cuda/impl"
    echo '#pragma once' >"$WORK/shim/c10/cuda/impl/cuda_cmake_macros.h"
    CUDA_INC=""
    for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
      if [[ -n "$d" && -f "$d/include/cuda_runtime.h" ]]; then CUDA_INC="$d/include"; break; fi
    done
    # shellcheck disable=SC2086  # TORCH_INC is a list of -I flags
    if [[ -z "$CUDA_INC" ]]; then
      echo "   skipped: cuda_runtime.h not found (set CUDA_HOME)"
    elif ! "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall $TORCH_INC -idirafter "$WORK/shim" -I"$CUDA_INC" \
        "$ROOT/csrc/bindings.cpp" 2>&1; then
      echo "!! FAILED: bindings.cpp [syntax]"
    fi
  else
    echo "== bindings.cpp: skipped (no python with torch)"
  fi
} >>"$LOG" 2>&1

cat "$LOG"
mapfile -t failed < <(grep '^!! FAILED' "$LOG")

echo
echo "== resources per kernel (regs / spill stores / spill loads / static smem bytes)"
awk '
  /Compiling entry function/ {
    name = $0; sub(/.*function ./, "", name); sub(/[^A-Za-z0-9_].*/, "", name)
    arch = $0; sub(/.* for ./, "", arch); sub(/[^a-z0-9_].*/, "", arch); st = 0; ld = 0
  }
  /bytes spill stores/ { st = $5; ld = $9 }
  /Used [0-9]+ registers/ {
    regs = $0; sub(/.*Used /, "", regs); sub(/ .*/, "", regs); smem = 0
    if ($0 ~ /bytes smem/) { t = $0; sub(/ bytes smem.*/, "", t); n = split(t, q, " "); smem = q[n] }
    printf "%-7s %4s %5s %5s %6s %s\n", arch, regs, st, ld, smem, name
  }' "$LOG" | (command -v c++filt >/dev/null && c++filt || cat) |
  sed -E 's/llava::\(anonymous namespace\)::|\(anonymous namespace\)::|llava::_GLOBAL__N_[^:]*:://g; s/\(.*$//' | sort -u

spills="$(awk '/bytes spill stores/ && ($5 > 0 || $9 > 0)' "$LOG" | wc -l)"
echo
if ((${#failed[@]})); then
  printf '%s\n' "${failed[@]}"
  echo "check_cuda: ${#failed[@]} compile(s) FAILED (log: $LOG)"
  exit 1
fi
echo "check_cuda: all csrc sources compiled for ${ARCHS[*]}; kernels with spills: $spills (log: $LOG)"
