/* pair.c: the block pair, a dense pre-LN block l followed by an MoE block l+1 (paper, "Blocks come in
 * pairs"), and the schedule that runs it.
 *
 *   dense block l:  a0 = LN_a0(x)   A  = x + Attn_0(a0)    m0 = LN_m0(A)    H = A + MLP_0(m0)
 *   block l+1:      a1 = LN_a1(H)   A2 = H + Attn_1(a1)    m1 = LN_m1(A2)
 *   top2 / top1:    y = A2 + MoE_k(m1)
 *   shared:         y = A2 + C(m1) + MoE_1(m1)
 *   scmoe:          y = A2 + C(m1) + MoE_1(X_sc),  X_sc = a1 (pos 1) | m0 (pos 2) | a0 (pos 3)
 *   C(m1) = sigmoid(w_cg . m1) SE(m1) (CG-1) or SE(m1) (direct add)
 *
 * The pair is a list of dense operations, forward F0..F7 and backward B0..B7, and the MoE's phases
 * placed among them (schedule.c): with a shortcut the MoE's gate runs as soon as X_sc exists and its
 * exchanges fly while the following dense operations compute. Serialized and overlapped orders run
 * the same functions on the same data, so they give the same numbers. */
#include "scmoe_internal.h"
#include "schedule.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- linear layers: out = [res +] in W + b, W: K x M ---- */

static void linear_forward(const exec *ex, float *out, const float *res, const float *in, const float *w,
                           const float *b, int N, int K, int M) {
    const compute_ops *co = exec_compute(ex);
    co->broadcast_rows(co, out, b, N, M);
    if (res) co->add(co, out, res, (size_t)N * M);
    scmoe__exec_gemm(ex, 0, 0, N, M, K, 1.0f, in, K, w, M, 1.0f, out, M);
}

/* dW += in^T dout, db += scmoe__sum_rows dout, din = dout W^T + beta din */
static void linear_backward(const exec *ex, float *din, float beta, float *dw, float *db, const float *dout,
                            const float *in, const float *w, int N, int K, int M) {
    const compute_ops *co = exec_compute(ex);
    scmoe__exec_gemm(ex, 1, 0, K, M, N, 1.0f, in, K, dout, M, 1.0f, dw, M);
    co->sum_rows(co, db, dout, N, M);
    scmoe__exec_gemm(ex, 0, 1, N, K, M, 1.0f, dout, M, w, M, beta, din, K);
}

/* ---- parameters ---- */

typedef struct ln_params {
    int w;
} ln_params; /* weight, bias = w + 1 */
typedef struct attn_params {
    int wqkv;
} attn_params; /* wqkv, bqkv, wo, bo */
typedef struct ffn_params {
    int w1;
} ffn_params; /* w1, b1, w2, b2 */

struct scmoe_pair {
    scmoe_context *ctx;
    scmoe_config cfg;
    param_table pt;
    moe_layer moe;
    exec ex;
    int k, has_se, cg, training;
    int p_ln_a0, p_attn0, p_ln_m0, p_mlp0, p_ln_a1, p_attn1, p_ln_m1, p_se, p_cg;
    /* the current step */
    int B, T, n;
    float *y;
    const float *dy;
    /* activations: [max_tokens, d] unless noted */
    void *mem;
    float *x, *a0, *A, *m0, *H, *a1, *A2, *m1, *se_out;
    float *ln_stats;    /* 8 x [max_tokens]: mean, rstd of a0, m0, a1, m1 */
    float *qkv0, *qkv1; /* [N, 3d] */
    float *att0, *att1; /* [B, H, T, T] */
    float *o0, *o1;
    float *pre0, *hid0, *se_pre, *se_hid; /* [N, h1], [N, h] */
    float *cgate;                         /* [N] sigmoid(w_cg . m1) */
    /* backward */
    float *dA2, *dm1, *dH, *da1, *dA, *dm0, *da0, *dx, *dqkv, *dO, *datt, *dhid, *dpre, *gse, *dcg;
    /* schedule */
    scheduler sch;
    char *grad_work; /* the two-round all-reduces' work, one region per bucket (host memory), or NULL */
    int backward_ready, grads_pending;
    scmoe__calls calls; /* its place in the ranks' call sequence (scmoe__call_agree) */
};

static float *P(const scmoe_pair *p, int idx) { return p->pt.p[idx].t.data; }
static float *G(const scmoe_pair *p, int idx) { return p->pt.p[idx].gwork; }
static const compute_ops *CO(const scmoe_pair *p) { return p->ctx->compute; }

static void copy_rows(const scmoe_pair *p, float *dst, const float *src, size_t n) {
    CO(p)->copy_rows(CO(p), dst, src, sizeof(float) * n);
}

/* ---- forward operations ---- */

