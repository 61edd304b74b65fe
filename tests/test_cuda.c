/* test_cuda.c: the CUDA backend (cuda_backend/) against the CPU kernels it mirrors.
 *
 * With a device (cudaGetDeviceCount > 0): every kernel and the cuBLAS GEMMs on random data against
 * kernels/ (rows.c for the routed rows): <= 1e-4 relative on outputs, 1e-3 on gradients,
 * integer outputs and copies exact. Without one, each of those prints "ok - NAME # SKIP no CUDA
 * device" (not counted), and the host-side checks still run: the row-major -> column-major GEMM
 * mapping against a reference, argument validation of every launch wrapper and of the GEMMs,
 * scmoe__cuda_blas_create's failures, and scmoe__cuda_mpi_cuda_aware's answer.
 *
 * Built with -DSCMOE_CUDA_EMU (make check-cuda-emu) the same program runs on the host emulation:
 * kernels.cu compiled as C++ on CPU threads, the runtime and cuBLAS on host memory.
 * Relative error = max |gpu - cpu| / max |cpu|. Ends with "N passed, N failed". */
#include "../cuda_backend/cuda.h"
#include "../ops.h"
#include "check.h"
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef SCMOE_CUDA_EMU
/* runtime_emu.c: words copied out of device memory that nothing had written (initcheck's errors) */
size_t emu_uninit_words(const void **first);
#endif

#define TOL_OUT  1e-4
#define TOL_GRAD 1e-3
/* the emulation runs every block on real threads (64 per block there): fewer rows, same code paths */
#ifdef SCMOE_CUDA_EMU
#define GPU_OR_EMU(gpu, emu) (emu)
#else
#define GPU_OR_EMU(gpu, emu) (gpu)
#endif

static int have_gpu, n_skipped;
static cuda_blas *cb;
static cudaStream_t stream;
static exec cpu;

static uint64_t rng_state = 2024;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) / 8388608.0 - 1.0);
}
static void fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * frand();
}
static float *fnew(size_t n, float scale) {
    float *x = malloc(sizeof(float) * (n ? n : 1));
    if (!x) {
        printf("# out of host memory\n");
        exit(2);
    }
    fill(x, n, scale);
    return x;
}
static float *fcopy(const float *x, size_t n) {
    float *y = fnew(n, 0.0f);
    memcpy(y, x, sizeof(float) * n);
    return y;
}

static double relerr(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d) d = INFINITY; /* NaN where the reference is finite: fail */
        num = d > num ? d : num;
        den = fabs(b[i]) > den ? fabs(b[i]) : den;
    }
    return n ? num / (den + 1e-30) : 0;
}

static void skip(const char *what) {
    printf("ok - %s # SKIP no CUDA device\n", what);
    n_skipped++;
}

/* ---- device buffers: freed together after each test ---- */
#define MAX_DEV 96
static void *dev_ptrs[MAX_DEV];
static int n_dev;

static void *dalloc(size_t bytes) {
    void *p = NULL;
    if (n_dev == MAX_DEV || cudaMalloc(&p, bytes ? bytes : 4) != cudaSuccess) {
        printf("# cudaMalloc(%zu) failed\n", bytes);
        exit(2);
    }
    dev_ptrs[n_dev++] = p;
    return p;
}
static void *dup_bytes(const void *h, size_t bytes) {
    void *d = dalloc(bytes);
    if (bytes && cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream) != cudaSuccess) {
        printf("# upload failed\n");
        exit(2);
    }
    return d;
}
static float *dupf(const float *h, size_t n) { return dup_bytes(h, sizeof(float) * n); }
static int *dupi(const int *h, size_t n) { return dup_bytes(h, sizeof(int) * n); }
/* waits for the stream, then copies back; 0 when the stream or the copy reported an error */
static int get(void *h, const void *d, size_t bytes) {
    int ok = cudaStreamSynchronize(stream) == cudaSuccess;
    ok &= cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
    ok &= cudaGetLastError() == cudaSuccess;
    return ok;
}
static void dev_free_all(void) {
    cudaStreamSynchronize(stream);
    for (int i = 0; i < n_dev; i++) cudaFree(dev_ptrs[i]);
    n_dev = 0;
}

/* ============================================================================= host-side checks */

/* the definitions: row-major C = alpha op(A) op(B) + beta C, and column-major the same */
static void rm_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                    float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int l = 0; l < K; l++)
                s += (double)(ta ? A[(long)l * lda + i] : A[(long)i * lda + l]) *
                     (tb ? B[(long)j * ldb + l] : B[(long)l * ldb + j]);
            float *c = &C[(long)i * ldc + j];
            *c = (float)(alpha * s + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
}
static void cm_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda, const float *B, int ldb,
                    float beta, float *C, int ldc) {
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int l = 0; l < k; l++)
                s += (double)(ta ? A[(long)l + (long)i * lda] : A[(long)i + (long)l * lda]) *
                     (tb ? B[(long)j + (long)l * ldb] : B[(long)l + (long)j * ldb]);
            float *c = &C[(long)i + (long)j * ldc];
            *c = (float)(alpha * s + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
}

static void host_gemm_mapping(void) {
    int M = 7, N = 5, K = 6, all = 1;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = (ta ? M : K) + 2, ldb = (tb ? K : N) + 1, ldc = N + 3;
            float *A = fnew((size_t)(ta ? K : M) * lda, 1), *B = fnew((size_t)(tb ? N : K) * ldb, 1);
            float *C1 = fnew((size_t)M * ldc, 1), *C2 = fcopy(C1, (size_t)M * ldc);
            rm_gemm(ta, tb, M, N, K, 0.7f, A, lda, B, ldb, 0.3f, C1, ldc);
            cuda_gemm_colmajor g;
            int r = scmoe__cuda_gemm_to_colmajor(ta, tb, M, N, K, lda, ldb, ldc, &g);
            cm_gemm(g.trans_first, g.trans_second, g.m, g.n, g.k, 0.7f, B, g.ld_first, A, g.ld_second, 0.3f, C2, g.ldc);
            double e = relerr(C2, C1, (size_t)M * ldc);
            CHECK(r == CUDA_GEMM_RUN && e < 1e-6, "row-major GEMM as a column-major call, trans %d %d (rel %.1e)", ta,
                  tb, e);
            all &= r == CUDA_GEMM_RUN;
            free(A);
            free(B);
            free(C1);
            free(C2);
        }
    cuda_gemm_colmajor g;
    CHECK(scmoe__cuda_gemm_to_colmajor(0, 0, 0, 5, 3, 3, 5, 5, &g) == CUDA_GEMM_NOTHING &&
              scmoe__cuda_gemm_to_colmajor(0, 0, 4, 0, 3, 3, 5, 5, &g) == CUDA_GEMM_NOTHING,
          "GEMM mapping: M or N = 0 is nothing to do");
    CHECK(scmoe__cuda_gemm_to_colmajor(0, 0, 4, 5, 0, 0, 0, 5, &g) == CUDA_GEMM_SCALE,
          "GEMM mapping: K = 0 only scales C");
    CHECK(scmoe__cuda_gemm_to_colmajor(0, 0, 4, 5, 3, 2, 5, 5, &g) == CUDA_GEMM_BAD &&
              scmoe__cuda_gemm_to_colmajor(1, 0, 4, 5, 3, 3, 5, 5, &g) == CUDA_GEMM_BAD &&
              scmoe__cuda_gemm_to_colmajor(0, 0, 4, 5, 3, 3, 4, 5, &g) == CUDA_GEMM_BAD &&
              scmoe__cuda_gemm_to_colmajor(0, 1, 4, 5, 3, 3, 2, 5, &g) == CUDA_GEMM_BAD &&
              scmoe__cuda_gemm_to_colmajor(0, 0, 4, 5, 3, 3, 5, 4, &g) == CUDA_GEMM_BAD &&
              scmoe__cuda_gemm_to_colmajor(0, 0, 4, 5, 3, 3, 5, 5, NULL) == CUDA_GEMM_BAD,
          "GEMM mapping: a leading dimension too small for its shape, or no output, is refused");
    (void)all;
}

static void host_blas_checks(void) {
    cuda_blas *out = (cuda_blas *)1;
    char err[160];
    CHECK(scmoe__cuda_blas_create(NULL, NULL, CUDA_MATH_FP32, err) == SCMOE_ERR_NULL,
          "scmoe__cuda_blas_create: out NULL");
    CHECK(scmoe__cuda_blas_create(&out, NULL, 9, err) == SCMOE_ERR_OPTION && out == NULL && strstr(err, "math"),
          "scmoe__cuda_blas_create: unknown math -> SCMOE_ERR_OPTION (%s)", err);
    if (!have_gpu) {
        out = (cuda_blas *)1;
        scmoe_status s = scmoe__cuda_blas_create(&out, NULL, CUDA_MATH_FP32, err);
        CHECK(s == SCMOE_ERR_UNSUPPORTED && out == NULL && err[0], "scmoe__cuda_blas_create without a device: %s", err);
    }
    /* the GEMMs' checks come before any device call, so a table that was never created shows them */
    cuda_blas fake;
    memset(&fake, 0, sizeof fake);
    float A[16] = {0}, B[16] = {0}, C[16] = {0};
    scmoe__cuda_blas_gemm(&fake, 0, 0, 0, 4, 4, 1.0f, A, 4, B, 4, 0.0f, C, 4);
    CHECK(fake.status == 0, "scmoe__cuda_blas_gemm with M = 0: nothing done, no error");
    scmoe__cuda_blas_gemm(&fake, 0, 0, 4, 4, 4, 1.0f, A, 2, B, 4, 0.0f, C, 4);
    int first = fake.status;
    CHECK(first != 0 && strstr(fake.err, "bad arguments"), "scmoe__cuda_blas_gemm with lda < K is recorded: %s",
          fake.err);
    scmoe__cuda_blas_gemm(&fake, 0, 0, 4, 4, 4, 1.0f, NULL, 4, B, 4, 0.0f, C, 4);
    CHECK(fake.status == first && !strstr(fake.err, "NULL"), "the first failure is kept (sticky)");
    cuda_blas_clear_status(&fake);
    scmoe__cuda_blas_gemm(&fake, 0, 0, 4, 4, 4, 1.0f, NULL, 4, B, 4, 0.0f, C, 4);
    CHECK(fake.status != 0 && strstr(fake.err, "NULL operand"), "scmoe__cuda_blas_gemm with a NULL operand: %s",
          fake.err);
    cuda_blas_clear_status(&fake);
    CHECK(scmoe__cuda_blas_gemm_bf16(&fake, 1, 0, 4, 4, 4, 1.0f, (const uint16_t *)A, 3, (const uint16_t *)B, 4, 0.0f,
                                     C, 4) != 0 &&
              fake.status != 0,
          "scmoe__cuda_blas_gemm_bf16 with lda < M (transposed A) returns the failure");
    cuda_blas_clear_status(&fake);
    scmoe__cuda_blas_gemm_grouped(&fake, 0, 0, 1.0f, NULL, 2, 4, 4, 0.0f, 4);
    CHECK(fake.status != 0, "scmoe__cuda_blas_gemm_grouped with NULL items: %s", fake.err);
    CHECK((const void *)scmoe__cuda_blas_table(&fake) == (const void *)&fake && scmoe__cuda_blas_table(NULL) == NULL,
          "cuda_blas embeds blas_backend as its first member");
}

