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
# # 08 · Hybrid parallelism and very large models
#
# Data parallelism copies the whole model to every device; tensor parallelism splits each
# layer. Real large-model training does both at once, on a 2-D grid of devices: one axis
# splits the batch, the other splits the layers. This notebook builds that grid with
# DTensor, writes the CNN, its optimizer and a transformer block for it, trains them, and
# then steps back to count bytes: how much memory a 1-billion or 175-billion parameter
# model needs per device under each strategy, and what mixed precision and activation
# recomputation buy.
#
# **What you will learn**
#
# - how to lay devices out as a 2-D `batch × model` mesh, and what goes on each axis;
# - how to write the CNN with a data-parallel convolutional trunk and a tensor-parallel
#   dense head, and Adam for sharded weights, and prove their first steps equal to plain
#   data parallelism;
# - how per-device memory and throughput change across mesh shapes;
# - how Megatron-LM shards a decoder-only transformer block (attention heads, then a
#   column- then row-parallel MLP) and how to prove it equal to an unsharded Keras block;
# - how to count parameter, gradient, optimizer and activation bytes under data, tensor and
#   pipeline parallelism and ZeRO 1–3, reproduce figure 1 of the ZeRO paper, and find the
#   smallest layout that fits a model on devices of a given size;
# - what mixed precision and `tf.recompute_grad` save in memory and cost in time, measured.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 1.4 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 27 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup

# %% tags=["device-check"]
import os

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # CPU memory peaks for section 4

import utils  # noqa: F401, E402  (quiets TensorFlow's C++ start-up log)
from utils import config, data, devices
from utils.lessons.training import choose_precision, precision_policy
from utils.lessons.mirrored_strategy import max_abs_diff, max_rel_diff

import math
import time

import matplotlib.pyplot as plt
import pandas as pd

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
print("mode:", config.get_mode())
S = config.sizes()
pd.set_option("display.width", 140)

# %% tags=["device-check"]
cifar = data.load_cifar10(allow_synthetic=config.is_smoke(), n_train=S.n_train, n_test=S.n_test)
print(cifar.describe())

# %% [markdown]
# ## 1. A 2-D mesh: data parallel × tensor parallel
#
# A DTensor mesh names its axes. Here there are two: `batch` (devices that hold different
# examples, i.e. data parallelism) and `model` (devices that hold different slices of a
# layer, i.e. tensor parallelism). With 4 devices the possible shapes are 4×1 (pure data
# parallelism), 2×2 (both) and 1×4 (pure tensor parallelism). Every device of a `model`
# group sees the same examples; every device of a `batch` group holds the same slices.
#
# On this machine the devices are logical CPUs that share the same 2 cores: you see the
# semantics of the layout (who holds what, what is communicated, whether the numbers
# match), not a speed-up. On a machine with GPUs the same code uses the GPUs.

# %% tags=["device-check"]
#@save
import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from utils import devices, memory, models
from utils.lessons import tensor_parallelism as tp


