/* test_oracle_ep.c: one MoE layer on P ranks against the PyTorch oracle (tests/reference/moe_ref.py),
 * for capacity per source rank (capacity_scope LOCAL), where no one-rank run can stand in: the oracle
 * routes each rank's slice of the batch with that slice's own capacity and priority (route.sources,
 * the tokens of each rank), while the aux and z losses stay over the whole batch. One GLOBAL case
 * checks the oracle's single-source path on P ranks too.
 *
 *   mpirun -np P build/tests/test_oracle_ep [OUTDIR]    (environment as tests/test_oracle_moe.c)
 *
 * Each case: ranks hold different token counts (one may hold none); every parameter is filled from
 * its name, so each rank's own tensors and rank 0's one-rank twin of the layer (which has every
 * expert, and names the tensors in the order the file wants) hold the same values; forward, backward;
 * rank 0 gathers y, dX, every gradient (the gate's is summed over ranks already, experts' are each on
 * one rank) and the forward's statistics (its own capacity, the global counts) and runs the oracle. */
#include "scmoe.h"
#include "scmoe_mpi.h"
#include "tests/mpi_check.h"
#include "tests/oracle.h"
#include "tests/tensorio.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    int d, h, E, k, n0; /* rank r holds n0 + 3 r tokens (none if n0 < 0 and r == 0, else n0 = 8) */
    float cf;
    int renorm, act, prio, scope, chunks;
    float aux_w, z_w;
    int expect_drops; /* 1: dropped > 0 required; 0: dropped == 0 required; -1: either */
} ep_case;

static const ep_case CASES[] = {
    /* name                              d   h   E  k  n0  cf     rn act pr scope chunks aux_w  z_w  drops */
    {"local_k1_gelu_drops", 16, 32, 8, 1, 12, 0.5f, 0, 0, 0, 1, 0, 0.01f, 0.0f, 1},
    {"local_k2_swiglu_renorm_drops_z", 16, 24, 8, 2, 10, 0.75f, 1, 1, 0, 1, 0, 0.5f, 0.1f, -1},
    {"local_k2_gelu_batchprio_drops", 16, 32, 4, 2, 14, 0.5f, 1, 0, 1, 1, 2, 0.5f, 0.0f, 1},
    {"local_k2_rank0_empty_dropless", 16, 32, 8, 2, -1, 0.0f, 0, 0, 0, 1, 0, 0.1f, 0.05f, 0},
    {"global_k2_gelu_drops", 16, 32, 8, 2, 10, 0.5f, 1, 0, 0, 0, 0, 0.5f, 0.1f, 1},
};

static int rank, size;

