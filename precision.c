/* precision.c: SCMOE_PRECISION_BF16's state: the GEMM table with bf16 GEMMs and the bf16 copy of a
 * layer's weights.
 *
 * Weights are read by every forward and backward GEMM that uses them; rounding them once per change
 * instead of once per GEMM costs one pass over the weights per optimizer step (n/2 bytes written) and
 * saves that pass in every GEMM, which with AMX would cost as much as the GEMM itself. The library
 * cannot see the host write the weights (scmoe_tensor.data is the host's to write), so the host says so:
 * scmoe_*_params_changed() after its optimizer step or a load. exec.c finds an operand's copy by its
 * address: inside [data, data + total) it is a weight. Gradients, activations and everything else are
 * rounded by the GEMM backend as they come.
 *
 * On a device (cuda) the copy is device memory, rounded there by the compute table's bf16_pack; the
 * routed experts' grouped GEMMs read it (cuda_backend/compute_cuda.c), the other GEMMs still hand fp32
 * operands to cuBLAS's bf16 math. Offloaded experts (mapped host memory) have no copy. */
#include "scmoe_internal.h"
#include <stdlib.h>

scmoe_status scmoe__precision_attach(scmoe_context *ctx, const scmoe_config *cfg, param_table *pt, exec *ex) {
    if (cfg->precision != SCMOE_PRECISION_BF16) return SCMOE_OK;
    ex->bf16 = 1;
    const compute_ops *co = ctx->compute;
    if (co->device) { /* the device's table has its own bf16 GEMM; the copy lives on the device (cuda) */
        if (!ex->blas->gemm_bf16)
            return scmoe__fail(ctx, SCMOE_ERR_UNSUPPORTED, "precision BF16: the %s backend has no bf16 GEMM", co->name);
        pt->data_bf16 = co->alloc(co, sizeof(uint16_t) * (pt->total ? pt->total : 1), COMPUTE_DEVICE);
    } else {
        if (!ctx->host_blas && !(ctx->host_blas = scmoe__blas_host_create(BLAS_BF16_AUTO)))
            return scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory for the bf16 GEMM backend");
        ctx->blas = ex->blas = ctx->host_blas;
        pt->data_bf16 = malloc(sizeof(uint16_t) * (pt->total ? pt->total : 1));
    }
    if (!pt->data_bf16)
        return scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory for the bf16 copy of %zu parameters", pt->total);
    ex->w = pt->data;
    ex->wb = pt->data_bf16;
    ex->wn = pt->total;
    scmoe__precision_refresh(pt);
    return SCMOE_OK;
}

void scmoe__precision_refresh(param_table *pt) {
    if (!pt->data_bf16) return;
    const compute_ops *co = pt->co && pt->co->device ? pt->co : NULL;
    for (int i = 0; i < pt->n; i++) { /* tensor by tensor: the padding between them is never written */
        const param_entry *e = &pt->p[i];
        if (co && e->host_data) continue; /* offloaded experts: read in fp32 from their cache */
        if (co) co->bf16_pack(co, pt->data_bf16 + e->offset_data, pt->data + e->offset_data, e->t.numel);
        else scmoe__bf16_pack(pt->data_bf16 + e->offset_data, pt->data + e->offset_data, e->t.numel);
    }
}

scmoe_status scmoe__precision_reserve(scmoe_context *ctx, const scmoe_config *cfg, size_t n) {
    const compute_ops *co = ctx->compute;
    if (cfg->precision != SCMOE_PRECISION_BF16 || !co->bf16_reserve) return SCMOE_OK;
    if (co->bf16_reserve(co, n))
        return scmoe__fail(ctx, SCMOE_ERR_NOMEM, "out of memory for the bf16 activation scratch (%zu bytes, %s memory)",
                           sizeof(uint16_t) * n, co->name);
    return SCMOE_OK;
}

const char *scmoe_context_gemm_info(scmoe_context *ctx) {
    if (!ctx) return "context is NULL";
    if (!ctx->compute->device && !ctx->host_blas) {
        if (!(ctx->host_blas = scmoe__blas_host_create(BLAS_BF16_AUTO))) return "out of memory";
        ctx->blas = ctx->host_blas; /* the same fp32 GEMMs as scmoe__blas_openblas() */
    }
    return ctx->blas->describe ? ctx->blas->describe(ctx->blas) : ctx->blas->name;
}
