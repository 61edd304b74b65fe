/* test_oracle_moe.c: checks one MoE layer's forward and backward against an independent PyTorch model
 * (tests/reference/moe_ref.py, float64 autograd written from the routing/loss specification).
 *
 * For each case: a one-rank context, a layer with the case's config, every parameter set by name to
 * deterministic random values (biases nonzero), random x, forward, random dy, backward; everything is
 * written to an SCMT file (tests/tensorio.h) and the oracle is run on it.
 *
 *   build/test_oracle_moe [OUTDIR]       files go to OUTDIR (default $TMPDIR or /tmp)
 *   environment: SCMOE_PYTHON (default /usr/bin/python3), SCMOE_REF_DIR (default tests/reference),
 *                SCMOE_KEEP=1 keeps the files.
 * Run from the repository root. Prints TAP-like "ok - case" / "not ok - case" and "N passed, N failed";
 * exits 1 if any case failed. If the Python has no torch, every case is skipped (exit 0, said loudly).
 *
 * Build: cc -std=c11 -D_POSIX_C_SOURCE=200809L -O2 -fopenmp -I. tests/test_oracle_moe.c tests/tensorio.c \
 *            build/libscmoe.a $(pkg-config --libs openblas) -lm -o build/test_oracle_moe   (mpicc for an MPI lib) */
#include "scmoe.h"
#include "tests/oracle.h"
#include "tests/tensorio.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    int d, h, E, k, n;
    float cf;
    int renorm, act, prio;
    float aux_w, z_w;
    int expect_drops; /* 1: dropped > 0 required; 0: dropped == 0 required; -1: either */
    uint64_t seed;
    float dy_scale; /* 0 means 1; small values let the aux and z losses dominate the gate gradient */
} oracle_case;

static const oracle_case CASES[] = {
    /* name                       d   h   E  k   n   cf    rn act pr  aux_w  z_w  drops seed dy_scale */
    {"k1_gelu_dropless", 32, 64, 8, 1, 48, 0.0f, 0, 0, 0, 0.01f, 0.0f, 0, 11, 1.0f},
    {"k1_gelu_drops", 32, 64, 8, 1, 64, 0.5f, 0, 0, 0, 0.01f, 0.0f, 1, 12, 1.0f},
    {"k1_swiglu_drops_aux0.5", 24, 32, 4, 1, 40, 0.5f, 0, 1, 0, 0.5f, 0.0f, 1, 13, 1.0f},
    {"k1_gelu_batchprio_drops", 16, 32, 8, 1, 64, 0.5f, 0, 0, 1, 0.01f, 0.0f, 1, 14, 1.0f},
    {"k1_gelu_cf1.25_zloss", 32, 48, 4, 1, 50, 1.25f, 0, 0, 0, 0.01f, 0.1f, -1, 15, 1.0f},
    {"k2_gelu_renorm_dropless", 32, 64, 8, 2, 48, 0.0f, 1, 0, 0, 0.01f, 0.0f, 0, 21, 1.0f},
    {"k2_gelu_norenorm_dropless", 32, 64, 8, 2, 48, 0.0f, 0, 0, 0, 0.01f, 0.0f, 0, 22, 1.0f},
    {"k2_gelu_renorm_drops", 32, 64, 8, 2, 64, 0.5f, 1, 0, 0, 0.01f, 0.0f, 1, 23, 1.0f},
    {"k2_swiglu_norenorm_drops", 24, 32, 4, 2, 40, 0.5f, 0, 1, 0, 0.5f, 0.05f, 1, 24, 1.0f},
    {"k2_swiglu_renorm_batch", 16, 48, 8, 2, 64, 0.5f, 1, 1, 1, 0.5f, 0.0f, 1, 25, 1.0f},
    {"k2_gelu_norenorm_batch_z", 32, 32, 4, 2, 36, 0.75f, 0, 0, 1, 0.01f, 0.2f, 1, 26, 1.0f},
    {"k2_swiglu_renorm_aux0.5_z", 32, 64, 8, 2, 24, 2.0f, 1, 1, 0, 0.5f, 0.1f, -1, 27, 1.0f},
    {"k3_E4_gelu_renorm_drops", 16, 32, 4, 3, 32, 0.5f, 1, 0, 0, 0.5f, 0.0f, 1, 31, 1.0f},
    {"k3_E4_swiglu_dropless", 24, 32, 4, 3, 28, 0.0f, 0, 1, 1, 0.01f, 0.1f, 0, 32, 1.0f},
    {"k4_E4_gelu_renorm_dropless", 16, 32, 4, 4, 24, 0.0f, 1, 0, 0, 0.5f, 0.0f, 0, 33, 1.0f},
    {"k2_gelu_drops_lossdominant", 32, 48, 8, 2, 56, 0.75f, 1, 0, 0, 0.5f, 0.1f, 1, 28, 0.01f},
    {"k1_swiglu_lossdominant", 16, 32, 4, 1, 32, 1.0f, 0, 1, 1, 0.5f, 0.2f, -1, 29, 0.01f},
    {"n1_k2_gelu_drops", 16, 32, 4, 2, 1, 0.5f, 1, 0, 0, 0.5f, 0.1f, -1, 41, 1.0f},
    {"n0_k2_gelu", 16, 32, 4, 2, 0, 1.0f, 1, 0, 0, 0.01f, 0.1f, 0, 42, 1.0f},
    {"n0_k1_swiglu_dropless", 16, 32, 4, 1, 0, 0.0f, 0, 1, 0, 0.01f, 0.0f, 0, 43, 1.0f},
};

