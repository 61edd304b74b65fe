/* gate.c: the router (Tutel semantics).
 *
 *   logits = x Wg (Wg: d x E)  [+ noise_std * N(0,1) / E while training]
 *   p = softmax(logits) over all E experts;   top-k experts by p (ties: lower index)
 *   weights: k = 1 -> p_top1 (raw, so the gate learns from the task loss);
 *            k > 1 -> p_j / max(sum_topk p, eps) when renormalising, else p_j
 *   aux  = E * sum_e mean_s(p[s,e]) * frac_s(top1(s) == e)          (GShard)
 *   z    = mean_s(logsumexp(logits_s)^2)                           (router z-loss)
 *
 * The noise is a counter-based hash of (seed, step, global token index, expert), so a token gets the
 * same noise whatever rank holds it and whatever the thread count. */
#include "kernels.h"
#include <float.h>
#include <math.h>

uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A standard normal from a 64-bit key (Box-Muller on two 32-bit halves of its hash). */
float normal_from_key(uint64_t key) {
    uint64_t r = mix64(key);
    double u1 = ((double)(r >> 40) + 0.5) / 16777216.0; /* (0,1) from 24 bits */
    double u2 = (double)((r >> 16) & 0xFFFFFF) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void gate_softmax(float *logits, float *p, float *lse, int N, int E, float noise_std, uint64_t seed, uint64_t step,
                  int64_t token_offset) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float *l = logits + (long)i * E, *pi = p + (long)i * E;
        if (noise_std > 0.0f) {
            uint64_t key = mix64(mix64(seed ^ 0x6E6F697365ull) + step) ^ mix64((uint64_t)(token_offset + i));
            for (int e = 0; e < E; e++) l[e] += noise_std * normal_from_key(key + (uint64_t)e * 0x9E3779B9ull) / E;
        }
        float mx = -FLT_MAX;
        for (int e = 0; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        float s = 0.0f;
        for (int e = 0; e < E; e++) { pi[e] = expf(l[e] - mx); s += pi[e]; }
        for (int e = 0; e < E; e++) pi[e] /= s;
        lse[i] = mx + logf(s);
    }
}

void gate_forward(const exec *ex, float *logits, float *p, float *lse, const float *x, const float *wg, int N,
                  int d, int E, float noise_std, uint64_t seed, uint64_t step, int64_t token_offset) {
    if (N <= 0) return;
    const compute_ops *co = exec_compute(ex);
    exec_gemm_fp32(ex, 0, 0, N, E, d, 1.0f, x, d, wg, E, 0.0f, logits, E);
    co->gate_softmax(co, logits, p, lse, N, E, noise_std, seed, step, token_offset);
}

void gate_topk(int *choice, float *weight, float *score, const float *p, int N, int E, int k, int renormalize) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float *pi = p + (long)i * E;
        int *ci = choice + (long)i * k;
        float *wi = weight + (long)i * k;
        /* one pass keeping ci sorted by p, highest first: an expert enters only if strictly above the
         * current k-th, so among equal p the lower index stays ahead (and a NaN never displaces) */
        int have = 0;
        for (int e = 0; e < E; e++) {
            if (have == k && !(pi[e] > pi[ci[k - 1]])) continue;
            int pos = have < k ? have++ : k - 1;
            while (pos > 0 && pi[e] > pi[ci[pos - 1]]) { ci[pos] = ci[pos - 1]; pos--; }
            ci[pos] = e;
        }
        for (int j = 0; j < k; j++) wi[j] = pi[ci[j]];
        score[i] = wi[0];
        if (k > 1 && renormalize) {
            float s = 0.0f;
            for (int j = 0; j < k; j++) s += wi[j];
            s = s > FLT_EPSILON ? s : FLT_EPSILON;
            for (int j = 0; j < k; j++) wi[j] /= s;
        }
    }
}

/* dL/dp for one token from dL/dweight, through the (optional) renormalisation:
 *   w_j = p_j / s, s = sum_q p_q  ->  dp_j = dw_j / s - (sum_q dw_q p_q) / s^2 */
static void weight_backward(float *dp, const float *dw, const int *c, const float *p, int k, int renormalize) {
    if (k > 1 && renormalize) {
        float s = 0.0f, dot = 0.0f;
        for (int j = 0; j < k; j++) { s += p[c[j]]; dot += dw[j] * p[c[j]]; }
        int clamped = s <= FLT_EPSILON;
        s = clamped ? FLT_EPSILON : s;
        for (int j = 0; j < k; j++) dp[c[j]] += dw[j] / s - (clamped ? 0.0f : dot / (s * s));
    } else {
        for (int j = 0; j < k; j++) dp[c[j]] += dw[j];
    }
}

void gate_backward_logits(float *dlogits, const float *dweight, const int *choice, const float *p, const float *lse,
                          const float *aux_coef, float z_coef, int N, int E, int k, int renormalize) {
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

void gate_backward(const exec *ex, float *dx, float beta_dx, float *dwg, float *dlogits, const float *dweight,
                   const int *choice, const float *p, const float *lse, const float *x, const float *wg,
                   const float *aux_coef, float z_coef, int N, int d, int E, int k, int renormalize) {
    if (N <= 0) return;
    const compute_ops *co = exec_compute(ex);
    co->gate_backward_logits(co, dlogits, dweight, choice, p, lse, aux_coef, z_coef, N, E, k, renormalize);
    exec_gemm_fp32(ex, 1, 0, d, E, N, 1.0f, x, d, dlogits, E, 1.0f, dwg, E);
    exec_gemm_fp32(ex, 0, 1, N, d, E, 1.0f, dlogits, E, wg, E, beta_dx, dx, d);
}
