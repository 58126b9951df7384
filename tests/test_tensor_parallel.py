"""Tests of utils.lessons.tensor_parallelism (the #@save code of notebook 07).

Meshes, sharding round trips, and the column/row-parallel layers equal to one device. The
process has a fixed set of devices (4 logical CPUs by default, or ``$SERIES_NUM_CPUS``):
every test runs on the mesh sizes that fit the devices it finds, with layer sizes that
those sizes divide, so nothing skips for another device count.
"""

from __future__ import annotations

import utils  # noqa: F401  (quiets TF's C++ log before TensorFlow loads)
from utils import devices

devices.setup_devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

from utils.lessons import tensor_parallelism as tp  # noqa: E402
from utils.lessons.mirrored_strategy import max_rel_diff  # noqa: E402

TOL = 1e-5  # float32, sums of a few dozen terms of size ~1: rounding is ~1e-6
AVAILABLE = len(devices.compute_devices())
SIZES = sorted({n for n in (1, 2, 3, 4, 8) if n <= AVAILABLE} | {AVAILABLE})


def _keras_mlp(in_features: int, hidden: int, classes: int, dtype: str = "float32", seed: int = 3):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((in_features,), dtype=dtype),
            keras.layers.Dense(hidden, activation="relu", name="dense1", dtype=dtype),
            keras.layers.Dense(classes, name="output", dtype=dtype),
        ]
    )
    # Non-zero biases, so that a bias added once per device is caught.
    rng = np.random.default_rng(seed)
    model.set_weights(
        [w if w.ndim == 2 else rng.normal(size=w.shape).astype(dtype) for w in model.get_weights()]
    )
    return model


def _data(n: int = 8, in_features: int = 24, classes: int = 6, dtype: str = "float32"):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, in_features)).astype(dtype), rng.integers(0, classes, n).astype("int32")


@pytest.mark.parametrize("n", SIZES)
def test_model_mesh_uses_the_first_n_devices(n):
    mesh = tp.model_mesh(n)
    assert mesh.dim_names == ["model"] and mesh.shape() == [n]
    table = tp.mesh_table(mesh)
    assert table["device"].tolist() == [devices.short_device(d) for d in devices.compute_devices()[:n]]
    assert table["model index"].tolist() == list(range(n))


def test_two_dim_mesh_is_row_major():
    batch = 2 if AVAILABLE >= 2 else 1
    model = AVAILABLE // batch
    table = tp.mesh_table(tp.create_mesh([("batch", batch), ("model", model)]))
    assert table["batch index"].tolist() == [b for b in range(batch) for _ in range(model)]
    assert table["model index"].tolist() == list(range(model)) * batch


@pytest.mark.parametrize("n", SIZES)
def test_shard_round_trip_and_block_shapes(n):
    mesh = tp.model_mesh(n)
    value = np.arange(n * 2 * n * 3, dtype=np.float32).reshape(n, 2 * n, 3)
    for specs, block in [
        ((None, "model", None), (n, 2, 3)),
        (("model", None, None), (1, 2 * n, 3)),
        ((None, None, None), (n, 2 * n, 3)),
    ]:
        t = tp.shard(value, tp.layout(mesh, *specs))
        np.testing.assert_array_equal(tp.to_numpy(t), value)
        assert [s for _, s in tp.shard_shapes(t)] == [block] * n
        assert tp.spec_string(t) == "[" + ", ".join(s or "unsharded" for s in specs) + "]"
    # The column layout puts columns 2i, 2i+1 on device i.
    blocks = dtensor.unpack(tp.shard(value, tp.layout(mesh, None, "model", None)))
    np.testing.assert_array_equal(blocks[-1].numpy(), value[:, 2 * n - 2 :, :])
    assert tp.spec_string(value) == "ordinary tensor"


