# Two commands do all the set-up on a fresh machine:
#   make run   - create the virtualenv, install, migrate the SQLite database,
#                print a demo token and curl line, serve on 127.0.0.1:8080
#   make test  - install with the test extras and run the whole suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
export MYCLOUD_DATABASE_URL ?= sqlite:///var/mycloud.db

.PHONY: run test lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	mkdir -p var
	$(BIN)/mycloud-compute db upgrade
	$(BIN)/mycloud-compute demo --url http://$(HOST):$(PORT)
	$(BIN)/mycloud-compute serve --host $(HOST) --port $(PORT)

test: install-test lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Contract fuzzing with schemathesis against a live server, on SQLite and PostgreSQL:
# FUZZ_EXAMPLES generated cases per operation and phase (150 gave 6,500 to 7,700
# requests per database); `make test` runs the same test with 4.
FUZZ_EXAMPLES ?= 150
.PHONY: fuzz
fuzz: install-test
	MYCLOUD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_contract_fuzz.py -s $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var build src/*.egg-info
