"""ViT, the full self-attention baseline.

Default: the Keras example "Image classification with Vision Transformer" (CIFAR-100
resized to 72, patch 6 = 144 tokens, 8 blocks of width 64 with 4 heads of key_dim 64,
MLP [128, 64], flatten + MLP head [2048, 1024], AdamW 1e-3 wd 1e-4, batch 256, 100 epochs;
the example reports 55.14% top-1). 21.76M parameters here for 100 classes.

    uv run launch.py --config configs/vit.py --workdir runs/vit_keras

The model computes what the example's computes (exact GELU after both layers of every MLP,
the head's included; LayerNorm eps 1e-6; attention key_dim = projection_dim): checked by
tests/test_fidelity_keras.py::test_logits_match_keras_example[vit], which runs keras-io's
examples/vision/image_classification_with_vision_transformer.py as published (its Keras 3
version, sizes reduced through its own variables; tests/make_reference_fixtures_keras.py),
saves its weights as Keras does and loads them through efficient_vit/import_keras.py.
The sizes here are those of the example's TensorFlow version (tokens of width
projection_dim = 64, MLP [128, 64]); the Keras 3 version widens the tokens to hidden_dim =
projection_dim * num_heads = 256 with MLP [512, 256] and key_dim 64:
`--config.model.embed_dim=256 --config.model.mlp_dim=512 --config.model.head_dim=64`.
Differences in training only: the example holds out 10% of the training set for validation
(`--config.train_split='train[:90%]'` restores that) and normalises with statistics adapted
on the training images, where the pipeline here uses fixed per-dataset ones.

Presets (`--config configs/vit.py:NAME`):
  tiny_cifar10 - a small ViT (patch 4, dim 128, 4 blocks, 1 epoch) that shows learning on a
      CPU: measured 39.93% top-1 / 89.67% top-5 on CIFAR-10 (JPEG copy) after its one epoch,
      in 9 min 34 s wall on the 2-core CPU (one other job running); command in README.
  s16_imagenet - ViT-S/16 at 224 on ImageNet (22.05M parameters with 1,000 classes).
      Architecture: the original ViT, google-research/vision_transformer
      vit_jax/models_vit.py (class token, learned positions, flax `nn.gelu` = tanh GELU,
      LayerNorm eps 1e-6, biases on q/k/v and the output projection), whose checkpoints
      big_vision (big_vision/models/vit.py) loads with the same computation. Backed by
      tests/test_vit.py::test_vit_s16_parameter_count (22,050,664, timm's count for
      vit_small_patch16_224) and tests/test_fidelity.py::test_logits_match_reference
      [big_vision_vit] (this preset's fields, sizes reduced, logits of a big_vision-layout
      .npz equal to the reference's within 1e-4). timm's port of the same weights computes
      the exact GELU: load those with `--config.model.mlp_activation=gelu` (checked by
      tests/test_fidelity.py [timm_vit_token] and, for timm's GAP models with `fc_norm`,
      [timm_vit_gap]).
      Training recipe: big_vision's vit_s16_i1k.py (76.5% after 90 epochs on a TPU-v3-8
      there, per its docstring), each value cited beside it in `get_config`: batch 1024,
      90 epochs, Adam + decoupled weight decay, lr 1e-3, 10,000 linear warmup steps from 0,
      cosine to 0, big_vision's wd 1e-4 (= optax.adamw's 0.1, see the comment there), grad
      clip 1.0, plain softmax cross-entropy. Its weight decay reaches `kernel`s only (wd_mults
      default `.*/kernel$`); the mask here (efficient_vit/optim.py `_decay_mask`) decays
      the kernels too, and spares biases (q/k/v biases included), norms and tables.
      Augmentation (cited in `get_config`): inception crop, flip, RandAugment(2, 10) and
      Mixup with Beta(0.2, 0.2); big_vision's RandAugment op set (TF's autoaugment.py:
      with Cutout and Identity, no SolarizeIncreasing) is approximated by timm's `inc1` set.
      Not expressed: pixel range [-1, 1] (here: per-dataset mean and std), Adam's first
      moment in bfloat16 (`mu_dtype='bfloat16'`), and the training split `train[:99%]` (1%
      held out as minival; `--config.train_split='train[:99%]'` restores it). Note that
      big_vision's config trains its own ViT-S/16 (global average pooling, 2-D sin-cos
      position embedding, a pre-logits layer: `pool_type='gap'`, `posemb='sincos2d'`,
      `rep_size=True`); this preset keeps the original ViT architecture above and applies
      that recipe to it.
"""

from configs import common

