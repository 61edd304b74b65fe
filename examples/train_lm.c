/* train_lm.c: a small byte-level language model on scmoe block pairs, trained data-parallel over MPI
 * ranks with expert parallelism inside, in the spirit of llm.c: one file, plain loops, the math in
 * the comments.
 *
 * The model (V = 256 byte values, T = --seq, d = --d, N = B*T tokens on this rank):
 *
 *   x_0     = wte[tok] + wpe[pos]                  token + position embeddings        [N, d]
 *   x_{i+1} = pair_i(x_i),  i = 0 .. n_pairs-1     a dense block + an MoE block each (libscmoe)
 *   h       = LN_f(x_n)                            final LayerNorm
 *   logits  = h wte^T                              tied LM head                        [N, V]
 *   L       = (1/S) sum_s CE(logits_s, next byte)  + aux_w * sum_i aux_i
 *
 * S is the number of tokens in the GLOBAL batch (ranks x B x T): the loss is one number for the whole
 * job. Each rank reads its own B sequences of the global batch (data parallelism); the experts of every
 * MoE block are spread over the ranks (expert parallelism, inside the library).
 *
 * Gradients. The library takes each rank's dy as dL/dy of that one global L, so we hand it
 * dlogits = (softmax - onehot) / S; it sums the replicated (dense) parameters' gradients over the
 * ranks itself and each expert's over every token routed to it, so after backward every rank holds
 * exactly dL/dθ for the parameters it has. Our own parameters (wte, wpe, LN_f) get the same treatment
 * with one MPI_Allreduce(SUM). The aux loss's gradient is added by the pairs' backward.
 *
 * Optimizer: AdamW (beta1 0.9, beta2 0.95, eps 1e-8, decoupled weight decay 0.1 on 2-D weights only),
 * linear warmup then cosine decay to 10% of --lr, and clipping by the global gradient norm
 *
 *   ||g||^2 = sum over replicated tensors (identical on every rank: counted once, locally)
 *           + sum over experts, each counted once: MPI_Allreduce over the ranks of the first
 *             expert-parallel group (ranks 0 .. ep_size-1, which together hold every expert once;
 *             with ep_size < ranks the other groups hold copies and stay out of the sum).
 *
 * Data: the bytes of --data FILE, or by default this repository's own sources and docs, read at run
 * time from the list in DEFAULT_TEXT (paths relative to the working directory: run from the
 * repository root). First 90% train, last 10% validation (with --val-data FILE all of it trains and
 * FILE validates). Each step draws the start of every sequence of the global batch from one seeded
 * RNG (the same draws on every rank; rank r uses sequences r*B .. r*B+B-1), so one rank with batch 2B
 * sees exactly the data of two ranks with batch B.
 *
 * Gradient accumulation (--grad-accum M): one optimizer step runs M micro-batches of B sequences per
 * rank and sums their gradients; S then counts the tokens of all M, so dlogits = (softmax - onehot) / S
 * needs no rescaling, and the pairs' aux and z weights are set to w / M (scmoe_pair_set_loss_weights)
 * so the auxiliary losses weigh as much as in one step. Micro-batch j on rank r reads sequences
 * r*M*B + j*B .. of the step's draws: --grad-accum M --batch B sees the data of --batch M*B.
 *
 * Checkpoints (checkpoint.h): parameters, AdamW moments, step, RNG, data position and the pairs'
 * gate-noise state; a resumed run continues the loss curve bit for bit. --keep N also keeps
 * DIR/ckpt-STEP.bin of the last N saves (hard links to the files written, no copies). The overlapped
 * schedule computes the same numbers as the serialized one, so --overlap 1 runs resume bit for bit
 * too. --wire-bf16, --grad-sync-bf16 and --grad-sync-algo are wire formats and sum orders, not part of
 * the model: they are not recorded, and a checkpoint resumes with any setting (bit for bit when it is
 * the same).
 *
 * Output (rank 0): a progress line every --print-every steps with the step out of the total, the loss
 * (CE + aux_w * aux), the aux loss (summed over the pairs, averaged over the micro-batches), the latest
 * validation CE, tokens/s, the step time split into compute and exposed communication (time spent
 * waiting on the MoE all-to-alls and gradient all-reduces, from the library's stats, plus our own
 * blocking all-reduces), overlap (the share of all-to-all time hidden behind compute: 1 - exposed /
 * in flight), the share of (token, expert) assignments dropped by capacity, the learning rate, the
 * wall time since this run started and the time left at its pace (ETA); --log FILE.jsonl gets the
 * same per step (appended to on --resume), with the pairs' gradient all-reduces apart: grad_sync_ms in
 * flight (summed over the pairs, each from its first bucket's start to its scmoe_pair_grad_sync) and
 * grad_sync_exposed_ms waited on in those syncs; a summary table ends the run. At start every rank's CPUs
 * are printed, with a warning where a rank has fewer CPUs than OpenMP threads (a bad binding).
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "../scmoe.h"
#include "../scmoe_mpi.h"
#include "checkpoint.h"
#include "model.h"
#include <cblas.h>
#include <glob.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define VOCAB        256
#define LN_EPS       1e-5f
#define BETA1        0.9f
#define BETA2        0.95f
#define ADAM_EPS     1e-8f
#define WEIGHT_DECAY 0.1f
#define MIN_LR_FRAC  0.1f

static int g_rank, g_size;
/* train_lm's own collectives: MPI_COMM_WORLD duplicated, with MPI_ERRORS_ARE_FATAL (their codes go unchecked) */
static MPI_Comm g_comm;

/* ---- command line ---- */

typedef struct opts {
    int arch, pos, d, hidden, experts, heads, pairs, seq, batch, steps, warmup, eval_every, eval_batches;
    int print_every, save_every, stop_at, ep_size, overlap, overlap_grad_sync, poll_cols, wire_bf16, grad_sync_bf16,
        grad_sync_algo, capacity_scope, quiet, keep, grad_accum;
    float lr, cf, aux, clip, poll_us;
    long long seed;
    const char *save, *resume, *data, *val_data, *log, *precision;
} opts;

enum { T_INT, T_FLOAT, T_LL, T_STR, T_ARCH, T_BOOL };
typedef struct flag {
    const char *name;
    int type;
    void *ptr;
    double min, max;
    const char *help;
} flag;

static const char *const ARCH_NAMES[] = {"top2", "top1", "shared", "scmoe"};

static opts O = {
    .arch = SCMOE_ARCH_SCMOE,
    .pos = 2,
    .d = 64,
    .hidden = 256,
    .experts = 8,
    .heads = 4,
    .pairs = 2,
    .seq = 64,
    .batch = 8,
    .steps = 300,
    .warmup = 30,
    .eval_every = 50,
    .eval_batches = 8,
    .print_every = 10,
    .save_every = 0,
    .stop_at = 0,
    .ep_size = 0,
    .overlap = 1,
    .overlap_grad_sync = -1,
    .poll_cols = 0,
    .poll_us = 1000,
    .wire_bf16 = 0,
    .grad_sync_algo = -1,
    .quiet = 0,
    .keep = 0,
    .grad_accum = 1,
    .lr = 3e-3f,
    .cf = 2.0f,
    .aux = 0.01f,
    .clip = 1.0f,
    .seed = 1234,
    .precision = "auto",
};

