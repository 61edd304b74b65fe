/* test_route.c: the route plans of kernels/route.c against each other, for many random cases (world
 * 1..8, ep_size dividing the world and E, k 1..3, capacity tight, loose, dropless or a raw few slots,
 * chunks 0/2/3, ranks holding no tokens):
 *
 *   - capacity GLOBAL from counts, as moe.c plans it without gathering any records (every rank's
 *     scmoe__route_round_counts scanned and summed over the world, then with TOKEN priority
 *     scmoe__route_plan_global_send, with BATCH priority route_batch.c's selection, its histograms
 *     summed and its ties scanned over the world, and scmoe__route_plan_batch_send; the counts message
 *     to the group, scmoe__route_plan_local_recv),
 *     against scmoe__route_plan_build over every rank's records: every field of every rank's plan bit
 *     for bit (slot, send and receive counts and displacements, n_send, n_recv, recv_to_expert,
 *     expert_offsets, n_stages, expert_count, expert_kept, dropped, tokens, capacity);
 *     The same send side from a rank's round counts alone (scmoe__route_plan_global_counts, what a
 *     device that located the tokens itself sends up): statistics, send side and counts message equal,
 *     and its bases;
 *   - capacity LOCAL (scmoe__route_plan_local_send, both priorities): a rank's send side and statistics
 *     are those of scmoe__route_plan_build over its slice alone on one rank;
 *   - the layout, whatever the priority (BATCH: the priority picks only which rows are kept): each
 *     expert's kept rows in the send buffer by round, then token (LOCAL, and GLOBAL's
 *     scmoe__route_plan_build with BATCH on every rank); and GLOBAL with BATCH and nothing dropped is
 *     TOKEN's plan, every field of every rank's plan bit for bit.
 * Scores repeat often (ties), and some are NaN, -0, +0, negative, above 1 or below 2^-32: BATCH's total
 * order at its edges and where its key's fixed-point half saturates. */
#include "../scmoe_internal.h"
#include "check.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORLD 8
#define MAX_TOK   12
#define CASES     4000

static uint64_t rng = 0x243f6a8885a308d3ull;
/* uniform in 0..n-1 (a 64-bit LCG's high bits) */
static int below(int n) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (int)((rng >> 33) % (uint64_t)n);
}

typedef struct plan_mem {
    route_plan pl;
    void *work;
    int32_t *counts; /* [ep][1 + E_local k]: the counts message, by destination */
} plan_mem;

/* every array sized for the case: n_max tokens of mine, R_max received rows, S_work tokens planned */
static void plan_alloc(plan_mem *b, int E, int ep, int k, int chunks, int n_max, int R_max, int S_work) {
    int El = E / ep, ns = scmoe__route_stages(chunks), cur = E > ns * El ? E : ns * El;
    route_plan *pl = &b->pl;
    memset(b, 0, sizeof *b);
    pl->cursor = calloc((size_t)cur, sizeof(int));
    pl->expert_count = calloc((size_t)E, sizeof(int64_t));
    pl->expert_kept = calloc((size_t)E, sizeof(int64_t));
    pl->send_counts = calloc((size_t)ep, sizeof(int));
    pl->send_displs = calloc((size_t)ep, sizeof(int));
    pl->recv_counts = calloc((size_t)ep, sizeof(int));
    pl->recv_displs = calloc((size_t)ep, sizeof(int));
    pl->src_cursor = calloc((size_t)ep * El, sizeof(int));
    pl->expert_offsets = calloc((size_t)ns * E + 1, sizeof(int)); /* also a one-rank plan's (E_local = E) */
    pl->slot = calloc((size_t)(n_max ? n_max : 1) * k, sizeof(int));
    pl->recv_to_expert = calloc((size_t)(R_max ? R_max : 1), sizeof(int));
    b->work = calloc(1, scmoe__route_workspace_bytes(S_work ? S_work : 1, k) + 1);
    b->counts = calloc((size_t)ep * (1 + El * k), sizeof(int32_t));
}

