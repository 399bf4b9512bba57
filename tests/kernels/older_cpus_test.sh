#!/usr/bin/env bash
# The portable build on older x86-64 CPUs: the kernel equivalence test run
# under QEMU's user-mode emulation of a baseline x86-64 (qemu64: SSE2 only)
# and of Haswell (AVX2 + FMA, no AVX-512). The dispatcher must pick the
# scalar and the AVX2 level there, and every test must pass without an
# illegal instruction.
#
#   tests/kernels/older_cpus_test.sh build/tests/kernels/kernels_test
#
# OpenBLAS (used by the batched step) picks its own kernels from the CPU's
# family and model, which QEMU's qemu64 model reports inconsistently with
# its feature bits (OpenBLAS takes it for a Haswell-class AMD part and runs
# AVX2 code); OPENBLAS_CORETYPE=Prescott sets it to an SSE3 kernel for that
# run. Engram's own dispatch reads the feature bits and needs no such help.
set -euo pipefail
bin=$1
qemu=$(command -v qemu-x86_64 || true)
if [[ -z "$qemu" ]]; then
  echo "qemu-x86_64 not found (Debian package qemu-user, installed by scripts/setup.sh)" >&2
  exit 1
fi
status=0
for spec in "qemu64 scalar Prescott" "Haswell avx2 Haswell"; do
  read -r cpu want coretype <<<"$spec"
  out=$(OPENBLAS_CORETYPE=$coretype "$qemu" -cpu "$cpu" "$bin" 2>&1) || {
    echo "$out" | tail -20
    echo "FAIL: kernels_test under -cpu $cpu exited with an error" >&2
    status=1
    continue
  }
  if ! grep -q "detected SIMD level: $want\$" <<<"$out"; then
    echo "FAIL: -cpu $cpu: expected level $want, got: $(grep 'detected SIMD level' <<<"$out")" >&2
    status=1
  elif ! grep -q "\[  PASSED  \]" <<<"$out" || grep -q "\[  FAILED  \]" <<<"$out"; then
    echo "$out" | grep -E "FAILED|Failure" | head -20
    echo "FAIL: -cpu $cpu: tests failed" >&2
    status=1
  else
    echo "ok: -cpu $cpu -> $want, $(grep -o '\[  PASSED  \] [0-9]* tests' <<<"$out")"
  fi
done
exit $status
