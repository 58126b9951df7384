from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from utils import data, pipeline


@pytest.fixture(scope="module")
def tiny():
    x_tr, y_tr, *_ = data.make_synthetic(100, 10, seed=0)
    return x_tr, y_tr


def test_eval_pipeline_normalises_without_augmenting(tiny):
    x, y = tiny
    batches = list(pipeline.make_dataset(x, y, 32, training=False))
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]  # keeps the remainder
    xb, yb = batches[0]
    assert xb.dtype == tf.float32 and xb.shape == (32, 32, 32, 3)
    np.testing.assert_allclose(xb.numpy(), x[:32] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(yb.numpy(), y[:32])


def test_training_pipeline_shuffles_augments_and_drops_remainder(tiny):
    x, y = tiny
    ds = pipeline.make_dataset(x, y, 32, training=True, seed=3)
    sizes = [len(b[1]) for b in ds]
    assert sizes == [32, 32, 32]
    xb, yb = next(iter(pipeline.make_dataset(x, y, 32, training=True, seed=3)))
    assert not np.array_equal(yb.numpy(), y[:32])  # shuffled
    assert float(tf.reduce_min(xb)) >= 0.0 and float(tf.reduce_max(xb)) <= 1.0
    # Same seed, same first batch: the pipeline is reproducible.
    xb2, yb2 = next(iter(pipeline.make_dataset(x, y, 32, training=True, seed=3)))
    np.testing.assert_array_equal(yb.numpy(), yb2.numpy())
    np.testing.assert_allclose(xb.numpy(), xb2.numpy())


def test_augment_is_a_crop_or_flip_of_the_padded_image():
    img = tf.reshape(tf.range(2 * 8 * 8 * 1, dtype=tf.float32), (2, 8, 8, 1))
    out = pipeline.augment_batch(img, tf.constant([1, 2], tf.int64), pad=2)
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


def test_in_memory_batches_are_the_ceiling_feed(tiny):
    x, y = tiny
    batches = pipeline.in_memory_batches(x, y, 25)
    assert len(batches) == 4 and batches[0][0].dtype == tf.float32


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"batch_size": 0}, "batch_size"), ({"y": np.zeros(3)}, "labels"), ({"x": np.zeros((5, 3))}, "shape")],
)
def test_bad_input(tiny, kwargs, msg):
    x, y = tiny
    args = {"x": x, "y": y, "batch_size": 8, **kwargs}
    if "x" in kwargs:
        args["y"] = np.zeros(5)
    with pytest.raises(ValueError, match=msg):
        pipeline.make_dataset(args["x"], args["y"], args["batch_size"], training=True)
