"""Tests of MobileViT (efficient_vit/models/mobilevit.py) and configs/mobilevit.py."""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mobilevit as mobilevit_config
from efficient_vit import cost, layers, optim
from efficient_vit.models import build_model
from efficient_vit.models.mobilevit import (ConvBlock, InvertedResidual, MobileViT, conv_pads,
                                            fold, unfold)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(ROOT, "..", "shared", "tensorflow_datasets")

# Published parameter counts (ml-cvnets / paper, 1,000 classes at 256).
PUBLISHED = {"xxs": 1.27e6, "xs": 2.32e6, "s": 5.58e6}
# What this implementation has (trainable parameters only), to catch silent changes.
MEASURED = {"xxs": 1_272_024, "xs": 2_317_848, "s": 5_578_632}


def tiny(**overrides) -> MobileViT:
  """One MV2 stage and one MobileViT stage: 12x12 images -> a 6x6 map -> 9 patches of 2x2."""
  fields = dict(stem_channels=8, stage_channels=(8, 16), strides=(1, 1, 2), mv2_depths=(1,),
                expansion=2, embed_dims=(16,), transformer_depths=(1,), mlp_dims=(32,),
                num_heads=2, last_channels=32, dropout_rate=0.0, head_dropout_rate=0.0)
  fields.update(overrides)
  return MobileViT(num_classes=5, **fields)


def init(model, x, seed: int = 0) -> dict:
  """Variables of `model` for inputs like `x`, drawn with numpy.

  `model.init` compiles a random generator per parameter, seconds of CPU per model even for
  a tiny one; these tests need parameters, not the initialisers. Kernels are drawn with
  variance 1 / fan-in, norm scales around 1, biases small, batch statistics as flax starts
  them (mean 0, var 1); the classifier is not zero, so differences reach the logits.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return jnp.zeros(leaf.shape) if name.endswith("['mean']") else jnp.ones(leaf.shape)
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * noise)
    if len(leaf.shape) == 1:
      return jnp.asarray(0.02 * noise)
    # q/k/v kernels are [d, heads, head_dim]: fan-in d; the rest fan-in is all but the last.
    qkv = any(k in name for k in ("'query'", "'key'", "'value'"))
    fan_in = leaf.shape[0] if qkv else int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(noise / np.sqrt(fan_in))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def apply(model, variables, x, **kwargs):
  """`model.apply`, jitted (static keyword arguments such as train and mutable)."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def images(batch: int, side: int, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, side, side, 3)).astype(np.float32))


