/* compute_host.c: the compute table of the host backend: kernels/ on host memory, threaded with
 * OpenMP. Every kind of memory is plain host memory, nothing is asynchronous, nothing fails. */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

int scmoe__has_nonfinite(const float *x, size_t n) {
    int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
    for (size_t i = 0; i < n; i++) bad |= !isfinite(x[i]);
    return bad;
}

static void *host_alloc(const compute_ops *self, size_t bytes, int kind) {
    return aligned_alloc(64, bytes ? (bytes + 63) & ~(size_t)63 : 64);
}
static void host_release(const compute_ops *self, void *p, int kind) { free(p); }
static void host_copy(const compute_ops *self, void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src) memmove(dst, src, bytes);
}
static void host_zero(const compute_ops *self, void *p, size_t bytes) {
    if (bytes) memset(p, 0, bytes);
}
static void host_sync(const compute_ops *self) {}
static int host_failed(const compute_ops *self, char *msg, size_t len) { return 0; }
static int host_has_nonfinite(const compute_ops *self, const float *x, size_t n) { return scmoe__has_nonfinite(x, n); }

static void host_add(const compute_ops *self, float *y, const float *x, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}
static void host_broadcast_rows(const compute_ops *self, float *out, const float *b, int N, int C) {
    scmoe__broadcast_rows(out, b, N, C);
}
static void host_sum_rows(const compute_ops *self, float *acc, const float *x, int N, int C) {
    scmoe__sum_rows(acc, x, N, C);
}
static void host_activation_forward(const compute_ops *self, float *hid, float *pre, const float *b, int N, int h,
                                    scmoe_activation act) {
    scmoe__activation_forward(hid, pre, b, N, h, act);
}
static void host_activation_backward(const compute_ops *self, float *dpre, const float *dhid, const float *pre, int N,
                                     int h, scmoe_activation act) {
    scmoe__activation_backward(dpre, dhid, pre, N, h, act);
}
static void host_gate_softmax(const compute_ops *self, float *logits, float *p, float *lse, int N, int E,
                              float noise_std, uint64_t seed, uint64_t step, int64_t token_offset) {
    scmoe__gate_softmax(logits, p, lse, N, E, noise_std, seed, step, token_offset);
}
static void host_gate_topk(const compute_ops *self, int *choice, float *weight, float *score, const float *p, int N,
                           int E, int k, int renormalize) {
    scmoe__gate_topk(choice, weight, score, p, N, E, k, renormalize);
}
static void host_gate_backward_logits(const compute_ops *self, float *dlogits, const float *dweight, const int *choice,
                                      const float *p, const float *lse, const float *aux_coef, float z_coef, int N,
                                      int E, int k, int renormalize) {
    scmoe__gate_backward_logits(dlogits, dweight, choice, p, lse, aux_coef, z_coef, N, E, k, renormalize);
}
static void host_permute_rows(const compute_ops *self, float *dst, const float *src, const int *map, int n, int d,
                              int scatter) {
    scmoe__permute_rows(dst, src, map, n, d, scatter);
}
static void host_pack_rows(const compute_ops *self, float *send, const float *x, const int *slot, int n, int k, int d) {
    scmoe__pack_rows(send, x, slot, n, k, d);
}
static void host_decode_rows(const compute_ops *self, float *y, float beta, const float *rows, const int *slot,
                             const float *weight, int n, int k, int d) {
    scmoe__decode_rows(y, beta, rows, slot, weight, n, k, d);
}
static void host_decode_rows_backward(const compute_ops *self, float *grows, float *dweight, const float *dy,
                                      const float *rows, const int *slot, const float *weight, int n, int k, int d) {
    scmoe__decode_rows_backward(grows, dweight, dy, rows, slot, weight, n, k, d);
}
static void host_layernorm_forward(const compute_ops *self, float *out, float *mean, float *rstd, const float *x,
                                   const float *w, const float *b, int N, int C) {
    scmoe__layernorm_forward(out, mean, rstd, x, w, b, N, C);
}
static void host_layernorm_backward(const compute_ops *self, float *dx, float *dw, float *db, const float *dy,
                                    const float *x, const float *w, const float *mean, const float *rstd, int N,
                                    int C) {
    scmoe__layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, N, C);
}
static void host_attention_forward(const compute_ops *self, const exec *ex, float *out, float *att, const float *qkv,
                                   int B, int T, int d, int H, int causal) {
    scmoe__attention_forward(ex, out, att, qkv, B, T, d, H, causal);
}
static void host_attention_backward(const compute_ops *self, const exec *ex, float *dqkv, float *datt,
                                    const float *dout, const float *qkv, const float *att, int B, int T, int d, int H,
                                    int causal) {
    scmoe__attention_backward(ex, dqkv, datt, dout, qkv, att, B, T, d, H, causal);
}
static void host_cg_combine_forward(const compute_ops *self, float *y, float *cgate, const float *a, const float *s,
                                    const float *m, const float *wcg, int n, int d) {
    scmoe__cg_combine_forward(y, cgate, a, s, m, wcg, n, d);
}
static void host_cg_combine_backward(const compute_ops *self, float *ds, float *dz, const float *dy, const float *s,
                                     const float *cgate, int n, int d) {
    scmoe__cg_combine_backward(ds, dz, dy, s, cgate, n, d);
}
static void host_add_outer(const compute_ops *self, float *out, const float *u, const float *v, int n, int d) {
    scmoe__add_outer(out, u, v, n, d);
}
static void host_prefetch_wait(const compute_ops *self) {}
static void host_bf16_pack(const compute_ops *self, uint16_t *dst, const float *src, size_t n) {
    scmoe__bf16_pack(dst, src, n);
}
static void host_bf16_unpack(const compute_ops *self, float *dst, const uint16_t *src, size_t n) {
    scmoe__bf16_unpack(dst, src, n);
}

static const compute_ops host_ops = {
    .name = "host",
    .device = 0,
    .exchange_kind = COMPUTE_MAPPED,
    .alloc = host_alloc,
    .release = host_release,
    .copy = host_copy,
    .copy_rows = host_copy,
    .zero = host_zero,
    .sync = host_sync,
    .failed = host_failed,
    .has_nonfinite = host_has_nonfinite,
    .add = host_add,
    .broadcast_rows = host_broadcast_rows,
    .sum_rows = host_sum_rows,
    .activation_forward = host_activation_forward,
    .activation_backward = host_activation_backward,
    .gate_softmax = host_gate_softmax,
    .gate_topk = host_gate_topk,
    .gate_backward_logits = host_gate_backward_logits,
    .permute_rows = host_permute_rows,
    .pack_rows = host_pack_rows,
    .decode_rows = host_decode_rows,
    .decode_rows_backward = host_decode_rows_backward,
    .layernorm_forward = host_layernorm_forward,
    .layernorm_backward = host_layernorm_backward,
    .attention_forward = host_attention_forward,
    .attention_backward = host_attention_backward,
    .cg_combine_forward = host_cg_combine_forward,
    .cg_combine_backward = host_cg_combine_backward,
    .add_outer = host_add_outer,
    .prefetch = host_copy,
    .prefetch_wait = host_prefetch_wait,
    .bf16_pack = host_bf16_pack,
    .bf16_unpack = host_bf16_unpack,
};

const compute_ops *scmoe__compute_host(void) { return &host_ops; }
