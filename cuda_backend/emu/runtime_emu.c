/* runtime_emu.c: the CUDA runtime and cuBLAS entry points the backend and tests/test_cuda.c call,
 * on host memory, for the host emulation (`make check-cuda-emu`; linked instead of libcudart and
 * libcublas). One "device", synchronous: every kernel, GEMM and copy is done when the call returns, except
 * that a copy into pinned host memory on a stream lands only when the host synchronises with it (below). The GEMMs are the BLAS definition, column-major, in double; with
 * CUBLAS_COMPUTE_32F_FAST_16BF the inputs are first rounded to bf16 (nearest even), as tensor cores
 * would. Test builds only: never part of libscmoe_cuda.a. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ---- runtime ---- */

cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
static int land(cudaStream_t s, unsigned long ticket);
static unsigned long tickets; /* deferred copies so far (below) */
cudaError_t cudaDeviceSynchronize(void) {
    land(NULL, tickets);
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

/* ---- device memory the host cannot touch ----
 * After emu_protect_device(1), device allocations are pages of their own, PROT_NONE except while an
 * emulated device call (a copy, a memset, a GEMM, a launch) runs: host code that dereferences a device
 * pointer faults here as it would on a GPU. Off (the default), they are malloc's, which the sanitizers
 * bounds-check. Pinned host memory is never protected. Device calls are synchronous and come from one
 * host thread, so a depth counter is all the bookkeeping needed. */
typedef struct emu_block {
    void *p;
    size_t len;   /* 0: malloc'd */
    size_t bytes; /* as asked */
    int device;   /* cudaMalloc's (poisoned), not pinned host memory */
} emu_block;
static emu_block *blocks;
static size_t n_blocks, cap_blocks, depth;
static int protecting;

/* ---- uninitialised device memory ----
 * cudaMalloc's memory starts as EMU_POISON words (a signalling NaN with a payload arithmetic never
 * produces: any operation on it gives a quiet NaN, a different word), not the zeros fresh pages would
 * hold, so a kernel that skips an output row leaves a NaN the comparison against the CPU catches. A copy
 * out of device memory counts the words it moves that still hold the poison: bytes no kernel, copy or
 * memset wrote, what compute-sanitizer's initcheck reports on a device (emu_uninit_words). */
#define EMU_POISON 0x7FA5A5A5u
static size_t uninit_words;
static const void *uninit_first;

size_t emu_uninit_words(const void **first) {
    if (first) *first = uninit_first;
    return uninit_words;
}

static void poison(void *p, size_t bytes) {
    uint32_t w = EMU_POISON;
    for (size_t i = 0; i + 4 <= bytes; i += 4) memcpy((char *)p + i, &w, 4);
}

/* the 4-byte-aligned words of [src, src + bytes) inside a cudaMalloc block that still hold the poison */
static void count_uninit(const void *src, size_t bytes) {
    const char *s = src;
    for (size_t i = 0; i < n_blocks; i++) {
        const char *b = blocks[i].p;
        if (!blocks[i].device || s < b || s >= b + blocks[i].bytes) continue;
        size_t lo = ((size_t)(s - b) + 3) & ~(size_t)3, hi = (size_t)(s - b) + bytes;
        hi = hi < blocks[i].bytes ? hi : blocks[i].bytes;
        for (size_t o = lo; o + 4 <= hi; o += 4) {
            uint32_t w;
            memcpy(&w, b + o, 4);
            if (w != EMU_POISON) continue;
            if (!uninit_words++) uninit_first = b + o;
        }
        return;
    }
}

static void protect_all(int prot) {
    for (size_t i = 0; i < n_blocks; i++)
        if (blocks[i].len) mprotect(blocks[i].p, blocks[i].len, prot);
}
void emu_protect_device(int on) {
    protecting = on;
    protect_all(on && !depth ? PROT_NONE : PROT_READ | PROT_WRITE);
}
void emu_device_enter(void) {
    if (depth++ == 0 && protecting) protect_all(PROT_READ | PROT_WRITE);
}
void emu_device_leave(void) {
    if (--depth == 0 && protecting) protect_all(PROT_NONE);
}

/* Room for element n of *arr (capacity *cap elements of elem bytes), doubling from 64; -1: out of memory. */
static int grow(void **arr, size_t *cap, size_t n, size_t elem) {
    if (n < *cap) return 0;
    size_t c = *cap ? 2 * *cap : 64;
    void *a = realloc(*arr, elem * c);
    if (!a) return -1;
    *arr = a;
    *cap = c;
    return 0;
}

static cudaError_t device_alloc(void **p, size_t bytes, int pinned) {
    if (grow((void **)&blocks, &cap_blocks, n_blocks, sizeof *blocks)) return cudaErrorMemoryAllocation;
    size_t len = 0;
    if (protecting && !pinned) {
        len = (bytes + 4095) & ~(size_t)4095;
        len = len ? len : 4096;
        *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (*p == MAP_FAILED) *p = NULL;
    } else {
        *p = malloc(bytes ? bytes : 1);
    }
    if (!*p) return cudaErrorMemoryAllocation;
    if (!pinned) poison(*p, bytes);
    if (len && !depth) mprotect(*p, len, PROT_NONE);
    blocks[n_blocks++] = (emu_block){*p, len, bytes, !pinned};
    return cudaSuccess;
}
/* cudaMalloc calls so far: a test takes it after creating a layer and checks that its forward and
 * backward allocate nothing (no allocation in the hot path) */
static size_t device_allocs;
size_t emu_device_allocs(void) { return device_allocs; }
cudaError_t cudaMalloc(void **p, size_t bytes) {
    device_allocs++;
    return device_alloc(p, bytes, 0);
}
cudaError_t cudaFree(void *p) {
    land(NULL, tickets); /* nothing lands in freed memory */
    for (size_t i = 0; p && i < n_blocks; i++)
        if (blocks[i].p == p) {
            if (blocks[i].len) munmap(p, blocks[i].len);
            else free(p);
            blocks[i] = blocks[--n_blocks];
            return cudaSuccess;
        }
    return p ? cudaErrorInvalidValue : cudaSuccess;
}
cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned int flags) {
    (void)flags;
    return device_alloc(p, bytes, 1);
}
cudaError_t cudaFreeHost(void *p) { return cudaFree(p); }
/* one address space, as with unified addressing on a device */
cudaError_t cudaHostGetDevicePointer(void **dp, void *p, unsigned int flags) {
    (void)flags;
    *dp = p;
    return cudaSuccess;
}
/* ---- copies from device memory to the host ----
 * What a forward that plans its routing on the device must not do (test_cuda_moe counts them around a
 * forward): every copy whose source is cudaMalloc's and whose destination is not. */
