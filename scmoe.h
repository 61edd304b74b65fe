/**
 * @file scmoe.h
 * @brief Mixture-of-Experts transformer layers with shortcut-connected expert parallelism (ScMoE).
 *
 * Cai et al., "Shortcut-connected Expert Parallelism for Accelerating Mixture-of-Experts"
 * (arXiv 2404.05019). The library owns two objects:
 *
 * - ::scmoe_moe   one MoE layer: gate, routing with capacity, experts (FFNs), over expert parallelism.
 * - ::scmoe_pair  a dense transformer block l followed by an MoE block l+1, in one of five variants
 *                 (top2, top1, shared, scmoe with shortcut position 1|2|3). The pair owns the whole
 *                 block pair because the ScMoE schedule hides the MoE's all-to-all behind block l's
 *                 own computation.
 *
 * @par Conventions (the embedder's contract)
 * - Tensors are flat row-major float arrays; tokens are rows, d_model columns. A pair's activations
 *   are [batch, seq_len, d_model], a layer's [n_tokens, d_model].
 * - Every call returns a ::scmoe_status; scmoe_strerror() names it and scmoe_last_error() gives the
 *   detail of the last failure on a context.
 * - The library allocates only in `*_create`, never prints, never exits, keeps no global state.
 * - Buffers passed in stay the caller's; the library never keeps a pointer to them past the call
 *   (a training forward copies its input for the backward).
 * - Objects returned by `*_create` belong to the caller, who frees them with the matching
 *   `*_destroy`: every object before the context it was created on.
 * - With MPI (scmoe_mpi.h), calls marked COLLECTIVE must be made by every rank of the context's
 *   communicator, in the same order. A bad argument on one rank is agreed on first, so every rank
 *   returns the error instead of hanging. Calls not marked COLLECTIVE are local to the rank.
 * - Every COLLECTIVE create, forward and backward starts with one small agreement in which each rank
 *   says which object and call it is in, the call's sequence number on that object and the object's
 *   mode (training or inference): a rank in another call, on another object or in another mode makes
 *   every rank return ::SCMOE_ERR_STATE (the message names what the others called) instead of matching
 *   mismatched exchanges.
 * - After ::SCMOE_ERR_TIMEOUT or ::SCMOE_ERR_COMM the context is broken: an exchange may still be
 *   pending (MPI cannot cancel it) and the ranks are out of step. Every later COLLECTIVE call on the
 *   context or any object on it returns ::SCMOE_ERR_STATE at once without communicating; local calls
 *   (parameters, gradients) still work, so the host can save what it needs, then free everything with
 *   scmoe_pair_abort(), scmoe_moe_abort() and scmoe_context_abort() (or the `*_destroy` calls, which
 *   act as the aborts on a broken context) and restart.
 *
 * @par Thread safety
 * The library does no locking. A context, and every object created on it, must be used by one thread
 * at a time; distinct contexts (and their objects) may be used from different threads at once, which
 * over MPI needs the host to have initialised MPI with MPI_THREAD_MULTIPLE. Inside a call the library
 * runs OpenMP threads and (progress policy ::SCMOE_PROGRESS_THREAD) a progress thread of its own.
 * scmoe_config_default(), scmoe_config_validate(), scmoe_strerror() and scmoe_version() touch no
 * shared state and may be called from any thread.
 */
#ifndef SCMOE_H
#define SCMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Major version: changes that break the API or the ABI (the shared library's soname). */
#define SCMOE_VERSION_MAJOR 0
/** Minor version: additions compatible with earlier releases of the same major version. */
#define SCMOE_VERSION_MINOR 1
/** Patch version: fixes only. */
#define SCMOE_VERSION_PATCH 0

/** The most chunks scmoe_config::pipeline_chunks may split an exchange into. */
#define SCMOE_MAX_PIPELINE_CHUNKS 16

/** What a call returns: ::SCMOE_OK or the reason it failed (scmoe_strerror() names it). */
typedef enum scmoe_status {
    SCMOE_OK = 0,              /**< success */
    SCMOE_ERR_NULL,            /**< a required pointer argument was NULL */
    SCMOE_ERR_NOMEM,           /**< an allocation failed */
    SCMOE_ERR_D_MODEL,         /**< d_model < 1 */
    SCMOE_ERR_D_HIDDEN,        /**< d_hidden < 1 (expert or dense MLP hidden size) */
    SCMOE_ERR_N_EXPERTS,       /**< n_experts < 1 */
    SCMOE_ERR_TOP_K,           /**< top_k < 1 or top_k > n_experts */
    SCMOE_ERR_CAPACITY,        /**< capacity factor is NaN or infinite */
    SCMOE_ERR_LOSS_WEIGHT,     /**< aux or z loss weight negative or not finite */
    SCMOE_ERR_NOISE,           /**< gate noise std negative or not finite */
    SCMOE_ERR_ACTIVATION,      /**< unknown activation */
    SCMOE_ERR_PRIORITY,        /**< unknown routing priority */
    SCMOE_ERR_MAX_TOKENS,      /**< max_tokens < 1 */
    SCMOE_ERR_N_TOKENS,        /**< n_tokens < 0 or > max_tokens */
    SCMOE_ERR_NONFINITE,       /**< NaN or Inf found in an input (only with check_finite) */
    SCMOE_ERR_ARCH,            /**< unknown arch */
    SCMOE_ERR_SHORTCUT_POS,    /**< shortcut_pos not 1, 2 or 3 */
    SCMOE_ERR_COMBINE,         /**< unknown shared/routed combine rule */
    SCMOE_ERR_N_HEADS,         /**< n_heads < 1 or not dividing d_model */
    SCMOE_ERR_SEQ_LEN,         /**< seq_len < 1 or > max_seq_len, or batch*seq_len > max_tokens */
    SCMOE_ERR_N_LAYERS,        /**< n_layers < 1 */
    SCMOE_ERR_EP_SIZE,         /**< ep_size does not divide the ranks, or n_experts % ep_size != 0 */
    SCMOE_ERR_PROGRESS,        /**< unknown progress policy (a THREAD policy MPI cannot host falls back to POLL) */
    SCMOE_ERR_OPTION,          /**< another option out of range (message names it) */
    SCMOE_ERR_STATE,           /**< a call out of order (backward without a training forward, a second backward,
                                    ranks in different calls or modes, a context broken by an earlier timeout or
                                    communication failure, destroying a context with live objects) */
    SCMOE_ERR_NOT_FOUND,       /**< no parameter of that name on this rank */
    SCMOE_ERR_CONFIG_MISMATCH, /**< ranks were given different configs */
    SCMOE_ERR_COMM,            /**< the communication backend failed (message has the MPI error), or the ranks
                                    are out of step (a value that is not a status arrived in a status agreement);
                                    the context is then broken (later collective calls: ::SCMOE_ERR_STATE) */
    SCMOE_ERR_TIMEOUT,         /**< an exchange did not complete within comm_timeout_s; MPI cannot cancel it, so
                                    the context is broken: later collective calls return ::SCMOE_ERR_STATE at once.
                                    Checkpoint, abort (scmoe_pair_abort() ... scmoe_context_abort()) and restart */
    SCMOE_ERR_IO,              /**< a file could not be read or written */
    SCMOE_ERR_UNSUPPORTED, /**< a feature not compiled into this build, or missing on this machine (no CUDA device) */
    SCMOE_ERR_DEVICE,      /**< a device (CUDA) kernel, copy or allocation failed (message has the CUDA error) */
    SCMOE_STATUS_COUNT     /**< the number of statuses (not a status) */
} scmoe_status;

