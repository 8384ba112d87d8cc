"""Tests of the Perceiver (efficient_vit/models/perceiver.py) and its config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import perceiver as perceiver_config
from efficient_vit import cost, optim
from efficient_vit.models import build_model
from efficient_vit.models.perceiver import (LatentCrossAttention, Perceiver,
                                            fourier_position_encoding)
from efficient_vit.models.vit import ViT

TINY = dict(num_latents=8, latent_dim=32, num_iterations=2, latent_depth=1, latent_heads=4,
            mlp_dim=32, num_bands=4)


def _random_variables(model, images, scale=0.3, seed=0):
  """Random variables of the model's shapes (numpy, nothing compiled), so that the
  zero-initialised head gives non-zero logits."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                      shapes)


@pytest.mark.parametrize("patch_size,embedding_dim", [(1, None), (2, 16)])
def test_permuting_inputs_leaves_logits_unchanged_without_position_encoding(patch_size,
                                                                              embedding_dim):
  images = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  # Permute whole input elements: pixels (patch 1) or 2x2 patches.
  g = 8 // patch_size
  blocks = images.reshape(2, g, patch_size, g, patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
  blocks = blocks.reshape(2, g * g, patch_size, patch_size, 3)
  order = np.random.default_rng(0).permutation(g * g)
  permuted = blocks[:, order].reshape(2, g, g, patch_size, patch_size, 3)
  permuted = permuted.transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
  assert not np.allclose(permuted, images)

  for encoding, invariant in [("none", True), ("fourier", False), ("learned", False)]:
    model = Perceiver(num_classes=5, patch_size=patch_size, input_embedding_dim=embedding_dim,
                      position_encoding=encoding, **TINY)
    variables = _random_variables(model, images)
    both = model.apply(variables, jnp.concatenate([images, permuted]))
    logits, logits_permuted = both[:2], both[2:]
    assert float(jnp.abs(logits).max()) > 1e-2  # Non-trivial logits.
    if invariant:
      np.testing.assert_allclose(logits_permuted, logits, rtol=1e-4, atol=1e-5)
    else:
      assert not np.allclose(logits_permuted, logits, rtol=1e-4, atol=1e-5), encoding


def test_paper_preset_parameter_count():
  config = perceiver_config.get_config("imagenet")
  model = build_model(config.model, num_classes=1000)
  params = cost.abstract_params(model, (1, 224, 224, 3))
  count = cost.count_params(params)
  assert abs(count - 44.9e6) / 44.9e6 < 0.01, count
  assert count == 44_914_302  # The breakdown in configs/perceiver.py.
  # 2 cross-attends (the first own, 7 shared) and one latent Transformer of 6 blocks.
  assert sorted(k for k in params if k.startswith(("cross", "latent_t"))) == [
      "cross_attend_0", "cross_attend_1", "latent_transformer_0"]
  assert len(params["latent_transformer_0"]) == 6
  # 3 RGB + 2 axes x (2 x 64 + 1) Fourier channels; single head of width 261.
  assert params["cross_attend_0"]["input_norm"]["scale"].shape == (261,)
  assert params["cross_attend_0"]["attention"]["key"]["kernel"].shape == (261, 1, 261)
  assert params["cross_attend_0"]["attention"]["query"]["kernel"].shape == (1024, 1, 261)


def test_keras_preset_parameter_count():
  config = perceiver_config.get_config()
  assert config.image_size == 64 and config.batch_size == 64
  model = build_model(config.model, num_classes=100)
  params = cost.abstract_params(model, (1, 64, 64, 3))
  # The example's layers, counted: no cross-attention output Dense, one learned scale.
  assert cost.count_params(params) == 9_697_637
  assert params["cross_attend_0"]["attention"]["scale"].shape == ()
  assert "out" not in params["cross_attend_0"]["attention"]
  assert params["position_embedding"]["embedding"].shape == (1, 1024, 256)
  assert params["latents"].shape == (256, 256)


@pytest.mark.parametrize("share,expected", [
    ("none", (["cross_attend_0", "cross_attend_1", "cross_attend_2"],
              ["latent_transformer_0", "latent_transformer_1", "latent_transformer_2"])),
    ("after_first", (["cross_attend_0", "cross_attend_1"],
                     ["latent_transformer_0", "latent_transformer_1"])),
    ("after_first_cross", (["cross_attend_0", "cross_attend_1"], ["latent_transformer_0"])),
    ("all", (["cross_attend_0"], ["latent_transformer_0"])),
])
def test_weight_sharing(share, expected):
  model = Perceiver(num_classes=3, position_encoding="fourier",
                    **{**TINY, "num_iterations": 3}, share_weights=share)
  params = cost.abstract_params(model, (1, 4, 4, 3))
  assert sorted(k for k in params if k.startswith("cross")) == expected[0]
  assert sorted(k for k in params if k.startswith("latent_t")) == expected[1]


def test_shared_weights_are_used_by_every_iteration():
  # With everything shared, 2 iterations must differ from 1 using the same parameters.
  images = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
  one = Perceiver(num_classes=3, **{**TINY, "num_iterations": 1}, share_weights="all")
  two = one.clone(num_iterations=2)
  variables = _random_variables(one, images)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(two.init, jax.random.key(0), images))
  assert not np.allclose(one.apply(variables, images), two.apply(variables, images))


