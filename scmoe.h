/*
 * scmoe.h: Mixture-of-Experts transformer layers with shortcut-connected expert parallelism (ScMoE).
 *
 * Cai et al., "Shortcut-connected Expert Parallelism for Accelerating Mixture-of-Experts"
 * (arXiv 2404.05019). The library owns two objects:
 *
 *   scmoe_moe   one MoE layer: gate, routing with capacity, experts (FFNs), over expert parallelism.
 *   scmoe_pair  a dense transformer block l followed by an MoE block l+1, in one of five variants
 *               (top2, top1, shared, scmoe with shortcut position 1|2|3). The pair owns the whole
 *               block pair because the ScMoE schedule hides the MoE's all-to-all behind block l's
 *               own computation.
 *
 * Conventions (the embedder's contract):
 *   - Tensors are flat row-major float arrays; tokens are rows, d_model columns.
 *   - Every call returns a scmoe_status; scmoe_strerror() names it and scmoe_last_error() gives the
 *     detail of the last failure on a context.
 *   - The library allocates only in *_create, never prints, never exits, keeps no global state.
 *   - Buffers passed in stay the caller's; the library never keeps a pointer to them past the call,
 *     except the input of a training forward, which must stay unchanged until the backward.
 *   - With MPI (scmoe_mpi.h), calls marked COLLECTIVE must be made by every rank of the context's
 *     communicator, in the same order.
 */
#ifndef SCMOE_H
#define SCMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SCMOE_VERSION_MAJOR 0
#define SCMOE_VERSION_MINOR 1
#define SCMOE_VERSION_PATCH 0

typedef enum scmoe_status {
    SCMOE_OK = 0,
    SCMOE_ERR_NULL,            /* a required pointer argument was NULL */
    SCMOE_ERR_NOMEM,           /* an allocation failed */
    SCMOE_ERR_D_MODEL,         /* d_model < 1 */
    SCMOE_ERR_D_HIDDEN,        /* d_hidden < 1 (expert or dense MLP hidden size) */
    SCMOE_ERR_N_EXPERTS,       /* n_experts < 1 */
    SCMOE_ERR_TOP_K,           /* top_k < 1 or top_k > n_experts */
    SCMOE_ERR_CAPACITY,        /* capacity factor is NaN or infinite */
    SCMOE_ERR_LOSS_WEIGHT,     /* aux or z loss weight negative or not finite */
    SCMOE_ERR_NOISE,           /* gate noise std negative or not finite */
    SCMOE_ERR_ACTIVATION,      /* unknown activation */
    SCMOE_ERR_PRIORITY,        /* unknown routing priority */
    SCMOE_ERR_MAX_TOKENS,      /* max_tokens < 1 */
    SCMOE_ERR_N_TOKENS,        /* n_tokens < 0 or > max_tokens */
    SCMOE_ERR_NONFINITE,       /* NaN or Inf found in an input (only with check_finite) */
    SCMOE_ERR_ARCH,            /* unknown arch */
    SCMOE_ERR_SHORTCUT_POS,    /* shortcut_pos not 1, 2 or 3 */
    SCMOE_ERR_COMBINE,         /* unknown shared/routed combine rule */
    SCMOE_ERR_N_HEADS,         /* n_heads < 1 or not dividing d_model */
    SCMOE_ERR_SEQ_LEN,         /* seq_len < 1 or > max_seq_len, or batch*seq_len > max_tokens */
    SCMOE_ERR_N_LAYERS,        /* n_layers < 1 */
    SCMOE_ERR_EP_SIZE,         /* ep_size does not divide the ranks, or n_experts % ep_size != 0 */
    SCMOE_ERR_PROGRESS,        /* unknown progress policy, or a thread policy without thread support */
    SCMOE_ERR_OPTION,          /* another option out of range (message names it) */
    SCMOE_ERR_STATE,           /* a call out of order (backward without a training forward, ...) */
    SCMOE_ERR_NOT_FOUND,       /* no parameter of that name on this rank */
    SCMOE_ERR_CONFIG_MISMATCH, /* ranks were given different configs */
    SCMOE_ERR_COMM,            /* the communication backend failed (message has the MPI error) */
    SCMOE_ERR_TIMEOUT,         /* an exchange did not complete within comm_timeout_s */
    SCMOE_ERR_IO,              /* a file could not be read or written */
    SCMOE_ERR_UNSUPPORTED,     /* a feature not compiled into this build */
    SCMOE_STATUS_COUNT
} scmoe_status;

