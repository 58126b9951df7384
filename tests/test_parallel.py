"""Tests of the pipeline code taught in notebook 06 (utils.lessons.pipeline_parallelism):
schedule invariants, the simulator and the bubble formula, and gradients equal to the
unsplit model's, eager and compiled (GPipe and 1F1B), on 2 stages. The profiler timeline is
tested in test_profile_trace.py.

The models are tiny so the file runs in seconds on 2 cores. The stages use the first two
devices found, or share one device when there is only one.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import utils  # noqa: F401  (quiets TensorFlow's C++ log before it loads)
from utils import devices, models
from utils.devices import short_device
from utils.lessons import pipeline_parallelism as pp
from utils.lessons.mirrored_strategy import max_abs_diff

DEVICES = devices.compute_devices()
TWO = [DEVICES[0], DEVICES[-1]]  # two devices, or one device twice
GRAD_TOL = 1e-6  # float32 sums in another order; measured differences are ~1e-8
GRID = list(itertools.product(range(1, 6), range(1, 9)))  # (p, m)


def violations(times, p, m):
    """Every way a timeline breaks the rules of a pipeline (empty when valid)."""
    tasks = {(k, s, i) for k in "FB" for s in range(p) for i in range(m)}
    problems = [f"{t} missing" for t in tasks - set(times)] + [f"{t} unknown" for t in set(times) - tasks]
    for task, (start, _) in times.items():
        problems += [f"{task} before {d}" for d in pp.depends_on(task, p) if times[d][1] > start + 1e-12]
    for s in range(p):
        spans = sorted(v for (_, st, _), v in times.items() if st == s)
        problems += [f"stage {s} overlaps" for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1] - 1e-12]
    return problems


@pytest.mark.parametrize("kind", list(pp.SCHEDULES))
def test_every_order_holds_each_task_once_with_forward_before_backward(kind):
    for p, m in GRID:
        order = pp.SCHEDULES[kind](p, m)
        assert len(order) == p
        for s, tasks in enumerate(order):
            assert sorted(tasks) == sorted((k, s, i) for k in "FB" for i in range(m))
            assert all(tasks.index(("F", s, i)) < tasks.index(("B", s, i)) for i in range(m))


@pytest.mark.parametrize("kind", list(pp.SCHEDULES))
def test_simulated_timelines_respect_every_dependency_and_match_the_bubble_formula(kind):
    for p, m in GRID:
        times = pp.simulate(pp.SCHEDULES[kind](p, m))
        assert violations(times, p, m) == []
        assert pp.makespan(times) == 2 * (m + p - 1)
        assert pp.bubble_fraction(times, p) == pytest.approx(pp.ideal_bubble(p, m))


def test_gpipe_stashes_every_micro_batch_and_1f1b_at_most_p_minus_s():
    for p, m in GRID:
        assert pp.peak_in_flight(pp.simulate(pp.gpipe_order(p, m)), p) == [m] * p
        assert pp.peak_in_flight(pp.simulate(pp.one_f_one_b_order(p, m)), p) == [
            min(p - s, m) for s in range(p)]


def test_execution_order_runs_every_task_after_its_inputs():
    for (p, m), kind in itertools.product(GRID, pp.SCHEDULES):
        done = set()
        for task in pp.execution_order(pp.SCHEDULES[kind](p, m)):
            assert all(d in done for d in pp.depends_on(task, p)), (p, m, kind, task)
            done.add(task)
        assert len(done) == 2 * p * m


def test_simulator_with_stage_times_and_communication():
    one_stage = pp.simulate(pp.gpipe_order(1, 3), 2.0, 5.0)
    assert pp.makespan(one_stage) == 3 * (2.0 + 5.0) and pp.bubble_fraction(one_stage, 1) == 0
    naive = pp.simulate(pp.gpipe_order(3, 1), [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], comm=0.5)
    assert pp.makespan(naive) == pytest.approx(6.0 + 12.0 + 4 * 0.5)
    slow_stage = pp.simulate(pp.gpipe_order(2, 4), [1.0, 3.0], [1.0, 3.0])
    assert violations(slow_stage, 2, 4) == [] and pp.bubble_fraction(slow_stage, 2) > pp.ideal_bubble(2, 4)


def test_seed_cnn_is_cut_before_each_layer_with_real_work():
    model = models.build_seed_cnn()
    assert [model.layers[i].name for i in pp.stage_starts(model, 4)] == ["conv1", "conv2", "conv3", "dense1"]


def small_cnn(seed: int = 0) -> keras.Sequential:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
        keras.layers.MaxPooling2D(2, name="p1"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(8, activation="tanh", name="d1"),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ])


def batch(n: int = 8):
    rng = np.random.default_rng(1)
    return tf.constant(rng.normal(size=(n, 8, 8, 2)).astype("float32")), tf.constant(rng.integers(0, 3, n))


def test_split_model_places_each_stage_on_its_device_and_keeps_the_weights():
    model = small_cnn()
    stages = pp.split_model(model, [0, 3], TWO)
    assert [len(st.layers) for st in stages] == [3, 2]
    assert max_abs_diff(model.weights, [w for st in stages for w in st.weights]) == 0
    for stage, dev in zip(stages, TWO, strict=True):
        assert {short_device(v.value.device) for v in stage.weights} == {short_device(dev)}


@pytest.mark.parametrize("kind", list(pp.SCHEDULES))
@pytest.mark.parametrize("m", [1, 2, 4])
def test_pipeline_gradients_equal_the_unsplit_model_on_two_stages(kind, m):
    model = small_cnn()
    stages = pp.split_model(model, [0, 3], TWO)
    x, y = batch()
    log = []
    loss, grads = pp.pipeline_pass(stages, TWO, x, y, pp.execution_order(pp.SCHEDULES[kind](2, m)), log=log)
    ref_loss, ref_grads = pp.unsplit_gradients(model, x, y)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    assert max_abs_diff(ref_grads, grads) <= GRAD_TOL
    assert len(log) == 4 * m
    peak = {s: max(held for (_, st, _), *_, held in log if st == s) for s in (0, 1)}
    assert peak == {0: m if kind == "gpipe" else min(2, m), 1: m if kind == "gpipe" else 1}
    _, same_micro_batches = pp.unsplit_gradients(model, x, y, m)
    assert max_abs_diff(same_micro_batches, grads) <= GRAD_TOL


@pytest.mark.parametrize("kind", list(pp.SCHEDULES))
def test_compiled_steps_update_the_weights_like_the_unsplit_model(kind):
    model = small_cnn()
    stages = pp.split_model(model, [0, 3], TWO)
    x, y = batch()
    pipe_step = pp.make_pipeline_step(stages, TWO, 4, kind, optimizer=keras.optimizers.SGD(0.1))
    unsplit_step = pp.make_unsplit_step(model, optimizer=keras.optimizers.SGD(0.1))
    for _ in range(2):
        loss_p, grads_p = pipe_step(x, y)
        loss_u, grads_u = unsplit_step(x, y)
        assert abs(float(loss_p) - float(loss_u)) <= 1e-5
        assert max_abs_diff(grads_u, grads_p) <= GRAD_TOL
    assert max_abs_diff(model.trainable_variables, [v for st in stages for v in st.trainable_variables]) <= 1e-6
    assert pipe_step.experimental_get_tracing_count() == 1
