/* comm.h: the communication interface the core calls. The core never includes mpi.h: serial.c
 * implements it for one rank (plain copies), mpi.c over an MPI communicator.
 *
 * A comm is one group of ranks. Blocking calls are the small metadata exchanges; the token
 * exchanges and gradient all-reduces are nonblocking: *_start returns a request id, comm_test /
 * comm_wait finish it, and comm_progress lets the backend move bytes while compute runs (OpenMPI's
 * libnbc only advances a collective inside MPI calls). Every call returns an scmoe_status and, on
 * failure, leaves a sentence in comm->err. */
#ifndef SCMOE_COMM_H
#define SCMOE_COMM_H

#include "../scmoe.h"

#define COMM_MAX_REQ 64

typedef struct comm comm;

typedef struct comm_ops {
    scmoe_status (*split)(comm *c, int color, int key, comm **out);
    void (*destroy)(comm *c);
    scmoe_status (*allgather)(comm *c, const void *send, int bytes, void *recv);
    /* recv_bytes[i], displs[i]: bytes from rank i and where they land */
    scmoe_status (*allgatherv)(comm *c, const void *send, int bytes, void *recv, const int *recv_bytes,
                               const int *displs);
    scmoe_status (*allreduce_f64)(comm *c, double *buf, int n);      /* in place, sum */
    scmoe_status (*allreduce_i64_max)(comm *c, int64_t *buf, int n); /* in place, max */
    /* counts and displacements in elements of elem_bytes (elem_bytes * count must fit an int) */
    scmoe_status (*alltoallv_start)(comm *c, const void *send, const int *scounts, const int *sdispls, void *recv,
                                    const int *rcounts, const int *rdispls, int elem_bytes, int *req);
    scmoe_status (*allreduce_start)(comm *c, float *buf, int n, int *req); /* in place, sum */
    scmoe_status (*test)(comm *c, int req, int *done);
    scmoe_status (*wait)(comm *c, int req);
    void (*progress)(comm *c);
    /* requests started and not yet completed by test or wait (a timed-out one stays pending) */
    int (*pending)(comm *c);
    /* frees c without communicating (abort): no MPI_Comm_free, and what a pending request may still use
     * (its argument copies, the backend's own buffers) is left allocated */
    void (*abandon)(comm *c);
    /* in place, sum: the small per-step statistics, waited on only where they are needed */
    scmoe_status (*allreduce_f64_start)(comm *c, double *buf, int n, int *req);
    /* in place, sum with bfloat16 on the wire (scmoe_config.grad_sync_bf16): each rank's buf rounded to
     * bf16, chunk r of the P chunks summed in fp32 over ranks 0..P-1 in that order by rank r alone and
     * rounded to bf16 once, then every chunk sent to every rank: a reduce-scatter and an allgather of
     * 2(P-1)/P n bf16s each way, half a float ring's bytes, and every rank gets the same bits. work:
     * comm_bf16_work(n, size) uint16s, untouched by the caller until the request completes. */
    scmoe_status (*allreduce_bf16_start)(comm *c, float *buf, int n, uint16_t *work, int *req);
} comm_ops;

/* The uint16s allreduce_bf16_start needs for n floats over P ranks: this rank's n rounded values (also
 * where every rank's reduced chunk lands), and one chunk of ceil(n/P) from each rank. */
static inline size_t comm_bf16_work(int n, int P) { return (size_t)n + (size_t)P * (size_t)((n + P - 1) / P); }

struct comm {
    const comm_ops *ops;
    int rank, size;
    double timeout_s;        /* comm_wait gives up after this long */
    scmoe_progress progress; /* who advances nonblocking requests */
    void *impl;
    char err[256];
};

scmoe_status scmoe__comm_serial_create(comm **out);

static inline scmoe_status comm_wait(comm *c, int req) { return c->ops->wait(c, req); }
static inline scmoe_status comm_test(comm *c, int req, int *done) { return c->ops->test(c, req, done); }
static inline void comm_progress(comm *c) { c->ops->progress(c); }

#endif
