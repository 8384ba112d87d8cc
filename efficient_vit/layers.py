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
import math
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


# The MLP activations a config may name (`model.mlp_activation`). flax's `nn.gelu` is the
# tanh approximation by default; PyTorch's `nn.GELU` / `F.gelu` (timm, the official Swin, CCT
# and MobileViT code) and Keras' "gelu" are the exact, erf-based form, while the JAX
# originals (big_vision's and vision_transformer's ViT, the Perceiver's Haiku code) use the
# tanh form. The two differ by up to about 1e-3 per activation.


_PORTABLE_GELU = contextvars.ContextVar("portable_gelu", default=False)


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x Phi(x), as PyTorch's CPU kernel and Keras write it: x (1 + erf(x /
  sqrt 2)) / 2. `jax.nn.gelu(approximate=False)` goes through erfc instead, whose XLA
  expansion (two branches, an exponential) made the activation 1.3-2x slower forward and
  backward on CPU at ViT-S/16's MLP width (benchmarks/PROFILE.md); the two agree to about
  1e-6 in float32, 1 ulp of most outputs. Traced inside `portable_gelu()`, it is the erfc
  form.

  The gradient is written out, Phi(x) + x phi(x) from x alone, so that a backward pass
  keeps only the input: under `nn.scan` autodiff kept two more [depth, batch, tokens,
  mlp_dim] arrays per MLP, 0.93 GB of ViT-S/16's scanned step at batch 32, which XLA
  recomputes in an unscanned step (benchmarks/PROFILE.md)."""
  if _PORTABLE_GELU.get():
    return jax.nn.gelu(x, approximate=False)
  return _gelu_erf(x)


_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


def _normal_cdf(x: jax.Array) -> jax.Array:
  """Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
  return 0.5 + 0.5 * jax.lax.erf(x * 0.7071067811865476)


@jax.custom_vjp
def _gelu_erf(x: jax.Array) -> jax.Array:
  return x * _normal_cdf(x)


def _gelu_erf_fwd(x):
  return _gelu_erf(x), x


def _gelu_erf_bwd(x, g):
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return (g * (_normal_cdf(x) + x * pdf),)


