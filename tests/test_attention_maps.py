"""Attention maps per family: the module paths `FAMILY_MAPS` names exist in every model, the
maps have the documented shapes and normalisation, and they land on the pixels of the
tokens they belong to (checked against the models' own window partition and unfold)."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from efficient_vit import attention_maps as am  # noqa: E402
from efficient_vit.models import build_model  # noqa: E402

# Tiny models of every family, with the image side each is run at.
TINY = {
    "vit": (32, dict(name="vit", patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_dim=32,
                     pooling="cls")),
    "cct": (16, dict(name="cct", num_conv_layers=1, conv_channels=8, embed_dim=16, depth=2,
                     num_heads=2, mlp_dim=32)),
    "perceiver": (16, dict(name="perceiver", patch_size=4, input_embedding_dim=16,
                           position_encoding="learned", num_latents=8, latent_dim=16,
                           num_iterations=2, share_weights="all", latent_depth=1,
                           latent_heads=2)),
    "eanet": (16, dict(name="eanet", patch_size=4, embed_dim=16, depth=2, num_heads=2,
                       dim_coefficient=2, mlp_dim=16)),
    "swin": (16, dict(name="swin", patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,),
                      window_size=4, shift_size=2)),
    "mobilevit": (32, dict(name="mobilevit", stem_channels=8, stage_channels=(8, 8, 16, 16, 16),
                           strides=(1, 1, 2, 2, 2, 1), embed_dims=(16, 16, 16),
                           transformer_depths=(1, 1, 1), mlp_dims=(32, 32, 32), num_heads=2,
                           mv2_depths=(1, 1), last_channels=32)),
}
BATCH = 2


def _random_variables(model, images):
  """Random values in the shapes of `model.init` (batch statistics: mean 0, variance 1),
  without compiling the init, which costs more than the rest of this file together."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return (np.ones if "var" in name else np.zeros)(leaf.shape, leaf.dtype)
    return (0.3 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def family_maps():
  """{family: extract_attention of its tiny model on random images}."""
  out = {}
  for family, (side, fields) in TINY.items():
    model = build_model(fields, num_classes=10)
    images = np.random.default_rng(1).normal(size=(BATCH, side, side, 3)).astype(np.float32)
    out[family] = am.extract_attention(model, _random_variables(model, images), images)
  return out


def test_vit_token_attention_and_rollout(family_maps):
  weights = [w for _, w in am.select_maps(family_maps["vit"], "vit", "self_attention")]
  assert len(weights) == 2 and weights[0].shape == (BATCH, 2, 17, 17)
  token = am.vit_token_attention(weights[-1], class_token=True)
  rollout = am.attention_rollout(weights, class_token=True)
  assert token.shape == rollout.shape == (BATCH, 4, 4)
  # The class token's row sums to 1 over all 17 tokens; the patches take the rest.
  assert np.all(token.sum((1, 2)) < 1.0) and np.all(token > 0)
  received = am.vit_token_attention(weights[-1], class_token=False,
                                    grid=(1, 17))  # Every token, class token included.
  np.testing.assert_allclose(received.sum((1, 2)), 1.0, rtol=1e-5)


def test_rollout_of_a_hand_computed_case():
  # Two tokens; block 1 sends everything to token 1, block 2 everything to token 0.
  to_1 = np.array([[[[0.0, 1.0], [0.0, 1.0]]]])
  to_0 = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])
  # (A + I) / 2: block 1 -> [[.5, .5], [0, 1]], block 2 -> [[1, 0], [.5, .5]].
  # Rollout = block2 @ block1 = [[.5, .5], [.25, .75]].
  joint_row0 = am.attention_rollout([to_1, to_0], class_token=True, grid=(1, 1))
  np.testing.assert_allclose(joint_row0.ravel(), [0.5])
  mean_rows = am.attention_rollout([to_1, to_0], class_token=False, grid=(1, 2))
  np.testing.assert_allclose(mean_rows.ravel(), [0.375, 0.625])


