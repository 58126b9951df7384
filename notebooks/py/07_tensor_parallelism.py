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
# # 07 · Tensor parallelism with DTensor: one layer split across devices
#
# Pipeline parallelism gives each device whole layers. When a *single* layer is too big for
# one device, you have to split the layer itself: every device holds a slice of its weight
# matrix and computes a slice of its output. This is *tensor parallelism*, the scheme
# Megatron-LM uses inside every transformer block. In this notebook you build it with
# TensorFlow's `tf.experimental.dtensor`, on the seed CNN's dense head made 8× wider, and
# you prove, number by number, that the split model computes exactly what the one-device
# model computes.
#
# **What you will learn**
#
# - what a *mesh*, a *layout* and a *sharding spec* are, and how to build a 1×N "model"
#   mesh from whatever devices the machine has;
# - how a Megatron MLP splits its first dense layer by columns and its second by rows, so
#   that the forward pass needs exactly one all-reduce, and where that all-reduce happens;
# - how to check that forward outputs, gradients and a short training run match a single
#   device, with stated tolerances;
# - how many bytes each device stores, measured from the actual shards, and what happens
#   when N does not divide a layer;
# - how to split convolutions (over output channels, input channels or space), with a
#   working channel-split convolution, done by hand because DTensor refuses it.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 16 s | not measured |
# | smoke (`SERIES_MODE=smoke`) | 6 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# `utils.devices.setup_devices()` must run before any other TensorFlow code: on a machine
# without GPUs it splits the CPU into logical CPUs (4 unless you set `SERIES_NUM_CPUS`).
# DTensor only needs those devices to exist. You do **not** need
# `dtensor.initialize_accelerator_system()` here: in DTensor's *local mode* (one process,
# its own devices) that call would only re-create the logical CPUs, which
# `setup_devices()` has already done. You need it for meshes that span several hosts.

# %% tags=["device-check"]
import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, data, devices, models
from utils.lessons.mirrored_strategy import max_abs_diff, max_rel_diff

import time

import keras
import matplotlib.pyplot as plt

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
S = config.sizes()
print("mode:", config.get_mode())

# %% [markdown]
# ## 1. Meshes, layouts and sharding specs
#
# DTensor describes a distributed tensor with two objects:
#
# - a **mesh**: the devices arranged as a grid with *named* dimensions. Tensor parallelism
#   over N devices uses a one-row mesh with a single dimension called `"model"` of size N
#   (a 1×N grid). The hybrid-parallelism notebook adds a second dimension, `"batch"`, for
#   data parallelism;
# - a **layout** (`dtensor.Layout`): the mesh plus one **sharding spec** per tensor axis. A
#   spec is either the name of a mesh dimension (the axis is cut into equal slices, one per
#   device along that dimension) or `dtensor.UNSHARDED` (every device holds the whole axis).
#
# So a weight matrix with layout `[unsharded, model]` is split by *columns*: on a 4-device
# mesh each device holds all rows and a quarter of the columns. `[model, unsharded]` splits
# it by rows; `[unsharded, unsharded]` is a full copy on every device (*replicated*).
#
# The next cell writes the few helpers the rest of the series uses for this (notebook 08
# too, which is why it starts with `#@save`): build a mesh, write a layout, check that a
# size splits evenly, cut an array into one slice per device and put it back together, and
# describe what each device stores. `shard()` cuts the array on the host and sends each
# device only its own block; `dtensor.pack` turns the blocks into one DTensor, and
# `dtensor.unpack` gives them back.

# %% tags=["device-check"]
#@save
import math

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow.experimental import dtensor

from utils.devices import compute_devices, short_device


def create_mesh(dims, devices=None) -> dtensor.Mesh:
    """A mesh with named dims, e.g. ``[("batch", 2), ("model", 2)]``, outermost first.

    ``devices=None`` takes the first prod(sizes) of ``compute_devices()`` (GPUs, else CPUs).
    """
    dims = list(dict(dims).items())
    needed = math.prod(size for _, size in dims)
    return dtensor.create_mesh(dims, devices=list(devices or compute_devices()[:needed]))


def model_mesh(n: int) -> dtensor.Mesh:
    """A 1-D mesh ``model=n``: one row of n devices that all hold slices of each layer."""
    return create_mesh([("model", n)])


def mesh_table(mesh: dtensor.Mesh) -> pd.DataFrame:
    """One row per device: its short name and its index along every mesh dim."""
    return pd.DataFrame(
        {"device": short_device(d), **{f"{k} index": i for k, i in loc.items()}}
        for d, loc in zip(mesh.local_devices(), mesh.local_device_locations(), strict=True)
    )


def layout(mesh: dtensor.Mesh, *specs) -> dtensor.Layout:
    """One sharding spec per tensor axis: a mesh dim name, or None for unsharded."""
    return dtensor.Layout([s or dtensor.UNSHARDED for s in specs], mesh)


def check_divisible(size: int, mesh: dtensor.Mesh, dim: str, what: str) -> None:
    """DTensor only knows equal shards: raise a ValueError unless ``size`` splits over ``dim``."""
    n = mesh.dim_size(dim)
    if size % n:
        raise ValueError(
            f"Cannot shard {what} over mesh dim {dim!r} of size {n}: {size} is not divisible "
            f"by {n}, and DTensor needs equal shards. Use a {dim!r} size that divides {size}, "
            f"or pad to {-(-size // n) * n} with zeros and slice the padding off the output."
        )


def _block(shape, layout_: dtensor.Layout, location: dict) -> tuple:
    """The index of the block that the device at mesh ``location`` stores."""
    index = []
    for size, spec in zip(shape, layout_.sharding_specs, strict=True):
        step = size if spec == dtensor.UNSHARDED else size // layout_.mesh.dim_size(spec)
        start = 0 if spec == dtensor.UNSHARDED else location[spec] * step
        index.append(slice(start, start + step))
    return tuple(index)


def shard(value, layout_: dtensor.Layout) -> tf.Tensor:
    """A DTensor with ``layout_``: cut ``value`` on the host, give each device its block."""
    value = np.asarray(value)
    for axis, spec in enumerate(layout_.sharding_specs):
        if spec != dtensor.UNSHARDED:
            size = value.shape[axis]
            check_divisible(size, layout_.mesh, spec, f"axis {axis} (size {size}) of a tensor")
    blocks = [value[_block(value.shape, layout_, loc)] for loc in layout_.mesh.local_device_locations()]
    return dtensor.pack(blocks, layout_)


def to_numpy(t) -> np.ndarray:
    """Gather a DTensor (or DVariable, tensor, array) into one host array, block by block."""
    t = t.read_value() if isinstance(t, tf.Variable) else t
    if not (isinstance(t, tf.Tensor) and dtensor.is_dtensor(t)):
        return np.asarray(t)
    layout_ = dtensor.fetch_layout(t)
    out = np.empty(t.shape, t.dtype.as_numpy_dtype)
    for block, loc in zip(dtensor.unpack(t), layout_.mesh.local_device_locations(), strict=True):
        out[_block(out.shape, layout_, loc)] = block.numpy()
    return out


def spec_string(t) -> str:
    """A DTensor's sharding specs as ``[unsharded, model]``; ``ordinary tensor`` otherwise."""
    t = t.read_value() if isinstance(t, tf.Variable) else t
    if not dtensor.is_dtensor(t):
        return "ordinary tensor"
    return "[" + ", ".join(dtensor.fetch_layout(t).sharding_specs) + "]"


