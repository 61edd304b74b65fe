/* fault_rank_error.c: one rank passes bad input to a COLLECTIVE library call; every rank must get an
 * error back (nobody hangs in an exchange the bad rank never enters), and the next good step must work
 * on every rank. Run under mpirun with 2..4 ranks (tests/faults/run.sh runs 2 and 3).
 *
 * For every bad rank r = 0..P-1, progress policy POLL and THREAD, and overlap_grad_sync 0 and 1:
 *   pair forward   batch*seq_len > max_tokens | seq_len > max_seq_len | batch < 0 | x NULL | y NULL |
 *                  NaN in x (check_finite)
 *   pair backward  NaN in dy (check_finite) | dy NULL | dx NULL
 *   moe forward    n_tokens > max_tokens | n_tokens < 0 | x NULL | Inf in x (check_finite)
 *   moe backward   NaN in dy (check_finite) | dx NULL
 *   create         a config differing on the bad rank | an invalid config on the bad rank only
 *   a stalled rank the last rank enters a forward 4 s late with comm_timeout_s = 1 (see late_rank)
 * Each case checks: the bad rank gets the status of its own error, every other rank an error status too
 * (with a message), no rank takes longer than WATCHDOG_S (a hang prints "not ok - ... hung" and aborts
 * the job), and then one good forward + backward succeeds on every rank with outputs bitwise equal to
 * a twin object that never saw the bad call (so a failed call leaves no state behind).
 * Known library bug (reported): after a failed forward, backward runs on the previous step instead of
 * returning SCMOE_ERR_STATE ("stale-backward"): with stale-backward in SCMOE_KNOWN_BUGS that check is a
 * TAP TODO (printed, not counted), otherwise a failure.
 * Prints "ok - ..." / "not ok - ..." and "N passed, N failed". */
#include "../../scmoe.h"
#include "../../scmoe_mpi.h"
#include "../mpi_check.h"
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "watchdog.h"

static int size, todo;

/* a check that fails on a known, reported library bug: a TAP TODO (printed once, not counted) when the
 * bug is listed in SCMOE_KNOWN_BUGS, an ordinary failure otherwise */
