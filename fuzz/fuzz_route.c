/* fuzz_route.c: libFuzzer harness for the routing plan (kernels/route.c, internal API).
 *
 * Input -> world size P (1..8), ep_size (a divisor of P), E (a multiple of ep_size), k (1..min(E,4)),
 * priority, tokens per rank, a capacity (the library's formula from a capacity factor, or any raw
 * value), every global token's routing record (k distinct expert ids, then the top-1 score), and last
 * the pipeline's chunks (0..16; 0 when the input ends before, as in corpora older than the option).
 * All P ranks are simulated in this one process: scmoe__route_plan_build is called once per rank with the
 * same global records, each plan in buffers sized exactly as scmoe__moe_alloc sizes them (ASan catches any
 * write past them), and the union of the plans is checked:
 *
 *   - global counts identical on every rank: tokens = S, sum expert_count = S*k,
 *     expert_kept = min(count, capacity), dropped = sum(count - kept), and equal to an independent
 *     recomputation of the GShard/Tutel locations (round j over tokens in priority order), which
 *     decide which assignments are kept (loc < capacity);
 *   - send side: slot[t*k+j] = -1 exactly for dropped assignments; the kept slots of a rank are a
 *     permutation of 0..n_send-1, grouped by destination rank (send_counts / prefix-sum displs),
 *     by expert inside a destination, and by (round j, token) inside an expert, whatever the priority;
 *   - receive side: recv_counts[p] on rank r equals send_counts[r's ep_rank] on source p of its group
 *     (the all-to-all's two sides agree), recv_displs are prefix sums, n_recv fits the buffer;
 *   - the exchange simulated row by row: recv_to_expert is a permutation of 0..n_recv-1,
 *     expert_offsets (per stage and expert) start at 0, are monotone and end at n_recv, every row lands
 *     in the block of its stage (scmoe__route_stage_range of its source block) and expert, each expert's rows
 *     of a stage are in (round, global token) order, and every kept (token, choice) of a group reaches
 *     exactly one expert-buffer row of the rank owning its expert in that group;
 *   - the combine (the same plan mirrored) brings every row back to its slot;
 *   - P ranks route as one rank: a one-rank plan over the same records gives the same counts, and the
 *     same rows per expert (restricted to the group's tokens), in the same order without pipelining;
 *   - capacity per source rank (LOCAL): see local_scope;
 *   - GLOBAL with TOKEN priority from counts (scmoe__route_plan_global_send + scmoe__route_plan_local_recv,
 *     moe.c's plan without the records): every field of every rank's plan as scmoe__route_plan_build's,
 *     bit for bit (global_counts); and scmoe__route_plan_global_counts, the same plan from a rank's round
 *     counts alone: its statistics, send side and counts message as scmoe__route_plan_global_send's, its
 *     bases as their definition.
 * Any violation calls __builtin_trap(), so libFuzzer records the input. */
#include "../scmoe_internal.h"
#include "fuzz_input.h"
#include <stdio.h>
#include <stdlib.h>

#define MAX_WORLD        8
#define MAX_TOK_PER_RANK 24
#define MAX_K            4

#define REQUIRE(c)                                                                                                     \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "fuzz_route: invariant failed: %s (line %d)\n", #c, __LINE__);                             \
            __builtin_trap();                                                                                          \
        }                                                                                                              \
    } while (0)

typedef struct plan_bufs {
    route_plan pl;
    void *work;
    int max_recv, max_send;
} plan_bufs;

/* The plan's arrays, each its own allocation of exactly the size scmoe__moe_alloc gives it. */
static void plan_alloc(plan_bufs *b, int E, int ep_size, int max_tokens, int world, int k, float cf_hi, int chunks) {
    int El = E / ep_size, ns = scmoe__route_stages(chunks);
    int64_t S_max = (int64_t)max_tokens * world;
    int64_t recv = (int64_t)max_tokens * ep_size * k;
    if (cf_hi > 0) {
        int64_t cap = scmoe__route_capacity(S_max, E, k, cf_hi); /* as scmoe__moe_alloc: INT64_MAX is dropless */
        if (cap <= recv / El) recv = cap * El;
    }
    b->max_recv = (int)recv;
    b->max_send = max_tokens * k;
    route_plan *pl = &b->pl;
    memset(pl, 0, sizeof *pl);
    pl->cursor = malloc(sizeof(int) * (E > ns * El ? E : ns * El));
    pl->expert_count = malloc(sizeof(int64_t) * E);
    pl->expert_kept = malloc(sizeof(int64_t) * E);
    pl->send_counts = malloc(sizeof(int) * ep_size);
    pl->send_displs = malloc(sizeof(int) * ep_size);
    pl->recv_counts = malloc(sizeof(int) * ep_size);
    pl->recv_displs = malloc(sizeof(int) * ep_size);
    pl->src_cursor = malloc(sizeof(int) * ep_size * El);
    pl->expert_offsets = malloc(sizeof(int) * (ns * El + 1));
    pl->slot = malloc(sizeof(int) * (b->max_send ? b->max_send : 1));
    pl->recv_to_expert = malloc(sizeof(int) * (b->max_recv ? b->max_recv : 1));
    b->work = malloc(scmoe__route_workspace_bytes(S_max, k) + 1);
}

static void plan_free(plan_bufs *b) {
    route_plan *pl = &b->pl;
    free(pl->cursor);
    free(pl->expert_count);
    free(pl->expert_kept);
    free(pl->send_counts);
    free(pl->send_displs);
    free(pl->recv_counts);
    free(pl->recv_displs);
    free(pl->src_cursor);
    free(pl->expert_offsets);
    free(pl->slot);
    free(pl->recv_to_expert);
    free(b->work);
}

typedef struct {
    float score;
    int token;
} ranked_ref;
static int ref_cmp(const void *a, const void *b) {
    const ranked_ref *x = a, *y = b;
    /* NaN scores: the library's comparator is not a total order then; the reference is only used
     * when every score is a number (see below) */
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->token - y->token;
}

/* The key of assignment a = t k + j in the layouts' order, round j then token t: j S + t. */
static int64_t round_token(int64_t a, int k, int64_t S) { return a % k * S + a / k; }

/* Capacity per source rank (scmoe__route_plan_local_send / _recv): each rank plans its own slice alone, the
 * receivers only get the per-(expert, round) counts. Checked: a rank's send side is exactly a one-rank
 * GLOBAL plan of its slice with its own capacity (raw: the same for every rank); its counts add up to
 * its send blocks; on the receive side, recv_counts match the senders' blocks, recv_to_expert is a
 * permutation, expert_offsets are monotone and end at n_recv, every row reaches the block of its
 * expert in the stage its receive row belongs to, and (dropless, no pipelining: gref given) expert e's
 * rows are in GLOBAL's order, by (round, global token), either priority. */
