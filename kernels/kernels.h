/* kernels.h: the math of a block, one concept per file, each a *_forward / *_backward pair over flat
 * row-major arrays. Backward functions accumulate parameter gradients (+=). */
#ifndef SCMOE_KERNELS_H
#define SCMOE_KERNELS_H

#include "../scmoe.h"
#include "exec.h"
#include <string.h>

/* The elementwise loops are compiled for the portable baseline and for AVX2 and AVX-512 cores, and
 * the loader picks one per machine (GCC's target_clones, an ifunc): up to 4x wider vectors with the
 * same binary. The loops are elementwise or sum in a fixed order, and FP contraction is off in them
 * whatever -std the embedder compiles with (gnu modes would fuse a*b+c into an FMA on the clones that
 * have one), so every clone computes the baseline's bits. bench/bench_experts, expert FFN fwd+bwd
 * against plain sgemm: 0.69 -> 0.88 of its GFLOP/s on an AVX-512 machine. Clang builds take the
 * baseline (it has no per-function way to turn contraction off here). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SCMOE_NO_CLONES)
#define SCMOE_SIMD_CLONES                                                                                              \
    __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4"), optimize("fp-contract=off")))
#else
#define SCMOE_SIMD_CLONES
#endif

/* layernorm.c: dx accumulates (+=) */
void scmoe__layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                              int N, int C);
void scmoe__layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w,
                               const float *mean, const float *rstd, int N, int C);

/* activation.c: pre [N, scmoe__ffn_width(h)], hid [N, h] */
int scmoe__ffn_width(int h, scmoe_activation act);
void scmoe__sum_rows(float *acc, const float *x, int N, int C);
void scmoe__broadcast_rows(float *out, const float *b, int N, int C);
/* pre += b (b may be NULL), then hid = act(pre) */
void scmoe__activation_forward(float *hid, float *pre, const float *b, int N, int h, scmoe_activation act);
void scmoe__activation_backward(float *dpre, const float *dhid, const float *pre, int N, int h, scmoe_activation act);

/* gate.c */
/* logits [N, E] in (noise added in place), p [N, E] = softmax, lse [N] = logsumexp */
void scmoe__gate_softmax(float *logits, float *p, float *lse, int N, int E, float noise_std, uint64_t seed,
                         uint64_t step, int64_t token_offset);
/* choice [N, k], weight [N, k] (after renormalisation), score [N] = top-1 probability */
void scmoe__gate_topk(int *choice, float *weight, float *score, const float *p, int N, int E, int k, int renormalize);
/* dlogits [N, E] = dL/dlogits (the part of scmoe__gate_backward before its GEMMs); dweight [N, k] =
 * dL/dweight; aux_coef [E] = dL/dp[s, e] from the aux loss (NULL: none); z_coef = w_z / S */
void scmoe__gate_backward_logits(float *dlogits, const float *dweight, const int *choice, const float *p,
                                 const float *lse, const float *aux_coef, float z_coef, int N, int E, int k,
                                 int renormalize);

/* route.c */
typedef struct route_plan {
    int64_t tokens, capacity, dropped;   /* global */
    int64_t *expert_count, *expert_kept; /* [E] all assignments / kept, global */
    int *slot;                           /* [n_local * k] row in the send buffer, -1 if dropped */
    int *send_counts, *send_displs;      /* [ep_size] rows */
    int *recv_counts, *recv_displs;      /* [ep_size] rows */
    int *recv_to_expert;                 /* [n_recv] */
    int *expert_offsets;                 /* [n_stages * E_local + 1]: stage s, expert e starts at [s * E_local + e] */
    int *cursor, *src_cursor;            /* scratch [max(E, n_stages * E_local)], [ep_size * E_local] */
    int n_send, n_recv, n_stages;
} route_plan;

/* C = k*floor(cf*ceil(S/E)) slots per expert as the config asks for them, -1 when dropless (cf <= 0) */
int64_t scmoe__route_slots(int64_t S, int E, int k, float cf);
int64_t scmoe__route_capacity(int64_t S, int E, int k, float cf);
size_t scmoe__route_workspace_bytes(int64_t S_max, int k);
/* records: per global token (rank-major), k int32 expert ids then the top-1 probability's bits;
 * chunks: 0, or the peers' blocks split in chunks stages after the own block's (pipelining) */
