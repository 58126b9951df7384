"""Tests for notebook 10's compression code (utils.lessons.model_compression) and its
LiteRT/size infrastructure (utils.compression)."""

from __future__ import annotations

import gzip

import keras
import numpy as np
import pytest
import tensorflow as tf

from utils import compression as C
from utils import devices
from utils.lessons import model_compression as mc
from utils.models import build_seed_cnn


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Small learnable data: the label is which quarter of the image is brightest."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, size=(256, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 4, size=256)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += 150
    return x, y.astype(np.int64)


def compile_adam(model: keras.Model, learning_rate: float) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def trained(data) -> keras.Model:
    """A tiny seed CNN trained for a few epochs (so quantization has real ranges)."""
    keras.utils.set_random_seed(1)
    x, y = data
    model = compile_adam(build_seed_cnn(width=0.25, num_classes=4, name="tiny"), 3e-3)
    model.fit(x / 255.0, y, epochs=4, batch_size=32, verbose=0)
    return model


def copy_of(model: keras.Model) -> keras.Model:
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def dataset(x: np.ndarray, y: np.ndarray, batch: int = 32) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x.astype(np.float32) / 255.0, y)).batch(batch)


def kernel_sparsity(model: keras.Model) -> dict[str, float]:
    return {name: float(np.mean(keras.ops.convert_to_numpy(k) == 0)) for name, k in mc.prunable_kernels(model)}


# ----------------------------------------------------------------------------- pruning
def test_magnitude_mask_zeroes_exactly_the_smallest() -> None:
    w = np.array([[0.5, -0.1], [0.05, -2.0]], dtype=np.float32)
    np.testing.assert_array_equal(mc.magnitude_mask(w, 0.5), [[1, 0], [0, 1]])
    assert mc.magnitude_mask(w, 0.0).all()


def test_magnitude_mask_count_is_exact_with_ties() -> None:
    w = np.zeros((10, 10), dtype=np.float32)  # all ties
    assert int((mc.magnitude_mask(w, 0.3) == 0).sum()) == 30


def test_prunable_kernels_are_the_conv_and_dense_kernels() -> None:
    model = build_seed_cnn(width=0.25)
    names = [name for name, _ in mc.prunable_kernels(model)]
    assert names == ["conv1", "conv2", "conv3", "dense1", "output"]
    assert sum(int(np.prod(k.shape)) for _, k in mc.prunable_kernels(model)) < model.count_params()


def test_polynomial_schedule_shape() -> None:
    values = [mc.polynomial_sparsity(s, 0.8, end_step=100) for s in (0, 25, 50, 100, 200)]
    assert values[0] == 0.0 and values[-2] == pytest.approx(0.8) and values[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(values[:3], values[1:4], strict=True))
    # cubic: most of the pruning happens early
    assert mc.polynomial_sparsity(50, 0.8, end_step=100) == pytest.approx(0.8 * (1 - 0.5**3))


