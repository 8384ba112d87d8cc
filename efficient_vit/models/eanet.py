"""EANet: a ViT whose self-attention is replaced by external attention (Guo et al. 2021,
"Beyond Self-attention: External Attention using Two Linear Layers", arXiv 2105.02358),
in the form of the Keras example "Image classification with EANet".

External attention lets every token attend to S learned memory units instead of to the
other tokens: two linear maps, M_k ([d, S]) and M_v ([S, d]), shared by all examples,
with a softmax over the tokens followed by an l1 normalisation over the memory units
("double normalisation"). Its cost is O(N S d) for N tokens, linear in N, against the
O(N^2 d) of self-attention.

images [batch, H, W, C] -> patches [batch, N, dim] (+ learned position embedding)
-> `depth` pre-norm blocks of (external | self) attention and MLP
-> mean over tokens [batch, dim] -> logits [batch, num_classes].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_vit import layers

ATTENTIONS = ("external", "self")

# Added to the l1 norm over memory units so that a row of underflowed softmax values
# does not divide by zero (the example uses the same constant).
_L1_EPSILON = 1e-9


def double_normalization(logits: jax.Array, token_axis: int = -2) -> jax.Array:
  """The paper's double normalisation of external-attention logits.

  logits [..., tokens, S] -> weights [..., tokens, S]: a softmax over the tokens (so each
  memory unit distributes one unit of attention over the image), then an l1
  normalisation over the S memory units (so each token's weights sum to 1). Computed in
  float32.
  """
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=token_axis)
  return weights / (_L1_EPSILON + weights.sum(axis=-1, keepdims=True))


class ExternalAttention(nn.Module):
  """The paper's single-head external attention, `ExternalAttention(d_model, S)`.

  x [batch, tokens, d] -> M_k: [batch, tokens, S] -> double normalisation
  -> M_v: [batch, tokens, d_model]. M_k and M_v are bias-free linear maps, initialised
  N(0, 0.001^2) as in the authors' code. The weights [batch, 1, tokens, S] (one head;
  queries = tokens, keys = memory units) are sown as attention weights.

  Attributes:
    d_model: output width (the input width in the paper, where they are equal).
    S: number of memory units (the paper's S, 64 by default).
    attention_dropout_rate: dropout on the normalised weights (0 in the paper).
  """

  d_model: int
  S: int = 64  # pylint: disable=invalid-name
  attention_dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    memory = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                               kernel_init=nn.initializers.normal(stddev=1e-3))
    logits = memory(self.S, name="memory_key")(x)                     # [b, n, S]
    weights = double_normalization(logits).astype(self.dtype)
    layers.sow_attention(self, weights[:, None])                      # [b, 1, n, S]
    weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=not train)
    return memory(self.d_model, name="memory_value")(weights)        # [b, n, d_model]


class MultiHeadExternalAttention(nn.Module):
  """Multi-head external attention of the Keras EANet example.

  x [batch, tokens, dim] -> Dense to dim * dim_coefficient -> split into
  heads = num_heads * dim_coefficient heads of width dim / num_heads
  -> M_k (one Dense shared by all heads, head width -> S units): [batch, heads, tokens, S]
  -> double normalisation -> attention dropout
  -> M_v (shared Dense, S -> head width) -> merge heads [batch, tokens, dim * dim_coefficient]
  -> Dense back to out_dim (default dim) -> projection dropout.

  The weights [batch, heads, tokens, S] are sown as attention weights (queries = tokens,
  keys = memory units). Cost O(tokens * S * dim * dim_coefficient): linear in tokens.

  Attributes:
    num_heads: heads before the coefficient; must divide the input width.
    dim_coefficient: widening of the projection and multiplier of the head count.
    memory_units: S per head; None gives dim // dim_coefficient, as in the example.
    out_dim: output width; None keeps the input width.
    attention_dropout_rate: dropout on the normalised weights.
    projection_dropout_rate: dropout after the output projection.
  """

  num_heads: int = 4
  dim_coefficient: int = 4
  memory_units: int | None = None
  out_dim: int | None = None
  attention_dropout_rate: float = 0.0
  projection_dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, dim = x.shape
    if self.num_heads < 1 or dim % self.num_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must divide the width {dim}.")
    if self.dim_coefficient < 1:
      raise ValueError(f"model.dim_coefficient={self.dim_coefficient} must be >= 1.")
    memory_units = self.memory_units or dim // self.dim_coefficient
    if memory_units < 1:
      raise ValueError(f"model.memory_units={self.memory_units}: width // dim_coefficient = "
                       f"{dim} // {self.dim_coefficient} is 0; give model.memory_units >= 1.")
    heads = self.num_heads * self.dim_coefficient
    head_dim = dim // self.num_heads  # = dim * dim_coefficient // heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=layers.dense_init)

    x = dense(dim * self.dim_coefficient, name="input_projection")(x)
    x = x.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)  # [b, h, n, hd]
    logits = dense(memory_units, name="memory_key")(x)                   # [b, h, n, S]
    weights = double_normalization(logits).astype(self.dtype)
    layers.sow_attention(self, weights)
    weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=not train)
    x = dense(head_dim, name="memory_value")(weights)                    # [b, h, n, hd]
    x = x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
    x = dense(self.out_dim or dim, name="output_projection")(x)
    return nn.Dropout(self.projection_dropout_rate)(x, deterministic=not train)


class EANet(nn.Module):
  """External Attention Transformer, and its self-attention twin (`attention="self"`).

  Structure of the Keras example: patches embedded by one linear map (a strided
  convolution here: the same parameters as its patch extraction + Dense) plus a learned
  position embedding; `depth` pre-norm blocks (LayerNorm eps 1e-5) of attention and a
  [mlp_dim, embed_dim] GELU MLP, with no final LayerNorm; mean over tokens; Dense head.

  Parameter counts with 100 classes (CIFAR-100 at 32, patch 2: 256 tokens, dim 64,
  8 blocks, 4 heads, coefficient 4, MLP 64), the same as the Keras model's trainable
  weights, term for term:
    attention="external": 361,380. Per block: LayerNorms 2 x 128, input projection
      64*256+256 = 16,640, M_k 16*16+16 = 272, M_v 16*16+16 = 272, output projection
      256*64+64 = 16,448, MLP 64*64+64 + 64*64+64 = 8,320 -> 42,208; x 8 = 337,664;
      plus patch embedding 2*2*3*64+64 = 832, position embedding 256*64 = 16,384 and
      head 64*100+100 = 6,500. The example's "0.3M" is this 0.36M, truncated.
    attention="self" (key_dim = head_dim = 64): 623,268. Per block the attention has
      3 x (64*256+256) + 256*64+64 = 66,368 (32,736 more than external) -> 74,944;
      x 8 = 599,552, plus the same 23,716 outside the blocks. The example's "0.6M".
  The Keras model also holds 7 non-trainable numbers (the Normalization layer's mean,
  variance and count), which are input preprocessing, not model weights.

  Dropout: `dropout_rate` is applied by `layers.EncoderBlock` after each attention
  branch (the spot of the example's projection dropout, so the external-attention
  module's own projection dropout stays 0 here) and after each MLP Dense (the example's
  MLP `drop_rate`, also 0.2). The example's self-attention twin has no dropout after its
  attention output; here it gets `dropout_rate` there too, since the shared block has one
  rate for both places.

  Attributes:
    num_classes: output classes.
    patch_size: side of the square patches.
    embed_dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads (external attention uses num_heads * dim_coefficient).
    dim_coefficient: external attention's widening factor.
    memory_units: external attention's S; None: embed_dim // dim_coefficient.
    mlp_dim: hidden width of each block's MLP.
    attention: `external` or `self`.
    head_dim: per-head width of q/k/v when attention="self" (None: embed_dim //
      num_heads; the example's key_dim is embed_dim).
    dropout_rate, attention_dropout_rate, drop_path_rate: regularisers.
    mlp_activation: activation of the blocks' MLPs (`layers.ACTIVATIONS`; Keras' "gelu"
      is the exact `gelu`).
    norm_epsilon: epsilon of the blocks' LayerNorms (Keras' 1e-5).
    scan: `nn.scan` over the encoder blocks (one block compiled instead of each; parameters
      stacked on a leading [depth] axis, `efficient_vit.scan_layout` converts).
    remat: recompute each block's activations in the backward pass: `none`, `block`, or a
      `jax.checkpoint_policies` name (`layers.REMATS`).
    attention_impl: `xla`, `cudnn` or `auto` (`layers.ATTENTION_IMPLS`): the
      einsum / softmax program, or cuDNN's fused kernel via `jax.nn.dot_product_attention`
      (attention="self" only; external attention has no softmax over keys to fuse).
  """

  num_classes: int
  patch_size: int = 2
  embed_dim: int = 64
  depth: int = 8
  num_heads: int = 4
  dim_coefficient: int = 4
  memory_units: int | None = None
  mlp_dim: int = 64
  attention: str = "external"
  head_dim: int | None = None
  dropout_rate: float = 0.2
  attention_dropout_rate: float = 0.2
  drop_path_rate: float = 0.0
  mlp_activation: str = "gelu_tanh"
  norm_epsilon: float = 1e-5
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if self.attention not in ATTENTIONS:
      raise ValueError(f"model.attention={self.attention!r}; allowed: {', '.join(ATTENTIONS)}")
    layers.check_attention_impl(self.attention_impl)  # checked even where unused
    if self.embed_dim % self.num_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must divide "
                       f"model.embed_dim={self.embed_dim}.")
    x = layers.PatchEmbedding(self.patch_size, self.embed_dim, dtype=self.dtype,
                              name="patch_embedding")(images.astype(self.dtype))
    x = layers.LearnedPositionEmbedding(name="position_embedding")(x)
    if self.attention == "external":
      attention = functools.partial(
          MultiHeadExternalAttention, num_heads=self.num_heads,
          dim_coefficient=self.dim_coefficient, memory_units=self.memory_units,
          attention_dropout_rate=self.attention_dropout_rate,
          projection_dropout_rate=0.0,  # EncoderBlock's dropout_rate sits at that spot.
          dtype=self.dtype)
    else:
      attention = functools.partial(layers.MultiHeadAttention, num_heads=self.num_heads,
                                    head_dim=self.head_dim,
                                    attention_dropout_rate=self.attention_dropout_rate,
                                    attention_impl=self.attention_impl, dtype=self.dtype)
    x = layers.Encoder(self.mlp_dim, attention, depth=self.depth,
                       mlp_activation=self.mlp_activation,
                       dropout_rate=self.dropout_rate, drop_path_rate=self.drop_path_rate,
                       norm_epsilon=self.norm_epsilon, scan=self.scan, remat=self.remat,
                       dtype=self.dtype, name="encoder")(x, train=train)
    return layers.classifier(x.mean(axis=1), self.num_classes, self.dtype)
