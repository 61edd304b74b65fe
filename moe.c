/* moe.c: one MoE layer over expert parallelism, written as phases so a schedule can put other work
 * between them:
 *
 *   gate_encode   (moe_gate_encode.c) logits, softmax, top-k; the route plan over the ranks; my tokens'
 *                 rows packed by destination (capacity LOCAL, and GLOBAL with TOKEN priority: the
 *                 receive side's counts travel to the group, and the dispatch waits for them, so they
 *                 hide behind what runs between); scmoe__moe_plan_ready here takes the plan
 *   dispatch      nonblocking all-to-all: rows to the ranks owning their experts
 *   experts       rows regrouped by local expert; one FFN per expert over its contiguous rows
 *   combine       nonblocking all-to-all back, same plan mirrored
 *   decode        y_t = sum_j w_tj E_{e_tj}(x_t)
 *
 * Backward mirrors it with the same plan: decode_backward (dL/dw, w * dy rows) -> exchange like a
 * dispatch -> experts_backward -> exchange like a combine -> scmoe__gate_backward (dx through the rows, the
 * gate weights, the aux and z losses). */
#include "scmoe_internal.h"
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the dispatch: when each stage's exchange starts (moe_exchange.c runs them) ---- */

/* A stage has an exchange unless it is the own block's (stage 0 of a pipeline). All ranks of the
 * group decide this alike, so their collectives match even where a stage moves no rows. */
static int stage_travels(const moe_layer *m, int s) { return m->plan.n_stages == 1 || s > 0; }

/* The stage of the first dispatch: a pipeline's stage 0 is the own block, nothing to send. */
static int first_dispatch(const moe_layer *m) { return scmoe__route_stages(m->cfg.pipeline_chunks) > 1; }

/* The first dispatch if it has not started: waits for the routing counts it needs, if they are in
 * flight (capacity LOCAL), and starts it. */
static scmoe_status dispatch_ensure(moe_layer *m) {
    if (m->xch.next_dispatch == MOE_MAX_STAGES) return m->xch.deferred; /* a poll failed to start it */
    if (m->xch.next_dispatch != first_dispatch(m)) return SCMOE_OK;
    scmoe_status st = scmoe__moe_route_finish(m);
    if (st) {
        m->xch.next_dispatch = MOE_MAX_STAGES; /* a failed pass chains nothing more */
        return st;
    }
    m->xch.next_dispatch++;
    return scmoe__moe_exchange_start(m, first_dispatch(m), 0);
}

/* The next dispatch, as soon as it may go. The first waits only for the routing counts (capacity
 * LOCAL: the receive side of the plan is built from them); a pipeline's later dispatches take the link
 * one after another (concurrent ones would share it and all land late): the next starts as soon as
 * the one before has landed, noticed by a poll or a wait, so the chunks keep flowing behind whatever
 * compute runs meanwhile. */
static scmoe_status dispatch_next(moe_layer *m) {
    int s = m->xch.next_dispatch;
    if (s == first_dispatch(m)) return scmoe__moe_route_landed(m) ? dispatch_ensure(m) : SCMOE_OK;
    if (s >= m->plan.n_stages || !m->xch.xd[s - 1].t_done) return SCMOE_OK;
    m->xch.next_dispatch++;
    return scmoe__moe_exchange_start(m, s, 0);
}

void scmoe__moe_poll(void *arg) {
    moe_layer *m = arg;
    int next = m->xch.next_dispatch;
    if (next != MOE_MAX_STAGES && !m->xch.deferred) m->xch.deferred = scmoe__moe_route_poll(m);
    scmoe__moe_release(m);
    if (m->ep->progress == SCMOE_PROGRESS_POLL) {
        for (int s = 0; s < m->plan.n_stages; s++) {
            scmoe__moe_inflight_test(&m->xch.xd[s]);
            scmoe__moe_inflight_test(&m->xch.xc[s]);
        }
    } else if (m->ep->progress == SCMOE_PROGRESS_THREAD && next > first_dispatch(m) && next < m->plan.n_stages) {
        scmoe__moe_inflight_test(&m->xch.xd[next - 1]); /* the helper thread moves it; this only learns it landed */
    }
    if (!m->xch.deferred) m->xch.deferred = dispatch_next(m);
}

static const char *exchange_name(const moe_layer *m, int combine) {
    static const char *const names[2][2] = {{"dispatch", "combine"}, {"grad_dispatch", "grad_combine"}};
    return names[m->pass][combine];
}

/* Starts the first dispatch, or (capacity LOCAL, the routing counts still in flight) asks for it: a
 * poll starts it once they land, the dispatch's wait at the latest. So in a pair the counts travel
 * behind the dense operations the schedule runs after the gate. */
