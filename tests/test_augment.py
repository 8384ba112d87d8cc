"""The one augmentation path (efficient_vit/augment.py): Mixup / CutMix semantics, the
RandAugment / AutoAugment ops, and augmented batches that depend only on (uint8 batch,
seed, step), not on the input pipeline or the number of devices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageEnhance, ImageOps

from efficient_vit import augment, device_input, input_pipeline, train

MEAN, STD = input_pipeline.normalisation("cifar10")
RNG = jax.random.key_data(jax.random.key(7))


def _aug(**fields):
  return augment.Augmentation(image_size=32, num_classes=10, mean=MEAN, std=STD, **fields)


# Compiled once per Augmentation (a frozen, hashable dataclass).
_mix = jax.jit(augment.mix, static_argnums=0)
_mix_params = jax.jit(augment.mix_params, static_argnums=0)


def _images(n=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_mixup_mixes_images_and_labels_with_one_lambda_and_the_mirror():
  aug = _aug(mixup_alpha=0.8, label_smoothing=0.1)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  labels = jnp.arange(8) % 10
  for seed in range(3):
    key = jax.random.key(seed)
    mixed, targets = _mix(aug, images, labels, key, 0)
    lam = float(_mix_params(aug, key, 0)[0])
    assert 0.0 <= lam < 1.0
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    smooth = augment.smooth_one_hot(labels, 10, 0.1)
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)


def test_cutmix_pasted_area_is_the_label_weight_after_clipping():
  aug = _aug(cutmix_alpha=1.0)
  # Example i is the constant i, so each pixel says which example it came from.
  images = jnp.broadcast_to(jnp.arange(8.0)[:, None, None, None], (8, 32, 32, 3))
  labels = jnp.arange(8)
  clipped = 0
  for seed in range(40):
    key = jax.random.key(seed)
    mixed, targets = _mix(aug, images, labels, key, 0)
    _, _, (top, bottom, left, right) = _mix_params(aug, key, 0)
    pasted = np.asarray(mixed[0, ..., 0] == 7.0).mean()  # Example 0's mirror is 7.
    np.testing.assert_allclose(targets[0, 7], pasted, atol=1e-6)
    np.testing.assert_allclose(targets[0, 0], 1 - pasted, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    clipped += int(min(top, left) == 0 or max(bottom, right) == 32)
  assert clipped > 5  # Boxes cut by the border were among those checked.


def test_switching_between_mixup_and_cutmix_follows_its_probability():
  aug = _aug(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.9, mix_switch_prob=0.3)
  keys = jax.random.split(jax.random.key(0), 4000)
  lam, cutmix, _ = jax.jit(jax.vmap(lambda k: augment.mix_params(aug, k, 0)))(keys)
  cutmix = np.asarray(cutmix)
  mixed = (np.asarray(lam) < 1.0) | cutmix  # A CutMix box may round to nothing.
  # Binomial(4000, p): each rate within 0.03 of p has probability > 1 - 1e-4 (> 4 sd).
  assert abs(mixed.mean() - 0.9) < 0.03
  assert abs(cutmix[mixed].mean() - 0.3) < 0.03


def test_mixing_stops_at_the_configured_epoch(tiny_vit_config):
  tiny_vit_config.augment.update(mixup_alpha=0.8, cutmix_alpha=1.0, mix_stop_epoch=2.0)
  aug = augment.from_config(tiny_vit_config, 10, steps_per_epoch=5, mean=MEAN, std=STD)
  assert aug.mix_stop_step == 10
  keys = jax.random.split(jax.random.key(0), 64)
  params = jax.jit(jax.vmap(augment.mix_params, in_axes=(None, 0, None)), static_argnums=0)
  lam = lambda step: np.asarray(params(aug, keys, step)[0])
  assert (lam(9) < 1).all()
  assert (lam(10) == 1).all() and (lam(50) == 1).all()
  # After the stop the targets are the smoothed one-hot labels.
  images, labels = jnp.asarray(_images()), jnp.arange(8)
  _, targets = _mix(aug, augment.normalise(images, MEAN, STD), labels,
                           jax.random.key(0), 10)
  np.testing.assert_array_equal(targets, augment.smooth_one_hot(labels, 10, 0.0))


@pytest.fixture(scope="module")
def all_op_outputs():
  """Every op of RandAugment and AutoAugment at arguments across (and beyond) the ranges
  their magnitudes map to, and both whole augmentations over many keys: one compile."""
  image = jnp.asarray(_images(1)[0], jnp.float32)
  fill = _aug().fill
  args = jnp.array([-30.0, -0.45, 0.0, 0.3, 1.0, 1.9, 4.0, 14.0, 128.0, 256.0])
  keys = jax.random.split(jax.random.key(0), 16)

  def run(x):
    ops = jax.vmap(lambda i: jax.vmap(lambda a: augment.apply_op(x, i, a, fill))(args))(
        jnp.arange(len(augment.OPS)))
    ra = jax.vmap(lambda k: augment.randaugment(x, k, 2, 9.0, 0.5, fill))(keys)
    aa = jax.vmap(lambda k: augment.autoaugment_cifar10(x, k, fill))(keys)
    return ops.reshape((-1,) + x.shape), ra, aa

  return [np.asarray(o) for o in jax.jit(run)(image)], np.asarray(image)


def test_randaugment_and_autoaugment_ops_keep_shape_dtype_and_range(all_op_outputs):
  (ops, ra, aa), image = all_op_outputs
  for outs in (ops, ra, aa):
    assert outs.shape[1:] == (32, 32, 3) and outs.dtype == np.float32
    assert outs.min() >= 0.0 and outs.max() <= 255.0
    assert sum(not np.allclose(o, image) for o in outs) > len(outs) // 2  # They do act.
  names = {name for sub in augment._CIFAR10_POLICY for name, _, _ in sub}
  assert len(augment._CIFAR10_POLICY) == 25 and names <= set(augment.OPS)
  assert len(augment.RANDAUGMENT_OPS) == 15  # timm's `inc1` set.


def test_geometric_ops_move_pixels_as_pil_does():
  x = jnp.asarray(_images(1, seed=5)[0], jnp.float32)
  op = lambda name, arg: np.asarray(augment.apply_op(x, augment.OPS.index(name),
                                                     jnp.float32(arg), (0.0, 0.0, 0.0)))
  pil = Image.fromarray(_images(1, seed=5)[0])
  np.testing.assert_allclose(op("Rotate", 90.0), np.asarray(pil.rotate(90), np.float32),
                             atol=1e-3)
  np.testing.assert_allclose(op("TranslateX", 3.0), np.asarray(pil.transform(
      pil.size, Image.AFFINE, (1, 0, 3, 0, 1, 0)), np.float32), atol=1e-3)
  np.testing.assert_allclose(op("ShearY", 0.0), np.asarray(x), atol=1e-3)


def test_pixel_ops_match_pil():
  """The colour ops as PIL computes them (timm applies them to PIL images)."""
  raw = _images(1, seed=3)[0]
  pil = Image.fromarray(raw)
  x = jnp.asarray(raw, jnp.float32)
  cases = [(augment.equalize(x), ImageOps.equalize(pil)),
           (augment.autocontrast(x), ImageOps.autocontrast(pil)),
           (augment.solarize(x, 128.0), ImageOps.solarize(pil, 128)),
           (augment.posterize(x, jnp.int32(3)), ImageOps.posterize(pil, 3)),
           (augment.invert(x), ImageOps.invert(pil)),
           (augment.brightness(x, 1.6), ImageEnhance.Brightness(pil).enhance(1.6)),
           (augment.colour(x, 0.3), ImageEnhance.Color(pil).enhance(0.3)),
           (augment.contrast(x, 1.7), ImageEnhance.Contrast(pil).enhance(1.7)),
           (augment.sharpness(x, 1.8), ImageEnhance.Sharpness(pil).enhance(1.8))]
  for got, expected in cases:
    # PIL works in uint8 (integer grey levels, truncating blends): within two levels.
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected, np.float32), atol=2.0)


def test_random_erasing_box_and_rate():
  image = jnp.ones((32, 32, 3))
  keys = jax.random.split(jax.random.key(0), 400)
  out = np.asarray(jax.vmap(lambda k: augment.random_erasing(image, k, 0.25, "const"))(keys))
  erased = (out == 0).all(-1)
  rate = erased.any(axis=(1, 2))
  assert abs(rate.mean() - 0.25) < 0.09  # Binomial(400, 0.25): > 4 sd.
  areas = erased.reshape(400, -1).mean(-1)[rate]
  assert areas.min() >= 0.015 and areas.max() <= 0.36  # [0.02, 1/3] of the image, rounded.


def _augment_on(mesh, aug, images, labels, step):
  """The step's augmentation of a global uint8 batch, run as the train step runs it."""
  step = jnp.int32(step)
  if mesh is None:
    fn = lambda x, y, s: augment.apply_batch(aug, x, y, RNG, s, axis_name=None)
    return jax.device_get(jax.jit(fn)(images, labels, step))
  fn = jax.shard_map(lambda x, y, s: augment.apply_batch(aug, x, y, RNG, s, "data"),
                     mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P("data"),
                     check_vma=False)
  sharding = NamedSharding(mesh, P("data"))
  return jax.device_get(jax.jit(fn)(jax.device_put(images, sharding),
                                    jax.device_put(labels, sharding), step))