def mesh_shapes(n_devices):
    """Every (batch, model) shape that uses exactly `n_devices` devices: 4 -> 4x1, 2x2, 1x4."""
    return [(n_devices // m, m) for m in range(1, n_devices + 1) if n_devices % m == 0]


def hybrid_mesh(batch, model):
    """A 2-D mesh: `batch` devices along "batch" (data parallel) x `model` along "model"."""
    return tp.create_mesh([("batch", batch), ("model", model)])  # the first batch*model devices


def replicated(mesh, rank):
    """The layout of a tensor every device holds whole."""
    return tp.layout(mesh, *[None] * rank)


def batch_to_mesh(mesh, *arrays):
    """Shard each array on its first axis over "batch"; "model" groups get the same rows."""
    return tuple(tp.shard(np.asarray(a), tp.layout(mesh, "batch", *[None] * (np.ndim(a) - 1)))
                 for a in arrays)


def multiple_of(value, k):
    """The multiple of `k` nearest to `value` (at least `k`): 128 over 3 devices -> 129."""
    return k * max(1, round(value / k))


# %% [markdown]
# The mesh shape, the batch and the layer widths must divide the number of devices this
# kernel has. The cell below picks them from the device count it finds and says why.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
n_devices = len(devices.compute_devices())
shapes = mesh_shapes(n_devices)
batch_size_mesh, model_size_mesh = shapes[len(shapes) // 2]  # the most "square" one
global_batch = multiple_of(128, n_devices)  # splits over every mesh shape's "batch" axis
head_units = multiple_of(1024, n_devices)  # splits over every mesh shape's "model" axis
print(f"{n_devices} device(s); mesh shapes (batch x model) that use all of them: {shapes}")
print(f"chosen: {batch_size_mesh}x{model_size_mesh} (the most square); global batch "
      f"{global_batch} and head width {head_units}: multiples of {n_devices} nearest to 128 and 1024")
if n_devices == 1:
    print("1 device: nothing is split. Every layout below is 'unsharded', and the checks "
          "compare this code with Keras on the same device: no communication is tested.")
mesh = hybrid_mesh(batch_size_mesh, model_size_mesh)
print(tp.mesh_table(mesh).to_string(index=False))

# %% [markdown]
# ### The CNN with a widened head
#
# The seed CNN has most of its parameters in `dense1`. Widen that layer from 128 to about
# a thousand units (the width chosen above) and the head holds almost all of the
# parameters while the convolutions still do most of the arithmetic: the classic case for
# splitting the head and replicating the trunk.

# %% tags=["device-check"]
#@save
def widened_cnn(head_units=1024):
    """The seed CNN (`utils.models.build_seed_cnn`) with `dense1` widened to `head_units`."""
    config = models.build_seed_cnn().get_config()
    config["name"] = "widened_cnn"
    for layer in config["layers"]:
        layer.pop("build_config", None)  # shapes change with the head; rebuilt below
        if layer.get("config", {}).get("name") == "dense1":
            layer["config"]["units"] = head_units
    model = keras.Sequential.from_config(config)
    model.build((None, 32, 32, 3))
    return model


# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
wide = widened_cnn(head_units)
table = models.layer_table(wide)
print("dense1 units: seed CNN", models.build_seed_cnn().get_layer("dense1").units, "-> widened", head_units)
print(table[["layer", "output shape", "params", "FLOPs/image"]].to_string(index=False))
head_params = int(table.loc[table.layer.isin(["dense1", "output"]), "params"].sum())
print(f"\nhead (dense1 + output): {head_params / wide.count_params():.1%} of the parameters")

# %% [markdown]
# Now the model on the mesh, written like the `Dense(tf.Module)` of TensorFlow's DTensor
# tutorial. The convolution weights are replicated `DVariable`s (DTensor rejects
# convolution filters split on output channels anyway) and their activations are split
# on `batch`: that is the data-parallel half. `dense1` is column-parallel and `output`
# row-parallel over `model`, with the layers written in the tensor-parallelism notebook:
# that is the tensor-parallel half.
#
# | tensor          | weights                | activations               |
# |-----------------|------------------------|---------------------------|
# | conv1..conv3    | replicated             | `[batch, ., ., .]`        |
# | dense1 (column) | kernel `[., model]`    | `[batch, model]`          |
# | output (row)    | kernel `[model, .]`    | `[batch, .]` (all-reduce) |

# %% tags=["device-check"]
#@save
CONVS = ("conv1", "conv2", "conv3")


class HybridCNN(tf.Module):
    """The (widened) seed CNN on a batch x model mesh; returns logits (softmax is in the loss)."""

    def __init__(self, model, mesh):
        super().__init__(name="hybrid_cnn")
        self.mesh = mesh
        # trunk: whole weights on every device (data parallel)
        self.convs = [
            [dtensor.DVariable(tp.shard(w, replicated(mesh, w.ndim)), name=f"{name}/{part}")
             for w, part in zip(model.get_layer(name).get_weights(), ("kernel", "bias"))]
            for name in CONVS
        ]
        # head: dense1 split by output units, output by input features (tensor parallel)
        self.dense1 = tp.ColumnParallelDense(*model.get_layer("dense1").get_weights(), mesh,
                                             activation="relu", batch_dim="batch", name="dense1")
        self.output = tp.RowParallelDense(*model.get_layer("output").get_weights(), mesh,
                                          batch_dim="batch", name="output")

    def activations(self, images):
        """Every intermediate tensor of one forward pass, by name."""
        out, h = {"input images": images}, images
        for i, (kernel, bias) in enumerate(self.convs):
            h = out[f"{CONVS[i]} output"] = tf.nn.relu(tf.nn.conv2d(h, kernel, 1, "VALID") + bias)
            if i < 2:
                h = tf.nn.max_pool2d(h, 2, 2, "VALID")
        h = out["flatten"] = tf.reshape(h, [tf.shape(h)[0], -1])
        h = out["dense1 output"] = self.dense1(h)  # [batch, model]: no communication
        out["logits"] = self.output(h)  # partial sums, all-reduced over "model"
        return out

    def __call__(self, images):
        return self.activations(images)["logits"]

    def weights(self):
        """All weights by name, in Keras order."""
        out = {}
        for name, (kernel, bias) in zip(CONVS, self.convs):
            out[f"{name}/kernel"], out[f"{name}/bias"] = kernel, bias
        for layer in (self.dense1, self.output):
            out[f"{layer.name}/kernel"], out[f"{layer.name}/bias"] = layer.kernel, layer.bias
        return out

    def get_weights(self):
        """Gathered weights in Keras order (`model.set_weights` accepts them)."""
        return [tp.to_numpy(v) for v in self.weights().values()]


# %% [markdown]
# Build it and read the layouts and the shapes each device actually holds:

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
net = HybridCNN(wide, mesh)
cols = ["tensor", "global shape", "sharding", "shard shape"]
print(tp.layout_table(net.weights())[cols].to_string(index=False))
(x_probe,) = batch_to_mesh(mesh, data.to_float(cifar.x_train[:2 * n_devices]))
print()
print(tp.layout_table(net.activations(x_probe))[cols].to_string(index=False))

# %% [markdown]
# Each device runs the convolutions on its share of the batch, and the devices of one
# `model` group compute the same convolutions on the same images. The head's hidden
# activations are split by units. The row-parallel output layer produces partial sums that
# DTensor all-reduces over `model`; the gradients of the replicated trunk are all-reduced
# over `batch`. Both collectives are inserted by DTensor from the layouts: the training
# step is ordinary TensorFlow code.
#
# ### The optimizer step: Adam for sharded weights
#
# Keras optimizers do not take DTensor variables, so write Adam by hand, with Keras 3's
# exact update rule. Each moment buffer is created with the layout of its weight: a weight
# split over `model` has its moments split the same way (optimizer memory shrinks with it),
# and the update runs shard by shard with no communication.

# %% tags=["device-check"]
#@save
def zeros_like_layout(variable):
    """A zero DVariable with the shape, dtype and layout of `variable`."""
    zeros = np.zeros(variable.shape, variable.dtype.as_numpy_dtype)
    return dtensor.DVariable(tp.shard(zeros, dtensor.fetch_layout(variable)))


class Adam(tf.Module):
    """Keras 3's Adam, for DTensor weights: each moment buffer has its weight's layout."""

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(name="adam")
        self.lr, self.beta_1, self.beta_2, self.epsilon = learning_rate, beta_1, beta_2, epsilon
        self.m, self.v, self.iterations = [], [], None

    def build(self, variables):
        """Zeroed moments laid out like `variables`, and a replicated step counter."""
        self.m = [zeros_like_layout(w) for w in variables]
        self.v = [zeros_like_layout(w) for w in variables]
        mesh = dtensor.fetch_layout(variables[0]).mesh
        self.iterations = dtensor.DVariable(tp.shard(np.float32(0), replicated(mesh, 0)))

    def apply(self, grads, variables):
        """One update (inside a tf.function), under the name scope notebook 07's trace_step reads."""
        with tf.name_scope("update"):
            self.update(grads, variables)

    def update(self, grads, variables):
        """Adam's arithmetic, shard by shard."""
        t = self.iterations + 1.0
        alpha = self.lr * tf.sqrt(1.0 - tf.pow(self.beta_2, t)) / (1.0 - tf.pow(self.beta_1, t))
        for g, w, m_slot, v_slot in zip(grads, variables, self.m, self.v):
            # phase 1: running means of the gradient and its square, shard by shard
            m = m_slot + (g - m_slot) * (1.0 - self.beta_1)
            v = v_slot + (tf.square(g) - v_slot) * (1.0 - self.beta_2)
            m_slot.assign(m)
            v_slot.assign(v)
            # phase 2: the bias-corrected step (new values used directly, not re-read)
            w.assign_sub(m * alpha / (tf.sqrt(v) + self.epsilon))
        self.iterations.assign_add(1.0)


def make_grad_fn(module, loss_fn=tp.sparse_cross_entropy):
    """A compiled fn(x, y) -> (loss, grads of all trainable variables)."""
    variables = list(module.trainable_variables)

    @tf.function
    def grad_fn(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(module(x), y)
        return loss, tape.gradient(loss, variables)

    return grad_fn


def make_train_step(module, optimizer, loss_fn=tp.sparse_cross_entropy):
    """A compiled step(x, y) -> loss: forward, backward, optimizer update."""
    variables = list(module.trainable_variables)
    optimizer.build(variables)

    @tf.function
    def step(x, y):
        # forward and backward: DTensor all-reduces the replicated weights' gradients over
        # "batch" and leaves the sharded weights' gradients sharded
        with tf.GradientTape() as tape:
            loss = loss_fn(module(x), y)
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return step


# %% [markdown]
# Run one step and look at what the optimizer holds: the moments of `dense1`'s kernel are
# split like the kernel.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
probe_net, probe_opt = HybridCNN(wide, mesh), Adam(1e-3)
probe_step = make_train_step(probe_net, probe_opt)
with config.quiet_tf_logs():
    probe_step(*batch_to_mesh(mesh, data.to_float(cifar.x_train[:global_batch]),
                              cifar.y_train[:global_batch].astype(np.int32)))
i_dense1 = list(probe_net.weights()).index("dense1/kernel")
print(tp.layout_table({"dense1/kernel": probe_net.weights()["dense1/kernel"],
                       "its m": probe_opt.m[i_dense1], "its v": probe_opt.v[i_dense1]}
                      )[cols].to_string(index=False))
print("step counter after one step:", int(tp.to_numpy(probe_opt.iterations)))

# %% [markdown]
# ### Same first steps as pure data parallelism
#
# If the sharding is right, the mesh computes exactly what a plain data-parallel run
# computes. The reference is independent code: Keras `model.fit` under
# `tf.distribute.MirroredStrategy` over the same devices, starting from the same weights,
# with Keras's own Adam, on the same consecutive batches.

# %% tags=["device-check"]
def mirrored_steps(model, x, y, steps, batch_size):
    """Losses and weights after each of `steps` Keras steps under MirroredStrategy."""
    losses, weights = [], []

    def record(batch, logs):
        losses.append(float(logs["loss"]))
        weights.append(ref.get_weights())

    with config.quiet_tf_logs():
        with devices.make_strategy().scope():
            ref = keras.models.clone_model(model)
            ref.build((None, 32, 32, 3))
            ref.set_weights(model.get_weights())
            ref.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        n = steps * batch_size
        ref.fit(data.to_float(x[:n]), y[:n], batch_size=batch_size, shuffle=False, verbose=0,
                callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    # Keras logs the running mean over the epoch: recover each step's own loss
    return [losses[0]] + [(k + 1) * losses[k] - k * losses[k - 1]
                          for k in range(1, len(losses))], weights


def mesh_steps(net, x, y, steps, batch_size):
    """The same consecutive batches on the mesh, with our Adam."""
    step, losses, weights = make_train_step(net, Adam(1e-3)), [], []
    with config.quiet_tf_logs():
        for i in range(steps):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            xb, yb = batch_to_mesh(net.mesh, data.to_float(x[sl]), y[sl].astype(np.int32))
            losses.append(float(tp.to_numpy(step(xb, yb))))
            weights.append(net.get_weights())
    return losses, weights


eq_steps = 3
ref_losses, ref_weights = mirrored_steps(wide, cifar.x_train, cifar.y_train, eq_steps, global_batch)
mesh_losses, mesh_weights = mesh_steps(HybridCNN(wide, mesh), cifar.x_train, cifar.y_train,
                                       eq_steps, global_batch)
loss_diff = max_abs_diff(mesh_losses, ref_losses)
weight_diffs = [max_abs_diff(a, b) for a, b in zip(mesh_weights, ref_weights)]
print("losses, MirroredStrategy:", np.round(ref_losses, 6))
print("losses, 2-D mesh:        ", np.round(mesh_losses, 6))
print(f"max |loss diff| = {loss_diff:.1e}")
print("max |weight diff| after each step:", ", ".join(f"{d:.1e}" for d in weight_diffs))

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
TOL = 1e-5
print(f"{eq_steps} Adam steps, {batch_size_mesh}x{model_size_mesh} mesh vs MirroredStrategy:")
print(f"losses of all {eq_steps} steps equal within {TOL}: {loss_diff <= TOL}")
print(f"weights after the first step equal within 1e-6: {weight_diffs[0] <= 1e-6}")

# %% [markdown]
# The two runs compute the same losses and, after one step, the same weights up to float
# rounding. Rounding differs because the sums are split differently, and the printed
# weight differences grow over the next steps: each step starts from very slightly
# different weights, and Adam divides every gradient by its own running magnitude, which
# magnifies the rounding of weights whose gradient is nearly zero. That is ordinary
# floating-point behaviour, not a sharding error: a wrong layout shows up as differences
# in the losses and in the very first step.
#
# ### Train it on CIFAR-10
#
# Now train the hybrid model with Adam and check the test accuracy along the way (10% is
# chance).

# %%
def train_cnn(net, x, y, steps, batch_size, log_every, seed=0):
    """Shuffled mini-batches; one row per `log_every` steps: loss, images/s, test accuracy."""
    step_fn, rng, rows, losses = make_train_step(net, Adam(1e-3)), np.random.default_rng(seed), [], []
    order, pos, t0 = rng.permutation(len(x)), 0, time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > len(x):  # a new epoch: reshuffle
            order, pos = rng.permutation(len(x)), 0
        idx, pos = order[pos:pos + batch_size], pos + batch_size
        losses.append(step_fn(*batch_to_mesh(net.mesh, data.to_float(x[idx]),
                                              y[idx].astype(np.int32))))
        if step % log_every == 0 or step == steps:
            rows.append({"step": step, "loss": float(np.mean([tp.to_numpy(v) for v in losses])),
                         "images/s": len(losses) * batch_size / (time.perf_counter() - t0),
                         "test accuracy": evaluate(net, cifar.x_test, cifar.y_test)})
            losses, t0 = [], time.perf_counter()
    return pd.DataFrame(rows)


def evaluate(net, x, y, batch_size=500):
    """Accuracy on (x, y), batch by batch on the mesh (the last batch padded)."""
    n_batch = net.mesh.dim_size("batch")
    forward, correct = tf.function(net.__call__), 0
    for start in range(0, len(x), batch_size):
        xb = data.to_float(x[start:start + batch_size])
        pad = np.zeros(((-len(xb)) % n_batch, *xb.shape[1:]), np.float32)
        logits = tp.to_numpy(forward(*batch_to_mesh(net.mesh, np.concatenate([xb, pad]))))
        correct += int(np.sum(np.argmax(logits[:len(xb)], 1) == y[start:start + batch_size]))
    return correct / len(x)


train_steps = config.pick(smoke=8, full=800)
with config.quiet_tf_logs():
    history = train_cnn(HybridCNN(wide, mesh), cifar.x_train, cifar.y_train, train_steps,
                        global_batch, log_every=config.pick(smoke=4, full=160))
print(history.round(3).to_string(index=False))
print(f"\n{train_steps} steps = {train_steps * global_batch / len(cifar.x_train):.1f} epochs of "
      f"{len(cifar.x_train):,} images; final test accuracy on {len(cifar.x_test):,} "
      f"{cifar.label} test images: {history['test accuracy'].iloc[-1]:.1%}")

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].plot(history["step"], history["loss"], marker="o")
ax[0].set(xlabel="step", ylabel="training loss", title=f"Hybrid {batch_size_mesh}x{model_size_mesh} mesh")
ax[1].plot(history["step"], history["test accuracy"], marker="o", color="tab:green")
ax[1].axhline(0.1, ls="--", color="grey", label="chance")
ax[1].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title=cifar.label)
ax[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The model learns: the test accuracy, measured on the whole test set at every logged step,
# climbs far above the 10% of chance (last row above). More epochs would take it further;
# the point here is that the hybrid layout trains like any other.
#
# ### Memory and speed per mesh shape
#
# For each mesh shape, build the model, run a step so every buffer exists, and add up the
# bytes of the shards each device really holds: parameters, gradients and Adam's two
# moment buffers (the fullest device is reported). Then time training steps on batches
# already on the mesh. For comparison, time `MirroredStrategy` (Keras `fit`, the same
# devices, the same global batch) too.

# %%
def state_bytes(named_tensors):
    """Bytes of the shards each device holds, summed over `named_tensors`: {device: bytes}."""
    out = {}
    for t in named_tensors:
        for device, shape in tp.shard_shapes(t):
            out[device] = out.get(device, 0) + math.prod(shape) * t.dtype.size
    return out


def mesh_row(model, shape, x, y, batch_size, bench_steps):
    """Per-device state bytes of the fullest device, and images/s, on one mesh shape."""
    mesh_ = hybrid_mesh(*shape)
    net_, opt = HybridCNN(model, mesh_), Adam(1e-3)
    step = make_train_step(net_, opt)
    batch = batch_to_mesh(mesh_, data.to_float(x[:batch_size]), y[:batch_size].astype(np.int32))
    _, grads = make_grad_fn(net_)(*batch)
    tp.to_numpy(step(*batch))  # traces; creates every buffer
    parts = {"params": state_bytes(net_.trainable_variables), "grads": state_bytes(grads),
             "optimizer": state_bytes(opt.m + opt.v)}
    fullest = max(parts["params"], key=lambda d: sum(p[d] for p in parts.values()))
    t0 = time.perf_counter()
    for _ in range(bench_steps):
        loss = step(*batch)
    tp.to_numpy(loss)
    row = {"mesh (batch x model)": f"{shape[0]}x{shape[1]}"}
    row.update({f"{k} bytes/device": v[fullest] for k, v in parts.items()})
    row["total bytes/device"] = sum(v[fullest] for v in parts.values())
    return row | {"images/s": bench_steps * batch_size / (time.perf_counter() - t0)}


def mirrored_images_per_s(model, x, y, batch_size, bench_steps):
    """Keras fit under MirroredStrategy on all devices: images/s of the steps after 2 warm-up steps."""
    with devices.make_strategy().scope():
        ref = keras.models.clone_model(model)
        ref.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    ds = tf.data.Dataset.from_tensor_slices((data.to_float(x[:batch_size]), y[:batch_size]))
    ends = []  # when each step finished (reading the loss waits for the step)
    clock = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append((float(logs["loss"]), time.perf_counter())[1]))
    ref.fit(ds.batch(batch_size).cache().repeat(), steps_per_epoch=2 + bench_steps, shuffle=False,
            verbose=0, callbacks=[clock])
    return bench_steps * batch_size / (ends[-1] - ends[1])


with config.quiet_tf_logs():
    mesh_table = pd.DataFrame([mesh_row(wide, s, cifar.x_train, cifar.y_train, global_batch,
                                        S.bench_batches) for s in shapes])
    mirrored_speed = mirrored_images_per_s(wide, cifar.x_train, cifar.y_train, global_batch,
                                           S.bench_batches)
spec = memory.spec_from_keras(wide, tensor_parallel_layers=["dense1", "output"])
mesh_table["calculator bytes/device"] = [
    int(memory.estimate(spec, memory.Layout(dp=b, tp=m), memory.Training("adam", "fp32")).model_states)
    for b, m in shapes
]

# %%
# NBVAL_CHECK_OUTPUT
byte_cols = ["mesh (batch x model)", "params bytes/device", "grads bytes/device",
             "optimizer bytes/device", "total bytes/device"]
print(mesh_table[byte_cols].to_string(index=False))
rel = (mesh_table["calculator bytes/device"] - mesh_table["total bytes/device"]).abs() / mesh_table["total bytes/device"]
print("\nutils.memory agrees with the shard shapes within 0.1%:", bool((rel < 1e-3).all()))
replicated_total = mesh_table["total bytes/device"].iloc[0]
print("per-device state vs pure data parallelism:",
      ", ".join(f"{s}: {t / replicated_total:.2f}" for s, t in
                zip(mesh_table["mesh (batch x model)"], mesh_table["total bytes/device"])))

# %%
print(mesh_table[["mesh (batch x model)", "total bytes/device", "images/s"]].round(0).to_string(index=False))
print(f"MirroredStrategy (Keras fit), same {n_devices} device(s), global batch {global_batch}: "
      f"{mirrored_speed:.0f} images/s")
fastest = mesh_table.loc[mesh_table["images/s"].idxmax(), "mesh (batch x model)"]
print(f"\nfastest mesh here: {fastest}; 1x{n_devices} runs at "
      f"{mesh_table['images/s'].iloc[-1] / mesh_table['images/s'].iloc[0]:.2f}x the speed of "
      f"{n_devices}x1; MirroredStrategy runs at {mirrored_speed / mesh_table['images/s'].iloc[0]:.2f}x "
      f"the speed of the {n_devices}x1 mesh")

# %% [markdown]
# Read the two tables together:
#
# - **Memory** follows the layouts exactly. The replicated trunk is small, so splitting the
#   head over `model` cuts the per-device state roughly by the `model` size. The calculator
#   in `utils.memory` predicts the same bytes (the only difference: the row-parallel output
#   bias is replicated, 10 numbers).
# - **Speed** on logical CPUs measures total work, because the "devices" share 2 cores.
#   Every device in a `model` group repeats the trunk's convolutions on the same images,
#   so the all-`model` mesh does the convolutions once per device: read its ratio to the
#   all-`batch` mesh in the last line.
# - **DTensor vs `MirroredStrategy`**: the last line also compares the all-`batch` mesh
#   with `MirroredStrategy` doing the same data parallelism on the same devices and global
#   batch. Both share the same logical CPUs, so the gap between them comes from the
#   runtimes (DTensor's SPMD expansion of our `tf.Module`, Keras's compiled replica step
#   and its input pipeline), not from the devices; read the printed ratio for this run. On
#   real GPUs each device has its own compute: data parallelism scales throughput, tensor
#   parallelism adds an all-reduce per split layer and is worth it when a layer's weights
#   do not fit one device or when the batch cannot grow further.
#
# ### Where the time goes: the mesh step and MirroredStrategy's step, profiled
#
# Notebook 07's `trace_step` reads one training step back from a TensorFlow profiler trace
# and names the phase of every op. Trace the all-`batch` mesh's step (pure data
# parallelism written with DTensor) and notebook 02's data-parallel step (`strategy.run` of
# the per-replica forward and backward, then Keras's Adam, which all-reduces the
# gradients), on the same devices, with the same widened CNN, the same weights and the
# same global batch. The traces go to `runs/08_hybrid_parallelism/profile` (ignored by git).

# %%
from utils.lessons.mirrored_strategy import make_train_step as mirrored_train_step
from utils.lessons.tensor_parallelism import phase_table, plot_timeline, trace_step

PROFILE_DIR = config.run_dir("08_hybrid_parallelism") / "profile"
x_prof, y_prof = data.to_float(cifar.x_train[:global_batch]), cifar.y_train[:global_batch].astype(np.int32)
dp_mesh = hybrid_mesh(n_devices, 1)
dp_step = make_train_step(HybridCNN(wide, dp_mesh), Adam(1e-3))
strategy = devices.make_strategy()
with strategy.scope():
    mirrored_model = keras.models.clone_model(wide)
    mirrored_model.set_weights(wide.get_weights())
    mirrored_step = mirrored_train_step(strategy, mirrored_model, keras.optimizers.Adam(1e-3), global_batch)
one_batch = tf.data.Dataset.from_tensors((x_prof, y_prof))
profiles = {}
with config.quiet_tf_logs():
    profiles[f"DTensor mesh {n_devices}x1"] = trace_step(dp_step, batch_to_mesh(dp_mesh, x_prof, y_prof),
                                                          PROFILE_DIR / "mesh")
    profiles["MirroredStrategy"] = trace_step(mirrored_step, (next(iter(strategy.experimental_distribute_dataset(
        one_batch))),), PROFILE_DIR / "mirrored")
summary = {}
for label, ops in profiles.items():
    table, wall, parallel = phase_table(ops)
    summary[label] = {**{f"{p} ms": v for p, v in table["op_ms"].items()}, "ops": len(ops),
                      "collective ops": int(ops["type"].str.startswith("Collective").sum()),
                      "update ops": int(table["ops"].get("update", 0)), "wall ms": wall, "ops at once": parallel}
print(f"one step, global batch {global_batch}, {n_devices} device(s); op time summed over threads:")
print(pd.DataFrame(summary).round(2).to_string())
mesh_label = f"DTensor mesh {n_devices}x1"
print(f"\nwall time of the mesh step / MirroredStrategy's step: "
      f"{summary[mesh_label]['wall ms'] / summary['MirroredStrategy']['wall ms']:.2f}")
for label, ops in profiles.items():
    top = ops.assign(ms=ops["end_ms"] - ops["start_ms"]).groupby("type")["ms"].sum().nlargest(5)
    print(f"{label}, longest op types (ms):", ", ".join(f"{t} {v:.1f}" for t, v in top.items()))

# %%
fig, axes = plt.subplots(2, 1, figsize=(12, 1.2 + 0.5 * sum(o["thread"].nunique() for o in profiles.values())))
for ax, (label, ops) in zip(axes, profiles.items(), strict=True):
    plot_timeline(ops, ax, f"what ran: one training step, {label} (profiler trace)")
    ax.set_xlim(0, max(o["end_ms"].max() for o in profiles.values()))  # one time scale
plt.tight_layout()
plt.show()

# %% [markdown]
# What the two traces say (the numbers are in the printout above):
#
# - **Both are one compiled program per step.** The traces hold only the step's ops: no
#   retracing, no op dispatched from Python, no input copied during the step (both batches
#   were placed on the devices before). What differs is how the same data-parallel
#   arithmetic is cut into ops and collectives.
# - **Communicate** is the gradients' all-reduce, with the ops that pack the gradients into
#   one buffer and unpack them. Count the collective ops: each step runs only a few per
#   device, however many weights the model has, because both runtimes pack first. Keras's
#   Adam concatenates the gradients (`adam/concat`, `adam/split`); DTensor combines the
#   gradients' all-reduces into one (`DTensorAllReduceOp/CombinedReduceUpdateSlice`) and
#   also all-reduces the loss's mean over the batch (`Mean/DTensorAllReduceOp`). A
#   collective's bar starts when the first device reaches it and ends when the last one
#   has, so it also holds the wait for the slowest device: the long red bars are mostly
#   waiting, while the devices' other ops run on the other threads.
# - **Update**: Keras's Adam (`adam/update_*`) and the notebook's `Adam` (`update/`) do the
#   same arithmetic; Keras's runs as more, smaller ops per variable.
# - **Ops at once** above 1 means ops of different devices ran at the same time; on 2
#   cores that is sharing, not extra compute.
#
# `make bench` times both steps over many steps, interleaved, and reports their ratio
# (README, *Benchmarks*).
#
# ## 2. A decoder-only transformer block, sharded the Megatron way
#
# "Very large" today means transformers. A decoder block is layer norm → causal multi-head
# attention → residual → layer norm → MLP → residual. Megatron-LM (Shoeybi et al. 2019)
# splits it over `model` with two all-reduces per block in the forward pass:
#
# - **attention**: the query, key and value projections are split *by head* (each device
#   computes whole heads, attention needs no communication), the output projection is
#   row-parallel (partial sums, one all-reduce);
# - **MLP**: the first matrix is column-parallel, GELU works on the local slice, the second
#   is row-parallel (one all-reduce).
#
# First the sizes, with the heads and MLP width chosen to split over the mesh's `model`
# axis, and the weights (shapes as in `keras.layers.MultiHeadAttention`).

# %% tags=["device-check"]
#@save
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a GPT-style decoder-only transformer."""

    vocab_size: int
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 2
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def memory_spec(self, name="notebook transformer"):
        """This model for the memory calculator (same parameter count)."""
        return memory.transformer_spec(name, self.n_layers, self.d_model, self.n_heads,
                                       self.seq_len, self.vocab_size, self.d_ff)


def init_transformer_weights(cfg, seed=0):
    """GPT-2-style initial weights by name: normal(0.02), zero biases, unit layer-norm gains."""
    rng = np.random.default_rng(seed)
    d, h, k, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    normal = lambda *shape, std=0.02: rng.normal(0.0, std, shape).astype(np.float32)  # noqa: E731
    zeros, ones = (lambda *s: np.zeros(s, np.float32)), (lambda *s: np.ones(s, np.float32))
    out_std = 0.02 / np.sqrt(2 * cfg.n_layers)  # GPT-2: residual projections scaled down
    w = {"tok_emb": normal(cfg.vocab_size, d), "pos_emb": normal(cfg.seq_len, d, std=0.01)}
    for i in range(cfg.n_layers):
        w.update({f"block{i}/{n}": v for n, v in {
            "ln1_gamma": ones(d), "ln1_beta": zeros(d),
            "wq": normal(d, h, k), "bq": zeros(h, k), "wk": normal(d, h, k), "bk": zeros(h, k),
            "wv": normal(d, h, k), "bv": zeros(h, k),
            "wo": normal(h, k, d, std=out_std), "bo": zeros(d),
            "ln2_gamma": ones(d), "ln2_beta": zeros(d),
            "w1": normal(d, f), "b1": zeros(f), "w2": normal(f, d, std=out_std), "b2": zeros(d),
        }.items()})
    w["ln_f_gamma"], w["ln_f_beta"] = ones(d), zeros(d)
    return w


# %% [markdown]
# The sharding is one table: which axis of which weight is split over `model`. Everything
# not in it (embeddings, layer norms, the output biases) is replicated.

# %% tags=["device-check"]
#@save
MEGATRON_SPECS = {
    "wq": (None, "model", None), "bq": ("model", None),  # split by head: column-parallel
    "wk": (None, "model", None), "bk": ("model", None),
    "wv": (None, "model", None), "bv": ("model", None),
    "wo": ("model", None, None),  # row-parallel: partial sums, one all-reduce
    "w1": (None, "model"), "b1": ("model",),  # MLP column-parallel
    "w2": ("model", None),  # MLP row-parallel: one all-reduce
}


def megatron_layout(name, value, mesh):
    """The layout of weight `name` (e.g. "block0/wq"): from MEGATRON_SPECS, else replicated."""
    specs = MEGATRON_SPECS.get(name.rsplit("/", 1)[-1])
    return replicated(mesh, np.ndim(value)) if specs is None else tp.layout(mesh, *specs)


# %% tags=["device-check"]
n_heads = 4 if 4 % model_size_mesh == 0 else model_size_mesh
lm_cfg_kw = dict(seq_len=64, d_model=16 * n_heads, n_heads=n_heads, d_ff=64 * n_heads, n_layers=2)
print(f"model axis {model_size_mesh}: {n_heads} heads of 16 dims, MLP width {64 * n_heads} "
      "(both split evenly over it)")

# %% [markdown]
# The model itself: the attention and the MLP are ordinary einsums over the weights. On a
# mesh the weights are `DVariable`s with the layouts above and DTensor inserts the two
# all-reduces; without a mesh the same code runs unsharded on one device (section 4 uses
# that, with `tf.recompute_grad` per block and a 16-bit compute dtype).

# %% tags=["device-check"]
#@save
def layer_norm(x, gamma, beta, eps):
    """Layer norm over the last axis, computed in float32 whatever the input dtype."""
    y = tf.cast(x, tf.float32)
    mean, var = tf.nn.moments(y, axes=[-1], keepdims=True)
    return tf.cast((y - mean) * tf.math.rsqrt(var + eps) * gamma + beta, x.dtype)


class TransformerLM(tf.Module):
    """A decoder-only LM: Megatron-sharded on `mesh`, or unsharded on `device` (mesh=None)."""

    def __init__(self, cfg, weights, mesh=None, recompute=False, compute_dtype="float32",
                 device=None):
        super().__init__(name="transformer_lm")
        self.cfg, self.mesh, self.recompute = cfg, mesh, recompute
        self.dtype = tf.as_dtype(compute_dtype)
        if mesh is not None:
            self.params = {n: dtensor.DVariable(tp.shard(np.asarray(v, np.float32),
                                                         megatron_layout(n, v, mesh)),
                                                name=n.replace("/", "_"))
                           for n, v in weights.items()}
        else:
            with tf.device(device or devices.compute_devices()[0]):
                self.params = {n: tf.Variable(np.asarray(v, np.float32), name=n.replace("/", "_"))
                               for n, v in weights.items()}

    def w(self, name):
        """A weight in the compute dtype (weights themselves stay float32)."""
        return tf.cast(self.params[name], self.dtype)

    def attention(self, i, x):
        """x + attention(layer_norm(x)): each device computes its own heads."""
        p, cfg = f"block{i}/", self.cfg
        h = layer_norm(x, self.params[p + "ln1_gamma"], self.params[p + "ln1_beta"],
                       cfg.layer_norm_epsilon)
        q, k, v = (tf.einsum("bsd,dhk->bshk", h, self.w(p + "w" + c)) + self.w(p + "b" + c)
                   for c in "qkv")
        scores = tf.einsum("bqhk,bshk->bhqs", q * tf.cast(cfg.head_dim ** -0.5, q.dtype), k)
        causal = tf.linalg.band_part(tf.ones((x.shape[1], x.shape[1])), -1, 0)
        probs = tf.nn.softmax(tf.cast(scores, tf.float32) + (1.0 - causal) * -1e9, axis=-1)
        ctx = tf.einsum("bhqs,bshk->bqhk", tf.cast(probs, x.dtype), v)
        # row-parallel output projection: partial sums over heads, one all-reduce
        return x + tf.einsum("bqhk,hkd->bqd", ctx, self.w(p + "wo")) + self.w(p + "bo")

    def mlp(self, i, x):
        """x + W2 gelu(W1 layer_norm(x)): column- then row-parallel, one all-reduce."""
        p = f"block{i}/"
        h = layer_norm(x, self.params[p + "ln2_gamma"], self.params[p + "ln2_beta"],
                       self.cfg.layer_norm_epsilon)
        u = tf.nn.gelu(tf.einsum("bsd,df->bsf", h, self.w(p + "w1")) + self.w(p + "b1"))
        return x + tf.einsum("bsf,fd->bsd", u, self.w(p + "w2")) + self.w(p + "b2")

    def block(self, i, x):
        return self.mlp(i, self.attention(i, x))

    def logits(self, tokens):
        x = tf.gather(self.params["tok_emb"], tokens) + self.params["pos_emb"][: tokens.shape[1]]
        x = tf.cast(x, self.dtype)
        for i in range(self.cfg.n_layers):
            block = lambda h, i=i: self.block(i, h)  # noqa: E731
            x = tf.recompute_grad(block)(x) if self.recompute else block(x)
        x = layer_norm(tf.cast(x, tf.float32), self.params["ln_f_gamma"],
                       self.params["ln_f_beta"], self.cfg.layer_norm_epsilon)
        return tf.einsum("bsd,vd->bsv", x, self.params["tok_emb"])  # tied LM head, float32

    def __call__(self, tokens):
        if self.mesh is None:
            return self.logits(tokens)
        with dtensor.default_mesh(self.mesh):
            return self.logits(tokens)


# %% [markdown]
# The training text ships with Python: the docstrings of a few dozen standard-library
# modules, modelled character by character over a fixed alphabet (printable ASCII, tab and
# newline), so nothing is downloaded and the vocabulary does not depend on the Python
# version.

# %% tags=["device-check"]
import importlib
import inspect
import string

CORPUS_MODULES = (
    "collections", "functools", "itertools", "json", "textwrap", "string", "re", "pathlib",
    "random", "statistics", "datetime", "decimal", "fractions", "heapq", "bisect",
    "contextlib", "dataclasses", "enum", "argparse", "logging", "csv", "difflib", "shutil",
    "tempfile", "threading", "queue", "inspect", "copy", "pprint", "operator", "zipfile",
    "tarfile", "calendar", "urllib.parse", "email.message", "unittest.case",
)  # fmt: skip
ALPHABET = "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))


def text_corpus(modules=CORPUS_MODULES):
    """Docstrings of the modules and their public classes and functions; other characters -> '?'."""
    docs = []
    for mod in map(importlib.import_module, modules):
        docs.append(inspect.getdoc(mod) or "")
        docs += [inspect.getdoc(obj) or "" for name, obj in sorted(vars(mod).items())
                 if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                 and getattr(obj, "__module__", None) == mod.__name__]
    return "\n\n".join("".join(c if c in ALPHABET else "?" for c in d.strip()) for d in docs if d.strip())


def random_windows(ids, batch_size, seq_len, rng):
    """`batch_size` random windows: inputs ids[i:i+S], targets ids[i+1:i+S+1]."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    win = ids[starts[:, None] + np.arange(seq_len + 1)]
    return win[:, :-1].astype(np.int32), win[:, 1:].astype(np.int32)


text = text_corpus()
char_id = {c: i for i, c in enumerate(ALPHABET)}
ids = np.array([char_id[c] for c in text], np.int32)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
print(f"{len(text):,} characters; vocabulary: {len(ALPHABET)} characters")
print(repr(text[:300]))

# %% tags=["device-check"]
lm_cfg = TransformerConfig(vocab_size=len(ALPHABET), **lm_cfg_kw)
lm_weights = init_transformer_weights(lm_cfg, seed=0)
lm = TransformerLM(lm_cfg, lm_weights, mesh)
print(f"parameters: {sum(v.size for v in lm_weights.values()):,}")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
print(f"config: d_model={lm_cfg.d_model}, heads={lm_cfg.n_heads} (head dim {lm_cfg.head_dim}), "
      f"d_ff={lm_cfg.d_ff}, layers={lm_cfg.n_layers}, seq_len={lm_cfg.seq_len}")
block0 = {n.split("/", 1)[1]: v for n, v in lm.params.items() if n.startswith("block0/")}
print(tp.layout_table(block0)[cols].to_string(index=False))

# %% [markdown]
# Each device holds its share of the heads' projections and of the MLP. Now the proof:
# the reference is a block built from Keras layers (`MultiHeadAttention` with a causal
# mask, `LayerNormalization`, two `Dense` layers) loaded with the same weights. Compare
# the outputs and the gradients with respect to the input and every weight; then compare
# the whole sharded language model with the same model unsharded on one device.

# %% tags=["device-check"]
#@save
def keras_block(cfg, block_weights):
    """One pre-norm decoder block from Keras layers, loaded with `block_weights` (wq, bq, ...)."""
    w = {k.rsplit("/", 1)[-1]: np.asarray(v) for k, v in block_weights.items()}
    inp = keras.Input((cfg.seq_len, cfg.d_model))
    ln1 = keras.layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="ln1")
    mha = keras.layers.MultiHeadAttention(cfg.n_heads, cfg.head_dim, name="attention")
    ln2 = keras.layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="ln2")
    mlp_in = keras.layers.Dense(cfg.d_ff, activation="gelu", name="mlp_in")
    mlp_out = keras.layers.Dense(cfg.d_model, name="mlp_out")
    h = ln1(inp)
    x = inp + mha(h, h, use_causal_mask=True)
    model = keras.Model(inp, x + mlp_out(mlp_in(ln2(x))), name="keras_block")
    model.block_variables = {}  # our short names -> the Keras variables
    for layer, names in [(ln1, "ln1_gamma ln1_beta"), (mha.query_dense, "wq bq"),
                         (mha.key_dense, "wk bk"), (mha.value_dense, "wv bv"),
                         (mha.output_dense, "wo bo"), (ln2, "ln2_gamma ln2_beta"),
                         (mlp_in, "w1 b1"), (mlp_out, "w2 b2")]:
        layer.set_weights([w[n] for n in names.split()])
        model.block_variables.update(dict(zip(names.split(), layer.weights)))
    return model


# %% tags=["device-check"]
def compare_block(lm, reference, x, seed=0):
    """Relative differences of block 0's output and of the gradients of sum(output * r)."""
    r = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    names = list(reference.block_variables)
    ours = [lm.params[f"block0/{n}"] for n in names]

    @tf.function
    def sharded(x_in, r_in):
        with tf.GradientTape() as tape, dtensor.default_mesh(lm.mesh):
            tape.watch(x_in)
            y = lm.block(0, x_in)
            loss = tf.reduce_sum(y * r_in)
        return y, tape.gradient(loss, [x_in, *ours])

    y1, g1 = sharded(*batch_to_mesh(lm.mesh, x, r))
    xk = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xk)
        y2 = reference(xk)
        loss = tf.reduce_sum(y2 * r)
    g2 = tape.gradient(loss, [xk, *reference.block_variables.values()])
    g1 = [tp.to_numpy(g) for g in g1]
    g2 = [np.asarray(g) for g in g2]
    return {"output": max_rel_diff(tp.to_numpy(y1), y2.numpy()),
            "input gradient": max_rel_diff(g1[0], g2[0]),
            # one scale for all weights: the key bias has a zero gradient (softmax ignores a
            # shift shared by all keys), so a per-tensor relative error would divide noise by 0
            "weight gradients": max_abs_diff(g1[1:], g2[1:]) / max(np.abs(g).max() for g in g2[1:])}


