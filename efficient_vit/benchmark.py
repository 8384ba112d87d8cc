"""Speed, FLOPs and memory of the models, and how their cost grows with the token count.

Single config: build the config's model, compile its train and eval steps (the very
`train.train_step` / `train.eval_step` the trainer runs, through `train.DataParallel`),
warm up, time `--steps` train steps on one fixed on-device batch, the same number fed by
`train.batch_source` (the config's real input pipeline), and `--steps` eval steps, then
print one JSON line:

    uv run python -m efficient_vit.benchmark --config=configs/vit.py:tiny_cifar10 --input=fixed
    TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) uv run python -m \
        efficient_vit.benchmark --config=configs/eanet.py --config.dataset=cifar10 --steps=20
    uv run python -m efficient_vit.benchmark --config=configs/vit.py:s16_imagenet \
        --input=fixed --dtype=bf16 --batch_size=256  # on a GPU: MFU against its bf16 peak

`--input=both` (the default) needs the config's dataset on disk (only CIFAR-10 exists
here, so give CIFAR-100 configs `--config.dataset=cifar10`); `--input=fixed` needs no data.

Token sweep: the same small width and depth (`--sweep_dim`, `--sweep_depth`) for every
attention family, at token counts from 64 up (the image grows, the patch stays), until
memory runs out or `--max_tokens`; writes `token_sweep.json` and a log-log plot
`token_sweep.png` (FLOPs, time and memory per train step against tokens) to `--out_dir`:

    uv run python -m efficient_vit.benchmark --sweep=tokens --out_dir=runs/token_sweep
    uv run python -m efficient_vit.benchmark --sweep=tokens --families=vit,swin \
        --max_tokens=65536 --batch_size=32 --out_dir=/tmp/sweep  # on a GPU

Full self-attention (ViT, CCT) costs O(N^2 d) per block; Perceiver's cross-attention to
a fixed latent array, EANet's external attention to S memory units and Swin's attention
inside fixed-size windows cost O(N d), so their curves have slope 2 and 1 on the plot.
MobileViT is not in the sweep: its attention runs at several resolutions inside a
convolutional backbone, so no single token count describes it (per block it is p^2
independent self-attentions over HW / p^2 tokens: quadratic, divided by p^2).

What the numbers mean:
  - FLOPs are XLA's cost analysis of the compiled program. A data-parallel step's program
    is one device's share, so train FLOPs per step = its count x the number of devices.
    Where the cost analysis has no FLOP count, 3 x the forward FLOPs x batch is used
    (`train_flops_source` says which).
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
  - Benchmarks on a shared machine are noisy: the sweep reports each point's median step.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Iterator

from absl import app, flags
from ml_collections import config_flags

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
# Perfect squares, so that every grid is square: sides 8, 12, 16, 24, ... (all multiples of
# the sweep's window size, 4).
DEFAULT_TOKENS = (64, 144, 256, 576, 1024, 2304, 4096, 9216, 16384, 36864, 65536)
CPU_MAX_TOKENS = 4096
SWEEP_NUM_CLASSES = 10
SWEEP_HEADS = 4
SWEEP_WINDOW = 4
SWEEP_LATENTS = 64

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
                              "SWEEP_FAMILIES).")
_TOKENS = flags.DEFINE_list("tokens", [str(t) for t in DEFAULT_TOKENS],
                            "Sweep token counts (perfect squares).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Largest sweep token count (default: "
                                   f"{CPU_MAX_TOKENS} on CPU, no limit on accelerators, where "
                                   "running out of memory ends a family).")
_SWEEP_DIM = flags.DEFINE_integer("sweep_dim", 64, "Sweep token width.")
_SWEEP_DEPTH = flags.DEFINE_integer("sweep_depth", 2, "Sweep number of attention blocks.")
_SWEEP_PATCH = flags.DEFINE_integer("sweep_patch", 2, "Sweep patch side (image side = patch x "
                                    "sqrt(tokens)).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/token_sweep", "Where the sweep writes "
                               "token_sweep.json and token_sweep.png.")


# ---------------------------------------------------------------------------------------
# Shared measurement helpers.


def peak_tflops_per_device(device_kind: str, dtype: str) -> float | None:
  """The dense peak of `PEAK_TFLOPS` for a device kind and activation dtype, or None."""
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      return peaks.get(dtype)
  return None


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def _step_memory_bytes(compiled) -> int | None:
  """What one device's compiled program reserves: arguments + outputs + temporaries, less
  the buffers that donated arguments hand on to outputs."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it.
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _peak_memory_bytes() -> tuple[int | None, str | None]:
  """The largest `peak_bytes_in_use` of the local devices (None on CPU) and why not."""
  import jax

  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise or return None.
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), None
  return None, f"{jax.devices()[0].platform} devices keep no memory statistics"