static void ln_fwd(scmoe_pair *p, float *out, int slot, const float *in, int par) {
    CO(p)->layernorm_forward(CO(p), out, p->ln_stats + (size_t)(2 * slot) * p->cfg.max_tokens,
                             p->ln_stats + (size_t)(2 * slot + 1) * p->cfg.max_tokens, in, P(p, par), P(p, par + 1),
                             p->n, p->cfg.d_model);
}

static void ln_bwd(scmoe_pair *p, float *dx, int slot, const float *dy, const float *in, int par) {
    CO(p)->layernorm_backward(CO(p), dx, G(p, par), G(p, par + 1), dy, in, P(p, par),
                              p->ln_stats + (size_t)(2 * slot) * p->cfg.max_tokens,
                              p->ln_stats + (size_t)(2 * slot + 1) * p->cfg.max_tokens, p->n, p->cfg.d_model);
}

/* out = res + Attn(in) */
static void attn_fwd(scmoe_pair *p, float *out, const float *res, const float *in, float *qkv, float *att, float *o,
                     int par) {
    int d = p->cfg.d_model;
    linear_forward(&p->ex, qkv, NULL, in, P(p, par), P(p, par + 1), p->n, d, 3 * d);
    CO(p)->attention_forward(CO(p), &p->ex, o, att, qkv, p->B, p->T, d, p->cfg.n_heads, p->cfg.causal);
    linear_forward(&p->ex, out, res, o, P(p, par + 2), P(p, par + 3), p->n, d, d);
}

/* din = dAttn/din^T dout (overwritten) */
static void attn_bwd(scmoe_pair *p, float *din, const float *dout, const float *in, const float *qkv, const float *att,
                     const float *o, int par) {
    int d = p->cfg.d_model;
    linear_backward(&p->ex, p->dO, 0.0f, G(p, par + 2), G(p, par + 3), dout, o, P(p, par + 2), p->n, d, d);
    CO(p)->attention_backward(CO(p), &p->ex, p->dqkv, p->datt, p->dO, qkv, att, p->B, p->T, d, p->cfg.n_heads,
                              p->cfg.causal);
    linear_backward(&p->ex, din, 0.0f, G(p, par), G(p, par + 1), p->dqkv, in, P(p, par), p->n, d, 3 * d);
}

static void f_ln_a0(void *self) {
    scmoe_pair *p = self;
    ln_fwd(p, p->a0, 0, p->x, p->p_ln_a0);
}
static void f_attn0(void *self) {
    scmoe_pair *p = self;
    attn_fwd(p, p->A, p->x, p->a0, p->qkv0, p->att0, p->o0, p->p_attn0);
}
static void f_ln_m0(void *self) {
    scmoe_pair *p = self;
    ln_fwd(p, p->m0, 1, p->A, p->p_ln_m0);
}
static void f_mlp0(void *self) {
    scmoe_pair *p = self;
    int b = p->p_mlp0;
    scmoe__ffn_forward(&p->ex, p->H, p->pre0, p->hid0, p->m0, P(p, b), P(p, b + 1), P(p, b + 2), P(p, b + 3), p->n,
                       p->cfg.d_model, p->cfg.d_hidden, p->cfg.activation);
    CO(p)->add(CO(p), p->H, p->A, (size_t)p->n * p->cfg.d_model);
}
static void f_ln_a1(void *self) {
    scmoe_pair *p = self;
    ln_fwd(p, p->a1, 2, p->H, p->p_ln_a1);
}
static void f_attn1(void *self) {
    scmoe_pair *p = self;
    attn_fwd(p, p->A2, p->H, p->a1, p->qkv1, p->att1, p->o1, p->p_attn1);
}
static void f_ln_m1(void *self) {
    scmoe_pair *p = self;
    ln_fwd(p, p->m1, 3, p->A2, p->p_ln_m1);
}

/* y = A2 + c * SE(m1), c = sigmoid(w_cg . m1) for CG-1, 1 for direct add (combine.c); y = A2 without a
 * shared expert */
static void f_se(void *self) {
    scmoe_pair *p = self;
    int d = p->cfg.d_model, n = p->n;
    if (!p->has_se) {
        copy_rows(p, p->y, p->A2, (size_t)n * d);
        return;
    }
    int b = p->p_se;
    scmoe__ffn_forward(&p->ex, p->se_out, p->se_pre, p->se_hid, p->m1, P(p, b), P(p, b + 1), P(p, b + 2), P(p, b + 3),
                       n, d, p->cfg.d_hidden, p->cfg.activation);
    CO(p)->cg_combine_forward(CO(p), p->y, p->cgate, p->A2, p->se_out, p->m1, p->cg ? P(p, p->p_cg) : NULL, n, d);
}

/* ---- backward operations (each the mirror of one forward operation) ---- */

