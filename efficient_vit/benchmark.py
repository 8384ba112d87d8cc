"""Speed, FLOPs and memory of one config's train and eval steps; the command line of the
token sweep (`efficient_vit/token_sweep.py`).

Single config: `train.build(config)` assembles the very experiment the trainer runs; its
train and eval steps are compiled, warmed up, and timed: `--steps` train steps on one
fixed on-device batch, the same number fed by `train.batch_source` (the config's real
input pipeline), and `--steps` eval steps (at the train batch size). One JSON line:

    uv run python -m efficient_vit.benchmark --config=configs/vit.py:tiny_cifar10 --input=fixed
    TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) uv run python -m \
        efficient_vit.benchmark --config=configs/eanet.py --config.dataset=cifar10 --steps=20
    uv run python -m efficient_vit.benchmark --config=configs/vit.py:s16_imagenet \
        --input=fixed --dtype=bf16 --batch_size=256  # on a GPU: MFU against its bf16 peak

`--input=both` (the default) needs the config's dataset on disk (only CIFAR-10 exists
here, so give CIFAR-100 configs `--config.dataset=cifar10`); `--input=fixed` needs no data.

Token sweep (see `efficient_vit/token_sweep.py` for what it measures):

    uv run python -m efficient_vit.benchmark --sweep=tokens --out_dir=runs/token_sweep

What the numbers mean:
  - FLOPs are XLA's cost analysis of the compiled program. A data-parallel step's program
    is one device's share, so train FLOPs per step = its count x the number of devices.
    Where the cost analysis has no FLOP count, counts a loop body once (`model.scan`) or
    counts the recomputation (`model.remat`: model FLOPs, as MFU is defined, leave it
    out), 3 x the forward FLOPs x batch is used (`train_flops_source` says which);
    forward FLOPs are always those of the unscanned model.
  - MFU = train FLOPs per step x steps per second (fixed batch) / (devices x the device's
    dense peak). Peaks come from `PEAK_TFLOPS` matched against `device_kind`, for the
    activation dtype: the float32 figures are the non-tensor-core peaks, so an f32 run
    whose matmuls XLA sends to TF32 tensor cores can show MFU above 1. `--peak_tflops`
    overrides; on a CPU the MFU is null unless it is given.
  - `peak_memory_bytes` is the device allocator's `peak_bytes_in_use` (GPU, TPU); CPU
    devices keep no memory statistics, so it is null there. `train_step_memory_bytes`
    (every platform) is what XLA's buffer assignment reserves for one device's train
    step: arguments + outputs + temporaries - donated (aliased) buffers.
  - img/s of the fixed batch leaves out all input work; the pipeline figure adds the
    input pipeline that `train.batch_source` picks (`input_pipeline`: `auto` resolved to
    `device` or `tfdata`), and `pipeline_ratio` is their quotient (1.0: the pipeline keeps
    up). With `--input=both` the fixed figure is taken over two blocks of `--steps`, one
    before and one after the pipeline's block, so a load that drifts weighs on both sides.
    On a CPU the pipeline's own work (tf.data threads, or the device path's augmentation)
    runs on the same cores as the step, so the ratio there is below 1 by that work.

Measured on the 2-core development CPU, shared with other jobs (timings vary by +-30%
between identical blocks there; FLOPs and memory are exact): real input pipeline against
the fixed batch (`--steps=8`, CIFAR-10 (JPEG copy), `input_pipeline=auto`, which picks the
device-resident path here): pipeline_ratio 0.87 (EANet) to 1.29 (MobileViT): all within
the machine's noise of 1.0.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, Iterator

from absl import app, flags
from ml_collections import config_flags

from efficient_vit import host_memory  # --retain_host_memory, --host_huge_pages.

# Dense peak TFLOP/s per device, by activation dtype; the first entry whose key is a
# substring of the lower-cased `device_kind` wins (so the more specific names come first).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756.0, "float32": 51.0}),
    ("h100", {"bfloat16": 989.0, "float32": 67.0}),  # SXM.
    ("h200", {"bfloat16": 989.0, "float32": 67.0}),
    ("a100", {"bfloat16": 312.0, "float32": 19.5}),
    ("tpu v4", {"bfloat16": 275.0}),
    ("tpu v5 lite", {"bfloat16": 197.0}),  # v5e's device_kind.
    ("tpu v5e", {"bfloat16": 197.0}),
    ("tpu v5p", {"bfloat16": 459.0}),
    ("tpu v5", {"bfloat16": 459.0}),  # v5p's device_kind.
)
DTYPE_FLAGS = {"bf16": "bfloat16", "f32": "float32"}
# CIFAR's train split: the steps per epoch of a benchmarked run, which set the schedule's
# values (the learning rate does not change what a step costs).
NOMINAL_TRAIN_EXAMPLES = 50_000

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, optionally with a preset: configs/vit.py:tiny_cifar10. "
    "Fields can be overridden: --config.dataset=cifar10.", lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default: the "
                                   "config's; 8 for the sweep).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps of each kind (train fixed, train "
                              "pipeline, eval; the sweep's train steps).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compilation.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPE_FLAGS), "Activation dtype (default: "
                           "the config's; float32 for the sweep).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of one device for "
                                  "the MFU (default: from PEAK_TFLOPS by device kind).")
_INPUT = flags.DEFINE_enum("input", "both", ["both", "fixed"], "both: also time the train "
                           "step fed by the real input pipeline (needs the dataset); fixed: "
                           "only the fixed on-device batch.")
_SWEEP = flags.DEFINE_enum("sweep", None, ["tokens"], "Run a sweep instead of one config.")
_FAMILIES = flags.DEFINE_list("families", None, "Sweep families (default: all of "
                              "token_sweep.SWEEP_FAMILIES).")
_TOKENS = flags.DEFINE_list("tokens", None, "Sweep token counts (perfect squares; default: "
                            "token_sweep.DEFAULT_TOKENS).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Largest sweep token count (default: "
                                   "4096 on CPU, no limit on accelerators, where running out "
                                   "of memory ends a family).")
_SWEEP_DIM = flags.DEFINE_integer("sweep_dim", 64, "Sweep token width.")
_SWEEP_DEPTH = flags.DEFINE_integer("sweep_depth", 2, "Sweep number of attention blocks.")
_SWEEP_PATCH = flags.DEFINE_integer("sweep_patch", 2, "Sweep patch side (image side = patch x "
                                    "sqrt(tokens)).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/token_sweep", "Where the sweep writes "
                               "token_sweep.json and token_sweep.png.")


def peak_tflops_per_device(device_kind: str, dtype: str) -> float | None:
  """The dense peak of `PEAK_TFLOPS` for a device kind and activation dtype, or None."""
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      return peaks.get(dtype)
  return None


def fixed_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0,
                with_mask: bool = False) -> dict:
  """A host batch of uniform-noise uint8 images and random labels, shaped like the
  pipelines' (the steps augment and normalise it)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  batch = {"image": rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                 dtype=np.uint8),
           "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}
  if with_mask:
    batch["mask"] = np.ones((batch_size,), np.float32)
  return batch


