/* layernorm.c: LayerNorm over the last dimension, per token row.
 *
 *   mean = (1/C) sum_c x_c,   rstd = 1 / sqrt((1/C) sum_c (x_c - mean)^2 + 1e-5)
 *   xhat = (x - mean) * rstd, y = w * xhat + b
 *
 * Backward, with g = w * dy:
 *   dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)),  dw += scmoe__sum_rows dy * xhat,  db += scmoe__sum_rows dy
 * Parameter gradients sum rows in a fixed order (columns in parallel), so they are deterministic. */
#include "kernels.h"
#include <math.h>

SCMOE_SIMD_CLONES
void scmoe__layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                              int N, int C) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float *xi = x + (long)i * C;
        float m = 0.0f;
        for (int c = 0; c < C; c++) m += xi[c];
        m /= C;
        float v = 0.0f;
        for (int c = 0; c < C; c++) {
            float t = xi[c] - m;
            v += t * t;
        }
        v /= C;
        float s = 1.0f / sqrtf(v + 1e-5f);
        float *oi = out + (long)i * C;
        for (int c = 0; c < C; c++) oi[c] = (xi[c] - m) * s * w[c] + b[c];
        mean[i] = m;
        rstd[i] = s;
    }
}

SCMOE_SIMD_CLONES
void scmoe__layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w,
                               const float *mean, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float *dyi = dy + (long)i * C, *xi = x + (long)i * C;
        float m = mean[i], s = rstd[i];
        float gmean = 0.0f, gxmean = 0.0f;
        for (int c = 0; c < C; c++) {
            float g = w[c] * dyi[c];
            gmean += g;
            gxmean += g * (xi[c] - m) * s;
        }
        gmean /= C;
        gxmean /= C;
        float *dxi = dx + (long)i * C;
        for (int c = 0; c < C; c++) {
            float xhat = (xi[c] - m) * s;
            dxi[c] += s * (w[c] * dyi[c] - gmean - xhat * gxmean);
        }
    }
    /* columns in blocks so each thread streams whole rows of its block */
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += 32) {
        int c1 = c0 + 32 < C ? c0 + 32 : C;
        float sw[32] = {0}, sb[32] = {0};
        for (int i = 0; i < N; i++) {
            const float *dyi = dy + (long)i * C, *xi = x + (long)i * C;
            for (int c = c0; c < c1; c++) {
                sw[c - c0] += dyi[c] * (xi[c] - mean[i]) * rstd[i];
                sb[c - c0] += dyi[c];
            }
        }
        for (int c = c0; c < c1; c++) {
            dw[c] += sw[c - c0];
            db[c] += sb[c - c0];
        }
    }
}
