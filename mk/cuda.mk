# mk/cuda.mk: the optional CUDA backend (cuda_backend/, docs/cuda.md). Included at the end of the
# Makefile; uses its B, CC_LIB, CFLAGS, LDFLAGS, LDLIBS and its $(B)/libscmoe.a rule.
#
#   make CUDA=1             also builds $(B)/libscmoe_cuda.a (with `tests`: test_cuda and test_cuda_moe too)
#   make check-cuda-build   builds and links every CUDA file, runs check-cuda-emu, then
#                             $(B)/tests/test_cuda      the kernels and GEMMs: device checks on a GPU, "ok -
#                                                       ... # SKIP no CUDA device" without one; host-side
#                                                       checks always
#                             $(B)/tests/test_cuda_moe  the layer and the pair on the device vs the host
#                                                       (1 rank, and 2 with MPI); SKIP without a device
#                           the emulation runs the same two tests (*_emu) with kernels.cu built by $(CXX)
#                           (cuda_backend/emu/): every kernel on CPU threads, no GPU needed
#                           without nvcc it prints a SKIP line and succeeds
#   make check-cuda-emu     only the emulation (needs the CUDA headers, not nvcc or a GPU); also a tiny run of
#                           bench/cuda/bench_cuda in it, as a smoke test
#   make bench-cuda         $(B)/bench/bench_cuda: the layer's experts vs plain cuBLAS, ScMoE vs top-2 (a GPU)
#   make check-gpu          tools/gpu_check.sh: on the build machine (nvcc, no GPU) it builds and packs what the
#                           GPU machine needs into .gpu/; on the GPU machine (.gpu/ carried along) it runs every
#                           CUDA test, compute-sanitizer's four tools and the benches, and prints the summary
#
# Variables: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), CUDA_HOME (default: the
# folder above nvcc's bin/), CUDA_ARCH (sm_80 and sm_90 code, compute_90 PTX), NVCCFLAGS.
#
# Nothing below is read unless CUDA=1 or a check-cuda-* target is asked for: every other build is
# exactly what it was without this file.

ifneq ($(filter 1,$(CUDA))$(filter check-cuda-build check-cuda-emu bench-cuda check-gpu,$(MAKECMDGOALS)),)
CUDA_GOALS := check-cuda-build check-cuda-emu bench-cuda check-gpu

# builds with make itself where there is no GPU (no make variable reaches it: its builds are its own)
check-gpu:
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL tools/gpu_check.sh

ifeq ($(origin NVCC),undefined)
  NVCC := $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
endif
ifeq ($(origin CUDA_HOME),undefined)
  CUDA_HOME := $(if $(NVCC),$(patsubst %/bin/,%,$(dir $(NVCC))))
endif
# a distribution's nvcc (CUDA_HOME /usr): headers and libraries are on the default paths already
CUDA_SYS    := $(filter /usr /,$(CUDA_HOME))
CUDA_INC    := $(if $(CUDA_SYS),,$(if $(CUDA_HOME),-I$(CUDA_HOME)/include))
CUDA_LIBDIR := $(if $(CUDA_SYS),,$(firstword $(wildcard $(CUDA_HOME)/lib64 $(CUDA_HOME)/targets/x86_64-linux/lib)))
comma := ,
CUDA_LDLIBS :=
ifneq ($(CUDA_LIBDIR),)
  CUDA_LDLIBS += -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR)
endif
CUDA_LDLIBS += -lcublas -lcudart -lstdc++

CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
NVCCFLAGS ?= -O2 -g
NVCCFLAGS += -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-Wall,-Wextra,-Wno-unused-parameter -MMD -MP
# SAN=1 builds the emulated kernels with the sanitizers too: every device access is bounds-checked
CUDA_EMU_CXXFLAGS := -O2 -g -std=c++17 -Wall -Wextra -Wno-unused-parameter -fPIC -pthread -MMD -MP \
                     $(if $(filter 1,$(SAN)),-fsanitize=address$(comma)undefined -fno-omit-frame-pointer)

CUDA_C_OBJ  := $(B)/cuda_backend/cublas.o $(B)/cuda_backend/compute_cuda.o $(B)/cuda_backend/context.o
CUDA_OBJ    := $(CUDA_C_OBJ) $(B)/cuda_backend/kernels.o
CUDA_EMU_OBJ := $(B)/cuda_emu/kernels.o $(B)/cuda_emu/emu_launch.o $(B)/cuda_emu/runtime_emu.o

# the C files: the library's compiler and flags plus the CUDA headers (built for the emulation too)
$(B)/cuda_backend/%.o: cuda_backend/%.c
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) $(CUDA_INC) -c $< -o $@

# ---- the emulation: kernels.cu as host C++, the runtime and cuBLAS calls on host memory ----
$(B)/cuda_emu/kernels.o: cuda_backend/kernels.cu
	@mkdir -p $(dir $@)
	$(CXX) $(CUDA_EMU_CXXFLAGS) -DSCMOE_CUDA_EMU $(CUDA_INC) -x c++ -c $< -o $@
$(B)/cuda_emu/emu_launch.o: cuda_backend/emu/emu_launch.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CUDA_EMU_CXXFLAGS) $(CUDA_INC) -c $< -o $@
$(B)/cuda_emu/runtime_emu.o: cuda_backend/emu/runtime_emu.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(CUDA_INC) -c $< -o $@
$(B)/tests/test_cuda_emu: tests/test_cuda.c tests/check.h $(CUDA_C_OBJ) $(CUDA_EMU_OBJ) $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) -DSCMOE_CUDA_EMU $(CUDA_INC) -I. $< $(CUDA_C_OBJ) $(CUDA_EMU_OBJ) $(B)/libscmoe.a \
	    $(LDFLAGS) -lstdc++ -pthread $(LDLIBS) -o $@

