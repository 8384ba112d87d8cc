"""Builds the Keras-example fixtures `tests/fixtures/keras_*.npz` (not run by the tests).

The six Keras examples of keras-team/keras-io `examples/vision/` are not rewritten here:
their source (the `.py`, or the python blocks of the published `md/<name>.md`) is read from
a keras-io checkout at build time and executed as it is, with only

  - hyperparameters changed, and only the example's own top-level variables (the overrides
    in `CASES` below; an override of a name the example does not assign is an error), so
    that the model is small; values derived from them (`num_patches = ...`) follow;
  - statements left out that need the network, train or plot (`load_data`, `fit`,
    `compile`, `plt`, `print`, `tfds`, `tf.data`, ...); the example's
    `data_augmentation.layers[0].adapt(x_train)` runs on a synthetic `x_train`;
  - keyword arguments of the example's own top-level model call changed where the example
    says so (EANet's `get_model(attention_type="self_attention")`);
  - the published code repaired where it does not run with Keras 3.15 (`REPAIRS`: the
    Perceiver's missing `self.patcher` and the renamed `extract_patches(images=...)`),
    each printed and recorded in the fixture when used.

The model is then built by calling it on a batch, every variable gets a new value, and it
is saved the way a user of the example saves it (Keras 3 docs): `model.save_weights(
"<name>.weights.h5")` and `model.save("<name>.keras")`. The saved `.weights.h5` is read
back with h5py and recorded as it comes out: every dataset path (e.g.
`layers/swin_transformer_1/attn/vars/0` for the example's unnamed relative-position bias
table, whose `Variable.path` is `window_attention_1/variable_2`) with its shape and dtype,
in the file's order, and the `Variable` it holds.

To keep fixtures small (MobileViT alone has 1.3 M values), the new values are not stored
but drawn from a fixed generator: variable i of `model.weights` is
`a + b * (2 * u - 1)` with `u = numpy.random.default_rng([SEED, i]).random(shape)` (uniform
in [a - b, a + b]), and the fixture stores (a, b, i) per saved path; the tests regenerate
the arrays (tests/test_fidelity_keras.py). Each regenerated array is checked here against
the value read back from the `.weights.h5` before anything is written. Values that are not
drawn are stored
(`stored/<saved path>`): buffers the example derives from the layout (Swin's
relative-position index and shift mask, Normalization's count, seed-generator states),
Normalization statistics adapted on data, batch-norm statistics set near those of the input
batch (so that the deep MobileViT keeps images apart), and the classifier's kernel, which
gets a part along the directions in which the batch's features differ (so that the logits
and their argmax differ from image to image).

Each file holds:
  meta         JSON: example file and the sha256 of the code executed, Keras version and
               backend, the overrides, repairs, the saved paths in file order with shape,
               dtype and how each value is made, `model.weights` paths in order (Keras'
               `Variable.path`, e.g. `window_attention/variable`), extra tensors;
  stored/...   the stored values (see above), keyed by saved path;
  extra/...    tensors the example's model uses but does not save (the Perceiver's
               Normalization statistics: its `data_augmentation` is a module-level
               Sequential that the model calls but does not track);
  images       the input batch as the example's data pipeline hands it to the model
               (uint8-valued floats for all but Swin, which divides by 255 first);
  model_input  where the model's input is not the image (Swin: the example extracts the
               patches in tf.data, `patch_extract`), what the Keras model was called on;
  logits       the eval-mode output before the last softmax, [batch, classes];
  probabilities  where the example's last Dense has a softmax, its output.
`keras_swin.weights.h5` and `keras_swin.keras` are the files Keras wrote for Swin, kept as
saved, for the reader's tests on files as a user has them.

Run from the repository root, in a throw-away environment outside the repository:

    python3 -m venv /tmp/kerasenv
    /tmp/kerasenv/bin/pip install keras tensorflow-cpu h5py
    KERAS_BACKEND=tensorflow /tmp/kerasenv/bin/python tests/make_reference_fixtures_keras.py \
        --examples KERAS_IO/examples/vision [--only swin]

(measured with Keras 3.15.1, TensorFlow 2.21.0, h5py 3.14.0, one model at a time).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import pathlib
import re
import sys
import tempfile
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
BATCH = 4
SEED = 38

# fixture -> (example file stem, hyperparameter overrides, model expression, call kwargs).
# The model expression is evaluated in the example's namespace after it ran.
CASES = {
    "vit": ("image_classification_with_vision_transformer",
            dict(num_classes=10, input_shape=(24, 24, 3), image_size=24, patch_size=6,
                 projection_dim=16, num_heads=2, transformer_layers=2,
                 mlp_head_units=[32, 16]),
            "vit_classifier", {}),
    "eanet": ("eanet",
              dict(num_classes=10, input_shape=(16, 16, 3), patch_size=2, embedding_dim=32,
                   mlp_dim=32, num_heads=4, num_transformer_blocks=2),
              "model", {}),
    "eanet_self": ("eanet",
                   dict(num_classes=10, input_shape=(16, 16, 3), patch_size=2,
                        embedding_dim=32, mlp_dim=32, num_heads=4, num_transformer_blocks=2),
                   "model", {"get_model": {"attention_type": "self_attention"}}),
    "cct": ("cct",
            # The tokenizer's channels (64, 128) are CCTTokenizer defaults, not
            # hyperparameters: the MLP's last width must stay 128.
            dict(num_classes=10, input_shape=(16, 16, 3), image_size=16, projection_dim=16,
                 transformer_units=[32, 128], transformer_layers=2),
            "cct_model", {}),
    "swin": ("swin_transformers",
             # `layers.Input(shape=(256, 12))` fixes 32 x 32 images in 2 x 2 patches.
             dict(num_classes=10, embed_dim=16, num_heads=2, num_mlp=32),
             "model", {}),
    "mobilevit": ("mobilevit",
                  # Every width is written out in create_mobilevit: only the image shrinks.
                  dict(image_size=64),
                  "mobilevit_xxs", {}),
    "perceiver": ("perceiver_image_classification",
                  dict(num_classes=10, input_shape=(16, 16, 3), image_size=16, patch_size=2,
                       latent_dim=16, projection_dim=32, num_heads=4,
                       num_transformer_blocks=2, num_iterations=2),
                  "perceiver_classifier", {}),
}

# Top-level statements that touch one of these names are left out.
_SKIP_NAMES = {
    "load_data", "to_categorical", "plt", "print", "compile", "fit", "evaluate", "summary",
    "run_experiment", "tfds", "history", "from_tensor_slices", "split", "saved_model",
    "TFLiteConverter", "converter", "open", "environ", "prepare_dataset", "train_dataset",
    "val_dataset", "cardinality", "x_val", "y_val", "x_test",
}
_SKIP_MODULES = {"matplotlib", "matplotlib.pyplot", "tensorflow_datasets", "tensorflow_addons"}

# Where the published code does not run with Keras 3.15: (example stem, text, replacement,
# why). Each text must occur exactly once; every repair used is printed and recorded.
REPAIRS = [
    ("perceiver_image_classification",
     "        self.patch_encoder = PatchEncoder(self.data_dim, self.projection_dim)\n",
     "        self.patcher = Patches(self.patch_size)\n"
     "        self.patch_encoder = PatchEncoder(self.data_dim, self.projection_dim)\n",
     "the published build() (md, last modified 2023/12/30) no longer creates "
     "`self.patcher`, which call() uses: restored as the example's earlier revisions have it"),
    ("perceiver_image_classification",
     "ops.image.extract_patches(\n            image=images,",
     "ops.image.extract_patches(\n            images=images,",
     "keras.ops.image.extract_patches names its first argument `images` (Keras 3.15), "
     "the published call passes `image=`"),
]


def repair(code: str, stem: str) -> tuple[str, list[str]]:
  notes = []
  for _, old, new, why in (r for r in REPAIRS if r[0] == stem):
    if old not in code or new in code:
      continue
    if code.count(old) != 1:
      raise ValueError(f"{stem}: repair text occurs {code.count(old)} times: {old!r}")
    code = code.replace(old, new)
    notes.append(f"repair: {why}")
  return code, notes


def example_code(examples: pathlib.Path, stem: str) -> tuple[str, str]:
  """The example's code: its `.py`, else the python blocks of its published markdown."""
  for path in (examples / f"{stem}.py",):
    if path.exists():
      return path.read_text(), str(path.name)
  for path in (examples / "md" / f"{stem}.md", examples / f"{stem}.md"):
    if path.exists():
      blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)
      return "\n".join(blocks), f"md/{stem}.md"
  raise FileNotFoundError(f"{stem}.py (or md/{stem}.md) not under {examples}")