static const flag FLAGS[] = {
    {"--arch", T_ARCH, &O.arch, 0, 3, "MoE block variant: top2 | top1 | shared | scmoe"},
    {"--pos", T_INT, &O.pos, 1, 3, "ScMoE shortcut position 1 | 2 | 3"},
    {"--d", T_INT, &O.d, 1, 8192, "model width"},
    {"--hidden", T_INT, &O.hidden, 1, 65536, "hidden width of each expert, the shared expert and the dense MLP"},
    {"--experts", T_INT, &O.experts, 1, 4096, "experts per MoE block"},
    {"--heads", T_INT, &O.heads, 1, 1024, "attention heads (must divide --d)"},
    {"--pairs", T_INT, &O.pairs, 1, 256, "block pairs (each a dense block + an MoE block)"},
    {"--seq", T_INT, &O.seq, 1, 8192, "sequence length T"},
    {"--batch", T_INT, &O.batch, 1, 1 << 20,
     "sequences per rank per micro-batch (global batch = ranks x batch x grad-accum)"},
    {"--grad-accum", T_INT, &O.grad_accum, 1, 1 << 20, "micro-batches whose gradients one optimizer step sums"},
    {"--steps", T_INT, &O.steps, 0, 1e9, "optimizer steps (the LR schedule spans them)"},
    {"--lr", T_FLOAT, &O.lr, 1e-12, 10, "peak learning rate"},
    {"--warmup", T_INT, &O.warmup, 0, 1e9, "linear warmup steps, then cosine decay to 10% of --lr"},
    {"--cf", T_FLOAT, &O.cf, -1, 1000, "training capacity factor (<= 0: dropless)"},
    {"--aux", T_FLOAT, &O.aux, 0, 1000, "load-balance loss weight"},
    {"--clip", T_FLOAT, &O.clip, 0, 1e9, "clip the global gradient norm to this (0: off)"},
    {"--seed", T_LL, &O.seed, 0, 9.2e18, "seeds the parameters and the data order"},
    {"--eval-every", T_INT, &O.eval_every, 0, 1e9, "validation loss every M steps (0: only at the end)"},
    {"--eval-batches", T_INT, &O.eval_batches, 1, 1e6, "global batches in one validation pass"},
    {"--print-every", T_INT, &O.print_every, 1, 1e9, "a progress line every N steps"},
    {"--save", T_STR, &O.save, 0, 0,
     "checkpoint directory (DIR/ckpt.bin), written every --save-every steps and at the end"},
    {"--save-every", T_INT, &O.save_every, 0, 1e9, "checkpoint every N steps (0: only at the end)"},
    {"--keep", T_INT, &O.keep, 0, 1e6, "also keep DIR/ckpt-STEP.bin of the last N saves (0: only DIR/ckpt.bin)"},
    {"--resume", T_STR, &O.resume, 0, 0,
     "continue from DIR/ckpt.bin, or from a checkpoint file (same model flags and data)"},
    {"--stop-at", T_INT, &O.stop_at, 0, 1e9, "stop after step N as if interrupted (0: run all --steps)"},
    {"--data", T_STR, &O.data, 0, 0,
     "training text file (default: this repository's docs and sources, read from the working directory)"},
    {"--val-data", T_STR, &O.val_data, 0, 0, "validation text file (default: the last 10% of the training text)"},
    {"--ep-size", T_INT, &O.ep_size, 0, 1 << 20, "ranks per expert-parallel group (0: all ranks)"},
    {"--overlap", T_INT, &O.overlap, 0, 1, "1: ScMoE overlapped schedule + overlapped gradient sync; 0: serialized"},
    {"--overlap-grad-sync", T_INT, &O.overlap_grad_sync, -1, 1,
     "1: each pair's gradient all-reduce runs behind the earlier pairs' backward, all waited on before the "
     "optimizer; 0: each pair's backward waits for its own; -1: as --overlap (default -1)"},
    {"--poll-cols", T_INT, &O.poll_cols, 0, 1 << 30,
     "GEMM output columns per compute tile between MPI progress polls; 0: sized by --poll-us (library's poll_cols)"},
    {"--poll-us", T_FLOAT, &O.poll_us, 1, 1e7,
     "compute time between MPI progress polls, microseconds (library's poll_us)"},
    {"--wire-bf16", T_INT, &O.wire_bf16, 0, 1,
     "1: MoE exchanges send activations and gradients as bfloat16 (half the bytes); 0: float"},
    {"--grad-sync-bf16", T_INT, &O.grad_sync_bf16, 0, 1,
     "1: the pairs' gradient all-reduces carry bfloat16 (half the bytes; each sum within 2^-8 of float); 0: float"},
    {"--grad-sync-algo", T_INT, &O.grad_sync_algo, -1, 2,
     "the pairs' float gradient all-reduces: 0 MPI's MPI_Iallreduce, 1 the library's two rounds (reduce-scatter + "
     "allgather, rank order), 2 two rounds for buckets of >= 1,024 floats per rank; -1: the library's default "
     "(library's grad_sync_algo)"},
    {"--capacity-scope", T_INT, &O.capacity_scope, 0, 1,
     "0: expert capacity over the global batch (routing independent of the ranks); 1: per source rank (Tutel; flat "
     "routing cost in ranks)"},
    {"--log", T_STR, &O.log, 0, 0, "write one JSON object per step to FILE (JSONL)"},
    {"--precision", T_STR, &O.precision, 0, 0,
     "GEMM precision: fp32 | bf16 (bf16 operands, fp32 sums) | auto (bf16 where the CPU has amx_bf16 or avx512_bf16)"},
    {"--quiet", T_BOOL, &O.quiet, 0, 1, "no progress lines (errors and the summary still print)"},
};
#define N_FLAGS ((int)(sizeof FLAGS / sizeof *FLAGS))

/* Every rank parses the same argv; rank 0 says what is wrong, and all exit 2. */
static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...) {
    if (g_rank == 0) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "train_lm: ");
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, " (see --help)\n");
        va_end(ap);
    }
    MPI_Finalize();
    exit(2);
}

static void print_help(void) {
    printf("usage: mpirun -np P train_lm [flags]   (P must divide --experts, or use --ep-size)\n");
    printf("       every flag takes its value as --flag VALUE or --flag=VALUE\n\n");
    for (int i = 0; i < N_FLAGS; i++) {
        const flag *f = &FLAGS[i];
        char def[64] = "";
        switch (f->type) {
        case T_INT: snprintf(def, sizeof def, "%d", *(int *)f->ptr); break;
        case T_FLOAT: snprintf(def, sizeof def, "%g", *(float *)f->ptr); break;
        case T_LL: snprintf(def, sizeof def, "%lld", *(long long *)f->ptr); break;
        case T_STR: snprintf(def, sizeof def, "%s", *(const char **)f->ptr ? *(const char **)f->ptr : "none"); break;
        case T_ARCH: snprintf(def, sizeof def, "%s", ARCH_NAMES[*(int *)f->ptr]); break;
        case T_BOOL: snprintf(def, sizeof def, "off"); break;
        }
        if (strstr(f->help, "(default")) printf("  %-15s %s\n", f->name, f->help);
        else printf("  %-15s %s (default %s)\n", f->name, f->help, def);
    }
    printf("  %-15s this list\n", "--help");
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            if (g_rank == 0) print_help();
            MPI_Finalize();
            exit(0);
        }
        /* --flag=value or --flag value */
        const char *eq = strchr(a, '=');
        size_t len = eq ? (size_t)(eq - a) : strlen(a);
        const flag *f = NULL;
        for (int j = 0; j < N_FLAGS; j++)
            if (strlen(FLAGS[j].name) == len && strncmp(a, FLAGS[j].name, len) == 0) f = &FLAGS[j];
        if (!f) usage_error("unknown flag '%.*s'", (int)len, a);
        a = f->name;
        if (f->type == T_BOOL) {
            if (eq) usage_error("%s takes no value", a);
            *(int *)f->ptr = 1;
            continue;
        }
        if (!eq && i + 1 >= argc) usage_error("%s needs a value", a);
        const char *v = eq ? eq + 1 : argv[++i];
        char *end;
        if (f->type == T_STR) {
            if (!*v) usage_error("%s needs a non-empty value", a);
            *(const char **)f->ptr = v;
        } else if (f->type == T_ARCH) {
            int k = -1;
            for (int j = 0; j < 4; j++)
                if (strcmp(v, ARCH_NAMES[j]) == 0) k = j;
            if (k < 0) usage_error("%s '%s': expected top2, top1, shared or scmoe", a, v);
            *(int *)f->ptr = k;
        } else if (f->type == T_FLOAT) {
            double x = strtod(v, &end);
            if (end == v || *end || !isfinite(x)) usage_error("%s '%s' is not a number", a, v);
            if (x < f->min || x > f->max) usage_error("%s %s is out of range [%g, %g]", a, v, f->min, f->max);
            *(float *)f->ptr = (float)x;
        } else {
            long long x = strtoll(v, &end, 10);
            if (end == v || *end) usage_error("%s '%s' is not an integer", a, v);
            if (x < f->min || (double)x > f->max)
                usage_error("%s %s is out of range [%.0f, %.0f]", a, v, f->min, f->max);
            if (f->type == T_INT) *(int *)f->ptr = (int)x;
            else *(long long *)f->ptr = x;
        }
    }
    /* constraints between flags, each named */
    if (O.d % O.heads) usage_error("--heads %d does not divide --d %d", O.heads, O.d);
    int ep = O.ep_size ? O.ep_size : g_size;
    if (g_size % ep) usage_error("--ep-size %d does not divide the %d ranks", O.ep_size, g_size);
    if (O.experts % ep)
        usage_error("--experts %d is not a multiple of the expert-parallel size %d (--ep-size or the rank count)",
                    O.experts, ep);
    if (O.keep && !O.save) usage_error("--keep %d needs --save DIR", O.keep);
    if ((long long)O.batch * O.seq > 1 << 24)
        usage_error("--batch x --seq = %lld tokens per rank is too many", (long long)O.batch * O.seq);
    if (O.stop_at && O.stop_at > O.steps) usage_error("--stop-at %d is past --steps %d", O.stop_at, O.steps);
}

