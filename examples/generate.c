/* generate.c: samples text from a train_lm checkpoint, with the MoE blocks in inference mode.
 *
 *   [mpirun -np P] generate --ckpt DIR [--prompt TEXT] [--tokens N] [--temperature F] [--top-k K] [--seed S]
 *
 * The model is rebuilt from the checkpoint's header (train_lm.c describes it) and its parameters are
 * loaded by name, so any rank count P whose expert-parallel size divides n_experts works. Rank 0 holds
 * the text: every new byte runs the last seq_len bytes through the model (batch 1; there is no KV
 * cache, the window is recomputed) and samples from the last position's logits. The other ranks join
 * every forward with batch 0: they hold experts, and the MoE's exchanges need them. */
#include "../scmoe.h"
#include "../scmoe_mpi.h"
#include "checkpoint.h"
#include "model.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_rank, g_size;
static scmoe_context *g_ctx;

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...) {
    if (g_rank == 0) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "generate: ");
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        va_end(ap);
    }
    MPI_Finalize();
    exit(code);
}

#define SC(call)                                                                                                       \
    do {                                                                                                               \
        scmoe_status s_ = (call);                                                                                      \
        if (s_) die(1, "%s: %s (%s)", #call, scmoe_strerror(s_), g_ctx ? scmoe_last_error(g_ctx) : "");                \
    } while (0)

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) {
        fprintf(stderr, "generate: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    return p;
}

/* ---- options ---- */

static const char *o_ckpt, *o_prompt = "/* ";
static int o_tokens = 256, o_top_k = 40, o_ep_size = 0;
static double o_temperature = 0.8;
static long long o_seed = 1;

static void help(void) {
    printf("usage: [mpirun -np P] generate --ckpt DIR [flags]\n"
           "  --ckpt DIR          checkpoint directory written by train_lm --save (required)\n"
           "  --prompt TEXT       text to continue (default \"/* \")\n"
           "  --tokens N          bytes to generate (default 256)\n"
           "  --temperature F     softmax temperature; 0 = greedy (default 0.8)\n"
           "  --top-k K           sample among the K most likely bytes; 0 = all (default 40)\n"
           "  --seed S            sampling seed (default 1)\n"
           "  --ep-size N         ranks per expert-parallel group (default 0: all ranks)\n"
           "  --help              this list\n");
}

static long long int_arg(const char *flag, const char *v, long long lo, long long hi) {
    char *end;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end) die(2, "%s '%s' is not an integer (see --help)", flag, v);
    if (x < lo || x > hi) die(2, "%s %s is out of range [%lld, %lld] (see --help)", flag, v, lo, hi);
    return x;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (g_rank == 0) help();
            MPI_Finalize();
            exit(0);
        }
        int known = !strcmp(a, "--ckpt") || !strcmp(a, "--prompt") || !strcmp(a, "--tokens") ||
                    !strcmp(a, "--temperature") || !strcmp(a, "--top-k") || !strcmp(a, "--seed") ||
                    !strcmp(a, "--ep-size");
        if (!known) die(2, "unknown flag '%s' (see --help)", a);
        if (i + 1 >= argc) die(2, "%s needs a value (see --help)", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--ckpt")) o_ckpt = v;
        else if (!strcmp(a, "--prompt")) o_prompt = v;
        else if (!strcmp(a, "--tokens")) o_tokens = (int)int_arg(a, v, 0, 1 << 24);
        else if (!strcmp(a, "--top-k")) o_top_k = (int)int_arg(a, v, 0, 256);
        else if (!strcmp(a, "--seed")) o_seed = int_arg(a, v, 0, 9200000000000000000LL);
        else if (!strcmp(a, "--ep-size")) o_ep_size = (int)int_arg(a, v, 0, 1 << 20);
        else {
            char *end;
            o_temperature = strtod(v, &end);
            if (end == v || *end || !isfinite(o_temperature) || o_temperature < 0 || o_temperature > 100)
                die(2, "--temperature '%s': need a number in [0, 100] (see --help)", v);
        }
    }
    if (!o_ckpt) die(2, "--ckpt DIR is required (see --help)");
    if (!*o_prompt) die(2, "--prompt must not be empty (see --help)");
}

