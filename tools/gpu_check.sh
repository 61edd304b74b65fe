#!/usr/bin/env bash
# gpu_check.sh - the CUDA backend checked on a GPU in one command (issue 19; docs/cuda.md "On a GPU").
#
# The GPU machine has the CUDA 13 runtime, cuBLAS, compute-sanitizer and PyTorch but no OpenBLAS, no
# OpenMPI and no package registry; the build machine has nvcc, OpenBLAS and OpenMPI but no GPU. So the
# binaries are built on the one and carried to the other with the libraries they need:
#
#   tools/gpu_check.sh bundle   build machine: make CUDA=1 into build/gpu0 (MPI=0) and build/gpu1 (MPI=1):
#                               test_cuda, test_cuda_moe, bench_cuda (plus any BIN... given, paths inside
#                               the build dir), packed with OpenBLAS, libgomp and a relocatable OpenMPI
#                               (orterun + PMIx, found through OPAL_PREFIX) into .gpu/bundle.tar.xz (~16 MB,
#                               git-ignored; carry .gpu to the GPU machine). CUDA_ARCH defaults to sm_90
#                               code + compute_90 PTX (the H200), to halve nvcc's time.
#   tools/gpu_check.sh run      GPU machine, from the project root, .gpu/ copied along: unpack it, then
#                               1. at once, OMP_NUM_THREADS=1 each (all correctness, no timing): test_cuda;
#                                  test_cuda_moe on 1 and on 2 ranks; compute-sanitizer memcheck, initcheck,
#                                  racecheck and synccheck on test_cuda and on test_cuda_moe
#                               2. alone, one after another (timing): bench/cuda/torch_peer_gpu.py at 4k and
#                                  16k tokens (each runs PyTorch eager fp32 and autocast bf16, then bench_cuda
#                                  fp32 and --bf16 on the same shapes, side by side); bench_cuda on 2 ranks
#                                  sharing the GPU, --local (capacity per rank) and GLOBAL (the default: the
#                                  round counts scanned over the ranks), both planning routing on the device
#                               each command's output in $OUT/NAME.log (OUT defaults to /tmp/gpu_check),
#                               the list in $OUT/commands.tsv, then the summary block (tools/gpu_summary.py):
#                               passed/failed, RATIO fp32, RATIO bf16, SPEEDUP scmoe2/top2, VS TORCH fp32/bf16.
#                               Budget: phase 1 at most LIMIT1 s (140), phase 2 at most 70 + 90 + 2 x 40 s;
#                               about 2 minutes when nothing hangs.
#   tools/gpu_check.sh summary DIR   the summary block again from the logs in DIR
#   tools/gpu_check.sh          run where nvidia-smi sees a GPU and .gpu/bundle.tar.xz exists, else bundle
# `make check-gpu` runs the last form. Exit status: 0 when every command passed.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
HERE=$ROOT/tools

