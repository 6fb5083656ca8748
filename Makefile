# ferflow: the two commands a user needs.
#   make repro   create .venv if missing, install pinned requirements, run `dvc repro`
#   make test    create .venv if missing, install requirements + test deps, run pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --no-input -q

.PHONY: repro test lint venv install install-dev clean-outputs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the requirement files change (stamp files record it).
$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -r requirements.txt
	$(BIN)/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

venv install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

repro: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check ferflow stages tests benchmarks
	$(BIN)/ruff format --check ferflow stages tests benchmarks
