"""Kill-and-resume: a run SIGKILLed at arbitrary moments and restarted logs the same losses, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dsv3_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
FLAGS = [
    "--config=configs/tiny_cpu.py", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
    "--config.train.checkpoint_every=3", "--config.train.eval_every=0", "--config.train.plot=False",
    "--config.data.max_bytes=300000", "--config.sample.max_new_tokens=2", "--config.sample.prompts=('x',)",
]


def _command(workdir):
  return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *FLAGS]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the host split per core (--cpu_devices=auto), as a user's run
  return env


def _losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        assert record["step"] not in out, f"step {record['step']} logged twice"
        out[record["step"]] = record["loss"]
  return out


def _logged_steps(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return sum(1 for line in f if line.endswith("\n"))
  except FileNotFoundError:
    return 0


def _run_and_kill(workdir, after_steps: int) -> None:
  """Starts training and SIGKILLs it once `after_steps` more steps have been logged."""
  before = _logged_steps(workdir)
  proc = subprocess.Popen(_command(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while _logged_steps(workdir) < before + after_steps:
    assert proc.poll() is None, "training ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  subprocess.run(_command(straight), cwd=ROOT, env=_env(), check=True, capture_output=True)
  _run_and_kill(interrupted, after_steps=7)  # between or during the step-6 checkpoint's write
  _run_and_kill(interrupted, after_steps=5)  # resumed, then killed again
  done = subprocess.run(_command(interrupted), cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step" in done.stderr
  want, got = _losses(straight), _losses(interrupted)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert got == want  # bit-for-bit: floats round-trip exactly through JSON


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpoints(str(tmp_path), every=1, keep=3)
  state = {"w": jax.numpy.arange(4.0)}
  assert ckpt.save(1, state, {"tokens_seen": 1})
  ckpt.wait()

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(ckpt.manager, "save", broken)
  assert not ckpt.save(2, {"w": jax.numpy.zeros(4)}, {"tokens_seen": 2})
  assert ckpt.latest_step() == 1
  restored, host = ckpt.restore(1, checkpoint.abstract(state))
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  assert host == {"tokens_seen": 1}
  ckpt.close()


@pytest.mark.parametrize("flag, key", [("--config.train.steps=-5", "config.train.steps = -5"),
                                       ("--config.train.no_such_key=1", "no_such_key")])
def test_bad_config_fails_before_compiling(tmp_path, flag, key):
  out = subprocess.run([*_command(tmp_path / "w"), flag], cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert out.returncode != 0
  assert key in out.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()