def _is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _host_memory_available() -> int | None:
  """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _check_host_memory(compiled) -> None:
  """On CPU, refuses a step that would take more than half the free host memory: the host
  would kill the process (or a neighbour's) instead of raising an error."""
  import jax

  if jax.devices()[0].platform != "cpu":
    return
  needed, available = _step_memory_bytes(compiled), _host_memory_available()
  if needed is None or available is None:
    return
  needed *= jax.local_device_count()
  if needed > available // 2:
    raise MemoryError(f"the compiled train step needs {needed / 2**30:.1f} GiB, more than half "
                      f"of the {available / 2**30:.1f} GiB of free host memory; use a smaller "
                      "--batch_size")


def _device_memory_limit() -> int | None:
  import jax

  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    stats = None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _fixed_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0,
                 with_mask: bool = False) -> dict:
  """A host batch of normal-noise images and random labels, shaped like the pipeline's."""
  import numpy as np

  rng = np.random.default_rng(seed)
  batch = {"image": rng.standard_normal((batch_size, image_size, image_size, 3),
                                        dtype=np.float32),
           "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}
  if with_mask:
    batch["mask"] = np.ones((batch_size,), np.float32)
  return batch


def _host_random_state(abstract_state, seed: int):
  """A train state of `abstract_state`'s shapes: normal (std 0.02) parameters and zeros
  everywhere else (step, optimizer moments, batch statistics), made with numpy."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)
  zeros = lambda x: np.zeros(x.shape, x.dtype)  # noqa: E731
  params = jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) * 0.02).astype(x.dtype)
      if np.issubdtype(x.dtype, np.floating) else zeros(x), abstract_state.params)
  return jax.tree.map(zeros, abstract_state).replace(params=params)


class _Steps:
  """A model's compiled train and eval steps under `train.DataParallel`, and its state."""

  def __init__(self, config, model, image_size: int, host_init: bool = False):
    """`host_init`: draw the parameters on the host (normal, std 0.02) into the shapes of
    the model's state, with a zero optimizer state, instead of compiling the model's own
    initialisation. A step's FLOPs, memory and time do not depend on the values, and the
    sweep saves one compilation per point."""
    import jax

    from efficient_vit import optim, train

    # The schedule's values do not change the step's cost: any long run will do.
    steps_per_epoch = max(50_000 // config.batch_size, 1)
    tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch, 10**8)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    create = functools.partial(train.create_train_state, model, tx,
                               (1, image_size, image_size, 3))
    if host_init:
      self.host_state = _host_random_state(jax.eval_shape(create, init_rng), config.seed)
    else:
      self.host_state = jax.jit(create)(init_rng)
    self.parallel = train.DataParallel(
        config.parallelism,
        functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                          label_smoothing=config.optimizer.label_smoothing),
        functools.partial(train.eval_step, model=model))
    self.state = self.parallel.put_state(self.host_state)
    self.rng = jax.random.key_data(dropout_rng)
    # pmap steps dispatched back to back can deadlock fake CPU devices (ENVIRONMENT.md).
    self.block_each_step = config.parallelism == "pmap"
    self.train = None
    self.eval = None

  def compile_train(self, batch) -> float:
    """Compiles the train step for `batch`; returns the seconds lowering + compiling took."""
    start = time.perf_counter()
    self.train = self.parallel.train_step.lower(self.state, batch, self.rng).compile()
    return time.perf_counter() - start

  def compile_eval(self, batch) -> float:
    start = time.perf_counter()
    self.eval = self.parallel.eval_step.lower(self.state, batch).compile()
    return time.perf_counter() - start

  def run_train(self, batches: Iterator[dict] | Callable[[], dict], steps: int) -> float:
    """Runs `steps` train steps and returns the seconds until their results were ready."""
    import jax

    next_batch = batches if callable(batches) else functools.partial(next, batches)
    metrics = None
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.train(self.state, next_batch(), self.rng)
      if self.block_each_step:
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

    out = None
    start = time.perf_counter()
    for _ in range(steps):
      out = self.eval(self.state, batch)
      if self.block_each_step:
        jax.block_until_ready(out)
    jax.block_until_ready(out)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# One config.


