/* test_cuda_moe.c: the MoE layer and the block pair on the CUDA backend (scmoe_context_use_cuda) against
 * the same objects on the host backend, same config, same weights, same input: outputs <= 1e-4
 * relative, dX and every parameter gradient <= 1e-3, routing statistics equal, over training steps
 * (the pair's first ones serialized to profile, the later ones overlapped) and an inference forward. Run on one rank or under mpirun (each rank's CUDA layer against its host twin, exchanges
 * included). Built twice: against the real runtime (a GPU; without one only the refusals run, the
 * rest SKIPs) and against the host emulation (`make check-cuda-emu`, every kernel on CPU threads). */
#include "../scmoe.h"
#include "../scmoe_cuda.h"
#include "check.h"
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef SCMOE_WITH_MPI
#include "../scmoe_mpi.h"
#endif

#ifdef SCMOE_CUDA_EMU
/* runtime_emu.c: from now on the host faults on device memory, as it would with a GPU; the asynchronous
 * copy after `after` more fails */
void emu_protect_device(int on);
void emu_fail_copy_after(long after);
/* words copied out of device memory that nothing had written (what initcheck reports on a device) */
size_t emu_uninit_words(const void **first);
/* cudaMalloc calls so far: none may come from a forward or backward (no allocation in the hot path) */
size_t emu_device_allocs(void);
/* copies from device memory to the host so far */
size_t emu_copies_to_host(void);
/* copies into pinned memory land only when the host syncs with them: an event answers NotReady to its
 * first n queries after each record; the queries so far, and the waits that found copies not landed */
void emu_copy_polls(long n);
void emu_copy_counts(size_t *queries, size_t *blocks);
#endif

/* the host's event queries and its blocking waits on copies not landed yet, where the emulation counts them */
static void copy_counts(size_t *queries, size_t *blocks) {
#ifdef SCMOE_CUDA_EMU
    emu_copy_counts(queries, blocks);
#else
    *queries = *blocks = 0;
#endif
}

/* cudaMalloc calls so far where the emulation counts them, else 0 */
static size_t device_allocs(void) {
#ifdef SCMOE_CUDA_EMU
    return emu_device_allocs();
#else
    return 0;
#endif
}

static int rank_, size_ = 1;

static scmoe_status make_ctx(scmoe_context **ctx) {
#ifdef SCMOE_WITH_MPI
    return scmoe_context_create_mpi(MPI_COMM_WORLD, ctx);
#else
    return scmoe_context_create(ctx);
#endif
}

static void fill(float *x, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = ((seed >> 8) / 16777216.0f - 0.5f) * 2.0f;
    }
}

static float *dev_alloc(size_t n) {
    void *p = NULL;
    return cudaMalloc(&p, sizeof(float) * (n ? n : 1)) == cudaSuccess ? p : NULL;
}
static void to_dev(float *d, const float *h, size_t n) { cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice); }
static void to_host(float *h, const float *d, size_t n) { cudaMemcpy(h, d, sizeof(float) * n, cudaMemcpyDeviceToHost); }

/* max |a - b| / max(max |b|, 1e-6) */
static double rel_err(const float *a, const float *b, size_t n) {
    double diff = 0, ref = 1e-6;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= diff)) diff = d; /* NaN counts */
        if (fabs(b[i]) > ref) ref = fabs(b[i]);
    }
    return diff / ref;
}

/* the parameter accessors of a layer or a pair */
typedef struct params_api {
    int (*count)(const void *);
    scmoe_status (*at)(const void *, int, scmoe_tensor *);
} params_api;
static int moe_count(const void *m) { return scmoe_moe_param_count(m); }
static scmoe_status moe_at(const void *m, int i, scmoe_tensor *t) { return scmoe_moe_param_at(m, i, t); }
static int pair_count(const void *p) { return scmoe_pair_param_count(p); }
static scmoe_status pair_at(const void *p, int i, scmoe_tensor *t) { return scmoe_pair_param_at(p, i, t); }
static const params_api moe_api = {moe_count, moe_at}, pair_api = {pair_count, pair_at};

static size_t largest_param(const params_api *f, const void *o) {
    size_t big = 0;
    for (int i = 0; i < f->count(o); i++) {
        scmoe_tensor t;
        f->at(o, i, &t);
        if (t.numel > big) big = t.numel;
    }
    return big;
}

/* the parameters of a (host) and b (device) hold the same values, bit for bit */
static int same_params(const params_api *f, const void *a, const void *b, float *scratch) {
    int n = f->count(a), same = n == f->count(b);
    for (int i = 0; i < n && same; i++) {
        scmoe_tensor x, y;
        f->at(a, i, &x);
        f->at(b, i, &y);
        to_host(scratch, y.data, y.numel);
        same = x.numel == y.numel && !strcmp(x.name, y.name) && !memcmp(scratch, x.data, sizeof(float) * x.numel);
    }
    return same;
}

/* the worst relative error of b's gradients (device) against a's (host) */
static double grads_err(const params_api *f, const void *a, const void *b, float *scratch) {
    double worst = 0;
    for (int i = 0; i < f->count(a); i++) {
        scmoe_tensor x, y;
        f->at(a, i, &x);
        f->at(b, i, &y);
        to_host(scratch, y.grad, y.numel);
        double e = rel_err(scratch, x.grad, x.numel);
        if (e > worst) worst = e;
    }
    return worst;
}

