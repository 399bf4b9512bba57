#!/usr/bin/env bash
# Installs every Debian package Engram needs to build, test and run.
# Used by README.md, .ci/run and the Dockerfile, so they cannot drift apart.
#
#   scripts/setup.sh            # build + test dependencies (README, CI)
#   scripts/setup.sh --build    # only what compiling needs (the image's build stage)
#   scripts/setup.sh --runtime  # only what engramd needs at run time (the image)
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libabsl-dev libeigen3-dev prometheus-cpp-dev libsqlite3-dev zlib1g-dev libpng-dev
  libgtest-dev libgmock-dev libbenchmark-dev libopenblas-dev libcpp-httplib-dev libnats-dev
)
# Tests, benchmarks, fuzzing, the science suite, the container tests and the
# kernel test on emulated older CPUs (qemu-user).
TEST_PKGS=(
  python3 python3-grpcio python3-grpc-tools python3-numpy python3-protobuf python3-yaml
  python3-matplotlib python3-faiss dataset-fashion-mnist curl openssl
  python3-pytest python3-venv python3-pip python3-setuptools python3-wheel
  chromium chromium-driver
  clang libclang-rt-14-dev llvm
  docker.io docker-compose debootstrap qemu-user nats-server
)
RUNTIME_PKGS=(
  libgrpc++1.51 libprotobuf32 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
  libsqlite3-0 zlib1g libpng16-16 libopenblas0-pthread libcpp-httplib0.11 libnats3.4 ca-certificates
)

case "${1:-}" in
  "")        want=("${BUILD_PKGS[@]}" "${TEST_PKGS[@]}") ;;
  --build)   want=("${BUILD_PKGS[@]}") ;;
  --runtime) want=("${RUNTIME_PKGS[@]}") ;;
  *) echo "usage: $0 [--build|--runtime]" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup: all ${#want[@]} packages present"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
