/* test_moe.c: the MoE layer on one rank: finite-difference gradients for x, the gate and every
 * expert tensor (k = 1, 2; with and without drops; GELU and SwiGLU), bad input, determinism. */
#include "../scmoe.h"
#include "check.h"
#include "fdcheck.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 42;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) / 8388608.0 - 1.0);
}
static void fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * frand();
}

typedef struct {
    scmoe_moe *m;
    int n, d, E;
    const float *x;
    const float *dy;
    float waux, wz;
} fd_ctx;

/* L = sum(y . dy) + w_aux aux + w_z z, in double; also a fingerprint of the routing */
static double loss(void *arg, int64_t *route_sig) {
    fd_ctx *c = arg;
    float *y = malloc(sizeof(float) * (size_t)(c->n ? c->n : 1) * c->d);
    scmoe_stats st;
    scmoe_moe_forward(c->m, c->n, c->x, y, &st);
    double L = 0;
    for (size_t i = 0; i < (size_t)c->n * c->d; i++) L += (double)y[i] * c->dy[i];
    L += (double)c->waux * st.aux_loss + (double)c->wz * st.z_loss;
    int64_t sig = st.dropped;
    for (int e = 0; e < c->E; e++) sig = (int64_t)((uint64_t)sig * 1000003u + (uint64_t)st.expert_tokens[e]);
    *route_sig = sig;
    free(y);
    return L;
}

static void gradcheck(int k, float cf, scmoe_activation act, int renorm) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 16;
    cfg.d_hidden = 24;
    cfg.n_experts = 4;
    cfg.top_k = k;
    cfg.max_tokens = 40;
    cfg.capacity_factor = cf;
    cfg.activation = act;
    cfg.renormalize = renorm;
    cfg.aux_loss_weight = 0.3f;
    cfg.z_loss_weight = 0.05f;
    scmoe_moe *m;
    scmoe_status s = scmoe_moe_create(ctx, &cfg, &m);
    CHECK(s == SCMOE_OK, "create k=%d cf=%.2f act=%d: %s", k, cf, act, scmoe_last_error(ctx));
    if (s) {
        scmoe_context_destroy(ctx);
        return;
    }
    int n = 32, d = cfg.d_model;
    for (int i = 0; i < scmoe_moe_param_count(m); i++) { /* nonzero biases so they matter */
        scmoe_tensor t;
        scmoe_moe_param_at(m, i, &t);
        fill(t.data, t.numel, t.ndim == 1 ? 0.1f : 0.4f);
    }
    float *x = malloc(sizeof(float) * n * d), *dy = malloc(sizeof(float) * n * d), *y = malloc(sizeof(float) * n * d),
          *dx = malloc(sizeof(float) * n * d);
    fill(x, (size_t)n * d, 1.0f);
    fill(dy, (size_t)n * d, 1.0f);
    scmoe_stats st;
    scmoe_moe_forward(m, n, x, y, &st);
    if (cf > 0 && cf < 1) CHECK(st.dropped > 0, "k=%d cf=%.2f drops tokens (%lld)", k, cf, (long long)st.dropped);
    scmoe_moe_zero_grad(m);
    s = scmoe_moe_backward(m, dy, dx, &st);
    CHECK(s == SCMOE_OK, "backward");
    fd_ctx c = {m, n, d, cfg.n_experts, x, dy, cfg.aux_loss_weight, cfg.z_loss_weight};
    fd_spec f = {
        .loss = loss, .arg = &c, .uniform = frand, .eps = 2e-3f, .tol_gmax = 2e-3, .tol_abs = 1e-5, .none_tried = 1.0};
    double e = fd_check(&f, x, dx, (size_t)n * d, 40);
    CHECK(e <= 0.1, "fd dx k=%d cf=%.2f %s renorm=%d: %.0f%% of entries disagree", k, cf, act ? "swiglu" : "gelu",
          renorm, 100 * e);
    for (int i = 0; i < scmoe_moe_param_count(m); i++) {
        scmoe_tensor t;
        scmoe_moe_param_at(m, i, &t);
        e = fd_check_param(&f, &t, 20);
        CHECK(e <= 0.1, "fd %s k=%d cf=%.2f %s: %.0f%% of entries disagree", t.name, k, cf, act ? "swiglu" : "gelu",
              100 * e);
    }
    free(x);
    free(dy);
    free(y);
    free(dx);
    scmoe_moe_destroy(m);
    scmoe_context_destroy(ctx);
}