static size_t to_host_copies;
size_t emu_copies_to_host(void) { return to_host_copies; }

static int in_device_block(const void *p) {
    for (size_t i = 0; i < n_blocks; i++)
        if (blocks[i].device && (const char *)p >= (const char *)blocks[i].p &&
            (const char *)p < (const char *)blocks[i].p + blocks[i].bytes)
            return 1;
    return 0;
}

/* ---- copies to MPI's buffers land late ----
 * A device copies asynchronously: what a cudaMemcpyAsync from device memory into pinned host memory
 * (compute_ops.copy_out: the gradient buckets, the exchanges' peer blocks) writes is there only once the
 * host has learnt it landed. So here such a copy reads its source when enqueued (every kernel before it
 * has run: launches are synchronous) but writes its destination only when the host synchronises with it:
 * cudaEventSynchronize or a cudaEventQuery that says cudaSuccess for an event recorded after it on its
 * stream, cudaStreamSynchronize of its stream, a cudaStreamWaitEvent on such an event (the device waits:
 * the kernels after it may read the destination), a later copy, launch or GEMM on its stream (streams
 * run in order: emu_stream_order), or a free. MPI reading the buffer before then reads the old bytes, as it could on a device.
 * emu_copy_polls(n): an event then answers cudaErrorNotReady to its first n queries after each record
 * while it still has copies to land (default 0: the first query lands them). emu_copy_counts: the
 * queries so far, and the waits that found copies not yet landed (where the host blocked on a device). */
