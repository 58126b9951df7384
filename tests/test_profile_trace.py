"""Tests of notebook 06's profiler timeline (utils.lessons.pipeline_parallelism): capture one
compiled step of a tiny 2-stage pipeline, read its ops from the XSpace trace, and measure
busy time and overlap. The stages use the first and last devices found (one device twice
when there is only one).
"""

from __future__ import annotations

import pandas as pd
import pytest
from test_parallel import batch, small_cnn

import utils  # noqa: F401  (quiets TensorFlow's C++ log before it loads)
from utils import devices
from utils.lessons import pipeline_parallelism as pp

DEVICES = devices.compute_devices()
TWO = [DEVICES[0], DEVICES[-1]]
M = 4


def test_busy_and_overlap_merges_each_stages_ops_and_finds_the_gaps():
    intervals = pd.DataFrame({
        "stage": [0, 0, 0, 1, 1],
        "start_ms": [0.0, 1.0, 5.0, 2.0, 2.5],
        "end_ms": [2.0, 3.0, 6.0, 8.0, 4.0],  # stage 0: [0, 3] and [5, 6]; stage 1: [2, 8]
    })
    table, wall, overlap = pp.busy_and_overlap(intervals)
    assert wall == 8.0
    assert table["busy ms"].tolist() == [4.0, 6.0]
    assert table["idle ms"].tolist() == [4.0, 2.0]
    assert table["longest idle gap ms"].tolist() == [2.0, 2.0]
    assert overlap == pytest.approx(10.0 / 8.0)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """One captured compiled step per schedule: {kind: op intervals}."""
    model = small_cnn()
    stages = pp.split_model(model, [0, 3], TWO)
    x, y = batch(16)
    out = {}
    for kind in [*pp.SCHEDULES, "gpipe strict"]:
        logdir = tmp_path_factory.mktemp(kind.replace(" ", "_"))
        step = pp.make_pipeline_step(stages, TWO, M, kind.split()[0], strict=kind.endswith("strict"))
        assert pp.capture_trace(step, x, y, logdir) == logdir
        out[kind] = pp.op_intervals(logdir)
    return out


@pytest.mark.parametrize("kind", [*pp.SCHEDULES, "gpipe strict"])
def test_the_trace_holds_the_ops_of_every_task(traces, kind):
    ops = traces[kind]
    assert list(ops.columns) == ["stage", "kind", "micro_batch", "name", "start_ms", "end_ms"]
    assert set(ops.groupby(["stage", "kind", "micro_batch"]).groups) == {
        (s, k, i) for s in (0, 1) for k in "FB" for i in range(M)}
    assert ops["start_ms"].min() == 0 and (ops["end_ms"] >= ops["start_ms"]).all()
    table, wall, overlap = pp.busy_and_overlap(ops)
    assert list(table.index) == [0, 1]
    assert ((table["busy ms"] > 0) & (table["busy ms"] <= wall + 1e-9)).all()
    assert (table["busy ms"] + table["idle ms"]).tolist() == pytest.approx([wall, wall])
    assert 0 < overlap <= 2 + 1e-9


def test_the_compiled_steps_keep_each_stages_order(traces):
    """GPipe: stage 0 runs every forward before any backward. 1F1B on 2 stages: stage 0's
    backward of micro-batch 0 ends before its forward of micro-batch 2 starts."""
    def task(ops, kind, i):
        own = ops[(ops["stage"] == 0) & (ops["kind"] == kind) & (ops["micro_batch"] == i)]
        return own["start_ms"].min(), own["end_ms"].max()

    gpipe, f1b = traces["gpipe"], traces["1f1b"]
    assert task(gpipe, "F", M - 1)[1] <= task(gpipe, "B", 0)[0]
    assert task(f1b, "B", 0)[1] <= task(f1b, "F", 2)[0]


def test_a_strict_chain_runs_each_stages_tasks_one_after_another(traces):
    """strict=True: every task of a stage starts after the stage's previous task has ended.

    Variable reads and cross-device sends/receives (``.../_12``) carry no control inputs, so
    only the ops that compute are compared."""
    ops = traces["gpipe strict"]
    ops = ops[~ops["name"].str.contains(r"ReadVariableOp$|/_\d+$")]
    for s in (0, 1):
        own = ops[ops["stage"] == s].groupby(["kind", "micro_batch"])
        spans = own["start_ms"].min().to_frame("start").join(own["end_ms"].max().rename("end"))
        order = [t for t in pp.execution_order(pp.gpipe_order(2, M)) if t[1] == s]
        ends = [spans.loc[(k, i), "end"] for k, _, i in order]
        starts = [spans.loc[(k, i), "start"] for k, _, i in order]
        assert all(e <= s2 for e, s2 in zip(ends, starts[1:], strict=False))

