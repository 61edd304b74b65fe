/* mpi.c: the communication interface (comm.h) over an MPI communicator.
 *
 * Contract, per call (P = comm size, r = this rank):
 *   allreduce_i64_max  buf[j] = max_i buf_i[j] (MPI_INT64_T, MPI_MAX), in place.
 *   alltoallv_start    rank r's send[sdispls[i] .. + scounts[i]) lands on rank i at
 *                      recv[rdispls[r] .. + rcounts[r]); counts and displacements are in elements of
 *                      elem_bytes, sent as one committed contiguous datatype of elem_bytes bytes so
 *                      that only elem_bytes * count (not count) has to fit an int.
 *   allreduce_start    buf[j] = sum_i buf_i[j] (MPI_FLOAT, MPI_SUM, MPI_IN_PLACE).
 *   allreduce_f64_start  the same over doubles (MPI_DOUBLE).
 *   allreduce_two_round_start  buf[j] = (..(buf_0[j] + buf_1[j]) + ..) + buf_{P-1}[j], in fp32 in rank
 *                      order, the same bits on every rank (comm.h); with the bf16 wire
 *                      bf16(sum_{i=0..P-1} bf16(buf_i[j])). Two rounds of point-to-point messages (tags
 *                      below), not MPI_Iallreduce: MPI's sum order is its algorithm's (a tree pairs the
 *                      ranks differently from a ring), and with a bf16 user op it would round every
 *                      partial sum it forwards (log2 P roundings on a tree, P-1 on a ring), where this
 *                      rounds each contribution once and the sum once. Round 1 (reduce-scatter): chunk
 *                      j of every rank's values goes to rank j; when all have landed, rank r sums its
 *                      chunk and round 2 (allgather) sends the result to every rank, started by
 *                      whichever test, wait or progress sweep sees round 1 done; with the bf16 wire the
 *                      last completion unpacks the bf16s into buf. Empty chunks (n < P) send nothing.
 *   scan_i64_start     out[j] = sum_{i < r} in_i[j] (0 on rank 0) and out[n + j] = sum_i in_i[j], both in
 *                      R = ceil(log2 P) rounds of point-to-point messages, not MPI_Iexscan + MPI_Iallreduce:
 *                      OpenMPI 4.1's libnbc runs MPI_Iexscan as a chain of P-1 messages unless the user
 *                      passes coll_libnbc_iexscan_algorithm 2, its all-reduce tree takes 2 log2 P steps,
 *                      and other MPIs choose as they like. Each round t (d = 2^t) moves two streams.
 *                      Prefix (recursive doubling, Hillis-Steele): rank r keeps p = in_r and sends p to
 *                      r + d if r + d < P, receives q from r - d if r - d >= 0 (into out[0, n)) and adds
 *                      it. By induction p = sum_{i = max(0, r-2d+1)}^{r} in_i after round t (the window
 *                      of d ending at r plus the one of d ending at r - d), so after the last (2d >= P)
 *                      p = sum_{i <= r} in_i and out[j] = p[j] - in_r[j]. Sum (cyclic windows, any P):
 *                      with T_r(w) = sum of in over the w ranks r, r-1, .., r-w+1 mod P, rank r keeps the
 *                      pair (T_r(w), T_r(w+1)), where w = P >> (R - t) is P's top t bits, and round t
 *                      appends P's next bit b: w' = 2w + b, from the pair of rank r - (w + b) mod P:
 *                        b = 0: T_r(2w)   = T_r(w) + T_{r-w}(w),      T_r(2w+1) = T_r(w) + T_{r-w}(w+1)
 *                        b = 1: T_r(2w+1) = T_r(w+1) + T_{r-w-1}(w),  T_r(2w+2) = T_r(w+1) + T_{r-w-1}(w+1)
 *                      (a window split into its newest w or w+1 ranks and the older rest). It starts at
 *                      w = P >> R: 0 with (0, in_r) below a power of two, 1 at one, where only T_r(1) =
 *                      in_r is known and only T_r(w) is ever needed (every later bit is 0); after R
 *                      rounds w = P and T_r(P) is the sum, the same on every rank. Sums are mod 2^64 as
 *                      MPI's int64 sums are, so both are the bits MPI_Iexscan and MPI_Iallreduce give.
 *                      Tags: the k-th scan on a comm uses SCAN_TAG0 + 2 (k mod SCAN_TAG_SPAN) for its
 *                      prefix and the next for its sum, in every round: within one stream a sender's
 *                      messages to one receiver are posted in round order on both sides, which MPI's
 *                      non-overtaking rule keeps matched, and scans in flight together differ in tags.
 * A *_start call returns a slot index 0..COMM_MAX_REQ-1 in *req; the slot is released when test
 * reports done or when wait returns (anything but a timeout). Buffers must stay untouched until then.
 *
 * Errors: the communicator is a private duplicate with MPI_ERRORS_RETURN, so every MPI failure comes
 * back as a return code, turned here into SCMOE_ERR_COMM with MPI_Error_string's text in c->err. The
 * library never aborts and never prints. OpenMPI sends an error inside a nonblocking collective to
 * MPI_COMM_WORLD's handler instead, so while a context lives that handler returns: create replaces one
 * that aborts with MPI_ERRORS_RETURN and destroy puts it back (world_fatal_handler, world_restore,
 * scmoe_mpi.h).
 *
 * Progress: OpenMPI's nonblocking collectives (libnbc) advance only inside MPI calls. With POLL the
 * core calls comm_progress/comm_test between compute tiles. With THREAD (and MPI_THREAD_MULTIPLE) a
 * helper thread tests the active requests every ~200 us; a mutex guards the request table so the
 * helper and the main thread never test the same request at once (MPI forbids concurrent completion
 * calls on one request). The helper sleeps on a condition variable while nothing is in flight.
 */