def _names(node: ast.AST) -> set[str]:
  out = set()
  for sub in ast.walk(node):
    if isinstance(sub, ast.Name):
      out.add(sub.id)
    elif isinstance(sub, ast.Attribute):
      out.add(sub.attr)
  return out


def prepare(code: str, stem: str, overrides: dict, calls: dict,
            case: str = "") -> tuple[ast.Module, list]:
  """The example's module with overrides applied and the skipped statements left out."""
  code, notes = repair(code, stem)
  tree = ast.parse(code)
  body, assigned = [], set()
  for stmt in tree.body:
    if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
      body.append(stmt)
      continue
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
      continue  # prose
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
      mods = {a.name for a in stmt.names} if isinstance(stmt, ast.Import) else {stmt.module}
      if mods & _SKIP_MODULES or mods == {"os"}:
        continue
      body.append(stmt)
      continue
    if _names(stmt) & _SKIP_NAMES:
      continue
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id in overrides):
      name = stmt.targets[0].id
      stmt = ast.copy_location(ast.Assign(
          targets=stmt.targets, value=ast.parse(repr(overrides[name]), mode="eval").body),
          stmt)
      assigned.add(name)
    for sub in ast.walk(stmt):
      if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name)
          and sub.func.id in calls):
        for key, value in calls[sub.func.id].items():
          sub.keywords = [k for k in sub.keywords if k.arg != key]
          sub.keywords.append(ast.keyword(arg=key, value=ast.Constant(value)))
        notes.append(f"call {sub.func.id}(**{calls[sub.func.id]})")
    body.append(stmt)
  missing = set(overrides) - assigned
  if missing:
    raise ValueError(f"{stem}: overrides {sorted(missing)} are not top-level variables of "
                     "the example")
  module = ast.Module(body=body, type_ignores=[])
  ast.fix_missing_locations(module)
  return module, notes


