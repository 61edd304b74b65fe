/* scmoe.c: the portable core's common ground: configuration, statuses, the context, the parameter
 * table. The layer lives in moe.c, the block pair in pair.c, the overlap schedule in schedule.c. */
#include "scmoe_internal.h"
#include "schedule.h"         /* SCHED_MAX_OPS bounds expert_slot */
#include "kernels/gate_row.h" /* the counter-based normal of parameter inits */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

scmoe_config scmoe_config_default(void) {
    scmoe_config c;
    memset(&c, 0, sizeof c);
    c.d_model = 64;
    c.d_hidden = 256;
    c.n_experts = 8;
    c.top_k = 1;
    c.max_tokens = 1024;
    c.capacity_factor = 2.0f;
    c.eval_capacity_factor = 2.0f;
    c.priority = SCMOE_PRIORITY_TOKEN;
    c.capacity_scope = SCMOE_CAPACITY_GLOBAL;
    c.renormalize = 1;
    c.aux_loss_weight = 0.01f;
    c.z_loss_weight = 0.0f;
    c.aux_scope = SCMOE_AUX_GLOBAL;
    c.gate_noise_std = 0.0f;
    c.seed = 1234;
    c.activation = SCMOE_GELU;
    c.check_finite = 0;
    c.arch = SCMOE_ARCH_SCMOE;
    c.shortcut_pos = 2;
    c.combine = SCMOE_COMBINE_CG1;
    c.n_heads = 4;
    c.max_seq_len = 256;
    c.causal = 1;
    c.n_layers = 2;
    c.ep_size = 0;
    c.progress = SCMOE_PROGRESS_POLL;
    c.poll_cols = 0;
    c.poll_us = 1000.0;
    c.overlap = 1;
    c.expert_slot = -1;
    c.overlap_grad_sync = 0;
    c.comm_timeout_s = 600.0;
    c.wire_bf16 = 0;
    c.pipeline_chunks = 0;
    c.precision = SCMOE_PRECISION_FP32;
    c.grad_sync_bf16 = 0;
    /* AUTO, by measurement (docs/scaling.md, "The gradient sum's algorithm on train_lm"): the two rounds
     * send the ring's 2 (P-1)/P of a bucket where OpenMPI's default tree sends 2 log2 P copies, without an
     * mpirun flag, and give the same bits on every rank in rank order; on 2 emulated hosts (160 Mbit/s)
     * train_lm's median step took 829 ms (TWO_ROUND) and 1,214 (AUTO) against 1,178 with libnbc's ring
     * and 1,837 with its tree (least steps 687, 656, 717, 990; loaded machine). The small buckets stay on
     * MPI's tree, whose 2 log2 P messages beat the two rounds' 2 (P-1) tiny ones at scale
     * (comm_two_round_pays). At 2 ranks the sums are bitwise MPI's; from 3 on, the dense gradients are
     * summed in rank order instead of MPI's order. */
    c.grad_sync_algo = SCMOE_GRAD_SYNC_AUTO;
    return c;
}

static scmoe_status bad(char *msg, size_t len, scmoe_status s, const char *fmt, ...) {
    if (msg && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, len, fmt, ap);
        va_end(ap);
    }
    return s;
}

static int is_flag(int v) { return v == 0 || v == 1; }

