/* test_oracle_pair.c: checks the block pair's forward and backward against an independent PyTorch model
 * (tests/reference/pair_ref.py, float64 autograd written from the specification at the top of pair.c).
 *
 * For each case: a one-rank context, a pair with the case's config (arch, shortcut_pos, combine, causal,
 * activation, capacity, priority, loss weights), every parameter set by name to deterministic random
 * values (LayerNorm weights near 1, nonzero biases and w_cg), random x [B, T, d], training forward,
 * random dy, backward; everything is written to an SCMT file (tests/tensorio.h). Then one oracle process
 * checks every file (pair_ref.py takes several; importing torch once keeps the test at a few seconds).
 * The ovl_* cases first run the profiling steps, so that the checked step runs the overlapped ScMoE order
 * (experts placed later among the dense operations); the test asserts which expert slot ran.
 *
 *   build/tests/test_oracle_pair [OUTDIR]   files go to OUTDIR (default $TMPDIR or /tmp)
 *   environment: SCMOE_PYTHON (default /usr/bin/python3), SCMOE_REF_DIR (default tests/reference),
 *                SCMOE_KEEP=1 keeps the files.
 * Run from the repository root. Prints TAP-like "ok - case" / "not ok - case" and "N passed, N failed";
 * exits 1 if any case failed. If the Python has no torch, every case is skipped (exit 0, said loudly).
 *
 * Build: make build/tests/test_oracle_pair */
#include "scmoe.h"
#include "tests/oracle.h"
#include "tests/tensorio.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { TOP2 = SCMOE_ARCH_TOP2, TOP1 = SCMOE_ARCH_TOP1, SHARED = SCMOE_ARCH_SHARED, SC = SCMOE_ARCH_SCMOE };
enum { CG1 = SCMOE_COMBINE_CG1, ADD = SCMOE_COMBINE_ADD };

typedef struct {
    const char *name;
    int arch, pos, combine, causal;
    int act; /* 0 GELU, 1 SwiGLU */
    int E, B, T;
    float cf; /* <= 0: dropless */
    int prio; /* 0 token, 1 batch */
    float aux_w, z_w;
    int expect_drops; /* 1: dropped > 0 required; 0: dropped == 0 required; -1: either */
    uint64_t seed;
    float dy_scale; /* small values let the aux and z losses dominate the gate gradient */
    /* schedule: the first steps of a shape run serialized while they are timed (SCHED_PROFILE_STEPS);
     * warm > 0 runs that many training steps on the same data first, so that the checked step runs the
     * overlapped order (arch scmoe, overlap 1), with the expert slot chosen (slot -1) or forced (0..3) */
    int warm, slot, overlap;
    int bf16; /* SCMOE_PRECISION_BF16: the oracle rounds the same GEMM operands (bf16_ref.py) */
} oracle_case;