rng = np.random.default_rng(0)
x_block = rng.normal(size=(2 * n_devices, lm_cfg.seq_len, lm_cfg.d_model)).astype(np.float32)
with config.quiet_tf_logs():
    block_diffs = compare_block(lm, keras_block(lm_cfg, {k: tp.to_numpy(v) for k, v in block0.items()}),
                                x_block)
    lm_single = TransformerLM(lm_cfg, lm_weights)  # unsharded, one device
    xt, yt = random_windows(train_ids, 2 * n_devices, lm_cfg.seq_len, rng)
    loss_sh, grads_sh = make_grad_fn(lm)(*batch_to_mesh(mesh, xt, yt))
    loss_1, grads_1 = make_grad_fn(lm_single)(tf.constant(xt), tf.constant(yt))
print("relative differences, sharded block vs Keras block:", {k: f"{v:.1e}" for k, v in block_diffs.items()})
lm_loss_diff = abs(float(tp.to_numpy(loss_sh)) - float(loss_1))
grads_sh = [tp.to_numpy(g) for g in grads_sh]
lm_grad_diff = max_abs_diff(grads_sh, grads_1) / max(float(np.abs(g).max()) for g in grads_1)
print(f"language model: |loss diff| = {lm_loss_diff:.1e}, gradient diff / largest gradient = {lm_grad_diff:.1e}")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
print("sharded block equals the Keras block (output, input and weight gradients) within 1e-5:",
      all(v <= 1e-5 for v in block_diffs.values()))
