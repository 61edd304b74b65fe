/* kernels.cu: the kernels of kernels/ and moe.c on device buffers, forward and backward.
 *
 * Each kernel computes what its CPU twin computes, with the same formulas, constants and tie rules
 * (docs/cuda.md lists the pairs); only the order of floating-point sums differs where a block reduces
 * a row, so results agree to rounding (tests/test_cuda.c: <= 1e-4 relative on outputs, 1e-3 on
 * gradients). Nothing uses atomics: parameter-gradient column sums run over rows in a fixed order,
 * so every result is deterministic, run to run.
 *
 * Shapes follow the CPU: rows of C floats, row-major. Launch wrappers validate on the host and
 * enqueue on the stream given; they never synchronize. Built without --use_fast_math: expf, tanhf,
 * logf and 1/sqrtf are the accurate versions. */
#include "cuda.h"
#include "../kernels/gate_row.h"
#include <float.h>
#include <math.h>

/* Launches go through LAUNCH so that this file also builds as plain C++ for the host emulation
 * (emu/cuda_emu.h, `make check-cuda-emu`), which runs every kernel on CPU threads, block by block. */
#ifdef SCMOE_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#define LAUNCH(kernel, grid, block, shmem, stream, ...) kernel<<<grid, block, shmem, stream>>>(__VA_ARGS__)
#define DYNAMIC_SHARED(type, name)                      extern __shared__ type name[]
#endif

#ifdef SCMOE_CUDA_EMU /* the emulation runs a block on real threads: smaller blocks, same code paths */
#define THREADS 64
#else
#define THREADS 256 /* a multiple of 32: block_sum / block_max assume whole warps */
#endif
#define MAX_GRID (1L << 20) /* grid-stride loops past this many blocks */
#define GELU_S   0.7978845608028654f

/* ------------------------------------------------------------------------------ helpers */

/* Sum (or max) over the block; every thread gets the result. sh: 32 floats of shared memory. */
__device__ static float block_sum(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ static float block_max(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -FLT_MAX;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static unsigned grid_for(long work, int per_block) {
    long g = (work + per_block - 1) / per_block;
    if (g < 1) g = 1;
    return (unsigned)(g < MAX_GRID ? g : MAX_GRID);
}

/* threads for a block that walks a row of n: whole warps, at most THREADS */
static int threads_for(int n) {
    int t = ((n + 31) / 32) * 32;
    return t < 32 ? 32 : (t > THREADS ? THREADS : t);
}

#define CHECK_ARGS(cond)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) return cudaErrorInvalidValue;                                                                     \
    } while (0)

/* ---------------------------------------------------------------------------- layernorm */

__global__ static void k_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                                           const float *b, int N, int C) {
    __shared__ float sh[32];
    for (long i = blockIdx.x; i < N; i += gridDim.x) {
        const float *xi = x + i * C;
        float s = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) s += xi[c];
        float m = block_sum(s, sh) / C;
        float v = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float t = xi[c] - m;
            v += t * t;
        }
        v = block_sum(v, sh) / C;
        float r = 1.0f / sqrtf(v + 1e-5f);
        float *oi = out + i * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) oi[c] = (xi[c] - m) * r * w[c] + b[c];
        if (threadIdx.x == 0) {
            mean[i] = m;
            rstd[i] = r;
        }
    }
}

__global__ static void k_layernorm_backward_dx(float *dx, const float *dy, const float *x, const float *w,
                                               const float *mean, const float *rstd, int N, int C) {
    __shared__ float sh[32];
    for (long i = blockIdx.x; i < N; i += gridDim.x) {
        const float *dyi = dy + i * C, *xi = x + i * C;
        float m = mean[i], r = rstd[i], g = 0.0f, gx = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float t = w[c] * dyi[c];
            g += t;
            gx += t * (xi[c] - m) * r;
        }
        g = block_sum(g, sh) / C;
        gx = block_sum(gx, sh) / C;
        float *dxi = dx + i * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float xhat = (xi[c] - m) * r;
            dxi[c] += r * (w[c] * dyi[c] - g - xhat * gx);
        }
    }
}

/* Column sums over N rows, deterministic: a block owns 32 columns (threadIdx.x) and splits the rows
 * over RY thread rows (threadIdx.y, fixed stride), then adds the RY partials in order. With
 * ln != NULL it sums the two LayerNorm parameter gradients, else plain columns of x. */
#define RY 16
struct colsum_ln {
    const float *x, *mean, *rstd;
    float *dw;
};

__global__ static void k_column_sums(float *acc, const float *v, int N, int C, colsum_ln ln) {
    __shared__ float s1[RY][33], s2[RY][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float a = 0.0f, bsum = 0.0f;
    if (c < C)
        for (long i = threadIdx.y; i < N; i += RY) {
            float t = v[i * C + c];
            if (ln.dw) a += t * (ln.x[i * C + c] - ln.mean[i]) * ln.rstd[i];
            bsum += t;
        }
    s1[threadIdx.y][threadIdx.x] = a;
    s2[threadIdx.y][threadIdx.x] = bsum;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float ta = 0.0f, tb = 0.0f;
        for (int y = 0; y < RY; y++) {
            ta += s1[y][threadIdx.x];
            tb += s2[y][threadIdx.x];
        }
        if (ln.dw) ln.dw[c] += ta;
        acc[c] += tb;
    }
}

extern "C" cudaError_t scmoe__cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *x,
                                                     const float *w, const float *b, int N, int C, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && C >= 0);
    if (N == 0 || C == 0) return cudaSuccess;
    CHECK_ARGS(out && mean && rstd && x && w && b);
    LAUNCH(k_layernorm_forward, grid_for(N, 1), threads_for(C), 0, s, out, mean, rstd, x, w, b, N, C);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                                                      const float *w, const float *mean, const float *rstd, int N,
                                                      int C, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && C >= 0);
    if (N == 0 || C == 0) return cudaSuccess;
    CHECK_ARGS(dx && dw && db && dy && x && w && mean && rstd);
    LAUNCH(k_layernorm_backward_dx, grid_for(N, 1), threads_for(C), 0, s, dx, dy, x, w, mean, rstd, N, C);
    colsum_ln ln = {x, mean, rstd, dw};
    LAUNCH(k_column_sums, (unsigned)((C + 31) / 32), dim3(32, RY), 0, s, db, dy, N, C, ln);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------------ ffn pieces */

__device__ static float gelu_f(float z) { return 0.5f * z * (1.0f + tanhf(GELU_S * (z + 0.044715f * z * z * z))); }

