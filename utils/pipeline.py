"""``tf.data`` input pipelines for CIFAR-10-shaped data.

The tuned training pipeline::

    from_tensor_slices(uint8) -> cache -> shuffle -> batch(global) -> normalise
    -> augment (pad-and-crop, flip) -> prefetch(AUTOTUNE)

Batching happens *before* the per-example work, so normalisation and augmentation run
as a few vectorised ops per batch instead of thousands of tiny ops: on a 2-core CPU this
is what lets the feed keep up with the model. ``cache`` keeps the decoded uint8 images in
memory (4x smaller than float32); shuffling and augmentation stay fresh every epoch.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def normalize(images: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """uint8 [0, 255] -> ``dtype`` [0, 1] (the seed's ``x / 255.0``)."""
    return tf.cast(images, dtype) / tf.cast(255.0, dtype)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """Random pad-and-crop (``pad`` pixels, reflect) and horizontal flip of a float batch.

    Stateless ops with an explicit ``seed`` pair, so a pipeline with a fixed seed yields
    the same batches on every run.
    """
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.stateless_uniform([n, 2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    # One crop per image, gathered in a single vectorised op.
    rows = offsets[:, 0:1] + tf.range(h)[None, :]
    cols = offsets[:, 1:2] + tf.range(w)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([n, 1, 1, 1], seed=seed + 1) < 0.5
    return tf.where(flip, tf.reverse(cropped, axis=[2]), cropped)


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    augment: bool | None = None,
    cache: bool = True,
    shuffle_buffer: int | None = None,
    drop_remainder: bool | None = None,
    seed: int = 0,
    dtype: tf.DType = tf.float32,
) -> tf.data.Dataset:
    """Build the series' tuned pipeline over in-memory uint8 images.

    Args:
        x, y: images ``uint8 (N, 32, 32, 3)`` and integer labels ``(N,)``.
        batch_size: the *global* batch size (a strategy splits it over replicas).
        training: shuffle and (by default) augment; drop the last partial batch.
        augment: pad-and-crop + flip; defaults to ``training``.
        cache: keep the uint8 examples in memory after the first pass.
        shuffle_buffer: defaults to the whole dataset (a perfect shuffle; it is in memory).
        drop_remainder: defaults to ``training`` (equal batches for every replica).
        seed: shuffle and augmentation seed.
        dtype: dtype of the normalised images.

    Raises:
        ValueError: for mismatched lengths, a non-positive batch size or wrong image shapes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {x.shape}")
    augment = training if augment is None else augment
    drop_remainder = training if drop_remainder is None else drop_remainder

    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64)))
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer or len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    base_seed = tf.constant([seed, 0], dtype=tf.int64)

    def prepare(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = batch
        images = normalize(images, dtype)
        if augment:
            images = augment_batch(images, base_seed + tf.stack([tf.constant(0, tf.int64), step]))
        return images, labels

    ds = ds.enumerate().map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)


def in_memory_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, dtype: tf.DType = tf.float32
) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Pre-normalised batches as eager tensors: the compute ceiling (no input work at all)."""
    n = (len(x) // batch_size) * batch_size
    xs = normalize(tf.constant(x[:n]), dtype)
    ys = tf.constant(y[:n].astype(np.int64))
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]
