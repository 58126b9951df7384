# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,jupyter,-all
#     formats: ipynb,py//py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The CNN: where its parameters and its compute live
#
# The series follows one model from start to finish: the small convolutional network of
# the article it starts from, trained on CIFAR-10. Before you distribute anything, take the
# model apart and count: how many parameters each layer holds, how much arithmetic it does
# per image, and how many bytes its weights and its activations take. These three numbers
# decide how a model is split across devices later on.
#
# **What you will learn**
#
# - how to build the seed CNN with Keras 3 and check it against its known size (356,810
#   parameters);
# - how to count FLOPs per image for convolutions and dense layers by hand;
# - where the parameters live (the dense head) versus where the compute lives (the
#   convolutions), and why that tells you what to split first;
# - how the numbers grow with a width multiplier, the "bigger model" of later notebooks;
# - how to run a forward pass on real CIFAR-10 images.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 11 s | not measured |
# | smoke (`SERIES_MODE=smoke`) | 11 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup

# %%
from utils import config, data, devices, models

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
print("mode:", config.get_mode())

# %% [markdown]
# ## Build the seed model
#
# `utils.models.build_seed_cnn()` is the article's model, unchanged: three 3×3 convolutions
# with 32, 64 and 128 filters, max-pooling after the first two, then a dense layer of 128
# units and a 10-way softmax. It expects images scaled to [0, 1].

# %%
model = models.build_seed_cnn()
model.summary()

# %%
# NBVAL_CHECK_OUTPUT
print(f"parameters: {model.count_params():,}")
print("equals the seed model's 356,810:", model.count_params() == models.SEED_CNN_PARAMS)

# %% [markdown]
# ## Count it layer by layer
#
# `utils.models.layer_table()` walks the layers and computes, per image:
#
# - **parameters**: the layer's weights and biases (`layer.count_params()`);
# - **FLOPs**: one multiply-accumulate counts as 2 floating-point operations. A convolution
#   with a $k_h \times k_w$ kernel over $c_{in}$ channels producing an $h \times w \times c_{out}$
#   output does $2 \, k_h k_w c_{in} \cdot h w c_{out}$ FLOPs; a dense layer from $n$ to $m$
#   units does $2nm$. Pooling, bias and ReLU are cheap and left out;
# - **bytes**: parameters and the layer's output activation in float32 (4 bytes each).
#
# Check the first row by hand: `conv1` sees 3 channels through a 3×3 kernel, so each output
# value costs 27 multiply-adds; the output is 30×30×32 values.

# %%
# NBVAL_CHECK_OUTPUT
table = models.layer_table(model)
print(table.to_string(index=False))
hand = 2 * (3 * 3 * 3) * (30 * 30 * 32)
print(f"\nconv1 by hand: 2 x 27 x 28,800 = {hand:,} FLOPs; table agrees: {table.loc[0, 'FLOPs/image'] == hand}")
print("table total equals model.count_params():", table.iloc[-1]["params"] == model.count_params())

# %% [markdown]
# ## Parameters live in the head, compute lives in the trunk
#
# Plot each layer's share of the parameters and of the FLOPs.

# %%
layers_only = table[(table["layer"] != "TOTAL") & ((table["params"] > 0) | (table["FLOPs/image"] > 0))]
share = pd.DataFrame(
    {
        "parameters": layers_only["params"] / layers_only["params"].sum(),
        "FLOPs per image": layers_only["FLOPs/image"] / layers_only["FLOPs/image"].sum(),
    }
).set_index(layers_only["layer"])
ax = share.mul(100).plot.bar(figsize=(8, 3.5), rot=0, color=["#4477aa", "#ee6677"])
ax.set_ylabel("% of the model")
ax.set_title("Seed CNN: where the parameters and the compute live")
for container in ax.containers:
    ax.bar_label(container, fmt="%.0f%%", fontsize=8)
plt.tight_layout()
plt.show()

# %%
head = share.loc[["dense1", "output"]].sum()
trunk = share.loc[["conv1", "conv2", "conv3"]].sum()
print(f"dense head:  {head['parameters']:.1%} of parameters, {head['FLOPs per image']:.1%} of FLOPs")
print(f"conv trunk:  {trunk['parameters']:.1%} of parameters, {trunk['FLOPs per image']:.1%} of FLOPs")

