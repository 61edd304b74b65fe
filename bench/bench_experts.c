/* bench_experts.c: GFLOP/s of the expert FFNs (forward + backward) of one MoE layer against plain
 * cblas_sgemm on the same FLOPs, and experts-in-parallel against one-expert-at-a-time.
 *
 * Build (from the repository root, without the Makefile; serial backend, no MPI):
 *   mkdir -p build/bench && cc -O2 -march=x86-64-v2 -g -std=c11 -D_POSIX_C_SOURCE=200809L -fopenmp -I. \
 *     $(pkg-config --cflags openblas) bench/bench_experts.c scmoe.c layer.c moe.c pair.c schedule.c \
 *     kernels/[a-z]*.c mpi_backend/serial.c blas_backend/openblas.c -o build/bench/bench_experts \
 *     $(pkg-config --libs openblas) -lm
 * or `make bench`, which links build/libscmoe.a (mpicc when MPI=1):
 *   $(CC_LIB) $(CFLAGS) $(BLAS_INC) -I. bench/bench_experts.c $(B)/libscmoe.a $(LDFLAGS) $(LDLIBS) \
 *     -o $(B)/bench/bench_experts
 * Run:  OMP_NUM_THREADS=2 build/bench/bench_experts [reps [cases]]
 *       reps >= 3 (default 5); cases: letters of a (E=8 d=512 h=2048 16k tokens GELU, the target),
 *       s (the same with SwiGLU), b (small: d=128 h=512 1k tokens), w (parallel-vs-sequential sweep);
 *       default "asbw".
 *
 * What is timed. The layer is built from the internal pieces the way layer.c does (scmoe__moe_init,
 * scmoe__params_allocate, scmoe__moe_alloc) on a one-rank context, and routed once for real (scmoe__moe_gate_encode,
 * dispatch, wait: top-1, capacity_factor 0 = dropless, random x and gate weights). One untimed
 * forward + decode + decode_backward + gradient dispatch then leaves dY rows in m->xch.recv. Saved
 * copies of the two recv buffers (x rows after dispatch, dY rows after the gradient dispatch) make
 * every timed pass start from the same state:
 *   scmoe__moe_experts_forward  reads x rows from m->xch.recv and overwrites m->xch.recv with y rows, and writes
 *                        m->buf.xe, m->buf.pre, m->buf.hid;  so m->xch.recv <- saved x rows before each forward.
 *   scmoe__moe_experts_backward reads dY rows from m->xch.recv (and xe, pre, hid from the forward just run),
 *                        overwrites m->xch.recv with dX rows and accumulates (+=) into the expert
 *                        gradients;  so m->xch.recv <- saved dY rows before each backward.
 * The restores are outside the timed regions; one sample = forward time + backward time. The
 * accumulated gradients only grow by a few multiples of one step's, which does not change speed.
 *
 * FLOPs (R = rows routed to the experts, h1 = h for GELU, 2h for SwiGLU):
 *   forward 2 R d h1 + 2 R h d;  backward twice that (dgrad and wgrad of both GEMMs).
 * The baseline runs the same six GEMM shapes with plain threaded cblas_sgemm as if one expert held
 * all R rows; bias, activation, grouping and the row permutations are what the ratio charges.
 * Reported: the best sample and the median, in ms; GFLOP/s and ratios use the best; also the least
 * process CPU time (all threads) and the baseline's over it: with OMP_NUM_THREADS=1 that CPU-time
 * ratio hardly moves with load from other processes, so it is the number to trust on a busy
 * machine (with more threads it also counts OpenMP spin-waiting). The modes of a
 * case are sampled round-robin (one sample of each per round), so load from other processes on a
 * shared machine hits all of them alike; each case also prints how many CPUs other processes kept
 * busy meanwhile (from /proc/stat, Linux): numbers taken with that well above 0 are not clean. */
#include "../scmoe_internal.h"
#include "bench_info.h"
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int g_reps = 5;

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) / 8388608.0 - 1.0);
}
static void fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * frand();
}

