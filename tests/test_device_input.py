"""The device-resident input path: same augmentation semantics as tf.data, epochs that
visit every example once, batches that are a pure function of the step."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from efficient_vit import device_input, input_pipeline, train

_RAW = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)


def _mesh():
  return train.Mesh(np.asarray(jax.devices()), ("data",))


def _normalise(config, raw):
  return input_pipeline._normalise(config, tf.constant(raw, tf.float32)).numpy()


@pytest.mark.parametrize("scale,angle", [(1.0, 0.0), (0.8, 0.3), (1.2, -0.5)])
def test_zoom_and_rotation_match_tf(scale, angle):
  image = _RAW.astype(np.float32)
  expected = input_pipeline.affine_transform(tf.constant(image), tf.constant(scale),
                                             tf.constant(angle)).numpy()
  got = np.asarray(device_input.affine_transform(jnp.asarray(image), scale, angle))
  np.testing.assert_allclose(got, expected, atol=1e-2)  # Pixel values are 0..255.


def test_without_augmentation_both_paths_give_the_same_image(tiny_vit_config):
  tiny_vit_config.augment.update(crop="none", flip=False)
  tf_image = input_pipeline._augment(tiny_vit_config, tf.constant(_RAW),
                                     tf.constant([1, 2], tf.int64)).numpy()
  jax_image = np.asarray(device_input.augment(tiny_vit_config, jnp.asarray(_RAW),
                                              jax.random.key(0)))
  np.testing.assert_allclose(jax_image, tf_image, atol=1e-5)
  np.testing.assert_allclose(jax_image, _normalise(tiny_vit_config, _RAW), atol=1e-5)


def test_pad_crop_is_a_window_of_the_padded_image_on_both_paths(tiny_vit_config):
  tiny_vit_config.augment.update(crop="pad", crop_padding=4, flip=False)
  padded = np.pad(_RAW, ((4, 4), (4, 4), (0, 0)))
  windows = [_normalise(tiny_vit_config, padded[i:i + 32, j:j + 32])
             for i, j in itertools.product(range(9), repeat=2)]
  offsets = set()
  for k in range(12):
    for image in (np.asarray(device_input.augment(tiny_vit_config, jnp.asarray(_RAW),
                                                  jax.random.key(k))),
                  input_pipeline._augment(tiny_vit_config, tf.constant(_RAW),
                                          tf.constant([k, 0], tf.int64)).numpy()):
      matches = [i for i, w in enumerate(windows) if np.allclose(image, w, atol=1e-4)]
      assert len(matches) == 1
      offsets.add(matches[0])
  assert len(offsets) > 5  # The offsets really are random.


def test_flip_rate_is_one_half(tiny_vit_config):
  tiny_vit_config.augment.update(crop="none", flip=True)
  keys = jax.random.split(jax.random.key(0), 400)
  images = jax.vmap(lambda k: device_input.augment(tiny_vit_config, jnp.asarray(_RAW), k))(keys)
  plain = _normalise(tiny_vit_config, _RAW)
  flipped = np.all(np.isclose(np.asarray(images), plain[:, ::-1], atol=1e-5), axis=(1, 2, 3))
  same = np.all(np.isclose(np.asarray(images), plain, atol=1e-5), axis=(1, 2, 3))
  assert np.all(flipped ^ same)
  # Binomial(400, 0.5): the rate is within 0.5 +- 0.1 with probability 1 - 6e-5.
  assert abs(flipped.mean() - 0.5) < 0.1


def test_an_epoch_visits_every_example_once_and_steps_are_pure(tiny_vit_config):
  tiny_vit_config.augment.update(crop="none", flip=False)
  tiny_vit_config.batch_size = 8
  with tfds.testing.mock_data(num_examples=24):
    assert device_input.resolve(tiny_vit_config) == "device"
    dataset = device_input.DeviceDataset(tiny_vit_config, _mesh())
    originals = np.stack([_normalise(tiny_vit_config, ex["image"]) for ex in tfds.as_numpy(
        tfds.load("cifar10", split="train", shuffle_files=False))])
    again = device_input.DeviceDataset(tiny_vit_config, _mesh())
  # 24 examples, 12 per device, 4 per device per step: steps 0-2 are one epoch.
  seen = np.concatenate([np.asarray(dataset.batch(s)["image"]) for s in range(3)])
  distance = np.abs(seen[:, None] - originals[None]).max(axis=(2, 3, 4))
  assert sorted(np.argmin(distance, axis=1)) == list(range(24))
  assert distance.min(axis=1).max() < 1e-4
  # The next epoch is another order of the same examples.
  next_epoch = np.concatenate([np.asarray(dataset.batch(s)["image"]) for s in range(3, 6)])
  assert not np.allclose(next_epoch, seen)
  np.testing.assert_array_equal(np.asarray(again.batch(4)["image"]),
                                np.asarray(dataset.batch(4)["image"]))


def test_resolution_and_its_errors(tiny_vit_config):
  with tfds.testing.mock_data(num_examples=8):
    tiny_vit_config.augment.crop = "inception"
    assert device_input.resolve(tiny_vit_config) == "tfdata"
    tiny_vit_config.input_pipeline = "device"
    with pytest.raises(ValueError, match="input_pipeline='device' cannot take this run"):
      device_input.resolve(tiny_vit_config)
