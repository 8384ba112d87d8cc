"""Train-time augmentation, written once in JAX and run inside the jitted train step.

Both input pipelines (tf.data on the host, the device-resident split) deliver uint8 images
[batch, H, W, 3] of one fixed size and nothing else; `apply_batch` then does every random
per-example op and the batch ops, on whatever devices the step runs on:

  per example (`augment_example`, vmapped):
    random crop (`crop=pad`: pad + crop; `crop=resize`: crop of the delivered larger image)
    -> horizontal flip -> the Keras examples' zoom / rotation (reflecting borders) and
    contrast -> AutoAugment (CIFAR-10 policy) or RandAugment (timm's `rand-mM-mstdS-inc1`)
    -> colour jitter -> normalisation (x / 255 - mean) / std -> random erasing
  per batch (`mix`): Mixup or CutMix (timm's `Mixup`, mode `batch`), targets with label
    smoothing folded in.

Randomness: each example's key is folded from (the run's key, step, the example's index in
the GLOBAL batch), and the batch's mixing key from (the run's key, step), so the augmented
global batch depends neither on the input pipeline nor on the number of devices or
processes, and a resumed run sees the same pixels as one that never stopped. Mixup pairs
example i with example B - 1 - i of the global batch (timm's `flip(0)`); across devices
that partner lives on device n - 1 - d, fetched with one `ppermute`.

Ops are picked per example with `lax.switch`, which under `vmap` evaluates every branch
and selects: cheap at CIFAR size, about (number of ops) x the cost of one op per layer.

Value conventions follow the references: RandAugment's ops act on pixel values in
[0, 255] as timm's PIL ops do (timm/data/auto_augment.py); AutoAugment's magnitudes are
torchvision's bins (torchvision/transforms/autoaugment.py, `AutoAugmentPolicy.CIFAR10`).
"""

from __future__ import annotations

import dataclasses
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

CROPS = ("none", "pad", "resize", "inception")
AUTOAUGMENT_POLICIES = ("none", "cifar10")
ERASING_MODES = ("pixel", "rand", "const")
# A fixed tag folded into the run's key, so augmentation keys differ from dropout keys.
_AUGMENT_TAG = 0xA06A06
_LEVEL_MAX = 10.0  # timm's _LEVEL_DENOM / magnitude_max.


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """What the train step does to a uint8 batch (static: part of the compiled step)."""

  image_size: int
  num_classes: int
  mean: tuple[float, ...]  # Per-channel, of pixels in [0, 1].
  std: tuple[float, ...]
  label_smoothing: float = 0.0
  crop: str = "none"
  crop_padding: int = 0
  flip: bool = False
  zoom: float = 0.0
  rotation: float = 0.0
  contrast: float = 0.0
  randaugment_num_ops: int = 0
  randaugment_magnitude: float = 0.0
  randaugment_magnitude_std: float = 0.0
  autoaugment: str = "none"
  colour_jitter: float = 0.0
  random_erasing_prob: float = 0.0
  random_erasing_mode: str = "pixel"
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  mix_stop_step: int = -1  # Mixing stops at this step (-1: never).

  @property
  def fill(self) -> tuple[float, ...]:
    """The fill colour of RandAugment's geometric ops: the mean pixel, as timm's img_mean."""
    return tuple(float(min(255, round(255 * m))) for m in self.mean)


def from_config(config, num_classes: int, steps_per_epoch: int,
                mean: tuple[float, ...], std: tuple[float, ...]) -> Augmentation:
  """The `Augmentation` of `config.augment` (validated first)."""
  validate(config)
  aug = config.augment
  stop = (-1 if aug.mix_stop_epoch < 0
          else int(round(aug.mix_stop_epoch * steps_per_epoch)))
  return Augmentation(
      image_size=config.image_size, num_classes=num_classes, mean=tuple(mean),
      std=tuple(std), label_smoothing=config.optimizer.label_smoothing, crop=aug.crop,
      crop_padding=aug.crop_padding, flip=aug.flip, zoom=aug.zoom, rotation=aug.rotation,
      contrast=aug.contrast, randaugment_num_ops=aug.randaugment_num_ops,
      randaugment_magnitude=aug.randaugment_magnitude,
      randaugment_magnitude_std=aug.randaugment_magnitude_std, autoaugment=aug.autoaugment,
      colour_jitter=aug.colour_jitter, random_erasing_prob=aug.random_erasing_prob,
      random_erasing_mode=aug.random_erasing_mode, mixup_alpha=aug.mixup_alpha,
      cutmix_alpha=aug.cutmix_alpha, mix_prob=aug.mix_prob,
      mix_switch_prob=aug.mix_switch_prob, mix_stop_step=stop)


