"""Every family's train and eval steps lower for GPU (cuda) and TPU from this CPU host,
through `jax.export`, with no CPU-only construct in them; the cuDNN attention path lowers
to the fused kernel for every sequence length; an attention shape no kernel takes fails in
`build()`; padded-and-masked attention equals unpadded attention.

Lowering only (StableHLO, nothing compiled). While a step is assembled,
`jax.default_backend()` reports the target (`_as_backend`), as it would on that machine,
so that `attention_impl` resolves as it would there; for a GPU, JAX's probe of the cuDNN
library's version (which a CPU host has no library to answer) reports cuDNN 9.10, and its
compute-capability probe finds no GPU (so pre-Hopper head-width limits apply).
"""

import contextlib
import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_vit import input_pipeline, layers, train

# Every family's paper preset (EANet's only one is the Keras example's).
PAPER_PRESETS = {
    "vit": "s16_imagenet", "swin": "swin_t", "cct": "cct_14_7x2", "perceiver": "imagenet",
    "mobilevit": "xxs", "eanet": "keras"}
BATCH = 2  # A multiple of the test's two fake devices.
# Custom calls that only XLA's CPU backend runs (LAPACK, DUCC FFT, the CPU callbacks).
CPU_ONLY = re.compile(r"lapack|ducc|cpu|xla_python_cpu_callback|host")


CUDNN_VERSION = 91000
# cuDNN's fused attention carries no serialization guarantee; these programs are only read.
FUSED_KERNELS = [jax.export.DisabledSafetyCheck.custom_call(f"__cudnn${name}{direction}")
                 for name in ("fmhaSoftmax", "fmhaScaleBiasSoftmax")
                 for direction in ("", "Backward")]


@contextlib.contextmanager
def _as_backend(name: str):
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(jax, "default_backend", return_value=name))
    if name == "gpu":
      stack.enter_context(mock.patch(
          "jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version",
          return_value=CUDNN_VERSION))
    yield


def _config(family: str, **model):
  module = __import__(f"configs.{family}", fromlist=["get_config"])
  config = module.get_config(PAPER_PRESETS[family])
  config.update(batch_size=BATCH, dtype="bfloat16")
  config.optimizer.grad_accum_steps = 1
  config.model.update(**model)
  return config


def _build(config, backend: str):
  info = input_pipeline.DatasetInfo(num_classes=1000, num_train_examples=1000,
                                    num_eval_examples=100)
  with _as_backend(backend):
    return train.build(config, info)