print("sharded language model equals the unsharded one (loss and all gradients) within 1e-5:",
      lm_loss_diff <= 1e-5 and lm_grad_diff <= 1e-5)

# %% [markdown]
# Train the sharded model for a while on the `batch × model` mesh (each step: a few dozen
# windows of 64 characters, Adam) and watch the validation loss, measured on text it never trains on.
# A model that only learned character frequencies would reach the unigram entropy printed
# below; a loss under it means the model uses context.

# %%
def train_lm(lm, steps, batch_size, log_every, seed=0):
    """Adam on random training windows; validation loss on 4 fixed windows of held-out text."""
    step_fn = make_train_step(lm, Adam(3e-3))
    eval_fn = tf.function(lambda x, y: tp.sparse_cross_entropy(lm(x), y))
    rng, val_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    val = [batch_to_mesh(lm.mesh, *random_windows(val_ids, batch_size, lm.cfg.seq_len, val_rng))
           for _ in range(4)]
    val_loss = lambda: float(np.mean([tp.to_numpy(eval_fn(x, y)) for x, y in val]))  # noqa: E731
    rows, losses, t0 = [{"step": 0, "train loss": np.nan, "val loss": val_loss()}], [], time.perf_counter()
    for step in range(1, steps + 1):
        losses.append(step_fn(*batch_to_mesh(
            lm.mesh, *random_windows(train_ids, batch_size, lm.cfg.seq_len, rng))))
        if step % log_every == 0 or step == steps:
            rows.append({"step": step, "train loss": float(np.mean([tp.to_numpy(v) for v in losses])),
                         "val loss": val_loss(),
                         "tokens/s": len(losses) * batch_size * lm.cfg.seq_len / (time.perf_counter() - t0)})
            losses, t0 = [], time.perf_counter()
    return pd.DataFrame(rows)


