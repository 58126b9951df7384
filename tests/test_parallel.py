"""Tests of utils.parallel: stage splitting, pipelined gradients, schedules and simulation.

The models are tiny so the whole file runs in seconds on 2 cores. The tests ask for 4
logical CPUs; if TensorFlow was already started with fewer (another test module ran
first), pipelines reuse devices round-robin, which changes placement but not the math.
"""

from __future__ import annotations

import os

import utils  # noqa: F401  (quiets TensorFlow's C++ log before it loads)

os.environ.setdefault("MPLBACKEND", "Agg")

import keras
import numpy as np
import pytest
import tensorflow as tf

from utils import devices, parallel

try:
    devices.setup_devices(4)
except RuntimeError:  # TensorFlow already initialised by another test module
    pass

DEVICES = devices.compute_devices()
GRAD_TOL = 1e-6  # float32 sums in another order; measured differences are ~1e-8
WEIGHT_TOL = 1e-6


def stage_devs(p: int) -> list[str]:
    return parallel.stage_devices(p, DEVICES, allow_reuse=True)


def dense_model(seed: int = 0) -> keras.Sequential:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            keras.layers.Dense(8, activation="relu", name="d2"),
            keras.layers.Dense(8, activation="tanh", name="d3"),
            keras.layers.Dense(8, activation="relu", name="d4"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name="tiny_dense",
    )


def conv_model(seed: int = 0) -> keras.Sequential:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.MaxPooling2D(2, name="p1"),
            keras.layers.Conv2D(6, 2, activation="relu", name="c2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name="tiny_conv",
    )


def batch(shape: tuple[int, ...], n: int = 16, classes: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n)


# --------------------------------------------------------------------------- devices
def test_not_enough_cpus_error_says_how_to_fix():
    two = ["/device:CPU:0", "/device:CPU:1"]
    with pytest.raises(parallel.NotEnoughDevicesError) as err:
        parallel.stage_devices(3, two)
    msg = str(err.value)
    assert "3 stages needs 3 devices" in msg and "only 2" in msg
    assert "SERIES_NUM_CPUS=3" in msg and "restart the kernel" in msg
    assert "allow_reuse=True" in msg


def test_not_enough_gpus_error_mentions_gpus():
    with pytest.raises(parallel.NotEnoughDevicesError, match="at least 2 GPUs"):
        parallel.stage_devices(2, ["/device:GPU:0"])


def test_from_sequential_refuses_more_stages_than_devices():
    two = ["/device:CPU:0", "/device:CPU:1"]
    with pytest.raises(parallel.NotEnoughDevicesError, match="SERIES_NUM_CPUS=3"):
        parallel.Pipeline.from_sequential(dense_model(), 3, devices=two)
    # the default device list too
    if len(DEVICES) < 5:  # the tiny model has 5 layers
        with pytest.raises(parallel.NotEnoughDevicesError, match="needs"):
            parallel.Pipeline.from_sequential(dense_model(), len(DEVICES) + 1)


def test_stage_devices_reuse_and_bad_input():
    assert parallel.stage_devices(3, ["a", "b"], allow_reuse=True) == ["a", "b", "a"]
    assert parallel.stage_devices(2, ["a", "b", "c"]) == ["a", "b"]
    with pytest.raises(ValueError, match=">= 1"):
        parallel.stage_devices(0, ["a"])
    with pytest.raises(ValueError, match="empty"):
        parallel.stage_devices(1, [])


def test_short_device():
    assert parallel.short_device("/job:localhost/replica:0/task:0/device:CPU:3") == "CPU:3"
    assert parallel.short_device("/device:GPU:1") == "GPU:1"
    assert parallel.short_device("") == ""