static void *xalloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, "bench_experts: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static void die(scmoe_context *ctx, scmoe_status s, const char *what) {
    if (!s) return;
    fprintf(stderr, "bench_experts: %s: %s (%s)\n", what, scmoe_strerror(s), ctx ? scmoe_last_error(ctx) : "");
    exit(1);
}

/* ---- one routed layer ---- */
typedef struct bench {
    scmoe_context *ctx;
    param_table pt;
    moe_layer m;
    exec ex;
    int E, d, h, h1, T, R;
    scmoe_activation act;
    float *x_recv, *dy_recv; /* m->xch.recv after the dispatch / after the gradient dispatch */
    float *dye;              /* dY rows expert-major, for the hand-written loops */
    /* baseline operands, one "expert" with all R rows */
    float *A, *W1, *P, *H, *W2, *Y, *dY, *dH, *dW2, *dP, *dW1, *dX;
    int have_base;
} bench;

static float *pdata(bench *b, int idx) { return b->pt.p[idx].t.data; }
static float *pgrad(bench *b, int idx) { return b->pt.p[idx].gwork; }

static void bench_setup(bench *b, int E, int d, int h, int T, scmoe_activation act) {
    memset(b, 0, sizeof *b);
    rng_state = 0x9e3779b97f4a7c15ull ^ (uint64_t)T; /* the same data whichever cases run before */
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = d;
    cfg.d_hidden = h;
    cfg.n_experts = E;
    cfg.top_k = 1;
    cfg.max_tokens = T;
    cfg.capacity_factor = 0.0f; /* dropless */
    cfg.eval_capacity_factor = 0.0f;
    cfg.activation = act;
    cfg.seed = 1234;
    char msg[256];
    scmoe_status s = scmoe_config_validate(&cfg, msg, sizeof msg);
    if (s) {
        fprintf(stderr, "bench_experts: config: %s\n", msg);
        exit(1);
    }
    die(NULL, scmoe_context_create(&b->ctx), "context");
    b->ex = scmoe__context_exec(b->ctx, &cfg);
    moe_layer *m = &b->m;
    die(b->ctx, scmoe__moe_init(m, b->ctx, &cfg, 1, &b->pt, "", 0.02f), "scmoe__moe_init");
    die(b->ctx, scmoe__params_allocate(&b->pt, b->ctx->compute, 0, 0), "scmoe__params_allocate");
    die(b->ctx, scmoe__moe_alloc(m), "scmoe__moe_alloc");
    /* small random biases so the bias passes do real work */
    for (int i = 0; i < m->E_local; i++) {
        fill(pdata(b, m->p_e0 + 4 * i + 1), (size_t)m->h1, 0.01f);
        fill(pdata(b, m->p_e0 + 4 * i + 3), (size_t)d, 0.01f);
    }
    b->E = E;
    b->d = d;
    b->h = h;
    b->h1 = m->h1;
    b->T = T;
    b->act = act;

    float *x = xalloc(sizeof(float) * (size_t)T * d), *y = xalloc(sizeof(float) * (size_t)T * d);
    float *dy = xalloc(sizeof(float) * (size_t)T * d);
    fill(x, (size_t)T * d, 1.0f);
    fill(dy, (size_t)T * d, 1.0f);
    die(b->ctx, scmoe__moe_gate_encode(m, &b->ex, T, x), "gate_encode");
    die(b->ctx, scmoe__moe_dispatch_start(m), "dispatch");
    die(b->ctx, scmoe__moe_dispatch_wait(m), "dispatch wait");
    int R = b->R = m->plan.n_recv;
    b->x_recv = xalloc(sizeof(float) * (size_t)R * d);
    b->dy_recv = xalloc(sizeof(float) * (size_t)R * d);
    b->dye = xalloc(sizeof(float) * (size_t)R * d);
    memcpy(b->x_recv, m->xch.recv, sizeof(float) * (size_t)R * d);
    die(b->ctx, scmoe__moe_experts_forward(m, &b->ex), "experts");
    die(b->ctx, scmoe__moe_combine_wait(m), "combine wait");
    scmoe__moe_decode(m, y, 0.0f);
    scmoe__moe_decode_backward(m, dy);
    die(b->ctx, scmoe__moe_dispatch_start(m), "grad dispatch");
    die(b->ctx, scmoe__moe_dispatch_wait(m), "grad dispatch wait");
    memcpy(b->dy_recv, m->xch.recv, sizeof(float) * (size_t)R * d);
    for (int r = 0; r < R; r++) /* the same scatter scmoe__moe_experts_backward does */
        memcpy(b->dye + (size_t)m->plan.recv_to_expert[r] * d, b->dy_recv + (size_t)r * d, sizeof(float) * d);
    free(x);
    free(y);
    free(dy);
}