/* ---- small helpers ---- */

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...) {
    if (g_rank == 0) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "train_lm: ");
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        va_end(ap);
    }
    MPI_Finalize();
    exit(code);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) {
        fprintf(stderr, "train_lm: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    return p;
}

/* A library call failed: library collectives fail on every rank together, so exiting is clean. */
static scmoe_context *g_ctx;
#define SC(call)                                                                                                       \
    do {                                                                                                               \
        scmoe_status s_ = (call);                                                                                      \
        if (s_) die(1, "%s: %s (%s)", #call, scmoe_strerror(s_), g_ctx ? scmoe_last_error(g_ctx) : "");                \
    } while (0)

/* splitmix64: the data sampler's RNG and the embeddings' init */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_normal(uint64_t *s) { /* Box-Muller */
    double u1 = ((double)(rng_next(s) >> 11) + 1.0) / 9007199254740993.0,
           u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- the text ---- */

/* The default corpus: this repository's docs and sources, in this order, each glob sorted. */
static const char *const DEFAULT_TEXT[] = {
    "README.md",
    "docs/*.md",
    "scmoe.h",
    "scmoe_mpi.h",
    "*.c",
    "*.h",
    "kernels/*.h",
    "kernels/*.c",
    "mpi_backend/*.h",
    "mpi_backend/*.c",
    "blas_backend/*.h",
    "blas_backend/*.c",
    "examples/*.h",
    "examples/*.c",
    "tests/*.h",
    "tests/*.c",
    "bench/*.c",
};

static int append_file(const char *path, unsigned char **buf, size_t *n, size_t *cap) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t got;
    do {
        if (*cap - *n < 65536) {
            size_t c = *cap * 2 + 65536;
            unsigned char *b = realloc(*buf, c);
            if (!b) {
                fclose(f);
                return -1;
            }
            *buf = b;
            *cap = c;
        }
        got = fread(*buf + *n, 1, *cap - *n, f);
        *n += got;
    } while (got > 0);
    int bad = ferror(f);
    fclose(f);
    return bad ? -1 : 0;
}

static unsigned char *load_text(const char *data, size_t *n) {
    unsigned char *buf = NULL;
    size_t cap = 0;
    *n = 0;
    if (data) {
        if (append_file(data, &buf, n, &cap)) die(2, "--data %s: cannot read the file", data);
        return buf;
    }
    for (size_t i = 0; i < sizeof DEFAULT_TEXT / sizeof *DEFAULT_TEXT; i++) {
        glob_t g;
        if (glob(DEFAULT_TEXT[i], 0, NULL, &g) != 0) continue;
        for (size_t j = 0; j < g.gl_pathc; j++) {
            /* "*.h" also matches scmoe.h, listed first on purpose: skip repeats */
            if (strcmp(g.gl_pathv[j], "scmoe.h") == 0 && strcmp(DEFAULT_TEXT[i], "scmoe.h") != 0) continue;
            if (strcmp(g.gl_pathv[j], "scmoe_mpi.h") == 0 && strcmp(DEFAULT_TEXT[i], "scmoe_mpi.h") != 0) continue;
            if (append_file(g.gl_pathv[j], &buf, n, &cap)) die(2, "cannot read %s", g.gl_pathv[j]);
        }
        globfree(&g);
    }
    if (*n == 0)
        die(2, "no --data given and no repository sources found: run from the repository root or pass --data FILE");
    return buf;
}

/* ---- the model ---- */

typedef struct param {
    char name[CKPT_NAME_MAX];
    float *data, *grad, *m, *v; /* v: AdamW moments */
    size_t numel;
    int ndim, shape[4];
    int decay;  /* 2-D weights get weight decay */
    int expert; /* held by its owners only */
} param;

typedef struct model {
    int V, T, d, n_pairs, B;
    /* our own parameters, one block so one all-reduce sums their gradients */
    float *own, *own_grad;
    size_t n_own;
    float *wte, *wpe, *lnf_w, *lnf_b;
    float *d_wte, *d_wpe, *d_lnf_w, *d_lnf_b;
    scmoe_pair **pairs;
    param *params;
    int n_params, *pair_base; /* pair i's tensors are params[pair_base[i] + local index] */
    /* activations of B*T tokens */
    float **x;              /* n_pairs + 1 buffers [N, d]: x_i is pair i's input, kept until its backward */
    float *h, *mean, *rstd; /* final LN output and statistics */
    float *logits;          /* [N, V]; after a training forward, dL/dlogits */
    float *dA, *dB;         /* ping-pong gradients [N, d] */
    int *inp, *tgt;
    scmoe_stats *st; /* per pair, this step */
} model;

/* What shapes the parameters, as the checkpoint records it; the pairs are built from it (model.h). */
static ckpt_model model_shape(void) {
    return (ckpt_model){O.arch,    O.pos,   SCMOE_COMBINE_CG1, SCMOE_GELU, O.d,  O.hidden,
                        O.experts, O.heads, O.pairs,           O.seq,      VOCAB};
}

/* --precision: auto is bf16 where /proc/cpuinfo lists a bf16 matrix unit (AMX or AVX512-BF16), whose
 * GEMMs then run several times faster; elsewhere bf16 would only round the operands, at fp32's speed */
static scmoe_precision precision_of(const char **why) {
    if (!strcmp(O.precision, "fp32")) {
        *why = "asked";
        return SCMOE_PRECISION_FP32;
    }
    if (!strcmp(O.precision, "bf16")) {
        *why = "asked";
        return SCMOE_PRECISION_BF16;
    }
    if (strcmp(O.precision, "auto")) usage_error("--precision '%s': expected auto, fp32 or bf16", O.precision);
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[4096];
    int bf16 = 0;
    while (f && !bf16 && fgets(line, sizeof line, f))
        if (!strncmp(line, "flags", 5)) bf16 = strstr(line, " amx_bf16") || strstr(line, " avx512_bf16");
    if (f) fclose(f);
    *why = bf16 ? "auto: the CPU has amx_bf16 or avx512_bf16" : "auto: no amx_bf16 or avx512_bf16 on this CPU";
    return bf16 ? SCMOE_PRECISION_BF16 : SCMOE_PRECISION_FP32;
}

/* after the weights change (optimizer step, checkpoint load): the pairs' bf16 copies follow */
static void pairs_params_changed(model *m) {
    for (int i = 0; i < m->n_pairs; i++) SC(scmoe_pair_params_changed(m->pairs[i]));
}

static void model_init(model *m, scmoe_context *ctx) {
    int V = VOCAB, T = O.seq, d = O.d, N = O.batch * O.seq;
    m->V = V;
    m->T = T;
    m->d = d;
    m->n_pairs = O.pairs;
    m->B = O.batch;
    m->n_own = (size_t)V * d + (size_t)T * d + 2 * (size_t)d;
    m->own = xcalloc(m->n_own, sizeof(float));
    m->own_grad = xcalloc(m->n_own, sizeof(float));
    m->wte = m->own;
    m->wpe = m->wte + (size_t)V * d;
    m->lnf_w = m->wpe + (size_t)T * d;
    m->lnf_b = m->lnf_w + d;
    m->d_wte = m->own_grad;
    m->d_wpe = m->d_wte + (size_t)V * d;
    m->d_lnf_w = m->d_wpe + (size_t)T * d;
    m->d_lnf_b = m->d_lnf_w + d;
    /* GPT-2 init: wte N(0, 0.02), wpe N(0, 0.01), LN 1/0; the same on every rank (same seed) */
    uint64_t s = (uint64_t)O.seed ^ 0x5CA1AB1Eull;
    for (size_t i = 0; i < (size_t)V * d; i++) m->wte[i] = 0.02f * rng_normal(&s);
    for (size_t i = 0; i < (size_t)T * d; i++) m->wpe[i] = 0.01f * rng_normal(&s);
    for (int i = 0; i < d; i++) m->lnf_w[i] = 1.0f;

    /* the pairs: the shape the checkpoint records, this run's options */
    ckpt_model shape = model_shape();
    scmoe_config base = scmoe_config_default();
    base.max_tokens = N;
    base.capacity_factor = O.cf;
    base.aux_loss_weight = O.aux;
    base.ep_size = O.ep_size;
    base.overlap = O.overlap;
    base.overlap_grad_sync = O.overlap_grad_sync < 0 ? O.overlap : O.overlap_grad_sync;
    base.poll_cols = O.poll_cols;
    base.poll_us = O.poll_us;
    base.wire_bf16 = O.wire_bf16;
    base.grad_sync_bf16 = O.grad_sync_bf16;
    if (O.grad_sync_algo >= 0) base.grad_sync_algo = (scmoe_grad_sync_algo)O.grad_sync_algo;
    const char *why;
    base.precision = precision_of(&why);
    if (g_rank == 0 && !O.quiet)
        printf("precision: %s (%s)\n", base.precision == SCMOE_PRECISION_BF16 ? "bf16" : "fp32", why);
    base.capacity_scope = (scmoe_capacity_scope)O.capacity_scope;
    m->pairs = xcalloc((size_t)O.pairs, sizeof *m->pairs);
    for (int i = 0; i < O.pairs; i++) {
        scmoe_config c = lm_pair_config(&shape, &base);
        c.seed = (uint64_t)O.seed + (uint64_t)i;
        char msg[256];
        if (scmoe_config_validate(&c, msg, sizeof msg)) die(2, "bad configuration: %s", msg);
        SC(scmoe_pair_create(ctx, &c, &m->pairs[i]));
        /* M micro-batches each add their aux and z gradients: weigh each by 1/M (1/1 keeps the bits) */
        SC(scmoe_pair_set_loss_weights(m->pairs[i], c.aux_loss_weight / (float)O.grad_accum,
                                       c.z_loss_weight / (float)O.grad_accum));
    }

    /* the parameter list the optimizer walks: ours, then each pair's tensors in the pair's order */
    int total = 4;
    for (int i = 0; i < O.pairs; i++) total += scmoe_pair_param_count(m->pairs[i]);
    m->params = xcalloc((size_t)total, sizeof *m->params);
    m->pair_base = xcalloc((size_t)O.pairs, sizeof *m->pair_base);
    struct {
        const char *name;
        float *p, *g;
        int ndim, s0, s1;
    } own[4] = {{"wte", m->wte, m->d_wte, 2, V, d},
                {"wpe", m->wpe, m->d_wpe, 2, T, d},
                {"lnf.weight", m->lnf_w, m->d_lnf_w, 1, d, 0},
                {"lnf.bias", m->lnf_b, m->d_lnf_b, 1, d, 0}};
    for (int i = 0; i < 4; i++) {
        param *p = &m->params[m->n_params++];
        snprintf(p->name, sizeof p->name, "%s", own[i].name);
        p->data = own[i].p;
        p->grad = own[i].g;
        p->ndim = own[i].ndim;
        p->shape[0] = own[i].s0;
        p->shape[1] = own[i].s1;
        p->numel = (size_t)own[i].s0 * (own[i].ndim == 2 ? (size_t)own[i].s1 : 1);
        p->decay = own[i].ndim == 2;
    }
    for (int i = 0; i < O.pairs; i++) {
        m->pair_base[i] = m->n_params;
        for (int j = 0; j < scmoe_pair_param_count(m->pairs[i]); j++) {
            scmoe_tensor t;
            SC(scmoe_pair_param_at(m->pairs[i], j, &t));
            param *p = &m->params[m->n_params++];
            snprintf(p->name, sizeof p->name, "pair%d.%s", i, t.name);
            p->data = t.data;
            p->grad = t.grad;
            p->numel = t.numel;
            p->ndim = t.ndim;
            memcpy(p->shape, t.shape, sizeof p->shape);
            p->decay = t.ndim == 2;
            p->expert = !t.replicated;
        }
    }
    for (int i = 0; i < m->n_params; i++) {
        m->params[i].m = xcalloc(m->params[i].numel, sizeof(float));
        m->params[i].v = xcalloc(m->params[i].numel, sizeof(float));
    }

    m->x = xcalloc((size_t)O.pairs + 1, sizeof *m->x);
    for (int i = 0; i <= O.pairs; i++) m->x[i] = xcalloc((size_t)N * d, sizeof(float));
    m->h = xcalloc((size_t)N * d, sizeof(float));
    m->mean = xcalloc((size_t)N, sizeof(float));
    m->rstd = xcalloc((size_t)N, sizeof(float));
    m->logits = xcalloc((size_t)N * V, sizeof(float));
    m->dA = xcalloc((size_t)N * d, sizeof(float));
    m->dB = xcalloc((size_t)N * d, sizeof(float));
    m->inp = xcalloc((size_t)N, sizeof(int));
    m->tgt = xcalloc((size_t)N, sizeof(int));
    m->st = xcalloc((size_t)O.pairs, sizeof *m->st);
}

static void model_free(model *m) {
    for (int i = 0; i < m->n_params; i++) {
        free(m->params[i].m);
        free(m->params[i].v);
    }
    for (int i = 0; i < m->n_pairs; i++) scmoe_pair_destroy(m->pairs[i]);
    for (int i = 0; i <= m->n_pairs; i++) free(m->x[i]);
    free(m->x);
    free(m->pairs);
    free(m->params);
    free(m->pair_base);
    free(m->own);
    free(m->own_grad);
    free(m->h);
    free(m->mean);
    free(m->rstd);
    free(m->logits);
    free(m->dA);
    free(m->dB);
    free(m->inp);
    free(m->tgt);
    free(m->st);
}

/* Loads B sequences: sequence b starts at text[start[b]], inputs T bytes, targets the next T. */
static void load_batch(model *m, const unsigned char *text, const uint64_t *start, int B) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < m->T; t++) {
            m->inp[b * m->T + t] = text[start[b] + (uint64_t)t];
            m->tgt[b * m->T + t] = text[start[b] + (uint64_t)t + 1];
        }
}

