/* mpi_check.h: the MPI test programs' harness (test_ep, test_checkpoint, faults/fault_rank_error).
 * Every rank calls check() with its own verdict; the check passes only if it passes on every rank, every
 * rank counts it, and rank 0 prints "ok - [P ranks] ..." or "not ok - [P ranks] ..." (with check_quiet
 * set, only the failures). */
#ifndef SCMOE_MPI_CHECK_H
#define SCMOE_MPI_CHECK_H
#include "../scmoe_mpi.h"
#include <stdarg.h>
#include <stdio.h>

static int check_passed, check_failed, check_quiet;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    int all, rank, size;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    all ? check_passed++ : check_failed++;
    if (rank == 0 && (!all || !check_quiet)) {
        va_list ap;
        va_start(ap, fmt);
        printf("%sok - [%d ranks] ", all ? "" : "not ", size);
        vprintf(fmt, ap);
        printf("\n");
        va_end(ap);
        fflush(stdout);
    }
}
#endif
