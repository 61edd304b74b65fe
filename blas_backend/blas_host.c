/* blas_host.c: the host's GEMM table. fp32 GEMMs go to OpenBLAS; bf16 GEMMs (blas.h's gemm_bf16) to
 * one of three engines with the same math, C = alpha op(bf16(A)) op(bf16(B)) + beta C in fp32:
 *   ONEDNN      operands packed to bf16, a oneDNN bf16 matmul (AMX or AVX512-BF16 where the CPU has
 *               them; oneDNN picks), primitives cached per shape (onednn.c)
 *   ROUNDED     operands rounded to bf16 and back to float, an fp32 OpenBLAS GEMM: every product of two
 *               bf16 values is exact in fp32 (8 + 8 significant bits < 24), so this is the bf16 GEMM
 *               with fp32 accumulation, on any CPU
 *   ONEDNN_F32  the rounded operands through a oneDNN f32 matmul (tests reach the cache with it on CPUs
 *               without bf16 matmuls)
 * AUTO takes ONEDNN where oneDNN has a bf16 matmul for this CPU other than its reference loops (a probe
 * at create), else ROUNDED. A shape the cache cannot take runs ROUNDED.
 *
 * Operand buffers: each thread that calls (one per OpenMP thread of a parallel loop, e.g. attention's
 * heads) has its own slot of buffers, grown to the largest operand it has seen: allocation happens in
 * warm-up only. A caller beyond the slots (nested parallelism, more threads than at create) or a failed
 * growth runs the naive loop below: slow, the same math, never a crash. */
#include "blas.h"
#include "../kernels/kernels.h"
#include <ctype.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "onednn.h"

typedef struct bf16_slot {
    float *a, *b;
    uint16_t *ha, *hb;
    size_t na, nb, nha, nhb; /* elements held */
    char pad[64];            /* slots of different threads on different cache lines */
} bf16_slot;

typedef struct blas_host {
    blas_backend base; /* first: self is the blas_host */
    int engine;
    scmoe__onednn *dnn;
    int slots;
    bf16_slot *slot;
    char desc[256];
} blas_host;

/* The caller's slot: its thread number in the innermost active parallel region, mixed-radix over the
 * active levels when regions nest, so two threads running at once never share one. */
static int bf16_slot_of(void) {
    int s = 0;
    for (int l = 1; l <= omp_get_level(); l++)
        if (omp_get_team_size(l) > 1) s = s * omp_get_team_size(l) + omp_get_ancestor_thread_num(l);
    return s;
}

static void *bf16_grow(void **p, size_t *have, size_t need, size_t size) {
    if (need <= *have) return *p;
    free(*p);
    *have = 0;
    *p = aligned_alloc(64, (need * size + 63) & ~(size_t)63);
    if (*p) *have = need;
    return *p;
}

/* op(X)[i, j] of a row-major matrix with stride ld, transposed when t */
static inline float bf16_op_at(const float *X, const uint16_t *Xb, int t, int ld, int i, int j) {
    size_t o = t ? (size_t)j * ld + i : (size_t)i * ld + j;
    return bf16_to_float(Xb ? Xb[o] : bf16_from_float(X[o]));
}

static void bf16_gemm_naive(int ta, int tb, int M, int N, int K, float alpha, const float *A, const uint16_t *Ab,
                            int lda, const float *B, const uint16_t *Bb, int ldb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += bf16_op_at(A, Ab, ta, lda, i, k) * bf16_op_at(B, Bb, tb, ldb, k, j);
            float *c = &C[(size_t)i * ldc + j];
            *c = alpha * s + (beta == 0.0f ? 0.0f : beta * *c);
        }
}

