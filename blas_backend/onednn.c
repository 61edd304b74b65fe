/* onednn.c: GEMMs as oneDNN matmul primitives. A primitive is made for one exact shape (transposes,
 * sizes, leading dimensions, alpha, beta): creating one JIT-compiles its kernel, so it is made on the
 * first GEMM of that shape and kept (a shape it cannot make is remembered as such), with a memory object per operand and thread, whose data pointer
 * is set on each call; after warm-up a GEMM allocates nothing. The cache is a fixed array searched
 * under a lock and never evicts (SCMOE_ONEDNN_CACHE): an onednn_entry, once published, lives until destroy,
 * so threads use entries without holding the lock.
 *
 * Row-major with strides: A is M x K with strides {lda, 1}, or stored K x M and read through strides
 * {1, lda} when transposed; B likewise; C is M x N, {ldc, 1}. alpha is the output scale and beta a
 * sum post-op: C = alpha (A B) + beta C, accumulated in fp32 by oneDNN. Threads: oneDNN's OpenMP
 * runtime (Debian's build), the library's threads; inside a parallel region it runs on one. */
#ifdef SCMOE_WITH_ONEDNN /* the build's choice (make ONEDNN=0, or the amalgamation's macro) */
#include "onednn.h"
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef struct onednn_entry {
    int ta, tb, M, N, K, lda, ldb, ldc;
    float alpha, beta;
    dnnl_primitive_t prim;
    dnnl_memory_t *mem; /* [slots][3]: A, B, C of each thread slot */
} onednn_entry;

struct scmoe__onednn {
    dnnl_engine_t eng;
    dnnl_stream_t *streams; /* [slots] */
    dnnl_data_type_t dt;
    int slots, n;
    char impl[96];
    omp_lock_t lock; /* the cache's: an object's own lock, not a named critical section (a global symbol) */
    onednn_entry *e[SCMOE_ONEDNN_CACHE];
};

static void onednn_md(dnnl_memory_desc_t *md, int rows, int cols, int ld, int trans, dnnl_data_type_t dt) {
    dnnl_dims_t dims = {rows, cols}, strides = {trans ? 1 : ld, trans ? ld : 1};
    dnnl_memory_desc_init_by_strides(md, 2, dims, dt, strides);
}

/* The primitive of one shape, or NULL when oneDNN cannot make one; impl (may be NULL) gets its name. */
static dnnl_primitive_t onednn_make(const scmoe__onednn *d, int ta, int tb, int M, int N, int K, float alpha, int lda,
                                    int ldb, float beta, int ldc, char *impl, size_t len) {
    dnnl_memory_desc_t a, b, c;
    onednn_md(&a, M, K, lda, ta, d->dt);
    onednn_md(&b, K, N, ldb, tb, d->dt);
    onednn_md(&c, M, N, ldc, 0, dnnl_f32);
    dnnl_matmul_desc_t desc;
    if (dnnl_matmul_desc_init(&desc, &a, &b, NULL, &c) != dnnl_success) return NULL;
    dnnl_primitive_attr_t attr;
    if (dnnl_primitive_attr_create(&attr) != dnnl_success) return NULL;
    int ok = 1;
    if (alpha != 1.0f) ok &= dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha) == dnnl_success;
    if (beta != 0.0f) {
        dnnl_post_ops_t po;
        ok &= dnnl_post_ops_create(&po) == dnnl_success;
        if (ok) {
            ok &= dnnl_post_ops_append_sum(po, beta) == dnnl_success;
            ok &= dnnl_primitive_attr_set_post_ops(attr, po) == dnnl_success;
            dnnl_post_ops_destroy(po);
        }
    }
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    if (ok && dnnl_primitive_desc_create(&pd, &desc, attr, d->eng, NULL) == dnnl_success) {
        const char *name = "";
        dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name);
        if (impl) {
            strncpy(impl, name, len - 1);
            impl[len - 1] = '\0';
        }
        /* the reference implementation is a plain loop nest, far slower than the fallback's sgemm */
        if (strncmp(name, "ref", 3) != 0 && dnnl_primitive_create(&prim, pd) != dnnl_success) prim = NULL;
        dnnl_primitive_desc_destroy(pd);
    }
    dnnl_primitive_attr_destroy(attr);
    return prim;
}

void scmoe__onednn_destroy(scmoe__onednn *d) {
    if (!d) return;
    for (int i = 0; i < d->n; i++) {
        onednn_entry *e = d->e[i];
        for (int j = 0; j < 3 * d->slots; j++)
            if (e->mem[j]) dnnl_memory_destroy(e->mem[j]);
        free(e->mem);
        if (e->prim) dnnl_primitive_destroy(e->prim);
        free(e);
    }
    if (d->streams)
        for (int s = 0; s < d->slots; s++)
            if (d->streams[s]) dnnl_stream_destroy(d->streams[s]);
    free(d->streams);
    if (d->eng) dnnl_engine_destroy(d->eng);
    omp_destroy_lock(&d->lock);
    free(d);
}

