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
# # 10 · Model compression: pruning, quantization and distillation, measured
#
# The earlier notebooks split a model over devices because it was too big or too slow for
# one. This one goes the other way: it makes the trained CNN of notebook 04 smaller, so that
# it needs fewer devices (or a phone) to run. Three families of techniques do this, and each
# gives up something different:
#
# - **pruning** sets most weights to exactly zero;
# - **quantization** stores weights (and activations) in 8 or 16 bits instead of 32;
# - **distillation** trains a smaller network to imitate the big one.
#
# Compression claims are easy to get wrong (a sparsity that was scheduled but never reached, a
# "4x smaller" model that was never run), so every sparsity, size, accuracy and latency
# figure below is measured in this notebook: sparsity from the final weights, size in
# bytes (raw and gzip-compressed), accuracy on the test set, and latency per image on the
# LiteRT interpreter.
#
# **What you will learn**
#
# - how to write magnitude pruning for Keras 3 (masks, a sparsity schedule, a callback that
#   applies the masks during fine-tuning), and how to check the sparsity from the weights;
# - why a pruned model is only smaller once it is compressed (gzip), and not faster on
#   dense kernels;
# - how to convert a model with `TFLiteConverter` to dynamic-range, float16 and full int8,
#   and evaluate it on the LiteRT interpreter (`ai-edge-litert`);
# - how to write fake quantization (quantize, dequantize, straight-through gradient) and
#   the layers that use it for quantization-aware training;
# - how to write the distillation loss (soft targets at a temperature plus hard labels),
#   distil the CNN into a student with half the width, and compare it with the same
#   student trained on labels only;
# - what compression changes for parallelism, and how to compress a model trained under a
#   `tf.distribute` strategy.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 11.3 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 1.4 min | not measured |
# <!-- runtime:end -->
#
# Without a model saved by notebook 04 in the same mode, this notebook first trains one
# (the table's full time assumes notebook 04's model is there).

# %% [markdown]
# ## Setup
#
# Create the devices first (before any other TensorFlow code): on a CPU-only machine they
# are logical CPUs that share the same two cores. `utils.compression` holds the plumbing this
# notebook does not spend cells on: file sizes, the LiteRT converter and interpreter. The
# compression algorithms themselves are written below.

# %%
import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, devices

print(devices.setup_devices().to_string(index=False))
print("mode:", config.get_mode())

# %%
import time
import warnings

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import compression, data as cifar, models
from utils.data import to_float
from utils.lessons.cifar10_pipeline import make_dataset
from utils.lessons.training import load_or_train_cnn

config.seed_everything()
S = config.sizes()
pd.set_option("display.width", 160)
tf.get_logger().setLevel("ERROR")  # hide TensorFlow's Python INFO/WARNING lines (retracing notes)
# Keras warns that fit ignores shuffle=True for a tf.data.Dataset; the pipeline shuffles.
warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
RUN = config.run_dir("10_compression", fresh=True)  # this notebook's saved files (git-ignored)

# %% [markdown]
# The sizes of this notebook. Smoke mode uses a small subset, one epoch everywhere and few
# latency samples; full mode uses all of CIFAR-10.

# %%
SPARSITIES = (0.5, 0.75, 0.9)
FT_EPOCHS = config.pick(smoke=1, full=2)  # fine-tuning epochs per pruned model
QAT_EPOCHS = 1
KD_EPOCHS = config.pick(smoke=1, full=4)  # epochs of each student, with and without a teacher
N_CALIB = config.pick(smoke=64, full=200)  # representative images for int8 calibration
LAT_RUNS = config.pick(smoke=20, full=200)  # batch-1 timings per model
data = cifar.load_for_mode()
print(data.describe())

# %% [markdown]
# ## The model to compress
#
# `load_or_train_cnn` (from notebook 04) loads the CNN that notebook 04 trained and saved.
# If it is missing (or was trained in another mode), it trains one with the series' recipe
# at this mode's size and says so. Notebook 04 may have trained under a mixed-precision
# policy (it picks one that suits the hardware); the converter and the pruning masks should
# see plain float32 layers, so `float32_copy` rebuilds the seed CNN in float32 and copies the
# weights in (the variables of a mixed-precision model are float32 already). `accuracy` runs
# a Keras model eagerly on the test images: no `evaluate`, so no new `tf.function` to trace
# per model.

# %%
def float32_copy(model: keras.Model, name: str) -> keras.Model:
    """The seed CNN in float32, holding `model`'s weights."""
    copy = models.build_seed_cnn(name=name)
    copy.set_weights(model.get_weights())
    return copy


def accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy of a Keras model, with eager calls on batches."""
    preds = [np.argmax(model(to_float(images[i : i + batch])), axis=-1) for i in range(0, len(images), batch)]
    return float(np.mean(np.concatenate(preds) == labels))


t0 = time.perf_counter()
loaded, note = load_or_train_cnn(data)
print(note)
print(f"({time.perf_counter() - t0:.0f} s)")
baseline = float32_copy(loaded, name="baseline")
train_ds = make_dataset(data.x_train, data.y_train, S.batch_size, training=True, seed=0)
print(f"baseline test accuracy (Keras, {len(data.x_test):,} images): {accuracy(baseline, data.x_test, data.y_test):.4f}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"baseline parameters: {baseline.count_params():,}")
print("compute dtype of every layer:", sorted({layer.compute_dtype for layer in baseline.layers}))
same = all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), baseline.get_weights(), strict=True))
print("float32 copy holds the loaded weights exactly:", same)

# %% [markdown]
# ## 1. Magnitude pruning
#
# Magnitude pruning (Han et al. 2015; Zhu & Gupta 2017) assumes that the weights closest to
# zero matter least. For a target sparsity $s$, each Conv2D and Dense kernel keeps its
# $(1-s)$ largest weights by absolute value; the others become exactly zero. The whole idea
# fits in a mask: sort the magnitudes, zero the smallest $k = s \cdot n$.

# %%
#@save
import keras
import numpy as np


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A 0/1 mask of `weights`'s shape that zeroes the `sparsity` fraction with the smallest |w|."""
    k = int(round(sparsity * weights.size))  # how many weights to drop
    order = np.argsort(np.abs(weights).ravel(), kind="stable")  # smallest first, ties by position
    mask = np.ones(weights.size, dtype=np.float32)
    mask[order[:k]] = 0.0
    return mask.reshape(weights.shape)


def prunable_kernels(model: keras.Model) -> list[tuple[str, keras.Variable]]:
    """(layer name, kernel) of every Conv2D and Dense layer; biases are not pruned."""
    return [(layer.name, layer.kernel) for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)]


# %% [markdown]
# On a small matrix, half of the six weights go: the three smallest in absolute value.

# %%
# NBVAL_CHECK_OUTPUT
w_small = np.array([[0.3, -1.2, 0.05], [-0.4, 0.9, -0.01]], dtype=np.float32)
mask_small = magnitude_mask(w_small, 0.5)
print("weights:\n", w_small)
print("mask at 50% sparsity:\n", mask_small)
print("pruned weights:\n", w_small * mask_small)

