/* minimal_pair.c: a ScMoE block pair under a host's own output head W, trained by the host's own AdamW
 * on a toy regression, L = mean (pair(x) W - t)^2: the host owns W, the loop and the optimizer state;
 * the pair owns its blocks (residuals included) and hands out its tensors and gradients.
 * One rank, no MPI. Build lines (pkg-config, static, the single-file drop-in): README, "Using it from C". */
#ifdef SCMOE_DROP_IN
#define SCMOE_IMPLEMENTATION
#include "scmoe_all.h"
#else
#include "scmoe.h"
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { B = 4, T = 16, N = B * T, D = 32, STEPS = 200 };

/* AdamW (betas 0.9, 0.999, weight decay 0.01) at step t >= 1; m, v: the host's state for p */
static void adamw(float *p, const float *g, float *m, float *v, size_t n, int t, float lr) {
    float c1 = 1 - powf(0.9f, (float)t), c2 = 1 - powf(0.999f, (float)t);
    for (size_t j = 0; j < n; j++) {
        m[j] = 0.9f * m[j] + 0.1f * g[j];
        v[j] = 0.999f * v[j] + 0.001f * g[j] * g[j];
        p[j] -= lr * (m[j] / c1 / (sqrtf(v[j] / c2) + 1e-8f) + 0.01f * p[j]);
    }
}

int main(void) {
    scmoe_context *ctx;
    if (scmoe_context_create(&ctx) != SCMOE_OK) return 1;
    scmoe_config cfg = scmoe_config_default(); /* arch SCMOE, shortcut position 2 */
    cfg.d_model = D;
    cfg.d_hidden = 64;
    cfg.n_experts = 4;
    cfg.n_heads = 4;
    cfg.max_tokens = N;
    cfg.max_seq_len = T;
    scmoe_pair *pair;
    if (scmoe_pair_create(ctx, &cfg, &pair) != SCMOE_OK) {
        fprintf(stderr, "%s\n", scmoe_last_error(ctx));
        return 1;
    }
    int e0, ne, np = scmoe_pair_param_count(pair);
    scmoe_pair_expert_range(pair, &e0, &ne);
    printf("this rank holds experts %d..%d of %d\n", e0, e0 + ne - 1, cfg.n_experts);
    static float x[N * D], y[N * D], t[N * D], W[D * D], dW[D * D], g[N * D], dy[N * D], dx[N * D];
    float **m = calloc((size_t)np + 1, sizeof *m), **v = calloc((size_t)np + 1, sizeof *v);
    for (int i = 0; i <= np; i++) { /* tensor np is the host's W */
        scmoe_tensor p = {.numel = D * D};
        if (i < np) scmoe_pair_param_at(pair, i, &p);
        m[i] = calloc(p.numel, sizeof(float)), v[i] = calloc(p.numel, sizeof(float));
    }
    for (int i = 0; i < N * D; i++) x[i] = sinf(0.11f * i), t[i] = cosf(0.05f * i) * sinf(0.11f * ((i + 5) % (N * D)));
    for (int i = 0; i < D * D; i++) W[i] = i % (D + 1) == 0; /* identity */
    double first = 0, loss = 0;
    for (int step = 1; step <= STEPS; step++) {
        scmoe_pair_zero_grad(pair);
        if (scmoe_pair_forward(pair, B, T, x, y, NULL) != SCMOE_OK) return 1;
        loss = 0;
        for (int r = 0; r < N; r++) /* the head: o = y W; g = dL/do */
            for (int c = 0; c < D; c++) {
                float o = 0;
                for (int k = 0; k < D; k++) o += y[r * D + k] * W[k * D + c];
                loss += (o - t[r * D + c]) * (o - t[r * D + c]) / (N * D);
                g[r * D + c] = 2 * (o - t[r * D + c]) / (N * D);
            }
        if (step == 1) first = loss;
        for (int k = 0; k < D; k++) /* dW = y^T g */
            for (int c = 0; c < D; c++) {
                dW[k * D + c] = 0;
                for (int r = 0; r < N; r++) dW[k * D + c] += y[r * D + k] * g[r * D + c];
            }
        for (int r = 0; r < N; r++) /* dy = g W^T */
            for (int k = 0; k < D; k++) {
                dy[r * D + k] = 0;
                for (int c = 0; c < D; c++) dy[r * D + k] += g[r * D + c] * W[k * D + c];
            }
        if (scmoe_pair_backward(pair, dy, dx, NULL) != SCMOE_OK) return 1;
        for (int i = 0; i < np; i++) {
            scmoe_tensor p;
            scmoe_pair_param_at(pair, i, &p);
            adamw(p.data, p.grad, m[i], v[i], p.numel, step, 3e-3f);
        }
        adamw(W, dW, m[np], v[np], D * D, step, 3e-3f);
        if (step % 50 == 0) printf("step %3d  loss %.5f\n", step, loss);
    }
    printf("loss %.5f -> %.5f\n", first, loss);
    for (int i = 0; i <= np; i++) free(m[i]), free(v[i]);
    free(m), free(v);
    scmoe_pair_destroy(pair);
    scmoe_context_destroy(ctx);
    return loss < 0.5 * first ? 0 : 1; /* the host's loop trained the pair */
}
