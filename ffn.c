/* ffn.c: the feed-forward network used by the dense MLP, the shared expert and every routed expert,
 * as one op: its GEMMs through the exec (tiled, polling MPI between tiles) and its elementwise kernels
 * (kernels/activation.c) through the exec's compute table, so it runs on any backend.
 *
 *   GELU:    pre = x W1 + b1 (W1: d x h),   hid = gelu(pre),          out = hid W2 + b2 (W2: h x d)
 *   SwiGLU:  pre = x W1 + b1 (W1: d x 2h),  hid = silu(pre[:, :h]) * pre[:, h:],   out = hid W2 + b2
 *
 * Backward: dhid = dout W2^T, dW2 += hid^T dout, db2 += sum_rows dout, dpre = act'(pre) . dhid,
 *           dW1 += x^T dpre, db1 += sum_rows dpre, dx = dpre W1^T (+ beta dx). */
#include "ops.h"

void scmoe__ffn_forward(const exec *ex, float *out, float *pre, float *hid, const float *x, const float *w1,
                        const float *b1, const float *w2, const float *b2, int N, int d, int h, scmoe_activation act) {
    if (N <= 0) return;
    int h1 = scmoe__ffn_width(h, act);
    const compute_ops *co = exec_compute(ex);
    scmoe__exec_gemm(ex, 0, 0, N, h1, d, 1.0f, x, d, w1, h1, 0.0f, pre, h1);
    co->activation_forward(co, hid, pre, b1, N, h, act);
    co->broadcast_rows(co, out, b2, N, d);
    scmoe__exec_gemm(ex, 0, 0, N, d, h, 1.0f, hid, h, w2, d, 1.0f, out, d);
}

void scmoe__ffn_backward(const exec *ex, float *dx, float beta_dx, float *dw1, float *db1, float *dw2, float *db2,
                         float *dhid, float *dpre, const float *dout, const float *x, const float *pre,
                         const float *hid, const float *w1, const float *w2, int N, int d, int h,
                         scmoe_activation act) {
    if (N <= 0) return;
    int h1 = scmoe__ffn_width(h, act);
    const compute_ops *co = exec_compute(ex);
    scmoe__exec_gemm(ex, 0, 1, N, h, d, 1.0f, dout, d, w2, d, 0.0f, dhid, h);
    scmoe__exec_gemm(ex, 1, 0, h, d, N, 1.0f, hid, h, dout, d, 1.0f, dw2, d);
    co->sum_rows(co, db2, dout, N, d);
    co->activation_backward(co, dpre, dhid, pre, N, h, act);
    scmoe__exec_gemm(ex, 1, 0, d, h1, N, 1.0f, x, d, dpre, h1, 1.0f, dw1, h1);
    co->sum_rows(co, db1, dpre, N, h1);
    scmoe__exec_gemm(ex, 0, 1, N, d, h1, 1.0f, dpre, h1, w1, h1, beta_dx, dx, d);
}
