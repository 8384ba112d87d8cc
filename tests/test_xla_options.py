"""The trainer's XLA CPU compiler options: convolutions leave YNNPACK, dots and reductions
stay, remat's barriers hold, values equal."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from efficient_vit import xla_options, train


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _loss(x, w, v):
  """A convolution, a dot and a row reduction, as a tokenizer and an attention block have."""
  y = jax.nn.relu(_conv(x, w))
  z = y.reshape(-1, y.shape[-1]) @ v
  return jnp.mean(jnp.tanh(z)) + jnp.mean(jnp.max(y, axis=-1))


def _args():
  """CCT's second tokenizer convolution (64 -> 128 channels at 16 x 16), batch 4: a shape
  that YNNPACK takes by default (it leaves small ones to Eigen)."""
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (4, 16, 16, 64)),
          jax.random.normal(keys[1], (3, 3, 64, 128)) / 24.0,
          jax.random.normal(keys[2], (128, 24)) / 11.3)


def _ynn_fusions(text: str) -> list[list[str]]:
  """For each `ynn_fusion` of a compiled program's text (what YNNPACK runs), the opcodes of
  the computation it calls, parameters and constants left out."""
  called = re.findall(r"%ynn_fusion[\w.]* = .* calls=%([\w.\-]+)", text)
  bodies, name = {}, None
  for line in text.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(1)
      bodies[name] = []
    elif name and "=" in line:
      op = re.search(r"= \S+ ([\w\-]+)\(", line).group(1)
      if op not in ("parameter", "constant"):
        bodies[name].append(op)
  return [bodies[c] for c in called]


def _ynn(fn, options, *args) -> list[list[str]]:
  return _ynn_fusions(jax.jit(fn, compiler_options=options).lower(*args).compile().as_text())


@pytest.fixture(autouse=True)
def _on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("XLA's CPU backend options")


def test_options_apply_on_cpu_only(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  expected = {**xla_options.CPU_OPTIONS, "xla_disable_hlo_passes": "cse_barrier_expander"}
  assert xla_options.compiler_options() == expected
  assert xla_options.compiler_options("cpu") == expected
  assert xla_options.compiler_options("gpu") is None
  assert xla_options.compiler_options("tpu") is None


def test_passes_disabled_by_xla_flags_stay_disabled(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=algsimp,cse --xla_dump_to=/x")
  assert (xla_options.compiler_options()["xla_disable_hlo_passes"]
          == "algsimp,cse,cse_barrier_expander")


def test_optimization_barriers_reach_the_compiled_program_and_change_no_value():
  """`jax.checkpoint`'s barriers survive XLA's CPU pipeline (so that its recomputation is
  not merged back into the forward pass; the memory itself: tests/test_scan_remat.py)."""
  def loss(w, x):
    block = jax.checkpoint(lambda w, x: jnp.tanh(x @ w) @ w.T)
    return jnp.sum(block(w, block(w, x)) ** 2)

  w = jax.random.normal(jax.random.key(0), (32, 64)) / 6.0
  x = jax.random.normal(jax.random.key(1), (16, 32))
  grad = jax.grad(loss)
  kept = jax.jit(grad, compiler_options=xla_options.compiler_options()).lower(w, x).compile()
  assert "opt-barrier" in kept.as_text()
  assert "opt-barrier" not in jax.jit(grad).lower(w, x).compile().as_text()  # XLA's default
  np.testing.assert_allclose(kept(w, x), jax.jit(grad)(w, x), rtol=1e-5, atol=1e-6)


def test_convolutions_leave_ynnpack_and_dots_stay():
  x, w, v = _args()
  # By default the convolution is a YNNPACK fusion; with the options it is not.
  # A lone convolution is YNNPACK's by default (one thread); with the options, Eigen's. (A
  # convolution fused into a YNNPACK reduction stays there, on all threads.)
  assert _ynn(_conv, None, x, w) == [["convolution"]], "YNNPACK no longer takes convolutions"
  assert _ynn(_conv, xla_options.CPU_OPTIONS, x, w) == []
  dot = lambda a, b: a @ b
  reduce = lambda a: jnp.sum(a * a, axis=-1)
  a = jnp.ones((64, 128))
  for fn, args in ((dot, (a, v)), (reduce, (a,))):
    assert _ynn(fn, xla_options.CPU_OPTIONS, *args) == _ynn(fn, None, *args) != []


def test_values_and_gradients_equal_the_defaults():
  args = _args()
  grad = jax.value_and_grad(_loss, argnums=(0, 1, 2))
  default = jax.jit(grad)(*args)
  eigen = jax.jit(grad, compiler_options=xla_options.CPU_OPTIONS)(*args)
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(eigen)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["shard_map", "fsdp"])
def test_the_runners_compile_their_steps_with_the_options(kind):
  x, w, _ = _args()

  def step(state, batch, rng, axis_name="data"):  # A gradient step through a convolution.
    del rng, axis_name
    loss = lambda w: jnp.mean(jnp.tanh(_conv(batch["image"], w)))
    return {"w": state["w"] - jax.grad(loss)(state["w"])}, {}

  state = {"w": w}
  parallel = train.data_parallel(kind, step, lambda v, b, axis_name="data": {},
                                 lambda: jax.eval_shape(lambda: state))
  text = parallel.train_step.lower(parallel.put_state(state),
                                   parallel.put_batch({"image": np.asarray(x)}),
                                   jax.random.key(0)).compile().as_text()
  assert "convolution(" in text and ["convolution"] not in _ynn_fusions(text)