typedef struct tcase {
    const char *name;
    int k, chunks, wire_bf16;
    scmoe_activation act;
    float cf, z, noise;
    int local; /* capacity_scope LOCAL */
    int bf16;  /* precision BF16: both round the same GEMM operands (8 significant bits), in sums of another
                  order, so a rounding may flip: 1e-2 on outputs, 2e-2 on gradients (fp32: 1e-4 / 1e-3) */
} tcase;

/* one case: both layers, 2 training steps and an inference forward. slots: dctx's offload_experts (0:
 * none), whose fetches are counted against the local experts that received rows */
static void run_case(scmoe_context *hctx, scmoe_context *dctx, const tcase *tc, int slots) {
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 48;
    cfg.d_hidden = 80;
    cfg.n_experts = 4;
    cfg.top_k = tc->k;
    cfg.max_tokens = 64;
    cfg.activation = tc->act;
    cfg.capacity_factor = tc->cf;
    cfg.z_loss_weight = tc->z;
    cfg.gate_noise_std = tc->noise;
    cfg.pipeline_chunks = tc->chunks;
    cfg.wire_bf16 = tc->wire_bf16;
    cfg.capacity_scope = tc->local ? SCMOE_CAPACITY_LOCAL : SCMOE_CAPACITY_GLOBAL;
    cfg.precision = tc->bf16 ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32;
    cfg.check_finite = 1;
    double tol_y = tc->bf16 ? 1e-2 : 1e-4, tol_g = tc->bf16 ? 2e-2 : 1e-3;
    scmoe_moe *hm = NULL, *dm = NULL;
    scmoe_status s1 = scmoe_moe_create(hctx, &cfg, &hm), s2 = scmoe_moe_create(dctx, &cfg, &dm);
    CHECK(!s1 && !s2, "[%s] create on host and device: %s", tc->name,
          s1   ? scmoe_last_error(hctx)
          : s2 ? scmoe_last_error(dctx)
               : "ok");
    if (s1 || s2) {
        scmoe_moe_destroy(hm);
        scmoe_moe_destroy(dm);
        return;
    }
    int n = 40 + 7 * rank_, d = cfg.d_model, np = scmoe_moe_param_count(hm);
    size_t nd = (size_t)n * d, big = largest_param(&moe_api, hm);
    float *x = malloc(sizeof(float) * nd), *dy = malloc(sizeof(float) * nd), *y = malloc(sizeof(float) * nd);
    float *dx = malloc(sizeof(float) * nd), *got = malloc(sizeof(float) * (big > nd ? big : nd));
    float *dX = dev_alloc(nd), *dY = dev_alloc(nd), *dDY = dev_alloc(nd), *dDX = dev_alloc(nd);

    /* the same init on both (seeded by name): uploaded bit for bit */
    CHECK(same_params(&moe_api, hm, dm, got), "[%s] %d parameters initialised identically on the device", tc->name, np);

    if (slots) { /* offloaded: the experts' weights are host memory, readable right here */
        char name[64];
        scmoe_tensor a, b;
        snprintf(name, sizeof name, "experts.%d.w2", rank_ * (cfg.n_experts / size_));
        CHECK(!scmoe_moe_param(hm, name, &a) && !scmoe_moe_param(dm, name, &b) &&
                  !memcmp(a.data, b.data, sizeof(float) * a.numel),
              "[%s, %d slot(s)] an offloaded expert's weights are host memory, equal to the host layer's", tc->name,
              slots);
    }
    double worst_y = 0, worst_dx = 0, worst_g = 0;
    int stats_equal = 1, ok = 1, fetch_ok = 1, fetched_total = 0;
    size_t allocs = device_allocs();
    for (int step = 0; step < 2 && ok; step++) {
        fill(x, nd, 17 + 31 * step + 101 * rank_);
        fill(dy, nd, 99 + 31 * step + 101 * rank_);
        to_dev(dX, x, nd);
        to_dev(dDY, dy, nd);
        scmoe_stats hs, ds;
        ok = !scmoe_moe_forward(hm, n, x, y, &hs) && !scmoe_moe_forward(dm, n, dX, dY, &ds);
        int fetched = ok ? ds.experts_fetched : 0, active = 0, E_local = cfg.n_experts / size_;
        for (int e2 = rank_ * E_local; ok && e2 < (rank_ + 1) * E_local; e2++) active += ds.expert_tokens[e2] > 0;
        ok = ok && !scmoe_moe_backward(hm, dy, dx, &hs) && !scmoe_moe_backward(dm, dDY, dDX, &ds);
        if (!ok) break;
        /* the forward fetches exactly the experts with rows when they fit, the backward then none */
        fetch_ok &= !slots            ? fetched == 0 && ds.experts_fetched == 0
                    : slots >= active ? fetched == active && ds.experts_fetched == 0
                                      : fetched >= active;
        fetched_total += fetched;
        if (!ok) break;
        to_host(got, dY, nd);
        double e = rel_err(got, y, nd);
        worst_y = e > worst_y ? e : worst_y;
        to_host(got, dDX, nd);
        e = rel_err(got, dx, nd);
        worst_dx = e > worst_dx ? e : worst_dx;
        e = grads_err(&moe_api, hm, dm, got);
        worst_g = e > worst_g ? e : worst_g;
        stats_equal &= hs.tokens == ds.tokens && hs.dropped == ds.dropped && hs.capacity == ds.capacity &&
                       fabsf(hs.aux_loss - ds.aux_loss) <= 1e-5f * fabsf(hs.aux_loss) + 1e-7f &&
                       fabsf(hs.z_loss - ds.z_loss) <= 1e-4f * fabsf(hs.z_loss) + 1e-7f;
        for (int e2 = 0; e2 < cfg.n_experts; e2++) stats_equal &= hs.expert_tokens[e2] == ds.expert_tokens[e2];
        scmoe_moe_zero_grad(hm);
        scmoe_moe_zero_grad(dm);
    }
    CHECK(ok, "[%s] two training steps on both backends: %s", tc->name, ok ? "ok" : scmoe_last_error(dctx));
    CHECK(ok && worst_y <= tol_y, "[%s] outputs match the host backend (%.1e)", tc->name, worst_y);
    CHECK(ok && worst_dx <= tol_g, "[%s] dX matches (%.1e)", tc->name, worst_dx);
    CHECK(ok && worst_g <= tol_g, "[%s] all %d parameter gradients match (%.1e)", tc->name, np, worst_g);
    CHECK(ok && stats_equal, "[%s] routing statistics equal (tokens, drops, per-expert counts, aux, z)", tc->name);
    if (slots)
        CHECK(ok && fetch_ok,
              "[%s, %d slot(s)] the forward fetched the experts that received rows (%d over 2 steps), "
              "the backward found them resident where they fit",
              tc->name, slots, fetched_total);

    /* inference */
    scmoe_moe_set_training(hm, 0);
    scmoe_moe_set_training(dm, 0);
    ok = !scmoe_moe_forward(hm, n, x, y, NULL) && !scmoe_moe_forward(dm, n, dX, dY, NULL);
    to_host(got, dY, nd);
    double e = ok ? rel_err(got, y, nd) : 1;
    CHECK(ok && e <= tol_y, "[%s] inference forward matches (%.1e)", tc->name, e);
    CHECK(device_allocs() == allocs, "[%s] no device allocation after create (%zu in the steps)", tc->name,
          device_allocs() - allocs);
    if (tc->bf16 && ok && !slots) { /* the experts read the device's bf16 copy, refreshed by params_changed */
        scmoe_tensor w;
        float *y1 = malloc(sizeof(float) * nd), *y2 = malloc(sizeof(float) * nd);
        char name[64];
        snprintf(name, sizeof name, "experts.%d.w1", rank_ * (cfg.n_experts / size_)); /* a local expert */
        ok = !scmoe_moe_param(dm, name, &w) && y1 && y2 && w.numel <= (big > nd ? big : nd);
        if (ok) {
            to_host(got, w.data, w.numel);
            for (size_t i = 0; i < w.numel; i++) got[i] *= 2.0f;
            to_dev(w.data, got, w.numel);
        }
        ok = ok && !scmoe_moe_forward(dm, n, dX, dY, NULL);
        if (ok) to_host(y1, dY, nd);
        ok = ok && !scmoe_moe_params_changed(dm) && !scmoe_moe_forward(dm, n, dX, dY, NULL);
        if (ok) to_host(y2, dY, nd);
        CHECK(ok && rel_err(y1, y, nd) <= tol_y && rel_err(y2, y, nd) > tol_y,
              "[%s] experts' weights written on the device: the bf16 copy runs until params_changed", tc->name);
        free(y1);
        free(y2);
    }
    CHECK(scmoe_moe_backward(dm, dDY, dDX, NULL) == SCMOE_ERR_STATE, "[%s] backward after inference: STATE", tc->name);

    scmoe_moe_destroy(hm);
    scmoe_moe_destroy(dm);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(got);
    cudaFree(dX);
    cudaFree(dY);
    cudaFree(dDY);
    cudaFree(dDX);
}

