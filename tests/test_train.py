"""The training system: steps, both parallelisms, resume, eval exactness, launch.py."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import linen as flax_nn

from efficient_vit import augment, input_pipeline, optim, train
from efficient_vit.metric_logging import read_metrics
from efficient_vit.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(config, kind):
  """The trainer's own assembly of `config` under `kind`, for 10 classes."""
  config.parallelism = kind
  info = input_pipeline.DatasetInfo(num_classes=10, num_train_examples=80,
                                    num_eval_examples=0)
  experiment = train.build(config, info)
  return experiment.parallel, experiment.init_state()


def _fixed_batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          "label": rng.integers(0, 10, n).astype(np.int32)}


def test_two_fake_devices_are_present():
  assert jax.device_count() == 2


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_vit_config):
  tiny_vit_config.optimizer.learning_rate = 3e-3
  tiny_vit_config.augment.update(crop="none", flip=False)  # The same pixels every step.
  parallel, state = _steps(tiny_vit_config, "shard_map")
  state = parallel.put_state(state)
  batch = parallel.put_batch(_fixed_batch())
  rng = jax.random.key_data(jax.random.key(1))
  losses = []
  for _ in range(15):
    state, metrics = parallel.train_step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 15
  assert losses[-1] < 0.8 * losses[0], losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_shard_map_and_pmap_give_the_same_parameters(tiny_vit_config):
  tiny_vit_config.model.dropout_rate = 0.1  # Per-device dropout keys must match too.
  # SGD keeps updates proportional to gradients; Adam would turn rounding-level gradient
  # differences of near-zero entries into lr-sized steps.
  tiny_vit_config.optimizer.update(name="sgd", learning_rate=0.1)
  results = []
  for kind in ("shard_map", "pmap"):
    parallel, state = _steps(tiny_vit_config, kind)
    state = parallel.put_state(state)
    rng = jax.random.key_data(jax.random.key(1))
    for i in range(3):
      state, metrics = parallel.train_step(state, parallel.put_batch(_fixed_batch(seed=i)), rng)
      jax.block_until_ready(metrics)
    results.append((jax.device_get(parallel.get_state(state).params),
                    parallel.first(metrics)["loss"]))
  (params_a, loss_a), (params_b, loss_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               params_a, params_b)
  # And the steps really moved the parameters.
  _, fresh = _steps(tiny_vit_config, "shard_map")
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params_a, jax.device_get(fresh.params))
  assert max(jax.tree.leaves(moved)) > 1e-4


class _SqrtLogits(flax_nn.Module):
  """Logits sqrt(w) with w = 0: a finite loss whose gradient in w is infinite."""

  @flax_nn.compact
  def __call__(self, images, train=False):
    w = self.param("w", flax_nn.initializers.zeros, (10,))
    return jnp.zeros(images.shape[:1] + (1,)) + jnp.sqrt(w)


@pytest.mark.parametrize("skip", [False, True])
def test_an_infinite_gradient_under_a_finite_loss_is_not_finite(tiny_vit_config, skip):
  tiny_vit_config.augment.update(crop="none", flip=False)
  model = _SqrtLogits()
  tx, schedule = optim.make_optimizer(tiny_vit_config.optimizer, 10, 100)
  state = train.create_train_state(model, tx, (1, 32, 32, 3), jax.random.key(0))
  augmentation = augment.from_config(tiny_vit_config, 10, 10,
                                     *input_pipeline.normalisation("cifar10"))
  new_state, metrics = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=schedule, augmentation=augmentation,
      skip_nonfinite=skip, axis_name=None))(state, _fixed_batch(),
                                            jax.random.key_data(jax.random.key(1)))
  assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
  assert metrics["finite"] == 0.0
  assert int(new_state.step) == 1
  kept = np.asarray(new_state.params["w"])
  assert np.array_equal(kept, np.zeros(10)) if skip else not np.isfinite(kept).all()


