/* bench_route_scale.c: what routing costs one rank per MoE forward as the cluster grows, for capacity
 * over the global batch (GLOBAL, with TOKEN priority from counts, with BATCH priority from counts and a
 * selection over the ranks) and per source rank (LOCAL): the bytes of the routing metadata and the host time of the
 * planner, for P simulated ranks. One process, no MPI: the planner (kernels/route.c) runs on synthetic
 * routing records as a rank of P would, and the bytes follow from the sizes of the messages moe.c
 * really posts.
 *
 * Build: `make bench` (build/bench/bench_route_scale). Run:
 *   build/bench/bench_route_scale [-n S_LOCAL (4096)] [-k TOP_K (2)] [-E EXPERTS (64)]
 *       [-c CAPACITY_FACTOR (1.25; 0 dropless)] [-r REPS (5)] [-P LIST (2,8,64,256,1024)]
 * The expert-parallel group is min(P, E) ranks (E experts need E % ep == 0): beyond E ranks the
 * experts are replicated, as a real cluster of that size would be run.
 *
 * Bytes per rank per forward: the real message sizes this rank receives, from scmoe__moe_gate_encode:
 *   GLOBAL, TOKEN  exclusive scan + sum of the token counts  2 x 8 MOE_AGREE
 *                  exclusive scan + sum of the routing counts 2 x 8 k E
 *                  allreduce of gate statistics               8 (E + 1)
 *                  all-to-all of per-expert counts            (ep - 1) 4 (1 + E_local k), E_local = E / ep
 *   GLOBAL, BATCH  GLOBAL TOKEN's messages but the routing counts' scan, and route_batch.c's selection:
 *                  allreduce of each round's histogram        8 n_open 2^bits (<= 8 ROUTE_SELECT_BINS),
 *                                                             as many rounds as the run took (the first,
 *                                                             of every pair, gives the totals)
 *                  exclusive scan + sum of the ties' counts   2 x 8 k E, if a pair keeps some of its ties
 *   LOCAL          all-to-all of per-expert counts            (ep - 1) 4 (1 + E_local k)
 *                  allreduce of the statistics                8 (3E + 5)
 * An all-reduce or a scan counts its vector once: the algorithm's traffic factor (2 (P-1)/P for a
 * ring, log2 P rounds for a scan) is left to docs/scaling.md's model. The token rows themselves
 * (dispatch and combine, S_local k d 4 each way in every mode) are not routing metadata and are not
 * counted. (Before the selection GLOBAL with BATCH priority gathered every rank's records, (S - S_local)
 * (k + 1) 4 bytes, and sorted them: 50 MB and 1.1 s a rank at P = 1,024, docs/scaling.md.)
 *
 * Host time: the median over REPS of one plan. GLOBAL TOKEN: scmoe__route_round_counts over this rank's
 * S_local records, scmoe__route_plan_global_send with the counts a middle rank of P would get (every
 * rank routing like this one: prefix P/2, total P times its own) and scmoe__route_plan_local_recv over
 * the counts its ep sources send (here: every source sends what this rank does). GLOBAL BATCH: the
 * selection's rounds (each histogram's sum over the world taken as P times mine: every key P times, so
 * the thresholds fall on ties and the ties' scan runs too), scmoe__route_plan_batch_send and the
 * receive side. LOCAL:
 * scmoe__route_plan_local_send over this rank's S_local records plus scmoe__route_plan_local_recv as
 * above. The gate's GEMM and the packing of rows are the same in every mode and are not timed. The
 * last line:
 *   ROUTE SCALE local bytes/rank P=<last> over P=<first>: X.XX; global: Y.YY; global batch: Z.ZZ
 * (the issues' target: LOCAL and GLOBAL with TOKEN priority <= 1.5, i.e. flat in P). */
#include "../scmoe_internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_P 16

static uint64_t rng = 88172645463325252ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

static void *xalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "bench_route_scale: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* S tokens' records: k distinct experts each (the first skewed toward low ids, as a gate that is not
 * balanced yet), then a score in (0, 1) */
static void synth_records(int32_t *rec, int64_t S, int E, int k) {
    for (int64_t t = 0; t < S; t++) {
        int32_t *r = rec + t * (k + 1);
        for (int j = 0; j < k; j++) {
            int e, dup;
            do {
                uint32_t u = next_u32();
                e = j == 0 && (u & 3) == 0 ? (int)(u >> 8) % (E / 4 > 0 ? E / 4 : 1) : (int)(u >> 8) % E;
                dup = 0;
                for (int i = 0; i < j; i++) dup |= r[i] == e;
            } while (dup);
            r[j] = e;
        }
        float sc = (float)((next_u32() >> 8) + 1) / 16777218.0f;
        memcpy(&r[k], &sc, sizeof sc);
    }
}

typedef struct plan_mem {
    route_plan pl;
    void *work;
} plan_mem;