static void host_wrapper_checks(void) {
    const cudaError_t bad = cudaErrorInvalidValue, ok = cudaSuccess;
    float f[8] = {0};
    int i8[8] = {0};
    cudaStream_t s = NULL;
    CHECK(scmoe__cuda_layernorm_forward(f, f, f, f, f, f, -1, 4, s) == bad &&
              scmoe__cuda_layernorm_forward(NULL, f, f, f, f, f, 2, 4, s) == bad &&
              scmoe__cuda_layernorm_forward(NULL, NULL, NULL, NULL, NULL, NULL, 0, 4, s) == ok,
          "layernorm forward: N < 0 and NULL refused, N = 0 a no-op");
    CHECK(scmoe__cuda_layernorm_backward(f, f, NULL, f, f, f, f, f, 2, 4, s) == bad &&
              scmoe__cuda_layernorm_backward(f, f, f, f, f, f, f, f, 2, -4, s) == bad,
          "layernorm backward: NULL db, C < 0 refused");
    CHECK(scmoe__cuda_activation_forward(f, f, 2, 4, (scmoe_activation)7, s) == bad &&
              scmoe__cuda_activation_backward(f, f, f, -2, 4, SCMOE_GELU, s) == bad &&
              scmoe__cuda_activation_forward(NULL, NULL, 0, 4, SCMOE_SWIGLU, s) == ok,
          "activation: unknown activation, N < 0 refused, N = 0 a no-op");
    CHECK(scmoe__cuda_broadcast_rows(NULL, f, 2, 2, s) == bad && scmoe__cuda_sum_rows(f, NULL, 2, 2, s) == bad &&
              scmoe__cuda_sum_rows(NULL, NULL, 0, 0, s) == ok,
          "scmoe__broadcast_rows / scmoe__sum_rows: NULL refused, empty a no-op");
    CHECK(scmoe__cuda_gate_softmax(f, f, f, 2, 0, 0, 0, 0, 0, s) == bad &&
              scmoe__cuda_gate_softmax(f, NULL, f, 2, 4, 0, 0, 0, 0, s) == bad,
          "gate softmax: E < 1, NULL p refused");
    CHECK(scmoe__cuda_gate_topk(i8, f, f, f, 2, 4, 5, 1, s) == bad &&
              scmoe__cuda_gate_topk(i8, f, f, f, 2, 4, 0, 1, s) == bad &&
              scmoe__cuda_gate_topk(NULL, NULL, NULL, NULL, 0, 4, 2, 1, s) == ok,
          "gate top-k: k > E and k < 1 refused, N = 0 a no-op");
    CHECK(scmoe__cuda_gate_backward_logits(f, f, i8, f, NULL, NULL, 0, 2, 4, 2, 1, s) == bad,
          "gate backward: NULL lse refused (aux_coef NULL is allowed)");
    CHECK(scmoe__cuda_permute_rows(f, f, i8, 2, 2, 1, s) == bad &&
              scmoe__cuda_permute_rows(f, f + 4, NULL, 2, 2, 0, s) == bad,
          "scmoe__permute_rows: in place or NULL map refused");
    CHECK(scmoe__cuda_moe_pack(f, f, i8, 2, 0, 2, s) == bad &&
              scmoe__cuda_moe_decode(f, 1, f, i8, NULL, -1, 1, 2, s) == bad &&
              scmoe__cuda_moe_decode(f, 1, NULL, i8, NULL, 2, 1, 2, s) == bad &&
              scmoe__cuda_moe_decode_backward(f, f, f, f, i8, NULL, 2, 1, 2, s) == bad &&
              scmoe__cuda_moe_decode(NULL, 0, NULL, NULL, NULL, 0, 1, 2, s) == ok,
          "pack / decode / decode_backward: k < 1, n < 0, NULL rows or weight refused, n = 0 a no-op");
    CHECK(scmoe__cuda_attention_forward(f, f, f, 1, 4, 6, 4, 1, s) == bad &&
              scmoe__cuda_attention_forward(f, f, f, 1, 4, 8, 0, 1, s) == bad &&
              scmoe__cuda_attention_backward(f, f, f, f, NULL, 1, 4, 8, 2, 1, s) == bad &&
              scmoe__cuda_attention_forward(NULL, NULL, NULL, 0, 4, 8, 2, 1, s) == ok,
          "attention: d %% H != 0, H < 1, NULL att refused, B = 0 a no-op");
    CHECK(scmoe__cuda_bf16_pack(NULL, f, 3, s) == bad && scmoe__cuda_bf16_unpack(f, NULL, 3, s) == bad &&
              scmoe__cuda_bf16_pack(NULL, NULL, 0, s) == ok,
          "bf16 pack / unpack: NULL refused, n = 0 a no-op");
    CHECK(scmoe__cuda_scale_matrix(f, 2, 4, 3, 0, s) == bad && scmoe__cuda_scale_matrix(NULL, 0, 4, 4, 0, s) == ok,
          "scale_matrix: ldc < N refused, M = 0 a no-op");
}

/* ---- MPI ---- */

static void host_mpi_aware(void) {
    int aware = scmoe__cuda_mpi_cuda_aware();
    CHECK(aware == 0 || aware == 1, "scmoe__cuda_mpi_cuda_aware() = %d (MPIX_Query_cuda_support where OpenMPI has it)",
          aware);
}

/* =============================================================================== device checks */

static void dev_gemm(void) {
    if (!have_gpu) {
        skip("cuBLAS GEMM (4 transposes, padded ld, beta 0 over NaN, K = 0) vs OpenBLAS");
        return;
    }
    const blas_backend *ob = scmoe__blas_openblas();
    int M = 37, N = 29, K = 53;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int bi = 0; bi < 2; bi++) {
                float beta = bi ? 0.0f : 0.3f;
                int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 5;
                size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
                float *A = fnew(na, 1), *B = fnew(nb, 1), *C = fnew(nc, 1);
                if (beta == 0.0f)
                    for (int i = 0; i < M; i++)
                        for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = NAN;
                float *ref = fcopy(C, nc), *got = fnew(nc, 0);
                ob->gemm(ob, ta, tb, M, N, K, 0.7f, A, lda, B, ldb, beta, ref, ldc);
                float *dA = dupf(A, na), *dB = dupf(B, nb), *dC = dupf(C, nc);
                scmoe__cuda_blas_gemm(cb, ta, tb, M, N, K, 0.7f, dA, lda, dB, ldb, beta, dC, ldc);
                int ok = get(got, dC, sizeof(float) * nc);
                double e = relerr(got, ref, nc); /* the padding must be untouched too (equal to ref there) */
                CHECK(ok && cb->status == 0 && e <= TOL_OUT, "cuBLAS GEMM trans %d %d beta %g, padded ld (rel %.1e)",
                      ta, tb, beta, e);
                free(A);
                free(B);
                free(C);
                free(ref);
                free(got);
                dev_free_all();
            }
    /* K = 0: C = beta C; beta 0 overwrites NaN */
    for (int bi = 0; bi < 2; bi++) {
        float beta = bi ? 0.0f : 0.5f;
        float *C = fnew(6 * 8, 1);
        if (bi)
            for (int i = 0; i < 6 * 8; i++) C[i] = NAN;
        float *ref = fcopy(C, 48), *got = fnew(48, 0);
        ob->gemm(ob, 0, 0, 6, 7, 0, 1.0f, NULL, 1, NULL, 7, beta, ref, 8);
        for (int i = 0; i < 6; i++) ref[i * 8 + 7] = got[i * 8 + 7] = 0; /* padding column, not compared */
        float *dC = dupf(C, 48);
        scmoe__cuda_blas_gemm(cb, 0, 0, 6, 7, 0, 1.0f, NULL, 1, NULL, 7, beta, dC, 8);
        int ok = get(got, dC, sizeof(float) * 48);
        for (int i = 0; i < 6; i++) got[i * 8 + 7] = 0;
        double e = relerr(got, ref, 48);
        CHECK(ok && cb->status == 0 && e == 0, "cuBLAS GEMM K = 0, beta %g: C = beta C (rel %.1e)", beta, e);
        free(C);
        free(ref);
        free(got);
        dev_free_all();
    }
    /* the embedded table through the core's scmoe__exec_gemm (column tiles of 5): the same GEMM */
    const blas_backend *t = scmoe__cuda_blas_table(cb);
    exec tex = {.blas = t, .poll_cols = 5};
    int M2 = 19, N2 = 23, K2 = 11;
    float *A = fnew((size_t)M2 * K2, 1), *B = fnew((size_t)K2 * N2, 1), *ref = fnew((size_t)M2 * N2, 0);
    float *got = fnew((size_t)M2 * N2, 0);
    ob->gemm(ob, 0, 1, M2, N2, K2, 1.0f, A, K2, B, K2, 0.0f, ref, N2);
    float *dA = dupf(A, (size_t)M2 * K2), *dB = dupf(B, (size_t)K2 * N2), *dC = dupf(got, (size_t)M2 * N2);
    scmoe__exec_gemm(&tex, 0, 1, M2, N2, K2, 1.0f, dA, K2, dB, K2, 0.0f, dC, N2);
    int ok = get(got, dC, sizeof(float) * M2 * N2);
    double e = relerr(got, ref, (size_t)M2 * N2);
    CHECK(t->max_threads() == 1 && !strcmp(t->name, "cublas") && ok && cb->status == 0 && e <= TOL_OUT,
          "the embedded table: name cublas, max_threads 1, scmoe__exec_gemm through it == OpenBLAS (rel %.1e)", e);
    free(A);
    free(B);
    free(ref);
    free(got);
    dev_free_all();
}

static void dev_gemm_bf16(void) {
    if (!have_gpu) {
        skip("bf16 GEMMs (CUDA_R_16BF operands; CUDA_MATH_BF16 fast path) vs OpenBLAS");
        return;
    }
    const blas_backend *ob = scmoe__blas_openblas();
    int M = 33, N = 40, K = 64;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? M : K, ldb = tb ? K : N, ldc = N;
            size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
            float *A = fnew(na, 1), *B = fnew(nb, 1), *C = fnew(nc, 1), *Ar = fnew(na, 0), *Br = fnew(nb, 0);
            uint16_t *Ah = malloc(2 * na), *Bh = malloc(2 * nb);
            scmoe__bf16_pack(Ah, A, na);
            scmoe__bf16_pack(Bh, B, nb);
            scmoe__bf16_unpack(Ar, Ah, na);
            scmoe__bf16_unpack(Br, Bh, nb);
            float *ref = fcopy(C, nc), *got = fnew(nc, 0);
            ob->gemm(ob, ta, tb, M, N, K, 1.0f, Ar, lda, Br, ldb, 0.5f, ref, ldc);
            void *dA = dup_bytes(Ah, 2 * na), *dB = dup_bytes(Bh, 2 * nb);
            float *dC = dupf(C, nc);
            int r = scmoe__cuda_blas_gemm_bf16(cb, ta, tb, M, N, K, 1.0f, dA, lda, dB, ldb, 0.5f, dC, ldc);
            int ok = get(got, dC, sizeof(float) * nc);
            double e = relerr(got, ref, nc);
            CHECK(r == 0 && ok && e <= TOL_OUT, "cublasGemmEx bf16 operands, fp32 accumulate, trans %d %d (rel %.1e)",
                  ta, tb, e);
            free(A);
            free(B);
            free(C);
            free(Ar);
            free(Br);
            free(Ah);
            free(Bh);
            free(ref);
            free(got);
            dev_free_all();
        }
    cuda_blas *fast = NULL;
    char err[160];
    scmoe_status s = scmoe__cuda_blas_create(&fast, stream, CUDA_MATH_BF16, err);
    CHECK(s == SCMOE_OK, "scmoe__cuda_blas_create(CUDA_MATH_BF16) on the test's stream %s", err);
    if (s) return;
    size_t na = (size_t)M * K, nb = (size_t)K * N, nc = (size_t)M * N;
    float *A = fnew(na, 1), *B = fnew(nb, 1), *ref = fnew(nc, 0), *got = fnew(nc, 0);
    ob->gemm(ob, 0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, ref, N);
    float *dA = dupf(A, na), *dB = dupf(B, nb), *dC = dalloc(sizeof(float) * nc);
    scmoe__cuda_blas_gemm(fast, 0, 0, M, N, K, 1.0f, dA, K, dB, N, 0.0f, dC, N);
    int ok = get(got, dC, sizeof(float) * nc);
    double e = relerr(got, ref, nc);
    CHECK(ok && fast->status == 0 && e <= 1e-2, "CUDA_MATH_BF16 fp32 GEMM (bf16 inputs inside) within 1e-2 (rel %.1e)",
          e);
    scmoe__cuda_blas_destroy(fast);
    free(A);
    free(B);
    free(ref);
    free(got);
    dev_free_all();
}

