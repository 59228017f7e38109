#!/usr/bin/env bash
# shellcheck disable=SC2329  # the steps are functions that `step` calls by name
# One command for a machine with an NVIDIA GPU (Hopper by default), nvcc and a CUDA build of
# torch, no network needed: builds the package with its CUDA kernels into a virtualenv that
# sees the system's torch, runs the CUDA-C test program (twice: the result digests must
# match) and under compute-sanitizer, the CUDA tests of the suite, and the GPU benchmark
# (benchmarks/gpu_bench.py: ours vs eager vs compiled, % of copy bandwidth, CUDA graphs).
# Every step runs even when one before it failed; logs and results go to $OUT (default
# benchmarks/results/gpu), a summary to $OUT/summary.txt; the exit status is 1 if any failed.
#
#   bash benchmarks/gpu_check.sh              # about 6 to 9 minutes on an H100
#   ARCH=8.0 bash benchmarks/gpu_check.sh     # another GPU (TORCH_CUDA_ARCH_LIST form)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/results/gpu}"
ARCH="${ARCH:-9.0}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/summary.txt"
failed=0

# step NAME COMMAND...: runs COMMAND, its output to the log, and records the outcome.
step() {
  local name="$1" start=$SECONDS rc
  shift
  echo "== $name" | tee -a "$LOG"
  "$@" >> "$LOG" 2>&1
  rc=$?
  echo "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED ($rc)"), $((SECONDS - start)) s" |
    tee -a "$OUT/summary.txt" "$LOG"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -n 2
  python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())'
}

build() {
  local venv=/tmp/mcmi-gpu-venv
  python3 -m venv --system-site-packages "$venv" || return 1
  # shellcheck disable=SC1091
  . "$venv/bin/activate" || return 1
  MAX_JOBS="$(nproc)"
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS
  pip install --no-build-isolation --no-deps --no-index -e . && return 0
  # pip cannot build it (an older setuptools, say): build in place instead.
  python setup.py build_ext --inplace && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

ctest() {
  local sm="${ARCH/./}" bin=/tmp/mcmi-ctest/test_cuda
  make -s -C tests/c cuda-build BUILD=/tmp/mcmi-ctest \
    CUDA_ARCH="-gencode arch=compute_$sm,code=sm_$sm" || return 1
  "$bin" > "$OUT/ctest.txt" 2>&1 || { cat "$OUT/ctest.txt"; return 1; }
  "$bin" > /tmp/mcmi-ctest/again.txt 2>&1 || return 1
  tail -n 2 "$OUT/ctest.txt"
  diff <(tail -n 1 "$OUT/ctest.txt") <(tail -n 1 /tmp/mcmi-ctest/again.txt)
}

sanitizer() {
  local tool rc=0
  for tool in memcheck racecheck synccheck; do
    echo "-- compute-sanitizer --tool $tool"
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 3 /tmp/mcmi-ctest/test_cuda |
      tail -n 5 || rc=1
  done
  return "$rc"
}

pytests() {
  python -m pytest -q -rs tests -k cuda 2>&1 | tee "$OUT/pytest.txt" | tail -n 30
}

bench() {
  PYTHONUNBUFFERED=1 python benchmarks/gpu_bench.py --out "$OUT"
}

step machine machine
if step build build; then
  step "CUDA-C test" ctest && step compute-sanitizer sanitizer
  step "pytest -k cuda (the CUDA cases of the suite)" pytests
  step benchmark bench
fi
cat "$OUT/summary.txt"
exit "$failed"
