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
# Compression claims are easy to get wrong (a pruning tool that silently prunes nothing, a
# "4x smaller" model that was never run), so every sparsity, size, accuracy and latency
# figure below is measured in this notebook: sparsity from the final weights, size in
# bytes (raw and gzip-compressed), accuracy on the test set, and latency per image on the
# LiteRT interpreter.
#
# **What you will learn**
#
# - how to prune a Keras 3 model by weight magnitude with a schedule and masks applied
#   during fine-tuning, and how to check the sparsity from the weights themselves;
# - why a pruned model is only smaller once it is compressed (gzip), and not faster on
#   dense kernels;
# - how to convert a model with `TFLiteConverter` to dynamic-range, float16 and full int8,
#   and evaluate it on the LiteRT interpreter (`ai-edge-litert`);
# - how to do quantization-aware training in Keras 3 with fake-quantization layers that
#   the converter understands;
# - how to distil the CNN into a student with half the width, and compare it with the same
#   student trained on labels only;
# - what compression changes for parallelism, and how to compress a model trained under a
#   `tf.distribute` strategy.
#
# **Run time** (measured on the 2-core CPU while other jobs shared it, so alone it is
# somewhat faster; the GPU column is not measured yet)
#
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full, notebook 04's model present (as in the stored outputs) | 4 min 47 s on a quiet machine | not measured yet |
# | full, baseline trained here first | 18 min 40 s under heavy load, 11 min of it training the baseline | not measured yet |
# | smoke (`SERIES_MODE=smoke`) | 54 s | not measured yet |
#
# If notebook 04 has not saved its model yet (or saved it in the other mode), the first
# cell of "The model to compress" trains one for 10 epochs and says so. The stored outputs
# of this notebook compress the model that notebook 04's stored run saved.

# %% [markdown]
# ## Setup
#
# `utils.compression` holds the reusable code of this notebook: pruning, size measurement,
# conversion, the LiteRT runner, QAT layers, distillation and the results table. Create the
# devices first (before any other TensorFlow code): on a CPU-only machine they are logical
# CPUs that share the same cores.

# %%
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ INFO lines

import time
import warnings

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import compression, config, data as cifar, devices, models, pipeline, training

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
S = config.sizes()
print("mode:", config.get_mode())
pd.set_option("display.width", 160)
tf.get_logger().setLevel("ERROR")  # hide TensorFlow's Python INFO/WARNING lines (retracing notes)
# Keras 3.15 warns that fit ignores shuffle=True for a tf.data.Dataset; the pipeline shuffles.
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
# `utils.training.load_or_train_cnn` loads the CNN that notebook 04 trained and saved. If
# it is missing (or was trained in another mode), it trains one with the series' recipe at
# this mode's size and says so. Notebook 04 may have trained in `mixed_bfloat16`;
# `compression.clone_float32` makes a float32 copy with the same weights, which is what
# the converter and the pruning masks should see.

# %%
t0 = time.perf_counter()
loaded, note = training.load_or_train_cnn(data)
print(note)
print(f"({time.perf_counter() - t0:.0f} s)")
baseline = compression.clone_float32(loaded, name="baseline")
train_ds = pipeline.make_dataset(data.x_train, data.y_train, S.batch_size, training=True, seed=0)
base_acc = compression.keras_accuracy(baseline, data.x_test, data.y_test)
print(f"baseline test accuracy (Keras, {len(data.x_test):,} images): {base_acc:.4f}")

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
# $(1-s)$ largest weights by absolute value; the others become exactly zero. Pruning 90% in
# one shot would wreck accuracy, so the sparsity rises during fine-tuning along Zhu and
# Gupta's cubic schedule,
#
# $$s_t = s_{\text{final}}\left(1 - \left(1 - \tfrac{t}{T}\right)^3\right),$$
#
# and the network keeps training in between, so the remaining weights take over the work of
# the removed ones. `compression.MagnitudePruning` is a Keras 3 callback that recomputes
# the masks every few steps and multiplies them back in after **every** optimizer step: Adam's
# momentum would otherwise move the pruned weights away from zero. (The
# `tensorflow-model-optimization` toolkit does the same with wrapper layers, but version
# 0.8.1 only works with the legacy `tf_keras`: when this series tried it on a Keras 3
# model, it ran without error and left the weights at 0% sparsity. Whatever tool you use,
# measure the sparsity from the weights, as below.)
#
# `compression.prune_and_finetune` copies the baseline, ramps the sparsity over the first
# 60% of the steps and holds it for the rest.

