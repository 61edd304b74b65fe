/* test_controls.c: what a host's training loop changes on a created layer or pair (controls.c and the
 * accessors in layer.c / pair.c): the aux and z loss weights at run time (== created with them, bit for
 * bit), the parameter-name prefix, the expert range each rank holds (== the experts whose tensors it
 * has), the gate-noise state (a restored state draws the same noise as the uninterrupted run), a pair's
 * top_k that contradicts its arch, and stats.capacity (-1 dropless, else C even when C >= S*k).
 * With MPI (build MPI=1) it runs under mpirun on any number of ranks dividing 8; without, on one. */
#include "../scmoe.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef SCMOE_WITH_MPI
#include "../scmoe_mpi.h"
#include "mpi_check.h"
#else
#include "check.h"
#define check(ok, ...) CHECK(ok, __VA_ARGS__)
#endif

#define E 8
#define D 16
#define N 24 /* tokens per rank */

static int rank, size;

static void fill(float *x, size_t n, uint64_t s) {
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((s >> 40) / 8388608.0 - 1.0);
    }
}

static scmoe_config small_cfg(void) {
    scmoe_config c = scmoe_config_default();
    c.d_model = D;
    c.d_hidden = 24;
    c.n_experts = E;
    c.top_k = 2;
    c.max_tokens = N;
    c.n_heads = 2;
    c.max_seq_len = 8;
    c.aux_loss_weight = 0.01f;
    c.z_loss_weight = 0.0f;
    return c;
}

/* one training forward + backward of the layer on this rank's x; returns the status */
static scmoe_status moe_step(scmoe_moe *m, const float *x, float *y, float *dx, scmoe_stats *st) {
    float dy[N * D];
    fill(dy, N * D, 99 + (uint64_t)rank);
    scmoe_status s = scmoe_moe_zero_grad(m);
    if (!s) s = scmoe_moe_forward(m, N, x, y, st);
    if (!s) s = scmoe_moe_backward(m, dy, dx, NULL);
    return s;
}

static int same_grad(const scmoe_moe *a, const scmoe_moe *b, const char *name) {
    scmoe_tensor ta, tb;
    if (scmoe_moe_param(a, name, &ta) || scmoe_moe_param(b, name, &tb)) return 0;
    return memcmp(ta.grad, tb.grad, sizeof(float) * ta.numel) == 0;
}

static scmoe_context *new_ctx(void) {
    scmoe_context *ctx = NULL;
#ifdef SCMOE_WITH_MPI
    scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx);
#else
    scmoe_context_create(&ctx);
#endif
    return ctx;
}