lm_steps, lm_train_batch = config.pick(smoke=6, full=600), multiple_of(32, batch_size_mesh)
print(f"each step: {lm_train_batch} windows of {lm_cfg.seq_len} characters")
with config.quiet_tf_logs():
    lm_history = train_lm(lm, lm_steps, lm_train_batch, log_every=config.pick(smoke=3, full=100))
freq = np.bincount(train_ids, minlength=len(ALPHABET)) / len(train_ids)
unigram = float(-np.sum(np.log(freq[val_ids] + 1e-12)) / len(val_ids))
print(lm_history.round(3).to_string(index=False))
print(f"\nunigram (character frequency) loss on the validation text: {unigram:.3f} nats; "
      f"final validation loss: {lm_history['val loss'].iloc[-1]:.3f} nats")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.plot(lm_history["step"][1:], lm_history["train loss"][1:], marker="o", label="train")
ax.plot(lm_history["step"], lm_history["val loss"], marker="o", label="validation")
ax.axhline(unigram, ls="--", color="grey", label="unigram baseline")
ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="Sharded transformer on stdlib docstrings")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. How many bytes? A memory calculator
#
# Training memory has four parts per device: **parameters**, **gradients**, **optimizer
# states** and **activations**. `utils.memory` counts them for any layout:
#
# - bytes per parameter depend on the precision: with the mixed-precision recipe of the
#   ZeRO and Megatron papers, 2 (16-bit weights) + 2 (16-bit gradients) + *K* for the
#   optimizer, where Adam's *K* = 12 (fp32 master copy, momentum, variance);
# - data parallelism (`dp`) replicates all of it; tensor parallelism (`tp`) splits the
#   layers it covers; pipeline parallelism (`pp`) gives each stage a slice of the layers
#   but keeps several micro-batches' activations in flight;
# - ZeRO partitions, over the `dp` devices, the optimizer states (stage 1), also the
#   gradients (stage 2), also the parameters (stage 3);
# - activations come from per-layer sizes, the micro-batch and the recomputation policy.
#
# First, the check against the literature: figure 1 of the ZeRO paper (Rajbhandari et al.
# 2019), a model of `7.5B` parameters with Adam in mixed precision on 64 devices.