static const oracle_case CASES[] = {
    /* name                        arch    pos comb caus act E  B  T   cf    pr aux_w  z_w  drops seed dy   warm slot ovl */
    {"top2_gelu_drops", TOP2, 2, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 101, 1.0f, 0, -1, 1, 0},
    {"top2_gelu_dropless", TOP2, 2, CG1, 1, 0, 8, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 102, 1.0f, 0, -1, 1, 0},
    {"top2_swiglu_drops", TOP2, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 103, 1.0f, 0, -1, 1, 0},
    {"top2_swiglu_dropless", TOP2, 2, CG1, 1, 1, 4, 2, 10, 0.0f, 0, 0.01f, 0.0f, 0, 104, 1.0f, 0, -1, 1, 0},
    {"top1_gelu_drops", TOP1, 2, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 111, 1.0f, 0, -1, 1, 0},
    {"top1_gelu_dropless", TOP1, 2, CG1, 1, 0, 4, 2, 8, 0.0f, 0, 0.01f, 0.0f, 0, 112, 1.0f, 0, -1, 1, 0},
    {"top1_swiglu_drops", TOP1, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 113, 1.0f, 0, -1, 1, 0},
    {"top1_swiglu_dropless", TOP1, 2, CG1, 1, 1, 8, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 114, 1.0f, 0, -1, 1, 0},
    {"shared_gelu_drops", SHARED, 2, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 121, 1.0f, 0, -1, 1, 0},
    {"shared_gelu_dropless", SHARED, 2, CG1, 1, 0, 4, 2, 10, 0.0f, 0, 0.01f, 0.0f, 0, 122, 1.0f, 0, -1, 1, 0},
    {"shared_swiglu_drops", SHARED, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 123, 1.0f, 0, -1, 1, 0},
    {"shared_swiglu_dropless", SHARED, 2, CG1, 1, 1, 8, 2, 8, 0.0f, 0, 0.01f, 0.0f, 0, 124, 1.0f, 0, -1, 1, 0},
    {"scmoe1_gelu_drops", SC, 1, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 131, 1.0f, 0, -1, 1, 0},
    {"scmoe1_gelu_dropless", SC, 1, CG1, 1, 0, 4, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 132, 1.0f, 0, -1, 1, 0},
    {"scmoe1_swiglu_drops", SC, 1, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 133, 1.0f, 0, -1, 1, 0},
    {"scmoe1_swiglu_dropless", SC, 1, CG1, 1, 1, 8, 2, 8, 0.0f, 0, 0.01f, 0.0f, 0, 134, 1.0f, 0, -1, 1, 0},
    {"scmoe2_gelu_drops", SC, 2, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 141, 1.0f, 0, -1, 1, 0},
    {"scmoe2_gelu_dropless", SC, 2, CG1, 1, 0, 4, 2, 10, 0.0f, 0, 0.01f, 0.0f, 0, 142, 1.0f, 0, -1, 1, 0},
    {"scmoe2_swiglu_drops", SC, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 143, 1.0f, 0, -1, 1, 0},
    {"scmoe2_swiglu_dropless", SC, 2, CG1, 1, 1, 8, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 144, 1.0f, 0, -1, 1, 0},
    {"scmoe3_gelu_drops", SC, 3, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 151, 1.0f, 0, -1, 1, 0},
    {"scmoe3_gelu_dropless", SC, 3, CG1, 1, 0, 4, 2, 8, 0.0f, 0, 0.01f, 0.0f, 0, 152, 1.0f, 0, -1, 1, 0},
    {"scmoe3_swiglu_drops", SC, 3, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 153, 1.0f, 0, -1, 1, 0},
    {"scmoe3_swiglu_dropless", SC, 3, CG1, 1, 1, 8, 2, 10, 0.0f, 0, 0.01f, 0.0f, 0, 154, 1.0f, 0, -1, 1, 0},
    /* combine, mask, losses, priority, empty batch */
    {"scmoe2_add_gelu_drops", SC, 2, ADD, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 161, 1.0f, 0, -1, 1, 0},
    {"shared_add_swiglu_dropless", SHARED, 2, ADD, 1, 1, 4, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 162, 1.0f, 0, -1, 1, 0},
    {"scmoe3_noncausal_gelu", SC, 3, CG1, 0, 0, 8, 2, 12, 1.0f, 0, 0.01f, 0.0f, -1, 163, 1.0f, 0, -1, 1, 0},
    {"top2_noncausal_swiglu", TOP2, 2, CG1, 0, 1, 4, 2, 10, 0.0f, 0, 0.01f, 0.0f, 0, 164, 1.0f, 0, -1, 1, 0},
    {"scmoe2_lossdominant", SC, 2, CG1, 1, 0, 8, 2, 16, 0.75f, 0, 0.5f, 0.1f, -1, 165, 0.01f, 0, -1, 1, 0},
    {"top2_lossdominant_drops", TOP2, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.5f, 0.1f, 1, 166, 0.01f, 0, -1, 1, 0},
    {"scmoe1_batchprio_drops", SC, 1, CG1, 1, 0, 8, 2, 16, 0.5f, 1, 0.01f, 0.0f, 1, 167, 1.0f, 0, -1, 1, 0},
    {"top2_batchprio_drops", TOP2, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 1, 0.01f, 0.05f, 1, 168, 1.0f, 0, -1, 1, 0},
    {"B0_scmoe2", SC, 2, CG1, 1, 0, 4, 0, 8, 0.5f, 0, 0.01f, 0.1f, 0, 171, 1.0f, 0, -1, 1, 0},
    {"B0_top2_swiglu", TOP2, 2, CG1, 1, 1, 4, 0, 8, 0.0f, 0, 0.01f, 0.1f, 0, 172, 1.0f, 0, -1, 1, 0},
    /* the overlapped schedule (after the profiling steps): expert slot chosen or forced, and overlap off */
    {"ovl_scmoe1_slot3_drops", SC, 1, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.1f, 1, 181, 1.0f, 2, 3, 1, 0},
    {"ovl_scmoe2_slot1_swiglu", SC, 2, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.5f, 0.0f, 1, 182, 1.0f, 2, 1, 1, 0},
    {"ovl_scmoe2_slot3_add", SC, 2, ADD, 1, 0, 8, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 183, 1.0f, 2, 3, 1, 0},
    {"ovl_scmoe3_slot2_batchprio", SC, 3, CG1, 1, 0, 8, 2, 16, 0.5f, 1, 0.01f, 0.0f, 1, 184, 1.0f, 2, 2, 1, 0},
    {"ovl_scmoe3_slot3_noncausal", SC, 3, CG1, 0, 1, 4, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 185, 1.0f, 2, 3, 1, 0},
    {"ovl_scmoe1_auto_lossdom", SC, 1, CG1, 1, 0, 8, 2, 16, 0.75f, 0, 0.5f, 0.1f, -1, 186, 0.01f, 2, -1, 1, 0},
    {"ovl_scmoe2_auto_gelu", SC, 2, CG1, 1, 0, 4, 2, 16, 1.0f, 0, 0.01f, 0.0f, -1, 187, 1.0f, 2, -1, 1, 0},
    {"overlap0_scmoe2_warm", SC, 2, CG1, 1, 1, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 188, 1.0f, 2, 2, 0, 0},
    /* SCMOE_PRECISION_BF16: every arch, both activations, every shortcut position, the overlapped order */
    /* name                        arch    pos comb caus act E  B  T   cf    pr aux_w  z_w  drops seed dy   warm slot ovl bf16 */
    {"bf16_top2_gelu_drops", TOP2, 2, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 201, 1.0f, 0, -1, 1, 1},
    {"bf16_top1_swiglu_dropless", TOP1, 2, CG1, 1, 1, 4, 2, 12, 0.0f, 0, 0.01f, 0.0f, 0, 202, 1.0f, 0, -1, 1, 1},
    {"bf16_shared_gelu_drops", SHARED, 2, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 203, 1.0f, 0, -1, 1, 1},
    {"bf16_scmoe1_swiglu_drops", SC, 1, CG1, 1, 1, 4, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 204, 1.0f, 0, -1, 1, 1},
    {"bf16_scmoe2_add_noncausal", SC, 2, ADD, 0, 0, 8, 2, 12, 0.0f, 0, 0.01f, 0.1f, 0, 205, 1.0f, 0, -1, 1, 1},
    {"bf16_ovl_scmoe3_auto", SC, 3, CG1, 1, 0, 8, 2, 16, 0.5f, 0, 0.01f, 0.0f, 1, 206, 1.0f, 2, -1, 1, 1},
};

