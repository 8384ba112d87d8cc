"""Every field of a config checked at once, before anything heavy starts.

`validate(config)` applies the rules of the config contract (configs/common.py) and of the
model family that `config.model.name` names: types, ranges and the relations between fields
(divisibility, sizes against the image, the MobileViT and Swin feature maps, splits that
are empty by their own slice), and refuses the first bad value with `ConfigError`:

    config.model.depth=-1; allowed: a positive integer

It imports nothing but the standard library (no JAX, no TensorFlow), so that `launch.py`
runs it right after flag parsing and a bad value is refused within a second. What needs
the devices (batch over devices) or the dataset (split sizes, class count) is checked later
by `train.build`, still before anything is written; the model's own checks at tracing time
stay as a second line.

The families' choice lists are copied here from their modules so that this module needs
none of them; tests/test_validation.py checks that the copies equal the originals.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Sequence

# float32's largest finite value: a float field beyond it is infinite in the train step.
FLOAT32_MAX = 3.4028234663852886e38

# Copies of the choices of the modules that use them (see the module docstring).
CHOICES = {
    "input_pipeline": ("auto", "device", "tfdata"),
    "parallelism": ("shard_map", "pmap", "fsdp"),
    "dtype": ("float32", "bfloat16"),
    "nonfinite": ("stop", "skip"),
    "augment.crop": ("none", "pad", "resize", "inception"),
    "augment.autoaugment": ("none", "cifar10"),
    "augment.random_erasing_mode": ("pixel", "rand", "const"),
    "init_from.layout": ("project", "timm_vit", "big_vision_vit", "timm_swin",
                         "timm_mobilevit", "cct_official"),
    "optimizer.name": ("adamw", "lamb", "sgd"),
    "optimizer.schedule": ("cosine", "step", "constant"),
    "model.name": ("cct", "eanet", "mobilevit", "perceiver", "swin", "vit"),
    "model.attention_impl": ("xla", "cudnn", "auto"),
    "model.mlp_activation": ("gelu", "gelu_tanh", "silu", "relu"),
    # layers.REMATS: none, block and the jax.checkpoint_policies names.
    "model.remat": ("none", "block", "nothing_saveable", "everything_saveable",
                    "dots_saveable", "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                    "checkpoint_dots_with_no_batch_dims"),
    "vit.pooling": ("cls", "gap", "flatten"),
    "eanet.attention": ("external", "self"),
    "cct.tokenizer": ("conv", "patch"),
    "cct.pooling": ("seq", "cls"),
    "cct.position_embedding": ("learned", "sine", "none"),
    "cct.tokenizer_form": ("official", "keras"),
    "cct.block_form": ("pre_norm", "cct"),
    "mobilevit.variant": ("paper", "keras"),
    "mobilevit.conv_padding": ("symmetric", "same"),
    "perceiver.position_encoding": ("fourier", "learned", "none"),
    "perceiver.share_weights": ("none", "after_first", "after_first_cross", "all"),
    "perceiver.cross_attend_form": ("pre_norm", "normalized_stream"),
    "perceiver.cross_attention_scale": ("rsqrt", "learned"),
}
RANDAUGMENT_MAX_MAGNITUDE = 10.0  # augment._LEVEL_MAX
# The defaults of the model fields that the relations below read, for configs that leave
# them out (copied from the models' dataclasses, checked equal by the tests).
MODEL_DEFAULTS = {
    "vit": dict(patch_size=16, embed_dim=384, num_heads=6, head_dim=None, pooling="cls",
                fc_norm=False),
    "eanet": dict(patch_size=2, embed_dim=64, num_heads=4, dim_coefficient=4,
                  memory_units=None),
    "cct": dict(tokenizer="conv", num_conv_layers=1, conv_kernel_size=3, conv_stride=1,
                conv_padding=1, pool_kernel_size=3, pool_stride=2, pool_padding=1,
                tokenizer_form="official", patch_size=4, embed_dim=256, num_heads=4,
                head_dim=None),
    "swin": dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size=7, shift_size=None, merge_after_last_stage=False),
    "mobilevit": dict(variant="paper", strides=(2, 1, 2, 2, 2, 2), mv2_depths=(1, 3),
                      stage_channels=(16, 24, 48, 64, 80), embed_dims=(64, 80, 96),
                      transformer_depths=(2, 4, 3), mlp_dims=(128, 160, 192), num_heads=4,
                      patch_size=2, resize_to_patches=False),
    "perceiver": dict(patch_size=1, latent_dim=1024, latent_heads=8, latent_head_dim=None,
                      cross_attention_heads=1, cross_attention_width=None),
}
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class ConfigError(ValueError):
  """A bad value of one field: `config.FIELD=VALUE; allowed: ...`."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config.{field}={value!r}; allowed: {allowed}")