def test_fourier_position_encoding_values():
  features = np.asarray(fourier_position_encoding((3, 5), num_bands=2, max_resolution=(6, 10)))
  assert features.shape == (15, 2 * (2 * 2 + 1))
  # Element (row 2, col 1): coordinates (1.0, -0.5); bands (1, 3) for rows, (1, 5) for cols.
  y, x = 1.0, -0.5
  scaled = np.array([y * 1, y * 3, x * 1, x * 5])
  expected = np.concatenate([[y, x], np.sin(np.pi * scaled), np.cos(np.pi * scaled)])
  np.testing.assert_allclose(features[2 * 5 + 1], expected, atol=1e-6)


def test_cross_attention_shapes_and_attention_maps():
  model = Perceiver(num_classes=4, position_encoding="fourier", cross_attention_heads=2,
                    cross_attention_width=16, **TINY)
  images = jnp.ones((2, 4, 8, 3))
  variables = _random_variables(model, images)
  logits, state = model.apply(variables, images, mutable=["intermediates"])
  assert logits.shape == (2, 4) and logits.dtype == jnp.float32
  cross = state["intermediates"]["cross_attend_0"]["attention"]["attention_weights"]
  # One map per call of the shared cross-attend; [batch, heads, latents, inputs].
  assert cross[0].shape == (2, 2, 8, 32)
  np.testing.assert_allclose(cross[0].sum(-1), 1.0, rtol=1e-5)
  latent = state["intermediates"]["latent_transformer_0"]["block_0"]["attention"]
  assert latent["attention_weights"][0].shape == (2, 4, 8, 8)


def test_flops_linear_in_inputs():
  """Doubling the inputs at most doubles (x2.1) the cross-attend's and the model's FLOPs,
  while a ViT over the same tokens grows by more."""
  small, large = (1, 32, 32, 3), (1, 32, 64, 3)  # 1,024 and 2,048 input elements.
  cross = LatentCrossAttention(num_heads=1)
  latents = jax.ShapeDtypeStruct((1, 64, 64), jnp.float32)

  def cross_flops(num_inputs):
    inputs = jax.ShapeDtypeStruct((1, num_inputs, 32), jnp.float32)
    params = jax.eval_shape(cross.init, jax.random.key(0), latents, inputs)
    return cost.compiled_flops(cross.apply, params, latents, inputs)

  cross_ratio = cross_flops(2048) / cross_flops(1024)
  assert 1.5 < cross_ratio <= 2.1, cross_ratio

  perceiver = Perceiver(num_classes=10, position_encoding="fourier", num_bands=8, num_latents=64,
                        latent_dim=64, num_iterations=2, latent_depth=2, latent_heads=4)
  perceiver_ratio = cost.forward_flops(perceiver, large) / cost.forward_flops(perceiver, small)
  assert perceiver_ratio <= 2.1, perceiver_ratio

  vit = ViT(num_classes=10, patch_size=1, embed_dim=64, depth=2, num_heads=4, mlp_dim=64,
            pooling="gap")
  vit_ratio = cost.forward_flops(vit, large) / cost.forward_flops(vit, small)
  assert vit_ratio > 2.1 and vit_ratio > perceiver_ratio + 0.5, (vit_ratio, perceiver_ratio)


