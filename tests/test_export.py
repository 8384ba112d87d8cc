"""Export (efficient_vit/export.py): every family in every format, reloaded in a fresh
process without model code, gives the JAX model's logits at two batch sizes; a run's workdir
exports its EMA parameters unless told otherwise; bad requests write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_vit import export
from efficient_vit.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SIZES = (2, 5)
NUM_CLASSES = 10
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# Each family's preset with only its sizes made small (other fields stay the preset's).
FAMILIES = {
    "vit": ("vit", "tiny_cifar10",
            dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)),
    "perceiver": ("perceiver", "tiny_cifar10",
                  dict(patch_size=4, input_embedding_dim=32, num_latents=8, latent_dim=32,
                       latent_depth=1, latent_heads=2, mlp_dim=32)),
    "eanet": ("eanet", "keras",
              dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=32)),
    "cct": ("cct", "keras", dict(conv_channels=16, embed_dim=32, depth=1, num_heads=2,
                                 head_dim=16, mlp_dim=32)),
    # Two blocks: the second has the cyclic shift and its window mask.
    "swin": ("swin", "keras", dict(patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,))),
    # One MV2 block and one MobileViT block, batch norm included.
    "mobilevit": ("mobilevit", "cifar10",
                  dict(stem_channels=8, stage_channels=(16,), strides=(2, 2), mv2_depths=(),
                       embed_dims=(16,), transformer_depths=(1,), mlp_dims=(32,),
                       last_channels=32, num_heads=2)),
}


def family_config(family: str):
  import importlib
  module, preset, sizes = FAMILIES[family]
  config = importlib.import_module(f"configs.{module}").get_config(preset)
  config.model.update(sizes)
  return config


def random_variables(model, image_size: int, seed: int) -> dict:
  """Variables drawn with numpy (no init compile); batch statistics away from 0 and 1 so
  that folding them in is tested."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim >= 2 else 0.2
    value = scale * rng.normal(size=leaf.shape)
    return (value + ("'scale'" in name)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(batch: int, seed: int = 0) -> np.ndarray:
  """Random pixels; a smaller batch is the start of a larger one (same seed)."""
  pixels = np.random.default_rng(seed).integers(0, 256, (max(BATCH_SIZES), 32, 32, 3), np.uint8)
  return pixels[:batch]


def eval_logits(model, variables, pixels, mean, std):
  """The model's eval-mode logits on uint8 pixels, normalised as the input pipeline does;
  the reference, written apart from the export's own serving function."""
  x = (jnp.asarray(pixels, jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
  return model.apply(variables, x, train=False)


def reload_in_fresh_process(directories: list[str], out: str) -> None:
  """Runs every export in `directories` on both batch sizes in one new Python process that
  imports no model module; the logits go to `out` (.npz, keys `{index}_{batch}`)."""
  script = f"""
import sys, numpy as np
from efficient_vit import export
dirs, out = {directories!r}, {out!r}
results = {{}}
for i, d in enumerate(dirs):
  run = export.load_exported(d)
  for b in {BATCH_SIZES!r}:
    results[f"{{i}}_{{b}}"] = run(np.load(f"{{out}}.in_{{b}}.npy"))
loaded = [m for m in sys.modules if m.startswith("efficient_vit.models.")]
assert not loaded, loaded
np.savez(out, **results)
"""
  for b in BATCH_SIZES:
    np.save(f"{out}.in_{b}.npy", images(b))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-5000:]


@pytest.fixture(scope="module")
def families():
  """Each family's model, variables, model.json-like info and reference logits."""
  out = {}
  for i, family in enumerate(FAMILIES):
    config = family_config(family)
    model = build_model(config.model, NUM_CLASSES)
    variables = random_variables(model, config.image_size, seed=i)
    # One compile: eval mode is per example, so a smaller batch's logits are the first rows.
    logits = np.asarray(jax.jit(eval_logits, static_argnums=0)(
        model, variables, images(max(BATCH_SIZES)), MEAN, STD))
    reference = {b: logits[:b] for b in BATCH_SIZES}
    info = {"model": config.model.to_dict(), "num_classes": NUM_CLASSES,
            "image_size": config.image_size, "dataset": "cifar10", "mean": MEAN, "std": STD}
    out[family] = (model, variables, info, reference)
  return out


@pytest.fixture(scope="module")
def reloaded(families, tmp_path_factory):
  """{(format, family): logits per batch size, or the export's exception}: every family
  exported in every format, then all reloaded in one fresh process (one TensorFlow
  import instead of four)."""
  root = tmp_path_factory.mktemp("exports")
  results, directories = {}, []
  for fmt in export.FORMATS:
    for family, (model, variables, info, _) in families.items():
      directory = str(root / fmt / family)
      try:
        metadata = export.export_model(model, variables, info, fmt, directory,
                                       platforms=("cpu",))
      except Exception as e:  # Reported by the format's test.
        results[fmt, family] = e
        continue
      assert metadata["input"]["shape"] == ["batch", 32, 32, 3]
      assert metadata["mean"] == list(MEAN) and metadata["std"] == list(STD)
      directories.append((fmt, family, directory))
  reload_in_fresh_process([d for *_, d in directories], str(root / "logits.npz"))
  logits = np.load(root / "logits.npz")
  for i, (fmt, family, _) in enumerate(directories):
    results[fmt, family] = {b: logits[f"{i}_{b}"] for b in BATCH_SIZES}
  return results


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_every_family_exports_and_reloads_to_the_same_logits(families, reloaded, fmt):
  for family, (*_, reference) in families.items():
    got = reloaded[fmt, family]
    if isinstance(got, Exception):
      raise AssertionError(f"{family} did not export as {fmt}") from got
    for b in BATCH_SIZES:
      assert got[b].shape == (b, NUM_CLASSES), (family, got[b].shape)
      # The reference is not degenerate: the examples' logits differ.
      assert np.ptp(reference[b], axis=0).max() > 1e-2, family
      np.testing.assert_allclose(got[b], reference[b], rtol=1e-4, atol=1e-4,
                                 err_msg=f"{family} {fmt} batch {b}")


def test_stablehlo_export_keeps_every_requested_platform(families, tmp_path):
  model, variables, info, _ = families["vit"]
  export.export_model(model, variables, info, "stablehlo", str(tmp_path / "e"))
  with open(tmp_path / "e" / "model.stablehlo", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.platforms == export.PLATFORMS
  assert str(exported.in_avals[0].shape[0]) == "batch"


# A run's workdir, made by the trainer.


def _train(workdir, ema_decay: float, steps: int) -> None:
  import tensorflow_datasets as tfds

  from efficient_vit import train
  config = family_config("vit")
  config.update(batch_size=8, eval_batch_size=8, log_every_steps=1, num_train_steps=steps,
                checkpoint_every_steps=steps, eval_every_steps=1000, shuffle_buffer=16)
  config.optimizer.update(warmup_steps=0, schedule="constant", learning_rate=1e-2,
                          ema_decay=ema_decay)
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(config, str(workdir))


def _checkpoint(workdir, step: int) -> dict:
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.abspath(workdir / "checkpoints")) as manager:
    return manager.restore(step)["train"]["state"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ema_run")
  _train(workdir, ema_decay=0.5, steps=2)
  return workdir


def _exported_logits(directory, x):
  return export.load_exported(str(directory))(x)


def _jax_logits(workdir, params, x):
  with open(workdir / "model.json", encoding="utf-8") as f:
    info = json.load(f)
  model = build_model(info["model"], info["num_classes"])
  return np.asarray(eval_logits(model, {"params": params}, x, info["mean"], info["std"]))


def test_workdir_exports_ema_parameters_unless_told_otherwise(ema_run, tmp_path):
  state = _checkpoint(ema_run, 2)
  x = images(3)
  ema, raw = (_jax_logits(ema_run, state[k], x) for k in ("ema_params", "params"))
  assert np.abs(ema - raw).max() > 1e-3  # The two parameter sets give different logits.

  default = export.export(str(ema_run), "stablehlo", str(tmp_path / "default"))
  assert (default["params"], default["step"]) == ("ema", 2)
  np.testing.assert_allclose(_exported_logits(tmp_path / "default", x), ema,
                             rtol=1e-4, atol=1e-4)
  told = export.export(str(ema_run), "stablehlo", str(tmp_path / "raw"), params="raw")
  assert told["params"] == "raw"
  np.testing.assert_allclose(_exported_logits(tmp_path / "raw", x), raw, rtol=1e-4, atol=1e-4)


def test_command_line_exports_a_run(ema_run, tmp_path):
  out = tmp_path / "cli"
  done = subprocess.run(
      [sys.executable, "-m", "efficient_vit.export", f"--workdir={ema_run}",
       "--format=stablehlo", f"--out={out}", "--platforms=cpu"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=""))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "exported step 2 (ema parameters)" in done.stdout
  with open(out / "export.json", encoding="utf-8") as f:
    metadata = json.load(f)
  assert metadata["format"] == "stablehlo" and metadata["params"] == "ema"
  assert "bilinear" in metadata["input"]["resize"]
  assert sorted(os.listdir(out)) == ["export.json", "model.stablehlo"]


def test_workdir_without_ema_exports_the_trained_parameters(tmp_path):
  _train(tmp_path / "run", ema_decay=0.0, steps=1)
  with pytest.raises(ValueError, match=r"--params=ema but the run .* kept no EMA"):
    export.export(str(tmp_path / "run"), "stablehlo", str(tmp_path / "ema"), params="ema")
  assert not (tmp_path / "ema").exists()
  metadata = export.export(str(tmp_path / "run"), "stablehlo", str(tmp_path / "out"))
  assert metadata["params"] == "raw"
  x = images(2)
  np.testing.assert_allclose(_exported_logits(tmp_path / "out", x),
                             _jax_logits(tmp_path / "run", _checkpoint(tmp_path / "run", 1)[
                                 "params"], x), rtol=1e-4, atol=1e-4)


# Bad requests: a clear error, nothing written.


def _listing(path) -> list:
  return sorted(os.path.relpath(os.path.join(d, f), path)
                for d, dirs, files in os.walk(path) for f in dirs + files)


def test_a_run_without_checkpoint_is_an_error_that_writes_nothing(ema_run, tmp_path):
  workdir = tmp_path / "fresh"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "model.json").write_text((ema_run / "model.json").read_text())
  before = _listing(tmp_path)
  with pytest.raises(FileNotFoundError, match="has no checkpoint"):
    export.export(str(workdir), "onnx", str(tmp_path / "out"))
  # The same through the command line: exit status 2 and the message.
  done = subprocess.run(
      [sys.executable, "-m", "efficient_vit.export", f"--workdir={workdir}", "--format=onnx",
       f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS=""))
  assert done.returncode == 2 and "has no checkpoint" in done.stderr, done.stderr[-2000:]
  assert _listing(tmp_path) == before
  with pytest.raises(FileNotFoundError, match="has no model.json"):
    export.export(str(tmp_path), "onnx", str(tmp_path / "out"))


def test_a_non_empty_out_directory_is_an_error_that_writes_nothing(ema_run, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  before = _listing(tmp_path)
  with pytest.raises(FileExistsError, match=r"--out=.* exists and is not an empty directory"):
    export.export(str(ema_run), "stablehlo", str(tmp_path / "out"))
  assert _listing(tmp_path) == before
  # An empty one is fine.
  (tmp_path / "empty").mkdir()
  export.export(str(ema_run), "stablehlo", str(tmp_path / "empty"))
  assert sorted(os.listdir(tmp_path / "empty")) == ["export.json", "model.stablehlo"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(fmt="onnxx"), r"--format='onnxx'; allowed: stablehlo, saved_model, tflite, onnx"),
    (dict(params="best"), r"--params='best'; allowed: auto, ema, raw"),
    (dict(step=7), r"--step=7; allowed: 2"),
    (dict(platforms=("cpu", "rocm")), r"--platforms='rocm'; allowed: cpu, cuda, tpu"),
])
def test_bad_arguments_are_errors_that_write_nothing(ema_run, tmp_path, kwargs, message):
  args = dict(workdir=str(ema_run), fmt="stablehlo", out=str(tmp_path / "out"))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    export.export(**args)
  assert os.listdir(tmp_path) == []


def test_a_failed_conversion_leaves_nothing_behind(ema_run, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise RuntimeError("converter failed")

  monkeypatch.setattr(export, "export_stablehlo", fail)
  with pytest.raises(RuntimeError, match="converter failed"):
    export.export(str(ema_run), "stablehlo", str(tmp_path / "new" / "parent" / "out"))
  assert os.listdir(tmp_path) == []
