"""Swin Transformer: self-attention inside local windows that shift from block to block
(Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
arXiv 2103.14030; official code: microsoft/Swin-Transformer).

images [batch, H, W, C] -> patches [batch, H/p * W/p, dim] (+ LayerNorm, + optional learned
absolute position embedding) -> stages; each stage is `depth` pre-norm blocks alternating
window attention (W-MSA) and shifted-window attention (SW-MSA), followed by patch merging
(2x2 neighbours concatenated, LayerNorm, linear 4C -> 2C) before the next stage
-> LayerNorm -> mean over tokens [batch, dim] -> logits [batch, num_classes].

Window attention partitions the [H, W] token grid into non-overlapping M x M windows and
runs multi-head attention inside each window, with a learned relative position bias read
from a (2M - 1)^2 x heads table. A shifted block first rolls the grid by (-s, -s) so that
the windows straddle the previous block's window borders, masks the attention between
tokens that only became neighbours through the cyclic roll, and rolls back afterwards.

Sizes: the patch size must divide the image, the window size must divide each stage's
feature map, and patch merging needs an even feature map. Anything else is a ValueError
naming the sizes; this implementation does not pad (the official classification code
asserts the same; only its detection/segmentation backbones pad). As in the official code,
a stage whose feature map is not larger than the window (min(H, W) <= M) uses a single
window of side min(H, W) and no shift.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficient_vit import layers

LAYER_NORM_EPSILON = 1e-5  # The official code's and the Keras example's nn.LayerNorm default.


def relative_position_index(window_size: int) -> np.ndarray:
  """Row of the relative position bias table for every (query, key) pair of a window.

  Tokens are numbered row-major inside an M x M window. For a query at (r_q, c_q) and a key
  at (r_k, c_k) the offset (r_q - r_k, c_q - c_k) lies in [-(M-1), M-1]^2, shifted to
  [0, 2M-2]^2 and numbered row-major in a (2M-1) x (2M-1) grid. Returns int [M^2, M^2].
  """
  side = np.arange(window_size)
  coords = np.stack(np.meshgrid(side, side, indexing="ij"), axis=-1).reshape(-1, 2)
  offsets = coords[:, None, :] - coords[None, :, :] + (window_size - 1)  # [M^2, M^2, 2]
  return offsets[..., 0] * (2 * window_size - 1) + offsets[..., 1]


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """[batch, H, W, dim] -> [batch * windows, M^2, dim], windows numbered row-major."""
  b, h, w, d = x.shape
  m = window_size
  x = x.reshape(b, h // m, m, w // m, m, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * (h // m) * (w // m), m * m, d)


def window_merge(windows: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: [batch * windows, M^2, dim] -> [batch, H, W, dim]."""
  m = window_size
  d = windows.shape[-1]
  x = windows.reshape(-1, height // m, width // m, m, m, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, d)


def shifted_window_mask(height: int, width: int, window_size: int,
                        shift_size: int) -> np.ndarray:
  """Which tokens of each window may attend to each other after a cyclic shift.

  After rolling the [H, W] grid by (-s, -s), the last row of windows holds rows that were
  H-M+s..H-1 and rows that were 0..s-1 (wrapped around); likewise for columns. Each axis
  therefore splits into three bands, [0, H-M), [H-M, H-s), [H-s, H), and two tokens may
  attend only if they fall in the same band on both axes. Returns bool
  [windows, M^2, M^2] (True = may attend), windows numbered as in `window_partition`.
  """

  def bands(size: int) -> np.ndarray:
    band = np.zeros(size, np.int32)
    band[size - window_size:] = 1
    band[size - shift_size:] = 2
    return band

  region = bands(height)[:, None] * 3 + bands(width)[None, :]  # [H, W]
  region = window_partition(region[None, :, :, None], window_size)[..., 0]  # [windows, M^2]
  return region[:, :, None] == region[:, None, :]


def effective_window(resolution: Sequence[int], window_size: int,
                     shift_size: int) -> tuple[int, int]:
  """The official rule: a feature map not larger than the window is one window, unshifted."""
  if min(resolution) <= window_size:
    return min(resolution), 0
  return window_size, shift_size


class ShiftedWindowAttention(nn.Module):
  """Multi-head self-attention inside M x M windows, optionally cyclically shifted by s.

  [batch, H*W, dim] -> [batch, H*W, dim] (tokens row-major over `resolution` = (H, W)).
  With shift_size = 0 this is W-MSA, otherwise SW-MSA. The attention itself is
  `layers.MultiHeadAttention` over [batch * windows, M^2, dim] with the relative position
  bias as an additive `bias` and the shift regions as a boolean `mask`; a hard mask (rather
  than the official additive -100) makes attention across regions exactly zero. Its sown
  weights are [batch * windows, heads, M^2, M^2].

  If min(H, W) <= window_size, the window shrinks to min(H, W) and the shift to 0.
  """

  num_heads: int
  resolution: tuple[int, int]
  window_size: int = 7
  shift_size: int = 0
  attention_dropout_rate: float = 0.0
  qkv_bias: bool = True
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               shifted: jax.Array | None = None) -> jax.Array:
    """`shifted` (a traced bool, one per block of a scanned stage) decides at run time
    whether this block shifts, by `shift_size`; None: `shift_size` alone decides."""
    height, width = self.resolution
    batch, tokens, dim = x.shape
    if tokens != height * width:
      raise ValueError(f"ShiftedWindowAttention got {tokens} tokens for resolution "
                       f"{height}x{width}")
    if not 0 <= self.shift_size < self.window_size:
      raise ValueError(f"model.shift_size={self.shift_size} must be in "
                       f"[0, window_size={self.window_size})")
    window, shift = effective_window(self.resolution, self.window_size, self.shift_size)
    if height % window or width % window:
      raise ValueError(f"model.window_size={window} does not divide the {height}x{width} "
                       "feature map (this implementation does not pad)")

    def roll(x, by):
      return jnp.roll(x, (by, by), axis=(1, 2))

    def maybe_roll(x, by):
      if not shift:
        return x
      if shifted is None:
        return roll(x, by)
      # One branch runs: an unshifted block of a scanned stage copies nothing.
      return jax.lax.cond(shifted, functools.partial(roll, by=by), lambda x: x, x)

    x = maybe_roll(x.reshape(batch, height, width, dim), -shift)
    windows = window_partition(x, window)  # [batch * nW, M^2, dim]

    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * window - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(window)]  # [M^2, M^2, heads]
    bias = bias.transpose(2, 0, 1)[None].astype(self.dtype)  # [1, heads, M^2, M^2]
    mask = None
    if shift:
      region_mask = jnp.asarray(shifted_window_mask(height, width, window, shift))
      if shifted is not None:  # all True (no mask) for an unshifted block
        region_mask = region_mask | ~shifted
      mask = jnp.broadcast_to(region_mask[None, :, None],
                              (batch,) + region_mask.shape[:1] + (1,) + region_mask.shape[1:])
      mask = mask.reshape((-1, 1) + region_mask.shape[1:])  # [batch * nW, 1, M^2, M^2]

    windows = layers.MultiHeadAttention(
        self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        qkv_bias=self.qkv_bias, attention_impl=self.attention_impl, dtype=self.dtype,
        name="window_attention")(windows, bias=bias, mask=mask, train=train)

    x = window_merge(windows, window, height, width)
    return maybe_roll(x, shift).reshape(batch, tokens, dim)


