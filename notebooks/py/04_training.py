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
# # Training the seed CNN under MirroredStrategy, with callbacks that survive a crash
#
# The seed article trains its CNN with one line, `model.fit(x_train, y_train, epochs=10)`,
# on NumPy arrays. In this notebook you write the training code the rest of the series
# uses: a precision policy chosen from the hardware, a learning-rate schedule, the
# callbacks that time, checkpoint, log, stop early and, above all, let a crashed run resume
# where it stopped, and the two recipes, the seed's and this series'. Each piece is defined
# in a cell, run and shown, then used; the pieces that later notebooks reuse are marked
# `#@save` and exported into `utils/lessons/training.py`.
#
# **What you will learn**
#
# - how to choose a precision policy from what the hardware computes natively, and how to
#   measure whether it pays (bfloat16 against float32, in interleaved rounds);
# - how to run `model.fit` under `MirroredStrategy` with a global batch of 128 fed by `tf.data`;
# - what each callback is for: a timing callback, `LearningRateScheduler` (warm-up + cosine),
#   `ModelCheckpoint`, `BackupAndRestore`, `CSVLogger`, `EarlyStopping`;
# - how to read training curves (train vs validation loss and accuracy);
# - how a run that crashes in the middle of an epoch resumes with `BackupAndRestore`, and
#   how to check that no epoch was lost or trained twice;
# - how the seed's recipe and this series' recipe compare in test accuracy and wall time.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 13.7 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 1.1 min | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# `setup_devices()` must run before any other TensorFlow code: on a machine without GPUs it
# splits the CPU into logical devices. They share the same physical cores, so they show the
# *semantics* of data parallelism (replicas, mirrored variables, all-reduce), not a
# speed-up. This notebook asks for **2** logical CPUs, one per core of the 2-core machine
# it was run on, instead of the series' default of 4: every extra replica adds
# synchronisation to every step, and this notebook times full training runs. On a machine
# with GPUs the argument is ignored and the same code uses the GPUs.

# %%
import time

import matplotlib.pyplot as plt

from utils import config, devices

print("mode:", config.get_mode())
NOTEBOOK_START = time.perf_counter()
devices.setup_devices(num_cpus=2)
print(devices.device_table().to_string(index=False))

# %%
from utils import data as cifar
from utils import plots

print(f"seed: {config.seed_everything()}")
S = config.sizes()
print(S.as_dict())
data = cifar.load_for_mode()
print(data.describe())

# %% [markdown]
# ## Precision: let the hardware decide
#
# A mixed-precision policy computes the layers in a 16-bit type while the variables stay
# float32. It only pays where the hardware computes that type natively:
#
# - a GPU computes **float16** on its tensor cores (`mixed_float16`; Keras then wraps the
#   optimizer in a `LossScaleOptimizer` so small float16 gradients do not flush to zero);
# - a CPU computes **bfloat16** natively only with the instructions made for it: AVX-512 BF16
#   or AMX on x86 (flags `avx512_bf16`, `amx_bf16` in `/proc/cpuinfo`), the BF16 extension on
#   Arm (flag `bf16`). Without them bfloat16 has no instructions of its own, and the policy
#   to pick is plain `float32`.
#
# `choose_precision` reads the CPU flags (or takes a `/proc/cpuinfo` text, to try other CPUs)
# and returns the policy with its reason.

# %%
#@save
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import pandas as pd
import tensorflow as tf

from utils import config, devices, models
from utils.lessons.cifar10_pipeline import make_dataset

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86: AVX-512 BF16, AMX; Arm: BF16 extension


def choose_precision(cpuinfo=None, gpu=None):
    """The Keras dtype policy for this hardware, and why: ``(policy, reason)``."""
    # 1. a GPU: float16 on its tensor cores
    gpu = bool(tf.config.list_physical_devices("GPU")) if gpu is None else gpu
    if gpu:
        return "mixed_float16", "GPU: float16 on tensor cores, with loss scaling"
    # 2. a CPU: read its feature flags ("flags" on x86, "Features" on Arm)
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    # 3. bfloat16 only where an instruction computes it
    native = [f for f in BF16_FLAGS if f in flags]
    if native:
        return "mixed_bfloat16", f"CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", "CPU without bfloat16 instructions (no avx512_bf16, amx_bf16 or bf16 flag)"


def default_mixed_policy(cpuinfo=None, gpu=None) -> str:
    """The policy :func:`choose_precision` picks for this machine."""
    return choose_precision(cpuinfo, gpu)[0]


