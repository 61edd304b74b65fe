/* route_batch.c: capacity over the global batch with BATCH priority, without any other rank's records.
 *
 * BATCH priority (V-MoE's batch prioritized routing) ranks the tokens by their top-1 probability,
 * highest first (route.c's by_score_desc: a NaN last, ties by global token index), and fills the
 * experts round by round in that order. Round j's assignments to expert e are kept while room is
 * left: the first
 *     need[j, e] = clamp(C - sum_{j' < j} total[j', e], 0, total[j, e])
 * of them in priority order, total[j, e] being every rank's round-j assignments to e. Which ones they
 * are is a selection, not a sort: the need[j, e]-th best key of the pair (j, e) over the world. With
 * the score as an unsigned key that orders like by_score_desc (key(): a NaN 0, -0 as +0, negative
 * floats below positive ones, the score in fixed point in front),
 *     kept  iff  key > K[j, e],  or  key == K[j, e] and (its index among the pair's keys equal to K,
 *                                    in global token order) < ties[j, e].
 * K is found digit by digit from the top (a radix selection): each round every rank counts its
 * candidates of each undecided pair (keys that agree with K's bits found so far) by their next digit,
 * the counts are all-reduced, and each rank walks the same global histogram from the top digit down to
 * the bucket that holds the need-th key. The first round counts every pair's every assignment, so its
 * sums are the totals (no scan of the round counts first) and the pairs that keep all or none are
 * decided at once. A pair is decided as soon as its bucket holds exactly the keys still needed (all of
 * them kept), else after the last digit, when ties[j, e] of its keys equal to K are kept: their global
 * indices are my index among my own plus the ties of the ranks below me (one exclusive scan). Rounds of
 * at most 8 bits and ROUTE_SELECT_BINS counts: one where no pair keeps part of its assignments, else
 * until each pair's bucket holds just the keys it needs (about 1 + log_256 of its candidates in the
 * threshold's neighbourhood: 2 or 3 for softmax scores, key() below; at worst 8 for the 64-bit key), and
 * the ties' scan where equal scores straddle a threshold: O(k E) bytes a rank whatever P.
 *
 * The kept rows then sit as TOKEN priority's (route.c): by expert, round, token order, so the receive
 * side is scmoe__route_plan_local_recv's and P ranks give one rank's plan bit for bit. */
#include "kernels.h"
#include <math.h>

/* The score as an unsigned key that orders as by_score_desc's scores (larger: earlier). Low 32 bits: the
 * float's bits made monotone (a NaN 0, -0 as +0, negative below positive), which alone orders every
 * score. High 32 bits: the score spread over [0, 1] in fixed point (0 at or below 0, all ones from 1 on),
 * non-decreasing in the score, so the pair orders as the low half does. The gate's top-1 probability
 * lies in [1/E, 1], where a float's leading bits (sign and exponent) hardly differ and a digit of them
 * would narrow the candidates little; the fixed point spreads them over the first digits, so a round
 * leaves ~1/256 of the candidates and the selection ends in fewer rounds. */
static uint64_t key(int32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    if (isnan(f)) return 0;
    uint32_t u = f == 0.0f ? 0u : (uint32_t)bits; /* -0 ranks with +0 */
    uint32_t low = u & 0x80000000u ? ~u : u | 0x80000000u;
    uint32_t high = f >= 1.0f ? UINT32_MAX : f > 0.0f ? (uint32_t)((double)f * 4294967295.0) : 0u;
    return (uint64_t)high << 32 | low;
}

static uint64_t token_key(const int32_t *records, int t, int k) { return key(records[(int64_t)t * (k + 1) + k]); }

/* u agrees with t on the bits from shift up (none to compare at 64) */
static int agrees(uint64_t u, uint64_t t, int shift) { return shift >= 64 || u >> shift == t >> shift; }

/* the digit width for n_open pairs: 8 bits, fewer where the histogram would pass ROUTE_SELECT_BINS */
static int digit_bits(int n_open, int shift) {
    int w = 8;
    while (w > 1 && (int64_t)n_open << w > ROUTE_SELECT_BINS) w--;
    return w < shift ? w : shift;
}

/* pair p decided: keys >= lo kept, none below */
static void keep_from(route_select *s, int p, uint64_t lo) {
    s->thresh[p] = lo ? lo - 1 : 0;
    s->ties[p] = lo ? 0 : INT64_MAX; /* lo = 0: every key, NaN's 0 included */
}

void scmoe__route_select_begin(route_select *s, int E, int k) {
    s->n_open = k * E;
    s->n_ties = 0;
    s->shift = 64;
    s->bits = digit_bits(s->n_open, s->shift);
    for (int p = 0; p < k * E; p++) {
        s->thresh[p] = 0;
        s->open[p] = p;
    }
}

