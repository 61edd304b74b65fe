/* test_checkpoint.c: the checkpoint format of examples/checkpoint.c, under mpirun with 1, 2 or 4 ranks.
 *
 * A real block pair over MPI_COMM_WORLD ("W", experts spread over the ranks) and, on every rank, the
 * same pair on a private one-rank context over MPI_COMM_SELF ("S", every expert). Tensors are filled
 * from a hash of their name, so any rank knows what any tensor should hold. Checks: the layout lists
 * every expert once with its owner; W -> W, W -> S (P ranks to 1) and S -> W (1 to P) round trips;
 * truncated, bit-flipped, wrong-magic, wrong-version, config-mismatch, missing and misshapen cases each
 * give their own status; every single-bit flip and every truncation of a file is rejected (never a
 * crash); a save that fails halfway (SCMOE_CKPT_FAIL=half) or cannot create its directory leaves the
 * previous checkpoint loadable and no ckpt.tmp behind. */
#include "../examples/checkpoint.h"
#include "../scmoe.h"
#include "../scmoe_mpi.h"
#include "mpi_check.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int rank, size;

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}
static float value_of(const char *name, int seed, size_t i) {
    uint64_t z = hash_str(name) ^ ((uint64_t)seed * 0x9E3779B97F4A7C15ull) ^ (i * 0xBF58476D1CE4E5B9ull);
    z = (z ^ (z >> 29)) * 0x94D049BB133111EBull;
    return (float)((double)(z >> 40) / 16777216.0 - 0.5);
}

/* The model of the test: one extra replicated tensor "emb" and one pair, parameters and one moment
 * ("#m") each, as train_lm lists them. */
typedef struct model {
    scmoe_pair *p;
    float emb[15], *mom; /* mom: one moment per pair parameter, in the pair's order */
    size_t *mom_off;
} model;

static void model_make(model *m, scmoe_context *ctx, const scmoe_config *c) {
    memset(m, 0, sizeof *m);
    if (scmoe_pair_create(ctx, c, &m->p)) {
        fprintf(stderr, "pair create failed: %s\n", scmoe_last_error(ctx));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int n = scmoe_pair_param_count(m->p);
    size_t total = 0;
    m->mom_off = calloc((size_t)n + 1, sizeof *m->mom_off);
    for (int i = 0; i < n; i++) {
        scmoe_tensor t;
        scmoe_pair_param_at(m->p, i, &t);
        m->mom_off[i] = total;
        total += t.numel;
    }
    m->mom = calloc(total + 1, sizeof(float));
}
static void model_free(model *m) {
    scmoe_pair_destroy(m->p);
    free(m->mom);
    free(m->mom_off);
}

static void build_list(model *m, int n_experts, ckpt_list *l) {
    ckpt_list_add(l, "emb", 2, (int[]){5, 3}, -1, m->emb);
    ckpt_pair_tensor *pt;
    int n = ckpt_pair_layout(m->p, n_experts, &pt);
    for (int k = 0; k < n; k++) {
        scmoe_tensor t = {0};
        if (pt[k].local >= 0) scmoe_pair_param_at(m->p, pt[k].local, &t);
        char name[CKPT_NAME_MAX + 8];
        snprintf(name, sizeof name, "pair0.%s", pt[k].name);
        ckpt_list_add(l, name, pt[k].ndim, pt[k].shape, pt[k].owner, t.data);
        snprintf(name, sizeof name, "pair0.%s#m", pt[k].name);
        ckpt_list_add(l, name, pt[k].ndim, pt[k].shape, pt[k].owner,
                      pt[k].local >= 0 ? m->mom + m->mom_off[pt[k].local] : NULL);
    }
    free(pt);
}

/* fill (seed > 0) or zero (seed 0) every tensor held, by name */
static void fill(const ckpt_list *l, int seed) {
    for (int i = 0; i < l->n; i++)
        if (l->e[i].data)
            for (size_t j = 0; j < l->e[i].numel; j++) l->e[i].data[j] = seed ? value_of(l->e[i].name, seed, j) : 0.0f;
}
/* 1 if every tensor held matches fill(seed) exactly */
static int holds(const ckpt_list *l, int seed) {
    for (int i = 0; i < l->n; i++)
        if (l->e[i].data)
            for (size_t j = 0; j < l->e[i].numel; j++)
                if (l->e[i].data[j] != value_of(l->e[i].name, seed, j)) return 0;
    return 1;
}

static ckpt_header header(uint64_t step) {
    ckpt_header h;
    memset(&h, 0, sizeof h);
    h.model = (ckpt_model){SCMOE_ARCH_SCMOE, 2, 0, 0, 16, 32, 4, 2, 1, 8, 256};
    h.train = (ckpt_train){size, 4, 0, 1, 5, 20, 3e-3f, 2.0f, 0.01f, 0.1f, 1.0f, 1234};
    h.state = (ckpt_state){step, 0xDEADBEEFCAFEF00Dull, 1000 * step, 12345, 0xABCD1234u, 3 * step + 1};
    return h;
}

static long file_size(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}
static unsigned char *read_all(const char *path, long *n) {
    *n = file_size(path);
    FILE *f = fopen(path, "rb");
    if (!f || *n < 0) {
        if (f) fclose(f);
        return NULL;
    }
    unsigned char *b = malloc((size_t)*n + 1);
    if (b && fread(b, 1, (size_t)*n, f) != (size_t)*n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    return b;
}
static void write_all(const char *path, const unsigned char *b, long n) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(b, 1, (size_t)n, f);
        fclose(f);
    }
}

