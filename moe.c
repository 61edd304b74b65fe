/* moe.c: one MoE layer over expert parallelism, written as phases so a schedule can put other work
 * between them:
 *
 *   gate_encode   logits, softmax, top-k; per-(round, expert) counts scanned over the ranks (capacity
 *                 GLOBAL with TOKEN priority) or the routing choices of the whole batch gathered (BATCH);
 *                 the route plan; my tokens' rows packed by destination (capacity LOCAL, and GLOBAL with
 *                 TOKEN priority: the receive side's counts travel to the group, and the dispatch waits
 *                 for them, so they hide behind what runs between)
 *   dispatch      nonblocking all-to-all: rows to the ranks owning their experts
 *   experts       rows regrouped by local expert; one FFN per expert over its contiguous rows
 *   combine       nonblocking all-to-all back, same plan mirrored
 *   decode        y_t = sum_j w_tj E_{e_tj}(x_t)
 *
 * Backward mirrors it with the same plan: decode_backward (dL/dw, w * dy rows) -> exchange like a
 * dispatch -> experts_backward -> exchange like a combine -> scmoe__gate_backward (dx through the rows, the
 * gate weights, the aux and z losses). */
#include "scmoe_internal.h"
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- exchanges in flight ---- */

/* A stage has an exchange unless it is the own block's (stage 0 of a pipeline). All ranks of the
 * group decide this alike, so their collectives match even where a stage moves no rows. */
static int stage_travels(const moe_layer *m, int s) { return m->plan.n_stages == 1 || s > 0; }

static void inflight_begin(inflight *f, comm *c) {
    f->c = c;
    f->t_start = scmoe__now();
    f->t_done = 0;
    f->t_waited = 0;
    f->unpack_to = NULL;
    f->copy_to = NULL;
    f->held = 0;
}

static int exchange_mirrored(const moe_layer *m);
static void exchange_mirror_out(moe_layer *m, inflight *f, const float *src, float *dst, const int *sc, const int *sd,
                                const int *rc, const int *rd);
static scmoe_status exchange_release(moe_layer *m, inflight *f, int wait);
static void exchange_mirror_in(moe_layer *m, const inflight *f);

/* Starts stage s's exchange: a dispatch (send layout -> receive layout: forward the input rows,
 * backward the dy rows) or a combine (the way back: forward into crecv, backward into send).
 * My own rows never travel: the experts read and write them in place (stage_rows), which keeps
 * the copy of the own block, done synchronously inside MPI's start call, off the critical path. */
scmoe_status scmoe__moe_exchange_start(moe_layer *m, int s, int combine) {
    inflight *f = combine ? &m->xch.xc[s] : &m->xch.xd[s];
    comm *c = combine ? m->ep_back : m->ep;
    int P = m->ep_size, o = s * P;
    const int *sc = (combine ? m->xch.xr_counts : m->xch.xs_counts) + o,
              *sd = (combine ? m->xch.xr_displs : m->xch.xs_displs) + o;
    const int *rc = (combine ? m->xch.xs_counts : m->xch.xr_counts) + o,
              *rd = (combine ? m->xch.xs_displs : m->xch.xr_displs) + o;
    const float *src = combine ? m->xch.recv : m->xch.send;
    float *dst = !combine ? m->xch.recv : m->pass ? m->xch.send : m->xch.crecv;
    inflight_begin(f, c);
    const compute_ops *co = m->co;
    scmoe_status st;
    /* MPI reads the exchange buffers: every kernel writing them must have finished; one rank moves
     * nothing, so its exchanges wait for no kernel (the device keeps running) */
    int moves = P > 1;
    if (m->cfg.wire_bf16) {
        /* peers' blocks only; the layout (and so every displacement) stays that of the float rows */
        uint16_t *out = combine ? m->xch.wire_c_out : m->xch.wire_d_out,
                 *in = combine ? m->xch.wire_c_in : m->xch.wire_d_in;
        for (int q = 0; q < P; q++)
            co->bf16_pack(co, out + (size_t)sd[q] * m->d, src + (size_t)sd[q] * m->d, (size_t)sc[q] * m->d);
        f->unpack_to = dst;
        f->unpack_from = in;
        f->unpack_counts = rc;
        f->unpack_displs = rd;
        f->row = m->d;
        if (moves) co->sync(co);
        st = c->ops->alltoallv_start(c, out, sc, sd, in, rc, rd, (int)sizeof(uint16_t) * m->d, &f->req);
    } else if (exchange_mirrored(m)) { /* MPI's mapped mirrors: the peer blocks copied out first */
        exchange_mirror_out(m, f, src, dst, sc, sd, rc, rd);
        f->active = 1;
        st = exchange_release(m, f, 0);
        f->t_waited = scmoe__now() - f->t_start;
        return st;
    } else {
        if (moves) co->sync(co);
        st = c->ops->alltoallv_start(c, src, sc, sd, dst, rc, rd, (int)sizeof(float) * m->d, &f->req);
    }
    if (st) return scmoe__fail(m->ctx, st, "starting a token exchange failed: %s", c->err);
    f->active = 1;
    /* time inside the start call (packing, MPI's eager sends and self-copies) is the caller's: exposed */
    f->t_waited = scmoe__now() - f->t_start;
    return SCMOE_OK;
}

static void test_one(inflight *f) {
    int done = 0;
    if (f->active && !f->held && !f->t_done && f->c->ops->test(f->c, f->req, &done) == SCMOE_OK && done)
        f->t_done = scmoe__now();
}

/* The stage of the first dispatch: a pipeline's stage 0 is the own block, nothing to send. */
static int first_dispatch(const moe_layer *m) { return scmoe__route_stages(m->cfg.pipeline_chunks) > 1; }

static scmoe_status counts_finish(moe_layer *m);
static scmoe_status droute_check(moe_layer *m, int wait);

/* The first dispatch if it has not started: waits for the routing counts it needs, if they are in
 * flight (capacity LOCAL), and starts it. */
static scmoe_status dispatch_ensure(moe_layer *m) {
    if (m->xch.next_dispatch == MOE_MAX_STAGES) return m->xch.deferred; /* a poll failed to start it */
    if (m->xch.next_dispatch != first_dispatch(m)) return SCMOE_OK;
    scmoe_status st = droute_check(m, 1);
    if (!st && m->lcap.counts_pending) st = counts_finish(m);
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
    if (s == first_dispatch(m))
        return m->droute.pending || m->gcount.scanning || (m->lcap.counts_pending && !m->lcap.xcount.t_done)
                   ? SCMOE_OK
                   : dispatch_ensure(m);
    if (s >= m->plan.n_stages || !m->xch.xd[s - 1].t_done) return SCMOE_OK;
    m->xch.next_dispatch++;
    return scmoe__moe_exchange_start(m, s, 0);
}

void scmoe__moe_release(moe_layer *m) {
    for (int s = 0; s < m->plan.n_stages && !m->xch.deferred; s++) { /* in the order they started */
        m->xch.deferred = exchange_release(m, &m->xch.xd[s], 0);
        if (!m->xch.deferred) m->xch.deferred = exchange_release(m, &m->xch.xc[s], 0);
    }
}

