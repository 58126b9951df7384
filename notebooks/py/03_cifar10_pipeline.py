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
# # A CIFAR-10 input pipeline for data-parallel training
#
# Data parallelism multiplies the number of images a step consumes: N replicas eat a
# global batch every step. If the input cannot deliver, the replicas wait. The seed article
# feeds `model.fit` a float64 NumPy array; this notebook builds the series' `tf.data`
# pipeline instead, measures how close it gets to the compute ceiling, and shows exactly
# which examples each replica receives when a strategy distributes the data.
#
# ## What you will learn
#
# - How to build a `tf.data` pipeline for CIFAR-10: cache, shuffle, batch by the global
#   batch size, normalise, augment (pad-and-crop, flip) and prefetch with `AUTOTUNE`, and
#   why working on whole batches, never single images, matters on a CPU.
# - How to measure a feed in images/s and compare it with naive NumPy feeding and with
#   in-memory tensors (the compute ceiling).
# - What `experimental_distribute_dataset` and `distribute_datasets_from_function` hand to
#   each replica, and how auto-shard policies split data between workers.
#
# ## Run time
#
# Measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 3.8 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 26 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# As in every notebook, `setup_devices()` runs first: 4 logical CPUs sharing the two
# physical cores (or all GPUs, when present).

# %%
import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, devices

print("mode:", config.get_mode())
print(devices.setup_devices().to_string(index=False))

# %%

import re

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import data, plots, throughput

tf.get_logger().setLevel("WARNING")  # Jupyter would show TensorFlow's INFO lines (e.g. each strategy's devices)
pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 60)
S = config.sizes()
GLOBAL_BATCH = S.batch_size
print("seed:", config.seed_everything())
print("TensorFlow", tf.__version__, "| Keras", keras.__version__, "| devices:", devices.device_kind())

# %% [markdown]
# ## The data
#
# `data.load_for_mode()` loads CIFAR-10 from a local copy (`$CIFAR10_DIR`), Keras's cache or
# a download; in smoke mode without any copy it falls back to small synthetic
# CIFAR-shaped data, and says so.

# %%
cifar = data.load_for_mode()
print(cifar.describe())

# %% [markdown]
# Two training images of each class, with their class names:

# %%
per_class = [np.flatnonzero(cifar.y_train == c)[:2] for c in range(len(cifar.class_names))]
idx = np.array(per_class).T.reshape(-1)  # airplane, automobile, ..., then the second of each
fig = plots.image_grid(
    cifar.x_train[idx], cifar.y_train[idx], cifar.class_names, ncols=10,
    title=f"Training images ({cifar.label})",
)

# %% [markdown]
# ## The tuned pipeline
#
# The textbook pipeline handles one example at a time until it batches:
# `from_tensor_slices -> cache -> shuffle -> batch -> map(augment, normalise) -> prefetch`.
# Every image then passes through `cache`, `shuffle` and `batch` on its own, a few
# microseconds of bookkeeping each. On a GPU machine spare CPU cores absorb that; on a
# 2-core CPU every microsecond the input spends is taken from the training step. So the
# series' pipeline never touches single examples:
#
# 1. **cache**: the **uint8** images are held once as a tensor in host memory, at a
#    quarter of the size of float32. (`cache()` gives a pipeline that reads *files* the
#    same thing after its first epoch; these images are in memory already.)
# 2. **shuffle**: one random permutation of the image ids per epoch, keyed by
#    `tf.data.Dataset.random(seed, rerandomize_each_iteration=True)`: a perfect shuffle,
#    fresh every epoch, and the same sequence of epochs on every run with the same seed;
# 3. **batch**: the permutation reshaped into batches of ids of the **global** batch size
#    (training drops the remainder, so the strategy splits every batch evenly);
# 4. one `map` per batch: a **single `tf.gather`** picks the batch's images *and* augments
#    them: pad 4 pixels (reflect), crop back to 32×32 at a random offset, flip half the
#    images left-right. Then normalise to [0, 1];
# 5. `prefetch(AUTOTUNE)`: prepare the next batches on background threads while the
#    current step runs; `AUTOTUNE` lets `tf.data` choose the map's parallelism and the
#    buffer size.
#
# We write it in two steps. First the augmentation. Padding, cropping and flipping an
# image only *moves* pixels, so instead of doing them in memory we compute, for every
# output pixel, **which input pixel it comes from**: the random offset, the reflection at
# the border and the flip all go into that index, and one `tf.gather` over the images
# viewed as a table of pixels does the rest. The cells marked `#@save` are exported to
# `utils.lessons.cifar10_pipeline`; later notebooks and the benchmark import them from
# there.