static void plan_alloc(plan_mem *m, int64_t S_plan, int64_t S_local, int64_t recv_max, int E, int ep, int k) {
    int El = E / ep;
    route_plan *pl = &m->pl;
    pl->cursor = xalloc(sizeof(int) * (size_t)(E > El ? E : El));
    pl->expert_count = xalloc(sizeof(int64_t) * E);
    pl->expert_kept = xalloc(sizeof(int64_t) * E);
    pl->send_counts = xalloc(sizeof(int) * ep);
    pl->send_displs = xalloc(sizeof(int) * ep);
    pl->recv_counts = xalloc(sizeof(int) * ep);
    pl->recv_displs = xalloc(sizeof(int) * ep);
    pl->src_cursor = xalloc(sizeof(int) * (size_t)ep * El);
    pl->expert_offsets = xalloc(sizeof(int) * (size_t)(El + 1));
    pl->slot = xalloc(sizeof(int) * (size_t)S_local * k);
    pl->recv_to_expert = xalloc(sizeof(int) * (size_t)recv_max);
    m->work = xalloc(scmoe__route_workspace_bytes(S_plan, k));
}

static void plan_free(plan_mem *m) {
    route_plan *pl = &m->pl;
    void *ps[] = {pl->cursor,         pl->expert_count, pl->expert_kept,    pl->send_counts,
                  pl->send_displs,    pl->recv_counts,  pl->recv_displs,    pl->src_cursor,
                  pl->expert_offsets, pl->slot,         pl->recv_to_expert, m->work};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) free(ps[i]);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return v[n / 2];
}

static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    for (char *end; *s && n < max; s = *end ? end + 1 : end) {
        long v = strtol(s, &end, 10);
        if (end == s || v < 1) return 0;
        out[n++] = (int)v;
    }
    return n;
}

