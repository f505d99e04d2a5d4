# Every target that runs code depends on .venv, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8080
WORKERS ?= 1
NOW    ?=

.PHONY: all test serve bench bench-load default-model clean

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
	$(PY) -m bidder serve --host $(HOST) --port $(PORT) --workers $(WORKERS) $(if $(NOW),--now $(NOW))

bench: $(VENV)
	$(PY) -m pytest -q --benchmark

bench-load: $(VENV) $(DEFAULT_MODEL)
	$(PY) -m bench load

default-model: $(VENV)
	$(PY) -m train default

clean:
	rm -rf build bidder/_features.c bidder/_features*.so *.egg-info $(VENV)