static void bad_input(void) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    scmoe_config c0 = scmoe_config_default(), c;
    struct {
        const char *what;
        scmoe_status want;
    } cases[] = {
        {"d_model=0", SCMOE_ERR_D_MODEL},
        {"d_hidden=-1", SCMOE_ERR_D_HIDDEN},
        {"n_experts=0", SCMOE_ERR_N_EXPERTS},
        {"top_k=0", SCMOE_ERR_TOP_K},
        {"top_k>E", SCMOE_ERR_TOP_K},
        {"cf=nan", SCMOE_ERR_CAPACITY},
        {"aux=-1", SCMOE_ERR_LOSS_WEIGHT},
        {"z=inf", SCMOE_ERR_LOSS_WEIGHT},
        {"noise=-1", SCMOE_ERR_NOISE},
        {"act=7", SCMOE_ERR_ACTIVATION},
        {"priority=5", SCMOE_ERR_PRIORITY},
        {"max_tokens=0", SCMOE_ERR_MAX_TOKENS},
        {"arch=9", SCMOE_ERR_ARCH},
        {"pos=4", SCMOE_ERR_SHORTCUT_POS},
        {"combine=3", SCMOE_ERR_COMBINE},
        {"heads=3", SCMOE_ERR_N_HEADS},
        {"ep=3", SCMOE_ERR_EP_SIZE},
        {"progress=9", SCMOE_ERR_PROGRESS},
        {"renorm=2", SCMOE_ERR_OPTION},
        {"timeout=0", SCMOE_ERR_OPTION},
        {"pipeline_chunks=-1", SCMOE_ERR_OPTION},
        {"pipeline_chunks=17", SCMOE_ERR_OPTION},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        c = c0;
        switch (i) {
        case 0: c.d_model = 0; break;
        case 1: c.d_hidden = -1; break;
        case 2: c.n_experts = 0; break;
        case 3: c.top_k = 0; break;
        case 4: c.top_k = c.n_experts + 1; break;
        case 5: c.capacity_factor = NAN; break;
        case 6: c.aux_loss_weight = -1; break;
        case 7: c.z_loss_weight = INFINITY; break;
        case 8: c.gate_noise_std = -1; break;
        case 9: c.activation = (scmoe_activation)7; break;
        case 10: c.priority = (scmoe_priority)5; break;
        case 11: c.max_tokens = 0; break;
        case 12: c.arch = (scmoe_arch)9; break;
        case 13: c.shortcut_pos = 4; break;
        case 14: c.combine = (scmoe_combine)3; break;
        case 15: c.n_heads = 3; break;
        case 16: c.ep_size = 3; break;
        case 17: c.progress = (scmoe_progress)9; break;
        case 18: c.renormalize = 2; break;
        case 19: c.comm_timeout_s = 0; break;
        case 20: c.pipeline_chunks = -1; break;
        case 21: c.pipeline_chunks = SCMOE_MAX_PIPELINE_CHUNKS + 1; break;
        }
        char msg[200];
        scmoe_status v = scmoe_config_validate(&c, msg, sizeof msg);
        scmoe_moe *m = NULL;
        scmoe_status s = scmoe_moe_create(ctx, &c, &m);
        CHECK(v == cases[i].want && s == cases[i].want && m == NULL && msg[0], "bad config %s -> %s (%s)",
              cases[i].what, scmoe_strerror(s), msg);
    }
    CHECK(scmoe_config_validate(NULL, NULL, 0) == SCMOE_ERR_NULL, "NULL config");
    CHECK(scmoe_moe_create(ctx, NULL, NULL) == SCMOE_ERR_NULL, "NULL out pointer");
    c = c0;
    c.d_model = 8;
    c.d_hidden = 8;
    c.n_experts = 4;
    c.max_tokens = 16;
    c.check_finite = 1;
    scmoe_moe *m;
    CHECK(scmoe_moe_create(ctx, &c, &m) == SCMOE_OK, "create tiny");
    float x[17 * 8] = {0}, y[17 * 8], dx[17 * 8];
    scmoe_stats st;
    CHECK(scmoe_moe_forward(m, 17, x, y, &st) == SCMOE_ERR_N_TOKENS, "n_tokens > max -> %s", scmoe_last_error(ctx));
    CHECK(scmoe_moe_forward(m, -1, x, y, &st) == SCMOE_ERR_N_TOKENS, "n_tokens < 0");
    CHECK(scmoe_moe_backward(m, x, dx, &st) == SCMOE_ERR_STATE, "backward before forward -> %s", scmoe_last_error(ctx));
    CHECK(scmoe_moe_forward(m, 4, NULL, y, &st) == SCMOE_ERR_NULL, "NULL x");
    CHECK(scmoe_moe_forward(m, 0, NULL, NULL, &st) == SCMOE_OK && st.tokens == 0, "n_tokens = 0 is an empty batch");
    CHECK(scmoe_moe_backward(m, NULL, NULL, &st) == SCMOE_OK, "backward of an empty batch");
    x[5] = NAN;
    CHECK(scmoe_moe_forward(m, 4, x, y, &st) == SCMOE_ERR_NONFINITE, "NaN input with check_finite");
    x[5] = INFINITY;
    CHECK(scmoe_moe_forward(m, 4, x, y, &st) == SCMOE_ERR_NONFINITE, "Inf input with check_finite");
    x[5] = 0;
    scmoe_tensor t;
    CHECK(scmoe_moe_param(m, "experts.9.w1", &t) == SCMOE_ERR_NOT_FOUND, "unknown parameter name");
    CHECK(scmoe_moe_param(m, "experts.3.w2", &t) == SCMOE_OK && t.ndim == 2 && t.shape[0] == 8 && t.shape[1] == 8,
          "parameter by name with its shape");
    CHECK(strcmp(scmoe_strerror((scmoe_status)999), "unknown status") == 0, "strerror of an unknown status");
    for (int s = 0; s < SCMOE_STATUS_COUNT; s++) CHECK(scmoe_strerror((scmoe_status)s)[0], "strerror(%d) names it", s);
    CHECK(!strcmp(scmoe_context_backend(ctx), "host") && !strcmp(scmoe_context_backend(NULL), "context is NULL"),
          "a context computes on the host unless moved to a device");
    scmoe_moe_destroy(m);
    scmoe_moe_destroy(NULL);
    scmoe_context_destroy(ctx);
}