#include "comm.h"
#include "../scmoe_internal.h"
#include "../scmoe_mpi.h"

#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* distinct element sizes one comm will see: the core uses one (d_model floats); tests a few more */
#define TYPE_CACHE 16
/* spins of MPI_Test in wait before yielding the core: spinning keeps small exchanges' latency at the
 * MPI call cost, yielding keeps an oversubscribed node (more ranks than cores) from starving a peer */
#define WAIT_SPINS_BEFORE_YIELD 1000
#define PROGRESS_SLEEP_NS       200000L
/* the longest int64 max-reduction that runs in the comm's own buffer (the call agreement is 11) */
#define SMALL_I64 16

enum { SLOT_FREE = 0, SLOT_ACTIVE, SLOT_DONE, SLOT_FAILED };
enum { KIND_ALLTOALLV = 0, KIND_ALLREDUCE, KIND_SMALL, KIND_ALLREDUCE_F64, KIND_TWO_ROUND, KIND_SCAN };
/* allreduce_two_round_start's messages: the k-th such all-reduce on a comm, either wire (every rank
 * counts them alike, as every rank starts them in the same order) uses tags
 * TWO_ROUND_TAG0 + 2 (k mod TWO_ROUND_TAG_SPAN) + round, so
 * two in flight never match each other's messages however their rounds interleave (at most COMM_MAX_REQ
 * are in flight, and MPI_TAG_UB is at least 32767). Collectives never match point-to-point messages. */
#define TWO_ROUND_TAG0     1
#define TWO_ROUND_TAG_SPAN 4096
/* scan_i64_start's messages: the k-th scan's prefix has tag SCAN_TAG0 + 2 (k mod SCAN_TAG_SPAN) and its sum
 * the next (all rounds share them, see the top), above the two-round all-reduce's and below 32767 */
#define SCAN_TAG0     (TWO_ROUND_TAG0 + 2 * TWO_ROUND_TAG_SPAN)
#define SCAN_TAG_SPAN 4096

typedef struct slot {
    MPI_Request r;
    int state;   /* SLOT_*; ACTIVE: r pending; DONE/FAILED: completed by the helper, not yet collected */
    int kind, n; /* for messages: KIND_ALLTOALLV with n = elem_bytes, KIND_ALLREDUCE with n floats */
    int rc;      /* the MPI error code of a FAILED slot */
    double t_start;
    /* copies of scounts, sdispls, rcounts, rdispls: MPI requires the arrays of a nonblocking
     * collective to stay valid until it completes. The core keeps its own arrays valid until the
     * wait, but owning copies here makes that the backend's problem, not every caller's. */
    int *args;
    /* KIND_TWO_ROUND: the current round's 2(P-1) sends and receives (in place of r), the round
     * (0 reduce-scatter, 1 allgather), its tags' base, the wire, and the caller's buffers. KIND_SCAN:
     * rs[0..3] the current round's prefix receive and send and sum receive and send, round and tag,
     * work the caller's out, in the caller's in */
    MPI_Request *rs;
    int round, tag;
    comm_wire wire;
    float *buf;
    void *work;
    const int64_t *in;
    /* KIND_SCAN's working memory, the caller's COMM_SCAN_WORK(n) int64s: the prefix's running partial,
     * the sum's pair (T(w), T(w+1)) and the pair received */
    int64_t *part;
} slot;

typedef struct mpi_impl {
    MPI_Comm mc;
    int thread_level;
    pthread_mutex_t mu; /* guards slots[].state/r and n_active, th_stop */
    pthread_cond_t cv;  /* the helper waits here while n_active == 0 */
    slot slots[COMM_MAX_REQ];
    int n_active;    /* slots in SLOT_ACTIVE */
    int *args;       /* COMM_MAX_REQ * 4 * size ints, carved into slots[].args */
    MPI_Request *rs; /* COMM_MAX_REQ * 2 * size requests, carved into slots[].rs */
    int rank, size;
    unsigned two_round_started; /* allreduce_two_round_start calls so far: the next one's tags */
    unsigned scans_started;     /* scan_i64_start calls (size > 1) so far: the next one's tag */
    int n_types;
    int type_bytes[TYPE_CACHE];
    MPI_Datatype types[TYPE_CACHE];
    pthread_t th;
    int th_running, th_stop;
    /* the agreements' in-place buffer: a timed-out agreement stays pending and MPI may write its result
     * later, into memory the comm owns (kept by abandon) rather than into a caller's dead stack frame */
    int64_t i64[SMALL_I64];
    /* the context's own communicator only: MPI_COMM_WORLD's handler was one that aborts (world_prev)
     * and create replaced it with MPI_ERRORS_RETURN; destroy puts it back */
    int world_set;
    MPI_Errhandler world_prev;
} mpi_impl;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static scmoe_status fail(comm *c, scmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static scmoe_status fail(comm *c, scmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return s;
}

static scmoe_status mpi_fail(comm *c, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error code %d", rc);
    return fail(c, SCMOE_ERR_COMM, "%s failed: %s", what, msg);
}

static const char *thread_level_name(int level) {
    switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
    default: return "an unknown thread level";
    }
}

static void describe(const slot *s, char *buf, size_t len) {
    if (s->kind == KIND_ALLTOALLV) snprintf(buf, len, "all-to-all exchange of %d-byte elements", s->n);
    else if (s->kind == KIND_ALLREDUCE) snprintf(buf, len, "all-reduce of %d floats", s->n);
    else if (s->kind == KIND_ALLREDUCE_F64) snprintf(buf, len, "all-reduce of %d doubles (statistics)", s->n);
    else if (s->kind == KIND_SCAN)
        snprintf(buf, len, "exclusive scan and sum of %d int64s (token or routing counts; %d scan rounds done)", s->n,
                 s->round);
    else if (s->kind == KIND_TWO_ROUND)
        snprintf(buf, len, "two-round all-reduce of %d floats%s (%s)", s->n,
                 s->wire == COMM_WIRE_BF16 ? " as bf16" : "", s->round ? "allgather" : "reduce-scatter");
    else snprintf(buf, len, "per-step agreement (counts, routing or status) of %d bytes", s->n);
}

