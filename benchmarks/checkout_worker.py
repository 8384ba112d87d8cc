"""The project's train step as a checkout of it has it, run on command for `benchmarks/ab.py`.

    python benchmarks/checkout_worker.py CHECKOUT

imports `efficient_vit`, `configs` and `benchmarks.peers` from the repository checkout at
CHECKOUT (an earlier commit's worktree, or this one) and speaks `peer_worker.py`'s protocol
on stdin / stdout (`benchmarks/worker_protocol.py`), one JSON object per line:
  {"op": "setup", "spec": {"model": ..., "batch_size": ..., "warmup_steps": ...}}
      builds the step of that row of the checkout's `benchmarks.peers.COMPARISONS`
      (`ProjectSide`: compiled, warmed up) -> {"ok": true, "setup_s": ..., "compile_s": ...,
      "batch_size": ...}
  {"op": "run", "steps": N} -> {"ok": true, "seconds": ...}
  {"op": "quit"}
A failure answers {"ok": false, "error": "..."}; what the libraries print goes to stderr.
"""

from __future__ import annotations

import os
import sys

import worker_protocol  # benchmarks/, this script's folder


def _setup(spec: dict):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from benchmarks import peers  # pylint: disable=g-import-not-at-top  (the checkout's)

  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["checkout_worker"])
  if spec["model"] not in peers.COMPARISONS:
    raise ValueError(f"model={spec['model']!r} is not a row of this checkout's "
                     f"benchmarks/peers.py; allowed: {', '.join(peers.COMPARISONS)}")
  comparison = peers.COMPARISONS[spec["model"]]
  config = comparison.config(spec.get("batch_size"))
  side = peers.ProjectSide(config, comparison.num_classes, int(spec.get("warmup_steps", 1)))
  return side.run, {"compile_s": side.compile_s, "batch_size": config.batch_size}


def main() -> None:
  checkout = os.path.abspath(sys.argv[1])
  sys.path.insert(0, checkout)
  os.chdir(checkout)
  worker_protocol.serve(_setup)


if __name__ == "__main__":
  main()
