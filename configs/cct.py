"""CCT / CVT / ViT-Lite, compact transformers for small data (Hassani et al. 2021,
arXiv 2104.05704).

Default: the Keras example "Compact Convolutional Transformers" (CIFAR-10 at 32, conv
tokenizer of 2 layers with 64 then 128 channels -> 64 tokens of width 128, 2 blocks with
2 heads of key_dim 128, MLP [128, 128] with GELU after both, stochastic depth 0.1, learned
position embedding, sequence pooling; AdamW 1e-3 wd 1e-4 at a constant rate, label
smoothing 0.1, batch 128, 30 epochs, random flip; the example reports 76.76% top-1 /
98.39% top-5 after 30 epochs). 416,331 parameters here for 10 classes.

    TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) \
      uv run launch.py --config configs/cct.py --workdir runs/cct_run

Where the default departs from the example:
- The example's RandomCrop(32, 32) on 32 x 32 images crops nothing, so `augment.crop` is
  `none`; `--config.augment.crop=pad` gives the usual pad-4 random crop instead.
- The example holds out the last 10% of the training set for validation and reports the
  test accuracy of its best-validation checkpoint; here all 50,000 images train and the
  test split is evaluated as the run goes.
- Weight decay skips biases and norms here (the example decays every variable), and the
  shared encoder block also drops out the attention output (rate 0.1).
The model itself computes what the example's computes (`tokenizer_form='keras'`: valid
conv, ReLU, zero padding, TensorFlow "same" max-pool; the tanh GELU of `keras.ops.gelu`;
a learned position table, the example's `PositionEmbedding` weight; pre-norm blocks):
tests/test_fidelity_keras.py::test_logits_match_keras_example[cct] gives it the weights the
example's own code saves (tests/make_reference_fixtures_keras.py, sizes reduced) and
compares the logits.

Measured, the default on CIFAR-10 (JPEG copy), 2-core CPU shared with another training
run (about 100 img/s under that load), the first 2 of its 30 epochs (a constant rate, so
the same as the full run's first 2), augmentation in the train step (efficient_vit/augment.py):

    TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) uv run launch.py \
      --config configs/cct.py --workdir runs/cct_run --config.num_train_steps=780 \
      --config.eval_every_steps=390

  epoch 1 (step 390): eval top-1 55.00%, top-5 94.98%, loss 1.255
  epoch 2 (step 780): eval top-1 61.85%, top-5 96.21%, loss 1.092
  (the Keras example's published curve reaches 76.76% at epoch 30)

Presets (`--config configs/cct.py:NAME`), architectures as in the official code
(SHI-Labs/Compact-Transformers src/cct.py, src/cvt.py, src/vit.py and
src/utils/transformers.py: the block normalises the residual stream after the attention,
exact GELU, no q/k/v bias, LayerNorm eps 1e-5), each with its published parameter count
(measured here, for the published number of classes), checked by
tests/test_cct.py::test_preset_parameter_count_matches_published; the computation is checked
by tests/test_fidelity.py::test_logits_match_reference[cct_learned] and [cct_sine] (the
cct_2_3x2 / cct_6_3x1 fields, width reduced: the official code's weights, via vit-pytorch's
copy, give its logits within 1e-4):
  cct_2_3x2     0.284M (283,723)    cct_4_3x2   0.482M (482,123)
  cct_6_3x2     3.327M (3,326,923)  cct_7_3x2   3.853M (3,853,259)
  cct_6_3x1     3.168M (3,168,267; sine position embedding: the published count has no
                                    learned table)
  cct_7_3x1     3.760M (3,760,139)
  cvt_6_4       3.190M (3,190,283)  cvt_7_4     3.717M (3,716,619)
  vit_lite_6_4  3.191M (3,190,538)  vit_lite_7_4  3.717M (3,716,874)
  cct_14_7x2    22.36M (22,367,273; ImageNet at 224, 1,000 classes)
Training recipes, each value cited beside it in `get_config` (the official repository's
timm configs, run by its timm-based train.py):
- The CIFAR presets: configs/datasets/cifar10.yml (= the optimiser keys of
  configs/pretrained/cct_7-3x1_cifar10_300epochs.yml, the run behind cct_7_3x1's 96.53%):
  AdamW lr 5.5e-4, wd 0.06, batch 128, warmup 10 epochs from 1e-5, cosine to 1e-5 over
  300 epochs, then 10 cooldown epochs at 1e-5 (310 in all), label smoothing 0.1, no EMA.
  CIFAR-100 (80.92% for cct_7_3x1, configs/pretrained/cct_7-3x1_cifar100_300epochs.yml:
  `lr: 6e-4`, `warmup_lr: 0.000001`, the rest as above):
    --config.dataset=cifar100 --config.optimizer.learning_rate=6e-4 \
      --config.optimizer.warmup_start_learning_rate=1e-6
- cct_14_7x2: configs/pretrained/cct_14-7x2_imagenet.yml: AdamW lr 5e-4, wd 0.05, warmup
  10 epochs from 1e-6, cosine to 1e-5 over 300 epochs + 10 cooldown, label smoothing 0.1.
  Its `batch_size: 128` is per process and the number of processes is not stated: the
  global 1024 here assumes 8.
Schedule detail: timm's create_scheduler, as that train.py calls it, steps the rate once per
epoch and lays the cosine over all 300 epochs, the warmup replacing its first 10 (no warmup
prefix); here the rate moves every step and the cosine spans the 290 epochs after the
warmup. Weight decay: timm's
create_optimizer_v2 (filter_bias_and_bn) spares biases and norms, as here, but decays the
learned position table, which the mask here spares (efficient_vit/optim.py `_decay_mask`).
Augmentation, as those ymls give it (values cited in `get_config`; run in the train step,
efficient_vit/augment.py): random-resized crop at scale 0.8-1 (ImageNet: 0.08-1), flip,
RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8 / CutMix 1.0 with switch probability 0.5
(CIFAR-10: until epoch 175), random erasing 0.25 (0 in the cct_7_3x1 CIFAR-10 yml).
Not expressed: bicubic / random interpolation (bilinear here) and `amp: True` (float16
mixed precision; `--config.dtype=bfloat16` is the nearest). Not yet measured.
"""

