/* test_schedule.c: the slot chooser against brute force on synthetic times, the trace file, and the
 * bf16 wire's error against float exchanges. */
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
        int K = schedule_choose_slot(ops, n, td, te, tc);
        for (int j = 0; j <= n; j++) agree &= cost(ops, n, K, td, te, tc) <= cost(ops, n, j, td, te, tc) + 1e-9;
    }
    CHECK(agree, "slot chooser finds the minimum of max(pre, T_disp) + T_exp + max(post, T_comb) in 2000 random cases");
    double ops[3] = {30, 20, 10};
    CHECK(schedule_choose_slot(ops, 3, 25, 5, 12) == 1, "MLP 30, attn 20, SE 10, dispatch 25, combine 12 -> slot 1 (after MLP)");
    CHECK(schedule_choose_slot(ops, 3, 0, 5, 100) == 0, "a long combine puts the experts first");
    CHECK(schedule_choose_slot(ops, 3, 100, 5, 0) == 3, "a long dispatch puts the experts last");
}

static scmoe_config tiny(void) {
    scmoe_config c = scmoe_config_default();
    c.d_model = 32; c.d_hidden = 48; c.n_experts = 4; c.n_heads = 4; c.max_tokens = 64; c.max_seq_len = 16;
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
    free(x); free(y);
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
        ey = fmax(ey, fabs(ya[i] - yb[i])); my = fmax(my, fabs(ya[i]));
        ed = fmax(ed, fabs(dxa[i] - dxb[i])); md = fmax(md, fabs(dxa[i]));
    }
    /* one rank: nothing travels, so nothing is rounded (tests/test_ep.c measures the wire on 2 and 4 ranks) */
    CHECK(ey == 0 && ed == 0, "bf16 wire on one rank: own rows never travel, outputs and dX unchanged (%.1e, %.1e)", ey / my, ed / md);
    free(x); free(ya); free(yb); free(dxa); free(dxb);
    scmoe_pair_destroy(pa);
    scmoe_pair_destroy(pb);
    scmoe_context_destroy(ctx);
}

int main(void) {
    chooser();
    trace();
    wire_bf16();
    return check_summary();
}
