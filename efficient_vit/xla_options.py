"""The trainer's XLA CPU compiler options: convolutions on Eigen, remat that saves memory.

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

2. Remat's optimization barriers kept to the end. The CPU pipeline expands (drops) every
`optimization_barrier` in an early pass, `cse_barrier_expander`; `jax.checkpoint`
(`model.remat`) puts them around its recomputation, and without them common-subexpression
elimination merges the recomputation back into the forward pass, so that `model.remat`
saves nothing without `scan` (ViT-S/16's step at batch 32 kept 4.51 GB with `remat=block`;
with the pass disabled, 0.88 GB: benchmarks/PROFILE.md, "Remat without scan"). GPU and TPU
keep the barriers by default. The models themselves hold no barrier.
So every step compiled with these options keeps remat's barriers. Passes that `XLA_FLAGS`
already disables stay disabled (`--xla_disable_hlo_passes` merged).

These are the trainer's compiler options, the one place where backend-specific settings
live (the models and `launch.py` hold none). `compiler_options` is what the project's jitted steps pass to `jax.jit` on CPU. Other
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
# `jax.checkpoint`'s hold.
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


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` of a step compiled for `backend` (default: JAX's
  default backend): on CPU, where this jaxlib takes them, `CPU_OPTIONS` with `BARRIER_PASS`
  (and the passes `XLA_FLAGS` disables) disabled; elsewhere None."""
  if (backend or jax.default_backend()) != "cpu" or not _cpu_options_compile():
    return None
  return {**CPU_OPTIONS,
          "xla_disable_hlo_passes": _disabled_passes(os.environ.get("XLA_FLAGS", ""))}
