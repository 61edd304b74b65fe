#!/bin/sh
# Makes sure what scmoe needs to build and run is there, installing the Debian/Ubuntu packages that
# are missing (apt-get, with sudo when not root). Nothing is installed when it is already there.
#
#   tools/install_deps.sh                 the build: a C compiler, make, pkg-config, OpenBLAS, OpenMPI
#   tools/install_deps.sh PKG...          also these Debian packages (e.g. doxygen, slurm-wlm munge)
#   tools/install_deps.sh --optional PKG...  try to install PKG (apt only); never fails: what uses
#                                         them skips without them (python3-torch for the PyTorch oracles)
#
# SCMOE_NO_DEPS=1 skips every check and install (a cluster's modules, a non-Debian system). Without
# apt-get, a missing dependency is named with what provides it, and the script fails.
set -e
if [ "${SCMOE_NO_DEPS:-0}" = 1 ]; then
    exit 0
fi
optional=0
if [ "${1:-}" = --optional ]; then
    optional=1
    shift
fi

have() { command -v "$1" >/dev/null 2>&1; }
# is the Debian package installed? (only where dpkg is)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing="" # Debian packages to install
need=""    # what is missing, in words, for a system without apt
if [ $optional = 0 ]; then
    # the build's own needs, found by what they provide: a system that has them in any way is fine
    have cc || have gcc || { missing="$missing build-essential"; need="$need, a C11 compiler (cc)"; }
    have make || { missing="$missing make"; need="$need, make"; }
    have pkg-config || { missing="$missing pkg-config"; need="$need, pkg-config"; }
    blas=0
    pkg-config --exists openblas 2>/dev/null && blas=1
    [ -e /usr/include/x86_64-linux-gnu/openblas-openmp/cblas.h ] && blas=1
    [ $blas = 1 ] || { missing="$missing libopenblas-openmp-dev"; need="$need, OpenBLAS with its headers (openblas.pc, cblas.h)"; }
    { have mpicc && have mpirun; } || { missing="$missing libopenmpi-dev openmpi-bin"; need="$need, OpenMPI (mpicc, mpirun)"; }
fi
for p in "$@"; do
    if have dpkg-query; then
        installed "$p" || missing="$missing $p"
    else
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

if ! have apt-get; then
    [ $optional = 1 ] && { echo "scmoe: optional packages$missing not installed (no apt-get here): what needs them skips" >&2; exit 0; }
    echo "scmoe: missing${need:+:${need#,}}${need:+ }(Debian/Ubuntu packages:$missing)." >&2
    echo "scmoe: no apt-get here: install the equivalents with this system's package manager or modules" >&2
    echo "scmoe:   (e.g. Fedora/RHEL: gcc make pkgconf openblas-devel openmpi-devel; macOS: brew install openblas open-mpi)," >&2
    echo "scmoe: or set SCMOE_NO_DEPS=1 to skip this check." >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if ! have sudo; then
        [ $optional = 1 ] && { echo "scmoe: optional packages$missing not installed (not root, no sudo): what needs them skips" >&2; exit 0; }
        echo "scmoe: missing packages:$missing; not root and no sudo: install them, or set SCMOE_NO_DEPS=1" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "scmoe: installing$missing" >&2
if [ $optional = 1 ]; then
    { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; } ||
        echo "scmoe: WARNING: could not install$missing: what needs them skips" >&2
    exit 0
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
