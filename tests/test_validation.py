"""Bad input is refused in one line naming the field, before anything starts.

The table runs through `validation.validate` in this process (what launch.py runs right
after flag parsing, before JAX is imported); a few rows run through a real `launch.py`,
showing the whole path: one line on stderr, no traceback, exit status 2, nothing written,
within the issue's time. Rows that only the dataset or the devices can refuse run through
`train.train_and_evaluate` and the launcher's one-line formatting.
"""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds

from configs import cct, eanet, mobilevit, perceiver, swin, vit
from efficient_vit import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"vit": (vit, "tiny_cifar10"), "eanet": (eanet, "keras"), "cct": (cct, "keras"),
           "swin": (swin, "keras"), "mobilevit": (mobilevit, "cifar10"),
           "mobilevit_keras": (mobilevit, "keras"), "perceiver": (perceiver, "keras")}
NAN, INF = float("nan"), float("inf")

# (preset, overrides, the field the error must name). One row per bad value; the rows
# listed in issue 39 come first.
ROWS = [
    ("vit", {"optimizer.weight_decay": -0.1}, "optimizer.weight_decay"),
    ("vit", {"optimizer.label_smoothing": 1.5}, "optimizer.label_smoothing"),
    ("vit", {"optimizer.b2": 1.5}, "optimizer.b2"),
    ("vit", {"optimizer.warmup_steps": -5}, "optimizer.warmup_steps"),
    ("vit", {"optimizer.name": "sgd", "optimizer.momentum": -1.0}, "optimizer.momentum"),
    ("vit", {"optimizer.grad_clip_norm": -1.0}, "optimizer.grad_clip_norm"),
    ("vit", {"model.dropout_rate": 1.5}, "model.dropout_rate"),
    ("vit", {"model.depth": -1}, "model.depth"),
    ("mobilevit", {"image_size": 33}, "image_size"),
    ("vit", {"augment.crop": "resize", "augment.resize_size": 8}, "augment.resize_size"),
    ("vit", {"shuffle_buffer": -1}, "shuffle_buffer"),
    ("vit", {"model.num_heads": 0}, "model.num_heads"),
    ("vit", {"model.patch_size": 0}, "model.patch_size"),
    ("vit", {"model.embed_dim": 0}, "model.embed_dim"),
    ("vit", {"model.mlp_dim": -1}, "model.mlp_dim"),
    ("vit", {"optimizer.decay_factor": -1.0}, "optimizer.decay_factor"),
    ("vit", {"train_split": "train[:0]"}, "train_split"),
    ("vit", {"eval_split": "test[:0]"}, "eval_split"),
    ("vit", {"optimizer.learning_rate": 1e39}, "optimizer.learning_rate"),
    # The contract's other fields.
    ("vit", {"batch_size": 0}, "batch_size"),
    ("vit", {"image_size": 0}, "image_size"),
    ("vit", {"eval_batch_size": 0}, "eval_batch_size"),
    ("vit", {"num_epochs": 0.0, "num_train_steps": -1}, "num_epochs"),
    ("vit", {"num_train_steps": 0}, "num_train_steps"),
    ("vit", {"eval_every_steps": 0}, "eval_every_steps"),
    ("vit", {"checkpoint_every_steps": 0}, "checkpoint_every_steps"),
    ("vit", {"keep_checkpoints": 0}, "keep_checkpoints"),
    ("vit", {"log_every_steps": -1}, "log_every_steps"),
    ("vit", {"seed": -1}, "seed"),
    ("vit", {"parallelism": "pjit"}, "parallelism"),
    ("vit", {"dtype": "float16"}, "dtype"),
    ("vit", {"nonfinite": "ignore"}, "nonfinite"),
    ("vit", {"input_pipeline": "gpu"}, "input_pipeline"),
    ("vit", {"eval_split": "test[60%:10%]"}, "eval_split"),
    ("vit", {"dataset": ""}, "dataset"),
    ("vit", {"download": "yes"}, "download"),
    ("vit", {"augment.crop": "center"}, "augment.crop"),
    ("vit", {"augment.crop_padding": -1}, "augment.crop_padding"),
    ("vit", {"augment.zoom": 1.0}, "augment.zoom"),
    ("vit", {"augment.rotation": -1.0}, "augment.rotation"),
    ("vit", {"augment.contrast": 1.5}, "augment.contrast"),
    ("vit", {"augment.crop_scale": (0.5, 0.1)}, "augment.crop_scale"),
    ("vit", {"augment.eval_crop_fraction": 0.0}, "augment.eval_crop_fraction"),
    ("vit", {"augment.randaugment_num_ops": -1}, "augment.randaugment_num_ops"),
    ("vit", {"augment.randaugment_magnitude": 11.0}, "augment.randaugment_magnitude"),
    ("vit", {"augment.autoaugment": "imagenet"}, "augment.autoaugment"),
    ("vit", {"augment.autoaugment": "cifar10", "augment.randaugment_num_ops": 2},
     "augment.autoaugment"),
    ("vit", {"augment.random_erasing_prob": 1.5}, "augment.random_erasing_prob"),
    ("vit", {"augment.random_erasing_mode": "zero"}, "augment.random_erasing_mode"),
    ("vit", {"augment.mixup_alpha": -0.2}, "augment.mixup_alpha"),
    ("vit", {"augment.cutmix_alpha": NAN}, "augment.cutmix_alpha"),
    ("vit", {"augment.mix_prob": 2.0}, "augment.mix_prob"),
    ("vit", {"augment.mixup_alpha": 0.2, "batch_size": 7}, "batch_size"),
    ("vit", {"augment.flip": "yes"}, "augment.flip"),
    ("vit", {"optimizer.learning_rate": -1e-3}, "optimizer.learning_rate"),
    ("vit", {"optimizer.learning_rate": NAN}, "optimizer.learning_rate"),
    ("vit", {"optimizer.b1": 1.0}, "optimizer.b1"),
    ("vit", {"optimizer.ema_decay": 1.0}, "optimizer.ema_decay"),
    ("vit", {"optimizer.grad_accum_steps": 0}, "optimizer.grad_accum_steps"),
    ("vit", {"optimizer.min_learning_rate": 0.01}, "optimizer.min_learning_rate"),
    ("vit", {"optimizer.schedule": "linear"}, "optimizer.schedule"),
    ("vit", {"optimizer.name": "adam"}, "optimizer.name"),
    ("vit", {"optimizer.warmup_steps": 100, "num_train_steps": 50}, "optimizer.warmup_steps"),
    ("vit", {"optimizer.decay_epochs": (-1.0,)}, "optimizer.decay_epochs"),
    ("vit", {"optimizer.warmup_epochs": INF}, "optimizer.warmup_epochs"),
    ("vit", {"init_from.layout": "keras"}, "init_from.layout"),
    ("vit", {"init_from.layout": "timm_vit", "init_from.path": "no/such/file.npz"},
     "init_from.path"),
    ("vit", {"init_from.path": "no/such/workdir"}, "init_from.path"),
    ("vit", {"init_from.image_size": 0}, "init_from.image_size"),
    # ViT.
    ("vit", {"model.depth": 0}, "model.depth"),
    ("vit", {"model.depth": 1.5}, "model.depth"),
    ("vit", {"model.patch_size": 5}, "model.patch_size"),
    ("vit", {"model.num_heads": 3}, "model.num_heads"),
    ("vit", {"model.attention_dropout_rate": -0.1}, "model.attention_dropout_rate"),
    ("vit", {"model.drop_path_rate": 1.0}, "model.drop_path_rate"),
    ("vit", {"model.pooling": "max"}, "model.pooling"),
    ("vit", {"model.fc_norm": True, "model.pooling": "cls"}, "model.fc_norm"),
    ("vit", {"model.mlp_activation": "swish"}, "model.mlp_activation"),
    ("vit", {"model.remat": "all"}, "model.remat"),
    ("vit", {"model.attention_impl": "flash"}, "model.attention_impl"),
    ("vit", {"model.head_hidden_dims": (0,)}, "model.head_hidden_dims"),
    ("vit", {"model.norm_epsilon": 0.0}, "model.norm_epsilon"),
    ("vit", {"model.name": "resnet"}, "model.name"),
    ("vit", {"model.scan": "yes"}, "model.scan"),
    # EANet.
    ("eanet", {"model.dim_coefficient": 0}, "model.dim_coefficient"),
    ("eanet", {"model.memory_units": 0}, "model.memory_units"),
    ("eanet", {"model.attention": "linear"}, "model.attention"),
    ("eanet", {"model.num_heads": 5}, "model.num_heads"),
    ("eanet", {"model.dim_coefficient": 1000}, "model.dim_coefficient"),
    # CCT.
    ("cct", {"model.num_conv_layers": 0}, "model.num_conv_layers"),
    ("cct", {"model.num_conv_layers": 6, "model.conv_padding": 0}, "model.num_conv_layers"),
    ("cct", {"model.tokenizer": "pixel"}, "model.tokenizer"),
    ("cct", {"model.conv_stride": 0}, "model.conv_stride"),
    ("cct", {"model.position_embedding": "rope"}, "model.position_embedding"),
    ("cct", {"model.block_form": "post_norm"}, "model.block_form"),
    ("cct", {"model.tokenizer": "patch", "model.patch_size": 5}, "model.patch_size"),
    # Swin.
    ("swin", {"model.window_size": 0}, "model.window_size"),
    ("swin", {"model.depths": (2, 2)}, "model.num_heads"),
    ("swin", {"model.shift_size": 2}, "model.shift_size"),
    ("swin", {"model.mlp_ratio": 0.0}, "model.mlp_ratio"),
    ("swin", {"model.num_heads": (5,)}, "model.num_heads"),
    ("swin", {"image_size": 36, "model.window_size": 4}, "model.window_size"),
    ("swin", {"image_size": 34, "model.window_size": 17}, "image_size"),
    # MobileViT.
    ("mobilevit", {"model.strides": (1, 1, 3, 2, 2, 1)}, "model.strides"),
    ("mobilevit", {"model.embed_dims": (64, 80)}, "model.transformer_depths"),
    ("mobilevit", {"model.num_heads": 3}, "model.num_heads"),
    ("mobilevit", {"model.variant": "tiny"}, "model.variant"),
    ("mobilevit", {"model.patch_size": 0}, "model.patch_size"),
    ("mobilevit_keras", {"model.conv_padding": "valid"}, "model.conv_padding"),
    ("mobilevit_keras", {"model.depthwise_padding": "valid"}, "model.depthwise_padding"),
    # Perceiver.
    ("perceiver", {"model.latent_heads": 5, "model.latent_head_dim": None},
     "model.latent_heads"),
    ("perceiver", {"model.num_latents": 0}, "model.num_latents"),
    ("perceiver", {"model.num_iterations": 0}, "model.num_iterations"),
    ("perceiver", {"model.share_weights": "sometimes"}, "model.share_weights"),
    ("perceiver", {"model.position_encoding": "rope"}, "model.position_encoding"),
    ("perceiver", {"model.cross_attention_heads": 3, "model.cross_attention_width": 10},
     "model.cross_attention_heads"),
]


