/* gate_row.h: the router's per-token math, written once for both backends: the C kernels
 * (kernels/gate.c, one token per loop iteration) and the CUDA ones (cuda_backend/kernels.cu, one token
 * per thread) include these static inline functions, so the two cannot drift apart and agree bit for
 * bit where the arithmetic is the same (no sum here is reordered by a reduction).
 *
 *   noise (training):  l_e += noise_std * N(0,1)_{seed, step, token, e} / E
 *   p = softmax(l),  lse = logsumexp(l) = max + log(sum_e exp(l_e - max))
 *   top-k: the k highest p in order; among equal p the lower expert index first
 *
 * N(0,1) is counter-based: Box-Muller on the splitmix64 hash of a key, so a token gets the same noise
 * whatever rank holds it and whatever the thread count (scmoe.c draws parameter inits the same way). */
#ifndef SCMOE_GATE_ROW_H
#define SCMOE_GATE_ROW_H

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define GATE_ROW_FN __host__ __device__ static inline
#else
#define GATE_ROW_FN static inline
#endif

/* splitmix64's finaliser: a 64-bit hash with every input bit reaching every output bit */
GATE_ROW_FN uint64_t gate_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A standard normal from a 64-bit key (Box-Muller on two 24-bit uniforms of its hash; u1 in (0,1)). */
GATE_ROW_FN float gate_normal_from_key(uint64_t key) {
    uint64_t r = gate_mix64(key);
    double u1 = ((double)(r >> 40) + 0.5) / 16777216.0;
    double u2 = (double)((r >> 16) & 0xFFFFFF) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* One token (global index token): noise into its logits l[E], then p[E] = softmax(l) and *lse. */
GATE_ROW_FN void gate_softmax_row(float *l, float *p, float *lse, int E, float noise_std, uint64_t seed, uint64_t step,
                                  int64_t token) {
    if (noise_std > 0.0f) {
        uint64_t key = gate_mix64(gate_mix64(seed ^ 0x6E6F697365ull) + step) ^ gate_mix64((uint64_t)token);
        for (int e = 0; e < E; e++) l[e] += noise_std * gate_normal_from_key(key + (uint64_t)e * 0x9E3779B9ull) / E;
    }
    float mx = -FLT_MAX;
    for (int e = 0; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    float s = 0.0f;
    for (int e = 0; e < E; e++) {
        p[e] = expf(l[e] - mx);
        s += p[e];
    }
    for (int e = 0; e < E; e++) p[e] /= s;
    *lse = mx + logf(s);
}

/* One token's top-k of p[E] into c[k] (experts) and w[k] (their weights), *score = the top-1 p before any
 * renormalising. One pass keeping c sorted by p, highest first: an expert enters only if strictly above
 * the current k-th, so a NaN never displaces a kept expert. k > 1 with renormalize: w_j /= max(sum_j w_j, FLT_EPSILON). */
GATE_ROW_FN void gate_topk_row(int *c, float *w, float *score, const float *p, int E, int k, int renormalize) {
    int have = 0;
    for (int e = 0; e < E; e++) {
        if (have == k && !(p[e] > p[c[k - 1]])) continue;
        int pos = have < k ? have++ : k - 1;
        while (pos > 0 && p[e] > p[c[pos - 1]]) {
            c[pos] = c[pos - 1];
            pos--;
        }
        c[pos] = e;
    }
    for (int j = 0; j < k; j++) w[j] = p[c[j]];
    *score = w[0];
    if (k > 1 && renormalize) {
        float s = 0.0f;
        for (int j = 0; j < k; j++) s += w[j];
        s = s > FLT_EPSILON ? s : FLT_EPSILON;
        for (int j = 0; j < k; j++) w[j] /= s;
    }
}

#endif
