# Two entry points do all set-up on a fresh machine: `make serve` and `make test`.
# Each creates .venv and installs the project (with its dev tools) when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test lint bench demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

serve: $(STAMP)
	$(VENV)/bin/signaling serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) lint
	./scripts/ensure-redis-server
	./scripts/ensure-deploy-tools
	$(VENV)/bin/pytest

# Benchmarks (bench/README.md): `make bench`, or `make bench BENCH_ARGS=--quick`. Adds the bench extra
# (uvloop, matplotlib, py-spy) to .venv once.
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	./scripts/ensure-redis-server
	$(PY) -m bench $(BENCH_ARGS)
