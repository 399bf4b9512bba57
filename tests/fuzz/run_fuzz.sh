#!/usr/bin/env bash
# Fuzzes MemoryService for a bounded time; exits non-zero on any crash,
# sanitizer report, timeout or out-of-memory.
#
#   bash tests/fuzz/run_fuzz.sh <build-dir> <seconds> [extra libFuzzer flags]
#
# New inputs go to <build-dir>/fuzz-corpus (the committed seeds in
# tests/fuzz/corpus stay as they are); a crashing input is written to
# <build-dir>/fuzz-artifacts/ — copy it to tests/fuzz/regressions/ under a
# name that says what broke once the bug is fixed.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=$1
seconds=$2
shift 2
mkdir -p "$build/fuzz-corpus" "$build/fuzz-artifacts"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
"$build/tests/fuzz/service_fuzz" "$build/fuzz-corpus" tests/fuzz/corpus tests/fuzz/regressions \
  -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
  -artifact_prefix="$build/fuzz-artifacts/" "$@"
