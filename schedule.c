/* schedule.c: runs a block's operations and its MoE's phases in the serialized or the overlapped order
 * (schedule.h), times every one, and chooses the experts' slot from those times (paper, "The schedule
 * that makes it fast").
 *
 * Overlap needs progress: OpenMPI moves a nonblocking collective only inside MPI calls, so while an
 * exchange or a gradient all-reduce is in flight the GEMMs are tiled and poll between tiles (POLL),
 * or the backend's progress thread tests it (THREAD). */
#include "schedule.h"
#include <stdlib.h>
#include <string.h>

/* A bucket whose all-reduce has not started (request ids are >= -1: -1 is one that completed at once). */
#define NOT_STARTED (-2)

int scmoe__schedule_choose_slot(const double *ops, int n_ops, double t_disp, double t_exp, double t_comb) {
    double total = 0;
    for (int i = 0; i < n_ops; i++) total += ops[i];
    int best = 0;
    double best_t = 0, pre = 0;
    for (int K = 0; K <= n_ops; K++) {
        double post = total - pre;
        double t = (pre > t_disp ? pre : t_disp) + t_exp + (post > t_comb ? post : t_comb);
        if (K == 0 || t < best_t - 1e-12) {
            best = K;
            best_t = t;
        }
        if (K < n_ops) pre += ops[K];
    }
    return best;
}

scmoe_status scmoe__schedule_init(scheduler *s, scmoe_context *ctx, const scmoe_config *cfg, const sched_block *blk) {
    memset(s, 0, sizeof *s);
    if (blk->n_ops < 1 || blk->n_ops > SCHED_MAX_OPS || blk->moe_input_op < 0 || blk->moe_input_op >= blk->n_ops)
        return scmoe__fail(ctx, SCMOE_ERR_OPTION,
                           "a block of %d operations (at most %d) with the MoE's input from op %d", blk->n_ops,
                           SCHED_MAX_OPS, blk->moe_input_op);
    int n = blk->n_ops;
    s->ctx = ctx;
    s->blk = *blk;
    s->expert_slot = cfg->expert_slot;
    s->overlap = cfg->overlap;
    s->world = ctx->world;
    s->gate_after = blk->overlap ? blk->moe_input_op + 1 : n;
    s->grad_needed_before = n - 1 - blk->moe_input_op;
    s->profile_n = -1;
    /* backward step i runs op n-1-i, and finishes that op's gradients */
    for (int i = 0; i < n; i++) {
        snprintf(s->bwd_name[i], sizeof s->bwd_name[i], "%s_bwd", blk->ops[n - 1 - i].name);
        s->bucket[i] = blk->op_grads[n - 1 - i];
    }
    s->bucket[n] = blk->gate_grads;
    s->bucket[n + 1] = blk->expert_grads;
    for (int b = 0; b < n + 2; b++) s->req[b] = NOT_STARTED;
    return SCMOE_OK;
}

/* ---- the poll hook and the trace ---- */

typedef struct run_state {
    scheduler *s;
    exec *ex;
    moe_layer *m;
    int dir;     /* 0 forward, 1 backward */
    int serial;  /* this pass waits on every exchange at once */
    double last; /* duration of the last exchange waited on */
} run_state;

/* Between GEMM tiles: the MoE's exchanges, and every gradient all-reduce in flight on the context's
 * communicator, this block's or one that an earlier backward left running (overlap_grad_sync: a model's
 * later pairs reduce their gradients behind the earlier pairs' backward, and a two-round all-reduce's
 * second round starts only when a test sees the first done), each where its communicator's policy is POLL (a
 * THREAD policy MPI cannot host falls back to POLL). A comm with nothing in flight returns at once. */
static void poll_all(void *arg) {
    run_state *r = arg;
    scmoe__moe_poll(r->m);
    comm *w = r->s->world, *x = r->s->blk.expert_grads.over;
    if (w->progress != SCMOE_PROGRESS_POLL) return;
    w->ops->progress(w);
    if (x && x != w) x->ops->progress(x);
}

