/* layer.c: the public MoE layer: one moe_layer run phase after phase. There is no other work to hide
 * an exchange behind (the block pair is where overlap happens) except, with pipeline_chunks, the
 * experts' own stages. */
#include "scmoe_internal.h"
#include <stdlib.h>
#include <string.h>

struct scmoe_moe {
    scmoe_context *ctx;
    param_table pt;
    moe_layer m;
    exec ex;
    float *xbuf;        /* the training forward's input, kept for backward (the backend's memory) */
    scmoe__calls calls; /* its place in the ranks' call sequence (scmoe__call_agree) */
};

scmoe_status scmoe_moe_create(scmoe_context *ctx, const scmoe_config *cfg, scmoe_moe **out) {
    if (!ctx || !out) return SCMOE_ERR_NULL;
    *out = NULL;
    scmoe__calls calls;
    scmoe_status s = scmoe__config_check(ctx, cfg, &calls);
    if (s) return s;
    scmoe_moe *o = calloc(1, sizeof *o);
    if (!o) s = scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory");
    if (!s) {
        o->ctx = ctx;
        o->calls = calls;
        ctx->objects++;
        o->ex = scmoe__context_exec(ctx, cfg);
        s = scmoe__moe_init(&o->m, ctx, cfg, cfg->top_k, &o->pt, "", 0.02f);
    }
    if (!s) {
        s = scmoe__params_allocate(&o->pt, ctx->compute, ctx->world->size > 1, o->m.replicas->size > 1);
        if (s) scmoe__fail(ctx, s, "out of memory for %zu parameters", o->pt.total);
    }
    if (!s) s = scmoe__precision_attach(ctx, cfg, &o->pt, &o->ex);
    if (!s) s = scmoe__moe_alloc(&o->m);
    if (!s) {
        o->xbuf =
            ctx->compute->alloc(ctx->compute, sizeof(float) * (size_t)cfg->max_tokens * cfg->d_model, COMPUTE_DEVICE);
        if (!o->xbuf) s = scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory for the input copy");
    }
    s = scmoe__status_agree(ctx, s);
    if (s) {
        scmoe_moe_destroy(o);
        return s;
    }
    *out = o;
    return SCMOE_OK;
}

static void moe_release(scmoe_moe *o, int abort) {
    /* an abort keeps what a pending exchange may write: the workspace and the staged gradients */
    int keep = abort && (scmoe__moe_pending(&o->m) || (o->ctx && o->ctx->world->ops->pending(o->ctx->world)));
    if (abort) scmoe__moe_abandon(&o->m, keep);
    else scmoe__moe_free(&o->m);
    if (keep) o->pt.stage = NULL;
    scmoe__params_free(&o->pt);
    if (o->ctx) {
        o->ctx->compute->release(o->ctx->compute, o->xbuf, COMPUTE_DEVICE);
        o->ctx->objects--;
    }
    free(o);
}

void scmoe_moe_destroy(scmoe_moe *o) {
    if (o) moe_release(o, o->ctx && o->ctx->broken);
}

void scmoe_moe_abort(scmoe_moe *o) {
    if (o) moe_release(o, 1);
}

scmoe_status scmoe_moe_set_training(scmoe_moe *o, int training) {
    if (!o) return SCMOE_ERR_NULL;
    o->m.training = training != 0;
    return SCMOE_OK;
}

/* dispatch, the experts (forward or backward, stage by stage), every combine: only a pipeline's own
 * stages overlap here, so the GEMMs poll the exchanges only then. */
static scmoe_status run_experts(scmoe_moe *o, scmoe_status (*experts)(moe_layer *, const exec *)) {
    moe_layer *m = &o->m;
    o->ex.poll = m->plan.n_stages > 1 ? scmoe__moe_poll : NULL;
    o->ex.poll_arg = m;
    scmoe_status s = scmoe__moe_dispatch_start(m);
    if (!s) s = experts(m, &o->ex);
    if (!s) s = scmoe__moe_combine_wait(m);
    o->ex.poll = NULL;
    return s;
}

scmoe_status scmoe_moe_forward(scmoe_moe *o, int n, const float *x, float *y, scmoe_stats *stats) {
    if (!o) return SCMOE_ERR_NULL;
    moe_layer *m = &o->m;
    double t0 = scmoe__now();
    scmoe__moe_bind_comms(m);
    m->forward_done = 0; /* a failed forward leaves nothing to differentiate */
    /* bad arguments still take part in gate_encode's first exchange, which fails every rank */
    const float *xin = x;
    if (n > 0 && n <= m->max_tokens && x && y) {
        o->ctx->compute->copy_rows(o->ctx->compute, o->xbuf, x, sizeof(float) * (size_t)n * m->d);
        xin = o->xbuf;
    } else if (n > 0 && !y) {
        xin = NULL;
    }
    scmoe_status s = scmoe__call_agree(o->ctx, &o->calls, SCMOE__CALL_FORWARD, m->training, SCMOE_OK);
    if (!s) s = scmoe__moe_gate_encode(m, &o->ex, n, xin);
    if (s) return s;
    s = run_experts(o, scmoe__moe_experts_forward);
    if (s) return s;
    scmoe__moe_decode(m, y, 0.0f);
    s = scmoe__context_device_check(o->ctx);
    if (s) {
        m->forward_done = 0;
        return s;
    }
    if (!m->training) m->forward_done = 0;
    if (stats) {
        memset(stats, 0, sizeof *stats);
        scmoe__moe_fill_stats(m, stats);
        stats->fwd_time = scmoe__now() - t0;
        stats->fwd_comm = m->comm_time;
        stats->fwd_exposed = m->exposed_time;
        stats->fwd_overlap = scmoe__overlap_fraction(m->comm_time, m->exposed_time);
        stats->expert_slot = -1;
    }
    return SCMOE_OK;
}

