# kvgate: `make test` and `make run` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvgate-installed
TORCH_CPU_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: test run lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without a GPU, take the CPU build of torch first so pip does not pull CUDA packages.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)"; fi
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/kvgate serve

lint: $(STAMP)
	$(BIN)/ruff check gateway cachestore kernels tests bench migrations

bench: $(STAMP)
	for b in bench/hashing.py bench/policy.py bench/ledger.py bench/ttft.py bench/load.py bench/kernels.py; do \
		test -f $$b && $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
