/* controls.c: what a host's training loop changes on a created layer or pair: the aux and z loss
 * weights (a schedule, gradient accumulation) and the prefix of its parameter names. */
#include "scmoe_internal.h"
#include <math.h>
#include <string.h>

scmoe_status scmoe__moe_set_loss_weights(moe_layer *m, float aux, float z) {
    if (!isfinite(aux) || aux < 0 || !isfinite(z) || z < 0)
        return scmoe__fail(m->ctx, SCMOE_ERR_LOSS_WEIGHT, "loss weights aux %g, z %g: each must be finite and >= 0",
                           aux, z);
    /* gate_encode turns them into the coefficients its backward uses: aux_coef and z_coef */
    m->cfg.aux_loss_weight = aux;
    m->cfg.z_loss_weight = z;
    return SCMOE_OK;
}

scmoe_status scmoe__params_set_prefix(scmoe_context *ctx, param_table *pt, const char *prefix) {
    size_t np = strlen(prefix), old = (size_t)pt->prefix_len;
    /* check every name first, so a prefix that does not fit leaves the table as it was */
    for (int i = 0; i < pt->n; i++)
        if (np + strlen(pt->p[i].name) - old >= sizeof pt->p[i].name)
            return scmoe__fail(ctx, SCMOE_ERR_OPTION, "name prefix '%s' makes '%s' longer than %zu bytes", prefix,
                               pt->p[i].name + old, sizeof pt->p[i].name - 1);
    for (int i = 0; i < pt->n; i++) {
        char *name = pt->p[i].name;
        memmove(name + np, name + old, strlen(name + old) + 1);
        memcpy(name, prefix, np);
    }
    pt->prefix_len = (int)np;
    return SCMOE_OK;
}
