/* test_ep.c: expert parallelism over MPI equals one rank. Run under mpirun with 1, 2 or 4 ranks: every
 * rank also builds the same object on a private one-rank context, runs the whole global batch
 * through it, and compares its own slice of the outputs and dX, the aux loss, the drop count and
 * every parameter gradient it holds (max |a - b| / max |b| <= 1e-5). Also: ep_size < ranks, all
 * tokens to one expert, a rank with no tokens, mismatched configs, bad input on one rank only; the
 * overlapped order == the serialized one, and token-chunk pipelining == one exchange each way. Capacity
 * per source rank (LOCAL): == 1 rank where nothing is dropped, == each rank's slice run alone where
 * tokens are, the same guarantees otherwise. BATCH priority picks only which rows are kept, so without
 * drops it is TOKEN bit for bit. */
#include "../scmoe.h"
#include "../scmoe_mpi.h"
#include "mpi_check.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, size;
static scmoe_context *ctx_ref; /* one rank of its own, for the 1-rank references */
static int S_global;           /* global tokens of the equivalence cases */

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}
static float urand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) / 8388608.0 - 1.0);
}
static void fill_named(float *x, size_t n, const char *name, float scale, float base) {
    uint64_t s = hash_str(name);
    for (size_t i = 0; i < n; i++) x[i] = base + scale * urand(&s);
}