/* ---- routing planned on the device against the host planner, both on a device ----
 * dctx plans on the device where it can (TOKEN priority with capacity per source rank, or one rank);
 * rctx has host_routing, so the gate's outputs go to the host, route.c plans and the plan comes back.
 * The gate and everything else run on the same device code in both, so the plans must be the same and
 * every result bit for bit equal: outputs, dX, every gradient, the statistics (aux and z losses
 * included). In the emulation a planned-on-device forward also copies nothing from the device. */
typedef struct rcase {
    const char *name;
    int k, chunks, local;
    float cf;
    scmoe_priority priority;
    scmoe_aux_scope aux;
} rcase;

/* a and b (device, n floats) bit for bit equal */
static int same_dev(const float *a, const float *b, size_t n, float *s1, float *s2) {
    to_host(s1, a, n);
    to_host(s2, b, n);
    return !memcmp(s1, s2, sizeof(float) * n);
}

static int same_stats(const scmoe_stats *a, const scmoe_stats *b, int E) {
    int same = a->tokens == b->tokens && a->dropped == b->dropped && a->capacity == b->capacity &&
               a->aux_loss == b->aux_loss && a->z_loss == b->z_loss;
    for (int e = 0; e < E; e++) same &= a->expert_tokens[e] == b->expert_tokens[e];
    return same;
}