typedef enum scmoe_activation { SCMOE_GELU = 0, SCMOE_SWIGLU = 1 } scmoe_activation;

/* Which tokens claim expert slots first when capacity is limited. TOKEN_ORDER (GShard/Tutel): all
 * first choices in token order, then all second choices, ... BATCH: the same rounds, but tokens
 * ordered by their highest gate probability (ties by token index). Both over the global batch. */
typedef enum scmoe_priority { SCMOE_PRIORITY_TOKEN = 0, SCMOE_PRIORITY_BATCH = 1 } scmoe_priority;

typedef enum scmoe_arch {
    SCMOE_ARCH_TOP2 = 0,   /* GShard baseline: block l+1's MLP is a top-2 MoE on its own LN */
    SCMOE_ARCH_TOP1 = 1,   /* same with k = 1 */
    SCMOE_ARCH_SHARED = 2, /* shared expert + top-1 MoE, both on block l+1's LN */
    SCMOE_ARCH_SCMOE = 3   /* shared expert on block l+1, top-1 MoE on the shortcut (shortcut_pos) */
} scmoe_arch;

/* How the shared expert and the routed branch add up: CG-1 gates the shared expert with
 * sigmoid(w_cg . x) per token (x the shared expert's input); ADD sums them. */
typedef enum scmoe_combine { SCMOE_COMBINE_CG1 = 0, SCMOE_COMBINE_ADD = 1 } scmoe_combine;

/* How nonblocking exchanges make progress while compute runs (OpenMPI only moves bytes inside MPI
 * calls). POLL: compute is split in row tiles and the exchange is tested between tiles. THREAD: a
 * progress thread tests it (needs MPI_THREAD_MULTIPLE). NONE: bytes move only in the final wait. */
typedef enum scmoe_progress { SCMOE_PROGRESS_POLL = 0, SCMOE_PROGRESS_THREAD = 1, SCMOE_PROGRESS_NONE = 2 } scmoe_progress;

/* The scope of the load-balance loss statistics: GLOBAL over all ranks' tokens (the same value on
 * every rank, equal to a 1-rank run); LOCAL over this rank's tokens, each rank's term weighted 1/P. */
typedef enum scmoe_aux_scope { SCMOE_AUX_GLOBAL = 0, SCMOE_AUX_LOCAL = 1 } scmoe_aux_scope;

