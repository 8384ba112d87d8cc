"""Optimisers and learning-rate schedules built from `config.optimizer`."""

from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("adamw", "lamb", "sgd")
SCHEDULES = ("cosine", "step", "constant")


def learning_rate_schedule(opt, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak rate, then cosine decay to 0, steps down by
  `decay_factor` at each of `decay_epochs`, or the constant peak rate."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  warmup = int(opt.warmup_steps + round(opt.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps and total_steps > 0 and warmup > 0:
    # Refused rather than clipped: a clipped warmup would silently be another recipe.
    raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} + optimizer.warmup_epochs="
                     f"{opt.warmup_epochs} ({warmup} steps); allowed: fewer steps than the "
                     f"run's {total_steps} (num_train_steps, or num_epochs x {steps_per_epoch} "
                     "steps per epoch)")
  peak = opt.learning_rate
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  elif opt.schedule == "step":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: opt.decay_factor
                  for e in opt.decay_epochs}
    after = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# Parameters that are tables rather than weights: decaying them towards zero has no
# regularising meaning (position embeddings, class tokens, Swin's relative bias table).
_NO_DECAY_NAMES = ("embedding", "token", "relative_position_bias_table")


def _decay_mask(params):
  """Weight decay on weight matrices and kernels only: not on biases, norms, scalars or the
  tables named in `_NO_DECAY_NAMES`."""
  def decays(path, p):
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return p.ndim > 1 and not names & set(_NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt, steps_per_epoch: int,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `config.optimizer` and its learning-rate schedule."""
  schedule = learning_rate_schedule(opt, steps_per_epoch, total_steps)
  if opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                     mask=_decay_mask)
  elif opt.name == "lamb":
    # optax.lamb, except that the layer-wise trust ratio spares what weight decay spares
    # (TF Addons' exclude_from_layer_adaptation): a bias or a zero-initialised head would
    # otherwise grow only by a factor (1 + lr) per step.
    tx = optax.chain(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=1e-6),
                     optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
                     optax.masked(optax.scale_by_trust_ratio(), _decay_mask),
                     optax.scale_by_learning_rate(schedule))
  elif opt.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
                     optax.sgd(schedule, momentum=opt.momentum, nesterov=True))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; allowed: {', '.join(OPTIMIZERS)}")
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule
