"""MobileViT: MobileNetV2 blocks plus transformers over unfolded patches (arXiv 2110.02178).

Default (`keras`): the Keras example "MobileViT: A mobile-friendly Transformer-based model for
image classification" (tf_flowers at 256, train[:90%] / train[90%:], resize to 280 + random
256 crop + flip, XXS widths in the example's block layout, Adam 2e-3 with no weight decay,
label smoothing 0.1, batch 64, 30 epochs). The example reports 1,307,621 parameters (of
which 2,544 are batch-norm statistics) and 86.1% validation accuracy; here the model has
1,305,077 trainable parameters + 2,544 `batch_stats` = 1,307,621 for 5 classes.
The model computes what the example computes (attention over all positions of the map:
`patch_size=1`; TensorFlow "same" padding for the stem and the 3x3 convolutions:
`conv_padding='same'`; the Keras 3 port's `ZeroPadding2D()`, one pixel on every side,
before its strided depthwise convolutions: `depthwise_padding='symmetric'`): checked by
tests/test_fidelity_keras.py::test_logits_match_keras_example[mobilevit]. Weights trained
with the example load through efficient_vit/import_keras.py; its model takes pixels in
[0, 255] and divides by 255 itself (`KerasImport.preprocess`).
Differences in training only: the shared pipeline normalises pixels with ImageNet's mean
and std (the example divides by 255; the config contract has no field to change that yet),
and optax's Adam epsilon is 1e-8 (Keras 1e-7; no contract field either).

    uv run launch.py --config configs/mobilevit.py --workdir runs/mobilevit_keras

  Measured: not yet measured (tf_flowers is not prepared on these offline machines; the
  test suite runs this config end to end on `tfds.testing.mock_data`).

Presets (`--config configs/mobilevit.py:NAME`):
  xxs, xs, s - the paper's three models on ImageNet at 256 with the ml-cvnets recipe,
      each value cited beside it in `get_config` (apple/ml-cvnets
      config/classification/imagenet/mobilevit.yaml, one file for the three sizes: AdamW,
      batch 1024 = 128 per GPU x 8 GPUs, 300 epochs, 20,000 warmup iterations from 2e-4 to
      2e-3, cosine down to 2e-4, wd 0.01, label smoothing 0.1, EMA of the weights with
      momentum 0.0005 (ema_decay 0.9995); dropout 0.1, classifier dropout 0.1).
      Trainable parameters for 1,000 classes: 1,272,024 / 2,317,848 / 5,578,632 (published
      1.27M / 2.32M / 5.58M; ImageNet top-1 69.0 / 74.8 / 78.4).
      Where the trainer here departs from ml-cvnets: its cosine (`is_iteration_based:
      false`) moves once per epoch and counts epochs from 0, so after the warmup (about
      16 epochs) it resumes at that epoch's value, where here the cosine spans the steps
      after the warmup; its weight decay reaches every parameter (`no_decay_bn_filter_bias:
      false`), the mask here (efficient_vit/optim.py `_decay_mask`) spares 1-D biases and
      norms; its EMA also averages the batch-norm statistics, here only the parameters.
      Not expressed yet (no trainer fields): the multi-scale variable-batch sampler (crops
      160-320, batch scaled to match), bilinear interpolation, and `mixed_precision: true`.
      Architecture source: apple/ml-cvnets cvnets/models/classification/mobilevit.py and
      cvnets/modules/mobilevit_block.py (timm's timm/models/mobilevit.py computes the same).
      Backed by tests/test_mobilevit.py::test_paper_preset_parameter_counts (the counts
      above) and tests/test_fidelity.py::test_logits_match_reference[timm_mobilevit] (these
      fields, widths and depths reduced: a timm MobileViT's weights and batch-norm
      statistics give its logits within 1e-4).
  cifar10 - XXS widths on CIFAR-10 at 32x32. The stem and the first stage keep stride 1 and
      the last MobileViT stage has stride 1 too, so the maps are 32 -> 32 -> 16 -> 8 -> 4 -> 4
      and every MobileViT stage is divisible by the 2x2 patch. 954,234 trainable parameters
      (+ 4,112 batch-norm statistics) for 10 classes.

      TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) nice -n 10 uv run launch.py \
          --config configs/mobilevit.py:cifar10 --workdir runs/mobilevit_run \
          --config.num_train_steps=100 --config.batch_size=64 --config.log_every_steps=10 \
          --config.optimizer.warmup_epochs=0 --config.optimizer.warmup_steps=10 \
          --config.eval_split='test[:2000]'

      Measured (2-core CPU shared with other jobs, load about 9; CIFAR-10 JPEG copy): 100
      steps of 64 (0.13 epoch), about 25 img/s; train loss 2.268 at step 10 -> 1.848 at
      step 100; eval on the first 2,000 test images: loss 1.874, top-1 24.0%, top-5 83.8%;
      574 s wall including about 2 minutes of input decoding and compilation. A full run
      (50 epochs) is not yet measured.
"""

from configs import common

# `uv run python -m configs` lists these.
PRESETS = {
    "keras": "the Keras MobileViT example (tf_flowers at 256, XXS-like widths)",
    "xxs": "MobileViT-XXS at 256 on ImageNet, the ml-cvnets recipe",
    "xs": "MobileViT-XS at 256 on ImageNet, the ml-cvnets recipe",
    "s": "MobileViT-S at 256 on ImageNet, the ml-cvnets recipe",
    "cifar10": "XXS widths on CIFAR-10 at 32 (stem and first stage at stride 1)",
}

