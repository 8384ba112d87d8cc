"""The one assembly (`train.build`) and the trainer's guards: validation before anything is
written, non-finite steps, interval-averaged metrics, EMA, the files a run leaves."""

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

from efficient_vit import benchmark, input_pipeline, train
from efficient_vit.metric_logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = input_pipeline.DatasetInfo(num_classes=10, num_train_examples=80, num_eval_examples=0)


def _config(preset_module, preset, **model):
  config = preset_module.get_config(preset)
  config.model.update(model)
  config.update(batch_size=4, num_train_steps=4, log_every_steps=1)
  config.optimizer.update(warmup_steps=0, warmup_epochs=0.0)
  return config


def _expect_refused(config, tmp_path, message):
  """`train_and_evaluate` refuses `config` with `message` and writes nothing."""
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, workdir)
  assert not workdir.exists()


# One test per validation rule; each message names the field. Model sizes are checked by
# efficient_vit/validation.py (tests/test_validation.py has the full table), so these need
# no data: INFO stands in for the dataset through `train.build` and the trainer is refused
# before it reads anything.


@pytest.fixture
def refuse(monkeypatch, tmp_path):
  monkeypatch.setattr(input_pipeline, "dataset_info", lambda config: INFO)
  return functools.partial(_expect_refused, tmp_path=tmp_path)


def test_image_size_not_divisible_by_the_patch(refuse):
  from configs import vit
  refuse(_config(vit, "tiny_cifar10", patch_size=5),
         message=r"config.model.patch_size=5; allowed: a side that divides "
         r"config.image_size=32")


def test_image_size_not_divisible_by_the_window(refuse):
  from configs import swin
  config = _config(swin, "keras")
  config.image_size = 36  # 36 / patch 2 = 18 tokens a side; the window (2) divides it...
  config.model.window_size = 4  # ...this one does not.
  refuse(config, message="config.model.window_size=4; allowed: a window that divides every "
         "stage's feature map: stage 0 sees 18x18")


def test_heads_not_dividing_the_width(refuse):
  from configs import vit
  refuse(_config(vit, "tiny_cifar10", num_heads=3),
         message="config.model.num_heads=3; allowed: a number of heads that divides "
         "config.model.embed_dim=128")


def test_impossible_latent_sizes(refuse):
  from configs import perceiver
  config = _config(perceiver, "keras", latent_heads=5, latent_head_dim=None)
  refuse(config, message="config.model.latent_heads=5; allowed: a number of heads that "
         "divides config.model.latent_dim=256")
  config.model.update(latent_heads=1, num_latents=0)
  refuse(config, message="config.model.num_latents=0; allowed: a positive integer")


def test_impossible_memory_sizes(refuse):
  from configs import eanet
  config = _config(eanet, "keras", dim_coefficient=1000, memory_units=None)
  refuse(config, message=r"config.model.dim_coefficient=1000; allowed: at most "
         r"config.model.embed_dim=64")


def test_eval_batch_not_divisible_over_the_devices(refuse, tiny_vit_config):
  tiny_vit_config.eval_batch_size = 5
  refuse(tiny_vit_config, message=r"config.eval_batch_size=5; allowed: -1 \(the batch_size\) "
         r"or a multiple of the number of devices \(2\)")


def test_warmup_longer_than_the_run_is_refused(refuse, tiny_vit_config):
  tiny_vit_config.optimizer.update(warmup_steps=4, warmup_epochs=0.5)  # 4 + 5 steps > 6.
  refuse(tiny_vit_config, message=r"optimizer.warmup_steps=4 \+ optimizer.warmup_epochs=0.5 "
         r"\(9 steps\) and optimizer.cooldown_epochs=0.0 \(0 steps\); allowed: fewer steps "
         r"than the run's 6")


def test_micro_batches_that_do_not_divide_the_device_batch(refuse, tiny_vit_config):
  tiny_vit_config.optimizer.grad_accum_steps = 3  # 8 examples over 2 devices: 4 each.
  refuse(tiny_vit_config, message=r"config.optimizer.grad_accum_steps=3; allowed: a positive "
         r"number of micro-batches that divides each device's share of config.batch_size=8")


def test_unknown_nonfinite_policy(refuse, tiny_vit_config):
  tiny_vit_config.nonfinite = "ignore"
  refuse(tiny_vit_config, message="config.nonfinite='ignore'; allowed: stop, skip")


