"""This project's train step against a peer's on the same CPU, side by side in one run.

For each model, the project's train step (`efficient_vit.train.build` of the preset,
compiled and timed by `efficient_vit.benchmark.StepTimer` on one fixed on-device batch) and
the peer's (timm in PyTorch, or the Keras example in Keras 3) are timed in alternating
blocks of `--steps` steps: project, peer, project, peer, ... for `--rounds` rounds, after
compilation and `--warmup_steps` untimed steps on each side. The peer runs in its own
Python (`benchmarks/peer_worker.py`), started once per model and kept waiting for its next
"run N steps" command, so that alternating costs no restart. Every timed block follows
`--block_warmup_steps` untimed steps of the same side (default 1): on the 2-core machine
the project's first step after a timm block ran 1.3-1.5x slower than the next ones (a
ViT-S/16 step of 3.7 s took 5.8 s; its system time tripled, in the page faults of the
step's freshly mapped 2.25 GB temporary buffer), which without it charged every project
block with the peer's after-effects. With `--retain_host_memory` (off by default, as in
`launch.py`: `efficient_vit/host_memory.py`) the project's process keeps freed host memory
for reuse and its step stops page-faulting after about four steps, hence
`--warmup_steps=4` below. With `--host_huge_pages` (the default, as in `launch.py`) the
program starts again once with glibc's `glibc.malloc.hugetlb=1` tunable, and the peer
workers inherit it: both sides' malloc on transparent huge pages.
Printed: a table of the models (median img/s of each side over the rounds, and their
ratio).

torch, timm and Keras are not dependencies of the project: give the Python of an
environment that has them. From the repository root:

    uv venv .peers/timm -p 3.11
    VIRTUAL_ENV=.peers/timm nice uv pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31
    uv venv .peers/keras -p 3.11
    VIRTUAL_ENV=.peers/keras nice uv pip install keras==3.15.1 tensorflow-cpu==2.21.0

    uv run python -m benchmarks.peers --timm_python=.peers/timm/bin/python \
        --keras_python=.peers/keras/bin/python --rounds=5 --steps=5 --warmup_steps=4 \
        --rounds_json=runs/peers.json

`--models=vit_s16,cct` picks models (default: all of `COMPARISONS`); `--batch_size`
overrides every model's batch (a quick check: `--models=cct --batch_size=32 --steps=3`).

Same work on both sides: the architecture of the preset, the batch, the image size, the
class count, float32, AdamW with the preset's hyper-parameters, its label smoothing,
gradient clipping, EMA and dropout / stochastic-depth rates where the peer takes them;
random images and labels, no augmentation (switched off in the project's config: its
step would otherwise augment), no input pipeline. The peer's
intra-op threads are the CPU cores this process may use, which is what XLA's CPU client
uses. Run it with one JAX device (no `--xla_force_host_platform_device_count`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from absl import app, flags

# Its flags --steps (train steps in each timed block), --warmup_steps (untimed steps after
# compilation, on each side) and --batch_size (every model's batch; default: each
# comparison's own) are this script's too.
from efficient_vit import benchmark, host_memory

FLAGS = flags.FLAGS
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_worker.py")


def _timm_kwargs(config, num_classes: int, image_size: bool = True) -> dict:
  """timm `create_model` arguments that match a project model config."""
  m = config.model
  kwargs = {"num_classes": num_classes,
            "drop_rate": float(m.get("head_dropout_rate", 0.0) or 0.0),
            "drop_path_rate": float(m.get("drop_path_rate", 0.0) or 0.0)}
  if image_size:  # ViT and Swin take the resolution and the block dropouts.
    kwargs.update(img_size=config.image_size,
                  proj_drop_rate=float(m.get("dropout_rate", 0.0) or 0.0),
                  attn_drop_rate=float(m.get("attention_dropout_rate", 0.0) or 0.0))
  return kwargs


def _keras_cct_model(config, num_classes: int) -> dict:
  """The Keras example's CCT sizes, read from the project's `configs/cct.py` default."""
  m = config.model
  return {"image_size": config.image_size,
          "conv_channels": [m.conv_channels] * (m.num_conv_layers - 1) + [m.embed_dim],
          "depth": m.depth, "num_heads": m.num_heads, "key_dim": m.head_dim,
          "mlp_units": [m.mlp_dim, m.embed_dim], "stochastic_depth_rate": m.drop_path_rate,
          "dropout_rate": m.dropout_rate, "num_classes": num_classes}


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One row of the table: a project preset and the peer model that computes the same."""

  label: str
  family: str  # configs/<family>.py
  preset: str | None  # None: the file's default
  batch_size: int
  num_classes: int
  peer: str  # timm | keras
  peer_model: str  # timm's model name, or the Keras example's file
  overrides: tuple[tuple[str, object], ...] = ()  # model fields set to match the peer
  note: str = ""

  def config(self, batch_size: int | None = None):
    import importlib

    module = importlib.import_module(f"configs.{self.family}")
    config = module.get_config(self.preset) if self.preset else module.get_config()
    config.batch_size = batch_size or self.batch_size
    config.dtype = "float32"
    config.optimizer.grad_accum_steps = 1  # The peers take one pass over the batch.
    config.model.update(dict(self.overrides))
    # No augmentation: the project's step augments inside the step, the peers' loops do
    # not (their augmentation is the input pipeline's).
    return benchmark.without_augmentation(config)

  def peer_spec(self, config, threads: int, warmup_steps: int) -> dict:
    """What `peer_worker.py` builds: the same model, batch and optimizer as `config`."""
    o = config.optimizer
    spec = {"batch_size": config.batch_size, "image_size": config.image_size,
            "num_classes": self.num_classes, "threads": threads, "warmup_steps": warmup_steps,
            "optimizer": {"learning_rate": o.learning_rate, "b1": o.b1, "b2": o.b2,
                          "weight_decay": o.weight_decay},
            "label_smoothing": o.label_smoothing, "grad_clip_norm": o.grad_clip_norm,
            "ema_decay": o.ema_decay}
    if self.peer == "timm":
      spec.update(framework="timm", model=self.peer_model, create_kwargs=_timm_kwargs(
          config, self.num_classes, image_size=self.family in ("vit", "swin")))
    else:
      spec.update(framework="keras_cct", model=_keras_cct_model(config, self.num_classes))
    return spec


