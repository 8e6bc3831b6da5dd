# `make demo` and `make test` set everything up themselves: a virtual environment in .venv with the
# CPU build of PyTorch (on a GPU machine, install torch yourself first and set VENV to that environment).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo serve test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) -m ditkit demo

# the demo models of results/ on a local web page (http://127.0.0.1:7860); `make demo` first
serve: setup
	$(PY) -m ditkit serve

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