scmoe__onednn *scmoe__onednn_create(int bf16, int slots) {
    scmoe__onednn *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    omp_init_lock(&d->lock);
    d->dt = bf16 ? dnnl_bf16 : dnnl_f32;
    d->slots = slots;
    d->streams = calloc((size_t)slots, sizeof *d->streams);
    int ok = d->streams && dnnl_engine_create(&d->eng, dnnl_cpu, 0) == dnnl_success;
    for (int s = 0; ok && s < slots; s++)
        ok = dnnl_stream_create(&d->streams[s], d->eng, dnnl_stream_default_flags) == dnnl_success;
    /* the probe: can this CPU run matmuls of this type other than by the reference loops? */
    dnnl_primitive_t probe =
        ok ? onednn_make(d, 0, 0, 32, 32, 32, 1.0f, 32, 32, 0.0f, 32, d->impl, sizeof d->impl) : NULL;
    if (!probe) {
        scmoe__onednn_destroy(d);
        return NULL;
    }
    dnnl_primitive_destroy(probe);
    return d;
}

static onednn_entry *onednn_find(scmoe__onednn *d, int ta, int tb, int M, int N, int K, float alpha, int lda, int ldb,
                                 float beta, int ldc) {
    onednn_entry key = {ta, tb, M, N, K, lda, ldb, ldc, alpha, beta, NULL, NULL};
    onednn_entry *hit = NULL;
    omp_set_lock(&d->lock);
    {
        for (int i = 0; i < d->n && !hit; i++) {
            onednn_entry *e = d->e[i];
            if (e->ta == ta && e->tb == tb && e->M == M && e->N == N && e->K == K && e->lda == lda && e->ldb == ldb &&
                e->ldc == ldc && !memcmp(&e->alpha, &alpha, sizeof alpha) && !memcmp(&e->beta, &beta, sizeof beta))
                hit = e;
        }
        if (!hit && d->n < SCMOE_ONEDNN_CACHE) {
            /* a shape oneDNN has no primitive for is kept too (prim NULL), so it is asked once */
            onednn_entry *e = calloc(1, sizeof *e);
            dnnl_memory_t *mem = calloc(3 * (size_t)d->slots, sizeof *mem);
            if (e && mem) {
                *e = key;
                e->prim = onednn_make(d, ta, tb, M, N, K, alpha, lda, ldb, beta, ldc, NULL, 0);
                e->mem = mem;
                hit = d->e[d->n++] = e;
            } else {
                free(e);
                free(mem);
            }
        }
    }
    omp_unset_lock(&d->lock);
    return hit;
}

int scmoe__onednn_gemm(scmoe__onednn *d, int slot, int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const void *A, int lda, const void *B, int ldb, float beta, float *C, int ldc) {
    onednn_entry *e = onednn_find(d, trans_a, trans_b, M, N, K, alpha, lda, ldb, beta, ldc);
    if (!e || !e->prim) return -1;
    dnnl_memory_t *m = e->mem + 3 * slot;
    if (!m[0]) { /* this thread's first use of the shape: its memory objects, without data yet */
        dnnl_memory_desc_t a, b, c;
        onednn_md(&a, M, K, lda, trans_a, d->dt);
        onednn_md(&b, K, N, ldb, trans_b, d->dt);
        onednn_md(&c, M, N, ldc, 0, dnnl_f32);
        dnnl_memory_t t[3] = {NULL, NULL, NULL};
        if (dnnl_memory_create(&t[0], &a, d->eng, DNNL_MEMORY_NONE) != dnnl_success ||
            dnnl_memory_create(&t[1], &b, d->eng, DNNL_MEMORY_NONE) != dnnl_success ||
            dnnl_memory_create(&t[2], &c, d->eng, DNNL_MEMORY_NONE) != dnnl_success) {
            for (int i = 0; i < 3; i++)
                if (t[i]) dnnl_memory_destroy(t[i]);
            return -1;
        }
        m[1] = t[1];
        m[2] = t[2];
        m[0] = t[0];
    }
    dnnl_memory_set_data_handle(m[0], (void *)A);
    dnnl_memory_set_data_handle(m[1], (void *)B);
    dnnl_memory_set_data_handle(m[2], C);
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, m[0]}, {DNNL_ARG_WEIGHTS, m[1]}, {DNNL_ARG_DST, m[2]}};
    if (dnnl_primitive_execute(e->prim, d->streams[slot], 3, args) != dnnl_success) return -1;
    return dnnl_stream_wait(d->streams[slot]) == dnnl_success ? 0 : -1;
}

int scmoe__onednn_cached(const scmoe__onednn *d) {
    int n = 0;
    for (int i = 0; d && i < d->n; i++) n += d->e[i]->prim != NULL;
    return n;
}
const char *scmoe__onednn_impl(const scmoe__onednn *d) { return d ? d->impl : ""; }

const char *scmoe__onednn_isa(void) {
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "unknown";
    }
}
#endif /* SCMOE_WITH_ONEDNN */
