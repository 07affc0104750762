# distillery — the two commands a new user runs are `make demo` and `make test` (README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo teachers device-check cli-docs clean-venv

setup: $(STAMP)

# The stamp follows the files that decide what gets installed, so editing a pin re-runs the install.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[cpu,test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

# The whole pipeline on the embedded data (configs/demo.yaml): data, two teachers, cache, four students,
# evaluation, results/demo/report.md. A second run reuses every finished step.
demo: $(STAMP)
	$(BIN)/distillery demo

# The demo's two shipped teachers (teachers/, committed), retrained from their recipes (configs/teachers/)
# on the demo's synth data, each with a provenance.json that the demo checks. Deterministic on a CPU.
teachers: $(STAMP)
	$(BIN)/distillery demo --train-teachers

# The prepared GPU check (benchmarks/device_check.py, sized for under 8 minutes on one GPU): teacher forward,
# cache-teachers, training and kNN rates with peak memory, and the GPU-hours figures `make all DRY_RUN=1` reads.
device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py --out results/device_check.json --throughput benchmarks/gpu_throughput.json

# docs/cli.md, the command reference, is generated from the typer app (a test checks it is current).
cli-docs: $(STAMP)
	$(BIN)/typer distillery.cli utils docs --name distillery --output docs/cli.md

clean-venv:
	rm -rf $(VENV)

# The papers' experiments on real data (make all, make all DRY_RUN=1); after STAMP, which they depend on.
include make/experiments.mk