@contextlib.contextmanager
def precision_policy(name: str):
    """Keras's global dtype policy inside the block (models built there keep it)."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield name
    finally:
        keras.mixed_precision.set_global_policy(previous)


# %% [markdown]
# Three CPU descriptions, then this machine:

# %%
# NBVAL_CHECK_OUTPUT
examples = {
    "x86 with AVX2 only": "vendor_id : AuthenticAMD\nflags : fpu sse2 avx avx2 fma",
    "x86 with AMX": "vendor_id : GenuineIntel\nflags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
    "Arm with BF16": "CPU implementer : 0x41\nFeatures : fp asimd sve bf16 i8mm",
}
for name, text in examples.items():
    print(f"{name:20s} -> {choose_precision(text, gpu=False)}")
print(f"{'a GPU':20s} -> {choose_precision(gpu=True)}")

# %%
policy, reason = choose_precision()
print(f"this machine: {policy} ({reason})")

# %% [markdown]
# ### Measure it: bfloat16 against float32, in interleaved rounds
#
# A claim about speed needs a measurement, and a fair one: the two policies train the same
# model on the same batch, one short round each, *alternating* (float32, bfloat16, float32,
# ...), so that a slow spell of a shared machine hits both alike. Each round times a few
# training steps after one step that traced the model.

# %%
def time_policies(policies, rounds, steps, batch=128):
    """Images/s of a training step per policy, in interleaved rounds: one row per round."""
    # 1. one model per policy, compiled and traced by a first step
    x = tf.constant(cifar.to_float(data.x_train[:batch]))
    y = tf.constant(data.y_train[:batch])
    trained = {}
    for name in policies:
        with precision_policy(name):
            model = models.build_seed_cnn()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.train_on_batch(x, y)
        trained[name] = model
    # 2. alternate the policies round after round, timing `steps` steps each
    rows = []
    for r in range(rounds):
        for name, model in trained.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            rows.append({"round": r + 1, "policy": name,
                         "images/s": steps * batch / (time.perf_counter() - start)})
    return pd.DataFrame(rows)


rounds = time_policies(["float32", "mixed_bfloat16"], rounds=config.pick(smoke=3, full=5),
                       steps=config.pick(smoke=1, full=5))
speed = rounds.pivot(index="round", columns="policy", values="images/s")
speed["bf16 / fp32"] = speed["mixed_bfloat16"] / speed["float32"]
print(speed.round(2).to_string())
print(f"median bf16 / fp32: {speed['bf16 / fp32'].median():.2f}x")
print(f"bfloat16 faster in every round: {bool((speed['bf16 / fp32'] > 1).all())}; "
      f"slower in every round: {bool((speed['bf16 / fp32'] < 1).all())}")

# %% [markdown]
# The verdict line says which way every round went on the CPU that ran this notebook (its
# flags and `choose_precision`'s reason are printed above). On the CPU that produced the
# stored outputs, which has no bfloat16 instructions, bfloat16 was slower in every round
# (the median ratio is printed above). This is why the recipe below takes what
# `choose_precision` says rather than assuming that 16 bits are faster: measure on yours.
#
# ## The learning-rate schedule
#
# The series' recipe uses a global batch of 128 instead of the seed's 32, so it takes fewer
# optimizer steps per epoch; its peak learning rate goes up (doubled here, a cautious version of the
# *linear scaling rule* of Goyal et al.), with one warm-up epoch so the first steps do not
# diverge, then a cosine decay. The schedule is a function of the epoch number only, so a
# resumed run gets the same rates.

# %%
#@save
def warmup_cosine(base_lr: float, epochs: int, warmup_epochs: int = 1, min_fraction: float = 0.05):
    """A per-epoch schedule for ``keras.callbacks.LearningRateScheduler``."""
    warmup_epochs = min(warmup_epochs, epochs - 1)

    def schedule(epoch: int, lr: float = base_lr) -> float:
        # 1. warm-up: climb linearly to base_lr
        if epoch < warmup_epochs:
            return base_lr * (epoch + 1) / (warmup_epochs + 1)
        # 2. cosine decay from base_lr to min_fraction * base_lr at the last epoch
        progress = min((epoch - warmup_epochs) / max(epochs - 1 - warmup_epochs, 1), 1.0)
        return float(base_lr * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))))

    return schedule


# %%
# NBVAL_CHECK_OUTPUT
schedule = warmup_cosine(2e-3, 10)
print("epoch:        ", " ".join(f"{e + 1:7d}" for e in range(10)))
print("learning rate:", " ".join(f"{schedule(e):.5f}" for e in range(10)))
print(f"peak: {schedule(1):g} (the seed's constant Adam rate: {keras.optimizers.Adam().learning_rate.numpy():g})")

# %% [markdown]
# ## Callbacks
#
# A callback is an object whose methods `model.fit` calls at fixed points: at the start and
# end of every batch and epoch. The first one is this series' own: it times each epoch's
# training batches, after the first batch of the epoch (the first one also traces the model
# or refills the input pipeline), and writes `images_per_s` into the epoch's logs, where
# `History` and the logger find it.

# %%
#@save
class ThroughputCallback(keras.callbacks.Callback):
    """Training images/s of every epoch, after its first ``warmup`` batches."""

    def __init__(self, batch_size: int, warmup: int = 1):
        super().__init__()
        self.batch_size, self.warmup = batch_size, warmup
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen, self.start, self.end = 0, None, None

    def on_train_batch_end(self, batch, logs=None):
        # 1. count batches; the clock starts when the warm-up batches are done
        self.seen += 1
        if self.seen == self.warmup:
            self.start = time.perf_counter()
        elif self.seen > self.warmup:
            self.end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        # 2. timed batches x global batch / timed seconds, into the epoch's logs
        timed = self.seen - self.warmup
        rate = timed * self.batch_size / (self.end - self.start) if timed > 0 else float("nan")
        self.rates.append(rate)
        if logs is not None:
            logs["images_per_s"] = rate

    @property
    def mean_images_per_s(self) -> float:
        """The mean rate over the epochs that timed any batch."""
        timed = [r for r in self.rates if not math.isnan(r)]
        return sum(timed) / len(timed) if timed else float("nan")

    @property
    def images_per_s(self) -> float:
        """The last epoch's rate."""
        if not self.rates or math.isnan(self.rates[-1]):
            raise RuntimeError(f"ThroughputCallback needs more than warmup={self.warmup} batches per epoch")
        return self.rates[-1]