@pytest.mark.parametrize("override,message", [
    ("--config.batch_size=1.5", "flag --config.batch_size=1.5: invalid literal for int()"),
    ("--config.optimizer.learning_rate=fast",
     "flag --config.optimizer.learning_rate=fast: could not convert string to float"),
])
def test_an_override_of_the_wrong_type_is_refused_by_name(tmp_path, override, message):
  run = subprocess.run([sys.executable, "launch.py", "--config=configs/vit.py:tiny_cifar10",
                        f"--workdir={tmp_path / 'run'}", override], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def _poison_step(monkeypatch, at_step):
  """Makes the `at_step`-th train step (1-based) see NaN images."""
  real = train.train_step

  def poisoned(state, batch, rng, **kwargs):
    image = jnp.where(state.step == at_step - 1, jnp.nan, batch["image"])
    return real(state, {**batch, "image": image}, rng, **kwargs)

  monkeypatch.setattr(train, "train_step", poisoned)


def test_a_nan_loss_stops_the_run_at_its_step(tiny_vit_config, tmp_path, monkeypatch):
  _poison_step(monkeypatch, at_step=5)
  tiny_vit_config.update(checkpoint_every_steps=2, num_train_steps=8)
  with tfds.testing.mock_data(num_examples=24):
    with pytest.raises(train.NonFiniteError, match=r"^step 5: the loss \(nan\)"):
      train.train_and_evaluate(tiny_vit_config, tmp_path)
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.fspath(tmp_path / "checkpoints")) as manager:
    assert manager.all_steps() == [2, 4]
  assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"] == [1, 2, 3, 4]


def _overflow_update(monkeypatch, at_step):
  """Makes the `at_step`-th update (1-based) infinite: the loss and gradient stay finite,
  the updated parameters do not (as a learning rate beyond float32 would)."""
  import optax

  from efficient_vit import optim
  real = optim.make_optimizer

  def make_optimizer(*args, **kwargs):
    tx, schedule = real(*args, **kwargs)
    blow_up = optax.scale_by_schedule(
        lambda count: jnp.where(count == at_step - 1, jnp.inf, 1.0).astype(jnp.float32))
    return optax.chain(tx, blow_up), schedule

  monkeypatch.setattr(optim, "make_optimizer", make_optimizer)


def test_an_update_that_makes_a_parameter_infinite_stops_the_run_at_its_step(
    tiny_vit_config, tmp_path, monkeypatch):
  _overflow_update(monkeypatch, at_step=5)
  tiny_vit_config.update(checkpoint_every_steps=1, num_train_steps=8, keep_checkpoints=10)
  with tfds.testing.mock_data(num_examples=24):
    with pytest.raises(train.NonFiniteError,
                       match=r"^step 5: the updated parameters or optimizer state are not "
                       "finite"):
      train.train_and_evaluate(tiny_vit_config, tmp_path)
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.fspath(tmp_path / "checkpoints")) as manager:
    assert manager.all_steps() == [1, 2, 3, 4]
    for step in manager.all_steps():
      state = manager.restore(step)["train"]["state"]
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), step
  train_records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in train_records)


