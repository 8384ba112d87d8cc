"""Training and evaluation, data-parallel over every device.

One batch, from `launch.py` to the loss:
  `train_and_evaluate(config, workdir)`
    -> `build(config)`                  the one assembly: model, optimizer, state, steps
    -> `batch_source`                   tf.data (host batch [per_host_batch, H, W, C], put
                                        on the devices) or the device-resident split
    -> `Experiment.parallel.train_step` `train_step` on every device, the batch split over
                                        the `data` axis
    -> `train_step`                     forward, loss, gradients; gradients and metrics
                                        averaged over `data`; optimizer update (+ EMA).
`train_step` and `eval_step` are pure functions written once. `build` assembles them with
the model and optimizer, and the trainer, the benchmark and the tests all run what it
returns. `DataParallel` runs the steps as `jax.jit(jax.shard_map(...))` over a 1-D device
mesh; `PmapParallel` as `jax.pmap`, and the two give the same numbers; `FsdpParallel`
(`parallelism: fsdp`) as `jax.jit` of the step written for the global batch, with the state
sharded over the devices. Several processes (hosts) run the same code: see README,
"Several devices and hosts".
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Callable

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from efficient_vit import (augment, cost, device_input, init_from, input_pipeline, layers,
                           metric_logging, optim, run_lock, validation, xla_options)
from efficient_vit.models import build_model

AXIS = "data"
PARALLELISMS = ("shard_map", "pmap", "fsdp")
INPUT_PIPELINES = ("auto", "device", "tfdata")
NONFINITE = ("stop", "skip")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Fields that decide the shapes of what a checkpoint holds: a workdir cannot be resumed
# with other values.
_CHECKPOINT_SHAPING_FIELDS = ("dataset", "model", "optimizer.name", "optimizer.ema_decay")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  batch_stats: Any  # Running statistics of batch-norm models; {} for the others.
  opt_state: Any
  ema_params: Any  # Exponential moving average of `params`; {} when optimizer.ema_decay=0.


def create_train_state(model, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       rng: jax.Array, ema: bool = False) -> TrainState:
  """Initial parameters for inputs of `image_shape` ([batch, H, W, C])."""
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(image_shape, jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {})


def model_variables(state: TrainState, ema: bool = False) -> dict:
  """What `model.apply` takes: the raw (or EMA) parameters and any batch statistics."""
  params = state.ema_params if ema else state.params
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
               augmentation: augment.Augmentation, ema_decay: float = 0.0,
               grad_accum_steps: int = 1, skip_nonfinite: bool = False,
               axis_name: str | None = AXIS) -> tuple[TrainState, dict]:
  """One optimizer step on this device's shard of the batch.

  The batch's uint8 images are augmented and normalised first (`augment.apply_batch`: the
  one augmentation path, whichever input pipeline delivered them), and its labels become
  soft targets (label smoothing and any Mixup / CutMix folded in); the loss is the
  cross-entropy against them, and top-1 is measured against their argmax (the label with
  the larger weight when mixed).

  `rng` is the run's base key (raw key data); dropout and drop-path keys are folded from
  it per step, device and micro-batch. With `grad_accum_steps` k > 1 the shard is split
  into k micro-batches whose gradients are averaged (a `lax.scan`, so that only one
  micro-batch's activations are alive at a time) before the one update: the update of a
  batch k times larger than memory allows. Batch statistics are then updated once per
  micro-batch. Gradients, batch statistics and metrics are averaged over the `data` axis,
  so every device ends with the same state. `metrics["grad_norm"]` is the global L2 norm of
  the (averaged) gradients, `metrics["finite"]` 1 when the loss and that norm are finite:
  a NaN or infinite gradient anywhere makes the norm so, as does a norm above about 1.8e19
  (its square overflows float32). The updated state is checked the same way: one global
  norm over the new parameters, optimizer state and batch statistics, so that an update
  that overflows (a learning rate too large) fails the check even where the gradient was
  finite. The check reads norms (which gradient clipping computes too) rather than an
  is-finite test per parameter array, which cost ViT-S/16's train step about a tenth of its
  compile time (benchmarks/PROFILE.md). With `skip_nonfinite` a step whose check fails
  leaves the parameters, optimizer state, batch statistics and EMA as they were (the step
  counter still advances, so the data does too).

  With `axis_name=None` the same step is written for the whole global batch (`fsdp`: plain
  `jit`, the compiler inserts the collectives): there is no per-device key and no explicit
  mean, the mean over the batch being the mean gradient. Dropout masks then differ from the
  per-device ones, and batch statistics are those of the global batch.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  images, targets = augment.apply_batch(augmentation, batch["image"], batch["label"], rng,
                                        state.step, axis_name)
  batch = {"image": images, "target": targets}

  def loss_fn(params, batch_stats, micro_batch, micro_key):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    outputs = model.apply(variables, micro_batch["image"], train=True,
                          rngs={"dropout": micro_key},
                          mutable=["batch_stats"] if batch_stats else False)
    logits, updates = outputs if batch_stats else (outputs, {})
    loss = optax.softmax_cross_entropy(logits, micro_batch["target"]).mean()
    top1 = top_k_correct(logits, jnp.argmax(micro_batch["target"], -1), 1).mean()
    return loss, (top1, updates.get("batch_stats", {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, (top1, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, key)
  else:
    micro_batches = jax.tree.map(
        lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

    def accumulate(carry, inputs):
      grads, batch_stats, loss, top1 = carry
      index, micro_batch = inputs
      (micro_loss, (micro_top1, batch_stats)), micro_grads = grad_fn(
          state.params, batch_stats, micro_batch, jax.random.fold_in(key, index))
      grads = jax.tree.map(jnp.add, grads, micro_grads)
      return (grads, batch_stats, loss + micro_loss, top1 + micro_top1), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats, loss, top1), _ = jax.lax.scan(
        accumulate, (zeros, state.batch_stats, 0.0, 0.0),
        (jnp.arange(grad_accum_steps), micro_batches))
    grads, loss, top1 = jax.tree.map(lambda x: x / grad_accum_steps, (grads, loss, top1))
  grads = _pmean(grads, axis_name)
  batch_stats = _pmean(batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_decay:
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
  metrics = _pmean({"loss": loss, "top1": top1}, axis_name)
  metrics["grad_norm"] = optax.tree.norm(grads)  # As optax.clip_by_global_norm: one reduction.
  updated = [x for x in jax.tree.leaves((params, opt_state, batch_stats))
             if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            & jnp.isfinite(optax.tree.norm(updated)))
  metrics["finite"] = finite.astype(jnp.float32)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema_params)
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        new_state.replace(step=state.step), state)
    new_state = kept.replace(step=state.step + 1)
  return new_state, metrics


def _pmean(tree, axis_name: str | None):
  """The mean over the devices of `axis_name`; `tree` itself when the step sees the whole
  global batch (axis_name=None)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def eval_step(variables: dict, batch: dict, *, model, normalisation: tuple,
              axis_name: str | None = AXIS) -> dict:
  """Sums of loss, top-1 and top-5 hits and example count over the real (mask = 1)
  examples of the whole global batch. `variables` as `model_variables` gives them; the
  uint8 images are normalised with `normalisation` = (mean, std), as `train_step` does;
  `axis_name=None`: the step sees the global batch (see `train_step`)."""
  logits = model.apply(variables, augment.normalise(batch["image"], *normalisation),
                       train=False)
  mask = batch["mask"]
  sums = {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
          "top5": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
          "count": jnp.sum(mask)}
  return sums if axis_name is None else jax.lax.psum(sums, axis_name)


class DataParallel:
  """Runs the pure steps with the batch split over the `data` axis of all devices (all
  hosts): `jax.jit(jax.shard_map(step))` over a 1-D mesh; the state is a replicated global
  array, the batch a global array sharded on axis 0.

  `PmapParallel` and `FsdpParallel` below are the other ways to run the same steps;
  everything in which they differ lives in these classes. Under several processes every
  array that leaves a runner (`get_state`, checkpoints) is a global `jax.Array`, and the
  host reads only the data addressable by its process (`first`).
  """

  kind = "shard_map"
  # Whether the host waits for each train step: see PmapParallel.
  block_each_step = False

  def __init__(self, train_fn: Callable, eval_fn: Callable):
    self._global_mesh()
    # check_vma=False: the steps do their own collectives, as under pmap. With the check
    # on, the gradient of the replicated parameters would arrive already summed over
    # devices and the explicit pmean would not be the mean.
    shard = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
    # On CPU: convolutions on all threads, optimization barriers kept (xla_options).
    options = xla_options.compiler_options()
    self.train_step = jax.jit(
        shard(train_fn, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P())),
        donate_argnums=0, compiler_options=options)
    self.eval_step = jax.jit(shard(eval_fn, in_specs=(P(), P(AXIS)), out_specs=P()),
                             compiler_options=options)

  def _global_mesh(self) -> None:
    self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def state_sharding(self, state):
    """The sharding of each leaf of `state` (arrays or shapes) as `get_state` returns it
    and checkpoints are restored into: replicated over every device of every process."""
    return jax.tree.map(lambda _: self.replicated, state)

  def put_state(self, host_state):
    """Places a state (from `init_state`, or restored) as the steps take it. Local values
    are copied through numpy, so that no device buffer is shared with `host_state` (the
    train step donates its input); global arrays of other processes' devices are resharded
    (or kept, when already laid out as `state_sharding` says)."""
    return jax.tree.map(_put, host_state, self.state_sharding(host_state))

  def get_state(self, state):
    """The state as it is saved in checkpoints: global arrays laid out as
    `state_sharding` says."""
    return state

  def put_batch(self, batch: dict) -> dict:
    """Host batch [per_host_batch, ...] -> device batch split over the devices: the global
    batch is process 0's rows, then process 1's, ..."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

  def first(self, tree):
    """A host copy of replicated outputs (metrics), read from this process's devices."""
    return jax.tree.map(_local_value, tree)

  def device_dataset(self, config) -> device_input.DeviceDataset:
    """The device-resident train split, its batches laid out as `train_step` takes them."""
    return device_input.DeviceDataset(config, self.mesh)


def _local_value(x):
  """numpy value of a replicated (or host) array from this process's first copy of it."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return jax.device_put(x, sharding)
  return jax.device_put(np.asarray(x), sharding)


class PmapParallel(DataParallel):
  """`jax.pmap(step, axis_name='data')` over the local devices: the state carries a leading
  device axis, and a batch is [devices, batch / devices, ...]. What it saves is converted
  to the same global replicated arrays as `DataParallel`'s (no host-local arrays in
  checkpoints), so that either runner, on any number of processes, restores it."""

  kind = "pmap"

  # Not DataParallel's __init__: pmapped rather than jitted steps.
  def __init__(self, train_fn: Callable, eval_fn: Callable):  # pylint: disable=W0231
    self._global_mesh()
    self.local_mesh = Mesh(np.asarray(jax.local_devices()), (AXIS,))
    # jax.pmap takes no compiler_options: on CPU its convolutions stay YNNPACK's, and remat
    # without scan saves no memory (xla_options).
    self.train_step = jax.pmap(train_fn, axis_name=AXIS, in_axes=(0, 0, None),
                               donate_argnums=0)
    self.eval_step = jax.pmap(eval_fn, axis_name=AXIS)
    # pmap steps dispatched back to back can deadlock fake CPU devices (several devices
    # on one host CPU): there the host waits for each step. Real accelerators do not pay it.
    self.block_each_step = (jax.local_devices()[0].platform == "cpu"
                            and jax.local_device_count() > 1)

  def put_state(self, host_state):
    return flax.jax_utils.replicate(jax.tree.map(_local_value, host_state))

  def get_state(self, state):
    def to_global(x):  # The local copies [1, ...] of each device become one global array.
      copies = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, copies)
    return jax.tree.map(to_global, state)

  def put_batch(self, batch: dict) -> dict:
    n = jax.local_device_count()
    sharding = NamedSharding(self.local_mesh, P(AXIS))
    return {k: jax.device_put(v.reshape((n, -1) + v.shape[1:]), sharding)
            for k, v in batch.items()}

  def first(self, tree):
    return jax.tree.map(lambda x: _local_value(x)[0] if isinstance(x, jax.Array)
                        else np.asarray(x)[0], tree)

  def device_dataset(self, config) -> device_input.DeviceDataset:
    return device_input.DeviceDataset(config, self.local_mesh, stacked=True)


# Leaves with fewer elements are replicated under fsdp: biases, norms, scalars.
FSDP_MIN_SIZE = 2**12


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
  """Where `fsdp` shards a leaf of `shape`: on its largest axis that `num_devices` divides
  (the first such axis on a tie); replicated when none does or the leaf is small."""
  if num_devices == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  divisible = [a for a, d in enumerate(shape) if d % num_devices == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda a: (shape[a], -a))
  return P(*([None] * axis), AXIS)


class FsdpParallel(DataParallel):
  """`parallelism: fsdp`: parameters, optimizer state and EMA sharded over the `data` axis
  (each leaf as `fsdp_spec` says), the batch too, and the steps written for the global
  batch (`axis_name=None`) under plain `jax.jit`: the compiler gathers each parameter where
  it is used and reduce-scatters its gradient. Each device holds 1/n of the state."""

  kind = "fsdp"

  def __init__(self, train_fn: Callable, eval_fn: Callable,  # pylint: disable=W0231
               abstract_state: Callable[[], Any]):
    self._global_mesh()
    self._state_sharding = self.state_sharding(abstract_state())
    options = xla_options.compiler_options()
    self.train_step = jax.jit(
        functools.partial(train_fn, axis_name=None), donate_argnums=0,
        out_shardings=(self._state_sharding, self.replicated), compiler_options=options)
    self.eval_step = jax.jit(functools.partial(eval_fn, axis_name=None),
                             out_shardings=self.replicated, compiler_options=options)

  def state_sharding(self, state):
    n = self.mesh.size
    return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(x.shape, n)), state)


def data_parallel(kind: str, train_fn: Callable, eval_fn: Callable,
                  abstract_state: Callable[[], Any] | None = None) -> DataParallel:
  """The runner of `config.parallelism`; `fsdp` needs `abstract_state` (a function giving
  the train state's shapes) to lay out the state."""
  if kind not in PARALLELISMS:
    raise ValueError(f"config.parallelism={kind!r}; allowed: {', '.join(PARALLELISMS)}")
  if kind == "fsdp":
    return FsdpParallel(train_fn, eval_fn, abstract_state)
  return {"shard_map": DataParallel, "pmap": PmapParallel}[kind](train_fn, eval_fn)


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
    dataset = parallel.device_dataset(config)
    return (dataset.batch(step) for step in itertools.count(start_step))
  return prefetch(input_pipeline.train_batches(config, start_step), parallel.put_batch)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for bad values, before anything is built or written: every field's own
  rules (`validation.validate`, which launch.py also runs before JAX starts), then what
  depends on the devices. The model's sizes are checked once more by tracing it, in
  `build`."""
  validation.validate(config)
  init_from.validate(config.init_from)
  input_pipeline.per_host_batch_size(config.batch_size)
  devices = jax.device_count()
  accum = config.optimizer.grad_accum_steps
  if accum < 1 or config.batch_size % (devices * accum):
    raise ValueError(f"config.optimizer.grad_accum_steps={accum}; allowed: a positive number "
                     f"of micro-batches that divides each device's share of "
                     f"config.batch_size={config.batch_size} ({devices} devices)")
  if config.eval_batch_size > 0 and config.eval_batch_size % devices:
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size}; allowed: -1 (the "
                     f"batch_size) or a multiple of the number of devices ({devices})")


@dataclasses.dataclass
class Experiment:
  """Everything a run of a config is made of, assembled once by `build`.

  The trainer, the benchmark and the tests run `parallel.train_step` and
  `parallel.eval_step` of this object, so that they time and test what the trainer runs.
  """

  config: ml_collections.ConfigDict
  info: input_pipeline.DatasetInfo
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps_per_epoch: int
  total_steps: int
  parallel: DataParallel
  init_rng: jax.Array  # Key of the parameter initialisation.
  rng: jax.Array  # Raw key data of the base dropout key, passed to every train step.
  # With an attention kernel (model.attention_impl), what each attention call of the train
  # step runs (`layers.recorded_attention`); empty with `xla`.
  attention: list = dataclasses.field(default_factory=list)
  # The steps as written, before a runner wraps them: train_fn(state, batch, rng, *,
  # axis_name) and eval_fn(variables, batch, *, axis_name) (what tests export for other
  # platforms, with axis_name=None: one program for the global batch).
  train_fn: Callable | None = None
  eval_fn: Callable | None = None

  @property
  def image_shape(self) -> tuple[int, int, int, int]:
    return (1, self.config.image_size, self.config.image_size, 3)

  def _create(self, rng):
    return create_train_state(self.model, self.tx, self.image_shape, rng,
                              ema=bool(self.config.optimizer.ema_decay))

  def abstract_state(self) -> TrainState:
    """Shapes and dtypes of the train state, traced, not computed."""
    return jax.eval_shape(self._create, self.init_rng)

  def init_state(self) -> TrainState:
    """The initial train state, on the host's default device."""
    return jax.jit(self._create)(self.init_rng)

  def warm_start(self, state: TrainState) -> tuple[TrainState, str]:
    """`state` with the weights of `config.init_from` (fitted to this model), a fresh
    optimizer state and the EMA starting from them; and where the weights came from."""
    path, layout = self.config.init_from.path, self.config.init_from.layout
    try:
      variables, source = init_from.load(self.config, self.model, model_variables(state))
    except ValueError as e:  # What the file holds does not fit: the error names the file.
      if path in str(e) or validation.names_a_field(str(e)):
        raise
      raise ValueError(f"config.init_from.path={path!r} (config.init_from.layout="
                       f"{layout!r}): {e}") from e
    params = variables["params"]
    return state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                         opt_state=self.tx.init(params),
                         ema_params=jax.tree.map(jnp.copy, params) if state.ema_params
                         else {}), source

  def eval_variables(self, state: TrainState, ema: bool = False) -> dict:
    """What `parallel.eval_step` takes, from a device state."""
    return model_variables(state, ema)


def build(config: ml_collections.ConfigDict,
          info: input_pipeline.DatasetInfo | None = None) -> Experiment:
  """Validates `config` and assembles its model, optimizer and compiled-on-first-use steps.

  `info` (class count, split sizes) is read from the dataset when not given. Every model
  field is checked by tracing the model's initialisation (shapes only: nothing is compiled),
  so that a size the model cannot take is an error here, naming the field.
  """
  validate_config(config)
  info = info or input_pipeline.dataset_info(config)
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else math.ceil(config.num_epochs * steps_per_epoch))
  model = build_model(config.model, info.num_classes, DTYPES[config.dtype])
  tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch, total_steps)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  normalisation = input_pipeline.normalisation(config.dataset)
  augmentation = augment.from_config(config, info.num_classes, steps_per_epoch,
                                     *normalisation)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           augmentation=augmentation,
                           ema_decay=config.optimizer.ema_decay,
                           grad_accum_steps=config.optimizer.grad_accum_steps,
                           skip_nonfinite=config.nonfinite == "skip")
  create = functools.partial(create_train_state, model, tx,
                             (1, config.image_size, config.image_size, 3),
                             ema=bool(config.optimizer.ema_decay))
  evaluate = functools.partial(eval_step, model=model, normalisation=normalisation)
  parallel = data_parallel(config.parallelism, step, evaluate,
                           abstract_state=lambda: jax.eval_shape(create, init_rng))
  experiment = Experiment(config=config, info=info, model=model, tx=tx, schedule=schedule,
                          steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                          parallel=parallel, init_rng=init_rng,
                          rng=jax.random.key_data(dropout_rng), train_fn=step,
                          eval_fn=evaluate)
  if config.model.get("attention_impl", "xla") != "xla":
    experiment.attention = _trace_attention(experiment, step)
  else:
    experiment.abstract_state()  # Raises the model's own errors for sizes it cannot take.
  return experiment


