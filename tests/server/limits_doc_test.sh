#!/usr/bin/env bash
# docs/reliability.md holds the output of `engramd --print_limits` between
# its limits markers: the documented limits are the ones the server checks.
#   limits_doc_test.sh ENGRAMD DOC
set -euo pipefail
engramd=$1
doc=$2
want=$("$engramd" --print_limits)
got=$(sed -n '/<!-- limits:begin -->/,/<!-- limits:end -->/p' "$doc" | sed '1d;$d')
if [[ "$want" != "$got" ]]; then
  echo "FAIL: $doc's limits table differs from engramd --print_limits:" >&2
  diff <(echo "$got") <(echo "$want") >&2 || true
  echo "regenerate it: engramd --print_limits" >&2
  exit 1
fi
echo "ok: $(grep -c '^| ' <<<"$want") rows match"
