"""Training and evaluation, data-parallel over every device.

One batch, from `launch.py` to the loss:
  `train_and_evaluate(config, workdir)`
    -> `input_pipeline.train_batches`   host batch [per_host_batch, H, W, C]
    -> `DataParallel.put_batch`         global array sharded over the `data` axis
    -> `train_step`                     per device: forward, loss, gradients; gradients and
                                        metrics averaged over `data`; optimizer update.
`train_step` and `eval_step` are pure functions written once; `DataParallel` runs them
either as `jax.jit(jax.shard_map(...))` over a 1-D device mesh or as `jax.pmap`, and the
two give the same numbers.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from typing import Any

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from efficient_vit import device_input, input_pipeline, optim
from efficient_vit.metric_logging import MetricLogger
from efficient_vit.models import build_model

AXIS = "data"
PARALLELISMS = ("shard_map", "pmap")
INPUT_PIPELINES = ("auto", "device", "tfdata")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Fields that decide the shapes of what a checkpoint holds: a workdir cannot be resumed
# with other values.
_CHECKPOINT_SHAPING_FIELDS = ("dataset", "model", "optimizer.name")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  batch_stats: Any  # Running statistics of batch-norm models; {} for the others.
  opt_state: Any


def create_train_state(model, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       rng: jax.Array) -> TrainState:
  """Initial parameters for inputs of `image_shape` ([batch, H, W, C])."""
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(image_shape, jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def _variables(state: TrainState, params) -> dict:
  return {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k largest logits: [batch]."""
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               label_smoothing: float) -> tuple[TrainState, dict]:
  """One optimizer step on this device's shard of the batch.

  `rng` is the run's base key (raw key data); dropout and drop-path keys are folded from
  it per step and per device. Gradients, batch statistics and metrics are averaged over
  the `data` axis, so every device ends with the same state.
  """
  key = jax.random.wrap_key_data(rng)
  key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))

  def loss_fn(params):
    outputs = model.apply(_variables(state, params), batch["image"], train=True,
                          rngs={"dropout": key},
                          mutable=["batch_stats"] if state.batch_stats else False)
    logits, updates = outputs if state.batch_stats else (outputs, {})
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = jax.lax.pmean(grads, AXIS)
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = jax.lax.pmean({"loss": loss,
                           "top1": top_k_correct(logits, batch["label"], 1).mean()}, AXIS)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
  """Sums of loss, top-1 and top-5 hits and example count over the real (mask = 1)
  examples of the whole global batch."""
  logits = model.apply(_variables(state, state.params), batch["image"], train=False)
  mask = batch["mask"]
  sums = {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
          "top5": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
          "count": jnp.sum(mask)}
  return jax.lax.psum(sums, AXIS)


