/* cublas.c: blas.h's compute interface on cuBLAS, for device pointers, on the stream of a cuda_blas.
 *
 * The core's GEMMs are row-major; cuBLAS is column-major. A row-major M x N matrix with row stride
 * ld is the column-major N x M matrix with the same ld, its transpose. So
 *     C = op(A) op(B)   (row-major)   <=>   C^T = op(B)^T op(A)^T   (column-major)
 * and the call is cublasSgemm(opB, opA, N, M, K, B, ldb, A, lda, C, ldc): operands swapped, ops and
 * leading dimensions kept. scmoe__cuda_gemm_to_colmajor does exactly that mapping (and the checks), apart
 * from any device call, so it is tested on the host.
 *
 * Math: CUDA_MATH_FP32 is cuBLAS's default math (no TF32 unless the NVIDIA_TF32_OVERRIDE environment
 * says so); CUDA_MATH_BF16 runs the same fp32 GEMMs as cublasGemmEx with
 * CUBLAS_COMPUTE_32F_FAST_16BF (inputs may be rounded to bf16 for the tensor cores, fp32
 * accumulation). scmoe__cuda_blas_gemm_bf16 takes bf16 operands directly (CUDA_R_16BF). */
#include "cuda.h"
#include <cublas_v2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static int cuda_blas_max_threads(void) { return 1; } /* host threads a GEMM may use: it runs on the device */

int scmoe__cuda_gemm_to_colmajor(int trans_a, int trans_b, int M, int N, int K, int lda, int ldb, int ldc,
                                 cuda_gemm_colmajor *out) {
    if (!out) return CUDA_GEMM_BAD;
    if (M <= 0 || N <= 0) return CUDA_GEMM_NOTHING;
    if (ldc < N) return CUDA_GEMM_BAD;
    if (K <= 0) return CUDA_GEMM_SCALE;
    /* row-major A is M x K (lda >= K), or K x M when transposed (lda >= M); B likewise */
    if (lda < (trans_a ? M : K) || ldb < (trans_b ? K : N)) return CUDA_GEMM_BAD;
    out->trans_first = trans_b != 0;
    out->trans_second = trans_a != 0;
    out->m = N;
    out->n = M;
    out->k = K;
    out->ld_first = ldb;
    out->ld_second = lda;
    out->ldc = ldc;
    return CUDA_GEMM_RUN;
}

static void fail(cuda_blas *cb, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(cuda_blas *cb, int code, const char *fmt, ...) {
    if (cb->status) return; /* keep the first */
    cb->status = code ? code : -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cb->err, sizeof cb->err, fmt, ap);
    va_end(ap);
}

