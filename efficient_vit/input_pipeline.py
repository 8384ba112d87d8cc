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

`config.dataset` is a TFDS name or a folder of images laid out as `root/<split>/<class>/
*.jpg|jpeg|png` (read by TFDS's `ImageFolder` builder: the class names are the folder names,
sorted; splits are the subfolders, sliced as TFDS slices: `train[:90%]`).

Batches are dicts of numpy arrays: `image` uint8 [batch, H, W, C] (normalised by the
steps, `normalisation` gives the mean and std), `label` int32 [batch] and, for eval,
`mask` float32 [batch].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
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
  class_names: tuple[str, ...] = ()  # Index -> name, from the label feature or the folders.


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


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # What tfds.ImageFolder reads.
# The first bytes of the files tfds.ImageFolder reads: JPEG's SOI marker and PNG's signature.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def is_folder(dataset: str) -> bool:
  """Whether `dataset` names a folder of images rather than a TFDS dataset: a path (it has a
  separator, or starts with `.` or `~`), or an existing directory that is no TFDS name."""
  path = os.path.expanduser(dataset)
  if os.sep in dataset or dataset.startswith((".", "~")):
    return True
  return os.path.isdir(path) and dataset not in tfds.list_builders()


def _check_image_files(root: str) -> None:
  """A FileNotFoundError or ValueError naming the path of a folder dataset that TFDS's
  ImageFolder would read wrongly or fail on mid-run: no split folders, or a file that is no
  JPEG or PNG (its first bytes are read, so this costs one small read per file)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.dataset={root!r} is not a directory; allowed: a TFDS "
                            "name, or a folder of images laid out as root/<split>/<class>/"
                            "*.jpg|png")
  splits = [e for e in sorted(os.scandir(root), key=lambda e: e.name) if e.is_dir()]
  if not splits:
    raise ValueError(f"config.dataset={root!r} has no split folders; allowed: a folder laid "
                     "out as root/<split>/<class>/*.jpg|png (e.g. root/train/cat/1.jpg)")
  for split in splits:
    for label in os.scandir(split.path):
      if not label.is_dir():
        continue
      for entry in os.scandir(label.path):
        if entry.name.lower().endswith(_IMAGE_SUFFIXES):
          with open(entry.path, "rb") as f:
            head = f.read(8)
          if not head.startswith(_IMAGE_SIGNATURES):
            raise ValueError(f"config.dataset={root!r}: {entry.path} is not a JPEG or PNG "
                             "image (unreadable); allowed: .jpg/.jpeg/.png files that hold "
                             "such images")


@functools.lru_cache(maxsize=8)
def _folder_builder(root: str) -> tfds.core.DatasetBuilder:
  """The ImageFolder builder of `root`, checked once (it lists every file when made)."""
  _check_image_files(root)
  return tfds.ImageFolder(root)


def _builder(config) -> tfds.core.DatasetBuilder:
  if is_folder(config.dataset):
    return _folder_builder(os.path.abspath(os.path.expanduser(config.dataset)))
  try:
    return tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={config.dataset!r} is not a TFDS dataset "
                     "(for example cifar10, cifar100, imagenet2012, tf_flowers)") from e


def _folder_dataset(config, split: str, **kwargs) -> tf.data.Dataset:
  """A folder dataset's split as TFDS reads it: ImageFolder reads whole splits only, so a
  slice (`train[:90%]`, `train+test`) is TFDS's own instruction applied with skip / take."""
  builder = _builder(config)
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  parts = [builder.as_dataset(split=i.splitname, **kwargs).skip(i.from_ or 0).take(
      -1 if i.to is None else i.to - (i.from_ or 0)) for i in instructions]
  return functools.reduce(tf.data.Dataset.concatenate, parts)


def read_split(config, split: str, share: str | None = None, **kwargs) -> tf.data.Dataset:
  """The examples of `split` (a TFDS split spec) that this host reads: all of them
  (`share=None`), its share of the train split (`train`: tfds.split_for_jax_process) or its
  even share of an eval split (`eval`: tfds.even_splits, nothing dropped)."""
  hosts, index = jax.process_count(), jax.process_index()
  if not is_folder(config.dataset):
    if share == "train":
      split = tfds.split_for_jax_process(split)
    elif share == "eval":
      split = tfds.even_splits(split, n=hosts, drop_remainder=False)[index]
    return _as_dataset(config, split, **kwargs)
  ds = _folder_dataset(config, split, **kwargs)
  return ds.shard(hosts, index) if share and hosts > 1 else ds


