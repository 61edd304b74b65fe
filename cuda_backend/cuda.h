/* cuda.h: the optional CUDA backend (built with `make CUDA=1`, into build/libscmoe_cuda.a).
 *
 *   cublas.c    cuda_blas: blas.h's compute interface on cuBLAS, for DEVICE pointers, on one stream;
 *               a grouped (per-expert) GEMM and a bf16 compute path
 *   kernels.cu  the kernels of kernels/ and moe.c on device buffers, forward and backward, with
 *               host-callable launch wrappers (below); same semantics, same formulas, same tie rules
 *   compute_cuda.c  compute.h's table on the device (kernels/compute_host.c is the host's)
 *   context.c   scmoe_context_use_cuda
 *
 * Every pointer handed to a launch wrapper or to scmoe__cuda_blas_gemm* is a device pointer unless the
 * comment says "host". Wrappers validate their arguments on the host (negative sizes, NULL pointers
 * with work to do) and return cudaErrorInvalidValue without launching anything; a count of 0 is a
 * successful no-op. Otherwise they return the launch's status (cudaGetLastError). Nothing here
 * synchronizes the device: work is enqueued on the stream given.
 *
 * The library keeps no global state, and neither does this backend: every handle, stream and
 * buffer lives in an object the caller creates and destroys. */
#ifndef SCMOE_CUDA_H
#define SCMOE_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>
#include "../blas_backend/blas.h"
#include "../scmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================================= cuBLAS */

struct cublasContext; /* cublasHandle_t is a struct cublasContext *: no cuBLAS header needed here */

enum {
    CUDA_MATH_FP32 = 0, /* plain fp32 GEMMs (no TF32): matches the CPU to ~1e-6 */
    CUDA_MATH_BF16 = 1  /* fp32 in and out, cuBLAS may down-convert inputs to bf16 (tensor cores),
                           fp32 accumulate: CUBLAS_COMPUTE_32F_FAST_16BF */
};

/* The cuBLAS backend. The table is embedded as the FIRST member: a cuda_blas * is a valid
 * blas_backend * (name "cublas", max_threads 1), and its gemm, called with that table as self,
 * finds the handle and stream from it: scmoe__exec_gemm reaches cuBLAS like OpenBLAS, on device pointers. */
typedef struct cuda_blas {
    blas_backend base; /* must stay first */
    struct cublasContext *handle;
    cudaStream_t stream; /* every GEMM is enqueued here */
    int owns_stream;     /* created by scmoe__cuda_blas_create (destroyed with it) */
    int math;            /* CUDA_MATH_FP32 | CUDA_MATH_BF16 for scmoe__cuda_blas_gemm */
    int status;          /* first failure of a void GEMM call, sticky: 0 none */
    const void **ptrs;   /* device: the A, B, C pointer arrays of a grouped GEMM (3 x CUDA_GROUP_MAX) */
    int grouped_off[2];  /* cuBLAS said NOT_SUPPORTED to the grouped call for [fp32 operands, bf16 operands]:
                            those groups run as a loop of single GEMMs from then on */
    char err[160];       /* and its sentence */
    uint16_t *bf16;      /* issue 19: the bf16 activation scratch of SCMOE_PRECISION_BF16's GEMMs (device) */
    size_t bf16_n;       /* its elements: the largest any layer reserved at create (scmoe__cuda_blas_reserve_bf16) */
} cuda_blas;

/* Creates the backend on stream (NULL: a new non-blocking stream it owns). Fails with
 * SCMOE_ERR_UNSUPPORTED when there is no usable device, SCMOE_ERR_NOMEM, or SCMOE_ERR_OPTION for
 * an unknown math; *out is NULL on failure and err (may be NULL, >= 160 bytes) says why. */
scmoe_status scmoe__cuda_blas_create(cuda_blas **out, cudaStream_t stream, int math, char *err);
void scmoe__cuda_blas_destroy(cuda_blas *cb);
/* The embedded table (see above): &cb->base. */
const blas_backend *scmoe__cuda_blas_table(cuda_blas *cb);

/* blas.h's GEMM on device pointers: C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, row-major, via the
 * column-major identity C^T = op(B)^T op(A)^T. Same edge cases as openblas.c: nothing when M or N
 * <= 0; C = beta C (0 when beta == 0, even over NaN) when K <= 0. Void like blas_gemm_fn: a failure
 * is recorded in cb->status / cb->err (the first one; cuda_blas_clear_status resets it). */
