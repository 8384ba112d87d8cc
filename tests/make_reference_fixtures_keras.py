"""Builds the Keras-example reference fixtures `tests/fixtures/keras_*.npz` (not run by the tests).

Each of the six Keras examples in keras-team/keras-io `examples/vision/` is rebuilt here in
Keras 3 (TensorFlow backend), layer for layer as the example writes it, at reduced sizes
(depth, width, image size, classes); every choice that decides the form of the computation
(activations, epsilons, biases, residual forms, paddings, poolings) is the example's. Then
every weight is perturbed (zero- and one-initialised ones included: biases, norms, the Swin
relative-bias table, batch-norm statistics), and the weights, a fixed input batch and the
eval-mode outputs are saved. The tests (`tests/test_fidelity_keras.py`) then need neither
TensorFlow's Keras nor this script.

Run from the repository root, in a throw-away environment outside the repository:

    uv venv /tmp/kerasenv -p 3.11
    VIRTUAL_ENV=/tmp/kerasenv uv pip install keras==3.15.1 tensorflow-cpu==2.21.0 numpy
    KERAS_BACKEND=tensorflow /tmp/kerasenv/bin/python tests/make_reference_fixtures_keras.py

Perturbation: kernels are drawn afresh with variance 1 / fan_in (2 / fan_in for depthwise
ones); every other variable (biases, LayerNorm gamma/beta, position tables, the Swin
relative-bias table, the Perceiver's latents and learned attention scale, Normalization
statistics) gets Gaussian noise, zeros and ones included; batch-norm statistics are set near
those of the input batch and then perturbed, so that the deep MobileViT keeps images apart;
the classifier's kernel gets a part along the directions in which the batch's features
differ, so that the logits, and their argmax, differ from image to image. Only buffers
derived from the layout (Swin's relative-position index and shift mask, Normalization's
sample count) keep their values: the converter checks them against the project's own.

The examples' resizing and random augmentation layers are left out (the identity at
inference, or the input pipeline's business: the input is already at the model's size).

Each file holds, in this order:
  weights/<keras path>  every variable of `model.weights`, in that order (the converter in
      `efficient_vit/import_keras.py` reads them in this order: the Keras layer names are
      numbered per session, the order is what a saved example model fixes);
  extra/<name>          tensors the example's model uses but does not own (see CCT and the
      Perceiver below);
  images                the model's input batch [batch, H, W, 3] (after the example's
      augmentation layers, which are the identity at inference, but before any Rescaling or
      Normalization layer the model itself holds);
  logits                the eval-mode output before the last softmax, [batch, classes];
  probabilities         where the example's last Dense has a softmax, its output;
  meta                  a JSON string: the reduced sizes and the example file.

Notes from rebuilding the examples (keras-io at the time of writing):
  - `Attention([query, key, value])` in the Perceiver: Keras' `Attention` takes
    [query, value, key], so the example's `key` Dense is used as the values and its `value`
    Dense as the keys. The converter maps them accordingly.
  - CCT: the example calls its position `Embedding` on a constant range while building the
    functional model, so the table is a constant of the graph, not a weight of the model
    (`model.weights` lacks it and `save_weights` does not save it). It is saved here as
    `extra/position_embedding`.
  - Perceiver: the Normalization layer sits in the module-level `data_augmentation`, which
    the subclassed model calls but does not track; its statistics are saved as
    `extra/normalization_mean` and `extra/normalization_variance`.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
BATCH = 4


# ---------------------------------------------------------------------------------------------
# Shared pieces of the examples.


class Patches(layers.Layer):
  """Non-overlapping p x p patches flattened to [batch, patches, p * p * C] (every example)."""

  def __init__(self, patch_size, **kwargs):
    super().__init__(**kwargs)
    self.patch_size = patch_size

  def call(self, images):
    patches = ops.image.extract_patches(images, size=self.patch_size)
    shape = ops.shape(patches)
    return ops.reshape(patches, (shape[0], shape[1] * shape[2], shape[3]))


class PatchEncoder(layers.Layer):
  """Dense projection of each patch plus a learned `Embedding` of its index (every example
  but MobileViT and CCT)."""

  def __init__(self, num_patches, projection_dim, **kwargs):
    super().__init__(**kwargs)
    self.num_patches = num_patches
    self.projection = layers.Dense(units=projection_dim)
    self.position_embedding = layers.Embedding(input_dim=num_patches, output_dim=projection_dim)

  def call(self, patch):
    positions = ops.expand_dims(ops.arange(0, self.num_patches, 1), axis=0)
    return self.projection(patch) + self.position_embedding(positions)


def test_images(rng, size: int, high: float) -> np.ndarray:
  """A batch of images that differ in their coarse layout (a 4 x 4 grid of colours) plus
  pixel noise, in [0, high]: different enough for the logits to differ per image."""
  coarse = rng.uniform(0, 1, (BATCH, 4, 4, 3))
  coarse = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
  return high * (0.7 * coarse + 0.3 * rng.uniform(0, 1, (BATCH, size, size, 3)))


def adapted_normalization(rng):
  """A `Normalization` layer adapted on data, as the examples adapt it on the training set."""
  norm = layers.Normalization()
  norm.adapt(rng.uniform(0, 255, (16, 8, 8, 3)).astype("float32"))
  return norm


# ---------------------------------------------------------------------------------------------
# image_classification_with_vision_transformer.py (Keras 3 version)

VIT = dict(image_size=24, patch_size=6, projection_dim=32, key_dim=32, num_heads=4,
           transformer_layers=2, transformer_units=[64, 32], mlp_head_units=[48, 24],
           num_classes=10, example="image_classification_with_vision_transformer.py")


def build_vit(rng):
  s = VIT

  def mlp(x, hidden_units, dropout_rate):
    for units in hidden_units:
      x = layers.Dense(units, activation=keras.activations.gelu)(x)
      x = layers.Dropout(dropout_rate)(x)
    return x

  inputs = keras.Input((s["image_size"], s["image_size"], 3))
  x = adapted_normalization(rng)(inputs)  # data_augmentation's Normalization; Resizing to
  # image_size and the random layers are left out (the input is already at image_size).
  patches = Patches(s["patch_size"])(x)
  encoded = PatchEncoder((s["image_size"] // s["patch_size"]) ** 2, s["projection_dim"])(patches)
  for _ in range(s["transformer_layers"]):
    x1 = layers.LayerNormalization(epsilon=1e-6)(encoded)
    attention = layers.MultiHeadAttention(num_heads=s["num_heads"], key_dim=s["key_dim"],
                                          dropout=0.1)(x1, x1)
    x2 = layers.Add()([attention, encoded])
    x3 = layers.LayerNormalization(epsilon=1e-6)(x2)
    x3 = mlp(x3, s["transformer_units"], 0.1)
    encoded = layers.Add()([x3, x2])
  representation = layers.LayerNormalization(epsilon=1e-6)(encoded)
  representation = layers.Flatten()(representation)
  representation = layers.Dropout(0.5)(representation)
  features = mlp(representation, s["mlp_head_units"], 0.5)
  logits = layers.Dense(s["num_classes"])(features)
  model = keras.Model(inputs, logits)
  images = test_images(rng, s["image_size"], 255.0)
  return model, images, {}


# ---------------------------------------------------------------------------------------------
# eanet.py

EANET = dict(image_size=16, patch_size=2, embedding_dim=32, mlp_dim=32, dim_coefficient=4,
             num_heads=4, num_transformer_blocks=2, num_classes=10, example="eanet.py")


def build_eanet(rng, attention_type):
  s = EANET
  dim = s["embedding_dim"]

  def external_attention(x, dim, num_heads, dim_coefficient, attention_dropout,
                         projection_dropout):
    _, num_patch, _ = x.shape
    num_heads = num_heads * dim_coefficient
    x = layers.Dense(dim * dim_coefficient)(x)
    x = ops.reshape(x, (-1, num_patch, num_heads, dim * dim_coefficient // num_heads))
    x = ops.transpose(x, (0, 2, 1, 3))
    attn = layers.Dense(dim // dim_coefficient)(x)                 # M_k
    attn = layers.Softmax(axis=2)(attn)
    attn = attn / (1e-9 + ops.sum(attn, axis=-1, keepdims=True))  # double normalisation
    attn = layers.Dropout(attention_dropout)(attn)
    x = layers.Dense(dim * dim_coefficient // num_heads)(attn)    # M_v
    x = ops.transpose(x, (0, 2, 1, 3))
    x = ops.reshape(x, (-1, num_patch, dim * dim_coefficient))
    x = layers.Dense(dim)(x)
    return layers.Dropout(projection_dropout)(x)

  def mlp(x, embedding_dim, mlp_dim, drop_rate=0.2):
    x = layers.Dense(mlp_dim, activation=keras.activations.gelu)(x)  # tf.nn.gelu: exact
    x = layers.Dropout(drop_rate)(x)
    x = layers.Dense(embedding_dim)(x)
    return layers.Dropout(drop_rate)(x)

  inputs = layers.Input((s["image_size"], s["image_size"], 3))
  x = adapted_normalization(rng)(inputs)
  x = Patches(s["patch_size"])(x)
  x = PatchEncoder((s["image_size"] // s["patch_size"]) ** 2, dim)(x)
  for _ in range(s["num_transformer_blocks"]):
    residual_1 = x
    x = layers.LayerNormalization(epsilon=1e-5)(x)
    if attention_type == "external_attention":
      x = external_attention(x, dim, s["num_heads"], s["dim_coefficient"], 0.2, 0.2)
    else:
      x = layers.MultiHeadAttention(num_heads=s["num_heads"], key_dim=dim, dropout=0.2)(x, x)
    x = layers.add([x, residual_1])
    residual_2 = x
    x = layers.LayerNormalization(epsilon=1e-5)(x)
    x = mlp(x, dim, s["mlp_dim"])
    x = layers.add([x, residual_2])
  x = layers.GlobalAvgPool1D()(x)
  outputs = layers.Dense(s["num_classes"], activation="softmax")(x)
  model = keras.Model(inputs, outputs)
  images = test_images(rng, s["image_size"], 255.0)
  return model, images, {}


# ---------------------------------------------------------------------------------------------
# cct.py

CCT = dict(image_size=16, conv_layers=2, num_output_channels=[16, 32], projection_dim=32,
           num_heads=2, transformer_units=[32, 32], transformer_layers=2, num_classes=10,
           example="cct.py")


class CCTTokenizer(layers.Layer):
  """The example's tokenizer: per layer a valid conv with ReLU, zero padding, "same" max-pool."""

  def __init__(self, kernel_size=3, stride=1, padding=1, pooling_kernel_size=3,
               pooling_stride=2, num_conv_layers=2, num_output_channels=(64, 128), **kwargs):
    super().__init__(**kwargs)
    self.conv_model = keras.Sequential()
    for i in range(num_conv_layers):
      self.conv_model.add(layers.Conv2D(num_output_channels[i], kernel_size, stride,
                                        padding="valid", use_bias=False, activation="relu",
                                        kernel_initializer="he_normal"))
      self.conv_model.add(layers.ZeroPadding2D(padding))
      self.conv_model.add(layers.MaxPool2D(pooling_kernel_size, pooling_stride, "same"))

  def call(self, images):
    outputs = self.conv_model(images)
    shape = ops.shape(outputs)
    return ops.reshape(outputs, (-1, shape[1] * shape[2], shape[-1]))


