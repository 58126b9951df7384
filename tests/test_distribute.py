"""Data-parallel helpers: strategy, batch arithmetic, all-reduce traffic, one-step proof,
data distribution. Uses the logical devices conftest.py created (4 CPUs, or real GPUs)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from utils import devices
from utils import distribute as D

N = len(devices.compute_devices())
needs_two = pytest.mark.skipif(N < 2, reason="needs at least two devices")


def tiny_model() -> keras.Model:
    """A small conv net (fast) with the seed CNN's kind of layers."""
    return keras.Sequential(
        [
            keras.Input(shape=(8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


@pytest.fixture(scope="module")
def strategy():
    return D.make_strategy()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8 * N, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=8 * N)
    return x, y


# --------------------------------------------------------------------------- strategy


def test_strategy_has_one_replica_per_compute_device(strategy):
    assert strategy.num_replicas_in_sync == N
    table = D.strategy_table(strategy)
    assert list(table["replica"]) == list(range(N))
    assert len(set(table["device"])) == N


def all_reduce_ones(strategy) -> float:
    @tf.function
    def run():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.constant(1.0)))

    return float(strategy.experimental_local_results(run())[0])


@needs_two
def test_strategy_over_a_subset_after_the_full_one(strategy):
    """Each device set gets its own collective keys: no "joining a group with size" clash."""
    assert all_reduce_ones(strategy) == N
    sub = D.make_strategy(devices.compute_devices()[:2])
    assert sub.num_replicas_in_sync == 2
    assert all_reduce_ones(sub) == 2
    assert all_reduce_ones(D.make_strategy()) == N


@pytest.mark.parametrize(
    ("names", "match"),
    [([], "at least one device"), (["/device:CPU:99"], "Unknown device"), (["banana"], "not a device name")],
)
def test_strategy_bad_devices_are_clear_errors(names, match):
    with pytest.raises(ValueError, match=match):
        D.make_strategy(names)


def test_strategy_rejects_duplicates():
    first = devices.compute_devices()[0]
    with pytest.raises(ValueError, match="once"):
        D.make_strategy([first, first])


# --------------------------------------------------------------------------- arithmetic


def test_per_replica_batch_size():
    assert D.per_replica_batch_size(128, 4) == 32
    with pytest.raises(ValueError, match="multiple of 3, e.g. 126 or 129"):
        D.per_replica_batch_size(128, 3)
    with pytest.raises(ValueError, match=">= 1"):
        D.per_replica_batch_size(128, 0)


def test_scaled_learning_rate():
    assert D.scaled_learning_rate(0.1, 256, 1024) == pytest.approx(0.4)
    assert D.scaled_learning_rate(0.1, 256, 1024, rule="sqrt") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="rule"):
        D.scaled_learning_rate(0.1, 256, 1024, rule="cubic")
    with pytest.raises(ValueError, match="base_lr"):
        D.scaled_learning_rate(0.0, 256, 1024)