/* max |a - b| / max |b| over the ranks */
static double relerr(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        num = d > num ? d : num;
        den = fabs(b[i]) > den ? fabs(b[i]) : den;
    }
    double r = n ? num / (den + 1e-30) : 0, all;
    MPI_Allreduce(&r, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

typedef struct {
    int is_pair;
    scmoe_moe *m;
    scmoe_pair *p;
} object;

static scmoe_status obj_create(scmoe_context *ctx, const scmoe_config *c, int is_pair, object *o) {
    o->is_pair = is_pair;
    o->m = NULL;
    o->p = NULL;
    return is_pair ? scmoe_pair_create(ctx, c, &o->p) : scmoe_moe_create(ctx, c, &o->m);
}
static void obj_destroy(object *o) {
    scmoe_pair_destroy(o->p);
    scmoe_moe_destroy(o->m);
}
static int obj_count(object *o) { return o->is_pair ? scmoe_pair_param_count(o->p) : scmoe_moe_param_count(o->m); }
static void obj_at(object *o, int i, scmoe_tensor *t) {
    o->is_pair ? scmoe_pair_param_at(o->p, i, t) : scmoe_moe_param_at(o->m, i, t);
}
static scmoe_status obj_param(object *o, const char *n, scmoe_tensor *t) {
    return o->is_pair ? scmoe_pair_param(o->p, n, t) : scmoe_moe_param(o->m, n, t);
}
static scmoe_status obj_forward(object *o, int rows, int T, const float *x, float *y, scmoe_stats *st) {
    return o->is_pair ? scmoe_pair_forward(o->p, rows / T, T, x, y, st) : scmoe_moe_forward(o->m, rows, x, y, st);
}
static scmoe_status obj_backward(object *o, const float *dy, float *dx, scmoe_stats *st) {
    if (!o->is_pair) return scmoe_moe_backward(o->m, dy, dx, st);
    scmoe_status s = scmoe_pair_backward(o->p, dy, dx, st);
    return s ? s : scmoe_pair_grad_sync(o->p, st);
}

/* Parameters by name, the same values on every rank and in the reference; all_to_one 1 routes every
 * token to expert 0, 2 zeroes the gate (every token the same probabilities). */
static void init_params(object *o, int all_to_one) {
    for (int i = 0; i < obj_count(o); i++) {
        scmoe_tensor t;
        obj_at(o, i, &t);
        int ln = strstr(t.name, "ln_") && strstr(t.name, ".weight");
        fill_named(t.data, t.numel, t.name, ln ? 0.1f : 0.3f, ln ? 1.0f : 0.0f);
        if (all_to_one && strstr(t.name, "gate.weight"))
            for (int r = 0; r < t.shape[0]; r++)
                for (int e = 0; e < t.shape[1]; e++)
                    t.data[r * t.shape[1] + e] = e == 0 && all_to_one == 1 ? 1.0f : 0.0f;
    }
    if (o->is_pair) scmoe_pair_params_changed(o->p); /* bf16 precision: the weights' copies follow */
    else scmoe_moe_params_changed(o->m);
}

/* tokens of each rank: equal slices, or rank 0 empty when `empty0` */
static void split(int S, int T, int empty0, int *first, int *count) {
    int seqs = S / T, per = empty0 && size > 1 ? seqs / (size - 1) : seqs / size;
    int r0 = empty0 && size > 1 ? rank - 1 : rank;
    if (empty0 && size > 1 && rank == 0) {
        *first = 0;
        *count = 0;
        return;
    }
    *first = r0 * per * T;
    *count = per * T;
}

static void equivalence(const char *what, scmoe_context *ctx, scmoe_context *ref, scmoe_config c, int is_pair, int S,
                        int T, int all_to_one, int empty0) {
    int d = c.d_model, first, n;
    split(S, T, empty0, &first, &n);
    if (empty0) { /* the global batch is what the other ranks hold */
        int tot;
        MPI_Allreduce(&n, &tot, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        S = tot;
        c.max_tokens = S;
    }
    scmoe_config cr = c;
    cr.max_tokens = S;
    cr.ep_size = 0;
    object a, b;
    scmoe_status s1 = obj_create(ctx, &c, is_pair, &a), s2 = obj_create(ref, &cr, is_pair, &b);
    check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: create (%s)", what, scmoe_last_error(ctx));
    if (s1 || s2) return;
    init_params(&a, all_to_one);
    init_params(&b, all_to_one);
    float *x = malloc(sizeof(float) * S * d), *dy = malloc(sizeof(float) * S * d);
    float *y = malloc(sizeof(float) * S * d), *yr = malloc(sizeof(float) * S * d);
    float *dx = malloc(sizeof(float) * S * d), *dxr = malloc(sizeof(float) * S * d);
    fill_named(x, (size_t)S * d, "x", 1.0f, all_to_one ? 1.0f : 0.0f);
    fill_named(dy, (size_t)S * d, "dy", 1.0f, 0.0f);
    scmoe_stats st, sr;
    s1 = obj_forward(&a, n, T, x + (size_t)first * d, y, &st);
    s2 = obj_forward(&b, S, T, x, yr, &sr);
    check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: forward (%s)", what, scmoe_last_error(ctx));
    if (s1 || s2) goto out;
    double ey = relerr(y, yr + (size_t)first * d, (size_t)n * d);
    double eaux = fabs(st.aux_loss - sr.aux_loss) / (fabs(sr.aux_loss) + 1e-30);
    check(ey <= 1e-5, "%s: output %s (%.1e)", what, ey == 0 ? "bitwise equal" : "within 1e-5", ey);
    check(eaux <= 1e-5 && st.dropped == sr.dropped && st.tokens == sr.tokens,
          "%s: aux loss (%.1e), dropped %lld == %lld, tokens %lld", what, eaux, (long long)st.dropped,
          (long long)sr.dropped, (long long)st.tokens);
    int counts_ok = 1;
    for (int e = 0; e < c.n_experts; e++) counts_ok &= st.expert_tokens[e] == sr.expert_tokens[e];
    check(counts_ok, "%s: tokens per expert agree", what);
    if (all_to_one == 1)
        check(sr.expert_tokens[0] > 0 && sr.expert_tokens[1] == 0, "%s: every token routed to expert 0", what);
    s1 = obj_backward(&a, dy + (size_t)first * d, dx, &st);
    s2 = obj_backward(&b, dy, dxr, &sr);
    check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: backward (%s)", what, scmoe_last_error(ctx));
    if (s1 || s2) goto out;
    double edx = relerr(dx, dxr + (size_t)first * d, (size_t)n * d);
    check(edx <= 1e-5, "%s: dX %s (%.1e)", what, edx == 0 ? "bitwise equal" : "within 1e-5", edx);
    double eg = 0, eg_dense = 0, eg_exp = 0;
    int missing = 0;
    for (int i = 0; i < obj_count(&a); i++) {
        scmoe_tensor ta, tb;
        obj_at(&a, i, &ta);
        missing |= obj_param(&b, ta.name, &tb) != SCMOE_OK;
        if (missing) break;
        double num = 0, den = 0;
        for (size_t j = 0; j < ta.numel; j++) {
            double dd = fabs((double)ta.grad[j] - tb.grad[j]);
            num = dd > num ? dd : num;
            den = fabs(tb.grad[j]) > den ? fabs(tb.grad[j]) : den;
        }
        double e = num / (den + 1e-30);
        if (ta.replicated) eg_dense = e > eg_dense ? e : eg_dense;
        else eg_exp = e > eg_exp ? e : eg_exp;
    }
    double l[2] = {eg_dense, eg_exp}, g[2];
    MPI_Allreduce(l, g, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    eg = g[0] > g[1] ? g[0] : g[1];
    check(!missing && eg <= 1e-5, "%s: all parameter gradients (dense %.1e, experts %.1e)", what, g[0], g[1]);
out:
    free(x);
    free(dy);
    free(y);
    free(yr);
    free(dx);
    free(dxr);
    obj_destroy(&a);
    obj_destroy(&b);
}

static scmoe_config layer_cfg(int k, float cf) {
    scmoe_config c = scmoe_config_default();
    c.d_model = 24;
    c.d_hidden = 40;
    c.n_experts = size > 8 ? size : 8;
    c.top_k = k;
    c.capacity_factor = cf;
    c.aux_loss_weight = 0.1f;
    c.z_loss_weight = 0.01f;
    c.max_tokens = 64;
    c.max_seq_len = 8;
    return c;
}

static scmoe_config pair_cfg(scmoe_arch arch, int pos, float cf) {
    scmoe_config c = layer_cfg(1, cf);
    c.arch = arch;
    c.shortcut_pos = pos;
    c.n_heads = 4;
    c.max_tokens = 64;
    c.max_seq_len = 8;
    return c;
}

/* max |a - b| / max |b| over every parameter gradient of two objects of the same shape, over the ranks */
static double grads_relerr(object *a, object *b) {
    double worst = 0;
    for (int i = 0; i < obj_count(a); i++) {
        scmoe_tensor ta, tb;
        obj_at(a, i, &ta);
        obj_at(b, i, &tb);
        double e = relerr(ta.grad, tb.grad, ta.numel);
        worst = e > worst ? e : worst;
    }
    return worst;
}

/* Two configs that must compute the same numbers on this communicator (tol 0: bitwise), over 4 training
 * steps: the overlapped and the serialized order (after the schedule's profiling steps, when it really
 * overlaps), or a pipelined exchange and a plain one. */
static void same_numbers(scmoe_context *ctx, int is_pair, scmoe_config ca, scmoe_config cb, double tol,
                         const char *what) {
    ca.poll_cols = cb.poll_cols = 5; /* many tiles, many polls */
    object a, b;
    if (obj_create(ctx, &ca, is_pair, &a) || obj_create(ctx, &cb, is_pair, &b)) {
        check(0, "%s: create", what);
        return;
    }
    init_params(&a, 0);
    init_params(&b, 0);
    int T = is_pair ? 8 : 1, n = 32, d = ca.d_model;
    float *x = malloc(sizeof(float) * n * d), *dy = malloc(sizeof(float) * n * d), *ya = malloc(sizeof(float) * n * d),
          *yb = malloc(sizeof(float) * n * d), *dxa = malloc(sizeof(float) * n * d),
          *dxb = malloc(sizeof(float) * n * d);
    char nm[8];
    snprintf(nm, sizeof nm, "x%d", rank);
    fill_named(x, (size_t)n * d, nm, 1.0f, 0.0f);
    fill_named(dy, (size_t)n * d, "dy", 1.0f, 0.0f);
    int ok = 1, slots = 0;
    double worst = 0;
    scmoe_stats sa, sb;
    for (int step = 0; step < 4; step++) {
        if (is_pair) {
            scmoe_pair_zero_grad(a.p);
            scmoe_pair_zero_grad(b.p);
        } else {
            scmoe_moe_zero_grad(a.m);
            scmoe_moe_zero_grad(b.m);
        }
        ok &= obj_forward(&a, n, T, x, ya, &sa) == SCMOE_OK && obj_forward(&b, n, T, x, yb, &sb) == SCMOE_OK;
        ok &= obj_backward(&a, dy, dxa, &sa) == SCMOE_OK && obj_backward(&b, dy, dxb, &sb) == SCMOE_OK;
        double e[3] = {relerr(ya, yb, (size_t)n * d), relerr(dxa, dxb, (size_t)n * d), grads_relerr(&a, &b)};
        for (int i = 0; i < 3; i++) worst = e[i] > worst ? e[i] : worst;
        slots += sa.expert_slot >= 0;
    }
    check(ok && worst <= tol, "%s: outputs, dX and gradients %s (%.1e)", what, worst == 0 ? "bitwise equal" : "agree",
          worst);
    if (is_pair && ca.arch == SCMOE_ARCH_SCMOE && ca.overlap) check(slots > 0, "%s: the overlapped schedule ran", what);
    free(x);
    free(dy);
    free(ya);
    free(yb);
    free(dxa);
    free(dxb);
    obj_destroy(&a);
    obj_destroy(&b);
}

static void overlap_equals_serial(scmoe_context *ctx, scmoe_config c, const char *what) {
    scmoe_config cs = c;
    cs.overlap = 0;
    c.overlap = 1;
    same_numbers(ctx, 1, c, cs, 0.0, what);
}

/* Token-chunk pipelining: the same numbers as one exchange each way (the forward's rows are independent;
 * backward sums the experts' weight gradients stage by stage, so those may differ in the last bits). */
static void pipelined(scmoe_context *ctx) {
    char what[128];
    const int chunks[] = {1, 3, 16};
    for (int i = 0; i < 3; i++) {
        scmoe_config c = layer_cfg(2, 0.5f), cp = c;
        cp.pipeline_chunks = chunks[i];
        snprintf(what, sizeof what, "layer k=2 drops, %d chunks == unpipelined", chunks[i]);
        same_numbers(ctx, 0, cp, c, 1e-6, what);
    }
    const char *names[] = {"top2", "top1", "shared", "scmoe"};
    const char *prog[] = {"poll", "thread", "none"};
    for (int a = 0; a < 4; a++)
        for (int pg = 0; pg < 3; pg++) {
            scmoe_config c = pair_cfg((scmoe_arch)a, 2, pg == 2 ? 0.5f : 0.0f), cp = c;
            c.progress = cp.progress = (scmoe_progress)pg;
            cp.pipeline_chunks = 2 + pg;
            snprintf(what, sizeof what, "pair %s, progress %s, %d chunks == unpipelined", names[a], prog[pg],
                     cp.pipeline_chunks);
            same_numbers(ctx, 1, cp, c, 1e-6, what);
        }
    scmoe_config c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 1.0f);
    c.pipeline_chunks = 4;
    overlap_equals_serial(ctx, c, "pair scmoe-pos2, 4 chunks: overlapped == serialized");
    c.wire_bf16 = 1;
    scmoe_config cf = c;
    cf.wire_bf16 = 0;
    same_numbers(ctx, 1, c, cf, size == 1 ? 0.0 : 1e-2, "pair scmoe-pos2, 4 chunks, bf16 wire vs float");
    c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.5f);
    c.pipeline_chunks = 3;
    equivalence("pair scmoe-pos2 drops, 3 chunks", ctx, ctx_ref, c, 1, S_global, 8, 0, 0);
    c = layer_cfg(2, 1.0f);
    c.pipeline_chunks = 2;
    equivalence("layer k=2, 2 chunks, rank 0 holding no tokens", ctx, ctx_ref, c, 0, S_global, 1, 0, 1);
}

/* bf16 on the wire: what the rounding of the exchanged rows costs against float exchanges. */
static void wire_bf16(scmoe_context *ctx) {
    scmoe_config c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f), cb = c;
    cb.wire_bf16 = 1;
    object a, b;
    if (obj_create(ctx, &c, 1, &a) || obj_create(ctx, &cb, 1, &b)) {
        check(0, "bf16: create");
        return;
    }
    init_params(&a, 0);
    init_params(&b, 0);
    int n = 32, T = 8, d = c.d_model;
    float *x = malloc(sizeof(float) * n * d), *dy = malloc(sizeof(float) * n * d), *ya = malloc(sizeof(float) * n * d),
          *yb = malloc(sizeof(float) * n * d), *dxa = malloc(sizeof(float) * n * d),
          *dxb = malloc(sizeof(float) * n * d);
    char nm[8];
    snprintf(nm, sizeof nm, "x%d", rank);
    fill_named(x, (size_t)n * d, nm, 1.0f, 0.0f);
    fill_named(dy, (size_t)n * d, "dy", 1.0f, 0.0f);
    scmoe_stats st;
    obj_forward(&a, n, T, x, ya, &st);
    obj_forward(&b, n, T, x, yb, &st);
    obj_backward(&a, dy, dxa, &st);
    obj_backward(&b, dy, dxb, &st);
    double ey = relerr(yb, ya, (size_t)n * d), ed = relerr(dxb, dxa, (size_t)n * d);
    check(size == 1 ? ey == 0 && ed == 0 : ey > 0 && ey < 1e-2 && ed < 1e-2,
          "bf16 wire: output %.2e, dX %.2e relative to float exchanges", ey, ed);
    free(x);
    free(dy);
    free(ya);
    free(yb);
    free(dxa);
    free(dxb);
    obj_destroy(&a);
    obj_destroy(&b);
}

