/* test_schedule.c: the slot chooser against brute force on synthetic times, the trace file, the bf16
 * wire's error against float exchanges, and a block that is not the pair run by the same schedule. */
#include "../schedule.h"
#include "check.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static double cost(const double *ops, int n, int K, double td, double te, double tc) {
    double pre = 0, post = 0;
    for (int i = 0; i < n; i++) *(i < K ? &pre : &post) += ops[i];
    return (pre > td ? pre : td) + te + (post > tc ? post : tc);
}

static void chooser(void) {
    srand(5);
    int agree = 1;
    for (int trial = 0; trial < 2000; trial++) {
        int n = 1 + rand() % 7;
        double ops[8], td = rand() % 100, te = rand() % 50, tc = rand() % 100;
        for (int i = 0; i < n; i++) ops[i] = rand() % 60;
        int K = scmoe__schedule_choose_slot(ops, n, td, te, tc);
        for (int j = 0; j <= n; j++) agree &= cost(ops, n, K, td, te, tc) <= cost(ops, n, j, td, te, tc) + 1e-9;
    }
    CHECK(agree, "slot chooser finds the minimum of max(pre, T_disp) + T_exp + max(post, T_comb) in 2000 random cases");
    double ops[3] = {30, 20, 10};
    CHECK(scmoe__schedule_choose_slot(ops, 3, 25, 5, 12) == 1,
          "MLP 30, attn 20, SE 10, dispatch 25, combine 12 -> slot 1 (after MLP)");
    CHECK(scmoe__schedule_choose_slot(ops, 3, 0, 5, 100) == 0, "a long combine puts the experts first");
    CHECK(scmoe__schedule_choose_slot(ops, 3, 100, 5, 0) == 3, "a long dispatch puts the experts last");
}

static scmoe_config tiny(void) {
    scmoe_config c = scmoe_config_default();
    c.d_model = 32;
    c.d_hidden = 48;
    c.n_experts = 4;
    c.n_heads = 4;
    c.max_tokens = 64;
    c.max_seq_len = 16;
    return c;
}

static void trace(void) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    scmoe_config c = tiny();
    scmoe_pair *p;
    scmoe_pair_create(ctx, &c, &p);
    const char *path = "build/tests/trace_test.json";
    CHECK(scmoe_pair_trace(p, path) == SCMOE_OK, "trace opens");
    float *x = calloc(64 * 32, sizeof(float)), *y = calloc(64 * 32, sizeof(float));
    for (int i = 0; i < 64 * 32; i++) x[i] = sinf((float)i);
    scmoe_stats st;
    for (int step = 0; step < 3; step++) {
        scmoe_pair_forward(p, 4, 16, x, y, &st);
        scmoe_pair_backward(p, x, y, &st);
    }
    scmoe_pair_trace(p, NULL);
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 -c \"import json,sys; e=json.load(open('%s')); "
             "t={x.get('tid') for x in e if x.get('ph')=='X'}; n={x['name'] for x in e}; "
             "sys.exit(0 if {0,1} <= t and 'experts' in n and 'dispatch' in n and 'attn1_bwd' in n else 1)\"",
             path);
    CHECK(system(cmd) == 0, "the trace is valid JSON with compute and communication lanes");
    CHECK(scmoe_pair_trace(p, "/nonexistent-dir/t.json") == SCMOE_ERR_IO, "an unwritable trace path -> SCMOE_ERR_IO");
    free(x);
    free(y);
    scmoe_pair_destroy(p);
    scmoe_context_destroy(ctx);
}