static void event(scheduler *s, int dir, const char *name, int kind, double t0, double t1) {
    if (s->n_ev[dir] < SCHED_MAX_EVENTS) s->ev[dir][s->n_ev[dir]++] = (sched_event){name, kind, t0, t1};
}

/* ---- trace: one JSON array of complete events ("ph":"X"), pid = rank, tid 0 compute, tid 1 token
 * exchanges, tid 2 the gradient all-reduce; ts in microseconds of CLOCK_MONOTONIC ---- */

scmoe_status scmoe__schedule_trace_open(scheduler *s, const char *path) {
    scmoe__schedule_trace_close(s);
    if (!path) return SCMOE_OK;
    s->trace = fopen(path, "w");
    if (!s->trace) return scmoe__fail(s->ctx, SCMOE_ERR_IO, "cannot open the trace file %s", path);
    int r = s->world->rank;
    fprintf(s->trace,
            "[\n{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,\"args\":{\"name\":\"rank %d\"}},\n"
            "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"name\":\"compute\"}},\n"
            "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":1,\"args\":{\"name\":\"communication\"}},\n"
            "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":2,\"args\":{\"name\":\"gradient all-reduce\"}}",
            r, r, r, r, r);
    return SCMOE_OK;
}

void scmoe__schedule_trace_close(scheduler *s) {
    if (!s->trace) return;
    fprintf(s->trace, "\n]\n");
    fclose(s->trace);
    s->trace = NULL;
}

static void trace_flush(scheduler *s, int dir) {
    if (!s->trace) return;
    for (int i = 0; i < s->n_ev[dir]; i++) {
        const sched_event *e = &s->ev[dir][i];
        fprintf(s->trace,
                ",\n{\"name\":\"%s\",\"cat\":\"%s\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":%d,\"tid\":%d,"
                "\"args\":{\"step\":%ld,\"pass\":\"%s\"}}",
                e->name, e->kind ? "comm" : "compute", e->t0 * 1e6, (e->t1 - e->t0) * 1e6, s->world->rank, e->kind,
                s->trace_step, dir ? "backward" : "forward");
    }
}

/* The MoE tells of every exchange it waited for (it sums their times itself): its trace box, and its
 * duration for the profile of a serialized step. */
static void exchange_waited(void *arg, const char *what, const inflight *f) {
    run_state *r = arg;
    event(r->s, r->dir, what, 1, f->t_start, f->t_done);
    r->last = f->t_done - f->t_start;
}

/* Hooks the pass's timing and polling into the MoE and the GEMMs (NULL r: unhooks them). */
static void hook(run_state *r, exec *ex, moe_layer *m) {
    m->on_wait = r ? exchange_waited : NULL;
    m->on_wait_arg = r;
    ex->poll = r ? poll_all : NULL;
    ex->poll_arg = r;
}

/* Step i of the pass: op i forward, op n-1-i backward. On a device an operation is only enqueued: a
 * profiled (serialized) step waits for each, so its times are the device's and the slot is chosen from
 * them; other steps run ahead while the host waits on MPI. */
static void timed_op(run_state *r, int i) {
    scheduler *s = r->s;
    const sched_op *op = &s->blk.ops[r->dir ? s->blk.n_ops - 1 - i : i];
    double t0 = scmoe__now();
    (r->dir ? op->backward : op->forward)(s->blk.self);
    scmoe__moe_release(r->m); /* held exchanges: MPI starts if their copies out have landed meanwhile */
    if (s->profile_left[r->dir] > 0) s->ctx->compute->sync(s->ctx->compute);
    double t1 = scmoe__now();
    (r->dir ? s->t_b : s->t_f)[i] = t1 - t0;
    event(s, r->dir, r->dir ? s->bwd_name[i] : op->name, 0, t0, t1);
}

/* The first exchange of the pass has started; a serialized pass waits for it at once and times it. */
static scmoe_status dispatch_started(run_state *r) {
    if (!r->serial) return SCMOE_OK;
    scmoe_status st = scmoe__moe_dispatch_wait(r->m);
    r->s->t_disp[r->dir] = r->last;
    return st;
}

