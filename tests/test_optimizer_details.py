"""Optimiser details of the recipes: schedules with a start rate, a floor and a cooldown;
gradient accumulation; bfloat16 activations over float32 parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_vit import input_pipeline, optim, train

INFO = input_pipeline.DatasetInfo(num_classes=10, num_train_examples=80, num_eval_examples=0)


def test_warmup_start_floor_and_cooldown():
  from configs import common
  opt = common.base_config().optimizer
  opt.update(learning_rate=1.0, warmup_steps=10, warmup_start_learning_rate=0.1,
             min_learning_rate=0.01, cooldown_epochs=2.0, schedule="cosine")
  lr = optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=130)
  assert float(lr(0)) == pytest.approx(0.1)  # The warmup starts at its own rate...
  assert float(lr(5)) == pytest.approx(0.55)  # ...rises linearly...
  assert float(lr(10)) == pytest.approx(1.0)  # ...to the peak.
  # The cosine spans 130 - 10 warmup - 20 cooldown = 100 steps, from 1.0 to the floor 0.01.
  assert float(lr(60)) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-4)
  assert float(lr(110)) == pytest.approx(0.01, rel=1e-4)
  assert [float(lr(s)) for s in (111, 125, 129)] == pytest.approx([0.01] * 3)
  opt.min_learning_rate = 2.0
  with pytest.raises(ValueError, match=r"optimizer.min_learning_rate=2.0; allowed: from 0 to "
                     r"optimizer.learning_rate=1.0"):
    optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=130)


def _batches(n, size, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(size, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, size).astype(np.int32)} for _ in range(n)]


def test_accumulated_micro_batches_give_the_update_of_one_large_batch(tiny_vit_config, run_steps):
  # Adam over 2 steps: the second update depends on the first's moments too.
  tiny_vit_config.update(batch_size=16)
  batches = _batches(2, 16)
  whole, whole_losses = run_steps(tiny_vit_config, INFO, batches)
  tiny_vit_config.optimizer.grad_accum_steps = 4  # 4 micro-batches of 2 per device.
  accumulated, accumulated_losses = run_steps(tiny_vit_config, INFO, batches)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               accumulated.params, whole.params)
  np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-5)
  assert not np.allclose(whole.params["head"]["kernel"], 0)  # The steps did move things.


def test_bfloat16_activations_keep_float32_parameters_and_track_float32(tiny_vit_config,
                                                                       run_steps):
  tiny_vit_config.optimizer.learning_rate = 3e-3
  batches = _batches(1, 8) * 20  # 20 steps on one batch: the loss falls.
  f32, f32_losses = run_steps(tiny_vit_config, INFO, batches)
  tiny_vit_config.dtype = "bfloat16"
  bf16, bf16_losses = run_steps(tiny_vit_config, INFO, batches)
  for leaf in jax.tree.leaves((bf16.params, bf16.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert bf16_losses[-1] < 0.8 * bf16_losses[0]
  # Stated tolerance: within 5% of the float32 loss at every one of the 20 steps.
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0.05)
  assert bf16_losses != f32_losses  # The activations really were bfloat16.