static void bench_alloc_baseline(bench *b) {
    size_t R = (size_t)b->R, d = (size_t)b->d, h = (size_t)b->h, h1 = (size_t)b->h1, f = sizeof(float);
    b->A = xalloc(f * R * d);
    b->W1 = xalloc(f * d * h1);
    b->P = xalloc(f * R * h1);
    b->H = xalloc(f * R * h);
    b->W2 = xalloc(f * h * d);
    b->Y = xalloc(f * R * d);
    b->dY = xalloc(f * R * d);
    b->dH = xalloc(f * R * h);
    b->dW2 = xalloc(f * h * d);
    b->dP = xalloc(f * R * h1);
    b->dW1 = xalloc(f * d * h1);
    b->dX = xalloc(f * R * d);
    fill(b->A, R * d, 1.0f);
    fill(b->W1, d * h1, 0.02f);
    fill(b->P, R * h1, 0.5f);
    fill(b->H, R * h, 0.5f);
    fill(b->W2, h * d, 0.02f);
    fill(b->dY, R * d, 1.0f);
    fill(b->dH, R * h, 0.02f);
    fill(b->dP, R * h1, 0.02f);
    memset(b->dW1, 0, f * d * h1);
    memset(b->dW2, 0, f * h * d);
    b->have_base = 1;
}

static void bench_free(bench *b) {
    scmoe__moe_free(&b->m);
    scmoe__params_free(&b->pt);
    scmoe_context_destroy(b->ctx);
    free(b->x_recv);
    free(b->dy_recv);
    free(b->dye);
    if (b->have_base) {
        free(b->A);
        free(b->W1);
        free(b->P);
        free(b->H);
        free(b->W2);
        free(b->Y);
        free(b->dY);
        free(b->dH);
        free(b->dW2);
        free(b->dP);
        free(b->dW1);
        free(b->dX);
    }
}

static double flops_fwd(const bench *b) { return 2.0 * b->R * b->d * b->h1 + 2.0 * b->R * b->h * b->d; }
static double flops_total(const bench *b) { return 3.0 * flops_fwd(b); }

/* ---- what one sample runs ---- */
enum {
    MODE_BASE,    /* six plain cblas_sgemm over all R rows (threaded) */
    MODE_GROUPED, /* the same six GEMMs per expert over its rows, one expert at a time: no bias, act, perm */
    MODE_SEQ,     /* scmoe__ffn_forward/ffn_backward per expert, one at a time, threaded BLAS and kernels */
    MODE_PAR,     /* the same, experts across OpenMP threads, single-threaded GEMMs */
    MODE_LIB,     /* scmoe__moe_experts_forward + scmoe__moe_experts_backward (permutations + the library's choice) */
    MODE_COUNT
};
static const char *mode_name[MODE_COUNT] = {
    "one cblas_sgemm per op (baseline)", "grouped sgemm only, seq experts", "ffn_fwd/bwd, one expert at a time",
    "ffn_fwd/bwd, experts in parallel",  "library moe_experts_fwd+bwd",
};

static void sgemm(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta,
                  float *C, int ldc) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A, lda, B,
                ldb, beta, C, ldc);
}

/* The six GEMMs of scmoe__ffn_forward/ffn_backward, same transposes and accumulation (weight grads +=).
 * Rows [o, o+rows) of the row operands; w1/w2 the weights, dw1/dw2 their gradients. */
