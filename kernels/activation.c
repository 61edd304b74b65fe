/* activation.c: the elementwise and row-sum kernels of the feed-forward network (the GEMMs around
 * them are ffn.c's, one level up):
 *
 *   GELU:    hid = gelu(pre),                    pre [N, h]
 *   SwiGLU:  hid = silu(pre[:, :h]) * pre[:, h:], pre [N, 2h]
 *   gelu(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))),  silu(z) = z sigmoid(z)
 * and the bias's forward (scmoe__broadcast_rows) and backward (scmoe__sum_rows). The elementwise passes
 * are written to vectorize (exp_fast, omp simd): with scalar tanhf they cost as much as the GEMMs
 * (bench/bench_experts). */
#include "kernels.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GELU_S 0.7978845608028654f /* sqrt(2/pi) */

/* e^x without a library call, so the activation loops vectorize: x = n ln2 + r with n integral and
 * |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its degree-6 Taylor polynomial (relative error
 * ~1e-7), 2^n built in the exponent bits. The clamps keep 2^n a normal float; the upper one is
 * +40 rather than +88 because both sides of every select are computed for all lanes. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 40.0f ? 40.0f : x;
    /* adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits: n without a float-to-int
     * conversion, which a NaN would make undefined (a NaN just stays NaN through p) */
    union {
        float f;
        int32_t i;
    } m = {.f = x * 1.44269504088896341f + 12582912.0f};
    float n = m.f - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-6f;
    float p =
        1.0f +
        r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f + r * (0.00833345205f + r * 0.00138888637f)))));
    union {
        int32_t i;
        float f;
    } two_n = {.i = (int32_t)((uint32_t)(m.i - 0x4B400000 + 127) << 23)};
    return p * two_n.f;
}

/* acc[c] += sum_i x[i, c]. Threads take blocks of 512 columns and stream whole row segments; each
 * column is summed over rows in order, so the result does not depend on the thread count. */
SCMOE_SIMD_CLONES
void scmoe__sum_rows(float *acc, const float *x, int N, int C) {
    enum { W = 512 };
    int blocks = (C + W - 1) / W;
#pragma omp parallel for schedule(static)
    for (int bk = 0; bk < blocks; bk++) {
        int c0 = bk * W, c1 = c0 + W < C ? c0 + W : C;
        float s[W] = {0};
        for (int i = 0; i < N; i++) {
            const float *xi = x + (size_t)i * C;
#pragma omp simd
            for (int c = c0; c < c1; c++) s[c - c0] += xi[c];
        }
        for (int c = c0; c < c1; c++) acc[c] += s[c - c0];
    }
}

void scmoe__broadcast_rows(float *out, const float *b, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) memcpy(out + (size_t)i * C, b, sizeof(float) * C);
}

/* pre += b (when b is given), then hid = act(pre); gelu(z) = 0.5 z (1 + tanh u) = z sigmoid(2u). */
SCMOE_SIMD_CLONES
void scmoe__activation_forward(float *hid, float *pre, const float *b, int N, int h, scmoe_activation act) {
    int h1 = scmoe__ffn_width(h, act);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float *p = pre + (size_t)i * h1, *o = hid + (size_t)i * h;
        if (b) {
#pragma omp simd
            for (int j = 0; j < h1; j++) p[j] += b[j];
        }
        if (act == SCMOE_GELU) {
#pragma omp simd
            for (int j = 0; j < h; j++) {
                float z = p[j], u = GELU_S * (z + 0.044715f * z * z * z);
                o[j] = z / (1.0f + exp_fast(-2.0f * u));
            }
        } else {
            const float *g = p, *u = p + h;
#pragma omp simd
            for (int j = 0; j < h; j++) o[j] = g[j] / (1.0f + exp_fast(-g[j])) * u[j];
        }
    }
}

/* With s = sigmoid(2u): gelu'(z) = s + 2 z s (1 - s) u'(z), u'(z) = sqrt(2/pi) (1 + 3 * 0.044715 z^2);
 * silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g). */
SCMOE_SIMD_CLONES
void scmoe__activation_backward(float *dpre, const float *dhid, const float *pre, int N, int h, scmoe_activation act) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float *dh = dhid + (size_t)i * h;
        if (act == SCMOE_GELU) {
            const float *p = pre + (size_t)i * h;
            float *dp = dpre + (size_t)i * h;
#pragma omp simd
            for (int j = 0; j < h; j++) {
                float z = p[j], u = GELU_S * (z + 0.044715f * z * z * z), sg = 1.0f / (1.0f + exp_fast(-2.0f * u));
                dp[j] = dh[j] * (sg + 2.0f * z * sg * (1.0f - sg) * GELU_S * (1.0f + 3.0f * 0.044715f * z * z));
            }
        } else {
            const float *g = pre + (size_t)i * 2 * h, *u = g + h;
            float *dg = dpre + (size_t)i * 2 * h, *du = dg + h;
#pragma omp simd
            for (int j = 0; j < h; j++) {
                float sg = 1.0f / (1.0f + exp_fast(-g[j]));
                du[j] = dh[j] * g[j] * sg;
                dg[j] = dh[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
            }
        }
    }
}

int scmoe__ffn_width(int h, scmoe_activation act) { return act == SCMOE_SWIGLU ? 2 * h : h; }
