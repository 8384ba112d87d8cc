"""Cost of a model and of its compiled steps: parameter counts, FLOPs (XLA cost analysis)
and memory."""

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


# What a compiled step costs in memory, and what the machine has.


def program_flops(compiled) -> float | None:
  """FLOPs of one compiled program by XLA's cost analysis, or None where it has none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def step_memory_bytes(compiled) -> int | None:
  """What one device's compiled program reserves: arguments + outputs + temporaries, less
  the buffers that donated arguments hand on to outputs."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it.
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def peak_memory_bytes() -> tuple[int | None, str | None]:
  """The largest `peak_bytes_in_use` of the local devices (None on CPU) and why not."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise or return None.
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), None
  return None, f"{jax.devices()[0].platform} devices keep no memory statistics"


def device_memory_limit() -> int | None:
  """The allocator's limit of the first local device in bytes (None on CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    stats = None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def host_memory_available() -> int | None:
  """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
