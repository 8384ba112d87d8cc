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
  the checkpoint of `step` writes them again), and a last line that a killed run left
  half-written; returns how many records were removed. The file is replaced atomically.
  TensorBoard keeps its copies: it shows the latest value per step."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  records, partial = _read(path)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) < len(records) or partial:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
  return len(records) - len(kept)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`, in the order they were written (without a last line
  that a run killed while writing it left incomplete)."""
  return _read(os.path.join(workdir, "metrics.jsonl"))[0]


def _read(path: str) -> tuple[list[dict], bool]:
  """(complete records, whether an incomplete last line follows them)."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  # Every record ends with a newline: what follows the last one is empty or was cut off.
  records = [json.loads(line) for line in lines[:-1] if line.strip()]
  return records, bool(lines[-1].strip())