static void dev_gemm_grouped(void) {
    if (!have_gpu) {
        skip("grouped expert GEMMs (rows 5, 0, 11: forward and weight gradients) vs OpenBLAS");
        return;
    }
    const blas_backend *ob = scmoe__blas_openblas();
    enum { E = 3, R = 16, D = 24, H = 40 };
    int off[E + 1] = {0, 5, 5, 16};
    float *X = fnew(R * D, 1), *W = fnew(E * D * H, 1), *dY = fnew(R * H, 1), *dW = fnew(E * D * H, 1);
    float *Y = fnew(R * H, 0), *dWref = fcopy(dW, E * D * H), *got = fnew(E * D * H, 0);
    for (int i = 0; i < E; i++) {
        int o = off[i], rows = off[i + 1] - o;
        ob->gemm(ob, 0, 0, rows, H, D, 1.0f, X + o * D, D, W + i * D * H, H, 0.0f, Y + o * H, H);
        ob->gemm(ob, 1, 0, D, H, rows, 1.0f, X + o * D, D, dY + o * H, H, 1.0f, dWref + i * D * H, H);
    }
    float *dX = dupf(X, R * D), *dWt = dupf(W, E * D * H), *ddY = dupf(dY, R * H), *ddW = dupf(dW, E * D * H);
    float *dYo = dalloc(sizeof(float) * R * H);
    cuda_gemm_item fw[E], bw[E];
    for (int i = 0; i < E; i++) {
        int o = off[i], rows = off[i + 1] - o;
        fw[i] = (cuda_gemm_item){rows, H, D, dX + o * D, dWt + i * D * H, dYo + o * H};
        bw[i] = (cuda_gemm_item){D, H, rows, dX + o * D, ddY + o * H, ddW + i * D * H};
    }
    scmoe__cuda_blas_gemm_grouped(cb, 0, 0, 1.0f, fw, E, D, H, 0.0f, H);
    scmoe__cuda_blas_gemm_grouped(cb, 1, 0, 1.0f, bw, E, D, H, 1.0f, H);
    int ok = get(got, dYo, sizeof(float) * R * H);
    double e1 = relerr(got, Y, R * H);
    ok &= get(got, ddW, sizeof(float) * E * D * H);
    double e2 = relerr(got, dWref, E * D * H);
    CHECK(ok && cb->status == 0 && e1 <= TOL_OUT, "grouped GEMM, experts' row ranges: forward (rel %.1e)", e1);
    CHECK(ok && cb->status == 0 && e2 <= TOL_GRAD,
          "grouped GEMM: dW_e += X_e^T dY_e, an empty expert keeps dW (rel %.1e)", e2);
    CHECK(!cb->grouped_off[0], "grouped GEMM: one cublasGemmGroupedBatchedEx call per group, not the loop");
    free(X);
    free(W);
    free(dY);
    free(dW);
    free(Y);
    free(dWref);
    free(got);
    dev_free_all();
}

/* bf16 operands, more experts than one grouped call takes (CUDA_GROUP_MAX), some empty: against
 * OpenBLAS on the same operands rounded to bf16 (the products are exact in fp32, so only the sums'
 * order differs) */
static void dev_gemm_grouped_bf16(void) {
    if (!have_gpu) {
        skip("grouped bf16 GEMMs, 70 experts (two calls), empty ones included, vs OpenBLAS on rounded operands");
        return;
    }
    const blas_backend *ob = scmoe__blas_openblas();
    enum { E = 70, D = 8, H = 12 };
    int off[E + 1];
    off[0] = 0;
    for (int i = 0; i < E; i++) off[i + 1] = off[i] + (i % 5 == 3 ? 0 : 1 + i % 4);
    int R = off[E];
    float *X = fnew((size_t)R * D, 1), *W = fnew((size_t)E * D * H, 1), *Y = fnew((size_t)R * H, 0);
    float *got = fnew((size_t)R * H, 0);
    uint16_t *Xb = malloc(sizeof(uint16_t) * R * D), *Wb = malloc(sizeof(uint16_t) * E * D * H);
    scmoe__bf16_pack(Xb, X, (size_t)R * D);
    scmoe__bf16_pack(Wb, W, (size_t)E * D * H);
    scmoe__bf16_unpack(X, Xb, (size_t)R * D);
    scmoe__bf16_unpack(W, Wb, (size_t)E * D * H);
    for (int i = 0; i < E; i++)
        ob->gemm(ob, 0, 0, off[i + 1] - off[i], H, D, 1.0f, X + off[i] * D, D, W + i * D * H, H, 0.0f, Y + off[i] * H,
                 H);
    uint16_t *dX = dup_bytes(Xb, sizeof(uint16_t) * R * D), *dW = dup_bytes(Wb, sizeof(uint16_t) * E * D * H);
    float *dY = dalloc(sizeof(float) * R * H);
    cuda_gemm_item it[E];
    for (int i = 0; i < E; i++)
        it[i] = (cuda_gemm_item){off[i + 1] - off[i], H, D, dX + off[i] * D, dW + i * D * H, dY + off[i] * H};
    scmoe__cuda_blas_gemm_grouped_bf16(cb, 0, 0, 1.0f, it, E, D, H, 0.0f, H);
    int ok = get(got, dY, sizeof(float) * R * H);
    double e = relerr(got, Y, (size_t)R * H);
    CHECK(ok && cb->status == 0 && e <= 1e-5, "grouped bf16 GEMM, %d experts in two calls, empty ones (rel %.1e)%s", E,
          e, cb->grouped_off[1] ? " (cuBLAS refused the grouped bf16 form: ran as a loop)" : "");
    free(X);
    free(W);
    free(Y);
    free(got);
    free(Xb);
    free(Wb);
    dev_free_all();
}

static void dev_layernorm(void) {
    if (!have_gpu) {
        skip("layernorm forward / backward vs kernels/layernorm.c");
        return;
    }
    /* the last case has a variance near eps (1e-5), so eps itself is checked */
    int shapes[4][2] = {{13, 300}, {7, 16}, {GPU_OR_EMU(1000, 200), 40}, {5, 64}};
    float scales[4] = {2.0f, 2.0f, 2.0f, 0.005f};
    for (int c = 0; c < 4; c++) {
        int N = shapes[c][0], C = shapes[c][1];
        size_t n = (size_t)N * C;
        float *x = fnew(n, scales[c]), *w = fnew(C, 1), *b = fnew(C, 1), *dy = fnew(n, 1);
        for (size_t i = 0; i < n; i++) x[i] += 0.5f; /* a nonzero mean */
        float *out = fnew(n, 0), *mean = fnew(N, 0), *rstd = fnew(N, 0);
        float *dx = fnew(n, 1), *dw = fnew(C, 1), *db = fnew(C, 1);
        float *ddx = dupf(dx, n), *ddw = dupf(dw, C), *ddb = dupf(db, C);
        scmoe__layernorm_forward(out, mean, rstd, x, w, b, N, C);
        scmoe__layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, N, C);
        float *dX = dupf(x, n), *dW = dupf(w, C), *dB = dupf(b, C), *dDY = dupf(dy, n);
        float *dO = dalloc(sizeof(float) * n), *dM = dalloc(sizeof(float) * N), *dR = dalloc(sizeof(float) * N);
        cudaError_t r1 = scmoe__cuda_layernorm_forward(dO, dM, dR, dX, dW, dB, N, C, stream);
        cudaError_t r2 = scmoe__cuda_layernorm_backward(ddx, ddw, ddb, dDY, dX, dW, dM, dR, N, C, stream);
        float *g = fnew(n, 0);
        int ok = r1 == cudaSuccess && r2 == cudaSuccess;
        double eo, em, er, ex, ew, eb;
        ok &= get(g, dO, sizeof(float) * n);
        eo = relerr(g, out, n);
        ok &= get(g, dM, sizeof(float) * N);
        em = relerr(g, mean, N);
        ok &= get(g, dR, sizeof(float) * N);
        er = relerr(g, rstd, N);
        ok &= get(g, ddx, sizeof(float) * n);
        ex = relerr(g, dx, n);
        ok &= get(g, ddw, sizeof(float) * C);
        ew = relerr(g, dw, C);
        ok &= get(g, ddb, sizeof(float) * C);
        eb = relerr(g, db, C);
        CHECK(ok && eo <= TOL_OUT && em <= TOL_OUT && er <= TOL_OUT,
              "layernorm forward N %d C %d x scale %g: out %.1e, mean %.1e, rstd %.1e", N, C, scales[c], eo, em, er);
        CHECK(ok && ex <= TOL_GRAD && ew <= TOL_GRAD && eb <= TOL_GRAD,
              "layernorm backward N %d C %d x scale %g (dx, dw, db accumulate): %.1e %.1e %.1e", N, C, scales[c], ex,
              ew, eb);
        free(x);
        free(w);
        free(b);
        free(dy);
        free(out);
        free(mean);
        free(rstd);
        free(dx);
        free(dw);
        free(db);
        free(g);
        dev_free_all();
    }
}

static void dev_activation(void) {
    if (!have_gpu) {
        skip("GELU / SwiGLU forward and backward vs kernels/ffn.c");
        return;
    }
    for (int a = 0; a < 2; a++) {
        scmoe_activation act = a ? SCMOE_SWIGLU : SCMOE_GELU;
        int N = 9, h = 70, h1 = scmoe__ffn_width(h, act);
        float *pre = fnew((size_t)N * h1, 3), *dhid = fnew((size_t)N * h, 1);
        float *hid = fnew((size_t)N * h, 0), *dpre = fnew((size_t)N * h1, 0), *g = fnew((size_t)N * h1, 0);
        scmoe__activation_forward(hid, pre, NULL, N, h, act);
        scmoe__activation_backward(dpre, dhid, pre, N, h, act);
        float *dP = dupf(pre, (size_t)N * h1), *dDH = dupf(dhid, (size_t)N * h);
        float *dH = dalloc(sizeof(float) * N * h), *dDP = dalloc(sizeof(float) * N * h1);
        int ok = scmoe__cuda_activation_forward(dH, dP, N, h, act, stream) == cudaSuccess;
        ok &= scmoe__cuda_activation_backward(dDP, dDH, dP, N, h, act, stream) == cudaSuccess;
        ok &= get(g, dH, sizeof(float) * N * h);
        double e1 = relerr(g, hid, (size_t)N * h);
        ok &= get(g, dDP, sizeof(float) * N * h1);
        double e2 = relerr(g, dpre, (size_t)N * h1);
        CHECK(ok && e1 <= TOL_OUT, "%s forward (rel %.1e)", a ? "SwiGLU" : "GELU", e1);
        CHECK(ok && e2 <= TOL_GRAD, "%s backward (rel %.1e)", a ? "SwiGLU" : "GELU", e2);
        free(pre);
        free(dhid);
        free(hid);
        free(dpre);
        free(g);
        dev_free_all();
    }
}