/* From y = A2 + c SE(m1): dSE = c dy, dc = dy . SE, dz = dc c (1 - c), dw_cg += dz m1, dm1 = dz w_cg + dSE/dm1 */
static void b_se(void *self) {
    scmoe_pair *p = self;
    int d = p->cfg.d_model, n = p->n;
    if (!p->has_se) {
        CO(p)->zero(CO(p), p->dm1, sizeof(float) * (size_t)n * d);
        return;
    }
    CO(p)->cg_combine_backward(CO(p), p->gse, p->dcg, p->dy, p->se_out, p->cgate, n, d);
    int b = p->p_se;
    scmoe__ffn_backward(&p->ex, p->dm1, 0.0f, G(p, b), G(p, b + 1), G(p, b + 2), G(p, b + 3), p->dhid, p->dpre, p->gse,
                        p->m1, p->se_pre, p->se_hid, P(p, b), P(p, b + 2), n, d, p->cfg.d_hidden, p->cfg.activation);
    if (!p->cg) return;
    float *gw = G(p, p->p_cg);
    CO(p)->add_outer(CO(p), p->dm1, p->dcg, P(p, p->p_cg), n, d);
    /* dw_cg = m1^T dz: a GEMV through the backend keeps the sum order fixed */
    scmoe__exec_gemm_fp32(&p->ex, 1, 0, d, 1, n, 1.0f, p->m1, d, p->dcg, 1, 1.0f, gw, 1);
}
static void b_ln_m1(void *self) {
    scmoe_pair *p = self;
    copy_rows(p, p->dA2, p->dy, (size_t)p->n * p->cfg.d_model);
    ln_bwd(p, p->dA2, 3, p->dm1, p->A2, p->p_ln_m1);
}
static void b_attn1(void *self) {
    scmoe_pair *p = self;
    attn_bwd(p, p->da1, p->dA2, p->a1, p->qkv1, p->att1, p->o1, p->p_attn1);
}
static void b_ln_a1(void *self) {
    scmoe_pair *p = self;
    copy_rows(p, p->dH, p->dA2, (size_t)p->n * p->cfg.d_model);
    ln_bwd(p, p->dH, 2, p->da1, p->H, p->p_ln_a1);
}
static void b_mlp0(void *self) {
    scmoe_pair *p = self;
    int b = p->p_mlp0;
    scmoe__ffn_backward(&p->ex, p->dm0, 0.0f, G(p, b), G(p, b + 1), G(p, b + 2), G(p, b + 3), p->dhid, p->dpre, p->dH,
                        p->m0, p->pre0, p->hid0, P(p, b), P(p, b + 2), p->n, p->cfg.d_model, p->cfg.d_hidden,
                        p->cfg.activation);
}
static void b_ln_m0(void *self) {
    scmoe_pair *p = self;
    copy_rows(p, p->dA, p->dH, (size_t)p->n * p->cfg.d_model);
    ln_bwd(p, p->dA, 1, p->dm0, p->A, p->p_ln_m0);
}
static void b_attn0(void *self) {
    scmoe_pair *p = self;
    attn_bwd(p, p->da0, p->dA, p->a0, p->qkv0, p->att0, p->o0, p->p_attn0);
}
static void b_ln_a0(void *self) {
    scmoe_pair *p = self;
    copy_rows(p, p->dx, p->dA, (size_t)p->n * p->cfg.d_model);
    ln_bwd(p, p->dx, 0, p->da0, p->x, p->p_ln_a0);
}

/* ---- the pair as the schedule sees it (schedule.h): its operations in forward order, F0..F7; the
 * backward runs them in reverse, B0 = shared_expert_bwd .. B7 = ln_a0_bwd ---- */

enum { OP_LN_A0, OP_ATTN0, OP_LN_M0, OP_MLP0, OP_LN_A1, OP_ATTN1, OP_LN_M1, OP_SE, PAIR_OPS };
static const sched_op pair_ops[PAIR_OPS] = {
    [OP_LN_A0] = {"ln_a0", f_ln_a0, b_ln_a0}, [OP_ATTN0] = {"attn0", f_attn0, b_attn0},
    [OP_LN_M0] = {"ln_m0", f_ln_m0, b_ln_m0}, [OP_MLP0] = {"mlp0", f_mlp0, b_mlp0},
    [OP_LN_A1] = {"ln_a1", f_ln_a1, b_ln_a1}, [OP_ATTN1] = {"attn1", f_attn1, b_attn1},
    [OP_LN_M1] = {"ln_m1", f_ln_m1, b_ln_m1}, [OP_SE] = {"shared_expert", f_se, b_se},
};

/* The operation whose output the MoE reads: X_sc = a1 | m0 | a0 for scmoe pos 1 | 2 | 3, m1 otherwise. */
static int moe_input_op(const scmoe_config *c) {
    if (c->arch != SCMOE_ARCH_SCMOE) return OP_LN_M1;
    return c->shortcut_pos == 1 ? OP_LN_A1 : c->shortcut_pos == 2 ? OP_LN_M0 : OP_LN_A0;
}

/* ---- create ---- */