/** The activation of every FFN (experts, shared expert, dense MLP). */
typedef enum scmoe_activation {
    SCMOE_GELU = 0,  /**< GELU, tanh approximation; the FFN's first projection is d x h */
    SCMOE_SWIGLU = 1 /**< SwiGLU: silu(a) * b; the first projection is d x 2h (gate and value halves) */
} scmoe_activation;

/** Which tokens claim expert slots first when capacity is limited.
 *
 * TOKEN_ORDER (GShard/Tutel): all first choices in token order, then all second choices, ... BATCH:
 * the same rounds, but tokens ordered by their highest gate probability (ties by token index). Both
 * over the tokens capacity counts (::scmoe_capacity_scope: the global batch, or one rank's). */
typedef enum scmoe_priority {
    SCMOE_PRIORITY_TOKEN = 0, /**< token order (GShard/Tutel) */
    SCMOE_PRIORITY_BATCH = 1  /**< batch-prioritised: highest top-1 gate probability first */
} scmoe_priority;

/** The variant of the block pair: what block l+1's MLP is, and what feeds the routed experts. */
typedef enum scmoe_arch {
    SCMOE_ARCH_TOP2 = 0,   /**< GShard baseline: block l+1's MLP is a top-2 MoE on its own LN */
    SCMOE_ARCH_TOP1 = 1,   /**< same with k = 1 */
    SCMOE_ARCH_SHARED = 2, /**< shared expert + top-1 MoE, both on block l+1's LN */
    SCMOE_ARCH_SCMOE = 3   /**< shared expert on block l+1, top-1 MoE on the shortcut (shortcut_pos) */
} scmoe_arch;

/** How the shared expert and the routed branch add up.
 *
 * CG-1 gates the shared expert with sigmoid(w_cg . x) per token (x the shared expert's input); ADD
 * sums them. */
typedef enum scmoe_combine {
    SCMOE_COMBINE_CG1 = 0, /**< y = A2 + sigmoid(w_cg . m1) * SE(m1) + MoE (default) */
    SCMOE_COMBINE_ADD = 1  /**< y = A2 + SE(m1) + MoE */
} scmoe_combine;

/** How nonblocking exchanges make progress while compute runs (OpenMPI only moves bytes inside MPI
 * calls).
 *
 * POLL: GEMMs are split in column tiles and the exchange is tested between tiles. THREAD: a progress
 * thread tests it (needs MPI_THREAD_MULTIPLE). NONE: bytes move only in the final wait. */
typedef enum scmoe_progress {
    SCMOE_PROGRESS_POLL = 0,   /**< test the exchange between GEMM tiles (poll_cols / poll_us) */
    SCMOE_PROGRESS_THREAD = 1, /**< a progress thread tests it (falls back to POLL without MPI_THREAD_MULTIPLE) */
    SCMOE_PROGRESS_NONE = 2    /**< bytes move only in the final wait */
} scmoe_progress;

/** The scope of the load-balance loss statistics.
 *
 * GLOBAL over all ranks' tokens (the same value on every rank, equal to a 1-rank run); LOCAL over this
 * rank's tokens, each rank's term weighted 1/P. */
typedef enum scmoe_aux_scope {
    SCMOE_AUX_GLOBAL = 0, /**< over the global batch: equal on every rank and to a 1-rank run */
    SCMOE_AUX_LOCAL = 1   /**< over this rank's tokens, each rank's term weighted 1/P */
} scmoe_aux_scope;

/** The precision of the GEMMs (scmoe_config.precision). */
typedef enum scmoe_precision {
    SCMOE_PRECISION_FP32 = 0, /**< every GEMM in fp32 */
    SCMOE_PRECISION_BF16 = 1  /**< the GEMMs of the experts, the shared expert, the dense MLP, the attention
                                   projections and attention's two products take bf16 operands (rounded to
                                   nearest even) and accumulate in fp32: oneDNN's bf16 matmuls (AMX,
                                   AVX512-BF16) where the CPU has them, the same math through fp32 GEMMs on
                                   rounded operands elsewhere; CUBLAS_COMPUTE_32F_FAST_16BF on a CUDA context.
                                   Weights, gradients and the optimizer stay fp32, and so do LayerNorm,
                                   softmax, the gates, routing and the losses. The weights' bf16 copies are
                                   made at create and by scmoe_pair_params_changed() /
                                   scmoe_moe_params_changed(), which the host calls after it writes the
                                   weights (optimizer step, load) */
} scmoe_precision;

