"""benchmarks/ab.py's logic without timing anything: the revision check, the temporary
worktree, the checkout worker's protocol and errors, the ratios and the table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks import ab, peers


def test_before_must_name_a_commit():
  with pytest.raises(ValueError, match="--before is required"):
    ab.resolve(None)
  with pytest.raises(ValueError, match="--before=no-such-revision: not a commit of this "
                                       "repository"):
    ab.resolve("no-such-revision")
  head = ab.resolve("HEAD")
  assert len(head) == 40 and int(head, 16) >= 0


def test_worktree_holds_the_commit_and_is_removed_afterwards():
  head = ab.resolve("HEAD")
  with ab.worktree(head) as path:
    assert os.path.isfile(os.path.join(path, "efficient_vit", "layers.py"))
    checked_out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True,
                                 capture_output=True, text=True).stdout.strip()
    assert checked_out == head
  assert not os.path.exists(path)
  listed = subprocess.run(["git", "worktree", "list"], cwd=ab.REPO, check=True,
                          capture_output=True, text=True).stdout
  assert path not in listed


def test_checkout_worker_reports_errors_and_quits():
  worker = peers.PeerProcess(sys.executable, worker=ab.CHECKOUT_WORKER, args=(ab.REPO,))
  try:
    with pytest.raises(RuntimeError, match="run before setup"):
      worker.call(op="run", steps=1)
    with pytest.raises(RuntimeError, match="model='vit_b16' is not a row of this "
                                           "checkout's benchmarks/peers.py; allowed: "
                                           "vit_s16, swin_t, mobilevit_xxs, cct"):
      worker.call(op="setup", spec={"model": "vit_b16"})
    with pytest.raises(RuntimeError, match="op='jump'; allowed: setup, run, quit"):
      worker.call(op="jump")
  finally:
    worker.close()
  assert worker.proc.returncode == 0


def test_ratios_are_per_round_and_the_table_names_both_sides():
  img_s = {"before": [10.0, 20.0, 10.0], "after": [12.0, 20.0, 15.0]}
  assert ab.ratios(img_s) == [1.2, 1.0, 1.5]
  row = {"model": "cct", "batch": 128, "before": 10.0, "after": 15.0, "ratio": 1.2,
         "low": 1.0, "high": 1.5}
  table = ab.format_table([row], "0123456789abcdef")
  assert table.splitlines()[0] == ("| model | batch | 0123456789 img/s | working tree img/s | "
                                   "after / before (range) |")
  assert table.splitlines()[2] == "| cct | 128 | 10 | 15 | 1.200 (1.000-1.500) |"
