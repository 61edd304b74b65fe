/* bench_a2a.c: the MoE layer's token exchange (dispatch + combine) against a plain blocking
 * MPI_Alltoallv of the same bytes, and the routing overhead (scmoe__moe_gate_encode) beside it.
 *
 * Build (from the repository root, after `make`):
 *   mkdir -p build/bench && mpicc -std=c11 -D_POSIX_C_SOURCE=200809L -O2 -fopenmp -I. bench/bench_a2a.c \
 *     build/libscmoe.a $(pkg-config --libs openblas) -lm -lpthread -o build/bench/bench_a2a
 * Run (2 or 4 ranks; shared memory):
 *   OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -np 2 \
 *     -x OMP_NUM_THREADS=1 build/bench/bench_a2a
 * Over an emulated link (TCP on a rate-limited loopback in a network namespace):
 *   bench/netns.sh run 2gbit -- --oversubscribe -np 2 -x OMP_NUM_THREADS=1 build/bench/bench_a2a
 * Options: -r REPS (timed iterations, >= 5, default 9)  -w WARMUP (default 2)  -d D_MODEL (768)
 *          -n LIST (tokens per rank, default 512,2048,8192)  -k LIST (top-k, default 1,2)
 *          -c LIST (capacity factors, default 0,2; 0 = dropless)  -E N_EXPERTS (8)
 *          -p token|batch (the slots' priority, default token; "meta" replays TOKEN's collectives either way)
 *
 * What is timed, per configuration (every rank: n tokens of random x, E experts, top-k, CF):
 *   A layer is built from the internal pieces the way layer.c's scmoe_moe_create does (scmoe__moe_init,
 *   scmoe__params_allocate, scmoe__moe_alloc) on a context from scmoe_context_create_mpi(MPI_COMM_WORLD), in
 *   inference mode (no gate noise: every iteration routes identically). Each iteration:
 *     gate      scmoe__moe_gate_encode, called once per iteration: the gate GEMM, softmax, top-k, the
 *               routing metadata (capacity GLOBAL with TOKEN priority: an exclusive scan and a sum of
 *               the MOE_AGREE token-count words, then of the k E routing counts, the allreduce of the
 *               E+1 gate statistics, and the all-to-all of the per-expert counts, which the dispatch
 *               waits for), the send side of the plan and the packing of the send rows. "meta" is
 *               those small collectives alone, replayed with plain MPI calls of the same sizes on
 *               MPI_COMM_WORLD (the expert-parallel group is the world here): the part of gate that
 *               is communication. (Before the scans, GLOBAL gathered every rank's routing records:
 *               figures taken then replayed an allgather and an allgatherv in their place.)
 *     lib       scmoe__moe_dispatch_start + scmoe__moe_dispatch_wait, then scmoe__moe_exchange_start(combine) +
 *               scmoe__moe_combine_wait. The experts are not run: the combine sends back the rows
 *               the dispatch left in m->xch.recv, which are the same bytes the experts' output would be.
 *               "start" is the part of lib spent inside the two start calls: the
 *               work MPI_Ialltoallv does before returning (OpenMPI's libnbc copies the rank's own
 *               block, send to receive, synchronously there), which an overlapped schedule cannot hide.
 *     mpi       MPI_Alltoallv (blocking) with the plan's counts and displacements times d, MPI_FLOAT,
 *               between the bench's own send/receive buffers, once in the dispatch direction and
 *               once in the combine direction (counts swapped).
 *   Every timed phase starts after an MPI_Barrier; its time is the slowest rank's (MPI_MAX over
 *   ranks, reduced after the iteration). After WARMUP untimed iterations, REPS are timed and the
 *   table gives medians.
 *
 * Bytes: rows a rank sends to OTHER ranks x d x 4, dispatch plus combine (self-sends are excluded on
 * both sides: they are local copies). Since the combine mirrors the dispatch, that is also
 * "off-rank rows sent + received in the dispatch". MB/rank is the mean over ranks; GB/s/rank =
 * MB/rank / median(dispatch + combine time). ratio = mpi time / lib time, taken per iteration
 * (dispatch + combine each) and then the median over iterations (>= 1: the library is at least as
 * fast as plain MPI_Alltoallv; the target is >= 0.9). A third column set, nb, times
 * MPI_Ialltoallv + MPI_Wait on the same buffers as mpi: the library's own collective without the
 * library's request table, locking and wait loop, so "nb ratio" isolates the library's overhead from
 * the difference between OpenMPI's blocking (coll/tuned) and nonblocking (libnbc) algorithms.
 * Lib, mpi and nb take turns going first. */
