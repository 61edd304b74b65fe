/* route.c: who goes where. GLOBAL capacity (scmoe__route_plan_build): from every rank's routing choices (the
 * global batch in one place), each rank computes the same slot assignment and then its own part of the
 * exchange plan; the layer never gathers them, but this is the plan its distributed planners must give
 * (tests, fuzz and bench compare with it). LOCAL capacity (route_plan_local_*, at the end): each rank
 * locates its own tokens, and receivers learn only per-expert counts. GLOBAL with TOKEN priority
 * (scmoe__route_plan_global_send, at the end): the same plan as scmoe__route_plan_build from
 * per-(round, expert) counts scanned over the ranks, and LOCAL's receive side; with BATCH priority
 * route_batch.c selects the kept assignments over the ranks and then does the same.
 *
 * Locations (GShard/Tutel): round j = 0..k-1, tokens in priority order; the j-th choice of token t
 * takes location loc = fill[e]++ of its expert e. Counting every assignment, dropped or not, makes a
 * second choice queue behind all first choices. Kept iff loc < C, C = k * floor(CF * ceil(S / E)) over
 * the global batch S (dropless: C = infinity). Because the whole batch decides, P ranks route exactly
 * as one rank does. The priority decides only WHICH assignments are kept: round j keeps the first
 * clamp(C - sum_{j' < j} count[j', e], 0, count[j, e]) of its assignments to e in priority order.
 *
 * Layouts (rows of d floats), whatever the priority: an expert's kept rows in round order, and within
 * round j in token order (the global token order: rank-major). So BATCH priority without drops lays out
 * exactly as TOKEN, and a plan that learns only how many of a (round, expert) are kept, not the
 * priority order, places the rows as one rank would.
 *   send buffer   my kept assignments, by destination expert (so by destination rank), then round j,
 *                 then token. plan->slot[t*k + j] is the row of my token t's j-th choice, -1 if
 *                 dropped. The combine's receive buffer has the same layout, so decode reads the same rows.
 *   recv buffer   what my experts receive, by source rank, then expert, then (round, token) (MPI's layout).
 *   expert buffer the same rows by stage, then local expert, then (round, global token): each expert's
 *                 rows of a stage are contiguous for its GEMMs and in the order one rank would have
 *                 them. recv_to_expert maps the two.
 *
 * Stages (token-chunk pipelining, chunks C >= 1): stage 0 is the block that stays on this rank, stage
 * 1 + c the c-th of C near-equal row ranges of every peer's block. Sender and receiver split the same
 * block (my send block for q is q's receive block from me), so each stage is one all-to-all with
 * contiguous per-peer ranges. Without pipelining (C = 0) there is one stage, everything. */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float score;
    int token;
} ranked;

/* Highest score first, ties by token; a NaN score ranks last (a total order even then). */
static int by_score_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    int xn = isnan(x->score), yn = isnan(y->score);
    if (xn != yn) return xn - yn;
    if (!xn && x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->token - y->token;
}

int64_t scmoe__route_slots(int64_t S, int E, int k, float cf) {
    if (cf <= 0.0f) return -1;
    int64_t per = (S + E - 1) / E;
    double c = (double)k * floor((double)cf * (double)per);
    return c >= 9.2e18 ? INT64_MAX : (int64_t)c;
}

int64_t scmoe__route_capacity(int64_t S, int E, int k, float cf) {
    int64_t c = scmoe__route_slots(S, E, k, cf);
    return c < 0 || c >= S * k ? INT64_MAX : c; /* a capacity no expert can fill is dropless */
}

int scmoe__route_stages(int chunks) { return chunks > 0 ? chunks + 1 : 1; }

void scmoe__route_stage_range(int n_stages, int s, int own, int count, int *lo, int *hi) {
    int C = n_stages - 1, c = s - 1;
    if (own || n_stages == 1) {
        *lo = 0;
        *hi = s == 0 ? count : 0;
    } else if (c < 0) {
        *lo = *hi = 0;
    } else {
        *lo = (int)((int64_t)c * count / C);
        *hi = (int)((int64_t)(c + 1) * count / C);
    }
}

