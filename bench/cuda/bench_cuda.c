/* bench_cuda.c: the CUDA backend's two numbers, in one run (docs/cuda.md):
 *   1. the MoE layer's forward + backward on the device (top-1, dropless, E experts) as TFLOP/s of its
 *      expert FFNs, against plain cuBLAS running the same six GEMM shapes over all routed rows;
 *   2. the block pair's training step (forward + backward) and inference step, ScMoE (shortcut
 *      position 2) against top-2, on the same device.
 * Build: `make CUDA=1 bench-cuda` (build/bench/bench_cuda; also built by check-cuda-build).
 * Run:   build/bench/bench_cuda [--device 0] [--d 1024] [--hidden 4096] [--experts 8] [--tokens 8192]
 *                               [--heads 16] [--seq 512] [--batch 8] [--reps 10] [--bf16] [--local]
 *                               [--host-routing]
 *        under mpirun for several ranks (each takes device rank % visible devices; the pair's
 *        exchanges then go through MPI on mapped host memory).
 * Without a device it prints a SKIP line and exits 0.
 *
 * FLOPs of the experts (R rows, h1 = h for GELU): forward 2 R d h1 + 2 R h d, backward twice that.
 * The layer's time also holds the gate, the routing (on the device, or one host round trip), the row permutations and
 * the bias/activation kernels, which the ratio charges to the library. Times are medians over reps
 * after 2 warm-up steps, host wall clock around calls that return with the device idle.
 * --bf16: the layer and the pair in SCMOE_PRECISION_BF16 on SCMOE_CUDA_BF16 (bf16 weight copies and
 * operands, fp32 accumulation), against cuBLAS on bf16 operands (cublasGemmEx, CUDA_R_16BF).
 * --local: capacity per source rank (SCMOE_CAPACITY_LOCAL), so that several ranks plan their routing on
 * the device too (one rank always does); --host-routing: the gate's outputs copied to the host and the
 * plan copied back (scmoe_cuda_options.host_routing), for comparison. The pair's lines say which ran. */
#include "../../scmoe.h"
#include "../../scmoe_cuda.h"
#include "../../cuda_backend/cuda.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef SCMOE_WITH_MPI
#include "../../scmoe_mpi.h"
#endif

static int rank_, size_ = 1;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static float *dev_random(size_t n, unsigned seed) {
    float *h = malloc(sizeof(float) * n), *d = NULL;
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        h[i] = ((seed >> 8) / 16777216.0f - 0.5f) * 2.0f;
    }
    if (cudaMalloc((void **)&d, sizeof(float) * n) == cudaSuccess)
        cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice);
    free(h);
    return d;
}

/* the slowest rank's time */
static double slowest(double t) {
#ifdef SCMOE_WITH_MPI
    MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
#endif
    return t;
}

typedef struct opts {
    int device, d, h, E, tokens, heads, seq, batch, reps, bf16, local, host_routing;
} opts;

static scmoe_context *device_context(const opts *o) {
    scmoe_context *ctx = NULL;
#ifdef SCMOE_WITH_MPI
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx)) return NULL;
#else
    if (scmoe_context_create(&ctx)) return NULL;
#endif
    scmoe_cuda_options co = scmoe_cuda_options_default();
    int visible = 1;
    cudaGetDeviceCount(&visible);
    co.device = o->device >= 0 ? o->device : rank_ % (visible > 0 ? visible : 1);
    co.math = o->bf16 ? SCMOE_CUDA_BF16 : SCMOE_CUDA_FP32;
    co.host_routing = o->host_routing;
    if (scmoe_context_use_cuda(ctx, &co)) {
        if (!rank_) printf("ok - bench_cuda # SKIP %s\n", scmoe_last_error(ctx));
        scmoe_context_destroy(ctx);
        return NULL;
    }
    return ctx;
}