scmoe_status scmoe__moe_dispatch_start(moe_layer *m) {
    m->xch.deferred = SCMOE_OK;
    m->xch.next_dispatch = first_dispatch(m);
    for (int s = 0; s < MOE_MAX_STAGES; s++) m->xch.xd[s].held = m->xch.xc[s].held = 0; /* a failed pass's */
    scmoe_status st = scmoe__moe_route_poll(m);
    return st ? st : dispatch_next(m);
}

/* waits for stage s's dispatch, then puts the next one on the wire if a poll has not already */
static scmoe_status dispatch_wait(moe_layer *m, int s) {
    scmoe_status st = dispatch_ensure(m);
    if (!st) st = scmoe__moe_inflight_wait(m, &m->xch.xd[s], exchange_name(m, 0));
    if (!st) st = m->xch.deferred;
    if (!st) st = dispatch_next(m);
    return st;
}

scmoe_status scmoe__moe_dispatch_wait(moe_layer *m) { return dispatch_wait(m, first_dispatch(m)); }

scmoe_status scmoe__moe_combine_wait(moe_layer *m) {
    /* the statistics first: a serialized order times the combine as the last exchange waited on */
    scmoe_status st = m->pass == 0 ? scmoe__moe_stats_finish(m) : SCMOE_OK;
    if (!st) st = m->xch.deferred; /* a poll failed to start an exchange */
    for (int s = 0; s < m->plan.n_stages && !st; s++)
        st = scmoe__moe_inflight_wait(m, &m->xch.xc[s], exchange_name(m, 1));
    return st;
}

/* ---- setup ---- */

scmoe_status scmoe__moe_init(moe_layer *m, scmoe_context *ctx, const scmoe_config *cfg, int top_k, param_table *pt,
                             const char *prefix, float w2_std) {
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    m->cfg = *cfg;
    m->pt = pt;
    m->k = top_k;
    m->E = cfg->n_experts;
    m->d = cfg->d_model;
    m->h = cfg->d_hidden;
    m->h1 = scmoe__ffn_width(m->h, cfg->activation);
    m->max_tokens = cfg->max_tokens;
    m->training = 1;
    m->xch.next_dispatch = MOE_MAX_STAGES; /* no dispatch for a poll to start before the first pass asks */
    scmoe_status s = scmoe__groups_create(ctx, cfg->ep_size, &m->ep, &m->ep_back, &m->replicas);
    if (s) return s;
    m->ep_size = m->ep->size;
    m->ep_rank = m->ep->rank;
    if (m->E % m->ep_size != 0)
        return scmoe__fail(ctx, SCMOE_ERR_EP_SIZE, "n_experts %d is not divisible by the expert-parallel size %d", m->E,
                           m->ep_size);
    m->E_local = m->E / m->ep_size;
    m->first_expert = m->ep_rank * m->E_local;

    char name[64];
    int d = m->d, E = m->E, h = m->h, h1 = m->h1;
    int offload = ctx->compute->device && ctx->offload_experts > 0;
    snprintf(name, sizeof name, "%sgate.weight", prefix);
    m->p_wg = scmoe__params_add(pt, name, 2, (int[]){d, E}, SYNC_WORLD, INIT_NORMAL, 0.02f, cfg->seed);
    for (int i = 0; i < m->E_local; i++) {
        int e = m->first_expert + i, idx;
        snprintf(name, sizeof name, "%sexperts.%d.w1", prefix, e);
        idx = scmoe__params_add(pt, name, 2, (int[]){d, h1}, SYNC_REPLICAS, INIT_NORMAL, 0.02f, cfg->seed);
        if (i == 0) m->p_e0 = idx;
        snprintf(name, sizeof name, "%sexperts.%d.b1", prefix, e);
        scmoe__params_add(pt, name, 1, (int[]){h1}, SYNC_REPLICAS, INIT_ZERO, 0, cfg->seed);
        snprintf(name, sizeof name, "%sexperts.%d.w2", prefix, e);
        scmoe__params_add(pt, name, 2, (int[]){h, d}, SYNC_REPLICAS, INIT_NORMAL, w2_std, cfg->seed);
        snprintf(name, sizeof name, "%sexperts.%d.b2", prefix, e);
        scmoe__params_add(pt, name, 1, (int[]){d}, SYNC_REPLICAS, INIT_ZERO, 0, cfg->seed);
    }
    if (pt->failed) return scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory registering parameters");
    for (int i = 0; offload && i < 4 * m->E_local; i++) pt->p[m->p_e0 + i].host_data = 1;
    m->off.slots = offload ? (ctx->offload_experts < m->E_local ? ctx->offload_experts : m->E_local) : 0;
    return SCMOE_OK;
}