def num_classes_of(config) -> int:
  """The dataset's class count from its TFDS builder metadata (no data needed)."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={config.dataset!r} is not a TFDS dataset") from e
  return int(builder.info.features["label"].num_classes)


def _resolved_pipeline(config) -> str:
  """The input pipeline `train.batch_source` picks for `config` (`auto` resolved)."""
  try:
    from efficient_vit import device_input
  except ImportError:  # A trainer without the device-resident path: tf.data only.
    return config.input_pipeline
  return device_input.resolve(config)


def benchmark_config(config, *, config_name: str = "", steps: int = 10, warmup_steps: int = 2,
                     input_mode: str = "both", peak_tflops: float | None = None) -> dict:
  """Times one config's train and eval steps; returns the JSON record (module docstring)."""
  import jax

  from efficient_vit import cost, train
  from efficient_vit.models import build_model

  if input_mode not in ("both", "fixed"):
    raise ValueError(f"input={input_mode!r}; allowed: both, fixed")
  if steps <= 0 or warmup_steps < 0:
    raise ValueError(f"steps={steps} must be positive and warmup_steps={warmup_steps} >= 0")
  train.validate_config(config)
  num_classes = num_classes_of(config)
  model = build_model(config.model, num_classes, train.DTYPES[config.dtype])
  size, batch_size = config.image_size, config.batch_size
  steps_ = _Steps(config, model, size)
  parallel = steps_.parallel
  params = cost.count_params(steps_.host_state.params)

  # Forward FLOPs of one image, with the model's full variables (batch-norm models too).
  variables = {"params": steps_.host_state.params,
               **({"batch_stats": steps_.host_state.batch_stats}
                  if steps_.host_state.batch_stats else {})}
  forward_flops = cost.compiled_flops(lambda v, x: model.apply(v, x, train=False), variables,
                                      jax.ShapeDtypeStruct((1, size, size, 3), jax.numpy.float32))
  steps_.host_state = variables = None  # The devices hold their own copy.

  train_batch = parallel.put_batch(_fixed_batch(batch_size, size, num_classes))
  eval_batch = parallel.put_batch(_fixed_batch(batch_size, size, num_classes, with_mask=True))
  compile_train_s = steps_.compile_train(train_batch)
  _check_host_memory(steps_.train)
  compile_eval_s = steps_.compile_eval(eval_batch)
  train_flops = _flops(steps_.train)
  if train_flops is not None:
    train_flops *= jax.device_count()  # The program is one device's share of the step.
    flops_source = "compiled"
  else:
    train_flops = 3.0 * forward_flops * batch_size
    flops_source = "3x_forward"

  batch_fn = lambda: train_batch  # noqa: E731
  steps_.run_train(batch_fn, warmup_steps)
  fixed_block_s = [steps_.run_train(batch_fn, steps)]

  pipeline_img_s = None
  if input_mode == "both":
    batches = train.batch_source(config, parallel)
    steps_.run_train(batches, max(warmup_steps, 1))  # Also compiles / fills the pipeline.
    pipeline_img_s = steps * batch_size / steps_.run_train(batches, steps)
    close = getattr(batches, "close", None)
    if close:
      close()
    # A second fixed block after the pipeline's, so that a load that drifts on a shared
    # machine weighs on both sides of the ratio alike.
    fixed_block_s.append(steps_.run_train(batch_fn, steps))
  fixed_s, fixed_steps = sum(fixed_block_s), steps * len(fixed_block_s)
  fixed_img_s = fixed_steps * batch_size / fixed_s
  ratio = None if pipeline_img_s is None else pipeline_img_s / fixed_img_s

  steps_.run_eval(eval_batch, warmup_steps)
  eval_img_s = steps * batch_size / steps_.run_eval(eval_batch, steps)

  device = jax.devices()[0]
  peak_memory, memory_note = _peak_memory_bytes()
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
      "input_pipeline": _resolved_pipeline(config) if input_mode == "both" else None,
      "eval_img_per_s": eval_img_s,
      "compile_train_s": compile_train_s,
      "compile_eval_s": compile_eval_s,
      "peak_memory_bytes": peak_memory,
      "peak_memory_note": memory_note,
      "train_step_memory_bytes": _step_memory_bytes(steps_.train),
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


