/* compute_cuda.c: compute.h's table on a CUDA device: the kernels of kernels.cu on the stream of a cuda_blas,
 * so GEMMs and kernels run in one order and the core needs no events.
 *
 * Memory. COMPUTE_DEVICE is cudaMalloc's. COMPUTE_MAPPED is pinned host memory mapped into the device's
 * address space (cudaHostAlloc, Mapped | Portable) and used through its one unified address: MPI reads
 * and writes it on the host, kernels pack rows into it and permute them out of it, so the permute of a
 * received block *is* its copy to the device, over PCIe, in the same pass. That is why the MoE needs no
 * staging copies. A device
 * without unified addressing (cudaHostGetDevicePointer giving another address) is refused. With a
 * CUDA-aware MPI the exchange buffers are device memory (exchange_kind) and MPI moves them itself.
 *
 * Failures. The table's functions are void like the host's: the first failure (a launch, a copy, or
 * a cuBLAS call on the same cuda_blas) is kept and `failed` hands it to the core, which returns
 * SCMOE_ERR_DEVICE at the end of the call. */
#include "cuda.h"
#include "../kernels/exec.h"
#include "../kernels/kernels.h"
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cuda_compute {
    compute_ops base; /* must stay first: the table the core holds is this struct */
    cuda_blas *cb;    /* its stream, and its GEMM failures */
    int *flag;        /* device int for scmoe__has_nonfinite */
    /* prefetches (expert offloading): their stream; ev_compute lets a copy wait for the kernels before
     * it, ev_copy the kernels after prefetch_wait for the copies */
    cudaStream_t copy_stream;
    cudaEvent_t ev_compute, ev_copy;
    /* issue 19: what MPI moves, to and from mapped memory (copy_out, copy_in): their own stream;
     * ev_xfer_after lets a copy out wait for the kernels before it, ev_xfer marks the last copy out
     * (copy_landed), ev_xfer_in the last copy in, which the kernels after it wait for */
    cudaStream_t xfer_stream;
    cudaEvent_t ev_xfer_after, ev_xfer, ev_xfer_in;
    int status; /* first failure, 0 none */
    char err[160];
} cuda_compute;

static cuda_compute *self_of(const compute_ops *co) { return (cuda_compute *)co; }
static cudaStream_t stream_of(const compute_ops *co) { return self_of(co)->cb->stream; }

static void note(const compute_ops *co, cudaError_t e, const char *what) {
    cuda_compute *cc = self_of(co);
    if (e == cudaSuccess || cc->status) return;
    cc->status = (int)e;
    snprintf(cc->err, sizeof cc->err, "%s: %s", what, cudaGetErrorString(e));
}

static void *cuda_alloc(const compute_ops *co, size_t bytes, int kind) {
    void *p = NULL;
    bytes = bytes ? bytes : 64;
    if (kind == COMPUTE_HOST) return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (kind == COMPUTE_DEVICE) return cudaMalloc(&p, bytes) == cudaSuccess ? p : NULL;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) return NULL;
    void *dp = NULL;
    if (cudaHostGetDevicePointer(&dp, p, 0) != cudaSuccess || dp != p) { /* no unified addressing */
        cudaFreeHost(p);
        return NULL;
    }
    return p;
}

static void cuda_release(const compute_ops *co, void *p, int kind) {
    if (!p) return;
    if (kind == COMPUTE_HOST) free(p);
    else if (kind == COMPUTE_DEVICE) cudaFree(p);
    else cudaFreeHost(p);
}

/* in stream order after every kernel before it, and done when it returns */
static void cuda_copy(const compute_ops *co, void *dst, const void *src, size_t bytes) {
    if (!bytes || dst == src) return;
    note(co, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_of(co)), "cudaMemcpyAsync");
    note(co, cudaStreamSynchronize(stream_of(co)), "cudaStreamSynchronize after a copy");
}

/* a kernel rather than cudaMemsetAsync: the memory may be mapped host memory (the staged gradients) */
static void cuda_copy_rows(const compute_ops *co, void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src)
        note(co, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_of(co)), "cudaMemcpyAsync");
}

