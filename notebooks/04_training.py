# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# on NumPy arrays. In this notebook you train the same model the way the rest of the series
# does: a `tf.data` pipeline, a global batch split over the replicas of a
# `tf.distribute.MirroredStrategy`, mixed precision, and callbacks that checkpoint, log,
# schedule the learning rate, stop early and, above all, let a crashed run resume where it
# stopped. Then you put both recipes side by side in one table, from one run.
#
# **What you will learn**
#
# - how to run `model.fit` under `MirroredStrategy` with a global batch of 128 fed by `tf.data`;
# - what each callback is for: `ModelCheckpoint`, `BackupAndRestore`, TensorBoard logs,
#   `LearningRateScheduler` (warm-up + cosine), `EarlyStopping`, and a timing callback that
#   reports images per second;
# - how to read training curves (train vs validation loss and accuracy);
# - how a run that crashes in the middle of an epoch resumes with `BackupAndRestore`, and
#   how to check that no epoch was lost or trained twice;
# - what the `mixed_bfloat16` policy (CPU) or `mixed_float16` (GPU) changes;
# - how the seed's recipe and this series' recipe compare in test accuracy and wall time.
#
# **Run time** (measured on the machine that produced the stored outputs)
#
# | mode | 2-core CPU (2 logical CPUs) | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 9 min on a quiet machine (14.6 min while other notebooks shared the 2 cores) | not measured yet |
# | smoke (`SERIES_MODE=smoke`, CI) | 42 s under nbval (another notebook was running at the same time) | not measured yet |
#
# The full run is the longest of the series: it trains the CNN twice for 10 epochs on
# 50,000 images, and its wall times grow when other programs share the cores.

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
import warnings

import matplotlib.pyplot as plt
import pandas as pd

from utils import config, devices

NOTEBOOK_START = time.perf_counter()
devices.setup_devices(num_cpus=2)
print(devices.device_table().to_string(index=False))

# %%
import keras
import tensorflow as tf

from utils import data as cifar
from utils import models, pipeline, training

tf.get_logger().setLevel("ERROR")  # hide MirroredStrategy's per-call INFO lines and retracing notes
warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed")  # tf.data shuffles itself
print(f"mode: {config.get_mode()}; seed: {config.seed_everything()}")
S = config.sizes()
print(S.as_dict())

# %% [markdown]
# Load CIFAR-10 at the mode's size (the full 50,000 + 10,000 images in full mode; a small
# subset, or synthetic CIFAR-shaped data when no copy exists, in smoke mode).

# %%
data = cifar.load_for_mode()
print(data.describe())

# %% [markdown]
# ## The seed's recipe: the baseline
#
# `training.seed_recipe` reproduces the seed article exactly: `x / 255.0` turns the uint8
# arrays into **float64** arrays (8 bytes per value; Keras casts each batch to float32 on
# the way in), `model.fit` uses Keras's default batch of **32**, Adam at its default
# learning rate, **10 epochs**, and the test split as `validation_data`. No strategy, one
# device, float32 maths. The timing callback records images per second.
#
# `verbose=2` prints one line per epoch (a progress bar per epoch would fill the stored
# notebook with thousands of updates; the interruption demo below shows progress bars).

# %%
seed = training.seed_recipe(data, epochs=S.epochs, verbose=2)
print(f"seed recipe: test accuracy {seed.test_accuracy:.4f}, wall time {seed.wall_s:.1f} s")

# %% [markdown]
# ## This series' recipe
#
# The same model, trained differently:
#
# | | seed recipe | series recipe |
# |---|---|---|
# | input | NumPy float64, sliced by Keras | `tf.data`: cache, shuffle, batch, normalise, augment, prefetch (notebook 03) |
# | batch | 32 | 128 (global), split over the replicas |
# | devices | one | `MirroredStrategy` over `compute_devices()` |
# | precision | float32 | `mixed_bfloat16` on CPU, `mixed_float16` on GPU |
# | learning rate | Adam 0.001, constant | Adam, 1 warm-up epoch to 0.002, then cosine decay |
# | augmentation | none | random pad-and-crop and horizontal flip |
# | validation | the test split | 10% of the training images, held out |
# | callbacks | none | checkpoint, backup, logs, schedule, early stopping, timing |
#
# Two choices deserve a word. A 4x larger batch takes 4x fewer optimizer steps per epoch,
# so the peak learning rate goes up (x2 here, a cautious version of the *linear scaling
# rule* of Goyal et al.), with a short warm-up so the first steps do not diverge. And the
# validation split comes out of the *training* images: early stopping and the "best"
# checkpoint choose a model by its validation score, and choosing by the test score (as
# the seed does) would make the test accuracy optimistic.
#
# First the strategy. Each replica receives `global batch / replicas` images per step, and
# the gradients are all-reduced (summed over replicas) before every update, so all
# replicas keep identical weights (notebook 02 proves it).