static scmoe_status register_params(scmoe_pair *p) {
    param_table *pt = &p->pt;
    const scmoe_config *c = &p->cfg;
    int d = c->d_model, h = c->d_hidden, h1 = scmoe__ffn_width(h, c->activation);
    uint64_t s = c->seed;
    float std = 0.02f, res_std = 0.02f / sqrtf(2.0f * c->n_layers);
    char n[64];
    /* registered in the order backward finishes them, reversed: each backward operation's tensors
     * are contiguous, one all-reduce bucket */
#define LN(field, pre)                                                                                                 \
    do {                                                                                                               \
        snprintf(n, sizeof n, "%s.weight", pre);                                                                       \
        p->field = scmoe__params_add(pt, n, 1, (int[]){d}, SYNC_WORLD, INIT_ONE, 0, s);                                \
        snprintf(n, sizeof n, "%s.bias", pre);                                                                         \
        scmoe__params_add(pt, n, 1, (int[]){d}, SYNC_WORLD, INIT_ZERO, 0, s);                                          \
    } while (0)
#define ATTN(field, pre)                                                                                               \
    do {                                                                                                               \
        snprintf(n, sizeof n, "%s.wqkv", pre);                                                                         \
        p->field = scmoe__params_add(pt, n, 2, (int[]){d, 3 * d}, SYNC_WORLD, INIT_NORMAL, std, s);                    \
        snprintf(n, sizeof n, "%s.bqkv", pre);                                                                         \
        scmoe__params_add(pt, n, 1, (int[]){3 * d}, SYNC_WORLD, INIT_ZERO, 0, s);                                      \
        snprintf(n, sizeof n, "%s.wo", pre);                                                                           \
        scmoe__params_add(pt, n, 2, (int[]){d, d}, SYNC_WORLD, INIT_NORMAL, res_std, s);                               \
        snprintf(n, sizeof n, "%s.bo", pre);                                                                           \
        scmoe__params_add(pt, n, 1, (int[]){d}, SYNC_WORLD, INIT_ZERO, 0, s);                                          \
    } while (0)
#define FFN(field, pre)                                                                                                \
    do {                                                                                                               \
        snprintf(n, sizeof n, "%s.w1", pre);                                                                           \
        p->field = scmoe__params_add(pt, n, 2, (int[]){d, h1}, SYNC_WORLD, INIT_NORMAL, std, s);                       \
        snprintf(n, sizeof n, "%s.b1", pre);                                                                           \
        scmoe__params_add(pt, n, 1, (int[]){h1}, SYNC_WORLD, INIT_ZERO, 0, s);                                         \
        snprintf(n, sizeof n, "%s.w2", pre);                                                                           \
        scmoe__params_add(pt, n, 2, (int[]){h, d}, SYNC_WORLD, INIT_NORMAL, res_std, s);                               \
        snprintf(n, sizeof n, "%s.b2", pre);                                                                           \
        scmoe__params_add(pt, n, 1, (int[]){d}, SYNC_WORLD, INIT_ZERO, 0, s);                                          \
    } while (0)
    LN(p_ln_a0, "l0.ln_a");
    ATTN(p_attn0, "l0.attn");
    LN(p_ln_m0, "l0.ln_m");
    FFN(p_mlp0, "l0.mlp");
    LN(p_ln_a1, "l1.ln_a");
    ATTN(p_attn1, "l1.attn");
    LN(p_ln_m1, "l1.ln_m");
    p->p_se = p->p_cg = -1;
    if (p->has_se) FFN(p_se, "l1.se");
    if (p->cg) p->p_cg = scmoe__params_add(pt, "l1.cg.weight", 1, (int[]){d}, SYNC_WORLD, INIT_ZERO, 0, s);
#undef LN
#undef ATTN
#undef FFN
    if (pt->failed) return scmoe__fail(p->ctx, SCMOE_ERR_NOMEM, "out of memory registering parameters");
    return scmoe__moe_init(&p->moe, p->ctx, &p->cfg, p->k, pt, "l1.", res_std);
}

/* The staged gradients of count tensors from first on, summed over c; an empty bucket if they are not summed. */
static sched_bucket bucket_of(const param_table *pt, int first, int count, comm *c) {
    sched_bucket b = {NULL, 0, c, NULL, COMM_WIRE_F32, NULL};
    if (count <= 0 || first < 0) return b;
    const param_entry *a = &pt->p[first], *z = &pt->p[first + count - 1];
    if (a->gwork == a->t.grad) return b;
    b.ptr = pt->stage + a->offset_stage;
    b.src = pt->stage_dev ? pt->stage_dev + a->offset_stage : NULL;
    b.n = (int)(z->offset_stage + z->t.numel - a->offset_stage);
    return b;
}

/* Whether a summed bucket's all-reduce is the library's two rounds (schedule.h), and on which wire:
 * every one as bf16 with grad_sync_bf16; as floats every one with grad_sync_algo TWO_ROUND, with AUTO
 * those whose chunk per rank pays for the two rounds' 2 (P-1) messages (comm_two_round_pays), none with
 * MPI, and none where a CUDA-aware MPI stages the gradients in device memory (the two rounds sum on the
 * host: that context takes MPI's all-reduce, and refuses grad_sync_bf16 in alloc_grad_work). */