static void cuda_zero(const compute_ops *co, void *p, size_t bytes) {
    note(co, scmoe__cuda_zero_bytes(p, bytes, stream_of(co)), "zero");
}

static void cuda_sync(const compute_ops *co) {
    note(co, cudaStreamSynchronize(stream_of(co)), "cudaStreamSynchronize");
}

static int cuda_failed(const compute_ops *co, char *msg, size_t len) {
    cuda_compute *cc = self_of(co);
    int status = cc->status;
    const char *why = cc->err;
    if (!status && cc->cb->status) {
        status = cc->cb->status;
        why = cc->cb->err;
    }
    if (!status) return 0;
    if (msg && len) snprintf(msg, len, "%s", why);
    cc->status = 0;
    cc->err[0] = '\0';
    cuda_blas_clear_status(cc->cb);
    return status;
}

static int cuda_has_nonfinite(const compute_ops *co, const float *x, size_t n) {
    cuda_compute *cc = self_of(co);
    int flag = 0;
    if (!n) return 0;
    cuda_zero(co, cc->flag, sizeof(int));
    note(co, scmoe__cuda_flag_nonfinite(cc->flag, x, n, stream_of(co)), "the non-finite check");
    cuda_copy(co, &flag, cc->flag, sizeof flag);
    return flag;
}