class StepTimer:
  """Compiles and times an experiment's own train and eval steps (`train.build`'s
  `parallel.train_step` / `eval_step`) on a state it holds."""

  def __init__(self, experiment, host_state):
    from efficient_vit import train

    self.experiment = experiment
    self.parallel = experiment.parallel
    self.state = self.parallel.put_state(host_state)
    self.variables = train.model_variables(self.state)
    self.rng = experiment.rng
    self.train = None
    self.eval = None

  def compile_train(self, batch) -> float:
    """Compiles the train step for `batch`; returns the seconds lowering + compiling took."""
    start = time.perf_counter()
    self.train = self.parallel.train_step.lower(self.state, batch, self.rng).compile()
    return time.perf_counter() - start

  def compile_eval(self, batch) -> float:
    start = time.perf_counter()
    self.eval = self.parallel.eval_step.lower(self.variables, batch).compile()
    return time.perf_counter() - start

  def run_train(self, batches: Iterator[dict] | Callable[[], dict], steps: int) -> float:
    """Runs `steps` train steps and returns the seconds until their results were ready."""
    import jax

    next_batch = batches if callable(batches) else functools.partial(next, batches)
    metrics = None
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.train(self.state, next_batch(), self.rng)
      if self.parallel.block_each_step:
        jax.block_until_ready(metrics)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start

  def step_times(self, batch: dict, steps: int) -> list[float]:
    """Seconds of each of `steps` train steps on `batch`, each waited for."""
    import jax

    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.train(self.state, batch, self.rng)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    return times

  def run_eval(self, batch: dict, steps: int) -> float:
    import jax

    from efficient_vit import train

    variables = train.model_variables(self.state)  # The train steps donated the first ones.
    out = None
    start = time.perf_counter()
    for _ in range(steps):
      out = self.eval(variables, batch)
      if self.parallel.block_each_step:
        jax.block_until_ready(out)
    jax.block_until_ready(out)
    return time.perf_counter() - start


