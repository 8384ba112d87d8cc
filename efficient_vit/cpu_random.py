"""Random bits on CPU in one pass: JAX's unrolled threefry lowering, registered for CPU.

Every `jax.random` draw with the default key (dropout masks, stochastic depth, the in-step
augmentations) hashes its counters with threefry2x32. On GPU and TPU JAX lowers that hash
as one unrolled expression, which XLA fuses into a single kernel; on CPU it lowers it as
a five-iteration `while` loop (shorter programs), each iteration a separate pass over the
whole array of counters. For the CCT seed step's four dropout masks of [128, 64, 256] the
loop took 58 ms where the unrolled form took 7.8 ms, the same bits
(benchmarks/PROFILE.md). `unroll_threefry_on_cpu` registers, for the CPU platform, a rule
that takes JAX's own unrolled lowering for arrays of at least `UNROLL_MIN_SIZE` counters
and its loop for smaller ones (key splits, per-example stochastic-depth draws), where the
loop costs little and the unrolled expression, repeated at every call site, would only
lengthen the program: with it everywhere Swin-T's unscanned train step took 15.4 s to
compile instead of 11.6. The hash, and so every random number, is unchanged.
"""

from __future__ import annotations

import math

from absl import logging

# Counters (output elements) from which the hash is unrolled on CPU.
UNROLL_MIN_SIZE = 1 << 16

def unroll_threefry_on_cpu() -> bool:
  """Lowers threefry2x32 over large arrays on CPU as on GPU/TPU (unrolled, one fused
  kernel); True once it is. Idempotent (a second call registers the same rule again).
  Programs compiled before the call keep the loop. Where this JAX has no such rules (its
  internals moved), nothing changes and False is returned."""
  try:
    from jax._src.random import threefry2x32 as threefry  # pylint: disable=g-import-not-at-top
    from jax.extend import random as jex_random  # pylint: disable=g-import-not-at-top
    from jax.interpreters import mlir  # pylint: disable=g-import-not-at-top

    unrolled = threefry._threefry2x32_lowering_rule  # pylint: disable=protected-access
    loop = threefry._threefry2x32_cpu_lowering_rule  # pylint: disable=protected-access

    def rule(ctx, *args, **params):
      size = math.prod(ctx.avals_out[0].shape)
      return (unrolled if size >= UNROLL_MIN_SIZE else loop)(ctx, *args, **params)

    mlir.register_lowering(jex_random.threefry2x32_p, rule, platform="cpu")
  except (ImportError, AttributeError) as e:
    logging.warning("threefry stays a loop on CPU (%s)", e)
    return False
  return True
