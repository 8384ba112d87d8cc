"""An earlier commit's train step against the working tree's, side by side in one run.

    uv run python -m benchmarks.ab --before=9ca6e45 --models=cct --rounds=6 --steps=4

checks out `--before` (any git revision) into a temporary worktree and, for each model (the
rows of `benchmarks/peers.py`: same configs, no augmentation, float32, one fixed batch),
starts two processes with this Python, one holding the step as that commit builds it, one
as the working tree builds it (`benchmarks/checkout_worker.py`). After compilation and
`--warmup_steps` untimed steps on each side, they run alternating timed blocks of
`--steps` steps, before, after, before, ... for `--rounds` rounds, each block after
`--block_warmup_steps` untimed steps of the same side. Printed per model: the median img/s
of each side, and the median and range of the per-round ratios after / before.

Each side in its own process, because a change may be made at import or trace time (a
lowering rule, a module-level constant). A caution from benchmarks/PROFILE.md: on a 2-core
VM a process may keep one of two speeds for its whole life, so one pair of processes can
show that rather than the change; repeat the command (fresh processes) before trusting a
few percent. The flags `--models`, `--rounds`, `--steps`, `--warmup_steps`,
`--batch_size` and `--block_warmup_steps` are `benchmarks/peers.py`'s.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks import peers
from efficient_vit import host_memory

FLAGS = flags.FLAGS
_BEFORE = flags.DEFINE_string("before", None, "Git revision whose train step is the "
                              "'before' side (the working tree is the 'after' side).")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT_WORKER = os.path.join(REPO, "benchmarks", "checkout_worker.py")


def resolve(revision: str | None) -> str:
  """The commit hash of `revision` in this repository, or a ValueError naming the flag."""
  if not revision:
    raise ValueError("--before is required: a git revision of this repository")
  out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                       cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode:
    raise ValueError(f"--before={revision}: not a commit of this repository")
  return out.stdout.strip()


@contextlib.contextmanager
def worktree(commit: str):
  """A detached worktree of `commit` in a temporary folder, removed afterwards."""
  with tempfile.TemporaryDirectory(prefix="ab_before_") as parent:
    path = os.path.join(parent, "checkout")
    subprocess.run(["git", "worktree", "add", "--detach", path, commit], cwd=REPO,
                   check=True, capture_output=True)
    try:
      yield path
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", path], cwd=REPO,
                     check=False, capture_output=True)


def ratios(img_s: dict[str, list[float]]) -> list[float]:
  """after / before of each round."""
  return [a / b for a, b in zip(img_s["after"], img_s["before"])]


def compare(model: str, checkouts: dict[str, str], plan, log) -> dict:
  sides = {}
  try:
    for name, path in checkouts.items():
      sides[name] = peers.PeerProcess(sys.executable, worker=CHECKOUT_WORKER, args=(path,))
      setup = sides[name].call(op="setup", spec={"model": model, "batch_size":
                                                 plan.batch_size, "warmup_steps":
                                                 plan.warmup_steps})
      log(f"{model}, {name}: compiled in {setup['compile_s']:.1f} s")
    batch = setup["batch_size"]
    seconds = peers.alternate(
        {name: (lambda n, side=side: side.call(op="run", steps=n)["seconds"])
         for name, side in sides.items()},
        plan.rounds, plan.steps, plan.block_warmup_steps)
  finally:
    for side in sides.values():
      side.close()
  img_s = {name: [plan.steps * batch / s for s in blocks] for name, blocks in seconds.items()}
  r = ratios(img_s)
  return {"model": model, "batch": batch, "img_per_s": img_s,
          "before": statistics.median(img_s["before"]),
          "after": statistics.median(img_s["after"]),
          "ratio": statistics.median(r), "low": min(r), "high": max(r)}


def format_table(rows: list[dict], before: str) -> str:
  lines = [f"| model | batch | {before[:10]} img/s | working tree img/s | after / before "
           "(range) |", "| --- | --- | --- | --- | --- |"]
  lines += [f"| {r['model']} | {r['batch']} | {r['before']:.3g} | {r['after']:.3g} | "
            f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f}) |" for r in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.restart_with_huge_pages(__name__)
  try:
    commit = resolve(_BEFORE.value)
    # The peers' Pythons are not needed; the plan checks everything else.
    plan = peers.make_plan(FLAGS.models, FLAGS.rounds, FLAGS.steps, FLAGS.warmup_steps,
                           FLAGS.batch_size, sys.executable, sys.executable,
                           FLAGS.block_warmup_steps)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  rows = []
  with worktree(commit) as path:
    for model in FLAGS.models:  # checked by make_plan
      rows.append(compare(model, {"before": path, "after": REPO}, plan, log))
      log(format_table(rows[-1:], commit))
  print(f"Train step, float32, {commit[:10]} against the working tree, each in its own "
        f"process; median of {plan.rounds} alternating rounds of {plan.steps} steps:\n")
  print(format_table(rows, commit))


if __name__ == "__main__":
  app.run(main)