def test_shard_round_trip_on_two_dim_mesh():
    batch = 2 if AVAILABLE >= 2 else 1
    mesh = tp.create_mesh([("batch", batch), ("model", AVAILABLE // batch)])
    value = np.arange(batch * 3 * AVAILABLE, dtype=np.float32).reshape(batch * 3, AVAILABLE)
    t = tp.shard(value, tp.layout(mesh, "batch", "model"))
    np.testing.assert_array_equal(tp.to_numpy(t), value)
    assert set(tp.shard_shapes(t)[0][1]) <= {3, batch}


def test_non_dividing_size_is_a_clear_error():
    mesh = tp.model_mesh(AVAILABLE)
    if AVAILABLE == 1:  # everything divides 1
        tp.shard(np.zeros((3, 5)), tp.layout(mesh, None, "model"))
        return
    with pytest.raises(ValueError):
        tp.shard(np.zeros((3, AVAILABLE + 1)), tp.layout(mesh, None, "model"))
    with pytest.raises(ValueError):
        tp.ColumnParallelDense(np.zeros((4, AVAILABLE + 1)), np.zeros(AVAILABLE + 1), mesh)


@pytest.mark.parametrize("n", SIZES)
def test_mlp_forward_and_gradients_equal_keras(n):
    """Forward, every weight gradient and the input gradient (the backward all-reduce)."""
    hidden = 4 * n
    model = _keras_mlp(24, hidden, 6)
    mlp = tp.ShardedMLP.from_keras(model.get_layer("dense1"), model.get_layer("output"), tp.model_mesh(n))
    assert [tp.spec_string(w) for w in mlp.weights().values()] == [
        "[unsharded, model]", "[model]", "[model, unsharded]", "[unsharded]",
    ]  # fmt: skip
    x, y = _data()
    xs, ys = tp.shard(x, mlp.input_layout), tp.shard(y, tp.layout(mlp.mesh, None))
    assert max_rel_diff(tp.to_numpy(mlp(xs)), model(x)) <= TOL
    assert tp.spec_string(mlp.column(xs)) == "[unsharded, model]"

    @tf.function
    def grads(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tp.sparse_cross_entropy(mlp(x), y)
        return loss, tape.gradient(loss, [x, *mlp.weights().values()])

    loss, got = grads(xs, ys)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ref_loss = tp.sparse_cross_entropy(model(xt), y)
    want = tape.gradient(ref_loss, [xt, *model.trainable_variables])
    assert max_rel_diff(tp.to_numpy(loss), ref_loss) <= TOL
    assert tp.spec_string(got[0]) == "[unsharded, unsharded]"
    for g, w, ref in zip(got[1:], mlp.weights().values(), want[1:], strict=True):
        assert tp.spec_string(g) == tp.spec_string(w)
        assert max_rel_diff(tp.to_numpy(g), ref) <= TOL
    assert max_rel_diff(tp.to_numpy(got[0]), want[0]) <= TOL


def test_float64_training_equals_one_device_step_for_step():
    model = _keras_mlp(24, 4 * AVAILABLE, 6, dtype="float64")
    mlp = tp.ShardedMLP.from_keras(
        model.get_layer("dense1"), model.get_layer("output"), tp.model_mesh(AVAILABLE)
    )
    assert tp.to_numpy(mlp.column.kernel).dtype == np.float64
    ref_step, step = tp.make_sgd_step(model, 0.1), tp.make_sgd_step(mlp, 0.1)
    for seed in range(4):
        x, y = _data(dtype="float64")
        x = x + seed
        xs, ys = tp.shard(x, mlp.input_layout), tp.shard(y, tp.layout(mlp.mesh, None))
        loss, ref_loss = float(tp.to_numpy(step(xs, ys))), float(ref_step(x, y))
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
        assert max_rel_diff(mlp.get_weights(), model.get_weights()) <= 1e-12


def test_batch_by_model_mesh():
    """The layers on a 2-D mesh (notebook 08): inputs split over batch, units over model."""
    batch = 2 if AVAILABLE >= 2 else 1
    model_size = AVAILABLE // batch
    mesh = tp.create_mesh([("batch", batch), ("model", model_size)])
    model = _keras_mlp(24, 4 * model_size, 6)
    k1, b1, k2, b2 = model.get_weights()
    column = tp.ColumnParallelDense(k1, b1, mesh, "relu", batch_dim="batch", name="dense1")
    row = tp.RowParallelDense(k2, b2, mesh, batch_dim="batch", name="output")
    mlp = tp.ShardedMLP(column, row)
    x, _ = _data()
    out = mlp(tp.shard(x, mlp.input_layout))
    assert tp.spec_string(out) == "[batch, unsharded]"
    assert max_rel_diff(tp.to_numpy(out), model(x)) <= TOL


def test_create_gives_the_same_weights_on_every_mesh_size():
    hidden = 4 * AVAILABLE
    one = tp.ShardedMLP.create(12, hidden, 5, tp.model_mesh(1), seed=7)
    many = tp.ShardedMLP.create(12, hidden, 5, tp.model_mesh(AVAILABLE), seed=7)
    for a, b in zip(one.get_weights(), many.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [w.shape for w in many.get_weights()] == [(12, hidden), (hidden,), (hidden, 5), (5,)]


def test_sparse_cross_entropy_equals_keras():
    x, y = _data(classes=6)
    logits = x[:, :6]
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert abs(float(tp.sparse_cross_entropy(logits, y)) - float(ref)) <= 1e-6


@pytest.mark.parametrize(
    ("name", "op_type", "phase"),
    [
        ("replica_1/widened_cnn_1/conv2_1/Relu", "_MklNativeFusedConv2D", "forward"),
        ("tf.StatefulPartitionedCall/gradient_tape/dense1/MatMul", "_MklMatMul", "backward"),
        ("tf.StatefulPartitionedCall/update/AssignSubVariableOp_3", "AssignSubVariableOp", "update"),
        ("adam/update_2_8/Sub_3", "Sub", "update"),  # Keras 3's Adam, one scope per variable
        ("adam/concat_2", "ConcatV2", "communicate"),  # Keras packs the gradients for one all-reduce
        ("adam/CollectiveReduceV2_1", "CollectiveReduceV2", "communicate"),
        ("tf.StatefulPartitionedCall/gradient_tape/Conv2DBackpropFilter/DTensorAllReduceOp/CombinedReduceUpdateSlice",
         "TensorStridedSliceUpdate", "communicate"),
    ],
)  # fmt: skip
def test_phase_of_names_the_phase_from_op_names(name, op_type, phase):
    assert tp.phase_of(name, op_type) == phase


def test_trace_step_reads_every_phase_of_a_sharded_step_from_the_profiler(tmp_path):
    n = max(s for s in SIZES if 8 % s == 0)
    mesh = tp.model_mesh(n)
    mlp = tp.ShardedMLP.create(16, 8, 4, mesh, seed=0)
    x = tp.shard(np.random.default_rng(0).normal(size=(8, 16)).astype("float32"), tp.layout(mesh, None, None))
    y = tp.shard(np.arange(8, dtype="int32") % 4, tp.layout(mesh, None))
    ops = tp.trace_step(tp.make_sgd_step(mlp, 0.1), (x, y), tmp_path / "trace")
    assert list(tmp_path.glob("trace/**/*.xplane.pb"))  # the trace file is where it was asked for
    table, wall, parallel = tp.phase_table(ops)
    expected = {"forward", "backward", "update"} | ({"communicate"} if n > 1 else set())
    assert set(table.index) == expected
    assert (ops["end_ms"] >= ops["start_ms"]).all() and ops["start_ms"].min() == 0
    assert wall == pytest.approx(ops["end_ms"].max()) and parallel > 0
    assert table["ops"].sum() == len(ops) and table["share"].sum() == pytest.approx(1.0)
