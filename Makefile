# LexAlign: `make demo` runs the pipeline on the built-in demo, `make test` the test suite.
# Both create .venv and install the project first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lexalign-installed
# On a machine without an NVIDIA GPU, pin torch to the CPU build first: an
# unpinned torch would pull the multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup system-deps demo test lint dag report clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,tracking,eval,ifeval]"
	touch $@

# Graphviz (DAG pictures) and Chromium (the report test): installed when
# missing and this is a Debian/Ubuntu machine where we are root; elsewhere the
# tests that need them are skipped with the reason. See README.
system-deps:
	@if ! command -v dot >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      graphviz chromium fonts-dejavu-core >/dev/null; \
	  else echo "Graphviz/Chromium missing: see README (Development)"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/snakemake --cores 1 results/aligned results/eval/aligned.json

report: $(STAMP)
	$(BIN)/snakemake --cores 1 results/report.html
	$(BIN)/snakemake --report results/snakemake-report.html

dag: $(STAMP)
	mkdir -p results
	$(BIN)/snakemake --dag 2>/dev/null | dot -Tsvg > results/dag.svg
	$(BIN)/snakemake --rulegraph 2>/dev/null | dot -Tsvg > results/rulegraph.svg

# Two workers (pytest-xdist): the suite's long units (a SLURM cluster, a wheel in a fresh venv, the shared demo
# run) wait on subprocesses much of the time, so two of them share this machine's cores well. Each worker takes
# whole groups (tests/conftest.py: worker_group), so each expensive fixture is built once.
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(BIN)/ruff check lexalign scripts tests benchmarks testkit setup.py
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=25

lint: $(STAMP)
	$(BIN)/ruff check lexalign scripts tests benchmarks testkit setup.py
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs .snakemake