/* Everything that shapes a layer or a pair. Start from scmoe_config_default() and change fields. */
typedef struct scmoe_config {
    /* shapes */
    int d_model;            /* model width d (default 64) */
    int d_hidden;           /* hidden width of each expert, the shared expert and the dense MLP (256) */
    int n_experts;          /* E, global number of routed experts (8) */
    int top_k;              /* k experts per token for the layer; the pair sets it from arch (1) */
    int max_tokens;         /* most tokens (rows) one rank passes to one forward (1024) */
    /* gate and routing */
    float capacity_factor;  /* CF; capacity C = k*floor(CF*ceil(S/E)), S the global tokens; <= 0: dropless (2.0) */
    float eval_capacity_factor; /* CF when not training (2.0) */
    scmoe_priority priority;    /* slot priority (TOKEN) */
    int renormalize;        /* k > 1: divide the k gate weights by their sum (1) */
    float aux_loss_weight;  /* weight of the GShard load-balance loss in backward (0.01) */
    float z_loss_weight;    /* weight of the router z-loss (0) */
    scmoe_aux_scope aux_scope;  /* (GLOBAL) */
    float gate_noise_std;   /* training noise added to the logits: std * N(0,1) / E (0) */
    uint64_t seed;          /* seeds parameter init and gate noise (1234) */
    scmoe_activation activation; /* of every FFN (GELU, tanh approximation) */
    int check_finite;       /* forward/backward reject NaN/Inf inputs with SCMOE_ERR_NONFINITE (0) */
    /* the block pair */
    scmoe_arch arch;        /* (SCMOE) */
    int shortcut_pos;       /* 1, 2 or 3 for arch SCMOE (2) */
    scmoe_combine combine;  /* (CG1) */
    int n_heads;            /* attention heads, dividing d_model (4) */
    int max_seq_len;        /* longest sequence T (256) */
    int causal;             /* causal attention mask (1); 0 for vision models */
    int n_layers;           /* transformer layers in the host model, for the init scale (2) */
    /* parallelism and schedule */
    int ep_size;            /* ranks in one expert-parallel group; 0 = all ranks (0) */
    scmoe_progress progress;/* (POLL) */
    int poll_rows;          /* rows per compute tile between progress polls (64) */
    int overlap;            /* 1: the ScMoE overlapped order; 0: serialized, same math (1) */
    int expert_slot;        /* -1: chosen from measured times; 0..3 forces the slot (-1) */
    int overlap_grad_sync;  /* 1: dense-gradient all-reduce runs behind the backward and is finished by
                               scmoe_pair_grad_sync(); 0: backward finishes it (0) */
    double comm_timeout_s;  /* give up on an exchange after this long, SCMOE_ERR_TIMEOUT (600) */
    int wire_bf16;          /* send exchanged activations and gradients as bfloat16 (half the bytes),
                               unpacked to float on arrival (0) */
} scmoe_config;

scmoe_config scmoe_config_default(void);

/* Returns SCMOE_OK or the status naming the first bad field. msg (may be NULL) receives a sentence. */
scmoe_status scmoe_config_validate(const scmoe_config *cfg, char *msg, size_t msg_len);

const char *scmoe_strerror(scmoe_status status);
const char *scmoe_version(void);
/* Backends compiled in, BLAS threads, MPI thread level. */
const char *scmoe_build_info(void);

/* ---- context: the communicator and the error detail ---- */
typedef struct scmoe_context scmoe_context;

/* A one-rank context (no MPI). For MPI, see scmoe_context_create_mpi() in scmoe_mpi.h. */
scmoe_status scmoe_context_create(scmoe_context **ctx);
void scmoe_context_destroy(scmoe_context *ctx);
int scmoe_context_rank(const scmoe_context *ctx);
int scmoe_context_size(const scmoe_context *ctx);
/* Detail of the last failure on this context ("" if none). Valid until the next call on it. */
const char *scmoe_last_error(const scmoe_context *ctx);

/* ---- parameters by name ---- */
typedef struct scmoe_tensor {
    const char *name;   /* e.g. "gate.weight", "experts.3.w1", "l0.attn.wqkv" */
    float *data;        /* the values, row-major */
    float *grad;        /* the gradient, same shape; backward accumulates into it */
    int ndim;
    int shape[4];
    size_t numel;
    int replicated;     /* 1: the same on every rank (dense); 0: an expert's, held by its owners only */
} scmoe_tensor;

/* ---- statistics of the last forward/backward ---- */
typedef struct scmoe_stats {
    float aux_loss;          /* GShard load-balance loss (unweighted) */
    float z_loss;            /* router z-loss (unweighted) */
    int64_t tokens;          /* tokens routed in the global batch */
    int64_t dropped;         /* (token, choice) assignments dropped by capacity, global */
    int64_t capacity;        /* slots per expert (0 = dropless) */
    const int64_t *expert_tokens; /* [n_experts] global assignments kept per expert (owned by the object) */
    /* timing of the last forward (fwd_) and backward (bwd_), seconds */
    double fwd_time, bwd_time;
    double fwd_comm, bwd_comm;       /* time the exchanges were in flight */
    double fwd_exposed, bwd_exposed; /* time compute waited on an exchange */
    double fwd_overlap, bwd_overlap; /* hidden / total exchange time, 0..1 (1 when no exchange) */
    double fwd_expert, bwd_expert;   /* time in the experts' FFNs (the MoE's compute) */
    double grad_sync_time, grad_sync_exposed; /* dense-gradient all-reduce */
    int expert_slot;         /* slot the experts ran in (pair), -1 for the layer */
} scmoe_stats;

