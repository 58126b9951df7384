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
# # Data parallelism with MirroredStrategy
#
# The seed article calls `tf.distribute.MirroredStrategy` "model parallelism". It is not:
# `MirroredStrategy` is **data parallelism**. Every device holds a *complete* copy of the
# model and works on a different slice of each batch. This notebook explains what that
# means, writes the ring all-reduce at its heart by hand, runs data parallelism with Keras
# `model.fit` and with a custom training loop, **proves** that one step on N replicas
# equals one step on one device, and shows in numbers what a wrongly scaled loss does.
#
# ## What you will learn
#
# - Why `MirroredStrategy` is data parallelism and not model parallelism: replicas,
#   mirrored variables, all-reduce of gradients.
# - Global versus per-replica batch size, and how to scale the learning rate.
# - How a ring all-reduce works (reduce-scatter, then all-gather), written by hand across
#   the devices and checked against `MirroredStrategy`'s own, and what it moves: 2(N−1)/N ×
#   the gradient bytes per device.
# - How to train under the strategy with `model.fit` and with a custom loop
#   (`strategy.run` + `tf.nn.compute_average_loss`).
# - How to check that N replicas compute exactly what one device computes, and what goes
#   wrong when the loss is averaged per replica instead of over the global batch.
#
# ## Run time
#
# Measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 1.6 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 46 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# `setup_devices()` must run before any other TensorFlow code: without a GPU it splits the
# CPU into 4 *logical* CPUs (set `SERIES_NUM_CPUS` to change that). They share the same two
# physical cores, so they show the *semantics* of multi-device training, not a speed-up. On
# a machine with GPUs the same code uses every GPU instead.

# %% tags=["device-check"]
import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, devices

print("mode:", config.get_mode())
print(devices.setup_devices().to_string(index=False))

# %% tags=["device-check"]
import itertools
import time

import keras
import pandas as pd
import tensorflow as tf

from utils import bench, data, models
from utils.lessons.cifar10_pipeline import make_dataset

tf.get_logger().setLevel("WARNING")  # Jupyter would show TensorFlow's INFO lines (e.g. each strategy's devices)
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 20)
S = config.sizes()
print("seed:", config.seed_everything())
print("TensorFlow", tf.__version__, "| Keras", keras.__version__, "| devices:", devices.device_kind())

# %% [markdown]
# Every claim of "equal" in this series is a printed number against a stated tolerance.
# Two small functions measure the gap between two sets of tensors (weights, gradients,
# logits); later notebooks reuse them (`#@save` marks code that is exported to
# `utils.lessons`, see the README).

# %% tags=["device-check"]
#@save
import numpy as np
import tensorflow as tf


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over two tensors or two matching nests (lists, dicts) of tensors."""
    pairs = zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in pairs)


def max_rel_diff(a, b) -> float:
    """Largest |a - b| / max|b| over matching tensors: a gap relative to b's scale."""
    pairs = zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True)
    return max(max_abs_diff(x, y) / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)
               for x, y in pairs)


# %% [markdown]
# ## Data parallelism is not model parallelism
#
# There are two basic ways to spread training over N devices:
#
# | | data parallelism (`MirroredStrategy`) | model parallelism (later notebooks) |
# |---|---|---|
# | what is split | each **batch** of examples | the **model** (layers, or tensors inside a layer) |
# | each device holds | a full copy of every weight | only its part of the weights |
# | what travels between devices | gradients, once per step (all-reduce) | activations and their gradients, inside every forward and backward pass |
# | largest model | must fit on **one** device | can exceed one device |
# | what it buys | more examples per second | room for a model too large for one device |
#
# So data parallelism does not help with a model that is *too large for one device*,
# which is what this series is about. It is still the first tool to learn: it is the
# simplest way to use several devices, and every larger scheme (hybrid parallelism, ZeRO,
# FSDP) combines it with something else.
#
# One training step of `MirroredStrategy` with N replicas and a global batch of B examples:
#
# 1. the input pipeline's batch of B examples is split into N per-replica batches of B/N;
# 2. every replica runs the forward and backward pass on its B/N examples, with its own
#    copy of the weights, and gets gradients;
# 3. an **all-reduce** sums the N gradients, so every replica ends up with the same sum;
# 4. every replica applies the same update to its copy: the copies stay identical
#    ("mirrored").
#
# ## Replicas and mirrored variables
#
# `devices.make_strategy()` builds a `MirroredStrategy` over `devices.compute_devices()`:
# all GPUs if there are any, else all logical CPUs.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
strategy = devices.make_strategy()
N = strategy.num_replicas_in_sync
REPLICA_DEVICES = list(strategy.extended.worker_devices)
print("replicas:", N)
print(pd.DataFrame({
    "replica": range(N),
    "device": [devices.short_device(d) for d in REPLICA_DEVICES],
    "all-reduce": type(strategy.extended._cross_device_ops).__name__,  # private: the implementation chosen
}).to_string(index=False))

