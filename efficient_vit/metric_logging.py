"""Where metrics go: `metrics.jsonl` in the workdir (one JSON object per line) and
TensorBoard event files beside it. Only process 0 writes; the file is appended to, so a
resumed run keeps what earlier runs wrote."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
from flax.metrics import tensorboard


class MetricLogger:
  """Writes `{"step": s, "split": "train" | "eval", name: value, ...}` records."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tensorboard = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.scalar(f"{split}/{name}", float(value), int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def drop_after(workdir: str, step: int) -> int:
  """Removes the records of steps after `step` from `metrics.jsonl` (a run resumed from
  the checkpoint of `step` writes them again); returns how many were removed. The file is
  replaced atomically. TensorBoard keeps its copies: it shows the latest value per step."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  records = read_metrics(workdir)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) < len(records):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
  return len(records) - len(kept)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`, in the order they were written."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