/* ffn.c's static scmoe__broadcast_rows, restated */
static void broadcast_ref(float *out, const float *b, int N, int C) {
    for (int i = 0; i < N; i++) memcpy(out + (size_t)i * C, b, sizeof(float) * C);
}

static void dev_bias(void) {
    if (!have_gpu) {
        skip("bias broadcast and column sums (scmoe__sum_rows) vs kernels/ffn.c");
        return;
    }
    int N = 1000, C = 70;
    float *x = fnew((size_t)N * C, 1), *b = fnew(C, 1), *acc = fnew(C, 1), *out = fnew((size_t)N * C, 0);
    float *g = fnew((size_t)N * C, 0);
    float *dX = dupf(x, (size_t)N * C), *dB = dupf(b, C), *dA = dupf(acc, C), *dO = dalloc(sizeof(float) * N * C);
    scmoe__sum_rows(acc, x, N, C);
    broadcast_ref(out, b, N, C);
    int ok = scmoe__cuda_sum_rows(dA, dX, N, C, stream) == cudaSuccess;
    ok &= scmoe__cuda_broadcast_rows(dO, dB, N, C, stream) == cudaSuccess;
    ok &= get(g, dA, sizeof(float) * C);
    double e = relerr(g, acc, C);
    CHECK(ok && e <= TOL_GRAD, "scmoe__sum_rows: acc += column sums of 1000 rows (rel %.1e)", e);
    ok &= get(g, dO, sizeof(float) * N * C);
    CHECK(ok && !memcmp(g, out, sizeof(float) * N * C), "scmoe__broadcast_rows: every row is the bias, exactly");
    free(x);
    free(b);
    free(acc);
    free(out);
    free(g);
    dev_free_all();
}

static void dev_gate(void) {
    if (!have_gpu) {
        skip("gate softmax with noise, top-k (ties), weights and backward vs kernels/gate.c");
        return;
    }
    int N = 50, d = 32, E = 8;
    float *x = fnew((size_t)N * d, 1), *wg = fnew((size_t)d * E, 1);
    float *logits = fnew((size_t)N * E, 0), *p = fnew((size_t)N * E, 0), *lse = fnew(N, 0), *g = fnew((size_t)N * d, 0);
    scmoe__gate_forward(&cpu, logits, p, lse, x, wg, N, d, E, 0.5f, 7, 3, 100);
    float *dx_ = dupf(x, (size_t)N * d), *dwg = dupf(wg, (size_t)d * E);
    float *dL = dalloc(sizeof(float) * N * E), *dP = dalloc(sizeof(float) * N * E), *dLse = dalloc(sizeof(float) * N);
    scmoe__cuda_blas_gemm(cb, 0, 0, N, E, d, 1.0f, dx_, d, dwg, E, 0.0f, dL, E);
    int ok = scmoe__cuda_gate_softmax(dL, dP, dLse, N, E, 0.5f, 7, 3, 100, stream) == cudaSuccess;
    double el, ep, es;
    ok &= get(g, dL, sizeof(float) * N * E);
    el = relerr(g, logits, (size_t)N * E);
    ok &= get(g, dP, sizeof(float) * N * E);
    ep = relerr(g, p, (size_t)N * E);
    ok &= get(g, dLse, sizeof(float) * N);
    es = relerr(g, lse, N);
    CHECK(ok && cb->status == 0 && el <= TOL_OUT && ep <= TOL_OUT && es <= TOL_OUT,
          "gate forward with counter-based noise: logits %.1e, p %.1e, lse %.1e", el, ep, es);
    dev_free_all();

    /* top-k on the CPU's p (so choices are comparable), plus rows with exact ties */
    for (int i = 0; i < 4; i++) p[i] = 0.25f, p[4 + i] = 0.0f;                           /* row 0: 4-way tie */
    for (int e = 0; e < E; e++) p[E + e] = e == 2 || e == 5 || e == 6 ? 0.3f : 0.1f / 5; /* row 1: 3-way tie */
    for (int k = 1; k <= 3; k++)
        for (int renorm = 0; renorm < 2; renorm++) {
            int *choice = malloc(sizeof(int) * N * k), *gc = malloc(sizeof(int) * N * k);
            float *weight = fnew((size_t)N * k, 0), *score = fnew(N, 0), *gw = fnew((size_t)N * k, 0);
            scmoe__gate_topk(choice, weight, score, p, N, E, k, renorm);
            float *dPp = dupf(p, (size_t)N * E), *dW = dalloc(sizeof(float) * N * k), *dS = dalloc(sizeof(float) * N);
            int *dC = dalloc(sizeof(int) * N * k);
            int okk = scmoe__cuda_gate_topk(dC, dW, dS, dPp, N, E, k, renorm, stream) == cudaSuccess;
            okk &= get(gc, dC, sizeof(int) * N * k);
            int same = !memcmp(gc, choice, sizeof(int) * N * k);
            okk &= get(gw, dW, sizeof(float) * N * k);
            double ew = relerr(gw, weight, (size_t)N * k);
            okk &= get(g, dS, sizeof(float) * N);
            double esc = relerr(g, score, N);
            CHECK(okk && same && ew <= TOL_OUT && esc <= TOL_OUT,
                  "top-%d%s: same experts (ties to the lower index: row 0 -> %d%s), weights %.1e, score %.1e", k,
                  renorm ? " renormalised" : "", gc[0], k > 1 ? ", ..." : "", ew, esc);
            free(choice);
            free(gc);
            free(weight);
            free(score);
            free(gw);
            dev_free_all();
        }

    /* backward: dlogits on the device, then the two GEMMs as scmoe__gate_backward does */
    for (int k = 1; k <= 2; k++)
        for (int aux = 0; aux < 2; aux++) {
            int *choice = malloc(sizeof(int) * N * k);
            float *weight = fnew((size_t)N * k, 0), *score = fnew(N, 0);
            scmoe__gate_topk(choice, weight, score, p, N, E, k, 1);
            float *dweight = fnew((size_t)N * k, 1), *aux_coef = fnew(E, 0.1f), *dlog = fnew((size_t)N * E, 0);
            float *dxr = fnew((size_t)N * d, 1), *dwgr = fnew((size_t)d * E, 1);
            float *ddx = dupf(dxr, (size_t)N * d), *ddwg = dupf(dwgr, (size_t)d * E);
            scmoe__gate_backward(&cpu, dxr, 0.5f, dwgr, dlog, dweight, choice, p, lse, x, wg, aux ? aux_coef : NULL,
                                 0.01f, N, d, E, k, 1);
            float *dDW = dupf(dweight, (size_t)N * k), *dAux = dupf(aux_coef, E), *dPp = dupf(p, (size_t)N * E);
            float *dLse2 = dupf(lse, N), *dX2 = dupf(x, (size_t)N * d), *dWg2 = dupf(wg, (size_t)d * E);
            int *dC = dupi(choice, (size_t)N * k);
            float *dDL = dalloc(sizeof(float) * N * E);
            int okb = scmoe__cuda_gate_backward_logits(dDL, dDW, dC, dPp, dLse2, aux ? dAux : NULL, 0.01f, N, E, k, 1,
                                                       stream) == cudaSuccess;
            scmoe__cuda_blas_gemm(cb, 1, 0, d, E, N, 1.0f, dX2, d, dDL, E, 1.0f, ddwg, E);
            scmoe__cuda_blas_gemm(cb, 0, 1, N, d, E, 1.0f, dDL, E, dWg2, E, 0.5f, ddx, d);
            double e1, e2, e3;
            okb &= get(g, dDL, sizeof(float) * N * E);
            e1 = relerr(g, dlog, (size_t)N * E);
            okb &= get(g, ddwg, sizeof(float) * d * E);
            e2 = relerr(g, dwgr, (size_t)d * E);
            okb &= get(g, ddx, sizeof(float) * N * d);
            e3 = relerr(g, dxr, (size_t)N * d);
            CHECK(okb && cb->status == 0 && e1 <= TOL_GRAD && e2 <= TOL_GRAD && e3 <= TOL_GRAD,
                  "gate backward k %d%s: dlogits %.1e, dWg %.1e, dx %.1e", k, aux ? " with aux" : "", e1, e2, e3);
            free(choice);
            free(weight);
            free(score);
            free(dweight);
            free(aux_coef);
            free(dlog);
            free(dxr);
            free(dwgr);
            dev_free_all();
        }
    free(x);
    free(wg);
    free(logits);
    free(p);
    free(lse);
    free(g);
}