def _trace_attention(experiment: Experiment, step: Callable) -> list[dict]:
  """Traces the model's initialisation and the train step (shapes only: nothing is lowered
  or compiled) so that an attention kernel that cannot take a shape fails here, before
  anything is written, as a ValueError naming `model.attention_impl`; returns each attention
  call's implementation in the train step (`layers.recorded_attention`)."""
  batch = experiment.config.batch_size // jax.device_count()
  images = jax.ShapeDtypeStruct((batch,) + experiment.image_shape[1:], jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  impl = experiment.config.model.attention_impl
  with layers.recorded_attention() as calls:
    try:
      state = experiment.abstract_state()  # The model's own errors, as without a kernel.
      del calls[:]  # The train step's calls, not the initialisation's.
      jax.eval_shape(functools.partial(step, axis_name=None), state,
                     {"image": images, "label": labels}, experiment.rng)
    except (NotImplementedError, ValueError) as e:
      shapes = "; ".join(f"{c['module']}: {c['queries']} x {c['keys']} tokens, head_dim "
                         f"{c['head_dim']}" for c in calls[-1:])
      raise ValueError(f"model.attention_impl={impl!r} cannot take the attention at "
                       f"{shapes or 'the first call'} in {experiment.config.dtype}: "
                       f"{str(e).splitlines()[0]}; allowed: xla, or auto (the fused "
                       "kernel only where a call can use it)") from e
  return calls


def attention_summary(calls: list[dict]) -> str:
  """One line per (implementation, tokens, head width) of `Experiment.attention`."""
  counts = collections.Counter((c["implementation"], c["queries"], c["keys"], c["head_dim"])
                               for c in calls)
  return "; ".join(f"{impl} for {n} call(s) of {q} x {k} tokens, head_dim {d}"
                   for (impl, q, k, d), n in counts.items())


def _shaping_fields(config_json: dict) -> dict:
  out = {}
  for field in _CHECKPOINT_SHAPING_FIELDS:
    value = config_json
    for part in field.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    out[field] = value
  return out


def _check_workdir(config, workdir: str, has_checkpoint: bool) -> dict | None:
  """Refuses to resume a workdir whose checkpoints were made for another model or data,
  before anything in it is touched; returns the saved config of a run to resume."""
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoint and os.path.exists(path)):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved_config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not the JSON config a run writes ({e}); allowed: a workdir "
                     "written by launch.py, or a new --workdir") from e
  if not isinstance(saved_config, dict):
    raise ValueError(f"{path} is not the JSON config a run writes (a "
                     f"{type(saved_config).__name__}); allowed: a workdir written by "
                     "launch.py, or a new --workdir")
  saved = _shaping_fields(saved_config)
  current = _shaping_fields(json.loads(config.to_json_best_effort()))
  for field in _CHECKPOINT_SHAPING_FIELDS:
    if saved[field] != current[field]:
      raise ValueError(
          f"config.{field} differs from the run whose checkpoints are in {workdir} "
          f"(saved: {saved[field]!r}, now: {current[field]!r}); use a new --workdir, or the "
          "saved value to resume.")
  return saved_config