def test_skip_drops_the_nan_step_and_counts_it(tiny_vit_config, tmp_path, monkeypatch):
  _poison_step(monkeypatch, at_step=2)
  tiny_vit_config.update(nonfinite="skip", num_train_steps=4, log_every_steps=2)
  with tfds.testing.mock_data(num_examples=24):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
  records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 1.0), (4, 0.0)]
  assert all(np.isfinite(r["loss"]) for r in records)
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.fspath(tmp_path / "checkpoints")) as manager:
    params = manager.restore(4)["train"]["state"]["params"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_train_metrics_are_the_mean_over_the_log_interval(tiny_vit_config, tmp_path):
  tiny_vit_config.num_train_steps = 6
  with tfds.testing.mock_data(num_examples=24):
    every = tiny_vit_config.copy_and_resolve_references()
    train.train_and_evaluate(every, tmp_path / "every")
    tiny_vit_config.log_every_steps = 3
    train.train_and_evaluate(tiny_vit_config, tmp_path / "interval")
  per_step = {r["step"]: r for r in read_metrics(tmp_path / "every") if r["split"] == "train"}
  logged = [r for r in read_metrics(tmp_path / "interval") if r["split"] == "train"]
  assert [r["step"] for r in logged] == [3, 6]
  for record in logged:
    steps = range(record["step"] - 2, record["step"] + 1)
    for name in ("loss", "top1"):
      expected = np.mean([per_step[s][name] for s in steps])
      np.testing.assert_allclose(record[name], expected, rtol=1e-6)
    # The learning rate is the last step's, not a mean.
    assert record["learning_rate"] == per_step[record["step"]]["learning_rate"]
  assert logged[0]["loss"] != per_step[3]["loss"]  # A mean, not the last value.


def test_ema_follows_the_decay_formula_and_both_are_evaluated(tiny_vit_config, tmp_path):
  decay = 0.5
  tiny_vit_config.optimizer.ema_decay = decay
  experiment = train.build(tiny_vit_config, INFO)
  parallel = experiment.parallel
  state = parallel.put_state(experiment.init_state())
  expected = jax.device_get(parallel.get_state(state).params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    state, _ = parallel.train_step(state, parallel.put_batch(batch), experiment.rng)
    params = jax.device_get(parallel.get_state(state).params)
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               jax.device_get(parallel.get_state(state).ema_params), expected)

  tiny_vit_config.num_train_steps = 2
  with tfds.testing.mock_data(num_examples=12):
    final = train.train_and_evaluate(tiny_vit_config, tmp_path)
  splits = [r["split"] for r in read_metrics(tmp_path)]
  assert splits.count("eval") == 1 and splits.count("eval_ema") == 1
  assert {"top1", "ema_top1", "loss", "ema_loss"} <= set(final)


def test_a_run_records_its_model_for_consumers_of_its_checkpoints(tiny_vit_config, tmp_path):
  tiny_vit_config.num_train_steps = 1
  with tfds.testing.mock_data(num_examples=12):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
  info = json.loads((tmp_path / "model.json").read_text())
  assert info["model"] == tiny_vit_config.model.to_dict()
  assert info["num_classes"] == 10 and info["image_size"] == 32
  assert [info["mean"], info["std"]] == [list(v) for v in input_pipeline.normalisation(
      "cifar10")]


def test_the_benchmark_times_the_trainers_own_assembly(tiny_vit_config, monkeypatch):
  """One step option changed in the config reaches the benchmark's step, because the
  benchmark runs what `train.build` assembled."""
  built = []
  real_build = train.build
  monkeypatch.setattr(train, "build", lambda *a, **k: built.append(real_build(*a, **k))
                      or built[-1])
  tiny_vit_config.optimizer.ema_decay = 0.9  # A step option: the state grows an EMA.
  tiny_vit_config.batch_size = 4
  record = benchmark.benchmark_config(tiny_vit_config, steps=1, warmup_steps=0,
                                      input_mode="fixed")
  assert len(built) == 1 and record["train_step_memory_bytes"] > 0
  timed = built[0].abstract_state()
  assert jax.tree.structure(timed.ema_params) == jax.tree.structure(timed.params)
  tiny_vit_config.optimizer.ema_decay = 0.0
  without = benchmark.benchmark_config(tiny_vit_config, steps=1, warmup_steps=0,
                                       input_mode="fixed")
  # The EMA copy of the parameters is part of the timed step's buffers.
  assert record["train_step_memory_bytes"] > without["train_step_memory_bytes"]


@pytest.mark.parametrize("kind,blocks", [("shard_map", False), ("pmap", True)])
def test_only_pmap_on_fake_cpu_devices_waits_for_each_step(tiny_vit_config, kind, blocks):
  tiny_vit_config.parallelism = kind
  assert train.build(tiny_vit_config, INFO).parallel.block_each_step is blocks


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU pipeline")
@pytest.mark.parametrize("remat", ["none", "block"])
def test_remats_optimization_barriers_reach_the_cpu_program(tiny_vit_config, remat):
  """With `model.remat` the train step's optimization barriers reach the compiled program
  (xla_options: without them XLA merges the recomputation back into the forward pass and
  remat saves no memory); without remat the step has none (the model holds none)."""
  tiny_vit_config.model.update(depth=2, remat=remat)
  batch_size = 16 * jax.device_count()
  tiny_vit_config.batch_size = batch_size
  experiment = train.build(tiny_vit_config, INFO)
  parallel = experiment.parallel
  batch = {"image": np.zeros((batch_size, 32, 32, 3), np.float32),
           "label": np.zeros(batch_size, np.int32)}
  text = parallel.train_step.lower(parallel.put_state(experiment.init_state()),
                                   parallel.put_batch(batch),
                                   experiment.rng).compile().as_text()
  assert ("opt-barrier" in text) is (remat == "block")
