/* fault_out_of_step.c: ranks that disagree on WHICH collective call they are in (issue 18). Run under
 * mpirun with 2 ranks (tests/faults/run.sh); every case must end with a status on every rank, within
 * seconds, and nobody aborts or hangs (a watchdog prints "not ok - ... hung" and exits).
 *
 *   out-of-step      pair and layer: one forward on both, then rank 0 forward while rank 1 backward
 *                    (comm_timeout_s 5): SCMOE_ERR_STATE on both at once, each message naming what the
 *                    other rank called; the next forward + backward works (sequence numbers resync)
 *   other object     rank 0 calls pair A's forward while rank 1 calls pair B's: SCMOE_ERR_STATE
 *   mode             scmoe_pair_set_training(p, rank == 0) with capacity_factor 0.5, eval 4 (this
 *                    truncated an exchange and aborted the job before): SCMOE_ERR_STATE naming the modes;
 *                    the same for the layer
 *   config           check_finite on rank 0 only: SCMOE_ERR_CONFIG_MISMATCH; capacity_factor 0.0 on one
 *                    rank and -0.0 on the other: the same config (create succeeds)
 *   second backward  a second backward of one forward: SCMOE_ERR_STATE (pair and layer) and the gradients
 *                    are those of one backward
 *   destroy order    scmoe_context_destroy with a live pair: SCMOE_ERR_STATE, nothing freed (under ASan
 *                    this was a use-after-free); after the pair, SCMOE_OK
 *   broken context   rank 1 skips a forward (comm_timeout_s 1): rank 0 gets SCMOE_ERR_TIMEOUT, rank 1's
 *                    next forward times out too; then every collective call on either rank returns
 *                    SCMOE_ERR_STATE in < 50 ms without touching MPI (it named the timeout), parameters
 *                    can still be read, and scmoe_pair_abort + scmoe_context_abort free everything
 *                    without waiting on the peer
 * Prints "ok - ..." / "not ok - ..." and "N passed, N failed". */
#include "../../scmoe.h"
#include "../../scmoe_mpi.h"
#include "../mpi_check.h"
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "watchdog.h"

static int size;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fill(float *x, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((seed >> 40) / 8388608.0 - 1.0);
    }
}

enum { D = 16, T = 8, B = 2, N = B * T };

static scmoe_config pair_cfg(void) {
    scmoe_config c = scmoe_config_default();
    c.d_model = D;
    c.d_hidden = 32;
    c.n_experts = 2 * size;
    c.n_heads = 2;
    c.max_seq_len = T;
    c.max_tokens = N;
    c.arch = SCMOE_ARCH_SCMOE;
    c.shortcut_pos = 2;
    c.capacity_factor = 0.5f;
    c.eval_capacity_factor = 4.0f;
    c.comm_timeout_s = 5;
    return c;
}

static float x[N * D], y[N * D], dy[N * D], dx[N * D];

/* the sum of squares of every gradient the pair holds on this rank */
static double grad_sq(const scmoe_pair *p) {
    double s = 0;
    for (int i = 0; i < scmoe_pair_param_count(p); i++) {
        scmoe_tensor t;
        if (scmoe_pair_param_at(p, i, &t)) continue;
        for (size_t j = 0; j < t.numel; j++) s += (double)t.grad[j] * t.grad[j];
    }
    return s;
}

static double moe_grad_sq(const scmoe_moe *m) {
    double s = 0;
    for (int i = 0; i < scmoe_moe_param_count(m); i++) {
        scmoe_tensor t;
        if (scmoe_moe_param_at(m, i, &t)) continue;
        for (size_t j = 0; j < t.numel; j++) s += (double)t.grad[j] * t.grad[j];
    }
    return s;
}

static int has(const char *s, const char *word) { return strstr(s, word) != NULL; }

