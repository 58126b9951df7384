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
# # 00 · Setup: your machine, your devices, your data
#
# This series teaches you how to train models that are too large for one device with
# TensorFlow: data parallelism first, then the real thing — splitting *the model itself*
# across devices by layers (pipeline parallelism), inside layers (tensor parallelism) and
# both at once (hybrid parallelism), across processes (multi-worker) and, finally, making
# the model smaller (compression). Everything runs on an ordinary laptop CPU and, unchanged,
# on GPUs.
#
# **What you will learn**
#
# - which notebooks make up the series, in which order, and how long each takes;
# - how to check your TensorFlow, Keras and device set-up;
# - the difference between *physical* and *logical* devices, and how to split one CPU into
#   several logical devices to rehearse multi-device code on a laptop;
# - where the CIFAR-10 data will come from on your machine, and how to work offline;
# - the one switch that makes every notebook run in seconds (smoke mode).
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 11 s | not measured |
# | smoke (`SERIES_MODE=smoke`) | 30 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# The series' shared code lives in the `utils` package at the root of the repository.
# `make lab` installs it into the project's virtual environment in *editable* mode
# (`pip install -e .`), so `import utils` works in every notebook wherever you started
# JupyterLab, and edits to `utils/` take effect after a kernel restart.
#
# `utils` holds only infrastructure: modes, devices, data loading, the seed model, plots,
# the memory calculator, the cluster launcher and benchmark helpers. The algorithms live in
# the notebooks, written out where they are taught. What a later notebook reuses is marked
# `#@save` in the notebook that teaches it (d2l's convention) and exported by `make export`
# into the generated package `utils.lessons` (one module per notebook, never edited by hand).
#
# Import `utils` before TensorFlow: it keeps TensorFlow's start-up log (absl, oneDNN, the
# CUDA driver probe on a machine without GPU) out of your outputs. Set `SERIES_TF_LOGS=1`
# before starting JupyterLab to see those lines.

# %%
import platform

from utils import config, data, devices, series

import keras
import tensorflow as tf

device_table = devices.setup_devices()  # must run before any other TensorFlow op
config.seed_everything()
print(f"mode: {config.get_mode()} (switch with SERIES_MODE=full|smoke)")
device_table

# %% [markdown]
# ## The path through the series
#
# Each notebook builds on the ones before it. The table below is computed from the
# committed notebooks themselves: the *full* column is the wall time of the full run whose
# outputs you are reading (recorded by Jupyter in each cell's execution metadata), the
# *smoke* column comes from the last `make timings` run, both on a 2-core CPU; the GPU
# column from the last `make gpu-check` on a machine with an NVIDIA GPU. This notebook's
# own time is in its "Run time" table above (it cannot measure itself while it runs).

# %%
series.runtime_table(exclude="00_setup.ipynb")

# %% [markdown]
# **Smoke mode.** Set the environment variable `SERIES_MODE=smoke` before starting
# JupyterLab (or `make test`, which sets it for you) and every notebook runs in about a
# minute: tiny subsets, one epoch, few steps, and synthetic data when no CIFAR-10 copy is
# available. The default, `SERIES_MODE=full`, is the real run. Any other value stops with
# an error that names the two allowed values:

# %%
# NBVAL_CHECK_OUTPUT
import os

saved = os.environ.get(config.MODE_ENV)
os.environ[config.MODE_ENV] = "fast"
try:
    config.get_mode()
except ValueError as err:
    print(err)
finally:
    if saved is None:
        del os.environ[config.MODE_ENV]
    else:
        os.environ[config.MODE_ENV] = saved

# %% [markdown]
# ## Check your versions
#
# The series is pinned to TensorFlow 2.21 with Keras 3 (`requirements.txt`). Keras 3 is
# what `tf.keras` means from TensorFlow 2.16 on; older tutorials (like the article this
# series starts from) were written for Keras 2, and some of their code no longer runs —
# you will meet one such case in notebook 09.

# %%
# NBVAL_CHECK_OUTPUT
print("Python    ", ".".join(platform.python_version_tuple()[:2]))
print("TensorFlow", tf.__version__)
print("Keras     ", keras.__version__.rsplit(".", 1)[0] + ".x")
print("tf.keras is Keras 3:", tf.keras.__name__.startswith("keras") and keras.__version__.startswith("3."))

# %% [markdown]
# ## Physical and logical devices
#
# TensorFlow distinguishes the hardware it finds (*physical devices*) from the devices it
# places work on (*logical devices*). Normally there is one logical device per physical
# one. You can split one physical device into several logical ones: a GPU into slices with
# memory limits, or a CPU into several "virtual CPUs". `utils.devices.setup_devices()` did
# that above when it found no GPU: it asked for `SERIES_NUM_CPUS` logical CPUs (default 4).
#
# Be clear about what this buys you. **Logical CPUs share the same cores.** Four logical
# CPUs on a 2-core laptop do not make anything faster; they let you run, on a laptop, the
# exact code that spreads a model over four GPUs — same placement, same communication, same
# results — so you can see that it is correct before you pay for the hardware.

# %%
print("physical:", [d.name for d in tf.config.list_physical_devices()])
print("logical: ", devices.compute_devices())
print("kind:    ", devices.device_kind())

# %% [markdown]
# Place an op on a chosen device with `tf.device`. The result remembers where it was
# computed:

# %%
# NBVAL_CHECK_OUTPUT
names = devices.compute_devices()
with tf.device(names[-1]):
    x = tf.random.normal([256, 256], seed=1)
    y = tf.matmul(x, x)
print(f"{len(names)} compute devices; the matmul ran on ...{y.device.split('/')[-1]}")