class DataParallel:
  """Runs the pure steps on every device, with the batch split over the `data` axis.

  `shard_map`: `jax.jit(jax.shard_map(step))` over a 1-D mesh of all devices (all hosts);
  the state is a replicated global array, the batch a global array sharded on axis 0.
  `pmap`: `jax.pmap(step, axis_name='data')`; the state carries a leading device axis.
  """

  def __init__(self, kind: str, train_fn, eval_fn):
    self.kind = kind
    if kind == "shard_map":
      self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
      self.replicated = NamedSharding(self.mesh, P())
      self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
      # check_vma=False: the steps do their own collectives, as under pmap. With the
      # check on, the gradient of the replicated parameters would arrive already summed
      # over devices and the explicit pmean would not be the mean.
      shard = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
      self.train_step = jax.jit(
          shard(train_fn, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P())),
          donate_argnums=0)
      self.eval_step = jax.jit(shard(eval_fn, in_specs=(P(), P(AXIS)), out_specs=P()))
    elif kind == "pmap":
      devices = jax.local_devices()
      self.local_mesh = Mesh(np.asarray(devices), (AXIS,))
      self.train_step = jax.pmap(train_fn, axis_name=AXIS, in_axes=(0, 0, None),
                                 donate_argnums=0)
      self.eval_step = jax.pmap(eval_fn, axis_name=AXIS)
    else:
      raise ValueError(f"config.parallelism={kind!r}; allowed: {', '.join(PARALLELISMS)}")

  def put_state(self, host_state: TrainState) -> TrainState:
    """Copies a host state onto every device. The copy is taken from numpy so that no
    device buffer is shared with `host_state` (the train step donates its input)."""
    host_state = jax.tree.map(np.asarray, host_state)
    if self.kind == "shard_map":
      return jax.device_put(host_state, self.replicated)
    return flax.jax_utils.replicate(host_state)

  def get_state(self, state: TrainState) -> TrainState:
    """One copy of the state, as it is saved in checkpoints."""
    return state if self.kind == "shard_map" else jax.tree.map(lambda x: x[0], state)

  def put_batch(self, batch: dict) -> dict:
    """Host batch [per_host_batch, ...] -> device batch split over the local devices."""
    if self.kind == "shard_map":
      return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
              for k, v in batch.items()}
    n = jax.local_device_count()
    sharding = NamedSharding(self.local_mesh, P(AXIS))
    return {k: jax.device_put(v.reshape((n, -1) + v.shape[1:]), sharding)
            for k, v in batch.items()}

  def first(self, tree):
    """A host copy of replicated outputs (metrics)."""
    tree = jax.device_get(tree)
    return tree if self.kind == "shard_map" else jax.tree.map(lambda x: x[0], tree)


