"""Static cost of a model: parameter counts and compiled FLOPs (XLA cost analysis)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
  """All variable collections' shapes (params, batch_stats, ...) for inputs of
  `image_shape` ([batch, H, W, C]), without allocating or computing anything."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape, jnp.float32))


def abstract_params(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
  """The parameter tree's shapes for inputs of `image_shape` ([batch, H, W, C])."""
  return abstract_variables(model, image_shape)["params"]


def compiled_flops(fn, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` as XLA's cost analysis counts them after compilation."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax returns one dict per program.
    analysis = analysis[0]
  return float(analysis["flops"])


def forward_flops(model: nn.Module, image_shape: tuple[int, ...]) -> float:
  """Compiled FLOPs of one eval-mode forward pass on a batch of `image_shape`."""
  variables = abstract_variables(model, image_shape)
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return compiled_flops(lambda v, x: model.apply(v, x, train=False), variables, images)
