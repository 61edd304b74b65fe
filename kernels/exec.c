#include "exec.h"
#include <math.h>
#include <omp.h>

void scmoe__exec_poll(const exec *ex) {
    if (ex->poll && omp_get_thread_num() == 0) ex->poll(ex->poll_arg);
}

/* x's bf16 copy when x lies in the weights, else NULL */
static const uint16_t *weight_copy(const exec *ex, const float *x) {
    return ex->wb && x >= ex->w && x < ex->w + ex->wn ? ex->wb + (x - ex->w) : NULL;
}

static void gemm(const exec *ex, int bf16, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (bf16)
        ex->blas->gemm_bf16(ex->blas, trans_a, trans_b, M, N, K, alpha, A, weight_copy(ex, A), lda, B,
                            weight_copy(ex, B), ldb, beta, C, ldc);
    else ex->blas->gemm(ex->blas, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void poll_between(void *ex) { scmoe__exec_poll(ex); }

/* the tile width in columns (exec.h) */
static int tile_cols(const exec *ex, int bf16, int M, int N, int K) {
    if (ex->poll_cols > 0) return ex->poll_cols;
    double rate = ex->gflops[bf16 != 0];
    if (ex->poll_us <= 0 || rate <= 0 || M <= 0 || K <= 0) return N > 0 ? N : 1;
    double c = ceil(ex->poll_us * 1e3 * rate / (2.0 * M * K) / 16.0) * 16.0;
    return c >= N ? (N > 0 ? N : 1) : (int)c;
}

static void tiled(const exec *ex, int bf16, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                  int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    /* Tiles split the output's columns, always the same way whether or not anything is in flight,
     * so the numbers never depend on timing; column tiles keep the GEMMs' row count, and with it
     * their efficiency, where row tiles of a few dozen rows halve it. */
    int tile = tile_cols(ex, bf16, M, N, K);
    if (bf16 && ex->blas->gemm_bf16_tiles) { /* the backend converts op(A) once for all the tiles */
        ex->blas->gemm_bf16_tiles(ex->blas, trans_a, trans_b, M, N, K, alpha, A, weight_copy(ex, A), lda, B,
                                  weight_copy(ex, B), ldb, beta, C, ldc, tile, poll_between, (void *)ex);
        return;
    }
    for (int n0 = 0; n0 < N; n0 += tile) {
        int n = N - n0 < tile ? N - n0 : tile;
        /* column n0 of op(B): B + n0 untransposed, B + n0*ldb (row n0) transposed */
        const float *b = trans_b ? B + (long)n0 * ldb : B + n0;
        gemm(ex, bf16, trans_a, trans_b, M, n, K, alpha, A, lda, b, ldb, beta, C + n0, ldc);
        if (n0 + n < N) scmoe__exec_poll(ex);
    }
}

void scmoe__exec_gemm(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    tiled(ex, ex->bf16, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void scmoe__exec_gemm_fp32(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                           int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    tiled(ex, 0, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void scmoe__exec_gemm_one(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                          int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    gemm(ex, ex->bf16, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