static void six_gemms(bench *b, int phase, size_t o, int rows, const float *w1, const float *w2, float *dw1,
                      float *dw2) {
    int d = b->d, h = b->h, h1 = b->h1;
    if (rows <= 0) return;
    if (phase == 0) {
        sgemm(0, 0, rows, h1, d, b->A + o * d, d, w1, h1, 0.0f, b->P + o * h1, h1);
        sgemm(0, 0, rows, d, h, b->H + o * h, h, w2, d, 0.0f, b->Y + o * d, d);
    } else {
        sgemm(0, 1, rows, h, d, b->dY + o * d, d, w2, d, 0.0f, b->dH + o * h, h);
        sgemm(1, 0, h, d, rows, b->H + o * h, h, b->dY + o * d, d, 1.0f, dw2, d);
        sgemm(1, 0, d, h1, rows, b->A + o * d, d, b->dP + o * h1, h1, 1.0f, dw1, h1);
        sgemm(0, 1, rows, d, h1, b->dP + o * h1, h1, w1, h1, 0.0f, b->dX + o * d, d);
    }
}

static void ffn_loop(bench *b, int phase, int parallel) {
    moe_layer *m = &b->m;
    const int *off = m->plan.expert_offsets;
    int d = b->d, h = b->h, h1 = b->h1;
#pragma omp parallel for schedule(dynamic) if (parallel)
    for (int i = 0; i < m->E_local; i++) {
        size_t o = (size_t)off[i];
        int rows = off[i + 1] - off[i], p = m->p_e0 + 4 * i;
        if (phase == 0)
            scmoe__ffn_forward(&b->ex, m->buf.ye + o * d, m->buf.pre + o * h1, m->buf.hid + o * h, m->buf.xe + o * d,
                               pdata(b, p), pdata(b, p + 1), pdata(b, p + 2), pdata(b, p + 3), rows, d, h, b->act);
        else
            scmoe__ffn_backward(&b->ex, m->buf.dxe + o * d, 0.0f, pgrad(b, p), pgrad(b, p + 1), pgrad(b, p + 2),
                                pgrad(b, p + 3), m->buf.dhid + o * h, m->buf.dpre + o * h1, b->dye + o * d,
                                m->buf.xe + o * d, m->buf.pre + o * h1, m->buf.hid + o * h, pdata(b, p),
                                pdata(b, p + 2), rows, d, h, b->act);
    }
}

static double cpu_seconds(void) { /* CPU time of the whole process, all threads */
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
static double g_cpu; /* CPU seconds of the last run_phase */

/* phase 0 forward, 1 backward; only the call is timed, the restores are not */
static double run_phase(bench *b, int mode, int phase) {
    moe_layer *m = &b->m;
    size_t rd = (size_t)b->R * b->d;
    if (mode == MODE_LIB) memcpy(m->xch.recv, phase == 0 ? b->x_recv : b->dy_recv, sizeof(float) * rd);
    double c0 = cpu_seconds(), t0 = omp_get_wtime();
    switch (mode) {
    case MODE_BASE: six_gemms(b, phase, 0, b->R, b->W1, b->W2, b->dW1, b->dW2); break;
    case MODE_GROUPED:
        for (int i = 0; i < m->E_local; i++) {
            int o = m->plan.expert_offsets[i], p = m->p_e0 + 4 * i;
            six_gemms(b, phase, (size_t)o, m->plan.expert_offsets[i + 1] - o, pdata(b, p), pdata(b, p + 2), pgrad(b, p),
                      pgrad(b, p + 2));
        }
        break;
    case MODE_SEQ: ffn_loop(b, phase, 0); break;
    case MODE_PAR: ffn_loop(b, phase, 1); break;
    case MODE_LIB:
        if (phase == 0) scmoe__moe_experts_forward(m, &b->ex);
        else scmoe__moe_experts_backward(m, &b->ex);
        break;
    }
    double t = omp_get_wtime() - t0;
    g_cpu = cpu_seconds() - c0;
    return t;
}

/* seconds: best and median wall time of a forward + backward, fwd and bwd of the best, and the least
 * process CPU time (all threads; with OMP_NUM_THREADS=1 it hardly moves with load from elsewhere) */
typedef struct {
    double best, median, fwd, bwd, cpu;
} timing;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* modes[0..n) measured round-robin: one warm-up sample each, then rounds of one sample each; as many
 * rounds as fit ~1 s, at least g_reps, at most 200. */
static void measure(bench *b, const int *modes, int n, timing *out) {
    double w = 0;
    for (int i = 0; i < n; i++) w += run_phase(b, modes[i], 0) + run_phase(b, modes[i], 1);
    int rounds = g_reps;
    if (w > 0 && 1.0 / w > rounds) rounds = 1.0 / w < 200 ? (int)(1.0 / w) : 200;
    double *s = xalloc(sizeof(double) * (size_t)rounds * n);
    for (int i = 0; i < n; i++) out[i] = (timing){1e30, 0, 0, 0, 1e30};
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) {
            double f = run_phase(b, modes[i], 0), cf = g_cpu, g = run_phase(b, modes[i], 1);
            if (cf + g_cpu < out[i].cpu) out[i].cpu = cf + g_cpu;
            s[(size_t)i * rounds + r] = f + g;
            if (f + g < out[i].best) {
                out[i].best = f + g;
                out[i].fwd = f;
                out[i].bwd = g;
            }
        }
    for (int i = 0; i < n; i++) {
        double *si = s + (size_t)i * rounds;
        qsort(si, rounds, sizeof *si, cmp_double);
        out[i].median = rounds % 2 ? si[rounds / 2] : 0.5 * (si[rounds / 2 - 1] + si[rounds / 2]);
    }
    free(s);
}