def validate(config) -> None:
  """Clear errors for bad `config.augment` values: `augment.FIELD=VALUE; allowed: ...`."""
  aug = config.augment

  def check(field, ok, allowed):
    if not ok:
      raise ValueError(f"config.augment.{field}={getattr(aug, field)!r}; allowed: {allowed}")

  check("crop", aug.crop in CROPS, ", ".join(CROPS))
  check("autoaugment", aug.autoaugment in AUTOAUGMENT_POLICIES,
        ", ".join(AUTOAUGMENT_POLICIES))
  check("random_erasing_mode", aug.random_erasing_mode in ERASING_MODES,
        ", ".join(ERASING_MODES))
  check("crop_padding", aug.crop_padding >= 0, ">= 0")
  check("eval_crop_fraction", 0 < aug.eval_crop_fraction <= 1, "a fraction in (0, 1]")
  check("crop_scale", len(aug.crop_scale) == 2 and 0 < aug.crop_scale[0] <= aug.crop_scale[1]
        <= 1, "(min, max) with 0 < min <= max <= 1")
  for field in ("zoom", "rotation", "contrast", "colour_jitter", "randaugment_magnitude_std",
                "mixup_alpha", "cutmix_alpha"):
    check(field, getattr(aug, field) >= 0, ">= 0")
  check("zoom", aug.zoom < 1, "< 1 (a scale in [1 - zoom, 1 + zoom])")
  check("randaugment_num_ops", aug.randaugment_num_ops >= 0, ">= 0 (0: no RandAugment)")
  check("randaugment_magnitude", 0 <= aug.randaugment_magnitude <= _LEVEL_MAX,
        f"0 to {_LEVEL_MAX:g}")
  for field in ("random_erasing_prob", "mix_prob", "mix_switch_prob"):
    check(field, 0 <= getattr(aug, field) <= 1, "a probability in [0, 1]")
  if aug.randaugment_num_ops and aug.autoaugment != "none":
    raise ValueError(f"config.augment.autoaugment={aug.autoaugment!r} with "
                     f"config.augment.randaugment_num_ops={aug.randaugment_num_ops}; allowed: "
                     "one of the two (set the other to 'none' / 0)")
  if (aug.mixup_alpha or aug.cutmix_alpha) and config.batch_size % 2:
    raise ValueError(f"config.batch_size={config.batch_size} with mixing on; allowed: an "
                     "even batch (each example is mixed with its mirror in the batch)")


def normalise(images: jax.Array, mean, std) -> jax.Array:
  """uint8 (or float in [0, 255]) [..., C] -> float32 (x / 255 - mean) / std."""
  return ((images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32))
          / jnp.asarray(std, jnp.float32))


# ----------------------------------------------------------------------------------------
# Geometry.

def _affine(image: jax.Array, matrix, offset, mode: str, fill=None) -> jax.Array:
  """Output pixel (y, x) reads input (y, x) @ matrix.T + offset (2 x 2 over (y, x)),
  bilinear; `fill` (per channel) outside the image when mode='constant'."""
  full = jnp.zeros((3, 3), jnp.float32).at[:2, :2].set(matrix).at[2, 2].set(1.0)
  shift = jnp.concatenate([jnp.asarray(offset, jnp.float32), jnp.zeros((1,))])
  if mode == "constant":
    fill = jnp.asarray(fill, jnp.float32)
    return pix.affine_transform(image - fill, full, offset=shift, order=1,
                                mode="constant", cval=0.0) + fill
  return pix.affine_transform(image, full, offset=shift, order=1, mode=mode)


def _about_centre(image, matrix, mode, fill=None):
  """The affine map `matrix` (over (y, x)) applied about the image centre."""
  h, w = image.shape[:2]
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
  matrix = jnp.asarray(matrix, jnp.float32)
  return _affine(image, matrix, centre - matrix @ centre, mode, fill)