_MISSING = object()
# A message that starts with `config.FIELD=` or `model.FIELD=` (the model's own checks).
_NAMES_A_FIELD = re.compile(r"^(config\.)?[a-z_]+(\.[a-z_0-9]+)*=")


def _get(config, field: str):
  value = config
  for part in field.split("."):
    try:
      value = value[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return value


class _Checker:
  """The rules, each reading one field of `config` (missing fields are not checked: the
  code that uses them has its defaults)."""

  def __init__(self, config):
    self.config = config
    self.defaults = MODEL_DEFAULTS.get(_get(config, "model.name"), {}) if isinstance(
        _get(config, "model.name"), str) else {}

  def get(self, field: str):
    value = _get(self.config, field)
    if value is _MISSING and field.startswith("model."):
      return self.defaults.get(field.removeprefix("model."), _MISSING)
    return value

  def fail(self, field: str, allowed: str, value: Any = _MISSING):
    raise ConfigError(field, self.get(field) if value is _MISSING else value, allowed)

  def check(self, field: str, ok: Callable[[Any], bool], allowed: str) -> Any:
    value = self.get(field)
    if value is not _MISSING and not ok(value):
      self.fail(field, allowed)
    return value

  def choice(self, field: str, options: Sequence[str] | None = None):
    options = options or CHOICES[field]
    return self.check(field, lambda v: isinstance(v, str) and v in options,
                      ", ".join(options))

  def boolean(self, field: str):
    return self.check(field, lambda v: isinstance(v, bool), "True or False")

  def integer(self, field: str, minimum: int = 1, special: int | None = None,
              allowed: str | None = None):
    """An int >= minimum, or the `special` value (-1: derived)."""
    if allowed is None:
      allowed = {1: "a positive integer", 0: "an integer >= 0"}.get(
          minimum, f"an integer >= {minimum}")
      if special is not None:
        allowed = f"{special} or {allowed}"
    return self.check(field, lambda v: _is_int(v) and (v >= minimum or v == special), allowed)

  def optional_integer(self, field: str, minimum: int = 1):
    return self.check(field, lambda v: v is None or (_is_int(v) and v >= minimum),
                      f"None or {'a positive integer' if minimum == 1 else f'>= {minimum}'}")

  def number(self, field: str, low: float = 0.0, high: float = FLOAT32_MAX, *,
             low_open: bool = False, high_open: bool = False, allowed: str | None = None,
             special: float | None = None):
    """A finite number in [low, high] (either end open), or the `special` value."""
    if allowed is None:
      if high == FLOAT32_MAX and low == 0.0:
        allowed = "a finite number > 0" if low_open else "a finite number >= 0"
      else:
        allowed = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                   f"{')' if high_open else ']'}")
      if special is not None:
        allowed = f"{special:g} or {allowed}"

    def ok(v):
      if special is not None and _is_number(v) and v == special:
        return True
      return (_is_finite(v) and (v > low if low_open else v >= low)
              and (v < high if high_open else v <= high))

    return self.check(field, ok, allowed)

  def sizes(self, field: str, minimum: int = 1, allow_empty: bool = False):
    allowed = ("a tuple of positive integers" if minimum == 1 else
               f"a tuple of integers >= {minimum}")
    if not allow_empty:
      allowed = "a non-empty " + allowed[2:]
    return self.check(field, lambda v: _is_sequence(v) and (allow_empty or len(v) > 0)
                      and all(_is_int(x) and x >= minimum for x in v), allowed)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
  return _is_number(v) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


