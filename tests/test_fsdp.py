"""`parallelism: fsdp` (the state sharded over the `data` axis under plain `jit`) trains as
the replicated runners do, and checkpoints resume on another layout: fsdp <-> replicated
and 2 devices -> 1 device, with the same parameters."""

import os
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from efficient_vit import export, input_pipeline, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = input_pipeline.DatasetInfo(num_classes=10, num_train_examples=64, num_eval_examples=8)


@pytest.fixture
def config(tiny_vit_config):
  # mlp_dim 128: the MLP kernels [32, 128] are large enough (4,096 elements) to be sharded.
  tiny_vit_config.model.update(mlp_dim=128)
  tiny_vit_config.augment.update(crop="none", flip=False)
  tiny_vit_config.update(input_pipeline="tfdata", checkpoint_every_steps=2, keep_checkpoints=5)
  return tiny_vit_config


def test_fsdp_trains_as_replicated_and_shards_the_state(config, run_steps):
  assert jax.device_count() == 2
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
              "label": rng.integers(0, 10, (8,), np.int32)} for _ in range(3)]
  replicated, replicated_losses = run_steps(config, INFO, batches)
  config.parallelism = "fsdp"
  sharded, sharded_losses = run_steps(config, INFO, batches)
  np.testing.assert_allclose(sharded_losses, replicated_losses, rtol=1e-5)
  assert sharded_losses[0] != sharded_losses[-1]  # It learns: the steps did something.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(sharded.params), jax.device_get(replicated.params))

  kernel, = [x for x in jax.tree.leaves(sharded.params) if x.shape == (32, 128)]
  # Each device holds its half of the kernel (on its largest axis), and of Adam's moments.
  assert [s.data.shape for s in kernel.addressable_shards] == [(32, 64), (32, 64)]
  moments = [x for x in jax.tree.leaves(sharded.opt_state) if x.shape == (32, 128)]
  assert moments and all(s.data.shape == (32, 64) for m in moments
                         for s in m.addressable_shards)
  # Small leaves (biases, norms, the step) stay replicated.
  assert sharded.step.sharding.is_fully_replicated
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(replicated.params))


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert train.fsdp_spec((32, 128), 2) == jax.sharding.PartitionSpec(None, "data")
  assert train.fsdp_spec((129, 64), 2) == jax.sharding.PartitionSpec(None, "data")
  assert train.fsdp_spec((4096,), 2) == jax.sharding.PartitionSpec("data")
  assert train.fsdp_spec((64, 65), 3) == jax.sharding.PartitionSpec()  # None divisible.
  assert train.fsdp_spec((8,), 2) == jax.sharding.PartitionSpec()  # Small: replicated.
  assert train.fsdp_spec((64, 64), 1) == jax.sharding.PartitionSpec()


def _params(workdir, step):
  return export.restore_variables(os.fspath(workdir), params="raw", step=step)[0]["params"]


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)


_RESUME_ON_ONE_DEVICE = """
import pickle
import sys
import jax
import tensorflow_datasets as tfds
from efficient_vit import train
assert jax.device_count() == 1, jax.devices()
with open(sys.argv[2], "rb") as f:
  config = pickle.load(f)
with tfds.testing.mock_data(num_examples=16):
  train.train_and_evaluate(config, sys.argv[1])
"""


def test_checkpoints_resume_on_another_layout(config, tmp_path):
  """shard_map on 2 devices for 6 steps is the reference. Another run does steps 1-2
  under fsdp, 3-4 replicated, 5-6 under fsdp again; a third resumes the reference's step-2
  checkpoint on 1 device (a subprocess) for steps 3-6. All end with the same parameters."""
  reference, switching = tmp_path / "reference", tmp_path / "switching"
  with tfds.testing.mock_data(num_examples=16):
    config.update(num_train_steps=6, parallelism="shard_map")
    train.train_and_evaluate(config, reference)
    for steps, parallelism in ((2, "fsdp"), (4, "shard_map"), (6, "fsdp")):
      config.update(num_train_steps=steps, parallelism=parallelism)
      train.train_and_evaluate(config, switching)
  for step in (2, 4, 6):
    _assert_same(_params(switching, step), _params(reference, step))

  one_device = tmp_path / "one_device"
  shutil.copytree(reference, one_device)
  for step in (4, 6):  # Keep the step-2 checkpoint only: the run resumes from it.
    shutil.rmtree(one_device / "checkpoints" / str(step))
  config.parallelism = "shard_map"
  (tmp_path / "config.pickle").write_bytes(pickle.dumps(config))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  run = subprocess.run([sys.executable, "-c", _RESUME_ON_ONE_DEVICE, os.fspath(one_device),
                        os.fspath(tmp_path / "config.pickle")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  assert "resumed from step 2" in run.stdout, run.stdout[-2000:]
  _assert_same(_params(one_device, 6), _params(reference, 6))
