"""Swin Transformer: attention inside shifted local windows (Liu et al. 2021, arXiv 2103.14030).

Default (`keras`): the Keras example "Image classification with Swin Transformers"
(CIFAR-100 at 32, patch 2 -> a 16x16 grid of width 64, one W-MSA + one SW-MSA block with
8 heads, window 2, shift 1, MLP 256, learned absolute position embedding, no LayerNorm after
the embedding; then one patch merging (no norm, 256 -> 128), average pooling and the head;
dropout 0.03; label smoothing 0.1; AdamW 1e-3, wd 1e-4, constant rate; batch 128; 40 epochs
on 90% of the training set). The example reports 44.8% top-1 / 75.23% top-5 on CIFAR-100.

    uv run launch.py --config configs/swin.py --workdir runs/swin_keras

Parameters here: 162,996 with 100 classes, exactly the trainable count of the example's
code (Keras `count_params()` gives 164,052 because it adds the 1,056 non-trainable index and
mask entries). The example's text says "152K": that is its 10-class build (152,442 in Keras
with the buffers, 151,386 trainable, which is what this model has with 10 classes).

The model computes what the example's computes (exact GELU, q/k/v biases, LayerNorm eps
1e-5, its window attention and patch merging): checked by
tests/test_fidelity_keras.py::test_logits_match_keras_example[swin], which runs the
example's own code (tests/make_reference_fixtures_keras.py, sizes reduced), saves its
weights as Keras does and loads them through efficient_vit/import_keras.py (the example's
fused qkv Dense is split into q, k, v; its saved index and mask, unnamed variables, are
checked against this model's).

Deviations from the example, none of which changes the parameter count or, at this
preset's sizes, the eval output:
  - Its augmentation is `random_crop(32, 32)` of a 32x32 image (a no-op) + horizontal flip,
    so `augment.crop = "none"` with `flip = True` here.
  - Its shifted-window mask is an additive -100; here masked pairs get exactly zero weight
    (the same in float32 unless two logits of a window differ by more than about 80).
  - It holds out 10% of the training set for validation: `train_split` is `train[:90%]`
    here too, but the test split is evaluated as the run goes.
  - On a feature map exactly as large as the window (not at this preset's 16x16 with window
    2) the example still shifts (its test is `min(num_patch) < window_size`); here the
    official rule applies (`<=`: one window, no shift).
  - Its residual-branch dropout (DropPath(0.03) in the 2021 version, Dropout(0.03) in the
    Keras 3 version) is stochastic depth rising linearly to 0.03 over the two blocks here.
  - Keras' AdamW decays every variable; the trainer here decays weight matrices only.
  - Initialisers are this codebase's (xavier Dense, truncated-normal 0.02 bias table).

Measured (CIFAR-10 JPEG copy, 2-core CPU shared with ~5 other jobs, load average ~10):

    TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) nice -n 10 uv run launch.py \
        --config configs/swin.py --workdir runs/swin_run --config.dataset=cifar10 \
        --config.num_train_steps=70 --config.log_every_steps=10

  70 steps of batch 128 (8,960 images, 0.2 epoch), 10.5 min wall in all (~21 img/s; the
  first step, i.e. compile, 42 s). Train loss of the logged batch (label smoothing 0.1):
  2.303 at init (zero head) -> 2.153 (step 10) -> 1.963 (step 60) -> 2.103 (step 70, one
  batch); eval on all 10,000 test images: loss 1.909, top-1 28.96%, top-5 81.63%.
  The full 40-epoch recipe has not been run here.

Presets (`--config configs/swin.py:NAME`):
  keras   - the default above.
  swin_t  - Swin-T at 224 on ImageNet: 28,288,354 parameters (paper: 28M; timm: 28.29M).
  swin_s  - Swin-S at 224: 49,606,258 parameters (paper: 50M; timm: 49.61M).
  swin_b  - Swin-B at 224: 87,768,224 parameters (paper: 88M; timm: 87.77M).
  The ImageNet presets follow the official recipe, each value cited beside it in
  `get_config` (microsoft/Swin-Transformer config.py defaults, the model yamls' drop path
  0.2 / 0.3 / 0.5, get_started.md's commands): AdamW, batch 1024 (8 GPUs x 128; Swin-B
  8 x 64 x 2 accumulation steps, kept here as grad_accum_steps=2), base lr 5e-4, warmup lr
  5e-7 and min lr 5e-6 per 512 images, scaled linearly to the batch of 1024 as main.py does
  (x2: 1e-3, 1e-6, 1e-5), 300 epochs of which 20 warmup, then cosine, wd 0.05, grad clip
  5, label smoothing 0.1, no EMA. Weight decay: the official set_weight_decay spares 1-D
  parameters, every `.bias` and `relative_position_bias_table`; the mask here
  (efficient_vit/optim.py `_decay_mask`) spares the same.
  Augmentation (config.py `_C.AUG.*`, cited in `get_config`, run in the train step):
  inception crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 /
  CutMix 1.0 with switch probability 0.5; eval resizes to 256 and crops 224.
  Not expressed: bicubic interpolation (bilinear here) and float16 mixed precision
  (`AMP_ENABLE = True`; `--config.dtype=bfloat16` is the nearest). Not yet measured.
  Architecture source: microsoft/Swin-Transformer models/swin_transformer.py (the same
  computation as timm's timm/models/swin_transformer.py): exact GELU, LayerNorm eps 1e-5,
  q/k/v biases, patch norm, merging norm, final norm. Backed by
  tests/test_swin.py::test_preset_parameter_counts (the official counts above, exactly) and
  tests/test_fidelity.py::test_logits_match_reference[timm_swin] (these fields, sizes
  reduced: a timm SwinTransformer's weights give its logits within 1e-4, shifted windows
  and patch merging included).
"""

