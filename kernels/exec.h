/* exec.h: what every kernel runs with: the GEMM backend and the progress hook. When a nonblocking
 * exchange is in flight, the schedule sets poll, and exec_gemm splits its rows into tiles of
 * poll_rows and calls poll between them, so MPI moves bytes while the GEMM computes. */
#ifndef SCMOE_EXEC_H
#define SCMOE_EXEC_H

#include "../blas_backend/blas.h"

typedef struct exec {
    const blas_backend *blas;
    void (*poll)(void *arg);   /* NULL: nothing in flight */
    void *poll_arg;
    int poll_rows;
} exec;

/* Calls the poll hook, from the master thread only (MPI is initialised FUNNELED at least). */
void exec_poll(const exec *ex);

/* exec->blas->gemm, tiled over M with a poll between tiles while an exchange is in flight. Each
 * output row is computed by the same GEMM either way, so tiling does not change results. */
void exec_gemm(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

#endif
