"""The seed CNN and per-layer accounting (parameters, FLOPs, bytes).

The seed article's model, kept exactly (356,810 parameters at ``width=1``)::

    Conv2D(32, 3x3, relu) -> MaxPool(2) -> Conv2D(64, 3x3, relu) -> MaxPool(2)
    -> Conv2D(128, 3x3, relu) -> Flatten -> Dense(128, relu) -> Dense(10, softmax)

``width`` multiplies every filter and unit count; later notebooks use it for a
"bigger model" that has something worth splitting.

FLOPs convention: one multiply-accumulate (MAC) counts as 2 FLOPs. Only convolutions and
dense layers are counted (bias adds, activations and pooling are below 1% here and left
out), per image, forward pass. A training step costs about 3x the forward FLOPs.
"""

from __future__ import annotations

import math

import keras
import pandas as pd

SEED_CNN_PARAMS = 356_810  # model.count_params() of the seed CNN at width 1


def scaled(n: int, width: float) -> int:
    """``n`` channels scaled by ``width``, at least 1."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(n * width)))


def build_seed_cnn(
    width: float = 1.0,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    name: str = "seed_cnn",
) -> keras.Model:
    """Build the seed article's CNN (uncompiled). Inputs are floats in [0, 1].

    The output layer always computes in float32, so the model stays numerically safe
    under a ``mixed_bfloat16``/``mixed_float16`` global policy.
    """
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(scaled(32, width), (3, 3), activation="relu", name="conv1"),
            keras.layers.MaxPooling2D((2, 2), name="pool1"),
            keras.layers.Conv2D(scaled(64, width), (3, 3), activation="relu", name="conv2"),
            keras.layers.MaxPooling2D((2, 2), name="pool2"),
            keras.layers.Conv2D(scaled(128, width), (3, 3), activation="relu", name="conv3"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(scaled(128, width), activation="relu", name="dense1"),
            keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="output"),
        ],
        name=name,
    )


def conv2d_flops(out_h: int, out_w: int, in_channels: int, out_channels: int, kh: int, kw: int) -> int:
    """Forward FLOPs of a 2-D convolution for one image: 2 * kh*kw*c_in * h_out*w_out*c_out."""
    return 2 * kh * kw * in_channels * out_h * out_w * out_channels


def dense_flops(in_units: int, out_units: int) -> int:
    """Forward FLOPs of a dense layer for one input vector: 2 * in * out."""
    return 2 * in_units * out_units


def layer_flops(layer: keras.layers.Layer) -> int:
    """Forward FLOPs per image of one built Keras layer (0 for layers not counted)."""
    if isinstance(layer, keras.layers.Conv2D):
        _, h, w, c_out = layer.output.shape
        kh, kw = layer.kernel_size
        c_in = layer.input.shape[-1] // layer.groups
        return conv2d_flops(h, w, c_in, c_out, kh, kw)
    if isinstance(layer, keras.layers.Dense):
        return dense_flops(layer.input.shape[-1], layer.units)
    return 0


def layer_table(model: keras.Model, bytes_per_value: int = 4) -> pd.DataFrame:
    """Per-layer table: output shape, parameters, FLOPs per image, parameter and activation bytes.

    Activation bytes are the layer's output for one image at ``bytes_per_value`` (4 for
    float32). A ``TOTAL`` row sums the numeric columns.
    """
    rows = []
    for layer in model.layers:
        out_shape = tuple(layer.output.shape[1:])
        params = layer.count_params()
        rows.append(
            {
                "layer": layer.name,
                "type": type(layer).__name__,
                "output shape": str(out_shape),
                "params": params,
                "FLOPs/image": layer_flops(layer),
                "param bytes": params * bytes_per_value,
                "activation bytes/image": math.prod(out_shape) * bytes_per_value,
            }
        )
    table = pd.DataFrame(rows)
    total = {c: int(table[c].sum()) for c in ["params", "FLOPs/image", "param bytes", "activation bytes/image"]}
    total.update({"layer": "TOTAL", "type": "", "output shape": ""})
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)
