# Two entry points, both self-installing into ./.venv (created on first use, reused after):
#   make run   - the device report and the end-to-end demo
#   make test  - every check: pytest (with doctests), mypy --strict, ruff, mkdocs build --strict
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned for development and CI (a CPU wheel is available locally);
# the library itself only asks for a range (see pyproject.toml). `run` adds numpy only because
# `import torch` warns "Failed to initialize NumPy" without it.
TORCH  ?= torch==2.13.0
export NO_MKDOCS_2_WARNING := 1

.PHONY: run test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" numpy -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev,interop,bench]"
	touch $@ $(VENV)/.run-installed

venv: $(VENV)/.dev-installed

run: $(VENV)/.run-installed
	$(BIN)/python -m devicekit demo  # prints the device report, then trains

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi
	$(BIN)/python -m mypy
	$(BIN)/python -m ruff check devicekit tests benchmarks
	$(BIN)/python -m ruff format --check devicekit tests benchmarks
	$(BIN)/python -m mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .pytest_cache .hypothesis
