#!/usr/bin/env bash
# Runs the emulated CUDA test program once per thread order given and fails
# on a failing run, on any "CUCPU ERROR" on stderr, or when the printed
# results (the last line holds a digest of every kernel output) differ
# between orders: a kernel whose output depends on the order has a race.
#   run_cucpu.sh PROGRAM ORDER...
set -uo pipefail
prog="$1"
shift
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
status=0
first=""
for order in "$@"; do
  tag="${order//:/_}"
  start=$SECONDS
  CUCPU_ORDER="$order" ASAN_OPTIONS=detect_leaks=1 OMP_NUM_THREADS=2 \
    LSAN_OPTIONS="suppressions=$(dirname "$0")/lsan_cucpu.supp" \
    "$prog" > "$dir/$tag.out" 2> "$dir/$tag.err"
  rc=$?
  echo "order $order: exit $rc, $((SECONDS - start)) s: $(tail -n 2 "$dir/$tag.out" | tr '\n' ' ')"
  if [ "$rc" -ne 0 ]; then
    tail -n 30 "$dir/$tag.err"
    status=1
  fi
  if grep -q "CUCPU ERROR" "$dir/$tag.err"; then
    grep -m 10 "CUCPU ERROR" "$dir/$tag.err"
    status=1
  fi
  if [ -z "$first" ]; then
    first="$tag"
  elif ! cmp -s "$dir/$first.out" "$dir/$tag.out"; then
    echo "output differs between orders ${first} and ${tag}:"
    diff "$dir/$first.out" "$dir/$tag.out" | head -20
    status=1
  fi
done
exit $status