/* SCMOE_PRECISION_BF16: P ranks == 1 rank (the GEMMs round the same fp32 values on every layout, so
 * the fp32 equivalence carries over), the same bits from two objects and from the overlapped and the
 * serialized order, and a difference from fp32 of the size bf16 rounding makes (2^-8 per operand). */
static void precision_bf16(scmoe_context *ctx) {
    scmoe_config c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.5f);
    c.precision = SCMOE_PRECISION_BF16;
    equivalence("bf16: pair scmoe-pos2 drops", ctx, ctx_ref, c, 1, S_global, 8, 0, 0);
    c.arch = SCMOE_ARCH_TOP2;
    c.capacity_factor = 0.0f;
    equivalence("bf16: pair top2 dropless", ctx, ctx_ref, c, 1, S_global, 8, 0, 0);
    scmoe_config l = layer_cfg(2, 0.5f);
    l.precision = SCMOE_PRECISION_BF16;
    equivalence("bf16: layer k=2 drops", ctx, ctx_ref, l, 0, S_global, 1, 0, 0);
    c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 1.0f);
    c.precision = SCMOE_PRECISION_BF16;
    same_numbers(ctx, 1, c, c, 0.0, "bf16: pair scmoe-pos2, two objects");
    overlap_equals_serial(ctx, c, "bf16: pair scmoe-pos2 overlapped == serialized");
    scmoe_config f = c;
    f.precision = SCMOE_PRECISION_FP32;
    object a, b;
    if (obj_create(ctx, &c, 1, &a) || obj_create(ctx, &f, 1, &b)) {
        check(0, "bf16 vs fp32: create");
        return;
    }
    init_params(&a, 0);
    init_params(&b, 0);
    int n = 32, T = 8, d = c.d_model;
    float *x = malloc(sizeof(float) * n * d), *ya = malloc(sizeof(float) * n * d), *yb = malloc(sizeof(float) * n * d);
    fill_named(x, (size_t)n * d, "x", 1.0f, 0.0f);
    scmoe_stats st;
    int ok = obj_forward(&a, n, T, x, ya, &st) == SCMOE_OK && obj_forward(&b, n, T, x, yb, &st) == SCMOE_OK;
    double e = relerr(ya, yb, (size_t)n * d);
    check(ok && e > 0 && e < 3e-2, "bf16 vs fp32: outputs differ by %.2e (bf16 operands: ~2^-8 per GEMM)", e);
    free(x);
    free(ya);
    free(yb);
    obj_destroy(&a);
    obj_destroy(&b);
}

