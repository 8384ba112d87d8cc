"""Builds the PyTorch reference fixtures of tests/test_fidelity.py (not run by the tests).

Small random-weight models are built with the reference code itself (timm 1.0.x for ViT,
Swin and MobileViT; vit-pytorch's copy of the official CCT, `vit_pytorch/cct.py`, which
keeps SHI-Labs/Compact-Transformers' module names), every weight is perturbed (so that no
zero- or one-initialised tensor -- heads, biases, norms, relative-bias tables, batch-norm
statistics -- can hide a mistake), and each model's state dict, a fixed input batch and its
eval-mode logits are written to tests/fixtures/:

  <name>.safetensors   the state dict (the `.pth` for one of them, torch.save's zip format,
                       to test the torch-free reader; a big_vision-named `.npz` for the
                       big_vision ViT)
  <name>_io.npz        `images` [batch, H, W, C] (channels last, as the project takes them)
                       and `logits` [batch, classes] of the reference in eval mode

PyTorch is not a dependency of the project: run this in a throw-away venv outside the repo,
from the repository root:

  uv venv /tmp/refenv --python 3.11
  VIRTUAL_ENV=/tmp/refenv nice uv pip install torch==2.14.1 timm==1.0.31 vit-pytorch==1.26.11 \
      safetensors numpy
  /tmp/refenv/bin/python tests/make_reference_fixtures_torch.py

Each model's form (activation, norm epsilon, biases, block layout, pooling) is the one of the
paper preset it backs (configs/<family>.py); only the sizes are reduced. The sizes here must
stay equal to those in tests/test_fidelity.py.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import safetensors.numpy
import timm
import torch
from timm.models import byobnet, mobilevit
from vit_pytorch import cct as vit_pytorch_cct

OUT = pathlib.Path(__file__).resolve().parent / "fixtures"
BATCH = 4
NUM_CLASSES = 5


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Moves every tensor of the state dict off its initial value.

  Weights get Gaussian noise; LayerNorm / BatchNorm scales become 1 + noise, biases and
  tables noise, BN running variances positive values away from 1 and running means noise.
  Integer buffers (BN's `num_batches_tracked`, index tables) are left alone.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if name in ("head.weight", "head.fc.weight", "classifier.fc.weight"):
        tensor.copy_(3.0 * noise / np.sqrt(tensor.shape[1]))  # Logits that differ per image.
      elif name.endswith("running_var"):
        tensor.copy_(0.5 + noise.abs())
      elif name.endswith("running_mean"):
        tensor.copy_(0.2 * noise)
      elif "positional_emb" in name and tensor.requires_grad is False:
        continue
      elif tensor.ndim == 1 and name.endswith("weight"):  # norm scales
        tensor.copy_(1.0 + 0.2 * noise)
      elif tensor.ndim == 1 or "relative_position_bias_table" in name or "pos_embed" in name \
          or "positional_emb" in name or "cls_token" in name:
        tensor.copy_(0.2 * noise)
      else:
        fan_in = max(1, int(np.prod(tensor.shape[1:])))
        tensor.copy_(noise / np.sqrt(fan_in))
    # Sine tables are parameters without gradient in the official CCT: keep them exact.


def state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def run(model: torch.nn.Module, images_nchw: torch.Tensor) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    return model(images_nchw).double().numpy().astype(np.float32)


def save(name: str, model: torch.nn.Module, image_size: int, seed: int, fmt: str = "st",
         state: dict[str, np.ndarray] | None = None) -> None:
  gen = torch.Generator().manual_seed(1000 + seed)
  images = torch.randn((BATCH, 3, image_size, image_size), generator=gen)
  # Different scales and offsets per image, so that the images' argmax differ.
  images = images * torch.linspace(0.5, 2.0, BATCH)[:, None, None, None] + torch.randn(
      (BATCH, 3, 1, 1), generator=gen)
  logits = run(model, images)
  if fmt == "st":
    safetensors.numpy.save_file(state_numpy(model), str(OUT / f"{name}.safetensors"))
  elif fmt == "pth":
    torch.save(model.state_dict(), OUT / f"{name}.pth")
  else:
    np.savez(OUT / f"{name}.npz", **state)
  np.savez(OUT / f"{name}_io.npz", images=images.permute(0, 2, 3, 1).numpy(), logits=logits)
  print(f"{name}: logits {logits.shape}, std {logits.std():.3f}, argmax {logits.argmax(-1)}")


def timm_vit(seed: int, **kwargs) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
      num_classes=NUM_CLASSES, **kwargs)
  perturb(model, seed)
  return model


def big_vision_names(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """A timm ViT's weights under big_vision's names (big_vision/models/vit.py), flax layouts.

  big_vision adds `pos_embedding` [1, N, D] to the patches before it prepends `cls`, so the
  class token's position vector is folded into `cls` (big_vision's `fix_old_checkpoints`
  does the same to old checkpoints).
  """
  sd = state_numpy(model)
  dim = sd["cls_token"].shape[-1]
  heads = model.blocks[0].attn.num_heads
  out = {
      "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
      "embedding/bias": sd["patch_embed.proj.bias"],
      "cls": sd["cls_token"] + sd["pos_embed"][:, :1],
      "pos_embedding": sd["pos_embed"][:, 1:],
      "Transformer/encoder_norm/scale": sd["norm.weight"],
      "Transformer/encoder_norm/bias": sd["norm.bias"],
      "head/kernel": sd["head.weight"].T,
      "head/bias": sd["head.bias"],
  }
  for i in range(len(model.blocks)):
    p, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    out[b + "LayerNorm_0/scale"] = sd[p + "norm1.weight"]
    out[b + "LayerNorm_0/bias"] = sd[p + "norm1.bias"]
    out[b + "LayerNorm_1/scale"] = sd[p + "norm2.weight"]
    out[b + "LayerNorm_1/bias"] = sd[p + "norm2.bias"]
    qkv_w = sd[p + "attn.qkv.weight"].reshape(3, heads, dim // heads, dim)
    qkv_b = sd[p + "attn.qkv.bias"].reshape(3, heads, dim // heads)
    for j, n in enumerate(("query", "key", "value")):
      out[b + f"MultiHeadDotProductAttention_0/{n}/kernel"] = qkv_w[j].transpose(2, 0, 1)
      out[b + f"MultiHeadDotProductAttention_0/{n}/bias"] = qkv_b[j]
    out[b + "MultiHeadDotProductAttention_0/out/kernel"] = (
        sd[p + "attn.proj.weight"].T.reshape(heads, dim // heads, dim))
    out[b + "MultiHeadDotProductAttention_0/out/bias"] = sd[p + "attn.proj.bias"]
    for j, n in enumerate(("fc1", "fc2")):
      out[b + f"MlpBlock_0/Dense_{j}/kernel"] = sd[p + f"mlp.{n}.weight"].T
      out[b + f"MlpBlock_0/Dense_{j}/bias"] = sd[p + f"mlp.{n}.bias"]
  assert len(out) == len(sd) + 4 * len(model.blocks), "every timm tensor renamed"
  return out


def small_mobilevit(seed: int) -> torch.nn.Module:
  """timm's MobileViT (byobnet) with the XXS layout of `mobilevit_xxs` at reduced widths."""
  cfg = byobnet.ByoModelCfg(
      blocks=(
          mobilevit._inverted_residual_block(d=1, c=8, s=1, br=2.0),
          mobilevit._inverted_residual_block(d=2, c=16, s=2, br=2.0),
          mobilevit._mobilevit_block(d=1, c=16, s=2, transformer_dim=16, transformer_depth=1,
                                     patch_size=2, br=2.0),
          mobilevit._mobilevit_block(d=1, c=24, s=2, transformer_dim=24, transformer_depth=2,
                                     patch_size=2, br=2.0),
          mobilevit._mobilevit_block(d=1, c=32, s=2, transformer_dim=32, transformer_depth=1,
                                     patch_size=2, br=2.0),
      ),
      stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu",
      num_features=64)
  torch.manual_seed(seed)
  model = byobnet.ByobNet(cfg, num_classes=NUM_CLASSES)
  perturb(model, seed)
  # Random running statistics let the activations shrink layer by layer until every image
  # gives the same logits; statistics measured on random images keep them alive. They are
  # then perturbed again, so that none is what a fresh BatchNorm would hold.
  gen = torch.Generator().manual_seed(2000 + seed)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.reset_running_stats()
      module.momentum = None  # A cumulative average over the calibration batches.
  model.train()
  with torch.no_grad():
    for _ in range(4):
      model(torch.randn((16, 3, 64, 64), generator=gen))
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        shape = module.running_mean.shape
        module.running_mean.add_(0.1 * torch.randn(shape, generator=gen))
        module.running_var.mul_(1.0 + 0.2 * torch.rand(shape, generator=gen))
  model.eval()
  return model


