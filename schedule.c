/* schedule.c: runs a pair's operations and its MoE's phases in the serialized or the overlapped order
 * (schedule.h), times every one, and chooses the experts' slot from those times (paper, "The
 * schedule that makes it fast").
 *
 * Overlap needs progress: OpenMPI moves a nonblocking collective only inside MPI calls, so while an
 * exchange or a gradient all-reduce is in flight the GEMMs are tiled and poll between tiles (POLL),
 * or the backend's progress thread tests it (THREAD). */
#include "schedule.h"
#include <stdlib.h>
#include <string.h>

int schedule_choose_slot(const double *ops, int n_ops, double t_disp, double t_exp, double t_comb) {
    double total = 0;
    for (int i = 0; i < n_ops; i++) total += ops[i];
    int best = 0;
    double best_t = 0, pre = 0;
    for (int K = 0; K <= n_ops; K++) {
        double post = total - pre;
        double t = (pre > t_disp ? pre : t_disp) + t_exp + (post > t_comb ? post : t_comb);
        if (K == 0 || t < best_t - 1e-12) { best = K; best_t = t; }
        if (K < n_ops) pre += ops[K];
    }
    return best;
}

scmoe_status schedule_init(schedule *s, scmoe_context *ctx, const scmoe_config *cfg, comm *replicas,
                           const sched_bucket *buckets) {
    memset(s, 0, sizeof *s);
    s->ctx = ctx;
    s->cfg = *cfg;
    s->shortcut = cfg->arch == SCMOE_ARCH_SCMOE;
    s->world = ctx->world;
    s->replicas = replicas;
    s->profile_n = -1;
    s->slot_f = s->slot_b = 0;
    memcpy(s->bucket, buckets, sizeof s->bucket);
    for (int i = 0; i < SCHED_OPS + 2; i++) s->req[i] = -2;
    return SCMOE_OK;
}

/* ---- the poll hook and the trace ---- */

typedef struct run_state {
    schedule *s;
    exec *ex;
    moe_layer *m;
    int dir;
    double last;   /* duration of the last exchange waited on */
} run_state;

static int grads_in_flight(const schedule *s) {
    for (int i = 0; i < SCHED_OPS + 2; i++)
        if (s->req[i] != -2) return 1;
    return 0;
}

/* Between GEMM tiles: the MoE's exchanges and the gradient all-reduces in flight, each where its
 * communicator's policy is POLL (a THREAD policy MPI cannot host falls back to POLL). */
static void poll_all(void *arg) {
    run_state *r = arg;
    moe_poll(r->m);
    if (r->s->world->progress == SCMOE_PROGRESS_POLL && grads_in_flight(r->s)) r->s->world->ops->progress(r->s->world);
}

static void event(schedule *s, int dir, const char *name, int kind, double t0, double t1) {
    if (s->n_ev[dir] < SCHED_MAX_EVENTS) s->ev[dir][s->n_ev[dir]++] = (sched_event){name, kind, t0, t1};
}

/* ---- trace: one JSON array of complete events ("ph":"X"), pid = rank, tid 0 compute, tid 1 token
 * exchanges, tid 2 the gradient all-reduce; ts in microseconds of CLOCK_MONOTONIC ---- */

scmoe_status schedule_trace_open(schedule *s, const char *path) {
    schedule_trace_close(s);
    if (!path) return SCMOE_OK;
    s->trace = fopen(path, "w");
    if (!s->trace) return scmoe_fail(s->ctx, SCMOE_ERR_IO, "cannot open the trace file %s", path);
    int r = s->world->rank;
    fprintf(s->trace, "[\n{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,\"args\":{\"name\":\"rank %d\"}},\n"
                      "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"name\":\"compute\"}},\n"
                      "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":1,\"args\":{\"name\":\"communication\"}},\n"
                      "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":2,\"args\":{\"name\":\"gradient all-reduce\"}}",
            r, r, r, r, r);
    return SCMOE_OK;
}