# %% [markdown]
# The "all-reduce" column is the implementation TensorFlow chose: `CollectiveAllReduce`
# for CPUs (and NCCL-based all-reduce for several GPUs).
#
# Variables created inside `strategy.scope()` become *mirrored variables*: one copy per
# replica, kept in sync. A Keras 3 variable wraps a `tf.Variable` in `.value`; under the
# strategy that is a `MirroredVariable`.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
with strategy.scope():
    fit_model = models.build_seed_cnn(name="fit_model")
kernel = fit_model.get_layer("conv1").kernel
copies = strategy.experimental_local_results(kernel.value)
print("conv1 kernel:", type(kernel.value).__name__, tuple(kernel.shape))
print(f"copies: {len(copies)}, one per replica: {len(copies) == N}")
print("all copies equal:", all(np.array_equal(copies[0].numpy(), c.numpy()) for c in copies))
print(f"parameters per copy: {fit_model.count_params():,}")

# %% [markdown]
# ## Global batch, per-replica batch, learning rate
#
# The batch the input pipeline produces is the **global** batch. Each replica sees
# global / N examples per step, so the global batch must be a multiple of N. The series'
# batch is 128; with a device count that does not divide it, this notebook takes the
# largest multiple of N below it and says so.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
GLOBAL_BATCH = S.batch_size // N * N  # every replica gets the same number of examples
PER_REPLICA = GLOBAL_BATCH // N
if N == 1:
    print(f"1 device: nothing is split; the one replica gets the whole global batch of {GLOBAL_BATCH}")
elif GLOBAL_BATCH != S.batch_size:
    print(f"{S.batch_size} examples do not split evenly over {N} replicas: using global batch {GLOBAL_BATCH}")
print(f"global batch {GLOBAL_BATCH} = {N} replicas x {PER_REPLICA} examples")

# %% [markdown]
# If you keep the per-replica batch fixed and add replicas, the global batch grows, there
# are fewer steps per epoch, and the learning rate usually has to grow with it. The
# *linear scaling rule* (Goyal et al., 2017) multiplies the learning rate by the same
# factor as the batch (with a warm-up for large factors); for Adam a square-root rule is
# also common. From a learning rate of `1e-3` at one replica:

# %%
# NBVAL_CHECK_OUTPUT
print(pd.DataFrame([
    {"replicas": n, "per-replica batch": PER_REPLICA, "global batch": n * PER_REPLICA,
     "lr (linear rule)": 1e-3 * n, "lr (sqrt rule)": round(1e-3 * n**0.5, 6)}
    for n in (1, 2, 4, 8)
]).to_string(index=False))

# %% [markdown]
# ## The all-reduce, written by hand
#
# After the backward pass each replica holds a gradient as large as the model. The
# all-reduce turns N gradients into their sum on every device. A **ring all-reduce**
# (Patarasuk & Yuan, 2009; used by NCCL and by collective ops) cuts every device's tensor
# into N chunks and arranges the devices in a ring, each sending only to its right-hand
# neighbour. It runs two phases of N−1 steps each:
#
# 1. **reduce-scatter**: in step s, device i sends chunk (i − s) mod N to device i + 1,
#    which adds it to its own copy of that chunk. After N−1 steps, device i holds the full
#    sum of one chunk, (i + 1) mod N;
# 2. **all-gather**: the summed chunks travel once more around the ring, each receiver
#    overwriting its copy, until every device holds every summed chunk.
#
# Below, every chunk moves with `tf.device(receiver)`: the add (or copy) runs on the
# receiving device, so TensorFlow copies the chunk there.