# %% [markdown]
# Read the plot and the two lines above it. The first dense layer (`dense1`, which takes
# the flattened 4×4×128 feature map) holds most of the parameters while doing a small
# fraction of the arithmetic; the convolutions do most of the arithmetic with few
# parameters, because each small kernel is reused at every pixel.
#
# That asymmetry is the whole story of this series in miniature:
#
# - **Weights** are dominated by the head. When the weights do not fit on one device,
#   split the big *matrices*: that is tensor parallelism (notebook 07), and it starts with
#   the dense layers. (Weights are not all of a step's memory: the next section counts the
#   rest.)
# - **Compute** is dominated by the trunk. When a step is too slow, split the *batch*
#   (data parallelism, notebooks 02–05) or the *sequence of layers* (pipeline parallelism,
#   notebook 06).
#
# ## Training costs more than inference
#
# A training step runs the forward pass, then a backward pass that costs about twice as
# much (one matmul for the gradient of the inputs, one for the weights), so roughly
# 3× the forward FLOPs. Memory during training holds the weights, their gradients, the
# optimiser's state (Adam keeps two more copies) and the activations of the whole batch.

# %%
# NBVAL_CHECK_OUTPUT
total = table.iloc[-1]
batch = 128
p_bytes = total["param bytes"]
print(f"forward FLOPs per image:          {total['FLOPs/image'] / 1e6:.1f} MFLOP")
print(f"training FLOPs per batch of {batch}:  {3 * batch * total['FLOPs/image'] / 1e9:.2f} GFLOP")
per_layer = table[table["layer"] != "TOTAL"].set_index("layer")["activation bytes/image"]
trunk_acts = per_layer[~per_layer.index.isin(["dense1", "output"])].sum() / per_layer.sum()
print(f"weights + gradients + Adam (m, v): {4 * p_bytes / 2**20:.2f} MiB")
print(f"activations for a batch of {batch}:   {batch * total['activation bytes/image'] / 2**20:.2f} MiB")
print(f"share of the activations in the trunk (convolutions, pooling, flatten): {trunk_acts:.1%}")

# %% [markdown]
# Compare the last three lines. At a batch of 128 the activations take several times the
# memory of the whole training state, and almost all of them sit in the trunk's large
# feature maps. So the head dominates the *weights*, but the trunk dominates a training
# step's memory at this batch size: activations grow with the batch, weights do not.
# Splitting the batch (data parallelism) or the layers (pipeline parallelism) shrinks the
# activations per device; recomputing them (notebook 08) trades compute for that memory.
#
# ## A bigger model
#
# The seed model is tiny: it fits on any device many times over. Later notebooks use the
# same architecture with a **width multiplier** that scales every filter and unit count.
# Parameters of convolutions and dense layers grow with the square of the width (about 4×
# per doubling in the table below), and `dense1` keeps its large share at every width: the
# head is always the first thing that stops fitting.

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for width in [1, 2, 4, 8, 16]:
    t = models.layer_table(models.build_seed_cnn(width=width)).set_index("layer")
    rows.append(
        {
            "width": width,
            "parameters": int(t.loc["TOTAL", "params"]),
            "dense1 share": f"{t.loc['dense1', 'params'] / t.loc['TOTAL', 'params']:.0%}",
            "MFLOP/image": round(t.loc["TOTAL", "FLOPs/image"] / 1e6, 1),
            "train state (Adam, fp32) MiB": round(4 * t.loc["TOTAL", "param bytes"] / 2**20, 1),
        }
    )
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# ## A forward pass on real images
#
# Load a few images and run the (untrained) model on them. Its predictions are close to
# uniform, about 10% per class: training is notebook 04's job. What matters here is the
# plumbing: uint8 images are scaled to [0, 1], the output is one probability per class, and
# each row sums to 1.

# %%
cifar = data.load_for_mode()
print(cifar.describe())

# %%
images = cifar.x_test[:8]
probs = model(data.to_float(images), training=False).numpy()
fig, axes = plt.subplots(1, 8, figsize=(12, 2.2))
for ax, img, label, p in zip(axes, images, cifar.y_test[:8], probs):
    ax.imshow(img)
    ax.set_title(f"{cifar.class_names[label]}\npred: {cifar.class_names[p.argmax()]} {p.max():.0%}", fontsize=8)
    ax.axis("off")
