#!/usr/bin/env bash
# test_install.sh: `make install` into a temporary prefix, then a small program written here, outside
# the tree, built with nothing but `pkg-config ... scmoe` and run against the static and the shared
# library; `make install DESTDIR=...`; `make uninstall` leaves nothing behind.
# Ends with "N passed, N failed"; exits non-zero on a failure.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
B=build   # the default build (not $BUILD: run.sh points that at sanitizer builds)

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

TMP=$(mktemp -d "${TMPDIR:-/tmp}/scmoe_install.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
P=$TMP/prefix

# The install rules live in mk/install.mk; read it directly until the Makefile includes it.
MK="-f Makefile"
grep -qE '^[[:space:]]*-?include[[:space:]]+mk/install.mk' Makefile || MK="-f Makefile -f mk/install.mk"
mk() { env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s --no-print-directory $MK B="$B" LDCONFIG= "$@"; }

major=$(sed -nE 's/^#define SCMOE_VERSION_MAJOR ([0-9]+).*/\1/p' scmoe.h)
version=$major.$(sed -nE 's/^#define SCMOE_VERSION_MINOR ([0-9]+).*/\1/p' scmoe.h).$(sed -nE 's/^#define SCMOE_VERSION_PATCH ([0-9]+).*/\1/p' scmoe.h)

# ---- install ----
check "make install PREFIX=<temp>" mk install PREFIX="$P"
expect="lib/libscmoe.a lib/libscmoe.so lib/libscmoe.so.$major lib/libscmoe.so.$version include/scmoe.h include/scmoe_mpi.h lib/pkgconfig/scmoe.pc lib/pkgconfig/scmoe-static.pc"
missing=""
for f in $expect; do [ -e "$P/$f" ] || missing="$missing $f"; done
if [ -z "$missing" ]; then ok "installed: $expect"; else not_ok "installed files" "missing:$missing"; fi
[ -z "$missing" ] || finish
if [ "$(readlink "$P/lib/libscmoe.so")" = "libscmoe.so.$major" ] &&
    [ "$(readlink "$P/lib/libscmoe.so.$major")" = "libscmoe.so.$version" ] && [ ! -L "$P/lib/libscmoe.so.$version" ]; then
    ok "libscmoe.so -> libscmoe.so.$major -> libscmoe.so.$version"
else
    not_ok "shared library links" "$(ls -l "$P/lib")"
fi
soname=$(readelf -d "$P/lib/libscmoe.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
if [ "$soname" = "libscmoe.so.$major" ]; then ok "SONAME is libscmoe.so.$major"; else not_ok "SONAME" "got '$soname'"; fi
other=$(nm -D --defined-only "$P/lib/libscmoe.so.$version" | awk '{print $3}' | grep -v '^scmoe_' || true)
if [ -z "$other" ]; then ok "the shared library exports only scmoe_* symbols"; else not_ok "exports only scmoe_*" "$other"; fi
needed=$(readelf -d "$P/lib/libscmoe.so.$version" | grep NEEDED)
if grep -q libmpi <<<"$needed" && grep -q openblas <<<"$needed" && grep -q gomp <<<"$needed"; then
    ok "the shared library records its dependencies (MPI, OpenBLAS, libgomp)"
else
    not_ok "the shared library records its dependencies" "$needed"
fi

# ---- pkg-config ----
export PKG_CONFIG_PATH=$P/lib/pkgconfig
check "pkg-config --validate scmoe" pkg-config --validate scmoe
check "pkg-config --validate scmoe-static" pkg-config --validate scmoe-static
got=$(pkg-config --modversion scmoe 2>&1)
if [ "$got" = "$version" ]; then ok "pkg-config --modversion scmoe = $version (SCMOE_VERSION_* in scmoe.h)"; else not_ok "modversion" "$got"; fi
libs=$(pkg-config --libs scmoe 2>&1)
if [[ " $libs " == *" -L$P/lib "* && " $libs " == *" -lscmoe "* ]]; then ok "pkg-config --libs: $libs"; else not_ok "pkg-config --libs" "$libs"; fi
slibs=$(pkg-config --static --libs scmoe 2>&1)
if [[ " $slibs " == *" -lmpi "* && " $slibs " == *" -lopenblas "* && " $slibs " == *" -fopenmp "* && " $slibs " == *" -lm "* && " $slibs " == *" -lpthread "* ]]; then
    ok "pkg-config --static --libs carries MPI, OpenBLAS, -fopenmp -lm -lpthread"
else
    not_ok "pkg-config --static --libs" "$slibs"
fi

# ---- a program outside the tree ----
mkdir -p "$TMP/app"
cd "$TMP/app" || exit 2
cat >app.c <<'EOF'
/* A user of the installed library: one rank, a tiny block pair, forward + backward, checksums. */
#include <scmoe.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    scmoe_context *ctx;
    if (scmoe_context_create(&ctx) != SCMOE_OK) return 1;
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 16; cfg.d_hidden = 32; cfg.n_experts = 4; cfg.n_heads = 2;
    cfg.max_tokens = 32; cfg.max_seq_len = 8;
    cfg.arch = SCMOE_ARCH_SCMOE; cfg.shortcut_pos = 2;
    scmoe_pair *pair;
    scmoe_status st = scmoe_pair_create(ctx, &cfg, &pair);
    if (st != SCMOE_OK) { fprintf(stderr, "create: %s: %s\n", scmoe_strerror(st), scmoe_last_error(ctx)); return 1; }
    enum { B = 2, T = 8, D = 16, N = B * T * D };
    static float x[N], y[N], dy[N], dx[N];
    uint32_t s = 1;
    for (int i = 0; i < N; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = (float)(s >> 8) / 16777216.0f - 0.5f;
        dy[i] = 0.01f * (float)((i % 7) - 3);
    }
    scmoe_stats stats;
    st = scmoe_pair_forward(pair, B, T, x, y, &stats);
    if (st == SCMOE_OK) st = scmoe_pair_backward(pair, dy, dx, &stats);
    if (st != SCMOE_OK) { fprintf(stderr, "step: %s: %s\n", scmoe_strerror(st), scmoe_last_error(ctx)); return 1; }
    double sy = 0, sdx = 0, sg = 0;
    for (int i = 0; i < N; i++) { sy += y[i]; sdx += dx[i]; }
    for (int i = 0; i < scmoe_pair_param_count(pair); i++) {
        scmoe_tensor t;
        scmoe_pair_param_at(pair, i, &t);
        for (size_t j = 0; j < t.numel; j++) sg += t.grad[j];
    }
    printf("scmoe %s checksum y=%.9g dx=%.9g grads=%.9g aux=%.9g\n", scmoe_version(), sy, sdx, sg, stats.aux_loss);
    scmoe_pair_destroy(pair);
    scmoe_context_destroy(ctx);
    return 0;
}
EOF
CC=${CC:-cc}
# shared: plain `pkg-config --cflags --libs scmoe`
# shellcheck disable=SC2046
check "build against the shared library: $CC app.c \$(pkg-config --cflags --libs scmoe)" \
    $CC app.c $(pkg-config --cflags --libs scmoe) -o app_shared
# static: `pkg-config --static`; -lscmoe is asked for as an archive (-Wl,-Bstatic ... -Wl,-Bdynamic, the
# GNU ld way to pick libscmoe.a when libscmoe.so sits next to it); the rest stays as pkg-config gives it.
static_libs=$(pkg-config --static --libs scmoe | sed 's/\(^\| \)-lscmoe\( \|$\)/ -Wl,-Bstatic -lscmoe -Wl,-Bdynamic /')
# shellcheck disable=SC2046,SC2086
check "build against the static library: $CC app.c \$(pkg-config --cflags scmoe) \$(pkg-config --static --libs scmoe)" \
    $CC app.c $(pkg-config --cflags scmoe) $static_libs -o app_static

# the README's lines: the shared library with an rpath (no LD_LIBRARY_PATH), the archive by scmoe-static
# shellcheck disable=SC2046
check "build with an rpath: $CC app.c \$(pkg-config --cflags --libs scmoe) -Wl,-rpath,\$(pkg-config --variable=libdir scmoe)" \
    $CC app.c $(pkg-config --cflags --libs scmoe) -Wl,-rpath,"$(pkg-config --variable=libdir scmoe)" -o app_rpath
# shellcheck disable=SC2046
check "build static: $CC app.c \$(pkg-config --static --cflags --libs scmoe-static)" \
    $CC app.c $(pkg-config --static --cflags --libs scmoe-static) -o app_static2
if [ -x app_shared ]; then
    if readelf -d app_shared | grep -q "NEEDED.*\[libscmoe.so.$major\]"; then ok "app_shared needs libscmoe.so.$major"
    else not_ok "app_shared needs libscmoe.so.$major" "$(readelf -d app_shared | grep NEEDED)"; fi
    where=$(LD_LIBRARY_PATH=$P/lib ldd ./app_shared | grep libscmoe)
    if [[ $where == *"$P/lib/libscmoe.so.$major"* ]]; then ok "with LD_LIBRARY_PATH it loads the installed libscmoe.so.$major"
    else not_ok "loads the installed library" "$where"; fi
    out_shared=$(LD_LIBRARY_PATH=$P/lib ./app_shared 2>&1)
    if [ $? -eq 0 ] && [[ $out_shared == "scmoe $version checksum "* ]]; then ok "shared: $out_shared"
    else not_ok "app_shared runs" "$out_shared"; fi
fi
if [ -x app_rpath ]; then
    out_rpath=$(env -u LD_LIBRARY_PATH ./app_rpath 2>&1)
    if [ $? -eq 0 ] && [ "$out_rpath" = "${out_shared:-}" ]; then ok "the rpath build runs without LD_LIBRARY_PATH: $out_rpath"
    else not_ok "app_rpath runs" "$out_rpath"; fi
fi
if [ -x app_static2 ]; then
    out_static2=$(./app_static2 2>&1)
    if ! readelf -d app_static2 | grep -q 'NEEDED.*libscmoe' && [ "$out_static2" = "${out_shared:-}" ]; then
        ok "scmoe-static links the archive (no libscmoe.so needed) and gives the same checksums"
    else not_ok "scmoe-static links the archive" "$(readelf -d app_static2 | grep NEEDED; echo "$out_static2")"; fi
fi
if [ -x app_static ]; then
    if ! readelf -d app_static | grep -q 'NEEDED.*libscmoe'; then ok "app_static does not need libscmoe.so"
    else not_ok "app_static does not need libscmoe.so" "$(readelf -d app_static | grep NEEDED)"; fi
    out_static=$(./app_static 2>&1)
    if [ $? -eq 0 ] && [[ $out_static == "scmoe $version checksum "* ]]; then ok "static: $out_static"
    else not_ok "app_static runs" "$out_static"; fi
    if [ -n "${out_shared:-}" ] && [ "$out_static" = "$out_shared" ]; then ok "static and shared give the same checksums"
    else not_ok "static and shared give the same checksums" "shared: ${out_shared:-}"$'\n'"static: $out_static"; fi
fi
printf '#include <scmoe_mpi.h>\nint main(void) { scmoe_context *c; return scmoe_context_create_mpi(MPI_COMM_WORLD, &c) == SCMOE_OK; }\n' >mpiapp.c
# shellcheck disable=SC2046
check "scmoe_mpi.h compiles with \$(pkg-config --cflags scmoe) alone (mpi.h from Requires.private)" \
    $CC -c mpiapp.c $(pkg-config --cflags scmoe) -o mpiapp.o
cd "$ROOT" || exit 2

# ---- DESTDIR ----
S=$TMP/stage
check "make install DESTDIR=<temp> PREFIX=/opt/scmoe" mk install DESTDIR="$S" PREFIX=/opt/scmoe
if [ -f "$S/opt/scmoe/lib/libscmoe.a" ] && [ -f "$S/opt/scmoe/include/scmoe.h" ] && grep -qx 'prefix=/opt/scmoe' "$S/opt/scmoe/lib/pkgconfig/scmoe.pc" 2>/dev/null &&
    [ -z "$(find "$S" -mindepth 1 -maxdepth 1 ! -name opt)" ]; then
    ok "DESTDIR: files staged under DESTDIR, scmoe.pc says prefix=/opt/scmoe"
else
    not_ok "DESTDIR staging" "$(find "$S" | head -n 20; cat "$S/opt/scmoe/lib/pkgconfig/scmoe.pc" 2>&1)"
fi
check "make uninstall DESTDIR=<temp> PREFIX=/opt/scmoe" mk uninstall DESTDIR="$S" PREFIX=/opt/scmoe
left=$(find "$S" ! -type d)
if [ -z "$left" ]; then ok "DESTDIR uninstall leaves no file"; else not_ok "DESTDIR uninstall leaves no file" "$left"; fi

# ---- uninstall ----
check "make uninstall PREFIX=<temp>" mk uninstall PREFIX="$P"
left=$(find "$P" ! -type d)
if [ -z "$left" ]; then ok "uninstall removes every installed file and link"; else not_ok "uninstall removes everything" "$left"; fi
if ! pkg-config --exists scmoe 2>/dev/null; then ok "pkg-config no longer finds scmoe"; else not_ok "pkg-config no longer finds scmoe"; fi
finish