def build_cct(rng):
  s = CCT

  def mlp(x, hidden_units, dropout_rate):
    for units in hidden_units:
      x = layers.Dense(units, activation=keras.activations.gelu)(x)  # tf.nn.gelu: exact
      x = layers.Dropout(dropout_rate)(x)
    return x

  inputs = layers.Input((s["image_size"], s["image_size"], 3))
  augmented = layers.Rescaling(scale=1.0 / 255)(inputs)  # RandomCrop/RandomFlip left out.
  tokenizer = CCTTokenizer(num_conv_layers=s["conv_layers"],
                           num_output_channels=s["num_output_channels"])
  encoded_patches = tokenizer(augmented)
  # As in the example: the sequence length is measured on a dummy image, and the Embedding
  # is called on a constant range, so its output is a constant of the functional graph.
  dummy = tokenizer(ops.ones((1, s["image_size"], s["image_size"], 3)))
  sequence_length = int(dummy.shape[1])
  pos_embed = layers.Embedding(input_dim=sequence_length, output_dim=int(dummy.shape[-1]))
  pos_embed.build((sequence_length,))
  _perturb_layer(pos_embed, rng)  # perturbed before it is frozen into the graph
  position_embeddings = pos_embed(ops.arange(0, sequence_length, 1))
  encoded_patches = encoded_patches + position_embeddings
  # The example's StochasticDepth layers are the identity at inference: left out.
  for _ in range(s["transformer_layers"]):
    x1 = layers.LayerNormalization(epsilon=1e-5)(encoded_patches)
    attention_output = layers.MultiHeadAttention(num_heads=s["num_heads"],
                                                 key_dim=s["projection_dim"],
                                                 dropout=0.1)(x1, x1)
    x2 = layers.Add()([attention_output, encoded_patches])
    x3 = layers.LayerNormalization(epsilon=1e-5)(x2)
    x3 = mlp(x3, s["transformer_units"], 0.1)
    encoded_patches = layers.Add()([x3, x2])
  representation = layers.LayerNormalization(epsilon=1e-5)(encoded_patches)
  attention_weights = ops.softmax(layers.Dense(1)(representation), axis=1)
  weighted = ops.matmul(ops.transpose(attention_weights, (0, 2, 1)), representation)
  weighted = ops.squeeze(weighted, -2)
  logits = layers.Dense(s["num_classes"])(weighted)
  model = keras.Model(inputs, logits)
  images = test_images(rng, s["image_size"], 255.0)
  extra = {"position_embedding": keras.ops.convert_to_numpy(pos_embed.embeddings)}
  return model, images, extra