static void cuda_add_op(const compute_ops *co, float *y, const float *x, size_t n) {
    note(co, scmoe__cuda_add(y, x, n, stream_of(co)), "add");
}
static void cuda_broadcast_rows_op(const compute_ops *co, float *out, const float *b, int N, int C) {
    note(co, scmoe__cuda_broadcast_rows(out, b, N, C, stream_of(co)), "scmoe__broadcast_rows");
}
static void cuda_sum_rows_op(const compute_ops *co, float *acc, const float *x, int N, int C) {
    note(co, scmoe__cuda_sum_rows(acc, x, N, C, stream_of(co)), "scmoe__sum_rows");
}
static void cuda_activation_forward_op(const compute_ops *co, float *hid, float *pre, const float *b, int N, int h,
                                       scmoe_activation act) {
    if (b) note(co, scmoe__cuda_add_bias_rows(pre, b, N, act == SCMOE_SWIGLU ? 2 * h : h, stream_of(co)), "the bias");
    note(co, scmoe__cuda_activation_forward(hid, pre, N, h, act, stream_of(co)), "scmoe__activation_forward");
}
static void cuda_activation_backward_op(const compute_ops *co, float *dpre, const float *dhid, const float *pre, int N,
                                        int h, scmoe_activation act) {
    note(co, scmoe__cuda_activation_backward(dpre, dhid, pre, N, h, act, stream_of(co)), "scmoe__activation_backward");
}
static void cuda_gate_softmax_op(const compute_ops *co, float *logits, float *p, float *lse, int N, int E,
                                 float noise_std, uint64_t seed, uint64_t step, int64_t token_offset) {
    note(co, scmoe__cuda_gate_softmax(logits, p, lse, N, E, noise_std, seed, step, token_offset, stream_of(co)),
         "scmoe__gate_softmax");
}
static void cuda_gate_topk_op(const compute_ops *co, int *choice, float *weight, float *score, const float *p, int N,
                              int E, int k, int renormalize) {
    note(co, scmoe__cuda_gate_topk(choice, weight, score, p, N, E, k, renormalize, stream_of(co)), "scmoe__gate_topk");
}
static void cuda_gate_backward_logits_op(const compute_ops *co, float *dlogits, const float *dweight, const int *choice,
                                         const float *p, const float *lse, const float *aux_coef, float z_coef, int N,
                                         int E, int k, int renormalize) {
    note(co,
         scmoe__cuda_gate_backward_logits(dlogits, dweight, choice, p, lse, aux_coef, z_coef, N, E, k, renormalize,
                                          stream_of(co)),
         "scmoe__gate_backward_logits");
}
static void cuda_permute_rows_op(const compute_ops *co, float *dst, const float *src, const int *map, int n, int d,
                                 int scatter) {
    note(co, scmoe__cuda_permute_rows(dst, src, map, n, d, scatter, stream_of(co)), "scmoe__permute_rows");
}
static void cuda_pack_rows_op(const compute_ops *co, float *send, const float *x, const int *slot, int n, int k,
                              int d) {
    note(co, scmoe__cuda_moe_pack(send, x, slot, n, k, d, stream_of(co)), "scmoe__pack_rows");
}
static void cuda_decode_rows_op(const compute_ops *co, float *y, float beta, const float *rows, const int *slot,
                                const float *weight, int n, int k, int d) {
    note(co, scmoe__cuda_moe_decode(y, beta, rows, slot, weight, n, k, d, stream_of(co)), "scmoe__decode_rows");
}
static void cuda_decode_rows_backward_op(const compute_ops *co, float *grows, float *dweight, const float *dy,
                                         const float *rows, const int *slot, const float *weight, int n, int k, int d) {
    note(co, scmoe__cuda_moe_decode_backward(grows, dweight, dy, rows, slot, weight, n, k, d, stream_of(co)),
         "scmoe__decode_rows_backward");
}
static void cuda_layernorm_forward_op(const compute_ops *co, float *out, float *mean, float *rstd, const float *x,
                                      const float *w, const float *b, int N, int C) {
    note(co, scmoe__cuda_layernorm_forward(out, mean, rstd, x, w, b, N, C, stream_of(co)), "scmoe__layernorm_forward");
}
static void cuda_layernorm_backward_op(const compute_ops *co, float *dx, float *dw, float *db, const float *dy,
                                       const float *x, const float *w, const float *mean, const float *rstd, int N,
                                       int C) {
    note(co, scmoe__cuda_layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, N, C, stream_of(co)),
         "scmoe__layernorm_backward");
}
static void cuda_attention_forward_op(const compute_ops *co, const struct exec *ex, float *out, float *att,
                                      const float *qkv, int B, int T, int d, int H, int causal) {
    note(co, scmoe__cuda_attention_forward(out, att, qkv, B, T, d, H, causal, stream_of(co)),
         "scmoe__attention_forward");
}
static void cuda_attention_backward_op(const compute_ops *co, const struct exec *ex, float *dqkv, float *datt,
                                       const float *dout, const float *qkv, const float *att, int B, int T, int d,
                                       int H, int causal) {
    note(co, scmoe__cuda_attention_backward(dqkv, datt, dout, qkv, att, B, T, d, H, causal, stream_of(co)),
         "scmoe__attention_backward");
}
static void cuda_cg_combine_forward_op(const compute_ops *co, float *y, float *cgate, const float *a, const float *s,
                                       const float *m, const float *wcg, int n, int d) {
    note(co, scmoe__cuda_cg_combine_forward(y, cgate, a, s, m, wcg, n, d, stream_of(co)), "scmoe__cg_combine_forward");
}
static void cuda_cg_combine_backward_op(const compute_ops *co, float *ds, float *dz, const float *dy, const float *s,
                                        const float *cgate, int n, int d) {
    note(co, scmoe__cuda_cg_combine_backward(ds, dz, dy, s, cgate, n, d, stream_of(co)), "scmoe__cg_combine_backward");
}
static void cuda_add_outer_op(const compute_ops *co, float *out, const float *u, const float *v, int n, int d) {
    note(co, scmoe__cuda_add_outer(out, u, v, n, d, stream_of(co)), "scmoe__add_outer");
}
/* bytes on stream s once every kernel enqueued on the compute stream before has finished (the event
 * after, recorded there), then the event done recorded on s */
