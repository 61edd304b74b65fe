/* moe_gate_encode.c: the MoE layer's first phase, gate_encode (moe.c runs the exchanges and experts
 * that follow): the gate over my tokens, then the route plan over the ranks in one of four ways, and
 * the small collectives each needs, started here and finished where the first dispatch starts:
 *
 *   capacity LOCAL (per source rank)   my plan from my tokens alone; per-expert counts to my group
 *                                      (one small all-to-all) and the statistics (one all-reduce)
 *   GLOBAL, TOKEN priority             my token count scanned over the ranks, then my per-(round,
 *                                      expert) counts (route.c: my places in the global batch follow
 *                                      from their prefix and total), then LOCAL's counts message
 *   GLOBAL, BATCH priority             the token count's scan, then a selection over the ranks of the
 *                                      assignments each (round, expert) keeps (route_batch.c: a few
 *                                      histograms all-reduced), then LOCAL's counts message
 *   planned on the device (droute)     LOCAL or GLOBAL TOKEN with the gate's outputs left on the device:
 *                                      its kernels plan, only the counts cross (issue 19)
 *
 * Every rank says whether its input is bad before any exchange of the forward, so all agree on one
 * status. The plan then goes to moe.c (scmoe__moe_plan_ready); the dispatch asks here whether what it
 * needs has landed (scmoe__moe_route_landed, _poll, _finish). */
#include "scmoe_internal.h"
#include <stdio.h>
#include <string.h>

/* the device's plan and the round counts' scan, below: LOCAL's and the device's paths start them */
static void droute_start(moe_layer *m, const exec *ex, int n, const float *x, int64_t offset, int64_t capacity);
static scmoe_status gscan_start(moe_layer *m);
static scmoe_status gscan_check(moe_layer *m, int wait);
static scmoe_status select_round(moe_layer *m);

/* C over a batch of S tokens, with the capacity factor of the mode (training or evaluation) */
static int64_t batch_capacity(const moe_layer *m, int64_t S) {
    return scmoe__route_capacity(S, m->E, m->k, m->training ? m->cfg.capacity_factor : m->cfg.eval_capacity_factor);
}

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
scmoe_status scmoe__moe_stats_finish(moe_layer *m) {
    if (!m->lcap.stats_pending) return SCMOE_OK;
    m->lcap.stats_pending = 0;
    scmoe_status st = scmoe__moe_inflight_wait(m, &m->lcap.xstats, "gate_stats");
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
        st = scmoe__moe_inflight_wait(m, &m->gcount.xscan, "route_scan");
        scmoe_status s2 = scmoe__moe_inflight_wait(m, &m->gcount.xsum, "gate_stats");
        if (!st) st = s2;
    }
    if (m->lcap.stats_pending) {
        m->lcap.stats_pending = 0;
        st = scmoe__moe_inflight_wait(m, &m->lcap.xstats, "gate_stats");
    }
    if (!st && m->lcap.counts_pending) {
        m->lcap.counts_pending = 0;
        st = scmoe__moe_inflight_wait(m, &m->lcap.xcount, "route_counts");
    }
    return st;
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
        m->plan.capacity = batch_capacity(m, n);
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
        scmoe__route_plan_local_send(pl, m->route_work, m->records, n, m->ep_size, E, k, m->cfg.priority,
                                     batch_capacity(m, n), m->lcap.counts_out);
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
    scmoe__moe_inflight_begin(&m->lcap.xcount, ep);
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
    scmoe__moe_inflight_begin(&m->lcap.xstats, w);
    scmoe_status st = w->ops->allreduce_f64_start(w, m->lcap.lstats, MOE_LSTATS(m->E), &req);
    if ((st = small_start(m, &m->lcap.xstats, w, st, req))) return st;
    m->lcap.stats_pending = 1;
    return counts_start(m);
}