/* The stage of row o of a peer's block of count rows: the c with floor(c count / C) <= o. */
static int stage_of(int n_stages, int own, int o, int count) {
    if (own || n_stages == 1) return 0;
    int64_t C = n_stages - 1;
    return 1 + (int)(((int64_t)(o + 1) * C - 1) / count);
}

size_t scmoe__route_workspace_bytes(int64_t S_max, int k) {
    return sizeof(int) * (size_t)S_max * (size_t)(k + 2) + sizeof(ranked) * (size_t)S_max;
}

/* The priority order of S tokens: TOKEN their own order, BATCH the highest top-1 score first (rk:
 * scratch for the sort, unused with TOKEN). */
static void priority_order(int *order, ranked *rk, const int32_t *records, int64_t S, int k, scmoe_priority priority) {
    int stride = k + 1;
    if (priority == SCMOE_PRIORITY_BATCH) {
        for (int64_t t = 0; t < S; t++) {
            float sc;
            memcpy(&sc, &records[t * stride + k], sizeof sc);
            rk[t].score = sc;
            rk[t].token = (int)t;
        }
        qsort(rk, (size_t)S, sizeof *rk, by_score_desc);
        for (int64_t t = 0; t < S; t++) order[t] = rk[t].token;
    } else {
        for (int64_t t = 0; t < S; t++) order[t] = (int)t;
    }
}

/* The statistics from expert_count over a batch of S tokens: kept = min(count, C), the drops. */
static void plan_totals(route_plan *pl, int E, int64_t S, int64_t capacity) {
    pl->capacity = capacity;
    pl->dropped = 0;
    pl->tokens = S;
    for (int e = 0; e < E; e++) {
        pl->expert_kept[e] = pl->expert_count[e] < capacity ? pl->expert_count[e] : capacity;
        pl->dropped += pl->expert_count[e] - pl->expert_kept[e];
    }
}

/* Priority order of S tokens' records, then every assignment's location in its expert, loc[t*k + j]
 * (round j, tokens in that order), and the counts: expert_count and expert_kept under capacity. */
static void locate(route_plan *pl, int *loc, int *order, ranked *rk, const int32_t *records, int64_t S, int E, int k,
                   scmoe_priority priority, int64_t capacity) {
    int stride = k + 1;
    priority_order(order, rk, records, S, k, priority);
    memset(pl->expert_count, 0, sizeof(int64_t) * E);
    for (int j = 0; j < k; j++)
        for (int64_t i = 0; i < S; i++) {
            int t = order[i];
            loc[(int64_t)t * k + j] = (int)pl->expert_count[records[(int64_t)t * stride + j]]++;
        }
    plan_totals(pl, E, S, capacity);
}

/* Where each rank's tokens sit in the global batch: [*my_first, *my_end) are mine, [*group_first,
 * *group_end) my expert-parallel group's; the global batch S is returned, owner[t] = t's rank. */
static int64_t batch_ranges(const int *tokens_per_rank, int world, int rank, int ep_size, int64_t *my_first,
                            int64_t *my_end, int64_t *group_first, int64_t *group_end) {
    int group = rank / ep_size;
    int64_t S = 0;
    for (int r = 0; r < world; r++) {
        if (r == rank) *my_first = S;
        if (r == group * ep_size) *group_first = S;
        S += tokens_per_rank[r];
        if (r == rank) *my_end = S;
        if (r == group * ep_size + ep_size - 1) *group_end = S;
    }
    return S;
}

/* The send layout from kept rows per expert (cursor[e] on entry): send_counts and send_displs per
 * destination rank; on return cursor[e] is where expert e's block starts. */
static void send_layout(route_plan *pl, int *cursor, int E, int E_local, int ep_size) {
    memset(pl->send_counts, 0, sizeof(int) * ep_size);
    int start = 0;
    for (int e = 0; e < E; e++) {
        int c = cursor[e];
        pl->send_counts[e / E_local] += c;
        cursor[e] = start;
        start += c;
    }
    pl->n_send = start;
    for (int q = 0, off = 0; q < ep_size; q++) {
        pl->send_displs[q] = off;
        off += pl->send_counts[q];
    }
}

