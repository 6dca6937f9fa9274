# The two commands a new user runs: `make compile` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshc-installed

.PHONY: compile test bench demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

compile: $(STAMP)
	$(BIN)/meshc compile

test: $(STAMP)
	$(BIN)/meshc validate
	$(BIN)/meshc compile --check
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python bench/compile.py

# A real Envoy fed by `meshc serve` in front of small local backends (the dev environment).
demo: $(STAMP)
	$(BIN)/meshc compile
	$(BIN)/python -m compiler.xds.demo

clean:
	rm -rf $(VENV) .meshc-demo .pytest_cache