enum { D_MODEL = 32, N_HEADS = 4, D_HIDDEN = 48 };

/* What one case came to. The C part runs first for every case; then one oracle process checks every
 * written file (torch loads once: ~1 s per process, most of the test's time otherwise). */
typedef struct {
    int written;    /* the C part succeeded and the file is written */
    int verdict;    /* -1 none from the oracle, 0 FAIL, 1 PASS */
    char why[2048]; /* the C part's failure */
    char file[1024];
    char last[1024]; /* the oracle's verdict line */
    char *output;    /* the oracle's lines for this file (malloc'd) */
} case_result;

static void append(char **buf, size_t *len, size_t *cap, const char *s) {
    size_t l = strlen(s);
    if (*len + l + 1 > *cap) {
        size_t nc = 2 * (*len + l + 1);
        char *nb = realloc(*buf, nc);
        if (!nb) return; /* the output is only shown on failure: losing it is not fatal */
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, l + 1);
    *len += l;
}

static const char *base_name(const char *path) {
    const char *b = strrchr(path, '/');
    return b ? b + 1 : path;
}

/* Runs the oracle on every written file; fills verdict, last and output; returns its exit status or -1.
 * Each file's report ends in a line "pair_ref.py <file>: PASS|FAIL ...", in argument order. */