def prefetch(batches, put, size: int = 2):
  """Keeps `size` batches in flight on the devices while the current step runs."""
  queue = []
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def batch_source(config, parallel: DataParallel, start_step: int = 0):
  """Endless device batches for global steps `start_step`, `start_step + 1`, ..., from the
  input pipeline that `config.input_pipeline` names (`auto`: on the devices where the
  split fits, else tf.data)."""
  if device_input.resolve(config) == "device":
    if parallel.kind == "shard_map":
      dataset = device_input.DeviceDataset(config, parallel.mesh)
    else:
      dataset = device_input.DeviceDataset(config, parallel.local_mesh, stacked=True)
    return (dataset.batch(step) for step in itertools.count(start_step))
  return prefetch(input_pipeline.train_batches(config, start_step), parallel.put_batch)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for bad values before anything is built or written."""
  choices = {"parallelism": PARALLELISMS, "input_pipeline": INPUT_PIPELINES,
             "dtype": tuple(DTYPES), "augment.crop": input_pipeline.CROPS,
             "optimizer.name": optim.OPTIMIZERS, "optimizer.schedule": optim.SCHEDULES}
  for field, allowed in choices.items():
    value = functools.reduce(getattr, field.split("."), config)
    if value not in allowed:
      raise ValueError(f"config.{field}={value!r}; allowed: {', '.join(allowed)}")
  for field in ("batch_size", "image_size", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
    if getattr(config, field) <= 0:
      raise ValueError(f"config.{field}={getattr(config, field)} must be positive")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("config.num_epochs must be positive when config.num_train_steps is -1")
  input_pipeline.per_host_batch_size(config.batch_size)


def _shaping_fields(config_json: dict) -> dict:
  out = {}
  for field in _CHECKPOINT_SHAPING_FIELDS:
    value = config_json
    for part in field.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    out[field] = value
  return out


def _check_workdir(config, workdir: str, has_checkpoint: bool) -> None:
  """Refuses to resume a workdir whose checkpoints were made for another model or data,
  before anything in it is touched."""
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoint and os.path.exists(path)):
    return
  with open(path, encoding="utf-8") as f:
    saved = _shaping_fields(json.load(f))
  current = _shaping_fields(json.loads(config.to_json_best_effort()))
  for field in _CHECKPOINT_SHAPING_FIELDS:
    if saved[field] != current[field]:
      raise ValueError(
          f"config.{field} differs from the run whose checkpoints are in {workdir} "
          f"(saved: {saved[field]!r}, now: {current[field]!r}); use a new --workdir, or the "
          "saved value to resume.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns the metrics of the final evaluation.
  """
  validate_config(config)
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  info = input_pipeline.dataset_info(config)
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else math.ceil(config.num_epochs * steps_per_epoch))
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

  model = build_model(config.model, info.num_classes, DTYPES[config.dtype])
  tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch, total_steps)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  image_shape = (1, config.image_size, config.image_size, 3)
  host_state = jax.jit(functools.partial(create_train_state, model, tx, image_shape))(init_rng)
  checkpoint = {"state": host_state, "rng": jax.random.key_data(dropout_rng)}

  os.makedirs(workdir, exist_ok=True)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  latest = manager.latest_step()
  _check_workdir(config, workdir, latest is not None)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint)
    checkpoint = manager.restore(latest, args=ocp.args.Composite(
        train=ocp.args.StandardRestore(abstract)))["train"]
    logging.info("Resumed from step %d of %s.", latest, workdir)
    print(f"resumed from step {latest}", flush=True)

  parallel = DataParallel(
      config.parallelism,
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        label_smoothing=config.optimizer.label_smoothing),
      functools.partial(eval_step, model=model))
  state = parallel.put_state(checkpoint["state"])
  rng = checkpoint["rng"]
  start_step = int(checkpoint["state"].step)
  del host_state, checkpoint

  logger = MetricLogger(workdir)
  batches = batch_source(config, parallel, start_step)
  eval_split = input_pipeline.EvalSplit(config)
  # pmap steps dispatched back to back can deadlock fake CPU devices: wait on each one.
  block_each_step = config.parallelism == "pmap"

  def evaluate(step: int) -> dict:
    sums = None
    for batch in eval_split:
      out = parallel.first(parallel.eval_step(state, parallel.put_batch(batch)))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    count = sums.pop("count")
    metrics = {k: v / count for k, v in sums.items()}
    metrics["num_examples"] = count
    logger.write(step, "eval", metrics)
    return metrics

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(
        {"state": parallel.get_state(state), "rng": rng})))

  progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=1.0)
  eval_metrics = {}
  timer_step, timer_start = None, None
  for step in range(start_step, total_steps):
    state, metrics = parallel.train_step(state, next(batches), rng)
    if block_each_step:
      jax.block_until_ready(metrics)
    done = step + 1
    progress.update(1)
    if timer_step is None:  # The first step compiles: time from its end on.
      jax.block_until_ready(metrics)
      timer_step, timer_start = done, time.perf_counter()
    if done % config.log_every_steps == 0 or done == total_steps:
      metrics = parallel.first(metrics)
      elapsed = time.perf_counter() - timer_start
      if done > timer_step:
        metrics["img_per_sec"] = (done - timer_step) * config.batch_size / elapsed
      timer_step, timer_start = done, time.perf_counter()
      logger.write(done, "train", metrics)
      progress.set_postfix(loss=f"{metrics['loss']:.3f}", top1=f"{metrics['top1']:.3f}")
    if done % eval_every == 0 or done == total_steps:
      eval_metrics = evaluate(done)
      progress.write(f"step {done}: eval loss {eval_metrics['loss']:.4f} "
                     f"top1 {eval_metrics['top1']:.4f} top5 {eval_metrics['top5']:.4f}")
      timer_step, timer_start = done, time.perf_counter()
    if done % config.checkpoint_every_steps == 0 or done == total_steps:
      save(done)
  progress.close()
  if start_step >= total_steps and not eval_metrics:
    eval_metrics = evaluate(start_step)
  manager.wait_until_finished()
  manager.close()
  logger.close()
  return eval_metrics
