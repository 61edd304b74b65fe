/* model.c: the block pairs of the byte-level language model (model.h). */
#include "model.h"

scmoe_config lm_pair_config(const ckpt_model *M, const scmoe_config *base) {
    scmoe_config c = *base;
    c.arch = (scmoe_arch)M->arch;
    c.shortcut_pos = M->shortcut_pos;
    c.combine = (scmoe_combine)M->combine;
    c.activation = (scmoe_activation)M->activation;
    c.d_model = M->d_model;
    c.d_hidden = M->d_hidden;
    c.n_experts = M->n_experts;
    c.n_heads = M->n_heads;
    c.max_seq_len = M->seq_len;
    c.n_layers = 2 * M->n_pairs; /* a dense and an MoE layer per pair: the residual projections' init scale */
    return c;
}
