# pych: `make demo` boots the test guest; `make test` runs the whole suite.
# Both install what is missing first (Debian packages, .venv, the test guest).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv guest test test-unit test-guest demo bench clean

all: test

deps:
	@scripts/install-deps.sh

.venv/.stamp: pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: .venv/.stamp

guest: deps
	@guest/build.sh

test: deps venv guest
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-guest: deps venv guest
	$(PY) -m pytest -ra tests/guest $(PYTEST_ARGS)

demo: deps venv guest
	@$(PY) scripts/demo.py

bench: deps venv guest
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/boot.py

clean:
	rm -rf build .pytest_cache
