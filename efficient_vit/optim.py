"""Optimisers and learning-rate schedules built from `config.optimizer`."""

from __future__ import annotations

import jax
import optax

from efficient_vit import scan_layout

OPTIMIZERS = ("adamw", "lamb", "sgd")
SCHEDULES = ("cosine", "step", "constant")


def learning_rate_schedule(opt, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_start_learning_rate` to the peak rate; then cosine decay to
  `min_learning_rate`, steps down by `decay_factor` at each of `decay_epochs`, or the
  constant peak rate; then `cooldown_epochs` at `min_learning_rate` (timm's `warmup_lr`,
  `min_lr` and `cooldown_epochs`: the cooldown is part of the run's length)."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  warmup = int(opt.warmup_steps + round(opt.warmup_epochs * steps_per_epoch))
  cooldown = int(round(opt.cooldown_epochs * steps_per_epoch))
  if total_steps > 0 and (warmup or cooldown) and warmup + cooldown >= total_steps:
    # Refused rather than clipped: a clipped warmup would silently be another recipe.
    raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} + optimizer.warmup_epochs="
                     f"{opt.warmup_epochs} ({warmup} steps) and optimizer.cooldown_epochs="
                     f"{opt.cooldown_epochs} ({cooldown} steps); allowed: fewer steps than "
                     f"the run's {total_steps} (num_train_steps, or num_epochs x "
                     f"{steps_per_epoch} steps per epoch)")
  peak, floor = opt.learning_rate, opt.min_learning_rate
  if not 0.0 <= floor <= peak:
    raise ValueError(f"optimizer.min_learning_rate={floor}; allowed: from 0 to "
                     f"optimizer.learning_rate={peak}")
  main = max(total_steps - warmup - cooldown, 1)
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, main, alpha=floor / peak if peak else 0.0)
  elif opt.schedule == "step":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: opt.decay_factor
                  for e in opt.decay_epochs}
    after = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    after = optax.constant_schedule(peak)
  parts, boundaries = [after], []
  if warmup:
    parts.insert(0, optax.linear_schedule(opt.warmup_start_learning_rate, peak, warmup))
    boundaries.append(warmup)
  if cooldown:
    parts.append(optax.constant_schedule(floor))
    boundaries.append(warmup + main)
  return optax.join_schedules(parts, boundaries) if boundaries else after


# Parameters that are tables rather than weights: decaying them towards zero has no
# regularising meaning (position embeddings, class tokens, Swin's relative bias table).
_NO_DECAY_NAMES = ("embedding", "token", "relative_position_bias_table")


def _decay_mask(params):
  """Weight decay on weight matrices and kernels only: not on biases (q/k/v biases are
  [heads, head_dim] but biases all the same), norms, scalars or the tables named in
  `_NO_DECAY_NAMES`. A scanned stack's leading [depth] axis (`model.scan`) is not counted."""
  def decays(path, p):
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    ndim = p.ndim - scan_layout.stacked_axes(names)
    return ndim > 1 and "bias" not in names and not names & set(_NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def _scale_by_trust_ratio_per_block() -> optax.GradientTransformation:
  """optax.scale_by_trust_ratio, with one ratio per block of a scanned stack (`model.scan`),
  as the unscanned model has one per block's leaf."""
  inner = optax.scale_by_trust_ratio()

  def update(updates, state, params=None):
    def leaf(path, u, p):
      one = lambda uu, pp: inner.update(uu, state, pp)[0]  # noqa: E731
      names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
      return jax.vmap(one)(u, p) if scan_layout.stacked_axes(names) else one(u, p)
    return jax.tree_util.tree_map_with_path(leaf, updates, params), state

  return optax.GradientTransformation(inner.init, update)


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
                     optax.masked(_scale_by_trust_ratio_per_block(), _decay_mask),
                     optax.scale_by_learning_rate(schedule))
  elif opt.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
                     optax.sgd(schedule, momentum=opt.momentum, nesterov=True))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; allowed: {', '.join(OPTIMIZERS)}")
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule
