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


@pytest.mark.parametrize("tokens, head_dim", [(64, 8), (16, 8)])  # transposed form, plain
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_products_have_autodiffs_gradients(tokens, head_dim, dtype):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, tokens, head_dim), dtype)
             for i in range(3))

  def attend(logits_fn, values_fn, q, k, v):
    weights = jax.nn.softmax(logits_fn(q, k), axis=-1).astype(dtype)
    return jnp.sum(jnp.sin(values_fn(weights, v).astype(jnp.float32)))

  ours = jax.grad(functools.partial(attend, layers.attention_logits, layers.attention_values),
                  argnums=(0, 1, 2))(q, k, v)
  autodiff = jax.grad(functools.partial(
      attend, lambda q, k: jnp.einsum("bhnk,bhmk->bhnm", q, k,
                                      preferred_element_type=jnp.float32),
      lambda w, v: jnp.einsum("bhnm,bhmk->bhnk", w, v)), argnums=(0, 1, 2))(q, k, v)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(ours, autodiff):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_values_has_autodiffs_gradients(dropout, dtype):
  """The fused softmax and value product: values and gradients (logits, v) equal autodiff of
  the softmax, the dropout's scaling and the plain product, with a bias and a mask in the
  logits (Swin's shifted windows); its row sums come from the output instead of the weights."""
  b, h, n, m, d = 2, 3, 16, 24, 8
  logits = 3.0 * jax.random.normal(jax.random.key(0), (b, h, n, m))
  logits = jnp.where(jnp.arange(m) < 20, logits, jnp.finfo(jnp.float32).min)  # masked keys
  v = jax.random.normal(jax.random.key(1), (b, h, m, d), dtype)
  scale = None
  if dropout:
    scale = jax.random.bernoulli(jax.random.key(2), 0.8, (b, h, n, m)).astype(dtype) / 0.8
  cotangent = jax.random.normal(jax.random.key(3), (b, h, n, d))

  def reference(logits, v):
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    weights = weights if scale is None else weights * scale
    return jnp.einsum("bhnm,bhmk->bhnk", weights, v)

  def loss(fn, logits, v):
    return jnp.sum(fn(logits, v).astype(jnp.float32) * cotangent)

  ours = jax.value_and_grad(functools.partial(loss, lambda l, v: layers.softmax_values(
      l, v, scale)), argnums=(0, 1))(logits, v)
  autodiff = jax.value_and_grad(functools.partial(loss, reference), argnums=(0, 1))(logits, v)
  tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
  for a, b_ in zip(jax.tree.leaves(ours), jax.tree.leaves(autodiff)):
    assert a.dtype == b_.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32),
                               rtol=tolerance, atol=tolerance)


def test_mlp_gradients_equal_plain_matmuls():
  """`Mlp`'s Dense layers use `layers.dot_general` (the kernel gradient as a plain matmul on
  CPU, here with 200 rows per 16 channels): values and gradients are those of x @ w + b."""
  mlp = layers.Mlp(features=(32, 16), activation="gelu")
  x = jax.random.normal(jax.random.key(0), (4, 50, 16))
  params = mlp.init(jax.random.key(1), x)

  def plain(params, x):
    p = params["params"]
    h = layers.gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  loss = lambda f: lambda params, x: jnp.sum(jnp.sin(f(params, x)))
  np.testing.assert_allclose(mlp.apply(params, x), plain(params, x), rtol=1e-6, atol=1e-6)
  got = jax.grad(loss(mlp.apply), argnums=(0, 1))(params, x)
  expected = jax.grad(loss(plain), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               got, expected)