static void copy_after_kernels(const compute_ops *co, cudaStream_t s, cudaEvent_t after, cudaEvent_t done, void *dst,
                               const void *src, size_t bytes, const char *what) {
    if (!bytes) return;
    note(co, cudaEventRecord(after, stream_of(co)), "cudaEventRecord");
    note(co, cudaStreamWaitEvent(s, after, 0), "cudaStreamWaitEvent");
    note(co, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), what);
    note(co, cudaEventRecord(done, s), "cudaEventRecord");
}
static void cuda_prefetch(const compute_ops *co, void *dst, const void *src, size_t bytes) {
    cuda_compute *cc = self_of(co);
    copy_after_kernels(co, cc->copy_stream, cc->ev_compute, cc->ev_copy, dst, src, bytes, "prefetch (cudaMemcpyAsync)");
}
static void cuda_prefetch_wait(const compute_ops *co) {
    note(co, cudaStreamWaitEvent(stream_of(co), self_of(co)->ev_copy, 0), "cudaStreamWaitEvent");
}
/* ---- the experts of a stage, grouped (expert_group): every GEMM of kernels/ffn.c's scmoe__ffn_forward /
 * _backward is one grouped cuBLAS call over the experts; the elementwise passes over all rows at once
 * where nothing differs by expert (activations), per expert where it does (biases, their sums).
 *
 * bf16 (ex->bf16): with the weights' bf16 copy (ex->wb, made when the weights change) the GEMMs take bf16
 * operands and accumulate in fp32 (CUDA_R_16BF, CUBLAS_COMPUTE_32F): each activation operand is rounded
 * once into cc->bf16 (all experts' rows in one pass), the weights are never converted per call. This is
 * the host's bf16 math (blas.h: products of rounded operands, fp32 sums). Without the copy the GEMMs
 * run on fp32 operands in the table's math. */

typedef struct group_gemm {
    const compute_ops *co;
    const struct exec *ex;
    const expert_group *g;
    int bf16;
} group_gemm;

/* an operand for the GEMM of expert i: fp32 at p, or its bf16 version */
typedef struct operand {
    const float *f;        /* fp32 base: activation rows (row stride ld), or NULL for a weight */
    const uint16_t *b;     /* bf16 base of the same rows */
    const float *const *w; /* weights: per expert */
    int ld;
} operand;

static const uint16_t *weight_bf16(const struct exec *ex, const float *w) {
    return ex->wb && w >= ex->w && w < ex->w + ex->wn ? ex->wb + (w - ex->w) : NULL;
}

static const void *operand_at(const group_gemm *gg, const operand *o, int i) {
    const expert_group *g = gg->g;
    if (o->w) return gg->bf16 ? (const void *)weight_bf16(gg->ex, o->w[i]) : (const void *)o->w[i];
    size_t r = (size_t)(g->off[i] - g->off[0]) * o->ld;
    return gg->bf16 ? (const void *)(o->b + r) : (const void *)(o->f + r);
}

/* rows [off[0], off[n]) of x (row length ld) rounded into half slot (0 or 1) of the cuda_blas's scratch */
static const uint16_t *round_rows(const group_gemm *gg, const float *x, int ld, int slot) {
    cuda_blas *cb = self_of(gg->co)->cb;
    const expert_group *g = gg->g;
    uint16_t *dst = cb->bf16 + (size_t)slot * (cb->bf16_n / 2);
    note(gg->co,
         scmoe__cuda_bf16_pack(dst, x + (size_t)g->off[0] * ld, (size_t)(g->off[g->n] - g->off[0]) * ld,
                               stream_of(gg->co)),
         "rounding the experts' rows to bf16");
    return dst;
}

/* an activation operand: rows of x from off[0], rounded into slot when in bf16 */
static operand rows_of(const group_gemm *gg, const float *x, int ld, int slot) {
    operand o = {x + (size_t)gg->g->off[0] * ld, NULL, NULL, ld};
    if (gg->bf16) o.b = round_rows(gg, x, ld, slot);
    return o;
}
static operand weights_of(const float *const *w) { return (operand){NULL, NULL, w, 0}; }

/* C_i = alpha op(A_i) op(B_i) + beta C_i for the experts with rows; M, N, K given per expert by dims:
 * 'r' the expert's rows, or a number. C_i is rows of c (ldc) or per-expert (cw). */
