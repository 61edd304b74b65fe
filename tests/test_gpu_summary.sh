#!/usr/bin/env bash
# test_gpu_summary.sh: tools/gpu_summary.py (the summary block of tools/gpu_check.sh run) on fabricated
# logs shaped like the GPU machine's (issue 19: test_cuda failing 1 of 126, initcheck's 749 errors), and,
# given a bench_cuda binary (the emulation's will do), on the real output of bench/cuda/torch_peer_gpu.py
# --device cpu running it. No GPU needed.
#   tests/test_gpu_summary.sh [BENCH_CUDA]          ends with "N passed, N failed"
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-/usr/bin/python3}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
pass=0 fail=0
check() { # check DESCRIPTION COMMAND...
    if "${@:2}"; then echo "ok - $1"; pass=$((pass + 1)); else echo "not ok - $1"; fail=$((fail + 1)); fi
}
has() { grep -qF -- "$2" "$1"; }

# ---- fabricated logs ----
F=$D/fake
mkdir -p $F
echo "NVIDIA H200, 580.95.05, 143771 MiB" > $F/device.log
cmd() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> $F/commands.tsv; }
printf 'ok - a\nnot ok - scmoe__permute_rows scatter dst[map[r]] = src[r]: exact  (tests/test_cuda.c:801)\n125 passed, 1 failed\n' > $F/test_cuda.log
cmd test_cuda test 1 3 "/tmp/gb/build0/test_cuda"
printf 'ok - b\n156 passed, 0 failed\n' > $F/test_cuda_moe.log
cmd test_cuda_moe test 0 9 "/tmp/gb/build0/test_cuda_moe"
printf 'ok - c\nok - the MoE layer on the device vs the host # SKIP no CUDA device (no device)\n20 passed, 0 failed\n' > $F/test_cuda_moe_2ranks.log
cmd test_cuda_moe_2ranks test 0 4 "mpirun -np 2 /tmp/gb/build1/test_cuda_moe"
printf '========= COMPUTE-SANITIZER\n156 passed, 0 failed\n========= ERROR SUMMARY: 0 errors\n' > $F/memcheck_test_cuda_moe.log
cmd memcheck_test_cuda_moe san 0 30 "compute-sanitizer --tool memcheck --error-exitcode 86 /tmp/gb/build0/test_cuda_moe"
printf '========= COMPUTE-SANITIZER\n========= Uninitialized __global__ memory read of size 16 bytes\n=========     at cuda_copy\n156 passed, 0 failed\n========= ERROR SUMMARY: 749 errors\n' > $F/initcheck_test_cuda_moe.log
cmd initcheck_test_cuda_moe san 86 41 "compute-sanitizer --tool initcheck --error-exitcode 86 /tmp/gb/build0/test_cuda_moe"
printf '========= COMPUTE-SANITIZER\n126 passed, 0 failed\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n' > $F/racecheck_test_cuda.log
cmd racecheck_test_cuda san 0 50 "compute-sanitizer --tool racecheck --error-exitcode 86 /tmp/gb/build0/test_cuda"
printf '========= COMPUTE-SANITIZER\n' > $F/synccheck_test_cuda_moe.log
cmd synccheck_test_cuda_moe san 124 120 "compute-sanitizer --tool synccheck --error-exitcode 86 /tmp/gb/build0/test_cuda_moe"
cat > $F/peer_4k.log <<'EOF'
# torch_peer_gpu: torch 2.11.0 on NVIDIA H200; d=1024 h=4096 E=8 heads=16 8 x 512 = 4096 tokens, cf 2.0
torch fp32 top2   train    29.700 ms  infer    12.300 ms
torch fp32 scmoe2 train    28.100 ms  infer    11.800 ms
torch bf16 top2   train    21.300 ms  infer     6.500 ms
torch bf16 scmoe2 train    16.900 ms  infer     6.200 ms
# /tmp/gb/bench_cuda --d 1024 --hidden 4096 --experts 8 --heads 16 --seq 512 --batch 8 --reps 10
layer experts  E=8 d=1024 h=4096 rows=8192/rank  (fp32 math)
  scmoe layer fwd+bwd     40.700 ms    25.30 TFLOP/s (expert FLOPs; gate, routing, permutes included)
  plain cuBLAS            20.400 ms    50.40 TFLOP/s (the same six GEMM shapes, one expert)
  RATIO library / cuBLAS TFLOP/s: 0.502