/* Forward over this rank's B sequences (already in inp/tgt). Returns the sum of the token CE losses.
 * With inv_S > 0 (training) it leaves dL/dlogits = (softmax - onehot) * inv_S in m->logits. */
static double model_forward(model *m, int B, double inv_S) {
    int T = m->T, d = m->d, V = m->V, N = B * T;
    /* x_0 = wte[tok] + wpe[t] */
    for (int n = 0; n < N; n++) {
        const float *e = m->wte + (size_t)m->inp[n] * d, *p = m->wpe + (size_t)(n % T) * d;
        float *x = m->x[0] + (size_t)n * d;
        for (int j = 0; j < d; j++) x[j] = e[j] + p[j];
    }
    for (int i = 0; i < m->n_pairs; i++) SC(scmoe_pair_forward(m->pairs[i], B, T, m->x[i], m->x[i + 1], &m->st[i]));
    /* h = (x - mean) * rstd * w + b */
    const float *xn = m->x[m->n_pairs];
    for (int n = 0; n < N; n++) {
        const float *x = xn + (size_t)n * d;
        float mu = 0.0f, var = 0.0f;
        for (int j = 0; j < d; j++) mu += x[j];
        mu /= (float)d;
        for (int j = 0; j < d; j++) var += (x[j] - mu) * (x[j] - mu);
        float rs = 1.0f / sqrtf(var / (float)d + LN_EPS);
        m->mean[n] = mu;
        m->rstd[n] = rs;
        float *h = m->h + (size_t)n * d;
        for (int j = 0; j < d; j++) h[j] = (x[j] - mu) * rs * m->lnf_w[j] + m->lnf_b[j];
    }
    /* logits = h wte^T: [N, d] x [d, V] */
    if (N) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, V, d, 1.0f, m->h, d, m->wte, d, 0.0f, m->logits, V);
    /* CE_n = logsumexp(z_n) - z_n[target];  dCE_n/dz = softmax(z_n) - onehot(target) */
    double loss = 0.0;
    for (int n = 0; n < N; n++) {
        float *z = m->logits + (size_t)n * V, mx = z[0];
        for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
        double sum = 0.0;
        for (int v = 0; v < V; v++) sum += exp((double)(z[v] - mx));
        double lse = mx + log(sum);
        loss += lse - z[m->tgt[n]];
        if (inv_S > 0) {
            for (int v = 0; v < V; v++) z[v] = (float)(exp((double)z[v] - lse) * inv_S);
            z[m->tgt[n]] -= (float)inv_S;
        }
    }
    return loss;
}

