#!/usr/bin/env bash
# linkdown.sh: two emulated hosts (network namespaces joined by one veth link) run a block-pair training
# loop (tests/faults/linkdown_pair) with comm_timeout_s = TIMEOUT_S (3); the test takes the link down
# mid-run. Wanted: every rank's library call returns SCMOE_ERR_TIMEOUT with a message that names the
# exchange, and every rank's program exits instead of hanging. mpirun itself may hang once its remote
# daemon is unreachable (OpenMPI's out-of-band channel uses the same link): the test kills it.
#
# Self-contained (needs root, iproute2, util-linux unshare, OpenMPI): namespaces scmoe-ld<pid>a / b,
# link ldA <-> ldB with 10.231.<n>.1 / .2, each host its own UTS namespace (hostname) so OpenMPI sees two
# nodes; the rank on host b is started through an rsh agent written to the scratch directory
# (ip netns exec ... unshare --uts). Nothing is created in the root namespace; everything (namespaces,
# processes in them, scratch files) is removed on exit. Without root or namespaces: a SKIP line.
#
# Rounds: ROUNDS (3) times, progress poll / thread alternating (rounds 3, 6, ... with pipeline_chunks 3,
# so chained dispatches are in flight too), the link taken down after a random 5..20
# completed steps. Each rank writes its own report file (see linkdown_pair.c). Per round and rank:
#   - the library call in flight returns an error and the program exits, no call outliving
#     4 x comm_timeout_s + 10 s (the program's own watchdog reports HUNG and exits otherwise);
#   - the error is SCMOE_ERR_TIMEOUT and its message names the exchange ("did not complete"): a token
#     all-to-all, a gradient all-reduce, or the small per-step agreement (counts, routing, status).
# A rank still inside the library 3 x comm_timeout_s + 3 s after the link went down has its stack
# printed (gdb), which names the call that does not time out.
# Prints "ok - ..." / "not ok - ..." and "N passed, N failed". Env: BUILD (build), TIMEOUT_S, ROUNDS.
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PROG=$PWD/$BUILD/faults/linkdown_pair
TIMEOUT_S=${TIMEOUT_S:-3}
ROUNDS=${ROUNDS:-3}
EXIT_LIMIT=${EXIT_LIMIT_S:-30}
pass=0 fail=0
ok() { if [ "$1" = 0 ]; then pass=$((pass + 1)); echo "ok - $2"; else fail=$((fail + 1)); echo "not ok - $2"; fi; }
# Known library bugs (reported, docs/reliability.md), listed in SCMOE_KNOWN_BUGS: a failure explained
# by one of them (read from the stuck rank's stack) is a TAP TODO line, printed but not counted.
#   blocking-collective-timeout  a rank blocked in a blocking MPI collective of the library
#                                (scmoe__status_agree, gate_encode's allgather/allgatherv/allreduce) never times out
#   grad-sync-timeout            scmoe__schedule_grad_wait waits comm_timeout_s for each of the 10 gradient
#                                buckets in turn after the first has timed out
known() { [[ ",${SCMOE_KNOWN_BUGS:-}," == *",$1,"* ]]; }
todo=0
todo() { todo=$((todo + 1)); echo "not ok - $1 # TODO known library bug $2 (not counted)"; }
skip() { echo "ok - link down # SKIP $1"; echo "0 passed, 0 failed"; exit 0; }

[ "$(id -u)" = 0 ] || skip "needs root (network namespaces)"
for c in ip unshare mpirun; do command -v $c > /dev/null || skip "missing command $c"; done
[ -x "$PROG" ] || { echo "not ok - $PROG is not built (make $BUILD/faults/linkdown_pair)"; echo "0 passed, 1 failed"; exit 1; }

TMP=$(mktemp -d /tmp/scmoe_linkdown_XXXXXX)
NA=scmoe-ld$$a NB=scmoe-ld$$b
SUB=$(( $$ % 200 + 20 ))
IPA=10.231.$SUB.1 IPB=10.231.$SUB.2
MPID=