static void wire_bf16(void) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    scmoe_config a = tiny(), b = tiny();
    b.wire_bf16 = 1;
    scmoe_pair *pa, *pb;
    scmoe_pair_create(ctx, &a, &pa);
    scmoe_pair_create(ctx, &b, &pb);
    size_t n = 64 * 32;
    float *x = malloc(sizeof(float) * n), *ya = malloc(sizeof(float) * n), *yb = malloc(sizeof(float) * n);
    float *dxa = malloc(sizeof(float) * n), *dxb = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] = sinf(0.37f * i);
    /* a routed branch that matters: scale the experts up */
    for (int i = 0; i < scmoe_pair_param_count(pa); i++) {
        scmoe_tensor ta, tb;
        scmoe_pair_param_at(pa, i, &ta);
        scmoe_pair_param_at(pb, i, &tb);
        if (strstr(ta.name, "experts") && ta.ndim == 2)
            for (size_t j = 0; j < ta.numel; j++) ta.data[j] = tb.data[j] *= 10.0f;
    }
    scmoe_stats st;
    scmoe_pair_forward(pa, 4, 16, x, ya, &st);
    scmoe_pair_forward(pb, 4, 16, x, yb, &st);
    scmoe_pair_backward(pa, x, dxa, &st);
    scmoe_pair_backward(pb, x, dxb, &st);
    double ey = 0, my = 0, ed = 0, md = 0;
    for (size_t i = 0; i < n; i++) {
        ey = fmax(ey, fabs(ya[i] - yb[i]));
        my = fmax(my, fabs(ya[i]));
        ed = fmax(ed, fabs(dxa[i] - dxb[i]));
        md = fmax(md, fabs(dxa[i]));
    }
    /* one rank: nothing travels, so nothing is rounded (tests/test_ep.c measures the wire on 2 and 4 ranks) */
    CHECK(ey == 0 && ed == 0, "bf16 wire on one rank: own rows never travel, outputs and dX unchanged (%.1e, %.1e)",
          ey / my, ed / md);
    free(x);
    free(ya);
    free(yb);
    free(dxa);
    free(dxb);
    scmoe_pair_destroy(pa);
    scmoe_pair_destroy(pb);
    scmoe_context_destroy(ctx);
}

/* ---- a block that is not the pair, run by schedule.c unchanged ----
 * x -> h = 2x ("double", the MoE's input) -> z = h + 1 ("shift") -> y = z ("out"), then y += MoE(h).
 * Backward: dz = dy, dh = dz, dh += dMoE/dh (the schedule adds it before "double"'s backward), dx = 2 dh. */
typedef struct toy {
    size_t n;
    const float *x, *dy;
    float *h, *z, *y, *dz, *dh, *dx;
} toy;
static void toy_double(void *s) {
    toy *t = s;
    for (size_t i = 0; i < t->n; i++) t->h[i] = 2.0f * t->x[i];
}
static void toy_double_bwd(void *s) {
    toy *t = s;
    for (size_t i = 0; i < t->n; i++) t->dx[i] = 2.0f * t->dh[i];
}
static void toy_shift(void *s) {
    toy *t = s;
    for (size_t i = 0; i < t->n; i++) t->z[i] = t->h[i] + 1.0f;
}
static void toy_shift_bwd(void *s) {
    toy *t = s;
    memcpy(t->dh, t->dz, sizeof(float) * t->n);
}
static void toy_out(void *s) {
    toy *t = s;
    memcpy(t->y, t->z, sizeof(float) * t->n);
}
static void toy_out_bwd(void *s) {
    toy *t = s;
    memcpy(t->dz, t->dy, sizeof(float) * t->n);
}
static const sched_op toy_ops[3] = {
    {"double", toy_double, toy_double_bwd}, {"shift", toy_shift, toy_shift_bwd}, {"out", toy_out, toy_out_bwd}};