# %% tags=["device-check"]
#@save
def ring_all_reduce(values, device_names, log=None):
    """Sum of `values` (one tensor per device) on every device: reduce-scatter, then all-gather."""
    n = len(values)
    shape = values[0].shape
    sizes = [len(c) for c in np.array_split(np.arange(int(np.prod(shape))), n)]
    chunks = []  # chunks[device][chunk], each on its device
    for v, name in zip(values, device_names):
        with tf.device(name):
            chunks.append(tf.split(tf.reshape(v, [-1]), sizes))
    phases = [("reduce-scatter", 0, lambda mine, sent: mine + sent),  # add what arrives
              ("all-gather", 1, lambda mine, sent: tf.identity(sent))]  # keep what arrives
    for phase, offset, combine in phases:
        for s in range(n - 1):
            # every device sends one chunk to its right-hand neighbour, all at once
            sends = [(i, (i + offset - s) % n, chunks[i][(i + offset - s) % n]) for i in range(n)]
            for i, c, chunk in sends:
                dst = (i + 1) % n
                with tf.device(device_names[dst]):  # the chunk moves to the receiver
                    chunks[dst][c] = combine(chunks[dst][c], chunk)
                if log is not None:  # what moved, and the first value of the chunk it updated
                    log.append({"phase": phase, "step": s + 1, "from": i, "to": dst, "chunk": c,
                                "values": sizes[c], "first value": float(chunks[dst][c][0]) if sizes[c] else None})
    out = []
    for ch, name in zip(chunks, device_names):
        with tf.device(name):
            out.append(tf.reshape(tf.concat(ch, 0), shape))
    return out


# %% [markdown]
# Run it on N tiny "gradients" whose values show where they came from: device i holds 8
# copies of 10^i, so a sum tells which devices contributed (11 = devices 0 and 1). Each
# line is one step of the ring: who sent which chunk to whom, and what the receiver's
# chunk holds afterwards.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
demo = [tf.fill([8], 10.0**i) for i in range(N)]
ring_log = []
ring_out = ring_all_reduce(demo, REPLICA_DEVICES, ring_log)
if N == 1:
    print("1 device: the ring has no step, the sum is the device's own tensor")
for (phase, step), moves in itertools.groupby(ring_log, key=lambda m: (m["phase"], m["step"])):
    print(f"{phase:14s} step {step}: "
          + ", ".join(f"{m['from']}->{m['to']} chunk {m['chunk']} = {m['first value']:g}" for m in moves))
print("every device holds the full sum", f"{sum(10**i for i in range(N))}:",
      all(np.all(out.numpy() == sum(10**i for i in range(N))) for out in ring_out))
print("results on:", [devices.short_device(out.device) for out in ring_out])

# %% [markdown]
# Now the check against TensorFlow: give every replica of the strategy a different random
# tensor of the seed CNN's size, let `MirroredStrategy` sum them, once with
# `strategy.reduce` and once with the replica context's `all_reduce` (the call the
# optimizer makes for the gradients), and compare with the ring.

# %% tags=["device-check"]
n_params = fit_model.count_params()
grads = [tf.random.stateless_normal([n_params], seed=[i, 0]) for i in range(N)]
per_replica = strategy.experimental_distribute_values_from_function(lambda ctx: grads[ctx.replica_id_in_sync_group])
tf_reduce = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


@tf.function
def replica_all_reduce(values):
    return strategy.run(lambda g: tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, g),
                        args=(values,))


# With one replica TF 2.21 refuses this call once traced ("destinations can not be empty"): run it eagerly then.
run_all_reduce = replica_all_reduce if N > 1 else replica_all_reduce.python_function
with config.quiet_tf_logs():
    tf_all_reduce = strategy.experimental_local_results(run_all_reduce(per_replica))
ring_log = []
ring = ring_all_reduce(grads, REPLICA_DEVICES, ring_log)
bytes_sent = [4 * sum(m["values"] for m in ring_log if m["from"] == i) for i in range(N)]

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
print(f"{N} tensors of {n_params:,} float32 values")
print("ring == strategy.reduce (SUM) within 1e-5:", max_abs_diff(ring, [tf_reduce] * N) <= 1e-5)
print("ring == replica context all_reduce within 1e-5:", max_abs_diff(ring, tf_all_reduce) <= 1e-5)
print(f"bytes each device sent = 2(N-1)/N x the tensor's bytes: "
      f"{bool(np.allclose(bytes_sent, 2 * (N - 1) / N * 4 * n_params, rtol=1e-3))}")

# %% [markdown]
# Each device therefore sends, and receives, 2(N−1)/N × the gradient bytes per step:
# almost independent of N. Sending every gradient to one device and the sum back instead
# makes that device move 2(N−1) × the gradient bytes, which grows with N. For the seed
# CNN in float32:

