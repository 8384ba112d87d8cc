"""The models are plain JAX: autodiff writes every gradient, so forward mode, Hessian-vector
products and remat policies work through every family, and no backend-specific construct
lives in the model code or the launcher.

Finite differences are central, in float32, along one random direction of all parameters
(unit RMS per parameter) with step 1e-3:
the tolerances below cover their truncation and rounding error, and fail for a gradient
that is off by more than about 1%.
"""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_vit import layers
from efficient_vit.models import build_model

from tests.test_scan_remat import FAMILIES, NUM_CLASSES, _images, _random_variables

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _loss_fn(family):
  """(loss(params), params) of the family's tiny model in train mode (dropout and drop-path
  with a fixed key; MobileViT's batch norm on the batch's statistics)."""
  fields, size = FAMILIES[family]
  images = _images(size)
  model = build_model(fields, NUM_CLASSES)
  variables = _random_variables(model, images)
  params = jax.tree.map(lambda p: p * 0.5, variables.pop("params"))
  weights = jax.random.normal(jax.random.key(2), (images.shape[0], NUM_CLASSES))

  def loss(params):
    logits = model.apply({**variables, "params": params}, images, train=True,
                         rngs={"dropout": jax.random.key(3)},
                         mutable=["batch_stats"] if variables else False)
    logits = logits[0] if variables else logits
    return jnp.mean(jnp.tanh(logits) * weights)

  return loss, params


def _direction(params, seed=4, still=()):
  """A random direction in parameter space (unit RMS per parameter); zero for the
  parameters under the top-level modules named in `still`."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      jnp.zeros(x.shape) if path[0].key in still else jax.random.normal(k, x.shape)
      for k, (path, x) in zip(keys, leaves)])


# CCT's convolutional tokenizer has kinks (ReLU, max-pool) that a finite difference crosses
# at some of its thousands of units: its kernels stay still in the directions of the
# finite differences (its gradients are still checked, forward mode against reverse).
STILL = {"cct": ("conv_tokenizer",)}


def _shifted(params, v, eps):
  return jax.tree.map(lambda p, d: p + eps * d, params, v)


def _vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_mode_reverse_mode_and_hessian_vector_products_equal_finite_differences(
    family):
  """`jax.jvp` of the loss and `jax.grad` projected on a direction v, against the central
  difference of the loss along v; the Hessian-vector product forward-over-reverse
  (`jax.jvp` of `jax.grad`), projected on a second direction u, against the central
  difference of the gradient along v."""
  loss, params = _loss_fn(family)
  still = STILL.get(family, ())
  v, u = _direction(params, still=still), _direction(params, seed=5, still=still)
  jvp = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,)))
  grad = jax.jit(jax.grad(loss))
  hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])
  eps = 1e-3
  _, forward = jvp(params, v)
  numeric = (jvp(_shifted(params, v, eps), v)[0] - jvp(_shifted(params, v, -eps), v)[0]) / (
      2 * eps)
  assert abs(float(numeric)) > 1e-4  # A direction the loss does change along.
  np.testing.assert_allclose(float(forward), float(numeric), rtol=1e-2, atol=1e-5)
  np.testing.assert_allclose(float(_vdot(grad(params), v)), float(forward), rtol=1e-4,
                             atol=1e-6)
  hvp_u = _vdot(hvp(params, v), u)
  numeric = _vdot(jax.tree.map(lambda a, b: (a - b) / (2 * eps), grad(_shifted(params, v, eps)),
                               grad(_shifted(params, v, -eps))), u)
  assert abs(float(hvp_u)) > 1e-4
  np.testing.assert_allclose(float(hvp_u), float(numeric), rtol=2e-2, atol=2e-5)
  # Every parameter, the tokenizer's too: forward mode against reverse mode.
  v = _direction(params)
  np.testing.assert_allclose(float(_vdot(grad(params), v)), float(jvp(params, v)[1]),
                             rtol=1e-4, atol=1e-6)


def _saved_dots(policy: str) -> list[tuple[int, ...]]:
  """Shapes of the matmul outputs that `jax.checkpoint` with `policy` keeps for the
  backward pass of one ViT encoder block (batch 2, 16 tokens of width 32, 4 heads, MLP 64)."""
  block = layers.EncoderBlock(mlp_dim=64, attention=lambda **kw: layers.MultiHeadAttention(
      num_heads=4, **kw))
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  params = block.init(jax.random.key(1), x)
  f = jax.checkpoint(lambda p, x: jnp.sum(block.apply(p, x)),
                     policy=getattr(jax.checkpoint_policies, policy))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(f, params, x)
  return [tuple(int(d) for d in re.search(r"\[([\d,]*)\]", line).group(1).split(","))
          for line in printed.getvalue().splitlines() if "output of dot_general" in line]


def test_matmul_saving_remat_policies_keep_the_projections_and_the_mlp():
  # Every matmul output the backward pass reads: q, k, v [2, 16, 4, 8]; the attention's
  # output projection [2, 16, 32] (the MLP's LayerNorm reads it); the MLP's hidden Dense
  # [2, 16, 64] (its GELU reads it). The MLP's last Dense feeds only the residual sum.
  projections = [(2, 16, 4, 8)] * 3 + [(2, 16, 32), (2, 16, 64)]
  no_batch = _saved_dots("dots_with_no_batch_dims_saveable")
  assert sorted(no_batch) == sorted(projections), no_batch
  # dots_saveable also keeps the attention's two batched products, batched over [2, 4]
  # (batch, heads): the logits [16, 16] and the weighted values (XLA's [8, 16] layout).
  assert sorted(_saved_dots("dots_saveable")) == sorted(
      projections + [(2, 4, 16, 16), (2, 4, 8, 16)])


FORBIDDEN = ("custom_vjp", "custom_jvp", "optimization_barrier", "platform_dependent", "jax._src")


def test_no_backend_specific_constructs_in_the_models_or_the_launcher():
  files = [ROOT / "efficient_vit" / "layers.py", ROOT / "launch.py",
           *sorted((ROOT / "efficient_vit" / "models").glob("*.py"))]
  found = [f"{path.relative_to(ROOT)}: {word}" for path in files
           for word in FORBIDDEN if word in path.read_text()]
  assert not found, found
  assert len(files) > 4


_NO_REEXEC = """
import os, runpy, sys
import tensorflow_datasets as tfds

def refuse(*args, **kwargs):
  raise AssertionError("launch.py re-executed the process")

os.execv = os.execve = os.execvp = os.execvpe = refuse
sys.argv = ["launch.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=16):
  runpy.run_path("launch.py", run_name="__main__")
"""


def test_launch_trains_without_re_executing_itself(tmp_path):
  """launch.py as the program's entry point (`__main__`, where a re-exec would happen),
  with every exec of `os` refused: it trains to the end and saves its checkpoint."""
  args = [sys.executable, "-c", _NO_REEXEC, "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={tmp_path}", "--config.model.embed_dim=16", "--config.model.depth=1",
          "--config.model.num_heads=2", "--config.model.mlp_dim=32",
          "--config.model.patch_size=8", "--config.batch_size=8",
          "--config.num_train_steps=2", "--config.optimizer.warmup_steps=0",
          "--config.eval_every_steps=1000"]
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "re-executed" not in run.stderr
  assert (tmp_path / "checkpoints").is_dir() and any((tmp_path / "checkpoints").iterdir())
