/* ops.h: the composite ops, one level above kernels/: each runs GEMMs through an exec (tiled, polling
 * MPI between tiles) and kernels through the exec's compute table, so one op runs on any backend.
 * kernels/ holds only leaves (the compute table's entries and the exec's GEMM); nothing there calls
 * back up here. */
#ifndef SCMOE_OPS_H
#define SCMOE_OPS_H

#include "kernels/kernels.h"

/* the compute table an op runs its kernels through: the exec's, or the host's */
static inline const compute_ops *exec_compute(const exec *ex) {
    return ex->compute ? ex->compute : scmoe__compute_host();
}

/* ffn.c: out = act(x W1 + b1) W2 + b2; pre [N, scmoe__ffn_width(h)], hid [N, h] kept for backward,
 * which accumulates (+=) dW1, db1, dW2, db2 and sets dx = dpre W1^T + beta_dx * dx */
void scmoe__ffn_forward(const exec *ex, float *out, float *pre, float *hid, const float *x, const float *w1,
                        const float *b1, const float *w2, const float *b2, int N, int d, int h, scmoe_activation act);
void scmoe__ffn_backward(const exec *ex, float *dx, float beta_dx, float *dw1, float *db1, float *dw2, float *db2,
                         float *dhid, float *dpre, const float *dout, const float *x, const float *pre,
                         const float *hid, const float *w1, const float *w2, int N, int d, int h, scmoe_activation act);

/* router.c: logits = x Wg, then scmoe__gate_softmax (logits [N, E], p [N, E], lse [N]) */
void scmoe__gate_forward(const exec *ex, float *logits, float *p, float *lse, const float *x, const float *wg, int N,
                         int d, int E, float noise_std, uint64_t seed, uint64_t step, int64_t token_offset);
/* dweight [N, k] = dL/dweight; aux_coef [E] = dL/dp[s, e] from the aux loss (NULL: none);
 * z_coef = w_z / S. dlogits [N, E] is scratch. dWg += x^T dlogits, dx = dlogits Wg^T + beta_dx * dx. */
void scmoe__gate_backward(const exec *ex, float *dx, float beta_dx, float *dwg, float *dlogits, const float *dweight,
                          const int *choice, const float *p, const float *lse, const float *x, const float *wg,
                          const float *aux_coef, float z_coef, int N, int d, int E, int k, int renormalize);

#endif