# %%
pruned = {}
for s in SPARSITIES:
    t0 = time.perf_counter()
    model, hist = compression.prune_and_finetune(baseline, s, train_ds, epochs=FT_EPOCHS)
    pruned[s] = model
    print(f"{model.name}: {FT_EPOCHS} fine-tuning epoch(s) in {time.perf_counter() - t0:.0f} s, "
          f"last epoch's training accuracy {hist.history['accuracy'][-1]:.4f}")

# %% [markdown]
# Do not trust the schedule: read the sparsity back from the final weights.
# `compression.sparsity_table` counts the exact zeros of every kernel. Biases are not
# pruned (the cell prints how few they are).

# %%
# NBVAL_CHECK_OUTPUT
table = compression.sparsity_table(pruned[0.9])
kernels = table[table["layer"] != "TOTAL all params"]
print(kernels.to_string(index=False, formatters={"sparsity": "{:.4f}".format}))
n_kernel = int(kernels.iloc[-1]["kernel weights"])
print(f"biases (not pruned): {baseline.count_params() - n_kernel:,} of {baseline.count_params():,} parameters")
for s, model in pruned.items():
    per_layer = compression.sparsity_table(model).set_index("layer")["sparsity"].drop("TOTAL all params")
    print(f"{model.name}: every kernel at {s:.0%} sparsity (within 0.05%):",
          bool(np.allclose(per_layer, s, atol=5e-4)))

# %% [markdown]
# Now the size. `compression.saved_weights_size` saves each model's weights with
# `model.save_weights` (an HDF5 file) and measures the file raw and gzip-compressed.

# %%
rows = []
for name, model in [("baseline", baseline)] + [(m.name, m) for m in pruned.values()]:
    size = compression.saved_weights_size(model, RUN / "weights")
    rows.append({
        "model": name,
        "kernel sparsity": compression.model_sparsity(model),
        "all-parameter sparsity": compression.model_sparsity(model, kernels_only=False),
        "weights file bytes": size["bytes"],
        "gzip bytes": size["gzip bytes"],
        "test accuracy (Keras)": compression.keras_accuracy(model, data.x_test, data.y_test),
    })
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
#   above, to compare with the baseline's first row. With two epochs of fine-tuning, 50%
#   costs under a point, 75% about three points and 90% a lot.
#
# Why is 90% so much harder? The sparsity is the same for every layer, and that is hard on
# the small ones: the check table shows `conv1` keeping only 86 of its 864 weights, while
# `dense1`, which holds about three quarters of all the kernel weights, could give up more.
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
lite_f32 = compression.LiteRTModel(flat["float32"])
diff = np.max(np.abs(lite_f32.predict(x_check) - baseline(x_check / 255.0).numpy()))
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
# an app classifying one photo at a time. `compression.evaluate_variant` collects
# parameters, non-zero parameters, bytes on disk, gzip bytes, LiteRT test accuracy and the
# median latency per image (one interpreter thread, after a warm-up).

# %%
def measure(name: str, technique: str, model: keras.Model, flatbuffer: bytes) -> dict:
    """Evaluate one variant on the whole test set and time it at batch 1."""
    return compression.evaluate_variant(name, technique, model, flatbuffer, data.x_test, data.y_test,
                                        latency_runs=LAT_RUNS)


results = {}
results["baseline float32"] = measure("baseline float32", "baseline", baseline, flat["float32"])
results["dynamic range"] = measure("dynamic range", "post-training quantization", baseline, flat["dynamic"])
results["float16"] = measure("float16", "post-training quantization", baseline, flat["float16"])
results["int8 (PTQ)"] = measure("int8 (PTQ)", "post-training quantization", baseline, flat["int8"])
ptq = compression.results_table(list(results.values()), baseline="baseline float32")
print(ptq[["bytes on disk", "gzip bytes", "file ratio", "test accuracy", "accuracy change (points)",
           "latency ms/image"]].to_string(float_format="{:.4f}".format))

# %%
gap = 100 * (results["int8 (PTQ)"]["test accuracy"] - results["baseline float32"]["test accuracy"])
print(f"int8 minus float32 test accuracy: {gap:+.2f} points "
      f"(within 1 point: {abs(gap) <= 1.0})")