/* Backward from dL/dlogits; accumulates every gradient. */
static void model_backward(model *m, int B) {
    int T = m->T, d = m->d, V = m->V, N = B * T;
    float *dh = m->dA;
    /* logits = h wte^T:  dh = dlogits wte,  dwte += dlogits^T h */
    if (N) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, d, V, 1.0f, m->logits, V, m->wte, d, 0.0f, dh, d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, V, d, N, 1.0f, m->logits, V, m->h, d, 1.0f, m->d_wte, d);
    }
    /* LayerNorm: with xhat = (x - mean) rstd and g = dh * w,
     *   dx = rstd (g - mean_j(g) - xhat mean_j(g xhat)),  dw += dh xhat,  db += dh */
    float *dx = m->dB;
    const float *xn = m->x[m->n_pairs];
    for (int n = 0; n < N; n++) {
        const float *x = xn + (size_t)n * d, *dy = dh + (size_t)n * d;
        float mu = m->mean[n], rs = m->rstd[n], gm = 0.0f, gx = 0.0f;
        for (int j = 0; j < d; j++) {
            float xh = (x[j] - mu) * rs, g = dy[j] * m->lnf_w[j];
            gm += g;
            gx += g * xh;
            m->d_lnf_w[j] += dy[j] * xh;
            m->d_lnf_b[j] += dy[j];
        }
        gm /= (float)d;
        gx /= (float)d;
        float *o = dx + (size_t)n * d;
        for (int j = 0; j < d; j++) o[j] = rs * (dy[j] * m->lnf_w[j] - gm - (x[j] - mu) * rs * gx);
    }
    /* the pairs, last first: dx (in dB) -> dA -> dB ... */
    float *dy = m->dB, *dxi = m->dA;
    for (int i = m->n_pairs - 1; i >= 0; i--) {
        SC(scmoe_pair_backward(m->pairs[i], dy, dxi, &m->st[i]));
        float *t = dy;
        dy = dxi;
        dxi = t;
    }
    /* with overlap_grad_sync the pairs' dense all-reduces ran behind the later pairs' backward; finish them */
    for (int i = 0; i < m->n_pairs; i++) SC(scmoe_pair_grad_sync(m->pairs[i], &m->st[i]));
    /* x_0 = wte[tok] + wpe[t]: scatter-add dx_0 (in order, so the sums are deterministic) */
    for (int n = 0; n < N; n++) {
        const float *g = dy + (size_t)n * d;
        float *e = m->d_wte + (size_t)m->inp[n] * d, *p = m->d_wpe + (size_t)(n % T) * d;
        for (int j = 0; j < d; j++) {
            e[j] += g[j];
            p[j] += g[j];
        }
    }
}

static void zero_grads(model *m) {
    memset(m->own_grad, 0, sizeof(float) * m->n_own);
    for (int i = 0; i < m->n_pairs; i++) SC(scmoe_pair_zero_grad(m->pairs[i]));
}

/* ---- the run ---- */

typedef struct run {
    model m;
    const unsigned char *train, *val;
    size_t n_train, n_val;
    uint64_t rng, tokens_seen;
    int step; /* steps completed */
    uint32_t data_crc;
    uint64_t data_bytes;
    int ep_eff; /* expert-parallel group size */
} run;

static float lr_at(int step) { /* step: 0-based index of the step about to be taken */
    float lr_min = MIN_LR_FRAC * O.lr;
    if (step < O.warmup) return O.lr * (float)(step + 1) / (float)O.warmup;
    int span = O.steps - O.warmup;
    float frac = span > 0 ? (float)(step - O.warmup) / (float)span : 1.0f;
    if (frac > 1.0f) frac = 1.0f;
    return lr_min + 0.5f * (O.lr - lr_min) * (1.0f + cosf(3.14159265358979f * frac));
}

/* sqrt(sum of squares of every gradient, each tensor counted once over the job) */
static double global_grad_norm(run *r, double *t_comm) {
    model *m = &r->m;
    double dense = 0.0, expert = 0.0, expert_all = 0.0;
    int in_first_group = g_rank < r->ep_eff; /* ranks 0..ep_size-1 hold every expert exactly once */
    for (int i = 0; i < m->n_params; i++) {
        const param *p = &m->params[i];
        double s = 0.0;
        for (size_t j = 0; j < p->numel; j++) s += (double)p->grad[j] * p->grad[j];
        if (!p->expert) dense += s;
        else if (in_first_group) expert += s;
    }
    double t0 = MPI_Wtime();
    MPI_Allreduce(&expert, &expert_all, 1, MPI_DOUBLE, MPI_SUM, g_comm);
    *t_comm += MPI_Wtime() - t0;
    return sqrt(dense + expert_all);
}

/* AdamW: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd p) */
static void adamw_update(model *m, int t, float lr, float gscale) {
    float bc1 = 1.0f - powf(BETA1, (float)t), bc2 = 1.0f - powf(BETA2, (float)t);
    for (int i = 0; i < m->n_params; i++) {
        param *p = &m->params[i];
        float wd = p->decay ? WEIGHT_DECAY : 0.0f;
        for (size_t j = 0; j < p->numel; j++) {
            float g = p->grad[j] * gscale;
            p->m[j] = BETA1 * p->m[j] + (1.0f - BETA1) * g;
            p->v[j] = BETA2 * p->v[j] + (1.0f - BETA2) * g * g;
            float mh = p->m[j] / bc1, vh = p->v[j] / bc2;
            p->data[j] -= lr * (mh / (sqrtf(vh) + ADAM_EPS) + wd * p->data[j]);
        }
    }
}

typedef struct step_info {
    double loss, ce, aux, lr, gnorm, time, exposed, a2a_comm, a2a_exposed;
    double grad_sync, grad_exposed; /* the pairs' gradient all-reduces: in flight (first start to end), waited on */
    double routed, dropped;
} step_info;

