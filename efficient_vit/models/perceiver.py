"""Perceiver: a small learned latent array reads the image through cross-attention, and
self-attention runs only among the latents (Jaegle et al. 2021, "Perceiver: General
Perception with Iterative Attention", arXiv 2103.03206).

images [batch, H, W, C] -> input array [batch, M, C_in] (pixels or flattened patches,
optionally projected, with a Fourier or learned position encoding)
-> `num_iterations` x (cross-attend: latents [batch, N, D] attend to the inputs;
   latent Transformer: `latent_depth` self-attention blocks over the N latents)
-> LayerNorm -> mean over the latents [batch, D] -> optional MLP -> linear -> logits
[batch, num_classes].

Cost: the cross-attend is O(M N D), linear in the number of inputs M; the latent
Transformer is O(N^2 D), independent of M. With M = 224 x 224 pixels the model never forms
an M x M matrix.

Weight sharing across the iterations (`share_weights`):
  none              every cross-attend and every latent Transformer has its own weights.
  after_first       the first cross-attend and the first latent Transformer have their own
                    weights; all later iterations share one cross-attend and one latent
                    Transformer.
  after_first_cross the first cross-attend has its own weights, later cross-attends share
                    one; a single latent Transformer serves every iteration. This is the
                    paper's ImageNet model: it gives its 44.9M parameters (configs/perceiver.py).
  all               one cross-attend and one latent Transformer for every iteration (the
                    Keras example).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficient_vit import layers

POSITION_ENCODINGS = ("fourier", "learned", "none")
WEIGHT_SHARINGS = ("none", "after_first", "after_first_cross", "all")
CROSS_ATTEND_FORMS = ("pre_norm", "normalized_stream")
CROSS_ATTENTION_SCALES = ("rsqrt", "learned")


def fourier_position_encoding(grid_shape: Sequence[int], num_bands: int,
                              max_resolution: Sequence[int]) -> jax.Array:
  """The paper's Fourier features of positions on a grid: [prod(grid_shape), d (2 num_bands + 1)].

  Each of the d coordinates x is scaled to [-1, 1]; its features are sin(pi f_k x) and
  cos(pi f_k x) for num_bands frequencies f_k spaced linearly from 1 to max_resolution / 2
  (the Nyquist frequency of a signal sampled max_resolution times), plus x itself.
  Channel order: the d raw coordinates, then all sines, then all cosines.
  """
  axes = [np.linspace(-1.0, 1.0, n) for n in grid_shape]
  positions = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(grid_shape))
  frequencies = np.stack([np.linspace(1.0, r / 2.0, num_bands) for r in max_resolution])
  scaled = (positions[:, :, None] * frequencies[None]).reshape(positions.shape[0], -1)
  features = np.concatenate([positions, np.sin(np.pi * scaled), np.cos(np.pi * scaled)], axis=-1)
  return jnp.asarray(features, jnp.float32)


class LatentCrossAttention(nn.Module):
  """The cross-attend block: latents query the input array.

  latents [batch, N, D], inputs [batch, M, C] -> latents [batch, N, D]:
    z = latents + attention(q = LN(latents), k = v = LN(inputs))
    z = z + mlp(LN(z))
  Inside the attention, queries are a Dense D -> `width` of the latents, keys and values a
  Dense C -> `width` of the inputs, split into `num_heads` heads of width / num_heads, and
  an output Dense width -> D maps back to the latent width. `width` defaults to C, the
  input width (the official implementation's choice, `shape_for_attn='kv'`), so the raw
  261-channel pixel+Fourier inputs are never widened to D. Cost O(M N width).

  `form="normalized_stream"` is the Keras example's cross-attention module
  (keras-io examples/vision/perceiver_image_classification.py): the latents themselves are
  replaced by their LayerNorm before the first residual, and the sum by its LayerNorm
  before the second:
    q = LN(latents); z = q + attention(q, LN(inputs)); z = LN(z); z = z + mlp(z)
  That example's attention also has no output Dense (`output_projection=False`; width must
  then be D) and multiplies q.k by one learned scalar instead of 1 / sqrt(width)
  (`logit_scale="learned"`, Keras' `Attention(use_scale=True)`). `attention_impl`: as in
  `layers.MultiHeadAttention`.
  """

  num_heads: int = 1
  width: int | None = None
  mlp_dim: int | None = None
  mlp_activation: str = "gelu_tanh"
  norm_epsilon: float = 1e-6
  form: str = "pre_norm"
  output_projection: bool = True
  logit_scale: str = "rsqrt"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    width = self.width or inputs.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"model.cross_attention_heads={self.num_heads} must divide the "
                       f"cross-attention width {width} (model.cross_attention_width, default: "
                       "the input channels)")
    norm = functools.partial(nn.LayerNorm, epsilon=self.norm_epsilon, dtype=self.dtype)
    latent_dim = latents.shape[-1]
    if self.form not in CROSS_ATTEND_FORMS:
      raise ValueError(f"model.cross_attend_form={self.form!r}; allowed: "
                       f"{', '.join(CROSS_ATTEND_FORMS)}")
    if not self.output_projection and width != latent_dim:
      raise ValueError(f"model.cross_attention_output_projection=False needs the "
                       f"cross-attention width {width} (model.cross_attention_width, default: "
                       f"the input channels) to equal model.latent_dim={latent_dim}")
    queries = norm(name="latent_norm")(latents)
    y = layers.MultiHeadAttention(
        self.num_heads, head_dim=width // self.num_heads,
        out_dim=latent_dim if self.output_projection else None,
        attention_dropout_rate=self.attention_dropout_rate, logit_scale=self.logit_scale,
        output_projection=self.output_projection, attention_impl=self.attention_impl,
        dtype=self.dtype, name="attention")(queries, norm(name="input_norm")(inputs),
                                            train=train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    if self.form == "normalized_stream":  # the stream itself is replaced by its norms
      z = norm(name="mlp_norm")(queries + y)
      mlp_input = z
    else:
      z = latents + y
      mlp_input = norm(name="mlp_norm")(z)
    y = layers.Mlp((self.mlp_dim or latent_dim, latent_dim), activation=self.mlp_activation,
                   dropout_rate=self.dropout_rate, dtype=self.dtype,
                   name="mlp")(mlp_input, train=train)
    return z + y


class Perceiver(nn.Module):
  """Perceiver image classifier: images [batch, H, W, C] -> logits [batch, num_classes].

  The final linear layer starts from a LeCun-normal init, not `layers.classifier`'s zeros
  (see the comment at its call: LAMB cannot grow a zero-initialised layer).

  Attributes:
    num_classes: output classes.
    patch_size: side of the square patches that form the input elements; 1 = raw pixels
      (the paper). Each element is the patch's p*p*C values, flattened.
    input_embedding_dim: width of a Dense projection of each element before the position
      encoding (the Keras example's PatchEncoder, 256); None keeps the raw values (the paper).
    position_encoding: `fourier` (the paper: features concatenated to the element's
      channels), `learned` (the Keras example: a learned table added to the elements) or
      `none` (the model is then invariant to permutations of the elements).
    num_bands: Fourier frequency bands per spatial axis (2 (2 num_bands + 1) channels).
    max_resolution: the highest frequency is max_resolution / 2; None: the element grid's
      own size on each axis.
    num_latents, latent_dim: the latent array, [N, D].
    num_iterations: how many (cross-attend, latent Transformer) pairs run in sequence.
    share_weights: none | after_first | after_first_cross | all (module docstring).
    cross_attention_heads: heads of the cross-attention (the paper uses 1).
    cross_attention_width: q/k/v width of the cross-attention; None = the width of the
      input elements (the official choice). See `LatentCrossAttention`.
    latent_depth: self-attention blocks per latent Transformer.
    latent_heads: heads of the latent self-attention.
    latent_head_dim: per-head q/k/v width; None = latent_dim // latent_heads (the paper);
      the Keras example uses latent_dim (`key_dim=projection_dim`).
    mlp_dim: hidden width of every MLP; None = latent_dim (widening factor 1, the paper's
      and the Keras example's [256, 256]).
    final_norm: LayerNorm on the latents before averaging (pre-norm blocks leave them
      unnormalised; the Keras example has none).
    head_hidden_dims: widths of an MLP between the averaged latents and the classifier
      (the Keras example's [256]); empty = the paper's single linear layer.
    mlp_activation: activation of every MLP, the head's included (`layers.ACTIVATIONS`;
      the official Haiku code's `jax.nn.gelu` is `gelu_tanh`, Keras' "gelu" is `gelu`).
    norm_epsilon: epsilon of every LayerNorm.
    cross_attend_form: `pre_norm` (official: both residuals on the un-normalised latents)
      or `normalized_stream` (the Keras example: the latents, and then their sum with the
      attention, are replaced by their LayerNorms); see `LatentCrossAttention`.
    cross_attention_output_projection: an output Dense after the cross-attention (official;
      the Keras example has none, which needs cross_attention_width == latent_dim).
    cross_attention_scale: `rsqrt` (q.k / sqrt(width), official) or `learned` (one learned
      scalar, the Keras example's `Attention(use_scale=True)`).
    dropout_rate, attention_dropout_rate, head_dropout_rate: regularisers.
    scan: `nn.scan` over the self-attention blocks of each latent Transformer (one block
      compiled instead of each, however often the Transformer is reused; parameters
      stacked on a leading [depth] axis, `efficient_vit.scan_layout` converts).
    remat: recompute each block's activations in the backward pass: `none`, `block`, or a
      `jax.checkpoint_policies` name (`layers.REMATS`).
    attention_impl: `xla`, `cudnn` or `auto` (`layers.ATTENTION_IMPLS`): the
      einsum / softmax program, or cuDNN's fused kernel via `jax.nn.dot_product_attention`,
      for the latent self-attention and the cross-attention alike.
  """

  num_classes: int
  patch_size: int = 1
  input_embedding_dim: int | None = None
  position_encoding: str = "fourier"
  num_bands: int = 64
  max_resolution: int | None = None
  num_latents: int = 512
  latent_dim: int = 1024
  num_iterations: int = 8
  share_weights: str = "after_first_cross"
  cross_attention_heads: int = 1
  cross_attention_width: int | None = None
  latent_depth: int = 6
  latent_heads: int = 8
  latent_head_dim: int | None = None
  mlp_dim: int | None = None
  final_norm: bool = True
  head_hidden_dims: Sequence[int] = ()
  mlp_activation: str = "gelu_tanh"
  norm_epsilon: float = 1e-6
  cross_attend_form: str = "pre_norm"
  cross_attention_output_projection: bool = True
  cross_attention_scale: str = "rsqrt"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  head_dropout_rate: float = 0.0
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  def _check_fields(self) -> None:
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ValueError(f"model.position_encoding={self.position_encoding!r}; allowed: "
                       f"{', '.join(POSITION_ENCODINGS)}")
    if self.share_weights not in WEIGHT_SHARINGS:
      raise ValueError(f"model.share_weights={self.share_weights!r}; allowed: "
                       f"{', '.join(WEIGHT_SHARINGS)}")
    if self.cross_attention_scale not in CROSS_ATTENTION_SCALES:
      raise ValueError(f"model.cross_attention_scale={self.cross_attention_scale!r}; allowed: "
                       f"{', '.join(CROSS_ATTENTION_SCALES)}")
    if self.num_iterations < 1:
      raise ValueError(f"model.num_iterations={self.num_iterations} must be at least 1")
    if self.patch_size < 1:
      raise ValueError(f"model.patch_size={self.patch_size} must be at least 1")
    if self.num_latents < 1 or self.latent_dim < 1:
      raise ValueError(f"model.num_latents={self.num_latents} and model.latent_dim="
                       f"{self.latent_dim}: the latent array needs at least one row and column")
    if self.latent_head_dim is None and self.latent_dim % self.latent_heads:
      raise ValueError(f"model.latent_heads={self.latent_heads} must divide "
                       f"model.latent_dim={self.latent_dim} (or set model.latent_head_dim)")

  def _weight_indices(self, iteration: int) -> tuple[int, int]:
    """Which cross-attend and which latent Transformer the `iteration`-th pass uses."""
    if self.share_weights == "none":
      return iteration, iteration
    if self.share_weights == "after_first":
      return min(iteration, 1), min(iteration, 1)
    if self.share_weights == "after_first_cross":
      return min(iteration, 1), 0
    return 0, 0

  def embed_inputs(self, images: jax.Array) -> jax.Array:
    """images [batch, H, W, C] -> the input array [batch, (H/p)(W/p), C_in]."""
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of model.patch_size={p}")
    grid = (h // p, w // p)
    if self.input_embedding_dim:
      # A Dense on each flattened patch is a stride-p convolution.
      x = layers.PatchEmbedding(p, self.input_embedding_dim, dtype=self.dtype,
                                name="input_embedding")(images)
    else:
      x = images.reshape(b, grid[0], p, grid[1], p, c).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(b, grid[0] * grid[1], p * p * c)
    if self.position_encoding == "learned":
      x = layers.LearnedPositionEmbedding(name="position_embedding")(x)
    elif self.position_encoding == "fourier":
      resolution = grid if self.max_resolution is None else (self.max_resolution,) * 2
      features = fourier_position_encoding(grid, self.num_bands, resolution).astype(x.dtype)
      x = jnp.concatenate([x, jnp.broadcast_to(features, (b,) + features.shape)], axis=-1)
    return x

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    self._check_fields()
    inputs = self.embed_inputs(images.astype(self.dtype))
    inputs = nn.Dropout(self.dropout_rate)(inputs, deterministic=not train)

    latent_array = self.param("latents", nn.initializers.truncated_normal(stddev=0.02),
                              (self.num_latents, self.latent_dim))
    z = jnp.broadcast_to(latent_array.astype(self.dtype),
                         (images.shape[0],) + latent_array.shape)

    self_attention = functools.partial(
        layers.MultiHeadAttention, num_heads=self.latent_heads, head_dim=self.latent_head_dim,
        attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl, dtype=self.dtype)
    cross_attends: dict[int, nn.Module] = {}
    latent_transformers: dict[int, nn.Module] = {}
    for iteration in range(self.num_iterations):
      cross_index, latent_index = self._weight_indices(iteration)
      # Calling the same submodule again reuses its parameters: that is the weight sharing.
      if cross_index not in cross_attends:
        cross_attends[cross_index] = LatentCrossAttention(
            num_heads=self.cross_attention_heads, width=self.cross_attention_width,
            mlp_dim=self.mlp_dim, mlp_activation=self.mlp_activation,
            norm_epsilon=self.norm_epsilon, form=self.cross_attend_form,
            output_projection=self.cross_attention_output_projection,
            logit_scale=self.cross_attention_scale, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            attention_impl=self.attention_impl, dtype=self.dtype,
            name=f"cross_attend_{cross_index}")
      if latent_index not in latent_transformers:
        latent_transformers[latent_index] = layers.Encoder(
            self.mlp_dim or self.latent_dim, self_attention, depth=self.latent_depth,
            mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
            norm_epsilon=self.norm_epsilon, scan=self.scan, remat=self.remat,
            dtype=self.dtype, name=f"latent_transformer_{latent_index}")
      z = cross_attends[cross_index](z, inputs, train=train)
      z = latent_transformers[latent_index](z, train=train)

    if self.final_norm:
      z = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="latent_norm")(z)
    x = z.mean(axis=1)
    if self.head_hidden_dims:
      x = layers.Mlp(tuple(self.head_hidden_dims), activation=self.mlp_activation,
                     activate_last=True,
                     dropout_rate=self.head_dropout_rate, dtype=self.dtype,
                     name="head_mlp")(x, train=train)
    # Not layers.classifier's zero init: LAMB scales each update by ||w|| / ||update||, so a
    # zero-initialised layer only grows like (1 + lr)^t; the official code's linear layers
    # start from a truncated normal of std 1/sqrt(fan_in).
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.lecun_normal(),
                    name="head")(x).astype(jnp.float32)
