/* moe_exchange.c: the MoE layer's exchanges in flight: the token exchanges (a stage's dispatch or
 * combine, nonblocking all-to-alls over the expert-parallel group) and the small collectives of the
 * routing (moe_gate_encode.c), each an inflight record: started, tested at the schedule's polls,
 * waited for (the time it ran and the time the caller waited, for the overlap statistics). On a device
 * whose MPI reads host memory the token rows cross through mapped mirrors (below). */
#include "scmoe_internal.h"

void scmoe__moe_inflight_begin(inflight *f, comm *c) {
    f->c = c;
    f->t_start = scmoe__now();
    f->t_done = 0;
    f->t_waited = 0;
    f->unpack_to = NULL;
    f->copy_to = NULL;
    f->held = 0;
}

/* ---- cuda (issue 19): the token exchanges' mapped mirrors (moe_exchange.send_m). With more than one rank
 * and an MPI that reads host memory, the kernels pack, permute and decode rows in device memory and only
 * the peer blocks an exchange moves cross PCIe, each in one cudaMemcpyAsync on the copy stream: out
 * before MPI starts (the host waits for those copies, not for the compute stream), in once MPI has
 * landed them (the kernels after wait for it, the host does not). My own block never leaves the device. */
int scmoe__moe_exchange_mirrored(const moe_layer *m) {
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

/* ---- the exchanges: started, tested, waited for ---- */

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
    scmoe__moe_inflight_begin(f, c);
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
    } else if (scmoe__moe_exchange_mirrored(m)) { /* MPI's mapped mirrors: the peer blocks copied out first */
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

void scmoe__moe_inflight_test(inflight *f) {
    int done = 0;
    if (f->active && !f->held && !f->t_done && f->c->ops->test(f->c, f->req, &done) == SCMOE_OK && done)
        f->t_done = scmoe__now();
}

void scmoe__moe_release(moe_layer *m) {
    for (int s = 0; s < m->plan.n_stages && !m->xch.deferred; s++) { /* in the order they started */
        m->xch.deferred = exchange_release(m, &m->xch.xd[s], 0);
        if (!m->xch.deferred) m->xch.deferred = exchange_release(m, &m->xch.xc[s], 0);
    }
}

scmoe_status scmoe__moe_inflight_wait(moe_layer *m, inflight *f, const char *what) {
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