static void train_step(run *r, step_info *si) {
    model *m = &r->m;
    int B = O.batch, T = O.seq, M = O.grad_accum, Bg = B * g_size * M;
    double t0 = MPI_Wtime(), t_comm = 0.0;
    /* the global batch's starts, the same draws on every rank; this rank's M*B of them */
    uint64_t *start = xcalloc((size_t)Bg, sizeof *start);
    for (int b = 0; b < Bg; b++) start[b] = rng_next(&r->rng) % (r->n_train - (uint64_t)T);

    double S = (double)Bg * T, ce_local = 0.0;
    memset(si, 0, sizeof *si);
    zero_grads(m);
    for (int j = 0; j < M; j++) { /* gradients accumulate over the micro-batches */
        load_batch(m, r->train, start + (size_t)g_rank * B * M + (size_t)j * B, B);
        ce_local += model_forward(m, B, 1.0 / S);
        model_backward(m, B);
        for (int i = 0; i < m->n_pairs; i++) {
            const scmoe_stats *st = &m->st[i];
            si->aux += st->aux_loss / M;
            si->a2a_comm += st->fwd_comm + st->bwd_comm;
            si->a2a_exposed += st->fwd_exposed + st->bwd_exposed;
            si->exposed += st->fwd_exposed + st->bwd_exposed + st->grad_sync_exposed;
            si->grad_sync += st->grad_sync_time;
            si->grad_exposed += st->grad_sync_exposed;
            si->routed += (double)st->tokens * (O.arch == SCMOE_ARCH_TOP2 ? 2 : 1);
            si->dropped += (double)st->dropped;
        }
    }
    free(start);
    /* our own parameters' gradients: summed over ranks like the library's dense ones */
    double t1 = MPI_Wtime();
    if (g_size > 1) MPI_Allreduce(MPI_IN_PLACE, m->own_grad, (int)m->n_own, MPI_FLOAT, MPI_SUM, g_comm);
    double ce_sum = 0.0;
    MPI_Allreduce(&ce_local, &ce_sum, 1, MPI_DOUBLE, MPI_SUM, g_comm);
    t_comm += MPI_Wtime() - t1;

    double gnorm = global_grad_norm(r, &t_comm);
    float gscale = O.clip > 0 && gnorm > O.clip ? (float)(O.clip / gnorm) : 1.0f;
    float lr = lr_at(r->step);
    adamw_update(m, r->step + 1, lr, gscale);
    pairs_params_changed(m);
    r->step++;
    r->tokens_seen += (uint64_t)S;

    si->ce = ce_sum / S;
    si->loss = si->ce + O.aux * si->aux;
    si->exposed += t_comm; /* our blocking all-reduces are exposed by definition */
    si->lr = lr;
    si->gnorm = gnorm;
    si->time = MPI_Wtime() - t0;
}

/* Mean CE over eval_batches fixed global batches spread evenly over the validation text. */
static double evaluate(run *r) {
    model *m = &r->m;
    int B = O.batch, T = O.seq, Bg = B * g_size;
    for (int i = 0; i < m->n_pairs; i++) SC(scmoe_pair_set_training(m->pairs[i], 0));
    uint64_t span = r->n_val - (uint64_t)T - 1, total = (uint64_t)O.eval_batches * Bg;
    uint64_t *start = xcalloc((size_t)B, sizeof *start);
    double sum = 0.0, all = 0.0;
    for (int k = 0; k < O.eval_batches; k++) {
        for (int b = 0; b < B; b++) {
            uint64_t j = (uint64_t)k * Bg + (uint64_t)g_rank * B + (uint64_t)b;
            start[b] = total > 1 ? j * span / (total - 1) : 0;
        }
        load_batch(m, r->val, start, B);
        sum += model_forward(m, B, 0.0);
    }
    free(start);
    for (int i = 0; i < m->n_pairs; i++) SC(scmoe_pair_set_training(m->pairs[i], 1));
    MPI_Allreduce(&sum, &all, 1, MPI_DOUBLE, MPI_SUM, g_comm);
    return all / ((double)total * T);
}

/* ---- checkpoints ---- */

static void fill_header(const run *r, ckpt_header *h) {
    memset(h, 0, sizeof *h);
    h->model = model_shape();
    h->train = (ckpt_train){g_size, O.batch * O.grad_accum, O.ep_size, O.overlap,       O.warmup, O.steps, O.lr, O.cf,
                            O.aux,  WEIGHT_DECAY,           O.clip,    (uint64_t)O.seed};
    uint64_t noise = 0; /* every pair runs the same training forwards: one state for all */
    SC(scmoe_pair_noise_state(r->m.pairs[0], &noise));
    h->state = (ckpt_state){(uint64_t)r->step, r->rng, r->tokens_seen, r->data_bytes, r->data_crc, noise};
}

/* The checkpoint's tensor list (the same on every rank): parameters and AdamW moments by name. */
static void build_list(model *m, ckpt_list *l) {
    int bad = 0;
    for (int i = 0; i < 4; i++) { /* wte, wpe, lnf.weight, lnf.bias */
        param *p = &m->params[i];
        char n[CKPT_NAME_MAX + 2];
        bad |= ckpt_list_add(l, p->name, p->ndim, p->shape, -1, p->data);
        snprintf(n, sizeof n, "%s#m", p->name);
        bad |= ckpt_list_add(l, n, p->ndim, p->shape, -1, p->m);
        snprintf(n, sizeof n, "%s#v", p->name);
        bad |= ckpt_list_add(l, n, p->ndim, p->shape, -1, p->v);
    }
    for (int i = 0; i < m->n_pairs; i++) {
        ckpt_pair_tensor *pt;
        int n = ckpt_pair_layout(m->pairs[i], O.experts, &pt);
        if (n < 0) die(1, "cannot list the tensors of pair %d", i);
        for (int k = 0; k < n; k++) {
            param *p = pt[k].local >= 0 ? &m->params[m->pair_base[i] + pt[k].local] : NULL;
            char name[CKPT_NAME_MAX + 32]; /* too long a name is refused by ckpt_list_add */
            snprintf(name, sizeof name, "pair%d.%s", i, pt[k].name);
            bad |= ckpt_list_add(l, name, pt[k].ndim, pt[k].shape, pt[k].owner, p ? p->data : NULL);
            snprintf(name, sizeof name, "pair%d.%s#m", i, pt[k].name);
            bad |= ckpt_list_add(l, name, pt[k].ndim, pt[k].shape, pt[k].owner, p ? p->m : NULL);
            snprintf(name, sizeof name, "pair%d.%s#v", i, pt[k].name);
            bad |= ckpt_list_add(l, name, pt[k].ndim, pt[k].shape, pt[k].owner, p ? p->v : NULL);
        }
        free(pt);
    }
    if (bad) die(1, "cannot build the checkpoint list (out of memory or a name too long)");
}

/* --keep N (rank 0, after a save): DIR/ckpt-STEP.bin becomes a hard link to the ckpt.bin just written (the
 * next save renames a new file over ckpt.bin and leaves this one), and all but the newest N such files
 * go. Zero-padded steps sort by name in step order. A failure is reported and training goes on. */
static void keep_last(int step) {
    char cur[4096], kept[4096], pat[4096];
    ckpt_path(cur, sizeof cur, O.save);
    snprintf(kept, sizeof kept, "%s/ckpt-%09d.bin", O.save, step);
    unlink(kept); /* a rerun from an earlier checkpoint saves the same step again */
    if (link(cur, kept) != 0) {
        fprintf(stderr, "train_lm: warning: --keep: cannot link %s to %s\n", kept, cur);
        return;
    }
    snprintf(pat, sizeof pat, "%s/ckpt-[0-9]*.bin", O.save);
    glob_t g;
    if (glob(pat, 0, NULL, &g) != 0) return;
    for (size_t i = 0; i + (size_t)O.keep < g.gl_pathc; i++)
        if (unlink(g.gl_pathv[i]) != 0) fprintf(stderr, "train_lm: warning: --keep: cannot remove %s\n", g.gl_pathv[i]);
    globfree(&g);
}