static void test_loss_weights(scmoe_context *ctx) {
    scmoe_config c = small_cfg();
    float x[N * D], y[N * D], dx[N * D], dx2[N * D];
    fill(x, N * D, 7 + (uint64_t)rank);
    scmoe_moe *a = NULL, *b = NULL;
    c.aux_loss_weight = 0.05f;
    c.z_loss_weight = 0.002f;
    scmoe_status s = scmoe_moe_create(ctx, &c, &b);
    c.aux_loss_weight = 0.01f;
    c.z_loss_weight = 0.0f;
    if (!s) s = scmoe_moe_create(ctx, &c, &a);
    check(s == SCMOE_OK, "two layers created (%s)", scmoe_strerror(s));
    if (s) return;
    check(scmoe_moe_set_loss_weights(a, 0.05f, 0.002f) == SCMOE_OK, "scmoe_moe_set_loss_weights(0.05, 0.002)");
    s = moe_step(a, x, y, dx, NULL);
    if (!s) s = moe_step(b, x, y, dx2, NULL);
    check(s == SCMOE_OK && same_grad(a, b, "gate.weight") && memcmp(dx, dx2, sizeof dx) == 0,
          "weights set at run time == the same weights at create: gate gradient and dx bit for bit");
    /* a bad value changes nothing */
    check(scmoe_moe_set_loss_weights(a, -1.0f, 0.0f) == SCMOE_ERR_LOSS_WEIGHT &&
              scmoe_moe_set_loss_weights(a, 0.1f, NAN) == SCMOE_ERR_LOSS_WEIGHT &&
              strstr(scmoe_last_error(ctx), "finite") != NULL,
          "negative or NaN weights: SCMOE_ERR_LOSS_WEIGHT, '%s'", scmoe_last_error(ctx));
    s = moe_step(a, x, y, dx, NULL);
    check(s == SCMOE_OK && same_grad(a, b, "gate.weight"), "and the weights stay what they were");
    /* aux weight 0 and z 0: the gate gradient is that of the routed path alone, so it differs */
    check(scmoe_moe_set_loss_weights(a, 0.0f, 0.0f) == SCMOE_OK && moe_step(a, x, y, dx, NULL) == SCMOE_OK &&
              !same_grad(a, b, "gate.weight"),
          "weights 0, 0 change the gate gradient (the aux term is gone)");
    check(scmoe_moe_set_loss_weights(NULL, 0, 0) == SCMOE_ERR_NULL, "NULL layer: SCMOE_ERR_NULL");
    scmoe_moe_destroy(a);
    scmoe_moe_destroy(b);

    /* the pair: set == created with, on its MoE block's gate gradient */
    scmoe_pair *p = NULL, *q = NULL;
    c = small_cfg();
    c.top_k = 1;
    c.max_tokens = N;
    c.aux_loss_weight = 0.03f;
    c.z_loss_weight = 0.001f;
    s = scmoe_pair_create(ctx, &c, &q);
    c.aux_loss_weight = 0.01f;
    c.z_loss_weight = 0.0f;
    if (!s) s = scmoe_pair_create(ctx, &c, &p);
    if (!s) s = scmoe_pair_set_loss_weights(p, 0.03f, 0.001f);
    float dy[N * D];
    fill(dy, N * D, 5);
    scmoe_pair *pp[2] = {p, q};
    for (int i = 0; i < 2 && !s; i++) {
        s = scmoe_pair_forward(pp[i], N / 8, 8, x, y, NULL);
        if (!s) s = scmoe_pair_backward(pp[i], dy, i ? dx2 : dx, NULL);
        if (!s) s = scmoe_pair_grad_sync(pp[i], NULL);
    }
    scmoe_tensor tp, tq;
    int same = !s && !scmoe_pair_param(p, "l1.gate.weight", &tp) && !scmoe_pair_param(q, "l1.gate.weight", &tq) &&
               memcmp(tp.grad, tq.grad, sizeof(float) * tp.numel) == 0 && memcmp(dx, dx2, sizeof dx) == 0;
    check(same, "scmoe_pair_set_loss_weights == the same weights at create (bit for bit)");
    check(scmoe_pair_set_loss_weights(p, INFINITY, 0) == SCMOE_ERR_LOSS_WEIGHT, "pair: infinite weight refused");
    scmoe_pair_destroy(p);
    scmoe_pair_destroy(q);
}

