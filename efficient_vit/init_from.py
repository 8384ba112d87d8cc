"""Starting a run from trained weights (`config.init_from`): this project's own runs or a
reference checkpoint (timm, big_vision, official CCT) through `import_weights`.

    --config.init_from.path=runs/vit_pretrain                       # a workdir of this project
    --config.init_from.path=vit_s16.npz --config.init_from.layout=big_vision_vit \
        --config.init_from.image_size=224                          # a reference checkpoint

The weights are fitted to the new run's model:
  - the classifier (`params/head`) is the new model's own fresh one when the class count
    differs (and kept when it is the same);
  - learned position embeddings ([1, prefix + g^2, dim], with prefix 0 or 1 class token)
    are resized over their g x g grid to the new token grid, bicubic, as timm and
    big_vision resize them for a new resolution (the class token's row is kept);
  - Swin's relative-position bias tables ([(2W - 1)^2, heads]) are resized the same way
    for another window size (timm's `resize_rel_pos_bias_table`);
  - any other leaf that is missing, extra or of another shape is an error naming it.
The optimizer state starts afresh (and the EMA from the loaded parameters). A workdir that
already has a checkpoint resumes from it instead: resuming wins over `init_from`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LAYOUTS = ("project", "timm_vit", "big_vision_vit", "timm_swin", "timm_mobilevit",
           "cct_official")


def validate(init_from) -> None:
  """Clear errors for `config.init_from` before anything is built or written."""
  if init_from.layout not in LAYOUTS:
    raise ValueError(f"config.init_from.layout={init_from.layout!r}; allowed: "
                     f"{', '.join(LAYOUTS)}")
  if not init_from.path:
    return
  if init_from.layout == "project":
    if not os.path.exists(os.path.join(init_from.path, "model.json")):
      raise ValueError(f"config.init_from.path={init_from.path!r}; allowed: a workdir of this "
                       "project (with model.json and checkpoints/), or a reference checkpoint "
                       "file with config.init_from.layout set to its layout")
  elif not os.path.isfile(init_from.path):
    raise ValueError(f"config.init_from.path={init_from.path!r} is not a file; allowed: a "
                     f"local {init_from.layout} checkpoint (.safetensors, .npz, .pth, .bin)")


def _grid_split(tokens_from: int, tokens_to: int) -> tuple[int, int, int] | None:
  """(prefix, grid side from, grid side to) with prefix class tokens before square grids."""
  for prefix in (0, 1):
    side_from, side_to = math.isqrt(tokens_from - prefix), math.isqrt(tokens_to - prefix)
    if side_from**2 == tokens_from - prefix and side_to**2 == tokens_to - prefix:
      return prefix, side_from, side_to
  return None


def resize_position_embedding(table: np.ndarray, tokens: int) -> np.ndarray:
  """[1, prefix + g^2, dim] -> [1, prefix + tokens_grid, dim]: the grid part resized
  bicubically to the new square grid; the class token's row (prefix) is kept."""
  split = _grid_split(table.shape[1], tokens)
  if split is None:
    raise ValueError(f"a position embedding of {table.shape[1]} positions cannot be resized "
                     f"to {tokens}: neither is a square grid (after one class token)")
  prefix, side_from, side_to = split
  grid = table[0, prefix:].reshape(side_from, side_from, -1)
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32), (side_to, side_to, grid.shape[-1]),
                          method="bicubic", antialias=False)
  grid = np.asarray(grid, table.dtype).reshape(1, side_to**2, -1)
  return np.concatenate([table[:, :prefix], grid], axis=1)


def resize_relative_bias_table(table: np.ndarray, rows: int) -> np.ndarray:
  """Swin's [(2W - 1)^2, heads] -> [rows, heads] for another window size, bicubic over the
  (2W - 1) x (2W - 1) grid of relative offsets."""
  side_from, side_to = math.isqrt(table.shape[0]), math.isqrt(rows)
  if side_from**2 != table.shape[0] or side_to**2 != rows:
    raise ValueError(f"a relative-position bias table of {table.shape[0]} rows cannot be "
                     f"resized to {rows}: both must be (2W - 1)^2")
  grid = table.reshape(side_from, side_from, -1)
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32), (side_to, side_to, grid.shape[-1]),
                          method="bicubic", antialias=False)
  return np.asarray(grid, table.dtype).reshape(rows, -1)


