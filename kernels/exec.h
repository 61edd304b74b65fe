/* exec.h: what every kernel runs with: the GEMM backend, the compute backend and the progress hook. exec_gemm splits a
 * GEMM's output columns into tiles of poll_cols; while a nonblocking exchange is in flight the
 * schedule sets poll, called between tiles, so MPI moves bytes while the GEMM computes. */
#ifndef SCMOE_EXEC_H
#define SCMOE_EXEC_H

#include "../blas_backend/blas.h"
#include "compute.h"

typedef struct exec {
    const blas_backend *blas;
    void (*poll)(void *arg);   /* NULL: nothing in flight */
    void *poll_arg;
    int poll_cols;
    const compute_ops *compute; /* NULL: compute_host() */
} exec;

static inline const compute_ops *exec_compute(const exec *ex) { return ex->compute ? ex->compute : compute_host(); }

/* Calls the poll hook, from the master thread only (MPI is initialised FUNNELED at least). */
void exec_poll(const exec *ex);

/* exec->blas->gemm over column tiles of poll_cols, with a poll between tiles while one is set. */
void exec_gemm(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

#endif