from configs import common

# `uv run python -m configs` lists these.
PRESETS = {
    "keras": "the Keras Swin example (CIFAR-100 at 32, patch 2, windows of 2)",
    "swin_t": "Swin-T at 224 on ImageNet (28.29M parameters), the paper's recipe",
    "swin_s": "Swin-S at 224 on ImageNet (49.61M parameters), the paper's recipe",
    "swin_b": "Swin-B at 224 on ImageNet (87.77M parameters), the paper's recipe",
}

# Official architectures: (embed_dim, depths, num_heads, drop_path_rate).
_IMAGENET_MODELS = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
}


def get_config(preset: str = "keras"):
  c = common.base_config()
  c.model.name = "swin"
  if preset == "keras":
    c.dataset = "cifar100"
    c.train_split = "train[:90%]"  # The example holds out 10% for validation.
    c.eval_split = "test"
    c.image_size = 32
    c.augment.crop = "none"  # The example's random 32x32 crop of a 32x32 image is a no-op.
    c.augment.flip = True
    c.batch_size = 128
    c.num_epochs = 40.0
    c.model.update(patch_size=2, embed_dim=64, depths=(2,), num_heads=(8,), window_size=2,
                   shift_size=1, mlp_ratio=4.0, patch_norm=False,
                   absolute_position_embedding=True, merge_after_last_stage=True,
                   merge_norm=False, final_norm=False, dropout_rate=0.03,
                   attention_dropout_rate=0.03, drop_path_rate=0.03,
                   # keras-io examples/vision/swin_transformers.py: the MLP's
                   # Activation(keras.activations.gelu) is the exact (erf) GELU; qkv
                   # Dense(use_bias=qkv_bias=True); LayerNormalization(epsilon=1e-5).
                   mlp_activation="gelu", qkv_bias=True, norm_epsilon=1e-5)
    c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                       schedule="constant", label_smoothing=0.1)
  elif preset in _IMAGENET_MODELS:
    embed_dim, depths, num_heads, drop_path_rate = _IMAGENET_MODELS[preset]
    c.dataset = "imagenet2012"
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 224
    # microsoft/Swin-Transformer config.py `_C.AUG.*`, run through timm's create_transform
    # and Mixup (data/build.py):
    c.augment.update(
        crop="inception",  # RandomResizedCrop, timm's default scale 0.08-1
        crop_scale=(0.08, 1.0),
        eval_crop_fraction=0.875,  # `_C.TEST.CROP = True`: resize 256, centre crop 224
        flip=True,  # timm's default hflip 0.5
        # `_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'` (2 ops, magnitude 9, std 0.5)
        randaugment_num_ops=2, randaugment_magnitude=9.0, randaugment_magnitude_std=0.5,
        colour_jitter=0.0,  # `_C.AUG.COLOR_JITTER = 0.4`, which timm skips under RandAugment
        random_erasing_prob=0.25,  # `_C.AUG.REPROB = 0.25`
        random_erasing_mode="pixel",  # `_C.AUG.REMODE = 'pixel'` (`RECOUNT = 1`)
        mixup_alpha=0.8,  # `_C.AUG.MIXUP = 0.8`
        cutmix_alpha=1.0,  # `_C.AUG.CUTMIX = 1.0`
        mix_prob=1.0,  # `_C.AUG.MIXUP_PROB = 1.0` (`MIXUP_MODE = 'batch'`)
        mix_switch_prob=0.5)  # `_C.AUG.MIXUP_SWITCH_PROB = 0.5`
    # microsoft/Swin-Transformer get_started.md trains Swin-T and Swin-S on 8 GPUs with
    # `--batch-size 128`, Swin-B with `--batch-size 64 --accumulation-steps 2`: 1,024
    # images per update for all three.
    c.batch_size = 1024
    c.num_epochs = 300.0  # config.py `_C.TRAIN.EPOCHS = 300`
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    c.model.update(patch_size=4, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                   window_size=7, shift_size=3, mlp_ratio=4.0, patch_norm=True,
                   absolute_position_embedding=False, merge_after_last_stage=False,
                   merge_norm=True, final_norm=True, dropout_rate=0.0,
                   attention_dropout_rate=0.0, drop_path_rate=drop_path_rate,
                   # microsoft/Swin-Transformer models/swin_transformer.py: Mlp act_layer
                   # nn.GELU (exact), norm_layer nn.LayerNorm (eps 1e-5), qkv_bias=True.
                   mlp_activation="gelu", norm_epsilon=1e-5, qkv_bias=True)
    # microsoft/Swin-Transformer main.py scales BASE_LR, WARMUP_LR and MIN_LR linearly by
    # DATA.BATCH_SIZE x world size x TRAIN.ACCUMULATION_STEPS / 512 = 1024 / 512 = 2 here
    # (rescale all three by hand for another batch_size). config.py defaults, the model
    # yamls (configs/swin/swin_{tiny,small,base}_patch4_window7_224.yaml) set none of these:
    lr_scale = 1024 / 512
    c.optimizer.update(
        name="adamw",  # `_C.TRAIN.OPTIMIZER.NAME = 'adamw'`, EPS 1e-8, BETAS (0.9, 0.999)
        learning_rate=5e-4 * lr_scale,  # `_C.TRAIN.BASE_LR = 5e-4` -> 1e-3
        warmup_start_learning_rate=5e-7 * lr_scale,  # `_C.TRAIN.WARMUP_LR = 5e-7` -> 1e-6
        min_learning_rate=5e-6 * lr_scale,  # `_C.TRAIN.MIN_LR = 5e-6` -> 1e-5
        # `_C.TRAIN.WARMUP_EPOCHS = 20`; `_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True`: the
        # cosine spans the 280 epochs after the warmup, per step, as here.
        warmup_epochs=20.0,
        schedule="cosine",  # `_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'`
        weight_decay=0.05,  # `_C.TRAIN.WEIGHT_DECAY = 0.05`
        grad_clip_norm=5.0,  # `_C.TRAIN.CLIP_GRAD = 5.0`
        label_smoothing=0.1,  # `_C.MODEL.LABEL_SMOOTHING = 0.1`
        # get_started.md's Swin-B command: `--accumulation-steps 2` (a memory measure; the
        # update is that of the whole batch).
        grad_accum_steps=2 if preset == "swin_b" else 1)
  else:
    raise ValueError(f"preset {preset!r} of configs/swin.py; allowed: {', '.join(PRESETS)}")
  return c