#include "../scmoe_internal.h"
#include "../scmoe_mpi.h"
#include "bench_info.h"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LIST 16
#define MAX_REPS 1000

enum { T_GATE, T_META, T_LDISP, T_LCOMB, T_LSTART, T_MDISP, T_MCOMB, T_NDISP, T_NCOMB, T_N };

static int g_rank, g_size;

static uint64_t rng_state;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) / 8388608.0 - 1.0);
}

static void *xalloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, "bench_a2a[%d]: out of memory (%zu bytes)\n", g_rank, bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    return p;
}

static void check(scmoe_context *ctx, scmoe_status s, const char *what) {
    if (!s) return;
    fprintf(stderr, "bench_a2a[%d]: %s: %s (%s)\n", g_rank, what, scmoe_strerror(s), ctx ? scmoe_last_error(ctx) : "");
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static void check_mpi(int rc, const char *what) {
    if (rc == MPI_SUCCESS) return;
    fprintf(stderr, "bench_a2a[%d]: %s failed (MPI error %d)\n", g_rank, what, rc);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n) {
    double tmp[MAX_REPS];
    memcpy(tmp, v, sizeof(double) * n);
    qsort(tmp, n, sizeof(double), cmp_double);
    return n % 2 ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
}

static int parse_list_int(const char *s, int *out) {
    int n = 0;
    char *end;
    while (*s && n < MAX_LIST) {
        long v = strtol(s, &end, 10);
        if (end == s) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static int parse_list_float(const char *s, float *out) {
    int n = 0;
    char *end;
    while (*s && n < MAX_LIST) {
        float v = strtof(s, &end);
        if (end == s) return -1;
        out[n++] = v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static void usage(void) {
    if (g_rank == 0)
        fprintf(stderr, "usage: bench_a2a [-r REPS>=5] [-w WARMUP] [-d D] [-E E] [-n N,N..] [-k K,K..] [-c CF,CF..] "
                        "[-p token|batch]\n");
    MPI_Finalize();
    exit(2);
}

/* One configuration: builds the layer, times REPS iterations, prints one table row on rank 0. */
static void run_config(scmoe_context *ctx, int d, int E, int n, int k, float cf, scmoe_priority prio, int reps,
                       int warmup) {
    scmoe_config cfg = scmoe_config_default();
    cfg.priority = prio;
    cfg.d_model = d;
    cfg.d_hidden = 16; /* the experts are never run: keep their buffers small */
    cfg.n_experts = E;
    cfg.top_k = k;
    cfg.max_tokens = n;
    cfg.capacity_factor = cf;
    cfg.eval_capacity_factor = cf;
    char msg[256];
    scmoe_status s = scmoe_config_validate(&cfg, msg, sizeof msg);
    if (s) {
        if (g_rank == 0) fprintf(stderr, "bench_a2a: config (n=%d k=%d cf=%g): %s\n", n, k, cf, msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    param_table pt;
    moe_layer m;
    memset(&pt, 0, sizeof pt);
    check(ctx, scmoe__moe_init(&m, ctx, &cfg, k, &pt, "", 0.02f), "scmoe__moe_init");
    check(ctx, scmoe__params_allocate(&pt, ctx->compute, ctx->world->size > 1, m.replicas->size > 1),
          "scmoe__params_allocate");
    check(ctx, scmoe__moe_alloc(&m), "scmoe__moe_alloc");
    m.training = 0;
    exec ex = scmoe__context_exec(ctx, &cfg);

    float *x = xalloc(sizeof(float) * (size_t)n * d);
    rng_state = 0x9e3779b97f4a7c15ull ^ (uint64_t)(g_rank + 1) * 0x2545f4914f6cdd1dull;
    for (size_t i = 0; i < (size_t)n * d; i++) x[i] = frand();

    /* route once to size the baseline's buffers (the plan is the same every iteration); the receive
     * side comes with the counts, where the dispatch starts */
    check(ctx, scmoe__moe_gate_encode(&m, &ex, n, x), "scmoe__moe_gate_encode");
    check(ctx, scmoe__moe_dispatch_start(&m), "scmoe__moe_dispatch_start");
    check(ctx, scmoe__moe_dispatch_wait(&m), "dispatch");
    check(ctx, scmoe__moe_exchange_start(&m, 0, 1), "scmoe__moe_exchange_start(combine)");
    check(ctx, scmoe__moe_combine_wait(&m), "combine");
    route_plan *pl = &m.plan;
    int P = m.ep_size, me = m.ep_rank;
    int *sc = xalloc(sizeof(int) * P * 4), *sd = sc + P, *rc = sc + 2 * P, *rd = sc + 3 * P;
    int64_t rows_send = 0, rows_recv = 0, off_rows = 0;
    for (int i = 0; i < P; i++) {
        sc[i] = pl->send_counts[i] * d;
        sd[i] = pl->send_displs[i] * d;
        rc[i] = pl->recv_counts[i] * d;
        rd[i] = pl->recv_displs[i] * d;
        rows_send += pl->send_counts[i];
        rows_recv += pl->recv_counts[i];
        if (i != me) off_rows += pl->send_counts[i] + pl->recv_counts[i];
    }
    int64_t rows_max = rows_send > rows_recv ? rows_send : rows_recv;
    float *bsend = xalloc(sizeof(float) * (size_t)(rows_max ? rows_max : 1) * d);
    float *brecv = xalloc(sizeof(float) * (size_t)(rows_max ? rows_max : 1) * d);
    for (size_t i = 0; i < (size_t)rows_max * d; i++) bsend[i] = brecv[i] = 1.0f;

    /* the routing metadata's collectives, replayed (sizes as in scmoe__moe_gate_encode) */
    int kE = k * E, cmsg = 1 + m.E_local * k;
    int64_t *cnt = xalloc(sizeof(int64_t) * (size_t)(3 * kE + 3 * MOE_AGREE));
    int32_t *cout = xalloc(sizeof(int32_t) * (size_t)g_size * cmsg),
            *cin = xalloc(sizeof(int32_t) * (size_t)g_size * cmsg);
    for (int i = 0; i < 3 * kE + 3 * MOE_AGREE; i++) cnt[i] = 1;
    for (int i = 0; i < g_size * cmsg; i++) cout[i] = 1;
    double gs[1024];
    if (E + 1 > 1024) {
        fprintf(stderr, "bench_a2a: E too large\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    double t[T_N][MAX_REPS];
    for (int it = -warmup; it < reps; it++) {
        double loc[T_N] = {0}, t0;

        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        check(ctx, scmoe__moe_gate_encode(&m, &ex, n, x), "scmoe__moe_gate_encode");
        loc[T_GATE] = MPI_Wtime() - t0;

        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        int64_t *agree = cnt + 3 * kE;
        if (g_size > 1) {
            check_mpi(MPI_Exscan(agree, agree + MOE_AGREE, MOE_AGREE, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD),
                      "MPI_Exscan");
            check_mpi(MPI_Allreduce(agree, agree + 2 * MOE_AGREE, MOE_AGREE, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD),
                      "MPI_Allreduce");
            check_mpi(MPI_Exscan(cnt, cnt + kE, kE, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD), "MPI_Exscan");
            check_mpi(MPI_Allreduce(cnt, cnt + 2 * kE, kE, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
        }
        for (int e = 0; e <= E; e++) gs[e] = 1.0;
        if (g_size > 1)
            check_mpi(MPI_Allreduce(MPI_IN_PLACE, gs, E + 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
        check_mpi(MPI_Alltoall(cout, cmsg, MPI_INT32_T, cin, cmsg, MPI_INT32_T, MPI_COMM_WORLD), "MPI_Alltoall");
        loc[T_META] = MPI_Wtime() - t0;

        for (int turn = 0; turn < 3; turn++) {
            int which = (turn + it + warmup) % 3; /* rotate which goes first */
            if (which == 0) {
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                check(ctx, scmoe__moe_dispatch_start(&m), "scmoe__moe_dispatch_start");
                double ts = MPI_Wtime() - t0;
                check(ctx, scmoe__moe_dispatch_wait(&m), "dispatch");
                loc[T_LDISP] = MPI_Wtime() - t0;
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                check(ctx, scmoe__moe_exchange_start(&m, 0, 1), "scmoe__moe_exchange_start(combine)");
                loc[T_LSTART] = ts + (MPI_Wtime() - t0);
                check(ctx, scmoe__moe_combine_wait(&m), "combine");
                loc[T_LCOMB] = MPI_Wtime() - t0;
            } else if (which == 2) {
                MPI_Request r;
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                check_mpi(MPI_Ialltoallv(bsend, sc, sd, MPI_FLOAT, brecv, rc, rd, MPI_FLOAT, MPI_COMM_WORLD, &r),
                          "MPI_Ialltoallv");
                check_mpi(MPI_Wait(&r, MPI_STATUS_IGNORE), "MPI_Wait");
                loc[T_NDISP] = MPI_Wtime() - t0;
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                check_mpi(MPI_Ialltoallv(brecv, rc, rd, MPI_FLOAT, bsend, sc, sd, MPI_FLOAT, MPI_COMM_WORLD, &r),
                          "MPI_Ialltoallv");
                check_mpi(MPI_Wait(&r, MPI_STATUS_IGNORE), "MPI_Wait");
                loc[T_NCOMB] = MPI_Wtime() - t0;
            } else {
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                check_mpi(MPI_Alltoallv(bsend, sc, sd, MPI_FLOAT, brecv, rc, rd, MPI_FLOAT, MPI_COMM_WORLD),
                          "MPI_Alltoallv");
                loc[T_MDISP] = MPI_Wtime() - t0;
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                check_mpi(MPI_Alltoallv(brecv, rc, rd, MPI_FLOAT, bsend, sc, sd, MPI_FLOAT, MPI_COMM_WORLD),
                          "MPI_Alltoallv");
                loc[T_MCOMB] = MPI_Wtime() - t0;
            }
        }
        double mx[T_N];
        MPI_Allreduce(loc, mx, T_N, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (it >= 0)
            for (int j = 0; j < T_N; j++) t[j][it] = mx[j];
    }

    double lib_tot[MAX_REPS], mpi_tot[MAX_REPS], nb_tot[MAX_REPS];
    for (int i = 0; i < reps; i++) {
        lib_tot[i] = t[T_LDISP][i] + t[T_LCOMB][i];
        mpi_tot[i] = t[T_MDISP][i] + t[T_MCOMB][i];
        nb_tot[i] = t[T_NDISP][i] + t[T_NCOMB][i];
    }
    /* ratios paired per iteration (lib, mpi and nb of one iteration ran back to back, under the same
     * load), then the median: steadier than a ratio of medians on a shared machine */
    double r_mpi[MAX_REPS], r_nb[MAX_REPS];
    for (int i = 0; i < reps; i++) {
        r_mpi[i] = lib_tot[i] > 0 ? mpi_tot[i] / lib_tot[i] : 0;
        r_nb[i] = lib_tot[i] > 0 ? nb_tot[i] / lib_tot[i] : 0;
    }
    double bytes_loc = (double)off_rows * d * sizeof(float), bytes_sum = 0;
    MPI_Allreduce(&bytes_loc, &bytes_sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    int64_t dropped = pl->dropped;
    if (g_rank == 0) {
        double mb = bytes_sum / g_size / 1e6;
        double ml = median(lib_tot, reps), mm = median(mpi_tot, reps), mn = median(nb_tot, reps);
        printf("%6d %2d %4.1f %5lld %8.2f | %8.3f %7.3f | %8.3f %8.3f %8.3f %6.2f %6.3f | %8.3f %8.3f %8.3f %6.2f |"
               " %5.2f | %8.3f %5.2f\n",
               n, k, cf, (long long)dropped, mb, 1e3 * median(t[T_GATE], reps), 1e3 * median(t[T_META], reps),
               1e3 * median(t[T_LDISP], reps), 1e3 * median(t[T_LCOMB], reps), 1e3 * ml, ml > 0 ? mb / 1e3 / ml : 0,
               1e3 * median(t[T_LSTART], reps), 1e3 * median(t[T_MDISP], reps), 1e3 * median(t[T_MCOMB], reps),
               1e3 * mm, mm > 0 ? mb / 1e3 / mm : 0, median(r_mpi, reps), 1e3 * mn, median(r_nb, reps));
        fflush(stdout);
    }

    free(cnt);
    free(cout);
    free(cin);
    free(bsend);
    free(brecv);
    free(sc);
    free(x);
    scmoe__moe_free(&m);
    scmoe__params_free(&pt);
}

int main(int argc, char **argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);

    int reps = 9, warmup = 2, d = 768, E = 8;
    int ns[MAX_LIST] = {512, 2048, 8192}, nn = 3, ks[MAX_LIST] = {1, 2}, nk = 2;
    float cfs[MAX_LIST] = {0.0f, 2.0f};
    int ncf = 2;
    scmoe_priority prio = SCMOE_PRIORITY_TOKEN;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "-r")) reps = atoi(v);
        else if (!strcmp(a, "-w")) warmup = atoi(v);
        else if (!strcmp(a, "-d")) d = atoi(v);
        else if (!strcmp(a, "-E")) E = atoi(v);
        else if (!strcmp(a, "-n")) nn = parse_list_int(v, ns);
        else if (!strcmp(a, "-k")) nk = parse_list_int(v, ks);
        else if (!strcmp(a, "-c")) ncf = parse_list_float(v, cfs);
        else if (!strcmp(a, "-p") && (!strcmp(v, "token") || !strcmp(v, "batch")))
            prio = !strcmp(v, "batch") ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
        else usage();
        i++;
    }
    if (reps < 5 || reps > MAX_REPS || warmup < 0 || d < 1 || E < 1 || nn < 1 || nk < 1 || ncf < 1) usage();

    scmoe_context *ctx = NULL;
    scmoe_status s = scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx);
    if (s) {
        fprintf(stderr, "bench_a2a[%d]: scmoe_context_create_mpi: %s\n", g_rank, scmoe_strerror(s));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    if (g_rank == 0) {
        const char *btl = getenv("OMPI_MCA_btl"), *flags = getenv("OMPI_MCA_btl_tcp_flags");
        printf("bench_a2a: %d ranks, d=%d, E=%d, %s priority, %d timed reps (+%d warm-up), medians of the slowest "
               "rank; gate_encode once per iteration\n",
               g_size, d, E, prio == SCMOE_PRIORITY_BATCH ? "BATCH" : "TOKEN", reps, warmup);
        bench_print_gemm_info(stdout, ctx);
        printf("  btl=%s%s%s; MB/rank = off-rank bytes sent by a rank in dispatch + combine (mean over ranks); "
               "ratio = median over iterations of mpi / lib time\n",
               btl ? btl : "(default)", flags ? ", btl_tcp_flags=" : "", flags ? flags : "");
        printf("%6s %2s %4s %5s %8s | %8s %7s | %8s %8s %8s %6s %6s | %8s %8s %8s %6s | %5s | %8s %5s\n", "n/rank", "k",
               "cf", "drop", "MB/rank", "gate ms", "meta ms", "lib disp", "comb", "total", "GB/s", "start", "mpi disp",
               "comb", "total", "GB/s", "ratio", "nb total", "ratio");
        printf(
            "  (times in ms; lib = library dispatch+combine; start = of which inside the two *_start calls, which no "
            "compute can hide; mpi = blocking MPI_Alltoallv; nb = MPI_Ialltoallv + MPI_Wait, the same nonblocking "
            "collective the library starts, without the library around it)\n");
        fflush(stdout);
    }
    for (int a = 0; a < nn; a++)
        for (int b = 0; b < nk; b++)
            for (int c = 0; c < ncf; c++) {
                if (ks[b] > E) continue;
                run_config(ctx, d, E, ns[a], ks[b], cfs[c], prio, reps, warmup);
            }

    scmoe_context_destroy(ctx);
    MPI_Finalize();
    return 0;
}
