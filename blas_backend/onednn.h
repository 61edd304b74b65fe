/* onednn.h: oneDNN matmul primitives, made once per GEMM shape and kept (onednn.c). Only blas_host.c
 * calls these; the core never sees oneDNN. */
#ifndef SCMOE_ONEDNN_H
#define SCMOE_ONEDNN_H

/* Most primitives one cache holds. Past it a shape is not cached and the caller runs its fallback
 * (the same math), so the cache never evicts and never grows: a layer's GEMMs have a few dozen shapes
 * (row counts that follow the routing add one per count seen). */
#define SCMOE_ONEDNN_CACHE 256

typedef struct scmoe__onednn scmoe__onednn;

/* A cache for operands of bf16 (bf16 = 1) or f32, fp32 C, used from at most slots threads at once
 * (slot: the caller's thread, 0..slots-1). NULL when oneDNN has no implementation for that type on
 * this CPU other than its slow reference one, or when out of memory. */
scmoe__onednn *scmoe__onednn_create(int bf16, int slots);
void scmoe__onednn_destroy(scmoe__onednn *d);
/* C = alpha op(A) op(B) + beta C as blas.h (M, N, K > 0), A and B of the cache's type. 0: done;
 * -1: not run (cache full, or no primitive for this shape): the caller computes it another way. */
int scmoe__onednn_gemm(scmoe__onednn *d, int slot, int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const void *A, int lda, const void *B, int ldb, float beta, float *C, int ldc);
/* primitives cached; the implementation oneDNN chose for a probe GEMM (e.g. "brg:avx512_core_amx_bf16") */
int scmoe__onednn_cached(const scmoe__onednn *d);
const char *scmoe__onednn_impl(const scmoe__onednn *d);
/* the instruction set oneDNN dispatches to on this CPU (dnnl_get_effective_cpu_isa), e.g. "avx2" */
const char *scmoe__onednn_isa(void);

#endif
