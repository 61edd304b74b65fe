/* test_bf16.c: the bf16 GEMM engines (blas_backend/blas_host.c, onednn.c) and SCMOE_PRECISION_BF16's
 * API, on one rank. The pair against PyTorch in bf16 is test_oracle_pair's bf16_* cases; P ranks ==
 * 1 rank, the same bits twice and overlapped == serialized are in test_ep.
 *
 * Every engine must compute C = alpha op(r(A)) op(r(B)) + beta C with r() the rounding to bf16 and the
 * sums in fp32. The reference is that product in double; each product of two bf16 values is exact in
 * fp32 (8 + 8 significant bits), so the only error is the fp32 summation, in any order at most
 * gamma_K = K 2^-24 / (1 - K 2^-24) times sum_k |a_k b_k|, plus one rounding each for alpha's product and
 * beta's sum: tol = ((K + 2) 2^-24) (|alpha| sum |a b| + |beta C0|) per element. */
#include "scmoe.h"
#include "blas_backend/blas.h"
#include "kernels/kernels.h"
#include "tests/check.h"
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rs = 0x1234567;
static float urand(void) {
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rs >> 40) * (1.0 / 16777216.0) * 2.0 - 1.0);
}
/* the reference's rounding, written apart from the library's: keep the top 16 bits, rounding the rest
 * to nearest, ties to the even result (no NaN in the data) */
static double r16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t lo = u & 0xFFFFu, hi = u & 0xFFFF0000u;
    if (lo > 0x8000u || (lo == 0x8000u && (hi & 0x10000u))) hi += 0x10000u;
    float y;
    memcpy(&y, &hi, 4);
    return y;
}

/* op(X)[i, j] of a row-major matrix with stride ld, transposed when t */
static float at(const float *X, int t, int ld, int i, int j) {
    return t ? X[(size_t)j * ld + i] : X[(size_t)i * ld + j];
}

/* one GEMM through b's gemm_bf16 against the double reference; *bits: the result for bit comparisons */
static int gemm_ok(const blas_backend *b, int ta, int tb, int M, int N, int K, float alpha, float beta, int copies,
                   float **bits) {
    int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
    size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
    float *A = malloc(4 * na), *B = malloc(4 * nb), *C = malloc(4 * nc), *C0 = malloc(4 * nc);
    uint16_t *Ah = malloc(2 * na), *Bh = malloc(2 * nb);
    for (size_t i = 0; i < na; i++) A[i] = urand();
    for (size_t i = 0; i < nb; i++) B[i] = 3.0f * urand();
    for (size_t i = 0; i < nc; i++) C[i] = C0[i] = urand();
    scmoe__bf16_pack(Ah, A, na);
    scmoe__bf16_pack(Bh, B, nb);
    b->gemm_bf16(b, ta, tb, M, N, K, alpha, A, copies ? Ah : NULL, lda, B, copies ? Bh : NULL, ldb, beta, C, ldc);
    int ok = 1;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0, sa = 0;
            for (int k = 0; k < K; k++) {
                double p = r16(at(A, ta, lda, i, k)) * r16(at(B, tb, ldb, k, j));
                s += p;
                sa += fabs(p);
            }
            double c0 = C0[(size_t)i * ldc + j], ref = alpha * s + (beta == 0.0f ? 0.0 : beta * c0);
            double tol = (K + 2) * ldexp(1.0, -24) * (fabs(alpha) * sa + fabs(beta * c0)) + 1e-30;
            ok &= fabs(C[(size_t)i * ldc + j] - ref) <= tol;
        }
    for (int i = 0; i < M; i++) /* the columns past N are not C's */
        ok &= C[(size_t)i * ldc + N] == C0[(size_t)i * ldc + N];
    if (bits) *bits = C;
    else free(C);
    free(A);
    free(B);
    free(C0);
    free(Ah);
    free(Bh);
    return ok;
}

static void count_call(void *n) { ++*(int *)n; }

/* gemm_bf16_tiles: op(A) converted once, the bits of one gemm_bf16 call per tile, between() after every tile but
 * the last; tiles of 5 columns over N = 13 (5, 5, 3), every transpose, with and without bf16 copies */
