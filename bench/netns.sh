#!/usr/bin/env bash
# netns.sh - run an MPI job over TCP through a rate-limited loopback, inside a private network
# namespace, so the exchanges see a "network" instead of shared memory. Self-contained: needs only
# root, iproute2 (ip, tc) and OpenMPI's mpirun.
#
#   bench/netns.sh check                        can this machine do it? (exit 0 yes, 1 no)
#   bench/netns.sh run RATE -- [mpirun args...] mpirun inside a fresh namespace whose lo is shaped
#                                               to RATE (tc syntax: 2gbit, 500mbit, 1gbps); RATE
#                                               "none" leaves lo unshaped (plain TCP loopback)
# Example:
#   bench/netns.sh run 2gbit -- --oversubscribe -np 2 -x OMP_NUM_THREADS=1 build/bench/bench_a2a
#
# Env: BURST     tbf bucket in bytes (default: 1 ms of RATE, at least 128 KiB, since lo's MTU is
#                64 KiB and a bucket smaller than one packet stalls the link)
#      LATENCY   tbf queue bound (default 20ms)
#      TCP_FLAGS btl_tcp_flags passed to OpenMPI (default send,inplace,need-ack,need-csum: no "put",
#                so large messages go as pipelined sends); TCP_FLAGS=default keeps OpenMPI 4.1's
#                own value (send,put,inplace,need-ack,need-csum,hetero-rdma). On this one shaped lo
#                both reach the same rate (bench_a2a, 2 ranks, 8192 tokens: 0.12 GB/s/rank at 2gbit,
#                0.47-0.48 at 8gbit, either way); across separate per-host links "put" has been seen
#                to reach only about half the link rate, so send-only is the default.
#
# What it sets up: namespace scmoe-<pid> with only lo, up; `tc qdisc add dev lo root tbf rate RATE
# burst BURST latency LATENCY`. Then, unless the caller already set them (on the command line or as
# OMPI_MCA_<name> in the environment): --mca btl tcp,self --mca btl_tcp_if_include lo
# --mca oob_tcp_if_include lo --mca btl_tcp_flags TCP_FLAGS. OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) are
# exported when running as root. The namespace (and anything still running in it) is removed on
# exit, whatever happens; nothing outside it is touched.
#
# Caveat of the model: every rank shares ONE shaped device. All bytes between all ranks cross lo
# once, so RATE is the aggregate of all ranks' traffic (a shared half-duplex link), not a
# full-duplex NIC per rank. At 2 ranks exchanging symmetrically, each rank sends at most RATE/2
# while receiving RATE/2. A per-host NIC model needs one namespace per host joined by a bridge.
set -euo pipefail

NS=
log() { echo "netns.sh: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '6,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

need_tools() {
    [ "$(id -u)" = 0 ] || { log "must run as root (network namespaces and tc need CAP_NET_ADMIN)"; return 1; }
    local c
    for c in ip tc; do command -v "$c" >/dev/null || { log "missing command: $c"; return 1; }; done
}

# tc rate string -> bytes per second
rate_Bps() {
    local s=${1,,} m
    [[ $s =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || return 1
    case ${BASH_REMATCH[3]} in
        ''|bit) m=0.125;; kbit) m=125;; mbit) m=125e3;; gbit) m=125e6;; tbit) m=125e9;;
        kibit) m=128;; mibit) m=131072;; gibit) m=134217728;;
        bps) m=1;; kbps) m=1e3;; mbps) m=1e6;; gbps) m=1e9;;
        kibps) m=1024;; mibps) m=1048576;; gibps) m=1073741824;;
        *) return 1;;
    esac
    awk -v n="${BASH_REMATCH[1]}" -v m="$m" 'BEGIN { printf "%.0f\n", n * m }'
}

