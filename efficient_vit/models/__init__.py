"""The model registry: the one place where a config's `model.name` becomes a module.

The trainer, the benchmark and the notebooks build models only through `build_model`,
so a new family needs one line here and a file of its own.

One vocabulary across the families (timm's where it has a word for the idea): `embed_dim`
is the token width (`embed_dims` per stage in MobileViT); `num_heads`, `head_dim`, `depth`;
`mlp_dim` the MLP's hidden width (big_vision's word; Swin keeps the paper's `mlp_ratio`);
`mlp_activation`, `norm_epsilon` (LayerNorm), `qkv_bias`, `proj_bias`, `block_form`,
`dropout_rate`, `attention_dropout_rate`, `drop_path_rate`; `scan`, `remat` and
`attention_impl` (how the blocks are compiled and attention is computed, never what:
`efficient_vit.layers`). The Perceiver keeps the paper's `latent_dim` and
`input_embedding_dim`: two arrays of different widths.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

# name -> (module, class). Imported lazily so that one family's import cost or error does
# not reach the others.
REGISTRY: dict[str, tuple[str, str]] = {
    "vit": ("efficient_vit.models.vit", "ViT"),
    "perceiver": ("efficient_vit.models.perceiver", "Perceiver"),
    "eanet": ("efficient_vit.models.eanet", "EANet"),
    "cct": ("efficient_vit.models.cct", "CCT"),
    "swin": ("efficient_vit.models.swin", "SwinTransformer"),
    "mobilevit": ("efficient_vit.models.mobilevit", "MobileViT"),
}


def model_class(name: str) -> type[nn.Module]:
  if name not in REGISTRY:
    raise ValueError(f"model.name={name!r}; allowed: {', '.join(sorted(REGISTRY))}")
  module, cls = REGISTRY[name]
  return getattr(importlib.import_module(module), cls)


def build_model(model_config: Mapping[str, Any], num_classes: int,
                dtype: Any = jnp.float32) -> nn.Module:
  """Builds the module named by `model_config['name']` from the rest of its fields.

  Unknown fields are an error that lists the fields the model accepts.
  """
  fields = dict(model_config)
  name = fields.pop("name", None)
  cls = model_class(name)
  allowed = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
  unknown = sorted(set(fields) - allowed)
  if unknown:
    raise ValueError(f"model.{unknown[0]} is not a field of model {name!r}; "
                     f"allowed: {', '.join(sorted(allowed - {'num_classes', 'dtype'}))}")
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return cls(num_classes=num_classes, dtype=dtype, **fields)
