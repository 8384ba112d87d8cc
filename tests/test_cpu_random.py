"""JAX's unrolled threefry lowering on CPU: the same random bits, no loop."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

from efficient_vit import cpu_random

# Random123's known-answer vectors for threefry2x32 with 20 rounds: (key, counter, output).
_KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
]

_DRAWS = """
import json, sys
import jax, numpy as np
if sys.argv[1] == "unrolled":
  from efficient_vit import cpu_random
  assert cpu_random.unroll_threefry_on_cpu()
key = jax.random.key(7)
draws = jax.jit(lambda k: (jax.random.bits(k, (3, 37)),
                           jax.random.bernoulli(jax.random.fold_in(k, 1), 0.9, (256, 300))))(key)
print(json.dumps([np.asarray(d).astype(np.int64).tolist() for d in draws]))
"""


def _draws(mode: str):
  out = subprocess.run([sys.executable, "-c", _DRAWS, mode], check=True, capture_output=True,
                       text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_unrolled_threefry_gives_the_known_answers_without_a_loop():
  assert cpu_random.unroll_threefry_on_cpu()
  assert cpu_random.unroll_threefry_on_cpu()  # idempotent
  hash_ = jax.jit(lambda k, c: jex_random.threefry_2x32(k, c))
  small, large = 4, cpu_random.UNROLL_MIN_SIZE  # counters of each lowering
  for size in (small, large):
    for key, counter, expected in _KNOWN_ANSWERS:
      # The counter array holds [x0..., x1...]: `size` copies of the known pair.
      counters = np.repeat(np.asarray(counter, np.uint32), size)
      got = np.asarray(hash_(jnp.asarray(key, jnp.uint32), counters)).reshape(2, size)
      np.testing.assert_array_equal(got, np.repeat(np.asarray(expected, np.uint32)[:, None],
                                                   size, axis=1))
  def hlo(shape):
    return jax.jit(lambda k: jax.random.bits(k, shape)).lower(
        jax.random.key(0)).compile().as_text()
  assert " while(" not in hlo((cpu_random.UNROLL_MIN_SIZE,))
  assert " while(" in hlo((8, 8))  # small draws keep the loop (shorter programs)


def test_unrolled_threefry_draws_the_same_bits_as_the_loop():
  # Separate processes: a lowering, once registered, holds for the whole process.
  assert _draws("unrolled") == _draws("rolled")