def test_grad_norm_is_the_global_norm_of_the_mean_gradient(tiny_vit_config):
  # The norm is measured even where nothing clips; no smoothing, as `loss_fn` below.
  tiny_vit_config.optimizer.update(grad_clip_norm=0.0, label_smoothing=0.0)
  tiny_vit_config.augment.update(crop="none", flip=False)
  parallel, state = _steps(tiny_vit_config, "shard_map")
  batch = _fixed_batch()
  _, metrics = parallel.train_step(parallel.put_state(state), parallel.put_batch(batch),
                                   jax.random.key_data(jax.random.key(1)))
  model = build_model(tiny_vit_config.model, 10)

  def loss_fn(params):
    images = augment.normalise(batch["image"], *input_pipeline.normalisation("cifar10"))
    logits = model.apply({"params": params}, images)
    return train.cross_entropy(logits, batch["label"]).mean()

  grads = jax.grad(loss_fn)(state.params)
  expected = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  metrics = parallel.first(metrics)
  np.testing.assert_allclose(metrics["grad_norm"], expected, rtol=1e-4)
  assert metrics["finite"] == 1.0


def test_gradients_are_averaged_over_devices(tiny_vit_config):
  """A 2-device step equals a 1-device step on the whole batch (no dropout). SGD, so that a
  wrong gradient scale (a sum instead of a mean) shows."""
  tiny_vit_config.optimizer.update(name="sgd", learning_rate=0.1, label_smoothing=0.1)
  tiny_vit_config.augment.update(crop="none", flip=False)  # The step only normalises.
  parallel, state = _steps(tiny_vit_config, "shard_map")
  batch = _fixed_batch()
  new_state, _ = parallel.train_step(parallel.put_state(state), parallel.put_batch(batch),
                                     jax.random.key_data(jax.random.key(1)))
  model = build_model(tiny_vit_config.model, 10)
  tx, _ = optim.make_optimizer(tiny_vit_config.optimizer, 10, 100)

  def loss_fn(params):
    images = augment.normalise(batch["image"], *input_pipeline.normalisation("cifar10"))
    logits = model.apply({"params": params}, images)
    return train.cross_entropy(logits, batch["label"], 0.1).mean()

  grads = jax.grad(loss_fn)(state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  expected = jax.tree.map(lambda p, u: p + u, state.params, updates)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               jax.device_get(new_state.params), expected)


@pytest.mark.parametrize("pipeline,full_recipe", [("device", True), ("tfdata", False)])
def test_six_steps_equal_three_plus_restart_plus_three(tiny_vit_config, tmp_path, pipeline,
                                                       full_recipe):
  tiny_vit_config.input_pipeline = pipeline
  if full_recipe:  # The augmented batches of the resumed steps are those of the straight run.
    tiny_vit_config.augment.update(randaugment_num_ops=2, randaugment_magnitude=9.0,
                                   randaugment_magnitude_std=0.5, mixup_alpha=0.8,
                                   cutmix_alpha=1.0, random_erasing_prob=0.25)
  with tfds.testing.mock_data(num_examples=40):
    straight = tiny_vit_config.copy_and_resolve_references()
    train.train_and_evaluate(straight, tmp_path / "straight")
    first = tiny_vit_config.copy_and_resolve_references()
    first.num_train_steps = 3
    train.train_and_evaluate(first, tmp_path / "resumed")
    train.train_and_evaluate(tiny_vit_config, tmp_path / "resumed")

  def final_params(workdir):
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.abspath(workdir / "checkpoints")) as manager:
      assert manager.latest_step() == 6
      return manager.restore(6)["train"]["state"]["params"]

  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))
  # The resumed run's train losses at steps 4..6 are those of the straight run.
  loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if r["split"] == "train"}
  a, b = loss(tmp_path / "straight"), loss(tmp_path / "resumed")
  for step in (4, 5, 6):
    np.testing.assert_allclose(a[step], b[step], rtol=1e-5)