/* The two groups mirrored between host and device (scmoe_internal.h): each is laid out by its one
 * function below, as one block in the same order and sizes on either side, so it crosses in one copy
 * (a device copy waits for the stream: one wait each way per forward, not seven). A buffer added to a
 * group is added there, and its copies follow; mirrors_match checks the two sides agree. */
static gate_outputs gate_outputs_take(arena *a, int n, int E, int k) {
    gate_outputs g;
    g.p = scmoe__arena_take(a, sizeof(float) * (size_t)n * E);
    g.lse = scmoe__arena_take(a, sizeof(float) * n);
    g.score = scmoe__arena_take(a, sizeof(float) * n);
    g.choice = scmoe__arena_take(a, sizeof(int) * (size_t)n * k); /* last */
    return g;
}

/* bytes of the block holding n tokens' gate outputs */
static plan_mirror plan_mirror_take(arena *a, int E, int S, int R) {
    plan_mirror g;
    g.aux_coef = scmoe__arena_take(a, sizeof(float) * E);
    g.slot = scmoe__arena_take(a, sizeof(int) * (size_t)S);
    g.recv_to_expert = scmoe__arena_take(a, sizeof(int) * (size_t)R); /* last */
    return g;
}

/* Each mirrored group has the same member offsets on the host as on the compute side. */
static int mirrors_match(const moe_layer *m) {
    const gate_outputs *g = &m->gate, *gh = &m->gate_h;
    const char *d0 = (const char *)g->p, *h0 = (const char *)gh->p;
    const char *c0 = (const char *)m->plan_d.aux_coef, *ch0 = (const char *)m->aux_coef_h;
    return (const char *)g->lse - d0 == (const char *)gh->lse - h0 &&
           (const char *)g->score - d0 == (const char *)gh->score - h0 &&
           (const char *)g->choice - d0 == (const char *)gh->choice - h0 &&
           (const char *)m->plan_d.slot - c0 == (const char *)m->plan.slot - ch0 &&
           (const char *)m->plan_d.recv_to_expert - c0 == (const char *)m->plan.recv_to_expert - ch0;
}

/* The workspace in four arenas: host (the plan and what host code reads), device (activations and
 * expert rows), exchanged (what MPI moves: mapped memory, or device memory for a CUDA-aware MPI) and
 * pinned (mapped memory: what the device's routing plan writes for the host, droute, the counts
 * message it fills, and the host's side of plan_mirror). On a device backend the host keeps the
 * mirror of the gate's outputs (gate_h), and the device its copy of the plan's arrays (plan_d); on the
 * host backend they are the same arrays. */