static void tiles(const blas_backend *b, const char *name) {
    enum { M = 9, N = 13, K = 21, T = 5 };
    int same = 1, calls_ok = 1;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int copies = 0; copies < 2; copies++) {
                int lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 3, ldc = N + 2;
                size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
                float *A = malloc(4 * na), *B = malloc(4 * nb), *C1 = malloc(4 * nc), *C2 = malloc(4 * nc);
                uint16_t *Ah = malloc(2 * na), *Bh = malloc(2 * nb);
                for (size_t i = 0; i < na; i++) A[i] = urand();
                for (size_t i = 0; i < nb; i++) B[i] = urand();
                for (size_t i = 0; i < nc; i++) C1[i] = C2[i] = urand();
                scmoe__bf16_pack(Ah, A, na);
                scmoe__bf16_pack(Bh, B, nb);
                const uint16_t *ah = copies ? Ah : NULL, *bh = copies ? Bh : NULL;
                for (int n0 = 0; n0 < N; n0 += T) {
                    size_t off = tb ? (size_t)n0 * ldb : (size_t)n0;
                    b->gemm_bf16(b, ta, tb, M, N - n0 < T ? N - n0 : T, K, 0.5f, A, ah, lda, B + off,
                                 bh ? bh + off : NULL, ldb, 1.0f, C1 + n0, ldc);
                }
                int calls = 0;
                b->gemm_bf16_tiles(b, ta, tb, M, N, K, 0.5f, A, ah, lda, B, bh, ldb, 1.0f, C2, ldc, T, count_call,
                                   &calls);
                same &= !memcmp(C1, C2, 4 * nc);
                calls_ok &= calls == 2;
                free(A), free(B), free(C1), free(C2), free(Ah), free(Bh);
            }
    CHECK(same, "%s: gemm_bf16_tiles gives the bits of one gemm_bf16 per tile (8 cases)", name);
    CHECK(calls_ok, "%s: gemm_bf16_tiles calls between() after every tile but the last", name);
}

static void engine(int which, const char *name) {
    rs = 0x1234567;
    blas_backend *b = scmoe__blas_host_create(which);
    if (!b) {
#ifdef SCMOE_WITH_ONEDNN
        CHECK(which == BLAS_BF16_ONEDNN, "%s: made (only oneDNN's bf16 matmul may be missing here)", name);
#else
        CHECK(which != BLAS_BF16_ROUNDED, "%s: made", name);
#endif
        if (which == BLAS_BF16_ONEDNN) printf("# %s: not on this CPU\n", name);
        return;
    }
    CHECK(scmoe__blas_host_engine(b) == which, "%s: the engine asked for runs (%d)", name, scmoe__blas_host_engine(b));
    int ok = 1, cases = 0;
    const float alphas[] = {1.0f, 0.37f}, betas[] = {0.0f, 1.0f, 0.5f};
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int ai = 0; ai < 2; ai++)
                for (int bi = 0; bi < 3; bi++)
                    for (int copies = 0; copies < 2; copies++, cases++)
                        ok &= gemm_ok(b, ta, tb, 7, 13, 29, alphas[ai], betas[bi], copies, NULL);
    CHECK(ok, "%s: %d GEMMs (transposes, alpha, beta, with and without bf16 copies) within the fp32-sum bound", name,
          cases);
    int cached = scmoe__blas_host_cached(b);
    if (which != BLAS_BF16_ROUNDED) {
        /* bf16: operands with copies keep their ld, the others are packed densely (two shapes per combination);
         * f32: every operand is rounded into a dense buffer (one shape) */
        int want = which == BLAS_BF16_ONEDNN ? 48 : 24;
        CHECK(cached == want, "%s: one primitive per shape (%d, want %d)", name, cached, want);
        for (int ta = 0; ta < 2; ta++) ok &= gemm_ok(b, ta, 1, 7, 13, 29, 1.0f, 0.0f, 0, NULL);
        CHECK(ok && scmoe__blas_host_cached(b) == cached, "%s: the same shapes again make no primitive", name);
    } else CHECK(cached == 0, "%s: no oneDNN primitives", name);
    /* the same GEMM from 4 threads at once (each with its own operand buffers): the serial call's bits */
    enum { M = 16, N = 24, K = 40 };
    float *A = malloc(4 * K * M), *B = malloc(4 * K * N), *C1 = calloc(M * N, 4), *Ct = calloc(4 * M * N, 4);
    for (int i = 0; i < K * M; i++) A[i] = urand();
    for (int i = 0; i < K * N; i++) B[i] = urand();
    b->gemm_bf16(b, 1, 0, M, N, K, 1.0f, A, NULL, M, B, NULL, N, 0.0f, C1, N);