static void group_run(const group_gemm *gg, int ta, int tb, const char *dims, int M, int N, int K, const operand *A,
                      const operand *B, float beta, float *c, float *const *cw, int lda, int ldb, int ldc) {
    const expert_group *g = gg->g;
    cuda_gemm_item it[COMPUTE_EXPERTS_MAX];
    int n = 0;
    for (int i = 0; i < g->n; i++) {
        int rows = g->off[i + 1] - g->off[i];
        if (rows <= 0) continue;
        it[n].M = dims[0] == 'r' ? rows : M;
        it[n].N = dims[1] == 'r' ? rows : N;
        it[n].K = dims[2] == 'r' ? rows : K;
        it[n].A = operand_at(gg, A, i);
        it[n].B = operand_at(gg, B, i);
        it[n].C = cw ? cw[i] : c + (size_t)g->off[i] * ldc;
        n++;
    }
    cuda_blas *cb = self_of(gg->co)->cb;
    if (gg->bf16) scmoe__cuda_blas_gemm_grouped_bf16(cb, ta, tb, 1.0f, it, n, lda, ldb, beta, ldc);
    else scmoe__cuda_blas_gemm_grouped(cb, ta, tb, 1.0f, it, n, lda, ldb, beta, ldc);
}

/* bf16 only where every weight of the group has its copy and the scratch (reserved when the layer was
 * created: scmoe__precision_reserve) holds both operands */
static int group_begin(group_gemm *gg, const compute_ops *co, const struct exec *ex, const expert_group *g) {
    *gg = (group_gemm){co, ex, g, 0};
    if (g->n <= 0 || g->off[g->n] <= g->off[0]) return 0;
    if (ex->bf16 && ex->wb) {
        int ok = 1;
        for (int i = 0; i < g->n && ok; i++) ok = weight_bf16(ex, g->w1[i]) && weight_bf16(ex, g->w2[i]);
        int h1 = scmoe__ffn_width(g->h, g->act), wide = h1 > g->d ? h1 : g->d;
        gg->bf16 = ok && 2 * (size_t)g->rows_cap * wide <= self_of(co)->cb->bf16_n;
    }
    return 1;
}

_Static_assert((int)COMPUTE_EXPERTS_MAX <= (int)CUDA_GROUP_MAX, "an expert group fits one bias launch");

/* the group's two biases as one launch's jobs: b1 over pre [rows, h1] (added), b2 over y [rows, d]
 * (set); backward the same layout with dpre / db1 and dy / db2 */
static cuda_expert_bias experts_biases(const expert_group *g, float *x1, float *const *b1, float *x2,
                                       float *const *b2) {
    cuda_expert_bias t;
    t.n = g->n;
    t.jobs = 2;
    t.job[0].x = x1;
    t.job[0].C = scmoe__ffn_width(g->h, g->act);
    t.job[0].set = 0;
    t.job[1].x = x2;
    t.job[1].C = g->d;
    t.job[1].set = 1;
    for (int i = 0; i <= g->n; i++) t.off[i] = g->off[i];
    for (int i = 0; i < g->n; i++) {
        t.job[0].b[i] = b1[i];
        t.job[1].b[i] = b2[i];
    }
    return t;
}

static void cuda_experts_forward(const compute_ops *co, const struct exec *ex, const expert_group *g) {
    group_gemm gg;
    if (!group_begin(&gg, co, ex, g)) return;
    int d = g->d, h = g->h, h1 = scmoe__ffn_width(h, g->act), rows = g->off[g->n] - g->off[0];
    size_t o = (size_t)g->off[0];
    /* pre = x W1 (+ b1 with the activation), hid = act(pre), y = b2 + hid W2 */
    operand x = rows_of(&gg, g->x, d, 0), w1 = weights_of(g->w1), w2 = weights_of(g->w2);
    group_run(&gg, 0, 0, "r..", 0, h1, d, &x, &w1, 0.0f, g->pre, NULL, d, h1, h1);
    cuda_expert_bias t = experts_biases(g, g->pre, (float *const *)g->b1, g->y, (float *const *)g->b2);
    note(co, scmoe__cuda_expert_bias_forward(&t, stream_of(co)), "the experts' biases");
    note(co, scmoe__cuda_activation_forward(g->hid + o * h, g->pre + o * h1, rows, h, g->act, stream_of(co)),
         "the experts' activation");
    operand hid = rows_of(&gg, g->hid, h, 0);
    group_run(&gg, 0, 0, "r..", 0, d, h, &hid, &w2, 1.0f, g->y, NULL, h, d, d);
}