void scmoe__cuda_blas_gemm(cuda_blas *cb, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                           int lda, const float *B, int ldb, float beta, float *C, int ldc);
/* The same GEMM with bf16 A and B (uint16_t bit patterns, as scmoe__bf16_pack / scmoe__cuda_bf16_pack make them),
 * fp32 C, fp32 accumulate (cublasGemmEx, CUDA_R_16BF). Returns 0, or the failure's code (a
 * cublasStatus_t, or a cudaError_t from the K = 0 scaling), which is also recorded on cb. */
int scmoe__cuda_blas_gemm_bf16(cuda_blas *cb, int trans_a, int trans_b, int M, int N, int K, float alpha,
                               const uint16_t *A, int lda, const uint16_t *B, int ldb, float beta, float *C, int ldc);

/* One GEMM of a group: its own sizes and operands, the group's op / ld / alpha / beta. A and B are
 * float (scmoe__cuda_blas_gemm_grouped) or bf16 bits (scmoe__cuda_blas_gemm_grouped_bf16); C is fp32. */
typedef struct cuda_gemm_item {
    int M, N, K;
    const void *A, *B;
    float *C;
} cuda_gemm_item;

/* The most GEMMs one grouped cuBLAS call takes (larger groups are cut into calls of this many). */
enum { CUDA_GROUP_MAX = 64 };

/* n GEMMs of their own sizes in ONE cuBLAS call (cublasGemmGroupedBatchedEx, one group per item),
 * e.g. the routed experts, whose row ranges differ: item i = { rows_i, h1, d, xe + o_i*d, w1_i,
 * pre + o_i*h1 }. Items on the host, operands on the device. The call takes device arrays of the
 * operands' pointers: a kernel (scmoe__cuda_store_pointers) writes them into cb->ptrs from its
 * arguments, in stream order, so the host never waits and the array is reused by the next call.
 * Items with M or N <= 0 are skipped, K <= 0 scales C (openblas.c's edge cases). In cb->math (fp32, or
 * CUBLAS_COMPUTE_32F_FAST_16BF for CUDA_MATH_BF16); where cuBLAS refuses a grouped form it runs as a
 * loop of single GEMMs (cb->grouped_off). */
void scmoe__cuda_blas_gemm_grouped(cuda_blas *cb, int trans_a, int trans_b, float alpha, const cuda_gemm_item *items,
                                   int n, int lda, int ldb, float beta, int ldc);
/* The same with bf16 A and B (CUDA_R_16BF), fp32 C, fp32 accumulation (CUBLAS_COMPUTE_32F). */
void scmoe__cuda_blas_gemm_grouped_bf16(cuda_blas *cb, int trans_a, int trans_b, float alpha,
                                        const cuda_gemm_item *items, int n, int lda, int ldb, float beta, int ldc);

static inline int cuda_blas_get_status(const cuda_blas *cb) { return cb->status; }
static inline void cuda_blas_clear_status(cuda_blas *cb) {
    cb->status = 0;
    cb->err[0] = '\0';
}

/* The bf16 activation scratch holds at least n elements from now on: grown (a new cudaMalloc, the old
 * one freed after) when a layer is created, never in a forward or backward. SCMOE_ERR_NOMEM leaves the
 * scratch as it was. The table's gemm_bf16 rounds into it the operands that have no bf16 copy (op(A)
 * first, then op(B), each contiguous), the experts' grouped GEMMs (compute_cuda.c) their two activation
 * operands (halves of it); all in stream order, so one scratch serves every layer of the context. */
scmoe_status scmoe__cuda_blas_reserve_bf16(cuda_blas *cb, size_t n);

/* The column-major call a row-major GEMM becomes (pure host logic, unit-tested without a GPU):
 * cublasSgemm(opB, opA, m = N, n = M, k = K, B, ldb, A, lda, C, ldc). Returns CUDA_GEMM_RUN,
 * CUDA_GEMM_NOTHING (M or N <= 0), CUDA_GEMM_SCALE (K <= 0: C = beta C only) or CUDA_GEMM_BAD
 * (a leading dimension too small for its row-major shape, or a NULL table). */
