/* scmoe_internal.h: the objects behind the public handles, shared by the core's files. */
#ifndef SCMOE_INTERNAL_H
#define SCMOE_INTERNAL_H

#include "scmoe.h"
#include "ops.h"
#include "mpi_backend/comm.h"

struct scmoe_context {
    comm *world;
    const blas_backend *blas;
    blas_backend *host_blas;    /* the host's table with bf16 GEMMs, made by the first bf16 object (NULL: none yet) */
    const compute_ops *compute; /* scmoe__compute_host(), or a device backend's (scmoe_context_use_cuda) */
    /* a device backend's state, released with the context (NULL: none) */
    void *backend;
    void (*backend_release)(void *backend);
    int objects;          /* layers and pairs created on it and not yet destroyed */
    int64_t creates;      /* create calls made on it: the next object's id in the call agreement */
    scmoe_status broken;  /* SCMOE_ERR_TIMEOUT or SCMOE_ERR_COMM once a communicator of it failed (0: fine) */
    char broken_err[256]; /* the detail of that failure */
    int offload_experts;  /* a device's routed experts' weights kept on the host, this many cached (0: off) */
    int traces;           /* pairs that opened an SCMOE_TRACE file, to name the next one apart */
    char err[512];
};

/* Wraps a communicator (serial or MPI) in a new context; the context owns it. */
scmoe_status scmoe__context_create_with(comm *world, scmoe_context **out);
/* The start of every *_create: validates cfg (its message on ctx) and agrees on it with every rank. */
/* It is the object's first call agreement: calls receives the object's id and config hash, seq 1. */
typedef struct scmoe__calls scmoe__calls;
scmoe_status scmoe__config_check(scmoe_context *ctx, const scmoe_config *cfg, scmoe__calls *calls);
/* What an object's kernels run with on ctx: its GEMM and compute tables, and tiles of poll_cols columns or
 * poll_us on the host (exec.h; on a device a GEMM is only enqueued, so a poll between tiles would run at enqueue time and a tile
 * would only cost a launch: whole GEMMs). */
exec scmoe__context_exec(const scmoe_context *ctx, const scmoe_config *cfg);

/* Waits for the context's device and returns SCMOE_ERR_DEVICE (with the CUDA error) if a kernel, copy
 * or GEMM of it failed since the last check; the host backend never fails. A call that hands results
 * to the caller ends with it. */
scmoe_status scmoe__context_device_check(scmoe_context *ctx);

/* Records the detail of a failure on ctx and returns status. A SCMOE_ERR_TIMEOUT or SCMOE_ERR_COMM also
 * breaks the context (see call_agree): a collective may still be pending, and MPI cannot cancel it. */
