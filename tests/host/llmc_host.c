/* llmc_host.c: a host program that has kernels of its own with llm.c's names (llmc_kernels.c) and
 * trains a block pair of every arch for two steps through the public API, printing hashes of the
 * outputs, dX and every parameter and gradient. tests/test_symbols.sh builds it against libscmoe.a and
 * the drop-in, with and without the host's kernels, and wants the same bytes from every build.
 *   -DUSE_DROPIN            include dist/scmoe_all.h instead of scmoe.h
 *   -DKERNELS_IN_THIS_FILE  the host's kernels in this translation unit (with SCMOE_IMPLEMENTATION)
 *   -DNO_HOST_KERNELS       the reference build: no host kernels at all */
#ifdef USE_DROPIN
#include "scmoe_all.h"
#else
#include "scmoe.h"
#endif
#ifdef KERNELS_IN_THIS_FILE
#include "llmc_kernels.c"
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int llmc_selftest(void);

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

int main(void) {
#ifndef NO_HOST_KERNELS
    if (llmc_selftest()) return 1;
#endif
    scmoe_context *ctx;
    if (scmoe_context_create(&ctx) != SCMOE_OK) return 2;
    int B = 2, T = 8, d = 16, n = B * T;
    float x[2 * 8 * 16], y[2 * 8 * 16], dy[2 * 8 * 16], dx[2 * 8 * 16];
    for (int i = 0; i < n * d; i++) x[i] = (float)((i * 37) % 23) / 23.0f - 0.5f, dy[i] = 0.01f * (float)(i % 7);
    for (int arch = 0; arch <= SCMOE_ARCH_SCMOE; arch++) {
        scmoe_config c = scmoe_config_default();
        c.d_model = d;
        c.d_hidden = 24;
        c.n_experts = 4;
        c.n_heads = 2;
        c.max_tokens = n;
        c.max_seq_len = T;
        c.arch = (scmoe_arch)arch;
        scmoe_pair *p;
        if (scmoe_pair_create(ctx, &c, &p) != SCMOE_OK) {
            fprintf(stderr, "create: %s\n", scmoe_last_error(ctx));
            return 3;
        }
        for (int step = 0; step < 2; step++) {
            scmoe_stats s;
            if (scmoe_pair_zero_grad(p) || scmoe_pair_forward(p, B, T, x, y, &s) ||
                scmoe_pair_backward(p, dy, dx, &s)) {
                fprintf(stderr, "step: %s\n", scmoe_last_error(ctx));
                return 4;
            }
            uint64_t h = fnv(fnv(1469598103934665603ull, y, sizeof y), dx, sizeof dx);
            for (int i = 0; i < scmoe_pair_param_count(p); i++) {
                scmoe_tensor t;
                scmoe_pair_param_at(p, i, &t);
                h = fnv(fnv(h, t.data, sizeof(float) * t.numel), t.grad, sizeof(float) * t.numel);
                for (size_t j = 0; j < t.numel; j++) t.data[j] -= 0.1f * t.grad[j];
            }
            printf("arch %d step %d aux %a hash %016llx\n", arch, step, s.aux_loss, (unsigned long long)h);
        }
        scmoe_pair_destroy(p);
    }
    scmoe_context_destroy(ctx);
    return 0;
}
