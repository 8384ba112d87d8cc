"""The peer side of `benchmarks/peers.py`: one peer model's train step, run on command.

This file runs in the peer's own environment (torch + timm, or Keras 3), never in the
project's: it imports nothing of `efficient_vit`. `benchmarks/peers.py` starts it with
the peer's Python and drives it over stdin / stdout, one JSON object per line:

  {"op": "setup", "spec": {...}}  builds the model, its optimizer and one fixed batch, and
                                  runs `spec["warmup_steps"]` untimed steps (graph
                                  building, allocator warm-up) -> {"ok": true,
                                  "setup_s": ..., "params": ..., "info": {...}}
  {"op": "run", "steps": N}       N train steps on the fixed batch, the last one waited
                                  for -> {"ok": true, "seconds": ...}
  {"op": "quit"}                  exits.

A failure answers {"ok": false, "error": "..."}. Everything the libraries print goes to
stderr, so that stdout carries the protocol only.

Peers (`spec["framework"]`):
  timm       `timm.create_model(spec["model"], **spec["create_kwargs"])` in train mode,
             eager PyTorch as timm's train.py runs it: forward, cross-entropy (with the
             project config's label smoothing), backward, gradient clipping where the config
             clips, `torch.optim.AdamW` (foreach), an EMA of the parameters where the config
             keeps one, `zero_grad(set_to_none=True)`.
  keras_cct  keras-team/keras-io examples/vision/cct.py rebuilt in Keras 3 (its
             tokenizer, StochasticDepth, MultiHeadAttention blocks, sequence pooling; the
             random crop / flip layers left out, as the project's fixed-batch step has no
             augmentation either), compiled as the example compiles it (AdamW, categorical
             cross-entropy from logits with label smoothing; no metrics: train step only)
             and stepped with `train_on_batch`.
"""

from __future__ import annotations

import os
import time

import worker_protocol  # benchmarks/, this script's folder


def _timm_step(spec: dict):
  import numpy as np
  import timm
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(int(spec["threads"]))
  torch.manual_seed(int(spec.get("seed", 0)))
  model = timm.create_model(spec["model"], pretrained=False, **spec["create_kwargs"])
  model.train()
  opt = spec["optimizer"]
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]),
                                eps=opt.get("eps", 1e-8), weight_decay=opt["weight_decay"],
                                foreach=True)
  ema_decay = float(spec.get("ema_decay", 0.0))
  ema = [p.detach().clone() for p in params] if ema_decay else None
  rng = np.random.default_rng(0)
  size, batch = int(spec["image_size"]), int(spec["batch_size"])
  images = torch.from_numpy(rng.standard_normal((batch, 3, size, size), dtype=np.float32))
  labels = torch.from_numpy(rng.integers(0, spec["num_classes"], (batch,)).astype(np.int64))
  smoothing, clip = float(spec.get("label_smoothing", 0.0)), float(spec.get("grad_clip_norm", 0))

  def step():
    loss = F.cross_entropy(model(images), labels, label_smoothing=smoothing)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
    return loss

  def run(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      loss = step()
    float(loss)  # Eager CPU ops are synchronous; this only reads the last loss.
    return time.perf_counter() - start

  info = {"torch": torch.__version__, "timm": timm.__version__,
          "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
  return run, sum(p.numel() for p in params), info


def _keras_cct_step(spec: dict):
  import numpy as np

  os.environ["KERAS_BACKEND"] = spec.get("backend", "tensorflow")
  threads = int(spec["threads"])
  if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
  import keras
  from keras import layers, ops

  keras.utils.set_random_seed(int(spec.get("seed", 0)))
  s = spec["model"]

  class StochasticDepth(layers.Layer):
    """The example's per-sample residual-branch drop (timm's DropPath)."""

    def __init__(self, drop_prob, **kwargs):
      super().__init__(**kwargs)
      self.drop_prob = drop_prob
      self.seed_generator = keras.random.SeedGenerator(0)

    def call(self, x, training=None):
      if training and self.drop_prob > 0:
        keep = 1.0 - self.drop_prob
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, 0, 1, seed=self.seed_generator))
        return x / keep * mask
      return x

  size = int(s["image_size"])
  inputs = layers.Input((size, size, 3))
  x = layers.Rescaling(1.0 / 255)(inputs)  # The example's crop / flip are left out.
  for channels in s["conv_channels"]:
    x = layers.Conv2D(channels, 3, 1, padding="valid", use_bias=False, activation="relu",
                      kernel_initializer="he_normal")(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPool2D(3, 2, "same")(x)
  tokens, width = x.shape[1] * x.shape[2], x.shape[3]
  encoded = layers.Reshape((tokens, width))(x)
  # The example adds an Embedding of a constant range (a table of `tokens` x `width`).
  encoded = encoded + layers.Embedding(tokens, width)(ops.arange(0, tokens, 1))
  depth = int(s["depth"])
  rates = [float(r) for r in np.linspace(0, s["stochastic_depth_rate"], depth)]
  for i in range(depth):
    x1 = layers.LayerNormalization(epsilon=1e-5)(encoded)
    attention = layers.MultiHeadAttention(num_heads=s["num_heads"], key_dim=s["key_dim"],
                                          dropout=s["dropout_rate"])(x1, x1)
    x2 = layers.Add()([StochasticDepth(rates[i])(attention), encoded])
    x3 = layers.LayerNormalization(epsilon=1e-5)(x2)
    for units in s["mlp_units"]:
      x3 = layers.Dense(units, activation=keras.activations.gelu)(x3)
      x3 = layers.Dropout(s["dropout_rate"])(x3)
    encoded = layers.Add()([StochasticDepth(rates[i])(x3), x2])
  representation = layers.LayerNormalization(epsilon=1e-5)(encoded)
  weights = ops.softmax(layers.Dense(1)(representation), axis=1)
  pooled = ops.squeeze(ops.matmul(ops.transpose(weights, (0, 2, 1)), representation), -2)
  logits = layers.Dense(s["num_classes"])(pooled)
  model = keras.Model(inputs, logits)
  opt = spec["optimizer"]
  model.compile(optimizer=keras.optimizers.AdamW(learning_rate=opt["learning_rate"],
                                                 weight_decay=opt["weight_decay"]),
                loss=keras.losses.CategoricalCrossentropy(
                    from_logits=True, label_smoothing=spec.get("label_smoothing", 0.0)))
  rng = np.random.default_rng(0)
  batch = int(spec["batch_size"])
  images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
  labels = np.eye(s["num_classes"], dtype="float32")[rng.integers(0, s["num_classes"], batch)]

  def run(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      loss = model.train_on_batch(images, labels)
    float(np.asarray(loss))
    return time.perf_counter() - start

  run(1)  # Builds the optimizer's variables, so that jit_compile below is resolved.
  info = {"keras": keras.__version__, "backend": keras.backend.backend(),
          "jit_compile": bool(model.jit_compile), "threads": threads}
  if info["backend"] == "tensorflow":
    import tensorflow as tf

    info["tensorflow"] = tf.__version__
  return run, int(model.count_params()), info


BUILDERS = {"timm": _timm_step, "keras_cct": _keras_cct_step}


def _setup(spec: dict):
  if spec["framework"] not in BUILDERS:
    raise ValueError(f"framework={spec['framework']!r}; allowed: {', '.join(BUILDERS)}")
  run, params, info = BUILDERS[spec["framework"]](spec)
  run(int(spec.get("warmup_steps", 1)))
  return run, {"params": params, "info": info}


def main() -> None:
  worker_protocol.serve(_setup)


if __name__ == "__main__":
  main()
