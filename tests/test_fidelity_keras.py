"""The `keras` presets compute what the Keras examples' models compute, logit for logit.

tests/fixtures/keras_*.npz hold small random-weight models built by
tests/make_reference_fixtures_keras.py from the six Keras examples (keras-team/keras-io
examples/vision/), with every weight perturbed, an input batch and the Keras model's
eval-mode logits. Here each family's `keras` preset (EANet's `keras_self` too), with only
the sizes reduced like the fixture's, is given the converted weights
(`efficient_vit.import_keras`) and must reproduce those logits (float32, atol = rtol = 1e-4)
and their argmax.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from efficient_vit import import_keras, models

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

# fixture -> (family, preset, size overrides). Only sizes change: widths, depths, heads,
# image and patch sizes, the number of classes. Every field that decides the form of the
# computation keeps the preset's value (checked by test_only_sizes_are_overridden).
CASES = {
    "vit": ("vit", "keras", dict(
        image_size=24, num_classes=10, patch_size=6, embed_dim=32, head_dim=32, num_heads=4,
        depth=2, mlp_dim=64, head_hidden_dims=(48, 24))),
    "eanet": ("eanet", "keras", dict(
        image_size=16, num_classes=10, patch_size=2, embed_dim=32, depth=2, num_heads=4,
        mlp_dim=32, head_dim=32)),
    "eanet_self": ("eanet", "keras_self", dict(
        image_size=16, num_classes=10, patch_size=2, embed_dim=32, depth=2, num_heads=4,
        mlp_dim=32, head_dim=32)),
    "cct": ("cct", "keras", dict(
        image_size=16, num_classes=10, conv_channels=16, embed_dim=32, num_heads=2,
        head_dim=32, mlp_dim=32, depth=2)),
    "swin": ("swin", "keras", dict(
        image_size=16, num_classes=10, embed_dim=32, num_heads=(4,), mlp_ratio=2.0)),
    "mobilevit": ("mobilevit", "keras", dict(
        image_size=64, num_classes=5, stem_channels=8, stage_channels=(8, 12, 12, 16, 20),
        embed_dims=(16, 20, 24), transformer_depths=(2, 2, 1), mlp_dims=(32, 40, 48),
        last_channels=32)),
    "perceiver": ("perceiver", "keras", dict(
        image_size=16, num_classes=10, input_embedding_dim=32, num_latents=16, latent_dim=32,
        latent_heads=4, latent_head_dim=32, latent_depth=2, mlp_dim=32,
        head_hidden_dims=(32,))),
}

SIZE_FIELDS = {
    "image_size", "num_classes", "patch_size", "embed_dim", "head_dim", "num_heads", "depth",
    "mlp_dim", "head_hidden_dims", "conv_channels", "embed_dim", "mlp_ratio", "stem_channels",
    "stage_channels", "embed_dims", "transformer_depths", "mlp_dims", "last_channels",
    "input_embedding_dim", "num_latents", "latent_dim", "latent_heads", "latent_head_dim",
    "latent_depth",
}


def _fixture(name: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / f"keras_{name}.npz") as data:
    return {k: data[k] for k in data.files}


def _build(name: str):
  family, preset, sizes = CASES[name]
  config = importlib.import_module(f"configs.{family}").get_config(preset)
  fields = dict(config.model)
  sizes = dict(sizes)
  image_size = sizes.pop("image_size")
  num_classes = sizes.pop("num_classes")
  fields.update(sizes)
  return family, models.build_model(fields, num_classes), image_size


def test_only_sizes_are_overridden():
  for name, (_, _, sizes) in CASES.items():
    assert set(sizes) <= SIZE_FIELDS, name


@pytest.mark.parametrize("name", list(CASES))
def test_keras_presets_have_the_examples_fields(name):
  family, preset, _ = CASES[name]
  config = importlib.import_module(f"configs.{family}").get_config(preset)
  model = models.build_model(config.model, 10)
  for field, value in import_keras.KERAS_FIELDS[family].items():
    assert getattr(model, field) == value, (name, field)


def test_import_refuses_a_model_of_another_form():
  fixture = _fixture("swin")
  family, model, image_size = _build("swin")
  weights = {k[len("weights/"):]: v for k, v in fixture.items() if k.startswith("weights/")}
  with pytest.raises(ValueError, match="model.mlp_activation='gelu_tanh'.*'gelu'"):
    import_keras.convert(family, model.clone(mlp_activation="gelu_tanh"), weights, image_size)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_keras_example(name):
  fixture = _fixture(name)
  family, model, image_size = _build(name)
  weights = {k[len("weights/"):]: v for k, v in fixture.items() if k.startswith("weights/")}
  extra = {k[len("extra/"):]: v for k, v in fixture.items() if k.startswith("extra/")}
  imported = import_keras.convert(family, model, weights, image_size, extra=extra)
  images = imported.preprocess(fixture["images"])
  logits = np.asarray(jax.jit(model.apply)(imported.variables, images))
  reference = fixture["logits"]
  np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
  assert len(set(reference.argmax(-1).tolist())) > 1, "fixture logits too alike to test argmax"
  if "probabilities" in fixture:  # the example's own output, a softmax
    np.testing.assert_allclose(jax.nn.softmax(logits), fixture["probabilities"], atol=1e-5)
  meta = json.loads(str(fixture["meta"]))
  assert meta["image_size"] == image_size and meta["num_classes"] == reference.shape[1]


def test_import_names_the_missing_extra_and_wrong_tensors():
  fixture = _fixture("vit")
  family, model, image_size = _build("vit")
  weights = {k[len("weights/"):]: v for k, v in fixture.items() if k.startswith("weights/")}
  keys = list(weights)

  # A tensor missing in the middle: the next one is named, with the leaf it cannot fill.
  assert keys[10].endswith("/key/kernel")
  missing = {k: v for k, v in weights.items() if k != keys[10]}
  with pytest.raises(ValueError, match=re.escape(keys[11]) + ".*block_0/attention/key/kernel"):
    import_keras.convert(family, model, missing, image_size)
  # A tensor missing at the end.
  with pytest.raises(ValueError, match="params/head/bias: a tensor is missing"):
    import_keras.convert(family, model, {k: weights[k] for k in keys[:-1]}, image_size)
  # An extra tensor.
  extra = dict(weights, **{"dense_99/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match=re.escape("'dense_99/kernel'") + ".*not used"):
    import_keras.convert(family, model, extra, image_size)
  # A shape that does not fit.
  wrong = dict(weights)
  wrong[keys[-2]] = np.zeros((24, 7), np.float32)
  with pytest.raises(ValueError, match=re.escape(keys[-2]) + ".*does not fit.*head/kernel"):
    import_keras.convert(family, model, wrong, image_size)
  # A model that is not the one the weights come from.
  _, other, _ = _build("vit")
  other = other.clone(depth=1)
  second_query = [k for k in keys if k.endswith("/query/kernel")][1]
  with pytest.raises(ValueError, match=re.escape(second_query) + ".*does not fit"):
    import_keras.convert(family, other, weights, image_size)


def test_perceiver_attention_maps_path_gives_the_same_logits():
  """With the weights extracted (`intermediates`), attention takes the explicit softmax
  path; the learned scale and the missing output projection must act there too."""
  fixture = _fixture("perceiver")
  family, model, image_size = _build("perceiver")
  weights = {k[len("weights/"):]: v for k, v in fixture.items() if k.startswith("weights/")}
  extra = {k[len("extra/"):]: v for k, v in fixture.items() if k.startswith("extra/")}
  imported = import_keras.convert(family, model, weights, image_size, extra=extra)
  logits, state = model.apply(imported.variables, imported.preprocess(fixture["images"]),
                              mutable=["intermediates"])
  np.testing.assert_allclose(logits, fixture["logits"], atol=1e-4, rtol=1e-4)
  sown = state["intermediates"]["cross_attend_0"]["attention"]["attention_weights"]
  assert len(sown) == 2  # one per iteration of the shared cross-attend
  assert sown[0].shape == (4, 1, 16, 64)  # [batch, heads, latents, inputs]
  np.testing.assert_allclose(np.asarray(sown[0]).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name,field,value,message", [
    ("cct", "tokenizer_form", "tf", "model.tokenizer_form='tf'; allowed: official, keras"),
    ("mobilevit", "conv_padding", "valid",
     "model.conv_padding='valid'; allowed: symmetric, same"),
    ("perceiver", "cross_attend_form", "post_norm",
     "model.cross_attend_form='post_norm'; allowed: pre_norm, normalized_stream"),
    ("perceiver", "cross_attention_scale", "none",
     "model.cross_attention_scale='none'; allowed: rsqrt, learned"),
    ("perceiver", "latent_dim", 48,
     "cross_attention_output_projection=False needs the cross-attention width 32"),
])
def test_keras_form_fields_refuse_bad_values(name, field, value, message):
  _, model, image_size = _build(name)
  model = model.clone(**{field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, image_size, image_size, 3)))
