# The two commands a new user runs: `make compile` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshc-installed

.PHONY: compile test bench demo clean bytecode

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The editable install leaves compiling bytecode to the first import, which never caches it
# where PYTHONDONTWRITEBYTECODE is set: every meshc run would compile its modules (~35 ms).
# A wheel install compiles them at install time; this does the same for the checkout.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q compiler

compile: bytecode
	$(BIN)/meshc compile

test: bytecode
	$(BIN)/meshc validate
	$(BIN)/meshc compile --check
	$(BIN)/python -m pytest -q -n 2

bench: bytecode
	$(BIN)/python bench/compile.py

# A real Envoy fed by `meshc serve` in front of small local backends (the dev environment).
demo: bytecode
	$(BIN)/meshc compile
	$(BIN)/python -m compiler.xds.demo

clean:
	rm -rf $(VENV) .meshc-demo .pytest_cache
