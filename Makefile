# The two commands: `make demo` and `make test` (ruff, then the suite). Both build .venv from the pinned lock file first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install services clean

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stacktrain demo --out demo-out

# The database server the multi-machine search test starts on loopback (Debian's package, where missing).
services:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

test: $(STAMP) services
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --timeout 900 -m "not slow" tests

# The large-stack kill tests (marked slow): CI runs them after `make test`.
test-slow: $(STAMP) services
	$(BIN)/python -m pytest -q -n 2 --timeout 1800 -m slow tests

clean:
	rm -rf $(VENV) demo-out .pytest_cache