/* ---- the two-round all-reduce's rounds ---- */

/* Chunk j of n floats over P ranks: [off, off + len) with off = floor(n j / P). */
static int chunk_off(int n, int P, int j) { return (int)((int64_t)n * j / P); }

static size_t wire_bytes(comm_wire w) { return w == COMM_WIRE_BF16 ? sizeof(uint16_t) : sizeof(float); }

/* This rank's values as they travel, where every reduced chunk lands: bf16 packs them at the start of
 * work, floats travel from buf itself. The gather rows (one of ceil(n/P) values per rank) follow. */
static char *wire_values(const slot *s) { return s->wire == COMM_WIRE_BF16 ? (char *)s->work : (char *)s->buf; }
static char *wire_gather(const slot *s) {
    return s->wire == COMM_WIRE_BF16 ? (char *)s->work + sizeof(uint16_t) * (size_t)s->n : (char *)s->work;
}

static float wire_get(comm_wire w, const char *p, size_t i) {
    return w == COMM_WIRE_BF16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Posts a round of s's all-reduce: each peer's receive, then each peer's send (round 0: this rank's
 * values of the peer's chunk out, the peers' values of this rank's chunk into one gather row each;
 * round 1: this rank's reduced chunk out, the peers' into their places). Empty chunks travel in neither
 * direction (both ends know the lengths). Requests not posted stay MPI_REQUEST_NULL, which MPI_Testall
 * takes as complete. */
static int two_round_post(mpi_impl *m, slot *s) {
    int P = m->size, r = m->rank, n = s->n, cl = (n + P - 1) / P, k = 0, rc = MPI_SUCCESS, tag = s->tag + s->round;
    size_t eb = wire_bytes(s->wire);
    MPI_Datatype t = s->wire == COMM_WIRE_BF16 ? MPI_UINT16_T : MPI_FLOAT;
    char *vals = wire_values(s), *gather = wire_gather(s);
    int my_off = chunk_off(n, P, r), my_len = chunk_off(n, P, r + 1) - my_off;
    for (int i = 0; i < 2 * (P - 1); i++) s->rs[i] = MPI_REQUEST_NULL;
    for (int j = 0; j < P && rc == MPI_SUCCESS; j++) {
        int off = chunk_off(n, P, j), len = chunk_off(n, P, j + 1) - off, rlen = s->round == 0 ? my_len : len;
        if (j == r || rlen == 0) continue;
        char *to = s->round == 0 ? gather + (size_t)j * cl * eb : vals + (size_t)off * eb;
        rc = MPI_Irecv(to, rlen, t, j, tag, m->mc, &s->rs[k++]);
    }
    for (int j = 0; j < P && rc == MPI_SUCCESS; j++) {
        int off = chunk_off(n, P, j), len = chunk_off(n, P, j + 1) - off, slen = s->round == 0 ? len : my_len;
        if (j == r || slen == 0) continue;
        rc = MPI_Isend(vals + (size_t)(s->round == 0 ? off : my_off) * eb, slen, t, j, tag, m->mc, &s->rs[k++]);
    }
    return rc;
}

/* Round 0 done: this rank's chunk = the fp32 sum of every rank's values, ranks in order (rounded to
 * bf16 once on that wire). Rank r alone computes chunk r and sends the same bits to all, so every rank
 * ends with one result. The sum starts from rank 0's value, not from 0 (0 + -0 would be +0): at 2 ranks
 * it is then MPI's a + b bit for bit. */
static void two_round_reduce(const mpi_impl *m, slot *s) {
    int P = m->size, r = m->rank, n = s->n, cl = (n + P - 1) / P;
    int off = chunk_off(n, P, r), len = chunk_off(n, P, r + 1) - off;
    comm_wire w = s->wire;
    size_t eb = wire_bytes(w);
    char *mine = wire_values(s) + (size_t)off * eb;
    const char *gather = wire_gather(s);
    for (int i = 0; i < len; i++) {
        float sum = 0.0f;
        for (int j = 0; j < P; j++) {
            float v = j == r ? wire_get(w, mine, i) : wire_get(w, gather + (size_t)j * cl * eb, i);
            sum = j == 0 ? v : sum + v;
        }
        if (w == COMM_WIRE_BF16) ((uint16_t *)mine)[i] = bf16_from_float(sum);
        else ((float *)mine)[i] = sum;
    }
}

/* ---- the exclusive scan's rounds (recursive doubling, see the top) ---- */

/* ceil(log2 P): the rounds of a scan over P > 1 ranks. */
static int scan_rounds(int P) {
    int R = 0;
    while (((int64_t)1 << R) < P) R++;
    return R;
}

/* The sum's partner offset in round t of R: w + b, where w = P >> (R - t) (the window the pair holds)
 * and b = bit R-1-t of P (see the top). */
static int scan_sum_offset(int P, int R, int t) { return (P >> (R - t)) + ((P >> (R - 1 - t)) & 1); }

/* Posts round s->round (d = 2^round) of s's scan. The prefix (tag s->tag): the partial from r - d into
 * out[0, n), this rank's partial to r + d, a side with no partner left MPI_REQUEST_NULL. The sum (tag
 * s->tag + 1): the pair from r - o into the receive pair, this rank's pair to r + o, mod P. */
