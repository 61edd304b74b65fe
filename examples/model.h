/* model.h: the block pairs of the byte-level language model, as examples/train_lm.c builds them and
 * examples/generate.c rebuilds them from a checkpoint. One mapping from the checkpoint's record of the
 * model to the library's config, so a checkpoint always loads into the model that wrote it. */
#ifndef EXAMPLES_MODEL_H
#define EXAMPLES_MODEL_H

#include "checkpoint.h"

/* The config of one block pair of the model M: every field that shapes the parameters from M, every
 * other field (max_tokens, training options, parallelism, wire format, seed) from base. */
scmoe_config lm_pair_config(const ckpt_model *M, const scmoe_config *base);

#endif