# %% [markdown]
# The split is fixed once TensorFlow has created its devices, which happens at the first
# op. Asking for a different number afterwards fails with a message that tells you what to
# do. The series' notebooks therefore call `setup_devices()` in their first code cell.

# %%
# NBVAL_CHECK_OUTPUT
try:
    devices.setup_devices(len(names) + 1)
except RuntimeError as err:
    print(err)

# %% [markdown]
# ## Where CIFAR-10 comes from
#
# `utils.data.load_cifar10()` looks in four places, in order:
#
# 1. a folder or archive you name: `data_dir=...`, or the environment variable
#    `CIFAR10_DIR` pointing at an extracted `cifar-10-batches-py` folder or at the official
#    `cifar-10-python.tar.gz`;
# 2. Keras's cache (`~/.keras/datasets/`), filled by an earlier download;
# 3. a download through `keras.datasets.cifar10` (about 170 MB, once);
# 4. if all of that fails, an error that says how to use a local copy — or, only when the
#    caller allows it (smoke mode does), a small *synthetic* CIFAR-shaped dataset that is
#    labelled "synthetic" wherever it is used.
#
# **Working offline** (a workshop room without Wi-Fi): download `cifar-10-python.tar.gz`
# from <https://www.cs.toronto.edu/~kriz/cifar.html> beforehand, copy it to the machine and
# start JupyterLab with `CIFAR10_DIR=/path/to/cifar-10-python.tar.gz make lab`.
#
# Here is what this machine found:

# %%
cifar = data.load_for_mode()
print(cifar.describe())

# %%
cifar.counts_table()

# %% [markdown]
# Whatever the source, the arrays have the same layout: `uint8` images, channels last, and
# integer labels.

# %%
# NBVAL_CHECK_OUTPUT
print("image:", cifar.x_train.shape[1:], cifar.x_train.dtype, "| label:", cifar.y_train.dtype)
print("classes:", ", ".join(cifar.class_names))

# %% [markdown]
# ## When something fails
#
# - **"Restart the kernel"** errors mean TensorFlow already created its devices: use
#   *Kernel → Restart Kernel* and run the notebook from the top.
# - **CIFAR-10 is not available**: follow the message (set `CIFAR10_DIR`), or run in smoke
#   mode to continue with synthetic data.
# - **Slow laptop**: restart JupyterLab with `SERIES_MODE=smoke`.
# - Everything else, with the exact error messages: `docs/troubleshooting.md`.
#
# ## Summary
#
# - The series runs from data parallelism (02–05) to model parallelism across layers (06),
#   inside layers (07), both at once (08), across processes (09), and compression (10).
# - `utils.devices.setup_devices()` gives you GPUs when present, else N logical CPUs that
#   share your cores: correct semantics, no speed-up.
# - `utils.data.load_cifar10()` finds CIFAR-10 locally, in Keras's cache or by download, and
#   tells you how to work offline.
# - `SERIES_MODE=smoke` makes every notebook fast; `full` is the real run.
#
# ## Exercises
#
# **1.** Start a fresh Python process with `SERIES_NUM_CPUS=2` and check how many compute
# devices you get. What happens if you set it to `abc`? (This kernel's devices are already
# fixed, so use a subprocess.)

# %%
# Try it: change the value, run, then compare with the solution below.
import subprocess
import sys

value = "3"
out = subprocess.run(
    [sys.executable, "-c", "from utils import devices; devices.setup_devices(); print(len(devices.compute_devices()))"],
    capture_output=True, text=True, env={**os.environ, "SERIES_NUM_CPUS": value},
)
print(f"SERIES_NUM_CPUS={value}:", out.stdout.strip() or out.stderr.strip().splitlines()[-1])

# %% jupyter={"source_hidden": true}
# Solution 1: a subprocess per value, because this kernel's devices are already fixed
for value in ["2", "abc"]:
    out = subprocess.run(
        [sys.executable, "-c", "from utils import devices; devices.setup_devices(); print(len(devices.compute_devices()))"],
        capture_output=True, text=True, env={**os.environ, "SERIES_NUM_CPUS": value},
    )
    print(f"SERIES_NUM_CPUS={value}:", out.stdout.strip() or out.stderr.strip().splitlines()[-1])

# %% [markdown]
# **2.** Place one matmul on the first and one on the last logical device, add the
# results, and print the device of each tensor. Where did the addition run?

# %%
# Try it: put a second matmul on names[-1], add the two, print the device of each tensor.
with tf.device(names[0]):
    a = tf.matmul(x, x)
print("a on", a.device.split("/")[-1])

# %% jupyter={"source_hidden": true}
# Solution 2
with tf.device(names[0]):
    a = tf.matmul(x, x)
with tf.device(names[-1]):
    b = tf.matmul(x, x)
c = a + b  # no device given: TensorFlow picks one (usually the first) and copies the inputs
print(a.device.split("/")[-1], b.device.split("/")[-1], "->", c.device.split("/")[-1])

# %% [markdown]
# ## Further reading
#
# - TensorFlow guide, [Use a GPU / logical devices](https://www.tensorflow.org/guide/gpu) and
#   [`tf.config.set_logical_device_configuration`](https://www.tensorflow.org/api_docs/python/tf/config/set_logical_device_configuration).
# - TensorFlow guide, [Distributed training with TensorFlow](https://www.tensorflow.org/guide/distributed_training).
# - A. Krizhevsky, [Learning Multiple Layers of Features from Tiny Images](https://www.cs.toronto.edu/~kriz/learning-features-2009-TR.pdf), 2009 (CIFAR-10).
# - Keras 3 [migration notes](https://keras.io/guides/migrating_to_keras_3/).
