/* tensorio.h: a tiny named-tensor file shared by the C tests and the PyTorch oracle
 * (tests/reference/tensorio.py reads and writes the same format).
 *
 * File: "SCMT" then records until EOF, each: uint32 name_len, name bytes (no NUL), uint32 ndim,
 * int32 dims[ndim], float32 data[prod(dims)], all little-endian. A scalar has ndim = 0. */
#ifndef SCMOE_TENSORIO_H
#define SCMOE_TENSORIO_H
#include <stdio.h>

FILE *tio_open_write(const char *path);
int tio_write(FILE *f, const char *name, int ndim, const int *dims, const float *data);
int tio_write_scalar(FILE *f, const char *name, float v);

/* Reads the whole file; returns the number of records or -1. Free with tio_free. */
typedef struct tio_record { char name[96]; int ndim, dims[4]; long numel; float *data; } tio_record;
int tio_read_all(const char *path, tio_record **out);
const tio_record *tio_find(const tio_record *r, int n, const char *name);
void tio_free(tio_record *r, int n);
#endif
