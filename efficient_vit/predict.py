"""Classifies image files with a trained run or an export of one.

    uv run python -m efficient_vit.predict --workdir RUN [--step N] [--params auto|ema|raw] \
        [--top_k 5] [--json] IMAGE...
    uv run python -m efficient_vit.predict --export DIR [--top_k 5] [--json] IMAGE...

Each JPEG or PNG file is decoded to RGB and brought to the model's size by the run's own
eval preprocessing (`input_pipeline.eval_preprocess`: the resize, or resize and central
crop, that the trainer's eval applied), normalised as the eval step normalises, and
classified; the top-k classes are printed with their names (the run's `class_names`: the
TFDS label names or the folder names it was trained on) and softmax probabilities.
`--json` prints one JSON list, an object per file: {"file", "top": [{"class", "name",
"probability"}, ...]}.

With `--workdir` the checkpoint's parameters (EMA where kept, as `export` chooses) run in
this project's model; with `--export` the exported model runs in its own runtime
(`export.load_exported`), its preprocessing taken from its export.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import numpy as np
from absl import app, flags, logging

_BATCH = 64  # Files classified per call of the model.


def _read_json(path: str, flag: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{flag}={os.path.dirname(path)!r} has no "
                            f"{os.path.basename(path)}; allowed: {what}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _preprocessing(image_size: int, crop: str, crop_fraction: float):
  """A config with the fields that input_pipeline.eval_preprocess reads."""
  import ml_collections
  return ml_collections.ConfigDict({"image_size": image_size, "augment": {
      "crop": crop, "eval_crop_fraction": crop_fraction}})


def load_run(workdir: str, step: int | None = None, params: str = "auto"):
  """(logits of uint8 images [batch, H, W, 3], class names, preprocessing config, run) of a
  run's checkpoint: the eval step's computation (model in the run's dtype, eval mode)."""
  import jax
  from efficient_vit import augment, export, train
  from efficient_vit.evaluate import run_config
  from efficient_vit.models import build_model

  config = run_config(workdir)
  info = export.read_model_info(workdir)
  variables, run = export.restore_variables(workdir, params, step)
  model = build_model(info["model"], int(info["num_classes"]), train.DTYPES[info["dtype"]])
  mean, std = info["mean"], info["std"]
  logits = jax.jit(lambda images: model.apply(variables, augment.normalise(images, mean, std),
                                              train=False))
  names = info.get("class_names") or [str(i) for i in range(int(info["num_classes"]))]
  return lambda images: np.asarray(logits(images)), names, config, run


def load_export(directory: str):
  """The same for an export directory (export.json beside the model)."""
  from efficient_vit import export

  metadata = _read_json(os.path.join(directory, export.METADATA), "export",
                        "a directory made by `python -m efficient_vit.export`")
  fraction = float(metadata["input"].get("crop_fraction", 1.0))
  config = _preprocessing(int(metadata["image_size"]),
                          "inception" if fraction < 1.0 else "resize", fraction)
  names = metadata.get("class_names") or [str(i) for i in range(int(metadata["num_classes"]))]
  return export.load_exported(directory), names, config, {
      "step": metadata.get("step"), "params": metadata.get("params")}


def read_images(paths, config) -> np.ndarray:
  """uint8 [len(paths), image_size, image_size, 3]: each file decoded to RGB as TFDS decodes
  a dataset's images, then the eval preprocessing."""
  import tensorflow as tf
  from efficient_vit import input_pipeline

  out = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file; allowed: JPEG or PNG image files")
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f"{path} is not a readable image; allowed: JPEG or PNG files") from e
    out.append(input_pipeline.eval_preprocess(config, image).numpy())
  return np.stack(out)


def predict(paths, classify: Callable, names, config, top_k: int = 5) -> list[dict]:
  """The top-k classes of each file: [{"file", "top": [{"class", "name", "probability"}]}]."""
  if not paths:
    raise ValueError("no IMAGE given; allowed: one or more JPEG or PNG files")
  if top_k < 1:
    raise ValueError(f"--top_k={top_k}; allowed: a positive integer")
  results = []
  for start in range(0, len(paths), _BATCH):
    chunk = paths[start:start + _BATCH]
    logits = np.asarray(classify(read_images(chunk, config)), np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    for path, p in zip(chunk, probabilities):
      top = np.argsort(-p, kind="stable")[:top_k]
      results.append({"file": path, "top": [
          {"class": int(i), "name": names[i], "probability": float(p[i])} for i in top]})
  return results


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: `export` and `evaluate`
  have flags of the same names)."""
  flags.DEFINE_string("workdir", None, "The training run whose checkpoint classifies.")
  flags.DEFINE_string("export", None, "An export directory (instead of --workdir).")
  flags.DEFINE_integer("step", None, "--workdir: the checkpoint step (default: the latest).")
  flags.DEFINE_string("params", "auto", "--workdir: auto (EMA where kept), ema, raw.")
  flags.DEFINE_integer("top_k", 5, "How many classes to give per image.")
  flags.DEFINE_bool("json", False, "Print one JSON list instead of text.")


def main(argv):
  if not flags.FLAGS["verbosity"].present:  # Orbax's and TensorFlow's INFO logs.
    logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  if (args.workdir is None) == (args.export is None):
    raise app.UsageError("give one of --workdir and --export")
  try:
    if args.workdir is not None:
      if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir={args.workdir!r} is not a directory; allowed: "
                                "the workdir of a training run")
      classify, names, config, _ = load_run(args.workdir, args.step, args.params)
    else:
      classify, names, config, _ = load_export(args.export)
    results = predict(argv[1:], classify, names, config, min(args.top_k, len(names)))
  except (ValueError, FileNotFoundError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    sys.exit(2)
  if args.json:
    print(json.dumps(results, indent=1))
    return
  for result in results:
    top = ", ".join(f"{t['name']} {t['probability']:.3f}" for t in result["top"])
    print(f"{result['file']}: {top}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