fig.suptitle(f"Untrained seed CNN on {cifar.label} test images (true / predicted)", fontsize=10)
plt.tight_layout()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("input batch:", images.shape, "-> output:", probs.shape)
print("each row sums to 1:", bool(np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)))

# %% [markdown]
# ## Summary
#
# - The seed CNN has 356,810 parameters; `utils.models.layer_table()` counts parameters,
#   FLOPs and bytes per layer, and agrees with Keras and with a hand count.
# - The dense head holds most of the parameters; the convolutions do most of the
#   arithmetic and hold most of the activations. Weights that do not fit point at tensor
#   parallelism of the head; compute and activation memory point at data or pipeline
#   parallelism.
# - A training step costs about 3× the forward FLOPs, and Adam training keeps about four
#   copies of the weights' size in memory, plus activations.
# - Widening the model multiplies parameters by about the square of the width.
#
# ## Exercises
#
# **1.** Compute by hand the FLOPs per image of `conv2` and check the table.

# %%
# Try it: conv2 reads 32 channels through a 3x3 kernel; what is its output size?
out_h = out_w = 15  # TODO: the right output size (the table's "output shape" column)
print(2 * (3 * 3 * 32) * (out_h * out_w * 64), table.set_index("layer").loc["conv2", "FLOPs/image"])

# %% jupyter={"source_hidden": true}
# Solution 1: conv2 sees 32 channels through a 3x3 kernel and outputs 13x13x64 values.
conv2_hand = 2 * (3 * 3 * 32) * (13 * 13 * 64)
print(conv2_hand, table.set_index("layer").loc["conv2", "FLOPs/image"] == conv2_hand)

# %% [markdown]
# **2.** What fraction of the parameters does `dense1` hold at width 4? Which single
# change to the architecture would shrink it most?

# %%
# Try it: build the width-4 model and read its layer table.
t4 = models.layer_table(models.build_seed_cnn(width=4)).set_index("layer")
print(t4[["params"]].T)

# %% jupyter={"source_hidden": true}
# Solution 2: dense1 holds most of the parameters because it sees the flattened 4x4x128 map.
t4 = models.layer_table(models.build_seed_cnn(width=4)).set_index("layer")
print(f"dense1 share at width 4: {t4.loc['dense1', 'params'] / t4.loc['TOTAL', 'params']:.0%}")
# Global average pooling instead of Flatten divides dense1's input by 16 (4x4 positions).

# %% [markdown]
# **3.** Count the FLOPs of a `Conv2D(64, 3, padding="same")` on a 32×32×32 input with
# `utils.models.layer_table()` and compare with the formula `models.conv2d_flops`.

# %%
# Try it: a one-layer model on a 32x32x32 input.
import keras

probe = keras.Sequential([keras.Input((32, 32, 32)), keras.layers.Conv2D(64, 3, padding="same")])
print(models.layer_table(probe).loc[0, "FLOPs/image"])

# %% jupyter={"source_hidden": true}
# Solution 3
probe = keras.Sequential([keras.Input((32, 32, 32)), keras.layers.Conv2D(64, 3, padding="same")])
t = models.layer_table(probe)
print(t.loc[0, "FLOPs/image"], models.conv2d_flops(32, 32, 32, 64, 3, 3))

# %% [markdown]
# ## Further reading
#
# - The Keras 3 API: [`keras.layers.Conv2D`](https://keras.io/api/layers/convolution_layers/convolution2d/),
#   [`keras.Model.summary`](https://keras.io/api/models/model/#summary-method).
# - J. Kaplan et al., [Scaling Laws for Neural Language Models](https://arxiv.org/abs/2001.08361), 2020
#   (the "6 × parameters × tokens" training-FLOPs rule, the same forward + 2× backward count).
# - M. Shoeybi et al., [Megatron-LM](https://arxiv.org/abs/1909.08053), 2019: why large dense layers are
#   split first.
# - Stanford CS231n notes, [Convolutional Networks](https://cs231n.github.io/convolutional-networks/)
#   (output sizes and parameter counts of convolutions).