static void moe_layout(moe_layer *m, arena *H, arena *D, arena *X, arena *P) {
    int k = m->k, E = m->E, d = m->d, dev = m->co->device;
    int n = m->max_tokens, R = m->max_recv, S = m->max_send, ep = m->ep_size, El = m->E_local;
    int ns = scmoe__route_stages(m->cfg.pipeline_chunks), cur = E > ns * El ? E : ns * El;
    size_t f = sizeof(float), i4 = sizeof(int);
    route_plan *pl = &m->plan;
    pl->cursor = scmoe__arena_take(H, i4 * (size_t)cur);
    pl->expert_count = scmoe__arena_take(H, sizeof(int64_t) * E);
    pl->expert_kept = scmoe__arena_take(H, sizeof(int64_t) * E);
    m->top1_count = scmoe__arena_take(H, sizeof(int64_t) * E);
    pl->send_counts = scmoe__arena_take(H, i4 * ep);
    pl->send_displs = scmoe__arena_take(H, i4 * ep);
    pl->recv_counts = scmoe__arena_take(H, i4 * ep);
    pl->recv_displs = scmoe__arena_take(H, i4 * ep);
    m->xch.xs_counts = scmoe__arena_take(H, i4 * (size_t)ns * ep);
    m->xch.xs_displs = scmoe__arena_take(H, i4 * (size_t)ns * ep);
    m->xch.xr_counts = scmoe__arena_take(H, i4 * (size_t)ns * ep);
    m->xch.xr_displs = scmoe__arena_take(H, i4 * (size_t)ns * ep);
    pl->src_cursor = scmoe__arena_take(H, i4 * ep * El);
    pl->expert_offsets = scmoe__arena_take(H, i4 * ((size_t)ns * El + 1));
    /* pinned: its copies to the device are truly asynchronous (a pageable source may make the driver
     * wait for the stream); the host rewrites it only in the next forward, after the call's device check */
    plan_mirror plan_h = plan_mirror_take(P, E, S, R);
    m->aux_coef_h = plan_h.aux_coef;
    pl->slot = plan_h.slot;
    pl->recv_to_expert = plan_h.recv_to_expert;
    m->route_work = scmoe__arena_take(H, scmoe__route_workspace_bytes(n, k));
    m->records = scmoe__arena_take(H, i4 * (size_t)n * (k + 1));
    m->gsum = scmoe__arena_take(H, sizeof(double) * (E + 1));
    m->lcap.counts_out = scmoe__arena_take(P, sizeof(int32_t) * (size_t)ep * (1 + El * k));
    m->lcap.counts_in = scmoe__arena_take(H, sizeof(int32_t) * (size_t)ep * (1 + El * k));
    m->lcap.ones = scmoe__arena_take(H, i4 * ep);
    m->lcap.iota = scmoe__arena_take(H, i4 * ep);
    if (m->local_cap) m->lcap.lstats = scmoe__arena_take(H, sizeof(double) * MOE_LSTATS(E));
    if (!m->local_cap) {
        m->gcount.agree = scmoe__arena_take(H, sizeof(int64_t) * (3 * MOE_AGREE + COMM_SCAN_WORK(MOE_AGREE)));
        m->gcount.counts = scmoe__arena_take(H, sizeof(int64_t) * (3 * (size_t)k * E + COMM_SCAN_WORK(k * E)));
    }
    if (!m->local_cap && m->cfg.priority == SCMOE_PRIORITY_BATCH) {
        size_t kE = (size_t)k * E, bins = route_select_bins(k * E);
        route_select *sel = &m->gcount.sel;
        sel->need = scmoe__arena_take(H, sizeof(int64_t) * kE);
        sel->ties = scmoe__arena_take(H, sizeof(int64_t) * kE);
        sel->thresh = scmoe__arena_take(H, sizeof(uint64_t) * kE);
        sel->open = scmoe__arena_take(H, i4 * kE);
        m->gcount.hist = scmoe__arena_take(H, sizeof(double) * bins);
        m->gcount.ties = scmoe__arena_take(H, sizeof(int64_t) * (3 * kE + COMM_SCAN_WORK(kE)));
    }
    if (m->droute.on) {
        m->droute.seq_word = scmoe__arena_take(P, sizeof(uint32_t));
        m->droute.top1 = scmoe__arena_take(P, sizeof(int32_t) * E);
        m->droute.kept = scmoe__arena_take(P, sizeof(int32_t) * E);
        m->droute.gsum = scmoe__arena_take(P, sizeof(double) * (E + 1));
        int batch = m->cfg.priority == SCMOE_PRIORITY_BATCH; /* the tokens' priority order, n more */
        size_t work = !m->local_cap ? (size_t)(3 * k + 2) * E : (size_t)(k + 2) * E + (batch ? (size_t)n : 0);
        m->droute.work = scmoe__arena_take(D, i4 * work);
        m->droute.work_sum = scmoe__arena_take(D, sizeof(double) * (E + 1));
        if (!m->local_cap) {
            m->droute.base_h = scmoe__arena_take(P, sizeof(int64_t) * ((size_t)k * E + 1));
            m->droute.base = scmoe__arena_take(D, sizeof(int64_t) * ((size_t)k * E + 1));
        }
    }
    m->off.slot_of = scmoe__arena_take(H, i4 * El);
    m->off.held = scmoe__arena_take(H, i4 * (m->off.slots ? m->off.slots : 1));

    m->buf.logits = scmoe__arena_take(D, f * (size_t)n * E);
    m->buf.dlogits = scmoe__arena_take(D, f * (size_t)n * E);
    m->buf.weight = scmoe__arena_take(D, f * (size_t)n * k);
    m->buf.dweight = scmoe__arena_take(D, f * (size_t)n * k);
    m->gate = gate_outputs_take(D, n, E, k);
    m->buf.xe = scmoe__arena_take(D, f * (size_t)R * d);
    m->buf.ye = scmoe__arena_take(D, f * (size_t)R * d);
    m->buf.dxe = scmoe__arena_take(D, f * (size_t)R * d);
    m->buf.pre = scmoe__arena_take(D, f * (size_t)R * m->h1);
    m->buf.dpre = scmoe__arena_take(D, f * (size_t)R * m->h1);
    m->buf.hid = scmoe__arena_take(D, f * (size_t)R * m->h);
    m->buf.dhid = scmoe__arena_take(D, f * (size_t)R * m->h);
    m->off.cache = scmoe__arena_take(D, f * m->off.slots * m->off.span);
    m->plan_d = dev ? plan_mirror_take(D, E, S, R) : plan_h;
    m->gate_h = dev ? gate_outputs_take(H, n, E, k) : m->gate;

    arena *K = scmoe__moe_exchange_mirrored(m) ? D : X; /* the kernels' side of the exchanges; MPI's is X */
    m->xch.send = scmoe__arena_take(K, f * (size_t)S * d);
    m->xch.crecv = scmoe__arena_take(K, f * (size_t)S * d);
    m->xch.recv = scmoe__arena_take(K, f * (size_t)R * d);
    if (K == X) {
        m->xch.send_m = m->xch.send, m->xch.crecv_m = m->xch.crecv, m->xch.recv_m = m->xch.recv;
    } else if (!m->cfg.wire_bf16) { /* the bf16 wire's own buffers are MPI's side there (below) */
        m->xch.send_m = scmoe__arena_take(X, f * (size_t)S * d);
        m->xch.crecv_m = scmoe__arena_take(X, f * (size_t)S * d);
        m->xch.recv_m = scmoe__arena_take(X, f * (size_t)R * d);
    }
    if (m->cfg.wire_bf16) {
        m->xch.wire_d_out = scmoe__arena_take(X, sizeof(uint16_t) * (size_t)S * d);
        m->xch.wire_d_in = scmoe__arena_take(X, sizeof(uint16_t) * (size_t)R * d);
        m->xch.wire_c_out = scmoe__arena_take(X, sizeof(uint16_t) * (size_t)R * d);
        m->xch.wire_c_in = scmoe__arena_take(X, sizeof(uint16_t) * (size_t)S * d);
    }
}