static int two_round(const scmoe_pair *p, const sched_bucket *k, comm_wire *wire) {
    *wire = p->cfg.grad_sync_bf16 ? COMM_WIRE_BF16 : COMM_WIRE_F32;
    if (p->cfg.grad_sync_bf16) return 1;
    if (CO(p)->exchange_kind == COMPUTE_DEVICE) return 0;
    if (p->cfg.grad_sync_algo == SCMOE_GRAD_SYNC_TWO_ROUND) return 1;
    return p->cfg.grad_sync_algo == SCMOE_GRAD_SYNC_AUTO && comm_two_round_pays(k->n, k->over->size);
}

/* Hands each bucket whose sum is the two rounds its region of base (8-byte aligned), in the order the
 * buckets are listed; returns the bytes used (base NULL: only counts them). */
static size_t give_work(const scmoe_pair *p, sched_block *b, char *base) {
    sched_bucket *all[PAIR_OPS + 2];
    for (int i = 0; i < PAIR_OPS; i++) all[i] = &b->op_grads[i];
    all[PAIR_OPS] = &b->gate_grads;
    all[PAIR_OPS + 1] = &b->expert_grads;
    size_t used = 0;
    for (int i = 0; i < PAIR_OPS + 2; i++) {
        sched_bucket *k = all[i];
        comm_wire wire;
        if (!sched_bucket_summed(k) || !two_round(p, k, &wire)) continue;
        if (base) {
            k->work = base + used;
            k->wire = wire;
        }
        used += (comm_two_round_work(k->n, k->over->size, wire) + 7) & ~(size_t)7;
    }
    return used;
}

/* The pair as a block of the schedule: its operations, the MoE's input, and the gradient buckets each
 * backward operation finishes (contiguous by construction: register_params lays each op's tensors out
 * together). */
static sched_block pair_block(scmoe_pair *p) {
    comm *w = p->ctx->world;
    const param_table *pt = &p->pt;
    sched_block b = {.self = p,
                     .ops = pair_ops,
                     .n_ops = PAIR_OPS,
                     .moe_input_op = moe_input_op(&p->cfg),
                     .overlap = p->cfg.arch == SCMOE_ARCH_SCMOE};
    int first[PAIR_OPS] = {p->p_ln_a0, p->p_attn0, p->p_ln_m0, p->p_mlp0, p->p_ln_a1, p->p_attn1, p->p_ln_m1, p->p_se};
    int count[PAIR_OPS] = {2, 4, 2, 4, 2, 4, 2, p->has_se ? 4 + p->cg : 0};
    for (int i = 0; i < PAIR_OPS; i++) b.op_grads[i] = bucket_of(pt, first[i], count[i], w);
    b.gate_grads = bucket_of(pt, p->moe.p_wg, 1, w);
    b.expert_grads = bucket_of(pt, p->moe.p_e0, 4 * p->moe.E_local, p->moe.replicas);
    if (p->grad_work) give_work(p, &b, p->grad_work);
    return b;
}

/* The work of every bucket's two-round all-reduce, with more than one rank. grad_sync_bf16 packs and sums
 * on the host, from the staged gradients, so a CUDA-aware MPI's device staging is refused. */
static scmoe_status alloc_grad_work(scmoe_pair *p) {
    sched_block b = pair_block(p);
    size_t n = give_work(p, &b, NULL);
    if (n == 0) return SCMOE_OK; /* one rank, or MPI's all-reduce for every bucket */
    if (p->cfg.grad_sync_bf16 && CO(p)->exchange_kind == COMPUTE_DEVICE)
        return scmoe__fail(p->ctx, SCMOE_ERR_UNSUPPORTED,
                           "grad_sync_bf16 rounds and sums the gradients on the host, but this context stages them "
                           "in device memory (CUDA-aware MPI)");
    p->grad_work = malloc(n);
    if (!p->grad_work)
        return scmoe__fail(p->ctx, SCMOE_ERR_NOMEM, "out of memory: the two-round gradient all-reduce needs %zu bytes",
                           n);
    return SCMOE_OK;
}