def _config(preset: str, overrides: dict) -> dict:
  """The preset as a plain nested dict with `overrides` set: any value of any type, as a
  config file could write it (ConfigDict would refuse some types itself)."""
  module, name = PRESETS[preset]
  config = copy.deepcopy(module.get_config(name).to_dict())
  for field, value in overrides.items():
    *parents, last = field.split(".")
    target = config
    for part in parents:
      target = target[part]
    target[last] = value
  return config


def test_the_table_has_at_least_60_rows():
  assert len(ROWS) >= 60
  assert len({(p, tuple(o.items())) for p, o, _ in ROWS}) == len(ROWS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_passes(preset):
  validation.validate(_config(preset, {}))


@pytest.mark.parametrize("preset,overrides,field", ROWS,
                         ids=[f"{p}:{','.join(f'{k}={v}' for k, v in o.items())}"
                              for p, o, _ in ROWS])
def test_a_bad_value_is_refused_naming_its_field(preset, overrides, field):
  config = _config(preset, overrides)
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  line = validation.one_line(error.value)
  assert error.value.field == field, line
  assert line.startswith(f"config error: {field}=") and "; allowed: " in line, line
  assert "\n" not in line


def test_infinity_in_float32_is_not_finite():
  """1e39 is a finite Python float but inf in the float32 train step."""
  validation.validate(_config("vit", {"optimizer.learning_rate": 3e38}))
  for value in (1e39, INF, -INF, NAN):
    with pytest.raises(validation.ConfigError, match="learning_rate"):
      validation.validate(_config("vit", {"optimizer.learning_rate": value}))


@pytest.mark.parametrize("split,empty", [
    ("train[:0]", True), ("train[:0%]", True), ("test[5:5]", True), ("test[60%:40%]", True),
    ("train[:0]+test[:0]", True), ("train", False), ("train[:10%]", False),
    ("train[10:20]", False), ("train[:0]+test", False), ("train[-10:]", False),
    ("train[5:-5]", False), ("train[:1shard]", False), ("train[10:20%]", False)])
def test_empty_split(split, empty):
  assert validation.empty_split(split) == empty


def test_file_problems(tmp_path):
  pointer = tmp_path / "vit.safetensors"
  pointer.write_text("version https://git-lfs.github.com/spec/v1\n"
                     "oid sha256:4d7a2146\nsize 88000000\n")
  (tmp_path / "empty.npz").write_bytes(b"")
  assert "git-lfs pointer" in validation.file_problem(str(pointer))
  assert "empty" in validation.file_problem(str(tmp_path / "empty.npz"))
  assert "no such file" in validation.file_problem(str(tmp_path / "missing.npz"))
  assert "not a file" in validation.file_problem(str(tmp_path))
  (tmp_path / "ok.npz").write_bytes(b"PK\x03\x04")
  assert validation.file_problem(str(tmp_path / "ok.npz")) is None
  config = _config("vit", {"init_from.layout": "timm_vit", "init_from.path": str(pointer)})
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  assert f"init_from.path='{pointer}'" in str(error.value)
  assert "git-lfs pointer" in str(error.value)
  config = _config("vit", {"data_dir": str(pointer)})
  with pytest.raises(validation.ConfigError, match="config.data_dir="):
    validation.validate(config)


def test_the_copied_choices_and_defaults_equal_the_modules():
  """validation.py holds copies so as to import no JAX: they must not drift."""
  from efficient_vit import augment, init_from, layers, optim, train
  from efficient_vit.models import REGISTRY, model_class
  from efficient_vit.models import cct as cct_model
  from efficient_vit.models import eanet as eanet_model
  from efficient_vit.models import mobilevit as mobilevit_model
  from efficient_vit.models import perceiver as perceiver_model
  from efficient_vit.models import vit as vit_model

  originals = {
      "input_pipeline": train.INPUT_PIPELINES, "parallelism": train.PARALLELISMS,
      "dtype": tuple(train.DTYPES), "nonfinite": train.NONFINITE,
      "augment.crop": augment.CROPS, "augment.autoaugment": augment.AUTOAUGMENT_POLICIES,
      "augment.random_erasing_mode": augment.ERASING_MODES,
      "init_from.layout": init_from.LAYOUTS, "optimizer.name": optim.OPTIMIZERS,
      "optimizer.schedule": optim.SCHEDULES, "model.name": tuple(sorted(REGISTRY)),
      "model.attention_impl": layers.ATTENTION_IMPLS,
      "model.mlp_activation": tuple(layers.ACTIVATIONS), "vit.pooling": vit_model.POOLINGS,
      "eanet.attention": eanet_model.ATTENTIONS, "cct.tokenizer": cct_model.TOKENIZERS,
      "cct.pooling": cct_model.POOLINGS, "cct.position_embedding": cct_model.POSITION_EMBEDDINGS,
      "cct.tokenizer_form": cct_model.TOKENIZER_FORMS, "cct.block_form": layers.BLOCK_FORMS,
      "mobilevit.variant": mobilevit_model.VARIANTS,
      "mobilevit.conv_padding": mobilevit_model.CONV_PADDINGS,
      "perceiver.position_encoding": perceiver_model.POSITION_ENCODINGS,
      "perceiver.share_weights": perceiver_model.WEIGHT_SHARINGS,
      "perceiver.cross_attend_form": perceiver_model.CROSS_ATTEND_FORMS,
      "perceiver.cross_attention_scale": perceiver_model.CROSS_ATTENTION_SCALES,
  }
  assert set(originals) | {"model.remat"} == set(validation.CHOICES)
  for field, options in originals.items():
    assert tuple(options) == validation.CHOICES[field], field
  # Policies this JAX lacks are left out of layers.REMATS; the copy may list more.
  assert set(layers.REMATS) <= set(validation.CHOICES["model.remat"])
  assert augment._LEVEL_MAX == validation.RANDAUGMENT_MAX_MAGNITUDE
  for name, defaults in validation.MODEL_DEFAULTS.items():
    fields = {f.name: f.default for f in dataclasses.fields(model_class(name))}
    for field, value in defaults.items():
      assert fields[field] == value, (name, field)


@pytest.mark.parametrize("image_size", [32, 33, 40, 48, 64, 96])
def test_mobilevit_maps_rule_is_the_models(image_size):
  """The rule for MobileViT's image sizes refuses exactly what the model cannot take."""
  import jax
  import jax.numpy as jnp

  from efficient_vit.models import build_model
  config = _config("mobilevit", {"image_size": image_size})
  try:
    validation.validate(config)
    refused = False
  except validation.ConfigError:
    refused = True
  model = build_model(config["model"], 10)
  try:
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    raised = False
  except ValueError:
    raised = True
  assert refused == raised


def test_cct_tokenizer_side_is_the_models():
  from efficient_vit.models import cct as cct_model
  for args in [(32, 2, 3, 1, 1, 3, 2, 1), (17, 3, 7, 2, 3, 3, 2, 1), (8, 4, 3, 2, 0, 3, 2, 0)]:
    for form in ("official", "keras"):
      assert (validation.conv_tokenizer_side(*args, form=form)
              == cct_model.conv_tokenizer_side(*args, form=form))


# --------------------------------------------------------------------------------------
# The whole path through launch.py, in a few real processes.

_MOCK_LAUNCH = """
import sys
import tensorflow_datasets as tfds
from absl import app
sys.argv = ["launch.py"] + sys.argv[1:]
import launch
with tfds.testing.mock_data(num_examples=24):
  app.run(launch.main, flags_parser=launch.parse_flags)
"""


def _launch(workdir, *overrides, config="configs/vit.py:tiny_cifar10", mock=False,
            timeout=120):
  command = ([sys.executable, "-c", _MOCK_LAUNCH] if mock else [sys.executable, "launch.py"])
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  start = time.perf_counter()
  run = subprocess.run(command + [f"--config={config}", f"--workdir={workdir}", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  return run, time.perf_counter() - start


# What TensorFlow's and XLA's C++ logging print on their own when they load (not ours).
_LIBRARY_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|"
                            r"[IWE]\d{4} \d\d:\d\d:\d\d)")


def _assert_one_line(run, status, *fragments):
  lines = [line for line in run.stderr.strip().splitlines() if not _LIBRARY_NOISE.match(line)]
  assert run.returncode == status and len(lines) == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr and all(f in lines[0] for f in fragments), lines


@pytest.mark.parametrize("override,line", [
    ("--config.model.depth=-1", "config error: model.depth=-1; allowed: a positive integer"),
    ("--config.optimizer.learning_rate=1e39", "config error: optimizer.learning_rate=1e+39;"),
    ("--config.train_split=train[:0]", "config error: train_split='train[:0]'; allowed:"),
    ("--config.batch_size=1.5", "error: flag --config.batch_size=1.5: invalid literal"),
    ("--config.model.depths=2", "config error: 'depths' is not a field of the config"),
])
def test_launch_refuses_in_one_line_within_5_s_and_writes_nothing(tmp_path, override, line):
  workdir = tmp_path / "run"
  run, seconds = _launch(workdir, override)
  _assert_one_line(run, 2, line)
  assert not workdir.exists()
  assert seconds < 5, seconds


def test_launch_refuses_a_git_lfs_pointer_in_one_line(tmp_path):
  pointer = tmp_path / "vit.npz"
  pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
  workdir = tmp_path / "run"
  run, seconds = _launch(workdir, f"--config.init_from.path={pointer}",
                         "--config.init_from.layout=big_vision_vit")
  _assert_one_line(run, 2, f"config error: init_from.path='{pointer}'", "git-lfs pointer")
  assert not workdir.exists() and seconds < 5


def test_what_the_devices_refuse_is_one_line_too(tmp_path):
  """After validation, in the trainer's own checks (JAX is needed): still one line, exit
  status 2 and nothing written."""
  workdir = tmp_path / "run"
  run, _ = _launch(workdir, "--config.batch_size=7", mock=True)
  _assert_one_line(run, 2, "config error: batch_size=7 must be a multiple of the number of "
                   "devices")
  assert not workdir.exists()


def test_what_the_model_refuses_when_traced_leaves_the_workdir_as_it_was(tmp_path,
                                                                          tiny_vit_config):
  from efficient_vit import train
  tiny_vit_config.model.attention_impl = "cudnn"
  with tfds.testing.mock_data(num_examples=8):
    line = _refusal(lambda: train.train_and_evaluate(tiny_vit_config, tmp_path))
  assert line.startswith("config error: model.attention_impl='cudnn'") and "NVIDIA GPU" in line
  assert os.listdir(tmp_path) == []


def _refusal(run) -> str:
  """The one line launch.py prints for what `run()` raises before the first step."""
  from efficient_vit import train
  try:
    run()
  except train.INPUT_ERRORS as e:
    line = validation.one_line(e)
    assert "\n" not in line
    return line
  raise AssertionError("accepted")


def test_junk_in_a_workdir_is_named_in_one_line(tmp_path, tiny_vit_config):
  """A checkpoint that cannot be read, or a config.json that is not JSON: one line naming
  the file, before the first step, and the workdir as it was."""
  from efficient_vit import train

  tiny_vit_config.update(num_train_steps=2, checkpoint_every_steps=2)
  with tfds.testing.mock_data(num_examples=8):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
    tiny_vit_config.num_train_steps = 4
    (tmp_path / "checkpoints" / "2" / "train" / "_METADATA").write_text("{not json")
    before = sorted(os.listdir(tmp_path))
    line = _refusal(lambda: train.train_and_evaluate(tiny_vit_config, tmp_path))
    assert f"the checkpoint of step 2 in {tmp_path / 'checkpoints'} cannot be read" in line
    (tmp_path / "config.json").write_text("{not json")
    line = _refusal(lambda: train.train_and_evaluate(tiny_vit_config, tmp_path))
    assert f"{tmp_path / 'config.json'} is not the JSON config a run writes" in line
  assert sorted(os.listdir(tmp_path)) == before


def test_a_reference_checkpoint_that_is_not_what_it_should_be_is_named(tmp_path):
  """init_from files: junk, a git-lfs pointer, another family's weights: each error names
  the file."""
  from efficient_vit import input_pipeline, train
  config = vit.get_config("s16_imagenet")
  config.model.update(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                      mlp_activation="gelu")
  config.update(image_size=32, batch_size=8)
  config.optimizer.warmup_steps = 0
  info = input_pipeline.DatasetInfo(num_classes=10, num_train_examples=80,
                                    num_eval_examples=0)
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x93" * 100)
  pointer = tmp_path / "vit.pth"
  pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
  swin = os.path.join(ROOT, "tests", "fixtures", "timm_swin.safetensors")
  for path, expected in [(junk, "is not a safetensors file"), (pointer, "git-lfs pointer"),
                         (swin, "does not fit params/patch_embedding")]:
    config.init_from.update(path=str(path), layout="timm_vit", image_size=32)

    def start():
      experiment = train.build(config, info)  # The pointer is refused here already.
      return experiment.warm_start(experiment.init_state())

    line = _refusal(start)
    assert str(path) in line and expected in line, line


SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "tensorflow_datasets")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "cifar10")),
                    reason="the real CIFAR-10 copy (../shared/tensorflow_datasets) is missing")
@pytest.mark.parametrize("field,split", [("eval_split", "validation"),
                                         ("train_split", "train[50000:]"),
                                         ("eval_split", "test[10000:]")])
def test_splits_the_dataset_does_not_have_are_refused_naming_the_field(
    tiny_vit_config, tmp_path, field, split):
  """Splits that only the dataset's split info can refuse (issue 37's checks in
  input_pipeline.dataset_info): one line naming the field, nothing written."""
  from efficient_vit import train
  tiny_vit_config.update(data_dir=SHARED_DATA, download=False, **{field: split})
  line = _refusal(lambda: train.train_and_evaluate(tiny_vit_config, tmp_path / "run"))
  assert line.startswith(f"config error: {field}='{split}'"), line
  assert not (tmp_path / "run").exists()