def fit(source: dict, target: dict, source_name: str) -> dict:
  """`source` variables fitted to the shapes of `target` (the new model's fresh variables;
  module docstring for the rules). Returns new variables of `target`'s structure."""
  flat_source = traverse_util.flatten_dict(dict(source))
  flat_target = traverse_util.flatten_dict(dict(target))
  extra = sorted(set(flat_source) - set(flat_target))
  if extra:
    raise ValueError(f"{source_name}: {'/'.join(extra[0])} has no place in this model "
                     f"({len(extra)} leaves of the checkpoint unused)")
  out = {}
  for path, fresh in flat_target.items():
    name = "/".join(path)
    if path not in flat_source:
      raise ValueError(f"{source_name} has no {name} (shape {tuple(fresh.shape)}) for this "
                       "model")
    value = np.asarray(flat_source[path])
    if value.shape == fresh.shape:
      out[path] = value
    elif path[:2] == ("params", "head"):  # Another class count: the new model's own head.
      out[path] = np.asarray(fresh)
    elif path[-2:-1] == ("position_embedding",) and value.ndim == 3:
      out[path] = resize_position_embedding(value, fresh.shape[1])
    elif path[-1] == "relative_position_bias_table":
      out[path] = resize_relative_bias_table(value, fresh.shape[0])
    else:
      raise ValueError(f"{source_name}: {name} has shape {value.shape}, this model "
                       f"{tuple(fresh.shape)}, and it is not a leaf that can be resized")
    out[path] = jnp.asarray(out[path], fresh.dtype)
  return traverse_util.unflatten_dict(out)


def _project_variables(config) -> tuple[dict, str]:
  """The latest raw parameters (and batch statistics) of a run of this project."""
  from efficient_vit import export

  path = os.path.abspath(config.init_from.path)
  saved = export.read_model_info(path)
  if saved["model"]["name"] != config.model.name:
    raise ValueError(f"config.init_from.path={config.init_from.path!r} holds a "
                     f"{saved['model']['name']!r} model; this run's config.model.name is "
                     f"{config.model.name!r}")
  try:
    variables, run = export.restore_variables(path, "raw")
  except FileNotFoundError as e:
    raise ValueError(f"config.init_from.path={config.init_from.path!r} has no checkpoint") from e
  return variables, f"{config.init_from.path} (step {run['step']})"


def _swin_window(state: dict) -> int | None:
  """The window size of a timm Swin state dict: its bias tables are [(2W - 1)^2, heads]."""
  for name, table in state.items():
    if name.endswith("attn.relative_position_bias_table"):
      return (math.isqrt(table.shape[0]) + 1) // 2
  return None


def _reference_variables(config, model, fresh: dict) -> tuple[dict, str]:
  """A reference checkpoint's variables at its own resolution (and, for Swin, its own window
  size, which `fit` then resizes to this model's); its classifier, or the new model's fresh
  one where the class counts differ."""
  from efficient_vit import import_weights

  layout, path = config.init_from.layout, config.init_from.path
  import_weights.check_reference_fields(layout, model, command_line=True)
  size = config.init_from.image_size if config.init_from.image_size > 0 else config.image_size
  state = import_weights.read_state_dict(path)
  source_model = model
  if layout == "timm_swin" and _swin_window(state) not in (None, model.window_size):
    window = _swin_window(state)  # Shifts hold no parameters: any valid one does.
    source_model = model.clone(window_size=window, shift_size=window // 2)
  shapes = jax.eval_shape(source_model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  try:
    return import_weights.convert(state, layout, shapes, source=path), path
  except ValueError as e:
    if "head" not in str(e):
      raise
  # Another class count: read and drop the reference's classifier, keep the fresh one.
  path = f"{path} (a new head: its classifier has another class count)"
  template = traverse_util.flatten_dict(dict(shapes))
  for key, leaf in traverse_util.flatten_dict(dict(fresh)).items():
    if key[:2] == ("params", "head"):
      template[key] = leaf
  template = traverse_util.unflatten_dict(template)
  return import_weights.convert(state, layout, template, new_head=True,
                                source=config.init_from.path), path


def _head_classes(variables: dict) -> int | None:
  """The class count of a model's classifier (params/head)."""
  bias = dict(variables.get("params", {})).get("head", {}).get("bias")
  return None if bias is None else int(bias.shape[-1])


def load(config, model, fresh: dict) -> tuple[dict, str]:
  """The variables to start from, fitted to `fresh` (the new model's own initial
  variables), and a description of where they came from.

  Fitting happens in the unscanned layout (one subtree per block), whatever `model.scan`
  of this run or of the source run; the result comes back in this model's layout.
  """
  from efficient_vit import scan_layout

  scanned, model = scan_layout.is_scanned(model), scan_layout.unscanned(model)
  fresh = scan_layout.to_layout(fresh, scan=False)
  if config.init_from.layout == "project":
    source, name = _project_variables(config)
    classes = {k: _head_classes(v) for k, v in (("source", source), ("fresh", fresh))}
    if classes["source"] != classes["fresh"]:
      name += (f" (a new head for {classes['fresh']} classes: the checkpoint's has "
               f"{classes['source']})")
  else:
    source, name = _reference_variables(config, model, fresh)
  source = scan_layout.to_layout(source, scan=False)
  return scan_layout.to_layout(fit(source, fresh, name), scan=scanned), name
