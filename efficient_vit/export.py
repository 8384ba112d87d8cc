"""Export of a trained run: its parameters, in eval mode, as a model that needs no JAX code.

    uv run python -m efficient_vit.export --workdir RUN --format FORMAT --out DIR \
        [--params=auto|ema|raw] [--step=N] [--platforms=cpu,cuda,tpu]

The latest checkpoint of RUN (or --step) is exported with its EMA parameters where the run
kept them (optimizer.ema_decay > 0), else its trained parameters (`--params=raw` forces
those); batch statistics (MobileViT) are folded in as eval-mode constants. The run's
`model.json` (written by the trainer) says how to rebuild the model and feed it.

Every format takes raw images and returns logits:
  input   `images`: uint8 [batch, image_size, image_size, 3], RGB pixels already resized to
          the run's image_size (`export.json` says how the eval pipeline resized them);
  output  `logits`: float32 [batch, num_classes].
The normalisation `(pixels / 255 - mean) / std` is inside the exported computation, and the
batch dimension is symbolic: one export serves any batch size. DIR holds the model and
`export.json` (the input, output, preprocessing, class names, run, step and parameters
exported).

FORMAT, what DIR holds, and how to run it without this repository:
  stablehlo    model.stablehlo, `jax.export` serialized StableHLO for --platforms:
               `jax.export.deserialize(open(path, 'rb').read()).call(images)`.
  saved_model  saved_model/, a TensorFlow SavedModel made by `jax.experimental.jax2tf`
               (its weights are variables): `tf.saved_model.load(path)
               .signatures['serving_default'](images=images)['logits']`.
  tflite       model.tflite, the TFLite converter's model of that SavedModel (CPU
               lowering): `tf.lite.Interpreter(model_path=path).get_signature_runner()(
               images=images)['logits']` (the runner resizes the input to the batch).
  onnx         model.onnx, tf2onnx's conversion of that TFLite model (opset
               `ONNX_OPSET`, export.json also in its metadata_props):
               `onnxruntime.InferenceSession(path).run(['logits'], {'images': images})`.
               tf2onnx cannot read the SavedModel itself: jax2tf puts the whole
               computation in one `XlaCallModule` op, which tf2onnx 1.17 has no converter
               for (it fails on that op's attributes), while the TFLite converter lowers it
               to TFLite builtins. Two of tf2onnx's converters are corrected for that path:
               UnsortedSegmentProd (negative segment ids, which the TFLite converter uses
               for the shape products of reshapes with a symbolic batch) and Select (made
               a `Where`, so that an infinite value in the dropped branch stays dropped).
`load_exported(DIR)` runs an export of any format that way.

All six families (vit, perceiver, eanet, cct, swin with its shift and window masks,
mobilevit with its batch statistics) export in all four formats and give the JAX model's
logits to 1e-4 at two batch sizes from one export (tests/test_export.py). Model code keeps
to this by not indexing batched arrays numpy-style (`x[..., 0]`, `x[:, a:b:s]`): with a
symbolic batch JAX lowers such indexing to a dynamic gather, which the TFLite converter
rejects; `jnp.squeeze` and `jax.lax.slice_in_dim` lower to plain slices.

Errors (an unknown format, a run with no checkpoint, an existing non-empty DIR) are raised
before anything is written, and a failed conversion leaves no DIR behind: the export is
built in a temporary folder beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from efficient_vit import layers, scan_layout
from efficient_vit.models import build_model

FORMATS = ("stablehlo", "saved_model", "tflite", "onnx")
PARAMS = ("auto", "ema", "raw")
PLATFORMS = ("cpu", "cuda", "tpu")
ARTIFACTS = {"stablehlo": "model.stablehlo", "saved_model": "saved_model",
             "tflite": "model.tflite", "onnx": "model.onnx"}
METADATA = "export.json"
ONNX_OPSET = 17
# What the checkpoint's `train` item holds that an eval-mode model needs.
_RESTORED = ("params", "batch_stats", "ema_params")


def _check_choice(field: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"--{field}={value!r}; allowed: {', '.join(allowed)}")


def read_model_info(workdir: str) -> dict:
  """The run's `model.json`: model fields, num_classes, image_size, dataset, mean, std."""
  path = os.path.join(workdir, "model.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no model.json; allowed: the workdir "
                            "of a training run (launch.py writes model.json there)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"train": ocp.PyTreeCheckpointHandler()})


def _checkpoint_step(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"--workdir={workdir!r} has no checkpoint; allowed: a run that "
                            "has saved at least one (config.checkpoint_every_steps)")
  if step is None:
    return max(steps)
  if step not in steps:
    raise ValueError(f"--step={step}; allowed: {', '.join(map(str, sorted(steps)))}")
  return step


def restore_variables(workdir: str, params: str = "auto",
                      step: int | None = None) -> tuple[dict, dict]:
  """The eval-mode variables of a run's checkpoint: ({'params': ..., 'batch_stats': ...},
  {'step': step, 'params': 'ema' | 'raw'}), as numpy arrays.

  Only the parameters, EMA parameters and batch statistics are read (an Orbax partial
  restore): neither the optimizer state nor the optimizer is needed.
  """
  _check_choice("params", params, PARAMS)
  with _checkpoint_manager(workdir) as manager:
    step = _checkpoint_step(manager, workdir, step)
    state = manager.item_metadata(step)["train"]["state"]
    item = {"state": {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                         state[name])
                      for name in _RESTORED if name in state}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.Composite(train=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))["train"]["state"]
  has_ema = bool(restored.get("ema_params"))
  if params == "ema" and not has_ema:
    raise ValueError(f"--params=ema but the run in {workdir!r} kept no EMA parameters "
                     "(optimizer.ema_decay=0); allowed: auto, raw")
  use = "ema" if has_ema and params != "raw" else "raw"
  variables = {"params": restored["ema_params" if use == "ema" else "params"]}
  if restored.get("batch_stats"):
    variables["batch_stats"] = restored["batch_stats"]
  return variables, {"step": int(step), "params": use}


