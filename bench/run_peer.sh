#!/usr/bin/env bash
# run_peer.sh - run the PyTorch peer (bench/torch_peer.py, gloo) inside a private network namespace
# whose loopback is rate-limited with tc, the torch counterpart of `bench/netns.sh run RATE -- ...`.
#
#   bench/run_peer.sh RATE [torch_peer.py args...]    RATE: tc syntax (1gbit, 200mbit); "none" = unshaped
#   bench/run_peer.sh RATE --exec CMD [ARGS...]       any command in the same kind of namespace, e.g. the C
#       bench for comparison: --exec mpirun --oversubscribe -np 2 -x OMP_NUM_THREADS=1 --mca btl tcp,self
#       --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo build/bench/bench_overlap --steps 4
#
# Creates namespace scmoe-peer-<pid> with only lo (up), `tc qdisc add dev lo root tbf rate RATE burst
# BURST latency LATENCY` (defaults: burst 1mbit, latency 10ms; env BURST / LATENCY override), runs
# /usr/bin/python3 bench/torch_peer.py with GLOO_SOCKET_IFNAME=lo inside it, and deletes the namespace
# (and anything left running in it) on exit, whatever happens. Needs root (CAP_NET_ADMIN), ip, tc.
# Like netns.sh, every rank shares the one shaped device: RATE is the aggregate of all ranks' traffic.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '5,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
RATE=$1; shift
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-/usr/bin/python3}
NS=scmoe-peer-$$

[ "$(id -u)" = 0 ] || { echo "run_peer.sh: must run as root (network namespaces and tc)" >&2; exit 1; }
for c in ip tc; do command -v "$c" >/dev/null || { echo "run_peer.sh: missing $c" >&2; exit 1; }; done

cleanup() {
    local rc=$? pids i
    trap - EXIT INT TERM HUP
    if [ -e "/run/netns/$NS" ]; then
        pids=$(ip netns pids "$NS" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            kill -TERM $pids 2>/dev/null || true
            for i in 1 2 3 4 5 6 7 8 9 10; do
                sleep 0.2
                pids=$(ip netns pids "$NS" 2>/dev/null || true)
                [ -n "$pids" ] || break
            done
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$NS" 2>/dev/null || echo "run_peer.sh: warning: could not delete namespace $NS" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
if [ "$RATE" != none ]; then
    ip netns exec "$NS" tc qdisc add dev lo root tbf rate "$RATE" burst "${BURST:-1mbit}" latency "${LATENCY:-10ms}"
fi
echo "run_peer.sh: namespace $NS, lo $( [ "$RATE" = none ] && echo unshaped || echo "shaped to $RATE (burst ${BURST:-1mbit}, latency ${LATENCY:-10ms})")" >&2
set +e
if [ "${1:-}" = --exec ]; then
    shift
    [ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    ip netns exec "$NS" "$@"
else
    ip netns exec "$NS" env GLOO_SOCKET_IFNAME=lo PEER_LINK="netns lo tbf $RATE" "$PY" "$HERE/torch_peer.py" "$@"
fi
rc=$?
set -e
exit $rc