/** Over which tokens expert capacity is counted.
 *
 * GLOBAL: C = k*floor(CF*ceil(S/E)) slots per expert over the global batch S, priority across all
 * ranks' tokens: P ranks route bitwise as one rank does, whatever the cluster. With TOKEN priority
 * (the default) the slots follow from counts alone: an exclusive scan and a sum over the ranks of the
 * token counts and of each rank's per-(round, expert) counts (2 x 8 x (k*E + 4) bytes), the gate
 * statistics' all-reduce, and LOCAL's all-to-all of per-expert counts to the expert-parallel group:
 * O(k*E) routing metadata and host work per rank, flat in P, like LOCAL's. With BATCH priority (slots by
 * top-1 probability over the whole batch) the same counts tell how many of each (round, expert)'s
 * assignments are kept, and a radix selection over the ranks which: all-reduces of histograms of at
 * most 4,096 counts (one where nothing drops, 2-3 for softmax scores where some expert overflows, one
 * after the other) and
 * a scan of the ties; flat in P as well (no rank sees another's scores; each round is a latency). Either way the kept rows sit by round, then token order, so BATCH without
 * drops is TOKEN bit for bit. LOCAL (Tutel, DeepSpeed, the ScMoE paper): C = k*floor(CF*ceil(S_r/E)) slots per
 * expert for each source rank r's S_r tokens, priority within the rank; only per-expert counts
 * cross the network (one all-to-all of E_local*k ints per peer, waited for where the dispatch starts:
 * in a scmoe pair behind the dense ops after the gate) and the statistics ride one
 * nonblocking all-reduce of 3E+5 doubles, waited on at the end of the forward: flat in P. A token
 * then competes only with its own rank's tokens, so the routing (not the math) depends on how the
 * batch is split over ranks; one rank, or nothing dropped under TOKEN priority without gate noise,
 * routes bitwise as GLOBAL (the gate noise is keyed by rank * max_tokens + token, not by the global
 * token index, which would need every rank's count).
 *
 * The default is GLOBAL so that results stay those of every earlier run and of any rank count (a
 * checkpoint resumes bitwise on another cluster size); pick LOCAL where a Tutel/DeepSpeed user expects
 * it: README "Which capacity scope", docs/scaling.md. */
typedef enum scmoe_capacity_scope {
    SCMOE_CAPACITY_GLOBAL = 0, /**< over the global batch: P ranks route as one rank (TOKEN priority: flat in P) */
    SCMOE_CAPACITY_LOCAL = 1   /**< per source rank (Tutel): O(E) routing metadata per rank, flat in P */
} scmoe_capacity_scope;

/** How a pair sums its fp32 gradients over the ranks (scmoe_config.grad_sync_algo).
 *
 * MPI: one MPI_Iallreduce per bucket, summed in the MPI library's algorithm and order (OpenMPI 4.1's
 * libnbc takes a binomial tree for it at every size: 2 log2 P full copies of the bucket cross a link,
 * unless `--mca coll_libnbc_iallreduce_algorithm 1` selects its ring). TWO_ROUND: the library's own
 * reduce-scatter and allgather, the bf16 sum's algorithm with floats on the wire: rank r sums chunk r of
 * every rank's values in fp32 in rank order and sends it to all, 2 (P-1)/P of a bucket each way (the
 * ring's bytes) in 2 rounds of P-1 messages, the same bits on every rank whatever the MPI. AUTO:
 * TWO_ROUND for the buckets of at least 1,024 floats per rank, MPI below, where the tree's 2 log2 P
 * messages cost less than P-1 of a few bytes (docs/scaling.md, "Which all-reduce"). */
typedef enum scmoe_grad_sync_algo {
    SCMOE_GRAD_SYNC_MPI = 0,       /**< MPI_Iallreduce, the MPI library's algorithm */
    SCMOE_GRAD_SYNC_TWO_ROUND = 1, /**< the library's reduce-scatter + allgather for every bucket */
    SCMOE_GRAD_SYNC_AUTO = 2       /**< TWO_ROUND for buckets of >= 1,024 floats per rank, MPI below */
} scmoe_grad_sync_algo;

/** Everything that shapes a layer or a pair. Start from scmoe_config_default() and change fields.
 *
 * Every rank of a context must pass the same config to a COLLECTIVE create (checked: the create
 * returns ::SCMOE_ERR_CONFIG_MISMATCH on every rank otherwise). Defaults are in parentheses. */
