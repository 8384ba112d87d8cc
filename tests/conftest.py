"""Test setup: two fake CPU devices for every test, so that data-parallel code paths run
with a real `data` axis (the flag must be set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture
def tiny_vit_config():
  """A ViT config small enough for a CPU test: 16 tokens of width 32, one block."""
  from configs import vit

  config = vit.get_config("tiny_cifar10")
  config.model.update(patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)
  config.update(batch_size=8, eval_batch_size=6, log_every_steps=1, checkpoint_every_steps=3,
                num_train_steps=6, eval_every_steps=1000, shuffle_buffer=64)
  config.optimizer.update(warmup_steps=0, schedule="constant", learning_rate=1e-3)
  return config


@pytest.fixture
def run_steps():
  """The trainer's own assembly run on host batches: `run(config, info, batches)` gives the
  state after them (global arrays, as checkpoints hold it) and each step's loss."""
  from efficient_vit import train

  def run(config, info, batches):
    experiment = train.build(config, info)
    parallel = experiment.parallel
    state = parallel.put_state(experiment.init_state())
    losses = []
    for batch in batches:
      state, metrics = parallel.train_step(state, parallel.put_batch(batch), experiment.rng)
      losses.append(float(parallel.first(metrics)["loss"]))
    return parallel.get_state(state), losses

  return run