# %% [markdown]
# Then Keras's own callbacks, in the order they run:
#
# - **LearningRateScheduler** sets the learning rate at the start of every epoch from the schedule.
# - **ModelCheckpoint** keeps the best model so far (lowest `val_loss`) as `best.keras`.
# - **BackupAndRestore** saves weights, optimizer state and the epoch counter after every
#   epoch, and deletes them when `fit` completes; a `fit` restarted after a crash resumes there.
# - **CSVLogger** appends one line per epoch (all metrics, the learning rate, images/s) to
#   `log.csv`. With the `tensorboard` package installed, `keras.callbacks.TensorBoard(log_dir)`
#   writes the same numbers as event files for TensorBoard.
# - **EarlyStopping** ends training after `patience` epochs without a better `val_loss` and
#   restores the best weights.

# %%
#@save
def make_callbacks(run_dir, batch_size, schedule, *, checkpoint=True, logs=True, patience=3,
                   backup_freq="epoch"):
    """The series' callbacks; every file they write goes under ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # 1. measure and schedule: images/s into the logs, the learning rate from the epoch
    cbs = [ThroughputCallback(batch_size), keras.callbacks.LearningRateScheduler(schedule)]
    # 2. keep the best model, by validation loss
    if checkpoint:
        cbs.append(keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), save_best_only=True))
    # 3. back up weights, optimizer and epoch counter, to resume after a crash
    cbs.append(keras.callbacks.BackupAndRestore(str(run_dir / "backup"), save_freq=backup_freq))
    # 4. one log line per epoch
    if logs:
        cbs.append(keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True))
    # 5. stop when the validation loss stops improving, with the best weights
    if patience:
        cbs.append(keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True))
    return cbs


# %%
# NBVAL_CHECK_OUTPUT
run = config.run_dir(f"04_training_{config.get_mode()}", fresh=True)  # checkpoints and logs
for cb in make_callbacks(run, S.batch_size, schedule):
    print(type(cb).__name__)

# %% [markdown]
# ## The two recipes
#
# Both recipes train the same model (`models.build_seed_cnn`), and both are scored by the
# same function on the same test images, so their accuracies compare. A recipe returns a
# `RecipeResult` with one row for a table.
#
# | | seed recipe | series recipe |
# |---|---|---|
# | input | NumPy float64, sliced by Keras | `tf.data`: shuffle, batch, normalise, augment, prefetch (notebook 03) |
# | batch | 32 | 128 (global), split over the replicas |
# | devices | one | `MirroredStrategy` over `compute_devices()` |
# | precision | float32 | `choose_precision()` |
# | learning rate | Adam `0.001`, constant | Adam, 1 warm-up epoch to `0.002`, then cosine decay |
# | augmentation | none | random pad-and-crop and horizontal flip |
# | validation | the test split | 10 % of the training images, held out |
# | callbacks | timing only | timing, schedule, checkpoint, backup, log, early stopping |
#
# The validation split comes out of the *training* images: early stopping and the "best"
# checkpoint choose a model by its validation score, and choosing by the test score (as the
# seed does) would make the test accuracy optimistic.

# %%
#@save
@dataclass
class RecipeResult:
    """What one training run produced."""

    name: str
    model: keras.Model
    history: pd.DataFrame  # one row per epoch, with a 1-based "epoch" column
    wall_s: float  # seconds in model.fit (training + per-epoch validation)
    cpu_s: float  # CPU seconds of this process in model.fit, all threads
    test_accuracy: float
    images_per_s: float  # mean over epochs of ThroughputCallback's rates
    settings: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"recipe": self.name, **self.settings, "epochs run": len(self.history),
                "train images/s": round(self.images_per_s), "wall time (s)": round(self.wall_s, 1),
                "CPU time (s)": round(self.cpu_s, 1), "test accuracy": round(self.test_accuracy, 4)}


def history_frame(history, run=None) -> pd.DataFrame:
    """A ``History`` as a DataFrame; epochs numbered from ``history.epoch`` (a resumed run: 3, 4...)."""
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", [e + 1 for e in history.epoch])
    if run is not None:
        frame.insert(0, "run", run)
    return frame


def compile_cnn(model, learning_rate=1e-3):
    """Adam, sparse categorical cross-entropy, accuracy: the seed's choices."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def score_accuracy(model, x, y, batch_size=256) -> float:
    """Accuracy on uint8 test images, fed by the pipeline (no shuffle, no augmentation)."""
    # under a strategy every batch must split evenly over the replicas
    replicas = model.distribute_strategy.num_replicas_in_sync
    n = len(x) - len(x) % replicas
    ds = make_dataset(x[:n], y[:n], batch_size - batch_size % replicas, training=False)
    return float(model.evaluate(ds, verbose=0)[1])