scmoe_status scmoe_config_validate(const scmoe_config *c, char *msg, size_t len) {
    if (msg && len) msg[0] = '\0';
    if (!c) return bad(msg, len, SCMOE_ERR_NULL, "config is NULL");
    if (c->d_model < 1 || c->d_model > (1 << 20))
        return bad(msg, len, SCMOE_ERR_D_MODEL, "d_model = %d: must be in 1..2^20", c->d_model);
    if (c->d_hidden < 1 || c->d_hidden > (1 << 22))
        return bad(msg, len, SCMOE_ERR_D_HIDDEN, "d_hidden = %d: must be in 1..2^22", c->d_hidden);
    if (c->n_experts < 1 || c->n_experts > 4096)
        return bad(msg, len, SCMOE_ERR_N_EXPERTS, "n_experts = %d: must be in 1..4096", c->n_experts);
    if (c->top_k < 1 || c->top_k > c->n_experts)
        return bad(msg, len, SCMOE_ERR_TOP_K, "top_k = %d: must be in 1..n_experts (%d)", c->top_k, c->n_experts);
    /* above E, every token fits anyway; the bound keeps the slot arithmetic in range */
    if (!isfinite(c->capacity_factor) || c->capacity_factor > 1e4f)
        return bad(msg, len, SCMOE_ERR_CAPACITY, "capacity_factor = %g: must be finite and <= 1e4 (<= 0: dropless)",
                   c->capacity_factor);
    if (!isfinite(c->eval_capacity_factor) || c->eval_capacity_factor > 1e4f)
        return bad(msg, len, SCMOE_ERR_CAPACITY,
                   "eval_capacity_factor = %g: must be finite and <= 1e4 (<= 0: dropless)", c->eval_capacity_factor);
    if (!isfinite(c->aux_loss_weight) || c->aux_loss_weight < 0)
        return bad(msg, len, SCMOE_ERR_LOSS_WEIGHT, "aux_loss_weight = %g: must be finite and >= 0",
                   c->aux_loss_weight);
    if (!isfinite(c->z_loss_weight) || c->z_loss_weight < 0)
        return bad(msg, len, SCMOE_ERR_LOSS_WEIGHT, "z_loss_weight = %g: must be finite and >= 0", c->z_loss_weight);
    if (c->aux_scope != SCMOE_AUX_GLOBAL && c->aux_scope != SCMOE_AUX_LOCAL)
        return bad(msg, len, SCMOE_ERR_OPTION, "aux_scope = %d: must be GLOBAL or LOCAL", (int)c->aux_scope);
    if (!isfinite(c->gate_noise_std) || c->gate_noise_std < 0)
        return bad(msg, len, SCMOE_ERR_NOISE, "gate_noise_std = %g: must be finite and >= 0", c->gate_noise_std);
    if (c->activation != SCMOE_GELU && c->activation != SCMOE_SWIGLU)
        return bad(msg, len, SCMOE_ERR_ACTIVATION, "activation = %d: must be GELU or SWIGLU", (int)c->activation);
    if (c->priority != SCMOE_PRIORITY_TOKEN && c->priority != SCMOE_PRIORITY_BATCH)
        return bad(msg, len, SCMOE_ERR_PRIORITY, "priority = %d: must be TOKEN or BATCH", (int)c->priority);
    if (c->capacity_scope != SCMOE_CAPACITY_GLOBAL && c->capacity_scope != SCMOE_CAPACITY_LOCAL)
        return bad(msg, len, SCMOE_ERR_OPTION, "capacity_scope = %d: must be GLOBAL or LOCAL", (int)c->capacity_scope);
    if (!is_flag(c->renormalize))
        return bad(msg, len, SCMOE_ERR_OPTION, "renormalize = %d: must be 0 or 1", c->renormalize);
    if (!is_flag(c->check_finite))
        return bad(msg, len, SCMOE_ERR_OPTION, "check_finite = %d: must be 0 or 1", c->check_finite);
    if (c->max_tokens < 1 || c->max_tokens > (1 << 24))
        return bad(msg, len, SCMOE_ERR_MAX_TOKENS, "max_tokens = %d: must be in 1..2^24", c->max_tokens);
    if (c->arch < SCMOE_ARCH_TOP2 || c->arch > SCMOE_ARCH_SCMOE)
        return bad(msg, len, SCMOE_ERR_ARCH, "arch = %d: must be TOP2, TOP1, SHARED or SCMOE", (int)c->arch);
    if (c->arch == SCMOE_ARCH_TOP2 && c->n_experts < 2)
        return bad(msg, len, SCMOE_ERR_N_EXPERTS, "arch TOP2 needs n_experts >= 2");
    if (c->shortcut_pos < 1 || c->shortcut_pos > 3)
        return bad(msg, len, SCMOE_ERR_SHORTCUT_POS, "shortcut_pos = %d: must be 1, 2 or 3", c->shortcut_pos);
    if (c->combine != SCMOE_COMBINE_CG1 && c->combine != SCMOE_COMBINE_ADD)
        return bad(msg, len, SCMOE_ERR_COMBINE, "combine = %d: must be CG1 or ADD", (int)c->combine);
    if (c->n_heads < 1 || c->d_model % c->n_heads != 0)
        return bad(msg, len, SCMOE_ERR_N_HEADS, "n_heads = %d: must be >= 1 and divide d_model (%d)", c->n_heads,
                   c->d_model);
    if (c->max_seq_len < 1 || c->max_seq_len > (1 << 20))
        return bad(msg, len, SCMOE_ERR_SEQ_LEN, "max_seq_len = %d: must be in 1..2^20", c->max_seq_len);
    if (!is_flag(c->causal)) return bad(msg, len, SCMOE_ERR_OPTION, "causal = %d: must be 0 or 1", c->causal);
    if (c->n_layers < 1) return bad(msg, len, SCMOE_ERR_N_LAYERS, "n_layers = %d: must be >= 1", c->n_layers);
    if (c->ep_size < 0 || (c->ep_size > 0 && c->n_experts % c->ep_size != 0))
        return bad(msg, len, SCMOE_ERR_EP_SIZE, "ep_size = %d: must be 0 (all ranks) or divide n_experts (%d)",
                   c->ep_size, c->n_experts);
    if (c->progress < SCMOE_PROGRESS_POLL || c->progress > SCMOE_PROGRESS_NONE)
        return bad(msg, len, SCMOE_ERR_PROGRESS, "progress = %d: must be POLL, THREAD or NONE", (int)c->progress);
    if (c->poll_cols < 0)
        return bad(msg, len, SCMOE_ERR_OPTION, "poll_cols = %d: must be >= 0 (0: sized by poll_us)", c->poll_cols);
    if (!(c->poll_us >= 1.0 && c->poll_us <= 1e7))
        return bad(msg, len, SCMOE_ERR_OPTION, "poll_us = %g: must be in 1..1e7 microseconds", c->poll_us);
    if (!is_flag(c->overlap)) return bad(msg, len, SCMOE_ERR_OPTION, "overlap = %d: must be 0 or 1", c->overlap);
    if (c->expert_slot < -1 || c->expert_slot > SCHED_MAX_OPS)
        return bad(msg, len, SCMOE_ERR_OPTION, "expert_slot = %d: must be -1 (auto) or 0..%d", c->expert_slot,
                   SCHED_MAX_OPS);
    if (!is_flag(c->overlap_grad_sync))
        return bad(msg, len, SCMOE_ERR_OPTION, "overlap_grad_sync = %d: must be 0 or 1", c->overlap_grad_sync);
    if (!is_flag(c->wire_bf16)) return bad(msg, len, SCMOE_ERR_OPTION, "wire_bf16 = %d: must be 0 or 1", c->wire_bf16);
    if (c->pipeline_chunks < 0 || c->pipeline_chunks > SCMOE_MAX_PIPELINE_CHUNKS)
        return bad(msg, len, SCMOE_ERR_OPTION, "pipeline_chunks = %d: must be in 0..%d", c->pipeline_chunks,
                   SCMOE_MAX_PIPELINE_CHUNKS);
    if (c->precision != SCMOE_PRECISION_FP32 && c->precision != SCMOE_PRECISION_BF16)
        return bad(msg, len, SCMOE_ERR_OPTION, "precision = %d: must be FP32 or BF16", (int)c->precision);
    if (!is_flag(c->grad_sync_bf16))
        return bad(msg, len, SCMOE_ERR_OPTION, "grad_sync_bf16 = %d: must be 0 or 1", c->grad_sync_bf16);
    if (c->grad_sync_algo < SCMOE_GRAD_SYNC_MPI || c->grad_sync_algo > SCMOE_GRAD_SYNC_AUTO)
        return bad(msg, len, SCMOE_ERR_OPTION, "grad_sync_algo = %d: must be MPI, TWO_ROUND or AUTO",
                   (int)c->grad_sync_algo);
    if (!(c->comm_timeout_s > 0) || !isfinite(c->comm_timeout_s))
        return bad(msg, len, SCMOE_ERR_OPTION, "comm_timeout_s = %g: must be > 0 and finite", c->comm_timeout_s);
    return SCMOE_OK;
}

