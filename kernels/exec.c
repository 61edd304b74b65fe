#include "exec.h"
#include <omp.h>

void exec_poll(const exec *ex) {
    if (ex->poll && omp_get_thread_num() == 0) ex->poll(ex->poll_arg);
}

void exec_gemm(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    /* Tiles split the output's columns, always the same way whether or not anything is in flight,
     * so the numbers never depend on timing; column tiles keep the GEMMs' row count, and with it
     * their efficiency, where row tiles of a few dozen rows halve it. */
    int tile = ex->poll_cols > 0 ? ex->poll_cols : N;
    for (int n0 = 0; n0 < N; n0 += tile) {
        int n = N - n0 < tile ? N - n0 : tile;
        /* column n0 of op(B): B + n0 untransposed, B + n0*ldb (row n0) transposed */
        const float *b = trans_b ? B + (long)n0 * ldb : B + n0;
        ex->blas->gemm(ex->blas, trans_a, trans_b, M, n, K, alpha, A, lda, b, ldb, beta, C + n0, ldc);
        if (n0 + n < N) exec_poll(ex);
    }
}