/* Sums this backward's gradients of replicated tensors over the ranks holding them. */
static scmoe_status sync_grads(scmoe_context *ctx, param_table *pt, comm *world, comm *replicas) {
    int rw = -1, rr = -1;
    scmoe_status s = SCMOE_OK;
    if (pt->stage_world) s = world->ops->allreduce_start(world, pt->stage, (int)pt->stage_world, &rw);
    if (!s && pt->stage_total > pt->stage_world)
        s = replicas->ops->allreduce_start(replicas, pt->stage + pt->stage_world,
                                           (int)(pt->stage_total - pt->stage_world), &rr);
    if (!s && pt->stage_world) s = world->ops->wait(world, rw);
    if (!s && pt->stage_total > pt->stage_world) s = replicas->ops->wait(replicas, rr);
    if (s) return scmoe__fail(ctx, s, "gradient all-reduce failed: %s", pt->stage_world ? world->err : replicas->err);
    scmoe__params_add_stage(pt);
    return SCMOE_OK;
}

scmoe_status scmoe_moe_backward(scmoe_moe *o, const float *dy, float *dx, scmoe_stats *stats) {
    if (!o) return SCMOE_ERR_NULL;
    moe_layer *m = &o->m;
    double t0 = scmoe__now();
    scmoe__moe_bind_comms(m);
    scmoe_status local = SCMOE_OK;
    if (!m->forward_done || !m->training)
        local = scmoe__fail(o->ctx, SCMOE_ERR_STATE, "backward needs a training forward first");
    else if (m->n > 0 && (!dy || !dx)) local = scmoe__fail(o->ctx, SCMOE_ERR_NULL, "dy or dx is NULL");
    else if (m->cfg.check_finite && m->n > 0 &&
             o->ctx->compute->has_nonfinite(o->ctx->compute, dy, (size_t)m->n * m->d))
        local = scmoe__fail(o->ctx, SCMOE_ERR_NONFINITE, "dy holds NaN or Inf");
    scmoe_status s = scmoe__call_agree(o->ctx, &o->calls, SCMOE__CALL_BACKWARD, m->training, local);
    if (s) return s;
    m->forward_done = 0; /* one backward per forward: a second would add every gradient again */
    scmoe__params_zero_stage(&o->pt);
    scmoe__moe_decode_backward(m, dy);
    s = run_experts(o, scmoe__moe_experts_backward);
    if (s) return s;
    scmoe__moe_gate_backward(m, &o->ex, dx, 0.0f);
    scmoe__params_stage_ready(&o->pt); /* MPI sums the staged gradients the kernels wrote */
    double ts = scmoe__now();
    s = sync_grads(o->ctx, &o->pt, o->ctx->world, m->replicas);
    if (!s) s = scmoe__context_device_check(o->ctx);
    if (s) return s;
    if (stats) {
        scmoe__moe_fill_stats(m, stats);
        stats->bwd_time = scmoe__now() - t0;
        stats->bwd_comm = m->comm_time;
        stats->bwd_exposed = m->exposed_time;
        stats->bwd_overlap = scmoe__overlap_fraction(m->comm_time, m->exposed_time);
        stats->grad_sync_time = stats->grad_sync_exposed = scmoe__now() - ts;
    }
    return SCMOE_OK;
}

scmoe_status scmoe_moe_params_changed(scmoe_moe *o) {
    if (!o) return SCMOE_ERR_NULL;
    scmoe__precision_refresh(&o->pt);
    return SCMOE_OK;
}

scmoe_status scmoe_moe_zero_grad(scmoe_moe *o) {
    if (!o) return SCMOE_ERR_NULL;
    scmoe__params_zero_grad(&o->pt);
    return SCMOE_OK;
}

int scmoe_moe_param_count(const scmoe_moe *o) { return o ? o->pt.n : 0; }

scmoe_status scmoe_moe_param_at(const scmoe_moe *o, int i, scmoe_tensor *t) {
    return o ? scmoe__params_at(&o->pt, i, t) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_moe_param(const scmoe_moe *o, const char *name, scmoe_tensor *t) {
    return o ? scmoe__params_named(o->ctx, &o->pt, name, t) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_moe_set_loss_weights(scmoe_moe *o, float aux, float z) {
    return o ? scmoe__moe_set_loss_weights(&o->m, aux, z) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_moe_set_name_prefix(scmoe_moe *o, const char *prefix) {
    return o && prefix ? scmoe__params_set_prefix(o->ctx, &o->pt, prefix) : SCMOE_ERR_NULL;
}

scmoe_status scmoe_moe_expert_range(const scmoe_moe *o, int *first, int *count) {
    if (!o || !first || !count) return SCMOE_ERR_NULL;
    *first = o->m.first_expert;
    *count = o->m.E_local;
    return SCMOE_OK;
}

scmoe_status scmoe_moe_noise_state(const scmoe_moe *o, uint64_t *state) {
    if (!o || !state) return SCMOE_ERR_NULL;
    *state = o->m.step;
    return SCMOE_OK;
}

scmoe_status scmoe_moe_set_noise_state(scmoe_moe *o, uint64_t state) {
    if (!o) return SCMOE_ERR_NULL;
    o->m.step = state;
    return SCMOE_OK;
}
