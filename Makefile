# Two commands on a fresh clone:  `make demo`  (set up, run the main job)   `make test`  (set up, run the tests)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/sdlab: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test,hub,server]'
	touch $@

setup: $(BIN)/sdlab

demo: setup
	$(BIN)/sdlab generate "a red circle on a blue background" --seed 0 --out outputs/demo.png

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