/* 1. the layer's experts against plain cuBLAS */
static void bench_layer(scmoe_context *ctx, const opts *o) {
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = o->d;
    cfg.d_hidden = o->h;
    cfg.n_experts = o->E;
    cfg.top_k = 1;
    cfg.capacity_factor = 0; /* dropless: R = tokens */
    cfg.capacity_scope = o->local ? SCMOE_CAPACITY_LOCAL : SCMOE_CAPACITY_GLOBAL;
    cfg.max_tokens = o->tokens;
    cfg.precision = o->bf16 ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32; /* bf16 weight copies, bf16 operands */
    scmoe_moe *m = NULL;
    if (scmoe_moe_create(ctx, &cfg, &m)) {
        if (!rank_) printf("layer: create failed: %s\n", scmoe_last_error(ctx));
        return;
    }
    size_t nd = (size_t)o->tokens * o->d;
    float *x = dev_random(nd, 1), *dy = dev_random(nd, 2), *y = dev_random(nd, 3), *dx = dev_random(nd, 4);
    double *t = calloc(o->reps, sizeof *t), *tb = calloc(o->reps, sizeof *tb);
    for (int r = -2; r < o->reps; r++) {
        double t0 = now();
        int bad = scmoe_moe_forward(m, o->tokens, x, y, NULL) || scmoe_moe_backward(m, dy, dx, NULL);
        if (bad) {
            if (!rank_) printf("layer: %s\n", scmoe_last_error(ctx));
            break;
        }
        if (r >= 0) t[r] = slowest(now() - t0);
    }
    /* plain cuBLAS: the six GEMMs of the experts as one expert holding all R rows */
    char err[160];
    cuda_blas *cb = NULL;
    int R = o->tokens, d = o->d, h = o->h;
    float *pre = dev_random((size_t)R * h, 5), *w1 = dev_random((size_t)d * h, 6), *w2 = dev_random((size_t)h * d, 7);
    float *dw1 = dev_random((size_t)d * h, 8), *dw2 = dev_random((size_t)h * d, 9), *out = dev_random(nd, 10);
    /* bf16: the peer stores bf16 operands too (cublasGemmEx CUDA_R_16BF, fp32 accumulation and C) */
    uint16_t *xb = NULL, *w1b = NULL, *w2b = NULL, *dyb = NULL, *preb = NULL;
    if (o->bf16) {
        cudaMalloc((void **)&xb, 2 * nd);
        cudaMalloc((void **)&dyb, 2 * nd);
        cudaMalloc((void **)&w1b, 2 * (size_t)d * h);
        cudaMalloc((void **)&w2b, 2 * (size_t)d * h);
        cudaMalloc((void **)&preb, 2 * (size_t)R * h);
        scmoe__cuda_bf16_pack(xb, x, nd, 0);
        scmoe__cuda_bf16_pack(dyb, dy, nd, 0);
        scmoe__cuda_bf16_pack(w1b, w1, (size_t)d * h, 0);
        scmoe__cuda_bf16_pack(w2b, w2, (size_t)d * h, 0);
        scmoe__cuda_bf16_pack(preb, pre, (size_t)R * h, 0);
        cudaDeviceSynchronize();
    }
    if (!scmoe__cuda_blas_create(&cb, NULL, o->bf16 ? CUDA_MATH_BF16 : CUDA_MATH_FP32, err)) {
        for (int r = -2; r < o->reps; r++) {
            double t0 = now();
            if (o->bf16) {
                scmoe__cuda_blas_gemm_bf16(cb, 0, 0, R, h, d, 1, xb, d, w1b, h, 0, pre, h);
                scmoe__cuda_blas_gemm_bf16(cb, 0, 0, R, d, h, 1, preb, h, w2b, d, 0, out, d);
                scmoe__cuda_blas_gemm_bf16(cb, 0, 1, R, h, d, 1, dyb, d, w2b, d, 0, pre, h);
                scmoe__cuda_blas_gemm_bf16(cb, 1, 0, h, d, R, 1, preb, h, dyb, d, 1, dw2, d);
                scmoe__cuda_blas_gemm_bf16(cb, 1, 0, d, h, R, 1, xb, d, preb, h, 1, dw1, h);
                scmoe__cuda_blas_gemm_bf16(cb, 0, 1, R, d, h, 1, preb, h, w1b, h, 0, out, d);
            } else {
                scmoe__cuda_blas_gemm(cb, 0, 0, R, h, d, 1, x, d, w1, h, 0, pre, h);   /* pre = x W1 */
                scmoe__cuda_blas_gemm(cb, 0, 0, R, d, h, 1, pre, h, w2, d, 0, out, d); /* out = hid W2 */
                scmoe__cuda_blas_gemm(cb, 0, 1, R, h, d, 1, dy, d, w2, d, 0, pre, h);  /* dhid = dy W2^T */
                scmoe__cuda_blas_gemm(cb, 1, 0, h, d, R, 1, pre, h, dy, d, 1, dw2, d); /* dW2 += hid^T dy */
                scmoe__cuda_blas_gemm(cb, 1, 0, d, h, R, 1, x, d, pre, h, 1, dw1, h);  /* dW1 += x^T dpre */
                scmoe__cuda_blas_gemm(cb, 0, 1, R, d, h, 1, pre, h, w1, h, 0, out, d); /* dx = dpre W1^T */
            }
            cudaStreamSynchronize(cb->stream);
            if (r >= 0) tb[r] = slowest(now() - t0);
        }
        scmoe__cuda_blas_destroy(cb);
    }
    double flops = 3.0 * (2.0 * R * d * h + 2.0 * R * h * d), lib = median(t, o->reps), base = median(tb, o->reps);
    if (!rank_) {
        printf("layer experts  E=%d d=%d h=%d rows=%d/rank  (%s math)\n", o->E, d, h, R, o->bf16 ? "bf16" : "fp32");
        printf("  scmoe layer fwd+bwd  %9.3f ms  %7.2f TFLOP/s (expert FLOPs; gate, routing, permutes included)\n",
               1e3 * lib, flops / lib / 1e12);
        printf("  plain cuBLAS         %9.3f ms  %7.2f TFLOP/s (the same six GEMM shapes, one expert)\n", 1e3 * base,
               flops / base / 1e12);
        printf("  RATIO library / cuBLAS TFLOP/s: %.3f\n", base / lib);
    }
    cudaFree(x);
    cudaFree(dy);
    cudaFree(y);
    cudaFree(dx);
    cudaFree(pre);
    cudaFree(w1);
    cudaFree(w2);
    cudaFree(dw1);
    cudaFree(dw2);
    cudaFree(out);
    cudaFree(xb);
    cudaFree(dyb);
    cudaFree(w1b);
    cudaFree(w2b);
    cudaFree(preb);
    free(t);
    free(tb);
    scmoe_moe_destroy(m);
}

