# Two entry points: `make run` (the main job) and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench-moe param-count compare-torch plot clean gpu-compile-check

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

# XLA's GPU compiler from JAX's CUDA plugin, in its own environment beside the repository (no GPU needed).
GPU_VENV ?= ../gpuvenv

$(GPU_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet -e . jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 pytest==9.2.0
	touch $@

gpu-compile-check: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python -m experiments.gpu_compile_check

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