/* The activations, laid out in one block of the backend's memory ([N, d] each unless noted). */
static void layout_activations(scmoe_pair *p, arena *a) {
    const scmoe_config *c = &p->cfg;
    size_t N = (size_t)c->max_tokens, d = (size_t)c->d_model, h = (size_t)c->d_hidden,
           h1 = (size_t)scmoe__ffn_width(c->d_hidden, c->activation);
    size_t att = N * (size_t)c->n_heads * (size_t)c->max_seq_len, f = sizeof(float);
    float **nd[] = {&p->x,   &p->a0,  &p->A,  &p->m0,  &p->H,  &p->a1,  &p->A2,  &p->m1, &p->se_out, &p->o0, &p->o1,
                    &p->dA2, &p->dm1, &p->dH, &p->da1, &p->dA, &p->dm0, &p->da0, &p->dx, &p->dO,     &p->gse};
    for (size_t i = 0; i < sizeof nd / sizeof *nd; i++) *nd[i] = scmoe__arena_take(a, f * N * d);
    p->ln_stats = scmoe__arena_take(a, f * N * 8);
    p->qkv0 = scmoe__arena_take(a, f * N * 3 * d);
    p->qkv1 = scmoe__arena_take(a, f * N * 3 * d);
    p->dqkv = scmoe__arena_take(a, f * N * 3 * d);
    p->att0 = scmoe__arena_take(a, f * att);
    p->att1 = scmoe__arena_take(a, f * att);
    p->datt = scmoe__arena_take(a, f * att);
    p->pre0 = scmoe__arena_take(a, f * N * h1);
    p->se_pre = scmoe__arena_take(a, f * N * h1);
    p->dpre = scmoe__arena_take(a, f * N * h1);
    p->hid0 = scmoe__arena_take(a, f * N * h);
    p->se_hid = scmoe__arena_take(a, f * N * h);
    p->dhid = scmoe__arena_take(a, f * N * h);
    p->cgate = scmoe__arena_take(a, f * N);
    p->dcg = scmoe__arena_take(a, f * N);
}

static scmoe_status alloc_activations(scmoe_pair *p) {
    arena a = {0};
    layout_activations(p, &a);
    p->mem = CO(p)->alloc(CO(p), a.used, COMPUTE_DEVICE);
    if (!p->mem)
        return scmoe__fail(p->ctx, SCMOE_ERR_NOMEM, "out of memory: the pair's activations need %zu bytes (%s memory)",
                           a.used, CO(p)->name);
    a = (arena){p->mem, 0};
    layout_activations(p, &a);
    return SCMOE_OK;
}

scmoe_status scmoe_pair_create(scmoe_context *ctx, const scmoe_config *cfg, scmoe_pair **out) {
    if (!ctx || !out) return SCMOE_ERR_NULL;
    *out = NULL;
    scmoe__calls calls;
    scmoe_status s = scmoe__config_check(ctx, cfg, &calls);
    if (s) return s;
    /* the arch fixes k: a top_k that says otherwise is refused rather than overwritten (1, the default,
     * stands for "not set"). The config is the same on every rank, so every rank refuses it. */
    int k = cfg->arch == SCMOE_ARCH_TOP2 ? 2 : 1;
    if (cfg->top_k != k && cfg->top_k != 1)
        return scmoe__fail(ctx, SCMOE_ERR_TOP_K,
                           "top_k = %d contradicts arch %d, which routes to k = %d (top_k must "
                           "be %d or the default 1)",
                           cfg->top_k, (int)cfg->arch, k, k);
    scmoe_pair *p = calloc(1, sizeof *p);
    if (!p) s = scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory");
    if (!s) {
        p->ctx = ctx;
        p->calls = calls;
        ctx->objects++;
        p->cfg = *cfg;
        p->k = k;
        p->cfg.top_k = k;
        p->has_se = cfg->arch == SCMOE_ARCH_SHARED || cfg->arch == SCMOE_ARCH_SCMOE;
        p->cg = p->has_se && cfg->combine == SCMOE_COMBINE_CG1;
        p->training = 1;
        p->ex = scmoe__context_exec(ctx, cfg);
        s = register_params(p);
    }
    if (!s) {
        s = scmoe__params_allocate(&p->pt, ctx->compute, ctx->world->size > 1, p->moe.replicas->size > 1);
        if (s) scmoe__fail(ctx, s, "out of memory for %zu parameters", p->pt.total);
    }
    if (!s) s = scmoe__precision_attach(ctx, cfg, &p->pt, &p->ex);
    if (!s) s = scmoe__moe_alloc(&p->moe);
    if (!s) s = alloc_activations(p);
    if (!s) { /* bf16 on a device: the dense GEMMs' two activation operands (at most [N, 3d] and [N, d], or
               * [N, h1] and [N, d]: the attention's input projection, the MLP's weight gradients) */
        size_t N = (size_t)cfg->max_tokens, h1 = (size_t)scmoe__ffn_width(cfg->d_hidden, cfg->activation),
               wide = 3 * (size_t)cfg->d_model > h1 ? 3 * (size_t)cfg->d_model : h1;
        s = scmoe__precision_reserve(ctx, cfg, 2 * N * wide);
    }
    if (!s) s = alloc_grad_work(p);
    if (!s) {
        sched_block b = pair_block(p);
        s = scmoe__schedule_init(&p->sch, ctx, &p->cfg, &b);
    }
    const char *trace = getenv("SCMOE_TRACE");
    if (!s && trace && *trace) {
        char path[1024], pair_tag[32] = "";
        if (ctx->traces > 0) snprintf(pair_tag, sizeof pair_tag, ".pair%d", ctx->traces);
        ctx->traces++;
        if (ctx->world->size > 1) snprintf(path, sizeof path, "%s%s.rank%d.json", trace, pair_tag, ctx->world->rank);
        else snprintf(path, sizeof path, "%s%s", trace, pair_tag);
        s = scmoe__schedule_trace_open(&p->sch, path);
    }
    s = scmoe__status_agree(ctx, s);
    if (s) {
        scmoe_pair_destroy(p);
        return s;
    }
    *out = p;
    return SCMOE_OK;
}

