# Single entry points for people and CI. Every target sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed before the project so that no requirement
# pulls a CUDA build. On a GPU machine: TORCH_SPEC="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128" make install
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo quality protos bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[worker,bench,dev]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/fedpilot demo

quality: install
	$(BIN)/ruff check .
	$(BIN)/mypy fedpilot/core fedpilot/wire fedpilot/plan.py
	$(BIN)/python scripts/gen_protos.py --check

protos: install
	$(BIN)/python scripts/gen_protos.py

bench: install
	$(BIN)/fedpilot bench solver
	$(BIN)/fedpilot bench aggregate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
