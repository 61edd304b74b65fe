/* moe_offload.c: expert offloading (scmoe_cuda_options.offload_experts): the routed experts' weights
 * live in mapped host memory and at most `slots` of them on the device at a time, each as the span of
 * its w1, b1, w2, b2; a forward prefetches those that received rows while the exchange flies. */
#include "scmoe_internal.h"

/* Starts copying local expert i's weights into the next slot (round robin), evicting its expert. */
static void expert_fetch(moe_layer *m, int i) {
    int v = m->off.victim;
    m->off.victim = (v + 1) % m->off.slots;
    if (m->off.held[v] >= 0) m->off.slot_of[m->off.held[v]] = -1;
    m->co->prefetch(m->co, m->off.cache + (size_t)v * m->off.span, moe_param_data(m, m->p_e0 + 4 * i),
                    sizeof(float) * m->off.span);
    m->off.held[v] = i;
    m->off.slot_of[i] = v;
    m->off.fetched++;
    m->off.prefetched = 1;
}

/* A forward's fetch: the weights may have changed on the host since the last one, so the cache starts
 * empty; the experts that received rows (in the order they run) are copied in while the exchange and
 * whatever the schedule enqueues next run, as many as there are slots. */
void scmoe__moe_experts_prefetch(moe_layer *m) {
    const route_plan *pl = &m->plan;
    int El = m->E_local;
    m->off.victim = 0;
    for (int i = 0; i < El; i++) m->off.slot_of[i] = -1;
    for (int v = 0; v < m->off.slots; v++) m->off.held[v] = -1;
    for (int i = 0, taken = 0; i < El && taken < m->off.slots; i++) {
        int rows = 0;
        for (int s = 0; s < pl->n_stages; s++)
            rows += pl->expert_offsets[s * El + i + 1] - pl->expert_offsets[s * El + i];
        if (rows > 0) {
            expert_fetch(m, i);
            taken++;
        }
    }
}

/* Local expert i's w1, b1, w2, b2 where the kernels can read them: the table's, or (offloading) its
 * slot, fetched now if it is not there; the kernels enqueued next wait for every fetch in flight. */
void scmoe__moe_expert_weights(moe_layer *m, int i, float *w[4]) {
    int b = m->p_e0 + 4 * i;
    if (!m->off.slots) {
        for (int j = 0; j < 4; j++) w[j] = moe_param_data(m, b + j);
        return;
    }
    if (m->off.slot_of[i] < 0) expert_fetch(m, i);
    if (m->off.prefetched) m->co->prefetch_wait(m->co);
    m->off.prefetched = 0;
    const float *base = moe_param_data(m, b);
    for (int j = 0; j < 4; j++)
        w[j] = m->off.cache + (size_t)m->off.slot_of[i] * m->off.span + (moe_param_data(m, b + j) - base);
}
