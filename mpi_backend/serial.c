/* serial.c: the communication interface for one rank. Every exchange is a copy done at start, so a
 * request is complete as soon as it exists. */
#include "comm.h"
#include <stdlib.h>
#include <string.h>

static scmoe_status serial_split(comm *c, int color, int key, comm **out) {
    (void)c;
    (void)color;
    (void)key;
    return scmoe__comm_serial_create(out);
}

static void serial_destroy(comm *c) { free(c); }

static scmoe_status serial_allreduce_i64_max(comm *c, int64_t *buf, int n) {
    (void)c;
    (void)buf;
    (void)n;
    return SCMOE_OK;
}

static scmoe_status serial_alltoallv_start(comm *c, const void *send, const int *scounts, const int *sdispls,
                                           void *recv, const int *rcounts, const int *rdispls, int elem_bytes,
                                           int *req) {
    (void)c;
    (void)rcounts;
    if (scounts[0] > 0)
        memmove((char *)recv + (size_t)rdispls[0] * elem_bytes, (const char *)send + (size_t)sdispls[0] * elem_bytes,
                (size_t)scounts[0] * elem_bytes);
    *req = -1;
    return SCMOE_OK;
}

static scmoe_status serial_allreduce_start(comm *c, float *buf, int n, int *req) {
    (void)c;
    (void)buf;
    (void)n;
    *req = -1;
    return SCMOE_OK;
}

static scmoe_status serial_allreduce_f64_start(comm *c, double *buf, int n, int *req) {
    (void)c;
    (void)buf;
    (void)n;
    *req = -1;
    return SCMOE_OK;
}

/* one rank's sum is its own value: nothing is rounded, as nothing travels */
static scmoe_status serial_allreduce_two_round_start(comm *c, float *buf, int n, comm_wire wire, void *work, int *req) {
    (void)c;
    (void)buf;
    (void)n;
    (void)wire;
    (void)work;
    *req = -1;
    return SCMOE_OK;
}

/* one rank: no rank below it, and the sum is its own values */
static scmoe_status serial_scan_i64_start(comm *c, const int64_t *in, int64_t *out, int n, int64_t *work, int *req) {
    (void)c;
    (void)work;
    memset(out, 0, sizeof(int64_t) * (size_t)n);
    memmove(out + n, in, sizeof(int64_t) * (size_t)n);
    *req = -1;
    return SCMOE_OK;
}

static scmoe_status serial_test(comm *c, int req, int *done) {
    (void)c;
    (void)req;
    *done = 1;
    return SCMOE_OK;
}
static scmoe_status serial_wait(comm *c, int req) {
    (void)c;
    (void)req;
    return SCMOE_OK;
}
static void serial_progress(comm *c) { (void)c; }

/* every request completes in its *_start: nothing is ever pending, so abandoning is destroying */
static int serial_pending(comm *c) { return 0; }

static const comm_ops serial_ops = {
    serial_split,
    serial_destroy,
    serial_allreduce_i64_max,
    serial_alltoallv_start,
    serial_allreduce_start,
    serial_test,
    serial_wait,
    serial_progress,
    serial_pending,
    serial_destroy,
    serial_allreduce_f64_start,
    serial_allreduce_two_round_start,
    serial_scan_i64_start,
};

scmoe_status scmoe__comm_serial_create(comm **out) {
    comm *c = calloc(1, sizeof *c);
    if (!c) return SCMOE_ERR_NOMEM;
    c->ops = &serial_ops;
    c->rank = 0;
    c->size = 1;
    c->timeout_s = 600;
    c->progress = SCMOE_PROGRESS_NONE;
    *out = c;
    return SCMOE_OK;
}