def _is_sequence(v) -> bool:
  return isinstance(v, (tuple, list))


def _nonempty_str(v) -> bool:
  return isinstance(v, str) and bool(v.strip())


# One part of a TFDS split: name[start:end] with both bounds in one unit (or absent).
_SPLIT_PART = re.compile(r"^\s*(\w+)\s*(?:\[\s*(-?\d+)?\s*(%|shard)?\s*:\s*(-?\d+)?\s*"
                         r"(%|shard)?\s*\])?\s*(?:\(\w+\))?\s*$")


def empty_split(split: str) -> bool:
  """Whether a TFDS split string is empty by its own slice (`train[:0]`, `test[5:5]`,
  `train[60%:40%]`), whatever the dataset. Strings this cannot read are left to TFDS."""
  parts = split.split("+")
  for part in parts:
    match = _SPLIT_PART.match(part)
    if not match:
      return False
    _, start, start_unit, end, end_unit = match.groups()
    if end is None:
      return False
    start_value = int(start) if start is not None else 0
    if start is not None and start_unit != end_unit:
      return False
    if start_value < 0 or int(end) < 0:
      return False
    if int(end) > start_value:
      return False
  return True


def _check_contract(c: _Checker) -> None:
  c.check("dataset", _nonempty_str, "a TFDS dataset name (cifar10, imagenet2012, ...)")
  c.check("data_dir", lambda v: v is None or (_nonempty_str(v) and not (
      os.path.exists(v) and not os.path.isdir(v))), "None (the TFDS default) or a directory")
  c.boolean("download")
  for field in ("train_split", "eval_split"):
    c.check(field, _nonempty_str, "a TFDS split (train, test[:10%], ...)")
    c.check(field, lambda v: not empty_split(v), "a split with at least one example")
  image_size = c.integer("image_size")
  c.choice("input_pipeline")
  c.integer("shuffle_buffer")
  c.integer("batch_size")
  c.integer("eval_batch_size", special=-1)
  c.number("num_epochs", special=-1.0)
  steps = c.integer("num_train_steps", special=-1)
  if c.get("num_epochs") is not _MISSING and c.get("num_epochs") <= 0 and (
      steps is _MISSING or steps <= 0):
    c.fail("num_epochs", "a positive number of epochs, or a positive num_train_steps "
           f"(config.num_train_steps={steps})")
  c.integer("eval_every_steps", special=-1)
  for field in ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    c.integer(field)
  c.check("seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")
  for field in ("parallelism", "dtype", "nonfinite"):
    c.choice(field)
  _check_augment(c, image_size)
  _check_init_from(c)
  _check_optimizer(c, steps)


def _check_augment(c: _Checker, image_size: int) -> None:
  for field in ("augment.crop", "augment.autoaugment", "augment.random_erasing_mode"):
    c.choice(field)
  c.integer("augment.crop_padding", minimum=0)
  c.check("augment.resize_size", lambda v: _is_int(v) and (v == -1 or v >= image_size),
          f"-1 (config.image_size) or a side >= config.image_size={image_size}")
  c.boolean("augment.flip")
  c.number("augment.zoom", 0.0, 1.0, high_open=True)
  c.number("augment.rotation")
  for field in ("augment.contrast", "augment.colour_jitter"):
    c.number(field, 0.0, 1.0)
  c.check("augment.crop_scale", lambda v: _is_sequence(v) and len(v) == 2 and all(
      _is_finite(x) for x in v) and 0 < v[0] <= v[1] <= 1,
          "(min, max) with 0 < min <= max <= 1")
  c.number("augment.eval_crop_fraction", 0.0, 1.0, low_open=True)
  ops = c.integer("augment.randaugment_num_ops", minimum=0)
  c.number("augment.randaugment_magnitude", 0.0, RANDAUGMENT_MAX_MAGNITUDE)
  c.number("augment.randaugment_magnitude_std")
  if ops and c.get("augment.autoaugment") not in ("none", _MISSING):
    c.fail("augment.autoaugment", "'none' while config.augment.randaugment_num_ops="
           f"{ops} (one of the two)")
  for field in ("augment.random_erasing_prob", "augment.mix_prob", "augment.mix_switch_prob"):
    c.number(field, 0.0, 1.0)
  mixing = False
  for field in ("augment.mixup_alpha", "augment.cutmix_alpha"):
    mixing = bool(c.number(field)) or mixing
  c.number("augment.mix_stop_epoch", special=-1.0)
  if mixing and c.get("batch_size") % 2:
    c.fail("batch_size", "an even batch when Mixup or CutMix is on (each example is mixed "
           "with its mirror in the batch)")