/* The first round's histogram counts every assignment: total [k E] is its sum over the digits, and with
 * it how many of each pair are kept; the pairs that keep all or none are decided. */
static void first_round(route_select *s, const double *hist, int E, int k, int64_t capacity, int64_t *total) {
    int w = s->bits;
    for (int e = 0; e < E; e++) {
        int64_t before = 0; /* the rounds before j: all their assignments, kept or not */
        for (int j = 0; j < k; j++) {
            int p = j * E + e;
            int64_t c = 0, room = capacity - before;
            for (int d = 0; d < 1 << w; d++) c += (int64_t)hist[((size_t)p << w) + d];
            total[p] = c;
            s->need[p] = room <= 0 ? 0 : room < c ? room : c;
            if (s->need[p] == c) keep_from(s, p, 0), s->open[p] = -1;
            else if (s->need[p] == 0) s->thresh[p] = UINT64_MAX, s->ties[p] = 0, s->open[p] = -1;
            before += c;
        }
    }
}

void scmoe__route_select_histogram(const route_select *s, double *hist, const int32_t *records, int n, int E, int k) {
    int w = s->bits, lo = s->shift - w;
    memset(hist, 0, sizeof(double) * ((size_t)s->n_open << w));
    for (int t = 0; t < n; t++) {
        uint64_t u = token_key(records, t, k);
        for (int j = 0; j < k; j++) {
            int p = j * E + records[(int64_t)t * (k + 1) + j], o = s->open[p];
            if (o >= 0 && agrees(u, s->thresh[p], s->shift)) hist[((size_t)o << w) + ((u >> lo) & ((1u << w) - 1))]++;
        }
    }
}

int scmoe__route_select_step(route_select *s, const double *hist, int E, int k, int64_t capacity, int64_t *total) {
    int w = s->bits, lo = s->shift - w, n_open = 0;
    if (s->shift == 64) first_round(s, hist, E, k, capacity, total);
    for (int p = 0; p < k * E; p++) {
        int o = s->open[p];
        if (o < 0) continue;
        const double *h = hist + ((size_t)o << w);
        int64_t above = 0, here = 0;
        int d = (1 << w) - 1;
        for (; d >= 0; d--) { /* the bucket of the need-th key from the top */
            here = (int64_t)h[d];
            if (above + here >= s->need[p]) break;
            above += here;
        }
        if (d < 0) return -1; /* fewer candidates than the rounds before counted: the ranks are out of step */
        s->thresh[p] |= (uint64_t)d << lo;
        s->need[p] -= above;
        s->open[p] = -1;
        if (s->need[p] == here) keep_from(s, p, s->thresh[p]);  /* the whole bucket */
        else if (lo == 0) s->ties[p] = s->need[p], s->n_ties++; /* K found; some of its ties */
        else s->open[p] = n_open++;
    }
    s->n_open = n_open;
    s->shift = lo;
    s->bits = digit_bits(n_open, lo);
    return n_open;
}

/* a pair whose keys equal to K are kept only in part: its ties need a global index */
static int partial(const route_select *s, int p) { return s->ties[p] > 0 && s->ties[p] < INT64_MAX; }

void scmoe__route_select_ties(const route_select *s, int64_t *mine, const int32_t *records, int n, int E, int k) {
    memset(mine, 0, sizeof(int64_t) * (size_t)k * E);
    for (int t = 0; t < n; t++) {
        uint64_t u = token_key(records, t, k);
        for (int j = 0; j < k; j++) {
            int p = j * E + records[(int64_t)t * (k + 1) + j];
            mine[p] += partial(s, p) && u == s->thresh[p];
        }
    }
}

void scmoe__route_plan_batch_send(route_plan *pl, const int32_t *records, int n, int ep_size, int E, int k,
                                  const route_select *s, const int64_t *tie_before, int64_t *seen, const int64_t *total,
                                  int64_t S, int64_t capacity, int32_t *counts) {
    int *cursor = pl->cursor; /* [E]: my kept rows per expert */
    memset(cursor, 0, sizeof(int) * E);
    memset(seen, 0, sizeof(int64_t) * (size_t)k * E);
    for (int t = 0; t < n; t++) {
        uint64_t u = token_key(records, t, k);
        for (int j = 0; j < k; j++) {
            int e = records[(int64_t)t * (k + 1) + j], p = j * E + e;
            int kept =
                u > s->thresh[p] || (u == s->thresh[p] && (partial(s, p) ? tie_before[p] : 0) + seen[p]++ < s->ties[p]);
            pl->slot[(int64_t)t * k + j] = kept - 1;
            cursor[e] += kept;
        }
    }
    for (int e = 0; e < E; e++) {
        pl->expert_count[e] = 0;
        for (int j = 0; j < k; j++) pl->expert_count[e] += total[j * E + e];
    }
    scmoe__route_send_rows(pl, records, n, ep_size, E, k, S, capacity, counts);
}
