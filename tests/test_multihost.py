"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo collectives) against 1 x 8.

Each run is `experiments.train` as a user starts it, so this covers jax.distributed start-up, the hybrid
mesh, per-host batch rows, process-0-only metrics, and orbax checkpoints written by one process count
and restored by the other.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from dsv3_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150  # per run; a hung collective fails the test instead of the suite
MESH = ["--config.mesh.data=2", "--config.mesh.expert=4"]


def _flags(workdir, source, steps):
  return [
      "--config=configs/tiny_cpu.py", f"--workdir={workdir}", f"--config.data.source={source}",
      f"--config.train.steps={steps}", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
      "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.keep_checkpoints=3",
      "--config.train.plot=False",
      "--config.data.seq_len=16", "--config.data.heldout_fraction=0.2", "--config.sample.max_new_tokens=0",
      "--config.optimizer.warmup_steps=0", *MESH,
  ]


def _env(devices: int, cache_dir) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  # The last run compiles the same programs as the first: reuse them (process 0's cache; saves ~25 s).
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(n_processes: int, workdir, source, steps) -> list[str]:
  """Runs experiments.train as n_processes processes sharing 8 CPU devices; returns each one's stdout."""
  base = [sys.executable, "-m", "experiments.train", *_flags(workdir, source, steps)]
  if n_processes == 1:
    commands = [base]
  else:
    coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
    commands = [[*base, coordinator, f"--num_processes={n_processes}", f"--process_id={i}"]
                for i in range(n_processes)]
  env = _env(8 // n_processes, os.path.join(os.path.dirname(workdir), "jax_cache"))
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate() for p in procs]
    pytest.fail(f"{n_processes}-process run timed out after {TIMEOUT_S} s:\n" + _tails(outs))
  if any(p.returncode for p in procs):
    pytest.fail(f"{n_processes}-process run failed (exit codes {[p.returncode for p in procs]}):\n" + _tails(outs))
  return [out for out, _ in outs]


def _tails(outs) -> str:
  return "\n".join(f"--- process {i} stderr (tail):\n{err[-2500:]}" for i, (_, err) in enumerate(outs))


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A small corpus: 120 JSONL documents of pseudo-random words (no stdlib walk, fast to load)."""
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "x", "=", "+", "(", ")", ":", "import", "for", "in", "if", "\n"]
  path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
  with open(path, "w") as f:
    for _ in range(120):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n")
  return str(path)


def _rewind(src, dst, step: int) -> None:
  """A copy of workdir src whose latest checkpoint is `step` (the later ones deleted)."""
  shutil.copytree(src, dst)
  checkpoints = dst / "checkpoints"
  for name in os.listdir(checkpoints):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(checkpoints / name)


def test_two_processes_match_one_and_checkpoints_cross_process_counts(tmp_path, source):
  """1 process x 8 devices trains 8 steps (checkpoints at 3, 6, 8). 2 processes x 4 devices resume its step-3
  checkpoint and train steps 4-6; 1 process resumes their step-6 checkpoint and trains steps 7-8. Every loss
  equals the uninterrupted single-process run's."""
  one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
  _train(1, one, source, steps=8)
  want = _losses(one)
  assert sorted(want) == list(range(1, 9))

  _rewind(one, two, 3)
  outs = _train(2, two, source, steps=6)  # written by 1 process, restored by 2 with 4 devices each
  got = _losses(two)
  assert sorted(got) == list(range(1, 7)), "steps logged twice or missing: only process 0 may write metrics"
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-5)
  assert "held-out loss" in outs[0] and "held-out loss" not in outs[1]  # process 0 reports, process 1 stays quiet
  assert not any(line.startswith("step ") for line in outs[1].splitlines())

  _rewind(two, back, 6)
  _train(1, back, source, steps=8)  # written by 2 processes, restored by 1 with 8 devices
  got = _losses(back)
  np.testing.assert_allclose([got[s] for s in (7, 8)], [want[s] for s in (7, 8)], rtol=1e-5)
  assert want[8] != want[6]  # training moved the loss: equal losses are not equal constants


def test_distributed_settings_are_checked_before_joining(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.initialize("off")
  assert not distributed.initialize("auto")  # no flags, no coordinator variable, no multi-process job
  with pytest.raises(ValueError, match="contradicts"):
    distributed.initialize("off", coordinator_address="127.0.0.1:1")
  with pytest.raises(ValueError, match="give num_processes and process_id too"):
    distributed.initialize("auto", coordinator_address="127.0.0.1:1")
  with pytest.raises(ValueError, match="process_id 2 is outside"):
    distributed.initialize("on", coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="not one of"):
    distributed.initialize("maybe")
  assert distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"})
  assert not distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
  assert distributed.cluster_detected({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"})
  assert not distributed.cluster_detected({})