# %% [markdown]
# What the numbers say:
#
# - **file size** follows the bytes per weight: float16 halves the file, dynamic range and
#   int8 cut it to about a quarter (`file ratio`; the flatbuffer also holds the graph, so
#   slightly less than 4x);
# - **accuracy**: the `accuracy change` column stays within a fraction of a point for all
#   three recipes; the cell above compares full int8 with float32 directly. Per-channel
#   weight scales and a representative dataset drawn from the training images are what
#   keep int8 close;
# - **latency**: int8 runs integer kernels and is the fastest per image here; float16
#   weights are expanded back to float32 on a CPU, so they save bytes and little time. Latencies
#   are medians on a shared 2-core machine; compare them within one run only.

# %% [markdown]
# ## 3. Quantization-aware training
#
# Post-training quantization rounds a network that never saw rounding. Quantization-aware
# training (QAT; Jacob et al. 2018) fine-tunes with the rounding in the forward pass, so
# the weights adapt to it. The gradients pass straight through the rounding (the
# straight-through estimator).
#
# The `tensorflow-model-optimization` QAT API needs `tf_keras`. In Keras 3 a working path
# is short: `compression.quantize_aware_model` rebuilds the CNN with
#
# - `QuantConv2D` / `QuantDense`: the kernel goes through
#   `tf.quantization.fake_quant_with_min_max_vars_per_channel` (per tensor for Dense) on
#   every call;
# - `FakeQuant` layers after the input and after each layer: 8-bit fake quantization of the
#   activations with a moving-average range.
#
# The converter recognises these `FakeQuant` ops and turns their ranges into the int8
# scales of the LiteRT model, so no representative dataset is needed.

# %%
t0 = time.perf_counter()
qat = compression.quantize_aware_model(baseline)
compression.calibrate_fake_quant(qat, representative)  # start the activation ranges from data
compression.compile_for_finetuning(qat, learning_rate=1e-4)
qat.fit(train_ds, epochs=QAT_EPOCHS, verbose=0, shuffle=False)
flat["qat"] = compression.to_tflite(qat, "qat")
print(f"QAT: {QAT_EPOCHS} epoch(s) of fine-tuning and conversion in {time.perf_counter() - t0:.0f} s")
results["int8 (QAT)"] = measure("int8 (QAT)", "quantization-aware training", baseline, flat["qat"])

# %%
# NBVAL_CHECK_OUTPUT
lite_qat = compression.LiteRTModel(flat["qat"])
print("QAT model layers:", [layer.__class__.__name__ for layer in qat.layers])
print("QAT int8 input / output dtypes:", lite_qat.input_dtype, "/", lite_qat.output_dtype)
print("QAT graph is integer-only:", "float32" not in lite_qat.tensor_dtypes())
print("QAT ops:", lite_qat.op_types())

# %%
qat_view = compression.results_table(
    [results[k] for k in ("baseline float32", "int8 (PTQ)", "int8 (QAT)")], baseline="baseline float32")
print(qat_view[["bytes on disk", "test accuracy", "accuracy change (points)", "latency ms/image"]]
      .to_string(float_format="{:.4f}".format))

# %% [markdown]
# Both int8 models have about the same size and run the same integer kernels (their
# latencies differ by measurement noise); they differ only in how their weights and
# ranges were found. On this small CNN post-training int8 is already close to float32, so
# QAT has little to recover: compare the `accuracy change` of the two int8 rows above
# (QAT also had one more epoch of fine-tuning at a small learning rate). QAT earns its cost
# on models that lose more under PTQ: depthwise convolutions (MobileNet), very low bit
# widths, or activations with outliers.

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
# The series' CNN ends in a softmax, so `compression.distillation_loss` recovers the
# logits as $z = \log p$ (exact up to a constant that softmax ignores). Keras 3.15 also has
# `keras.distillation.Distiller`, whose logits loss expects models that output logits.
#
# The student is the same CNN at half the width (`models.build_seed_cnn(width=0.5)`). For
# a fair comparison, two copies start from the **same initial weights** and train for the
# same epochs, on the same data, with the same optimizer: one on labels only, one with the
# teacher ($T = 4$, $\alpha = 0.1$).

