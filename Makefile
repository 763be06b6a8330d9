# Two entry points: `make run` (the main job) and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# glibc's heap on transparent huge pages: XLA's per-step scratch is not faulted back in page by page every step
# (dsv3_jax/host.py). Read by glibc when a process starts, so it is set here, for every command below.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# `make run` and the benchmarks also keep large freed blocks mapped for the next step instead of having the kernel
# zero them again (dsv3_jax/keep_freed.py): the library is built on first use, and left out (with a message) if it
# cannot be.
KEEP_FREED = LD_PRELOAD="$$($(PY) -m dsv3_jax.keep_freed)"

.PHONY: run test lint bench bench-moe param-count compare-torch plot plan multihost-cpu clean gpu-compile-check

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(KEEP_FREED) $(PY) -m experiments.train --config=configs/small_cpu.py --workdir=workdir/small_cpu

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Ours against transformers (eager, torch.compile), MFU, cost growth, MoE and decode: docs/bench.json and the
# generated section of docs/BENCHMARKS.md. About 5-6 minutes on a 2-core CPU; BENCH_FLAGS=--quick for a smoke run.
bench: $(VENV)/.installed
	$(KEEP_FREED) $(PY) -m experiments.bench $(BENCH_FLAGS)

bench-moe: $(VENV)/.installed
	$(KEEP_FREED) $(PY) -m experiments.bench_moe

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
	$(GPU_VENV)/bin/python -m experiments.gpu_compile_check $(GPU_CHECK_FLAGS)

# Per-device memory of the 671B model on DeepSeek-V3's mesh (PP16 x EP64 x DP2, ZeRO-1), from shapes only.
plan: $(VENV)/.installed
	$(PY) -m experiments.plan --config=configs/deepseek_v3_671b.py --config.mesh.pipe=16 --config.mesh.expert=64

# Two processes x 4 CPU devices on this machine (gloo collectives), training the tiny model on data=2 x expert=4.
multihost-cpu: $(VENV)/.installed
	rm -rf workdir/multihost_cpu && mkdir -p workdir
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m experiments.train --config=configs/tiny_cpu.py \
	  --workdir=workdir/multihost_cpu --config.mesh.data=2 --config.mesh.expert=4 --config.train.steps=20 \
	  --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=1 > workdir/multihost_cpu.1.log 2>&1 & \
	  XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m experiments.train --config=configs/tiny_cpu.py \
	  --workdir=workdir/multihost_cpu --config.mesh.data=2 --config.mesh.expert=4 --config.train.steps=20 \
	  --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0; \
	  status=$$?; wait $$! || status=1; exit $$status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