static void run_route_case(scmoe_context *dctx, scmoe_context *rctx, const rcase *rc) {
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 32;
    cfg.d_hidden = 48;
    cfg.n_experts = 8;
    cfg.top_k = rc->k;
    cfg.max_tokens = 64;
    cfg.capacity_factor = rc->cf;
    cfg.eval_capacity_factor = rc->cf > 0 ? 2 * rc->cf : 0;
    cfg.z_loss_weight = 1e-3f;
    cfg.gate_noise_std = 0.3f;
    cfg.pipeline_chunks = rc->chunks;
    cfg.priority = rc->priority;
    cfg.capacity_scope = rc->local ? SCMOE_CAPACITY_LOCAL : SCMOE_CAPACITY_GLOBAL;
    cfg.aux_scope = rc->aux;
    scmoe_moe *dm = NULL, *rm = NULL;
    scmoe_status s1 = scmoe_moe_create(dctx, &cfg, &dm), s2 = scmoe_moe_create(rctx, &cfg, &rm);
    CHECK(!s1 && !s2, "[route: %s] create on both device contexts: %s", rc->name,
          s1   ? scmoe_last_error(dctx)
          : s2 ? scmoe_last_error(rctx)
               : "ok");
    if (s1 || s2) {
        scmoe_moe_destroy(dm);
        scmoe_moe_destroy(rm);
        return;
    }
    /* on the device: capacity per source or one rank, either priority; over the global batch with TOKEN
     * priority (the round counts scanned over the ranks) */
    int on_device = rc->local || size_ == 1 || rc->priority == SCMOE_PRIORITY_TOKEN;
    int d = cfg.d_model, nmax = cfg.max_tokens, E = cfg.n_experts, np = scmoe_moe_param_count(dm);
    size_t big = (size_t)nmax * d;
    for (int i = 0; i < np; i++) {
        scmoe_tensor t;
        scmoe_moe_param_at(dm, i, &t);
        big = t.numel > big ? t.numel : big;
    }
    float *x = malloc(sizeof(float) * big), *s1h = malloc(sizeof(float) * big), *s2h = malloc(sizeof(float) * big);
    float *dX = dev_alloc(big), *dDY = dev_alloc(big), *dY1 = dev_alloc(big), *dY2 = dev_alloc(big);
    float *dDX1 = dev_alloc(big), *dDX2 = dev_alloc(big);
    int ok = 1, same_y = 1, same_dx = 1, same_g = 1, same_st = 1, empty = 0;
    long forwards = 0;
#ifdef SCMOE_CUDA_EMU
    long copies_dev = 0, copies_ref = 0; /* copies from device memory, planned on the device / on the host */
#endif
    /* 2 steps of 40 + 7 rank tokens, then one of 3 (most experts empty), then an inference forward */
    for (int step = 0; step < 4 && ok; step++) {
        int n = step < 2 ? 40 + 7 * rank_ : 3, train = step < 3;
        size_t nd = (size_t)n * d;
        fill(x, nd, 5 + 13 * step + 101 * rank_);
        to_dev(dX, x, nd);
        fill(x, nd, 7 + 13 * step + 101 * rank_);
        to_dev(dDY, x, nd);
        scmoe_moe_set_training(dm, train);
        scmoe_moe_set_training(rm, train);
        scmoe_stats ds, rs;
#ifdef SCMOE_CUDA_EMU
        size_t c0 = emu_copies_to_host();
#endif
        ok = !scmoe_moe_forward(dm, n, dX, dY1, &ds);
#ifdef SCMOE_CUDA_EMU
        size_t c1 = emu_copies_to_host();
        copies_dev += (long)(c1 - c0);
#endif
        ok = ok && !scmoe_moe_forward(rm, n, dX, dY2, &rs);
#ifdef SCMOE_CUDA_EMU
        copies_ref += (long)(emu_copies_to_host() - c1);
#endif
        forwards++;
        if (!ok) break;
        same_y &= same_dev(dY1, dY2, nd, s1h, s2h);
        same_st &= same_stats(&ds, &rs, E);
        for (int e = 0; step == 2 && e < E; e++) empty += ds.expert_tokens[e] == 0;
        if (!train) break;
        ok = !scmoe_moe_backward(dm, dDY, dDX1, &ds) && !scmoe_moe_backward(rm, dDY, dDX2, &rs);
        if (!ok) break;
        same_dx &= same_dev(dDX1, dDX2, nd, s1h, s2h);
        for (int i = 0; i < np; i++) {
            scmoe_tensor a, b;
            scmoe_moe_param_at(dm, i, &a);
            scmoe_moe_param_at(rm, i, &b);
            same_g &= same_dev(a.grad, b.grad, a.numel, s1h, s2h);
        }
        scmoe_moe_zero_grad(dm);
        scmoe_moe_zero_grad(rm);
    }
    CHECK(ok, "[route: %s] 3 training steps and an inference forward on both: %s", rc->name,
          ok ? "ok" : scmoe_last_error(dctx));
    CHECK(ok && same_y && same_dx && same_g && same_st,
          "[route: %s] planned %s vs on the host: outputs %s, dX %s, %d gradients %s, statistics %s (%d experts "
          "empty at 3 tokens)",
          rc->name, on_device ? "on the device" : "on the host (fallback)", same_y ? "equal" : "DIFFER",
          same_dx ? "equal" : "DIFFER", np, same_g ? "equal" : "DIFFER", same_st ? "equal" : "DIFFER", empty);
#ifdef SCMOE_CUDA_EMU
    /* Planned on the device, the gate's outputs never cross: one copy fewer per forward than with
     * host_routing. What still crosses with several ranks is what MPI moves (the exchanges' peer blocks to
     * their mapped mirrors); with one rank, nothing. */
    CHECK(ok && copies_ref > 0 &&
              (on_device ? copies_ref - copies_dev == forwards && (size_ > 1 || copies_dev == 0) : copies_dev > 0),
          "[route: %s] copies from the device in %ld forwards: %ld planning %s, %ld with host_routing", rc->name,
          forwards, copies_dev, on_device ? "on the device" : "on the host", copies_ref);
#endif
    scmoe_moe_destroy(dm);
    scmoe_moe_destroy(rm);
    free(x);
    free(s1h);
    free(s2h);
    cudaFree(dX);
    cudaFree(dDY);
    cudaFree(dY1);
    cudaFree(dY2);
    cudaFree(dDX1);
    cudaFree(dDX2);
}

