/* checkpoint.c: the checkpoint format of examples/train_lm.c (layout in checkpoint.h).
 *
 * The writer and the reader serialise every field explicitly, byte by byte, little-endian, so the
 * file does not depend on struct padding or on the host's byte order. The reader never trusts a
 * length it has not checked against the file's real size, so a damaged file gives an error, never a
 * crash or a huge allocation. */
#include "checkpoint.h"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char MAGIC[8] = {'S', 'C', 'M', 'O', 'E', 'C', 'K', 'P'};
static const char END_MAGIC[8] = {'S', 'C', 'M', 'O', 'E', 'E', 'N', 'D'};
/* version 2 added the gate-noise state (u64) after data_crc; version 1 files still load */
enum {
    HEADER_BYTES_V1 = 8 + 4 + 4 + 11 * 4 + (6 * 4 + 5 * 4 + 8) + (4 * 8 + 4) + 4 + 8 + 4,
    HEADER_BYTES = HEADER_BYTES_V1 + 8,
    TRAILER_BYTES = 16
};

const char *ckpt_strerror(ckpt_status s) {
    static const char *const names[CKPT_STATUS_COUNT] = {
        "ok",        "cannot open",     "truncated",      "wrong magic",  "wrong version",
        "corrupted", "config mismatch", "missing tensor", "write failed", "out of memory"};
    return (unsigned)s < CKPT_STATUS_COUNT ? names[s] : "unknown checkpoint status";
}

