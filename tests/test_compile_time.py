"""benchmarks/compile_time.py: argument errors, the kernel count of a compiled program, the
table, and one real measurement in this process (the script runs each in its own)."""

from __future__ import annotations

import pytest

from benchmarks import compile_time

HLO = """HloModule jit_step

%fc (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %multiply.1 = f32[4,8]{1,0} multiply(%param_0, %param_0), metadata={op_name="a"}
}

%fc.1 (param_0.1: f32[4,8]) -> f32[4,8] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %multiply.2 = f32[4,8]{1,0} multiply(%param_0.1, %param_0.1), metadata={op_name="b"}
}

%fc.2 (param_0.2: f32[4,8]) -> f32[4,8] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  ROOT %add.1 = f32[4,8]{1,0} add(%param_0.2, %param_0.2)
}

ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %mul_fusion = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fc
  %mul_fusion.1 = f32[4,8]{1,0} fusion(%mul_fusion), kind=kLoop, calls=%fc.1
  %w = (s32[], f32[4,8]) while(%t), condition=%c, body=%b
  ROOT %add_fusion = f32[4,8]{1,0} fusion(%mul_fusion.1), kind=kLoop, calls=%fc.2
}
"""


def test_identical_fusions_up_to_names_count_once():
  assert compile_time.kernel_counts(HLO) == {"fusions": 3, "distinct_fusions": 2, "whiles": 1}


@pytest.mark.parametrize("args, message", [
    ((["vit_b16"], 1, None), "--models=vit_b16; allowed: each of vit_s16, swin_t, "
                             "mobilevit_xxs, cct at most once"),
    (([], 1, None), "--models=; allowed"),
    ((["cct", "cct"], 1, None), "--models=cct,cct; allowed"),
    ((["cct"], 0, None), "--processes=0; allowed: 1 or more"),
    ((["cct"], 1, 0), "--batch_size=0; allowed: a positive batch"),
])
def test_bad_arguments_are_refused(args, message):
  with pytest.raises(ValueError) as e:
    compile_time.check(*args)
  assert message in str(e.value)


def record(scan, total, **overrides):
  r = {"model": "vit_s16", "scan": scan, "batch_size": 16, "devices": 1, "trace_s": 1.0,
       "lower_s": 0.5, "compile_s": total - 1.5, "total_s": total, "step_memory_bytes": 2e9,
       "fusions": 10, "distinct_fusions": 5, "whiles": 2 if scan else 0}
  r.update(overrides)
  return r


def test_table_gives_medians_and_the_ratio():
  table = compile_time.format_table([record(False, 6.0), record(True, 3.0),
                                     record(False, 5.0), record(True, 2.0),
                                     record(False, 9.0), record(True, 2.5)])
  rows = table.splitlines()
  assert rows[2] == ("| ViT-S/16 at 224 | 16 | False | 1.00 | 0.50 | 4.50 | 6.00 |  | 2.00 | "
                     "10 | 5 | 0 |")
  assert rows[3] == ("| ViT-S/16 at 224 | 16 | True | 1.00 | 0.50 | 1.00 | 2.50 | 2.40x | "
                     "2.00 | 10 | 5 | 2 |")


def test_one_measurement():
  r = compile_time.measure("cct", True, 8)
  assert (r["model"], r["scan"], r["batch_size"]) == ("cct", True, 8)
  assert r["total_s"] >= r["trace_s"] + r["lower_s"] + r["compile_s"] - 1e-6
  assert r["whiles"] >= 1 and r["fusions"] >= r["distinct_fusions"] > 0
  assert r["step_memory_bytes"] > 0
