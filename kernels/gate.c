/* gate.c: the router's kernels (Tutel semantics); its GEMMs are router.c's, one level up.
 *
 *   logits = x Wg (Wg: d x E)  [+ noise_std * N(0,1) / E while training]
 *   p = softmax(logits) over all E experts;   top-k experts by p (ties: lower index)
 *   weights: k = 1 -> p_top1 (raw, so the gate learns from the task loss);
 *            k > 1 -> p_j / max(sum_topk p, eps) when renormalising, else p_j
 *   aux  = E * sum_e mean_s(p[s,e]) * frac_s(top1(s) == e)          (GShard)
 *   z    = mean_s(logsumexp(logits_s)^2)                           (router z-loss)
 *
 * The per-token math (noise, softmax, top-k) is in gate_row.h, shared with the CUDA kernels. */
#include "kernels.h"
#include "gate_row.h"
#include <float.h>
#include <math.h>

void scmoe__gate_softmax(float *logits, float *p, float *lse, int N, int E, float noise_std, uint64_t seed,
                         uint64_t step, int64_t token_offset) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++)
        gate_softmax_row(logits + (long)i * E, p + (long)i * E, lse + i, E, noise_std, seed, step, token_offset + i);
}

void scmoe__gate_topk(int *choice, float *weight, float *score, const float *p, int N, int E, int k, int renormalize) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++)
        gate_topk_row(choice + (long)i * k, weight + (long)i * k, score + i, p + (long)i * E, E, k, renormalize);
}

/* dL/dp for one token from dL/dweight, through the (optional) renormalisation:
 *   w_j = p_j / s, s = sum_q p_q  ->  dp_j = dw_j / s - (sum_q dw_q p_q) / s^2 */
static void weight_backward(float *dp, const float *dw, const int *c, const float *p, int k, int renormalize) {
    if (k > 1 && renormalize) {
        float s = 0.0f, dot = 0.0f;
        for (int j = 0; j < k; j++) {
            s += p[c[j]];
            dot += dw[j] * p[c[j]];
        }
        int clamped = s <= FLT_EPSILON;
        s = clamped ? FLT_EPSILON : s;
        for (int j = 0; j < k; j++) dp[c[j]] += dw[j] / s - (clamped ? 0.0f : dot / (s * s));
    } else {
        for (int j = 0; j < k; j++) dp[c[j]] += dw[j];
    }
}

void scmoe__gate_backward_logits(float *dlogits, const float *dweight, const int *choice, const float *p,
                                 const float *lse, const float *aux_coef, float z_coef, int N, int E, int k,
                                 int renormalize) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float *pi = p + (long)i * E;
        float *dl = dlogits + (long)i * E;
        /* dl first holds dL/dp: routing weights plus the aux loss (aux_coef[e] = w_aux dl_aux/dp[s,e]) */
        for (int e = 0; e < E; e++) dl[e] = aux_coef ? aux_coef[e] : 0.0f;
        weight_backward(dl, dweight + (long)i * k, choice + (long)i * k, pi, k, renormalize);
        /* softmax: dlogit_e = p_e (dp_e - sum_q p_q dp_q); z-loss: dz/dlogit_e = z_coef * 2 lse p_e */
        float dot = 0.0f;
        for (int e = 0; e < E; e++) dot += pi[e] * dl[e];
        for (int e = 0; e < E; e++) dl[e] = pi[e] * (dl[e] - dot) + z_coef * 2.0f * lse[i] * pi[e];
    }
}