# %% [markdown]
# Pruning 90% in one shot would wreck accuracy (Exercise 1 measures by how much), so the
# sparsity rises during fine-tuning along Zhu and Gupta's cubic schedule,
#
# $$s_t = s_{\text{final}}\left(1 - \left(1 - \tfrac{t}{T}\right)^3\right),$$
#
# fast at first, while redundant weights are plentiful, then levelling off at $s_{\text{final}}$
# from step $T$ on. The network keeps training in between, so the remaining weights take over
# the work of the removed ones.

# %%
#@save
def polynomial_sparsity(step: int, target: float, end_step: int, power: int = 3) -> float:
    """Zhu & Gupta's schedule: 0 at step 0, `target` from `end_step` on, rising fast at first."""
    progress = min(step / end_step, 1.0)
    return target * (1.0 - (1.0 - progress) ** power)


# %%
# NBVAL_CHECK_OUTPUT
print("step      :", " ".join(f"{step:5d}" for step in range(0, 101, 10)))
print("sparsity  :", " ".join(f"{polynomial_sparsity(step, 0.9, end_step=60):5.3f}" for step in range(0, 101, 10)))

# %% [markdown]
# The callback puts the two together during `fit`. Every `frequency` steps it recomputes the
# masks from the current weights at the scheduled sparsity; after **every** optimizer step it
# multiplies the masks back in, because Adam's momentum would otherwise move the pruned
# weights away from zero; at the end of training it enforces the target exactly.
#
# (The `tensorflow-model-optimization` toolkit does the same with wrapper layers, but its
# wrappers are written for the legacy `tf_keras` package, not for Keras 3 models, and this
# series does not install it. Whatever tool you use, read the sparsity back from the final
# weights, as below.)

# %%
#@save
class MagnitudePruning(keras.callbacks.Callback):
    """Gradual magnitude pruning during `fit`: masks follow the schedule and are re-applied after every step."""

    def __init__(self, target: float, end_step: int, frequency: int = 10) -> None:
        super().__init__()
        self.target, self.end_step, self.frequency = target, end_step, frequency
        self.step, self.masks, self.log = 0, {}, []

    def update_masks(self, sparsity: float) -> None:
        self.masks = {name: magnitude_mask(keras.ops.convert_to_numpy(kernel), sparsity)
                      for name, kernel in prunable_kernels(self.model)}
        self.log.append((self.step, sparsity))

    def apply_masks(self) -> None:
        for name, kernel in prunable_kernels(self.model):
            kernel.assign(kernel * self.masks[name])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        # 1. every `frequency` steps: new masks at the scheduled sparsity
        if self.step % self.frequency == 0:
            self.update_masks(polynomial_sparsity(self.step, self.target, self.end_step))
        # 2. after every step: the pruned weights back to zero
        if self.masks:
            self.apply_masks()

    def on_train_end(self, logs: dict | None = None) -> None:
        # 3. at the end: the target sparsity, exactly
        self.update_masks(self.target)
        self.apply_masks()


# %% [markdown]
# Run it on a toy model first: two dense layers, ten steps of random data, the target
# (`target=0.8`) reached at step 6, masks updated every step. A second callback reads the sparsity of the
# first kernel from the weights after each step.

# %%
# NBVAL_CHECK_OUTPUT
keras.utils.set_random_seed(0)
toy = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])
toy.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
measured = []
read_back = keras.callbacks.LambdaCallback(
    on_train_batch_end=lambda batch, logs: measured.append(float(np.mean(toy.layers[0].kernel.numpy() == 0))))
pruning_demo = MagnitudePruning(target=0.8, end_step=6, frequency=1)
rng = np.random.default_rng(0)
toy.fit(rng.normal(size=(320, 8)), rng.integers(0, 2, 320), batch_size=32, epochs=1, verbose=0,
        callbacks=[pruning_demo, read_back])
print("step  scheduled  zeros in the first kernel")
for (step, scheduled), zeros in zip(pruning_demo.log, measured, strict=False):
    print(f"{step:4d}  {scheduled:9.3f}  {zeros:.3f}")
print(f"after training: {np.mean(toy.layers[0].kernel.numpy() == 0):.3f} (target 0.8, 102 of 128 weights)")

# %% [markdown]
# The measured fraction follows the schedule step by step (rounded to whole weights: the
# kernel has 128). Now the real model: `prune_and_finetune` copies the baseline, ramps the
# sparsity over the first part of the fine-tuning steps (the fraction `ramp=0.6`) and holds
# it for the rest.

