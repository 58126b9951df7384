"""Feed throughput helpers: the three feeds, timing and the ratios (no speed assertions)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from utils import throughput as T
from utils.lessons.cifar10_pipeline import make_dataset


def tiny_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input(shape=(32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")]
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(96, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=96)


def test_naive_feed_is_the_seed_recipe(data):
    x, y = data
    it = T.naive_numpy_batches(x, y, 32, seed=1)
    batches = [next(it) for _ in range(3)]  # one epoch
    assert all(b[0].dtype == np.float64 and b[0].shape == (32, 32, 32, 3) for b in batches)
    assert all(b[0].max() <= 1.0 for b in batches)
    seen = np.concatenate([b[1] for b in batches])
    assert sorted(seen.tolist()) == sorted(y.tolist())  # a permutation of the epoch
    next(it)  # and it keeps going


def test_feeds_give_the_same_shapes(data):
    feeds = T.make_feeds(*data, batch_size=32, n_batches=2)
    assert list(feeds) == list(T.FEEDS)
    for name, it in feeds.items():
        for _ in range(4):  # more batches than the ceiling holds: it cycles
            xb, yb = next(it)
            assert tuple(xb.shape) == (32, 32, 32, 3), name
            assert tuple(yb.shape) == (32,), name


def test_measure_feeds_and_ratios(data):
    results = T.measure_feeds(*data, batch_size=32, n_batches=2, rounds=2, warmup_batches=1, model_fn=tiny_model,
                              pause_s=0)
    assert [r.feed for r in results] == list(T.FEEDS)
    assert all(len(r.seconds) == 2 and min(r.seconds) > 0 for r in results)
    table = T.feeds_table(results)
    assert table.loc[table["feed"] == "in-memory tensors", "share of ceiling"].item() == pytest.approx(1.0)
    assert results[0].alone_seconds > 0 and results[1].alone_seconds > 0
    assert results[2].alone_seconds is None  # nothing to measure for the ceiling
    assert ((table["predicted share (no spare core)"] > 0) & (table["predicted share (no spare core)"] <= 1)).all()
    ratios = T.pipeline_ratios(results)
    naive, tuned, ceiling = results
    per_round = [c / t for t, c in zip(tuned.seconds, ceiling.seconds, strict=True)]
    assert ratios["tuned / ceiling"] == pytest.approx(np.median(per_round))
    assert table["share of ceiling"].iloc[1] == pytest.approx(ratios["tuned / ceiling"])
    assert ratios["tuned / naive"] == pytest.approx(T.paired_ratio(tuned, naive))


def test_predicted_share_is_alone_over_alone_plus_ceiling():
    ceiling = T.FeedResult("in-memory tensors", 1000, (1.0,))  # 1000 images/s
    results = [T.FeedResult("a", 1000, (2.0,), 1.0), T.FeedResult("b", 1000, (1.1,), 1 / 9), ceiling]
    shares = T.feeds_table(results)["predicted share (no spare core)"].tolist()
    assert shares == pytest.approx([0.5, 0.9, 1.0])  # equal costs: half speed


def test_paired_ratio_cancels_a_slow_round():
    fast = T.FeedResult("a", 10, (1.0, 10.0, 1.0))  # round 2: the machine was busy for both
    slow = T.FeedResult("b", 10, (2.0, 20.0, 2.0))
    assert T.paired_ratio(fast, slow) == pytest.approx(2.0)


def test_feed_cost_reports_speed_and_cpu_time(data):
    x, y = data
    cost = T.feed_cost(iter(make_dataset(x, y, 32, training=True).repeat()), 4, 32, warmup_batches=1)
    assert cost["images/s alone"] > 0 and cost["CPU us per image"] > 0