# %%
def allreduce_traffic(n_params, device_counts, bytes_per_value=4, link_gb_per_s=None):
    """Gradient traffic per step: the ring's bytes per device against reduce-to-one."""
    mb = n_params * bytes_per_value / 1e6
    table = pd.DataFrame({"devices N": device_counts, "gradient MB": mb})
    table["ring factor 2(N-1)/N"] = [2 * (n - 1) / n for n in device_counts]
    table["ring: MB sent per device"] = table["ring factor 2(N-1)/N"] * mb
    table["reduce-to-one: MB at busiest device"] = [2 * (n - 1) * mb for n in device_counts]
    if link_gb_per_s:
        table[f"ring ms at {link_gb_per_s:g} GB/s"] = table["ring: MB sent per device"] / link_gb_per_s
    return table


# %%
# NBVAL_CHECK_OUTPUT
print(allreduce_traffic(n_params, device_counts=(1, 2, 4, 8, 16)).round(3).to_string(index=False))

# %% [markdown]
# The seed CNN's gradient is tiny (see "gradient MB" above), so here communication is
# cheap. For a model with billions of parameters it is gigabytes per step, which is why
# gradient all-reduce bandwidth decides how well data parallelism scales.
#
# ## Training with `model.fit` under the strategy
#
# With Keras the only change is *where* you build and compile the model: inside
# `strategy.scope()`. `fit` then distributes each global batch of the dataset over the
# replicas, and Keras scales the loss for you: inside a strategy a Keras loss with the
# default reduction divides by the number of replicas (`scale_loss_for_distribution` in
# Keras 3), so that summing the replicas' gradients gives the gradient of the global mean.
#
# The input is the series' `tf.data` pipeline (notebook 03 takes it apart), batched by
# the **global** batch size. Evaluation on the test set runs under the strategy too.

# %% tags=["device-check"]
cifar = data.load_for_mode()
print(cifar.describe())
train_ds = make_dataset(cifar.x_train, cifar.y_train, GLOBAL_BATCH, training=True)
test_ds = make_dataset(cifar.x_test, cifar.y_test, GLOBAL_BATCH, training=False)
FIT_EPOCHS = config.pick(smoke=1, full=2)

# %%
with strategy.scope():
    fit_model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
start = time.perf_counter()
# shuffle=False: the tf.data pipeline already shuffles (Keras would ignore it, with a warning).
history = fit_model.fit(train_ds, epochs=FIT_EPOCHS, shuffle=False, verbose=2)
fit_seconds = time.perf_counter() - start
fit_loss, fit_acc = fit_model.evaluate(test_ds, verbose=0)
print(f"model.fit: {FIT_EPOCHS} epoch(s) in {fit_seconds:.0f} s, test accuracy {fit_acc:.3f}")

# %% [markdown]
# Training changed every copy of the weights, and all copies still agree:

# %%
# NBVAL_CHECK_OUTPUT
copies = strategy.experimental_local_results(fit_model.get_layer("conv1").kernel.value)
print("after training, all copies equal:", all(np.array_equal(copies[0].numpy(), c.numpy()) for c in copies))

# %% [markdown]
# ## A custom training loop
#
# A custom loop makes the data-parallel step visible. `step_fn` runs once per replica on
# its slice of the batch; `strategy.run` launches it on every replica, and
# `optimizer.apply_gradients`, called in a replica context, all-reduces (sums) the
# gradients before every copy applies the same update.
#
# `tf.nn.compute_average_loss` divides the *sum* of the replica's per-example losses by the
# **global** batch size. Summing those N partial losses (and their gradients) gives exactly
# the mean over the global batch. The `scaling="per_replica_mean"` branch is the classic
# bug, kept to show what it does further down.

# %% tags=["device-check"]
#@save
import keras


