"""Fidelity to the PyTorch / big_vision references: imported weights give the reference's logits.

The fixtures in tests/fixtures/ were made by the reference code itself
(tests/make_reference_fixtures_torch.py: timm 1.0.31, vit-pytorch's copy of the official CCT)
from small random-weight models with every tensor perturbed; no torch is needed here. Each
case builds its model from a paper preset of configs/<family>.py, reduces only the sizes
(depth, width, heads, image), loads the reference's state dict with
`efficient_vit.import_weights`, and compares the eval-mode logits.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pathlib
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_vit import import_weights, layers
from efficient_vit.models import build_model

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
NUM_CLASSES = 5


@dataclasses.dataclass(frozen=True)
class Case:
  layout: str
  file: str
  config: str  # configs/<family>.py:PRESET
  sizes: dict  # Only sizes: the sizes of tests/make_reference_fixtures_torch.py.
  # Fields in which the reference computes differently from the preset (none, except timm's
  # exact-GELU port of the JAX ViT and timm's GAP form); import_weights.REFERENCE_FIELDS
  # lists each layout's form and `load_reference` checks it.
  reference_form: dict = dataclasses.field(default_factory=dict)


VIT_SIZES = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
CASES = {
    "timm_vit_token": Case("timm_vit", "timm_vit_token.safetensors", "vit:s16_imagenet",
                           VIT_SIZES, dict(mlp_activation="gelu")),
    "timm_vit_gap": Case("timm_vit", "timm_vit_gap.safetensors", "vit:s16_imagenet", VIT_SIZES,
                         dict(mlp_activation="gelu", pooling="gap", fc_norm=True)),
    "big_vision_vit": Case("big_vision_vit", "big_vision_vit.npz", "vit:s16_imagenet",
                           VIT_SIZES),
    "timm_swin": Case("timm_swin", "timm_swin.safetensors", "swin:swin_t",
                      dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, shift_size=2)),
    "timm_mobilevit": Case("timm_mobilevit", "timm_mobilevit.safetensors", "mobilevit:xxs",
                           dict(stem_channels=8, stage_channels=(8, 16, 16, 24, 32),
                                mv2_depths=(1, 2), embed_dims=(16, 24, 32),
                                transformer_depths=(1, 2, 1), mlp_dims=(32, 48, 64),
                                last_channels=64)),
    # The .pth case: read by import_weights' torch-free zip reader.
    "cct_learned": Case("cct_official", "cct_learned.pth", "cct:cct_2_3x2",
                        dict(embed_dim=32, mlp_dim=32)),
    "cct_sine": Case("cct_official", "cct_sine.safetensors", "cct:cct_6_3x1",
                     dict(embed_dim=32, depth=2, mlp_dim=64)),
}


def model_fields(case: Case) -> dict:
  family, preset = case.config.split(":")
  fields = dict(importlib.import_module(f"configs.{family}").get_config(preset).model)
  fields.update(case.sizes)
  fields.update(case.reference_form)
  return fields


def fixture_io(name: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(FIXTURES / f"{name}_io.npz") as data:
    return data["images"], data["logits"]


@pytest.fixture(scope="module")
def loaded():
  """name -> (model, variables, images, reference logits), each built once."""
  cache = {}

  def get(name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in cache:
      case = CASES[name]
      images, reference = fixture_io(name)
      model = build_model({**model_fields(case), **overrides}, NUM_CLASSES)
      variables = import_weights.load_reference(FIXTURES / case.file, case.layout, model,
                                                images.shape[1], check_fields=not overrides)
      cache[key] = (model, variables, images, reference)
    return cache[key]

  return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name, loaded):
  model, variables, images, reference = loaded(name)
  logits = np.asarray(jax.jit(model.apply)(variables, images))
  np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("name,field,value", [
    ("timm_vit_token", "mlp_activation", "gelu_tanh"),   # flax's default GELU
    ("cct_learned", "block_form", "pre_norm"),           # the block before this issue
    ("timm_swin", "mlp_activation", "gelu_tanh"),
    ("timm_vit_gap", "fc_norm", False),                  # big_vision's GAP: norm, then mean
])
def test_a_wrong_form_field_is_caught(name, field, value, loaded):
  """The comparison can fail: one field of the computation changed moves the logits."""
  model, variables, images, reference = loaded(name, **{field: value})
  logits = np.asarray(model.apply(variables, images))
  assert not np.allclose(logits, reference, atol=1e-4, rtol=1e-4)


def test_preset_fields_are_checked_against_the_layout():
  model = build_model(model_fields(dataclasses.replace(CASES["timm_vit_token"],
                                                       reference_form={})), NUM_CLASSES)
  with pytest.raises(ValueError, match=r"model.mlp_activation='gelu_tanh'.*gelu"):
    import_weights.load_reference(FIXTURES / "timm_vit_token.safetensors", "timm_vit", model, 32)


def _timm_vit_state_and_template():
  case = CASES["timm_vit_token"]
  model = build_model(model_fields(case), NUM_CLASSES)
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))
  state = import_weights.read_state_dict(FIXTURES / case.file)
  return state, template


def test_refuses_a_missing_tensor():
  state, template = _timm_vit_state_and_template()
  del state["blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc2.bias' is missing"):
    import_weights.convert(state, "timm_vit", template)


def test_refuses_an_extra_tensor():
  state, template = _timm_vit_state_and_template()
  state["blocks.2.norm1.weight"] = np.ones(32, np.float32)
  with pytest.raises(ValueError, match=r"'blocks.2.norm1.weight' \(shape \(32,\)\).*no place"):
    import_weights.convert(state, "timm_vit", template)


@pytest.mark.parametrize("key,shape", [("blocks.0.attn.qkv.weight", (90, 32)),
                                       ("pos_embed", (1, 10, 32)),
                                       ("head.weight", (7, 32))])
def test_refuses_a_tensor_of_the_wrong_shape(key, shape):
  state, template = _timm_vit_state_and_template()
  before = jax.tree.map(lambda x: x.shape, template)
  state[key] = np.zeros(shape, np.float32)
  pattern = re.escape(f"'{key}' of shape {shape}") + ".*does not fit"
  with pytest.raises(ValueError, match=pattern):
    import_weights.convert(state, "timm_vit", template)
  assert jax.tree.map(lambda x: x.shape, template) == before  # Nothing written.


def test_new_head_keeps_the_models_classifier(loaded):
  case = CASES["timm_vit_token"]
  model = build_model(model_fields(case), 7)
  variables = import_weights.load_reference(FIXTURES / case.file, case.layout, model, 32,
                                            new_head=True, rng=jax.random.PRNGKey(1))
  _, reference, _, _ = loaded("timm_vit_token")
  assert variables["params"]["head"]["kernel"].shape == (32, 7)
  np.testing.assert_array_equal(variables["params"]["encoder_norm"]["scale"],
                                reference["params"]["encoder_norm"]["scale"])


def test_vision_transformer_npz_names(loaded):
  """The older google-research/vision_transformer names (class position in the table)."""
  state = import_weights.read_state_dict(FIXTURES / "big_vision_vit.npz")
  renamed = {}
  for key, value in state.items():
    key = (key.replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3")
           .replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"))
    if key == "pos_embedding":
      key, value = "Transformer/posembed_input/pos_embedding", np.concatenate(
          [np.zeros_like(value[:, :1]), value], axis=1)
    renamed[key] = value
  model, variables, images, reference = loaded("big_vision_vit")
  converted = import_weights.convert(renamed, "big_vision_vit", variables)
  np.testing.assert_allclose(model.apply(converted, images), reference, atol=1e-4, rtol=1e-4)


def test_torch_reader_refuses_other_classes(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (print, ("never printed",))

  path = tmp_path / "bad.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("bad/data.pkl", pickle.dumps({"x": Exploit()}, protocol=2))
  with pytest.raises(ValueError, match=r"refuses to unpickle (__builtin__|builtins).print"):
    import_weights.read_state_dict(path)


def test_reader_errors_name_the_file(tmp_path):
  with pytest.raises(ValueError, match=r"w.h5: this file is empty"):
    (tmp_path / "w.h5").write_bytes(b"")
    import_weights.read_state_dict(tmp_path / "w.h5")
  with pytest.raises(ValueError, match=r"suffix '.h5'; allowed"):
    (tmp_path / "w.h5").write_bytes(b"not a checkpoint")
    import_weights.read_state_dict(tmp_path / "w.h5")
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match=r"legacy.pth is not a zip archive"):
    import_weights.read_state_dict(legacy)
  with pytest.raises(ValueError, match=r"layout='keras'; allowed: timm_vit"):
    import_weights.convert({}, "keras", {})
  swin = build_model(dict(name="swin"), 3)
  with pytest.raises(ValueError, match=r"layout='timm_vit' loads into model.name='vit'"):
    import_weights.load_reference(FIXTURES / "timm_vit_token.safetensors", "timm_vit", swin, 32)


def test_activation_and_block_form_errors():
  with pytest.raises(ValueError, match=r"model.mlp_activation='swish'; allowed: gelu, "
                                       r"gelu_tanh, silu, relu"):
    layers.activation_fn("swish")
  model = build_model(dict(name="vit", patch_size=8, embed_dim=16, depth=1, num_heads=2,
                           mlp_dim=16, mlp_activation="swish"), 3)
  with pytest.raises(ValueError, match=r"model.mlp_activation='swish'"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))
  model = build_model(dict(name="cct", embed_dim=16, depth=1, num_heads=2, mlp_dim=16,
                           block_form="post_norm"), 3)
  with pytest.raises(ValueError, match=r"model.block_form='post_norm'; allowed: pre_norm, cct"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))


def test_exact_and_tanh_gelu_differ():
  x = np.linspace(-3, 3, 101, dtype=np.float32)
  exact = np.asarray(layers.ACTIVATIONS["gelu"](x))
  erf = np.vectorize(math.erf)
  np.testing.assert_allclose(exact, 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=1e-6)
  assert np.abs(exact - np.asarray(layers.ACTIVATIONS["gelu_tanh"](x))).max() > 1e-4


def test_exact_gelu_gradient_and_dtype():
  x = np.linspace(-6, 6, 241, dtype=np.float32)
  grad = np.asarray(jax.vmap(jax.grad(layers.gelu))(x))
  erf = np.vectorize(math.erf)
  cdf = 0.5 * (1 + erf(x.astype(np.float64) / np.sqrt(2)))
  pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(grad, cdf + x * pdf, atol=1e-6)
  assert layers.gelu(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
  np.testing.assert_array_equal(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True))


def test_swin_older_names(loaded):
  """Older timm and microsoft/Swin-Transformer: merging at the end of a stage, `head.weight`,
  and a stored relative-position index (checked against the one computed here)."""
  from efficient_vit.models import swin
  state = import_weights.read_state_dict(FIXTURES / "timm_swin.safetensors")
  renamed = {}
  for key, value in state.items():
    key = key.replace("layers.1.downsample", "layers.0.downsample").replace("head.fc.", "head.")
    renamed[key] = value
    if key.endswith("relative_position_bias_table"):
      renamed[key.replace("bias_table", "index")] = swin.relative_position_index(4)
  model, variables, images, reference = loaded("timm_swin")
  converted = import_weights.convert(renamed, "timm_swin", variables)
  np.testing.assert_allclose(model.apply(converted, images), reference, atol=1e-4, rtol=1e-4)
  renamed["layers.0.blocks.0.attn.relative_position_index"] = swin.relative_position_index(4).T
  with pytest.raises(ValueError, match=r"relative_position_index.*differs"):
    import_weights.convert(renamed, "timm_swin", variables)
