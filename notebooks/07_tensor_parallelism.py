# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# **Run time**
#
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`) | about 2 minutes | not measured yet |
# | smoke (`SERIES_MODE=smoke`) | under 1 minute | not measured yet |

# %% [markdown]
# ## Setup
#
# `utils.devices.setup_devices()` must run before any other TensorFlow code: on a machine
# without GPUs it splits the CPU into 4 *logical* CPUs. DTensor only needs those devices to
# exist. You do **not** need `dtensor.initialize_accelerator_system()` here: in DTensor's
# *local mode* (one process, its own devices) that call would only re-create the logical
# CPUs, which `setup_devices()` has already done, and it must run before TensorFlow starts.
# You need it for meshes that span several hosts.

# %%
import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, data, devices, models
from utils import tensor_parallel as tp

import re
import time

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow.experimental import dtensor

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
#   (a 1×N grid). The hybrid-parallelism notebook adds a second dimension, `"batch"`, for data parallelism;
# - a **layout**: the mesh plus one **sharding spec** per tensor axis. A spec is either the
#   name of a mesh dimension (the axis is cut into equal slices, one per device along that
#   dimension) or `unsharded` (every device holds the whole axis).
#
# So a weight matrix with layout `[unsharded, model]` is split by *columns*: on a 4-device
# mesh each device holds all rows and a quarter of the columns. `[model, unsharded]` splits
# it by rows; `[unsharded, unsharded]` is a full copy on every device (*replicated*).
#
# The dense head below has 1,024 hidden units. `tp.model_mesh(N)` takes the first N devices
# that `utils.devices.compute_devices()` lists: the logical CPUs here, the real GPUs on a
# GPU machine. N is the largest device count that divides 1,024 (all of them on 1, 2, 4 or
# 8 devices).

# %%
HIDDEN = 1024  # the seed head's 128 units, 8x wider
available = devices.compute_devices()
N = max(n for n in range(1, len(available) + 1) if HIDDEN % n == 0)
mesh = tp.model_mesh(N)
print(
    f"device kind: {devices.device_kind()}, devices available: {len(available)}, mesh size N = {N}"
)
print("mesh dims:", dict(zip(mesh.dim_names, mesh.shape(), strict=True)))
print(tp.mesh_table(mesh).to_string(index=False))

# %% [markdown]
# Lay out one small matrix three ways and look at what each device actually stores.
# `tp.shard()` cuts the matrix on the host and sends each device only its own slice;
# `tp.to_numpy()` puts the slices back together by their mesh coordinates.

# %%
# NBVAL_CHECK_OUTPUT
demo = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
demos = {
    "by columns": tp.shard(demo, tp.layout(mesh, None, "model")),
    "by rows": tp.shard(demo, tp.layout(mesh, "model", None)),
    "replicated": tp.shard(demo, tp.replicated(mesh, 2)),
}
print(tp.layout_table(demos).to_string(index=False))
first_shard = dtensor.unpack(demos["by columns"])[0]
print("\nfirst device's slice of the column layout:\n", first_shard.numpy())
print(
    "round trip gives the matrix back:",
    all(np.array_equal(tp.to_numpy(t), demo) for t in demos.values()),
)

# %% [markdown]
# ## 2. The data and the model
#
# The seed CNN keeps almost all its parameters in its dense head: the flattened 4×4×128
# feature map (2,048 values) goes into `dense1`, then a 10-way output layer. That head is
# what you split. Make it 8× wider (1,024 hidden units instead of 128) so that there is
# something worth splitting, and keep the output as *logits* (the softmax moves into the
# loss, `from_logits=True`), because the row-parallel layer's output only exists after the
# all-reduce.
#
# The convolutional trunk of the seed CNN (`conv1` … `flatten`) turns images into the
# 2,048 features. It stays on one device and frozen here, at its initial weights, so that
# everything you compare below is the head; the hybrid-parallelism notebook shards a whole block. An untrained
# trunk gives tiny features (their spread is printed below), so standardise each feature
# with the training set's mean and standard deviation, as you would any input.

# %%
cifar = data.load_cifar10(allow_synthetic=config.is_smoke(), n_train=S.n_train, n_test=S.n_test)
print(cifar.describe())

seed_cnn = models.build_seed_cnn()
trunk = keras.Model(
    seed_cnn.inputs[0], seed_cnn.get_layer("flatten").output, name="trunk"
)  # conv1 ... flatten
STEPS = config.pick(smoke=S.steps, full=150)
BATCH = S.batch_size
n_feat = min(len(cifar.x_train), STEPS * BATCH)


def features(images: np.ndarray) -> np.ndarray:
    """The frozen trunk's 2,048 features for uint8 images, computed in batches of 512."""
    return np.concatenate(
        [
            trunk(images[i : i + 512].astype("float32") / 255.0).numpy()
            for i in range(0, len(images), 512)
        ]
    )


t0 = time.perf_counter()
f_train, y_train = features(cifar.x_train[:n_feat]), cifar.y_train[:n_feat].astype("int32")
f_test, y_test = features(cifar.x_test), cifar.y_test.astype("int32")
print(f"raw trunk features: mean {f_train.mean():.4f}, std {f_train.std():.4f}")
mu, sd = f_train.mean(axis=0), f_train.std(axis=0) + 1e-3
f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
print(f"features: train {f_train.shape}, test {f_test.shape} ({time.perf_counter() - t0:.1f} s)")

# %%
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
# DTensor inserts both: you only declare the layouts. `tp.ShardedMLP.from_keras()` copies
# the Keras head's weights onto the mesh.

# %%
# NBVAL_CHECK_OUTPUT
mlp = tp.ShardedMLP.from_keras(head.get_layer("dense1"), head.get_layer("output"), mesh)
print("weights:")
print(tp.layout_table(mlp.weights()).to_string(index=False))
x_batch, y_batch = f_train[:BATCH], y_train[:BATCH]
print("\nactivations for one batch:")
print(tp.layout_table(mlp.activations(x_batch)).to_string(index=False))

# %% [markdown]
# Read the tables: `dense1/kernel` is `[unsharded, model]` and each device stores
# 2,048×(1,024/N) of it; the hidden activations are `[unsharded, model]` too, each device
# holding its own units for the whole batch; `output/kernel` is `[model, unsharded]`, cut
# along the same 1,024 units. The logits are `[unsharded, unsharded]`: every device ends
# with the full result, which is what an all-reduce produces.
#
# To *see* the all-reduce, do it by hand. `mlp.row.partial_sums(hidden)` runs only the
# local matmul $H_iB_i$ on each device and returns the N partial results without adding
# them. Each one alone is far from the logits (when N > 1); their sum is the logits.

# %%
acts = mlp.activations(x_batch)
partials = [p.numpy() for p in mlp.row.partial_sums(acts["dense1 output (hidden)"])]
logits = tp.to_numpy(acts["logits"])
bias = tp.to_numpy(mlp.row.bias)
for device, p in zip(tp.mesh_table(mesh)["device"], partials, strict=True):
    print(
        f"{device}: partial sum alone, max |diff| to logits = {np.max(np.abs(p + bias - logits)):.3f}"
    )
print(
    f"sum of partial sums, max |diff| to logits = {np.max(np.abs(sum(partials) + bias - logits)):.2e}"
)

# %%
# NBVAL_CHECK_OUTPUT
TOL = 1e-5  # relative: max |difference| / max |reference|
print("partial sums per device:", len(partials), "of shape", partials[0].shape)
print(
    f"sum of partial sums equals the logits within {TOL:g} (relative):",
    tp.max_rel_diff(sum(partials) + bias, logits) <= TOL,
)

# %% [markdown]
# ## 4. Proofs: the split head computes what the one-device head computes
#
# Floating-point addition is not associative: the sharded head adds the 1,024 products of
# each logit in N groups and then adds the groups, the Keras head adds them in another
# order. Expect differences of a few float32 roundings (float32 has a relative precision of
# about 1.2e-7), not zero. Every comparison below is *relative*: the largest absolute
# difference divided by the largest absolute value of the one-device result, so the same
# tolerance works for logits and for the much smaller gradients of a mean loss. The
# tolerance, 1e-5, is about 100× float32's precision, and far below what a wrong shard, a
# missing all-reduce or a bias added N times produces (the partial sums above were off by
# a large fraction of the logits).
#
# ### Forward

# %%
fwd_abs = tp.max_abs_diff(mlp(x_batch), head(x_batch))
fwd_rel = tp.max_rel_diff(mlp(x_batch), head(x_batch))
print(
    f"forward: max |sharded - one device| = {fwd_abs:.2e}, relative {fwd_rel:.2e} (tolerance {TOL:g})"
)

# %%
# NBVAL_CHECK_OUTPUT
print(f"forward output equal to the one-device head within {TOL:g} (relative):", fwd_rel <= TOL)

# %% [markdown]
# ### Gradients
#
# Compute the gradients of the same cross-entropy loss on both sides. DTensor gradients
# are computed inside `tf.function` (in eager mode DTensor cannot start the tape from a
# plain tensor). Inputs and labels go onto the mesh with `tp.shard()`: the features
# replicated (every device needs the whole input), the labels replicated as well.

# %%
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
with tf.GradientTape() as tape:
    ref_loss = loss_fn(y_batch, head(x_batch))
ref_grads = dict(zip(mlp.weights(), tape.gradient(ref_loss, head.trainable_variables), strict=True))

xs, ys = tp.shard(x_batch, mlp.input_layout), tp.shard(y_batch, tp.layout(mesh, None))
weights = mlp.weights()


@tf.function
def sharded_loss_and_grads(x, y):
    with tf.GradientTape() as tape:
        loss = tp.sparse_cross_entropy(mlp(x), y)
    return loss, tape.gradient(loss, list(weights.values()))


loss, grads = sharded_loss_and_grads(xs, ys)
grads = dict(zip(weights, grads, strict=True))
grad_table = pd.DataFrame(
    {
        "weight": list(weights),
        "gradient layout": [tp.spec_string(g) for g in grads.values()],
        "max |gradient|": [f"{np.max(np.abs(tp.to_numpy(ref_grads[w]))):.2e}" for w in weights],
        "max |diff|": [f"{tp.max_abs_diff(grads[w], ref_grads[w]):.2e}" for w in weights],
        "relative": [f"{tp.max_rel_diff(grads[w], ref_grads[w]):.2e}" for w in weights],
    }
)
print(f"loss: sharded {float(tp.to_numpy(loss)):.6f}, one device {float(ref_loss):.6f}")
print(grad_table.to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
for w in weights:
    same_layout = tp.spec_string(grads[w]) == tp.spec_string(weights[w])
    equal = tp.max_rel_diff(grads[w], ref_grads[w]) <= TOL
    print(f"{w:14s} gradient sharded like its weight: {same_layout}; equal within {TOL:g}: {equal}")
print(f"loss equal within {TOL:g} (relative):", tp.max_rel_diff(loss, ref_loss) <= TOL)

# %% [markdown]
# Each gradient comes out with its weight's layout, so the update `w -= lr * g` runs shard
# by shard on the device that owns it: no device ever holds a full gradient of a sharded
# weight.
#
# ### A short training run, step for step
#
# `tp.compare_sgd_training()` trains two copies from the same starting weights on the same
# batches with plain SGD: the Keras head with `train_on_batch` on one device, and the
# sharded head with `tp.make_sgd_step()`, a compiled step that updates every shard where it
# lives. After every step it records both losses and the relative difference of *all*
# weights.
#
# Run it twice. First in **float64** (both heads copied to float64): here rounding is about
# 1e-16, so any real disagreement between the two programs would stand out at once. Then
# in **float32**, the precision you actually train in.

# %%
LR = 0.0625  # exactly representable in float32, the precision Keras stores it in
batches = [
    (f_train[i * BATCH : (i + 1) * BATCH], y_train[i * BATCH : (i + 1) * BATCH])
    for i in range(STEPS)
]


def head_copy(dtype: str) -> keras.Model:
    """The wide head with the same starting weights, in ``dtype``."""
    copy = keras.Sequential(
        [keras.Input((IN_FEATURES,), dtype=dtype)]
        + [
            keras.layers.Dense.from_config({**layer.get_config(), "dtype": dtype})
            for layer in head.layers
        ]
    )
    copy.set_weights([w.astype(dtype) for w in head.get_weights()])
    return copy


runs = {}
for dtype in ["float64", "float32"]:
    ref_head = head_copy(dtype)
    train_mlp = tp.ShardedMLP.from_keras(
        ref_head.get_layer("dense1"), ref_head.get_layer("output"), mesh
    )
    runs[dtype] = (tp.compare_sgd_training(ref_head, train_mlp, batches, LR), ref_head, train_mlp)
    log = runs[dtype][0]
    print(
        f"{dtype}: {STEPS} steps of batch {BATCH}, loss {log['loss one device'].iloc[0]:.4f} -> "
        f"{log['loss one device'].iloc[-1]:.4f}; max |loss diff| {log['|loss diff|'].max():.2e}; "
        f"weights: max relative diff {log['weights rel diff'].max():.2e}"
    )
print(
    runs["float32"][0]
    .iloc[sorted({0, 1, 2, STEPS - 1})][
        ["step", "loss one device", "loss sharded", "|loss diff|", "weights rel diff"]
    ]
    .to_string(index=False)
)

# %%
# NBVAL_CHECK_OUTPUT
log64 = runs["float64"][0]
TOL_LOSS, TOL_W64 = 1e-6, 1e-12
print(
    "float64 losses equal step for step within",
    TOL_LOSS,
    "(relative):",
    bool((log64["|loss diff|"] / log64["loss one device"]).max() <= TOL_LOSS),
)
print(
    "float64 weights equal after every step within",
    TOL_W64,
    "(relative):",
    bool(log64["weights rel diff"].max() <= TOL_W64),
)
print("the loss went down:", log64["loss sharded"].iloc[-1] < log64["loss sharded"].iloc[0])

# %% [markdown]
# In float64 the two programs agree to float64 rounding after every step: they compute the
# same function, gradients and updates. The loss tolerance is 1e-6 because Keras reports its
# loss through a float32 metric; the weights are compared at full float64 precision.
#
# In float32 the loss curves lie on top of each other and the weights stay within float32
# rounding of each other over this run (the largest relative difference is printed
# above). Do not expect bit-for-bit agreement in general: rounding differences can grow
# as training goes on, and ReLU adds jumps. When a hidden unit's pre-activation for some
# image lies within one rounding of zero, one program can see the unit as active and the
# other as inactive; that image's whole gradient contribution is then present in one
# update and missing in the other. Any two float32 programs that add in different orders
# can do this (two GPU models, a different batch split); it would not be a sharding
# error, which is what the float64 run proves.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
log32 = runs["float32"][0]
ax1.plot(log32["loss one device"], label="one device (Keras)", lw=3, alpha=0.5)
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
# give the same answers).

# %%
_, ref_head, train_mlp = runs["float32"]
ref_pred = np.argmax(ref_head.predict(f_test, batch_size=1024, verbose=0), axis=1)
tp_pred = np.argmax(tp.to_numpy(train_mlp(f_test)), axis=1)
print(
    f"test accuracy: one device {np.mean(ref_pred == y_test):.3f}, sharded {np.mean(tp_pred == y_test):.3f}"
)
print(f"same predicted class on {np.mean(ref_pred == tp_pred):.2%} of {len(y_test):,} test images")
steady = log32.iloc[1:] if STEPS > 1 else log32  # step 0 includes compiling
print(
    f"time per step: one device {1e3 * steady['s one device'].median():.1f} ms, "
    f"sharded {1e3 * steady['s sharded'].median():.1f} ms (median over steps after the first)"
)

# %% [markdown]
# Whatever the two step times show, they are not a speed-up measurement. The logical CPUs
# share the same 2 cores, so the sharded step does the same arithmetic on the same cores,
# plus the copies and the all-reduce, and it pays for cutting each batch on the host and
# sending it to every device. What the logical devices show is the *semantics*: who
# stores what, and where the communication is. On real GPUs each device has its own
# memory and compute, so the per-device weights shrink by N and the matmuls run N-way in
# parallel, while each all-reduce moves batch × 10 floats per forward pass.
#
# ## 5. Memory: bytes per device
#
# `tp.bytes_per_device()` reads the shape of every shard each device actually stores
# (`dtensor.unpack`) and multiplies by 4 bytes (float32). The last column is the largest
# per-device share divided by the unsharded size: 1/N for a split weight, 1 for the
# replicated output bias.

# %%
# NBVAL_CHECK_OUTPUT
print(tp.bytes_per_device(mlp.weights()).to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for n in [d for d in range(1, len(available) + 1) if HIDDEN % d == 0]:
    table = tp.bytes_per_device(
        tp.ShardedMLP.from_keras(
            head.get_layer("dense1"), head.get_layer("output"), tp.model_mesh(n)
        ).weights()
    )
    per_device = table.iloc[-1][[c for c in table.columns if ":" in c]].max()
    total = table.iloc[-1]["total"]
    rows.append(
        {
            "N": n,
            "bytes per device": per_device,
            "unsharded bytes": total,
            "total / N": total // n,
            "per device / (total / N)": f"{per_device / (total / n):.4f}",
        }
    )
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
# over 4 devices by columns, and the layer refuses to build with an error that says what to
# do:

# %%
# NBVAL_CHECK_OUTPUT
try:
    tp.ColumnParallelDense.create(HIDDEN, CLASSES, tp.model_mesh(len(available)), name="output")
    print(f"no error: {CLASSES} is divisible by {len(available)}")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# The fix that keeps any N is **padding**: add zero columns until the size divides
# (10 → 12 for N = 4), shard, and slice the padding off the output before anything
# looks at it. For logits the slicing is essential: a padded logit of 0 would still get
# probability mass in a softmax. Megatron pads its vocabulary the same way. Exercise 1
# does it. The other fix is to choose N among the divisors of the dimension, as this
# notebook does for the 1,024 hidden units.
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
# output channels and it refuses:

# %%
# NBVAL_CHECK_OUTPUT
conv1 = trunk.get_layer("conv1")
images = cifar.x_test[:BATCH].astype("float32") / 255.0
x_mesh = tp.shard(images, tp.replicated(mesh, 4))
filt = tp.shard(conv1.kernel.numpy(), tp.layout(mesh, None, None, None, "model"))
try:
    tf.nn.conv2d(x_mesh, filt, strides=1, padding="VALID")
    print("DTensor accepted a filter split over output channels")
except Exception as err:  # DTensor reports it as an UnknownError from its SPMD expansion
    found = re.search(r"Filter for convolution must have [a-z ]+ layout", str(err))
    print(type(err).__name__ + ":", found.group(0) if found else str(err).splitlines()[0])

# %% [markdown]
# So split it by hand. `tp.ChannelShardedConv2D` keeps one ordinary `tf.Variable` slice of
# the filters and bias on each device (`tf.device`), runs each slice's convolution on its
# device and concatenates the outputs on the first device. Gradients flow through ordinary
# autodiff. Apply it to the seed CNN's `conv1` on real test images:

# %%
# NBVAL_CHECK_OUTPUT
conv_devices = available[: max(n for n in range(1, len(available) + 1) if conv1.filters % n == 0)]
sharded_conv = tp.ChannelShardedConv2D.from_keras(conv1, conv_devices)
print(tp.layout_table(sharded_conv.weights()).to_string(index=False))
parts = sharded_conv.partial_outputs(images)
print(
    "\nper-device outputs:",
    [tuple(p.shape) for p in parts],
    "-> concatenated:",
    tuple(sharded_conv(images).shape),
)
print()
print(tp.bytes_per_device(sharded_conv.weights()).to_string(index=False))

# %% [markdown]
# Compare the output and the gradients with `conv1` on one device. The bias gradient adds
# up batch × 30 × 30 = 115,200 values per channel, and the two programs may add them in
# different orders (the reduction is laid out differently for 8 channels than for 32); for
# a sum that long, allow 1e-4 relative instead of 1e-5.

# %%
TOL_SUM = 1e-4  # for gradients that sum over the whole batch and every pixel
with tf.GradientTape() as tape:
    ref_out = conv1(images)
    ref_conv_loss = tf.reduce_mean(ref_out**2)
ref_conv_grads = tape.gradient(ref_conv_loss, [conv1.kernel, conv1.bias])
with tf.GradientTape() as tape:
    out = sharded_conv(images)
    conv_loss = tf.reduce_mean(out**2)
g = tape.gradient(conv_loss, sharded_conv.kernels + sharded_conv.biases)
k = len(conv_devices)
conv_pairs = {
    "output": (out, ref_out),
    "kernel gradient": (np.concatenate([t.numpy() for t in g[:k]], axis=-1), ref_conv_grads[0]),
    "bias gradient": (np.concatenate([t.numpy() for t in g[k:]]), ref_conv_grads[1]),
}
conv_diffs = {name: tp.max_rel_diff(a, b) for name, (a, b) in conv_pairs.items()}
for name, (a, b) in conv_pairs.items():
    print(
        f"conv1 {name}: max |sharded - one device| = {tp.max_abs_diff(a, b):.2e}, relative {conv_diffs[name]:.2e}"
    )

# %%
# NBVAL_CHECK_OUTPUT
conv_tols = {"output": TOL, "kernel gradient": TOL_SUM, "bias gradient": TOL_SUM}
for name, diff in conv_diffs.items():
    print(
        f"channel-split conv1 {name} equal within {conv_tols[name]:g} (relative):",
        diff <= conv_tols[name],
    )

# %% [markdown]
# Splitting over output channels needs no arithmetic change in the forward pass (each
# output channel depends on its own filter only), so the outputs agree to the last bit;
# only the order of the long sums in the gradients differs.
# The price is communication: every device needs the whole input, and the outputs are
# gathered afterwards.
#
# ## 7. The same code on real GPUs
#
# Nothing above names a CPU. `utils.devices.compute_devices()` returns the GPUs when
# there are any, `tp.model_mesh()` builds the mesh from them, `tp.shard()` sends each GPU
# its slice, and DTensor runs the all-reduce with the GPUs' collective operations. Run
# this notebook on a machine with 2, 4 or 8 GPUs and the tables show `GPU:0`, `GPU:1`, …
# On a single GPU the mesh has one device and every check still runs (trivially split).
# The committed outputs come from logical CPUs; the GPU run has not been measured yet.
# Tensor parallelism communicates in every layer, forward and backward, so it is used
# inside one server whose GPUs are joined by a fast link (NVLink); across servers you
# combine it with data or pipeline parallelism (the hybrid-parallelism notebook).

# %% [markdown]
# ## Summary
#
# - A DTensor **mesh** names the devices' grid (`model=N`); a **layout** gives every
#   tensor axis a **sharding spec**: a mesh dim name to split it, or `unsharded`.
# - A Megatron MLP splits the first dense layer by columns and the second by rows. The
#   hidden activations stay split between them; the forward pass needs exactly one
#   all-reduce (the partial sums of the second layer), the backward pass one more.
# - The sharded head matched the one-device Keras head: forward outputs and gradients
#   within 1e-5 relative to their size, and a float64 training run agreed to float64
#   rounding after every step. A float32 run drifts apart slowly because of the ReLU kink,
#   as any reordering of float32 sums does.
# - Each device stores total/N of every split weight (plus the small replicated bias),
#   read from the actual shards; gradients and optimizer state split the same way.
# - N must divide the split dimension: pad (and slice off) otherwise.
# - DTensor refuses convolution filters split over output channels, so `tp.ChannelShardedConv2D`
#   splits them by hand with `tf.device` and a concatenation, again equal to one device
#   within the stated tolerances.
# - Logical CPUs share the same cores: this notebook shows correctness and memory layout,
#   not speed. On GPUs the same code divides weights and matmul work by N.

# %% [markdown]
# ## Exercises
#
# 1. **Pad the output layer.** Make the 10-class output layer column-parallel on a
#    4-device mesh by padding it to 12 columns with zeros. Check that the first 10 of the
#    12 outputs equal the Keras output layer's logits.
# 2. **Count the communication.** For a batch of $b$ images, how many floats does the
#    forward all-reduce of the head add up, and how does that compare with the number of
#    weights of `dense1` that no longer need to be copied to every device? Compute both.
# 3. **Split a convolution over input channels.** Split `conv1`'s filter over its 3 input
#    channels (one per device, on 3 devices or fewer), convolve each device's input channel
#    with its filter slice, and add the partial outputs. Check that the sum plus the bias
#    equals `conv1`'s output before its ReLU.

# %% jupyter={"source_hidden": true}
# Solution 1
n_pad = len(available)
padded = -(-CLASSES // n_pad) * n_pad  # round 10 up to a multiple of N
k_out, b_out = head.get_layer("output").get_weights()
k_pad = np.concatenate([k_out, np.zeros((HIDDEN, padded - CLASSES), np.float32)], axis=1)
b_pad = np.concatenate([b_out, np.zeros(padded - CLASSES, np.float32)])
padded_out = tp.ColumnParallelDense(k_pad, b_pad, tp.model_mesh(n_pad), name="output_padded")
hidden = head.get_layer("dense1")(x_batch)
logits_padded = tp.to_numpy(padded_out(hidden.numpy()))
print("padded kernel shard shapes:", sorted({s for _, s in tp.shard_shapes(padded_out.kernel)}))
diff = tp.max_rel_diff(logits_padded[:, :CLASSES], head.get_layer("output")(hidden))
print(f"first {CLASSES} padded logits equal within {TOL:g} (relative):", diff <= TOL)

# %% jupyter={"source_hidden": true}
# Solution 2
b = BATCH
allreduce_floats = b * CLASSES  # the partial logits every device contributes
dense1_params = IN_FEATURES * HIDDEN + HIDDEN
saved = dense1_params - dense1_params // N  # what each device no longer stores
print(f"forward all-reduce: {allreduce_floats:,} floats per batch of {b}")
print(f"dense1 weights each device no longer stores (N={N}): {saved:,} floats")
print(
    "(the backward all-reduce of the input gradient adds b x 2,048 =",
    f"{b * IN_FEATURES:,} floats)",
)

# %% jupyter={"source_hidden": true}
# Solution 3
n_in = min(3, len(available))
kernel, conv_bias = conv1.get_weights()
groups = np.array_split(np.arange(3), n_in)  # input channels per device
partial_outs = []
for device, channels in zip(available[:n_in], groups, strict=True):
    with tf.device(device):
        partial_outs.append(
            tf.nn.conv2d(
                tf.gather(images, channels, axis=-1), kernel[:, :, channels, :], 1, "VALID"
            )
        )
with tf.device(available[0]):
    summed = tf.add_n([tf.identity(p) for p in partial_outs]) + conv_bias
pre_relu = tf.nn.conv2d(images, kernel, 1, "VALID") + conv_bias
print("partial outputs:", len(partial_outs), "x", tuple(partial_outs[0].shape))
print(
    f"sum of input-channel partials equal within {TOL:g} (relative):",
    tp.max_rel_diff(summed, pre_relu) <= TOL,
)

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