__global__ static void k_activation_forward(float *hid, const float *pre, long total, int h, int act) {
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        if (act == SCMOE_GELU) {
            hid[idx] = gelu_f(pre[idx]);
        } else {
            long i = idx / h, j = idx % h;
            float g = pre[i * 2 * h + j], u = pre[i * 2 * h + h + j];
            hid[idx] = g / (1.0f + expf(-g)) * u;
        }
    }
}

__global__ static void k_activation_backward(float *dpre, const float *dhid, const float *pre, long total, int h,
                                             int act) {
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        float dh = dhid[idx];
        if (act == SCMOE_GELU) {
            float z = pre[idx], t = tanhf(GELU_S * (z + 0.044715f * z * z * z));
            float dz = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * 0.044715f * z * z);
            dpre[idx] = dh * dz;
        } else {
            long i = idx / h, j = idx % h;
            float g = pre[i * 2 * h + j], u = pre[i * 2 * h + h + j];
            float sg = 1.0f / (1.0f + expf(-g)), silu = g * sg;
            dpre[i * 2 * h + h + j] = dh * silu;
            dpre[i * 2 * h + j] = dh * u * sg * (1.0f + g * (1.0f - sg));
        }
    }
}

extern "C" cudaError_t scmoe__cuda_activation_forward(float *hid, const float *pre, int N, int h, scmoe_activation act,
                                                      cudaStream_t s) {
    CHECK_ARGS(N >= 0 && h >= 0 && (act == SCMOE_GELU || act == SCMOE_SWIGLU));
    long total = (long)N * h;
    if (total == 0) return cudaSuccess;
    CHECK_ARGS(hid && pre);
    LAUNCH(k_activation_forward, grid_for(total, THREADS), THREADS, 0, s, hid, pre, total, h, (int)act);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_activation_backward(float *dpre, const float *dhid, const float *pre, int N, int h,
                                                       scmoe_activation act, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && h >= 0 && (act == SCMOE_GELU || act == SCMOE_SWIGLU));
    long total = (long)N * h;
    if (total == 0) return cudaSuccess;
    CHECK_ARGS(dpre && dhid && pre);
    LAUNCH(k_activation_backward, grid_for(total, THREADS), THREADS, 0, s, dpre, dhid, pre, total, h, (int)act);
    return cudaGetLastError();
}

__global__ static void k_broadcast_rows(float *out, const float *b, long total, int C) {
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x)
        out[idx] = b[idx % C];
}

extern "C" cudaError_t scmoe__cuda_broadcast_rows(float *out, const float *b, int N, int C, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && C >= 0);
    long total = (long)N * C;
    if (total == 0) return cudaSuccess;
    CHECK_ARGS(out && b);
    LAUNCH(k_broadcast_rows, grid_for(total, THREADS), THREADS, 0, s, out, b, total, C);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_sum_rows(float *acc, const float *x, int N, int C, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && C >= 0);
    if (N == 0 || C == 0) return cudaSuccess;
    CHECK_ARGS(acc && x);
    colsum_ln none = {NULL, NULL, NULL, NULL};
    LAUNCH(k_column_sums, (unsigned)((C + 31) / 32), dim3(32, RY), 0, s, acc, x, N, C, none);
    return cudaGetLastError();
}

/* -------------------------------------------------------------------------------- gate */

/* one thread per token: E is small, and the row functions are the CPU's own (kernels/gate_row.h) */
__global__ static void k_gate_softmax(float *logits, float *p, float *lse, int N, int E, float noise_std, uint64_t seed,
                                      uint64_t step, int64_t token_offset) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (long)gridDim.x * blockDim.x)
        gate_softmax_row(logits + i * E, p + i * E, lse + i, E, noise_std, seed, step, token_offset + i);
}

__global__ static void k_gate_topk(int *choice, float *weight, float *score, const float *p, int N, int E, int k,
                                   int renormalize) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (long)gridDim.x * blockDim.x)
        gate_topk_row(choice + i * k, weight + i * k, score + i, p + i * E, E, k, renormalize);
}

__global__ static void k_gate_backward_logits(float *dlogits, const float *dweight, const int *choice, const float *p,
                                              const float *lse, const float *aux_coef, float z_coef, int N, int E,
                                              int k, int renormalize) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (long)gridDim.x * blockDim.x) {
        const float *pi = p + i * E, *dw = dweight + i * k;
        const int *c = choice + i * k;
        float *dl = dlogits + i * E;
        for (int e = 0; e < E; e++) dl[e] = aux_coef ? aux_coef[e] : 0.0f;
        if (k > 1 && renormalize) {
            float s = 0.0f, dot = 0.0f;
            for (int j = 0; j < k; j++) {
                s += pi[c[j]];
                dot += dw[j] * pi[c[j]];
            }
            int clamped = s <= FLT_EPSILON;
            s = clamped ? FLT_EPSILON : s;
            for (int j = 0; j < k; j++) dl[c[j]] += dw[j] / s - (clamped ? 0.0f : dot / (s * s));
        } else {
            for (int j = 0; j < k; j++) dl[c[j]] += dw[j];
        }
        float dot = 0.0f;
        for (int e = 0; e < E; e++) dot += pi[e] * dl[e];
        for (int e = 0; e < E; e++) dl[e] = pi[e] * (dl[e] - dot) + z_coef * 2.0f * lse[i] * pi[e];
    }
}