# %%
def prune_and_finetune(base: keras.Model, sparsity: float, epochs: int, ramp: float = 0.6):
    """A float32 copy of `base`, pruned to `sparsity` while fine-tuning on `train_ds`."""
    model = float32_copy(base, name=f"pruned_{round(100 * sparsity)}")
    end_step = max(1, int(int(train_ds.cardinality()) * epochs * ramp))
    callback = MagnitudePruning(sparsity, end_step=end_step, frequency=max(1, end_step // 10))
    model.compile(optimizer=keras.optimizers.Adam(5e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(train_ds, epochs=epochs, callbacks=[callback], verbose=0, shuffle=False)
    return model, history


pruned = {}
for s in SPARSITIES:
    t0 = time.perf_counter()
    model, hist = prune_and_finetune(baseline, s, epochs=FT_EPOCHS)
    pruned[s] = model
    print(f"{model.name}: {FT_EPOCHS} fine-tuning epoch(s) in {time.perf_counter() - t0:.0f} s, "
          f"last epoch's training accuracy {hist.history['accuracy'][-1]:.4f}")

# %% [markdown]
# Do not trust the schedule: read the sparsity back from the final weights. `sparsity_table`
# counts the exact zeros of every kernel. Biases are not pruned (the cell prints how few
# they are).

# %%
def sparsity_table(model: keras.Model) -> pd.DataFrame:
    """Exact zeros of every prunable kernel, read from the weights, with a total row."""
    kernels = {name: keras.ops.convert_to_numpy(k) for name, k in prunable_kernels(model)}
    table = pd.DataFrame([{"layer": name, "kernel weights": k.size, "zeros": int(np.sum(k == 0))}
                          for name, k in kernels.items()])
    total = {"layer": "TOTAL kernels", "kernel weights": table["kernel weights"].sum(), "zeros": table["zeros"].sum()}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["sparsity"] = table["zeros"] / table["kernel weights"]
    return table.set_index("layer")


def nonzero(model: keras.Model) -> int:
    """Non-zero parameters, biases included."""
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


# %%
# NBVAL_CHECK_OUTPUT
table = sparsity_table(pruned[0.9])
print(table.to_string(formatters={"sparsity": "{:.4f}".format}))
n_kernel = int(table.loc["TOTAL kernels", "kernel weights"])
print(f"biases (not pruned): {baseline.count_params() - n_kernel:,} of {baseline.count_params():,} parameters")
for s, model in pruned.items():
    per_layer = sparsity_table(model)["sparsity"]
    print(f"{model.name}: every kernel at {s:.0%} sparsity (within 0.05%):", bool(np.allclose(per_layer, s, atol=5e-4)))

# %% [markdown]
# Now the size. `compression.weights_size` saves each model's weights with
# `model.save_weights` (an HDF5 file, without the optimizer's state) and measures the file
# raw and gzip-compressed.

# %%
rows = []
for model in [baseline, *pruned.values()]:
    size = compression.weights_size(model)
    rows.append({"model": model.name, "kernel sparsity": sparsity_table(model).loc["TOTAL kernels", "sparsity"],
                 "weights file bytes": size["bytes"], "gzip bytes": size["gzip bytes"],
                 "test accuracy (Keras)": accuracy(model, data.x_test, data.y_test)})
prune_table = pd.DataFrame(rows).set_index("model")
prune_table["gzip ratio vs baseline"] = prune_table.loc["baseline", "gzip bytes"] / prune_table["gzip bytes"]
print(prune_table.to_string(float_format="{:.4f}".format))

# %% [markdown]
# Read the table from left to right:
#
# - the **weights file** has the same size for every model: a zero is still a 4-byte
#   float32. Sparsity only pays once something exploits it, here gzip (on a device, a
#   sparse storage format or sparse kernels);
# - the **gzip** column shrinks with sparsity; the last column gives the ratio to the
#   dense baseline, whose float32 weights barely compress at all;
# - the **test accuracy** column shows what each level cost after the short fine-tuning
#   above, to compare with the baseline's first row: the loss grows with the sparsity, and
#   fastest at the highest level.
#
# Why is the highest level so much harder? The sparsity is the same for every layer, and
# that is hard on the small ones: the check table shows how few of `conv1`'s weights
# survive, while `dense1`, which holds most of the kernel weights, could give up more.
# Giving each layer its own sparsity (prune the big dense layer harder, the first
# convolution less) or fine-tuning longer recovers much of the gap; Exercise 1 shows what
# the fine-tuning alone is worth.

# %% [markdown]
# ## 2. Post-training quantization on LiteRT
#
# `TFLiteConverter` turns a Keras model into a LiteRT (formerly TensorFlow Lite)
# flatbuffer. Three post-training recipes need no retraining:
#
# | recipe | weights | activations | needs |
# |---|---|---|---|
# | dynamic range | int8 | float32 (quantized on the fly for some ops) | nothing |
# | float16 | float16 | float32 on CPU | nothing |
# | full int8 | int8 (per channel) | int8 | a representative dataset to calibrate ranges |
#
# Full int8 maps each tensor's observed range $[a, b]$ to the 256 integer levels:
# $x \approx \text{scale}\cdot(q - \text{zero\_point})$. The representative dataset is a
# few hundred training images the converter runs through the float model to observe those
# ranges. `compression.to_tflite` wraps the converter; `compression.LiteRTModel` runs the
# result on the LiteRT interpreter from the `ai-edge-litert` package (the replacement for
# the deprecated `tf.lite.Interpreter`) and (de)quantizes inputs and outputs for you.

# %%
representative = data.x_train[:N_CALIB]
flat = {}
for mode in ("float32", "dynamic", "float16", "int8"):
    t0 = time.perf_counter()
    flat[mode] = compression.to_tflite(baseline, mode, representative)
    print(f"{mode:8s}: {len(flat[mode]):>9,} bytes, converted in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# Check what the converter produced before measuring it. The float32 flatbuffer must
# compute the same function as Keras, and the int8 one must really be integer-only: int8
# input and output, and no float32 tensor anywhere in the graph.

# %%
# NBVAL_CHECK_OUTPUT
x_check = data.x_test[:256]
diff = np.max(np.abs(compression.LiteRTModel(flat["float32"]).predict(x_check) - baseline(to_float(x_check))))
print("float32 LiteRT equals Keras within 1e-4:", bool(diff < 1e-4))
lite_int8 = compression.LiteRTModel(flat["int8"])
print("int8 input / output dtypes:", lite_int8.input_dtype, "/", lite_int8.output_dtype)
print("int8 ops:", lite_int8.op_types())
print("tensor dtypes in the int8 graph:", sorted(lite_int8.tensor_dtypes()))
print("dynamic-range graph keeps float32 activations:",
      "float32" in compression.LiteRTModel(flat["dynamic"]).tensor_dtypes())

# %%
print(f"max |LiteRT float32 - Keras| over {len(x_check)} images: {diff:.2e}")

# %% [markdown]
# Now measure each model on the **whole test set** and time it at batch 1, the setting of
# an app classifying one photo at a time. `measure` collects parameters, non-zero
# parameters, bytes on disk, gzip bytes, LiteRT test accuracy and the median latency per
# image (one interpreter thread, after a warm-up); `results_table` adds the ratios to the
# float32 baseline.

# %%
results = {}


def measure(name: str, technique: str, model: keras.Model, flatbuffer: bytes) -> None:
    """Evaluate one variant on the whole test set, time it at batch 1, store the row in `results`."""
    runner = compression.LiteRTModel(flatbuffer, num_threads=1)
    results[name] = {
        "model": name, "technique": technique, "parameters": model.count_params(),
        "non-zero parameters": nonzero(model), "bytes on disk": len(flatbuffer),
        "gzip bytes": compression.gzip_size(flatbuffer),
        "test accuracy": runner.accuracy(data.x_test, data.y_test),
        "latency ms/image": runner.latency_ms(data.x_test, runs=LAT_RUNS, warmup=min(20, LAT_RUNS)),
    }


def results_table(names: list[str], baseline_name: str = "baseline float32") -> pd.DataFrame:
    """The rows of `results` named, with size ratios and the accuracy change against the baseline."""
    table = pd.DataFrame([results[n] for n in names]).set_index("model")
    base = results[baseline_name]
    table["file ratio"] = base["bytes on disk"] / table["bytes on disk"]
    table["compression ratio"] = base["gzip bytes"] / table["gzip bytes"]
    table["accuracy change (points)"] = 100 * (table["test accuracy"] - base["test accuracy"])
    return table


measure("baseline float32", "baseline", baseline, flat["float32"])
measure("dynamic range", "post-training quantization", baseline, flat["dynamic"])
measure("float16", "post-training quantization", baseline, flat["float16"])
measure("int8 (PTQ)", "post-training quantization", baseline, flat["int8"])
ptq = results_table(["baseline float32", "dynamic range", "float16", "int8 (PTQ)"])
print(ptq[["bytes on disk", "gzip bytes", "file ratio", "test accuracy", "accuracy change (points)",
           "latency ms/image"]].to_string(float_format="{:.4f}".format))

# %%
gap = 100 * (results["int8 (PTQ)"]["test accuracy"] - results["baseline float32"]["test accuracy"])
print(f"int8 minus float32 test accuracy: {gap:+.2f} points (within 1 point: {abs(gap) <= 1.0})")

# %% [markdown]
# What the numbers say:
#
# - **file size** follows the bytes per weight: float16 halves the file, dynamic range and
#   int8 cut it to about a quarter (`file ratio`; the flatbuffer also holds the graph, so
#   slightly less than a factor of four);
# - **accuracy**: the `accuracy change` column shows what each recipe cost; the cell above
#   compares full int8 with float32 directly. Per-channel weight scales and a
#   representative dataset drawn from the training images are what keep int8 close;
# - **latency**: int8 runs integer kernels; float16 weights are expanded back to float32 on
#   a CPU, so they save bytes and little time. Latencies are medians on a shared 2-core
#   machine; compare them within one run only.

# %% [markdown]
# ## 3. Quantization-aware training
#
# Post-training quantization rounds a network that never saw rounding. Quantization-aware
# training (QAT; Jacob et al. 2018) fine-tunes with the rounding in the forward pass, so
# the weights adapt to it. The rounding is *fake*: values are quantized to the integer grid
# and immediately dequantized back to floats, so the rest of the network still computes in
# float32 but only ever sees values an int8 model could represent. Rounding has a zero
# gradient almost everywhere, so the backward pass pretends it was not there: the
# **straight-through estimator** passes the gradient unchanged inside the range (and zero
# outside, where the value was clipped).

# %%
#@save
import tensorflow as tf


def fake_quant(x, lo, hi, num_bits: int = 8, narrow_range: bool = False):
    """Quantize `x` to 2**num_bits levels over [lo, hi], dequantize, pass gradients straight through."""
    # 1. the integer grid: levels qmin..qmax, the range nudged so that 0.0 is exactly a level
    qmin, qmax = (1 if narrow_range else 0), 2**num_bits - 1
    scale = (hi - lo) / (qmax - qmin)
    zero_point = tf.clip_by_value(tf.round(qmin - lo / scale), qmin, qmax)
    lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    # 2. quantize: clip to the range, round to the nearest level (q holds integers)
    clipped = tf.clip_by_value(x, lo, hi)
    q = tf.floor((clipped - lo) * (1.0 / scale) + 0.5)
    # 3. dequantize: back to floats, now on the grid
    y = q * scale + lo
    # 4. straight-through: the forward pass returns y, the backward pass is that of `clipped`
    return clipped + tf.stop_gradient(y - clipped)


# %% [markdown]
# On ten values and a 2-bit grid (four levels over $[-1, 2]$) the output snaps to the levels
# and the gradient is 1 inside the range, 0 where the value was clipped. TensorFlow has the
# same function as one fused op, `tf.quantization.fake_quant_with_min_max_vars` (and a per
# channel variant): the cell checks that both agree, forward and backward, at 8 bits on
# random data. The QAT layers below call the fused op, because it is what the LiteRT
# converter recognises and turns into the int8 scales of the converted model.

# %%
# NBVAL_CHECK_OUTPUT
x_demo = tf.constant(np.linspace(-1.5, 2.5, 10), tf.float32)
with tf.GradientTape() as tape:
    tape.watch(x_demo)
    y_demo = fake_quant(x_demo, -1.0, 2.0, num_bits=2)
print("x       :", np.round(x_demo.numpy(), 2))
print("quantized:", y_demo.numpy())
print("gradient:", tape.gradient(y_demo, x_demo).numpy())

x_rand = tf.constant(np.random.default_rng(0).normal(size=(64, 8)), tf.float32)
lo_c, hi_c = -tf.reduce_max(tf.abs(x_rand), axis=0), tf.reduce_max(tf.abs(x_rand), axis=0)
cases = {
    "per tensor, [-1, 3]": (lambda x: fake_quant(x, -1.0, 3.0),
                            lambda x: tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 3.0, num_bits=8)),
    "per channel, narrow": (lambda x: fake_quant(x, lo_c, hi_c, narrow_range=True),
                            lambda x: tf.quantization.fake_quant_with_min_max_vars_per_channel(
                                x, lo_c, hi_c, num_bits=8, narrow_range=True)),
}
for label, (ours, fused) in cases.items():
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_rand)
        a, b = ours(x_rand), fused(x_rand)
    same_grad = np.array_equal(tape.gradient(a, x_rand), tape.gradient(b, x_rand))
    print(f"{label}: equals the fused op within 1e-6: {bool(np.max(np.abs(a - b)) < 1e-6)}, "
          f"same gradient: {same_grad}")

# %% [markdown]
# The QAT model needs fake quantization in three places:
#
# - the **kernels** (`QuantConv2D`, `QuantDense`): symmetric, levels $-127 \ldots 127$ over
#   $\pm\max|w|$, per output channel for convolutions and per tensor for the dense layers
#   (the converter needs a per-tensor scale where it transposes a dense kernel);
# - the **activations** (`FakeQuant`, after the input and after each layer): a range learnt as
#   a moving average of each training batch's min and max, fixed at inference;
# - the **output**: the softmax is split off, so the logits are quantized before it, as LiteRT
#   does (an int8 softmax on int8 logits).
#
# `quantize_aware_model` rebuilds the Sequential CNN that way and copies its weights.

# %%
#@save
def quantize_kernel(kernel, per_channel: bool):
    """Symmetric int8 fake quantization of a kernel: levels -127..127 over ±max|w|."""
    axes = list(range(len(kernel.shape) - 1)) if per_channel else None  # per output channel: all but the last axis
    bound = tf.maximum(tf.reduce_max(tf.abs(kernel), axis=axes), 1e-8)
    if per_channel:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(kernel, -bound, bound, narrow_range=True)
    return tf.quantization.fake_quant_with_min_max_vars(kernel, -bound, bound, narrow_range=True)


@keras.saving.register_keras_serializable(package="compression")
class FakeQuant(keras.layers.Layer):
    """8-bit fake quantization of activations over a moving-average [min, max] range."""

    def __init__(self, momentum: float = 0.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.momentum = momentum

    def build(self, input_shape) -> None:
        self.range_min = self.add_weight(shape=(), initializer="zeros", trainable=False, name="range_min")
        self.range_max = self.add_weight(shape=(), initializer="ones", trainable=False, name="range_max")
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x, training: bool = False):
        if training:  # the range follows the batches (the first batch sets it); it always holds 0
            first, m = tf.equal(self.seen, 0.0), self.momentum
            batch_min, batch_max = tf.minimum(tf.reduce_min(x), 0.0), tf.maximum(tf.reduce_max(x), 0.0)
            self.range_min.assign(tf.where(first, batch_min, m * self.range_min + (1 - m) * batch_min))
            self.range_max.assign(tf.where(first, batch_max, m * self.range_max + (1 - m) * batch_max))
            self.seen.assign(1.0)
        return tf.quantization.fake_quant_with_min_max_vars(x, self.range_min, self.range_max, num_bits=8)

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum}


@keras.saving.register_keras_serializable(package="compression")
class QuantConv2D(keras.layers.Conv2D):
    """Conv2D whose kernel is fake-quantized per output channel in every call."""

    def call(self, inputs):
        x = self.convolution_op(inputs, quantize_kernel(self.kernel, per_channel=True)) + self.bias
        return self.activation(x)


@keras.saving.register_keras_serializable(package="compression")
class QuantDense(keras.layers.Dense):
    """Dense whose kernel is fake-quantized per tensor in every call."""

    def call(self, inputs):
        return self.activation(keras.ops.matmul(inputs, quantize_kernel(self.kernel, per_channel=False)) + self.bias)


def quantize_aware_model(model: keras.Model) -> keras.Model:
    """A QAT copy of a Sequential CNN (Conv2D, MaxPooling2D, Flatten, Dense), weights copied."""
    x = inputs = keras.Input(shape=model.input_shape[1:], name="image")
    x = FakeQuant(name="quant_input")(x)
    for layer in model.layers:
        config = layer.get_config()
        softmax = config.get("activation") == "softmax"
        if type(layer) is keras.layers.Conv2D:
            new = QuantConv2D.from_config(config)
        elif type(layer) is keras.layers.Dense:  # a softmax output: quantize the logits, then softmax
            new = QuantDense.from_config({**config, "activation": "linear"} if softmax else config)
        else:  # pooling and flatten have no weights to quantize
            x = layer.__class__.from_config(config)(x)
            continue
        x = new(x)
        new.set_weights(layer.get_weights())
        x = FakeQuant(name=f"quant_{layer.name}")(x)
        if softmax:
            x = keras.layers.Softmax(name=f"{layer.name}_softmax")(x)
    return keras.Model(inputs, x, name=f"{model.name}_qat")


# %% [markdown]
# Before any fine-tuning, the QAT model is the float model plus int8 rounding. Start the
# activation ranges from data (forward passes in training mode over the representative
# images, no weight update), then compare its predictions with the baseline's.

# %%
qat = quantize_aware_model(baseline)
for start in range(0, len(representative), 128):
    qat(to_float(representative[start : start + 128]), training=True)  # set the FakeQuant ranges
same_class = np.mean(np.argmax(qat(to_float(x_check)), -1) == np.argmax(baseline(to_float(x_check)), -1))
quant_input = qat.get_layer("quant_input")
print(f"input range learnt by quant_input: [{quant_input.range_min.numpy():.2f}, {quant_input.range_max.numpy():.2f}]")
print(f"same predicted class as the float model on {len(x_check)} test images: {same_class:.1%}")

# %% [markdown]
# Now fine-tune it and convert it: the converter reads the ranges from the fake-quantization
# ops, so no representative dataset is needed.

# %%
t0 = time.perf_counter()
qat.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
qat.fit(train_ds, epochs=QAT_EPOCHS, verbose=0, shuffle=False)
flat["qat"] = compression.to_tflite(qat, "qat")
print(f"QAT: {QAT_EPOCHS} epoch(s) of fine-tuning and conversion in {time.perf_counter() - t0:.0f} s")
measure("int8 (QAT)", "quantization-aware training", baseline, flat["qat"])

# %%
# NBVAL_CHECK_OUTPUT
lite_qat = compression.LiteRTModel(flat["qat"])
print("QAT model layers:", [layer.__class__.__name__ for layer in qat.layers])
print("QAT int8 input / output dtypes:", lite_qat.input_dtype, "/", lite_qat.output_dtype)
print("QAT graph is integer-only:", "float32" not in lite_qat.tensor_dtypes())
print("QAT ops:", lite_qat.op_types())

# %%
qat_view = results_table(["baseline float32", "int8 (PTQ)", "int8 (QAT)"])
print(qat_view[["bytes on disk", "test accuracy", "accuracy change (points)", "latency ms/image"]]
      .to_string(float_format="{:.4f}".format))

# %% [markdown]
# Both int8 models have about the same size and run the same integer kernels (their
# latencies differ by measurement noise); they differ only in how their weights and ranges
# were found. On this small CNN post-training int8 is already close to float32, so QAT has
# little to recover: compare the `accuracy change` of the two int8 rows above (QAT also had
# one more epoch of fine-tuning at a small learning rate). QAT earns its cost on models that
# lose more under PTQ: depthwise convolutions (MobileNet), very low bit widths, or
# activations with outliers.

# %% [markdown]
# ## 4. Knowledge distillation
#
# Pruning and quantization keep the architecture. Distillation (Hinton, Vinyals & Dean
# 2015) trains a different, smaller network, the **student**, to reproduce the outputs of
# the trained **teacher**. The teacher's softened probabilities $\text{softmax}(z/T)$ carry
# more information than a one-hot label ("this cat looks a bit like a dog"). The loss
# mixes both:
#
# $$\mathcal{L} = \alpha \, \text{CE}(y, p_s) + (1-\alpha)\,T^2\,
#   \text{KL}\big(\text{softmax}(z_t/T)\,\|\,\text{softmax}(z_s/T)\big)$$
#
# The series' CNN ends in a softmax, so the loss recovers the logits as $z = \log p$ (exact
# up to a constant per example, which softmax ignores). $T^2$ keeps the gradients of the soft
# part on the scale of the hard part. (Keras 3 also ships `keras.distillation.Distiller`,
# whose logits loss expects models that output logits.)

# %%
#@save
def distillation_loss(y_true, student_probs, teacher_probs, temperature: float = 4.0, alpha: float = 0.1):
    """alpha * CE(labels, student) + (1 - alpha) * T² * KL(teacher at T || student at T), for softmax outputs."""
    # 1. hard labels: the usual cross-entropy
    hard = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_true, student_probs))
    # 2. soft targets: logits recovered as log-probabilities, divided by the temperature
    z_t = tf.math.log(tf.clip_by_value(tf.cast(teacher_probs, tf.float32), 1e-12, 1.0)) / temperature
    z_s = tf.math.log(tf.clip_by_value(tf.cast(student_probs, tf.float32), 1e-12, 1.0)) / temperature
    kl = tf.reduce_sum(tf.nn.softmax(z_t) * (tf.nn.log_softmax(z_t) - tf.nn.log_softmax(z_s)), axis=-1)
    # 3. the mix; T² keeps the soft part's gradients on the scale of the hard part's
    return alpha * hard + (1.0 - alpha) * temperature**2 * tf.reduce_mean(kl)


