#!/usr/bin/env bash
# The kernels that hide memory latency prefetch explicitly, and a compiler
# can drop a prefetch silently: GCC deems a function whose only effect is a
# prefetch const and deletes the calls to it that it does not inline (the
# fused pass's block prefetch was lost that way). In the object named, the
# out-of-line functions whose names hold the name given must still hold a
# prefetch instruction (at least one of them: lambdas and clones share names).
#   prefetch_test.sh OBJDUMP 'obj1|obj2|...'
set -euo pipefail
objdump=$1
IFS='|' read -r -a objects <<<"$2"

# object file name : function name (a substring of the demangled name)
checks=(
  "kernels_avx2.cc.o:::DotRowsBits("
  "kernels_avx2.cc.o:::DotRowsBf16("
  "kernels_avx512.cc.o:::ScoreRowsBits<"
  "kernels_avx512.cc.o:::DotRowsBitsShort<"
  "kernels_avx512.cc.o:::AxpyBitsI8Block<"
  "kernels_avx512_bf16.cc.o:::DotRowsBf16("
  "batch.cc.o:FusedPassBatchMulti("
)

fail=0
for check in "${checks[@]}"; do
  file=${check%%:*}
  name=${check#*:}
  obj=""
  for o in "${objects[@]}"; do
    [[ $o == */"$file" ]] && obj=$o
  done
  if [[ -z $obj ]]; then
    echo "FAIL: no object $file among the library's objects"
    fail=1
    continue
  fi
  # Per function whose name holds $name: its count of prefetch instructions.
  counts=$("$objdump" -d --no-show-raw-insn -C "$obj" | awk -v name="$name" '
    /^[0-9a-f]+ </ { if (inside) print n; inside = index($0, name) > 0; n = 0; next }
    inside && /prefetch/ { ++n }
    END { if (inside) print n }')
  if [[ -z $counts ]]; then
    echo "FAIL: $file has no function named *$name*"
    fail=1
  elif ! grep -qvx 0 <<<"$counts"; then
    echo "FAIL: $file: no function named *$name* has a prefetch left (counts: $(echo $counts))"
    fail=1
  else
    echo "ok: $file *$name*: prefetches per function $(echo $counts)"
  fi
done
exit $fail