# %%
# NBVAL_CHECK_OUTPUT
zero_model = memory.ModelSpec.from_params("7.5B", 7_500_000_000)
paper = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
print(f"K = {memory.optimizer_bytes_per_param('adam', 'mixed')} optimizer bytes per parameter (Adam, mixed precision)")
for stage, expected in paper.items():
    got = memory.estimate(zero_model, memory.Layout(dp=64, zero=stage), memory.Training("adam", "mixed")).total / memory.GB
    name = ["baseline (data parallel)", "ZeRO-1 (P_os)", "ZeRO-2 (P_os+g)", "ZeRO-3 (P_os+g+p)"][stage]
    print(f"{name:26s} {got:7.3f} GB per device -> {got:5.1f} GB; paper: {expected:5.1f} GB; match: {round(got, 1) == expected}")

# %% [markdown]
# Now the models of this series and two real large ones. The GPT shapes are those of the
# GPT-3 paper (Brown et al. 2020): "XL" has 1.3B parameters (24 layers, width 2,048), the
# largest 175B (96 layers, width 12,288), both with 2,048-token sequences. Activations per
# transformer block follow Korthikanti et al. 2022 (34·s·h + 5·a·s² bytes per sequence in
# 16-bit). Everything below: Adam, mixed precision, one device.