pair  d=1024 h=4096 E=8 heads=16 batch=8 seq=512, 1 rank(s)
  top2   train    50.600 ms  infer    20.900 ms
  scmoe2 train    47.000 ms  infer    19.100 ms
  SPEEDUP scmoe2 over top2: train 1.077x  infer 1.094x
# /tmp/gb/bench_cuda --d 1024 --hidden 4096 --experts 8 --heads 16 --seq 512 --batch 8 --reps 10 --bf16
layer experts  E=8 d=1024 h=4096 rows=8192/rank  (bf16 math)
  RATIO library / cuBLAS TFLOP/s: 0.147
pair  d=1024 h=4096 E=8 heads=16 batch=8 seq=512, 1 rank(s)
  top2   train    36.000 ms  infer    15.600 ms
  scmoe2 train    33.000 ms  infer    14.200 ms
  SPEEDUP scmoe2 over top2: train 1.091x  infer 1.099x
VS TORCH fp32 (4096 tokens): top2 train 0.587x infer 0.589x  scmoe2 train 0.598x infer 0.618x
VS TORCH bf16 (4096 tokens): top2 train 0.592x infer 0.417x  scmoe2 train 0.512x infer 0.437x
EOF
cmd peer_4k bench 0 40 "python3 bench/cuda/torch_peer_gpu.py --batch 8 --bench /tmp/gb/bench_cuda"
cat > $F/bench_cuda_2ranks.log <<'EOF'
layer experts  E=8 d=1024 h=4096 rows=8192/rank  (fp32 math)
  RATIO library / cuBLAS TFLOP/s: 0.330
pair  d=1024 h=4096 E=8 heads=16 batch=8 seq=512, 2 rank(s)
  top2   train   197.900 ms  infer    80.000 ms
  scmoe2 train   227.100 ms  infer    62.000 ms
  SPEEDUP scmoe2 over top2: train 0.871x  infer 1.290x
EOF
cmd bench_cuda_2ranks bench 0 30 "mpirun -np 2 /tmp/gb/build1/bench_cuda"