def _input_pipeline_of_run(config, saved_config: dict | None) -> str:
  """The input pipeline this run uses: a resumed run keeps the one it started with (another
  pipeline is another data order), whatever `auto` would pick on this machine."""
  saved = (saved_config or {}).get("input_pipeline")
  if saved not in ("device", "tfdata"):
    return device_input.resolve(config)
  if config.input_pipeline not in ("auto", saved):
    raise ValueError(f"config.input_pipeline={config.input_pipeline!r}, but the run being "
                     f"resumed was trained with {saved!r}, and another pipeline gives another "
                     f"data order; allowed: 'auto' or {saved!r} (or a new --workdir)")
  return saved


class _Preemption:
  """Turns SIGTERM (what TPU and cloud schedulers send before they stop a machine) into a
  flag that the train loop reads after each step (`stop_after`): it then saves and returns
  cleanly. Under several processes JAX's own preemption service catches the signal on any
  of them and agrees on one step at which every process stops (a save is collective)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def stop_after(self, step: int) -> bool:
    """Whether the run saves and stops after `step` (called after every step)."""
    if jax.process_count() > 1:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_run_files(config, workdir: str, info: input_pipeline.DatasetInfo) -> None:
  """The resolved config (`config.json`) and what a consumer of the checkpoints needs to
  rebuild the model and feed it raw images (`model.json`)."""
  mean, std = input_pipeline.normalisation(config.dataset)
  model_info = {"model": config.model.to_dict(), "num_classes": int(info.num_classes),
                "image_size": int(config.image_size), "dtype": config.dtype,
                "dataset": config.dataset, "class_names": list(info.class_names) or None,
                "mean": list(mean), "std": list(std),
                "input": "(pixels / 255 - mean) / std, [batch, image_size, image_size, 3]"}
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "model.json"), "w", encoding="utf-8") as f:
    json.dump(model_info, f, indent=2, default=list)


def evaluate_split(parallel: DataParallel, variables: dict,
                   eval_split: input_pipeline.EvalSplit) -> dict:
  """Mean loss, top-1 and top-5 over every example of `eval_split` (and `num_examples`),
  for device `variables` as `Experiment.eval_variables` gives them: the trainer's eval,
  also run by `python -m efficient_vit.evaluate` on a checkpoint."""
  sums = None
  for batch in eval_split:
    out = parallel.first(parallel.eval_step(variables, parallel.put_batch(batch)))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  count = sums.pop("count")
  metrics = {k: v / count for k, v in sums.items()}
  metrics["num_examples"] = count
  return metrics


class NonFiniteError(FloatingPointError):
  """The loss, a gradient or the updated state became NaN or infinite
  (config.nonfinite='stop')."""


class _IntervalMetrics:
  """The train metrics of the steps since the last log, averaged when written (as flax's
  examples do), and the guard on non-finite steps.

  Each step's `finite` flag is read one step late, so that the host never waits for the
  step it has just dispatched; `check_all` reads the rest (before a save or a log).
  """

  def __init__(self, parallel: DataParallel, nonfinite: str):
    self.parallel = parallel
    self.nonfinite = nonfinite
    self.steps: list[tuple[int, Any]] = []  # (step number, device metrics)
    self.checked = 0
    self.nonfinite_steps = 0

  def add(self, step: int, metrics) -> None:
    self.steps.append((step, metrics))
    self._check(len(self.steps) - 1)

  def check_all(self) -> None:
    self._check(len(self.steps))

  def _check(self, upto: int) -> None:
    for step, metrics in self.steps[self.checked:upto]:
      if self.parallel.first(metrics["finite"]) < 1.0:
        if self.nonfinite == "stop":
          loss = float(self.parallel.first(metrics["loss"]))
          grad_norm = float(self.parallel.first(metrics["grad_norm"]))
          what = (f"the loss ({loss}) or a gradient is not finite"
                  if not (math.isfinite(loss) and math.isfinite(grad_norm)) else
                  "the updated parameters or optimizer state are not finite, or too large "
                  "for float32 (the update overflowed)")
          raise NonFiniteError(
              f"step {step}: {what}; stopping before anything of this step is saved. Lower "
              "optimizer.learning_rate, clip gradients (optimizer.grad_clip_norm), or set "
              "config.nonfinite='skip' to skip such steps.")
        self.nonfinite_steps += 1
    self.checked = max(self.checked, upto)

  def mean(self) -> dict:
    """Mean over the interval's finite steps; resets the interval."""
    self.check_all()
    records = [self.parallel.first(m) for _, m in self.steps]
    kept = [r for r in records if r["finite"] >= 1.0] or records
    names = [k for k in records[-1] if k not in ("finite", "learning_rate")]
    out = {k: float(np.mean([r[k] for r in kept])) for k in names}
    out["learning_rate"] = float(records[-1]["learning_rate"])
    if self.nonfinite == "skip":
      out["skipped_steps"] = float(self.nonfinite_steps)
    self.steps, self.checked, self.nonfinite_steps = [], 0, 0
    return out