void scmoe__route_plan_build(route_plan *pl, void *work, const int32_t *records, const int *tokens_per_rank, int world,
                             int rank, int ep_size, int E, int k, scmoe_priority priority, int64_t capacity,
                             int chunks);
/* capacity per source rank: the send side from this rank's n records alone (capacity its own C);
 * counts [ep_size][1 + E_local*k]: for each peer, words 1.. = rows kept for its expert e in round j at
 * 1 + e*k + j (word 0 is left to the caller). work: scmoe__route_workspace_bytes(n, k). */
void scmoe__route_plan_local_send(route_plan *pl, void *work, const int32_t *records, int n, int ep_size, int E, int k,
                                  scmoe_priority priority, int64_t capacity, int32_t *counts);
/* count [k * E]: count[j * E + e] = my n tokens' round-j (j-th choice) assignments to expert e */
void scmoe__route_round_counts(int64_t *count, const int32_t *records, int n, int E, int k);
/* capacity over the global batch of S tokens, TOKEN priority, without any other rank's records: the send
 * side (slot, send_counts/displs, n_send; counts as scmoe__route_plan_local_send's) and the statistics
 * (expert_count/kept, dropped, tokens, capacity) exactly as scmoe__route_plan_build's, from prefix and
 * total [k * E]: the ranks' scmoe__route_round_counts summed over the ranks below this one (world order)
 * and over all ranks. The receive side is then scmoe__route_plan_local_recv's. work:
 * scmoe__route_workspace_bytes(n, k). */
void scmoe__route_plan_global_send(route_plan *pl, void *work, const int32_t *records, int n, int ep_size, int E, int k,
                                   const int64_t *prefix, const int64_t *total, int64_t S, int64_t capacity,
                                   int32_t *counts);
/* the same send side without the slots, from my round counts mine [k * E] (scmoe__route_round_counts)
 * alone; base [k * E + 1]: where my first round-j assignment to e sits in e over the global batch, at
 * j * E + e, then the capacity (what scmoe__cuda_route_global_slots takes) */
void scmoe__route_plan_global_counts(route_plan *pl, const int64_t *mine, const int64_t *prefix, const int64_t *total,
                                     int ep_size, int E, int k, int64_t S, int64_t capacity, int32_t *counts,
                                     int64_t *base);
/* route.c: the send side from kept flags in pl->slot (0 kept, -1 dropped), pl->cursor [E] (my kept rows
 * per expert) and pl->expert_count [E]: statistics, send layout, counts' words 1.., the slots */
void scmoe__route_send_rows(route_plan *pl, const int32_t *records, int n, int ep_size, int E, int k, int64_t S,
                            int64_t capacity, int32_t *counts);

/* route_batch.c: capacity over the global batch with BATCH priority by a radix selection over the ranks.
 * Pair p = j * E + e (round j, expert e); keys at or above thresh[p] with ties (see route_batch.c). */
#define ROUTE_SELECT_BINS 4096 /* a round's histogram: n_open << bits counts, at most this many (or 2 k E) */
/* the counts a histogram buffer holds for k E pairs: every round's, 1-bit digits of every pair included */
static inline size_t route_select_bins(int kE) {
    return (size_t)kE * 2 > ROUTE_SELECT_BINS ? (size_t)kE * 2 : ROUTE_SELECT_BINS;
}
typedef struct route_select {
    int64_t *need;    /* [k E] the pair's keys still to keep, among its candidates */
    int64_t *ties;    /* [k E] how many keys equal to thresh are kept, by global token order */
    uint64_t *thresh; /* [k E] the bits found so far, then the threshold: keys above it are kept */
    int *open;        /* [k E] the pair's histogram in this round, -1 once decided */
    int n_open;       /* pairs still open: each has 1 << bits counts in this round's histogram */
    int n_ties;       /* decided pairs whose keys equal to thresh are kept in part: the ties' scan */
    int shift, bits;  /* the key's bits below shift are still to find; this round finds the next bits */
} route_select;
/* every pair open, before the first round (whose histogram counts every assignment) */
void scmoe__route_select_begin(route_select *s, int E, int k);
/* my n tokens' counts per open pair and digit: hist [n_open << bits], to be summed over the ranks */
void scmoe__route_select_histogram(const route_select *s, double *hist, const int32_t *records, int n, int E, int k);
/* folds in the global histogram (the first: total [k E], every rank's round counts, comes out of it, and
 * with capacity C the pairs that keep all or none are decided); returns the pairs still open (another
 * round), -1 if it cannot hold (the ranks out of step) */
