# The two commands: `make demo` and `make test` (ruff, then the suite). Both build .venv from the pinned lock file first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stacktrain demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --timeout 900 -m "not slow" tests

# The large-stack kill tests (marked slow): CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 1800 -m slow tests

clean:
	rm -rf $(VENV) demo-out .pytest_cache