/* The library's two-round gradient all-reduce against MPI's (grad_sync_algo MPI), on the float wire
 * (grad_sync_algo TWO_ROUND) or the bf16 one (grad_sync_bf16). Every rank feeds the same tokens, so each
 * rank's contribution g is the same (up to float rounding of where its rows sat in the experts' GEMMs)
 * and the sum S = P g, sum_i |g_i| = |S|:
 *   bf16: the bound of the comm test, 2^-8 (sum |g_i| + |S|), is 2^-7 |S| (plus a float slack of
 *         1e-6 max |S|), and some element is rounded;
 *   float: two recursive sums of the same P terms in different orders differ by at most
 *         2 (P-1) 2^-24 |S| (first order, plus the same slack); at 2 ranks both are a + b, bitwise.
 * Checked for the dense tensors (summed over all ranks) and, with ep_size = P/2, the replicated experts;
 * the rest (dX, unreplicated experts) is bitwise MPI's run, and every rank holds the same bits. Two
 * pairs with overlap_grad_sync have their sums in flight at once (a model's pairs: the later pair's
 * backward first, both synced after), under every progress policy. One rank: bitwise (nothing travels). */
static void two_round_vs_mpi(scmoe_context *ctx, int bf16) {
    const char *what = bf16 ? "grad_sync_bf16" : "grad_sync_algo TWO_ROUND";
    scmoe_config c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f), f;
    if (bf16) c.grad_sync_bf16 = 2;
    else c.grad_sync_algo = (scmoe_grad_sync_algo)3;
    char msg[160] = "";
    scmoe_pair *bad = NULL;
    scmoe_status vs = scmoe_config_validate(&c, msg, sizeof msg), cs = scmoe_pair_create(ctx, &c, &bad);
    check(vs == SCMOE_ERR_OPTION && strstr(msg, bf16 ? "grad_sync_bf16" : "grad_sync_algo") && cs == SCMOE_ERR_OPTION &&
              !bad,
          "%s = %s is refused: SCMOE_ERR_OPTION (%s)", bf16 ? "grad_sync_bf16" : "grad_sync_algo", bf16 ? "2" : "3",
          msg);
    const char *prog[] = {"poll", "thread", "none"};
    for (int v = -1; v < 7; v++) {
        c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f);
        c.progress = (scmoe_progress)((v < 0 ? 0 : v) % 3);
        c.overlap_grad_sync = v >= 3;
        c.ep_size = v == 6 && size >= 2 ? size / 2 : 0;
        f = c;
        f.grad_sync_algo = SCMOE_GRAD_SYNC_MPI;
        if (bf16) c.grad_sync_bf16 = 1;
        else c.grad_sync_algo = SCMOE_GRAD_SYNC_TWO_ROUND;
        if (v < 0) { /* one rank */
            same_numbers(ctx_ref, 1, c, f, 0.0,
                         bf16 ? "grad_sync_bf16 on one rank: bitwise the float sum"
                              : "grad_sync_algo TWO_ROUND on one rank: bitwise MPI's");
            continue;
        }
        object a, a2, fl;
        if (obj_create(ctx, &c, 1, &a) || obj_create(ctx, &c, 1, &a2) || obj_create(ctx, &f, 1, &fl)) {
            check(0, "%s: create", what);
            return;
        }
        init_params(&a, 0);
        init_params(&a2, 0);
        init_params(&fl, 0);
        int n = 32, T = 8, d = c.d_model;
        size_t nd = (size_t)n * d;
        float *x = malloc(sizeof(float) * nd), *dy = malloc(sizeof(float) * nd), *y = malloc(sizeof(float) * nd),
              *dxa = malloc(sizeof(float) * nd), *dxa2 = malloc(sizeof(float) * nd), *dxf = malloc(sizeof(float) * nd);
        fill_named(x, nd, "x", 1.0f, 0.0f); /* the same tokens on every rank */
        fill_named(dy, nd, "dy", 1.0f, 0.0f);
        scmoe_stats st;
        /* a and a2 as two pairs of one model: both forwards, a2's backward, a's, then both syncs */
        int ok = scmoe_pair_forward(a.p, n / T, T, x, y, &st) == SCMOE_OK &&
                 scmoe_pair_forward(a2.p, n / T, T, x, y, &st) == SCMOE_OK &&
                 scmoe_pair_backward(a2.p, dy, dxa2, &st) == SCMOE_OK &&
                 scmoe_pair_backward(a.p, dy, dxa, &st) == SCMOE_OK && scmoe_pair_grad_sync(a.p, &st) == SCMOE_OK &&
                 scmoe_pair_grad_sync(a2.p, &st) == SCMOE_OK && obj_forward(&fl, n, T, x, y, &st) == SCMOE_OK &&
                 obj_backward(&fl, dy, dxf, &st) == SCMOE_OK;
        ok &= memcmp(dxa, dxf, sizeof(float) * nd) == 0 && memcmp(dxa2, dxf, sizeof(float) * nd) == 0;
        int within = 1, same_bits = 1, rounded = 0, twins = 1, n_summed = 0, first = 0, count = 0;
        /* an expert's replicas: the ranks holding the same experts (one rank's experts are not another's) */
        scmoe_pair_expert_range(a.p, &first, &count);
        MPI_Comm replicas;
        MPI_Comm_split(MPI_COMM_WORLD, first, rank, &replicas);
        for (int i = 0; i < obj_count(&a); i++) {
            scmoe_tensor ta, ta2, tf;
            obj_at(&a, i, &ta);
            obj_at(&a2, i, &ta2);
            obj_at(&fl, i, &tf);
            twins &= memcmp(ta.grad, ta2.grad, sizeof(float) * ta.numel) == 0;
            int expert = strstr(ta.name, "experts.") != NULL, summed = !expert || c.ep_size;
            if (!summed || size == 1) {
                same_bits &= memcmp(ta.grad, tf.grad, sizeof(float) * ta.numel) == 0;
                continue;
            }
            n_summed++;
            double mx = 0, rel = bf16 ? ldexp(1.0, -7) : 2 * (size - 1) * ldexp(1.0, -24);
            for (size_t j = 0; j < ta.numel; j++) mx = fabs(tf.grad[j]) > mx ? fabs(tf.grad[j]) : mx;
            for (size_t j = 0; j < ta.numel; j++) {
                double e = fabs((double)ta.grad[j] - tf.grad[j]);
                within &= e <= rel * fabs(tf.grad[j]) + 1e-6 * mx;
                rounded |= e > 0;
            }
            /* the same bits on every rank */
            uint64_t h = 1469598103934665603ull, lo, hi;
            for (size_t j = 0; j < ta.numel; j++) {
                uint32_t b;
                memcpy(&b, &ta.grad[j], sizeof b);
                h = (h ^ b) * 1099511628211ull;
            }
            MPI_Comm over = expert ? replicas : MPI_COMM_WORLD;
            MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, over);
            MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, over);
            same_bits &= lo == hi;
        }
        MPI_Comm_free(&replicas);
        int any_rounded;
        MPI_Allreduce(&rounded, &any_rounded, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
        /* bf16 rounds something; the float sum at 2 ranks is MPI's a + b bit for bit */
        int as_expected = bf16 ? size == 1 || any_rounded : size != 2 || !any_rounded;
        check(ok && within && same_bits && twins && as_expected,
              "%s, progress %s, overlap_grad_sync %d, ep_size %d: %d summed tensors the same bits on every rank "
              "holding them and within %s of MPI's float sum%s, the rest and dX bitwise MPI's run, two pairs in "
              "flight at once",
              what, prog[c.progress], c.overlap_grad_sync, c.ep_size, n_summed,
              bf16 ? "2^-7 |sum|" : "2 (P-1) 2^-24 |sum|", any_rounded ? "" : " (bitwise)");
        free(x);
        free(dy);
        free(y);
        free(dxa);
        free(dxa2);
        free(dxf);
        obj_destroy(&a);
        obj_destroy(&a2);
        obj_destroy(&fl);
    }
}

