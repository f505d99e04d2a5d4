# Every target that runs code depends on .venv, so a fresh clone needs only `make serve` or `make test`.
# `make serve` installs the runtime only (no torch); `make test` and the training targets add the train and
# dev extras to the same .venv, also after a `make serve`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8080
WORKERS ?= 1
NOW    ?=

# stamps: .runtime = bidder and its runtime dependencies; .full = plus the train and dev extras
RUNTIME := $(VENV)/.runtime $(VENV)/.extension
FULL    := $(VENV)/.full $(VENV)/.extension

.PHONY: all test serve dev bench bench-load default-model mutation clean redis-server

all: test

# A virtual environment with what building the Cython extension needs.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=69" wheel "Cython>=3.0" "numpy>=1.26"

# Serving: bidder with its runtime dependencies (numpy, onnxruntime, onnx, aiohttp, uvloop, msgspec, prometheus-client).
$(VENV)/.runtime: pyproject.toml setup.py | $(PY)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

# Tests and training: the same, plus the train (torch, deepctr-torch, ...) and dev (pytest, ...) extras.
$(VENV)/.full: pyproject.toml setup.py | $(PY)
	$(PIP) install -q --no-build-isolation -e '.[train,dev]'
	touch $(VENV)/.runtime $@

$(VENV)/.extension: bidder/_features.pyx bidder/_pricing.pyx bidder/_rowkernel.pyx bidder/_rowkernel.h bidder/_shading.pyx train/_attention.pyx train/_attention.h train/_rows.pyx train/distributed/_flags.pyx setup.py | $(PY)
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: $(FULL) redis-server
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The ledger's tests start their own redis-server (the Debian package), installed here when it is missing.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q redis-server; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q redis-server; \
	  else echo "error: the tests need redis-server: apt-get install redis-server" >&2; exit 1; fi; }

dev: $(FULL)

DEFAULT_MODEL := bidder/models/default/model.onnx

# The default bundle is committed; if it is ever missing, serving trains it first (minutes, on synthetic data,
# with the train extras). Not a prerequisite: make would build it even when the model is there.
$(DEFAULT_MODEL):
	$(MAKE) $(FULL)
	$(PY) -m train default --out bidder/models/default

serve: $(RUNTIME) $(DEFAULT_MODEL)
	$(PY) -m bidder serve --host $(HOST) --port $(PORT) --workers $(WORKERS) $(if $(NOW),--now $(NOW))

# Mutation testing of the bid path's business logic (minutes; not part of `make test`). Bundles trained by
# the test fixtures are cached in .mutation-cache, warmed here outside mutmut's forking process.
MUTATION_ENV := BIDDER_TEST_BUNDLE_CACHE=$(CURDIR)/.mutation-cache
mutation: $(FULL)
	rm -rf mutants
	$(MUTATION_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/test_reload.py::test_reload_to_another_bundle_and_catalog
	$(MUTATION_ENV) $(PY) -m mutmut run --max-children $(or $(MUTATION_JOBS),2) > mutants.log 2>&1 || (tail -c 3000 mutants.log; exit 1)
	$(PY) tests/mutation_report.py

bench: $(FULL)
	$(PY) -m pytest -q --benchmark

bench-load: $(FULL) $(DEFAULT_MODEL)
	$(PY) -m bench load

# Rebuilds the committed default bundle in place (train default alone writes runs/default).
default-model: $(FULL)
	$(PY) -m train default --out bidder/models/default

clean:
	rm -rf build bidder/_features.c bidder/_features*.so bidder/_shading.c bidder/_shading*.so bidder/_pricing.c bidder/_pricing*.so train/_attention.c train/_attention*.so train/_rows.c train/_rows*.so train/distributed/_flags.c train/distributed/_flags*.so *.egg-info $(VENV) mutants mutants.log .mutation-cache