# ---------------------------------------------------------------------------------------
# The token sweep.


def _vit(dim: int, depth: int, patch: int) -> dict:
  return dict(name="vit", patch_size=patch, hidden_dim=dim, depth=depth, num_heads=SWEEP_HEADS,
              mlp_dim=2 * dim, pooling="gap")


def _cct(dim: int, depth: int, patch: int) -> dict:
  return dict(name="cct", tokenizer="patch", patch_size=patch, hidden_dim=dim, depth=depth,
              num_heads=SWEEP_HEADS, mlp_dim=2 * dim, pooling="seq",
              position_embedding="learned", attention_dropout_rate=0.0, drop_path_rate=0.0)


def _eanet(dim: int, depth: int, patch: int) -> dict:
  return dict(name="eanet", patch_size=patch, hidden_dim=dim, depth=depth,
              num_heads=SWEEP_HEADS, mlp_dim=2 * dim, attention="external", dropout_rate=0.0,
              attention_dropout_rate=0.0)


def _perceiver(dim: int, depth: int, patch: int) -> dict:
  return dict(name="perceiver", patch_size=patch, input_embedding_dim=dim,
              position_encoding="learned", num_latents=SWEEP_LATENTS, latent_dim=dim,
              num_iterations=1, share_weights="all", latent_depth=depth,
              latent_heads=SWEEP_HEADS, mlp_dim=2 * dim)


def _swin(dim: int, depth: int, patch: int) -> dict:
  return dict(name="swin", patch_size=patch, embed_dim=dim, depths=(depth,),
              num_heads=(SWEEP_HEADS,), window_size=SWEEP_WINDOW, mlp_ratio=2.0,
              drop_path_rate=0.0)


# family -> (how its attention grows with the tokens N, model config for (dim, depth, patch)).
# All: `depth` attention blocks of width `dim` with SWEEP_HEADS heads and MLPs of 2 x dim,
# over N = (image side / patch)^2 tokens, no dropout.
SWEEP_FAMILIES: dict[str, tuple[str, Callable[[int, int, int], dict]]] = {
    "vit": ("quadratic: full self-attention", _vit),
    "cct": ("quadratic: full self-attention, sequence pooling", _cct),
    "perceiver": (f"linear: cross-attention to {SWEEP_LATENTS} latents", _perceiver),
    "eanet": ("linear: external attention to learned memory units", _eanet),
    "swin": (f"linear: attention in {SWEEP_WINDOW}x{SWEEP_WINDOW} shifted windows", _swin),
}


def _family_missing(name: str) -> str | None:
  """Why a sweep family cannot be built yet (unknown, or its module file is missing)."""
  import importlib.util

  from efficient_vit.models import REGISTRY

  if name not in SWEEP_FAMILIES:
    return f"not a sweep family; known: {', '.join(SWEEP_FAMILIES)}"
  model_name = SWEEP_FAMILIES[name][1](8, 1, 1)["name"]
  if model_name not in REGISTRY:
    return f"model {model_name!r} is not in the model registry"
  module = REGISTRY[model_name][0]
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    found = False
  return None if found else f"module {module} does not exist yet"


