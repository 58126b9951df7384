"""Notebook 02's data-parallel code: the hand-written ring all-reduce and the one-step proof.

Works with whatever device count the process has (conftest: 4 logical CPUs, or
$SERIES_NUM_CPUS, or the GPUs); some tests also use a subset of the devices.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from utils import config, data, devices
from utils.lessons.mirrored_strategy import (
    TOLERANCE,
    compare_one_step,
    max_abs_diff,
    ring_all_reduce,
)

DEVICES = devices.compute_devices()


@pytest.fixture(scope="module")
def strategy():
    return devices.make_strategy()


@pytest.fixture(scope="module")
def batch(strategy):
    x, y, *_ = data.make_synthetic(64, 8, seed=0)
    n = 4 * strategy.num_replicas_in_sync  # 4 examples per replica
    return x[:n], y[:n]


@pytest.mark.parametrize("n", sorted({1, min(2, len(DEVICES)), len(DEVICES)}))
@pytest.mark.parametrize("size", [1, 7, 24])  # fewer values than devices, uneven chunks, even chunks
def test_ring_all_reduce_gives_every_device_the_sum(n, size):
    values = [tf.random.stateless_normal([size, 1], seed=[i, 1]) for i in range(n)]
    log = []
    out = ring_all_reduce(values, DEVICES[:n], log)
    assert len(out) == n and all(o.shape == (size, 1) for o in out)
    assert max_abs_diff(out, [tf.add_n(values)] * n) <= 1e-5
    assert [devices.short_device(o.device) for o in out] == [devices.short_device(d) for d in DEVICES[:n]]
    # two phases of n - 1 steps, every device sending once per step
    assert len(log) == 2 * (n - 1) * n
    assert {m["phase"] for m in log} == ({"reduce-scatter", "all-gather"} if n > 1 else set())


def test_ring_matches_the_strategy_all_reduce(strategy):
    n = strategy.num_replicas_in_sync
    grads = [tf.random.stateless_normal([1000], seed=[i, 2]) for i in range(n)]
    per_replica = strategy.experimental_distribute_values_from_function(lambda ctx: grads[ctx.replica_id_in_sync_group])
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    log = []
    ring = ring_all_reduce(grads, list(strategy.extended.worker_devices), log)
    assert max_abs_diff(ring, [total] * n) <= 1e-5
    sent = [4 * sum(m["values"] for m in log if m["from"] == i) for i in range(n)]
    np.testing.assert_allclose(sent, 2 * (n - 1) / n * 4000, rtol=1e-3)  # 2(N-1)/N x the bytes, per device


@pytest.mark.parametrize("method", ["custom loop", "model.fit"])
def test_n_replicas_match_one_device(strategy, batch, method):
    with config.quiet_tf_logs():
        r = compare_one_step(*batch, strategy, method=method)
    assert r["equal"] and r["max |w_N - w_1|"] <= TOLERANCE
    assert r["update size / one device"] == pytest.approx(1.0, rel=1e-3)


def test_wrong_scaling_multiplies_the_sgd_update_by_n(batch):
    two = devices.make_strategy(DEVICES[:2])
    n = two.num_replicas_in_sync
    with config.quiet_tf_logs():
        r = compare_one_step(*batch, two, scaling="per_replica_mean")
    assert r["update size / one device"] == pytest.approx(n, rel=0.01)
    assert r["loss reported (N replicas)"] == pytest.approx(n * r["loss (1 device)"], rel=0.01)
    assert r["equal"] == (n == 1)
