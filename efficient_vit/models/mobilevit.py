"""MobileViT: MobileNetV2 convolutions with transformers as convolutions (Mehta & Rastegari
2021, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer",
arXiv 2110.02178; official code apple/ml-cvnets).

images [batch, H, W, 3] -> 3x3 stem conv (stride 2) -> MV2 stages (MobileNetV2 inverted
residual blocks) -> MobileViT stages (a strided MV2 block, then a MobileViT block)
-> 1x1 conv to `last_channels` -> global average pool -> logits [batch, num_classes].

The MobileViT block [batch, h, w, C] -> [batch, h, w, C]: a 3x3 and a 1x1 conv (local
features, width d), `unfold` into p x p patches ([batch, P, N, d] with P = p^2 pixel positions
per patch and N = hw / P patches), a transformer over the N patches for each of the P pixel
positions separately, `fold` back to [batch, h, w, d], a 1x1 conv back to C, concatenation
with the block input and a 3x3 fusion conv.

Batch norm is part of the architecture: the convolutions' statistics live in the
`batch_stats` collection. Train with `model.apply(variables, x, train=True,
mutable=['batch_stats'])`; eval (`train=False`) uses the stored running averages.

Two variants of the same layout (`variant`):
  paper - ml-cvnets: convolutions without bias, each followed by batch norm (the 1x1 conv
      into the transformer has neither norm nor activation); 4 heads of width d / 4;
      FFN Dense-swish-Dense; a LayerNorm after each block's transformer stack; the
      MobileViT block returns C channels.
  keras - the Keras example "MobileViT: A mobile-friendly Transformer-based model for image
      classification" (Sayak Paul, 2021): the stem and the MobileViT block convolutions have
      biases and swish but no batch norm (only the MV2 blocks have it), 2 heads each of the
      full width d (Keras `key_dim=projection_dim`), swish after both FFN layers, no
      LayerNorm after the stack, and the fusion conv outputs d channels (so the next stage
      starts from d). Its unfolding is a plain reshape into [4, hw / 4, d], over which Keras'
      MultiHeadAttention attends jointly, i.e. over all h*w positions at once: `patch_size=1`
      (one sequence of all positions) computes exactly that. Its 3x3 convolutions pad the
      TensorFlow way (`conv_padding='same'`). With the `keras` preset's fields the model
      computes what the example's does (tests/test_fidelity_keras.py).

Attention weights are sown by `layers.MultiHeadAttention` with the family's natural shape
[batch * P, heads, N, N]: one N x N map per image and pixel position within the patch.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficient_vit import layers

VARIANTS = ("paper", "keras")

# He-normal over fan-out, the convolution init of ml-cvnets (kaiming_normal, mode fan_out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to the nearest multiple of `divisor`, never below 90% of it
  (the MobileNetV2 rule that ml-cvnets applies to the expanded width)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def unfold(x: jax.Array, patch_size: int) -> jax.Array:
  """Cuts a feature map into non-overlapping p x p patches, grouped by pixel position.

  [batch, H, W, C] -> [batch, P, N, C] with P = p * p (the position inside a patch, row
  major) and N = (H / p) * (W / p) (the patch, row major). H and W must be multiples of p.
  """
  b, h, w, c = x.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"feature map {h}x{w} is not a multiple of patch_size={p}")
  x = x.reshape(b, h // p, p, w // p, p, c)          # [b, nh, ph, nw, pw, c]
  x = x.transpose(0, 2, 4, 1, 3, 5)                  # [b, ph, pw, nh, nw, c]
  return x.reshape(b, p * p, (h // p) * (w // p), c)


def fold(patches: jax.Array, height: int, width: int, patch_size: int) -> jax.Array:
  """The exact inverse of `unfold`: [batch, P, N, C] -> [batch, height, width, C]."""
  b, area, n, c = patches.shape
  p = patch_size
  if area != p * p or n * area != height * width or height % p or width % p:
    raise ValueError(f"patches of shape {patches.shape} do not fold into a {height}x{width} "
                     f"map with patch_size={p}")
  x = patches.reshape(b, p, p, height // p, width // p, c)   # [b, ph, pw, nh, nw, c]
  x = x.transpose(0, 3, 1, 4, 2, 5)                          # [b, nh, ph, nw, pw, c]
  return x.reshape(b, height, width, c)


CONV_PADDINGS = ("symmetric", "same")


def conv_pads(size: int, kernel_size: int, strides: int, padding: str) -> tuple[int, int]:
  """Zero padding (before, after) of one spatial axis of a k x k convolution.

  symmetric: k // 2 on each side (ml-cvnets, PyTorch `padding=k // 2`).
  same: TensorFlow's / Keras' "same" (and lax's "SAME"): the output has ceil(size / s)
    positions and the total padding max((out - 1) s + k - size, 0) puts its odd cell after;
    a stride-2 3x3 conv on an even map pads nothing before and one after (Keras
    `imagenet_utils.correct_pad` gives the same for the example's depthwise convs).
  """
  if padding == "same":
    out = -(-size // strides)
    total = max((out - 1) * strides + kernel_size - size, 0)
    return total // 2, total - total // 2
  return kernel_size // 2, kernel_size // 2


class ConvBlock(nn.Module):
  """A convolution, optionally followed by batch norm and swish. [b, H, W, C] -> [b, H/s, W/s, F].

  Padding is k // 2 on every side (ml-cvnets) or TensorFlow's "same" (`padding`, see
  `conv_pads`). A 1x1 convolution is the same computation as a Dense over the channels and
  is written as one (kernel [C, F]). `depthwise` makes it a depthwise convolution (F = C: a
  grouped `nn.Conv` with one group per channel, kernel [k, k, 1, C], no bias).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  depthwise: bool = False
  use_bias: bool = False
  use_norm: bool = True
  use_activation: bool = True
  batch_norm_momentum: float = 0.9
  batch_norm_epsilon: float = 1e-5
  padding: str = "symmetric"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    pads = [conv_pads(side, self.kernel_size, self.strides, self.padding)
            for side in x.shape[1:3]]
    if self.depthwise:
      x = nn.Conv(x.shape[-1], (self.kernel_size,) * 2, strides=(self.strides,) * 2,
                  padding=pads, feature_group_count=x.shape[-1], use_bias=False,
                  kernel_init=conv_init, dtype=self.dtype, name="conv")(x)
    elif self.kernel_size == 1 and self.strides == 1:
      x = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=conv_init,
                   dtype=self.dtype, name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel_size,) * 2, strides=(self.strides,) * 2,
                  padding=pads, use_bias=self.use_bias,
                  kernel_init=conv_init, dtype=self.dtype, name="conv")(x)
    if self.use_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=self.batch_norm_momentum,
                       epsilon=self.batch_norm_epsilon, dtype=self.dtype, name="norm")(x)
    return nn.swish(x) if self.use_activation else x


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expansion (BN, swish), 3x3 depthwise with the stride (BN, swish),
  1x1 projection (BN, linear), plus the input when stride 1 keeps the shape.

  [batch, H, W, C_in] -> [batch, H / stride, W / stride, out_channels]. The expansion conv is
  left out when `expansion` is 1, as in MobileNetV2. `conv` is `ConvBlock` with the model's
  batch-norm, padding and dtype settings bound.
  """

  out_channels: int
  expansion: int
  strides: int = 1
  conv: layers.ModuleDef = ConvBlock
  depthwise_padding: str | None = None  # None: the padding `conv` has

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = self.conv
    hidden = make_divisible(round(x.shape[-1] * self.expansion))
    y = x
    if self.expansion != 1:
      y = conv(hidden, kernel_size=1, name="expand")(y, train=train)
    padding = {} if self.depthwise_padding is None else {"padding": self.depthwise_padding}
    y = conv(hidden, kernel_size=3, strides=self.strides, depthwise=True, **padding,
             name="depthwise")(y, train=train)
    y = conv(self.out_channels, kernel_size=1, use_activation=False,
             name="project")(y, train=train)
    if self.strides == 1 and x.shape[-1] == self.out_channels:
      y = y + x
    return y


class MobileViTBlock(nn.Module):
  """Local convs, a transformer over unfolded patches, fold, fuse with the input.

  [batch, h, w, C] -> [batch, h, w, C] (paper) or [batch, h, w, dim] (keras).
  With `resize_to_patches`, a map that the patch does not divide is resized (bilinear) up to
  the next multiple before unfolding and back after folding, as ml-cvnets does; otherwise
  such a map is a ValueError.
  """

  dim: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 2
  variant: str = "paper"
  resize_to_patches: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  batch_norm_momentum: float = 0.9
  batch_norm_epsilon: float = 1e-5
  norm_epsilon: float = 1e-5
  mlp_activation: str = "silu"
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    b, h, w, channels = x.shape
    p = self.patch_size
    keras = self.variant == "keras"
    # paper: BN after every conv but the 1x1 into the transformer; keras: bias + swish, no BN.
    conv = functools.partial(ConvBlock, use_bias=keras, use_norm=not keras,
                             batch_norm_momentum=self.batch_norm_momentum,
                             batch_norm_epsilon=self.batch_norm_epsilon,
                             dtype=self.dtype)
    local = conv(self.dim if keras else channels, kernel_size=3, name="local_conv")(
        x, train=train)
    local = conv(self.dim, kernel_size=1, use_norm=False, use_activation=keras,
                 name="to_transformer")(local, train=train)

    ph, pw = -(-h // p) * p, -(-w // p) * p
    if (ph, pw) != (h, w):
      if not self.resize_to_patches:
        raise ValueError(
            f"a MobileViT block sees a {h}x{w} feature map, not a multiple of "
            f"model.patch_size={p}; choose image_size so that every MobileViT stage's map is a "
            f"multiple of the patch, or set model.resize_to_patches=True (the paper's resize)")
      local = jax.image.resize(local, (b, ph, pw, self.dim), "bilinear", antialias=False)

    patches = unfold(local, p)                                     # [b, P, N, d]
    tokens = patches.reshape(b * p * p, -1, self.dim)              # one sequence per position
    # The shared pre-norm block. paper (ml-cvnets): dropout after the attention and after
    # the FFN's second Dense, none after its hidden layer (`ffn_dropout` 0); keras: no
    # dropout after the attention, the activation and dropout after both FFN Dense layers.
    attention = functools.partial(layers.MultiHeadAttention, num_heads=self.num_heads,
                                  head_dim=self.dim if keras else self.dim // self.num_heads,
                                  attention_dropout_rate=self.attention_dropout_rate,
                                  attention_impl=self.attention_impl, dtype=self.dtype)
    block = functools.partial(
        layers.EncoderBlock, self.mlp_dim, attention, mlp_activation=self.mlp_activation,
        mlp_activate_last=keras, dropout_rate=self.dropout_rate,
        attention_output_dropout_rate=0.0 if keras else None,
        mlp_hidden_dropout_rate=None if keras else 0.0,
        norm_epsilon=self.norm_epsilon, dtype=self.dtype)
    if self.scan and self.depth:  # no stochastic depth here: every block the same
      step = layers.remat_block(lambda module, y, _: module(y, train=train), self.remat,
                                prevent_cse=False)
      tokens = layers.scan_blocks(step, block(name="transformers"), tokens,
                                  np.zeros(self.depth))
    else:
      step = layers.remat_block(lambda module, y: module(y, train=train), self.remat)
      for i in range(self.depth):
        tokens = step(block(name=f"transformer_{i}"), tokens)
    if not keras:
      tokens = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype,
                            name="transformer_norm")(tokens)
    y = fold(tokens.reshape(patches.shape), ph, pw, p)             # [b, h', w', d]
    if (ph, pw) != (h, w):
      y = jax.image.resize(y, (b, h, w, self.dim), "bilinear", antialias=False)

    y = conv(channels, kernel_size=1, name="from_transformer")(y, train=train)
    y = jnp.concatenate([x, y], axis=-1)
    return conv(self.dim if keras else channels, kernel_size=3, name="fusion")(y, train=train)


class MobileViT(nn.Module):
  """MobileViT classifier.

  Attributes:
    num_classes: output classes.
    variant: `paper` (ml-cvnets) or `keras` (the Keras example); see the module docstring.
    stem_channels: width of the 3x3 stem conv.
    stage_channels: output width of each stage: first the MV2 stages, then the MobileViT
      stages (XXS: 16, 24, 48, 64, 80).
    strides: stride of the stem, then of each stage (its first MV2 block); the paper's
      (2, 1, 2, 2, 2, 2) reduces 256 to 8.
    mv2_depths: MV2 blocks per MV2-only stage (paper: 1, 3).
    expansion: MV2 expansion factor (XXS 2, XS and S 4).
    embed_dims: transformer width d of each MobileViT stage.
    transformer_depths: transformer blocks of each MobileViT stage (paper: 2, 4, 3).
    mlp_dims: FFN hidden width of each MobileViT stage (paper: 2d).
    num_heads: attention heads (paper 4, of width d / 4; Keras 2, each of width d).
    patch_size: side p of the unfolding patches (paper: 2).
    resize_to_patches: resize maps that p does not divide (the paper's bilinear resize)
      instead of raising a ValueError.
    last_channels: width of the 1x1 conv before pooling (paper: min(4 * last stage, 960)).
    dropout_rate: transformer dropout (paper: after attention and after the FFN; Keras:
      after each FFN layer).
    attention_dropout_rate: dropout on the attention weights.
    head_dropout_rate: dropout before the classifier.
    mlp_activation: activation of the transformers' FFNs (`layers.ACTIVATIONS`; ml-cvnets,
      timm and the Keras example: `silu`, i.e. swish).
    conv_padding: zero padding of the 3x3 convolutions (`conv_pads`): `symmetric` (k // 2 on
      each side, ml-cvnets) or `same` (TensorFlow's "same", the Keras example: a stride-2
      conv on an even map pads only after, so its outputs sit half a pixel elsewhere).
    depthwise_padding: the MV2 blocks' depthwise convolutions' padding, where it differs
      from `conv_padding` (None: the same): the Keras 3 example pads them `symmetric`
      (ZeroPadding2D() before its strided DepthwiseConv2D) and its stem `same`.
    scan: `nn.scan` over each MobileViT stage's transformer blocks (one block compiled per
      stage; parameters `transformers/...` with a leading [depth] axis instead of
      `transformer_0/...`, `efficient_vit.scan_layout` converts).
    remat: recompute each transformer block's activations in the backward pass: `none`,
      `block`, or a `jax.checkpoint_policies` name (`layers.REMATS`).
    attention_impl: `xla`, `cudnn` or `auto` (`layers.ATTENTION_IMPLS`): the
      einsum / softmax program, or cuDNN's fused kernel via `jax.nn.dot_product_attention`.
  """

  num_classes: int
  variant: str = "paper"
  stem_channels: int = 16
  stage_channels: Sequence[int] = (16, 24, 48, 64, 80)
  strides: Sequence[int] = (2, 1, 2, 2, 2, 2)
  mv2_depths: Sequence[int] = (1, 3)
  expansion: int = 2
  embed_dims: Sequence[int] = (64, 80, 96)
  transformer_depths: Sequence[int] = (2, 4, 3)
  mlp_dims: Sequence[int] = (128, 160, 192)
  num_heads: int = 4
  patch_size: int = 2
  resize_to_patches: bool = False
  last_channels: int = 320
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  head_dropout_rate: float = 0.1
  mlp_activation: str = "silu"
  conv_padding: str = "symmetric"
  depthwise_padding: str | None = None
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  def _check(self) -> None:
    if self.variant not in VARIANTS:
      raise ValueError(f"model.variant={self.variant!r}; allowed: {', '.join(VARIANTS)}")
    if self.depthwise_padding not in (None,) + CONV_PADDINGS:
      raise ValueError(f"model.depthwise_padding={self.depthwise_padding!r}; allowed: None, "
                       f"{', '.join(CONV_PADDINGS)}")
    if self.conv_padding not in CONV_PADDINGS:
      raise ValueError(f"model.conv_padding={self.conv_padding!r}; allowed: "
                       f"{', '.join(CONV_PADDINGS)}")
    num_vit = len(self.embed_dims)
    if len(self.transformer_depths) != num_vit or len(self.mlp_dims) != num_vit:
      raise ValueError("model.embed_dims, model.transformer_depths and model.mlp_dims "
                       f"must have one entry per MobileViT stage; got {self.embed_dims}, "
                       f"{self.transformer_depths}, {self.mlp_dims}")
    num_stages = len(self.mv2_depths) + num_vit
    if len(self.stage_channels) != num_stages:
      raise ValueError(f"model.stage_channels needs {num_stages} entries (len(mv2_depths) + "
                       f"len(embed_dims)); got {self.stage_channels}")
    if len(self.strides) != num_stages + 1 or any(s not in (1, 2) for s in self.strides):
      raise ValueError(f"model.strides needs {num_stages + 1} entries (stem + stages), each "
                       f"1 or 2; got {self.strides}")
    if self.patch_size < 1:
      raise ValueError(f"model.patch_size={self.patch_size}; allowed: a positive integer")
    if self.variant == "paper":
      for dim in self.embed_dims:
        if dim % self.num_heads:
          raise ValueError(f"model.num_heads={self.num_heads} must divide every "
                           f"model.embed_dims entry; got {self.embed_dims}")

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    self._check()
    keras = self.variant == "keras"
    # Keras layers' defaults (BN momentum 0.99, eps 1e-3; LN eps 1e-6) vs PyTorch's.
    norm = dict(batch_norm_momentum=0.99, batch_norm_epsilon=1e-3) if keras else dict(
        batch_norm_momentum=0.9, batch_norm_epsilon=1e-5)
    norm_epsilon = 1e-6 if keras else 1e-5

    conv = functools.partial(ConvBlock, padding=self.conv_padding, dtype=self.dtype, **norm)
    x = conv(self.stem_channels, kernel_size=3, strides=self.strides[0], use_bias=keras,
             use_norm=not keras, name="stem")(images.astype(self.dtype), train=train)
    stage = 0
    for depth in self.mv2_depths:
      for j in range(depth):
        x = InvertedResidual(self.stage_channels[stage], self.expansion,
                             strides=self.strides[stage + 1] if j == 0 else 1, conv=conv,
                             depthwise_padding=self.depthwise_padding,
                             name=f"stage_{stage + 1}_mv2_{j}")(x, train=train)
      stage += 1
    for dim, depth, mlp_dim in zip(self.embed_dims, self.transformer_depths,
                                   self.mlp_dims):
      x = InvertedResidual(self.stage_channels[stage], self.expansion,
                           strides=self.strides[stage + 1], conv=conv,
                           depthwise_padding=self.depthwise_padding,
                           name=f"stage_{stage + 1}_mv2")(x, train=train)
      x = MobileViTBlock(dim, depth, mlp_dim, self.num_heads, patch_size=self.patch_size,
                         variant=self.variant, resize_to_patches=self.resize_to_patches,
                         dropout_rate=self.dropout_rate,
                         attention_dropout_rate=self.attention_dropout_rate,
                         norm_epsilon=norm_epsilon,
                         mlp_activation=self.mlp_activation, scan=self.scan,
                         remat=self.remat, attention_impl=self.attention_impl,
                         dtype=self.dtype, name=f"stage_{stage + 1}_mobilevit",
                         **norm)(x, train=train)
      stage += 1
    x = ConvBlock(self.last_channels, kernel_size=1, use_bias=keras, use_norm=not keras,
                  dtype=self.dtype, name="last_conv", **norm)(x, train=train)
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(self.head_dropout_rate)(x, deterministic=not train)
    return layers.classifier(x, self.num_classes, self.dtype)
