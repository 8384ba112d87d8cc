"""A researcher's own images: a folder dataset trains through launch.py and evaluates
exactly; bad folders and splits are one-line errors naming what is wrong; `evaluate`
reproduces the trainer's eval of a checkpoint; `predict` classifies files as the eval step
does, with the class names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from efficient_vit import evaluate, export, input_pipeline, predict, train
from efficient_vit.metric_logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("apple", "banana", "cherry")
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
           TF_CPP_MIN_LOG_LEVEL="2")


def write_folder(root, per_split=(("train", 8), ("test", 5)), seed=0) -> list[str]:
  """CIFAR-like images (mostly 32x32, some other sizes) of 3 colour-coded classes, every
  second one PNG, the others JPEG; returns the test files."""
  rng = np.random.default_rng(seed)
  test_files = []
  for split, count in per_split:
    for label, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        side = 32 if i % 3 else 40
        image = rng.integers(0, 120, (side, 32, 3), np.uint8)
        image[..., label] += 135
        png = i % 2 == 1
        path = os.path.join(root, split, name, f"{i}.{'png' if png else 'jpg'}")
        tf.io.write_file(path, tf.io.encode_png(image) if png else tf.io.encode_jpeg(image))
        if split == "test":
          test_files.append(path)
  return test_files


def folder_config(tiny_vit_config, root):
  config = tiny_vit_config
  config.update(dataset=str(root), batch_size=8, eval_batch_size=4)
  return config


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  """A tiny ViT trained 6 steps on a folder dataset through launch.py (evaluated and saved
  at steps 3 and 6, with EMA)."""
  root = tmp_path_factory.mktemp("images")
  test_files = write_folder(root)
  workdir = tmp_path_factory.mktemp("run")
  args = [sys.executable, "launch.py", "--config=configs/vit.py:tiny_cifar10",
          f"--workdir={workdir}", f"--config.dataset={root}", "--config.model.embed_dim=32",
          "--config.model.depth=1", "--config.model.patch_size=8", "--config.model.mlp_dim=64",
          "--config.batch_size=8", "--config.eval_batch_size=4", "--config.num_train_steps=6",
          "--config.optimizer.warmup_steps=0", "--config.optimizer.learning_rate=3e-3",
          "--config.optimizer.ema_decay=0.5", "--config.log_every_steps=3",
          "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3"]
  run = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return {"root": str(root), "workdir": str(workdir), "test_files": test_files,
          "stdout": run.stdout}


def _listing(path) -> list:
  return sorted((os.path.relpath(os.path.join(d, f), path),
                 os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, files in os.walk(path) for f in files)


def test_a_folder_trains_through_launch_and_evaluates_every_test_file(folder_run):
  evals = [r for r in read_metrics(folder_run["workdir"]) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(r["num_examples"] == len(folder_run["test_files"]) == 15 for r in evals)
  # 24 images of 32x32 fit on the devices: the device-resident path took the folder.
  assert "input pipeline device" in folder_run["stdout"]
  model_info = export.read_model_info(folder_run["workdir"])
  assert model_info["class_names"] == list(CLASSES) and model_info["num_classes"] == 3


def test_a_folder_split_reads_through_tf_data_with_slices(tiny_vit_config, tmp_path):
  write_folder(tmp_path, (("train", 4), ("test", 2)))
  config = folder_config(tiny_vit_config, tmp_path)
  config.train_split = "train[:50%]+test"
  info = input_pipeline.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.class_names) == (12, 6, CLASSES)
  batch = next(input_pipeline.train_batches(config))
  assert batch["image"].shape == (8, 32, 32, 3) and set(batch["label"]) <= {0, 1, 2}
  batches = list(input_pipeline.eval_batches(config))
  assert sum(b["mask"].sum() for b in batches) == 6


def _break_missing_split(root):
  return {"eval_split": "validation"}, os.path.join(root, "validation")


def _break_empty_split(root):
  os.makedirs(os.path.join(root, "val", "apple"))
  return {"eval_split": "val"}, os.path.join(root, "val")


def _break_unreadable_file(root):
  path = os.path.join(root, "train", "banana", "broken.jpg")
  with open(path, "w", encoding="utf-8") as f:
    f.write("not an image")
  return {}, path


def _break_no_folder(root):
  return {"dataset": os.path.join(root, "nowhere")}, os.path.join(root, "nowhere")


def _break_no_splits(root):
  empty = os.path.join(root, "empty")
  os.makedirs(empty)
  return {"dataset": empty}, empty


@pytest.mark.parametrize("case", [_break_missing_split, _break_empty_split,
                                  _break_unreadable_file, _break_no_folder, _break_no_splits])
def test_bad_folders_are_one_line_errors_naming_the_path(tiny_vit_config, tmp_path, case):
  root = str(tmp_path / "images")
  write_folder(root, (("train", 2), ("test", 1)))
  config = folder_config(tiny_vit_config, root)
  overrides, path = case(root)
  config.update(overrides)
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert path in message and "\n" not in message and "allowed" in message
  assert not os.path.exists(tmp_path / "run")


@pytest.fixture
def cifar10_metadata(tmp_path):
  """A data_dir whose cifar10 has split sizes (train 50, test 10) and no examples: enough
  for the split checks, which read only the dataset's metadata."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import splits

  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  builder.info.set_splits(splits.SplitDict([
      splits.SplitInfo(name="train", shard_lengths=[50], num_bytes=0),
      splits.SplitInfo(name="test", shard_lengths=[10], num_bytes=0)]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  return str(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("eval_split", "validation", "config.eval_split='validation'; allowed: train, test"),
    ("train_split", "train[:0]", "config.train_split='train[:0]' holds no examples; allowed: "
     "train, test"),
    ("eval_split", "test[:0]", "config.eval_split='test[:0]' holds no examples"),
])
def test_a_split_the_dataset_lacks_is_a_one_line_error(tiny_vit_config, cifar10_metadata,
                                                       field, value, message):
  tiny_vit_config.data_dir = cifar10_metadata
  setattr(tiny_vit_config, field, value)
  with pytest.raises(ValueError) as error:
    input_pipeline.dataset_info(tiny_vit_config)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)
  tiny_vit_config.update(train_split="train[:90%]", eval_split="test[:5]")
  assert input_pipeline.dataset_info(tiny_vit_config).num_train_examples == 45