class PatchMerging(nn.Module):
  """Concatenates each 2x2 neighbourhood, normalises, and projects 4C -> 2C (no bias).

  [batch, H, W, C] -> [batch, H/2, W/2, 2C]. The four neighbours are concatenated in the
  official order: (even row, even col), (odd, even), (even, odd), (odd, odd).
  """

  use_norm: bool = True
  norm_epsilon: float = LAYER_NORM_EPSILON
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"patch merging needs an even feature map, got {h}x{w} (choose "
                       "image_size / patch_size divisible by 2 per merge)")
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)       # [..., row parity, ..., col parity, C]
    x = x.transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)  # col parity major
    if self.use_norm:
      x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm")(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, kernel_init=layers.dense_init,
                    name="reduction")(x)


class SwinTransformer(nn.Module):
  """Swin Transformer for classification.

  Stage i works at resolution (H / (p 2^i), W / (p 2^i)) with width embed_dim * 2^i,
  `depths[i]` blocks and `num_heads[i]` heads; even blocks use plain windows, odd blocks
  shifted ones. Official Swin-T: embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
  window_size=7, patch_size=4. The Keras example is one stage with patch_norm=False,
  absolute_position_embedding=True, merge_after_last_stage=True, merge_norm=False,
  final_norm=False.

  Sizes the patch or window does not divide raise ValueError (no padding); see the module
  docstring.

  Attributes:
    num_classes: output classes.
    patch_size: side of the square patches (4 in the paper).
    embed_dim: token width C of the first stage.
    depths: blocks per stage.
    num_heads: attention heads per stage (same length as `depths`).
    window_size: window side M.
    shift_size: cyclic shift s of the odd blocks (None: M // 2, as in the paper).
    mlp_ratio: MLP hidden width as a multiple of the stage width.
    patch_norm: LayerNorm after the patch embedding (official code: True).
    absolute_position_embedding: learned absolute position embedding added to the patches
      (official `ape`, off by default; the Keras example has one).
    merge_after_last_stage: patch merging after the last stage too (the Keras example);
      otherwise only between stages, as in the paper.
    merge_norm: LayerNorm inside patch merging (official: True; Keras example: False).
    final_norm: LayerNorm before pooling (official: True; Keras example: False).
    mlp_activation: activation of the blocks' MLPs (`layers.ACTIVATIONS`; the official
      code, timm and Keras: exact `gelu`).
    qkv_bias: biases on the q/k/v projections (official `qkv_bias=True`).
    norm_epsilon: epsilon of every LayerNorm (PyTorch's and Keras' default 1e-5).
    dropout_rate: dropout after the patch embedding, the attention projection and the MLP.
    attention_dropout_rate: dropout on the attention weights.
    drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
    scan: one `nn.scan` over each stage's blocks, so that one block per stage is traced
      and lowered instead of `depth`; whether a block shifts its windows is then a scanned
      input (the roll runs under `lax.cond`, an unshifted block's mask is all True).
      Parameters `stage{s}_blocks/...` with a leading [depth] axis
      (`efficient_vit.scan_layout`). It shrinks the program, not XLA's CPU compile time
      (Swin-T, batch 16: 20.8 s without, 22.3 s with, on a 2-core CPU): that time goes
      into code for each distinct fused kernel, which the unscanned blocks of a stage
      already share, and the four stages differ in shape; the scan's loops add kernels
      of their own (716 without, 971 with: benchmarks/PROFILE.md).
    remat: recompute each block's activations in the backward pass: `none`, `block`, or a
      `jax.checkpoint_policies` name (`layers.REMATS`).
    attention_impl: `xla`, `cudnn` or `auto` (`layers.ATTENTION_IMPLS`): the
      einsum / softmax program, or cuDNN's fused kernel via `jax.nn.dot_product_attention`,
      with the relative position bias as its `bias` and the shift regions as its `mask`.
  """

  num_classes: int
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  shift_size: int | None = None
  mlp_ratio: float = 4.0
  patch_norm: bool = True
  absolute_position_embedding: bool = False
  merge_after_last_stage: bool = False
  merge_norm: bool = True
  final_norm: bool = True
  mlp_activation: str = "gelu_tanh"
  qkv_bias: bool = True
  norm_epsilon: float = LAYER_NORM_EPSILON
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.1
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"model.depths={tuple(self.depths)} and model.num_heads="
                       f"{tuple(self.num_heads)} must have the same length (one per stage)")
    shift_size = self.window_size // 2 if self.shift_size is None else self.shift_size
    if not 0 <= shift_size < self.window_size:
      raise ValueError(f"model.shift_size={shift_size} must be in "
                       f"[0, window_size={self.window_size})")

    x = layers.PatchEmbedding(self.patch_size, self.embed_dim, flatten=False, dtype=self.dtype,
                              name="patch_embedding")(images.astype(self.dtype))
    batch, height, width, dim = x.shape
    x = x.reshape(batch, height * width, dim)
    if self.patch_norm:
      x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="patch_norm")(x)
    if self.absolute_position_embedding:
      x = layers.LearnedPositionEmbedding(name="position_embedding")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    rates = iter(layers.drop_path_rates(self.drop_path_rate, sum(self.depths)))
    for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      window, shift = effective_window((height, width), self.window_size, shift_size)
      if height % window or width % window:
        raise ValueError(f"model.window_size={self.window_size} does not divide the "
                         f"{height}x{width} feature map of stage {stage} (image "
                         f"{images.shape[1]}x{images.shape[2]}, patch_size={self.patch_size}; "
                         "no padding is done)")
      stage_rates = [next(rates) for _ in range(depth)]
      attention = functools.partial(
          ShiftedWindowAttention, num_heads=heads, resolution=(height, width),
          window_size=window, attention_dropout_rate=self.attention_dropout_rate,
          qkv_bias=self.qkv_bias, attention_impl=self.attention_impl, dtype=self.dtype)
      block = functools.partial(layers.EncoderBlock, int(dim * self.mlp_ratio),
                                mlp_activation=self.mlp_activation,
                                dropout_rate=self.dropout_rate,
                                norm_epsilon=self.norm_epsilon, dtype=self.dtype)
      if self.scan and depth:
        varying = train and self.drop_path_rate > 0.0

        def step(module, y, per_block, varying=varying):
          rate, shifted = per_block
          return module(y, train=train, drop_path_rate=rate if varying else None,
                        attention_args={"shifted": shifted})

        x = layers.scan_blocks(
            layers.remat_block(step, self.remat, prevent_cse=False),
            block(functools.partial(attention, shift_size=shift), drop_path_rate=0.0,
                  name=f"stage{stage}_blocks"),
            x, (np.asarray(stage_rates, np.float32), np.arange(depth) % 2 == 1))
      else:
        step = layers.remat_block(lambda module, y: module(y, train=train), self.remat)
        for i in range(depth):
          x = step(block(functools.partial(attention, shift_size=shift if i % 2 else 0),
                         drop_path_rate=stage_rates[i], name=f"stage{stage}_block{i}"), x)
      if stage < len(self.depths) - 1 or self.merge_after_last_stage:
        x = PatchMerging(self.merge_norm, self.norm_epsilon, dtype=self.dtype,
                         name=f"stage{stage}_merging")(
            x.reshape(batch, height, width, dim))
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)

    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="final_norm")(x)
    return layers.classifier(x.mean(axis=1), self.num_classes, self.dtype)
