"""The MFU table's script (benchmarks/mfu.py): argument errors, the batch halved on running
out of memory, cells that cannot run, and one real cell on CPU. What a cell measures is
`efficient_vit.benchmark.benchmark_config`, tested in tests/test_benchmark.py."""

from __future__ import annotations

import pytest

from benchmarks import mfu


def plan(**overrides):
  args = dict(rows=["vit_s16"], impls=["xla"], dtype="float32", batch_size=None,
              min_batch=8, steps=2, warmup_steps=1)
  args.update(overrides)
  return mfu.make_plan(**args)


def test_plan_keeps_the_rows_and_implementations_asked_for():
  p = plan(rows=["swin_t", "perceiver"], impls=["cudnn", "xla"])
  assert [r.label for r in p.rows] == ["Swin-T at 224", "Perceiver (ImageNet) at 224"]
  assert p.impls == ["cudnn", "xla"]


@pytest.mark.parametrize("overrides, message", [
    (dict(rows=["vit_b16"]), "--rows=vit_b16; allowed: each of vit_s16, swin_t, cct_14_7x2, "
                             "perceiver at most once"),
    (dict(rows=[]), "--rows=; allowed"),
    (dict(rows=["swin_t", "swin_t"]), "--rows=swin_t,swin_t; allowed"),
    (dict(impls=["flash"]), "--impls=flash; allowed: each of xla, cudnn, auto at most once"),
    (dict(min_batch=0), "--min_batch=0; allowed: 1 or more"),
    (dict(batch_size=4), "--batch_size=4; allowed: at least --min_batch=8"),
    (dict(steps=0), "--steps=0; allowed: 1 or more"),
    (dict(warmup_steps=-1), "--warmup_steps=-1; allowed: 0 or more"),
])
def test_plan_rejects_bad_arguments(overrides, message):
  with pytest.raises(ValueError) as e:
    plan(**overrides)
  assert message in str(e.value)


def test_row_config_is_the_presets_model_step_alone():
  config = mfu.row_config(mfu.ROWS["vit_s16"], "auto", "bfloat16", 64)
  assert (config.batch_size, config.dtype, config.model.attention_impl) == (
      64, "bfloat16", "auto")
  assert config.optimizer.grad_accum_steps == 1
  # The preset's augmentation (RandAugment, Mixup, CutMix, the crop) is off.
  assert config.augment.randaugment_num_ops == 0
  assert config.augment.mixup_alpha == config.augment.cutmix_alpha == 0.0
  assert (config.augment.crop, config.augment.flip) == ("none", False)
  assert config.model.name == "vit" and config.image_size == 224


class Fake:
  """benchmark_config's stand-in: out of memory above `fits`, else a record."""

  def __init__(self, fits, error=None):
    self.fits, self.error, self.batches = fits, error, []

  def __call__(self, config, **kwargs):
    self.batches.append(config.batch_size)
    assert kwargs["input_mode"] == "fixed"
    if self.error is not None:
      raise self.error
    if config.batch_size > self.fits:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return {"batch_size": config.batch_size, "mfu": 0.5, "train_img_per_s_fixed": 100.0,
            "train_step_memory_bytes": 2e9, "compile_train_s": 3.0,
            "peak_tflops_per_device": 989.0}


def test_the_batch_halves_while_the_device_runs_out_of_memory():
  fake, logged = Fake(fits=100), []
  cell = mfu.measure(mfu.ROWS["swin_t"], "xla", plan(), run=fake, log=logged.append)
  assert fake.batches == [256, 128, 64]
  assert cell["batch_size"] == 64 and cell["attention_impl"] == "xla"
  assert logged[0] == "Swin-T at 224, xla: out of memory at batch 256; trying 128"
  assert "| Swin-T at 224 | `configs/swin.py:swin_t` | 64 | xla | 100 | 0.500 | 2.00 | 3.0 |" in (
      mfu.format_table([cell]))


def test_out_of_memory_below_the_smallest_batch_is_a_row_that_says_so():
  fake = Fake(fits=4)
  cell = mfu.measure(mfu.ROWS["vit_s16"], "xla", plan(batch_size=32, min_batch=16), run=fake)
  assert fake.batches == [32, 16]
  assert cell["error"] == "out of memory at batch 16 (--min_batch=16)"
  assert "| 16 | xla | out of memory at batch 16" in mfu.format_table([cell])


def test_cudnn_off_a_gpu_is_not_built():
  fake = Fake(fits=1024)
  cell = mfu.measure(mfu.ROWS["cct_14_7x2"], "cudnn", plan(), run=fake)
  assert fake.batches == []
  assert cell["error"].startswith("not run: --impls='cudnn' needs an NVIDIA GPU")


def test_a_fused_kernels_refusal_is_a_row_an_xla_error_is_raised(monkeypatch):
  from efficient_vit import layers

  monkeypatch.setattr(layers, "check_attention_impl", lambda value, field: None)
  refusal = ValueError("cuDNN does not support this mask\nwith details")
  cell = mfu.measure(mfu.ROWS["perceiver"], "cudnn", plan(), run=Fake(1024, refusal))
  assert cell["error"] == "not run: ValueError: cuDNN does not support this mask"
  with pytest.raises(ValueError, match="cuDNN does not support"):
    mfu.measure(mfu.ROWS["perceiver"], "xla", plan(), run=Fake(1024, refusal))


def test_one_real_cell_on_cpu(monkeypatch):
  monkeypatch.setitem(mfu.ROWS, "vit_s16", mfu.Row("ViT tiny", "vit", "tiny_cifar10", 8))
  cell = mfu.measure(mfu.ROWS["vit_s16"], "auto", plan(steps=1, warmup_steps=0),
                     peak_tflops=1.0)
  assert (cell["batch_size"], cell["dtype"], cell["attention_impl"]) == (8, "float32", "auto")
  assert cell["mfu"] > 0 and cell["train_img_per_s_fixed"] > 0
  table = mfu.format_table([cell])
  assert "| ViT tiny | `configs/vit.py:tiny_cifar10` | 8 | auto |" in table
  assert "MFU against 1 TFLOP/s per device" in mfu.describe([cell], plan())
