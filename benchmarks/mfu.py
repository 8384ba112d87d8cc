"""MFU of the paper presets on one accelerator, `xla` against `auto` attention.

`auto` is cuDNN's fused kernel for every attention call that can use it (the table's last
column says which): the README's MFU table.

On a GPU, from the repository root (bfloat16 activations unless `--dtype` says otherwise):

    uv run python -m benchmarks.mfu --out_json=runs/mfu.json

For each row (ViT-S/16, Swin-T, CCT-14/7x2 and the Perceiver's ImageNet model, each its
paper preset) and each attention implementation of `--impls` (`model.attention_impl`),
`efficient_vit.benchmark.benchmark_config` compiles and times the train step on one fixed
on-device batch, as `python -m efficient_vit.benchmark --input=fixed` does. The step is the
model's: in-step augmentation off (`benchmark.without_augmentation`, as in
benchmarks/peers.py) and one pass over the batch (`grad_accum_steps=1`), so that the time
is that of the FLOPs counted. MFU = the step's train FLOPs per second / the device's dense
peak for the activation dtype (`benchmark.PEAK_TFLOPS` by device kind, or `--peak_tflops`).

The batch is chosen for the device, not taken from the preset (1,024, a pod slice's): each
row starts at its `Row.start_batch` (or `--batch_size`) and halves while the device runs
out of memory, down to `--min_batch`; the table gives the batch each figure was taken at.
An implementation this machine cannot run is a row that says why instead of a figure:
`cudnn` off NVIDIA GPUs (checked before anything is built), or a shape or dtype cuDNN's
fused kernel refuses (JAX's error, first line).

A check of the script itself on a CPU (where MFU needs `--peak_tflops`):

    uv run python -m benchmarks.mfu --rows=vit_s16 --impls=xla,cudnn --dtype=f32 \\
        --batch_size=4 --steps=1 --warmup_steps=0 --peak_tflops=1
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import sys
from typing import Callable

from absl import app, flags

from efficient_vit import benchmark, host_memory

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  family: str  # configs/<family>.py
  preset: str
  start_batch: int  # the first batch tried: sized for an 80 GB GPU in bfloat16

  @property
  def config_name(self) -> str:
    return f"configs/{self.family}.py:{self.preset}"


ROWS = {
    "vit_s16": Row("ViT-S/16 at 224", "vit", "s16_imagenet", 512),
    "swin_t": Row("Swin-T at 224", "swin", "swin_t", 256),
    "cct_14_7x2": Row("CCT-14/7x2 at 224", "cct", "cct_14_7x2", 512),
    "perceiver": Row("Perceiver (ImageNet) at 224", "perceiver", "imagenet", 64),
}
IMPLS = ("xla", "cudnn", "auto")

_ROWS = flags.DEFINE_list("rows", list(ROWS), "Rows of the table, from: " + ", ".join(ROWS))
_IMPLS = flags.DEFINE_list("impls", ["xla", "auto"], "Attention implementations "
                           "(model.attention_impl) measured for every row, from: "
                           + ", ".join(IMPLS) + " (auto: cuDNN for every attention call "
                           "that can use it, XLA for the others; cudnn: every call, or the "
                           "row says why not)")
_MIN_BATCH = flags.DEFINE_integer("min_batch", 8, "Smallest batch tried after running out "
                                  "of memory.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write every cell's benchmark record "
                                "to this JSON file.")


@dataclasses.dataclass
class Plan:
  rows: list[Row]
  impls: list[str]
  dtype: str
  batch_size: int | None
  min_batch: int
  steps: int
  warmup_steps: int


def make_plan(rows: list[str], impls: list[str], dtype: str, batch_size: int | None,
              min_batch: int, steps: int, warmup_steps: int) -> Plan:
  """Checks the command line before anything is built or compiled."""
  if not rows or any(r not in ROWS for r in rows) or len(set(rows)) != len(rows):
    raise ValueError(f"--rows={','.join(rows)}; allowed: each of {', '.join(ROWS)} at most "
                     "once")
  if not impls or any(i not in IMPLS for i in impls) or len(set(impls)) != len(impls):
    raise ValueError(f"--impls={','.join(impls)}; allowed: each of {', '.join(IMPLS)} at "
                     "most once")
  if min_batch < 1:
    raise ValueError(f"--min_batch={min_batch}; allowed: 1 or more")
  if batch_size is not None and batch_size < min_batch:
    raise ValueError(f"--batch_size={batch_size}; allowed: at least --min_batch={min_batch}")
  if steps < 1:
    raise ValueError(f"--steps={steps}; allowed: 1 or more")
  if warmup_steps < 0:
    raise ValueError(f"--warmup_steps={warmup_steps}; allowed: 0 or more")
  return Plan([ROWS[r] for r in rows], list(impls), dtype, batch_size, min_batch, steps,
              warmup_steps)


def row_config(row: Row, impl: str, dtype: str, batch_size: int):
  """The row's preset as measured: its model and optimizer, the model's step alone."""
  config = importlib.import_module(f"configs.{row.family}").get_config(row.preset)
  config.batch_size = batch_size
  config.dtype = dtype
  config.optimizer.grad_accum_steps = 1
  config.model.attention_impl = impl
  if "attention_dropout_rate" in config.model:
    # Attention dropout forces the explicit softmax whatever attention_impl says (the fused
    # kernel does not drop out): off in every cell, so that xla and cudnn time one model.
    config.model.attention_dropout_rate = 0.0
  return benchmark.without_augmentation(config)


def _out_of_memory(error: BaseException) -> bool:
  # MemoryError: the benchmark's own host-memory check on CPU; RESOURCE_EXHAUSTED: XLA's
  # allocator on an accelerator.
  return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


def _first_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"


def measure(row: Row, impl: str, plan: Plan,
            run: Callable[..., dict] = benchmark.benchmark_config,
            peak_tflops: float | None = None,
            log: Callable[[str], None] = lambda msg: None) -> dict:
  """One cell of the table: `benchmark_config`'s record, with `label` and `attention_impl`,
  or a dict whose `error` says why there is no figure."""
  from efficient_vit import layers

  cell = {"label": row.label, "config": row.config_name, "attention_impl": impl}
  try:
    layers.check_attention_impl(impl, field="--impls")
  except ValueError as e:
    return {**cell, "error": f"not run: {e}"}
  batch = plan.batch_size or row.start_batch
  while True:
    config = row_config(row, impl, plan.dtype, batch)
    try:
      record = run(config, config_name=row.config_name, steps=plan.steps,
                   warmup_steps=plan.warmup_steps, input_mode="fixed",
                   peak_tflops=peak_tflops)
    except Exception as e:  # noqa: BLE001 - sorted below; an xla cell's own errors re-raise.
      if _out_of_memory(e):
        if batch // 2 < plan.min_batch:
          return {**cell, "batch_size": batch,
                  "error": f"out of memory at batch {batch} (--min_batch={plan.min_batch})"}
        log(f"{row.label}, {impl}: out of memory at batch {batch}; trying {batch // 2}")
        batch //= 2
        _release()
        continue
      if impl == "xla":
        raise
      # The fused kernel's own limits (shapes, dtypes, masks) surface as JAX's errors.
      return {**cell, "batch_size": batch, "error": f"not run: {_first_line(e)}"}
    return {**cell, **record}


def _release() -> None:
  """Drops the last cell's compiled programs and buffers before the next one compiles."""
  import jax

  gc.collect()
  jax.clear_caches()