static void pair_release(scmoe_pair *p, int abort) {
    /* an abort keeps what a pending exchange or gradient all-reduce may write: the MoE's workspace and
     * the staged gradients */
    int keep = abort && (scmoe__moe_pending(&p->moe) || (p->ctx && p->ctx->world->ops->pending(p->ctx->world)));
    if (p->ctx) p->ctx->objects--;
    scmoe__schedule_trace_close(&p->sch);
    if (abort) scmoe__moe_abandon(&p->moe, keep);
    else scmoe__moe_free(&p->moe);
    if (keep) { /* what a pending gradient all-reduce reads and writes */
        p->pt.stage = NULL;
        p->grad_work = NULL;
    }
    free(p->grad_work);
    scmoe__params_free(&p->pt);
    if (p->ctx) CO(p)->release(CO(p), p->mem, COMPUTE_DEVICE);
    free(p);
}

void scmoe_pair_destroy(scmoe_pair *p) {
    if (p) pair_release(p, p->ctx && p->ctx->broken);
}

void scmoe_pair_abort(scmoe_pair *p) {
    if (p) pair_release(p, 1);
}

scmoe_status scmoe_pair_set_training(scmoe_pair *p, int training) {
    if (!p) return SCMOE_ERR_NULL;
    p->training = training != 0;
    p->moe.training = p->training;
    return SCMOE_OK;
}

/* the MoE's input, the output of its moe_input_op (the shortcut for scmoe, the block's own LN
 * otherwise), and where its gradient goes */
static const float *moe_input(const scmoe_pair *p) {
    int op = moe_input_op(&p->cfg);
    return op == OP_LN_A1 ? p->a1 : op == OP_LN_M0 ? p->m0 : op == OP_LN_A0 ? p->a0 : p->m1;
}

static float *moe_input_grad(const scmoe_pair *p) {
    int op = moe_input_op(&p->cfg);
    return op == OP_LN_A1 ? p->da1 : op == OP_LN_M0 ? p->dm0 : op == OP_LN_A0 ? p->da0 : p->dm1;
}

scmoe_status scmoe_pair_forward(scmoe_pair *p, int B, int T, const float *x, float *y, scmoe_stats *stats) {
    if (!p) return SCMOE_ERR_NULL;
    scmoe_context *ctx = p->ctx;
    scmoe__moe_bind_comms(&p->moe);
    p->backward_ready = 0; /* a failed forward leaves nothing to differentiate */
    scmoe_status local = SCMOE_OK;
    if (B < 0 || T < 1 || T > p->cfg.max_seq_len || (int64_t)B * T > p->cfg.max_tokens)
        local = scmoe__fail(ctx, SCMOE_ERR_SEQ_LEN,
                            "batch %d x seq_len %d: need batch >= 0, 1 <= seq_len <= %d, batch*seq_len <= %d", B, T,
                            p->cfg.max_seq_len, p->cfg.max_tokens);
    else if (B > 0 && (!x || !y)) local = scmoe__fail(ctx, SCMOE_ERR_NULL, "x or y is NULL");
    else if (p->grads_pending)
        local = scmoe__fail(ctx, SCMOE_ERR_STATE,
                            "forward while a gradient all-reduce is pending: call scmoe_pair_grad_sync first");
    else if (p->cfg.check_finite && B > 0 && CO(p)->has_nonfinite(CO(p), x, (size_t)B * T * p->cfg.d_model))
        local = scmoe__fail(ctx, SCMOE_ERR_NONFINITE, "the input holds NaN or Inf");
    scmoe_status s = scmoe__call_agree(ctx, &p->calls, SCMOE__CALL_FORWARD, p->training, local);
    if (s) return s;
    p->B = B;
    p->T = T;
    p->n = B * T;
    p->y = y;
    p->backward_ready = 0;
    copy_rows(p, p->x, x, (size_t)p->n * p->cfg.d_model);
    sched_moe mo = {&p->moe, moe_input(p), NULL, y, NULL};
    s = scmoe__schedule_forward(&p->sch, &p->ex, &mo, p->n);
    if (!s) s = scmoe__context_device_check(ctx);
    if (s) return s;
    p->backward_ready = p->training;
    if (stats) {
        memset(stats, 0, sizeof *stats);
        scmoe__moe_fill_stats(&p->moe, stats);
        scmoe__schedule_fill_stats(&p->sch, stats, 0);
    }
    return SCMOE_OK;
}

