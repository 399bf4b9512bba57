#!/usr/bin/env bash
# The portable build on older x86-64 CPUs: the kernel equivalence test run
# under QEMU's user-mode emulation of a baseline x86-64 (qemu64: SSE2 only)
# and of Haswell (AVX2 + FMA, no AVX-512). The dispatcher must pick the
# scalar and the AVX2 level there, and the tests below must pass without an
# illegal instruction.
#
# The emulated runs take one representative of each code path: every kernel
# at every level the CPU has, the state loops, the bf16 and int8 screens, the
# fused pass on f32, bf16 and bit-packed rows (single and batched) and the
# continuous batch. The native run of the same binary covers every shape and
# family at every level the host has. Each run takes ~5 s here unloaded
# (about 10x the native time); the test's timeout leaves 20x room for a
# loaded machine.
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
shapes="Families/FusedTest.MatchesReferenceOnShapesThatSplitIntoBlocksAndThreads"
batched="Families/FusedTest.BatchedStepMatchesReferenceAtEveryBatchSize"
filter="KernelDispatch.*:Kernels.*:StateLoops.*:Bf16.*"
filter+=":Screen.RetrievalEqualsF32Retrieval:Screen.ErrorBound*"
filter+=":FusedPass.BipolarRetrieval*:FusedPass.ConvergedRetrieval*:FusedPass.LeavesOut*"
filter+=":SyncBatch.EqualsSequential*"
filter+=":$shapes/lse:$shapes/lse_bf16:$shapes/classical_bits:$shapes/gaussian"
filter+=":$batched/lse:$batched/classical_bits"
filter+="-Kernels.IntegerBitWeightedSumIsExactOverTheInt16Range"
qemu=$(command -v qemu-x86_64 || true)
if [[ -z "$qemu" ]]; then
  echo "qemu-x86_64 not found (Debian package qemu-user, installed by scripts/setup.sh)" >&2
  exit 1
fi
status=0
for spec in "qemu64 scalar Prescott" "Haswell avx2 Haswell"; do
  read -r cpu want coretype <<<"$spec"
  out=$(OPENBLAS_CORETYPE=$coretype "$qemu" -cpu "$cpu" "$bin" --gtest_filter="$filter" 2>&1) || {
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
