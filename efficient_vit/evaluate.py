"""A run's checkpoint evaluated without training.

    uv run python -m efficient_vit.evaluate --workdir RUN [--split S] [--step N] \
        [--params auto|ema|raw] [--write]

The run's own config (`RUN/config.json`) is assembled as the trainer assembles it
(`train.build`), the checkpoint's parameters are read as an export reads them
(`export.restore_variables`: the EMA parameters where the run kept them, unless
`--params=raw`), and the trainer's eval (`train.evaluate_split`) runs on the run's eval
split, or on `--split` (a split of the run's dataset, sliced as TFDS slices: `test[:1000]`).
The metrics are those the trainer logged at that step (`eval`, or `eval_ema` for the EMA
parameters), exactly. Nothing is written into RUN unless `--write` is given: it then
appends the result as one JSON line to RUN/evaluations.jsonl.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import app, flags, logging

RESULTS = "evaluations.jsonl"


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config that the trainer saved in `workdir` (config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir!r} is not a directory; allowed: the workdir "
                            "of a training run")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no config.json; allowed: the workdir "
                            "of a training run (launch.py writes config.json there)")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate(workdir: str, split: str | None = None, step: int | None = None,
             params: str = "auto") -> dict:
  """{'step', 'params', 'split', 'loss', 'top1', 'top5', 'num_examples'} of a checkpoint."""
  config = run_config(workdir)  # Before the imports: a wrong workdir is a quick error.
  from efficient_vit import export, input_pipeline, train

  if split:
    config.eval_split = split
  config.init_from.path = None  # The checkpoint's weights are loaded, not the run's start.
  variables, run = export.restore_variables(workdir, params, step)
  experiment = train.build(config)
  parallel = experiment.parallel
  metrics = train.evaluate_split(parallel, parallel.put_state(variables),
                                 input_pipeline.EvalSplit(config))
  return {**run, "split": config.eval_split, **{k: float(v) for k, v in metrics.items()}}


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: `export` and `predict`
  have flags of the same names)."""
  flags.DEFINE_string("workdir", None, "The training run to evaluate.")
  flags.DEFINE_string("split", None, "The split to evaluate (default: the run's eval_split).")
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
  flags.DEFINE_string("params", "auto", "auto: the EMA parameters where the run has them, "
                      "else the trained ones; ema; raw: the trained ones.")
  flags.DEFINE_bool("write", False, f"Append the result to RUN/{RESULTS}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax's and TensorFlow's INFO logs.
    logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  if args.workdir is None:
    raise app.UsageError("--workdir is required")
  try:
    result = evaluate(args.workdir, args.split, args.step, args.params)
  except (ValueError, FileNotFoundError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(2)
  line = json.dumps(result)
  if args.write:
    with open(os.path.join(args.workdir, RESULTS), "a", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
