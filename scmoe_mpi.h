/**
 * @file scmoe_mpi.h
 * @brief Creating a scmoe context over an MPI communicator.
 *
 * Only embedders that build with MPI include this; scmoe.h itself never pulls in mpi.h.
 */
#ifndef SCMOE_MPI_H
#define SCMOE_MPI_H

#include <mpi.h>
#include "scmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/** COLLECTIVE over host_comm: a context over the ranks of an MPI communicator.
 *
 * Every rank of host_comm must call it, in the same order as its other collectives on host_comm.
 *
 * The context spans exactly the ranks of host_comm (any communicator: the library never assumes
 * MPI_COMM_WORLD). The library duplicates host_comm with MPI_Comm_dup, so its messages can never match
 * the host's, and sets MPI_ERRORS_RETURN on the duplicate, so an MPI failure comes back as
 * ::SCMOE_ERR_COMM (detail in scmoe_last_error()) instead of aborting the job. host_comm itself is left
 * untouched and may be freed by the host after this call; scmoe_context_destroy() frees the duplicate,
 * so destroy every context before MPI_Finalize.
 *
 * @par MPI_COMM_WORLD's error handler while a context lives
 * OpenMPI (4.1 and later) reports an error inside a nonblocking collective (the library's exchanges
 * and agreements all are) to MPI_COMM_WORLD's error handler, whatever communicator it ran on: with
 * MPI's default MPI_ERRORS_ARE_FATAL a truncated or failed exchange would abort the whole job, and the
 * promise above could not hold. So when MPI_COMM_WORLD's handler is one that aborts
 * (MPI_ERRORS_ARE_FATAL, MPI_ERRORS_ABORT), this call replaces it with MPI_ERRORS_RETURN, and
 * scmoe_context_destroy() of this context puts it back (unless the host installed another handler in
 * between). Meanwhile the host's own calls on MPI_COMM_WORLD return error codes too: a host that relies
 * on aborting runs them on a duplicate with MPI_ERRORS_ARE_FATAL set (examples/train_lm.c does). A
 * handler that returns (MPI_ERRORS_RETURN or the host's own) is left as it is. scmoe_context_abort()
 * leaves MPI_ERRORS_RETURN in place: exchanges it abandoned may still fail later.
 *
 * The library never calls MPI_Init or MPI_Finalize. If MPI is not initialised (or already finalised),
 * this returns ::SCMOE_ERR_STATE and sets *ctx to NULL. The MPI thread level granted to the host is
 * recorded: the THREAD progress policy needs MPI_THREAD_MULTIPLE and falls back to POLL without it.
 *
 * @param host_comm  the host's communicator (not MPI_COMM_NULL); the context's rank and size are the
 *                   calling process's rank and size in it.
 * @param[out] ctx   receives the new context; free it with scmoe_context_destroy() (COLLECTIVE).
 * @return ::SCMOE_OK, ::SCMOE_ERR_NULL (ctx NULL or host_comm MPI_COMM_NULL), ::SCMOE_ERR_STATE (MPI not
 *         initialised, or MPI_COMM_WORLD's handler is fatal: see above),
 *         ::SCMOE_ERR_NOMEM or ::SCMOE_ERR_COMM. On failure *ctx is NULL; since there is then no context
 *         to hold the detail, the status alone says what went wrong. */
scmoe_status scmoe_context_create_mpi(MPI_Comm host_comm, scmoe_context **ctx);

#ifdef __cplusplus
}
#endif
#endif /* SCMOE_MPI_H */
