"""Trains and evaluates one experiment: parses flags, then calls `train_and_evaluate`.

    uv run launch.py --config configs/vit.py:tiny_cifar10 --workdir runs/vit_tiny \
        [--config.batch_size=256 ...]

A second call with the same --workdir resumes from its latest checkpoint. On a multi-host
system (TPU pod, several GPU hosts) add --distributed on every host.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, optionally with a preset: configs/vit.py:tiny_cifar10.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved "
                               "config go; an existing one is resumed.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Library INFO logs (Orbax's) drown the progress bar.
    logging.set_verbosity(logging.WARNING)
  import jax  # After flag parsing, so that --help stays fast.

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from efficient_vit.train import train_and_evaluate

  config = _CONFIG.value
  logging.info("JAX: %d processes, %d devices (%s).", jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  print(f"config:\n{config}", flush=True)
  train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
