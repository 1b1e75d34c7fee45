# salla-rewards — every target creates and uses .venv; CI calls the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.8

.DEFAULT_GOAL := help
.PHONY: help install run test chaos lint format typecheck bench bench-tools bench-scale bench-scale-tools clean lock

help:
	@echo "make run        run the service on embedded defaults (Redis, Salla sandbox, rules/)"
	@echo "make test       install what is needed, run the tests, the rules' tests, lint, types"
	@echo "make lint       ruff check + format check    make format   apply ruff fixes/format"
	@echo "make typecheck  mypy --strict on service/    make bench    benchmarks"
	@echo "make bench-scale  Redis bytes per order and webhook (SCALE_ARGS=\"--stores 1000\" for less)"
	@echo "make chaos      the randomized fault suite (real workers, SIGKILL, Salla faults)"
	@echo "make lock       re-pin both lock files       make clean    remove .venv and var/"

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/salla-rewards run

# Bytecode is written ahead (here and by `uv pip install --compile-bytecode`): where
# PYTHONDONTWRITEBYTECODE is set, as on the machines this project is developed on, every
# process the tests start would otherwise compile every module it imports again: about 1.7 s
# of CPU per `salla-rewards` process instead of 0.6 s.
test: install
	$(BIN)/python -m compileall -q service tests benchmarks >/dev/null
	$(BIN)/pytest
	$(BIN)/salla-rewards rules test rules
	$(BIN)/ruff check service tests benchmarks
	$(BIN)/ruff format --check service tests benchmarks
	$(BIN)/mypy

chaos: install
	$(BIN)/pytest -n 0 -m chaos --timeout 600 tests/test_faults.py tests/test_order_truth.py tests/test_queue_redis.py tests/test_valkey_cluster.py tests/test_state_cluster.py

lint: install
	$(BIN)/ruff check service tests benchmarks
	$(BIN)/ruff format --check service tests benchmarks

format: install
	$(BIN)/ruff check --fix service tests benchmarks
	$(BIN)/ruff format service tests benchmarks

typecheck: install
	$(BIN)/mypy

# wrk (Debian's package) is the ingest benchmark's load generator: C, one epoll thread, far
# faster than the server it drives on these two cores.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { \
		echo "installing wrk (Debian package) for the ingest benchmark"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }

bench: install bench-tools
	$(BIN)/python -m benchmarks

# Debian's redis-server (jemalloc) next to the embedded one (libc malloc): memory figures differ
# by allocator. RUNLEVEL=1 keeps the package from starting a server of its own; the benchmark
# starts and stops its own, on a free port.
bench-scale-tools:
	@test -x /usr/bin/redis-server || { \
		echo "installing redis-server (Debian package, jemalloc) for the memory benchmark"; \
		$(SUDO) apt-get update -qq && $(SUDO) env RUNLEVEL=1 apt-get install -y -qq redis-server >/dev/null; }

SCALE_ARGS ?=
bench-scale: install bench-scale-tools
	$(BIN)/python -m benchmarks.scale $(SCALE_ARGS)

lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 -o requirements.runtime.lock

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