scmoe_status scmoe__moe_alloc(moe_layer *m) {
    int world = m->ctx->world->size, k = m->k, E = m->E;
    m->co = m->ctx->compute;
    /* the device plans the routing where one source's tokens decide it alone (token after token, or by
     * their top-1 scores with BATCH priority): capacity per source rank, or one rank (whose global batch
     * is its own: the same plan either way); and over the global batch with TOKEN priority, where my
     * tokens' places follow from the round counts scanned over the ranks (gscan_start). BATCH priority
     * over several ranks is planned on the host (route_batch.c's selection reads the scores). */
    int token = m->cfg.priority == SCMOE_PRIORITY_TOKEN;
    m->droute.on = m->co->route_local &&
                   (m->cfg.capacity_scope == SCMOE_CAPACITY_LOCAL || world == 1 || (token && m->co->route_global));
    /* LOCAL (lcap), else GLOBAL: counts scanned over the ranks, not every rank's records (gcount) */
    m->local_cap = m->cfg.capacity_scope == SCMOE_CAPACITY_LOCAL || (m->droute.on && world == 1);
    /* the tokens whose capacity one source's rows share: the global batch, or (LOCAL) its own */
    int64_t S_max = (int64_t)m->max_tokens * (m->local_cap ? 1 : world);
    if ((int64_t)m->max_tokens * k > INT32_MAX / 2)
        return scmoe__fail(m->ctx, SCMOE_ERR_MAX_TOKENS, "max_tokens %d x top_k %d is too large", m->max_tokens, k);
    m->max_send = m->max_tokens * k;
    int64_t recv = (int64_t)m->max_tokens * m->ep_size * k;
    float cf_lo =
        m->cfg.capacity_factor < m->cfg.eval_capacity_factor ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor;
    if (cf_lo > 0) { /* capacity bounds what one expert can receive */
        float cf_hi =
            m->cfg.capacity_factor > m->cfg.eval_capacity_factor ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor;
        int64_t cap = scmoe__route_capacity(S_max, E, k, cf_hi), sources = m->local_cap ? m->ep_size : 1;
        if (cap <= recv / m->E_local / sources) recv = cap * m->E_local * sources;
    }
    if (recv > INT32_MAX / 2)
        return scmoe__fail(m->ctx, SCMOE_ERR_MAX_TOKENS, "max_tokens %d x %d ranks is too large for one exchange",
                           m->max_tokens, world);
    m->max_recv = (int)recv;
    if (m->off.slots) { /* w1 .. b2 of an expert are consecutive in the table's host block */
        const param_entry *w1 = &m->pt->p[m->p_e0], *b2 = &m->pt->p[m->p_e0 + 3];
        m->off.span = b2->offset_data + ((b2->t.numel + 15) & ~(size_t)15) - w1->offset_data;
    }
    arena H = {0}, D = {0}, X = {0}, P = {0};
    moe_layout(m, &H, &D, &X, &P);
    m->mem = aligned_alloc(64, H.used);
    m->mem_dev = m->co->alloc(m->co, D.used, COMPUTE_DEVICE);
    m->mem_map = m->co->alloc(m->co, X.used, m->co->exchange_kind);
    m->mem_pin = m->co->alloc(m->co, P.used, COMPUTE_MAPPED);
    if (!m->mem || !m->mem_dev || !m->mem_map || !m->mem_pin)
        return scmoe__fail(m->ctx, SCMOE_ERR_NOMEM,
                           "out of memory: the MoE workspace needs %zu bytes of host, %zu of "
                           "%s, %zu of exchange and %zu of mapped memory",
                           H.used, D.used, m->co->name, X.used, P.used);
    H = (arena){m->mem, 0};
    D = (arena){m->mem_dev, 0};
    X = (arena){m->mem_map, 0};
    P = (arena){m->mem_pin, 0};
    moe_layout(m, &H, &D, &X, &P);
    if (!mirrors_match(m))
        return scmoe__fail(m->ctx, SCMOE_ERR_STATE,
                           "internal: a mirrored buffer group differs between host and device");
    if (m->co->device) /* the gate's outputs cross in one copy that spans max_tokens-sized arrays: a short
                        * batch leaves gaps no kernel writes, zeroed once so the copy moves defined bytes */
        m->co->zero(m->co, m->gate.p, gate_outputs_bytes(&m->gate, m->max_tokens, k));
    m->wg = moe_param_data(m, m->p_wg);
    for (int q = 0; q < m->ep_size; q++) {
        m->lcap.ones[q] = 1;
        m->lcap.iota[q] = q;
    }
    for (int i = 0; i < m->E_local; i++) m->off.slot_of[i] = -1;
    for (int i = 0; i < m->off.slots; i++) m->off.held[i] = -1;
    if (m->droute.on) *m->droute.seq_word = m->droute.seq = 0; /* the first forward's summary ends with 1 */
    /* bf16 on a device: the experts' two activation operands, max_recv rows of d or h1 each */
    return scmoe__precision_reserve(m->ctx, &m->cfg, 2 * (size_t)m->max_recv * (m->h1 > m->d ? m->h1 : m->d));
}