def test_dropout_uses_dropout_rng():
  model = Perceiver(num_classes=3, **TINY, dropout_rate=0.3, attention_dropout_rate=0.3)
  images = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
  variables = _random_variables(model, images)
  a = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)})
  b = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)
  np.testing.assert_allclose(model.apply(variables, images), model.apply(variables, images))


def test_fits_a_small_batch_with_lamb():
  """LAMB scales each update by ||w|| / ||update||: a zero-initialised head would stay near
  zero, so the head starts from a non-zero init and the loss must fall fast."""
  model = Perceiver(num_classes=4, patch_size=2, input_embedding_dim=32,
                    position_encoding="learned", **{**TINY, "num_iterations": 1})
  images = jax.random.normal(jax.random.key(5), (16, 8, 8, 3))
  labels = jnp.arange(16) % 4
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  assert float(jnp.abs(params["head"]["kernel"]).min()) > 0
  optimizer = optax.lamb(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("fields,shape,match", [
    (dict(position_encoding="sine"), (1, 4, 4, 3), "position_encoding"),
    (dict(share_weights="some"), (1, 4, 4, 3), "share_weights"),
    (dict(patch_size=3), (1, 4, 4, 3), "patch_size"),
    (dict(num_iterations=0), (1, 4, 4, 3), "num_iterations"),
    (dict(latent_heads=3), (1, 4, 4, 3), "latent_heads"),
    (dict(cross_attention_heads=2), (1, 4, 4, 3), "cross_attention_heads"),
])
def test_bad_fields_raise_value_error(fields, shape, match):
  # cross_attention_heads=2 cannot split 3 RGB + 2 x (2 x 4 + 1) = 21 input channels.
  model = Perceiver(num_classes=3, **{**TINY, **fields})
  with pytest.raises(ValueError, match=match):
    cost.abstract_params(model, shape)


def test_config_presets():
  for preset in perceiver_config.PRESETS:
    config = perceiver_config.get_config(preset)
    assert config.model.name == "perceiver"
  imagenet = perceiver_config.get_config("imagenet")
  assert imagenet.optimizer.schedule == "step"
  assert tuple(imagenet.optimizer.decay_epochs) == (84, 102, 114)
  assert imagenet.optimizer.name == "lamb" and imagenet.optimizer.learning_rate == 4e-3
  with pytest.raises(ValueError, match="keras"):
    perceiver_config.get_config("nope")


def test_imagenet_preset_carries_the_papers_stated_recipe():
  # arXiv 2103.03206v2 Sec. 4.1: LAMB, 120 epochs, lr 0.004 divided by 10 at epochs 84,
  # 102 and 114, no warmup named. Weight decay 0.1 is borrowed from deepmind-research
  # perceiver/train/experiment.py (the paper states none); batch 1024 is not stated either.
  config = perceiver_config.get_config("imagenet")
  opt = config.optimizer
  assert (config.num_epochs, config.batch_size) == (120.0, 1024)
  assert (opt.name, opt.learning_rate, opt.weight_decay) == ("lamb", 4e-3, 0.1)
  assert (opt.warmup_steps, opt.warmup_epochs, opt.cooldown_epochs) == (0, 0.0, 0.0)
  assert (opt.label_smoothing, opt.grad_clip_norm, opt.ema_decay) == (0.0, 0.0, 0.0)
  per_epoch = 1_281_167 // 1024
  schedule = optim.learning_rate_schedule(opt, per_epoch, 120 * per_epoch)
  lr = lambda epoch: float(schedule(int(epoch * per_epoch)))
  for epoch, expected in [(0, 4e-3), (83.9, 4e-3), (84, 4e-4), (101.9, 4e-4), (102, 4e-5),
                          (114, 4e-6), (119.9, 4e-6)]:
    assert lr(epoch) == pytest.approx(expected, rel=1e-5), epoch