void scmoe__moe_poll(void *arg) {
    moe_layer *m = arg;
    int next = m->xch.next_dispatch;
    if ((m->droute.pending || m->gcount.scanning) && next != MOE_MAX_STAGES && !m->xch.deferred)
        m->xch.deferred = droute_check(m, 0);
    if (m->lcap.counts_pending) test_one(&m->lcap.xcount);
    scmoe__moe_release(m);
    if (m->ep->progress == SCMOE_PROGRESS_POLL) {
        for (int s = 0; s < m->plan.n_stages; s++) {
            test_one(&m->xch.xd[s]);
            test_one(&m->xch.xc[s]);
        }
    } else if (m->ep->progress == SCMOE_PROGRESS_THREAD && next > first_dispatch(m) && next < m->plan.n_stages) {
        test_one(&m->xch.xd[next - 1]); /* the helper thread moves it; this only learns it landed */
    }
    if (!m->xch.deferred) m->xch.deferred = dispatch_next(m);
}

static scmoe_status inflight_wait(moe_layer *m, inflight *f, const char *what) {
    if (!f->active) return SCMOE_OK;
    double t0 = scmoe__now();
    scmoe_status s = exchange_release(m, f, 1); /* its copies out, if they have not landed yet */
    if (s) return s;
    s = f->t_done ? SCMOE_OK : f->c->ops->wait(f->c, f->req);
    double t1 = scmoe__now();
    if (!f->t_done) f->t_done = t1;
    f->t_waited += t1 - t0;
    f->active = 0;
    if (s) {
        m->xch.next_dispatch = MOE_MAX_STAGES; /* a failed pass chains nothing more */
        return scmoe__fail(m->ctx, s, "%s: %s", what, f->c->err);
    }
    for (int q = 0; f->unpack_to && q < f->c->size; q++)
        m->co->bf16_unpack(m->co, f->unpack_to + (size_t)f->unpack_displs[q] * f->row,
                           f->unpack_from + (size_t)f->unpack_displs[q] * f->row, (size_t)f->unpack_counts[q] * f->row);
    if (f->copy_to) exchange_mirror_in(m, f);
    if (!f->metadata) {
        m->comm_time += f->t_done - f->t_start;
        m->exposed_time += f->t_waited;
    }
    if (m->on_wait) m->on_wait(m->on_wait_arg, what, f);
    return SCMOE_OK;
}

double scmoe__overlap_fraction(double comm, double exposed) {
    return comm > 0 ? 1.0 - (exposed < comm ? exposed : comm) / comm : 1.0;
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
    scmoe_status st = droute_check(m, 0);
    if (st) return st;
    if (m->lcap.counts_pending) test_one(&m->lcap.xcount);
    return dispatch_next(m);
}

/* waits for stage s's dispatch, then puts the next one on the wire if a poll has not already */
static scmoe_status dispatch_wait(moe_layer *m, int s) {
    scmoe_status st = dispatch_ensure(m);
    if (!st) st = inflight_wait(m, &m->xch.xd[s], exchange_name(m, 0));
    if (!st) st = m->xch.deferred;
    if (!st) st = dispatch_next(m);
    return st;
}

scmoe_status scmoe__moe_dispatch_wait(moe_layer *m) { return dispatch_wait(m, first_dispatch(m)); }

static scmoe_status stats_finish(moe_layer *m);

scmoe_status scmoe__moe_combine_wait(moe_layer *m) {
    /* the statistics first: a serialized order times the combine as the last exchange waited on */
    scmoe_status st = m->pass == 0 ? stats_finish(m) : SCMOE_OK;
    if (!st) st = m->xch.deferred; /* a poll failed to start an exchange */
    for (int s = 0; s < m->plan.n_stages && !st; s++) st = inflight_wait(m, &m->xch.xc[s], exchange_name(m, 1));
    return st;
}

/* ---- setup ---- */

static float *param_data(const moe_layer *m, int idx) { return m->pt->p[idx].t.data; }
static float *param_gwork(const moe_layer *m, int idx) { return m->pt->p[idx].gwork; }

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
static size_t gate_outputs_bytes(const gate_outputs *g, int n, int k) {
    return (size_t)((char *)(g->choice + (size_t)n * k) - (char *)g->p);
}

static plan_mirror plan_mirror_take(arena *a, int E, int S, int R) {
    plan_mirror g;
    g.aux_coef = scmoe__arena_take(a, sizeof(float) * E);
    g.slot = scmoe__arena_take(a, sizeof(int) * (size_t)S);
    g.recv_to_expert = scmoe__arena_take(a, sizeof(int) * (size_t)R); /* last */
    return g;
}