/* The context's communicator is shared by every object on it: each call first puts its own
 * deadline and progress policy on the communicators it will use (a THREAD policy MPI cannot host
 * falls back to POLL again at the next start). */
void scmoe__moe_bind_comms(moe_layer *m) {
    comm *cs[4] = {m->ctx->world, m->ep, m->ep_back, m->replicas};
    for (int i = 0; i < 4; i++) {
        cs[i]->timeout_s = m->cfg.comm_timeout_s;
        cs[i]->progress = m->cfg.progress;
    }
}

void scmoe__moe_free(moe_layer *m) {
    if (m->ep) m->ep->ops->destroy(m->ep);
    if (m->ep_back) m->ep_back->ops->destroy(m->ep_back);
    if (m->replicas) m->replicas->ops->destroy(m->replicas);
    free(m->mem);
    if (m->co) {
        m->co->release(m->co, m->mem_dev, COMPUTE_DEVICE);
        m->co->release(m->co, m->mem_map, m->co->exchange_kind);
        m->co->release(m->co, m->mem_pin, COMPUTE_MAPPED);
    }
    m->ep = m->ep_back = m->replicas = NULL;
    m->mem = m->mem_dev = m->mem_map = m->mem_pin = NULL;
}

int scmoe__moe_pending(const moe_layer *m) {
    int n = 0;
    comm *g[3] = {m->ep, m->ep_back, m->replicas};
    for (int i = 0; i < 3; i++) n += g[i] ? g[i]->ops->pending(g[i]) : 0;
    return n;
}

void scmoe__moe_abandon(moe_layer *m, int keep_workspace) {
    comm *g[3] = {m->ep, m->ep_back, m->replicas};
    for (int i = 0; i < 3; i++)
        if (g[i]) g[i]->ops->abandon(g[i]);
    m->ep = m->ep_back = m->replicas = NULL;
    if (!keep_workspace) scmoe__moe_free(m);
}

/* ---- forward: the experts, stage by stage ---- */

/* Stage s's rows of the receive layout -> the expert buffer: ebuf[recv_to_expert[r]] = row r (in), or
 * back (out). My own block's rows (never exchanged) are not in recv but at the same place of my block
 * in own, a buffer in the send layout. */
