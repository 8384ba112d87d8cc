"""CCT, CVT and ViT-Lite: compact transformers for small data (Hassani et al. 2021,
"Escaping the Big Data Paradigm with Compact Transformers", arXiv 2104.05704).

One module covers the paper's three families; they differ only in the tokenizer and the
pooling:

  CCT       conv tokenizer  + sequence pooling
  CVT       patch tokenizer + sequence pooling
  ViT-Lite  patch tokenizer + class token

images [batch, H, W, C]
-> tokens [batch, N, dim]: either `num_conv_layers` x (conv, ReLU, max-pool) then flatten
   (the convolutional tokenizer), or non-overlapping p x p patches linearly projected
-> (+ class token) (+ learned or sinusoidal position embedding, or none)
-> `depth` pre-norm blocks of multi-head self-attention and MLP, stochastic depth rising
   linearly from 0 in the first block to `drop_path_rate` in the last
-> LayerNorm -> sequence pooling (softmax over tokens of a learned score, weighted sum)
   or the class token -> [batch, dim] -> logits [batch, num_classes].

Differences from the official PyTorch code (SHI-Labs/Compact-Transformers), none of which
changes a parameter count:
- The blocks are the standard pre-norm block (the paper's figure and the Keras example);
  the official block also normalises the residual stream itself after the attention.
- Learned position embeddings start from N(0, 0.02) (official: truncated N(0, 0.2)) and the
  classifier from zeros (official: truncated N(0, 0.02)), as everywhere in this codebase.
- There is no dropout on the embedded tokens (it is 0 in every official preset).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_vit import layers

TOKENIZERS = ("conv", "patch")
POOLINGS = ("seq", "cls")
POSITION_EMBEDDINGS = ("learned", "sine", "none")

# Kaiming He's init for ReLU convolutions: N(0, 2 / fan_in), untruncated as in PyTorch's
# kaiming_normal_ (flax's `he_normal` truncates).
he_normal_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def conv_tokenizer_side(side: int, num_layers: int, kernel_size: int, stride: int,
                        padding: int, pool_kernel_size: int, pool_stride: int,
                        pool_padding: int) -> int:
  """Spatial side after the convolutional tokenizer (PyTorch's floor rule, both steps)."""
  for _ in range(num_layers):
    side = (side + 2 * padding - kernel_size) // stride + 1
    side = (side + 2 * pool_padding - pool_kernel_size) // pool_stride + 1
  return side


class ConvTokenizer(nn.Module):
  """CCT's convolutional tokenizer.

  [batch, H, W, C] -> [batch, h * w, dim]. Each of the `num_layers` layers is a
  k x k convolution (stride s, zero padding p, no bias, He init), a ReLU and a max-pool
  (pool_kernel_size, pool_stride, pool_padding; padding never wins the max). All layers but
  the last have `hidden_channels` channels, the last has `dim`. A side S becomes
  floor((S + 2p - k) / s) + 1 after the convolution, and likewise after the pooling.
  """

  dim: int
  num_layers: int = 1
  hidden_channels: int = 64
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  pool_kernel_size: int = 3
  pool_stride: int = 2
  pool_padding: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f"model.num_conv_layers={self.num_layers}; must be at least 1")
    _, h, w, _ = images.shape
    for name, side in (("height", h), ("width", w)):
      out = conv_tokenizer_side(side, self.num_layers, self.kernel_size, self.stride,
                                self.padding, self.pool_kernel_size, self.pool_stride,
                                self.pool_padding)
      if out < 1:
        raise ValueError(f"image {name} {side} leaves no tokens after {self.num_layers} conv "
                         f"layers (kernel {self.kernel_size}, stride {self.stride}) and "
                         "max-pools; use larger images or fewer model.num_conv_layers")
    x = images
    for i in range(self.num_layers):
      channels = self.dim if i == self.num_layers - 1 else self.hidden_channels
      x = nn.Conv(channels, (self.kernel_size,) * 2, strides=(self.stride,) * 2,
                  padding=((self.padding,) * 2,) * 2, use_bias=False, dtype=self.dtype,
                  kernel_init=he_normal_init, name=f"conv_{i}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (self.pool_kernel_size,) * 2, strides=(self.pool_stride,) * 2,
                      padding=((self.pool_padding,) * 2,) * 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class CompactSelfAttention(nn.Module):
  """Multi-head self-attention whose q/k/v projections may go without bias.

  [batch, tokens, dim] -> [batch, tokens, dim]. With `qkv_bias=False` (the official CCT,
  timm's `qkv_bias=False`), q, k and v have no bias but the output projection keeps one;
  with `qkv_bias=True` (the Keras example) every projection has a bias. The weights are
  sown by `layers.MultiHeadAttention` as [batch, heads, tokens, tokens].
  """

  num_heads: int
  head_dim: int | None = None
  qkv_bias: bool = False
  attention_dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    y = layers.MultiHeadAttention(self.num_heads, head_dim=self.head_dim,
                                  attention_dropout_rate=self.attention_dropout_rate,
                                  use_bias=self.qkv_bias, dtype=self.dtype,
                                  name="multi_head_attention")(x, train=train)
    if not self.qkv_bias:
      # The shared block's `use_bias` covers all four projections; the output one keeps its
      # bias here, which makes the parameter count the official one.
      y = y + self.param("out_bias", nn.initializers.zeros, (y.shape[-1],)).astype(y.dtype)
    return y


class CCT(nn.Module):
  """Compact Convolutional Transformer; CVT and ViT-Lite with `tokenizer='patch'`.

  [batch, H, W, C] -> logits [batch, num_classes]. The pooled features [batch, dim] come
  from sequence pooling (`pooling='seq'`, weights [batch, tokens] sown as
  `pooling_weights`) or from a class token (`pooling='cls'`).

  Attributes:
    num_classes: output classes.
    tokenizer: `conv` (CCT) or `patch` (CVT, ViT-Lite: a p x p stride-p convolution with
      bias).
    num_conv_layers: conv tokenizer: number of conv + ReLU + max-pool layers.
    conv_channels: conv tokenizer: channels of every layer but the last (which has
      hidden_dim).
    conv_kernel_size, conv_stride, conv_padding: conv tokenizer's convolutions.
    pool_kernel_size, pool_stride, pool_padding: conv tokenizer's max-pools.
    patch_size: patch tokenizer: side of the square patches.
    hidden_dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of each block's MLP.
    head_dim: per-head width of q/k/v (None: hidden_dim // num_heads; the Keras example
      uses hidden_dim).
    qkv_bias: biases on the q/k/v projections (official: no; Keras example: yes).
    pooling: `seq` (sequence pooling: CCT, CVT) or `cls` (class token: ViT-Lite).
    position_embedding: `learned` (one vector per token, so tied to the input size),
      `sine` (fixed sine/cosine table, any input size) or `none`.
    mlp_activate_last: GELU after the second layer of each block's MLP too (Keras example).
    layer_norm_epsilon: epsilon of every LayerNorm (1e-5 in PyTorch and the Keras example).
    dropout_rate: dropout on the attention output and in the MLPs.
    attention_dropout_rate: dropout on the attention weights.
    drop_path_rate: stochastic depth of the last block; it rises linearly from 0.
  """

  num_classes: int
  tokenizer: str = "conv"
  num_conv_layers: int = 1
  conv_channels: int = 64
  conv_kernel_size: int = 3
  conv_stride: int = 1
  conv_padding: int = 1
  pool_kernel_size: int = 3
  pool_stride: int = 2
  pool_padding: int = 1
  patch_size: int = 4
  hidden_dim: int = 256
  depth: int = 7
  num_heads: int = 4
  mlp_dim: int = 512
  head_dim: int | None = None
  qkv_bias: bool = False
  pooling: str = "seq"
  position_embedding: str = "learned"
  mlp_activate_last: bool = False
  layer_norm_epsilon: float = 1e-5
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.1
  drop_path_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    for field, value, allowed in (("tokenizer", self.tokenizer, TOKENIZERS),
                                  ("pooling", self.pooling, POOLINGS),
                                  ("position_embedding", self.position_embedding,
                                   POSITION_EMBEDDINGS)):
      if value not in allowed:
        raise ValueError(f"model.{field}={value!r}; allowed: {', '.join(allowed)}")

    x = images.astype(self.dtype)
    if self.tokenizer == "conv":
      x = ConvTokenizer(self.hidden_dim, self.num_conv_layers, self.conv_channels,
                        self.conv_kernel_size, self.conv_stride, self.conv_padding,
                        self.pool_kernel_size, self.pool_stride, self.pool_padding,
                        dtype=self.dtype, name="conv_tokenizer")(x)
    else:
      x = layers.PatchEmbedding(self.patch_size, self.hidden_dim, dtype=self.dtype,
                                name="patch_embedding")(x)
    if self.pooling == "cls":
      x = layers.ClassToken(name="class_token")(x)

    if self.position_embedding == "learned":
      self._check_learned_length(x.shape[1])
      x = layers.LearnedPositionEmbedding(name="position_embedding")(x)
    elif self.position_embedding == "sine":
      x = x + layers.sinusoidal_position_embedding(x.shape[1], x.shape[2]).astype(x.dtype)

    attention = functools.partial(CompactSelfAttention, num_heads=self.num_heads,
                                  head_dim=self.head_dim, qkv_bias=self.qkv_bias,
                                  attention_dropout_rate=self.attention_dropout_rate,
                                  dtype=self.dtype)
    x = layers.Encoder(self.depth, self.mlp_dim, attention,
                       mlp_activate_last=self.mlp_activate_last,
                       dropout_rate=self.dropout_rate, drop_path_rate=self.drop_path_rate,
                       layer_norm_epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                       name="encoder")(x, train=train)
    x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, name="encoder_norm")(x)
    if self.pooling == "seq":
      x = layers.SequencePooling(dtype=self.dtype, name="sequence_pooling")(x)
    else:
      x = x[:, 0]
    return layers.classifier(x, self.num_classes, self.dtype)

  def _check_learned_length(self, num_tokens: int) -> None:
    """A learned table fits one token count: say so instead of a shape error deep in flax."""
    if self.is_initializing() or not self.has_variable("params", "position_embedding"):
      return
    table = self.variables["params"]["position_embedding"]["embedding"]
    if table.shape[1] != num_tokens:
      raise ValueError(f"model.position_embedding='learned' holds {table.shape[1]} positions but "
                       f"these images give {num_tokens} tokens; train at this image size or "
                       "use position_embedding='sine' or 'none' to change sizes")
