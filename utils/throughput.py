"""Measure how fast different input feeds keep a training step busy (images/s).

Three feeds drive the *same* compiled training step of the same model, one after another:

``naive numpy``
    What the seed article does: the whole training set divided by 255 into a float64
    NumPy array, then one shuffled slice per step handed to the step, which converts it
    to a tensor (a host copy of 8 bytes per value) and casts it. No augmentation.
``tuned tf.data``
    ``utils.lessons.cifar10_pipeline.make_dataset`` (notebook 03): shuffle, batch, one
    gather that augments, normalise, prefetch. It does *more* work than the naive feed
    (augmentation), but in vectorised ops on background threads, overlapped with the step.
``in-memory tensors``
    batches normalised before timing starts; the step does no input work at all. This is
    the compute ceiling.

To resist noise from other processes on a shared machine, the feeds are timed in
interleaved rounds whose order rotates (so no feed always follows the same one). A ratio
between two feeds is taken *within* each round, where both saw about the same load, and
the median over rounds is reported (a paired comparison).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils.data import to_float
from utils.lessons.cifar10_pipeline import make_dataset

FEEDS = ("naive numpy", "tuned tf.data", "in-memory tensors")


def make_step(model: keras.Model) -> Callable:
    """A compiled SGD training step ``step(images, labels) -> loss``; any float images are
    cast to the model's dtype inside, so the float64 and float32 feeds share one step."""
    optimizer, loss_fn = keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(tf.cast(x, model.compute_dtype), training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def naive_numpy_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0) -> Iterator:
    """The seed's feed: ``x / 255.0`` as float64 once, then shuffled slices, forever."""
    xf, yi = np.asarray(x) / 255.0, np.asarray(y).astype(np.int64)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(xf))
        for i in range(len(xf) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield xf[idx], yi[idx]


def time_feed(step: Callable | None, batches: Iterator, n_batches: int) -> float:
    """Seconds for ``n_batches`` steps fed from ``batches`` (waits for the last step); with
    ``step=None`` the feed alone: batches are only pulled (NumPy ones made tensors)."""
    start, loss = time.perf_counter(), None
    for _ in range(n_batches):
        xb, yb = next(batches)
        loss = tf.convert_to_tensor(xb) if step is None else step(xb, yb)
    np.asarray(loss)  # block until the last step has finished
    return time.perf_counter() - start


def feed_cost(batches: Iterator, n_batches: int, batch_size: int, warmup_batches: int = 5) -> dict[str, float]:
    """A feed's own cost with no model: images/s (wall clock) and CPU microseconds per image
    (all threads of this process: what the feed takes away from a step that needs every core)."""
    if warmup_batches:
        time_feed(None, batches, warmup_batches)  # tracing, first buffers
    cpu = time.process_time()
    seconds = time_feed(None, batches, n_batches)
    images = n_batches * batch_size
    return {"images/s alone": images / seconds, "CPU us per image": (time.process_time() - cpu) / images * 1e6}


@dataclass(frozen=True)
class FeedResult:
    """Timing of one feed: seconds per round (feed + step) and, alone, without the step."""

    feed: str
    images: int  # images per round (batch size x batches)
    seconds: tuple[float, ...]
    alone_seconds: float | None = None  # None for the ceiling

    def rate(self, seconds: float | None) -> float:
        return self.images / seconds if seconds else float("nan")


def make_feeds(x: np.ndarray, y: np.ndarray, batch_size: int, n_batches: int, seed: int = 0) -> dict[str, Iterator]:
    """Endless iterators of the three feeds over the same images (see the module doc)."""
    n = max(batch_size, min(len(x), n_batches * batch_size) // batch_size * batch_size)
    xs, ys = tf.constant(to_float(x[:n])), tf.constant(np.asarray(y[:n]).astype(np.int64))
    ceiling = [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]
    return {
        "naive numpy": naive_numpy_batches(x, y, batch_size, seed=seed),
        "tuned tf.data": iter(make_dataset(x, y, batch_size, training=True, seed=seed).repeat()),
        "in-memory tensors": itertools.cycle(ceiling),
    }


def measure_feeds(x: np.ndarray, y: np.ndarray, *, batch_size: int, n_batches: int, rounds: int = 3,
                  warmup_batches: int = 3, model_fn: Callable | None = None, seed: int = 0,
                  pause_s: float = 0.25) -> list[FeedResult]:
    """Time the three feeds on one training step of ``model_fn()`` (default: the seed CNN).

    Each feed gets ``warmup_batches`` untimed steps, then ``rounds`` interleaved rounds of
    ``n_batches`` steps whose order rotates by one place per round; ``pause_s`` idle seconds
    after each round let a ``tf.data`` feed refill its prefetch buffer *then*, not on the
    cores of the next feed's round.
    """
    if model_fn is None:
        from utils.models import build_seed_cnn as model_fn
    step = make_step(model_fn())
    feeds = make_feeds(x, y, batch_size, n_batches, seed=seed)
    for batches in feeds.values():
        time_feed(step, batches, warmup_batches)
        time.sleep(pause_s)
    times: dict[str, list[float]] = {name: [] for name in FEEDS}
    for r in range(rounds):
        for name in FEEDS[r % 3 :] + FEEDS[: r % 3]:
            times[name].append(time_feed(step, feeds[name], n_batches))
            time.sleep(pause_s)
    alone = {name: time_feed(None, feeds[name], n_batches) for name in FEEDS[:2]}
    return [FeedResult(name, batch_size * n_batches, tuple(times[name]), alone.get(name)) for name in FEEDS]


def paired_ratio(a: FeedResult, b: FeedResult) -> float:
    """Median over rounds of ``rate(a) / rate(b)``, each ratio taken within one round."""
    return float(np.median([tb / ta for ta, tb in zip(a.seconds, b.seconds, strict=True)]))


def feeds_table(results: list[FeedResult]) -> pd.DataFrame:
    """One row per feed: best and median images/s, the share of the ceiling (paired), the
    feed's own speed without training, and the share to expect with **no spare core**:
    when input and step compete for the same fully used cores their times per image add up,
    so the share is ``alone / (alone + ceiling)``."""
    top = results[-1]  # the ceiling
    ceiling = top.rate(float(np.median(top.seconds)))
    rows = []
    for r in results:
        alone = r.rate(r.alone_seconds)
        rows.append({
            "feed": r.feed,
            "best images/s": round(r.rate(min(r.seconds))),
            "median images/s": round(r.rate(float(np.median(r.seconds)))),
            "share of ceiling": paired_ratio(r, top),
            "feed alone images/s": alone if np.isnan(alone) else round(alone),
            "predicted share (no spare core)": 1.0 if np.isnan(alone) else alone / (alone + ceiling),
            "rounds": len(r.seconds),
        })
    return pd.DataFrame(rows)


def pipeline_ratios(results: list[FeedResult]) -> dict[str, float]:
    """``tuned / ceiling`` and ``tuned / naive``: medians of the per-round ratios."""
    naive, tuned, ceiling = results
    return {"tuned / ceiling": paired_ratio(tuned, ceiling), "tuned / naive": paired_ratio(tuned, naive)}