static void test_names_and_range(scmoe_context *ctx) {
    scmoe_config c = small_cfg();
    scmoe_moe *m = NULL;
    scmoe_status s = scmoe_moe_create(ctx, &c, &m);
    check(s == SCMOE_OK, "layer created");
    if (s) return;
    int first = -1, count = -1;
    s = scmoe_moe_expert_range(m, &first, &count);
    check(s == SCMOE_OK && count == E / size && first == rank * (E / size),
          "scmoe_moe_expert_range: rank %d holds experts %d..%d", rank, first, first + count - 1);
    /* the range is exactly the experts whose tensors this rank has */
    int agree = 1;
    for (int e = 0; e < E; e++) {
        char name[64];
        scmoe_tensor t;
        snprintf(name, sizeof name, "experts.%d.w1", e);
        int held = scmoe_moe_param(m, name, &t) == SCMOE_OK;
        agree &= held == (e >= first && e < first + count);
    }
    check(agree, "and those are exactly the experts whose tensors scmoe_moe_param finds here");
    check(scmoe_moe_expert_range(m, NULL, &count) == SCMOE_ERR_NULL, "expert_range with NULL out: SCMOE_ERR_NULL");

    scmoe_tensor t0, t;
    scmoe_moe_param_at(m, 0, &t0);
    float *data0 = t0.data;
    s = scmoe_moe_set_name_prefix(m, "layers.3.mlp.");
    scmoe_moe_param_at(m, 0, &t);
    char want[64];
    snprintf(want, sizeof want, "layers.3.mlp.experts.%d.b2", first);
    check(s == SCMOE_OK && strcmp(t.name, "layers.3.mlp.gate.weight") == 0 && t.data == data0 &&
              scmoe_moe_param(m, want, &t) == SCMOE_OK && scmoe_moe_param(m, "gate.weight", &t) == SCMOE_ERR_NOT_FOUND,
          "scmoe_moe_set_name_prefix: '%s', '%s' found, the bare name is not", "layers.3.mlp.gate.weight", want);
    s = scmoe_moe_set_name_prefix(m, "b.");
    scmoe_moe_param_at(m, 0, &t);
    check(s == SCMOE_OK && strcmp(t.name, "b.gate.weight") == 0, "a second prefix replaces the first: '%s'", t.name);
    char longp[80];
    memset(longp, 'x', sizeof longp - 1);
    longp[sizeof longp - 1] = 0;
    s = scmoe_moe_set_name_prefix(m, longp);
    scmoe_moe_param_at(m, 0, &t);
    check(s == SCMOE_ERR_OPTION && strcmp(t.name, "b.gate.weight") == 0,
          "a prefix too long: SCMOE_ERR_OPTION and the names unchanged ('%s')", scmoe_last_error(ctx));
    s = scmoe_moe_set_name_prefix(m, "");
    scmoe_moe_param_at(m, 0, &t);
    check(s == SCMOE_OK && strcmp(t.name, "gate.weight") == 0, "\"\" removes it");
    check(scmoe_moe_set_name_prefix(m, NULL) == SCMOE_ERR_NULL, "NULL prefix: SCMOE_ERR_NULL");
    scmoe_moe_destroy(m);

    scmoe_pair *p = NULL;
    c.top_k = 1;
    s = scmoe_pair_create(ctx, &c, &p);
    check(s == SCMOE_OK, "pair created");
    if (s) return;
    s = scmoe_pair_expert_range(p, &first, &count);
    check(s == SCMOE_OK && count == E / size && first == rank * (E / size), "scmoe_pair_expert_range: %d..%d", first,
          first + count - 1);
    s = scmoe_pair_set_name_prefix(p, "blocks.2.");
    snprintf(want, sizeof want, "blocks.2.l1.experts.%d.w1", first + count - 1);
    check(s == SCMOE_OK && scmoe_pair_param_at(p, 0, &t) == SCMOE_OK &&
              strcmp(t.name, "blocks.2.l0.ln_a.weight") == 0 && scmoe_pair_param(p, want, &t) == SCMOE_OK,
          "scmoe_pair_set_name_prefix: 'blocks.2.l0.ln_a.weight', '%s'", want);
    scmoe_pair_destroy(p);
}

static void test_noise_state(scmoe_context *ctx) {
    scmoe_config c = small_cfg();
    c.gate_noise_std = 1.0f;
    float x[N * D], y[N * D], y2[N * D], y3[N * D];
    fill(x, N * D, 11 + (uint64_t)rank);
    scmoe_moe *a = NULL, *b = NULL;
    scmoe_status s = scmoe_moe_create(ctx, &c, &a);
    if (!s) s = scmoe_moe_create(ctx, &c, &b);
    uint64_t st0 = 7, st1 = 7;
    if (!s) s = scmoe_moe_noise_state(a, &st0);
    /* a: two training forwards, the second's output is the reference */
    if (!s) s = scmoe_moe_forward(a, N, x, y, NULL);
    if (!s) s = scmoe_moe_noise_state(a, &st1);
    if (!s) s = scmoe_moe_forward(a, N, x, y2, NULL);
    check(s == SCMOE_OK && st0 == 0 && st1 == 1, "noise state: 0 at create, 1 after a training forward");
    /* b: fresh, its first forward draws other noise than a's second */
    if (!s) s = scmoe_moe_forward(b, N, x, y3, NULL);
    check(s == SCMOE_OK && memcmp(y2, y3, sizeof y2) != 0, "with noise, forward 1 and forward 2 differ");
    /* b restored to a's state after one forward: the same noise as a's second */
    if (!s) s = scmoe_moe_set_noise_state(b, st1);
    if (!s) s = scmoe_moe_forward(b, N, x, y3, NULL);
    check(s == SCMOE_OK && memcmp(y2, y3, sizeof y2) == 0,
          "scmoe_moe_set_noise_state: a restored layer's forward == the uninterrupted one, bit for bit");
    /* inference forwards draw no noise and leave the state alone */
    uint64_t st2 = 0, st3 = 1;
    scmoe_moe_noise_state(b, &st2);
    scmoe_moe_set_training(b, 0);
    scmoe_moe_forward(b, N, x, y3, NULL);
    scmoe_moe_noise_state(b, &st3);
    check(st2 == 2 && st3 == 2, "an inference forward leaves the state (%llu, %llu)", (unsigned long long)st2,
          (unsigned long long)st3);
    check(scmoe_moe_noise_state(a, NULL) == SCMOE_ERR_NULL && scmoe_moe_set_noise_state(NULL, 1) == SCMOE_ERR_NULL,
          "noise state with NULL: SCMOE_ERR_NULL");
    scmoe_moe_destroy(a);
    scmoe_moe_destroy(b);

    scmoe_pair *p = NULL, *q = NULL;
    c.top_k = 1;
    s = scmoe_pair_create(ctx, &c, &p);
    if (!s) s = scmoe_pair_create(ctx, &c, &q);
    uint64_t ps = 0;
    if (!s) s = scmoe_pair_forward(p, N / 8, 8, x, y, NULL);
    if (!s) s = scmoe_pair_noise_state(p, &ps);
    if (!s) s = scmoe_pair_forward(p, N / 8, 8, x, y2, NULL);
    if (!s) s = scmoe_pair_set_noise_state(q, ps);
    if (!s) s = scmoe_pair_forward(q, N / 8, 8, x, y3, NULL);
    check(s == SCMOE_OK && ps == 1 && memcmp(y2, y3, sizeof y2) == 0,
          "scmoe_pair_noise_state / set_noise_state: the restored pair's forward == the uninterrupted one");
    scmoe_pair_destroy(p);
    scmoe_pair_destroy(q);
}