extern "C" cudaError_t scmoe__cuda_gate_softmax(float *logits, float *p, float *lse, int N, int E, float noise_std,
                                                uint64_t seed, uint64_t step, int64_t token_offset, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && E >= 1);
    if (N == 0) return cudaSuccess;
    CHECK_ARGS(logits && p && lse);
    LAUNCH(k_gate_softmax, grid_for(N, 128), 128, 0, s, logits, p, lse, N, E, noise_std, seed, step, token_offset);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_gate_topk(int *choice, float *weight, float *score, const float *p, int N, int E,
                                             int k, int renormalize, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && E >= 1 && k >= 1 && k <= E);
    if (N == 0) return cudaSuccess;
    CHECK_ARGS(choice && weight && score && p);
    LAUNCH(k_gate_topk, grid_for(N, 128), 128, 0, s, choice, weight, score, p, N, E, k, renormalize);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_gate_backward_logits(float *dlogits, const float *dweight, const int *choice,
                                                        const float *p, const float *lse, const float *aux_coef,
                                                        float z_coef, int N, int E, int k, int renormalize,
                                                        cudaStream_t s) {
    CHECK_ARGS(N >= 0 && E >= 1 && k >= 1 && k <= E);
    if (N == 0) return cudaSuccess;
    CHECK_ARGS(dlogits && dweight && choice && p && lse);
    LAUNCH(k_gate_backward_logits, grid_for(N, 128), 128, 0, s, dlogits, dweight, choice, p, lse, aux_coef, z_coef, N,
           E, k, renormalize);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------ rows: permute, pack, decode */

__global__ static void k_permute_rows(float *dst, const float *src, const int *map, int n, int d, int scatter) {
    for (long r = blockIdx.x; r < n; r += gridDim.x) {
        float *o = dst + (scatter ? (long)map[r] : r) * d;
        const float *in = src + (scatter ? r : (long)map[r]) * d;
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = in[c];
    }
}

__global__ static void k_moe_pack(float *send, const float *x, const int *slot, int n, int k, int d) {
    for (long t = blockIdx.x; t < n; t += gridDim.x)
        for (int j = 0; j < k; j++) {
            int sl = slot[t * k + j];
            if (sl < 0) continue;
            float *o = send + (long)sl * d;
            const float *in = x + t * d;
            for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = in[c];
        }
}

/* per element: scale first, then add the k rows in order j = 0..k-1, as scmoe__moe_decode does */
__global__ static void k_moe_decode(float *y, float beta, const float *rows, const int *slot, const float *weight,
                                    int n, int k, int d) {
    for (long t = blockIdx.x; t < n; t += gridDim.x) {
        float *yt = y + t * d;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = beta == 0.0f ? 0.0f : (beta != 1.0f ? yt[c] * beta : yt[c]);
            for (int j = 0; j < k; j++) {
                int sl = slot[t * k + j];
                if (sl < 0) continue;
                float w = weight ? weight[t * k + j] : 1.0f;
                acc += weight ? w * rows[(long)sl * d + c] : rows[(long)sl * d + c];
            }
            yt[c] = acc;
        }
    }
}

__global__ static void k_moe_decode_backward(float *grows, float *dweight, const float *dy, const float *rows,
                                             const int *slot, const float *weight, int n, int k, int d) {
    __shared__ float sh[32];
    for (long t = blockIdx.x; t < n; t += gridDim.x) {
        const float *dyt = dy + t * d;
        for (int j = 0; j < k; j++) {
            long a = t * k + j;
            int sl = slot[a];
            if (sl < 0) { /* uniform over the block: no thread reaches block_sum */
                if (threadIdx.x == 0) dweight[a] = 0.0f;
                continue;
            }
            const float *r = rows + (long)sl * d;
            float *g = grows + (long)sl * d, w = weight[a], dot = 0.0f;
            for (int c = threadIdx.x; c < d; c += blockDim.x) {
                dot += dyt[c] * r[c];
                g[c] = w * dyt[c];
            }
            dot = block_sum(dot, sh);
            if (threadIdx.x == 0) dweight[a] = dot;
        }
    }
}

extern "C" cudaError_t scmoe__cuda_permute_rows(float *dst, const float *src, const int *map, int n, int d, int scatter,
                                                cudaStream_t s) {
    CHECK_ARGS(n >= 0 && d >= 0);
    if (n == 0 || d == 0) return cudaSuccess;
    CHECK_ARGS(dst && src && map && dst != src);
    LAUNCH(k_permute_rows, grid_for(n, 1), threads_for(d), 0, s, dst, src, map, n, d, scatter);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_moe_pack(float *send, const float *x, const int *slot, int n, int k, int d,
                                            cudaStream_t s) {
    CHECK_ARGS(n >= 0 && k >= 1 && d >= 0);
    if (n == 0 || d == 0) return cudaSuccess;
    CHECK_ARGS(send && x && slot);
    LAUNCH(k_moe_pack, grid_for(n, 1), threads_for(d), 0, s, send, x, slot, n, k, d);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_moe_decode(float *y, float beta, const float *rows, const int *slot,
                                              const float *weight, int n, int k, int d, cudaStream_t s) {
    CHECK_ARGS(n >= 0 && k >= 1 && d >= 0);
    if (n == 0 || d == 0) return cudaSuccess;
    CHECK_ARGS(y && rows && slot);
    LAUNCH(k_moe_decode, grid_for(n, 1), threads_for(d), 0, s, y, beta, rows, slot, weight, n, k, d);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_moe_decode_backward(float *grows, float *dweight, const float *dy, const float *rows,
                                                       const int *slot, const float *weight, int n, int k, int d,
                                                       cudaStream_t s) {
    CHECK_ARGS(n >= 0 && k >= 1 && d >= 0);
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(grows && dweight && dy && rows && slot && weight);
    LAUNCH(k_moe_decode_backward, grid_for(n, 1), threads_for(d), 0, s, grows, dweight, dy, rows, slot, weight, n, k,
           d);
    return cudaGetLastError();
}

/* --------------------------------------------------------------------------- attention */

/* Forward, one block per (b, h, i): the scores row goes straight into att (which the backward needs
 * anyway), then max, exp, sum, normalise in place, masked entries 0, and out_i = P_i V. */
__global__ static void k_attention_forward(float *out, float *att, const float *qkv, int B, int T, int d, int H,
                                           int causal, float scale) {
    DYNAMIC_SHARED(float, qs); /* hd floats: this row's query */
    __shared__ float sh[32];
    int hd = d / H;
    long ld = 3L * d, rows = (long)B * H * T;
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        long bh = r / T;
        int i = (int)(r % T), b = (int)(bh / H), h = (int)(bh % H);
        const float *q = qkv + (long)b * T * ld + h * hd, *k = q + d, *v = q + 2 * d;
        float *P = att + bh * T * T + (long)i * T;
        int n = causal ? i + 1 : T;
        __syncthreads(); /* qs of the previous row is no longer read */
        for (int c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = q[(long)i * ld + c];
        __syncthreads();
        float mx = -FLT_MAX;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float *kj = k + (long)j * ld;
            float s = 0.0f;
            for (int c = 0; c < hd; c++) s += qs[c] * kj[c];
            s *= scale;
            P[j] = s;
            mx = s > mx ? s : mx;
        }
        mx = block_max(mx, sh);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float e = expf(P[j] - mx);
            P[j] = e;
            sum += e;
        }
        sum = block_sum(sum, sh);
        for (int j = threadIdx.x; j < T; j += blockDim.x) P[j] = j < n ? P[j] / sum : 0.0f;
        __syncthreads(); /* the whole row of P is written (global memory is visible to the block) */
        float *o = out + ((long)b * T + i) * d + h * hd;
        for (int c = threadIdx.x; c < hd; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < n; j++) acc += P[j] * v[(long)j * ld + c];
            o[c] = acc;
        }
    }
}