def _exported(experiment, platforms, which: str) -> str:
  """The StableHLO text of the train or eval step for the global batch."""
  size = experiment.config.image_size
  batch = {"image": jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  with _as_backend("gpu" if "cuda" in platforms else "tpu"):
    state = experiment.abstract_state()
    if which == "train":
      fn, args = experiment.train_fn, (state, batch, experiment.rng)
    else:
      batch["mask"] = jax.ShapeDtypeStruct((BATCH,), jnp.float32)
      fn, args = experiment.eval_fn, (experiment.eval_variables(state), batch)
    exported = jax.export.export(jax.jit(functools.partial(fn, axis_name=None)),
                                 platforms=platforms, disabled_checks=FUSED_KERNELS)(*args)
  return exported.mlir_module()


def _custom_calls(text: str) -> set[str]:
  return set(re.findall(r"custom_call @([\w$.\-]+)", text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', text))


@pytest.mark.parametrize("family", list(PAPER_PRESETS))
def test_train_and_eval_steps_lower_for_cuda_and_tpu(family):
  experiment = _build(_config(family), "gpu")
  for which in ("train", "eval"):
    text = _exported(experiment, ("cuda", "tpu"), which)
    assert "optimization_barrier" not in text, (family, which)  # No remat here: none at all.
    cpu_calls = {c for c in _custom_calls(text) if CPU_ONLY.search(c.lower())}
    assert not cpu_calls, (family, which, cpu_calls)
    assert "cudnn" not in text  # attention_impl=xla: the einsum program.


@pytest.mark.parametrize("family, model, tokens", [
    ("vit", {}, 197),                                     # class token + 14 x 14: odd
    ("swin", {}, 49),                                     # 7 x 7 windows, with a bias
    ("cct", {"attention_dropout_rate": 0.0}, 196),        # dropout forces the explicit path
])
def test_cudnn_train_steps_lower_to_the_fused_kernel(family, model, tokens):
  experiment = _build(_config(family, attention_impl="cudnn", **model), "gpu")
  assert {c["implementation"] for c in experiment.attention} == {"cudnn"}
  assert {c["queries"] for c in experiment.attention} == {tokens}
  calls = _custom_calls(_exported(experiment, ("cuda",), "train"))
  forward = {c for c in calls if c.startswith("__cudnn$fmha") and "Backward" not in c}
  backward = {c for c in calls if c.startswith("__cudnn$fmha") and "Backward" in c}
  assert forward and backward, calls


def test_auto_picks_cudnn_per_call_where_the_call_can_use_it():
  """The Perceiver's cross-attention (one head of width 261) cannot use the fused kernel,
  its latent self-attention (8 heads of 128) can."""
  experiment = _build(_config("perceiver", attention_impl="auto"), "gpu")
  used = {(c["head_dim"], c["implementation"]) for c in experiment.attention}
  assert used == {(261, "xla"), (128, "cudnn")}, used
  assert "xla for" in train.attention_summary(experiment.attention)
  # On a CPU host auto is exactly xla.
  calls = _build(_config("vit", attention_impl="auto"), "cpu").attention
  assert calls and {c["implementation"] for c in calls} == {"xla"}


def test_a_shape_no_kernel_takes_fails_in_build_naming_the_field():
  with pytest.raises(ValueError, match=r"model.attention_impl='cudnn'.*261"):
    _build(_config("perceiver", attention_impl="cudnn"), "gpu")


@pytest.mark.parametrize("n, m, multiple", [(7, 7, 2), (5, 9, 8), (49, 49, 2), (4, 6, 4)])
def test_padded_and_masked_attention_equals_unpadded(n, m, multiple):
  """`layers.fused_attention`'s padding (to `multiple` tokens, the padded keys masked by
  their length, the padded queries dropped) through the xla path: logits and gradients
  equal to the unpadded attention's, with a bias and a mask."""
  b, h, d = 2, 3, 8
  q = jax.random.normal(jax.random.key(0), (b, n, h, d))
  k, v = (jax.random.normal(jax.random.key(i), (b, m, h, d)) for i in (1, 2))
  bias = jax.random.normal(jax.random.key(3), (1, h, n, m))
  mask = jax.random.bernoulli(jax.random.key(4), 0.8, (b, 1, n, m)).at[..., 0].set(True)
  padded = functools.partial(layers.fused_attention, implementation="xla", multiple=multiple)
  plain = functools.partial(jax.nn.dot_product_attention, implementation="xla")

  def loss(fn, q, k, v, bias):
    return jnp.sum(jnp.sin(fn(q, k, v, bias=bias, mask=mask)))

  got = jax.value_and_grad(functools.partial(loss, padded), argnums=(0, 1, 2, 3))(q, k, v, bias)
  want = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3))(q, k, v, bias)
  assert padded(q, k, v, bias=bias, mask=mask).shape == (b, n, h, d)
  for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("n", [197, 49, 196])
def test_cudnn_equals_xla_on_a_gpu(n):
  """On a GPU: the fused kernel's outputs and gradients equal the einsum program's in
  bfloat16 within 2e-2 (bfloat16 keeps 8 bits of mantissa; the two sum in other orders)."""
  b, h, d = 4, 6, 64
  q, k, v = (jax.random.normal(jax.random.key(i), (b, n, h, d), jnp.bfloat16)
             for i in range(3))
  bias = jax.random.normal(jax.random.key(3), (1, h, n, n), jnp.bfloat16)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, bias=bias).astype(jnp.float32) ** 2)

  fused = jax.value_and_grad(functools.partial(loss, layers.fused_attention),
                             argnums=(0, 1, 2))(q, k, v)
  plain = jax.value_and_grad(functools.partial(loss, layers.dot_product_attention),
                             argnums=(0, 1, 2))(q, k, v)
  for a, c in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32),
                               rtol=2e-2, atol=2e-2)