static void set_err(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(char *err, const char *fmt, ...) {
    if (!err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, 160, fmt, ap);
    va_end(ap);
}

/* blas_gemm_fn: the table is cuda_blas's first member, so self is the cuda_blas */
static void table_gemm(const blas_backend *self, int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    scmoe__cuda_blas_gemm((cuda_blas *)self, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void gemm_math(cuda_blas *cb, int math, int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

static int gemm_rounded(cuda_blas *cb, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                        const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb, int ldb, float beta, float *C,
                        int ldc);

/* blas_gemm_bf16_fn (SCMOE_PRECISION_BF16): the host's bf16 math (blas.h) on bf16 operands, the weights'
 * device copies (Ab, Bb) and the activations rounded once into the scratch (gemm_rounded); where the
 * scratch has no room (no layer reserved it), CUDA_MATH_BF16's GEMM on the fp32 operands */
static void table_gemm_bf16(const blas_backend *self, int trans_a, int trans_b, int M, int N, int K, float alpha,
                            const float *A, const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb, int ldb,
                            float beta, float *C, int ldc) {
    cuda_blas *cb = (cuda_blas *)self;
    if (!gemm_rounded(cb, trans_a, trans_b, M, N, K, alpha, A, Ab, lda, B, Bb, ldb, beta, C, ldc))
        gemm_math(cb, CUDA_MATH_BF16, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static const char *table_describe(const blas_backend *self) {
    return ((const cuda_blas *)self)->math == CUDA_MATH_BF16
               ? "cublas (CUBLAS_COMPUTE_32F_FAST_16BF)"
               : "cublas (fp32; bf16 precision: CUBLAS_COMPUTE_32F_FAST_16BF)";
}

scmoe_status scmoe__cuda_blas_create(cuda_blas **out, cudaStream_t stream, int math, char *err) {
    if (err) err[0] = '\0';
    if (!out) {
        set_err(err, "scmoe__cuda_blas_create: out is NULL");
        return SCMOE_ERR_NULL;
    }
    *out = NULL;
    if (math != CUDA_MATH_FP32 && math != CUDA_MATH_BF16) {
        set_err(err, "scmoe__cuda_blas_create: unknown math %d (CUDA_MATH_FP32 or CUDA_MATH_BF16)", math);
        return SCMOE_ERR_OPTION;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        if (e == cudaSuccess) set_err(err, "no CUDA device (cudaGetDeviceCount: 0 devices)");
        else set_err(err, "no CUDA device (cudaGetDeviceCount: %s)", cudaGetErrorString(e));
        return SCMOE_ERR_UNSUPPORTED;
    }
    cuda_blas *cb = calloc(1, sizeof *cb);
    if (!cb) {
        set_err(err, "scmoe__cuda_blas_create: out of memory");
        return SCMOE_ERR_NOMEM;
    }
    cb->base.name = "cublas";
    cb->base.gemm = table_gemm;
    cb->base.max_threads = cuda_blas_max_threads;
    cb->base.gemm_bf16 = table_gemm_bf16;
    cb->base.describe = table_describe;
    cb->math = math;
    if (!stream) {
        e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            set_err(err, "cudaStreamCreateWithFlags failed: %s", cudaGetErrorString(e));
            free(cb);
            return SCMOE_ERR_UNSUPPORTED;
        }
        cb->owns_stream = 1;
    }
    cb->stream = stream;
    cublasHandle_t h;
    cublasStatus_t bs = cublasCreate(&h);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        set_err(err, "cublasCreate failed: %s", cublasGetStatusString(bs));
        scmoe__cuda_blas_destroy(cb);
        return bs == CUBLAS_STATUS_ALLOC_FAILED ? SCMOE_ERR_NOMEM : SCMOE_ERR_UNSUPPORTED;
    }
    cb->handle = h;
    if ((e = cudaMalloc((void **)&cb->ptrs, sizeof(void *) * 3 * CUDA_GROUP_MAX)) != cudaSuccess) {
        set_err(err, "cudaMalloc of the grouped GEMM's pointer arrays failed: %s", cudaGetErrorString(e));
        scmoe__cuda_blas_destroy(cb);
        return SCMOE_ERR_NOMEM;
    }
    if ((bs = cublasSetStream(h, stream)) != CUBLAS_STATUS_SUCCESS ||
        (bs = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH)) != CUBLAS_STATUS_SUCCESS) {
        set_err(err, "cublasSetStream / cublasSetMathMode failed: %s", cublasGetStatusString(bs));
        scmoe__cuda_blas_destroy(cb);
        return SCMOE_ERR_UNSUPPORTED;
    }
    *out = cb;
    return SCMOE_OK;
}

void scmoe__cuda_blas_destroy(cuda_blas *cb) {
    if (!cb) return;
    if (cb->handle) cublasDestroy(cb->handle);
    cudaFree(cb->ptrs);
    cudaFree(cb->bf16);
    if (cb->owns_stream && cb->stream) cudaStreamDestroy(cb->stream);
    free(cb);
}

const blas_backend *scmoe__cuda_blas_table(cuda_blas *cb) { return cb ? &cb->base : NULL; }

/* The checks and the K = 0 case shared by both GEMMs: returns 1 when a cuBLAS call must follow, else
 * 0 with *code = 0 (nothing left to do) or the failure (also recorded on cb). */
static int gemm_prepare(cuda_blas *cb, const char *who, int trans_a, int trans_b, int M, int N, int K, int lda, int ldb,
                        float beta, const void *A, const void *B, float *C, int ldc, cuda_gemm_colmajor *g, int *code) {
    *code = 0;
    int r = scmoe__cuda_gemm_to_colmajor(trans_a, trans_b, M, N, K, lda, ldb, ldc, g);
    if (r == CUDA_GEMM_NOTHING) return 0;
    if (r == CUDA_GEMM_BAD || !C || (r == CUDA_GEMM_RUN && (!A || !B))) {
        *code = CUBLAS_STATUS_INVALID_VALUE;
        fail(cb, *code, "%s: bad arguments (M %d N %d K %d lda %d ldb %d ldc %d, trans %d %d%s)", who, M, N, K, lda,
             ldb, ldc, trans_a, trans_b, !C || (r == CUDA_GEMM_RUN && (!A || !B)) ? ", NULL operand" : "");
        return 0;
    }
    if (r == CUDA_GEMM_SCALE) { /* K = 0: C = beta C, as openblas.c makes explicit */
        cudaError_t e = scmoe__cuda_scale_matrix(C, M, N, ldc, beta, cb->stream);
        if (e != cudaSuccess) {
            *code = (int)e;
            fail(cb, *code, "%s: scaling C for K = 0 failed: %s", who, cudaGetErrorString(e));
        }
        return 0;
    }
    return 1;
}

static cublasOperation_t op(int t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

/* scmoe__cuda_blas_gemm in the given math */
static void gemm_math(cuda_blas *cb, int math, int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    cuda_gemm_colmajor g;
    int code;
    if (!cb ||
        !gemm_prepare(cb, "scmoe__cuda_blas_gemm", trans_a, trans_b, M, N, K, lda, ldb, beta, A, B, C, ldc, &g, &code))
        return;
    cublasStatus_t s;
    if (math == CUDA_MATH_BF16)
        s = cublasGemmEx(cb->handle, op(g.trans_first), op(g.trans_second), g.m, g.n, g.k, &alpha, B, CUDA_R_32F,
                         g.ld_first, A, CUDA_R_32F, g.ld_second, &beta, C, CUDA_R_32F, g.ldc,
                         CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT);
    else
        s = cublasSgemm(cb->handle, op(g.trans_first), op(g.trans_second), g.m, g.n, g.k, &alpha, B, g.ld_first, A,
                        g.ld_second, &beta, C, g.ldc);
    if (s != CUBLAS_STATUS_SUCCESS)
        fail(cb, (int)s, "scmoe__cuda_blas_gemm: %s (M %d N %d K %d)", cublasGetStatusString(s), M, N, K);
}

void scmoe__cuda_blas_gemm(cuda_blas *cb, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                           int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_math(cb, cb ? cb->math : CUDA_MATH_FP32, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

int scmoe__cuda_blas_gemm_bf16(cuda_blas *cb, int trans_a, int trans_b, int M, int N, int K, float alpha,
                               const uint16_t *A, int lda, const uint16_t *B, int ldb, float beta, float *C, int ldc) {
    if (!cb) return CUBLAS_STATUS_NOT_INITIALIZED;
    cuda_gemm_colmajor g;
    int code;
    if (!gemm_prepare(cb, "scmoe__cuda_blas_gemm_bf16", trans_a, trans_b, M, N, K, lda, ldb, beta, A, B, C, ldc, &g,
                      &code))
        return code;
    cublasStatus_t s = cublasGemmEx(cb->handle, op(g.trans_first), op(g.trans_second), g.m, g.n, g.k, &alpha, B,
                                    CUDA_R_16BF, g.ld_first, A, CUDA_R_16BF, g.ld_second, &beta, C, CUDA_R_32F, g.ldc,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
        fail(cb, (int)s, "scmoe__cuda_blas_gemm_bf16: %s (M %d N %d K %d)", cublasGetStatusString(s), M, N, K);
        return (int)s;
    }
    return 0;
}

/* One grouped call for items[0..n) (n <= CUDA_GROUP_MAX), operands of type t (CUDA_R_32F or
 * CUDA_R_16BF). Each item is checked and mapped to column-major as a single GEMM would be; those with
 * nothing to multiply are done on the spot (nothing, or C = beta C), the rest go into one
 * cublasGemmGroupedBatchedEx with one group per item (their sizes differ), after their pointers went to
 * cb->ptrs in stream order. Returns 0, or CUBLAS_STATUS_NOT_SUPPORTED untouched (nothing ran: the
 * caller loops instead); other failures are recorded on cb. */
static int grouped_call(cuda_blas *cb, int t, int trans_a, int trans_b, float alpha, const cuda_gemm_item *items, int n,
                        int lda, int ldb, float beta, int ldc) {
    cublasOperation_t ta[CUDA_GROUP_MAX], tb[CUDA_GROUP_MAX];
    int m[CUDA_GROUP_MAX], nn[CUDA_GROUP_MAX], k[CUDA_GROUP_MAX], la[CUDA_GROUP_MAX], lb[CUDA_GROUP_MAX],
        lc[CUDA_GROUP_MAX], size[CUDA_GROUP_MAX];
    float al[CUDA_GROUP_MAX], be[CUDA_GROUP_MAX];
    cuda_pointer_table pt;
    int g = 0;
    for (int i = 0; i < n; i++) {
        const cuda_gemm_item *it = &items[i];
        cuda_gemm_colmajor c;
        int code;
        if (!gemm_prepare(cb, "scmoe__cuda_blas_gemm_grouped", trans_a, trans_b, it->M, it->N, it->K, lda, ldb, beta,
                          it->A, it->B, it->C, ldc, &c, &code))
            continue;
        ta[g] = op(c.trans_first);
        tb[g] = op(c.trans_second);
        m[g] = c.m;
        nn[g] = c.n;
        k[g] = c.k;
        la[g] = c.ld_first;
        lb[g] = c.ld_second;
        lc[g] = c.ldc;
        size[g] = 1;
        al[g] = alpha;
        be[g] = beta;
        pt.p[g] = it->B; /* the column-major call's first operand is B, its second A */
        pt.p[CUDA_GROUP_MAX + g] = it->A;
        pt.p[2 * CUDA_GROUP_MAX + g] = it->C;
        g++;
    }
    if (!g || cb->status) return 0;
    cudaError_t e = scmoe__cuda_store_pointers(cb->ptrs, pt, 3 * CUDA_GROUP_MAX, cb->stream);
    if (e != cudaSuccess) {
        fail(cb, (int)e, "scmoe__cuda_blas_gemm_grouped: storing the pointers failed: %s", cudaGetErrorString(e));
        return 0;
    }
    cublasComputeType_t ct =
        t == CUDA_R_16BF || cb->math != CUDA_MATH_BF16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_16BF;
    cublasStatus_t s = cublasGemmGroupedBatchedEx(
        cb->handle, ta, tb, m, nn, k, al, cb->ptrs, (cudaDataType_t)t, la, cb->ptrs + CUDA_GROUP_MAX, (cudaDataType_t)t,
        lb, be, (void *const *)(cb->ptrs + 2 * CUDA_GROUP_MAX), CUDA_R_32F, lc, g, size, ct);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED) return (int)s;
    if (s != CUBLAS_STATUS_SUCCESS)
        fail(cb, (int)s, "scmoe__cuda_blas_gemm_grouped: %s (%d GEMMs)", cublasGetStatusString(s), g);
    return 0;
}

static void grouped(cuda_blas *cb, int bf16, int trans_a, int trans_b, float alpha, const cuda_gemm_item *items, int n,
                    int lda, int ldb, float beta, int ldc) {
    if (!cb) return;
    if (n > 0 && !items) {
        fail(cb, CUBLAS_STATUS_INVALID_VALUE, "scmoe__cuda_blas_gemm_grouped: items is NULL with n = %d", n);
        return;
    }
    int done = 0, refused = 0;
    while (done < n && !cb->grouped_off[bf16]) {
        int c = n - done < CUDA_GROUP_MAX ? n - done : CUDA_GROUP_MAX;
        if (grouped_call(cb, bf16 ? CUDA_R_16BF : CUDA_R_32F, trans_a, trans_b, alpha, items + done, c, lda, ldb, beta,
                         ldc) == CUBLAS_STATUS_NOT_SUPPORTED) {
            cb->grouped_off[bf16] = 1;
            refused = c; /* their K <= 0 items were scaled already */
            break;
        }
        done += c;
    }
    for (int i = done; i < n; i++) {
        const cuda_gemm_item *it = &items[i];
        if (i < done + refused && it->K <= 0) continue;
        if (bf16)
            scmoe__cuda_blas_gemm_bf16(cb, trans_a, trans_b, it->M, it->N, it->K, alpha, it->A, lda, it->B, ldb, beta,
                                       it->C, ldc);
        else
            scmoe__cuda_blas_gemm(cb, trans_a, trans_b, it->M, it->N, it->K, alpha, it->A, lda, it->B, ldb, beta, it->C,
                                  ldc);
    }
}

void scmoe__cuda_blas_gemm_grouped(cuda_blas *cb, int trans_a, int trans_b, float alpha, const cuda_gemm_item *items,
                                   int n, int lda, int ldb, float beta, int ldc) {
    grouped(cb, 0, trans_a, trans_b, alpha, items, n, lda, ldb, beta, ldc);
}

void scmoe__cuda_blas_gemm_grouped_bf16(cuda_blas *cb, int trans_a, int trans_b, float alpha,
                                        const cuda_gemm_item *items, int n, int lda, int ldb, float beta, int ldc) {
    grouped(cb, 1, trans_a, trans_b, alpha, items, n, lda, ldb, beta, ldc);
}

/* ======================================================= issue 19: the dense GEMMs' bf16 operands */

scmoe_status scmoe__cuda_blas_reserve_bf16(cuda_blas *cb, size_t n) {
    if (!cb) return SCMOE_ERR_NULL;
    if (n <= cb->bf16_n) return SCMOE_OK;
    uint16_t *p = NULL;
    if (cudaMalloc((void **)&p, sizeof(uint16_t) * n) != cudaSuccess) return SCMOE_ERR_NOMEM;
    cudaFree(cb->bf16); /* waits for the kernels that may still read it */
    cb->bf16 = p;
    cb->bf16_n = n;
    return SCMOE_OK;
}

/* C = alpha op(bf16(A)) op(bf16(B)) + beta C with fp32 accumulation (CUDA_R_16BF, CUBLAS_COMPUTE_32F):
 * an operand with a bf16 copy (a weight) is read from it, the others are rounded (nearest even, as
 * scmoe__bf16_pack) into the scratch, contiguous, op(A)'s first. Returns 0, having done nothing, where
 * there is nothing to multiply (gemm_math's edge cases) or the scratch has no room. */
static int gemm_rounded(cuda_blas *cb, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                        const uint16_t *Ab, int lda, const float *B, const uint16_t *Bb, int ldb, float beta, float *C,
                        int ldc) {
    if (!cb || M <= 0 || N <= 0 || K <= 0 || !A || !B || !C) return 0;
    int ra = trans_a ? K : M, ca = trans_a ? M : K, rb = trans_b ? N : K, cbc = trans_b ? K : N; /* as stored */
    if (lda < ca || ldb < cbc) return 0;
    size_t na = Ab ? 0 : (size_t)ra * ca, nb = Bb ? 0 : (size_t)rb * cbc;
    if (na + nb > cb->bf16_n) return 0;
    cudaError_t e = cudaSuccess;
    if (!Ab) {
        e = scmoe__cuda_bf16_pack_rows(cb->bf16, A, ra, ca, lda, cb->stream);
        Ab = cb->bf16;
        lda = ca;
    }
    if (!Bb && e == cudaSuccess) {
        e = scmoe__cuda_bf16_pack_rows(cb->bf16 + na, B, rb, cbc, ldb, cb->stream);
        Bb = cb->bf16 + na;
        ldb = cbc;
    }
    if (e != cudaSuccess) fail(cb, (int)e, "rounding a GEMM operand to bf16: %s", cudaGetErrorString(e));
    else scmoe__cuda_blas_gemm_bf16(cb, trans_a, trans_b, M, N, K, alpha, Ab, lda, Bb, ldb, beta, C, ldc);
    return 1;
}
