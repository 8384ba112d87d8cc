"""Smoke tests of efficient_vit.benchmark and token_sweep: a tiny token sweep and one
single-config run.

They check what the benchmark reports (keys, FLOP growth, files), never how fast
anything runs.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from efficient_vit import benchmark, host_memory, token_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SINGLE_RUN_KEYS = {
    "model", "config", "dataset", "image_size", "params", "forward_gflops_per_image",
    "train_gflops_per_step", "train_flops_source", "train_img_per_s_fixed",
    "train_img_per_s_fixed_blocks",
    "train_img_per_s_pipeline", "pipeline_ratio", "input_pipeline", "eval_img_per_s",
    "compile_train_s", "compile_eval_s", "attention", "peak_memory_bytes", "peak_memory_note",
    "train_step_memory_bytes", "mfu", "peak_tflops_per_device", "device_kind", "platform",
    "num_devices", "dtype", "batch_size", "steps", "parallelism", "retain_host_memory",
    "host_huge_pages",
}


def test_token_sweep_writes_json_and_plot(tmp_path):
  # Width 16: ViT's N^2 attention already outweighs its per-token projections at 64 tokens.
  results = token_sweep.token_sweep(["vit", "eanet"], [64, 256], out_dir=str(tmp_path),
                                    dim=16, depth=1, patch=2, batch_size=2, steps=1,
                                    log=lambda _: None)

  with open(tmp_path / "token_sweep.json", encoding="utf-8") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  for family in ("vit", "eanet"):
    record = saved["families"][family]
    assert record["stopped"] is None
    assert [p["tokens"] for p in record["points"]] == [64, 256]
    assert [p["image_size"] for p in record["points"]] == [16, 32]
    for point in record["points"]:
      assert point["train_flops_per_step"] > 0
      assert point["step_s"] > 0 and point["train_step_memory_bytes"] > 0

  def flops_ratio(family):
    first, last = saved["families"][family]["points"]
    return last["train_flops_per_step"] / first["train_flops_per_step"]

  # 4x the tokens: full self-attention grows clearly faster than 4x, external attention
  # stays near 4x (only the fixed-size head and optimizer terms keep it below).
  assert flops_ratio("vit") > 5.5, flops_ratio("vit")
  assert 3.2 < flops_ratio("eanet") < 4.5, flops_ratio("eanet")
  assert saved["families"]["vit"]["flops_loglog_slope"] > 1.2
  assert 0.8 < saved["families"]["eanet"]["flops_loglog_slope"] < 1.1

  png = tmp_path / "token_sweep.png"
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  height, width = matplotlib.image.imread(png).shape[:2]
  assert width > 1000 and height > 300


def test_token_sweep_rejects_bad_families_and_token_counts(tmp_path):
  with pytest.raises(ValueError, match="perfect square"):
    token_sweep.token_sweep(["vit"], [100, 200], out_dir=str(tmp_path))
  with pytest.raises(ValueError, match="families='mobilevit'; allowed: vit, cct"):
    token_sweep.token_sweep(["mobilevit"], [64], out_dir=str(tmp_path))


def test_peak_table_matches_device_kinds():
  assert benchmark.peak_tflops_per_device("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert benchmark.peak_tflops_per_device("NVIDIA H100 80GB HBM3", "float32") == 67.0
  assert benchmark.peak_tflops_per_device("NVIDIA A100-SXM4-40GB", "float32") == 19.5
  assert benchmark.peak_tflops_per_device("TPU v5 lite", "bfloat16") == 197.0
  assert benchmark.peak_tflops_per_device("TPU v5p", "bfloat16") == 459.0
  assert benchmark.peak_tflops_per_device("cpu", "float32") is None


def test_single_config_prints_one_json_line(capsys, monkeypatch):
  # The command line's own path (flags -> config -> one JSON line), run in this process:
  # a subprocess would pay TensorFlow's and JAX's imports again.
  from absl import flags

  config_path = os.path.join(ROOT, "configs", "vit.py")
  argv = ["benchmark", f"--config={config_path}:tiny_cifar10", "--input=fixed", "--steps=2",
          "--warmup_steps=1", "--batch_size=4", "--config.model.patch_size=8",
          "--config.model.embed_dim=16", "--config.model.depth=1",
          "--config.model.num_heads=2", "--config.model.mlp_dim=32", "--peak_tflops=0.5"]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads overrides from sys.argv.
  try:
    benchmark.main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if line.startswith("{")]
  assert len(lines) == 1, out
  record = json.loads(lines[0])
  assert set(record) == SINGLE_RUN_KEYS
  assert record["model"] == "vit" and record["config"] == f"{config_path}:tiny_cifar10"
  assert record["batch_size"] == 4 and record["steps"] == 2
  assert record["retain_host_memory"] is False  # Off unless asked for.
  # Called from a test, main() never restarts: the record says what this process has.
  assert record["host_huge_pages"] is host_memory.huge_pages_on()
  # 16 tokens of width 16, one block, 10 classes.
  assert 5_000 < record["params"] < 7_000
  assert record["forward_gflops_per_image"] > 0
  # Forward + backward: about 3x the forward work of the 4 images (the optimizer and the
  # compiler's own counting move it a little).
  forward_of_batch = record["forward_gflops_per_image"] * 4
  assert 2.0 < record["train_gflops_per_step"] / forward_of_batch < 6.0
  assert record["train_flops_source"] == "compiled"
  assert record["train_img_per_s_fixed"] > 0 and record["eval_img_per_s"] > 0
  assert len(record["train_img_per_s_fixed_blocks"]) == 1  # No pipeline block to bracket.
  assert record["train_img_per_s_pipeline"] is None and record["pipeline_ratio"] is None
  assert record["compile_train_s"] > 0 and record["train_step_memory_bytes"] > 0
  if record["platform"] == "cpu":
    assert record["peak_memory_bytes"] is None and record["peak_memory_note"]
  # MFU = train FLOP/s at the fixed-batch rate / (devices x the given peak).
  flops_per_s = record["train_gflops_per_step"] * 1e9 * record["train_img_per_s_fixed"] / 4
  expected = flops_per_s / (0.5e12 * record["num_devices"])
  assert record["peak_tflops_per_device"] == 0.5
  assert record["mfu"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("field,value", [("scan", True), ("remat", "block")])
def test_scanned_and_remat_models_count_model_flops(tiny_vit_config, field, value):
  # XLA's cost analysis counts a loop body once, and counts a remat step's recomputation
  # (not model FLOPs): both take their FLOPs from the unscanned forward pass, so the
  # forward count equals the plain model's.
  tiny_vit_config.update(batch_size=4)
  tiny_vit_config.model.depth = 3
  records = {}
  for changed in (False, True):
    if changed:
      tiny_vit_config.model[field] = value
    records[changed] = benchmark.benchmark_config(tiny_vit_config, steps=1, warmup_steps=0,
                                                  input_mode="fixed")
  assert records[False]["train_flops_source"] == "compiled"
  assert records[True]["forward_gflops_per_image"] == pytest.approx(
      records[False]["forward_gflops_per_image"], rel=1e-6)
  assert records[True]["train_flops_source"] == "3x_forward"
  # 3 x forward x batch against the compiled count of the unscanned step: close.
  ratio = records[True]["train_gflops_per_step"] / records[False]["train_gflops_per_step"]
  assert 0.5 < ratio < 2.0
