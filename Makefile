# qkv — every target sets up .venv on first use (and again when requirements.txt changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# nbgrader shells out to tools in the venv (alembic), so the venv's bin leads PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help setup book test lab release grade bench lint clean

help:
	@echo "make book                    build the book to _build/html (offline, strict)"
	@echo "make test                    run the test suite"
	@echo "make lab                     open the exercises in JupyterLab"
	@echo "make release                 regenerate exercises/ from solutions/"
	@echo "make grade SUBMISSIONS=dir   autograde dir/<student>/<chapter>/<notebook>.ipynb"
	@echo "make bench [BENCH_ARGS=--quick]  benchmarks: print ratios, write benchmarks/results/*.json"

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --builder html -W -n --keep-going

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: $(STAMP)
	$(BIN)/jupyter lab exercises/

release: $(STAMP)
	$(BIN)/python -m qkv.grading release

grade: $(STAMP)
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=dir  (dir/<student>/<chapter>/<notebook>.ipynb)"; exit 2; }
	$(BIN)/python -m qkv.grading grade "$(SUBMISSIONS)" $(GRADE_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lib tests benchmarks

clean:
	rm -rf _build _grading
