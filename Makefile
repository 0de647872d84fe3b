# Two commands on a fresh clone:  `make demo`  (set up, generate an image)   `make test`  (set up, run the tests)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a red circle on a blue background

.PHONY: setup demo test clean

$(BIN)/sdlab: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test,hub]'
	touch $@

setup: $(BIN)/sdlab

demo: setup
	$(BIN)/sdlab generate "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