static void out_of_step(scmoe_context *ctx) {
    scmoe_config c = pair_cfg();
    scmoe_pair *p = NULL;
    current = "out-of-step: pair";
    check(scmoe_pair_create(ctx, &c, &p) == SCMOE_OK, "out-of-step: create a pair");
    if (!p) return;
    scmoe_status s = scmoe_pair_forward(p, B, T, x, y, NULL);
    check(s == SCMOE_OK, "out-of-step: a forward on both ranks");
    double t0 = now();
    s = rank == 0 ? scmoe_pair_forward(p, B, T, x, y, NULL) : scmoe_pair_backward(p, dy, dx, NULL);
    double dt = now() - t0;
    const char *msg = scmoe_last_error(ctx);
    if (rank == 0) printf("# pair out of step, rank 0 (forward): %s: %s (%.3f s)\n", scmoe_strerror(s), msg, dt);
    check(s == SCMOE_ERR_STATE && dt < 2.0 &&
              has(msg, rank == 0 ? "another rank called backward" : "another rank called forward"),
          "out-of-step: pair forward on rank 0, backward on rank 1: SCMOE_ERR_STATE on both within 2 s, naming the "
          "other's call (rank %d: %s, %.2f s: %s)",
          rank, scmoe_strerror(s), dt, msg);
    s = scmoe_pair_forward(p, B, T, x, y, NULL);
    if (!s) s = scmoe_pair_backward(p, dy, dx, NULL);
    check(s == SCMOE_OK, "out-of-step: the next forward + backward succeed on both ranks (rank %d: %s)", rank,
          scmoe_strerror(s));
    scmoe_pair_destroy(p);

    current = "out-of-step: layer";
    scmoe_config lc = c;
    lc.top_k = 1;
    scmoe_moe *m = NULL;
    check(scmoe_moe_create(ctx, &lc, &m) == SCMOE_OK, "out-of-step: create a layer");
    if (!m) return;
    s = scmoe_moe_forward(m, N, x, y, NULL);
    check(s == SCMOE_OK, "out-of-step: a layer forward on both ranks");
    t0 = now();
    s = rank == 0 ? scmoe_moe_forward(m, N, x, y, NULL) : scmoe_moe_backward(m, dy, dx, NULL);
    dt = now() - t0;
    msg = scmoe_last_error(ctx);
    /* before: rank 1 timed out and its next forward returned 32, "unknown status" (a token count read
     * as a status) */
    check(s == SCMOE_ERR_STATE && dt < 2.0 && has(msg, rank == 0 ? "called backward" : "called forward"),
          "out-of-step: layer forward on rank 0, backward on rank 1: SCMOE_ERR_STATE on both within 2 s "
          "(rank %d: %s, %.2f s: %s)",
          rank, scmoe_strerror(s), dt, msg);
    s = scmoe_moe_forward(m, N, x, y, NULL);
    if (!s) s = scmoe_moe_backward(m, dy, dx, NULL);
    check(s == SCMOE_OK, "out-of-step: the layer's next forward + backward succeed (rank %d: %s: %s)", rank,
          scmoe_strerror(s), scmoe_last_error(ctx));
    scmoe_moe_destroy(m);
}

static void other_object(scmoe_context *ctx) {
    scmoe_config c = pair_cfg();
    scmoe_pair *a = NULL, *b = NULL;
    current = "other object";
    scmoe_status s1 = scmoe_pair_create(ctx, &c, &a), s2 = scmoe_pair_create(ctx, &c, &b);
    check(!s1 && !s2, "other object: create two pairs");
    if (!s1 && !s2) {
        scmoe_status s = scmoe_pair_forward(rank == 0 ? a : b, B, T, x, y, NULL);
        const char *msg = scmoe_last_error(ctx);
        check(s == SCMOE_ERR_STATE && has(msg, "object #"),
              "other object: rank 0 runs pair A's forward, rank 1 pair B's: SCMOE_ERR_STATE (rank %d: %s: %s)", rank,
              scmoe_strerror(s), msg);
    }
    scmoe_pair_destroy(a);
    scmoe_pair_destroy(b);
}

static void mode_mismatch(scmoe_context *ctx) {
    scmoe_config c = pair_cfg();
    scmoe_pair *p = NULL;
    current = "mode";
    check(scmoe_pair_create(ctx, &c, &p) == SCMOE_OK, "mode: create a pair (capacity_factor 0.5, eval 4)");
    if (!p) return;
    scmoe_pair_set_training(p, rank == 0);
    scmoe_status s = scmoe_pair_forward(p, B, T, x, y, NULL);
    const char *msg = scmoe_last_error(ctx);
    if (rank == 0) printf("# mode mismatch, rank 0: %s: %s\n", scmoe_strerror(s), msg);
    check(s == SCMOE_ERR_STATE &&
              has(msg, rank == 0 ? "another rank in inference mode" : "another rank in training mode"),
          "mode: pair training on rank 0, inference on rank 1: SCMOE_ERR_STATE on both, naming the modes, no "
          "truncated exchange (rank %d: %s: %s)",
          rank, scmoe_strerror(s), msg);
    scmoe_pair_set_training(p, 1);
    s = scmoe_pair_forward(p, B, T, x, y, NULL);
    check(s == SCMOE_OK, "mode: the same mode again: forward succeeds (rank %d: %s)", rank, scmoe_strerror(s));
    scmoe_pair_destroy(p);

    scmoe_config lc = c;
    lc.top_k = 1;
    scmoe_moe *m = NULL;
    check(scmoe_moe_create(ctx, &lc, &m) == SCMOE_OK, "mode: create a layer");
    if (!m) return;
    scmoe_moe_set_training(m, rank != 0);
    s = scmoe_moe_forward(m, N, x, y, NULL);
    msg = scmoe_last_error(ctx);
    check(s == SCMOE_ERR_STATE && has(msg, "mode"),
          "mode: layer inference on rank 0, training on rank 1: "
          "SCMOE_ERR_STATE (rank %d: %s: %s)",
          rank, scmoe_strerror(s), msg);
    scmoe_moe_destroy(m);
}

