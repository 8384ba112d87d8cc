"""Which library runs which op on XLA's CPU backend: convolutions on Eigen, not YNNPACK.

XLA's CPU backend (jaxlib 0.10) hands four kinds of op to YNNPACK by default (its
`xla_cpu_experimental_ynn_fusion_type`): fused dots, lone dots, reductions and lone
convolutions. The dots and reductions run on all of XLA's intra-op threads; YNNPACK's lone
convolution runs on one. On a 2-core Intel Xeon, the CCT seed tokenizer's 3x3 convolution
from 64 to 128 channels at 16 x 16, batch 128: forward 34.8 ms there, 16.4 ms in Eigen's
convolution (what XLA uses when YNNPACK does not take the op); its input and kernel
gradients 38.7 and 78.1 ms there, 18.7 and 28.0 ms in Eigen (benchmarks/PROFILE.md,
"Convolutions on one thread"). `compiler_options` is what the project's jitted steps pass to
`jax.jit` on CPU: YNNPACK's default kinds less the lone convolution. A convolution that XLA
fuses into a YNNPACK reduction stays there (those ran on all threads). Other backends get no
options (the field is the CPU backend's), and neither does `jax.pmap`, which takes none.

A jaxlib that does not know the option's values would fail every compile; the options are
tried once on a one-op program and dropped, with a warning, where they do not compile.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp

# YNNPACK's default op kinds in jaxlib 0.10 without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_REDUCE",
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(YNN_FUSION_TYPES)}


@functools.cache
def _cpu_options_compile() -> bool:
  try:
    jax.jit(jnp.negative, compiler_options=CPU_OPTIONS).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError, ValueError
    logging.warning("XLA's CPU kernel options are not applied (%s)", e)
    return False
  return True


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` of a step compiled for `backend` (default: JAX's
  default backend): `CPU_OPTIONS` on CPU where this jaxlib takes them, else None."""
  if (backend or jax.default_backend()) != "cpu" or not _cpu_options_compile():
    return None
  return dict(CPU_OPTIONS)
