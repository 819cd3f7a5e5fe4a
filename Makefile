# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-all lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install  ## train the MLP with flow matching on moons (CPU, about a minute)
	$(PY) launcher.py run_name=quickstart overwrite=true

test: install  ## the default test suite (slow and GPU cases excluded)
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy paths models losses solvers dataloaders evaluation training adapters launcher.py scripts hydra_plugins

bench: install
	$(PY) -m pip install -e '.[bench]'
	$(PY) scripts/bench_2d.py
