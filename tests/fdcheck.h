/* fdcheck.h: the finite-difference gradient check of the one-rank suites (test_moe, test_pair). Each
 * suite brings its loss, its random stream and its tolerances; the sampling and the comparison are here. */
#ifndef SCMOE_FDCHECK_H
#define SCMOE_FDCHECK_H
#include "../scmoe.h"
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct fd_spec {
    /* the loss at the parameters as they stand, in double, and a fingerprint of the routing it took */
    double (*loss)(void *arg, int64_t *route_sig);
    void *arg;
    float (*uniform)(void);   /* the suite's stream in [-1, 1): picks the sampled entries */
    float eps;                /* the first central-difference step; the second is eps / 2 */
    double tol_gmax, tol_abs; /* an entry agrees within 1% of itself + tol_gmax * max |grad| + tol_abs */
    double none_tried;        /* what the check returns when it could compare no sampled entry */
} fd_spec;

/* Compares sampled entries of an analytic gradient with central differences. A perturbation that
 * changes the routing is a discontinuity: entries whose routing fingerprint changes are skipped, and
 * since a swap can keep the fingerprint, callers ask most entries to agree, not all.
 * Returns the fraction of entries that disagree. */
static double fd_check(const fd_spec *f, float *param, const float *grad, size_t numel, int samples) {
    float gmax = 0;
    for (size_t i = 0; i < numel; i++) gmax = fabsf(grad[i]) > gmax ? fabsf(grad[i]) : gmax;
    int64_t sig0, sp, sm;
    int tried = 0, bad = 0;
    f->loss(f->arg, &sig0);
    for (int s = 0; s < samples; s++) {
        size_t i = (size_t)((f->uniform() + 1.0f) * 0.5f * numel) % numel;
        float keep = param[i];
        double fd[2];
        int jump = 0;
        for (int q = 0; q < 2; q++) { /* a jump shows as differences that disagree between two steps */
            float h = q ? f->eps / 2 : f->eps;
            param[i] = keep + h;
            double lp = f->loss(f->arg, &sp);
            param[i] = keep - h;
            double lm = f->loss(f->arg, &sm);
            param[i] = keep;
            fd[q] = (lp - lm) / (2 * h);
            jump |= sp != sig0 || sm != sig0;
        }
        if (jump || fabs(fd[0] - fd[1]) > 0.005 * fabs(fd[0]) + 1e-3 * gmax + 1e-5) continue;
        tried++;
        bad += fabs(fd[1] - grad[i]) > 1e-2 * fabs(grad[i]) + f->tol_gmax * gmax + f->tol_abs;
    }
    return tried ? (double)bad / tried : f->none_tried;
}

/* fd_check of one parameter tensor, against a copy of its gradient as the backward left it */
static double fd_check_param(const fd_spec *f, const scmoe_tensor *t, int samples) {
    float *g = malloc(sizeof(float) * t->numel);
    memcpy(g, t->grad, sizeof(float) * t->numel);
    double e = fd_check(f, t->data, g, t->numel, samples);
    free(g);
    return e;
}
#endif
