/* context.c: scmoe_context_use_cuda (scmoe_cuda.h): a context's GEMM table becomes a cuda_blas and its
 * compute table the CUDA one (compute_cuda.c), both on the cuda_blas's own stream. */
#include "../scmoe_cuda.h"
#include "../scmoe_internal.h"
#include "cuda.h"
#include <stdlib.h>

#ifdef SCMOE_WITH_MPI
#include <mpi.h>
#if defined(__has_include)
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h> /* OpenMPI: MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support */
#endif
#endif
#endif

int scmoe__cuda_mpi_cuda_aware(void) {
#if defined(SCMOE_WITH_MPI) && defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
    return MPIX_Query_cuda_support() == 1; /* built with CUDA; the run time says whether it is on */
#else
    return 0; /* not OpenMPI, built without CUDA, or no MPI: assume not aware */
#endif
}

typedef struct cuda_backend {
    cuda_blas *cb;
    compute_ops *co;
} cuda_backend;

static void backend_release(void *p) {
    cuda_backend *b = p;
    if (!b) return;
    scmoe__cuda_compute_destroy(b->co);
    scmoe__cuda_blas_destroy(b->cb);
    free(b);
}

scmoe_cuda_options scmoe_cuda_options_default(void) {
    scmoe_cuda_options o = {0, SCMOE_CUDA_FP32, 0, -1, 0};
    return o;
}

scmoe_status scmoe_context_use_cuda(scmoe_context *ctx, const scmoe_cuda_options *opt) {
    if (!ctx) return SCMOE_ERR_NULL;
    scmoe_cuda_options o = opt ? *opt : scmoe_cuda_options_default();
    int device = o.device;
    scmoe_cuda_math math = o.math;
    if (ctx->objects > 0)
        return scmoe__fail(ctx, SCMOE_ERR_STATE,
                           "scmoe_context_use_cuda: %d layer(s) already live on this context; "
                           "move it to the device before creating any",
                           ctx->objects);
    if (ctx->compute->device)
        return scmoe__fail(ctx, SCMOE_ERR_STATE, "scmoe_context_use_cuda: the context is on a device already");
    if (math != SCMOE_CUDA_FP32 && math != SCMOE_CUDA_BF16)
        return scmoe__fail(ctx, SCMOE_ERR_OPTION,
                           "scmoe_context_use_cuda: math = %d: must be SCMOE_CUDA_FP32 or "
                           "SCMOE_CUDA_BF16",
                           (int)math);
    if (o.cuda_aware_mpi < -1 || o.cuda_aware_mpi > 1)
        return scmoe__fail(ctx, SCMOE_ERR_OPTION,
                           "scmoe_context_use_cuda: cuda_aware_mpi = %d: must be -1 (ask "
                           "MPI), 0 or 1",
                           o.cuda_aware_mpi);
    if (o.host_routing != 0 && o.host_routing != 1)
        return scmoe__fail(ctx, SCMOE_ERR_OPTION, "scmoe_context_use_cuda: host_routing = %d: must be 0 or 1",
                           o.host_routing);
    if (o.offload_experts < 0)
        return scmoe__fail(ctx, SCMOE_ERR_OPTION,
                           "scmoe_context_use_cuda: offload_experts = %d: must be >= 0 "
                           "(0: off)",
                           o.offload_experts);
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || device < 0 || device >= count)
        return scmoe__fail(ctx, SCMOE_ERR_UNSUPPORTED, "scmoe_context_use_cuda: no CUDA device %d (%d visible%s%s)",
                           device, e == cudaSuccess ? count : 0, e == cudaSuccess ? "" : ": ",
                           e == cudaSuccess ? "" : cudaGetErrorString(e));
    e = cudaSetDevice(device);
    if (e != cudaSuccess)
        return scmoe__fail(ctx, SCMOE_ERR_UNSUPPORTED, "cudaSetDevice(%d) failed: %s", device, cudaGetErrorString(e));
    cuda_backend *b = calloc(1, sizeof *b);
    if (!b) return scmoe__fail(ctx, SCMOE_ERR_NOMEM, "scmoe_context_use_cuda: out of memory");
    char err[160];
    scmoe_status s =
        scmoe__cuda_blas_create(&b->cb, NULL, math == SCMOE_CUDA_BF16 ? CUDA_MATH_BF16 : CUDA_MATH_FP32, err);
    /* auto: ask OpenMPI, where there are exchanges at all. One rank exchanges nothing (MPI moves no row
     * and sums no gradient), so its exchange buffers are device memory: no row crosses PCIe */
    int aware = o.cuda_aware_mpi >= 0 ? o.cuda_aware_mpi : ctx->world->size > 1 && scmoe__cuda_mpi_cuda_aware();
    if (!s) s = scmoe__cuda_compute_create(&b->co, b->cb, aware || ctx->world->size == 1, err);
    if (s) {
        backend_release(b);
        return scmoe__fail(ctx, s, "scmoe_context_use_cuda: %s", err);
    }
    if (o.host_routing) b->co->route_local = NULL; /* the MoE then plans on the host */
    ctx->blas = scmoe__cuda_blas_table(b->cb);
    ctx->compute = b->co;
    ctx->backend = b;
    ctx->backend_release = backend_release;
    ctx->offload_experts = o.offload_experts;
    return SCMOE_OK;
}
