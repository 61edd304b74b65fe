#!/usr/bin/env bash
# bench/step_model.sh [OUT]: measure every constant of the training-step time model (docs/scaling.md,
# "One training step"), run the validation on 2, 4 and 8 emulated hosts, and regenerate the tables and
# plots with tools/step_model.py (tables on stdout and in OUT/tables.md, plots in docs/img). One command;
# as root (network namespaces); 37 minutes on this 2-core machine under load 20-90, less on a quiet one.
#
#   bench/step_model.sh                      # raw outputs in build/step_model, tables on stdout
#   RATES="1gbit" HOSTS="2 4" bench/step_model.sh /tmp/sm   # a shorter run
#   tools/step_model.py build/step_model --svg docs/img   # the tables and plots again, no measuring
#
# What it runs (every output file keeps the machine's `uptime` before and after, since the hosts of
# the emulated cluster share this machine's cores with whatever else runs on it):
#   compute   the pair alone on 1 rank (bench_overlap, top2 and scmoe2, SCMOE_TRACE on): every
#             operation's time (the trace), the SGD step (train - pair f+b)
#   planner   bench_route_scale: GLOBAL's host time per planned assignment
#   per link rate RATE and host count H (../shared/tools/netcluster.sh: H network namespaces, one
#   RATE full-duplex NIC each, 1 rank per host, all ranks on this machine's cores):
#     link    bench_link: latency (8 B ping-pong), bandwidth (4 MiB ping-pong), the all-to-all, the
#             all-reduce at 3 sizes and the routing's small collectives
#     compute the 1-rank run again just before (the load changes: the model takes this one)
#     link    (also with libnbc's ring all-reduce forced, linkring_*: see "the all-reduce's algorithm")
#     steps   bench_overlap --archs top2,scmoe2 --scope global, then --scope local: the measured step
#             and its parts that the model predicts; then scmoe2 with the ring all-reduce (steps_*_ring);
#             all with --grad-sync-algo mpi, the MPI_Iallreduce whose binomial tree or ring the model
#             names (the library's default sums large buckets in its own two rounds)
# Env: RATES (default "1gbit 250mbit"), HOSTS ("2 4 8"), STEPS (timed steps per run, 2), NC (the
#      netcluster script, default ../shared/tools/netcluster.sh from the repository root), SVG (where
#      the plots go, default docs/img).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/step_model}
RATES=${RATES:-"1gbit 250mbit"}
HOSTS=${HOSTS:-"2 4 8"}
STEPS=${STEPS:-2}
SVG=${SVG:-docs/img}
NC=${NC:-$(cd .. && pwd)/shared/tools/netcluster.sh}
[ -x "$NC" ] || NC=/work/shared/tools/netcluster.sh
[ -x "$NC" ] || { echo "step_model.sh: no netcluster.sh (set NC=)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "step_model.sh: needs root (network namespaces)" >&2; exit 1; }
# the emulated cluster's namespaces have fixed names: never tear down someone else's
if ip netns list 2>/dev/null | grep -qE '^nc([0-9]+|br)\b'; then
    echo "step_model.sh: a netcluster is already up (ip netns list): someone else's run? not touching it" >&2
    exit 1
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
make -s build/bench/bench_overlap build/bench/bench_link build/bench/bench_route_scale
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # absolute: the trace path reaches the ranks as it is
rm -f "$OUT"/*.txt "$OUT"/*.json
t0=$(date +%s)
stamp() { echo "# uptime: $(uptime)"; }
trap '"$NC" down >/dev/null 2>&1 || true' EXIT

echo "step_model: compute on 1 rank" >&2
nproc --all >"$OUT/cores.txt"   # (plain nproc honours OMP_NUM_THREADS=1)
for arch in top2 scmoe2; do
    { stamp
      SCMOE_TRACE="$OUT/trace_$arch.json" mpirun --oversubscribe -np 1 -x OMP_NUM_THREADS -x SCMOE_TRACE \
          build/bench/bench_overlap --archs $arch --steps "$STEPS"
      stamp; } >"$OUT/compute_$arch.txt"
done
for i in 1 2 3; do   # the least of 3 runs (tools/step_model.py): load only adds
    stamp; build/bench/bench_route_scale -n 4096 -k 1 -E 64 -P 2,64,1024 -r 3; stamp
done >"$OUT/planner.txt"

for rate in $RATES; do
    for h in $HOSTS; do
        echo "step_model: $h hosts at $rate ($(( $(date +%s) - t0 )) s)" >&2
        # the compute constant again, just before, under the machine's load of the moment
        { stamp; mpirun --oversubscribe -np 1 -x OMP_NUM_THREADS build/bench/bench_overlap --archs top2,scmoe2 \
              --steps "$STEPS"; stamp; } >"$OUT/compute_${rate}_$h.txt"
        "$NC" up "$h" "$rate" 2>/dev/null
        { stamp; "$NC" run -np "$h" -x OMP_NUM_THREADS -- build/bench/bench_link -E 8; stamp; } \
            >"$OUT/link_${rate}_$h.txt"
        { stamp; "$NC" run --mca coll_libnbc_iallreduce_algorithm 1 -np "$h" -x OMP_NUM_THREADS -- \
              build/bench/bench_link -E 8; stamp; } >"$OUT/linkring_${rate}_$h.txt"
        for scope in global local; do
            { stamp
              "$NC" run -np "$h" -x OMP_NUM_THREADS -- build/bench/bench_overlap --archs top2,scmoe2 \
                  --steps "$STEPS" --scope $scope --grad-sync-algo mpi
              stamp; } >"$OUT/steps_${rate}_${h}_$scope.txt"
        done
        { stamp
          "$NC" run --mca coll_libnbc_iallreduce_algorithm 1 -np "$h" -x OMP_NUM_THREADS -- \
              build/bench/bench_overlap --archs scmoe2 --steps "$STEPS" --scope global --grad-sync-algo mpi
          stamp; } >"$OUT/steps_${rate}_${h}_ring.txt"
        "$NC" down 2>/dev/null
    done
done
echo "step_model: measured in $(( $(date +%s) - t0 )) s" >&2
# tables: a node 50x this core (a many-core CPU node) and 1000x (a GPU) for the prediction
/usr/bin/python3 tools/step_model.py "$OUT" --svg "$SVG" | tee "$OUT/tables.md"
/usr/bin/python3 tools/step_model.py "$OUT" --svg "$SVG" --speedup 1000 | sed -n '/^## Prediction/,$p' |
    tee -a "$OUT/tables.md"