static const char *const status_names[SCMOE_STATUS_COUNT] = {
    [SCMOE_OK] = "success",
    [SCMOE_ERR_NULL] = "a required pointer argument is NULL",
    [SCMOE_ERR_NOMEM] = "out of memory",
    [SCMOE_ERR_D_MODEL] = "invalid d_model",
    [SCMOE_ERR_D_HIDDEN] = "invalid d_hidden",
    [SCMOE_ERR_N_EXPERTS] = "invalid n_experts",
    [SCMOE_ERR_TOP_K] = "invalid top_k",
    [SCMOE_ERR_CAPACITY] = "invalid capacity factor",
    [SCMOE_ERR_LOSS_WEIGHT] = "invalid aux or z loss weight",
    [SCMOE_ERR_NOISE] = "invalid gate noise",
    [SCMOE_ERR_ACTIVATION] = "unknown activation",
    [SCMOE_ERR_PRIORITY] = "unknown routing priority",
    [SCMOE_ERR_MAX_TOKENS] = "invalid max_tokens",
    [SCMOE_ERR_N_TOKENS] = "token count out of range",
    [SCMOE_ERR_NONFINITE] = "NaN or Inf in the input",
    [SCMOE_ERR_ARCH] = "unknown arch",
    [SCMOE_ERR_SHORTCUT_POS] = "shortcut_pos must be 1, 2 or 3",
    [SCMOE_ERR_COMBINE] = "unknown combine rule",
    [SCMOE_ERR_N_HEADS] = "n_heads must divide d_model",
    [SCMOE_ERR_SEQ_LEN] = "sequence length or batch out of range",
    [SCMOE_ERR_N_LAYERS] = "invalid n_layers",
    [SCMOE_ERR_EP_SIZE] = "invalid expert-parallel size",
    [SCMOE_ERR_PROGRESS] = "invalid progress policy",
    [SCMOE_ERR_OPTION] = "an option is out of range",
    [SCMOE_ERR_STATE] = "call out of order",
    [SCMOE_ERR_NOT_FOUND] = "no such parameter",
    [SCMOE_ERR_CONFIG_MISMATCH] = "ranks hold different configs",
    [SCMOE_ERR_COMM] = "communication failed",
    [SCMOE_ERR_TIMEOUT] = "an exchange timed out",
    [SCMOE_ERR_IO] = "file input/output failed",
    [SCMOE_ERR_UNSUPPORTED] = "not supported by this build",
    [SCMOE_ERR_DEVICE] = "a device call failed",
};