def test_images(rng, size: int) -> np.ndarray:
  """A batch whose images differ in their coarse layout (a 4 x 4 grid of colours) plus
  pixel noise, uint8-valued."""
  coarse = rng.uniform(0, 1, (BATCH, 4, 4, 3))
  coarse = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
  return np.round(255 * (0.7 * coarse + 0.3 * rng.uniform(0, 1, (BATCH, size, size, 3))))


def drawn(shape, a: float, b: float, index: int) -> np.ndarray:
  """The value of variable `index`: uniform in [a - b, a + b] (tests regenerate it)."""
  u = np.random.default_rng([SEED, index]).random(tuple(shape))
  return (a + b * (2.0 * u - 1.0)).astype(np.float32)


def _last_dense(model, classes: int):
  """The classifier: the last Dense (in tracking order) with one unit per class."""
  dense = [l for l in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
           if isinstance(l, keras.layers.Dense) and l.units == classes]
  return dense[-1]


def _capture_input(layer, fn):
  """Runs fn() and returns what `layer` was called on (its last call)."""
  seen = []
  original = layer.call

  def call(x, *args, **kwargs):
    seen.append(keras.ops.convert_to_numpy(x))
    return original(x, *args, **kwargs)

  layer.call = call
  try:
    fn()
  finally:
    layer.call = original
  return seen[-1]