typedef struct scmoe_config {
    /* shapes */
    int d_model;    /**< model width d (default 64) */
    int d_hidden;   /**< hidden width of each expert, the shared expert and the dense MLP (256) */
    int n_experts;  /**< E, global number of routed experts (8) */
    int top_k;      /**< k experts per token for the layer (1). A pair takes k from arch (2 for TOP2,
                                 else 1): its top_k must be that k or the default 1, else ::SCMOE_ERR_TOP_K */
    int max_tokens; /**< most tokens (rows) one rank passes to one forward (1024); sizes the workspace */
    /* gate and routing */
    float capacity_factor;      /**< CF; capacity C = k*floor(CF*ceil(S/E)), S the global tokens (capacity_scope
                               LOCAL: each rank's own); <= 0: dropless (2.0) */
    float eval_capacity_factor; /**< CF when not training (2.0) */
    scmoe_priority priority;    /**< slot priority (TOKEN) */
    scmoe_capacity_scope capacity_scope; /**< capacity over the global batch or per source rank (GLOBAL) */
    int renormalize;                     /**< k > 1: divide the k gate weights by their sum (1) */
    float aux_loss_weight;               /**< weight of the GShard load-balance loss in backward (0.01) */
    float z_loss_weight;                 /**< weight of the router z-loss (0) */
    scmoe_aux_scope aux_scope;           /**< scope of the load-balance loss statistics (GLOBAL) */
    float gate_noise_std;                /**< training noise added to the logits: std * N(0,1) / E (0) */
    uint64_t seed;                       /**< seeds parameter init and gate noise (1234) */
    scmoe_activation activation;         /**< of every FFN (GELU, tanh approximation) */
    int check_finite;                    /**< forward/backward reject NaN/Inf inputs with ::SCMOE_ERR_NONFINITE (0) */
    /* the block pair */
    scmoe_arch arch;       /**< the pair's variant (SCMOE) */
    int shortcut_pos;      /**< 1, 2 or 3 for arch SCMOE (2): the MoE reads a1, m0 or a0 */
    scmoe_combine combine; /**< shared/routed combine rule (CG1) */
    int n_heads;           /**< attention heads, dividing d_model (4) */
    int max_seq_len;       /**< longest sequence T (256); sizes the workspace */
    int causal;            /**< causal attention mask (1); 0 for vision models */
    int n_layers;          /**< transformer layers in the host model, for the init scale (2) */
    /* parallelism and schedule */
    int ep_size;               /**< ranks in one expert-parallel group; 0 = all ranks (0) */
    scmoe_progress progress;   /**< how exchanges progress while compute runs (POLL) */
    int poll_cols;             /**< GEMM output columns per compute tile, progress polled between tiles; 0: tiles
                               sized by poll_us (0) */
    double poll_us;            /**< with poll_cols = 0: compute time between polls, microseconds, turned into
                               columns per GEMM shape from a fixed per-engine rate, so the same shape is always
                               cut the same way and bf16's faster GEMMs poll as often in time as fp32 (1000) */
    int overlap;               /**< 1: the ScMoE overlapped order; 0: serialized, same math (1) */
    int expert_slot;           /**< -1: chosen from measured times; K in 0..16 runs the experts before the K-th of
                                 the pair's operations after the gate (LayerNorms count; clamped to the last) (-1) */
    int overlap_grad_sync;     /**< 1: dense-gradient all-reduce runs behind the backward and is finished by
                               scmoe_pair_grad_sync(); 0: backward finishes it (0) */
    double comm_timeout_s;     /**< give up on an exchange after this long, in seconds: ::SCMOE_ERR_TIMEOUT (600) */
    int wire_bf16;             /**< send exchanged activations and gradients as bfloat16 (half the bytes),
                               unpacked to float on arrival (0) */
    int pipeline_chunks;       /**< 0: one exchange each way. C in 1..16: token-chunk pipelining (Tutel): the
                               experts first run the rows that stay on this rank while the rest travel in C
                               chunks, then chunk i while chunk i+1's dispatch and chunk i-1's combine fly.
                               For when the exchange is longer than the window that hides it (any arch) (0) */
    scmoe_precision precision; /**< the GEMMs' precision (FP32) */
    int grad_sync_bf16;        /**< 1: the pair's gradient all-reduces (its dense tensors over all ranks, its
                               experts over their replicas) carry bfloat16, half the bytes (DeepSpeed's
                               communication_data_type): each rank's contribution is rounded to bf16, rank r
                               sums chunk r of every rank's values in fp32 in rank order and rounds once, and
                               sends that chunk to all, so every rank gets the same bits. Each summed element
                               is within 2^-8 (sum_i |g_i| + |sum|) of the fp32 sum (bf16 keeps 8
                               significant bits): for when that all-reduce is the step's long pole on a slow
                               link (README "Gradients in bf16"). The gradients the host reads and steps stay
                               fp32; with one rank nothing is rounded; a ::scmoe_moe layer's own gradient sum
                               stays fp32 (0) */
    scmoe_grad_sync_algo grad_sync_algo; /**< how the pair's fp32 gradient all-reduces sum (its dense tensors
                               over all ranks, its experts over their replicas): MPI's MPI_Iallreduce, the
                               library's TWO_ROUND reduce-scatter + allgather (rank order, the same bits on every
                               rank), or AUTO, TWO_ROUND for the buckets of at least 1,024 floats per rank.
                               grad_sync_bf16 takes the two rounds whatever this says; a context whose
                               CUDA-aware MPI stages gradients in device memory, and a ::scmoe_moe layer's own
                               sum, take MPI's (AUTO) */
} scmoe_config;

/** The default config (the defaults listed in ::scmoe_config): a valid small model.
 * @return the config, by value. */
scmoe_config scmoe_config_default(void);

/** Checks every field of a config without creating anything (local, no communication).
 * @param cfg      the config to check.
 * @param msg      (may be NULL) receives a sentence naming the first bad field and its allowed range,
 *                 or "" when the config is valid; always NUL-terminated when msg_len > 0.
 * @param msg_len  size of msg in bytes.
 * @return ::SCMOE_OK or the status naming the first bad field (::SCMOE_ERR_NULL when cfg is NULL). */
scmoe_status scmoe_config_validate(const scmoe_config *cfg, char *msg, size_t msg_len);

/** The name of a status.
 * @param status any value; out of range gives "unknown status".
 * @return a static string (never NULL, never freed). */
const char *scmoe_strerror(scmoe_status status);
/** The library's version, "MAJOR.MINOR.PATCH" (::SCMOE_VERSION_MAJOR ...).
 * @return a static string. */
const char *scmoe_version(void);
/** The version and the backends compiled in (compute, communication, CUDA).
 * @return a static string describing this build. */
const char *scmoe_build_info(void);

/* ---- context: the communicator and the error detail ---- */

/** An opaque context: the ranks the library runs on (a communicator, or one rank) and the detail of
 * the last failure. Created by scmoe_context_create() or scmoe_context_create_mpi(). */
typedef struct scmoe_context scmoe_context;