/* 2. one pair per arch: training step and inference step */
static int bench_pair(scmoe_context *ctx, const opts *o, scmoe_arch arch, double *train, double *infer) {
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = o->d;
    cfg.d_hidden = o->h;
    cfg.n_experts = o->E;
    cfg.n_heads = o->heads;
    cfg.max_seq_len = o->seq;
    cfg.max_tokens = o->batch * o->seq;
    cfg.arch = arch;
    cfg.shortcut_pos = 2;
    cfg.capacity_scope = o->local ? SCMOE_CAPACITY_LOCAL : SCMOE_CAPACITY_GLOBAL;
    cfg.precision = o->bf16 ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32;
    scmoe_pair *p = NULL;
    if (scmoe_pair_create(ctx, &cfg, &p)) {
        if (!rank_) printf("pair: create failed: %s\n", scmoe_last_error(ctx));
        return 1;
    }
    size_t nd = (size_t)cfg.max_tokens * o->d;
    float *x = dev_random(nd, 11), *dy = dev_random(nd, 12), *y = dev_random(nd, 13), *dx = dev_random(nd, 14);
    double *t = calloc(o->reps, sizeof *t), *ti = calloc(o->reps, sizeof *ti);
    int bad = 0;
    for (int r = -2; r < o->reps && !bad; r++) { /* the first steps also profile the schedule */
        double t0 = now();
        bad = scmoe_pair_forward(p, o->batch, o->seq, x, y, NULL) || scmoe_pair_backward(p, dy, dx, NULL);
        if (r >= 0) t[r] = slowest(now() - t0);
    }
    scmoe_pair_set_training(p, 0);
    for (int r = -2; r < o->reps && !bad; r++) {
        double t0 = now();
        bad = scmoe_pair_forward(p, o->batch, o->seq, x, y, NULL);
        if (r >= 0) ti[r] = slowest(now() - t0);
    }
    if (bad && !rank_) printf("pair: %s\n", scmoe_last_error(ctx));
    *train = median(t, o->reps);
    *infer = median(ti, o->reps);
    cudaFree(x);
    cudaFree(dy);
    cudaFree(y);
    cudaFree(dx);
    free(t);
    free(ti);
    scmoe_pair_destroy(p);
    return bad;
}