def test_cct_pooling_weights_cover_the_token_grid(family_maps):
  (_, pooling), = am.select_maps(family_maps["cct"], "cct", "pooling")
  heat = am.cct_pooling_weights(pooling)
  assert heat.shape == (BATCH, 8, 8)  # 16 -> conv (stride 1) -> max-pool (stride 2) -> 8.
  np.testing.assert_allclose(heat.sum((1, 2)), 1.0, rtol=1e-5)
  assert len(am.select_maps(family_maps["cct"], "cct", "self_attention")) == 2


def test_perceiver_cross_attention_per_iteration(family_maps):
  selected = am.select_maps(family_maps["perceiver"], "perceiver", "cross_attention")
  # share_weights='all': one module called twice, in iteration order.
  assert [k for k, _ in selected] == ["cross_attend_0/attention#0", "cross_attend_0/attention#1"]
  heat = am.perceiver_cross_attention(selected[0][1])
  assert heat.shape == (BATCH, 8, 4, 4)  # 8 latents over the 4 x 4 patches.
  np.testing.assert_allclose(heat.sum((2, 3)), 1.0, rtol=1e-5)


def test_eanet_memory_attention(family_maps):
  selected = am.select_maps(family_maps["eanet"], "eanet", "memory_attention")
  assert len(selected) == 2
  heat = am.eanet_memory_attention(selected[-1][1])
  assert heat.shape == (BATCH, 8, 4, 4)  # S = 16 // 2 memory units over 4 x 4 tokens.
  np.testing.assert_allclose(heat.sum(1), 1.0, rtol=1e-4)  # l1 over units, per token.
  assert am.most_selective_units(heat, 3).shape == (3,)


def test_swin_window_attention_sums_to_one_per_window(family_maps):
  selected = am.select_maps(family_maps["swin"], "swin", "window_attention")
  assert [k for k, _ in selected] == ["stage0_block0/attention/window_attention",
                                      "stage0_block1/attention/window_attention"]
  plain = am.swin_window_attention(selected[0][1], batch=BATCH, grid=(8, 8), shift=0)
  assert plain.shape == (BATCH, 8, 8)
  windows = plain.reshape(BATCH, 2, 4, 2, 4).sum((2, 4))
  np.testing.assert_allclose(windows, 1.0, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_swin_map_puts_every_value_on_its_own_token(shift):
  """Weights whose column k of window w holds the id of the token the model put there (by
  its own roll + window_partition) must come back as the grid of ids."""
  from efficient_vit.models.swin import window_partition

  side, window = 8, 4
  ids = np.arange(side * side, dtype=np.float32).reshape(1, side, side, 1)
  rolled = np.roll(ids, (-shift, -shift), axis=(1, 2))
  columns = np.asarray(window_partition(jnp.asarray(rolled), window))[..., 0]  # [nW, M^2]
  weights = np.broadcast_to(columns[:, None, None, :], (4, 2, window * window, window * window))
  heat = am.swin_window_attention(weights, batch=1, grid=(side, side), shift=shift)
  np.testing.assert_array_equal(heat[0], ids[0, ..., 0])


def test_window_lines():
  assert am.window_lines(8, 4) == [0, 4, 8]
  assert am.window_lines(8, 4, shift=2) == [2, 6]
  assert am.window_lines(16, 2, shift=1) == list(range(1, 16, 2))


def test_mobilevit_map_puts_every_value_on_its_own_position(family_maps):
  from efficient_vit.models.mobilevit import unfold

  selected = am.select_maps(family_maps["mobilevit"], "mobilevit", "patch_attention")
  assert [k for k, _ in selected] == [f"stage_{s}_mobilevit/transformer_0/attention"
                                      for s in (3, 4, 5)]
  heat = am.mobilevit_patch_attention(selected[0][1], batch=BATCH, patch_size=2)
  assert heat.shape == (BATCH, 8, 8)  # stage 3 works on 32 / 4 = 8 x 8.
  stages = am.mobilevit_stage_maps(family_maps["mobilevit"], batch=BATCH, patch_size=2)
  assert [(name, h.shape) for name, h in stages] == [
      ("stage_3_mobilevit", (BATCH, 8, 8)), ("stage_4_mobilevit", (BATCH, 4, 4)),
      ("stage_5_mobilevit", (BATCH, 4, 4))]
  # Same check as for Swin, against the model's unfold.
  ids = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1)
  columns = np.asarray(unfold(jnp.asarray(ids), 2))[0, ..., 0]  # [P = 4, N = 16]
  weights = np.broadcast_to(columns[:, None, None, :], (4, 2, 16, 16))
  heat = am.mobilevit_patch_attention(weights, batch=1, patch_size=2)
  np.testing.assert_array_equal(heat[0], ids[0, ..., 0])


