"""XLA CPU backend options for the project's steps: convolutions on Eigen, remat that saves memory.

1. Convolutions on Eigen, not YNNPACK. XLA's CPU backend (jaxlib 0.10) hands four kinds of
op to YNNPACK by default (its `xla_cpu_experimental_ynn_fusion_type`): fused dots, lone
dots, reductions and lone convolutions. The dots and reductions run on all of XLA's
intra-op threads; YNNPACK's lone convolution runs on one. On a 2-core Intel Xeon, the CCT
seed tokenizer's 3x3 convolution from 64 to 128 channels at 16 x 16, batch 128: forward
34.8 ms there, 16.4 ms in Eigen's convolution (what XLA uses when YNNPACK does not take the
op); its input and kernel gradients 38.7 and 78.1 ms there, 18.7 and 28.0 ms in Eigen
(benchmarks/PROFILE.md, "Convolutions on one thread"). The options keep YNNPACK's default
kinds less the lone convolution. A convolution that XLA fuses into a YNNPACK reduction
stays there (those ran on all threads).

2. Optimization barriers kept to the end. The CPU pipeline expands (drops) every
`optimization_barrier` in an early pass, `cse_barrier_expander`, and common-subexpression
elimination later merges `jax.checkpoint`'s recomputation back into the forward pass: the
backward pass then reads the forward's activations again and `model.remat` saves nothing
without `scan` (ViT-S/16's step at batch 32 kept 4.51 GB with `remat=block`). With that pass
disabled the barriers that `jax.checkpoint(prevent_cse=True)` puts around the
recomputation's inputs hold, and the same step needs 0.88 GB (benchmarks/PROFILE.md,
"Remat without scan"). Only steps with `remat` keep their barriers (`keep_barriers`):
`layers._contract_rows`' barriers, meant for the early passes alone, slowed MobileViT-XXS's
plain step when kept to the end (0.75x). Passes that `XLA_FLAGS` already disables stay
disabled (`--xla_disable_hlo_passes` merged).

`compiler_options` is what the project's jitted steps pass to `jax.jit` on CPU. Other
backends get no options (both are the CPU backend's; GPU and TPU keep their barriers), and
neither does `jax.pmap`, which takes none: under `parallelism=pmap` on CPU convolutions
stay YNNPACK's and `remat` without `scan` saves no memory.

A jaxlib that does not know the options' values would fail every compile; the options are
tried once on a one-op program and dropped, with a warning, where they do not compile.
"""

from __future__ import annotations

import functools
import os
import re

from absl import logging
import jax
import jax.numpy as jnp

# YNNPACK's default op kinds in jaxlib 0.10 without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_REDUCE",
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
# The CPU pipeline's early pass that drops optimization barriers: disabled, so that
# `jax.checkpoint`'s recomputation is not merged back into the forward pass.
BARRIER_PASS = "cse_barrier_expander"
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(YNN_FUSION_TYPES)}


def _disabled_passes(xla_flags: str) -> str:
  """`BARRIER_PASS` and the passes `--xla_disable_hlo_passes` in `xla_flags` names (a
  compiler option replaces the flag's value rather than adding to it)."""
  names = [n for value in re.findall(r"--xla_disable_hlo_passes=(\S*)", xla_flags)
           for n in value.split(",") if n]
  return ",".join(dict.fromkeys(names + [BARRIER_PASS]))


@functools.cache
def _cpu_options_compile() -> bool:
  try:
    options = {**CPU_OPTIONS, "xla_disable_hlo_passes": BARRIER_PASS}
    jax.jit(jnp.negative, compiler_options=options).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError, ValueError
    logging.warning("XLA's CPU kernel options are not applied (%s)", e)
    return False
  return True


def compiler_options(backend: str | None = None, *,
                     keep_barriers: bool = False) -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` of a step compiled for `backend` (default: JAX's
  default backend): `CPU_OPTIONS` on CPU where this jaxlib takes them, else None.
  `keep_barriers` (a step with `model.remat`): `BARRIER_PASS` disabled too."""
  if (backend or jax.default_backend()) != "cpu" or not _cpu_options_compile():
    return None
  if not keep_barriers:
    return dict(CPU_OPTIONS)
  return {**CPU_OPTIONS,
          "xla_disable_hlo_passes": _disabled_passes(os.environ.get("XLA_FLAGS", ""))}
