#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test; exits non-zero on
# any failure. CI runs exactly this (.ci/run).
#
# Stage 1: the release build, every ctest label (unit, stress, integration).
# Stage 2: the same tests built with AddressSanitizer + UBSan in build-asan
#          (skip with ENGRAM_SKIP_SANITIZERS=1).
# Extra arguments go to both ctest runs (e.g. -L unit).
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
  (cd build-asan && ctest --output-on-failure --timeout 1800 -j2 -LE docker "$@")
fi
