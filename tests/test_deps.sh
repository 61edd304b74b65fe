#!/usr/bin/env bash
# test_deps.sh: tools/install_deps.sh without installing anything: on this machine (everything there)
# it exits 0 and says nothing; SCMOE_NO_DEPS=1 skips even a package that is not installed; on a system
# with no apt-get, no compiler, no MPI and no OpenBLAS (a PATH holding only the basic tools) it fails
# naming each missing thing and its Debian packages; --optional never fails there.
set -u
cd "$(dirname "$0")/.."
pass=0 fail=0
ok() { if [ "$1" = 0 ]; then pass=$((pass + 1)); echo "ok - $2"; else fail=$((fail + 1)); echo "not ok - $2"; fi; }
TMP=$(mktemp -d /tmp/scmoe_deps_XXXXXX)
trap 'rm -rf "$TMP"' EXIT

err=$(tools/install_deps.sh 2>&1); rc=$?
[ $rc = 0 ] && [ -z "$err" ]; ok $? "everything found: exit 0, nothing installed, nothing said${err:+ (said: $err)}"
err=$(SCMOE_NO_DEPS=1 tools/install_deps.sh scmoe-no-such-package 2>&1); rc=$?
[ $rc = 0 ] && [ -z "$err" ]; ok $? "SCMOE_NO_DEPS=1 skips even a missing package (exit $rc)"

# a bare system: only the tools the script itself runs, no apt-get, cc, make, pkg-config, mpicc, dpkg
mkdir -p "$TMP/bin"
for t in sh grep id; do ln -s "$(command -v $t)" "$TMP/bin/$t"; done
err=$(PATH=$TMP/bin sh tools/install_deps.sh 2>&1); rc=$?
echo "$err" | sed 's/^/#   /'
[ $rc = 1 ]; ok $? "a bare non-Debian system: exit 1 (exit $rc)"
# OpenBLAS is also found by its header on the real file system (without pkg-config)
blas=""
[ -e /usr/include/x86_64-linux-gnu/openblas-openmp/cblas.h ] || blas="OpenBLAS libopenblas-openmp-dev"
for want in "C11 compiler" "pkg-config" "OpenMPI" "libopenmpi-dev" "SCMOE_NO_DEPS=1" $blas; do
    echo "$err" | grep -q "$want"; ok $? "its message names $want"
done
err=$(PATH=$TMP/bin sh tools/install_deps.sh --optional python3-torch 2>&1); rc=$?
[ $rc = 0 ] && echo "$err" | grep -q "python3-torch not installed"; ok $? "--optional python3-torch there: exit 0, '$err'"
echo "$pass passed, $fail failed"
[ $fail = 0 ]