static int scan_post(mpi_impl *m, slot *s) {
    int P = m->size, d = 1 << s->round, r = m->rank, n = s->n, rc = MPI_SUCCESS;
    int o = scan_sum_offset(P, scan_rounds(P), s->round);
    int64_t *pair = s->part + n, *rpair = s->part + 3 * n;
    for (int i = 0; i < 4; i++) s->rs[i] = MPI_REQUEST_NULL;
    if (r - d >= 0) rc = MPI_Irecv(s->work, n, MPI_INT64_T, r - d, s->tag, m->mc, &s->rs[0]);
    if (rc == MPI_SUCCESS && r + d < P) rc = MPI_Isend(s->part, n, MPI_INT64_T, r + d, s->tag, m->mc, &s->rs[1]);
    if (rc == MPI_SUCCESS) rc = MPI_Irecv(rpair, 2 * n, MPI_INT64_T, (r - o + P) % P, s->tag + 1, m->mc, &s->rs[2]);
    if (rc == MPI_SUCCESS) rc = MPI_Isend(pair, 2 * n, MPI_INT64_T, (r + o) % P, s->tag + 1, m->mc, &s->rs[3]);
    return rc;
}

/* Tests s's scan: folds each finished round into the partial and the pair and posts the next (a round
 * no message reaches finishes at once); after the last, out[0, n) = partial - in and out[n, 2n) = the
 * pair's window of P, the sum. *flag 1 then. Unsigned sums: int64 wrap-around, defined. */
static int scan_test(mpi_impl *m, slot *s, int *flag) {
    int P = m->size, n = s->n, R = scan_rounds(P), rc = MPI_SUCCESS, done = 0;
    int64_t *out = s->work, *a = s->part + n, *b = s->part + 2 * n, *ra = s->part + 3 * n, *rb = s->part + 4 * n;
    while (rc == MPI_SUCCESS && s->round < R) {
        rc = MPI_Testall(4, s->rs, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS || !done) break;
        if (m->rank >= (1 << s->round))
            for (int j = 0; j < n; j++) s->part[j] = (int64_t)((uint64_t)s->part[j] + (uint64_t)out[j]);
        int bit = (P >> (R - 1 - s->round)) & 1;
        for (int j = 0; j < n; j++) { /* (T(w), T(w+1)) -> (T(2w+bit), T(2w+bit+1)) */
            uint64_t base = (uint64_t)(bit ? b[j] : a[j]);
            a[j] = (int64_t)(base + (uint64_t)ra[j]);
            b[j] = (int64_t)(base + (uint64_t)rb[j]);
        }
        if (++s->round < R) rc = scan_post(m, s);
        else
            for (int j = 0; j < n; j++) {
                out[j] = (int64_t)((uint64_t)s->part[j] - (uint64_t)s->in[j]);
                out[n + j] = a[j];
            }
    }
    *flag = rc == MPI_SUCCESS && s->round == R;
    return rc;
}

/* One test of an active slot: MPI_Test, for a scan scan_test, or for a two-round all-reduce its round's
 * requests, moving on to round 1 when round 0 is done and unpacking a bf16 result when round 1 is.
 * Returns the MPI code (the slot then failed); *flag 1 when the request is complete. Caller holds m->mu. */
static int slot_test(mpi_impl *m, slot *s, int *flag) {
    *flag = 0;
    if (s->kind == KIND_SCAN) return scan_test(m, s, flag);
    if (s->kind != KIND_TWO_ROUND) return MPI_Test(&s->r, flag, MPI_STATUS_IGNORE);
    int rc = MPI_Testall(2 * (m->size - 1), s->rs, flag, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS || !*flag) return rc;
    if (s->round == 0) {
        two_round_reduce(m, s);
        s->round = 1;
        *flag = 0;
        return two_round_post(m, s);
    }
    if (s->wire == COMM_WIRE_BF16)
        for (int i = 0; i < s->n; i++) s->buf[i] = bf16_to_float(((const uint16_t *)s->work)[i]);
    return MPI_SUCCESS;
}

/* ---- the progress helper ---- */

/* Tests every active request once. Caller holds m->mu. */
static void sweep_locked(mpi_impl *m) {
    for (int i = 0; i < COMM_MAX_REQ && m->n_active > 0; i++) {
        slot *s = &m->slots[i];
        if (s->state != SLOT_ACTIVE) continue;
        int flag = 0;
        int rc = slot_test(m, s, &flag);
        if (rc != MPI_SUCCESS) {
            s->state = SLOT_FAILED;
            s->rc = rc;
            m->n_active--;
        } else if (flag) {
            s->state = SLOT_DONE;
            m->n_active--;
        }
    }
}