/* CPU time of the whole machine and of this process, in clock ticks (Linux /proc); 0 if unreadable */
typedef struct {
    double busy, total, own;
} cpu_sample;
static cpu_sample cpu_now(void) {
    cpu_sample c = {0, 0, 0};
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        unsigned long long v[8] = {0};
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                   &v[7]) == 8) {
            for (int i = 0; i < 8; i++) c.total += (double)v[i];
            c.busy = c.total - (double)v[3] - (double)v[4];
        }
        fclose(f);
    }
    f = fopen("/proc/self/stat", "r");
    if (f) {
        char buf[1024];
        size_t len = fread(buf, 1, sizeof buf - 1, f);
        buf[len] = 0;
        char *p = strrchr(buf, ')'); /* fields after the command name: state is field 3, utime 14, stime 15 */
        unsigned long long ut = 0, st = 0;
        if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2)
            c.own = (double)(ut + st);
        fclose(f);
    }
    return c;
}
/* CPUs other processes kept busy between a and b (-1 if unknown) */
static double cpu_others(cpu_sample a, cpu_sample b) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    double span = (b.total - a.total) / (ncpu > 0 ? ncpu : 1);
    if (span <= 0 || a.total == 0) return -1;
    double o = (b.busy - a.busy - (b.own - a.own)) / span;
    return o < 0 ? 0 : o;
}

static void rows_stats(const bench *b, int *mn, int *mx) {
    const int *off = b->m.plan.expert_offsets;
    *mn = 1 << 30;
    *mx = 0;
    for (int i = 0; i < b->m.E_local; i++) {
        int r = off[i + 1] - off[i];
        if (r < *mn) *mn = r;
        if (r > *mx) *mx = r;
    }
}

/* the library's rule in moe.c (experts_in_parallel), restated to print which mode it picks */
static int library_picks_parallel(const bench *b) {
    return b->m.E_local > 1 && omp_get_max_threads() > 1 && b->m.plan.n_recv < 256 * b->m.E_local;
}

/* which of two times is smaller, or a tie within 3% */
static const char *faster(double par, double seq) {
    return par < 0.97 * seq ? "parallel" : seq < 0.97 * par ? "seq" : "tie";
}