def shard_shapes(t) -> list:
    """``(device, shape)`` of every block a DTensor's devices actually store."""
    t = t.read_value() if isinstance(t, tf.Variable) else t
    blocks = dtensor.unpack(t) if dtensor.is_dtensor(t) else [t]
    return [(short_device(b.device), tuple(b.shape)) for b in blocks]


def layout_table(named: dict) -> pd.DataFrame:
    """One row per named tensor: global shape, sharding specs, shard shape, devices."""
    rows = []
    for name, t in named.items():
        shapes = shard_shapes(t)
        rows.append({"tensor": name, "global shape": str(tuple(t.shape)),
                     "sharding": spec_string(t), "shard shape": str(shapes[0][1]),
                     "devices": ", ".join(d for d, _ in shapes)})  # fmt: skip
    return pd.DataFrame(rows)


# %% [markdown]
# **How many devices, and how wide a layer.** The dense head below should have 1,024
# hidden units (the seed head's 128, 8× wider), split over every device there is. DTensor
# only knows equal shards, so the hidden size must be a multiple of N: the next cell keeps
# 1,024 when N divides it (1, 2, 4 or 8 devices) and otherwise rounds it down to the
# nearest multiple of N (on 3 devices, for example). It prints what it chose and why.

# %% tags=["device-check"]
available = devices.compute_devices()
N = len(available)
HIDDEN = N * (1024 // N)  # 1,024 hidden units, rounded down to a multiple of N
mesh = model_mesh(N)
print(f"device kind: {devices.device_kind()}, devices found: {N} -> mesh model={N}")
if HIDDEN == 1024:
    print(f"hidden units: 1,024 = {N} x {HIDDEN // N}, so every device gets {HIDDEN // N} units")
else:
    print(f"1,024 hidden units do not split over {N} devices; using {HIDDEN:,} = {N} x {HIDDEN // N}")
if N == 1:
    print("ONE device: nothing is split. Every tensor below stays whole on that device, and the")
    print("equality checks only show that the DTensor code runs; set SERIES_NUM_CPUS=4 (or more)")
    print("and restart the kernel to see a real split.")
print("mesh dims:", dict(zip(mesh.dim_names, mesh.shape(), strict=True)))
print(mesh_table(mesh).to_string(index=False))

# %% [markdown]
# Lay out one small matrix three ways (N rows and 2N columns, so that both its rows and its
# columns split over the mesh) and look at what each device actually stores.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
demo = np.arange(N * 2 * N, dtype=np.float32).reshape(N, 2 * N)
demos = {
    "by columns": shard(demo, layout(mesh, None, "model")),
    "by rows": shard(demo, layout(mesh, "model", None)),
    "replicated": shard(demo, layout(mesh, None, None)),
}
print(layout_table(demos).to_string(index=False))
print("\nfirst device's block of the column layout:\n", dtensor.unpack(demos["by columns"])[0].numpy())
print("round trip gives the matrix back:", all(np.array_equal(to_numpy(t), demo) for t in demos.values()))

# %% [markdown]
# ## 2. The data and the model
#
# The seed CNN keeps almost all its parameters in its dense head: the flattened 4×4×128
# feature map (2,048 values) goes into `dense1`, then a 10-way output layer. That head is
# what you split, made wider as chosen above so that there is something worth splitting.
# The output stays *logits* (the softmax moves into the loss, `from_logits=True`), because
# the row-parallel layer's output only exists after the all-reduce.
#
# The convolutional trunk of the seed CNN (`conv1` … `flatten`) turns images into the
# 2,048 features. It stays on one device and frozen here, at its initial weights, so that
# everything you compare below is the head; the hybrid-parallelism notebook shards a whole
# network. An untrained trunk gives tiny features (their spread is printed below), so
# standardise each feature with the training set's mean and standard deviation, as you
# would any input.

# %% tags=["device-check"]
cifar = data.load_cifar10(allow_synthetic=config.is_smoke(), n_train=S.n_train, n_test=S.n_test)
print(cifar.describe())

seed_cnn = models.build_seed_cnn()
trunk = keras.Model(seed_cnn.inputs[0], seed_cnn.get_layer("flatten").output, name="trunk")
STEPS = config.pick(smoke=S.steps, full=150)
BATCH = S.batch_size
n_feat = min(len(cifar.x_train), STEPS * BATCH)


def features(images: np.ndarray) -> np.ndarray:
    """The frozen trunk's 2,048 features for uint8 images, computed in batches of 512."""
    return np.concatenate(
        [trunk(data.to_float(images[i : i + 512])).numpy() for i in range(0, len(images), 512)]
    )


t0 = time.perf_counter()
f_train, y_train = features(cifar.x_train[:n_feat]), cifar.y_train[:n_feat].astype("int32")
f_test, y_test = features(cifar.x_test), cifar.y_test.astype("int32")
print(f"raw trunk features: mean {f_train.mean():.4f}, std {f_train.std():.4f}")
mu, sd = f_train.mean(axis=0), f_train.std(axis=0) + 1e-3
f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
print(f"features: train {f_train.shape}, test {f_test.shape} ({time.perf_counter() - t0:.1f} s)")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
IN_FEATURES, CLASSES = trunk.output_shape[-1], 10
head = keras.Sequential(
    [
        keras.Input((IN_FEATURES,)),
        keras.layers.Dense(HIDDEN, activation="relu", name="dense1"),
        keras.layers.Dense(CLASSES, name="output"),  # logits
    ],
    name="wide_head",
)
print("trunk output:", trunk.output_shape, "-> head input features:", IN_FEATURES)
print("seed CNN dense1 units:", seed_cnn.get_layer("dense1").units, "-> wide head:", HIDDEN)
print(models.layer_table(head).to_string(index=False))

# %% [markdown]
# ## 3. A Megatron MLP: column-parallel, then row-parallel
#
# Write the head as $Y = \mathrm{relu}(XA)\,B$ with $A$ of shape 2,048×1,024 and $B$ of
# shape 1,024×10 (biases left out for the algebra). Split $A$ by **columns** into
# $[A_1, \dots, A_N]$ and $B$ by **rows** into $[B_1; \dots; B_N]$:
#
# $$Y = \mathrm{relu}(X[A_1,\dots,A_N])\,\begin{bmatrix}B_1\\ \vdots \\ B_N\end{bmatrix}
#     = \sum_{i=1}^{N} \mathrm{relu}(XA_i)\,B_i .$$
#
# - **Column-parallel `dense1`**: device $i$ holds $A_i$ (and its slice of the bias) and
#   computes $H_i = \mathrm{relu}(XA_i)$, its own 1,024/N hidden units. The ReLU acts on each
#   unit separately, so no device needs another device's units: no communication.
# - **Row-parallel `output`**: device $i$ holds $B_i$, the rows that multiply exactly its
#   hidden units, and computes $H_iB_i$, a *partial sum* of the full 10 logits. Adding the
#   N partial sums is the **one all-reduce** of the forward pass. The output bias is
#   replicated and added once, after the all-reduce.
#
# In the backward pass the mirror image happens: the gradient with respect to $X$ is a sum
# over all hidden units, so it needs one all-reduce too (Megatron's $f$ and $g$ operators).
# DTensor inserts both: you only declare the layouts.
#
# Like the `Dense(tf.Module)` of TensorFlow's DTensor tutorial, each layer is a small
# `tf.Module` whose weights are `dtensor.DVariable`s created from sharded values. The
# whole difference between the two layers is the layout of their weights.

# %% tags=["device-check"]
#@save
ACTIVATIONS = {None: tf.identity, "linear": tf.identity, "relu": tf.nn.relu, "gelu": tf.nn.gelu}


class ColumnParallelDense(tf.Module):
    """Dense layer split by columns: device i holds kernel[:, units_i] and bias[units_i].

    Layouts (b = ``batch_dim`` or unsharded): kernel [unsharded, model], bias [model],
    input [b, unsharded], output [b, model]. The forward pass needs no communication.
    """

    def __init__(self, kernel, bias, mesh, activation=None, model_dim="model", batch_dim=None, name=None):
        super().__init__(name=name)
        self.mesh, self.units = mesh, kernel.shape[1]
        check_divisible(self.units, mesh, model_dim, f"the {self.units} output units of {name}")
        self.kernel = dtensor.DVariable(shard(kernel, layout(mesh, None, model_dim)), name="kernel")
        self.bias = dtensor.DVariable(shard(bias, layout(mesh, model_dim)), name="bias")
        self.activation = ACTIVATIONS.get(activation, activation)
        self.input_layout = layout(mesh, batch_dim, None)

    def __call__(self, x):
        # Each device: its block of units for the whole (or its part of the) batch.
        return self.activation(tf.matmul(x, self.kernel) + self.bias)


class RowParallelDense(tf.Module):
    """Dense layer split by rows: device i holds kernel[units_i, :]; the bias is replicated.

    Layouts: kernel [model, unsharded], bias [unsharded], input [b, model] (what the
    column-parallel layer outputs), output [b, unsharded] after one all-reduce.
    """

    def __init__(self, kernel, bias, mesh, activation=None, model_dim="model", batch_dim=None, name=None):
        super().__init__(name=name)
        self.mesh, self.units = mesh, kernel.shape[1]
        check_divisible(kernel.shape[0], mesh, model_dim, f"the {kernel.shape[0]} input rows of {name}")
        self.kernel = dtensor.DVariable(shard(kernel, layout(mesh, model_dim, None)), name="kernel")
        self.bias = dtensor.DVariable(shard(bias, layout(mesh, None)), name="bias")
        self.activation = ACTIVATIONS.get(activation, activation)
        self.output_layout = layout(mesh, batch_dim, None)

    def __call__(self, x):
        # Each device multiplies its blocks (a partial sum H_i B_i); DTensor's expansion of
        # this matmul adds the partial sums over "model": the forward all-reduce.
        total = dtensor.relayout(tf.matmul(x, self.kernel), self.output_layout)
        return self.activation(total + self.bias)  # the bias is added once, after the sum


class ShardedMLP(tf.Module):
    """Megatron MLP: column-parallel dense (+ activation), then row-parallel dense.

    The hidden units stay split between the two layers: one all-reduce forward, one backward.
    """

    def __init__(self, column: ColumnParallelDense, row: RowParallelDense, name=None):
        super().__init__(name=name)
        self.column, self.row, self.mesh = column, row, column.mesh
        self.input_layout = column.input_layout

    @classmethod
    def from_keras(cls, dense1, dense2, mesh, dtype=None):
        """Shard two built Keras Dense layers (the second must be linear: logits)."""

        def weights(layer):
            return [np.asarray(w.numpy(), dtype or w.dtype) for w in (layer.kernel, layer.bias)]
        activation = dense1.get_config()["activation"]
        column = ColumnParallelDense(*weights(dense1), mesh, activation, name=dense1.name)
        return cls(column, RowParallelDense(*weights(dense2), mesh, name=dense2.name))

    @classmethod
    def create(cls, in_features, hidden, out_features, mesh, seed=0):
        """A new ReLU MLP (Glorot-uniform kernels, zero biases), the same for any mesh size."""
        rng = np.random.default_rng(seed)

        def glorot(n_in, n_out):
            limit = math.sqrt(6 / (n_in + n_out))
            return rng.uniform(-limit, limit, (n_in, n_out)).astype("float32")

        dense1, b1 = glorot(in_features, hidden), np.zeros(hidden, "float32")
        output, b2 = glorot(hidden, out_features), np.zeros(out_features, "float32")
        column = ColumnParallelDense(dense1, b1, mesh, "relu", name="dense1")
        return cls(column, RowParallelDense(output, b2, mesh, name="output"))

    def __call__(self, x):
        return self.row(self.column(x))

    def weights(self) -> dict:
        """``{"dense1/kernel": DVariable, ...}`` in Keras order."""
        return {f"{layer.name}/{w}": getattr(layer, w) for layer in (self.column, self.row)
                for w in ("kernel", "bias")}  # fmt: skip

    def get_weights(self) -> list:
        """The gathered weights, in the order of ``keras_model.get_weights()``."""
        return [to_numpy(w) for w in self.weights().values()]


# %% [markdown]
# Copy the Keras head's weights onto the mesh and read the layouts of the weights and of
# every tensor of one forward pass. The input batch goes onto the mesh with `shard()`,
# replicated: every device needs the whole input.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
mlp = ShardedMLP.from_keras(head.get_layer("dense1"), head.get_layer("output"), mesh)
print("weights:")
print(layout_table(mlp.weights()).to_string(index=False))
x_batch, y_batch = f_train[:BATCH], y_train[:BATCH]
xs = shard(x_batch, mlp.input_layout)
hidden = mlp.column(xs)
acts = {
    "input x": xs,
    "dense1 output (hidden)": hidden,
    "output matmul (all-reduced by DTensor)": tf.matmul(hidden, mlp.row.kernel),
    "logits": mlp(xs),
}
print("\nactivations for one batch:")
print(layout_table(acts).to_string(index=False))

# %% [markdown]
# Read the tables: `dense1/kernel` is `[unsharded, model]` and each device stores
# 2,048×(1,024/N) of it; the hidden activations are `[unsharded, model]` too, each device
# holding its own units for the whole batch; `output/kernel` is `[model, unsharded]`, cut
# along the same units. The output matmul's result is already `[unsharded, unsharded]`:
# DTensor expands a matmul whose shared axis is split into local matmuls plus an
# all-reduce, so every device ends with the full sum, and the logits stay that way.
#
# To *see* the all-reduce, do it by hand: take each device's block of the hidden units
# and of `output/kernel` (`dtensor.unpack`), multiply them on that device, and do not add
# the results. Each partial sum alone is far from the logits (when N > 1); their sum is
# the logits.

# %% tags=["device-check"]
hidden_blocks, kernel_blocks = dtensor.unpack(hidden), dtensor.unpack(mlp.row.kernel.read_value())
partials = []
for device, h_i, b_i in zip(mesh.local_devices(), hidden_blocks, kernel_blocks, strict=True):
    with tf.device(device):
        partials.append(tf.matmul(h_i, b_i).numpy())  # H_i B_i, on device i
logits, bias = to_numpy(acts["logits"]), to_numpy(mlp.row.bias)
for device, p in zip(mesh_table(mesh)["device"], partials, strict=True):
    print(f"{device}: partial sum alone, max |diff| to logits = {np.max(np.abs(p + bias - logits)):.3f}")
print(f"sum of partial sums, max |diff| to logits = {np.max(np.abs(sum(partials) + bias - logits)):.2e}")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
TOL = 1e-5  # relative: max |difference| / max |reference|
print("partial sums per device:", len(partials), "of shape", partials[0].shape)
print(
    f"sum of partial sums equals the logits within {TOL:g} (relative):",
    max_rel_diff(sum(partials) + bias, logits) <= TOL,
)

# %% [markdown]
# ## 4. Proofs: the split head computes what the one-device head computes
#
# Floating-point addition is not associative: the sharded head adds the 1,024 products of
# each logit in N groups and then adds the groups, the Keras head adds them in another
# order. Expect differences of a few float32 roundings (float32 keeps 24 significant bits, a
# relative precision of about 1e-7), not zero. Every comparison below is *relative*: the largest absolute
# difference divided by the largest absolute value of the one-device result, so the same
# tolerance works for logits and for the much smaller gradients of a mean loss. The
# tolerance, 1e-5, is about a hundred times float32's precision, and far below what a wrong shard, a
# missing all-reduce or a bias added N times produces (the partial sums above were off by
# a large fraction of the logits).
#
# ### Forward

# %% tags=["device-check"]
fwd_abs = max_abs_diff(to_numpy(mlp(xs)), head(x_batch))
fwd_rel = max_rel_diff(to_numpy(mlp(xs)), head(x_batch))
print(f"forward: max |sharded - one device| = {fwd_abs:.2e}, relative {fwd_rel:.2e} (tolerance {TOL:g})")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
ONE_DEVICE_NOTE = "(one device: nothing is split, so this checks only that the DTensor code runs)"
print(f"forward output equal to the one-device head within {TOL:g} (relative):", fwd_rel <= TOL)
if N == 1:
    print(ONE_DEVICE_NOTE)

# %% [markdown]
# ### Gradients, of the weights and of the input
#
# The loss is the mean softmax cross-entropy of integer labels. The next cell writes it
# once, for DTensors and ordinary tensors alike (notebook 08's language model uses the
# same function), with the compiled SGD step the training run below uses.

# %% tags=["device-check"]
#@save
def sparse_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of integer ``labels``; works on DTensors and tensors."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def make_sgd_step(module, learning_rate, loss_fn=sparse_cross_entropy):
    """A compiled ``step(x, y) -> loss`` doing plain SGD on ``module.trainable_variables``.

    For a sharded module every gradient has its weight's layout, so ``w -= lr * g`` runs
    block by block on the device that owns it. Works for ordinary Keras models too.
    """
    variables = module.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(module(x), y)  # forward (one all-reduce when sharded)
        grads = tape.gradient(loss, variables)  # backward (no all-reduce: weight gradients stay sharded)
        with tf.name_scope("update"):  # the profiler trace below finds the update by this name
            for var, grad in zip(variables, grads, strict=True):
                var.assign_sub(learning_rate * grad)  # update, where each block lives
        return loss

    return step


# %% [markdown]
# Compute the gradients of that loss with respect to every weight *and to the input
# batch* on both sides. The input gradient is where the backward all-reduce happens: each
# device can only compute the part of $\partial L/\partial X$ that flows through its own
# hidden units, and the sum of those parts is the gradient. DTensor gradients are computed
# inside `tf.function` (in eager mode DTensor cannot start the tape from a plain tensor);
# the labels go onto the mesh replicated.

# %% tags=["device-check"]
ys = shard(y_batch, layout(mesh, None))
weights = mlp.weights()


@tf.function
def loss_and_grads(x, y):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = sparse_cross_entropy(mlp(x), y)
    return loss, tape.gradient(loss, [x, *weights.values()])


x_ref = tf.constant(x_batch)
with tf.GradientTape() as tape:
    tape.watch(x_ref)
    ref_loss = sparse_cross_entropy(head(x_ref), y_batch)
ref_grads = dict(zip(["input x", *weights], tape.gradient(ref_loss, [x_ref, *head.trainable_variables]), strict=True))
loss, grads = loss_and_grads(xs, ys)
grads = dict(zip(["input x", *weights], grads, strict=True))
grad_diffs = {w: max_rel_diff(to_numpy(g), ref_grads[w]) for w, g in grads.items()}
grad_table = pd.DataFrame(
    {
        "gradient of": list(grads),
        "layout": [spec_string(g) for g in grads.values()],
        "max |gradient|": [f"{np.max(np.abs(ref_grads[w])):.2e}" for w in grads],
        "max |diff|": [f"{max_abs_diff(to_numpy(grads[w]), ref_grads[w]):.2e}" for w in grads],
        "relative": [f"{d:.2e}" for d in grad_diffs.values()],
    }
)
print(f"loss: sharded {float(to_numpy(loss)):.6f}, one device {float(ref_loss):.6f}")
print(grad_table.to_string(index=False))

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
print("input gradient layout:", spec_string(grads["input x"]), "(whole on every device: all-reduced)")
print(f"input gradient equal within {TOL:g} (relative):", grad_diffs["input x"] <= TOL)
for w in weights:
    same_layout = spec_string(grads[w]) == spec_string(weights[w])
    print(f"{w:14s} gradient sharded like its weight: {same_layout}; equal within {TOL:g}: {grad_diffs[w] <= TOL}")
print(f"loss equal within {TOL:g} (relative):", max_rel_diff(to_numpy(loss), ref_loss) <= TOL)
if N == 1:
    print(ONE_DEVICE_NOTE)

# %% [markdown]
# Each weight gradient comes out with its weight's layout, so the update `w -= lr * g`
# runs block by block on the device that owns it: no device ever holds a full gradient of
# a sharded weight. The input gradient is replicated: every device holds the sum of all
# devices' parts, the backward all-reduce that DTensor inserted, and it equals the
# one-device input gradient.
#
# ### A short training run, step for step
#
# Train two copies from the same starting weights on the same batches with plain SGD and
# the same compiled step (`make_sgd_step`): the Keras head on one device, and the sharded
# head. After every step, record both losses, the largest relative difference over *all*
# weights, and the time of each step.
#
# Run it twice. First in **float64** (both heads copied to float64): here rounding is about
# 1e-16, so any real disagreement between the two programs would stand out at once. Then
# in **float32**, the precision you actually train in.

# %%
LR = 0.05
batches = [(f_train[i * BATCH : (i + 1) * BATCH], y_train[i * BATCH : (i + 1) * BATCH]) for i in range(STEPS)]


def head_copy(dtype: str) -> keras.Model:
    """The wide head with the same starting weights, in ``dtype``."""
    layers = [keras.layers.Dense.from_config({**layer.get_config(), "dtype": dtype}) for layer in head.layers]
    copy = keras.Sequential([keras.Input((IN_FEATURES,), dtype=dtype), *layers])
    copy.set_weights([w.astype(dtype) for w in head.get_weights()])
    return copy


def train_side_by_side(ref_head: keras.Model, sharded: ShardedMLP, dtype: str) -> pd.DataFrame:
    """SGD on both heads, batch by batch; one row per step."""
    ref_step, sharded_step = make_sgd_step(ref_head, LR), make_sgd_step(sharded, LR)
    rows = []
    for i, (x, y) in enumerate(batches):
        x = tf.constant(x.astype(dtype))
        xs, ys = shard(x, sharded.input_layout), shard(y, layout(mesh, None))  # not timed
        t0 = time.perf_counter()
        ref_loss = float(ref_step(x, y))  # one device
        t1 = time.perf_counter()
        loss = float(to_numpy(sharded_step(xs, ys)))  # the mesh
        t2 = time.perf_counter()
        w_diff = max_rel_diff(sharded.get_weights(), ref_head.get_weights())
        rows.append({"step": i, "loss one device": ref_loss, "loss sharded": loss,
                     "|loss diff|": abs(loss - ref_loss), "weights rel diff": w_diff,
                     "s one device": t1 - t0, "s sharded": t2 - t1})  # fmt: skip
    return pd.DataFrame(rows)


runs = {}
for dtype in ["float64", "float32"]:
    ref_head = head_copy(dtype)
    train_mlp = ShardedMLP.from_keras(ref_head.get_layer("dense1"), ref_head.get_layer("output"), mesh)
    runs[dtype] = (train_side_by_side(ref_head, train_mlp, dtype), ref_head, train_mlp)
    log = runs[dtype][0]
    print(
        f"{dtype}: {STEPS} steps of batch {BATCH}, loss {log['loss one device'].iloc[0]:.4f} -> "
        f"{log['loss one device'].iloc[-1]:.4f}; max |loss diff| {log['|loss diff|'].max():.2e}; "
        f"weights: max relative diff {log['weights rel diff'].max():.2e}"
    )
columns = ["step", "loss one device", "loss sharded", "|loss diff|", "weights rel diff"]
print(runs["float32"][0].iloc[sorted({0, 1, 2, STEPS - 1})][columns].to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
log64, log32 = runs["float64"][0], runs["float32"][0]
TOL_LOSS, TOL_W64 = 1e-6, 1e-12
print(
    f"float64 losses equal step for step within {TOL_LOSS:g} (relative):",
    bool((log64["|loss diff|"] / log64["loss one device"]).max() <= TOL_LOSS),
)
print(f"float64 weights equal after every step within {TOL_W64:g} (relative):", bool(log64["weights rel diff"].max() <= TOL_W64))
print("the loss went down:", log64["loss sharded"].iloc[-1] < log64["loss sharded"].iloc[0])
if N == 1:
    print(ONE_DEVICE_NOTE)

# %%
print(f"float32 weights equal after every step within {TOL:g} (relative):", bool(log32["weights rel diff"].max() <= TOL))

# %% [markdown]
# In float64 the two programs agree to float64 rounding after every step: they compute the
# same function, gradients and updates. In float32 the two cells above print the largest
# relative weight difference of the run and whether it stays within the 1e-5 tolerance;
# the plot below shows it step by step. Do not expect bit-for-bit agreement in float32:
# the two programs add in different orders, so their roundings differ, and training can
# carry such differences forward. A sharding error would show up in float64 too, which is
# what the float64 run rules out.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(log32["loss one device"], label="one device", lw=3, alpha=0.5)
ax1.plot(log32["loss sharded"], "--", label=f"sharded over {N} devices (DTensor)")
ax1.set(xlabel="step", ylabel="training loss", title=f"Wide head on {cifar.label}, float32")
ax1.legend()
for dtype, (log, _, _) in runs.items():
    ax2.semilogy(np.maximum(log["weights rel diff"], 1e-18), ".-", label=dtype)
ax2.set(xlabel="step", ylabel="max relative weight difference", title="Sharded vs one device")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The float32 heads, trained side by side, also agree on the test set (the trunk is frozen
# at random initial weights, so the accuracy itself is modest: the point is that both heads
# give the same answers). The step times compare like with like: both steps are the same
# compiled `make_sgd_step` on the same batch, one on one device and one on the mesh.

# %%
_, ref_head, train_mlp = runs["float32"]
ref_pred = np.argmax(ref_head(f_test), axis=1)
tp_pred = np.argmax(to_numpy(train_mlp(shard(f_test, train_mlp.input_layout))), axis=1)
print(f"test accuracy: one device {np.mean(ref_pred == y_test):.3f}, sharded {np.mean(tp_pred == y_test):.3f}")
print(f"same predicted class on {np.mean(ref_pred == tp_pred):.2%} of {len(y_test):,} test images")
steady = log32.iloc[1:] if STEPS > 1 else log32  # step 0 includes tracing and compiling
print(
    f"time per compiled float32 step, batch {BATCH}: one device {1e3 * steady['s one device'].median():.1f} ms, "
    f"sharded over {N} {1e3 * steady['s sharded'].median():.1f} ms (median over steps after the first)"
)

# %% [markdown]
# Whatever the two step times show, they are not a speed-up measurement. The logical CPUs
# are slices of the same 2 cores: the sharded step does the same arithmetic on the same
# cores, split into N smaller matmuls, plus the all-reduces, and how TensorFlow schedules
# N logical devices' ops on 2 cores decides the rest. What the logical devices show is the *semantics*: who
# stores what, and where the communication is. On real GPUs each device has its own
# memory and compute, so the per-device weights shrink by N and the matmuls run N-way in
# parallel, while each forward all-reduce moves batch × 10 floats.
#
# ### What ran: one step under the profiler
#
# Step times say how long; the TensorFlow profiler says what ran, when, on which thread.
# `trace_step` runs a compiled step a few times (the first traces and compiles it), then a
# few more times, each under `tf.profiler.experimental`, which writes a trace under
# `runs/07_tensor_parallelism/profile` (`runs/` is ignored by git), and keeps the run with
# the median wall time. `read_ops` reads every op back from the trace file with notebook
# 06's `read_trace` and names each op's phase from its name and type: ops the
# `GradientTape` added are called `gradient_tape/...` (backward), `make_sgd_step` runs its
# update under the name scope `update`, collective ops are the all-reduces (communicate),
# and the rest is the forward pass. Notebook 08 reads its mesh step the same way.

# %%
#@save
import re
import shutil

import matplotlib.patches

from utils.lessons.pipeline_parallelism import read_trace

UPDATE_SCOPE = re.compile(r"(^|/)update(_\d+)*/")  # the step's update scope; Keras: adam/update_3/...
PACKING = re.compile(r"(^|/)(adam|sgd)/(concat|split)")  # Keras packs gradients into one all-reduce
PHASE_COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "communicate": "#C44E52", "update": "#55A868"}


def phase_of(name, op_type):
    """The phase of a training step an op belongs to, read from its name and type."""
    if op_type.startswith("Collective") or "AllReduce" in name or PACKING.search(name):
        return "communicate"  # the all-reduces, with the ops that pack and unpack their buffers
    if "gradient_tape/" in name:  # ops the GradientTape added for the backward pass
        return "backward"
    if UPDATE_SCOPE.search(name) or op_type.startswith(("Assign", "ResourceApply")):
        return "update"
    return "forward"


def trace_step(step, args, logdir, warmup=3, repeats=5):
    """Every op of one run of step(*args), read from a profiler trace.

    Of `repeats` runs, each traced into its own folder under logdir after `warmup` untimed
    runs, the one with the median wall time (a single run varies on a shared machine).
    Returns DataFrame(thread, name, type, phase, start_ms, end_ms), times from the first op.
    """
    for _ in range(warmup):  # 1. warm-up: trace, compile, settle
        to_numpy(step(*args))
    runs = []
    for k in range(repeats):
        shutil.rmtree(f"{logdir}/{k}", ignore_errors=True)  # one trace per folder
        tf.profiler.experimental.start(f"{logdir}/{k}")  # 2. one run under the profiler
        to_numpy(step(*args))  # reading the loss waits for the whole step
        tf.profiler.experimental.stop()
        runs.append(read_ops(f"{logdir}/{k}"))  # 3. the ops, read back from the trace file
    return sorted(runs, key=lambda ops: ops["end_ms"].max())[len(runs) // 2]


def read_ops(trace_dir):
    """Notebook 06's read_trace, each op with its phase: DataFrame(thread, name, type, phase, start_ms, end_ms)."""
    ops = read_trace(trace_dir)
    ops.insert(3, "phase", [phase_of(name, op_type) for name, op_type in zip(ops["name"], ops["type"], strict=True)])
    return ops


def phase_table(ops):
    """Ops and op time per phase (summed over threads), the wall time of the step, and how
    many ops ran at once on average (summed op time / wall time): (DataFrame, wall_ms, parallel)."""
    ms = ops["end_ms"] - ops["start_ms"]
    table = ops.assign(ms=ms).groupby("phase")["ms"].agg(ops="count", op_ms="sum")
    table["share"] = table["op_ms"] / table["op_ms"].sum()
    wall = ops["end_ms"].max() - ops["start_ms"].min()
    return table.reindex([p for p in PHASE_COLORS if p in table.index]), wall, ms.sum() / wall


def plot_timeline(ops, ax, title):
    """What ran: one row per thread (in order of its first op), each op a bar in its phase's colour."""
    threads = list(ops.groupby("thread")["start_ms"].min().sort_values().index)
    for row, thread in enumerate(threads):
        for phase, group in ops[ops["thread"] == thread].groupby("phase"):
            ax.broken_barh(list(zip(group["start_ms"], group["end_ms"] - group["start_ms"], strict=True)),
                           (row - 0.4, 0.8), facecolors=PHASE_COLORS[phase])
    ax.set_yticks(range(len(threads)), [f"thread {i}" for i in range(len(threads))])
    ax.invert_yaxis()
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=p) for p, c in PHASE_COLORS.items()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set(xlabel="time (ms)", title=title)


# %% [markdown]
# Trace one float32 step of each head, on the same batch, from fresh copies of the
# starting weights (the trained heads above stay as they are):

# %%
PROFILE_DIR = config.run_dir("07_tensor_parallelism") / "profile"
x_step, y_step = batches[0]
profile_head = head_copy("float32")
profile_mlp = ShardedMLP.from_keras(profile_head.get_layer("dense1"), profile_head.get_layer("output"), mesh)
sides = {
    "one device": (profile_head, (tf.constant(x_step), y_step)),
    f"sharded over {N}": (profile_mlp, (shard(x_step, profile_mlp.input_layout), shard(y_step, layout(mesh, None)))),
}
step_traces = {}
with config.quiet_tf_logs():
    for label, (module, args) in sides.items():
        step_traces[label] = trace_step(make_sgd_step(module, LR), args, PROFILE_DIR / label.split()[0])
for label, ops in step_traces.items():
    table, wall, parallel = phase_table(ops)
    print(f"{label}: {len(ops)} ops on {ops['thread'].nunique()} threads, wall {wall:.2f} ms, "
          f"{parallel:.2f} ops at once on average")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"), end="\n\n")
sharded_ops = step_traces[f"sharded over {N}"]
comm = sharded_ops[sharded_ops["phase"] == "communicate"]
n_collective = int((comm["type"] == "CollectiveReduceV2").sum())
print("communicate ops of the sharded step, by type:", comm.groupby("type").size().to_dict())
print(f"collective ops: {n_collective} = {N} device(s) x {n_collective / N:g} all-reduce(s) per step")

# %%
fig, axes = plt.subplots(len(step_traces), 1, figsize=(12, 1.2 + 0.5 * sum(o["thread"].nunique() for o in step_traces.values())))
for ax, (label, ops) in zip(axes, step_traces.items(), strict=True):
    plot_timeline(ops, ax, f"what ran: one SGD step of the head, {label} (profiler trace)")
    ax.set_xlim(0, max(o["end_ms"].max() for o in step_traces.values()))  # one time scale
plt.tight_layout()
plt.show()

# %% [markdown]
# How to read the tables and the timelines:
#
# - **Threads, not devices.** Logical CPUs share TensorFlow's thread pools, so a row is a
#   thread of that pool. An op's bar covers the time it took, including time spent
#   waiting for the shared cores; several bars at the same moment mean ops of different
#   devices running at once, which is how the executor runs the N shards' matmuls.
# - **Communicate** is the all-reduce the layouts imply: the forward pass sums the
#   row-parallel layer's partial logits. The backward pass needs none in this step: the
#   weight gradients stay sharded like their weights, and the step does not ask for the
#   gradient of its input (the proof above did, and that cost the second all-reduce). A
#   collective op waits for every device's part to arrive, so its bar also holds the wait
#   for the slowest device: on real devices this is the time to look at first.
# - **Update** is the `w -= lr * g` of every block, where the block lives; the sharded
#   side has N times as many update ops, each on a block N times smaller.
#
# On GPUs the same trace has one plane per GPU (`/device:GPU:0`, ...), whose kernels give
# each device's own busy time. TensorBoard's profile view opens these traces too
# (`requirements-profile.txt`, see the README).
#
# ## 5. Memory: bytes per device
#
# `bytes_per_device()` reads the shape of every block each device actually stores
# (`dtensor.unpack`) and multiplies by the bytes per value (4 for float32). The last column
# is the largest per-device share divided by the unsharded size: 1/N for a split weight, 1
# for the replicated output bias.


# %%
def bytes_per_device(named: dict) -> pd.DataFrame:
    """Bytes each device stores per named weight, from the actual block shapes, plus a TOTAL row."""
    rows = []
    for name, w in named.items():
        row = {"weight": name, "global shape": str(tuple(w.shape)), "sharding": spec_string(w)}
        row.update({device: math.prod(shape) * w.dtype.size for device, shape in shard_shapes(w)})
        rows.append({**row, "total": math.prod(w.shape) * w.dtype.size})
    table = pd.DataFrame(rows)
    numbers = table.columns[3:]
    table.loc[len(table)] = {"weight": "TOTAL", "global shape": "", "sharding": "", **table[numbers].sum()}
    table["per device / total"] = (table[numbers[:-1]].max(axis=1) / table["total"]).map("{:.3f}".format)
    return table


# %%
# NBVAL_CHECK_OUTPUT
print(bytes_per_device(mlp.weights()).to_string(index=False))

# %% [markdown]
# The same head on every mesh size that divides its hidden units (up to the devices found):

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for n in [d for d in range(1, N + 1) if HIDDEN % d == 0]:
    table = bytes_per_device(ShardedMLP.from_keras(head.get_layer("dense1"), head.get_layer("output"), model_mesh(n)).weights())
    per_device, total = table.iloc[-1, 3 : 3 + n].max(), table.iloc[-1]["total"]
    rows.append({"N": n, "bytes per device": per_device, "unsharded bytes": total, "total / N": total // n,
                 "per device / (total / N)": f"{per_device / (total / n):.4f}"})  # fmt: skip
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# The weights per device fall as total/N; the small excess over exactly 1/N is the output
# bias that every device keeps a full copy of. The same split applies to everything
# shaped like a weight: its gradient (shown above) and optimizer state (Adam keeps two more
# tensors per weight, laid out like it). Activations split too: each device holds its
# batch × 1,024/N slice of the hidden layer. The input features and the logits stay
# replicated; for a head this size that is small.
#
# ### When N does not divide the dimension
#
# DTensor only knows equal shards. The 10 classes of the output layer cannot be split
# over 4 devices by columns, and the column-parallel layer refuses to build with an error
# that says what to do:

# %%
# NBVAL_CHECK_OUTPUT
k_out, b_out = head.get_layer("output").get_weights()
try:
    ColumnParallelDense(k_out, b_out, mesh, name="output")
    print(f"no error: {CLASSES} is divisible by {N}")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# The fix that keeps any N is **padding**: add zero columns until the size divides
# (10 → 12 for N = 4), shard, and slice the padding off the output before anything
# looks at it. For logits the slicing is essential: a padded logit of 0 would still get
# probability mass in a softmax. Megatron pads its vocabulary the same way. Exercise 1
# does it. The other fix is to choose the size from N, as this notebook does for the
# hidden units.
#
# ## 6. Convolutions
#
# A convolution's filter has shape $k_h \times k_w \times c_{in} \times c_{out}$. Three
# ways to split it:
#
# - **over output channels** (like column-parallel): every device gets the whole input and
#   a slice of the filters, and computes its own output channels. The next convolution
#   needs all channels, so the slices are gathered (concatenated);
# - **over input channels** (like row-parallel): every device sees its slice of the input
#   channels and the matching filter slice; the outputs are partial sums, added by an
#   all-reduce;
# - **spatially**: every device takes a band of image rows. A 3×3 filter at the edge of a
#   band needs one row from the neighbour (a *halo*), exchanged before each convolution.
#   This pays off for very large images, where activations rather than weights fill memory.
#
# DTensor's convolution only supports replicated filters. Ask it for a filter split over
# output channels (on a mesh of as many devices as the 32 filters split over) and it
# refuses:

# %%
# NBVAL_CHECK_OUTPUT
conv1 = trunk.get_layer("conv1")
conv_n = max(n for n in range(1, N + 1) if conv1.filters % n == 0)  # devices that 32 filters split over
conv_mesh = model_mesh(conv_n)
images = data.to_float(cifar.x_test[:BATCH])
x_mesh = shard(images, layout(conv_mesh, None, None, None, None))
filt = shard(conv1.kernel.numpy(), layout(conv_mesh, None, None, None, "model"))
try:
    tf.nn.conv2d(x_mesh, filt, strides=1, padding="VALID")
    print("DTensor accepted a filter split over output channels")
except Exception as err:  # DTensor reports it as an UnknownError from its SPMD expansion
    found = re.search(r"Filter for convolution must have [a-z ]+ layout", str(err))
    print(type(err).__name__ + ":", found.group(0) if found else str(err).splitlines()[0])

# %% [markdown]
# So split it by hand, with `tf.device` instead of layouts: each device keeps an ordinary
# `tf.Variable` slice of the filters and of the bias, convolves the whole input with its
# slice, and the outputs are concatenated on the first device. Gradients flow through
# ordinary autodiff. `conv1` has 32 filters, so it uses the largest number of devices that
# divides 32 (all of them on 1, 2, 4 or 8 devices).


# %%
def split_filters(conv: keras.layers.Conv2D, conv_devices: list) -> list:
    """One (kernel, bias) slice of the output channels per device, as tf.Variables there."""
    n = len(conv_devices)
    kernels, biases = np.split(conv.kernel.numpy(), n, axis=-1), np.split(conv.bias.numpy(), n)
    slices = []
    for device, k, b in zip(conv_devices, kernels, biases, strict=True):
        with tf.device(device):
            slices.append((tf.Variable(k, name="kernel"), tf.Variable(b, name="bias")))
    return slices


def channel_split_conv(conv: keras.layers.Conv2D, slices: list, conv_devices: list, x):
    """Every device convolves the whole input with its filters; gather the channels on the first."""
    parts = []
    for device, (k, b) in zip(conv_devices, slices, strict=True):
        with tf.device(device):  # this device's output channels
            parts.append(conv.activation(tf.nn.conv2d(x, k, conv.strides, conv.padding.upper()) + b))
    with tf.device(conv_devices[0]):  # the gather
        return tf.concat(parts, axis=-1), parts


# %%
# NBVAL_CHECK_OUTPUT
conv_devices = available[:conv_n]
conv_slices = split_filters(conv1, conv_devices)
why = "" if conv_n == N else f" (the most of the {N} devices that {conv1.filters} splits over)"
print(f"{conv1.filters} filters over {conv_n} devices{why}:")
print(pd.DataFrame([{"device": short, "kernel slice": tuple(k.shape), "bias slice": tuple(b.shape)}
                    for short, (k, b) in zip(map(devices.short_device, conv_devices), conv_slices, strict=True)]).to_string(index=False))  # fmt: skip
out, parts = channel_split_conv(conv1, conv_slices, conv_devices, images)
print("\nper-device outputs:", [tuple(p.shape) for p in parts], "-> concatenated:", tuple(out.shape))

# %% [markdown]
# Compare the output and the gradients with `conv1` on one device. The bias gradient adds
# up batch × 30 × 30 = 115,200 values per channel, and the two programs may add them in
# different orders (the reduction is laid out differently for a slice of the channels than
# for all 32); for a sum that long, allow 1e-4 relative instead of 1e-5.

# %%
TOL_SUM = 1e-4  # for gradients that sum over the whole batch and every pixel
with tf.GradientTape() as tape:
    ref_out = conv1(images)
    ref_conv_loss = tf.reduce_mean(ref_out**2)
ref_conv_grads = tape.gradient(ref_conv_loss, [conv1.kernel, conv1.bias])
with tf.GradientTape() as tape:
    out, _ = channel_split_conv(conv1, conv_slices, conv_devices, images)
    conv_loss = tf.reduce_mean(out**2)
g_kernels, g_biases = zip(*tape.gradient(conv_loss, conv_slices), strict=True)
conv_pairs = {
    "output": (out, ref_out),
    "kernel gradient": (np.concatenate(g_kernels, axis=-1), ref_conv_grads[0]),
    "bias gradient": (np.concatenate(g_biases), ref_conv_grads[1]),
}
conv_diffs = {name: max_rel_diff(a, b) for name, (a, b) in conv_pairs.items()}
for name, (a, b) in conv_pairs.items():
    print(f"conv1 {name}: max |sharded - one device| = {max_abs_diff(a, b):.2e}, relative {conv_diffs[name]:.2e}")

# %%
# NBVAL_CHECK_OUTPUT
conv_tols = {"output": TOL, "kernel gradient": TOL_SUM, "bias gradient": TOL_SUM}
for name, diff in conv_diffs.items():
    print(f"channel-split conv1 {name} equal within {conv_tols[name]:g} (relative):", diff <= conv_tols[name])

# %% [markdown]
# Splitting over output channels changes no arithmetic in the forward pass (each output
# channel depends on its own filter only); only the order of the long sums in the
# gradients can differ. The price is communication: every device needs the whole input,
# and the outputs are gathered afterwards.
#
# ## 7. The same code on real GPUs
#
# Nothing above names a CPU. `utils.devices.compute_devices()` returns the GPUs when
# there are any, `model_mesh()` builds the mesh from them, `shard()` sends each GPU its
# block, and DTensor runs the all-reduce with the GPUs' collective operations. Run this
# notebook on a machine with several GPUs and the tables show `GPU:0`, `GPU:1`, …; it
# picks the hidden size from the number of GPUs as it did above. On a single GPU the
# mesh has one device and nothing is split (the cell that chooses N says so). The
# committed outputs come from logical CPUs; the GPU run has not been measured yet.
# Tensor parallelism communicates in every layer, forward and backward, so it is used
# inside one server whose GPUs are joined by a fast link (NVLink); across servers you
# combine it with data or pipeline parallelism (the hybrid-parallelism notebook).

# %% [markdown]
# ## Summary
#
# - A DTensor **mesh** names the devices' grid (`model=N`); a **layout**
#   (`dtensor.Layout`) gives every tensor axis a **sharding spec**: a mesh dim name to
#   split it, or `unsharded`. The notebook picked N from the devices it found and a hidden
#   size that N divides; on one device nothing is split.
# - A Megatron MLP splits the first dense layer by columns and the second by rows, two
#   small `tf.Module`s whose `DVariable`s differ only in layout. The hidden activations
#   stay split between them; the forward pass needs exactly one all-reduce (the partial
#   sums of the second layer), the backward pass one more (the input gradient).
# - The sharded head matched the one-device Keras head: forward outputs, weight gradients
#   and the input gradient within 1e-5 relative to their size, and a float64 training run
#   agreed to float64 rounding after every step. For the float32 run, the cells above
#   print the largest relative weight difference and the check against 1e-5.
# - Each device stores total/N of every split weight (plus the small replicated bias),
#   read from the actual shards; gradients and optimizer state split the same way.
# - N must divide the split dimension: pad (and slice off) otherwise.
# - DTensor refuses convolution filters split over output channels, so the notebook splits
#   them by hand with `tf.device` and a concatenation, again equal to one device within
#   the stated tolerances.
# - Logical CPUs are slices of the same 2 cores: this notebook shows correctness and
#   memory layout, not speed. On GPUs the same code divides weights and matmul work by N.

# %% [markdown]
# ## Exercises
#
# **1. Pad the output layer.** Make the 10-class output layer column-parallel on the mesh
# by padding it with zero columns up to a multiple of N. Check that the first 10 of the
# padded outputs equal the Keras output layer's logits.

# %%
# Try it: set `padded` to 10 rounded up to a multiple of N, pad the kernel and bias with zeros.
padded = CLASSES  # TODO: round up to a multiple of N
print("padded size:", padded, "- divisible by N:", padded % N == 0)

# %% jupyter={"source_hidden": true}
# Solution 1
padded = -(-CLASSES // N) * N  # round 10 up to a multiple of N
k_pad = np.concatenate([k_out, np.zeros((HIDDEN, padded - CLASSES), np.float32)], axis=1)
b_pad = np.concatenate([b_out, np.zeros(padded - CLASSES, np.float32)])
padded_out = ColumnParallelDense(k_pad, b_pad, mesh, name="output_padded")
h = head.get_layer("dense1")(x_batch).numpy()
logits_padded = to_numpy(padded_out(shard(h, padded_out.input_layout)))
print("padded kernel shard shapes:", sorted({s for _, s in shard_shapes(padded_out.kernel)}))
diff = max_rel_diff(logits_padded[:, :CLASSES], head.get_layer("output")(h))
print(f"first {CLASSES} padded logits equal within {TOL:g} (relative):", diff <= TOL)

# %% [markdown]
# **2. Count the communication.** For a batch of $b$ images, how many floats does the
# forward all-reduce of the head add up, and how does that compare with the number of
# weights of `dense1` that no longer need to be copied to every device? Compute both.

# %%
# Try it: fill in the two counts.
allreduce_floats = 0  # TODO: the partial logits of one batch
dense1_saved = 0  # TODO: dense1 weights a device no longer stores
print("forward all-reduce floats:", allreduce_floats, "- dense1 weights saved per device:", dense1_saved)

# %% jupyter={"source_hidden": true}
# Solution 2
allreduce_floats = BATCH * CLASSES  # the partial logits every device contributes
dense1_params = IN_FEATURES * HIDDEN + HIDDEN
dense1_saved = dense1_params - dense1_params // N  # what each device no longer stores
print(f"forward all-reduce: {allreduce_floats:,} floats per batch of {BATCH}")
print(f"dense1 weights each device no longer stores (N={N}): {dense1_saved:,} floats")
print(f"(the backward all-reduce of the input gradient adds b x 2,048 = {BATCH * IN_FEATURES:,} floats)")

# %% [markdown]
# **3. Split a convolution over input channels.** Split `conv1`'s filter over its 3 input
# channels (on up to 3 devices), convolve each device's input channels with its filter
# slice, and add the partial outputs. Check that the sum plus the bias equals `conv1`'s
# output before its ReLU.

# %%
# Try it: one group of input channels per device, then add the partial outputs.
n_in = min(3, N)
groups = np.array_split(np.arange(3), n_in)  # input channels per device
print("input channels per device:", [g.tolist() for g in groups])

# %% jupyter={"source_hidden": true}
# Solution 3
n_in = min(3, N)
kernel, conv_bias = conv1.get_weights()
groups = np.array_split(np.arange(3), n_in)
partial_outs = []
for device, channels in zip(available[:n_in], groups, strict=True):
    with tf.device(device):
        partial_outs.append(tf.nn.conv2d(tf.gather(images, channels, axis=-1), kernel[:, :, channels, :], 1, "VALID"))
with tf.device(available[0]):
    summed = tf.add_n([tf.identity(p) for p in partial_outs]) + conv_bias
pre_relu = tf.nn.conv2d(images, kernel, 1, "VALID") + conv_bias
print("partial outputs:", len(partial_outs), "x", tuple(partial_outs[0].shape))
print(f"sum of input-channel partials equal within {TOL:g} (relative):", max_rel_diff(summed, pre_relu) <= TOL)

# %% [markdown]
# ## Further reading
#
# - M. Shoeybi et al., *Megatron-LM: Training Multi-Billion Parameter Language Models Using
#   Model Parallelism*, 2019, [arXiv:1909.08053](https://arxiv.org/abs/1909.08053): the
#   column/row split of the MLP and its $f$/$g$ all-reduces.
# - D. Narayanan et al., *Efficient Large-Scale Language Model Training on GPU Clusters Using
#   Megatron-LM*, SC 2021, [arXiv:2104.04473](https://arxiv.org/abs/2104.04473): tensor
#   parallelism inside a server, combined with pipeline and data parallelism.
# - N. Shazeer et al., *Mesh-TensorFlow: Deep Learning for Supercomputers*, NeurIPS 2018,
#   [arXiv:1811.02084](https://arxiv.org/abs/1811.02084): meshes and named layouts, the
#   ideas DTensor is built on.
# - Y. Xu et al., *GSPMD: General and Scalable Parallelization for ML Computation Graphs*,
#   2021, [arXiv:2105.04663](https://arxiv.org/abs/2105.04663): sharding annotations and
#   automatic SPMD partitioning.
# - N. Dryden et al., *Channel and Filter Parallelism for Large-Scale CNN Training*, SC 2019:
#   splitting convolutions over channels and filters, and spatially.
# - TensorFlow guides: [DTensor concepts](https://www.tensorflow.org/guide/dtensor_overview)
#   and [Distributed training with DTensors](https://www.tensorflow.org/tutorials/distribute/dtensor_ml_tutorial).