typedef struct pcase {
    const char *name;
    scmoe_arch arch;
    int pos, chunks;
    scmoe_combine combine;
    scmoe_activation act;
    int bf16; /* precision BF16 (the dense GEMMs too): tcase's 1e-2 / 2e-2 */
    /* the emulation on several ranks: copies to MPI's buffers land one poll late (emu_copy_polls), the
     * experts in slot 2; checks that the overlapped backward never blocks on them (the host polls and goes
     * on enqueueing; a wait only where nothing is left to enqueue) */
    int polls;
} pcase;

/* one pair case: 4 training steps (2 profiled serialized, then overlapped where the arch has a
 * shortcut) and an inference forward */
static void run_pair_case(scmoe_context *hctx, scmoe_context *dctx, const pcase *pc) {
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 32;
    cfg.d_hidden = 48;
    cfg.n_experts = 4;
    cfg.n_heads = 4;
    cfg.max_seq_len = 16;
    cfg.max_tokens = 48;
    cfg.arch = pc->arch;
    cfg.shortcut_pos = pc->pos;
    cfg.combine = pc->combine;
    cfg.activation = pc->act;
    cfg.capacity_factor = 1.25f;
    cfg.pipeline_chunks = pc->chunks;
    cfg.precision = pc->bf16 ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32;
    cfg.check_finite = 1;
    if (pc->polls) cfg.expert_slot = 2;
    double tol_y = pc->bf16 ? 1e-2 : 1e-4, tol_g = pc->bf16 ? 2e-2 : 1e-3;
    scmoe_pair *hp = NULL, *dp = NULL;
    scmoe_status s1 = scmoe_pair_create(hctx, &cfg, &hp), s2 = scmoe_pair_create(dctx, &cfg, &dp);
    CHECK(!s1 && !s2, "[pair %s] create on host and device: %s", pc->name,
          s1   ? scmoe_last_error(hctx)
          : s2 ? scmoe_last_error(dctx)
               : "ok");
    if (s1 || s2) {
        scmoe_pair_destroy(hp);
        scmoe_pair_destroy(dp);
        return;
    }
    int B = 3, T = 13, d = cfg.d_model, np = scmoe_pair_param_count(hp);
    size_t nd = (size_t)B * T * d, big = largest_param(&pair_api, hp);
    big = big > nd ? big : nd;
    float *x = malloc(sizeof(float) * nd), *dy = malloc(sizeof(float) * nd), *y = malloc(sizeof(float) * nd);
    float *dx = malloc(sizeof(float) * nd), *got = malloc(sizeof(float) * big);
    float *dX = dev_alloc(nd), *dY = dev_alloc(nd), *dDY = dev_alloc(nd), *dDX = dev_alloc(nd);
    CHECK(same_params(&pair_api, hp, dp, got), "[pair %s] %d parameters initialised identically", pc->name, np);
    double worst_y = 0, worst_dx = 0, worst_g = 0;
    int ok = 1, stats_equal = 1, overlapped = 0;
    size_t allocs = device_allocs(), queries[4] = {0}, blocks[4] = {0};
    for (int step = 0; step < 4 && ok; step++) {
        fill(x, nd, 7 + 13 * step + 101 * rank_);
        fill(dy, nd, 3 + 13 * step + 101 * rank_);
        to_dev(dX, x, nd);
        to_dev(dDY, dy, nd);
        scmoe_stats hs, ds;
        ok = !scmoe_pair_forward(hp, B, T, x, y, &hs) && !scmoe_pair_forward(dp, B, T, dX, dY, &ds);
        ok = ok && !scmoe_pair_backward(hp, dy, dx, &hs);
        size_t q0, b0;
        copy_counts(&q0, &b0);
        ok = ok && !scmoe_pair_backward(dp, dDY, dDX, &ds);
        copy_counts(&queries[step], &blocks[step]);
        queries[step] -= q0;
        blocks[step] -= b0;
        if (!ok) break;
        overlapped |= ds.expert_slot >= 0;
        double e;
        to_host(got, dY, nd);
        if ((e = rel_err(got, y, nd)) > worst_y) worst_y = e;
        to_host(got, dDX, nd);
        if ((e = rel_err(got, dx, nd)) > worst_dx) worst_dx = e;
        if ((e = grads_err(&pair_api, hp, dp, got)) > worst_g) worst_g = e;
        stats_equal &= hs.tokens == ds.tokens && hs.dropped == ds.dropped;
        scmoe_pair_zero_grad(hp);
        scmoe_pair_zero_grad(dp);
    }
    CHECK(ok, "[pair %s] four training steps on both backends: %s", pc->name, ok ? "ok" : scmoe_last_error(dctx));
    CHECK(ok && worst_y <= tol_y, "[pair %s] outputs match the host backend (%.1e)", pc->name, worst_y);
    CHECK(ok && worst_dx <= tol_g, "[pair %s] dX matches (%.1e)", pc->name, worst_dx);
    CHECK(ok && worst_g <= tol_g, "[pair %s] all %d parameter gradients match (%.1e%s)", pc->name, np, worst_g,
          size_ > 1 ? ", summed over the ranks from device buckets" : "");
    CHECK(ok && stats_equal, "[pair %s] routing statistics equal", pc->name);
    if (pc->arch == SCMOE_ARCH_SCMOE)
        CHECK(overlapped, "[pair %s] the device ran the overlapped schedule after profiling", pc->name);
    if (pc->polls) /* the serialized step waits for each exchange and the buckets at the end: its count shows */
        CHECK(ok && blocks[3] <= 1 && queries[3] > 0,
              "[pair %s] an overlapped backward polls the copies to MPI's buffers and blocks on them %zu time(s) "
              "(%zu queries; a serialized one blocks %zu times)",
              pc->name, blocks[3], queries[3], blocks[0]);
    scmoe_pair_set_training(hp, 0);
    scmoe_pair_set_training(dp, 0);
    ok = !scmoe_pair_forward(hp, B, T, x, y, NULL) && !scmoe_pair_forward(dp, B, T, dX, dY, NULL);
    to_host(got, dY, nd);
    double e = ok ? rel_err(got, y, nd) : 1;
    CHECK(ok && e <= tol_y, "[pair %s] inference forward matches (%.1e)", pc->name, e);
    CHECK(device_allocs() == allocs, "[pair %s] no device allocation after create (%zu in the steps)", pc->name,
          device_allocs() - allocs);
    scmoe_pair_destroy(hp);
    scmoe_pair_destroy(dp);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(got);
    cudaFree(dX);
    cudaFree(dY);
    cudaFree(dDY);
    cudaFree(dDX);
}