# TERM then KILL whatever still runs in our namespace (only processes started through it), then delete it.
# (Invoked by the EXIT trap; $pids is a list of pids, split on purpose.)
# shellcheck disable=SC2317,SC2086,SC2116
cleanup() {
    local rc=$? pids i
    trap - EXIT INT TERM HUP
    if [ -n "$NS" ] && [ -e "/run/netns/$NS" ]; then
        pids=$(ip netns pids "$NS" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            log "stopping leftover processes in $NS: $(echo $pids)"
            kill -TERM $pids 2>/dev/null || true
            for i in 1 2 3 4 5 6 7 8 9 10; do
                sleep 0.2
                pids=$(ip netns pids "$NS" 2>/dev/null || true)
                [ -n "$pids" ] || break
            done
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$NS" 2>/dev/null || log "warning: could not delete network namespace $NS"
    fi
    exit "$rc"
}

make_ns() { # make_ns NAME RATE
    NS=$1
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    ip netns add "$NS" || { NS=; return 1; }
    ip -n "$NS" link set lo up || return 1
    [ "$2" != none ] || return 0
    local Bps burst
    Bps=$(rate_Bps "$2") || { log "cannot parse RATE '$2' (e.g. 2gbit, 500mbit)"; return 1; }
    [ "$Bps" -ge 1000 ] || { log "RATE below 8kbit is not supported"; return 1; }
    burst=${BURST:-$(( Bps / 1000 > 131072 ? Bps / 1000 : 131072 ))}
    tc -n "$NS" qdisc add dev lo root tbf rate "$2" burst "$burst" latency "${LATENCY:-20ms}" || return 1
}

cmd_check() {
    need_tools || { echo "netns: no"; exit 1; }
    command -v mpirun >/dev/null || log "note: mpirun not found (needed by run)"
    if make_ns "scmoe-check-$$" 1gbit 2>/dev/null && ip netns exec "$NS" true &&
       tc -n "$NS" qdisc show dev lo | grep -q tbf; then
        echo "netns: yes (network namespace + tc tbf on lo work here)"
        exit 0
    fi
    echo "netns: no (cannot create a network namespace with a tbf qdisc; kernel without CONFIG_NET_NS or CONFIG_NET_SCH_TBF, or no CAP_NET_ADMIN)"
    exit 1
}

cmd_run() {
    [ $# -ge 1 ] || usage
    local rate=$1; shift
    [ "${1:-}" = -- ] && shift
    need_tools || exit 1
    command -v mpirun >/dev/null || die "mpirun not found"
    local -a args=("$@") def=()
    declare -A mca=()
    local i=0
    while [ $i -lt ${#args[@]} ]; do
        case ${args[i]} in
            -mca|--mca|-gmca|--gmca) [ -z "${args[i+1]:-}" ] || mca[${args[i+1]}]=1; i=$((i + 2));;
        esac
        i=$((i + 1))
    done
    local flags=${TCP_FLAGS:-send,inplace,need-ack,need-csum} kv k env
    local -a defaults=("btl=tcp,self" "btl_tcp_if_include=lo" "oob_tcp_if_include=lo")
    [ "$flags" = default ] || defaults+=("btl_tcp_flags=$flags")
    for kv in "${defaults[@]}"; do
        k=${kv%%=*} env=OMPI_MCA_${kv%%=*}
        [ -n "${mca[$k]:-}" ] || [ -n "${!env:-}" ] || def+=(--mca "$k" "${kv#*=}")
    done
    if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
    make_ns "scmoe-$$" "$rate" || die "could not set up the network namespace (try: bench/netns.sh check)"
    log "namespace $NS, lo shaped to $rate${BURST:+ (burst $BURST)}: mpirun ${def[*]} ${args[*]}"
    # Not exec: the EXIT trap must delete the namespace after mpirun ends. In the background + wait,
    # so that a signal to this script runs its trap at once (bash defers traps while a foreground
    # child runs); the trap then stops mpirun and its ranks (everything inside the namespace).
    ip netns exec "$NS" mpirun "${def[@]}" "${args[@]}" &
    local rc=0
    wait $! || rc=$?
    exit $rc
}

case ${1:-} in
    check) cmd_check;;
    run) shift; cmd_run "$@";;
    *) usage;;
esac
