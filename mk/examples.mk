# mk/examples.mk: the examples (a byte-level LM trainer and its sampler), their tests, `make demo` and
# `make check-slurm`. Included at the end of the Makefile; uses its B, MPI, MPICC, CFLAGS, BLAS_INC,
# LDFLAGS, LDLIBS and its `deps` target. The examples need MPI (MPI=1, the default).
#
#   make examples        build/examples/{train_lm,generate,minimal_moe,minimal_pair}, build/tests/test_checkpoint
#   make demo            install deps, build, train a small ScMoE LM on 2 ranks (~1 min), sample from it
#   make check-examples  the minimal examples (in-tree, then tests/test_minimal.sh: installed + pkg-config,
#                        static, drop-in), tests/test_train.sh, tests/test_checkpoint on 1 and 2 ranks
#   make check-slurm     a real one-node Slurm (installed if missing), one training job through sbatch

EX_MPIRUN ?= mpirun --oversubscribe -x OMP_NUM_THREADS=1
EX_ENV    := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
EX_BINS   := $(B)/examples/train_lm $(B)/examples/generate
EX_OBJS   := $(B)/examples/checkpoint.o $(B)/examples/model.o

# The demo: ScMoE (shortcut position 2), 2 block pairs, d 64, 8 experts over 2 ranks, trained on this
# repository's own sources (train_lm's default text), then a few lines sampled from the checkpoint.
DEMO_DIR   ?= $(B)/demo
DEMO_TRAIN ?= --arch scmoe --pos 2 --d 64 --hidden 256 --experts 8 --heads 4 --pairs 2 --seq 64 --batch 8 \
              --steps 1000 --warmup 50 --lr 3e-3 --eval-every 100 --print-every 50 --precision auto
DEMO_GEN   ?= --prompt "/* " --tokens 400 --temperature 0.7 --top-k 20 --seed 7

.PHONY: examples demo check-examples check-slurm

# The minimal examples: a layer / a pair in a host's own loop, one rank, against the in-tree archive
# (tests/test_minimal.sh builds them the README's ways: installed, static, drop-in).
EX_MINIMAL := $(B)/examples/minimal_moe $(B)/examples/minimal_pair
$(EX_MINIMAL): $(B)/examples/%: examples/%.c scmoe.h $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(CC_LIB) $(CFLAGS) -I. $< $(B)/libscmoe.a $(LDFLAGS) $(LDLIBS) -o $@

ifeq ($(MPI),1)
$(B)/examples/checkpoint.o: examples/checkpoint.c examples/checkpoint.h scmoe.h
	@mkdir -p $(dir $@)
	$(MPICC) $(CFLAGS) -c $< -o $@

$(B)/examples/model.o: examples/model.c examples/model.h examples/checkpoint.h scmoe.h
	@mkdir -p $(dir $@)
	$(MPICC) $(CFLAGS) -c $< -o $@

$(EX_BINS): $(B)/examples/%: examples/%.c examples/checkpoint.h examples/model.h scmoe.h scmoe_mpi.h $(EX_OBJS) $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(MPICC) $(CFLAGS) $(BLAS_INC) -I. $< $(EX_OBJS) $(B)/libscmoe.a $(LDFLAGS) $(LDLIBS) -o $@

$(B)/tests/test_checkpoint: tests/test_checkpoint.c examples/checkpoint.h $(B)/examples/checkpoint.o $(B)/libscmoe.a
	@mkdir -p $(dir $@)
	$(MPICC) $(CFLAGS) -I. $< $(B)/examples/checkpoint.o $(B)/libscmoe.a $(LDFLAGS) $(LDLIBS) -o $@

examples: $(EX_BINS) $(EX_MINIMAL) $(B)/tests/test_checkpoint

demo: deps
	$(MAKE) all examples
	@echo "== training a small ScMoE language model on 2 ranks (about a minute; its first line names the precision) =="
	$(EX_ENV) $(EX_MPIRUN) -np 2 $(B)/examples/train_lm $(DEMO_TRAIN) --save $(DEMO_DIR) --log $(DEMO_DIR).jsonl
	@echo "== sampling from $(DEMO_DIR)/ckpt.bin (MoE in inference mode, 2 ranks) =="
	$(EX_ENV) $(EX_MPIRUN) -np 2 $(B)/examples/generate --ckpt $(DEMO_DIR) $(DEMO_GEN)

check-examples: deps
	$(MAKE) all examples
	OMP_NUM_THREADS=2 $(B)/examples/minimal_moe
	OMP_NUM_THREADS=2 $(B)/examples/minimal_pair
	BUILD=$(B) tests/test_minimal.sh
	BUILD=$(B) tests/test_train.sh
	$(EX_ENV) $(EX_MPIRUN) -np 1 $(B)/tests/test_checkpoint
	$(EX_ENV) $(EX_MPIRUN) -np 2 $(B)/tests/test_checkpoint

check-slurm: deps
	$(MAKE) all examples
	BUILD=$(B) tests/slurm/run_slurm_test.sh
else
examples demo check-examples check-slurm:
	@echo "the examples need MPI: build with MPI=1" >&2; exit 1
endif
