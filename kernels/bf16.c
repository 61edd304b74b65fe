/* bf16.c: bfloat16. A bf16 is the top 16 bits of an IEEE float; packing rounds to nearest, ties to
 * even, on the dropped 16 bits (NaN stays a quiet NaN), so a value keeps a relative error of at most
 * 2^-8 (8 significant bits). Unpacking is exact. Used for the wire (exchanged rows in half the bytes)
 * and for the operands of bf16 GEMMs (SCMOE_PRECISION_BF16). */
#include "kernels.h"

void scmoe__bf16_pack(uint16_t *dst, const float *src, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) dst[i] = bf16_from_float(src[i]);
}

void scmoe__bf16_unpack(float *dst, const uint16_t *src, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

/* The strided forms: rows x cols of a matrix with row stride ld, written densely (stride cols). */
void scmoe__bf16_pack_rows(uint16_t *dst, const float *src, int rows, int cols, int ld) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) dst[(size_t)i * cols + j] = bf16_from_float(src[(size_t)i * ld + j]);
}

void scmoe__bf16_unpack_rows(float *dst, const uint16_t *src, int rows, int cols, int ld) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) dst[(size_t)i * cols + j] = bf16_to_float(src[(size_t)i * ld + j]);
}

/* float -> bf16 -> float in one pass: the value a bf16 GEMM operand carries, as a float */
void scmoe__bf16_round_rows(float *dst, const float *src, int rows, int cols, int ld) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++)
            dst[(size_t)i * cols + j] = bf16_to_float(bf16_from_float(src[(size_t)i * ld + j]));
}