enum { CUDA_GEMM_RUN = 0, CUDA_GEMM_NOTHING = 1, CUDA_GEMM_SCALE = 2, CUDA_GEMM_BAD = -1 };
typedef struct cuda_gemm_colmajor {
    int trans_first, trans_second; /* ops of the first (B) and second (A) operand */
    int m, n, k;
    int ld_first, ld_second, ldc;
} cuda_gemm_colmajor;
int scmoe__cuda_gemm_to_colmajor(int trans_a, int trans_b, int M, int N, int K, int lda, int ldb, int ldc,
                                 cuda_gemm_colmajor *out);

/* ====================================================================================== kernels */
/* Semantics are those of the CPU function named in brackets. */

/* [scmoe__layernorm_forward] out, mean [N], rstd [N]; eps 1e-5 */
cudaError_t scmoe__cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                                          const float *b, int N, int C, cudaStream_t s);
/* [scmoe__layernorm_backward] dx +=, dw +=, db += (column sums in a fixed order: deterministic) */
cudaError_t scmoe__cuda_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                                           const float *w, const float *mean, const float *rstd, int N, int C,
                                           cudaStream_t s);

/* [scmoe__activation_forward / scmoe__activation_backward] act: SCMOE_GELU (tanh form) or SCMOE_SWIGLU;
 * pre [N, scmoe__ffn_width(h)], hid / dhid [N, h] */
cudaError_t scmoe__cuda_activation_forward(float *hid, const float *pre, int N, int h, scmoe_activation act,
                                           cudaStream_t s);
cudaError_t scmoe__cuda_activation_backward(float *dpre, const float *dhid, const float *pre, int N, int h,
                                            scmoe_activation act, cudaStream_t s);

/* [ffn.c scmoe__broadcast_rows] out[i, :] = b for every row; [scmoe__sum_rows] acc[c] += sum_i x[i, c] (deterministic) */
cudaError_t scmoe__cuda_broadcast_rows(float *out, const float *b, int N, int C, cudaStream_t s);
cudaError_t scmoe__cuda_sum_rows(float *acc, const float *x, int N, int C, cudaStream_t s);

/* [scmoe__gate_forward after its GEMM] logits [N, E] in (noise added in place when noise_std > 0), p [N, E],
 * lse [N]: the same counter-based noise, so a token gets the same noise on the CPU and the GPU */
cudaError_t scmoe__cuda_gate_softmax(float *logits, float *p, float *lse, int N, int E, float noise_std, uint64_t seed,
                                     uint64_t step, int64_t token_offset, cudaStream_t s);
/* [scmoe__gate_topk] choice [N, k], weight [N, k], score [N]; ties go to the lower expert index */
cudaError_t scmoe__cuda_gate_topk(int *choice, float *weight, float *score, const float *p, int N, int E, int k,
                                  int renormalize, cudaStream_t s);
/* [scmoe__gate_backward before its GEMMs] dlogits [N, E] = dL/dlogits (aux_coef [E] may be NULL) */
cudaError_t scmoe__cuda_gate_backward_logits(float *dlogits, const float *dweight, const int *choice, const float *p,
                                             const float *lse, const float *aux_coef, float z_coef, int N, int E, int k,
                                             int renormalize, cudaStream_t s);

/* [moe.c scmoe__permute_rows] scatter: dst[map[r]] = src[r]; gather: dst[r] = src[map[r]]; rows of d floats */
cudaError_t scmoe__cuda_permute_rows(float *dst, const float *src, const int *map, int n, int d, int scatter,
                                     cudaStream_t s);
/* [scmoe__moe_gate_encode's pack] send[slot[t, j]] = x[t] for every kept slot (slot >= 0) */
cudaError_t scmoe__cuda_moe_pack(float *send, const float *x, const int *slot, int n, int k, int d, cudaStream_t s);
/* [scmoe__moe_decode] y[t] = beta y[t] + sum_j weight[t, j] rows[slot[t, j]] over kept slots (beta == 0
 * overwrites, even NaN). weight NULL: every weight 1, which is scmoe__moe_gate_backward's dx accumulation. */
cudaError_t scmoe__cuda_moe_decode(float *y, float beta, const float *rows, const int *slot, const float *weight, int n,
                                   int k, int d, cudaStream_t s);
/* [scmoe__moe_decode_backward] grows[slot] = weight * dy[t], dweight[t, j] = dy[t] . rows[slot] (0 if dropped) */
cudaError_t scmoe__cuda_moe_decode_backward(float *grows, float *dweight, const float *dy, const float *rows,
                                            const int *slot, const float *weight, int n, int k, int d, cudaStream_t s);