static void local_scope(const int32_t *rec, const int *tokens, const int64_t *first_tok, int world, int ep_size, int E,
                        int k, scmoe_priority prio, int64_t raw_cap, float cf, int chunks, int max_tokens,
                        const int64_t *gref, const int64_t *estart, const int64_t *cnt) {
    int El = E / ep_size, msg = 1 + El * k, stride = k + 1, ns = scmoe__route_stages(chunks);
    plan_bufs lb[MAX_WORLD], ob;
    int32_t *out[MAX_WORLD], *in = malloc(sizeof(int32_t) * (size_t)ep_size * msg);
    int64_t *sendrow[MAX_WORLD];
    for (int r = 0; r < world; r++) {
        int n = tokens[r];
        int64_t cap = raw_cap >= 0 ? raw_cap : scmoe__route_capacity(n, E, k, cf);
        const int32_t *mine = rec + first_tok[r] * stride;
        plan_alloc(&lb[r], E, ep_size, max_tokens, 1, k, 0.0f, chunks);
        out[r] = malloc(sizeof(int32_t) * (size_t)ep_size * msg);
        scmoe__route_plan_local_send(&lb[r].pl, lb[r].work, mine, n, ep_size, E, k, prio, cap, out[r]);
        plan_alloc(&ob, E, 1, max_tokens, 1, k, 0.0f, 0);
        int one = n;
        scmoe__route_plan_build(&ob.pl, ob.work, mine, &one, 1, 0, 1, E, k, prio, cap, 0);
        const route_plan *pl = &lb[r].pl;
        REQUIRE(pl->n_send == ob.pl.n_send && pl->tokens == n && pl->dropped == ob.pl.dropped);
        for (int e = 0; e < E; e++) REQUIRE(pl->expert_kept[e] == ob.pl.expert_kept[e]);
        for (int i = 0; i < n * k; i++) REQUIRE(pl->slot[i] == ob.pl.slot[i]);
        plan_free(&ob);
        sendrow[r] = malloc(sizeof(int64_t) * (size_t)(pl->n_send ? pl->n_send : 1));
        for (int t = 0; t < n; t++)
            for (int j = 0; j < k; j++)
                if (pl->slot[t * k + j] >= 0) sendrow[r][pl->slot[t * k + j]] = (first_tok[r] + t) * k + j;
        for (int q = 0; q < ep_size; q++) {
            int sum = 0;
            for (int i = 1; i < msg; i++) sum += out[r][(size_t)q * msg + i];
            REQUIRE(sum == pl->send_counts[q]);
        }
    }
    for (int r = 0; r < world; r++) {
        int g = r / ep_size, q = r % ep_size, first_e = q * El;
        for (int p = 0; p < ep_size; p++)
            memcpy(in + (size_t)p * msg, out[g * ep_size + p] + (size_t)q * msg, sizeof(int32_t) * msg);
        route_plan *pl = &lb[r].pl;
        scmoe__route_plan_local_recv(pl, in, ep_size, q, El, k, chunks);
        REQUIRE(pl->n_stages == ns);
        int off = 0;
        for (int p = 0; p < ep_size; p++) {
            REQUIRE(pl->recv_counts[p] == lb[g * ep_size + p].pl.send_counts[q] && pl->recv_displs[p] == off);
            off += pl->recv_counts[p];
        }
        REQUIRE(off == pl->n_recv && pl->n_recv <= lb[r].max_recv);
        int64_t *ebuf = malloc(sizeof(int64_t) * (size_t)(pl->n_recv ? pl->n_recv : 1));
        int *from = malloc(sizeof(int) * (size_t)(pl->n_recv ? pl->n_recv : 1));
        for (int i = 0; i < pl->n_recv; i++) ebuf[i] = -1;
        for (int p = 0; p < ep_size; p++)
            for (int i = 0; i < pl->recv_counts[p]; i++) {
                const route_plan *src = &lb[g * ep_size + p].pl;
                int row = pl->recv_displs[p] + i, dst = pl->recv_to_expert[row];
                REQUIRE(dst >= 0 && dst < pl->n_recv && ebuf[dst] == -1);
                ebuf[dst] = sendrow[g * ep_size + p][src->send_displs[q] + i];
                from[dst] = row;
            }
        const int *eoff = pl->expert_offsets;
        REQUIRE(eoff[0] == 0 && eoff[ns * El] == pl->n_recv);
        for (int st = 0; st < ns; st++)
            for (int e = 0; e < El; e++) {
                REQUIRE(eoff[st * El + e] <= eoff[st * El + e + 1]);
                for (int i = eoff[st * El + e]; i < eoff[st * El + e + 1]; i++) {
                    int64_t a = ebuf[i];
                    REQUIRE(a >= 0 && rec[(a / k) * stride + a % k] == first_e + e);
                    int p = 0, lo, hi;
                    while (from[i] >= pl->recv_displs[p] + pl->recv_counts[p]) p++;
                    scmoe__route_stage_range(ns, st, p == q, pl->recv_counts[p], &lo, &hi);
                    REQUIRE(from[i] - pl->recv_displs[p] >= lo && from[i] - pl->recv_displs[p] < hi);
                }
            }
        for (int e = 0; gref && e < El; e++) { /* GLOBAL's order: by (round, token) over the whole batch */
            int ge = first_e + e, i = eoff[e];
            for (int64_t l = 0; l < cnt[ge]; l++) {
                int64_t a = gref[estart[ge] + l];
                if (a / k < first_tok[g * ep_size] || a / k >= first_tok[g * ep_size + ep_size]) continue;
                REQUIRE(i < eoff[e + 1] && ebuf[i] == a);
                i++;
            }
            REQUIRE(i == eoff[e + 1]);
        }
        free(ebuf);
        free(from);
    }
    for (int r = 0; r < world; r++) {
        free(out[r]);
        free(sendrow[r]);
        plan_free(&lb[r]);
    }
    free(in);
}