# %% [markdown]
# On one example: a confident teacher, a student that agrees on the class but not on the
# runner-up. The temperature spreads the teacher's probability over the other classes; with
# $\alpha = 1$ the loss is the plain cross-entropy, and a student equal to the teacher has no
# soft loss.

# %%
# NBVAL_CHECK_OUTPUT
y_one = tf.constant([0])
teacher_one = tf.constant([[0.90, 0.08, 0.02]])
student_one = tf.constant([[0.90, 0.02, 0.08]])
for T in (1.0, 4.0):
    soft = tf.nn.softmax(tf.math.log(teacher_one) / T).numpy()
    print(f"teacher's soft targets at T = {T:.0f}:", np.round(soft, 3))
ce = float(keras.losses.sparse_categorical_crossentropy(y_one, student_one)[0])
print("alpha = 1 gives the cross-entropy:",
      bool(abs(float(distillation_loss(y_one, student_one, teacher_one, alpha=1.0)) - ce) < 1e-6))
print("student = teacher, alpha = 0: loss within 1e-6 of 0:",
      bool(abs(float(distillation_loss(y_one, teacher_one, teacher_one, alpha=0.0))) < 1e-6))
print("soft loss of the student that swaps the runner-up is positive:",
      bool(float(distillation_loss(y_one, student_one, teacher_one, alpha=0.0)) > 0))

