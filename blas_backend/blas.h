/* blas.h: the compute interface the core calls. The core never includes cblas.h; a backend fills
 * this table (OpenBLAS + oneDNN on the host, cuBLAS on a device) and the kernels reach GEMM only
 * through it. */
#ifndef SCMOE_BLAS_H
#define SCMOE_BLAS_H

#include <stdint.h>

struct blas_backend;

/* C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major, op = transpose when trans != 0.
 * self is the table the call came through, so a backend with state (a cuBLAS handle and stream)
 * embeds the table as its first member and finds that state from it: no globals. */
typedef void (*blas_gemm_fn)(const struct blas_backend *self, int trans_a, int trans_b, int M, int N, int K,
                             float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                             int ldc);

/* The same GEMM in mixed precision: C = alpha op(bf16(A)) op(bf16(B)) + beta C, products and sums in
 * fp32, bf16() rounding to nearest even (kernels/bf16.c). Ab / Bb are the operands already rounded,
 * laid out like A / B with the same ld (a layer's bf16 weight copies), or NULL: the backend rounds A / B
 * itself. Every backend computes this same math; they differ only in the order of the fp32 sums. */
typedef void (*blas_gemm_bf16_fn)(const struct blas_backend *self, int trans_a, int trans_b, int M, int N, int K,
                                  float alpha, const float *A, const uint16_t *Ab, int lda, const float *B,
                                  const uint16_t *Bb, int ldb, float beta, float *C, int ldc);

/* gemm_bf16 cut into column tiles of C (tile columns each, the last one narrower), between(arg) called after
 * every tile but the last: the results are those of one gemm_bf16 call per tile, bit for bit. What it saves is
 * the conversion of op(A), which every tile reads whole: it is converted once for the GEMM instead of once per
 * tile (M K elements a tile, as much memory traffic as a narrow tile's arithmetic). The converted op(A) lives in
 * the calling thread's operand buffers until the last tile, so between() must not run a bf16 GEMM on that thread
 * (the poll hook only tests and starts exchanges). */
typedef void (*blas_gemm_bf16_tiles_fn)(const struct blas_backend *self, int trans_a, int trans_b, int M, int N, int K,
                                        float alpha, const float *A, const uint16_t *Ab, int lda, const float *B,
                                        const uint16_t *Bb, int ldb, float beta, float *C, int ldc, int tile,
                                        void (*between)(void *arg), void *arg);

typedef struct blas_backend {
    const char *name;
    blas_gemm_fn gemm;
    int (*max_threads)(void); /* threads a GEMM may use outside a parallel region */
    blas_gemm_bf16_fn gemm_bf16;
    /* what runs the GEMMs, for people: kernels and instruction sets (static or owned by the table) */
    const char *(*describe)(const struct blas_backend *self);
    /* GFLOP/s one thread of this engine is assumed to reach (bf16: the gemm_bf16 engine), used only to size
     * GEMM tiles by time (exec.c). A fixed figure per engine, never measured: tiles, and with them the
     * results, must not depend on timing. NULL: tiles are not sized by time (a device) */
    double (*nominal_gflops)(const struct blas_backend *self, int bf16);
    /* NULL: a tiled bf16 GEMM is one gemm_bf16 call per tile (a device, where GEMMs are not tiled) */
    blas_gemm_bf16_tiles_fn gemm_bf16_tiles;
} blas_backend;

/* fp32 GEMMs through OpenBLAS (stateless); scmoe__openblas_core: the kernel OpenBLAS picked at run time */
const blas_backend *scmoe__blas_openblas(void);
const char *scmoe__openblas_core(void);

/* The host's table (blas_host.c): fp32 through OpenBLAS, bf16 through oneDNN where it has bf16 matmuls
 * for this CPU, else the operands rounded to bf16 and an fp32 OpenBLAS GEMM (the same math). It owns a
 * primitive cache and per-thread operand buffers, so one is made per context. engine: one of
 * BLAS_BF16_* (AUTO in the library; the others let tests reach each path). NULL when out of memory or
 * when the engine asked for cannot run here. */
enum { BLAS_BF16_AUTO = 0, BLAS_BF16_ROUNDED = 1, BLAS_BF16_ONEDNN = 2, BLAS_BF16_ONEDNN_F32 = 3 };
blas_backend *scmoe__blas_host_create(int engine);
void scmoe__blas_host_destroy(blas_backend *b);
/* which engine runs the bf16 GEMMs (BLAS_BF16_ROUNDED, _ONEDNN or _ONEDNN_F32), and how many oneDNN
 * primitives its cache holds */
int scmoe__blas_host_engine(const blas_backend *b);
int scmoe__blas_host_cached(const blas_backend *b);

#endif
