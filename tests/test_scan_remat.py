"""`model.scan`, `model.remat` and `model.attention_impl`: none of
them changes a logit or a gradient; scan only changes the parameter layout
(efficient_vit/scan_layout.py converts), remat only the memory of the train step.

    uv run pytest tests/test_scan_remat.py -q
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_vit import (attention_maps, cost, xla_options, import_weights, layers, optim,
                           scan_layout)
from efficient_vit.models import build_model

# One tiny model per family, with repeated blocks (and stochastic depth where the family
# has it, so that the scanned per-block rates are exercised in train mode).
FAMILIES = {
    "vit": (dict(name="vit", patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_dim=32,
                 drop_path_rate=0.2), 16),
    "cct": (dict(name="cct", embed_dim=16, depth=2, num_heads=2, mlp_dim=32,
                 drop_path_rate=0.2), 8),
    "eanet": (dict(name="eanet", patch_size=4, embed_dim=16, depth=2, num_heads=2,
                   dim_coefficient=2, mlp_dim=16, drop_path_rate=0.2), 16),
    # Both iterations share one cross-attend and one latent Transformer.
    "perceiver": (dict(name="perceiver", patch_size=4, num_bands=2, num_latents=4,
                       latent_dim=16, num_iterations=2, share_weights="all",
                       latent_depth=2, latent_heads=2), 8),
    # One stage of 4 x 4 tokens, windows of 2, shift 1: plain, shifted, plain (an odd
    # depth: the scanned stage decides per block whether to shift).
    "swin": (dict(name="swin", patch_size=2, embed_dim=16, depths=(3,), num_heads=(2,),
                  window_size=2, drop_path_rate=0.2), 8),
    # No MV2 stage; one MobileViT stage of two transformer blocks, batch norm included.
    "mobilevit": (dict(name="mobilevit", stem_channels=8, stage_channels=(16,),
                       strides=(2, 2), mv2_depths=(), embed_dims=(16,),
                       transformer_depths=(2,), mlp_dims=(16,), last_channels=16), 16),
}
NUM_CLASSES = 5


def _images(size: int) -> jax.Array:
  return jax.random.normal(jax.random.key(1), (2, size, size, 3))


def _loss_and_grads(model, variables, images):
  weights = jax.random.normal(jax.random.key(2), (images.shape[0], NUM_CLASSES))

  def loss(params):
    return jnp.sum(model.apply({**variables, "params": params}, images) * weights)

  # Compiled as the project's steps are (on CPU: optimization barriers kept).
  options = xla_options.compiler_options()
  return jax.jit(jax.value_and_grad(loss), compiler_options=options)(variables["params"])


def _random_variables(model, images):
  """Random variables of `model`'s shapes (no compiled init): normal parameters, batch
  statistics in [0.5, 1.5] (positive variances)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(0)
  values = [rng.uniform(0.5, 1.5, x.shape) if path[0].key == "batch_stats"
            else 0.5 * rng.standard_normal(x.shape) for path, x in leaves]
  return jax.tree_util.tree_unflatten(tree, [jnp.asarray(v, jnp.float32) for v in values])


def _assert_trees_close(a, b, tol=1e-5):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.fixture(scope="module")
def reference():
  """family -> (fields, images, unscanned variables, loss, gradients), each built once."""
  cache = {}

  def get(family):
    if family not in cache:
      fields, size = FAMILIES[family]
      images = _images(size)
      model = build_model(fields, NUM_CLASSES)
      variables = _random_variables(model, images)
      cache[family] = (fields, images, variables) + tuple(
          _loss_and_grads(model, variables, images))
    return cache[family]

  return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scan_gives_the_same_logits_and_gradients(family, reference):
  fields, images, variables, loss, grads = reference(family)
  model = build_model({**fields, "scan": True}, NUM_CLASSES)
  scanned = scan_layout.to_layout(variables, scan=True)
  # The converted variables have exactly the structure and shapes the scanned model makes.
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == jax.tree_util.tree_map(
      lambda x: x.shape, scanned)
  paths = lambda tree: set(flax.traverse_util.flatten_dict(tree))  # noqa: E731
  assert paths(scanned) != paths(variables)  # The layout did change...
  _assert_trees_close(scan_layout.to_layout(scanned, scan=False), variables, 0)  # ...and back.
  scan_loss, scan_grads = _loss_and_grads(model, scanned, images)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5, atol=1e-5)
  _assert_trees_close(scan_layout.to_layout(scan_grads, scan=False), grads)


@pytest.mark.parametrize("family", ["swin"])
def test_scanned_stochastic_depth_trains(family, reference):
  """Per-block drop-path rates as scanned inputs (Swin: beside the shift flags): in train
  mode, with no other dropout, branches are dropped at random."""
  fields, images, variables, _, _ = reference(family)
  model = build_model({**fields, "scan": True}, NUM_CLASSES)
  scanned = scan_layout.to_layout(variables, scan=True)
  train = jax.jit(lambda v, key: model.apply(v, images, train=True, rngs={"dropout": key}))
  outs = [train(scanned, jax.random.key(i)) for i in range(2)]
  assert np.isfinite(np.asarray(outs)).all()
  assert not np.allclose(outs[0], outs[1])  # Random branches are dropped.


