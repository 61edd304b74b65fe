/* minimal_moe.c: two MoE layers inside a host's own residual stack, x_{l+1} = x_l + moe_l(x_l),
 * trained by the host's own optimizer (SGD with momentum) to fit a fixed target: L = mean (x_2 - t)^2.
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

enum { L = 2, N = 64, D = 32, STEPS = 300 };

int main(void) {
    scmoe_context *ctx;
    if (scmoe_context_create(&ctx) != SCMOE_OK) return 1;
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = D;
    cfg.d_hidden = 64;
    cfg.n_experts = 4;
    cfg.top_k = 2;
    cfg.max_tokens = N;
    scmoe_moe *layer[L];
    float *mom[L][64]; /* the host's optimizer state: a momentum buffer per tensor */
    for (int l = 0; l < L; l++) {
        cfg.seed = 100 + l;
        if (scmoe_moe_create(ctx, &cfg, &layer[l]) != SCMOE_OK) {
            fprintf(stderr, "%s\n", scmoe_last_error(ctx));
            return 1;
        }
        char prefix[32];
        snprintf(prefix, sizeof prefix, "layers.%d.moe.", l); /* names in the host's own name space */
        scmoe_moe_set_name_prefix(layer[l], prefix);
        for (int i = 0; i < scmoe_moe_param_count(layer[l]); i++) {
            scmoe_tensor t;
            scmoe_moe_param_at(layer[l], i, &t);
            mom[l][i] = calloc(t.numel, sizeof(float));
        }
    }
    static float x[L + 1][N * D], y[N * D], t[N * D], g[N * D], dx[N * D];
    for (int i = 0; i < N * D; i++) {
        x[0][i] = sinf(0.37f * (float)i);
        t[i] = x[0][i] + 0.5f * cosf(1.3f * x[0][(i * 7) % (N * D)]); /* a nonlinear map to learn */
    }
    double first = 0, loss = 0;
    for (int step = 0; step < STEPS; step++) {
        for (int l = 0; l < L; l++) { /* an aux-weight schedule: strong balancing early, then weaker */
            scmoe_moe_set_loss_weights(layer[l], step < STEPS / 2 ? 0.01f : 0.001f, 0.0f);
            scmoe_moe_zero_grad(layer[l]);
        }
        for (int l = 0; l < L; l++) { /* forward: the residual is the host's */
            if (scmoe_moe_forward(layer[l], N, x[l], y, NULL) != SCMOE_OK) return 1;
            for (int i = 0; i < N * D; i++) x[l + 1][i] = x[l][i] + y[i];
        }
        loss = 0;
        for (int i = 0; i < N * D; i++) {
            float e = x[L][i] - t[i];
            loss += e * e / (N * D);
            g[i] = 2.0f * e / (N * D); /* dL/dx_L */
        }
        if (step == 0) first = loss;
        for (int l = L - 1; l >= 0; l--) { /* dL/dx_l = g + moe_l'(x_l)^T g */
            if (scmoe_moe_backward(layer[l], g, dx, NULL) != SCMOE_OK) return 1;
            for (int i = 0; i < N * D; i++) g[i] += dx[i];
        }
        for (int l = 0; l < L; l++) /* the host's SGD with momentum 0.9, lr 0.05 */
            for (int i = 0; i < scmoe_moe_param_count(layer[l]); i++) {
                scmoe_tensor p;
                scmoe_moe_param_at(layer[l], i, &p);
                for (size_t j = 0; j < p.numel; j++) {
                    mom[l][i][j] = 0.9f * mom[l][i][j] + p.grad[j];
                    p.data[j] -= 0.05f * mom[l][i][j];
                }
            }
        if (step % 100 == 0 || step == STEPS - 1) printf("step %3d  loss %.5f\n", step, loss);
    }
    scmoe_tensor w;
    scmoe_moe_param_at(layer[1], 0, &w);
    printf("%s: loss %.5f -> %.5f\n", w.name, first, loss);
    for (int l = 0; l < L; l++) {
        for (int i = 0; i < scmoe_moe_param_count(layer[l]); i++) free(mom[l][i]);
        scmoe_moe_destroy(layer[l]);
    }
    scmoe_context_destroy(ctx);
    return loss < 0.5 * first ? 0 : 1; /* the host's loop trained the layers */
}