const char *scmoe_strerror(scmoe_status s) {
    if ((int)s < 0 || s >= SCMOE_STATUS_COUNT) return "unknown status";
    return status_names[s];
}

#define SCMOE_STR2(x) #x
#define SCMOE_STR(x)  SCMOE_STR2(x)
const char *scmoe_version(void) {
    return SCMOE_STR(SCMOE_VERSION_MAJOR) "." SCMOE_STR(SCMOE_VERSION_MINOR) "." SCMOE_STR(SCMOE_VERSION_PATCH);
}

scmoe_status scmoe__fail(scmoe_context *ctx, scmoe_status status, const char *fmt, ...) {
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
        va_end(ap);
        /* a failed or timed-out exchange may still be pending, and the ranks are no longer in step: every
         * later collective call is refused (scmoe__ctx_usable) rather than matched against it */
        if ((status == SCMOE_ERR_TIMEOUT || status == SCMOE_ERR_COMM) && !ctx->broken) {
            ctx->broken = status;
            snprintf(ctx->broken_err, sizeof ctx->broken_err, "%.255s", ctx->err);
        }
    }
    return status;
}

double scmoe__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

void *scmoe__arena_take(arena *a, size_t bytes) {
    void *p = a->base ? a->base + a->used : NULL;
    a->used += (bytes + 63) & ~(size_t)63;
    return p;
}

const char *scmoe_build_info(void) {
    return "scmoe " SCMOE_STR(SCMOE_VERSION_MAJOR) "." SCMOE_STR(SCMOE_VERSION_MINOR) "." SCMOE_STR(
        SCMOE_VERSION_PATCH) "; compute: openblas (OpenMP threads = OMP_NUM_THREADS); communication: serial"
#ifdef SCMOE_WITH_MPI
                             " + MPI (nonblocking all-to-all, progress poll|thread|none)"
#endif
#ifdef SCMOE_WITH_CUDA
                             " + CUDA"
#endif
#ifdef SCMOE_WITH_ONEDNN
                             "; bf16 GEMMs: oneDNN where the CPU has bf16 matmuls, else rounded operands and fp32 GEMMs"
#else
                             "; bf16 GEMMs: rounded operands and fp32 GEMMs (built without oneDNN)"
#endif
        ;
}

/* ---- context ---- */

scmoe_status scmoe__context_create_with(comm *world, scmoe_context **out) {
    scmoe_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return SCMOE_ERR_NOMEM;
    ctx->world = world;
    ctx->blas = scmoe__blas_openblas();
    ctx->compute = scmoe__compute_host();
    *out = ctx;
    return SCMOE_OK;
}

scmoe_status scmoe_context_create(scmoe_context **out) {
    if (!out) return SCMOE_ERR_NULL;
    *out = NULL;
    comm *c;
    scmoe_status s = scmoe__comm_serial_create(&c);
    if (s) return s;
    s = scmoe__context_create_with(c, out);
    if (s) c->ops->destroy(c);
    return s;
}

scmoe_status scmoe_context_destroy(scmoe_context *ctx) {
    if (!ctx) return SCMOE_OK;
    if (ctx->objects > 0) /* they keep a pointer to it and free their memory through its backend */
        return scmoe__fail(ctx, SCMOE_ERR_STATE,
                           "scmoe_context_destroy: %d layer(s) or pair(s) created on this "
                           "context are still alive: destroy (or abort) them first",
                           ctx->objects);
    if (ctx->broken) return scmoe_context_abort(ctx);
    if (ctx->world) ctx->world->ops->destroy(ctx->world);
    if (ctx->backend_release) ctx->backend_release(ctx->backend);
    scmoe__blas_host_destroy(ctx->host_blas);
    free(ctx);
    return SCMOE_OK;
}

scmoe_status scmoe_context_abort(scmoe_context *ctx) {
    if (!ctx) return SCMOE_OK;
    if (ctx->objects > 0)
        return scmoe__fail(ctx, SCMOE_ERR_STATE,
                           "scmoe_context_abort: %d layer(s) or pair(s) created on this "
                           "context are still alive: abort them first",
                           ctx->objects);
    if (ctx->world) ctx->world->ops->abandon(ctx->world);
    if (ctx->backend_release) ctx->backend_release(ctx->backend);
    free(ctx);
    return SCMOE_OK;
}