int scmoe__route_select_step(route_select *s, const double *hist, int E, int k, int64_t capacity, int64_t *total);
/* mine [k E]: my keys equal to thresh of each pair kept in part (n_ties > 0), to be scanned over the ranks */
void scmoe__route_select_ties(const route_select *s, int64_t *mine, const int32_t *records, int n, int E, int k);
/* the send side and statistics (as scmoe__route_plan_global_send's) once every pair is decided;
 * tie_before [k E]: the exclusive scan of scmoe__route_select_ties (NULL when n_ties is 0); seen [k E]:
 * scratch; total [k E] from the first step */
void scmoe__route_plan_batch_send(route_plan *pl, const int32_t *records, int n, int ep_size, int E, int k,
                                  const route_select *s, const int64_t *tie_before, int64_t *seen, const int64_t *total,
                                  int64_t S, int64_t capacity, int32_t *counts);
/* the receive side from every source's counts (as sent above, indexed by source) */
void scmoe__route_plan_local_recv(route_plan *pl, const int32_t *counts, int ep_size, int ep_rank, int E_local, int k,
                                  int chunks);
/* stages of a plan with this many chunks */
int scmoe__route_stages(int chunks);
/* [*lo, *hi): the rows of a block of count rows to or from one peer (own: this rank's block) in stage s */
void scmoe__route_stage_range(int n_stages, int s, int own, int count, int *lo, int *hi);

/* rows.c: the MoE's row moves (slot: the route plan's, -1 dropped); see rows.c for the math */
void scmoe__pack_rows(float *send, const float *x, const int *slot, int n, int k, int d);
void scmoe__permute_rows(float *dst, const float *src, const int *map, int n, int d, int scatter);
void scmoe__decode_rows(float *y, float beta, const float *rows, const int *slot, const float *weight, int n, int k,
                        int d);
void scmoe__decode_rows_backward(float *grows, float *dweight, const float *dy, const float *rows, const int *slot,
                                 const float *weight, int n, int k, int d);

/* combine.c: y = a + c s with c = sigmoid(w_cg . m) (wcg NULL: 1), cgate [n] = c; its backward
 * (ds = c dy, dz = (dy . s) c (1 - c)); out[i, j] += u[i] v[j] */
void scmoe__cg_combine_forward(float *y, float *cgate, const float *a, const float *s, const float *m, const float *wcg,
                               int n, int d);
void scmoe__cg_combine_backward(float *ds, float *dz, const float *dy, const float *s, const float *cgate, int n,
                                int d);
void scmoe__add_outer(float *out, const float *u, const float *v, int n, int d);

/* compute_host.c: 1 if any of x[0..n) is NaN or Inf */
int scmoe__has_nonfinite(const float *x, size_t n);

/* bf16.c: round-to-nearest-even float -> bfloat16, and back. One value: rounding to nearest even on
 * the dropped 16 bits, a NaN kept quiet; widening is exact. */
static inline uint16_t bf16_from_float(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return (uint16_t)((u >> 16) | 0x0040u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
void scmoe__bf16_pack(uint16_t *dst, const float *src, size_t n);
void scmoe__bf16_unpack(float *dst, const uint16_t *src, size_t n);
/* rows x cols of a matrix with row stride ld, written densely (row stride cols); round: to bf16 and
 * back, the float a bf16 GEMM operand stands for */
void scmoe__bf16_pack_rows(uint16_t *dst, const float *src, int rows, int cols, int ld);
void scmoe__bf16_unpack_rows(float *dst, const uint16_t *src, int rows, int cols, int ld);
void scmoe__bf16_round_rows(float *dst, const float *src, int rows, int cols, int ld);

/* attention.c: att, datt [B, H, T, T]; dqkv overwritten */
void scmoe__attention_forward(const exec *ex, float *out, float *att, const float *qkv, int B, int T, int d, int H,
                              int causal);
void scmoe__attention_backward(const exec *ex, float *dqkv, float *datt, const float *dout, const float *qkv,
                               const float *att, int B, int T, int d, int H, int causal);

#endif
