/* compute.h: where a layer's buffers live and what runs on them. The MoE calls its elementwise and
 * row-moving kernels, and its memory, through this table, the way it calls GEMMs through blas.h: the
 * host backend (compute_host.c: the functions of kernels/, OpenMP) or the CUDA one
 * (cuda_backend/compute_cuda.c: the kernels of kernels.cu on one stream) fills it, and the core never
 * knows which.
 *
 * Three kinds of memory:
 *   COMPUTE_HOST    the host's own: routing plans, counts, statistics (host code reads them)
 *   COMPUTE_DEVICE  the backend's: activations, expert buffers, parameters
 *   COMPUTE_MAPPED  reachable by both (CUDA: pinned, mapped host memory): the exchange buffers, so MPI
 *                   reads and writes them on the host while kernels pack into them and permute out of
 *                   them; the permute is the copy to the device, and no staging copy is needed. With a
 *                   CUDA-aware MPI the exchange buffers are device memory instead (exchange_kind).
 * On the host backend all three are the same plain memory.
 *
 * Kernels are enqueued in order and may run asynchronously: `sync` waits for all of them, which the
 * core does before it hands a mapped buffer to MPI or reads device results on the host (`copy` waits
 * by itself). A kernel or copy that fails is kept as the table's first failure (`failed`), which the
 * core turns into SCMOE_ERR_DEVICE at the end of a phase; the host backend never fails. */
#ifndef SCMOE_COMPUTE_H
#define SCMOE_COMPUTE_H

#include <stddef.h>
#include <stdint.h>
#include "../scmoe.h"

enum { COMPUTE_HOST = 0, COMPUTE_DEVICE = 1, COMPUTE_MAPPED = 2 };

typedef struct compute_ops compute_ops;
struct exec;

/* The routed experts of one stage as one unit (compute_ops.experts_forward / _backward): expert i's
 * rows are [off[i], off[i + 1]) of every buffer; its weights and gradients are its own tensors. */
enum { COMPUTE_EXPERTS_MAX = 64 }; /* experts per call: the MoE cuts more into several */
typedef struct expert_group {
    int n; /* experts */
    int off[COMPUTE_EXPERTS_MAX + 1];
    int rows_cap; /* rows every buffer holds (off[n] <= rows_cap) */
    int d, h;
    scmoe_activation act;
    const float *w1[COMPUTE_EXPERTS_MAX], *b1[COMPUTE_EXPERTS_MAX], *w2[COMPUTE_EXPERTS_MAX], *b2[COMPUTE_EXPERTS_MAX];
    float *dw1[COMPUTE_EXPERTS_MAX], *db1[COMPUTE_EXPERTS_MAX], *dw2[COMPUTE_EXPERTS_MAX], *db2[COMPUTE_EXPERTS_MAX];
    float *x, *pre, *hid, *y;     /* forward: [rows, d], [rows, ffn_width(h)], [rows, h], [rows, d] */
    float *dy, *dx, *dhid, *dpre; /* backward: dx overwritten, gradients += */
} expert_group;
/* One source's routing plan made where the gate ran (compute_ops.route_local): capacity per source
 * rank (TOKEN or, with score, BATCH priority; GLOBAL's first half: dropless, TOKEN). In: the gate's
 * choice, p, lse (compute side). Out: slot (compute side) and the summary the host needs, in memory it
 * can read (COMPUTE_MAPPED), *seq = seq_value written last. */
