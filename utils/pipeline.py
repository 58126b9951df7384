"""``tf.data`` input pipelines for CIFAR-10-shaped data.

The tuned training pipeline works on **whole batches** from the first step::

    uint8 images, held once as a tensor in host memory
    every epoch: one random permutation of the image ids (a fresh one each epoch)
      -> split into batches of ids (the *global* batch size)
      -> map, per batch: ONE gather that picks the batch's images AND applies the random
         pad-and-crop (reflect) and flip; then normalise to float [0, 1]
      -> prefetch(AUTOTUNE)

No ``tf.data`` operation touches single examples: shuffling is one permutation per epoch,
batching is a reshape of that permutation, and augmentation is folded into the index of
the gather. Per-example pipelines (``from_tensor_slices -> cache -> shuffle -> batch``)
spend a few microseconds of bookkeeping per image; on a 2-core CPU, where every
microsecond the pipeline spends is taken from the training step, that matters. The uint8
images take a quarter of the memory of float32 and are normalised only after cropping.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def normalize(images: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """uint8 [0, 255] -> ``dtype`` [0, 1] (the seed's ``x / 255.0``)."""
    return tf.cast(images, dtype) / tf.cast(255.0, dtype)


def _reflect(index: tf.Tensor, size: tf.Tensor | int) -> tf.Tensor:
    """Map indices in ``[-(size-1), 2*(size-1)]`` back into ``[0, size)`` as REFLECT padding
    would (``-1 -> 1``, ``size -> size-2``)."""
    index = tf.abs(index)
    return (size - 1) - tf.abs((size - 1) - index)


def augmented_pixel_index(
    image_ids: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor, seed: tf.Tensor, pad: int = 4
) -> tf.Tensor:
    """Where each output pixel of a random pad-and-crop + flip comes from.

    Returns ``(m, height, width)`` indices into the images viewed as a table of pixels,
    ``reshape(images, [N * height * width, channels])``: output pixel ``(i, r, c)`` is
    pixel ``(rows[i, r], cols[i, c])`` of image ``image_ids[i]``. The random offset in
    ``[-pad, pad]``, the reflection at the border and the flip are all in the index, so
    one ``tf.gather`` does the whole augmentation (and, for a batch of ids, the batching).
    """
    m = tf.shape(image_ids)[0]
    index_dtype = image_ids.dtype
    offsets = tf.random.stateless_uniform([m, 2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32) - pad
    flip = tf.random.stateless_uniform([m, 1], seed=seed + 1) < 0.5
    rows = _reflect(offsets[:, 0:1] + tf.range(height)[None, :], height)  # (m, height)
    cols = tf.range(width)[None, :]
    cols = _reflect(offsets[:, 1:2] + tf.where(flip, (width - 1) - cols, cols), width)  # (m, width)
    in_image = tf.cast(rows[:, :, None] * width + cols[:, None, :], index_dtype)
    return in_image + image_ids[:, None, None] * tf.cast(height * width, index_dtype)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """Random pad-and-crop (``pad`` pixels, reflect) and horizontal flip of a batch.

    Works on any dtype (the pipeline augments uint8, before normalising). Nothing is
    padded or flipped in memory: one ``tf.gather`` with the indices of
    :func:`augmented_pixel_index` builds the result, the same pixels as
    ``tf.pad(mode="REFLECT")`` then a crop then ``tf.reverse`` (the unit tests check
    this against that reference), without the intermediate padded copy.

    Stateless ops with an explicit ``seed`` pair, so a fixed seed gives the same result
    on every run.
    """
    shape = tf.shape(images)
    n, h, w, c = shape[0], shape[1], shape[2], shape[3]
    index = augmented_pixel_index(tf.range(n), h, w, seed, pad)
    return tf.reshape(tf.gather(tf.reshape(images, [n * h * w, c]), index), shape)


def _check_inputs(x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if np.ndim(x) != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {np.shape(x)}")


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    augment: bool | None = None,
    drop_remainder: bool | None = None,
    seed: int = 0,
    dtype: tf.DType = tf.float32,
) -> tf.data.Dataset:
    """Build the series' tuned pipeline over in-memory images (see the module doc).

    Args:
        x, y: images ``uint8 (N, H, W, C)`` and integer labels ``(N,)``.
        batch_size: the *global* batch size (a strategy splits it over replicas).
        training: shuffle (a new perfect shuffle every epoch) and, by default, augment;
            drop the last partial batch.
        augment: pad-and-crop + flip; defaults to ``training``.
        drop_remainder: defaults to ``training`` (equal batches for every replica).
        seed: shuffle and augmentation seed: the same seed gives the same batches, epoch
            by epoch, on every run.
        dtype: dtype of the normalised images.

    Returns:
        A dataset of ``(images, labels)`` batches with a known length (one epoch);
        iterate it again (Keras does, every epoch) for the next epoch's shuffle.

    Raises:
        ValueError: for mismatched lengths, a non-positive batch size or wrong image shapes.
    """
    _check_inputs(x, y, batch_size)
    augment = training if augment is None else augment
    drop_remainder = training if drop_remainder is None else drop_remainder

    n, h, w, c = x.shape
    index_dtype = tf.int32 if n * h * w < 2**31 else tf.int64
    with tf.device("/cpu:0"):  # host memory, where tf.data runs, whatever the caller's device
        images = tf.constant(x)
        pixels = tf.reshape(images, [n * h * w, c])
        labels = tf.constant(np.asarray(y).astype(np.int64))
    full, rest = divmod(n, batch_size)
    keep_rest = bool(rest) and not drop_remainder

    if training:
        # One random key per iteration (= per epoch): the epoch's permutation and its
        # augmentation both derive from it, so every epoch differs, reproducibly.
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    else:
        keys = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))

    def epoch(key: tf.Tensor) -> tf.data.Dataset:
        ids = tf.range(n, dtype=index_dtype)
        if training:
            ids = tf.random.experimental.stateless_shuffle(ids, seed=tf.stack([key, tf.constant(seed, tf.int64)]))
        batches = tf.data.Dataset.from_tensor_slices(tf.reshape(ids[: full * batch_size], [full, batch_size]))
        if keep_rest:
            batches = batches.concatenate(tf.data.Dataset.from_tensors(ids[full * batch_size :]))
        return batches.map(lambda b: (key, b))

    def prepare(step: tf.Tensor, key_ids: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        key, ids = key_ids
        if augment:
            index = augmented_pixel_index(ids, h, w, tf.stack([key, step]))
            batch = tf.reshape(tf.gather(pixels, index), [-1, h, w, c])
        else:
            batch = tf.gather(images, ids)
        return normalize(batch, dtype), tf.gather(labels, ids)

    ds = keys.flat_map(epoch).enumerate().map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(full + int(keep_rest)))
    return ds.prefetch(AUTOTUNE)


