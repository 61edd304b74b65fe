/* blas.h: the compute interface the core calls. The core never includes cblas.h; a backend fills
 * this table (OpenBLAS here, cuBLAS later) and the kernels reach GEMM only through it. */
#ifndef SCMOE_BLAS_H
#define SCMOE_BLAS_H

struct blas_backend;

/* C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major, op = transpose when trans != 0.
 * self is the table the call came through, so a backend with state (a cuBLAS handle and stream)
 * embeds the table as its first member and finds that state from it: no globals. */
typedef void (*blas_gemm_fn)(const struct blas_backend *self, int trans_a, int trans_b, int M, int N, int K,
                             float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                             float *C, int ldc);

typedef struct blas_backend {
    const char *name;
    blas_gemm_fn gemm;
    int (*max_threads)(void);   /* threads a GEMM may use outside a parallel region */
} blas_backend;

const blas_backend *blas_openblas(void);

#endif