def _check_init_from(c: _Checker) -> None:
  layout = c.choice("init_from.layout")
  c.integer("init_from.image_size", special=-1)
  path = c.check("init_from.path", lambda v: v is None or _nonempty_str(v),
                 "None or a path")
  if path in (None, _MISSING):
    return
  if layout == "project":
    if not os.path.isfile(os.path.join(path, "model.json")):
      c.fail("init_from.path", "a workdir of this project (with model.json and "
             "checkpoints/), or a reference checkpoint file with config.init_from.layout "
             "set to its layout")
    return
  problem = file_problem(path)
  if problem:
    c.fail("init_from.path", f"a local {layout} checkpoint (.safetensors, .npz, .pth, "
           f".bin); {problem}")


def file_problem(path: str) -> str | None:
  """What is wrong with a checkpoint file at `path` before it is parsed (missing, a
  directory, empty, a git-lfs pointer), or None."""
  if not os.path.exists(path):
    return "there is no such file"
  if not os.path.isfile(path):
    return "this is not a file"
  size = os.path.getsize(path)
  if size == 0:
    return "this file is empty"
  with open(path, "rb") as f:
    head = f.read(len(GIT_LFS_POINTER))
  if head == GIT_LFS_POINTER:
    return (f"this file is a git-lfs pointer ({size} bytes), not the checkpoint: fetch it "
            "with `git lfs pull`")
  return None


def _check_optimizer(c: _Checker, steps) -> None:
  c.choice("optimizer.name")
  c.choice("optimizer.schedule")
  lr = c.number("optimizer.learning_rate")
  c.number("optimizer.weight_decay")
  warmup = c.integer("optimizer.warmup_steps", minimum=0)
  for field in ("optimizer.warmup_epochs", "optimizer.warmup_start_learning_rate",
                "optimizer.cooldown_epochs", "optimizer.grad_clip_norm"):
    c.number(field)
  if lr is not _MISSING:
    c.number("optimizer.min_learning_rate", 0.0, lr,
             allowed=f"from 0 to config.optimizer.learning_rate={lr}")
  if (steps is not _MISSING and steps > 0 and warmup is not _MISSING and warmup
      and warmup >= steps and not c.get("optimizer.warmup_epochs")
      and not c.get("optimizer.cooldown_epochs")):
    c.fail("optimizer.warmup_steps", f"fewer steps than the run's {steps} "
           "(config.num_train_steps)")
  c.check("optimizer.decay_epochs", lambda v: _is_sequence(v) and all(
      _is_finite(x) and x >= 0 for x in v), "a tuple of epochs >= 0")
  c.number("optimizer.decay_factor", low_open=True)
  c.number("optimizer.label_smoothing", 0.0, 1.0)
  for field in ("optimizer.b1", "optimizer.b2", "optimizer.momentum", "optimizer.ema_decay"):
    c.number(field, 0.0, 1.0, high_open=True)
  c.integer("optimizer.grad_accum_steps")


# ------------------------------------------------------------------------------------------
# The model families. Each rule names the field as `model.FIELD`.