static void cuda_experts_backward(const compute_ops *co, const struct exec *ex, const expert_group *g) {
    group_gemm gg;
    if (!group_begin(&gg, co, ex, g)) return;
    int d = g->d, h = g->h, h1 = scmoe__ffn_width(h, g->act), rows = g->off[g->n] - g->off[0];
    size_t o = (size_t)g->off[0];
    operand w1 = weights_of(g->w1), w2 = weights_of(g->w2);
    /* dhid = dy W2^T, dW2 += hid^T dy, db2 += sum dy */
    operand dy = rows_of(&gg, g->dy, d, 0);
    group_run(&gg, 0, 1, "r..", 0, h, d, &dy, &w2, 0.0f, g->dhid, NULL, d, d, h);
    operand hid = rows_of(&gg, g->hid, h, 1);
    group_run(&gg, 1, 0, "..r", h, d, 0, &hid, &dy, 1.0f, NULL, g->dw2, h, d, d);
    /* dpre = act'(pre) dhid; dW1 += x^T dpre, db1 += sum dpre; dx = dpre W1^T */
    note(co,
         scmoe__cuda_activation_backward(g->dpre + o * h1, g->dhid + o * h, g->pre + o * h1, rows, h, g->act,
                                         stream_of(co)),
         "the experts' activation backward");
    cuda_expert_bias t = experts_biases(g, g->dpre, g->db1, g->dy, g->db2);
    note(co, scmoe__cuda_expert_bias_backward(&t, stream_of(co)), "the experts' bias gradients");
    operand x = rows_of(&gg, g->x, d, 0), dpre = rows_of(&gg, g->dpre, h1, 1);
    group_run(&gg, 1, 0, "..r", d, h1, 0, &x, &dpre, 1.0f, NULL, g->dw1, d, h1, h1);
    group_run(&gg, 0, 1, "r..", 0, d, h1, &dpre, &w1, 0.0f, g->dx, NULL, h1, h1, d);
}

static void cuda_bf16_pack_op(const compute_ops *co, uint16_t *dst, const float *src, size_t n) {
    note(co, scmoe__cuda_bf16_pack(dst, src, n, stream_of(co)), "scmoe__bf16_pack");
}
static void cuda_bf16_unpack_op(const compute_ops *co, float *dst, const uint16_t *src, size_t n) {
    note(co, scmoe__cuda_bf16_unpack(dst, src, n, stream_of(co)), "scmoe__bf16_unpack");
}

/* ---- issue 19: what MPI moves, to and from mapped memory on a copy stream, and the bf16 scratch ---- */

/* finished rows or gradients (device) to the buffer MPI reads (mapped): on xfer_stream, after every
 * kernel enqueued before (ev_xfer_after); the compute stream goes on while the copy engine moves them */
static void cuda_copy_out(const compute_ops *co, void *dst, const void *src, size_t bytes) {
    cuda_compute *cc = self_of(co);
    copy_after_kernels(co, cc->xfer_stream, cc->ev_xfer_after, cc->ev_xfer, dst, src, bytes, "a copy to MPI's buffer");
}
/* whether the last copy out has landed (they run in order on xfer_stream), asked or waited for: the
 * host never waits for the compute stream's later work */
static int cuda_copy_landed(const compute_ops *co, int wait) {
    cuda_compute *cc = self_of(co);
    cudaError_t e = wait ? cudaEventSynchronize(cc->ev_xfer) : cudaEventQuery(cc->ev_xfer);
    if (e == cudaErrorNotReady) return 0;
    note(co, e, "waiting for the copies to MPI's buffers");
    return e == cudaSuccess;
}
/* what MPI received (mapped) to the device at once, on xfer_stream (not behind the kernels queued on the
 * compute stream); the kernels enqueued after it wait for it (ev_xfer_in), the host does not */