def official_cct(seed: int, positional_embedding: str, conv_layers: int, heads: int,
                 mlp_ratio: float) -> torch.nn.Module:
  """vit-pytorch's CCT (the official code's modules and names), width 32, 2 blocks."""
  torch.manual_seed(seed)
  model = vit_pytorch_cct.CCT(
      img_size=32, embedding_dim=32, n_conv_layers=conv_layers, kernel_size=3, stride=1,
      padding=1, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=2,
      num_heads=heads, mlp_ratio=mlp_ratio, num_classes=NUM_CLASSES,
      positional_embedding=positional_embedding)
  perturb(model, seed)
  return model


def main() -> None:
  OUT.mkdir(exist_ok=True)
  torch.set_num_threads(int(os.environ.get("THREADS", "1")))
  save("timm_vit_token", timm_vit(1, global_pool="token"), 32, 1)
  save("timm_vit_gap", timm_vit(2, class_token=False, global_pool="avg"), 32, 2)
  bv = timm_vit(3, global_pool="token", act_layer="gelu_tanh")
  save("big_vision_vit", bv, 32, 3, fmt="npz", state=big_vision_names(bv))
  torch.manual_seed(4)
  swin = timm.models.swin_transformer.SwinTransformer(
      img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
      num_heads=(2, 4), num_classes=NUM_CLASSES)
  perturb(swin, 4)
  save("timm_swin", swin, 32, 4)
  save("timm_mobilevit", small_mobilevit(5), 64, 5)
  # cct_2_3x2's layout (2 conv layers, 2 heads, MLP ratio 1) and cct_6_3x1's (1 conv layer,
  # 4 heads, MLP ratio 2, sine positions), both at width 32 with 2 blocks.
  save("cct_learned", official_cct(6, "learnable", 2, 2, 1.0), 32, 6, fmt="pth")
  save("cct_sine", official_cct(7, "sine", 1, 4, 2.0), 32, 7)


if __name__ == "__main__":
  main()