/* GLOBAL send side: my kept assignments per expert, experts in order (so destinations in order), and
 * slot[t*k + j] = the row of my token t's j-th choice in that layout (round j, token order), -1 dropped */
static void global_send_side(route_plan *pl, const int *loc, const int32_t *records, int64_t my_first, int64_t my_end,
                             int E, int E_local, int ep_size, int k, int64_t capacity) {
    int stride = k + 1, *cursor = pl->cursor; /* [E] */
    memset(cursor, 0, sizeof(int) * E);
    for (int64_t t = my_first; t < my_end; t++)
        for (int j = 0; j < k; j++)
            if (loc[t * k + j] < capacity) cursor[records[t * stride + j]]++;
    send_layout(pl, cursor, E, E_local, ep_size);
    for (int j = 0; j < k; j++)
        for (int64_t t = my_first; t < my_end; t++) {
            int64_t a = t * k + j;
            pl->slot[(t - my_first) * k + j] = loc[a] < capacity ? cursor[records[t * stride + j]]++ : -1;
        }
}

/* GLOBAL receive side: the rows for my experts from each source rank of my group, source-major then
 * expert: recv_counts, recv_displs, and src_cursor[p * E_local + e] = where (p, e)'s rows start */
static void global_recv_side(route_plan *pl, const int *loc, const int *owner, const int32_t *records,
                             int64_t group_first, int64_t group_end, int group_rank0, int first_e, int E_local,
                             int ep_size, int k, int64_t capacity) {
    int stride = k + 1, *src_cnt = pl->src_cursor; /* [ep_size * E_local] */
    memset(src_cnt, 0, sizeof(int) * ep_size * E_local);
    for (int64_t t = group_first; t < group_end; t++)
        for (int j = 0; j < k; j++) {
            int e = records[t * stride + j] - first_e;
            if (e >= 0 && e < E_local && loc[t * k + j] < capacity) src_cnt[(owner[t] - group_rank0) * E_local + e]++;
        }
    int off = 0;
    for (int p = 0; p < ep_size; p++) {
        pl->recv_displs[p] = off;
        int c0 = off;
        for (int e = 0; e < E_local; e++) {
            int c = src_cnt[p * E_local + e];
            src_cnt[p * E_local + e] = off;
            off += c;
        }
        pl->recv_counts[p] = off - c0;
    }
    pl->n_recv = off;
}

/* eoff[s * E_local + e + 1] holds the rows of (stage s, expert e): to offsets by a prefix sum, and
 * ecur (a cursor per (stage, expert)) set to them */
static void stage_offsets(int *eoff, int *ecur, int S_n, int E_local) {
    for (int i = 0; i < S_n * E_local; i++) eoff[i + 1] += eoff[i];
    memcpy(ecur, eoff, sizeof(int) * (size_t)S_n * E_local);
}

/* GLOBAL expert layout: rows per (stage, expert) into expert_offsets, then recv_to_expert in the order
 * one rank would have the rows (round j, global token order). Block p holds expert e's rows at
 * [src_cnt[p, e], src_cnt[p, e + 1]), in that order too (global_send_side); src_cnt is used up as a
 * cursor. */
static void global_expert_layout(route_plan *pl, const int *loc, const int *owner, const int32_t *records,
                                 int64_t group_first, int64_t group_end, int group_rank0, int first_e, int E_local,
                                 int ep_size, int ep_rank, int k, int64_t capacity, int S_n) {
    int stride = k + 1, *src_cnt = pl->src_cursor;
    int *eoff = pl->expert_offsets; /* [S_n * E_local + 1] */
    memset(eoff, 0, sizeof(int) * ((size_t)S_n * E_local + 1));
    for (int p = 0; p < ep_size; p++)
        for (int e = 0; e < E_local; e++) {
            int end = e + 1 < E_local ? src_cnt[p * E_local + e + 1] : pl->recv_displs[p] + pl->recv_counts[p];
            for (int r = src_cnt[p * E_local + e]; r < end; r++)
                eoff[stage_of(S_n, p == ep_rank, r - pl->recv_displs[p], pl->recv_counts[p]) * E_local + e + 1]++;
        }
    int *ecur = pl->cursor; /* reuse: expert-buffer cursor per (stage, local expert) */
    stage_offsets(eoff, ecur, S_n, E_local);
    for (int j = 0; j < k; j++)
        for (int64_t t = group_first; t < group_end; t++) {
            int e = records[t * stride + j] - first_e;
            if (e < 0 || e >= E_local || loc[t * k + j] >= capacity) continue;
            int p = owner[t] - group_rank0, r = src_cnt[p * E_local + e]++;
            int stage = stage_of(S_n, p == ep_rank, r - pl->recv_displs[p], pl->recv_counts[p]);
            pl->recv_to_expert[r] = ecur[stage * E_local + e]++;
        }
}