# %% [markdown]
# `Distiller` trains a student with that loss: a `keras.Model` whose `call` is the student's
# and whose `compute_loss` runs the frozen teacher on the same batch. Only the student's
# weights are trainable, so `fit` updates only them.

# %%
#@save
class Distiller(keras.Model):
    """Trains `student` on labels and on a frozen `teacher`'s soft targets (see `distillation_loss`)."""

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 4.0, alpha: float = 0.1):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.temperature, self.alpha = temperature, alpha

    def call(self, x, training: bool = False):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        teacher_probs = tf.stop_gradient(self.teacher(x, training=False))  # one teacher forward pass per batch
        return distillation_loss(y, y_pred, teacher_probs, self.temperature, self.alpha)


# %% [markdown]
# The student is the same CNN at half the width (`models.build_seed_cnn(width=0.5)`). For
# a fair comparison, two copies start from the **same initial weights** and train for the
# same epochs, on the same data, with the same optimizer: one on labels only, one with the
# teacher ($T = 4$, $\alpha = 0.1$).

# %%
def train_student(student: keras.Model, teacher: keras.Model | None, epochs: int):
    """Train `student` in place: by distillation from `teacher`, or on labels alone when it is None."""
    trainer = student if teacher is None else Distiller(student, teacher, temperature=4.0, alpha=0.1)
    loss = "sparse_categorical_crossentropy" if teacher is None else None  # the Distiller computes its own
    trainer.compile(optimizer=keras.optimizers.Adam(2e-3), loss=loss, metrics=["accuracy"])
    trainer.fit(train_ds, epochs=epochs, verbose=0, shuffle=False)
    if teacher is not None:
        teacher.trainable = True  # frozen only while it teaches


