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

/* op(A) of one bf16 GEMM converted once for all its column tiles: bf16 values (h) for the oneDNN engine, the
 * same values as floats (f) for the others; ld its row stride */
typedef struct held_a {
    const uint16_t *h;
    const float *f;
    int ld;
} held_a;

/* A (ra x ca as stored) into the slot's buffers; -1 when they cannot grow (the caller runs the naive loop) */
static int hold_a(const blas_host *h, bf16_slot *sl, int ra, int ca, const float *A, const uint16_t *Ab, int lda,
                  held_a *a) {
    *a = (held_a){0};
#ifdef SCMOE_WITH_ONEDNN
    if (h->engine == BLAS_BF16_ONEDNN) {
        if (Ab) *a = (held_a){Ab, NULL, lda};
        else if (bf16_grow((void **)&sl->ha, &sl->nha, (size_t)ra * ca, 2)) {
            scmoe__bf16_pack_rows(sl->ha, A, ra, ca, lda);
            *a = (held_a){sl->ha, NULL, ca};
        }
        if (a->h) return 0;
    }
#else
    (void)h;
#endif
    float *f = bf16_grow((void **)&sl->a, &sl->na, (size_t)ra * ca, 4);
    if (!f) return -1;
    if (Ab) scmoe__bf16_unpack_rows(f, Ab, ra, ca, lda);
    else scmoe__bf16_round_rows(f, A, ra, ca, lda);
    *a = (held_a){NULL, f, ca};
    return 0;
}

/* one tile, C[M, N] of op(A) op(B), with op(A) held; A, Ab, lda are the caller's, for the fallbacks */
static void tile_gemm(const blas_host *h, bf16_slot *sl, int s, int ta, int tb, int M, int N, int K, float alpha,
                      const held_a *ha, const float *A, const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb,
                      int ldb, float beta, float *C, int ldc) {
    int ra = ta ? K : M, ca = ta ? M : K, rb = tb ? N : K, cb = tb ? K : N;
#ifdef SCMOE_WITH_ONEDNN
    if (ha->h) {
        const uint16_t *b = Bb;
        int lb = ldb;
        if (!b && (b = bf16_grow((void **)&sl->hb, &sl->nhb, (size_t)rb * cb, 2))) {
            scmoe__bf16_pack_rows(sl->hb, B, rb, cb, ldb);
            lb = cb;
        }
        if (b && !scmoe__onednn_gemm(h->dnn, s, ta, tb, M, N, K, alpha, ha->h, ha->ld, b, lb, beta, C, ldc)) return;
    }
#endif
    /* the float engines, or a shape oneDNN's cache cannot take: op(A) as floats (held, or unpacked now) */
    const float *a = ha->f;
    int la = ha->ld;
    float *af = a ? NULL : bf16_grow((void **)&sl->a, &sl->na, (size_t)ra * ca, 4);
    if (af) {
        scmoe__bf16_unpack_rows(af, ha->h, ra, ca, ha->ld);
        a = af, la = ca;
    }
    float *b = bf16_grow((void **)&sl->b, &sl->nb, (size_t)rb * cb, 4);
    if (!a || !b) {
        bf16_gemm_naive(ta, tb, M, N, K, alpha, A, Ab, lda, B, Bb, ldb, beta, C, ldc);
        return;
    }
    if (Bb) scmoe__bf16_unpack_rows(b, Bb, rb, cb, ldb);
    else scmoe__bf16_round_rows(b, B, rb, cb, ldb);
#ifdef SCMOE_WITH_ONEDNN
    if (h->engine == BLAS_BF16_ONEDNN_F32 &&
        !scmoe__onednn_gemm(h->dnn, s, ta, tb, M, N, K, alpha, a, la, b, cb, beta, C, ldc))
        return;
#else
    (void)s;
#endif
    host_gemm(&h->base, ta, tb, M, N, K, alpha, a, la, b, cb, beta, C, ldc);
}