static void save(run *r) {
    ckpt_header h;
    ckpt_list l = {0};
    char err[512];
    fill_header(r, &h);
    build_list(&r->m, &l);
    double t0 = MPI_Wtime();
    ckpt_status s = ckpt_save(g_comm, O.save, &h, &l, err, sizeof err);
    ckpt_list_free(&l);
    if (s) die(3, "%s", err);
    if (g_rank == 0 && !O.quiet)
        printf("saved %s/%s at step %d (%.2f s)\n", O.save, CKPT_FILE, r->step, MPI_Wtime() - t0);
    if (g_rank == 0 && O.keep > 0) keep_last(r->step);
}

static void resume(run *r) {
    char path[4096], err[512];
    struct stat sb;
    if (stat(O.resume, &sb) == 0 && S_ISREG(sb.st_mode)) snprintf(path, sizeof path, "%s", O.resume);
    else ckpt_path(path, sizeof path, O.resume);
    ckpt_header h, want;
    ckpt_status s = ckpt_read_header(path, &h, err, sizeof err);
    fill_header(r, &want);
    if (!s) s = ckpt_model_compare(&h.model, &want.model, err, sizeof err);
    if (!s && (h.state.data_bytes != r->data_bytes || h.state.data_crc != r->data_crc)) {
        /* the data order is only reproducible on the same text */
        s = CKPT_ERR_CONFIG;
        snprintf(err, sizeof err,
                 "checkpoint config mismatch: it was trained on another text (%llu bytes, crc %08x; "
                 "here %llu bytes, crc %08x): pass the same --data",
                 (unsigned long long)h.state.data_bytes, h.state.data_crc, (unsigned long long)r->data_bytes,
                 r->data_crc);
    }
    s = ckpt_agree(g_comm, s, err, sizeof err);
    if (s) die(3, "%s", err);
    ckpt_list l = {0};
    build_list(&r->m, &l);
    s = ckpt_load(g_comm, path, &l, err, sizeof err);
    ckpt_list_free(&l);
    if (s) die(3, "%s", err);
    pairs_params_changed(&r->m);
    r->step = (int)h.state.step;
    r->rng = h.state.rng;
    r->tokens_seen = h.state.tokens_seen;
    const ckpt_train *a = &h.train, *b = &want.train;
    /* even with --quiet: another rank count with the same --batch silently changes the optimisation */
    if (g_rank == 0 && (long long)a->ranks * a->batch != (long long)b->ranks * b->batch)
        printf("note: global batch %d = %d ranks x --batch %d (the checkpoint's run used %d = %d x %d)\n",
               b->ranks * b->batch, b->ranks, b->batch, a->ranks * a->batch, a->ranks, a->batch);
    for (int i = 0; i < r->m.n_pairs; i++) SC(scmoe_pair_set_noise_state(r->m.pairs[i], h.state.noise_state));
    if (g_rank == 0 && !O.quiet) {
        printf("resumed %s at step %d\n", path, r->step);
        if (a->lr != b->lr) printf("note: --lr %g (the checkpoint's run used %g)\n", b->lr, a->lr);
        if (a->steps != b->steps) printf("note: --steps %d (the checkpoint's run used %d)\n", b->steps, a->steps);
        if (a->warmup != b->warmup) printf("note: --warmup %d (the checkpoint's run used %d)\n", b->warmup, a->warmup);
        if (a->seed != b->seed)
            printf("note: --seed %llu (the checkpoint's run used %llu)\n", (unsigned long long)b->seed,
                   (unsigned long long)a->seed);
    }
}

/* ---- main ---- */

/* "0-3,8" from a CPU set */
static void cpu_list(const cpu_set_t *set, char *buf, size_t n) {
    size_t k = 0;
    buf[0] = 0;
    for (int c = 0; c < CPU_SETSIZE && k + 24 < n; c++) {
        if (!CPU_ISSET(c, set)) continue;
        int e = c;
        while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, set)) e++;
        k += (size_t)snprintf(buf + k, n - k, k ? ",%d" : "%d", c);
        if (e > c) k += (size_t)snprintf(buf + k, n - k, "-%d", e);
        c = e;
    }
}

/* Every rank's CPU mask and thread count, printed by rank 0 in rank order. A rank with fewer CPUs than
 * OpenMP threads time-slices them on shared cores (mpirun binds each rank to one core unless told
 * --map-by slot:PE=N; srun since Slurm 22.05 needs --cpus-per-task itself): that is warned about even
 * with --quiet. */
static void print_binding(void) {
    enum { LIST = 200, HOST = 56 };
    struct {
        int cpus, threads;
        char host[HOST], list[LIST];
    } me, *all = NULL;
    memset(&me, 0, sizeof me);
    cpu_set_t set;
    CPU_ZERO(&set);
    me.threads = omp_get_max_threads();
    /* With OMP_PROC_BIND the runtime has already pinned this (initial) thread to the first place, so
     * its own mask shows one core: the rank's CPUs are then the union of OpenMP's places, which the
     * runtime took from the process's mask at start. Without places, the thread's mask is the rank's. */
    int places = omp_get_num_places(), got = 1;
    if (places > 0) {
        for (int p = 0; p < places; p++) {
            int ids[CPU_SETSIZE], n = omp_get_place_num_procs(p);
            if (n > CPU_SETSIZE) n = 0;
            omp_get_place_proc_ids(p, ids);
            for (int i = 0; i < n; i++)
                if (ids[i] >= 0 && ids[i] < CPU_SETSIZE) CPU_SET(ids[i], &set);
        }
    } else {
        got = sched_getaffinity(0, sizeof set, &set) == 0;
    }
    if (got) {
        me.cpus = CPU_COUNT(&set);
        cpu_list(&set, me.list, sizeof me.list);
    } else {
        snprintf(me.list, sizeof me.list, "unknown");
    }
    gethostname(me.host, sizeof me.host - 1);
    if (g_rank == 0) all = xcalloc((size_t)g_size, sizeof me);
    MPI_Gather(&me, (int)sizeof me, MPI_BYTE, all, (int)sizeof me, MPI_BYTE, 0, g_comm);
    if (g_rank != 0) return;
    for (int r = 0; r < g_size; r++) {
        if (!O.quiet)
            printf("rank %d on %s: CPUs %s (%d) for %d OpenMP threads\n", r, all[r].host, all[r].list, all[r].cpus,
                   all[r].threads);
        if (all[r].cpus > 0 && all[r].cpus < all[r].threads)
            printf("warning: rank %d has %d OpenMP threads on %d CPU(s): they share cores. Bind each rank to "
                   "OMP_NUM_THREADS cores: mpirun --map-by slot:PE=N --bind-to core, or srun --cpus-per-task=N "
                   "(see docs/env.md)\n",
                   r, all[r].threads, all[r].cpus);
    }
    fflush(stdout);
    free(all);
}

