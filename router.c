/* router.c: the gate as one op (Tutel semantics, the math in kernels/gate.c): logits = x Wg through
 * the exec, in fp32 whatever the precision (routing decisions stay those of fp32), then the gate's
 * kernels through the exec's compute table, so it runs on any backend.
 *
 * Backward: dlogits from dL/dweight, the aux and z losses (the compute table's gate_backward_logits),
 *           dWg += x^T dlogits, dx = dlogits Wg^T (+ beta dx). */
#include "ops.h"

void scmoe__gate_forward(const exec *ex, float *logits, float *p, float *lse, const float *x, const float *wg, int N,
                         int d, int E, float noise_std, uint64_t seed, uint64_t step, int64_t token_offset) {
    if (N <= 0) return;
    const compute_ops *co = exec_compute(ex);
    scmoe__exec_gemm_fp32(ex, 0, 0, N, E, d, 1.0f, x, d, wg, E, 0.0f, logits, E);
    co->gate_softmax(co, logits, p, lse, N, E, noise_std, seed, step, token_offset);
}

void scmoe__gate_backward(const exec *ex, float *dx, float beta_dx, float *dwg, float *dlogits, const float *dweight,
                          const int *choice, const float *p, const float *lse, const float *x, const float *wg,
                          const float *aux_coef, float z_coef, int N, int d, int E, int k, int renormalize) {
    if (N <= 0) return;
    const compute_ops *co = exec_compute(ex);
    co->gate_backward_logits(co, dlogits, dweight, choice, p, lse, aux_coef, z_coef, N, E, k, renormalize);
    scmoe__exec_gemm_fp32(ex, 1, 0, d, E, N, 1.0f, x, d, dlogits, E, 1.0f, dwg, E);
    scmoe__exec_gemm_fp32(ex, 0, 1, N, d, E, 1.0f, dlogits, E, wg, E, beta_dx, dx, d);
}