static void cuda_copy_in(const compute_ops *co, void *dst, const void *src, size_t bytes) {
    cuda_compute *cc = self_of(co);
    if (!bytes) return;
    note(co, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cc->xfer_stream), "a copy from MPI's buffer");
    note(co, cudaEventRecord(cc->ev_xfer_in, cc->xfer_stream), "cudaEventRecord");
    note(co, cudaStreamWaitEvent(stream_of(co), cc->ev_xfer_in, 0), "cudaStreamWaitEvent");
}
static int cuda_bf16_reserve(const compute_ops *co, size_t n) {
    return scmoe__cuda_blas_reserve_bf16(self_of(co)->cb, n) != SCMOE_OK;
}

/* ---- routing planned on the device (issue 19): the route kernels on the stream; their summary lands
 * in mapped memory, its seq word last, so the host learns it is there by reading that word: no event,
 * no wait for the stream (the kernels enqueued after the plan keep running). */
static void cuda_route_local_op(const compute_ops *co, const route_job *j) {
    note(co,
         scmoe__cuda_route_local(j->choice, j->p, j->lse, j->score, j->n, j->E, j->k, j->ep_size, j->capacity, j->slot,
                                 j->work, j->work_sum, j->counts, j->gsum, j->top1, j->kept, j->seq, j->seq_value,
                                 stream_of(co)),
         "planning the routing on the device");
}

static void cuda_route_global_op(const compute_ops *co, const route_job *j, const int64_t *base) {
    note(co, scmoe__cuda_route_global_slots(j->choice, j->n, j->E, j->k, base, j->slot, j->work, stream_of(co)),
         "planning the routing over the global batch on the device");
}

/* *seq == value yet? Waiting spins on the word (as MPI's wait spins on its request) and asks the stream
 * whether it failed or went idle without writing it, so a failed launch never hangs the host. */
