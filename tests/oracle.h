/* oracle.h: what the PyTorch-oracle tests (test_oracle_moe, test_oracle_pair, test_oracle_ep) share: their random
 * stream, the command line and environment they read, and how a case's C part stops at a failure. */
#ifndef SCMOE_ORACLE_H
#define SCMOE_ORACLE_H
#include "../scmoe.h"
#include "tensorio.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64 stream -> uniform in [-1, 1); each case seeds rng_state, so a case's values do not depend
 * on the cases before it */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_uniform(void) { return (float)((double)(rng_next() >> 11) * (2.0 / 9007199254740992.0) - 1.0); }
static void fill_uniform(float *a, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) a[i] = scale * rng_uniform();
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

static const char *env_or(const char *name, const char *dflt) {
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

/* Where the files go and which oracle checks them: [OUTDIR] (default $TMPDIR or /tmp), SCMOE_PYTHON,
 * SCMOE_REF_DIR, SCMOE_KEEP (see the tests' headers). */
typedef struct oracle_env {
    const char *outdir, *python;
    char script[1024];
    int keep;
} oracle_env;

/* Fills e for the reference script script_name. Returns -1 when the oracle can run; otherwise it has
 * printed why not and returns the exit status: 0 for a Python without torch (every case skipped, said
 * loudly), 1 for a missing script. */
static int oracle_setup(int argc, char **argv, const char *script_name, oracle_env *e) {
    e->outdir = argc > 1 ? argv[1] : env_or("TMPDIR", "/tmp");
    e->python = env_or("SCMOE_PYTHON", "/usr/bin/python3");
    e->keep = getenv("SCMOE_KEEP") && atoi(getenv("SCMOE_KEEP"));
    snprintf(e->script, sizeof e->script, "%s/%s", env_or("SCMOE_REF_DIR", "tests/reference"), script_name);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' -c 'import torch, numpy' >/dev/null 2>&1", e->python);
    if (system(cmd) != 0) {
        printf("1..0 # SKIP %s cannot import torch and numpy: the PyTorch oracle did not run\n", e->python);
        return 0;
    }
    FILE *probe = fopen(e->script, "r");
    if (!probe) {
        printf("Bail out! %s not found (run from the repository root or set SCMOE_REF_DIR)\n", e->script);
        return 1;
    }
    fclose(probe);
    return -1;
}

/* In a case's C part: a library call that fails says which, in the case's why[], and jumps to its
 * done: (the cleanup); ctx is the case's context, NULL until created. */
#define CHECK(call)                                                                                                    \
    do {                                                                                                               \
        scmoe_status s_ = (call);                                                                                      \
        if (s_ != SCMOE_OK) {                                                                                          \
            snprintf(why, sizeof why, "%s -> %s (%s)", #call, scmoe_strerror(s_), ctx ? scmoe_last_error(ctx) : "");   \
            goto done;                                                                                                 \
        }                                                                                                              \
    } while (0)

/* The case's drop expectation (1: some, 0: none, -1: either) against the forward's drop count; on a
 * miss, says so in why and returns 0. */
static int drops_as_expected(int expect, float cf, int64_t dropped, char *why, size_t why_len) {
    if (expect == 1 && dropped <= 0) {
        snprintf(why, why_len, "expected dropped > 0 with capacity factor %g, got %lld", cf, (long long)dropped);
        return 0;
    }
    if (expect == 0 && dropped != 0) {
        snprintf(why, why_len, "expected no drops, got %lld", (long long)dropped);
        return 0;
    }
    return 1;
}
/* The MoE layer's config scalars moe_ref.py reads (cfg.*), in the order it expects them. */
static inline void oracle_write_moe_cfg(FILE *f, int d, int h, int E, int k, float cf, int renorm, float aux_w,
                                        float z_w, int act, int prio) {
    tio_write_scalar(f, "cfg.d_model", (float)d);
    tio_write_scalar(f, "cfg.d_hidden", (float)h);
    tio_write_scalar(f, "cfg.n_experts", (float)E);
    tio_write_scalar(f, "cfg.top_k", (float)k);
    tio_write_scalar(f, "cfg.capacity_factor", cf);
    tio_write_scalar(f, "cfg.renormalize", (float)renorm);
    tio_write_scalar(f, "cfg.aux_loss_weight", aux_w);
    tio_write_scalar(f, "cfg.z_loss_weight", z_w);
    tio_write_scalar(f, "cfg.activation", (float)act);
    tio_write_scalar(f, "cfg.priority", (float)prio);
}

/* One step as the reference scripts read it (tensorio.h): x, dy, y, dx of shape dims, the parameters, and the
 * forward's stats st (taken before backward overwrites them); et (E floats) receives the per-expert token
 * counts, -1 where the stats carry none. */
static inline tio_step oracle_step(int ndim, const int *dims, const float *x, const float *dy, const float *y,
                                   const float *dx, const scmoe_tensor *params, int n_params, const scmoe_stats *st,
                                   int E, float *et) {
    for (int e = 0; e < E; e++) et[e] = st->expert_tokens ? (float)st->expert_tokens[e] : -1.0f;
    return (tio_step){.ndim = ndim,
                      .dims = dims,
                      .x = x,
                      .dy = dy,
                      .y = y,
                      .dx = dx,
                      .params = params,
                      .n_params = n_params,
                      .aux_loss = st->aux_loss,
                      .z_loss = st->z_loss,
                      .dropped = (float)st->dropped,
                      .capacity = (float)st->capacity,
                      .n_experts = E,
                      .expert_tokens = et};
}

#endif
