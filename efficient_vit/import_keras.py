"""Import of weights trained with the Keras examples (keras-team/keras-io `examples/vision/`).

Each family's `keras` preset (`configs/<family>.py`, and EANet's `keras_self`) computes what
the matching Keras example's model computes; this module moves such a model's weights, as
Keras saved them, into the project's parameter tree:

  vit        image_classification_with_vision_transformer.py
  eanet      eanet.py (external attention, or its self-attention twin)
  cct        cct.py
  swin       swin_transformers.py
  mobilevit  mobilevit.py
  perceiver  perceiver_image_classification.py

Pass the file the example's user has: `model.save_weights("x.weights.h5")` or
`model.save("x.keras")` (Keras 3), or a `.npz` of the same {saved path: array}:

    weights = import_keras.read_weights("x.weights.h5")
    imported = import_keras.convert("swin", model, weights, image_size=32)
    logits = model.apply(imported.variables, imported.preprocess(images))

What Keras saves is a tree of the model's objects, not of variable names: a dataset path
such as `layers/swin_transformer_1/attn/vars/0` names the layer in its container (the
snake-cased class, numbered in the container's layer order: `dense`, `dense_1`, ...), the
attribute path the example's code gives its sublayers (`attn`, `qkv`, `norm1`), and the
variable's rank among the layer's own variables. The examples leave many variables
unnamed (Swin's relative-position bias table, index and shift mask, the Perceiver's latent
array): they are found by that position, as Keras finds them when it loads the file. The
import walks the example's model in its layer order, takes each layer's variables by rank,
checks each one's shape against the project leaf it fills, and fails with a ValueError
naming the saved path (and the project leaf) when one is missing, left over, ambiguous or
of the wrong shape. Every saved variable is used exactly once and every leaf of the
project's variables is filled; buffers the examples save (Swin's relative-position index
and shift mask) are checked against the project's own instead of loaded.

Preprocessing inside the example's model is not part of the project's model: a
`Normalization` layer's statistics come back as `KerasImport.normalization`, for the input
pipeline (`(images - mean) / std`); the examples' `Rescaling(1 / 255)` layers (CCT,
MobileViT) hold no weights and come back as `KerasImport.input_scale`.
`KerasImport.preprocess` applies both to the Keras model's raw input. The Swin example feeds
its model patches cut in tf.data from images already divided by 255: the project's model
takes those images.

The Perceiver's Normalization sits in the module-level `data_augmentation`, which its
subclassed model calls but does not track, so Keras does not save it: pass
`extra={'normalization_mean': ..., 'normalization_variance': ...}` (from
`data_augmentation.layers[0].mean` / `.variance`); without them `normalization` is None.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import zipfile
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
    # eanet.py and cct.py (Keras 3) use keras.ops.gelu, whose default is the tanh form.
    "eanet": dict(mlp_activation="gelu_tanh", norm_epsilon=1e-5),
    "cct": dict(tokenizer="conv", tokenizer_form="keras", mlp_activation="gelu_tanh",
                mlp_activate_last=True, block_form="pre_norm", qkv_bias=True, norm_epsilon=1e-5,
                pooling="seq"),
    "swin": dict(mlp_activation="gelu", qkv_bias=True, norm_epsilon=1e-5, patch_norm=False,
                 absolute_position_embedding=True, merge_after_last_stage=True,
                 merge_norm=False, final_norm=False),
    "mobilevit": dict(variant="keras", patch_size=1, conv_padding="same",
                      depthwise_padding="symmetric", mlp_activation="silu"),
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


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The variables of a file Keras saved: {saved path: array}.

  `path` is a `.weights.h5` (`model.save_weights`), a `.keras` archive (`model.save`; its
  `model.weights.h5` is read), or an `.npz` whose keys are such saved paths (keys under
  `weights/` lose that prefix and other keys are then left out).
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      keys = list(data.files)
      if any(k.startswith("weights/") for k in keys):
        return {k[len("weights/"):]: data[k] for k in keys if k.startswith("weights/")}
      return {k: data[k] for k in keys}
  import h5py  # pylint: disable=import-outside-toplevel
  if path.endswith(".keras"):
    with zipfile.ZipFile(path) as archive:
      if "model.weights.h5" not in archive.namelist():
        raise ValueError(f"{path}: no model.weights.h5 in the archive "
                         f"(has {sorted(archive.namelist())})")
      source: Any = io.BytesIO(archive.read("model.weights.h5"))
  elif path.endswith(".h5"):
    source = path
  else:
    raise ValueError(f"path={path!r}; allowed: a .weights.h5, .keras or .npz file")
  out: dict[str, np.ndarray] = {}
  with h5py.File(source, "r") as f:
    f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj[()]))
                 if isinstance(obj, h5py.Dataset) else None)
  return out


# A saved path: .../<object>/vars/<rank>.
_VAR = re.compile(r"^(?:(.*)/)?vars/(\d+)$")


class _Node:
  """One saved object: its own variables by rank, and its children by saved name."""

  def __init__(self, path: str):
    self.path = path
    self.vars: dict[int, np.ndarray] = {}
    self.children: dict[str, _Node] = {}

  def at(self, name: str) -> str:
    return f"{self.path}/{name}" if self.path else name


class _Saved:
  """The saved variables as the tree Keras wrote; every variable handed out once."""

  def __init__(self, weights: Mapping[str, Any]):
    self.root = _Node("")
    self.used: set[str] = set()
    self.all: dict[str, tuple[int, ...]] = {}
    for key, value in weights.items():
      key = str(key)
      match = _VAR.match(key)
      if not match:
        raise ValueError(f"saved variable {key!r} is not a path Keras writes "
                         "(.../vars/<n>): not a Keras 3 .weights.h5 layout (Variable.path "
                         "names are not saved; pass the file model.save_weights or "
                         "model.save wrote)")
      node = self.root
      for part in match.group(1).split("/") if match.group(1) else []:
        node = node.children.setdefault(part, _Node(node.at(part)))
      node.vars[int(match.group(2))] = np.asarray(value)
      self.all[key] = np.shape(value)

  def child(self, node: _Node, *names: str, target: str = "") -> _Node:
    """The first of `names` (attribute paths) under `node` that was saved."""
    for name in names:
      sub = node
      for part in name.split("/"):
        sub = sub.children.get(part)
        if sub is None:
          break
      if sub is not None:
        return sub
    raise ValueError(f"the saved weights have no {' or '.join(repr(node.at(n)) for n in names)}"
                     + (f" (for the project's {target})" if target else "")
                     + ": a missing layer, or weights of another model")

  def var(self, node: _Node, rank: int, target: str) -> tuple[str, np.ndarray]:
    path = node.at(f"vars/{rank}")
    if rank not in node.vars:
      raise ValueError(f"the saved weights have no {path!r} (for the project's {target}): "
                       "a variable is missing")
    if path in self.used:
      raise ValueError(f"saved variable {path!r} would be used twice (for {target})")
    self.used.add(path)
    return path, node.vars[rank]

  def sequence(self, container: _Node, kind: str) -> list[_Node]:
    """The layers of one kind in a functional/Sequential container, in its layer order:
    `kind`, `kind_1`, `kind_2`, ... (Keras numbers them so; a gap is an error)."""
    layers_node = container.children.get("layers")
    if layers_node is None:
      return []
    pattern = re.compile(rf"^{re.escape(kind)}(?:_(\d+))?$")
    found = {}
    for name, node in layers_node.children.items():
      match = pattern.match(name)
      if match:
        found[int(match.group(1) or 0)] = node
    missing = [i for i in range(len(found)) if i not in found]
    if missing:
      name = kind if missing[0] == 0 else f"{kind}_{missing[0]}"
      raise ValueError(f"the saved weights have {len(found)} {kind!r} layers under "
                       f"{layers_node.path!r} but no {layers_node.at(name)!r}: the layer "
                       "order is ambiguous")
    return [found[i] for i in range(len(found))]

  def finish(self) -> None:
    unused = [p for p in self.all if p not in self.used]
    if unused:
      raise ValueError(f"saved variable {unused[0]!r} {self.all[unused[0]]} (and "
                       f"{len(unused) - 1} more) is not used by the project's model: an "
                       "extra variable, or a model larger than the config")


class _Queue:
  """The layers of one kind of a container, handed out in the container's order."""

  def __init__(self, saved: _Saved, container: _Node, kind: str):
    self.saved, self.container, self.kind = saved, container, kind
    self.nodes = saved.sequence(container, kind)
    self.next = 0

  def take(self, target: str) -> _Node:
    if self.next >= len(self.nodes):
      name = self.kind if self.next == 0 else f"{self.kind}_{self.next}"
      where = self.container.at(f"layers/{name}")
      raise ValueError(f"the saved weights have no {where!r} (for the project's {target}): "
                       f"a layer is missing ({len(self.nodes)} {self.kind!r} saved)")
    node = self.nodes[self.next]
    self.next += 1
    return node