/* grad_sync_algo AUTO: the buckets below COMM_TWO_ROUND_MIN_CHUNK floats per rank take MPI's all-reduce,
 * the rest the two rounds. At d_model 64, hidden 256 the pair's MLP (33,088 floats) and attention
 * (16,640) buckets are two-round up to 32 and 16 ranks and the LayerNorms' (128) MPI's: within the float
 * sum-order bound of MPI's run, the same bits on every rank. */
static void grad_sync_auto(scmoe_context *ctx) {
    scmoe_config c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f), f = c;
    c.d_model = 64;
    c.d_hidden = 256;
    c.grad_sync_algo = SCMOE_GRAD_SYNC_AUTO;
    f = c;
    f.grad_sync_algo = SCMOE_GRAD_SYNC_MPI;
    same_numbers(ctx, 1, c, f, size <= 2 ? 0.0 : 1e-6, "grad_sync_algo AUTO against MPI (4 steps)");
}

static void robustness(scmoe_context *ctx) {
    /* a config that differs on one rank: every rank gets an error, nobody hangs */
    scmoe_config c = layer_cfg(1, 1.0f);
    if (rank == size - 1) c.d_hidden = 48;
    scmoe_moe *m = NULL;
    scmoe_status s = scmoe_moe_create(ctx, &c, &m);
    check(size == 1 ? s == SCMOE_OK : s == SCMOE_ERR_CONFIG_MISMATCH,
          "config differing on one rank -> %s on every rank", scmoe_strerror(s));
    scmoe_moe_destroy(m);
    /* an invalid config on one rank only */
    c = layer_cfg(1, 1.0f);
    if (rank == 0) c.top_k = 0;
    s = scmoe_moe_create(ctx, &c, &m);
    check(s != SCMOE_OK && m == NULL, "invalid config on rank 0 only -> an error on every rank (%s)",
          scmoe_strerror(s));
    /* bad input on one rank: a status everywhere, then the layer still works */
    c = layer_cfg(2, 1.0f);
    s = scmoe_moe_create(ctx, &c, &m);
    float *x = calloc(64 * 24, sizeof(float)), *y = calloc(64 * 24, sizeof(float));
    scmoe_stats st;
    s = scmoe_moe_forward(m, rank == size - 1 ? 65 : 16, x, y, &st);
    check(s == SCMOE_ERR_N_TOKENS, "n_tokens too large on one rank -> %s on every rank", scmoe_strerror(s));
    s = scmoe_moe_backward(m, y, x, &st);
    check(s == SCMOE_ERR_STATE, "backward after a failed forward -> %s on every rank", scmoe_strerror(s));
    s = scmoe_moe_forward(m, 16, x, y, &st);
    check(s == SCMOE_OK, "the next good forward works");
    free(x);
    free(y);
    scmoe_moe_destroy(m);
    /* ep_size that does not divide the ranks */
    c = layer_cfg(1, 1.0f);
    c.ep_size = 8;
    s = scmoe_moe_create(ctx, &c, &m);
    check(size % 8 == 0 ? s == SCMOE_OK : s == SCMOE_ERR_EP_SIZE, "ep_size 8 on %d ranks -> %s", size,
          scmoe_strerror(s));
    scmoe_moe_destroy(m);
}

