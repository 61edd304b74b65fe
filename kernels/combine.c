/* combine.c: the shared expert's output joined to the residual stream with its gate (CG-1, the paper's
 * "shortcut-connected" combine of the shared and routed parts):
 *
 *   c_i = sigmoid(w_cg . m_i)   (1 without a gate: direct add)        y_i = a_i + c_i s_i
 * Backward, from dy:
 *   ds_i = c_i dy_i,   dz_i = (dy_i . s_i) c_i (1 - c_i),   dm_i += dz_i w_cg   (scmoe__add_outer),   dw_cg += m^T dz */
#include "kernels.h"
#include <math.h>

void scmoe__cg_combine_forward(float *y, float *cgate, const float *a, const float *s, const float *m, const float *wcg,
                               int n, int d) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float *mi = m + (size_t)i * d, *si = s + (size_t)i * d, *ai = a + (size_t)i * d;
        float c = 1.0f;
        if (wcg) {
            float z = 0.0f;
            for (int j = 0; j < d; j++) z += wcg[j] * mi[j];
            c = 1.0f / (1.0f + expf(-z));
        }
        cgate[i] = c;
        float *yi = y + (size_t)i * d;
        for (int j = 0; j < d; j++) yi[j] = ai[j] + c * si[j];
    }
}

void scmoe__cg_combine_backward(float *ds, float *dz, const float *dy, const float *s, const float *cgate, int n,
                                int d) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float *dyi = dy + (size_t)i * d, *si = s + (size_t)i * d;
        float c = cgate[i], dc = 0.0f, *g = ds + (size_t)i * d;
        for (int j = 0; j < d; j++) {
            g[j] = c * dyi[j];
            dc += dyi[j] * si[j];
        }
        dz[i] = dc * c * (1.0f - c);
    }
}

void scmoe__add_outer(float *out, const float *u, const float *v, int n, int d) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d; j++) out[(size_t)i * d + j] += u[i] * v[j];
}