from configs import common

# `uv run python -m configs` lists these.
PRESETS = {
    "keras": "the Keras CCT example (CIFAR-10 at 32, 2-layer conv tokenizer, 2 blocks of 128)",
    **{name: f"the official {name} (CIFAR at 32, the official timm recipe)" for name in (
        "cct_2_3x2", "cct_4_3x2", "cct_6_3x2", "cct_7_3x2", "cct_6_3x1", "cct_7_3x1",
        "cvt_6_4", "cvt_7_4", "vit_lite_6_4", "vit_lite_7_4")},
    "cct_14_7x2": "the official cct_14_7x2 at 224 on ImageNet, the official timm recipe",
}

# name -> (depth, width, heads, MLP ratio) of the official `cct_L` / `cvt_L` / `vit_L`.
_SIZES = {2: (128, 2, 1), 4: (128, 2, 1), 6: (256, 4, 2), 7: (256, 4, 2), 14: (384, 6, 3)}

# preset -> (family, depth, kernel or patch size, conv layers)
_PRESETS = {
    "cct_2_3x2": ("cct", 2, 3, 2),
    "cct_4_3x2": ("cct", 4, 3, 2),
    "cct_6_3x2": ("cct", 6, 3, 2),
    "cct_7_3x2": ("cct", 7, 3, 2),
    "cct_6_3x1": ("cct", 6, 3, 1),
    "cct_7_3x1": ("cct", 7, 3, 1),
    "cvt_6_4": ("cvt", 6, 4, 0),
    "cvt_7_4": ("cvt", 7, 4, 0),
    "vit_lite_6_4": ("vit_lite", 6, 4, 0),
    "vit_lite_7_4": ("vit_lite", 7, 4, 0),
    "cct_14_7x2": ("cct", 14, 7, 2),
}


