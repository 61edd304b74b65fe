#!/usr/bin/env bash
# test_symbols.sh: the library lives in the host's namespace without touching it.
#   1. Every global symbol defined by build/libscmoe.a (and build/libscmoe_cuda.a when built, and an
#      object compiled from the drop-in, with and without MPI) starts with scmoe_: scmoe__ for internals,
#      scmoe_ alone only for what the public headers declare; build/libscmoe.so exports the public API
#      and nothing else.
#   2. A host program with kernels of its own named as llm.c names them (tests/host/llmc_kernels.c:
#      layernorm_forward, attention_forward, matmul_forward, gelu_forward, ...) links against the archive
#      and against the drop-in (its kernels in the implementation's own file, and in a file of their own),
#      runs its own kernels (llmc_selftest) and a block pair of every arch, and prints the same bytes as
#      the same program built with no host kernels.
# Ends with "N passed, N failed".
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
B=build
pass=0 fail=0
ok() { echo "ok - $1"; pass=$((pass + 1)); }
not_ok() { echo "not ok - $1"; fail=$((fail + 1)); [ -n "${2:-}" ] && printf '%s\n' "$2" | head -n 30 | sed 's/^/#   /'; return 0; }
check() { local name=$1 out; shift; if out=$("$@" 2>&1); then ok "$name"; else not_ok "$name" "$out"; fi; }
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit; }

make_var() {
    env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s --no-print-directory -f Makefile -f - MPI=1 B="$B" \
        _test_sym_print 2>/dev/null <<EOF2
_test_sym_print:
	@echo \$($1)
EOF2
}
CFLAGS=$(make_var CFLAGS | sed -e 's/-MMD//g' -e 's/-MP//g')
BLAS_INC=$(make_var BLAS_INC)
LDLIBS=$(make_var LDLIBS)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/scmoe_sym.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# foreign FILE: the defined global (and weak) symbols of FILE that do not start with scmoe_
foreign() { nm -g --defined-only "$1" 2>/dev/null | awk 'NF == 3 && $3 !~ /^scmoe_/ { print $3 }' | sort -u; }
# the public API: every function the public headers declare (a declaration starts its line)
api() { grep -hE '^[a-z][a-z0-9_ ]*[ *]scmoe_[a-z0-9_]+\(' "$@" | grep -oE 'scmoe_[a-z0-9_]+\(' | tr -d '(' | sort -u; }
public=$(api scmoe.h scmoe_mpi.h scmoe_cuda.h)
# not_public FILE: defined globals named scmoe_ (one underscore) that no public header declares
not_public() { nm -g --defined-only "$1" 2>/dev/null | awk 'NF == 3 && $3 ~ /^scmoe_[^_]/ { print $3 }' | sort -u | comm -23 - <(echo "$public"); }
names_ok() { # names_ok WHAT FILE
    if [ ! -s "$2" ]; then not_ok "$1: not built"; return; fi
    local bad priv
    bad=$(foreign "$2")
    priv=$(not_public "$2")
    if [ -z "$bad" ]; then ok "$1: every defined global starts with scmoe_ ($(nm -g --defined-only "$2" | grep -c ' [A-Z] scmoe_') symbols)"
    else not_ok "$1: globals without the scmoe_ prefix ($(echo "$bad" | wc -l))" "$(echo "$bad" | tr '\n' ' ')"; fi
    if [ -z "$priv" ]; then ok "$1: every scmoe_ (not scmoe__) global is declared in a public header"
    else not_ok "$1: internals named like the public API" "$(echo "$priv" | tr '\n' ' ')"; fi
}