keras.utils.set_random_seed(7)
init = models.build_seed_cnn(width=0.5, name="student_init").get_weights()
students, same_start = {}, []
for label, teacher in (("student (labels only)", None), ("student (distilled)", baseline)):
    student = models.build_seed_cnn(width=0.5, name="student")
    student.set_weights(init)
    same_start.append(all(np.array_equal(a, b) for a, b in zip(init, student.get_weights(), strict=True)))
    t0 = time.perf_counter()
    train_student(student, teacher, KD_EPOCHS)
    students[label] = student
    print(f"{label}: {KD_EPOCHS} epoch(s) in {time.perf_counter() - t0:.0f} s, "
          f"test accuracy {accuracy(student, data.x_test, data.y_test):.4f}")

# %%
# NBVAL_CHECK_OUTPUT
student = students["student (distilled)"]
flops_t = models.layer_table(baseline).iloc[-1]["FLOPs/image"]
flops_s = models.layer_table(student).iloc[-1]["FLOPs/image"]
print(f"teacher: {baseline.count_params():,} parameters, {flops_t / 1e6:.2f} MFLOPs/image")
print(f"student: {student.count_params():,} parameters, {flops_s / 1e6:.2f} MFLOPs/image")
print(f"student is {baseline.count_params() / student.count_params():.1f}x smaller "
      f"and {flops_t / flops_s:.1f}x cheaper per image")
print("both students started from the same weights:", all(same_start) and len(same_start) == 2)
print("teacher still trainable after distillation (frozen only while teaching):", baseline.trainable)

# %%
for label, model in students.items():
    measure(f"{label} float32", "distillation", model, compression.to_tflite(model, "float32"))
measure("student (distilled) int8", "distillation + int8", students["student (distilled)"],
        compression.to_tflite(students["student (distilled)"], "int8", representative))
kd_view = results_table(["baseline float32", "student (labels only) float32", "student (distilled) float32",
                         "student (distilled) int8"])
print(kd_view[["parameters", "gzip bytes", "compression ratio", "test accuracy", "latency ms/image"]]
      .to_string(float_format="{:.4f}".format))

# %% [markdown]
# Compare the two float32 students: same architecture, same initial weights, same epochs,
# so the gap between their `test accuracy` values is what the teacher's soft targets
# bought in this run. One run is one sample: the gap moves with the seed and the teacher,
# so repeat with other seeds before you trust its size; distillation pays more with a
# stronger teacher and longer training. The check cell above shows how many times fewer
# parameters and FLOPs per image the student has, so unlike pruning it is also faster on
# ordinary dense kernels (`latency` column); quantizing it to int8 shrinks its bytes again
# (`compression ratio`). The student is cheaper to train per step than the teacher, but
# distillation does not make the *training job* cheaper: the teacher had to be trained
# first, at full size, and it runs forward on every student batch, which is why the distilled
# student's epochs took longer than the labels-only ones (the times printed above).

# %% [markdown]
# ## 5. One table, one plot
#
# Everything on one scale. Pruned models are converted to float32 and to int8 flatbuffers
# (int8 keeps the zeros: zero maps to the integer 0 with symmetric weight scales). All
# accuracies come from the LiteRT interpreter on the whole test set, all latencies are
# batch-1 medians with one interpreter thread. `compression ratio` is the baseline's gzip
# bytes divided by the model's gzip bytes: the cost of shipping the model.

# %%
for s, model in pruned.items():
    measure(f"pruned {s:.0%} float32", "pruning", model, compression.to_tflite(model, "float32"))
for s in (0.75, 0.9):
    measure(f"pruned {s:.0%} + int8", "pruning + int8", pruned[s],
            compression.to_tflite(pruned[s], "int8", representative))
order = ["baseline float32", "pruned 50% float32", "pruned 75% float32", "pruned 90% float32",
         "dynamic range", "float16", "int8 (PTQ)", "int8 (QAT)", "pruned 75% + int8",
         "pruned 90% + int8", "student (labels only) float32", "student (distilled) float32",
         "student (distilled) int8"]
summary = results_table(order)
summary.to_csv(RUN / "results.csv")
print(summary.drop(columns=["technique"]).to_string(float_format="{:.4f}".format))

# %%
# NBVAL_CHECK_OUTPUT
print(summary[["technique", "parameters"]].to_string())