/* Waits for the counts: unless a rank of my group rejected its input (then every rank of it takes the
 * agreed status from the statistics, and none dispatches), the receive side of the plan, then the
 * rest of encode (on the host my rows were packed while the counts travelled). */
static scmoe_status counts_finish(moe_layer *m) {
    m->lcap.counts_pending = 0;
    scmoe_status st = scmoe__moe_inflight_wait(m, &m->lcap.xcount, "route_counts");
    if (st) return st;
    int msg = 1 + m->E_local * m->k, group_bad = 0;
    for (int p = 0; p < m->ep_size; p++) group_bad |= m->lcap.counts_in[(size_t)p * msg] != 0;
    if (group_bad) {
        st = scmoe__moe_stats_finish(m);
        return st ? st : scmoe__fail(m->ctx, SCMOE_ERR_STATE, "a rank's input status was lost");
    }
    scmoe__route_plan_local_recv(&m->plan, m->lcap.counts_in, m->ep_size, m->ep_rank, m->E_local, m->k,
                                 m->cfg.pipeline_chunks);
    scmoe__moe_plan_ready(m, !m->co->device || m->droute.on);
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
        if ((st = scmoe__moe_inflight_wait(m, &m->lcap.xcount, "route_counts"))) return st;
        scmoe__moe_stats_finish(m);
        return input_fail(m, local, n);
    }
    if (!m->co->device) m->co->pack_rows(m->co, m->xch.send, x, m->plan.slot, n, m->k, m->d);
    return SCMOE_OK;
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
    if (m->local_cap) co->pack_rows(co, m->xch.send, x, m->plan_d.slot, n, m->k, m->d);
    m->droute.pending = 1;
}

