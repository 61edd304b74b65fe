/* checkpoint.h: the checkpoint of examples/train_lm.c, also read by examples/generate.c.
 *
 * One file, DIR/ckpt.bin. Every integer is little-endian, every float an IEEE-754 binary32:
 *
 *   header    "SCMOECKP"                         8-byte magic
 *             u32 version (CKPT_VERSION)         a reader takes 1..CKPT_VERSION, refuses others
 *             u32 header_bytes                   bytes from the magic to the end of the header crc
 *             model  11 x i32                    what shapes the parameters (must match to resume)
 *             train   6 x i32, 5 x f32, u64      how the run was being trained (recorded, not enforced)
 *             state   4 x u64, u32, u64          step, data RNG, tokens seen, data bytes, data crc32,
 *                                                gate-noise state (version 2 on; version 1 files load
 *                                                with it equal to the step)
 *             u32 n_records, u64 file_bytes      so truncation is told apart from corruption
 *             u32 crc32 of all the header bytes before it
 *   records   n_records x { u32 name_len | name | u32 ndim | u32 shape[ndim] | f32 data[numel]
 *                           | u32 crc32 of the record's bytes before it }
 *   trailer   u32 0 | u32 n_records | "SCMOEEND"
 *
 * One record per tensor, keyed by name: parameters ("pair0.l1.attn.wqkv", "wte", ...) and the AdamW
 * moments of each ("<name>#m", "<name>#v"). Experts are stored one record per expert under their
 * global index ("pair0.l1.experts.5.w1"), so a checkpoint written by P ranks loads on any P' whose
 * expert-parallel size divides n_experts: every rank reads the file and takes the records it holds.
 *
 * Writing is collective: rank 0 writes, the ranks owning experts send them to rank 0 (MPI point to
 * point, one tensor at a time, in the list's order), the file goes to DIR/ckpt.tmp, is fsync'ed and
 * renamed over DIR/ckpt.bin, so a write that fails midway leaves the previous checkpoint intact.
 * Fault injection for tests: with SCMOE_CKPT_FAIL=half in the environment the writer fails after
 * writing half its records. */
#ifndef EXAMPLES_CHECKPOINT_H
#define EXAMPLES_CHECKPOINT_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>
#include "../scmoe.h"

#define CKPT_VERSION  2
#define CKPT_NAME_MAX 96
#define CKPT_FILE     "ckpt.bin"

typedef enum ckpt_status {
    CKPT_OK = 0,
    CKPT_ERR_OPEN,      /* the file or directory could not be opened or created */
    CKPT_ERR_TRUNCATED, /* the file is shorter than its header says */
    CKPT_ERR_MAGIC,     /* not a scmoe checkpoint */
    CKPT_ERR_VERSION,   /* a format version this build does not read */
    CKPT_ERR_CORRUPT,   /* a checksum mismatch or an impossible field */
    CKPT_ERR_CONFIG,    /* the checkpoint's model (or data) differs from the one asked for */
    CKPT_ERR_MISSING,   /* a tensor this rank needs is not in the file, or has another shape */
    CKPT_ERR_WRITE,     /* writing, syncing or renaming failed */
    CKPT_ERR_NOMEM,
    CKPT_STATUS_COUNT
} ckpt_status;

const char *ckpt_strerror(ckpt_status s);

/* What shapes the parameters: a checkpoint loads only into the same model. */
typedef struct ckpt_model {
    int32_t arch, shortcut_pos, combine, activation;
    int32_t d_model, d_hidden, n_experts, n_heads, n_pairs, seq_len, vocab;
} ckpt_model;

/* How the run was being trained. Recorded for the record and for warnings on resume. */
typedef struct ckpt_train {
    int32_t ranks, batch, ep_size, overlap, warmup, steps;
    float lr, capacity_factor, aux_weight, weight_decay, clip;
    uint64_t seed;
} ckpt_train;

