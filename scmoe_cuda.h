/**
 * @file scmoe_cuda.h
 * @brief Running a context's MoE layers on a CUDA device (build with `make CUDA=1`, link
 *        build/libscmoe_cuda.a before build/libscmoe.a, plus -lcublas -lcudart -lstdc++).
 *
 * Only embedders that build the CUDA backend include this; scmoe.h never pulls in CUDA.
 */
#ifndef SCMOE_CUDA_PUBLIC_H
#define SCMOE_CUDA_PUBLIC_H

#include "scmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/** GEMM math on the device. */
typedef enum {
    SCMOE_CUDA_FP32 = 0, /**< plain fp32 GEMMs (no TF32): matches the host backend to ~1e-6 */
    SCMOE_CUDA_BF16 = 1  /**< fp32 data, GEMM inputs may be rounded to bf16 on the tensor cores, fp32 accumulation */
} scmoe_cuda_math;

/** How a context uses its device; scmoe_cuda_options_default() gives the values in parentheses. */
typedef struct scmoe_cuda_options {
    int device;           /**< CUDA device ordinal, as cudaSetDevice takes it (0) */
    scmoe_cuda_math math; /**< GEMM math (::SCMOE_CUDA_FP32) */
    /** Expert offloading (paper, appendix A.3) (0: off). n > 0: the routed experts' weights stay in
     * pinned host memory (their tensors' data are host pointers the device can also read) and each
     * MoE keeps at most n experts' weights on the device. After the gate has chosen (from the
     * shortcut, with arch SCMOE, a block early), the experts that received tokens are copied in on a
     * copy stream of their own while the exchange and the dense operations run; one that does not
     * fit is fetched when its turn comes. Saves the device memory of the routed experts' weights
     * (their gradients stay on the device); fetched anew every forward, so host-side updates are
     * seen. */
    int offload_experts;
    /** Whether MPI can read and write device memory (-1: ask OpenMPI, MPIX_Query_cuda_support; 0: no;
     * 1: yes, the caller knows). Yes: the token exchanges and the summed gradients live in device
     * memory and MPI moves them itself (GPUDirect where the MPI has it). No: they live in pinned host
     * memory mapped into the device, which any MPI can use. */
    int cuda_aware_mpi;
    /** Where routing is planned (0: on the device where it can be, 1: always on the host). 0: with
     * capacity per source rank (::SCMOE_CAPACITY_LOCAL) or one rank, under either priority
     * (::SCMOE_PRIORITY_TOKEN, or ::SCMOE_PRIORITY_BATCH: the tokens ordered by their top-1 score on the
     * device), and with GLOBAL capacity over several ranks under ::SCMOE_PRIORITY_TOKEN (the defaults:
     * the per-expert counts scanned over the ranks), the gate's top-k, the capacity plan and the pack run
     * on the device and only the per-expert counts MPI needs cross to the host and back, without
     * waiting for the device; otherwise (GLOBAL capacity over several ranks with BATCH priority) the
     * gate's outputs are copied to the host, planned there and the plan copied back. 1: always the
     * latter (the same plan: for comparison and debugging). */
    int host_routing;
} scmoe_cuda_options;

/** The defaults: device 0, fp32 math, no offloading, ask MPI whether it is CUDA-aware, routing on the device.
 * @return the options, ready to change field by field. */
scmoe_cuda_options scmoe_cuda_options_default(void);

/** LOCAL: moves ctx onto CUDA device opt->device (cudaSetDevice), before any layer is created on it.
 *
 * From then on every scmoe_moe and scmoe_pair created on ctx keeps its parameters, gradients and
 * workspace on the device and runs its GEMMs (cuBLAS) and kernels on one stream of its own; routing is
 * planned on the device where it can be, else on the host (scmoe_cuda_options.host_routing), and the token
 * exchanges go through MPI on device memory (a CUDA-aware MPI) or on pinned host memory mapped into the
 * device (any MPI; see scmoe_cuda_options). With such a context:
 * - the forward / backward calls of both take DEVICE pointers for x, y, dy and dx, and return once the
 *   results are in them;
 * - the param() / param_at() tensors' data and grad are DEVICE pointers (an optimizer runs on the
 *   device, or copies them); with offload_experts, the routed experts' data are pinned host memory;
 * - a failing kernel, copy or cuBLAS call returns ::SCMOE_ERR_DEVICE with the CUDA error in
 *   scmoe_last_error().
 * Each rank decides for itself: ranks on the host and ranks on a device exchange with one another.
 * The device state is released by scmoe_context_destroy().
 *
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL, ::SCMOE_ERR_STATE (a layer or pair already exists on ctx, or ctx is on
 *         a device already), ::SCMOE_ERR_OPTION (unknown math, offload_experts < 0, cuda_aware_mpi not -1,
 *         0 or 1, host_routing not 0 or 1), ::SCMOE_ERR_UNSUPPORTED (no such device, no driver), ::SCMOE_ERR_NOMEM or
 *         ::SCMOE_ERR_DEVICE; on failure ctx is unchanged.
 * @param ctx  the context to move (no layer or pair created on it yet).
 * @param opt  the options; NULL: the defaults. */
scmoe_status scmoe_context_use_cuda(scmoe_context *ctx, const scmoe_cuda_options *opt);

#ifdef __cplusplus
}
#endif
#endif /* SCMOE_CUDA_PUBLIC_H */
