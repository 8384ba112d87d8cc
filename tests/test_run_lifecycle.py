"""What a run does across its lifetime: a SIGTERM saves and exits with status 143 naming the
step (before the first step: nothing saved), a resumed run keeps the input pipeline it
started with, one run per workdir, and a full disk stops the run at the save that failed."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from efficient_vit import train
from efficient_vit.metric_logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LAUNCH = """
import sys
import tensorflow_datasets as tfds
from absl import app
sys.argv = ["launch.py"] + sys.argv[1:]
import launch
with tfds.testing.mock_data(num_examples=24):
  app.run(launch.main)
"""


def _launch(workdir, steps, checkpoint_every=1_000_000):
  args = [sys.executable, "-c", _LAUNCH, "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={workdir}", "--config.model.embed_dim=16", "--config.model.depth=1",
          "--config.model.patch_size=8", "--config.model.mlp_dim=16", "--config.batch_size=8",
          f"--config.num_train_steps={steps}", "--config.optimizer.warmup_steps=0",
          "--config.log_every_steps=1", "--config.eval_every_steps=1000000",
          f"--config.checkpoint_every_steps={checkpoint_every}", "--config.input_pipeline=tfdata"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_sigterm_finishes_the_step_saves_and_exits_with_143(tmp_path):
  run = _launch(tmp_path, 1_000_000)
  deadline = time.time() + 240
  while time.time() < deadline and run.poll() is None:  # Wait until it is training.
    if os.path.exists(tmp_path / "metrics.jsonl") and read_metrics(tmp_path):
      break
    time.sleep(0.5)
  assert run.poll() is None, run.stdout.read()[-3000:]
  run.send_signal(signal.SIGTERM)
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 143, out[-3000:]  # Not 0: a scheduler tells it from a finished run.
  stopped = re.findall(r"SIGTERM: saved step (\d+) of 1000000 and stopped", out)
  assert len(stopped) == 1, out[-3000:]
  step = int(stopped[0])
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.fspath(tmp_path / "checkpoints")) as manager:
    assert manager.all_steps() == [step]
  assert max(r["step"] for r in read_metrics(tmp_path)) == step
  # The same command (here: two more steps) resumes from it.
  run = _launch(tmp_path, step + 2)
  out, _ = run.communicate(timeout=240)
  assert run.returncode == 0 and f"resumed from step {step}" in out, out[-3000:]


def test_two_launches_on_one_workdir(tmp_path):
  """The second launch is refused while the first trains (exit 75, one line naming it, its
  files untouched); after a SIGKILL of the first the next launch takes over and resumes."""
  import socket

  from efficient_vit import run_lock
  first = _launch(tmp_path, 1_000_000, checkpoint_every=2)
  deadline = time.time() + 240
  while time.time() < deadline and first.poll() is None and not (
      os.path.exists(tmp_path / "checkpoints" / "2")):
    time.sleep(0.2)
  assert first.poll() is None, first.communicate()[0][-3000:]
  second = _launch(tmp_path, 4)
  out, _ = second.communicate(timeout=240)
  lines = [line for line in out.splitlines() if line.startswith("error:")]
  assert second.returncode == 75 and len(lines) == 1, out[-3000:]
  assert "Traceback" not in out
  assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in lines[0]
  assert first.poll() is None  # The first run went on training.
  first.send_signal(signal.SIGKILL)
  first.communicate()
  trained = max(r["step"] for r in read_metrics(tmp_path))
  third = _launch(tmp_path, trained + 2, checkpoint_every=2)
  out, _ = third.communicate(timeout=240)
  assert third.returncode == 0, out[-3000:]
  assert "resumed from step" in out
  assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_resumed_run_keeps_its_input_pipeline(tiny_vit_config, tmp_path, capsys):
  tiny_vit_config.update(num_train_steps=2, input_pipeline="tfdata")
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
    # `auto` would pick the device-resident path on this machine; the run keeps tf.data.
    tiny_vit_config.update(num_train_steps=3, input_pipeline="auto")
    train.train_and_evaluate(tiny_vit_config, tmp_path)
    assert "input pipeline tfdata" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["input_pipeline"] == "tfdata"
    before = read_metrics(tmp_path)
    tiny_vit_config.update(num_train_steps=4, input_pipeline="device")
    with pytest.raises(ValueError, match="config.input_pipeline='device', but the run being "
                       "resumed was trained with 'tfdata'"):
      train.train_and_evaluate(tiny_vit_config, tmp_path)
  assert read_metrics(tmp_path) == before


def test_sigterm_while_the_first_step_compiles_stops_before_it(tiny_vit_config, tmp_path,
                                                               monkeypatch):
  """The signal arrives while the first call of the train step is compiling (Python runs
  the handler when that call returns): the step's result is not taken, nothing is saved
  and the run says so."""
  real = train.data_parallel

  def data_parallel(*args, **kwargs):
    parallel = real(*args, **kwargs)
    step = parallel.train_step

    def sigterm_then_step(*step_args):
      os.kill(os.getpid(), signal.SIGTERM)
      return step(*step_args)

    parallel.train_step = sigterm_then_step
    return parallel

  monkeypatch.setattr(train, "data_parallel", data_parallel)
  tiny_vit_config.update(num_train_steps=4, checkpoint_every_steps=1)
  with tfds.testing.mock_data(num_examples=16):
    with pytest.raises(train.Preempted, match="SIGTERM before the first step") as stopped:
      train.train_and_evaluate(tiny_vit_config, tmp_path)
  assert stopped.value.step is None
  assert not os.listdir(tmp_path / "checkpoints")
  assert read_metrics(tmp_path) == []
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is given back.


@contextlib.contextmanager
def _small_disk(path, size: str):
  """A tmpfs of `size` mounted at `path` (root only)."""
  path.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", os.fspath(path)],
                 check=True)
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", os.fspath(path)], check=False)


def _can_mount() -> bool:
  return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount(), reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("precheck", [True, False], ids=["free_space_check", "enospc"])
def test_a_full_disk_stops_the_run_at_the_failing_save(tiny_vit_config, tmp_path, monkeypatch,
                                                        precheck):
  """Room for a few checkpoints of this model: the save that does not fit fails, the run
  stops with one line naming the folder, the step and the bytes needed, and the
  checkpoints before it restore. Without the free-space check the write itself fails
  (ENOSPC in Orbax's background thread; it surfaces at the next save or the end of the
  run) and is reported the same way, naming the step whose save failed."""
  import orbax.checkpoint as ocp

  from efficient_vit import export, validation
  if not precheck:
    monkeypatch.setattr(train, "_check_free_space", lambda *args: None)
  tiny_vit_config.update(num_train_steps=10, checkpoint_every_steps=2, keep_checkpoints=5)
  tiny_vit_config.model.update(embed_dim=64, mlp_dim=128)  # About 0.4 MB a checkpoint.
  try:
    with _small_disk(tmp_path / "disk", "1200k") as disk:
      workdir = disk / "run"
      with tfds.testing.mock_data(num_examples=16):
        with pytest.raises(train.CheckpointSaveError) as error:
          train.train_and_evaluate(tiny_vit_config, workdir)
      line = validation.one_line(error.value)
      assert "\n" not in line and os.fspath(workdir / "checkpoints") in line, line
      failed = re.search(r"the checkpoint of step (\d+) .*needs about [\d,]+ bytes", line)
      assert failed and int(failed[1]) >= 4, line
      failed = int(failed[1])
      with ocp.CheckpointManager(os.fspath(workdir / "checkpoints")) as manager:
        assert manager.all_steps() == list(range(2, failed, 2))
      variables, run = export.restore_variables(os.fspath(workdir), params="raw")
      assert run["step"] == failed - 2
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
      assert not (workdir / "run.lock").exists()
  except subprocess.CalledProcessError:
    pytest.skip("this machine refuses to mount a tmpfs")