class Preempted(Exception):
  """SIGTERM stopped the run: after saving step `step`, or (`step` None) before its first
  step, with nothing to save. The same command resumes it."""

  def __init__(self, step: int | None, total_steps: int):
    self.step, self.total_steps = step, total_steps
    super().__init__(
        f"SIGTERM: saved step {step} of {total_steps} and stopped; the same command resumes "
        "the run" if step is not None else
        "SIGTERM before the first step: stopped, nothing trained or saved; the same command "
        "starts the run")


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk); the earlier ones are intact."""

  def __str__(self):
    return self.strerror


# Errors of the input (config, files, dataset) that launch.py reports in one line when they
# arrive before the first train step (`before_first_step`).
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def before_first_step(error: BaseException) -> bool:
  """Whether `train_and_evaluate` raised `error` before its first train step."""
  return getattr(error, "_before_first_step", False)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns the metrics of the final evaluation (with `ema_`-prefixed copies for the EMA
  parameters when optimizer.ema_decay > 0). Raises `Preempted` when SIGTERM stopped it,
  `run_lock.WorkdirBusy` when another live run holds `workdir`, `NonFiniteError`,
  `CheckpointSaveError`; a ValueError or FileNotFoundError raised before the first step
  (a bad config value or input file) is marked so (`before_first_step`).
  """
  started = []  # Appended to when the first train step has been dispatched.
  with contextlib.ExitStack() as cleanup:
    try:
      return _train_and_evaluate(config, workdir, cleanup, started)
    except INPUT_ERRORS as e:
      if not started:
        e._before_first_step = True  # pylint: disable=protected-access
      raise