bundle() {
    set -eo pipefail
    local bins="tests/test_cuda tests/test_cuda_moe bench/bench_cuda $*" m b
    local arch=${CUDA_ARCH:-"-gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90"}
    for m in 0 1; do
        local B=build/gpu$m log=build/gpu_bundle$m.log
        mkdir -p $B/cuda_backend
        # kernels.o does not depend on MPI: the second build reuses the first's (nvcc is the slow part)
        if [ $m = 1 ] && [ -f build/gpu0/cuda_backend/kernels.o ] && [ ! -f $B/cuda_backend/kernels.o ]; then
            cp -p build/gpu0/cuda_backend/kernels.o build/gpu0/cuda_backend/kernels.d $B/cuda_backend/
        fi
        echo "gpu_check bundle: building $B (MPI=$m), log in $log"
        make -j2 CUDA=1 MPI=$m B=$B CUDA_ARCH="$arch" $B/libscmoe.a $B/libscmoe_cuda.a > $log 2>&1 ||
            { tail -20 $log; return 1; }
        for b in $bins; do # a binary that needs MPI is skipped in the MPI=0 build
            make -j2 CUDA=1 MPI=$m B=$B CUDA_ARCH="$arch" $B/$b >> $log 2>&1 ||
                echo "gpu_check bundle: $b not built with MPI=$m (see $log)"
        done
    done
    local R L=/usr/lib/x86_64-linux-gnu f
    R=$(mktemp -d)
    mkdir -p $R/lib $R/usr/lib/x86_64-linux-gnu $R/usr/share $R/usr/bin $R/etc
    for m in 0 1; do
        mkdir -p $R/build$m
        for b in $bins; do [ -f build/gpu$m/$b ] && cp build/gpu$m/$b $R/build$m/; done
    done
    cp -L $L/libopenblas.so.0 $L/libgfortran.so.5 $L/libquadmath.so.0 $L/libgomp.so.1 $R/lib/
    for f in libmpi.so.40 libopen-rte.so.40 libopen-pal.so.40 libhwloc.so.15 libevent_core-2.1.so.7 \
             libevent_pthreads-2.1.so.7 libudev.so.1; do cp -L $L/$f $R/lib/; done
    for f in libdnnl.so.2 libdnnl.so.3; do [ -e $L/$f ] && cp -L $L/$f $R/lib/; done
    cp -a $L/openmpi $L/pmix2 $R/usr/lib/x86_64-linux-gnu/
    cp -a /usr/share/openmpi $R/usr/share/
    cp /usr/bin/orterun /usr/bin/orted $R/usr/bin/
    cp -a /etc/openmpi $R/etc/
    strip --strip-debug $R/build*/* 2>/dev/null || true
    mkdir -p .gpu
    tar -C $R -cJf .gpu/bundle.tar.xz .
    rm -rf $R
    ls -la .gpu/
    echo "gpu_check bundle: done. On the GPU machine, from the project root with .gpu/ carried along:"
    echo "    bash tools/gpu_check.sh run"
}

# the CUDA libraries of the GPU machine: the toolkit's, else PyTorch's wheels', else a search
cuda_libdir() {
    local d
    for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib; do
        [ -e "$d/libcublas.so.13" ] && { echo "$d"; return; }
    done
    d=$(find / -name 'libcublas.so.13' -not -path '/proc/*' 2>/dev/null | head -1)
    [ -n "$d" ] && dirname "$d"
}

# run NAME KIND LIMIT CMD: one command in the bundle's environment, its log and its line in commands.tsv
runone() {
    local name=$1 kind=$2 limit=$3 cmd=$4 s rc
    s=$(date +%s)
    timeout -k 10 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$rc" "$(($(date +%s) - s))" "$cmd" >> "$OUT/commands.tsv"
    echo "=== $name: exit $rc, $(($(date +%s) - s)) s"
}

run() {
    [ -f .gpu/bundle.tar.xz ] || { echo "gpu_check run: no .gpu/bundle.tar.xz (tools/gpu_check.sh bundle first)"; return 2; }
    OUT=${OUT:-/tmp/gpu_check}
    mkdir -p "$OUT"
    rm -f "$OUT"/*.log "$OUT/commands.tsv"
    export GB=${GB:-/tmp/gpu_check_bundle}
    rm -rf "$GB" && mkdir -p "$GB" && tar -C "$GB" -xJf .gpu/bundle.tar.xz || return 2
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.log" 2>&1 ||
        echo "nvidia-smi failed: no GPU here" > "$OUT/device.log"
    cat "$OUT/device.log"
    local cudalib san py=${PYTHON:-python3}
    cudalib=$(cuda_libdir)
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    san=${san:-compute-sanitizer}
    # the bundle's libraries only for the bundle's programs (PyTorch keeps the machine's own)
    local libs="$GB/lib:$GB/usr/lib/x86_64-linux-gnu/pmix2/lib${cudalib:+:$cudalib}"
    cat > "$GB/env.sh" <<EOF
export LD_LIBRARY_PATH=$libs:\${LD_LIBRARY_PATH:-}
export OPAL_PREFIX=$GB/usr PATH=$GB/usr/bin:\$PATH PMIX_MCA_mca_base_component_path=$GB/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp OMPI_MCA_mtl=^ofi,psm,psm2 OMPI_MCA_osc=^ucx
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun() { orterun -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS "\$@"; }
EOF
    # bench_cuda for torch_peer_gpu.py, which runs it by path
    printf '#!/usr/bin/env bash\n. %s/env.sh\nexec %s/build0/bench_cuda "$@"\n' "$GB" "$GB" > "$GB/bench_cuda"
    chmod +x "$GB/bench_cuda"
    local E=". $GB/env.sh; export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1;" b0=$GB/build0 b1=$GB/build1
    local limit1=${LIMIT1:-140} t
    echo "phase 1: the tests and the sanitizers, at once (at most $limit1 s)"
    runone test_cuda test $limit1 "$E $b0/test_cuda" &
    runone test_cuda_moe test $limit1 "$E $b0/test_cuda_moe" &
    runone test_cuda_moe_2ranks test $limit1 "$E mpirun -np 2 $b1/test_cuda_moe" &
    for t in memcheck initcheck racecheck synccheck; do
        runone "${t}_test_cuda" san $limit1 "$E $san --tool $t --error-exitcode 86 $b0/test_cuda" &
        runone "${t}_test_cuda_moe" san $limit1 "$E $san --tool $t --error-exitcode 86 $b0/test_cuda_moe" &
    done
    wait
    echo "phase 2: the benches, one at a time"
    runone peer_4k bench 70 "$py bench/cuda/torch_peer_gpu.py --batch 8 --bench $GB/bench_cuda"
    runone peer_16k bench 90 "$py bench/cuda/torch_peer_gpu.py --batch 32 --reps 5 --bench $GB/bench_cuda"
    runone bench_cuda_2ranks bench 40 "$E mpirun -np 2 $b1/bench_cuda --local"
    runone bench_cuda_2ranks_global bench 40 "$E mpirun -np 2 $b1/bench_cuda"
    "$py" "$HERE/gpu_summary.py" "$OUT"
}

case "${1:-auto}" in
bundle) shift; bundle "$@" ;;
run) run ;;
summary) python3 "$HERE/gpu_summary.py" "${2:?usage: gpu_check.sh summary DIR}" ;;
auto)
    if nvidia-smi -L > /dev/null 2>&1 && [ -f .gpu/bundle.tar.xz ]; then run
    elif nvidia-smi -L > /dev/null 2>&1; then
        echo "gpu_check: a GPU but no .gpu/bundle.tar.xz: build it where nvcc, OpenBLAS and OpenMPI are" \
             "(tools/gpu_check.sh bundle) and carry .gpu/ here"; exit 2
    else bundle; fi ;;
*) sed -n '2,30p' "$0"; exit 2 ;;
esac
