#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test; exits non-zero on
# any failure. CI runs exactly this (.ci/run).
#
# Stage 1: the release build, every ctest label (unit, stress, integration,
#          docker, emulation: the kernel test on emulated older CPUs).
# Stage 2: the same tests built with AddressSanitizer + UBSan in build-asan
#          (skip with ENGRAM_SKIP_SANITIZERS=1).
# Stage 3: the concurrency stress tests (label stress) under ThreadSanitizer in
#          build-tsan (skipped with the sanitizers).
# Stage 4: libFuzzer over MemoryService, built with clang in build-fuzz: the
#          corpus and regression inputs replayed, then ENGRAM_FUZZ_SECONDS
#          (default 60) of fuzzing; any crash fails (ENGRAM_SKIP_FUZZ=1 skips).
# Extra arguments go to the release and ASan ctest runs (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
(cd build && ctest --output-on-failure --timeout 900 -j2 "$@")

if [[ "${ENGRAM_SKIP_SANITIZERS:-0}" != "1" ]]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DENGRAM_SANITIZER=address >/dev/null
  cmake --build build-asan
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp"
  (cd build-asan && ctest --output-on-failure --timeout 1800 -j2 -LE "docker|emulation" "$@")
fi

if [[ "${ENGRAM_SKIP_SANITIZERS:-0}" != "1" ]]; then
  echo "== ThreadSanitizer: concurrency stress tests"
  cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DENGRAM_SANITIZER=thread >/dev/null
  cmake --build build-tsan --target concurrency_test parallel_test kernels_test write_log_test \
    versions_test
  export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/sanitizers/tsan.supp"
  (cd build-tsan && ctest --output-on-failure --timeout 900 -L stress)
fi

if [[ "${ENGRAM_SKIP_FUZZ:-0}" != "1" ]]; then
  echo "== libFuzzer: MemoryService requests (clang, ASan + UBSan)"
  CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DENGRAM_FUZZ=ON >/dev/null
  cmake --build build-fuzz --target service_fuzz
  (cd build-fuzz && ctest --output-on-failure --timeout 300 -L fuzz)
  bash tests/fuzz/run_fuzz.sh build-fuzz "${ENGRAM_FUZZ_SECONDS:-60}"
fi
