"""Measure how fast different input feeds keep a training step busy (images/s).

Three feeds drive the *same* compiled training step of the same model, one after another:

``naive numpy``
    What the seed article does: the whole training set divided by 255 into a float64
    NumPy array, then one shuffled slice per step handed to the step, which converts it
    to a tensor (a host copy of 8 bytes per value) and casts it. No augmentation.
``tuned tf.data``
    :func:`utils.pipeline.make_dataset`: cache -> shuffle -> batch -> normalise ->
    augment -> prefetch. It does *more* work than the naive feed (augmentation), but in
    vectorised ops on background threads, overlapped with the step.
``in-memory tensors``
    :func:`utils.pipeline.in_memory_batches`: batches prepared before timing starts; the
    step does no input work at all. This is the compute ceiling.

To resist noise from other processes on a shared machine, the feeds are timed in
interleaved rounds (naive, tuned, ceiling; then tuned, ceiling, naive; ...: the order
rotates so that no feed always follows the same one). A ratio between
two feeds is taken *within* each round, where both saw about the same load, and the
median over rounds is reported (a paired comparison): far steadier than comparing each
feed's best round when the machine's load comes and goes.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import pipeline

FEEDS = ("naive numpy", "tuned tf.data", "in-memory tensors")

Batch = tuple[object, object]


def make_step(model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None) -> Callable[[object, object], tf.Tensor]:
    """A compiled SGD-style training step ``step(images, labels) -> loss``.

    Images of any float dtype are cast to the model's compute dtype inside the step, so
    the float64 naive feed and the float32 pipelines share one step.
    """
    optimizer = optimizer or keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, model.compute_dtype)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def naive_numpy_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The seed's feed: ``x / 255.0`` as float64 once, then shuffled slices, forever."""
    _check_arrays(x, y, batch_size)
    xf = np.asarray(x) / 255.0  # float64, as in the seed article
    yi = np.asarray(y).astype(np.int64)
    rng = np.random.default_rng(seed)
    steps = len(xf) // batch_size
    while True:
        order = rng.permutation(len(xf))
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield xf[idx], yi[idx]


