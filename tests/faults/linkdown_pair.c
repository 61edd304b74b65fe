/* linkdown_pair.c: the host program of tests/faults/linkdown.sh. A block-pair training loop over MPI
 * with a short comm_timeout_s, run on two emulated hosts whose link the test takes down mid-run.
 *
 *   linkdown_pair REPORT_PREFIX [TIMEOUT_S=3] [PROGRESS=poll|thread] [MAX_STEPS=100000] [CHUNKS=0]
 * (CHUNKS: pipeline_chunks, so the link can also go down between a pipeline's chained dispatches)
 *
 * Each rank writes REPORT_PREFIX.<rank> (its stdout may not reach mpirun once the link is down):
 *   "pid P"                  at start
 *   "step N ok"              after every completed step (forward + backward + gradient sync)
 *   "ERROR step N CALL: STATUS_NAME (code C): MESSAGE"   when a library call fails; the rank then
 *                            exits at once with _exit(4): MPI_Finalize would wait forever on the
 *                            exchange the library could not cancel, so a host that must stop has to
 *                            leave without it (or MPI_Abort)
 *   "HUNG step N CALL for S s"  when a single library call has not returned after
 *                            HANG_FACTOR * TIMEOUT_S + 10 s (a watchdog thread); exits with _exit(5)
 * A clean exit (exit code 0) happens only if MAX_STEPS complete. */
#include "../../scmoe.h"
#include "../../scmoe_mpi.h"
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HANG_FACTOR 4

static FILE *rep;
static int rank;
static double timeout_s = 3.0;
/* shared with the watchdog thread: atomics, so the reads are defined (ThreadSanitizer flagged volatile) */
static _Atomic double call_start; /* 0: not inside a library call */
static const char *_Atomic call_name = "";
static _Atomic long step_no;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(rep, fmt, ap);
    va_end(ap);
    fputc('\n', rep);
    fflush(rep);
}

static void *watchdog(void *arg) {
    (void)arg;
    double limit = HANG_FACTOR * timeout_s + 10.0;
    for (;;) {
        nanosleep(&(struct timespec){0, 100000000L}, NULL);
        double t0 = call_start;
        if (t0 > 0 && now() - t0 > limit) {
            say("HUNG step %ld %s for %.1f s (comm_timeout_s %.1f): the call never returned", (long)step_no,
                (const char *)call_name, now() - t0, timeout_s);
            _exit(5);
        }
    }
    return NULL;
}

static const char *status_name(scmoe_status s) {
    static const char *const n[] = {"SCMOE_OK",
                                    "SCMOE_ERR_NULL",
                                    "SCMOE_ERR_NOMEM",
                                    "SCMOE_ERR_D_MODEL",
                                    "SCMOE_ERR_D_HIDDEN",
                                    "SCMOE_ERR_N_EXPERTS",
                                    "SCMOE_ERR_TOP_K",
                                    "SCMOE_ERR_CAPACITY",
                                    "SCMOE_ERR_LOSS_WEIGHT",
                                    "SCMOE_ERR_NOISE",
                                    "SCMOE_ERR_ACTIVATION",
                                    "SCMOE_ERR_PRIORITY",
                                    "SCMOE_ERR_MAX_TOKENS",
                                    "SCMOE_ERR_N_TOKENS",
                                    "SCMOE_ERR_NONFINITE",
                                    "SCMOE_ERR_ARCH",
                                    "SCMOE_ERR_SHORTCUT_POS",
                                    "SCMOE_ERR_COMBINE",
                                    "SCMOE_ERR_N_HEADS",
                                    "SCMOE_ERR_SEQ_LEN",
                                    "SCMOE_ERR_N_LAYERS",
                                    "SCMOE_ERR_EP_SIZE",
                                    "SCMOE_ERR_PROGRESS",
                                    "SCMOE_ERR_OPTION",
                                    "SCMOE_ERR_STATE",
                                    "SCMOE_ERR_NOT_FOUND",
                                    "SCMOE_ERR_CONFIG_MISMATCH",
                                    "SCMOE_ERR_COMM",
                                    "SCMOE_ERR_TIMEOUT",
                                    "SCMOE_ERR_IO",
                                    "SCMOE_ERR_UNSUPPORTED",
                                    "SCMOE_ERR_DEVICE"};
    return (unsigned)s < sizeof n / sizeof *n ? n[s] : "unknown";
}

static scmoe_context *ctx;
#define CALL(expr)                                                                                                     \
    do {                                                                                                               \
        call_name = #expr;                                                                                             \
        call_start = now();                                                                                            \
        scmoe_status s_ = (expr);                                                                                      \
        call_start = 0;                                                                                                \
        if (s_ != SCMOE_OK) {                                                                                          \
            say("ERROR step %ld %s: %s (code %d): %s", (long)step_no, #expr, status_name(s_), (int)s_,                 \
                scmoe_last_error(ctx));                                                                                \
            _exit(4);                                                                                                  \
        }                                                                                                              \
    } while (0)

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (argc < 2) {
        fprintf(stderr, "usage: linkdown_pair REPORT_PREFIX [TIMEOUT_S] [poll|thread] [MAX_STEPS]\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    if (argc > 2) timeout_s = atof(argv[2]);
    int thread = argc > 3 && strcmp(argv[3], "thread") == 0;
    long max_steps = argc > 4 ? atol(argv[4]) : 100000;
    int chunks = argc > 5 ? atoi(argv[5]) : 0;
    char path[4096];
    snprintf(path, sizeof path, "%s.%d", argv[1], rank);
    rep = fopen(path, "w");
    if (!rep) MPI_Abort(MPI_COMM_WORLD, 2);
    say("pid %d", (int)getpid());
    pthread_t th;
    pthread_create(&th, NULL, watchdog, NULL);

    CALL(scmoe_context_create_mpi(MPI_COMM_WORLD, &ctx));
    scmoe_config c = scmoe_config_default();
    c.d_model = 64;
    c.d_hidden = 128;
    c.n_experts = 4;
    c.n_heads = 4;
    c.max_seq_len = 64;
    c.max_tokens = 512;
    c.arch = SCMOE_ARCH_SCMOE;
    c.shortcut_pos = 2;
    c.comm_timeout_s = timeout_s;
    c.progress = thread ? SCMOE_PROGRESS_THREAD : SCMOE_PROGRESS_POLL;
    c.overlap_grad_sync = 1;
    c.pipeline_chunks = chunks;
    scmoe_pair *p;
    CALL(scmoe_pair_create(ctx, &c, &p));
    int B = 8, T = 64, d = c.d_model;
    float *x = malloc(sizeof(float) * B * T * d), *y = malloc(sizeof(float) * B * T * d);
    float *dy = malloc(sizeof(float) * B * T * d), *dx = malloc(sizeof(float) * B * T * d);
    for (int i = 0; i < B * T * d; i++) {
        x[i] = (float)((i * 37 + rank) % 101) / 50.0f - 1.0f;
        dy[i] = 1e-3f * (float)(i % 7);
    }
    scmoe_stats st;
    for (step_no = 1; step_no <= max_steps; step_no++) {
        CALL(scmoe_pair_forward(p, B, T, x, y, &st));
        CALL(scmoe_pair_backward(p, dy, dx, &st));
        CALL(scmoe_pair_grad_sync(p, &st));
        say("step %ld ok", (long)step_no);
    }
    scmoe_pair_destroy(p);
    scmoe_context_destroy(ctx);
    say("done");
    MPI_Finalize();
    return 0;
}