static void *progress_main(void *arg) {
    mpi_impl *m = arg;
    const struct timespec nap = {0, PROGRESS_SLEEP_NS};
    pthread_mutex_lock(&m->mu);
    for (;;) {
        while (!m->th_stop && m->n_active == 0) pthread_cond_wait(&m->cv, &m->mu);
        if (m->th_stop) break;
        sweep_locked(m);
        /* sleep unlocked so the main thread's test/wait never waits a whole nap for the mutex */
        pthread_mutex_unlock(&m->mu);
        nanosleep(&nap, NULL);
        pthread_mutex_lock(&m->mu);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

/* Called by every *_start: starts the helper the first time THREAD is asked for, or falls back to POLL
 * (with the reason in c->err, the call itself still succeeding) when MPI cannot host it. Lazy because
 * the core sets c->progress from its config after the comm exists. */
static void ensure_progress(comm *c) {
    mpi_impl *m = c->impl;
    if (c->progress != SCMOE_PROGRESS_THREAD || m->th_running) return;
    if (m->thread_level < MPI_THREAD_MULTIPLE) {
        c->progress = SCMOE_PROGRESS_POLL;
        fail(c, SCMOE_OK, "progress thread needs MPI_THREAD_MULTIPLE but MPI provides %s: using POLL",
             thread_level_name(m->thread_level));
        return;
    }
    m->th_stop = 0;
    int e = pthread_create(&m->th, NULL, progress_main, m);
    if (e) {
        c->progress = SCMOE_PROGRESS_POLL;
        fail(c, SCMOE_OK, "could not start the progress thread (%s): using POLL", strerror(e));
        return;
    }
    m->th_running = 1;
}

/* ---- requests ---- */

/* Finds a free slot for a request about to start; -1 if all are taken. Only the main thread frees or
 * claims slots, so the slot stays free until slot_publish; the lock is for the helper's writes of
 * ACTIVE -> DONE elsewhere in the table. */
static int slot_claim(mpi_impl *m) {
    int found = -1;
    pthread_mutex_lock(&m->mu);
    for (int i = 0; i < COMM_MAX_REQ && found < 0; i++)
        if (m->slots[i].state == SLOT_FREE) found = i;
    pthread_mutex_unlock(&m->mu);
    return found;
}

/* Publishes a started request to the table (and wakes the helper). */
static void slot_publish(mpi_impl *m, int i, MPI_Request r, int kind, int n) {
    slot *s = &m->slots[i];
    pthread_mutex_lock(&m->mu);
    s->r = r;
    s->kind = kind;
    s->n = n;
    s->rc = MPI_SUCCESS;
    s->t_start = now_s();
    s->state = SLOT_ACTIVE;
    m->n_active++;
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
}

static scmoe_status check_req(comm *c, int req) {
    if (req >= COMM_MAX_REQ) return fail(c, SCMOE_ERR_STATE, "request %d is out of range", req);
    mpi_impl *m = c->impl;
    pthread_mutex_lock(&m->mu);
    int free_slot = m->slots[req].state == SLOT_FREE;
    pthread_mutex_unlock(&m->mu);
    if (free_slot) return fail(c, SCMOE_ERR_STATE, "request %d is not in flight (already completed?)", req);
    return SCMOE_OK;
}

/* One completion attempt on slot req. Returns 1 if finished, with *rc its MPI code; the slot is then
 * released unless it failed and keep_failed is set (test leaves a failure for wait to collect, so a
 * caller that polls and ignores errors still gets the error from its final wait). */
static int try_complete(mpi_impl *m, int req, int *rc, int keep_failed) {
    slot *s = &m->slots[req];
    int finished = 0;
    *rc = MPI_SUCCESS;
    pthread_mutex_lock(&m->mu);
    if (s->state == SLOT_ACTIVE) {
        int flag = 0;
        int e = slot_test(m, s, &flag);
        if (e != MPI_SUCCESS) {
            s->state = SLOT_FAILED;
            s->rc = e;
            m->n_active--;
        } else if (flag) {
            s->state = SLOT_DONE;
            m->n_active--;
        }
    }
    if (s->state == SLOT_DONE) {
        s->state = SLOT_FREE;
        finished = 1;
    } else if (s->state == SLOT_FAILED) {
        *rc = s->rc;
        if (!keep_failed) s->state = SLOT_FREE;
        finished = 1;
    }
    pthread_mutex_unlock(&m->mu);
    return finished;
}

static scmoe_status mpi_test(comm *c, int req, int *done) {
    *done = 1;
    if (req < 0) return SCMOE_OK; /* nothing was started (same as serial's -1) */
    scmoe_status s = check_req(c, req);
    if (s) return s;
    int rc;
    *done = try_complete(c->impl, req, &rc, 1);
    if (rc != MPI_SUCCESS) {
        char what[96];
        describe(&((mpi_impl *)c->impl)->slots[req], what, sizeof what);
        return mpi_fail(c, rc, what);
    }
    return SCMOE_OK;
}

static void mpi_progress(comm *c);

/* Waits with a deadline of c->timeout_s. On timeout the request stays pending in its slot: MPI cannot
 * cancel a collective (MPI_Cancel/MPI_Request_free on one is erroneous), so the exchange can only be
 * finished by a later wait once the late ranks join; a caller that cannot wait must abort the job or
 * restart from a checkpoint. */
static scmoe_status mpi_wait(comm *c, int req) {
    if (req < 0) return SCMOE_OK;
    scmoe_status s = check_req(c, req);
    if (s) return s;
    mpi_impl *m = c->impl;
    double t0 = now_s(), deadline = t0 + c->timeout_s;
    for (long spin = 0;; spin++) {
        int rc;
        /* the other requests too: a two-round all-reduce waited on later must start its second round as soon
         * as its first is done, not when its own wait comes (a sync waits on its buckets one by one) */
        mpi_progress(c);
        if (try_complete(m, req, &rc, 0)) {
            if (rc == MPI_SUCCESS) return SCMOE_OK;
            char what[96];
            describe(&m->slots[req], what, sizeof what);
            return mpi_fail(c, rc, what);
        }
        double t = now_s();
        if (t > deadline) {
            char what[96];
            describe(&m->slots[req], what, sizeof what);
            return fail(c, SCMOE_ERR_TIMEOUT,
                        "%s (request %d) did not complete: waited %.3g s (timeout %.3g s), %.3g s since it "
                        "started; it is still pending and MPI cannot cancel it, so abort or restart from a "
                        "checkpoint",
                        what, req, t - t0, c->timeout_s, t - m->slots[req].t_start);
        }
        if (spin >= WAIT_SPINS_BEFORE_YIELD) sched_yield();
    }
}

static void mpi_progress(comm *c) {
    mpi_impl *m = c->impl;
    /* reading n_active unlocked is only a hint: a stale 0 skips one sweep, a stale >0 costs one lock */
    if (__atomic_load_n(&m->n_active, __ATOMIC_RELAXED) == 0) return;
    /* if the helper holds the lock it is sweeping already */
    if (pthread_mutex_trylock(&m->mu) != 0) return;
    sweep_locked(m);
    pthread_mutex_unlock(&m->mu);
}

/* ---- datatypes ---- */

static scmoe_status elem_type(comm *c, int elem_bytes, MPI_Datatype *t) {
    mpi_impl *m = c->impl;
    for (int i = 0; i < m->n_types; i++)
        if (m->type_bytes[i] == elem_bytes) {
            *t = m->types[i];
            return SCMOE_OK;
        }
    if (m->n_types == TYPE_CACHE)
        return fail(c, SCMOE_ERR_COMM, "more than %d distinct element sizes on one communicator", TYPE_CACHE);
    MPI_Datatype nt;
    int rc = MPI_Type_contiguous(elem_bytes, MPI_BYTE, &nt);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Type_contiguous");
    rc = MPI_Type_commit(&nt);
    if (rc != MPI_SUCCESS) {
        MPI_Type_free(&nt);
        return mpi_fail(c, rc, "MPI_Type_commit");
    }
    m->type_bytes[m->n_types] = elem_bytes;
    m->types[m->n_types++] = nt;
    *t = nt;
    return SCMOE_OK;
}

/* ---- blocking collectives ---- */

/* The small per-step collectives (token counts, routing records, gate statistics, status and config
 * agreement) are blocking for the caller but run nonblocking under the same deadline as the
 * exchanges, so a peer that is gone gives SCMOE_ERR_TIMEOUT here too instead of a hang. */
static scmoe_status finish_small(comm *c, int rc, MPI_Request r, int bytes, const char *what) {
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, what);
    mpi_impl *m = c->impl;
    int i = slot_claim(m);
    if (i < 0) { /* no slot to track it: finish it without a deadline rather than leak it */
        rc = MPI_Wait(&r, MPI_STATUS_IGNORE);
        return rc == MPI_SUCCESS ? SCMOE_OK : mpi_fail(c, rc, what);
    }
    slot_publish(m, i, r, KIND_SMALL, bytes);
    return mpi_wait(c, i);
}

static scmoe_status mpi_allreduce_i64_max(comm *c, int64_t *buf, int n) {
    mpi_impl *m = c->impl;
    int own = n <= SMALL_I64;
    int64_t *b = own ? m->i64 : buf;
    if (own) memcpy(b, buf, sizeof(int64_t) * n);
    MPI_Request r = MPI_REQUEST_NULL;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, b, n, MPI_INT64_T, MPI_MAX, m->mc, &r);
    scmoe_status s = finish_small(c, rc, r, n * (int)sizeof(int64_t), "MPI_Iallreduce (int64, max)");
    if (!s && own) memcpy(buf, b, sizeof(int64_t) * n);
    return s;
}

