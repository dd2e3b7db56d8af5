# Single entry points for people and CI. Every target sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed before the project so that no requirement
# pulls a CUDA build. On a GPU machine: TORCH_SPEC="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128" make install
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo quality protos bench clean

# pip runs with -qq: on machines whose pip configuration names index folders
# that lack a package, pip warns once per package at -q; errors still show.
# PIP_FLAGS= make install shows everything. The packaging itself builds
# without warnings (tests/test_packaging.py); setuptools' one informational
# note on every editable install of a mapped layout is filtered by message.
PIP_FLAGS ?= -qq
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install $(PIP_FLAGS)

$(BIN)/.installed: pyproject.toml
	@echo "installing: virtual environment $(VENV)/"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@echo "installing: $(TORCH_SPEC) (the CPU build unless TORCH_SPEC says otherwise)"
	@$(PIP) $(TORCH_SPEC)
	@echo "installing: fedpilot (editable) with its worker, bench, sim and dev extras (minutes)"
	@$(PIP) -e ".[worker,bench,sim,dev]"
	@touch $@
	@echo "installed: $(BIN)/fedpilot"

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

# The shipped stack for real: podman builds the images, podman-compose runs
# docker-compose.yml, examples/job.yaml trains to done and the adapter loads
# with PEFT (scripts/stack-test; needs root, podman, podman-compose, runc).
.PHONY: stack-test
stack-test: install
	scripts/stack-test
