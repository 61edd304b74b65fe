/* tensorio.h: a tiny named-tensor file shared by the C tests and the PyTorch oracle
 * (tests/reference/tensorio.py reads and writes the same format).
 *
 * File: "SCMT" then records until EOF, each: uint32 name_len, name bytes (no NUL), uint32 ndim,
 * int32 dims[ndim], float32 data[prod(dims)], all little-endian. A scalar has ndim = 0. */
#ifndef SCMOE_TENSORIO_H
#define SCMOE_TENSORIO_H
#include "../scmoe.h"
#include <stdio.h>

FILE *tio_open_write(const char *path);
int tio_write(FILE *f, const char *name, int ndim, const int *dims, const float *data);
int tio_write_scalar(FILE *f, const char *name, float v);

/* One training step of a layer or pair, as the oracle tests write it after their cfg.* scalars and the
 * reference scripts read it: x, dy, every parameter, out.*, grad.x and grad.<parameter>. */
typedef struct tio_step {
    int ndim;
    const int *dims; /* the shape of x, dy, y and dx */
    const float *x, *dy, *y, *dx;
    const scmoe_tensor *params; /* in param_at order; each tensor's data and grad are written */
    int n_params;
    float aux_loss, z_loss, dropped, capacity; /* the forward's stats: backward overwrites them */
    int n_experts;
    const float *expert_tokens;
} tio_step;
void tio_write_step(FILE *f, const tio_step *s);

/* Reads the whole file; returns the number of records or -1. Free with tio_free. */
typedef struct tio_record {
    char name[96];
    int ndim, dims[4];
    long numel;
    float *data;
} tio_record;
int tio_read_all(const char *path, tio_record **out);
const tio_record *tio_find(const tio_record *r, int n, const char *name);
void tio_free(tio_record *r, int n);
#endif