static void config_cases(scmoe_context *ctx) {
    scmoe_config c = pair_cfg();
    c.check_finite = rank == 0;
    scmoe_pair *p = NULL;
    current = "config";
    scmoe_status s = scmoe_pair_create(ctx, &c, &p);
    check(s == SCMOE_ERR_CONFIG_MISMATCH && !p,
          "config: check_finite on rank 0 only: SCMOE_ERR_CONFIG_MISMATCH on "
          "every rank (rank %d: %s)",
          rank, scmoe_strerror(s));
    scmoe_pair_destroy(p);
    c = pair_cfg();
    c.capacity_factor = rank == 0 ? 0.0f : -0.0f;
    c.eval_capacity_factor = rank == 0 ? -0.0f : 0.0f;
    p = NULL;
    s = scmoe_pair_create(ctx, &c, &p);
    check(s == SCMOE_OK,
          "config: capacity factors 0.0 on one rank, -0.0 on the other (both dropless): the same "
          "config (rank %d: %s: %s)",
          rank, scmoe_strerror(s), s ? scmoe_last_error(ctx) : "");
    scmoe_pair_destroy(p);
}

static void second_backward(scmoe_context *ctx) {
    scmoe_config c = pair_cfg();
    scmoe_pair *p = NULL;
    current = "second backward";
    check(scmoe_pair_create(ctx, &c, &p) == SCMOE_OK, "second backward: create a pair");
    if (!p) return;
    scmoe_status s = scmoe_pair_forward(p, B, T, x, y, NULL);
    if (!s) s = scmoe_pair_backward(p, dy, dx, NULL);
    double g1 = grad_sq(p);
    scmoe_status s2 = scmoe_pair_backward(p, dy, dx, NULL);
    double g2 = grad_sq(p);
    if (rank == 0)
        printf("# second pair backward: %s; gradient norm ratio %.6f (was 2.000)\n", scmoe_strerror(s2), sqrt(g2 / g1));
    check(!s && s2 == SCMOE_ERR_STATE && g1 > 0 && g1 == g2,
          "second backward: pair: SCMOE_ERR_STATE, gradients "
          "unchanged (rank %d: %s, norm ratio %.6f)",
          rank, scmoe_strerror(s2), sqrt(g2 / g1));
    scmoe_pair_destroy(p);

    scmoe_config lc = c;
    lc.top_k = 1;
    scmoe_moe *m = NULL;
    check(scmoe_moe_create(ctx, &lc, &m) == SCMOE_OK, "second backward: create a layer");
    if (!m) return;
    s = scmoe_moe_forward(m, N, x, y, NULL);
    if (!s) s = scmoe_moe_backward(m, dy, dx, NULL);
    g1 = moe_grad_sq(m);
    s2 = scmoe_moe_backward(m, dy, dx, NULL);
    g2 = moe_grad_sq(m);
    check(!s && s2 == SCMOE_ERR_STATE && g1 > 0 && g1 == g2,
          "second backward: layer: SCMOE_ERR_STATE, gradients "
          "unchanged (rank %d: %s)",
          rank, scmoe_strerror(s2));
    scmoe_moe_destroy(m);
}