/* ---- one MoE layer ---- */
typedef struct scmoe_moe scmoe_moe;

/* COLLECTIVE. Validates cfg, allocates parameters, gradients and the whole workspace, initialises
 * parameters (N(0, 0.02), biases 0) from cfg->seed. */
scmoe_status scmoe_moe_create(scmoe_context *ctx, const scmoe_config *cfg, scmoe_moe **moe);
void scmoe_moe_destroy(scmoe_moe *moe);
/* Training (1: noise, train capacity, caches for backward) or inference (0). */
scmoe_status scmoe_moe_set_training(scmoe_moe *moe, int training);
/* COLLECTIVE. y[n_tokens, d] = sum_j w_j E_{e_j}(x); n_tokens may be 0 and differ per rank. */
scmoe_status scmoe_moe_forward(scmoe_moe *moe, int n_tokens, const float *x, float *y, scmoe_stats *stats);
/* COLLECTIVE. From dy = dL/dy: dx = dL/dx (overwritten), gradients accumulated (+=), including the
 * aux and z losses with their config weights. */
scmoe_status scmoe_moe_backward(scmoe_moe *moe, const float *dy, float *dx, scmoe_stats *stats);
scmoe_status scmoe_moe_zero_grad(scmoe_moe *moe);
int scmoe_moe_param_count(const scmoe_moe *moe);
scmoe_status scmoe_moe_param_at(const scmoe_moe *moe, int i, scmoe_tensor *t);
scmoe_status scmoe_moe_param(const scmoe_moe *moe, const char *name, scmoe_tensor *t);

/* ---- the block pair ---- */
typedef struct scmoe_pair scmoe_pair;

/* COLLECTIVE. Parameters are initialised GPT-2 style: weights N(0, 0.02), attention and MLP output
 * projections (residual writers) N(0, 0.02/sqrt(2*n_layers)), biases 0, LayerNorm 1/0, w_cg 0. */
scmoe_status scmoe_pair_create(scmoe_context *ctx, const scmoe_config *cfg, scmoe_pair **pair);
void scmoe_pair_destroy(scmoe_pair *pair);
scmoe_status scmoe_pair_set_training(scmoe_pair *pair, int training);
/* COLLECTIVE. x, y: [batch, seq_len, d_model]; batch may be 0. */
scmoe_status scmoe_pair_forward(scmoe_pair *pair, int batch, int seq_len, const float *x, float *y,
                                scmoe_stats *stats);
/* COLLECTIVE. dx overwritten; gradients accumulated. */
scmoe_status scmoe_pair_backward(scmoe_pair *pair, const float *dy, float *dx, scmoe_stats *stats);
/* COLLECTIVE. Finishes the dense-gradient all-reduce started by backward (overlap_grad_sync=1). */
scmoe_status scmoe_pair_grad_sync(scmoe_pair *pair, scmoe_stats *stats);
scmoe_status scmoe_pair_zero_grad(scmoe_pair *pair);
/* Writes every later step's operations, with begin and end times, to a Chrome/Perfetto JSON trace at
 * path (open it at ui.perfetto.dev or chrome://tracing): pid = rank, lane 0 compute, lane 1 the
 * token exchanges, lane 2 the gradient all-reduce. NULL closes it. Setting SCMOE_TRACE=path in the
 * environment does the same at create; with several ranks each writes path.rank<r>.json. */
scmoe_status scmoe_pair_trace(scmoe_pair *pair, const char *path);
int scmoe_pair_param_count(const scmoe_pair *pair);
scmoe_status scmoe_pair_param_at(const scmoe_pair *pair, int i, scmoe_tensor *t);
scmoe_status scmoe_pair_param(const scmoe_pair *pair, const char *name, scmoe_tensor *t);

#ifdef __cplusplus
}
#endif
#endif /* SCMOE_H */