# %%
keras.utils.set_random_seed(7)
init = models.build_seed_cnn(width=0.5, name="student_init").get_weights()
students, same_start = {}, []
for label, teacher in (("student (labels only)", None), ("student (distilled)", baseline)):
    student = models.build_seed_cnn(width=0.5, name="student")
    student.set_weights(init)
    same_start.append(all(np.array_equal(a, b) for a, b in zip(init, student.get_weights(), strict=True)))
    t0 = time.perf_counter()
    hist = compression.train_student(student, train_ds, KD_EPOCHS, teacher=teacher, temperature=4.0, alpha=0.1)
    students[label] = student
    acc = compression.keras_accuracy(student, data.x_test, data.y_test)
    print(f"{label}: {KD_EPOCHS} epoch(s) in {time.perf_counter() - t0:.0f} s, test accuracy {acc:.4f}")

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
    results[f"{label} float32"] = measure(f"{label} float32", "distillation", model,
                                          compression.to_tflite(model, "float32"))
results["student (distilled) int8"] = measure(
    "student (distilled) int8", "distillation + int8", students["student (distilled)"],
    compression.to_tflite(students["student (distilled)"], "int8", representative))
kd_view = compression.results_table(
    [results[k] for k in ("baseline float32", "student (labels only) float32",
                          "student (distilled) float32", "student (distilled) int8")],
    baseline="baseline float32")
print(kd_view[["parameters", "gzip bytes", "compression ratio", "test accuracy", "latency ms/image"]]
      .to_string(float_format="{:.4f}".format))

# %% [markdown]
# Compare the two float32 students: same architecture, same initial weights, same epochs,
# so the gap between their `test accuracy` values is what the teacher's soft targets
# bought. In this run the distilled student came out about two points ahead after four
# epochs (compare the two float32 rows). One run is one sample: the gap moves with the
# seed and the teacher, so repeat with other seeds before you trust its size;
# distillation pays more with a stronger teacher and longer training. The check cell above shows the
# student's 4.0x fewer parameters and 3.5x fewer FLOPs per image, so unlike pruning it is
# also faster on ordinary dense kernels (`latency` column); quantizing it to int8 stacks
# another factor of about 4 on the bytes.

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
    results[f"pruned {s:.0%} float32"] = measure(f"pruned {s:.0%} float32", "pruning", model,
                                                 compression.to_tflite(model, "float32"))
for s in (0.75, 0.9):
    results[f"pruned {s:.0%} + int8"] = measure(
        f"pruned {s:.0%} + int8", "pruning + int8", pruned[s],
        compression.to_tflite(pruned[s], "int8", representative))
order = ["baseline float32", "pruned 50% float32", "pruned 75% float32", "pruned 90% float32",
         "dynamic range", "float16", "int8 (PTQ)", "int8 (QAT)", "pruned 75% + int8",
         "pruned 90% + int8", "student (labels only) float32", "student (distilled) float32",
         "student (distilled) int8"]
summary = compression.results_table([results[k] for k in order], baseline="baseline float32")
summary.to_csv(RUN / "results.csv")
print(summary.drop(columns=["technique"]).to_string(float_format="{:.4f}".format))

# %%
# NBVAL_CHECK_OUTPUT
print(summary[["technique", "parameters"]].to_string())

# %%
fig, ax = plt.subplots(figsize=(9, 5.5))
compression.plot_accuracy_vs_size(summary, "gzip bytes", ax=ax)
ax.axhline(100 * summary.loc["baseline float32", "test accuracy"], color="grey", linestyle=":", linewidth=1)
plt.tight_layout()
plt.show()

# %% [markdown]
# How to read the plot: up is better, left is smaller. Every point left of the baseline
# traded bytes for (some) accuracy. The int8 family sits about 4x to the left at nearly
# the baseline's height; pruning on top of int8 moves further left; the distilled student
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
# - **Quantization divides serving memory by about 4.** A model that needs four devices
#   to *serve* in float32 (tensor or pipeline parallel, notebooks 06-07) fits one device in
#   int8 weights (activations permitting). It does nothing for training memory: QAT and
#   pruning fine-tune in float32, with gradients and Adam states, about 16 bytes per
#   parameter, so the training job still needs the sharding of the earlier notebooks.
# - **Unstructured pruning does not remove sharding.** The zeros are still stored and
#   multiplied in dense kernels (same bytes on disk, same latency in the table); only the
#   download shrinks. Structured pruning (whole filters or heads) or sparse kernels are
#   needed to turn sparsity into memory and speed.
# - **Distillation is the one that shrinks training, too.** The student is a smaller
#   network with fewer parameters, activations and FLOPs in every phase; a student small
#   enough for one device needs no model parallelism at all, only data parallelism
#   (notebooks 03-05) if you want speed.
#
# **Compressing a model trained under a strategy.** Training under
# `MirroredStrategy` creates `MirroredVariable`s, one copy per device. Compression is a
# single-device, after-training step: save the model, reload it **outside** the strategy
# scope (plain variables, any machine, no cluster needed), then prune, quantize or convert
# it. The cell below fine-tunes a copy of the baseline for a few steps under a
# `MirroredStrategy` over `devices.compute_devices()`, saves it, reloads it outside, and
# converts the reloaded model to int8.