_gelu_erf.defvjp(_gelu_erf_fwd, _gelu_erf_bwd)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """flax's / JAX's default GELU, the tanh approximation (`jax.nn.gelu(approximate=True)`,
  whose values these are), with its gradient written out from x alone, for the reason
  `gelu` gives: under `nn.scan` autodiff kept 1.9 GB more of ViT-S/16's step at batch 32."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
  return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
  # d/dx 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3).
  t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
  du = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
  return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


@contextlib.contextmanager
def portable_gelu():
  """`gelu` traced through erfc inside: jax.export serializes `lax.erf` as a StableHLO
  composite that TensorFlow 2.21's XlaCallModule (SavedModel, TFLite, ONNX exports) cannot
  read, while erfc lowers to plain StableHLO ops."""
  token = _PORTABLE_GELU.set(True)
  try:
    yield
  finally:
    _PORTABLE_GELU.reset(token)


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
                   bias_init=nn.initializers.normal(stddev=1e-6), dot_general=dot_general)(x)
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
#   xla    jax.nn.dot_product_attention(implementation="xla"): the einsum/softmax program,
#          every backend, every dtype. The default: it is what jax itself picks when told
#          nothing, and what the fidelity tests compare with the reference code.
#   cudnn  cuDNN's fused flash-attention kernel (NVIDIA GPUs; float16/bfloat16, head_dim a
#          multiple of 8 up to 128); a ValueError at build time anywhere else.
#   auto   cudnn where the backend is a GPU and the dtype and head_dim allow it, else xla
#          (so on CPU, or in float32, exactly `xla`).
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


def sow_attention(module: nn.Module, weights: jax.Array) -> None:
  """Stores attention weights [batch, heads, queries, keys] when intermediates are asked for."""
  module.sow("intermediates", "attention_weights", weights)


class DenseParams(nn.Module):
  """The parameters of an `nn.DenseGeneral` from `in_shape` to `features`, returned
  instead of applied: `kernel` [*in_shape, *features] and `bias` [*features] (None without
  `use_bias`), initialised exactly as DenseGeneral initialises them, cast to `dtype`.

  `MultiHeadAttention` contracts them itself (several projections in one matmul, heads
  kept in front of the tokens), under the parameter names and shapes of the DenseGeneral
  layers it replaces, so that checkpoints and weight imports see no difference.
  """

  in_shape: tuple[int, ...]
  features: tuple[int, ...]
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    fan_in, fan_out = int(np.prod(self.in_shape)), int(np.prod(self.features))

    def kernel_init(key, shape, dtype=jnp.float32):
      return dense_init(key, (fan_in, fan_out), dtype).reshape(shape)

    kernel = self.param("kernel", kernel_init, self.in_shape + self.features)
    bias = self.param("bias", nn.initializers.zeros, self.features) if self.use_bias else None
    return kernel.astype(self.dtype), None if bias is None else bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention.

  queries [batch, n, d_q], keys/values [batch, m, d_kv] -> [batch, n, out_dim]
  (out_dim defaults to d_q). `head_dim` defaults to d_q // num_heads; the Keras examples
  set it to the model width (`key_dim`), which makes their attention wider than the model.

  Parameters: `query`, `key`, `value` (kernels [d, heads, head_dim], biases [heads,
  head_dim]) and `out` (kernel [heads, head_dim, out_dim]), the layout of flax's
  DenseGeneral projections. The computation is laid out for speed, not like the
  parameters: self-attention projects q, k and v in one matmul against the three kernels
  stacked (k and v together for cross-attention), straight into [batch, heads, tokens,
  head_dim], and the output projection contracts heads and head_dim from that layout, so
  that no transpose sits between the projections and the attention (benchmarks/PROFILE.md).

  `attention_impl` (`ATTENTION_IMPLS`): `xla` is the einsum / softmax program in that
  head-major layout (what `jax.nn.dot_product_attention(implementation="xla")` computes,
  without its transposes; `attention_logits`, then the softmax and the value product in
  `softmax_values`, whose gradient takes the softmax's row sums from the output), also
  used whatever `attention_impl` says when attention dropout is active or the weights are
  being extracted (the `intermediates` collection is mutable: the weights are sown
  too); `cudnn` goes through `jax.nn.dot_product_attention` for the fused kernel.
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
    self_attention = inputs_kv is None
    inputs_kv = inputs_q if self_attention else inputs_kv
    check_attention_impl(self.attention_impl)
    head_dim = self.head_dim or inputs_q.shape[-1] // self.num_heads
    if self.head_dim is None and inputs_q.shape[-1] % self.num_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must divide the width "
                       f"{inputs_q.shape[-1]} (or give head_dim).")
    if self.logit_scale not in ("rsqrt", "learned"):
      raise ValueError(f"logit_scale={self.logit_scale!r}; allowed: rsqrt, learned")
    heads = (self.num_heads, head_dim)
    q_params, k_params, v_params = (
        DenseParams((x.shape[-1],), heads, self.qkv_bias, self.dtype, name=name)()
        for x, name in ((inputs_q, "query"), (inputs_kv, "key"), (inputs_kv, "value")))
    explicit = (train and self.attention_dropout_rate > 0.0) or self.is_mutable_collection(
        "intermediates")
    implementation = "xla" if explicit else attention_implementation(
        self.attention_impl, self.dtype, head_dim)
    layout = "bhnk" if implementation == "xla" else "bnhk"
    if self_attention:
      q, k, v = _project(inputs_q.astype(self.dtype), (q_params, k_params, v_params), layout)
    else:
      (q,) = _project(inputs_q.astype(self.dtype), (q_params,), layout)
      k, v = _project(inputs_kv.astype(self.dtype), (k_params, v_params), layout)
    if self.logit_scale == "learned":
      # Both paths below divide q.k by sqrt(head_dim); this makes the product scale * q.k.
      scale = self.param("scale", nn.initializers.ones, ())
      q = q * (scale * np.sqrt(head_dim)).astype(q.dtype)

    if implementation == "xla":
      logits = attention_logits(q, k)
      logits = logits * np.float32(1.0 / np.sqrt(head_dim))
      if bias is not None:
        logits = logits + bias.astype(jnp.float32)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      if self.is_mutable_collection("intermediates"):
        sow_attention(self, jax.nn.softmax(logits, axis=-1).astype(self.dtype))
      dropout = None
      if train and self.attention_dropout_rate > 0.0:  # nn.Dropout's scale of each weight
        dropout = nn.Dropout(self.attention_dropout_rate)(
            jnp.ones(logits.shape, self.dtype), deterministic=False)
      out = softmax_values(logits, v, dropout)
      out_axes = "bhnk"
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
          implementation=implementation)
      out_axes = "bnhk"
    out = jnp.einsum(f"{out_axes}->bnhk", out)
    if not self.output_projection:
      if self.out_dim not in (None, self.num_heads * head_dim):
        raise ValueError(f"out_dim={self.out_dim} needs an output projection: without one the "
                         f"output width is heads * head_dim = {self.num_heads * head_dim}")
      return out.reshape(out.shape[:-2] + (self.num_heads * head_dim,))
    kernel, out_bias = DenseParams(heads, (self.out_dim or inputs_q.shape[-1],),
                                   self.proj_bias, self.dtype, name="out")()
    y = _matmul_2d(out, kernel, 2)
    return y if out_bias is None else y + out_bias


def _matmul_2d(x: jax.Array, kernel: jax.Array, contracted: int) -> jax.Array:
  """x [..., *c] against kernel [*c, *o] -> [..., *o] (c: the last `contracted` axes of x)
  as one plain [rows, prod(c)] x [prod(c), prod(o)] matmul. XLA's CPU backend ran the
  attention's projections as einsums over the split axes 1.05x (ViT-S/16) to 2.1x (CCT
  seed) slower, forward and backward (benchmarks/PROFILE.md)."""
  lead, out = x.shape[:x.ndim - contracted], kernel.shape[contracted:]
  y = x.reshape(math.prod(lead), -1) @ kernel.reshape(math.prod(kernel.shape[:contracted]),
                                                      -1)
  return y.reshape(*lead, *out)


def _project(x: jax.Array, params: Sequence[tuple[jax.Array, jax.Array | None]],
             layout: str) -> list[jax.Array]:
  """x [batch, n, d] against each (kernel [d, heads, head_dim], bias) in one matmul:
  a [batch, heads, n, head_dim] (`layout='bhnk'`) or [batch, n, heads, head_dim] ('bnhk')
  array per projection."""
  # [b, n, p, heads, head_dim] from one plain matmul, sliced and transposed after.
  y = _matmul_2d(x, jnp.stack([kernel for kernel, _ in params], axis=1), 1)
  if params[0][1] is not None:
    y = y + jnp.stack([bias for _, bias in params])        # [p, heads, head_dim]
  # index_in_dim (slice, squeeze), not y[:, :, i]: with a symbolic batch (export) indexing
  # becomes a gather that the TFLite converter rejects.
  return [jnp.einsum(f"bnhk->{layout}", jax.lax.index_in_dim(y, i, 2, keepdims=False))
          for i in range(len(params))]


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


def strided_windows(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                    out_shape: tuple[int, int]) -> Iterator[jax.Array]:
  """The window[0] * window[1] strided windows of an already padded map [b, H, W, C], row
  major by offset (i, j): the cells at offset (i, j) of every window, [b, out_h, out_w, C]
  each (a pooling's or a depthwise convolution's taps).

  lax slices, not x[:, a:b:s]: with a symbolic batch (export) strided indexing becomes a
  gather that the TFLite converter rejects."""
  (sh, sw), (out_h, out_w) = strides, out_shape
  batch, _, _, channels = x.shape
  for i in range(window[0]):
    for j in range(window[1]):
      yield jax.lax.slice(x, (0, i, j, 0),
                          (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, channels),
                          (1, sh, sw, 1))


def interleave_phases(phases: Sequence[jax.Array], strides: tuple[int, int]) -> jax.Array:
  """strides[0] * strides[1] phase maps [b, rows, cols, C], row major by phase (p, q), ->
  [b, rows * s_h, cols * s_w, C] with out[:, r * s_h + p, c * s_w + q] = phase (p, q)[:, r, c]:
  a gradient built one stride phase at a time, put back in place."""
  sh, sw = strides
  b, rows, cols, c = phases[0].shape
  # Stacked straight into [b, rows, s_h, cols, s_w, C]
  phase_rows = [jnp.stack(phases[p * sw:(p + 1) * sw], axis=3) for p in range(sh)]
  return jnp.stack(phase_rows, axis=2).reshape(b, rows * sh, cols * sw, c)


def _pool_pads(spatial: tuple[int, int], window: tuple[int, int], strides: tuple[int, int],
               padding: str | Sequence[tuple[int, int]]) -> Sequence[tuple[int, int]]:
  """((top, bottom), (left, right)) of a max-pool's padding ("SAME", "VALID" or explicit)."""
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(spatial, window, strides, padding)
  return padding