static double run_case(const char *label, int E, int d, int h, int T, scmoe_activation act, double target) {
    bench b;
    bench_setup(&b, E, d, h, T, act);
    bench_alloc_baseline(&b);
    int mn, mx;
    rows_stats(&b, &mn, &mx);
    printf("\n== case %s: E=%d d=%d h=%d tokens=%d top-1 %s dropless; rows R=%d, per expert min %d avg %d max %d\n",
           label, E, d, h, T, act == SCMOE_GELU ? "GELU" : "SwiGLU", b.R, mn, b.R / E, mx);
    printf("   FLOPs per fwd+bwd: %.3f GFLOP (fwd %.3f, bwd %.3f)\n", flops_total(&b) * 1e-9, flops_fwd(&b) * 1e-9,
           2 * flops_fwd(&b) * 1e-9);
    printf("   %-36s %9s %9s %10s %11s %9s %8s %9s %8s\n", "what", "fwd ms", "bwd ms", "best ms", "median ms",
           "GFLOP/s", "vs base", "cpu ms", "cpu vs");
    timing t[MODE_COUNT];
    int modes[MODE_COUNT];
    for (int mode = 0; mode < MODE_COUNT; mode++) modes[mode] = mode;
    cpu_sample c0 = cpu_now();
    measure(&b, modes, MODE_COUNT, t);
    cpu_sample c1 = cpu_now();
    for (int mode = 0; mode < MODE_COUNT; mode++) {
        printf("   %-36s %9.2f %9.2f %10.2f %11.2f %9.1f %8.3f %9.2f %8.3f\n", mode_name[mode], t[mode].fwd * 1e3,
               t[mode].bwd * 1e3, t[mode].best * 1e3, t[mode].median * 1e3, flops_total(&b) / t[mode].best * 1e-9,
               t[MODE_BASE].best / t[mode].best, t[mode].cpu * 1e3, t[MODE_BASE].cpu / t[mode].cpu);
    }
    double ratio = t[MODE_BASE].best / t[MODE_LIB].best;
    int pick = library_picks_parallel(&b);
    printf("   library picks: %s; faster here: %s (par/seq time %.3f; tie = within 3%%)\n", pick ? "parallel" : "seq",
           faster(t[MODE_PAR].best, t[MODE_SEQ].best), t[MODE_PAR].best / t[MODE_SEQ].best);
    double ffn_best = pick ? t[MODE_PAR].best : t[MODE_SEQ].best;
    printf("   time over the baseline, in %% of it (best wall | least cpu): GEMM grouping %+.1f | %+.1f,"
           " bias+act+scmoe__sum_rows %+.1f | %+.1f, permutations %+.1f | %+.1f\n",
           100 * (t[MODE_GROUPED].best - t[MODE_BASE].best) / t[MODE_BASE].best,
           100 * (t[MODE_GROUPED].cpu - t[MODE_BASE].cpu) / t[MODE_BASE].cpu,
           100 * (t[MODE_SEQ].best - t[MODE_GROUPED].best) / t[MODE_BASE].best,
           100 * (t[MODE_SEQ].cpu - t[MODE_GROUPED].cpu) / t[MODE_BASE].cpu,
           100 * (t[MODE_LIB].best - ffn_best) / t[MODE_BASE].best,
           100 * (t[MODE_LIB].cpu - (pick ? t[MODE_PAR].cpu : t[MODE_SEQ].cpu)) / t[MODE_BASE].cpu);
    if (target > 0)
        printf("   RATIO library/sgemm GFLOP/s = %.3f (target >= %.2f: %s)\n", ratio, target,
               ratio >= target ? "met" : "MISSED");
    else printf("   RATIO library/sgemm GFLOP/s = %.3f\n", ratio);
    printf("   other processes kept %.2f CPUs busy meanwhile (%ld online)\n", cpu_others(c0, c1),
           sysconf(_SC_NPROCESSORS_ONLN));
    fflush(stdout);
    bench_free(&b);
    return ratio;
}

/* experts in parallel vs one at a time over rows per expert (GELU, E=8, d=256, h=1024). The crossover
 * is reported where the faster mode changes from parallel to seq (ties within 3% do not count). */