COMPARISONS = {
    "vit_s16": Comparison(
        "ViT-S/16 at 224", "vit", "s16_imagenet", 16, 1000, "timm", "vit_small_patch16_224",
        # timm's ViT computes the exact GELU (nn.GELU); the preset's tanh form is the
        # original ViT's. The same function on both sides: exact.
        overrides=(("mlp_activation", "gelu"),), note="project with exact GELU, as timm"),
    "swin_t": Comparison("Swin-T at 224", "swin", "swin_t", 16, 1000, "timm",
                         "swin_tiny_patch4_window7_224"),
    "mobilevit_xxs": Comparison(
        "MobileViT-XXS at 256", "mobilevit", "xxs", 16, 1000, "timm", "mobilevit_xxs",
        # timm's MobileViT blocks have no dropout (create_model sets only the head's:
        # every transformer Dropout of its model has p=0.0); the preset's 0.1 inside the
        # transformers would be work timm does not do.
        overrides=(("dropout_rate", 0.0),),
        note="project without transformer dropout, as timm"),
    "cct": Comparison("CCT seed config (configs/cct.py) at 32", "cct", None, 128, 10, "keras",
                      "keras-io examples/vision/cct.py"),
}

_MODELS = flags.DEFINE_list("models", list(COMPARISONS), "Rows of the table, from: "
                            + ", ".join(COMPARISONS))
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds (project block, peer block).")
_TIMM_PYTHON = flags.DEFINE_string("timm_python", None, "Python of an environment with torch "
                                   "and timm (needed by the timm rows).")
_KERAS_PYTHON = flags.DEFINE_string("keras_python", None, "Python of an environment with "
                                    "Keras 3 and its backend (needed by the Keras row).")
_KERAS_BACKEND = flags.DEFINE_enum("keras_backend", "tensorflow", ["tensorflow", "jax"],
                                   "Keras 3 backend of the Keras row.")
_BLOCK_WARMUP_STEPS = flags.DEFINE_integer(
    "block_warmup_steps", 1, "Untimed steps before every timed block, on each side: the "
    "first step after the other program ran is slower on a 2-core machine (see the "
    "docstring), and what is compared is each side's steady state.")
_ROUNDS_JSON = flags.DEFINE_string("rounds_json", None,
                                   "Also write every round's figures to this JSON file.")


@dataclasses.dataclass
class Plan:
  comparisons: list[Comparison]
  rounds: int
  steps: int
  warmup_steps: int
  batch_size: int | None
  pythons: dict[str, str]  # peer -> its Python
  block_warmup_steps: int