/* The experts in their slot, either way: timed, and in a serialized pass followed by the combine's wait. */
static scmoe_status experts_at_slot(run_state *r) {
    scheduler *s = r->s;
    double t0 = scmoe__now();
    scmoe_status st = r->dir ? scmoe__moe_experts_backward(r->m, r->ex) : scmoe__moe_experts_forward(r->m, r->ex);
    double t1 = scmoe__now();
    event(s, r->dir, r->dir ? "experts_bwd" : "experts", 0, t0, t1);
    s->expert[r->dir] = t1 - t0;
    if (r->serial) s->t_exp[r->dir] = t1 - t0;
    if (!st && r->serial) {
        st = scmoe__moe_combine_wait(r->m);
        s->t_comb[r->dir] = r->last;
    }
    return st;
}

/* The forward and the backward are profiled apart: each runs serialized for its first
 * SCHED_PROFILE_STEPS steps of a shape, timing its operations and exchanges standalone, then takes
 * the slot those times favour (or the configured one, clamped to the operations there are). */
static int profiling(scheduler *s, int dir, int n) {
    if (dir == 0 && n != s->profile_n) {
        s->profile_n = n;
        s->profile_left[0] = s->profile_left[1] = SCHED_PROFILE_STEPS;
    }
    return s->profile_left[dir] > 0;
}

/* After a pass: the slot among the n_ops steps from first on, once the profile is complete. */
static void profiled(scheduler *s, int dir, int first, int n_ops) {
    if (s->profile_left[dir] <= 0 || --s->profile_left[dir] > 0) return;
    int *slot = dir ? &s->slot_b : &s->slot_f;
    const double *t = (dir ? s->t_b : s->t_f) + first;
    if (s->expert_slot >= 0) *slot = s->expert_slot < n_ops ? s->expert_slot : n_ops;
    else *slot = scmoe__schedule_choose_slot(t, n_ops, s->t_disp[dir], s->t_exp[dir], s->t_comb[dir]);
}

scmoe_status scmoe__schedule_forward(scheduler *s, exec *ex, sched_moe *mo, int n) {
    moe_layer *m = mo->m;
    int n_ops = s->blk.n_ops, serial = profiling(s, 0, n) || !s->overlap || !s->blk.overlap;
    run_state r = {s, ex, m, 0, serial, 0};
    int K = serial ? 0 : s->slot_f;
    double t_start = scmoe__now();
    s->n_ev[0] = 0;
    s->trace_step++;
    hook(&r, ex, m);
    scmoe_status st = SCMOE_OK;
    int experts_done = 0;
    for (int i = 0; i <= n_ops && !st; i++) {
        if (i == s->gate_after) {
            double t0 = scmoe__now();
            st = scmoe__moe_gate_encode(m, ex, n, mo->x);
            if (!st) st = scmoe__moe_dispatch_start(m);
            event(s, 0, "gate_encode", 0, t0, scmoe__now());
            if (!st) st = dispatch_started(&r);
        }
        if (!st && i == s->gate_after + K && !experts_done) {
            st = experts_at_slot(&r);
            experts_done = 1;
        }
        if (!st && i < n_ops) timed_op(&r, i);
    }
    if (!st) st = scmoe__moe_combine_wait(m);
    hook(NULL, ex, m);
    s->comm_time[0] = m->comm_time;
    s->exposed[0] = m->exposed_time;
    if (st) return st;
    double t0 = scmoe__now();
    scmoe__moe_decode(m, mo->y, 1.0f);
    event(s, 0, "decode", 0, t0, scmoe__now());
    s->slot_used[0] = serial ? -1 : K;
    s->time[0] = scmoe__now() - t_start;
    trace_flush(s, 0);
    profiled(s, 0, s->gate_after, n_ops - s->gate_after);
    return SCMOE_OK;
}