static ckpt_status fail(char *err, size_t len, ckpt_status s, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static ckpt_status fail(char *err, size_t len, ckpt_status s, const char *fmt, ...) {
    if (err && len) {
        int n = snprintf(err, len, "checkpoint %s: ", ckpt_strerror(s));
        if (n >= 0 && (size_t)n < len) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(err + n, len - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return s;
}

/* ---- CRC-32, reflected polynomial 0xEDB88320 (zlib's) ---- */

uint32_t ckpt_crc32(uint32_t crc, const void *buf, size_t n) {
    static uint32_t table[256];
    static int ready;
    if (!ready) { /* benign race: every thread computes the same table */
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        ready = 1;
    }
    const unsigned char *b = buf;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ b[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

char *ckpt_path(char *buf, size_t len, const char *dir) {
    snprintf(buf, len, "%s/%s", dir, CKPT_FILE);
    return buf;
}

/* ---- the tensor list ---- */

int ckpt_list_add(ckpt_list *l, const char *name, int ndim, const int *shape, int owner, float *data) {
    if (strlen(name) >= CKPT_NAME_MAX || ndim < 1 || ndim > 4) return -1;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        ckpt_entry *e = realloc(l->e, sizeof *e * (size_t)cap);
        if (!e) return -1;
        l->e = e;
        l->cap = cap;
    }
    ckpt_entry *e = &l->e[l->n++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->ndim = ndim;
    e->numel = 1;
    for (int i = 0; i < ndim; i++) {
        e->shape[i] = shape[i];
        e->numel *= (size_t)shape[i];
    }
    e->owner = owner;
    e->data = data;
    return 0;
}

void ckpt_list_free(ckpt_list *l) {
    free(l->e);
    memset(l, 0, sizeof *l);
}

/* "l1.experts.12.w1" -> prefix_len 3 ("l1."), e 12, suffix "w1" */
static int parse_expert(const char *name, size_t *prefix_len, int *e, const char **suffix) {
    const char *p = strstr(name, "experts.");
    if (!p) return -1;
    char *end;
    long v = strtol(p + 8, &end, 10);
    if (end == p + 8 || *end != '.' || v < 0 || v > INT_MAX) return -1;
    *prefix_len = (size_t)(p - name);
    *e = (int)v;
    *suffix = end + 1;
    return 0;
}

int ckpt_pair_layout(const scmoe_pair *p, int n_experts, ckpt_pair_tensor **out) {
    int np = scmoe_pair_param_count(p), first = INT_MAX, last = -1, n = 0;
    *out = NULL;
    /* which experts this rank holds: a contiguous range [first, last] */
    for (int i = 0; i < np; i++) {
        scmoe_tensor t;
        scmoe_pair_param_at(p, i, &t);
        if (t.replicated) continue;
        size_t pl;
        int e;
        const char *suf;
        if (parse_expert(t.name, &pl, &e, &suf)) return -1;
        if (e < first) first = e;
        if (e > last) last = e;
    }
    if (last < 0) return -1;
    int e_local = last - first + 1;
    if (n_experts % e_local) return -1;
    ckpt_pair_tensor *r = calloc((size_t)np * n_experts + (size_t)np, sizeof *r);
    if (!r) return -1;
    /* replicated tensors first, in the pair's order */
    for (int i = 0; i < np; i++) {
        scmoe_tensor t;
        scmoe_pair_param_at(p, i, &t);
        if (!t.replicated) continue;
        ckpt_pair_tensor *c = &r[n++];
        snprintf(c->name, sizeof c->name, "%s", t.name);
        c->ndim = t.ndim;
        memcpy(c->shape, t.shape, sizeof c->shape);
        c->owner = -1;
        c->local = i;
    }
    /* then expert g's tensors, named like this rank's first expert's, for every g */
    for (int g = 0; g < n_experts; g++) {
        for (int i = 0; i < np; i++) {
            scmoe_tensor t;
            scmoe_pair_param_at(p, i, &t);
            size_t pl;
            int e;
            const char *suf;
            if (t.replicated || parse_expert(t.name, &pl, &e, &suf) || e != first) continue;
            ckpt_pair_tensor *c = &r[n++];
            snprintf(c->name, sizeof c->name, "%.*sexperts.%d.%s", (int)pl, t.name, g, suf);
            c->ndim = t.ndim;
            memcpy(c->shape, t.shape, sizeof c->shape);
            c->owner = g / e_local;
            c->local = -1;
            if (g >= first && g <= last)
                for (int j = 0; j < np; j++) {
                    scmoe_tensor u;
                    scmoe_pair_param_at(p, j, &u);
                    if (strcmp(u.name, c->name) == 0) {
                        c->local = j;
                        break;
                    }
                }
        }
    }
    *out = r;
    return n;
}

/* ---- little-endian serialisation ---- */

typedef struct buf {
    unsigned char b[HEADER_BYTES];
    size_t n;
} buf;
static void put_u32(buf *b, uint32_t v) {
    for (int i = 0; i < 4; i++) b->b[b->n++] = (unsigned char)(v >> (8 * i));
}
static void put_u64(buf *b, uint64_t v) {
    for (int i = 0; i < 8; i++) b->b[b->n++] = (unsigned char)(v >> (8 * i));
}
static void put_f32(buf *b, float f) {
    uint32_t v;
    memcpy(&v, &f, 4);
    put_u32(b, v);
}
static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const unsigned char *p) { return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }
static float get_f32(const unsigned char *p) {
    uint32_t v = get_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

static void header_encode(buf *b, const ckpt_header *h) {
    b->n = 0;
    memcpy(b->b, MAGIC, 8);
    b->n = 8;
    put_u32(b, h->version);
    put_u32(b, HEADER_BYTES);
    const ckpt_model *m = &h->model;
    int32_t mv[11] = {m->arch,      m->shortcut_pos, m->combine, m->activation, m->d_model, m->d_hidden,
                      m->n_experts, m->n_heads,      m->n_pairs, m->seq_len,    m->vocab};
    for (int i = 0; i < 11; i++) put_u32(b, (uint32_t)mv[i]);
    const ckpt_train *t = &h->train;
    int32_t tv[6] = {t->ranks, t->batch, t->ep_size, t->overlap, t->warmup, t->steps};
    for (int i = 0; i < 6; i++) put_u32(b, (uint32_t)tv[i]);
    float tf[5] = {t->lr, t->capacity_factor, t->aux_weight, t->weight_decay, t->clip};
    for (int i = 0; i < 5; i++) put_f32(b, tf[i]);
    put_u64(b, t->seed);
    const ckpt_state *s = &h->state;
    put_u64(b, s->step);
    put_u64(b, s->rng);
    put_u64(b, s->tokens_seen);
    put_u64(b, s->data_bytes);
    put_u32(b, s->data_crc);
    put_u64(b, s->noise_state);
    put_u32(b, h->n_records);
    put_u64(b, h->file_bytes);
    put_u32(b, ckpt_crc32(0, b->b, b->n));
}

static void header_decode(const unsigned char *p, ckpt_header *h) {
    memset(h, 0, sizeof *h);
    h->version = get_u32(p + 8);
    p += 16;
    int32_t mv[11];
    for (int i = 0; i < 11; i++, p += 4) mv[i] = (int32_t)get_u32(p);
    ckpt_model *m = &h->model;
    m->arch = mv[0];
    m->shortcut_pos = mv[1];
    m->combine = mv[2];
    m->activation = mv[3];
    m->d_model = mv[4];
    m->d_hidden = mv[5];
    m->n_experts = mv[6];
    m->n_heads = mv[7];
    m->n_pairs = mv[8];
    m->seq_len = mv[9];
    m->vocab = mv[10];
    int32_t tv[6];
    for (int i = 0; i < 6; i++, p += 4) tv[i] = (int32_t)get_u32(p);
    ckpt_train *t = &h->train;
    t->ranks = tv[0];
    t->batch = tv[1];
    t->ep_size = tv[2];
    t->overlap = tv[3];
    t->warmup = tv[4];
    t->steps = tv[5];
    t->lr = get_f32(p);
    t->capacity_factor = get_f32(p + 4);
    t->aux_weight = get_f32(p + 8);
    t->weight_decay = get_f32(p + 12);
    t->clip = get_f32(p + 16);
    p += 20;
    t->seed = get_u64(p);
    p += 8;
    ckpt_state *s = &h->state;
    s->step = get_u64(p);
    s->rng = get_u64(p + 8);
    s->tokens_seen = get_u64(p + 16);
    s->data_bytes = get_u64(p + 24);
    s->data_crc = get_u32(p + 32);
    p += 36;
    /* version 1 had no noise state: its writer ran one training forward per step, so it was the step */
    if (h->version >= 2) s->noise_state = get_u64(p), p += 8;
    else s->noise_state = s->step;
    h->n_records = get_u32(p);
    h->file_bytes = get_u64(p + 4);
}

static uint64_t record_bytes(const ckpt_entry *e) {
    return 4 + strlen(e->name) + 4 + 4 * (uint64_t)e->ndim + 4 * (uint64_t)e->numel + 4;
}

/* ---- agreement over ranks ---- */

ckpt_status ckpt_agree(MPI_Comm comm, ckpt_status local, char *err, size_t err_len) {
    int rank, size, worst, me, first;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int l = (int)local;
    MPI_Allreduce(&l, &worst, 1, MPI_INT, MPI_MAX, comm);
    if (worst == CKPT_OK) return CKPT_OK;
    /* the message of the lowest failing rank goes to everyone */
    me = local != CKPT_OK ? rank : size;
    MPI_Allreduce(&me, &first, 1, MPI_INT, MPI_MIN, comm);
    char msg[512] = "";
    int code = l;
    if (rank == first) snprintf(msg, sizeof msg, "%.*s", err ? (int)strnlen(err, err_len) : 0, err ? err : "");
    MPI_Bcast(msg, sizeof msg, MPI_CHAR, first, comm);
    MPI_Bcast(&code, 1, MPI_INT, first, comm);
    if (err && err_len) {
        if (first == 0 || size == 1) snprintf(err, err_len, "%s", msg);
        else snprintf(err, err_len, "%s (on rank %d)", msg, first);
    }
    return (ckpt_status)code;
}

/* ---- writing ---- */

typedef struct writer {
    FILE *f;
    ckpt_status s;
    char *err;
    size_t err_len;
} writer;

static void wr(writer *w, const void *p, size_t n, uint32_t *crc) {
    if (w->s) return;
    if (fwrite(p, 1, n, w->f) != n) {
        w->s = fail(w->err, w->err_len, CKPT_ERR_WRITE, "write: %s", strerror(errno));
        return;
    }
    if (crc) *crc = ckpt_crc32(*crc, p, n);
}
static void wr_u32(writer *w, uint32_t v, uint32_t *crc) {
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    wr(w, b, 4, crc);
}

/* One record; data is numel floats in host order, written little-endian. */
static void write_record(writer *w, const ckpt_entry *e, const float *data) {
    uint32_t crc = 0;
    wr_u32(w, (uint32_t)strlen(e->name), &crc);
    wr(w, e->name, strlen(e->name), &crc);
    wr_u32(w, (uint32_t)e->ndim, &crc);
    for (int i = 0; i < e->ndim; i++) wr_u32(w, (uint32_t)e->shape[i], &crc);
    /* floats in chunks: one conversion path for either byte order */
    unsigned char chunk[4096];
    for (size_t i = 0; i < e->numel;) {
        size_t m = 0;
        for (; m < sizeof chunk / 4 && i < e->numel; m++, i++) {
            uint32_t v;
            memcpy(&v, &data[i], 4);
            chunk[4 * m] = (unsigned char)v;
            chunk[4 * m + 1] = (unsigned char)(v >> 8);
            chunk[4 * m + 2] = (unsigned char)(v >> 16);
            chunk[4 * m + 3] = (unsigned char)(v >> 24);
        }
        wr(w, chunk, 4 * m, &crc);
    }
    wr_u32(w, crc, NULL);
}

/* The temporary file is always a new file: whatever sits at DIR/ckpt.tmp (a stale file from a killed
 * save, or a symlink planted to make the job overwrite another file) is unlinked first, which removes a
 * link and never its target, and O_EXCL | O_NOFOLLOW make the open fail if anything appears there
 * again before it, so the job never writes through a link and never renames one over ckpt.bin. */
static FILE *create_tmp(const char *tmp) {
    if (unlink(tmp) != 0 && errno != ENOENT) return NULL;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        int e = errno;
        close(fd);
        unlink(tmp);
        errno = e;
    }
    return f;
}

ckpt_status ckpt_save(MPI_Comm comm, const char *dir, const ckpt_header *h_in, const ckpt_list *l, char *err,
                      size_t err_len) {
    int rank;
    MPI_Comm_rank(comm, &rank);
    if (err && err_len) err[0] = 0;
    char tmp[4096], final[4096];
    snprintf(tmp, sizeof tmp, "%s/ckpt.tmp", dir);
    ckpt_path(final, sizeof final, dir);

    /* rank 0 needs one receive buffer as large as the largest tensor another rank sends */
    size_t max_numel = 1;
    for (int i = 0; i < l->n; i++)
        if (l->e[i].owner > 0 && l->e[i].numel > max_numel) max_numel = l->e[i].numel;
    ckpt_status s = CKPT_OK;
    float *rbuf = NULL;
    if (max_numel > INT_MAX)
        s = fail(err, err_len, CKPT_ERR_WRITE, "a tensor of %zu floats is too large to send", max_numel);
    if (!s && rank == 0 && !(rbuf = malloc(sizeof(float) * max_numel)))
        s = fail(err, err_len, CKPT_ERR_NOMEM, "receive buffer");
    /* rank 0 opens the temporary file before anyone sends: if that fails, nobody sends */
    writer w = {NULL, CKPT_OK, err, err_len};
    if (!s && rank == 0) {
        if (mkdir(dir, 0777) != 0 && errno != EEXIST)
            s = fail(err, err_len, CKPT_ERR_OPEN, "cannot create directory %s: %s", dir, strerror(errno));
        else if (!(w.f = create_tmp(tmp)))
            s = fail(err, err_len, CKPT_ERR_OPEN, "cannot create %s: %s", tmp, strerror(errno));
    }
    s = ckpt_agree(comm, s, err, err_len);
    if (s) {
        free(rbuf);
        if (w.f) {
            fclose(w.f);
            unlink(tmp);
        }
        return s;
    }

    ckpt_header h = *h_in;
    h.version = CKPT_VERSION;
    h.n_records = (uint32_t)l->n;
    h.file_bytes = HEADER_BYTES + TRAILER_BYTES;
    for (int i = 0; i < l->n; i++) h.file_bytes += record_bytes(&l->e[i]);
    if (rank == 0) {
        buf hb;
        header_encode(&hb, &h);
        wr(&w, hb.b, hb.n, NULL);
    }
    /* test hook: fail after half the records, as a full disk or a killed writer would */
    const char *inject = getenv("SCMOE_CKPT_FAIL");
    int fail_at = inject && strcmp(inject, "half") == 0 ? l->n / 2 : -1;

    for (int i = 0; i < l->n; i++) {
        const ckpt_entry *e = &l->e[i];
        if (e->owner <= 0) { /* rank 0 holds it */
            if (rank == 0) {
                if (i == fail_at && !w.s)
                    w.s = fail(err, err_len, CKPT_ERR_WRITE,
                               "injected failure (SCMOE_CKPT_FAIL=half) after %d of %d records", i, l->n);
                if (e->data) write_record(&w, e, e->data);
                else if (!w.s) w.s = fail(err, err_len, CKPT_ERR_MISSING, "rank 0 does not hold %s", e->name);
            }
            continue;
        }
        /* an expert held elsewhere: its owner sends it to rank 0, which writes it (or drains it, after
         * a failure, so the owner never blocks forever) */
        if (rank == e->owner) {
            static const float zero = 0.0f;
            MPI_Send(e->data ? e->data : &zero, e->data ? (int)e->numel : 0, MPI_FLOAT, 0, 77, comm);
        } else if (rank == 0) {
            MPI_Status st;
            int got = 0;
            MPI_Recv(rbuf, (int)max_numel, MPI_FLOAT, e->owner, 77, comm, &st);
            MPI_Get_count(&st, MPI_FLOAT, &got);
            if (i == fail_at && !w.s)
                w.s = fail(err, err_len, CKPT_ERR_WRITE,
                           "injected failure (SCMOE_CKPT_FAIL=half) after %d of %d records", i, l->n);
            if ((size_t)got != e->numel && !w.s)
                w.s = fail(err, err_len, CKPT_ERR_MISSING, "rank %d does not hold %s", e->owner, e->name);
            write_record(&w, e, rbuf);
        }
    }
    free(rbuf);

    if (rank == 0) {
        uint32_t zero_len = 0;
        wr_u32(&w, zero_len, NULL);
        wr_u32(&w, (uint32_t)l->n, NULL);
        wr(&w, END_MAGIC, 8, NULL);
        /* durable before visible: flush the stdio buffer, fsync the data, then rename over the old
         * checkpoint (atomic on POSIX) and fsync the directory so the rename itself is durable */
        if (!w.s && fflush(w.f) != 0) w.s = fail(err, err_len, CKPT_ERR_WRITE, "flush %s: %s", tmp, strerror(errno));
        if (!w.s && fsync(fileno(w.f)) != 0)
            w.s = fail(err, err_len, CKPT_ERR_WRITE, "fsync %s: %s", tmp, strerror(errno));
        if (fclose(w.f) != 0 && !w.s) w.s = fail(err, err_len, CKPT_ERR_WRITE, "close %s: %s", tmp, strerror(errno));
        if (!w.s && rename(tmp, final) != 0)
            w.s = fail(err, err_len, CKPT_ERR_WRITE, "rename %s -> %s: %s", tmp, final, strerror(errno));
        if (w.s) unlink(tmp);
        else {
            int dfd = open(dir, O_RDONLY);
            if (dfd >= 0) {
                fsync(dfd);
                close(dfd);
            }
        }
    }
    return ckpt_agree(comm, w.s, err, err_len);
}

/* ---- reading ---- */

typedef struct reader {
    FILE *f;
    uint64_t size, pos;
    const char *path;
    char *err;
    size_t err_len;
} reader;

/* Reads n bytes; a short read means the file ended early. */
static ckpt_status rd(reader *r, void *p, size_t n) {
    if (n == 0) return CKPT_OK;
    if (fread(p, 1, n, r->f) != n)
        return fail(r->err, r->err_len, CKPT_ERR_TRUNCATED, "%s ends at byte %llu, inside a field", r->path,
                    (unsigned long long)(r->pos + n));
    r->pos += n;
    return CKPT_OK;
}

static ckpt_status open_checked(reader *r, const char *path, ckpt_header *h, char *err, size_t err_len) {
    memset(r, 0, sizeof *r);
    r->path = path;
    r->err = err;
    r->err_len = err_len;
    r->f = fopen(path, "rb");
    if (!r->f) return fail(err, err_len, CKPT_ERR_OPEN, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(r->f), &sb) != 0 || !S_ISREG(sb.st_mode))
        return fail(err, err_len, CKPT_ERR_OPEN, "%s is not a regular file", path);
    r->size = (uint64_t)sb.st_size;
    unsigned char hb[HEADER_BYTES];
    /* the magic first, then the version: an old or foreign file says so rather than "corrupted" */
    if (r->size < 8)
        return fail(err, err_len, CKPT_ERR_TRUNCATED, "%s has %llu bytes, not even a magic", path,
                    (unsigned long long)r->size);
    ckpt_status s = rd(r, hb, 8);
    if (s) return s;
    if (memcmp(hb, MAGIC, 8) != 0)
        return fail(err, err_len, CKPT_ERR_MAGIC, "%s does not start with \"SCMOECKP\": not a scmoe checkpoint", path);
    if (r->size < 16)
        return fail(err, err_len, CKPT_ERR_TRUNCATED, "%s has %llu bytes, the header needs %d", path,
                    (unsigned long long)r->size, HEADER_BYTES);
    if ((s = rd(r, hb + 8, 8))) return s;
    uint32_t version = get_u32(hb + 8), hbytes = get_u32(hb + 12);
    if (version < 1 || version > CKPT_VERSION)
        return fail(err, err_len, CKPT_ERR_VERSION, "%s is format version %u; this build reads versions 1 to %d", path,
                    version, CKPT_VERSION);
    uint32_t want = version == 1 ? HEADER_BYTES_V1 : HEADER_BYTES;
    if (hbytes != want)
        return fail(err, err_len, CKPT_ERR_CORRUPT, "%s: header size field is %u, version %u headers have %u bytes",
                    path, hbytes, version, want);
    if (r->size < want)
        return fail(err, err_len, CKPT_ERR_TRUNCATED, "%s has %llu bytes, the header needs %u", path,
                    (unsigned long long)r->size, want);
    if ((s = rd(r, hb + 16, want - 16))) return s;
    if (ckpt_crc32(0, hb, want - 4) != get_u32(hb + want - 4))
        return fail(err, err_len, CKPT_ERR_CORRUPT, "%s: header checksum mismatch", path);
    header_decode(hb, h);
    if (r->size < h->file_bytes)
        return fail(err, err_len, CKPT_ERR_TRUNCATED, "%s has %llu bytes, its header says %llu", path,
                    (unsigned long long)r->size, (unsigned long long)h->file_bytes);
    if (r->size > h->file_bytes)
        return fail(err, err_len, CKPT_ERR_CORRUPT, "%s has %llu bytes, its header says %llu", path,
                    (unsigned long long)r->size, (unsigned long long)h->file_bytes);
    return CKPT_OK;
}

ckpt_status ckpt_read_header(const char *path, ckpt_header *h, char *err, size_t err_len) {
    reader r;
    ckpt_status s = open_checked(&r, path, h, err, err_len);
    if (r.f) fclose(r.f);
    return s;
}

ckpt_status ckpt_model_compare(const ckpt_model *a, const ckpt_model *b, char *err, size_t err_len) {
    const struct {
        const char *name;
        int32_t x, y;
    } f[] = {{"arch", a->arch, b->arch},
             {"shortcut_pos", a->shortcut_pos, b->shortcut_pos},
             {"combine", a->combine, b->combine},
             {"activation", a->activation, b->activation},
             {"d_model", a->d_model, b->d_model},
             {"d_hidden", a->d_hidden, b->d_hidden},
             {"n_experts", a->n_experts, b->n_experts},
             {"n_heads", a->n_heads, b->n_heads},
             {"n_pairs", a->n_pairs, b->n_pairs},
             {"seq_len", a->seq_len, b->seq_len},
             {"vocab", a->vocab, b->vocab}};
    for (size_t i = 0; i < sizeof f / sizeof *f; i++)
        if (f[i].x != f[i].y)
            return fail(err, err_len, CKPT_ERR_CONFIG, "%s is %d in the checkpoint, %d here", f[i].name, (int)f[i].x,
                        (int)f[i].y);
    return CKPT_OK;
}

/* Reads every record, checking each checksum, copying those this rank holds. */
static ckpt_status load_records(reader *r, const ckpt_header *h, const ckpt_list *l, char *found) {
    ckpt_status s;
    float *data = NULL;
    size_t cap = 0;
    for (uint32_t i = 0; i < h->n_records; i++) {
        unsigned char b[4];
        char name[CKPT_NAME_MAX];
        uint32_t crc = 0, len, ndim, shape[4];
        if ((s = rd(r, b, 4))) goto out;
        crc = ckpt_crc32(crc, b, 4);
        len = get_u32(b);
        if (len == 0 || len >= CKPT_NAME_MAX) {
            s = fail(r->err, r->err_len, CKPT_ERR_CORRUPT, "%s: record %u has a name length of %u", r->path, i, len);
            goto out;
        }
        if ((s = rd(r, name, len))) goto out;
        crc = ckpt_crc32(crc, name, len);
        name[len] = 0;
        if ((s = rd(r, b, 4))) goto out;
        crc = ckpt_crc32(crc, b, 4);
        ndim = get_u32(b);
        if (ndim < 1 || ndim > 4) {
            s = fail(r->err, r->err_len, CKPT_ERR_CORRUPT, "%s: record %u has %u dimensions", r->path, i, ndim);
            goto out;
        }
        uint64_t numel = 1;
        for (uint32_t k = 0; k < ndim; k++) {
            if ((s = rd(r, b, 4))) goto out;
            crc = ckpt_crc32(crc, b, 4);
            shape[k] = get_u32(b);
            numel *= shape[k];
            /* never allocate more than the file could hold */
            if (shape[k] == 0 || numel > (r->size - r->pos) / 4) {
                s = fail(r->err, r->err_len, CKPT_ERR_CORRUPT, "%s: record %u has an impossible shape", r->path, i);
                goto out;
            }
        }
        if (numel > cap) {
            float *d = realloc(data, sizeof(float) * numel);
            if (!d) {
                s = fail(r->err, r->err_len, CKPT_ERR_NOMEM, "%llu floats", (unsigned long long)numel);
                goto out;
            }
            data = d;
            cap = numel;
        }
        if ((s = rd(r, data, 4 * numel))) goto out;
        crc = ckpt_crc32(crc, data, 4 * numel);
        if ((s = rd(r, b, 4))) goto out;
        if (crc != get_u32(b)) {
            s = fail(r->err, r->err_len, CKPT_ERR_CORRUPT, "%s: checksum mismatch in record %u (%s)", r->path, i, name);
            goto out;
        }
        /* little-endian bytes to host floats, in place */
        unsigned char *raw = (unsigned char *)data;
        for (uint64_t k = 0; k < numel; k++) {
            uint32_t v = get_u32(raw + 4 * k);
            memcpy(&data[k], &v, 4);
        }
        for (int j = 0; j < l->n; j++) {
            const ckpt_entry *e = &l->e[j];
            if (!e->data || strcmp(e->name, name) != 0) continue;
            int same = (int)ndim == e->ndim;
            for (int k = 0; same && k < e->ndim; k++) same = (int)shape[k] == e->shape[k];
            if (!same) {
                s = fail(r->err, r->err_len, CKPT_ERR_MISSING, "%s: %s has another shape in the file", r->path, name);
                goto out;
            }
            memcpy(e->data, data, sizeof(float) * numel);
            found[j] = 1;
        }
    }
    unsigned char t[TRAILER_BYTES];
    if ((s = rd(r, t, sizeof t))) goto out;
    if (get_u32(t) != 0 || get_u32(t + 4) != h->n_records || memcmp(t + 8, END_MAGIC, 8) != 0)
        s = fail(r->err, r->err_len, CKPT_ERR_CORRUPT, "%s: bad trailer", r->path);
out:
    free(data);
    return s;
}

ckpt_status ckpt_load(MPI_Comm comm, const char *path, const ckpt_list *l, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    reader r;
    ckpt_header h;
    char *found = calloc((size_t)l->n + 1, 1);
    ckpt_status s = found ? open_checked(&r, path, &h, err, err_len) : fail(err, err_len, CKPT_ERR_NOMEM, "list");
    if (!s) s = load_records(&r, &h, l, found);
    for (int j = 0; !s && j < l->n; j++)
        if (l->e[j].data && !found[j])
            s = fail(err, err_len, CKPT_ERR_MISSING, "%s has no tensor %s", path, l->e[j].name);
    if (found && r.f) fclose(r.f);
    free(found);
    return ckpt_agree(comm, s, err, err_len);
}
