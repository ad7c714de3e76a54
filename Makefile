# Two commands on a fresh machine: `make demo` (the whole pipeline on built-in demo data) and
# `make test`. Both install what is missing first (`make setup`: a venv in .venv, pinned by
# constraints.txt, plus detectron2 via scripts/install_detectron2.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt scripts/install_detectron2.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) scripts/install_detectron2.py
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) tools/demo.py

test: setup lint
	$(PY) -m pytest -q tests

# The tests that train nothing (no `slow` marker): under two minutes, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) datasets/demo results/demo