/* bytes of the block holding a plan of n_recv received rows */
static size_t plan_mirror_bytes(const plan_mirror *g, int n_recv) {
    return (size_t)((char *)(g->recv_to_expert + n_recv) - (char *)g->aux_coef);
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

/* The receive side comes from a counts message to the group (capacity LOCAL, or GLOBAL with TOKEN
 * priority); else (GLOBAL with BATCH priority) every rank plans from every rank's records. */
static int counts_message(const moe_layer *m) { return m->local_cap || m->gcount.on; }

/* The workspace in four arenas: host (the plan and what host code reads), device (activations and
 * expert rows), exchanged (what MPI moves: mapped memory, or device memory for a CUDA-aware MPI) and
 * pinned (mapped memory: what the device's routing plan writes for the host, droute, the counts
 * message it fills, and the host's side of plan_mirror). On a device backend the host keeps the
 * mirror of the gate's outputs (gate_h), and the device its copy of the plan's arrays (plan_d); on the
 * host backend they are the same arrays. */
static void moe_layout(moe_layer *m, arena *H, arena *D, arena *X, arena *P) {
    int world = m->ctx->world->size, k = m->k, E = m->E, d = m->d, dev = m->co->device;
    int gather = !counts_message(m);                               /* every rank's records on every rank */
    int64_t S_max = (int64_t)m->max_tokens * (gather ? world : 1); /* the tokens one rank plans */
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
    m->route_work = scmoe__arena_take(H, scmoe__route_workspace_bytes(S_max, k));
    m->records = scmoe__arena_take(H, i4 * (size_t)n * (k + 1));
    if (gather) {
        m->gather.records_all = scmoe__arena_take(H, i4 * (size_t)S_max * (k + 1));
        m->gather.tokens_per_rank = scmoe__arena_take(H, i4 * world);
        m->gather.rec_bytes = scmoe__arena_take(H, i4 * world);
        m->gather.rec_displs = scmoe__arena_take(H, i4 * world);
    }
    m->gsum = scmoe__arena_take(H, sizeof(double) * (E + 1));
    if (counts_message(m)) {
        m->lcap.counts_out = scmoe__arena_take(P, sizeof(int32_t) * (size_t)ep * (1 + El * k));
        m->lcap.counts_in = scmoe__arena_take(H, sizeof(int32_t) * (size_t)ep * (1 + El * k));
        m->lcap.ones = scmoe__arena_take(H, i4 * ep);
        m->lcap.iota = scmoe__arena_take(H, i4 * ep);
    }
    if (m->local_cap) m->lcap.lstats = scmoe__arena_take(H, sizeof(double) * MOE_LSTATS(E));
    if (m->gcount.on) {
        m->gcount.agree = scmoe__arena_take(H, sizeof(int64_t) * 3 * MOE_AGREE);
        m->gcount.counts = scmoe__arena_take(H, sizeof(int64_t) * 3 * (size_t)k * E);
    }
    if (m->droute.on) {
        m->droute.seq_word = scmoe__arena_take(P, sizeof(uint32_t));
        m->droute.top1 = scmoe__arena_take(P, sizeof(int32_t) * E);
        m->droute.kept = scmoe__arena_take(P, sizeof(int32_t) * E);
        m->droute.gsum = scmoe__arena_take(P, sizeof(double) * (E + 1));
        int batch = m->cfg.priority == SCMOE_PRIORITY_BATCH; /* the tokens' priority order, n more */
        size_t work = m->gcount.on ? (size_t)(3 * k + 2) * E : (size_t)(k + 2) * E + (batch ? (size_t)n : 0);
        m->droute.work = scmoe__arena_take(D, i4 * work);
        m->droute.work_sum = scmoe__arena_take(D, sizeof(double) * (E + 1));
        if (m->gcount.on) {
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

    arena *K = exchange_mirrored(m) ? D : X; /* the kernels' side of the exchanges; MPI's is X */
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
     * tokens' places follow from the round counts scanned over the ranks (gscan_start) */
    int token = m->cfg.priority == SCMOE_PRIORITY_TOKEN;
    m->droute.on = m->co->route_local &&
                   (m->cfg.capacity_scope == SCMOE_CAPACITY_LOCAL || world == 1 || (token && m->co->route_global));
    m->local_cap = m->cfg.capacity_scope == SCMOE_CAPACITY_LOCAL || (m->droute.on && world == 1);
    /* GLOBAL with TOKEN priority: counts scanned over the ranks, not every rank's records (route.c) */
    m->gcount.on = !m->local_cap && token;
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
    if ((!counts_message(m) && S_max * (k + 1) * 4 > INT32_MAX) || recv > INT32_MAX / 2)
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
    m->wg = param_data(m, m->p_wg);
    for (int q = 0; counts_message(m) && q < m->ep_size; q++) {
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

/* ---- expert offloading ---- */

/* Starts copying local expert i's weights into the next slot (round robin), evicting its expert. */
static void expert_fetch(moe_layer *m, int i) {
    int v = m->off.victim;
    m->off.victim = (v + 1) % m->off.slots;
    if (m->off.held[v] >= 0) m->off.slot_of[m->off.held[v]] = -1;
    m->co->prefetch(m->co, m->off.cache + (size_t)v * m->off.span, param_data(m, m->p_e0 + 4 * i),
                    sizeof(float) * m->off.span);
    m->off.held[v] = i;
    m->off.slot_of[i] = v;
    m->off.fetched++;
    m->off.prefetched = 1;
}

/* A forward's fetch: the weights may have changed on the host since the last one, so the cache starts
 * empty; the experts that received rows (in the order they run) are copied in while the exchange and
 * whatever the schedule enqueues next run, as many as there are slots. */
static void experts_prefetch(moe_layer *m) {
    const route_plan *pl = &m->plan;
    int El = m->E_local;
    m->off.victim = 0;
    for (int i = 0; i < El; i++) m->off.slot_of[i] = -1;
    for (int v = 0; v < m->off.slots; v++) m->off.held[v] = -1;
    for (int i = 0, taken = 0; i < El && taken < m->off.slots; i++) {
        int rows = 0;
        for (int s = 0; s < pl->n_stages; s++)
            rows += pl->expert_offsets[s * El + i + 1] - pl->expert_offsets[s * El + i];
        if (rows > 0) {
            expert_fetch(m, i);
            taken++;
        }
    }
}

/* Local expert i's w1, b1, w2, b2 where the kernels can read them: the table's, or (offloading) its
 * slot, fetched now if it is not there; the kernels enqueued next wait for every fetch in flight. */
static void expert_weights(moe_layer *m, int i, float *w[4]) {
    int b = m->p_e0 + 4 * i;
    if (!m->off.slots) {
        for (int j = 0; j < 4; j++) w[j] = param_data(m, b + j);
        return;
    }
    if (m->off.slot_of[i] < 0) expert_fetch(m, i);
    if (m->off.prefetched) m->co->prefetch_wait(m->co);
    m->off.prefetched = 0;
    const float *base = param_data(m, b);
    for (int j = 0; j < 4; j++)
        w[j] = m->off.cache + (size_t)m->off.slot_of[i] * m->off.span + (param_data(m, b + j) - base);
}

/* ---- forward phases ---- */

/* logits, softmax, top-k of my n tokens (the noise keyed by token offset + t), where the kernels run */
static void gate_kernels(moe_layer *m, const exec *ex, int n, const float *x, int64_t offset) {
    float noise = m->training ? m->cfg.gate_noise_std : 0.0f;
    const compute_ops *co = m->co;
    scmoe__gate_forward(ex, m->buf.logits, m->gate.p, m->gate.lse, x, m->wg, n, m->d, m->E, noise, m->cfg.seed, m->step,
                        offset);
    co->gate_topk(co, m->gate.choice, m->buf.weight, m->gate.score, m->gate.p, n, m->E, m->k, m->cfg.renormalize);
    if (m->training) m->step++;
}

/* the gate, and my tokens' routing records for the host's planner: k expert ids, then the top-1
 * probability's bits */
static void gate_run(moe_layer *m, const exec *ex, int n, const float *x, int64_t offset) {
    int k = m->k, stride = k + 1;
    const compute_ops *co = m->co;
    gate_kernels(m, ex, n, x, offset);
    if (co->device) /* routing is planned on the host: p, lse, score and choice in one copy (gate_outputs) */
        co->copy(co, m->gate_h.p, m->gate.p, gate_outputs_bytes(&m->gate, n, k));
    for (int t = 0; t < n; t++) {
        memcpy(m->records + (size_t)t * stride, m->gate_h.choice + (size_t)t * k, sizeof(int) * k);
        memcpy(m->records + (size_t)t * stride + k, &m->gate_h.score[t], sizeof(float));
    }
}

/* gsum = (sum_t p[t, e], sum_t lse_t^2) over my n tokens */
static void gate_sums(moe_layer *m, int n) {
    int E = m->E;
    memset(m->gsum, 0, sizeof(double) * (E + 1));
    for (int t = 0; t < n; t++) {
        const float *pt = m->gate_h.p + (size_t)t * E;
        for (int e = 0; e < E; e++) m->gsum[e] += pt[e];
        m->gsum[E] += (double)m->gate_h.lse[t] * m->gate_h.lse[t];
    }
}

/* load-balance and z losses from gsum and top1_count over Sa tokens: aux = E sum_e mean_s p[s,e]
 * frac_s(top1 = e), z = mean_s lse^2; scale weighs this rank's term (aux_scope LOCAL: 1/P, the global
 * loss is the mean of the ranks') */
static void gate_losses(moe_layer *m, int64_t Sa, double scale) {
    int E = m->E;
    double aux = 0.0;
    for (int e = 0; e < E; e++) {
        double me = Sa ? m->gsum[e] / Sa : 0.0, ce = Sa ? (double)m->top1_count[e] / Sa : 0.0;
        aux += me * ce;
        m->aux_coef_h[e] = Sa ? (float)(scale * m->cfg.aux_loss_weight * E * ce / Sa) : 0.0f;
    }
    m->aux_loss = (float)(E * aux);
    m->z_loss = Sa ? (float)(m->gsum[E] / Sa) : 0.0f;
    m->z_coef = Sa ? (float)(scale * m->cfg.z_loss_weight / Sa) : 0.0f;
}

/* The plan's stages as exchanges, then (on a device: aux_coef, slot and recv_to_expert in one copy,
 * plan_mirror; planned on the device: recv_to_expert alone, in stream order) my rows packed by
 * destination unless packed already, the experts' prefetch. */
static void encode_finish(moe_layer *m, int packed) {
    route_plan *pl = &m->plan;
    const compute_ops *co = m->co;
    for (int st_i = 0; st_i < pl->n_stages; st_i++)
        for (int q = 0; q < m->ep_size; q++) {
            int i = st_i * m->ep_size + q, own = q == m->ep_rank, lo, hi;
            scmoe__route_stage_range(pl->n_stages, st_i, own, pl->send_counts[q], &lo, &hi);
            m->xch.xs_counts[i] = own ? 0 : hi - lo;
            m->xch.xs_displs[i] = pl->send_displs[q] + lo;
            scmoe__route_stage_range(pl->n_stages, st_i, own, pl->recv_counts[q], &lo, &hi);
            m->xch.xr_counts[i] = own ? 0 : hi - lo;
            m->xch.xr_displs[i] = pl->recv_displs[q] + lo;
        }
    if (m->droute.on) /* slot and aux_coef are there already; the receive side came from MPI's counts */
        co->copy_rows(co, m->plan_d.recv_to_expert, pl->recv_to_expert, sizeof(int) * (size_t)pl->n_recv);
    else if (co->device) co->copy(co, m->plan_d.aux_coef, m->aux_coef_h, plan_mirror_bytes(&m->plan_d, pl->n_recv));
    if (!packed) co->pack_rows(co, m->xch.send, m->x, m->plan_d.slot, m->n, m->k, m->d);
    m->off.fetched = 0;
    if (m->off.slots) experts_prefetch(m);
    m->forward_done = 0;
    m->pass = 0;
}

/* ---- the input status: every rank says it before any exchange of the forward ---- */

/* SCMOE_OK, or why my n tokens at x cannot be routed */
static scmoe_status input_status(const moe_layer *m, int n, const float *x) {
    if (n < 0 || n > m->max_tokens) return SCMOE_ERR_N_TOKENS;
    if (n > 0 && !x) return SCMOE_ERR_NULL;
    if (m->cfg.check_finite && n > 0 && m->co->has_nonfinite(m->co, x, (size_t)n * m->d)) return SCMOE_ERR_NONFINITE;
    return SCMOE_OK;
}

static const char *input_error(scmoe_status s, int n, int max_tokens, char *buf, size_t len) {
    if (s == SCMOE_ERR_N_TOKENS) snprintf(buf, len, "n_tokens = %d: must be in 0..max_tokens (%d)", n, max_tokens);
    else if (s == SCMOE_ERR_NULL) snprintf(buf, len, "input is NULL with n_tokens = %d", n);
    else snprintf(buf, len, "the input holds NaN or Inf");
    return buf;
}

static scmoe_status input_fail(moe_layer *m, scmoe_status local, int n) {
    char buf[128];
    return scmoe__fail(m->ctx, local, "%s", input_error(local, n, m->max_tokens, buf, sizeof buf));
}

/* the input statuses a rank may report, in the order of the flags that carry them (LOCAL's statistics,
 * GLOBAL's token-count scan) */
static const scmoe_status input_errors[3] = {SCMOE_ERR_N_TOKENS, SCMOE_ERR_NULL, SCMOE_ERR_NONFINITE};

/* ranks[i]: how many ranks reported input_errors[i]. Every rank returns the same status, the largest any
 * rank reported (as scmoe__status_agree), or OK if none did. */
static scmoe_status agreed_input_error(moe_layer *m, const double ranks[3]) {
    scmoe_status bad = SCMOE_OK;
    for (int i = 0; i < 3; i++)
        if (ranks[i] > 0 && input_errors[i] > bad) bad = input_errors[i];
    if (!bad) return SCMOE_OK;
    return scmoe__fail(m->ctx, bad, "%.0f rank(s) rejected their input: %s", ranks[0] + ranks[1] + ranks[2],
                       scmoe_strerror(bad));
}

/* ---- capacity over the global batch (GLOBAL), BATCH priority: the whole batch's records on every rank ---- */

/* Every rank says how many tokens it has, or that its input is bad (-status): no rank enters an
 * exchange that another has left. *S: the global batch, *offset: where my tokens start in it. */
static scmoe_status agree_token_counts(moe_layer *m, int n, scmoe_status local, int64_t *S, int64_t *offset) {
    comm *w = m->ctx->world;
    int *mine = &m->gather.tokens_per_rank[w->rank]; /* in place: a send buffer that outlives a timed-out gather */
    *mine = local ? -(int)local : n;
    scmoe_status s = w->ops->allgather(w, mine, sizeof *mine, m->gather.tokens_per_rank);
    if (s) return scmoe__fail(m->ctx, s, "exchanging token counts failed: %s", w->err);
    if (local) return input_fail(m, local, n);
    *S = *offset = 0;
    for (int r = 0; r < w->size; r++) {
        int c = m->gather.tokens_per_rank[r];
        if (c < 0 && -c < SCMOE_STATUS_COUNT)
            return scmoe__fail(m->ctx, (scmoe_status)-c, "rank %d rejected its input: %s", r,
                               scmoe_strerror((scmoe_status)-c));
        if (c < 0 || c > m->max_tokens) /* not a count: out of step */
            return scmoe__fail(m->ctx, SCMOE_ERR_COMM, "rank %d sent %d as its token count: the ranks are out of step",
                               r, c);
        if (r == w->rank) *offset = *S;
        *S += c;
    }
    return SCMOE_OK;
}

/* records_all = every rank's routing records (k expert ids, the top-1 p's bits), rank after rank */
static scmoe_status gather_records(moe_layer *m, int n) {
    comm *w = m->ctx->world;
    int stride = m->k + 1;
    for (int r = 0, off = 0; r < w->size; r++) {
        m->gather.rec_bytes[r] = m->gather.tokens_per_rank[r] * stride * (int)sizeof(int32_t);
        m->gather.rec_displs[r] = off;
        off += m->gather.rec_bytes[r];
    }
    scmoe_status s = w->ops->allgatherv(w, m->records, n * stride * (int)sizeof(int32_t), m->gather.records_all,
                                        m->gather.rec_bytes, m->gather.rec_displs);
    if (s) return scmoe__fail(m->ctx, s, "gathering the routing choices failed: %s", w->err);
    return SCMOE_OK;
}

/* The aux and z losses over the global batch of S tokens (aux_scope GLOBAL: gsum all-reduced, the
 * top-1 counts top1_all, or from the gathered records if NULL) or over my n (LOCAL, each rank's term
 * weighed 1/P). */
static scmoe_status batch_losses(moe_layer *m, int n, int64_t S, const int64_t *top1_all) {
    comm *w = m->ctx->world;
    int global = m->cfg.aux_scope == SCMOE_AUX_GLOBAL, stride = m->k + 1;
    gate_sums(m, n);
    if (global && w->size > 1) {
        scmoe_status s = w->ops->allreduce_f64(w, m->gsum, m->E + 1);
        if (s) return scmoe__fail(m->ctx, s, "reducing the gate statistics failed: %s", w->err);
    }
    const int32_t *top1 = global ? m->gather.records_all : m->records;
    int64_t Sa = global ? S : n;
    memset(m->top1_count, 0, sizeof(int64_t) * m->E);
    if (global && top1_all) memcpy(m->top1_count, top1_all, sizeof(int64_t) * m->E);
    else
        for (int64_t t = 0; t < Sa; t++) m->top1_count[top1[t * stride]]++;
    gate_losses(m, Sa, global ? 1.0 : 1.0 / w->size);
    return SCMOE_OK;
}

/* gate -> records gathered -> losses -> the plan over the global batch -> my rows packed */
static scmoe_status gate_encode_global(moe_layer *m, const exec *ex, int n, const float *x, scmoe_status local) {
    int64_t S = 0, offset = 0;
    scmoe_status st = agree_token_counts(m, n, local, &S, &offset);
    if (st) return st;
    m->n = n;
    m->x = x;
    gate_run(m, ex, n, x, offset);
    if ((st = gather_records(m, n)) || (st = batch_losses(m, n, S, NULL))) return st;
    comm *w = m->ctx->world;
    float cf = m->training ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor;
    scmoe__route_plan_build(&m->plan, m->route_work, m->gather.records_all, m->gather.tokens_per_rank, w->size, w->rank,
                            m->ep_size, m->E, m->k, m->cfg.priority, scmoe__route_capacity(S, m->E, m->k, cf),
                            m->cfg.pipeline_chunks);
    encode_finish(m, 0);
    return SCMOE_OK;
}

/* ---- capacity per source rank (LOCAL) ----
 *
 * lstats, reduced by one nonblocking all-reduce over the world (doubles: the counts stay exact below
 * 2^53): [0, E) sum_t p[t, e] | E: sum_t lse_t^2 | [E+1, 2E+1) top-1 counts | [2E+1, 3E+1) kept
 * assignments per expert | 3E+1: tokens | 3E+2 .. 3E+4: ranks whose input was rejected with
 * N_TOKENS, NULL, NONFINITE. The per-expert counts travel on the expert-parallel group in one small
 * all-to-all, each peer's message led by my input status, so a group never starts a dispatch that one
 * of its ranks will not join; other groups learn of a rejected input from the statistics, at the end
 * of the same forward. gate_encode only starts the two; the counts are waited for where the dispatch
 * starts (counts_finish), so in a pair they travel behind the dense operations after the gate. */
static scmoe_status small_start(moe_layer *m, inflight *f, comm *c, scmoe_status st, int req) {
    if (st) return scmoe__fail(m->ctx, st, "starting the routing statistics or counts failed: %s", c->err);
    f->metadata = 1;
    f->req = req;
    f->active = 1;
    f->t_waited = scmoe__now() - f->t_start;
    return SCMOE_OK;
}

/* Waits for the statistics started by this forward and folds them in: the global counts of the stats,
 * the losses (aux_scope GLOBAL), or the agreed error if a rank rejected its input. */
static scmoe_status stats_finish(moe_layer *m) {
    if (!m->lcap.stats_pending) return SCMOE_OK;
    m->lcap.stats_pending = 0;
    scmoe_status st = inflight_wait(m, &m->lcap.xstats, "gate_stats");
    if (st) return st;
    int E = m->E;
    const double *ls = m->lcap.lstats;
    if ((st = agreed_input_error(m, ls + 3 * E + 2))) return st;
    route_plan *pl = &m->plan;
    pl->tokens = (int64_t)ls[3 * E + 1];
    pl->dropped = pl->tokens * m->k;
    for (int e = 0; e < E; e++) {
        pl->expert_kept[e] = (int64_t)ls[2 * E + 1 + e];
        pl->dropped -= pl->expert_kept[e];
    }
    if (m->cfg.aux_scope == SCMOE_AUX_GLOBAL) {
        memcpy(m->gsum, ls, sizeof(double) * (E + 1));
        for (int e = 0; e < E; e++) m->top1_count[e] = (int64_t)ls[E + 1 + e];
        gate_losses(m, pl->tokens, 1.0);
        /* read by the backward's gate kernel: in stream order, no wait (from pinned memory) */
        if (m->co->device) m->co->copy_rows(m->co, m->plan_d.aux_coef, m->aux_coef_h, sizeof(float) * E);
    }
    return SCMOE_OK;
}

/* An earlier forward that failed before its statistics or counts landed: they are finished first. */
static scmoe_status local_leftovers(moe_layer *m) {
    scmoe_status st = SCMOE_OK;
    m->droute.pending = 0; /* its exchanges never started; the next summary ends with another seq */
    if (m->gcount.scanning) {
        m->gcount.scanning = 0;
        st = inflight_wait(m, &m->gcount.xscan, "route_scan");
        scmoe_status s2 = inflight_wait(m, &m->gcount.xsum, "gate_stats");
        if (!st) st = s2;
    }
    if (m->lcap.stats_pending) {
        m->lcap.stats_pending = 0;
        st = inflight_wait(m, &m->lcap.xstats, "gate_stats");
    }
    if (!st && m->lcap.counts_pending) {
        m->lcap.counts_pending = 0;
        st = inflight_wait(m, &m->lcap.xcount, "route_counts");
    }
    return st;
}

/* ---- routing planned on the device (droute, issue 19) ----
 *
 * The gate, route.c's LOCAL send side (kernels.cu: a scan per expert over my tokens in order, so the
 * locations, slots and drops are the host planner's) and the pack of my rows, all enqueued; what the
 * host needs lands in mapped memory (the counts message, gsum, top-1 and kept counts), seq_word last.
 * What crosses, and when:
 *   device -> host  that summary, written by the plan's kernel as it finishes (no copy, no wait): read
 *                   once seq_word says so, at a poll or at the latest where the first dispatch starts;
 *   host -> device  aux_coef (aux_scope LOCAL: once the summary is in; GLOBAL: after the statistics'
 *                   all-reduce) and recv_to_expert (from the counts MPI brought), each one
 *                   stream-ordered copy the backward's and the experts' kernels find in place.
 * The host's plan keeps its counts, send and receive sides and statistics; its slot array is not
 * filled (the device's is the only one read). */
static route_job droute_job(const moe_layer *m, int64_t capacity) {
    return (route_job){m->gate.choice,
                       m->gate.p,
                       m->gate.lse,
                       m->cfg.priority == SCMOE_PRIORITY_BATCH ? m->gate.score : NULL,
                       m->n,
                       m->E,
                       m->k,
                       m->ep_size,
                       capacity,
                       m->plan_d.slot,
                       m->droute.work,
                       m->droute.work_sum,
                       m->lcap.counts_out,
                       m->droute.top1,
                       m->droute.kept,
                       m->droute.gsum,
                       m->droute.seq_word,
                       m->droute.seq};
}

/* The gate over my n tokens (noise keyed by offset + t) and the plan's kernels with this capacity
 * (GLOBAL: INT64_MAX, my tokens located among my own; their rows are packed once the global plan's
 * second half has run, gscan_finish); plan.capacity is the caller's. */
static void droute_start(moe_layer *m, const exec *ex, int n, const float *x, int64_t offset, int64_t capacity) {
    const compute_ops *co = m->co;
    m->n = n;
    m->x = x;
    gate_kernels(m, ex, n, x, offset);
    m->droute.seq++;
    route_job j = droute_job(m, capacity);
    co->route_local(co, &j);
    if (!m->gcount.on) co->pack_rows(co, m->xch.send, x, m->plan_d.slot, n, m->k, m->d);
    m->droute.pending = 1;
}

/* The gate over my n tokens (noise keyed by rank * max_tokens + t: unique without any other rank's
 * count), the send side of my plan with my own capacity, my per-expert counts into counts_out and my
 * statistics into lstats, the losses if aux_scope is LOCAL; with a rejected input only its flag. */
static void local_route(moe_layer *m, const exec *ex, int n, const float *x, scmoe_status local) {
    int E = m->E, k = m->k, msg = 1 + m->E_local * k;
    route_plan *pl = &m->plan;
    double *ls = m->lcap.lstats;
    memset(ls, 0, sizeof(double) * MOE_LSTATS(E));
    if (!local && m->droute.on) {
        float cf = m->training ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor;
        m->plan.capacity = scmoe__route_capacity(n, E, k, cf);
        droute_start(m, ex, n, x, (int64_t)m->ctx->world->rank * m->max_tokens, m->plan.capacity);
        return;
    }
    if (local) {
        memset(m->lcap.counts_out, 0, sizeof(int32_t) * (size_t)m->ep_size * msg);
        for (int i = 0; i < 3; i++) ls[3 * E + 2 + i] = local == input_errors[i];
    } else {
        m->n = n;
        m->x = x;
        gate_run(m, ex, n, x, (int64_t)m->ctx->world->rank * m->max_tokens);
        float cf = m->training ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor;
        scmoe__route_plan_local_send(pl, m->route_work, m->records, n, m->ep_size, E, k, m->cfg.priority,
                                     scmoe__route_capacity(n, E, k, cf), m->lcap.counts_out);
        gate_sums(m, n);
        memset(m->top1_count, 0, sizeof(int64_t) * E);
        for (int t = 0; t < n; t++) m->top1_count[m->records[(size_t)t * (k + 1)]]++;
        memcpy(ls, m->gsum, sizeof(double) * (E + 1));
        for (int e = 0; e < E; e++) {
            ls[E + 1 + e] = (double)m->top1_count[e];
            ls[2 * E + 1 + e] = (double)pl->expert_kept[e];
        }
        ls[3 * E + 1] = n;
        if (m->cfg.aux_scope == SCMOE_AUX_LOCAL) gate_losses(m, n, 1.0 / m->ctx->world->size);
    }
    for (int q = 0; q < m->ep_size; q++) m->lcap.counts_out[(size_t)q * msg] = (int32_t)local;
}

/* The counts' all-to-all over the expert-parallel group, left in flight (counts_finish waits). */
static scmoe_status counts_start(moe_layer *m) {
    comm *ep = m->ep;
    int req = -1, msg = 1 + m->E_local * m->k;
    inflight_begin(&m->lcap.xcount, ep);
    scmoe_status st = ep->ops->alltoallv_start(ep, m->lcap.counts_out, m->lcap.ones, m->lcap.iota, m->lcap.counts_in,
                                               m->lcap.ones, m->lcap.iota, (int)sizeof(int32_t) * msg, &req);
    if ((st = small_start(m, &m->lcap.xcount, ep, st, req))) return st;
    m->lcap.counts_pending = 1;
    return SCMOE_OK;
}

/* The statistics' all-reduce (world) and the counts' all-to-all (expert-parallel group), both left
 * in flight. */
static scmoe_status local_exchanges_start(moe_layer *m) {
    comm *w = m->ctx->world;
    int req = -1;
    inflight_begin(&m->lcap.xstats, w);
    scmoe_status st = w->ops->allreduce_f64_start(w, m->lcap.lstats, MOE_LSTATS(m->E), &req);
    if ((st = small_start(m, &m->lcap.xstats, w, st, req))) return st;
    m->lcap.stats_pending = 1;
    return counts_start(m);
}

/* The device's summary is in: the send side of my plan, lstats, the losses (aux_scope LOCAL, whose
 * aux_coef goes down in stream order); then, as local_route's caller does on the host, the statistics'
 * all-reduce and the counts' all-to-all start. */
static scmoe_status gscan_start(moe_layer *m);

static scmoe_status droute_land(moe_layer *m) {
    int E = m->E, k = m->k, msg = 1 + m->E_local * k, n = m->n;
    route_plan *pl = &m->plan;
    double *ls = m->lcap.lstats;
    m->droute.pending = 0;
    if (m->gcount.on) return gscan_start(m);
    memset(ls, 0, sizeof(double) * MOE_LSTATS(E));
    memcpy(m->gsum, m->droute.gsum, sizeof(double) * (E + 1));
    memcpy(ls, m->gsum, sizeof(double) * (E + 1));
    pl->tokens = n;
    pl->dropped = (int64_t)n * k;
    for (int e = 0; e < E; e++) {
        m->top1_count[e] = m->droute.top1[e];
        pl->expert_kept[e] = m->droute.kept[e];
        pl->dropped -= pl->expert_kept[e];
        ls[E + 1 + e] = (double)m->top1_count[e];
        ls[2 * E + 1 + e] = (double)pl->expert_kept[e];
    }
    ls[3 * E + 1] = n;
    pl->n_send = 0;
    for (int q = 0; q < m->ep_size; q++) {
        int c = 0;
        for (int i = 1; i < msg; i++) c += m->lcap.counts_out[(size_t)q * msg + i];
        pl->send_counts[q] = c;
        pl->send_displs[q] = pl->n_send;
        pl->n_send += c;
    }
    if (m->cfg.aux_scope == SCMOE_AUX_LOCAL) {
        gate_losses(m, n, 1.0 / m->ctx->world->size);
        m->co->copy_rows(m->co, m->plan_d.aux_coef, m->aux_coef_h, sizeof(float) * E);
    }
    return local_exchanges_start(m);
}

/* ---- routing planned on the device, capacity over the global batch (GLOBAL, TOKEN priority) ----
 *
 * The first half ran dropless (droute_start with capacity INT64_MAX): its counts message holds my round
 * counts, mine[j, e] = my tokens' j-th choices of e, and its slots my rows among my own assignments.
 * As gate_encode_counts does with the host's counts: they are scanned over the ranks (scan_i64_start:
 * prefix and total), gsum all-reduced (aux_scope GLOBAL), both left in flight; once they are in
 * (gscan_check: a poll, at the latest where the first dispatch starts) scmoe__route_plan_global_counts
 * gives the statistics, the send side, the counts message and the bases, which go down in one
 * stream-ordered copy to the slots' second half (compute_ops.route_global); my rows are packed after
 * it, and the counts message starts as on the host. What crosses: the summary up (written by the
 * kernel, no wait), k E + 1 int64s and aux_coef down, in stream order. */
static scmoe_status gscan_start(moe_layer *m) {
    comm *w = m->ctx->world;
    int E = m->E, k = m->k, El = m->E_local, msg = 1 + El * k, kE = k * E, req = -1;
    int64_t *mine = m->gcount.counts, *prefix = mine + kE;
    for (int j = 0; j < k; j++)
        for (int e = 0; e < E; e++)
            mine[(size_t)j * E + e] = m->lcap.counts_out[(size_t)(e / El) * msg + 1 + (e % El) * k + j];
    memcpy(m->gsum, m->droute.gsum, sizeof(double) * (E + 1));
    for (int e = 0; e < E; e++) m->top1_count[e] = m->droute.top1[e]; /* aux_scope LOCAL's: my tokens' */
    inflight_begin(&m->gcount.xscan, w);
    scmoe_status st = w->ops->scan_i64_start(w, mine, prefix, kE, &req);
    if ((st = small_start(m, &m->gcount.xscan, w, st, req))) return st;
    m->gcount.scanning = 1;
    m->gcount.xsum.active = 0;
    if (m->cfg.aux_scope == SCMOE_AUX_GLOBAL && w->size > 1) {
        inflight_begin(&m->gcount.xsum, w);
        st = w->ops->allreduce_f64_start(w, m->gsum, E + 1, &req);
        if ((st = small_start(m, &m->gcount.xsum, w, st, req))) return st;
    }
    return SCMOE_OK;
}

/* The scan and the sums in (at once if they are, else with wait when they are): the plan, the losses,
 * the slots' second half and the pack enqueued, the counts message started. */
static scmoe_status gscan_check(moe_layer *m, int wait) {
    if (!m->gcount.scanning) return SCMOE_OK;
    if (!wait) {
        test_one(&m->gcount.xscan);
        test_one(&m->gcount.xsum);
        if (!m->gcount.xscan.t_done || (m->gcount.xsum.active && !m->gcount.xsum.t_done)) return SCMOE_OK;
    }
    m->gcount.scanning = 0;
    scmoe_status st = inflight_wait(m, &m->gcount.xscan, "route_scan");
    if (!st) st = inflight_wait(m, &m->gcount.xsum, "gate_stats");
    if (st) return st;
    int E = m->E, k = m->k, kE = k * E, msg = 1 + m->E_local * k, global = m->cfg.aux_scope == SCMOE_AUX_GLOBAL;
    int64_t *mine = m->gcount.counts, *prefix = mine + kE, *total = prefix + kE, S = m->gcount.S;
    const compute_ops *co = m->co;
    scmoe__route_plan_global_counts(&m->plan, mine, prefix, total, m->ep_size, E, k, S, m->plan.capacity,
                                    m->lcap.counts_out, m->droute.base_h);
    for (int q = 0; q < m->ep_size; q++) m->lcap.counts_out[(size_t)q * msg] = SCMOE_OK; /* agreed already */
    if (global) memcpy(m->top1_count, total, sizeof(int64_t) * E); /* round 0 is the top-1 choice */
    gate_losses(m, global ? S : m->n, global ? 1.0 : 1.0 / m->ctx->world->size);
    co->copy_rows(co, m->plan_d.aux_coef, m->aux_coef_h, sizeof(float) * E);
    co->copy_rows(co, m->droute.base, m->droute.base_h, sizeof(int64_t) * ((size_t)kE + 1));
    route_job j = droute_job(m, INT64_MAX);
    co->route_global(co, &j, m->droute.base);
    co->pack_rows(co, m->xch.send, m->x, m->plan_d.slot, m->n, k, m->d);
    return counts_start(m);
}

/* Folds the device's summary in once it has landed: at once if it has, else (wait) when it does. A
 * device that failed first never writes it: the summary is taken as empty (no rows move, every rank
 * joins the same exchanges) and the failure comes back from the call (scmoe__context_device_check). */
static scmoe_status droute_check(moe_layer *m, int wait) {
    if (m->droute.pending) {
        if (!m->co->route_landed(m->co, m->droute.seq_word, m->droute.seq, wait)) {
            if (!wait) return SCMOE_OK;
            memset(m->lcap.counts_out, 0, sizeof(int32_t) * (size_t)m->ep_size * (1 + m->E_local * m->k));
            memset(m->droute.top1, 0, sizeof(int32_t) * m->E);
            memset(m->droute.kept, 0, sizeof(int32_t) * m->E);
            memset(m->droute.gsum, 0, sizeof(double) * (m->E + 1));
        }
        scmoe_status st = droute_land(m);
        if (st) return st;
    }
    return gscan_check(m, wait);
}

/* Waits for the counts: unless a rank of my group rejected its input (then every rank of it takes the
 * agreed status from the statistics, and none dispatches), the receive side of the plan, then the
 * rest of encode (on the host my rows were packed while the counts travelled). */
static scmoe_status counts_finish(moe_layer *m) {
    m->lcap.counts_pending = 0;
    scmoe_status st = inflight_wait(m, &m->lcap.xcount, "route_counts");
    if (st) return st;
    int msg = 1 + m->E_local * m->k, group_bad = 0;
    for (int p = 0; p < m->ep_size; p++) group_bad |= m->lcap.counts_in[(size_t)p * msg] != 0;
    if (group_bad) {
        st = stats_finish(m);
        return st ? st : scmoe__fail(m->ctx, SCMOE_ERR_STATE, "a rank's input status was lost");
    }
    scmoe__route_plan_local_recv(&m->plan, m->lcap.counts_in, m->ep_size, m->ep_rank, m->E_local, m->k,
                                 m->cfg.pipeline_chunks);
    encode_finish(m, !m->co->device || m->droute.on);
    return SCMOE_OK;
}

/* gate + my send plan -> statistics and counts started -> (host) my rows packed; the counts are
 * waited for by the dispatch (counts_finish). A rank whose input was rejected has nothing to hide:
 * it waits for the counts at once, so its group sees the rejection, and fails. */
static scmoe_status gate_encode_local(moe_layer *m, const exec *ex, int n, const float *x, scmoe_status local) {
    scmoe_status st = local_leftovers(m);
    if (st) return st;
    local_route(m, ex, n, x, local);
    if (m->droute.pending) return SCMOE_OK; /* they start once the device's summary has landed */
    if ((st = local_exchanges_start(m))) return st;
    if (local) {
        m->lcap.counts_pending = 0;
        if ((st = inflight_wait(m, &m->lcap.xcount, "route_counts"))) return st;
        stats_finish(m);
        return input_fail(m, local, n);
    }
    if (!m->co->device) m->co->pack_rows(m->co, m->xch.send, x, m->plan.slot, n, m->k, m->d);
    return SCMOE_OK;
}

/* ---- capacity over the global batch (GLOBAL), TOKEN priority: counts, not records (route.c) ----
 *
 * Two exclusive scans with sums over the world (comm scan_i64_start), O(k E) int64s a rank whatever P:
 * the token counts and input statuses before the gate (the gate's noise is keyed by my first token's
 * global index, the scan of the counts, as the gathered counts gave it), and the per-(round, expert)
 * counts after it; then the statistics' all-reduce of gsum exactly as with the records (so the losses
 * keep their bits), the send side (scmoe__route_plan_global_send) and LOCAL's counts message to the
 * group, waited for where the dispatch starts (counts_finish: scmoe__route_plan_local_recv). */

/* Every rank says how many tokens it has and whether its input is bad, counted per status: no rank
 * enters an exchange that another has left, and every rank returns the same status, the largest any
 * rank reported (as LOCAL's statistics). *S: the global batch, *offset: where my tokens start in it. */
static scmoe_status agree_token_scan(moe_layer *m, int n, scmoe_status local, int64_t *S, int64_t *offset) {
    comm *w = m->ctx->world;
    int64_t *in = m->gcount.agree, *pre = in + MOE_AGREE, *tot = pre + MOE_AGREE;
    in[0] = local ? 0 : n;
    for (int i = 0; i < 3; i++) in[1 + i] = local == input_errors[i];
    int req = -1;
    scmoe_status s = w->ops->scan_i64_start(w, in, pre, MOE_AGREE, &req);
    if (!s) s = comm_wait(w, req);
    if (s) return scmoe__fail(m->ctx, s, "exchanging token counts failed: %s", w->err);
    if (local) return input_fail(m, local, n);
    double ranks[3] = {(double)tot[1], (double)tot[2], (double)tot[3]};
    if ((s = agreed_input_error(m, ranks))) return s;
    if (pre[0] < 0 || tot[0] < pre[0] + n || tot[0] > (int64_t)m->max_tokens * w->size) /* not counts: out of step */
        return scmoe__fail(m->ctx, SCMOE_ERR_COMM,
                           "the token counts' scan gave %lld before this rank of %lld in all: "
                           "the ranks are out of step",
                           (long long)pre[0], (long long)tot[0]);
    *S = tot[0];
    *offset = pre[0];
    return SCMOE_OK;
}

/* gate -> counts scanned -> losses -> my send side -> the counts message started -> (host) my rows
 * packed; the receive side comes with the counts (counts_finish) */
static scmoe_status gate_encode_counts(moe_layer *m, const exec *ex, int n, const float *x, scmoe_status local) {
    int E = m->E, k = m->k, msg = 1 + m->E_local * k, kE = k * E;
    int64_t S = 0, offset = 0;
    scmoe_status st = local_leftovers(m); /* a failed forward's counts message */
    if (!st) st = agree_token_scan(m, n, local, &S, &offset);
    if (st) return st;
    float cf = m->training ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor;
    if (m->droute.on) { /* the plan's first half on the device; its summary starts the scan (gscan_start) */
        m->gcount.S = S;
        m->plan.capacity = scmoe__route_capacity(S, E, k, cf);
        droute_start(m, ex, n, x, offset, INT64_MAX);
        return SCMOE_OK;
    }
    m->n = n;
    m->x = x;
    gate_run(m, ex, n, x, offset);
    comm *w = m->ctx->world;
    int64_t *mine = m->gcount.counts, *prefix = mine + kE, *total = prefix + kE;
    scmoe__route_round_counts(mine, m->records, n, E, k);
    int req = -1;
    st = w->ops->scan_i64_start(w, mine, prefix, kE, &req);
    if (!st) st = comm_wait(w, req);
    if (st) return scmoe__fail(m->ctx, st, "scanning the routing counts failed: %s", w->err);
    if ((st = batch_losses(m, n, S, total))) return st; /* round 0 is the top-1 choice */
    scmoe__route_plan_global_send(&m->plan, m->route_work, m->records, n, m->ep_size, E, k, prefix, total, S,
                                  scmoe__route_capacity(S, E, k, cf), m->lcap.counts_out);
    for (int q = 0; q < m->ep_size; q++) m->lcap.counts_out[(size_t)q * msg] = SCMOE_OK; /* agreed already */
    if ((st = counts_start(m))) return st;
    if (!m->co->device) m->co->pack_rows(m->co, m->xch.send, x, m->plan.slot, n, k, m->d);
    return SCMOE_OK;
}

scmoe_status scmoe__moe_gate_encode(moe_layer *m, const exec *ex, int n, const float *x) {
    m->xch.next_dispatch = MOE_MAX_STAGES; /* nothing for a poll to chain until this step's dispatch starts */
    m->comm_time = m->exposed_time = 0;
    scmoe_status local = input_status(m, n, x);
    if (m->local_cap) return gate_encode_local(m, ex, n, x, local);
    return m->gcount.on ? gate_encode_counts(m, ex, n, x, local) : gate_encode_global(m, ex, n, x, local);
}

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

/* ---- cuda (issue 19): the token exchanges' mapped mirrors (moe_exchange.send_m). With more than one rank
 * and an MPI that reads host memory, the kernels pack, permute and decode rows in device memory and only
 * the peer blocks an exchange moves cross PCIe, each in one cudaMemcpyAsync on the copy stream: out
 * before MPI starts (the host waits for those copies, not for the compute stream), in once MPI has
 * landed them (the kernels after wait for it, the host does not). My own block never leaves the device. */
static int exchange_mirrored(const moe_layer *m) {
    return m->co->device && m->co->exchange_kind == COMPUTE_MAPPED && m->co->copy_in;
}

/* MPI's mapped mirror of a kernels' exchange buffer */
static float *mirror_of(const moe_layer *m, const float *buf) {
    return buf == m->xch.send ? m->xch.send_m : buf == m->xch.recv ? m->xch.recv_m : m->xch.crecv_m;
}

/* src's peer blocks (rows [sd[q], sd[q] + sc[q]) of d floats) to its mirror, on the copy queue; f
 * remembers what MPI sends once they have landed (exchange_release) and where the received blocks go */
static void exchange_mirror_out(moe_layer *m, inflight *f, const float *src, float *dst, const int *sc, const int *sd,
                                const int *rc, const int *rd) {
    const compute_ops *co = m->co;
    float *src_m = mirror_of(m, src);
    size_t d = (size_t)m->d;
    for (int q = 0; q < m->ep_size; q++)
        co->copy_out(co, src_m + (size_t)sd[q] * d, src + (size_t)sd[q] * d, sizeof(float) * (size_t)sc[q] * d);
    f->held = 1;
    f->send_from = src_m;
    f->send_counts = sc;
    f->send_displs = sd;
    f->copy_to = dst;
    f->copy_from = mirror_of(m, dst);
    f->unpack_counts = rc;
    f->unpack_displs = rd;
    f->row = m->d;
}

/* A held exchange's MPI start, once its copies out have landed: asked (wait 0: at the exchange's start
 * and at every poll, so the host goes on enqueueing kernels meanwhile) or waited for (wait 1: where the
 * exchange is waited for, nothing left to enqueue before it). The copies land in order and MPI's starts
 * on one communicator must match across ranks, so callers release a communicator's exchanges in the
 * order they were started (the polls go stage by stage). A failed device (0 even when waited for)
 * still starts it: the other ranks' collectives must match; the call reports the failure. */
static scmoe_status exchange_release(moe_layer *m, inflight *f, int wait) {
    if (!f->held) return SCMOE_OK;
    if (!m->co->copy_landed(m->co, wait) && !wait) return SCMOE_OK;
    f->held = 0;
    comm *c = f->c;
    scmoe_status st = c->ops->alltoallv_start(c, f->send_from, f->send_counts, f->send_displs, f->copy_from,
                                              f->unpack_counts, f->unpack_displs, (int)sizeof(float) * m->d, &f->req);
    if (st) {
        f->active = 0;
        m->xch.next_dispatch = MOE_MAX_STAGES; /* a failed pass chains nothing more */
        return scmoe__fail(m->ctx, st, "starting a token exchange failed: %s", c->err);
    }
    return SCMOE_OK;
}

/* the received peer blocks from the mirror to the kernels' buffer, one copy each */
static void exchange_mirror_in(moe_layer *m, const inflight *f) {
    for (int q = 0; q < f->c->size; q++) {
        size_t o = (size_t)f->unpack_displs[q] * f->row;
        m->co->copy_in(m->co, f->copy_to + o, f->copy_from + o, sizeof(float) * (size_t)f->unpack_counts[q] * f->row);
    }
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
            g.w1[i] = param_data(m, b), g.b1[i] = param_data(m, b + 1);
            g.w2[i] = param_data(m, b + 2), g.b2[i] = param_data(m, b + 3);
            g.dw1[i] = param_gwork(m, b), g.db1[i] = param_gwork(m, b + 1);
            g.dw2[i] = param_gwork(m, b + 2), g.db2[i] = param_gwork(m, b + 3);
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
        expert_weights(m, i, w);
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
        expert_weights(m, i, w);
        scmoe__ffn_backward(ex, dxe + (size_t)o * d, 0.0f, param_gwork(m, b), param_gwork(m, b + 1),
                            param_gwork(m, b + 2), param_gwork(m, b + 3), m->buf.dhid + (size_t)o * h,
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
    scmoe__gate_backward(ex, dx, 1.0f, param_gwork(m, m->p_wg), m->buf.dlogits, m->buf.dweight, m->gate.choice,
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