/* Backward, rows: dP_ij = dO_i . v_j, dS_ij = P_ij (dP_ij - sum_j P_ij dP_ij) (into datt, 0 where
 * masked), dq_i = scale sum_j dS_ij k_j. */
__global__ static void k_attention_backward_rows(float *dqkv, float *datt, const float *dout, const float *qkv,
                                                 const float *att, int B, int T, int d, int H, int causal,
                                                 float scale) {
    DYNAMIC_SHARED(float, dos); /* hd floats: dO_i */
    __shared__ float sh[32];
    int hd = d / H;
    long ld = 3L * d, rows = (long)B * H * T;
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        long bh = r / T;
        int i = (int)(r % T), b = (int)(bh / H), h = (int)(bh % H);
        const float *q = qkv + (long)b * T * ld + h * hd, *k = q + d, *v = q + 2 * d;
        const float *P = att + bh * T * T + (long)i * T;
        float *dS = datt + bh * T * T + (long)i * T;
        int n = causal ? i + 1 : T;
        __syncthreads();
        for (int c = threadIdx.x; c < hd; c += blockDim.x) dos[c] = dout[((long)b * T + i) * d + h * hd + c];
        __syncthreads();
        float dot = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float *vj = v + (long)j * ld;
            float s = 0.0f;
            for (int c = 0; c < hd; c++) s += dos[c] * vj[c];
            dS[j] = s;
            dot += P[j] * s;
        }
        dot = block_sum(dot, sh);
        for (int j = threadIdx.x; j < T; j += blockDim.x) dS[j] = j < n ? P[j] * (dS[j] - dot) : 0.0f;
        __syncthreads();
        float *dq = dqkv + ((long)b * T + i) * ld + h * hd;
        for (int c = threadIdx.x; c < hd; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < n; j++) acc += dS[j] * k[(long)j * ld + c];
            dq[c] = scale * acc;
        }
    }
}

/* Backward, columns: one block per (b, h, j): dv_j = sum_i P_ij dO_i, dk_j = scale sum_i dS_ij q_i
 * (i >= j when causal: the other terms are 0). */
__global__ static void k_attention_backward_cols(float *dqkv, const float *datt, const float *dout, const float *qkv,
                                                 const float *att, int B, int T, int d, int H, int causal,
                                                 float scale) {
    int hd = d / H;
    long ld = 3L * d, rows = (long)B * H * T;
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        long bh = r / T;
        int j = (int)(r % T), b = (int)(bh / H), h = (int)(bh % H);
        const float *q = qkv + (long)b * T * ld + h * hd;
        const float *P = att + bh * T * T, *dS = datt + bh * T * T;
        const float *dO = dout + (long)b * T * d + h * hd;
        float *dk = dqkv + ((long)b * T + j) * ld + d + h * hd, *dv = dk + d;
        for (int c = threadIdx.x; c < hd; c += blockDim.x) {
            float av = 0.0f, ak = 0.0f;
            for (int i = causal ? j : 0; i < T; i++) {
                av += P[(long)i * T + j] * dO[(long)i * d + c];
                ak += dS[(long)i * T + j] * q[(long)i * ld + c];
            }
            dv[c] = av;
            dk[c] = scale * ak;
        }
    }
}

static cudaError_t attention_args(int B, int T, int d, int H) {
    if (B < 0 || T < 0 || d < 0 || H < 1 || d % H) return cudaErrorInvalidValue;
    return cudaSuccess;
}

extern "C" cudaError_t scmoe__cuda_attention_forward(float *out, float *att, const float *qkv, int B, int T, int d,
                                                     int H, int causal, cudaStream_t s) {
    if (attention_args(B, T, d, H)) return cudaErrorInvalidValue;
    long rows = (long)B * H * T;
    if (rows == 0 || d == 0) return cudaSuccess;
    CHECK_ARGS(out && att && qkv);
    int hd = d / H;
    LAUNCH(k_attention_forward, grid_for(rows, 1), threads_for(T > hd ? T : hd), sizeof(float) * hd, s, out, att, qkv,
           B, T, d, H, causal, 1.0f / sqrtf((float)hd));
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv,
                                                      const float *att, int B, int T, int d, int H, int causal,
                                                      cudaStream_t s) {
    if (attention_args(B, T, d, H)) return cudaErrorInvalidValue;
    long rows = (long)B * H * T;
    if (rows == 0 || d == 0) return cudaSuccess;
    CHECK_ARGS(dqkv && datt && dout && qkv && att);
    int hd = d / H;
    float scale = 1.0f / sqrtf((float)hd);
    LAUNCH(k_attention_backward_rows, grid_for(rows, 1), threads_for(T > hd ? T : hd), sizeof(float) * hd, s, dqkv,
           datt, dout, qkv, att, B, T, d, H, causal, scale);
    LAUNCH(k_attention_backward_cols, grid_for(rows, 1), threads_for(hd), 0, s, dqkv, datt, dout, qkv, att, B, T, d, H,
           causal, scale);
    return cudaGetLastError();
}

/* -------------------------------------------------------------------------------- bf16 */