/* seconds as "m:ss" or "h:mm:ss" */
static void hms(double t, char *buf, size_t n) {
    long s = t > 0 && t < 1e9 ? (long)(t + 0.5) : 0;
    if (s >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
    else snprintf(buf, n, "%ld:%02ld", s / 60, s % 60);
}

static const char *arch_label(char *buf, size_t n) {
    if (O.arch == SCMOE_ARCH_SCMOE) snprintf(buf, n, "scmoe-pos%d", O.pos);
    else snprintf(buf, n, "%s", ARCH_NAMES[O.arch]);
    return buf;
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    /* while the library's context lives MPI_COMM_WORLD returns errors (scmoe_mpi.h: OpenMPI reports a
     * failed exchange of the library there); train_lm's own unchecked collectives run on a duplicate
     * that keeps aborting on an error */
    MPI_Comm_dup(MPI_COMM_WORLD, &g_comm);
    MPI_Comm_set_errhandler(g_comm, MPI_ERRORS_ARE_FATAL);
    parse_args(argc, argv);

    run r;
    memset(&r, 0, sizeof r);
    r.ep_eff = O.ep_size ? O.ep_size : g_size;
    size_t n_text, n_valtext = 0, cap = 0;
    unsigned char *text = load_text(O.data, &n_text), *valtext = NULL;
    r.data_bytes = n_text;
    r.data_crc = ckpt_crc32(0, text, n_text);
    r.n_train = n_text * 9 / 10;
    r.n_val = n_text - r.n_train;
    r.train = text;
    r.val = text + r.n_train;
    if (O.val_data) { /* all of the text trains, the other file validates */
        if (append_file(O.val_data, &valtext, &n_valtext, &cap))
            die(2, "--val-data %s: cannot read the file", O.val_data);
        r.n_train = n_text;
        r.val = valtext;
        r.n_val = n_valtext;
        if (r.n_val < (size_t)O.seq + 2)
            die(2, "--val-data: %zu bytes of text are too few for --seq %d (it needs more than seq+1 bytes)", r.n_val,
                O.seq);
    }
    if (r.n_train < (size_t)O.seq + 2 || r.n_val < (size_t)O.seq + 2)
        die(2, "--data: %zu bytes of text are too few for --seq %d (each split needs more than seq+1 bytes)", n_text,
            O.seq);
    r.rng = (uint64_t)O.seed * 0x2545F4914F6CDD1Dull + 1;

    SC(scmoe_context_create_mpi(MPI_COMM_WORLD, &g_ctx));
    print_binding();
    model_init(&r.m, g_ctx);
    if (O.resume) resume(&r);

    FILE *log = NULL;
    int log_ok = 1; /* rank 0 writes the log; if it cannot, every rank must stop */
    /* a resumed run continues the log of the run it resumes */
    if (O.log && g_rank == 0) log_ok = (log = fopen(O.log, O.resume ? "a" : "w")) != NULL;
    MPI_Bcast(&log_ok, 1, MPI_INT, 0, g_comm);
    if (!log_ok) die(2, "--log %s: cannot create the file", O.log);

    char label[32];
    arch_label(label, sizeof label);
    int last = O.stop_at ? O.stop_at : O.steps;
    if (g_rank == 0 && !O.quiet) {
        size_t np = 0;
        for (int i = 0; i < r.m.n_params; i++)
            if (!r.m.params[i].expert) np += r.m.params[i].numel;
        printf("train_lm: %s, %d pairs, d %d, hidden %d, %d experts, %d heads, seq %d | %d ranks x batch %d x "
               "%d micro-batches | %zu replicated params + %d experts/block | text %zu bytes (%zu train, %zu val)\n",
               label, O.pairs, O.d, O.hidden, O.experts, O.heads, O.seq, g_size, O.batch, O.grad_accum, np, O.experts,
               n_text, r.n_train, r.n_val);
        fflush(stdout);
    }
    double val = NAN;
    if (O.eval_every > 0 && r.step == 0 && last > 0) {
        val = evaluate(&r);
        if (g_rank == 0 && !O.quiet) printf("step %5d/%d | val %.4f\n", 0, last, val);
    }

    /* totals for the summary, and the window since the last progress line */
    step_info si, win = {0}, tot = {0};
    int win_steps = 0, tot_steps = 0, first_step = r.step;
    double final_loss = NAN, t_start = MPI_Wtime();
    while (r.step < last) {
        train_step(&r, &si);
        int s = r.step;
        int do_eval = (O.eval_every > 0 && s % O.eval_every == 0) || s == last;
        double v = do_eval ? evaluate(&r) : NAN;
        if (do_eval) val = v;
        final_loss = si.loss;
        step_info *acc[2] = {&win, &tot};
        for (int k = 0; k < 2; k++) {
            acc[k]->time += si.time;
            acc[k]->exposed += si.exposed;
            acc[k]->a2a_comm += si.a2a_comm;
            acc[k]->a2a_exposed += si.a2a_exposed;
            acc[k]->grad_sync += si.grad_sync;
            acc[k]->grad_exposed += si.grad_exposed;
            acc[k]->routed += si.routed;
            acc[k]->dropped += si.dropped;
        }
        win_steps++;
        tot_steps++;
        double tok = (double)O.batch * g_size * O.seq * O.grad_accum;
        if (log) {
            fprintf(log, "{\"step\":%d,\"loss\":%.17g,\"ce\":%.17g,\"aux\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,", s,
                    si.loss, si.ce, si.aux, si.lr, si.gnorm);
            if (do_eval) fprintf(log, "\"val_loss\":%.17g,", v);
            else fprintf(log, "\"val_loss\":null,");
            fprintf(log, "\"tokens_per_s\":%.1f,\"step_ms\":%.3f,\"compute_ms\":%.3f,\"exposed_ms\":%.3f,",
                    tok / si.time, 1e3 * si.time, 1e3 * (si.time - si.exposed), 1e3 * si.exposed);
            if (si.a2a_comm > 0) fprintf(log, "\"overlap\":%.4f,", 1.0 - si.a2a_exposed / si.a2a_comm);
            else fprintf(log, "\"overlap\":null,");
            fprintf(log, "\"grad_sync_ms\":%.3f,\"grad_sync_exposed_ms\":%.3f,", 1e3 * si.grad_sync,
                    1e3 * si.grad_exposed);
            fprintf(log, "\"dropped_pct\":%.4f}\n", si.routed > 0 ? 100.0 * si.dropped / si.routed : 0.0);
            fflush(log);
        }
        if (g_rank == 0 && !O.quiet && (s % O.print_every == 0 || do_eval || s == last)) {
            char vbuf[16] = "     -", obuf[16] = "  n/a";
            if (do_eval) snprintf(vbuf, sizeof vbuf, "%6.4f", v);
            if (win.a2a_comm > 0)
                snprintf(obuf, sizeof obuf, "%4.0f%%", 100.0 * (1.0 - win.a2a_exposed / win.a2a_comm));
            double ms = 1e3 * win.time / win_steps, ex = 1e3 * win.exposed / win_steps;
            /* elapsed: this run's wall time (evaluations and saves included); ETA at this run's pace */
            double el = MPI_Wtime() - t_start;
            char ebuf[24], tbuf[24];
            hms(el, ebuf, sizeof ebuf);
            hms(el / (s - first_step) * (last - s), tbuf, sizeof tbuf);
            printf(
                "step %5d/%d | loss %6.4f | aux %6.4f | val %s | %8.0f tok/s | %7.1f ms (compute %7.1f, comm %6.1f) | "
                "overlap %s | drop %5.2f%% | lr %.2e | %s elapsed, ETA %s\n",
                s, last, si.loss, si.aux, vbuf, tok * win_steps / win.time, ms, ms - ex, ex, obuf,
                win.routed > 0 ? 100.0 * win.dropped / win.routed : 0.0, si.lr, ebuf, tbuf);
            fflush(stdout);
            memset(&win, 0, sizeof win);
            win_steps = 0;
        }
        if (O.save && ((O.save_every > 0 && s % O.save_every == 0) || s == last)) save(&r);
    }
    if (isnan(val) || tot_steps == 0) val = evaluate(&r);
    if (O.save && tot_steps == 0) save(&r);

    if (g_rank == 0) {
        double tps = tot.time > 0 ? (double)O.batch * g_size * O.seq * O.grad_accum * tot_steps / tot.time : 0.0;
        char ov[16] = "n/a", ex[32] = "n/a";
        if (tot.a2a_comm > 0) snprintf(ov, sizeof ov, "%.1f%%", 100.0 * (1.0 - tot.a2a_exposed / tot.a2a_comm));
        if (tot_steps)
            snprintf(ex, sizeof ex, "%.2fms(%.1f%%)", 1e3 * tot.exposed / tot_steps, 100.0 * tot.exposed / tot.time);
        printf("\n%-12s %6s %11s %9s %9s %8s %16s\n", "arch", "steps", "train_loss", "val_loss", "tokens/s", "overlap",
               "exposed_comm");
        char tl[16] = "-"; /* no step ran (resumed at the last step): there is no training loss */
        if (tot_steps) snprintf(tl, sizeof tl, "%.4f", final_loss);
        printf("%-12s %6d %11s %9.4f %9.0f %8s %16s\n", label, r.step, tl, val, tps, ov, ex);
        fflush(stdout);
    }
    if (log) fclose(log);
    model_free(&r.m);
    free(text);
    free(valtext);
    scmoe_context_destroy(g_ctx);
    MPI_Finalize();
    return 0;
}