def _common_model_fields(c: _Checker, rates: Sequence[str]) -> None:
  for field in ("model.scan",):
    c.boolean(field)
  for field in ("model.remat", "model.attention_impl", "model.mlp_activation"):
    c.choice(field)
  for field in rates:
    c.number(f"model.{field}", 0.0, 1.0, high_open=True)
  c.number("model.norm_epsilon", low_open=True)


def _divides_image(c: _Checker, field: str, image_size: int) -> None:
  value = c.integer(field)
  if value is not _MISSING and image_size % value:
    c.fail(field, f"a side that divides config.image_size={image_size}")


def _heads_divide(c: _Checker, heads_field: str, width_field: str,
                  head_dim_field: str | None = None) -> None:
  heads, width = c.get(heads_field), c.get(width_field)
  if head_dim_field and c.get(head_dim_field) not in (None, _MISSING):
    return
  if heads is not _MISSING and width is not _MISSING and width % heads:
    c.fail(heads_field, f"a number of heads that divides config.{width_field}={width}"
           + (f" (or set config.{head_dim_field})" if head_dim_field else ""))


def _transformer(c: _Checker, heads="model.num_heads", width="model.embed_dim",
                 head_dim="model.head_dim") -> None:
  for field in (width, "model.depth", heads, "model.mlp_dim"):
    c.integer(field)
  c.optional_integer(head_dim)
  _heads_divide(c, heads, width, head_dim)


def _vit(c: _Checker, image_size: int) -> None:
  _common_model_fields(c, ("dropout_rate", "attention_dropout_rate", "drop_path_rate",
                           "head_dropout_rate"))
  _divides_image(c, "model.patch_size", image_size)
  _transformer(c)
  pooling = c.choice("model.pooling", CHOICES["vit.pooling"])
  c.sizes("model.head_hidden_dims", allow_empty=True)
  for field in ("model.mlp_activate_last", "model.qkv_bias", "model.proj_bias",
                "model.fc_norm"):
    c.boolean(field)
  if c.get("model.fc_norm") is True and pooling != "gap":
    c.fail("model.fc_norm", f"False, or True with config.model.pooling='gap' (not {pooling!r})")


def _eanet(c: _Checker, image_size: int) -> None:
  _common_model_fields(c, ("dropout_rate", "attention_dropout_rate", "drop_path_rate"))
  _divides_image(c, "model.patch_size", image_size)
  _transformer(c)
  c.choice("model.attention", CHOICES["eanet.attention"])
  # External attention splits the width over the heads whatever head_dim says.
  _heads_divide(c, "model.num_heads", "model.embed_dim")
  coefficient = c.integer("model.dim_coefficient")
  units = c.optional_integer("model.memory_units")
  width = c.get("model.embed_dim")
  if units in (None, _MISSING) and coefficient is not _MISSING and width // coefficient < 1:
    c.fail("model.dim_coefficient", f"at most config.model.embed_dim={width} (the memory "
           "units are embed_dim // dim_coefficient), or set config.model.memory_units")