# ---------------------------------------------------------------------------------------------
# swin_transformers.py

SWIN = dict(image_size=16, patch_size=2, embed_dim=32, num_heads=4, num_mlp=64, window_size=2,
            shift_size=1, num_classes=10, example="swin_transformers.py")


def window_partition(x, window_size):
  _, height, width, channels = x.shape
  x = ops.reshape(x, (-1, height // window_size, window_size, width // window_size,
                      window_size, channels))
  x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
  return ops.reshape(x, (-1, window_size, window_size, channels))


def window_reverse(windows, window_size, height, width, channels):
  x = ops.reshape(windows, (-1, height // window_size, width // window_size, window_size,
                            window_size, channels))
  x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
  return ops.reshape(x, (-1, height, width, channels))


class WindowAttention(layers.Layer):

  def __init__(self, dim, window_size, num_heads, qkv_bias=True, dropout_rate=0.0, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.window_size = window_size
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = layers.Dense(dim * 3, use_bias=qkv_bias)
    self.dropout = layers.Dropout(dropout_rate)
    self.proj = layers.Dense(dim)

  def build(self, input_shape):
    num_window_elements = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
    self.relative_position_bias_table = self.add_weight(
        shape=(num_window_elements, self.num_heads), initializer="zeros", trainable=True,
        name="relative_position_bias_table")
    coords = np.stack(np.meshgrid(np.arange(self.window_size[0]), np.arange(self.window_size[1]),
                                  indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose([1, 2, 0])
    relative[:, :, 0] += self.window_size[0] - 1
    relative[:, :, 1] += self.window_size[1] - 1
    relative[:, :, 0] *= 2 * self.window_size[1] - 1
    index = relative.sum(-1)
    # A non-trainable variable in the example (it counts in its parameter total).
    self.relative_position_index = self.add_weight(
        shape=index.shape, dtype="int32", trainable=False, name="relative_position_index",
        initializer=keras.initializers.Constant(index))
    self.qkv.build(input_shape)
    self.proj.build(input_shape)

  def call(self, x, mask=None):
    _, size, channels = x.shape
    head_dim = channels // self.num_heads
    x_qkv = self.qkv(x)
    x_qkv = ops.reshape(x_qkv, (-1, size, 3, self.num_heads, head_dim))
    x_qkv = ops.transpose(x_qkv, (2, 0, 3, 1, 4))
    q, k, v = x_qkv[0], x_qkv[1], x_qkv[2]
    q = q * self.scale
    attn = q @ ops.transpose(k, (0, 1, 3, 2))
    n = self.window_size[0] * self.window_size[1]
    bias = ops.take(self.relative_position_bias_table,
                    ops.reshape(self.relative_position_index, (-1,)), axis=0)
    bias = ops.transpose(ops.reshape(bias, (n, n, -1)), (2, 0, 1))
    attn = attn + ops.expand_dims(bias, axis=0)
    if mask is not None:
      num_windows = mask.shape[0]
      mask_float = ops.cast(ops.expand_dims(ops.expand_dims(mask, axis=1), axis=0), "float32")
      attn = ops.reshape(attn, (-1, num_windows, self.num_heads, size, size)) + mask_float
      attn = ops.reshape(attn, (-1, self.num_heads, size, size))
    attn = keras.activations.softmax(attn, axis=-1)
    attn = self.dropout(attn)
    x_qkv = attn @ v
    x_qkv = ops.reshape(ops.transpose(x_qkv, (0, 2, 1, 3)), (-1, size, channels))
    return self.dropout(self.proj(x_qkv))


class SwinTransformer(layers.Layer):

  def __init__(self, dim, num_patch, num_heads, window_size=7, shift_size=0, num_mlp=1024,
               qkv_bias=True, dropout_rate=0.0, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.num_patch = num_patch
    self.num_heads = num_heads
    self.window_size = window_size
    self.shift_size = shift_size
    self.norm1 = layers.LayerNormalization(epsilon=1e-5)
    self.attn = WindowAttention(dim, window_size=(window_size, window_size),
                                num_heads=num_heads, qkv_bias=qkv_bias,
                                dropout_rate=dropout_rate)
    self.drop_path = layers.Dropout(dropout_rate)  # DropPath: identity at inference
    self.norm2 = layers.LayerNormalization(epsilon=1e-5)
    self.mlp = keras.Sequential([
        layers.Dense(num_mlp), layers.Activation(keras.activations.gelu),
        layers.Dropout(dropout_rate), layers.Dense(dim), layers.Dropout(dropout_rate)])
    if min(self.num_patch) < self.window_size:
      self.shift_size = 0
      self.window_size = min(self.num_patch)

  def build(self, input_shape):
    if self.shift_size == 0:
      self.attn_mask = None
    else:
      height, width = self.num_patch
      slices = (slice(0, -self.window_size), slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None))
      mask_array = np.zeros((1, height, width, 1))
      count = 0
      for h in slices:
        for w in slices:
          mask_array[:, h, w, :] = count
          count += 1
      windows = window_partition(ops.convert_to_tensor(mask_array), self.window_size)
      windows = keras.ops.convert_to_numpy(windows).reshape(-1, self.window_size ** 2)
      attn_mask = windows[:, None, :] - windows[:, :, None]
      attn_mask = np.where(attn_mask != 0, -100.0, 0.0).astype("float32")
      self.attn_mask = self.add_weight(shape=attn_mask.shape, trainable=False, name="attn_mask",
                                       initializer=keras.initializers.Constant(attn_mask))
    self.norm1.build(input_shape)
    self.norm2.build(input_shape)
    self.attn.build((None, self.window_size ** 2, self.dim))
    self.mlp.build(input_shape)

  def call(self, x):
    height, width = self.num_patch
    _, _, channels = x.shape
    x_skip = x
    x = ops.reshape(self.norm1(x), (-1, height, width, channels))
    if self.shift_size > 0:
      x = ops.roll(x, shift=[-self.shift_size, -self.shift_size], axis=[1, 2])
    x_windows = ops.reshape(window_partition(x, self.window_size),
                            (-1, self.window_size * self.window_size, channels))
    attn_windows = self.attn(x_windows, mask=self.attn_mask)
    attn_windows = ops.reshape(attn_windows, (-1, self.window_size, self.window_size, channels))
    x = window_reverse(attn_windows, self.window_size, height, width, channels)
    if self.shift_size > 0:
      x = ops.roll(x, shift=[self.shift_size, self.shift_size], axis=[1, 2])
    x = ops.reshape(x, (-1, height * width, channels))
    x = x_skip + self.drop_path(x)
    x_skip = x
    x = self.drop_path(self.mlp(self.norm2(x)))
    return x_skip + x


class PatchMerging(layers.Layer):

  def __init__(self, num_patch, embed_dim, **kwargs):
    super().__init__(**kwargs)
    self.num_patch = num_patch
    self.linear_trans = layers.Dense(2 * embed_dim, use_bias=False)

  def call(self, x):
    height, width = self.num_patch
    _, _, c = x.shape
    x = ops.reshape(x, (-1, height, width, c))
    x = ops.concatenate((x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :],
                         x[:, 1::2, 1::2, :]), axis=-1)
    x = ops.reshape(x, (-1, (height // 2) * (width // 2), 4 * c))
    return self.linear_trans(x)


def build_swin(rng):
  s = SWIN
  num_patch = s["image_size"] // s["patch_size"]
  inputs = layers.Input((s["image_size"], s["image_size"], 3))  # x / 255 outside the model
  x = Patches(s["patch_size"])(inputs)  # RandomCrop(32, 32) of a 32x32 image + flip left out.
  x = PatchEncoder(num_patch * num_patch, s["embed_dim"])(x)
  for shift in (0, s["shift_size"]):
    x = SwinTransformer(dim=s["embed_dim"], num_patch=(num_patch, num_patch),
                        num_heads=s["num_heads"], window_size=s["window_size"],
                        shift_size=shift, num_mlp=s["num_mlp"], qkv_bias=True,
                        dropout_rate=0.03)(x)
  x = PatchMerging((num_patch, num_patch), embed_dim=s["embed_dim"])(x)
  x = layers.GlobalAveragePooling1D()(x)
  outputs = layers.Dense(s["num_classes"], activation="softmax")(x)
  model = keras.Model(inputs, outputs)
  images = test_images(rng, s["image_size"], 1.0)
  return model, images, {}


# ---------------------------------------------------------------------------------------------
# mobilevit.py (its XXS layout, narrower)

MOBILEVIT = dict(image_size=64, patch_size=4, expansion_factor=2, stem=8, mv2_channels=[8, 12],
                 vit_stages=[(12, 2, 16), (16, 2, 20), (20, 1, 24)], last_channels=32,
                 num_classes=5, example="mobilevit.py")


def correct_pad(height, width, kernel_size):
  """keras.applications.imagenet_utils.correct_pad for a square kernel."""
  adjust = (1 - height % 2, 1 - width % 2)
  correct = (kernel_size // 2, kernel_size // 2)
  return ((correct[0] - adjust[0], correct[0]), (correct[1] - adjust[1], correct[1]))


def build_mobilevit(rng):
  s = MOBILEVIT
  patch_size = s["patch_size"]

  def conv_block(x, filters=16, kernel_size=3, strides=2):
    return layers.Conv2D(filters, kernel_size, strides=strides, activation=keras.activations.swish,
                         padding="same")(x)

  def inverted_residual_block(x, expanded_channels, output_channels, strides=1):
    m = layers.Conv2D(expanded_channels, 1, padding="same", use_bias=False)(x)
    m = layers.BatchNormalization()(m)
    m = keras.activations.swish(m)
    if strides == 2:
      m = layers.ZeroPadding2D(padding=correct_pad(m.shape[1], m.shape[2], 3))(m)
    m = layers.DepthwiseConv2D(3, strides=strides, padding="same" if strides == 1 else "valid",
                               use_bias=False)(m)
    m = layers.BatchNormalization()(m)
    m = keras.activations.swish(m)
    m = layers.Conv2D(output_channels, 1, padding="same", use_bias=False)(m)
    m = layers.BatchNormalization()(m)
    if x.shape[-1] == output_channels and strides == 1:
      return layers.Add()([m, x])
    return m

  def mlp(x, hidden_units, dropout_rate):
    for units in hidden_units:
      x = layers.Dense(units, activation=keras.activations.swish)(x)
      x = layers.Dropout(dropout_rate)(x)
    return x

  def transformer_block(x, transformer_layers, projection_dim, num_heads=2):
    for _ in range(transformer_layers):
      x1 = layers.LayerNormalization(epsilon=1e-6)(x)
      attention_output = layers.MultiHeadAttention(num_heads=num_heads, key_dim=projection_dim,
                                                   dropout=0.1)(x1, x1)
      x2 = layers.Add()([attention_output, x])
      x3 = layers.LayerNormalization(epsilon=1e-6)(x2)
      x3 = mlp(x3, [x.shape[-1] * 2, x.shape[-1]], 0.1)
      x = layers.Add()([x3, x2])
    return x

  def mobilevit_block(x, num_blocks, projection_dim, strides=1):
    local_features = conv_block(x, filters=projection_dim, strides=strides)
    local_features = conv_block(local_features, filters=projection_dim, kernel_size=1,
                                strides=strides)
    num_patches = int((local_features.shape[1] * local_features.shape[2]) / patch_size)
    patches = layers.Reshape((patch_size, num_patches, projection_dim))(local_features)
    global_features = transformer_block(patches, num_blocks, projection_dim)
    folded = layers.Reshape((*local_features.shape[1:-1], projection_dim))(global_features)
    folded = conv_block(folded, filters=x.shape[-1], kernel_size=1, strides=strides)
    local_global = layers.Concatenate(axis=-1)([x, folded])
    return conv_block(local_global, filters=projection_dim, strides=strides)

  e = s["expansion_factor"]
  c1, c2 = s["mv2_channels"]
  inputs = keras.Input((s["image_size"], s["image_size"], 3))
  x = layers.Rescaling(scale=1.0 / 255)(inputs)
  x = conv_block(x, filters=s["stem"])
  x = inverted_residual_block(x, expanded_channels=s["stem"] * e, output_channels=c1)
  x = inverted_residual_block(x, expanded_channels=c1 * e, output_channels=c2, strides=2)
  x = inverted_residual_block(x, expanded_channels=c2 * e, output_channels=c2)
  x = inverted_residual_block(x, expanded_channels=c2 * e, output_channels=c2)
  previous = c2
  # The three "MV2 -> MobileViT" stages: (MV2 output channels, transformer blocks, dim).
  for mv2_out, blocks, dim in s["vit_stages"]:
    x = inverted_residual_block(x, expanded_channels=previous * e, output_channels=mv2_out,
                                strides=2)
    x = mobilevit_block(x, num_blocks=blocks, projection_dim=dim)
    previous = dim
  x = conv_block(x, filters=s["last_channels"], kernel_size=1, strides=1)
  x = layers.GlobalAvgPool2D()(x)
  outputs = layers.Dense(s["num_classes"], activation="softmax")(x)
  model = keras.Model(inputs, outputs)
  images = test_images(rng, s["image_size"], 255.0)
  return model, images, {}


# ---------------------------------------------------------------------------------------------
# perceiver_image_classification.py

PERCEIVER = dict(image_size=16, patch_size=2, latent_dim=16, projection_dim=32, num_heads=4,
                 num_transformer_blocks=2, num_iterations=2, num_classes=10,
                 example="perceiver_image_classification.py")


def create_ffn(hidden_units, dropout_rate):
  ffn_layers = [layers.Dense(units, activation=keras.activations.gelu)
                for units in hidden_units[:-1]]
  ffn_layers.append(layers.Dense(units=hidden_units[-1]))
  ffn_layers.append(layers.Dropout(dropout_rate))
  return keras.Sequential(ffn_layers)


def create_cross_attention_module(latent_dim, data_dim, projection_dim, ffn_units,
                                  dropout_rate):
  inputs = {"latent_array": layers.Input(shape=(latent_dim, projection_dim)),
            "data_array": layers.Input(shape=(data_dim, projection_dim))}
  latent_array = layers.LayerNormalization(epsilon=1e-6)(inputs["latent_array"])
  data_array = layers.LayerNormalization(epsilon=1e-6)(inputs["data_array"])
  query = layers.Dense(units=projection_dim)(latent_array)
  key = layers.Dense(units=projection_dim)(data_array)
  value = layers.Dense(units=projection_dim)(data_array)
  attention_output = layers.Attention(use_scale=True, dropout=0.1)(
      [query, key, value], return_attention_scores=False)
  attention_output = layers.Add()([attention_output, latent_array])
  attention_output = layers.LayerNormalization(epsilon=1e-6)(attention_output)
  outputs = create_ffn(ffn_units, dropout_rate)(attention_output)
  outputs = layers.Add()([outputs, attention_output])
  return keras.Model(inputs=inputs, outputs=outputs)


def create_transformer_module(latent_dim, projection_dim, num_heads, num_transformer_blocks,
                              ffn_units, dropout_rate):
  inputs = layers.Input(shape=(latent_dim, projection_dim))
  x0 = inputs
  for _ in range(num_transformer_blocks):
    x1 = layers.LayerNormalization(epsilon=1e-6)(x0)
    attention_output = layers.MultiHeadAttention(num_heads=num_heads, key_dim=projection_dim,
                                                 dropout=0.1)(x1, x1)
    x2 = layers.Add()([attention_output, x0])
    x3 = layers.LayerNormalization(epsilon=1e-6)(x2)
    x3 = create_ffn(ffn_units, dropout_rate)(x3)
    x0 = layers.Add()([x3, x2])
  return keras.Model(inputs=inputs, outputs=x0)


class Perceiver(keras.Model):

  def __init__(self, data_augmentation, patch_size, data_dim, latent_dim, projection_dim,
               num_heads, num_transformer_blocks, ffn_units, dropout_rate, num_iterations,
               classifier_units):
    super().__init__()
    # Kept out of Keras' tracking, as the example's module-level `data_augmentation` is.
    self.__dict__["_data_augmentation"] = data_augmentation
    self.latent_dim = latent_dim
    self.data_dim = data_dim
    self.patch_size = patch_size
    self.projection_dim = projection_dim
    self.num_heads = num_heads
    self.num_transformer_blocks = num_transformer_blocks
    self.ffn_units = ffn_units
    self.dropout_rate = dropout_rate
    self.num_iterations = num_iterations
    self.classifier_units = classifier_units

  def build(self, input_shape):
    self.latent_array = self.add_weight(shape=(self.latent_dim, self.projection_dim),
                                        initializer="random_normal", trainable=True,
                                        name="latent_array")
    self.patcher = Patches(self.patch_size)
    self.patch_encoder = PatchEncoder(self.data_dim, self.projection_dim)
    self.cross_attention = create_cross_attention_module(
        self.latent_dim, self.data_dim, self.projection_dim, self.ffn_units, self.dropout_rate)
    self.transformer = create_transformer_module(
        self.latent_dim, self.projection_dim, self.num_heads, self.num_transformer_blocks,
        self.ffn_units, self.dropout_rate)
    self.global_average_pooling = layers.GlobalAveragePooling1D()
    self.classification_head = create_ffn(self.classifier_units, self.dropout_rate)
    super().build(input_shape)

  def classifier_input(self, inputs):
    """The input of the last Dense (used only to choose its perturbed weights)."""
    latent = self.transformer(self.cross_attention(
        {"latent_array": ops.expand_dims(self.latent_array, 0),
         "data_array": self.patch_encoder(self.patcher(self._data_augmentation(inputs)))}))
    for _ in range(self.num_iterations - 1):
      latent = self.transformer(self.cross_attention(
          {"latent_array": latent,
           "data_array": self.patch_encoder(self.patcher(self._data_augmentation(inputs)))}))
    return self.classification_head.layers[0](self.global_average_pooling(latent))

  def call(self, inputs):
    augmented = self._data_augmentation(inputs)
    encoded_patches = self.patch_encoder(self.patcher(augmented))
    cross_attention_inputs = {"latent_array": ops.expand_dims(self.latent_array, 0),
                              "data_array": encoded_patches}
    for _ in range(self.num_iterations):
      latent_array = self.cross_attention(cross_attention_inputs)
      latent_array = self.transformer(latent_array)
      cross_attention_inputs["latent_array"] = latent_array
    representation = self.global_average_pooling(latent_array)
    return self.classification_head(representation)


def build_perceiver(rng):
  s = PERCEIVER
  normalization = adapted_normalization(rng)
  _perturb_layer(normalization, rng)
  d = s["projection_dim"]
  model = Perceiver(normalization, s["patch_size"], (s["image_size"] // s["patch_size"]) ** 2,
                    s["latent_dim"], d, s["num_heads"], s["num_transformer_blocks"], [d, d],
                    0.2, s["num_iterations"], [d, s["num_classes"]])
  model.build((None, s["image_size"], s["image_size"], 3))
  images = test_images(rng, s["image_size"], 255.0)
  extra = {"normalization_mean": keras.ops.convert_to_numpy(normalization.mean),
           "normalization_variance": keras.ops.convert_to_numpy(normalization.variance)}
  return model, images, extra


# ---------------------------------------------------------------------------------------------


def _perturb(value: np.ndarray, name: str, path: str, rng) -> np.ndarray:
  """A new value for every variable, so that no zero or one hides a mistake."""
  if value.dtype.kind in "iu" or name.endswith("count") or name in ("relative_position_index",
                                                                    "attn_mask"):
    return value  # Buffers and counters: derived from the layout, checked by the converter.
  if name == "moving_variance" or name == "variance":
    return rng.uniform(0.5, 1.5, value.shape).astype(value.dtype) * (value.max() + 1e-3
                                                                     if name == "variance"
                                                                     else 1.0)
  if name == "scale" and value.ndim == 0:  # The Perceiver's learned attention scale.
    return np.asarray(rng.uniform(0.1, 0.3), value.dtype)
  if name == "kernel":
    # Fresh weights of variance 1 / fan_in (2 / fan_in for the depthwise ones), so that the
    # signal, and its differences between images, survive the depth of the model.
    if "depthwise" in path:
      fan_in, gain = int(np.prod(value.shape[:2])), 2.0
    elif value.ndim == 3 and path.split("/")[-2] in ("query", "key", "value"):
      fan_in, gain = value.shape[0], 1.0  # MultiHeadAttention: [dim, heads, key_dim]
    else:
      fan_in, gain = int(np.prod(value.shape[:-1])), 1.0
    return rng.normal(0.0, np.sqrt(gain / fan_in), value.shape).astype(value.dtype)
  spread = float(value.std())
  if spread == 0.0:  # zeros, ones, constants: biases, norms, tables, statistics
    spread = 0.2
  return (value + rng.normal(0.0, 0.5 * spread, value.shape)).astype(value.dtype)


def _perturb_layer(layer, rng) -> None:
  for w in layer.weights:
    w.assign(_perturb(keras.ops.convert_to_numpy(w), w.name, w.path, rng))
  # A Normalization layer caches its statistics at build time; loading weights refreshes
  # them through finalize_state(), and so must this.
  for sub in layer._flatten_layers(include_self=True):  # pylint: disable=protected-access
    if isinstance(sub, layers.Normalization):
      sub.finalize_state()


def _save(name: str, model, images: np.ndarray, extra: dict, meta: dict, rng) -> None:
  images = images.astype("float32")
  model(images, training=False)  # builds every layer
  _perturb_layer(model, rng)
  # Batch-norm statistics near those of this batch (then perturbed), layer after layer, so
  # that each normalises to about unit scale and the images stay distinguishable.
  for layer in getattr(model, "layers", []):
    if isinstance(layer, layers.BatchNormalization):
      x = keras.ops.convert_to_numpy(keras.Model(model.inputs, layer.input)(images))
      mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
      layer.moving_mean.assign(mean + 0.2 * np.sqrt(var) * rng.normal(0, 1, mean.shape))
      layer.moving_variance.assign(var * rng.uniform(0.7, 1.3, var.shape))
  last = model.layers[-1] if not hasattr(model, "classification_head") else \
      model.classification_head.layers[-2]
  # The classifier's kernel: noise plus a part along the directions in which this batch's
  # features differ, so that the logits (and their argmax) differ from image to image.
  kernel = keras.ops.convert_to_numpy(last.kernel)
  kernel = rng.normal(0, 1, kernel.shape) / np.sqrt(kernel.shape[0])
  if hasattr(model, "classifier_input"):
    features = keras.ops.convert_to_numpy(model.classifier_input(images))
  else:  # functional: read the classifier's input
    features = keras.ops.convert_to_numpy(keras.Model(model.inputs, last.input)(images))
  mean = features.mean(axis=0)
  mean /= np.linalg.norm(mean) + 1e-6
  centred = features - features.mean(axis=0)
  centred /= np.linalg.norm(centred, axis=1, keepdims=True) + 1e-6
  kernel += 3.0 * centred.T @ rng.normal(0, 1, (len(images), kernel.shape[1]))
  kernel -= np.outer(mean, mean @ kernel)  # the part common to all images stays small
  last.kernel.assign(kernel)
  outputs = keras.ops.convert_to_numpy(model(images, training=False))
  arrays = {}
  paths = [w.path for w in model.weights]
  if len(set(paths)) != len(paths):
    raise RuntimeError(f"{name}: duplicate Keras weight paths")
  for w in model.weights:
    arrays[f"weights/{w.path}"] = keras.ops.convert_to_numpy(w)
  for key, value in extra.items():
    arrays[f"extra/{key}"] = np.asarray(value)
  arrays["images"] = images
  if getattr(last, "activation", None) is keras.activations.softmax:
    arrays["probabilities"] = outputs
    last.activation = keras.activations.linear
    outputs = keras.ops.convert_to_numpy(model(images, training=False))
  arrays["logits"] = outputs.astype("float32")
  arrays["meta"] = np.asarray(json.dumps(meta))
  path = FIXTURES / f"keras_{name}.npz"
  np.savez_compressed(path, **arrays)
  print(f"{path.name}: {len(model.weights)} weights, "
        f"{sum(int(np.prod(w.shape)) for w in model.weights)} values, "
        f"{path.stat().st_size / 1024:.0f} KB, logits std {outputs.std():.3f}, "
        f"argmax {outputs.argmax(-1).tolist()}")


def main() -> None:
  keras.utils.set_random_seed(0)
  FIXTURES.mkdir(exist_ok=True)
  builders = {
      "vit": (lambda rng: build_vit(rng), VIT),
      "eanet": (lambda rng: build_eanet(rng, "external_attention"), EANET),
      "eanet_self": (lambda rng: build_eanet(rng, "self_attention"), EANET),
      "cct": (lambda rng: build_cct(rng), CCT),
      "swin": (lambda rng: build_swin(rng), SWIN),
      "mobilevit": (lambda rng: build_mobilevit(rng), MOBILEVIT),
      "perceiver": (lambda rng: build_perceiver(rng), PERCEIVER),
  }
  for i, (name, (build, meta)) in enumerate(builders.items()):
    rng = np.random.default_rng(1000 + i)
    model, images, extra = build(rng)
    _save(name, model, images, extra, meta, rng)


if __name__ == "__main__":
  main()
