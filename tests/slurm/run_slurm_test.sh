#!/usr/bin/env bash
# run_slurm_test.sh: examples/slurm/train.sbatch on a real, throw-away, single-node Slurm.
#
# Installs slurm-wlm and munge if missing (apt-get, through tools/install_deps.sh), starts munged,
# slurmctld and slurmd as root with every file under a temporary directory (their own ports, key,
# socket, state, logs: nothing of a system Slurm is used or touched), submits a short training job of
# 2 tasks x 2 CPUs (1 task x 2 CPUs on a node with fewer than 4 CPUs) with `sbatch --wait`, checks
# that it completed, printed loss lines and the summary, and that each task's CPU mask (srun's and
# the one train_lm reads with sched_getaffinity) holds as many CPUs as it runs threads; then a job
# submitted as plain `sbatch -N 1 -n 1` (the script fixes no layout of its own); and tears
# everything down, also on failure or Ctrl-C. Needs root (the daemons run as root). The setup
# is the one measured to work on Debian 12 (Slurm 22.05), with TaskPlugin=task/affinity so srun binds.
# Prints "ok - ..." / "not ok - ..." and "N passed, N failed"; exits non-zero on a failure.
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
pass=0 fail=0
ok() { if [ "$1" = 0 ]; then pass=$((pass + 1)); echo "ok - $2"; else fail=$((fail + 1)); echo "not ok - $2"; fi; }
finish() { echo "$pass passed, $fail failed"; [ $fail = 0 ]; exit $?; }

[ "$(id -u)" = 0 ]; ok $? "running as root (the test starts slurmctld, slurmd and munged itself)"
[ $fail = 0 ] || finish
[ -x "$BUILD/examples/train_lm" ]; ok $? "$BUILD/examples/train_lm is built"
[ $fail = 0 ] || finish

# ---- install ----
fresh_install=0
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    fresh_install=1
    tools/install_deps.sh slurm-wlm munge > /dev/null 2>&1
