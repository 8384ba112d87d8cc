"""Attention maps out of any model of the registry, per family, drawn over the images.

Every attention module sows its weights into the `intermediates` collection (see
`layers.sow_attention`); `extract_attention` runs a forward pass with that collection
mutable and returns the weights by module path, e.g. `encoder/block_0/attention`.

Which module paths hold which family's attention is written down once, in `FAMILY_MAPS`,
and read only through `select_maps`: a renamed module then fails loudly there (and in
tests/test_attention_maps.py) instead of drawing nothing. Each family has a function that
turns its weights into heat maps over the image, [batch, rows, cols] on the family's own
token grid (or [batch, k, rows, cols] for several maps per image):

  vit_token_attention        ViT: the class token's attention to the patches, or, for
                             models without one, the attention each patch receives.
  attention_rollout          ViT / CCT: Abnar & Zuidema 2020 ("Quantifying Attention Flow
                             in Transformers", arXiv 2005.00928): head-averaged attention
                             plus the identity for the residual, renormalised, multiplied
                             through the blocks.
  perceiver_cross_attention  Perceiver: each latent's attention over the input pixels.
  eanet_memory_attention     EANet: each memory unit's weight on every token.
  swin_window_attention      Swin: attention received inside each (shifted) window, put back
                             where the tokens are in the image; `window_lines` for the grid.
  cct_pooling_weights        CCT: the sequence-pooling weight of every token.
  mobilevit_patch_attention  MobileViT: attention received by each position of the feature
                             map, from its own pixel position's sequence of patches
                             (`mobilevit_stage_maps`: the last block of every stage).

Drawing: `denormalise` (model input -> displayable RGB), `overlay` (a heat map stretched
over an image, so that token (i, j) covers its pixels), `draw_window_grid`, `plot_maps` (a
grid of images x maps) and `save_figure` (refuses figures with unlabelled axes).

    uv run python -c "from efficient_vit import attention_maps; help(attention_maps)"
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np

from efficient_vit import scan_layout

# ---------------------------------------------------------------------------------------
# Extraction and selection.


def extract_attention(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, Any]:
  """{module path: weights} for every attention (and pooling) module of `model`.

  Weights are as each family documents them, usually [batch, heads, queries, keys];
  a module called several times (shared weights) gives one entry per call, `path#i`;
  weights sown under another name than `attention_weights` get `path:name`. A model with
  `model.scan` is run unscanned (`scan_layout.plain`), so the paths are the same either way.
  """
  model, variables = scan_layout.plain(model, variables)
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]), sep="/")
  maps = {}
  for path, values in flat.items():
    module_path = path.rsplit("/", 1)[0]
    name = path.rsplit("/", 1)[1]
    suffix = "" if name == "attention_weights" else f":{name}"
    for i, value in enumerate(values):
      key = module_path + suffix + (f"#{i}" if len(values) > 1 else "")
      maps[key] = np.asarray(value)
  return maps


# (family, what) -> regular expression over `extract_attention`'s keys. The only place
# that knows the models' module paths.
FAMILY_MAPS: dict[tuple[str, str], str] = {
    # [batch, heads, tokens, tokens] per encoder block.
    ("vit", "self_attention"): r"encoder/block_\d+/attention",
    # [batch, heads, tokens, tokens] per encoder block.
    ("cct", "self_attention"): r"encoder/block_\d+/attention",
    # [batch, tokens] of the sequence pooling.
    ("cct", "pooling"): r"sequence_pooling:pooling_weights",
    # [batch, heads, latents, inputs] per cross-attend call (#i: iterations sharing weights).
    ("perceiver", "cross_attention"): r"cross_attend_\d+/attention(#\d+)?",
    # [batch, heads, tokens, memory units] per encoder block.
    ("eanet", "memory_attention"): r"encoder/block_\d+/attention",
    # [batch * windows, heads, M^2, M^2] per block; even blocks plain, odd blocks shifted.
    ("swin", "window_attention"): r"stage\d+_block\d+/attention/window_attention",
    # [batch * p^2, heads, patches, patches] per transformer block of a MobileViT stage.
    ("mobilevit", "patch_attention"): r"stage_\d+_mobilevit/transformer_\d+/attention",
}


def _natural_key(key: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def select_maps(maps: dict[str, Any], family: str, what: str) -> list[tuple[str, Any]]:
  """The (key, weights) pairs of `maps` that hold `family`'s `what` (see `FAMILY_MAPS`),
  in the order the model computes them (block 0 first, iteration #0 first).

  Raises LookupError naming the pattern and the keys that exist when nothing matches.
  """
  if (family, what) not in FAMILY_MAPS:
    raise ValueError(f"family={family!r}, what={what!r}; allowed: "
                     f"{', '.join(f'{f}/{w}' for f, w in FAMILY_MAPS)}")
  pattern = re.compile(FAMILY_MAPS[(family, what)])
  found = sorted((k for k in maps if pattern.fullmatch(k)), key=_natural_key)
  if not found:
    raise LookupError(f"no {family} {what} maps match {pattern.pattern!r}; the model sowed: "
                      f"{', '.join(sorted(maps)) or 'nothing'} (was a module renamed? update "
                      "efficient_vit.attention_maps.FAMILY_MAPS)")
  return [(k, maps[k]) for k in found]


def _square_side(n: int, what: str) -> int:
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"{what}={n} is not a square grid of tokens; give the grid shape")
  return side


def _to_grid(values: np.ndarray, grid: Sequence[int] | None) -> np.ndarray:
  """[..., tokens] -> [..., rows, cols] (row-major tokens; square unless `grid` says)."""
  values = np.asarray(values)
  if grid is None:
    side = _square_side(values.shape[-1], "tokens")
    grid = (side, side)
  if grid[0] * grid[1] != values.shape[-1]:
    raise ValueError(f"grid={tuple(grid)} holds {grid[0] * grid[1]} tokens, the weights "
                     f"{values.shape[-1]}")
  return values.reshape(values.shape[:-1] + tuple(grid))


# ---------------------------------------------------------------------------------------
# Per family: weights -> heat maps on the token grid.


def vit_token_attention(weights: np.ndarray, *, class_token: bool,
                        grid: Sequence[int] | None = None) -> np.ndarray:
  """One block's self-attention [batch, heads, T, T] -> [batch, rows, cols].

  With a class token (first token): its attention to the patches, mean over heads. Without
  one (GAP pooling): the attention each patch receives, mean over heads and queries.
  """
  attention = np.asarray(weights, np.float32).mean(axis=1)  # [b, T, T]
  heat = attention[:, 0, 1:] if class_token else attention.mean(axis=1)
  return _to_grid(heat, grid)


def attention_rollout(weights: Sequence[np.ndarray], *, class_token: bool,
                      grid: Sequence[int] | None = None) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020) over blocks [batch, heads, T, T], first block
  first -> [batch, rows, cols].

  Per block: A = mean over heads; A = (A + I) / 2 (the residual connection); rows
  renormalised. The rollout is A_L ... A_2 A_1: how much each output token draws from each
  input token through all the blocks. The map is the class token's row (without its own
  column) or, without a class token, the mean over all rows.
  """
  if not weights:
    raise ValueError("attention_rollout needs the weights of at least one block")
  joint = None
  for w in weights:
    a = np.asarray(w, np.float32).mean(axis=1)  # [b, T, T]
    a = 0.5 * a + 0.5 * np.eye(a.shape[-1], dtype=np.float32)
    a = a / a.sum(axis=-1, keepdims=True)
    joint = a if joint is None else a @ joint
  heat = joint[:, 0, 1:] if class_token else joint.mean(axis=1)
  return _to_grid(heat, grid)


def perceiver_cross_attention(weights: np.ndarray,
                              grid: Sequence[int] | None = None) -> np.ndarray:
  """A cross-attend's weights [batch, heads, latents, inputs] -> [batch, latents, rows, cols]:
  every latent's attention over the input elements (pixels or patches), mean over heads."""
  return _to_grid(np.asarray(weights, np.float32).mean(axis=1), grid)


def eanet_memory_attention(weights: np.ndarray,
                           grid: Sequence[int] | None = None) -> np.ndarray:
  """External attention [batch, heads, tokens, S] -> [batch, S, rows, cols]: the weight of
  every token on each memory unit (after the double normalisation), mean over heads (the
  Keras example's heads share one memory)."""
  w = np.asarray(weights, np.float32).mean(axis=1)  # [b, tokens, S]
  return _to_grid(np.swapaxes(w, 1, 2), grid)


def most_selective_units(unit_maps: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k maps of [batch, units, rows, cols] whose spatial spread (std over the
  grid, averaged over the batch) is largest: the units that pick out parts of the image."""
  spread = np.asarray(unit_maps).reshape(unit_maps.shape[:2] + (-1,)).std(-1).mean(0)
  return np.argsort(-spread)[:k]


def swin_window_attention(weights: np.ndarray, *, batch: int, grid: Sequence[int],
                          shift: int = 0) -> np.ndarray:
  """One Swin block's window attention [batch * windows, heads, M^2, M^2] -> [batch, H, W].

  Each token's value is the attention it receives from the queries of its own window (mean
  over heads and queries; each window's values sum to 1, or to 1 per region of a shifted
  window). Windows are numbered row-major over the grid rolled by (-shift, -shift), as in
  the model; the map is rolled back, so that every value sits on its token's pixels.
  """
  w = np.asarray(weights, np.float32)
  height, width = grid
  window = _square_side(w.shape[-1], "window tokens")
  if height % window or width % window:
    raise ValueError(f"window {window} does not divide the token grid {height}x{width}")
  num_windows = (height // window) * (width // window)
  if w.shape[0] != batch * num_windows:
    raise ValueError(f"weights for {w.shape[0]} windows, but batch={batch} x "
                     f"{num_windows} windows of {window}x{window} on {height}x{width}")
  received = w.mean(axis=(1, 2))  # [b * nW, M^2]
  x = received.reshape(batch, height // window, width // window, window, window)
  x = x.transpose(0, 1, 3, 2, 4).reshape(batch, height, width)  # window_merge, one channel
  return np.roll(x, (shift, shift), axis=(1, 2)) if shift else x


def window_lines(grid_size: int, window: int, shift: int = 0) -> list[int]:
  """Token coordinates (0..grid_size) of the window borders along one axis: multiples of
  the window, moved by the shift for shifted windows (the roll of -shift puts token
  `shift` at the corner of the first window)."""
  return sorted({(k * window + shift) % grid_size for k in range(grid_size // window)} |
                ({0, grid_size} if shift == 0 else set()))


def cct_pooling_weights(weights: np.ndarray, grid: Sequence[int] | None = None) -> np.ndarray:
  """Sequence-pooling weights [batch, tokens] -> [batch, rows, cols]."""
  return _to_grid(np.asarray(weights, np.float32), grid)


def mobilevit_patch_attention(weights: np.ndarray, *, batch: int, patch_size: int,
                              grid: Sequence[int] | None = None) -> np.ndarray:
  """A MobileViT transformer block's attention [batch * p^2, heads, N, N] -> [batch, h, w].

  The block runs one attention over the N patches for each of the p^2 pixel positions
  inside a patch (`models.mobilevit.unfold`). Each feature-map position gets the attention
  its token receives in its own sequence (mean over heads and queries), folded back to the
  [h, w] feature map with `models.mobilevit.fold`.
  """
  from efficient_vit.models.mobilevit import fold  # The model's own layout, not a copy.

  w = np.asarray(weights, np.float32)
  area = patch_size * patch_size
  if w.shape[0] != batch * area:
    raise ValueError(f"weights for {w.shape[0]} sequences, not batch={batch} x "
                     f"patch_size^2={area}")
  n = w.shape[-1]
  if grid is None:
    side = _square_side(n * area, "feature-map positions")
    grid = (side, side)
  received = w.mean(axis=(1, 2)).reshape(batch, area, n, 1)
  return np.asarray(fold(received, grid[0], grid[1], patch_size))[..., 0]


def mobilevit_stage_maps(maps: dict[str, Any], *, batch: int,
                         patch_size: int) -> list[tuple[str, np.ndarray]]:
  """(stage name, [batch, h, w] map of its last transformer block) for every MobileViT stage
  of `maps` (`extract_attention`'s output), first stage first."""
  last = {}
  for key, weights in select_maps(maps, "mobilevit", "patch_attention"):
    last[key.split("/")[0]] = weights  # Sorted by block: the last one stays.
  return [(stage, mobilevit_patch_attention(w, batch=batch, patch_size=patch_size))
          for stage, w in last.items()]


# ---------------------------------------------------------------------------------------
# Checkpoints.


def restore_variables(workdir: str, step: int | None = None,
                      use_ema: bool = False) -> dict[str, Any]:
  """The model variables ({'params', and 'batch_stats' for batch-norm models}) of the
  checkpoint of `train.train_and_evaluate` in `workdir` (the latest unless `step`);
  `use_ema` takes `ema_params` (`config.optimizer.ema_decay` > 0), an error where the
  checkpoint has none. Read by `export.restore_variables` (parameters only, no optimizer).
  """
  from efficient_vit import export

  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"workdir={workdir!r} has no checkpoints/ folder; train into it "
                            "first (train.train_and_evaluate(config, workdir))")
  variables, _ = export.restore_variables(workdir, "ema" if use_ema else "raw", step)
  return variables


# ---------------------------------------------------------------------------------------
# Drawing.


def denormalise(images: np.ndarray, dataset: str) -> np.ndarray:
  """Model inputs (normalised as `input_pipeline` does for `dataset`) -> RGB in [0, 1]."""
  from efficient_vit import input_pipeline

  mean, std = input_pipeline.normalisation(dataset)
  return np.clip(np.asarray(images) * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def overlay(ax, image: np.ndarray, heat: np.ndarray | None = None, *, title: str,
            alpha: float = 0.55, cmap: str = "inferno", interpolation: str = "nearest"):
  """Draws `image` [H, W, 3] with `heat` [rows, cols] stretched over the same pixels
  (extent (0, W, H, 0): token (i, j) covers rows i H/rows .. (i+1) H/rows), with a title and
  pixel axes. Returns the heat map's AxesImage (for a colour bar), or None."""
  height, width = image.shape[:2]
  extent = (0, width, height, 0)
  ax.imshow(image, extent=extent, interpolation="nearest")
  shown = None
  if heat is not None:
    heat = np.asarray(heat, np.float32)
    shown = ax.imshow(heat, extent=extent, alpha=alpha, cmap=cmap, interpolation=interpolation)
  ax.set_xlim(0, width)
  ax.set_ylim(height, 0)
  ax.set_title(title, fontsize=8)
  ax.set_xlabel("x (pixels)", fontsize=7)
  ax.set_ylabel("y (pixels)", fontsize=7)
  ax.tick_params(labelsize=6)
  return shown


def draw_window_grid(ax, image_size: int, grid_size: int, window: int, shift: int = 0,
                     **line_style) -> None:
  """Window borders of a `grid_size` x `grid_size` token grid drawn over an image of side
  `image_size`, shifted by `shift` tokens for shifted windows (see `window_lines`)."""
  style = dict(color="cyan", linewidth=0.8, alpha=0.9)
  style.update(line_style)
  scale = image_size / grid_size
  for line in window_lines(grid_size, window, shift):
    ax.axhline(line * scale, **style)
    ax.axvline(line * scale, **style)


def plot_maps(images: np.ndarray, columns: Sequence[tuple[str, np.ndarray | None]], *,
              title: str, row_labels: Sequence[str] | None = None, cell_size: float = 1.9):
  """A figure of len(images) rows: for each image, one panel per (column title, heat maps
  [batch, rows, cols] or None for the plain image); `row_labels` go in front of the first
  column's titles. Each panel scales its colours to its own range. Returns (figure, axes
  [rows, cols])."""
  import matplotlib.pyplot as plt

  num_rows, num_cols = len(images), len(columns)
  fig, axes = plt.subplots(num_rows, num_cols, figsize=(cell_size * num_cols,
                                                        cell_size * num_rows + 0.6),
                           squeeze=False)
  for r, image in enumerate(images):
    for c, (column_title, heat) in enumerate(columns):
      label = column_title if row_labels is None or c else f"{row_labels[r]}: {column_title}"
      overlay(axes[r, c], image, None if heat is None else heat[r], title=label)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig, axes


def _unlabelled(fig) -> list[str]:
  missing = []
  for i, ax in enumerate(fig.axes):
    if not ax.get_visible() or not (ax.images or ax.lines or ax.collections or ax.patches):
      continue
    if ax.get_label() == "<colorbar>":
      continue
    name = f"axes {i} ({ax.get_title() or 'untitled'!r})"
    for part, text in (("title", ax.get_title()), ("x label", ax.get_xlabel()),
                       ("y label", ax.get_ylabel())):
      if not text:
        missing.append(f"{name} has no {part}")
  return missing


def save_figure(fig, path: str, dpi: int = 110) -> str:
  """Saves `fig` as a PNG at `path` (folders created) after checking that every axes that
  shows something has a title and both axis labels; returns the path."""
  missing = _unlabelled(fig)
  if missing:
    raise ValueError(f"figure for {path} is not fully labelled: {'; '.join(missing)}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path