def timed_fit(model, *args, **kwargs):
    """``model.fit`` and the wall and CPU seconds it took."""
    start, cpu = time.perf_counter(), time.process_time()
    history = model.fit(*args, **kwargs)
    return history, time.perf_counter() - start, time.process_time() - cpu


# %% [markdown]
# The seed's recipe reproduces the seed article exactly: `x / 255.0` turns the uint8 arrays
# into **float64** arrays (Keras casts each batch to float32 on the way in), `model.fit` uses
# Keras's default batch of **32**, Adam at its default learning rate, and the test split
# as `validation_data`. No strategy, one device, float32.

# %%
#@save
def seed_recipe(data, *, epochs=10, batch_size=32, verbose=2) -> RecipeResult:
    """Train the seed CNN exactly as the seed article does."""
    # 1. the article's inputs: float64 arrays; the test split doubles as validation
    x_train, x_test = data.x_train / 255.0, data.x_test / 255.0
    print("precision: float32 (the seed's choice)")
    with precision_policy("float32"):
        model = compile_cnn(models.build_seed_cnn(name="seed_recipe_cnn"))
    # 2. fit with Keras's default batch, timed
    timer = ThroughputCallback(batch_size)
    history, wall, cpu = timed_fit(model, x_train, data.y_train, epochs=epochs, batch_size=batch_size,
                                   validation_data=(x_test, data.y_test), callbacks=[timer], verbose=verbose)
    # 3. score like every recipe
    return RecipeResult("seed recipe", model, history_frame(history), wall, cpu,
                        score_accuracy(model, data.x_test, data.y_test), timer.mean_images_per_s,
                        {"input": "NumPy float64", "batch": batch_size, "precision": "float32",
                         "replicas": 1, "validation": "test split", "steps/epoch": math.ceil(len(x_train) / batch_size)})


# %% [markdown]
# The series' recipe. Each replica receives `global batch / replicas` images per step, and
# the gradients are all-reduced (summed over replicas) before every update, so all replicas
# keep identical weights (notebook 02 proves it). The model and its optimizer are built
# inside `strategy.scope()`, so their variables are mirrored on every replica.

# %%
#@save
def series_recipe(data, *, epochs=10, batch_size=128, precision="auto", strategy=None, run_dir=None,
                  base_lr=2e-3, val_fraction=0.1, patience=3, extra_callbacks=(), verbose=2,
                  seed=0) -> RecipeResult:
    """Train the seed CNN with this series' recipe (see the table above)."""
    # 1. precision from the hardware, a strategy over every compute device
    policy, why = choose_precision() if precision == "auto" else (precision, "asked for")
    print(f"precision: {policy} ({why})")
    strategy = strategy or devices.make_strategy()
    replicas = strategy.num_replicas_in_sync
    # 2. hold out validation images (a multiple of the replicas) from the training split
    n_val = max(replicas, round(len(data.x_train) * val_fraction / replicas) * replicas)
    train = make_dataset(data.x_train[:-n_val], data.y_train[:-n_val], batch_size,
                                  training=True, seed=seed)
    val = make_dataset(data.x_train[-n_val:], data.y_train[-n_val:], batch_size, training=False)
    # 3. model and optimizer inside the scope: mirrored variables
    with precision_policy(policy), strategy.scope():
        model = compile_cnn(models.build_seed_cnn(name="seed_cnn"), base_lr)
    # 4. callbacks (without a run folder: timing and schedule only), then fit
    schedule = warmup_cosine(base_lr, epochs)
    if run_dir is None:
        cbs = [ThroughputCallback(batch_size), keras.callbacks.LearningRateScheduler(schedule)]
    else:
        cbs = make_callbacks(run_dir, batch_size, schedule, patience=patience)
    history, wall, cpu = timed_fit(model, train, epochs=epochs, validation_data=val, shuffle=False,  # tf.data shuffles
                                   callbacks=cbs + list(extra_callbacks), verbose=verbose)
    return RecipeResult("series recipe", model, history_frame(history), wall, cpu,
                        score_accuracy(model, data.x_test, data.y_test), cbs[0].mean_images_per_s,
                        {"input": "tf.data pipeline", "batch": batch_size, "precision": policy,
                         "replicas": replicas, "validation": f"{n_val:,} held-out train images",
                         "steps/epoch": len(train)})