static scmoe_status bucket_start(scheduler *s, int b) {
    const sched_bucket *k = &s->bucket[b];
    if (!sched_bucket_summed(k)) return SCMOE_OK;
    if (s->grad_t0 == 0) s->grad_t0 = scmoe__now();
    comm *c = k->over;
    scmoe_status st = k->work ? c->ops->allreduce_two_round_start(c, k->ptr, k->n, k->wire, k->work, &s->req[b])
                              : c->ops->allreduce_start(c, k->ptr, k->n, &s->req[b]);
    if (st) return scmoe__fail(s->ctx, st, "starting a gradient all-reduce failed: %s", c->err);
    return SCMOE_OK;
}

/* The queued buckets' all-reduces, in the order they were queued (every rank queues them alike, so their
 * collectives match whatever each rank's polls found). Gradients the device wrote in its own memory go to
 * MPI's buffer in one copy each on the copy queue (buckets_flush): MPI may read them once the copies have
 * landed, which wait 0 only asks (nothing starts if not; a later flush asks again) and wait 1 waits for. */
static scmoe_status buckets_start(scheduler *s, int wait) {
    const compute_ops *co = s->ctx->compute;
    int copied = 0, written = 0;
    for (int i = 0; i < s->n_queued; i++) {
        const sched_bucket *k = &s->bucket[s->queued[i]];
        copied |= k->src && sched_bucket_summed(k);
        written |= !k->src && sched_bucket_summed(k);
    }
    if (copied && !co->copy_landed(co, wait) && !wait) return SCMOE_OK; /* a failed device: started anyway */
    if (written) co->sync(co); /* MPI reads what the device wrote in its buffer */
    scmoe_status st = SCMOE_OK;
    for (int i = 0; i < s->n_queued && !st; i++) st = bucket_start(s, s->queued[i]);
    s->n_queued = 0;
    return st;
}

/* Finished buckets' all-reduces start once the MoE's last exchange of the step has landed: the
 * exchanges are on the critical path while the all-reduce only has to end before the optimizer
 * step, and over one link the two would split the bandwidth (a trace showed the gradient combine
 * slowed by a bucket started between the two exchanges). A flush starts what earlier flushes copied if
 * their copies have landed, queues the newly finished buckets (copying those the device wrote in its
 * own memory) and starts them too if their copies have landed already: a poll, never a wait, so the host
 * goes on enqueueing the backward's next operations while the copy engine works. The last flush (last:
 * nothing left to enqueue) waits for the copies. */
static scmoe_status buckets_flush(scheduler *s, int exchanges_done, int last) {
    const compute_ops *co = s->ctx->compute;
    if (!exchanges_done) return SCMOE_OK;
    scmoe_status st = buckets_start(s, 0);
    for (int b = 0; b < s->blk.n_ops + 2; b++) {
        if (!s->ready[b]) continue;
        const sched_bucket *k = &s->bucket[b];
        if (k->src && sched_bucket_summed(k)) co->copy_out(co, k->ptr, k->src, sizeof(float) * (size_t)k->n);
        s->ready[b] = 0;
        s->queued[s->n_queued++] = b;
    }
    if (!st) st = buckets_start(s, last);
    return st;
}