# %%
#@save
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def normalize(images, dtype=tf.float32):
    """uint8 [0, 255] -> `dtype` [0, 1] (the seed's `x / 255.0`), inside a tf.data map."""
    return tf.cast(images, dtype) / tf.cast(255.0, dtype)


def reflect(index, size):
    """Fold an index that fell off the image back in, as REFLECT padding does: -1 -> 1, size -> size-2."""
    return (size - 1) - tf.abs((size - 1) - tf.abs(index))


def augmented_pixel_index(image_ids, height, width, seed, pad=4):
    """Where each output pixel of a random pad-and-crop + flip comes from.

    Returns (m, height, width) indices into `reshape(images, [N * height * width, channels])`.
    """
    m = tf.shape(image_ids)[0]
    # 1. one random shift in [-pad, pad] per image and axis, one coin flip per image
    shift = tf.random.stateless_uniform([m, 2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32) - pad
    flip = tf.random.stateless_uniform([m, 1], seed=seed + 1) < 0.5
    # 2. the source row and column of every output row and column (flip, shift, reflect)
    rows = reflect(shift[:, 0:1] + tf.range(height)[None, :], height)  # (m, height)
    cols = tf.range(width)[None, :]
    cols = reflect(shift[:, 1:2] + tf.where(flip, (width - 1) - cols, cols), width)  # (m, width)
    # 3. pixel (r, c) of image i is row i*h*w + r*w + c of the pixel table
    in_image = tf.cast(rows[:, :, None] * width + cols[:, None, :], image_ids.dtype)
    return in_image + image_ids[:, None, None] * tf.cast(height * width, image_ids.dtype)


def augment_batch(images, seed, pad=4):
    """Random pad-and-crop (reflect) and horizontal flip of a batch, with one gather."""
    n, h, w, c = tf.unstack(tf.shape(images))
    index = augmented_pixel_index(tf.range(n), h, w, seed, pad)
    return tf.reshape(tf.gather(tf.reshape(images, [n * h * w, c]), index), tf.shape(images))


# %% [markdown]
# Run it on one 4×4 image whose pixels hold their own numbers 0–15, with `pad=2`: each
# output pixel shows where it was taken from. Rows and columns come out shifted, reflected
# at the border (…, 1, 0, 1, …) and, for some seeds, reversed (the flip).

# %%
# NBVAL_CHECK_OUTPUT
tiny = tf.reshape(tf.range(16), [1, 4, 4, 1])
for s in range(3):
    print(f"seed {s}:\n{augment_batch(tiny, tf.constant([s, 0], tf.int64), pad=2)[0, :, :, 0].numpy()}")

# %% [markdown]
# The same on real images: the top row shows eight images as stored; the two rows below
# show them after `augment_batch` with two different seeds (shifted by up to 4 pixels,
# some flipped).

# %%
originals = normalize(cifar.x_train[:8])
rows = [originals] + [augment_batch(originals, tf.constant([s, 0], tf.int64)) for s in (1, 2)]
fig = plots.image_grid(
    np.concatenate([r.numpy() for r in rows]), np.tile(cifar.y_train[:8], 3), cifar.class_names, ncols=8,
    title="Original (top) and two augmentations",
)

# %% [markdown]
# Now the pipeline around it. `epoch_batches` is the shuffle and batch steps: one
# permutation of the ids per epoch, reshaped into batches of ids. `make_dataset` turns each
# batch of ids into a batch of images with one gather (augmented when training), then
# normalises and prefetches. Augmentation uses stateless random ops seeded by the epoch's
# key and the batch number, so a pipeline with a fixed seed yields the same batches on
# every run. The test pipeline neither shuffles nor augments.

# %%
#@save
def epoch_batches(key, n, batch_size, seed, shuffle, keep_rest, index_dtype=tf.int32):
    """One epoch as a dataset of (key, batch of image ids): shuffle, then batch, ids only."""
    ids = tf.range(n, dtype=index_dtype)
    if shuffle:  # a perfect shuffle: one permutation, keyed by this epoch's random key
        ids = tf.random.experimental.stateless_shuffle(ids, seed=tf.stack([key, tf.constant(seed, tf.int64)]))
    full = n // batch_size
    batches = tf.data.Dataset.from_tensor_slices(tf.reshape(ids[: full * batch_size], [full, batch_size]))
    if keep_rest:  # the last, short batch (evaluation keeps it)
        batches = batches.concatenate(tf.data.Dataset.from_tensors(ids[full * batch_size :]))
    return batches.map(lambda b: (key, b))


def make_dataset(x, y, batch_size, *, training, augment=None, drop_remainder=None, seed=0, dtype=tf.float32):
    """The series' input pipeline over in-memory uint8 images `x` and labels `y`.

    `batch_size` is the *global* batch. `training` shuffles (a fresh permutation each epoch)
    and, unless `augment=False`, augments; it also drops the last partial batch unless
    `drop_remainder=False`. The same `seed` gives the same batches, epoch by epoch. Returns
    (images, labels) batches with a known length; iterate it again for the next epoch.
    """
    augment = training if augment is None else augment
    drop_remainder = training if drop_remainder is None else drop_remainder
    n, h, w, c = x.shape
    index_dtype = tf.int32 if n * h * w < 2**31 else tf.int64
    # 1. cache: the uint8 images once, in host memory (where tf.data runs)
    with tf.device("/cpu:0"):
        images = tf.constant(x)
        pixels = tf.reshape(images, [n * h * w, c])
        labels = tf.constant(np.asarray(y).astype(np.int64))
    keep_rest = n % batch_size > 0 and not drop_remainder
    # 2. one random key per iteration (= per epoch), 3. its shuffled batches of ids
    if training:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    else:
        keys = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    batches = keys.flat_map(lambda k: epoch_batches(k, n, batch_size, seed, training, keep_rest, index_dtype))

    # 4. per batch, one gather picks (and augments) the images, then normalise
    def gather(step, key_ids):
        key, ids = key_ids
        if augment:
            batch = tf.gather(pixels, augmented_pixel_index(ids, h, w, tf.stack([key, step])))
            batch = tf.reshape(batch, [-1, h, w, c])
        else:
            batch = tf.gather(images, ids)
        return normalize(batch, dtype), tf.gather(labels, ids)

    ds = batches.enumerate().map(gather, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n // batch_size + int(keep_rest)))
    return ds.prefetch(AUTOTUNE)  # 5. prepare the next batches while the step runs


# %% [markdown]
# One epoch of 10 ids in batches of 4, twice with the same seed, then with another seed,
# then without shuffling and keeping the short last batch (as evaluation does):

# %%
# NBVAL_CHECK_OUTPUT
def ids_per_batch(ds):
    return [b.numpy().tolist() for _, b in ds]


ten = np.zeros((10, 8, 8, 3), np.uint8)  # 10 blank images; their labels are their ids
for name, ds in [
    ("seed 0, epoch 1", make_dataset(ten, np.arange(10), 4, training=True, seed=0)),
    ("seed 0, epoch 1 again", make_dataset(ten, np.arange(10), 4, training=True, seed=0)),
    ("seed 1", make_dataset(ten, np.arange(10), 4, training=True, seed=1)),
    ("evaluation", make_dataset(ten, np.arange(10), 4, training=False)),
]:
    print(f"{name:22s} {ids_per_batch(ds)}")

# %% [markdown]
# Here the labels are the image ids, so the labels show which images each batch holds.
# Now on CIFAR-10, with the global batch:

# %%
train_ds = make_dataset(cifar.x_train, cifar.y_train, GLOBAL_BATCH, training=True, seed=0)
test_ds = make_dataset(cifar.x_test, cifar.y_test, GLOBAL_BATCH, training=False)
print(f"training batches per epoch: {int(train_ds.cardinality())}, test batches: {int(test_ds.cardinality())}")

# %%
# NBVAL_CHECK_OUTPUT
print("train element_spec:", train_ds.element_spec)
images, labels = next(iter(train_ds))
print(f"first batch: images {tuple(images.shape)} {images.dtype.name}, labels {tuple(labels.shape)} {labels.dtype.name}")
print("pixels in [0, 1]:", bool(tf.reduce_min(images) >= 0.0) and bool(tf.reduce_max(images) <= 1.0))
again, _ = next(iter(make_dataset(cifar.x_train, cifar.y_train, GLOBAL_BATCH, training=True, seed=0)))
other, _ = next(iter(make_dataset(cifar.x_train, cifar.y_train, GLOBAL_BATCH, training=True, seed=1)))
print("same seed, same first batch:", bool(tf.reduce_all(images == again)))
print("other seed, other first batch:", not bool(tf.reduce_all(images == other)))
test_images, test_labels = next(iter(test_ds))
print("test pipeline keeps order and pixels:",
      np.array_equal(test_labels.numpy(), cifar.y_test[:GLOBAL_BATCH])
      and np.allclose(test_images.numpy(), cifar.x_test[:GLOBAL_BATCH] / 255.0, atol=1e-6))

# %% [markdown]
# ## What each design costs
#
# For comparison, the textbook per-example pipeline, with the same shuffle (perfect) and
# the same augmentation, but with `cache`, `shuffle` and `batch` each handling one example
# at a time:

# %%
def make_classic_dataset(x, y, batch_size, seed=0):
    """from_tensor_slices -> cache -> shuffle(N) -> batch -> map(augment, normalise) -> prefetch."""
    ds = tf.data.Dataset.from_tensor_slices((x, np.asarray(y).astype(np.int64))).cache()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)

    def prepare(step, batch):
        images, labels = batch
        return normalize(augment_batch(images, tf.stack([tf.constant(seed, tf.int64), step]))), labels

    return ds.enumerate().map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


# %% [markdown]
# `throughput.feed_cost` pulls batches with no model at all and reports images/s and the
# CPU time per image summed over all threads: the time the input takes away from a
# training step that needs every core. Both pipelines yield the same kind of batches;
# only the work per image differs.

# %%
n_cost = config.pick(smoke=10, full=200)
designs = [
    ("textbook: cache, shuffle, batch per example", make_classic_dataset(cifar.x_train, cifar.y_train, GLOBAL_BATCH)),
    ("tuned: whole batches only", make_dataset(cifar.x_train, cifar.y_train, GLOBAL_BATCH, training=True)),
]
costs = pd.DataFrame({
    name: throughput.feed_cost(iter(ds.repeat()), n_cost, GLOBAL_BATCH, warmup_batches=config.pick(smoke=3, full=20))
    for name, ds in designs
}).T
print(costs.round(1).to_string())

# %% [markdown]
# The textbook pipeline's warm-up also fills its cache and its shuffle buffer (its first
# epoch costs more still); the numbers above are its steady state.
#
# ## Three feeds, measured
#
# `throughput.measure_feeds` drives the **same** compiled training step of the seed CNN,
# on one device, from three feeds:
#
# - **naive numpy**: the seed article's feed: `x / 255.0` as one float64 array, then a
#   shuffled slice per step, converted to a tensor at every call. No augmentation.
# - **tuned tf.data**: the pipeline above, *with* augmentation.
# - **in-memory tensors**: batches normalised before timing starts; the step does no input
#   work at all. This is the compute ceiling.
#
# Each feed first gets a few untimed warm-up steps (tracing, first buffers). The feeds are
# then timed in many short interleaved rounds. The order rotates every round, so no feed
# always follows the same one, and a short pause after each round lets a `tf.data` feed
# refill its prefetch buffer then, not on the cores of the next feed's round. Each ratio
# between two feeds is taken within a round (where both saw about the same load from
# other programs), and the median over rounds is kept. On a shared 2-core virtual machine
# a single round can be 10% off, hence the many rounds; the numbers still move a little
# from run to run: the input pipeline's threads and the model's ops compete for the same
# two cores, and so does everything else running.

# %%
feed_results = throughput.measure_feeds(
    cifar.x_train, cifar.y_train, batch_size=GLOBAL_BATCH, n_batches=config.pick(smoke=S.bench_batches, full=20),
    rounds=config.pick(smoke=2, full=30),
)
feeds = throughput.feeds_table(feed_results)
ratios = throughput.pipeline_ratios(feed_results)
print(feeds.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:,.0f}" if v >= 10 else f"{v:.3f}"))
print(f"tuned / ceiling = {ratios['tuned / ceiling']:.3f}, tuned / naive = {ratios['tuned / naive']:.3f}")

# %%
fig = plots.bar_chart(
    feeds.set_index("feed")["median images/s"], xlabel="images/s (median round)",
    title=f"Seed CNN training step, batch {GLOBAL_BATCH}, one device",
    reference=float(feeds["median images/s"].iloc[-1]), reference_label="compute ceiling",
)

# %% [markdown]
# Read the table:
#
# - "share of ceiling" is the feed's speed divided by the ceiling's, round by round
#   (median). A share near 1 means the feed keeps the step busy: the model, not the input,
#   limits the speed. A share above 1 can only be noise (no feed beats doing no input
#   work at all): other programs took CPU time during some rounds.
# - "feed alone images/s" is how fast the feed delivers batches with no training at all:
#   its own cost. The tuned feed does more work than the naive one (it augments every
#   image), so compare these two numbers.
# - "predicted share (no spare core)" turns that cost into the share you can expect when
#   the input work and the model compete for the same, fully used cores, as on this
#   2-core CPU: the times per image add up, so the share is alone / (alone + ceiling).
#   Prefetching cannot hide input work when no core is idle.
# - A measured share *below* the predicted one is the price of sharing cores: the step's
#   ops split their work over both cores, so while a pipeline thread holds one core for a
#   moment, the other half of the op waits for it, and the stall costs more than the
#   pipeline's own CPU time.
#
# On a GPU machine the picture changes: the step runs on the GPU while the CPU cores
# prepare batches in parallel, so a feed whose "alone" speed is above the GPU's step rate
# reaches the ceiling, and a naive feed that makes the step wait for every batch falls
# far behind. The repository's `scripts/bench_pipeline.py` runs the same measurement with
# more rounds, for a quiet machine.
#
# ## Distributing the data to replicas
#
# A strategy needs a *distributed* dataset. There are two ways to get one:
#
# - `strategy.experimental_distribute_dataset(ds)`: you batch by the **global** batch
#   size; the strategy splits every batch into N per-replica batches.
# - `strategy.distribute_datasets_from_function(fn)`: the strategy calls `fn(ctx)` once per
#   *input pipeline* (one per worker machine) with a `tf.distribute.InputContext`; `fn`
#   batches by the **per-replica** size (`ctx.get_per_replica_batch_size`) and may shard
#   the data itself (`ctx.input_pipeline_id`, `ctx.num_input_pipelines`). The strategy deals
#   consecutive batches to the replicas of that worker.
#
# To *see* what each replica receives, `replica_batches` below feeds a dataset of example
# ids 0, 1, 2, … instead of images and lists, step by step, what each replica got. Here:
# 20 examples, a global batch of 2 per replica.

# %%
strategy = devices.make_strategy()
N = strategy.num_replicas_in_sync
DEMO_BATCH = 2 * N
NO_SHARDING = tf.data.Options()
NO_SHARDING.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF


def id_list(values):
    ids = np.asarray(values).reshape(-1)
    return " ".join(str(i) for i in ids) if ids.size else "(empty)"


def replica_batches(strategy, n_examples, global_batch, method="experimental_distribute_dataset"):
    """What each replica receives, step by step, from a dataset of example ids 0 .. n-1."""
    if method == "experimental_distribute_dataset":  # we batch globally, the strategy splits
        ds = tf.data.Dataset.range(n_examples).batch(global_batch).with_options(NO_SHARDING)
        dist = strategy.experimental_distribute_dataset(ds)
    else:  # the strategy calls dataset_fn once per input pipeline; it batches per replica

        def dataset_fn(ctx):
            ds = tf.data.Dataset.range(n_examples).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
            return ds.batch(ctx.get_per_replica_batch_size(global_batch)).with_options(NO_SHARDING)

        dist = strategy.distribute_datasets_from_function(dataset_fn)
    names = [devices.short_device(d) for d in strategy.extended.worker_devices]
    return pd.DataFrame([
        {"step": step, "replica": r, "device": names[r], "batch size": int(np.size(v)), "example ids": id_list(v)}
        for step, per_replica in enumerate(dist)
        for r, v in enumerate(strategy.experimental_local_results(per_replica))
    ])


# %%
# NBVAL_CHECK_OUTPUT
print(f"experimental_distribute_dataset, {N} replicas, 20 examples, global batch {DEMO_BATCH}:")
print(replica_batches(strategy, 20, DEMO_BATCH).to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
print(f"distribute_datasets_from_function, {N} replicas, 20 examples, global batch {DEMO_BATCH}:")
print(replica_batches(strategy, 20, DEMO_BATCH, method="distribute_datasets_from_function").to_string(index=False))

# %% [markdown]
# On one machine both give every replica consecutive slices of the data. The last global
# batch holds only what is left (the last step in the tables), so some replicas get
# **empty** batches in that step: the reason the training pipeline uses
# `drop_remainder=True`, and the reason a custom loop divides by the global batch size
# rather than by what each replica happened to receive.
#
# The same with the real training pipeline: each replica gets 1/N of every global batch
# (a multiple of N, so that it splits evenly).

# %%
# NBVAL_CHECK_OUTPUT
def show_replicas(dist_ds: tf.distribute.DistributedDataset) -> None:
    images, labels = next(iter(dist_ds))
    for i, (im, lb) in enumerate(zip(strategy.experimental_local_results(images),
                                     strategy.experimental_local_results(labels), strict=True)):
        print(f"  replica {i} on {devices.short_device(im.device)}: images {tuple(im.shape)} {im.dtype.name}, "
              f"labels {tuple(lb.shape)}")


DIST_BATCH = GLOBAL_BATCH // N * N  # a global batch that splits evenly over the N replicas
print(f"global batch {DIST_BATCH} = {N} replicas x {DIST_BATCH // N}")
print("experimental_distribute_dataset(train_ds):")
show_replicas(strategy.experimental_distribute_dataset(
    make_dataset(cifar.x_train, cifar.y_train, DIST_BATCH, training=True)))


def train_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """One pipeline per worker: this worker's shard of the images, batched per replica."""
    shard = np.arange(ctx.input_pipeline_id, len(cifar.x_train), ctx.num_input_pipelines)
    per_replica = ctx.get_per_replica_batch_size(DIST_BATCH)
    return make_dataset(cifar.x_train[shard], cifar.y_train[shard], per_replica,
                        training=True, seed=ctx.input_pipeline_id)


print("distribute_datasets_from_function(train_dataset_fn):")
show_replicas(strategy.distribute_datasets_from_function(train_dataset_fn))

# %% [markdown]
# ### Several workers: input pipelines and auto-sharding
#
# With several *worker machines* (`MultiWorkerMirroredStrategy`, later in the series) every
# worker runs its own input pipeline, and the workers must not all read the same examples.
# With `distribute_datasets_from_function` you shard yourself with the `InputContext`.
# `input_pipelines` builds the `InputContext` each worker's function would receive and
# applies that recipe (shard by `input_pipeline_id`, batch by the per-replica size), for 2
# workers with 2 replicas each (16 examples, global batch 8), without starting any worker:

# %%
def input_pipelines(num_workers, replicas_per_worker, n_examples, global_batch):
    """What distribute_datasets_from_function hands each worker of a multi-worker job."""
    rows = []
    for worker in range(num_workers):
        ctx = tf.distribute.InputContext(num_input_pipelines=num_workers, input_pipeline_id=worker,
                                         num_replicas_in_sync=num_workers * replicas_per_worker)
        ds = tf.data.Dataset.range(n_examples).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        first = [id_list(b) for b in ds.batch(per_replica).take(replicas_per_worker)]
        rows.append({"worker (input_pipeline_id)": worker, "per-replica batch": per_replica,
                     "examples this worker reads": len(list(ds)), "first batches": " | ".join(first)})
    return pd.DataFrame(rows)


# %%
# NBVAL_CHECK_OUTPUT
print(input_pipelines(num_workers=2, replicas_per_worker=2, n_examples=16, global_batch=8).to_string(index=False))

# %% [markdown]
# With `experimental_distribute_dataset` the strategy shards for you, following
# `tf.data.Options().experimental_distribute.auto_shard_policy`:
#
# - `FILE`: each worker reads whole files (file *i* goes to worker *i* mod W). Cheapest,
#   but needs at least as many files as workers.
# - `DATA`: every worker reads *all* the data and keeps every W-th element: always
#   possible, but each worker does all the reading.
# - `AUTO` (the default): `FILE` when the dataset reads files, otherwise `DATA`.
# - `OFF`: no sharding; every worker sees every example, so each epoch trains on
#   duplicates.
#
# `auto_shard_preview` below applies the same graph rewrite the strategy applies
# (TensorFlow's private `_AutoShardDataset`), for 2 workers, to a dataset that reads 4
# small TFRecord files of example ids (file 0 holds ids 0–2, file 1 holds 3–5, …):

# %%
from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset  # private: the strategy's rewrite

SHARD_POLICIES = ("AUTO", "FILE", "DATA", "OFF")
ID_SPEC = {"id": tf.io.FixedLenFeature([], tf.int64)}


def write_id_files(folder, n_files, per_file):
    """TFRecord files of example ids: file f holds f*per_file .. (f+1)*per_file - 1."""
    paths = []
    for f in range(n_files):
        paths.append(str(folder / f"ids-{f:03d}.tfrecord"))
        with tf.io.TFRecordWriter(paths[-1]) as writer:
            for i in range(f * per_file, (f + 1) * per_file):
                feature = {"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return paths


def id_file_dataset(paths):
    return tf.data.TFRecordDataset(paths).map(lambda record: tf.io.parse_single_example(record, ID_SPEC)["id"])


def auto_shard_preview(dataset, policy, num_workers):
    """What each worker of a num_workers job would read under an auto-shard policy."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    rows = []
    for worker in range(num_workers):
        try:
            got = [int(i) for i in _AutoShardDataset(dataset.with_options(options), num_workers, worker)]
            ids = id_list(got) if got else "(none)"
        except tf.errors.OpError as err:  # keep the first sentence of TensorFlow's message
            got, ids = [], "error: " + re.sub(r"\{\{.*?\}\}\s*", "", err.message).split("\n")[0].split(". ")[0]
        rows.append({"policy": policy, "worker": worker, "elements": len(got), "ids": ids})
    return pd.DataFrame(rows)


id_files = write_id_files(config.run_dir("03_pipeline", fresh=True), n_files=4, per_file=3)
id_ds = id_file_dataset(id_files)

# %%
# NBVAL_CHECK_OUTPUT
shards = pd.concat([auto_shard_preview(id_ds, policy, num_workers=2) for policy in SHARD_POLICIES])
print(shards.to_string(index=False))

# %% [markdown]
# And with fewer files than workers (1 file, 2 workers), `FILE` sharding breaks: in the
# table below one worker stops with an error and the other reads nothing at all. This is
# the error to expect when a dataset has fewer files than the job has workers; switch to
# `DATA` (or write more files).

# %%
# NBVAL_CHECK_OUTPUT
print(auto_shard_preview(id_file_dataset(id_files[:1]), "FILE", num_workers=2).to_string(index=False))

# %% [markdown]
# On this single machine `MirroredStrategy` has one input pipeline, so no auto-sharding
# happens: the tables above are what changes once the job spans several workers.
#
# ## Summary
#
# - The tuned pipeline holds the uint8 images in memory, shuffles with one permutation per
#   epoch, batches image ids by the **global** batch size, then picks, augments and
#   normalises each batch with one gather, and prefetches with `AUTOTUNE`. No `tf.data`
#   operation touches single examples. With a fixed seed it is reproducible.
# - Feeds are compared by images/s on the same training step; the in-memory ceiling tells
#   you whether the input or the model limits the speed (the table above has this run's
#   numbers).
# - `experimental_distribute_dataset` splits global batches; `distribute_datasets_from_function`
#   hands you an `InputContext` to build per-worker, per-replica-batched pipelines. On one
#   machine, both deal consecutive slices to the replicas; a short last batch leaves some
#   replicas empty.
# - Across workers, auto-shard policies decide who reads what: `FILE` needs enough files,
#   `DATA` always works but reads everything everywhere, `OFF` duplicates data.
#
# ## Exercises
#
# 1. Build a *per-image* version of the pipeline (`map` normalisation and a per-image
#    crop and flip **before** `batch`) and compare its own cost with the tuned pipeline's
#    using `throughput.feed_cost`.

# %%
# Try it: fill in per_image (it only normalises for now), then compare the two feeds.
def per_image(x, y):
    x = tf.cast(x, tf.float32) / 255.0  # TODO: random crop after padding to 40x40, random flip
    return x, y


n_small = min(len(cifar.x_train), 40 * GLOBAL_BATCH)
per_image_ds = (tf.data.Dataset.from_tensor_slices((cifar.x_train[:n_small], cifar.y_train[:n_small]))
                .cache().shuffle(n_small).map(per_image, num_parallel_calls=AUTOTUNE)
                .batch(GLOBAL_BATCH, drop_remainder=True).prefetch(AUTOTUNE).repeat())
print(throughput.feed_cost(iter(per_image_ds), 5, GLOBAL_BATCH, warmup_batches=2))

# %% jupyter={"source_hidden": true}
# Solution 1: time each feed alone (no model), in wall-clock images/s and in CPU time per
# image (all threads of this process), which is less sensitive to other programs.
def per_image(x, y):
    x = tf.cast(x, tf.float32) / 255.0
    x = tf.image.random_crop(tf.image.resize_with_crop_or_pad(x, 40, 40), [32, 32, 3])
    return tf.image.random_flip_left_right(x), y


per_image_ds = (tf.data.Dataset.from_tensor_slices((cifar.x_train[:n_small], cifar.y_train[:n_small]))
                .cache().shuffle(n_small).map(per_image, num_parallel_calls=AUTOTUNE)
                .batch(GLOBAL_BATCH, drop_remainder=True).prefetch(AUTOTUNE).repeat())
tuned_ds = make_dataset(cifar.x_train[:n_small], cifar.y_train[:n_small], GLOBAL_BATCH, training=True).repeat()
n_timed = config.pick(smoke=10, full=100)
for name, ds in [("per-image map", per_image_ds), ("tuned (batched map)", tuned_ds)]:
    cost = throughput.feed_cost(iter(ds), n_timed, GLOBAL_BATCH)  # warm-up: cache, shuffle buffer
    print(f"{name:20s} {cost['images/s alone']:8.0f} images/s alone, {cost['CPU us per image']:5.1f} CPU-us per image")

# %% [markdown]
# 2. What do `FILE` and `DATA` sharding give with 3 files and 4 workers?

# %%
# Try it: change the number of files and workers.
n_files, n_workers = 3, 4
print(auto_shard_preview(id_file_dataset(id_files[:n_files]), "DATA", num_workers=n_workers).to_string(index=False))

# %% jupyter={"source_hidden": true}
# Solution 2: FILE fails on every worker (too few files); DATA gives worker w every 4th id from w.
three = id_file_dataset(id_files[:3])
print(pd.concat([auto_shard_preview(three, p, num_workers=4) for p in ("FILE", "DATA")]).to_string(index=False))

# %% [markdown]
# 3. With 250 examples, a global batch of 100 and no `drop_remainder`, how many examples
#    does each of this machine's replicas get in the last step? Guess, then check.

# %%
# Try it: your guess, one number per replica.
guess = [50 // N] * N
print(f"{N} replicas, my guess for the last step: {guess}")

# %% jupyter={"source_hidden": true}
# Solution 3: the last global batch holds 50 examples. TensorFlow fills replicas in
# per-replica-sized chunks (with 4 replicas: 100 / 4 = 25), so some replicas get a full
# chunk and the others get nothing.
table = replica_batches(strategy, 250, 100)
print(table[table["step"] == table["step"].max()][["step", "replica", "batch size"]].to_string(index=False))

# %% [markdown]
# ## Further reading
#
# - TensorFlow guide, [Better performance with the tf.data API](https://www.tensorflow.org/guide/data_performance)
#   and [Analyze tf.data performance with the TF Profiler](https://www.tensorflow.org/guide/data_performance_analysis).
# - TensorFlow tutorial, [Distributed input](https://www.tensorflow.org/tutorials/distribute/input)
#   (`experimental_distribute_dataset`, `distribute_datasets_from_function`, sharding).
# - D. G. Murray et al., *tf.data: A Machine Learning Data Processing Framework*, VLDB 2021,
#   [arXiv:2101.12127](https://arxiv.org/abs/2101.12127).
# - A. Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009 (the
#   CIFAR-10 dataset), [cs.toronto.edu/~kriz/cifar.html](https://www.cs.toronto.edu/~kriz/cifar.html).
# - K. He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016 (the 4-pixel
#   pad-and-crop plus flip augmentation for CIFAR-10).