def zoom_and_rotate(image: jax.Array, scale, angle) -> jax.Array:
  """The Keras examples' RandomZoom / RandomRotation: output pixel p reads input
  c + scale * R(angle) (p - c), c the centre, bilinear, reflecting at the borders."""
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Over (y, x): src_y = s (sin dx + cos dy), src_x = s (cos dx - sin dy).
  matrix = scale * jnp.array([[cos, sin], [-sin, cos]])
  return _about_centre(image, matrix, "reflect")


# ----------------------------------------------------------------------------------------
# Pixel ops on float images with values in [0, 255] (PIL's semantics, as timm uses them).

def _gray(image):
  """PIL's 'L' conversion: (299 R + 587 G + 114 B) / 1000."""
  return image @ jnp.array([0.299, 0.587, 0.114], jnp.float32)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0)


def brightness(image, factor):
  return _blend(jnp.zeros_like(image), image, factor)


def colour(image, factor):
  return _blend(_gray(image)[..., None], image, factor)


def contrast(image, factor):
  return _blend(jnp.round(_gray(image).mean()), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13); borders kept."""
  kernel = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
  smooth = jax.vmap(lambda c: jax.scipy.signal.convolve2d(c, kernel, mode="same"),
                    in_axes=-1, out_axes=-1)(image)
  h, w = image.shape[:2]
  inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(jnp.where(inner, jnp.round(smooth), image), image, factor)


def invert(image):
  return 255.0 - image


def solarize(image, threshold):
  """Pixels >= threshold inverted."""
  return jnp.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  return jnp.where(image < threshold, jnp.clip(image + addition, 0.0, 255.0), image)


def posterize(image, bits):
  """Keeps the `bits` high bits of each (uint8) value."""
  shift = (8 - bits).astype(jnp.uint32)
  values = jnp.round(image).astype(jnp.uint32)
  return ((values >> shift) << shift).astype(jnp.float32)


def autocontrast(image):
  """Per channel, stretches [min, max] to [0, 255] (unchanged where min == max)."""
  lo, hi = image.min(axis=(0, 1)), image.max(axis=(0, 1))
  scale = 255.0 / jnp.maximum(hi - lo, 1e-6)
  return jnp.where(hi > lo, jnp.clip(jnp.round((image - lo) * scale), 0.0, 255.0), image)


def equalize(image):
  """PIL ImageOps.equalize, per channel."""

  def channel(c):
    values = jnp.round(c).astype(jnp.int32).reshape(-1)
    hist = jnp.bincount(values, length=256)
    last = hist[255 - jnp.argmax(hist[::-1] > 0)]
    step = (values.size - last) // 255
    lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
    out = jnp.minimum(lut, 255)[values].reshape(c.shape).astype(jnp.float32)
    return jnp.where(step > 0, out, c)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def _geometry(name: str, arg, size: int):
  """The affine map (2 x 2 matrix over (y, x), offset) of a geometric op with argument
  `arg`, as PIL's transforms that timm and torchvision use: rotation about the centre by
  `arg` degrees; shear x = x + arg y (y likewise); translation by `arg` pixels."""
  if name == "Rotate":
    a = jnp.deg2rad(arg)
    # Counter-clockwise, as PIL's Image.rotate: output (y, x) reads input R (y, x).
    matrix = jnp.stack([jnp.stack([jnp.cos(a), jnp.sin(a)]),
                        jnp.stack([-jnp.sin(a), jnp.cos(a)])])
    centre = jnp.full((2,), (size - 1) / 2, jnp.float32)
    snap = lambda v: jnp.round(v * 1e5) / 1e5  # cos(90 deg) = 0, not -4e-8 (borders).
    return snap(matrix), snap(centre - matrix @ centre)
  zero, one = jnp.zeros_like(arg), jnp.ones_like(arg)
  return {"ShearX": (jnp.stack([jnp.stack([one, zero]), jnp.stack([arg, one])]),
                     jnp.zeros(2)),
          "ShearY": (jnp.stack([jnp.stack([one, arg]), jnp.stack([zero, one])]),
                     jnp.zeros(2)),
          "TranslateX": (jnp.eye(2), jnp.stack([zero, arg])),
          "TranslateY": (jnp.eye(2), jnp.stack([arg, zero]))}[name]


# The op set of RandAugment and AutoAugment, each a function of (image, argument): the
# pixel ops, then the geometric ones (which share one affine resampling).
_PIXEL_OPS = {
    "AutoContrast": lambda x, a: autocontrast(x),
    "Equalize": lambda x, a: equalize(x),
    "Invert": lambda x, a: invert(x),
    "Posterize": lambda x, a: posterize(x, a.astype(jnp.int32)),  # a: bits kept.
    "Solarize": solarize,  # a: threshold.
    "SolarizeAdd": solarize_add,  # a: value added below 128.
    "Color": colour,  # a: enhance factor (1: the image itself), as the next three.
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
}
_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
OPS = tuple(_PIXEL_OPS) + _GEOMETRIC_OPS


def apply_op(image, index, arg, fill):
  """Op OPS[index] (a traced index) with argument `arg` on a float image in [0, 255].
  Under vmap every pixel op is computed and one selected, plus one affine resampling for
  all the geometric ops: the cost of per-example random op choice."""
  n = len(_PIXEL_OPS)
  branches = list(_PIXEL_OPS.values()) + [lambda x, a: x]
  out = jax.lax.switch(jnp.minimum(index, n), branches, image, arg)
  size = image.shape[0]
  maps = [_geometry(name, arg, size) for name in _GEOMETRIC_OPS]
  which = jnp.clip(index - n, 0, len(maps) - 1)
  matrix = jnp.stack([m for m, _ in maps])[which]
  offset = jnp.stack([o for _, o in maps])[which]
  warped = _affine(image, matrix, offset, "constant", fill)
  return jnp.where(index >= n, warped, out)


def _signed(u, value):
  """`value` with a random sign (timm's _randomly_negate), `u` uniform in [0, 1)."""
  return jnp.where(u < 0.5, -value, value)


# timm's RandAugment op set with `inc1` (_RAND_INCREASING_TRANSFORMS): (timm's name, op,
# argument from (level in [0, 10], sign draw u, image side)) with timm's level-to-argument
# mapping (timm/data/auto_augment.py LEVEL_TO_ARG; _LEVEL_DENOM = 10, translate_pct 0.45).
_RANDAUGMENT = (
    ("AutoContrast", "AutoContrast", lambda m, u, s: 0.0),
    ("Equalize", "Equalize", lambda m, u, s: 0.0),
    ("Invert", "Invert", lambda m, u, s: 0.0),
    ("Rotate", "Rotate", lambda m, u, s: _signed(u, m / _LEVEL_MAX * 30.0)),
    ("PosterizeIncreasing", "Posterize", lambda m, u, s: 4 - jnp.floor(m / _LEVEL_MAX * 4)),
    ("SolarizeIncreasing", "Solarize", lambda m, u, s: 256 - jnp.floor(m / _LEVEL_MAX * 256)),
    ("SolarizeAdd", "SolarizeAdd", lambda m, u, s: jnp.floor(m / _LEVEL_MAX * 110)),
    ("ColorIncreasing", "Color", lambda m, u, s: 1 + _signed(u, m / _LEVEL_MAX * 0.9)),
    ("ContrastIncreasing", "Contrast", lambda m, u, s: 1 + _signed(u, m / _LEVEL_MAX * 0.9)),
    ("BrightnessIncreasing", "Brightness",
     lambda m, u, s: 1 + _signed(u, m / _LEVEL_MAX * 0.9)),
    ("SharpnessIncreasing", "Sharpness",
     lambda m, u, s: 1 + _signed(u, m / _LEVEL_MAX * 0.9)),
    ("ShearX", "ShearX", lambda m, u, s: _signed(u, m / _LEVEL_MAX * 0.3)),
    ("ShearY", "ShearY", lambda m, u, s: _signed(u, m / _LEVEL_MAX * 0.3)),
    ("TranslateXRel", "TranslateX", lambda m, u, s: _signed(u, m / _LEVEL_MAX * 0.45 * s)),
    ("TranslateYRel", "TranslateY", lambda m, u, s: _signed(u, m / _LEVEL_MAX * 0.45 * s)),
)
RANDAUGMENT_OPS = tuple(name for name, _, _ in _RANDAUGMENT)


def randaugment(image, key, num_ops: int, magnitude: float, magnitude_std: float, fill):
  """timm's RandAugment (`rand-m{magnitude}-mstd{magnitude_std}-inc1`): `num_ops` ops
  drawn uniformly with replacement, each applied with probability 0.5 at a magnitude drawn
  from N(magnitude, magnitude_std) clipped to [0, 10]. The layers are a `lax.scan`, so the
  op set is compiled once whatever `num_ops`."""
  size = image.shape[0]
  op_index = jnp.array([OPS.index(op) for _, op, _ in _RANDAUGMENT])
  k_uniform, k_normal = jax.random.split(key)
  draws = jax.random.uniform(k_uniform, (num_ops, 3))  # op, apply, sign.
  levels = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_normal, (num_ops,)),
                    0.0, _LEVEL_MAX)

  def layer(x, inputs):
    (u_op, u_apply, u_sign), level = inputs
    choice = jnp.minimum(jnp.floor(u_op * len(_RANDAUGMENT)).astype(jnp.int32),
                         len(_RANDAUGMENT) - 1)
    args = jnp.stack([jnp.asarray(arg(level, u_sign, size), jnp.float32)
                      for _, _, arg in _RANDAUGMENT])
    out = apply_op(x, op_index[choice], args[choice], fill)
    return jnp.where(u_apply < 0.5, out, x), None

  return jax.lax.scan(layer, image, (draws, levels))[0]


# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, appendix table; as torchvision's
# AutoAugmentPolicy.CIFAR10): 25 sub-policies of two (op, probability, magnitude bin 0-9).
_CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.2, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def _autoaugment_table(size: int):
  """Per sub-policy and slot: op index, probability, and the argument's base, magnitude
  and whether it gets a random sign, from torchvision's magnitude bins (10 bins spanning
  each op's range: torchvision/transforms/autoaugment.py `_augmentation_space`)."""
  span = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331, "TranslateY": 150 / 331,
          "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
  index, prob, base, value, signed = (np.zeros((25, 2), dtype) for dtype in
                                      (np.int32, np.float32, np.float32, np.float32, bool))
  for i, sub_policy in enumerate(_CIFAR10_POLICY):
    for j, (name, p, b) in enumerate(sub_policy):
      index[i, j], prob[i, j] = OPS.index(name), p
      if name in span:
        value[i, j] = np.linspace(0.0, span[name], 10)[b]
        if name.startswith("Translate"):  # Whole pixels: torchvision's int(size * value).
          value[i, j] = int(size * value[i, j])
        signed[i, j] = True
        base[i, j] = 1.0 if name in ("Brightness", "Color", "Contrast", "Sharpness") else 0.0
      elif name == "Posterize":  # Bits kept: 8, 8, 7, 7, ..., 4, 4.
        base[i, j] = 8 - int(round(b / (9 / 4)))
      elif name == "Solarize":  # Threshold: 255 down to 0.
        base[i, j] = np.linspace(255.0, 0.0, 10)[b]
  return index, prob, base, value, signed


