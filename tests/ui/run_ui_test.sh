#!/bin/sh
# Runs the browser test of ui/ against a real engramd.
# Usage: run_ui_test.sh ENGRAMD [SCREENSHOT_DIR]
# Installs the test's npm packages (package-lock.json) when node_modules is
# missing; needs node >= 20, npm and Chromium (/usr/bin/chromium or $CHROMIUM).
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 ENGRAMD [SCREENSHOT_DIR]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
engramd=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is not installed" >&2; exit 1; }
done
chromium=${CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] || { echo "no Chromium at $chromium (set CHROMIUM)" >&2; exit 1; }
cd "$here"
if [ ! -d node_modules/playwright-core ] || [ ! -d node_modules/pngjs ]; then
  npm ci --no-audit --no-fund
fi
ENGRAMD=$engramd ENGRAM_UI_DIR=$(cd "$here/../../ui" && pwd) ENGRAM_UI_OUT=${2:-} CHROMIUM=$chromium \
  exec node --test ui.test.js
