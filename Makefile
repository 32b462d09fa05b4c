# Two entry points (see README): `make run` and `make test`. Each sets up what it needs itself:
# a virtualenv in .venv with torch, numpy, pytest, maturin and ruff, then builds the abi3 wheel
# with maturin and installs it into that venv.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-stamp

.PHONY: setup build run test test-rust test-py lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch numpy pytest "maturin>=1.5,<2" ruff transformers
	touch $(STAMP)

setup: $(STAMP)

build: $(STAMP)
	rm -rf dist
	$(VENV)/bin/maturin build --release --interpreter $(PY) --out dist
	$(PIP) install -q --force-reinstall --no-deps dist/mamba_scan-*.whl

run: build
	$(PY) -m mamba_scan

test-rust:
	PYO3_PYTHON=$(abspath $(PY)) cargo test --release

test-py: build
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider . -o testpaths=.

test: $(STAMP) test-rust test-py

lint: $(STAMP)
	cargo fmt --check
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --release --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/ruff format --check python tests benchmarks

bench: build
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf dist target $(VENV)