__global__ static void k_bf16_pack(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t u = __float_as_uint(src[i]);
        if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) dst[i] = (uint16_t)((u >> 16) | 0x0040u);
        else dst[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

__global__ static void k_bf16_unpack(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

static long elems_for_grid(size_t n) { return n < (size_t)MAX_GRID * THREADS ? (long)n : MAX_GRID * THREADS; }

extern "C" cudaError_t scmoe__cuda_bf16_pack(uint16_t *dst, const float *src, size_t n, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(dst && src);
    LAUNCH(k_bf16_pack, grid_for(elems_for_grid(n), THREADS), THREADS, 0, s, dst, src, n);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_bf16_unpack(float *dst, const uint16_t *src, size_t n, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(dst && src);
    LAUNCH(k_bf16_unpack, grid_for(elems_for_grid(n), THREADS), THREADS, 0, s, dst, src, n);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------------------- scale */

__global__ static void k_scale_matrix(float *C, int M, int N, int ldc, float beta) {
    long total = (long)M * N;
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        float *c = C + (idx / N) * ldc + idx % N;
        *c = beta == 0.0f ? 0.0f : beta * *c;
    }
}

extern "C" cudaError_t scmoe__cuda_scale_matrix(float *C, int M, int N, int ldc, float beta, cudaStream_t s) {
    CHECK_ARGS(M >= 0 && N >= 0 && ldc >= N);
    if (M == 0 || N == 0) return cudaSuccess;
    CHECK_ARGS(C);
    LAUNCH(k_scale_matrix, grid_for((long)M * N, THREADS), THREADS, 0, s, C, M, N, ldc, beta);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------ the compute table's small ones */

__global__ static void k_add(float *y, const float *x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

extern "C" cudaError_t scmoe__cuda_add(float *y, const float *x, size_t n, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(y && x);
    LAUNCH(k_add, grid_for(elems_for_grid(n), THREADS), THREADS, 0, s, y, x, n);
    return cudaGetLastError();
}

__global__ static void k_add_bias_rows(float *x, const float *b, long total, int C) {
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x)
        x[idx] += b[idx % C];
}

extern "C" cudaError_t scmoe__cuda_add_bias_rows(float *x, const float *b, int N, int C, cudaStream_t s) {
    CHECK_ARGS(N >= 0 && C >= 0);
    long total = (long)N * C;
    if (total == 0) return cudaSuccess;
    CHECK_ARGS(x && b);
    LAUNCH(k_add_bias_rows, grid_for(total, THREADS), THREADS, 0, s, x, b, total, C);
    return cudaGetLastError();
}

/* every thread that sees a NaN or Inf stores 1: the same value, so no atomics are needed */
__global__ static void k_flag_nonfinite(int *flag, const float *x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if (!isfinite(x[i])) *flag = 1;
}

extern "C" cudaError_t scmoe__cuda_flag_nonfinite(int *flag, const float *x, size_t n, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(flag && x);
    LAUNCH(k_flag_nonfinite, grid_for(elems_for_grid(n), THREADS), THREADS, 0, s, flag, x, n);
    return cudaGetLastError();
}

/* ---------------------------------------------------------- the shared expert's gate (combine.c) */

/* block per row: c = sigmoid(w_cg . m) (1 without w_cg), y = a + c s */
__global__ static void k_cg_combine_forward(float *y, float *cgate, const float *a, const float *s, const float *m,
                                            const float *wcg, int n, int d) {
    __shared__ float sh[32];
    for (long i = blockIdx.x; i < n; i += gridDim.x) {
        float c = 1.0f;
        if (wcg) {
            float z = 0.0f;
            for (int j = threadIdx.x; j < d; j += blockDim.x) z += wcg[j] * m[i * d + j];
            c = 1.0f / (1.0f + expf(-block_sum(z, sh)));
        }
        for (int j = threadIdx.x; j < d; j += blockDim.x) y[i * d + j] = a[i * d + j] + c * s[i * d + j];
        if (threadIdx.x == 0) cgate[i] = c;
    }
}

extern "C" cudaError_t scmoe__cuda_cg_combine_forward(float *y, float *cgate, const float *a, const float *s,
                                                      const float *m, const float *wcg, int n, int d, cudaStream_t st) {
    CHECK_ARGS(n >= 0 && d >= 1);
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(y && cgate && a && s && m);
    LAUNCH(k_cg_combine_forward, grid_for(n, 1), threads_for(d), 0, st, y, cgate, a, s, m, wcg, n, d);
    return cudaGetLastError();
}

/* block per row: ds = c dy, dz = (dy . s) c (1 - c) */
__global__ static void k_cg_combine_backward(float *ds, float *dz, const float *dy, const float *s, const float *cgate,
                                             int n, int d) {
    __shared__ float sh[32];
    for (long i = blockIdx.x; i < n; i += gridDim.x) {
        float c = cgate[i], dc = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            ds[i * d + j] = c * dy[i * d + j];
            dc += dy[i * d + j] * s[i * d + j];
        }
        dc = block_sum(dc, sh);
        if (threadIdx.x == 0) dz[i] = dc * c * (1.0f - c);
    }
}

extern "C" cudaError_t scmoe__cuda_cg_combine_backward(float *ds, float *dz, const float *dy, const float *s,
                                                       const float *cgate, int n, int d, cudaStream_t st) {
    CHECK_ARGS(n >= 0 && d >= 1);
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(ds && dz && dy && s && cgate);
    LAUNCH(k_cg_combine_backward, grid_for(n, 1), threads_for(d), 0, st, ds, dz, dy, s, cgate, n, d);
    return cudaGetLastError();
}

__global__ static void k_add_outer(float *out, const float *u, const float *v, long total, int d) {
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x)
        out[idx] += u[idx / d] * v[idx % d];
}

extern "C" cudaError_t scmoe__cuda_add_outer(float *out, const float *u, const float *v, int n, int d, cudaStream_t s) {
    CHECK_ARGS(n >= 0 && d >= 0);
    long total = (long)n * d;
    if (total == 0) return cudaSuccess;
    CHECK_ARGS(out && u && v);
    LAUNCH(k_add_outer, grid_for(total, THREADS), THREADS, 0, s, out, u, v, total, d);
    return cudaGetLastError();
}

/* ----------------------------------------------------------------- grouped GEMM pointers */

/* the table arrives by value (kernel arguments are copied at launch), so the host's copy may go at once */
__global__ static void k_store_pointers(const void **dst, cuda_pointer_table t, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = t.p[i];
}

extern "C" cudaError_t scmoe__cuda_store_pointers(const void **dst, cuda_pointer_table t, int n, cudaStream_t s) {
    CHECK_ARGS(n >= 0 && n <= 3 * CUDA_GROUP_MAX);
    if (n == 0) return cudaSuccess;
    CHECK_ARGS(dst);
    LAUNCH(k_store_pointers, 1, 3 * CUDA_GROUP_MAX, 0, s, dst, t, n);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------------------- zero */

/* words first (4-byte aligned start), then the bytes before and after them */
__global__ static void k_zero(unsigned char *p, size_t head, uint32_t *w, size_t nw, size_t tail) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < nw; i += (size_t)gridDim.x * blockDim.x)
        w[i] = 0;
    if (blockIdx.x == 0 && threadIdx.x < head) p[threadIdx.x] = 0;
    if (blockIdx.x == 0 && threadIdx.x < tail) ((unsigned char *)(w + nw))[threadIdx.x] = 0;
}

extern "C" cudaError_t scmoe__cuda_zero_bytes(void *p, size_t bytes, cudaStream_t s) {
    if (bytes == 0) return cudaSuccess;
    CHECK_ARGS(p);
    unsigned char *c = (unsigned char *)p;
    size_t head = (4 - (size_t)((uintptr_t)c & 3)) & 3;
    if (head > bytes) head = bytes;
    size_t nw = (bytes - head) / 4, tail = bytes - head - 4 * nw;
    LAUNCH(k_zero, grid_for(elems_for_grid(nw ? nw : 1), THREADS), THREADS, 0, s, c, head, (uint32_t *)(c + head), nw,
           tail);
    return cudaGetLastError();
}

/* ======================================================= issue 19: dense GEMMs and the experts' biases */

/* ---- bf16 operands with a row stride: the dense GEMMs' activation scratch (cublas.c) */

__global__ static void k_bf16_pack_rows(uint16_t *dst, const float *src, long rows, int cols, int ld) {
    long total = rows * cols;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        uint32_t u = __float_as_uint(src[(i / cols) * ld + i % cols]);
        if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) dst[i] = (uint16_t)((u >> 16) | 0x0040u);
        else dst[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

extern "C" cudaError_t scmoe__cuda_bf16_pack_rows(uint16_t *dst, const float *src, int rows, int cols, int ld,
                                                  cudaStream_t s) {
    CHECK_ARGS(rows >= 0 && cols >= 0 && ld >= cols);
    long total = (long)rows * cols;
    if (total == 0) return cudaSuccess;
    CHECK_ARGS(dst && src);
    LAUNCH(k_bf16_pack_rows, grid_for(total, THREADS), THREADS, 0, s, dst, src, (long)rows, cols, ld);
    return cudaGetLastError();
}

/* ---- the routed experts' biases, every expert of a stage in one launch (cuda_expert_bias, cuda.h) */

/* the expert whose rows [off[e], off[e + 1]) hold row r (off ascending, off[0] <= r < off[n]) */
__device__ static int expert_of_row(const cuda_expert_bias &t, int r) {
    int lo = 0, hi = t.n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (t.off[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* a block per row (grid-stride), blockIdx.y the job: x[r, :] = b_e (set) or x[r, :] += b_e */
__global__ static void k_expert_bias_forward(cuda_expert_bias t) {
    const cuda_bias_job &j = t.job[blockIdx.y];
    for (int r = t.off[0] + blockIdx.x; r < t.off[t.n]; r += gridDim.x) {
        const float *b = j.b[expert_of_row(t, r)];
        float *x = j.x + (long)r * j.C;
        for (int c = threadIdx.x; c < j.C; c += blockDim.x) x[c] = j.set ? b[c] : x[c] + b[c];
    }
}

/* k_column_sums over expert blockIdx.y's rows of job blockIdx.z: the same rows in the same order as
 * scmoe__cuda_sum_rows on that expert alone, so the sums are bit for bit the per-expert loop's */
__global__ static void k_expert_bias_backward(cuda_expert_bias t) {
    __shared__ float s[RY][33];
    const cuda_bias_job &j = t.job[blockIdx.z];
    int e = blockIdx.y, c = blockIdx.x * 32 + threadIdx.x, r0 = t.off[e], rows = t.off[e + 1] - r0;
    if (rows <= 0) return; /* the whole block: no barrier is reached */
    float a = 0.0f;
    if (c < j.C)
        for (long i = threadIdx.y; i < rows; i += RY) a += j.x[(r0 + i) * j.C + c];
    s[threadIdx.y][threadIdx.x] = a;
    __syncthreads();
    if (threadIdx.y == 0 && c < j.C) {
        float tb = 0.0f;
        for (int y = 0; y < RY; y++) tb += s[y][threadIdx.x];
        j.b[e][c] += tb;
    }
}

static cudaError_t expert_bias_args(const cuda_expert_bias *t, int *widest) {
    CHECK_ARGS(t && t->n >= 1 && t->n <= CUDA_GROUP_MAX && t->jobs >= 1 && t->jobs <= 2);
    *widest = 0;
    for (int i = 0; i < t->n; i++) CHECK_ARGS(t->off[i] >= 0 && t->off[i] <= t->off[i + 1]);
    for (int k = 0; k < t->jobs; k++) {
        const cuda_bias_job *j = &t->job[k];
        CHECK_ARGS(j->C >= 0 && (j->x || t->off[t->n] == t->off[0] || !j->C));
        for (int i = 0; i < t->n && j->C; i++) CHECK_ARGS(j->b[i] || t->off[i + 1] == t->off[i]);
        if (j->C > *widest) *widest = j->C;
    }
    return cudaSuccess;
}

extern "C" cudaError_t scmoe__cuda_expert_bias_forward(const cuda_expert_bias *t, cudaStream_t s) {
    int C = 0;
    cudaError_t e = expert_bias_args(t, &C);
    if (e != cudaSuccess) return e;
    if (C == 0 || t->off[t->n] == t->off[0]) return cudaSuccess;
    LAUNCH(k_expert_bias_forward, dim3(grid_for(t->off[t->n] - t->off[0], 1), t->jobs), threads_for(C), 0, s, *t);
    return cudaGetLastError();
}

extern "C" cudaError_t scmoe__cuda_expert_bias_backward(const cuda_expert_bias *t, cudaStream_t s) {
    int C = 0;
    cudaError_t e = expert_bias_args(t, &C);
    if (e != cudaSuccess) return e;
    if (C == 0 || t->off[t->n] == t->off[0]) return cudaSuccess;
    LAUNCH(k_expert_bias_backward, dim3((unsigned)((C + 31) / 32), t->n, t->jobs), dim3(32, RY), 0, s, *t);
    return cudaGetLastError();
}

/* ------------------------------------------------- routing planned on the device (issue 19) */

/* route.c's LOCAL send side (scmoe__route_plan_local_send) over the gate's choices, and the sums its
 * statistics need, so that nothing of the gate crosses to the host. Locations (route.c's locate): round
 * j = 0..k-1, tokens in priority order, the j-th choice of token t takes loc = fill[e]++ of its expert e;
 * they decide only which rows are kept. The send block of e holds its kept rows round by round, each
 * round's in token order whatever the priority (route.c), and the rounds before j kept
 * sum_{j' < j} clamp(C - sum_{j'' < j'} cnt[j'', e], 0, cnt[j', e]) = min(C, sum_{j' < j} cnt[j', e]) rows:
 *
 *   loc[t, j] = sum_{j' < j} cnt[j', e] + #{u before t in priority order : choice[u, j] = e}  (e = choice[t, j])
 *   kept iff loc < C;  kept rows of e in round j = clamp(C - sum_{j' < j} cnt[j', e], 0, cnt[j, e])
 *   pos[t, j] = min(C, sum_{j' < j} cnt[j', e]) + #{u < t : choice[u, j] = e, kept}
 *   slot[t, j] = start[e] + pos (kept), -1 (dropped);  start[e] = sum_{e' < e} min(count[e'], C)
 *
 * With TOKEN priority pos = loc for every kept assignment (a round keeps its first ones in token order,
 * and loc < C means sum_{j' < j} cnt[j', e] < C), so one pass gives both. With BATCH a first pass in
 * priority order gives loc, a second in token order rewrites each kept one's to pos (< C); a dropped one
 * keeps its loc >= C. Each pass is a scan per expert: one block per expert walks the tokens in tiles,
 * each thread counting ROUTE_ITEMS consecutive tokens and a block-wide prefix sum placing them;
 * integers, so any order is exact. The statistics' sums are doubles and so order-dependent: they run as
 * the host's gate_sums does, token after token, one thread per expert (an extra block, beside the
 * scans), with __dadd_rn / __dmul_rn so that no multiply-add is fused. */
#define ROUTE_ITEMS 8

/* The priority order. TOKEN: the tokens in order. BATCH: route.c's by_score_desc, a total order: the
 * higher top-1 score first, a NaN score after every number, ties (and NaNs among themselves) by token.
 * Token t's place in it is the number of tokens before it,
 *
 *   rank[t] = #{u : before(u, t)},  before(u, t) = nan_u != nan_t ? nan_t
 *                                                : !nan_u && s_u != s_t ? s_u > s_t : u < t,
 *
 * counted by each thread for its token over the scores in shared-memory tiles (n^2 comparisons, exact:
 * no sort's tie-breaking to get wrong; -0 and +0 compare equal as in by_score_desc), and
 * order[rank[t]] = t. */
__global__ static void k_route_rank(const float *score, int n, int *order) {
    __shared__ float sh[THREADS];
    for (long t0 = (long)blockIdx.x * blockDim.x; t0 < n; t0 += (long)gridDim.x * blockDim.x) {
        long t = t0 + threadIdx.x;
        float st = t < n ? score[t] : 0.0f;
        int tn = st != st, r = 0; /* x != x: NaN (isnan without the math library on either side) */
        for (long u0 = 0; u0 < n; u0 += blockDim.x) {
            __syncthreads(); /* the tile before is read */
            if (u0 + threadIdx.x < n) sh[threadIdx.x] = score[u0 + threadIdx.x];
            __syncthreads();
            long m = n - u0 < (long)blockDim.x ? n - u0 : (long)blockDim.x;
            for (long i = 0; i < m; i++) {
                float su = sh[i];
                int un = su != su;
                r += un != tn ? tn : !un && su != st ? su > st : u0 + i < t;
            }
        }
        if (t < n) order[r] = (int)t;
    }
}

__device__ static int block_inclusive_scan(int v, int *sh) {
    sh[threadIdx.x] = v;
    for (unsigned o = 1; o < blockDim.x; o <<= 1) {
        __syncthreads();
        int add = threadIdx.x >= o ? sh[threadIdx.x - o] : 0;
        __syncthreads();
        sh[threadIdx.x] += add;
    }
    __syncthreads();
    return sh[threadIdx.x];
}

/* One block's pass over the tokens in `order` (NULL: 0..n-1): round j's assignments to expert e get
 * r0, r0 + 1, ... in that order, in slot (below >= 0: only those whose slot holds a value < below, the
 * kept ones); returns how many. A tile's slots are read before any is written, each by its own thread. */
__device__ static int route_place(const int *choice, const int *order, int n, int k, int j, int e, long long below,
                                  int r0, int *slot, int *sh) {
    int placed = 0;
    for (long t0 = 0; t0 < n; t0 += (long)blockDim.x * ROUTE_ITEMS) {
        long lo = t0 + (long)threadIdx.x * ROUTE_ITEMS;
        int mine = 0;
        for (int i = 0; i < ROUTE_ITEMS; i++) {
            long t = lo + i < n ? (order ? order[lo + i] : lo + i) : -1;
            mine += t >= 0 && choice[t * k + j] == e && (below < 0 || slot[t * k + j] < below);
        }
        int incl = block_inclusive_scan(mine, sh), total = sh[blockDim.x - 1];
        int r = r0 + placed + incl - mine;
        for (int i = 0; i < ROUTE_ITEMS; i++) {
            long t = lo + i < n ? (order ? order[lo + i] : lo + i) : -1;
            if (t >= 0 && choice[t * k + j] == e && (below < 0 || slot[t * k + j] < below)) slot[t * k + j] = r++;
        }
        placed += total;
        __syncthreads(); /* sh is rewritten by the next tile; the slots are another pass's */
    }
    return placed;
}

/* blocks 0..E-1: loc of expert e's assignments into slot, over the tokens in priority order (NULL: 0..n-1),
 * then with BATCH (order given) each kept one's pos, and cnt[j * E + e]; block E: gsum [E + 1] (token
 * after token, whatever the priority: the host's sums) */
__global__ static void k_route_scan(const int *choice, const float *p, const float *lse, const int *order, int n, int E,
                                    int k, long long capacity, int *slot, int *cnt, double *gsum) {
    __shared__ int sh[THREADS];
    int e = blockIdx.x;
    if (e == E) {
        for (int c = threadIdx.x; c <= E; c += blockDim.x) {
            double s = 0.0;
            if (c < E)
                for (long t = 0; t < n; t++) s = __dadd_rn(s, (double)p[t * E + c]);
            else
                for (long t = 0; t < n; t++) s = __dadd_rn(s, __dmul_rn((double)lse[t], (double)lse[t]));
            gsum[c] = s;
        }
        return;
    }
    int base = 0; /* sum_{j' < j} cnt[j', e] */
    for (int j = 0; j < k; j++) {
        int c = route_place(choice, order, n, k, j, e, -1, base, slot, sh);
        if (order) /* the locations' pass ended in __syncthreads: its slots, by any thread, are visible */
            route_place(choice, NULL, n, k, j, e, capacity, base < capacity ? base : (int)capacity, slot, sh);
        if (threadIdx.x == 0) cnt[j * E + e] = c;
        base += c;
    }
}

/* one block: per expert the kept rows per round (the counts message for its rank), kept and top-1
 * counts, the sums; start[e] for the slots. The host-visible outputs (mapped memory) are all written
 * before *seq = seq_value, which the host polls: __threadfence_system orders them for it. */
__global__ static void k_route_summary(const int *cnt, const double *gsum_d, int E, int k, int ep_size,
                                       long long capacity, int *kept_d, int *start, int32_t *counts, double *gsum,
                                       int32_t *top1, int32_t *kept, uint32_t *seq, uint32_t seq_value) {
    int El = E / ep_size, msg = 1 + El * k;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        long long before = 0;
        int kept_e = 0;
        for (int j = 0; j < k; j++) {
            int c = cnt[j * E + e];
            long long room = capacity - before;
            int kj = room <= 0 ? 0 : room < c ? (int)room : c;
            counts[(e / El) * msg + 1 + (e % El) * k + j] = kj;
            kept_e += kj;
            before += c;
        }
        kept_d[e] = kept[e] = kept_e;
        top1[e] = cnt[e]; /* round 0: the first choices */
        gsum[e] = gsum_d[e];
    }
    if (threadIdx.x == 0) {
        gsum[E] = gsum_d[E];
        for (int q = 0; q < ep_size; q++) counts[q * msg] = 0;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int e = 0, s = 0; e < E; e++) {
            start[e] = s;
            s += kept_d[e];
        }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) *(volatile uint32_t *)seq = seq_value;
}

/* places to send rows: slot = start[e] + pos when kept (value < C), else -1 */
__global__ static void k_route_slots(int *slot, const int *choice, const int *start, long nk, long long capacity) {
    for (long a = (long)blockIdx.x * blockDim.x + threadIdx.x; a < nk; a += (long)gridDim.x * blockDim.x) {
        int loc = slot[a];
        slot[a] = loc < capacity ? start[choice[a]] + loc : -1;
    }
}

extern "C" cudaError_t scmoe__cuda_route_local(const int *choice, const float *p, const float *lse, const float *score,
                                               int n, int E, int k, int ep_size, int64_t capacity, int *slot, int *work,
                                               double *work_sum, int32_t *counts, double *gsum, int32_t *top1,
                                               int32_t *kept, uint32_t *seq, uint32_t seq_value, cudaStream_t s) {
    CHECK_ARGS(n >= 0 && E >= 1 && k >= 1 && k <= E && ep_size >= 1 && E % ep_size == 0 && capacity >= 0);
    CHECK_ARGS(work && work_sum && counts && gsum && top1 && kept && seq);
    CHECK_ARGS(n == 0 || (choice && p && lse && slot));
    int *cnt = work, *kept_d = work + (size_t)k * E, *start = kept_d + E, *order = score ? start + E : NULL;
    if (score && n > 0) LAUNCH(k_route_rank, grid_for(n, THREADS), THREADS, 0, s, score, n, order);
    /* even with no tokens: the summary (zeros) and its seq are what the host waits for */
    LAUNCH(k_route_scan, E + 1, THREADS, 0, s, choice, p, lse, order, n, E, k, (long long)capacity, slot, cnt,
           work_sum);
    LAUNCH(k_route_summary, 1, THREADS, 0, s, cnt, work_sum, E, k, ep_size, (long long)capacity, kept_d, start, counts,
           gsum, top1, kept, seq, seq_value);
    long nk = (long)n * k;
    if (nk > 0)
        LAUNCH(k_route_slots, grid_for(nk, THREADS), THREADS, 0, s, slot, choice, start, nk, (long long)capacity);
    return cudaGetLastError();
}

/* GLOBAL capacity, TOKEN priority, over several ranks: route.c's scmoe__route_plan_global_send, in two
 * halves around the host's scan of the round counts over the ranks. The first half is
 * scmoe__cuda_route_local with capacity INT64_MAX and TOKEN priority: it leaves in work the round counts
 * cnt [k][E] of my tokens and start[e] = sum_{e' < e} sum_j cnt[j, e'], in slot my locations among my
 * own assignments, slot[t, j] = start[e] + sum_{j' < j} cnt[j', e] + pos[t, j] (pos: my earlier tokens
 * that chose e in round j), and in the counts message the round counts for the host. The host scans them
 * over the ranks and sends down base [k E + 1]: base[j E + e] = sum_{j' < j} total[j', e] + prefix[j, e],
 * the global location of my first round-j assignment to e, and base[k E] = C. Then route.c's
 *
 *   loc = base[j, e] + pos,  kept iff loc < C,  so  kept[j, e] = clamp(C - base[j, e], 0, cnt[j, e])
 *
 * kept rows of round j are my first kept[j, e] of that round, and the send block of e holds them by
 * round, then pos: slot = sum_{e' < e} sum_j kept[j, e'] + sum_{j' < j} kept[j', e] + pos. One block
 * tabulates, per (j, e), delta = that slot minus the first half's value at pos 0, and lim = the first
 * half's value at pos = kept[j, e]; a grid then rewrites each slot s as s < lim ? s + delta : -1. */
__global__ static void k_route_global_table(const int *cnt, const int *start, const long long *base, int E, int k,
                                            int *delta, int *lim) {
    if (threadIdx.x != 0) return; /* k E entries, a running sum: one thread */
    long long C = base[(size_t)k * E];
    for (int e = 0, s = 0; e < E; e++)
        for (int j = 0, mine = start[e]; j < k; j++) {
            int c = cnt[j * E + e];
            long long room = C - base[j * E + e];
            int kj = room <= 0 ? 0 : room < c ? (int)room : c;
            delta[j * E + e] = s - mine;
            lim[j * E + e] = mine + kj;
            s += kj;
            mine += c;
        }
}

__global__ static void k_route_global_slots(int *slot, const int *choice, const int *delta, const int *lim, int E,
                                            int k, long nk) {
    for (long a = (long)blockIdx.x * blockDim.x + threadIdx.x; a < nk; a += (long)gridDim.x * blockDim.x) {
        int i = (int)(a % k) * E + choice[a], s = slot[a];
        slot[a] = s < lim[i] ? s + delta[i] : -1;
    }
}

extern "C" cudaError_t scmoe__cuda_route_global_slots(const int *choice, int n, int E, int k, const int64_t *base,
                                                      int *slot, int *work, cudaStream_t s) {
    CHECK_ARGS(n >= 0 && E >= 1 && k >= 1 && k <= E && base && work);
    CHECK_ARGS(n == 0 || (choice && slot));
    long nk = (long)n * k;
    if (nk == 0) return cudaSuccess;
    int *cnt = work, *start = work + (size_t)k * E + E, *delta = start + E, *lim = delta + (size_t)k * E;
    LAUNCH(k_route_global_table, 1, 32, 0, s, cnt, start, (const long long *)base, E, k, delta, lim);
    LAUNCH(k_route_global_slots, grid_for(nk, THREADS), THREADS, 0, s, slot, choice, delta, lim, E, k, nk);
    return cudaGetLastError();
}