static void dev_rows(void) {
    if (!have_gpu) {
        skip("scmoe__permute_rows, dispatch pack, decode and decode backward vs kernels/rows.c");
        return;
    }
    int n = 13, k = 2, d = 33, nr = n * k;
    /* slots: a random permutation of the assignments, every fifth dropped */
    int *slot = malloc(sizeof(int) * nr), n_send = 0;
    for (int a = 0; a < nr; a++) slot[a] = a % 5 == 3 ? -1 : n_send++;
    for (int a = nr - 1; a > 0; a--) {
        int b = (int)((frand() + 1.0f) * 0.5f * (a + 1)) % (a + 1), t = slot[a];
        slot[a] = slot[b];
        slot[b] = t;
    }
    /* a permutation (Fisher-Yates): a map with repeated destinations would race on a device and leave
     * rows unwritten, and scmoe__permute_rows promises neither */
    int *map = malloc(sizeof(int) * n_send);
    for (int r = 0; r < n_send; r++) map[r] = r;
    for (int r = n_send - 1; r > 0; r--) {
        int b = (int)((frand() + 1.0f) * 0.5f * (r + 1)) % (r + 1), t = map[r];
        map[r] = map[b];
        map[b] = t;
    }
    float *x = fnew((size_t)n * d, 1), *rows = fnew((size_t)n_send * d, 1), *w = fnew(nr, 1),
          *dy = fnew((size_t)n * d, 1);
    float *ref = fnew((size_t)n_send * d, 0), *g = fnew((size_t)n_send * d + (size_t)n * d, 0);
    int *dSlot = dupi(slot, nr), *dMap = dupi(map, n_send);
    float *dX = dupf(x, (size_t)n * d), *dRows = dupf(rows, (size_t)n_send * d), *dW = dupf(w, nr);
    float *dDy = dupf(dy, (size_t)n * d), *dOut = dalloc(sizeof(float) * n_send * d);

    for (int scatter = 0; scatter < 2; scatter++) {
        /* the output starts as all-ones bytes (a NaN no kernel writes): a row the kernel skips shows */
        cudaMemsetAsync(dOut, 0xFF, sizeof(float) * n_send * d, stream);
        scmoe__permute_rows(ref, rows, map, n_send, d, scatter);
        int ok = scmoe__cuda_permute_rows(dOut, dRows, dMap, n_send, d, scatter, stream) == cudaSuccess;
        ok &= get(g, dOut, sizeof(float) * n_send * d);
        int unwritten = 0;
        for (int r = 0; r < n_send; r++) {
            int hole = 0;
            for (int c = 0; c < d; c++) {
                uint32_t u;
                memcpy(&u, &g[(size_t)r * d + c], sizeof u);
                hole |= u == 0xFFFFFFFFu;
            }
            unwritten += hole;
        }
        CHECK(ok && unwritten == 0,
              "scmoe__permute_rows %s with a permutation writes every one of the %d rows (%d not)",
              scatter ? "scatter" : "gather", n_send, unwritten);
        CHECK(ok && !memcmp(g, ref, sizeof(float) * n_send * d), "scmoe__permute_rows %s: exact",
              scatter ? "scatter dst[map[r]] = src[r]" : "gather dst[r] = src[map[r]]");
    }
    /* the dispatch's pack */
    for (size_t i = 0; i < (size_t)n_send * d; i++) ref[i] = 0;
    scmoe__pack_rows(ref, x, slot, n, k, d);
    cudaMemsetAsync(dOut, 0, sizeof(float) * n_send * d, stream);
    int ok = scmoe__cuda_moe_pack(dOut, dX, dSlot, n, k, d, stream) == cudaSuccess;
    ok &= get(g, dOut, sizeof(float) * n_send * d);
    CHECK(ok && !memcmp(g, ref, sizeof(float) * n_send * d), "dispatch pack send[slot[t, j]] = x[t]: exact");

    /* decode: y = beta y + sum_j w rows[slot]; weight NULL is scmoe__moe_gate_backward's dx sum */
    float betas[4] = {0.0f, 1.0f, 0.5f, 1.0f};
    for (int bi = 0; bi < 4; bi++) {
        float beta = betas[bi];
        int unweighted = bi == 3;
        float *y = fnew((size_t)n * d, 1);
        if (beta == 0.0f)
            for (int i = 0; i < n * d; i++) y[i] = NAN;
        float *dY = dupf(y, (size_t)n * d);
        scmoe__decode_rows(y, beta, rows, slot, unweighted ? NULL : w, n, k, d);
        int okd =
            scmoe__cuda_moe_decode(dY, beta, dRows, dSlot, unweighted ? NULL : dW, n, k, d, stream) == cudaSuccess;
        okd &= get(g, dY, sizeof(float) * n * d);
        double e = relerr(g, y, (size_t)n * d);
        CHECK(okd && e <= TOL_OUT, "decode beta %g%s (rel %.1e)", beta,
              unweighted ? ", unweighted (gate-backward dx)" : "", e);
        free(y);
    }
    /* decode backward: grows[slot] = w dy[t], dweight = dy[t] . rows[slot], 0 when dropped */
    float *dwref = fnew(nr, 0), *gw = fnew(nr, 0);
    for (size_t i = 0; i < (size_t)n_send * d; i++) ref[i] = 7.0f;
    scmoe__decode_rows_backward(ref, dwref, dy, rows, slot, w, n, k, d);
    float *seven = fnew((size_t)n_send * d, 0);
    for (size_t i = 0; i < (size_t)n_send * d; i++) seven[i] = 7.0f;
    float *dG = dupf(seven, (size_t)n_send * d), *dDW = dupf(seven, nr);
    ok = scmoe__cuda_moe_decode_backward(dG, dDW, dDy, dRows, dSlot, dW, n, k, d, stream) == cudaSuccess;
    ok &= get(g, dG, sizeof(float) * n_send * d);
    double e1 = relerr(g, ref, (size_t)n_send * d);
    ok &= get(gw, dDW, sizeof(float) * nr);
    double e2 = relerr(gw, dwref, nr);
    CHECK(ok && e1 <= TOL_GRAD && e2 <= TOL_GRAD, "decode backward: rows %.1e, dweight %.1e (dropped -> 0)", e1, e2);
    free(slot);
    free(map);
    free(x);
    free(rows);
    free(w);
    free(dy);
    free(ref);
    free(g);
    free(dwref);
    free(gw);
    free(seven);
    dev_free_all();
}

static void dev_attention(void) {
    if (!have_gpu) {
        skip("attention forward / backward (causal and not, T up to 260) vs kernels/attention.c");
        return;
    }
    /* T above the block size: the row loops stride (256 threads on a GPU, 64 in the emulation) */
    int cases[4][5] = {{2, 19, 32, 4, 1}, {2, 19, 32, 4, 0}, {1, GPU_OR_EMU(260, 100), 16, 2, 1}, {3, 5, 12, 1, 1}};
    for (int c = 0; c < 4; c++) {
        int B = cases[c][0], T = cases[c][1], d = cases[c][2], H = cases[c][3], causal = cases[c][4];
        size_t nq = (size_t)B * T * 3 * d, no = (size_t)B * T * d, na = (size_t)B * H * T * T;
        float *qkv = fnew(nq, 1), *out = fnew(no, 0), *att = fnew(na, 0), *dout = fnew(no, 1);
        float *dqkv = fnew(nq, 0), *datt = fnew(na, 0), *g = fnew(na > nq ? na : nq, 0);
        scmoe__attention_forward(&cpu, out, att, qkv, B, T, d, H, causal);
        scmoe__attention_backward(&cpu, dqkv, datt, dout, qkv, att, B, T, d, H, causal);
        float *dQ = dupf(qkv, nq), *dDO = dupf(dout, no);
        float *dO = dalloc(sizeof(float) * no), *dA = dalloc(sizeof(float) * na);
        float *dDQ = dalloc(sizeof(float) * nq), *dDA = dalloc(sizeof(float) * na);
        int ok = scmoe__cuda_attention_forward(dO, dA, dQ, B, T, d, H, causal, stream) == cudaSuccess;
        ok &= scmoe__cuda_attention_backward(dDQ, dDA, dDO, dQ, dA, B, T, d, H, causal, stream) == cudaSuccess;
        double eo, ea, eq, ed;
        ok &= get(g, dO, sizeof(float) * no);
        eo = relerr(g, out, no);
        ok &= get(g, dA, sizeof(float) * na);
        ea = relerr(g, att, na);
        ok &= get(g, dDQ, sizeof(float) * nq);
        eq = relerr(g, dqkv, nq);
        ok &= get(g, dDA, sizeof(float) * na);
        ed = relerr(g, datt, na);
        CHECK(ok && eo <= TOL_OUT && ea <= TOL_OUT, "attention forward B %d T %d d %d H %d %s: out %.1e, att %.1e", B,
              T, d, H, causal ? "causal" : "full", eo, ea);
        CHECK(ok && eq <= TOL_GRAD && ed <= TOL_GRAD, "attention backward B %d T %d d %d H %d %s: dqkv %.1e, datt %.1e",
              B, T, d, H, causal ? "causal" : "full", eq, ed);
        free(qkv);
        free(out);
        free(att);
        free(dout);
        free(dqkv);
        free(datt);
        free(g);
        dev_free_all();
    }
}

static void dev_bf16(void) {
    if (!have_gpu) {
        skip("bf16 pack / unpack bit-exact vs kernels/bf16.c");
        return;
    }
    size_t n = 5000;
    float *x = fnew(n, 1);
    uint32_t special[] = {0x7FC00001u, 0x7F800001u, 0xFF800000u, 0x7F800000u, 0x3F808000u,
                          0x3F818000u, 0x7F7FFFFFu, 0x00000001u, 0x80000000u, 0x3F80FFFFu};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) memcpy(&x[i], &special[i], 4);
    for (size_t i = 20; i < n; i++) x[i] *= powf(2.0f, (float)((int)(i % 60) - 30));
    uint16_t *ref = malloc(2 * n), *got = malloc(2 * n);
    float *back = fnew(n, 0), *gback = fnew(n, 0);
    scmoe__bf16_pack(ref, x, n);
    scmoe__bf16_unpack(back, ref, n);
    float *dX = dupf(x, n), *dB = dalloc(sizeof(float) * n);
    uint16_t *dH = dalloc(2 * n);
    int ok = scmoe__cuda_bf16_pack(dH, dX, n, stream) == cudaSuccess;
    ok &= scmoe__cuda_bf16_unpack(dB, dH, n, stream) == cudaSuccess;
    ok &= get(got, dH, 2 * n);
    ok &= get(gback, dB, sizeof(float) * n);
    CHECK(ok && !memcmp(got, ref, 2 * n), "bf16 pack: the same bits (nearest even, NaN quiet, inf, overflow)");
    CHECK(ok && !memcmp(gback, back, sizeof(float) * n), "bf16 unpack: the same bits");
    free(x);
    free(ref);
    free(got);
    free(back);
    free(gback);
    dev_free_all();
}

