#!/usr/bin/env bash
# shellcheck disable=SC2317,SC2329  # the steps are functions that `step` runs by name
# One command for a machine with an NVIDIA GPU (Hopper by default), nvcc and a CUDA build of
# torch, no network needed. It uses the python3 first on PATH as it is (a virtualenv made from
# it would not see that interpreter's packages when it is itself a virtualenv), which needs
# setuptools >= 77, and builds the package in place. Steps, the most valuable first:
#   machine            the GPU, driver, nvcc, torch (fails without nvidia-smi or a CUDA device)
#   build              the package with its CUDA kernels, and the CUDA-C test program beside it
#   CUDA-C test        tests/c/test_cuda.cu against the CPU kernels, run twice (digests match)
#   pytest -k cuda     the CUDA cases of the test suite
#   benchmark          benchmarks/gpu_bench.py (ours vs eager vs compiled, % of copy bandwidth)
#   compute-sanitizer  memcheck, racecheck and synccheck over the CUDA-C test
# Every step runs even when one before it failed (but nothing runs on a failed build), each
# under a time cap, and all of them within BUDGET seconds (default 300). Each step's log and
# results are in $OUT as soon as it ends (default benchmarks/results/gpu; at most 7 files:
# summary.txt, gpu_check.log, ctest.txt, pytest.txt, gpu_bench.json, gpu_bench.md,
# sanitizer.txt), so a run that is cut off still returns what ran. Exit status 1 if any failed.
#
#   bash benchmarks/gpu_check.sh              # about 3 to 5 minutes on an H100
#   ARCH=8.0 bash benchmarks/gpu_check.sh     # another GPU (TORCH_CUDA_ARCH_LIST form)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export OUT="${OUT:-benchmarks/results/gpu}" ARCH="${ARCH:-9.0}"
BUDGET="${BUDGET:-300}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/summary.txt"
failed=0
export CTEST=/tmp/mcmi-ctest
# The package is built in place, in this tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The CUDA toolkit's root, as nvcc itself reports it (the nvcc on PATH may be a wrapper script
# or a link outside the toolkit, from which torch would guess a wrong CUDA_HOME).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
  echo > /tmp/mcmi-top.cu
  CUDA_HOME="$(nvcc --dryrun -c /tmp/mcmi-top.cu -o /tmp/mcmi-top.o 2>&1 | sed -n 's/^#\$ TOP=//p')"
  [ -n "$CUDA_HOME" ] && CUDA_HOME="$(readlink -f "$CUDA_HOME")" && export CUDA_HOME
fi

# step NAME CAP FUNCTION: runs FUNCTION for at most CAP seconds (less if the budget has less
# left), its output to the log, and records the outcome in the summary.
step() {
  local name="$1" cap="$2" fn="$3" start=$SECONDS rc left=$((BUDGET - SECONDS))
  [ "$cap" -le "$left" ] || cap="$left"
  if [ "$cap" -lt 10 ]; then
    echo "$name: not run (the ${BUDGET} s budget is spent)" | tee -a "$OUT/summary.txt" "$LOG"
    failed=1
    return 1
  fi
  echo "== $name (at most $cap s)" | tee -a "$LOG"
  timeout -k 5 "$cap" bash -o pipefail -c "$fn" >> "$LOG" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "(timed out after $cap s)" >> "$LOG"
  echo "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED ($rc)"), $((SECONDS - start)) s" |
    tee -a "$OUT/summary.txt" "$LOG"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

machine() {
  local rc=0
  if command -v nvidia-smi > /dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || rc=1
  else
    echo "nvidia-smi not found: no NVIDIA driver on this machine"
    rc=1
  fi
  nvcc --version | tail -n 2 || rc=1
  echo "CUDA_HOME=${CUDA_HOME:-} python3=$(command -v python3)"
  python3 -c 'import sys, setuptools, torch
print(sys.version.split()[0], "setuptools", setuptools.__version__, "torch", torch.__version__,
      "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())' || rc=1
  return "$rc"
}

build() {
  local sm="${ARCH/./}" ctest_pid rc=0
  python3 - << 'PY' || return 1
import setuptools
major = int(setuptools.__version__.split(".")[0])
assert major >= 77, f"setuptools {setuptools.__version__} is too old for pyproject.toml (>= 77)"
PY
  make -s -C tests/c cuda-build BUILD="$CTEST" NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" \
    CUDA_ARCH="-gencode arch=compute_$sm,code=sm_$sm" > "$CTEST.build.log" 2>&1 &
  ctest_pid=$!
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" python3 setup.py -q build_ext --inplace || rc=1
  wait "$ctest_pid" || { echo "the CUDA-C test program did not build:"; rc=1; }
  cat "$CTEST.build.log"
  [ "$rc" -eq 0 ] || return 1
  python3 -c 'import mcmi_torch; assert mcmi_torch._cuda.CUDA_KERNELS, "CUDA kernels not loaded"'
}

ctest() {
  "$CTEST/test_cuda" > "$OUT/ctest.txt" 2>&1 || { tail -n 20 "$OUT/ctest.txt"; return 1; }
  "$CTEST/test_cuda" > "$CTEST/again.txt" 2>&1 || return 1
  tail -n 2 "$OUT/ctest.txt"
  diff <(tail -n 1 "$OUT/ctest.txt") <(tail -n 1 "$CTEST/again.txt")
}

pytests() {
  python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"' || return 1
  python3 -m pytest -q -rs -p no:cacheprovider tests -k cuda 2>&1 | tee "$OUT/pytest.txt" |
    tail -n 30
}

bench() {
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_bench.py --out "$OUT"
}

sanitizer() {
  local tool rc=0 sanitizer=compute-sanitizer
  command -v "$sanitizer" > /dev/null || sanitizer="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
  : > "$OUT/sanitizer.txt"
  for tool in memcheck racecheck synccheck; do
    echo "-- compute-sanitizer --tool $tool" | tee -a "$OUT/sanitizer.txt"
    "$sanitizer" --tool "$tool" --error-exitcode 3 "$CTEST/test_cuda" > "$CTEST/$tool.txt" 2>&1 ||
      rc=1
    tail -n 5 "$CTEST/$tool.txt" | tee -a "$OUT/sanitizer.txt"
  done
  return "$rc"
}
export -f machine build ctest pytests bench sanitizer

step machine 30 machine
if step build 150 build; then
  step "CUDA-C test" 60 ctest
  step "pytest -k cuda (the CUDA cases of the suite)" 120 pytests
  step benchmark 120 bench
  step compute-sanitizer 150 sanitizer
fi
cat "$OUT/summary.txt"
exit "$failed"