def _check_arrays(x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(x) < batch_size:
        raise ValueError(
            f"Need at least one full batch: {len(x)} images < batch_size {batch_size}. "
            "Use more images or a smaller batch."
        )


def time_feed(step: Callable[[object, object], tf.Tensor], batches: Iterator[Batch], n_batches: int) -> float:
    """Seconds for ``n_batches`` steps fed from ``batches`` (waits for the last step)."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    start = time.perf_counter()
    loss = None
    for _ in range(n_batches):
        xb, yb = next(batches)
        loss = step(xb, yb)
    float(loss)  # block until the last step has finished
    return time.perf_counter() - start


def time_feed_alone(batches: Iterator[Batch], n_batches: int) -> float:
    """Seconds to pull ``n_batches`` from a feed *without* training: the feed's own cost.

    NumPy batches are converted to tensors, as the step call would do.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    start = time.perf_counter()
    for _ in range(n_batches):
        xb, _ = next(batches)
        if isinstance(xb, np.ndarray):
            xb = tf.convert_to_tensor(xb)
    return time.perf_counter() - start


def feed_cost(batches: Iterator[Batch], n_batches: int, batch_size: int, warmup_batches: int = 5) -> dict[str, float]:
    """A feed's own cost with no model: images/s (wall clock) and CPU microseconds per image.

    CPU time counts every thread of this process (``tf.data`` works on background
    threads), so it is what the feed takes away from a training step that needs every
    core, and it is less sensitive to other programs than wall-clock time.

    Raises:
        ValueError: for a non-positive ``n_batches`` or ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if warmup_batches:
        time_feed_alone(batches, warmup_batches)  # tracing, first buffers
    cpu = time.process_time()
    seconds = time_feed_alone(batches, n_batches)
    cpu = time.process_time() - cpu
    images = n_batches * batch_size
    return {"images/s alone": images / seconds, "CPU us per image": cpu / images * 1e6}


@dataclass(frozen=True)
class FeedResult:
    """Timing of one feed over several rounds."""

    feed: str
    batch_size: int
    n_batches: int
    seconds: tuple[float, ...]  # one entry per round, feed + training step
    alone_seconds: float | None = None  # the feed alone, no step (None for the ceiling)

    @property
    def alone_images_per_s(self) -> float | None:
        """Images/s the feed delivers with no training step (``None`` if not measured)."""
        if not self.alone_seconds:
            return None
        return self.batch_size * self.n_batches / self.alone_seconds

    @property
    def best_images_per_s(self) -> float:
        return self.batch_size * self.n_batches / min(self.seconds)

    @property
    def median_images_per_s(self) -> float:
        return self.batch_size * self.n_batches / float(np.median(self.seconds))


def make_feeds(
    x: np.ndarray, y: np.ndarray, batch_size: int, n_batches: int, seed: int = 0
) -> dict[str, Iterator[Batch]]:
    """Endless iterators of the three feeds over the same images (see the module doc)."""
    _check_arrays(x, y, batch_size)
    tuned = pipeline.make_dataset(x, y, batch_size, training=True, seed=seed).repeat()
    n_ceiling = min(len(x), n_batches * batch_size)
    n_ceiling = max(batch_size, n_ceiling // batch_size * batch_size)
    ceiling = pipeline.in_memory_batches(x[:n_ceiling], y[:n_ceiling], batch_size)
    return {
        "naive numpy": naive_numpy_batches(x, y, batch_size, seed=seed),
        "tuned tf.data": iter(tuned),
        "in-memory tensors": itertools.cycle(ceiling),
    }


def measure_feeds(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    n_batches: int,
    rounds: int = 3,
    warmup_batches: int = 3,
    model_fn: Callable[[], keras.Model] | None = None,
    device: str | None = None,
    seed: int = 0,
    pause_s: float = 0.25,
) -> list[FeedResult]:
    """Time the three feeds on one training step, in interleaved rounds.

    Args:
        x, y: uint8 images ``(N, 32, 32, 3)`` and labels; ``N >= batch_size``.
        batch_size: images per step (the same for every feed).
        n_batches: steps timed per round and feed.
        rounds: interleaved rounds; each feed keeps all its round times.
        warmup_batches: untimed steps per feed first (tracing, cache fill, shuffle buffer).
        model_fn: the model to train (default: the seed CNN).
        device: where the step runs (default: TensorFlow's default device).
        pause_s: idle seconds after each timed round, so that a ``tf.data`` feed refills
            its prefetch buffer *then* rather than on the cores of the next feed's round.

    Raises:
        ValueError: for bad sizes or mismatched arrays.
    """
    if rounds < 1 or n_batches < 1 or warmup_batches < 0 or pause_s < 0:
        raise ValueError(
            f"rounds and n_batches must be >= 1, warmup_batches and pause_s >= 0, got {rounds}, "
            f"{n_batches}, {warmup_batches}, {pause_s}"
        )
    if model_fn is None:
        from utils.models import build_seed_cnn

        model_fn = build_seed_cnn
    with tf.device(device) if device else contextlib.nullcontext():
        model = model_fn()
        step = make_step(model)
        feeds = make_feeds(x, y, batch_size, n_batches, seed=seed)
        for batches in feeds.values():
            if warmup_batches:
                time_feed(step, batches, warmup_batches)
                time.sleep(pause_s)
        times: dict[str, list[float]] = {name: [] for name in FEEDS}
        for r in range(rounds):
            for name in rotated(FEEDS, r):
                times[name].append(time_feed(step, feeds[name], n_batches))
                time.sleep(pause_s)
        alone = {name: time_feed_alone(feeds[name], n_batches) for name in FEEDS[:2]}
    return [FeedResult(name, batch_size, n_batches, tuple(times[name]), alone.get(name)) for name in FEEDS]


def rotated(names: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """The feeds' order in round ``round_index``: rotated by one place per round.

    A fixed order is biased: the feed timed right after the naive one always starts with
    caches its 1.2 GB float64 array has just flushed, and the one after a ``tf.data``
    feed shares the cores with that feed's prefetch refilling. Rotating gives every feed
    every position equally often over ``len(names)`` rounds.
    """
    k = round_index % len(names)
    return names[k:] + names[:k]


def paired_ratio(a: FeedResult, b: FeedResult) -> float:
    """Median over rounds of ``rate(a) / rate(b)``, each ratio taken within one round.

    Raises:
        ValueError: if the two results have different numbers of rounds or batch sizes.
    """
    if len(a.seconds) != len(b.seconds) or a.batch_size * a.n_batches != b.batch_size * b.n_batches:
        raise ValueError(f"{a.feed!r} and {b.feed!r} were not timed in the same rounds.")
    return float(np.median([tb / ta for ta, tb in zip(a.seconds, b.seconds, strict=True)]))


def predicted_share(alone_images_per_s: float | None, ceiling_images_per_s: float) -> float:
    """Share of the ceiling a feed can reach when it has **no spare core**.

    If the input work and the training step compete for the same fully used cores, their
    times per image add up: ``1/rate = 1/ceiling + 1/alone``, so the share is
    ``alone / (alone + ceiling)``. With idle cores (or a GPU doing the step) prefetching
    hides the input work and the share can reach 1.
    """
    if alone_images_per_s is None:
        return 1.0
    return alone_images_per_s / (alone_images_per_s + ceiling_images_per_s)


def feeds_table(results: Iterable[FeedResult]) -> pd.DataFrame:
    """One row per feed: best and median images/s, the share of the ceiling (paired, see
    :func:`paired_ratio`), the feed's own speed without training, and the share predicted
    by :func:`predicted_share`."""
    results = list(results)
    by_name = {r.feed: r for r in results}
    if "in-memory tensors" not in by_name:
        raise ValueError("feeds_table needs the 'in-memory tensors' result (the ceiling).")
    top = by_name["in-memory tensors"]
    ceiling = top.median_images_per_s
    return pd.DataFrame(
        [
            {
                "feed": r.feed,
                "best images/s": round(r.best_images_per_s),
                "median images/s": round(r.median_images_per_s),
                "share of ceiling": paired_ratio(r, top),
                "feed alone images/s": float("nan") if r.alone_images_per_s is None else round(r.alone_images_per_s),
                "predicted share (no spare core)": predicted_share(r.alone_images_per_s, ceiling),
                "rounds": len(r.seconds),
                "batches per round": r.n_batches,
            }
            for r in results
        ]
    )


def pipeline_ratios(results: Iterable[FeedResult]) -> dict[str, float]:
    """``tuned / ceiling`` and ``tuned / naive``: medians of the per-round ratios."""
    by_name = {r.feed: r for r in results}
    missing = [f for f in FEEDS if f not in by_name]
    if missing:
        raise ValueError(f"pipeline_ratios needs all three feeds, missing {missing}")
    tuned = by_name["tuned tf.data"]
    return {
        "tuned / ceiling": paired_ratio(tuned, by_name["in-memory tensors"]),
        "tuned / naive": paired_ratio(tuned, by_name["naive numpy"]),
    }