/* ---- nonblocking collectives ---- */

static scmoe_status mpi_alltoallv_start(comm *c, const void *send, const int *scounts, const int *sdispls, void *recv,
                                        const int *rcounts, const int *rdispls, int elem_bytes, int *req) {
    mpi_impl *m = c->impl;
    *req = -1;
    if (elem_bytes < 1) return fail(c, SCMOE_ERR_STATE, "all-to-all with elem_bytes = %d", elem_bytes);
    MPI_Datatype t = MPI_DATATYPE_NULL;
    scmoe_status s = elem_type(c, elem_bytes, &t);
    if (s) return s;
    int i = slot_claim(m);
    if (i < 0) return fail(c, SCMOE_ERR_COMM, "all %d request slots are in flight", COMM_MAX_REQ);
    ensure_progress(c);
    int P = c->size, *a = m->slots[i].args;
    memcpy(a, scounts, sizeof(int) * P);
    memcpy(a + P, sdispls, sizeof(int) * P);
    memcpy(a + 2 * P, rcounts, sizeof(int) * P);
    memcpy(a + 3 * P, rdispls, sizeof(int) * P);
    MPI_Request r;
    int rc = MPI_Ialltoallv(send, a, a + P, t, recv, a + 2 * P, a + 3 * P, t, m->mc, &r);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Ialltoallv");
    slot_publish(m, i, r, KIND_ALLTOALLV, elem_bytes);
    *req = i;
    return SCMOE_OK;
}

static scmoe_status allreduce_sum_start(comm *c, void *buf, int n, MPI_Datatype t, int kind, int *req) {
    mpi_impl *m = c->impl;
    *req = -1;
    int i = slot_claim(m);
    if (i < 0) return fail(c, SCMOE_ERR_COMM, "all %d request slots are in flight", COMM_MAX_REQ);
    ensure_progress(c);
    MPI_Request r;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, n, t, MPI_SUM, m->mc, &r);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Iallreduce");
    slot_publish(m, i, r, kind, n);
    *req = i;
    return SCMOE_OK;
}

static scmoe_status mpi_allreduce_start(comm *c, float *buf, int n, int *req) {
    return allreduce_sum_start(c, buf, n, MPI_FLOAT, KIND_ALLREDUCE, req);
}

static scmoe_status mpi_allreduce_f64_start(comm *c, double *buf, int n, int *req) {
    return allreduce_sum_start(c, buf, n, MPI_DOUBLE, KIND_ALLREDUCE_F64, req);
}