void scmoe__route_plan_build(route_plan *pl, void *work, const int32_t *records, const int *tokens_per_rank, int world,
                             int rank, int ep_size, int E, int k, scmoe_priority priority, int64_t capacity,
                             int chunks) {
    int E_local = E / ep_size, group_rank0 = rank / ep_size * ep_size, ep_rank = rank % ep_size;
    int64_t my_first = 0, my_end = 0, group_first = 0, group_end = 0;
    int64_t S = batch_ranges(tokens_per_rank, world, rank, ep_size, &my_first, &my_end, &group_first, &group_end);
    int *loc = work, *order = loc + S * k, *owner = order + S;
    ranked *rk = (ranked *)(owner + S);
    locate(pl, loc, order, rk, records, S, E, k, priority, capacity);
    for (int r = 0, t = 0; r < world; r++)
        for (int i = 0; i < tokens_per_rank[r]; i++) owner[t++] = r;
    global_send_side(pl, loc, records, my_first, my_end, E, E_local, ep_size, k, capacity);
    global_recv_side(pl, loc, owner, records, group_first, group_end, group_rank0, ep_rank * E_local, E_local, ep_size,
                     k, capacity);
    pl->n_stages = scmoe__route_stages(chunks);
    global_expert_layout(pl, loc, owner, records, group_first, group_end, group_rank0, ep_rank * E_local, E_local,
                         ep_size, ep_rank, k, capacity, pl->n_stages);
}

/* ---- capacity per source rank (LOCAL), and GLOBAL with TOKEN priority without the records ----
 *
 * Each rank locates its own n tokens alone (locate over them, its own C), so its send side needs
 * nothing from other ranks. What a receiver must know is how many rows each source sends for each of
 * its experts in each round j: counts[p][1 + e*k + j] (word 0 carries the source's input status).
 * The sender's block for expert e holds its kept rows round by round, each round's in token order
 * (whatever the priority: it chose only which are kept), so round j's rows are a contiguous run of the
 * block. The receiver puts a stage's rows of expert e in the order (j, p, row): that is GLOBAL's
 * layout (round j, then the global token order, which is rank-major), so where LOCAL keeps GLOBAL's
 * rows (nothing dropped, or one rank, either priority) the experts' GEMMs see the same rows in the same
 * order and even the weight gradients' sums match GLOBAL bitwise.
 *
 * GLOBAL with TOKEN priority needs no other rank's records either. The fill is round-major and the
 * global token order rank-major, so the j-th choice e of my token t takes
 *     loc = sum_{j' < j} total[j'][e]         (every rank's assignments to e in the rounds before)
 *         + prefix[j][e]                      (round j's assignments to e of the ranks below me)
 *         + #(my tokens before t whose j-th choice is e),
 * with total[j][e] the all-reduced and prefix[j][e] the exclusively scanned counts of round j's
 * assignments to e (scmoe__route_round_counts). Kept iff loc < C of the global batch: the locations, so
 * the slots and the kept rows of each (round, expert), are scmoe__route_plan_build's, and the receive
 * side from those counts is LOCAL's (scmoe__route_plan_local_recv), whose (j, p, row) order is then
 * GLOBAL's by the argument above, drops or not (a round's kept rows stay a contiguous run). LOCAL is the
 * special case prefix = 0 and total = my own round counts: round j starts where my round j - 1 ended. */
