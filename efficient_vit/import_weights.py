"""Import of reference weights: a published state dict onto this project's parameter tree.

    variables = load_reference("vit_small.safetensors", "timm_vit", model, image_size=224)
    logits = model.apply(variables, images)

Files are read with numpy only, from a local path (nothing is downloaded):
  .safetensors   the `safetensors` package's numpy API;
  .npz           numpy (big_vision / vision_transformer checkpoints, '/'-joined names);
  .pth .pt .bin  PyTorch's zip format (torch.save since 1.6), read by a restricted unpickler
                 (`read_torch_zip`): PyTorch is not a dependency, and no kept library reads
                 the format without it. Only plain containers and tensors are accepted; any
                 other class in the pickle is refused, so a file cannot run code on load.
A file holding {'model': state_dict} or {'state_dict': state_dict} (the official Swin and
CCT training scripts) is unwrapped.

Layouts (`LAYOUTS`) and the model they load into:
  timm_vit        timm `VisionTransformer` (class token, or `global_pool='avg'` with or
                  without `fc_norm`) -> models.vit.ViT
  big_vision_vit  big_vision `models/vit.py` .npz (`pool_type` 'tok' or 'gap'), and the older
                  google-research/vision_transformer .npz names -> models.vit.ViT
  timm_swin       timm `SwinTransformer` (timm >= 0.9 names, and the older names of timm and
                  microsoft/Swin-Transformer) -> models.swin.SwinTransformer
  timm_mobilevit  timm `mobilevit_*` (byobnet) -> models.mobilevit.MobileViT (variant paper)
  cct_official    SHI-Labs/Compact-Transformers `CCT` (vit-pytorch's `cct` has the same names)
                  -> models.cct.CCT

Every reference tensor is used exactly once and every leaf of the model's variables is
filled with an array of its shape; otherwise a ValueError names the tensor (missing, extra,
or a shape that does not fit) and nothing is returned. Buffers that the project computes
instead of storing (CCT's sine table, Swin's relative-position index) are compared with the
project's own value. BatchNorm's `num_batches_tracked` counters are the only tensors read and
dropped. `REFERENCE_FIELDS` lists the model fields each layout needs to compute what the
reference computes; `load_reference` checks them.

Not expressible here, so refused with the name of the first tensor that has no place: timm
ViTs that keep a class token but average the other tokens (`class_token=True` with
`global_pool='avg'`), ViTs whose position table leaves out the class token in timm
(`no_embed_class=True`, DeiT III), big_vision's `pre_logits` (`rep_size`) and MAP heads.
Position tables and Swin bias tables are imported at the checkpoint's own resolution and
window size; resizing them is the caller's step.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from efficient_vit import scan_layout

LAYOUTS = ("timm_vit", "big_vision_vit", "timm_swin", "timm_mobilevit", "cct_official")

# The model class each layout loads into (models/__init__.py registry names).
LAYOUT_MODELS = {"timm_vit": "vit", "big_vision_vit": "vit", "timm_swin": "swin",
                 "timm_mobilevit": "mobilevit", "cct_official": "cct"}

# Model fields that decide how a reference computes (sources next to each value).
REFERENCE_FIELDS: dict[str, dict[str, Any]] = {
    # timm/models/vision_transformer.py: nn.GELU (exact), LayerNorm eps 1e-6, qkv_bias=True.
    "timm_vit": dict(mlp_activation="gelu", norm_epsilon=1e-6, qkv_bias=True, proj_bias=True),
    # big_vision/models/vit.py: flax nn.gelu (tanh form), nn.LayerNorm default eps 1e-6,
    # nn.MultiHeadDotProductAttention with biases.
    "big_vision_vit": dict(mlp_activation="gelu_tanh", norm_epsilon=1e-6, qkv_bias=True,
                           proj_bias=True, fc_norm=False),
    # timm/models/swin_transformer.py (as microsoft/Swin-Transformer models/
    # swin_transformer.py): nn.GELU, nn.LayerNorm (eps 1e-5), qkv_bias=True, patch_norm=True.
    "timm_swin": dict(mlp_activation="gelu", norm_epsilon=1e-5, qkv_bias=True, patch_norm=True,
                      absolute_position_embedding=False, merge_after_last_stage=False,
                      merge_norm=True, final_norm=True),
    # timm/models/mobilevit.py (as apple/ml-cvnets): SiLU everywhere, BN + conv without bias.
    "timm_mobilevit": dict(variant="paper", mlp_activation="silu"),
    # Compact-Transformers src/utils/transformers.py: F.gelu (exact), nn.LayerNorm eps 1e-5,
    # qkv without bias, the residual stream normalised after the attention.
    "cct_official": dict(block_form="cct", mlp_activation="gelu", qkv_bias=False,
                         norm_epsilon=1e-5),
}


# ----------------------------------------------------------------------------------------
# Reading files.

_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  del unused  # requires_grad, backward hooks, metadata.
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *unused) -> np.ndarray:
  del unused
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch.save zip archive's data.pkl into numpy arrays, refusing any class but
  plain containers and tensors."""

  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.path = archive, prefix, path

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _TORCH_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"{self.path}: refuses to unpickle {module}.{name}; only state dicts of tensors "
        "(collections.OrderedDict, torch tensors and parameters) are read without PyTorch")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self.path}: unknown persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    data = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(data, storage_type.dtype, count=numel)