static scmoe_status mpi_allreduce_two_round_start(comm *c, float *buf, int n, comm_wire wire, void *work, int *req) {
    mpi_impl *m = c->impl;
    *req = -1;
    if (c->size == 1) return SCMOE_OK; /* as serial.c: nothing travels, so nothing is rounded */
    int i = slot_claim(m);
    if (i < 0) return fail(c, SCMOE_ERR_COMM, "all %d request slots are in flight", COMM_MAX_REQ);
    ensure_progress(c);
    slot *s = &m->slots[i];
    if (wire == COMM_WIRE_BF16) scmoe__bf16_pack(work, buf, (size_t)n);
    s->kind = KIND_TWO_ROUND;
    s->n = n;
    s->round = 0;
    s->tag = TWO_ROUND_TAG0 + 2 * (int)(m->two_round_started++ % TWO_ROUND_TAG_SPAN);
    s->wire = wire;
    s->buf = buf;
    s->work = work;
    /* posted before the slot is published: the helper cannot test it half-posted. A failure still
     * publishes it, so what was posted counts as pending (abort keeps the buffers) */
    int rc = two_round_post(m, s);
    slot_publish(m, i, MPI_REQUEST_NULL, KIND_TWO_ROUND, n);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Isend/MPI_Irecv (two-round all-reduce)");
    *req = i;
    return SCMOE_OK;
}

static scmoe_status mpi_scan_i64_start(comm *c, const int64_t *in, int64_t *out, int n, int64_t *work, int *req) {
    mpi_impl *m = c->impl;
    *req = -1;
    if (c->size == 1) { /* as serial.c: no rank below, the sum is mine */
        memset(out, 0, sizeof(int64_t) * (size_t)n);
        memmove(out + n, in, sizeof(int64_t) * (size_t)n);
        return SCMOE_OK;
    }
    int i = slot_claim(m);
    if (i < 0) return fail(c, SCMOE_ERR_COMM, "all %d request slots are in flight", COMM_MAX_REQ);
    slot *s = &m->slots[i];
    s->part = work;
    ensure_progress(c);
    /* the partial T(1) = in; the pair (T(w0), T(w0 + 1)) with w0 = P >> R: (0, in) below a power of two,
     * (in, -) at one, where T(2) is never used (every later bit of P is 0) */
    int w0 = c->size >> scan_rounds(c->size);
    memcpy(s->part, in, sizeof(int64_t) * (size_t)n);
    if (w0) memcpy(s->part + n, in, sizeof(int64_t) * (size_t)n);
    else memset(s->part + n, 0, sizeof(int64_t) * (size_t)n);
    memcpy(s->part + 2 * (size_t)n, in, sizeof(int64_t) * (size_t)n);
    s->kind = KIND_SCAN;
    s->n = n;
    s->round = 0;
    s->tag = SCAN_TAG0 + 2 * (int)(m->scans_started++ % SCAN_TAG_SPAN);
    s->work = out;
    s->in = in;
    /* as the two-round all-reduce: posted before the slot is published, and published either way, so a
     * posted scan counts as pending (abort keeps the buffers) */
    int rc = scan_post(m, s);
    slot_publish(m, i, MPI_REQUEST_NULL, KIND_SCAN, n);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Isend/MPI_Irecv (exclusive scan and sum)");
    *req = i;
    return SCMOE_OK;
}

/* ---- lifetime ---- */

static scmoe_status wrap(MPI_Comm mc, int thread_level, comm **out);

static void stop_helper(mpi_impl *m) {
    if (!m->th_running) return;
    pthread_mutex_lock(&m->mu);
    m->th_stop = 1;
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
    pthread_join(m->th, NULL);
    m->th_running = 0;
}

static int mpi_pending(comm *c) {
    mpi_impl *m = c->impl;
    int n = 0;
    pthread_mutex_lock(&m->mu);
    for (int i = 0; i < COMM_MAX_REQ; i++) n += m->slots[i].state == SLOT_ACTIVE;
    pthread_mutex_unlock(&m->mu);
    return n;
}

/* Frees what the comm owns besides its communicator (destroy, and abandon with nothing pending). */
static void impl_free(mpi_impl *m) {
    for (int i = 0; i < m->n_types; i++) MPI_Type_free(&m->types[i]);
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    free(m->args);
    free(m->rs);
    free(m);
}

/* No MPI_Comm_free (collective: the peers may be gone) and, while a request is pending, nothing MPI may
 * still read or write (the argument copies, the agreement buffer, the datatypes): all of it stays
 * allocated until the process exits. */
static void mpi_abandon(comm *c) {
    if (!c) return;
    mpi_impl *m = c->impl;
    if (m) {
        stop_helper(m);
        if (mpi_pending(c) == 0) impl_free(m);
    }
    free(c);
}

/* OpenMPI (4.1 at least) reports an error inside a nonblocking collective, whatever its communicator,
 * to MPI_COMM_WORLD's error handler: with the default MPI_ERRORS_ARE_FATAL a truncated exchange aborts
 * the job before our MPI_Test can return the code. So the promise "errors come back as SCMOE_ERR_COMM"
 * holds only while WORLD's handler returns (scmoe_mpi.h): a handler that aborts is returned in *eh (a
 * predefined handle, nothing to free), any other gives MPI_ERRHANDLER_NULL. */
static MPI_Errhandler world_fatal_handler(void) {
    MPI_Errhandler eh = MPI_ERRHANDLER_NULL;
    if (MPI_Comm_get_errhandler(MPI_COMM_WORLD, &eh) != MPI_SUCCESS) return MPI_ERRHANDLER_NULL;
    int fatal = eh == MPI_ERRORS_ARE_FATAL;
#ifdef MPI_ERRORS_ABORT
    fatal |= eh == MPI_ERRORS_ABORT;
#endif
    if (fatal) return eh;
    if (eh != MPI_ERRHANDLER_NULL) MPI_Errhandler_free(&eh);
    return MPI_ERRHANDLER_NULL;
}