static void destroy_order(void) {
    scmoe_context *ctx = NULL;
    current = "destroy order";
    check(scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx) == SCMOE_OK, "destroy order: a second context");
    if (!ctx) return;
    scmoe_config c = pair_cfg();
    scmoe_pair *p = NULL;
    scmoe_status s = scmoe_pair_create(ctx, &c, &p);
    scmoe_status d = scmoe_context_destroy(ctx);
    check(!s && d == SCMOE_ERR_STATE && has(scmoe_last_error(ctx), "still alive"),
          "destroy order: scmoe_context_destroy with a live pair: SCMOE_ERR_STATE, the context untouched (%s)",
          scmoe_strerror(d));
    s = scmoe_pair_forward(p, B, T, x, y, NULL);
    check(s == SCMOE_OK, "destroy order: the pair still runs after the refused destroy");
    scmoe_pair_destroy(p);
    check(scmoe_context_destroy(ctx) == SCMOE_OK, "destroy order: after the pair, the context is destroyed");
}

/* rank 1 skips a forward: rank 0 times out; rank 1's next forward meets rank 0's pending agreement and then
 * times out in the exchange rank 0 never enters. Both contexts are then broken. */
static void broken_context(void) {
    scmoe_context *ctx = NULL;
    current = "broken context";
    check(scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx) == SCMOE_OK, "broken: a third context");
    if (!ctx) return;
    scmoe_config c = pair_cfg();
    c.comm_timeout_s = 1;
    scmoe_pair *p = NULL;
    scmoe_status s = scmoe_pair_create(ctx, &c, &p);
    check(s == SCMOE_OK, "broken: create (comm_timeout_s 1)");
    if (s) return;
    s = scmoe_pair_forward(p, B, T, x, y, NULL);
    if (rank == 0) s = scmoe_pair_forward(p, B, T, x, y, NULL);
    else sleep(4); /* 4 timeouts: rank 0 has given up before rank 1 arrives, however loaded the machine */
    if (rank == 1) s = scmoe_pair_forward(p, B, T, x, y, NULL);
    check(s == SCMOE_ERR_TIMEOUT, "broken: rank 1 skips a forward: SCMOE_ERR_TIMEOUT on both ranks (rank %d: %s: %s)",
          rank, scmoe_strerror(s), scmoe_last_error(ctx));
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = now();
    scmoe_status sf = scmoe_pair_forward(p, B, T, x, y, NULL);
    scmoe_status sb = scmoe_pair_backward(p, dy, dx, NULL);
    scmoe_status sg = scmoe_pair_grad_sync(p, NULL);
    scmoe_moe *m = NULL;
    scmoe_status sc = scmoe_moe_create(ctx, &c, &m);
    double dt = now() - t0;
    const char *msg = scmoe_last_error(ctx);
    if (rank == 0) printf("# broken context: 4 calls in %.6f s: %s\n", dt, msg);
    check(sf == SCMOE_ERR_STATE && sb == SCMOE_ERR_STATE && sg == SCMOE_ERR_STATE && sc == SCMOE_ERR_STATE && !m &&
              dt < 0.05 && has(msg, "timed out"),
          "broken: forward, backward, grad_sync and create after the timeout: SCMOE_ERR_STATE at once (rank %d: "
          "%.4f s; %s %s %s %s), naming the timeout",
          rank, dt, scmoe_strerror(sf), scmoe_strerror(sb), scmoe_strerror(sg), scmoe_strerror(sc));
    scmoe_tensor t;
    check(scmoe_pair_param(p, "l0.attn.wqkv", &t) == SCMOE_OK && t.data,
          "broken: parameters can still be read (to save)");
    t0 = now();
    scmoe_pair_abort(p);
    scmoe_status sa = scmoe_context_abort(ctx);
    dt = now() - t0;
    check(sa == SCMOE_OK && dt < 1.0,
          "broken: scmoe_pair_abort + scmoe_context_abort return without the peer "
          "(%.3f s)",
          dt);
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    signal(SIGALRM, on_alarm);
    alarm(WATCHDOG_S);
    if (size != 2) {
        if (rank == 0) printf("not ok - fault_out_of_step needs 2 ranks\n0 passed, 1 failed\n");
        MPI_Finalize();
        return 1;
    }
    fill(x, N * D, 11 + rank);
    fill(dy, N * D, 23 + rank);
    scmoe_context *ctx;
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx)) {
        printf("not ok - context\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    out_of_step(ctx);
    other_object(ctx);
    mode_mismatch(ctx);
    config_cases(ctx);
    second_backward(ctx);
    check(scmoe_context_destroy(ctx) == SCMOE_OK, "the first context is destroyed after its objects");
    destroy_order();
    broken_context();
    alarm(0);
    if (rank == 0) printf("%d passed, %d failed\n", check_passed, check_failed);
    fflush(stdout);
    /* the broken context's exchange is still pending on rank 1: MPI_Finalize does not wait for it */
    MPI_Finalize();
    return check_failed ? 1 : 0;
}