int scmoe_context_rank(const scmoe_context *ctx) { return ctx ? ctx->world->rank : -1; }
int scmoe_context_size(const scmoe_context *ctx) { return ctx ? ctx->world->size : -1; }
const char *scmoe_context_backend(const scmoe_context *ctx) { return ctx ? ctx->compute->name : "context is NULL"; }
const char *scmoe_last_error(const scmoe_context *ctx) { return ctx ? ctx->err : "context is NULL"; }

scmoe_status scmoe__context_device_check(scmoe_context *ctx) {
    const compute_ops *co = ctx->compute;
    char msg[200];
    co->sync(co);
    if (!co->failed(co, msg, sizeof msg)) return SCMOE_OK;
    return scmoe__fail(ctx, SCMOE_ERR_DEVICE, "%s backend: %s", co->name, msg);
}

/* ---- parameters ---- */

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

int scmoe__params_add(param_table *pt, const char *name, int ndim, const int *shape, int sync, int init, float std,
                      uint64_t seed) {
    if (pt->failed) return -1;
    if (pt->n == pt->cap) {
        int cap = pt->cap ? 2 * pt->cap : 32;
        param_entry *p = realloc(pt->p, sizeof *p * cap);
        if (!p) {
            pt->failed = 1;
            return -1;
        }
        pt->p = p;
        pt->cap = cap;
    }
    param_entry *e = &pt->p[pt->n];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->t.ndim = ndim;
    e->t.numel = 1;
    for (int i = 0; i < ndim; i++) {
        e->t.shape[i] = shape[i];
        e->t.numel *= (size_t)shape[i];
    }
    e->t.replicated = sync != SYNC_REPLICAS;
    e->sync = sync;
    e->init = init;
    e->init_std = std;
    /* the key depends on the name, not on the rank: an expert starts the same wherever it lives */
    e->init_key = gate_mix64(seed) ^ hash_str(name);
    e->offset = pt->total;
    pt->total += (e->t.numel + 15) & ~(size_t)15; /* 64-byte aligned tensors */
    return pt->n++;
}

/* Staged gradients are laid out world-summed tensors first, then replica-summed ones, so each group's
 * all-reduce is over one contiguous range. */
static int staged(const param_entry *e, int world_sync, int replica_sync) {
    return (e->sync == SYNC_WORLD && world_sync) || (e->sync == SYNC_REPLICAS && replica_sync);
}

/* init of one tensor, seeded by its name and element index: the same values on every backend */
static void params_init(const param_entry *e, float *dst) {
    for (size_t j = 0; j < e->t.numel; j++)
        dst[j] = e->init == INIT_ZERO  ? 0.0f
                 : e->init == INIT_ONE ? 1.0f
                                       : e->init_std * gate_normal_from_key(e->init_key + j * 0x9E3779B97F4A7C15ull);
}

scmoe_status scmoe__params_allocate(param_table *pt, const compute_ops *co, int world_sync, int replica_sync) {
    size_t total = pt->total ? pt->total : 16, on_device = 0, on_host = 0;
    for (int i = 0; i < pt->n; i++) { /* data: host_data tensors in their own block, in registration order */
        param_entry *e = &pt->p[i];
        size_t *at = e->host_data ? &on_host : &on_device;
        e->offset_data = *at;
        *at += (e->t.numel + 15) & ~(size_t)15;
    }
    pt->co = co;
    pt->data = co->alloc(co, sizeof(float) * (on_device ? on_device : 16), COMPUTE_DEVICE);
    pt->grad = co->alloc(co, sizeof(float) * total, COMPUTE_DEVICE);
    if (!pt->data || !pt->grad) return SCMOE_ERR_NOMEM;
    if (on_host) {
        pt->data_host = co->alloc(co, sizeof(float) * on_host, COMPUTE_MAPPED);
        if (!pt->data_host) return SCMOE_ERR_NOMEM;
    }
    co->zero(co, pt->grad, sizeof(float) * total);
    size_t stage = 0, largest = 0;
    for (int pass = SYNC_WORLD; pass <= SYNC_REPLICAS; pass++) {
        for (int i = 0; i < pt->n; i++) {
            param_entry *e = &pt->p[i];
            if (e->t.numel > largest) largest = e->t.numel;
            if (e->sync != pass || !staged(e, world_sync, replica_sync)) continue;
            e->offset_stage = stage;
            stage += (e->t.numel + 15) & ~(size_t)15;
        }
        if (pass == SYNC_WORLD) pt->stage_world = stage;
    }
    pt->stage_total = stage;
    if (stage) { /* summed over ranks by MPI */
        pt->stage = co->alloc(co, sizeof(float) * stage, co->exchange_kind);
        if (!pt->stage) return SCMOE_ERR_NOMEM;
        co->zero(co, pt->stage, sizeof(float) * stage);
        /* a device whose MPI reads host memory: the backward writes device memory, copied out per bucket */
        if (co->copy_out && co->exchange_kind != COMPUTE_DEVICE) {
            pt->stage_dev = co->alloc(co, sizeof(float) * stage, COMPUTE_DEVICE);
            if (!pt->stage_dev) return SCMOE_ERR_NOMEM;
            co->zero(co, pt->stage_dev, sizeof(float) * stage);
        }
    }
    /* a device backend's values are made on the host, one tensor at a time, and copied over */
    float *init = co->device ? malloc(sizeof(float) * (largest ? largest : 1)) : NULL;
    if (co->device && !init) return SCMOE_ERR_NOMEM;
    for (int i = 0; i < pt->n; i++) {
        param_entry *e = &pt->p[i];
        e->t.name = e->name;
        e->t.data = (e->host_data ? pt->data_host : pt->data) + e->offset_data;
        e->t.grad = pt->grad + e->offset;
        e->gwork = !staged(e, world_sync, replica_sync) ? e->t.grad
                   : pt->stage_dev                      ? pt->stage_dev + e->offset_stage
                                                        : pt->stage + e->offset_stage;
        int direct = !init || e->host_data; /* the host can write it */
        params_init(e, direct ? e->t.data : init);
        if (!direct) co->copy(co, e->t.data, init, sizeof(float) * e->t.numel);
    }
    free(init);
    return SCMOE_OK;
}

