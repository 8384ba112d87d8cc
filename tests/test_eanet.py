"""Tests of EANet and external attention (models/eanet.py, configs/eanet.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import eanet as eanet_config
from efficient_vit import cost
from efficient_vit.models import build_model
from efficient_vit.models import eanet


def _tiny(**kwargs) -> eanet.EANet:
  fields = dict(num_classes=10, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                dim_coefficient=2, mlp_dim=16)
  fields.update(kwargs)
  return eanet.EANet(**fields)


def _init(module, x, seed=0):
  """Random variables of the right shapes, drawn in numpy.

  `module.init` would compile a large threefry program per model (seconds of CPU each);
  the shapes from `jax.eval_shape` are free. The head is random too: the zero-initialised
  classifier would hide every change.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 1
    stddev = 1.0 / np.sqrt(fan_in) if name == "kernel" else 0.1
    return jnp.asarray(stddev * rng.standard_normal(leaf.shape), leaf.dtype)

  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply_with_weights(module, variables, x):
  """(output, state) with the sown attention weights in state['intermediates']."""
  return jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))(variables, x)


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def test_multi_head_external_attention_double_normalisation():
  """Weights = l1-over-S(softmax-over-tokens(M_k(heads))), recomputed here in numpy."""
  module = eanet.MultiHeadExternalAttention(num_heads=2, dim_coefficient=2, memory_units=5)
  x = jax.random.normal(jax.random.key(0), (3, 7, 8))
  variables = _init(module, x, seed=1)
  out, state = _apply_with_weights(module, variables, x)
  (weights,) = state["intermediates"]["attention_weights"]
  assert out.shape == (3, 7, 8)
  assert weights.shape == (3, 4, 7, 5)  # [batch, heads * coefficient, tokens, S]
  weights = np.asarray(weights)

  p = jax.tree.map(np.asarray, variables["params"])
  h = np.asarray(x) @ p["input_projection"]["kernel"] + p["input_projection"]["bias"]
  h = h.reshape(3, 7, 4, 4).transpose(0, 2, 1, 3)            # 4 heads of width 8 / 2
  logits = h @ p["memory_key"]["kernel"] + p["memory_key"]["bias"]
  first = _softmax(logits, axis=2)                            # over tokens
  np.testing.assert_allclose(first.sum(axis=2), 1.0, rtol=1e-6)
  expected = first / first.sum(axis=-1, keepdims=True)        # l1 over memory units
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
  # Each token's weights over the memory units sum to 1.
  np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
  # ...and the order matters: a softmax over S first would give other weights.
  assert not np.allclose(weights, _softmax(logits, axis=-1), atol=1e-3)

  merged = (weights @ p["memory_value"]["kernel"] + p["memory_value"]["bias"])
  merged = merged.transpose(0, 2, 1, 3).reshape(3, 7, 16)
  expected_out = merged @ p["output_projection"]["kernel"] + p["output_projection"]["bias"]
  np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-4, atol=1e-6)


def test_single_head_external_attention_is_the_papers():
  module = eanet.ExternalAttention(12, 6)  # ExternalAttention(d_model, S)
  x = jax.random.normal(jax.random.key(2), (2, 9, 12))
  variables = _init(module, x, seed=3)
  p = jax.tree.map(np.asarray, variables["params"])
  assert {k: v["kernel"].shape for k, v in p.items()} == {
      "memory_key": (12, 6), "memory_value": (6, 12)}
  assert cost.count_params(p) == 2 * 12 * 6  # Two bias-free linear layers.
  out, state = _apply_with_weights(module, variables, x)
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, 1, 9, 6)
  expected = _softmax(np.asarray(x) @ p["memory_key"]["kernel"], axis=1)
  expected = expected / expected.sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(weights[:, 0]), expected, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out), expected @ p["memory_value"]["kernel"],
                             rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("attention", ["external", "self"])
def test_examples_do_not_leak_into_each_other(attention):
  model = _tiny(attention=attention)
  images = jax.random.normal(jax.random.key(4), (4, 16, 16, 3))
  variables = _init(model, images, seed=5)
  perturbed = images.at[2].add(5.0 * jax.random.normal(jax.random.key(6), (16, 16, 3)))
  apply = jax.jit(model.apply)
  before = np.asarray(apply(variables, images))
  after = np.asarray(apply(variables, perturbed))
  keep = [0, 1, 3]
  np.testing.assert_allclose(after[keep], before[keep], rtol=1e-6, atol=1e-7)
  assert np.abs(after[2] - before[2]).max() > 1e-4  # The perturbed example did change.


def test_attention_weights_are_sown_for_every_block():
  model = _tiny()
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _init(model, images)
  _, state = _apply_with_weights(model, variables, images)
  blocks = state["intermediates"]["encoder"]
  assert sorted(blocks) == ["block_0", "block_1"]
  for block in blocks.values():
    (weights,) = block["attention"]["attention_weights"]
    # [batch, heads * coefficient, tokens, S = embed_dim // coefficient]
    assert weights.shape == (2, 4, 16, 8)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)