scmoe_status scmoe_pair_backward(scmoe_pair *p, const float *dy, float *dx, scmoe_stats *stats) {
    if (!p) return SCMOE_ERR_NULL;
    scmoe__moe_bind_comms(&p->moe);
    scmoe_status local = SCMOE_OK;
    if (!p->backward_ready) local = scmoe__fail(p->ctx, SCMOE_ERR_STATE, "backward needs a training forward first");
    else if (p->grads_pending)
        local = scmoe__fail(p->ctx, SCMOE_ERR_STATE,
                            "backward while a gradient all-reduce is pending: call scmoe_pair_grad_sync first");
    else if (p->n > 0 && (!dy || !dx)) local = scmoe__fail(p->ctx, SCMOE_ERR_NULL, "dy or dx is NULL");
    else if (p->cfg.check_finite && p->n > 0 && CO(p)->has_nonfinite(CO(p), dy, (size_t)p->n * p->cfg.d_model))
        local = scmoe__fail(p->ctx, SCMOE_ERR_NONFINITE, "dy holds NaN or Inf");
    scmoe_status s = scmoe__call_agree(p->ctx, &p->calls, SCMOE__CALL_BACKWARD, p->training, local);
    if (s) return s;
    p->backward_ready = 0; /* one backward per forward: a second would add every gradient again */
    p->dy = dy;
    scmoe__params_zero_stage(&p->pt);
    sched_moe mo = {&p->moe, NULL, moe_input_grad(p), NULL, dy};
    s = scmoe__schedule_backward(&p->sch, &p->ex, &mo, p->n);
    if (s) return s;
    copy_rows(p, dx, p->dx, (size_t)p->n * p->cfg.d_model);
    s = scmoe__context_device_check(p->ctx);
    if (s) return s;
    p->grads_pending = 1;
    if (!p->cfg.overlap_grad_sync) s = scmoe_pair_grad_sync(p, NULL);
    if (stats) {
        scmoe__moe_fill_stats(&p->moe, stats);
        scmoe__schedule_fill_stats(&p->sch, stats, 1);
    }
    return s;
}

scmoe_status scmoe_pair_grad_sync(scmoe_pair *p, scmoe_stats *stats) {
    if (!p) return SCMOE_ERR_NULL;
    scmoe__moe_bind_comms(&p->moe);
    scmoe_status s = scmoe__ctx_usable(p->ctx);
    if (s) return s;
    if (!p->grads_pending) return SCMOE_OK;
    s = scmoe__schedule_grad_wait(&p->sch);
    p->grads_pending = 0;
    if (s) return s;
    scmoe__params_add_stage(&p->pt);
    if (stats) scmoe__schedule_fill_stats(&p->sch, stats, 2);
    return scmoe__context_device_check(p->ctx);
}

scmoe_status scmoe_pair_params_changed(scmoe_pair *p) {
    if (!p) return SCMOE_ERR_NULL;
    scmoe__precision_refresh(&p->pt);
    return SCMOE_OK;
}

scmoe_status scmoe_pair_zero_grad(scmoe_pair *p) {
    if (!p) return SCMOE_ERR_NULL;
    scmoe__params_zero_grad(&p->pt);
    return SCMOE_OK;
}

scmoe_status scmoe_pair_trace(scmoe_pair *p, const char *path) {
    if (!p) return SCMOE_ERR_NULL;
    return scmoe__schedule_trace_open(&p->sch, path);
}

int scmoe_pair_param_count(const scmoe_pair *p) { return p ? p->pt.n : 0; }

scmoe_status scmoe_pair_param_at(const scmoe_pair *p, int i, scmoe_tensor *t) {
    return p ? scmoe__params_at(&p->pt, i, t) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_pair_param(const scmoe_pair *p, const char *name, scmoe_tensor *t) {
    return p ? scmoe__params_named(p->ctx, &p->pt, name, t) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_pair_set_loss_weights(scmoe_pair *p, float aux, float z) {
    if (!p) return SCMOE_ERR_NULL;
    scmoe_status s = scmoe__moe_set_loss_weights(&p->moe, aux, z);
    if (!s) p->cfg.aux_loss_weight = aux, p->cfg.z_loss_weight = z;
    return s;
}

scmoe_status scmoe_pair_set_name_prefix(scmoe_pair *p, const char *prefix) {
    return p && prefix ? scmoe__params_set_prefix(p->ctx, &p->pt, prefix) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_pair_expert_range(const scmoe_pair *p, int *first, int *count) {
    if (!p || !first || !count) return SCMOE_ERR_NULL;
    *first = p->moe.first_expert;
    *count = p->moe.E_local;
    return SCMOE_OK;
}

scmoe_status scmoe_pair_noise_state(const scmoe_pair *p, uint64_t *state) {
    if (!p || !state) return SCMOE_ERR_NULL;
    *state = p->moe.step;
    return SCMOE_OK;
}

scmoe_status scmoe_pair_set_noise_state(scmoe_pair *p, uint64_t state) {
    if (!p) return SCMOE_ERR_NULL;
    p->moe.step = state;
    return SCMOE_OK;
}