def make_plan(models: list[str], rounds: int, steps: int, warmup_steps: int,
              batch_size: int | None, timm_python: str | None,
              keras_python: str | None, block_warmup_steps: int) -> Plan:
  """Checks the command line before anything is built or started."""
  unknown = [m for m in models if m not in COMPARISONS]
  if not models or unknown:
    raise ValueError(f"--models={','.join(models)}; allowed: a comma-separated list of "
                     f"{', '.join(COMPARISONS)}")
  if len(set(models)) != len(models):
    raise ValueError(f"--models={','.join(models)}; each model at most once")
  if rounds < 1:
    raise ValueError(f"--rounds={rounds}; allowed: 1 or more")
  if steps < 1:
    raise ValueError(f"--steps={steps}; allowed: 1 or more")
  if warmup_steps < 0:
    raise ValueError(f"--warmup_steps={warmup_steps}; allowed: 0 or more")
  if block_warmup_steps < 0:
    raise ValueError(f"--block_warmup_steps={block_warmup_steps}; allowed: 0 or more")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}; allowed: a positive batch, or unset for "
                     "each comparison's own")
  comparisons = [COMPARISONS[m] for m in models]
  pythons = {}
  for peer, flag, python in (("timm", "timm_python", timm_python),
                             ("keras", "keras_python", keras_python)):
    if not any(c.peer == peer for c in comparisons):
      continue
    rows = ",".join(m for m in models if COMPARISONS[m].peer == peer)
    if not python:
      raise ValueError(f"--{flag} is not set; the rows {rows} need the Python of an "
                       f"environment with {peer} (see benchmarks/peers.py)")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
      raise ValueError(f"--{flag}={python}; allowed: an executable Python file (the rows "
                       f"{rows} run in it)")
    pythons[peer] = python
  return Plan(comparisons, rounds, steps, warmup_steps, batch_size, pythons,
              block_warmup_steps)


def schedule(sides: list[str], rounds: int) -> list[tuple[int, str]]:
  """The order of the timed blocks: every side once per round, always in the same order
  (A, B, A, B, ...)."""
  return [(r, side) for r in range(rounds) for side in sides]


def alternate(runners: dict[str, Callable[[int], float]], rounds: int, steps: int,
              block_warmup_steps: int = 0) -> dict[str, list[float]]:
  """Runs `steps` steps of each runner in the order of `schedule`, each block after
  `block_warmup_steps` untimed steps of the same runner; the seconds of each timed block,
  per runner, in round order."""
  seconds = {side: [] for side in runners}
  for _, side in schedule(list(runners), rounds):
    if block_warmup_steps:
      runners[side](block_warmup_steps)
    seconds[side].append(float(runners[side](steps)))
  return seconds


def summarize(seconds: dict[str, list[float]], steps: int, batch_size: int) -> dict:
  """img/s of every block, their median per side, and project / peer of the medians."""
  img_s = {side: [steps * batch_size / s for s in blocks] for side, blocks in seconds.items()}
  median = {side: statistics.median(v) for side, v in img_s.items()}
  return {"img_per_s": img_s, "median_img_per_s": median,
          "ratio": median["project"] / median["peer"]}


def _figure(x: float) -> str:
  """Three significant figures at most, as the issue's table writes them."""
  if x >= 100:
    return f"{x:.0f}"
  if x >= 10:
    return f"{x:.1f}"
  return f"{x:.2f}"


def format_table(rows: list[dict]) -> str:
  """The issue's table; each row: model, batch, project, peer (its name), peer_img_s."""
  lines = ["| model | batch | this project img/s | peer img/s | ratio |",
           "| --- | --- | --- | --- | --- |"]
  for row in rows:
    lines.append(f"| {row['model']} | {row['batch']} | {_figure(row['project'])} | "
                 f"{row['peer']} {_figure(row['peer_img_s'])} | "
                 f"{row['project'] / row['peer_img_s']:.2f} |")
  return "\n".join(lines)


