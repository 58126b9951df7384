"""Tests of utils.tensor_parallel: meshes, sharding round trips, sharded layers equal to one device.

The process has a fixed set of logical devices (4 CPUs by default, created by
``setup_devices()`` here or in conftest); meshes over N in {1, 2, 4} use the first N.
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

from utils import tensor_parallel as tp  # noqa: E402

FWD_TOL = 1e-5  # float32, sums of <= 64 terms of size ~1: rounding is ~1e-6
GRAD_TOL = 1e-5
N_VALUES = (1, 2, 4)


def _need(n: int) -> None:
    if len(devices.compute_devices()) < n:
        pytest.skip(f"needs {n} devices, this process has {len(devices.compute_devices())}")


def _reference_mlp(in_features: int = 24, hidden: int = 16, classes: int = 6, seed: int = 3):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((in_features,)),
            keras.layers.Dense(hidden, activation="relu", name="dense1"),
            keras.layers.Dense(classes, name="output"),
        ]
    )
    # Non-zero biases so a misplaced bias (e.g. added once per device) is caught.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        k, b = layer.get_weights()
        layer.set_weights([k, rng.normal(size=b.shape).astype("float32")])
    return model


def _data(n: int = 8, in_features: int = 24, classes: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_features)).astype("float32")
    y = rng.integers(0, classes, size=n).astype("int32")
    return x, y


# --------------------------------------------------------------------------- meshes


def test_model_mesh_uses_first_n_devices():
    for n in N_VALUES:
        _need(n)
        mesh = tp.model_mesh(n)
        assert mesh.dim_names == ["model"]
        assert mesh.shape() == [n]
        table = tp.mesh_table(mesh)
        expected = [tp._short(d) for d in devices.compute_devices()[:n]]
        assert table["device"].tolist() == expected
        assert table["model index"].tolist() == list(range(n))


def test_create_mesh_two_dims_row_major():
    _need(4)
    mesh = tp.create_mesh({"batch": 2, "model": 2})
    table = tp.mesh_table(mesh)
    assert table["batch index"].tolist() == [0, 0, 1, 1]
    assert table["model index"].tolist() == [0, 1, 0, 1]


def test_create_mesh_too_big_is_a_clear_error():
    available = len(devices.compute_devices())
    with pytest.raises(ValueError, match=rf"needs {2 * available} devices but only {available}"):
        tp.create_mesh([("batch", 2), ("model", available)])


@pytest.mark.parametrize(
    "dims, match",
    [
        ([], "at least one dim"),
        ([("model", 0)], "size >= 1"),
        ([("model", 1), ("model", 1)], "unique"),
        ([("", 1)], "non-empty"),
        ([("model", 1.5)], "whole-number"),
    ],
)
def test_create_mesh_bad_dims(dims, match):
    with pytest.raises(ValueError, match=match):
        tp.create_mesh(dims)


def test_create_mesh_explicit_devices_must_match():
    _need(2)
    with pytest.raises(ValueError, match="needs exactly 1 devices, but 2 were given"):
        tp.create_mesh([("model", 1)], devices=devices.compute_devices()[:2])


def test_layout_rejects_unknown_dim_and_reuse():
    mesh = tp.model_mesh(1)
    with pytest.raises(ValueError, match="'batch' is not a dim of this mesh"):
        tp.layout(mesh, "batch", None)
    with pytest.raises(ValueError, match="only one tensor axis"):
        tp.layout(mesh, "model", "model")


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("n", N_VALUES)
def test_shard_round_trip_and_shard_shapes(n):
    _need(n)
    mesh = tp.model_mesh(n)
    value = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    for specs, shard_shape in [
        ((None, "model"), (8, 12 // n)),
        (("model", None), (8 // n, 12)),
        ((None, None), (8, 12)),
    ]:
        t = tp.shard(value, tp.layout(mesh, *specs))
        assert dtensor.fetch_layout(t).sharding_specs == [s or dtensor.UNSHARDED for s in specs]
        shapes = tp.shard_shapes(t)
        assert [d for d, _ in shapes] == tp.mesh_table(mesh)["device"].tolist()
        assert {s for _, s in shapes} == {shard_shape}
        np.testing.assert_array_equal(tp.to_numpy(t), value)
    # The first device holds the first slice, the last device the last one.
    t = tp.shard(value, tp.layout(mesh, None, "model"))
    first, last = dtensor.unpack(t)[0].numpy(), dtensor.unpack(t)[-1].numpy()
    np.testing.assert_array_equal(first, value[:, : 12 // n])
    np.testing.assert_array_equal(last, value[:, 12 - 12 // n :])


def test_shard_round_trip_two_dim_mesh():
    _need(4)
    mesh = tp.create_mesh([("batch", 2), ("model", 2)])
    value = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    t = tp.shard(value, tp.layout(mesh, "batch", "model"))
    assert {s for _, s in tp.shard_shapes(t)} == {(2, 3)}
    np.testing.assert_array_equal(dtensor.unpack(t)[1].numpy(), value[:2, 3:])
    np.testing.assert_array_equal(tp.to_numpy(t), value)


def test_shard_non_dividing_is_a_clear_error():
    _need(4)
    mesh = tp.model_mesh(4)
    with pytest.raises(ValueError, match=r"10 is not divisible by 4.*one of \[1, 2, 5, 10\]"):
        tp.shard(np.zeros((3, 10), np.float32), tp.layout(mesh, None, "model"))
    with pytest.raises(ValueError, match="rank 1"):
        tp.shard(np.zeros(8, np.float32), tp.layout(mesh, None, "model"))


# --------------------------------------------------------------------------- dense layers


@pytest.mark.parametrize("n", N_VALUES)
def test_column_and_row_dense_match_numpy(n):
    _need(n)
    mesh = tp.model_mesh(n)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 12)).astype("float32")
    k1, b1 = rng.normal(size=(12, 8)).astype("float32"), rng.normal(size=8).astype("float32")
    k2, b2 = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=3).astype("float32")
    col = tp.ColumnParallelDense(k1, b1, mesh, activation="relu")
    row = tp.RowParallelDense(k2, b2, mesh)
    h = col(x)
    assert tp.spec_string(h) == "[unsharded, model]"
    assert {s for _, s in tp.shard_shapes(h)} == {(5, 8 // n)}
    out = row(h)
    assert tp.spec_string(out) == "[unsharded, unsharded]"
    h_ref = np.maximum(x @ k1 + b1, 0)
    assert tp.max_abs_diff(h, h_ref) <= FWD_TOL
    assert tp.max_abs_diff(out, h_ref @ k2 + b2) <= FWD_TOL
    # The all-reduce by hand: partial sums add up to the output; with n > 1 none alone does.
    partials = [p.numpy() for p in row.partial_sums(h)]
    assert len(partials) == n
    np.testing.assert_allclose(sum(partials) + b2, tp.to_numpy(out), atol=FWD_TOL)
    if n > 1:
        assert all(np.max(np.abs(p + b2 - tp.to_numpy(out))) > 1e-2 for p in partials)


@pytest.mark.parametrize("n", N_VALUES)
def test_mlp_forward_and_gradients_equal_keras(n):
    _need(n)
    ref = _reference_mlp()
    x, y = _data()
    mlp = tp.ShardedMLP.from_keras(
        ref.get_layer("dense1"), ref.get_layer("output"), tp.model_mesh(n)
    )
    assert tp.max_abs_diff(mlp(x), ref(x)) <= FWD_TOL

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        ref_loss = loss_fn(y, ref(x))
    ref_grads = tape.gradient(ref_loss, ref.trainable_variables)

    xs = tp.shard(x, mlp.input_layout)
    ys = tp.shard(y, tp.layout(mlp.mesh, None))

    @tf.function
    def grads(xs, ys):
        with tf.GradientTape() as tape:
            loss = tp.sparse_cross_entropy(mlp(xs), ys)
        return loss, tape.gradient(
            loss, [mlp.column.kernel, mlp.column.bias, mlp.row.kernel, mlp.row.bias]
        )

    loss, sharded_grads = grads(xs, ys)
    assert abs(float(tp.to_numpy(loss)) - float(ref_loss)) <= FWD_TOL
    for g, w in zip(
        sharded_grads,
        [mlp.column.kernel, mlp.column.bias, mlp.row.kernel, mlp.row.bias],
        strict=True,
    ):
        # Each gradient lives where its weight lives: sharded the same way.
        assert dtensor.fetch_layout(g).sharding_specs == dtensor.fetch_layout(w).sharding_specs
    for g, rg in zip(sharded_grads, ref_grads, strict=True):
        assert tp.max_abs_diff(g, rg) <= GRAD_TOL


@pytest.mark.parametrize("n", N_VALUES)
def test_training_matches_single_device_step_for_step(n):
    _need(n)
    steps, lr = 4, 0.125
    x, y = _data(n=16)
    ref = _reference_mlp()
    mlp = tp.ShardedMLP.from_keras(
        ref.get_layer("dense1"), ref.get_layer("output"), tp.model_mesh(n)
    )
    log = tp.compare_sgd_training(ref, mlp, [(x, y)] * steps, lr)
    assert log["step"].tolist() == list(range(steps))
    assert log["loss one device"].iloc[-1] < log["loss one device"].iloc[0]  # it really trains
    assert log["|loss diff|"].max() <= 1e-5
    assert log["weights rel diff"].max() <= 1e-5
    for got, want in zip(mlp.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_float64_training_agrees_to_float64_rounding():
    _need(4)
    ref32 = _reference_mlp()
    ref = keras.Sequential(
        [
            keras.Input((24,), dtype="float64"),
            keras.layers.Dense(16, activation="relu", name="dense1", dtype="float64"),
            keras.layers.Dense(6, name="output", dtype="float64"),
        ]
    )
    ref.set_weights([w.astype("float64") for w in ref32.get_weights()])
    mlp = tp.ShardedMLP.from_keras(
        ref.get_layer("dense1"), ref.get_layer("output"), tp.model_mesh(4)
    )
    assert mlp.dtype == tf.float64 and mlp.row.kernel.dtype == tf.float64
    x, y = _data(n=16)
    log = tp.compare_sgd_training(ref, mlp, [(x, y)] * 4, 0.125)
    assert log["weights rel diff"].max() <= 1e-12
    assert log["|loss diff|"].max() <= 1e-6  # Keras reports the loss as a float32 metric
    with pytest.raises(ValueError, match="not exactly representable in float32"):
        tp.compare_sgd_training(ref, mlp, [(x, y)], 0.1)


def test_compare_training_rejects_different_start():
    ref = _reference_mlp()
    mlp = tp.ShardedMLP.create(24, 16, 6, tp.model_mesh(1))
    with pytest.raises(ValueError, match="start from different weights"):
        tp.compare_sgd_training(ref, mlp, [_data()], 0.125)


def test_mlp_on_batch_by_model_mesh():
    _need(4)
    ref = _reference_mlp()
    x, _ = _data()
    mesh = tp.create_mesh([("batch", 2), ("model", 2)])
    mlp = tp.ShardedMLP.from_keras(
        ref.get_layer("dense1"), ref.get_layer("output"), mesh, batch_dim="batch"
    )
    acts = mlp.activations(x)
    assert tp.spec_string(acts["input x"]) == "[batch, unsharded]"
    assert tp.spec_string(acts["dense1 output (hidden)"]) == "[batch, model]"
    assert {s for _, s in tp.shard_shapes(acts["dense1 output (hidden)"])} == {(4, 8)}
    out = mlp(x)
    assert tp.spec_string(out) == "[batch, unsharded]"
    assert tp.max_abs_diff(out, ref(x)) <= FWD_TOL


def test_create_is_independent_of_mesh_size_and_round_trips_to_keras():
    _need(4)
    a = tp.ShardedMLP.create(12, 8, 3, tp.model_mesh(1), seed=7)
    b = tp.ShardedMLP.create(12, 8, 3, tp.model_mesh(4), seed=7)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    ref = _reference_mlp(in_features=12, hidden=8, classes=3)
    b.to_keras(ref.get_layer("dense1"), ref.get_layer("output"))
    x = np.random.default_rng(0).normal(size=(4, 12)).astype("float32")
    assert tp.max_abs_diff(b(x), ref(x)) <= FWD_TOL


def test_non_dividing_units_is_a_clear_error():
    _need(4)
    mesh = tp.model_mesh(4)
    with pytest.raises(
        ValueError, match=r"the 10 output units .* 'head'.*not divisible by 4.*pad to 12"
    ):
        tp.ColumnParallelDense.create(16, 10, mesh, name="head")
    with pytest.raises(ValueError, match=r"the 6 input features .* not divisible by 4"):
        tp.RowParallelDense.create(6, 4, mesh)


def test_dense_bad_input_errors():
    mesh = tp.model_mesh(1)
    with pytest.raises(ValueError, match="'batch' is not a dim"):
        tp.ColumnParallelDense.create(4, 4, mesh, batch_dim="batch")
    with pytest.raises(ValueError, match="bias must have shape"):
        tp.ColumnParallelDense(np.zeros((4, 4)), np.zeros(3), mesh)
    with pytest.raises(ValueError, match="Unknown activation"):
        tp.ColumnParallelDense.create(4, 4, mesh, activation="softmax")
    soft = keras.layers.Dense(4, activation="softmax")
    soft.build((None, 4))
    relu = keras.layers.Dense(4, activation="relu")
    relu.build((None, 4))
    with pytest.raises(ValueError, match="must be linear"):
        tp.ShardedMLP.from_keras(relu, soft, mesh)
    with pytest.raises(ValueError, match="not built"):
        tp.ColumnParallelDense.from_keras(keras.layers.Dense(3), mesh)


# --------------------------------------------------------------------------- memory


def test_bytes_per_device_from_actual_shards():
    _need(4)
    mlp = tp.ShardedMLP.create(16, 8, 3, tp.model_mesh(4))
    table = tp.bytes_per_device(mlp.weights()).set_index("weight")
    dev_cols = [f"CPU:{i}" for i in range(4)] if devices.device_kind() != "GPU" else None
    if dev_cols is None:
        pytest.skip("device names differ on GPU")
    assert table.loc["dense1/kernel", "total"] == 16 * 8 * 4
    assert table.loc["dense1/kernel", dev_cols].tolist() == [16 * 8 * 4 // 4] * 4
    assert table.loc["output/kernel", dev_cols].tolist() == [8 * 3 * 4 // 4] * 4
    assert table.loc["output/bias", dev_cols].tolist() == [3 * 4] * 4  # replicated
    assert table.loc["dense1/kernel", "per device / total"] == "0.250"
    assert table.loc["output/bias", "per device / total"] == "1.000"
    assert table.loc["TOTAL", "CPU:0"] == sum(table.loc[w, "CPU:0"] for w in mlp.weights())


# --------------------------------------------------------------------------- convolution


@pytest.mark.parametrize("n", N_VALUES)
def test_channel_sharded_conv_equals_keras(n):
    _need(n)
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="conv")
    x = np.random.default_rng(0).random((2, 10, 10, 3)).astype("float32")
    conv(x)  # build
    conv.set_weights([conv.kernel.numpy(), np.linspace(-0.5, 0.5, 8).astype("float32")])
    ref = conv(x)
    sharded = tp.ChannelShardedConv2D.from_keras(conv, devices.compute_devices()[:n])
    shapes = tp.shard_shapes(sharded.weights()["conv/kernel"])
    assert [s for _, s in shapes] == [(3, 3, 3, 8 // n)] * n
    assert [d for d, _ in shapes] == [tp._short(d) for d in devices.compute_devices()[:n]]
    parts = sharded.partial_outputs(x)
    assert [tuple(p.shape) for p in parts] == [(2, 10, 10, 8 // n)] * n
    assert tp.max_abs_diff(sharded(x), ref) <= FWD_TOL

    with tf.GradientTape() as tape:
        ref_loss = tf.reduce_sum(conv(x) ** 2)
    ref_grads = tape.gradient(ref_loss, [conv.kernel, conv.bias])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(sharded(x) ** 2)
    g = tape.gradient(loss, sharded.kernels + sharded.biases)
    got_kernel = np.concatenate([t.numpy() for t in g[:n]], axis=-1)
    got_bias = np.concatenate([t.numpy() for t in g[n:]])
    scale = float(np.max(np.abs(ref_grads[0].numpy())))
    assert tp.max_abs_diff(got_kernel, ref_grads[0]) <= GRAD_TOL * scale
    assert tp.max_abs_diff(got_bias, ref_grads[1]) <= GRAD_TOL * scale


def test_channel_sharded_conv_non_dividing_is_a_clear_error():
    _need(4)
    with pytest.raises(
        ValueError, match=r"Cannot split 6 output channels over 4 devices.*\[1, 2, 3, 6\]"
    ):
        tp.ChannelShardedConv2D(np.zeros((3, 3, 3, 6)), None, devices.compute_devices()[:4])


def test_channel_sharded_conv_round_trips_to_keras():
    _need(2)
    kernel = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype("float32")
    bias = np.arange(4, dtype=np.float32)
    sharded = tp.ChannelShardedConv2D(kernel, bias, devices.compute_devices()[:2])
    layer = keras.layers.Conv2D(4, 3)
    layer.build((None, 8, 8, 2))
    sharded.to_keras(layer)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    np.testing.assert_array_equal(layer.bias.numpy(), bias)


def test_max_rel_diff_is_relative_to_the_reference():
    ref = np.array([0.0, -4.0, 2.0])
    assert tp.max_rel_diff(ref + np.array([0.0, 0.0, 0.04]), ref) == pytest.approx(0.01)
    assert tp.max_rel_diff(np.array([0.5]), np.zeros(1)) == pytest.approx(0.5)


def test_max_abs_diff_shape_mismatch():
    with pytest.raises(ValueError, match="Shapes differ"):
        tp.max_abs_diff(np.zeros(3), np.zeros(4))
