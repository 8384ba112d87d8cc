"""ViT: full N x N self-attention over image patches, the baseline every efficient variant
is measured against (Dosovitskiy et al. 2021, arXiv 2010.11929).

images [batch, H, W, C] -> patches [batch, N, dim] (+ learned position embedding)
-> `depth` pre-norm blocks of multi-head self-attention and MLP -> LayerNorm
-> pooled [batch, dim] (class token, GAP, or the Keras example's flatten)
-> optional MLP head -> logits [batch, num_classes].

With `fc_norm=True` the LayerNorm comes after the pooling instead (timm's GAP models:
average the tokens, then normalise the average); otherwise every token is normalised and
then pooled (big_vision's and vision_transformer's GAP).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_vit import layers

POOLINGS = ("cls", "gap", "flatten")


class ViT(nn.Module):
  """Vision Transformer.

  Attributes:
    num_classes: output classes.
    patch_size: side of the square patches.
    embed_dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of each block's MLP.
    head_dim: per-head width of q/k/v (None: embed_dim // num_heads; the Keras example
      uses embed_dim, i.e. `key_dim=projection_dim`).
    pooling: `cls` (class token), `gap` (mean over tokens) or `flatten` (all tokens
      concatenated, the Keras example).
    head_hidden_dims: widths of an MLP between the pooled features and the classifier
      (the Keras example's [2048, 1024]); empty for the plain linear head.
    mlp_activation: activation of every MLP (`layers.ACTIVATIONS`): `gelu` (exact: timm,
      Keras), `gelu_tanh` (big_vision, vision_transformer), `silu`, `relu`.
    mlp_activate_last: the activation after the second layer of each block's MLP too
      (Keras example).
    norm_epsilon: epsilon of every LayerNorm (1e-6 in timm, big_vision and Keras' ViT).
    qkv_bias: biases on the q/k/v projections (timm's `qkv_bias`).
    proj_bias: bias on the attention output projection.
    fc_norm: the final LayerNorm after pooling rather than before (timm's `fc_norm`, the
      default of its `global_pool='avg'` models); only with pooling `gap`.
    dropout_rate, attention_dropout_rate, drop_path_rate, head_dropout_rate: regularisers.
    scan: `nn.scan` over the encoder blocks (one block compiled instead of each; parameters
      stacked on a leading [depth] axis, `efficient_vit.scan_layout` converts).
    remat: recompute each block's activations in the backward pass: `none`, `block`, or a
      `jax.checkpoint_policies` name (`layers.REMATS`).
    attention_impl: `xla`, `cudnn` or `auto` (`layers.ATTENTION_IMPLS`): the
      einsum / softmax program, or cuDNN's fused kernel via `jax.nn.dot_product_attention`.
  """

  num_classes: int
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  head_dim: int | None = None
  pooling: str = "cls"
  head_hidden_dims: Sequence[int] = ()
  mlp_activation: str = "gelu_tanh"
  mlp_activate_last: bool = False
  norm_epsilon: float = 1e-6
  qkv_bias: bool = True
  proj_bias: bool = True
  fc_norm: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_dropout_rate: float = 0.0
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f"model.pooling={self.pooling!r}; allowed: {', '.join(POOLINGS)}")
    if self.fc_norm and self.pooling != "gap":
      raise ValueError(f"model.fc_norm=True needs model.pooling='gap'; got "
                       f"model.pooling={self.pooling!r}")
    layers.activation_fn(self.mlp_activation)
    x = layers.PatchEmbedding(self.patch_size, self.embed_dim, dtype=self.dtype,
                              name="patch_embedding")(images.astype(self.dtype))
    if self.pooling == "cls":
      x = layers.ClassToken(name="class_token")(x)
    x = layers.LearnedPositionEmbedding(name="position_embedding")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    attention = functools.partial(layers.MultiHeadAttention, num_heads=self.num_heads,
                                  head_dim=self.head_dim,
                                  attention_dropout_rate=self.attention_dropout_rate,
                                  qkv_bias=self.qkv_bias, proj_bias=self.proj_bias,
                                  attention_impl=self.attention_impl, dtype=self.dtype)
    x = layers.Encoder(self.mlp_dim, attention, depth=self.depth,
                       mlp_activation=self.mlp_activation,
                       mlp_activate_last=self.mlp_activate_last,
                       dropout_rate=self.dropout_rate, drop_path_rate=self.drop_path_rate,
                       norm_epsilon=self.norm_epsilon, scan=self.scan, remat=self.remat,
                       dtype=self.dtype, name="encoder")(x, train=train)
    norm = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="encoder_norm")
    if not self.fc_norm:
      x = norm(x)
    if self.pooling == "cls":
      x = x[:, 0]
    elif self.pooling == "gap":
      x = x.mean(axis=1)
    else:
      x = x.reshape(x.shape[0], -1)
    if self.fc_norm:
      x = norm(x)
    if self.head_hidden_dims:
      x = nn.Dropout(self.head_dropout_rate)(x, deterministic=not train)
      x = layers.Mlp(tuple(self.head_hidden_dims), activation=self.mlp_activation,
                     activate_last=True,
                     dropout_rate=self.head_dropout_rate, dtype=self.dtype,
                     name="head_mlp")(x, train=train)
    return layers.classifier(x, self.num_classes, self.dtype)