def autoaugment_cifar10(image, key, fill):
  """One sub-policy of the CIFAR-10 policy, drawn uniformly; each of its two ops applied
  with its probability."""
  index, prob, base, value, signed = map(jnp.asarray, _autoaugment_table(image.shape[0]))
  u = jax.random.uniform(key, (5,))  # sub-policy; apply and sign of each op.
  sub = jnp.minimum(jnp.floor(u[0] * len(_CIFAR10_POLICY)).astype(jnp.int32),
                    len(_CIFAR10_POLICY) - 1)
  for j in range(2):
    magnitude = jnp.where(signed[sub, j], _signed(u[2 + 2 * j], value[sub, j]), value[sub, j])
    out = apply_op(image, index[sub, j], base[sub, j] + magnitude, fill)
    image = jnp.where(u[1 + 2 * j] < prob[sub, j], out, image)
  return image


def colour_jitter(image, key, strength: float):
  """timm's `color_jitter` (torchvision ColorJitter(s, s, s)): brightness, contrast and
  saturation factors each uniform in [max(0, 1 - s), 1 + s], applied in that order."""
  factors = jax.random.uniform(key, (3,), minval=max(0.0, 1 - strength),
                               maxval=1 + strength)
  image = brightness(image, factors[0])
  image = contrast(image, factors[1])
  return colour(image, factors[2])