/* ---- sampling ---- */

static uint64_t rng_next(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* p ~ softmax(z / temperature) over the top_k largest z (ties at the cut all kept); argmax if temperature is 0 */
static int sample(const float *z, int V, double temperature, int top_k, uint64_t *rng) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    if (temperature <= 0) return best;
    float cut = -INFINITY, sorted[256];
    if (top_k > 0 && top_k < V) {
        memcpy(sorted, z, sizeof(float) * V);
        qsort(sorted, V, sizeof(float), cmp_desc);
        cut = sorted[top_k - 1];
    }
    double p[256], sum = 0.0;
    for (int v = 0; v < V; v++) {
        p[v] = z[v] >= cut ? exp((z[v] - z[best]) / temperature) : 0.0;
        sum += p[v];
    }
    double u = (double)(rng_next(rng) >> 11) / 9007199254740992.0 * sum;
    for (int v = 0; v < V; v++) {
        if (u < p[v]) return v;
        u -= p[v];
    }
    return best;
}

/* ---- main ---- */

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    parse_args(argc, argv);

    char path[4096], err[512];
    ckpt_path(path, sizeof path, o_ckpt);
    ckpt_header h;
    ckpt_status cs = ckpt_agree(MPI_COMM_WORLD, ckpt_read_header(path, &h, err, sizeof err), err, sizeof err);
    if (cs) die(3, "%s", err);
    const ckpt_model *M = &h.model;
    int V = M->vocab, T = M->seq_len, d = M->d_model;
    if (V != 256 || T < 1 || T > 1 << 16 || d < 1 || d > 1 << 16 || M->n_pairs < 1 || M->n_pairs > 256)
        die(3, "checkpoint %s describes a model this program cannot build (vocab %d, seq %d, d %d, %d pairs)", path, V,
            T, d, M->n_pairs);
    int ep = o_ep_size ? o_ep_size : g_size;
    if (g_size % ep || M->n_experts % ep)
        die(2, "the checkpoint's %d experts need an expert-parallel size dividing them and the %d ranks (--ep-size)",
            M->n_experts, g_size);

    /* the model, shaped by the header */
    SC(scmoe_context_create_mpi(MPI_COMM_WORLD, &g_ctx));
    float *wte = xcalloc((size_t)V * d, sizeof(float)), *wpe = xcalloc((size_t)T * d, sizeof(float));
    float *lnf_w = xcalloc((size_t)d, sizeof(float)), *lnf_b = xcalloc((size_t)d, sizeof(float));
    scmoe_pair **pairs = xcalloc((size_t)M->n_pairs, sizeof *pairs);
    scmoe_config base = scmoe_config_default();
    base.max_tokens = T;
    base.ep_size = o_ep_size;
    scmoe_config c = lm_pair_config(M, &base);
    if (scmoe_config_validate(&c, err, sizeof err)) die(3, "checkpoint %s: its model is not valid: %s", path, err);
    ckpt_list l = {0};
    int bad = 0;
    bad |= ckpt_list_add(&l, "wte", 2, (int[]){V, d}, -1, wte);
    bad |= ckpt_list_add(&l, "wpe", 2, (int[]){T, d}, -1, wpe);
    bad |= ckpt_list_add(&l, "lnf.weight", 1, (int[]){d}, -1, lnf_w);
    bad |= ckpt_list_add(&l, "lnf.bias", 1, (int[]){d}, -1, lnf_b);
    for (int i = 0; i < M->n_pairs; i++) {
        SC(scmoe_pair_create(g_ctx, &c, &pairs[i]));
        SC(scmoe_pair_set_training(pairs[i], 0)); /* inference: eval capacity, no caches for backward */
        ckpt_pair_tensor *pt;
        int n = ckpt_pair_layout(pairs[i], M->n_experts, &pt);
        if (n < 0) die(1, "cannot list the tensors of pair %d", i);
        for (int k = 0; k < n; k++) {
            scmoe_tensor t = {0};
            if (pt[k].local >= 0) SC(scmoe_pair_param_at(pairs[i], pt[k].local, &t));
            char name[CKPT_NAME_MAX + 32];
            snprintf(name, sizeof name, "pair%d.%s", i, pt[k].name);
            bad |= ckpt_list_add(&l, name, pt[k].ndim, pt[k].shape, pt[k].owner, t.data);
        }
        free(pt);
    }
    if (bad) die(1, "cannot build the tensor list");
    cs = ckpt_load(MPI_COMM_WORLD, path, &l, err, sizeof err);
    ckpt_list_free(&l);
    if (cs) die(3, "%s", err);

    /* the text so far, and the buffers of one window */
    size_t n_prompt = strlen(o_prompt), len = n_prompt, cap = n_prompt + (size_t)o_tokens;
    unsigned char *text = xcalloc(cap + 1, 1);
    memcpy(text, o_prompt, n_prompt);
    float *xa = xcalloc((size_t)T * d, sizeof(float)), *xb = xcalloc((size_t)T * d, sizeof(float));
    float *h_last = xcalloc((size_t)d, sizeof(float)), logits[256];
    uint64_t rng = (uint64_t)o_seed;
    if (g_rank == 0) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
    }
    for (int step = 0; step < o_tokens; step++) {
        int Tw = len < (size_t)T ? (int)len : T; /* the same on every rank: the length is deterministic */
        const unsigned char *w = text + len - (size_t)Tw;
        int B = g_rank == 0 ? 1 : 0;
        if (B)
            for (int t = 0; t < Tw; t++)
                for (int j = 0; j < d; j++) xa[(size_t)t * d + j] = wte[(size_t)w[t] * d + j] + wpe[(size_t)t * d + j];
        float *x = xa, *y = xb;
        for (int i = 0; i < M->n_pairs; i++) {
            SC(scmoe_pair_forward(pairs[i], B, Tw, x, y, NULL));
            float *s = x;
            x = y;
            y = s;
        }
        if (g_rank == 0) {
            /* LN_f and the tied head, at the last position only */
            const float *xl = x + (size_t)(Tw - 1) * d;
            float mu = 0.0f, var = 0.0f;
            for (int j = 0; j < d; j++) mu += xl[j];
            mu /= (float)d;
            for (int j = 0; j < d; j++) var += (xl[j] - mu) * (xl[j] - mu);
            float rs = 1.0f / sqrtf(var / (float)d + 1e-5f);
            for (int j = 0; j < d; j++) h_last[j] = (xl[j] - mu) * rs * lnf_w[j] + lnf_b[j];
            for (int v = 0; v < V; v++) {
                float z = 0.0f;
                for (int j = 0; j < d; j++) z += h_last[j] * wte[(size_t)v * d + j];
                logits[v] = z;
            }
            int c = sample(logits, V, o_temperature, o_top_k, &rng);
            text[len] = (unsigned char)c;
            /* bytes as they are, except control characters other than newline and tab */
            putchar(c == '\n' || c == '\t' || c >= 0x20 ? c : '.');
            fflush(stdout);
        }
        len++; /* rank 0 holds the byte; the others only need the length */
    }
    if (g_rank == 0) printf("\n");
    for (int i = 0; i < M->n_pairs; i++) scmoe_pair_destroy(pairs[i]);
    free(pairs);
    free(wte);
    free(wpe);
    free(lnf_w);
    free(lnf_b);
    free(text);
    free(xa);
    free(xb);
    free(h_last);
    scmoe_context_destroy(g_ctx);
    MPI_Finalize();
    return 0;
}
