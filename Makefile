# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing,
# install the CPU build of torch first (a plain `torch` requirement would pull a CUDA build),
# then the project in editable mode with all its extras (chemistry, flows, plots), test and examples.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[all,test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mcsample demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2

# ruff's checks and formatting (configured in pyproject.toml); changes nothing
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/resampling.py
	$(PY) benchmarks/energy.py

# The documentation site, docs/_build/html, built from scratch with warnings as errors. `docs`
# also runs the gallery scripts (docs/gallery; unchanged ones are not rerun); `docs-fast` shows
# them without running them.
DOCS_STAMP := $(VENV)/.installed-docs
SPHINX := $(PY) -m sphinx -W --keep-going -E -b html -d docs/_build/doctrees

.PHONY: docs docs-fast

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(SPHINX) docs docs/_build/html

docs-fast: $(DOCS_STAMP)
	$(SPHINX) -D plot_gallery=0 docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info
