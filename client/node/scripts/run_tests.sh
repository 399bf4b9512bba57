#!/usr/bin/env bash
# Test driver of the engram-client package (ctest integration.node_client):
#   1. npm ci when node_modules is missing or older than the lockfile;
#   2. npm run typecheck (index.d.ts against test/types.test-d.ts);
#   3. node --test test/ against real engramd processes ($ENGRAMD);
#   4. npm pack the package, npm install the tarball into a fresh project
#      (from the npm cache when it can), type-check a TypeScript consumer of
#      it, and call listBanks through it against a running engramd.
#
#   client/node/scripts/run_tests.sh /path/to/engramd
set -euo pipefail

ENGRAMD="${1:-${ENGRAMD:-}}"
[[ -n "$ENGRAMD" && -x "$ENGRAMD" ]] || { echo "usage: $0 /path/to/engramd" >&2; exit 2; }
ENGRAMD="$(realpath "$ENGRAMD")"
export ENGRAMD
PKG="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "$PKG/../.." && pwd)"
NPM_FLAGS=(--no-audit --no-fund)

TMP="$(mktemp -d "${TMPDIR:-/tmp}/engram-node-client.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill -9 "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

step() { echo; echo "== $*"; }
cd "$PKG"

# 1. Dependencies. The lock serialises installs with the examples test, which
#    installs into the same node_modules.
step "dependencies"
(
  flock -x 9
  if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ||
        package.json -nt node_modules/.package-lock.json || ! -x node_modules/.bin/tsc ]]; then
    npm ci "${NPM_FLAGS[@]}"
  else
    echo "node_modules is up to date"
  fi
) 9>"$PKG/.npm-install.lock"

# 2. Type declarations.
step "typecheck"
npm run --silent typecheck
echo "index.d.ts type-checks"

# 3. The test suite against real servers.
step "node --test test/"
node --test test/

# 4. Pack and install. The package is packed from a staged copy of the
#    source tree, so `npm pack` (whose prepack copies the proto in) never
#    writes into the working tree.
step "npm pack / npm install"
STAGE="$TMP/stage"
mkdir -p "$STAGE/client/node" "$STAGE/proto/engram/v1"
cp -R "$PKG/package.json" "$PKG/package-lock.json" "$PKG/index.d.ts" "$PKG/README.md" \
      "$PKG/lib" "$PKG/scripts" "$STAGE/client/node/"
cp "$REPO/proto/engram/v1/engram.proto" "$STAGE/proto/engram/v1/"
(cd "$STAGE/client/node" && npm pack --silent --pack-destination "$TMP" >/dev/null)
TARBALL="$(ls "$TMP"/engram-client-*.tgz)"
CONTENTS="$(tar -tzf "$TARBALL" | sort)"
echo "$CONTENTS"
for want in package/proto/engram/v1/engram.proto package/index.d.ts package/lib/index.js; do
  grep -qx "$want" <<<"$CONTENTS" || { echo "the tarball lacks $want" >&2; exit 1; }
done
if grep -Eq '^package/(test|testing|node_modules)/' <<<"$CONTENTS"; then
  echo "the tarball holds test files or node_modules" >&2; exit 1
fi

APP="$TMP/app"
mkdir -p "$APP"
cd "$APP"
printf '{ "name": "engram-client-consumer", "version": "1.0.0", "private": true }\n' > package.json
npm install "${NPM_FLAGS[@]}" --prefer-offline "$TARBALL"

# A TypeScript consumer type-checks against the installed package
# (resolved through its "exports" and "types").
cat > consumer.ts <<'TS'
import { Client, EngramError, BankInfo } from 'engram-client';
export async function names(target: string): Promise<string[]> {
  const client = new Client(target, { retries: 1 });
  try {
    const banks: BankInfo[] = await client.listBanks();
    return banks.map((b) => b.name);
  } catch (err) {
    if (err instanceof EngramError) throw new Error(err.codeName);
    throw err;
  } finally {
    client.close();
  }
}
TS
"$PKG/node_modules/.bin/tsc" --noEmit --strict --target ES2020 --module node16 --moduleResolution node16 \
  --types node --typeRoots "$PKG/node_modules/@types" consumer.ts
echo "a TypeScript consumer type-checks against the installed package"

PORT="$(node -e "const s = require('net').createServer().listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close(); })")"
"$ENGRAMD" --listen="127.0.0.1:$PORT" --data_dir="$TMP/data" --metrics_listen= >"$TMP/engramd.log" 2>&1 &
SERVER_PID=$!
# The client's retries on UNAVAILABLE wait for the server to come up.
if ! ENGRAM_TARGET="127.0.0.1:$PORT" node -e "
  const engram = require('engram-client');
  const path = require('path');
  if (!engram.protoDir().startsWith(path.join(process.cwd(), 'node_modules', 'engram-client'))) {
    throw new Error('proto loaded from ' + engram.protoDir() + ', not from the installed package');
  }
  const client = new engram.Client(process.env.ENGRAM_TARGET, { retries: 30, backoffMs: 100, maxBackoffMs: 500 });
  client.createBank('installed', 3)
    .then(() => client.listBanks())
    .then((banks) => {
      console.log('listBanks through the installed package:', banks.map((b) => b.name + ' N=' + b.dim).join(', '));
      if (banks.length !== 1 || banks[0].name !== 'installed') process.exitCode = 1;
    }, (err) => { console.error(err); process.exitCode = 1; })
    .finally(() => client.close());
"; then
  cat "$TMP/engramd.log" >&2
  exit 1
fi
echo
echo "engram-client: all checks passed"
