#!/bin/sh
# Installs the Debian/Ubuntu packages scmoe needs, if any are missing (with sudo when not root).
# Usage: tools/install_deps.sh [extra packages...]
set -e
pkgs="build-essential pkg-config libopenblas-openmp-dev libdnnl-dev libopenmpi-dev openmpi-bin python3-torch python3-numpy $*"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "scmoe: missing packages:$missing (no apt-get here: install them by hand)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "scmoe: installing$missing" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
