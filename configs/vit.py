"""ViT, the full self-attention baseline.

Default: the Keras example "Image classification with Vision Transformer" (CIFAR-100
resized to 72, patch 6 = 144 tokens, 8 blocks of width 64 with 4 heads of key_dim 64,
MLP [128, 64], flatten + MLP head [2048, 1024], AdamW 1e-3 wd 1e-4, batch 256, 100 epochs;
the example reports 55.14% top-1). 21.76M parameters here for 100 classes.

    uv run launch.py --config configs/vit.py --workdir /tmp/vit_keras

Presets (`--config configs/vit.py:NAME`):
  tiny_cifar10 - a small ViT (patch 4, dim 128, 4 blocks, 1 epoch) that shows learning on a
      CPU: measured 39.93% top-1 / 89.67% top-5 on CIFAR-10 (JPEG copy) after its one epoch,
      in 9 min 34 s wall on the 2-core CPU (one other job running); command in README.
  s16_imagenet - ViT-S/16 at 224 on ImageNet (22.05M parameters with 1,000 classes).
"""

from configs import common


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
    c.model.update(patch_size=6, hidden_dim=64, depth=8, num_heads=4, head_dim=64, mlp_dim=128,
                   pooling="flatten", head_hidden_dims=(2048, 1024), mlp_activate_last=True,
                   dropout_rate=0.1, attention_dropout_rate=0.1, head_dropout_rate=0.5)
    c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="constant")
  elif preset == "tiny_cifar10":
    c.dataset = "cifar10"
    c.image_size = 32
    c.batch_size = 128
    c.num_epochs = 1.0
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.model.update(patch_size=4, hidden_dim=128, depth=4, num_heads=4, mlp_dim=256,
                   pooling="gap")
    c.optimizer.update(name="adamw", learning_rate=2e-3, weight_decay=0.05, warmup_steps=50,
                       schedule="cosine")
  elif preset == "s16_imagenet":
    c.dataset = "imagenet2012"
    c.eval_split = "validation"  # ImageNet's test labels are not public.
    c.image_size = 224
    c.augment.crop = "inception"
    c.batch_size = 1024
    c.num_epochs = 90.0
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    c.model.update(patch_size=16, hidden_dim=384, depth=12, num_heads=6, mlp_dim=1536,
                   pooling="cls")
    c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4, warmup_steps=10_000,
                       schedule="cosine", grad_clip_norm=1.0)
  else:
    raise ValueError(f"preset {preset!r} of configs/vit.py; allowed: keras, tiny_cifar10, "
                     "s16_imagenet")
  return c