/* [scmoe__attention_forward / scmoe__attention_backward] qkv [B*T, 3d], out [B*T, d], att / datt [B, H, T, T];
 * dqkv overwritten. One block per (batch, head, query row), softmax fused; att is what the CPU
 * keeps (masked entries 0). */
cudaError_t scmoe__cuda_attention_forward(float *out, float *att, const float *qkv, int B, int T, int d, int H,
                                          int causal, cudaStream_t s);
cudaError_t scmoe__cuda_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv,
                                           const float *att, int B, int T, int d, int H, int causal, cudaStream_t s);

/* [scmoe__bf16_pack / scmoe__bf16_unpack] round to nearest even (NaN stays a quiet NaN); unpack is exact */
cudaError_t scmoe__cuda_bf16_pack(uint16_t *dst, const float *src, size_t n, cudaStream_t s);
cudaError_t scmoe__cuda_bf16_unpack(float *dst, const uint16_t *src, size_t n, cudaStream_t s);

/* C[M, N] (row stride ldc) = beta C, 0 when beta == 0: the K = 0 GEMM */
cudaError_t scmoe__cuda_scale_matrix(float *C, int M, int N, int ldc, float beta, cudaStream_t s);

/* [compute_host.c's add] y += x */
cudaError_t scmoe__cuda_add(float *y, const float *x, size_t n, cudaStream_t s);
/* [scmoe__activation_forward's bias] x[i, :] += b */
cudaError_t scmoe__cuda_add_bias_rows(float *x, const float *b, int N, int C, cudaStream_t s);
/* [combine.c] y = a + c s, c = sigmoid(w_cg . m) per row (wcg NULL: 1), cgate [n] = c; backward
 * ds = c dy, dz = (dy . s) c (1 - c); out[i, j] += u[i] v[j] */
cudaError_t scmoe__cuda_cg_combine_forward(float *y, float *cgate, const float *a, const float *s, const float *m,
                                           const float *wcg, int n, int d, cudaStream_t st);
cudaError_t scmoe__cuda_cg_combine_backward(float *ds, float *dz, const float *dy, const float *s, const float *cgate,
                                            int n, int d, cudaStream_t st);
cudaError_t scmoe__cuda_add_outer(float *out, const float *u, const float *v, int n, int d, cudaStream_t s);
/* dst[i] = t.p[i] for i < n (n <= 3 * CUDA_GROUP_MAX): the grouped GEMM's device pointer arrays,
 * written from the launch's own arguments so that no host buffer has to outlive the call */
typedef struct cuda_pointer_table {
    const void *p[3 * CUDA_GROUP_MAX];
} cuda_pointer_table;
cudaError_t scmoe__cuda_store_pointers(const void **dst, cuda_pointer_table t, int n, cudaStream_t s);
/* bytes of p = 0, for any memory the device can reach (cudaMemsetAsync is for device memory; this also
 * zeroes mapped host memory: the gradient staging area) */
cudaError_t scmoe__cuda_zero_bytes(void *p, size_t bytes, cudaStream_t s);
/* [scmoe__has_nonfinite] *flag = 1 when any x[i] is NaN or Inf (flag untouched otherwise: zero it first) */
cudaError_t scmoe__cuda_flag_nonfinite(int *flag, const float *x, size_t n, cudaStream_t s);

/* ---- issue 19: the dense GEMMs' bf16 operands and the experts' biases ---- */

/* [scmoe__bf16_pack] row by row: dst [rows, cols] (contiguous) = bf16(src [rows, cols], row stride ld) */
cudaError_t scmoe__cuda_bf16_pack_rows(uint16_t *dst, const float *src, int rows, int cols, int ld, cudaStream_t s);

/* The routed experts' biases of a stage (compute_cuda.c's experts_forward / _backward), all experts in
 * ONE launch: expert i owns rows [off[i], off[i + 1]) of every job's x (absolute row numbers, ascending).
 * Forward, per job: x[r, :] = b_i (set) or x[r, :] += b_i for every row r of expert i (the
 * ffn's b1 add and b2 broadcast); backward: b_i[c] += sum of expert i's rows of x (db1, db2), in the
 * row order of scmoe__cuda_sum_rows on that expert alone (bit for bit the per-expert loop). Passed by
 * value to the kernel (no device copy to keep alive). */
