"""Tests of CCT / CVT / ViT-Lite (efficient_vit/models/cct.py) and configs/cct.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cct as cct_config
from efficient_vit import cost, layers, optim
from efficient_vit.models import build_model
from efficient_vit.models.cct import CCT, ConvTokenizer, conv_tokenizer_side, he_normal_init

# Published parameter counts (README of SHI-Labs/Compact-Transformers and the paper), for
# 10 classes on CIFAR at 32 and 1,000 classes on ImageNet at 224.
PUBLISHED = {
    "cct_2_3x2": 0.284e6,
    "cct_4_3x2": 0.482e6,
    "cct_6_3x2": 3.327e6,
    "cct_7_3x2": 3.853e6,
    "cct_6_3x1": 3.168e6,
    "cct_7_3x1": 3.760e6,
    "cvt_6_4": 3.190e6,
    "cvt_7_4": 3.717e6,
    "vit_lite_6_4": 3.191e6,
    "vit_lite_7_4": 3.717e6,
    "cct_14_7x2": 22.36e6,
}


def tiny(**overrides) -> CCT:
  """A CCT small enough for behaviour tests: 2 conv layers, width 16, 2 blocks."""
  fields = dict(num_conv_layers=2, conv_channels=8, embed_dim=16, depth=2, num_heads=2,
                mlp_dim=32)
  fields.update(overrides)
  return CCT(num_classes=5, **fields)


def images(batch: int, side: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, side, side, 3))


def random_variables(model: CCT, side: int, seed: int = 0) -> dict:
  """Parameters of `model` for [*, side, side, 3] images, drawn with numpy.

  `model.init` would compile a random generator for every parameter shape, seconds of CPU
  per model; the behaviour tests need parameters, not the initialisers (those are tested on
  their own). Norm scales sit around 1, everything else around 0; the classifier is not
  zero, so differences reach the logits.
  """
  rng = np.random.default_rng(seed)
  shapes = cost.abstract_params(model, (1, side, side, 3))

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(0.3 * noise)

  return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(preset):
  config = cct_config.get_config(preset)
  num_classes = 1000 if config.dataset == "imagenet2012" else 10
  model = build_model(config.model, num_classes)
  shape = (1, config.image_size, config.image_size, 3)
  count = cost.count_params(cost.abstract_params(model, shape))
  assert abs(count - PUBLISHED[preset]) <= 0.01 * PUBLISHED[preset], (preset, count)


def test_keras_default_parameter_count():
  # The Keras example's layers, counted by hand: convs 3*9*64 + 64*9*128, position table
  # 64*128, per block 2 LayerNorms (2*256), q/k/v/out with bias and key_dim 128
  # (3*(128*256+256) + 256*128+128) and MLP 2*(128*128+128); final LayerNorm 256, pooling
  # score 129, classifier 1290.
  expected = (1728 + 73728 + 8192 + 2 * (512 + 99072 + 32896 + 33024) + 256 + 129 + 1290)
  config = cct_config.get_config()
  model = build_model(config.model, 10)
  assert cost.count_params(cost.abstract_params(model, (1, 32, 32, 3))) == expected == 416_331


def test_sequence_pooling_weights_sum_to_one_and_pool_the_tokens():
  model = tiny()
  x = images(4, 32)
  variables = random_variables(model, 32)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  weights = state["intermediates"]["sequence_pooling"]["pooling_weights"][0]
  assert weights.shape == (4, 64)  # 32 -> 16 -> 8: 64 tokens.
  assert bool(jnp.all(weights >= 0))
  np.testing.assert_allclose(weights.sum(axis=1), np.ones(4), atol=1e-5)
  # The weights depend on the example, and they are what pools the normalised tokens.
  assert float(jnp.abs(weights[0] - weights[1]).max()) > 1e-4
  tokens = state["intermediates"]["encoder_norm"]["__call__"][0]
  pooled = state["intermediates"]["sequence_pooling"]["__call__"][0]
  np.testing.assert_allclose(pooled, jnp.einsum("bn,bnd->bd", weights, tokens), atol=1e-5)


def _record_drop_paths(model, variables, x, **kwargs):
  """Runs the model and returns (rate, input, output) of every DropPath call."""
  calls = []

  def interceptor(next_fun, args, call_kwargs, context):
    out = next_fun(*args, **call_kwargs)
    if isinstance(context.module, layers.DropPath) and context.method_name == "__call__":
      calls.append((context.module.rate, args[0], out))
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, **kwargs)
  return calls


def test_stochastic_depth_is_the_identity_at_eval():
  x = images(3, 32)
  variables = random_variables(tiny(), 32)
  reference = tiny(drop_path_rate=0.0).apply(variables, x)
  heavy = tiny(drop_path_rate=0.9)
  np.testing.assert_array_equal(heavy.apply(variables, x, train=False), reference)
  calls = _record_drop_paths(heavy, variables, x, train=False)
  assert len(calls) == 4  # 2 blocks x (attention, MLP) branches.
  for _, inputs, outputs in calls:
    np.testing.assert_array_equal(outputs, inputs)
  # In training the same model is random.
  a = heavy.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = heavy.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert float(jnp.abs(a - b).max()) > 1e-6


def test_stochastic_depth_drops_whole_branches_per_example_at_the_configured_rate():
  # 3 blocks, max rate 0.5: the rates rise linearly, 0, 0.25, 0.5. Each block has two
  # branches, so each rate is observed on 2 x 2000 examples. Tolerance: 4 standard errors
  # of a binomial proportion (at most 0.032 for 4000 draws at p = 0.5).
  batch = 2000
  model = CCT(num_classes=3, tokenizer="patch", patch_size=4, embed_dim=8, depth=3,
              num_heads=2, mlp_dim=8, drop_path_rate=0.5, attention_dropout_rate=0.0)
  x = images(batch, 8)
  variables = random_variables(model, 8)
  calls = _record_drop_paths(model, variables, x, train=True,
                             rngs={"dropout": jax.random.key(3)})
  assert sorted(rate for rate, _, _ in calls) == pytest.approx([0, 0, 0.25, 0.25, 0.5, 0.5])
  dropped_by_rate = {}
  for rate, inputs, outputs in calls:
    flat_in = np.asarray(inputs).reshape(batch, -1)
    flat_out = np.asarray(outputs).reshape(batch, -1)
    dropped = np.all(flat_out == 0, axis=1)
    kept = np.all(np.isclose(flat_out, flat_in / (1 - rate), rtol=1e-5, atol=1e-6), axis=1)
    assert np.all(np.abs(flat_in).max(axis=1) > 0)  # Else "dropped" would be ambiguous.
    assert np.all(dropped ^ kept), "every example's branch is dropped whole or kept whole"
    dropped_by_rate.setdefault(rate, []).append(dropped)
  for rate, masks in dropped_by_rate.items():
    fraction = np.concatenate(masks).mean()
    tolerance = 4 * np.sqrt(rate * (1 - rate) / (len(masks) * batch))
    assert abs(fraction - rate) <= tolerance, (rate, fraction, tolerance)


def test_sine_position_embedding_runs_at_two_sizes_from_the_same_parameters():
  model = tiny(position_embedding="sine")
  variables = random_variables(model, 32)
  shapes_at_64 = jax.tree.map(lambda a: a.shape,
                              cost.abstract_params(model, (2, 64, 64, 3)))
  assert jax.tree.map(lambda a: a.shape, variables["params"]) == shapes_at_64
  for side, tokens in ((32, 64), (64, 256)):
    logits, state = model.apply(variables, images(2, side), mutable=["intermediates"])
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    assert state["intermediates"]["sequence_pooling"]["pooling_weights"][0].shape == (2, tokens)


def test_learned_position_embedding_refuses_another_size_clearly():
  model = tiny(position_embedding="learned")
  variables = random_variables(model, 32)
  with pytest.raises(ValueError, match="position_embedding"):
    model.apply(variables, images(2, 64))


def test_no_position_embedding_has_no_table():
  params = cost.abstract_params(tiny(position_embedding="none"), (1, 32, 32, 3))
  assert "position_embedding" not in params


def test_cvt_and_vit_lite_differ_only_in_pooling():
  cvt = CCT(num_classes=10, tokenizer="patch", patch_size=4, embed_dim=16, depth=1,
            num_heads=2, mlp_dim=16, pooling="seq")
  vit_lite = cvt.clone(pooling="cls")
  cvt_params = cost.abstract_params(cvt, (1, 32, 32, 3))
  lite_params = cost.abstract_params(vit_lite, (1, 32, 32, 3))
  assert "sequence_pooling" in cvt_params and "class_token" not in cvt_params
  assert "class_token" in lite_params and "sequence_pooling" not in lite_params
  # ViT-Lite's position table has one more row (the class token's).
  assert cvt_params["position_embedding"]["embedding"].shape == (1, 64, 16)
  assert lite_params["position_embedding"]["embedding"].shape == (1, 65, 16)
  # The patch tokenizer has a bias, the conv tokenizer none.
  assert "bias" in cvt_params["patch_embedding"]["projection"]
  conv_params = cost.abstract_params(tiny(), (1, 32, 32, 3))["conv_tokenizer"]
  assert set(conv_params) == {"conv_0", "conv_1"}
  assert all(set(p) == {"kernel"} for p in conv_params.values())


def test_conv_tokenizer_shapes_and_he_init():
  tokenizer = ConvTokenizer(dim=384, num_layers=2, hidden_channels=64, kernel_size=7,
                            stride=2, padding=3)
  shapes = jax.eval_shape(tokenizer.init_with_output, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))
  assert shapes[0].shape == (1, 196, 384)  # 224 -> 112 -> 56 -> 28 -> 14.
  assert conv_tokenizer_side(224, 2, 7, 2, 3, 3, 2, 1) == 14
  assert conv_tokenizer_side(32, 1, 3, 1, 1, 3, 2, 1) == 16
  # He-normal, as PyTorch's kaiming_normal_: untruncated N(0, 2 / fan_in).
  kernel = np.asarray(he_normal_init(jax.random.key(0), (3, 3, 64, 128)))
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 64)), rtol=0.03)
  assert np.abs(kernel).max() > 3 * np.sqrt(2 / (9 * 64))  # Tails are not cut at 2 std.
  # The output is ReLU'd and max-pooled: never negative.
  model = ConvTokenizer(dim=8, num_layers=1)
  params = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(0).normal(size=s.shape),
                                              jnp.float32),
                        jax.eval_shape(model.init, jax.random.key(0), images(1, 16)))
  out = model.apply(params, images(1, 16))
  assert out.shape == (1, 64, 8) and bool(jnp.all(out >= 0)) and bool(jnp.any(out > 0))


def test_attention_maps_are_sown_for_every_block():
  model = tiny()
  _, state = model.apply(random_variables(model, 32), images(2, 32), mutable=["intermediates"])
  maps = jax.tree.leaves(state["intermediates"]["encoder"])
  assert len(maps) == 2 and all(m.shape == (2, 2, 64, 64) for m in maps)


@pytest.mark.parametrize("field,value", [("tokenizer", "pixels"), ("pooling", "gap"),
                                         ("position_embedding", "rope")])
def test_unknown_options_raise_value_error_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"model.{field}.*allowed"):
    tiny(**{field: value}).init(jax.random.key(0), images(1, 32))


def test_bad_sizes_raise_value_error():
  with pytest.raises(ValueError, match="patch_size"):
    CCT(num_classes=2, tokenizer="patch", patch_size=5, embed_dim=8, depth=1, num_heads=2,
        mlp_dim=8).init(jax.random.key(0), images(1, 32))
  with pytest.raises(ValueError, match="num_conv_layers"):  # 8 -> 1 -> 1 -> nothing.
    tiny(conv_kernel_size=7, conv_stride=2, conv_padding=0).init(jax.random.key(0),
                                                                  images(1, 8))


def test_unknown_preset_lists_the_allowed_ones():
  with pytest.raises(ValueError, match="cct_7_3x1"):
    cct_config.get_config("cct_99")


def test_default_config_is_the_keras_recipe():
  c = cct_config.get_config()
  assert (c.dataset, c.image_size, c.batch_size, c.num_epochs) == ("cifar10", 32, 128, 30.0)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay,
          c.optimizer.label_smoothing) == ("adamw", 1e-3, 1e-4, 0.1)
  assert (c.model.depth, c.model.embed_dim, c.model.num_heads, c.model.drop_path_rate,
          c.model.position_embedding) == (2, 128, 2, 0.1, "learned")
  paper = cct_config.get_config("cct_7_3x1")
  assert (paper.optimizer.learning_rate, paper.optimizer.weight_decay,
          paper.optimizer.warmup_epochs, paper.num_epochs) == (5.5e-4, 0.06, 10.0, 310.0)


# The official timm configs of SHI-Labs/Compact-Transformers, key by key: configs/datasets/
# cifar10.yml (= configs/pretrained/cct_7-3x1_cifar10_300epochs.yml for these keys) and
# configs/pretrained/cct_14-7x2_imagenet.yml. num_epochs = `epochs` + `cooldown_epochs`.
OFFICIAL_RECIPES = {
    "cifar10": dict(batch_size=128, num_epochs=310.0, name="adamw", learning_rate=5.5e-4,
                    weight_decay=0.06, warmup_epochs=10.0, warmup_start_learning_rate=1e-5,
                    min_learning_rate=1e-5, cooldown_epochs=10.0, schedule="cosine",
                    label_smoothing=0.1, ema_decay=0.0),
    "imagenet2012": dict(batch_size=1024, num_epochs=310.0, name="adamw", learning_rate=5e-4,
                         weight_decay=0.05, warmup_epochs=10.0,
                         warmup_start_learning_rate=1e-6, min_learning_rate=1e-5,
                         cooldown_epochs=10.0, schedule="cosine", label_smoothing=0.1,
                         ema_decay=0.0),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_paper_presets_carry_the_official_recipe(preset):
  config = cct_config.get_config(preset)
  expected = OFFICIAL_RECIPES[config.dataset]
  got = {k: config[k] if k in ("batch_size", "num_epochs") else config.optimizer[k]
         for k in expected}
  assert got == expected, (preset, got)
  # The same ymls' augmentation keys (`aa: rand-m9-mstd0.5-inc1`, `mixup`, `cutmix`,
  # `mixup_switch_prob`, `mixup_off_epoch`, `reprob`, `scale`, `crop_pct`).
  cifar = config.dataset == "cifar10"
  expected_augment = dict(
      crop="inception", crop_scale=(0.8, 1.0) if cifar else (0.08, 1.0),
      eval_crop_fraction=1.0 if cifar else 0.9, randaugment_num_ops=2,
      randaugment_magnitude=9.0, randaugment_magnitude_std=0.5, mixup_alpha=0.8,
      cutmix_alpha=1.0, mix_prob=1.0, mix_switch_prob=0.5,
      mix_stop_epoch=175.0 if cifar else -1.0,
      random_erasing_prob=0.0 if preset == "cct_7_3x1" else 0.25)
  got = {k: config.augment[k] for k in expected_augment}
  assert got == expected_augment, (preset, got)


def test_cifar_recipe_schedule_follows_timm_warmup_min_lr_and_cooldown():
  opt = cct_config.get_config("cct_7_3x1").optimizer
  per_epoch = 50_000 // 128
  schedule = optim.learning_rate_schedule(opt, per_epoch, 310 * per_epoch)
  lr = lambda epoch: float(schedule(int(epoch * per_epoch)))
  assert lr(0) == pytest.approx(1e-5, rel=1e-5)  # `warmup_lr`
  assert lr(10) == pytest.approx(5.5e-4, rel=1e-5)  # `lr`, at the end of the warmup
  assert 1e-5 < lr(150) < 5.5e-4
  for epoch in (300, 305, 310 - 1 / per_epoch):  # `cooldown_epochs` at `min_lr`
    assert lr(epoch) == pytest.approx(1e-5, rel=1e-5), epoch