/* Four training steps of the toy block in one order; y, dx and the MoE's gradients of the last step. */
static void toy_run(scmoe_context *ctx, scmoe_config c, int rows, const float *x, const float *dy, float *y, float *dx,
                    float *grads, int *slot) {
    size_t n = (size_t)rows * c.d_model;
    param_table pt;
    moe_layer m;
    memset(&pt, 0, sizeof pt);
    toy t = {n, x, dy, calloc(n, 4), calloc(n, 4), y, calloc(n, 4), calloc(n, 4), dx};
    scheduler s;
    int ok = !scmoe__moe_init(&m, ctx, &c, c.top_k, &pt, "", 0.02f) &&
             !scmoe__params_allocate(&pt, ctx->compute, 0, 0) && !scmoe__moe_alloc(&m);
    sched_block b = {.self = &t,
                     .ops = toy_ops,
                     .n_ops = 3,
                     .moe_input_op = 0,
                     .overlap = 1,
                     .gate_grads = {NULL, 0, ctx->world, NULL, COMM_WIRE_F32, NULL},
                     .expert_grads = {NULL, 0, ctx->world, NULL, COMM_WIRE_F32, NULL}};
    for (int i = 0; i < 3; i++) b.op_grads[i] = (sched_bucket){NULL, 0, ctx->world, NULL, COMM_WIRE_F32, NULL};
    ok = ok && !scmoe__schedule_init(&s, ctx, &c, &b);
    exec ex = scmoe__context_exec(ctx, &c);
    m.training = 1;
    scmoe_stats st = {0};
    for (int step = 0; step < 4 && ok; step++) {
        scmoe__params_zero_grad(&pt);
        sched_moe f = {&m, t.h, NULL, y, NULL}, g = {&m, NULL, t.dh, NULL, dy};
        ok = !scmoe__schedule_forward(&s, &ex, &f, rows) && !scmoe__schedule_backward(&s, &ex, &g, rows) &&
             !scmoe__schedule_grad_wait(&s);
    }
    scmoe__schedule_fill_stats(&s, &st, 0);
    *slot = ok ? st.expert_slot : -2;
    for (int i = 0, o = 0; i < pt.n; i++) {
        memcpy(grads + o, pt.p[i].t.grad, sizeof(float) * pt.p[i].t.numel);
        o += (int)pt.p[i].t.numel;
    }
    scmoe__moe_free(&m);
    scmoe__params_free(&pt);
    free(t.h);
    free(t.z);
    free(t.dz);
    free(t.dh);
}

static double max_rel(const float *a, const float *b, size_t n) {
    double e = 0, m = 1e-30;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return e / m;
}

static void other_block(void) {
    scmoe_context *ctx;
    scmoe_context_create(&ctx);
    scmoe_config c = tiny();
    c.top_k = 2;
    c.capacity_factor = 1.0f;
    c.expert_slot = 1;
    int rows = 48;
    size_t n = (size_t)rows * c.d_model, ng = 1 << 16;
    float *x = malloc(4 * n), *dy = malloc(4 * n), *h = malloc(4 * n), *y[2], *dx[2], *g[2];
    for (size_t i = 0; i < n; i++)
        x[i] = sinf(0.37f * (float)i), dy[i] = 0.01f * cosf(0.11f * (float)i), h[i] = 2.0f * x[i];
    int slot[2];
    for (int o = 0; o < 2; o++) {
        y[o] = malloc(4 * n);
        dx[o] = malloc(4 * n);
        g[o] = calloc(ng, 4);
        scmoe_config co = c;
        co.overlap = o;
        toy_run(ctx, co, rows, x, dy, y[o], dx[o], g[o], &slot[o]);
    }
    CHECK(slot[0] == -1 && slot[1] == 1, "a 3-op block: serialized, and overlapped with the experts in slot 1 (%d, %d)",
          slot[0], slot[1]);
    CHECK(!memcmp(y[0], y[1], 4 * n) && !memcmp(dx[0], dx[1], 4 * n) && !memcmp(g[0], g[1], 4 * ng),
          "a 3-op block: overlapped == serialized, bitwise (y, dx, every MoE gradient)");
    /* the same MoE as the public layer: y = 2x + 1 + MoE(2x), dx = 2 (dy + dMoE/dh^T dy) */
    scmoe_moe *l;
    scmoe_moe_create(ctx, &c, &l);
    float *yl = malloc(4 * n), *dxl = malloc(4 * n), *ref = calloc(n, 4);
    scmoe_stats st;
    for (int step = 0; step < 4; step++) {
        scmoe_moe_zero_grad(l);
        scmoe_moe_forward(l, rows, h, yl, &st);
        scmoe_moe_backward(l, dy, dxl, &st);
    }
    for (size_t i = 0; i < n; i++) ref[i] = (2.0f * x[i] + 1.0f) + yl[i];
    double ey = max_rel(y[1], ref, n);
    for (size_t i = 0; i < n; i++) ref[i] = 2.0f * (dy[i] + dxl[i]);
    double ed = max_rel(dx[1], ref, n), eg = 0;
    for (int i = 0, o = 0; i < scmoe_moe_param_count(l); i++) {
        scmoe_tensor t;
        scmoe_moe_param_at(l, i, &t);
        eg = fmax(eg, max_rel(g[1] + o, t.grad, t.numel));
        o += (int)t.numel;
    }
    CHECK(ey < 1e-6 && ed < 1e-6 && eg < 1e-6,
          "a 3-op block == the public layer on h = 2x: y %.1e, dx %.1e, grads %.1e", ey, ed, eg);
    scmoe_moe_destroy(l);
    for (int o = 0; o < 2; o++) {
        free(y[o]);
        free(dx[o]);
        free(g[o]);
    }
    free(x);
    free(dy);
    free(h);
    free(yl);
    free(dxl);
    free(ref);
    scmoe_context_destroy(ctx);
}