/* Runs the oracle; returns its exit status (or -1) and leaves its last line in last[]. */
static int run_oracle(const char *python, const char *script, const char *file, char *last, size_t last_len,
                      int verbose_on_fail) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' 2>&1", python, script, file);
    FILE *p = popen(cmd, "r");
    if (!p) {
        snprintf(last, last_len, "popen failed");
        return -1;
    }
    size_t cap = 1 << 16, len = 0;
    char *all = malloc(cap);
    char line[4096];
    last[0] = 0;
    while (fgets(line, sizeof line, p)) {
        size_t l = strlen(line);
        if (len + l + 1 > cap) {
            cap = 2 * (len + l + 1);
            all = realloc(all, cap);
        }
        memcpy(all + len, line, l + 1);
        len += l;
        if (l > 1 || line[0] != '\n') {
            snprintf(last, last_len, "%.1000s", line);
            size_t ll = strlen(last);
            if (ll && last[ll - 1] == '\n') last[ll - 1] = 0;
        }
    }
    int st = pclose(p);
    int rc = st == -1 ? -1 : (st & 0xff) ? -1 : (st >> 8) & 0xff;
    if (rc != 0 && verbose_on_fail && len) {
        /* the whole oracle output, as TAP comments */
        char *s = all;
        while (*s) {
            char *nl = strchr(s, '\n');
            if (nl) *nl = 0;
            printf("#   %s\n", s);
            if (!nl) break;
            s = nl + 1;
        }
    }
    free(all);
    return rc;
}

