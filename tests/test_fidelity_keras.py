"""The `keras` presets compute what the Keras examples' models compute, logit for logit,
from the weights as Keras saves them.

tests/fixtures/keras_*.npz come from tests/make_reference_fixtures_keras.py, which runs the
six Keras examples' own code (keras-team/keras-io examples/vision/, sizes reduced through
the examples' hyperparameter variables), gives every variable a new value, saves the model
with `model.save_weights` and records what the `.weights.h5` holds: each saved path
(`layers/swin_transformer_1/attn/vars/0`, ...), how its value was made (drawn from a fixed
generator, regenerated here, or stored), an input batch and the Keras model's eval-mode
logits. Here the saved file is rebuilt from that record, read back through
`import_keras.read_weights` and converted (`import_keras.convert`) into each family's
`keras` preset (EANet's `keras_self` too), with only the sizes changed like the fixture's;
it must reproduce the logits (float32, atol = rtol = 1e-4) and their argmax.
keras_swin.weights.h5 and keras_swin.keras are files as Keras wrote them.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import zipfile

import h5py
import jax
import numpy as np
import pytest

from efficient_vit import import_keras, models

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SEED = 38  # tests/make_reference_fixtures_keras.py

# fixture -> (family, preset, size overrides). Only sizes change: widths, depths, heads,
# image and patch sizes, the number of classes. Every field that decides the form of the
# computation keeps the preset's value (checked by test_only_sizes_are_overridden).
CASES = {
    # keras-io's Keras 3 example: tokens of hidden_dim = projection_dim * num_heads (here
    # 16 * 2), key_dim projection_dim, MLP [2 * hidden_dim, hidden_dim].
    "vit": ("vit", "keras", dict(
        image_size=24, num_classes=10, patch_size=6, embed_dim=32, head_dim=16, num_heads=2,
        depth=2, mlp_dim=64, head_hidden_dims=(32, 16))),
    "eanet": ("eanet", "keras", dict(
        image_size=16, num_classes=10, patch_size=2, embed_dim=32, depth=2, num_heads=4,
        mlp_dim=32, head_dim=32)),
    "eanet_self": ("eanet", "keras_self", dict(
        image_size=16, num_classes=10, patch_size=2, embed_dim=32, depth=2, num_heads=4,
        mlp_dim=32, head_dim=32)),
    "cct": ("cct", "keras", dict(
        image_size=16, num_classes=10, conv_channels=64, embed_dim=128, num_heads=2,
        head_dim=16, mlp_dim=32, depth=2)),
    "swin": ("swin", "keras", dict(
        image_size=32, num_classes=10, embed_dim=16, num_heads=(2,), mlp_ratio=2.0)),
    "mobilevit": ("mobilevit", "keras", dict(image_size=64, num_classes=5)),
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


def _meta(fixture) -> dict:
  return json.loads(str(fixture["meta"]))


def _saved(fixture) -> dict[str, np.ndarray]:
  """{saved path: array} as the example's `.weights.h5` holds them, in the file's order."""
  out = {}
  for record in _meta(fixture)["saved"]:
    if record.get("stored"):
      value = fixture[f"stored/{record['path']}"]
    else:
      u = np.random.default_rng([SEED, record["index"]]).random(tuple(record["shape"]))
      value = (record["a"] + record["b"] * (2.0 * u - 1.0)).astype(np.float32)
    assert value.shape == tuple(record["shape"]) and str(value.dtype) == record["dtype"]
    out[record["path"]] = value
  return out


def _write_h5(path: pathlib.Path, weights: dict[str, np.ndarray]) -> pathlib.Path:
  with h5py.File(path, "w") as f:
    for key, value in weights.items():
      f.create_dataset(key, data=value)
  return path


def _build(name: str):
  family, preset, sizes = CASES[name]
  config = importlib.import_module(f"configs.{family}").get_config(preset)
  fields = dict(config.model)
  sizes = dict(sizes)
  image_size = sizes.pop("image_size")
  num_classes = sizes.pop("num_classes")
  fields.update(sizes)
  return family, models.build_model(fields, num_classes), image_size


def _extra(fixture) -> dict[str, np.ndarray]:
  return {k[len("extra/"):]: v for k, v in fixture.items() if k.startswith("extra/")}


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


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_keras_example(name, tmp_path):
  fixture = _fixture(name)
  family, model, image_size = _build(name)
  # The user's path: the file Keras saved, here rebuilt from the fixture's record.
  path = _write_h5(tmp_path / f"{name}.weights.h5", _saved(fixture))
  imported = import_keras.convert(family, model, path, image_size, extra=_extra(fixture))
  images = imported.preprocess(fixture["images"])
  logits = np.asarray(jax.jit(model.apply)(imported.variables, images))
  reference = fixture["logits"]
  np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
  assert len(set(reference.argmax(-1).tolist())) > 1, "fixture logits too alike to test argmax"
  if "probabilities" in fixture:  # the example's own output, a softmax
    np.testing.assert_allclose(jax.nn.softmax(logits), fixture["probabilities"], atol=1e-5)
  assert image_size == fixture["images"].shape[1]


def test_reads_the_files_keras_wrote():
  """keras_swin.weights.h5 (`model.save_weights`) and keras_swin.keras (`model.save`) as
  Keras 3 wrote them hold exactly what the fixture records, under the same paths."""
  recorded = _saved(_fixture("swin"))
  for name in ("keras_swin.weights.h5", "keras_swin.keras"):
    read = import_keras.read_weights(FIXTURES / name)
    assert sorted(read) == sorted(recorded), name
    for key, value in recorded.items():
      np.testing.assert_array_equal(read[key], value, err_msg=f"{name}: {key}")
      assert read[key].dtype == value.dtype, (name, key)


def test_keras_file_converts_like_the_weights_file():
  fixture = _fixture("swin")
  family, model, image_size = _build("swin")
  imported = import_keras.convert(family, model, FIXTURES / "keras_swin.keras", image_size)
  logits = jax.jit(model.apply)(imported.variables, imported.preprocess(fixture["images"]))
  np.testing.assert_allclose(logits, fixture["logits"], atol=1e-4, rtol=1e-4)


def test_fixtures_come_from_the_published_code():
  """What each fixture's build changed in the example's code, as the script recorded it."""
  expected = {
      "eanet_self": ["call get_model(**{'attention_type': 'self_attention'})"],
      "perceiver": ["repair: the published build()", "repair: keras.ops.image.extract_patches"],
  }
  for name in CASES:
    meta = _meta(_fixture(name))
    notes = meta["notes"]
    assert len(notes) == len(expected.get(name, [])), (name, notes)
    for note, start in zip(notes, expected.get(name, [])):
      assert note.startswith(start), (name, note)
    assert meta["example"].startswith("keras-io examples/vision/"), name
    assert meta["keras"].startswith("3."), name
    assert len(meta["saved"]) == len(meta["model_weights"]), name  # every variable saved


def test_fixtures_record_the_names_keras_gives_unnamed_variables():
  """The examples leave these variables unnamed; Keras saves them by position in their
  layer (`vars/<rank>`), and their `Variable.path` is a numbered `variable`."""
  by_path = {r["path"]: r["variable"] for r in _meta(_fixture("swin"))["saved"]}
  assert by_path["layers/swin_transformer/attn/vars/0"] == "window_attention/variable"
  assert by_path["layers/swin_transformer/attn/vars/1"] == "variable_1"
  assert by_path["layers/swin_transformer_1/vars/0"] == "swin_transformer_1/variable_4"
  perceiver = {r["path"]: r["variable"] for r in _meta(_fixture("perceiver"))["saved"]}
  assert perceiver["vars/0"] == "perceiver/variable"
  cct = {r["path"]: r["variable"] for r in _meta(_fixture("cct"))["saved"]}
  assert cct["layers/position_embedding/vars/0"] == "position_embedding/embeddings"


def _swin_case():
  fixture = _fixture("swin")
  family, model, image_size = _build("swin")
  return fixture, family, model, image_size, _saved(fixture)


@pytest.mark.parametrize("name,key", [
    ("swin", "layers/swin_transformer/attn/vars/0"),  # the unnamed relative-position table
    ("swin", "layers/swin_transformer_1/vars/0"),  # the unnamed shift mask
    ("swin", "layers/dense/vars/1"),  # the head's bias
    ("perceiver", "vars/0"),  # the unnamed latent array
    ("cct", "layers/position_embedding/vars/0"),  # the position table
    ("mobilevit", "layers/batch_normalization_7/vars/3"),  # a moving variance
])
def test_import_names_a_missing_variable(name, key):
  fixture = _fixture(name)
  family, model, image_size = _build(name)
  weights = _saved(fixture)
  assert key in weights
  del weights[key]
  # Named as the variable, or as its layer when that held nothing else.
  layer = key.rsplit("/vars/", 1)[0]
  with pytest.raises(ValueError, match=f"'({re.escape(key)}|{re.escape(layer)})'.*missing"):
    import_keras.convert(family, model, weights, image_size, extra=_extra(fixture))


def test_import_names_a_missing_layer_and_an_ambiguous_order():
  _, family, model, image_size, weights = _swin_case()
  gone = {k: v for k, v in weights.items() if not k.startswith("layers/swin_transformer_1/")}
  with pytest.raises(ValueError, match=re.escape("'layers/swin_transformer_1'")
                     + ".*stage0_block1.*missing"):
    import_keras.convert(family, model, gone, image_size)
  fixture = _fixture("vit")
  vit_family, vit, vit_size = _build("vit")
  weights = _saved(fixture)
  gap = {k: v for k, v in weights.items() if not k.startswith("layers/dense_2/")}
  with pytest.raises(ValueError, match=re.escape("'layers/dense_2'") + ".*ambiguous"):
    import_keras.convert(vit_family, vit, gap, vit_size)


@pytest.mark.parametrize("key,shape", [
    ("layers/swin_transformer_1/attn/vars/0", (9, 3)),
    ("layers/patch_embedding/pos_embed/vars/0", (255, 16)),
    ("layers/swin_transformer/attn/qkv/vars/1", (47,)),
])
def test_import_names_a_misshapen_variable(key, shape):
  _, family, model, image_size, weights = _swin_case()
  weights[key] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match=re.escape(repr(key)) + f".*{re.escape(str(shape))}"):
    import_keras.convert(family, model, weights, image_size)


@pytest.mark.parametrize("key", [
    "layers/swin_transformer/attn/vars/2",  # a third own variable of WindowAttention
    "layers/dense_1/vars/0",  # a second classifier
    "layers/swin_transformer_2/norm1/vars/0",  # a third block
])
def test_import_names_an_extra_variable(key):
  _, family, model, image_size, weights = _swin_case()
  weights[key] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError, match=re.escape(repr(key)) + ".*not used"):
    import_keras.convert(family, model, weights, image_size)


def test_import_checks_the_saved_buffers():
  """Swin's index and mask are checked against the project's, not loaded."""
  _, family, model, image_size, weights = _swin_case()
  for key in ("layers/swin_transformer/attn/vars/1", "layers/swin_transformer_1/vars/0"):
    broken = dict(weights)
    broken[key] = np.flip(weights[key], axis=-1).copy()
    with pytest.raises(ValueError, match=re.escape(repr(key)) + ".*is not the"):
      import_keras.convert(family, model, broken, image_size)


def test_import_refuses_other_files_and_layouts(tmp_path):
  with pytest.raises(ValueError, match=r"path='x.pkl'; allowed: a .weights.h5, .keras"):
    import_keras.read_weights("x.pkl")
  archive = tmp_path / "empty.keras"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("config.json", "{}")
  with pytest.raises(ValueError, match="no model.weights.h5"):
    import_keras.read_weights(archive)
  _, family, model, image_size, weights = _swin_case()
  with pytest.raises(ValueError, match=re.escape("'dense_10/kernel'") + ".*not a path Keras"):
    import_keras.convert(family, model, {"dense_10/kernel": np.zeros((3, 3))}, image_size)


def test_import_refuses_extra_tensors_it_does_not_use():
  """CCT's position table was once passed as extra; the Keras 3 example saves it."""
  family, model, image_size = _build("cct")
  with pytest.raises(ValueError, match=re.escape("extra['position_embedding'] is not used by "
                                                 "the cct import; allowed: none")):
    import_keras.convert(family, model, _saved(_fixture("cct")), image_size,
                         extra={"position_embedding": np.zeros((16, 128))})
  family, model, image_size = _build("perceiver")
  with pytest.raises(ValueError, match=re.escape("extra['latents'] is not used by the "
                                                 "perceiver import; allowed: normalization_mean")):
    import_keras.convert(family, model, _saved(_fixture("perceiver")), image_size,
                         extra={"latents": np.zeros(3)})


def test_import_refuses_a_model_of_another_form():
  _, family, model, image_size, weights = _swin_case()
  with pytest.raises(ValueError, match="model.mlp_activation='gelu_tanh'.*'gelu'"):
    import_keras.convert(family, model.clone(mlp_activation="gelu_tanh"), weights, image_size)
  # Weights of a deeper model than the config: the second block's first MLP Dense comes
  # where the config has the head's, and is named.
  fixture = _fixture("vit")
  vit_family, vit, vit_size = _build("vit")
  with pytest.raises(ValueError, match=re.escape("'layers/dense_2/vars/0' of shape (32, 64)")
                     + ".*does not fit.*head_mlp/Dense_0/kernel"):
    import_keras.convert(vit_family, vit.clone(depth=1), _saved(fixture), vit_size)


def test_perceiver_attention_maps_path_gives_the_same_logits():
  """With the weights extracted (`intermediates`), attention takes the explicit softmax
  path; the learned scale and the missing output projection must act there too."""
  fixture = _fixture("perceiver")
  family, model, image_size = _build("perceiver")
  imported = import_keras.convert(family, model, _saved(fixture), image_size,
                                  extra=_extra(fixture))
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
