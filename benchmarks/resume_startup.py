"""Time to the first batch of a resumed run, at several epochs of progress.

A resumed run rebuilds its tf.data stream at its step (`input_pipeline.train_batches`):
this times that rebuild plus the first batch, so that the cost of resuming late in a run
can be compared with resuming early. From the repository root:

    TFDS_DATA_DIR=$(realpath ../shared/tensorflow_datasets) \
        uv run python -m benchmarks.resume_startup --config=configs/cct.py --epochs=1,20

Each position is timed `--repeats` times, alternating, and the median is printed.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
from ml_collections import config_flags

from efficient_vit import input_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cct.py", "Experiment config.")
_EPOCHS = flags.DEFINE_list("epochs", ["1", "20"], "Epochs of progress to resume at.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per position (median printed).")


def time_to_first_batch(config, start_step: int) -> float:
  start = time.perf_counter()
  next(iter(input_pipeline.train_batches(config, start_step)))
  return time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  if _REPEATS.value < 1:
    raise app.UsageError(f"--repeats={_REPEATS.value}; allowed: a positive integer")
  try:
    epochs = [float(e) for e in _EPOCHS.value]
  except ValueError as e:
    raise app.UsageError(f"--epochs={','.join(_EPOCHS.value)}; allowed: numbers") from e
  info = input_pipeline.dataset_info(config)
  steps_per_epoch = info.num_train_examples // config.batch_size
  times = {e: [] for e in epochs}
  for _ in range(_REPEATS.value):
    for e in epochs:  # Alternating, so that a slower moment of the machine hits all.
      times[e].append(time_to_first_batch(config, int(e * steps_per_epoch)))
  print("| resumed at epoch | step | seconds to the first batch (median) |")
  print("| --- | --- | --- |")
  for e in epochs:
    print(f"| {e:g} | {int(e * steps_per_epoch)} | {statistics.median(times[e]):.2f} |")


if __name__ == "__main__":
  app.run(main)