/* bad input on a device context: every rank gets the error, nothing crashes */
static void run_refusals(scmoe_context *dctx) {
    scmoe_config cfg = scmoe_config_default();
    cfg.d_model = 16;
    cfg.d_hidden = 32;
    cfg.n_experts = 2 * size_;
    cfg.max_tokens = 8;
    cfg.check_finite = 1;
    scmoe_moe *m = NULL;
    scmoe_status s = scmoe_moe_create(dctx, &cfg, &m);
    CHECK(!s, "small layer on the device");
    if (s) return;
    CHECK(scmoe_context_use_cuda(dctx, NULL) == SCMOE_ERR_STATE, "use_cuda with a live layer: STATE (%s)",
          scmoe_last_error(dctx));
    float h[8 * 16];
    fill(h, 8 * 16, 5);
    h[37] = NAN;
    float *dX = dev_alloc(8 * 16), *dY = dev_alloc(8 * 16);
    to_dev(dX, h, 8 * 16);
    CHECK(scmoe_moe_forward(m, 8, dX, dY, NULL) == SCMOE_ERR_NONFINITE, "a NaN in device input: NONFINITE");
    h[37] = 0.5f;
    to_dev(dX, h, 8 * 16);
    CHECK(scmoe_moe_forward(m, 9, dX, dY, NULL) == SCMOE_ERR_N_TOKENS, "9 tokens of 8: N_TOKENS");
    CHECK(scmoe_moe_forward(m, 8, dX, dY, NULL) == SCMOE_OK, "then a good forward works");
#ifdef SCMOE_CUDA_EMU
    emu_fail_copy_after(0); /* the forward's first device copy: its input into the layer */
    scmoe_status st = scmoe_moe_forward(m, 8, dX, dY, NULL);
    CHECK(st == SCMOE_ERR_DEVICE && strstr(scmoe_last_error(dctx), "cudaMemcpyAsync"),
          "a failing device copy: DEVICE, every rank back (%s)", scmoe_last_error(dctx));
    CHECK(scmoe_moe_backward(m, dX, dY, NULL) == SCMOE_ERR_STATE, "no backward of the failed forward: STATE");
    emu_fail_copy_after(2); /* after the input and the non-finite flag */
    st = scmoe_moe_forward(m, 8, dX, dY, NULL);
    CHECK(st == SCMOE_ERR_DEVICE, "a copy failing later in the forward (the gate's results): DEVICE (%s)",
          scmoe_last_error(dctx));
    CHECK(scmoe_moe_forward(m, 8, dX, dY, NULL) == SCMOE_OK, "the failure is reported once: the next forward works");
#endif
    scmoe_moe_destroy(m);
    cudaFree(dX);
    cudaFree(dY);
}