check "make builds $B/libscmoe.a and $B/libscmoe.so" env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s MPI=1 B="$B" "$B/libscmoe.a" "$B/libscmoe.so"
check "tools/amalgamate.sh writes the drop-in" tools/amalgamate.sh "$TMP/scmoe_all.h"
names_ok "$B/libscmoe.a" "$B/libscmoe.a"
# the CUDA archive when this build has one (make CUDA=1); the C++ runtime's DW.ref.* are compiler-made
if [ -s "$B/libscmoe_cuda.a" ]; then
    nm -g --defined-only "$B/libscmoe_cuda.a" | grep -v ' DW\.ref\.' >"$TMP/cuda_syms"
    bad=$(awk 'NF == 3 && $3 !~ /^scmoe_/ { print $3 }' "$TMP/cuda_syms" | sort -u)
    if [ -z "$bad" ]; then ok "$B/libscmoe_cuda.a: every defined global starts with scmoe_"
    else not_ok "$B/libscmoe_cuda.a: globals without the scmoe_ prefix" "$(echo "$bad" | tr '\n' ' ')"; fi
fi
# the shared object exports by version script; its dynamic table is what a host links against
if [ -e "$B/libscmoe.so" ]; then
    exported=$(nm -D --defined-only "$B/libscmoe.so" | awk 'NF == 3 && $2 != "A" { print $3 }' | sort -u)
    host_api=$(api scmoe.h scmoe_mpi.h)
    if [ "$exported" = "$host_api" ]; then
        ok "$B/libscmoe.so exports exactly the public API ($(echo "$exported" | wc -l) functions)"
    else not_ok "$B/libscmoe.so exports" "$(diff <(echo "$host_api") <(echo "$exported"))"; fi
fi
cp tests/host/llmc_host.c tests/host/llmc_kernels.c "$TMP/"
cd "$TMP" || exit 2
printf '#define SCMOE_IMPLEMENTATION\n#include "scmoe_all.h"\n' >impl.c
# shellcheck disable=SC2086
{
    check "drop-in implementation compiles (MPI)" mpicc $CFLAGS $BLAS_INC -c impl.c -o impl_mpi.o
    check "drop-in implementation compiles (SCMOE_NO_MPI, cc)" cc $CFLAGS $BLAS_INC -DSCMOE_NO_MPI -c impl.c -o impl_serial.o
}
names_ok "drop-in object (MPI)" impl_mpi.o
names_ok "drop-in object (SCMOE_NO_MPI)" impl_serial.o

# shellcheck disable=SC2086
{
    check "build ref: archive, no host kernels" \
        mpicc $CFLAGS -I"$ROOT" -DNO_HOST_KERNELS llmc_host.c "$ROOT/$B/libscmoe.a" $LDLIBS -o ref
    check "build archive: host kernels in their own file + libscmoe.a" \
        mpicc $CFLAGS -I"$ROOT" llmc_host.c llmc_kernels.c "$ROOT/$B/libscmoe.a" $LDLIBS -o with_archive
    check "build drop-in: host kernels in the implementation's file (SCMOE_IMPLEMENTATION)" \
        cc $CFLAGS $BLAS_INC -DSCMOE_NO_MPI -DUSE_DROPIN -DSCMOE_IMPLEMENTATION -DKERNELS_IN_THIS_FILE llmc_host.c $LDLIBS -o with_dropin_same
    check "build drop-in: implementation, host kernels and program in three files" \
        sh -c "cc $CFLAGS -DSCMOE_NO_MPI -DUSE_DROPIN -c llmc_host.c -o host.o && cc $CFLAGS -c llmc_kernels.c -o kern.o && cc host.o kern.o impl_serial.o $LDLIBS -o with_dropin_split"
}
if ./ref >ref.txt 2>ref.err && [ "$(grep -c hash ref.txt)" = 8 ]; then ok "reference program trains 4 arches x 2 steps"
else not_ok "reference program" "$(cat ref.txt ref.err)"; fi
for v in with_archive with_dropin_same with_dropin_split; do
    if [ -x "$v" ] && ./"$v" >"$v.txt" 2>"$v.err" && cmp -s ref.txt "$v.txt"; then
        ok "$v: the host's kernels ran as the host's, and the library's numbers are bitwise unchanged"
    else
        not_ok "$v" "$(cat "$v.err" 2>/dev/null; diff ref.txt "$v.txt" 2>&1)"
    fi
done
finish