def _pool_windows(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                  padding: str | Sequence[tuple[int, int]], with_argmax: bool
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Each window's maximum [batch, oh, ow, C] and, with `with_argmax`, the offset in the
  window that holds it (i * window_w + j, int8 or int32; the first among equal values)."""
  _, height, width, _ = x.shape
  (top, bottom), (left, right) = _pool_pads((height, width), window, strides, padding)
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)),
                   constant_values=-jnp.inf)
  oh = (height + top + bottom - window[0]) // strides[0] + 1
  ow = (width + left + right - window[1]) // strides[1] + 1
  index_dtype = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
  cells = strided_windows(padded, window, strides, (oh, ow))
  pooled = next(cells)
  argmax = jnp.zeros(pooled.shape, index_dtype) if with_argmax else None
  for offset, cell in enumerate(cells, start=1):
    if with_argmax:  # strictly greater: a tie keeps the earlier offset
      argmax = jnp.where(cell > pooled, jnp.asarray(offset, index_dtype), argmax)
    pooled = jnp.maximum(pooled, cell)
  return pooled, argmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """`nn.max_pool` over [batch, H, W, C], written out for XLA's CPU backend.

  Values are `nn.max_pool`'s (padding "SAME" / "VALID" or ((top, bottom), (left, right));
  padded cells never win): the maximum over the window's strided slices of the padded
  input, one loop fusion where XLA's CPU `reduce-window` runs a loop per output. The
  gradient is XLA's (each window's cotangent to its maximum; among equal values the first
  in row-major window order, as XLA, PyTorch and TensorFlow choose), without XLA's
  select-and-scatter, whose argmax-carrying reduce-window took about 18% of the CCT seed
  step on CPU: the forward pass keeps each window's argmax offset, and the backward pass
  builds the input gradient one stride phase (row mod stride, column mod stride) at a time
  from the offsets that reach it, interleaved after. CCT seed tokenizer's two pools with
  their ReLU and padding, batch 128, forward and backward: 20.7 -> 12.6 ms and 9.7 -> 3.6
  ms (benchmarks/PROFILE.md, "The tokenizer's max-pools written out").
  """
  return _pool_windows(x, window, strides, padding, with_argmax=False)[0]


def _max_pool_fwd(x, window, strides, padding):
  pooled, argmax = _pool_windows(x, window, strides, padding, with_argmax=True)
  return pooled, (argmax, x.shape)


def _max_pool_bwd(window, strides, padding, residuals, g):
  argmax, (batch, height, width, channels) = residuals
  (top, bottom), (left, right) = _pool_pads((height, width), window, strides, padding)
  sh, sw = strides
  oh, ow = g.shape[1:3]
  # Padded row r = o * sh + i (window o, offset i) is row r // sh of phase r % sh; a phase
  # has ceil(padded height / sh) rows. Likewise for columns.
  rows, cols = -(-(height + top + bottom) // sh), -(-(width + left + right) // sw)
  zero = jnp.zeros((), g.dtype)
  phases = []
  for pi in range(sh):
    for pj in range(sw):
      phase = jnp.zeros((batch, rows, cols, channels), g.dtype)
      for i in range(pi, window[0], sh):
        for j in range(pj, window[1], sw):
          taken = jnp.where(argmax == i * window[1] + j, g, zero)
          di, dj = i // sh, j // sw  # window o's offset i is phase row o + di
          phase = phase + jax.lax.pad(taken, zero, ((0, 0, 0), (di, rows - oh - di, 0),
                                                    (dj, cols - ow - dj, 0), (0, 0, 0)))
      phases.append(phase)
  grad = interleave_phases(phases, strides)
  return (grad[:, top:top + height, left:left + width],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# The attention's two products in the head-major layout, with gradients that suit XLA's CPU
# backend. Two of their four backward products contract over the query tokens, the rows of
# both operands (`einsum('bhnk,bhnm->bhmk')`); XLA's CPU backend runs those in its own dot
# emitter, not YNNPACK. With many tokens per head dimension that is slow: on
# MobileViT-XXS's 32x32 stage ([64, 4, 256, 16] against [64, 4, 256, 256]) 17.3 ms, against
# 5.2 ms when the small [.., n, k] operand is transposed first and the [.., k, m] result
# after, behind optimization barriers that keep XLA from folding the transposes back into
# the dot; one more in front of the transposed operand keeps its producers (a LayerNorm's
# or GELU's backward, often) out of the transposing copy, which XLA's CPU backend runs
# several times slower with them fused in (the project's CPU steps keep their barriers to
# the end: `cpu_kernels`). At ViT-S/16's, CCT's, Swin's and MobileViT's other shapes the
# two took the same time or the transposes cost more, so only n >= 8x the narrower width on
# CPU takes that form (benchmarks/PROFILE.md); everything else is the plain einsum, as
# autodiff writes it.
# MobileViT's 1x1 convolutions use the same helper for their kernel gradient (`dot_general`).


def _contract_rows(x: jax.Array, y: jax.Array, precision: Any = None) -> jax.Array:
  """x [.., n, k], y [.., n, m] -> [.., m, k]: `einsum('...nk,...nm->...mk')`.

  On CPU, with n at least 8x the narrower width, the narrower operand is transposed first
  and the product is a plain matmul (the [.., k, m] result transposed after, where x was
  the narrower), each transpose between optimization barriers: the operand materialised
  before it, the transposed array after."""
  def plain(x, y):
    return jnp.einsum("...nk,...nm->...mk", x, y, precision=precision)

  barrier = jax.lax.optimization_barrier

  def written_out_transposed(a):  # [.., n, w] materialised, then [.., w, n] materialised
    return barrier(jnp.swapaxes(barrier(a), -1, -2))

  def transposed(x, y):
    if y.shape[-1] < x.shape[-1]:
      return jnp.matmul(written_out_transposed(y), x, precision=precision)
    product = jnp.matmul(written_out_transposed(x), y, precision=precision)  # [.., k, m]
    return jnp.swapaxes(barrier(product), -1, -2)

  if x.shape[-2] < 8 * min(x.shape[-1], y.shape[-1]):
    return plain(x, y)
  return jax.lax.platform_dependent(x, y, cpu=transposed, default=plain)


@jax.custom_vjp
def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """q [b, h, n, d], k [b, h, m, d] -> q.k [b, h, n, m] in float32."""
  return jnp.einsum("bhnk,bhmk->bhnm", q, k, preferred_element_type=jnp.float32)


def _attention_logits_fwd(q, k):
  return attention_logits(q, k), (q, k)


def _attention_logits_bwd(residuals, g):
  q, k = residuals
  dq = jnp.einsum("bhnm,bhmk->bhnk", g, k, preferred_element_type=jnp.float32)
  dk = _contract_rows(q.astype(g.dtype), g)
  return dq.astype(q.dtype), dk.astype(k.dtype)


attention_logits.defvjp(_attention_logits_fwd, _attention_logits_bwd)


@jax.custom_vjp
def attention_values(weights: jax.Array, v: jax.Array) -> jax.Array:
  """weights [b, h, n, m], v [b, h, m, d] -> [b, h, n, d]."""
  return jnp.einsum("bhnm,bhmk->bhnk", weights, v)


def _attention_values_fwd(weights, v):
  return attention_values(weights, v), (weights, v)


def _attention_values_bwd(residuals, g):
  weights, v = residuals
  d_weights = jnp.einsum("bhnk,bhmk->bhnm", g, v)
  return d_weights.astype(weights.dtype), _contract_rows(g, weights).astype(v.dtype)


attention_values.defvjp(_attention_values_fwd, _attention_values_bwd)


# softmax(logits) v with one identity in its gradient: the softmax's backward pass needs,
# for each query row n, s_n = sum_m dP_nm P_nm (dP the gradient of the weights P), a
# reduction over the m key tokens of two [b, h, n, m] arrays. With O = P V and dP = dO V^T
# that sum is dO_n . O_n, a reduction over head_dim of the [b, h, n, d] output and its
# gradient (FlashAttention's D = rowsum(dO * O)); it holds with attention dropout too, O
# being the product of the dropped-out weights. The saving grows with tokens per head_dim:
# MobileViT-XXS's train step (256 tokens, head_dim 16) 1.085x, CCT's 1.02x, Swin-T's and
# ViT-S/16's unchanged on a 2-core CPU (benchmarks/PROFILE.md, "The softmax's row sums").


@jax.custom_vjp
def softmax_values(logits: jax.Array, v: jax.Array,
                   dropout: jax.Array | None = None) -> jax.Array:
  """`attention_values(softmax(logits) * dropout, v)`: logits [b, h, n, m] (float32), v
  [b, h, m, d] -> [b, h, n, d] in v's dtype. `dropout`: None, or the dropout's scale per
  weight (0 or 1 / keep, broadcasting to logits), applied after the weights are cast to
  v's dtype, as `nn.Dropout` on the weights would."""
  return _softmax_values_fwd(logits, v, dropout)[0]