/** A one-rank context (no MPI). For MPI, see scmoe_context_create_mpi() in scmoe_mpi.h.
 * @param[out] ctx receives the new context (NULL on failure); free it with scmoe_context_destroy().
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL (ctx NULL) or ::SCMOE_ERR_NOMEM. */
scmoe_status scmoe_context_create(scmoe_context **ctx);
/** COLLECTIVE for an MPI context: frees a context (MPI_Comm_free of its duplicated communicator).
 * Destroy every object created on it first, and, for MPI, call it before MPI_Finalize. On a context
 * broken by ::SCMOE_ERR_TIMEOUT or ::SCMOE_ERR_COMM it is scmoe_context_abort().
 * @param ctx the context; NULL is a no-op.
 * @return ::SCMOE_OK, or ::SCMOE_ERR_STATE (nothing freed, the context stays usable) while a layer or
 *         pair created on it is alive. */
scmoe_status scmoe_context_destroy(scmoe_context *ctx);
/** Local: frees a context without communicating or waiting on any other rank (like ncclCommAbort), for
 * after ::SCMOE_ERR_TIMEOUT / ::SCMOE_ERR_COMM or when the host knows a peer is gone. Its MPI
 * communicator is not freed (that would be collective) and is left to MPI_Finalize or the process's
 * exit, as is the memory of any exchange still pending on it. Abort every object on it first.
 * @param ctx the context; NULL is a no-op.
 * @return ::SCMOE_OK, or ::SCMOE_ERR_STATE (nothing freed) while a layer or pair created on it is alive. */
scmoe_status scmoe_context_abort(scmoe_context *ctx);
/** This rank's index in the context.
 * @param ctx the context.
 * @return 0..size-1; 0 for a one-rank context; -1 when ctx is NULL. */
int scmoe_context_rank(const scmoe_context *ctx);
/** The number of ranks in the context.
 * @param ctx the context.
 * @return the ranks; 1 for a one-rank context; -1 when ctx is NULL. */
int scmoe_context_size(const scmoe_context *ctx);
/** Where the context's layers compute.
 * @param ctx the context.
 * @return "host" (OpenBLAS + OpenMP), "cuda" after scmoe_context_use_cuda() (scmoe_cuda.h), or
 *         "context is NULL". */
const char *scmoe_context_backend(const scmoe_context *ctx);
/** What runs the context's GEMMs, for people: OpenBLAS's kernel core (openblas_get_corename) and the
 * bf16 engine (oneDNN's implementation and instruction set, or operands rounded for fp32 GEMMs), or
 * the device's library.
 * @param ctx the context.
 * @return a string owned by ctx (valid until it is destroyed). */
const char *scmoe_context_gemm_info(scmoe_context *ctx);
/** Detail of the last failure on this context ("" if none). Valid until the next call on it.
 * @param ctx the context (NULL gives "context is NULL").
 * @return a string owned by the context. */
const char *scmoe_last_error(const scmoe_context *ctx);

/* ---- parameters by name ---- */

/** A view of one parameter tensor and its gradient, owned by the object that returned it.
 *
 * The pointers stay valid until the object is destroyed. Writing data changes the parameter (an
 * optimizer steps it in place); grad is accumulated by every backward and cleared by zero_grad. */
typedef struct scmoe_tensor {
    const char *name; /**< e.g. "gate.weight", "experts.3.w1", "l0.attn.wqkv" */
    float *data;      /**< the values, row-major */
    float *grad;      /**< the gradient, same shape; backward accumulates into it */
    int ndim;         /**< number of dimensions, 1..4 */
    int shape[4];     /**< the first ndim entries are the shape */
    size_t numel;     /**< number of elements (the product of the shape) */
    int replicated;   /**< 1: the same on every rank (dense); 0: an expert's, held by its owners only */
} scmoe_tensor;

/* ---- statistics of the last forward/backward ---- */

/** Statistics of the last forward or backward, filled by the calls that take a scmoe_stats pointer
 * (which may be NULL). Times are wall-clock seconds on this rank; counts are over the global batch. */
typedef struct scmoe_stats {
    float aux_loss;               /**< GShard load-balance loss (unweighted) */
    float z_loss;                 /**< router z-loss (unweighted) */
    int64_t tokens;               /**< tokens routed in the global batch */
    int64_t dropped;              /**< (token, choice) assignments dropped by capacity, global */
    int64_t capacity;             /**< slots per expert C = k*floor(CF*ceil(S/E)) of the last forward's capacity factor,
                                  S the global batch (capacity_scope LOCAL: this rank's own tokens, so this
                                  rank's C); -1 when dropless (CF <= 0). C >= S*k also drops nothing */
    const int64_t *expert_tokens; /**< [n_experts] global assignments kept per expert (owned by the object,
                                       valid until its next forward or its destroy) */
    /* timing of the last forward (fwd_) and backward (bwd_), seconds, in the struct's original order */
    double fwd_time;          /**< forward: wall time */
    double bwd_time;          /**< backward: wall time */
    double fwd_comm;          /**< forward: time the token exchanges were in flight */
    double bwd_comm;          /**< backward: time the gradient exchanges were in flight */
    double fwd_exposed;       /**< forward: time compute waited on an exchange */
    double bwd_exposed;       /**< backward: time compute waited on an exchange */
    double fwd_overlap;       /**< forward: hidden / total exchange time, 0..1 (1 when no exchange) */
    double bwd_overlap;       /**< backward: hidden / total exchange time, 0..1 (1 when no exchange) */
    double fwd_expert;        /**< forward: time in the experts' FFNs (the MoE's compute) */
    double bwd_expert;        /**< backward: time in the experts' FFNs */
    double grad_sync_time;    /**< dense-gradient all-reduce: time it was in flight */
    double grad_sync_exposed; /**< dense-gradient all-reduce: time compute waited on it */
    int expert_slot; /**< slot the experts ran in; -1 when serialized (the layer, profiling, overlap 0, no shortcut) */
    int experts_fetched; /**< expert offloading (scmoe_cuda.h): expert weight sets copied to the device by this
                                  call; 0 without offloading */
} scmoe_stats;

/* ---- one MoE layer ---- */

/** An opaque MoE layer: gate, routing with capacity, E experts spread over the expert-parallel group. */
typedef struct scmoe_moe scmoe_moe;