def make_train_step(strategy, model, optimizer, global_batch, scaling="global"):
    """One compiled data-parallel step: per-replica forward/backward, all-reduce, update."""
    with strategy.scope():
        optimizer.build(model.trainable_variables)  # optimizer slots are mirrored too

    def step_fn(x, y):  # runs once per replica, on its B/N examples
        with tf.GradientTape() as tape:
            per_example = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
            if scaling == "global":  # correct: sum / global batch
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            else:  # wrong: the mean over this replica's examples only
                loss = tf.reduce_mean(per_example)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduce (sum) + update
        return loss

    @tf.function
    def train_step(dist_batch):
        per_replica_loss = strategy.run(step_fn, args=dist_batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    return train_step


# %% [markdown]
# `experimental_distribute_dataset` splits each global batch into per-replica batches. One
# epoch:

# %%
with strategy.scope():
    ctl_model = models.build_seed_cnn(name="ctl_model")
    ctl_optimizer = keras.optimizers.Adam(1e-3)
train_step = make_train_step(strategy, ctl_model, ctl_optimizer, GLOBAL_BATCH)
dist_train = strategy.experimental_distribute_dataset(train_ds)

start = time.perf_counter()
total, steps = tf.constant(0.0), 0
for dist_batch in dist_train:
    total += train_step(dist_batch)  # stays a tensor: no wait for each step to finish
    steps += 1
total = float(total)
ctl_seconds = time.perf_counter() - start
with strategy.scope():
    ctl_model.compile(optimizer=ctl_optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
ctl_loss, ctl_acc = ctl_model.evaluate(test_ds, verbose=0)
print(f"custom loop: 1 epoch, {steps} steps in {ctl_seconds:.0f} s, mean training loss {total / steps:.3f}, "
      f"test accuracy {ctl_acc:.3f}")

# %% [markdown]
# Both ways train the same model from the same pipeline; the printed test accuracies show
# how far each got in its epochs.
#
# ## Proof: N replicas compute what one device computes
#
# Data parallelism is only correct if a step on N replicas with global batch B gives the
# same updated weights as a step on **one** device with the same B examples.
# `compare_one_step` checks exactly that: it builds the model twice from the same initial
# weights, takes one step on one device and one on all replicas (custom loop, or
# `model.fit`), and compares every updated weight. Plain SGD makes the update proportional
# to the gradient, so any error in the gradient shows one to one. Only float32 round-off
# (the sums are taken in a different order) may differ; the tolerance is `1e-5`.

# %% tags=["device-check"]
#@save
from utils import data, models

TOLERANCE = 1e-5  # the largest weight difference still called equal (float32 round-off)


def new_optimizer(name, lr):
    return keras.optimizers.SGD(lr) if name == "sgd" else keras.optimizers.Adam(lr)


def compare_one_step(x, y, strategy, method="custom loop", scaling="global", optimizer="sgd", lr=0.1):
    """One step on all replicas of `strategy` vs one step on one device, same weights and batch."""
    x, y = data.to_float(x), y.astype(np.int64)
    w0 = models.build_seed_cnn().get_weights()
    # 1. one device: the whole global batch, the plain mean loss
    with tf.device(strategy.extended.worker_devices[0]):
        one = models.build_seed_cnn()
        one.set_weights(w0)
        opt = new_optimizer(optimizer, lr)
        with tf.GradientTape() as tape:
            loss_one = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, one(x, training=True)))
        opt.apply_gradients(zip(tape.gradient(loss_one, one.trainable_variables), one.trainable_variables))
    # 2. N replicas: the same batch, split by the strategy
    with strategy.scope():
        many = models.build_seed_cnn()
        many.set_weights(w0)
        opt = new_optimizer(optimizer, lr)
    batch = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
    if method == "custom loop":
        step = make_train_step(strategy, many, opt, len(x), scaling)
        loss_n = float(step(next(iter(strategy.experimental_distribute_dataset(batch)))))
    else:
        with strategy.scope():
            many.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        loss_n = many.fit(batch, epochs=1, verbose=0, shuffle=False).history["loss"][-1]
    # 3. compare: the largest weight difference, and how far each step moved the weights
    moved = [np.linalg.norm(np.concatenate([(a - b).ravel() for a, b in zip(m.get_weights(), w0)]))
             for m in (many, one)]
    diff = max_abs_diff(many.get_weights(), one.get_weights())
    return {"method": method, "loss scaling": scaling, "optimizer": optimizer, "replicas": strategy.num_replicas_in_sync,
            "max |w_N - w_1|": diff, "equal": diff <= TOLERANCE, "update size / one device": moved[0] / moved[1],
            "loss (1 device)": float(loss_one), "loss reported (N replicas)": float(loss_n)}


# %% tags=["device-check"]
def verdict(r):
    """A one-line verdict with no measured number, the same on every run."""
    return (f"{r['method']}, {r['loss scaling']} loss scaling, {r['optimizer']}: {r['replicas']} replicas x "
            f"{GLOBAL_BATCH // r['replicas']} vs 1 device x {GLOBAL_BATCH}: updated weights equal within "
            f"{TOLERANCE:g}: {r['equal']}")