static void plan_free(plan_mem *b) {
    route_plan *pl = &b->pl;
    void *ps[] = {pl->cursor,         pl->expert_count, pl->expert_kept, pl->send_counts,    pl->send_displs,
                  pl->recv_counts,    pl->recv_displs,  pl->src_cursor,  pl->expert_offsets, pl->slot,
                  pl->recv_to_expert, b->work,          b->counts};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) free(ps[i]);
}

static int same_ints(const int *a, const int *b, int n) { return n <= 0 || !memcmp(a, b, sizeof(int) * (size_t)n); }
static int same_i64(const int64_t *a, const int64_t *b, int n) { return !memcmp(a, b, sizeof(int64_t) * (size_t)n); }

/* the plan's statistics and send side (slot of n tokens) */
static const char *differs_send(const route_plan *a, const route_plan *b, int n, int k, int E, int ep) {
    if (a->tokens != b->tokens || a->capacity != b->capacity || a->dropped != b->dropped)
        return "tokens/capacity/dropped";
    if (!same_i64(a->expert_count, b->expert_count, E) || !same_i64(a->expert_kept, b->expert_kept, E))
        return "expert_count/kept";
    if (!same_ints(a->slot, b->slot, n * k)) return "slot";
    if (ep && (a->n_send != b->n_send || !same_ints(a->send_counts, b->send_counts, ep) ||
               !same_ints(a->send_displs, b->send_displs, ep)))
        return "send side";
    return NULL;
}

static const char *differs(const route_plan *a, const route_plan *b, int n, int k, int E, int ep, int El) {
    const char *w = differs_send(a, b, n, k, E, ep);
    if (w) return w;
    if (a->n_recv != b->n_recv || !same_ints(a->recv_counts, b->recv_counts, ep) ||
        !same_ints(a->recv_displs, b->recv_displs, ep))
        return "receive counts";
    if (!same_ints(a->recv_to_expert, b->recv_to_expert, a->n_recv)) return "recv_to_expert";
    if (a->n_stages != b->n_stages || !same_ints(a->expert_offsets, b->expert_offsets, a->n_stages * El + 1))
        return "stages/expert_offsets";
    return NULL;
}

/* BATCH priority over the world as moe.c runs it (route_batch.c): each round every rank's histogram,
 * summed, folded in by every rank alike; then the ties' exclusive scan; each rank's send side into b[r].
 * Returns the rounds, -1 if the ranks' selections disagree. */
static int batch_select(plan_mem *b, const int32_t *rec, const int *first, const int *tpr, int world, int ep, int E,
                        int k, const int64_t *total, int64_t S, int64_t cap) {
    int kE = k * E, bins = (int)route_select_bins(kE), rounds = 0, open = kE;
    route_select sel[MAX_WORLD];
    double *hist = calloc((size_t)bins, sizeof(double)), *sum = calloc((size_t)bins, sizeof(double));
    int64_t *ties = calloc((size_t)(world + 3) * kE, sizeof(int64_t)), *before = ties + (size_t)world * kE,
            *seen = before + kE, *tot = seen + kE;
    for (int r = 0; r < world; r++) {
        sel[r].need = calloc((size_t)kE, sizeof(int64_t));
        sel[r].ties = calloc((size_t)kE, sizeof(int64_t));
        sel[r].thresh = calloc((size_t)kE, sizeof(uint64_t));
        sel[r].open = calloc((size_t)kE, sizeof(int));
        scmoe__route_select_begin(&sel[r], E, k);
    }
    while (open > 0 && rounds >= 0) {
        int n_bins = sel[0].n_open << sel[0].bits;
        memset(sum, 0, sizeof(double) * bins);
        for (int r = 0; r < world; r++) {
            scmoe__route_select_histogram(&sel[r], hist, rec + (size_t)first[r] * (k + 1), tpr[r], E, k);
            for (int i = 0; i < n_bins; i++) sum[i] += hist[i];
        }
        for (int r = 0; r < world; r++) {
            int o = scmoe__route_select_step(&sel[r], sum, E, k, cap, tot);
            if (r > 0 && o != open) rounds = -2; /* every rank must take the same steps */
            open = o;
        }
        if (rounds == 0 && memcmp(tot, total, sizeof(int64_t) * kE)) rounds = -2; /* the first round's sums */
        rounds++;
        if (open < 0 || rounds > 32) rounds = -1;
    }
    for (int r = 0; r < world && rounds >= 0; r++) {
        memset(before, 0, sizeof(int64_t) * kE);
        for (int q = 0; q < r; q++)
            for (int i = 0; i < kE; i++) before[i] += ties[(size_t)q * kE + i];
        scmoe__route_select_ties(&sel[r], ties + (size_t)r * kE, rec + (size_t)first[r] * (k + 1), tpr[r], E, k);
        scmoe__route_plan_batch_send(&b[r].pl, rec + (size_t)first[r] * (k + 1), tpr[r], ep, E, k, &sel[r],
                                     sel[r].n_ties ? before : NULL, seen, total, S, cap, b[r].counts);
    }
    for (int r = 0; r < world; r++) {
        free(sel[r].need);
        free(sel[r].ties);
        free(sel[r].thresh);
        free(sel[r].open);
    }
    free(hist);
    free(sum);
    free(ties);
    return rounds;
}