def _first_undecodable(config, split: str) -> str | None:
  """The first file of a folder dataset's split that TensorFlow cannot decode (one eager
  decode per file: run only once reading has failed)."""
  examples = _folder_dataset(config, split, decoders={"image": tfds.decode.SkipDecoding()})
  for example in examples:
    try:
      tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
      return example["image/filename"].numpy().decode()
  return None


def as_numpy(config, split: str, ds: tf.data.Dataset) -> Iterator:
  """`tfds.as_numpy(ds)` of a pipeline over `split`; for a folder dataset, a file that passed
  the start-up check but cannot be decoded stops it with a ValueError naming the file,
  instead of TensorFlow's error without it."""
  try:
    yield from tfds.as_numpy(ds)
  except tf.errors.InvalidArgumentError as e:
    path = _first_undecodable(config, split) if is_folder(config.dataset) else None
    if path is None:
      raise
    raise ValueError(f"config.dataset={config.dataset!r}: {path} cannot be decoded "
                     f"({e.message.splitlines()[0].strip()}); allowed: readable JPEG or PNG "
                     "files (remove or replace it)") from None


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


def _split_names(spec: str) -> list[str]:
  """The split names in a TFDS split spec: `train[:90%]+test` -> [train, test]."""
  return [part.split("[")[0].strip() for part in spec.split("+")]


def check_split(config, field: str) -> int:
  """The number of examples of the split that `config.<field>` names; a ValueError naming
  the field and the dataset's splits when it names none of them or holds no example (a
  FileNotFoundError naming the folder, for a folder dataset without it)."""
  spec = getattr(config, field)
  splits = _builder(config).info.splits
  if not splits:  # Sizes unknown until read (tfds.testing.mock_data).
    return _num_examples(config, spec)
  allowed = ", ".join(name for name, info in splits.items() if info.num_examples)
  if is_folder(config.dataset):
    for name in _split_names(spec):
      folder = os.path.join(os.path.abspath(os.path.expanduser(config.dataset)), name)
      if name and not os.path.isdir(folder):
        raise FileNotFoundError(f"config.{field}={spec!r}: {folder} does not exist; allowed: "
                                f"{allowed} (the split folders with images)")
      if name and (name not in splits or not splits[name].num_examples):
        raise ValueError(f"config.{field}={spec!r}: {folder} has no images (.jpg, .jpeg, "
                         f".png in {folder}/<class>/); allowed: {allowed}")
  try:
    num = splits[spec].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f"config.{field}={spec!r}; allowed: {allowed}, or slices of them "
                     "(train[:90%])") from e
  if num <= 0:
    raise ValueError(f"config.{field}={spec!r} holds no examples; allowed: {allowed}, or a "
                     "non-empty slice of them")
  return num


def dataset_info(config) -> DatasetInfo:
  features = _builder(config).info.features
  for name in ("image", "label"):
    if name not in features:
      raise ValueError(f"config.dataset={config.dataset!r} has no {name!r} feature; "
                       "an image-classification dataset with 'image' and 'label' is needed")
  return DatasetInfo(num_classes=features["label"].num_classes,
                     num_train_examples=check_split(config, "train_split"),
                     num_eval_examples=check_split(config, "eval_split"),
                     class_names=tuple(features["label"].names))


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


def eval_preprocess(config, image: tf.Tensor) -> tf.Tensor:
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
  ds = read_split(config, config.train_split, "train", shuffle_files=False,
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
  yield from as_numpy(config, config.train_split, stream)


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
    self._config = config
    decode = _decoder(config)

    def preprocess(example):
      image, label = decode(example)
      return {"image": eval_preprocess(config, image), "label": tf.cast(label, tf.int32),
              "mask": tf.ones((), tf.float32)}

    ds = read_split(config, config.eval_split, "eval", shuffle_files=False,
                    decoders={"image": tfds.decode.SkipDecoding()})
    self._dataset = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).batch(
        self.batch).prefetch(tf.data.AUTOTUNE)
    self._image_shape = (config.image_size, config.image_size,
                         self._dataset.element_spec["image"].shape[-1])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    produced = 0
    for real in as_numpy(self._config, self._config.eval_split, self._dataset):
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