def sweep_point(family: str, tokens: int, *, dim: int, depth: int, patch: int,
                batch_size: int, steps: int, dtype: str, memory_budget: int | None) -> dict:
  """Compiles and times one family at one token count; returns its record.

  Raises MemoryError when the compiled step would need more than `memory_budget` bytes.
  """
  import jax

  from configs import common
  from efficient_vit import cost, train
  from efficient_vit.models import build_model

  side = math.isqrt(tokens)
  image_size = side * patch
  config = common.base_config()
  config.update(batch_size=batch_size, image_size=image_size, dtype=dtype)
  config.model.update(SWEEP_FAMILIES[family][1](dim, depth, patch))
  config.optimizer.update(schedule="constant")
  model = build_model(config.model, SWEEP_NUM_CLASSES, train.DTYPES[dtype])
  steps_ = _Steps(config, model, image_size, host_init=True)
  batch = steps_.parallel.put_batch(_fixed_batch(batch_size, image_size, SWEEP_NUM_CLASSES))
  compile_s = steps_.compile_train(batch)
  memory = _step_memory_bytes(steps_.train)
  if memory is not None and memory_budget is not None:
    needed = memory * jax.local_device_count()
    if needed > memory_budget:
      raise MemoryError(f"the compiled step needs {needed / 2**30:.2f} GiB, more than the "
                        f"{memory_budget / 2**30:.2f} GiB budget")
  flops = _flops(steps_.train)
  steps_.run_train(lambda: batch, 1)  # Warm-up.
  times = steps_.step_times(batch, steps)
  peak_memory, _ = _peak_memory_bytes()
  step_s = statistics.median(times)
  return {
      "tokens": tokens,
      "image_size": image_size,
      "params": cost.count_params(steps_.host_state.params),
      "train_flops_per_step": None if flops is None else flops * jax.device_count(),
      "step_s": step_s,
      "step_s_all": times,
      "img_per_s": batch_size / step_s,
      "compile_s": compile_s,
      "train_step_memory_bytes": memory,
      # Cumulative over the process: a running maximum, not this point's own peak.
      "peak_memory_bytes_so_far": peak_memory,
  }


def _loglog_slope(points: list[dict], key: str) -> float | None:
  """d log(key) / d log(tokens) between the two largest token counts."""
  valid = [p for p in points if p.get(key)]
  if len(valid) < 2:
    return None
  a, b = valid[-2], valid[-1]
  return math.log(b[key] / a[key]) / math.log(b["tokens"] / a["tokens"])


def token_sweep(families: list[str] | None = None,
                tokens: list[int] | tuple[int, ...] = DEFAULT_TOKENS, *, out_dir: str,
                dim: int = 64, depth: int = 2, patch: int = 2, batch_size: int = 8,
                steps: int = 5, dtype: str = "float32", max_tokens: int | None = None,
                log: Callable[[str], None] = print) -> dict:
  """Runs the token sweep, writes `token_sweep.json` and `token_sweep.png` to `out_dir`,
  and returns the results (the JSON's content)."""
  import jax

  from efficient_vit import train

  families = list(SWEEP_FAMILIES) if families is None else list(families)
  for t in tokens:
    if t <= 0 or math.isqrt(t) ** 2 != t:
      raise ValueError(f"tokens={t} must be a positive perfect square (a square grid)")
  if dtype not in train.DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(train.DTYPES)}")
  platform = jax.devices()[0].platform
  if max_tokens is None and platform == "cpu":
    max_tokens = CPU_MAX_TOKENS
  tokens = sorted(t for t in tokens if max_tokens is None or t <= max_tokens)
  if platform == "cpu":  # A host out of memory kills the process instead of raising.
    available = _host_memory_available()
    memory_budget = None if available is None else available // 2
  else:
    memory_budget = _device_memory_limit()

  results = {
      "device_kind": jax.devices()[0].device_kind, "platform": platform,
      "num_devices": jax.device_count(), "dtype": dtype, "batch_size": batch_size,
      "dim": dim, "depth": depth, "heads": SWEEP_HEADS, "patch_size": patch, "steps": steps,
      "max_tokens": max_tokens, "families": {}, "skipped": {},
  }
  for family in families:
    missing = _family_missing(family)
    if missing:
      results["skipped"][family] = missing
      log(f"token sweep: skipping {family}: {missing}")
      continue
    record = {"attention": SWEEP_FAMILIES[family][0], "points": [], "stopped": None,
              "point_errors": {}}
    for t in tokens:
      gc.collect()  # Frees the previous point's device buffers (and a failed point's).
      try:
        point = sweep_point(family, t, dim=dim, depth=depth, patch=patch,
                            batch_size=batch_size, steps=steps, dtype=dtype,
                            memory_budget=memory_budget)
      except MemoryError as e:
        record["stopped"] = f"out of memory at {t} tokens: {e}"
      except Exception as e:  # noqa: BLE001 - one family's failure must not end the sweep.
        if _is_out_of_memory(e):
          record["stopped"] = f"out of memory at {t} tokens: {str(e).splitlines()[0][:300]}"
        elif isinstance(e, ValueError):  # This size does not fit the family (e.g. windows).
          record["point_errors"][str(t)] = str(e)[:300]
          log(f"token sweep: {family} at {t} tokens: {e}")
          continue
        else:
          record["stopped"] = f"{type(e).__name__} at {t} tokens: {str(e)[:300]}"
      if record["stopped"]:
        log(f"token sweep: {family} stopped: {record['stopped']}")
        break
      record["points"].append(point)
      flops = point["train_flops_per_step"]
      log(f"token sweep: {family:9s} {t:6d} tokens  {point['step_s'] * 1e3:9.2f} ms/step  "
          f"{(flops or float('nan')) / 1e9:9.3f} GFLOP/step  "
          f"{(point['train_step_memory_bytes'] or 0) / 2**20:8.1f} MiB")
    record["flops_loglog_slope"] = _loglog_slope(record["points"], "train_flops_per_step")
    record["time_loglog_slope"] = _loglog_slope(record["points"], "step_s")
    results["families"][family] = record

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "token_sweep.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plot_token_sweep(results, os.path.join(out_dir, "token_sweep.png"))
  return results