# %% tags=["device-check"]
x_batch, y_batch = cifar.x_train[:GLOBAL_BATCH], cifar.y_train[:GLOBAL_BATCH]
with config.quiet_tf_logs():  # each comparison traces a fresh step on purpose
    proof_ctl = compare_one_step(x_batch, y_batch, strategy, method="custom loop")
    proof_fit = compare_one_step(x_batch, y_batch, strategy, method="model.fit")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
print(verdict(proof_ctl))
print(verdict(proof_fit))

# %% [markdown]
# The measured differences (these vary with the data and the machine, so they are not
# part of the check above):

# %%
for r in (proof_ctl, proof_fit):
    print(f"{r['method']:12s} max |w_N - w_1| = {r['max |w_N - w_1|']:.2e}  (tolerance {TOLERANCE:g}), "
          f"update size / one device = {r['update size / one device']:.6f}")

# %% [markdown]
# ## What goes wrong with the wrong loss scaling
#
# The classic bug in a custom loop is to average the loss over the replica's own examples
# (`tf.reduce_mean(per_example)`) instead of over the global batch. Each replica's loss
# is then N times too large relative to the global mean, and since the optimizer
# **sums** the replicas' gradients, the update is N times too large: with SGD it is as if
# the learning rate had been silently multiplied by N. `model.fit` cannot make this
# mistake; a custom loop can. (With one replica the two scalings coincide.)
#
# One step with each scaling, for plain SGD (learning rate `0.1`) and for Adam (`1e-3`),
# against one device:

# %%
with config.quiet_tf_logs():
    scaling_results = [proof_ctl] + [  # proof_ctl is the correct SGD row
        compare_one_step(x_batch, y_batch, strategy, scaling=scaling_name, optimizer=opt, lr=lr)
        for opt, scaling_name, lr in [("sgd", "per_replica_mean", 0.1), ("adam", "global", 1e-3),
                                      ("adam", "per_replica_mean", 1e-3)]
    ]
print(pd.DataFrame(scaling_results).to_string(index=False, float_format=lambda v: f"{v:.4g}"))

# %%
# NBVAL_CHECK_OUTPUT
sgd_ok, sgd_wrong, adam_ok, adam_wrong = scaling_results
for r in (sgd_ok, sgd_wrong, adam_ok):
    print(verdict(r))
print(f"SGD, per-replica mean: update is {N} x the correct one (within 1%):",
      abs(sgd_wrong["update size / one device"] - N) < 0.01 * N)
print(f"per-replica mean: reported loss is {N} x the global mean (within 1%):",
      abs(sgd_wrong["loss reported (N replicas)"] / sgd_wrong["loss (1 device)"] - N) < 0.01 * N)

# %% [markdown]
# Read the table above:
#
# - **SGD**: with the per-replica mean the weights move N times as far as they should
#   ("update size / one device"), and the reported loss is N times the true loss.
# - **Adam** divides each step by a running estimate of the gradient's magnitude, so a
#   gradient N times too large gives almost the same step: the "update size / one device"
#   of its wrong row is close to `1`, yet (with more than one replica) the weights are
#   still not equal within the tolerance, and the logged loss is still N times too large.
#   The bug hides, and surfaces later, e.g. with gradient clipping, weight decay, or a
#   switch to SGD.
#
# ## Honest timing: logical CPUs are not extra hardware
#
# Logical CPUs share the same physical cores, so splitting a batch over them cannot make
# training N times faster: the same arithmetic runs on the same cores, plus the cost of
# coordinating replicas. Time the same custom step on 1 replica and on N replicas at the
# same global batch (the batches are prepared before timing starts):

# %%
def images_per_s(strategy, steps, warmup=2):
    """Training images/s of `make_train_step` under `strategy` (Adam, in-memory batches)."""
    n = len(cifar.x_train) // GLOBAL_BATCH * GLOBAL_BATCH
    ds = tf.data.Dataset.from_tensor_slices((data.to_float(cifar.x_train[:n]), cifar.y_train[:n].astype(np.int64)))
    batches = iter(strategy.experimental_distribute_dataset(ds.batch(GLOBAL_BATCH).cache().repeat()))
    with strategy.scope():
        model, opt = models.build_seed_cnn(), keras.optimizers.Adam(1e-3)
    step = make_train_step(strategy, model, opt, GLOBAL_BATCH)
    for _ in range(warmup):
        float(step(next(batches)))
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(next(batches))
    float(loss)  # wait for the last step
    return steps * GLOBAL_BATCH / (time.perf_counter() - start)


