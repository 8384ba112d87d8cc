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
-> `depth` blocks of multi-head self-attention and MLP (`block_form`: the official CCT
   block, which normalises the residual stream after the attention, or the plain pre-norm
   block of the Keras example), stochastic depth rising linearly from 0 in the first block
   to `drop_path_rate` in the last
-> LayerNorm -> sequence pooling (softmax over tokens of a learned score, weighted sum)
   or the class token -> [batch, dim] -> logits [batch, num_classes].

With `block_form='cct'`, `mlp_activation='gelu'`, `qkv_bias=False` and
`norm_epsilon=1e-5` (the paper presets in configs/cct.py) the model computes what the
official PyTorch code (SHI-Labs/Compact-Transformers, src/cct.py and
src/utils/transformers.py) computes: tests/test_fidelity.py loads that code's weights
(vit-pytorch's copy, `vit_pytorch/cct.py`) and compares the logits. Differences in training
only, none of which changes a parameter count:
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
TOKENIZER_FORMS = ("official", "keras")

# Kaiming He's init for ReLU convolutions: N(0, 2 / fan_in), untruncated as in PyTorch's
# kaiming_normal_ (flax's `he_normal` truncates).
he_normal_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def conv_tokenizer_side(side: int, num_layers: int, kernel_size: int, stride: int,
                        padding: int, pool_kernel_size: int, pool_stride: int,
                        pool_padding: int, form: str = "official") -> int:
  """Spatial side after the convolutional tokenizer: PyTorch's floor rule for both steps
  (`official`), or a valid convolution, the padding, and TensorFlow's "same" pooling,
  ceil(S / pool_stride) (`keras`)."""
  for _ in range(num_layers):
    if form == "keras":
      side = (side - kernel_size) // stride + 1 + 2 * padding
      side = -(-side // pool_stride)
    else:
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

  `form` says where the padding goes: `official` (SHI-Labs/Compact-Transformers
  src/utils/tokenizer.py: Conv2d(padding=p), ReLU, MaxPool2d(padding=pool_padding)) or
  `keras` (keras-io examples/vision/cct.py, CCTTokenizer: Conv2D(padding="valid",
  activation="relu"), ZeroPadding2D(p), MaxPool2D(pool_kernel_size, pool_stride, "same"),
  whose "same" padding is TensorFlow's: the pool_padding field is not used, and on an even
  map the one padded row and column come after, none before). Same parameters, same token
  count at the preset's sizes, different values.
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
  form: str = "official"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f"model.num_conv_layers={self.num_layers}; must be at least 1")
    if self.form not in TOKENIZER_FORMS:
      raise ValueError(f"model.tokenizer_form={self.form!r}; allowed: "
                       f"{', '.join(TOKENIZER_FORMS)}")
    keras = self.form == "keras"
    _, h, w, _ = images.shape
    for name, side in (("height", h), ("width", w)):
      out = conv_tokenizer_side(side, self.num_layers, self.kernel_size, self.stride,
                                self.padding, self.pool_kernel_size, self.pool_stride,
                                self.pool_padding, self.form)
      if out < 1:
        raise ValueError(f"image {name} {side} leaves no tokens after {self.num_layers} conv "
                         f"layers (kernel {self.kernel_size}, stride {self.stride}) and "
                         "max-pools; use larger images or fewer model.num_conv_layers")
    x = images
    for i in range(self.num_layers):
      channels = self.dim if i == self.num_layers - 1 else self.hidden_channels
      conv_padding = "VALID" if keras else ((self.padding,) * 2,) * 2
      x = nn.Conv(channels, (self.kernel_size,) * 2, strides=(self.stride,) * 2,
                  padding=conv_padding, use_bias=False, dtype=self.dtype,
                  kernel_init=he_normal_init,
                  name=f"conv_{i}")(x)
      x = nn.relu(x)
      if keras:  # zeros after the ReLU: they take part in the max
        x = jnp.pad(x, ((0, 0), (self.padding,) * 2, (self.padding,) * 2, (0, 0)))
      # lax's "SAME" is TensorFlow's rule; the padded cells never win the max.
      pool_padding = "SAME" if keras else ((self.pool_padding,) * 2,) * 2
      x = nn.max_pool(x, (self.pool_kernel_size,) * 2, (self.pool_stride,) * 2,
                      pool_padding)
    return x.reshape(x.shape[0], -1, x.shape[-1])


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
      embed_dim).
    conv_kernel_size, conv_stride, conv_padding: conv tokenizer's convolutions.
    pool_kernel_size, pool_stride, pool_padding: conv tokenizer's max-pools.
    tokenizer_form: conv tokenizer's padding: `official` (before each convolution; the
      max-pool pads pool_padding on each side) or `keras` (the Keras example: a valid
      convolution, then zero padding after the ReLU, then a TensorFlow "same" max-pool);
      see `ConvTokenizer`.
    patch_size: patch tokenizer: side of the square patches.
    embed_dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of each block's MLP.
    head_dim: per-head width of q/k/v (None: embed_dim // num_heads; the Keras example
      uses embed_dim).
    qkv_bias: biases on the q/k/v projections (official: no; Keras example: yes); the
      output projection always has one.
    pooling: `seq` (sequence pooling: CCT, CVT) or `cls` (class token: ViT-Lite).
    position_embedding: `learned` (one vector per token, so tied to the input size),
      `sine` (fixed sine/cosine table, any input size) or `none`.
    mlp_activation: activation of the blocks' MLPs (`layers.ACTIVATIONS`; official and
      Keras: exact `gelu`).
    mlp_activate_last: the activation after the second layer of each block's MLP too
      (Keras example).
    block_form: `cct` (official: x + attn(LN(x)), then the stream is normalised, then
      + mlp) or `pre_norm` (the Keras example); see `layers.EncoderBlock`.
    norm_epsilon: epsilon of every LayerNorm (1e-5 in PyTorch and the Keras example).
    dropout_rate: dropout on the attention output and in the MLPs.
    attention_dropout_rate: dropout on the attention weights.
    drop_path_rate: stochastic depth of the last block; it rises linearly from 0.
    scan: `nn.scan` over the encoder blocks (one block compiled instead of each; parameters
      stacked on a leading [depth] axis, `efficient_vit.scan_layout` converts).
    remat: recompute each block's activations in the backward pass: `none`, `block`, or a
      `jax.checkpoint_policies` name (`layers.REMATS`).
    attention_impl: `xla`, `cudnn` or `auto` (`layers.ATTENTION_IMPLS`): the
      einsum / softmax program, or cuDNN's fused kernel via `jax.nn.dot_product_attention`.
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
  tokenizer_form: str = "official"
  patch_size: int = 4
  embed_dim: int = 256
  depth: int = 7
  num_heads: int = 4
  mlp_dim: int = 512
  head_dim: int | None = None
  qkv_bias: bool = False
  pooling: str = "seq"
  position_embedding: str = "learned"
  mlp_activation: str = "gelu_tanh"
  mlp_activate_last: bool = False
  block_form: str = "pre_norm"
  norm_epsilon: float = 1e-5
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.1
  drop_path_rate: float = 0.1
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
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
      x = ConvTokenizer(self.embed_dim, self.num_conv_layers, self.conv_channels,
                        self.conv_kernel_size, self.conv_stride, self.conv_padding,
                        self.pool_kernel_size, self.pool_stride, self.pool_padding,
                        form=self.tokenizer_form,
                        dtype=self.dtype, name="conv_tokenizer")(x)
    else:
      x = layers.PatchEmbedding(self.patch_size, self.embed_dim, dtype=self.dtype,
                                name="patch_embedding")(x)
    if self.pooling == "cls":
      x = layers.ClassToken(name="class_token")(x)

    if self.position_embedding == "learned":
      self._check_learned_length(x.shape[1])
      x = layers.LearnedPositionEmbedding(name="position_embedding")(x)
    elif self.position_embedding == "sine":
      x = x + layers.sinusoidal_position_embedding(x.shape[1], x.shape[2]).astype(x.dtype)

    attention = functools.partial(layers.MultiHeadAttention, num_heads=self.num_heads,
                                  head_dim=self.head_dim, qkv_bias=self.qkv_bias,
                                  proj_bias=True,
                                  attention_dropout_rate=self.attention_dropout_rate,
                                  attention_impl=self.attention_impl, dtype=self.dtype)
    x = layers.Encoder(self.mlp_dim, attention, depth=self.depth,
                       mlp_activation=self.mlp_activation,
                       mlp_activate_last=self.mlp_activate_last, block_form=self.block_form,
                       dropout_rate=self.dropout_rate, drop_path_rate=self.drop_path_rate,
                       norm_epsilon=self.norm_epsilon, scan=self.scan, remat=self.remat,
                       dtype=self.dtype, name="encoder")(x, train=train)
    x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="encoder_norm")(x)
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
