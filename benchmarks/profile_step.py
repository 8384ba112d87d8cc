"""Where the project's train step spends its time: per-op times from a `jax.profiler` trace.

The step of one row of `benchmarks/peers.py` (the same config: no augmentation, float32)
is compiled, warmed up and traced for `--steps` steps; every XLA thunk event of the trace
(one per HLO fusion or library call: `ynn_fusion` is a YNNPACK matmul / reduction,
`*_fusion` XLA's own loops) is matched to its HLO instruction in the compiled program, and
from there to the `op_name` metadata (module path; `bwd` when it comes from the
backward pass). Printed: the share of the op time by kind and by source, block numbers
folded together. Times are summed over XLA's worker threads, so they add up to more than
the wall time. Eigen's convolutions (`efficient_vit/xla_options.py` sends lone convolutions
there on CPU) run asynchronously: the trace holds only their dispatch, so their time is
missing from these sums. From the repository root:

    uv run python -m benchmarks.profile_step --model=vit_s16 --batch_size=8 --steps=3
    uv run python -m benchmarks.profile_step --model=swin_t --batch_size=8 --steps=2 \\
        --trace_dir=runs/profile_swin_t   # also keeps the trace (TensorBoard's profile tab)
    uv run python -m benchmarks.profile_step --model=vit_s16 --batch_size=16 --scan

Findings and figures: benchmarks/PROFILE.md.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile

from absl import app, flags

from benchmarks import peers
from efficient_vit import host_memory

FLAGS = flags.FLAGS  # --steps, --warmup_steps, --batch_size: efficient_vit.benchmark's.
_MODEL = flags.DEFINE_enum("model", "vit_s16", list(peers.COMPARISONS), "Row of "
                           "benchmarks/peers.py whose project step is profiled.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a "
                                 "temporary folder, removed afterwards).")
_TOP = flags.DEFINE_integer("top", 30, "Sources listed.")
_SCAN = flags.DEFINE_bool("scan", False, "Profile the step with model.scan=True (the blocks "
                          "as one loop).")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (opcode, op_name metadata) of a compiled HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    # The shape is an array type or a tuple of them: "f32[8,197]{1,0}", "(s32[], f32[4])".
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(", line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
  return out


def source_of(op_name: str) -> str:
  """`fwd|bwd module/path/primitive` with block and stage numbers folded."""
  if not op_name:
    return "? (no metadata)"
  direction = "bwd" if "transpose(jvp(" in op_name else "fwd"
  path = op_name.split("/", 1)[-1]
  path = re.sub(r"^(transpose\()?(jvp\()?\w+\)*/", "", path)
  path = re.sub(r"stage\d+", "stage*", re.sub(r"block(_?)\d+", r"block\1*", path))
  return f"{direction} {path}"


def op_times(trace_dir: str, hlo_text: str) -> tuple[collections.Counter, collections.Counter]:
  """Nanoseconds per kind (instruction name without its number) and per (kind, source)."""
  import jax

  names = hlo_instructions(hlo_text)
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[0])
  by_kind, by_source = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # XLA's intra-op worker threads.
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          continue
        kind = re.sub(r"\.\d+$", "", event.name)
        _, op_name = names.get(event.name, ("", ""))
        by_kind[kind] += event.duration_ns
        by_source[(kind, source_of(op_name))] += event.duration_ns
  return by_kind, by_source


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.restart_with_huge_pages(__name__)
  host_memory.retain_if_flagged()
  import jax

  comparison = peers.COMPARISONS[_MODEL.value]
  config = comparison.config(FLAGS.batch_size)
  config.model.scan = _SCAN.value
  side = peers.ProjectSide(config, comparison.num_classes, FLAGS.warmup_steps)
  batch = side.timer.experiment.config.batch_size
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(trace_dir)
  seconds = side.run(FLAGS.steps)
  jax.profiler.stop_trace()
  try:
    by_kind, by_source = op_times(trace_dir, side.timer.train.as_text())
  finally:
    if not _TRACE_DIR.value:
      shutil.rmtree(trace_dir, ignore_errors=True)
  total, steps = sum(by_kind.values()), FLAGS.steps
  print(f"{comparison.label}, batch {batch}: compile {side.compile_s:.1f} s, "
        f"{steps * batch / seconds:.3g} img/s while traced; op time "
        f"{total / 1e9 / steps:.3f} s/step summed over XLA's threads")
  print("\nby kind:")
  for kind, ns in by_kind.most_common(15):
    print(f"  {100 * ns / total:5.1f}%  {ns / 1e6 / steps:9.1f} ms/step  {kind}")
  print("\nby source:")
  for (kind, source), ns in by_source.most_common(_TOP.value):
    print(f"  {100 * ns / total:5.1f}%  {ns / 1e6 / steps:9.1f} ms/step  {kind:26s} {source}")


if __name__ == "__main__":
  app.run(main)
