/* schedule.h: runs a block's operations and one MoE's phases in the serialized or the overlapped order.
 *
 * The schedule takes its block as data (sched_block): n_ops operations, each a name, a forward and a
 * backward function; the operation whose output the MoE reads (moe_input_op); whether the MoE may run
 * behind later operations at all (overlap: ScMoE's shortcut); and the gradients each operation's
 * backward finishes. Forward runs op 0..n-1, backward op n-1..0. It knows nothing else of its block:
 * the block pair (pair.c) is one, tests/test_schedule.c has another.
 *
 * Forward: the gate runs right after the MoE's input exists (after op moe_input_op; after the last op
 * when the MoE may not overlap) and starts the dispatch; the experts take a slot K among the operations
 * that follow, chosen from measured times; the combine lands before decode. Backward mirrors it: the
 * gradient exchange starts first, the experts' backward takes a slot, and dX of the MoE's input is added
 * before the backward of op moe_input_op. Serialized runs wait on every exchange at once, in the same
 * order, so both orders compute the same numbers. */
#ifndef SCMOE_SCHEDULE_H
#define SCMOE_SCHEDULE_H

#include "scmoe_internal.h"
#include <stdio.h>

#define SCHED_MAX_OPS       16 /* most operations one block may hand the schedule */
#define SCHED_PROFILE_STEPS 2  /* serialized steps timed after a shape change, before choosing */
#define SCHED_MAX_EVENTS    64

/* One operation of a block: forward and backward each take the block's self pointer. */
typedef struct sched_op {
    const char *name;
    void (*forward)(void *self);
    void (*backward)(void *self);
} sched_op;

/* Gradients summed over a communicator once they are final: n floats from ptr (n 0: none). With work
 * (comm_two_round_work(n, over->size, wire) bytes) the sum is the library's two rounds with that wire
 * (scmoe_config.grad_sync_algo, grad_sync_bf16), without it MPI's all-reduce. */
typedef struct sched_bucket {
    float *ptr;
    int n;
    comm *over;
    void *work;
    comm_wire wire;
    const float *src; /* where the backward wrote them (device memory), copied to ptr before the all-reduce
                         (compute_ops.copy_out); NULL: at ptr */
} sched_bucket;

/* Whether a bucket's all-reduce has anything to do: gradients, and more than one rank to sum them over. */
static inline int sched_bucket_summed(const sched_bucket *k) { return k->ptr && k->n > 0 && k->over->size > 1; }

typedef struct sched_block {
    void *self;
    const sched_op *ops;
    int n_ops;                             /* 1..SCHED_MAX_OPS */
    int moe_input_op;                      /* the op whose output is the MoE's input */
    int overlap;                           /* the MoE may run behind the ops after its input */
    sched_bucket op_grads[SCHED_MAX_OPS];  /* what op i's backward finishes */
    sched_bucket gate_grads, expert_grads; /* what the MoE's gate backward and experts' backward finish */
} sched_block;

typedef struct sched_moe {
    moe_layer *m;
    const float *x;  /* forward: the MoE's input */
    float *dx;       /* backward: where dL/dX is added */
    float *y;        /* forward: where the routed output is added */
    const float *dy; /* backward: dL/d(routed output) */
} sched_moe;

typedef struct sched_event {
    const char *name;
    int kind;
    double t0, t1;
} sched_event; /* kind 0 compute, 1 comm */

/* A running schedule: its block, the measured times, the chosen slots, gradient buckets in flight. */
typedef struct scheduler {
    scmoe_context *ctx;
    sched_block blk;
    int expert_slot, overlap;         /* the config's: fixed slot (-1 chosen) and overlapped order */
    int gate_after;                   /* forward: the gate runs before op gate_after (n_ops: after the last) */
    int grad_needed_before;           /* backward step before which the MoE's dX is added */
    char bwd_name[SCHED_MAX_OPS][40]; /* "<name>_bwd", for the trace */
    int slot_f, slot_b;               /* chosen slots */
    int profile_left[2], profile_n;   /* serialized steps left to time, forward / backward; their shape */
    double t_f[SCHED_MAX_OPS], t_b[SCHED_MAX_OPS]; /* by step of each pass */
    double t_disp[2], t_exp[2], t_comb[2];         /* forward, backward */
    /* gradient buckets by backward step, then the gate's, then the experts' */
    sched_bucket bucket[SCHED_MAX_OPS + 2];
    int req[SCHED_MAX_OPS + 2];
    int ready[SCHED_MAX_OPS + 2];  /* finished, not queued yet */
    int queued[SCHED_MAX_OPS + 2]; /* finished, their all-reduces to start in this order */
    int n_queued;
    comm *world;
    double grad_t0, grad_exposed, grad_time;
    /* stats of the last forward / backward */
    double time[2], comm_time[2], exposed[2], expert[2];
    int slot_used[2];
    /* trace */
    sched_event ev[2][SCHED_MAX_EVENTS];
    int n_ev[2];
    FILE *trace; /* Chrome/Perfetto trace being written, or NULL */
    long trace_step;
} scheduler;

/* Takes the block (copied) and the config's expert_slot and overlap. */
scmoe_status scmoe__schedule_init(scheduler *s, scmoe_context *ctx, const scmoe_config *cfg, const sched_block *blk);
/* One pass over n tokens: the block's ops with the MoE's phases among them. */
scmoe_status scmoe__schedule_forward(scheduler *s, exec *ex, sched_moe *mo, int n);
scmoe_status scmoe__schedule_backward(scheduler *s, exec *ex, sched_moe *mo, int n);
scmoe_status scmoe__schedule_grad_wait(scheduler *s);
/* Starts writing a Chrome/Perfetto JSON trace to path (NULL stops and closes it). */
scmoe_status scmoe__schedule_trace_open(scheduler *s, const char *path);
void scmoe__schedule_trace_close(scheduler *s);
/* which: 0 forward, 1 backward, 2 gradient sync */
void scmoe__schedule_fill_stats(const scheduler *s, scmoe_stats *st, int which);

/* The slot K in 0..n_ops minimising max(sum_{i<K} ops_i, t_disp) + t_exp + max(sum_{i>=K} ops_i, t_comb). */
int scmoe__schedule_choose_slot(const double *ops, int n_ops, double t_disp, double t_exp, double t_comb);

#endif