def _latest_step(checkpoint_dir: str) -> int | None:
  """The latest complete checkpoint's step; an error naming the folder when what is there
  cannot be read as checkpoints."""
  if not os.path.isdir(checkpoint_dir):
    return None
  try:
    with ocp.CheckpointManager(checkpoint_dir) as reader:
      return reader.latest_step()
  except (ValueError, OSError, KeyError, TypeError) as e:
    raise ValueError(f"{checkpoint_dir} holds something that is not this project's "
                     f"checkpoints ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                     "allowed: a workdir written by launch.py, or a new --workdir") from e


def _bytes_needed(tree) -> int:
  """About what a checkpoint of `tree` takes on disk: its arrays (compression saves ~7% on
  trained float32), plus Orbax's metadata (measured: ~70 KiB, and 1.5-4.2 KiB per leaf)."""
  leaves = jax.tree.leaves(tree)
  return (sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
          + 64 * 1024 + 5 * 1024 * len(leaves))


def _check_free_space(checkpoint_dir: str, step: int, needed: int) -> None:
  free = shutil.disk_usage(checkpoint_dir).free
  if free < needed:
    raise CheckpointSaveError(
        errno.ENOSPC, f"no space to save the checkpoint of step {step} in {checkpoint_dir}: "
        f"it needs about {needed:,} bytes, {free:,} are free; the earlier checkpoints are "
        "intact (free space, or use another --workdir, and run the same command to resume)")


def _save_error(error: BaseException, checkpoint_dir: str, step: int,
                needed: int) -> BaseException | None:
  """A `CheckpointSaveError` for a full disk, quota or read-only file system anywhere in
  the chain of `error` raised by Orbax while writing step `step` (an OSError, or
  TensorStore's ValueError with its `os_error_code`); None for any other error."""
  seen = error
  while seen is not None:
    code = seen.errno if isinstance(seen, OSError) else None
    found = _TENSORSTORE_OS_ERROR.search(str(seen))
    code = code or (int(found[1]) if found else None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
      return CheckpointSaveError(
          code, f"saving the checkpoint of step {step} in {checkpoint_dir} failed: "
          f"{os.strerror(code)} (it needs about {needed:,} bytes, "
          f"{shutil.disk_usage(checkpoint_dir).free:,} are free); the earlier checkpoints "
          "are intact")
    seen = seen.__cause__ or seen.__context__
  return None


_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        cleanup: contextlib.ExitStack, started: list) -> dict:
  experiment = build(config)  # Every validation happens here, before anything is written.
  if experiment.attention and jax.process_index() == 0:
    print(f"attention: {attention_summary(experiment.attention)}", flush=True)
  parallel, total_steps = experiment.parallel, experiment.total_steps
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else experiment.steps_per_epoch)
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  checkpoint = {"state": experiment.abstract_state(), "rng": _local_value(experiment.rng)}
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  main_process = jax.process_index() == 0
  # One run per workdir, taken before anything in it is read for resuming or written: a
  # second launch is refused while this one lives. Process 0 holds it for all processes.
  busy = None
  if main_process:
    try:
      cleanup.enter_context(run_lock.RunLock(workdir))
    except run_lock.WorkdirBusy as e:
      busy = e
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
      np.int32(busy is not None)):
    busy = busy or run_lock.WorkdirBusy(f"workdir {workdir} is in use by another run "
                                        "(process 0 was refused its lock)")
  if busy is not None:
    raise busy
  latest = _latest_step(checkpoint_dir)
  saved_config = _check_workdir(config, workdir, latest is not None)
  config = config.copy_and_resolve_references()  # The resolved config, as config.json has it.
  config.input_pipeline = _input_pipeline_of_run(config, saved_config)
  if latest is None:  # A new run: its initial state, before anything is written.
    checkpoint["state"] = experiment.init_state()
    if config.init_from.path:
      checkpoint["state"], source = experiment.warm_start(checkpoint["state"])
      print(f"initialised from {source}", flush=True)

  os.makedirs(workdir, exist_ok=True)
  manager = ocp.CheckpointManager(
      checkpoint_dir,
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  # What a SIGKILL left half-written (never a checkpoint: Orbax skips it). Under the lock:
  # no live run's save in progress is ever removed.
  if main_process:
    for name in os.listdir(checkpoint_dir):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
    _write_run_files(config, workdir, experiment.info)
  if latest is not None:
    # Restored straight into this run's layout, whatever the device count, process count
    # or parallelism of the run that wrote it.
    shardings = {"state": parallel.state_sharding(checkpoint["state"]),
                 "rng": parallel.replicated}
    abstract = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sharding), checkpoint, shardings)
    try:
      checkpoint = manager.restore(latest, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(abstract)))["train"]
    except (ValueError, OSError, KeyError, TypeError) as e:
      raise ValueError(
          f"the checkpoint of step {latest} in {checkpoint_dir} cannot be read "
          f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); allowed: a checkpoint "
          f"this project wrote (move {os.path.join(checkpoint_dir, str(latest))} away to "
          "resume from the one before it), or a new --workdir") from e
    logging.info("Resumed from step %d of %s.", latest, workdir)
    if main_process:
      print(f"resumed from step {latest}", flush=True)
  if main_process:  # Steps after the checkpoint (all, for a new run) are logged again below.
    metric_logging.drop_after(workdir, 0 if latest is None else latest)
  state = parallel.put_state(checkpoint["state"])
  rng = _local_value(checkpoint["rng"])
  # What checkpoints hold: a global array, never a host-local one.
  saved_rng = jax.device_put(rng, parallel.replicated)
  start_step = int(_local_value(checkpoint["state"].step))
  num_params = cost.count_params(checkpoint["state"].params)
  del checkpoint
  devices = jax.devices()
  print_main = print if main_process else lambda *args, **kwargs: None
  print_main(f"model {config.model.name}: {num_params:,} parameters; {len(devices)} "
             f"{devices[0].platform} devices ({devices[0].device_kind}) in "
             f"{jax.process_count()} process(es), parallelism {parallel.kind}, input pipeline "
             f"{config.input_pipeline}", flush=True)

  logger = metric_logging.MetricLogger(workdir)
  batches = batch_source(config, parallel, start_step)
  eval_split = input_pipeline.EvalSplit(config)
  interval = _IntervalMetrics(parallel, config.nonfinite)
  ema = bool(config.optimizer.ema_decay)

  def evaluate(step: int) -> dict:
    results = {}
    for name, use_ema in (("eval", False), ("eval_ema", True))[:1 + ema]:
      metrics = evaluate_split(parallel, experiment.eval_variables(state, ema=use_ema),
                               eval_split)
      logger.write(step, name, metrics)
      prefix = "" if name == "eval" else "ema_"
      results.update({prefix + k: v for k, v in metrics.items()})
    return results

  def save(step: int) -> None:
    interval.check_all()  # Never a checkpoint with a non-finite value in it.
    item = {"state": parallel.get_state(state), "rng": saved_rng}
    needed = _bytes_needed(item)
    try:
      manager.wait_until_finished()  # The previous save's error, if any, surfaces here...
    except Exception as e:  # pylint: disable=broad-except
      raise _save_error(e, checkpoint_dir, saving[0], needed) or e
    _check_free_space(checkpoint_dir, step, needed)  # ...and this one is refused early.
    saving[:] = [step, needed]
    try:
      manager.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(item)))
    except Exception as e:  # pylint: disable=broad-except
      raise _save_error(e, checkpoint_dir, step, needed) or e

  saving = [None, 0]  # The step and size of the save in flight.

  progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=1.0)
  eval_metrics, preempted = {}, None
  timer_step, timer_start = None, None
  try:
    with _Preemption() as preemption:
      for step in range(start_step, total_steps):
        state, metrics = parallel.train_step(state, next(batches), rng)
        if not started:
          started.append(step)
          if preemption.requested:  # SIGTERM while the first step compiled: not taken.
            raise Preempted(None, total_steps)
        if parallel.block_each_step:
          jax.block_until_ready(metrics)
        done = step + 1
        interval.add(done, metrics)
        progress.update(1)
        if timer_step is None:  # The first step compiles: time from its end on.
          jax.block_until_ready(metrics)
          timer_step, timer_start = done, time.perf_counter()
        if done % config.log_every_steps == 0 or done == total_steps:
          metrics = interval.mean()
          elapsed = time.perf_counter() - timer_start
          if done > timer_step:
            metrics["img_per_sec"] = (done - timer_step) * config.batch_size / elapsed
          timer_step, timer_start = done, time.perf_counter()
          logger.write(done, "train", metrics)
          progress.set_postfix(loss=f"{metrics['loss']:.3f}", top1=f"{metrics['top1']:.3f}")
        if done % eval_every == 0 or done == total_steps:
          interval.check_all()
          eval_metrics = evaluate(done)
          progress.write(f"step {done}: eval loss {eval_metrics['loss']:.4f} "
                         f"top1 {eval_metrics['top1']:.4f} top5 {eval_metrics['top5']:.4f}")
          timer_step, timer_start = done, time.perf_counter()
        stop = preemption.stop_after(done)  # Every step: under several processes, a vote.
        if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
          save(done)
        if stop and done < total_steps:
          preempted = Preempted(done, total_steps)
          break
    if start_step >= total_steps and not eval_metrics:
      eval_metrics = evaluate(start_step)
  finally:
    progress.close()
    try:
      manager.wait_until_finished()  # A save in flight completes even when the run stops.
    except Exception as e:  # pylint: disable=broad-except
      error = _save_error(e, checkpoint_dir, saving[0], saving[1])
      if error is None:
        raise
      raise error from None
    finally:
      manager.close()
      logger.close()
  if preempted is not None:
    raise preempted
  return eval_metrics