# `uv run python -m configs` lists these.
PRESETS = {
    "keras": "the Keras ViT example (CIFAR-100 at 72, patch 6, 8 blocks of width 64)",
    "tiny_cifar10": "a small ViT (patch 4, width 128, 4 blocks) that learns on a CPU in one epoch",
    "s16_imagenet": "ViT-S/16 at 224 on ImageNet, big_vision's vit_s16_i1k recipe",
}


def get_config(preset: str = "keras"):
  c = common.base_config()
  c.model.name = "vit"
  if preset == "keras":
    c.dataset = "cifar100"
    c.image_size = 72
    c.augment.crop = "none"  # The example resizes, flips, rotates by 0.02 and zooms by 0.2.
    c.augment.rotation = 0.02
    c.augment.zoom = 0.2
    c.batch_size = 256
    c.num_epochs = 100.0
    c.model.update(patch_size=6, embed_dim=64, depth=8, num_heads=4, head_dim=64, mlp_dim=128,
                   pooling="flatten", head_hidden_dims=(2048, 1024), mlp_activate_last=True,
                   dropout_rate=0.1, attention_dropout_rate=0.1, head_dropout_rate=0.5,
                   # keras-io examples/vision/image_classification_with_vision_transformer.py:
                   # `mlp` uses Dense(activation=gelu), Keras' exact (erf) GELU...
                   mlp_activation="gelu",
                   # ...and LayerNormalization(epsilon=1e-6).
                   norm_epsilon=1e-6)
    c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="constant")
  elif preset == "tiny_cifar10":
    c.dataset = "cifar10"
    c.image_size = 32
    c.batch_size = 128
    c.num_epochs = 1.0
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.model.update(patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_dim=256,
                   pooling="gap")
    c.optimizer.update(name="adamw", learning_rate=2e-3, weight_decay=0.05, warmup_steps=50,
                       schedule="cosine")
  elif preset == "s16_imagenet":
    c.dataset = "imagenet2012"
    c.eval_split = "validation"  # ImageNet's test labels are not public.
    c.image_size = 224
    # Recipe: google-research/big_vision big_vision/configs/vit_s16_i1k.py, key = value
    # quoted per line.
    c.augment.update(
        crop="inception",  # `pp_train`: `decode_jpeg_and_inception_crop(224)` (0.08-1)
        crop_scale=(0.08, 1.0),
        eval_crop_fraction=0.875,  # `pp_eval`: `resize_small(256)|central_crop(224)`
        flip=True,  # `|flip_lr`
        # `|randaug(2,10)`: 2 ops at magnitude 10 (big_vision's own op set, from TF's
        # autoaugment.py; here timm's `inc1` set at the same magnitude, see the docstring)
        randaugment_num_ops=2, randaugment_magnitude=10.0, randaugment_magnitude_std=0.0,
        mixup_alpha=0.2,  # `config.mixup = dict(p=0.2, ...)`: Beta(0.2, 0.2), every batch
        cutmix_alpha=0.0, mix_prob=1.0)
    c.batch_size = 1024  # `config.input.batch_size = 1024`
    c.num_epochs = 90.0  # `config.total_epochs = 90` (300: `--config.num_epochs=300`)
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    c.model.update(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536,
                   pooling="cls",
                   # vision_transformer vit_jax/models_vit.py MlpBlock: flax nn.gelu (tanh).
                   mlp_activation="gelu_tanh",
                   # vit_jax/models_vit.py: flax nn.LayerNorm's default epsilon.
                   norm_epsilon=1e-6,
                   # vit_jax/models_vit.py: nn.MultiHeadDotProductAttention, biases on.
                   qkv_bias=True, proj_bias=True, fc_norm=False)
    c.optimizer.update(
        # `config.optax_name = 'scale_by_adam'` (optax's b1 0.9, b2 0.999, eps 1e-8) with
        # decoupled weight decay: AdamW.
        name="adamw",
        learning_rate=1e-3,  # `config.lr = 0.001`
        # `config.wd = 0.0001`: big_vision/optax.py adds wd * params after scaling the Adam
        # step by lr, and the schedule multiplies both, so the step is
        # -schedule * (lr * adam + wd * params). optax.adamw's is -lr_t * (adam +
        # weight_decay * params): weight_decay = wd / lr = 1e-4 / 1e-3 = 0.1.
        weight_decay=1e-4 / 1e-3,
        # `config.schedule = dict(warmup_steps=10_000, decay_type='cosine')`: linear from 0
        # (big_vision/utils.py create_learning_rate_schedule), cosine to 0 after it.
        warmup_steps=10_000,
        schedule="cosine",
        grad_clip_norm=1.0,  # `config.grad_clip_norm = 1.0`
        label_smoothing=0.0)  # `config.loss = 'softmax_xent'` on `onehot(1000)` labels
  else:
    raise ValueError(f"preset {preset!r} of configs/vit.py; allowed: keras, tiny_cifar10, "
                     "s16_imagenet")
  return c
