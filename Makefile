# Two entry points: `make run` (the main job) and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench-moe param-count compare-torch plot clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m experiments.train --config=configs/small_cpu.py --workdir=workdir/small_cpu

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench-moe: $(VENV)/.installed
	$(PY) -m experiments.bench_moe

param-count: $(VENV)/.installed
	$(PY) -m experiments.param_count --preset=deepseek_v3_671b

compare-torch: $(VENV)/.installed
	$(PY) -m experiments.compare_torch --tiny

plot: $(VENV)/.installed
	$(PY) -m experiments.plot --workdir=workdir/small_cpu

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
