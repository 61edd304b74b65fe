# scmoe. `make` builds build/libscmoe.a; `make check` runs the tests; `make demo` the main job.
# Options: MPI=0 (serial backend only), OPT=..., SAN=1 (address + undefined sanitizers),
# CUDA=1 (also build/libscmoe_cuda.a, see docs/cuda.md), ONEDNN=0 (bf16 GEMMs without oneDNN: rounded
# operands, fp32 GEMMs; the default 1 uses oneDNN when pkg-config or its header finds it).
CC      ?= cc
MPICC   ?= mpicc
MPI     ?= 1
OPT     ?= -O2 -march=x86-64-v2
CFLAGS  ?= $(OPT) -g
CFLAGS  += -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Wno-unused-parameter -fopenmp -fPIC -MMD -MP
ifeq ($(SAN),1)
  CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer
  LDFLAGS += -fsanitize=address,undefined
endif
BLAS_INC := $(shell pkg-config --cflags openblas 2>/dev/null || echo -I/usr/include/x86_64-linux-gnu/openblas-openmp)
BLAS_LIB := $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas)
# oneDNN (Debian libdnnl-dev) for the bf16 GEMMs; Debian ships no dnnl.pc, so its header stands in
ONEDNN  ?= 1
ifeq ($(ONEDNN),1)
  DNNL_LIB := $(shell pkg-config --libs dnnl 2>/dev/null || (test -f /usr/include/oneapi/dnnl/dnnl.h && echo -ldnnl))
endif
ifneq ($(DNNL_LIB),)
  CFLAGS  += -DSCMOE_WITH_ONEDNN
  DNNL_INC := $(shell pkg-config --cflags dnnl 2>/dev/null)
endif
LDLIBS  += $(BLAS_LIB) $(DNNL_LIB) -fopenmp -lm -lpthread

B ?= build
CORE_SRC := scmoe.c layer.c moe.c moe_gate_encode.c moe_exchange.c moe_offload.c pair.c controls.c schedule.c ffn.c router.c kernels/exec.c kernels/layernorm.c \
            kernels/activation.c kernels/gate.c \
            kernels/route.c kernels/route_batch.c kernels/attention.c kernels/bf16.c kernels/rows.c kernels/combine.c kernels/compute_host.c \
            mpi_backend/serial.c precision.c
BLAS_SRC := blas_backend/openblas.c blas_backend/blas_host.c blas_backend/onednn.c
ifeq ($(MPI),1)
  CC_LIB  := $(MPICC)
  MPI_SRC := mpi_backend/mpi.c
  CFLAGS  += -DSCMOE_WITH_MPI
else
  CC_LIB  := $(CC)
  MPI_SRC :=
endif
LIB_OBJ := $(patsubst %.c,$(B)/%.o,$(CORE_SRC) $(BLAS_SRC) $(MPI_SRC))

TESTS_SERIAL := test_moe test_route test_pair test_schedule test_oracle_moe test_oracle_pair test_controls test_bf16
TESTS_MPI    := test_comm_mpi test_ep test_oracle_ep
TEST_BINS := $(addprefix $(B)/tests/,$(TESTS_SERIAL) $(if $(filter 1,$(MPI)),$(TESTS_MPI)))

all: $(B)/libscmoe.a

$(B)/blas_backend/%.o: blas_backend/%.c
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) $(BLAS_INC) $(DNNL_INC) -c $< -o $@
$(B)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) -c $< -o $@
$(B)/libscmoe.a: $(LIB_OBJ)
	ar rcs $@ $^

$(B)/tests/%: tests/%.c $(B)/tests/tensorio.o $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) -I. $< $(B)/tests/tensorio.o $(B)/libscmoe.a $(LDFLAGS) $(LDLIBS) -o $@

$(B)/bench/%: bench/%.c $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) $(BLAS_INC) -I. $< $(B)/libscmoe.a $(LDFLAGS) $(LDLIBS) -o $@

BENCHES := $(patsubst bench/%.c,$(B)/bench/%,$(wildcard bench/*.c))
bench: $(BENCHES)

-include $(LIB_OBJ:.o=.d)

.PHONY: all deps tests bench check check-scale check-sanitize check-valgrind clean format
deps:
	@tools/install_deps.sh
	@$(if $(filter 1,$(ONEDNN)),tools/install_deps.sh --optional libdnnl-dev)

tests: $(TEST_BINS)

# The PyTorch oracles need python3-torch: tried here (apt only), and they SKIP, loudly, without it.
check: deps
	@tools/install_deps.sh --optional python3-torch python3-numpy
	$(MAKE) tests examples bench
	tests/run.sh

# test_ep on 8 and 16 ranks (oversubscribed, small shapes): GLOBAL == 1 rank and LOCAL's guarantees for every
# arch. Minutes on a 2-core box (8 ranks: 1.5 min with the box shared), so in .ci/run but not in check.
check-scale: deps
	$(MAKE) tests
	TESTS=scale tests/run.sh

# The same suite built with ASan + UBSan in its own build folder. OpenMPI keeps allocations for the life of
# the process and frees its plugins' code at finalize: the plugins stay loaded and leaks are unwound
# the slow way (OpenMPI has no frame pointers), so fuzz/lsan.supp can name OpenMPI's own and nothing of ours.
check-sanitize: deps
	$(MAKE) B=build-san SAN=1 tests
	ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0 LSAN_OPTIONS=suppressions=$(CURDIR)/fuzz/lsan.supp \
	OMPI_MCA_mca_base_component_disable_dlclose=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	BUILD=build-san tests/run.sh

# The one-rank suites under valgrind memcheck (errors and leaks fail the run).
check-valgrind: deps
	$(MAKE) tests
	VALGRIND="valgrind --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite,indirect --quiet" TESTS="moe pair schedule" tests/run.sh

# The house style (.clang-format); tests/test_format.sh checks it in make check.
format:
	clang-format -i $$(git ls-files -- '*.c' '*.h' '*.cu' '*.cpp')

clean:
	rm -rf build build-san dist docs/html

include mk/install.mk
include mk/examples.mk
include mk/cuda.mk
include mk/hardening.mk
