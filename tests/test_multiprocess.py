"""Two real JAX processes (coordinator on 127.0.0.1, CPU collectives through gloo), one CPU
device each, train as one process with two devices does on the same global batches.

The data is a tiny TFDS dataset written to a tmp dir (`tfds.testing.mock_data` ignores
split slicing: every process would read the same examples). Each process reads its half of
the train split (`tfds.split_for_jax_process`), and the global batch is process 0's rows
then process 1's. The one-process reference builds exactly these global batches from the
same per-process streams (`train_batches` with the process index and count of each
process), so both runs see the same data; augmentation is off.
"""

import contextlib
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import vit
from efficient_vit import export, input_pipeline, train
from efficient_vit.metric_logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, NUM_TRAIN, NUM_EVAL = 4, 32, 10

OVERRIDES = {"dataset": "tiny_images", "download": False, "model.embed_dim": 16,
             "model.depth": 1, "model.patch_size": 8, "model.mlp_dim": 16, "batch_size": 8,
             "eval_batch_size": 4, "num_train_steps": STEPS, "optimizer.warmup_steps": 0,
             "log_every_steps": 1, "eval_every_steps": 1000, "checkpoint_every_steps": 1000,
             "input_pipeline": "tfdata", "augment.crop": "none", "augment.flip": False,
             "shuffle_buffer": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """`tiny_images`: 32 train and 10 test random 32x32 images in 10 classes."""
  path = os.fspath(tmp_path_factory.mktemp("tfds"))
  rng = np.random.default_rng(0)

  def split(n):
    return tf.data.Dataset.from_tensor_slices({
        "image": rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
        "label": rng.integers(0, 10, (n,), np.int64)})

  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(32, 32, 3)),
                                         "label": tfds.features.ClassLabel(num_classes=10)})
  tfds.dataset_builders.TfDataBuilder(
      name="tiny_images", version="1.0.0", features=features, data_dir=path,
      split_datasets={"train": split(NUM_TRAIN), "test": split(NUM_EVAL)}).download_and_prepare()
  return path


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _reference_params(data_dir, monkeypatch):
  """One process, two devices, on the global batches the two processes assemble."""
  config = vit.get_config("tiny_cifar10")
  config.update_from_flattened_dict({**OVERRIDES, "data_dir": data_dir})
  assert jax.device_count() == 2 and jax.process_count() == 1
  per_process = []
  for index in range(2):  # The stream that process `index` of 2 reads.
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    stream = input_pipeline.train_batches(config)
    per_process.append([next(stream) for _ in range(STEPS)])
  monkeypatch.undo()
  assert not np.array_equal(per_process[0][0]["image"], per_process[1][0]["image"])
  experiment = train.build(config)
  parallel = experiment.parallel
  state = parallel.put_state(experiment.init_state())
  for first, second in zip(*per_process):
    batch = {k: np.concatenate([first[k], second[k]]) for k in first}
    state, _ = parallel.train_step(state, parallel.put_batch(batch), experiment.rng)
  return jax.device_get(state.params)


def test_two_processes_train_as_one_with_two_devices(data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  port = _free_port()
  args = [sys.executable, "launch.py", "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  # One CPU device per process (not the test process's two fake devices).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  runs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]  # Both start before either blocks on the other.
  try:
    outs = [run.communicate(timeout=400)[0] for run in runs]
  finally:
    for run in runs:
      if run.poll() is None:
        run.kill()
        run.communicate()
  for run, out in zip(runs, outs):
    assert run.returncode == 0, out[-4000:]
  assert "2 cpu devices" in outs[0] and "in 2 process(es)" in outs[0], outs[0][-3000:]
  assert "config:" not in outs[1]  # Process 1 prints nothing of its own.

  # Only process 0 wrote metrics: each step once; eval counted each example once.
  records = read_metrics(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
  evals = [r for r in records if r["split"] == "eval"]
  assert len(evals) == 1 and evals[0]["num_examples"] == NUM_EVAL, evals
  assert len(os.listdir(workdir / "tensorboard")) == 1

  # The checkpoint, written by both processes, holds the reference's parameters.
  params = export.restore_variables(os.fspath(workdir), params="raw")[0]["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params, _reference_params(data_dir, monkeypatch))