static int run_oracle(const char *python, const char *script, case_result *r, int n) {
    size_t cl = strlen(python) + strlen(script) + 64;
    for (int i = 0; i < n; i++)
        if (r[i].written) cl += strlen(r[i].file) + 4;
    char *cmd = malloc(cl);
    if (!cmd) return -1;
    size_t off = (size_t)snprintf(cmd, cl, "'%s' '%s'", python, script);
    for (int i = 0; i < n; i++)
        if (r[i].written) off += (size_t)snprintf(cmd + off, cl - off, " '%s'", r[i].file);
    snprintf(cmd + off, cl - off, " 2>&1");
    FILE *p = popen(cmd, "r");
    free(cmd);
    if (!p) return -1;
    int cur = 0; /* the file whose report is being read */
    while (cur < n && !r[cur].written) cur++;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    char line[4096];
    while (fgets(line, sizeof line, p)) {
        append(&buf, &len, &cap, line);
        if (cur < n && !strncmp(line, "pair_ref.py ", 12) && strstr(line, base_name(r[cur].file))) {
            r[cur].verdict = strstr(line, ": PASS") != NULL;
            snprintf(r[cur].last, sizeof r[cur].last, "%.1000s", line);
            size_t ll = strlen(r[cur].last);
            if (ll && r[cur].last[ll - 1] == '\n') r[cur].last[ll - 1] = 0;
            r[cur].output = buf;
            buf = NULL;
            len = cap = 0;
            do cur++;
            while (cur < n && !r[cur].written);
        }
    }
    if (cur < n) r[cur].output = buf; /* whatever came before the oracle stopped */
    else free(buf);
    int st = pclose(p);
    return st == -1 ? -1 : (st & 0xff) ? -1 : (st >> 8) & 0xff;
}