/* 1 pass, 0 fail. */
static int run_case(const oracle_case *c, const char *outdir, const char *python, const char *script, int keep) {
    char why[2048] = "", file[1024], last[1024] = "";
    int pass = 0;
    scmoe_context *ctx = NULL;
    scmoe_moe *moe = NULL;
    float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL, *et = NULL;
    scmoe_tensor *pt = NULL;
    FILE *f = NULL;
    snprintf(file, sizeof file, "%s/oracle_moe_%s.scmt", outdir, c->name);
    rng_state = 0x5C30E000ull + c->seed * 0x100000001B3ull;

    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = c->d;
    cfg.d_hidden = c->h;
    cfg.n_experts = c->E;
    cfg.top_k = c->k;
    cfg.max_tokens = c->n > 0 ? c->n + 3 : 16; /* n below max_tokens on purpose */
    cfg.max_seq_len = cfg.max_tokens;          /* validation wants max_seq_len <= max_tokens */
    cfg.capacity_factor = c->cf;
    cfg.eval_capacity_factor = c->cf;
    cfg.renormalize = c->renorm;
    cfg.activation = c->act ? SCMOE_SWIGLU : SCMOE_GELU;
    cfg.priority = c->prio ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
    cfg.aux_loss_weight = c->aux_w;
    cfg.z_loss_weight = c->z_w;
    cfg.gate_noise_std = 0.0f;
    cfg.seed = c->seed;

    CHECK(scmoe_context_create(&ctx));
    CHECK(scmoe_moe_create(ctx, &cfg, &moe));
    CHECK(scmoe_moe_set_training(moe, 1));

    int np = scmoe_moe_param_count(moe);
    int expect_np = 1 + 4 * c->E;
    if (np != expect_np) {
        snprintf(why, sizeof why, "param_count %d, expected %d", np, expect_np);
        goto done;
    }
    pt = calloc((size_t)np, sizeof *pt);
    if (!pt) {
        snprintf(why, sizeof why, "out of memory");
        goto done;
    }
    for (int i = 0; i < np; i++) {
        scmoe_tensor t;
        CHECK(scmoe_moe_param_at(moe, i, &t));
        pt[i] = t;
        float scale;
        if (ends_with(t.name, "gate.weight")) scale = 2.5f / sqrtf((float)t.shape[0]); /* logits of O(1) spread */
        else if (t.ndim == 1) scale = 0.5f;                                            /* biases, nonzero */
        else scale = sqrtf(3.0f / (float)t.shape[0]);
        fill_uniform(t.data, t.numel, scale);
        /* the same tensor through the by-name lookup */
        scmoe_tensor u;
        CHECK(scmoe_moe_param(moe, t.name, &u));
        if (u.data != t.data) {
            snprintf(why, sizeof why, "param(\"%s\") is not param_at(%d)", t.name, i);
            goto done;
        }
    }

    size_t nd = (size_t)(c->n > 0 ? c->n : 1) * c->d;
    x = calloc(nd, sizeof *x);
    y = calloc(nd, sizeof *y);
    dy = calloc(nd, sizeof *dy);
    dx = calloc(nd, sizeof *dx);
    et = calloc((size_t)c->E, sizeof *et);
    if (!x || !y || !dy || !dx || !et) {
        snprintf(why, sizeof why, "out of memory");
        goto done;
    }
    fill_uniform(x, (size_t)c->n * c->d, 1.0f);
    fill_uniform(dy, (size_t)c->n * c->d, c->dy_scale > 0 ? c->dy_scale : 1.0f);

    scmoe_stats st;
    CHECK(scmoe_moe_forward(moe, c->n, x, y, &st));
    if (!drops_as_expected(c->expect_drops, c->cf, st.dropped, why, sizeof why)) goto done;
    if (st.tokens != c->n) {
        snprintf(why, sizeof why, "stats.tokens %lld, expected %d", (long long)st.tokens, c->n);
        goto done;
    }
    int xd[2] = {c->n, c->d};
    tio_step step = oracle_step(2, xd, x, dy, y, dx, pt, np, &st, c->E, et);

    CHECK(scmoe_moe_zero_grad(moe));
    for (size_t i = 0; i < nd; i++) dx[i] = NAN; /* backward must overwrite dx */
    CHECK(scmoe_moe_backward(moe, dy, dx, &st));

    f = tio_open_write(file);
    if (!f) {
        snprintf(why, sizeof why, "cannot write %s", file);
        goto done;
    }
    oracle_write_moe_cfg(f, c->d, c->h, c->E, c->k, c->cf, c->renorm, c->aux_w, c->z_w, c->act, c->prio);
    tio_write_step(f, &step);
    if (fclose(f) != 0) {
        f = NULL;
        snprintf(why, sizeof why, "error writing %s", file);
        goto done;
    }
    f = NULL;

    int rc = run_oracle(python, script, file, last, sizeof last, 1);
    if (rc == 0) pass = 1;
    else snprintf(why, sizeof why, "oracle exit %d", rc);

done:
    if (f) fclose(f);
    printf("%s - %s\n", pass ? "ok" : "not ok", c->name);
    if (!pass && why[0]) printf("#   %s\n", why);
    if (last[0]) printf("#   %s\n", last);
    if (pass && !keep) remove(file);
    free(x);
    free(y);
    free(dy);
    free(dx);
    free(et);
    free(pt);
    scmoe_moe_destroy(moe);
    scmoe_context_destroy(ctx);
    return pass;
}

int main(int argc, char **argv) {
    oracle_env env;
    int status = oracle_setup(argc, argv, "moe_ref.py", &env);
    if (status >= 0) return status;
    int n = (int)(sizeof CASES / sizeof CASES[0]);

    printf("1..%d\n", n);
    int passed = 0, failed = 0;
    for (int i = 0; i < n; i++) {
        if (run_case(&CASES[i], env.outdir, env.python, env.script, env.keep)) passed++;
        else failed++;
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