/* the compute table's small kernels against their CPU twins (compute_host.c, combine.c) */
static void dev_small(void) {
    if (!have_gpu) {
        skip("zero, add, bias rows, non-finite flag, CG-1 combine and scmoe__add_outer vs kernels/");
        return;
    }
    /* zero: every start alignment and length, nothing outside the range touched */
    unsigned char ones[64], got[64];
    memset(ones, 0xFF, sizeof ones);
    int ok = 1;
    unsigned char *dP = dup_bytes(ones, sizeof ones);
    for (int off = 0; off < 4; off++)
        for (int len = 0; len <= 41; len++) {
            cudaMemcpyAsync(dP, ones, sizeof ones, cudaMemcpyHostToDevice, stream);
            ok &= scmoe__cuda_zero_bytes(dP + off, (size_t)len, stream) == cudaSuccess && get(got, dP, sizeof got);
            for (int i = 0; i < 64; i++) ok &= got[i] == ((i >= off && i < off + len) ? 0 : 0xFF);
        }
    CHECK(ok, "zero_bytes: every start alignment 0..3, lengths 0..41, exactly the range");

    int n = 7, d = 45;
    size_t nd = (size_t)n * d;
    float *y = fnew(nd, 1), *x = fnew(nd, 1), *b = fnew(d, 1), *s = fnew(nd, 1), *m = fnew(nd, 1), *w = fnew(d, 1);
    float *g = fnew(nd, 0), *gc = fnew(n, 0), *ref = fnew(nd, 0), *refc = fnew(n, 0);
    float *dY = dupf(y, nd), *dX = dupf(x, nd), *dB = dupf(b, d), *dS = dupf(s, nd), *dM = dupf(m, nd),
          *dW = dupf(w, d);
    float *dO = dalloc(sizeof(float) * nd), *dC = dalloc(sizeof(float) * n);
    memcpy(ref, y, sizeof(float) * nd); /* add: y += x */
    for (size_t i = 0; i < nd; i++) ref[i] += x[i];
    ok = scmoe__cuda_add(dY, dX, nd, stream) == cudaSuccess && get(g, dY, sizeof(float) * nd);
    CHECK(ok && !memcmp(g, ref, sizeof(float) * nd), "add y += x: exact");
    for (int i = 0; i < n; i++) /* bias rows: y[i, :] += b */
        for (int j = 0; j < d; j++) ref[(size_t)i * d + j] += b[j];
    ok = scmoe__cuda_add_bias_rows(dY, dB, n, d, stream) == cudaSuccess && get(g, dY, sizeof(float) * nd);
    CHECK(ok && !memcmp(g, ref, sizeof(float) * nd), "add_bias_rows x[i, :] += b: exact");

    int *dF = dalloc(sizeof(int)), flag = 0;
    ok = scmoe__cuda_zero_bytes(dF, sizeof(int), stream) == cudaSuccess &&
         scmoe__cuda_flag_nonfinite(dF, dX, nd, stream) == cudaSuccess && get(&flag, dF, sizeof flag) && flag == 0;
    x[nd - 3] = INFINITY;
    float *dXi = dupf(x, nd);
    ok &= scmoe__cuda_flag_nonfinite(dF, dXi, nd, stream) == cudaSuccess && get(&flag, dF, sizeof flag) && flag == 1;
    CHECK(ok && scmoe__has_nonfinite(x, nd),
          "flag_nonfinite: 0 on finite input, 1 with an Inf (as scmoe__has_nonfinite)");

    float *dA = dupf(y, nd); /* the residual: y as uploaded (dY has been added to since) */
    for (int gated = 0; gated < 2; gated++) {
        scmoe__cg_combine_forward(ref, refc, y, s, m, gated ? w : NULL, n, d);
        ok = scmoe__cuda_cg_combine_forward(dO, dC, dA, dS, dM, gated ? dW : NULL, n, d, stream) == cudaSuccess;
        ok &= get(g, dO, sizeof(float) * nd) && get(gc, dC, sizeof(float) * n);
        double e1 = relerr(g, ref, nd), e2 = relerr(gc, refc, n);
        CHECK(ok && e1 <= TOL_OUT && e2 <= TOL_OUT, "scmoe__cg_combine_forward%s: y %.1e, gate %.1e",
              gated ? " (CG-1)" : " (add)", e1, e2);
    }
    x[nd - 3] = 0.25f;
    float *cg = fnew(n, 0);
    scmoe__cg_combine_forward(ref, cg, y, s, m, w, n, d);
    scmoe__cg_combine_backward(ref, refc, x, s, cg, n, d);
    float *dCg = dupf(cg, n), *dXf = dupf(x, nd);
    ok = scmoe__cuda_cg_combine_backward(dO, dC, dXf, dS, dCg, n, d, stream) == cudaSuccess;
    ok &= get(g, dO, sizeof(float) * nd) && get(gc, dC, sizeof(float) * n);
    double e1 = relerr(g, ref, nd), e2 = relerr(gc, refc, n);
    CHECK(ok && e1 <= TOL_GRAD && e2 <= TOL_GRAD, "scmoe__cg_combine_backward: ds %.1e, dz %.1e", e1, e2);

    memcpy(ref, y, sizeof(float) * nd);
    scmoe__add_outer(ref, cg, w, n, d);
    float *dY2 = dupf(y, nd);
    ok = scmoe__cuda_add_outer(dY2, dCg, dW, n, d, stream) == cudaSuccess && get(g, dY2, sizeof(float) * nd);
    CHECK(ok && relerr(g, ref, nd) <= TOL_OUT, "scmoe__add_outer out += u v^T (%.1e)", relerr(g, ref, nd));
    free(y);
    free(x);
    free(b);
    free(s);
    free(m);
    free(w);
    free(g);
    free(gc);
    free(ref);
    free(refc);
    free(cg);
    dev_free_all();
}

/* scmoe__ffn_forward / scmoe__ffn_backward composed from the kernels and cuBLAS, as a device dispatch would */
static void dev_ffn(void) {
    if (!have_gpu) {
        skip("FFN forward / backward from kernels + cuBLAS (GELU, SwiGLU) vs kernels/ffn.c");
        return;
    }
    for (int a = 0; a < 2; a++) {
        scmoe_activation act = a ? SCMOE_SWIGLU : SCMOE_GELU;
        int N = 21, d = 24, h = 40, h1 = scmoe__ffn_width(h, act);
        size_t nx = (size_t)N * d, nw1 = (size_t)d * h1, nw2 = (size_t)h * d, np = (size_t)N * h1, nh = (size_t)N * h;
        float *x = fnew(nx, 1), *w1 = fnew(nw1, 0.3f), *b1 = fnew(h1, 0.1f), *w2 = fnew(nw2, 0.3f), *b2 = fnew(d, 0.1f);
        float *out = fnew(nx, 0), *pre = fnew(np, 0), *hid = fnew(nh, 0), *dout = fnew(nx, 1);
        float *dx = fnew(nx, 1), *dw1 = fnew(nw1, 1), *db1 = fnew(h1, 1), *dw2 = fnew(nw2, 1), *db2 = fnew(d, 1);
        float *dhid = fnew(nh, 0), *dpre = fnew(np, 0), *g = fnew(np > nw1 ? np : nw1, 0);
        float *Ddx = dupf(dx, nx), *Ddw1 = dupf(dw1, nw1), *Ddb1 = dupf(db1, h1), *Ddw2 = dupf(dw2, nw2);
        float *Ddb2 = dupf(db2, d);
        scmoe__ffn_forward(&cpu, out, pre, hid, x, w1, b1, w2, b2, N, d, h, act);
        scmoe__ffn_backward(&cpu, dx, 0.5f, dw1, db1, dw2, db2, dhid, dpre, dout, x, pre, hid, w1, w2, N, d, h, act);
        float *Dx = dupf(x, nx), *Dw1 = dupf(w1, nw1), *Db1 = dupf(b1, h1), *Dw2 = dupf(w2, nw2), *Db2 = dupf(b2, d);
        float *Dout = dalloc(sizeof(float) * nx), *Dpre = dalloc(sizeof(float) * np),
              *Dhid = dalloc(sizeof(float) * nh);
        float *Ddout = dupf(dout, nx), *Ddhid = dalloc(sizeof(float) * nh), *Ddpre = dalloc(sizeof(float) * np);
        int ok = scmoe__cuda_broadcast_rows(Dpre, Db1, N, h1, stream) == cudaSuccess;
        scmoe__cuda_blas_gemm(cb, 0, 0, N, h1, d, 1.0f, Dx, d, Dw1, h1, 1.0f, Dpre, h1);
        ok &= scmoe__cuda_activation_forward(Dhid, Dpre, N, h, act, stream) == cudaSuccess;
        ok &= scmoe__cuda_broadcast_rows(Dout, Db2, N, d, stream) == cudaSuccess;
        scmoe__cuda_blas_gemm(cb, 0, 0, N, d, h, 1.0f, Dhid, h, Dw2, d, 1.0f, Dout, d);
        scmoe__cuda_blas_gemm(cb, 0, 1, N, h, d, 1.0f, Ddout, d, Dw2, d, 0.0f, Ddhid, h);
        scmoe__cuda_blas_gemm(cb, 1, 0, h, d, N, 1.0f, Dhid, h, Ddout, d, 1.0f, Ddw2, d);
        ok &= scmoe__cuda_sum_rows(Ddb2, Ddout, N, d, stream) == cudaSuccess;
        ok &= scmoe__cuda_activation_backward(Ddpre, Ddhid, Dpre, N, h, act, stream) == cudaSuccess;
        scmoe__cuda_blas_gemm(cb, 1, 0, d, h1, N, 1.0f, Dx, d, Ddpre, h1, 1.0f, Ddw1, h1);
        ok &= scmoe__cuda_sum_rows(Ddb1, Ddpre, N, h1, stream) == cudaSuccess;
        scmoe__cuda_blas_gemm(cb, 0, 1, N, d, h1, 1.0f, Ddpre, h1, Dw1, h1, 0.5f, Ddx, d);
        double eo, ep, eh, ex, e1, eb1, e2, eb2;
        ok &= get(g, Dout, sizeof(float) * nx);
        eo = relerr(g, out, nx);
        ok &= get(g, Dpre, sizeof(float) * np);
        ep = relerr(g, pre, np);
        ok &= get(g, Dhid, sizeof(float) * nh);
        eh = relerr(g, hid, nh);
        ok &= get(g, Ddx, sizeof(float) * nx);
        ex = relerr(g, dx, nx);
        ok &= get(g, Ddw1, sizeof(float) * nw1);
        e1 = relerr(g, dw1, nw1);
        ok &= get(g, Ddb1, sizeof(float) * h1);
        eb1 = relerr(g, db1, h1);
        ok &= get(g, Ddw2, sizeof(float) * nw2);
        e2 = relerr(g, dw2, nw2);
        ok &= get(g, Ddb2, sizeof(float) * d);
        eb2 = relerr(g, db2, d);
        const char *name = a ? "SwiGLU" : "GELU";
        CHECK(ok && cb->status == 0 && eo <= TOL_OUT && ep <= TOL_OUT && eh <= TOL_OUT,
              "FFN %s forward: out %.1e, pre %.1e, hid %.1e", name, eo, ep, eh);
        CHECK(ok && cb->status == 0 && ex <= TOL_GRAD && e1 <= TOL_GRAD && eb1 <= TOL_GRAD && e2 <= TOL_GRAD &&
                  eb2 <= TOL_GRAD,
              "FFN %s backward: dx %.1e, dW1 %.1e, db1 %.1e, dW2 %.1e, db2 %.1e", name, ex, e1, eb1, e2, eb2);
        free(x);
        free(w1);
        free(b1);
        free(w2);
        free(b2);
        free(out);
        free(pre);
        free(hid);
        free(dout);
        free(dx);
        free(dw1);
        free(db1);
        free(dw2);
        free(db2);
        free(dhid);
        free(dpre);
        free(g);
        dev_free_all();
    }
}

/* ---- issue 19: the experts' biases in one launch, the dense GEMMs' bf16 operands ---- */

/* one launch for every expert of a stage against the per-expert loop (scmoe__cuda_add_bias_rows,
 * scmoe__cuda_broadcast_rows, scmoe__cuda_sum_rows per expert): bit for bit, an expert without rows
 * included; and the wrapper's refusals */
