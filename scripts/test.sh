#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test; exits non-zero on
# any failure. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
cd build
ctest --output-on-failure --timeout 900 -j2 "$@"
