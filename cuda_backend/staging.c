/* staging.c: token exchanges of device rows over an MPI that cannot read device memory.
 *
 *   begin     producer stream --ev_ready--> copy stream: send span device -> pinned h_send, ev_to_host
 *   progress  ev_to_host complete?  -> comm alltoallv_start(h_send -> h_recv)         (TO_HOST -> EXCHANGE)
 *             comm_test done?       -> copy stream: recv span h_recv -> device, ev_to_device
 *                                                                                    (EXCHANGE -> TO_DEVICE)
 *             ev_to_device complete? -> DONE (informational: consumers wait on the device anyway)
 *   finish    consumer stream waits on ev_to_device; back to IDLE
 *
 * Nothing synchronizes the device or a whole stream: the host only polls events (cudaEventQuery), so
 * progress can be called between kernel launches the way scmoe__exec_poll is called between GEMM tiles.
 * With a CUDA-aware MPI (cuda_aware = 1) there are no copies: the exchange starts on the device
 * pointers once the producer's event has completed, and the MPI library orders its own transfers.
 *
 * Buffer reuse is safe without extra events: the next exchange starts only after its own send copy
 * completed on the copy stream, which is after the previous receive copy (same stream, in order),
 * so MPI never writes h_recv while the previous copy still reads it.
 *
 * The host spans mirror the device layout: bytes [lo, hi) of d_send land at h_send + lo, so the
 * caller's displacements hold for both, and a span must fit the buffer from offset 0. */
#include "cuda.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* ---- the CUDA runtime's calls ---- */

static int rt_host_alloc(void **p, size_t bytes) { return (int)cudaHostAlloc(p, bytes, cudaHostAllocDefault); }
static void rt_host_free(void *p) { cudaFreeHost(p); }
static int rt_stream_create(void **s) {
    cudaStream_t st;
    cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    *s = e == cudaSuccess ? (void *)st : NULL;
    return (int)e;
}
static void rt_stream_destroy(void *s) { cudaStreamDestroy((cudaStream_t)s); }
static int rt_event_create(void **ev) {
    cudaEvent_t e;
    cudaError_t r = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    *ev = r == cudaSuccess ? (void *)e : NULL;
    return (int)r;
}
static void rt_event_destroy(void *ev) { cudaEventDestroy((cudaEvent_t)ev); }
static int rt_event_record(void *ev, void *s) { return (int)cudaEventRecord((cudaEvent_t)ev, (cudaStream_t)s); }
static int rt_stream_wait_event(void *s, void *ev) {
    return (int)cudaStreamWaitEvent((cudaStream_t)s, (cudaEvent_t)ev, 0);
}
static int rt_event_query(void *ev) {
    cudaError_t e = cudaEventQuery((cudaEvent_t)ev);
    if (e == cudaSuccess) return 0;
    if (e == cudaErrorNotReady) {
        /* not an error: do not leave it for the next launch check (and clear nothing else) */
        if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
        return 1;
    }
    return -(int)e;
}
static int rt_memcpy_async(void *dst, const void *src, size_t bytes, int kind, void *s) {
    return (int)cudaMemcpyAsync(dst, src, bytes, kind ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost,
                                (cudaStream_t)s);
}

const cuda_stage_ops *scmoe__cuda_stage_runtime_ops(void) {
    static const cuda_stage_ops ops = {rt_host_alloc,   rt_host_free,     rt_stream_create, rt_stream_destroy,
                                       rt_event_create, rt_event_destroy, rt_event_record,  rt_stream_wait_event,
                                       rt_event_query,  rt_memcpy_async};
    return &ops;
}

/* ---- staging ---- */

static scmoe_status stage_fail(cuda_stage *st, scmoe_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static scmoe_status stage_fail(cuda_stage *st, scmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->err, sizeof st->err, fmt, ap);
    va_end(ap);
    return s;
}

static scmoe_status device_fail(cuda_stage *st, const char *what, int code) {
    if (code < 0) code = -code;
    return stage_fail(st, SCMOE_ERR_UNSUPPORTED, "%s failed: %s (%d)", what, cudaGetErrorString((cudaError_t)code),
                      code);
}

void scmoe__cuda_stage_destroy(cuda_stage *st) {
    if (!st) return;
    const cuda_stage_ops *o = st->ops;
    if (st->ev_ready) o->event_destroy(st->ev_ready);
    if (st->ev_to_host) o->event_destroy(st->ev_to_host);
    if (st->ev_to_device) o->event_destroy(st->ev_to_device);
    if (st->copy_stream) o->stream_destroy(st->copy_stream);
    if (st->h_send) o->host_free(st->h_send);
    if (st->h_recv) o->host_free(st->h_recv);
    free(st);
}