int main(int argc, char **argv) {
    int n = 4096, k = 2, E = 64, reps = 5, Ps[MAX_P] = {2, 8, 64, 256, 1024}, nP = 5;
    float cf = 1.25f;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-n")) n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-k")) k = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-E")) E = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-c")) cf = (float)atof(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-P")) nP = parse_list(argv[i + 1], Ps, MAX_P);
        else nP = 0;
    }
    if (n < 1 || k < 1 || k > E || E < 1 || reps < 1 || nP < 1 || (argc - 1) % 2) {
        fprintf(stderr, "usage: bench_route_scale [-n S_LOCAL] [-k TOP_K] [-E EXPERTS] [-c CF] [-r REPS] [-P LIST]\n");
        return 2;
    }
    printf("# routing per rank per MoE forward: S_local %d tokens, k %d, E %d, CF %g (host times: median of %d)\n", n,
           k, E, cf, reps);
    printf("%6s %5s %11s | %12s %10s | %14s %12s %6s | %12s %10s\n", "P", "ep", "S", "global bytes", "global ms",
           "g-batch bytes", "g-batch ms", "rounds", "local bytes", "local ms");
    double gb[MAX_P], bb[MAX_P], lb[MAX_P], *t = xalloc(sizeof(double) * reps);
    for (int pi = 0; pi < nP; pi++) {
        int P = Ps[pi], ep = P < E ? P : E;
        if (E % ep) {
            fprintf(stderr, "bench_route_scale: E %d is not divisible by the expert-parallel size %d\n", E, ep);
            return 2;
        }
        int El = E / ep, msg = 1 + El * k, kE = k * E;
        int64_t S = (int64_t)P * n;
        gb[pi] = 2.0 * 8 * MOE_AGREE + 2.0 * 8 * kE + 8.0 * (E + 1) + (double)(ep - 1) * 4 * msg;
        lb[pi] = (double)(ep - 1) * 4 * msg + 8.0 * (3 * E + 5);

        int32_t *rec = xalloc(sizeof(int32_t) * (size_t)n * (k + 1));
        synth_records(rec, n, E, k);
        plan_mem g;
        /* GLOBAL, TOKEN priority: my counts, the bases, my send side, the receive side from ep sources */
        int32_t *out = xalloc(sizeof(int32_t) * (size_t)ep * msg), *in = xalloc(sizeof(int32_t) * (size_t)ep * msg);
        int64_t *cnt = xalloc(sizeof(int64_t) * 3 * (size_t)kE), *prefix = cnt + kE, *total = prefix + kE;
        plan_alloc(&g, n, n, (int64_t)ep * n * k, E, ep, k);
        for (int i = 0; i < reps; i++) {
            double t0 = scmoe__now();
            scmoe__route_round_counts(cnt, rec, n, E, k);
            double t1 = scmoe__now();
            for (int j = 0; j < kE; j++) { /* the network's part: the scan's answers */
                prefix[j] = cnt[j] * (P / 2);
                total[j] = cnt[j] * P;
            }
            double t2 = scmoe__now();
            scmoe__route_plan_global_send(&g.pl, g.work, rec, n, ep, E, k, prefix, total, S,
                                          scmoe__route_capacity(S, E, k, cf), out);
            double t3 = scmoe__now();
            for (int p = 0; p < ep; p++) memcpy(in + (size_t)p * msg, out, sizeof(int32_t) * msg);
            double t4 = scmoe__now();
            scmoe__route_plan_local_recv(&g.pl, in, ep, 0, El, k, 0);
            t[i] = (t1 - t0) + (t3 - t2) + (scmoe__now() - t4);
        }
        double gms = 1e3 * median(t, reps);

        /* GLOBAL, BATCH priority: the selection's rounds, my send side, the receive side */
        size_t bins = route_select_bins(kE);
        route_select sel = {.need = xalloc(sizeof(int64_t) * kE),
                            .ties = xalloc(sizeof(int64_t) * kE),
                            .thresh = xalloc(sizeof(uint64_t) * kE),
                            .open = xalloc(sizeof(int) * kE)};
        double *hist = xalloc(sizeof(double) * bins), sel_bytes = 0;
        int64_t *ties = xalloc(sizeof(int64_t) * 3 * (size_t)kE), *before = ties + kE, *seen = before + kE;
        int rounds = 0;
        for (int i = 0; i < reps; i++) {
            double t0 = scmoe__now(), net = 0;
            int64_t cap = scmoe__route_capacity(S, E, k, cf);
            scmoe__route_select_begin(&sel, E, k);
            int open = kE;
            sel_bytes = 0;
            for (rounds = 0; open > 0; rounds++) {
                scmoe__route_select_histogram(&sel, hist, rec, n, E, k);
                double t1 = scmoe__now();
                int nb = sel.n_open << sel.bits;
                for (int b = 0; b < nb; b++) hist[b] *= P; /* the network's part: the sum over the world */
                sel_bytes += 8.0 * nb;
                net += scmoe__now() - t1;
                open = scmoe__route_select_step(&sel, hist, E, k, cap, total);
            }
            rounds += sel.n_ties > 0;
            if (sel.n_ties) {
                scmoe__route_select_ties(&sel, ties, rec, n, E, k);
                double t1 = scmoe__now();
                for (int j = 0; j < kE; j++) before[j] = ties[j] * (P / 2);
                sel_bytes += 2.0 * 8 * kE;
                net += scmoe__now() - t1;
            }
            scmoe__route_plan_batch_send(&g.pl, rec, n, ep, E, k, &sel, sel.n_ties ? before : NULL, seen, total, S, cap,
                                         out);
            double t2 = scmoe__now();
            for (int p = 0; p < ep; p++) memcpy(in + (size_t)p * msg, out, sizeof(int32_t) * msg);
            double t3 = scmoe__now();
            scmoe__route_plan_local_recv(&g.pl, in, ep, 0, El, k, 0);
            t[i] = (scmoe__now() - t0) - net - (t3 - t2);
        }
        double bms = 1e3 * median(t, reps);
        bb[pi] = gb[pi] - 2.0 * 8 * kE + sel_bytes; /* no scan of the round counts: the first histogram's sums */
        free(sel.need);
        free(sel.ties);
        free(sel.thresh);
        free(sel.open);
        free(hist);
        free(ties);
        plan_free(&g);
        free(cnt);

        /* LOCAL: my records, then the receive side from ep sources' counts */
        plan_mem l;
        plan_alloc(&l, n, n, (int64_t)ep * n * k, E, ep, k);
        for (int i = 0; i < reps; i++) {
            double t0 = scmoe__now();
            scmoe__route_plan_local_send(&l.pl, l.work, rec, n, ep, E, k, SCMOE_PRIORITY_TOKEN,
                                         scmoe__route_capacity(n, E, k, cf), out);
            double t1 = scmoe__now();
            for (int p = 0; p < ep; p++)
                memcpy(in + (size_t)p * msg, out, sizeof(int32_t) * msg); /* the network's part */
            double t2 = scmoe__now();
            scmoe__route_plan_local_recv(&l.pl, in, ep, 0, El, k, 0);
            t[i] = (t1 - t0) + (scmoe__now() - t2);
        }
        double lms = 1e3 * median(t, reps);
        plan_free(&l);
        free(out);
        free(in);
        free(rec);
        printf("%6d %5d %11lld | %12.0f %10.3f | %14.0f %12.3f %6d | %12.0f %10.3f\n", P, ep, (long long)S, gb[pi], gms,
               bb[pi], bms, rounds, lb[pi], lms);
        fflush(stdout);
    }
    free(t);
    printf("ROUTE SCALE local bytes/rank P=%d over P=%d: %.2f; global: %.2f; global batch: %.2f\n", Ps[nP - 1], Ps[0],
           lb[nP - 1] / lb[0], gb[nP - 1] / gb[0], bb[nP - 1] / bb[0]);
    return 0;
}
