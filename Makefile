# ferflow: the two commands a user needs.
#   make repro   create .venv if missing, install pinned requirements, run `dvc repro`
#   make test    create .venv if missing, install requirements + test deps, run pytest
#   make test-unit   the quick lane: tests/unit only
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --no-input -q

.PHONY: repro test test-unit lint venv install install-dev clean-outputs system-deps tracking-server

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

# System packages the tests use, each installed from Debian only when missing and only as
# root (CI); elsewhere the tests that need it skip and say why:
#   PostgreSQL's server programs: tests/pipeline/test_team.py's server tests and `make tracking-server`;
#   Chromium and its WebDriver: tests/pipeline/test_demo.py drives `ferflow demo` in a real browser.
APT_INSTALL = apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
system-deps:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		$(APT_INSTALL) postgresql >/dev/null; \
	else \
		echo "note: PostgreSQL is not installed (sudo apt-get install postgresql): tests/pipeline/test_team.py's server tests will skip"; \
	fi
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		$(APT_INSTALL) chromium chromium-driver >/dev/null; \
	else \
		echo "note: Chromium is not installed (sudo apt-get install chromium chromium-driver): tests/pipeline/test_demo.py's browser tests will skip"; \
	fi

# A local team tracking server (PostgreSQL + mlflow server on 127.0.0.1:5000); docs/team.md
tracking-server: system-deps $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ferflow tracking-server $(SERVER_ARGS)

# Test files run on TEST_WORKERS processes (pytest-xdist); one file stays on one worker, so
# its module/session fixtures (a served model, a PostgreSQL server) are built once.
TEST_WORKERS ?= 2
test: system-deps $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The unit lane: tests/unit (no DVC, no servers, a few training steps at most), to check a
# change quickly; `make test` (CI) runs it and tests/pipeline (repro, servers, clones).
test-unit: $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests/unit $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check ferflow stages tests benchmarks
	$(BIN)/ruff format --check ferflow stages tests benchmarks