scmoe_status scmoe__cuda_stage_create(cuda_stage **out, size_t send_bytes, size_t recv_bytes, int cuda_aware,
                                      const cuda_stage_ops *ops) {
    if (!out) return SCMOE_ERR_NULL;
    *out = NULL;
    cuda_stage *st = calloc(1, sizeof *st);
    if (!st) return SCMOE_ERR_NOMEM;
    st->ops = ops ? ops : scmoe__cuda_stage_runtime_ops();
    st->cuda_aware = cuda_aware != 0;
    const cuda_stage_ops *o = st->ops;
    int e = 0;
    scmoe_status s = SCMOE_OK;
    if (!st->cuda_aware) {
        if (send_bytes && (e = o->host_alloc(&st->h_send, send_bytes)) != 0) {
            st->h_send = NULL;
            goto alloc_failed;
        }
        if (recv_bytes && (e = o->host_alloc(&st->h_recv, recv_bytes)) != 0) {
            st->h_recv = NULL;
            goto alloc_failed;
        }
        st->cap_send = send_bytes;
        st->cap_recv = recv_bytes;
        if ((e = o->stream_create(&st->copy_stream)) != 0) {
            st->copy_stream = NULL;
            goto device_failed;
        }
        if ((e = o->event_create(&st->ev_to_host)) != 0) {
            st->ev_to_host = NULL;
            goto device_failed;
        }
        if ((e = o->event_create(&st->ev_to_device)) != 0) {
            st->ev_to_device = NULL;
            goto device_failed;
        }
    }
    if ((e = o->event_create(&st->ev_ready)) != 0) {
        st->ev_ready = NULL;
        goto device_failed;
    }
    *out = st;
    return SCMOE_OK;
alloc_failed:
    s = e == (int)cudaErrorMemoryAllocation ? SCMOE_ERR_NOMEM : SCMOE_ERR_UNSUPPORTED;
    scmoe__cuda_stage_destroy(st);
    return s;
device_failed:
    scmoe__cuda_stage_destroy(st);
    return SCMOE_ERR_UNSUPPORTED;
}

/* the byte span [lo, hi) that counts / displs touch; -1 if one is negative or it overflows */
static int span(const int *counts, const int *displs, int n, int elem_bytes, size_t *lo, size_t *hi) {
    size_t l = (size_t)-1, h = 0;
    for (int r = 0; r < n; r++) {
        if (counts[r] < 0 || displs[r] < 0) return -1;
        if (!counts[r]) continue;
        size_t a = (size_t)displs[r] * (size_t)elem_bytes, b = a + (size_t)counts[r] * (size_t)elem_bytes;
        l = a < l ? a : l;
        h = b > h ? b : h;
    }
    *lo = h ? l : 0;
    *hi = h;
    return 0;
}

scmoe_status scmoe__cuda_stage_begin(cuda_stage *st, comm *c, const void *d_send, const int *scounts,
                                     const int *sdispls, void *d_recv, const int *rcounts, const int *rdispls,
                                     int elem_bytes, cudaStream_t producer) {
    if (!st) return SCMOE_ERR_NULL;
    if (!c || !scounts || !sdispls || !rcounts || !rdispls)
        return stage_fail(st, SCMOE_ERR_NULL, "scmoe__cuda_stage_begin: NULL comm or count array");
    if (st->state != CUDA_STAGE_IDLE)
        return stage_fail(st, SCMOE_ERR_STATE, "scmoe__cuda_stage_begin: an exchange is already in flight (state %d)",
                          st->state);
    if (elem_bytes < 1) return stage_fail(st, SCMOE_ERR_OPTION, "scmoe__cuda_stage_begin: elem_bytes = %d", elem_bytes);
    size_t slo, shi, rlo, rhi;
    if (span(scounts, sdispls, c->size, elem_bytes, &slo, &shi) ||
        span(rcounts, rdispls, c->size, elem_bytes, &rlo, &rhi))
        return stage_fail(st, SCMOE_ERR_OPTION, "scmoe__cuda_stage_begin: a negative count or displacement");
    if ((shi && !d_send) || (rhi && !d_recv))
        return stage_fail(st, SCMOE_ERR_NULL, "scmoe__cuda_stage_begin: NULL device buffer with rows to move");
    if (!st->cuda_aware && (shi > st->cap_send || rhi > st->cap_recv))
        return stage_fail(st, SCMOE_ERR_OPTION,
                          "scmoe__cuda_stage_begin: %zu bytes out / %zu in do not fit the staging buffers (%zu / %zu)",
                          shi, rhi, st->cap_send, st->cap_recv);
    const cuda_stage_ops *o = st->ops;
    int e;
    if ((e = o->event_record(st->ev_ready, (void *)producer)) != 0)
        return device_fail(st, "recording the producer's event", e);
    if (!st->cuda_aware) {
        if ((e = o->stream_wait_event(st->copy_stream, st->ev_ready)) != 0)
            return device_fail(st, "ordering the copy after the producer", e);
        if (shi > slo && (e = o->memcpy_async((char *)st->h_send + slo, (const char *)d_send + slo, shi - slo, 0,
                                              st->copy_stream)) != 0)
            return device_fail(st, "copying the send rows to the host", e);
        if ((e = o->event_record(st->ev_to_host, st->copy_stream)) != 0)
            return device_fail(st, "recording the send copy's event", e);
    }
    st->c = c;
    st->d_send = d_send;
    st->d_recv = d_recv;
    st->scounts = scounts;
    st->sdispls = sdispls;
    st->rcounts = rcounts;
    st->rdispls = rdispls;
    st->elem_bytes = elem_bytes;
    st->send_lo = slo;
    st->send_bytes = shi - slo;
    st->recv_lo = rlo;
    st->recv_bytes = rhi - rlo;
    st->req = -1;
    st->polls = 0;
    st->err[0] = '\0';
    st->state = CUDA_STAGE_TO_HOST;
    return SCMOE_OK;
}

