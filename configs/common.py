"""The config contract: the fields every experiment config has, with their defaults.

Each model family's file starts from `base_config()` and sets what its recipe needs.
Every field can be overridden on the command line: `--config.optimizer.learning_rate=3e-4`.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Data: any TFDS image-classification dataset with `image` and `label` features, or a
  # folder of images laid out as root/<split>/<class>/*.jpg|png (input_pipeline.py).
  c.dataset = "cifar10"
  c.data_dir = config_dict.placeholder(str)  # None: the TFDS default (honours TFDS_DATA_DIR).
  c.download = True  # Prepare the dataset if it is missing (fails fast when offline).
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32  # Side of the square images the model sees.
  # auto: `device` where the train split fits in device memory, else `tfdata`.
  # device: the split kept on the accelerators, augmented inside jit (CIFAR-sized data).
  # tfdata: TFDS + tf.data on the host.
  c.input_pipeline = "auto"
  c.shuffle_buffer = 16_384

  # Augmentation (train only; eval resizes or centre-crops to image_size).
  c.augment = ml_collections.ConfigDict()
  c.augment.crop = "pad"  # none | pad (pad + random crop) | resize (resize + random crop) | inception
  c.augment.crop_padding = 4  # crop=pad: pixels of padding on each side (scaled to image_size).
  c.augment.resize_size = -1  # crop=resize: side before the random crop (-1: image_size).
  c.augment.flip = True  # Random horizontal flip.
  c.augment.zoom = 0.0  # Random zoom by up to +-zoom (0.2: 80%..120%).
  c.augment.rotation = 0.0  # Random rotation by up to +-rotation of a full turn (Keras' factor).
  c.augment.contrast = 0.0  # Random contrast factor in [1 - contrast, 1 + contrast].
  # crop=inception: the range of the crop's area, as a fraction of the image (timm's scale).
  c.augment.crop_scale = (0.08, 1.0)
  # crop=inception: eval resizes to image_size / fraction and takes the central crop (timm's
  # crop_pct; 1.0: the whole image resized).
  c.augment.eval_crop_fraction = 0.875
  # Everything below runs in JAX inside the train step (efficient_vit/augment.py); the
  # defaults switch each op off.
  c.augment.randaugment_num_ops = 0  # timm's rand-mM-mstdS-inc1: ops per image (0: off)...
  c.augment.randaugment_magnitude = 0.0  # ...their magnitude M in [0, 10]...
  c.augment.randaugment_magnitude_std = 0.0  # ...and its per-op standard deviation S.
  c.augment.autoaugment = "none"  # none | cifar10 (AutoAugment's CIFAR-10 policy).
  c.augment.colour_jitter = 0.0  # Brightness, contrast, saturation factors in [1 -+ s].
  c.augment.random_erasing_prob = 0.0  # timm's reprob...
  c.augment.random_erasing_mode = "pixel"  # ...and remode: pixel | rand | const.
  c.augment.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha) (0: no Mixup).
  c.augment.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha) (0: no CutMix).
  c.augment.mix_prob = 1.0  # Probability that a batch is mixed at all...
  c.augment.mix_switch_prob = 0.5  # ...and that it is CutMix when both are on.
  c.augment.mix_stop_epoch = -1.0  # No mixing from this epoch on (-1: mix to the end).

  # Schedule of the run. Steps count global batches.
  c.batch_size = 128  # Global, over all devices and hosts.
  c.eval_batch_size = -1  # -1: batch_size.
  c.num_epochs = 10.0
  c.num_train_steps = -1  # -1: derived from num_epochs.
  c.eval_every_steps = -1  # -1: once per epoch.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.seed = 0
  c.parallelism = "shard_map"  # shard_map | pmap | fsdp (state sharded over devices)
  c.dtype = "float32"  # float32 | bfloat16: the dtype of activations; parameters stay float32.
  # A step whose loss or gradient is NaN or infinite: stop (the run ends with an error naming
  # the step; nothing of it is saved) | skip (the update is dropped and counted in the train
  # metrics as `skipped_steps`).
  c.nonfinite = "stop"

  # Start from trained weights instead of a random initialisation (efficient_vit/init_from.py):
  # a workdir of this project (layout `project`) or a reference checkpoint file (layout
  # timm_vit | big_vision_vit | timm_swin | timm_mobilevit | cct_official). A workdir with a
  # checkpoint of its own resumes from it instead.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = config_dict.placeholder(str)
  c.init_from.layout = "project"
  c.init_from.image_size = -1  # A reference checkpoint's resolution (-1: config.image_size).

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit"
  # Compile time, memory and attention kernel; every family has them, none changes a logit
  # (efficient_vit/layers.py). scan: nn.scan over identical blocks (parameters stacked on a
  # leading [depth] axis; efficient_vit/scan_layout.py converts checkpoints).
  c.model.scan = False
  c.model.remat = "none"  # none | block | a jax.checkpoint_policies name (layers.REMATS).
  c.model.attention_impl = "xla"  # xla | cudnn (NVIDIA GPUs) | auto (cudnn where it can).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | lamb | sgd
  c.optimizer.learning_rate = 1e-3  # Peak learning rate.
  c.optimizer.weight_decay = 1e-4  # Decoupled, on weight matrices only (not biases or norms).
  c.optimizer.warmup_steps = 0  # Linear warmup; warmup_epochs is added to it.
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_start_learning_rate = 0.0  # Where the warmup starts (timm's warmup_lr).
  c.optimizer.min_learning_rate = 0.0  # Where the cosine ends (timm's min_lr).
  c.optimizer.cooldown_epochs = 0.0  # At min_learning_rate at the end of the run (timm's).
  c.optimizer.schedule = "cosine"  # cosine | step | constant
  c.optimizer.decay_epochs = ()  # schedule=step: epochs at which the rate is multiplied...
  c.optimizer.decay_factor = 0.1  # ...by this factor.
  c.optimizer.label_smoothing = 0.0
  c.optimizer.grad_clip_norm = 0.0  # 0: no clipping.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.momentum = 0.9  # sgd only.
  # Exponential moving average of the parameters, evaluated beside them (0: none):
  # ema = ema_decay * ema + (1 - ema_decay) * params after every step.
  c.optimizer.ema_decay = 0.0
  # Gradients averaged over this many micro-batches of each device's share of the batch
  # before the one update: a recipe's global batch on fewer or smaller devices.
  c.optimizer.grad_accum_steps = 1
  return c