def test_resume_refuses_another_model_and_keeps_the_workdir(tiny_vit_config, tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    tiny_vit_config.num_train_steps = 3
    train.train_and_evaluate(tiny_vit_config, tmp_path)
    before = sorted(os.listdir(tmp_path / "checkpoints")), read_metrics(tmp_path)
    tiny_vit_config.model.embed_dim = 48
    with pytest.raises(ValueError, match="config.model differs"):
      train.train_and_evaluate(tiny_vit_config, tmp_path)
  assert (sorted(os.listdir(tmp_path / "checkpoints")), read_metrics(tmp_path)) == before


@pytest.mark.parametrize("num_examples,eval_batch_size", [(23, 6), (5, 8), (24, 6)])
def test_eval_counts_every_example_exactly_once(tiny_vit_config, num_examples,
                                                 eval_batch_size):
  tiny_vit_config.eval_batch_size = eval_batch_size
  with tfds.testing.mock_data(num_examples=num_examples):
    batches = list(input_pipeline.eval_batches(tiny_vit_config))
    assert all(b["image"].shape[0] == eval_batch_size for b in batches)
    assert sum(b["mask"].sum() for b in batches) == num_examples
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    expected = np.array([ex["label"] for ex in tfds.as_numpy(tfds.load(
        "cifar10", split="test", shuffle_files=False))])
    np.testing.assert_array_equal(labels, expected)


def test_training_eval_reports_the_split_size(tiny_vit_config, tmp_path):
  tiny_vit_config.update(eval_batch_size=6, num_train_steps=1)
  with tfds.testing.mock_data(num_examples=23):
    metrics = train.train_and_evaluate(tiny_vit_config, tmp_path)
  assert metrics["num_examples"] == 23
  assert 0 <= metrics["top1"] <= metrics["top5"] <= 1


def test_train_batches_resume_at_the_same_position(tiny_vit_config):
  tiny_vit_config.augment.crop = "inception"  # The host's one random op.
  with tfds.testing.mock_data(num_examples=20):
    stream = input_pipeline.train_batches(tiny_vit_config)
    first_seven = [next(stream) for _ in range(7)]  # Crosses two epochs of 20 examples.
    resumed = input_pipeline.train_batches(tiny_vit_config, start_step=4)
    for expected in first_seven[4:]:
      got = next(resumed)
      np.testing.assert_array_equal(got["label"], expected["label"])
      np.testing.assert_allclose(got["image"], expected["image"])
  assert first_seven[0]["image"].shape == (8, 32, 32, 3)
  assert first_seven[0]["image"].dtype == np.uint8
  # The random crops differ between the two epochs' passes over the same examples.
  assert not np.allclose(first_seven[0]["image"], first_seven[3]["image"])


def test_augmentations_keep_shapes_and_ranges(tiny_vit_config):
  """The host brings images to one uint8 size; the step's augmentation crops, warps and
  normalises them."""
  tiny_vit_config.augment.update(crop="resize", resize_size=40, zoom=0.2, rotation=0.1,
                                 contrast=0.1)
  tiny_vit_config.image_size = 24
  with tfds.testing.mock_data(num_examples=8):
    batch = next(input_pipeline.train_batches(tiny_vit_config))
  assert batch["image"].shape == (8, 40, 40, 3) and batch["image"].dtype == np.uint8
  aug = augment.from_config(tiny_vit_config, 10, 1, *input_pipeline.normalisation("cifar10"))
  images, targets = jax.jit(functools.partial(augment.apply_batch, aug))(
      batch["image"], batch["label"], jax.random.key_data(jax.random.key(0)), 0)
  assert images.shape == (8, 24, 24, 3) and images.dtype == jnp.float32
  assert np.isfinite(images).all() and np.abs(images).max() < 5
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("parallelism", "pjit", "config.parallelism='pjit'; allowed: shard_map, pmap"),
    ("batch_size", 7, "batch_size=7 must be a multiple of the number of devices"),
    ("optimizer.name", "adam", "optimizer.name='adam'; allowed: adamw, lamb, sgd"),
    ("augment.crop", "center", "augment.crop='center'; allowed"),
    ("dataset", "no_such_dataset", "config.dataset='no_such_dataset' is not a TFDS dataset"),
])
def test_bad_config_values_get_clear_errors(tiny_vit_config, tmp_path, field, value, message):
  target, name = tiny_vit_config, field.split(".")
  for part in name[:-1]:
    target = getattr(target, part)
  setattr(target, name[-1], value)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_missing_dataset_fails_fast_with_a_clear_error(tiny_vit_config, tmp_path):
  tiny_vit_config.update(data_dir=str(tmp_path), download=False)
  with pytest.raises(FileNotFoundError, match="not prepared in .*config.download=False"):
    train.train_and_evaluate(tiny_vit_config, tmp_path / "work")