static int known(const char *bug) {
    const char *l = getenv("SCMOE_KNOWN_BUGS");
    size_t n = strlen(bug);
    for (const char *p = l; p && (p = strstr(p, bug)) != NULL; p += n)
        if ((p == l || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
    return 0;
}
static void check_todo(const char *bug, int ok, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void check_todo(const char *bug, int ok, const char *fmt, ...) {
    int all;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (all) {
        check_passed++;
        return;
    }
    if (!known(bug)) {
        check_failed++;
        if (rank == 0) {
            va_list ap;
            va_start(ap, fmt);
            printf("not ok - [%d ranks] ", size);
            vprintf(fmt, ap);
            printf(" (library bug %s)\n", bug);
            va_end(ap);
            fflush(stdout);
        }
        return;
    }
    todo++;
    static const char *shown[8];
    int first = 1;
    for (int i = 0; i < 8 && first; i++) {
        if (!shown[i]) {
            shown[i] = bug;
            break;
        }
        if (strcmp(shown[i], bug) == 0) first = 0;
    }
    if (rank == 0 && first) {
        va_list ap;
        va_start(ap, fmt);
        printf("not ok - [%d ranks] ", size);
        vprintf(fmt, ap);
        printf(" # TODO known library bug %s, not counted (further hits counted silently)\n", bug);
        va_end(ap);
        fflush(stdout);
    }
}

static void fill(float *x, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((seed >> 40) / 8388608.0 - 1.0);
    }
}

enum { D = 16, T = 8, B = 2, N = B * T };

static scmoe_config pair_cfg(int progress, int ogs) {
    scmoe_config c = scmoe_config_default();
    c.d_model = D;
    c.d_hidden = 32;
    c.n_experts = 2 * size;
    c.n_heads = 2;
    c.max_seq_len = T;
    c.max_tokens = N;
    c.arch = SCMOE_ARCH_SCMOE;
    c.shortcut_pos = 2;
    c.capacity_factor = 1.0f;
    c.check_finite = 1;
    c.progress = (scmoe_progress)progress;
    c.overlap_grad_sync = ogs;
    c.comm_timeout_s = 30;
    return c;
}

typedef enum {
    PF_TOO_MANY,
    PF_SEQ,
    PF_NEG,
    PF_XNULL,
    PF_YNULL,
    PF_NAN,
    PB_NAN,
    PB_DYNULL,
    PB_DXNULL,
    PAIR_CASES
} pair_case;
static const char *const PAIR_NAMES[] = {"pair forward batch*seq_len > max_tokens",
                                         "pair forward seq_len > max_seq_len",
                                         "pair forward batch < 0",
                                         "pair forward x NULL",
                                         "pair forward y NULL",
                                         "pair forward NaN in x",
                                         "pair backward NaN in dy",
                                         "pair backward dy NULL",
                                         "pair backward dx NULL"};
static const scmoe_status PAIR_WANT[] = {SCMOE_ERR_SEQ_LEN,   SCMOE_ERR_SEQ_LEN, SCMOE_ERR_SEQ_LEN,
                                         SCMOE_ERR_NULL,      SCMOE_ERR_NULL,    SCMOE_ERR_NONFINITE,
                                         SCMOE_ERR_NONFINITE, SCMOE_ERR_NULL,    SCMOE_ERR_NULL};

static scmoe_status good_step(scmoe_pair *p, const float *x, float *y, const float *dy, float *dx) {
    scmoe_status s = scmoe_pair_forward(p, B, T, x, y, NULL);
    if (!s) s = scmoe_pair_backward(p, dy, dx, NULL);
    if (!s) s = scmoe_pair_grad_sync(p, NULL);
    return s;
}

static void pair_cases(scmoe_context *ctx, int progress, int ogs) {
    scmoe_config c = pair_cfg(progress, ogs);
    float x[N * D], y[N * D], dy[N * D], dx[N * D], bad[N * D], y2[N * D], dx2[N * D];
    fill(x, N * D, 11 + rank);
    fill(dy, N * D, 23 + rank);
    for (int pc = 0; pc < PAIR_CASES; pc++)
        for (int br = 0; br < size; br++) {
            char what[160];
            snprintf(what, sizeof what, "%s on rank %d (progress %s, overlap_grad_sync %d)", PAIR_NAMES[pc], br,
                     progress ? "thread" : "poll", ogs);
            current = what;
            scmoe_pair *p = NULL, *twin = NULL;
            scmoe_status s1 = scmoe_pair_create(ctx, &c, &p), s2 = scmoe_pair_create(ctx, &c, &twin);
            check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: create", what);
            if (s1 || s2) {
                scmoe_pair_destroy(p);
                scmoe_pair_destroy(twin);
                continue;
            }
            int me = rank == br;
            memcpy(bad, pc == PB_NAN ? dy : x, sizeof bad);
            bad[5] = NAN;
            alarm(WATCHDOG_S);
            /* one good step first on both, so a failed call has a previous step it could wrongly reuse */
            s1 = good_step(p, x, y, dy, dx);
            s2 = good_step(twin, x, y2, dy, dx2);
            check(s1 == SCMOE_OK && s2 == SCMOE_OK, "%s: a good step before", what);
            scmoe_status s = SCMOE_OK, sb = SCMOE_OK;
            if (pc <= PF_NAN) {
                int b = B, t = T;
                const float *xi = x;
                float *yo = y;
                if (me) switch (pc) {
                    case PF_TOO_MANY: b = B + 1; break;
                    case PF_SEQ: t = T + 1; break;
                    case PF_NEG: b = -1; break;
                    case PF_XNULL: xi = NULL; break;
                    case PF_YNULL: yo = NULL; break;
                    default: xi = bad; break;
                    }
                s = scmoe_pair_forward(p, b, t, xi, yo, NULL);
                /* nothing to differentiate after a failed forward */
                sb = scmoe_pair_backward(p, dy, dx, NULL);
                if (sb == SCMOE_OK) scmoe_pair_grad_sync(p, NULL);
            } else {
                s = scmoe_pair_forward(p, B, T, x, y, NULL);
                check(s == SCMOE_OK, "%s: the forward before it", what);
                const float *d = dy;
                float *o = dx;
                if (me) {
                    if (pc == PB_NAN) d = bad;
                    else if (pc == PB_DYNULL) d = NULL;
                    else o = NULL;
                }
                s = scmoe_pair_backward(p, d, o, NULL);
                if (!s) s = scmoe_pair_grad_sync(p, NULL);
                sb = SCMOE_ERR_STATE; /* (not tested here) */
            }
            const char *msg = scmoe_last_error(ctx);
            check(me ? s == PAIR_WANT[pc] : s != SCMOE_OK, "%s: every rank gets an error (this rank: %s: %s)", what,
                  scmoe_strerror(s), msg);
            check(s == SCMOE_OK || msg[0] != 0, "%s: with a message", what);
            if (pc <= PF_NAN)
                check_todo("stale-backward", sb == SCMOE_ERR_STATE,
                           "%s: backward after the failed forward -> %s (want %s)", what, scmoe_strerror(sb),
                           scmoe_strerror(SCMOE_ERR_STATE));
            /* the next good step works everywhere and equals the twin's (gradients zeroed on both: a
             * backward wrongly run after a failed forward, the known bug, accumulated into p's) */
            scmoe_pair_zero_grad(p);
            scmoe_pair_zero_grad(twin);
            s = good_step(p, x, y, dy, dx);
            check(s == SCMOE_OK, "%s: the next good step works (%s: %s)", what, scmoe_strerror(s),
                  scmoe_last_error(ctx));
            s = good_step(twin, x, y2, dy, dx2);
            check(s == SCMOE_OK && !memcmp(y, y2, sizeof y) && !memcmp(dx, dx2, sizeof dx),
                  "%s: ... and gives the same outputs and dX as a twin that never saw the bad call", what);
            int same = 1;
            for (int i = 0; i < scmoe_pair_param_count(p); i++) {
                scmoe_tensor a, b2;
                scmoe_pair_param_at(p, i, &a);
                scmoe_pair_param_at(twin, i, &b2);
                same &= !memcmp(a.grad, b2.grad, sizeof(float) * a.numel);
            }
            check(same, "%s: ... and the same gradients", what);
            alarm(0);
            scmoe_pair_destroy(p);
            scmoe_pair_destroy(twin);
        }
}

static void moe_cases(scmoe_context *ctx) {
    scmoe_config c = scmoe_config_default();
    c.d_model = D;
    c.d_hidden = 32;
    c.n_experts = 2 * size;
    c.top_k = 2;
    c.max_tokens = N;
    c.check_finite = 1;
    c.comm_timeout_s = 30;
    const char *names[] = {"moe forward n_tokens > max_tokens",
                           "moe forward n_tokens < 0",
                           "moe forward x NULL",
                           "moe forward Inf in x",
                           "moe backward NaN in dy",
                           "moe backward dx NULL"};
    const scmoe_status want[] = {SCMOE_ERR_N_TOKENS,  SCMOE_ERR_N_TOKENS,  SCMOE_ERR_NULL,
                                 SCMOE_ERR_NONFINITE, SCMOE_ERR_NONFINITE, SCMOE_ERR_NULL};
    float x[N * D], y[N * D], dy[N * D], dx[N * D], bad[N * D];
    fill(x, N * D, 5 + rank);
    fill(dy, N * D, 7 + rank);
    for (int mc = 0; mc < 6; mc++)
        for (int br = 0; br < size; br++) {
            char what[160];
            snprintf(what, sizeof what, "%s on rank %d", names[mc], br);
            current = what;
            scmoe_moe *m = NULL;
            scmoe_status s = scmoe_moe_create(ctx, &c, &m);
            check(s == SCMOE_OK, "%s: create", what);
            if (s) continue;
            int me = rank == br;
            memcpy(bad, mc == 4 ? dy : x, sizeof bad);
            bad[3] = mc == 4 ? NAN : INFINITY;
            alarm(WATCHDOG_S);
            if (mc < 4) {
                int n = N;
                const float *xi = x;
                if (me) {
                    if (mc == 0) n = N + 1;
                    else if (mc == 1) n = -1;
                    else if (mc == 2) xi = NULL;
                    else xi = bad;
                }
                s = scmoe_moe_forward(m, n, xi, y, NULL);
            } else {
                s = scmoe_moe_forward(m, N, x, y, NULL);
                check(s == SCMOE_OK, "%s: the forward before it", what);
                s = scmoe_moe_backward(m, me && mc == 4 ? bad : dy, me && mc == 5 ? NULL : dx, NULL);
            }
            check(me ? s == want[mc] : s != SCMOE_OK, "%s: every rank gets an error (this rank: %s: %s)", what,
                  scmoe_strerror(s), scmoe_last_error(ctx));
            s = scmoe_moe_forward(m, N, x, y, NULL);
            if (!s) s = scmoe_moe_backward(m, dy, dx, NULL);
            check(s == SCMOE_OK, "%s: the next good step works (%s)", what, scmoe_strerror(s));
            alarm(0);
            scmoe_moe_destroy(m);
        }
}

static void create_cases(scmoe_context *ctx) {
    for (int br = 0; br < size; br++)
        for (int kind = 0; kind < 4; kind++) {
            char what[160];
            static const char *const kinds[] = {"d_hidden differs", "top_k invalid", "comm_timeout_s differs",
                                                "max_tokens differs"};
            snprintf(what, sizeof what, "pair create, %s on rank %d only", kinds[kind], br);
            current = what;
            scmoe_config c = pair_cfg(0, 0);
            if (rank == br) {
                if (kind == 0) c.d_hidden = 48;
                else if (kind == 1) c.top_k = 0;
                else if (kind == 2) c.comm_timeout_s = 5;
                else c.max_tokens = N * 2;
            }
            alarm(WATCHDOG_S);
            scmoe_pair *p = (scmoe_pair *)&what; /* must come back NULL on failure */
            scmoe_status s = scmoe_pair_create(ctx, &c, &p);
            alarm(0);
            if (kind == 2) {
                /* comm_timeout_s is not part of the config agreement (a local choice): created everywhere */
                check(s == SCMOE_OK, "%s: created on every rank (%s)", what, scmoe_strerror(s));
            } else {
                check(size == 1 ? 1 : s != SCMOE_OK && p == NULL, "%s: an error on every rank, no object (%s)", what,
                      scmoe_strerror(s));
            }
            if (s == SCMOE_OK) scmoe_pair_destroy(p);
        }
}

/* A stalled rank: the last rank enters a pair forward LATE_S seconds after the others, with
 * comm_timeout_s = 1. Wanted: the waiting ranks give up with SCMOE_ERR_TIMEOUT after about 1 s. (Known
 * bug blocking-collective-timeout: the forward's first exchange is a blocking MPI_Allreduce
 * (scmoe__status_agree) without a deadline, so they wait for the late rank however long it takes.) Run last:
 * after a real timeout the library's communicator holds an exchange MPI cannot cancel, so the program
 * then skips MPI_Finalize. Returns 1 if some rank timed out. */
#define LATE_S 4
static int late_rank(scmoe_context *ctx) {
    if (size < 2) return 0;
    scmoe_config c = pair_cfg(0, 0);
    c.comm_timeout_s = 1.0;
    scmoe_pair *p = NULL;
    current = "late rank: create";
    alarm(WATCHDOG_S);
    scmoe_status s = scmoe_pair_create(ctx, &c, &p);
    check(s == SCMOE_OK, "late rank: create");
    if (s) return 0;
    float x[N * D], y[N * D];
    fill(x, N * D, 3 + rank);
    int late = rank == size - 1;
    current = "late rank: forward";
    if (late) sleep(LATE_S);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    s = scmoe_pair_forward(p, B, T, x, y, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double dt = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    alarm(0);
    int timed_out = s == SCMOE_ERR_TIMEOUT, any;
    MPI_Allreduce(&timed_out, &any, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
    if (rank == 0)
        printf("# late rank: rank 0's forward returned %s after %.2f s (comm_timeout_s 1, peer %d s late)\n",
               scmoe_strerror(s), dt, LATE_S);
    check_todo("blocking-collective-timeout", late || (s == SCMOE_ERR_TIMEOUT && dt < 2.5),
               "a rank %d s late, comm_timeout_s 1: the waiting ranks return SCMOE_ERR_TIMEOUT within 2.5 s "
               "(rank %d: %s after %.2f s)",
               LATE_S, rank, scmoe_strerror(s), dt);
    if (!any) scmoe_pair_destroy(p);
    return any;
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    signal(SIGALRM, on_alarm);
    check_quiet = !getenv("FAULT_VERBOSE"); /* the passes number in the hundreds */
    scmoe_context *ctx;
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx)) {
        printf("not ok - context\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (int progress = 0; progress <= 1; progress++)
        for (int ogs = 0; ogs <= 1; ogs++) pair_cases(ctx, progress, ogs);
    moe_cases(ctx);
    create_cases(ctx);
    int timed_out = late_rank(ctx);
    if (!timed_out) scmoe_context_destroy(ctx);
    if (rank == 0) {
        printf("ok - [%d ranks] %d checks over %d bad-input cases x %d bad ranks, nobody hung\n", size,
               check_passed + check_failed, 4 * PAIR_CASES + 6 + 4, size);
        if (todo) printf("# %d check(s) hit a known library bug (TODO, not counted)\n", todo);
        printf("%d passed, %d failed\n", check_passed, check_failed);
    }
    fflush(stdout);
    /* a pending exchange: MPI_Finalize could wait forever, so every rank leaves with _exit, which mpirun
     * answers by killing the others: none leaves before rank 0 has printed its summary (the world
     * communicator still works; the pending exchange is on the library's duplicate) */
    if (timed_out) {
        MPI_Barrier(MPI_COMM_WORLD);
        _exit(check_failed ? 1 : 0);
    }
    MPI_Finalize();
    return check_failed ? 1 : 0;
}
