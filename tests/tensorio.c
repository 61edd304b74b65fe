#include "tensorio.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

FILE *tio_open_write(const char *path) {
    FILE *f = fopen(path, "wb");
    if (f) fwrite("SCMT", 1, 4, f);
    return f;
}

int tio_write(FILE *f, const char *name, int ndim, const int *dims, const float *data) {
    uint32_t len = (uint32_t)strlen(name), nd = (uint32_t)ndim;
    long n = 1;
    fwrite(&len, 4, 1, f);
    fwrite(name, 1, len, f);
    fwrite(&nd, 4, 1, f);
    for (int i = 0; i < ndim; i++) {
        int32_t d = dims[i];
        fwrite(&d, 4, 1, f);
        n *= dims[i];
    }
    return fwrite(data, sizeof(float), (size_t)n, f) == (size_t)n ? 0 : -1;
}

int tio_write_scalar(FILE *f, const char *name, float v) { return tio_write(f, name, 0, NULL, &v); }

void tio_write_step(FILE *f, const tio_step *s) {
    tio_write(f, "x", s->ndim, s->dims, s->x);
    tio_write(f, "dy", s->ndim, s->dims, s->dy);
    for (int i = 0; i < s->n_params; i++) {
        const scmoe_tensor *t = &s->params[i];
        tio_write(f, t->name, t->ndim, t->shape, t->data);
    }
    tio_write(f, "out.y", s->ndim, s->dims, s->y);
    tio_write_scalar(f, "out.aux_loss", s->aux_loss);
    tio_write_scalar(f, "out.z_loss", s->z_loss);
    tio_write_scalar(f, "out.dropped", s->dropped);
    tio_write_scalar(f, "out.capacity", s->capacity);
    tio_write(f, "out.expert_tokens", 1, &s->n_experts, s->expert_tokens);
    tio_write(f, "grad.x", s->ndim, s->dims, s->dx);
    for (int i = 0; i < s->n_params; i++) {
        const scmoe_tensor *t = &s->params[i];
        char gname[160];
        snprintf(gname, sizeof gname, "grad.%s", t->name);
        tio_write(f, gname, t->ndim, t->shape, t->grad);
    }
}

int tio_read_all(const char *path, tio_record **out) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char magic[4];
    if (fread(magic, 1, 4, f) != 4 || memcmp(magic, "SCMT", 4)) {
        fclose(f);
        return -1;
    }
    int n = 0, cap = 0;
    tio_record *r = NULL;
    uint32_t len;
    while (fread(&len, 4, 1, f) == 1) {
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            r = realloc(r, sizeof *r * cap);
        }
        tio_record *t = &r[n];
        memset(t, 0, sizeof *t);
        if (len >= sizeof t->name || fread(t->name, 1, len, f) != len) break;
        uint32_t nd;
        if (fread(&nd, 4, 1, f) != 1 || nd > 4) break;
        t->ndim = (int)nd;
        t->numel = 1;
        for (uint32_t i = 0; i < nd; i++) {
            int32_t d;
            if (fread(&d, 4, 1, f) != 1) d = 0;
            t->dims[i] = d;
            t->numel *= d;
        }
        t->data = malloc(sizeof(float) * (t->numel ? t->numel : 1));
        if (fread(t->data, sizeof(float), (size_t)t->numel, f) != (size_t)t->numel) {
            free(t->data);
            break;
        }
        n++;
    }
    fclose(f);
    *out = r;
    return n;
}

const tio_record *tio_find(const tio_record *r, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(r[i].name, name)) return &r[i];
    return NULL;
}

void tio_free(tio_record *r, int n) {
    for (int i = 0; i < n; i++) free(r[i].data);
    free(r);
}
