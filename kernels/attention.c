/* attention.c: multi-head scaled dot-product attention over qkv = [B*T, 3d] (columns q | k | v, head
 * h owning columns h*hd .. h*hd+hd-1 of each), hd = d / H.
 *
 *   S = Q K^T / sqrt(hd),  S[i,j] = -inf for j > i when causal,  P = softmax_rows(S),  O = P V
 * Backward:
 *   dV = P^T dO,  dP = dO V^T,  dS = P . (dP - rowsum(dP . P)),  dQ = dS K / sqrt(hd),  dK = dS^T Q / sqrt(hd)
 * One (batch, head) is one task: its GEMMs run single-threaded inside the parallel loop, and every
 * task writes its own slice, so results do not depend on the thread count. */
#include "kernels.h"
#include <float.h>
#include <math.h>

void scmoe__attention_forward(const exec *ex, float *out, float *att, const float *qkv, int B, int T, int d, int H,
                              int causal) {
    int hd = d / H, ld = 3 * d;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *q = qkv + (long)b * T * ld + h * hd, *k = q + d, *v = q + 2 * d;
        float *P = att + (long)bh * T * T;
        scmoe__exec_gemm_one(ex, 0, 1, T, T, hd, scale, q, ld, k, ld, 0.0f, P, T);
        for (int i = 0; i < T; i++) {
            float *row = P + (long)i * T;
            int n = causal ? i + 1 : T;
            float mx = -FLT_MAX, s = 0.0f;
            for (int j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
            for (int j = 0; j < n; j++) {
                row[j] = expf(row[j] - mx);
                s += row[j];
            }
            for (int j = 0; j < n; j++) row[j] /= s;
            for (int j = n; j < T; j++) row[j] = 0.0f;
        }
        scmoe__exec_gemm_one(ex, 0, 0, T, hd, T, 1.0f, P, T, v, ld, 0.0f, out + (long)b * T * d + h * hd, d);
        scmoe__exec_poll(ex);
    }
}

void scmoe__attention_backward(const exec *ex, float *dqkv, float *datt, const float *dout, const float *qkv,
                               const float *att, int B, int T, int d, int H, int causal) {
    (void)causal; /* masked entries of P are 0, so their gradients vanish on their own */
    int hd = d / H, ld = 3 * d;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *q = qkv + (long)b * T * ld + h * hd, *k = q + d, *v = q + 2 * d;
        float *dq = dqkv + (long)b * T * ld + h * hd, *dk = dq + d, *dv = dq + 2 * d;
        const float *P = att + (long)bh * T * T, *dO = dout + (long)b * T * d + h * hd;
        float *dS = datt + (long)bh * T * T;
        scmoe__exec_gemm_one(ex, 1, 0, T, hd, T, 1.0f, P, T, dO, d, 0.0f, dv, ld);
        scmoe__exec_gemm_one(ex, 0, 1, T, T, hd, 1.0f, dO, d, v, ld, 0.0f, dS, T);
        for (int i = 0; i < T; i++) {
            const float *pr = P + (long)i * T;
            float *dr = dS + (long)i * T, dot = 0.0f;
            for (int j = 0; j < T; j++) dot += pr[j] * dr[j];
            for (int j = 0; j < T; j++) dr[j] = pr[j] * (dr[j] - dot);
        }
        scmoe__exec_gemm_one(ex, 0, 0, T, hd, T, scale, dS, T, k, ld, 0.0f, dq, ld);
        scmoe__exec_gemm_one(ex, 1, 0, T, hd, T, scale, dS, T, q, ld, 0.0f, dk, ld);
        scmoe__exec_poll(ex);
    }
}