def _paper_model(family: str, depth: int, size: int, conv_layers: int) -> dict:
  """Model fields of an official preset: CCT-depth/size x conv_layers, CVT/ViT-Lite-depth/size."""
  width, heads, ratio = _SIZES[depth]
  fields = dict(depth=depth, embed_dim=width, num_heads=heads, mlp_dim=width * ratio,
                dropout_rate=0.0, attention_dropout_rate=0.1, drop_path_rate=0.1,
                position_embedding="learned",
                # Compact-Transformers src/utils/transformers.py, TransformerEncoderLayer:
                # src = src + drop_path(self_attn(pre_norm(src))); src = norm1(src); ...
                block_form="cct",
                # ...; its activation F.gelu (exact);
                mlp_activation="gelu",
                # Attention: qkv Linear(bias=False), proj Linear with bias;
                qkv_bias=False,
                # nn.LayerNorm's default epsilon.
                norm_epsilon=1e-5)
  if family == "cct":
    # The official rule for a k x k tokenizer: stride max(1, k // 2 - 1), padding
    # max(1, k // 2) (3x3: stride 1, padding 1; 7x7: stride 2, padding 3).
    fields.update(tokenizer="conv", num_conv_layers=conv_layers, conv_channels=64,
                  conv_kernel_size=size, conv_stride=max(1, size // 2 - 1),
                  conv_padding=max(1, size // 2), pool_kernel_size=3, pool_stride=2,
                  pool_padding=1, pooling="seq")
  else:
    fields.update(tokenizer="patch", patch_size=size,
                  pooling="seq" if family == "cvt" else "cls")
  return fields


def _timm_augmentation(**per_recipe) -> dict:
  """The augmentation keys that the official CCT ymls (run by timm's train.py) share, the
  same in configs/datasets/cifar10.yml and configs/pretrained/cct_14-7x2_imagenet.yml;
  `per_recipe` adds each yml's crop scale, eval crop and mixing stop."""
  return dict(
      crop="inception",  # timm's RandomResizedCrop (`scale` in per_recipe)
      flip=True,  # timm's hflip 0.5 (train.py default)
      # `aa: rand-m9-mstd0.5-inc1` (timm: 2 ops, magnitude 9, std 0.5, inc1 op set)
      randaugment_num_ops=2, randaugment_magnitude=9.0, randaugment_magnitude_std=0.5,
      mixup_alpha=0.8,  # `mixup: 0.8`
      cutmix_alpha=1.0,  # `cutmix: 1.0`
      mix_prob=1.0,  # `mixup_prob: 1.0` (`mixup_mode: batch`)
      mix_switch_prob=0.5,  # `mixup_switch_prob: 0.5`
      random_erasing_prob=0.25,  # `reprob: 0.25`
      random_erasing_mode="pixel",  # `remode: pixel`
      **per_recipe)


def get_config(preset: str = "keras"):
  c = common.base_config()
  c.model.name = "cct"
  if preset == "keras":
    c.dataset = "cifar10"
    c.image_size = 32
    c.augment.crop = "none"  # RandomCrop(32, 32) of a 32 x 32 image: see the docstring.
    c.augment.flip = True
    c.batch_size = 128
    c.num_epochs = 30.0
    c.model.update(tokenizer="conv", num_conv_layers=2, conv_channels=64, conv_kernel_size=3,
                   conv_stride=1, conv_padding=1, pool_kernel_size=3, pool_stride=2,
                   pool_padding=1, embed_dim=128, depth=2, num_heads=2, head_dim=128,
                   mlp_dim=128, mlp_activate_last=True, qkv_bias=True, pooling="seq",
                   position_embedding="learned", norm_epsilon=1e-5, dropout_rate=0.1,
                   attention_dropout_rate=0.1, drop_path_rate=0.1,
                   # keras-io examples/vision/cct.py: CCTTokenizer is Conv2D(padding="valid",
                   # relu) -> ZeroPadding2D(1) -> MaxPool2D(3, 2, "same");
                   tokenizer_form="keras",
                   # its `mlp` Dense(activation=keras.ops.gelu): approximate=True by
                   # default, the tanh GELU (the TF 2 example's tf.nn.gelu was exact);
                   mlp_activation="gelu_tanh",
                   # its blocks add both branches to the un-normalised stream (pre-norm).
                   block_form="pre_norm")
    c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                       schedule="constant", label_smoothing=0.1)
  elif preset in _PRESETS:
    c.model.update(**_paper_model(*_PRESETS[preset]))
    if preset == "cct_14_7x2":
      # Recipe: SHI-Labs/Compact-Transformers configs/pretrained/cct_14-7x2_imagenet.yml,
      # run by that repository's train.py (timm's script), key: value quoted per line.
      c.dataset = "imagenet2012"
      c.eval_split = "validation"  # ImageNet's test labels are not public.
      c.image_size = 224
      c.augment.update(_timm_augmentation(
          crop_scale=(0.08, 1.0),  # RandomResizedCrop, `scale: [0.08, 1.0]`
          eval_crop_fraction=0.9,  # `crop_pct: 0.9`
          mix_stop_epoch=-1.0))  # `mixup_off_epoch: 0` (timm: never off)
      # `batch_size: 128` is per process of dist_train.sh, and neither the config nor the
      # README says how many processes: 1024 assumes 8 (not stated; the script does not
      # scale `lr` with the batch, so lr stays 5e-4 whatever the count).
      c.batch_size = 1024
      # `epochs: 300` + `cooldown_epochs: 10`: train.py runs epochs + cooldown_epochs.
      c.num_epochs = 310.0
      c.eval_every_steps = 5000
      c.checkpoint_every_steps = 5000
      c.optimizer.update(
          name="adamw",  # `opt: adamw` (timm's eps 1e-8 and betas 0.9 / 0.999: optax's)
          learning_rate=5e-4,  # `lr: 5e-4`
          weight_decay=0.05,  # `weight_decay: 5e-2`
          warmup_epochs=10.0,  # `warmup_epochs: 10`
          warmup_start_learning_rate=1e-6,  # `warmup_lr: 0.000001`
          min_learning_rate=1e-5,  # `min_lr: 0.00001`
          cooldown_epochs=10.0,  # `cooldown_epochs: 10`
          schedule="cosine",  # `sched: cosine`
          label_smoothing=0.1,  # `smoothing: 0.1`
          ema_decay=0.0)  # `model_ema: False`
    else:
      c.dataset = "cifar10"
      c.image_size = 32
      # Recipe: SHI-Labs/Compact-Transformers configs/datasets/cifar10.yml, whose optimiser
      # and schedule keys configs/pretrained/cct_7-3x1_cifar10_300epochs.yml (the 96.53%
      # run) repeats with the same values; key: value quoted per line.
      c.augment.update(_timm_augmentation(
          crop_scale=(0.8, 1.0),  # timm's RandomResizedCrop(32), `scale: [0.8, 1.0]`
          eval_crop_fraction=1.0,  # `crop_pct: 1.0`: eval sees the whole image
          mix_stop_epoch=175.0))  # `mixup_off_epoch: 175`
      # `reprob: 0.25` in datasets/cifar10.yml (below: cct_7_3x1's own yml has 0).
      if preset == "cct_7_3x1":
        c.augment.random_erasing_prob = 0.0  # cct_7-3x1_cifar10_300epochs.yml `reprob: 0`
      c.batch_size = 128  # `batch_size: 128` (per process; README's CIFAR command runs one)
      # `epochs: 300` + `cooldown_epochs: 10`: train.py runs epochs + cooldown_epochs.
      c.num_epochs = 310.0
      c.optimizer.update(
          name="adamw",  # `opt: adamw` (timm's eps 1e-8 and betas 0.9 / 0.999: optax's)
          learning_rate=5.5e-4,  # `lr: 55e-5`
          weight_decay=0.06,  # `weight_decay: 6e-2`
          warmup_epochs=10.0,  # `warmup_epochs: 10`
          warmup_start_learning_rate=1e-5,  # `warmup_lr: 0.00001`
          min_learning_rate=1e-5,  # `min_lr: 1e-5`
          cooldown_epochs=10.0,  # `cooldown_epochs: 10`
          schedule="cosine",  # `sched: cosine`
          label_smoothing=0.1,  # `smoothing: 0.1`
          ema_decay=0.0)  # `model_ema: False` (pretrained yml)
    if preset == "cct_6_3x1":
      # The published 3.168M counts no learned table: the sine embedding, which is fixed.
      c.model.position_embedding = "sine"
  else:
    raise ValueError(f"preset {preset!r} of configs/cct.py; allowed: keras, "
                     f"{', '.join(_PRESETS)}")
  return c
