"""The dense matmuls of a train step, XLA's CPU kernels against PyTorch's, on this CPU.

The profiles of benchmarks/PROFILE.md put half or more of a ViT-S/16 or Swin-T train step
in dense matmuls on both sides. This script times those matmuls alone, at the shapes the
step runs them, to tell whether a gap between the two programs is the matmul library's:
for each Linear layer of the model (tokens M = batch x tokens per image, K inputs, N
outputs) the three products of its forward and backward pass,

    forward   Y  = X W        [M, K] x [K, N]
    dX        dX = dY W^T     [M, N] x [N, K]
    dW        dW = X^T dY     [K, M] x [M, N]    (a contraction over the tokens)

in float32, each operand laid out as the framework keeps it. JAX: one jitted
`lax.dot_general` per product, the transposes expressed as its contracting dimensions as
the gradient's HLO has them (XLA picks the kernel: YNNPACK / Eigen on CPU). PyTorch:
`torch.mm` on the views autograd passes for nn.Linear (weight [N, K]; MKL / oneDNN).
Each side runs in its own process, the two alternating for `--rounds` rounds; printed:
GFLOP/s of each side (median over the rounds) and their ratio.

    uv run python -m benchmarks.gemm --timm_python=.peers/timm/bin/python

(`.peers/timm` as in benchmarks/peers.py's docstring; torch is not a dependency of the
project). `--model=vit_s16` (default) or `swin_t` (its first stage's Linear layers, where
most of its tokens are), `--batch_size` (default 16, the peer comparison's).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("timm_python", None, "Python of an environment with torch.")
flags.DEFINE_enum("model", "vit_s16", ["vit_s16", "swin_t"], "Whose Linear layers.")
flags.DEFINE_integer("batch_size", 16, "Images per batch.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds (JAX, torch) per product.")
flags.DEFINE_integer("reps", 10, "Products timed per round and side.")
flags.DEFINE_integer("threads", None, "torch intra-op threads (default: the CPUs this "
                     "process may use, what XLA's CPU client uses).")
FLAGS = flags.FLAGS

# (name, tokens per image, K, N) of each Linear layer of a block.
LINEARS = {
    "vit_s16": [("qkv", 197, 384, 1152), ("proj", 197, 384, 384), ("fc1", 197, 384, 1536),
                ("fc2", 197, 1536, 384)],
    "swin_t": [("qkv", 3136, 96, 288), ("proj", 3136, 96, 96), ("fc1", 3136, 96, 384),
               ("fc2", 3136, 384, 96)],
}
PRODUCTS = ("forward", "dX", "dW")


def products(model: str, batch: int) -> list[tuple[str, int, int, int]]:
  """(name, M, K, N) of every product: "layer kind" (kind in PRODUCTS) of a Linear layer
  from K to N features over M tokens; each is 2 M K N FLOPs."""
  return [(f"{name} {kind}", batch * tokens, k, n) for name, tokens, k, n in LINEARS[model]
          for kind in PRODUCTS]


# Both workers lay the operands out as their framework's Linear layer and autograd do.
JAX_WORKER = """
import json, sys, time
import jax, jax.numpy as jnp
from jax import lax
spec = json.loads(sys.argv[1])
out = {}
for name, m, k, n in spec["products"]:
  kind = name.split()[1]
  # flax Dense: kernel W [K, N]. forward X [M, K] . W; dX = dY [M, N] . W^T (contract
  # N with N); dW = X^T . dY (contract M with M) -> [K, N].
  a, b, dims = {"forward": ((m, k), (k, n), ((1,), (0,))),
                "dX": ((m, n), (k, n), ((1,), (1,))),
                "dW": ((m, k), (m, n), ((0,), (0,)))}[kind]
  x = jax.random.normal(jax.random.key(0), a, jnp.float32)
  y = jax.random.normal(jax.random.key(1), b, jnp.float32)
  f = jax.jit(lambda x, y, dims=dims: lax.dot_general(x, y, (dims, ((), ()))))
  f(x, y).block_until_ready()
  start = time.perf_counter()
  for _ in range(spec["reps"]):
    r = f(x, y)
  r.block_until_ready()
  out[name] = (time.perf_counter() - start) / spec["reps"]
print(json.dumps(out))
"""

TORCH_WORKER = """
import json, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
out = {}
with torch.no_grad():
  for name, m, k, n in spec["products"]:
    kind = name.split()[1]
    # nn.Linear: weight [N, K]. forward x . weight^T; autograd: dX = dY . weight,
    # dW = dY^T . x -> [N, K].
    weight = torch.randn(n, k)
    if kind == "forward":
      x = torch.randn(m, k)
      f = lambda: torch.mm(x, weight.t())
    elif kind == "dX":
      dy = torch.randn(m, n)
      f = lambda: torch.mm(dy, weight)
    else:
      x, dy = torch.randn(m, k), torch.randn(m, n)
      f = lambda: torch.mm(dy.t(), x)
    f()
    start = time.perf_counter()
    for _ in range(spec["reps"]):
      f()
    out[name] = (time.perf_counter() - start) / spec["reps"]
print(json.dumps(out))
"""


def _run(python: str, code: str, spec: dict) -> dict:
  result = subprocess.run([python, "-c", code, json.dumps(spec)], capture_output=True,
                          text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{python} failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if not FLAGS.timm_python or not os.path.exists(FLAGS.timm_python):
    raise app.UsageError(f"--timm_python={FLAGS.timm_python!r}: the Python of an environment "
                         "with torch is needed (see the docstring)")
  threads = FLAGS.threads or len(os.sched_getaffinity(0))
  spec = {"products": products(FLAGS.model, FLAGS.batch_size), "reps": FLAGS.reps,
          "threads": threads}
  times = {"jax": [], "torch": []}
  for r in range(FLAGS.rounds):
    times["jax"].append(_run(sys.executable, JAX_WORKER, spec))
    times["torch"].append(_run(FLAGS.timm_python, TORCH_WORKER, spec))
    print(f"round {r + 1}/{FLAGS.rounds} done", file=sys.stderr)
  print(f"{FLAGS.model} Linear layers, batch {FLAGS.batch_size}, float32, {threads} threads, "
        f"median of {FLAGS.rounds} rounds x {FLAGS.reps} products")
  print("| product | m x k x n | JAX (XLA) GFLOP/s | torch GFLOP/s | JAX / torch |")
  print("| --- | --- | --- | --- | --- |")
  total = {"jax": 0.0, "torch": 0.0}
  for name, m, k, n in spec["products"]:
    flops = 2 * m * k * n
    t = {side: statistics.median(rnd[name] for rnd in times[side]) for side in times}
    for side in t:
      total[side] += t[side]
    print(f"| {name} | {m} x {k} x {n} | {flops / t['jax'] / 1e9:.1f} | "
          f"{flops / t['torch'] / 1e9:.1f} | {t['torch'] / t['jax']:.2f} |")
  print(f"all products: JAX {total['jax'] * 1e3:.1f} ms, torch {total['torch'] * 1e3:.1f} ms, "
        f"JAX / torch speed {total['torch'] / total['jax']:.2f}")


if __name__ == "__main__":
  app.run(main)