def random_erasing(image, key, prob: float, mode: str, min_area=0.02, max_area=1 / 3,
                   min_aspect=0.3, attempts: int = 10):
  """timm's RandomErasing (count 1) on a normalised image: with probability `prob`, a box
  of area in [min_area, max_area] of the image and log-uniform aspect in
  [min_aspect, 1 / min_aspect] (the first of `attempts` draws that fits) is replaced by
  N(0, 1) values per pixel (`pixel`), per channel (`rand`) or zeros (`const`)."""
  h, w, c = image.shape
  k_uniform, k_values = jax.random.split(key)
  u = jax.random.uniform(k_uniform, (2 * attempts + 3,))
  area = (min_area + (max_area - min_area) * u[:attempts]) * h * w
  aspect = jnp.exp(math.log(min_aspect) * (1.0 - 2.0 * u[attempts:2 * attempts]))
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_w < w) & (box_h < h)
  first = jnp.argmax(fits)
  box_h, box_w = box_h[first], box_w[first]
  top = jnp.floor(u[-2] * (h - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(u[-1] * (w - box_w + 1)).astype(jnp.int32)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  if mode == "pixel":
    values = jax.random.normal(k_values, image.shape)
  elif mode == "rand":
    values = jnp.broadcast_to(jax.random.normal(k_values, (1, 1, c)), image.shape)
  else:
    values = jnp.zeros_like(image)
  erase = (u[-3] < prob) & fits.any()
  return jnp.where(erase & inside, values, image)


# ----------------------------------------------------------------------------------------
# The step's entry points.

def augment_example(aug: Augmentation, image: jax.Array, key: jax.Array) -> jax.Array:
  """One uint8 image [h, w, c] (h = w = image_size, or larger for crop=resize) ->
  float32 normalised [image_size, image_size, c]."""
  size = aug.image_size
  # One draw of uniforms for the scalar choices (fewer random calls compile faster).
  k_uniform, k_auto, k_jitter, k_erase = jax.random.split(key, 4)
  u = jax.random.uniform(k_uniform, (6,))
  image = image.astype(jnp.float32)
  if aug.crop == "pad" and aug.crop_padding:
    pad = aug.crop_padding
    image = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  if image.shape[0] != size or image.shape[1] != size:
    top = jnp.floor(u[0] * (image.shape[0] - size + 1)).astype(jnp.int32)
    left = jnp.floor(u[1] * (image.shape[1] - size + 1)).astype(jnp.int32)
    image = jax.lax.dynamic_slice(image, (top, left, 0), (size, size, image.shape[-1]))
  if aug.flip:
    image = jnp.where(u[2] < 0.5, image[:, ::-1], image)
  if aug.zoom or aug.rotation:
    scale = 1.0 - aug.zoom + 2 * aug.zoom * u[3]
    angle = aug.rotation * (2 * u[4] - 1) * 2 * jnp.pi
    image = zoom_and_rotate(image, scale, angle)
  if aug.contrast:
    factor = 1 - aug.contrast + 2 * aug.contrast * u[5]
    mean = image.mean(axis=(0, 1), keepdims=True)
    image = (image - mean) * factor + mean
  image = jnp.clip(image, 0.0, 255.0)
  if aug.autoaugment == "cifar10":
    image = autoaugment_cifar10(image, k_auto, aug.fill)
  elif aug.randaugment_num_ops:
    image = randaugment(image, k_auto, aug.randaugment_num_ops, aug.randaugment_magnitude,
                        aug.randaugment_magnitude_std, aug.fill)
  if aug.colour_jitter:
    image = colour_jitter(image, k_jitter, aug.colour_jitter)
  image = normalise(image, aug.mean, aug.std)
  if aug.random_erasing_prob:
    image = random_erasing(image, k_erase, aug.random_erasing_prob, aug.random_erasing_mode)
  return image


def smooth_one_hot(labels, num_classes: int, smoothing: float) -> jax.Array:
  """timm's one-hot with off value smoothing / K and on value 1 - smoothing + off."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _mirror(x, axis_name):
  """Row B - 1 - i of the global batch for each local row i (timm's `flip(0)`)."""
  if axis_name is not None:
    n = jax.lax.axis_size(axis_name)
    x = jax.lax.ppermute(x, axis_name, [(d, n - 1 - d) for d in range(n)])
  return x[::-1]


def mix_params(aug: Augmentation, key, step):
  """(lam, use_cutmix, box) of one batch, as timm's Mixup._params_per_batch; lam = 1 when
  the batch is not mixed. `box` = (top, bottom, left, right) of the CutMix region."""
  k_uniform, k_beta = jax.random.split(key)
  u = jax.random.uniform(k_uniform, (4,))
  on = u[0] < aug.mix_prob
  if aug.mix_stop_step >= 0:
    on &= step < aug.mix_stop_step
  if aug.mixup_alpha > 0 and aug.cutmix_alpha > 0:
    use_cutmix = u[1] < aug.mix_switch_prob
  else:
    use_cutmix = jnp.asarray(aug.cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, aug.cutmix_alpha, aug.mixup_alpha)
  lam = jax.random.beta(k_beta, alpha, alpha)
  # timm's rand_bbox + cutmix_bbox_and_lam(correct_lam=True): the box is clipped to the
  # image and lam is 1 - its area.
  size = aug.image_size
  ratio = jnp.sqrt(1.0 - lam)
  cut = jnp.floor(size * ratio).astype(jnp.int32)
  cy = jnp.minimum(jnp.floor(u[2] * size).astype(jnp.int32), size - 1)
  cx = jnp.minimum(jnp.floor(u[3] * size).astype(jnp.int32), size - 1)
  top, bottom = jnp.clip(cy - cut // 2, 0, size), jnp.clip(cy + cut // 2, 0, size)
  left, right = jnp.clip(cx - cut // 2, 0, size), jnp.clip(cx + cut // 2, 0, size)
  lam_box = 1.0 - (bottom - top) * (right - left) / (size * size)
  lam = jnp.where(use_cutmix, lam_box, lam)
  lam = jnp.where(on, lam, 1.0)
  return lam, use_cutmix & on, (top, bottom, left, right)


def mix(aug: Augmentation, images, labels, key, step, axis_name=None):
  """Mixup / CutMix of this device's rows of the global batch with their mirrors:
  (images, soft targets [batch, num_classes] that sum to 1)."""
  targets = smooth_one_hot(labels, aug.num_classes, aug.label_smoothing)
  if not (aug.mixup_alpha or aug.cutmix_alpha):
    return images, targets
  lam, use_cutmix, (top, bottom, left, right) = mix_params(aug, key, step)
  other_images, other_targets = _mirror(images, axis_name), _mirror(targets, axis_name)
  rows = jnp.arange(images.shape[1])[:, None, None]
  cols = jnp.arange(images.shape[2])[None, :, None]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cutmixed = jnp.where(box, other_images, images)
  mixed = lam * images + (1.0 - lam) * other_images
  images = jnp.where(use_cutmix, cutmixed, mixed)
  return images, lam * targets + (1.0 - lam) * other_targets


def example_keys(rng, step, global_index) -> tuple[jax.Array, jax.Array]:
  """(per-example keys, the batch's mixing key) from the run's key data `rng`."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), _AUGMENT_TAG),
                            step)
  k_examples, k_mix = jax.random.split(base)
  return jax.vmap(lambda i: jax.random.fold_in(k_examples, i))(global_index), k_mix


def apply_batch(aug: Augmentation, images, labels, rng, step, axis_name=None):
  """This device's rows of a uint8 global batch -> (float32 normalised augmented images,
  soft targets). Call it where the step runs: inside shard_map / pmap with `axis_name` the
  device axis, or on the whole global batch with axis_name=None."""
  local = images.shape[0]
  first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local
  keys, k_mix = example_keys(rng, step, first + jnp.arange(local))
  images = jax.vmap(lambda x, k: augment_example(aug, x, k))(images, keys)
  return mix(aug, images, labels, k_mix, step, axis_name)