/** COLLECTIVE: creates an MoE layer.
 *
 * Validates cfg, allocates parameters, gradients and the whole workspace, initialises parameters
 * (N(0, 0.02), biases 0) from cfg->seed. Uses cfg->top_k. Parameters: "gate.weight" [d, E] and, for
 * each expert e held by this rank, "experts.e.w1", "experts.e.b1", "experts.e.w2", "experts.e.b2".
 * @param ctx       the context (kept by the layer: destroy the layer first).
 * @param cfg       the config (copied; the same on every rank).
 * @param[out] moe  receives the layer (NULL on failure); free it with scmoe_moe_destroy().
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL, the status of the first bad config field (on every rank),
 *         ::SCMOE_ERR_CONFIG_MISMATCH, ::SCMOE_ERR_STATE (ranks in different calls, or a broken context),
 *         ::SCMOE_ERR_NOMEM or ::SCMOE_ERR_COMM. */
scmoe_status scmoe_moe_create(scmoe_context *ctx, const scmoe_config *cfg, scmoe_moe **moe);
/** COLLECTIVE over MPI: frees a layer (its communicators go with MPI_Comm_free). On a broken context
 * (after ::SCMOE_ERR_TIMEOUT or ::SCMOE_ERR_COMM) it is scmoe_moe_abort().
 * @param moe the layer; NULL is a no-op. */
void scmoe_moe_destroy(scmoe_moe *moe);
/** Local: frees a layer without communicating or waiting on any other rank (like ncclCommAbort). Its MPI
 * communicators are left to MPI_Finalize; if an exchange of it is still pending (a timeout), the
 * buffers MPI may still write into are left allocated too (reclaimed at the process's exit), the rest
 * is freed.
 * @param moe the layer; NULL is a no-op. */
void scmoe_moe_abort(scmoe_moe *moe);
/** Training (1: noise, train capacity, caches for backward) or inference (0). The default is
 * training. Local, but every rank must be in the same mode for the next forward (checked: its call
 * agreement fails every rank with ::SCMOE_ERR_STATE otherwise).
 * @param moe       the layer.
 * @param training  1 or 0 (any nonzero is 1).
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_moe_set_training(scmoe_moe *moe, int training);
/** COLLECTIVE: forward, y[n_tokens, d] = sum_j w_j E_{e_j}(x).
 *
 * n_tokens may be 0 and differ per rank. In training mode the step is kept for scmoe_moe_backward().
 * @param moe       the layer.
 * @param n_tokens  this rank's tokens, 0..max_tokens.
 * @param x         [n_tokens, d_model] input (may be NULL when n_tokens is 0).
 * @param[out] y    [n_tokens, d_model] output, overwritten.
 * @param[out] stats (may be NULL) routing statistics and the forward timings.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL, ::SCMOE_ERR_N_TOKENS, ::SCMOE_ERR_NONFINITE (check_finite),
 *         ::SCMOE_ERR_STATE (ranks in different calls or modes, or a broken context), ::SCMOE_ERR_COMM or
 *         ::SCMOE_ERR_TIMEOUT; a bad argument on any rank fails every rank. */
scmoe_status scmoe_moe_forward(scmoe_moe *moe, int n_tokens, const float *x, float *y, scmoe_stats *stats);
/** COLLECTIVE: backward of the last training forward (once: a second backward of the same forward
 * returns ::SCMOE_ERR_STATE).
 *
 * From dy = dL/dy: dx = dL/dx (overwritten), gradients accumulated (+=), including the aux and z
 * losses with their config weights. Expert gradients sum over every token routed to the expert;
 * replicated (gate) gradients are summed over the ranks.
 * @param moe       the layer.
 * @param dy        [n_tokens, d_model] gradient of the loss w.r.t. y (n_tokens of the forward).
 * @param[out] dx   [n_tokens, d_model] gradient w.r.t. x, overwritten.
 * @param[out] stats (may be NULL) the backward timings (and the forward's routing statistics).
 * @return ::SCMOE_OK, ::SCMOE_ERR_STATE (no training forward since the last backward), ::SCMOE_ERR_NULL,
 *         ::SCMOE_ERR_NONFINITE (check_finite), ::SCMOE_ERR_COMM or ::SCMOE_ERR_TIMEOUT. */
scmoe_status scmoe_moe_backward(scmoe_moe *moe, const float *dy, float *dx, scmoe_stats *stats);
/** Sets every gradient of the layer to 0 (local).
 * @param moe the layer.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_moe_zero_grad(scmoe_moe *moe);
/** Tells the layer its weights were written (an optimizer step, a load): with
 * ::SCMOE_PRECISION_BF16 it rounds them again into the bf16 copies its GEMMs read; until then the
 * GEMMs use the copies of the last call (or of create). With FP32 it does nothing (local).
 * @param moe the layer.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_moe_params_changed(scmoe_moe *moe);
/** The number of parameter tensors this rank holds (local).
 * @param moe the layer.
 * @return the count (0 when moe is NULL). */
int scmoe_moe_param_count(const scmoe_moe *moe);
/** The i-th parameter tensor this rank holds (local).
 * @param moe     the layer.
 * @param i       0..scmoe_moe_param_count()-1.
 * @param[out] t  receives the view (pointers owned by the layer).
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_NOT_FOUND (i out of range). */
scmoe_status scmoe_moe_param_at(const scmoe_moe *moe, int i, scmoe_tensor *t);
/** A parameter tensor by name, e.g. "gate.weight" or "experts.3.w1" (local).
 * @param moe     the layer.
 * @param name    the tensor's name.
 * @param[out] t  receives the view (pointers owned by the layer).
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_NOT_FOUND (no such tensor on this rank: an
 *         expert held by other ranks). */
scmoe_status scmoe_moe_param(const scmoe_moe *moe, const char *name, scmoe_tensor *t);

/* ---- the block pair ---- */

/** An opaque block pair: dense block l followed by MoE block l+1, run by the ScMoE schedule. */
typedef struct scmoe_pair scmoe_pair;