/* "" when the kept slots of each expert of my n tokens increase with (round j, token t), the layout
 * whatever the priority; else what is out of order */
static const char *unordered(const route_plan *pl, const int32_t *rec, int n, int k, int E) {
    for (int e = 0; e < E; e++)
        for (int j = 0, last = -1; j < k; j++)
            for (int t = 0; t < n; t++) {
                int s = pl->slot[(size_t)t * k + j];
                if (rec[(size_t)t * (k + 1) + j] != e || s < 0) continue;
                if (s <= last) return "the (round, token) order of an expert's kept slots";
                last = s;
            }
    return NULL;
}

/* One random case; returns the number of rank plans that differ (each reported). */
static int one_case(int c) {
    int world = 1 + below(MAX_WORLD), divs[MAX_WORLD], nd = 0;
    for (int q = 1; q <= world; q++)
        if (world % q == 0) divs[nd++] = q;
    int ep = divs[below(nd)], E = ep * (1 + below(4)), k = 1 + below(3 < E ? 3 : E), El = E / ep;
    int chunks = (int[]){0, 2, 3}[below(3)], msg = 1 + El * k, kE = k * E, tpr[MAX_WORLD], first[MAX_WORLD + 1];
    first[0] = 0;
    for (int r = 0; r < world; r++) {
        tpr[r] = below(4) == 0 ? 0 : below(MAX_TOK + 1);
        first[r + 1] = first[r] + tpr[r];
    }
    int64_t S = first[world];
    int kind = below(4), batch = below(2);
    scmoe_priority prio = batch ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
    int64_t cap = kind == 0   ? scmoe__route_capacity(S, E, k, 0.5f)
                  : kind == 1 ? scmoe__route_capacity(S, E, k, 2.0f)
                  : kind == 2 ? scmoe__route_capacity(S, E, k, 0.0f)
                              : 1 + below(3);
    /* records: k distinct experts (the first skewed toward expert 0, so some experts overflow), a score */
    int32_t *rec = calloc((size_t)(S ? S : 1) * (k + 1), sizeof(int32_t));
    for (int64_t t = 0; t < S; t++) {
        int32_t *r = rec + t * (k + 1);
        for (int j = 0; j < k; j++) {
            int e, dup;
            do {
                e = j == 0 && below(3) == 0 ? 0 : below(E);
                dup = 0;
                for (int i = 0; i < j; i++) dup |= r[i] == e;
            } while (dup);
            r[j] = e;
        }
        int v = below(16);
        float sc = v == 0   ? NAN
                   : v == 1 ? -0.0f
                   : v == 2 ? 0.0f
                   : v == 3 ? -(float)below(4)
                   : v == 4 ? 1.0f + (float)below(3)   /* the key's fixed-point half saturates */
                   : v == 5 ? 1e-12f * (float)below(3) /* below its resolution: only the float's bits order */
                            : (float)below(100) / 100.0f;
        memcpy(&r[k], &sc, sizeof sc);
    }
    int R_max = MAX_TOK * ep * k;
    plan_mem a[MAX_WORLD], b[MAX_WORLD];
    int64_t *cnt = calloc((size_t)(world + 3) * kE + 1, sizeof(int64_t)), *total = cnt + (size_t)world * kE,
            *prefix = total + kE, *base = prefix + kE;
    plan_mem g;
    plan_alloc(&g, E, ep, k, chunks, 0, 0, 1);
    for (int r = 0; r < world; r++) {
        plan_alloc(&a[r], E, ep, k, chunks, MAX_TOK, R_max, (int)(S ? S : 1));
        plan_alloc(&b[r], E, ep, k, chunks, MAX_TOK, R_max, (int)(S > MAX_TOK ? S : MAX_TOK)); /* GLOBAL BATCH too */
        scmoe__route_plan_build(&a[r].pl, a[r].work, rec, tpr, world, r, ep, E, k, prio, cap, chunks);
        scmoe__route_round_counts(cnt + (size_t)r * kE, rec + (size_t)first[r] * (k + 1), tpr[r], E, k);
        for (int i = 0; i < kE; i++) total[i] += cnt[(size_t)r * kE + i];
    }
    /* the exclusive scan in world order, then each rank's send side and counts message */
    int bad = 0;
    if (batch && batch_select(b, rec, first, tpr, world, ep, E, k, total, S, cap) < 0) {
        bad++;
        CHECK(0, "case %d BATCH (world %d, E %d, k %d, capacity %lld): the selection failed or the ranks disagree", c,
              world, E, k, (long long)cap);
    }
    for (int r = 0; r < world && !batch; r++) {
        memset(prefix, 0, sizeof(int64_t) * kE);
        for (int q = 0; q < r; q++)
            for (int i = 0; i < kE; i++) prefix[i] += cnt[(size_t)q * kE + i];
        scmoe__route_plan_global_send(&b[r].pl, b[r].work, rec + (size_t)first[r] * (k + 1), tpr[r], ep, E, k, prefix,
                                      total, S, cap, b[r].counts);
        /* the same from my round counts alone (a device's plan): all but the slots, and the bases */
        scmoe__route_plan_global_counts(&g.pl, cnt + (size_t)r * kE, prefix, total, ep, E, k, S, cap, g.counts, base);
        const char *w = differs_send(&b[r].pl, &g.pl, 0, k, E, ep);
        if (!w && memcmp(g.counts, b[r].counts, sizeof(int32_t) * (size_t)ep * msg)) w = "the counts message";
        for (int e = 0; e < E && !w; e++) /* base[j, e] = sum_{j' < j} total[j', e] + prefix[j, e] */
            for (int j = 0, done = 0; j < k; done += (int)total[(size_t)j * E + e], j++)
                if (base[(size_t)j * E + e] != done + prefix[(size_t)j * E + e]) w = "base";
        if (!w && base[kE] != cap) w = "base[k E], the capacity";
        if (w) {
            bad++;
            CHECK(0, "case %d from counts (world %d, ep %d, E %d, k %d, capacity %lld), rank %d: %s differs", c, world,
                  ep, E, k, (long long)cap, r, w);
        }
    }
    /* the counts' all-to-all over each group, then the receive side */
    int32_t *in = calloc((size_t)ep * msg, sizeof(int32_t));
    for (int r = 0; r < world; r++)
        for (int q = 0; q < ep; q++) b[r].counts[(size_t)q * msg] = 0;
    for (int r = 0; r < world; r++) {
        int g0 = r / ep * ep, me = r % ep;
        for (int p = 0; p < ep; p++)
            memcpy(in + (size_t)p * msg, b[g0 + p].counts + (size_t)me * msg, sizeof(int32_t) * msg);
        scmoe__route_plan_local_recv(&b[r].pl, in, ep, me, El, k, chunks);
        const char *w = differs(&a[r].pl, &b[r].pl, tpr[r], k, E, ep, El);
        if (w) {
            bad++;
            CHECK(0, "case %d %s (world %d, ep %d, E %d, k %d, capacity %lld, chunks %d), rank %d: %s differs", c,
                  batch ? "BATCH" : "TOKEN", world, ep, E, k, (long long)cap, chunks, r, w);
        }
    }
    /* GLOBAL with BATCH priority (a: the gathered plan of this case's priority): rows by (round, token);
     * without drops TOKEN's plan */
    for (int r = 0; r < world && !bad; r++) {
        if (!batch)
            scmoe__route_plan_build(&b[r].pl, b[r].work, rec, tpr, world, r, ep, E, k, SCMOE_PRIORITY_BATCH, cap,
                                    chunks);
        const char *w = unordered(batch ? &a[r].pl : &b[r].pl, rec + (size_t)first[r] * (k + 1), tpr[r], k, E);
        if (!w && !batch && kind == 2) w = differs(&a[r].pl, &b[r].pl, tpr[r], k, E, ep, El);
        if (w) {
            bad++;
            CHECK(0, "case %d GLOBAL batch priority (world %d, ep %d, E %d, k %d, capacity %lld), rank %d: %s differs",
                  c, world, ep, E, k, (long long)cap, r, w);
        }
    }
    /* LOCAL: rank r's slice alone, both priorities, its own capacity */
    for (int r = 0; r < world && !bad; r++)
        for (int prio = 0; prio < 2; prio++) {
            scmoe_priority pr = prio ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
            int64_t lcap = kind == 3 ? cap
                                     : scmoe__route_capacity(tpr[r], E, k,
                                                             kind == 0   ? 0.5f
                                                             : kind == 1 ? 2.0f
                                                                         : 0);
            const int32_t *mine = rec + (size_t)first[r] * (k + 1);
            scmoe__route_plan_local_send(&b[r].pl, b[r].work, mine, tpr[r], ep, E, k, pr, lcap, b[r].counts);
            scmoe__route_plan_build(&a[r].pl, a[r].work, mine, &tpr[r], 1, 0, 1, E, k, pr, lcap, 0);
            const char *w = differs_send(&a[r].pl, &b[r].pl, tpr[r], k, E, 0);
            if (!w) w = unordered(&b[r].pl, mine, tpr[r], k, E);
            if (w) {
                bad++;
                CHECK(0, "case %d LOCAL %s priority (E %d, k %d, capacity %lld), rank %d: %s differs", c,
                      prio ? "batch" : "token", E, k, (long long)lcap, r, w);
            }
        }
    for (int r = 0; r < world; r++) {
        plan_free(&a[r]);
        plan_free(&b[r]);
    }
    plan_free(&g);
    free(in);
    free(cnt);
    free(rec);
    return bad;
}

