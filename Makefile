# pych: `make demo` boots the test guest; `make test` runs the whole suite.
# Both install what is missing first (Debian packages, .venv, the test guest).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv guest test test-unit test-guest demo bench soak soak-long fuzz fuzz-guest openapi options clean

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

# tests/unit/test_wheel.py builds the wheel (setuptools from the package index) and installs it
# into a fresh venv; PYTEST_ARGS="-m 'not wheel'" leaves it out where there is no index.
# The suite runs on TEST_WORKERS pytest-xdist workers (default 2, the CI machine's cores), one
# module per worker at a time (--dist loadfile: a module's booted guests are shared by its tests),
# modules handed out longest first (tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder,)
test: deps venv guest
	$(PY) -m pytest -ra $(XDIST) $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-guest: deps venv guest
	$(PY) -m pytest -ra $(XDIST) tests/guest $(PYTEST_ARGS)

demo: deps venv guest
	@$(PY) scripts/demo.py

# Every bench script measures pych and its peer (QEMU) in turn, who goes first rotating, and
# writes its own table into docs/benchmarks.md (between <!-- bench:NAME --> markers) with the
# date, commit, run count and the host's load average before and after. BENCH_RUNS: runs per
# VMM (3 or more for a figure worth recording; fewer is marked as a smoke run). BENCH_HOST_NOTE:
# what else the host was doing, written into each table's header.
BENCH_RUNS ?= 3
bench: deps venv guest
	$(PY) -m pip install -q -e '.[test,bench]'
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/startup.py
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/api.py
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/boot.py
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/hotplug.py --kind cpu
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/hotplug.py --kind disk
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/hotplug.py --kind memory
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/block.py
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/migration.py
	BENCH_RUNS=$(BENCH_RUNS) $(PY) bench/io.py

# scripts/soak.py: N hot plug cycles on a real guest, checking pych for fd, thread, memslot
# and heap growth (hours here; CI runs a few cycles in tests/guest/test_soak.py)
SOAK_CYCLES ?= 200
soak: deps venv guest
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) scripts/soak.py --cycles $(SOAK_CYCLES)

soak-long: deps venv guest
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) scripts/soak.py --cycles 500

# scripts/fuzz.py: generated API requests, raw HTTP abuse and the deliberate lifecycle against
# a booted guest; then pych, vmm.ping and a guest shell must still answer (CI runs a short
# variant in tests/guest/test_fuzz.py). FUZZ_ARGS, e.g. "--seed 7 --quick".
FUZZ_REQUESTS ?= 10000
FUZZ_MINUTES ?= 20
FUZZ_ARGS ?=
fuzz: deps venv guest
	$(PY) scripts/fuzz.py --requests $(FUZZ_REQUESTS) --minutes $(FUZZ_MINUTES) $(FUZZ_ARGS)

# scripts/fuzz_guest.py: the fuzz guest (tests/fuzzguest, C built here with gcc) attacks every
# device model with hostile queues and port/MMIO/config accesses, once per seed; pych is
# checked after each scenario (CI runs one short seed in tests/guest/test_fuzz_guest.py).
FUZZ_GUEST_SEEDS ?= 1 2 3 4 5
FUZZ_GUEST_ARGS ?= --passes 3 --rounds 60
fuzz-guest: deps venv
	$(PY) scripts/fuzz_guest.py --seeds $(FUZZ_GUEST_SEEDS) $(FUZZ_GUEST_ARGS)

# docs/openapi.json: pych's API as its route table and models describe it (a unit test
# fails when the committed file is not what this generates)
openapi: venv
	$(PY) -m pych.api.openapi > docs/openapi.json.tmp
	mv docs/openapi.json.tmp docs/openapi.json

# docs/options.md: what pych does with every option key and API field, printed from the
# support table (pych/config/support.py; a unit test checks the committed page is current)
options: venv
	$(PY) -m pych.config.options_page > docs/options.md.tmp
	mv docs/options.md.tmp docs/options.md

clean:
	rm -rf build .pytest_cache
