# Two entry points (see README): `make run` and `make test`. Each sets up what it needs itself:
# a virtualenv in .venv with torch, numpy, pytest, maturin and ruff (installed with uv, whose
# cache lives in .uv-cache so that later venvs link the same files instead of copying 5 GB),
# then builds the abi3 wheel with maturin and installs it into that venv.

VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
export UV_CACHE_DIR ?= $(abspath .uv-cache)
# Two stamps: the build tools (venv, uv, maturin, ruff: seconds), with which the Rust builds can
# start, and the test dependencies (torch and the rest: a minute of downloads, mostly idle CPU),
# which install meanwhile.
TOOLS := $(VENV)/.tools-stamp
STAMP := $(VENV)/.deps-stamp
CLEAN_VENV := .venv-clean
# Work off the critical path runs at low priority; cargo under `make -j` keeps its own job count.
NOJOBS := env -u MAKEFLAGS -u MFLAGS
LOW := nice -n 15 $(NOJOBS)

.PHONY: setup tools build run test test-rust test-py test-wheel lint bench clean

$(TOOLS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q --python $(PY) "maturin>=1.5,<2" ruff
	touch $(TOOLS)

$(STAMP): $(TOOLS)
	$(UV) pip install -q --python $(PY) torch numpy pytest hypothesis transformers
	touch $(STAMP)

tools: $(TOOLS)

setup: $(STAMP)

build: $(TOOLS)
	rm -rf dist
	$(NOJOBS) $(VENV)/bin/maturin build --release --interpreter $(PY) --out dist
	$(UV) pip install -q --python $(PY) --reinstall --no-deps dist/mamba_scan-*.whl

run: build $(STAMP)
	$(PY) -m mamba_scan

# The Rust unit tests build in their own target directory, so that they can run beside the
# release build of the wheel: `make test` runs them at low priority while the release build,
# which keeps one core busy for most of its time, goes first (it and the pytest suite after
# it, NVRTC-bound on every core, are the critical path).
# Incremental compilation off for the one-shot test and lint builds (it only adds work there).
test-rust: $(TOOLS)
	PYO3_PYTHON=$(abspath $(PY)) CARGO_TARGET_DIR=target/unit-tests CARGO_INCREMENTAL=0 $(LOW) cargo test

test-py: build $(STAMP)
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider . -o testpaths=.

# The wheel as a new user gets it: a fresh venv, `pip install` of the wheel alone (its declared
# dependencies come from the index), then the README's quickstart.
test-wheel: build
	rm -rf $(CLEAN_VENV)
	$(UV) venv -q --python python3 $(CLEAN_VENV)
	$(LOW) $(UV) pip install -q --python $(CLEAN_VENV)/bin/python dist/mamba_scan-*.whl
	cd /tmp && $(LOW) $(abspath $(CLEAN_VENV))/bin/python $(abspath tests/readme_quickstart.py) $(abspath README.md)

# The release build starts as soon as the tools are there, beside the download of torch; the
# pytest suite and the wheel check start when the wheel is built, whether or not the Rust unit
# tests (low priority, from the start) are done.
test: $(TOOLS)
	$(MAKE) -j4 test-rust test-py test-wheel

# clippy in the unit tests' target directory and profile: the two share the build scripts and
# proc macros of the dependencies (cargo runs them one after the other there).
lint: $(TOOLS)
	cargo fmt --check
	PYO3_PYTHON=$(abspath $(PY)) CARGO_TARGET_DIR=target/unit-tests CARGO_INCREMENTAL=0 cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/ruff format --check python tests benchmarks

bench: build $(STAMP)
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf dist target $(VENV) $(CLEAN_VENV)