/* A histogram that holds fewer keys than the rounds before counted (ranks out of step) is refused (-1),
 * not walked past its end: 4 tokens, one expert, two slots, then an empty second histogram. */
static void selection_out_of_step(void) {
    int32_t rec[8];
    for (int t = 0; t < 4; t++) {
        float sc = 0.5f + 1e-6f * (float)t; /* one first digit: the first round leaves the pair open */
        rec[2 * t] = 0;
        memcpy(&rec[2 * t + 1], &sc, sizeof sc);
    }
    int64_t need, ties, total;
    double hist[ROUTE_SELECT_BINS] = {0};
    uint64_t thresh;
    int open;
    route_select s = {.need = &need, .ties = &ties, .thresh = &thresh, .open = &open};
    scmoe__route_select_begin(&s, 1, 1);
    scmoe__route_select_histogram(&s, hist, rec, 4, 1, 1);
    int first = scmoe__route_select_step(&s, hist, 1, 1, 2, &total);
    memset(hist, 0, sizeof hist);
    int second = first == 1 ? scmoe__route_select_step(&s, hist, 1, 1, 2, &total) : 0;
    CHECK(first == 1 && total == 4 && second == -1,
          "BATCH selection: an empty histogram after one that counted 4 keys is refused (first round %d open, "
          "total %lld; second %d)",
          first, (long long)total, second);
}

int main(void) {
    selection_out_of_step();
    int bad = 0;
    for (int c = 0; c < CASES && bad < 10; c++) bad += one_case(c) > 0;
    CHECK(bad == 0,
          "GLOBAL, TOKEN and BATCH priority: the plan from scanned counts (and BATCH's selection) == from every "
          "rank's records, every field of every rank's plan bit for bit; LOCAL's send side == its slice's "
          "one-rank plan; BATCH priority: an expert's kept rows by (round, token), dropless GLOBAL == TOKEN's plan "
          "(%d random cases)",
          CASES);
    return check_summary();
}