static void stage_rows(const moe_layer *m, int s, float *ebuf, float *recv, float *own, int out) {
    const route_plan *pl = &m->plan;
    for (int p = 0; p < m->ep_size; p++) {
        int lo, hi, me = p == m->ep_rank;
        scmoe__route_stage_range(pl->n_stages, s, me, pl->recv_counts[p], &lo, &hi);
        if (hi <= lo) continue;
        float *rows =
            me ? own + (size_t)(pl->send_displs[p] + lo) * m->d : recv + (size_t)(pl->recv_displs[p] + lo) * m->d;
        const int *map = m->plan_d.recv_to_expert + pl->recv_displs[p] + lo;
        if (out) m->co->permute_rows(m->co, rows, ebuf, map, hi - lo, m->d, 0);
        else m->co->permute_rows(m->co, ebuf, rows, map, hi - lo, m->d, 1);
    }
}

/* Experts in parallel (one thread each, single-threaded GEMMs) or one at a time (threaded GEMMs).
 * bench/bench_experts on 2 cores: in parallel was never slower, 0.53x the time at 32 rows per
 * expert and 0.96x at 2048, and it degrades far less when the cores are shared; one at a time
 * remains for fewer experts than threads. */
static int experts_in_parallel(const moe_layer *m, int rows) {
    int threads = omp_get_max_threads();
    return !m->co->device && threads > 1 && m->E_local > 1 && (m->E_local >= threads || rows < 256 * m->E_local);
}

/* The stages in turn: wait for the stage's rows (the next stage's then go on the wire, if they are
 * not there already), run the experts on these (ffn_stage), send the results back. Forward the rows
 * are independent, so any split computes the same numbers; backward the weight gradients sum over the
 * stages. */
static scmoe_status run_stages(moe_layer *m, const exec *ex, void (*ffn_stage)(moe_layer *, const exec *, int)) {
    scmoe_status st = dispatch_ensure(m); /* stage 0 reads the plan's receive side: it may wait on it */
    for (int s = 0; s < m->plan.n_stages && !st; s++) {
        if (stage_travels(m, s)) st = dispatch_wait(m, s);
        if (st) break;
        ffn_stage(m, ex, s);
        if (stage_travels(m, s)) st = scmoe__moe_exchange_start(m, s, 1);
    }
    return st;
}

/* ---- cuda (issue 19): the stage's experts through co->experts_forward / _backward, grouped GEMMs,
 * COMPUTE_EXPERTS_MAX at a time. Not with offloading: a fetch may evict an expert the group still reads. */
static int experts_grouped(const moe_layer *m) {
    return m->co->experts_forward && m->co->experts_backward && !m->off.slots;
}

static void experts_group_run(moe_layer *m, const exec *ex, const int *off, int backward) {
    expert_group g;
    g.rows_cap = m->max_recv;
    g.d = m->d;
    g.h = m->h;
    g.act = m->cfg.activation;
    g.x = m->buf.xe, g.pre = m->buf.pre, g.hid = m->buf.hid, g.y = m->buf.ye;
    g.dy = m->buf.ye, g.dx = m->buf.dxe, g.dhid = m->buf.dhid, g.dpre = m->buf.dpre;
    for (int i0 = 0; i0 < m->E_local; i0 += COMPUTE_EXPERTS_MAX) {
        g.n = m->E_local - i0 < COMPUTE_EXPERTS_MAX ? m->E_local - i0 : COMPUTE_EXPERTS_MAX;
        for (int i = 0; i <= g.n; i++) g.off[i] = off[i0 + i];
        for (int i = 0; i < g.n; i++) {
            int b = m->p_e0 + 4 * (i0 + i);
            g.w1[i] = moe_param_data(m, b), g.b1[i] = moe_param_data(m, b + 1);
            g.w2[i] = moe_param_data(m, b + 2), g.b2[i] = moe_param_data(m, b + 3);
            g.dw1[i] = moe_param_gwork(m, b), g.db1[i] = moe_param_gwork(m, b + 1);
            g.dw2[i] = moe_param_gwork(m, b + 2), g.db2[i] = moe_param_gwork(m, b + 3);
        }
        if (backward) m->co->experts_backward(m->co, ex, &g);
        else m->co->experts_forward(m->co, ex, &g);
    }
}
/* ---- end cuda */

static void experts_forward_stage(moe_layer *m, const exec *ex, int s) {
    const int *off = m->plan.expert_offsets + (size_t)s * m->E_local;
    int d = m->d, h = m->h, h1 = m->h1;
    stage_rows(m, s, m->buf.xe, m->xch.recv, m->xch.send, 0);
    if (experts_grouped(m)) {
        experts_group_run(m, ex, off, 0);
        stage_rows(m, s, m->buf.ye, m->xch.recv, m->xch.crecv, 1);
        return;
    }
#pragma omp parallel for schedule(dynamic) if (experts_in_parallel(m, off[m->E_local] - off[0]))
    for (int i = 0; i < m->E_local; i++) {
        int o = off[i], rows = off[i + 1] - o;
        if (rows <= 0) continue;
        float *w[4];
        scmoe__moe_expert_weights(m, i, w);
        scmoe__ffn_forward(ex, m->buf.ye + (size_t)o * d, m->buf.pre + (size_t)o * h1, m->buf.hid + (size_t)o * h,
                           m->buf.xe + (size_t)o * d, w[0], w[1], w[2], w[3], rows, d, h, m->cfg.activation);
    }
    stage_rows(m, s, m->buf.ye, m->xch.recv, m->xch.crecv, 1);
}