/* ---- capacity per source rank (capacity_scope LOCAL) ---- */

/* LOCAL on this communicator against P independent one-rank runs, each on its own rank's slice: with
 * capacity and priority per source rank, a rank's tokens route as its slice alone would, so outputs and
 * dX agree token by token, the counts are the slices' sums and every gradient is the sum of the slices'
 * (aux and z weights 0: those couple the ranks through global statistics; the oracle checks them).
 * Ranks hold different token counts, so their capacities differ. */
static void local_slices(const char *what, scmoe_context *ctx, scmoe_config c, int is_pair) {
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    c.aux_loss_weight = c.z_loss_weight = 0;
    int T = is_pair ? 8 : 1, n = 8 * (2 + rank % 3), d = c.d_model;
    object a, b;
    scmoe_config cr = c;
    cr.ep_size = 0;
    scmoe_status s1 = obj_create(ctx, &c, is_pair, &a), s2 = obj_create(ctx_ref, &cr, is_pair, &b);
    check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: create (%s%s)", what, scmoe_last_error(ctx),
          scmoe_last_error(ctx_ref));
    if (s1 || s2) return;
    init_params(&a, 0);
    init_params(&b, 0);
    float *x = malloc(sizeof(float) * n * d), *dy = malloc(sizeof(float) * n * d), *ya = malloc(sizeof(float) * n * d),
          *yb = malloc(sizeof(float) * n * d), *dxa = malloc(sizeof(float) * n * d),
          *dxb = malloc(sizeof(float) * n * d);
    char nm[16];
    snprintf(nm, sizeof nm, "x%d", rank);
    fill_named(x, (size_t)n * d, nm, 1.0f, 0.0f);
    snprintf(nm, sizeof nm, "dy%d", rank);
    fill_named(dy, (size_t)n * d, nm, 1.0f, 0.0f);
    scmoe_stats sa, sb;
    s1 = obj_forward(&a, n, T, x, ya, &sa);
    s2 = obj_forward(&b, n, T, x, yb, &sb);
    check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: forward (%s)", what, scmoe_last_error(ctx));
    if (s1 || s2) goto out;
    int E = c.n_experts;
    int64_t mine[2 + 64] = {sb.tokens, sb.dropped}, sum[2 + 64];
    for (int e = 0; e < E; e++) mine[2 + e] = sb.expert_tokens[e];
    MPI_Allreduce(mine, sum, 2 + E, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    int counts_ok = sa.tokens == sum[0] && sa.dropped == sum[1] && sa.capacity == sb.capacity;
    for (int e = 0; e < E; e++) counts_ok &= sa.expert_tokens[e] == sum[2 + e];
    check(counts_ok, "%s: tokens %lld, dropped %lld, per expert: the slices' sums; capacity this rank's own (%lld)",
          what, (long long)sa.tokens, (long long)sa.dropped, (long long)sa.capacity);
    double ey = relerr(ya, yb, (size_t)n * d);
    check(ey <= 1e-5, "%s: output == the slice's alone %s (%.1e)", what, ey == 0 ? "bitwise" : "within 1e-5", ey);
    s1 = obj_backward(&a, dy, dxa, &sa);
    s2 = obj_backward(&b, dy, dxb, &sb);
    check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: backward (%s)", what, scmoe_last_error(ctx));
    if (s1 || s2) goto out;
    double edx = relerr(dxa, dxb, (size_t)n * d), eg = 0;
    int missing = 0;
    for (int i = 0; i < obj_count(&b); i++) { /* every rank's b holds every tensor: sum them in the same order */
        scmoe_tensor tb, ta;
        obj_at(&b, i, &tb);
        float *g = malloc(sizeof(float) * tb.numel);
        MPI_Allreduce(tb.grad, g, (int)tb.numel, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double num = 0, den = 0;
        if (obj_param(&a, tb.name, &ta) == SCMOE_OK) {
            missing |= ta.numel != tb.numel;
            for (size_t j = 0; !missing && j < tb.numel; j++) {
                double dd = fabs((double)ta.grad[j] - g[j]);
                num = dd > num ? dd : num;
                den = fabs(g[j]) > den ? fabs(g[j]) : den;
            }
        }
        double e = num / (den + 1e-30);
        eg = e > eg ? e : eg;
        free(g);
    }
    double all;
    MPI_Allreduce(&eg, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    check(edx <= 1e-5 && !missing && all <= 1e-5, "%s: dX (%.1e) and every gradient == the slices' sum (%.1e)", what,
          edx, all);
out:
    free(x);
    free(dy);
    free(ya);
    free(yb);
    free(dxa);
    free(dxb);
    obj_destroy(&a);
    obj_destroy(&b);
}

/* a forward with n tokens on rank bad_rank (x NULL if null_x) and 16 elsewhere: status on every rank,
 * then backward refused and the next good forward fine */
static void local_bad_input(scmoe_context *ctx, scmoe_config c, int bad_rank, int n_bad, int null_x, scmoe_status want,
                            const char *what) {
    scmoe_moe *m = NULL;
    scmoe_status s = scmoe_moe_create(ctx, &c, &m);
    float *x = calloc(64 * 24, sizeof(float)), *y = calloc(64 * 24, sizeof(float));
    scmoe_stats st;
    s = scmoe_moe_forward(m, rank == bad_rank ? n_bad : 16, rank == bad_rank && null_x ? NULL : x, y, &st);
    check(s == want, "%s -> %s on every rank (%s)", what, scmoe_strerror(s), scmoe_last_error(ctx));
    s = scmoe_moe_backward(m, y, x, &st);
    check(s == SCMOE_ERR_STATE, "%s: backward after it -> %s", what, scmoe_strerror(s));
    s = scmoe_moe_forward(m, 16, x, y, &st);
    if (!s) s = scmoe_moe_backward(m, y, x, &st);
    check(s == SCMOE_OK && st.tokens == 16 * size, "%s: the next good step works (%lld tokens)", what,
          (long long)st.tokens);
    free(x);
    free(y);
    scmoe_moe_destroy(m);
}

static void capacity_local(scmoe_context *ctx) {
    char what[128];
    /* nothing dropped, TOKEN priority: LOCAL routes exactly as GLOBAL, so P ranks == 1 rank again */
    for (int k = 1; k <= 2; k++) {
        scmoe_config c = layer_cfg(k, 0.0f);
        c.capacity_scope = SCMOE_CAPACITY_LOCAL;
        snprintf(what, sizeof what, "LOCAL layer k=%d dropless == 1 rank", k);
        equivalence(what, ctx, ctx_ref, c, 0, S_global, 1, 0, 0);
    }
    scmoe_config c = layer_cfg(2, 0.0f);
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    c.pipeline_chunks = 2;
    equivalence("LOCAL layer k=2 dropless, 2 chunks, rank 0 holding no tokens == 1 rank", ctx, ctx_ref, c, 0, S_global,
                1, 0, 1);
    if (size >= 2) {
        c = layer_cfg(2, 0.0f);
        c.capacity_scope = SCMOE_CAPACITY_LOCAL;
        c.ep_size = size / 2;
        equivalence("LOCAL layer k=2 dropless, ep_size P/2 == 1 rank", ctx, ctx_ref, c, 0, S_global, 1, 0, 0);
    }
    c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f);
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    equivalence("LOCAL pair scmoe-pos2 dropless == 1 rank", ctx, ctx_ref, c, 1, S_global, 8, 0, 0);

    /* and on this communicator bitwise: the same rows reach every expert in the same order */
    c = layer_cfg(2, 0.0f);
    scmoe_config cg = c;
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    same_numbers(ctx, 0, c, cg, 0.0, "LOCAL layer k=2 dropless == GLOBAL on this communicator");
    c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f);
    cg = c;
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    same_numbers(ctx, 1, c, cg, 0.0, "LOCAL pair scmoe-pos2 dropless == GLOBAL on this communicator");

    /* with drops: P ranks == P slices run alone */
    for (int k = 1; k <= 2; k++)
        for (int prio = 0; prio < 2; prio++) {
            c = layer_cfg(k, 0.5f);
            c.priority = (scmoe_priority)prio;
            snprintf(what, sizeof what, "LOCAL layer k=%d drops, %s priority", k, prio ? "batch" : "token");
            local_slices(what, ctx, c, 0);
        }
    c = layer_cfg(2, 0.75f);
    c.pipeline_chunks = 3;
    if (size >= 2) c.ep_size = size / 2;
    local_slices("LOCAL layer k=2 drops, 3 chunks, ep_size P/2", ctx, c, 0);
    const char *names[] = {"top2", "top1", "shared", "scmoe"};
    for (int a = 0; a < 4; a++) {
        c = pair_cfg((scmoe_arch)a, 2, 0.5f);
        snprintf(what, sizeof what, "LOCAL pair %s drops", names[a]);
        local_slices(what, ctx, c, 1);
    }

    /* the schedules agree bitwise; pipelining agrees */
    const char *prog[] = {"poll", "thread", "none"};
    for (int a = 0; a < 4; a++)
        for (int pg = 0; pg < 3; pg++) {
            c = pair_cfg((scmoe_arch)a, 2, 0.5f);
            c.capacity_scope = SCMOE_CAPACITY_LOCAL;
            c.progress = (scmoe_progress)pg;
            snprintf(what, sizeof what, "LOCAL pair %s drops, progress %s", names[a], prog[pg]);
            overlap_equals_serial(ctx, c, what);
        }
    c = layer_cfg(2, 0.5f);
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    scmoe_config cp = c;
    cp.pipeline_chunks = 3;
    same_numbers(ctx, 0, cp, c, 1e-6, "LOCAL layer k=2 drops, 3 chunks == unpipelined");

    /* one rank: LOCAL is GLOBAL bit for bit, drops, batch priority and losses included */
    c = layer_cfg(2, 0.5f);
    c.priority = SCMOE_PRIORITY_BATCH;
    c.gate_noise_std = 1.0f;
    cg = c;
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    same_numbers(ctx_ref, 0, c, cg, 0.0, "one rank: LOCAL layer k=2 drops, batch priority, noise == GLOBAL");
    c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.5f);
    cg = c;
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    same_numbers(ctx_ref, 1, c, cg, 0.0, "one rank: LOCAL pair scmoe drops == GLOBAL");

    /* bad input on one rank: the same status everywhere, also in the other expert-parallel group */
    c = layer_cfg(2, 1.0f);
    c.capacity_scope = SCMOE_CAPACITY_LOCAL;
    local_bad_input(ctx, c, size - 1, 65, 0, SCMOE_ERR_N_TOKENS, "LOCAL: n_tokens too large on the last rank");
    if (size >= 2) c.ep_size = size / 2;
    local_bad_input(ctx, c, 0, 16, 1, SCMOE_ERR_NULL, "LOCAL, ep_size P/2: NULL input on rank 0");
    c.check_finite = 1;
    local_bad_input(ctx, c, size - 1, -1, 0, SCMOE_ERR_N_TOKENS,
                    "LOCAL, ep_size P/2: negative n_tokens on the last rank");
}

