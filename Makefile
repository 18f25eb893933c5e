# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.longtail-installed
# APT=auto: `make test` installs the test data (Debian package dataset-fashion-mnist) when it is
# missing and it can (root or password-less sudo); APT=false: never, the tests that need it skip.
APT ?= auto
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-m fashion_mnist' or PYTEST_ARGS='-k report'.
PYTEST_ARGS ?=

.PHONY: demo test test-data lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/longtail demo --out runs/demo

test-data:
	APT=$(APT) bash scripts/provision-test-data.sh

test: $(STAMP) test-data
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache build src/*.egg-info
