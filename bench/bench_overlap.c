/* bench_overlap.c: how much of the all-to-all the ScMoE schedule hides, and what that buys per step.
 *
 * For one block pair shape (default GPT2-MoE-Small-like: d=768, hidden 3072, 8 experts) it runs, in
 * one process group and one run: top2, shared, top1, scmoe pos 1/2/3, scmoe pos 2 serialized
 * (the same math with every exchange waited on at once) and top2 / scmoe pos 2 with token-chunk
 * pipelining, training steps (forward + backward +
 * gradient sync + an SGD update) and inference steps, and prints step times, the speedup of each
 * over top2, the overlap fraction (hidden / total exchange time), the exposed communication and the
 * communication share of top2's MoE time (which the link rate is tuned against: ~60% "PCIe-like",
 * ~15% "NVLink-like"). Timings are the mean over --steps after warm-up (and after the schedule's
 * profiling steps), each step ended by a barrier so a step is the slowest rank's.
 *
 *   mpirun -np 2 build/bench/bench_overlap [--d 768 --hidden 3072 --experts 8 --batch 1 --seq 256
 *          --steps 5 --progress poll|thread|none --bf16 --chunks 4 --archs top2,shared,... --precision bf16
 *          --scope global|local] [--priority token|batch]
 * --scope: scmoe_config.capacity_scope (default global). --priority: scmoe_config.priority (default token).
 * --poll-cols / --poll-us: scmoe_config.poll_cols / poll_us (GEMM tiles between progress polls).
 * --precision bf16 runs every variant in SCMOE_PRECISION_BF16 and again in fp32 (the table shows bf16),
 * and prints "BF16 SPEEDUP pair f+b bf16/fp32: X.XX" for each (fp32 pair time / bf16 pair time).
 * bench/run_overlap.sh runs it over an emulated slow link (network namespace + tc). */
#include "../scmoe.h"
#include "../scmoe_mpi.h"
#include "bench_info.h"
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, nranks;

typedef struct variant {
    const char *name;
    scmoe_arch arch;
    int pos, overlap, pipelined;
} variant;

typedef struct result {
    double train, pair, infer; /* ms per step: full training step, pair fwd+bwd, inference */
    double fwd_comm, fwd_exposed, bwd_comm, bwd_exposed, fwd_expert, bwd_expert, grad_time, grad_exposed;
    double inf_comm, inf_exposed;
    int slot_f, slot_b;
} result;

static double now(void) { return MPI_Wtime(); }

static double max_all(double v) {
    double r;
    MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return r;
}