typedef struct emu_pending {
    void *dst, *data;
    size_t bytes;
    cudaStream_t stream;
    unsigned long ticket;
} emu_pending;
static emu_pending *pending;
static size_t n_pending, cap_pending;
static long copy_polls;
static size_t event_queries, event_blocks;

void emu_copy_polls(long n) { copy_polls = n; }
void emu_stream_order(cudaStream_t s) { land(s, tickets); }
void emu_copy_counts(size_t *queries, size_t *waits) {
    *queries = event_queries;
    *waits = event_blocks;
}

struct emu_event {
    cudaStream_t stream;
    unsigned long ticket; /* the last deferred copy enqueued before its record (0: none) */
    long polls;           /* NotReady answers left */
};

/* lands the pending copies of stream s (NULL: every stream) up to ticket; whether there were any */
static int land(cudaStream_t s, unsigned long ticket) {
    int any = 0;
    size_t kept = 0;
    for (size_t i = 0; i < n_pending; i++) {
        emu_pending *c = &pending[i];
        if ((s && c->stream != s) || c->ticket > ticket) {
            pending[kept++] = *c;
            continue;
        }
        memcpy(c->dst, c->data, c->bytes);
        free(c->data);
        any = 1;
    }
    n_pending = kept;
    return any;
}
static int has_pending(cudaStream_t s, unsigned long ticket) {
    for (size_t i = 0; i < n_pending; i++)
        if ((!s || pending[i].stream == s) && pending[i].ticket <= ticket) return 1;
    return 0;
}

static int in_pinned_block(const void *p) {
    for (size_t i = 0; i < n_blocks; i++)
        if (!blocks[i].device && (const char *)p >= (const char *)blocks[i].p &&
            (const char *)p < (const char *)blocks[i].p + blocks[i].bytes)
            return 1;
    return 0;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind) {
    (void)kind;
    if (bytes && in_device_block(src) && !in_device_block(dst)) to_host_copies++;
    emu_device_enter();
    count_uninit(src, bytes);
    if (bytes) memmove(dst, src, bytes);
    emu_device_leave();
    return cudaSuccess;
}
/* fault injection for tests: the asynchronous copy after `after` more successful ones fails, once,
 * with cudaErrorInvalidValue (-1: none) */
static long copies_before_failure = -1;
void emu_fail_copy_after(long after) { copies_before_failure = after; }

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind, cudaStream_t s) {
    if (copies_before_failure == 0) {
        copies_before_failure = -1;
        return cudaErrorInvalidValue;
    }
    if (copies_before_failure > 0) copies_before_failure--;
    land(s, tickets);
    if (!s || !bytes || !in_device_block(src) || !in_pinned_block(dst)) return cudaMemcpy(dst, src, bytes, kind);
    if (grow((void **)&pending, &cap_pending, n_pending, sizeof *pending)) return cudaErrorMemoryAllocation;
    void *data = malloc(bytes);
    if (!data) return cudaErrorMemoryAllocation;
    to_host_copies++;
    emu_device_enter();
    count_uninit(src, bytes);
    memcpy(data, src, bytes);
    emu_device_leave();
    pending[n_pending++] = (emu_pending){dst, data, bytes, s, ++tickets};
    return cudaSuccess;
}
cudaError_t cudaMemset(void *p, int v, size_t bytes) {
    emu_device_enter();
    memset(p, v, bytes);
    emu_device_leave();
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s) {
    (void)s;
    return cudaMemset(p, v, bytes);
}

/* streams are tokens; every launch is done when it returns, copies to pinned memory when landed */
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
    (void)flags;
    *s = (cudaStream_t)malloc(1);
    return *s ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    land(s, tickets);
    free(s);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (land(s, tickets)) event_blocks++;
    return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
    land(s, tickets);
    return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags) {
    (void)flags;
    *e = (cudaEvent_t)calloc(1, sizeof(struct emu_event));
    return *e ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    free(e);
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    struct emu_event *v = (struct emu_event *)e;
    v->stream = s;
    v->ticket = tickets;
    v->polls = copy_polls;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    struct emu_event *v = (struct emu_event *)e;
    if (land(v->stream, v->ticket)) event_blocks++;
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    struct emu_event *v = (struct emu_event *)e;
    event_queries++;
    if (has_pending(v->stream, v->ticket) && v->polls > 0) {
        v->polls--;
        return cudaErrorNotReady;
    }
    land(v->stream, v->ticket);
    return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags) {
    struct emu_event *v = (struct emu_event *)e;
    (void)s;
    (void)flags;
    land(v->stream, v->ticket);
    return cudaSuccess;
}