void scmoe__params_free(param_table *pt) {
    free(pt->p);
    if (pt->co) {
        pt->co->release(pt->co, pt->data, COMPUTE_DEVICE);
        pt->co->release(pt->co, pt->grad, COMPUTE_DEVICE);
        pt->co->release(pt->co, pt->stage, pt->co->exchange_kind);
        pt->co->release(pt->co, pt->stage_dev, COMPUTE_DEVICE);
        pt->co->release(pt->co, pt->data_host, COMPUTE_MAPPED);
    }
    if (pt->co && pt->co->device) pt->co->release(pt->co, pt->data_bf16, COMPUTE_DEVICE); /* precision.c */
    else free(pt->data_bf16);
    memset(pt, 0, sizeof *pt);
}

int scmoe__params_find(const param_table *pt, const char *name) {
    for (int i = 0; i < pt->n; i++)
        if (strcmp(pt->p[i].name, name) == 0) return i;
    return -1;
}

void scmoe__params_zero_grad(param_table *pt) { pt->co->zero(pt->co, pt->grad, sizeof(float) * pt->total); }

scmoe_status scmoe__params_at(const param_table *pt, int i, scmoe_tensor *t) {
    if (!t) return SCMOE_ERR_NULL;
    if (i < 0 || i >= pt->n) return SCMOE_ERR_NOT_FOUND;
    *t = pt->p[i].t;
    return SCMOE_OK;
}

scmoe_status scmoe__params_named(scmoe_context *ctx, const param_table *pt, const char *name, scmoe_tensor *t) {
    if (!name || !t) return SCMOE_ERR_NULL;
    int i = scmoe__params_find(pt, name);
    if (i < 0) return scmoe__fail(ctx, SCMOE_ERR_NOT_FOUND, "no parameter named '%s' on this rank", name);
    *t = pt->p[i].t;
    return SCMOE_OK;
}

void scmoe__params_zero_stage(param_table *pt) {
    if (pt->stage_total)
        pt->co->zero(pt->co, pt->stage_dev ? pt->stage_dev : pt->stage, sizeof(float) * pt->stage_total);
}

void scmoe__params_stage_ready(param_table *pt) {
    const compute_ops *co = pt->co;
    if (!pt->stage_dev) {
        co->sync(co); /* MPI reads the staged gradients the kernels wrote */
        return;
    }
    co->copy_out(co, pt->stage, pt->stage_dev, sizeof(float) * pt->stage_total);
    co->copy_landed(co, 1); /* the layer's whole backward is enqueued: nothing left to do meanwhile */
}

void scmoe__params_add_stage(param_table *pt) {
    const float *sum = pt->stage;
    if (pt->stage_dev) { /* the sums back to the device in one copy, added from there */
        pt->co->copy_rows(pt->co, pt->stage_dev, pt->stage, sizeof(float) * pt->stage_total);
        sum = pt->stage_dev;
    }
    for (int i = 0; i < pt->n; i++) {
        param_entry *e = &pt->p[i];
        if (e->gwork != e->t.grad) pt->co->add(pt->co, e->t.grad, sum + e->offset_stage, e->t.numel);
    }
}

/* ---- groups and agreement ---- */