/* Where the run is: with these (and the tensors) a resumed run continues bit for bit. */
typedef struct ckpt_state {
    uint64_t step;        /* optimizer steps completed */
    uint64_t rng;         /* the data sampler's RNG state */
    uint64_t tokens_seen; /* training tokens consumed, all ranks */
    uint64_t data_bytes;  /* size of the training text, and its crc32: resuming needs the same text */
    uint32_t data_crc;
    uint64_t noise_state; /* the pairs' gate-noise state (scmoe_pair_noise_state: they advance together) */
} ckpt_state;

typedef struct ckpt_header {
    uint32_t version;
    ckpt_model model;
    ckpt_train train;
    ckpt_state state;
    uint32_t n_records;  /* filled by the writer */
    uint64_t file_bytes; /* filled by the writer */
} ckpt_header;

/* One tensor of the global list. Every rank builds the same list, in the same order, with the tensors
 * it does not hold too (data NULL): the list is the file's record order. owner: the world rank that
 * writes it (-1: replicated, rank 0 writes its own copy). */
typedef struct ckpt_entry {
    char name[CKPT_NAME_MAX];
    int ndim, shape[4];
    size_t numel;
    int owner;
    float *data; /* this rank's copy, or NULL */
} ckpt_entry;

typedef struct ckpt_list {
    ckpt_entry *e;
    int n, cap;
} ckpt_list;

/* Appends an entry; returns 0, or -1 when out of memory or the name is too long. */
int ckpt_list_add(ckpt_list *l, const char *name, int ndim, const int *shape, int owner, float *data);
void ckpt_list_free(ckpt_list *l);

/* A block pair's tensors as the checkpoint lists them: the replicated ones in the pair's own order,
 * then every expert e = 0..E-1 (its tensors in the pair's order), the same list on every rank.
 * local: the index for scmoe_pair_param_at() where this rank holds it, else -1. */
typedef struct ckpt_pair_tensor {
    char name[CKPT_NAME_MAX]; /* the pair's name, e.g. "l1.experts.5.w1" */
    int ndim, shape[4];
    int owner; /* -1 replicated; else the world rank in expert-parallel group 0 holding it */
    int local;
} ckpt_pair_tensor;

/* Returns the number of tensors (*out malloc'ed, the caller frees) or -1 (out of memory, or the pair
 * holds expert tensors whose names do not follow "<prefix>experts.<e>.<suffix>"). */
int ckpt_pair_layout(const scmoe_pair *p, int n_experts, ckpt_pair_tensor **out);

/* CRC-32 (IEEE 802.3, the zlib one). crc = 0 to start. */
uint32_t ckpt_crc32(uint32_t crc, const void *buf, size_t n);

/* "DIR/ckpt.bin" into buf; returns buf. */
char *ckpt_path(char *buf, size_t len, const char *dir);

/* COLLECTIVE over comm. Rank 0 writes DIR/ckpt.bin (creating DIR) from h and the list; every rank
 * returns the same status and, on failure, the same message in err. */
ckpt_status ckpt_save(MPI_Comm comm, const char *dir, const ckpt_header *h, const ckpt_list *l, char *err,
                      size_t err_len);

/* Local: reads and checks the header of the file at path (magic, version, size, checksum). */
ckpt_status ckpt_read_header(const char *path, ckpt_header *h, char *err, size_t err_len);

/* The first field where two models differ, as "d_model is 64 in the checkpoint, 32 here", or CKPT_OK. */
ckpt_status ckpt_model_compare(const ckpt_model *file, const ckpt_model *want, char *err, size_t err_len);

/* COLLECTIVE over comm. Every rank reads the whole file at path, checks every record's checksum and
 * copies the records it holds (entries with data != NULL, matched by name and shape); every such entry
 * must be found. Records the list does not hold are skipped. All ranks return the same status. */
ckpt_status ckpt_load(MPI_Comm comm, const char *path, const ckpt_list *l, char *err, size_t err_len);

/* COLLECTIVE: the worst status over the ranks. A rank that was fine but sees another fail gets a
 * message saying so. */
ckpt_status ckpt_agree(MPI_Comm comm, ckpt_status local, char *err, size_t err_len);

#endif