# %%
# NBVAL_CHECK_OUTPUT
strategy = training.make_strategy()
replicas = strategy.num_replicas_in_sync
policy = training.resolve_policy("auto")
print(f"replicas: {replicas} ({devices.device_kind()})")
print(f"global batch: {S.batch_size}; per-replica batch: {S.batch_size // replicas}")
print(f"mixed precision policy: {policy}")

# %% [markdown]
# Under `mixed_bfloat16` the layers compute in bfloat16 (8 exponent bits like float32, so
# no loss scaling is needed) while the variables stay float32. On CPUs with bfloat16
# instructions (AVX-512 BF16, AMX) bfloat16 convolutions run faster than float32 ones; on
# older CPUs they can be slower (exercise 2 measures it on yours). On a GPU the recipe picks `mixed_float16`, and Keras wraps the
# optimizer in a `LossScaleOptimizer` to keep small float16 gradients from flushing to zero.
#
# The callbacks come from `training.make_callbacks`, in the order they run:

# %%
# NBVAL_CHECK_OUTPUT
run = config.run_dir(f"04_training_{config.get_mode()}", fresh=True)  # checkpoints and logs
demo_callbacks = training.make_callbacks(
    run, batch_size=S.batch_size, lr_schedule=training.warmup_cosine(2e-3, S.epochs)
)
for cb in demo_callbacks:
    print(type(cb).__name__)

# %% [markdown]
# - **ThroughputCallback** (this series) times every epoch and adds `images_per_s` to the logs.
# - **LearningRateScheduler** sets the learning rate at the start of every epoch from
#   `warmup_cosine`, a function of the epoch number only, so a resumed run gets the same rates.
# - **ModelCheckpoint** keeps the best model so far (lowest `val_loss`) as `best.keras`.
# - **BackupAndRestore** saves weights, optimizer state and the epoch counter after every
#   epoch, and deletes them when `fit` completes; a `fit` restarted after a crash resumes there.
# - **TensorBoard logs**: `keras.callbacks.TensorBoard` needs the `tensorboard` package; when
#   it is not installed (as in this series' requirements), `make_callbacks` uses
#   `TensorBoardScalars`, which writes the same event files with core TensorFlow.
# - **EarlyStopping** ends training after 3 epochs without a better `val_loss` and restores
#   the best weights.
#
# Now train. The data come straight from the pipeline; `series_recipe` builds the model and
# optimizer inside `strategy.scope()`, so its variables are mirrored on every replica.

# %%
series = training.series_recipe(data, epochs=S.epochs, strategy=strategy, run_dir=run, verbose=2)
print(f"series recipe: test accuracy {series.test_accuracy:.4f}, wall time {series.wall_s:.1f} s")

# %% [markdown]
# ## Training curves
#
# Training loss and accuracy are averaged over each epoch *while the weights change*, and on
# augmented images; validation numbers are computed at the end of the epoch on clean
# images. That is why the series' validation accuracy can sit above its training accuracy.
# The seed's curves show the opposite: its training accuracy keeps climbing while the
# validation loss stops improving, the classic sign of overfitting without augmentation.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
training.plot_history(series.history, axes=axes, label="series")
for ax, metric in zip(axes, ["loss", "accuracy"], strict=True):
    ax.plot(seed.history["epoch"], seed.history[metric], color="C2", marker=".", label="seed train")
    ax.plot(seed.history["epoch"], seed.history[f"val_{metric}"], color="C3", marker=".",
            linestyle="--", label="seed validation (= test split)")
    ax.legend(fontsize=7)
fig.suptitle(f"Seed CNN on {data.label}: series recipe vs seed recipe")
plt.show()

# %%
print(series.history.round(4).to_string(index=False))

# %% [markdown]
# ## The two recipes in one table
#
# Both rows come from the runs above, in this process, on the same data, scored by the same
# function (`training.test_metrics`) on the same test images. *Wall time* is the time spent in
# `model.fit`, including the per-epoch validation; *CPU time* is what this process used on all
# threads, which moves far less than wall time when other programs compete for the cores
# or the virtual machine slows down (it did during the stored run: see the uneven `epoch_s`
# column above, e.g. epoch 10 of the series' recipe).

# %%
table = training.compare_results([seed, series])
table

# %%
faster = series.wall_s / seed.wall_s
print(f"test accuracy: series {series.test_accuracy:.4f} vs seed {seed.test_accuracy:.4f} "
      f"({100 * (series.test_accuracy - seed.test_accuracy):+.2f} points)")
print(f"wall time:     series {series.wall_s:.1f} s vs seed {seed.wall_s:.1f} s "
      f"({faster:.2f}x the seed's time)")