def test_pruning_callback_reaches_target_and_keeps_zeros(data, trained) -> None:
    x, y = data
    model = compile_adam(copy_of(trained), 1e-3)
    callback = mc.MagnitudePruning(0.75, end_step=8, frequency=2)
    history = model.fit(dataset(x, y), epochs=2, callbacks=[callback], verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2
    for name, sparsity in kernel_sparsity(model).items():
        assert sparsity == pytest.approx(0.75, abs=1e-3), name
    # the schedule was followed: rising sparsities, then the target
    scheduled = [s for _, s in callback.log]
    assert scheduled == sorted(scheduled) and scheduled[-1] == 0.75
    # the weights that survived moved during fine-tuning (masks re-applied, not frozen)
    pruned_k, base_k = model.get_layer("conv2").kernel.numpy(), trained.get_layer("conv2").kernel.numpy()
    assert not np.allclose(pruned_k[pruned_k != 0], base_k[pruned_k != 0])


def test_pruning_callback_works_under_mirrored_strategy(data) -> None:
    """The masks are assigned to MirroredVariables like any other update, on every replica."""
    x, y = data
    strategy = devices.make_strategy(devices.compute_devices()[:2])
    with strategy.scope():
        model = compile_adam(build_seed_cnn(width=0.25, num_classes=4), 1e-3)
    model.fit(dataset(x[:128], y[:128]), epochs=1, verbose=0, shuffle=False,
              callbacks=[mc.MagnitudePruning(0.5, end_step=2, frequency=1)])
    assert isinstance(model.get_layer("conv2").kernel.value, tf.distribute.DistributedValues)
    assert all(s == pytest.approx(0.5, abs=1e-3) for s in kernel_sparsity(model).values())
    for replica_value in model.get_layer("dense1").kernel.value.values:
        assert np.mean(replica_value.numpy() == 0) == pytest.approx(0.5, abs=1e-3)


# ----------------------------------------------------------------------------- fake quantization
def test_fake_quant_snaps_to_levels_with_straight_through_gradient() -> None:
    x = tf.constant([-2.0, -1.0, -0.4, 0.0, 0.6, 1.4, 2.0, 3.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = mc.fake_quant(x, -1.0, 2.0, num_bits=2)  # levels -1, 0, 1, 2
    np.testing.assert_array_equal(y.numpy(), [-1, -1, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("narrow_range", [False, True])
def test_fake_quant_equals_tensorflows_fused_ops(narrow_range) -> None:
    x = tf.constant(np.random.default_rng(0).normal(size=(64, 8)) * 2, tf.float32)
    bound = tf.reduce_max(tf.abs(x[:32]), axis=0)  # some values fall outside the range
    cases = [
        (mc.fake_quant(x, -0.7, 1.9, narrow_range=narrow_range),
         tf.quantization.fake_quant_with_min_max_vars(x, -0.7, 1.9, narrow_range=narrow_range)),
        # (not a symmetric range over 256 levels: its zero point is a tie, 127.5, which float error decides)
        (mc.fake_quant(x, -0.6 * bound, bound, narrow_range=narrow_range),
         tf.quantization.fake_quant_with_min_max_vars_per_channel(x, -0.6 * bound, bound, narrow_range=narrow_range)),
    ]
    for ours, fused in cases:
        np.testing.assert_allclose(ours.numpy(), fused.numpy(), atol=1e-6)


def test_quantize_kernel_keeps_zeros_and_uses_255_levels() -> None:
    kernel = tf.constant(np.random.default_rng(1).normal(size=(3, 3, 4, 6)), tf.float32)
    kernel = tf.where(tf.abs(kernel) < 0.3, 0.0, kernel)
    q = mc.quantize_kernel(kernel, per_channel=True).numpy()
    assert np.all(q[kernel.numpy() == 0] == 0)  # pruned weights stay exactly zero
    for c in range(6):  # per channel: at most 255 distinct values, the largest |w| kept exactly
        assert len(np.unique(q[..., c])) <= 255
        assert np.max(np.abs(q[..., c])) == pytest.approx(np.max(np.abs(kernel.numpy()[..., c])), rel=1e-6)


def test_qat_model_matches_float_then_converts_to_int8(trained, data) -> None:
    x, y = data
    qat = mc.quantize_aware_model(trained)
    for start in range(0, 128, 64):
        qat(x[start : start + 64] / 255.0, training=True)  # calibrate the FakeQuant ranges
    xf = x[:64] / 255.0
    # before fine-tuning the QAT model is the float model plus int8 rounding
    agree = np.mean(np.argmax(qat(xf), -1) == np.argmax(trained(xf), -1))
    assert agree >= 0.9
    compile_adam(qat, 1e-4).fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
    runner = C.LiteRTModel(C.to_tflite(qat, "qat"))
    assert runner.input_dtype == np.int8
    assert "float32" not in runner.tensor_dtypes()
    assert runner.accuracy(x, y) > 0.6


def test_fake_quant_layer_range_follows_training_batches() -> None:
    layer = mc.FakeQuant(momentum=0.5)
    layer(tf.constant([[0.0, 4.0]]), training=True)  # the first batch sets the range
    assert float(layer.range_max.numpy()) == 4.0
    layer(tf.constant([[0.0, 2.0]]), training=True)  # then a moving average
    assert float(layer.range_max.numpy()) == pytest.approx(3.0)
    layer(tf.constant([[0.0, 100.0]]), training=False)  # inference leaves it alone
    assert float(layer.range_max.numpy()) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- distillation
def test_distillation_loss_limits() -> None:
    y = tf.constant([0, 1])
    s = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    t = tf.constant([[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]])
    ce = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, s)))
    assert float(mc.distillation_loss(y, s, t, 4.0, alpha=1.0)) == pytest.approx(ce, rel=1e-5)
    assert float(mc.distillation_loss(y, s, s, 3.0, alpha=0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(mc.distillation_loss(y, s, t, 3.0, alpha=0.0)) > 0.0


def test_distiller_trains_only_the_student(trained, data) -> None:
    x, y = data
    teacher_before = [w.copy() for w in trained.get_weights()]
    student = build_seed_cnn(width=0.125, num_classes=4, name="student")
    start = [w.copy() for w in student.get_weights()]
    distiller = mc.Distiller(student, trained)
    distiller.compile(optimizer=keras.optimizers.Adam(2e-3), metrics=["accuracy"])
    try:
        history = distiller.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
    finally:
        trained.trainable = True
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(start, student.get_weights(), strict=True))
    for a, b in zip(teacher_before, trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- sizes
def test_gzip_size_is_deterministic() -> None:
    zeros = bytes(10_000)
    noise = np.random.default_rng(0).bytes(10_000)
    assert C.gzip_size(zeros) < 200 < 9_000 < C.gzip_size(noise)
    assert C.gzip_size(noise) == len(gzip.compress(noise, compresslevel=9, mtime=0))


def test_weights_size_ignores_optimizer_state(trained) -> None:
    fresh = build_seed_cnn(width=0.25, num_classes=4)
    assert trained.optimizer is not None and trained.optimizer.built  # Adam's moments are not weights
    assert C.weights_size(trained)["bytes"] == C.weights_size(fresh)["bytes"]


def test_weights_gzip_shrinks_with_sparsity() -> None:
    model = build_seed_cnn(width=0.5)
    dense = C.weights_size(model)
    for _, kernel in mc.prunable_kernels(model):
        kernel.assign(kernel * mc.magnitude_mask(kernel.numpy(), 0.9))
    sparse = C.weights_size(model)
    assert sparse["bytes"] == dense["bytes"]  # zeros are still stored as float32
    assert sparse["gzip bytes"] < 0.5 * dense["gzip bytes"]
    assert dense["bytes"] > 4 * model.count_params() * 0.99


# ----------------------------------------------------------------------------- LiteRT
@pytest.fixture(scope="module")
def converted(trained, data) -> dict[str, bytes]:
    x, _ = data
    return {mode: C.to_tflite(trained, mode, x[:64]) for mode in ("float32", "dynamic", "float16", "int8")}


def test_conversion_sizes_and_types(converted, trained) -> None:
    sizes = {m: len(b) for m, b in converted.items()}
    assert sizes["float32"] > 4 * trained.count_params() * 0.95
    assert sizes["float16"] < 0.6 * sizes["float32"]
    assert sizes["dynamic"] < 0.35 * sizes["float32"]
    assert sizes["int8"] < 0.35 * sizes["float32"]
    int8 = C.LiteRTModel(converted["int8"])
    assert int8.input_dtype == np.int8 and int8.output_dtype == np.int8
    assert "CONV_2D" in int8.op_types() and "DELEGATE" not in int8.op_types()
    assert "float32" not in int8.tensor_dtypes()  # integer-only graph
    assert C.LiteRTModel(converted["float32"]).input_dtype == np.float32


def test_litert_float32_matches_keras(converted, trained, data) -> None:
    x, _ = data
    got = C.LiteRTModel(converted["float32"]).predict(x[:37], batch_size=16)  # partial last batch padded
    want = trained.predict(x[:37] / 255.0, verbose=0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_quantized_accuracy_close_to_float(converted, data) -> None:
    x, y = data
    accs = {m: C.LiteRTModel(b).accuracy(x, y) for m, b in converted.items()}
    assert accs["float32"] > 0.6  # the tiny model learned the task
    for mode in ("dynamic", "float16", "int8"):
        assert abs(accs[mode] - accs["float32"]) <= 0.05, (mode, accs)


def test_latency_is_a_positive_median(converted, data) -> None:
    x, _ = data
    latency = C.LiteRTModel(converted["int8"], num_threads=1).latency_ms(x, runs=5, warmup=1)
    assert 0 < latency < 1_000
