#!/usr/bin/env bash
# test_amalgamation.sh: the single-file drop-in dist/scmoe_all.h (tools/amalgamate.sh) against the
# library. One program (written below) trains the MoE layer and the block pair (every arch) for two
# steps and prints hashes of the outputs, dX, every gradient and the losses. It is built
#   lib      declarations from scmoe_all.h, linked with build/libscmoe.a
#   single   SCMOE_IMPLEMENTATION in the program's own file, scmoe_all.h the only scmoe source
#   split    SCMOE_IMPLEMENTATION in a file of its own, the program in another (two TUs, one link)
#   serial   -DSCMOE_NO_MPI with plain cc and no MPI flags at all
# and every build must print the same bytes: one rank (serial context) and 2 ranks over MPI.
# Ends with "N passed, N failed"; exits non-zero on a failure.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
B=build   # the default build (not $BUILD: run.sh points that at sanitizer builds)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_NUM_THREADS=2
MPIRUN="mpirun --oversubscribe -x OMP_NUM_THREADS"

pass=0 fail=0
ok() { echo "ok - $1"; pass=$((pass + 1)); }
not_ok() { # not_ok NAME [DETAIL]
    echo "not ok - $1"
    fail=$((fail + 1))
    [ -n "${2:-}" ] && printf '%s\n' "$2" | head -n 30 | sed 's/^/#   /'
    return 0
}
check() { # check NAME CMD...: ok when CMD succeeds; its output is shown on failure
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$name"; else not_ok "$name" "$out"; fi
}
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/scmoe_amalg.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# The library's own compile flags (minus dependency files), so that both builds do the same arithmetic.
make_var() {
    env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s --no-print-directory -f Makefile -f - MPI=1 B="$B" \
        _test_amalg_print 2>/dev/null <<EOF
_test_amalg_print:
	@echo \$($1)
EOF
}
CFLAGS=$(make_var CFLAGS | sed -e 's/-MMD//g' -e 's/-MP//g')
BLAS_INC=$(make_var BLAS_INC)
LDLIBS=$(make_var LDLIBS)
[ -n "$CFLAGS" ] || { not_ok "read CFLAGS from the Makefile"; finish; }
MPI_FLAGS=$(pkg-config --cflags --libs ompi-c 2>/dev/null || true)

# ---- the artefacts under test ----
check "tools/amalgamate.sh writes dist/scmoe_all.h" tools/amalgamate.sh dist/scmoe_all.h
[ -f dist/scmoe_all.h ] || finish
tools/amalgamate.sh "$TMP/again.h" 2>/dev/null
check "the amalgamation is reproducible (two runs, same bytes)" cmp dist/scmoe_all.h "$TMP/again.h"
check "make builds $B/libscmoe.a" env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s MPI=1 B="$B" "$B/libscmoe.a"

missing=""
for f in $(make_var CORE_SRC) $(make_var BLAS_SRC) $(make_var MPI_SRC) scmoe.h scmoe_mpi.h; do
    grep -q "^/\* ======== $f ======== \*/\$" dist/scmoe_all.h || missing="$missing $f"
done
if [ -z "$missing" ]; then ok "every library source and public header is inlined"; else not_ok "inlined sources" "missing:$missing"; fi
renamed=$(sed -n '/File-scope names renamed/,/^ \*\/$/p' dist/scmoe_all.h | sed -n 's/^ \*   //p')
echo "# file-scope names renamed in the amalgamation (found by tools/amalgamate.sh):"
printf '%s\n' "${renamed:-none}" | sed 's/^/#   /'
n_inc=$(grep -cE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' dist/scmoe_all.h)
if [ "$n_inc" = 0 ]; then ok "no project #include \"...\" left"; else not_ok "no project #include left" "$(grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' dist/scmoe_all.h)"; fi

# Only the header goes to the temp folder: the builds below cannot see the repository's sources.
cp dist/scmoe_all.h "$TMP/"
cat >"$TMP/prog.c" <<'EOF'
/* Trains the MoE layer and the block pair (every arch) for two steps; prints hashes of everything. */
#include "scmoe_all.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng;
static float frand(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) / 8388608.0 - 1.0);
}
static void fill(float *x, size_t n, float s) { for (size_t i = 0; i < n; i++) x[i] = s * frand(); }
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}
#define FNV0 1469598103934665603ull

typedef struct {
    void *obj;
    int is_pair;
} model;

static int count(model m) { return m.is_pair ? scmoe_pair_param_count(m.obj) : scmoe_moe_param_count(m.obj); }
static scmoe_status at(model m, int i, scmoe_tensor *t) {
    return m.is_pair ? scmoe_pair_param_at(m.obj, i, t) : scmoe_moe_param_at(m.obj, i, t);
}

/* One case: two training steps (forward, backward, SGD) and an eval forward. */
static int run(scmoe_context *ctx, FILE *out, const char *name, int is_pair, scmoe_config c) {
    int rank = scmoe_context_rank(ctx);
    model m = {NULL, is_pair};
    scmoe_status st = is_pair ? scmoe_pair_create(ctx, &c, (scmoe_pair **)&m.obj)
                              : scmoe_moe_create(ctx, &c, (scmoe_moe **)&m.obj);
    if (st != SCMOE_OK) {
        fprintf(stderr, "%s: create: %s (%s)\n", name, scmoe_strerror(st), scmoe_last_error(ctx));
        return 1;
    }
    int T = 8, B = rank % 2 ? 1 : 2, n = B * T, d = c.d_model;
    size_t sz = (size_t)n * d;
    float *x = malloc(sizeof(float) * sz), *y = malloc(sizeof(float) * sz), *dy = malloc(sizeof(float) * sz),
          *dx = malloc(sizeof(float) * sz);
    rng = 7 + 1000 * (uint64_t)rank;
    fill(x, sz, 1.0f);
    fill(dy, sz, 0.1f);
    for (int step = 0; step < 3; step++) {
        int train = step < 2;
        scmoe_stats s;
        memset(dx, 0, sizeof(float) * sz);
        if (is_pair) {
            scmoe_pair_set_training(m.obj, train);
            scmoe_pair_zero_grad(m.obj);
            st = scmoe_pair_forward(m.obj, B, T, x, y, &s);
            if (st == SCMOE_OK && train) st = scmoe_pair_backward(m.obj, dy, dx, &s);
        } else {
            scmoe_moe_set_training(m.obj, train);
            scmoe_moe_zero_grad(m.obj);
            st = scmoe_moe_forward(m.obj, n, x, y, &s);
            if (st == SCMOE_OK && train) st = scmoe_moe_backward(m.obj, dy, dx, &s);
        }
        if (st != SCMOE_OK) {
            fprintf(stderr, "%s: step %d: %s (%s)\n", name, step, scmoe_strerror(st), scmoe_last_error(ctx));
            return 1;
        }
        uint64_t hg = FNV0;
        for (int i = 0; i < count(m); i++) {
            scmoe_tensor t;
            at(m, i, &t);
            hg = fnv(hg, t.name, strlen(t.name));
            hg = fnv(hg, t.data, sizeof(float) * t.numel);
            hg = fnv(hg, t.grad, sizeof(float) * t.numel);
            if (train)
                for (size_t j = 0; j < t.numel; j++) t.data[j] -= 0.05f * t.grad[j];
        }
        fprintf(out, "%s rank%d step%d y=%016llx dx=%016llx params=%016llx aux=%a z=%a tokens=%lld dropped=%lld\n",
                name, rank, step, (unsigned long long)fnv(FNV0, y, sizeof(float) * sz),
                (unsigned long long)fnv(FNV0, dx, sizeof(float) * sz), (unsigned long long)hg, s.aux_loss, s.z_loss,
                (long long)s.tokens, (long long)s.dropped);
    }
    if (is_pair) scmoe_pair_destroy(m.obj); else scmoe_moe_destroy(m.obj);
    free(x); free(y); free(dy); free(dx);
    return 0;
}

static int run_all(scmoe_context *ctx, FILE *out) {
    scmoe_config c = scmoe_config_default();
    c.d_model = 16; c.d_hidden = 24; c.n_experts = 4; c.n_heads = 2; c.max_tokens = 64; c.max_seq_len = 8;
    c.capacity_factor = 1.0f; c.aux_loss_weight = 0.1f; c.z_loss_weight = 0.01f;
    int bad = 0;
    fprintf(out, "scmoe %s\n", scmoe_version());
    scmoe_config l = c;
    l.top_k = 2;
    bad |= run(ctx, out, "moe-top2-gelu", 0, l);
    l.top_k = 1; l.activation = SCMOE_SWIGLU; l.capacity_factor = 0; l.gate_noise_std = 1.0f;
    bad |= run(ctx, out, "moe-top1-swiglu-dropless-noise", 0, l);
    const char *names[] = {"pair-top2", "pair-top1", "pair-shared", "pair-scmoe-pos1", "pair-scmoe-pos2",
                           "pair-scmoe-pos3"};
    for (int i = 0; i < 6; i++) {
        scmoe_config p = c;
        p.arch = i < 3 ? (scmoe_arch)i : SCMOE_ARCH_SCMOE;
        p.shortcut_pos = i < 3 ? 2 : i - 2;
        bad |= run(ctx, out, names[i], 1, p);
    }
    scmoe_config p = c;
    p.combine = SCMOE_COMBINE_ADD; p.overlap = 0; p.wire_bf16 = 1;
    bad |= run(ctx, out, "pair-scmoe-add-serialized-bf16", 1, p);
    return bad;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "serial";
    scmoe_context *ctx;
    int bad;
    if (strcmp(mode, "serial") == 0) {
        if (scmoe_context_create(&ctx) != SCMOE_OK) return 2;
        bad = run_all(ctx, stdout);
        scmoe_context_destroy(ctx);
        return bad;
    }
#ifndef SCMOE_NO_MPI
    if (strcmp(mode, "mpi") == 0 && argc > 2) {
        int provided, rank;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        char path[4096];
        snprintf(path, sizeof path, "%s.rank%d", argv[2], rank);
        FILE *out = fopen(path, "w");
        if (!out || scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx) != SCMOE_OK) MPI_Abort(MPI_COMM_WORLD, 2);
        bad = run_all(ctx, out);
        fclose(out);
        scmoe_context_destroy(ctx);
        MPI_Finalize();
        return bad;
    }
#endif
    fprintf(stderr, "usage: %s serial | mpi OUT_PREFIX\n", argv[0]);
    return 2;
}
EOF
printf '#define SCMOE_IMPLEMENTATION\n#include "scmoe_all.h"\n' >"$TMP/impl.c"
# the header included twice, and the implementation requested twice, in one file
printf '#define SCMOE_IMPLEMENTATION\n#include "scmoe_all.h"\n#include "scmoe_all.h"\nint main(void) { return scmoe_strerror(SCMOE_OK)[0] == 0; }\n' >"$TMP/twice.c"