static void dev_expert_bias(void) {
    if (!have_gpu) {
        skip("the experts' biases and their sums in one launch vs one launch per expert");
        return;
    }
    enum { E = 5, C1 = 70, C2 = 33 };
    int off[E + 1] = {3, 40, 40, 101, 102, 170}; /* rows from 3 (a later group's first row), expert 1 empty */
    int N = off[E];
    float *x1 = fnew((size_t)N * C1, 1), *x2 = fnew((size_t)N * C2, 1), *b1 = fnew((size_t)E * C1, 1),
          *b2 = fnew((size_t)E * C2, 1), *g1 = fnew((size_t)N * C1, 0), *g2 = fnew((size_t)N * C1, 0);
    float *dx1 = dupf(x1, (size_t)N * C1), *dx2 = dupf(x2, (size_t)N * C2), *rx1 = dupf(x1, (size_t)N * C1),
          *rx2 = dupf(x2, (size_t)N * C2), *db1 = dupf(b1, (size_t)E * C1), *db2 = dupf(b2, (size_t)E * C2),
          *rb1 = dupf(b1, (size_t)E * C1), *rb2 = dupf(b2, (size_t)E * C2);
    cuda_expert_bias t, r;
    memset(&t, 0, sizeof t);
    t.n = E;
    t.jobs = 2;
    memcpy(t.off, off, sizeof off);
    t.job[0] = (cuda_bias_job){dx1, C1, 0, {0}};
    t.job[1] = (cuda_bias_job){dx2, C2, 1, {0}};
    for (int i = 0; i < E; i++) {
        t.job[0].b[i] = db1 + i * C1;
        t.job[1].b[i] = db2 + i * C2;
    }
    int ok = scmoe__cuda_expert_bias_forward(&t, stream) == cudaSuccess;
    for (int i = 0; i < E; i++) {
        int rows = off[i + 1] - off[i];
        ok &= scmoe__cuda_add_bias_rows(rx1 + (size_t)off[i] * C1, db1 + i * C1, rows, C1, stream) == cudaSuccess;
        ok &= scmoe__cuda_broadcast_rows(rx2 + (size_t)off[i] * C2, db2 + i * C2, rows, C2, stream) == cudaSuccess;
    }
    int same = 1;
    ok &= get(g1, dx1, sizeof(float) * N * C1) && get(g2, rx1, sizeof(float) * N * C1);
    same &= !memcmp(g1, g2, sizeof(float) * N * C1);
    ok &= get(g1, dx2, sizeof(float) * N * C2) && get(g2, rx2, sizeof(float) * N * C2);
    same &= !memcmp(g1, g2, sizeof(float) * N * C2);
    CHECK(ok && same, "the experts' b1 add and b2 broadcast, %d experts (one empty) in one launch == per expert", E);
    /* backward: the same rows summed into the biases' places (here the bias arrays play the gradients) */
    r = t;
    for (int i = 0; i < E; i++) {
        r.job[0].b[i] = rb1 + i * C1;
        r.job[1].b[i] = rb2 + i * C2;
    }
    ok = scmoe__cuda_expert_bias_backward(&t, stream) == cudaSuccess;
    for (int i = 0; i < E; i++) {
        int rows = off[i + 1] - off[i];
        ok &= scmoe__cuda_sum_rows(r.job[0].b[i], dx1 + (size_t)off[i] * C1, rows, C1, stream) == cudaSuccess;
        ok &= scmoe__cuda_sum_rows(r.job[1].b[i], dx2 + (size_t)off[i] * C2, rows, C2, stream) == cudaSuccess;
    }
    ok &= get(g1, db1, sizeof(float) * E * C1) && get(g2, rb1, sizeof(float) * E * C1);
    same = !memcmp(g1, g2, sizeof(float) * E * C1);
    ok &= get(g1, db2, sizeof(float) * E * C2) && get(g2, rb2, sizeof(float) * E * C2);
    same &= !memcmp(g1, g2, sizeof(float) * E * C2);
    CHECK(ok && same, "the experts' db1 and db2 sums in one launch == per expert, bit for bit");
    cuda_expert_bias bad = t;
    bad.n = 0;
    int refused = scmoe__cuda_expert_bias_forward(&bad, stream) == cudaErrorInvalidValue;
    bad = t;
    bad.off[2] = 200; /* not ascending */
    refused &= scmoe__cuda_expert_bias_backward(&bad, stream) == cudaErrorInvalidValue;
    bad = t;
    bad.job[0].b[3] = NULL; /* an expert with rows and no bias */
    refused &= scmoe__cuda_expert_bias_forward(&bad, stream) == cudaErrorInvalidValue;
    refused &= scmoe__cuda_expert_bias_forward(NULL, stream) == cudaErrorInvalidValue;
    CHECK(refused, "scmoe__cuda_expert_bias_*: no experts, offsets out of order, a missing bias, NULL: refused");
    free(x1);
    free(x2);
    free(b1);
    free(b2);
    free(g1);
    free(g2);
    dev_free_all();
}

/* SCMOE_PRECISION_BF16's GEMM through the table (gemm_bf16): with the scratch reserved, activations rounded
 * into it (a row stride included) and weights read from their bf16 copy give exactly the GEMM on operands
 * packed beforehand; without room, cuBLAS's fast bf16 math on the fp32 operands */
static void dev_gemm_bf16_scratch(void) {
    if (!have_gpu) {
        skip("the table's bf16 GEMM: activations rounded into the reserved scratch, weights from their copy");
        return;
    }
    int M = 29, N = 24, K = 40, ldx = K + 5; /* x [M, K] with a row stride, W [K, N] */
    size_t nx = (size_t)M * ldx, nw = (size_t)K * N, nc = (size_t)M * N;
    float *x = fnew(nx, 1), *w = fnew(nw, 1), *c0 = fnew(nc, 1), *got = fnew(nc, 0), *ref = fnew(nc, 0);
    uint16_t *xb = malloc(2 * (size_t)M * K), *wb = malloc(2 * nw);
    for (int i = 0; i < M; i++) scmoe__bf16_pack(xb + (size_t)i * K, x + (size_t)i * ldx, K);
    scmoe__bf16_pack(wb, w, nw);
    float *dx = dupf(x, nx), *dw = dupf(w, nw), *dc = dupf(c0, nc), *dr = dupf(c0, nc);
    uint16_t *dxb = dup_bytes(xb, 2 * (size_t)M * K), *dwb = dup_bytes(wb, 2 * nw);
    const blas_backend *t = scmoe__cuda_blas_table(cb);
    size_t before = cb->bf16_n;
    int ok = scmoe__cuda_blas_reserve_bf16(cb, (size_t)M * K + nw) == SCMOE_OK && cb->bf16_n >= (size_t)M * K + nw;
    uint16_t *scratch = cb->bf16;
    ok &= scmoe__cuda_blas_reserve_bf16(cb, 8) == SCMOE_OK && cb->bf16 == scratch; /* smaller: kept */
    t->gemm_bf16(t, 0, 0, M, N, K, 1.0f, dx, NULL, ldx, dw, dwb, N, 0.5f, dc, N);
    scmoe__cuda_blas_gemm_bf16(cb, 0, 0, M, N, K, 1.0f, dxb, K, dwb, N, 0.5f, dr, N);
    ok &= get(got, dc, sizeof(float) * nc) && get(ref, dr, sizeof(float) * nc) && cb->status == 0;
    CHECK(ok && !memcmp(got, ref, sizeof(float) * nc),
          "gemm_bf16 through the table: x (row stride %d) rounded into the scratch, W from its copy == the bf16 GEMM "
          "(scratch %zu -> %zu elements)",
          ldx, before, cb->bf16_n);
    /* both operands rounded (a weight gradient: x^T dy), transposed */
    float *dc2 = dupf(c0, (size_t)K * N), *dr2 = dupf(c0, (size_t)K * N), *dy = dupf(w, (size_t)M * N);
    uint16_t *yb = malloc(2 * (size_t)M * N);
    scmoe__bf16_pack(yb, w, (size_t)M * N);
    uint16_t *dyb = dup_bytes(yb, 2 * (size_t)M * N);
    ok = scmoe__cuda_blas_reserve_bf16(cb, (size_t)M * K + (size_t)M * N) == SCMOE_OK;
    t->gemm_bf16(t, 1, 0, K, N, M, 1.0f, dx, NULL, ldx, dy, NULL, N, 1.0f, dc2, N);
    scmoe__cuda_blas_gemm_bf16(cb, 1, 0, K, N, M, 1.0f, dxb, K, dyb, N, 1.0f, dr2, N);
    float *got2 = fnew((size_t)K * N, 0), *ref2 = fnew((size_t)K * N, 0);
    ok &= get(got2, dc2, sizeof(float) * K * N) && get(ref2, dr2, sizeof(float) * K * N) && cb->status == 0;
    CHECK(ok && !memcmp(got2, ref2, sizeof(float) * K * N),
          "gemm_bf16 through the table, both operands rounded (x^T dy, x with a row stride) == the bf16 GEMM");
    free(x);
    free(w);
    free(c0);
    free(got);
    free(ref);
    free(xb);
    free(wb);
    free(yb);
    free(got2);
    free(ref2);
    dev_free_all();
}

/* n tokens' k distinct experts of E, the upper half of them rarely chosen (some experts receive
 * nothing): into choice [n, k] and the records' first k words (stride k + 1) */
static void route_choices(int *choice, int32_t *rec, int n, int E, int k) {
    for (int t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int e, dup;
            do {
                e = (int)((frand() + 1.0f) * 0.5f * (frand() > 0.8f ? E : (E + 1) / 2)) % E;
                dup = 0;
                for (int i = 0; i < j; i++) dup |= choice[t * k + i] == e;
            } while (dup);
            choice[t * k + j] = rec[(size_t)t * (k + 1) + j] = e;
        }
}

/* route.c's plan of n tokens (E <= 64, ep <= 8) and its buffers; counts_words: the counts message */
typedef struct {
    route_plan pl;
    int64_t count[64], kept[64];
    int cursor[64], sc[8], sd[8], *slot;
    int32_t *counts;
    void *work;
} host_route;
static void host_route_init(host_route *h, int n, int k, int counts_words) {
    memset(&h->pl, 0, sizeof h->pl);
    h->slot = calloc((size_t)n * k + 1, sizeof(int));
    h->counts = calloc((size_t)counts_words, sizeof(int32_t));
    h->work = malloc(scmoe__route_workspace_bytes(n, k) + 1);
    h->pl.expert_count = h->count, h->pl.expert_kept = h->kept, h->pl.slot = h->slot, h->pl.cursor = h->cursor;
    h->pl.send_counts = h->sc, h->pl.send_displs = h->sd;
}
static void host_route_free(host_route *h) { free(h->slot), free(h->counts), free(h->work); }

/* scmoe__cuda_route_local against route.c's scmoe__route_plan_local_send (TOKEN and BATCH priority) and
 * moe.c's sums: slots, the counts message, kept and top-1 counts and the double sums, all bit for bit;
 * skewed choices so that some experts receive nothing, capacities that drop (0 included) and dropless.
 * BATCH: top-1 scores on a coarse grid (many ties), some NaN, +0 and -0, so the order's every rule counts. */