$PY tools/gpu_summary.py $F > $D/sum.txt
rc=$?
cat $D/sum.txt | sed 's/^/# /'
S=$D/sum.txt
check "fabricated: exit 1 when a command failed" [ $rc = 1 ]
check "fabricated: the device line heads the block" has $S "==== check-gpu summary: NVIDIA H200, 580.95.05"
check "fabricated: 5 passed, 4 failed of 9" has $S "FAILED: 5 passed, 4 failed (of 9 commands)"
check "fabricated: test_cuda's failure and its first not-ok line" has $S "125 passed, 1 failed, exit 1; first: not ok - scmoe__permute_rows scatter"
check "fabricated: a SKIP on the GPU machine fails the test" grep -q "FAILED test_cuda_moe_2ranks .*SKIP" $S
check "fabricated: initcheck's 749 errors and the first one" has $S "749 errors (156 passed, 0 failed); first: ========= Uninitialized __global__"
check "fabricated: racecheck's summary line counts as clean" grep -q "ok  *racecheck_test_cuda .*0 errors (126 passed, 0 failed)" $S
check "fabricated: a timeout says so" grep -q "FAILED synccheck_test_cuda_moe .*TIMEOUT (exit 124)" $S
check "fabricated: RATIO fp32 from the single-rank run" has $S "RATIO fp32 0.502  (library experts fwd+bwd / plain cuBLAS, 8192 rows, 1 rank; target >= 0.85 at 8192: MISSED)"
check "fabricated: RATIO bf16 after the --bf16 command line" has $S "RATIO bf16 0.147"
check "fabricated: no RATIO from the 2-rank run" bash -c "! grep -q '0.330' $S"
check "fabricated: SPEEDUP per math and ranks" bash -c "grep -q 'SPEEDUP scmoe2/top2 train 1.077x infer 1.094x  (fp32, 4096 tokens/rank, 1 rank; target >= 1: met)' $S && grep -q 'SPEEDUP scmoe2/top2 train 1.091x infer 1.099x  (bf16' $S && grep -q 'SPEEDUP scmoe2/top2 train 0.871x infer 1.290x  (fp32, 4096 tokens/rank, 2 ranks; target >= 1: MISSED)' $S"
check "fabricated: VS TORCH fp32 and bf16" bash -c "grep -q 'VS TORCH fp32 top2 train 0.587x infer 0.589x  scmoe2 train 0.598x infer 0.618x  (4096 tokens; PyTorch ms / library ms, target >= 1: MISSED)' $S && grep -q 'VS TORCH bf16 top2 train 0.592x' $S"
check "fabricated: the last line" bash -c "tail -1 $S | grep -qx 'check-gpu: 5 passed, 4 failed'"

# all passing: exit 0
G=$D/good
mkdir -p $G
cp $F/device.log $F/test_cuda_moe.log $F/memcheck_test_cuda_moe.log $F/peer_4k.log $G/
grep -P '^(test_cuda_moe|memcheck_test_cuda_moe|peer_4k)\t' $F/commands.tsv > $G/commands.tsv
$PY tools/gpu_summary.py $G > $D/good.txt
check "all passing: exit 0, PASSED" bash -c "[ $? = 0 ] && grep -q '^PASSED: 3 passed, 0 failed' $D/good.txt"
$PY tools/gpu_summary.py $D/none > /dev/null 2>&1
check "no commands.tsv: exit 2" [ $? = 2 ]

# ---- the real formats: torch_peer_gpu.py on the CPU running a bench_cuda ----
if [ -n "${1:-}" ]; then
    R=$D/real
    mkdir -p $R
    echo "cpu (no GPU)" > $R/device.log
    timeout 600 $PY bench/cuda/torch_peer_gpu.py --device cpu --d 32 --hidden 64 --experts 4 --heads 4 --seq 16 \
        --batch 2 --tokens 64 --reps 1 --warmup 1 --bench "$1" > $R/peer.log 2>&1
    prc=$?
    printf 'peer\tbench\t%s\t1\tpython3 bench/cuda/torch_peer_gpu.py --bench %s\n' $prc "$1" > $R/commands.tsv
    sed 's/^/# /' $R/peer.log
    check "torch_peer_gpu.py --device cpu ran $1 beside PyTorch (exit $prc)" [ $prc = 0 ]
    $PY tools/gpu_summary.py $R > $D/real.txt
    sed 's/^/# /' $D/real.txt
    check "its output parsed: RATIO fp32 and bf16" bash -c "grep -q '^RATIO fp32 [0-9]' $D/real.txt && grep -q '^RATIO bf16 [0-9]' $D/real.txt"
    check "its output parsed: SPEEDUP for both maths" bash -c "[ \$(grep -c '^SPEEDUP scmoe2/top2 train [0-9]' $D/real.txt) = 2 ]"
    check "its output parsed: VS TORCH fp32 and bf16" bash -c "grep -q '^VS TORCH fp32 top2 train [0-9.]*x infer [0-9.]*x  scmoe2' $D/real.txt && grep -q '^VS TORCH bf16 top2' $D/real.txt"
fi
echo "$pass passed, $fail failed"
[ $fail = 0 ]
