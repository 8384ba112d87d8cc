"""The device-resident input path delivers uint8 batches (the step augments them, see
tests/test_augment.py); the step's per-example ops keep the semantics the old TF and JAX
copies had: Keras zoom / rotation as TensorFlow computes it, pad-and-crop windows, flips
at rate one half. Epochs visit every example once and batches are a pure function of the
step."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from efficient_vit import augment, device_input, input_pipeline, train

_RAW = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
MEAN, STD = input_pipeline.normalisation("cifar10")


def _mesh():
  return train.Mesh(np.asarray(jax.devices()), ("data",))


def _normalise(raw):
  return np.asarray(augment.normalise(jnp.asarray(raw), MEAN, STD))


def _tf_zoom_and_rotate(image, scale, angle):
  """The reference: TensorFlow's projective transform (what Keras' RandomZoom /
  RandomRotation run), output pixel p reading input c + scale R(angle) (p - c)."""
  h, w = image.shape[:2]
  cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
  a0, a1 = scale * np.cos(angle), -scale * np.sin(angle)
  b0, b1 = scale * np.sin(angle), scale * np.cos(angle)
  transform = tf.constant([[a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy,
                            0.0, 0.0]], tf.float32)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.constant(image)[None], transforms=transform, output_shape=[h, w],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0].numpy()


@pytest.mark.parametrize("scale,angle", [(1.0, 0.0), (0.8, 0.3), (1.2, -0.5)])
def test_zoom_and_rotation_match_tf(scale, angle):
  image = _RAW.astype(np.float32)
  got = np.asarray(augment.zoom_and_rotate(jnp.asarray(image), scale, angle))
  np.testing.assert_allclose(got, _tf_zoom_and_rotate(image, scale, angle), atol=1e-2)


@pytest.fixture(scope="module")
def example_fn():
  """The step's per-example op, compiled once per Augmentation."""
  return jax.jit(jax.vmap(augment.augment_example, in_axes=(None, None, 0)), static_argnums=0)


def _aug(**fields):
  return augment.Augmentation(image_size=32, num_classes=10, mean=MEAN, std=STD, **fields)


def test_without_augmentation_the_step_only_normalises(example_fn):
  out = np.asarray(example_fn(_aug(), jnp.asarray(_RAW), jax.random.split(jax.random.key(0), 2)))
  np.testing.assert_allclose(out[0], _normalise(_RAW), atol=1e-6)


def test_pad_crop_is_a_window_of_the_padded_image(example_fn):
  padded = np.pad(_RAW, ((4, 4), (4, 4), (0, 0)))
  windows = [_normalise(padded[i:i + 32, j:j + 32])
             for i, j in itertools.product(range(9), repeat=2)]
  images = np.asarray(example_fn(_aug(crop="pad", crop_padding=4), jnp.asarray(_RAW),
                                 jax.random.split(jax.random.key(0), 24)))
  offsets = set()
  for image in images:
    matches = [i for i, w in enumerate(windows) if np.allclose(image, w, atol=1e-4)]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 5  # The offsets really are random.


def test_flip_rate_is_one_half(example_fn):
  images = np.asarray(example_fn(_aug(flip=True), jnp.asarray(_RAW),
                                 jax.random.split(jax.random.key(0), 400)))
  plain = _normalise(_RAW)
  flipped = np.all(np.isclose(images, plain[:, ::-1], atol=1e-5), axis=(1, 2, 3))
  same = np.all(np.isclose(images, plain, atol=1e-5), axis=(1, 2, 3))
  assert np.all(flipped ^ same)
  # Binomial(400, 0.5): the rate is within 0.5 +- 0.1 with probability 1 - 6e-5.
  assert abs(flipped.mean() - 0.5) < 0.1


def test_an_epoch_visits_every_example_once_and_steps_are_pure(tiny_vit_config):
  tiny_vit_config.batch_size = 8
  with tfds.testing.mock_data(num_examples=24):
    assert device_input.resolve(tiny_vit_config) == "device"
    dataset = device_input.DeviceDataset(tiny_vit_config, _mesh())
    originals = np.stack([ex["image"] for ex in tfds.as_numpy(
        tfds.load("cifar10", split="train", shuffle_files=False))])
    again = device_input.DeviceDataset(tiny_vit_config, _mesh())
  # 24 examples, 12 per device, 4 per device per step: steps 0-2 are one epoch.
  seen = np.concatenate([np.asarray(dataset.batch(s)["image"]) for s in range(3)])
  assert seen.dtype == np.uint8
  same = (seen[:, None] == originals[None]).all(axis=(2, 3, 4))
  assert sorted(np.argmax(same, axis=1)) == list(range(24)) and same.any(axis=1).all()
  # The next epoch is another order of the same examples.
  next_epoch = np.concatenate([np.asarray(dataset.batch(s)["image"]) for s in range(3, 6)])
  assert not np.array_equal(next_epoch, seen)
  np.testing.assert_array_equal(np.asarray(again.batch(4)["image"]),
                                np.asarray(dataset.batch(4)["image"]))


def test_resolution_and_its_errors(tiny_vit_config):
  with tfds.testing.mock_data(num_examples=8):
    tiny_vit_config.augment.crop = "inception"
    assert device_input.resolve(tiny_vit_config) == "tfdata"
    tiny_vit_config.input_pipeline = "device"
    with pytest.raises(ValueError, match="input_pipeline='device' cannot take this run"):
      device_input.resolve(tiny_vit_config)
