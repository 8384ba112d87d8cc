"""The two parameter layouts of a model with repeated blocks (`model.scan`), and the one
conversion between them.

Unscanned (`model.scan=False`, the layout every importer writes) keeps one subtree per
block; scanned (`model.scan=True`) stacks the blocks' identical subtrees along a new
leading [depth] axis, as `nn.scan` holds them:

  unscanned                                 scanned
  .../block_0, .../block_1, ...             .../blocks              (layers.Encoder: ViT,
                                                                     CCT, EANet, Perceiver)
  .../transformer_0, .../transformer_1 ...  .../transformers        (MobileViT)
  stage{s}_block0, stage{s}_block1, ...     stage{s}_blocks         (Swin, per stage)

Everything else is left as it is. The conversion works on any nested dict of arrays
(variables, `params` alone, EMA parameters, shapes from `jax.eval_shape`).

    variables = to_layout(variables, scan=config.model.scan)
    model, variables = plain(model, variables)   # unscanned, no remat, xla attention
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# One unscanned block: its prefix and number; the stacked subtree is named prefix + "s"
# without the underscore (block_3 -> blocks, stage2_block3 -> stage2_blocks).
_BLOCK = re.compile(r"(block_|transformer_|stage\d+_block)(\d+)")
_STACK = re.compile(r"(blocks|transformers|stage\d+_blocks)")


def _stacked_name(prefix: str) -> str:
  return prefix.rstrip("_") + "s"


def _block_name(stacked: str, i: int) -> str:
  prefix = stacked[:-1]
  return f"{prefix}{i}" if prefix.startswith("stage") else f"{prefix}_{i}"


def _stack(trees: list[Any]) -> Any:
  def stack(*leaves):
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)
    if isinstance(leaves[0], np.ndarray):
      return np.stack(leaves)
    return jnp.stack(leaves)
  return jax.tree_util.tree_map(stack, *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
  def take(i):
    def leaf(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
      return x[i]
    return jax.tree_util.tree_map(leaf, tree)
  return [take(i) for i in range(n)]


def _depth(tree: Any, name: str) -> int:
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"{name}: the stacked blocks' leaves disagree on the depth: {sorted(sizes)}")
  return sizes.pop()


def _stack_level(tree: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(tree)
  groups: dict[str, list[tuple[int, str]]] = {}
  for k in tree:
    if m := _BLOCK.fullmatch(k):
      groups.setdefault(_stacked_name(m.group(1)), []).append((int(m.group(2)), k))
  for stacked, blocks in groups.items():
    blocks.sort()
    if [i for i, _ in blocks] != list(range(len(blocks))):
      raise ValueError(f"blocks {[k for _, k in blocks]} are not numbered 0..{len(blocks) - 1}")
    if stacked in tree:
      raise ValueError(f"both {blocks[0][1]} and {stacked} are present: a mixed layout")
    out[stacked] = _stack([tree[k] for _, k in blocks])
    for _, k in blocks:
      del out[k]
  return out


def _unstack_level(tree: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(tree)
  for k in tree:
    if _STACK.fullmatch(k) and isinstance(tree[k], Mapping):
      del out[k]
      for i, block in enumerate(_unstack(tree[k], _depth(tree[k], k))):
        out[_block_name(k, i)] = block
  return out


def to_layout(tree: Any, *, scan: bool) -> Any:
  """`tree` (nested dicts of arrays) in the scanned (`scan=True`) or unscanned layout.

  A tree already in the asked layout comes back unchanged (the same values), so the call
  is safe wherever the layout is not known.
  """
  if not isinstance(tree, Mapping):
    return tree
  level = _stack_level(tree) if scan else _unstack_level(tree)
  return {k: to_layout(v, scan=scan) for k, v in level.items()}


def stacked_axes(names: Any) -> int:
  """How many leading axes of the leaf at path `names` (strings) number stacked blocks: 1
  under a scanned stack, else 0. Per-leaf rules (weight decay on matrices, LAMB's trust
  ratio) look through that axis, so that scan on and off train alike."""
  return int(any(isinstance(n, str) and _STACK.fullmatch(n) is not None for n in names))


def is_scanned(model: Any) -> bool:
  return bool(getattr(model, "scan", False))


def unscanned(model: Any) -> Any:
  """`model` with `scan=False` (the layout importers write); `model` itself otherwise."""
  return model.clone(scan=False) if is_scanned(model) else model


def plain(model: Any, variables: Any) -> tuple[Any, Any]:
  """The same computation as an unscanned model without remat and with `xla` attention, and
  its variables: what export and attention-map extraction trace (one subtree, and one sown
  attention map, per block; no cuDNN kernel tied to a GPU)."""
  updates = {f: v for f, v in (("scan", False), ("remat", "none"), ("attention_impl", "xla"))
             if hasattr(model, f)}
  return model.clone(**updates), to_layout(variables, scan=False)