static void test_top_k(scmoe_context *ctx) {
    static const struct {
        scmoe_arch arch;
        int top_k;
        scmoe_status want;
    } cases[] = {
        {SCMOE_ARCH_TOP2, 2, SCMOE_OK},         {SCMOE_ARCH_TOP2, 1, SCMOE_OK},
        {SCMOE_ARCH_TOP1, 1, SCMOE_OK},         {SCMOE_ARCH_TOP1, 2, SCMOE_ERR_TOP_K},
        {SCMOE_ARCH_SCMOE, 3, SCMOE_ERR_TOP_K}, {SCMOE_ARCH_SHARED, 2, SCMOE_ERR_TOP_K},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        scmoe_config c = small_cfg();
        c.arch = cases[i].arch;
        c.top_k = cases[i].top_k;
        scmoe_pair *p = NULL;
        scmoe_status s = scmoe_pair_create(ctx, &c, &p);
        check(s == cases[i].want && (s != SCMOE_OK) == (p == NULL), "pair arch %d with top_k %d: %s%s%s", (int)c.arch,
              c.top_k, scmoe_strerror(s), s ? ": " : "", s ? scmoe_last_error(ctx) : "");
        scmoe_pair_destroy(p);
    }
}

static void test_capacity(scmoe_context *ctx) {
    /* S = N * size tokens, k = 2: C = 2 * floor(CF * ceil(S / 8)) */
    static const float cfs[] = {0.0f, -1.0f, 1.0f, 100.0f};
    int64_t S = (int64_t)N * size, per = (S + E - 1) / E;
    for (size_t i = 0; i < sizeof cfs / sizeof *cfs; i++) {
        scmoe_config c = small_cfg();
        c.capacity_factor = cfs[i];
        scmoe_moe *m = NULL;
        float x[N * D], y[N * D];
        fill(x, N * D, 3 + (uint64_t)rank);
        scmoe_stats st;
        scmoe_status s = scmoe_moe_create(ctx, &c, &m);
        if (!s) s = scmoe_moe_forward(m, N, x, y, &st);
        int64_t want = cfs[i] <= 0 ? -1 : 2 * (int64_t)floor(cfs[i] * per);
        check(s == SCMOE_OK && st.capacity == want && (want >= 0 && want < 2 * S ? 1 : st.dropped == 0),
              "stats.capacity with CF %g: %lld (want %lld; S*k = %lld), dropped %lld", cfs[i], (long long)st.capacity,
              (long long)want, (long long)(2 * S), (long long)st.dropped);
        scmoe_moe_destroy(m);
    }
}

int main(int argc, char **argv) {
#ifdef SCMOE_WITH_MPI
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
#else
    (void)argc, (void)argv;
    rank = 0, size = 1;
#endif
    scmoe_context *ctx = new_ctx();
    check(ctx != NULL && E % size == 0, "context on %d rank(s), which divide %d experts", size, E);
    if (ctx && E % size == 0) {
        test_loss_weights(ctx);
        test_names_and_range(ctx);
        test_noise_state(ctx);
        test_top_k(ctx);
        test_capacity(ctx);
    }
    scmoe_context_destroy(ctx);
    if (rank == 0) printf("%d passed, %d failed\n", check_passed, check_failed);
#ifdef SCMOE_WITH_MPI
    MPI_Finalize();
#endif
    return check_failed ? 1 : 0;
}