/** COLLECTIVE: creates a block pair.
 *
 * Parameters are initialised GPT-2 style: weights N(0, 0.02), attention and MLP output projections
 * (residual writers) N(0, 0.02/sqrt(2*n_layers)), biases 0, LayerNorm 1/0, w_cg 0. They are named
 * "l0.ln_a.weight", "l0.attn.wqkv", "l0.mlp.w1", "l1.se.w2", "l1.cg.weight", "l1.gate.weight",
 * "l1.experts.e.w1", ... (scmoe_pair_param_at() lists them). When the environment variable
 * SCMOE_TRACE is set, tracing starts as with scmoe_pair_trace().
 * @param ctx        the context (kept by the pair: destroy the pair first).
 * @param cfg        the config (copied; the same on every rank); k comes from cfg->arch (top_k may
 *                   only repeat it or keep the default 1).
 * @param[out] pair  receives the pair (NULL on failure); free it with scmoe_pair_destroy().
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL, the status of the first bad config field (on every rank),
 *         ::SCMOE_ERR_TOP_K (top_k contradicts arch), ::SCMOE_ERR_CONFIG_MISMATCH, ::SCMOE_ERR_STATE (ranks in
 *         different calls, or a broken context), ::SCMOE_ERR_NOMEM, ::SCMOE_ERR_IO (trace file) or ::SCMOE_ERR_COMM. */
scmoe_status scmoe_pair_create(scmoe_context *ctx, const scmoe_config *cfg, scmoe_pair **pair);
/** COLLECTIVE over MPI: frees a pair and closes its trace (its communicators go with MPI_Comm_free). On
 * a broken context (after ::SCMOE_ERR_TIMEOUT or ::SCMOE_ERR_COMM) it is scmoe_pair_abort().
 * @param pair the pair; NULL is a no-op. */
void scmoe_pair_destroy(scmoe_pair *pair);
/** Local: frees a pair without communicating or waiting on any other rank (like ncclCommAbort); as
 * scmoe_moe_abort(), an exchange or gradient all-reduce still pending keeps the buffers it may write.
 * @param pair the pair; NULL is a no-op. */
void scmoe_pair_abort(scmoe_pair *pair);
/** Training (1, the default) or inference (0); see scmoe_moe_set_training(). Local, but every rank
 * must be in the same mode for the next forward (checked, as there).
 * @param pair      the pair.
 * @param training  1 or 0 (any nonzero is 1).
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_pair_set_training(scmoe_pair *pair, int training);
/** COLLECTIVE: forward through both blocks.
 *
 * x, y: [batch, seq_len, d_model]; batch may be 0 and differ per rank.
 * @param pair       the pair.
 * @param batch      sequences on this rank, >= 0, with batch*seq_len <= max_tokens.
 * @param seq_len    tokens per sequence, 1..max_seq_len.
 * @param x          [batch, seq_len, d_model] input (may be NULL when batch is 0).
 * @param[out] y     [batch, seq_len, d_model] output, overwritten.
 * @param[out] stats (may be NULL) routing statistics, timings and the expert slot used.
 * @return ::SCMOE_OK, ::SCMOE_ERR_SEQ_LEN, ::SCMOE_ERR_NULL, ::SCMOE_ERR_STATE (a gradient all-reduce
 *         pending: call scmoe_pair_grad_sync(); ranks in different calls or modes; a broken context),
 *         ::SCMOE_ERR_NONFINITE, ::SCMOE_ERR_COMM or
 *         ::SCMOE_ERR_TIMEOUT; a bad argument on any rank fails every rank. */
scmoe_status scmoe_pair_forward(scmoe_pair *pair, int batch, int seq_len, const float *x, float *y, scmoe_stats *stats);
/** COLLECTIVE: backward of the last training forward (once: a second backward of the same forward
 * returns ::SCMOE_ERR_STATE).
 *
 * dx overwritten; gradients accumulated. dy on each rank is taken as dL/dy of one global loss: expert
 * gradients sum over every token routed to the expert, replicated (dense) gradients are summed over
 * the ranks. With overlap_grad_sync = 1 that sum is still in flight on return.
 * @param pair       the pair.
 * @param dy         [batch, seq_len, d_model] gradient of the loss w.r.t. y.
 * @param[out] dx    [batch, seq_len, d_model] gradient w.r.t. x, overwritten.
 * @param[out] stats (may be NULL) the backward timings.
 * @return ::SCMOE_OK, ::SCMOE_ERR_STATE, ::SCMOE_ERR_NULL, ::SCMOE_ERR_NONFINITE, ::SCMOE_ERR_COMM or
 *         ::SCMOE_ERR_TIMEOUT. */
scmoe_status scmoe_pair_backward(scmoe_pair *pair, const float *dy, float *dx, scmoe_stats *stats);
/** COLLECTIVE: finishes the dense-gradient all-reduce started by backward (overlap_grad_sync=1).
 *
 * Call it before reading or stepping the gradients, and before the next forward or backward; it
 * returns at once when nothing is pending.
 * @param pair       the pair.
 * @param[out] stats (may be NULL) receives grad_sync_time and grad_sync_exposed.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL, ::SCMOE_ERR_STATE (a broken context), ::SCMOE_ERR_COMM or
 *         ::SCMOE_ERR_TIMEOUT. */
scmoe_status scmoe_pair_grad_sync(scmoe_pair *pair, scmoe_stats *stats);
/** Sets every gradient of the pair to 0 (local).
 * @param pair the pair.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_pair_zero_grad(scmoe_pair *pair);
/** Tells the pair its weights were written; see scmoe_moe_params_changed() (local).
 * @param pair the pair.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_pair_params_changed(scmoe_pair *pair);
/** Traces every later step's operations to a Chrome/Perfetto JSON file (local: each rank its own file).
 *
 * Writes every later step's operations, with begin and end times, to a Chrome/Perfetto JSON trace at
 * path (open it at ui.perfetto.dev or chrome://tracing): pid = rank, lane 0 compute, lane 1 the
 * token exchanges, lane 2 the gradient all-reduce. NULL closes it. Setting SCMOE_TRACE=path in the
 * environment does the same at create; with several ranks each writes path.rank(r).json, and the
 * second and later pairs on a context add .pair(i) to the name.
 * @param pair  the pair.
 * @param path  the file to write (replaced), or NULL to finish and close the current trace.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_IO (the file cannot be opened). */