/* ---- cuBLAS ---- */

struct cublasContext {
    cudaStream_t stream;
    cublasMath_t math;
};

cublasStatus_t cublasCreate_v2(cublasHandle_t *h) {
    *h = calloc(1, sizeof **h);
    return *h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    free(h);
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}
const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "emulated cuBLAS error";
}

static float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) u |= 0x00400000u;
    else u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* element (i, j) of op(X), X column-major with leading dimension ld, stored as fp32 or bf16 */
static double elem(const void *X, cudaDataType t, int ld, int trans, int i, int j, int round) {
    long idx = trans ? (long)j + (long)i * ld : (long)i + (long)j * ld;
    float f;
    if (t == CUDA_R_16BF) {
        uint32_t u = (uint32_t)((const uint16_t *)X)[idx] << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        f = ((const float *)X)[idx];
        if (round) f = bf16_round(f);
    }
    return f;
}

/* the BLAS definition: m x n C = alpha op(A)[m x k] op(B)[k x n] + beta C; beta == 0 overwrites */
static cublasStatus_t gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const void *A,
                           cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb, float beta, float *C,
                           int ldc, int round) {
    if (m < 0 || n < 0 || k < 0 || ldc < (m > 1 ? m : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    if (lda < ((ta == CUBLAS_OP_N ? m : k) > 1 ? (ta == CUBLAS_OP_N ? m : k) : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb < ((tb == CUBLAS_OP_N ? k : n) > 1 ? (tb == CUBLAS_OP_N ? k : n) : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0.0;
            for (int l = 0; l < k; l++)
                s +=
                    elem(A, at, lda, ta != CUBLAS_OP_N, i, l, round) * elem(B, bt, ldb, tb != CUBLAS_OP_N, l, j, round);
            float *c = &C[(long)i + (long)j * ldc];
            *c = (float)(alpha * s + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                              float *C, int ldc) {
    emu_stream_order(h->stream);
    emu_device_enter();
    cublasStatus_t st = gemm(ta, tb, m, n, k, *alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, *beta, C, ldc, 0);
    emu_device_leave();
    return st;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
    (void)algo;
    emu_stream_order(h->stream);
    if (ct != CUDA_R_32F || (at != CUDA_R_32F && at != CUDA_R_16BF) || (bt != CUDA_R_32F && bt != CUDA_R_16BF) ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    emu_device_enter();
    cublasStatus_t st = gemm(ta, tb, m, n, k, *(const float *)alpha, A, at, lda, B, bt, ldb, *(const float *)beta, C,
                             ldc, compute == CUBLAS_COMPUTE_32F_FAST_16BF);
    emu_device_leave();
    return st;
}

/* one group per entry as the library calls it, or group_size[g] GEMMs of the same shape; the pointer
 * arrays are device memory, read here inside the emulated device call like the operands */
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                          const int m[], const int n[], const int k[], const void *alpha,
                                          const void *const A[], cudaDataType at, const int lda[],
                                          const void *const B[], cudaDataType bt, const int ldb[], const void *beta,
                                          void *const C[], cudaDataType ct, const int ldc[], int group_count,
                                          const int group_size[], cublasComputeType_t compute) {
    emu_stream_order(h->stream);
    if (ct != CUDA_R_32F || at != bt || (at != CUDA_R_32F && at != CUDA_R_16BF) ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    emu_device_enter();
    for (int g = 0, p = 0; g < group_count && !st; g++)
        for (int j = 0; j < group_size[g] && !st; j++, p++)
            st = gemm(ta[g], tb[g], m[g], n[g], k[g], ((const float *)alpha)[g], A[p], at, lda[g], B[p], bt, ldb[g],
                      ((const float *)beta)[g], C[p], ldc[g], compute == CUBLAS_COMPUTE_32F_FAST_16BF);
    emu_device_leave();
    return st;
}
