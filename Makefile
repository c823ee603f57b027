# boltzbench — the two set-up commands of the README are `make smoke` (main job) and `make test` (tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GRID   ?= smoke
RESULTS ?= results/runs

.PHONY: setup smoke run test test-slow tables timing bench bench-compare references slurm-up slurm-down lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# exact pin first: an unpinned torch pulls several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# main job on the embedded default: local executor, the smoke grid, then the tables
smoke: setup
	$(PY) -m harness.run --grid smoke --executor local --results $(RESULTS)
	$(PY) -m harness.tables --results $(RESULTS) --grid smoke

run: setup
	$(PY) -m harness.run --grid $(GRID) --results $(RESULTS)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

tables: setup
	$(PY) -m harness.tables --results $(RESULTS)

timing: setup
	$(PY) -m harness.timing --results $(RESULTS)

# micro-benchmarks; then the in-run ratios (our EGNN vs the edge-list EGNN) and the peak memory of each
# paper-setting training step (docs/timing.md)
bench: setup
	$(PY) -m pytest -q -m bench --benchmark-enable --benchmark-json=results/bench.json tests/bench
	$(PY) scripts/bench_compare.py results/bench.json --extra

# generated references go to data/generated with a manifest (fixed seeds: re-running regenerates them).
# dw4 is only needed where the published DW-4 splits are absent; lj55 takes a few hours of one CPU core.
# ratios of the last `make bench` against the stored baseline (results/bench_baseline.json)
bench-compare: setup
	$(PY) scripts/bench_compare.py

references: setup
	$(PY) -m targets.reference --target dw4 --n 10000
	$(PY) -m targets.reference --target lj13 --n 10000
	$(PY) -m targets.reference --target lj55 --n 10000

slurm-up:
	bash scripts/slurm_up.sh

slurm-down:
	bash scripts/slurm_down.sh

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