/* The C part of one case: fills r->why on failure, or writes r->file and sets r->written. */
static void run_case(const oracle_case *c, const char *outdir, case_result *r) {
    char why[2048] = "", *file = r->file;
    size_t file_len = sizeof r->file;
    scmoe_context *ctx = NULL;
    scmoe_pair *pair = NULL;
    float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL, *et = NULL;
    scmoe_tensor *pt = NULL;
    FILE *f = NULL;
    const int d = D_MODEL, n = c->B * c->T;
    snprintf(file, file_len, "%s/oracle_pair_%s.scmt", outdir, c->name);
    rng_state = 0x9A1B0000ull + c->seed * 0x100000001B3ull;

    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = d;
    cfg.d_hidden = D_HIDDEN;
    cfg.n_experts = c->E;
    cfg.n_heads = N_HEADS;
    cfg.arch = (scmoe_arch)c->arch;
    cfg.shortcut_pos = c->pos;
    cfg.combine = (scmoe_combine)c->combine;
    cfg.causal = c->causal;
    cfg.max_seq_len = c->T + 2;                               /* T below max_seq_len on purpose */
    cfg.max_tokens = (c->B > 0 ? c->B : 2) * cfg.max_seq_len; /* and B*T below max_tokens */
    cfg.capacity_factor = c->cf;
    cfg.eval_capacity_factor = c->cf;
    cfg.renormalize = 1;
    cfg.activation = c->act ? SCMOE_SWIGLU : SCMOE_GELU;
    cfg.priority = c->prio ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
    cfg.aux_loss_weight = c->aux_w;
    cfg.z_loss_weight = c->z_w;
    cfg.gate_noise_std = 0.0f;
    cfg.seed = c->seed;
    cfg.expert_slot = c->slot;
    cfg.overlap = c->overlap;
    cfg.precision = c->bf16 ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32;

    CHECK(scmoe_context_create(&ctx));
    CHECK(scmoe_pair_create(ctx, &cfg, &pair));
    CHECK(scmoe_pair_set_training(pair, 1));

    int np = scmoe_pair_param_count(pair);
    int has_se = c->arch == SHARED || c->arch == SC;
    /* 2 blocks x (2 LN x 2 + attn 4) + mlp 4 + gate + 4E [+ se 4 [+ cg]] */
    int expect_np = 2 * 8 + 4 + 1 + 4 * c->E + (has_se ? 4 + (c->combine == CG1) : 0);
    if (np != expect_np) {
        snprintf(why, sizeof why, "param_count %d, expected %d", np, expect_np);
        goto done;
    }
    pt = calloc((size_t)np, sizeof *pt);
    if (!pt) {
        snprintf(why, sizeof why, "out of memory");
        goto done;
    }
    int seen_gate = 0, seen_cg = 0;
    for (int i = 0; i < np; i++) {
        scmoe_tensor t;
        CHECK(scmoe_pair_param_at(pair, i, &t));
        pt[i] = t;
        float scale;
        int is_ln = strstr(t.name, ".ln_") != NULL;
        if (is_ln && ends_with(t.name, ".weight")) {
            fill_uniform(t.data, t.numel, 0.3f);
            for (size_t j = 0; j < t.numel; j++) t.data[j] += 1.0f; /* near 1 */
            goto filled;
        }
        if (ends_with(t.name, "gate.weight")) {
            scale = 2.5f / sqrtf((float)t.shape[0]);
            seen_gate = 1;
        } /* O(1) logits */
        else if (ends_with(t.name, "cg.weight")) {
            scale = 0.3f;
            seen_cg = 1;
        } /* w_cg . m1 of O(1): sigmoid not saturated */
        else if (t.ndim == 1)
            scale = is_ln ? 0.3f : 0.2f;              /* biases, nonzero */
        else scale = sqrtf(3.0f / (float)t.shape[0]); /* unit-variance fan-in */
        fill_uniform(t.data, t.numel, scale);
    filled:;
        scmoe_tensor u;
        CHECK(scmoe_pair_param(pair, t.name, &u));
        if (u.data != t.data) {
            snprintf(why, sizeof why, "param(\"%s\") is not param_at(%d)", t.name, i);
            goto done;
        }
    }
    CHECK(scmoe_pair_params_changed(pair)); /* the weights were written: their bf16 copies follow */
    if (!seen_gate || seen_cg != (has_se && c->combine == CG1)) {
        snprintf(why, sizeof why, "parameter names: gate %d, cg %d unexpected", seen_gate, seen_cg);
        goto done;
    }

    size_t nd = (size_t)(n > 0 ? n : 1) * d;
    x = calloc(nd, sizeof *x);
    y = calloc(nd, sizeof *y);
    dy = calloc(nd, sizeof *dy);
    dx = calloc(nd, sizeof *dx);
    et = calloc((size_t)c->E, sizeof *et);
    if (!x || !y || !dy || !dx || !et) {
        snprintf(why, sizeof why, "out of memory");
        goto done;
    }
    fill_uniform(x, (size_t)n * d, 1.0f);
    fill_uniform(dy, (size_t)n * d, c->dy_scale > 0 ? c->dy_scale : 1.0f);

    scmoe_stats st;
    for (int w = 0; w < c->warm; w++) { /* the profiling steps; their gradients are zeroed below */
        CHECK(scmoe_pair_forward(pair, c->B, c->T, x, y, &st));
        CHECK(scmoe_pair_backward(pair, dy, dx, &st));
    }
    for (size_t i = 0; i < (size_t)n * d; i++) y[i] = NAN; /* forward must write y */
    CHECK(scmoe_pair_forward(pair, c->B, c->T, x, y, &st));
    /* which order ran: -1 serialized (the first SCHED_PROFILE_STEPS = 2 steps of a shape, overlap 0, or no
     * shortcut); a forced slot is capped by the 8 dense operations after X_sc (forward) and before dX_sc
     * is needed (backward) */
    int gate_after = c->arch != SC ? 8 : c->pos == 1 ? 5 : c->pos == 2 ? 3 : 1;
    int needed_before = c->arch != SC ? 1 : c->pos == 1 ? 3 : c->pos == 2 ? 5 : 7;
    int overlapped = c->warm >= 2 && c->arch == SC && c->overlap;
    int want_f = !overlapped ? -1 : c->slot < 0 ? -2 : c->slot < 8 - gate_after ? c->slot : 8 - gate_after;
    int want_b = !overlapped ? -1 : c->slot < 0 ? -2 : c->slot < needed_before ? c->slot : needed_before;
    if (want_f == -2 ? st.expert_slot < 0 : st.expert_slot != want_f) {
        snprintf(why, sizeof why, "forward ran in expert slot %d, expected %s%d", st.expert_slot,
                 want_f == -2 ? ">= " : "", want_f == -2 ? 0 : want_f);
        goto done;
    }
    if (!drops_as_expected(c->expect_drops, c->cf, st.dropped, why, sizeof why)) goto done;
    if (st.tokens != n) {
        snprintf(why, sizeof why, "stats.tokens %lld, expected %d", (long long)st.tokens, n);
        goto done;
    }
    int xd[3] = {c->B, c->T, d};
    tio_step step = oracle_step(3, xd, x, dy, y, dx, pt, np, &st, c->E, et);

    CHECK(scmoe_pair_zero_grad(pair));
    for (size_t i = 0; i < nd; i++) dx[i] = NAN; /* backward must overwrite dx */
    CHECK(scmoe_pair_backward(pair, dy, dx, &st));
    if (want_b == -2 ? st.expert_slot < 0 : st.expert_slot != want_b) {
        snprintf(why, sizeof why, "backward ran in expert slot %d, expected %s%d", st.expert_slot,
                 want_b == -2 ? ">= " : "", want_b == -2 ? 0 : want_b);
        goto done;
    }

    f = tio_open_write(file);
    if (!f) {
        snprintf(why, sizeof why, "cannot write %s", file);
        goto done;
    }
    tio_write_scalar(f, "cfg.d_model", (float)d);
    tio_write_scalar(f, "cfg.d_hidden", (float)D_HIDDEN);
    tio_write_scalar(f, "cfg.n_experts", (float)c->E);
    tio_write_scalar(f, "cfg.top_k", (float)(c->arch == TOP2 ? 2 : 1));
    tio_write_scalar(f, "cfg.capacity_factor", c->cf);
    tio_write_scalar(f, "cfg.renormalize", (float)cfg.renormalize);
    tio_write_scalar(f, "cfg.aux_loss_weight", c->aux_w);
    tio_write_scalar(f, "cfg.z_loss_weight", c->z_w);
    tio_write_scalar(f, "cfg.activation", (float)c->act);
    tio_write_scalar(f, "cfg.priority", (float)c->prio);
    tio_write_scalar(f, "cfg.arch", (float)c->arch);
    tio_write_scalar(f, "cfg.shortcut_pos", (float)c->pos);
    tio_write_scalar(f, "cfg.combine", (float)c->combine);
    tio_write_scalar(f, "cfg.n_heads", (float)N_HEADS);
    tio_write_scalar(f, "cfg.causal", (float)c->causal);
    tio_write_scalar(f, "cfg.batch", (float)c->B);
    tio_write_scalar(f, "cfg.seq_len", (float)c->T);
    tio_write_scalar(f, "cfg.precision", (float)c->bf16);
    tio_write_step(f, &step);
    if (fclose(f) != 0) {
        f = NULL;
        snprintf(why, sizeof why, "error writing %s", file);
        goto done;
    }
    f = NULL;

    r->written = 1;

done:
    if (f) fclose(f);
    snprintf(r->why, sizeof r->why, "%s", why);
    free(x);
    free(y);
    free(dy);
    free(dx);
    free(et);
    free(pt);
    scmoe_pair_destroy(pair);
    scmoe_context_destroy(ctx);
}