int main(int argc, char **argv) {
#ifdef SCMOE_WITH_MPI
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
#endif
    opts o = {-1, 1024, 4096, 8, 8192, 16, 512, 8, 10, 0, 0, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int *dst = !strcmp(a, "--device")    ? &o.device
                   : !strcmp(a, "--d")       ? &o.d
                   : !strcmp(a, "--hidden")  ? &o.h
                   : !strcmp(a, "--experts") ? &o.E
                   : !strcmp(a, "--tokens")  ? &o.tokens
                   : !strcmp(a, "--heads")   ? &o.heads
                   : !strcmp(a, "--seq")     ? &o.seq
                   : !strcmp(a, "--batch")   ? &o.batch
                   : !strcmp(a, "--reps")    ? &o.reps
                                             : NULL;
        if (!strcmp(a, "--bf16")) o.bf16 = 1;
        else if (!strcmp(a, "--local")) o.local = 1;
        else if (!strcmp(a, "--host-routing")) o.host_routing = 1;
        else if (dst && i + 1 < argc) *dst = atoi(argv[++i]);
        else {
            if (!rank_) fprintf(stderr, "bench_cuda: unknown or incomplete option %s (see the file's header)\n", a);
            return 2;
        }
    }
    if (o.reps < 1) o.reps = 1;
#ifdef SCMOE_CUDA_EMU
    if (!rank_)
        printf("# host emulation (cuda_backend/emu): a smoke run of the code paths; the times are not a GPU's\n");
#endif
    scmoe_context *ctx = device_context(&o);
    if (ctx) {
        bench_layer(ctx, &o);
        double top2_t, top2_i, sc_t, sc_i;
        if (!bench_pair(ctx, &o, SCMOE_ARCH_TOP2, &top2_t, &top2_i) &&
            !bench_pair(ctx, &o, SCMOE_ARCH_SCMOE, &sc_t, &sc_i) && !rank_) {
            printf("pair  d=%d h=%d E=%d heads=%d batch=%d seq=%d, %d rank(s)\n", o.d, o.h, o.E, o.heads, o.batch,
                   o.seq, size_);
            printf("  routing planned on the %s (capacity %s)\n",
                   !o.host_routing && (o.local || size_ == 1) ? "device" : "host", o.local ? "per rank" : "global");
            printf("  top2   train %9.3f ms  infer %9.3f ms\n", 1e3 * top2_t, 1e3 * top2_i);
            printf("  scmoe2 train %9.3f ms  infer %9.3f ms\n", 1e3 * sc_t, 1e3 * sc_i);
            printf("  SPEEDUP scmoe2 over top2: train %.3fx  infer %.3fx\n", top2_t / sc_t, top2_i / sc_i);
        }
        scmoe_context_destroy(ctx);
    }
#ifdef SCMOE_WITH_MPI
    MPI_Finalize();
#endif
    return 0;
}
