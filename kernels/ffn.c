/* ffn.c: the feed-forward network used by the dense MLP, the shared expert and every routed expert.
 *
 *   GELU:    pre = x W1 + b1 (W1: d x h),   hid = gelu(pre),          out = hid W2 + b2 (W2: h x d)
 *   SwiGLU:  pre = x W1 + b1 (W1: d x 2h),  hid = silu(pre[:, :h]) * pre[:, h:],   out = hid W2 + b2
 *   gelu(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))),  silu(z) = z sigmoid(z)
 *
 * Backward: dhid = dout W2^T, dW2 += hid^T dout, db2 += sum_rows dout, dpre = act'(pre) . dhid,
 *           dW1 += x^T dpre, db1 += sum_rows dpre, dx = dpre W1^T (+ beta dx). */
#include "kernels.h"
#include <math.h>
#include <string.h>

#define GELU_S 0.7978845608028654f /* sqrt(2/pi) */

void sum_rows(float *acc, const float *x, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += 64) {
        int c1 = c0 + 64 < C ? c0 + 64 : C;
        float s[64] = {0};
        for (int i = 0; i < N; i++) {
            const float *xi = x + (long)i * C;
            for (int c = c0; c < c1; c++) s[c - c0] += xi[c];
        }
        for (int c = c0; c < c1; c++) acc[c] += s[c - c0];
    }
}

static void broadcast_rows(float *out, const float *b, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) memcpy(out + (long)i * C, b, sizeof(float) * C);
}

void activation_forward(float *hid, const float *pre, int N, int h, scmoe_activation act) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float *o = hid + (long)i * h;
        if (act == SCMOE_GELU) {
            const float *p = pre + (long)i * h;
            for (int j = 0; j < h; j++) {
                float z = p[j];
                o[j] = 0.5f * z * (1.0f + tanhf(GELU_S * (z + 0.044715f * z * z * z)));
            }
        } else {
            const float *g = pre + (long)i * 2 * h, *u = g + h;
            for (int j = 0; j < h; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        }
    }
}

void activation_backward(float *dpre, const float *dhid, const float *pre, int N, int h, scmoe_activation act) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float *dh = dhid + (long)i * h;
        if (act == SCMOE_GELU) {
            const float *p = pre + (long)i * h;
            float *dp = dpre + (long)i * h;
            for (int j = 0; j < h; j++) {
                float z = p[j], t = tanhf(GELU_S * (z + 0.044715f * z * z * z));
                float dz = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * 0.044715f * z * z);
                dp[j] = dh[j] * dz;
            }
        } else {
            const float *g = pre + (long)i * 2 * h, *u = g + h;
            float *dg = dpre + (long)i * 2 * h, *du = dg + h;
            for (int j = 0; j < h; j++) {
                float sg = 1.0f / (1.0f + expf(-g[j])), silu = g[j] * sg;
                du[j] = dh[j] * silu;
                dg[j] = dh[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
            }
        }
    }
}

int ffn_width(int h, scmoe_activation act) { return act == SCMOE_SWIGLU ? 2 * h : h; }

void ffn_forward(const exec *ex, float *out, float *pre, float *hid, const float *x, const float *w1,
                 const float *b1, const float *w2, const float *b2, int N, int d, int h, scmoe_activation act) {
    if (N <= 0) return;
    int h1 = ffn_width(h, act);
    broadcast_rows(pre, b1, N, h1);
    exec_gemm(ex, 0, 0, N, h1, d, 1.0f, x, d, w1, h1, 1.0f, pre, h1);
    activation_forward(hid, pre, N, h, act);
    broadcast_rows(out, b2, N, d);
    exec_gemm(ex, 0, 0, N, d, h, 1.0f, hid, h, w2, d, 1.0f, out, d);
}

void ffn_backward(const exec *ex, float *dx, float beta_dx, float *dw1, float *db1, float *dw2, float *db2,
                  float *dhid, float *dpre, const float *dout, const float *x, const float *pre, const float *hid,
                  const float *w1, const float *w2, int N, int d, int h, scmoe_activation act) {
    if (N <= 0) return;
    int h1 = ffn_width(h, act);
    exec_gemm(ex, 0, 1, N, h, d, 1.0f, dout, d, w2, d, 0.0f, dhid, h);
    exec_gemm(ex, 1, 0, h, d, N, 1.0f, hid, h, dout, d, 1.0f, dw2, d);
    sum_rows(db2, dout, N, d);
    activation_backward(dpre, dhid, pre, N, h, act);
    exec_gemm(ex, 1, 0, d, h1, N, 1.0f, x, d, dpre, h1, 1.0f, dw1, h1);
    sum_rows(db1, dpre, N, h1);
    exec_gemm(ex, 0, 1, N, d, h1, 1.0f, dpre, h1, w1, h1, beta_dx, dx, d);
}