scmoe_status scmoe__moe_experts_forward(moe_layer *m, const exec *ex) {
    return run_stages(m, ex, experts_forward_stage);
}

void scmoe__moe_decode(moe_layer *m, float *y, float beta) {
    m->co->decode_rows(m->co, y, beta, m->xch.crecv, m->plan_d.slot, m->buf.weight, m->n, m->k, m->d);
    m->forward_done = 1;
}

/* ---- backward phases ---- */

void scmoe__moe_decode_backward(moe_layer *m, const float *dy) {
    m->pass = 1;
    m->xch.next_dispatch = MOE_MAX_STAGES; /* as in gate_encode, until the gradient dispatch starts */
    m->comm_time = m->exposed_time = 0;
    m->off.fetched = 0;
    m->co->decode_rows_backward(m->co, m->xch.send, m->buf.dweight, dy, m->xch.crecv, m->plan_d.slot, m->buf.weight,
                                m->n, m->k, m->d);
}

static void experts_backward_stage(moe_layer *m, const exec *ex, int s) {
    const int *off = m->plan.expert_offsets + (size_t)s * m->E_local;
    int d = m->d, h = m->h, h1 = m->h1;
    float *dye = m->buf.ye, *dxe = m->buf.dxe; /* dy rows in ye: free once forward is decoded */
    stage_rows(m, s, dye, m->xch.recv, m->xch.send, 0);
    if (experts_grouped(m)) {
        experts_group_run(m, ex, off, 1);
        stage_rows(m, s, dxe, m->xch.recv, m->xch.send, 1);
        return;
    }
#pragma omp parallel for schedule(dynamic) if (experts_in_parallel(m, off[m->E_local] - off[0]))
    for (int i = 0; i < m->E_local; i++) {
        int o = off[i], rows = off[i + 1] - o, b = m->p_e0 + 4 * i;
        if (rows <= 0) continue;
        float *w[4];
        scmoe__moe_expert_weights(m, i, w);
        scmoe__ffn_backward(ex, dxe + (size_t)o * d, 0.0f, moe_param_gwork(m, b), moe_param_gwork(m, b + 1),
                            moe_param_gwork(m, b + 2), moe_param_gwork(m, b + 3), m->buf.dhid + (size_t)o * h,
                            m->buf.dpre + (size_t)o * h1, dye + (size_t)o * d, m->buf.xe + (size_t)o * d,
                            m->buf.pre + (size_t)o * h1, m->buf.hid + (size_t)o * h, w[0], w[2], rows, d, h,
                            m->cfg.activation);
    }
    stage_rows(m, s, dxe, m->xch.recv, m->xch.send, 1);
}

scmoe_status scmoe__moe_experts_backward(moe_layer *m, const exec *ex) {
    return run_stages(m, ex, experts_backward_stage);
}

void scmoe__moe_gate_backward(moe_layer *m, const exec *ex, float *dx, float beta) {
    int k = m->k, d = m->d;
    m->co->decode_rows(m->co, dx, beta, m->xch.send, m->plan_d.slot, NULL, m->n, k,
                       d); /* dx = beta dx + sum of the rows */
    scmoe__gate_backward(ex, dx, 1.0f, moe_param_gwork(m, m->p_wg), m->buf.dlogits, m->buf.dweight, m->gate.choice,
                         m->gate.p, m->gate.lse, m->x, m->wg, m->plan_d.aux_coef, m->z_coef, m->n, d, m->E, k,
                         m->cfg.renormalize);
}

void scmoe__moe_fill_stats(const moe_layer *m, scmoe_stats *st) {
    st->aux_loss = m->aux_loss;
    st->z_loss = m->z_loss;
    st->tokens = m->plan.tokens;
    st->dropped = m->plan.dropped;
    /* the C the capacity factor asks for, even when it exceeds S*k (then nothing drops): only -1 means
     * dropless; over the global batch, or (LOCAL) this rank's own tokens */
    st->capacity = scmoe__route_slots(m->local_cap ? m->n : m->plan.tokens, m->E, m->k,
                                      m->training ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor);
    st->expert_tokens = m->plan.expert_kept;
    st->experts_fetched = m->off.fetched;
}