# The paper's three sizes (ml-cvnets config/mobilevit.py): per-stage output channels,
# MV2 expansion, transformer widths d (FFN 2d) and the last 1x1 conv (min(4 * C5, 960)).
PAPER_SIZES = {
    "xxs": dict(stage_channels=(16, 24, 48, 64, 80), expansion=2,
                embed_dims=(64, 80, 96), mlp_dims=(128, 160, 192), last_channels=320),
    "xs": dict(stage_channels=(32, 48, 64, 80, 96), expansion=4,
               embed_dims=(96, 120, 144), mlp_dims=(192, 240, 288), last_channels=384),
    "s": dict(stage_channels=(32, 64, 96, 128, 160), expansion=4,
              embed_dims=(144, 192, 240), mlp_dims=(288, 384, 480), last_channels=640),
}


def get_config(preset: str = "keras"):
  if preset not in PRESETS:
    raise ValueError(f"preset {preset!r} of configs/mobilevit.py; allowed: "
                     f"{', '.join(PRESETS)}")
  c = common.base_config()
  c.model.name = "mobilevit"
  # The layout shared by every preset (paper Table 4), set here so that each field can be
  # overridden on the command line (--config.model.transformer_depths='(1,1,1)').
  c.model.update(stem_channels=16, strides=(2, 1, 2, 2, 2, 2), mv2_depths=(1, 3),
                 transformer_depths=(2, 4, 3), patch_size=2, resize_to_patches=False)
  if preset == "keras":
    c.dataset = "tf_flowers"
    c.train_split = "train[:90%]"
    c.eval_split = "train[90%:]"
    c.image_size = 256
    c.augment.crop = "resize"  # Resize to 280, random 256 crop, flip; eval resizes to 256.
    c.augment.resize_size = 280
    c.augment.flip = True
    c.batch_size = 64
    c.num_epochs = 30.0
    c.model.update(variant="keras", num_heads=2, dropout_rate=0.1, attention_dropout_rate=0.1,
                   head_dropout_rate=0.0, **PAPER_SIZES["xxs"],
                   # keras-io examples/vision/mobilevit.py: `mobilevit_block` reshapes the map
                   # to [4, hw / 4, d] and its MultiHeadAttention attends over both axes, i.e.
                   # over all hw positions: one "patch" of 1 pixel here.
                   patch_size=1,
                   # conv_block's Conv2D(padding="same"): TensorFlow's "same" padding.
                   conv_padding="same",
                   # inverted_residual_block: `if strides == 2: m = layers.ZeroPadding2D()(m)`
                   # before DepthwiseConv2D(3, strides, padding="same" if strides == 1 else
                   # "valid"): one pixel on every side (k // 2) at either stride.
                   depthwise_padding="symmetric",
                   # mlp's Dense(activation=tf.nn.swish).
                   mlp_activation="silu")
    c.optimizer.update(name="adamw", learning_rate=2e-3, weight_decay=0.0, schedule="constant",
                       label_smoothing=0.1)
  elif preset in PAPER_SIZES:
    c.dataset = "imagenet2012"
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 256
    c.augment.crop = "inception"
    # Recipe: apple/ml-cvnets config/classification/imagenet/mobilevit.yaml, key: value
    # quoted per line. `train_batch_size0: 128`, "an effective batch size of 1024 (128
    # images/GPU * 8 GPUs)" in its comment.
    c.batch_size = 1024
    c.num_epochs = 300.0  # scheduler `max_epochs: 300`
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    c.model.update(variant="paper", num_heads=4, dropout_rate=0.1, attention_dropout_rate=0.0,
                   head_dropout_rate=0.1, **PAPER_SIZES[preset],
                   # ml-cvnets config/classification/imagenet/mobilevit.yaml: activation
                   # swish (SiLU) in the convolutions and the transformers' FFNs.
                   mlp_activation="silu")
    c.optimizer.update(
        name="adamw",  # optim `name: "adamw"`, `beta1: 0.9`, `beta2: 0.999`
        learning_rate=2e-3,  # cosine `max_lr: 0.002`
        min_learning_rate=2e-4,  # cosine `min_lr: 0.0002`
        warmup_steps=20_000,  # scheduler `warmup_iterations: 20000`
        warmup_start_learning_rate=2e-4,  # scheduler `warmup_init_lr: 0.0002`
        schedule="cosine",  # scheduler `name: "cosine"`
        weight_decay=0.01,  # optim `weight_decay: 0.01`
        label_smoothing=0.1,  # cross_entropy `label_smoothing: 0.1`
        # ema `enable: true`, `momentum: 0.0005`; cvnets/misc/averaging_utils.py updates
        # ema = ema * (1 - momentum) + momentum * model after every step: decay 0.9995.
        ema_decay=1.0 - 0.0005)
  else:  # cifar10
    c.dataset = "cifar10"
    c.image_size = 32
    c.augment.crop = "pad"
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.batch_size = 128
    c.num_epochs = 50.0
    c.log_every_steps = 20
    c.model.update(variant="paper", num_heads=4, strides=(1, 1, 2, 2, 2, 1), dropout_rate=0.1,
                   attention_dropout_rate=0.0, head_dropout_rate=0.1, **PAPER_SIZES["xxs"])
    c.optimizer.update(name="adamw", learning_rate=2e-3, weight_decay=0.01, warmup_epochs=2.0,
                       schedule="cosine", label_smoothing=0.1)
  return c
