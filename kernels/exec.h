/* exec.h: what every kernel runs with: the GEMM backend, the compute backend and the progress hook. scmoe__exec_gemm
 * splits a GEMM's output columns into tiles; while a nonblocking exchange is in flight the schedule sets poll,
 * called between tiles, so MPI moves bytes while the GEMM computes.
 *
 * Tile width: poll_cols columns when set (> 0); else sized by time, so a poll comes every ~poll_us whatever the
 * GEMM's shape and engine: a tile of c columns costs 2 M K c flops, at the engine's nominal rate r per thread
 * (blas_backend.nominal_gflops) that is 2 M K c / r s on one thread, so
 *     c = ceil(poll_us 1e3 r / (2 M K)), rounded up to a multiple of 16 (whole SIMD panels), at most N.
 * The thread count is left out on purpose (t threads poll t times as often): the results must not depend on it.
 * A faster engine (bf16 on AMX: ~10x fp32) gets proportionally wider tiles rather than ten times as many polls
 * and calls, and a GEMM with many rows gets narrow ones rather than a long silence. r is a fixed figure, not a
 * measurement, so a shape is always cut the same way and the results never depend on timing (OpenBLAS's sums
 * do depend on N).
 *
 * Precision (scmoe_config.precision): with bf16 set, scmoe__exec_gemm and scmoe__exec_gemm_one run the backend's
 * gemm_bf16 (bf16 operands, fp32 accumulation); scmoe__exec_gemm_fp32 always runs fp32 (the gates). An operand
 * inside the layer's weights [w, w + wn) is read from their bf16 copy wb at the same offset, so weights
 * are rounded once per change (scmoe_*_params_changed), not once per GEMM. A bf16 GEMM's tiles go to the
 * backend in one call where it has gemm_bf16_tiles, so the activation operand op(A), which every tile reads
 * whole, is converted once per GEMM, not once per tile. */
#ifndef SCMOE_EXEC_H
#define SCMOE_EXEC_H

#include <stddef.h>
#include <stdint.h>
#include "../blas_backend/blas.h"
#include "compute.h"

typedef struct exec {
    const blas_backend *blas;
    void (*poll)(void *arg); /* NULL: nothing in flight */
    void *poll_arg;
    int poll_cols;              /* > 0: fixed tile width; 0: sized by poll_us */
    double poll_us;             /* target compute time between polls, microseconds; 0: one tile (a device) */
    double gflops[2];           /* nominal GFLOP/s per thread of the fp32 and bf16 engines (0: unknown) */
    const compute_ops *compute; /* NULL: scmoe__compute_host() (exec_compute, ops.h) */
    int bf16;                   /* GEMMs in bf16 (blas->gemm_bf16) */
    const float *w;             /* the weights, and their bf16 copy (NULL: none, operands rounded per GEMM) */
    const uint16_t *wb;
    size_t wn;
} exec;

/* Calls the poll hook, from the master thread only (MPI is initialised FUNNELED at least). */
void scmoe__exec_poll(const exec *ex);

/* exec->blas->gemm (or gemm_bf16) over column tiles of poll_cols, with a poll between tiles while one is set. */
void scmoe__exec_gemm(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc);
/* one GEMM, untiled, in the exec's precision (a task of a parallel loop: attention's heads) */
void scmoe__exec_gemm_one(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                          int lda, const float *B, int ldb, float beta, float *C, int ldc);
/* scmoe__exec_gemm in fp32 whatever the precision */
void scmoe__exec_gemm_fp32(const exec *ex, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                           int lda, const float *B, int ldb, float beta, float *C, int ldc);

#endif