# %%
# NBVAL_CHECK_OUTPUT
gpt_1b = memory.transformer_spec("GPT-3 XL (1.3B)", 24, 2048, 16, 2048, 50257)
gpt_175b = memory.transformer_spec("GPT-3 175B", 96, 12288, 96, 2048, 50257)
cnn_spec = memory.spec_from_keras(models.build_seed_cnn(), "seed CNN", ["dense1", "output"])
lm_spec = lm_cfg.memory_spec()
print("calculator's parameter count equals the notebook transformer's:", lm_spec.n_params == sum(v.size for v in lm_weights.values()))
cases = [
    ("seed CNN, batch 128", cnn_spec, memory.Layout(), memory.Training("adam", "mixed", micro_batch=128)),
    ("notebook transformer, batch 32", lm_spec, memory.Layout(), memory.Training("adam", "mixed", micro_batch=32)),
    ("1.3B, 1 sequence", gpt_1b, memory.Layout(), memory.Training("adam", "mixed", micro_batch=1)),
    ("175B, 1 sequence", gpt_175b, memory.Layout(), memory.Training("adam", "mixed", micro_batch=1)),
]
one_device = memory.breakdown_table(cases)
one_device["parameters"] = one_device["parameters"].map(lambda p: f"{p:,}")
gb_cols = ["params", "grads", "optimizer", "activations", "total"]
one_device = one_device.drop(columns=["layout"]).rename(columns={c: f"{c} GB" for c in gb_cols})
print(one_device.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

# %% [markdown]
# (GB = 10⁹ bytes.) The two models of this notebook fit anywhere; the 1.3B model needs
# 2.631 + 2.631 + 15.79 GB of model states (2 + 2 + 12 bytes per parameter, the table's
# params, grads and optimizer columns) before any
# activation; the 175B model needs terabytes. How does each strategy bring that down? The plot shows memory per
# device as the number of devices grows, with each strategy used alone.

# %%
counts = [2**i for i in range(0, 11)]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, spec_ in zip(axes, [gpt_1b, gpt_175b]):
    sweep = memory.strategy_sweep(spec_, counts, memory.Training("adam", "mixed", micro_batch=1))
    for strategy, part in sweep.groupby("strategy", sort=False):
        ax.plot(part["devices"], part["memory"], marker="o", ms=3, label=strategy)
    for gb, style in [(80, "--"), (16, ":")]:
        ax.axhline(gb, color="grey", ls=style, lw=1)
        ax.text(1, gb * 1.08, f"{gb} GB", color="grey", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="devices", ylabel="GB per device", title=spec_.name)
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What the curves say:
#
# - **data** parallelism is flat: every device holds everything;
# - **ZeRO-1/2** flatten out at the part they do not partition (16-bit parameters, and for
#   ZeRO-1 the gradients) plus activations; **ZeRO-3** keeps falling until activations
#   dominate;
# - **tensor** parallelism stops at the number of heads (here also a practical limit: its
#   all-reduces want the fast links inside one node, typically 8 GPUs);
# - **pipeline** parallelism stops at the number of layers, and its first stage keeps
#   activations of `pp` micro-batches in flight, so it flattens too.
#
# No single strategy gets the 175B model under 80 GB with few devices; combinations do.
# `memory.smallest_layout` searches `dp × tp × pp`, ZeRO stage and recomputation for the
# fewest devices (powers of two) that fit, preferring among equals no recomputation, no
# ZeRO-3, fewer pipeline stages and smaller `tp` (each costs time). It returns the layout
# and its breakdown.

# %%
# NBVAL_CHECK_OUTPUT
questions = [
    ("seed CNN (batch 128) on a 4 GB device", cnn_spec, 4, 128),
    ("1.3B on 80 GB devices", gpt_1b, 80, 1),
    ("1.3B on 16 GB devices", gpt_1b, 16, 1),
    ("1.3B on 16 GB devices, micro-batch 8", gpt_1b, 16, 8),
    ("175B on 80 GB devices", gpt_175b, 80, 1),
    ("175B on 40 GB devices", gpt_175b, 40, 1),
]
for label, spec_, gb, mb in questions:
    fit = memory.smallest_layout(spec_, gb, memory.Training("adam", "mixed", micro_batch=mb))
    parts = fit.breakdown.as_dict()
    print(f"{label:40s} -> {fit}")
    print(f"{'':40s}    params {parts['params']:.2f} + grads {parts['grads']:.2f} + optimizer "
          f"{parts['optimizer']:.2f} + activations {parts['activations']:.2f} GB")

# %% [markdown]
# Read a few answers. The 1.3B model fits one 80 GB device outright: 16 bytes per
# parameter of model states plus the activations of one sequence. On 16 GB devices two
# devices suffice, but only with ZeRO-1 (the optimizer states split over both) and
# recomputation; with a micro-batch of 8 the activations grow and the search switches to
# tensor parallelism, which splits the activations as well as the weights. The 175B model
# needs 64 devices of 80 GB: tensor parallelism inside a node of 8, two pipeline stages,
# ZeRO-2 over the 4 data-parallel replicas, and recomputation; on 40 GB devices, twice as
# many. The calculator leaves out temporary buffers and fragmentation, so in practice pass
# `usable_fraction=0.8` or so.
#
# ## 4. Mixed precision and activation recomputation, measured
#
# Two levers reduce the activation part without more devices:
#
# - **mixed precision** computes in 16-bit (`bfloat16` on CPUs, `float16` on GPUs with
#   tensor cores) while keeping float32 weights: activations take half the bytes;
# - **recomputation** (Chen et al. 2016; `tf.recompute_grad`) keeps only the input of each
#   wrapped segment and recomputes the segment during the backward pass: less memory, about
#   one extra forward pass of compute.
#
# `compare_variants` (below) runs one forward + backward step per variant on one device,
# reads the allocator's peak with `tf.config.experimental.get_memory_info` (on CPUs only
# with `TF_CPU_ALLOCATOR_USE_BFC=true` set before TensorFlow starts, as the setup cell
# does; all logical CPUs share one allocator, so the peak is
# process-wide; it also skips small allocations, so the peak is a lower bound), times the
# variants round-robin, and compares losses and gradients with the
# float32 run. The calculator's activation estimate is printed next to it. Where a device
# reports no memory statistics, the peak columns are left out and the calculator's
# estimate is all you have.
#
# The CNN is cut into 3 recomputed segments (about √8 for its 8 layers, the rule of Chen et
# al.); the transformer recomputes each block.

# %%
def run(fn, *args):
    """Call fn and wait for every tensor it returns."""
    return [np.asarray(t) for t in tf.nest.flatten(fn(*args))]


def peak_bytes(fn, *args, device):
    """Allocator peak above the current allocation during one call (None: no statistics)."""
    short = devices.short_device(device)
    try:
        tf.config.experimental.reset_memory_stats(short)
    except (ValueError, RuntimeError, tf.errors.OpError):  # this device keeps no statistics
        return None
    before = tf.config.experimental.get_memory_info(short)["current"]
    run(fn, *args)
    return tf.config.experimental.get_memory_info(short)["peak"] - before


def keras_grad_step(model, recompute_segments=0):
    """A compiled fn(x, y) -> (loss, grads); with segments, each wrapped in tf.recompute_grad."""
    layers, k = model.layers, max(1, recompute_segments)
    bounds = [round(i * len(layers) / k) for i in range(k + 1)]
    segments = [layers[a:b] for a, b in zip(bounds, bounds[1:])]

    def segment_fn(seg):
        def forward(h):
            for layer in seg:
                h = layer(h, training=True)
            return h
        return tf.recompute_grad(forward) if recompute_segments else forward

    @tf.function
    def grad_fn(x, y):
        with tf.GradientTape() as tape:
            h = x
            for seg in segments:
                h = segment_fn(seg)(h)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, h))
        return loss, tape.gradient(loss, model.trainable_variables)

    return grad_fn


def compare_variants(fns, x, y, device, repeats, predicted):
    """Peak, time and results of each (loss, grads) variant, against the first one."""
    peaks, results, times = {}, {}, {name: [] for name in fns}
    with config.quiet_tf_logs(), tf.device(device):
        # phase 1: trace, then one call each for the peak and the results
        for name, fn in fns.items():
            run(fn, x, y)
            peaks[name] = peak_bytes(fn, x, y, device=device)
            loss, grads = fn(x, y)
            vec = np.concatenate([np.asarray(g, np.float64).ravel() for g in grads])
            results[name] = (float(loss), vec)
        # phase 2: time round-robin, so a busy machine slows all variants alike
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                run(fn, x, y)
                times[name].append(time.perf_counter() - t0)
    first = next(iter(fns))
    (loss0, vec0), t_first = results[first], np.median(times[first])
    rows, diffs = [], {}
    for name, (loss_v, vec) in results.items():
        diffs[name] = {"loss": abs(loss_v - loss0) / abs(loss0),
                       "gradients": np.linalg.norm(vec - vec0) / np.linalg.norm(vec0),
                       "cosine": vec @ vec0 / (np.linalg.norm(vec) * np.linalg.norm(vec0))}
        row = {"variant": name}
        if peaks[first]:
            row |= {"peak MB": peaks[name] / 1e6, "peak vs first": peaks[name] / peaks[first]}
        row |= {"calculator activations MB": predicted[name] / 1e6,
                "ms/step": np.median(times[name]) * 1e3, "time vs first": np.median(times[name]) / t_first,
                "loss rel. diff": diffs[name]["loss"], "grad rel. diff": diffs[name]["gradients"],
                "grad cosine": diffs[name]["cosine"]}
        rows.append(row)
    return pd.DataFrame(rows), diffs


# %%
hardware_policy, why = choose_precision()
policy = "mixed_float16" if hardware_policy == "mixed_float16" else "mixed_bfloat16"
measure_device = devices.compute_devices()[0]
print("memory stats available on", devices.short_device(measure_device), ":",
      peak_bytes(tf.constant, 0.0, device=measure_device) is not None)
print(f"policy this hardware trains in: {hardware_policy} ({why})")
print("16-bit policy measured below:", policy)
cnn_batch = config.pick(smoke=128, full=256)
repeats = config.pick(smoke=1, full=3)  # rounds of timing (16-bit may be emulated: slow)
with tf.device(measure_device):
    cnn32 = models.build_seed_cnn(name="cnn_fp32")
    with precision_policy(policy):
        cnn16 = models.build_seed_cnn(name="cnn_mixed")
    cnn16.set_weights(cnn32.get_weights())
xc = tf.constant(data.to_float(cifar.x_train[:cnn_batch]))
yc = tf.constant(cifar.y_train[:cnn_batch])
segments = 3  # about sqrt(8 layers), as Chen et al. suggest
cnn_variants = {
    "float32": keras_grad_step(cnn32),
    policy: keras_grad_step(cnn16),
    "float32 + recompute": keras_grad_step(cnn32, recompute_segments=segments),
    f"{policy} + recompute": keras_grad_step(cnn16, recompute_segments=segments),
}
cnn_pred = {
    name: memory.estimate(cnn_spec, training=memory.Training(
        "sgd", "fp32" if name.startswith("float32") else "keras_mixed", micro_batch=cnn_batch,
        recompute=segments if "recompute" in name else "none")).activations
    for name in cnn_variants
}
cnn_table, cnn_diffs = compare_variants(cnn_variants, xc, yc, measure_device, repeats, cnn_pred)
print(f"seed CNN, one training step on {cnn_batch} images:")
print(cnn_table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))

# %%
lm_batch = 64
lm_variants = {}
for name, kw in [("float32", {}), (policy, {"compute_dtype": policy.split("_")[1]}),
                 ("float32 + recompute", {"recompute": True}),
                 (f"{policy} + recompute", {"recompute": True, "compute_dtype": policy.split("_")[1]})]:
    lm_variants[name] = make_grad_fn(TransformerLM(lm_cfg, lm_weights, device=measure_device, **kw))