def _dropped(weights, dtype, dropout):
  """The weights the value product sees: cast to `dtype`, then scaled by `dropout`."""
  weights = weights.astype(dtype)
  return weights if dropout is None else weights * dropout.astype(dtype)


def _softmax_values_fwd(logits, v, dropout):
  weights = jax.nn.softmax(logits, axis=-1)
  out = attention_values(_dropped(weights, v.dtype, dropout), v)
  return out, (weights, v, dropout, out)


def _softmax_values_bwd(residuals, g):
  weights, v, dropout, out = residuals
  # The dropped weights recomputed (an elementwise pass) rather than kept beside `weights`.
  d_dropped, dv = _attention_values_bwd((_dropped(weights, v.dtype, dropout), v), g)
  d_weights = d_dropped.astype(jnp.float32)
  if dropout is not None:
    d_weights = d_weights * dropout.astype(jnp.float32)
  row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = weights * (d_weights - row)
  return (d_logits.astype(weights.dtype), dv,
          None if dropout is None else jnp.zeros_like(dropout))


softmax_values.defvjp(_softmax_values_fwd, _softmax_values_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """`jax.lax.dot_general` with a cheaper kernel gradient for a Dense layer on CPU.

  Pass it as `nn.Dense(..., dot_general=layers.dot_general)`: parameters, forward pass and
  input gradient stay lax's. For inputs [..., c_in] against a kernel [c_in, c_out] the
  kernel's gradient contracts over every row of both operands; autodiff leaves that to
  XLA, which on CPU writes the output gradient out transposed and runs the product in its
  own dot emitter. Here it is `_contract_rows`, as for the attention's: on CPU the
  narrower operand is transposed first and the product is a plain matmul in YNNPACK: a 1x1
  convolution from 16 to 64 channels on [16, 128, 128] 2.3x faster forward and backward,
  the MobileViT-XXS step 1.12x. `Mlp`'s Dense layers take it too: train steps 1.01-1.06x
  (ViT-S/16, Swin-T, CCT, MobileViT-XXS on a 2-core CPU), where an earlier, noisier
  measurement had seen nothing; the attention's projections (`_matmul_2d`) keep lax's,
  with which CCT's step ran 0.95x (benchmarks/PROFILE.md). Other contractions are lax's.
  """
  (lhs_contract, rhs_contract), batch = dimension_numbers
  dense = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
           and rhs.ndim == 2 and not any(batch[0]) and not any(batch[1])
           and preferred_element_type is None)
  if not dense:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _dense_product(lhs, rhs, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_product(x, kernel, precision):
  return jnp.matmul(x, kernel, precision=precision)


def _dense_product_fwd(x, kernel, precision):
  return _dense_product(x, kernel, precision), (x, kernel)


def _dense_product_bwd(precision, residuals, g):
  x, kernel = residuals
  dx = jnp.matmul(g, kernel.T, precision=precision)
  d_kernel = _contract_rows(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]),
                            precision)
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)