void scmoe__route_round_counts(int64_t *count, const int32_t *records, int n, int E, int k) {
    memset(count, 0, sizeof(int64_t) * (size_t)k * E);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < k; j++) count[(size_t)j * E + records[(int64_t)i * (k + 1) + j]]++;
}

/* Kept flags in pl->slot (0 kept, -1 dropped), cursor [E] my kept rows per expert and expert_count [E]
 * (every rank's assignments) in: the statistics over a batch of S tokens, the send layout, counts' words
 * 1.. and the slots. The block of expert e holds my kept rows round by round, each round's in token
 * order, whatever the priority (which only chose them): so a receiver that puts a stage's rows of e in
 * the order (round, source rank, row) has them in the global batch's (round, token) order. */
void scmoe__route_send_rows(route_plan *pl, const int32_t *records, int n, int ep_size, int E, int k, int64_t S,
                            int64_t capacity, int32_t *counts) {
    int E_local = E / ep_size, stride = k + 1, msg = 1 + E_local * k, *cursor = pl->cursor;
    plan_totals(pl, E, S, capacity);
    send_layout(pl, cursor, E, E_local, ep_size);
    for (int q = 0; q < ep_size; q++) memset(counts + (size_t)q * msg + 1, 0, sizeof(int32_t) * E_local * k);
    for (int j = 0; j < k; j++)
        for (int t = 0; t < n; t++) {
            int e = records[(int64_t)t * stride + j], *slot = &pl->slot[(int64_t)t * k + j];
            if (*slot < 0) continue;
            *slot = cursor[e]++;
            counts[(size_t)(e / E_local) * msg + 1 + (e % E_local) * k + j]++;
        }
}

/* The send side of my n tokens, located as above in priority order `order` (prefix and total NULL: my
 * tokens alone): slot, the send layout, counts' words 1.., and the statistics over a batch of S tokens.
 * Kept flags first, in priority order (slot 0 kept, -1 dropped); then the rows, which the layout places
 * once it has every expert's kept count: round by round, in token order whatever the priority. */
static void send_side(route_plan *pl, const int *order, const int32_t *records, int n, int ep_size, int E, int k,
                      const int64_t *prefix, const int64_t *total, int64_t S, int64_t capacity, int32_t *counts) {
    int stride = k + 1, *cursor = pl->cursor;                  /* [E] */
    int64_t *done = pl->expert_count, *fill = pl->expert_kept; /* the rounds before j; round j's next location */
    memset(done, 0, sizeof(int64_t) * E);
    memset(cursor, 0, sizeof(int) * E);
    for (int j = 0; j < k; j++) {
        for (int e = 0; e < E; e++) fill[e] = done[e] + (prefix ? prefix[(size_t)j * E + e] : 0);
        for (int i = 0; i < n; i++) {
            int t = order[i], e = records[(int64_t)t * stride + j], kept = fill[e]++ < capacity;
            pl->slot[(int64_t)t * k + j] = kept - 1;
            cursor[e] += kept;
        }
        for (int e = 0; e < E; e++) done[e] = total ? done[e] + total[(size_t)j * E + e] : fill[e];
    }
    scmoe__route_send_rows(pl, records, n, ep_size, E, k, S, capacity, counts); /* expert_count = done */
}

void scmoe__route_plan_local_send(route_plan *pl, void *work, const int32_t *records, int n, int ep_size, int E, int k,
                                  scmoe_priority priority, int64_t capacity, int32_t *counts) {
    int *order = work;
    ranked *rk = (ranked *)(order + (size_t)n * (k + 2)); /* the layout of scmoe__route_workspace_bytes */
    priority_order(order, rk, records, n, k, priority);
    send_side(pl, order, records, n, ep_size, E, k, NULL, NULL, n, capacity, counts);
}

void scmoe__route_plan_global_send(route_plan *pl, void *work, const int32_t *records, int n, int ep_size, int E, int k,
                                   const int64_t *prefix, const int64_t *total, int64_t S, int64_t capacity,
                                   int32_t *counts) {
    int *order = work;
    priority_order(order, NULL, records, n, k, SCMOE_PRIORITY_TOKEN);
    send_side(pl, order, records, n, ep_size, E, k, prefix, total, S, capacity, counts);
}