# %%
fig, ax = plt.subplots(figsize=(9, 5.5))
for i, (technique, part) in enumerate(summary.groupby("technique", sort=False)):
    ax.scatter(part["gzip bytes"] / 1024, 100 * part["test accuracy"], s=60, color=f"C{i}", label=technique)
    for name, row in part.iterrows():
        ax.annotate(name, (row["gzip bytes"] / 1024, 100 * row["test accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
ax.axhline(100 * summary.loc["baseline float32", "test accuracy"], color="grey", linestyle=":", linewidth=1)
ax.set(xscale="log", xlabel="gzip bytes (KiB, log scale)", ylabel="test accuracy (%)", title="Accuracy against size")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# How to read the plot: up is better, left is smaller. Every point left of the baseline
# traded bytes for (some) accuracy. The int8 family sits far to the left at nearly the
# baseline's height; pruning on top of int8 moves further left; the distilled student
# shrinks both the file and the compute. Pick the point that fits your budget: download
# size (gzip), memory (bytes on disk, since the interpreter holds dense tensors), or
# latency (the table).

# %% [markdown]
# ## 6. How compression meets parallelism
#
# **What a smaller model no longer needs to shard.** A model is sharded (notebooks 06-08)
# when its bytes do not fit one device. The bytes per parameter decide that, and they differ
# a lot between training and serving. The table below uses the measured bytes on disk of
# this notebook's models (what the interpreter loads) and asks how many parameters fit in
# a 16 GiB accelerator, weights only (activations and workspace come on top).

# %%
budget = 16 * 2**30
params = summary.loc["baseline float32", "parameters"]
per_param = {
    "training, float32 weights + gradients + Adam (2 states)": 16.0,
    "serving float32 (measured)": summary.loc["baseline float32", "bytes on disk"] / params,
    "serving float16 (measured)": summary.loc["float16", "bytes on disk"] / params,
    "serving int8 (measured)": summary.loc["int8 (PTQ)", "bytes on disk"] / params,
    "download, 90% pruned + int8, gzip (measured)": summary.loc["pruned 90% + int8", "gzip bytes"] / params,
}
fits = pd.DataFrame({"bytes per parameter": per_param})
fits["parameters that fit in 16 GiB (billions)"] = budget / fits["bytes per parameter"] / 1e9
print(fits.to_string(float_format="{:.2f}".format))

# %% [markdown]
# Three lessons follow from these measurements:
#
# - **Post-training quantization shrinks serving memory** (the serving rows of the table).
#   A model that needs several devices to *serve* in float32 (tensor or pipeline parallel,
#   notebooks 06-07) may fit one device in int8 weights (activations permitting). The
#   compression in this notebook does not shrink *training*: QAT and pruning fine-tune in
#   float32 with gradients and Adam states (the first row), so such a training job still
#   needs the sharding of the earlier notebooks. Quantization can cut training memory too,
#   with other tools than the ones measured here: bfloat16 or FP8 mixed-precision training
#   keeps activations and matrix products in fewer bits (notebook 04 picks a mixed-precision
#   policy where the hardware supports one), and 8-bit optimizers store Adam's two states in
#   one byte each.
# - **Unstructured pruning does not remove sharding.** The zeros are still stored and
#   multiplied in dense kernels (same bytes on disk in the table, and the same work per
#   image); only the download shrinks. Structured pruning (whole filters or heads) or sparse
#   kernels are needed to turn sparsity into memory and speed.
# - **Distillation shrinks what you serve and what you fine-tune later, not the training
#   job that makes it.** The student has fewer parameters, activations and FLOPs; a student
#   small enough for one device needs no model parallelism to serve or retrain, only data
#   parallelism (notebook 02) if you want speed. But the teacher must be trained first,
#   with whatever sharding its size requires, and distillation runs the teacher forward on
#   every student batch (section 4 timed it), so its cost comes on top of training the teacher.
#
# **Compressing a model trained under a strategy.** Training under `MirroredStrategy`
# creates `MirroredVariable`s, one copy per device. Compression is a single-device,
# after-training step: save the model, reload it **outside** the strategy scope (plain
# variables, any machine, no cluster needed), then prune, quantize or convert it. The cell
# below fine-tunes a copy of the baseline for a few steps under a `MirroredStrategy` over
# `devices.compute_devices()`, saves it, reloads it outside, and converts the reloaded model
# to int8.

# %%
strategy = devices.make_strategy()  # over devices.compute_devices(): all GPUs, else all logical CPUs
with config.quiet_tf_logs(), strategy.scope():
    under_strategy = float32_copy(baseline, name="trained_under_strategy")
    under_strategy.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
with config.quiet_tf_logs():
    under_strategy.fit(train_ds.take(config.pick(smoke=2, full=20)), epochs=1, verbose=0, shuffle=False)
saved = RUN / "trained_under_strategy.keras"
under_strategy.save(saved)
reloaded = keras.models.load_model(saved)  # outside any strategy scope
flat_reloaded = compression.to_tflite(reloaded, "int8", representative)
acc_reloaded = compression.LiteRTModel(flat_reloaded).accuracy(data.x_test, data.y_test)
print(f"saved {saved.name}; int8 model from the reloaded copy: {len(flat_reloaded):,} bytes, "
      f"test accuracy {acc_reloaded:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
def is_mirrored(model: keras.Model) -> bool:
    """True if the model's variables are tf.distribute per-device values."""
    return all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.weights)


print("replicas in the strategy:", strategy.num_replicas_in_sync == len(devices.compute_devices()))
print("variables under the strategy are mirrored:", is_mirrored(under_strategy))
print("variables after reload outside it are mirrored:", is_mirrored(reloaded))
print("weights identical after save and reload:",
      all(np.array_equal(a, b) for a, b in zip(under_strategy.get_weights(), reloaded.get_weights(), strict=True)))
x_check_f = to_float(x_check)
print("reloaded model predicts like the trained one within 1e-5:",
      bool(np.allclose(reloaded(x_check_f), under_strategy(x_check_f), atol=1e-5)))

# %% [markdown]
# The same holds for pruning or QAT fine-tuning under a strategy: build and compile the
# pruned or QAT copy inside `strategy.scope()`, fine-tune it there (the mask callback
# assigns to mirrored variables like any other update), then save, reload outside and
# convert. On a GPU machine nothing here changes: `compute_devices()` returns the GPUs.
# On this CPU-only machine the logical devices share the same two cores, which is why the
# strategy shows the semantics, not a speed-up.

# %% [markdown]
# ## Summary
#
# - Magnitude pruning is a mask (the smallest weights by magnitude), a schedule (Zhu and
#   Gupta's cubic ramp) and a callback that re-applies the masks after every optimizer step.
#   It reaches the requested sparsity exactly, checked from the final weights. The zeros
#   only shrink the model once compressed (gzip), and they do not speed up dense kernels;
#   the highest sparsity needs more fine-tuning or per-layer sparsities.
# - Post-training quantization with `TFLiteConverter` needs no retraining: float16 halves
#   the file, dynamic range and full int8 quarter it. Full int8 with a small representative
#   dataset stayed close to float32 (section 2 prints the gap against a one-point tolerance).
# - Quantization-aware training is fake quantization (quantize, dequantize, straight-through
#   gradient) in the kernels and activations; the converter reads its ranges. On this CNN it
#   has little to add to post-training int8.
# - Distillation trains a smaller student on the teacher's temperature-softened outputs plus
#   the labels; section 4 compares it with the same student trained on labels alone. It
#   cannot match the teacher at this size and budget.
# - Post-training quantization shrinks serving memory; training memory needs other tools
#   (bf16 or FP8 training, 8-bit optimizers). Unstructured pruning shrinks downloads, not
#   memory. Distillation shrinks the model you serve, but the teacher must still be trained
#   and run. Compress after training: save, reload outside the strategy, convert.

# %% [markdown]
# ## Exercises
#
# **Exercise 1. Why fine-tune?** Prune a copy of the baseline to 90% in one shot: apply
# `magnitude_mask` to every kernel of `prunable_kernels`, with no training at all. Measure
# its kernel sparsity, gzip size and test accuracy, and compare them with the fine-tuned
# 90% model of section 1.

# %%
# Try it: change SPARSITY_1 to 0.9, then measure the copy like the fine-tuned model
SPARSITY_1 = 0.0  # TODO
one_shot = float32_copy(baseline, name="one_shot")
for _, kernel in prunable_kernels(one_shot):
    kernel.assign(kernel * magnitude_mask(kernel.numpy(), SPARSITY_1))
print(f"kernel sparsity: {sparsity_table(one_shot).loc['TOTAL kernels', 'sparsity']:.4f}")

# %% jupyter={"source_hidden": true}
# Solution 1
one_shot = float32_copy(baseline, name="one_shot_90")
for _, kernel in prunable_kernels(one_shot):
    kernel.assign(kernel * magnitude_mask(kernel.numpy(), 0.9))
ref = prune_table.loc["pruned_90"]
print(f"kernel sparsity: {sparsity_table(one_shot).loc['TOTAL kernels', 'sparsity']:.4f} "
      f"(fine-tuned: {ref['kernel sparsity']:.4f})")
print(f"gzip bytes: {compression.weights_size(one_shot)['gzip bytes']:,} (fine-tuned: {int(ref['gzip bytes']):,})")
print(f"test accuracy: {accuracy(one_shot, data.x_test, data.y_test):.4f} "
      f"(fine-tuned: {ref['test accuracy (Keras)']:.4f})")
# Same sparsity and size: what fine-tuning buys is accuracy. The remaining 10% of the
# weights must learn to do the work of the removed 90%.

# %% [markdown]
# **Exercise 2. How much calibration data does int8 need?** Convert the baseline to full
# int8 with only 4 representative images instead of the `N_CALIB` used above, and compare
# test accuracy with the int8 model of section 2.

# %%
# Try it: set N_FEW to 4 and compare with the int8 (PTQ) row of section 2
N_FEW = N_CALIB  # TODO
acc_few = compression.LiteRTModel(compression.to_tflite(baseline, "int8", data.x_train[:N_FEW])).accuracy(
    data.x_test, data.y_test)
print(f"int8 calibrated on {N_FEW} images: {acc_few:.4f}")

# %% jupyter={"source_hidden": true}
# Solution 2
few = compression.to_tflite(baseline, "int8", data.x_train[:4])
acc_few = compression.LiteRTModel(few).accuracy(data.x_test, data.y_test)
print(f"int8 calibrated on 4 images: {acc_few:.4f}; on {N_CALIB}: {results['int8 (PTQ)']['test accuracy']:.4f}")
# Four images see a narrower range of activations; values outside it are clipped.

# %% [markdown]
# **Exercise 3. What does the temperature do to the soft targets?** For the teacher's
# predictions on the test set, compute $\text{softmax}(\log p / T)$ for $T = 1, 2, 4, 8$ and
# report the average largest probability and the average entropy (in bits). Why is $T = 1$
# little more informative than the label for a confident teacher?

# %%
# Try it: fill in the entropy (in bits) of the softened targets, for each temperature
teacher_probs = baseline.predict(to_float(data.x_test), batch_size=500, verbose=0)
for temperature in (1.0, 2.0, 4.0, 8.0):
    soft = tf.nn.softmax(np.log(np.clip(teacher_probs, 1e-12, 1.0)) / temperature).numpy()
    entropy = np.zeros(len(soft))  # TODO: -sum(p * log2 p) over the classes
    print(f"T = {temperature:.0f}: mean largest probability {soft.max(-1).mean():.3f}, mean entropy {entropy.mean():.2f}")

# %% jupyter={"source_hidden": true}
# Solution 3
teacher_probs = baseline.predict(to_float(data.x_test), batch_size=500, verbose=0)
for temperature in (1.0, 2.0, 4.0, 8.0):
    soft = tf.nn.softmax(np.log(np.clip(teacher_probs, 1e-12, 1.0)) / temperature).numpy()
    entropy = -np.sum(soft * np.log2(np.clip(soft, 1e-12, 1.0)), axis=-1)
    print(f"T = {temperature:.0f}: mean largest probability {soft.max(-1).mean():.3f}, "
          f"mean entropy {entropy.mean():.2f} bits (uniform over 10 classes: {np.log2(10):.2f})")
# At T = 1 the targets are the teacher's own probabilities: for a confident teacher nearly
# one-hot, so they say little beyond the label. Higher T spreads the mass over the other
# classes and exposes which wrong classes the teacher finds plausible.

# %% [markdown]
# ## Further reading
#
# - S. Han, J. Pool, J. Tran, W. Dally, *Learning both Weights and Connections for
#   Efficient Neural Networks*, NeurIPS 2015. <https://arxiv.org/abs/1506.02626>
# - M. Zhu, S. Gupta, *To prune, or not to prune: exploring the efficacy of pruning for
#   model compression*, 2017 (the cubic schedule). <https://arxiv.org/abs/1710.01878>
# - B. Jacob et al., *Quantization and Training of Neural Networks for Efficient
#   Integer-Arithmetic-Only Inference*, CVPR 2018 (int8 scheme, fake quantization).
#   <https://arxiv.org/abs/1712.05877>
# - R. Krishnamoorthi, *Quantizing deep convolutional networks for efficient inference: A
#   whitepaper*, 2018 (per-channel scales, PTQ vs QAT). <https://arxiv.org/abs/1806.08342>
# - G. Hinton, O. Vinyals, J. Dean, *Distilling the Knowledge in a Neural Network*, 2015.
#   <https://arxiv.org/abs/1503.02531>
# - TensorFlow / LiteRT docs: post-training quantization
#   <https://ai.google.dev/edge/litert/models/post_training_quantization> and the LiteRT
#   Python interpreter <https://ai.google.dev/edge/litert/inference>.
# - Keras: knowledge distillation example <https://keras.io/examples/vision/knowledge_distillation/>
#   and `keras.distillation` <https://keras.io/api/models/distillation/>.