def set_values(model, x: np.ndarray, rng, classes: int) -> dict[str, dict]:
  """Gives every variable a new value; returns {Variable.path: how it was made}."""
  how: dict[str, dict] = {}
  bn_stats = set()
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      bn_stats.update({id(layer.moving_mean), id(layer.moving_variance)})
  for i, w in enumerate(model.weights):
    value = keras.ops.convert_to_numpy(w)
    name = w.path.rsplit("/", 1)[-1]
    if (value.dtype.kind in "iub" or not w.trainable or "seed_generator" in w.path
        or name in ("count", "mean", "variance")):
      how[w.path] = {"stored": True}  # buffers, counters, adapted statistics
      continue
    if name == "kernel" or name == "embeddings":
      shape = value.shape
      if "depthwise" in w.path:
        fan_in = int(np.prod(shape[:2]))
      elif value.ndim == 3 and w.path.split("/")[-2] in ("query", "key", "value"):
        fan_in = shape[0]  # MultiHeadAttention [dim, heads, key_dim]
      elif value.ndim == 3:
        fan_in = shape[0] * shape[1]  # MultiHeadAttention output [heads, key_dim, dim]
      else:
        fan_in = int(np.prod(shape[:-1]))
      a, b = 0.0, float(np.sqrt(3.0 / fan_in)) if name == "kernel" else 0.5
    elif value.ndim == 0:
      a, b = 0.2, 0.1  # the Perceiver's learned attention scale
    else:
      spread = float(value.std())
      a, b = float(value.mean()), (spread if spread > 0 else 0.3)
    w.assign(drawn(value.shape, a, b, i))
    how[w.path] = {"a": a, "b": b, "index": i}
  # Batch-norm statistics near those of this batch, layer after layer.
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      y = _capture_input(layer, lambda: model(x, training=False))
      mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
      layer.moving_mean.assign(mean + 0.2 * np.sqrt(var) * rng.normal(0, 1, mean.shape))
      layer.moving_variance.assign(var * rng.uniform(0.7, 1.3, var.shape))
      how[layer.moving_mean.path] = how[layer.moving_variance.path] = {"stored": True}
  last = _last_dense(model, classes)
  features = _capture_input(last, lambda: model(x, training=False))
  kernel = rng.normal(0, 1, tuple(last.kernel.shape)) / np.sqrt(last.kernel.shape[0])
  mean = features.mean(axis=0)
  mean /= np.linalg.norm(mean) + 1e-6
  centred = features - features.mean(axis=0)
  centred /= np.linalg.norm(centred, axis=1, keepdims=True) + 1e-6
  kernel += 3.0 * centred.T @ rng.normal(0, 1, (len(x), kernel.shape[1]))
  kernel -= np.outer(mean, mean @ kernel)
  last.kernel.assign(kernel.astype(np.float32))
  how[last.kernel.path] = {"stored": True}
  return how


def read_h5(path) -> list[tuple[str, np.ndarray]]:
  out = []
  with h5py.File(path, "r") as f:
    f.visititems(lambda name, obj: out.append((name, obj[()]))
                 if isinstance(obj, h5py.Dataset) else None)
  return out