/* rank 0 writes a modified copy of the good file to dir/ckpt.bin; then every rank loads it */
static ckpt_status load_variant(const char *dir, const unsigned char *good, long n, long keep, long flip_byte,
                                int flip_bit, const ckpt_list *l, char *err, size_t len) {
    if (rank == 0) {
        unsigned char *b = malloc((size_t)n + 1);
        memcpy(b, good, (size_t)n);
        if (flip_byte >= 0) b[flip_byte] ^= (unsigned char)(1u << flip_bit);
        mkdir(dir, 0777);
        char p[4096];
        write_all(ckpt_path(p, sizeof p, dir), b, keep);
        free(b);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    char p[4096];
    return ckpt_load(MPI_COMM_WORLD, ckpt_path(p, sizeof p, dir), l, err, len);
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const int E = 4;
    if (E % size) {
        if (rank == 0) printf("not ok - %d ranks do not divide the test's %d experts\n0 passed, 1 failed\n", size, E);
        MPI_Finalize();
        return 1;
    }

    /* a scratch directory, made by rank 0, removed at the end */
    char root[256] = "/tmp/scmoe_ckpt_XXXXXX";
    if (rank == 0 && !mkdtemp(root)) {
        perror("mkdtemp");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Bcast(root, sizeof root, MPI_CHAR, 0, MPI_COMM_WORLD);
    char d1[300], d2[300], dv[300], p1[4096], p2[4096], pv[4096];
    snprintf(d1, sizeof d1, "%s/a", root);
    snprintf(d2, sizeof d2, "%s/b", root);
    snprintf(dv, sizeof dv, "%s/v", root);
    ckpt_path(p1, sizeof p1, d1);
    ckpt_path(p2, sizeof p2, d2);
    ckpt_path(pv, sizeof pv, dv);

    scmoe_config c = scmoe_config_default();
    c.d_model = 16;
    c.d_hidden = 32;
    c.n_experts = E;
    c.n_heads = 2;
    c.max_seq_len = 8;
    c.max_tokens = 16;
    c.arch = SCMOE_ARCH_SCMOE;
    scmoe_context *cw, *cs;
    if (scmoe_context_create_mpi(MPI_COMM_WORLD, &cw) || scmoe_context_create_mpi(MPI_COMM_SELF, &cs))
        MPI_Abort(MPI_COMM_WORLD, 1);
    model W, S;
    model_make(&W, cw, &c);
    model_make(&S, cs, &c);
    ckpt_list lw = {0}, ls = {0};
    build_list(&W, E, &lw);
    build_list(&S, E, &ls);
    char err[512];

    /* ---- the layout ---- */
    {
        int n = lw.n, lo, hi, held = 0, owned_ok = 1, names_ok = lw.n == ls.n;
        MPI_Allreduce(&n, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(&n, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        for (int i = 0; i < lw.n; i++) {
            const ckpt_entry *e = &lw.e[i];
            if (names_ok) names_ok = strcmp(e->name, ls.e[i].name) == 0;
            if (e->owner >= 0 && e->data) held++;
            if (e->owner == rank && !e->data) owned_ok = 0; /* the owner holds it */
            if (e->owner < 0 && !e->data) owned_ok = 0;     /* replicated: everyone */
        }
        int all_held;
        MPI_Allreduce(&held, &all_held, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        int expert_entries = 0;
        for (int i = 0; i < ls.n; i++) expert_entries += ls.e[i].owner >= 0;
        check(lo == hi && names_ok, "every rank lists the same %d tensors, the 1-rank list too, in the same order",
              lw.n);
        check(owned_ok && all_held == expert_entries,
              "each expert tensor is held by exactly its owner (%d expert records)", expert_entries);
    }

    /* ---- round trips ---- */
    fill(&lw, 1);
    ckpt_header h1 = header(10), hr;
    ckpt_status s = ckpt_save(MPI_COMM_WORLD, d1, &h1, &lw, err, sizeof err);
    check(s == CKPT_OK, "save with %d ranks (%s)", size, s ? err : "ok");
    check(access(p1, R_OK) == 0 && file_size(p1) > 0, "the file exists");
    s = ckpt_read_header(p1, &hr, err, sizeof err);
    check(s == CKPT_OK && hr.version == CKPT_VERSION && hr.state.step == 10 && hr.state.rng == h1.state.rng &&
              hr.state.tokens_seen == 10000 && hr.state.data_crc == h1.state.data_crc && hr.state.noise_state == 31 &&
              hr.train.lr == h1.train.lr && hr.train.seed == 1234 && hr.n_records == (uint32_t)lw.n &&
              hr.file_bytes == (uint64_t)file_size(p1) && ckpt_model_compare(&hr.model, &h1.model, NULL, 0) == CKPT_OK,
          "the header round-trips (step, RNG, data position, gate-noise state, config, record count, size)");
    fill(&lw, 0);
    s = ckpt_load(MPI_COMM_WORLD, p1, &lw, err, sizeof err);
    check(s == CKPT_OK && holds(&lw, 1), "load with the same ranks: every tensor back, bit for bit (%s)",
          s ? err : "ok");

    /* P -> 1: every rank loads the whole model on its own */
    fill(&ls, 0);
    s = ckpt_load(MPI_COMM_SELF, p1, &ls, err, sizeof err);
    check(s == CKPT_OK && holds(&ls, 1), "saved by %d ranks, loaded by 1: every expert found (%s)", size,
          s ? err : "ok");

    /* 1 -> P: rank 0 saves its one-rank model, then everyone loads it over the world */
    fill(&ls, 2);
    s = CKPT_OK;
    if (rank == 0) s = ckpt_save(MPI_COMM_SELF, d2, &h1, &ls, err, sizeof err);
    MPI_Barrier(MPI_COMM_WORLD);
    check(s == CKPT_OK, "save with 1 rank (%s)", s ? err : "ok");
    fill(&lw, 0);
    s = ckpt_load(MPI_COMM_WORLD, p2, &lw, err, sizeof err);
    check(s == CKPT_OK && holds(&lw, 2), "saved by 1 rank, loaded by %d: each rank takes its experts (%s)", size,
          s ? err : "ok");
    fill(&lw, 1);

    /* ---- damaged files: each its own status ---- */
    long n;
    unsigned char *good = read_all(p1, &n);
    check(good != NULL && n > 200, "read the good file back (%ld bytes)", n);
    if (!good) {
        MPI_Finalize();
        return 1;
    }
    s = load_variant(dv, good, n, n / 2, -1, 0, &lw, err, sizeof err);
    check(s == CKPT_ERR_TRUNCATED && strstr(err, "truncated"), "truncated to half: \"%s\"", err);
    s = load_variant(dv, good, n, 20, -1, 0, &lw, err, sizeof err);
    check(s == CKPT_ERR_TRUNCATED, "truncated inside the header: \"%s\"", err);
    s = load_variant(dv, good, n, 0, -1, 0, &lw, err, sizeof err);
    check(s == CKPT_ERR_TRUNCATED, "empty file: \"%s\"", err);
    s = load_variant(dv, good, n, n, n / 2, 3, &lw, err, sizeof err);
    check(s == CKPT_ERR_CORRUPT && strstr(err, "checksum mismatch in record"), "one bit flipped in a tensor: \"%s\"",
          err);
    s = load_variant(dv, good, n, n, 60, 0, &lw, err, sizeof err);
    check(s == CKPT_ERR_CORRUPT && strstr(err, "header checksum"), "one bit flipped in the header: \"%s\"", err);
    s = load_variant(dv, good, n, n, 0, 1, &lw, err, sizeof err);
    check(s == CKPT_ERR_MAGIC && strstr(err, "magic"), "wrong magic: \"%s\"", err);
    {
        unsigned char *b = malloc((size_t)n);
        memcpy(b, good, (size_t)n);
        b[8] = CKPT_VERSION + 1; /* a version from the future, little-endian u32 at byte 8 */
        s = load_variant(dv, b, n, n, -1, 0, &lw, err, sizeof err);
        free(b);
    }
    check(s == CKPT_ERR_VERSION && strstr(err, "version 3"), "wrong version: \"%s\"", err);
    {
        /* a version 1 file: the same without the 8 bytes of gate-noise state after data_crc (header
         * offset 148), with its version, header size, file size and header checksum rewritten */
        enum { NOISE_AT = 148, V1_HEADER = 164 };
        unsigned char *b = malloc((size_t)n);
        memcpy(b, good, NOISE_AT);
        memcpy(b + NOISE_AT, good + NOISE_AT + 8, (size_t)n - NOISE_AT - 8);
        uint64_t fb = (uint64_t)n - 8;
        b[8] = 1;
        b[12] = V1_HEADER;
        for (int i = 0; i < 8; i++) b[NOISE_AT + 4 + i] = (unsigned char)(fb >> (8 * i));
        uint32_t crc = ckpt_crc32(0, b, V1_HEADER - 4);
        for (int i = 0; i < 4; i++) b[V1_HEADER - 4 + i] = (unsigned char)(crc >> (8 * i));
        fill(&lw, 0);
        s = load_variant(dv, b, n - 8, n - 8, -1, 0, &lw, err, sizeof err);
        ckpt_header hv;
        char pv[4096];
        ckpt_status sh = ckpt_read_header(ckpt_path(pv, sizeof pv, dv), &hv, err, sizeof err);
        free(b);
        check(s == CKPT_OK && holds(&lw, 1) && sh == CKPT_OK && hv.version == 1 && hv.state.step == 10 &&
                  hv.state.noise_state == 10 && hv.state.data_crc == h1.state.data_crc,
              "a version 1 file still loads, bit for bit, its gate-noise state taken as its step (%s)", s ? err : "ok");
        fill(&lw, 1);
    }
    {
        ckpt_header hh;
        ckpt_model other = h1.model;
        other.d_model = 32;
        s = ckpt_read_header(p1, &hh, err, sizeof err);
        if (!s) s = ckpt_model_compare(&hh.model, &other, err, sizeof err);
        check(s == CKPT_ERR_CONFIG && strstr(err, "d_model is 16 in the checkpoint, 32 here"),
              "config mismatch: \"%s\"", err);
    }
    s = ckpt_load(MPI_COMM_WORLD, "/nonexistent/ckpt.bin", &lw, err, sizeof err);
    check(s == CKPT_ERR_OPEN, "no such file: \"%s\"", err);
    {
        float extra[3];
        ckpt_list l2 = {0};
        for (int i = 0; i < lw.n; i++)
            ckpt_list_add(&l2, lw.e[i].name, lw.e[i].ndim, lw.e[i].shape, lw.e[i].owner, lw.e[i].data);
        ckpt_list_add(&l2, "not_in_file", 1, (int[]){3}, -1, extra);
        s = ckpt_load(MPI_COMM_WORLD, p1, &l2, err, sizeof err);
        check(s == CKPT_ERR_MISSING && strstr(err, "not_in_file"), "a tensor missing from the file: \"%s\"", err);
        ckpt_list_free(&l2);
        for (int i = 0; i < lw.n; i++)
            ckpt_list_add(&l2, lw.e[i].name, lw.e[i].ndim, lw.e[i].shape, lw.e[i].owner, lw.e[i].data);
        l2.e[0].shape[0] = 3;
        l2.e[0].shape[1] = 5; /* emb 5x3 asked for as 3x5 */
        s = ckpt_load(MPI_COMM_WORLD, p1, &l2, err, sizeof err);
        check(s == CKPT_ERR_MISSING && strstr(err, "another shape"), "a tensor of another shape: \"%s\"", err);
        ckpt_list_free(&l2);
    }
    fill(&lw, 1);

    /* ---- every single-bit flip and every truncation is rejected, never a crash (each rank alone) ---- */
    {
        char mine[320], mp[4096];
        snprintf(mine, sizeof mine, "%s/fuzz%d", root, rank);
        mkdir(mine, 0777);
        ckpt_path(mp, sizeof mp, mine);
        int flips = 0, caught = 0, cuts = 0, cut_caught = 0;
        unsigned char *b = malloc((size_t)n);
        for (long pos = rank; pos < n; pos += n / 300 + 1) {
            memcpy(b, good, (size_t)n);
            b[pos] ^= (unsigned char)(1u << (pos % 8));
            write_all(mp, b, n);
            flips++;
            caught += ckpt_load(MPI_COMM_SELF, mp, &ls, err, sizeof err) != CKPT_OK;
        }
        for (long keep = 0; keep < n; keep += n / 100 + 1) {
            write_all(mp, good, keep);
            cuts++;
            cut_caught += ckpt_load(MPI_COMM_SELF, mp, &ls, err, sizeof err) == CKPT_ERR_TRUNCATED;
        }
        free(b);
        check(flips == caught, "%d single-bit flips spread over the file: all rejected", flips);
        check(cuts == cut_caught, "%d truncations: all reported as truncated", cuts);
        unlink(mp);
        rmdir(mine);
    }

    /* ---- a save that fails: the previous checkpoint survives ---- */
    setenv("SCMOE_CKPT_FAIL", "half", 1);
    fill(&lw, 3);
    ckpt_header h2 = header(20);
    s = ckpt_save(MPI_COMM_WORLD, d1, &h2, &lw, err, sizeof err);
    unsetenv("SCMOE_CKPT_FAIL");
    check(s == CKPT_ERR_WRITE && strstr(err, "injected failure"),
          "a save failing halfway reports it on every rank: \"%s\"", err);
    {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s/ckpt.tmp", d1);
        check(access(tmp, F_OK) != 0, "no ckpt.tmp left behind");
    }
    fill(&lw, 0);
    s = ckpt_read_header(p1, &hr, err, sizeof err);
    ckpt_status s2 = ckpt_load(MPI_COMM_WORLD, p1, &lw, err, sizeof err);
    check(s == CKPT_OK && s2 == CKPT_OK && hr.state.step == 10 && holds(&lw, 1),
          "after the failed save the previous checkpoint (step 10) still loads intact");
    s = ckpt_save(MPI_COMM_WORLD, "/proc/scmoe_no_such_dir/x", &h2, &lw, err, sizeof err);
    check(s == CKPT_ERR_OPEN, "a directory that cannot be created: \"%s\"", err);
    fill(&lw, 3);
    s = ckpt_save(MPI_COMM_WORLD, d1, &h2, &lw, err, sizeof err);
    fill(&lw, 0);
    if (!s) s = ckpt_load(MPI_COMM_WORLD, p1, &lw, err, sizeof err);
    check(s == CKPT_OK && holds(&lw, 3), "the next save replaces it");

    /* ---- a symlink planted at DIR/ckpt.tmp (issue 18): the save must not write through it ---- */
    {
        char tmp[4096], victim[4096];
        snprintf(tmp, sizeof tmp, "%s/ckpt.tmp", d1);
        snprintf(victim, sizeof victim, "%s/victim", root);
        static const char canary[] = "not a checkpoint: must survive";
        if (rank == 0) {
            FILE *f = fopen(victim, "wb");
            if (f) {
                fwrite(canary, 1, sizeof canary, f);
                fclose(f);
            }
            if (symlink(victim, tmp) != 0) perror("symlink");
        }
        MPI_Barrier(MPI_COMM_WORLD);
        fill(&lw, 4);
        s = ckpt_save(MPI_COMM_WORLD, d1, &h2, &lw, err, sizeof err);
        int ok = 1;
        if (rank == 0) {
            long n = 0;
            unsigned char *v = read_all(victim, &n);
            struct stat st;
            ok = v && n == (long)sizeof canary && memcmp(v, canary, sizeof canary) == 0 && lstat(p1, &st) == 0 &&
                 S_ISREG(st.st_mode) && lstat(tmp, &st) != 0;
            free(v);
            unlink(victim);
        }
        fill(&lw, 0);
        ckpt_status sl = s ? s : ckpt_load(MPI_COMM_WORLD, p1, &lw, err, sizeof err);
        check(s == CKPT_OK && sl == CKPT_OK && holds(&lw, 4) && ok,
              "a symlink planted at DIR/ckpt.tmp: the save succeeds, the link's target is untouched, ckpt.bin is a "
              "regular file and loads (%s)",
              s || sl ? err : "ok");
    }

    /* ---- clean up ---- */
    free(good);
    ckpt_list_free(&lw);
    ckpt_list_free(&ls);
    model_free(&W);
    model_free(&S);
    scmoe_context_destroy(cw);
    scmoe_context_destroy(cs);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        const char *dirs[] = {d1, d2, dv};
        for (int i = 0; i < 3; i++) {
            char p[4096];
            unlink(ckpt_path(p, sizeof p, dirs[i]));
            rmdir(dirs[i]);
        }
        rmdir(root);
        printf("%d passed, %d failed\n", check_passed, check_failed);
    }
    MPI_Finalize();
    return check_failed ? 1 : 0;
}