FULL_RECIPE = dict(crop="pad", crop_padding=4, flip=True, randaugment_num_ops=2,
                   randaugment_magnitude=9.0, randaugment_magnitude_std=0.5,
                   random_erasing_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
                   label_smoothing=0.1)


def test_augmentation_does_not_depend_on_the_device_count():
  # The per-example and batch keys and the mirror across devices; RandAugment draws from
  # the same per-example keys (its ops are covered above; leaving it out saves compiles).
  aug = _aug(**{**FULL_RECIPE, "randaugment_num_ops": 0})
  images, labels = _images(), np.arange(8, dtype=np.int32)
  two = _augment_on(Mesh(np.asarray(jax.devices()), ("data",)), aug, images, labels, 3)
  one = _augment_on(Mesh(np.asarray(jax.devices()[:1]), ("data",)), aug, images, labels, 3)
  whole = _augment_on(None, aug, images, labels, 3)
  # The same draws everywhere; programs compiled for other shapes may round the mixing
  # arithmetic differently in the last bit (1e-5 is far below one grey level, 0.016
  # after normalisation, so any other crop, flip, box or lambda would show).
  for a, b in ((two, one), (two, whole)):
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-6)
  other_step = _augment_on(None, aug, images, labels, 4)
  assert not np.allclose(other_step[0], whole[0])