static void dev_route(void) {
    if (!have_gpu) {
        skip("routing planned on the device vs route.c (slots, counts, kept, top-1, sums)");
        return;
    }
    static const struct {
        int n, E, k, ep;
        int64_t cap;
    } cs[] = {{200, 8, 2, 2, 30}, {200, 8, 2, 1, INT64_MAX}, {37, 4, 1, 4, 5}, {0, 4, 2, 2, 10}, {300, 16, 4, 4, 0},
              {129, 8, 2, 2, 32}, {1000, 6, 3, 3, 300},      {1, 4, 2, 2, 1},  {1, 4, 1, 1, 0}};
    const int n_cs = (int)(sizeof cs / sizeof *cs);
    for (int run = 0; run < 2 * n_cs; run++) { /* every shape under TOKEN, then under BATCH */
        int c = run % n_cs, batch = run >= n_cs;
        int n = cs[c].n, E = cs[c].E, k = cs[c].k, ep = cs[c].ep, El = E / ep, msg = 1 + El * k;
        int64_t cap = cs[c].cap;
        int32_t *rec = calloc((size_t)n * (k + 1) + 1, sizeof *rec), *choice = calloc((size_t)n * k + 1, sizeof(int));
        float *p = fnew((size_t)n * E + 1, 0.5f), *lse = fnew((size_t)n + 1, 4.0f);
        for (size_t i = 0; i < (size_t)n * E; i++) p[i] += 0.5f;
        route_choices(choice, rec, n, E, k);
        float *score = fnew((size_t)n + 1, 1.0f);
        for (int t = 0; t < n; t++) {
            float r = frand(); /* in [-1, 1): 9 levels, NaN and the zeros among them */
            score[t] = r < -0.9f ? NAN : r < -0.8f ? -0.0f : r < -0.7f ? 0.0f : floorf(r * 4.0f) / 4.0f;
            memcpy(&rec[(size_t)t * (k + 1) + k], &score[t], sizeof(float));
        }
        /* the host's plan */
        host_route h;
        host_route_init(&h, n, k, ep * msg);
        route_plan *pl = &h.pl;
        int64_t *count = h.count, *kept_h = h.kept;
        int *slot_h = h.slot;
        int32_t *counts_h = h.counts;
        scmoe__route_plan_local_send(pl, h.work, rec, n, ep, E, k, batch ? SCMOE_PRIORITY_BATCH : SCMOE_PRIORITY_TOKEN,
                                     cap, counts_h);
        double gsum_h[65] = {0};
        int top1_h[64] = {0};
        for (int t = 0; t < n; t++) {
            for (int e = 0; e < E; e++) gsum_h[e] += p[(size_t)t * E + e];
            gsum_h[E] += (double)lse[t] * lse[t];
            top1_h[choice[t * k]]++;
        }
        /* the device's: the summary into mapped memory */
        int *d_choice = dupi(choice, (size_t)n * k), *d_slot = dalloc(sizeof(int) * ((size_t)n * k + 1));
        float *d_p = dupf(p, (size_t)n * E), *d_lse = dupf(lse, n), *d_score = dupf(score, n);
        int *d_work = dalloc(sizeof(int) * ((size_t)(k + 2) * E + (size_t)n));
        double *d_sum = dalloc(sizeof(double) * (E + 1));
        char *pin = NULL;
        size_t pin_bytes = sizeof(int32_t) * ((size_t)ep * msg + 2 * E) + sizeof(double) * (E + 1) + 8;
        int ok = cudaHostAlloc((void **)&pin, pin_bytes, cudaHostAllocMapped) == cudaSuccess;
        if (!ok) {
            CHECK(0, "cudaHostAlloc for the route summary");
            break;
        }
        double *gsum = (double *)pin;
        int32_t *counts = (int32_t *)(gsum + E + 1), *top1 = counts + (size_t)ep * msg, *kept = top1 + E;
        uint32_t *seq = (uint32_t *)(kept + E);
        *seq = 6;
        ok = scmoe__cuda_route_local(d_choice, d_p, d_lse, batch ? d_score : NULL, n, E, k, ep, cap, d_slot, d_work,
                                     d_sum, counts, gsum, top1, kept, seq, 7, stream) == cudaSuccess;
        int *slot = calloc((size_t)n * k + 1, sizeof(int));
        ok &= get(slot, d_slot, sizeof(int) * (size_t)n * k);
        int same_slot = !memcmp(slot, slot_h, sizeof(int) * (size_t)n * k), same_counts = 1, same_kept = 1;
        int same_sums = !memcmp(gsum, gsum_h, sizeof(double) * (E + 1)), dropped = 0;
        for (int q = 0; q < ep; q++) {
            same_counts &= counts[q * msg] == 0;
            same_counts &= !memcmp(counts + q * msg + 1, counts_h + q * msg + 1, sizeof(int32_t) * El * k);
        }
        for (int e = 0; e < E; e++) {
            same_kept &= kept[e] == kept_h[e] && top1[e] == top1_h[e];
            dropped += (int)(count[e] - kept_h[e]);
        }
        CHECK(ok && *seq == 7 && same_slot && same_counts && same_kept && same_sums,
              "route on the device, %s priority: %d tokens, %d experts, top-%d, %d ranks, capacity %lld (%d dropped): "
              "slots %s, counts %s, kept/top-1 %s, sums %s, seq %u",
              batch ? "BATCH" : "TOKEN", n, E, k, ep, cap == INT64_MAX ? -1LL : (long long)cap, dropped,
              same_slot ? "equal" : "DIFFER", same_counts ? "equal" : "DIFFER", same_kept ? "equal" : "DIFFER",
              same_sums ? "equal" : "DIFFER", *seq);
        cudaFreeHost(pin);
        host_route_free(&h);
        free(rec), free(choice), free(p), free(lse), free(score), free(slot);
        dev_free_all();
    }
}

/* GLOBAL capacity with TOKEN priority over several ranks: scmoe__cuda_route_local (dropless, TOKEN) then
 * scmoe__cuda_route_global_slots against route.c's scmoe__route_plan_global_send, bit for bit: the slots,
 * and the first half's counts message against scmoe__route_round_counts (what the host scans). The other
 * ranks' round counts are drawn at random (prefix 0 and total = mine: the first, or only, rank), the
 * capacities cut inside my block of some (round, expert), drop everything (0), or nothing (dropless). */
static void dev_route_global(void) {
    if (!have_gpu) {
        skip("GLOBAL capacity routed on the device over several ranks vs route.c (slots, round counts)");
        return;
    }
    static const struct {
        int n, E, k, ep, others;
        int64_t cap;
    } cs[] = {{200, 8, 2, 2, 1, 60}, {200, 8, 2, 1, 1, INT64_MAX}, {37, 4, 1, 4, 1, 20},    {0, 4, 2, 2, 1, 10},
              {300, 16, 4, 4, 1, 0}, {129, 8, 2, 2, 0, 40},        {1000, 6, 3, 3, 1, 700}, {1, 4, 2, 2, 1, 3},
              {64, 4, 2, 2, 0, 24},  {500, 8, 2, 4, 1, 150},       {400, 8, 2, 2, 1, 180}};
    const int n_cs = (int)(sizeof cs / sizeof *cs);
    for (int c = 0; c < n_cs; c++) {
        int n = cs[c].n, E = cs[c].E, k = cs[c].k, ep = cs[c].ep, El = E / ep, msg = 1 + El * k, kE = k * E;
        int64_t cap = cs[c].cap, prefix[64], total[64], mine[64], base[65], S = n;
        int32_t *rec = calloc((size_t)n * (k + 1) + 1, sizeof *rec);
        int *choice = calloc((size_t)n * k + 1, sizeof(int));
        route_choices(choice, rec, n, E, k);
        scmoe__route_round_counts(mine, rec, n, E, k);
        for (int i = 0; i < kE; i++) { /* the ranks before mine, then those after */
            int spread = 3 * n / E + 2;
            prefix[i] = cs[c].others ? (int64_t)((frand() + 1.0f) * 0.5f * spread) : 0;
            total[i] = prefix[i] + mine[i] + (cs[c].others ? (int64_t)((frand() + 1.0f) * 0.5f * spread) : 0);
        }
        for (int e = 0; e < E; e++) S += cs[c].others ? total[e] - mine[e] : 0;
        for (int e = 0; e < E; e++)
            for (int j = 0, done = 0; j < k; j++) {
                base[j * E + e] = done + prefix[j * E + e];
                done += (int)total[j * E + e];
            }
        base[kE] = cap;
        /* the host's plan */
        host_route h;
        host_route_init(&h, n, k, ep * msg);
        int *slot_h = h.slot;
        scmoe__route_plan_global_send(&h.pl, h.work, rec, n, ep, E, k, prefix, total, S, cap, h.counts);
        int dropped = 0;
        for (int a = 0; a < n * k; a++) dropped += slot_h[a] < 0;
        /* the device's two halves */
        float *p = fnew((size_t)n * E + 1, 0.5f), *lse = fnew((size_t)n + 1, 4.0f);
        int *d_choice = dupi(choice, (size_t)n * k), *d_slot = dalloc(sizeof(int) * ((size_t)n * k + 1));
        float *d_p = dupf(p, (size_t)n * E), *d_lse = dupf(lse, n);
        int *d_work = dalloc(sizeof(int) * (size_t)(3 * k + 2) * E);
        double *d_sum = dalloc(sizeof(double) * (E + 1));
        int64_t *d_base = dalloc(sizeof(int64_t) * (kE + 1));
        char *pin = NULL;
        size_t pin_bytes = sizeof(int32_t) * ((size_t)ep * msg + 2 * E) + sizeof(double) * (E + 1) + 8;
        if (cudaHostAlloc((void **)&pin, pin_bytes, cudaHostAllocMapped) != cudaSuccess) {
            CHECK(0, "cudaHostAlloc for the route summary");
            break;
        }
        double *gsum = (double *)pin;
        int32_t *counts = (int32_t *)(gsum + E + 1), *top1 = counts + (size_t)ep * msg, *kept = top1 + E;
        uint32_t *seq = (uint32_t *)(kept + E);
        int ok = scmoe__cuda_route_local(d_choice, d_p, d_lse, NULL, n, E, k, ep, INT64_MAX, d_slot, d_work, d_sum,
                                         counts, gsum, top1, kept, seq, 1, stream) == cudaSuccess;
        ok &= cudaMemcpyAsync(d_base, base, sizeof(int64_t) * (kE + 1), cudaMemcpyHostToDevice, stream) == cudaSuccess;
        ok &= scmoe__cuda_route_global_slots(d_choice, n, E, k, d_base, d_slot, d_work, stream) == cudaSuccess;
        int *slot = calloc((size_t)n * k + 1, sizeof(int));
        ok &= get(slot, d_slot, sizeof(int) * (size_t)n * k);
        int same_slot = !memcmp(slot, slot_h, sizeof(int) * (size_t)n * k), same_counts = 1;
        for (int e = 0; e < E; e++)
            for (int j = 0; j < k; j++) same_counts &= counts[(e / El) * msg + 1 + (e % El) * k + j] == mine[j * E + e];
        CHECK(ok && *seq == 1 && same_slot && same_counts,
              "GLOBAL route on the device: %d tokens, %d experts, top-%d, %d ranks, %s, capacity %lld (%d of mine "
              "dropped): slots %s, round counts %s",
              n, E, k, ep, cs[c].others ? "other ranks before and after" : "the first rank alone",
              cap == INT64_MAX ? -1LL : (long long)cap, dropped, same_slot ? "equal" : "DIFFER",
              same_counts ? "equal" : "DIFFER");
        cudaFreeHost(pin);
        host_route_free(&h);
        free(rec), free(choice), free(p), free(lse), free(slot);
        dev_free_all();
    }
}

int main(void) {
    cpu.blas = scmoe__blas_openblas();
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    have_gpu = e == cudaSuccess && n > 0;
    (void)cudaGetLastError();
#ifdef SCMOE_CUDA_EMU
    printf("# CUDA host emulation: kernels.cu on CPU threads, runtime and cuBLAS on host memory\n");
#endif
    if (have_gpu) {
        char err[160];
        scmoe_status s = scmoe__cuda_blas_create(&cb, NULL, CUDA_MATH_FP32, err);
        CHECK(s == SCMOE_OK, "scmoe__cuda_blas_create on a new stream (%d device%s)%s%s", n, n == 1 ? "" : "s",
              s ? ": " : "", s ? err : "");
        if (s) have_gpu = 0;
        else stream = cb->stream;
    } else {
        printf("# no CUDA device (%s): device checks are skipped\n",
               e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
    }
    host_gemm_mapping();
    host_blas_checks();
    host_wrapper_checks();
    host_mpi_aware();
    dev_gemm();
    dev_gemm_bf16();
    dev_gemm_grouped();
    dev_gemm_grouped_bf16();
    dev_layernorm();
    dev_activation();
    dev_bias();
    dev_gate();
    dev_rows();
    dev_attention();
    dev_bf16();
    dev_small();
    dev_ffn();
    dev_expert_bias();
    dev_gemm_bf16_scratch();
    dev_route();
    dev_route_global();
    if (cb) scmoe__cuda_blas_destroy(cb);
#ifdef SCMOE_CUDA_EMU
    const void *first = NULL;
    size_t uninit = emu_uninit_words(&first);
    CHECK(uninit == 0, "no device bytes copied out before anything wrote them (%zu words, first at %p)", uninit, first);
#endif
    if (n_skipped) printf("# %d device checks skipped (no CUDA device)\n", n_skipped);
    return check_summary();
}