static uint64_t name_seed(const char *s, uint64_t seed) {
    uint64_t h = 1469598103934665603ull ^ seed;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static void fill_param(scmoe_tensor *t, uint64_t seed) {
    rng_state = name_seed(t->name, seed);
    float scale = ends_with(t->name, "gate.weight") ? 2.5f / sqrtf((float)t->shape[0]) /* logits of O(1) spread */
                  : t->ndim == 1                    ? 0.5f                             /* biases, nonzero */
                                                    : sqrtf(3.0f / (float)t->shape[0]);
    fill_uniform(t->data, t->numel, scale);
}

static void run_case(scmoe_context *ctx, const ep_case *c, const oracle_env *env, uint64_t seed) {
    char why[2048] = "", file[1024], last[1024] = "";
    int tokens = c->n0 < 0 ? (rank == 0 ? 0 : 8 + 3 * rank) : c->n0 + 3 * rank, S = 0, d = c->d;
    int *counts = malloc(sizeof(int) * size), *displs = malloc(sizeof(int) * size);
    MPI_Allgather(&tokens, 1, MPI_INT, counts, 1, MPI_INT, MPI_COMM_WORLD);
    for (int r = 0; r < size; r++) {
        displs[r] = S * d;
        S += counts[r];
    }
    int first = displs[rank] / d;

    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = d;
    cfg.d_hidden = c->h;
    cfg.n_experts = c->E;
    cfg.top_k = c->k;
    cfg.max_tokens = S + 1;
    cfg.max_seq_len = cfg.max_tokens;
    cfg.capacity_factor = cfg.eval_capacity_factor = c->cf;
    cfg.renormalize = c->renorm;
    cfg.activation = c->act ? SCMOE_SWIGLU : SCMOE_GELU;
    cfg.priority = c->prio ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
    cfg.capacity_scope = c->scope ? SCMOE_CAPACITY_LOCAL : SCMOE_CAPACITY_GLOBAL;
    cfg.pipeline_chunks = c->chunks;
    cfg.aux_loss_weight = c->aux_w;
    cfg.z_loss_weight = c->z_w;
    cfg.seed = seed;
    scmoe_context *one = NULL;
    scmoe_moe *moe = NULL, *twin = NULL;
    float *x = calloc((size_t)S * d + 1, sizeof(float)), *dy = calloc((size_t)S * d + 1, sizeof(float));
    float *y = calloc((size_t)S * d + 1, sizeof(float)), *dx = calloc((size_t)S * d + 1, sizeof(float));
    float *ya = calloc((size_t)S * d + 1, sizeof(float)), *dxa = calloc((size_t)S * d + 1, sizeof(float));
    float *et = calloc((size_t)c->E, sizeof(float));
    scmoe_tensor *pt = NULL;
    int pass = 0, np = 0;
    CHECK(scmoe_moe_create(ctx, &cfg, &moe));
    CHECK(scmoe_context_create(&one));
    CHECK(scmoe_moe_create(one, &cfg, &twin));
    for (int i = 0; i < scmoe_moe_param_count(moe); i++) {
        scmoe_tensor t;
        CHECK(scmoe_moe_param_at(moe, i, &t));
        fill_param(&t, seed);
    }
    np = scmoe_moe_param_count(twin);
    pt = calloc((size_t)np, sizeof *pt);
    for (int i = 0; i < np; i++) {
        CHECK(scmoe_moe_param_at(twin, i, &pt[i]));
        fill_param(&pt[i], seed);
    }
    rng_state = seed * 0x9E3779B97F4A7C15ull;
    fill_uniform(x, (size_t)S * d, 1.0f);
    fill_uniform(dy, (size_t)S * d, 1.0f);

    scmoe_stats st;
    CHECK(scmoe_moe_forward(moe, tokens, x + (size_t)first * d, y, &st));
    float aux = st.aux_loss, z = st.z_loss, dropped = (float)st.dropped, cap = (float)st.capacity;
    for (int e = 0; e < c->E; e++) et[e] = (float)st.expert_tokens[e];
    if (!drops_as_expected(c->expect_drops, c->cf, st.dropped, why, sizeof why)) goto done;
    if (st.tokens != S) {
        snprintf(why, sizeof why, "stats.tokens %lld, expected %d", (long long)st.tokens, S);
        goto done;
    }
    CHECK(scmoe_moe_zero_grad(moe));
    CHECK(scmoe_moe_backward(moe, dy + (size_t)first * d, dx, &st));
    int *cd = malloc(sizeof(int) * size);
    for (int r = 0; r < size; r++) cd[r] = counts[r] * d;
    MPI_Gatherv(y, tokens * d, MPI_FLOAT, ya, cd, displs, MPI_FLOAT, 0, MPI_COMM_WORLD);
    MPI_Gatherv(dx, tokens * d, MPI_FLOAT, dxa, cd, displs, MPI_FLOAT, 0, MPI_COMM_WORLD);
    free(cd);
    for (int i = 0; i < np; i++) { /* the twin's order and shapes; the P-rank layer's gradients, summed on rank 0 */
        float *g = calloc(pt[i].numel, sizeof(float));
        scmoe_tensor t;
        if (scmoe_moe_param(moe, pt[i].name, &t) == SCMOE_OK && (!t.replicated || rank == 0))
            memcpy(g, t.grad, sizeof(float) * t.numel);
        MPI_Reduce(g, pt[i].grad, (int)pt[i].numel, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
        free(g);
    }
    if (rank == 0) {
        snprintf(file, sizeof file, "%s/oracle_ep%d_%s.scmt", env->outdir, size, c->name);
        FILE *f = tio_open_write(file);
        if (!f) {
            snprintf(why, sizeof why, "cannot write %s", file);
            goto done;
        }
        oracle_write_moe_cfg(f, d, c->h, c->E, c->k, c->cf, c->renorm, c->aux_w, c->z_w, c->act, c->prio);
        tio_write_scalar(f, "cfg.capacity_scope", (float)c->scope);
        float *src = malloc(sizeof(float) * size);
        for (int r = 0; r < size; r++) src[r] = (float)counts[r];
        tio_write(f, "route.sources", 1, &size, src);
        free(src);
        int xd[2] = {S, d};
        tio_step step = {.ndim = 2,
                         .dims = xd,
                         .x = x,
                         .dy = dy,
                         .y = ya,
                         .dx = dxa,
                         .params = pt,
                         .n_params = np,
                         .aux_loss = aux,
                         .z_loss = z,
                         .dropped = dropped,
                         .capacity = cap,
                         .n_experts = c->E,
                         .expert_tokens = et};
        tio_write_step(f, &step);
        fclose(f);
        char cmd[4096];
        snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' 2>&1", env->python, env->script, file);
        FILE *p = popen(cmd, "r");
        char line[1024];
        while (p && fgets(line, sizeof line, p)) {
            if (strstr(line, "FAIL") || strstr(line, "warning")) printf("#   %s", line);
            snprintf(last, sizeof last, "%.1000s", line);
        }
        int rc = p ? pclose(p) : -1;
        pass = rc == 0;
        if (!pass) snprintf(why, sizeof why, "oracle exit %d", rc);
        if (pass && !env->keep) remove(file);
    } else {
        pass = 1;
    }
done:
    check(pass, "%s%s%s", c->name, why[0] ? ": " : "", why);
    if (rank == 0 && last[0]) printf("#   %s", last);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(ya);
    free(dxa);
    free(et);
    free(pt);
    free(counts);
    free(displs);
    scmoe_moe_destroy(twin);
    scmoe_moe_destroy(moe);
    scmoe_context_destroy(one);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    oracle_env env;
    int status = oracle_setup(argc, argv, "moe_ref.py", &env);
    if (status >= 0) {
        MPI_Finalize();
        return status;
    }
    scmoe_context *ctx;
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx)) {
        printf("not ok - context\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) run_case(ctx, &CASES[i], &env, 100 + i);
    scmoe_context_destroy(ctx);
    if (rank == 0) printf("%d passed, %d failed\n", check_passed, check_failed);
    MPI_Finalize();
    return check_failed ? 1 : 0;
}