# --------------------------------------------------------------------------- splitting
def test_partition_balances_the_bottleneck():
    assert parallel.partition([1, 1, 1, 1], 2) == [0, 2]
    assert parallel.partition([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    # zero-cost layers (pooling) stay with the layer before them
    assert parallel.partition([1, 0, 5, 0, 2, 0, 0.5, 0.01], 4) == [0, 2, 4, 6]
    assert parallel.partition([3, 2], 1) == [0]
    with pytest.raises(ValueError, match="non-empty stages"):
        parallel.partition([1, 2], 3)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.partition([1, 2], 0)


def test_micro_batch_sizes():
    assert parallel.micro_batch_sizes(8, 4) == [2, 2, 2, 2]
    assert parallel.micro_batch_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot be split into 5"):
        parallel.micro_batch_sizes(4, 5)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.micro_batch_sizes(4, 0)
    parts = parallel.split_batch(np.arange(10), 3)
    assert [list(t.numpy()) for t in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_stages_copy_layers_weights_and_devices():
    model = conv_model()
    n = min(3, len(DEVICES))
    if n < 2:
        pytest.skip("needs at least 2 devices to show placement")
    pipe = parallel.Pipeline.from_sequential(model, n)
    assert [layer.name for s in pipe.stages for layer in s.layers] == [layer.name for layer in model.layers]
    assert parallel.max_abs_diff(model.weights, [w for s in pipe.stages for w in s.weights]) == 0.0
    for k, stage in enumerate(pipe.stages):
        for v in stage.weights:
            assert parallel.short_device(v.value.device) == parallel.short_device(pipe.devices[k])
    table = pipe.variable_table()
    assert len(table) == len(model.weights)
    outs = pipe.forward_trace(batch((8, 8, 2))[0])
    assert [parallel.short_device(o.device) for o in outs] == [
        parallel.short_device(d) for d in pipe.devices
    ]
    # the original model is untouched: still the unsplit reference
    assert all(v.value.device == model.weights[0].value.device for v in model.weights)
    np.testing.assert_allclose(outs[-1].numpy(), model(batch((8, 8, 2))[0]).numpy(), atol=1e-6)


def test_boundaries_and_bad_models():
    model = dense_model()
    pipe = parallel.Pipeline.from_sequential(
        model, boundaries=["d3", "out"], devices=stage_devs(3)
    )
    assert [[layer.name for layer in s.layers] for s in pipe.stages] == [["d1", "d2"], ["d3", "d4"], ["out"]]
    with pytest.raises(ValueError, match="Unknown boundary"):
        parallel.Pipeline.from_sequential(model, boundaries=["nope"], devices=stage_devs(2))
    with pytest.raises(ValueError, match="model order"):
        parallel.Pipeline.from_sequential(model, boundaries=["d4", "d2"], devices=stage_devs(3))
    inp = keras.Input((6,))
    functional = keras.Model(inp, keras.layers.Dense(2)(inp))
    with pytest.raises(TypeError, match="keras.Sequential"):
        parallel.Pipeline.from_sequential(functional, 1)
    with pytest.raises(ValueError, match="not built"):
        parallel.Pipeline.from_sequential(keras.Sequential([keras.layers.Dense(2)]), 1)
    bn = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="BatchNormalization"):
        parallel.Pipeline.from_sequential(bn, 2, devices=stage_devs(2))


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_pipelined_gradients_equal_unsplit(p, m):
    model = dense_model(seed=p * 10 + m)
    x, y = batch((6,), n=16, seed=m)
    pipe = parallel.Pipeline.from_sequential(model, p, devices=stage_devs(p), balance="layers")
    ref_loss, ref_grads = parallel.reference_gradients(model, x, y)
    for kind in parallel.SCHEDULES:
        res = pipe.compute_gradients(x, y, m, kind)
        assert abs(float(res.loss) - float(ref_loss)) < GRAD_TOL
        assert parallel.max_abs_diff(ref_grads, res.flat_gradients) < GRAD_TOL
        # gradients are really non-trivial (a check that cannot fail is no check)
        assert max(float(tf.reduce_max(tf.abs(g))) for g in ref_grads) > 1e-3
        expected_peak = [m] * p if kind == "gpipe" else [min(p - s, m) for s in range(p)]
        assert res.peak_in_flight == expected_peak
        assert len(res.order) == 2 * p * m
    # one update with the accumulated gradients gives the unsplit model's new weights
    res = pipe.compute_gradients(x, y, m, "1f1b")
    pipe.apply_gradients(keras.optimizers.SGD(0.5), res.gradients)
    keras.optimizers.SGD(0.5).apply_gradients(zip(ref_grads, model.trainable_variables, strict=True))
    assert parallel.max_abs_diff(model.trainable_variables, pipe.trainable_variables) < WEIGHT_TOL


@pytest.mark.parametrize("p,m", [(2, 1), (3, 4), (4, 8)])
def test_pipelined_gradients_equal_unsplit_conv(p, m):
    model = conv_model(seed=p + m)
    x, y = batch((8, 8, 2), n=16, seed=p)
    pipe = parallel.Pipeline.from_sequential(model, p, devices=stage_devs(p))
    ref_loss, ref_grads = parallel.reference_gradients(model, x, y)
    res = pipe.compute_gradients(x, y, m, "gpipe")
    assert abs(float(res.loss) - float(ref_loss)) < GRAD_TOL
    assert parallel.max_abs_diff(ref_grads, res.flat_gradients) < GRAD_TOL


def test_uneven_micro_batches_and_gradient_sensitivity():
    model = dense_model(seed=3)
    x, y = batch((6,), n=10)
    pipe = parallel.Pipeline.from_sequential(model, 3, devices=stage_devs(3))
    _, ref = parallel.reference_gradients(model, x, y)
    res = pipe.compute_gradients(x, y, 4, "1f1b")
    assert parallel.max_abs_diff(ref, res.flat_gradients) < GRAD_TOL
    # the comparison does detect a different batch
    other = pipe.compute_gradients(x[:8], y[:8], 4)
    assert parallel.max_abs_diff(ref, other.flat_gradients) > 1e-4
    with pytest.raises(ValueError, match="10 examples but y has 9"):
        pipe.compute_gradients(x, y[:9], 2)


def test_training_matches_step_for_step():
    model = conv_model(seed=7)
    pipe = parallel.Pipeline.from_sequential(model, 3, devices=stage_devs(3))
    batches = [batch((8, 8, 2), n=12, seed=s) for s in range(3)]
    table = parallel.compare_training(
        model, pipe, batches, lambda: keras.optimizers.Adam(1e-2), num_micro_batches=3, schedule="1f1b"
    )
    assert len(table) == 3
    assert table["|loss diff|"].max() < 1e-5
    assert table["max |weight diff|"].max() < 1e-5
    assert table["loss unsplit"].iloc[0] != table["loss unsplit"].iloc[-1]  # it did train


def test_pipeline_equals_single_device_accumulation_while_training():
    """Same micro-batches, same order of sums: the split into devices changes nothing."""
    model = conv_model(seed=11)
    pipe = parallel.Pipeline.from_sequential(model, 3, devices=stage_devs(3))
    x, y = batch((8, 8, 2), n=12)
    loss_acc, grads_acc = parallel.reference_gradients(model, x, y, num_micro_batches=4)
    res = pipe.compute_gradients(x, y, 4, "1f1b")
    assert abs(float(loss_acc) - float(res.loss)) <= 1e-7
    assert parallel.max_abs_diff(grads_acc, res.flat_gradients) <= 1e-7
    batches = [batch((8, 8, 2), n=12, seed=s) for s in range(4)]
    table = parallel.compare_training(
        model, pipe, batches, lambda: keras.optimizers.Adam(1e-2), 4, "gpipe",
        reference_micro_batches=4,
    )
    assert table["|loss diff|"].max() <= 1e-6
    assert table["max |weight diff|"].max() <= 1e-6


def test_time_interleaved():
    calls = []
    out = parallel.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    assert calls == ["a", "b", "a", "b", "a", "b"]
    with pytest.raises(ValueError, match="repeats"):
        parallel.time_interleaved({"a": lambda: None}, 0)
    with pytest.raises(ValueError, match="stat"):
        parallel.time_interleaved({"a": lambda: None}, 1, stat="mean")
    assert set(parallel.time_interleaved({"a": lambda: None}, 2, stat="min")) == {"a"}


def test_recorded_timeline_and_stage_times():
    model = dense_model()
    x, y = batch((6,))
    pipe = parallel.Pipeline.from_sequential(model, 2, devices=stage_devs(2))
    res = pipe.compute_gradients(x, y, 4, "gpipe", record=True)
    tl = res.timeline
    assert tl is not None and tl.violations() == [] and tl.unit == "ms"
    assert sum(tl.busy()) <= tl.makespan + 1e-9  # one Python thread: tasks never overlap
    times = parallel.measure_stage_times(pipe, x, y, 2, repeats=2)
    assert list(times["stage"]) == [0, 1]
    assert (times[["forward ms", "backward ms"]] > 0).all().all()
    with pytest.raises(ValueError, match="repeats"):
        parallel.measure_stage_times(pipe, x, y, 2, repeats=0)
    with pytest.raises(ValueError, match="record=True"):
        parallel.stage_times_from(pipe, [pipe.compute_gradients(x, y, 2)])
    with pytest.raises(ValueError, match="No recorded"):
        parallel.stage_times_from(pipe, [])


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", parallel.SCHEDULES)
def test_schedule_invariants_bubble_and_memory(kind):
    for p in range(1, 7):
        for m in range(1, 11):
            order = parallel.schedule_order(p, m, kind)
            assert [len(seq) for seq in order] == [2 * m] * p
            for tb in (1.0, 2.0):
                tl = parallel.pipeline_schedule(p, m, kind, forward_times=1.0, backward_times=tb)
                assert tl.violations() == [], (p, m, kind, tl.violations())
                assert tl.bubble_fraction == pytest.approx(parallel.ideal_bubble_fraction(p, m))
                assert tl.makespan == pytest.approx((m + p - 1) * (1 + tb))
                peaks = tl.peak_in_flight()
                if kind == "gpipe":
                    assert peaks == [m] * p
                else:
                    assert peaks == [min(p - s, m) for s in range(p)] and max(peaks) <= p
            # one task per device per time slot, each F and B exactly once
            grid = parallel.pipeline_schedule(p, m, kind).grid()
            for row in grid:
                busy = [c for c in row if c]
                assert sorted(busy) == sorted([f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)])
            order_flat = parallel.execution_order(p, m, kind)
            pos = {t: k for k, t in enumerate(order_flat)}
            for t in order_flat:  # the serial order the runner uses respects every dependency
                if t.kind == "B":
                    assert pos[parallel.Task(t.stage, t.micro_batch, "F")] < pos[t]
                    if t.stage < p - 1:
                        assert pos[parallel.Task(t.stage + 1, t.micro_batch, "B")] < pos[t]
                elif t.stage > 0:
                    assert pos[parallel.Task(t.stage - 1, t.micro_batch, "F")] < pos[t]


def test_gpipe_text_chart():
    text = parallel.pipeline_schedule(2, 2, "gpipe").to_text()
    assert text.splitlines() == [
        "stage 0 | F0 F1 .. .. B0 B1",
        "stage 1 | .. F0 F1 B0 B1 ..",
    ]
    assert parallel.ideal_bubble_fraction(4, 1) == pytest.approx(0.75)
    assert parallel.ideal_bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_violations_catch_broken_timelines():
    good = parallel.pipeline_schedule(2, 2, "gpipe")
    assert good.violations() == []
    tasks = list(good.tasks)
    # drop a task
    missing = parallel.Timeline(2, 2, tasks[1:])
    assert any("missing" in v for v in missing.violations())
    # a backward before its forward / before the next stage's backward
    shifted = [
        parallel.TimedTask(t.task, t.start - 3, t.end - 3) if t.task == parallel.Task(0, 0, "B") else t
        for t in tasks
    ]
    problems = parallel.Timeline(2, 2, shifted).violations()
    assert any("starts before" in v for v in problems)
    assert any("at the same time" in v for v in problems)
    # a duplicated task
    assert any("more than once" in v for v in parallel.Timeline(2, 2, tasks + tasks[:1]).violations())


def test_simulate_measured_times_and_deadlock():
    fwd, bwd = [1.0, 3.0, 2.0], [2.0, 5.0, 1.0]
    naive = parallel.pipeline_schedule(3, 1, "gpipe", fwd, bwd)
    assert naive.makespan == pytest.approx(sum(fwd) + sum(bwd))  # one device at a time
    assert naive.bubble_fraction == pytest.approx(1 - 14 / (3 * 14))
    for kind in parallel.SCHEDULES:
        tl = parallel.pipeline_schedule(3, 8, kind, fwd, bwd, comm_time=0.5)
        assert tl.violations() == []
        # the bottleneck stage (stage 1: 8 x (3 + 5) = 64) bounds the makespan from below
        assert tl.makespan >= 64 and tl.busy() == pytest.approx([24.0, 64.0, 24.0])
    bad = [[parallel.Task(0, 0, "B"), parallel.Task(0, 0, "F")]]
    with pytest.raises(ValueError, match="deadlocks"):
        parallel.simulate(bad)
    with pytest.raises(ValueError, match="one value per stage"):
        parallel.simulate(parallel.schedule_order(2, 2), forward_times=[1.0])
    with pytest.raises(ValueError, match="kind must be"):
        parallel.schedule_order(2, 2, "zigzag")
    with pytest.raises(ValueError, match="num_micro_batches"):
        parallel.schedule_order(2, 0)


def test_bubble_table_and_gantt_plot():
    table = parallel.bubble_table([2, 4], [1, 4])
    assert len(table) == 4
    np.testing.assert_allclose(table["bubble gpipe"], table["formula"])
    np.testing.assert_allclose(table["bubble 1f1b"], table["formula"])
    assert list(table["peak in flight gpipe"]) == [1, 4, 1, 4]
    assert list(table["peak in flight 1f1b"]) == [1, 2, 1, 4]
    import matplotlib.pyplot as plt

    ax = parallel.plot_gantt(parallel.pipeline_schedule(3, 4, "1f1b"))
    assert len(ax.get_yticks()) == 3 and "bubble" in ax.get_title()
    plt.close("all")
