# kvmesh: `make demo` and `make test` work on a fresh machine (Python 3.11).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(CURDIR)/$(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install native demo lint test test-unit test-integration test-docker proto proto-check bench bench-quick image clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $(STAMP)

## The native hot path (native/, Rust): built when cargo is present, else the
## pure-Python path serves (engine_adapters/native.py chooses at import).
NATIVE_STAMP := $(VENV)/.native
NATIVE_SRC := $(wildcard native/src/*.rs) native/Cargo.toml native/Cargo.lock native/pyproject.toml native/kvmesh_native.pyi

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC)
	$(PY) -m pip install -q 'maturin>=1.9.4,<2'
	@start=$$(date +%s); \
	cd native && VIRTUAL_ENV=$(CURDIR)/$(VENV) $(CURDIR)/$(VENV)/bin/maturin develop --release --locked -q && \
	echo "kvmesh: native hot path built in $$(( $$(date +%s) - start )) s (native/, Rust; KVMESH_PURE_PYTHON=1 forces the Python path)"
	@touch $(NATIVE_STAMP)

native: $(STAMP)
	@if command -v cargo >/dev/null; then $(MAKE) -s --no-print-directory $(NATIVE_STAMP); \
	else echo "kvmesh: cargo not found: native hot path not built, the pure-Python path serves (install Rust, then make install)"; fi

install: $(STAMP) native

## Regenerate gRPC/protobuf code from proto/ (the one command for it).
proto: $(STAMP)
	PYTHON=$(PY) bash scripts/gen_proto.sh

## Fail if the generated code differs from what proto/ would generate now.
proto-check: $(STAMP)
	PYTHON=$(PY) bash scripts/check_proto.sh

demo: $(STAMP) native
	$(VENV)/bin/kvmesh demo

## Gates: lint and format (ruff), types (mypy), the package layers (import-linter).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

## The full suite: the gates, then unit + property, simulation, multi-process
## on loopback, multi-container. pytest exits 5 when it collects no test: that
## fails the target like any other non-zero exit.
test: $(STAMP) native proto-check lint
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: $(STAMP) native
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/sim

test-integration: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

test-docker: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/containers

## The benchmark suite: writes docs/benchmarks.md, docs/benchmarks.json, docs/img/*.png and
## docs/reliability.md, docs/reliability.json (~25 min).
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench,peers]'
	$(VENV)/bin/kvmesh bench all

## The same suite, short (~4 min).
bench-quick: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench,peers]'
	$(VENV)/bin/kvmesh bench all --quick

## Container images without a registry: the local Debian base (rebuilt only when
## the dependencies change) + the app image kvmesh:local, built with no network.
image:
	bash deploy/build-base-image.sh
	docker build -q --force-rm --network none -f deploy/Dockerfile --build-arg BASE=kvmesh-base:local -t kvmesh:local .
	@docker image prune -f --filter label=kvmesh.image=app >/dev/null

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis native/target