/* BATCH priority without drops: TOKEN's numbers bit for bit (outputs, dX, every gradient), since the
 * priority picks only which rows are kept and every layout is by round, then token (route.c) */
static void batch_dropless(scmoe_context *ctx) {
    const char *what[] = {"layer k=2", "layer k=2, capacity LOCAL", "layer k=2, 3 chunks", "pair scmoe-pos2"};
    for (int i = 0; i < 4; i++) {
        scmoe_config c = i < 3 ? layer_cfg(2, 0.0f) : pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.0f), cb;
        if (i == 1) c.capacity_scope = SCMOE_CAPACITY_LOCAL;
        if (i == 2) c.pipeline_chunks = 3;
        cb = c;
        cb.priority = SCMOE_PRIORITY_BATCH;
        char msg[96];
        snprintf(msg, sizeof msg, "%s dropless: BATCH priority == TOKEN", what[i]);
        same_numbers(ctx, i == 3, cb, c, 0.0, msg);
    }
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    scmoe_context *ctx, *ref;
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx) || scmoe_context_create(&ref)) {
        printf("not ok - context\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int S = 64 * size > 128 ? 128 : 64 * size; /* global tokens; each rank holds S / size */
    ctx_ref = ref;
    S_global = S;
    char what[96];
    for (int k = 1; k <= 2; k++)
        for (int drops = 0; drops < 2; drops++) {
            float cf = drops ? 0.5f : 0.0f;
            scmoe_config c = layer_cfg(k, cf);
            snprintf(what, sizeof what, "layer k=%d %s", k, drops ? "drops" : "dropless");
            equivalence(what, ctx, ref, c, 0, S, 1, 0, 0);
        }
    scmoe_config c = layer_cfg(2, 0.5f);
    c.priority = SCMOE_PRIORITY_BATCH;
    equivalence("layer k=2 batch priority drops", ctx, ref, c, 0, S, 1, 0, 0);
    batch_dropless(ctx);
    c = layer_cfg(1, 1.0f);
    c.aux_scope = SCMOE_AUX_GLOBAL;
    equivalence("layer all tokens to expert 0 (drops)", ctx, ref, c, 0, S, 1, 1, 0);
    c.capacity_factor = 0;
    equivalence("layer all tokens to expert 0 (dropless)", ctx, ref, c, 0, S, 1, 1, 0);
    /* a gate of zeros: every token the same top-1 score (1/E) and the same two experts, so BATCH
     * priority's selection keeps the first of tied tokens (all_to_one 2) */
    c = layer_cfg(2, 1.0f);
    c.priority = SCMOE_PRIORITY_BATCH;
    equivalence("layer batch priority, every score tied (a gate of zeros)", ctx, ref, c, 0, S, 1, 2, 0);
    equivalence("layer with rank 0 holding no tokens", ctx, ref, layer_cfg(2, 1.0f), 0, S, 1, 0, 1);
    if (size >= 2) {
        c = layer_cfg(2, 0.5f);
        c.ep_size = size / 2;
        snprintf(what, sizeof what, "layer ep_size %d of %d (replicated experts)", size / 2, size);
        equivalence(what, ctx, ref, c, 0, S, 1, 0, 0);
        c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.5f);
        c.ep_size = size / 2;
        snprintf(what, sizeof what, "pair scmoe ep_size %d of %d", size / 2, size);
        equivalence(what, ctx, ref, c, 1, S, 8, 0, 0);
    }
    const char *names[] = {"top2", "top1", "shared", "scmoe"};
    for (int a = 0; a < 4; a++)
        for (int pos = 1; pos <= (a == 3 ? 3 : 1); pos++)
            for (int drops = 0; drops < 2; drops++) {
                c = pair_cfg((scmoe_arch)a, a == 3 ? pos : 2, drops ? 0.5f : 0.0f);
                snprintf(what, sizeof what, "pair %s%s %s", names[a],
                         a == 3 ? (pos == 1   ? "-pos1"
                                   : pos == 2 ? "-pos2"
                                              : "-pos3")
                                : "",
                         drops ? "drops" : "dropless");
                equivalence(what, ctx, ref, c, 1, S, 8, 0, 0);
            }
    /* BATCH priority with drops in the pair: the selection's rounds, each started by the poll that finds
     * the one before landed (the shortcut block's), or by the dispatch's wait */
    for (int pg = 0; pg < 3; pg++) {
        c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 0.5f);
        c.priority = SCMOE_PRIORITY_BATCH;
        c.progress = (scmoe_progress)pg;
        snprintf(what, sizeof what, "pair scmoe-pos2 batch priority drops, progress %s",
                 (const char *[]){"poll", "thread", "none"}[pg]);
        equivalence(what, ctx, ref, c, 1, S, 8, 0, 0);
    }
    c = pair_cfg(SCMOE_ARCH_SCMOE, 2, 1.0f);
    c.progress = SCMOE_PROGRESS_THREAD;
    equivalence("pair scmoe-pos2 progress thread", ctx, ref, c, 1, S, 8, 0, 0);
    c.progress = SCMOE_PROGRESS_NONE;
    equivalence("pair scmoe-pos2 no progress", ctx, ref, c, 1, S, 8, 0, 0);
    c.progress = SCMOE_PROGRESS_POLL;
    c.overlap_grad_sync = 1;
    equivalence("pair scmoe-pos2 overlapped gradient sync", ctx, ref, c, 1, S, 8, 0, 0);
    const char *prog[] = {"poll", "thread", "none"};
    for (int a = 0; a < 4; a++)
        for (int pg = 0; pg < 3; pg++) {
            c = pair_cfg((scmoe_arch)a, 2, 1.0f);
            c.progress = (scmoe_progress)pg;
            c.overlap_grad_sync = pg == 1;
            snprintf(what, sizeof what, "pair %s, progress %s", names[a], prog[pg]);
            overlap_equals_serial(ctx, c, what);
        }
    for (int pos = 1; pos <= 3; pos += 2) {
        c = pair_cfg(SCMOE_ARCH_SCMOE, pos, 0.5f);
        snprintf(what, sizeof what, "pair scmoe-pos%d drops, progress poll", pos);
        overlap_equals_serial(ctx, c, what);
    }
    wire_bf16(ctx);
    precision_bf16(ctx);
    two_round_vs_mpi(ctx, 1);
    two_round_vs_mpi(ctx, 0);
    grad_sync_auto(ctx);
    pipelined(ctx);
    robustness(ctx);
    capacity_local(ctx);
    scmoe_context_destroy(ref);
    scmoe_context_destroy(ctx);
    if (rank == 0) printf("%d passed, %d failed\n", check_passed, check_failed);
    MPI_Finalize();
    return check_failed ? 1 : 0;
}
