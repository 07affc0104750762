# The papers' experiments on real data: one target per configs/experiments/NAME.yaml, each chaining
# cache -> train -> export -> eval -> analyze -> report through `distillery experiment run NAME --step STEP`
# (analyze scores a TinTeM or Proteus run's head and is a no-op for other methods). A stamp marks every
# finished step, so a re-run starts where the last one stopped (and every step resumes its own work).
#
#   make all DRY_RUN=1                                  check every config, teacher and path; print the plan (CI)
#   make sefa-vits16-dino-augreg DATA=/data/in1k WEIGHTS=/data/hf GPUS=8
#   make all DATA=/data/in1k WEIGHTS=/data/hf GPUS=8    every experiment, one after the other
#
# DATA       shard root holding train/, val/, ood/<set>/, retrieval/<dataset>/ (configs/experiments/datasets/)
# WEIGHTS    pretrained weights: an HF_HOME holding hub/, or a directory of local-dir teachers named like the teachers
# GPUS       GPUs for the cache and train steps, through torchrun when more than 1 (default 1)
# OUT        one experiment's directory (default RESULTS/NAME); RESULTS is the root for all (default results)
# CACHE_DIR  where teacher caches go (default RESULTS/caches); experiments with the same teachers share one
# THROUGHPUT measured images/s for the plan's GPU-hours (default benchmarks/gpu_throughput.json)
# DRY_RUN=1  only the plan: commands, cache size on disk, GPU-hours, the paper numbers to compare

EXPERIMENTS_MK := $(lastword $(MAKEFILE_LIST))
BIN ?= .venv/bin
export HF_HUB_OFFLINE ?= 1
EXPERIMENTS := $(sort $(basename $(notdir $(wildcard configs/experiments/*.yaml))))
GPUS ?= 1
RESULTS ?= results
CACHE_DIR ?= $(RESULTS)/caches
THROUGHPUT ?= benchmarks/gpu_throughput.json
EXPERIMENT_OPTIONS = $(if $(DATA),--data $(DATA)) $(if $(WEIGHTS),--weights $(WEIGHTS)) --gpus $(GPUS) \
	--results $(RESULTS) --cache-dir $(CACHE_DIR)

.PHONY: all experiment-steps $(EXPERIMENTS)

ifeq ($(DRY_RUN),1)

all: $(STAMP)
	$(BIN)/distillery experiment plan all $(EXPERIMENT_OPTIONS) --throughput $(THROUGHPUT)

$(EXPERIMENTS): $(STAMP)
	$(BIN)/distillery experiment plan $@ $(if $(OUT),--out $(OUT)) $(EXPERIMENT_OPTIONS) --throughput $(THROUGHPUT)

else

# One experiment after the other, even under -j: they share GPUs and caches.
all: $(STAMP)
	$(if $(OUT),$(error OUT= names one experiment's directory; give RESULTS= for all of them))
	$(foreach name,$(EXPERIMENTS),$(MAKE) -f $(EXPERIMENTS_MK) $(name) BIN=$(BIN) &&) true

$(EXPERIMENTS): $(STAMP)
	$(MAKE) -f $(EXPERIMENTS_MK) experiment-steps EXPERIMENT=$@ OUT=$(or $(OUT),$(RESULTS)/$@) BIN=$(BIN)

endif

ifdef EXPERIMENT
# One experiment's steps (the sub-make above). Editing the definition re-runs them all; each resumes or
# finds its work done, and a store or run with other settings is refused with what differs.
STAMPS := $(OUT)/stamps
RUN_STEP = $(BIN)/distillery experiment run $(EXPERIMENT) --out $(OUT) $(EXPERIMENT_OPTIONS) --step

experiment-steps: $(OUT)/report.md

$(STAMPS)/cache.done: configs/experiments/$(EXPERIMENT).yaml
$(STAMPS)/train.done: $(STAMPS)/cache.done
$(STAMPS)/export.done: $(STAMPS)/train.done
$(STAMPS)/eval.done: $(STAMPS)/export.done
$(STAMPS)/analyze.done: $(STAMPS)/eval.done
$(STAMPS)/%.done:
	@mkdir -p $(@D)
	$(RUN_STEP) $*
	touch $@

$(OUT)/report.md: $(STAMPS)/analyze.done configs/experiments/$(EXPERIMENT).yaml
	$(RUN_STEP) report
endif
