/* bench_link.c: the network constants of the step-time model (docs/scaling.md, tools/step_model.py):
 * per-message latency, link bandwidth, and what the collectives a training step makes cost, measured
 * with the same nonblocking MPI calls the library posts (libnbc: start, then MPI_Wait).
 *
 * Build: `make bench` (or mpicc -std=c11 -O2 -I. bench/bench_link.c -o build/bench/bench_link).
 * Run over emulated hosts (one rate-limited NIC each):
 *   ../shared/tools/netcluster.sh up 4 1gbit && ../shared/tools/netcluster.sh run -np 4 -- build/bench/bench_link
 * Options: -n S_LOCAL (tokens per rank, 256)  -k K (2)  -E N_EXPERTS (8)  -b BIG (bytes, 4194304)
 *          -r REPS (small messages, 50)
 *
 * Prints one line per measurement, `name key=value ...`, medians over the repetitions, the slowest
 * rank's time (each repetition starts after a barrier):
 *   pingpong bytes=B oneway_us=T MBps=R   rank 0 <-> rank 1 (the others wait): latency from 8 B,
 *                                         bandwidth from BIG bytes
 *   alltoall bytes_per_peer=B ms=T        MPI_Ialltoall, every rank to every rank (the token exchange's
 *                                         pattern, equal blocks)
 *   allreduce bytes=B ms=T                MPI_Iallreduce of floats (the dense-gradient all-reduce), at
 *                                         8 B, BIG/4 and BIG: latency and the bytes' slope
 *   gather_counts / gather_records / stats_allreduce ms=T   GLOBAL's three routing collectives:
 *                                         allgather of 1 int, allgatherv of S_LOCAL (K+1) ints per
 *                                         rank, allreduce of E+1 doubles
 *   local_counts / local_stats ms=T       LOCAL's: all-to-all of E/P*K+1 ints per peer, allreduce of
 *                                         3E+5 doubles */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, nranks;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* median over reps of the slowest rank's time of one call of f (seconds) */
