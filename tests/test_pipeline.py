from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from utils import data
from utils.lessons import cifar10_pipeline as P


@pytest.fixture(scope="module")
def tiny():
    x_tr, y_tr, *_ = data.make_synthetic(100, 10, seed=0)
    return x_tr, y_tr


def test_eval_pipeline_normalises_without_augmenting(tiny):
    x, y = tiny
    batches = list(P.make_dataset(x, y, 32, training=False))
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]  # keeps the remainder
    xb, yb = batches[0]
    assert xb.dtype == tf.float32 and xb.shape == (32, 32, 32, 3)
    np.testing.assert_allclose(xb.numpy(), x[:32] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(yb.numpy(), y[:32])


def test_training_pipeline_shuffles_augments_and_drops_remainder(tiny):
    x, y = tiny
    ds = P.make_dataset(x, y, 32, training=True, seed=3)
    sizes = [len(b[1]) for b in ds]
    assert sizes == [32, 32, 32]
    xb, yb = next(iter(P.make_dataset(x, y, 32, training=True, seed=3)))
    assert not np.array_equal(yb.numpy(), y[:32])  # shuffled
    assert float(tf.reduce_min(xb)) >= 0.0 and float(tf.reduce_max(xb)) <= 1.0
    # Same seed, same first batch: the pipeline is reproducible.
    xb2, yb2 = next(iter(P.make_dataset(x, y, 32, training=True, seed=3)))
    np.testing.assert_array_equal(yb.numpy(), yb2.numpy())
    np.testing.assert_allclose(xb.numpy(), xb2.numpy())


def test_augment_is_a_crop_or_flip_of_the_padded_image():
    img = tf.reshape(tf.range(2 * 8 * 8 * 1, dtype=tf.float32), (2, 8, 8, 1))
    out = P.augment_batch(img, tf.constant([1, 2], tf.int64), pad=2)
    assert out.shape == img.shape
    padded = tf.pad(img, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT").numpy()
    for i in range(2):
        found = False
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, dy : dy + 8, dx : dx + 8]
                if np.array_equal(out[i], crop) or np.array_equal(out[i], crop[:, ::-1]):
                    found = True
        assert found


def _reference_augment(images, seed, pad):
    """The textbook version: REFLECT-pad, crop at the same random offsets, flip."""
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.stateless_uniform([n, 2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([n, 1], seed=seed + 1) < 0.5
    out = []
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, dy : dy + h, dx : dx + w]
        out.append(crop[:, ::-1] if bool(flip[i, 0]) else crop)
    return np.stack(out), offsets.numpy(), flip.numpy()


@pytest.mark.parametrize("dtype", [tf.uint8, tf.float32])
def test_augment_equals_pad_crop_flip_reference(dtype):
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (64, 6, 9, 3)), dtype)  # not square: rows/cols kept apart
    seed = tf.constant([5, 7], tf.int64)
    out = P.augment_batch(images, seed, pad=3)
    expected, offsets, flip = _reference_augment(images, seed, pad=3)
    assert out.dtype == dtype and out.shape == images.shape
    np.testing.assert_array_equal(out.numpy(), expected)
    # The check means something: every offset and both flip states occurred.
    assert set(offsets.ravel()) == set(range(7)) and 0 < flip.mean() < 1


def _epoch_labels(ds):
    return np.concatenate([yb.numpy() for _, yb in ds])


def test_every_epoch_is_a_fresh_permutation_of_all_images():
    n = 100
    x = np.zeros((n, 4, 4, 3), np.uint8)
    y = np.arange(n)  # labels = image ids
    ds = P.make_dataset(x, y, 16, training=True, augment=False, drop_remainder=False, seed=1)
    assert int(ds.cardinality()) == 7  # 6 full batches + the remainder, known in advance
    first, second = _epoch_labels(ds), _epoch_labels(ds)
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert not np.array_equal(first, second)  # reshuffled for the second epoch
    # Reproducible: a new pipeline with the same seed repeats the same epochs.
    again = P.make_dataset(x, y, 16, training=True, augment=False, drop_remainder=False, seed=1)
    np.testing.assert_array_equal(_epoch_labels(again), first)
    np.testing.assert_array_equal(_epoch_labels(again), second)
    other = P.make_dataset(x, y, 16, training=True, augment=False, drop_remainder=False, seed=2)
    assert not np.array_equal(_epoch_labels(other), first)


def test_training_batches_are_augmented_copies_of_their_own_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = np.arange(40)
    ds = P.make_dataset(x, y, 8, training=True, seed=0)
    padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect").astype(np.float32) / 255.0
    flipped = 0
    for xb, yb in ds:
        for image, i in zip(xb.numpy(), yb.numpy(), strict=True):
            crops = [padded[i, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
            plain = any(np.array_equal(image, crop) for crop in crops)
            mirrored = any(np.array_equal(image, crop[:, ::-1]) for crop in crops)
            assert plain or mirrored, f"image {i} is not a crop or flip of its source"
            flipped += mirrored and not plain
    assert 0 < flipped < 40


def test_pipeline_runs_under_another_device_and_a_strategy():
    x, y, *_ = data.make_synthetic(64, 8, seed=0)
    with tf.device("/cpu:1"):
        ds = P.make_dataset(x, y, 16, training=True)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dist = strategy.experimental_distribute_dataset(ds)
    epochs = []
    for _ in range(2):
        labels = [np.concatenate([t.numpy() for t in strategy.experimental_local_results(yb)]) for _, yb in dist]
        assert [len(b) for b in labels] == [16] * 4
        epochs.append(np.concatenate(labels))
    assert not np.array_equal(*epochs)