static void determinism(void) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    scmoe_config c = scmoe_config_default();
    c.d_model = 32;
    c.d_hidden = 64;
    c.n_experts = 8;
    c.top_k = 2;
    c.max_tokens = 300;
    c.gate_noise_std = 1.0f;
    scmoe_moe *a, *b;
    scmoe_moe_create(ctx, &c, &a);
    scmoe_moe_create(ctx, &c, &b);
    int n = 300, d = 32;
    float *x = malloc(sizeof(float) * n * d), *ya = malloc(sizeof(float) * n * d), *yb = malloc(sizeof(float) * n * d);
    fill(x, (size_t)n * d, 1.0f);
    scmoe_stats st;
    scmoe_moe_forward(a, n, x, ya, &st);
    scmoe_moe_forward(b, n, x, yb, &st);
    CHECK(memcmp(ya, yb, sizeof(float) * n * d) == 0, "same seed and input -> bitwise-identical output (with noise)");
    scmoe_moe_forward(a, n, x, ya, &st);
    CHECK(memcmp(ya, yb, sizeof(float) * n * d) != 0, "the next step draws new gate noise");
    scmoe_moe_set_training(a, 0);
    scmoe_moe_set_training(b, 0);
    scmoe_moe_forward(a, n, x, ya, &st);
    scmoe_moe_forward(b, n, x, yb, &st);
    CHECK(memcmp(ya, yb, sizeof(float) * n * d) == 0, "inference has no noise");
    CHECK(scmoe_moe_backward(a, x, ya, &st) == SCMOE_ERR_STATE, "no backward after an inference forward");
    free(x);
    free(ya);
    free(yb);
    scmoe_moe_destroy(a);
    scmoe_moe_destroy(b);
    scmoe_context_destroy(ctx);
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* Edge shapes and values: E = 1, k = E, one token, huge inputs, all-equal logits. */
static void numerics(void) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    struct {
        int E, k, n;
        float scale, cf;
        const char *what;
    } cases[] = {
        {1, 1, 16, 1.0f, 2.0f, "E = 1"},
        {4, 4, 16, 1.0f, 2.0f, "k = E = 4"},
        {8, 2, 1, 1.0f, 2.0f, "one token"},
        {8, 2, 16, 1e8f, 2.0f, "inputs of magnitude 1e8"},
        {8, 1, 16, 1e-30f, 0.0f, "inputs of magnitude 1e-30"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        scmoe_config cfg = scmoe_config_default();
        cfg.d_model = 16;
        cfg.d_hidden = 16;
        cfg.n_experts = cases[c].E;
        cfg.top_k = cases[c].k;
        cfg.max_tokens = 16;
        cfg.capacity_factor = cases[c].cf;
        cfg.z_loss_weight = 1e-3f;
        scmoe_moe *m;
        scmoe_status s = scmoe_moe_create(ctx, &cfg, &m);
        int n = cases[c].n, d = 16;
        float x[16 * 16], y[16 * 16], dx[16 * 16];
        fill(x, (size_t)n * d, cases[c].scale);
        scmoe_stats st;
        if (!s) s = scmoe_moe_forward(m, n, x, y, &st);
        if (!s) s = scmoe_moe_backward(m, x, dx, &st);
        int ok = !s && all_finite(y, (size_t)n * d) && all_finite(dx, (size_t)n * d) && isfinite(st.aux_loss);
        for (int i = 0; ok && i < scmoe_moe_param_count(m); i++) {
            scmoe_tensor t;
            scmoe_moe_param_at(m, i, &t);
            ok = all_finite(t.grad, t.numel);
        }
        CHECK(ok, "%s: finite outputs, gradients and losses (%s)", cases[c].what, scmoe_strerror(s));
        scmoe_moe_destroy(m);
    }
    /* all-equal logits: a zero gate; ties go to the lowest expert index, the same every run */
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 8;
    cfg.d_hidden = 8;
    cfg.n_experts = 4;
    cfg.top_k = 2;
    cfg.max_tokens = 8;
    cfg.capacity_factor = 0;
    scmoe_moe *m;
    scmoe_moe_create(ctx, &cfg, &m);
    scmoe_tensor g;
    scmoe_moe_param(m, "gate.weight", &g);
    memset(g.data, 0, sizeof(float) * g.numel);
    float x[64], y[64];
    fill(x, 64, 1.0f);
    scmoe_stats st;
    scmoe_moe_forward(m, 8, x, y, &st);
    CHECK(st.expert_tokens[0] == 8 && st.expert_tokens[1] == 8 && st.expert_tokens[2] == 0 && st.expert_tokens[3] == 0,
          "tied logits: every token picks experts 0 and 1 (%lld %lld %lld %lld)", (long long)st.expert_tokens[0],
          (long long)st.expert_tokens[1], (long long)st.expert_tokens[2], (long long)st.expert_tokens[3]);
    CHECK(fabsf(st.aux_loss - 4.0f * 0.25f) < 1e-6f, "tied logits: aux loss = E * sum_e (1/E) frac_e = 1 (%g)",
          st.aux_loss);
    scmoe_moe_destroy(m);
    scmoe_context_destroy(ctx);
}

int main(void) {
    numerics();
    for (int act = 0; act < 2; act++) {
        gradcheck(1, 0.0f, (scmoe_activation)act, 1);
        gradcheck(1, 0.5f, (scmoe_activation)act, 1);
        gradcheck(2, 0.0f, (scmoe_activation)act, 1);
        gradcheck(2, 0.5f, (scmoe_activation)act, 1);
    }
    gradcheck(2, 1.0f, SCMOE_GELU, 0);
    gradcheck(3, 1.0f, SCMOE_SWIGLU, 1);
    bad_input();
    determinism();
    return check_summary();
}
