"""TFDS + tf.data input pipelines for image classification.

Train: the split is read in a fixed order, shuffled with a seeded buffer that reshuffles
every epoch, repeated, decoded and brought to one size (`fixed_size`: resize, or the
Inception-style random-resized crop keyed by (seed, example counter)), batched per host
and prefetched. Every other augmentation runs in JAX inside the train step
(efficient_vit/augment.py), the same code for this pipeline and the device-resident one.
Everything random is a function of the seed and the example's position in the stream, so
`train_batches(config, start_step=s)` yields exactly the batches a run that never stopped
would have seen from step s on.

Eval: the whole split exactly once. Each host reads its even share, batches are padded
to full size and carry a `mask` (1 = real example), and every host yields the same number
of batches, so collectives line up and no example is dropped or counted twice.

Batches are dicts of numpy arrays: `image` uint8 [batch, H, W, C] (normalised by the
steps, `normalisation` gives the mean and std), `label` int32 [batch] and, for eval,
`mask` float32 [batch].
"""

from __future__ import annotations

import dataclasses
import math
import socket
import urllib.parse
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from efficient_vit import augment

# TensorFlow only feeds the pipeline: keep it off any accelerator so it never takes
# memory from JAX.
tf.config.set_visible_devices([], "GPU")

# Per-channel mean and std of the training pixels in [0, 1]; other datasets use ImageNet's.
_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CROPS = augment.CROPS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


def _host_unreachable(url: str, timeout: float = 5.0) -> str | None:
  """The host of `url` if a TCP connection to it fails within `timeout` seconds, else None."""
  host = urllib.parse.urlparse(url).hostname
  if not host:
    return None
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return None
  except OSError:
    return host


def _builder(config) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={config.dataset!r} is not a TFDS dataset "
                     "(for example cifar10, cifar100, imagenet2012, tf_flowers)") from e


def _as_dataset(config, split, **kwargs) -> tf.data.Dataset:
  """`builder.as_dataset`, preparing the dataset first if it is missing and may be fetched.

  A missing dataset whose download host cannot be reached is a clear error at once,
  rather than TFDS's minutes of download retries.
  """
  builder = _builder(config)
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError as e:  # TFDS's "could not find data in ..." for unprepared data.
    where = config.data_dir or "the TFDS default data_dir (TFDS_DATA_DIR)"
    if not config.download:
      raise FileNotFoundError(
          f"config.dataset={config.dataset!r} is not prepared in {where} and "
          "config.download=False. Point TFDS_DATA_DIR or --config.data_dir at a prepared "
          "copy, or allow the download.") from e
    host = _host_unreachable(builder.info.homepage or "")
    if host:
      raise FileNotFoundError(
          f"config.dataset={config.dataset!r} is not prepared in {where}, and {host} cannot "
          "be reached to download it. Point TFDS_DATA_DIR or --config.data_dir at a prepared "
          "copy.") from e
    logging.info("Preparing %s in %s (download).", config.dataset, where)
    builder.download_and_prepare()
    return builder.as_dataset(split=split, **kwargs)


def _num_examples(config, split) -> int:
  try:
    return _builder(config).info.splits[split].num_examples
  except KeyError:  # Split sizes unknown (tfds.testing.mock_data): count them.
    return int(_as_dataset(config, split).reduce(0, lambda n, _: n + 1))


def dataset_info(config) -> DatasetInfo:
  features = _builder(config).info.features
  for name in ("image", "label"):
    if name not in features:
      raise ValueError(f"config.dataset={config.dataset!r} has no {name!r} feature; "
                       "an image-classification dataset with 'image' and 'label' is needed")
  return DatasetInfo(num_classes=features["label"].num_classes,
                     num_train_examples=_num_examples(config, config.train_split),
                     num_eval_examples=_num_examples(config, config.eval_split))


def per_host_batch_size(batch_size: int) -> int:
  """The global batch split over hosts; it must divide evenly over every local device."""
  hosts, local = jax.process_count(), jax.local_device_count()
  if batch_size % (hosts * local):
    raise ValueError(f"batch_size={batch_size} must be a multiple of the number of devices "
                     f"({hosts} hosts x {local} local devices)")
  return batch_size // hosts


