"""Compile time of the train step with and without `model.scan`, each in a fresh process.

For each row of `benchmarks/peers.py` (its config: no augmentation, float32), the train
step is traced, lowered and compiled (`jax.jit(...).trace / .lower / .compile`) in a new
Python process, unscanned and with `--config.model.scan=True` alternately, `--processes`
times each; a process of its own per measurement, so that no cache of an earlier compile
helps. Printed: the medians of each phase, the step memory, the compiled program's fusion
count and its distinct fused computations (fusions whose computation, shapes included, is
the same up to names: about the kernels XLA's CPU backend generates code for, since it
compiles each distinct fused kernel once), and the unscanned / scanned ratio of the total.
From the repository root:

    uv run python -m benchmarks.compile_time --models=vit_s16,swin_t --processes=3

Findings: benchmarks/PROFILE.md, "Compile time with `scan`".
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import peers

# --models: benchmarks/peers.py's (not given: DEFAULT_MODELS); --batch_size:
# efficient_vit.benchmark's.
FLAGS = flags.FLAGS
DEFAULT_MODELS = ["vit_s16", "swin_t"]  # the rows the scan acceptance names
_PROCESSES = flags.DEFINE_integer("processes", 3, "Processes (measurements) per model and "
                                  "setting.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: measure this row once and print "
                              "one JSON line (with --worker_scan).")
_WORKER_SCAN = flags.DEFINE_bool("worker_scan", False, "Internal: the worker's model.scan.")


def check(models: list[str], processes: int, batch_size: int | None) -> None:
  """Refuses a bad command line before any process starts."""
  if not models or any(m not in peers.COMPARISONS for m in models) or (
      len(set(models)) != len(models)):
    raise ValueError(f"--models={','.join(models)}; allowed: each of "
                     f"{', '.join(peers.COMPARISONS)} at most once")
  if processes < 1:
    raise ValueError(f"--processes={processes}; allowed: 1 or more")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}; allowed: a positive batch")


def _canonical(body: str) -> str:
  """A fused computation's instructions without names or metadata."""
  lines = []
  for line in body.splitlines()[1:]:
    line = re.sub(r", metadata=\{.*\}$", "", line.strip())
    lines.append(re.sub(r"%[\w.\-]+", "%", line))
  return "\n".join(lines)


def kernel_counts(hlo_text: str) -> dict[str, int]:
  """Fusions, distinct fused computations and while loops of a compiled HLO module's text."""
  computations = {}
  for block in re.split(r"\n(?=\S)", hlo_text):
    m = re.match(r"(?:ENTRY )?%([\w.\-]+) ", block)
    if m:
      computations[m.group(1)] = block
  fusions, distinct = 0, set()
  for line in hlo_text.splitlines():
    m = re.search(r"= (.*?) fusion\(.*kind=(\w+), calls=%([\w.\-]+)", line)
    if m:
      fusions += 1
      distinct.add((m.group(1), m.group(2), _canonical(computations.get(m.group(3), ""))))
  whiles = len(re.findall(r"^\s*(?:ROOT )?%\S+ = .* while\(", hlo_text, re.M))
  return {"fusions": fusions, "distinct_fusions": len(distinct), "whiles": whiles}


def measure(model: str, scan: bool, batch_size: int | None) -> dict:
  """Trace, lower and compile times of one row's train step, in this process."""
  import jax

  from efficient_vit import benchmark, cost, train

  comparison = peers.COMPARISONS[model]
  config = benchmark.measurable_config(comparison.config(batch_size))
  config.model.scan = scan
  experiment = train.build(config, benchmark.nominal_info(config, comparison.num_classes))
  parallel = experiment.parallel
  state = parallel.put_state(experiment.init_state())
  batch = parallel.put_batch(benchmark.fixed_batch(config.batch_size, config.image_size,
                                                   comparison.num_classes))
  start = time.perf_counter()
  traced = parallel.train_step.trace(state, batch, experiment.rng)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  return {"model": model, "scan": scan, "batch_size": config.batch_size,
          "devices": jax.device_count(),
          "trace_s": traced_at - start, "lower_s": lowered_at - traced_at,
          "compile_s": compiled_at - lowered_at, "total_s": compiled_at - start,
          "step_memory_bytes": cost.step_memory_bytes(compiled),
          **kernel_counts(compiled.as_text())}


def _run_worker(model: str, scan: bool, batch_size: int | None) -> dict:
  command = [sys.executable, "-m", "benchmarks.compile_time", f"--worker={model}",
             f"--worker_scan={scan}"]
  if batch_size:
    command.append(f"--batch_size={batch_size}")
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"the worker for {model} (scan={scan}) failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(records: list[dict]) -> str:
  lines = ["| model | batch | scan | trace s | lower s | compile s | total s | unscanned / "
           "scanned | step memory GB | fusions | distinct fused computations | whiles |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  models = list(dict.fromkeys(r["model"] for r in records))
  for model in models:
    medians = {}
    for scan in (False, True):
      runs = [r for r in records if r["model"] == model and r["scan"] == scan]
      if runs:
        medians[scan] = {k: statistics.median(r[k] for r in runs) for k in
                         ("trace_s", "lower_s", "compile_s", "total_s")}
        medians[scan]["last"] = runs[-1]
    for scan, m in medians.items():
      last = m["last"]
      ratio = (f"{medians[False]['total_s'] / m['total_s']:.2f}x"
               if scan and False in medians else "")
      memory = last["step_memory_bytes"]
      lines.append(
          f"| {peers.COMPARISONS[model].label} | {last['batch_size']} | {scan} | "
          f"{m['trace_s']:.2f} | {m['lower_s']:.2f} | {m['compile_s']:.2f} | "
          f"{m['total_s']:.2f} | {ratio} | "
          f"{'-' if memory is None else f'{memory / 1e9:.2f}'} | {last['fusions']} | "
          f"{last['distinct_fusions']} | {last['whiles']} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    print(json.dumps(measure(_WORKER.value, _WORKER_SCAN.value, FLAGS.batch_size)),
          flush=True)
    return
  try:
    models = FLAGS.models if FLAGS["models"].present else DEFAULT_MODELS
    check(models, _PROCESSES.value, FLAGS.batch_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  records = []
  for model in models:
    for _ in range(_PROCESSES.value):
      for scan in (False, True):
        records.append(_run_worker(model, scan, FLAGS.batch_size))
        r = records[-1]
        print(f"{model} scan={scan}: total {r['total_s']:.2f} s", file=sys.stderr,
              flush=True)
  devices = sorted({r["devices"] for r in records})
  print(f"Train step, float32, {'/'.join(map(str, devices))} JAX device(s); medians of "
        f"{_PROCESSES.value} processes per row (fusion counts: the last process's):\n")
  print(format_table(records))


if __name__ == "__main__":
  app.run(main)