def format_table(cells: list[dict]) -> str:
  lines = ["| model | preset | batch | attention | train img/s | MFU | step memory (GB) | "
           "compile (s) | attention calls |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in cells:
    batch = c.get("batch_size", "-")
    if "error" in c:
      lines.append(f"| {c['label']} | `{c['config']}` | {batch} | {c['attention_impl']} | "
                   f"{c['error']} | | | | |")
      continue
    mfu = "-" if c["mfu"] is None else f"{c['mfu']:.3f}"
    memory = c["train_step_memory_bytes"]
    memory = "-" if memory is None else f"{memory / 1e9:.2f}"
    lines.append(f"| {c['label']} | `{c['config']}` | {batch} | {c['attention_impl']} | "
                 f"{c['train_img_per_s_fixed']:.4g} | {mfu} | {memory} | "
                 f"{c['compile_train_s']:.1f} | {c.get('attention') or 'xla'} |")
  return "\n".join(lines)


def describe(cells: list[dict], plan: Plan) -> str:
  """The line above the table: device, dtype, what was timed, the peak used."""
  import jax

  device = jax.devices()[0]
  peaks = sorted({c["peak_tflops_per_device"] for c in cells
                  if "error" not in c and c["peak_tflops_per_device"]})
  peak = (f"MFU against {', '.join(f'{p:g}' for p in peaks)} TFLOP/s per device" if peaks
          else "MFU: no peak known for this device (give --peak_tflops)")
  return (f"{device.device_kind} x {jax.device_count()} ({device.platform}), jax "
          f"{jax.__version__}, {plan.dtype} activations; train step on a fixed batch, "
          f"augmentation and attention dropout off, {plan.steps} timed steps after {plan.warmup_steps} warm-up "
          f"steps; {peak}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.restart_with_huge_pages(__name__)
  try:
    plan = make_plan(_ROWS.value, _IMPLS.value,
                     benchmark.DTYPE_FLAGS[FLAGS.dtype or "bf16"], FLAGS.batch_size,
                     _MIN_BATCH.value, FLAGS.steps, FLAGS.warmup_steps)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  host_memory.retain_if_flagged()
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  cells = []
  for row in plan.rows:
    for impl in plan.impls:
      cells.append(measure(row, impl, plan, peak_tflops=FLAGS.peak_tflops, log=log))
      log(format_table(cells[-1:]).splitlines()[-1])
      _release()
  if _OUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT_JSON.value)), exist_ok=True)
    with open(_OUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"plan": dataclasses.asdict(plan), "cells": cells}, f, indent=1)
  print(describe(cells, plan) + "\n")
  print(format_table(cells))


if __name__ == "__main__":
  app.run(main)