def plot_token_sweep(results: dict, path: str) -> None:
  """Log-log FLOPs, time and memory per train step against tokens, one line per family,
  with dotted slope-1 and slope-2 guides."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = (("train_flops_per_step", "FLOPs per train step", "flops_loglog_slope"),
            ("step_s", "seconds per train step (median)", "time_loglog_slope"),
            ("train_step_memory_bytes", "bytes per train step (XLA buffers)", None))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
  # ViT and CCT coincide at these sizes: distinct markers keep both visible.
  markers = dict(zip(results["families"], itertools.cycle("osD^vPX*")))
  for ax, (key, label, slope_key) in zip(axes, panels):
    lowest = None
    for family, record in results["families"].items():
      points = [p for p in record["points"] if p.get(key)]
      if not points:
        continue
      xs = [p["tokens"] for p in points]
      ys = [p[key] for p in points]
      slope = record.get(slope_key) if slope_key else None
      name = family if slope is None else f"{family} (end slope {slope:.2f})"
      style = "-" if record["attention"].startswith("quadratic") else "--"
      ax.plot(xs, ys, style, marker=markers[family], label=name)
      if lowest is None or xs[0] < lowest[0] or (xs[0] == lowest[0] and ys[0] < lowest[1]):
        lowest = (xs[0], ys[0])
    if lowest is not None:
      x0, y0 = lowest
      all_x = sorted({p["tokens"] for r in results["families"].values() for p in r["points"]})
      x1 = all_x[-1]
      for power, guide in ((1, "slope 1 (linear)"), (2, "slope 2 (quadratic)")):
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** power], ":", color="grey", linewidth=1)
        ax.annotate(guide, (x1, y0 * (x1 / x0) ** power), fontsize=7, color="grey",
                    ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"Token sweep: dim {results['dim']}, depth {results['depth']}, batch "
               f"{results['batch_size']}, {results['dtype']}, {results['device_kind']}",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------------------
# Command line.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _SWEEP.value == "tokens":
    token_sweep(_FAMILIES.value, [int(t) for t in _TOKENS.value], out_dir=_OUT_DIR.value,
                dim=_SWEEP_DIM.value, depth=_SWEEP_DEPTH.value, patch=_SWEEP_PATCH.value,
                batch_size=_BATCH_SIZE.value or 8, steps=_STEPS.value,
                dtype=DTYPE_FLAGS[_DTYPE.value or "f32"], max_tokens=_MAX_TOKENS.value)
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
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