def serving_function(model, mean, std) -> Callable[[Any, jax.Array], jax.Array]:
  """(variables, uint8 images [batch, H, W, 3]) -> float32 logits [batch, classes], with the
  input pipeline's normalisation `(pixels / 255 - mean) / std` in front of the model."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def serve(variables, images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return serve


def export_stablehlo(serve, variables, image_size: int, path: str,
                     platforms=PLATFORMS) -> None:
  """Serialized `jax.export.Exported` of `serve` with the variables as constants."""
  batch, = jax.export.symbolic_shape("batch")
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(functools.partial(serve, variables)),
                               platforms=tuple(platforms))(images)
  with open(path, "wb") as f:
    f.write(exported.serialize())


def export_saved_model(serve, variables, image_size: int, path: str,
                       platforms=PLATFORMS) -> None:
  """A SavedModel whose `serving_default` signature maps `images` to `logits`."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  tf_variables = jax.tree.map(lambda v: tf.Variable(np.asarray(v), trainable=False), variables)
  converted = jax2tf.convert(
      serve, polymorphic_shapes=[None, f"(batch, {image_size}, {image_size}, 3)"],
      with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.model_variables = tf_variables  # Tracked, so that they are saved.

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
  def serving(images):
    return {"logits": converted(tf_variables, images)}

  module.serving = serving
  tf.saved_model.save(module, path, signatures={"serving_default": serving})


def export_tflite(saved_model_dir: str, path: str) -> None:
  import tensorflow as tf

  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
  with open(path, "wb") as f:
    f.write(converter.convert())


def _segment_ids_without_dropped(ctx, node, name, args):
  """tf2onnx's converter of UnsortedSegmentProd with constant segment ids, made correct for
  negative ids (TensorFlow drops those entries; tf2onnx 1.17 multiplies them into the last
  segment) and for empty segments (product 1). The TFLite converter emits this op to
  multiply shape entries for reshapes with a symbolic batch; every such product would
  otherwise be wrong. One neutral 1 per segment is appended, then tf2onnx's own converter
  runs."""
  del name, args
  from tf2onnx import utils
  from tf2onnx.onnx_opset.reduction import SegmentSum

  data, ids, num_segments = node.inputs[:3]
  if ids.is_const() and num_segments.is_const() and ctx.get_rank(node.input[0]) == 1:
    values = np.asarray(ids.get_tensor_value(as_list=False))
    count = int(np.asarray(num_segments.get_tensor_value(as_list=False)))
    keep = np.flatnonzero(values >= 0)
    np_dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    kept = ctx.make_node("Gather", [node.input[0], ctx.make_const(
        utils.make_name("kept"), keep.astype(np.int64)).output[0]], attr={"axis": 0})
    ones = ctx.make_const(utils.make_name("ones"), np.ones(count, np_dtype))
    ctx.replace_input(node, node.input[0], ctx.make_node(
        "Concat", [kept.output[0], ones.output[0]], attr={"axis": 0}).output[0], 0)
    new_ids = np.concatenate([values[keep], np.arange(count)]).astype(values.dtype)
    ctx.replace_input(node, node.input[1],
                      ctx.make_const(utils.make_name("ids"), new_ids).output[0], 1)
  SegmentSum.any_version(ctx.opset, ctx, node)


def _rename(graph, old: str, new: str) -> None:
  """Renames the value `old` of an ONNX graph (tf2onnx keeps TFLite's tensor names, such as
  `serving_default_images:0`) wherever it is produced or consumed."""
  for node in graph.node:
    for values in (node.input, node.output):
      for i, name in enumerate(values):
        if name == old:
          values[i] = new
  for value in (*graph.input, *graph.output, *graph.value_info):
    if value.name == old:
      value.name = new


def _select_keeping_inf(ctx, node, name, args):
  """tf2onnx's converter of Select/SelectV2, told to emit a `Where`: its default rewrites
  select(c, x, y) as c * x + (1 - c) * y, which is NaN where the unselected branch is
  infinite (exact GELU's erfc divides by x^2 in a branch that is dropped at x = 0)."""
  del name, args
  from tf2onnx.onnx_opset.controlflow import Select

  node.set_attr("handles_nan", True)
  Select.version_9(ctx, node)


def export_onnx(tflite_path: str, path: str, metadata: dict) -> None:
  """The ONNX model of a TFLite model, with `metadata` (its input and output names set to
  the model's) in its metadata_props."""
  import onnx
  import tf2onnx

  model, _ = tf2onnx.convert.from_tflite(
      tflite_path, opset=ONNX_OPSET,
      custom_op_handlers={"UnsortedSegmentProd": (_segment_ids_without_dropped, []),
                          "Select": (_select_keeping_inf, []),
                          "SelectV2": (_select_keeping_inf, [])})
  # from_tflite leaves ops it cannot convert in place (continue_on_error): refuse those.
  foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node
                    if n.domain not in ("", "ai.onnx")})
  if foreign:
    raise RuntimeError(f"tf2onnx could not convert the TFLite ops {', '.join(foreign)}")
  onnx.checker.check_model(model)
  _rename(model.graph, model.graph.input[0].name, "images")
  _rename(model.graph, model.graph.output[0].name, "logits")
  onnx.helper.set_model_props(model, {METADATA: json.dumps(metadata)})
  onnx.save(model, path)


