import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import vit as vit_config
from efficient_vit import cost, layers, optim
from efficient_vit.models import build_model


@pytest.mark.parametrize("pooling", ["cls", "gap", "flatten"])
def test_forward_shapes(pooling):
  model = build_model(dict(name="vit", patch_size=4, embed_dim=32, depth=2, num_heads=4,
                           mlp_dim=64, pooling=pooling, head_hidden_dims=(16,)), num_classes=7)
  images = jnp.ones((3, 16, 16, 3))
  variables = model.init(jax.random.key(0), images)
  logits = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  tokens = 16 + (pooling == "cls")
  pos = variables["params"]["position_embedding"]["embedding"]
  assert pos.shape == (1, tokens, 32)


def test_attention_weights_are_extractable_and_normalised():
  model = build_model(dict(name="vit", patch_size=4, embed_dim=32, depth=2, num_heads=4,
                           mlp_dim=64), num_classes=3)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), images)
  logits, inter = model.apply(variables, images, mutable=["intermediates"])
  weights = inter["intermediates"]["encoder"]["block_1"]["attention"]["attention_weights"][0]
  assert weights.shape == (2, 4, 17, 17)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  # The explicit path (used for extraction) and the fused one compute the same function.
  np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-4, atol=1e-5)


def test_vit_s16_parameter_count():
  # ViT-S/16 (DeiT-S): 22.05M parameters with 1,000 classes.
  config = vit_config.get_config("s16_imagenet")
  model = build_model(config.model, num_classes=1000)
  n = cost.count_params(cost.abstract_params(model, (1, 224, 224, 3)))
  assert abs(n - 22_050_664) / 22_050_664 < 1e-6


def test_keras_preset_builds_with_the_example_shape():
  config = vit_config.get_config()
  model = build_model(config.model, num_classes=100)
  params = cost.abstract_params(model, (1, 72, 72, 3))
  assert params["position_embedding"]["embedding"].shape == (1, 144, 64)
  assert params["head_mlp"]["Dense_0"]["kernel"].shape == (144 * 64, 2048)


def test_bad_fields_get_clear_errors():
  with pytest.raises(ValueError, match="model.name='vitt'; allowed: .*vit"):
    build_model(dict(name="vitt"), 10)
  with pytest.raises(ValueError, match="model.patchsize is not a field of model 'vit'"):
    build_model(dict(name="vit", patchsize=4), 10)
  model = build_model(dict(name="vit", patch_size=5, embed_dim=8, depth=1, num_heads=2,
                           mlp_dim=8), 10)
  with pytest.raises(ValueError, match="model.patch_size=5 must divide the image size 16x16"):
    model.init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="preset 'nope'"):
    vit_config.get_config("nope")


def test_extract_attention_lists_every_block():
  from efficient_vit.attention_maps import extract_attention
  model = build_model(dict(name="vit", patch_size=4, embed_dim=16, depth=3, num_heads=2,
                           mlp_dim=16, pooling="gap"), num_classes=3)
  images = jnp.ones((1, 8, 8, 3))
  maps = extract_attention(model, model.init(jax.random.key(0), images), images)
  assert sorted(maps) == [f"encoder/block_{i}/attention" for i in range(3)]
  assert all(m.shape == (1, 2, 4, 4) for m in maps.values())


def test_s16_imagenet_recipe_updates_like_big_visions_optimizer():
  """big_vision/configs/vit_s16_i1k.py: batch 1024, 90 epochs, lr 1e-3, wd 1e-4, 10k warmup
  steps, cosine, grad clip 1.0. big_vision/optax.py chains clip -> scale_by_adam ->
  scale(lr) -> add_decayed_weights(wd, kernels) -> scale_by_schedule -> scale(-1): its wd
  is not multiplied by lr, so the preset's optax.adamw weight decay must be wd / lr = 0.1.
  The two optimisers are run side by side (warmup and length shortened) and must agree."""
  config = vit_config.get_config("s16_imagenet")
  opt = config.optimizer
  assert (config.batch_size, config.num_epochs) == (1024, 90.0)
  assert (opt.name, opt.learning_rate, opt.weight_decay) == ("adamw", 1e-3, 0.1)
  assert (opt.warmup_steps, opt.schedule, opt.min_learning_rate) == (10_000, "cosine", 0.0)
  assert (opt.grad_clip_norm, opt.label_smoothing, opt.ema_decay) == (1.0, 0.0, 0.0)

  warmup, total = 3, 10
  short = opt.copy_and_resolve_references()
  short.warmup_steps = warmup

  def big_vision_multiplier(step):  # create_learning_rate_schedule(decay_type="cosine")
    progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * jnp.minimum(1.0, step / warmup)

  kernels_only = lambda params: {"dense": {"kernel": True, "bias": False}}
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                          optax.scale(1e-3), optax.add_decayed_weights(1e-4, kernels_only),
                          optax.scale_by_schedule(big_vision_multiplier), optax.scale(-1.0))
  ours, _ = optim.make_optimizer(short, steps_per_epoch=total, total_steps=total)

  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  states = [tx.init(params) for tx in (reference, ours)]
  both = [params, params]
  for step in range(total):
    scale = 0.1 if step % 2 else 3.0  # Clipping active on every other step.
    grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype),
                         params)
    for i, tx in enumerate((reference, ours)):
      updates, states[i] = tx.update(grads, states[i], both[i])
      both[i] = optax.apply_updates(both[i], updates)
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), both[1], params)
  assert min(jax.tree.leaves(moved)) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *both)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_equals_jax_dot_product_attention(dtype):
  """`layers.dot_product_attention` (einsum, softmax, einsum) against jax's own, with a bias
  and a mask (Swin's shifted windows): values and gradients."""
  b, n, m, h, d = 2, 16, 24, 3, 8
  q = jax.random.normal(jax.random.key(0), (b, n, h, d), dtype)
  k, v = (jax.random.normal(jax.random.key(i), (b, m, h, d), dtype) for i in (1, 2))
  bias = jax.random.normal(jax.random.key(3), (1, h, n, m), dtype)
  mask = jnp.broadcast_to(jnp.arange(m) < 20, (b, 1, n, m))

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, bias=bias, mask=mask).astype(jnp.float32)))

  theirs = functools.partial(jax.nn.dot_product_attention, implementation="xla")
  ours = jax.value_and_grad(functools.partial(loss, layers.dot_product_attention),
                            argnums=(0, 1, 2))(q, k, v)
  expected = jax.value_and_grad(functools.partial(loss, theirs), argnums=(0, 1, 2))(q, k, v)
  tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
  for a, b_ in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    assert a.dtype == b_.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32),
                               rtol=tolerance, atol=tolerance)