scmoe_status scmoe_pair_trace(scmoe_pair *pair, const char *path);
/** The number of parameter tensors this rank holds (local).
 * @param pair the pair.
 * @return the count (0 when pair is NULL). */
int scmoe_pair_param_count(const scmoe_pair *pair);
/** The i-th parameter tensor this rank holds, with its name and shape (local).
 * @param pair    the pair.
 * @param i       0..scmoe_pair_param_count()-1.
 * @param[out] t  receives the view (pointers owned by the pair).
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_NOT_FOUND (i out of range). */
scmoe_status scmoe_pair_param_at(const scmoe_pair *pair, int i, scmoe_tensor *t);
/** A parameter tensor by name, e.g. "l0.attn.wqkv" or "l1.experts.5.w1" (local).
 * @param pair    the pair.
 * @param name    the tensor's name.
 * @param[out] t  receives the view (pointers owned by the pair).
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_NOT_FOUND (no such tensor on this rank: an
 *         expert held by other ranks). */
scmoe_status scmoe_pair_param(const scmoe_pair *pair, const char *name, scmoe_tensor *t);

/* ---- driving a layer or a pair from a host's own training loop ---- */

/** Changes the weights of the load-balance (aux) and router z losses (local; set the same on every rank).
 *
 * The weights scale the aux and z gradients that backward adds; a forward fixes them for its own
 * backward, so a change applies from the next forward (a schedule sets them before each step).
 * Gradient accumulation over M micro-batches: every backward adds its micro-batch's aux and z gradient,
 * so when the host averages its loss over the micro-batches (dy scaled by 1/M), set the weights to w/M
 * to weigh the auxiliary losses the same as in one step over the whole batch.
 * @param moe              the layer.
 * @param aux_loss_weight  the new scmoe_config::aux_loss_weight, finite and >= 0.
 * @param z_loss_weight    the new scmoe_config::z_loss_weight, finite and >= 0.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_LOSS_WEIGHT (nothing changed). */
scmoe_status scmoe_moe_set_loss_weights(scmoe_moe *moe, float aux_loss_weight, float z_loss_weight);
/** The pair's MoE block's aux and z loss weights; see scmoe_moe_set_loss_weights().
 * @param pair             the pair.
 * @param aux_loss_weight  finite and >= 0.
 * @param z_loss_weight    finite and >= 0.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_LOSS_WEIGHT (nothing changed). */
scmoe_status scmoe_pair_set_loss_weights(scmoe_pair *pair, float aux_loss_weight, float z_loss_weight);

/** Puts prefix in front of every parameter name of the layer (local), e.g. "layers.3.mlp." turns
 * "gate.weight" into "layers.3.mlp.gate.weight", so several layers share one name space.
 *
 * A later call replaces the prefix ("" removes it). Only the names change, not the values (the
 * initialisation was keyed on the names without prefix). scmoe_moe_param() then takes the new names.
 * @param moe     the layer.
 * @param prefix  the prefix; with it every name must stay under 64 bytes.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_OPTION (too long: nothing changed). */
scmoe_status scmoe_moe_set_name_prefix(scmoe_moe *moe, const char *prefix);
/** Puts prefix in front of every parameter name of the pair ("blocks.2." turns "l0.attn.wqkv" into
 * "blocks.2.l0.attn.wqkv"); see scmoe_moe_set_name_prefix().
 * @param pair    the pair.
 * @param prefix  the prefix; with it every name must stay under 64 bytes.
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL or ::SCMOE_ERR_OPTION (too long: nothing changed). */
scmoe_status scmoe_pair_set_name_prefix(scmoe_pair *pair, const char *prefix);

/** The routed experts this rank holds: first .. first+count-1 (global indices; local).
 *
 * Experts are spread in contiguous blocks over the expert-parallel group (scmoe_config::ep_size):
 * rank r of the group holds n_experts/ep_size of them from r*n_experts/ep_size on.
 * @param moe         the layer.
 * @param[out] first  the first expert held here.
 * @param[out] count  how many (n_experts / ep_size).
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_moe_expert_range(const scmoe_moe *moe, int *first, int *count);
/** The routed experts of the pair's MoE block this rank holds; see scmoe_moe_expert_range().
 * @param pair        the pair.
 * @param[out] first  the first expert held here.
 * @param[out] count  how many.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_pair_expert_range(const scmoe_pair *pair, int *first, int *count);

/** The gate-noise generator's state (local): the count of training forwards so far.
 *
 * The noise of a training forward is a function of (seed, this state, token); saving it with the
 * parameters and restoring it with scmoe_moe_set_noise_state() makes a resumed run draw the same noise
 * as an uninterrupted one (scmoe_config::gate_noise_std > 0). Every rank holds the same value.
 * @param moe         the layer.
 * @param[out] state  receives the state.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_moe_noise_state(const scmoe_moe *moe, uint64_t *state);
/** Restores the gate-noise state read by scmoe_moe_noise_state() (local; the same on every rank).
 * @param moe    the layer.
 * @param state  the saved state.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_moe_set_noise_state(scmoe_moe *moe, uint64_t state);
/** The pair's gate-noise state; see scmoe_moe_noise_state().
 * @param pair        the pair.
 * @param[out] state  receives the state.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_pair_noise_state(const scmoe_pair *pair, uint64_t *state);
/** Restores the pair's gate-noise state; see scmoe_moe_set_noise_state().
 * @param pair   the pair.
 * @param state  the saved state.
 * @return ::SCMOE_OK or ::SCMOE_ERR_NULL. */
scmoe_status scmoe_pair_set_noise_state(scmoe_pair *pair, uint64_t state);

#ifdef __cplusplus
}
#endif
#endif /* SCMOE_H */