@pytest.mark.parametrize("patch_size", [1, 2, 3, 4])
def test_fold_inverts_unfold_exactly(patch_size):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 24, 5)))
  patches = unfold(x, patch_size)
  p = patch_size
  assert patches.shape == (2, p * p, (12 // p) * (24 // p), 5)
  np.testing.assert_array_equal(fold(patches, 12, 24, patch_size), x)
  # The layout: position (i, j) inside patch (r, c) is pixel (r p + i, c p + j).
  nw = 24 // p
  for i, j, r, c in [(0, 0, 0, 0), (p - 1, 0, 1, 2), (0, p - 1, 12 // p - 1, nw - 1)]:
    np.testing.assert_array_equal(patches[:, i * p + j, r * nw + c], x[:, r * p + i, c * p + j])


def test_unfold_and_fold_reject_sizes_the_patch_does_not_divide():
  with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
    unfold(jnp.zeros((1, 10, 12, 3)), 4)
  with pytest.raises(ValueError, match="do not fold"):
    fold(jnp.zeros((1, 4, 9, 3)), 6, 8, 2)


def test_maps_the_patch_does_not_divide_are_an_error_or_resized():
  model = tiny()
  with pytest.raises(ValueError, match="5x5 feature map.*model.patch_size=2.*resize_to_patches"):
    jax.eval_shape(model.init, jax.random.key(0), images(1, 10))
  # The paper's way: bilinear resize to 6x6 around the transformer, back to 5x5 after.
  model = tiny(resize_to_patches=True)
  variables = init(model, images(1, 10))
  logits = apply(model, variables, images(2, 10))
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("side,strides,kernel_size,padding", [
    (8, 2, 3, "symmetric"), (7, 1, 5, "symmetric"), (9, 2, 3, "same"), (10, 2, 5, "same")])
def test_depthwise_conv_block_is_a_grouped_convolution(side, strides, kernel_size, padding):
  """The depthwise ConvBlock: kernel [k, k, 1, C], one group per channel, padded as
  `conv_pads` says (TensorFlow's same pads asymmetrically)."""
  module = ConvBlock(3, kernel_size, strides, depthwise=True, use_norm=False,
                     use_activation=False, padding=padding)
  x = images(2, side)
  variables = init(module, x)
  kernel = variables["params"]["conv"]["kernel"]
  assert kernel.shape == (kernel_size, kernel_size, 1, 3)
  pads = (conv_pads(side, kernel_size, strides, padding),) * 2
  expected = jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  np.testing.assert_allclose(apply(module, variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_channels,out_channels,strides,residual",
                         [(8, 8, 1, True), (8, 8, 2, False), (8, 16, 1, False)])
def test_inverted_residual_adds_its_input_only_when_shapes_allow(in_channels, out_channels,
                                                                 strides, residual):
  block = InvertedResidual(out_channels, expansion=2, strides=strides)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, in_channels)), jnp.float32)
  variables = init(block, x)
  assert variables["params"]["expand"]["conv"]["kernel"].shape == (in_channels, 16)
  # Silence the branch (the last batch norm's scale and shift): what is left is the skip.
  params = jax.tree.map(lambda v: v, variables["params"])
  params["project"]["norm"] = jax.tree.map(jnp.zeros_like, params["project"]["norm"])
  y = apply(block, {**variables, "params": params}, x)
  assert y.shape == (2, 8 // strides, 8 // strides, out_channels)
  np.testing.assert_array_equal(y, x if residual else jnp.zeros_like(y))
  # And with the branch on, the block is not the identity.
  assert float(jnp.abs(apply(block, variables, x) - (x if residual else 0)).max()) > 1e-3


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_at_eval():
  model = tiny()
  x = images(4, 12) * 3.0 + 1.0
  other = x.at[1:].set(images(3, 12, seed=1))  # Same first example, other batch mates.
  variables = init(model, x[:1])
  logits, updates = apply(model, variables, x, train=True, mutable=["batch_stats"])
  # The stem's running mean moves by (1 - momentum) = 0.1 (ml-cvnets' PyTorch momentum
  # 0.1) from 0 towards the batch mean of its convolution's output.
  stem = jax.lax.conv_general_dilated(x, variables["params"]["stem"]["conv"]["kernel"],
                                      (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(updates["batch_stats"]["stem"]["norm"]["mean"],
                             0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
  # Eval: an example's logits do not depend on the rest of the batch ...
  np.testing.assert_allclose(apply(model, variables, x)[0], apply(model, variables, other)[0],
                             rtol=1e-5, atol=1e-5)
  # ... in training they do (batch statistics).
  logits_other = apply(model, variables, other, train=True, mutable=["batch_stats"])[0]
  assert float(jnp.abs(logits[0] - logits_other[0]).max()) > 1e-3
  # Training mode without a mutable batch_stats collection is refused by flax.
  with pytest.raises(Exception, match="batch_stats"):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, x)


def test_attention_maps_have_one_n_by_n_map_per_pixel_position():
  model = tiny(num_heads=2)
  x = images(3, 12)
  variables = init(model, x[:1])
  _, inter = apply(model, variables, x, mutable=["intermediates"])
  weights = inter["intermediates"]["stage_2_mobilevit"]["transformer_0"]["attention"][
      "attention_weights"][0]
  assert weights.shape == (3 * 4, 2, 9, 9)  # [batch * P, heads, N, N], 6x6 map, 2x2 patches.
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_paper_preset_parameter_counts(preset):
  config = mobilevit_config.get_config(preset)
  assert config.image_size == 256
  model = build_model(config.model, num_classes=1000)
  n = cost.count_params(cost.abstract_params(model, (1, 256, 256, 3)))  # params only
  assert abs(n - PUBLISHED[preset]) / PUBLISHED[preset] < 0.01, n
  assert n == MEASURED[preset]


def test_keras_example_config_parameter_count_and_layout():
  config = mobilevit_config.get_config()
  assert (config.dataset, config.train_split, config.eval_split) == (
      "tf_flowers", "train[:90%]", "train[90%:]")
  model = build_model(config.model, num_classes=5)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  trainable = cost.count_params(variables["params"])
  statistics = cost.count_params(variables["batch_stats"])
  # The example's summary: 1,307,621 total = 1,305,077 trainable + 2,544 non-trainable.
  assert abs(trainable - 1_307_621) / 1_307_621 < 0.01
  assert (trainable, statistics) == (1_305_077, 2_544)
  params = variables["params"]
  # Layer shapes of the example's summary (conv2d_11/_13/_14 and its first attention).
  block = params["stage_3_mobilevit"]
  assert block["local_conv"]["conv"]["kernel"].shape == (3, 3, 48, 64)
  assert block["local_conv"]["conv"]["bias"].shape == (64,)
  assert block["from_transformer"]["conv"]["kernel"].shape == (64, 48)
  assert block["fusion"]["conv"]["kernel"].shape == (3, 3, 96, 64)
  assert block["transformer_0"]["attention"]["query"]["kernel"].shape == (64, 2, 64)
  assert params["stem"]["conv"]["bias"].shape == (16,)
  assert params["last_conv"]["conv"]["kernel"].shape == (96, 320)


def test_cifar10_preset_runs_at_32():
  config = mobilevit_config.get_config("cifar10")
  assert config.image_size == 32 and config.dataset == "cifar10"
  model = build_model(config.model, num_classes=10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert cost.count_params(variables["params"]) == 954_234
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                          jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_bad_fields_get_clear_errors():
  with pytest.raises(ValueError, match="model.variant='torch'; allowed: paper, keras"):
    jax.eval_shape(tiny(variant="torch").init, jax.random.key(0), images(1, 12))
  with pytest.raises(ValueError, match="model.strides needs 3 entries"):
    jax.eval_shape(tiny(strides=(1, 2)).init, jax.random.key(0), images(1, 12))
  with pytest.raises(ValueError, match="model.strides.*each 1 or 2"):
    jax.eval_shape(tiny(strides=(1, 3, 1)).init, jax.random.key(0), images(1, 12))
  with pytest.raises(ValueError, match="model.stage_channels needs 2 entries"):
    jax.eval_shape(tiny(stage_channels=(8,)).init, jax.random.key(0), images(1, 12))
  with pytest.raises(ValueError, match="model.num_heads=3 must divide"):
    jax.eval_shape(tiny(num_heads=3).init, jax.random.key(0), images(1, 12))
  with pytest.raises(ValueError, match="preset 'xxxs'.*allowed: keras, xxs, xs, s, cifar10"):
    mobilevit_config.get_config("xxxs")


def _train_metrics(workdir):
  from efficient_vit.metric_logging import read_metrics
  return [r for r in read_metrics(workdir) if r["split"] == "train"]


def one_stage(config, strides):
  """The preset's recipe (data, augmentation, optimizer, variant) with a one-stage model
  (stem, one strided MV2 block, one MobileViT block with one transformer block). The trainer
  compiles the model three times (init, train and eval steps) and XLA's CPU compile time
  grows with the number of layers: about 70 s of CPU for the full cifar10 preset."""
  config.model.update(stem_channels=16, stage_channels=(32,), strides=strides, mv2_depths=(),
                      embed_dims=(32,), transformer_depths=(1,), mlp_dims=(64,),
                      last_channels=64)
  return config


@pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR_DIR, "cifar10")),
                    reason="the real CIFAR-10 copy (../shared/tensorflow_datasets) is missing")
def test_cifar10_preset_trains_on_real_cifar10_with_falling_loss(tmp_path):
  from efficient_vit.train import train_and_evaluate

  config = one_stage(mobilevit_config.get_config("cifar10"), strides=(2, 2))
  # tf.data reads only the examples the 40 steps need; the device path would decode all 50k.
  config.update(data_dir=os.path.abspath(CIFAR_DIR), download=False, input_pipeline="tfdata",
                eval_split="test[:256]",
                batch_size=64, num_train_steps=40, log_every_steps=5, eval_every_steps=1000,
                checkpoint_every_steps=1000, shuffle_buffer=1024)
  config.optimizer.update(warmup_epochs=0.0, warmup_steps=0, schedule="constant")
  metrics = train_and_evaluate(config, str(tmp_path))
  losses = [r["loss"] for r in _train_metrics(tmp_path)]
  assert len(losses) == 8 and all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0], losses
  # The zero-initialised classifier starts every example at loss ln(10) = 2.303.
  assert metrics["num_examples"] == 256
  assert metrics["loss"] < np.log(10) - 0.1 and metrics["top1"] > 0.15, metrics


def test_default_config_runs_end_to_end_on_mock_tf_flowers(tmp_path):
  import tensorflow_datasets as tfds
  from efficient_vit.train import train_and_evaluate

  config = one_stage(mobilevit_config.get_config(), strides=(2, 2))
  config.update(image_size=32, batch_size=4, num_train_steps=2, log_every_steps=1,
                eval_every_steps=1000, checkpoint_every_steps=1000, shuffle_buffer=16)
  config.augment.resize_size = 36
  with tfds.testing.mock_data(num_examples=20):
    metrics = train_and_evaluate(config, str(tmp_path))
  assert [r["step"] for r in _train_metrics(tmp_path)] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in _train_metrics(tmp_path))
  # mock_data makes num_examples for every split it is asked for, slices included.
  assert metrics["num_examples"] == 20 and np.isfinite(metrics["loss"])


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_paper_presets_carry_the_ml_cvnets_recipe(preset):
  # apple/ml-cvnets config/classification/imagenet/mobilevit.yaml (one file, three sizes).
  config = mobilevit_config.get_config(preset)
  opt = config.optimizer
  assert (config.batch_size, config.num_epochs) == (1024, 300.0)  # 128 x 8 GPUs; max_epochs
  assert (opt.name, opt.b1, opt.b2, opt.weight_decay) == ("adamw", 0.9, 0.999, 0.01)
  assert (opt.schedule, opt.learning_rate, opt.min_learning_rate) == ("cosine", 2e-3, 2e-4)
  assert (opt.warmup_steps, opt.warmup_epochs, opt.warmup_start_learning_rate) == (
      20_000, 0.0, 2e-4)
  assert opt.label_smoothing == 0.1
  # ema momentum 0.0005: ema <- (1 - 0.0005) ema + 0.0005 params.
  assert opt.ema_decay == pytest.approx(0.9995)
  steps_per_epoch = 1_281_167 // 1024
  schedule = optim.learning_rate_schedule(opt, steps_per_epoch, 300 * steps_per_epoch)
  assert float(schedule(0)) == pytest.approx(2e-4, rel=1e-5)  # warmup_init_lr
  assert float(schedule(10_000)) == pytest.approx((2e-4 + 2e-3) / 2, rel=1e-5)
  assert float(schedule(20_000)) == pytest.approx(2e-3, rel=1e-5)  # max_lr
  assert float(schedule(300 * steps_per_epoch)) == pytest.approx(2e-4, rel=1e-5)  # min_lr