def _keras_count(num_classes: int, attention: str) -> int:
  """Trainable weights of the Keras example, layer by layer (dim 64, 256 tokens of 2x2x3)."""
  dim, tokens, patch_values, heads, coefficient, mlp = 64, 256, 2 * 2 * 3, 4, 4, 64
  dense = lambda d_in, d_out: d_in * d_out + d_out
  if attention == "external":
    head_width, memory = dim // heads, dim // coefficient
    attention_params = (dense(dim, dim * coefficient) + dense(head_width, memory)
                        + dense(memory, head_width) + dense(dim * coefficient, dim))
  else:  # keras.layers.MultiHeadAttention(num_heads=4, key_dim=64)
    attention_params = 3 * dense(dim, heads * dim) + dense(heads * dim, dim)
  block = 2 * 2 * dim + attention_params + dense(dim, mlp) + dense(mlp, dim)
  return (dense(patch_values, dim) + tokens * dim + 8 * block + dense(dim, num_classes))


@pytest.mark.parametrize("preset,attention,expected,published", [
    ("keras", "external", 361_380, 0.3e6),
    ("keras_self", "self", 623_268, 0.6e6),
])
def test_parameter_counts_match_the_keras_example(preset, attention, expected, published):
  config = eanet_config.get_config(preset)
  assert config.model.attention == attention
  model = build_model(config.model, num_classes=100)
  count = cost.count_params(cost.abstract_params(model, (1, 32, 32, 3)))
  assert count == expected == _keras_count(100, attention)
  assert published <= count < published + 0.1e6  # The example truncates to 0.1M.


def test_flops_linear_in_tokens_for_external_quadratic_for_self():
  """Compiled forward FLOPs at 64 and 256 tokens (16x16 and 32x32 images, patch 2)."""
  ratios = {}
  for attention in ("external", "self"):
    model = _tiny(attention=attention, patch_size=2, depth=1, embed_dim=32, num_heads=2,
                  head_dim=32, mlp_dim=32)
    small = cost.forward_flops(model, (1, 16, 16, 3))
    large = cost.forward_flops(model, (1, 32, 32, 3))
    ratios[attention] = large / small
  # 4x the tokens: 4x the FLOPs for a cost linear in tokens (the head is a constant).
  assert 3.8 < ratios["external"] <= 4.05, ratios
  assert ratios["self"] > 5.0, ratios


def test_attention_modules_flops_ratio():
  """The attention modules alone: external scales by 4 with 4x tokens, self by more."""
  def flops(module, tokens):
    x = jax.ShapeDtypeStruct((1, tokens, 64), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    return cost.compiled_flops(lambda p, v: module.apply({"params": p}, v), params, x)

  external = eanet.MultiHeadExternalAttention(num_heads=4, dim_coefficient=4)
  self_attention = eanet.layers.MultiHeadAttention(num_heads=4, head_dim=64)
  external_ratio = flops(external, 1024) / flops(external, 256)
  self_ratio = flops(self_attention, 1024) / flops(self_attention, 256)
  assert abs(external_ratio - 4.0) < 0.05, external_ratio
  assert self_ratio > 8.0, self_ratio


def test_train_mode_uses_dropout_and_learns():
  model = _tiny(dropout_rate=0.1, attention_dropout_rate=0.1)
  images = jax.random.normal(jax.random.key(7), (8, 16, 16, 3))
  labels = jnp.arange(8) % 10
  params = _init(model, images, seed=8)["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = tx.init(params)
  # Same parameters, two dropout keys: dropout is active and keyed by the 'dropout' stream.
  _, _, loss_a, grads = step(params, opt_state, jax.random.key(1))
  _, _, loss_b, _ = step(params, opt_state, jax.random.key(2))
  assert float(loss_a) != float(loss_b)
  # Gradients reach both memories through the double normalisation.
  memory = grads["encoder"]["block_0"]["attention"]
  assert float(jnp.abs(memory["memory_key"]["kernel"]).max()) > 0
  assert float(jnp.abs(memory["memory_value"]["kernel"]).max()) > 0
  losses = []
  for i in range(20):
    params, opt_state, loss, _ = step(params, opt_state, jax.random.key(100 + i))
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_bad_inputs_raise_value_errors():
  images = jnp.ones((1, 16, 16, 3))
  with pytest.raises(ValueError, match="model.attention='linear'.*external, self"):
    _tiny(attention="linear").init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="model.num_heads=3"):
    _tiny(num_heads=3).init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="patch_size=5"):
    _tiny(patch_size=5).init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="num_heads=3"):
    eanet.MultiHeadExternalAttention(num_heads=3).init(jax.random.key(0), jnp.ones((1, 4, 8)))


def test_config():
  config = eanet_config.get_config()
  assert config.dataset == "cifar100" and config.image_size == 32
  assert (config.train_split, config.eval_split) == ("train[:80%]", "train[80%:]")
  assert (config.batch_size, config.num_epochs) == (128, 50.0)
  assert config.optimizer.label_smoothing == 0.1
  assert (config.optimizer.learning_rate, config.optimizer.weight_decay) == (1e-3, 1e-4)
  assert (config.augment.rotation, config.augment.contrast, config.augment.zoom) == (
      0.1, 0.1, 0.2)
  config.model.memory_units = 32  # The placeholder can be overridden like any field.
  assert build_model(config.model, 100).memory_units == 32
  with pytest.raises(ValueError, match="keras, keras_self"):
    eanet_config.get_config("imagenet")