# %% [markdown]
# ## Train both
#
# `verbose=2` prints one line per epoch (a progress bar per epoch would fill the stored
# notebook with thousands of updates; the interruption demo below shows progress bars).
# Both recipes train for the same `EPOCHS`: 5 in full mode (the seed article trains 10), so
# that the whole notebook runs in under 15 minutes on a 2-core laptop. Set `EPOCHS = 10` to
# train as long as the article does (the two training cells then take about twice as long).

# %%
EPOCHS = min(S.epochs, 5)
seed = seed_recipe(data, epochs=EPOCHS, verbose=2)
print(f"seed recipe: test accuracy {seed.test_accuracy:.4f}, wall time {seed.wall_s:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
strategy = devices.make_strategy()
replicas = strategy.num_replicas_in_sync
print(f"replicas: {replicas} ({devices.device_kind()})")
print(f"global batch: {S.batch_size}; per-replica batch: {S.batch_size // replicas}")

# %%
series = series_recipe(data, epochs=EPOCHS, strategy=strategy, run_dir=run, verbose=2)
print(f"series recipe: test accuracy {series.test_accuracy:.4f}, wall time {series.wall_s:.1f} s")

# %% [markdown]
# ## Training curves
#
# Training loss and accuracy are averaged over each epoch *while the weights change*, and on
# augmented images; validation numbers are computed at the end of the epoch on clean
# images. That is why the series' validation accuracy can sit above its training accuracy.
# Compare the seed's curves: without augmentation, a training accuracy that keeps climbing
# while the validation loss stops improving is the sign of overfitting.

# %%
fig = plots.training_curves(series.history, title=f"Seed CNN on {data.label}: series recipe vs seed recipe")
for ax, metric in zip(fig.axes, ["loss", "accuracy"], strict=True):
    ax.plot(seed.history["epoch"], seed.history[metric], color="C2", marker=".", label="seed train")
    ax.plot(seed.history["epoch"], seed.history[f"val_{metric}"], color="C3", marker=".",
            linestyle="--", label="seed validation (= test split)")
    ax.legend(fontsize=7)
plt.show()

# %%
print(series.history.round(4).to_string(index=False))

# %% [markdown]
# ## The two recipes in one table
#
# Both rows come from the runs above, in this process, on the same data. *Wall time* is
# the time spent in `model.fit`, including the per-epoch validation; *CPU time* is what this
# process used on all threads, which moves far less than wall time when other programs
# compete for the cores.

# %%
table = pd.DataFrame([r.row() for r in (seed, series)]).set_index("recipe")
table

# %%
print(f"test accuracy: series {series.test_accuracy:.4f} vs seed {seed.test_accuracy:.4f} "
      f"({100 * (series.test_accuracy - seed.test_accuracy):+.2f} points)")
print(f"wall time:     series {series.wall_s:.1f} s vs seed {seed.wall_s:.1f} s "
      f"({series.wall_s / seed.wall_s:.2f}x the seed's time)")
print(f"steps per epoch: seed {seed.settings['steps/epoch']}, series {series.settings['steps/epoch']} "
      f"({seed.settings['steps/epoch'] / series.settings['steps/epoch']:.1f}x as many for the seed)")

# %% [markdown]
# Where does the time go? The seed's recipe takes about 4 times as many steps per epoch
# (printed above), each one a small batch fed from float64 arrays; the series' recipe takes
# larger steps and prepares batches on the side while the model computes. The logical CPUs
# do not add compute (they share the same cores the seed's recipe used): splitting a batch
# over replicas costs some throughput compared with one device (notebook 02 measures it),
# so on this CPU any gain comes from the batch size and the input pipeline, not from the
# replicas. On a machine with several GPUs the same code divides the work between real
# devices.
#
# ## What the run left on disk
#
# The best checkpoint and the log. The backup folder is gone: `BackupAndRestore` deletes it
# when `fit` completes, because there is nothing left to resume.

# %%
# NBVAL_CHECK_OUTPUT
print(sorted(p.name for p in run.iterdir()))
print(f"log columns: {list(pd.read_csv(run / 'log.csv').columns)}")

# %% [markdown]
# ## Save the model for notebooks 05 and 10
#
# The model goes to `runs/04_training/seed_cnn_<mode>.keras`, with a small JSON file that
# records how it was trained. The file name carries the mode, so a smoke run never
# overwrites a full run's model. `load_or_train_cnn` is what notebooks 05 and 10 call: it
# loads this file when it was trained in the same mode on the same kind of data, and
# otherwise trains a small model with the series' recipe and saves it.

# %%
#@save
def model_path(run_name="04_training", mode=None) -> Path:
    """Where notebook 04 saves the trained CNN: ``runs/<run_name>/seed_cnn_<mode>.keras``."""
    return config.run_dir(run_name) / f"seed_cnn_{mode or config.get_mode()}.keras"


def save_model(model, path, info) -> Path:
    """Save ``model`` as ``.keras`` plus a ``.json`` sidecar with ``info``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, default=str))
    return path


def saved_info(path) -> dict:
    """The sidecar written by :func:`save_model` (``{}`` if there is none)."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


def load_or_train_cnn(data, path=None, *, strategy=None, epochs=None, verbose=0):
    """Notebook 04's trained CNN, or a small one trained now: ``(model, note)``."""
    # 1. the saved model, if it matches this mode and this kind of data
    path = Path(path or model_path())
    want = {"mode": config.get_mode(), "synthetic": data.is_synthetic}
    info = saved_info(path)
    if path.exists() and all(info.get(k) == v for k, v in want.items()):
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = keras.models.load_model(path)
        return model, f"Loaded the model saved by notebook 04 ({path.name})."
    # 2. otherwise train the series' recipe at the mode's size, and save it
    epochs = epochs or config.sizes().epochs
    result = series_recipe(data, epochs=epochs, strategy=strategy, patience=None, verbose=verbose)
    save_model(result.model, path, {**want, "test_accuracy": result.test_accuracy, "epochs": epochs,
                                    "precision": result.settings["precision"],
                                    "replicas": result.settings["replicas"]})
    model = result.model if strategy else keras.models.load_model(path)  # one device
    return model, f"Trained a new model for {epochs} epoch(s) and saved it as {path.name}."


# %%
saved = save_model(series.model, model_path(),
                   {"mode": config.get_mode(), "synthetic": data.is_synthetic, "recipe": "series",
                    "test_accuracy": series.test_accuracy, "epochs": len(series.history),
                    "precision": series.settings["precision"], "replicas": replicas})
print(f"saved runs/04_training/{saved.name}; sidecar keys: {sorted(saved_info(saved))}")

# %% [markdown]
# ## Interrupting a run and resuming it
#
# Long runs die: a laptop sleeps, a spot VM is reclaimed, a kernel runs out of memory. The
# `BackupAndRestore` callback makes `fit` restartable: at the end of every epoch it saves the
# weights, the optimizer state (Adam's moments and step counter) and the epoch number; when
# you call `fit` again with the same backup folder, it restores all three and continues at the
# first unfinished epoch.
#
# Two small callbacks make the demo visible. `InterruptAtStep` raises an exception after a
# given number of training steps, like a crash. `EpochLedger` records every epoch that
# starts, how many batches it completed and the optimizer's step counter.

# %%
class TrainingInterrupted(RuntimeError):
    """A simulated crash."""


class InterruptAtStep(keras.callbacks.Callback):
    """Raise ``TrainingInterrupted`` after ``step`` training batches of this ``fit`` call."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise TrainingInterrupted(f"simulated crash after {self.seen} training steps (batch {batch + 1})")


class EpochLedger(keras.callbacks.Callback):
    """One row per epoch started: run label, epoch, batches done, finished?, optimizer steps."""

    def __init__(self):
        super().__init__()
        self.rows, self.run = [], "first run"

    def steps(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.rows.append({"run": self.run, "epoch": epoch + 1, "batches": 0, "finished": False,
                          "steps at start": self.steps(), "steps at end": self.steps()})

    def on_train_batch_end(self, batch, logs=None):
        self.rows[-1].update({"batches": batch + 1, "steps at end": self.steps()})

    def on_epoch_end(self, epoch, logs=None):
        self.rows[-1]["finished"] = True


# %% [markdown]
# To keep the demo short it trains on the first 1,280 training images (10 steps of 128 per
# epoch) for 4 epochs, the same in smoke and full mode, and crashes after step 25, in the
# middle of epoch 3. This time the progress bars are on.

# %%
DEMO_EPOCHS, DEMO_BATCH, CRASH_AT = 4, 128, 25
demo_train = make_dataset(data.x_train[:1280], data.y_train[:1280], DEMO_BATCH, training=True)
demo_val = make_dataset(data.x_test[:512], data.y_test[:512], DEMO_BATCH, training=False)
steps_per_epoch = 1280 // DEMO_BATCH


def demo_model():
    """A fresh model and optimizer, as a restarted process would build them."""
    with precision_policy(policy), strategy.scope():
        return compile_cnn(models.build_seed_cnn(), learning_rate=2e-3)


def demo_fit(model, run_dir, ledger, *extra, backup_freq="epoch", verbose=1):
    """``fit`` the demo with a backup in ``run_dir`` (no checkpoint, log or early stopping)."""
    cbs = make_callbacks(run_dir, DEMO_BATCH, warmup_cosine(2e-3, DEMO_EPOCHS), checkpoint=False,
                         logs=False, patience=None, backup_freq=backup_freq)
    return model.fit(demo_train, epochs=DEMO_EPOCHS, validation_data=demo_val, verbose=verbose,
                     shuffle=False, callbacks=cbs + [ledger, *extra])


demo_run = config.run_dir("04_training_resume", fresh=True)
ledger = EpochLedger()
first = demo_model()
try:
    demo_fit(first, demo_run, ledger, InterruptAtStep(CRASH_AT))
except TrainingInterrupted as crash:
    print(f"\nTraining stopped: {crash}")
first_history = history_frame(first.history, run="first run")

# %% [markdown]
# The crash left the backup behind. It holds the state at the end of the last *completed*
# epoch: the metadata says training should continue at epoch index 2, i.e. epoch 3.

# %%
# NBVAL_CHECK_OUTPUT
print(sorted(p.name for p in (demo_run / "backup").iterdir()))
print((demo_run / "backup" / "training_metadata.json").read_text())

# %% [markdown]
# Now "restart the process": build a brand-new model and optimizer (random weights, step
# counter at 0) and call `fit` with the same arguments and the same backup folder.

# %%
second = demo_model()
print(f"fresh optimizer step counter before fit: {int(second.optimizer.iterations.numpy())}")
ledger.run = "resumed run"
resumed_history = history_frame(demo_fit(second, demo_run, ledger), run="resumed run")

# %% [markdown]
# The ledger shows what happened. The first run finished epochs 1 and 2 and died 5 batches
# into epoch 3. The resumed run started at epoch 3, not at epoch 1 (nothing repeated) and
# not at epoch 4 (nothing lost), with the optimizer's step counter at 20: restored from the
# backup, not 0 and not 25. The 5 batches of the interrupted epoch were *discarded* along
# with the crashed process's weights, and epoch 3 ran again in full from the saved state;
# so every epoch contributed exactly once to the final weights, and the final step counter
# equals epochs x steps per epoch.

# %%
# NBVAL_CHECK_OUTPUT
ledger_frame = pd.DataFrame(ledger.rows)
print(ledger_frame.to_string(index=False))
done = ledger_frame[ledger_frame["finished"]]
print(f"resumed run started at the interrupted epoch (3): "
      f"{ledger_frame[ledger_frame['run'] == 'resumed run']['epoch'].min() == 3}")
print(f"every epoch finished exactly once: {sorted(done['epoch']) == list(range(1, DEMO_EPOCHS + 1))}")
print(f"final optimizer steps = {DEMO_EPOCHS} epochs x {steps_per_epoch} steps: "
      f"{int(second.optimizer.iterations.numpy()) == DEMO_EPOCHS * steps_per_epoch}")
print(f"backup deleted after the completed run: {not (demo_run / 'backup').exists()}")

# %% [markdown]
# The curves of the two runs join without a gap or an overlap: epochs 1-2 come from the
# first run, epochs 3-4 from the resumed one (the dotted line marks the restart).

# %%
combined = pd.concat([first_history, resumed_history], ignore_index=True)
print(combined[["run", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]]
      .round(4).to_string(index=False))
fig = plots.training_curves(combined, title="Interrupted in epoch 3, resumed with BackupAndRestore")
for ax in fig.axes:
    ax.axvline(2.5, color="grey", linestyle=":", linewidth=1)
plt.show()

# %% [markdown]
# Two limits to know:
#
# - **Granularity.** With the default `save_freq="epoch"`, a crash costs the unfinished part of
#   the epoch (here 5 batches, recomputed). For long epochs pass `backup_freq=N` to back up
#   every N batches; but Keras 3 restores only the *epoch* number from such a backup and
#   restarts that epoch at its first batch, with weights that have already seen some of its
#   batches (exercise 1 measures it). Epoch-level backups are the exact ones.
# - **Same data order?** The resumed epoch 3 sees a fresh shuffle of the data, not the
#   order the crashed run was using. Statistically that changes nothing; bit-for-bit
#   reproducible resumption would need a shuffle keyed by the epoch number.
#
# ## Summary
#
# - The precision policy follows the hardware: `mixed_float16` on a GPU, `mixed_bfloat16`
#   only on a CPU with bfloat16 instructions, float32 otherwise; the interleaved rounds above
#   measured bfloat16 against float32 on this CPU.
# - `model.fit` under `MirroredStrategy` needs three changes to single-device code: create
#   the model and optimizer in `strategy.scope()`, feed a `tf.data.Dataset` batched by the
#   *global* batch size, and make every batch (validation included) split evenly over the
#   replicas.
# - The callbacks turn a training run into a job you can leave alone: images/s in the logs,
#   a learning-rate schedule that depends only on the epoch, the best model on disk, a log,
#   early stopping, and a backup that resumes after a crash.
# - The interrupted run resumed at the interrupted epoch with the optimizer state of the last
#   completed epoch: no epoch lost, none trained twice, as the ledger and curves show.
# - The table compares the two recipes measured in the same run; neither one's speed comes
#   from the logical CPUs.
# - Notebook 05 reloads the saved model and evaluates it in detail.
#
# ## Exercises
#
# 1. **Mid-epoch backups.** Repeat the interruption demo with `backup_freq=5` (a backup every
#    5 batches) and the crash after step 25. Which epoch does the resumed run start at, what is
#    the optimizer's step counter then, and how many batches end up applied to the weights
#    in total? Compare with the 40 of the epoch-level backup.

# %%
# Try it: set BACKUP_FREQ = 5, then run a crashed fit and a resumed one with demo_fit(...,
# backup_freq=BACKUP_FREQ) in a fresh folder, and read the ledger.
BACKUP_FREQ = "epoch"  # TODO: 5
print(f"backup every: {BACKUP_FREQ}")

# %% jupyter={"source_hidden": true}
# Solution
mid_run = config.run_dir("04_training_midepoch", fresh=True)
mid_ledger = EpochLedger()
try:
    demo_fit(demo_model(), mid_run, mid_ledger, InterruptAtStep(CRASH_AT), backup_freq=5, verbose=0)
except TrainingInterrupted as crash:
    print(f"stopped: {crash}")
again = demo_model()
mid_ledger.run = "resumed run"
demo_fit(again, mid_run, mid_ledger, backup_freq=5, verbose=0)
print(pd.DataFrame(mid_ledger.rows).to_string(index=False))
print(f"batches applied to the final weights: {int(again.optimizer.iterations.numpy())} "
      f"(an uninterrupted run applies {DEMO_EPOCHS * steps_per_epoch})")
# The backup after step 25 restores the weights *and* the step counter (25), but Keras 3
# restarts epoch 3 at its first batch: the 5 batches of epoch 3 already in the weights are
# applied a second time, so the final counter reads 45, not 40.

# %% [markdown]
# 2. **A longer schedule.** For a 30-epoch run with 3 warm-up epochs and a peak of 0.002,
#    at which epoch after the warm-up does the learning rate first fall below half its peak?

# %%
# Try it: build the schedule and look for the first epoch under 0.001.
long_schedule = warmup_cosine(2e-3, 30, warmup_epochs=1)  # TODO: warmup_epochs=3
print([round(long_schedule(e), 5) for e in range(5)])

# %% jupyter={"source_hidden": true}
# Solution
long_schedule = warmup_cosine(2e-3, 30, warmup_epochs=3)
first_below = next(e + 1 for e in range(3, 30) if long_schedule(e) < 1e-3)  # after the warm-up
print(f"first epoch below half the peak after the warm-up: {first_below}")

# %% [markdown]
# ## Run time of this notebook

# %%
print(f"notebook run time: {(time.perf_counter() - NOTEBOOK_START) / 60:.1f} min "
      f"({config.get_mode()} mode, {devices.device_kind()})")

# %% [markdown]
# ## Further reading
#
# - TensorFlow guide, [Distributed training with Keras](https://www.tensorflow.org/tutorials/distribute/keras)
#   and [Distributed training with TensorFlow](https://www.tensorflow.org/guide/distributed_training).
# - Keras API: [BackupAndRestore](https://keras.io/api/callbacks/backup_and_restore/),
#   [ModelCheckpoint](https://keras.io/api/callbacks/model_checkpoint/),
#   [EarlyStopping](https://keras.io/api/callbacks/early_stopping/),
#   [LearningRateScheduler](https://keras.io/api/callbacks/learning_rate_scheduler/),
#   [TensorBoard](https://keras.io/api/callbacks/tensorboard/).
# - Keras guide, [Mixed precision](https://keras.io/api/mixed_precision/).
# - P. Goyal et al., *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour*, 2017
#   (linear learning-rate scaling and warm-up). arXiv:1706.02677.
# - I. Loshchilov, F. Hutter, *SGDR: Stochastic Gradient Descent with Warm Restarts*, ICLR 2017
#   (cosine schedules). arXiv:1608.03983.
# - P. Micikevicius et al., *Mixed Precision Training*, ICLR 2018. arXiv:1710.03740.
# - D. Kalamkar et al., *A Study of BFLOAT16 for Deep Learning Training*, 2019. arXiv:1905.12322.
# - L. Prechelt, *Early Stopping — But When?*, in Neural Networks: Tricks of the Trade, 1998.
