/* bf16.c: bfloat16 for the wire. A bf16 is the top 16 bits of an IEEE float; packing rounds to
 * nearest, ties to even, on the dropped 16 bits (NaN stays a quiet NaN), so an exchange of bf16 rows
 * halves the bytes at a relative error of at most 2^-9 per element. Unpacking is exact. */
#include "kernels.h"
#include <string.h>

void bf16_pack(uint16_t *dst, const float *src, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof u);
        if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) dst[i] = (uint16_t)((u >> 16) | 0x0040u);
        else dst[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

void bf16_unpack(float *dst, const uint16_t *src, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}