one = devices.make_strategy(REPLICA_DEVICES[:1])
with config.quiet_tf_logs():
    timing = pd.DataFrame([{"replicas": s.num_replicas_in_sync, "global batch": GLOBAL_BATCH,
                            "images/s": round(images_per_s(s, S.steps))} for s in (one, strategy)])
timing["vs 1 replica"] = (timing["images/s"] / timing["images/s"].iloc[0]).round(2)
print(timing.to_string(index=False))

# %% [markdown]
# Compare the "vs 1 replica" column with N: on logical CPUs it is nowhere near N. What
# difference there is from `1` comes from how TensorFlow spreads work over the cores (N
# smaller convolutions can run side by side, where one large one relies on multi-threading
# inside each op), from the extra all-reduce, and from noise: these are short timings on
# a machine shared with other programs.
#
# ### Why replicas on logical CPUs are slow, and what helps
#
# By default TensorFlow gives every op a pool of threads as large as the machine
# (*intra-op* parallelism) and runs several ops at once (*inter-op* parallelism). With N
# replicas on C cores, each replica's convolution asks for C threads while the other
# replicas' convolutions ask for theirs: about N × C busy threads on C cores, which then
# wait for each other at every op and at every all-reduce. A first guess sizes the pools for
# the replicas: `utils.devices.replica_threads(N)` gives each op `C // N` threads (at least
# 1) and lets up to N ops run at once, so the total stays near the core count.
#
# Thread pools are fixed once TensorFlow starts, so each configuration below runs in a
# fresh Python process (`utils.bench.run_in_fresh_process`, the same code as `make bench`),
# training the seed CNN with `model.fit` at a global batch of 128:

# %%
threads = devices.replica_threads(2)
print(f"replica_threads(2) on {devices.usable_cores()} cores -> intra-op {threads[0]}, inter-op {threads[1]}")
spec = {"kind": "fit", "recipe": "series", "batch": 128, "n_train": S.n_train, "n_test": 100,
        "steps": config.pick(smoke=3, full=40), "warmup": config.pick(smoke=2, full=5)}
configs = {"one device, default threads": {"cpus": 1}}
for t in bench.thread_candidates(2, devices.usable_cores()):  # 0: TensorFlow's default
    formula = " (replica_threads)" if t == threads else ""
    configs[f"2 replicas, {bench.threads_label(t)}{formula}"] = {"cpus": 2, "replicas": 2, "threads": list(t)}
rows = []
for name, extra in configs.items():
    result = bench.run_in_fresh_process({**spec, **extra, "name": name})
    rows.append({"configuration": name, "images/s": round(result["images_per_s"])})
overhead = pd.DataFrame(rows)
overhead["vs one device"] = (overhead["images/s"] / overhead["images/s"].iloc[0]).round(2)
print(overhead.to_string(index=False))
fastest = overhead.iloc[1:].loc[overhead["images/s"].iloc[1:].idxmax()]
print(f"\nfastest for 2 replicas here: {fastest['configuration']}, {fastest['vs one device']:.2f}x one device")

# %% [markdown]
# Compare the rows of two replicas: the same two replicas, only the thread pools differ
# (TensorFlow's defaults, the `replica_threads` formula, one thread per op, all cores per
# op, one thread per op with more ops at once). Which one wins depends on the CPU, so it is
# measured, not assumed; the "vs one device" column shows how much of the gap each closes on
# this machine (CPUs differ a lot here: on some machines two tuned replicas match one
# device, on others, like an AVX2-only CPU, they stay well below). No setting can make two
# logical CPUs faster than the two physical cores they share, so the best to expect is about
# the speed of one device; the first row is measured separately, and other programs running
# at the same time move it up or down. `make bench` runs the same sweep for 2 and 4
# replicas, measures the fastest setting once more, and records the machine. To use a
# setting in your own notebook, call `devices.set_threads(intra_op, inter_op)` (or
# `devices.set_threads(*devices.replica_threads(N))`) before `setup_devices()`.
#
# On real GPUs each replica has its own arithmetic units and memory, so N GPUs process
# close to N times the images per second, as long as the all-reduce (over NVLink or PCIe)
# and the input pipeline keep up. The code above runs there unchanged.
#
# ## Summary
#
# - `MirroredStrategy` is **data parallelism**: a full model copy per replica, each global
#   batch split over replicas, gradients summed by an all-reduce, identical updates. It
#   does not split the model and cannot train a model that does not fit on one device.
# - Build model and optimizer inside `strategy.scope()`; feed batches of the **global**
#   batch size; scale the learning rate when the global batch grows.
# - A ring all-reduce is a reduce-scatter followed by an all-gather, N−1 steps each; the
#   hand-written one above gives the same sum as the strategy's, and sends 2(N−1)/N × the
#   gradient bytes per device and step.
# - In a custom loop, divide by the **global** batch size (`tf.nn.compute_average_loss`);
#   Keras `fit` does the equivalent for you.
# - The proof cells show that one step on N replicas equals one step on one device within
#   float32 round-off, and that the per-replica mean multiplies the SGD update by N.
#
# ## Exercises
#
# 1. Build a strategy over only the first two devices (or one, if that is all there is)
#    and repeat the one-step comparison with the wrong scaling. By what factor is the SGD
#    update too large now?