typedef struct route_job {
    const int *choice;
    const float *p, *lse;
    const float *score; /* BATCH priority: the top-1 scores [n], tokens ordered by them; NULL: TOKEN */
    int n, E, k, ep_size;
    int64_t capacity; /* rows per expert, INT64_MAX: dropless */
    int *slot;        /* [n, k] as scmoe__route_plan_local_send's */
    int *work;        /* compute side, (k + 2) E ints, plus n with score */
    double *work_sum; /* compute side, E + 1 */
    /* host-visible: counts [ep_size][1 + E_local k] (word 0 of each peer 0), gsum [E + 1] (sum_t p[t, e]
     * in token order, then sum_t lse^2, in double), top1 [E], kept [E] */
    int32_t *counts, *top1, *kept;
    double *gsum;
    uint32_t *seq;
    uint32_t seq_value;
} route_job;
struct compute_ops {
    const char *name;
    int device;        /* 1: COMPUTE_DEVICE memory is not the host's: the core copies what it reads */
    int exchange_kind; /* what MPI exchanges live in: COMPUTE_MAPPED, or COMPUTE_DEVICE for a CUDA-aware MPI */
    /* ---- memory (allocation happens only in *_create) ---- */
    void *(*alloc)(const compute_ops *self, size_t bytes, int kind); /* 64-byte aligned; NULL when out */
    void (*release)(const compute_ops *self, void *p, int kind);
    /* bytes between any two kinds of memory; returns once the bytes are at dst (the host reads them) */
    void (*copy)(const compute_ops *self, void *dst, const void *src, size_t bytes);
    /* bytes between two buffers the kernels use, in stream order like a kernel: the host does not wait */
    void (*copy_rows)(const compute_ops *self, void *dst, const void *src, size_t bytes);
    void (*zero)(const compute_ops *self, void *p, size_t bytes);
    void (*sync)(const compute_ops *self);
    /* the first failure since the last call: nonzero and its sentence in msg; then cleared */
    int (*failed)(const compute_ops *self, char *msg, size_t len);
    int (*has_nonfinite)(const compute_ops *self, const float *x, size_t n);
    /* ---- kernels: the functions of kernels.h of the same name ---- */
    void (*add)(const compute_ops *self, float *y, const float *x, size_t n); /* y += x */
    void (*broadcast_rows)(const compute_ops *self, float *out, const float *b, int N, int C);
    void (*sum_rows)(const compute_ops *self, float *acc, const float *x, int N, int C);
    void (*activation_forward)(const compute_ops *self, float *hid, float *pre, const float *b, int N, int h,
                               scmoe_activation act);
    void (*activation_backward)(const compute_ops *self, float *dpre, const float *dhid, const float *pre, int N, int h,
                                scmoe_activation act);
    void (*gate_softmax)(const compute_ops *self, float *logits, float *p, float *lse, int N, int E, float noise_std,
                         uint64_t seed, uint64_t step, int64_t token_offset);
    void (*gate_topk)(const compute_ops *self, int *choice, float *weight, float *score, const float *p, int N, int E,
                      int k, int renormalize);
    void (*gate_backward_logits)(const compute_ops *self, float *dlogits, const float *dweight, const int *choice,
                                 const float *p, const float *lse, const float *aux_coef, float z_coef, int N, int E,
                                 int k, int renormalize);
    void (*permute_rows)(const compute_ops *self, float *dst, const float *src, const int *map, int n, int d,
                         int scatter);
    void (*pack_rows)(const compute_ops *self, float *send, const float *x, const int *slot, int n, int k, int d);
    void (*decode_rows)(const compute_ops *self, float *y, float beta, const float *rows, const int *slot,
                        const float *weight, int n, int k, int d);
    void (*decode_rows_backward)(const compute_ops *self, float *grows, float *dweight, const float *dy,
                                 const float *rows, const int *slot, const float *weight, int n, int k, int d);
    void (*layernorm_forward)(const compute_ops *self, float *out, float *mean, float *rstd, const float *x,
                              const float *w, const float *b, int N, int C);
    void (*layernorm_backward)(const compute_ops *self, float *dx, float *dw, float *db, const float *dy,
                               const float *x, const float *w, const float *mean, const float *rstd, int N, int C);
    /* the host's runs GEMMs through ex (and so polls); a device's is one kernel */
    void (*attention_forward)(const compute_ops *self, const struct exec *ex, float *out, float *att, const float *qkv,
                              int B, int T, int d, int H, int causal);
    void (*attention_backward)(const compute_ops *self, const struct exec *ex, float *dqkv, float *datt,
                               const float *dout, const float *qkv, const float *att, int B, int T, int d, int H,
                               int causal);
    void (*cg_combine_forward)(const compute_ops *self, float *y, float *cgate, const float *a, const float *s,
                               const float *m, const float *wcg, int n, int d);
    void (*cg_combine_backward)(const compute_ops *self, float *ds, float *dz, const float *dy, const float *s,
                                const float *cgate, int n, int d);
    void (*add_outer)(const compute_ops *self, float *out, const float *u, const float *v, int n, int d);
    /* expert offloading: bytes from mapped to device memory on a copy queue of their own, once every
     * kernel enqueued before has finished (the destination may still be read); prefetch_wait makes
     * the kernels enqueued after it wait for every prefetch */
    void (*prefetch)(const compute_ops *self, void *dst, const void *src, size_t bytes);
    void (*prefetch_wait)(const compute_ops *self);
    /* scmoe__ffn_forward / scmoe__ffn_backward of every expert of g at once (grouped GEMMs); NULL: the
     * MoE runs them one by one (the host's threads take experts in parallel instead) */
    void (*experts_forward)(const compute_ops *self, const struct exec *ex, const expert_group *g);
    void (*experts_backward)(const compute_ops *self, const struct exec *ex, const expert_group *g);
    void (*bf16_pack)(const compute_ops *self, uint16_t *dst, const float *src, size_t n);
    void (*bf16_unpack)(const compute_ops *self, float *dst, const uint16_t *src, size_t n);
    /* ---- issue 19 (NULL on the host) ---- */
    /* What MPI moves, for a device whose MPI reads host memory: the kernels work on device memory and
     * these move it to and from the mapped buffers MPI reads, on a copy queue of their own (the gradient
     * buckets summed over ranks; the token exchanges' peer blocks).
     * copy_out: bytes from src (device) to dst (mapped), once every kernel enqueued before has finished;
     * copy_landed says whether every copy_out so far has landed (MPI may read them): wait 0 asks (a poll,
     * so the host goes on enqueueing while the copy engine works), wait 1 returns once they have (then
     * 1); 0 also when the device failed (failed() says why). copy_in: bytes from
     * src (mapped, MPI has written them) to dst (device), started at once (no kernel enqueued before may
     * use dst); the kernels enqueued after it wait for it. */
    void (*copy_out)(const compute_ops *self, void *dst, const void *src, size_t bytes);
    int (*copy_landed)(const compute_ops *self, int wait);
    void (*copy_in)(const compute_ops *self, void *dst, const void *src, size_t bytes);
    /* precision BF16: the bf16 activation scratch of the GEMMs holds at least n elements (grown when a
     * layer is created, never in a forward or backward); nonzero when out of memory */
    int (*bf16_reserve)(const compute_ops *self, size_t n);
    /* ---- routing planned on the device (issue 19); NULL: the host plans from the gate's outputs ----
     * route_local enqueues j (kernels.cu scmoe__cuda_route_local); route_landed says whether *seq holds
     * value yet (wait 0), or waits until it does (wait 1: for that word, not for the whole stream); 0
     * when the device failed first (then failed() says why). route_global (capacity over the global batch,
     * TOKEN priority, several ranks): after route_local(j) with capacity INT64_MAX, rewrites j->slot into
     * the global plan's rows from base [k E + 1] on the compute side (scmoe__route_plan_global_counts'),
     * in stream order; j->work is then (3 k + 2) E ints */
    void (*route_local)(const compute_ops *self, const route_job *j);
    int (*route_landed)(const compute_ops *self, const uint32_t *seq, uint32_t value, int wait);
    void (*route_global)(const compute_ops *self, const route_job *j, const int64_t *base);
};

/* The host backend: kernels/ on host memory. */
const compute_ops *scmoe__compute_host(void);

#endif
