"""Import of weights trained with the Keras examples (keras-team/keras-io `examples/vision/`).

Each family's `keras` preset (`configs/<family>.py`, and EANet's `keras_self`) computes what
the matching Keras example's model computes; this module moves such a model's weights into
the project's parameter tree, so that its predictions carry over:

  vit        image_classification_with_vision_transformer.py
  eanet      eanet.py (external attention, or its self-attention twin)
  cct        cct.py
  swin       swin_transformers.py
  mobilevit  mobilevit.py
  perceiver  perceiver_image_classification.py

The weights come as an ordered mapping {Keras variable path: array}, in the order of the
Keras model's `model.weights`. Save them from the Keras side with

    np.savez("weights.npz", **{w.path: keras.ops.convert_to_numpy(w) for w in model.weights})

and read them with `read_npz` (which keeps the order). Keras numbers its layer names per
session (`dense_7/kernel`), so the names do not say which layer is which; the order of
`model.weights` does, and it is fixed by the example's code. The import therefore walks the
tensors in that order, checks each one's variable name (`kernel`, `bias`, `gamma`, ...) and
shape against the project leaf it fills, and fails with a ValueError naming the tensor when
one is missing, left over, misnamed or of the wrong shape. Every tensor is used exactly
once and every leaf of the project's variables is filled; buffers the examples store as
weights (Swin's relative-position index and shift mask) are checked against the project's
own instead of loaded. Nothing is written anywhere: the result is returned.

Preprocessing layers inside the example's model are not part of the project's model: a
`Normalization` layer's statistics come back as `KerasImport.normalization`, for the input
pipeline (`(images - mean) / std`); the examples' `Rescaling(1 / 255)` layers (CCT,
MobileViT) hold no weights and come back as `KerasImport.input_scale`.
`KerasImport.preprocess` applies both to the Keras model's raw input.

Two examples use tensors outside `model.weights`; pass them as `extra`:
  cct        `position_embedding` [tokens, dim]: the example calls its `Embedding` on a
             constant while building the functional model, so the table is a constant of the
             graph (`pos_embed.embeddings` on the Keras side), not a weight of the model.
  perceiver  its Normalization sits in the module-level `data_augmentation`, which the model
             does not track: pass `normalization_mean` and `normalization_variance`
             (optional; without them `normalization` is None).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficient_vit import scan_layout

FAMILIES = ("vit", "eanet", "cct", "swin", "mobilevit", "perceiver")

# The model fields that decide whether the project's model computes what the example's
# computes, with the example's values (the `keras` presets set them, citing the example's
# lines; tests/test_fidelity_keras.py checks that they agree). `convert` refuses a model
# that differs in one of them: the weights would load but the predictions would not match.
KERAS_FIELDS: dict[str, dict[str, Any]] = {
    "vit": dict(mlp_activation="gelu", mlp_activate_last=True, norm_epsilon=1e-6,
                qkv_bias=True, proj_bias=True, pooling="flatten", fc_norm=False),
    "eanet": dict(mlp_activation="gelu", norm_epsilon=1e-5),
    "cct": dict(tokenizer="conv", tokenizer_form="keras", mlp_activation="gelu",
                mlp_activate_last=True, block_form="pre_norm", qkv_bias=True, norm_epsilon=1e-5,
                pooling="seq"),
    "swin": dict(mlp_activation="gelu", qkv_bias=True, norm_epsilon=1e-5, patch_norm=False,
                 absolute_position_embedding=True, merge_after_last_stage=True,
                 merge_norm=False, final_norm=False),
    "mobilevit": dict(variant="keras", patch_size=1, conv_padding="same", mlp_activation="silu"),
    "perceiver": dict(position_encoding="learned", share_weights="all", final_norm=False,
                      cross_attention_heads=1, cross_attend_form="normalized_stream",
                      cross_attention_output_projection=False, cross_attention_scale="learned",
                      mlp_activation="gelu", norm_epsilon=1e-6),
}

# keras.backend.epsilon(): the floor of a Normalization layer's standard deviation.
_KERAS_EPSILON = 1e-7


@dataclasses.dataclass
class KerasImport:
  """The converted weights.

  Attributes:
    variables: the project's variables ({"params": ...}, plus "batch_stats" for MobileViT),
      ready for `model.apply(variables, images)`.
    normalization: (mean, std), each [channels], of a Normalization layer the Keras model
      applied to its input, or None. Feed the project's model `(images - mean) / std`.
    input_scale: the factor of the example's `Rescaling` layer (1 / 255 in cct.py and
      mobilevit.py), 1 where it has none.
  """

  variables: dict[str, Any]
  normalization: tuple[np.ndarray, np.ndarray] | None
  input_scale: float = 1.0

  def preprocess(self, images: Any) -> np.ndarray:
    """The Keras model's raw input [batch, H, W, C] -> the project model's input: the
    example's Rescaling (`input_scale`), then its Normalization, if it has them."""
    images = np.asarray(images, np.float32) * np.float32(self.input_scale)
    if self.normalization is not None:
      mean, std = self.normalization
      images = (images - mean) / std
    return images


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` in their stored order; keys under `weights/` lose that prefix
  (the layout of tests/fixtures/keras_*.npz), other keys are left out when such keys exist."""
  with np.load(path, allow_pickle=False) as data:
    keys = list(data.files)
    if any(k.startswith("weights/") for k in keys):
      return {k[len("weights/"):]: data[k] for k in keys if k.startswith("weights/")}
    return {k: data[k] for k in keys}


class _KerasWeights:
  """The Keras tensors, handed out in order, each checked for its variable name."""

  def __init__(self, weights: Mapping[str, Any]):
    self._items = [(str(k), np.asarray(v)) for k, v in weights.items()]
    self._next = 0

  def peek_name(self) -> str | None:
    if self._next >= len(self._items):
      return None
    return self._items[self._next][0].rsplit("/", 1)[-1]

  def take(self, name: str, target: str) -> tuple[str, np.ndarray]:
    if self._next >= len(self._items):
      raise ValueError(f"the Keras weights end ({len(self._items)} tensors) before the "
                       f"`{name}` that fills the project's {target}: a tensor is missing")
    path, value = self._items[self._next]
    if path.rsplit("/", 1)[-1] != name:
      raise ValueError(f"Keras tensor {path!r} (number {self._next}, shape {value.shape}) is "
                       f"not the `{name}` expected for the project's {target}; the weights "
                       "do not follow the example's layer order (a tensor missing, extra "
                       "or of another model)")
    self._next += 1
    return path, value

  def finish(self) -> None:
    if self._next < len(self._items):
      path, value = self._items[self._next]
      raise ValueError(f"Keras tensor {path!r} (shape {value.shape}) and "
                       f"{len(self._items) - self._next - 1} after it are not used by the "
                       "project's model: extra tensors, or a model larger than the config")


class _Tree:
  """The project's variables, filled leaf by leaf against the shapes of `model.init`."""

  def __init__(self, template: Mapping[str, Any]):
    flat = jax.tree_util.tree_flatten_with_path(template)[0]
    self.shapes = {"/".join(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}
    self.values: dict[str, np.ndarray] = {}

  def has(self, target: str) -> bool:
    return target in self.shapes

  def put(self, target: str, keras_path: str, value: np.ndarray,
          reshape: bool = False) -> None:
    """Fills `target` with `value`, reshaped to the leaf's shape when `reshape` (same size)."""
    if target not in self.shapes:
      raise ValueError(f"Keras tensor {keras_path!r} {value.shape} has no place in the "
                       f"project's model: it has no leaf {target} (config and weights "
                       "disagree)")
    if target in self.values:
      raise ValueError(f"the project's {target} would be filled twice (last by "
                       f"{keras_path!r})")
    expected = self.shapes[target]
    if reshape:
      if int(np.prod(value.shape)) != int(np.prod(expected)):
        raise ValueError(f"Keras tensor {keras_path!r} of shape {value.shape} does not fit "
                         f"the project's {target} of shape {expected}")
      value = value.reshape(expected)
    if tuple(value.shape) != expected:
      raise ValueError(f"Keras tensor {keras_path!r} of shape {value.shape} does not fit "
                       f"the project's {target} of shape {expected}")
    self.values[target] = np.asarray(value, np.float32)

  def finish(self) -> dict[str, Any]:
    missing = [t for t in self.shapes if t not in self.values]
    if missing:
      raise ValueError(f"the Keras weights leave the project's {missing[0]} "
                       f"{self.shapes[missing[0]]} (and {len(missing) - 1} more) unfilled")
    out: dict[str, Any] = {}
    for target, value in self.values.items():
      node = out
      *parents, leaf = target.split("/")
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = jnp.asarray(value)
    return out


class _Converter:
  """Shared moves: one method per Keras layer kind, each taking its tensors in order."""

  def __init__(self, weights: Mapping[str, Any], template: Mapping[str, Any]):
    self.keras = _KerasWeights(weights)
    self.tree = _Tree(template)
    self.normalization: tuple[np.ndarray, np.ndarray] | None = None

  def take(self, name: str, target: str) -> tuple[str, np.ndarray]:
    return self.keras.take(name, target)

  def put(self, name: str, target: str, reshape: bool = False) -> None:
    path, value = self.take(name, target)
    self.tree.put(target, path, value, reshape=reshape)

  def dense(self, prefix: str, reshape: bool = False) -> None:
    """Dense / Conv2D: kernel, then bias when the project's layer has one."""
    self.put("kernel", f"params/{prefix}/kernel", reshape=reshape)
    if self.tree.has(f"params/{prefix}/bias"):
      self.put("bias", f"params/{prefix}/bias")

  def layer_norm(self, prefix: str) -> None:
    self.put("gamma", f"params/{prefix}/scale")
    self.put("beta", f"params/{prefix}/bias")

  def batch_norm(self, prefix: str) -> None:
    self.put("gamma", f"params/{prefix}/scale")
    self.put("beta", f"params/{prefix}/bias")
    self.put("moving_mean", f"batch_stats/{prefix}/mean")
    self.put("moving_variance", f"batch_stats/{prefix}/var")

  def multi_head_attention(self, prefix: str) -> None:
    """Keras MultiHeadAttention: query, key, value [dim, heads, key_dim], then output."""
    for part in ("query", "key", "value"):
      self.dense(f"{prefix}/{part}")
    self.put("kernel", f"params/{prefix}/out/kernel")
    self.put("bias", f"params/{prefix}/out/bias")

  def mlp(self, prefix: str) -> None:
    i = 0
    while self.tree.has(f"params/{prefix}/Dense_{i}/kernel"):
      self.dense(f"{prefix}/Dense_{i}")
      i += 1

  def position_embedding(self, target: str) -> None:
    """Keras Embedding [tokens, dim] -> the project's learned table [1, tokens, dim]."""
    self.put("embeddings", target, reshape=True)

  def patch_encoder(self, patch_target: str, position_target: str) -> None:
    """The examples' PatchEncoder: a Dense on the flattened (p, p, C) patch, which is the
    project's p x p stride-p convolution reshaped, then a position Embedding."""
    self.dense(patch_target, reshape=True)
    self.position_embedding(position_target)

  def maybe_normalization(self) -> None:
    """A leading Keras Normalization layer (mean, variance, count) becomes preprocessing."""
    if self.keras.peek_name() != "mean":
      return
    _, mean = self.take("mean", "input normalisation")
    _, variance = self.take("variance", "input normalisation")
    self.take("count", "input normalisation")
    self.set_normalization(mean, variance)

  def set_normalization(self, mean: np.ndarray, variance: np.ndarray) -> None:
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.maximum(np.sqrt(np.asarray(variance, np.float32).reshape(-1)), _KERAS_EPSILON)
    self.normalization = (mean, std)

  def blocks(self, prefix: str) -> list[str]:
    """The project's block names under `prefix` (block_0, block_1, ...), in order."""
    names = []
    while any(t.startswith(f"params/{prefix}/block_{len(names)}/") for t in self.tree.shapes):
      names.append(f"{prefix}/block_{len(names)}")
    return names

  def encoder_block(self, block: str, attention) -> None:
    """One pre-norm block as the examples write it: LN, attention, Add, LN, MLP, Add."""
    self.layer_norm(f"{block}/attention_norm")
    attention(f"{block}/attention")
    self.layer_norm(f"{block}/mlp_norm")
    self.mlp(f"{block}/mlp")

  def result(self) -> KerasImport:
    self.keras.finish()
    tree = self.tree.finish()
    return KerasImport(tree, self.normalization)


def _vit(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del model, extra
  c.maybe_normalization()
  c.patch_encoder("patch_embedding/projection", "params/position_embedding/embedding")
  for block in c.blocks("encoder"):
    c.encoder_block(block, c.multi_head_attention)
  c.layer_norm("encoder_norm")
  c.mlp("head_mlp")
  c.dense("head")


def _eanet(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del extra

  def external_attention(prefix: str) -> None:
    for name in ("input_projection", "memory_key", "memory_value", "output_projection"):
      c.dense(f"{prefix}/{name}")

  c.maybe_normalization()
  c.patch_encoder("patch_embedding/projection", "params/position_embedding/embedding")
  attention = external_attention if model.attention == "external" else c.multi_head_attention
  for block in c.blocks("encoder"):
    c.encoder_block(block, attention)
  c.dense("head")


def _cct(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  for i in range(model.num_conv_layers):
    c.dense(f"conv_tokenizer/conv_{i}")
  if c.tree.has("params/position_embedding/embedding"):
    if "position_embedding" not in extra:
      raise ValueError("extra['position_embedding'] is missing: the CCT example's position "
                       "table is a constant of its graph, not in model.weights (save "
                       "`pos_embed.embeddings` from the Keras side)")
    value = np.asarray(extra["position_embedding"])
    c.tree.put("params/position_embedding/embedding", "extra/position_embedding", value,
               reshape=True)
  for block in c.blocks("encoder"):
    c.encoder_block(block, c.multi_head_attention)
  c.layer_norm("encoder_norm")
  c.dense("sequence_pooling/score")
  c.dense("head")


def _swin(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  from efficient_vit.models import swin  # pylint: disable=import-outside-toplevel
  del extra
  c.patch_encoder("patch_embedding/projection", "params/position_embedding/embedding")
  tokens = c.tree.shapes["params/position_embedding/embedding"][1]
  side = int(round(np.sqrt(tokens)))  # the examples' square images
  shift_size = model.window_size // 2 if model.shift_size is None else model.shift_size
  for stage, (depth, heads) in enumerate(zip(model.depths, model.num_heads)):
    window, shift = swin.effective_window((side, side), model.window_size, shift_size)
    for i in range(depth):
      block = f"stage{stage}_block{i}"
      if shift and i % 2:
        path, mask = c.take("attn_mask", f"{block} shift mask")
        expected = swin.shifted_window_mask(side, side, window, shift)
        if mask.shape != expected.shape or not np.array_equal(mask == 0, expected):
          raise ValueError(f"Keras tensor {path!r} is not the shift mask of a {side}x{side} "
                           f"map with window {window} and shift {shift} (model.window_size, "
                           "model.shift_size)")
      c.layer_norm(f"{block}/attention_norm")
      c.put("relative_position_bias_table", f"params/{block}/attention/"
            "relative_position_bias_table")
      path, index = c.take("relative_position_index", f"{block} relative position index")
      if not np.array_equal(index, swin.relative_position_index(window)):
        raise ValueError(f"Keras tensor {path!r} is not the relative position index of a "
                         f"{window}x{window} window (model.window_size)")
      # qkv: one Dense to 3 * dim, split as (3, heads, head_dim) by the example.
      attention = f"params/{block}/attention/window_attention"
      path, kernel = c.take("kernel", f"{attention}/query,key,value kernels")
      dim = kernel.shape[0]
      if kernel.shape != (dim, 3 * dim) or dim % heads:
        raise ValueError(f"Keras tensor {path!r} of shape {kernel.shape} is not a qkv kernel "
                         f"[dim, 3 * dim] for {heads} heads (model.num_heads)")
      kernel = kernel.reshape(dim, 3, heads, dim // heads)
      for j, part in enumerate(("query", "key", "value")):
        c.tree.put(f"{attention}/{part}/kernel", path, kernel[:, j])
      if c.tree.has(f"{attention}/query/bias"):
        path, bias = c.take("bias", f"{attention}/query,key,value biases")
        bias = bias.reshape(3, heads, -1) if bias.size == 3 * dim else bias
        for j, part in enumerate(("query", "key", "value")):
          c.tree.put(f"{attention}/{part}/bias", path, bias[j])
      path, kernel = c.take("kernel", f"{attention}/out/kernel")
      c.tree.put(f"{attention}/out/kernel", path, kernel, reshape=True)
      c.put("bias", f"{attention}/out/bias")
      c.layer_norm(f"{block}/mlp_norm")
      c.mlp(f"{block}/mlp")
    if stage < len(model.depths) - 1 or model.merge_after_last_stage:
      if model.merge_norm:
        c.layer_norm(f"stage{stage}_merging/norm")
      c.dense(f"stage{stage}_merging/reduction")
    side //= 2
  if model.final_norm:
    c.layer_norm("final_norm")
  c.dense("head")


def _mobilevit(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del extra

  def conv(prefix: str) -> None:
    """A Keras Conv2D (or DepthwiseConv2D) into a project ConvBlock, and its batch norm."""
    target = f"params/{prefix}/conv/kernel"
    path, kernel = c.take("kernel", target)
    shape = c.tree.shapes.get(target)
    if shape is not None and len(shape) == 2 and kernel.ndim == 4:
      kernel = kernel.reshape(kernel.shape[-2:])  # 1x1 convolution as a Dense
    elif shape is not None and kernel.ndim == 4 and kernel.shape[-1] == 1 and shape[2] == 1:
      kernel = kernel.transpose(0, 1, 3, 2)  # depthwise: Keras [k, k, C, 1] -> [k, k, 1, C]
    c.tree.put(target, path, kernel)
    if c.tree.has(f"params/{prefix}/conv/bias"):
      c.put("bias", f"params/{prefix}/conv/bias")
    if c.tree.has(f"params/{prefix}/norm/scale"):
      c.batch_norm(f"{prefix}/norm")

  def inverted_residual(prefix: str) -> None:
    if c.tree.has(f"params/{prefix}/expand/conv/kernel"):
      conv(f"{prefix}/expand")
    conv(f"{prefix}/depthwise")
    conv(f"{prefix}/project")

  conv("stem")
  stage = 0
  for depth in model.mv2_depths:
    for j in range(depth):
      inverted_residual(f"stage_{stage + 1}_mv2_{j}")
    stage += 1
  for depth in model.transformer_depths:
    inverted_residual(f"stage_{stage + 1}_mv2")
    block = f"stage_{stage + 1}_mobilevit"
    conv(f"{block}/local_conv")
    conv(f"{block}/to_transformer")
    for i in range(depth):
      c.encoder_block(f"{block}/transformer_{i}", c.multi_head_attention)
    if c.tree.has(f"params/{block}/transformer_norm/scale"):
      c.layer_norm(f"{block}/transformer_norm")
    conv(f"{block}/from_transformer")
    conv(f"{block}/fusion")
    stage += 1
  conv("last_conv")
  c.dense("head")


def _perceiver(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  if "normalization_mean" in extra or "normalization_variance" in extra:
    c.set_normalization(extra["normalization_mean"], extra["normalization_variance"])
  c.put("latent_array", "params/latents")
  c.patch_encoder("input_embedding/projection", "params/position_embedding/embedding")
  cross = "cross_attend_0"
  c.layer_norm(f"{cross}/latent_norm")
  c.layer_norm(f"{cross}/input_norm")
  attention = f"{cross}/attention"
  # The example's Dense layers are named query, key, value, but `Attention` takes
  # [query, value, key]: its "key" Dense makes the values and its "value" Dense the keys.
  for part in ("query", "value", "key"):
    path, kernel = c.take("kernel", f"params/{attention}/{part}/kernel")
    c.tree.put(f"params/{attention}/{part}/kernel", path, kernel, reshape=True)
    path, bias = c.take("bias", f"params/{attention}/{part}/bias")
    c.tree.put(f"params/{attention}/{part}/bias", path, bias, reshape=True)
  if c.tree.has(f"params/{attention}/scale"):
    c.put("scale", f"params/{attention}/scale")
  if c.tree.has(f"params/{attention}/out/kernel"):
    c.put("kernel", f"params/{attention}/out/kernel", reshape=True)
    c.put("bias", f"params/{attention}/out/bias")
  c.layer_norm(f"{cross}/mlp_norm")
  c.mlp(f"{cross}/mlp")
  for block in c.blocks("latent_transformer_0"):
    c.encoder_block(block, c.multi_head_attention)
  if c.tree.has("params/latent_norm/scale"):
    c.layer_norm("latent_norm")
  c.mlp("head_mlp")
  c.dense("head")


# The examples' `layers.Rescaling(scale=1.0 / 255)` inside the model (cct.py's
# data_augmentation, mobilevit.py's create_mobilevit); swin_transformers.py divides by 255
# before the model, which is the input pipeline's business.
_INPUT_SCALES = {"cct": 1.0 / 255, "mobilevit": 1.0 / 255}

_CONVERTERS = {"vit": _vit, "eanet": _eanet, "cct": _cct, "swin": _swin,
               "mobilevit": _mobilevit, "perceiver": _perceiver}


def convert(family: str, model: nn.Module, weights: Mapping[str, Any], image_size: int, *,
            extra: Mapping[str, Any] | None = None, channels: int = 3) -> KerasImport:
  """Maps a Keras example's weights onto `model`, a module built from the family's `keras`
  preset (with the same sizes as the Keras model).

  Args:
    family: one of FAMILIES.
    model: the project's module (e.g. `models.build_model(config.model, num_classes)`).
    weights: {Keras variable path: array} in the order of the Keras `model.weights`.
    image_size: side of the square images the model takes (fixes the token counts).
    extra: tensors the example uses outside `model.weights` (see the module docstring).
    channels: input channels.

  Returns:
    KerasImport(variables, normalization); the variables are in the scanned layout when
    `model.scan` (`scan_layout`). Raises ValueError naming the Keras tensor (or the
    project leaf) when a tensor is missing, left over or does not fit.
  """
  if family not in _CONVERTERS:
    raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
  for field, value in KERAS_FIELDS[family].items():
    if getattr(model, field) != value:
      raise ValueError(f"model.{field}={getattr(model, field)!r}; the Keras example's model "
                       f"computes {field}={value!r} (configs/{family}.py, preset keras)")
  scanned, model = scan_layout.is_scanned(model), scan_layout.unscanned(model)
  images = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  template = {k: v for k, v in template.items() if k in ("params", "batch_stats")}
  converter = _Converter(weights, template)
  _CONVERTERS[family](converter, model, extra or {})
  result = converter.result()
  result.input_scale = _INPUT_SCALES.get(family, 1.0)
  result.variables = scan_layout.to_layout(result.variables, scan=scanned)
  return result
