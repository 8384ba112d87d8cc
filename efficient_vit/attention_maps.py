"""Attention maps out of any model of the registry.

Every attention module sows its weights into the `intermediates` collection (see
`layers.sow_attention`); this module runs a forward pass with that collection mutable
and returns the weights by module path, e.g. `encoder/block_0/attention`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax


def extract_attention(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, Any]:
  """{module path: weights} for every attention (and pooling) module of `model`.

  Weights are as each family documents them, usually [batch, heads, queries, keys];
  a module called several times (shared weights) gives one entry per call, `path#i`.
  """
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]), sep="/")
  maps = {}
  for path, values in flat.items():
    module_path = path.rsplit("/", 1)[0]
    name = path.rsplit("/", 1)[1]
    suffix = "" if name == "attention_weights" else f":{name}"
    for i, value in enumerate(values):
      key = module_path + suffix + (f"#{i}" if len(values) > 1 else "")
      maps[key] = value
  return maps
