/* bench_info.h: the line every bench header prints about what runs its GEMMs: OpenBLAS's kernel core
 * (openblas_get_corename, chosen at run time from the CPU it sees) and the bf16 engine with oneDNN's
 * instruction set (scmoe_context_gemm_info), and a warning when OpenBLAS took an older core than this
 * CPU's flags allow (a VM reporting a generic CPU): OPENBLAS_CORETYPE names the right one. */
#ifndef SCMOE_BENCH_INFO_H
#define SCMOE_BENCH_INFO_H
#include "../scmoe.h"
#include <cblas.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static void bench_print_gemm_info(FILE *f, scmoe_context *ctx) {
    const char *core = openblas_get_corename();
    fprintf(f, "# GEMMs: %s\n", scmoe_context_gemm_info(ctx));
#if defined(__x86_64__) && defined(__GNUC__)
    static const char *const avx512_cores[] = {"SkylakeX", "Cooperlake", "SapphireRapids", "Zen4"};
    static const char *const pre_avx2_cores[] = {"Prescott",    "Core2", "Penryn",    "Dunnington", "Nehalem",
                                                 "Sandybridge", "Atom",  "Barcelona", "Opteron"};
    int old = 0;
    const char *hint = "";
    if (__builtin_cpu_supports("avx512f")) {
        old = 1;
        for (size_t i = 0; i < sizeof avx512_cores / sizeof *avx512_cores; i++)
            old &= strcasecmp(core, avx512_cores[i]) != 0;
        hint = "SkylakeX (or Cooperlake / SapphireRapids where the CPU has avx512_bf16 / amx)";
    } else if (__builtin_cpu_supports("avx2")) {
        for (size_t i = 0; i < sizeof pre_avx2_cores / sizeof *pre_avx2_cores; i++)
            old |= !strcasecmp(core, pre_avx2_cores[i]);
        hint = "Haswell";
    }
    if (old)
        fprintf(f, "# WARNING: OpenBLAS runs its %s kernels, older than this CPU allows: try OPENBLAS_CORETYPE=%s\n",
                core, hint);
#endif
}
#endif
