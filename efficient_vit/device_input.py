"""Device-resident input path for datasets that fit in accelerator memory (CIFAR).

The train split is read from TFDS once, brought to the size the step takes
(`input_pipeline.input_size`, the same resize as the tf.data path), kept on the devices as
uint8 and sharded over the `data` axis: each device holds 1/n of the examples. Every step,
inside one jitted function, each device draws its share of the batch from its own examples
in the order of a per-epoch random permutation, so the host does no per-step work and
nothing crosses the host-device link. Batches are uint8, as the tf.data path's: the train
step augments and normalises them (efficient_vit/augment.py), whichever path they came by.

The order is a function of (seed, device, step), so a resumed run draws the same batches
as one that never stopped. Examples are split over devices once, so an epoch permutes
each device's examples rather than the whole split.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_vit import input_pipeline

AXIS = "data"
# A split may take at most this fraction of one device's memory.
_MAX_MEMORY_FRACTION = 0.25
_MAX_BYTES_WITHOUT_MEMORY_STATS = 4 << 30


def split_bytes(config) -> int | None:
  """uint8 bytes of the train split, or None when its images differ in size (a folder of
  images is resized to one size as it is read, whatever the sizes of its files)."""
  shape = input_pipeline._builder(config).info.features["image"].shape
  if any(d is None for d in shape) and not input_pipeline.is_folder(config.dataset):
    return None
  num = input_pipeline._num_examples(config, config.train_split)
  return int(num * input_pipeline.input_size(config) ** 2 * shape[-1])


def unsupported_reason(config) -> str | None:
  """Why the device path cannot take `config`, or None if it can."""
  if config.augment.crop == "inception":
    return "augment.crop='inception' (random-resized crops of ImageNet-sized images)"
  size = split_bytes(config)
  if size is None:
    return f"the images of {config.dataset!r} differ in size"
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  budget = (limit * _MAX_MEMORY_FRACTION if limit else _MAX_BYTES_WITHOUT_MEMORY_STATS)
  per_device = size / jax.local_device_count()
  if per_device > budget:
    return (f"its {per_device / 2**30:.1f} GiB per device exceed {budget / 2**30:.1f} GiB "
            f"({_MAX_MEMORY_FRACTION:.0%} of device memory)")
  return None


def resolve(config) -> str:
  """The pipeline `config.input_pipeline` asks for: `auto` is `device` where it fits."""
  if config.input_pipeline == "tfdata":
    return "tfdata"
  reason = unsupported_reason(config)
  if config.input_pipeline == "device" and reason:
    raise ValueError(f"config.input_pipeline='device' cannot take this run: {reason}; "
                     "use input_pipeline='tfdata' (or 'auto').")
  return "tfdata" if reason else "device"


class DeviceDataset:
  """The train split on the devices; `batch(step)` is the global batch of that step.

  `mesh` is the 1-D `data` mesh the batch is sharded over (all devices for shard_map,
  the local ones for pmap; `stacked=True` then gives [devices, batch / devices, ...]).
  """

  def __init__(self, config, mesh: Mesh, stacked: bool = False):
    ds = input_pipeline.read_split(config, config.train_split, "train", shuffle_files=False)
    # `fixed_size` without its one random op (the inception crop, which this path does not
    # take): the same pixels as the tf.data path's.
    ds = ds.map(lambda ex: (input_pipeline.fixed_size(config, ex["image"],
                                                      tf.zeros((2,), tf.int64)), ex["label"]))
    chunks = list(input_pipeline.as_numpy(config, config.train_split, ds.batch(4096)))
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks]).astype(np.int32)
    local = jax.local_device_count()
    keep = len(labels) // local * local  # An equal share per device: drops < local examples.
    sharding = NamedSharding(mesh, P(AXIS))
    self.images = jax.make_array_from_process_local_data(sharding, images[:keep])
    self.labels = jax.make_array_from_process_local_data(sharding, labels[:keep])
    self.examples_per_device = keep // local
    per_device_batch = config.batch_size // mesh.size
    if config.batch_size % mesh.size:
      raise ValueError(f"batch_size={config.batch_size} must be a multiple of the number of "
                       f"devices ({mesh.size})")
    base_key = jax.random.fold_in(jax.random.key(config.seed), 0x1D)

    def draw(images, labels, step):
      """This device's share of step `step`'s batch."""
      n = images.shape[0]
      device = jax.lax.axis_index(AXIS)
      key = jax.random.fold_in(base_key, device)
      first = step.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
      position = first * per_device_batch + jnp.arange(per_device_batch)
      epoch, index = position // n, position % n
      start_epoch = (first * per_device_batch) // n
      # A batch spans at most ceil(batch / n) + 1 epochs; permute each of them.
      spans = math.ceil(per_device_batch / n) + 1
      orders = jnp.stack([jax.random.permutation(jax.random.fold_in(key, start_epoch + e), n)
                          for e in range(spans)])
      chosen = orders[epoch - start_epoch, index]
      batch = {"image": images[chosen], "label": labels[chosen]}
      return jax.tree.map(lambda x: x[None], batch) if stacked else batch

    self._draw = jax.jit(jax.shard_map(draw, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()),
                                       out_specs=P(AXIS), check_vma=False))

  def batch(self, step: int) -> dict:
    return self._draw(self.images, self.labels, jnp.asarray(step, jnp.int32))