scmoe_status scmoe__schedule_backward(scheduler *s, exec *ex, sched_moe *mo, int n) {
    moe_layer *m = mo->m;
    int n_ops = s->blk.n_ops, serial = profiling(s, 1, n) || !s->overlap || !s->blk.overlap;
    int needed_before = s->grad_needed_before;
    run_state r = {s, ex, m, 1, serial, 0};
    int K = serial ? 0 : s->slot_b;
    int early_grads = s->overlap; /* serialized runs reduce all gradients after backward */
    double t_start = scmoe__now();
    s->n_ev[1] = 0;
    s->grad_t0 = 0;
    s->n_queued = 0;
    hook(&r, ex, m);
    double t0 = scmoe__now();
    scmoe__moe_decode_backward(m, mo->dy);
    scmoe_status st = scmoe__moe_dispatch_start(m);
    event(s, 1, "decode_bwd", 0, t0, scmoe__now());
    if (!st) st = dispatch_started(&r);
    int experts_done = 0;
    for (int i = 0; i <= n_ops && !st; i++) {
        if (i == K && !experts_done) {
            st = experts_at_slot(&r);
            s->ready[n_ops + 1] = early_grads;
            experts_done = 1;
        }
        if (!st && i == needed_before) {
            st = scmoe__moe_combine_wait(m);
            t0 = scmoe__now();
            if (!st) scmoe__moe_gate_backward(m, ex, mo->dx, 1.0f);
            event(s, 1, "gate_bwd", 0, t0, scmoe__now());
            s->ready[n_ops] = early_grads;
        }
        if (!st && i < n_ops) {
            timed_op(&r, i);
            s->ready[i] = early_grads;
        }
        if (!st) st = buckets_flush(s, i >= needed_before, 0);
    }
    hook(NULL, ex, m);
    s->comm_time[1] = m->comm_time;
    s->exposed[1] = m->exposed_time;
    if (st) return st;
    if (!early_grads) /* serialized: every bucket after the backward */
        for (int b = 0; b < n_ops + 2; b++) s->ready[b] = 1;
    st = buckets_flush(s, 1, 1);
    s->slot_used[1] = serial ? -1 : K;
    s->time[1] = scmoe__now() - t_start;
    trace_flush(s, 1);
    profiled(s, 1, 0, needed_before);
    return st;
}

scmoe_status scmoe__schedule_grad_wait(scheduler *s) {
    /* one deadline for the whole sync, however many buckets; the first failure ends it */
    double t0 = scmoe__now(), deadline = t0 + s->world->timeout_s;
    scmoe_status st = SCMOE_OK;
    for (int b = 0; b < s->blk.n_ops + 2 && !st; b++) {
        if (s->req[b] == NOT_STARTED) continue;
        comm *c = s->bucket[b].over;
        double full = c->timeout_s, left = deadline - scmoe__now();
        c->timeout_s = left > 1e-3 ? left : 1e-3;
        scmoe_status w = c->ops->wait(c, s->req[b]);
        c->timeout_s = full;
        if (w) st = scmoe__fail(s->ctx, w, "gradient all-reduce: %s", c->err);
        s->req[b] = NOT_STARTED;
    }
    double t1 = scmoe__now();
    if (s->grad_t0) event(s, 1, "grad_allreduce", 1, s->grad_t0, t1);
    if (s->trace && s->grad_t0 && s->n_ev[1] > 0) {
        const sched_event *e = &s->ev[1][s->n_ev[1] - 1];
        fprintf(s->trace,
                ",\n{\"name\":\"%s\",\"cat\":\"comm\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":%d,\"tid\":2,"
                "\"args\":{\"step\":%ld,\"pass\":\"grad sync\"}}",
                e->name, e->t0 * 1e6, (e->t1 - e->t0) * 1e6, s->world->rank, s->trace_step);
    }
    s->grad_exposed = t1 - t0;
    s->grad_time = s->grad_t0 ? t1 - s->grad_t0 : 0;
    return st;
}

void scmoe__schedule_fill_stats(const scheduler *s, scmoe_stats *st, int which) {
    if (which == 2) {
        st->grad_sync_time = s->grad_time;
        st->grad_sync_exposed = s->grad_exposed;
        return;
    }
    double c = s->comm_time[which], ov = scmoe__overlap_fraction(c, s->exposed[which]);
    if (which == 0) {
        st->fwd_time = s->time[0];
        st->fwd_comm = c;
        st->fwd_exposed = s->exposed[0];
        st->fwd_overlap = ov;
        st->fwd_expert = s->expert[0];
    } else {
        st->bwd_time = s->time[1];
        st->bwd_comm = c;
        st->bwd_exposed = s->exposed[1];
        st->bwd_overlap = ov;
        st->bwd_expert = s->expert[1];
        st->grad_sync_time = s->grad_time;
        st->grad_sync_exposed = s->grad_exposed;
    }
    st->expert_slot = s->slot_used[which];
}