int main(int argc, char **argv) {
#ifdef SCMOE_WITH_MPI
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
#endif
    check_quiet = rank_ != 0;
#ifdef SCMOE_CUDA_EMU
    emu_protect_device(1);
#endif
    scmoe_context *hctx = NULL, *dctx = NULL;
    CHECK(!make_ctx(&hctx) && !make_ctx(&dctx), "two contexts");
    scmoe_cuda_options o = scmoe_cuda_options_default();
    CHECK(scmoe_context_use_cuda(NULL, &o) == SCMOE_ERR_NULL, "use_cuda(NULL): NULL");
    o.math = (scmoe_cuda_math)7;
    CHECK(scmoe_context_use_cuda(dctx, &o) == SCMOE_ERR_OPTION, "unknown math: OPTION (%s)", scmoe_last_error(dctx));
    o = scmoe_cuda_options_default();
    o.offload_experts = -1;
    CHECK(scmoe_context_use_cuda(dctx, &o) == SCMOE_ERR_OPTION, "offload_experts -1: OPTION (%s)",
          scmoe_last_error(dctx));
    o = scmoe_cuda_options_default();
    o.cuda_aware_mpi = 2;
    CHECK(scmoe_context_use_cuda(dctx, &o) == SCMOE_ERR_OPTION, "cuda_aware_mpi 2: OPTION (%s)",
          scmoe_last_error(dctx));
    o = scmoe_cuda_options_default();
    o.device = 4096;
    CHECK(scmoe_context_use_cuda(dctx, &o) == SCMOE_ERR_UNSUPPORTED, "device 4096: UNSUPPORTED (%s)",
          scmoe_last_error(dctx));
    scmoe_status s = scmoe_context_use_cuda(dctx, NULL);
    if (s == SCMOE_ERR_UNSUPPORTED) {
        CHECK(!strcmp(scmoe_context_backend(dctx), "host"), "a failed move leaves the context on the host");
        if (!rank_)
            printf("ok - the MoE layer on the device vs the host # SKIP no CUDA device (%s)\n", scmoe_last_error(dctx));
    } else {
        CHECK(!s && !strcmp(scmoe_context_backend(dctx), "cuda") && !strcmp(scmoe_context_backend(hctx), "host"),
              "context on device 0: %s", s ? scmoe_last_error(dctx) : "ok, backend cuda");
        CHECK(scmoe_context_use_cuda(dctx, NULL) == SCMOE_ERR_STATE, "twice: STATE");
        const tcase cases[] = {
            {"top1 gelu dropless", 1, 0, 0, SCMOE_GELU, 0.0f, 0.0f, 0.0f, 0, 0},
            {"top2 swiglu drops z noise", 2, 0, 0, SCMOE_SWIGLU, 1.0f, 1e-3f, 0.5f, 0, 0},
            {"top2 gelu drops 3 chunks", 2, 3, 0, SCMOE_GELU, 1.25f, 0.0f, 0.0f, 0, 0},
            {"top1 swiglu bf16 wire 2 chunks", 1, 2, 1, SCMOE_SWIGLU, 2.0f, 0.0f, 0.0f, 0, 0},
            {"top2 gelu drops z, capacity per rank, 2 chunks", 2, 2, 0, SCMOE_GELU, 0.75f, 1e-3f, 0.0f, 1, 0},
            {"top2 swiglu drops, precision bf16", 2, 0, 0, SCMOE_SWIGLU, 1.0f, 0.0f, 0.0f, 0, 1},
            {"top1 gelu dropless, precision bf16, 2 chunks", 1, 2, 0, SCMOE_GELU, 0.0f, 0.0f, 0.0f, 0, 1},
        };
        for (size_t i = 0; !s && i < sizeof cases / sizeof *cases; i++) run_case(hctx, dctx, &cases[i], 0);
        const pcase pairs[] = {
            {"scmoe pos 2 cg1 gelu", SCMOE_ARCH_SCMOE, 2, 0, SCMOE_COMBINE_CG1, SCMOE_GELU, 0, 0},
            {"scmoe pos 1 add swiglu", SCMOE_ARCH_SCMOE, 1, 0, SCMOE_COMBINE_ADD, SCMOE_SWIGLU, 0, 0},
            {"scmoe pos 3 cg1 2 chunks", SCMOE_ARCH_SCMOE, 3, 2, SCMOE_COMBINE_CG1, SCMOE_GELU, 0, 0},
            {"top2 gelu", SCMOE_ARCH_TOP2, 2, 0, SCMOE_COMBINE_CG1, SCMOE_GELU, 0, 0},
            {"shared cg1 swiglu", SCMOE_ARCH_SHARED, 2, 0, SCMOE_COMBINE_CG1, SCMOE_SWIGLU, 0, 0},
            {"scmoe pos 2 swiglu, precision bf16", SCMOE_ARCH_SCMOE, 2, 0, SCMOE_COMBINE_CG1, SCMOE_SWIGLU, 1, 0},
        };
        for (size_t i = 0; !s && i < sizeof pairs / sizeof *pairs; i++) run_pair_case(hctx, dctx, &pairs[i]);
        /* expert offloading: one slot (fewer than the experts with rows: fetched on demand, evicted), and
         * as many as there are experts */
        for (int slots = 1; slots <= 4; slots += 3) {
            scmoe_context *octx = NULL;
            scmoe_cuda_options o = scmoe_cuda_options_default();
            o.offload_experts = slots;
            CHECK(!make_ctx(&octx) && !scmoe_context_use_cuda(octx, &o), "a context offloading experts, %d slot(s)",
                  slots);
            for (size_t i = 1; octx && i < 3; i++) run_case(hctx, octx, &cases[i], slots);
            if (octx) run_pair_case(hctx, octx, &pairs[0]); /* the shortcut gate picks what is fetched */
            scmoe_context_destroy(octx);
        }
#ifdef SCMOE_CUDA_EMU
        /* a CUDA-aware MPI: exchanges and summed gradients in device memory, which MPI reads itself (here
         * the emulated device's memory is the host's, so it is left unprotected for these) */
        scmoe_context *actx = NULL;
        scmoe_cuda_options ao = scmoe_cuda_options_default();
        ao.cuda_aware_mpi = 1;
        CHECK(!make_ctx(&actx) && !scmoe_context_use_cuda(actx, &ao), "a context with a CUDA-aware MPI");
        emu_protect_device(0);
        if (actx) {
            run_case(hctx, actx, &cases[3], 0);
            run_pair_case(hctx, actx, &pairs[2]);
        }
        emu_protect_device(1);
        scmoe_context_destroy(actx);
        /* copies to MPI's buffers landing late: the host polls them and MPI starts only once they landed */
        if (size_ > 1) {
            const pcase late = {
                "scmoe pos 2, copies land a poll late", SCMOE_ARCH_SCMOE, 2, 0, SCMOE_COMBINE_CG1, SCMOE_GELU, 0, 1};
            emu_copy_polls(1);
            run_pair_case(hctx, dctx, &late);
            emu_copy_polls(0);
        }
#endif
        /* routing on the device against the host planner (host_routing), both on a device */
        scmoe_context *rctx = NULL;
        scmoe_cuda_options ro = scmoe_cuda_options_default();
        ro.host_routing = 2;
        CHECK(!make_ctx(&rctx) && scmoe_context_use_cuda(rctx, &ro) == SCMOE_ERR_OPTION, "host_routing 2: OPTION (%s)",
              rctx ? scmoe_last_error(rctx) : "no context");
        ro.host_routing = 1;
        CHECK(rctx && !scmoe_context_use_cuda(rctx, &ro), "a device context planning on the host");
        const rcase routes[] = {
            {"top1 dropless", 1, 0, 0, 0.0f, SCMOE_PRIORITY_TOKEN, SCMOE_AUX_GLOBAL},
            {"top2 drops", 2, 0, 0, 0.75f, SCMOE_PRIORITY_TOKEN, SCMOE_AUX_GLOBAL},
            {"top2 drops, 2 chunks", 2, 2, 0, 0.5f, SCMOE_PRIORITY_TOKEN, SCMOE_AUX_GLOBAL},
            {"top1 drops, aux and z over my tokens", 1, 0, 0, 0.75f, SCMOE_PRIORITY_TOKEN, SCMOE_AUX_LOCAL},
            {"top2 drops, capacity per rank, 2 chunks", 2, 2, 1, 0.5f, SCMOE_PRIORITY_TOKEN, SCMOE_AUX_GLOBAL},
            {"top1 drops, capacity per rank", 1, 0, 1, 1.0f, SCMOE_PRIORITY_TOKEN, SCMOE_AUX_GLOBAL},
            {"top2 drops, batch priority, capacity per rank", 2, 0, 1, 0.75f, SCMOE_PRIORITY_BATCH, SCMOE_AUX_GLOBAL},
            {"top1 drops, batch priority", 1, 0, 0, 0.5f, SCMOE_PRIORITY_BATCH, SCMOE_AUX_GLOBAL},
            {"top2 dropless, batch priority", 2, 0, 0, 0.0f, SCMOE_PRIORITY_BATCH, SCMOE_AUX_GLOBAL},
            {"top2 drops, batch priority, capacity per rank, 2 chunks", 2, 2, 1, 0.5f, SCMOE_PRIORITY_BATCH,
             SCMOE_AUX_GLOBAL},
        };
        for (size_t i = 0; rctx && i < sizeof routes / sizeof *routes; i++) run_route_case(dctx, rctx, &routes[i]);
        scmoe_context_destroy(rctx);
        if (!s) run_refusals(dctx);
#ifdef SCMOE_CUDA_EMU
        const void *first = NULL;
        size_t uninit = emu_uninit_words(&first);
        CHECK(uninit == 0, "no device bytes copied out before anything wrote them (%zu words, first at %p)", uninit,
              first);
#endif
    }
    scmoe_context_destroy(hctx);
    scmoe_context_destroy(dctx);
#ifdef SCMOE_WITH_MPI
    int failed = check_failed, any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    if (rank_) return any ? 1 : 0;
    if (any && !check_failed) check_failed = 1; /* another rank's failure */
#endif
    return check_summary();
}