def simulate_ring_allreduce(values: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Reduce-scatter then all-gather around a ring; counts the values each device sends."""
    n = len(values)
    chunks = [np.array_split(v.astype(np.float64), n) for v in values]
    sent = [0] * n
    for step in range(n - 1):  # reduce-scatter
        outgoing = [(i, (i - step) % n, chunks[i][(i - step) % n].copy()) for i in range(n)]
        for i, c, data in outgoing:
            chunks[(i + 1) % n][c] += data
            sent[i] += data.size
    for step in range(n - 1):  # all-gather
        outgoing = [(i, (i + 1 - step) % n, chunks[i][(i + 1 - step) % n].copy()) for i in range(n)]
        for i, c, data in outgoing:
            chunks[(i + 1) % n][c] = data
            sent[i] += data.size
    return [np.concatenate(c) for c in chunks], sent


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_formula_matches_a_simulated_ring(n):
    rng = np.random.default_rng(n)
    size = 24 * n
    values = [rng.normal(size=size) for _ in range(n)]
    results, sent = simulate_ring_allreduce(values)
    for r in results:  # every device ends with the sum
        np.testing.assert_allclose(r, np.sum(values, axis=0))
    for s in sent:
        assert s == pytest.approx(D.ring_allreduce_bytes(size, n))


def test_ring_limits_and_errors():
    assert D.ring_allreduce_bytes(1000, 1) == 0
    assert D.ring_allreduce_bytes(1000, 2) == 1000
    assert D.ring_allreduce_bytes(1000, 1000) < 2000
    with pytest.raises(ValueError, match="num_devices"):
        D.ring_allreduce_bytes(1000, 0)


def test_allreduce_table():
    table = D.allreduce_table(1_000_000, device_counts=(1, 4), link_gb_per_s=10)
    assert list(table["devices N"]) == [1, 4]
    assert table["gradient MB"].tolist() == [4.0, 4.0]
    assert table["ring: MB sent per device"].tolist() == [0.0, 6.0]
    assert table["reduce-to-one: MB at busiest device"].tolist() == [0.0, 24.0]
    assert table["ring ms at 10 GB/s"].iloc[1] == pytest.approx(0.6)


# --------------------------------------------------------------------------- one-step proof


@pytest.fixture(scope="module")
def scaling(strategy, batch):
    """Correct and wrong scaling, SGD and Adam: four one-step comparisons, computed once."""
    return D.scaling_table(tiny_model, *batch, strategy)


def test_correct_scaling_matches_one_device(scaling):
    table, results = scaling
    for r in (results[0], results[2]):  # sgd and adam, global scaling
        assert r.scaling == "global"
        assert r.equal and r.max_abs_diff < 1e-5
        assert r.update_ratio == pytest.approx(1.0, abs=1e-4)
        assert r.loss_reported == pytest.approx(r.loss_one_device, rel=1e-5)
        assert "equal within 1e-05: True" in r.verdict()
    assert list(table["equal"])[0::2] == [True, True]


@needs_two
def test_wrong_scaling_multiplies_the_sgd_update_by_n(scaling):
    r = scaling[1][1]
    assert (r.optimizer, r.scaling) == ("sgd", "per_replica_mean")
    assert not r.equal
    assert r.update_ratio == pytest.approx(N, rel=1e-3)
    assert r.loss_reported == pytest.approx(N * r.loss_one_device, rel=1e-4)
    assert r.verdict().endswith("False")


@needs_two
def test_adam_mostly_hides_the_factor(scaling):
    r = scaling[1][3]
    assert (r.optimizer, r.scaling) == ("adam", "per_replica_mean")
    assert r.update_ratio == pytest.approx(1.0, abs=0.05)  # Adam normalises the step size
    assert r.loss_reported == pytest.approx(N * r.loss_one_device, rel=1e-4)


def test_model_fit_matches_one_device(strategy, batch):
    r = D.compare_one_step(tiny_model, *batch, strategy, method="model.fit")
    assert r.equal, r


def test_compare_one_step_bad_input(strategy, batch):
    x, y = batch
    with pytest.raises(ValueError, match="same non-zero number"):
        D.compare_one_step(tiny_model, x, y[:-1], strategy)
    with pytest.raises(ValueError, match="model.fit always scales"):
        D.compare_one_step(tiny_model, x, y, strategy, method="model.fit", scaling="per_replica_mean")
    with pytest.raises(ValueError, match="scaling"):
        D.compare_one_step(tiny_model, x, y, strategy, scaling="mean")


def test_train_step_rejects_a_model_built_outside_the_scope(strategy):
    with pytest.raises(ValueError, match="strategy.scope"):
        D.make_train_step(strategy, tiny_model(), keras.optimizers.SGD(0.1), 8)


# --------------------------------------------------------------------------- data to replicas


@pytest.mark.parametrize("method", D.DISTRIBUTE_METHODS)
def test_replica_batches_cover_every_example_once(strategy, method):
    global_batch = 2 * N
    n_examples = 2 * global_batch + N  # two full steps, then one example per replica
    table = D.replica_batches(strategy, n_examples, global_batch, method=method)
    ids = [int(i) for s in table["example ids"] if s != "(empty)" for i in s.split()]
    assert sorted(ids) == list(range(n_examples))
    assert set(table.loc[table["step"] < 2, "batch size"]) == {2}
    assert table.loc[table["step"] == 2, "batch size"].sum() == N


def test_replica_batches_drop_remainder(strategy):
    table = D.replica_batches(strategy, 2 * N + 1, N, drop_remainder=True)
    assert table["step"].max() == 1 and set(table["batch size"]) == {1}


def test_input_pipelines_are_disjoint_and_complete():
    table = D.input_pipelines(num_workers=2, replicas_per_worker=2, n_examples=16, global_batch_size=8)
    assert list(table["per-replica batch"]) == [2, 2]
    assert list(table["examples this worker reads"]) == [8, 8]
    assert table["first batches"].iloc[0] == "0 2 | 4 6"
    with pytest.raises(ValueError, match="does not split evenly"):
        D.input_pipelines(2, 2, 16, 6)


def test_auto_shard_policies(tmp_path):
    files = D.write_id_files(tmp_path, n_files=4, per_file=2)
    ds = D.id_file_dataset(files)
    file_rows = D.auto_shard_preview(ds, "FILE", 2)
    assert list(file_rows["ids"]) == ["0 1 4 5", "2 3 6 7"]  # whole files per worker
    data_rows = D.auto_shard_preview(ds, "data", 2)
    assert list(data_rows["ids"]) == ["0 2 4 6", "1 3 5 7"]  # every 2nd element
    off_rows = D.auto_shard_preview(ds, "OFF", 2)
    assert list(off_rows["elements"]) == [8, 8]  # everything, twice
    assert list(D.auto_shard_preview(ds, "AUTO", 2)["ids"]) == list(file_rows["ids"])
    too_few = D.auto_shard_preview(D.id_file_dataset(files[:1]), "FILE", 2)
    assert too_few["ids"].iloc[0].startswith("error: Could not apply FILE based sharding")
    with pytest.raises(ValueError, match="policy"):
        D.auto_shard_preview(tf.data.Dataset.range(4), "HASH", 2)


def test_time_train_steps(strategy, batch):
    x, y = batch
    rate = D.time_train_steps(strategy, tiny_model, x, y, global_batch_size=2 * N, steps=2, warmup=1)
    assert rate > 0
    with pytest.raises(ValueError, match="at least one global batch"):
        D.time_train_steps(strategy, tiny_model, x[:1], y[:1], global_batch_size=2 * N, steps=1)
