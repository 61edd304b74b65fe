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

/* what a two-round sum (allreduce_two_round_start) carries between ranks */
typedef enum comm_wire { COMM_WIRE_F32 = 0, COMM_WIRE_BF16 = 1 } comm_wire;

typedef struct comm_ops {
    scmoe_status (*split)(comm *c, int color, int key, comm **out);
    void (*destroy)(comm *c);
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
    /* in place, sum in two rounds of point-to-point messages (scmoe_config.grad_sync_algo, grad_sync_bf16):
     * chunk r of the P chunks of every rank's values goes to rank r, which sums it in fp32 over ranks
     * 0..P-1 in that order (a reduce-scatter), then sends its finished chunk to every rank (an allgather).
     * 2(P-1)/P n values leave and arrive per rank, the ring's bytes, in 2 rounds of up to P-1 messages
     * each way, and every rank gets the same bits in rank order whatever MPI's collective algorithms.
     * wire COMM_WIRE_F32 sends the floats as they are; COMM_WIRE_BF16 rounds each rank's values to bf16
     * once and each chunk's sum once, half the bytes. work: comm_two_round_work(n, size, wire) bytes,
     * float-aligned, untouched by the caller until the request completes. */
    scmoe_status (*allreduce_two_round_start)(comm *c, float *buf, int n, comm_wire wire, void *work, int *req);
    /* n int64s summed two ways (capacity GLOBAL with TOKEN priority: the token counts and the routing
     * counts, O(n) bytes a rank whatever P): out[0, n) = the sum of in over the ranks below this one (an
     * exclusive scan; 0 on rank 0), out[n, 2n) = the sum over all ranks. work: COMM_SCAN_WORK(n) int64s
     * (the partial sums of its rounds). in, out and work stay untouched by the caller until the request
     * completes. */
    scmoe_status (*scan_i64_start)(comm *c, const int64_t *in, int64_t *out, int n, int64_t *work, int *req);
} comm_ops;

/* The int64s scan_i64_start needs for n values: the prefix's running partial, the sum's pair of window sums
 * and the pair received (mpi.c) */
#define COMM_SCAN_WORK(n) (5 * (size_t)(n))

/* The bytes allreduce_two_round_start needs for n floats over P ranks: one gather row of ceil(n/P) values
 * per rank (the peers' values of this rank's chunk), after, for bf16, this rank's n rounded values (also
 * where every rank's reduced chunk lands; floats travel from and land in buf itself). */
static inline size_t comm_two_round_work(int n, int P, comm_wire wire) {
    size_t rows = (size_t)P * (size_t)((n + P - 1) / P);
    return wire == COMM_WIRE_BF16 ? sizeof(uint16_t) * ((size_t)n + rows) : sizeof(float) * rows;
}

/* grad_sync_algo AUTO: whether n floats over P ranks go through the two-round sum rather than MPI's
 * all-reduce. The two rounds post 2 (P-1) messages a rank where OpenMPI's binomial tree sends 2 log2 P,
 * but the tree moves the whole n at each of its 2 log2 P steps and the two rounds 2 (P-1)/P n in all.
 * With a per-message cost a and a per-byte cost 1/b, the two rounds win when
 *     2 (P-1) a + 2 (P-1)/P 4n/b  <  2 log2 P (a + 4n/b),
 * i.e. for a chunk of c = 4n/P bytes per rank when c > (a b) (P-1-log2 P) / (P log2 P - P + 1): 0 at 2
 * ranks (the same 2 messages, half the bytes), 0.2 a b at 4 to 16 ranks, a b / (log2 P - 1) beyond. a b
 * is ~25 KB on links from 10 Gbit/s TCP (19 us) to 100 Gbit/s RDMA (2 us), so 4 KiB chunks (1,024
 * floats) is the floor within 1.5x from 4 to 1,024 ranks; below it the tree's log2 P steps are cheaper
 * than P-1 messages of a few bytes (the small buckets: LayerNorms, biases, the gate). At 2 ranks both
 * send the same 2 messages and, float addition being commutative, give the same bits. */
#define COMM_TWO_ROUND_MIN_CHUNK 1024
static inline int comm_two_round_pays(int n, int P) { return (int64_t)n >= (int64_t)COMM_TWO_ROUND_MIN_CHUNK * P; }

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
