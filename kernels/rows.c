/* rows.c: the MoE's row moves, between a token's row and the rows of the experts it was routed to.
 * slot [n, k] is the route plan's: slot[t, j] = the row of token t's j-th choice in the send layout,
 * -1 when its expert was full (dropped).
 *
 *   pack      send[slot[t, j]] = x[t]
 *   permute   scatter dst[map[r]] = src[r], or gather dst[r] = src[map[r]] (the receive layout to the
 *             expert-major layout and back)
 *   decode    y[t] = beta y[t] + sum_j w[t, j] rows[slot[t, j]]   (w NULL: all 1, the gate's dx)
 *   backward  grows[slot[t, j]] = w[t, j] dy[t],  dw[t, j] = dy[t] . rows[slot[t, j]]  (0 when dropped) */
#include "kernels.h"
#include <string.h>

void scmoe__pack_rows(float *send, const float *x, const int *slot, int n, int k, int d) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int s = slot[(size_t)t * k + j];
            if (s >= 0) memcpy(send + (size_t)s * d, x + (size_t)t * d, sizeof(float) * d);
        }
}

void scmoe__permute_rows(float *dst, const float *src, const int *map, int n, int d, int scatter) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) {
        size_t to = scatter ? (size_t)map[r] : (size_t)r, from = scatter ? (size_t)r : (size_t)map[r];
        memcpy(dst + to * d, src + from * d, sizeof(float) * d);
    }
}

void scmoe__decode_rows(float *y, float beta, const float *rows, const int *slot, const float *weight, int n, int k,
                        int d) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; t++) {
        float *yt = y + (size_t)t * d;
        if (beta == 0.0f) memset(yt, 0, sizeof(float) * d);
        else if (beta != 1.0f)
            for (int c = 0; c < d; c++) yt[c] *= beta;
        for (int j = 0; j < k; j++) {
            int s = slot[(size_t)t * k + j];
            if (s < 0) continue;
            float w = weight ? weight[(size_t)t * k + j] : 1.0f;
            const float *r = rows + (size_t)s * d;
            if (weight)
                for (int c = 0; c < d; c++) yt[c] += w * r[c];
            else
                for (int c = 0; c < d; c++) yt[c] += r[c];
        }
    }
}

void scmoe__decode_rows_backward(float *grows, float *dweight, const float *dy, const float *rows, const int *slot,
                                 const float *weight, int n, int k, int d) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; t++) {
        const float *dyt = dy + (size_t)t * d;
        for (int j = 0; j < k; j++) {
            size_t a = (size_t)t * k + j;
            int s = slot[a];
            if (s < 0) {
                dweight[a] = 0.0f;
                continue;
            }
            const float *r = rows + (size_t)s * d;
            float *g = grows + (size_t)s * d, w = weight[a], dot = 0.0f;
            for (int c = 0; c < d; c++) {
                dot += dyt[c] * r[c];
                g[c] = w * dyt[c];
            }
            dweight[a] = dot;
        }
    }
}
