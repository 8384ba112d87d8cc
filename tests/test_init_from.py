"""`config.init_from`: a run starts from another run's (or a reference's) weights, fitted
to a new resolution, window size or class count; resuming still wins."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from efficient_vit import init_from, train
from efficient_vit.metric_logging import read_metrics


def _restore_params(workdir, step=None):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.fspath(workdir / "checkpoints")) as manager:
    return manager.restore(step or manager.latest_step())["train"]["state"]["params"]


def test_position_embedding_resize_keeps_the_class_token_and_interpolates_the_grid():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
  same = init_from.resize_position_embedding(table, 17)
  np.testing.assert_allclose(same, table, atol=1e-6)  # Same grid: unchanged.
  bigger = init_from.resize_position_embedding(table, 1 + 36)
  assert bigger.shape == (1, 37, 8)
  np.testing.assert_array_equal(bigger[:, 0], table[:, 0])
  # A constant grid stays constant; a grid that is linear in x stays monotone in x.
  flat = np.ones((1, 16, 3), np.float32)
  np.testing.assert_allclose(init_from.resize_position_embedding(flat, 64), 1.0, atol=1e-5)
  ramp = np.tile(np.arange(4, dtype=np.float32)[None, :, None], (4, 1, 1)).reshape(1, 16, 1)
  row = init_from.resize_position_embedding(ramp, 64).reshape(8, 8)[3]
  assert np.all(np.diff(row) > 0)
  with pytest.raises(ValueError, match="cannot be resized to 51"):
    init_from.resize_position_embedding(table, 51)


def test_relative_bias_table_resize():
  table = np.random.default_rng(0).normal(size=(9, 2)).astype(np.float32)  # Window 2.
  np.testing.assert_allclose(init_from.resize_relative_bias_table(table, 9), table, atol=1e-6)
  assert init_from.resize_relative_bias_table(table, 49).shape == (49, 2)  # Window 4.


def test_fit_names_a_leaf_that_cannot_be_fitted():
  target = {"params": {"mlp": {"kernel": np.zeros((4, 5))}}}
  with pytest.raises(ValueError, match=r"src: params/mlp/kernel has shape \(4, 6\), this model \(4, 5\)"):
    init_from.fit({"params": {"mlp": {"kernel": np.zeros((4, 6))}}}, target, "src")
  with pytest.raises(ValueError, match="src: params/other/kernel has no place"):
    init_from.fit({"params": {"mlp": {"kernel": np.zeros((4, 5))},
                              "other": {"kernel": np.zeros(1)}}}, target, "src")
  with pytest.raises(ValueError, match="src has no params/mlp/kernel"):
    init_from.fit({"params": {}}, target, "src")


def test_a_run_starts_from_another_at_a_new_resolution_and_class_count(tiny_vit_config,
                                                                       tmp_path, capsys):
  tiny_vit_config.num_train_steps = 2
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(tiny_vit_config, tmp_path / "pretrain")
  source = _restore_params(tmp_path / "pretrain")

  fine = tiny_vit_config.copy_and_resolve_references()
  fine.update(image_size=48, dataset="cifar100", num_train_steps=1)
  fine.init_from.path = os.fspath(tmp_path / "pretrain")
  fine.optimizer.learning_rate = 0.0  # Step 1 then leaves the loaded weights as they are.
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(fine, tmp_path / "finetune")
  assert "(a new head for 100 classes: the checkpoint's has 10)" in capsys.readouterr().out
  loaded = _restore_params(tmp_path / "finetune")
  # Every block's weights are the source's; the 4x4 position grid became 6x6 (patch 8 at
  # 32 and 48 pixels); the head is new (100 classes).
  for path, value in jax.tree_util.tree_flatten_with_path(source)[0]:
    keys = [k.key for k in path]
    if keys[0] in ("head", "position_embedding"):
      continue
    got = loaded
    for k in keys:
      got = got[k]
    np.testing.assert_array_equal(got, value)
  prefix = source["position_embedding"]["embedding"].shape[1] - 16  # A class token or not.
  assert loaded["position_embedding"]["embedding"].shape == (1, prefix + 36, 32)
  np.testing.assert_allclose(
      loaded["position_embedding"]["embedding"],
      init_from.resize_position_embedding(source["position_embedding"]["embedding"],
                                          prefix + 36), rtol=1e-6)
  assert loaded["head"]["kernel"].shape == (32, 100)
  assert json.loads((tmp_path / "finetune" / "model.json").read_text())["num_classes"] == 100


def test_resuming_wins_over_init_from_and_a_bad_source_writes_nothing(tiny_vit_config,
                                                                    tmp_path):
  tiny_vit_config.num_train_steps = 2
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(tiny_vit_config, tmp_path / "a")
    train.train_and_evaluate(tiny_vit_config, tmp_path / "b")
    before = _restore_params(tmp_path / "b")
    resumed = tiny_vit_config.copy_and_resolve_references()
    resumed.init_from.path = os.fspath(tmp_path / "a")
    train.train_and_evaluate(resumed, tmp_path / "b")  # Already at step 2: nothing to do.
  jax.tree.map(np.testing.assert_array_equal, _restore_params(tmp_path / "b"), before)

  tiny_vit_config.init_from.path = os.fspath(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="config.init_from.path=.*nowhere.*allowed: a workdir"):
    train.train_and_evaluate(tiny_vit_config, tmp_path / "c")
  tiny_vit_config.init_from.update(path=os.fspath(tmp_path / "a"), layout="keras")
  with pytest.raises(ValueError, match="config.init_from.layout='keras'; allowed: project"):
    train.train_and_evaluate(tiny_vit_config, tmp_path / "c")
  assert not (tmp_path / "c").exists()


def test_a_resumed_run_logs_each_step_once(tiny_vit_config, tmp_path):
  """Steps logged after the last checkpoint of a run that died are not logged twice."""
  tiny_vit_config.update(num_train_steps=4, checkpoint_every_steps=2)
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(tiny_vit_config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # As if the run died before saving step 4.
    train.train_and_evaluate(tiny_vit_config, tmp_path)
  steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert steps == [1, 2, 3, 4]


def test_a_run_starts_from_a_reference_checkpoint(tmp_path, capsys):
  """A timm ViT state dict (5 classes, 32 px: tests/fixtures) starts a 10-class run at
  48 px: its blocks load as the import gives them, the position table is resized, the
  head is new."""
  from configs import vit
  from efficient_vit import import_weights
  from efficient_vit.models import build_model

  fixture = os.path.join(os.path.dirname(__file__), "fixtures", "timm_vit_token.safetensors")
  config = vit.get_config("s16_imagenet")
  config.model.update(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                      mlp_activation="gelu")  # timm's ViT: exact GELU (test_fidelity.py).
  config.update(dataset="cifar10", eval_split="test", image_size=48, batch_size=8,
                num_train_steps=1, eval_every_steps=1)
  config.augment.crop = "none"
  config.optimizer.update(learning_rate=0.0, warmup_steps=0, warmup_epochs=0.0)
  config.init_from.update(path=fixture, layout="timm_vit", image_size=32)
  with tfds.testing.mock_data(num_examples=8):
    train.train_and_evaluate(config, tmp_path)
  assert "(a new head: its classifier has another class count)" in capsys.readouterr().out
  loaded = _restore_params(tmp_path)
  reference = import_weights.load_reference(
      fixture, "timm_vit", build_model(config.model, 5), 32)["params"]
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], reference["encoder"])
  table = reference["position_embedding"]["embedding"]  # [1, 1 + 4 x 4, 32]
  np.testing.assert_allclose(loaded["position_embedding"]["embedding"],
                             init_from.resize_position_embedding(np.asarray(table), 1 + 36),
                             rtol=1e-6)
  assert loaded["head"]["kernel"].shape == (32, 10)


def test_a_reference_field_mismatch_names_the_command_line_override(tmp_path):
  """timm's ViT computes the exact GELU; the ViT-S/16 preset the tanh form: the error says
  which launch.py flag fixes it (not the Python-only check_fields), before anything is
  written."""
  from configs import vit

  fixture = os.path.join(os.path.dirname(__file__), "fixtures", "timm_vit_token.safetensors")
  config = vit.get_config("s16_imagenet")
  config.model.update(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
  config.update(dataset="cifar10", eval_split="test", image_size=32, batch_size=8,
                num_train_steps=1)
  config.optimizer.warmup_steps = 0
  config.init_from.update(path=fixture, layout="timm_vit", image_size=32)
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(ValueError) as error:
      train.train_and_evaluate(config, tmp_path / "run")
  assert str(error.value) == (
      "config.model.mlp_activation='gelu_tanh'; allowed: 'gelu', what timm_vit checkpoints "
      "compute with: add --config.model.mlp_activation=gelu to the command")
  assert not os.path.exists(tmp_path / "run")


def test_a_timm_swin_checkpoint_starts_a_model_with_another_window():
  """timm's Swin (window 4, 32 px: tests/fixtures) into a model with window 8 at 128 px:
  the blocks load at the checkpoint's window and each relative-position bias table is then
  resized to the new one (15 x 15 offsets from 7 x 7); every other leaf is the reference's."""
  from configs import swin
  from flax import traverse_util

  from efficient_vit import import_weights
  from efficient_vit.models import build_model

  fixture = os.path.join(os.path.dirname(__file__), "fixtures", "timm_swin.safetensors")
  sizes = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
  config = swin.get_config("swin_t")
  config.model.update(sizes, window_size=8, shift_size=4)
  config.image_size = 128
  config.init_from.update(path=fixture, layout="timm_swin", image_size=32)
  model = build_model(config.model, 7)
  fresh = model.init(jax.random.key(0), np.zeros((1, 128, 128, 3), np.float32))
  loaded, source = init_from.load(config, model, fresh)
  assert "a new head" in source
  reference = import_weights.load_reference(fixture, "timm_swin", build_model(
      {**config.model, "window_size": 4, "shift_size": 2}, 7), 32, new_head=True)
  flat_loaded = traverse_util.flatten_dict(loaded)
  tables = 0
  for path, value in traverse_util.flatten_dict(reference).items():
    if path[:2] == ("params", "head"):
      continue
    if path[-1] == "relative_position_bias_table":
      tables += 1
      assert value.shape[0] == 49 and flat_loaded[path].shape[0] == 225
      np.testing.assert_allclose(flat_loaded[path], init_from.resize_relative_bias_table(
          np.asarray(value), 225), rtol=1e-6)
    else:
      np.testing.assert_array_equal(flat_loaded[path], value)
  assert tables == 4