def test_both_input_pipelines_feed_the_step_the_same_pixels(tiny_vit_config):
  """Both pipelines deliver the same uint8 images for the same examples; the step's
  augmentation of a batch then does not depend on the pipeline it came by."""
  tiny_vit_config.batch_size = 16
  tiny_vit_config.augment.update(crop="resize", resize_size=36)  # A host-side resize too.
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  with tfds.testing.mock_data(num_examples=16):
    device = jax.device_get(device_input.DeviceDataset(tiny_vit_config, mesh).batch(0))
    host = next(input_pipeline.train_batches(tiny_vit_config))
  assert device["image"].dtype == host["image"].dtype == np.uint8
  assert device["image"].shape == host["image"].shape == (16, 36, 36, 3)
  # One epoch of 16 examples: the same examples, in another order.
  flat = lambda b: b["image"].reshape(16, -1)
  order = [int(np.flatnonzero((flat(host) == row).all(-1))[0]) for row in flat(device)]
  assert sorted(order) == list(range(16))
  host = {k: v[order] for k, v in host.items()}
  np.testing.assert_array_equal(host["image"], device["image"])
  aug = augment.from_config(tiny_vit_config, 10, 1, MEAN, STD)
  via_device = _augment_on(mesh, aug, device["image"], device["label"], 5)
  via_host = _augment_on(mesh, aug, host["image"], host["label"], 5)
  np.testing.assert_array_equal(via_device[0], via_host[0])
  assert via_device[0].shape == (16, 32, 32, 3)


@pytest.mark.parametrize("field,value,message", [
    ("cutmix_alpha", -1.0, "config.augment.cutmix_alpha=-1.0; allowed: a finite number >= 0"),
    ("autoaugment", "imagenet", "config.augment.autoaugment='imagenet'; allowed: none, cifar10"),
    ("randaugment_magnitude", 11.0,
     "config.augment.randaugment_magnitude=11.0; allowed: a number in [0, 10]"),
    ("mix_switch_prob", 1.5, "config.augment.mix_switch_prob=1.5; allowed: a number in [0, 1]"),
    ("random_erasing_mode", "noise", "config.augment.random_erasing_mode='noise'; allowed"),
])
def test_bad_augment_values_get_clear_errors(tiny_vit_config, tmp_path, field, value, message):
  setattr(tiny_vit_config.augment, field, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()