static void sweep(void) {
    const int E = 8, d = 256, h = 1024;
    const int Ts[] = {256, 512, 1024, 2048, 4096, 8192, 16384};
    printf("\n== sweep: experts in parallel vs one at a time, E=%d d=%d h=%d GELU top-1 (best of samples, fwd+bwd)\n",
           E, d, h);
    if (omp_get_max_threads() < 2) {
        printf("   skipped: with 1 thread both modes run the same serial code\n");
        return;
    }
    printf("   %7s %12s %10s %10s %9s  %-9s %-9s %7s\n", "tokens", "rows/expert", "par ms", "seq ms", "par/seq",
           "faster", "lib picks", "others");
    int last_par_rows = -1, first_seq_rows = -1;
    for (size_t i = 0; i < sizeof Ts / sizeof *Ts; i++) {
        bench b;
        bench_setup(&b, E, d, h, Ts[i], SCMOE_GELU);
        timing ps[2];
        cpu_sample c0 = cpu_now();
        measure(&b, (const int[]){MODE_PAR, MODE_SEQ}, 2, ps);
        double others = cpu_others(c0, cpu_now());
        const char *f = faster(ps[0].best, ps[1].best);
        int rows = b.R / E;
        if (!strcmp(f, "parallel")) last_par_rows = rows;
        if (!strcmp(f, "seq") && first_seq_rows < 0) first_seq_rows = rows;
        printf("   %7d %12d %10.2f %10.2f %9.3f  %-9s %-9s %7.2f\n", Ts[i], rows, ps[0].best * 1e3, ps[1].best * 1e3,
               ps[0].best / ps[1].best, f, library_picks_parallel(&b) ? "parallel" : "seq", others);
        fflush(stdout);
        bench_free(&b);
    }
    if (first_seq_rows > 0 && last_par_rows < first_seq_rows)
        printf("   -> crossover: parallel faster up to %d rows per expert, seq faster from %d\n", last_par_rows,
               first_seq_rows);
    else if (first_seq_rows < 0)
        printf(
            "   -> no crossover in this range: seq is never faster by more than 3%% (parallel faster up to %d rows per "
            "expert, tie above)\n",
            last_par_rows);
    else
        printf("   -> no clean crossover (seq faster at %d, parallel faster at %d rows per expert): noise or load\n",
               first_seq_rows, last_par_rows);
    printf("   (the library's rule: parallel when rows per expert < 256 and more than 1 thread)\n");
}

/* Case h: the layer's experts in SCMOE_PRECISION_BF16 against plain bf16 matmuls of the same six shapes
 * (one expert holding all R rows, every operand already bf16, so no rounding is timed): the context's
 * bf16 engine with its copies given, which on oneDNN is one cached bf16 matmul primitive per GEMM. */
static uint16_t *bf16_of(const float *x, size_t n) {
    uint16_t *h = xalloc(2 * n);
    scmoe__bf16_pack(h, x, n);
    return h;
}

static void six_gemms_bf16(bench *b, int phase, uint16_t *const *hb) {
    const blas_backend *g = b->ctx->host_blas;
    int R = b->R, d = b->d, h = b->h, h1 = b->h1;
    enum { A, W1, H, W2, DY, DP };
    if (phase == 0) {
        g->gemm_bf16(g, 0, 0, R, h1, d, 1.0f, b->A, hb[A], d, b->W1, hb[W1], h1, 0.0f, b->P, h1);
        g->gemm_bf16(g, 0, 0, R, d, h, 1.0f, b->H, hb[H], h, b->W2, hb[W2], d, 0.0f, b->Y, d);
    } else {
        g->gemm_bf16(g, 0, 1, R, h, d, 1.0f, b->dY, hb[DY], d, b->W2, hb[W2], d, 0.0f, b->dH, h);
        g->gemm_bf16(g, 1, 0, h, d, R, 1.0f, b->H, hb[H], h, b->dY, hb[DY], d, 1.0f, b->dW2, d);
        g->gemm_bf16(g, 1, 0, d, h1, R, 1.0f, b->A, hb[A], d, b->dP, hb[DP], h1, 1.0f, b->dW1, h1);
        g->gemm_bf16(g, 0, 1, R, d, h1, 1.0f, b->dP, hb[DP], h1, b->W1, hb[W1], h1, 0.0f, b->dX, d);
    }
}

