"""Building blocks shared by every model: MLP, drop-path, attention, encoder blocks,
patch tokenizer, position embeddings and pooling.

Every module here is a pure `flax.linen` module: parameters live outside it and
randomness arrives only through the `dropout` PRNG stream. Shapes follow the papers:
images are [batch, height, width, channels], token sequences [batch, tokens, dim].

Attention weights are sown into the `intermediates` collection under the name
`attention_weights` whenever that collection is mutable, so that
`efficient_vit.attention_maps` can read them out of any model without the models
knowing about it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
ModuleDef = Any

# Initialisers used across the models (the ones of the original ViT code).
dense_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.normal(stddev=0.02)


class Mlp(nn.Module):
  """A stack of Dense layers, the position-wise feed-forward of every transformer.

  [..., d_in] -> [..., features[-1]]. Each Dense but the last is followed by the
  activation (all of them when `activate_last`, as in the Keras examples' MLPs) and every
  Dense by dropout.
  """

  features: Sequence[int]
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  activate_last: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init,
                   bias_init=nn.initializers.normal(stddev=1e-6))(x)
      if i < len(self.features) - 1 or self.activate_last:
        x = self.activation(x)
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return x


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch of an example with probability `rate`.

  The kept branches are scaled by 1 / (1 - rate), so the expectation is unchanged and the
  module is the identity at eval time. [batch, ...] -> [batch, ...].
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
  """Stochastic-depth rate per block, rising linearly from 0 to `max_rate`."""
  return [float(r) for r in np.linspace(0.0, max_rate, depth)] if depth > 1 else [0.0] * depth


def sow_attention(module: nn.Module, weights: jax.Array) -> None:
  """Stores attention weights [batch, heads, queries, keys] when intermediates are asked for."""
  module.sow("intermediates", "attention_weights", weights)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention.

  queries [batch, n, d_q], keys/values [batch, m, d_kv] -> [batch, n, out_dim]
  (out_dim defaults to d_q). `head_dim` defaults to d_q // num_heads; the Keras examples
  set it to the model width (`key_dim`), which makes their attention wider than the model.

  The computation goes through `jax.nn.dot_product_attention`, so a GPU gets the fused
  kernel, except when attention dropout is active or the weights are being extracted:
  both need the explicit softmax.
  `bias` broadcasts to [batch, heads, n, m]; `mask` (True = attend) likewise.
  """

  num_heads: int
  head_dim: int | None = None
  out_dim: int | None = None
  attention_dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
               bias: jax.Array | None = None, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    head_dim = self.head_dim or inputs_q.shape[-1] // self.num_heads
    if self.head_dim is None and inputs_q.shape[-1] % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the width {inputs_q.shape[-1]} "
                       "(or give head_dim).")
    project = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim),
                                use_bias=self.use_bias, dtype=self.dtype, kernel_init=dense_init)
    q = project(name="query")(inputs_q)    # [b, n, heads, head_dim]
    k = project(name="key")(inputs_kv)     # [b, m, heads, head_dim]
    v = project(name="value")(inputs_kv)

    explicit = (train and self.attention_dropout_rate > 0.0) or self.is_mutable_collection(
        "intermediates")
    if explicit:
      logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      if bias is not None:
        logits = logits + bias
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      sow_attention(self, weights)
      weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=not train)
      out = jnp.einsum("bhnm,bmhd->bnhd", weights, v)
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask)
    return nn.DenseGeneral(self.out_dim or inputs_q.shape[-1], axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype, kernel_init=dense_init,
                           name="out")(out)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each with drop-path.

  [batch, tokens, dim] -> [batch, tokens, dim]. `attention` is any module factory that maps
  [batch, tokens, dim] to the same shape and takes `train` (self-attention by default,
  external attention in EANet), so the attention family is a constructor argument.
  """

  mlp_dim: int
  attention: ModuleDef
  mlp_activate_last: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_epsilon, dtype=self.dtype)
    y = self.attention(name="attention")(norm(name="attention_norm")(x), train=train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + DropPath(self.drop_path_rate)(y, train=train)
    y = Mlp((self.mlp_dim, x.shape[-1]), activate_last=self.mlp_activate_last,
            dropout_rate=self.dropout_rate, dtype=self.dtype, name="mlp")(
                norm(name="mlp_norm")(x), train=train)
    return x + DropPath(self.drop_path_rate)(y, train=train)


class Encoder(nn.Module):
  """`depth` encoder blocks with stochastic depth rising linearly over depth.

  [batch, tokens, dim] -> [batch, tokens, dim] (not normalised at the end).
  """

  depth: int
  mlp_dim: int
  attention: ModuleDef
  mlp_activate_last: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = EncoderBlock(self.mlp_dim, self.attention, mlp_activate_last=self.mlp_activate_last,
                       dropout_rate=self.dropout_rate, drop_path_rate=rate,
                       layer_norm_epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                       name=f"block_{i}")(x, train=train)
    return x


class PatchEmbedding(nn.Module):
  """Non-overlapping patches, each linearly projected to `dim` (a strided convolution).

  [batch, H, W, C] -> [batch, (H/p)(W/p), dim], or [batch, H/p, W/p, dim] with
  `flatten=False`. H and W must be multiples of the patch size.
  """

  patch_size: int
  dim: int
  flatten: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    _, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={self.patch_size}")
    x = nn.Conv(self.dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, name="projection")(images)
    return x.reshape(x.shape[0], -1, x.shape[-1]) if self.flatten else x


class LearnedPositionEmbedding(nn.Module):
  """Adds a learned embedding per token position. [batch, tokens, dim] -> same."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    table = self.param("embedding", embedding_init, (1,) + x.shape[1:])
    return x + table.astype(x.dtype)


def sinusoidal_position_embedding(num_tokens: int, dim: int) -> jax.Array:
  """The fixed 1-D sine/cosine table of "Attention is all you need": [tokens, dim].

  Even channels hold sin(pos / 10000^(2i/dim)), odd channels the cosine.
  """
  position = np.arange(num_tokens)[:, None]
  rate = 1.0 / np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
  angle = position * rate
  table = np.where(np.arange(dim)[None, :] % 2 == 0, np.sin(angle), np.cos(angle))
  return jnp.asarray(table, jnp.float32)


class SequencePooling(nn.Module):
  """Attention pooling of CCT: softmax over tokens of a learned score, then a weighted sum.

  [batch, tokens, dim] -> [batch, dim]. The weights [batch, tokens] are sown as
  `pooling_weights` into `intermediates`.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scores = nn.Dense(1, dtype=self.dtype, kernel_init=dense_init, name="score")(x)[..., 0]
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    self.sow("intermediates", "pooling_weights", weights)
    return jnp.einsum("bn,bnd->bd", weights, x)


class ClassToken(nn.Module):
  """Prepends a learned class token. [batch, tokens, dim] -> [batch, 1 + tokens, dim]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    token = self.param("token", nn.initializers.zeros, (1, 1, x.shape[-1])).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, x.shape[-1])), x], axis=1)


def classifier(x: jax.Array, num_classes: int, dtype: Dtype = jnp.float32,
               name: str = "head") -> jax.Array:
  """The final linear layer, zero-initialised as in the original ViT: [batch, d] -> [batch, classes].

  Call inside a compact module's `__call__`; the Dense attaches to that module.
  """
  return nn.Dense(num_classes, dtype=dtype, kernel_init=nn.initializers.zeros,
                  name=name)(x).astype(jnp.float32)