def test_schedules():
  from configs import common
  opt = common.base_config().optimizer
  opt.update(learning_rate=1.0, warmup_steps=10, schedule="cosine")
  lr = optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=110)
  assert float(lr(0)) == 0 and float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.5, abs=1e-3) and float(lr(110)) < 1e-6
  opt.update(schedule="step", warmup_steps=0, decay_epochs=(2, 4), decay_factor=0.1)
  lr = optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=100)
  assert [round(float(lr(s)), 6) for s in (19, 20, 39, 40)] == [1.0, 0.1, 0.1, 0.01]


_LAUNCH = """
import sys
import tensorflow_datasets as tfds
from flax import linen as flax_nn
from absl import app
sys.argv = ["launch.py"] + sys.argv[1:]
import launch
with tfds.testing.mock_data(num_examples=24):
  app.run(launch.main)
"""


def test_launch_end_to_end_and_resume(tmp_path):
  args = [sys.executable, "-c", _LAUNCH, "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={tmp_path}", "--config.model.embed_dim=32", "--config.model.depth=1",
          "--config.model.patch_size=8", "--config.batch_size=8", "--config.num_train_steps=4",
          "--config.optimizer.warmup_steps=1", "--config.log_every_steps=2",
          "--config.eval_every_steps=4"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "embed_dim: 32" in run.stdout  # The resolved config is printed...
  saved = json.loads((tmp_path / "config.json").read_text())  # ...and saved.
  assert saved["model"]["embed_dim"] == 32 and saved["num_train_steps"] == 4
  records = read_metrics(tmp_path)
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [2, 4]
  assert {"loss", "top1", "learning_rate", "img_per_sec"} <= set(train_records[1])
  evals = [r for r in records if r["split"] == "eval"]
  assert len(evals) == 1 and {"loss", "top1", "top5"} <= set(evals[0])
  assert evals[0]["num_examples"] == 24
  assert any(name.startswith("events.out.tfevents") for name in
             os.listdir(tmp_path / "tensorboard"))
  # A second call on the same workdir resumes instead of starting over.
  args[args.index("--config.num_train_steps=4")] = "--config.num_train_steps=6"
  run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "resumed from step 4" in run.stdout
  steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert steps == [2, 4, 6]


def test_weight_decay_spares_biases_norms_and_tables():
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))},
            "norm": {"scale": jnp.ones(4)},
            "position_embedding": {"embedding": jnp.ones((1, 5, 4))},
            "attention": {"relative_position_bias_table": jnp.ones((9, 2))}}
  mask = optim._decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False},
                  "query": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "position_embedding": {"embedding": False},
                  "attention": {"relative_position_bias_table": False}}


def test_lamb_lets_a_zero_initialised_head_learn():
  from configs import common
  opt = common.base_config().optimizer
  opt.update(name="lamb", learning_rate=1e-2, schedule="constant")
  tx, _ = optim.make_optimizer(opt, steps_per_epoch=1, total_steps=10)
  params = {"head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  # Adam-sized steps (lr), not steps scaled by a zero parameter norm.
  np.testing.assert_allclose(updates["head"]["bias"], -1e-2, rtol=1e-3)
  assert np.abs(updates["head"]["kernel"]).max() > 1e-3


def test_train_batches_resume_many_epochs_later_at_the_same_position(tiny_vit_config):
  """Each epoch's order is rebuilt from (seed, epoch): a resume far into the run starts
  where the uninterrupted stream is, epochs reshuffle, and every epoch holds each example
  once."""
  tiny_vit_config.augment.update(crop="none", flip=False)  # Compare the examples themselves.
  with tfds.testing.mock_data(num_examples=16):
    stream = input_pipeline.train_batches(tiny_vit_config)
    straight = [next(stream) for _ in range(40)]  # 20 epochs of 2 batches of 8.
    resumed = input_pipeline.train_batches(tiny_vit_config, start_step=37)
    for expected in straight[37:40]:
      got = next(resumed)
      np.testing.assert_array_equal(got["label"], expected["label"])
      np.testing.assert_array_equal(got["image"], expected["image"])
  epochs = [np.concatenate([b["image"] for b in straight[i:i + 2]]) for i in (0, 2, 38)]
  keys = [sorted(x.tobytes() for x in e) for e in epochs]
  assert keys[0] == keys[1] == keys[2]  # The same 16 examples in every epoch...
  assert not np.array_equal(epochs[0], epochs[1])  # ...in another order.
