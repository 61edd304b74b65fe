#!/usr/bin/env bash
# quality.sh: the same small language model trained with each block-pair arch, same seed, same data,
# same steps, final train and validation losses side by side (a sanity check of the architectures,
# not a timed test: ScMoE must learn and land close to top-2).
#   bench/quality.sh [steps] [ranks] [extra train_lm flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-200}; ranks=${2:-2}; shift $(( $# > 2 ? 2 : $# ))
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
make -s all examples >/dev/null
common="--d 64 --hidden 256 --experts 8 --heads 4 --pairs 2 --seq 64 --batch 8 --steps $steps --warmup 20
        --lr 3e-3 --eval-every 0 --seed 1234 --quiet $*"
printf "%-12s %12s %12s\n" arch train_loss val_loss
for a in "top2 1" "top1 1" "shared 1" "scmoe 1" "scmoe 2" "scmoe 3"; do
    set -- $a
    log=$(mktemp)
    mpirun --oversubscribe -np "$ranks" -x OMP_NUM_THREADS=1 build/examples/train_lm --arch "$1" --pos "$2" $common --log "$log" >/dev/null
    name=$1; [ "$1" = scmoe ] && name="scmoe-pos$2"
    /usr/bin/python3 - "$log" "$name" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
print(f"{sys.argv[2]:<12} {rows[-1]['loss']:12.4f} {val[-1] if val else float('nan'):12.4f}")
PY
    rm -f "$log"
done
