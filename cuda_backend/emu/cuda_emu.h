/* cuda_emu.h: just enough of CUDA's device side to run kernels.cu on the host, for testing where
 * there is no GPU (`make check-cuda-emu`; kernels.cu includes this instead of cuda_runtime.h when
 * SCMOE_CUDA_EMU is defined, and g++ compiles it as C++).
 *
 * A launch runs its blocks one after another on blockDim real threads (pthreads), so
 * __syncthreads is a real barrier and a kernel that reaches it divergently deadlocks here as it
 * would misbehave on a GPU. __shared__ variables become function statics: one copy, reused by each
 * block in turn, with a barrier between blocks. __shfl_xor_sync exchanges through a per-launch array
 * between two barriers, so it assumes every thread of the block calls it together (block_sum and
 * block_max do). Launches are synchronous; their stream only orders them after the copies enqueued on it.
 *
 * What this cannot show: warp-level timing, memory coalescing, launch limits on a real device,
 * the real cuBLAS. It checks indexing, reductions, masking and synchronisation. */
#ifndef SCMOE_CUDA_EMU_H
#define SCMOE_CUDA_EMU_H

#ifndef __cplusplus
#error "cuda_emu.h is C++ (compile kernels.cu with g++ -x c++ -DSCMOE_CUDA_EMU)"
#endif

#include <cuda_runtime_api.h> /* host-side types only: dim3, uint3, cudaError_t, cudaStream_t */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __shared__
#define __global__
#define __device__
#define __shared__ static

struct emu_launch_state {
    dim3 grid, block;
    pthread_barrier_t bar;
    std::vector<float> shfl;
    std::vector<unsigned char> dyn;
    const std::function<void()> *body;
};

extern thread_local uint3 emu_thread_idx, emu_block_idx;
extern thread_local dim3 emu_block_dim, emu_grid_dim;
extern thread_local emu_launch_state *emu_state;

#define threadIdx emu_thread_idx
#define blockIdx  emu_block_idx
#define blockDim  emu_block_dim
#define gridDim   emu_grid_dim

static inline void __syncthreads() { pthread_barrier_wait(&emu_state->bar); }

static inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    (void)mask;
    unsigned me = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    emu_state->shfl[me] = v;
    __syncthreads();
    float r = emu_state->shfl[me ^ (unsigned)lane_mask];
    __syncthreads();
    return r;
}

static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE double arithmetic without contraction (the host's: x86-64-v2 has no FMA), and the system fence
 * (launches here are synchronous, so a compiler and CPU fence is all it needs to be) */
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#define DYNAMIC_SHARED(type, name) type *name = (type *)emu_state->dyn.data()

/* runtime_emu.c: device memory is reachable from the host only inside these (see there) */
extern "C" void emu_device_enter(void);
extern "C" void emu_device_leave(void);
/* runtime_emu.c: a launch runs after the copies enqueued before it on its stream (they land first) */
extern "C" void emu_stream_order(cudaStream_t s);

/* Runs body for every block of grid on block.x * block.y * block.z threads (emu_launch.cpp). */
void emu_launch(dim3 grid, dim3 block, size_t shmem, const std::function<void()> &body);

#define LAUNCH(kernel, grid, block, shmem, stream, ...)                                                                \
    (emu_stream_order(stream), emu_launch(dim3(grid), dim3(block), (size_t)(shmem), [=]() { kernel(__VA_ARGS__); }))

#endif