def make_classic_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, dtype: tf.DType = tf.float32
) -> tf.data.Dataset:
    """The textbook per-example training pipeline, for comparison with :func:`make_dataset`.

    ``from_tensor_slices(uint8) -> cache -> shuffle(N) -> batch -> map(augment, normalise)
    -> prefetch(AUTOTUNE)``: the same batches *in distribution* (perfect shuffle, the same
    augmentation) but with ``cache``, ``shuffle`` and ``batch`` each handling one example at
    a time. ``cache`` is what you want when the examples come from files; here they are
    already in memory, so it only adds bookkeeping. Notebook 03 measures the difference.
    """
    _check_inputs(x, y, batch_size)
    ds = tf.data.Dataset.from_tensor_slices((x, np.asarray(y).astype(np.int64))).cache()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)

    def prepare(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = batch
        images = augment_batch(images, tf.stack([tf.constant(seed, tf.int64), step]))
        return normalize(images, dtype), labels

    return ds.enumerate().map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def in_memory_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, dtype: tf.DType = tf.float32
) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Pre-normalised batches as eager tensors: the compute ceiling (no input work at all)."""
    n = (len(x) // batch_size) * batch_size
    xs = normalize(tf.constant(x[:n]), dtype)
    ys = tf.constant(y[:n].astype(np.int64))
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]