static int cuda_route_landed(const compute_ops *co, const uint32_t *seq, uint32_t value, int wait) {
    const volatile uint32_t *w = seq;
    for (;;) {
        if (*w == value) break;
        cudaError_t e = cudaStreamQuery(stream_of(co));
        if (e == cudaSuccess && *w != value) { /* idle, and the word never came: the plan failed */
            note(co, cudaErrorLaunchFailure, "the routing plan never landed");
            return 0;
        }
        if (e != cudaSuccess && e != cudaErrorNotReady) {
            note(co, e, "waiting for the routing plan");
            return 0;
        }
        if (e == cudaErrorNotReady && !wait) return 0;
        if (e == cudaErrorNotReady) sched_yield();
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the summary's words are read after the seq word */
    return 1;
}

static const compute_ops cuda_table = {
    .name = "cuda",
    .device = 1,
    .exchange_kind = COMPUTE_MAPPED,
    .alloc = cuda_alloc,
    .release = cuda_release,
    .copy = cuda_copy,
    .copy_rows = cuda_copy_rows,
    .zero = cuda_zero,
    .sync = cuda_sync,
    .failed = cuda_failed,
    .has_nonfinite = cuda_has_nonfinite,
    .add = cuda_add_op,
    .broadcast_rows = cuda_broadcast_rows_op,
    .sum_rows = cuda_sum_rows_op,
    .activation_forward = cuda_activation_forward_op,
    .activation_backward = cuda_activation_backward_op,
    .gate_softmax = cuda_gate_softmax_op,
    .gate_topk = cuda_gate_topk_op,
    .gate_backward_logits = cuda_gate_backward_logits_op,
    .permute_rows = cuda_permute_rows_op,
    .pack_rows = cuda_pack_rows_op,
    .decode_rows = cuda_decode_rows_op,
    .decode_rows_backward = cuda_decode_rows_backward_op,
    .layernorm_forward = cuda_layernorm_forward_op,
    .layernorm_backward = cuda_layernorm_backward_op,
    .attention_forward = cuda_attention_forward_op,
    .attention_backward = cuda_attention_backward_op,
    .cg_combine_forward = cuda_cg_combine_forward_op,
    .cg_combine_backward = cuda_cg_combine_backward_op,
    .add_outer = cuda_add_outer_op,
    .prefetch = cuda_prefetch,
    .prefetch_wait = cuda_prefetch_wait,
    .experts_forward = cuda_experts_forward,
    .experts_backward = cuda_experts_backward,
    .bf16_pack = cuda_bf16_pack_op,
    .bf16_unpack = cuda_bf16_unpack_op,
    /* issue 19 */
    .copy_out = cuda_copy_out,
    .copy_landed = cuda_copy_landed,
    .copy_in = cuda_copy_in,
    .bf16_reserve = cuda_bf16_reserve,
    /* routing planned on the device (issue 19) */
    .route_local = cuda_route_local_op,
    .route_landed = cuda_route_landed,
    .route_global = cuda_route_global_op,
};

scmoe_status scmoe__cuda_compute_create(compute_ops **out, cuda_blas *cb, int cuda_aware, char *err) {
    if (!out || !cb) {
        if (err) snprintf(err, 160, "scmoe__cuda_compute_create: out or cb is NULL");
        return SCMOE_ERR_NULL;
    }
    *out = NULL;
    cuda_compute *cc = calloc(1, sizeof *cc);
    if (!cc) {
        if (err) snprintf(err, 160, "scmoe__cuda_compute_create: out of memory");
        return SCMOE_ERR_NOMEM;
    }
    cc->base = cuda_table;
    cc->base.exchange_kind = cuda_aware ? COMPUTE_DEVICE : COMPUTE_MAPPED;
    cc->cb = cb;
    const char *what = NULL;
    cudaError_t e;
    if ((e = cudaMalloc((void **)&cc->flag, sizeof(int))) != cudaSuccess) what = "cudaMalloc of 4 bytes";
    else if ((e = cudaStreamCreateWithFlags(&cc->copy_stream, cudaStreamNonBlocking)) != cudaSuccess)
        what = "cudaStreamCreateWithFlags";
    else if ((e = cudaEventCreateWithFlags(&cc->ev_compute, cudaEventDisableTiming)) != cudaSuccess ||
             (e = cudaEventCreateWithFlags(&cc->ev_copy, cudaEventDisableTiming)) != cudaSuccess)
        what = "cudaEventCreateWithFlags";
    else if ((e = cudaStreamCreateWithFlags(&cc->xfer_stream, cudaStreamNonBlocking)) != cudaSuccess)
        what = "cudaStreamCreateWithFlags";
    else if ((e = cudaEventCreateWithFlags(&cc->ev_xfer_after, cudaEventDisableTiming)) != cudaSuccess ||
             (e = cudaEventCreateWithFlags(&cc->ev_xfer, cudaEventDisableTiming)) != cudaSuccess ||
             (e = cudaEventCreateWithFlags(&cc->ev_xfer_in, cudaEventDisableTiming)) != cudaSuccess)
        what = "cudaEventCreateWithFlags";
    if (what) {
        if (err) snprintf(err, 160, "%s failed: %s", what, cudaGetErrorString(e));
        scmoe__cuda_compute_destroy(&cc->base);
        return SCMOE_ERR_DEVICE;
    }
    *out = &cc->base;
    return SCMOE_OK;
}

void scmoe__cuda_compute_destroy(compute_ops *co) {
    if (!co) return;
    cuda_compute *cc = self_of(co);
    if (cc->ev_copy) cudaEventDestroy(cc->ev_copy);
    if (cc->ev_compute) cudaEventDestroy(cc->ev_compute);
    if (cc->copy_stream) cudaStreamDestroy(cc->copy_stream);
    if (cc->ev_xfer_in) cudaEventDestroy(cc->ev_xfer_in);
    if (cc->ev_xfer) cudaEventDestroy(cc->ev_xfer);
    if (cc->ev_xfer_after) cudaEventDestroy(cc->ev_xfer_after);
    if (cc->xfer_stream) cudaStreamDestroy(cc->xfer_stream);
    cudaFree(cc->flag);
    free(cc);
}
