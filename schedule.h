/* schedule.h: the order in which a block pair's operations and its MoE's phases run.
 *
 * A pair is SCHED_OPS dense operations forward (F0..F7) and backward (B0..B7). The MoE's gate can run
 * once its input exists (after F[gate_after-1]); its experts take a slot K among the operations that
 * follow, chosen from measured times; the combine lands before decode. Backward mirrors it: the
 * gradient exchange starts first, the experts' backward takes a slot, and dX_sc is added before
 * B[grad_needed_before]. Serialized runs wait on every exchange at once, in the same order, so
 * both orders compute the same numbers. */
#ifndef SCMOE_SCHEDULE_H
#define SCMOE_SCHEDULE_H

#include "scmoe_internal.h"
#include <stdio.h>

#define SCHED_OPS 8
#define SCHED_PROFILE_STEPS 2   /* serialized steps timed after a shape change, before choosing */
#define SCHED_MAX_EVENTS 64

typedef struct sched_moe {
    moe_layer *m;
    const float *x;   /* forward: the MoE's input */
    float *dx;        /* backward: where dL/dX is added */
    float *y;         /* forward: where the routed output is added */
} sched_moe;

typedef struct sched_bucket { float *ptr; int n; } sched_bucket;

typedef struct sched_event { const char *name; int kind; double t0, t1; } sched_event; /* kind 0 compute, 1 comm */

typedef struct schedule {
    scmoe_context *ctx;
    scmoe_config cfg;
    int shortcut;                       /* the MoE may overlap (arch scmoe) */
    int slot_f, slot_b;                 /* chosen slots */
    int profile_left[2], profile_n;     /* serialized steps left to time, forward / backward; their shape */
    double t_f[SCHED_OPS], t_b[SCHED_OPS];
    double t_disp, t_exp, t_comb, tb_disp, tb_exp, tb_comb;
    /* gradient buckets: one per backward operation, then the gate, then the experts (replicas) */
    sched_bucket bucket[SCHED_OPS + 2];
    int req[SCHED_OPS + 2];
    int ready[SCHED_OPS + 2];           /* finished, its all-reduce not started yet */
    comm *world, *replicas;
    double grad_t0, grad_exposed, grad_time;
    /* stats of the last forward / backward */
    double time[2], comm_time[2], exposed[2], expert[2];
    int slot_used[2];
    /* trace */
    sched_event ev[2][SCHED_MAX_EVENTS];
    int n_ev[2];
    FILE *trace;                        /* Chrome/Perfetto trace being written, or NULL */
    long trace_step;
} schedule;

scmoe_status schedule_init(schedule *s, scmoe_context *ctx, const scmoe_config *cfg, comm *replicas,
                           const sched_bucket *buckets);
scmoe_status schedule_forward(schedule *s, exec *ex, void (*run)(void *, int), void *arg, int gate_after,
                              sched_moe *mo, int n);
scmoe_status schedule_backward(schedule *s, exec *ex, void (*run)(void *, int), void *arg, int grad_needed_before,
                               sched_moe *mo, const float *dy, int n);
scmoe_status schedule_grad_wait(schedule *s);
/* Starts writing a Chrome/Perfetto JSON trace to path (NULL stops and closes it). */
scmoe_status schedule_trace_open(schedule *s, const char *path);
void schedule_trace_close(schedule *s);
/* which: 0 forward, 1 backward, 2 gradient sync */
void schedule_fill_stats(const schedule *s, scmoe_stats *st, int which);

/* The slot K in 0..n_ops minimising max(sum_{i<K} ops_i, t_disp) + t_exp + max(sum_{i>=K} ops_i, t_comb). */
int schedule_choose_slot(const double *ops, int n_ops, double t_disp, double t_exp, double t_comb);

#endif
