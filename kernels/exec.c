#include "exec.h"
#include <omp.h>

void exec_poll(const exec *ex) {
    if (ex->poll && omp_get_thread_num() == 0) ex->poll(ex->poll_arg);
}

void exec_gemm(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    int tile = ex->poll ? ex->poll_rows : M;
    if (tile < 1) tile = M;
    for (int m0 = 0; m0 < M; m0 += tile) {
        int m = M - m0 < tile ? M - m0 : tile;
        /* row m0 of op(A): A + m0*lda untransposed, A + m0 (column m0) transposed */
        const float *a = trans_a ? A + m0 : A + (long)m0 * lda;
        ex->blas->gemm(trans_a, trans_b, m, N, K, alpha, a, lda, B, ldb, beta, C + (long)m0 * ldc, ldc);
        if (m0 + m < M) exec_poll(ex);
    }
}