typedef void (*op_fn)(void *arg);
static double timed(op_fn f, void *arg, int reps) {
    double *t = malloc(sizeof(double) * reps);
    f(arg); /* warm-up: connections, buffers */
    for (int i = 0; i < reps; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        f(arg);
        double dt = MPI_Wtime() - t0;
        MPI_Allreduce(&dt, &t[i], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    }
    qsort(t, reps, sizeof *t, cmp_double);
    double m = t[reps / 2];
    free(t);
    return m;
}

typedef struct buf {
    char *a, *b;
    int bytes, *counts, *displs;
} buf;

static void pingpong(void *arg) {
    buf *x = arg;
    if (rank == 0) {
        MPI_Send(x->a, x->bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
        MPI_Recv(x->b, x->bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
        MPI_Recv(x->b, x->bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(x->a, x->bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
    }
}

static void alltoall(void *arg) {
    buf *x = arg;
    MPI_Request r;
    MPI_Ialltoall(x->a, x->bytes, MPI_BYTE, x->b, x->bytes, MPI_BYTE, MPI_COMM_WORLD, &r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
}

static void allreduce_float(void *arg) {
    buf *x = arg;
    MPI_Request r;
    MPI_Iallreduce(MPI_IN_PLACE, x->a, x->bytes / 4, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
}

static void allreduce_double(void *arg) {
    buf *x = arg;
    MPI_Request r;
    MPI_Iallreduce(MPI_IN_PLACE, x->a, x->bytes / 8, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD, &r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
}

static void allgather_int(void *arg) {
    buf *x = arg;
    MPI_Request r;
    MPI_Iallgather(x->a, 1, MPI_INT, x->b, 1, MPI_INT, MPI_COMM_WORLD, &r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
}

static void allgatherv_int(void *arg) {
    buf *x = arg;
    MPI_Request r;
    MPI_Iallgatherv(x->a, x->bytes / 4, MPI_INT, x->b, x->counts, x->displs, MPI_INT, MPI_COMM_WORLD, &r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    int n = 256, k = 2, E = 8, big = 4 << 20, reps = 50;
    for (int i = 1; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (!strcmp(argv[i], "-n")) n = v;
        else if (!strcmp(argv[i], "-k")) k = v;
        else if (!strcmp(argv[i], "-E")) E = v;
        else if (!strcmp(argv[i], "-b")) big = v;
        else if (!strcmp(argv[i], "-r")) reps = v;
    }
    if (nranks < 2 || n < 1 || k < 1 || E < nranks || big < 64 || reps < 3) {
        if (rank == 0) fprintf(stderr, "bench_link: needs >= 2 ranks, -E >= ranks, -b >= 64, -r >= 3\n");
        MPI_Finalize();
        return 2;
    }
    size_t cap = (size_t)big > (size_t)n * (k + 1) * 4 * nranks ? (size_t)big : (size_t)n * (k + 1) * 4 * nranks;
    buf x = {calloc(cap, 1), calloc(cap, 1), 0, malloc(sizeof(int) * nranks), malloc(sizeof(int) * nranks)};
    char name[MPI_MAX_PROCESSOR_NAME];
    int len;
    MPI_Get_processor_name(name, &len);
    if (rank == 0) printf("# bench_link: %d ranks (rank 0 on %s), S_local=%d k=%d E=%d\n", nranks, name, n, k, E);
    int big_reps = reps / 10 < 3 ? 3 : reps / 10;

    x.bytes = 8;
    double t = timed(pingpong, &x, reps);
    if (rank == 0) printf("pingpong bytes=%d oneway_us=%.1f\n", x.bytes, t / 2 * 1e6);
    x.bytes = big;
    t = timed(pingpong, &x, big_reps);
    if (rank == 0) printf("pingpong bytes=%d oneway_us=%.1f MBps=%.2f\n", x.bytes, t / 2 * 1e6, big / (t / 2) / 1e6);

    x.bytes = big / nranks;
    t = timed(alltoall, &x, big_reps);
    if (rank == 0) printf("alltoall bytes_per_peer=%d ms=%.3f\n", x.bytes, t * 1e3);

    int sizes[3] = {8, big / 4, big};
    for (int i = 0; i < 3; i++) {
        x.bytes = sizes[i];
        t = timed(allreduce_float, &x, i ? big_reps : reps);
        if (rank == 0) printf("allreduce bytes=%d ms=%.3f\n", x.bytes, t * 1e3);
    }

    t = timed(allgather_int, &x, reps);
    if (rank == 0) printf("gather_counts ms=%.3f\n", t * 1e3);
    for (int r = 0; r < nranks; r++) {
        x.counts[r] = n * (k + 1);
        x.displs[r] = r * n * (k + 1);
    }
    x.bytes = n * (k + 1) * 4;
    t = timed(allgatherv_int, &x, reps);
    if (rank == 0) printf("gather_records bytes=%d ms=%.3f\n", x.bytes * (nranks - 1), t * 1e3);
    x.bytes = (E + 1) * 8;
    t = timed(allreduce_double, &x, reps);
    if (rank == 0) printf("stats_allreduce bytes=%d ms=%.3f\n", x.bytes, t * 1e3);

    x.bytes = (E / nranks * k + 1) * 4;
    t = timed(alltoall, &x, reps);
    if (rank == 0) printf("local_counts bytes_per_peer=%d ms=%.3f\n", x.bytes, t * 1e3);
    x.bytes = (3 * E + 5) * 8;
    t = timed(allreduce_double, &x, reps);
    if (rank == 0) printf("local_stats bytes=%d ms=%.3f\n", x.bytes, t * 1e3);

    free(x.a);
    free(x.b);
    free(x.counts);
    free(x.displs);
    MPI_Finalize();
    return 0;
}