@pytest.mark.parametrize("family,scan,remat", [
    ("vit", False, "block"), ("vit", True, "dots_with_no_batch_dims_saveable"),
    ("swin", True, "block"),
])
def test_remat_keeps_logits_and_gradients(family, scan, remat, reference):
  fields, images, variables, loss, grads = reference(family)
  model = build_model({**fields, "scan": scan, "remat": remat}, NUM_CLASSES)
  remat_loss, remat_grads = _loss_and_grads(
      model, scan_layout.to_layout(variables, scan=scan), images)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-5, atol=1e-5)
  _assert_trees_close(scan_layout.to_layout(remat_grads, scan=False), grads)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_lowers_the_gradient_memory(scan):
  """The benchmark's measure (`cost.step_memory_bytes`: arguments + outputs + temporaries
  of the compiled program) of a gradient step compiled as the project's steps are, at a
  batch where activations dominate: 64 tokens of width 32 in 4 blocks, batch 32. Without
  scan on CPU this needs the barriers xla_options keeps (XLA's CPU pipeline otherwise merges
  the recomputation back into the forward pass: 1.00x)."""
  fields = dict(name="vit", patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_dim=64,
                scan=scan)
  images = jnp.zeros((32, 32, 32, 3))
  memory = {}
  for remat in ("none", "block"):
    model = build_model({**fields, "remat": remat}, NUM_CLASSES)
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images)))  # noqa: B023
    options = xla_options.compiler_options()
    compiled = jax.jit(grad, compiler_options=options).lower(params).compile()
    memory[remat] = cost.step_memory_bytes(compiled)
  assert memory["block"] < 0.5 * memory["none"], memory


def test_invalid_values_name_the_field():
  fields, size = FAMILIES["vit"]
  images = _images(size)
  for family in FAMILIES:
    with pytest.raises(ValueError, match=r"model\.remat='sometimes'; allowed: none, block, "
                                         r".*dots_with_no_batch_dims_saveable"):
      fields, size = FAMILIES[family]
      jax.eval_shape(build_model({**fields, "remat": "sometimes"}, NUM_CLASSES).init,
                     jax.random.key(0), _images(size))
  with pytest.raises(ValueError, match=r"model\.attention_impl='flash'; allowed: xla, cudnn, "
                                       "auto"):
    jax.eval_shape(build_model({**FAMILIES["vit"][0], "attention_impl": "flash"},
                               NUM_CLASSES).init, jax.random.key(0), images)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the error without a GPU")
def test_cudnn_without_a_gpu_fails_when_the_model_is_traced():
  """train.build traces the model (jax.eval_shape of its init) before anything is written."""
  for family in ("vit", "eanet", "perceiver", "swin"):  # EANet's external attention: unused.
    fields, size = FAMILIES[family]
    with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs an NVIDIA GPU"):
      jax.eval_shape(build_model({**fields, "attention_impl": "cudnn"}, NUM_CLASSES).init,
                     jax.random.key(0), _images(size))


@pytest.mark.parametrize("family", ["swin"])
def test_auto_attention_is_xla_here(family, reference):
  """On CPU (and in float32 anywhere) `auto` is the xla program: the same logits."""
  fields, images, variables, _, _ = reference(family)
  assert layers.attention_implementation("auto", jnp.float32, 64) == "xla"
  assert layers.attention_implementation("auto", jnp.bfloat16, 64) == "xla"  # No GPU here.
  logits = {impl: jax.jit(build_model({**fields, "attention_impl": impl}, NUM_CLASSES).apply)(
      variables, images) for impl in ("xla", "auto")}
  np.testing.assert_array_equal(logits["auto"], logits["xla"])


@pytest.mark.parametrize("family", ["swin"])
def test_attention_maps_of_a_scanned_model(family, reference):
  fields, images, variables, _, _ = reference(family)
  plain = attention_maps.extract_attention(build_model(fields, NUM_CLASSES), variables, images)
  scanned = attention_maps.extract_attention(
      build_model({**fields, "scan": True}, NUM_CLASSES),
      scan_layout.to_layout(variables, scan=True), images)
  assert plain.keys() == scanned.keys()
  for key in plain:
    np.testing.assert_allclose(scanned[key], plain[key], rtol=1e-6, atol=1e-6)


def test_optimizers_treat_a_scanned_stack_block_by_block(reference):
  """Weight decay skips the norms and biases of a stack, and LAMB's trust ratio is one per
  block: scan on and off update alike."""
  from configs import common

  _, _, variables, _, grads = reference("vit")
  params = variables["params"]
  for name in ("adamw", "lamb"):
    opt = common.base_config().optimizer
    opt.update(name=name, weight_decay=0.1)
    tx, _ = optim.make_optimizer(opt, 10, 100)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])  # noqa: B023
    updates = update(grads, params)
    scan_updates = update(scan_layout.to_layout(grads, scan=True),
                          scan_layout.to_layout(params, scan=True))
    _assert_trees_close(scan_layout.to_layout(scan_updates, scan=False), updates, 1e-6)