#pragma omp parallel for num_threads(4)
    for (int t = 0; t < 4; t++) b->gemm_bf16(b, 1, 0, M, N, K, 1.0f, A, NULL, M, B, NULL, N, 0.0f, Ct + t * M * N, N);
    int same = 1;
    for (int t = 0; t < 4; t++) same &= !memcmp(C1, Ct + t * M * N, 4 * M * N);
    CHECK(same, "%s: 4 threads at once give the serial call's bits", name);
    free(A);
    free(B);
    free(C1);
    free(Ct);
    tiles(b, name);
    /* K = 0: C = beta C; M = 0: nothing */
    float C[6] = {1, 2, 3, 4, 5, 6}, Az[1] = {0}, Bz[1] = {0};
    b->gemm_bf16(b, 0, 0, 2, 3, 0, 1.0f, Az, NULL, 1, Bz, NULL, 3, 0.5f, C, 3);
    CHECK(C[0] == 0.5f && C[5] == 3.0f, "%s: K = 0 gives beta C", name);
    b->gemm_bf16(b, 0, 0, 0, 3, 4, 1.0f, Az, NULL, 4, Bz, NULL, 3, 0.0f, C, 3);
    CHECK(C[0] == 0.5f, "%s: M = 0 writes nothing", name);
    const char *desc = b->describe(b);
    CHECK(desc && strstr(desc, scmoe__openblas_core()), "%s: describes itself: %s", name, desc ? desc : "(null)");
    scmoe__blas_host_destroy(b);
}

/* The precision option: validated, and the weights' bf16 copies follow scmoe_*_params_changed(). */
static void api(void) {
    scmoe_config c = scmoe_config_default();
    char msg[200];
    c.precision = (scmoe_precision)2;
    CHECK(scmoe_config_validate(&c, msg, sizeof msg) == SCMOE_ERR_OPTION && strstr(msg, "precision"),
          "precision 2 refused: %s", msg);
    CHECK(scmoe_moe_params_changed(NULL) == SCMOE_ERR_NULL && scmoe_pair_params_changed(NULL) == SCMOE_ERR_NULL,
          "params_changed(NULL): SCMOE_ERR_NULL");
    scmoe_context *ctx;
    if (scmoe_context_create(&ctx)) {
        CHECK(0, "context");
        return;
    }
    const char *info = scmoe_context_gemm_info(ctx);
    CHECK(info && strstr(info, "openblas") && strstr(info, "bf16"), "gemm info: %s", info ? info : "(null)");
    c = scmoe_config_default();
    c.d_model = 16;
    c.d_hidden = 32;
    c.n_experts = 4;
    c.top_k = 2;
    c.max_tokens = 32;
    c.precision = SCMOE_PRECISION_BF16;
    scmoe_moe *m = NULL;
    if (scmoe_moe_create(ctx, &c, &m)) {
        CHECK(0, "bf16 layer: create: %s", scmoe_last_error(ctx));
        scmoe_context_destroy(ctx);
        return;
    }
    enum { n = 32 };
    float x[n * 16], y0[n * 16], y1[n * 16], y2[n * 16];
    for (int i = 0; i < n * 16; i++) x[i] = urand();
    scmoe_tensor w;
    int ok = scmoe_moe_param(m, "experts.0.w1", &w) == SCMOE_OK;
    ok &= scmoe_moe_forward(m, n, x, y0, NULL) == SCMOE_OK;
    for (size_t i = 0; ok && i < w.numel; i++) w.data[i] *= 2.0f;
    ok &= scmoe_moe_forward(m, n, x, y1, NULL) == SCMOE_OK;
    ok &= scmoe_moe_params_changed(m) == SCMOE_OK;
    ok &= scmoe_moe_forward(m, n, x, y2, NULL) == SCMOE_OK;
    CHECK(ok && !memcmp(y0, y1, sizeof y0), "bf16 layer: weights written without params_changed: the old copies run");
    CHECK(ok && memcmp(y0, y2, sizeof y0), "bf16 layer: after params_changed the new weights run");
    scmoe_moe_destroy(m);
    scmoe_context_destroy(ctx);
}

int main(void) {
    engine(BLAS_BF16_ROUNDED, "rounded operands, fp32 OpenBLAS");
#ifdef SCMOE_WITH_ONEDNN
    engine(BLAS_BF16_ONEDNN_F32, "oneDNN f32 matmul on rounded operands");
    engine(BLAS_BF16_ONEDNN, "oneDNN bf16 matmul");
    blas_backend *a = scmoe__blas_host_create(BLAS_BF16_AUTO), *o = scmoe__blas_host_create(BLAS_BF16_ONEDNN);
    CHECK(a && scmoe__blas_host_engine(a) == (o ? BLAS_BF16_ONEDNN : BLAS_BF16_ROUNDED),
          "AUTO takes oneDNN's bf16 matmul exactly when this CPU has one (%s)", a ? a->describe(a) : "");
    scmoe__blas_host_destroy(a);
    scmoe__blas_host_destroy(o);
#else
    printf("# built without oneDNN (ONEDNN=0): the rounded engine only\n");
#endif
    api();
    return check_summary();
}