def read_torch_zip(path: str) -> Any:
  """The object that `torch.save` wrote to `path` (zip format), tensors as numpy arrays."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a zip archive: only torch.save's zip format (PyTorch >= "
                     "1.6) is read; re-save it with torch.save or convert it to .safetensors")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one */data.pkl in the archive, found {pickles}")
    prefix = pickles[0][:-len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
      raise ValueError(f"{path}: big-endian tensors are not supported")
    with archive.open(pickles[0]) as file:
      return _TorchUnpickler(file, archive, prefix, path).load()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """name -> numpy array from a .safetensors, .npz or PyTorch .pth / .pt / .bin file."""
  from efficient_vit import validation  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference checkpoint {path} does not exist")
  problem = validation.file_problem(path)  # Empty, a directory, a git-lfs pointer.
  if problem:
    raise ValueError(f"reference checkpoint {path}: {problem}")
  suffix = os.path.splitext(path)[1].lower()
  formats = {".safetensors": "a safetensors file", ".npz": "a numpy .npz archive",
             ".pth": "a PyTorch zip checkpoint", ".pt": "a PyTorch zip checkpoint",
             ".bin": "a PyTorch zip checkpoint"}
  if suffix not in formats:
    raise ValueError(f"reference checkpoint {path}: suffix {suffix!r}; allowed: .safetensors, "
                     ".npz, .pth, .pt, .bin")
  try:
    if suffix == ".safetensors":
      import safetensors.numpy  # pylint: disable=import-outside-toplevel
      state = safetensors.numpy.load_file(path)
    elif suffix == ".npz":
      with np.load(path, allow_pickle=False) as data:
        state = {k: data[k] for k in data.files}
    else:
      state = read_torch_zip(path)
  except Exception as e:  # pylint: disable=broad-except  # Each reader has its own errors.
    raise ValueError(f"reference checkpoint {path} is not {formats[suffix]} as its suffix "
                     f"says ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
  for wrapper in ("model", "state_dict"):
    if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  out = {}
  for k, v in state.items():
    if not isinstance(v, np.ndarray):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[str(k)] = v
  return out


# ----------------------------------------------------------------------------------------
# Mapping.

Path = tuple[str, ...]


class _Mapping:
  """Collects (reference tensors -> project leaves) assignments and checks them."""

  def __init__(self, state: Mapping[str, np.ndarray], layout: str,
               template: Mapping[Path, Any], source: str):
    self.state, self.layout, self.template, self.source = state, layout, template, source
    self.used: dict[str, str] = {}
    self.out: dict[Path, np.ndarray] = {}

  # Queries about the model's tree.
  def has(self, *path: str) -> bool:
    return any(k[:len(path)] == path for k in self.template)

  def shape(self, *path: str) -> tuple[int, ...]:
    return tuple(self.template[path].shape)

  def count(self, prefix: Path, pattern: str) -> int:
    """Number of distinct children of `prefix` named like `pattern` % i, i = 0, 1, ..."""
    i = 0
    while self.has(*prefix, pattern % i):
      i += 1
    return i

  # Reading the reference.
  def present(self, key: str) -> bool:
    return key in self.state

  def take(self, key: str, purpose: str) -> np.ndarray:
    if key not in self.state:
      raise ValueError(f"reference tensor {key!r} is missing from {self.source} "
                       f"({self.layout} layout); it is needed for {purpose}")
    if key in self.used:
      raise ValueError(f"reference tensor {key!r} would be used twice ({self.used[key]} and "
                       f"{purpose})")
    self.used[key] = purpose
    return np.asarray(self.state[key])

  def drop(self, key: str, why: str) -> None:
    """Marks a tensor that is read on purpose and not stored (e.g. BN's step counter)."""
    self.take(key, why)

  # Writing the project's leaves.
  def put(self, path: Path, fn: Callable[..., Sequence[np.ndarray] | np.ndarray],
          keys: Sequence[str], targets: Sequence[Path] | None = None) -> None:
    """Fills `targets` (default: [path]) with fn(*tensors of `keys`), checking the shapes."""
    targets = [path] if targets is None else targets
    names = "/".join(path)
    arrays = [self.take(k, "/".join(targets[0])) for k in keys]
    described = ", ".join(f"{k!r} of shape {tuple(a.shape)}" for k, a in zip(keys, arrays))
    for target in targets:
      if target not in self.template:
        raise ValueError(f"{self.layout}: the model has no leaf {'/'.join(target)} for "
                         f"{described} (is the model built with the reference's fields?)")
    expected = [tuple(self.template[t].shape) for t in targets]
    try:
      values = fn(*arrays)
    except (ValueError, IndexError) as e:
      raise ValueError(f"reference tensor {described} does not fit {names} "
                       f"(expected {expected}): {e}") from None
    values = [values] if isinstance(values, np.ndarray) else list(values)
    for target, value, shape in zip(targets, values, expected):
      if tuple(value.shape) != shape:
        raise ValueError(f"reference tensor {described} does not fit {'/'.join(target)}: "
                         f"it gives shape {tuple(value.shape)}, the model has {shape}")
      self.out[target] = value

  def keep(self, target: Path, value: Any) -> None:
    """A leaf that no reference tensor fills (the classifier with `new_head`) keeps `value`."""
    self.out[target] = np.asarray(value)

  def check_buffer(self, key: str, expected: np.ndarray, what: str, atol: float = 1e-5) -> None:
    value = self.take(key, what)
    if value.shape != expected.shape or not np.allclose(value, expected, atol=atol):
      raise ValueError(f"reference tensor {key!r} (shape {tuple(value.shape)}) differs from "
                       f"the {what} this model computes (shape {tuple(expected.shape)})")

  def finish(self) -> dict[Path, np.ndarray]:
    extra = sorted(set(self.state) - set(self.used))
    if extra:
      raise ValueError(f"reference tensor {extra[0]!r} (shape {tuple(self.state[extra[0]].shape)}"
                       f") of {self.source} has no place in this model ({self.layout} layout)"
                       + (f"; {len(extra) - 1} more unused: {extra[1:6]}" if len(extra) > 1
                          else ""))
    missing = [p for p in self.template if p not in self.out]
    if missing:
      raise ValueError(f"{self.layout}: no reference tensor for the model's leaf "
                       f"{'/'.join(missing[0])} ({len(missing)} unfilled)")
    return self.out


# Tensor layouts: PyTorch Linear [out, in], Conv2d [out, in, kh, kw] -> flax.
def _dense(w, *b):
  return (w.T,) + b


def _conv(kernel_shape):
  """Conv2d weight -> flax Conv kernel [kh, kw, in, out], or a Dense kernel for a 1x1 conv
  that the project computes as a Dense ([in, out])."""
  def fn(w, *b):
    w = w[:, :, 0, 0].T if len(kernel_shape) == 2 else w.transpose(2, 3, 1, 0)
    return (w,) + b
  return fn


def _linear(m: _Mapping, prefix: str, path: Path, bias: bool = True) -> None:
  keys = [prefix + ".weight"] + ([prefix + ".bias"] if bias else [])
  m.put(path, _dense, keys, [path + ("kernel",)] + ([path + ("bias",)] if bias else []))


def _conv_module(m: _Mapping, prefix: str, path: Path, bias: bool | None = None) -> None:
  bias = m.has(*path, "bias") if bias is None else bias
  keys = [prefix + ".weight"] + ([prefix + ".bias"] if bias else [])
  m.put(path, _conv(m.shape(*path, "kernel")), keys,
        [path + ("kernel",)] + ([path + ("bias",)] if bias else []))


def _layer_norm(m: _Mapping, prefix: str, path: Path) -> None:
  m.put(path, lambda w, b: (w, b), [prefix + ".weight", prefix + ".bias"],
        [path + ("scale",), path + ("bias",)])


def _batch_norm(m: _Mapping, prefix: str, path: Path) -> None:
  m.put(path, lambda w, b: (w, b), [prefix + ".weight", prefix + ".bias"],
        [("params",) + path[1:] + ("scale",), ("params",) + path[1:] + ("bias",)])
  m.put(path, lambda mean, var: (mean, var), [prefix + ".running_mean", prefix + ".running_var"],
        [("batch_stats",) + path[1:] + ("mean",), ("batch_stats",) + path[1:] + ("var",)])
  if m.present(prefix + ".num_batches_tracked"):
    m.drop(prefix + ".num_batches_tracked", "nothing (BatchNorm's step counter)")


def _fused_qkv(m: _Mapping, prefix: str, path: Path, bias: bool) -> None:
  """A fused qkv Linear [3 * heads * head_dim, dim] -> query/key/value [dim, heads, head_dim]."""
  dim, heads, head_dim = m.shape(*path, "query", "kernel")

  def split(w, *b):
    w = w.reshape(3, heads, head_dim, dim).transpose(0, 3, 1, 2)
    out = [w[0], w[1], w[2]]
    if b:
      out += list(b[0].reshape(3, heads, head_dim))
    return out

  targets = [path + (n, "kernel") for n in ("query", "key", "value")]
  if bias:
    targets += [path + (n, "bias") for n in ("query", "key", "value")]
  keys = [prefix + ".weight"] + ([prefix + ".bias"] if bias else [])
  m.put(path, split, keys, targets)


def _out_projection(m: _Mapping, prefix: str, path: Path) -> None:
  """Linear [dim, heads * head_dim] -> DenseGeneral kernel [heads, head_dim, dim]."""
  heads, head_dim, dim = m.shape(*path, "out", "kernel")
  bias = m.has(*path, "out", "bias")
  keys = [prefix + ".weight"] + ([prefix + ".bias"] if bias else [])
  targets = [path + ("out", "kernel")] + ([path + ("out", "bias")] if bias else [])
  m.put(path, lambda w, *b: (w.T.reshape(heads, head_dim, dim),) + b, keys, targets)


def _timm_block(m: _Mapping, prefix: str, block: Path, attention: Path) -> None:
  """timm's `Block` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""
  _layer_norm(m, prefix + "norm1", block + ("attention_norm",))
  _fused_qkv(m, prefix + "attn.qkv", attention, bias=m.has(*attention, "query", "bias"))
  _out_projection(m, prefix + "attn.proj", attention)
  _layer_norm(m, prefix + "norm2", block + ("mlp_norm",))
  _linear(m, prefix + "mlp.fc1", block + ("mlp", "Dense_0"))
  _linear(m, prefix + "mlp.fc2", block + ("mlp", "Dense_1"))


def _head(m: _Mapping, keys: Sequence[str], new_head: bool) -> None:
  """The classifier: from the first of `keys` present, or kept from the model's init."""
  P = ("params", "head")
  key = next((k for k in keys if m.present(k + ".weight")), keys[0])
  if new_head:
    for suffix in (".weight", ".bias"):
      if m.present(key + suffix):
        m.drop(key + suffix, "nothing (new_head: the model's own head is kept)")
    return
  _linear(m, key, P)


def _map_timm_vit(m: _Mapping, new_head: bool) -> None:
  P = ("params",)
  _conv_module(m, "patch_embed.proj", P + ("patch_embedding", "projection"))
  if m.has("params", "class_token"):
    m.put(P + ("class_token",), lambda t: t, ["cls_token"], [P + ("class_token", "token")])
  m.put(P + ("position_embedding",), lambda t: t, ["pos_embed"],
        [P + ("position_embedding", "embedding")])
  for i in range(m.count(P + ("encoder",), "block_%d")):
    block = P + ("encoder", f"block_{i}")
    _timm_block(m, f"blocks.{i}.", block, block + ("attention",))
  _layer_norm(m, "fc_norm" if m.present("fc_norm.weight") else "norm", P + ("encoder_norm",))
  _head(m, ["head"], new_head)


def _map_big_vision_vit(m: _Mapping, new_head: bool) -> None:
  P = ("params",)

  def first(*keys: str) -> str:
    return next((k for k in keys if m.present(k)), keys[0])

  m.put(P + ("patch_embedding",), lambda w, b: (w, b), ["embedding/kernel", "embedding/bias"],
        [P + ("patch_embedding", "projection", "kernel"),
         P + ("patch_embedding", "projection", "bias")])
  has_cls = m.has("params", "class_token")
  if has_cls:
    m.put(P + ("class_token",), lambda t: t, ["cls"], [P + ("class_token", "token")])
  table = P + ("position_embedding", "embedding")
  old = "Transformer/posembed_input/pos_embedding"
  if m.present(old):  # vision_transformer: a position for the class token too.
    m.put(table[:-1], lambda t: t, [old], [table])
  elif has_cls:
    # big_vision adds the positions before it prepends the class token: that token's
    # position in this model's table is zero.
    m.put(table[:-1], lambda t: np.concatenate([np.zeros_like(t[:, :1]), t], axis=1),
          ["pos_embedding"], [table])
  else:
    m.put(table[:-1], lambda t: t, ["pos_embedding"], [table])
  for i in range(m.count(P + ("encoder",), "block_%d")):
    ref, block = f"Transformer/encoderblock_{i}/", P + ("encoder", f"block_{i}")
    attention = first(ref + "MultiHeadDotProductAttention_0/query/kernel",
                      ref + "MultiHeadDotProductAttention_1/query/kernel").rsplit("/", 2)[0]
    norms = (ref + "LayerNorm_0", first(ref + "LayerNorm_1/scale",
                                        ref + "LayerNorm_2/scale").rsplit("/", 1)[0])
    mlp = first(ref + "MlpBlock_0/Dense_0/kernel", ref + "MlpBlock_3/Dense_0/kernel").rsplit(
        "/", 2)[0]
    for norm, name in zip(norms, ("attention_norm", "mlp_norm")):
      m.put(block + (name,), lambda s, b: (s, b), [norm + "/scale", norm + "/bias"],
            [block + (name, "scale"), block + (name, "bias")])
    for n in ("query", "key", "value", "out"):
      m.put(block + ("attention", n), lambda k, b: (k, b),
            [f"{attention}/{n}/kernel", f"{attention}/{n}/bias"],
            [block + ("attention", n, "kernel"), block + ("attention", n, "bias")])
    for j in range(2):
      m.put(block + ("mlp",), lambda k, b: (k, b),
            [f"{mlp}/Dense_{j}/kernel", f"{mlp}/Dense_{j}/bias"],
            [block + ("mlp", f"Dense_{j}", "kernel"), block + ("mlp", f"Dense_{j}", "bias")])
  m.put(P + ("encoder_norm",), lambda s, b: (s, b),
        ["Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"],
        [P + ("encoder_norm", "scale"), P + ("encoder_norm", "bias")])
  if new_head:
    for k in ("head/kernel", "head/bias"):
      if m.present(k):
        m.drop(k, "nothing (new_head: the model's own head is kept)")
  else:
    m.put(P + ("head",), lambda k, b: (k, b), ["head/kernel", "head/bias"],
          [P + ("head", "kernel"), P + ("head", "bias")])


def _map_timm_swin(m: _Mapping, new_head: bool) -> None:
  from efficient_vit.models import swin  # pylint: disable=import-outside-toplevel
  P = ("params",)
  _conv_module(m, "patch_embed.proj", P + ("patch_embedding", "projection"))
  _layer_norm(m, "patch_embed.norm", P + ("patch_norm",))
  merge_at_end = m.present("layers.0.downsample.reduction.weight")
  stage = 0
  while m.has("params", f"stage{stage}_block0"):
    for i in range(m.count(P, f"stage{stage}_block%d")):
      prefix, block = f"layers.{stage}.blocks.{i}.", P + (f"stage{stage}_block{i}",)
      attention = block + ("attention",)
      _timm_block(m, prefix, block, attention + ("window_attention",))
      table = attention + ("relative_position_bias_table",)
      m.put(table, lambda t: t, [prefix + "attn.relative_position_bias_table"], [table])
      window = int(round((np.sqrt(m.shape(*table)[0]) + 1) / 2))
      if m.present(prefix + "attn.relative_position_index"):  # microsoft/Swin-Transformer
        m.check_buffer(prefix + "attn.relative_position_index",
                       swin.relative_position_index(window), "relative position index")
      if m.present(prefix + "attn_mask"):  # The official additive -100 mask: a buffer.
        m.drop(prefix + "attn_mask", "nothing (the shift mask is computed here)")
    if m.has("params", f"stage{stage}_merging"):
      # timm >= 0.9 merges at the start of the next stage, older timm and the official code at
      # the end of this one.
      ref = f"layers.{stage if merge_at_end else stage + 1}.downsample"
      merging = P + (f"stage{stage}_merging",)
      if m.has(*merging, "norm"):
        _layer_norm(m, ref + ".norm", merging + ("norm",))
      _linear(m, ref + ".reduction", merging + ("reduction",), bias=False)
    stage += 1
  _layer_norm(m, "norm", P + ("final_norm",))
  _head(m, ["head.fc", "head"], new_head)


def _map_timm_mobilevit(m: _Mapping, new_head: bool) -> None:
  P = ("params",)

  def conv_bn(prefix: str, name: Path) -> None:
    _conv_module(m, prefix + ".conv", P + name + ("conv",), bias=False)
    _batch_norm(m, prefix + ".bn", P + name + ("norm",))

  def mv2(prefix: str, name: Path) -> None:
    if m.has("params", *name, "expand"):
      conv_bn(prefix + ".conv1_1x1", name + ("expand",))
    conv_bn(prefix + ".conv2_kxk", name + ("depthwise",))
    conv_bn(prefix + ".conv3_1x1", name + ("project",))

  conv_bn("stem", ("stem",))
  stage = 1
  while True:
    if m.has("params", f"stage_{stage}_mv2_0"):
      for j in range(m.count(P, f"stage_{stage}_mv2_%d")):
        mv2(f"stages.{stage - 1}.{j}", (f"stage_{stage}_mv2_{j}",))
    elif m.has("params", f"stage_{stage}_mv2"):
      mv2(f"stages.{stage - 1}.0", (f"stage_{stage}_mv2",))
      ref, block = f"stages.{stage - 1}.1.", (f"stage_{stage}_mobilevit",)
      conv_bn(ref + "conv_kxk", block + ("local_conv",))
      _conv_module(m, ref + "conv_1x1", P + block + ("to_transformer", "conv"), bias=False)
      for t in range(m.count(P + block, "transformer_%d")):
        layer = P + block + (f"transformer_{t}",)
        _timm_block(m, f"{ref}transformer.{t}.", layer, layer + ("attention",))
      _layer_norm(m, ref + "norm", P + block + ("transformer_norm",))
      conv_bn(ref + "conv_proj", block + ("from_transformer",))
      conv_bn(ref + "conv_fusion", block + ("fusion",))
    else:
      break
    stage += 1
  conv_bn("final_conv", ("last_conv",))
  _head(m, ["head.fc"], new_head)


def _map_cct_official(m: _Mapping, new_head: bool) -> None:
  from efficient_vit import layers  # pylint: disable=import-outside-toplevel
  P, C = ("params",), "classifier."
  if m.has("params", "conv_tokenizer"):
    for i in range(m.count(P + ("conv_tokenizer",), "conv_%d")):
      _conv_module(m, f"tokenizer.conv_layers.{i}.0", P + ("conv_tokenizer", f"conv_{i}"))
  else:
    _conv_module(m, "tokenizer.conv_layers.0.0", P + ("patch_embedding", "projection"))
  if m.has("params", "class_token"):
    m.put(P + ("class_token",), lambda t: t, [C + "class_emb"], [P + ("class_token", "token")])
  table = P + ("position_embedding", "embedding")
  if table in m.template:
    m.put(table[:-1], lambda t: t, [C + "positional_emb"], [table])
  elif m.present(C + "positional_emb"):  # The sine table: a parameter without gradient.
    _, tokens, dim = m.state[C + "positional_emb"].shape
    m.check_buffer(C + "positional_emb",
                   np.asarray(layers.sinusoidal_position_embedding(tokens, dim))[None],
                   "sine position table")
  for i in range(m.count(P + ("encoder",), "block_%d")):
    ref, block = f"{C}blocks.{i}.", P + ("encoder", f"block_{i}")
    attention = block + ("attention",)
    _layer_norm(m, ref + "pre_norm", block + ("attention_norm",))
    _fused_qkv(m, ref + "self_attn.qkv", attention, bias=m.has(*attention, "query", "bias"))
    _out_projection(m, ref + "self_attn.proj", attention)
    _layer_norm(m, ref + "norm1", block + ("mlp_norm",))
    _linear(m, ref + "linear1", block + ("mlp", "Dense_0"))
    _linear(m, ref + "linear2", block + ("mlp", "Dense_1"))
  _layer_norm(m, C + "norm", P + ("encoder_norm",))
  if m.has("params", "sequence_pooling"):
    _linear(m, C + "attention_pool", P + ("sequence_pooling", "score"))
  _head(m, [C + "fc"], new_head)


_MAPPERS = {"timm_vit": _map_timm_vit, "big_vision_vit": _map_big_vision_vit,
            "timm_swin": _map_timm_swin, "timm_mobilevit": _map_timm_mobilevit,
            "cct_official": _map_cct_official}


def check_reference_fields(layout: str, model: Any, command_line: bool = False) -> None:
  """A ValueError naming the first field of `model` that differs from what `layout` computes,
  and how to fix it: the launch.py override (`command_line`, the `config.init_from` path) or,
  for `load_reference`'s callers, the model field or `check_fields=False`."""
  for field, value in REFERENCE_FIELDS[layout].items():
    have = getattr(model, field, None)
    if have != value:
      fix = (f"add --config.model.{field}={value} to the command" if command_line else
             f"build the model with {field}={value!r} (or pass check_fields=False to load "
             "the weights into a different computation)")
      raise ValueError(f"config.model.{field}={have!r}; allowed: {value!r}, what {layout} "
                       f"checkpoints compute with: {fix}")


def convert(state: Mapping[str, np.ndarray], layout: str, variables: Mapping[str, Any], *,
            new_head: bool = False, source: str = "the state dict") -> dict[str, Any]:
  """Maps a reference state dict onto `variables` (the model's own, or their shapes from
  `jax.eval_shape`) and returns new variables with every leaf from the reference.

  With `new_head`, the reference's classifier is read and dropped, and the classifier
  leaves of `variables` (which must then be arrays, e.g. a fresh init) are kept.
  """
  if layout not in _MAPPERS:
    raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
  template = traverse_util.flatten_dict(dict(variables))
  m = _Mapping(state, layout, template, source)
  if new_head:
    for path, leaf in template.items():
      if path[:2] == ("params", "head"):
        m.keep(path, leaf)
  _MAPPERS[layout](m, new_head)
  out = m.finish()
  for path, value in out.items():
    want = template[path]
    out[path] = jnp.asarray(value, dtype=want.dtype)
  return traverse_util.unflatten_dict(out)


def load_reference(path: str | os.PathLike, layout: str, model: Any, image_size: int, *,
                   new_head: bool = False, rng: jax.Array | None = None,
                   check_fields: bool = True, in_channels: int = 3) -> dict[str, Any]:
  """Variables for `model` (a flax module) from the reference checkpoint at `path`.

  `image_size` is the checkpoint's resolution (it fixes the shapes of position tables);
  resizing them for another resolution is the caller's step. With `new_head`, the
  classifier comes from `model.init(rng, ...)` (a different class count) instead.
  A model with `scan=True` gets its variables in the scanned layout (`scan_layout`).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
  from efficient_vit.models import model_class  # pylint: disable=import-outside-toplevel
  expected = model_class(LAYOUT_MODELS[layout])
  if not isinstance(model, expected):
    raise ValueError(f"layout={layout!r} loads into model.name={LAYOUT_MODELS[layout]!r} "
                     f"({expected.__name__}); got a {type(model).__name__}")
  if check_fields:
    check_reference_fields(layout, model)
  scanned, model = scan_layout.is_scanned(model), scan_layout.unscanned(model)
  state = read_state_dict(path)
  images = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if new_head:
    variables = model.init(rng, images)
  else:
    variables = jax.eval_shape(model.init, rng, images)
  return scan_layout.to_layout(
      convert(state, layout, variables, new_head=new_head, source=os.fspath(path)),
      scan=scanned)

