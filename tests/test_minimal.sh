#!/usr/bin/env bash
# test_minimal.sh: examples/minimal_moe.c and examples/minimal_pair.c (a layer / a pair inside a host's
# own loop with its own optimizer) built the README's three ways, each run to the end (exit 0: the
# host's loop at least halved its loss):
#   - installed into a temporary prefix: `pkg-config --cflags --libs scmoe` with an rpath (run with no
#     LD_LIBRARY_PATH), and the archive through `pkg-config --static --cflags --libs scmoe-static` (no
#     libscmoe.so needed); the two print the same numbers
#   - the single-file drop-in dist/scmoe_all.h with plain cc, -fopenmp, OpenBLAS, -lm, -DSCMOE_NO_MPI
# Ends with "N passed, N failed"; exits non-zero on a failure.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
B=${BUILD:-build}
CC=${CC:-cc}
pass=0 fail=0
ok() { if [ "$1" = 0 ]; then pass=$((pass + 1)); echo "ok - $2"; else fail=$((fail + 1)); echo "not ok - $2"; [ -n "${3:-}" ] && printf '%s\n' "$3" | tail -n 15 | sed 's/^/#   /'; fi; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/scmoe_minimal.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mk() { env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s --no-print-directory B="$B" LDCONFIG= "$@"; }

PREFIX=$TMP/prefix
out=$(mk install PREFIX="$PREFIX" 2>&1); ok $? "make install PREFIX=<temp>" "$out"
out=$(mk amalgamate 2>&1); ok $? "make amalgamate (dist/scmoe_all.h)" "$out"
export PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig
for ex in minimal_moe minimal_pair; do
    src=$ROOT/examples/$ex.c
    lines=$(wc -l < "$src")
    [ "$lines" -le 100 ]; ok $? "$ex.c is short: $lines lines (at most 100 as .clang-format lays it out)"
    # the README's lines, verbatim but for the output names
    # shellcheck disable=SC2046
    out=$($CC -std=c11 -O2 "$src" $(pkg-config --cflags --libs scmoe) -Wl,-rpath,$(pkg-config --variable=libdir scmoe) \
          -lm -o "$TMP/${ex}_shared" 2>&1); ok $? "$ex: pkg-config --cflags --libs scmoe + rpath (+ -lm for its own sinf) builds" "$out"
    # shellcheck disable=SC2046
    out=$($CC -std=c11 -O2 "$src" $(pkg-config --static --cflags --libs scmoe-static) -o "$TMP/${ex}_static" 2>&1)
    ok $? "$ex: pkg-config --static --cflags --libs scmoe-static builds" "$out"
    # shellcheck disable=SC2046
    out=$($CC -std=c11 -O2 -fopenmp -DSCMOE_NO_MPI -DSCMOE_DROP_IN -I"$ROOT/dist" $(pkg-config --cflags openblas) "$src" \
          $(pkg-config --libs openblas) -fopenmp -lm -lpthread -o "$TMP/${ex}_dropin" 2>&1)
    ok $? "$ex: the drop-in builds with cc -fopenmp ... -lm (no MPI)" "$out"
    shared=$(env -u LD_LIBRARY_PATH "$TMP/${ex}_shared" 2>&1); ok $? "$ex (shared, rpath, no LD_LIBRARY_PATH): $(echo "$shared" | tail -n 1)" "$shared"
    static=$("$TMP/${ex}_static" 2>&1); ok $? "$ex (static): $(echo "$static" | tail -n 1)" "$static"
    ! readelf -d "$TMP/${ex}_static" 2>/dev/null | grep -q 'NEEDED.*libscmoe'; ok $? "$ex (static) does not need libscmoe.so"
    [ "$shared" = "$static" ]; ok $? "$ex: static and shared print the same numbers"
    dropin=$("$TMP/${ex}_dropin" 2>&1); ok $? "$ex (drop-in): $(echo "$dropin" | tail -n 1)" "$dropin"
done
echo "$pass passed, $fail failed"
[ $fail = 0 ]