static scmoe_status droute_land(moe_layer *m) {
    int E = m->E, k = m->k, msg = 1 + m->E_local * k, n = m->n;
    route_plan *pl = &m->plan;
    double *ls = m->lcap.lstats;
    m->droute.pending = 0;
    if (!m->local_cap) return gscan_start(m);
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

/* ---- capacity over the global batch (GLOBAL): counts, not records (route.c, route_batch.c) ----
 *
 * Two exclusive scans with sums over the world (comm scan_i64_start), O(k E) int64s a rank whatever P.
 * The first, of my token count and input status, is waited for before the gate: the gate's noise is
 * keyed by my first token's global index (its prefix), and no rank may go on to a collective another
 * has left. With TOKEN priority the second, of my round counts mine[j, e] = my tokens' j-th
 * choices of e (the host's from my records; planned on the device, the counts message of the
 * dropless first half, droute_start with capacity INT64_MAX, whose slots are my rows among my own
 * assignments), is left in flight with gsum's all-reduce (aux_scope GLOBAL) from the gate's phase on,
 * so in a pair they travel behind the dense operations the schedule runs next (gscan_start). Once they
 * are in (gscan_check: a poll, at the latest where the first dispatch starts), the plan: on the host
 * scmoe__route_plan_global_send; on the device scmoe__route_plan_global_counts (the same statistics,
 * send side and counts message, from the counts alone) and the bases, which go down in one
 * stream-ordered copy to the slots' second half (compute_ops.route_global), my rows packed after it.
 * Then the losses and LOCAL's counts message to the group (counts_finish builds the receive side).
 * What crosses on a device: the summary up (written by the kernel, no wait), k E + 1 int64s and
 * aux_coef down, in stream order.
 *
 * With BATCH priority the second scan gives way to route_batch.c's selection, its rounds in flight one
 * after the other in xscan from the gate's phase on as the scan is (gscan_phase): a histogram of every
 * pair's keys (whose sums are the totals), the undecided pairs' next digits while some are open, the
 * ties' scan where equal scores straddle a threshold; each poll that finds one landed starts the next
 * (select_next), so in a pair they too travel behind the dense operations. Then
 * scmoe__route_plan_batch_send and the rest as above. Planned on the host (the selection reads the
 * scores); a device copies the gate's outputs up, as before. */

/* Every rank says how many tokens it has and whether its input is bad, counted per status: no rank
 * enters an exchange that another has left, and every rank returns the same status, the largest any
 * rank reported (as LOCAL's statistics). *S: the global batch, *offset: where my tokens start in it. */
static scmoe_status agree_token_scan(moe_layer *m, int n, scmoe_status local, int64_t *S, int64_t *offset) {
    comm *w = m->ctx->world;
    int64_t *in = m->gcount.agree, *pre = in + MOE_AGREE, *tot = pre + MOE_AGREE;
    in[0] = local ? 0 : n;
    for (int i = 0; i < 3; i++) in[1 + i] = local == input_errors[i];
    int req = -1;
    scmoe_status s = w->ops->scan_i64_start(w, in, pre, MOE_AGREE, tot + MOE_AGREE, &req);
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

static scmoe_status gscan_start(moe_layer *m) {
    comm *w = m->ctx->world;
    int E = m->E, k = m->k, El = m->E_local, msg = 1 + El * k, kE = k * E, req = -1;
    int64_t *mine = m->gcount.counts, *prefix = mine + kE;
    if (m->droute.on) { /* the dropless first half's counts message: my round counts */
        for (int j = 0; j < k; j++)
            for (int e = 0; e < E; e++)
                mine[(size_t)j * E + e] = m->lcap.counts_out[(size_t)(e / El) * msg + 1 + (e % El) * k + j];
        memcpy(m->gsum, m->droute.gsum, sizeof(double) * (E + 1));
    } else {
        scmoe__route_round_counts(mine, m->records, m->n, E, k);
        gate_sums(m, m->n);
    }
    for (int e = 0; e < E; e++) m->top1_count[e] = mine[e]; /* round 0: aux_scope LOCAL's top-1 counts */
    scmoe_status st;
    m->gcount.scanning = 1;
    m->gcount.xsum.active = 0;
    /* BATCH priority with a capacity: the selection, whose first histogram gives the totals; dropless it
     * is TOKEN (the same rows in the same places) */
    m->gcount.select = m->cfg.priority == SCMOE_PRIORITY_BATCH && m->plan.capacity != INT64_MAX;
    if (m->gcount.select) {
        scmoe__route_select_begin(&m->gcount.sel, E, k);
        st = select_round(m);
    } else {
        m->gcount.phase = GSCAN_COUNTS;
        scmoe__moe_inflight_begin(&m->gcount.xscan, w);
        st = w->ops->scan_i64_start(w, mine, prefix, kE, prefix + 2 * kE, &req);
        st = small_start(m, &m->gcount.xscan, w, st, req);
    }
    if (st) return st;
    if (m->cfg.aux_scope == SCMOE_AUX_GLOBAL && w->size > 1) {
        scmoe__moe_inflight_begin(&m->gcount.xsum, w);
        st = w->ops->allreduce_f64_start(w, m->gsum, E + 1, &req);
        if ((st = small_start(m, &m->gcount.xsum, w, st, req))) return st;
    }
    return SCMOE_OK;
}

static int landed(inflight *f) {
    scmoe__moe_inflight_test(f);
    return f->t_done != 0;
}

/* BATCH priority: my histogram of the selection's round, its all-reduce started into xscan */
static scmoe_status select_round(moe_layer *m) {
    moe_global_counts *g = &m->gcount;
    comm *w = m->ctx->world;
    int req = -1;
    g->phase = GSCAN_HISTOGRAM;
    scmoe__route_select_histogram(&g->sel, g->hist, m->records, m->n, m->E, m->k);
    scmoe__moe_inflight_begin(&g->xscan, w);
    scmoe_status st = w->ops->allreduce_f64_start(w, g->hist, g->sel.n_open << g->sel.bits, &req);
    return small_start(m, &g->xscan, w, st, req);
}

/* BATCH priority, once the selection's collective in xscan has landed: the histogram folded in, then
 * the next round while pairs are open, then the ties' scan if a pair keeps its keys equal to the
 * threshold in part, else done. Every rank takes the same steps (they follow from the same sums). */
static scmoe_status select_next(moe_layer *m) {
    moe_global_counts *g = &m->gcount;
    comm *w = m->ctx->world;
    route_select *s = &g->sel;
    int E = m->E, k = m->k, kE = k * E, req = -1;
    if (g->phase == GSCAN_HISTOGRAM) {
        int open = scmoe__route_select_step(s, g->hist, E, k, m->plan.capacity, g->counts + 2 * kE);
        if (open < 0)
            return scmoe__fail(m->ctx, SCMOE_ERR_COMM,
                               "the routing histograms do not hold the keys they counted: the ranks are out of step");
        if (open > 0) return select_round(m);
        if (s->n_ties > 0) {
            g->phase = GSCAN_TIES;
            scmoe__route_select_ties(s, g->ties, m->records, m->n, E, k);
            scmoe__moe_inflight_begin(&g->xscan, w);
            scmoe_status st = w->ops->scan_i64_start(w, g->ties, g->ties + kE, kE, g->ties + 3 * kE, &req);
            return small_start(m, &g->xscan, w, st, req);
        }
    }
    g->phase = GSCAN_DONE;
    return SCMOE_OK;
}

/* my send side from the counts' scan (and with BATCH priority the selection) */
static void gscan_plan(moe_layer *m) {
    int E = m->E, k = m->k, kE = k * E;
    int64_t *mine = m->gcount.counts, *prefix = mine + kE, *total = prefix + kE, S = m->gcount.S;
    route_plan *pl = &m->plan;
    if (m->gcount.select)
        scmoe__route_plan_batch_send(pl, m->records, m->n, m->ep_size, E, k, &m->gcount.sel,
                                     m->gcount.sel.n_ties ? m->gcount.ties + kE : NULL, m->gcount.ties + 2 * kE, total,
                                     S, pl->capacity, m->lcap.counts_out);
    else if (m->droute.on)
        scmoe__route_plan_global_counts(pl, mine, prefix, total, m->ep_size, E, k, S, pl->capacity, m->lcap.counts_out,
                                        m->droute.base_h);
    else
        scmoe__route_plan_global_send(pl, m->route_work, m->records, m->n, m->ep_size, E, k, prefix, total, S,
                                      pl->capacity, m->lcap.counts_out);
}

/* Whatever of the plan has landed folded in (with wait: all of it): the scan, the selection's rounds
 * (BATCH), the sums; then the plan, the losses, the slots' second half and the pack enqueued, the
 * counts message started. */
static scmoe_status gscan_check(moe_layer *m, int wait) {
    moe_global_counts *g = &m->gcount;
    while (g->scanning && g->phase != GSCAN_DONE) { /* xscan holds the plan's collective in flight */
        if (!wait && !landed(&g->xscan)) return SCMOE_OK;
        scmoe_status st =
            scmoe__moe_inflight_wait(m, &g->xscan, g->phase == GSCAN_HISTOGRAM ? "route_select" : "route_scan");
        if (!st && m->gcount.select) st = select_next(m);
        else g->phase = GSCAN_DONE;
        if (st) {
            g->scanning = 0;
            return st;
        }
    }
    if (!g->scanning) return SCMOE_OK;
    if (!wait && g->xsum.active && !landed(&g->xsum)) return SCMOE_OK;
    g->scanning = 0;
    scmoe_status st = scmoe__moe_inflight_wait(m, &g->xsum, "gate_stats");
    if (st) return st;
    int E = m->E, k = m->k, kE = k * E, msg = 1 + m->E_local * k, global = m->cfg.aux_scope == SCMOE_AUX_GLOBAL;
    int64_t *total = g->counts + 2 * kE, S = g->S;
    const compute_ops *co = m->co;
    gscan_plan(m);
    for (int q = 0; q < m->ep_size; q++) m->lcap.counts_out[(size_t)q * msg] = SCMOE_OK; /* agreed already */
    if (global) memcpy(m->top1_count, total, sizeof(int64_t) * E); /* round 0 is the top-1 choice */
    gate_losses(m, global ? S : m->n, global ? 1.0 : 1.0 / m->ctx->world->size);
    if (m->droute.on) { /* aux_coef and the bases down, the slots' second half, my rows packed */
        co->copy_rows(co, m->plan_d.aux_coef, m->aux_coef_h, sizeof(float) * E);
        co->copy_rows(co, m->droute.base, m->droute.base_h, sizeof(int64_t) * ((size_t)kE + 1));
        route_job j = droute_job(m, INT64_MAX);
        co->route_global(co, &j, m->droute.base);
        co->pack_rows(co, m->xch.send, m->x, m->plan_d.slot, m->n, k, m->d);
    } else if (!co->device) { /* on a device the plan goes down first (scmoe__moe_plan_ready packs) */
        co->pack_rows(co, m->xch.send, m->x, m->plan.slot, m->n, k, m->d);
    }
    return counts_start(m);
}

/* token counts agreed -> gate -> (the device: the plan's first half) -> the round counts' scan started;
 * the plan, the losses, the pack and the counts message once it is in (gscan_check) */
static scmoe_status gate_encode_counts(moe_layer *m, const exec *ex, int n, const float *x, scmoe_status local) {
    int64_t S = 0, offset = 0;
    scmoe_status st = local_leftovers(m); /* a failed forward's counts message */
    if (!st) st = agree_token_scan(m, n, local, &S, &offset);
    if (st) return st;
    m->gcount.S = S;
    m->plan.capacity = batch_capacity(m, S);
    if (m->droute.on) { /* the plan's first half on the device; its summary starts the scan (gscan_start) */
        droute_start(m, ex, n, x, offset, INT64_MAX);
        return SCMOE_OK;
    }
    m->n = n;
    m->x = x;
    gate_run(m, ex, n, x, offset);
    return gscan_start(m);
}

scmoe_status scmoe__moe_gate_encode(moe_layer *m, const exec *ex, int n, const float *x) {
    m->xch.next_dispatch = MOE_MAX_STAGES; /* nothing for a poll to chain until this step's dispatch starts */
    m->comm_time = m->exposed_time = 0;
    scmoe_status local = input_status(m, n, x);
    if (m->local_cap) return gate_encode_local(m, ex, n, x, local);
    return gate_encode_counts(m, ex, n, x, local);
}

/* The plan's stages as exchanges, then (on a device: aux_coef, slot and recv_to_expert in one copy,
 * plan_mirror; planned on the device: recv_to_expert alone, in stream order) my rows packed by
 * destination unless packed already, the experts' prefetch. */
void scmoe__moe_plan_ready(moe_layer *m, int packed) {
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
    if (m->off.slots) scmoe__moe_experts_prefetch(m);
    m->forward_done = 0;
    m->pass = 0;
}

/* ---- what the first dispatch needs, asked by moe.c ---- */

/* at a poll: folds in what has landed (the device's summary, the counts' scan), notes the counts */
scmoe_status scmoe__moe_route_poll(moe_layer *m) {
    scmoe_status st = droute_check(m, 0);
    if (m->lcap.counts_pending) scmoe__moe_inflight_test(&m->lcap.xcount);
    return st;
}

/* 1 once the plan's receive side can be built without waiting */
int scmoe__moe_route_landed(const moe_layer *m) {
    return !m->droute.pending && !m->gcount.scanning && !(m->lcap.counts_pending && !m->lcap.xcount.t_done);
}

/* waits for whatever the plan still needs, then builds its receive side (scmoe__moe_plan_ready) */
scmoe_status scmoe__moe_route_finish(moe_layer *m) {
    scmoe_status st = droute_check(m, 1);
    if (!st && m->lcap.counts_pending) st = counts_finish(m);
    return st;
}