class PeerProcess:
  """A `peer_worker.py` (or another `worker` of the same protocol, given `args`) in another
  Python, driven one JSON line per command."""

  def __init__(self, python: str, env: dict | None = None, worker: str = WORKER,
               args: tuple[str, ...] = ()):
    self.log = tempfile.NamedTemporaryFile("w+", prefix="peer_worker_", suffix=".log",
                                           delete=False)
    self.proc = subprocess.Popen([python, worker, *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.log, text=True,
                                 bufsize=1, env={**os.environ, **(env or {})})

  def call(self, **request) -> dict:
    try:
      self.proc.stdin.write(json.dumps(request) + "\n")
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    except BrokenPipeError:
      line = ""
    if not line:
      self.log.flush()
      with open(self.log.name, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"the peer worker exited (code {self.proc.wait()}) during "
                         f"{request['op']}; its log ({self.log.name}) ends:\n{tail}")
    reply = json.loads(line)
    if not reply.get("ok"):
      raise RuntimeError(f"peer worker, {request['op']}: {reply.get('error')} "
                         f"(log: {self.log.name})")
    return reply

  def close(self):
    if self.proc.poll() is None:
      try:
        self.call(op="quit")
      except (RuntimeError, BrokenPipeError):
        pass
      self.proc.wait(timeout=60)
    self.log.close()
    os.unlink(self.log.name)


class ProjectSide:
  """The project's train step of `config`, compiled and warmed up, timed by `StepTimer`."""

  def __init__(self, config, num_classes: int, warmup_steps: int):
    from efficient_vit import train

    config = benchmark.measurable_config(config)
    experiment = train.build(config, benchmark.nominal_info(config, num_classes))
    self.timer = benchmark.StepTimer(experiment, experiment.init_state())
    batch = experiment.parallel.put_batch(
        benchmark.fixed_batch(config.batch_size, config.image_size, num_classes))
    self.batch = lambda: batch
    start = time.perf_counter()
    self.compile_s = self.timer.compile_train(batch)
    self.timer.run_train(self.batch, warmup_steps)
    self.setup_s = time.perf_counter() - start

  def run(self, steps: int) -> float:
    return self.timer.run_train(self.batch, steps)


def compare(comparison: Comparison, plan: Plan, threads: int, keras_backend: str,
            log: Callable[[str], None] = print) -> dict:
  """One row: both sides built and warmed up, then `plan.rounds` alternating rounds."""
  import jax

  config = comparison.config(plan.batch_size)
  log(f"{comparison.label}: building the project's step (batch {config.batch_size})")
  project = ProjectSide(config, comparison.num_classes, plan.warmup_steps)
  log(f"  compiled in {project.compile_s:.1f} s; starting the {comparison.peer} worker")
  env = {"KERAS_BACKEND": keras_backend} if comparison.peer == "keras" else {}
  if comparison.peer == "keras" and keras_backend == "jax":
    env["XLA_FLAGS"] = ""  # No fake devices for the peer.
  peer = PeerProcess(plan.pythons[comparison.peer], env)
  try:
    spec = comparison.peer_spec(config, threads, plan.warmup_steps)
    if comparison.peer == "keras":
      spec["backend"] = keras_backend
    setup = peer.call(op="setup", spec=spec)
    log(f"  peer ready in {setup['setup_s']:.1f} s ({setup['info']}); "
        f"{plan.rounds} rounds of {plan.steps} steps")
    seconds = alternate({"project": project.run,
                         "peer": lambda n: peer.call(op="run", steps=n)["seconds"]},
                        plan.rounds, plan.steps, plan.block_warmup_steps)
  finally:
    peer.close()
  summary = summarize(seconds, plan.steps, config.batch_size)
  peer_name = ("timm" if comparison.peer == "timm" else
               f"Keras {setup['info'].get('keras', '')} / {setup['info'].get('backend', '')}")
  return {"model": comparison.label, "batch": config.batch_size,
          "project": summary["median_img_per_s"]["project"], "peer": peer_name,
          "peer_img_s": summary["median_img_per_s"]["peer"], "ratio": summary["ratio"],
          "img_per_s": summary["img_per_s"], "seconds": seconds,
          "project_compile_s": project.compile_s, "peer_setup_s": setup["setup_s"],
          "peer_params": setup["params"], "peer_info": setup["info"],
          "peer_model": comparison.peer_model, "note": comparison.note,
          "jax": jax.__version__, "jax_devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.restart_with_huge_pages(__name__)
  try:
    plan = make_plan(_MODELS.value, _ROUNDS.value, FLAGS.steps, FLAGS.warmup_steps,
                     FLAGS.batch_size, _TIMM_PYTHON.value, _KERAS_PYTHON.value,
                     _BLOCK_WARMUP_STEPS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  retained = host_memory.retain_if_flagged()  # Before JAX starts its threads.
  huge_pages = host_memory.huge_pages_on()
  threads = len(os.sched_getaffinity(0))
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  rows = []
  for comparison in plan.comparisons:
    rows.append(compare(comparison, plan, threads, _KERAS_BACKEND.value, log))
    log(format_table(rows[-1:]))
  if _ROUNDS_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_ROUNDS_JSON.value)), exist_ok=True)
    with open(_ROUNDS_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"rounds": plan.rounds, "steps": plan.steps, "warmup_steps":
                 plan.warmup_steps, "block_warmup_steps": plan.block_warmup_steps,
                 "threads": threads, "retain_host_memory": retained,
                 "host_huge_pages": huge_pages, "rows": rows}, f,
                indent=1)
  memory = ", the project's freed host memory retained" if retained else ""
  if huge_pages:
    memory += ", malloc on transparent huge pages on both sides"
  print(f"Train step, float32, {threads} CPU threads on each side{memory}; median of "
        f"{plan.rounds} alternating rounds of {plan.steps} steps:\n")
  print(format_table(rows))
  for row in rows:
    if row["note"]:
      print(f"- {row['model']}: {row['note']}")


if __name__ == "__main__":
  app.run(main)