def test_a_renamed_module_is_a_clear_error():
  with pytest.raises(LookupError, match="no mobilevit patch_attention maps.*sowed: encoder/block_0/attention"):
    am.select_maps({"encoder/block_0/attention": np.zeros(1)}, "mobilevit", "patch_attention")
  with pytest.raises(ValueError, match="family='resnet'"):
    am.select_maps({}, "resnet", "self_attention")


def test_overlay_stretches_the_token_grid_over_the_image(tmp_path):
  import matplotlib.pyplot as plt

  image = np.zeros((32, 32, 3))
  heat = np.zeros((4, 4))
  heat[1, 2] = 1.0  # Token row 1, column 2: pixels y 8..16, x 16..24.
  fig, ax = plt.subplots()
  shown = am.overlay(ax, image, heat, title="t")
  assert shown.get_extent() == [0, 32, 32, 0]
  am.draw_window_grid(ax, 32, 4, window=2, shift=1)
  path = am.save_figure(fig, str(tmp_path / "overlay.png"))
  plt.close(fig)
  rgba = plt.imread(path)
  assert rgba.shape[-1] == 4
  # Pixel (y, x) = (12, 20) of the data lies in the hot token: look it up through the axes.
  fig, ax = plt.subplots()
  shown = am.overlay(ax, image, heat, title="t")
  fig.canvas.draw()
  x, y = ax.transData.transform((20, 12))
  event = type("Event", (), {"x": x, "y": y, "inaxes": ax})()
  assert shown.get_cursor_data(event) == 1.0
  x, y = ax.transData.transform((12, 20))
  event = type("Event", (), {"x": x, "y": y, "inaxes": ax})()
  assert shown.get_cursor_data(event) == 0.0
  plt.close(fig)


def test_save_figure_refuses_unlabelled_axes(tmp_path):
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  ax.plot([0, 1], [0, 1])
  ax.set_title("a line")
  with pytest.raises(ValueError, match="no x label"):
    am.save_figure(fig, str(tmp_path / "bad.png"))
  ax.set_xlabel("x")
  ax.set_ylabel("y")
  assert (tmp_path / "sub").exists() is False
  am.save_figure(fig, str(tmp_path / "sub" / "good.png"))
  assert (tmp_path / "sub" / "good.png").stat().st_size > 0
  plt.close(fig)


def test_restore_variables_reads_params_batch_stats_and_ema(tmp_path):
  import orbax.checkpoint as ocp

  params = {"dense": {"kernel": np.ones((2, 3), np.float32)}}
  state = {"step": np.int32(3), "params": params,
           "ema_params": {"dense": {"kernel": np.full((2, 3), 2.0, np.float32)}},
           "batch_stats": {"norm": {"mean": np.zeros(3, np.float32)}}, "opt_state": {}}
  with ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                             options=ocp.CheckpointManagerOptions(create=True)) as manager:
    manager.save(3, args=ocp.args.Composite(train=ocp.args.StandardSave(
        {"state": state, "rng": np.zeros(2, np.uint32)})))
  variables = am.restore_variables(str(tmp_path))
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], 1.0)
  assert "mean" in variables["batch_stats"]["norm"]
  ema = am.restore_variables(str(tmp_path), use_ema=True)
  np.testing.assert_array_equal(ema["params"]["dense"]["kernel"], 2.0)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    am.restore_variables(str(tmp_path / "elsewhere"))