static void print_comment_lines(const char *s) {
    while (s && *s) {
        const char *nl = strchr(s, '\n');
        int l = nl ? (int)(nl - s) : (int)strlen(s);
        printf("#   %.*s\n", l, s);
        if (!nl) break;
        s = nl + 1;
    }
}

int main(int argc, char **argv) {
    oracle_env env;
    int status = oracle_setup(argc, argv, "pair_ref.py", &env);
    if (status >= 0) return status;
    int n = (int)(sizeof CASES / sizeof CASES[0]);

    case_result *res = calloc((size_t)n, sizeof *res);
    if (!res) {
        printf("Bail out! out of memory\n");
        return 1;
    }
    int written = 0;
    for (int i = 0; i < n; i++) {
        res[i].verdict = -1;
        run_case(&CASES[i], env.outdir, &res[i]);
        written += res[i].written;
    }
    int rc = written ? run_oracle(env.python, env.script, res, n) : 0;

    printf("1..%d\n", n);
    int passed = 0, failed = 0;
    for (int i = 0; i < n; i++) {
        case_result *r = &res[i];
        int pass = r->written && r->verdict == 1;
        printf("%s - %s\n", pass ? "ok" : "not ok", CASES[i].name);
        if (!r->written) printf("#   %s\n", r->why[0] ? r->why : "the C part failed");
        else if (r->verdict == 1) printf("#   %s\n", r->last);
        else {
            print_comment_lines(r->output); /* the oracle's whole report on this file */
            if (r->verdict < 0) printf("#   no verdict from the oracle (exit status %d)\n", rc);
        }
        if (pass) passed++;
        else failed++;
        if (r->written && pass && !env.keep) remove(r->file);
        free(r->output);
    }
    free(res);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
