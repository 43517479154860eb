# Set-up and main commands. `make quickstart` and `make test` both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# test files spread over this many processes (pytest-xdist; one torch thread each): 2 for the 2-core CI machine
TEST_WORKERS ?= 2

.PHONY: install quickstart test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first, so that no CUDA build is pulled by a dependency
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/sbida quickstart

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check sbida tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/simulators.py

clean:
	rm -rf $(VENV) build *.egg-info