@pytest.mark.parametrize("name", ["timm_vit_token", "timm_swin"])
def test_imported_weights_match_the_reference_with_scan(name):
  """tests/test_fidelity.py's fixtures, loaded into scanned models: the importers write the
  unscanned layout and `load_reference` converts."""
  from test_fidelity import CASES, FIXTURES, NUM_CLASSES as CLASSES, fixture_io, model_fields

  case = CASES[name]
  images, logits = fixture_io(name)
  model = build_model({**model_fields(case), "scan": True}, CLASSES)
  variables = import_weights.load_reference(FIXTURES / case.file, case.layout, model,
                                            images.shape[1])
  paths = ["/".join(path) for path in flax.traverse_util.flatten_dict(variables)]
  assert any("blocks/" in p for p in paths) and not any("block_0" in p for p in paths)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, images), logits, atol=1e-4,
                             rtol=1e-4)


def test_layout_stacks_each_swin_stage_and_rejects_a_mixed_tree():
  leaf = np.zeros((2,))
  swin = {f"stage{s}_block{i}": {"w": leaf + 10 * s + i} for s, d in ((0, 3), (1, 1))
          for i in range(d)}
  stacked = scan_layout.to_layout(swin, scan=True)
  assert sorted(stacked) == ["stage0_blocks", "stage1_blocks"]
  np.testing.assert_array_equal(stacked["stage0_blocks"]["w"][:, 0], [0, 1, 2])
  assert scan_layout.stacked_axes(("params", "stage0_blocks", "w")) == 1
  _assert_trees_close(scan_layout.to_layout(stacked, scan=False), swin, 0)
  with pytest.raises(ValueError, match="mixed layout"):
    scan_layout.to_layout({"e": {"block_0": {"w": leaf}, "blocks": {"w": leaf[None]}}},
                          scan=True)
  with pytest.raises(ValueError, match="not numbered"):
    scan_layout.to_layout({"encoder": {"block_0": {"w": leaf}, "block_2": {"w": leaf}}},
                          scan=True)
  stacked = scan_layout.to_layout({"e": {"block_0": {"w": leaf}, "block_1": {"w": leaf + 1}}},
                                  scan=True)
  np.testing.assert_array_equal(stacked["e"]["blocks"]["w"], [[0, 0], [1, 1]])
  assert scan_layout.to_layout(stacked, scan=True) == stacked


def test_init_from_a_reference_checkpoint_into_a_scanned_model():
  """`config.init_from` fits in the unscanned layout and hands back the scanned one: the
  timm blocks stacked as imported, the position table resized (32 -> 48 px), a new head."""
  from configs import vit
  from efficient_vit import init_from
  from test_fidelity import CASES, FIXTURES, model_fields

  case = CASES["timm_vit_token"]
  config = vit.get_config("s16_imagenet")
  config.model.update({**model_fields(case), "scan": True})
  config.update(image_size=48)
  config.init_from.update(path=str(FIXTURES / case.file), layout="timm_vit", image_size=32)
  model = build_model(config.model, 7)
  fresh = _random_variables(model, jnp.zeros((1, 48, 48, 3)))
  loaded, _ = init_from.load(config, model, fresh)
  imported = import_weights.load_reference(
      FIXTURES / case.file, "timm_vit", build_model({**config.model, "scan": False}, 5), 32)
  _assert_trees_close(loaded["params"]["encoder"],
                      scan_layout.to_layout(imported["params"]["encoder"], scan=True), 0)
  assert loaded["params"]["position_embedding"]["embedding"].shape == (1, 1 + 36, 32)
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                fresh["params"]["head"]["kernel"])


def test_a_scanned_model_exports_as_its_plain_equivalent(reference, tmp_path):
  """export_model traces the unscanned model (`scan_layout.plain`); the StableHLO artifact
  gives the scanned model's own logits."""
  from efficient_vit import export

  fields, images, variables, _, _ = reference("swin")
  model = build_model({**fields, "scan": True}, NUM_CLASSES)
  scanned = scan_layout.to_layout(variables, scan=True)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  info = {"model": {**fields, "scan": True}, "num_classes": NUM_CLASSES,
          "image_size": images.shape[1], "dataset": "cifar10", "mean": mean, "std": std}
  export.export_model(model, scanned, info, "stablehlo", str(tmp_path / "out"),
                      platforms=("cpu",))
  pixels = np.random.default_rng(0).integers(0, 256, images.shape, np.uint8)
  want = export.serving_function(model, mean, std)(scanned, pixels)
  got = export.load_exported(str(tmp_path / "out"))(pixels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
