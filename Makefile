# Every target that runs code depends on .venv, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8080
WORKERS ?= 1

.PHONY: all test serve bench bench-load default-model mutation clean

all: test

# Create the virtual environment, install bidder with the train and dev extras, build the extension.
$(VENV): $(VENV)/.installed $(VENV)/.extension

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=69" wheel "Cython>=3.0" "numpy>=1.26"
	$(PIP) install -q --no-build-isolation -e '.[train,dev]'
	touch $@

$(VENV)/.extension: bidder/_features.pyx $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: $(VENV)
	$(PY) -m pytest -q $(PYTEST_ARGS)

DEFAULT_MODEL := bidder/models/default/model.onnx

# The default bundle is committed; if it is ever missing, serving trains it first (minutes, on synthetic data).
$(DEFAULT_MODEL): | $(VENV)
	$(PY) -m train default

serve: $(VENV) $(DEFAULT_MODEL)
	$(PY) -m bidder serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Mutation testing of the bid path's business logic (minutes; not part of `make test`). Bundles trained by
# the test fixtures are cached in .mutation-cache, warmed here outside mutmut's forking process.
MUTATION_ENV := BIDDER_TEST_BUNDLE_CACHE=$(CURDIR)/.mutation-cache
mutation: $(VENV)
	rm -rf mutants
	$(MUTATION_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/test_reload.py::test_reload_to_another_bundle_and_catalog
	$(MUTATION_ENV) $(PY) -m mutmut run --max-children $(or $(MUTATION_JOBS),2) > mutants.log 2>&1 || (tail -c 3000 mutants.log; exit 1)
	$(PY) tests/mutation_report.py

bench: $(VENV)
	$(PY) -m pytest -q --benchmark

bench-load: $(VENV) $(DEFAULT_MODEL)
	$(PY) -m bench load

default-model: $(VENV)
	$(PY) -m train default

clean:
	rm -rf build bidder/_features.c bidder/_features*.so *.egg-info $(VENV) mutants mutants.log .mutation-cache