kill_ns() { # TERM, then KILL, every process in namespace $1
    local pids i
    pids=$(ip netns pids "$1" 2>/dev/null)
    [ -n "$pids" ] || return 0
    kill -TERM $pids 2>/dev/null
    for i in 1 2 3 4 5 6 7 8 9 10; do
        sleep 0.2
        pids=$(ip netns pids "$1" 2>/dev/null)
        [ -n "$pids" ] || return 0
    done
    kill -KILL $pids 2>/dev/null
}
teardown() {
    if [ -n "$MPID" ]; then kill -KILL "$MPID" 2>/dev/null; { wait "$MPID"; } 2>/dev/null; fi
    MPID=
    for n in $NA $NB; do
        [ -e /run/netns/$n ] || continue
        kill_ns $n
        ip netns del $n 2>/dev/null
    done
}
trap 'teardown; [ -n "${KEEP:-}" ] || rm -rf "$TMP"' EXIT

setup() {
    teardown
    ip netns add $NA && ip netns add $NB || return 1
    ip -n $NA link set lo up && ip -n $NB link set lo up || return 1
    ip -n $NA link add ldA type veth peer name ldB netns $NB || return 1
    ip -n $NA addr add $IPA/24 dev ldA && ip -n $NB addr add $IPB/24 dev ldB || return 1
    ip -n $NA link set ldA up && ip -n $NB link set ldB up || return 1
    # reachable: a TCP connect to a closed port of b is refused (no ping needed)
    ip netns exec $NA timeout 5 bash -c "exec 3<>/dev/tcp/$IPB/9" 2>&1 | grep -q refused || return 1
}
setup || skip "cannot create two network namespaces joined by a veth pair here"

# hosts: names OpenMPI sees; the rsh agent maps a host name to its namespace
cat > "$TMP/hostfile" <<EOF
hosta slots=1
hostb slots=1
EOF
cat > "$TMP/rsh" <<EOF
#!/bin/bash
# rsh stand-in for OpenMPI's plm_rsh_agent: [ssh options] HOST COMMAND...
while [ \$# -gt 0 ]; do case \$1 in -*) shift;; *) break;; esac; done
host=\$1; shift
case \$host in hosta|$IPA) ns=$NA;; hostb|$IPB) ns=$NB;; *) echo "rsh: unknown host \$host" >&2; exit 255;; esac
exec ip netns exec \$ns unshare --uts -- /bin/sh -c "hostname \$host; \$*"
EOF
chmod 755 "$TMP/rsh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MCA="--mca plm_rsh_agent $TMP/rsh --mca plm_rsh_no_tree_spawn 1 --mca pml ob1 --mca btl tcp,self"
MCA="$MCA --mca btl_tcp_if_include 10.231.$SUB.0/24 --mca oob_tcp_if_include 10.231.$SUB.0/24 --mca routed direct"

steps_done() { local n; n=$(grep -c '^step .* ok$' "$1" 2>/dev/null); echo "${n:-0}"; }