def normalisation(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of pixels in [0, 1] that the model's inputs are normalised by."""
  return _NORMALISATION.get(dataset, _IMAGENET_NORMALISATION)


def input_size(config) -> int:
  """The side of the uint8 images both pipelines deliver to the train step: the random crop
  of `crop=resize` happens in the step (efficient_vit/augment.py), from this size."""
  if config.augment.crop == "resize" and config.augment.resize_size > 0:
    return config.augment.resize_size
  return config.image_size


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Float image [h, w, c] -> [size, size, c]; the image itself when it has that size."""
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  return tf.cond(tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size)),
                 lambda: image,
                 lambda: tf.image.resize(image, (size, size), method="bilinear",
                                         antialias=True))


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def fixed_size(config, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """A train image brought to one size, uint8 [input_size, input_size, c]: the steps that
  change the array size (resize, or the Inception-style random-resized crop, whose area is
  drawn from `augment.crop_scale`). Every other op runs in the train step."""
  if config.augment.crop == "inception":
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4)), seed, area_range=tuple(config.augment.crop_scale),
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
  return _to_uint8(_resize(image, input_size(config)))


def _eval_preprocess(config, image: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, c] -> uint8 [size, size, c]: resize, or for `inception` crops the usual
  resize to size / eval_crop_fraction and central crop. Normalisation happens in the eval
  step."""
  size, fraction = config.image_size, config.augment.eval_crop_fraction
  if config.augment.crop == "inception" and fraction < 1.0:
    image = _resize(image, int(round(size / fraction)))
    image = tf.image.central_crop(image, size / int(round(size / fraction)))
  return _to_uint8(_resize(image, size))


def _decoder(config):
  image_feature = _builder(config).info.features["image"]
  return lambda example: (image_feature.decode_example(example["image"]), example["label"])


def train_batches(config, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-host training batches, starting at global step `start_step`.

  Epoch e is this host's share of the split shuffled with a seed of (config.seed, e), so
  any position of the stream can be rebuilt without the epochs before it: a resumed run
  reads (without decoding) at most one epoch of records to reach its position, whatever
  the step, and sees exactly the batches an uninterrupted run would have seen.
  """
  augment.validate(config)
  batch = per_host_batch_size(config.batch_size)
  split = tfds.split_for_jax_process(config.train_split)
  ds = _as_dataset(config, split, shuffle_files=False,
                   decoders={"image": tfds.decode.SkipDecoding()})
  num_examples = int(ds.cardinality())
  if num_examples <= 0:  # Unknown (some mock or filtered splits): count the records once.
    num_examples = int(ds.reduce(0, lambda n, _: n + 1))
  first_epoch, offset = divmod(start_step * batch, num_examples)
  buffer = min(config.shuffle_buffer, num_examples)

  def epoch(e):
    order = ds.shuffle(buffer, seed=tf.bitwise.bitwise_xor(
        tf.constant(config.seed, tf.int64) * 1_000_003, e), reshuffle_each_iteration=False)
    # The position of each example in the whole stream, for its augmentation seed.
    return order.enumerate(start=e * num_examples)

  stream = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max // num_examples)
  # Skipping happens before decoding, so resuming costs reading, not decoding.
  stream = stream.flat_map(epoch).skip(offset)
  decode = _decoder(config)
  base_seed = tf.constant([config.seed, jax.process_index()], tf.int64)

  def preprocess(index, example):
    image, label = decode(example)
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return {"image": fixed_size(config, image, seed), "label": tf.cast(label, tf.int32)}

  stream = stream.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  stream = stream.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from tfds.as_numpy(stream)


class EvalSplit:
  """The eval split as padded, masked per-host batches (see the module docstring).

  Built once and iterated once per evaluation, so that TFDS is asked for the split only at
  start-up.
  """

  def __init__(self, config):
    self.batch = per_host_batch_size(config.eval_batch_size if config.eval_batch_size > 0
                                     else config.batch_size)
    hosts = jax.process_count()
    self.num_examples = _num_examples(config, config.eval_split)
    self.num_batches = math.ceil(math.ceil(self.num_examples / hosts) / self.batch)
    split = tfds.even_splits(config.eval_split, n=hosts,
                             drop_remainder=False)[jax.process_index()]
    decode = _decoder(config)

    def preprocess(example):
      image, label = decode(example)
      return {"image": _eval_preprocess(config, image), "label": tf.cast(label, tf.int32),
              "mask": tf.ones((), tf.float32)}

    ds = _as_dataset(config, split, shuffle_files=False,
                     decoders={"image": tfds.decode.SkipDecoding()})
    self._dataset = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).batch(
        self.batch).prefetch(tf.data.AUTOTUNE)
    self._image_shape = (config.image_size, config.image_size,
                         self._dataset.element_spec["image"].shape[-1])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    produced = 0
    for real in tfds.as_numpy(self._dataset):
      pad = self.batch - len(real["label"])
      yield {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
             for k, v in real.items()}
      produced += 1
    for _ in range(produced, self.num_batches):  # Hosts with fewer examples keep collectives
      yield {"image": np.zeros((self.batch,) + self._image_shape, np.uint8),  # aligned.
             "label": np.zeros((self.batch,), np.int32),
             "mask": np.zeros((self.batch,), np.float32)}


def eval_batches(config) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split in padded, masked per-host batches."""
  return iter(EvalSplit(config))