print(f"series recipe at least as accurate: {series.test_accuracy >= seed.test_accuracy}; "
      f"less wall time: {series.wall_s < seed.wall_s}")

# %% [markdown]
# Where does the time go? The seed's recipe takes about 4.5 times as many steps per epoch
# (1563 against 351, see the training logs), each one a small float32 batch fed from
# float64 arrays; the series' recipe takes larger steps in bfloat16 and prepares batches on the side while the model computes. The two logical
# CPUs do not add compute (they share the same 2 cores the seed's recipe used): splitting a
# batch over replicas costs some throughput compared with one device (notebook 02 measures
# it), so on this CPU the gain comes from the batch size, the input pipeline and
# bfloat16, not from the replicas. On a machine with several GPUs the same code divides
# the work between real devices.
#
# ## What the run left on disk
#
# The best checkpoint, and the TensorBoard logs (one folder for training, one for
# validation). The backup folder is gone: `BackupAndRestore` deletes it when `fit` completes,
# because there is nothing left to resume.

# %%
# NBVAL_CHECK_OUTPUT
for sub in ["backup", "checkpoints", "logs"]:
    found = sorted(p.relative_to(run).as_posix() for p in (run / sub).rglob("*")
                   if p.is_dir() or p.suffix == ".keras") if (run / sub).exists() else []
    print(f"{sub}/: {found if found else 'absent'}")

# %% [markdown]
# Read the logged scalars back without starting TensorBoard (one row per epoch). To browse
# them, run `tensorboard --logdir runs/04_training_full/logs --host 127.0.0.1` in a terminal
# (with the `tensorboard` package installed); `--host 127.0.0.1` keeps it on your machine.

# %%
scalars = training.read_scalars(run / "logs")
wide = scalars.pivot_table(index="step", columns=["split", "tag"], values="value")
wide.index = wide.index + 1
wide.index.name = "epoch"
wide.round(4)

# %% [markdown]
# Save the trained model for notebook 05 (evaluation) and notebook 10 (compression), with a
# small JSON file that records how it was trained:

# %%
saved = training.save_model(
    series.model,
    training.model_path(),
    {"mode": config.get_mode(), "synthetic": data.is_synthetic, "recipe": "series",
     "test_accuracy": series.test_accuracy, "epochs": len(series.history),
     "precision": series.settings["precision"], "replicas": replicas},
)
print(f"saved runs/04_training/{saved.name} (the file name carries the mode, so a smoke run "
      "never overwrites a full run's model)")

# %% [markdown]
# ## Interrupting a run and resuming it
#
# Long runs die: a laptop sleeps, a spot VM is reclaimed, a kernel runs out of memory. The
# `BackupAndRestore` callback makes `fit` restartable: at the end of every epoch it saves the
# weights, the optimizer state (Adam's moments and step counter) and the epoch number; when
# you call `fit` again with the same backup folder, it restores all three and continues at the
# first unfinished epoch.
#
# To keep this demo short it trains on the first 1,280 training images (10 steps of 128
# per epoch) for 4 epochs, the same in smoke and full mode. `InterruptAtStep(25)` raises an
# exception after step 25, in the middle of epoch 3, like a crash. An `EpochLedger`
# records every epoch that starts, how many batches it completed and the optimizer's step
# counter. This time the progress bars are on.

# %%
demo_data = cifar.Cifar10(
    x_train=data.x_train[:1280], y_train=data.y_train[:1280],
    x_test=data.x_test[:512], y_test=data.y_test[:512],
    class_names=data.class_names, source=data.source,
)
demo_run = config.run_dir("04_training_resume", fresh=True)

# %%
DEMO_EPOCHS, DEMO_BATCH, CRASH_AT = 4, 128, 25
demo_train = pipeline.make_dataset(demo_data.x_train, demo_data.y_train, DEMO_BATCH, training=True)
demo_val = pipeline.make_dataset(demo_data.x_test, demo_data.y_test, DEMO_BATCH, training=False)


def demo_model() -> keras.Model:
    """A fresh model and optimizer, as a restarted process would build them."""
    with training.precision_policy(policy), strategy.scope():
        return training.compile_seed_cnn(models.build_seed_cnn(), learning_rate=2e-3)


def demo_callbacks() -> list:
    return training.make_callbacks(
        demo_run, batch_size=DEMO_BATCH, checkpoint=False, tensorboard=False,
        early_stopping_patience=None, lr_schedule=training.warmup_cosine(2e-3, DEMO_EPOCHS),
    )


ledger = training.EpochLedger()
first = demo_model()
try:
    first.fit(demo_train, epochs=DEMO_EPOCHS, validation_data=demo_val, verbose=1,
              callbacks=demo_callbacks() + [ledger.label("first run"), training.InterruptAtStep(CRASH_AT)])
