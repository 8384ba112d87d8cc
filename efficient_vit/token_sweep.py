"""How the cost of each attention family grows with the token count.

The same small width and depth for every attention family, at token counts from 64 up
(the image grows, the patch stays), until memory runs out or `max_tokens`; writes
`token_sweep.json` and a log-log plot `token_sweep.png` (FLOPs, time and memory per train
step against tokens). Each point is `train.build` of a config (the trainer's own step),
timed by `benchmark.StepTimer`. From the command line:

    uv run python -m efficient_vit.benchmark --sweep=tokens --out_dir=runs/token_sweep
    uv run python -m efficient_vit.benchmark --sweep=tokens --families=vit,swin \
        --max_tokens=65536 --batch_size=32 --out_dir=runs/token_sweep_gpu  # on a GPU

Full self-attention (ViT, CCT) costs O(N^2 d) per block; Perceiver's cross-attention to
a fixed latent array, EANet's external attention to S memory units and Swin's attention
inside fixed-size windows cost O(N d), so their curves have slope 2 and 1 on the plot.
MobileViT is not in the sweep: its attention runs at several resolutions inside a
convolutional backbone, so no single token count describes it (per block it is p^2
independent self-attentions over HW / p^2 tokens: quadratic, divided by p^2).
Benchmarks on a shared machine are noisy: the sweep reports each point's median step.

Measured on the 2-core development CPU, shared with other jobs (defaults, --steps=3: dim
64, depth 2, batch 8, f32, up to 4,096 tokens): log-log slope of train FLOPs per step
between the two largest token counts: ViT 1.86, CCT 1.86 (both stopped at 4,096 tokens,
whose step needs 16.3 GiB, by the host-memory guard), EANet 1.00, Swin 1.00, Perceiver
0.88; of time: 1.99, 2.13, 1.32, 1.04, 0.85. ViT at 2,304 tokens: 77 GFLOP and 5.3 GiB per
step, 13 s; Swin at 4,096: 14 GFLOP, 0.47 GiB, 0.87 s.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import statistics
from typing import Callable

import jax
import numpy as np

from efficient_vit import benchmark, cost, train

# Perfect squares, so that every grid is square: sides 8, 12, 16, 24, ... (all multiples of
# the sweep's window size, 4).
DEFAULT_TOKENS = (64, 144, 256, 576, 1024, 2304, 4096, 9216, 16384, 36864, 65536)
CPU_MAX_TOKENS = 4096
SWEEP_NUM_CLASSES = 10
SWEEP_HEADS = 4
SWEEP_WINDOW = 4
SWEEP_LATENTS = 64


def _vit(dim: int, depth: int, patch: int) -> dict:
  return dict(name="vit", patch_size=patch, embed_dim=dim, depth=depth, num_heads=SWEEP_HEADS,
              mlp_dim=2 * dim, pooling="gap")


def _cct(dim: int, depth: int, patch: int) -> dict:
  return dict(name="cct", tokenizer="patch", patch_size=patch, embed_dim=dim, depth=depth,
              num_heads=SWEEP_HEADS, mlp_dim=2 * dim, pooling="seq",
              position_embedding="learned", attention_dropout_rate=0.0, drop_path_rate=0.0)


def _eanet(dim: int, depth: int, patch: int) -> dict:
  return dict(name="eanet", patch_size=patch, embed_dim=dim, depth=depth,
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


def _host_random_state(abstract_state, seed: int):
  """A train state of `abstract_state`'s shapes: normal (std 0.02) parameters and zeros
  everywhere else (step, optimizer moments, batch statistics), made with numpy. A step's
  FLOPs, memory and time do not depend on the values, and this saves compiling the
  model's own initialisation at every point."""
  rng = np.random.default_rng(seed)
  zeros = lambda x: np.zeros(x.shape, x.dtype)  # noqa: E731
  params = jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) * 0.02).astype(x.dtype)
      if np.issubdtype(x.dtype, np.floating) else zeros(x), abstract_state.params)
  return jax.tree.map(zeros, abstract_state).replace(params=params)


def sweep_point(family: str, tokens: int, *, dim: int, depth: int, patch: int,
                batch_size: int, steps: int, dtype: str, memory_budget: int | None) -> dict:
  """Compiles and times one family at one token count; returns its record.

  Raises MemoryError when the compiled step would need more than `memory_budget` bytes
  (the host's, shared by fake CPU devices; or one device's).
  """
  from configs import common  # The config contract; configs sit beside the package.

  side = math.isqrt(tokens)
  image_size = side * patch
  config = common.base_config()
  config.update(batch_size=batch_size, image_size=image_size, dtype=dtype)
  config.model.update(SWEEP_FAMILIES[family][1](dim, depth, patch))
  config.optimizer.update(schedule="constant")
  experiment = train.build(config, benchmark.nominal_info(config, SWEEP_NUM_CLASSES))
  host_state = _host_random_state(experiment.abstract_state(), config.seed)
  timer = benchmark.StepTimer(experiment, host_state)
  batch = experiment.parallel.put_batch(
      benchmark.fixed_batch(batch_size, image_size, SWEEP_NUM_CLASSES))
  compile_s = timer.compile_train(batch)
  memory = cost.step_memory_bytes(timer.train)
  if memory is not None and memory_budget is not None:
    on_cpu = jax.devices()[0].platform == "cpu"
    # Fake CPU devices share the host's memory; a real device has its own.
    needed = memory * jax.local_device_count() if on_cpu else memory
    if needed > memory_budget:
      where = "half the free host memory" if on_cpu else "the device's memory"
      raise MemoryError(f"the compiled step needs {needed / 2**30:.2f} GiB, more than the "
                        f"{memory_budget / 2**30:.2f} GiB budget ({where})")
  flops = cost.program_flops(timer.train)
  timer.run_train(lambda: batch, 1)  # Warm-up.
  times = timer.step_times(batch, steps)
  peak_memory, _ = cost.peak_memory_bytes()
  step_s = statistics.median(times)
  return {
      "tokens": tokens,
      "image_size": image_size,
      "params": cost.count_params(host_state.params),
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
  families = list(SWEEP_FAMILIES) if families is None else list(families)
  for family in families:
    if family not in SWEEP_FAMILIES:
      raise ValueError(f"families={family!r}; allowed: {', '.join(SWEEP_FAMILIES)}")
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
    available = cost.host_memory_available()
    memory_budget = None if available is None else available // 2
  else:
    memory_budget = cost.device_memory_limit()

  results = {
      "device_kind": jax.devices()[0].device_kind, "platform": platform,
      "num_devices": jax.device_count(), "dtype": dtype, "batch_size": batch_size,
      "dim": dim, "depth": depth, "heads": SWEEP_HEADS, "patch_size": patch, "steps": steps,
      "max_tokens": max_tokens, "families": {},
  }
  for family in families:
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
        if cost.is_out_of_memory(e):
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


def cached_sweep() -> dict:
  """The small sweep that notebooks/complexity.ipynb draws, shipped inside the package
  (efficient_vit/data/token_sweep.json), so that an installed copy has it too."""
  import importlib.resources
  cached = importlib.resources.files("efficient_vit") / "data" / "token_sweep.json"
  return json.loads(cached.read_text(encoding="utf-8"))


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
  # ViT and CCT coincide at these sizes: distinct markers, the earlier ones larger, keep
  # both visible.
  markers = dict(zip(results["families"], itertools.cycle("osD^vPX*")))
  sizes = {family: max(9 - 2 * i, 4) for i, family in enumerate(results["families"])}
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
      ax.plot(xs, ys, style, marker=markers[family], markersize=sizes[family], label=name)
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