cd "$TMP" || exit 2
# shellcheck disable=SC2086
{
    check "build lib: scmoe_all.h declarations + $B/libscmoe.a" \
        mpicc $CFLAGS prog.c "$ROOT/$B/libscmoe.a" $LDLIBS -o prog_lib
    out=$(mpicc $CFLAGS $BLAS_INC -DSCMOE_IMPLEMENTATION prog.c $LDLIBS -o prog_single 2>&1)
    if [ $? -eq 0 ] && [ -z "$out" ]; then ok "build single: the implementation compiles without a warning (library flags)"
    else not_ok "build single: the implementation compiles without a warning (library flags)" "$out"; fi
    check "build split: implementation and program in separate files link once" \
        sh -c "mpicc $CFLAGS $BLAS_INC -c impl.c -o impl.o && mpicc $CFLAGS -c prog.c -o prog.o && mpicc impl.o prog.o $LDLIBS -o prog_split"
    # plain cc and no MPI flags: mpi.h must not be needed
    check "build serial: -DSCMOE_NO_MPI with cc, no MPI flags" \
        cc $CFLAGS -DSCMOE_NO_MPI $BLAS_INC -DSCMOE_IMPLEMENTATION prog.c $LDLIBS -o prog_serial
    check "build serial: no MPI symbol in the SCMOE_NO_MPI program" \
        sh -c "! nm prog_serial | grep -q ' U .*MPI_'"
    check "included twice with SCMOE_IMPLEMENTATION in one file" \
        mpicc $CFLAGS $BLAS_INC twice.c $LDLIBS -o twice
    check "build with the default -std (gnu17), no feature macro given" \
        mpicc -O2 -fopenmp $BLAS_INC -DSCMOE_IMPLEMENTATION prog.c $LDLIBS -o prog_gnu
    if command -v g++ >/dev/null 2>&1; then
        check "the declarations compile as C++ (extern \"C\")" \
            sh -c "printf '#include \"scmoe_all.h\"\nint main() { return scmoe_config_default().d_model != 64; }\n' >cxx.cc && g++ -Wall -Wextra $MPI_FLAGS cxx.cc -o cxx.o -c"
    fi
}

# ---- same outputs, bitwise ----
run_serial() { # run_serial BIN OUT
    [ -x "$1" ] || { echo "$1 was not built" >"$2"; return 1; }
    timeout 300 "./$1" serial >"$2" 2>"$2.err" || { cat "$2.err" >>"$2"; return 1; }
}
run_serial prog_lib serial_lib.txt
CASES=27   # 9 cases x (2 training steps + 1 eval)
ref_lines=$(grep -c ' step[0-9] ' serial_lib.txt)
if [ "$ref_lines" = "$CASES" ] && [ ! -s serial_lib.txt.err ]; then
    ok "lib program runs on one rank ($ref_lines lines of hashes)"
else
    not_ok "lib program runs on one rank" "$(cat serial_lib.txt serial_lib.txt.err 2>/dev/null)"
fi
run_serial prog_lib serial_lib2.txt
check "lib program is deterministic (two runs, same hashes)" diff serial_lib.txt serial_lib2.txt
for v in single split serial gnu; do
    if run_serial "prog_$v" "serial_$v.txt" && diff -q serial_lib.txt "serial_$v.txt" >/dev/null; then
        ok "one rank: $v == lib, bitwise"
    else
        not_ok "one rank: $v == lib, bitwise" "$(diff serial_lib.txt "serial_$v.txt" 2>&1)"
    fi
done

if command -v mpirun >/dev/null 2>&1; then
    run_mpi() { # run_mpi BIN PREFIX
        [ -x "$1" ] || return 1
        timeout 300 $MPIRUN -np 2 "./$1" mpi "$PWD/$2" >"$2.log" 2>&1 || return 1
        cat "$2.rank0" "$2.rank1" >"$2.txt"
    }
    if run_mpi prog_lib mpi_lib && [ "$(grep -c ' step[0-9] ' mpi_lib.txt)" = $((2 * CASES)) ]; then
        ok "lib program runs on 2 ranks"
    else
        not_ok "lib program runs on 2 ranks" "$(cat mpi_lib.log 2>/dev/null)"
    fi
    for v in single split; do
        if run_mpi "prog_$v" "mpi_$v" && diff -q mpi_lib.txt "mpi_$v.txt" >/dev/null; then
            ok "2 ranks: $v == lib, bitwise (every rank)"
        else
            not_ok "2 ranks: $v == lib, bitwise (every rank)" "$(cat "mpi_$v.log" 2>/dev/null; diff mpi_lib.txt "mpi_$v.txt" 2>&1)"
        fi
    done
else
    not_ok "mpirun not found: the 2-rank comparison did not run"
fi
finish