scmoe_status scmoe__groups_create(scmoe_context *ctx, int ep_size_cfg, comm **ep, comm **ep_back, comm **replicas) {
    comm *w = ctx->world; /* the groups inherit its deadline and progress policy (scmoe__moe_bind_comms) */
    int ep_size = ep_size_cfg ? ep_size_cfg : w->size;
    *ep = *ep_back = *replicas = NULL;
    if (w->size % ep_size != 0)
        return scmoe__fail(ctx, SCMOE_ERR_EP_SIZE, "ep_size %d does not divide the %d ranks", ep_size, w->size);
    /* expert-parallel groups are runs of ep_size consecutive ranks; replicas share rank % ep_size */
    scmoe_status s = w->ops->split(w, w->rank / ep_size, w->rank, ep);
    if (!s) s = w->ops->split(w, w->rank / ep_size, w->rank, ep_back);
    if (!s) s = w->ops->split(w, w->rank % ep_size, w->rank, replicas);
    if (s) {
        if (*ep) (*ep)->ops->destroy(*ep);
        if (*ep_back) (*ep_back)->ops->destroy(*ep_back);
        *ep = *ep_back = NULL;
        return scmoe__fail(ctx, s, "creating the expert-parallel groups failed: %s", w->err);
    }
    (*ep)->timeout_s = (*ep_back)->timeout_s = (*replicas)->timeout_s = w->timeout_s;
    (*ep)->progress = (*ep_back)->progress = (*replicas)->progress = w->progress;
    return SCMOE_OK;
}

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static uint64_t config_hash(const scmoe_config *c) {
    uint64_t h = 1469598103934665603ull;
    if (!c) return h;
#define H(f) h = hash_bytes(h, &c->f, sizeof c->f)
        /* floats by value: -0.0 and 0.0 are the same setting (both a dropless capacity factor) */
#define HF(f)                                                                                                          \
    do {                                                                                                               \
        float v_ = c->f == 0.0f ? 0.0f : c->f;                                                                         \
        h = hash_bytes(h, &v_, sizeof v_);                                                                             \
    } while (0)
    H(d_model);
    H(d_hidden);
    H(n_experts);
    H(top_k);
    H(max_tokens);
    HF(capacity_factor);
    HF(eval_capacity_factor);
    H(priority);
    H(capacity_scope);
    H(renormalize);
    HF(aux_loss_weight);
    HF(z_loss_weight);
    H(aux_scope);
    HF(gate_noise_std);
    H(seed);
    H(activation);
    H(check_finite);
    H(arch);
    H(shortcut_pos);
    H(combine);
    H(n_heads);
    H(max_seq_len);
    H(causal);
    H(n_layers);
    H(ep_size);
    H(progress);
    H(poll_cols);
    HF(poll_us);
    H(overlap);
    H(expert_slot);
    H(overlap_grad_sync);
    H(wire_bf16);
    H(pipeline_chunks);
    H(precision);
    H(grad_sync_bf16);
    H(grad_sync_algo);
#undef HF
#undef H
    return h;
}

/* The first call agreement of an object: every rank calls this with its own config and its local
 * validation status, so a rank with a bad config still takes part and nobody hangs: all ranks return an
 * error if any config differs. */
scmoe_status scmoe__config_check(scmoe_context *ctx, const scmoe_config *cfg, scmoe__calls *calls) {
    char msg[256];
    scmoe_status s = scmoe_config_validate(cfg, msg, sizeof msg);
    if (s) scmoe__fail(ctx, s, "%s", msg);
    calls->id = ctx->creates++;
    calls->seq = 0;
    calls->hash = config_hash(cfg);
    return scmoe__call_agree(ctx, calls, SCMOE__CALL_CREATE, 0, s);
}

exec scmoe__context_exec(const scmoe_context *ctx, const scmoe_config *cfg) {
    const blas_backend *b = ctx->blas;
    int host = !ctx->compute->device; /* a device overlaps through its stream: one tile per GEMM */
    exec ex = {
        .blas = b, .compute = ctx->compute, .poll_cols = host ? cfg->poll_cols : 0, .poll_us = host ? cfg->poll_us : 0};
    for (int bf = 0; bf < 2 && b->nominal_gflops; bf++) ex.gflops[bf] = b->nominal_gflops(b, bf);
    return ex;
}

/* A status another rank sent: anything outside the statuses means the ranks are out of step (a token
 * count or a routing record read as a status), which is a communication failure. */
static scmoe_status agreed_status(scmoe_context *ctx, int64_t v, const char *what) {
    if (v > 0 && v < SCMOE_STATUS_COUNT)
        return scmoe__fail(ctx, (scmoe_status)v, "another rank failed%s: %s", what, scmoe_strerror((scmoe_status)v));
    return scmoe__fail(ctx, SCMOE_ERR_COMM,
                       "the ranks are out of step: the status agreement%s received %lld, which "
                       "is not a status (another rank is in a different collective call)",
                       what, (long long)v);
}