/* The send side of scmoe__route_plan_global_send without the slots, from my round counts mine [k E]
 * alone (what a device that located my tokens itself sends up): in round j my assignments to e sit at
 * base[j, e] + pos, pos = 0 .. mine[j, e] - 1, with base[j, e] = sum_{j' < j} total[j', e] + prefix[j, e]
 * (above), so round j keeps the first kept[j, e] = clamp(C - base[j, e], 0, mine[j, e]) of them. Those
 * give counts' words 1.., the send layout and the statistics; base [k E + 1] returns the bases, then C,
 * for the slots (kernels.cu scmoe__cuda_route_global_slots). */
void scmoe__route_plan_global_counts(route_plan *pl, const int64_t *mine, const int64_t *prefix, const int64_t *total,
                                     int ep_size, int E, int k, int64_t S, int64_t capacity, int32_t *counts,
                                     int64_t *base) {
    int E_local = E / ep_size, msg = 1 + E_local * k, *cursor = pl->cursor; /* [E]: my kept rows per expert */
    for (int e = 0; e < E; e++) {
        int64_t done = 0; /* the rounds before j, over every rank */
        cursor[e] = 0;
        for (int j = 0; j < k; j++) {
            size_t i = (size_t)j * E + e;
            int64_t b = done + prefix[i], room = capacity - b;
            int kept = room <= 0 ? 0 : room < mine[i] ? (int)room : (int)mine[i];
            base[i] = b;
            counts[(size_t)(e / E_local) * msg + 1 + (e % E_local) * k + j] = kept;
            cursor[e] += kept;
            done += total[i];
        }
        pl->expert_count[e] = done;
    }
    base[(size_t)k * E] = capacity;
    plan_totals(pl, E, S, capacity);
    send_layout(pl, cursor, E, E_local, ep_size);
}

void scmoe__route_plan_local_recv(route_plan *pl, const int32_t *counts, int ep_size, int ep_rank, int E_local, int k,
                                  int chunks) {
    int msg = 1 + E_local * k, S_n = scmoe__route_stages(chunks), off = 0;
    for (int p = 0; p < ep_size; p++) {
        int c = 0;
        for (int i = 0; i < E_local * k; i++) c += counts[(size_t)p * msg + 1 + i];
        pl->recv_displs[p] = off;
        pl->recv_counts[p] = c;
        off += c;
    }
    pl->n_recv = off;
    pl->n_stages = S_n;

    /* block p, expert e, round j: rows [r0, r0 + counts) of the receive layout, r0 running in (p, e, j) */
    int *eoff = pl->expert_offsets; /* [S_n * E_local + 1] */
    memset(eoff, 0, sizeof(int) * ((size_t)S_n * E_local + 1));
    for (int p = 0, r = 0; p < ep_size; p++)
        for (int e = 0; e < E_local; e++)
            for (int j = 0; j < k; j++)
                for (int c = counts[(size_t)p * msg + 1 + e * k + j]; c > 0; c--, r++)
                    eoff[stage_of(S_n, p == ep_rank, r - pl->recv_displs[p], pl->recv_counts[p]) * E_local + e + 1]++;
    int *ecur = pl->cursor, *next = pl->src_cursor; /* per (stage, local expert); per source: its next row */
    stage_offsets(eoff, ecur, S_n, E_local);
    memcpy(next, pl->recv_displs, sizeof(int) * ep_size);
    for (int e = 0; e < E_local; e++)
        for (int j = 0; j < k; j++)
            for (int p = 0; p < ep_size; p++)
                for (int c = counts[(size_t)p * msg + 1 + e * k + j]; c > 0; c--) {
                    int r = next[p]++;
                    int stage = stage_of(S_n, p == ep_rank, r - pl->recv_displs[p], pl->recv_counts[p]);
                    pl->recv_to_expert[r] = ecur[stage * E_local + e]++;
                }
}