fi
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null
ok $? "slurm-wlm and munge are installed ($(slurmctld -V 2>/dev/null))"
[ $fail = 0 ] || finish
# on a host with systemd, the packages may have just started their own services: stop those
if [ $fresh_install = 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl stop slurmd slurmctld munge > /dev/null 2>&1 || true
fi

# ---- bring up munged, slurmctld, slurmd under a temporary directory ----
T=$(mktemp -d /tmp/scmoe_slurm_XXXXXX)
chmod 755 "$T"
teardown() {
    # slurmd and slurmctld first (they talk to munged), each by its pid file, then wait for them
    for d in slurmd slurmctld munged; do
        [ -s "$T/$d.pid" ] && kill -TERM "$(cat "$T/$d.pid")" 2>/dev/null
        for _ in $(seq 50); do
            { [ -s "$T/$d.pid" ] && kill -0 "$(cat "$T/$d.pid")" 2>/dev/null; } || break
            sleep 0.1
        done
    done
    rm -rf "$T"
}
trap teardown EXIT
trap 'exit 130' INT TERM

HOST=$(hostname -s)
NCPU=$(nproc)
PORT=$((20000 + $$ % 20000)) # slurmctld's port, slurmd's is the next: clear of a system Slurm's 6817/6818
dd if=/dev/urandom of="$T/munge.key" bs=1024 count=1 status=none
chmod 400 "$T/munge.key"
munged --force --key-file="$T/munge.key" --socket="$T/munge.sock" --pid-file="$T/munged.pid" \
       --log-file="$T/munged.log" --seed-file="$T/munged.seed" > "$T/munged.out" 2>&1
ok $? "munged started"
mkdir -p "$T/state" "$T/spool"
cat > "$T/slurm.conf" <<EOF
ClusterName=scmoe-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge.sock
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$T/slurm.conf
slurmctld -f "$SLURM_CONF" -c > "$T/slurmctld.out" 2>&1 && slurmd -f "$SLURM_CONF" > "$T/slurmd.out" 2>&1
ok $? "slurmctld and slurmd started"
state=""
for _ in $(seq 100); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
    [ "$state" = idle ] && break
    sleep 0.2
done
[ "$state" = idle ]; ok $? "the node $HOST ($NCPU CPUs) is idle (state: ${state:-none})"
if [ $fail != 0 ]; then
    for f in munged.log slurmctld.log slurmd.log; do [ -f "$T/$f" ] && { echo "# $f:"; tail -n 5 "$T/$f" | sed 's/^/#   /'; }; done
    finish
fi

# ---- a short training job: 2 tasks x 2 CPUs (1 x 2 on a 2- or 3-CPU node) ----
cat scmoe.h pair.c > "$T/text.txt"
train_abs=$(cd "$BUILD/examples" && pwd)/train_lm
TRAIN_FLAGS="--d 32 --hidden 64 --experts 4 --heads 2 --pairs 2 --seq 32 --batch 4 --warmup 5 --data $T/text.txt"
NT=2 CPT=2
[ "$NCPU" -ge 4 ] || NT=1
# submit NAME SBATCH-LAYOUT... -- TRAIN-FLAGS...: runs the job to the end, sets job and job_out
submit() {
    local name=$1; shift
    local layout=()
    while [ "$1" != -- ]; do layout+=("$1"); shift; done
    shift
    job_out=$T/$name.out
    local start rc out
    start=$(date +%s)
    out=$(timeout 300 sbatch --wait --parsable "${layout[@]}" -o "$job_out" --export=ALL,TRAIN_LM="$train_abs" \
          examples/slurm/train.sbatch "$@" 2>&1); rc=$?
    job=$(echo "$out" | grep -E '^[0-9]+' | head -n 1 | cut -d';' -f1)
    ok $rc "sbatch --wait ${layout[*]} ran job ${job:-?} to the end in $(( $(date +%s) - start )) s (exit $rc)"
    local st
    st=$(scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)
    [ "$st" = JobState=COMPLETED ]; ok $? "the job's state is COMPLETED (${st:-no record})"
}
# binding NT CPT: srun's masks and train_lm's view of them: NT ranks, each with CPT CPUs of its own
# for CPT threads, and no warning about threads sharing cores
binding() {
    local nt=$1 cpt=$2
    grep -q "$nt ranks on 1 node(s) .* $cpt threads per rank" "$job_out" 2>/dev/null
    ok $? "the job ran $nt rank(s) x $cpt thread(s) on 1 node via srun --mpi=pmix"
    local masks bits
    masks=$(grep -o 'mask 0x[0-9a-f]* set' "$job_out" 2>/dev/null | sort -u | cut -d' ' -f2)
    bits=$(for m in $masks; do v=$((m)) c=0; while [ $v -gt 0 ]; do c=$((c + (v & 1))); v=$((v >> 1)); done; echo $c; done | sort -u | tr '\n' ' ')
    [ "$(echo "$masks" | grep -c .)" = "$nt" ] && [ "$bits" = "$cpt " ]
    ok $? "srun bound each of the $nt task(s) to $cpt CPU(s) of its own: masks $(echo $masks) (${bits% } CPUs each)"
    local seen
    seen=$(grep -cE "^rank [0-9]+ on .*: CPUs [-0-9,]+ \($cpt\) for $cpt OpenMP threads$" "$job_out" 2>/dev/null)
    [ "$seen" = "$nt" ] && ! grep -q '^warning: rank' "$job_out"
    ok $? "train_lm sees each rank's mask cover its threads ($seen of $nt lines: $(grep -m1 '^rank 0 on' "$job_out" 2>/dev/null))"
}
submit threads -N 1 -n $NT --cpus-per-task=$CPT -- $TRAIN_FLAGS --steps 40 --eval-every 20 --print-every 10 --save "$T/ckpt"
binding $NT $CPT
grep -qE '^step +40/40 \| loss [0-9.]+ ' "$job_out" 2>/dev/null; ok $? "its output has loss lines: $(grep -E '^step +40/' "$job_out" 2>/dev/null | cut -c1-60)"
grep -qE '^scmoe-pos2 +40 ' "$job_out" 2>/dev/null; ok $? "and the summary table"
[ -s "$T/ckpt/ckpt.bin" ]; ok $? "and saved its checkpoint"
# the layout is the submission's: a plain one-task job (refused while the script fixed 2 tasks per node)
submit plain -N 1 -n 1 -- $TRAIN_FLAGS --steps 10 --eval-every 0 --print-every 5
binding 1 1
if [ $fail != 0 ]; then
    for f in "$T"/threads.out "$T"/plain.out; do echo "# $f:"; sed 's/^/#   /' "$f" 2>/dev/null | tail -n 20; done
    echo "# slurmd.log:"; tail -n 10 "$T/slurmd.log" 2>/dev/null | sed 's/^/#   /'
fi
finish