scmoe_status scmoe__cuda_stage_progress(cuda_stage *st, int *done) {
    if (!st || !done) return SCMOE_ERR_NULL;
    *done = 0;
    if (st->state == CUDA_STAGE_IDLE)
        return stage_fail(st, SCMOE_ERR_STATE, "scmoe__cuda_stage_progress: nothing in flight");
    const cuda_stage_ops *o = st->ops;
    st->polls++;
    int e;
    if (st->state == CUDA_STAGE_TO_HOST) {
        e = o->event_query(st->cuda_aware ? st->ev_ready : st->ev_to_host);
        if (e == 1) return SCMOE_OK;
        if (e != 0) {
            st->state = CUDA_STAGE_IDLE;
            return device_fail(st, "waiting for the send rows", e);
        }
        const void *send = st->cuda_aware ? (const void *)st->d_send : st->h_send;
        void *recv = st->cuda_aware ? (void *)st->d_recv : st->h_recv;
        comm *c = st->c;
        scmoe_status s = c->ops->alltoallv_start(c, send, st->scounts, st->sdispls, recv, st->rcounts, st->rdispls,
                                                 st->elem_bytes, &st->req);
        if (s) {
            st->state = CUDA_STAGE_IDLE;
            return stage_fail(st, s, "starting the exchange failed: %s", c->err);
        }
        st->state = CUDA_STAGE_EXCHANGE;
    }
    if (st->state == CUDA_STAGE_EXCHANGE) {
        comm *c = st->c;
        int fin = 0;
        comm_progress(c);
        scmoe_status s = comm_test(c, st->req, &fin);
        if (s) {
            st->state = CUDA_STAGE_IDLE;
            return stage_fail(st, s, "testing the exchange failed: %s", c->err);
        }
        if (!fin) return SCMOE_OK;
        if (st->cuda_aware) {
            st->state = CUDA_STAGE_DONE;
        } else {
            if (st->recv_bytes && (e = o->memcpy_async(st->d_recv + st->recv_lo, (char *)st->h_recv + st->recv_lo,
                                                       st->recv_bytes, 1, st->copy_stream)) != 0) {
                st->state = CUDA_STAGE_IDLE;
                return device_fail(st, "copying the received rows to the device", e);
            }
            if ((e = o->event_record(st->ev_to_device, st->copy_stream)) != 0) {
                st->state = CUDA_STAGE_IDLE;
                return device_fail(st, "recording the receive copy's event", e);
            }
            st->state = CUDA_STAGE_TO_DEVICE;
        }
    }
    if (st->state == CUDA_STAGE_TO_DEVICE) {
        e = o->event_query(st->ev_to_device);
        if (e < 0) {
            st->state = CUDA_STAGE_IDLE;
            return device_fail(st, "copying the received rows", e);
        }
        if (e == 0) st->state = CUDA_STAGE_DONE;
    }
    *done = 1;
    return SCMOE_OK;
}

scmoe_status scmoe__cuda_stage_finish(cuda_stage *st, cudaStream_t consumer) {
    if (!st) return SCMOE_ERR_NULL;
    if (st->state != CUDA_STAGE_TO_DEVICE && st->state != CUDA_STAGE_DONE)
        return stage_fail(st, SCMOE_ERR_STATE, "scmoe__cuda_stage_finish: the exchange is not done (state %d)",
                          st->state);
    if (!st->cuda_aware) {
        int e = st->ops->stream_wait_event((void *)consumer, st->ev_to_device);
        if (e) {
            st->state = CUDA_STAGE_IDLE;
            return device_fail(st, "ordering the consumer after the copy", e);
        }
    }
    st->state = CUDA_STAGE_IDLE;
    return SCMOE_OK;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

scmoe_status scmoe__cuda_stage_wait(cuda_stage *st, cudaStream_t consumer, double timeout_s) {
    if (!st) return SCMOE_ERR_NULL;
    if (st->state == CUDA_STAGE_IDLE)
        return stage_fail(st, SCMOE_ERR_STATE, "scmoe__cuda_stage_wait: nothing in flight");
    double limit = timeout_s > 0 ? timeout_s : st->c->timeout_s, t0 = now_s();
    for (;;) {
        int done;
        scmoe_status s = scmoe__cuda_stage_progress(st, &done);
        if (s) return s;
        if (done) return scmoe__cuda_stage_finish(st, consumer);
        if (limit > 0 && now_s() - t0 > limit)
            return stage_fail(st, SCMOE_ERR_TIMEOUT, "scmoe__cuda_stage_wait: no completion after %.3g s (state %d)",
                              limit, st->state);
    }
}