static void host_gemm_bf16_tiles(const blas_backend *self, int ta, int tb, int M, int N, int K, float alpha,
                                 const float *A, const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb,
                                 int ldb, float beta, float *C, int ldc, int tile, void (*between)(void *), void *arg) {
    if (M <= 0 || N <= 0) return;
    if (tile <= 0 || tile > N) tile = N;
    const blas_host *h = (const blas_host *)self;
    int s = bf16_slot_of();
    bf16_slot *sl = s < h->slots ? &h->slot[s] : NULL;
    held_a ha = {0};
    /* K = 0 (C = beta C: nothing to round), a caller beyond the slots, or no memory: per tile, directly */
    int direct = K <= 0 || !sl || hold_a(h, sl, ta ? K : M, ta ? M : K, A, Ab, lda, &ha);
    for (int n0 = 0; n0 < N; n0 += tile) {
        int n = N - n0 < tile ? N - n0 : tile;
        /* column n0 of op(B): B + n0 untransposed, B + n0*ldb (row n0) transposed */
        size_t off = tb ? (size_t)n0 * ldb : (size_t)n0;
        const uint16_t *bb = Bb ? Bb + off : NULL;
        if (K <= 0) host_gemm(self, ta, tb, M, n, K, alpha, A, lda, B + off, ldb, beta, C + n0, ldc);
        else if (direct) bf16_gemm_naive(ta, tb, M, n, K, alpha, A, Ab, lda, B + off, bb, ldb, beta, C + n0, ldc);
        else tile_gemm(h, sl, s, ta, tb, M, n, K, alpha, &ha, A, Ab, lda, B + off, bb, ldb, beta, C + n0, ldc);
        if (between && n0 + n < N) between(arg);
    }
}

static void host_gemm_bf16(const blas_backend *self, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                           const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb, int ldb, float beta,
                           float *C, int ldc) {
    host_gemm_bf16_tiles(self, ta, tb, M, N, K, alpha, A, Ab, lda, B, Bb, ldb, beta, C, ldc, N, NULL, NULL);
}

static int host_max_threads(void) { return omp_get_max_threads(); }

/* Round figures of one core's GEMM speed by kernel family (of the order measured on this project's machines:
 * OpenBLAS on an AVX2 Zen ~40-70, AVX-512 ~2x; oneDNN bf16 on AMX ~700 per core, with AVX512-BF16's dot products
 * about twice AVX-512's fp32 FMAs). Only the ratio between engines and the order of magnitude matter: they turn
 * poll_us into columns. The rounded and oneDNN-f32 engines are fp32 GEMMs on rounded operands: fp32's figure.
 * (Before gemm_bf16_tiles converted op(A) once per GEMM, every tile converted it again and the bf16 engines had
 * to be given 8x fp32's figure to keep tiles wide enough for that to stay cheap.) */
static double host_nominal_gflops(const blas_backend *self, int bf16) {
    char core[64];
    snprintf(core, sizeof core, "%s", scmoe__openblas_core());
    for (char *c = core; *c; c++) *c = (char)tolower((unsigned char)*c);
    int avx512 = strstr(core, "skylakex") || strstr(core, "cooperlake") || strstr(core, "sapphirerapids");
    double fp32 = avx512 ? 100.0 : 50.0;
    if (!bf16) return fp32;
#ifdef SCMOE_WITH_ONEDNN
    const blas_host *h = (const blas_host *)self;
    if (h->engine == BLAS_BF16_ONEDNN && strstr(scmoe__onednn_isa(), "amx")) return 700.0;
    if (h->engine == BLAS_BF16_ONEDNN && strstr(scmoe__onednn_isa(), "bf16")) return 2.0 * fp32;
#else
    (void)self;
#endif
    return fp32;
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
    h->base = (blas_backend){"openblas",    host_gemm,           host_max_threads,    host_gemm_bf16,
                             host_describe, host_nominal_gflops, host_gemm_bf16_tiles};
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
