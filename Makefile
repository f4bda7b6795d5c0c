# The README's commands. Each target bootstraps .venv on its own first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv build run serve test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## build: generate/train/index whatever is missing for IMGSEARCH_DATA and IMGSEARCH_PRESET
build: venv
	$(BIN)/imgsearch build

serve: venv
	$(BIN)/imgsearch serve

## run: build what is missing, then serve on IMGSEARCH_HOST:IMGSEARCH_PORT
run: build serve

## test: the whole test suite
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## bench: latency of the default preset on the London data (writes bench/results.json, BENCHMARKS.md)
LONDON ?= ../shared/datasets/london
bench: venv
	IMGSEARCH_DATA=$(LONDON) $(BIN)/imgsearch build
	$(BIN)/python bench/run.py --data $(LONDON)

clean:
	rm -rf $(VENV) artifacts
