#!/usr/bin/env bash
# kill_rank.sh: a rank of examples/train_lm is SIGKILLed mid-step; every other rank must exit within
# KILL_LIMIT_S (30) seconds (no hang), and the last good checkpoint must resume and continue the loss
# curve bit for bit.
#
# Scenarios (P ranks, victim rank): 2/1, 2/0, 3/2, 3/1, and 2/1 with a checkpoint every step (so the
# kill often lands inside ckpt_save). Each: train a tiny model (--save-every 3, or 1), wait until a
# checkpoint exists and a random number of further steps have been logged, SIGKILL the victim, then
#   - every surviving train_lm process and mpirun are gone within KILL_LIMIT_S (seconds measured);
#   - DIR/ckpt.bin is a complete checkpoint: train_lm --resume on the same P ranks, --stop-at 4 steps
#     later, exits 0 and says where it resumed (a step the killed run had reached);
#   - the resumed steps' loss, ce, aux, lr and grad_norm are identical (17 digits) to what the killed run
#     had logged for the same steps (when it got that far).
# Prints "ok - ..." / "not ok - ..." and "N passed, N failed". Env: BUILD (build), KILL_LIMIT_S (30).
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
TRAIN=$BUILD/examples/train_lm
LIMIT=${KILL_LIMIT_S:-30}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_NUM_THREADS=1
MPIRUN="mpirun --oversubscribe -x OMP_NUM_THREADS=1"
pass=0 fail=0
ok() { if [ "$1" = 0 ]; then pass=$((pass + 1)); echo "ok - $2"; else fail=$((fail + 1)); echo "not ok - $2"; fi; }
[ -x "$TRAIN" ] || { echo "not ok - $TRAIN is not built (make examples)"; echo "0 passed, 1 failed"; exit 1; }
TMP=$(mktemp -d /tmp/scmoe_kill_XXXXXX)
MPID=
cleanup() {
    [ -n "$MPID" ] && kill -KILL "$MPID" 2>/dev/null
    for p in $(rank_pids); do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT
cat scmoe.h pair.c moe.c > "$TMP/text.txt"
ARGS="--d 32 --hidden 64 --experts 6 --heads 2 --pairs 2 --seq 32 --batch 4 --warmup 5 --eval-every 0 --quiet --data $TMP/text.txt --steps 100000"

# the train_lm processes started by our mpirun (its children), and a process's world rank
rank_pids() { [ -n "$MPID" ] && ps -o pid= --ppid "$MPID" 2>/dev/null | tr -d ' '; }
rank_of() { tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p'; }
fields() { sed -E 's/,"val_loss".*//' "$1"; } # step, loss, ce, aux, lr, grad_norm

scenario() { # scenario P VICTIM SAVE_EVERY
    local P=$1 victim=$2 every=$3 dir="$TMP/ck_$1_$2_$3" log="$TMP/run_$1_$2_$3.jsonl"
    local what="$P ranks, rank $victim killed, checkpoint every $every step(s)"
    rm -rf "$dir"
    $MPIRUN -np "$P" "$TRAIN" $ARGS --save "$dir" --save-every "$every" --log "$log" > "$TMP/out" 2>&1 &
    MPID=$!
    # wait for a checkpoint, then for a random 3..12 more logged steps
    local extra=$((3 + RANDOM % 10)) t=0 base=0
    while [ $t -lt 600 ] && [ ! -s "$dir/ckpt.bin" ]; do sleep 0.1; t=$((t + 1)); done
    base=$(wc -l < "$log" 2>/dev/null || echo 0)
    while [ $t -lt 900 ] && [ "$(wc -l < "$log" 2>/dev/null || echo 0)" -lt $((base + extra)) ]; do sleep 0.05; t=$((t + 1)); done
    local vpid="" p
    for p in $(rank_pids); do [ "$(rank_of "$p")" = "$victim" ] && vpid=$p; done
    if [ -z "$vpid" ]; then
        ok 1 "$what: could not find the victim's process (job state: $(tail -n 2 "$TMP/out" | tr '\n' ' '))"
        kill -KILL "$MPID" 2>/dev/null; wait "$MPID" 2>/dev/null; MPID=; return
    fi
    local others
    others=$(rank_pids | grep -vx "$vpid" | tr '\n' ' ')
    local at_step
    at_step=$(wc -l < "$log")
    local t0 t1
    t0=$(date +%s.%N)
    kill -KILL "$vpid"
    # every other rank and mpirun must go
    local gone=1
    while :; do
        local alive=""
        for p in $others; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        kill -0 "$MPID" 2>/dev/null && alive="$alive mpirun"
        [ -z "$alive" ] && break
        if awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$LIMIT" 'BEGIN {exit !(b - a > l)}'; then gone=0; break; fi
        sleep 0.05
    done
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
    if [ $gone = 0 ]; then kill -KILL "$MPID" 2>/dev/null; for p in $others; do kill -KILL "$p" 2>/dev/null; done; fi
    wait "$MPID" 2>/dev/null
    local rc=$?
    MPID=
    local verdict="exited in $secs s"
    [ $gone = 1 ] || verdict="still running after $secs s"
    [ $gone = 1 ]; ok $? "$what at step ~$at_step: every other rank and mpirun $verdict (limit $LIMIT s; mpirun exit $rc)"
    # the last good checkpoint resumes, 4 steps past where the killed run got
    local left_tmp=no stop rc2 first
    [ -e "$dir/ckpt.tmp" ] && left_tmp=yes
    stop=$(wc -l < "$log")
    rm -f "$TMP/resumed.jsonl" "$TMP/ref.jsonl"
    $MPIRUN -np "$P" "$TRAIN" $ARGS --resume "$dir" --stop-at $((stop + 4)) --log "$TMP/resumed.jsonl" > "$TMP/rout" 2>&1
    rc2=$?
    first=$(head -n 1 "$TMP/resumed.jsonl" 2>/dev/null | sed -E 's/^\{"step":([0-9]+),.*/\1/')
    [ $rc2 = 0 ] && [ -n "$first" ] && [ $(((first - 1) % every)) = 0 ] && [ "$first" -le $((stop + 1)) ] &&
        [ "$(tail -n 1 "$TMP/resumed.jsonl" | sed -E 's/^\{"step":([0-9]+),.*/\1/')" = $((stop + 4)) ]
    ok $? "$what: the last good checkpoint (step $((${first:-1} - 1))) resumes and runs to step $((stop + 4)) (exit $rc2; ckpt.tmp left behind: $left_tmp)"
    # the same steps without any kill: the killed run's log and the resumed run's must both match it
    $MPIRUN -np "$P" "$TRAIN" $ARGS --stop-at $((stop + 4)) --log "$TMP/ref.jsonl" > /dev/null 2>&1
    local bad=0 n=0
    while IFS= read -r line; do
        n=$((n + 1))
        grep -qxF -- "$line" <(fields "$TMP/ref.jsonl") || bad=$((bad + 1))
    done < <(fields "$TMP/resumed.jsonl"; fields "$log")
    [ $bad = 0 ] && [ $n -gt 4 ]
    ok $? "$what: the killed run's $stop steps and the resumed run's steps equal an uninterrupted run's (loss, ce, aux, lr, grad_norm to 17 digits; $bad of $n differ)"
}

scenario 2 1 3
scenario 2 0 3
scenario 3 2 3
scenario 3 1 3
scenario 2 1 1
echo "$pass passed, $fail failed"
[ $fail = 0 ]
