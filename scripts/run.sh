#!/usr/bin/env bash
# Installs what is missing, builds, and runs engramd on the embedded default:
# gRPC on 127.0.0.1:50051, data in ./data, metrics on 127.0.0.1:9464.
# Extra arguments go to engramd (e.g. --listen=0.0.0.0:50051).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
exec build/server/engramd --data_dir="${ENGRAM_DATA_DIR:-$PWD/data}" "$@"
