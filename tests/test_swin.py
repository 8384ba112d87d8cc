"""Tests of the Swin Transformer: window/shift masking, relative position bias, sizes,
parameter counts of the presets and the Keras example config."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import swin as swin_config
from efficient_vit import cost, optim
from efficient_vit.models import build_model
from efficient_vit.models import swin


def _attention_jacobian_support(module, height, width, dim, seed=0):
  """[tokens, tokens] bool: does output token i depend on input token j at all?"""
  x = jax.random.normal(jax.random.key(seed), (1, height * width, dim))
  variables = module.init(jax.random.key(seed + 1), x)
  jacobian = jax.jit(jax.jacrev(lambda inputs: module.apply(variables, inputs)))(x)
  jacobian = np.asarray(jacobian)[0, :, :, 0]  # [tokens_out, dim_out, tokens_in, dim_in]
  return np.abs(jacobian).max(axis=(1, 3)) > 0


def _allowed_pairs(height, width, window, shift):
  """Token pairs that may interact, derived from coordinates alone (not from the mask code).

  A token at (r, c) lands at ((r - s) mod H, (c - s) mod W) after the roll. Two tokens may
  interact iff they land in the same M x M window and neither axis brought one of them
  there by wrapping around (both wrapped or both not, per axis).
  """
  coords = [(r, c) for r in range(height) for c in range(width)]
  allowed = np.zeros((len(coords), len(coords)), bool)
  for i, (ri, ci) in enumerate(coords):
    for j, (rj, cj) in enumerate(coords):
      window_i = (((ri - shift) % height) // window, ((ci - shift) % width) // window)
      window_j = (((rj - shift) % height) // window, ((cj - shift) % width) // window)
      wrapped_i = (ri < shift, ci < shift)
      wrapped_j = (rj < shift, cj < shift)
      allowed[i, j] = window_i == window_j and wrapped_i == wrapped_j
  return allowed


@pytest.mark.parametrize("height,width,window,shift", [(8, 8, 4, 2), (6, 9, 3, 1), (4, 4, 2, 1)])
def test_shifted_window_attention_only_mixes_tokens_of_one_region(height, width, window, shift):
  module = swin.ShiftedWindowAttention(num_heads=2, resolution=(height, width),
                                       window_size=window, shift_size=shift)
  support = _attention_jacobian_support(module, height, width, dim=8)
  allowed = _allowed_pairs(height, width, window, shift)
  # Exactly zero across regions, non-zero for every pair inside one region of a window.
  np.testing.assert_array_equal(support, allowed)
  # The shift must really split windows: some same-window pairs are cut apart.
  unshifted = _allowed_pairs(height, width, window, 0)
  assert (allowed != unshifted).any()


def test_unshifted_window_attention_stays_inside_windows():
  module = swin.ShiftedWindowAttention(num_heads=2, resolution=(8, 8), window_size=4)
  support = _attention_jacobian_support(module, 8, 8, dim=8)
  np.testing.assert_array_equal(support, _allowed_pairs(8, 8, 4, 0))


def _brute_force_relative_index(window):
  index = np.zeros((window * window, window * window), np.int64)
  for (i, (ri, ci)), (j, (rj, cj)) in itertools.product(
      enumerate(itertools.product(range(window), repeat=2)), repeat=2):
    index[i, j] = (ri - rj + window - 1) * (2 * window - 1) + (ci - cj + window - 1)
  return index


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_relative_position_index_matches_brute_force(window):
  index = swin.relative_position_index(window)
  np.testing.assert_array_equal(index, _brute_force_relative_index(window))
  assert index.min() == 0 and index.max() == (2 * window - 1) ** 2 - 1


def test_one_window_equals_global_attention_with_relative_bias():
  side, dim, heads = 4, 8, 2
  module = swin.ShiftedWindowAttention(num_heads=heads, resolution=(side, side),
                                       window_size=side, shift_size=0)
  x = jax.random.normal(jax.random.key(0), (2, side * side, dim))
  variables = module.init(jax.random.key(1), x)
  params = variables["params"]
  out = jax.jit(module.apply)(variables, x)

  # Global attention over all 16 tokens, written out from the same parameters.
  mha = params["window_attention"]
  q, k, v = (jnp.einsum("bnd,dhk->bnhk", x, mha[n]["kernel"]) + mha[n]["bias"]
             for n in ("query", "key", "value"))
  bias = params["relative_position_bias_table"][_brute_force_relative_index(side)]
  logits = jnp.einsum("bnhk,bmhk->bhnm", q, k) / np.sqrt(dim // heads)
  logits = logits + bias.transpose(2, 0, 1)[None]
  weights = jax.nn.softmax(logits, axis=-1)
  expected = jnp.einsum("bhnm,bmhk->bnhk", weights, v)
  expected = jnp.einsum("bnhk,hkd->bnd", expected, mha["out"]["kernel"]) + mha["out"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(bias).max() > 0  # The bias really takes part.


def test_window_not_smaller_than_feature_map_is_one_unshifted_window():
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  large = swin.ShiftedWindowAttention(num_heads=2, resolution=(4, 4), window_size=7,
                                      shift_size=3)
  exact = swin.ShiftedWindowAttention(num_heads=2, resolution=(4, 4), window_size=4)
  variables = large.init(jax.random.key(1), x)
  assert variables["params"]["relative_position_bias_table"].shape == (49, 2)  # (2*4-1)^2
  np.testing.assert_allclose(large.apply(variables, x), exact.apply(variables, x), atol=1e-6)


def test_shifted_window_mask_regions():
  mask = swin.shifted_window_mask(4, 4, 2, 1)
  assert mask.shape == (4, 4, 4)
  # Only the windows touching the wrapped last row/column are split.
  assert mask[0].all()
  assert mask[1].sum() == 8 and mask[2].sum() == 8 and mask[3].sum() == 4


def _tiny(**overrides):
  fields = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=2,
                drop_path_rate=0.1, dropout_rate=0.1, attention_dropout_rate=0.1)
  fields.update(overrides)
  return swin.SwinTransformer(num_classes=5, **fields)


def test_forward_train_attention_weights_and_shift():
  model, unshifted_model = _tiny(), _tiny(shift_size=0)
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))

  variables = jax.jit(model.init)(jax.random.key(1), images)
  logits, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
      variables, images)
  intermediates = state["intermediates"]
  # An rbg key keeps the compile short (threefry for ~25 dropout sites is slow on CPU).
  train_logits = jax.jit(functools.partial(model.apply, train=True))(
      variables, images, rngs={"dropout": jax.random.key(2, impl="rbg")})
  # Perturbed parameters, since the zero-initialised head makes every logit 0.
  leaves, tree = jax.tree.flatten(variables)
  noise = np.random.default_rng(0)
  variables = jax.tree.unflatten(
      tree, [p + 0.1 * noise.standard_normal(p.shape, np.float32) for p in leaves])
  shifted = jax.jit(model.apply)(variables, images)
  unshifted = jax.jit(unshifted_model.apply)(variables, images)

  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert np.isfinite(train_logits).all()
  maps = jax.tree.leaves(intermediates)
  # Stage 0: 4x4 grid, windows of 2 -> 2 images * 4 windows; stage 1: 2x2 grid, 1 window.
  assert sorted(m.shape for m in maps) == sorted([(8, 2, 4, 4)] * 2 + [(2, 4, 4, 4)] * 2)
  for m in maps:
    np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
  # The shift changes the odd blocks: the same parameters without it give other logits.
  assert np.abs(shifted).max() > 1e-3
  assert not np.allclose(shifted, unshifted, atol=1e-4)


@pytest.mark.parametrize("overrides,image,message", [
    (dict(patch_size=3), 8, "patch_size=3"),
    (dict(window_size=3, depths=(2,), num_heads=(2,)), 16, "window_size=3"),
    (dict(depths=(2, 2), num_heads=(2,)), 8, "num_heads"),
    (dict(window_size=2, shift_size=2), 8, "shift_size=2"),
    (dict(patch_size=2, window_size=3, depths=(1, 1), num_heads=(2, 2)), 6, "even"),
])
def test_bad_sizes_raise_value_error(overrides, image, message):
  model = _tiny(**overrides)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image, image, 3)))


def _params_from_config(preset, num_classes):
  config = swin_config.get_config(preset)
  model = build_model(config.model, num_classes)
  size = config.image_size
  return cost.count_params(cost.abstract_params(model, (1, size, size, 3)))


@pytest.mark.parametrize("preset,published,official", [
    ("swin_t", 28.3e6, 28_288_354), ("swin_s", 49.6e6, 49_606_258),
    ("swin_b", 87.8e6, 87_768_224)])
def test_preset_parameter_counts(preset, published, official):
  count = _params_from_config(preset, 1000)
  assert abs(count - published) / published < 0.01, count
  assert count == official  # The official code's (and timm's) exact count.


def test_keras_example_parameter_count():
  # The example's code builds 162,996 trainable parameters for CIFAR-100 (checked with
  # Keras); its text's "152K" is its 10-class build (151,386 trainable + 1,056 buffers).
  assert _params_from_config("keras", 100) == 162_996
  count_10 = _params_from_config("keras", 10)
  assert count_10 == 151_386
  assert abs(count_10 - 152e3) / 152e3 < 0.01


def test_unknown_preset():
  with pytest.raises(ValueError, match="swin_t"):
    swin_config.get_config("swin_l")


@pytest.mark.parametrize("preset", ["swin_t", "swin_s", "swin_b"])
def test_imagenet_presets_carry_the_official_recipe(preset):
  # microsoft/Swin-Transformer config.py defaults, scaled as main.py does: BASE_LR 5e-4,
  # WARMUP_LR 5e-7 and MIN_LR 5e-6 per 512 images, times 1024 / 512 (get_started.md: 8 GPUs
  # x 128, Swin-B 8 x 64 x 2 accumulation steps).
  config = swin_config.get_config(preset)
  opt = config.optimizer
  scale = config.batch_size / 512
  assert (config.batch_size, config.num_epochs) == (1024, 300.0)
  assert opt.learning_rate == pytest.approx(5e-4 * scale) == pytest.approx(1e-3)
  assert opt.warmup_start_learning_rate == pytest.approx(5e-7 * scale)
  assert opt.min_learning_rate == pytest.approx(5e-6 * scale)
  assert (opt.name, opt.schedule, opt.warmup_epochs, opt.cooldown_epochs) == (
      "adamw", "cosine", 20.0, 0.0)
  assert (opt.weight_decay, opt.grad_clip_norm, opt.label_smoothing, opt.ema_decay) == (
      0.05, 5.0, 0.1, 0.0)
  assert opt.grad_accum_steps == (2 if preset == "swin_b" else 1)
  # WARMUP_PREFIX=True: from WARMUP_LR up to the peak over 20 epochs, then the cosine over
  # the remaining 280 down to MIN_LR.
  schedule = optim.learning_rate_schedule(opt, 100, 300 * 100)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)
  assert float(schedule(20 * 100)) == pytest.approx(1e-3, rel=1e-5)
  assert float(schedule(160 * 100)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-5)
  assert float(schedule(300 * 100)) == pytest.approx(1e-5, rel=1e-5)