$(B)/tests/test_cuda_moe_emu: tests/test_cuda_moe.c tests/check.h $(CUDA_C_OBJ) $(CUDA_EMU_OBJ) $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) -DSCMOE_CUDA_EMU $(CUDA_INC) -I. $< $(CUDA_C_OBJ) $(CUDA_EMU_OBJ) $(B)/libscmoe.a \
	    $(LDFLAGS) -lstdc++ -pthread $(LDLIBS) -o $@

# the layer and pair tests also on 2 ranks (exchanges between device layers) where MPI is built; with
# SAN=1, OpenMPI's process-lifetime allocations are suppressed by name as in check-sanitize
CUDA_SAN_ENV := $(if $(filter 1,$(SAN)),ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0 \
                LSAN_OPTIONS=suppressions=$(CURDIR)/fuzz/lsan.supp OMPI_MCA_mca_base_component_disable_dlclose=1)
CUDA_MPIRUN := $(if $(filter 1,$(MPI)),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
               $(CUDA_SAN_ENV) mpirun --oversubscribe -np 2)

# bench/cuda/bench_cuda.c (not in `make bench`, which builds bench/*.c for every build)
$(B)/bench/bench_cuda_emu: bench/cuda/bench_cuda.c $(CUDA_C_OBJ) $(CUDA_EMU_OBJ) $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) -DSCMOE_CUDA_EMU $(CUDA_INC) -I. $< $(CUDA_C_OBJ) $(CUDA_EMU_OBJ) $(B)/libscmoe.a \
	    $(LDFLAGS) -lstdc++ -pthread $(LDLIBS) -o $@
CUDA_BENCH_SMOKE := --d 32 --hidden 64 --experts 4 --tokens 64 --heads 4 --seq 16 --batch 2 --reps 1

ifeq ($(CUDA_HOME),)
check-cuda-emu:
	@echo "check-cuda-emu: SKIP - no CUDA headers (nvcc not found; set CUDA_HOME=/path/to/cuda)"
else
check-cuda-emu: $(B)/tests/test_cuda_emu $(B)/tests/test_cuda_moe_emu $(B)/bench/bench_cuda_emu
	$(B)/tests/test_cuda_emu
	$(CUDA_SAN_ENV) $(B)/tests/test_cuda_moe_emu
	$(if $(CUDA_MPIRUN),$(CUDA_MPIRUN) $(B)/tests/test_cuda_moe_emu)
	$(CUDA_SAN_ENV) $(B)/bench/bench_cuda_emu $(CUDA_BENCH_SMOKE)
	$(CUDA_SAN_ENV) $(B)/bench/bench_cuda_emu $(CUDA_BENCH_SMOKE) --bf16
	tests/test_gpu_summary.sh
endif

ifeq ($(NVCC),)
  ifeq ($(CUDA),1)
    ifneq ($(filter-out $(CUDA_GOALS),$(or $(MAKECMDGOALS),all)),)
      $(error CUDA=1: nvcc not found (not on PATH, not at /usr/local/cuda/bin/nvcc); set NVCC=/path/to/nvcc)
    endif
  endif
check-cuda-build bench-cuda:
	@echo "$@: SKIP - nvcc not found (not on PATH, not at /usr/local/cuda/bin/nvcc); set NVCC=/path/to/nvcc"
else

$(B)/cuda_backend/%.o: cuda_backend/%.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
$(B)/libscmoe_cuda.a: $(CUDA_OBJ)
	ar rcs $@ $^

# the kernels' CPU twins come from libscmoe.a
$(B)/tests/test_cuda: tests/test_cuda.c tests/check.h $(B)/libscmoe_cuda.a $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) $(CUDA_INC) -I. $< $(B)/libscmoe_cuda.a $(B)/libscmoe.a $(LDFLAGS) $(CUDA_LDLIBS) $(LDLIBS) \
	    -o $@

$(B)/tests/test_cuda_moe: tests/test_cuda_moe.c tests/check.h $(B)/libscmoe_cuda.a $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) $(CUDA_INC) -I. $< $(B)/libscmoe_cuda.a $(B)/libscmoe.a $(LDFLAGS) $(CUDA_LDLIBS) $(LDLIBS) \
	    -o $@

$(B)/bench/bench_cuda: bench/cuda/bench_cuda.c $(B)/libscmoe_cuda.a $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) $(CUDA_INC) -I. $< $(B)/libscmoe_cuda.a $(B)/libscmoe.a $(LDFLAGS) $(CUDA_LDLIBS) $(LDLIBS) \
	    -o $@
bench-cuda: $(B)/bench/bench_cuda

ifeq ($(CUDA),1)
all: $(B)/libscmoe_cuda.a
tests: $(B)/tests/test_cuda $(B)/tests/test_cuda_moe
endif

# the emulation first, then the same tests against the real runtime (each prints its own "N passed, N failed")
check-cuda-build: $(B)/libscmoe_cuda.a $(B)/tests/test_cuda $(B)/tests/test_cuda_moe $(B)/bench/bench_cuda check-cuda-emu
	$(B)/tests/test_cuda
	$(B)/tests/test_cuda_moe
	$(if $(CUDA_MPIRUN),$(CUDA_MPIRUN) $(B)/tests/test_cuda_moe)
endif

-include $(CUDA_OBJ:.o=.d) $(CUDA_EMU_OBJ:.o=.d)

.PHONY: $(CUDA_GOALS)
endif