@pytest.mark.parametrize("step,params,name", [(3, "raw", "eval"), (6, "raw", "eval"),
                                              (6, "ema", "eval_ema")])
def test_evaluate_reproduces_the_trainers_eval_and_writes_nothing(folder_run, step, params,
                                                                  name):
  workdir = folder_run["workdir"]
  before = _listing(workdir)
  result = evaluate.evaluate(workdir, step=step, params=params)
  logged, = [r for r in read_metrics(workdir) if r["step"] == step and r["split"] == name]
  assert {k: result[k] for k in ("loss", "top1", "top5", "num_examples")} == {
      k: logged[k] for k in ("loss", "top1", "top5", "num_examples")}
  assert (result["step"], result["params"], result["split"]) == (step, params, "test")
  assert _listing(workdir) == before


def test_evaluate_refuses_a_missing_workdir_or_step_in_one_line(folder_run, tmp_path):
  with pytest.raises(ValueError) as error:
    evaluate.evaluate(folder_run["workdir"], step=4)
  assert str(error.value) == "--step=4; allowed: 3, 6"
  # The command line says it in one line, exit status 2 (quickly: before JAX is loaded).
  missing = str(tmp_path / "nowhere")
  run = subprocess.run([sys.executable, "-m", "efficient_vit.evaluate", f"--workdir={missing}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert (run.returncode, run.stdout) == (2, "")
  assert run.stderr.strip() == (f"evaluate: error: --workdir={missing!r} is not a directory; "
                                "allowed: the workdir of a training run")


def test_evaluate_command_evaluates_a_slice_and_writes_only_when_asked(folder_run):
  workdir = folder_run["workdir"]
  run = subprocess.run([sys.executable, "-m", "efficient_vit.evaluate", f"--workdir={workdir}",
                        "--split=test[:6]", "--params=raw", "--write"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  printed = json.loads(run.stdout)
  assert (printed["split"], printed["num_examples"], printed["step"]) == ("test[:6]", 6, 6)
  with open(os.path.join(workdir, evaluate.RESULTS), encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [printed]


def _pipeline_images_by_file(config) -> dict:
  """The eval pipeline's preprocessed image of each test file, keyed by its path: the
  split's examples in the order the pipeline reads them, with the files' names beside."""
  builder = input_pipeline._builder(config)
  names = [ex["image/filename"].decode() for ex in builder.as_dataset(
      split=config.eval_split, decoders={"image": input_pipeline.tfds.decode.SkipDecoding()}
  ).as_numpy_iterator()]
  images = np.concatenate([b["image"][b["mask"] > 0]
                           for b in input_pipeline.eval_batches(config)])
  return dict(zip(names, images))


def test_predict_gives_the_eval_steps_classes_with_their_names(folder_run):
  workdir, files = folder_run["workdir"], folder_run["test_files"]
  config = evaluate.run_config(workdir)
  by_file = _pipeline_images_by_file(config)
  # predict's decoding and preprocessing are the eval pipeline's, pixel for pixel...
  classify, names, preprocessing, run = predict.load_run(workdir, params="raw")
  np.testing.assert_array_equal(predict.read_images(files, preprocessing),
                                np.stack([by_file[f] for f in files]))
  results = predict.predict(files, classify, names, preprocessing, top_k=3)
  # ...and its classes are those of the eval step's model on the pipeline's images.
  experiment = train.build(config)
  variables, _ = export.restore_variables(workdir, "raw")
  logits = experiment.model.apply(variables, train.augment.normalise(
      np.stack([by_file[f] for f in files]), *input_pipeline.normalisation(config.dataset)),
                                  train=False)
  assert [r["top"][0]["class"] for r in results] == list(np.argmax(logits, -1))
  assert all(r["top"][0]["name"] == CLASSES[r["top"][0]["class"]] for r in results)
  # The trained run tells the colours apart: the names are the files' folders, and the
  # hits are the eval's top-1 at that step.
  hits = [r["top"][0]["name"] == os.path.basename(os.path.dirname(r["file"])) for r in results]
  logged, = [r for r in read_metrics(workdir) if r["step"] == 6 and r["split"] == "eval"]
  assert sum(hits) == round(logged["top1"] * len(files))
  assert sum(hits) >= 12
  for r in results:
    assert len(r["top"]) == 3 and sum(t["probability"] for t in r["top"]) == pytest.approx(1)


def test_predict_from_the_command_line_and_from_an_export(folder_run, tmp_path):
  workdir, files = folder_run["workdir"], folder_run["test_files"][:4]
  run = subprocess.run([sys.executable, "-m", "efficient_vit.predict", f"--workdir={workdir}",
                        "--json", "--top_k=2", *files], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  from_run = json.loads(run.stdout)
  assert [r["file"] for r in from_run] == files and all(len(r["top"]) == 2 for r in from_run)
  out = str(tmp_path / "export")
  metadata = export.export(workdir, "stablehlo", out, platforms=("cpu",))
  assert metadata["class_names"] == list(CLASSES)
  assert metadata["input"]["crop_fraction"] == 1.0
  from_export = predict.predict(files, *predict.load_export(out)[:3], top_k=2)
  for a, b in zip(from_run, from_export):
    assert [t["name"] for t in a["top"]] == [t["name"] for t in b["top"]]
    assert [t["probability"] for t in a["top"]] == pytest.approx(
        [t["probability"] for t in b["top"]], abs=1e-5)


def test_predict_refuses_a_missing_workdir_in_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "efficient_vit.predict",
                        f"--workdir={tmp_path / 'nowhere'}", "x.png"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 2
  assert run.stderr.strip() == (f"predict: error: --workdir='{tmp_path / 'nowhere'}' is not "
                                "a directory; allowed: the workdir of a training run")


def readme_block(marker: str) -> str:
  """The code block after `<!-- MARKER -->` in README.md."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  tag = f"<!-- {marker} -->"
  assert tag in text, f"no {marker!r} section in README.md"
  block = text.split(tag, 1)[1].split("```", 2)[1]
  return block.split("\n", 1)[1]  # Without the fence's language line.


# Runs a README snippet as its reader would (argv: export dir, files) in a process where JAX
# and this project cannot be imported (TensorFlow imports JAX where it finds it, and copes
# without), then checks that none of them was.
_SERVE = """
import importlib.abc, sys
BLOCKED = ("jax", "jaxlib", "flax", "efficient_vit", "configs")

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"{name} is blocked", name=name)

sys.meta_path.insert(0, Block())
code = sys.argv.pop(1)
exec(compile(code, "README", "exec"), {"__name__": "__main__"})
imported = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not imported, imported
"""


@pytest.mark.parametrize("fmt", ["onnx", "saved_model"])
def test_the_readme_serving_example_runs_without_jax_or_the_project(folder_run, tmp_path, fmt):
  workdir, files = folder_run["workdir"], folder_run["test_files"][::2]
  out = str(tmp_path / fmt)
  export.export(workdir, fmt, out, platforms=("cpu",))
  run = subprocess.run([sys.executable, "-c", _SERVE, readme_block(f"serving: {fmt}"), out,
                        *files], cwd=str(tmp_path), env=dict(ENV, PYTHONPATH=""),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  served = [line.split() for line in run.stdout.strip().splitlines()]
  expected = predict.predict(files, *predict.load_run(workdir)[:3], top_k=1)
  assert [s[0] for s in served] == files
  assert [s[1] for s in served] == [e["top"][0]["name"] for e in expected]
  # Printed to 3 decimals; Pillow's resize (the ONNX example) is not the pipeline's.
  tolerance = 1e-3 if fmt == "saved_model" else 0.05
  assert [float(s[2]) for s in served] == pytest.approx(
      [e["top"][0]["probability"] for e in expected], abs=tolerance)


def test_the_readme_fine_tuning_commands_build(tmp_path):
  """Each launch.py command of the README's fine-tuning section parses, passes every check
  of `train.build` (for a folder of 5 classes) and of the timm layout's model fields, and
  traces at the new resolution and at the checkpoint's (the loading itself is tested with
  small timm files in tests/test_init_from.py)."""
  import jax
  import jax.numpy as jnp
  from absl import flags
  from ml_collections import config_flags

  from efficient_vit import import_weights

  commands = readme_block("fine-tune: commands").replace("\\\n", " ").strip().splitlines()
  assert len(commands) == 2
  for command in commands:
    argv = command.split()
    assert argv[:3] == ["uv", "run", "launch.py"]
    args = ["launch.py"] + _flag_args(argv[3:])
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=args)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(args)
    config = values.config
    checkpoint = tmp_path / os.path.basename(config.init_from.path)
    checkpoint.write_bytes(b"\0" * 16)  # init_from's checks: a file, not empty (not read).
    config.init_from.path = str(checkpoint)
    info = input_pipeline.DatasetInfo(num_classes=5, num_train_examples=2000,
                                      num_eval_examples=500)
    experiment = train.build(config, info)
    import_weights.check_reference_fields(config.init_from.layout, experiment.model, True)
    size, source = config.init_from.image_size, experiment.model
    if config.init_from.layout == "timm_swin":  # At the checkpoint's window (its name's).
      source = source.clone(window_size=7, shift_size=3)
    jax.eval_shape(source.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    assert config.image_size != size


def _flag_args(argv: list[str]) -> list[str]:
  """`--config FILE --x=y ...` as absl parses it: `--config=FILE --x=y ...`."""
  out, rest = [], list(argv)
  while rest:
    arg = rest.pop(0)
    out.append(f"{arg}={rest.pop(0)}" if arg == "--config" else arg)
  return out


@pytest.mark.parametrize("pipeline", ["tfdata", "device"])
def test_a_file_that_fails_to_decode_mid_run_is_named(tiny_vit_config, tmp_path, pipeline):
  """A file with a PNG signature and a broken body passes the start-up check; reading it
  stops the run with a one-line error that names it, on either input path."""
  root = str(tmp_path / "images")
  write_folder(root, (("train", 2), ("test", 1)))
  broken = os.path.join(root, "train", "cherry", "broken.png")
  with open(broken, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + b"x" * 100)
  config = folder_config(tiny_vit_config, root)
  config.update(input_pipeline=pipeline, num_train_steps=1)
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert broken in message and "cannot be decoded" in message and "\n" not in message
