# Two entry points (see README): `make run` and `make test`. Each sets up what it needs itself:
# a virtualenv in .venv with torch, numpy, pytest, maturin and ruff (installed with uv, whose
# cache lives in .uv-cache so that later venvs link the same files instead of copying 5 GB),
# then builds the abi3 wheel with maturin and installs it into that venv.

VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
export UV_CACHE_DIR ?= $(abspath .uv-cache)
STAMP := $(VENV)/.deps-stamp
CLEAN_VENV := .venv-clean
# Work off the critical path runs at low priority; cargo under `make -j` keeps its own job count.
NOJOBS := env -u MAKEFLAGS -u MFLAGS
LOW := nice -n 15 $(NOJOBS)

.PHONY: setup build run test test-rust test-py test-wheel lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q --python $(PY) torch numpy pytest "maturin>=1.5,<2" ruff transformers
	touch $(STAMP)

setup: $(STAMP)

build: $(STAMP)
	rm -rf dist
	$(NOJOBS) $(VENV)/bin/maturin build --release --interpreter $(PY) --out dist
	$(UV) pip install -q --python $(PY) --reinstall --no-deps dist/mamba_scan-*.whl

run: build
	$(PY) -m mamba_scan

# The Rust unit tests build in their own target directory, so that they can run beside the
# release build of the wheel: `make test` runs them at low priority while the release build,
# which keeps one core busy for most of its time, goes first (it and the pytest suite after
# it, NVRTC-bound on every core, are the critical path).
test-rust:
	PYO3_PYTHON=$(abspath $(PY)) CARGO_TARGET_DIR=target/unit-tests $(LOW) cargo test

test-py: build
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider . -o testpaths=.

# The wheel as a new user gets it: a fresh venv, `pip install` of the wheel alone (its declared
# dependencies come from the index), then the README's quickstart.
test-wheel: build
	rm -rf $(CLEAN_VENV)
	$(UV) venv -q --python python3 $(CLEAN_VENV)
	$(LOW) $(UV) pip install -q --python $(CLEAN_VENV)/bin/python dist/mamba_scan-*.whl
	cd /tmp && $(LOW) $(abspath $(CLEAN_VENV))/bin/python $(abspath tests/readme_quickstart.py) $(abspath README.md)

# The pytest suite and the wheel check start when the wheel is built, whether or not the Rust
# unit tests (low priority, from the start) are done.
test: $(STAMP)
	$(MAKE) -j3 test-rust test-py test-wheel

lint: $(STAMP)
	cargo fmt --check
	PYO3_PYTHON=$(abspath $(PY)) CARGO_TARGET_DIR=target/clippy cargo clippy --release --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/ruff format --check python tests benchmarks

bench: build
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf dist target $(VENV) $(CLEAN_VENV)