static void run_bf16_case(const char *label, int E, int d, int h, int T) {
    bench b;
    bench_setup(&b, E, d, h, T, SCMOE_GELU);
    scmoe_config cfg = b.m.cfg;
    cfg.precision = SCMOE_PRECISION_BF16;
    die(b.ctx, scmoe__precision_attach(b.ctx, &cfg, &b.pt, &b.ex), "bf16");
    bench_alloc_baseline(&b);
    size_t R = (size_t)b.R, h1 = (size_t)b.h1;
    uint16_t *hb[6] = {bf16_of(b.A, R * d),          bf16_of(b.W1, (size_t)d * h1), bf16_of(b.H, R * h),
                       bf16_of(b.W2, (size_t)h * d), bf16_of(b.dY, R * d),          bf16_of(b.dP, R * h1)};
    double best_lib = 1e30, best_base = 1e30;
    for (int rep = 0; rep <= g_reps; rep++) { /* rep 0 warms up (primitives, operand buffers) */
        double lib = run_phase(&b, MODE_LIB, 0) + run_phase(&b, MODE_LIB, 1);
        double t0 = omp_get_wtime();
        six_gemms_bf16(&b, 0, hb);
        six_gemms_bf16(&b, 1, hb);
        double base = omp_get_wtime() - t0;
        if (rep > 0) {
            best_lib = lib < best_lib ? lib : best_lib;
            best_base = base < best_base ? base : best_base;
        }
    }
    double gf = flops_total(&b) * 1e-9;
    printf("\n== case %s: bf16 experts E=%d d=%d h=%d tokens=%d top-1 GELU dropless, rows R=%d\n", label, E, d, h, T,
           b.R);
    printf("   %s\n", b.ctx->host_blas->describe(b.ctx->host_blas));
    printf("   experts fwd+bwd %.2f ms (%.1f GFLOP/s); plain bf16 matmuls %.2f ms (%.1f GFLOP/s)\n", best_lib * 1e3,
           gf / best_lib, best_base * 1e3, gf / best_base);
    printf("BF16 RATIO experts/onednn: %.2f\n", best_base / best_lib);
    for (int i = 0; i < 6; i++) free(hb[i]);
    bench_free(&b);
}

int main(int argc, char **argv) {
    if (argc > 1) g_reps = atoi(argv[1]);
    if (g_reps < 3) g_reps = 3;
    /* a: case a GELU, s: case a SwiGLU, b: small, w: sweep, h: case a in bf16, t: a tiny bf16 case (smoke) */
    const char *which = argc > 2 ? argv[2] : "asbwh";
    /* (scmoe_build_info() is declared in scmoe.h but not defined in the library yet) */
    printf("bench_experts: threads %d (omp_get_max_threads); scmoe %s; BLAS: %s\n"
           "  samples per measurement >= %d after 1 warm-up; times are the best fwd+bwd sample (median also\n"
           "  shown); GFLOP/s and ratios from the best\n",
           omp_get_max_threads(), scmoe_version(), openblas_get_config(), g_reps);
    scmoe_context *info;
    die(NULL, scmoe_context_create(&info), "context");
    bench_print_gemm_info(stdout, info);
    scmoe_context_destroy(info);
    if (strchr(which, 'a')) run_case("a (target)", 8, 512, 2048, 16384, SCMOE_GELU, 0.85);
    if (strchr(which, 's')) run_case("a SwiGLU", 8, 512, 2048, 16384, SCMOE_SWIGLU, 0);
    if (strchr(which, 'b')) run_case("b (small)", 8, 128, 512, 1024, SCMOE_GELU, 0);
    if (strchr(which, 'w')) sweep();
    if (strchr(which, 'h')) run_bf16_case("a bf16", 8, 512, 2048, 16384);
    if (strchr(which, 't')) run_bf16_case("tiny bf16", 4, 32, 64, 256);
    return 0;
}