for round in $(seq 1 "$ROUNDS"); do
    prog=$([ $((round % 2)) = 1 ] && echo poll || echo thread)
    chunks=$([ $((round % 3)) = 0 ] && echo 3 || echo 0)
    what="round $round (progress $prog, pipeline_chunks $chunks, comm_timeout_s $TIMEOUT_S)"
    [ $round = 1 ] || setup || { ok 1 "$what: namespaces"; continue; }
    rep=$TMP/rep$round
    rm -f "$rep".*
    ip netns exec $NA unshare --uts -- /bin/sh -c "hostname hosta; exec mpirun $MCA --hostfile $TMP/hostfile \
        --bind-to none -np 2 -x OMP_NUM_THREADS=1 $PROG $rep $TIMEOUT_S $prog 100000 $chunks" > "$TMP/mpirun$round.out" 2>&1 &
    MPID=$!
    want=$((5 + RANDOM % 16)) t=0
    while [ $t -lt 600 ] && { [ "$(steps_done "$rep.0")" -lt $want ] || [ "$(steps_done "$rep.1")" -lt $want ]; }; do
        kill -0 $MPID 2>/dev/null || break
        sleep 0.1; t=$((t + 1))
    done
    if [ "$(steps_done "$rep.1")" -lt $want ]; then
        ok 1 "$what: the job did not start on both hosts ($(tail -n 3 "$TMP/mpirun$round.out" | tr '\n' ' '))"
        teardown; continue
    fi
    pid0=$(sed -n 's/^pid //p' "$rep.0") pid1=$(sed -n 's/^pid //p' "$rep.1")
    ip -n $NA link set ldA down
    t0=$(date +%s.%N)
    at0=$(steps_done "$rep.0") at1=$(steps_done "$rep.1")
    # both ranks must leave: their processes exit (they live in the two namespaces, same pid space)
    stacked=0
    while :; do
        alive=""
        kill -0 "$pid0" 2>/dev/null && alive="$alive 0"
        kill -0 "$pid1" 2>/dev/null && alive="$alive 1"
        [ -z "$alive" ] && break
        # a rank still inside the library well past the timeout: where is it? (gdb, when installed)
        if [ $stacked = 0 ] && command -v gdb > /dev/null &&
           awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$TIMEOUT_S" 'BEGIN {exit !(b - a > 3 * l + 3)}'; then
            stacked=1
            for r in $alive; do
                p=$([ $r = 0 ] && echo $pid0 || echo $pid1)
                timeout 20 gdb -p "$p" -batch -ex "thread apply all bt" > "$TMP/stack$round.$r" 2>&1
                echo "# rank $r is still inside the library $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.0f", b - a}') s after the link went down; its main thread:"
                awk '/^Thread /{m = ($2 == 1)} m' "$TMP/stack$round.$r" | grep -E '^#[0-9]+ ' |
                    grep -E ' (PMPI_|MPI_|ompi_coll|mca_coll|scmoe_|moe_|schedule_|scmoe__status_agree|config_agree|sync_grads|inflight_|mpi_[a-z]|main)' |
                    sed -E 's/^(#[0-9]+) +(0x[0-9a-f]+ in )?([^ ]+) .*( at [^ ]+)?$/#   \1 \3\4/' | head -n 10
            done
        fi
        awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$EXIT_LIMIT" 'BEGIN {exit !(b - a > l)}' && break
        sleep 0.1
    done
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    for r in 0 1; do
        f=$rep.$r
        last=$(grep -E '^(ERROR|HUNG)' "$f" | tail -n 1)
        at=$([ $r = 0 ] && echo $at0 || echo $at1)
        [ -n "$last" ] && echo "# rank $r (link down after its step $at): $last"
        [ -z "$last" ] && echo "# rank $r (link down after its step $at): no error reported, $(kill -0 "$(sed -n 's/^pid //p' "$f")" 2>/dev/null && echo "still running" || echo "gone")"
        # a rank that did not come back: which known library bug holds it (from its stack, when gdb is here)
        bug=""
        if [ -s "$TMP/stack$round.$r" ]; then
            main=$(awk '/^Thread /{m = ($2 == 1)} m' "$TMP/stack$round.$r")
            if echo "$main" | grep -q 'scmoe__schedule_grad_wait'; then bug=grad-sync-timeout
            elif echo "$main" | grep -Eq 'PMPI_(Allreduce|Allgather|Allgatherv)' &&
                 echo "$main" | grep -Eq 'mpi_allreduce|mpi_allgather'; then bug=blocking-collective-timeout; fi
        fi
        case $last in ERROR*) returned=0;; *) returned=1;; esac
        msg="$what: rank $r: the library call returns an error and the program exits (no call outlives 4 x comm_timeout_s + 10 s)"
        if [ $returned != 0 ] && [ -n "$bug" ] && known "$bug"; then todo "$msg" "$bug"; else ok $returned "$msg"; fi
        echo "$last" | grep -q 'SCMOE_ERR_TIMEOUT' && echo "$last" | grep -q 'did not complete' &&
            echo "$last" | grep -Eq '(all-to-all|all-reduce|per-step agreement)'
        rc=$?
        msg="$what: rank $r: the error is SCMOE_ERR_TIMEOUT and its message names the exchange"
        if [ $rc != 0 ] && [ -n "$bug" ] && known "$bug"; then todo "$msg" "$bug"; else ok $rc "$msg"; fi
    done
    echo "# both rank processes gone ${secs} s after the link went down${alive:+ (still running: rank$alive)}"
    # mpirun (and the remote daemon) may wait forever on the dead link: kill them with the namespaces
    teardown
done
[ $todo = 0 ] || echo "# $todo check(s) failed on known library bugs (TODO, not counted)"
echo "$pass passed, $fail failed"
[ $fail = 0 ]