/* After a local step that may fail on some ranks only: every rank learns whether any failed. */
scmoe_status scmoe__status_agree(scmoe_context *ctx, scmoe_status local) {
    comm *w = ctx->world;
    int64_t v = local;
    scmoe_status s = w->ops->allreduce_i64_max(w, &v, 1);
    if (s) return scmoe__fail(ctx, s, "status agreement failed: %s", w->err);
    if (local) return local;
    if (v) return agreed_status(ctx, v, "");
    return SCMOE_OK;
}

scmoe_status scmoe__ctx_usable(scmoe_context *ctx) {
    if (!ctx->broken) return SCMOE_OK;
    return scmoe__fail(ctx, SCMOE_ERR_STATE,
                       "the context is unusable since an earlier failure, %s (%s): an exchange may "
                       "still be pending and the ranks are out of step; save what you need, then abort "
                       "(scmoe_pair_abort / scmoe_moe_abort, scmoe_context_abort) and restart",
                       scmoe_strerror(ctx->broken), ctx->broken_err);
}

static const char *call_name(int64_t call) {
    return call == SCMOE__CALL_CREATE     ? "create"
           : call == SCMOE__CALL_FORWARD  ? "forward"
           : call == SCMOE__CALL_BACKWARD ? "backward"
                                          : "an unknown call";
}

/* One all-reduce (max) of [v, -v] for each field and the local status: the max of -v is -min(v), so a
 * field agrees iff its max equals its min. The vector has the same length for every call, so ranks in different
 * calls still meet in it and learn so, instead of matching mismatched collectives. */
enum { AG_ID, AG_CALL, AG_SEQ, AG_MODE, AG_HASH, AG_FIELDS };
scmoe_status scmoe__call_agree(scmoe_context *ctx, scmoe__calls *calls, int call, int training, scmoe_status local) {
    scmoe_status s = scmoe__ctx_usable(ctx);
    if (s) return s;
    int64_t mine[AG_FIELDS] = {calls->id, call, calls->seq, training != 0, (int64_t)(calls->hash >> 2)};
    int64_t v[2 * AG_FIELDS + 1];
    for (int i = 0; i < AG_FIELDS; i++) {
        v[2 * i] = mine[i];
        v[2 * i + 1] = -mine[i];
    }
    v[2 * AG_FIELDS] = local;
    comm *w = ctx->world;
    s = w->ops->allreduce_i64_max(w, v, 2 * AG_FIELDS + 1);
    if (s) return scmoe__fail(ctx, s, "the call agreement (%s) failed: %s", call_name(call), w->err);
    /* every rank continues from the same sequence number, so one out-of-step call does not leave the
     * object out of step for good */
    calls->seq = v[2 * AG_SEQ] + 1;
    int64_t max[AG_FIELDS], min[AG_FIELDS];
    for (int i = 0; i < AG_FIELDS; i++) {
        max[i] = v[2 * i];
        min[i] = -v[2 * i + 1];
    }
#define OTHER(f) (mine[f] == max[f] ? min[f] : max[f])
    if (max[AG_ID] != min[AG_ID] || max[AG_CALL] != min[AG_CALL])
        return scmoe__fail(ctx, SCMOE_ERR_STATE,
                           "ranks are out of step: this rank (%d) called %s on object #%lld of "
                           "the context, another rank called %s on object #%lld: every rank must make the same "
                           "collective calls in the same order",
                           w->rank, call_name(call), (long long)mine[AG_ID], call_name(OTHER(AG_CALL)),
                           (long long)OTHER(AG_ID));
    if (max[AG_SEQ] != min[AG_SEQ])
        return scmoe__fail(ctx, SCMOE_ERR_STATE,
                           "ranks are out of step: this rank (%d) called %s as call %lld on "
                           "object #%lld, another rank as call %lld (a rank skipped or repeated a collective call)",
                           w->rank, call_name(call), (long long)mine[AG_SEQ], (long long)mine[AG_ID],
                           (long long)OTHER(AG_SEQ));
    if (max[AG_MODE] != min[AG_MODE])
        return scmoe__fail(ctx, SCMOE_ERR_STATE,
                           "ranks are in different modes: this rank (%d) called %s in %s mode, "
                           "another rank in %s mode (set_training must agree on every rank)",
                           w->rank, call_name(call), training ? "training" : "inference",
                           training ? "inference" : "training");
#undef OTHER
    if (local) return local;
    if (max[AG_HASH] != min[AG_HASH])
        return scmoe__fail(ctx, SCMOE_ERR_CONFIG_MISMATCH,
                           "ranks were given different configs (rank %d's hash %016llx differs from another's)",
                           w->rank, (unsigned long long)calls->hash);
    if (v[2 * AG_FIELDS])
        return agreed_status(ctx, v[2 * AG_FIELDS], call == SCMOE__CALL_CREATE ? " (its config is invalid)" : "");
    return SCMOE_OK;
}