def load_exported(directory: str) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [batch, H, W, 3] -> logits [batch, classes] of an export in `directory`,
  run by its format's own runtime (jax.export, TensorFlow, the TFLite interpreter,
  onnxruntime) without any model code: what a user of the export does."""
  with open(os.path.join(directory, METADATA), encoding="utf-8") as f:
    metadata = json.load(f)
  path = os.path.join(directory, metadata["file"])
  fmt = metadata["format"]
  if fmt == "stablehlo":
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    return lambda images: np.asarray(exported.call(images))
  if fmt == "saved_model":
    import tensorflow as tf
    signature = tf.saved_model.load(path).signatures["serving_default"]
    return lambda images: signature(images=tf.constant(images))["logits"].numpy()
  if fmt == "tflite":
    import tensorflow as tf
    # The signature runner resizes the input tensors to each batch.
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("serving_default")
    return lambda images: runner(images=images)["logits"]
  if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"images": images})[0]
  raise ValueError(f"{METADATA} format={fmt!r}; allowed: {', '.join(FORMATS)}")


def _versions(fmt: str) -> dict:
  import importlib.metadata as md
  names = ["jax", "flax"] + (["tensorflow-cpu"] if fmt != "stablehlo" else []) + (
      ["tf2onnx", "onnx"] if fmt == "onnx" else [])
  out = {}
  for name in names:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def _eval_resize(workdir: str, image_size: int) -> tuple[str, float]:
  """How the eval pipeline brought images to image_size (config.augment.crop and
  eval_crop_fraction, as input_pipeline's eval preprocessing reads them), and the fraction
  of the resized image that its central crop keeps (1.0: the whole image, no crop)."""
  augment = {}
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      augment = json.load(f).get("augment", {})
  fraction = float(augment.get("eval_crop_fraction", 0.875))
  if augment.get("crop") == "inception" and fraction < 1.0:
    side = int(round(image_size / fraction))
    return (f"bilinear resize (antialiased) to {side}x{side}, then a central "
            f"{image_size}x{image_size} crop", fraction)
  return f"bilinear resize (antialiased) to {image_size}x{image_size}", 1.0


def build_metadata(info: dict, fmt: str, *, workdir: str | None = None,
                   run: dict | None = None, platforms=PLATFORMS) -> dict:
  size, classes = int(info["image_size"]), int(info["num_classes"])
  resize, crop_fraction = _eval_resize(workdir or "", size)
  metadata = {
      "format": fmt,
      "file": ARTIFACTS[fmt],
      "input": {"name": "images", "dtype": "uint8", "shape": ["batch", size, size, 3],
                "layout": "NHWC, RGB pixels 0..255",
                "resize": resize, "crop_fraction": crop_fraction},
      "preprocessing": "inside the model: (pixels / 255 - mean) / std",
      "mean": list(info["mean"]), "std": list(info["std"]),
      "output": {"name": "logits", "dtype": "float32", "shape": ["batch", classes]},
      "num_classes": classes, "class_names": info.get("class_names"),
      "image_size": size, "dataset": info.get("dataset"),
      "model": info["model"], "compute_dtype": "float32",
      "versions": _versions(fmt),
  }
  if fmt in ("stablehlo", "saved_model"):
    metadata["platforms"] = list(platforms)
  if run:
    metadata.update(step=run["step"], params=run["params"])
  return metadata


def _check_out(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out={out!r} exists and is not an empty directory; allowed: a "
                          "new or empty directory")


def export_model(model, variables, info: dict, fmt: str, out: str, *,
                 metadata: dict | None = None, platforms=PLATFORMS) -> dict:
  """Exports `model` with `variables` in format `fmt` into the new or empty directory `out`.

  `info` has the fields of a run's model.json that the export needs: image_size,
  num_classes, mean, std, model. Returns the metadata written to out/export.json.
  A model with `scan`, `remat` or `cudnn` attention is exported as its plain equivalent
  (`scan_layout.plain`: the same logits, portable to every platform and converter).
  """
  _check_choice("format", fmt, FORMATS)
  for platform in platforms:
    _check_choice("platforms", platform, PLATFORMS)
  _check_out(out)
  metadata = metadata or build_metadata(info, fmt, platforms=platforms)
  model, variables = scan_layout.plain(model, variables)
  serve = serving_function(model, info["mean"], info["std"])
  size = int(info["image_size"])
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  created = []  # Missing parent folders, deepest first: removed again if the export fails.
  folder = parent
  while not os.path.exists(folder):
    created.append(folder)
    folder = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  try:
    artifact = os.path.join(staging, ARTIFACTS[fmt])
    if fmt == "stablehlo":
      export_stablehlo(serve, variables, size, artifact, platforms)
    elif fmt == "saved_model":
      export_saved_model(serve, variables, size, artifact, platforms)
    else:
      with tempfile.TemporaryDirectory() as scratch:
        # The TFLite converter lowers one platform's computation; CPU is the portable one.
        saved_model = os.path.join(scratch, "saved_model")
        export_saved_model(serve, variables, size, saved_model, ("cpu",))
        tflite = artifact if fmt == "tflite" else os.path.join(scratch, "model.tflite")
        export_tflite(saved_model, tflite)
        if fmt == "onnx":
          export_onnx(tflite, artifact, metadata)
    with open(os.path.join(staging, METADATA), "w", encoding="utf-8") as f:
      json.dump(metadata, f, indent=2)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private.
    if os.path.isdir(out):
      os.rmdir(out)  # Empty (checked above); the rename needs it gone.
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    for folder in created:
      os.rmdir(folder)
    raise
  return metadata


def export(workdir: str, fmt: str, out: str, params: str = "auto", step: int | None = None,
           platforms=PLATFORMS) -> dict:
  """Exports a run's checkpoint (see the module docstring). Returns export.json's content."""
  _check_choice("format", fmt, FORMATS)
  _check_choice("params", params, PARAMS)
  for platform in platforms:
    _check_choice("platforms", platform, PLATFORMS)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir!r} is not a directory; allowed: the workdir "
                            "of a training run")
  _check_out(out)
  info = read_model_info(workdir)
  variables, run = restore_variables(workdir, params, step)
  model = build_model(info["model"], int(info["num_classes"]))
  metadata = build_metadata(info, fmt, workdir=workdir, run=run, platforms=platforms)
  return export_model(model, variables, info, fmt, out, metadata=metadata,
                      platforms=platforms)


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as a program (evaluate
  and predict import it and have flags of the same names)."""
  flags.DEFINE_string("workdir", None, "The training run to export.")
  flags.DEFINE_string("format", None, f"One of {', '.join(FORMATS)}.")
  flags.DEFINE_string("out", None, "A new or empty directory for the export.")
  flags.DEFINE_string("params", "auto", "auto: the EMA parameters where the run has them, "
                      "else the trained ones; ema; raw: the trained ones.")
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
  flags.DEFINE_list("platforms", list(PLATFORMS), "stablehlo and saved_model: the platforms "
                    "the computation is lowered for.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax's and TensorFlow's INFO logs.
    logging.set_verbosity(logging.WARNING)
  for flag in ("workdir", "format", "out"):
    if flags.FLAGS[flag].value is None:
      raise app.UsageError(f"--{flag} is required")
  try:
    args = flags.FLAGS
    metadata = export(args.workdir, args.format, args.out, args.params, args.step,
                      tuple(args.platforms))
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {metadata['step']} ({metadata['params']} parameters) of "
        f"{flags.FLAGS.workdir} as {flags.FLAGS.format} to {flags.FLAGS.out}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
