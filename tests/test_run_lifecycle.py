"""What a run does across its lifetime: a SIGTERM saves and exits cleanly, and a resumed
run keeps the input pipeline it started with."""

import json
import os
import re
import signal
import subprocess
import sys
import time

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


def _launch(workdir, steps):
  args = [sys.executable, "-c", _LAUNCH, "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={workdir}", "--config.model.embed_dim=16", "--config.model.depth=1",
          "--config.model.patch_size=8", "--config.model.mlp_dim=16", "--config.batch_size=8",
          f"--config.num_train_steps={steps}", "--config.optimizer.warmup_steps=0",
          "--config.log_every_steps=1", "--config.eval_every_steps=1000000",
          "--config.checkpoint_every_steps=1000000", "--config.input_pipeline=tfdata"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
  run = _launch(tmp_path, 1_000_000)
  deadline = time.time() + 240
  while time.time() < deadline and run.poll() is None:  # Wait until it is training.
    if os.path.exists(tmp_path / "metrics.jsonl") and read_metrics(tmp_path):
      break
    time.sleep(0.5)
  assert run.poll() is None, run.stdout.read()[-3000:]
  run.send_signal(signal.SIGTERM)
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 0, out[-3000:]
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