# %%
# Try it: pick the devices, then compare (the default is the correct scaling).
few = devices.make_strategy(REPLICA_DEVICES[:2])
with config.quiet_tf_logs():
    r = compare_one_step(x_batch, y_batch, few, scaling="global")
print(verdict(r), f"| update size / one device = {r['update size / one device']:.3f}")

# %% jupyter={"source_hidden": true}
# Solution 1: the update is too large by the number of replicas of the strategy.
few = devices.make_strategy(REPLICA_DEVICES[:2])
with config.quiet_tf_logs():
    r = compare_one_step(x_batch, y_batch, few, scaling="per_replica_mean")
print(verdict(r), f"| update size / one device = {r['update size / one device']:.3f}")

# %% [markdown]
# 2. How many bytes does each device send per step in a ring all-reduce of a 7-billion
#    parameter model with bfloat16 gradients on 8 GPUs, and how long does that take at
#    300 GB/s? Compare with sending everything to one device.

# %%
# Try it: fill in the numbers of the question.
print(allreduce_traffic(n_params=1_000_000, device_counts=(2,), bytes_per_value=4, link_gb_per_s=100)
      .round(1).to_string(index=False))

# %% jupyter={"source_hidden": true}
# Solution 2
big = allreduce_traffic(7_000_000_000, device_counts=(8,), bytes_per_value=2, link_gb_per_s=300)
print(big.round(1).to_string(index=False))

# %% [markdown]
# 3. Fix the wrong scaling *without* `tf.nn.compute_average_loss`: which single factor do
#    you multiply the per-replica mean by? Check it on one replica's per-example losses.

# %%
# Try it: replace the factor 1.0 and compare with compute_average_loss.
per_example = tf.constant([0.5, 1.0, 1.5, 3.0])  # one replica's 4 examples, global batch 4 * N
fixed = tf.reduce_mean(per_example) * 1.0
right = tf.nn.compute_average_loss(per_example, global_batch_size=4 * N)
print(f"fixed {float(fixed):.4f}, compute_average_loss {float(right):.4f}")

# %% jupyter={"source_hidden": true}
# Solution 3: per-replica mean x (per-replica batch / global batch) = sum / global batch.
wrong = tf.reduce_mean(per_example)
fixed = wrong * (4 / (4 * N))
print(f"wrong {float(wrong):.4f}, fixed {float(fixed):.4f}, compute_average_loss {float(right):.4f}")

# %% [markdown]
# ## Further reading
#
# - TensorFlow guide, [Distributed training with TensorFlow](https://www.tensorflow.org/guide/distributed_training)
#   and [Custom training with tf.distribute.Strategy](https://www.tensorflow.org/tutorials/distribute/custom_training).
# - Keras guide, [Multi-GPU distributed training with TensorFlow](https://keras.io/guides/distributed_training_with_tensorflow/).
# - P. Goyal et al., *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour*, 2017,
#   [arXiv:1706.02677](https://arxiv.org/abs/1706.02677) (linear scaling rule, warm-up).
# - P. Patarasuk and X. Yuan, *Bandwidth optimal all-reduce algorithms for clusters of
#   workstations*, J. Parallel Distrib. Comput. 69(2), 2009 (ring all-reduce).
# - A. Sergeev and M. Del Balso, *Horovod: fast and easy distributed deep learning in
#   TensorFlow*, 2018, [arXiv:1802.05799](https://arxiv.org/abs/1802.05799).
# - S. Li et al., *PyTorch Distributed: Experiences on Accelerating Data Parallel
#   Training*, VLDB 2020, [arXiv:2006.15704](https://arxiv.org/abs/2006.15704).