/* GLOBAL with TOKEN priority from the ranks' per-(round, expert) counts, scanned and summed as moe.c's
 * scan_i64_start does, then the counts message to each group: each rank's plan == pb[r]'s, bit for bit. */
static void global_counts(const int32_t *rec, const int *tokens, const int64_t *first_tok, int world, int ep_size,
                          int E, int k, int64_t capacity, float cf_hi, int chunks, int max_tokens,
                          const plan_bufs *pb) {
    int El = E / ep_size, msg = 1 + El * k, kE = k * E, stride = k + 1;
    int64_t S = first_tok[world];
    int64_t *cnt = calloc((size_t)(world + 2) * kE, sizeof(int64_t)), *total = cnt + (size_t)world * kE,
            *prefix = total + kE;
    plan_bufs gb[MAX_WORLD], cb;
    int32_t *out[MAX_WORLD], *in = malloc(sizeof(int32_t) * (size_t)ep_size * msg),
                             *cout = malloc(sizeof(int32_t) * (size_t)ep_size * msg);
    int64_t *base = malloc(sizeof(int64_t) * ((size_t)kE + 1));
    plan_alloc(&cb, E, ep_size, max_tokens, world, k, cf_hi, chunks);
    for (int r = 0; r < world; r++) {
        scmoe__route_round_counts(cnt + (size_t)r * kE, rec + first_tok[r] * stride, tokens[r], E, k);
        for (int i = 0; i < kE; i++) total[i] += cnt[(size_t)r * kE + i];
    }
    for (int r = 0; r < world; r++) {
        memset(prefix, 0, sizeof(int64_t) * kE);
        for (int q = 0; q < r; q++)
            for (int i = 0; i < kE; i++) prefix[i] += cnt[(size_t)q * kE + i];
        plan_alloc(&gb[r], E, ep_size, max_tokens, world, k, cf_hi, chunks); /* max_recv as the layer sizes it */
        out[r] = malloc(sizeof(int32_t) * (size_t)ep_size * msg);
        scmoe__route_plan_global_send(&gb[r].pl, gb[r].work, rec + first_tok[r] * stride, tokens[r], ep_size, E, k,
                                      prefix, total, S, capacity, out[r]);
        /* the same from my round counts alone (a device's plan): all but the slots, and the bases */
        scmoe__route_plan_global_counts(&cb.pl, cnt + (size_t)r * kE, prefix, total, ep_size, E, k, S, capacity, cout,
                                        base);
        const route_plan *a = &cb.pl, *b = &gb[r].pl;
        REQUIRE(a->tokens == b->tokens && a->capacity == b->capacity && a->dropped == b->dropped);
        REQUIRE(!memcmp(a->expert_count, b->expert_count, sizeof(int64_t) * E));
        REQUIRE(!memcmp(a->expert_kept, b->expert_kept, sizeof(int64_t) * E));
        REQUIRE(a->n_send == b->n_send && !memcmp(a->send_counts, b->send_counts, sizeof(int) * ep_size));
        REQUIRE(!memcmp(a->send_displs, b->send_displs, sizeof(int) * ep_size));
        for (int p = 0; p < ep_size; p++) /* word 0 is the caller's */
            REQUIRE(!memcmp(cout + (size_t)p * msg + 1, out[r] + (size_t)p * msg + 1, sizeof(int32_t) * (msg - 1)));
        for (int e = 0; e < E; e++)
            for (int j = 0, done = 0; j < k; done += (int)total[(size_t)j * E + e], j++)
                REQUIRE(base[(size_t)j * E + e] == done + prefix[(size_t)j * E + e]);
        REQUIRE(base[kE] == capacity);
    }
    for (int r = 0; r < world; r++) {
        int g = r / ep_size, q = r % ep_size;
        for (int p = 0; p < ep_size; p++)
            memcpy(in + (size_t)p * msg, out[g * ep_size + p] + (size_t)q * msg, sizeof(int32_t) * msg);
        route_plan *a = &gb[r].pl;
        const route_plan *b = &pb[r].pl;
        scmoe__route_plan_local_recv(a, in, ep_size, q, El, k, chunks);
        REQUIRE(a->tokens == b->tokens && a->capacity == b->capacity && a->dropped == b->dropped);
        REQUIRE(!memcmp(a->expert_count, b->expert_count, sizeof(int64_t) * E));
        REQUIRE(!memcmp(a->expert_kept, b->expert_kept, sizeof(int64_t) * E));
        REQUIRE(!memcmp(a->slot, b->slot, sizeof(int) * (size_t)tokens[r] * k));
        REQUIRE(a->n_send == b->n_send && a->n_recv == b->n_recv && a->n_stages == b->n_stages);
        REQUIRE(!memcmp(a->send_counts, b->send_counts, sizeof(int) * ep_size));
        REQUIRE(!memcmp(a->send_displs, b->send_displs, sizeof(int) * ep_size));
        REQUIRE(!memcmp(a->recv_counts, b->recv_counts, sizeof(int) * ep_size));
        REQUIRE(!memcmp(a->recv_displs, b->recv_displs, sizeof(int) * ep_size));
        REQUIRE(!memcmp(a->recv_to_expert, b->recv_to_expert, sizeof(int) * (size_t)a->n_recv));
        REQUIRE(!memcmp(a->expert_offsets, b->expert_offsets, sizeof(int) * ((size_t)a->n_stages * El + 1)));
    }
    for (int r = 0; r < world; r++) {
        free(out[r]);
        plan_free(&gb[r]);
    }
    plan_free(&cb);
    free(base);
    free(cout);
    free(in);
    free(cnt);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_in in = {data, size, 0};
    int world = 1 + take_u8(&in) % MAX_WORLD;
    int divisors[MAX_WORLD], nd = 0;
    for (int q = 1; q <= world; q++)
        if (world % q == 0) divisors[nd++] = q;
    int ep_size = divisors[take_u8(&in) % nd];
    int El = 1 + take_u8(&in) % 6;
    int E = ep_size * El;
    int k = 1 + take_u8(&in) % (E < MAX_K ? E : MAX_K);
    scmoe_priority prio = take_u8(&in) & 1 ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN;
    uint8_t cap_mode = take_u8(&in);
    static const float cfs[] = {0.0f, -1.0f, 0.25f, 0.5f, 1.0f, 1.25f, 2.0f, 4.0f, 0.01f, 100.0f};
    float cf = cfs[take_u8(&in) % (sizeof cfs / sizeof *cfs)];
    int tokens[MAX_WORLD], max_tokens = 1;
    int64_t S = 0;
    for (int r = 0; r < world; r++) {
        tokens[r] = take_u8(&in) % (MAX_TOK_PER_RANK + 1);
        S += tokens[r];
        if (tokens[r] > max_tokens) max_tokens = tokens[r];
    }
    /* the layer's max_tokens may exceed every rank's count */
    max_tokens += take_u8(&in) % 4;
    int64_t capacity;
    float cf_hi = cf;
    if (cap_mode < 192) {
        capacity = scmoe__route_capacity(S, E, k, cf);
    } else {
        /* a raw capacity: the plan must be consistent for any value; the buffers are then sized for
         * dropless (the layer never does this, it always uses scmoe__route_capacity) */
        capacity = (int64_t)(take_u16(&in) % (S * k + 3));
        cf_hi = 0.0f;
    }
    int stride = k + 1;
    int32_t *rec = malloc(sizeof(int32_t) * (size_t)(S ? S : 1) * stride);
    int any_nan = 0;
    for (int64_t t = 0; t < S; t++) {
        int32_t *r = rec + t * stride;
        for (int j = 0; j < k; j++) {
            /* k distinct experts, as scmoe__gate_topk produces */
            int e = take_u8(&in) % E;
            for (int tries = 0;; tries++) {
                int dup = 0;
                for (int q = 0; q < j; q++) dup |= r[q] == e;
                if (!dup) break;
                e = (e + 1) % E;
            }
            r[j] = e;
        }
        uint8_t sb = take_u8(&in);
        float sc = sb < 250 ? (float)(sb % 17) / 16.0f : sb == 250 ? NAN : sb == 251 ? -0.0f : 1.0f;
        if (isnan(sc)) any_nan = 1;
        memcpy(&r[k], &sc, sizeof sc);
    }
    int chunks = take_u8(&in) % (SCMOE_MAX_PIPELINE_CHUNKS + 1), ns = scmoe__route_stages(chunks);

    /* plans: one per rank, and the one-rank reference over the same records */
    plan_bufs pb[MAX_WORLD], one;
    for (int r = 0; r < world; r++) {
        plan_alloc(&pb[r], E, ep_size, max_tokens, world, k, cf_hi, chunks);
        scmoe__route_plan_build(&pb[r].pl, pb[r].work, rec, tokens, world, r, ep_size, E, k, prio, capacity, chunks);
    }
    int one_tokens = (int)S;
    plan_alloc(&one, E, 1, one_tokens > 0 ? one_tokens : 1, 1, k, cf_hi, 0);
    scmoe__route_plan_build(&one.pl, one.work, rec, &one_tokens, 1, 0, 1, E, k, prio, capacity, 0);

    /* independent recomputation of the locations */
    int *order = malloc(sizeof(int) * (size_t)(S ? S : 1));
    int64_t *loc = malloc(sizeof(int64_t) * (size_t)(S ? S : 1) * k);
    int64_t *cnt = calloc((size_t)E, sizeof(int64_t));
    if (prio == SCMOE_PRIORITY_BATCH && !any_nan) {
        ranked_ref *rk = malloc(sizeof *rk * (size_t)(S ? S : 1));
        for (int64_t t = 0; t < S; t++) {
            memcpy(&rk[t].score, &rec[t * stride + k], sizeof(float));
            rk[t].token = (int)t;
        }
        qsort(rk, (size_t)S, sizeof *rk, ref_cmp);
        for (int64_t t = 0; t < S; t++) order[t] = rk[t].token;
        free(rk);
    } else {
        for (int64_t t = 0; t < S; t++) order[t] = (int)t;
    }
    int have_ref = !(prio == SCMOE_PRIORITY_BATCH && any_nan);
    for (int j = 0; j < k; j++)
        for (int64_t i = 0; i < S; i++) {
            int t = order[i];
            loc[(int64_t)t * k + j] = cnt[rec[(int64_t)t * stride + j]]++;
        }

    /* by_rt[estart[e] + i]: expert e's assignments by (round j, token t), the order of the layouts (the
     * priority picks only which are kept) */
    int64_t *estart = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *by_rt = malloc(sizeof(int64_t) * (size_t)(S * k ? S * k : 1)), *ecur = calloc((size_t)E, sizeof(int64_t));
    for (int e = 0; e < E; e++) estart[e + 1] = estart[e] + cnt[e];
    for (int j = 0; j < k; j++)
        for (int64_t t = 0; t < S; t++) {
            int e = rec[t * stride + j];
            by_rt[estart[e] + ecur[e]++] = t * k + j;
        }
    free(ecur);

    /* ---- global counts ---- */
    for (int r = 0; r <= world; r++) {
        const route_plan *pl = r < world ? &pb[r].pl : &one.pl;
        REQUIRE(pl->tokens == S);
        REQUIRE(pl->capacity == capacity);
        int64_t sum = 0, drop = 0;
        for (int e = 0; e < E; e++) {
            REQUIRE(pl->expert_count[e] == cnt[e]);
            int64_t kept = cnt[e] < capacity ? cnt[e] : capacity;
            if (kept < 0) kept = 0;
            REQUIRE(pl->expert_kept[e] == kept);
            sum += pl->expert_count[e];
            drop += pl->expert_count[e] - pl->expert_kept[e];
        }
        REQUIRE(sum == S * k);
        REQUIRE(pl->dropped == drop);
    }

    /* ---- send side, per rank ---- */
    int64_t first_tok[MAX_WORLD + 1];
    first_tok[0] = 0;
    for (int r = 0; r < world; r++) first_tok[r + 1] = first_tok[r] + tokens[r];
    /* sent rows: what each rank's send buffer holds, as global assignment ids t*k+j */
    int64_t *sendrow[MAX_WORLD];
    for (int r = 0; r < world; r++) {
        const route_plan *pl = &pb[r].pl;
        int n = tokens[r];
        int kept_mine = 0;
        for (int t = 0; t < n; t++)
            for (int j = 0; j < k; j++) kept_mine += loc[(first_tok[r] + t) * k + j] < capacity;
        if (have_ref) REQUIRE(pl->n_send == kept_mine);
        REQUIRE(pl->n_send <= pb[r].max_send);
        int off = 0;
        for (int q = 0; q < ep_size; q++) {
            REQUIRE(pl->send_counts[q] >= 0);
            REQUIRE(pl->send_displs[q] == off);
            off += pl->send_counts[q];
        }
        REQUIRE(off == pl->n_send);
        sendrow[r] = malloc(sizeof(int64_t) * (size_t)(pl->n_send ? pl->n_send : 1));
        for (int i = 0; i < pl->n_send; i++) sendrow[r][i] = -1;
        for (int t = 0; t < n; t++)
            for (int j = 0; j < k; j++) {
                int64_t a = (first_tok[r] + t) * k + j;
                int s = pl->slot[t * k + j];
                if (have_ref) REQUIRE((s >= 0) == (loc[a] < capacity));
                if (s < 0) continue;
                REQUIRE(s < pl->n_send);
                REQUIRE(sendrow[r][s] == -1); /* each slot used once */
                sendrow[r][s] = a;
                /* destination block */
                int e = rec[(first_tok[r] + t) * stride + j], q = e / El;
                REQUIRE(s >= pl->send_displs[q] && s < pl->send_displs[q] + pl->send_counts[q]);
            }
        for (int i = 0; i < pl->n_send; i++) REQUIRE(sendrow[r][i] >= 0);
        /* by expert, then by (round, token) */
        for (int i = 1; i < pl->n_send; i++) {
            int64_t a = sendrow[r][i - 1], b = sendrow[r][i];
            int ea = rec[(a / k) * stride + a % k], eb = rec[(b / k) * stride + b % k];
            REQUIRE(ea <= eb);
            if (ea == eb) REQUIRE(round_token(a, k, S) < round_token(b, k, S));
        }
    }

    /* ---- receive side and the simulated exchange, per rank ---- */
    int64_t n_kept_total = 0;
    for (int64_t a = 0; a < S * k; a++) n_kept_total += loc[a] < capacity;
    char *seen = calloc((size_t)(S * k ? S * k : 1), 1);
    for (int r = 0; r < world; r++) {
        const route_plan *pl = &pb[r].pl;
        int g = r / ep_size, q = r % ep_size, first_e = q * El;
        int off = 0;
        for (int p = 0; p < ep_size; p++) {
            const route_plan *src = &pb[g * ep_size + p].pl;
            REQUIRE(pl->recv_counts[p] == src->send_counts[q]);
            REQUIRE(pl->recv_displs[p] == off);
            off += pl->recv_counts[p];
        }
        REQUIRE(off == pl->n_recv);
        REQUIRE(pl->n_recv <= pb[r].max_recv);
        /* the all-to-all: source p's block for q, in order, at recv_displs[p] */
        int64_t *recv = malloc(sizeof(int64_t) * (size_t)(pl->n_recv ? pl->n_recv : 1));
        for (int p = 0; p < ep_size; p++) {
            const route_plan *src = &pb[g * ep_size + p].pl;
            memcpy(recv + pl->recv_displs[p], sendrow[g * ep_size + p] + src->send_displs[q],
                   sizeof(int64_t) * (size_t)src->send_counts[q]);
        }
        const int *eoff = pl->expert_offsets;
        REQUIRE(pl->n_stages == ns);
        REQUIRE(eoff[0] == 0);
        for (int i = 0; i < ns * El; i++) REQUIRE(eoff[i] <= eoff[i + 1]);
        REQUIRE(eoff[ns * El] == pl->n_recv);
        int64_t *ebuf = malloc(sizeof(int64_t) * (size_t)(pl->n_recv ? pl->n_recv : 1));
        int *from = malloc(sizeof(int) * (size_t)(pl->n_recv ? pl->n_recv : 1)); /* expert row -> receive row */
        for (int i = 0; i < pl->n_recv; i++) ebuf[i] = -1;
        for (int i = 0; i < pl->n_recv; i++) {
            int dst = pl->recv_to_expert[i];
            REQUIRE(dst >= 0 && dst < pl->n_recv);
            REQUIRE(ebuf[dst] == -1); /* a permutation */
            ebuf[dst] = recv[i];
            from[dst] = i;
        }
        for (int st = 0; st < ns; st++)
            for (int e = 0; e < El; e++)
                for (int i = eoff[st * El + e]; i < eoff[st * El + e + 1]; i++) {
                    int64_t a = ebuf[i];
                    REQUIRE(a >= 0 && a < S * k);
                    REQUIRE(rec[(a / k) * stride + a % k] == first_e + e);
                    REQUIRE(a / k >= first_tok[g * ep_size] && a / k < first_tok[g * ep_size + ep_size]);
                    REQUIRE(!seen[a]); /* exactly once over all ranks */
                    seen[a] = 1;
                    if (i > eoff[st * El + e]) REQUIRE(round_token(ebuf[i - 1], k, S) < round_token(a, k, S));
                    /* the stage of its receive row, as both sides of the exchange split the block */
                    int p = 0, lo, hi;
                    while (from[i] >= pl->recv_displs[p] + pl->recv_counts[p]) p++;
                    scmoe__route_stage_range(ns, st, p == q, pl->recv_counts[p], &lo, &hi);
                    REQUIRE(from[i] - pl->recv_displs[p] >= lo && from[i] - pl->recv_displs[p] < hi);
                }
        /* P ranks route as one: expert e's rows here are the one-rank plan's rows of expert e that
         * belong to this group's tokens, in the same order (stage by stage when pipelined: the count) */
        if (have_ref)
            for (int e = 0; e < El; e++) {
                int ge = first_e + e, i = eoff[e], n_e = 0;
                for (int st = 0; st < ns; st++) n_e += eoff[st * El + e + 1] - eoff[st * El + e];
                if (ns > 1) {
                    for (int64_t l = 0; l < cnt[ge]; l++) {
                        int64_t a = by_rt[estart[ge] + l];
                        n_e -= loc[a] < capacity && a / k >= first_tok[g * ep_size] &&
                               a / k < first_tok[g * ep_size + ep_size];
                    }
                    REQUIRE(n_e == 0);
                    continue;
                }
                /* the one-rank expert buffer of expert ge: its kept assignments by (round, token) */
                for (int64_t l = 0; l < cnt[ge]; l++) {
                    int64_t a = by_rt[estart[ge] + l];
                    if (loc[a] >= capacity) continue;
                    if (a / k < first_tok[g * ep_size] || a / k >= first_tok[g * ep_size + ep_size]) continue;
                    REQUIRE(i < eoff[e + 1]);
                    REQUIRE(ebuf[i] == a);
                    i++;
                }
                REQUIRE(i == eoff[e + 1]);
            }
        /* the combine: expert rows back to recv order, back to the sender's slot */
        for (int i = 0; i < pl->n_recv; i++) REQUIRE(ebuf[pl->recv_to_expert[i]] == recv[i]);
        free(recv);
        free(ebuf);
        free(from);
    }
    int64_t n_seen = 0;
    for (int64_t a = 0; a < S * k; a++) {
        n_seen += seen[a];
        if (have_ref) REQUIRE(seen[a] == (loc[a] < capacity));
    }
    REQUIRE(n_seen == n_kept_total || !have_ref);
    int64_t n_sent = 0;
    for (int r = 0; r < world; r++) n_sent += pb[r].pl.n_send;
    REQUIRE(n_seen == n_sent);

    free(seen);
    if (prio == SCMOE_PRIORITY_TOKEN)
        global_counts(rec, tokens, first_tok, world, ep_size, E, k, capacity, cf_hi, chunks, max_tokens, pb);
    local_scope(rec, tokens, first_tok, world, ep_size, E, k, prio, cap_mode < 192 ? -1 : capacity, cf, chunks,
                max_tokens, cap_mode < 192 && cf <= 0 && ns == 1 ? by_rt : NULL, estart, cnt);
    for (int r = 0; r < world; r++) {
        free(sendrow[r]);
        plan_free(&pb[r]);
    }
    plan_free(&one);
    free(order);
    free(estart);
    free(by_rt);
    free(loc);
    free(cnt);
    free(rec);
    return 0;
}
