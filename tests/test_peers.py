"""The logic of the peer comparison (benchmarks/peers.py), without torch or Keras: argument
errors, the alternation order, the table, the peer specs read from the presets, the
worker's protocol (run in this Python, where no peer framework is needed to test it). The
project side is `efficient_vit.benchmark.StepTimer`, tested in tests/test_benchmark.py."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from benchmarks import peers


def plan(**overrides):
  args = dict(models=["cct"], rounds=3, steps=2, warmup_steps=1, batch_size=None,
              timm_python=None, keras_python=sys.executable, block_warmup_steps=1)
  args.update(overrides)
  return peers.make_plan(**args)


def test_plan_accepts_a_valid_command_line():
  p = plan(models=["vit_s16", "cct"], timm_python=sys.executable)
  assert [c.label for c in p.comparisons] == ["ViT-S/16 at 224",
                                              "CCT seed config (configs/cct.py) at 32"]
  assert p.pythons == {"timm": sys.executable, "keras": sys.executable}
  # Only the peers of the chosen rows are needed.
  assert plan(models=["cct"]).pythons == {"keras": sys.executable}


@pytest.mark.parametrize("overrides, message", [
    (dict(models=["vit_b16"]), "--models=vit_b16; allowed: a comma-separated list of "
                               "vit_s16, swin_t, mobilevit_xxs, cct"),
    (dict(models=[]), "--models=; allowed"),
    (dict(models=["cct", "cct"]), "--models=cct,cct; each model at most once"),
    (dict(rounds=0), "--rounds=0; allowed: 1 or more"),
    (dict(steps=0), "--steps=0; allowed: 1 or more"),
    (dict(warmup_steps=-1), "--warmup_steps=-1; allowed: 0 or more"),
    (dict(block_warmup_steps=-1), "--block_warmup_steps=-1; allowed: 0 or more"),
    (dict(batch_size=0), "--batch_size=0; allowed: a positive batch"),
    (dict(models=["swin_t", "cct"]), "--timm_python is not set; the rows swin_t need"),
    (dict(keras_python=None), "--keras_python is not set; the rows cct need"),
    (dict(keras_python="/nonexistent/python"), "--keras_python=/nonexistent/python; allowed: "
                                               "an executable Python file"),
])
def test_plan_rejects_bad_arguments(overrides, message):
  with pytest.raises(ValueError) as e:
    plan(**overrides)
  assert message in str(e.value)


def test_plan_rejects_a_python_that_cannot_run(tmp_path):
  python = tmp_path / "python"
  python.write_text("")
  python.chmod(stat.S_IRUSR | stat.S_IWUSR)
  with pytest.raises(ValueError, match=f"--timm_python={python}; allowed: an executable"):
    plan(models=["mobilevit_xxs"], timm_python=str(python))


def test_blocks_alternate_project_then_peer_every_round():
  assert peers.schedule(["project", "peer"], 3) == [
      (0, "project"), (0, "peer"), (1, "project"), (1, "peer"), (2, "project"), (2, "peer")]
  calls = []

  def runner(side, seconds):
    def run(steps):
      calls.append((side, steps))
      return seconds.pop(0)
    return run

  seconds = peers.alternate({"project": runner("project", [1.0, 2.0, 4.0]),
                             "peer": runner("peer", [0.5, 0.25, 1.0])}, rounds=3, steps=7)
  assert calls == [("project", 7), ("peer", 7)] * 3
  assert seconds == {"project": [1.0, 2.0, 4.0], "peer": [0.5, 0.25, 1.0]}
  # With untimed steps before every block: they run first and are not timed.
  calls.clear()
  warm = peers.alternate({"project": runner("project", [9.0, 1.0, 9.0, 2.0]),
                          "peer": runner("peer", [9.0, 0.5, 9.0, 0.25])}, rounds=2, steps=7,
                         block_warmup_steps=1)
  assert calls == [("project", 1), ("project", 7), ("peer", 1), ("peer", 7)] * 2
  assert warm == {"project": [1.0, 2.0], "peer": [0.5, 0.25]}
  summary = peers.summarize(seconds, steps=7, batch_size=4)
  # 28 images per block: medians 14 img/s (project) and 56 img/s (peer).
  assert summary["img_per_s"]["project"] == [28.0, 14.0, 7.0]
  assert summary["median_img_per_s"] == {"project": 14.0, "peer": 56.0}
  assert summary["ratio"] == 0.25


def test_table_has_the_issue_layout():
  table = peers.format_table([
      {"model": "ViT-S/16 at 224", "batch": 16, "project": 3.1, "peer": "timm",
       "peer_img_s": 4.6},
      {"model": "CCT seed config", "batch": 128, "project": 127.4, "peer": "Keras 3 / TF",
       "peer_img_s": 137.2},
      {"model": "x", "batch": 8, "project": 25.04, "peer": "timm", "peer_img_s": 12.5}])
  assert table == "\n".join([
      "| model | batch | this project img/s | peer img/s | ratio |",
      "| --- | --- | --- | --- | --- |",
      "| ViT-S/16 at 224 | 16 | 3.10 | timm 4.60 | 0.67 |",
      "| CCT seed config | 128 | 127 | Keras 3 / TF 137 | 0.93 |",
      "| x | 8 | 25.0 | timm 12.5 | 2.00 |"])


def test_peer_specs_follow_the_presets():
  swin = peers.COMPARISONS["swin_t"]
  config = swin.config()
  spec = swin.peer_spec(config, threads=2, warmup_steps=1)
  assert config.batch_size == 16 and config.dtype == "float32"
  assert spec["framework"] == "timm" and spec["model"] == "swin_tiny_patch4_window7_224"
  assert spec["create_kwargs"] == {"num_classes": 1000, "img_size": 224, "drop_rate": 0.0,
                                   "drop_path_rate": 0.2, "proj_drop_rate": 0.0,
                                   "attn_drop_rate": 0.0}
  assert (spec["grad_clip_norm"], spec["label_smoothing"]) == (5.0, 0.1)
  assert spec["optimizer"]["weight_decay"] == 0.05

  for comparison in peers.COMPARISONS.values():
    augment = comparison.config().augment
    # The peers' loops do not augment either.
    assert (augment.crop, augment.flip) == ("none", False)
    assert augment.get("mixup_alpha", 0.0) == 0.0
    assert augment.get("randaugment_num_ops", 0) == 0

  vit = peers.COMPARISONS["vit_s16"]
  assert vit.config().model.mlp_activation == "gelu"  # timm's exact GELU on both sides.
  mobilevit = peers.COMPARISONS["mobilevit_xxs"]
  spec = mobilevit.peer_spec(mobilevit.config(batch_size=4), threads=2, warmup_steps=1)
  assert spec["batch_size"] == 4 and spec["image_size"] == 256
  assert spec["ema_decay"] == pytest.approx(0.9995)
  assert "img_size" not in spec["create_kwargs"]

  cct = peers.COMPARISONS["cct"]
  spec = cct.peer_spec(cct.config(), threads=2, warmup_steps=1)
  # keras-io examples/vision/cct.py: conv channels [64, 128], projection_dim 128, 2 heads,
  # transformer_units [128, 128], 2 layers, stochastic depth 0.1, CIFAR-10.
  assert spec["model"] == {"image_size": 32, "conv_channels": [64, 128], "depth": 2,
                           "num_heads": 2, "key_dim": 128, "mlp_units": [128, 128],
                           "stochastic_depth_rate": 0.1, "dropout_rate": 0.1,
                           "num_classes": 10}
  assert spec["batch_size"] == 128 and spec["label_smoothing"] == 0.1


def test_worker_protocol_reports_errors_and_quits():
  # This Python has neither torch nor Keras: the protocol itself is what runs here.
  worker = peers.PeerProcess(sys.executable)
  try:
    with pytest.raises(RuntimeError, match="run before setup"):
      worker.call(op="run", steps=1)
    with pytest.raises(RuntimeError, match="framework='nope'; allowed: timm, keras_cct"):
      worker.call(op="setup", spec={"framework": "nope"})
    with pytest.raises(RuntimeError, match="op='jump'; allowed: setup, run, quit"):
      worker.call(op="jump")
  finally:
    worker.close()
  assert worker.proc.returncode == 0
  assert not os.path.exists(worker.log.name)


def test_worker_that_dies_is_reported_with_its_log(tmp_path):
  script = tmp_path / "python"
  script.write_text("#!/bin/sh\necho 'no such module: torch' >&2\nexit 3\n")
  script.chmod(0o755)
  worker = peers.PeerProcess(str(script))
  with pytest.raises(RuntimeError, match=r"exited \(code 3\) during setup(.|\n)*no such module"):
    worker.call(op="setup", spec={})
  worker.close()



def test_profile_maps_hlo_instructions_to_their_sources():
  from benchmarks import profile_step

  hlo = "\n".join([
      '  %ynn_fusion.374 = f32[1576,384]{1,0} fusion(%a, %b), kind=kCustom, calls=%f.374, '
      'metadata={op_name="jit(train_step)/transpose(jvp(ViT))/encoder/block_8/mlp/Dense_0/'
      'dot_general" stack_frame_id=137}',
      '  ROOT %copy_bitcast_fusion.2 = f32[8,6,197,64]{3,2,1,0} fusion(%c), kind=kLoop, '
      'metadata={op_name="jit(train_step)/jvp(SwinTransformer)/stage2_block3/attention/'
      'transpose"}',
      "  %while.485 = (s32[], u32[4]{0}) while(%tuple.359), condition=%c, body=%b"])
  names = profile_step.hlo_instructions(hlo)
  assert names["while.485"] == ("while", "")
  assert profile_step.source_of(names["ynn_fusion.374"][1]) == "bwd encoder/block_*/mlp/Dense_0/dot_general"
  assert profile_step.source_of(names["copy_bitcast_fusion.2"][1]) == (
      "fwd stage*_block*/attention/transpose")
  assert profile_step.source_of("") == "? (no metadata)"