static int run(scmoe_context *ctx, scmoe_config cfg, const variant *v, int B, int T, int steps, int chunks, result *r) {
    cfg.arch = v->arch;
    cfg.shortcut_pos = v->pos;
    cfg.overlap = v->overlap;
    cfg.pipeline_chunks = v->pipelined ? chunks : 0;
    scmoe_pair *p;
    scmoe_status s = scmoe_pair_create(ctx, &cfg, &p);
    if (s) {
        if (rank == 0) fprintf(stderr, "bench_overlap: %s: %s\n", v->name, scmoe_last_error(ctx));
        return 1;
    }
    size_t n = (size_t)B * T * cfg.d_model;
    float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n), *dy = malloc(sizeof(float) * n),
          *dx = malloc(sizeof(float) * n);
    unsigned long long z = 88172645463325252ull + (unsigned long long)rank * 7919;
    for (size_t i = 0; i < n; i++) { /* uniform noise: the gate spreads it over the experts */
        z ^= z << 13;
        z ^= z >> 7;
        z ^= z << 17;
        x[i] = (float)((z >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
        dy[i] = 1e-3f * (x[i] - 0.5f * x[(i * 31) % n]);
    }
    scmoe_stats st;
    memset(r, 0, sizeof *r);
    int warm = 3; /* the schedule profiles its first 2 steps serialized, then chooses the slots */
    for (int i = 0; i < warm + steps; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = now();
        s = scmoe_pair_forward(p, B, T, x, y, &st);
        if (!s) s = scmoe_pair_backward(p, dy, dx, &st);
        if (!s) s = scmoe_pair_grad_sync(p, &st);
        for (int k = 0; !s && k < scmoe_pair_param_count(p); k++) { /* SGD, as a stand-in optimizer */
            scmoe_tensor t;
            scmoe_pair_param_at(p, k, &t);
            for (size_t j = 0; j < t.numel; j++) {
                t.data[j] -= 1e-4f * t.grad[j];
                t.grad[j] = 0;
            }
        }
        if (!s) s = scmoe_pair_params_changed(p); /* bf16: the weights' copies follow the update */
        MPI_Barrier(MPI_COMM_WORLD);
        double t1 = now();
        if (s) break;
        if (i < warm) continue;
        r->train += t1 - t0;
        r->pair += st.fwd_time + st.bwd_time;
        r->fwd_comm += st.fwd_comm;
        r->fwd_exposed += st.fwd_exposed;
        r->bwd_comm += st.bwd_comm;
        r->bwd_exposed += st.bwd_exposed;
        r->fwd_expert += st.fwd_expert;
        r->bwd_expert += st.bwd_expert;
        r->grad_time += st.grad_sync_time;
        r->grad_exposed += st.grad_sync_exposed;
        r->slot_b = st.expert_slot;
    }
    scmoe_pair_set_training(p, 0);
    for (int i = 0; !s && i < warm + steps; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = now();
        s = scmoe_pair_forward(p, B, T, x, y, &st);
        MPI_Barrier(MPI_COMM_WORLD);
        if (i < warm) continue;
        r->infer += now() - t0;
        r->inf_comm += st.fwd_comm;
        r->inf_exposed += st.fwd_exposed;
        r->slot_f = st.expert_slot;
    }
    if (s && rank == 0) fprintf(stderr, "bench_overlap: %s: %s\n", v->name, scmoe_last_error(ctx));
    double *f = &r->train;
    for (size_t i = 0; i < offsetof(result, slot_f) / sizeof(double); i++)
        f[i] = max_all(f[i]) / steps * 1e3; /* ms per step, slowest rank */
    free(x);
    free(y);
    free(dy);
    free(dx);
    scmoe_pair_destroy(p);
    return s != SCMOE_OK;
}

static void usage(void) {
    printf("bench_overlap [--d N] [--hidden N] [--experts N] [--heads N] [--batch B] [--seq T] [--steps N]\n"
           "              [--progress poll|thread|none] [--poll-cols C] [--poll-us U] [--bf16] [--cf F] [--chunks C] "
           "[--archs a,b,...]\n"
           "              [--precision fp32|bf16] [--scope global|local] [--priority token|batch]\n"
           "              [--grad-sync-algo mpi|two_round|auto]\n"
           "archs: top2 shared top1 scmoe1 scmoe2 scmoe3 serial2 top2p scmoe2p (default: all; p: token-chunk\n"
           "pipelining with --chunks C, default 4)\n");
}

/* name is one of the comma-separated entries of list */
static int listed(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)) != NULL; p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return 1;
    return 0;
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 768;
    cfg.d_hidden = 3072;
    cfg.n_experts = 8;
    cfg.n_heads = 12;
    cfg.capacity_factor = 2.0f;
    cfg.eval_capacity_factor = 2.0f;
    int B = 1, T = 256, steps = 5, chunks = 4;
    const char *archs = "top2,shared,top1,scmoe1,scmoe2,scmoe3,serial2,top2p,scmoe2p";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help")) {
            if (rank == 0) usage();
            MPI_Finalize();
            return 0;
        } else if (!strcmp(a, "--bf16")) {
            cfg.wire_bf16 = 1;
            continue;
        }
        if (!v) {
            if (rank == 0) fprintf(stderr, "bench_overlap: %s needs a value\n", a);
            MPI_Finalize();
            return 2;
        }
        i++;
        if (!strcmp(a, "--d")) cfg.d_model = atoi(v);
        else if (!strcmp(a, "--hidden")) cfg.d_hidden = atoi(v);
        else if (!strcmp(a, "--experts")) cfg.n_experts = atoi(v);
        else if (!strcmp(a, "--heads")) cfg.n_heads = atoi(v);
        else if (!strcmp(a, "--batch")) B = atoi(v);
        else if (!strcmp(a, "--seq")) T = atoi(v);
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--cf")) cfg.capacity_factor = cfg.eval_capacity_factor = (float)atof(v);
        else if (!strcmp(a, "--archs")) archs = v;
        else if (!strcmp(a, "--chunks")) chunks = atoi(v);
        else if (!strcmp(a, "--poll-cols")) cfg.poll_cols = atoi(v);
        else if (!strcmp(a, "--poll-us")) cfg.poll_us = atof(v);
        else if (!strcmp(a, "--scope"))
            cfg.capacity_scope = !strcmp(v, "local") ? SCMOE_CAPACITY_LOCAL : SCMOE_CAPACITY_GLOBAL;
        else if (!strcmp(a, "--priority"))
            cfg.priority = !strcmp(v, "batch") ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
        else if (!strcmp(a, "--precision"))
            cfg.precision = !strcmp(v, "bf16") ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32;
        else if (!strcmp(a, "--grad-sync-algo"))
            cfg.grad_sync_algo = !strcmp(v, "mpi")         ? SCMOE_GRAD_SYNC_MPI
                                 : !strcmp(v, "two_round") ? SCMOE_GRAD_SYNC_TWO_ROUND
                                                           : SCMOE_GRAD_SYNC_AUTO;
        else if (!strcmp(a, "--progress"))
            cfg.progress = !strcmp(v, "thread") ? SCMOE_PROGRESS_THREAD
                           : !strcmp(v, "none") ? SCMOE_PROGRESS_NONE
                                                : SCMOE_PROGRESS_POLL;
        else {
            if (rank == 0) fprintf(stderr, "bench_overlap: unknown flag %s\n", a);
            MPI_Finalize();
            return 2;
        }
    }
    cfg.max_tokens = B * T;
    cfg.max_seq_len = T;
    scmoe_context *ctx;
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx)) {
        fprintf(stderr, "bench_overlap: no context\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    const variant all[] = {
        {"top2", SCMOE_ARCH_TOP2, 2, 1, 0},     {"shared", SCMOE_ARCH_SHARED, 2, 1, 0},
        {"top1", SCMOE_ARCH_TOP1, 2, 1, 0},     {"scmoe1", SCMOE_ARCH_SCMOE, 1, 1, 0},
        {"scmoe2", SCMOE_ARCH_SCMOE, 2, 1, 0},  {"scmoe3", SCMOE_ARCH_SCMOE, 3, 1, 0},
        {"serial2", SCMOE_ARCH_SCMOE, 2, 0, 0}, {"top2p", SCMOE_ARCH_TOP2, 2, 1, 1},
        {"scmoe2p", SCMOE_ARCH_SCMOE, 2, 1, 1},
    };
    const char *prog = cfg.progress == SCMOE_PROGRESS_THREAD ? "thread"
                       : cfg.progress == SCMOE_PROGRESS_NONE ? "none"
                                                             : "poll";
    if (rank == 0)
        printf("# bench_overlap: %d ranks, d=%d hidden=%d experts=%d heads=%d, %d x %d tokens per rank, progress=%s%s, "
               "%d timed steps (mean, ms, slowest rank), pipelined variants %d chunks, capacity scope %s\n",
               nranks, cfg.d_model, cfg.d_hidden, cfg.n_experts, cfg.n_heads, B, T, prog,
               cfg.wire_bf16 ? ", bf16 wire" : "", steps, chunks,
               cfg.capacity_scope == SCMOE_CAPACITY_LOCAL ? "local" : "global");
    if (rank == 0) {
        bench_print_gemm_info(stdout, ctx);
        printf("# precision: %s\n",
               cfg.precision == SCMOE_PRECISION_BF16 ? "bf16 (the table), each variant also run in fp32" : "fp32");
    }
    result res[sizeof all / sizeof *all], base = {0};
    double speedup[sizeof all / sizeof *all] = {0};
    int have_base = 0;
    if (rank == 0)
        printf("%-8s %9s %9s %7s %8s %8s %9s %9s %7s %9s %7s %8s %8s %4s\n", "arch", "train", "pair f+b", "speedup",
               "ovl fwd", "ovl bwd", "exp comm", "grad exp", "grad", "infer", "speedup", "ovl inf", "comm/MoE", "slot");
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        if (!listed(archs, all[i].name)) continue;
        result *r = &res[i];
        if (run(ctx, cfg, &all[i], B, T, steps, chunks, r)) continue;
        if (cfg.precision == SCMOE_PRECISION_BF16) { /* the same variant in fp32, for the speedup */
            scmoe_config c32 = cfg;
            c32.precision = SCMOE_PRECISION_FP32;
            result r32;
            if (!run(ctx, c32, &all[i], B, T, steps, chunks, &r32)) speedup[i] = r32.pair / r->pair;
        }
        if (!have_base && all[i].arch == SCMOE_ARCH_TOP2 && !all[i].pipelined) {
            base = *r;
            have_base = 1;
        }
        double ovf = r->fwd_comm > 0 ? 1 - fmin(r->fwd_exposed, r->fwd_comm) / r->fwd_comm : 1;
        double ovb = r->bwd_comm > 0 ? 1 - fmin(r->bwd_exposed, r->bwd_comm) / r->bwd_comm : 1;
        double ovi = r->inf_comm > 0 ? 1 - fmin(r->inf_exposed, r->inf_comm) / r->inf_comm : 1;
        double share = r->fwd_comm / (r->fwd_comm + r->fwd_expert + 1e-12);
        if (rank == 0)
            printf("%-8s %9.1f %9.1f %7.2f %8.2f %8.2f %9.1f %9.1f %7.1f %9.1f %7.2f %8.2f %8.2f %4d\n", all[i].name,
                   r->train, r->pair, have_base ? base.train / r->train : 0, ovf, ovb, r->fwd_exposed + r->bwd_exposed,
                   r->grad_exposed, r->grad_time, r->infer, have_base ? base.infer / r->infer : 0, ovi, share,
                   r->slot_f);
    }
    for (size_t i = 0; rank == 0 && i < sizeof all / sizeof *all; i++)
        if (speedup[i] > 0) printf("%-8s BF16 SPEEDUP pair f+b bf16/fp32: %.2f\n", all[i].name, speedup[i]);
    if (rank == 0)
        printf(
            "# train = forward + backward + gradient sync + SGD; pair f+b = forward + backward alone; ovl = hidden / "
            "total\n"
            "# exchange time; exp comm = exposed exchange time per step; grad exp / grad = exposed / total time of "
            "the\n"
            "# dense-gradient all-reduce; comm/MoE = exchange share of the MoE's forward time (exchanges + experts);\n"
            "# slot = the experts' slot chosen for inference (-1: serialized); top2p / scmoe2p = top2 / scmoe2 with\n"
            "# token-chunk pipelining (pipeline_chunks).\n");
    scmoe_context_destroy(ctx);
    MPI_Finalize();
    return 0;
}