def build(name: str, examples: pathlib.Path) -> None:
  stem, overrides, expression, calls = CASES[name]
  code, source_name = example_code(examples, stem)
  module, notes = prepare(code, stem, overrides, calls, name)
  executed = ast.unparse(module)
  rng = np.random.default_rng(1000 + list(CASES).index(name))
  keras.backend.clear_session()
  keras.utils.set_random_seed(SEED)
  shape = overrides.get("input_shape", (32, 32, 3))
  if stem == "mobilevit":
    shape = (overrides["image_size"],) * 2 + (3,)
  namespace = {"__name__": f"keras_example_{stem}",
               # what the example's adapt() sees instead of the training set
               "x_train": rng.uniform(0, 255, (32,) + tuple(shape)).astype("float32")}
  exec(compile(module, source_name, "exec"), namespace)  # pylint: disable=exec-used
  model = eval(expression, namespace)  # pylint: disable=eval-used
  images = test_images(rng, shape[0]).astype("float32")
  model_input = images
  if name == "swin":
    images = images / 255.0  # the example's x_train / 255.0
    model_input = keras.ops.convert_to_numpy(namespace["patch_extract"](images)).astype(
        "float32")
  model(model_input, training=False)  # builds every layer
  outputs = keras.ops.convert_to_numpy(model(model_input, training=False))
  classes = outputs.shape[-1]
  how = set_values(model, model_input, rng, classes)
  outputs = keras.ops.convert_to_numpy(model(model_input, training=False))
  weight_paths = [w.path for w in model.weights]
  with tempfile.TemporaryDirectory() as tmp:
    h5_path = pathlib.Path(tmp) / f"{name}.weights.h5"
    model.save_weights(h5_path)
    saved = read_h5(h5_path)
    keras_file = None
    try:
      model.save(pathlib.Path(tmp) / f"{name}.keras")
      with zipfile.ZipFile(pathlib.Path(tmp) / f"{name}.keras") as z:
        keras_file = sorted(z.namelist())
    except Exception as e:  # pylint: disable=broad-except
      keras_file = f"model.save failed: {type(e).__name__}: {e}"
    if name == "swin":  # the files as Keras wrote them, for the reader's tests
      (FIXTURES / "keras_swin.weights.h5").write_bytes(h5_path.read_bytes())
      (FIXTURES / "keras_swin.keras").write_bytes(
          (pathlib.Path(tmp) / f"{name}.keras").read_bytes())
  # Which Variable each saved dataset holds: the values are all different (drawn from
  # distinct streams), buffers are matched by value and shape in order.
  values = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
  free = list(values)
  records, arrays = [], {}
  for path, value in saved:
    match = next((p for p in free if values[p].shape == value.shape
                  and values[p].dtype == value.dtype and np.array_equal(values[p], value)),
                 None)
    if match is None:
      raise RuntimeError(f"{name}: saved {path} {value.shape} matches no model variable")
    free.remove(match)
    record = {"path": path, "shape": list(value.shape), "dtype": str(value.dtype),
              "variable": match}
    made = how[match]
    if made.get("stored"):
      arrays[f"stored/{path}"] = value
      record["stored"] = True
    else:
      regenerated = drawn(value.shape, made["a"], made["b"], made["index"])
      if not np.array_equal(regenerated, value):
        raise RuntimeError(f"{name}: {path} is not the drawn value")
      record.update(a=made["a"], b=made["b"], index=made["index"])
    records.append(record)
  if free:
    raise RuntimeError(f"{name}: variables not in the saved file: {free}")
  extra = {}
  if name == "perceiver":  # the module-level data_augmentation's Normalization
    norm = namespace["data_augmentation"].layers[0]
    extra = {"normalization_mean": keras.ops.convert_to_numpy(norm.mean),
             "normalization_variance": keras.ops.convert_to_numpy(norm.variance)}
  last = _last_dense(model, classes)
  if last.activation is keras.activations.softmax:
    arrays["probabilities"] = outputs
    last.activation = keras.activations.linear
    outputs = keras.ops.convert_to_numpy(model(model_input, training=False))
  meta = {"example": f"keras-io examples/vision/{source_name}",
          "code_sha256": hashlib.sha256(executed.encode()).hexdigest(),
          "keras": keras.__version__, "backend": keras.backend.backend(),
          "overrides": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in overrides.items()},
          "notes": notes, "saved": records, "model_weights": weight_paths,
          "keras_file": keras_file, "extra": sorted(extra)}
  for key, value in extra.items():
    arrays[f"extra/{key}"] = np.asarray(value)
  arrays["images"] = images.astype("float32")
  if model_input is not images:
    arrays["model_input"] = model_input
  arrays["logits"] = outputs.astype("float32")
  arrays["meta"] = np.asarray(json.dumps(meta))
  path = FIXTURES / f"keras_{name}.npz"
  np.savez_compressed(path, **arrays)
  print(f"{path.name}: {len(records)} saved datasets, "
        f"{sum(int(np.prod(r['shape'])) for r in records)} values, "
        f"{path.stat().st_size / 1024:.0f} KB, logits std {outputs.std():.3f}, "
        f"argmax {outputs.argmax(-1).tolist()}; {'; '.join(notes) or 'as published'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", required=True, type=pathlib.Path,
                      help="keras-io's examples/vision folder")
  parser.add_argument("--only", choices=list(CASES), action="append")
  args = parser.parse_args()
  FIXTURES.mkdir(exist_ok=True)
  for name in args.only or CASES:
    build(name, args.examples)


if __name__ == "__main__":
  sys.exit(main())