class _Tree:
  """The project's variables, filled leaf by leaf against the shapes of `model.init`."""

  def __init__(self, template: Mapping[str, Any]):
    flat = jax.tree_util.tree_flatten_with_path(template)[0]
    self.shapes = {"/".join(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}
    self.values: dict[str, np.ndarray] = {}

  def has(self, target: str) -> bool:
    return target in self.shapes

  def put(self, target: str, saved_path: str, value: np.ndarray,
          reshape: bool = False) -> None:
    """Fills `target` with `value`, reshaped to the leaf's shape when `reshape` (same size)."""
    if target not in self.shapes:
      raise ValueError(f"saved variable {saved_path!r} {value.shape} has no place in the "
                       f"project's model: it has no leaf {target} (config and weights "
                       "disagree)")
    if target in self.values:
      raise ValueError(f"the project's {target} would be filled twice (last by "
                       f"{saved_path!r})")
    expected = self.shapes[target]
    if reshape and int(np.prod(value.shape)) == int(np.prod(expected)):
      value = value.reshape(expected)
    if tuple(value.shape) != expected:
      raise ValueError(f"saved variable {saved_path!r} of shape {value.shape} does not fit "
                       f"the project's {target} of shape {expected}")
    self.values[target] = np.asarray(value, np.float32)

  def finish(self) -> dict[str, Any]:
    missing = [t for t in self.shapes if t not in self.values]
    if missing:
      raise ValueError(f"the saved weights leave the project's {missing[0]} "
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
  """Shared moves: one method per Keras layer kind, each taking its variables by rank."""

  def __init__(self, weights: Mapping[str, Any], template: Mapping[str, Any]):
    self.saved = _Saved(weights)
    self.tree = _Tree(template)
    self.normalization: tuple[np.ndarray, np.ndarray] | None = None

  def queue(self, container: _Node, kind: str) -> _Queue:
    return _Queue(self.saved, container, kind)

  def put(self, node: _Node, rank: int, target: str, reshape: bool = False) -> None:
    path, value = self.saved.var(node, rank, target)
    self.tree.put(target, path, value, reshape=reshape)

  def dense(self, node: _Node, prefix: str, reshape: bool = False) -> None:
    """Dense / Conv2D: vars 0 kernel, 1 bias (when the project's layer has one)."""
    self.put(node, 0, f"params/{prefix}/kernel", reshape=reshape)
    if self.tree.has(f"params/{prefix}/bias"):
      self.put(node, 1, f"params/{prefix}/bias")

  def layer_norm(self, node: _Node, prefix: str) -> None:
    """LayerNormalization: vars 0 gamma, 1 beta."""
    self.put(node, 0, f"params/{prefix}/scale")
    self.put(node, 1, f"params/{prefix}/bias")

  def batch_norm(self, node: _Node, prefix: str) -> None:
    """BatchNormalization: vars 0 gamma, 1 beta, 2 moving_mean, 3 moving_variance."""
    self.put(node, 0, f"params/{prefix}/scale")
    self.put(node, 1, f"params/{prefix}/bias")
    self.put(node, 2, f"batch_stats/{prefix}/mean")
    self.put(node, 3, f"batch_stats/{prefix}/var")

  def multi_head_attention(self, node: _Node, prefix: str) -> None:
    """MultiHeadAttention: query/key/value_dense [dim, heads, key_dim], output_dense."""
    for part in ("query", "key", "value"):
      self.dense(self.saved.child(node, f"{part}_dense", target=f"{prefix}/{part}"),
                 f"{prefix}/{part}")
    out = self.saved.child(node, "output_dense", target=f"{prefix}/out")
    self.put(out, 0, f"params/{prefix}/out/kernel")
    self.put(out, 1, f"params/{prefix}/out/bias")

  def mlp(self, dense: _Queue, prefix: str) -> None:
    """The project's MLP Dense_0, Dense_1, ... from the next Dense layers."""
    i = 0
    while self.tree.has(f"params/{prefix}/Dense_{i}/kernel"):
      self.dense(dense.take(f"{prefix}/Dense_{i}"), f"{prefix}/Dense_{i}")
      i += 1

  def patch_encoder(self, node: _Node, projection: str, position: str,
                    patch_target: str, position_target: str) -> None:
    """The examples' PatchEncoder / PatchEmbedding: a Dense on the flattened (p, p, C) patch,
    which is the project's p x p stride-p convolution reshaped, then a position
    Embedding [tokens, dim] -> the project's table [1, tokens, dim]."""
    self.dense(self.saved.child(node, projection, target=patch_target), patch_target,
               reshape=True)
    self.put(self.saved.child(node, position, target=position_target), 0, position_target,
             reshape=True)

  def normalization_layer(self, root: _Node) -> None:
    """The Normalization of the example's `data_augmentation` Sequential (vars mean,
    variance, count), if the model holds one: it becomes preprocessing."""
    found = [(seq, norm) for seq in self.saved.sequence(root, "sequential")
             for norm in self.saved.sequence(seq, "normalization")]
    if not found:
      return
    if len(found) > 1:
      raise ValueError(f"the saved weights hold {len(found)} Normalization layers "
                       f"({', '.join(repr(n.path) for _, n in found)}): ambiguous input "
                       "normalisation")
    node = found[0][1]
    _, mean = self.saved.var(node, 0, "input normalisation (mean)")
    _, variance = self.saved.var(node, 1, "input normalisation (variance)")
    self.saved.var(node, 2, "input normalisation (count)")
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

  def encoder_block(self, block: str, norms: _Queue, attention, dense: _Queue) -> None:
    """One pre-norm block as the examples write it: LN, attention, Add, LN, MLP, Add."""
    self.layer_norm(norms.take(f"{block}/attention_norm"), f"{block}/attention_norm")
    attention(f"{block}/attention")
    self.layer_norm(norms.take(f"{block}/mlp_norm"), f"{block}/mlp_norm")
    self.mlp(dense, f"{block}/mlp")

  def result(self) -> KerasImport:
    self.saved.finish()
    tree = self.tree.finish()
    return KerasImport(tree, self.normalization)


def _functional_parts(c: _Converter, root: _Node):
  return (c.queue(root, "dense"), c.queue(root, "layer_normalization"),
          c.queue(root, "multi_head_attention"))


def _vit(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del model, extra
  root = c.saved.root
  dense, norms, mha = _functional_parts(c, root)
  c.normalization_layer(root)
  c.patch_encoder(c.saved.child(root, "layers/patch_encoder"), "projection",
                  "position_embedding", "patch_embedding/projection",
                  "params/position_embedding/embedding")
  for block in c.blocks("encoder"):
    c.encoder_block(block, norms,
                    lambda p: c.multi_head_attention(mha.take(p), p), dense)
  c.layer_norm(norms.take("encoder_norm"), "encoder_norm")
  c.mlp(dense, "head_mlp")
  c.dense(dense.take("head"), "head")


def _eanet(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del extra
  root = c.saved.root
  dense, norms, mha = _functional_parts(c, root)

  def external_attention(prefix: str) -> None:
    # The example's external_attention: Dense(dim * coef), M_k, M_v, Dense(dim).
    for name in ("input_projection", "memory_key", "memory_value", "output_projection"):
      c.dense(dense.take(f"{prefix}/{name}"), f"{prefix}/{name}")

  def self_attention(prefix: str) -> None:
    c.multi_head_attention(mha.take(prefix), prefix)

  c.normalization_layer(root)
  c.patch_encoder(c.saved.child(root, "layers/patch_embedding"), "proj", "pos_embed",
                  "patch_embedding/projection", "params/position_embedding/embedding")
  attention = external_attention if model.attention == "external" else self_attention
  for block in c.blocks("encoder"):
    c.encoder_block(block, norms, attention, dense)
  c.dense(dense.take("head"), "head")


def _cct(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del extra
  root = c.saved.root
  dense, norms, mha = _functional_parts(c, root)
  convs = c.queue(c.saved.child(root, "layers/cct_tokenizer/conv_model",
                                target="conv_tokenizer"), "conv2d")
  for i in range(model.num_conv_layers):
    c.dense(convs.take(f"conv_tokenizer/conv_{i}"), f"conv_tokenizer/conv_{i}")
  if c.tree.has("params/position_embedding/embedding"):
    # The example's PositionEmbedding layer: its `embeddings` [tokens, dim].
    c.put(c.saved.child(root, "layers/position_embedding", target="position_embedding"), 0,
          "params/position_embedding/embedding", reshape=True)
  for block in c.blocks("encoder"):
    c.encoder_block(block, norms, lambda p: c.multi_head_attention(mha.take(p), p), dense)
  c.layer_norm(norms.take("encoder_norm"), "encoder_norm")
  c.dense(c.saved.child(root, "layers/sequence_pooling/attention",
                        target="sequence_pooling/score"), "sequence_pooling/score")
  c.dense(dense.take("head"), "head")


def _swin(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  from efficient_vit.models import swin  # pylint: disable=import-outside-toplevel
  del extra
  root = c.saved.root
  dense = c.queue(root, "dense")
  blocks = c.queue(root, "swin_transformer")
  merges = c.queue(root, "patch_merging")
  c.patch_encoder(c.saved.child(root, "layers/patch_embedding"), "proj", "pos_embed",
                  "patch_embedding/projection", "params/position_embedding/embedding")
  tokens = c.tree.shapes["params/position_embedding/embedding"][1]
  side = int(round(np.sqrt(tokens)))  # the examples' square images
  shift_size = model.window_size // 2 if model.shift_size is None else model.shift_size
  for stage, depth in enumerate(model.depths):
    heads = model.num_heads[stage]
    window, shift = swin.effective_window((side, side), model.window_size, shift_size)
    for i in range(depth):
      block = f"stage{stage}_block{i}"
      node = blocks.take(block)
      if shift and i % 2:
        # SwinTransformer.build's unnamed keras.Variable (the block's own vars/0).
        path, mask = c.saved.var(node, 0, f"{block} shift mask")
        expected = swin.shifted_window_mask(side, side, window, shift)
        if mask.shape != expected.shape or not np.array_equal(mask == 0, expected):
          raise ValueError(f"saved variable {path!r} {mask.shape} is not the shift mask of a "
                           f"{side}x{side} map with window {window} and shift {shift} "
                           "(model.window_size, model.shift_size)")
      c.layer_norm(c.saved.child(node, "norm1", target=f"{block}/attention_norm"),
                   f"{block}/attention_norm")
      attn = c.saved.child(node, "attn", target=f"{block}/attention")
      # WindowAttention's unnamed variables: vars/0 the bias table, vars/1 the index.
      c.put(attn, 0, f"params/{block}/attention/relative_position_bias_table")
      path, index = c.saved.var(attn, 1, f"{block} relative position index")
      if not np.array_equal(index, swin.relative_position_index(window)):
        raise ValueError(f"saved variable {path!r} is not the relative position index of a "
                         f"{window}x{window} window (model.window_size)")
      # qkv: one Dense to 3 * dim, split as (3, heads, head_dim) by the example.
      attention = f"params/{block}/attention/window_attention"
      qkv = c.saved.child(attn, "qkv", target=f"{attention}/query,key,value")
      path, kernel = c.saved.var(qkv, 0, f"{attention}/query,key,value kernels")
      dim = kernel.shape[0]
      if kernel.shape != (dim, 3 * dim) or dim % heads:
        raise ValueError(f"saved variable {path!r} of shape {kernel.shape} is not a qkv "
                         f"kernel [dim, 3 * dim] for {heads} heads (model.num_heads)")
      kernel = kernel.reshape(dim, 3, heads, dim // heads)
      for j, part in enumerate(("query", "key", "value")):
        c.tree.put(f"{attention}/{part}/kernel", path, kernel[:, j])
      if c.tree.has(f"{attention}/query/bias"):
        path, bias = c.saved.var(qkv, 1, f"{attention}/query,key,value biases")
        if bias.shape != (3 * dim,):
          raise ValueError(f"saved variable {path!r} of shape {bias.shape} is not a qkv "
                           f"bias [3 * dim] = [{3 * dim}]")
        bias = bias.reshape(3, heads, dim // heads)
        for j, part in enumerate(("query", "key", "value")):
          c.tree.put(f"{attention}/{part}/bias", path, bias[j])
      proj = c.saved.child(attn, "proj", target=f"{attention}/out")
      path, kernel = c.saved.var(proj, 0, f"{attention}/out/kernel")
      c.tree.put(f"{attention}/out/kernel", path, kernel, reshape=True)
      c.put(proj, 1, f"{attention}/out/bias")
      c.layer_norm(c.saved.child(node, "norm2", target=f"{block}/mlp_norm"),
                   f"{block}/mlp_norm")
      c.mlp(c.queue(c.saved.child(node, "mlp", target=f"{block}/mlp"), "dense"),
            f"{block}/mlp")
    if stage < len(model.depths) - 1 or model.merge_after_last_stage:
      merge = merges.take(f"stage{stage}_merging")
      if model.merge_norm:
        c.layer_norm(c.saved.child(merge, "norm"), f"stage{stage}_merging/norm")
      c.dense(c.saved.child(merge, "linear_trans", target=f"stage{stage}_merging/reduction"),
              f"stage{stage}_merging/reduction")
    side //= 2
  if model.final_norm:
    c.layer_norm(c.queue(root, "layer_normalization").take("final_norm"), "final_norm")
  c.dense(dense.take("head"), "head")


def _mobilevit(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del extra
  root = c.saved.root
  conv2d = c.queue(root, "conv2d")
  depthwise = c.queue(root, "depthwise_conv2d")
  batch_norms = c.queue(root, "batch_normalization")
  dense, norms, mha = _functional_parts(c, root)

  def conv(prefix: str, depthwise_conv: bool = False) -> None:
    """A Keras Conv2D (or DepthwiseConv2D) into a project ConvBlock, and its batch norm."""
    target = f"params/{prefix}/conv/kernel"
    node = (depthwise if depthwise_conv else conv2d).take(target)
    path, kernel = c.saved.var(node, 0, target)
    shape = c.tree.shapes.get(target)
    if shape is not None and len(shape) == 2 and kernel.ndim == 4:
      kernel = kernel.reshape(kernel.shape[-2:])  # 1x1 convolution as a Dense
    elif depthwise_conv and shape is not None and kernel.ndim == 4:
      kernel = kernel.transpose(0, 1, 3, 2)  # depthwise: Keras [k, k, C, 1] -> [k, k, 1, C]
    c.tree.put(target, path, kernel)
    if c.tree.has(f"params/{prefix}/conv/bias"):
      c.put(node, 1, f"params/{prefix}/conv/bias")
    if c.tree.has(f"params/{prefix}/norm/scale"):
      c.batch_norm(batch_norms.take(f"{prefix}/norm"), f"{prefix}/norm")

  def inverted_residual(prefix: str) -> None:
    if c.tree.has(f"params/{prefix}/expand/conv/kernel"):
      conv(f"{prefix}/expand")
    conv(f"{prefix}/depthwise", depthwise_conv=True)
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
      c.encoder_block(f"{block}/transformer_{i}", norms,
                      lambda p: c.multi_head_attention(mha.take(p), p), dense)
    if c.tree.has(f"params/{block}/transformer_norm/scale"):
      c.layer_norm(norms.take(f"{block}/transformer_norm"), f"{block}/transformer_norm")
    conv(f"{block}/from_transformer")
    conv(f"{block}/fusion")
    stage += 1
  conv("last_conv")
  c.dense(dense.take("head"), "head")


def _perceiver(c: _Converter, model: nn.Module, extra: Mapping[str, Any]) -> None:
  del model
  if "normalization_mean" in extra or "normalization_variance" in extra:
    c.set_normalization(extra["normalization_mean"], extra["normalization_variance"])
  root = c.saved.root
  # Perceiver.build's unnamed add_weight: the model's own vars/0.
  c.put(root, 0, "params/latents")
  c.patch_encoder(c.saved.child(root, "layers/patch_encoder", "patch_encoder"), "projection",
                  "position_embedding", "input_embedding/projection",
                  "params/position_embedding/embedding")
  # The functional sub-models, saved under the Perceiver's attribute or in its layer list.
  cross_model = c.saved.child(root, "cross_attention", "layers/functional",
                              target="cross_attend_0")
  cross = "cross_attend_0"
  cross_norms = c.queue(cross_model, "layer_normalization")
  c.layer_norm(cross_norms.take(f"{cross}/latent_norm"), f"{cross}/latent_norm")
  c.layer_norm(cross_norms.take(f"{cross}/input_norm"), f"{cross}/input_norm")
  attention = f"{cross}/attention"
  # The example's Dense layers, in order query, key, value; `Attention` takes
  # [query, value, key]: its `key` Dense makes the values and its `value` Dense the keys.
  projections = c.queue(cross_model, "dense")
  for part in ("query", "value", "key"):
    node = projections.take(f"{attention}/{part}")
    path, kernel = c.saved.var(node, 0, f"params/{attention}/{part}/kernel")
    c.tree.put(f"params/{attention}/{part}/kernel", path, kernel, reshape=True)
    path, bias = c.saved.var(node, 1, f"params/{attention}/{part}/bias")
    c.tree.put(f"params/{attention}/{part}/bias", path, bias, reshape=True)
  if c.tree.has(f"params/{attention}/scale"):
    c.put(c.queue(cross_model, "attention").take(f"{attention}/scale"), 0,
          f"params/{attention}/scale")
  c.layer_norm(cross_norms.take(f"{cross}/mlp_norm"), f"{cross}/mlp_norm")
  c.mlp(c.queue(c.queue(cross_model, "sequential").take(f"{cross}/mlp"), "dense"),
        f"{cross}/mlp")
  latent_model = c.saved.child(root, "transformer", "layers/functional_1",
                               target="latent_transformer_0")
  latent_norms = c.queue(latent_model, "layer_normalization")
  latent_mha = c.queue(latent_model, "multi_head_attention")
  ffns = c.queue(latent_model, "sequential")
  for block in c.blocks("latent_transformer_0"):
    c.encoder_block(block, latent_norms,
                    lambda p: c.multi_head_attention(latent_mha.take(p), p),
                    _Queue(c.saved, ffns.take(f"{block}/mlp"), "dense"))
  if c.tree.has("params/latent_norm/scale"):
    c.layer_norm(latent_norms.take("latent_norm"), "latent_norm")
  head = c.queue(c.saved.child(root, "classification_head", "layers/sequential",
                               target="head"), "dense")
  c.mlp(head, "head_mlp")
  c.dense(head.take("head"), "head")


# The examples' `layers.Rescaling(scale=1.0 / 255)` inside the model (cct.py's
# data_augmentation, mobilevit.py's create_mobilevit); swin_transformers.py divides by 255
# before the model, which is the input pipeline's business.
_INPUT_SCALES = {"cct": 1.0 / 255, "mobilevit": 1.0 / 255}

# The tensors each family's import takes from `extra` (the rest of the example's weights
# come from the saved file).
_EXTRA = {"perceiver": ("normalization_mean", "normalization_variance")}

_CONVERTERS = {"vit": _vit, "eanet": _eanet, "cct": _cct, "swin": _swin,
               "mobilevit": _mobilevit, "perceiver": _perceiver}


def convert(family: str, model: nn.Module, weights: Mapping[str, Any] | str | os.PathLike,
            image_size: int, *, extra: Mapping[str, Any] | None = None,
            channels: int = 3) -> KerasImport:
  """Maps a Keras example's saved weights onto `model`, a module built from the family's
  `keras` preset (with the same sizes as the Keras model).

  Args:
    family: one of FAMILIES.
    model: the project's module (e.g. `models.build_model(config.model, num_classes)`).
    weights: the file Keras saved (`.weights.h5`, `.keras`, or an `.npz` of saved paths),
      or {saved path: array} as `read_weights` returns it.
    image_size: side of the square images the model takes (fixes the token counts).
    extra: tensors the example uses but does not save (the Perceiver's Normalization
      statistics, see the module docstring).
    channels: input channels.

  Returns:
    KerasImport(variables, normalization); the variables are in the scanned layout when
    `model.scan` (`scan_layout`). Raises ValueError naming the saved variable (or the
    project leaf) when one is missing, left over, ambiguous or does not fit.
  """
  if family not in _CONVERTERS:
    raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
  for field, value in KERAS_FIELDS[family].items():
    if getattr(model, field) != value:
      raise ValueError(f"model.{field}={getattr(model, field)!r}; the Keras example's model "
                       f"computes {field}={value!r} (configs/{family}.py, preset keras)")
  allowed = _EXTRA.get(family, ())
  for key in extra or {}:
    if key not in allowed:
      raise ValueError(f"extra[{key!r}] is not used by the {family} import; allowed: "
                       f"{', '.join(allowed) or 'none (every weight is in the saved file)'}")
  if isinstance(weights, (str, os.PathLike)):
    weights = read_weights(weights)
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