void schedule_trace_close(schedule *s) {
    if (!s->trace) return;
    fprintf(s->trace, "\n]\n");
    fclose(s->trace);
    s->trace = NULL;
}

static void trace_flush(schedule *s, int dir) {
    if (!s->trace) return;
    for (int i = 0; i < s->n_ev[dir]; i++) {
        const sched_event *e = &s->ev[dir][i];
        fprintf(s->trace, ",\n{\"name\":\"%s\",\"cat\":\"%s\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":%d,\"tid\":%d,"
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

/* On a device an operation is only enqueued: a profiled (serialized) step waits for each, so its times
 * are the device's and the slot is chosen from them; other steps run ahead while the host waits on MPI. */
static void timed_op(run_state *r, void (*run)(void *, int), void *arg, int i, double *t, const char *name) {
    double t0 = scmoe_now();
    run(arg, i);
    if (r->s->profile_left[r->dir] > 0) r->s->ctx->compute->sync(r->s->ctx->compute);
    double t1 = scmoe_now();
    t[i] = t1 - t0;
    event(r->s, r->dir, name, 0, t0, t1);
}

static const char *const fwd_names[SCHED_OPS] = {"ln_a0", "attn0", "ln_m0", "mlp0", "ln_a1", "attn1", "ln_m1", "shared_expert"};
static const char *const bwd_names[SCHED_OPS] = {"shared_expert_bwd", "ln_m1_bwd", "attn1_bwd", "ln_a1_bwd", "mlp0_bwd",
                                                 "ln_m0_bwd", "attn0_bwd", "ln_a0_bwd"};

/* The forward and the backward are profiled apart: each runs serialized for its first
 * SCHED_PROFILE_STEPS steps of a shape, timing its operations and exchanges standalone, then takes
 * the slot those times favour (or the configured one, clamped to the operations there are). */
static int profiling(schedule *s, int dir, int n) {
    if (dir == 0 && n != s->profile_n) {
        s->profile_n = n;
        s->profile_left[0] = s->profile_left[1] = SCHED_PROFILE_STEPS;
    }
    return s->profile_left[dir] > 0;
}

static void profiled(schedule *s, int dir, int n_ops) {
    if (s->profile_left[dir] <= 0 || --s->profile_left[dir] > 0) return;
    int *slot = dir ? &s->slot_b : &s->slot_f;
    if (s->cfg.expert_slot >= 0) *slot = s->cfg.expert_slot < n_ops ? s->cfg.expert_slot : n_ops;
    else if (dir == 0) *slot = schedule_choose_slot(s->t_f + (SCHED_OPS - n_ops), n_ops, s->t_disp, s->t_exp, s->t_comb);
    else *slot = schedule_choose_slot(s->t_b, n_ops, s->tb_disp, s->tb_exp, s->tb_comb);
}

scmoe_status schedule_forward(schedule *s, exec *ex, void (*run)(void *, int), void *arg, int gate_after,
                              sched_moe *mo, int n) {
    moe_layer *m = mo->m;
    run_state r = {s, ex, m, 0, 0};
    int serial = profiling(s, 0, n) || !s->cfg.overlap || !s->shortcut;
    int K = serial ? 0 : s->slot_f;
    double t_start = scmoe_now();
    s->n_ev[0] = 0;
    s->trace_step++;
    hook(&r, ex, m);
    scmoe_status st = SCMOE_OK;
    int experts_done = 0;
    for (int i = 0; i <= SCHED_OPS && !st; i++) {
        if (i == gate_after) {
            double t0 = scmoe_now();
            st = moe_gate_encode(m, ex, n, mo->x);
            if (!st) st = moe_dispatch_start(m);
            event(s, 0, "gate_encode", 0, t0, scmoe_now());
            if (!st && serial) { st = moe_dispatch_wait(m); s->t_disp = r.last; }
        }
        if (!st && i == gate_after + K && !experts_done) {
            double t0 = scmoe_now();
            st = moe_experts_forward(m, ex);
            double t1 = scmoe_now();
            event(s, 0, "experts", 0, t0, t1);
            s->expert[0] = t1 - t0;
            if (serial) s->t_exp = t1 - t0;
            if (!st && serial) { st = moe_combine_wait(m); s->t_comb = r.last; }
            experts_done = 1;
        }
        if (!st && i < SCHED_OPS) timed_op(&r, run, arg, i, s->t_f, fwd_names[i]);
    }
    if (!st) st = moe_combine_wait(m);
    hook(NULL, ex, m);
    s->comm_time[0] = m->comm_time;
    s->exposed[0] = m->exposed_time;
    if (st) return st;
    double t0 = scmoe_now();
    moe_decode(m, mo->y, 1.0f);
    event(s, 0, "decode", 0, t0, scmoe_now());
    s->slot_used[0] = serial ? -1 : K;
    s->time[0] = scmoe_now() - t_start;
    trace_flush(s, 0);
    profiled(s, 0, SCHED_OPS - gate_after);
    return SCMOE_OK;
}

static scmoe_status bucket_start(schedule *s, int b, comm *c) {
    if (!s->bucket[b].ptr || s->bucket[b].n <= 0 || c->size == 1) return SCMOE_OK;
    if (s->grad_t0 == 0) s->grad_t0 = scmoe_now();
    scmoe_status st = c->ops->allreduce_start(c, s->bucket[b].ptr, s->bucket[b].n, &s->req[b]);
    if (st) return scmoe_fail(s->ctx, st, "starting a gradient all-reduce failed: %s", c->err);
    return SCMOE_OK;
}

/* Finished buckets' all-reduces start once the MoE's last exchange of the step has landed: the
 * exchanges are on the critical path while the all-reduce only has to end before the optimizer
 * step, and over one link the two would split the bandwidth (a trace showed the gradient combine
 * slowed by a bucket started between the two exchanges). */
static scmoe_status buckets_flush(schedule *s, int exchanges_done) {
    scmoe_status st = SCMOE_OK;
    int synced = 0;
    for (int b = 0; b < SCHED_OPS + 2 && !st && exchanges_done; b++)
        if (s->ready[b]) {
            if (!synced++) s->ctx->compute->sync(s->ctx->compute); /* MPI reads what the device wrote */
            s->ready[b] = 0;
            st = bucket_start(s, b, b == SCHED_OPS + 1 ? s->replicas : s->world);
        }
    return st;
}

scmoe_status schedule_backward(schedule *s, exec *ex, void (*run)(void *, int), void *arg, int needed_before,
                               sched_moe *mo, const float *dy, int n) {
    moe_layer *m = mo->m;
    run_state r = {s, ex, m, 1, 0};
    int serial = profiling(s, 1, n) || !s->cfg.overlap || !s->shortcut;
    int K = serial ? 0 : s->slot_b;
    int early_grads = s->cfg.overlap; /* serialized runs reduce all gradients after backward */
    double t_start = scmoe_now();
    s->n_ev[1] = 0;
    s->grad_t0 = 0;
    hook(&r, ex, m);
    double t0 = scmoe_now();
    moe_decode_backward(m, dy);
    scmoe_status st = moe_dispatch_start(m);
    event(s, 1, "decode_bwd", 0, t0, scmoe_now());
    if (!st && serial) { st = moe_dispatch_wait(m); s->tb_disp = r.last; }
    int experts_done = 0;
    for (int i = 0; i <= SCHED_OPS && !st; i++) {
        if (i == K && !experts_done) {
            t0 = scmoe_now();
            st = moe_experts_backward(m, ex);
            double t1 = scmoe_now();
            event(s, 1, "experts_bwd", 0, t0, t1);
            s->expert[1] = t1 - t0;
            if (serial) s->tb_exp = t1 - t0;
            if (!st && serial) { st = moe_combine_wait(m); s->tb_comb = r.last; }
            s->ready[SCHED_OPS + 1] = early_grads;
            experts_done = 1;
        }
        if (!st && i == needed_before) {
            st = moe_combine_wait(m);
            t0 = scmoe_now();
            if (!st) moe_gate_backward(m, ex, mo->dx, 1.0f);
            event(s, 1, "gate_bwd", 0, t0, scmoe_now());
            s->ready[SCHED_OPS] = early_grads;
        }
        if (!st && i < SCHED_OPS) {
            timed_op(&r, run, arg, i, s->t_b, bwd_names[i]);
            s->ready[i] = early_grads;
        }
        if (!st) st = buckets_flush(s, i >= needed_before);
    }
    hook(NULL, ex, m);
    s->comm_time[1] = m->comm_time;
    s->exposed[1] = m->exposed_time;
    if (st) return st;
    if (!early_grads) /* serialized: every bucket after the backward */
        for (int b = 0; b < SCHED_OPS + 2; b++) s->ready[b] = 1;
    st = buckets_flush(s, 1);
    s->slot_used[1] = serial ? -1 : K;
    s->time[1] = scmoe_now() - t_start;
    trace_flush(s, 1);
    profiled(s, 1, needed_before);
    return st;
}

scmoe_status schedule_grad_wait(schedule *s) {
    /* one deadline for the whole sync, however many buckets; the first failure ends it */
    double t0 = scmoe_now(), deadline = t0 + s->world->timeout_s;
    scmoe_status st = SCMOE_OK;
    for (int b = 0; b < SCHED_OPS + 2 && !st; b++) {
        if (s->req[b] == -2) continue;
        comm *c = b == SCHED_OPS + 1 ? s->replicas : s->world;
        double full = c->timeout_s, left = deadline - scmoe_now();
        c->timeout_s = left > 1e-3 ? left : 1e-3;
        scmoe_status w = c->ops->wait(c, s->req[b]);
        c->timeout_s = full;
        if (w) st = scmoe_fail(s->ctx, w, "gradient all-reduce: %s", c->err);
        s->req[b] = -2;
    }
    double t1 = scmoe_now();
    if (s->grad_t0) event(s, 1, "grad_allreduce", 1, s->grad_t0, t1);
    if (s->trace && s->grad_t0 && s->n_ev[1] > 0) {
        const sched_event *e = &s->ev[1][s->n_ev[1] - 1];
        fprintf(s->trace, ",\n{\"name\":\"%s\",\"cat\":\"comm\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":%d,\"tid\":2,"
                          "\"args\":{\"step\":%ld,\"pass\":\"grad sync\"}}",
                e->name, e->t0 * 1e6, (e->t1 - e->t0) * 1e6, s->world->rank, s->trace_step);
    }
    s->grad_exposed = t1 - t0;
    s->grad_time = s->grad_t0 ? t1 - s->grad_t0 : 0;
    return st;
}

void schedule_fill_stats(const schedule *s, scmoe_stats *st, int which) {
    if (which == 2) {
        st->grad_sync_time = s->grad_time;
        st->grad_sync_exposed = s->grad_exposed;
        return;
    }
    double c = s->comm_time[which], ov = overlap_fraction(c, s->exposed[which]);
    if (which == 0) {
        st->fwd_time = s->time[0]; st->fwd_comm = c; st->fwd_exposed = s->exposed[0]; st->fwd_overlap = ov;
        st->fwd_expert = s->expert[0];
    } else {
        st->bwd_time = s->time[1]; st->bwd_comm = c; st->bwd_exposed = s->exposed[1]; st->bwd_overlap = ov;
        st->bwd_expert = s->expert[1];
        st->grad_sync_time = s->grad_time;
        st->grad_sync_exposed = s->grad_exposed;
    }
    st->expert_slot = s->slot_used[which];
}