/* Puts back the WORLD handler create replaced, unless the host has installed another one since. */
static void world_restore(mpi_impl *m) {
    if (!m->world_set) return;
    MPI_Errhandler eh = MPI_ERRHANDLER_NULL;
    if (MPI_Comm_get_errhandler(MPI_COMM_WORLD, &eh) == MPI_SUCCESS && eh == MPI_ERRORS_RETURN)
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, m->world_prev);
    if (eh != MPI_ERRHANDLER_NULL && eh != MPI_ERRORS_RETURN) MPI_Errhandler_free(&eh);
    m->world_set = 0;
}

static void mpi_destroy(comm *c) {
    if (!c) return;
    mpi_impl *m = c->impl;
    if (m) {
        stop_helper(m);
        world_restore(m);
        /* Requests still pending (a timed-out exchange never finished) cannot be freed: MPI forbids
         * MPI_Request_free on a collective. They are left to MPI_Finalize. */
        if (m->mc != MPI_COMM_NULL) MPI_Comm_free(&m->mc);
        impl_free(m);
    }
    free(c);
}

static scmoe_status mpi_split(comm *c, int color, int key, comm **out) {
    mpi_impl *m = c->impl;
    *out = NULL;
    MPI_Comm nc;
    int rc = MPI_Comm_split(m->mc, color, key, &nc);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Comm_split");
    if (nc == MPI_COMM_NULL) return fail(c, SCMOE_ERR_COMM, "MPI_Comm_split with color %d gave no communicator", color);
    comm *n;
    scmoe_status s = wrap(nc, m->thread_level, &n);
    if (s) {
        MPI_Comm_free(&nc);
        return fail(c, s, "wrapping the split communicator failed: %s", scmoe_strerror(s));
    }
    n->timeout_s = c->timeout_s;
    n->progress = c->progress;
    *out = n;
    return SCMOE_OK;
}

static const comm_ops mpi_ops = {
    mpi_split,
    mpi_destroy,
    mpi_allreduce_i64_max,
    mpi_alltoallv_start,
    mpi_allreduce_start,
    mpi_test,
    mpi_wait,
    mpi_progress,
    mpi_pending,
    mpi_abandon,
    mpi_allreduce_f64_start,
    mpi_allreduce_two_round_start,
    mpi_scan_i64_start,
};

/* Takes ownership of mc (a communicator this library created) on success only. */
static scmoe_status wrap(MPI_Comm mc, int thread_level, comm **out) {
    *out = NULL;
    int rc = MPI_Comm_set_errhandler(mc, MPI_ERRORS_RETURN);
    int rank = 0, size = 0;
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(mc, &rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(mc, &size);
    if (rc != MPI_SUCCESS) return SCMOE_ERR_COMM;
    comm *c = calloc(1, sizeof *c);
    mpi_impl *m = calloc(1, sizeof *m);
    int *args = malloc(sizeof(int) * 4 * (size_t)size * COMM_MAX_REQ);
    MPI_Request *rs = malloc(sizeof(MPI_Request) * 2 * (size_t)size * COMM_MAX_REQ);
    if (!c || !m || !args || !rs) {
        free(c);
        free(m);
        free(args);
        free(rs);
        return SCMOE_ERR_NOMEM;
    }
    if (pthread_mutex_init(&m->mu, NULL)) {
        free(c);
        free(m);
        free(args);
        free(rs);
        return SCMOE_ERR_NOMEM;
    }
    if (pthread_cond_init(&m->cv, NULL)) {
        pthread_mutex_destroy(&m->mu);
        free(c);
        free(m);
        free(args);
        free(rs);
        return SCMOE_ERR_NOMEM;
    }
    m->mc = mc;
    m->thread_level = thread_level;
    m->args = args;
    m->rs = rs;
    m->rank = rank;
    m->size = size;
    for (int i = 0; i < COMM_MAX_REQ; i++) {
        m->slots[i].r = MPI_REQUEST_NULL;
        m->slots[i].args = args + (size_t)i * 4 * size;
        m->slots[i].rs = rs + (size_t)i * 2 * size;
    }
    c->ops = &mpi_ops;
    c->rank = rank;
    c->size = size;
    c->timeout_s = 600;
    c->progress = SCMOE_PROGRESS_POLL;
    c->impl = m;
    *out = c;
    return SCMOE_OK;
}

scmoe_status scmoe_context_create_mpi(MPI_Comm host_comm, scmoe_context **ctx) {
    if (!ctx) return SCMOE_ERR_NULL;
    *ctx = NULL;
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (!inited || finalized) return SCMOE_ERR_STATE;
    if (host_comm == MPI_COMM_NULL) return SCMOE_ERR_NULL;
    int level = MPI_THREAD_SINGLE;
    if (MPI_Query_thread(&level) != MPI_SUCCESS) level = MPI_THREAD_SINGLE;
    MPI_Comm mc;
    /* the host's error handler applies to this dup; a failure here is reported to the host's handler,
     * which is the host's choice */
    if (MPI_Comm_dup(host_comm, &mc) != MPI_SUCCESS) return SCMOE_ERR_COMM;
    comm *c;
    scmoe_status s = wrap(mc, level, &c);
    if (s) {
        MPI_Comm_free(&mc);
        return s;
    }
    /* while the context lives, an MPI error in its exchanges must return to it, not abort the job */
    MPI_Errhandler prev = world_fatal_handler();
    if (prev != MPI_ERRHANDLER_NULL && MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN) == MPI_SUCCESS) {
        mpi_impl *m = c->impl;
        m->world_set = 1;
        m->world_prev = prev;
    }
    s = scmoe__context_create_with(c, ctx);
    if (s) {
        mpi_destroy(c);
        *ctx = NULL;
    }
    return s;
}