def conv_tokenizer_side(side: int, num_layers: int, kernel_size: int, stride: int,
                        padding: int, pool_kernel_size: int, pool_stride: int,
                        pool_padding: int, form: str = "official") -> int:
  """models/cct.py's `conv_tokenizer_side` (the side of the map after the tokenizer)."""
  for _ in range(num_layers):
    if form == "keras":
      side = (side - kernel_size) // stride + 1 + 2 * padding
      side = -(-side // pool_stride)
    else:
      side = (side + 2 * padding - kernel_size) // stride + 1
      side = (side + 2 * pool_padding - pool_kernel_size) // pool_stride + 1
  return side


def _cct(c: _Checker, image_size: int) -> None:
  _common_model_fields(c, ("dropout_rate", "attention_dropout_rate", "drop_path_rate"))
  tokenizer = c.choice("model.tokenizer", CHOICES["cct.tokenizer"])
  for field in ("pooling", "position_embedding", "tokenizer_form", "block_form"):
    c.choice(f"model.{field}", CHOICES[f"cct.{field}"])
  fields = ("num_conv_layers", "conv_kernel_size", "conv_stride", "conv_padding",
            "pool_kernel_size", "pool_stride", "pool_padding")
  for field in fields:
    c.integer(f"model.{field}", minimum=0 if field.endswith("padding") else 1)
  c.integer("model.conv_channels")
  if tokenizer == "conv" and all(c.get(f"model.{f}") is not _MISSING for f in fields):
    side = conv_tokenizer_side(image_size, *(c.get(f"model.{f}") for f in fields),
                               form=c.get("model.tokenizer_form"))
    if side < 1:
      c.fail("model.num_conv_layers", f"fewer convolution + pooling layers: these leave no "
             f"tokens of a {image_size}x{image_size} image (config.image_size)")
  if tokenizer == "patch":
    _divides_image(c, "model.patch_size", image_size)
  else:
    c.integer("model.patch_size")
  _transformer(c)
  for field in ("model.qkv_bias", "model.mlp_activate_last"):
    c.boolean(field)


def _swin(c: _Checker, image_size: int) -> None:
  _common_model_fields(c, ("dropout_rate", "attention_dropout_rate", "drop_path_rate"))
  _divides_image(c, "model.patch_size", image_size)
  width = c.integer("model.embed_dim")
  depths = c.sizes("model.depths", minimum=0)
  heads = c.sizes("model.num_heads")
  if len(depths) != len(heads):
    c.fail("model.num_heads", f"one entry per stage of config.model.depths={tuple(depths)}")
  window = c.integer("model.window_size")
  shift = c.optional_integer("model.shift_size", minimum=0)
  shift = window // 2 if shift is None else shift
  if shift >= window:
    c.fail("model.shift_size", f"None (window_size // 2) or from 0 to "
           f"config.model.window_size - 1 = {window - 1}")
  c.number("model.mlp_ratio", low_open=True)
  for field in ("patch_norm", "absolute_position_embedding", "merge_after_last_stage",
                "merge_norm", "final_norm", "qkv_bias"):
    c.boolean(f"model.{field}")
  side = image_size // c.get("model.patch_size")
  for stage, stage_heads in enumerate(heads):
    dim = width * 2**stage
    if dim % stage_heads:
      c.fail("model.num_heads", f"heads that divide each stage's width (embed_dim x 2 per "
             f"stage: {dim} in stage {stage})")
    stage_window = side if side <= window else window
    if side % stage_window:
      c.fail("model.window_size", f"a window that divides every stage's feature map: stage "
             f"{stage} sees {side}x{side} (image_size {image_size} / patch_size, halved per "
             "stage; no padding is done)")
    if stage < len(heads) - 1 or c.get("model.merge_after_last_stage") is True:
      if side % 2:
        c.fail("image_size", "a size whose feature map "
               f"(image_size / patch_size, halved per stage) is even before each patch "
               f"merging: stage {stage} sees {side}x{side}", value=image_size)
      side //= 2


def mobilevit_maps(image_size: int, strides: Sequence[int], num_mv2_stages: int) -> list[int]:
  """The side of the feature map each MobileViT stage's transformer sees: every stride-2
  convolution (padded, kernel 3) halves a side, rounding up."""
  side = image_size
  sides = []
  for stage, stride in enumerate(strides):
    side = -(-side // stride)
    if stage > num_mv2_stages:  # strides[0] is the stem's.
      sides.append(side)
  return sides


def _mobilevit(c: _Checker, image_size: int) -> None:
  _common_model_fields(c, ("dropout_rate", "attention_dropout_rate", "head_dropout_rate"))
  variant = c.choice("model.variant", CHOICES["mobilevit.variant"])
  c.choice("model.conv_padding", CHOICES["mobilevit.conv_padding"])
  c.check("model.depthwise_padding", lambda v: v is None or v in CHOICES[
      "mobilevit.conv_padding"], "None (as conv_padding), "
          + ", ".join(CHOICES["mobilevit.conv_padding"]))
  for field in ("stem_channels", "expansion", "num_heads", "patch_size", "last_channels"):
    c.integer(f"model.{field}")
  mv2 = c.sizes("model.mv2_depths", allow_empty=True)  # the keras layout has no MV2 stage
  dims = c.sizes("model.embed_dims")
  for field in ("model.transformer_depths", "model.mlp_dims"):
    if len(c.sizes(field)) != len(dims):
      c.fail(field, f"one entry per MobileViT stage of config.model.embed_dims={tuple(dims)}")
  if len(c.sizes("model.stage_channels")) != len(mv2) + len(dims):
    c.fail("model.stage_channels", f"{len(mv2) + len(dims)} entries (len(mv2_depths) + "
           "len(embed_dims))")
  strides = c.check("model.strides", lambda v: _is_sequence(v) and len(v) == len(mv2) + len(
      dims) + 1 and all(_is_int(s) and s in (1, 2) for s in v),
                    f"{len(mv2) + len(dims) + 1} entries (stem + stages), each 1 or 2")
  heads = c.get("model.num_heads")
  if variant == "paper" and any(d % heads for d in dims):
    c.fail("model.num_heads", f"a number of heads that divides every entry of "
           f"config.model.embed_dims={tuple(dims)}")
  c.boolean("model.resize_to_patches")
  patch = c.get("model.patch_size")
  if c.get("model.resize_to_patches") is not True:
    for stage, side in enumerate(mobilevit_maps(image_size, strides, len(mv2))):
      if side % patch:
        c.fail("image_size", f"a size whose MobileViT maps are multiples of "
               f"config.model.patch_size={patch} (MobileViT stage {stage} sees {side}x{side}),"
               " or config.model.resize_to_patches=True", value=image_size)


def _perceiver(c: _Checker, image_size: int) -> None:
  _common_model_fields(c, ("dropout_rate", "attention_dropout_rate", "head_dropout_rate"))
  _divides_image(c, "model.patch_size", image_size)
  for field in ("position_encoding", "share_weights", "cross_attend_form",
                "cross_attention_scale"):
    c.choice(f"model.{field}", CHOICES[f"perceiver.{field}"])
  for field in ("num_bands", "num_latents", "latent_dim", "num_iterations",
                "cross_attention_heads", "latent_depth", "latent_heads"):
    c.integer(f"model.{field}")
  for field in ("input_embedding_dim", "max_resolution", "cross_attention_width",
                "latent_head_dim", "mlp_dim"):
    c.optional_integer(f"model.{field}")
  _heads_divide(c, "model.latent_heads", "model.latent_dim", "model.latent_head_dim")
  if c.get("model.cross_attention_width") not in (None, _MISSING):
    _heads_divide(c, "model.cross_attention_heads", "model.cross_attention_width")
  c.sizes("model.head_hidden_dims", allow_empty=True)
  for field in ("final_norm", "cross_attention_output_projection"):
    c.boolean(f"model.{field}")


FAMILIES: dict[str, Callable[[_Checker, int], None]] = {
    "vit": _vit, "eanet": _eanet, "cct": _cct, "swin": _swin, "mobilevit": _mobilevit,
    "perceiver": _perceiver,
}


def validate(config) -> None:
  """Raises `ConfigError` for the first bad field of `config` (module docstring)."""
  c = _Checker(config)
  _check_contract(c)
  name = c.choice("model.name")
  if name is not _MISSING:
    FAMILIES[name](c, c.get("image_size"))


def names_a_field(message: str) -> bool:
  """Whether `message` starts as `config.FIELD=` or `model.FIELD=` (an error about a value)."""
  return bool(_NAMES_A_FIELD.match(message))


def one_line(error: BaseException) -> str:
  """The message of an input error as launch.py prints it: `config error: FIELD=VALUE;
  allowed: ...` for config fields, the error's own first line otherwise."""
  message = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, ConfigError) or names_a_field(message):
    return "config error: " + message.removeprefix("config.")
  return "error: " + message