scmoe_status scmoe__fail(scmoe_context *ctx, scmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
double scmoe__now(void);
/* A bump allocator over one block, 64-byte aligned, that can also only count: a layout function run once
 * with base NULL sizes the block (used), then again over the allocated block hands out the same
 * pointers, so sizes are never written twice. */
typedef struct arena {
    char *base;
    size_t used;
} arena;
/* The next bytes: base + used (NULL while counting), then used grows by bytes rounded up to 64. */
void *scmoe__arena_take(arena *a, size_t bytes);

/* ---- parameters: registered by name, then laid out in one allocation each for data, grad and stage ---- */
enum { SYNC_NONE = 0, SYNC_WORLD = 1, SYNC_REPLICAS = 2 };
enum { INIT_ZERO = 0, INIT_ONE = 1, INIT_NORMAL = 2 };

typedef struct param_entry {
    scmoe_tensor t;
    char name[64];
    size_t offset, offset_stage;
    int sync; /* which group sums this gradient after backward */
    int init;
    float init_std;
    uint64_t init_key;
    float *gwork;  /* where backward writes: t.grad, or a staging area summed over ranks first */
    int host_data; /* its data live in mapped host memory (expert offloading), at offset_data there */
    size_t offset_data;
} param_entry;

typedef struct param_table {
    param_entry *p;
    int n, cap;
    int failed;            /* an add ran out of memory: every later add fails too */
    size_t total;          /* floats */
    size_t stage_total;    /* floats staged for a sum over ranks */
    size_t stage_world;    /* the first stage_world of them are summed over all ranks, the rest over replicas */
    const compute_ops *co; /* where data and grad live (device memory), and stage (co->exchange_kind) */
    float *data, *grad, *stage;
    float *stage_dev;    /* co->copy_out: where the backward writes the summed tensors' gradients (device memory,
                         stage's layout), copied to stage per bucket; NULL: it writes stage itself */
    float *data_host;    /* mapped: the data of host_data tensors */
    int prefix_len;      /* bytes of the host's name prefix in front of every name (scmoe_*_set_name_prefix) */
    uint16_t *data_bf16; /* SCMOE_PRECISION_BF16: data rounded to bf16, same offsets, co's memory (precision.c) */
} param_table;

/* Adds a tensor; returns its index, or -1 and sets failed (NOMEM). Pointers are set by scmoe__params_allocate. */
int scmoe__params_add(param_table *pt, const char *name, int ndim, const int *shape, int sync, int init, float std,
                      uint64_t key);
/* Allocates data, grad (co's device memory) and staging (co->exchange_kind: stage, 1 if this rank's
 * gradients must be summed over ranks), and initialises the values. */
scmoe_status scmoe__params_allocate(param_table *pt, const compute_ops *co, int world_sync, int replica_sync);
void scmoe__params_free(param_table *pt);
int scmoe__params_find(const param_table *pt, const char *name);
void scmoe__params_zero_stage(param_table *pt);
void scmoe__params_zero_grad(param_table *pt);
/* the public accessors' bodies: by index, and by name (NOT_FOUND with a message on ctx) */
scmoe_status scmoe__params_at(const param_table *pt, int i, scmoe_tensor *t);
scmoe_status scmoe__params_named(scmoe_context *ctx, const param_table *pt, const char *name, scmoe_tensor *t);
/* grad += stage for every staged tensor */
void scmoe__params_add_stage(param_table *pt);
/* every staged gradient where MPI reads it: stage_dev copied to stage (and waited for), else the device synced */
void scmoe__params_stage_ready(param_table *pt);
/* Replaces the name prefix of every tensor (controls.c); OPTION with a message on ctx if a name would
 * not fit, and then nothing changes. */
scmoe_status scmoe__params_set_prefix(scmoe_context *ctx, param_table *pt, const char *prefix);
/* precision.c: with cfg->precision BF16, points ex at bf16 GEMMs (the host's table, made on first use) and
 * gives pt a bf16 copy of its data (after scmoe__params_allocate; device memory on a device); nothing with FP32. */
scmoe_status scmoe__precision_attach(scmoe_context *ctx, const scmoe_config *cfg, param_table *pt, exec *ex);
/* Rounds pt's data into its bf16 copy again (scmoe_*_params_changed); nothing without one. */
void scmoe__precision_refresh(param_table *pt);
/* precision BF16 on a device: its GEMMs' bf16 activation scratch holds n elements (compute_ops.bf16_reserve),
 * allocated here, at create, not in the first forward; nothing otherwise. NOMEM with a message on ctx. */
scmoe_status scmoe__precision_reserve(scmoe_context *ctx, const scmoe_config *cfg, size_t n);

/* ---- a nonblocking exchange in flight, timed ---- */
typedef struct inflight {
    comm *c;
    int req, active;
    float *unpack_to; /* bf16 wire: where the received rows go as floats on completion */
    const uint16_t *unpack_from;
    const int *unpack_counts, *unpack_displs; /* rows per peer, in the float layout (also the mirror's copies) */
    float *copy_to;   /* mirrored exchange (moe_exchange.send_m): where the received peer blocks go on completion, */
    float *copy_from; /* from MPI's mapped mirror of it */
    int held;         /* mirrored: the peer blocks are being copied out; MPI starts once they have landed */
    const float *send_from; /* then: what MPI sends (the mirror), sends counts and displacements */
    const int *send_counts, *send_displs;
    int row;      /* floats per row */
    int metadata; /* routing counts or statistics (capacity LOCAL): traced, but not counted in
                                  the token exchanges' comm_time / exposed_time (their overlap figures) */
    double t_start, t_done, t_waited;
} inflight;

/* ---- the MoE layer, as phases a schedule can interleave with other work ---- */
#define MOE_MAX_STAGES (SCMOE_MAX_PIPELINE_CHUNKS + 1)
#define MOE_LSTATS(E)  (3 * (E) + 5)
#define MOE_AGREE      4 /* capacity GLOBAL, TOKEN priority: my token count, then my input's rejection flags */

/* The gate's per-token outputs that routing (host code) reads, [max_tokens] rows each. On a device
 * backend that plans on the host (not droute) the host holds a mirror (moe_layer.gate_h) and one copy
 * per forward moves the block they form: gate_outputs_take lays them out, in this order, as one block on
 * either side, so nothing else can sit between them; choice is last, so n tokens' outputs end at
 * choice + n k. */
typedef struct gate_outputs {
    float *p;     /* [n, E] softmax over every expert */
    float *lse;   /* [n] logsumexp of the logits (the z-loss) */
    float *score; /* [n] the top-1 p (batch priority) */
    int *choice;  /* [n, k] the experts chosen */
} gate_outputs;
/* the bytes of n tokens' outputs, from p to the end of choice */
static inline size_t gate_outputs_bytes(const gate_outputs *g, int n, int k) {
    return (size_t)((char *)(g->choice + (size_t)n * k) - (char *)g->p);
}

/* What the kernels read of the plan, written on the host each forward: the aux-loss coefficients, the
 * plan's slot and recv_to_expert (droute: slot is written on the device, the other two go down one by
 * one). On a device backend moe_layer.plan_d holds the device's copies, and one copy moves the block
 * (plan_mirror_take lays it out the same way on either side; recv_to_expert last, so a plan ends at
 * recv_to_expert + n_recv). */
typedef struct plan_mirror {
    float *aux_coef;     /* [E] dL/dp[t, e] of the weighted aux loss (scmoe__gate_backward) */
    int *slot;           /* [max_send] */
    int *recv_to_expert; /* [max_recv] */
} plan_mirror;
/* bytes of the block holding a plan of n_recv received rows */
static inline size_t plan_mirror_bytes(const plan_mirror *g, int n_recv) {
    return (size_t)((char *)(g->recv_to_expert + n_recv) - (char *)g->aux_coef);
}

/* capacity per source rank (LOCAL): each rank's counts for each peer's experts by round, after its input
 * status ([ep_size][1 + E_local*k], out and in, exchanged as one element per peer: ones, iota), and the
 * statistics reduced without blocking ([MOE_LSTATS(E)], layout in moe.c) */
typedef struct moe_local_cap {
    int32_t *counts_out, *counts_in;
    int *ones, *iota;
    double *lstats;
    inflight xcount, xstats;
    int stats_pending;  /* xstats started by this forward, not yet folded into the plan and losses */
    int counts_pending; /* xcount started by this forward, the plan's receive side not yet built from it */
} moe_local_cap;

/* capacity over the global batch (GLOBAL), without any other rank's records: my token count and input
 * status ([MOE_AGREE]), then my per-(round, expert) counts ([k E], scmoe__route_round_counts), each as
 * [in | prefix over the ranks below | total] of one comm scan_i64_start over the world; with BATCH
 * priority then the selection's rounds (route_batch.c): histograms all-reduced in hist, the ties'
 * counts scanned in ties. The counts message to the expert-parallel group and its all-to-all are
 * LOCAL's (lcap.counts_*, xcount). */
typedef enum gscan_phase { GSCAN_COUNTS, GSCAN_HISTOGRAM, GSCAN_TIES, GSCAN_DONE } gscan_phase;
typedef struct moe_global_counts {
    int64_t *agree;  /* [3 MOE_AGREE], then the scan's work */
    int64_t *counts; /* [3 k E], then the scan's work */
    /* the counts' scan (then the selection's rounds) and the statistics' all-reduce, started in the
     * gate's phase (planned on the device: once its summary has landed) and finished at a poll or
     * where the dispatch starts */
    int scanning;      /* xscan (and xsum) started by this forward, the plan not yet made from them */
    gscan_phase phase; /* what xscan carries: the counts' scan, a histogram, the ties' scan; done */
    inflight xscan, xsum;
    int64_t S;        /* this forward's global batch (agree_token_scan) */
    int select;       /* this forward selects (BATCH priority, a capacity): sel, hist and ties */
    route_select sel; /* the selection's state */
    double *hist;     /* [route_select_bins(k E)]: a round's histogram, summed in place */
    int64_t *ties;    /* [k E] my ties | prefix | total (then the plan's scratch) | the scan's work */
} moe_global_counts;

/* routing planned on the device (issue 19; compute_ops.route_local: capacity per source rank, or one
 * rank, either priority; GLOBAL with TOKEN priority over several ranks, the slots finished by
 * compute_ops.route_global from the bases of the counts' scan, gcount): the gate's outputs stay on the
 * device; its kernels write slot there and a summary (the counts message lcap.counts_out, gsum, top1,
 * kept) into mapped memory, seq_word last. The host
 * reads it once seq_word says it landed (a poll, at the latest the first dispatch): nothing else of
 * the plan crosses to the host, and the host never waits for the stream to drain. */
typedef struct moe_device_route {
    int on;
    int pending;          /* this forward's summary not yet folded into the plan (its exchanges not started) */
    uint32_t seq;         /* what seq_word holds once this forward's summary has landed */
    uint32_t *seq_word;   /* mapped */
    int32_t *top1, *kept; /* mapped [E] */
    double *gsum;         /* mapped [E + 1] */
    int *work;            /* device [(k + 2) E] (+ n: BATCH priority; (3 k + 2) E: GLOBAL capacity) */
    double *work_sum;     /* device [E + 1] */
    int64_t *base_h;      /* GLOBAL capacity: pinned [k E + 1], scmoe__route_plan_global_counts' bases */
    int64_t *base;        /* and the device's copy */
} moe_device_route;

/* activations and rows on the compute side (device memory on a device backend) */
typedef struct moe_buffers {
    float *logits, *dlogits; /* [max_tokens, E] */
    float *weight, *dweight; /* [max_tokens, k] the combine weights */
    /* expert-major rows [max_recv, .]: the experts' input and output (ye is also backward's dy rows: it
     * is free once forward is decoded), their input gradient, the FFN's pre-activation and hidden */
    float *xe, *ye, *dxe, *pre, *dpre, *hid, *dhid;
} moe_buffers;

/* the token exchanges: what MPI moves, what travels in each stage, and the exchanges in flight */
typedef struct moe_exchange {
    float *send, *recv, *crecv; /* send layout [max_send, d], receive layout [max_recv, d], combine's return */
    /* MPI's side of them. A device whose MPI reads host memory (compute_ops.copy_in, more than one rank): the
     * kernels' send, recv and crecv are device memory and these their mapped mirrors, each peer block moved
     * in one copy (copy_out when an exchange starts, MPI starting once they have landed: inflight.held;
     * copy_in when it is waited for); else the same buffers */
    float *send_m, *recv_m, *crecv_m;
    /* bf16 wire buffers (wire_bf16): dispatches send from the send layout into the receive layout,
     * combines the other way; a pipeline has both in flight, so each direction has its own pair */
    uint16_t *wire_d_out, *wire_d_in, *wire_c_out, *wire_c_in;
    /* [n_stages * ep_size]: what travels in each stage, send and receive side (my own block never does) */
    int *xs_counts, *xs_displs, *xr_counts, *xr_displs;
    inflight xd[MOE_MAX_STAGES], xc[MOE_MAX_STAGES]; /* each stage's dispatch and combine */
    int next_dispatch;     /* the next stage whose dispatch has not started (MOE_MAX_STAGES: none to start) */
    scmoe_status deferred; /* a dispatch started from scmoe__moe_poll that failed, reported by the next wait */
} moe_exchange;

/* expert offloading (slots > 0): the routed experts' weights live in mapped host memory and at most
 * slots of them on the device at a time, each as the span of its w1, b1, w2, b2 */
typedef struct moe_offload {
    int slots, victim;   /* victim: the slot the next fetch takes (round robin) */
    int fetched;         /* expert weight sets copied in during this call */
    int prefetched;      /* copies in flight that the experts must wait for */
    size_t span;         /* floats of one expert's four tensors, padding included */
    float *cache;        /* [slots * span], device */
    int *slot_of, *held; /* [E_local] expert -> slot or -1; [slots] slot -> expert or -1 */
} moe_offload;

typedef struct moe_layer {
    scmoe_context *ctx;
    scmoe_config cfg;
    param_table *pt;
    const compute_ops *co;         /* the context's: where the buffers live, what runs on them */
    void *mem, *mem_dev, *mem_map; /* the workspace: host, device and exchanged (co->exchange_kind) memory */
    void *mem_pin;                 /* and mapped memory the device writes for the host (droute) */
    /* the expert-parallel group, twice: dispatches go on ep, combines on ep_back. A pipeline starts
     * each dispatch as soon as the one before has landed, noticed by a poll at a moment that differs
     * between ranks; MPI matches collectives by their order on a communicator, so the two kinds must
     * not share one. replicas: the ranks holding the same experts */
    comm *ep, *ep_back, *replicas;
    int E, E_local, k, d, h, h1, first_expert, ep_size, ep_rank;
    int max_tokens, max_send, max_recv;
    int training;
    uint64_t step;
    /* parameters (into the owner's table) */
    int p_wg, p_e0; /* gate.weight; local expert i's w1, b1, w2, b2 are p_e0 + 4i + 0..3 */
    float *wg;
    /* the gate and routing (host memory) */
    route_plan plan; /* its slot and recv_to_expert are the host side of plan_d's mirror */
    void *route_work;
    int32_t *records;    /* [max_tokens, k + 1]: my tokens' k expert ids, then the top-1 p's bits */
    double *gsum;        /* [E + 1]: sum_s p[s, e] then sum_s lse^2, reduced over ranks */
    int64_t *top1_count; /* [E] */
    float *aux_coef_h;   /* [E], the host side of plan_d.aux_coef */
    float aux_loss, z_loss, z_coef;
    int local_cap;            /* capacity_scope LOCAL (or one rank planning on the device): lcap, else gcount */
    moe_global_counts gcount; /* GLOBAL */
    moe_local_cap lcap;
    moe_device_route droute;
    gate_outputs gate, gate_h; /* the compute side's, and the host's (the same arrays on the host backend) */
    plan_mirror plan_d;        /* the compute side's (on the host backend aux_coef_h and the plan's arrays) */
    moe_buffers buf;
    moe_exchange xch;
    moe_offload off;
    /* state of the current step */
    int n;
    const float *x;
    int forward_done;
    int pass;                       /* 0 forward, 1 backward: names the exchanges and picks the combine's target */
    double comm_time, exposed_time; /* this pass's exchanges: time in flight, and time the caller waited */
    /* told of every exchange as it completes (a schedule's timing and trace); may be NULL */
    void (*on_wait)(void *arg, const char *what, const inflight *f);
    void *on_wait_arg;
} moe_layer;

/* parameter idx's values and its gradient's accumulator (the table's) */
static inline float *moe_param_data(const moe_layer *m, int idx) { return m->pt->p[idx].t.data; }
static inline float *moe_param_gwork(const moe_layer *m, int idx) { return m->pt->p[idx].gwork; }

/* Creates the groups (collective) and registers the parameters under prefix. */
scmoe_status scmoe__moe_init(moe_layer *m, scmoe_context *ctx, const scmoe_config *cfg, int top_k, param_table *pt,
                             const char *prefix, float w2_std);
/* Sizes and allocates the workspace (after scmoe__params_allocate, which fixes the parameter pointers). */
scmoe_status scmoe__moe_alloc(moe_layer *m);
void scmoe__moe_free(moe_layer *m);
/* requests pending on the layer's groups; scmoe__moe_abandon: frees it without communicating (an abort), keeping
 * the workspace when an exchange may still write into it */
int scmoe__moe_pending(const moe_layer *m);
void scmoe__moe_abandon(moe_layer *m, int keep_workspace);
void scmoe__moe_bind_comms(moe_layer *m);

/* forward: gate_encode (small blocking collectives; capacity LOCAL: the counts' all-to-all, waited for
 * where the dispatch starts, and the statistics' all-reduce, left in flight until combine_wait) ->
 * dispatch_start -> experts_forward ->
 * combine_wait -> decode. experts_forward goes stage by stage (route.c): it waits for a stage's dispatch, starts the
 * next one, runs the experts on the stage's rows and starts its combine; without pipelining that is
 * wait, experts, combine. */
scmoe_status scmoe__moe_gate_encode(moe_layer *m, const exec *ex, int n, const float *x);
/* moe_gate_encode.c, for moe.c's dispatch: fold in what has landed at a poll; whether the plan's
 * receive side can be built without waiting; wait for it and build it; the statistics' all-reduce
 * (LOCAL) waited for and folded in (the forward's last wait) */
scmoe_status scmoe__moe_route_poll(moe_layer *m);
int scmoe__moe_route_landed(const moe_layer *m);
scmoe_status scmoe__moe_route_finish(moe_layer *m);
scmoe_status scmoe__moe_stats_finish(moe_layer *m);
/* moe_gate_encode.c: the plan made, its exchanges' stages, the copies of the plan to a device, my rows
 * packed unless packed already, the experts' prefetch */
void scmoe__moe_plan_ready(moe_layer *m, int packed);
/* moe_exchange.c: an exchange or small collective in flight (inflight), started, tested, waited for
 * (what names it in errors and profiles); whether token rows cross through mapped mirrors */
void scmoe__moe_inflight_begin(inflight *f, comm *c);
void scmoe__moe_inflight_test(inflight *f);
scmoe_status scmoe__moe_inflight_wait(moe_layer *m, inflight *f, const char *what);
int scmoe__moe_exchange_mirrored(const moe_layer *m);
/* moe_offload.c: a forward's prefetch of the experts that received rows; local expert i's w1, b1, w2,
 * b2 where the kernels read them (the table's, or its slot's, fetched now if it is not there) */
void scmoe__moe_experts_prefetch(moe_layer *m);
void scmoe__moe_expert_weights(moe_layer *m, int i, float *w[4]);
/* starts the first stage's exchange: forward the input rows, backward (after decode_backward) dy's;
 * capacity LOCAL, forward: once the routing counts have landed (now, at a poll, or at the wait) */
scmoe_status scmoe__moe_dispatch_start(moe_layer *m);
/* starts stage s's dispatch (combine 0) or combine (1) on its own (run_stages starts the rest) */
scmoe_status scmoe__moe_exchange_start(moe_layer *m, int s, int combine);
/* waits for that first exchange (a serialized order times it apart) */
scmoe_status scmoe__moe_dispatch_wait(moe_layer *m);
scmoe_status scmoe__moe_experts_forward(moe_layer *m, const exec *ex);
/* waits for every combine of the pass (forward, capacity LOCAL: first for the gate statistics, which
 * may carry another rank's input error) */
scmoe_status scmoe__moe_combine_wait(moe_layer *m);
/* y = beta * y + sum_j w_j E_j(x) */
void scmoe__moe_decode(moe_layer *m, float *y, float beta);
/* backward: decode_backward -> dispatch_start -> experts_backward -> combine_wait -> scmoe__gate_backward */
void scmoe__moe_decode_backward(moe_layer *m, const float *dy);
scmoe_status scmoe__moe_experts_backward(moe_layer *m, const exec *ex);
/* dx = beta * dx + dL/dx through the routed rows, the gate, and the aux and z losses */
void scmoe__moe_gate_backward(moe_layer *m, const exec *ex, float *dx, float beta);
/* hidden / total exchange time: 1 - min(exposed, comm) / comm, 1 when nothing was exchanged */
double scmoe__overlap_fraction(double comm, double exposed);
/* exec poll hook (arg: the moe_layer): tests the exchanges in flight when the progress policy is POLL */
void scmoe__moe_poll(void *arg);
/* on a device whose MPI reads host memory, starts MPI on the exchanges whose peer blocks' copies out have
 * landed since (a query, never a wait; a failure is reported by the next wait): the schedule calls it after
 * each operation it enqueues, scmoe__moe_poll at every poll */
void scmoe__moe_release(moe_layer *m);

void scmoe__moe_fill_stats(const moe_layer *m, scmoe_stats *st);
/* The aux and z loss weights from the next forward on (controls.c); LOSS_WEIGHT if not finite and >= 0. */
scmoe_status scmoe__moe_set_loss_weights(moe_layer *m, float aux, float z);

/* collectives used at create */
/* ep and ep_back: the same expert-parallel group twice (dispatches and combines, see moe_layer) */
scmoe_status scmoe__groups_create(scmoe_context *ctx, int ep_size_cfg, comm **ep, comm **ep_back, comm **replicas);
scmoe_status scmoe__status_agree(scmoe_context *ctx, scmoe_status local);

/* ---- the per-call agreement: every COLLECTIVE call on an object starts with it ---- */
enum { SCMOE__CALL_CREATE = 1, SCMOE__CALL_FORWARD, SCMOE__CALL_BACKWARD };
/* An object's place in its call sequence, agreed on by every rank at the start of each call */
struct scmoe__calls {
    int64_t id;    /* the object's creation index on its context */
    int64_t seq;   /* collective calls made on it so far */
    uint64_t hash; /* its config's hash, agreed at create */
};
/* Refuses at once, without communicating, when ctx is broken (SCMOE_ERR_STATE naming the failure);
 * otherwise one all-reduce over the context in which every rank says which object, which call, its
 * sequence number, the mode (training 1 / inference 0) and its local status. Every rank returns
 * SCMOE_ERR_STATE if they differ (naming what the others called), the worst local status otherwise. */
scmoe_status scmoe__call_agree(scmoe_context *ctx, scmoe__calls *calls, int call, int training, scmoe_status local);
/* SCMOE_ERR_STATE with the reason when ctx is broken, SCMOE_OK otherwise (no communication) */
scmoe_status scmoe__ctx_usable(scmoe_context *ctx);

#endif