# %%
strategy = training.make_strategy()  # over devices.compute_devices(): all GPUs, else all logical CPUs
with strategy.scope():
    under_strategy = compression.clone_float32(baseline, name="trained_under_strategy")
    compression.compile_for_finetuning(under_strategy, learning_rate=1e-4)
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
x_check_f = x_check / 255.0
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
# - Magnitude pruning in plain Keras 3 (a callback with masks re-applied after every step)
#   reaches the requested sparsity exactly, checked from the final weights. The zeros
#   only shrink the model once compressed (gzip), and they do not speed up dense kernels.
#   50% cost under a point here; 90% needs more fine-tuning or per-layer sparsities.
# - Post-training quantization with `TFLiteConverter` needs no retraining: float16 halves
#   the file, dynamic range and full int8 quarter it. Full int8 with a small
#   representative dataset stayed within 1 point of float32 here (section 2) and ran
#   faster than float32 on the LiteRT interpreter.
# - Quantization-aware training works in Keras 3 with fake-quantization layers; the
#   converter reads their ranges. On this CNN it has little to add to PTQ.
# - Distillation trained a half-width student with 4.0x fewer parameters and lower
#   latency; against the same student trained on labels alone for the same epochs it came
#   out about two points ahead in this run (section 4). It cannot match the teacher at this size and budget.
# - Quantization shrinks serving memory, not training memory; unstructured pruning shrinks
#   downloads, not memory; distillation shrinks everything. Compress after training:
#   save, reload outside the strategy, convert.

# %% [markdown]
# ## Exercises
#
# 1. **Why fine-tune?** Prune a copy of the baseline to 90% in one shot, with
#    `compression.magnitude_masks` and `compression.apply_masks` and no training at all.
#    Measure its kernel sparsity, gzip size and test accuracy, and compare them with the
#    fine-tuned 90% model of section 1.
# 2. **How much calibration data does int8 need?** Convert the baseline to full int8 with
#    only 4 representative images instead of the 200 used above (64 in smoke mode), and
#    compare test accuracy with the int8 model of section 2.
# 3. **What does the temperature do to the soft targets?** For the teacher's predictions
#    on the test set, compute $\text{softmax}(\log p / T)$ for $T = 1, 2, 4, 8$ and report
#    the average largest probability and the average entropy (in bits). Why is $T = 1$
#    little more informative than the label for a confident teacher?

# %%
# Exercise 1: your code here

# %% jupyter={"source_hidden": true}
# Solution 1
one_shot = compression.clone_float32(baseline, name="one_shot_90")
compression.apply_masks(one_shot, compression.magnitude_masks(one_shot, 0.9))
ref = prune_table.loc["pruned_90"]
print(f"kernel sparsity: {compression.model_sparsity(one_shot):.4f} (fine-tuned: {ref['kernel sparsity']:.4f})")
print(f"gzip bytes: {compression.saved_weights_size(one_shot)['gzip bytes']:,} "
      f"(fine-tuned: {int(ref['gzip bytes']):,})")
print(f"test accuracy: {compression.keras_accuracy(one_shot, data.x_test, data.y_test):.4f} "
      f"(fine-tuned: {ref['test accuracy (Keras)']:.4f})")
# Same sparsity and size: what fine-tuning buys is accuracy. The remaining 10% of the
# weights must learn to do the work of the removed 90%.

# %%
# Exercise 2: your code here

# %% jupyter={"source_hidden": true}
# Solution 2
few = compression.to_tflite(baseline, "int8", data.x_train[:4])
acc_few = compression.LiteRTModel(few).accuracy(data.x_test, data.y_test)
print(f"int8 calibrated on 4 images: {acc_few:.4f}; on {N_CALIB}: {results['int8 (PTQ)']['test accuracy']:.4f}")
# Four images see a narrower range of activations; values outside it are clipped.

# %%
# Exercise 3: your code here

# %% jupyter={"source_hidden": true}
# Solution 3
teacher_probs = baseline.predict(data.x_test / 255.0, batch_size=500, verbose=0)
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