except training.TrainingInterrupted as crash:
    print(f"\nTraining stopped: {crash}")
first_history = training.history_frame(first.history, run="first run")

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
resumed = second.fit(demo_train, epochs=DEMO_EPOCHS, validation_data=demo_val, verbose=1,
                     callbacks=demo_callbacks() + [ledger.label("resumed run")])
resumed_history = training.history_frame(resumed, run="resumed run")

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
ledger_frame = ledger.frame()
print(ledger_frame.to_string(index=False))
done = ledger_frame[ledger_frame["finished"]]
steps_per_epoch = len(demo_data.x_train) // DEMO_BATCH
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
training.plot_history(combined, title="Interrupted in epoch 3, resumed with BackupAndRestore")
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
# - `model.fit` under `MirroredStrategy` needs three changes to single-device code: create
#   the model and optimizer in `strategy.scope()`, feed a `tf.data.Dataset` batched by the
#   *global* batch size, and make every batch (validation included) split evenly over the
#   replicas.
# - The callbacks turn a training run into a job you can leave alone: the best model on disk,
#   logs for TensorBoard, a learning-rate schedule that depends only on the epoch, early
#   stopping, throughput in images/s, and a backup that resumes after a crash.
# - The interrupted run resumed at the interrupted epoch with the optimizer state of the last
#   completed epoch: no epoch lost, none trained twice, as the ledger and curves show.
# - In the stored full run, the series' recipe reached a test accuracy of 0.7330 against the
#   seed recipe's 0.6629, in 197.7 s of wall time against 273.4 s (200.2 s of CPU time
#   against 350.9 s), both measured in the same run. The seed's recipe overfits: its
#   validation (= test) accuracy peaked at 0.6888 in epoch 4 and fell afterwards. Neither
#   gain comes from the logical CPUs.
# - Notebook 05 reloads the saved model and evaluates it in detail.
#
# ## Exercises
#
# 1. **Mid-epoch backups.** Repeat the interruption demo with `backup_freq=5` (a backup every
#    5 batches) and the crash after step 25. Which epoch does the resumed run start at, what is
#    the optimizer's step counter then, and how many batches end up applied to the weights
#    in total? Compare with the 40 of the epoch-level backup.

# %% jupyter={"source_hidden": true}
# Solution
mid_run = config.run_dir("04_training_midepoch", fresh=True)


def mid_callbacks() -> list:
    return training.make_callbacks(
        mid_run, batch_size=DEMO_BATCH, checkpoint=False, tensorboard=False, backup_freq=5,
        early_stopping_patience=None, lr_schedule=training.warmup_cosine(2e-3, DEMO_EPOCHS),
    )


mid_ledger = training.EpochLedger()
try:
    demo_model().fit(demo_train, epochs=DEMO_EPOCHS, verbose=0,
                     callbacks=mid_callbacks() + [mid_ledger.label("first run"),
                                                  training.InterruptAtStep(CRASH_AT)])
except training.TrainingInterrupted as crash:
    print(f"stopped: {crash}")
again = demo_model()
again.fit(demo_train, epochs=DEMO_EPOCHS, verbose=0, callbacks=mid_callbacks() + [mid_ledger.label("resumed run")])
print(mid_ledger.frame().to_string(index=False))
print(f"batches applied to the final weights: {int(again.optimizer.iterations.numpy())} "
      f"(an uninterrupted run applies {DEMO_EPOCHS * steps_per_epoch})")
# The backup after step 25 restores the weights *and* the step counter (25), but Keras 3
# restarts epoch 3 at its first batch: the 5 batches of epoch 3 already in the weights are
# applied a second time, so the final counter reads 45, not 40.

# %% [markdown]
# 2. **Precision.** Train the series' recipe for two epochs on the first 4,096 training images
#    (512 in smoke mode) in `float32` and in `mixed_bfloat16` (`precision=...`), and compare images/s. Which is
#    faster on your CPU (or GPU, where the choice is `mixed_float16`)?

# %% jupyter={"source_hidden": true}
# Solution
n = config.pick(smoke=512, full=4096)
small = cifar.Cifar10(data.x_train[:n], data.y_train[:n], data.x_test[:512], data.y_test[:512],
                      data.class_names, source=data.source)
rates = {}
for prec in ["float32", policy]:
    res = training.series_recipe(small, epochs=2, precision=prec, strategy=strategy, verbose=0)
    rates[prec] = res.images_per_s  # epoch 2 (epoch 1 includes tracing and is skipped)
    print(f"{prec:15s} {res.images_per_s:8,.0f} images/s")
print(f"{policy} / float32: {rates[policy] / rates['float32']:.2f}x")

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
