#!/usr/bin/env bash
# Installs what is missing, builds, and runs engramd on the embedded default:
# gRPC on 127.0.0.1:50051, data in ./data, metrics on 127.0.0.1:9464, JSON over
# HTTP and the web page on 127.0.0.1:8080 (ENGRAM_HTTP_LISTEN= turns it off).
# Extra arguments go to engramd (e.g. --listen=0.0.0.0:50051).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
export ENGRAM_HTTP_LISTEN="${ENGRAM_HTTP_LISTEN-127.0.0.1:8080}"
exec build/server/engramd --data_dir="${ENGRAM_DATA_DIR:-$PWD/data}" "$@"