def num_classes_of(config) -> int:
  """The dataset's class count from its TFDS builder metadata (no data needed)."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={config.dataset!r} is not a TFDS dataset") from e
  return int(builder.info.features["label"].num_classes)


def nominal_info(config, num_classes: int | None = None):
  """Dataset facts for `train.build` that need no data on disk."""
  from efficient_vit import input_pipeline

  return input_pipeline.DatasetInfo(
      num_classes=num_classes if num_classes is not None else num_classes_of(config),
      num_train_examples=NOMINAL_TRAIN_EXAMPLES, num_eval_examples=0)


def measurable_config(config):
  """A copy of `config` whose schedule `train.build` accepts for a nominal run: the
  learning-rate schedule does not change what a step computes, but a recipe whose warmup is
  longer than the nominal run (a 50,000-image epoch) must still be measurable."""
  config = config.copy_and_resolve_references()
  config.optimizer.update(warmup_steps=0, warmup_epochs=0.0, cooldown_epochs=0.0)
  return config


def without_augmentation(config):
  """`config` with its train step's in-step augmentation switched off, in place: the
  model's step alone, as a peer's training loop (whose augmentation is its input
  pipeline's) or a model-FLOPs figure sees it. The config contract's defaults switch every
  in-step op off; the crop and the flip go off too."""
  from configs import common  # The config contract; configs sit beside the package.

  config.augment.update(common.base_config().augment.to_dict())
  config.augment.update(crop="none", flip=False)
  return config


def _check_host_memory(compiled) -> None:
  """On CPU, refuses a step that would take more than half the free host memory: the host
  would kill the process (or a neighbour's) instead of raising an error."""
  import jax

  from efficient_vit import cost

  if jax.devices()[0].platform != "cpu":
    return
  needed, available = cost.step_memory_bytes(compiled), cost.host_memory_available()
  if needed is None or available is None:
    return
  needed *= jax.local_device_count()
  if needed > available // 2:
    raise MemoryError(f"the compiled train step needs {needed / 2**30:.1f} GiB, more than half "
                      f"of the {available / 2**30:.1f} GiB of free host memory; use a smaller "
                      "--batch_size")


def benchmark_config(config, *, config_name: str = "", steps: int = 10, warmup_steps: int = 2,
                     input_mode: str = "both", peak_tflops: float | None = None) -> dict:
  """Times one config's train and eval steps; returns the JSON record (module docstring)."""
  import jax

  from efficient_vit import cost, device_input, input_pipeline, scan_layout, train

  if input_mode not in ("both", "fixed"):
    raise ValueError(f"input={input_mode!r}; allowed: both, fixed")
  if steps <= 0 or warmup_steps < 0:
    raise ValueError(f"steps={steps} must be positive and warmup_steps={warmup_steps} >= 0")
  config = measurable_config(config)
  experiment = train.build(config, nominal_info(config))
  num_classes, model = experiment.info.num_classes, experiment.model
  size, batch_size = config.image_size, config.batch_size
  host_state = experiment.init_state()
  params = cost.count_params(host_state.params)
  # Forward FLOPs of one image, with the model's full variables (batch-norm models too),
  # counted on the unscanned equivalent: XLA's cost analysis counts a loop body once, so a
  # scanned model's compiled count would see one block of each scan.
  plain_model, plain_variables = scan_layout.plain(model, train.model_variables(host_state))
  forward_flops = cost.compiled_flops(
      lambda v, x: plain_model.apply(v, x, train=False), plain_variables,
      jax.ShapeDtypeStruct((1, size, size, 3), jax.numpy.float32))
  timer = StepTimer(experiment, host_state)
  parallel = experiment.parallel
  del host_state  # The devices hold their own copy.

  # The pipelines' uint8 size (larger than image_size for augment.crop=resize).
  train_batch = parallel.put_batch(fixed_batch(
      batch_size, input_pipeline.input_size(config), num_classes))
  eval_batch = parallel.put_batch(fixed_batch(batch_size, size, num_classes, with_mask=True))
  compile_train_s = timer.compile_train(train_batch)
  _check_host_memory(timer.train)
  compile_eval_s = timer.compile_eval(eval_batch)
  # A scanned step's cost analysis counts its loop body once; a remat step's counts the
  # recomputation, which model FLOPs (and so MFU) leave out: 3 x forward for both.
  counted = not config.model.get("scan") and config.model.get("remat", "none") == "none"
  train_flops = cost.program_flops(timer.train) if counted else None
  if train_flops is not None:
    train_flops *= jax.device_count()  # The program is one device's share of the step.
    flops_source = "compiled"
  else:
    train_flops = 3.0 * forward_flops * batch_size
    flops_source = "3x_forward"

  batch_fn = lambda: train_batch  # noqa: E731
  timer.run_train(batch_fn, warmup_steps)
  fixed_block_s = [timer.run_train(batch_fn, steps)]

  pipeline_img_s = None
  if input_mode == "both":
    batches = train.batch_source(config, parallel)
    timer.run_train(batches, max(warmup_steps, 1))  # Also compiles / fills the pipeline.
    pipeline_img_s = steps * batch_size / timer.run_train(batches, steps)
    close = getattr(batches, "close", None)
    if close:
      close()
    # A second fixed block after the pipeline's, so that a load that drifts on a shared
    # machine weighs on both sides of the ratio alike.
    fixed_block_s.append(timer.run_train(batch_fn, steps))
  fixed_s, fixed_steps = sum(fixed_block_s), steps * len(fixed_block_s)
  fixed_img_s = fixed_steps * batch_size / fixed_s
  ratio = None if pipeline_img_s is None else pipeline_img_s / fixed_img_s

  timer.run_eval(eval_batch, warmup_steps)
  eval_img_s = steps * batch_size / timer.run_eval(eval_batch, steps)

  device = jax.devices()[0]
  peak_memory, memory_note = cost.peak_memory_bytes()
  if peak_tflops is None:
    peak_tflops = peak_tflops_per_device(device.device_kind, config.dtype)
  mfu = None
  if peak_tflops:
    mfu = train_flops * (fixed_steps / fixed_s) / (peak_tflops * 1e12 * jax.device_count())
  return {
      "model": config.model.name,
      "config": config_name,
      "dataset": config.dataset,
      "image_size": size,
      "params": params,
      "forward_gflops_per_image": forward_flops / 1e9,
      "train_gflops_per_step": train_flops / 1e9,
      "train_flops_source": flops_source,
      "train_img_per_s_fixed": fixed_img_s,
      "train_img_per_s_fixed_blocks": [steps * batch_size / t for t in fixed_block_s],
      "train_img_per_s_pipeline": pipeline_img_s,
      "pipeline_ratio": ratio,
      "input_pipeline": device_input.resolve(config) if input_mode == "both" else None,
      "eval_img_per_s": eval_img_s,
      "compile_train_s": compile_train_s,
      "compile_eval_s": compile_eval_s,
      # What each attention call runs, with a kernel asked for (train.attention_summary).
      "attention": train.attention_summary(experiment.attention) or None,
      "peak_memory_bytes": peak_memory,
      "peak_memory_note": memory_note,
      "train_step_memory_bytes": cost.step_memory_bytes(timer.train),
      "mfu": mfu,
      "peak_tflops_per_device": peak_tflops,
      "device_kind": device.device_kind,
      "platform": device.platform,
      "num_devices": jax.device_count(),
      "dtype": config.dtype,
      "batch_size": batch_size,
      "steps": steps,
      "parallelism": config.parallelism,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.restart_with_huge_pages(__name__)
  retained = host_memory.retain_if_flagged()
  if _SWEEP.value == "tokens":
    from efficient_vit import token_sweep

    tokens = token_sweep.DEFAULT_TOKENS if _TOKENS.value is None else [
        int(t) for t in _TOKENS.value]
    token_sweep.token_sweep(
        _FAMILIES.value, tokens, out_dir=_OUT_DIR.value, dim=_SWEEP_DIM.value,
        depth=_SWEEP_DEPTH.value, patch=_SWEEP_PATCH.value, batch_size=_BATCH_SIZE.value or 8,
        steps=_STEPS.value, dtype=DTYPE_FLAGS[_DTYPE.value or "f32"],
        max_tokens=_MAX_TOKENS.value)
    print(f"wrote {os.path.join(_OUT_DIR.value, 'token_sweep.json')} and token_sweep.png",
          flush=True)
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (or --sweep=tokens)")
  if _BATCH_SIZE.value:
    config.batch_size = _BATCH_SIZE.value
  if _DTYPE.value:
    config.dtype = DTYPE_FLAGS[_DTYPE.value]
  try:
    record = benchmark_config(config, config_name=flags.FLAGS["config"].config_filename,
                              steps=_STEPS.value, warmup_steps=_WARMUP_STEPS.value,
                              input_mode=_INPUT.value, peak_tflops=_PEAK_TFLOPS.value)
  except MemoryError as e:
    raise SystemExit(f"benchmark: {e}") from None
  record["retain_host_memory"] = retained
  record["host_huge_pages"] = host_memory.huge_pages_on()
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