typedef struct cuda_bias_job {
    float *x; /* [rows, C] */
    int C;
    int set;                  /* forward: 1 overwrite with the bias, 0 add it */
    float *b[CUDA_GROUP_MAX]; /* per expert: the bias (forward, read) or its gradient (backward, += ) */
} cuda_bias_job;
typedef struct cuda_expert_bias {
    int n;    /* experts, 1..CUDA_GROUP_MAX */
    int jobs; /* 1 or 2 */
    int off[CUDA_GROUP_MAX + 1];
    cuda_bias_job job[2];
} cuda_expert_bias;
cudaError_t scmoe__cuda_expert_bias_forward(const cuda_expert_bias *t, cudaStream_t s);
cudaError_t scmoe__cuda_expert_bias_backward(const cuda_expert_bias *t, cudaStream_t s);

/* ============================================== routing planned on the device (issue 19) */

/* [scmoe__route_plan_local_send, and moe.c's gate_sums] over n tokens' choice [n, k], p [n, E], lse [n]:
 * slot [n, k] (the send row, -1 dropped) on the device; into host-visible memory (mapped): counts
 * [ep_size][1 + (E / ep_size) k] (word 0 of each peer 0, then the rows kept for its local expert e in
 * round j at 1 + e k + j), gsum [E + 1] (sum_t p[t, e] token after token in double, then sum_t
 * lse_t^2), top1 [E] (first choices), kept [E] (assignments kept under capacity); then *seq =
 * seq_value, written last (after a system fence). score NULL: TOKEN priority (tokens in order); else
 * BATCH priority over the top-1 scores score [n] (route.c's by_score_desc order, computed exactly).
 * work: (k + 2) E ints, plus n with score, work_sum E + 1 doubles, device scratch. capacity: rows per
 * expert (INT64_MAX: dropless). */
cudaError_t scmoe__cuda_route_local(const int *choice, const float *p, const float *lse, const float *score, int n,
                                    int E, int k, int ep_size, int64_t capacity, int *slot, int *work, double *work_sum,
                                    int32_t *counts, double *gsum, int32_t *top1, int32_t *kept, uint32_t *seq,
                                    uint32_t seq_value, cudaStream_t s);

/* [scmoe__route_plan_global_send's slots] GLOBAL capacity with TOKEN priority over several ranks, the
 * second half: after scmoe__cuda_route_local(choice, ..., score NULL, capacity INT64_MAX, slot, work, ...)
 * on the same stream (its counts message: my round counts, for the host's scan over the ranks), and base
 * [k E + 1] on the device: base[j E + e] = sum_{j' < j} total[j', e] + prefix[j, e] (total: every rank's
 * round-j assignments to e; prefix: the ranks' before mine), base[k E] = the capacity C (INT64_MAX:
 * dropless). Rewrites slot [n, k] into the global plan's send rows (-1 dropped). work: the first half's,
 * (3 k + 2) E ints (its cnt and start read, 2 k E more written). */
cudaError_t scmoe__cuda_route_global_slots(const int *choice, int n, int E, int k, const int64_t *base, int *slot,
                                           int *work, cudaStream_t s);

/* ================================================================= the compute table (compute_cuda.c) */

/* compute.h's table on one stream (that of cb, which it does not own): device memory from cudaMalloc,
 * mapped memory from cudaHostAlloc(Mapped | Portable) used through its unified address, copies with
 * cudaMemcpyDefault. cuda_aware: MPI can read device memory, so the exchanges use device buffers.
 * Fails with SCMOE_ERR_NOMEM or SCMOE_ERR_DEVICE (err, >= 160 bytes, says why). */
struct compute_ops;
scmoe_status scmoe__cuda_compute_create(struct compute_ops **out, cuda_blas *cb, int cuda_aware, char *err);
void scmoe__cuda_compute_destroy(struct compute_ops *co);

/* ============================================================================ MPI (context.c) */

/* 1 when the MPI library can take device pointers: MPIX_Query_cuda_support() where OpenMPI's
 * mpi-ext.h says it was built with CUDA, else 0 (assume not aware). Needs MPI initialised; always
 * 0 in a build without SCMOE_WITH_MPI. */
int scmoe__cuda_mpi_cuda_aware(void);

#ifdef __cplusplus
}
#endif
#endif
