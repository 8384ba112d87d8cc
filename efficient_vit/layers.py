"""Building blocks shared by every model: MLP, drop-path, attention, encoder blocks,
patch tokenizer, position embeddings and pooling.

Every module here is a pure `flax.linen` module: parameters live outside it and
randomness arrives only through the `dropout` PRNG stream. Shapes follow the papers:
images are [batch, height, width, channels], token sequences [batch, tokens, dim].

Attention weights are sown into the `intermediates` collection under the name
`attention_weights` whenever that collection is mutable, so that
`efficient_vit.attention_maps` can read them out of any model without the models
knowing about it.

Three fields change how the models are compiled and run, never what they compute (the
same words in every family's config): `scan` (`Encoder`, `scan_blocks`), `remat`
(`REMATS`, `remat_block`) and `attention_impl` (`ATTENTION_IMPLS`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
ModuleDef = Any

# Initialisers used across the models (the ones of the original ViT code).
dense_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.normal(stddev=0.02)


# The MLP activations a config may name (`model.mlp_activation`). PyTorch's `nn.GELU`
# (timm, the official Swin, CCT and MobileViT code) and Keras' "gelu" are the exact,
# erf-based form; the JAX originals (big_vision's and vision_transformer's ViT, the
# Perceiver's Haiku code) use flax's default, the tanh approximation. The two differ by up
# to about 1e-3 per activation, which the fidelity tests see.
gelu = functools.partial(jax.nn.gelu, approximate=False)
gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": nn.silu,
    "relu": nn.relu,
}


def activation_fn(name: str, field: str = "model.mlp_activation") -> Callable[[jax.Array],
                                                                            jax.Array]:
  """The activation called `name` in `ACTIVATIONS`; a ValueError naming `field` otherwise."""
  if not isinstance(name, str) or name not in ACTIVATIONS:
    raise ValueError(f"{field}={name!r}; allowed: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class Mlp(nn.Module):
  """A stack of Dense layers, the position-wise feed-forward of every transformer.

  [..., d_in] -> [..., features[-1]]. Each Dense but the last is followed by the
  activation (all of them when `activate_last`, as in the Keras examples' MLPs) and every
  Dense by dropout: `dropout_rate` after the last one, `hidden_dropout_rate` (None: the
  same rate) after the others. `activation` is a name of `ACTIVATIONS` or a function.
  """

  features: Sequence[int]
  activation: str | Callable[[jax.Array], jax.Array] = "gelu_tanh"
  activate_last: bool = False
  dropout_rate: float = 0.0
  hidden_dropout_rate: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    act = activation_fn(self.activation) if isinstance(self.activation, str) else self.activation
    last = len(self.features) - 1
    hidden_rate = self.dropout_rate if self.hidden_dropout_rate is None else (
        self.hidden_dropout_rate)
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init,
                   bias_init=nn.initializers.normal(stddev=1e-6))(x)
      if i < last or self.activate_last:
        x = act(x)
      x = nn.Dropout(self.dropout_rate if i == last else hidden_rate)(x, deterministic=not train)
    return x


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch of an example with probability `rate`.

  The kept branches are scaled by 1 / (1 - rate), so the expectation is unchanged and the
  module is the identity at eval time. [batch, ...] -> [batch, ...].
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               rate: float | jax.Array | None = None) -> jax.Array:
    """`rate` (a float or a traced scalar, e.g. one block's rate under `nn.scan`)
    overrides the field."""
    rate = self.rate if rate is None else rate
    if not train or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
  """Stochastic-depth rate per block, rising linearly from 0 to `max_rate`."""
  return [float(r) for r in np.linspace(0.0, max_rate, depth)] if depth > 1 else [0.0] * depth


# `model.attention_impl`: how `MultiHeadAttention` computes softmax(q k^T / sqrt(d) + bias) v.
#   xla    `dot_product_attention` below: einsum, softmax, einsum; every backend, every
#          dtype. The default, and what the fidelity tests compare with the reference code.
#   cudnn  cuDNN's fused flash-attention kernel through `jax.nn.dot_product_attention`
#          (`fused_attention`: NVIDIA GPUs; float16/bfloat16, head_dim a multiple of 8 up to
#          128, or 256 on Hopper); a ValueError at build time anywhere else.
#   auto   per attention call: cudnn where the backend is a GPU and that call's dtype and
#          head_dim allow it, else xla (so on CPU, or in float32, exactly `xla`).
# Whatever it says, attention dropout in training and the extraction of attention maps take
# the xla path (the fused kernel neither drops out nor returns its weights).
ATTENTION_IMPLS = ("xla", "cudnn", "auto")


def check_attention_impl(value: str, field: str = "model.attention_impl") -> None:
  """A ValueError naming `field` unless `value` is an implementation this machine has."""
  if value not in ATTENTION_IMPLS:
    raise ValueError(f"{field}={value!r}; allowed: {', '.join(ATTENTION_IMPLS)}")
  if value == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"{field}='cudnn' needs an NVIDIA GPU, but JAX runs on "
                     f"{jax.default_backend()!r} here; allowed on this machine: xla, auto")


def attention_implementation(value: str, dtype: Dtype, head_dim: int) -> str:
  """The `implementation` argument of `jax.nn.dot_product_attention` for `value`."""
  check_attention_impl(value)
  if value != "auto":
    return value
  fused = (jax.default_backend() == "gpu"
           and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
           and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fused else "xla"


# `model.remat`: what the backward pass recomputes instead of keeping from the forward.
#   none   nothing: every block's activations stay in memory until the backward pass.
#   block  each encoder block under `nn.remat`: only its input is kept, the rest is
#          recomputed during the backward pass (about one more forward pass of compute).
#   a jax.checkpoint_policies name: each block under `nn.remat` with that policy, e.g.
#          dots_with_no_batch_dims_saveable keeps the matmuls against weights and
#          recomputes the rest (attention logits, softmax, GELU, LayerNorm).
REMAT_POLICIES = tuple(name for name in (
    "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
    "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
                       if hasattr(jax.checkpoint_policies, name))
REMATS = ("none", "block") + REMAT_POLICIES


def check_remat(value: str, field: str = "model.remat") -> None:
  if value not in REMATS:
    raise ValueError(f"{field}={value!r}; allowed: {', '.join(REMATS)}")


def remat_block(fn: Callable[..., Any], remat: str, *, prevent_cse: bool = True) -> Callable:
  """`fn(module, *args)` under `nn.remat` as `remat` (`REMATS`) says; `fn` itself for none.

  `prevent_cse=False` inside `nn.scan`, which already keeps XLA from merging the
  recomputation with the forward pass (jax.checkpoint's advice).
  """
  check_remat(remat)
  if remat == "none":
    return fn
  policy = None if remat == "block" else getattr(jax.checkpoint_policies, remat)
  return nn.remat(fn, policy=policy, prevent_cse=prevent_cse)


def scan_blocks(fn: Callable[..., jax.Array], block: nn.Module, x: jax.Array,
                per_block: Any) -> jax.Array:
  """`x = fn(block_i, x, per_block[i])` for every block i, as one `nn.scan` over `block`.

  `per_block`: arrays (or a tuple of them) with a leading [n] axis, the inputs that differ
  from block to block (stochastic-depth rates; Swin's shifted-or-not). The blocks'
  parameters (and sown intermediates) get a leading [n] axis; each block draws its own
  `params` and `dropout` keys. One block is traced and lowered instead of n.
  """
  per_block = jax.tree_util.tree_map(jnp.asarray, per_block)
  length = jax.tree_util.tree_leaves(per_block)[0].shape[0]
  scanned = nn.scan(lambda module, carry, inputs: (fn(module, carry, inputs), None),
                    variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=0, length=length)
  x, _ = scanned(block, x, per_block)
  return x


# Where `recorded_attention` collects what each attention call traced inside it runs.
_RECORDED_ATTENTION: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "recorded_attention", default=None)


@contextlib.contextmanager
def recorded_attention() -> Iterator[list[dict]]:
  """Collects, for each `MultiHeadAttention` call traced inside, its module path, the
  implementation it runs, its query and key token counts and its head width: what
  `train.build` reports at start-up."""
  token = _RECORDED_ATTENTION.set([])
  try:
    yield _RECORDED_ATTENTION.get()
  finally:
    _RECORDED_ATTENTION.reset(token)


def sow_attention(module: nn.Module, weights: jax.Array) -> None:
  """Stores attention weights [batch, heads, queries, keys] when intermediates are asked for."""
  module.sow("intermediates", "attention_weights", weights)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          dropout: Callable[[jax.Array], jax.Array] | None = None,
                          sow: Callable[[jax.Array], None] | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias) v, as the papers write it.

  q [batch, n, heads, d], k and v [batch, m, heads, d] -> [batch, n, heads, d]. `bias`
  broadcasts to the logits [batch, heads, n, m]; `mask` likewise (True = attend). The
  logits and the softmax are float32, the weights are cast back to v's dtype. `dropout`
  (the weights' dropout) and `sow` (which stores the weights) are called on the weights.
  """
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(q.shape[-1]).astype(np.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if sow is not None:
    sow(weights)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


def _pad_tokens(x: jax.Array, axes: dict[int, int], value: Any = 0) -> jax.Array:
  """x padded at the end of each axis a (of full size, not broadcast) by axes[a]."""
  widths = [(0, 0)] * x.ndim
  for axis, (size, extra) in axes.items():
    if x.shape[axis] == size:
      widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    bias: jax.Array | None = None, mask: jax.Array | None = None,
                    implementation: str = "cudnn", multiple: int = 2) -> jax.Array:
  """`jax.nn.dot_product_attention` with `implementation`, for any token counts.

  q [batch, n, heads, d], k and v [batch, m, heads, d] -> [batch, n, heads, d]; `bias` and
  `mask` broadcast to [batch, heads, n, m]. cuDNN's fused kernel takes training calls
  with a bias only at even token counts, and jax 0.10 passes every call a bias: the tokens
  are padded to a multiple of `multiple` (queries and keys; biases and masks with them),
  the padded keys are masked out by the kernel's own padding mask
  (`key_value_seq_lengths`), and the padded query rows are dropped from the output.
  """
  n, m = q.shape[1], k.shape[1]
  pad_n, pad_m = -n % multiple, -m % multiple
  if not pad_n and not pad_m:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                        implementation=implementation)
  q = _pad_tokens(q, {1: (n, pad_n)})
  k, v = (_pad_tokens(x, {1: (m, pad_m)}) for x in (k, v))
  if bias is not None:
    bias = _pad_tokens(bias, {-2: (n, pad_n), -1: (m, pad_m)})
  if mask is not None:  # Padded keys are masked by their length; padded rows are dropped.
    mask = _pad_tokens(mask, {-2: (n, pad_n), -1: (m, pad_m)}, value=True)
  lengths = jnp.full((q.shape[0],), m, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return jax.lax.slice_in_dim(out, 0, n, axis=1)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention.

  queries [batch, n, d_q], keys/values [batch, m, d_kv] -> [batch, n, out_dim]
  (out_dim defaults to d_q). `head_dim` defaults to d_q // num_heads; the Keras examples
  set it to the model width (`key_dim`), which makes their attention wider than the model.

  Parameters: `query`, `key`, `value` (DenseGeneral kernels [d, heads, head_dim], biases
  [heads, head_dim]) and `out` (kernel [heads, head_dim, out_dim]).

  `attention_impl` (`ATTENTION_IMPLS`): `xla` is `dot_product_attention` above; `cudnn`
  is the fused kernel (`fused_attention`). The plain path is taken whatever
  `attention_impl` says when attention dropout is active or the weights are being
  extracted (the `intermediates` collection is mutable: they are sown).
  `bias` broadcasts to [batch, heads, n, m]; `mask` (True = attend) likewise.
  `qkv_bias` puts biases on the query, key and value projections (timm's `qkv_bias`;
  the official CCT has none), `proj_bias` on the output projection.

  `logit_scale`: `rsqrt` multiplies q.k by 1 / sqrt(head_dim); `learned` by one learned
  scalar `scale` instead, initialised to 1 (Keras' `Attention(use_scale=True)`, the Keras
  Perceiver example's cross-attention). `output_projection=False` leaves out the output
  Dense: the heads are concatenated, [batch, n, heads * head_dim] (that example too).
  """

  num_heads: int
  head_dim: int | None = None
  out_dim: int | None = None
  attention_dropout_rate: float = 0.0
  qkv_bias: bool = True
  proj_bias: bool = True
  logit_scale: str = "rsqrt"
  output_projection: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
               bias: jax.Array | None = None, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    check_attention_impl(self.attention_impl)
    head_dim = self.head_dim or inputs_q.shape[-1] // self.num_heads
    if self.head_dim is None and inputs_q.shape[-1] % self.num_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must divide the width "
                       f"{inputs_q.shape[-1]} (or give head_dim).")
    if self.logit_scale not in ("rsqrt", "learned"):
      raise ValueError(f"logit_scale={self.logit_scale!r}; allowed: rsqrt, learned")
    projection = functools.partial(nn.DenseGeneral, (self.num_heads, head_dim),
                                   use_bias=self.qkv_bias, kernel_init=dense_init,
                                   dtype=self.dtype)
    q = projection(name="query")(inputs_q)  # [batch, n, heads, head_dim]
    k = projection(name="key")(inputs_kv)   # [batch, m, heads, head_dim]
    v = projection(name="value")(inputs_kv)
    if self.logit_scale == "learned":
      # The attention divides q.k by sqrt(head_dim); this makes the product scale * q.k.
      scale = self.param("scale", nn.initializers.ones, ())
      q = q * (scale * np.sqrt(head_dim)).astype(q.dtype)

    dropping = train and self.attention_dropout_rate > 0.0
    sowing = self.is_mutable_collection("intermediates")
    implementation = "xla" if dropping or sowing else attention_implementation(
        self.attention_impl, self.dtype, head_dim)
    recorded = _RECORDED_ATTENTION.get()
    if recorded is not None:
      recorded.append({"module": "/".join(self.scope.path), "implementation": implementation,
                       "queries": q.shape[1], "keys": k.shape[1], "head_dim": head_dim})
    if implementation == "xla":
      dropout = nn.Dropout(self.attention_dropout_rate, deterministic=False)
      out = dot_product_attention(q, k, v, bias=bias, mask=mask,
                                  dropout=dropout if dropping else None,
                                  sow=functools.partial(sow_attention, self) if sowing
                                  else None)
    else:
      out = fused_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                            mask=mask, implementation=implementation)
    if not self.output_projection:
      if self.out_dim not in (None, self.num_heads * head_dim):
        raise ValueError(f"out_dim={self.out_dim} needs an output projection: without one the "
                         f"output width is heads * head_dim = {self.num_heads * head_dim}")
      return out.reshape(out.shape[:-2] + (self.num_heads * head_dim,))
    return nn.DenseGeneral(self.out_dim or inputs_q.shape[-1], axis=(-2, -1),
                           use_bias=self.proj_bias, kernel_init=dense_init, dtype=self.dtype,
                           name="out")(out)

BLOCK_FORMS = ("pre_norm", "cct")


class EncoderBlock(nn.Module):
  """Transformer block: attention and MLP, each a residual branch with drop-path.

  [batch, tokens, dim] -> [batch, tokens, dim]. `block_form`:
    pre_norm  x = x + attn(LN_a(x)); x = x + mlp(LN_m(x))  (ViT, timm, Swin, MobileViT)
    cct       x = x + attn(LN_a(x)); x = LN_m(x); x = x + mlp(x)  (the official CCT
              `TransformerEncoderLayer`: the residual stream itself is normalised after the
              attention, by the norm the pre-norm form puts in front of the MLP)
  Both forms have the same parameters (`attention_norm`, `attention`, `mlp_norm`, `mlp`).

  `attention` is any module factory that maps [batch, tokens, dim] to the same shape and
  takes `train` (self-attention by default, external attention in EANet, window attention
  in Swin), so the attention family is a constructor argument.

  Dropout: `attention_output_dropout_rate` (None: `dropout_rate`) on the attention branch;
  `dropout_rate` after the MLP's last Dense, `mlp_hidden_dropout_rate` (None:
  `dropout_rate`) after its hidden one(s). The defaults put one rate at all three places,
  as timm's `proj_drop` does.
  """

  mlp_dim: int
  attention: ModuleDef
  mlp_activation: str = "gelu_tanh"
  mlp_activate_last: bool = False
  block_form: str = "pre_norm"
  dropout_rate: float = 0.0
  attention_output_dropout_rate: float | None = None
  mlp_hidden_dropout_rate: float | None = None
  drop_path_rate: float = 0.0
  norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               drop_path_rate: jax.Array | None = None,
               attention_args: dict[str, Any] | None = None) -> jax.Array:
    """`drop_path_rate` (a traced scalar under `nn.scan`) overrides the field's rate;
    `attention_args` are passed on to the attention's call (Swin's `shifted`)."""
    if self.block_form not in BLOCK_FORMS:
      raise ValueError(f"model.block_form={self.block_form!r}; allowed: {', '.join(BLOCK_FORMS)}")
    norm = functools.partial(nn.LayerNorm, epsilon=self.norm_epsilon, dtype=self.dtype)
    attention_rate = self.dropout_rate if self.attention_output_dropout_rate is None else (
        self.attention_output_dropout_rate)
    y = self.attention(name="attention")(norm(name="attention_norm")(x), train=train,
                                         **(attention_args or {}))
    y = nn.Dropout(attention_rate)(y, deterministic=not train)
    x = x + DropPath(self.drop_path_rate)(y, train=train, rate=drop_path_rate)
    mlp_norm = norm(name="mlp_norm")
    if self.block_form == "cct":
      x = mlp_norm(x)
      y = x
    else:
      y = mlp_norm(x)
    y = Mlp((self.mlp_dim, x.shape[-1]), activation=self.mlp_activation,
            activate_last=self.mlp_activate_last, dropout_rate=self.dropout_rate,
            hidden_dropout_rate=self.mlp_hidden_dropout_rate, dtype=self.dtype,
            name="mlp")(y, train=train)
    return x + DropPath(self.drop_path_rate)(y, train=train, rate=drop_path_rate)


class Encoder(EncoderBlock):
  """`depth` encoder blocks with stochastic depth rising linearly over depth, up to
  `drop_path_rate` in the last block.

  [batch, tokens, dim] -> [batch, tokens, dim] (not normalised at the end). The other
  fields are `EncoderBlock`'s, passed to every block.

  `scan`: one `nn.scan` over the blocks instead of a Python loop, so that one block is
  compiled instead of `depth`; the parameters are then `blocks/...` with a leading [depth]
  axis instead of `block_0/...`, `block_1/...` (`efficient_vit.scan_layout` converts), and
  each block's drop-path rate is a scanned input. `remat`: `REMATS` (none, block, or a
  `jax.checkpoint_policies` name), applied to each block, with or without scan.
  """

  depth: int = dataclasses.field(kw_only=True)
  scan: bool = dataclasses.field(default=False, kw_only=True)
  remat: str = dataclasses.field(default="none", kw_only=True)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    block_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(EncoderBlock)
                    if f.init and f.name not in ("parent", "name")}
    rates = drop_path_rates(self.drop_path_rate, self.depth)
    if self.scan and self.depth:
      varying = train and self.drop_path_rate > 0.0

      def step(block, y, rate):
        return block(y, train=train, drop_path_rate=rate if varying else None)

      block = EncoderBlock(**{**block_fields, "drop_path_rate": 0.0}, name="blocks")
      return scan_blocks(remat_block(step, self.remat, prevent_cse=False), block, x,
                         np.asarray(rates, np.float32))
    step = remat_block(lambda block, y: block(y, train=train), self.remat)
    for i, rate in enumerate(rates):
      x = step(EncoderBlock(**{**block_fields, "drop_path_rate": rate}, name=f"block_{i}"), x)
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
      raise ValueError(f"model.patch_size={self.patch_size} must divide the image size {h}x{w} "
                       "(config.image_size)")
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
    # squeeze, not [..., 0]: with a symbolic batch (export) indexing becomes a gather that
    # the TFLite converter rejects.
    scores = jnp.squeeze(
        nn.Dense(1, dtype=self.dtype, kernel_init=dense_init, name="score")(x), -1)
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
  """The final linear layer, zero-initialised as in the original ViT:
  [batch, d] -> [batch, classes].

  Call inside a compact module's `__call__`; the Dense attaches to that module.
  """
  return nn.Dense(num_classes, dtype=dtype, kernel_init=nn.initializers.zeros,
                  name=name)(x).astype(jnp.float32)
