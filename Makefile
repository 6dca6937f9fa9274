# The two commands a new user runs: `make compile` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshc-installed

.PHONY: compile test bench demo clean bytecode sshd prometheus

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

# The SSH push tests run a real sshd (Debian's openssh-server). Install it when this is root
# with apt; otherwise say so, and those tests skip naming the package.
sshd:
	@test -x /usr/sbin/sshd || command -v sshd >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server; \
	  else echo "make: no sshd and not root with apt: install openssh-server, or the SSH push tests skip" >&2; fi

# The canary tests run a real Prometheus (Debian's prometheus), scraping a real Envoy. The same:
# installed when this is root with apt, else said, and those tests skip naming the package.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "make: no prometheus and not root with apt: install prometheus, or the canary tests against it skip" >&2; fi

test: bytecode sshd prometheus
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