xl, yl = (tf.constant(a) for a in random_windows(train_ids, lm_batch, lm_cfg.seq_len, np.random.default_rng(1)))
lm_pred = {
    name: memory.estimate(lm_spec, training=memory.Training(
        "sgd", "fp32" if name.startswith("float32") else "keras_mixed", micro_batch=lm_batch,
        recompute="full" if "recompute" in name else "none")).activations
    for name in lm_variants
}
lm_table, lm_diffs = compare_variants(lm_variants, xl, yl, measure_device, repeats, lm_pred)
print(f"notebook transformer, one training step on {lm_batch} x {lm_cfg.seq_len} tokens:")
print(lm_table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))

# %%
# NBVAL_CHECK_OUTPUT
for model_name, diffs in [("seed CNN", cnn_diffs), ("transformer", lm_diffs)]:
    for name, d in diffs.items():
        if name == "float32":
            continue
        if name == "float32 + recompute":
            ok = d["loss"] <= 1e-6 and d["gradients"] <= 1e-5
            print(f"{model_name}, {name}: same loss and gradients as float32 (within 1e-6 / 1e-5): {ok}")
        else:
            ok = d["loss"] <= 1e-2 and d["cosine"] >= 0.99
            print(f"{model_name}, {name}: loss within 1% of float32, gradient cosine similarity >= 0.99: {ok}")

# %%
for model_name, table_ in [("seed CNN", cnn_table), ("transformer", lm_table)]:
    rows = table_.set_index("variant")
    for name in rows.index[1:]:
        peak = f"peak {rows.loc[name, 'peak vs first']:.2f}x, " if "peak vs first" in rows else ""
        print(f"{model_name:12s} {name:28s} {peak}time {rows.loc[name, 'time vs first']:.2f}x of float32")

# %% [markdown]
# What the measurements show on this machine (tables and summary lines above):
#
# - **Recomputation** gives the same loss and gradients as the plain float32 step, up to
#   float rounding (check cell). For the transformer it cuts the peak a lot: every block is
#   alike, and only the block inputs stay in memory. For this CNN it saves little or
#   nothing: the first convolution's output (30×30×32 values per image, the largest in the
#   layer table of section 1) must be in memory while its segment's backward pass runs,
#   recomputed or not. The calculator agrees: with checkpoints its CNN estimate goes *up*.
#   The price is time, an extra forward pass of every recomputed segment.
# - **Mixed precision** changes the numbers slightly (16-bit rounding: the loss within the
#   printed tolerance, gradients pointing the same way) and shrinks the activations for
#   both models. Its speed depends on the hardware: CPUs with native `bfloat16`
#   instructions (AVX-512 BF16, AMX) can gain, CPUs without them emulate it and run
#   slower, GPUs with tensor cores run 16-bit matmuls several times faster than float32.
#   The first lines of the measurement cell say which case this machine is (when it is
#   "float32", the 16-bit rows show what emulation costs, not a recipe to follow); read
#   the time column for what happened here.
# - The calculator counts only the activations each layer outputs. The measured peak also
#   holds what TensorFlow keeps for the backward pass of each op (inputs of convolutions,
#   pre-activation values, softmax outputs) and the gradients being built, so it is larger:
#   use the calculator for orders of magnitude and for comparing layouts, and measure
#   before you commit to a batch size.
#
# ## Summary
#
# - A 2-D `batch × model` mesh combines data and tensor parallelism in one program: layouts
#   say which tensors are split on which axis, DTensor inserts the all-reduces.
# - The hybrid CNN (replicated trunk, split head) computes the same losses and the same
#   first update as Keras's `MirroredStrategy`, up to float rounding, and learns CIFAR-10
#   on the mesh.
# - Per-device state bytes follow the shard shapes; `utils.memory` predicts them. Logical
#   CPUs show layouts and correctness, not speed.
# - A Megatron-sharded transformer block (heads split, MLP column- then row-parallel)
#   equals an unsharded Keras block in outputs and gradients, and trains on text that
#   ships with Python.
# - The calculator reproduces the ZeRO paper's figure 1 and answers "smallest layout that
#   fits": for a 175B model, tens of 80 GB devices with tensor parallelism, ZeRO and
#   recomputation.
# - Recomputation trades compute for activation memory with identical results, and pays
#   off when activations are spread over many similar layers (transformers), not when one
#   layer dominates (this CNN); mixed precision halves activation bytes at a small
#   numerical cost.
#
# ## Exercises
#
# 1. GPT-3 13B has 40 layers of width 5,120 and 40 heads. Find the smallest layout that
#    fits it on 40 GB devices with a micro-batch of 1, then with a micro-batch of 4. Which
#    part of the memory grows?

# %%
# Try it: build the 13B model with memory.transformer_spec and ask memory.smallest_layout.
gpt_13b = memory.transformer_spec("GPT-3 13B", 40, 5120, 40, 2048, 50257)
print(f"{gpt_13b.n_params / 1e9:.1f}B parameters")  # TODO: memory.smallest_layout(gpt_13b, 40, ...)

# %% jupyter={"source_hidden": true}
# Solution
for mb in (1, 4):
    fit = memory.smallest_layout(gpt_13b, 40, memory.Training("adam", "mixed", micro_batch=mb))
    print(f"micro-batch {mb}: {fit}")
    print("   ", {k: round(v, 2) for k, v in fit.breakdown.as_dict().items()})
# The activations grow with the micro-batch; the model states do not change.

# %% [markdown]
# 2. Repeat the equivalence check of section 1 on another mesh shape (for example the
#    last one of `shapes`: pure tensor parallelism of the head, with the trunk repeated on
#    every device). Do the first steps still match the `MirroredStrategy` run?

# %%
# Try it: pick a shape from `shapes`, build HybridCNN(wide, hybrid_mesh(*shape)), run mesh_steps.
other = shapes[-1]  # TODO: try another shape
print("mesh shape to try:", other)

# %% jupyter={"source_hidden": true}
# Solution
other_losses, other_weights = mesh_steps(HybridCNN(wide, hybrid_mesh(*other)), cifar.x_train,
                                         cifar.y_train, eq_steps, global_batch)
other_loss_diff = max_abs_diff(other_losses, ref_losses)
other_weight_diff = max_abs_diff(other_weights[0], ref_weights[0])
print(f"{other[0]}x{other[1]} mesh vs MirroredStrategy: max |loss diff| = {other_loss_diff:.1e}, "
      f"max |weight diff| after step 1 = {other_weight_diff:.1e}")
print("equal within the same tolerances:", other_loss_diff <= TOL and other_weight_diff <= 1e-6)

# %% [markdown]
# 3. With the calculator, find the largest micro-batch of the 1.3B model that fits 24 GB
#    devices on 8 devices with ZeRO-2 (`Layout(dp=8, zero=2)`), without and with full
#    recomputation.

# %%
# Try it: raise the micro-batch until memory.estimate(...).total exceeds 24 GB.
mb = 1  # TODO: search
total = memory.estimate(gpt_1b, memory.Layout(dp=8, zero=2), memory.Training("adam", "mixed", micro_batch=mb)).total
print(f"micro-batch {mb}: {total / memory.GB:.1f} GB per device")

# %% jupyter={"source_hidden": true}
# Solution
for rc in ("none", "full"):
    best = 0
    for mb in range(1, 257):
        b = memory.estimate(gpt_1b, memory.Layout(dp=8, zero=2), memory.Training("adam", "mixed", micro_batch=mb, recompute=rc))
        if b.total > 24 * memory.GB:
            break
        best = mb
    print(f"recompute={rc}: largest micro-batch that fits 24 GB = {best}")

# %% [markdown]
# ## Further reading
#
# - S. Rajbhandari, J. Rasley, O. Ruwase, Y. He. *ZeRO: Memory Optimizations Toward
#   Training Trillion Parameter Models*, 2019. [arXiv:1910.02054](https://arxiv.org/abs/1910.02054)
# - M. Shoeybi et al. *Megatron-LM: Training Multi-Billion Parameter Language Models Using
#   Model Parallelism*, 2019. [arXiv:1909.08053](https://arxiv.org/abs/1909.08053)
# - D. Narayanan et al. *Efficient Large-Scale Language Model Training on GPU Clusters
#   Using Megatron-LM*, 2021 (combining data, tensor and pipeline parallelism).
#   [arXiv:2104.04473](https://arxiv.org/abs/2104.04473)
# - V. Korthikanti et al. *Reducing Activation Recomputation in Large Transformer Models*,
#   2022 (activation memory per block). [arXiv:2205.05198](https://arxiv.org/abs/2205.05198)
# - T. Chen, B. Xu, C. Zhang, C. Guestrin. *Training Deep Nets with Sublinear Memory
#   Cost*, 2016. [arXiv:1604.06174](https://arxiv.org/abs/1604.06174)
# - P. Micikevicius et al. *Mixed Precision Training*, 2017.
#   [arXiv:1710.03740](https://arxiv.org/abs/1710.03740)
# - T. Brown et al. *Language Models are Few-Shot Learners* (GPT-3 model sizes), 2020.
#   [arXiv:2005.14165](https://arxiv.org/abs/2005.14165)
# - TensorFlow guides: [DTensor concepts](https://www.tensorflow.org/guide/dtensor_overview),
#   [Distributed training with DTensors](https://www.tensorflow.org/tutorials/distribute/dtensor_ml_tutorial),
#   [Mixed precision](https://www.tensorflow.org/guide/mixed_precision),
#   [`tf.recompute_grad`](https://www.tensorflow.org/api_docs/python/tf/recompute_grad).