/* Tiles sized by time (kernels/exec.h): a GEMM table that records each call's column count, and a poll
 * hook that counts. */
static int tile_calls, tile_n[256], tile_polls;
static void record_gemm(const blas_backend *self, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                        int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (tile_calls < 256) tile_n[tile_calls] = N;
    tile_calls++;
}
static void record_gemm_bf16(const blas_backend *self, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                             const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb, int ldb, float beta,
                             float *C, int ldc) {
    record_gemm(self, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
static void count_poll(void *arg) { tile_polls++; }
static int one_thread(void) { return 1; }

static void tiles_by_time(void) {
    blas_backend rec = {"record", record_gemm, one_thread, record_gemm_bf16, NULL, NULL, NULL};
    exec ex = {.blas = &rec, .poll = count_poll, .poll_us = 1000, .gflops = {50, 700}};
    /* M 512, K 768: 2 M K = 786432 flops a column; fp32 at 50 GFLOP/s: 1000 us = 50e6 flops = 63.6 columns -> 64;
     * bf16 at 700: 890.2 -> 896 */
    int M = 512, K = 768, N = 3072;
    struct {
        int bf16, poll_cols, want_tile, want_calls;
        const char *what;
    } cases[] = {{0, 0, 64, 48, "fp32 at 50 GFLOP/s: 64-column tiles (1000 us each)"},
                 {1, 0, 896, 4, "bf16 at 700 GFLOP/s: 896-column tiles, the last 384"},
                 {0, 512, 512, 6, "poll_cols = 512 fixes the width"}};
    for (int c = 0; c < 3; c++) {
        ex.bf16 = cases[c].bf16;
        ex.poll_cols = cases[c].poll_cols;
        tile_calls = tile_polls = 0;
        scmoe__exec_gemm(&ex, 0, 0, M, N, K, 1.0f, NULL, K, NULL, N, 0.0f, NULL, N);
        int sum = 0, widths_ok = 1;
        for (int i = 0; i < tile_calls && i < 256; i++) {
            sum += tile_n[i];
            widths_ok &= i == tile_calls - 1 ? tile_n[i] <= cases[c].want_tile : tile_n[i] == cases[c].want_tile;
        }
        CHECK(tile_calls == cases[c].want_calls && sum == N && widths_ok && tile_polls == tile_calls - 1,
              "%s: %d calls, %d polls, columns summing to %d", cases[c].what, tile_calls, tile_polls, sum);
    }
    ex.bf16 = 0;
    ex.poll_cols = 0;
    tile_calls = 0;
    scmoe__exec_gemm(&ex, 0, 0, 4, 100, 8, 1.0f, NULL, 8, NULL, 100, 0.0f, NULL, 100);
    CHECK(tile_calls == 1 && tile_n[0] == 100, "a small GEMM is one tile");
    ex.poll_us = 0;
    tile_calls = 0;
    scmoe__exec_gemm(&ex, 0, 0, M, N, K, 1.0f, NULL, K, NULL, N, 0.0f, NULL, N);
    CHECK(tile_calls == 1 && tile_n[0] == N, "poll_us = 0 (a device): whole GEMMs");
    scmoe_config cfg = scmoe_config_default();
    char msg[160];
    cfg.poll_us = 0;
    CHECK(scmoe_config_validate(&cfg, msg, sizeof msg) == SCMOE_ERR_OPTION, "poll_us = 0 rejected: %s", msg);
    cfg.poll_us = 1000;
    cfg.poll_cols = -1;
    CHECK(scmoe_config_validate(&cfg, msg, sizeof msg) == SCMOE_ERR_OPTION, "poll_cols = -1 rejected: %s", msg);
}

int main(void) {
    tiles_by_time();
    chooser();
    trace();
    wire_bf16();
    other_block();
    return check_summary();
}
