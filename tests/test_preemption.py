"""A run killed with SIGKILL at any moment, one of them in the middle of an asynchronous
checkpoint save, resumes from its last complete checkpoint and ends exactly as a run that
was never interrupted. (SIGTERM's clean stop: tests/test_run_lifecycle.py.)"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from configs import vit
from efficient_vit import export, metric_logging, train
from efficient_vit.metric_logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
OVERRIDES = {"model.embed_dim": 16, "model.depth": 1, "model.patch_size": 8,
             "model.mlp_dim": 16, "batch_size": 8, "num_train_steps": STEPS,
             "optimizer.warmup_steps": 0, "log_every_steps": 1, "eval_every_steps": 1000,
             "checkpoint_every_steps": 2, "keep_checkpoints": 2, "input_pipeline": "tfdata",
             "shuffle_buffer": 64}
_MOCK_EXAMPLES = 24

_LAUNCH = f"""
import sys
import tensorflow_datasets as tfds
from absl import app
sys.argv = ["launch.py"] + sys.argv[1:]
import launch
with tfds.testing.mock_data(num_examples={_MOCK_EXAMPLES}):
  app.run(launch.main)
"""


def _launch(workdir):
  """The same command every time; async checkpointing is the trainer's default."""
  args = [sys.executable, "-c", _LAUNCH, "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _trained_steps(workdir) -> int:
  try:
    return len(read_metrics(workdir))
  except FileNotFoundError:
    return 0


def _wait(run, condition, what: str, timeout: float = 240):
  deadline = time.time() + timeout
  while not condition():
    if run.poll() is not None or time.time() > deadline:
      run.kill()
      raise AssertionError(f"{what}: not reached\n" + run.communicate()[0][-3000:])
    time.sleep(0.002)


def _kill(run):
  run.send_signal(signal.SIGKILL)
  run.communicate()
  assert run.returncode == -signal.SIGKILL


def _saving(checkpoints):
  """The temporary folder of a save in flight, if any."""
  try:
    names = os.listdir(checkpoints)
  except FileNotFoundError:
    return None
  return next((n for n in names if ".orbax-checkpoint-tmp" in n), None)


def test_sigkill_at_any_moment_resumes_as_an_uninterrupted_run(tmp_path):
  seed = random.randrange(1 << 30)
  moment = random.Random(seed).uniform(0.0, 1.5)
  workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
  # 1: killed at a random moment of training.
  run = _launch(workdir)
  _wait(run, lambda: _trained_steps(workdir) >= 1, "training")
  time.sleep(moment)
  _kill(run)
  # 2: relaunched, and killed while an asynchronous save is being written.
  run = _launch(workdir)
  _wait(run, lambda: _saving(checkpoints) is not None, "an asynchronous save")
  _kill(run)
  in_flight = _saving(checkpoints)
  assert in_flight is not None, f"the save finished before the kill (seed {seed})"
  with ocp.CheckpointManager(os.fspath(checkpoints)) as manager:
    complete = manager.all_steps()
    # The incomplete save is not a checkpoint: the next launch resumes from the last one.
    assert int(in_flight.split(".")[0]) not in complete, (in_flight, complete)
    resume_from = manager.latest_step()
  # 3: relaunched, runs to the end.
  run = _launch(workdir)
  out, _ = run.communicate(timeout=300)
  assert run.returncode == 0, out[-3000:]
  if resume_from is not None:
    assert f"resumed from step {resume_from}" in out, out[-3000:]
  assert _saving(checkpoints) is None  # What the kill left half-written is cleaned up.
  train_steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
  assert train_steps == list(range(1, STEPS + 1))

  # The uninterrupted run of the same config, in this process (the same two devices).
  config = vit.get_config("tiny_cifar10")
  config.update_from_flattened_dict(OVERRIDES)
  with tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES):
    train.train_and_evaluate(config, tmp_path / "uninterrupted")
  expected = export.restore_variables(os.fspath(tmp_path / "uninterrupted"), params="raw")
  got = export.restore_variables(os.fspath(workdir), params="raw")
  assert got[1]["step"] == expected[1]["step"] == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got[0]["params"], expected[0]["params"])


def test_a_line_cut_off_by_a_kill_is_dropped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n'
                                          '{"step": 2, "split": "train", "loss": 1.')
  assert read_metrics(tmp_path) == [{"step": 1, "split": "train", "loss": 2.0}]
  assert metric_logging.drop_after(tmp_path, 5) == 0
  assert (tmp_path / "metrics.jsonl").read_text() == (
      '{"step": 1, "split": "train", "loss": 2.0}\n')
