# LexAlign: `make demo` runs the pipeline on the built-in demo, `make test` the test suite.
# Both create .venv and install the project first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lexalign-installed
# On a machine without an NVIDIA GPU, pin torch to the CPU build first: an
# unpinned torch would pull the multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test lint dag clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores 1 results/aligned results/eval/aligned.json

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check lexalign scripts tests
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs .snakemake
