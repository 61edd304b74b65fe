/* openblas.c: the compute interface on OpenBLAS (Debian's OpenMP build). Inside an OpenMP parallel
 * region OpenBLAS runs single-threaded, which is what the grouped-expert and per-head loops rely on. */
#include "blas.h"
#include <cblas.h>
#include <omp.h>

static void openblas_gemm(const blas_backend *self, int trans_a, int trans_b, int M, int N, int K, float alpha,
                          const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* BLAS leaves C untouched for K = 0 only when beta = 1: make beta explicit */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(long)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(long)i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha,
                A, lda, B, ldb, beta, C, ldc);
}

static int openblas_max_threads(void) { return omp_get_max_threads(); }

/* OpenBLAS picks its kernels at run time from the CPU it sees (a VM reporting a generic CPU gets an old
 * core's kernels); the name says which it took */
const char *scmoe__openblas_core(void) { return openblas_get_corename(); }

static const char *openblas_describe(const blas_backend *self) { return "openblas"; }

const blas_backend *scmoe__blas_openblas(void) {
    static const blas_backend b = {"openblas", openblas_gemm, openblas_max_threads, NULL, openblas_describe,
                                   NULL,       NULL};
    return &b;
}