static void host_gemm(const blas_backend *self, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    scmoe__blas_openblas()->gemm(scmoe__blas_openblas(), ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void host_gemm_bf16(const blas_backend *self, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                           const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb, int ldb, float beta,
                           float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* C = beta C: nothing to round */
        host_gemm(self, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    const blas_host *h = (const blas_host *)self;
    /* the operands as stored: A is ra x ca (M x K, or K x M when transposed), B is rb x cb */
    int ra = ta ? K : M, ca = ta ? M : K, rb = tb ? N : K, cb = tb ? K : N;
    int s = bf16_slot_of();
    if (s >= h->slots) {
        bf16_gemm_naive(ta, tb, M, N, K, alpha, A, Ab, lda, B, Bb, ldb, beta, C, ldc);
        return;
    }
    bf16_slot *sl = &h->slot[s];
#ifdef SCMOE_WITH_ONEDNN
    if (h->engine == BLAS_BF16_ONEDNN) {
        const uint16_t *a = Ab, *b = Bb;
        int la = lda, lb = ldb;
        if (!a && (a = bf16_grow((void **)&sl->ha, &sl->nha, (size_t)ra * ca, 2))) {
            scmoe__bf16_pack_rows(sl->ha, A, ra, ca, lda);
            la = ca;
        }
        if (!b && (b = bf16_grow((void **)&sl->hb, &sl->nhb, (size_t)rb * cb, 2))) {
            scmoe__bf16_pack_rows(sl->hb, B, rb, cb, ldb);
            lb = cb;
        }
        if (a && b && !scmoe__onednn_gemm(h->dnn, s, ta, tb, M, N, K, alpha, a, la, b, lb, beta, C, ldc)) return;
    }
#endif
    float *a = bf16_grow((void **)&sl->a, &sl->na, (size_t)ra * ca, 4),
          *b = bf16_grow((void **)&sl->b, &sl->nb, (size_t)rb * cb, 4);
    if (!a || !b) {
        bf16_gemm_naive(ta, tb, M, N, K, alpha, A, Ab, lda, B, Bb, ldb, beta, C, ldc);
        return;
    }
    if (Ab) scmoe__bf16_unpack_rows(a, Ab, ra, ca, lda);
    else scmoe__bf16_round_rows(a, A, ra, ca, lda);
    if (Bb) scmoe__bf16_unpack_rows(b, Bb, rb, cb, ldb);
    else scmoe__bf16_round_rows(b, B, rb, cb, ldb);
#ifdef SCMOE_WITH_ONEDNN
    if (h->engine == BLAS_BF16_ONEDNN_F32 &&
        !scmoe__onednn_gemm(h->dnn, s, ta, tb, M, N, K, alpha, a, ca, b, cb, beta, C, ldc))
        return;
#endif
    host_gemm(self, ta, tb, M, N, K, alpha, a, ca, b, cb, beta, C, ldc);
}

static int host_max_threads(void) { return omp_get_max_threads(); }

/* Round figures of one core's GEMM speed by kernel family (of the order measured on this project's machines:
 * OpenBLAS on an AVX2 Zen ~40-70, AVX-512 ~2x; oneDNN bf16 on AMX ~700 per core). Only the ratio between engines
 * and the order of magnitude matter: they turn poll_us into columns.
 * The bf16 engines are given at least 8x the fp32 figure whatever their real speed: each call converts its
 * activation operand again (M K elements, ~0.5-1 ns each, against the tile's 2 M K c flops), so a tile of 64
 * columns at the bench pair's shapes would spend ~40% converting (measured: top2's pair 1210 against 916-980 ms
 * in the rounded engine); 8x keeps tiles about as wide as poll_cols = 512 made them. */
static double host_nominal_gflops(const blas_backend *self, int bf16) {
    char core[64];
    snprintf(core, sizeof core, "%s", scmoe__openblas_core());
    for (char *c = core; *c; c++) *c = (char)tolower((unsigned char)*c);
    int avx512 = strstr(core, "skylakex") || strstr(core, "cooperlake") || strstr(core, "sapphirerapids");
    double fp32 = avx512 ? 100.0 : 50.0;
    if (!bf16) return fp32;
#ifdef SCMOE_WITH_ONEDNN
    const blas_host *h = (const blas_host *)self;
    if (h->engine == BLAS_BF16_ONEDNN && strstr(scmoe__onednn_isa(), "amx") && 700.0 > 8.0 * fp32) return 700.0;
#else
    (void)self;
#endif
    return 8.0 * fp32;
}
static const char *host_describe(const blas_backend *self) { return ((const blas_host *)self)->desc; }

void scmoe__blas_host_destroy(blas_backend *b) {
    blas_host *h = (blas_host *)b;
    if (!h) return;
    for (int s = 0; h->slot && s < h->slots; s++) {
        free(h->slot[s].a);
        free(h->slot[s].b);
        free(h->slot[s].ha);
        free(h->slot[s].hb);
    }
    free(h->slot);
#ifdef SCMOE_WITH_ONEDNN
    scmoe__onednn_destroy(h->dnn);
#endif
    free(h);
}

blas_backend *scmoe__blas_host_create(int engine) {
    blas_host *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->base =
        (blas_backend){"openblas", host_gemm, host_max_threads, host_gemm_bf16, host_describe, host_nominal_gflops};
    /* slots for every thread a parallel region may hold: the cores, the OpenMP default, and 64 for a host that
     * asks for more threads than cores; a slot costs its struct until its thread first calls */
    int procs = omp_get_num_procs(), threads = omp_get_max_threads();
    h->slots = procs > threads ? procs : threads;
    h->slots = h->slots > 64 ? h->slots : 64;
    h->slot = calloc((size_t)h->slots, sizeof *h->slot);
    if (!h->slot) {
        scmoe__blas_host_destroy(&h->base);
        return NULL;
    }
#ifdef SCMOE_WITH_ONEDNN
    if (engine == BLAS_BF16_AUTO || engine == BLAS_BF16_ONEDNN) {
        h->dnn = scmoe__onednn_create(1, h->slots);
        h->engine = h->dnn ? BLAS_BF16_ONEDNN : BLAS_BF16_ROUNDED;
    } else if (engine == BLAS_BF16_ONEDNN_F32) {
        h->dnn = scmoe__onednn_create(0, h->slots);
        h->engine = h->dnn ? BLAS_BF16_ONEDNN_F32 : BLAS_BF16_ROUNDED;
    } else h->engine = BLAS_BF16_ROUNDED;
    if (engine != BLAS_BF16_AUTO && h->engine != engine) { /* the engine asked for cannot run here */
        scmoe__blas_host_destroy(&h->base);
        return NULL;
    }
    if (h->engine == BLAS_BF16_ROUNDED)
        snprintf(h->desc, sizeof h->desc,
                 "fp32: openblas %s; bf16: operands rounded to bf16, fp32 openblas GEMM "
                 "(oneDNN %s has no bf16 matmul here)",
                 scmoe__openblas_core(), scmoe__onednn_isa());
    else
        snprintf(h->desc, sizeof h->desc, "fp32: openblas %s; bf16: oneDNN %s matmul %s (isa %s)",
                 scmoe__openblas_core(), h->engine == BLAS_BF16_ONEDNN ? "bf16" : "f32 on rounded operands",
                 scmoe__onednn_impl(h->dnn), scmoe__onednn_isa());
#else
    if (engine != BLAS_BF16_AUTO && engine != BLAS_BF16_ROUNDED) {
        scmoe__blas_host_destroy(&h->base);
        return NULL;
    }
    h->engine = BLAS_BF16_ROUNDED;
    snprintf(h->desc, sizeof h->desc,
             "fp32: openblas %s; bf16: operands rounded to bf16, fp32 openblas GEMM "
             "(built without oneDNN)",
             scmoe__openblas_core());
#endif
    return &h->base;
}

int scmoe__blas_host_engine(const blas_backend *b) { return ((const blas_host *)b)->engine; }
int scmoe__blas_host_cached(const blas_backend *b) {
#ifdef SCMOE_WITH_ONEDNN
    return scmoe__onednn_cached(((const blas_host *)b)->dnn);
#else
    return 0;
#endif
}
