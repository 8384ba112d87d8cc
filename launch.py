"""Trains and evaluates one experiment: parses flags, then calls `train_and_evaluate`.

    uv run launch.py --config configs/vit.py:tiny_cifar10 --workdir runs/vit_tiny \
        [--config.batch_size=256 ...]

A second call with the same --workdir resumes from its latest checkpoint. On several
hosts (TPU pod slice, GPU hosts under SLURM or Open MPI) every host runs the same command
with --distributed; elsewhere give the coordinator explicitly on each process:

    uv run launch.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

(README, "Several devices and hosts").

Exit statuses (for schedulers; each error but an internal one is one line on stderr):
  0    finished
  1    an unexpected internal error (with its traceback)
  2    refused before anything started: a bad flag, config value or input file
  3    stopped at a step whose loss, gradient or update was not finite (nothing of it saved)
  74   a checkpoint could not be written (disk full); the earlier ones are intact
  75   the workdir is in use by another live run (its lock names it); try again later
  143  stopped by SIGTERM after saving its last step; the same command resumes it
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from efficient_vit import host_memory  # Its opt-in --retain_host_memory flag.
from efficient_vit import validation  # No JAX: runs before anything heavy is imported.

EXIT_REFUSED = 2
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 74
EXIT_WORKDIR_BUSY = 75
EXIT_PREEMPTED = 143

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, optionally with a preset: configs/vit.py:tiny_cifar10 "
    "(`uv run python -m configs` lists every preset).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved "
                               "config go; an existing one is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one of several processes: jax.distributed.initialize(), "
    "auto-detected on TPU pods, SLURM and Open MPI (implied by the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, reachable from every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to "
                                   "num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """`jax.distributed.initialize` with what was given (None: auto-detected). Processes on
  CPU devices exchange their collectives through gloo."""
  import jax

  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if any(v is not None for v in given.values()) and None in given.values():
    missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
    raise app.UsageError(f"{missing} missing; allowed: all three of --coordinator_address, "
                         "--num_processes and --process_id, or none (auto-detection)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id={process_id}; allowed: 0 to {num_processes - 1} "
                         f"(--num_processes={num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def _stop(line: str, status: int):
  """One line on stderr and the exit status: what a scheduler and a user read."""
  print(line, file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (or config override) refused in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raised: the flag, then the last line of its traceback.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0].split(" Error whilst parsing config file")[0] + (
        f" {lines[-1]}" if len(lines) > 1 else "")
    _stop(f"error: {text} (--helpshort lists the flags)", EXIT_REFUSED)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of no config field.
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    name, *hint = str(e).splitlines()
    _stop(f"config error: {name} is not a field of the config (a --config.FIELD override)"
          + "".join(f"; {line.strip()}" for line in hint), EXIT_REFUSED)


def main(argv):
  if len(argv) > 1:
    _stop(f"error: unexpected arguments {argv[1:]}", EXIT_REFUSED)
  config = _CONFIG.value
  try:  # Every field's own rules, within a second: nothing is imported, read or written yet.
    validation.validate(config)
  except validation.ConfigError as e:
    _stop(validation.one_line(e), EXIT_REFUSED)
  except OSError as e:  # The config file could not be loaded (ml_collections says so here).
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _stop(f"error: --config: {lines[-1]}", EXIT_REFUSED)
  host_memory.retain_if_flagged()  # If asked: before JAX and TensorFlow start threads.
  if not flags.FLAGS["verbosity"].present:  # Library INFO logs (Orbax's) drown the progress bar.
    logging.set_verbosity(logging.WARNING)
  import jax  # After flag parsing, so that --help stays fast.

  if _DISTRIBUTED.value or any(flag.value is not None for flag in (
      _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from efficient_vit import run_lock, train

  logging.info("JAX: %d processes, %d devices (%s).", jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  if jax.process_index() == 0:
    print(f"config:\n{config}", flush=True)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.INPUT_ERRORS as e:
    if not train.before_first_step(e):
      raise  # During training: not the input's fault, keep the traceback.
    _stop(validation.one_line(e), EXIT_REFUSED)
  except run_lock.WorkdirBusy as e:
    _stop(f"error: {e}", EXIT_WORKDIR_BUSY)
  except train.NonFiniteError as e:
    _stop(f"error: {e}", EXIT_NONFINITE)
  except train.CheckpointSaveError as e:
    _stop(f"error: {e.strerror}", EXIT_SAVE_FAILED)
  except train.Preempted as e:
    _stop(str(e), EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
