"""Tests for utils.compression: sparsity, pruning, sizes, LiteRT conversion/evaluation, QAT, KD."""

from __future__ import annotations

import gzip

import keras
import numpy as np
import pytest
import tensorflow as tf

from utils import compression as C
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


@pytest.fixture(scope="module")
def trained(data) -> keras.Model:
    """A tiny seed CNN trained for a few epochs (so quantization has real ranges)."""
    keras.utils.set_random_seed(1)
    x, y = data
    model = build_seed_cnn(width=0.25, num_classes=4, name="tiny")
    C.compile_for_finetuning(model, 3e-3)
    model.fit(x / 255.0, y, epochs=4, batch_size=32, verbose=0)
    return model


def dataset(x: np.ndarray, y: np.ndarray, batch: int = 32) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x.astype(np.float32) / 255.0, y)).batch(batch)


# ----------------------------------------------------------------------------- sparsity
def test_magnitude_mask_zeroes_exactly_the_smallest() -> None:
    w = np.array([[0.5, -0.1], [0.05, -2.0]], dtype=np.float32)
    mask = C.magnitude_mask(w, 0.5)
    np.testing.assert_array_equal(mask, [[1, 0], [0, 1]])
    assert C.magnitude_mask(w, 0.0).all()


def test_magnitude_mask_count_is_exact_with_ties() -> None:
    w = np.zeros((10, 10), dtype=np.float32)  # all ties
    assert int((C.magnitude_mask(w, 0.3) == 0).sum()) == 30


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half"])
def test_bad_sparsity_is_rejected(bad) -> None:
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        C.magnitude_mask(np.ones(4), bad)


def test_sparsity_table_reads_zeros_from_weights() -> None:
    model = build_seed_cnn(width=0.25)
    kernel = model.get_layer("dense1").kernel
    k = kernel.numpy()
    k[: k.shape[0] // 2] = 0.0
    kernel.assign(k)
    table = C.sparsity_table(model).set_index("layer")
    assert table.loc["dense1", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["conv1", "zeros"] == 0
    assert table.loc["TOTAL kernels", "zeros"] == k.size // 2  # the other kernels are dense
    assert table.loc["TOTAL all params", "kernel weights"] == model.count_params()


def test_apply_masks_checks_names_and_shapes() -> None:
    model = build_seed_cnn(width=0.25)
    with pytest.raises(KeyError, match="prunable layers"):
        C.apply_masks(model, {"nope": np.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        C.apply_masks(model, {"conv1": np.ones(3)})


def test_polynomial_schedule_shape() -> None:
    values = [C.polynomial_sparsity(s, 0.8, end_step=100) for s in (0, 25, 50, 100, 200)]
    assert values[0] == 0.0 and values[-2] == pytest.approx(0.8) and values[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(values[:3], values[1:4], strict=True))
    with pytest.raises(ValueError, match="end_step"):
        C.polynomial_sparsity(0, 0.5, end_step=0)


def test_prune_and_finetune_reaches_target_and_keeps_zeros(data, trained) -> None:
    x, y = data
    before = [w.copy() for w in trained.get_weights()]
    pruned, history = C.prune_and_finetune(trained, 0.75, dataset(x, y), epochs=2, learning_rate=1e-3)
    table = C.sparsity_table(pruned).set_index("layer")
    for name in ("conv1", "conv2", "conv3", "dense1", "output"):
        assert table.loc[name, "sparsity"] == pytest.approx(0.75, abs=1e-3), name
    # the base model is untouched and the pruned model was really trained
    for a, b in zip(before, trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(history.history["loss"]) == 2
    # the weights that survived moved during fine-tuning (masks re-applied, not frozen)
    assert not np.allclose(pruned.get_layer("conv2").kernel.numpy()[pruned.get_layer("conv2").kernel.numpy() != 0],
                           trained.get_layer("conv2").kernel.numpy()[pruned.get_layer("conv2").kernel.numpy() != 0])


def test_saved_weights_size_ignores_optimizer_state(data, trained) -> None:
    fresh = build_seed_cnn(width=0.25, num_classes=4)
    # `trained` is compiled and fitted: Adam's moments must not count as model weights
    assert trained.optimizer is not None and trained.optimizer.built
    assert C.saved_weights_size(trained)["bytes"] == C.saved_weights_size(fresh)["bytes"]


def test_keras_accuracy_matches_evaluate(data, trained) -> None:
    x, y = data
    want = trained.evaluate(x / 255.0, y, verbose=0, batch_size=64)[1]
    assert C.keras_accuracy(trained, x, y, batch_size=100) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        C.keras_accuracy(trained, x[:3], y[:2])


def test_mixed_precision_model_is_cloned_to_float32() -> None:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_seed_cnn(width=0.25)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    clone = C.clone_float32(mixed)
    assert all(layer.compute_dtype == "float32" for layer in clone.layers)
    for a, b in zip(mixed.get_weights(), clone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- sizes
def test_gzip_size_bytes_and_file(tmp_path) -> None:
    zeros = bytes(10_000)
    noise = np.random.default_rng(0).bytes(10_000)
    assert C.gzip_size(zeros) < 200 < 9_000 < C.gzip_size(noise)
    assert C.gzip_size(noise) == len(gzip.compress(noise, compresslevel=9, mtime=0))
    path = tmp_path / "f.bin"
    path.write_bytes(noise)
    assert C.gzip_size(path) == C.gzip_size(noise)
    with pytest.raises(FileNotFoundError):
        C.gzip_size(tmp_path / "missing.bin")
    with pytest.raises(TypeError):
        C.gzip_size(123)  # type: ignore[arg-type]


def test_saved_weights_gzip_shrinks_with_sparsity(tmp_path) -> None:
    model = build_seed_cnn(width=0.5)
    dense = C.saved_weights_size(model, tmp_path)
    C.apply_masks(model, C.magnitude_masks(model, 0.9))
    sparse = C.saved_weights_size(model)
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
    runner = C.LiteRTModel(converted["float32"])
    got = runner.predict(x[:37], batch_size=16)  # partial last batch is padded
    want = trained.predict(x[:37] / 255.0, verbose=0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_quantized_accuracy_close_to_float(converted, data) -> None:
    x, y = data
    accs = {m: C.LiteRTModel(b).accuracy(x, y) for m, b in converted.items()}
    assert accs["float32"] > 0.6  # the tiny model learned the task
    for mode in ("dynamic", "float16", "int8"):
        assert abs(accs[mode] - accs["float32"]) <= 0.05, (mode, accs)


def test_latency_and_input_checks(converted, data) -> None:
    x, y = data
    runner = C.LiteRTModel(converted["int8"], num_threads=1)
    lat = runner.latency_ms(x, n=5, warmup=1)
    assert lat.shape == (5,) and (lat > 0).all()
    with pytest.raises(ValueError, match="shape"):
        runner.predict(x[:, :16])
    with pytest.raises(ValueError, match="labels"):
        runner.accuracy(x[:3], y[:2])
    with pytest.raises(ValueError, match="non-empty bytes"):
        C.LiteRTModel(b"")


def test_to_tflite_rejects_bad_requests(trained) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        C.to_tflite(trained, "int4")
    with pytest.raises(ValueError, match="representative"):
        C.to_tflite(trained, "int8")


# ----------------------------------------------------------------------------- QAT
def test_qat_model_matches_float_then_converts_to_int8(trained, data) -> None:
    x, y = data
    qat = C.quantize_aware_model(trained)
    C.calibrate_fake_quant(qat, x[:128])
    xf = x[:64] / 255.0
    # Before fine-tuning the QAT model is the float model plus int8 rounding.
    agree = np.mean(np.argmax(qat.predict(xf, verbose=0), -1) == np.argmax(trained.predict(xf, verbose=0), -1))
    assert agree >= 0.9
    C.compile_for_finetuning(qat, 1e-4)
    qat.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
    flat = C.to_tflite(qat, "qat")
    runner = C.LiteRTModel(flat)
    assert runner.input_dtype == np.int8
    assert "float32" not in runner.tensor_dtypes()
    assert runner.accuracy(x, y) > 0.6


def test_qat_rejects_unknown_layers() -> None:
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dropout(0.1)])
    with pytest.raises(ValueError, match="Dropout"):
        C.quantize_aware_model(model)


# ----------------------------------------------------------------------------- distillation
def test_distillation_loss_limits() -> None:
    y = tf.constant([0, 1])
    s = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    t = tf.constant([[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]])
    ce = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, s)))
    assert float(C.distillation_loss(y, s, t, 4.0, alpha=1.0)) == pytest.approx(ce, rel=1e-5)
    assert float(C.distillation_loss(y, s, s, 3.0, alpha=0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(C.distillation_loss(y, s, t, 3.0, alpha=0.0)) > 0.0
    with pytest.raises(ValueError, match="temperature"):
        C.distillation_loss(y, s, t, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        C.distillation_loss(y, s, t, 2.0, alpha=1.5)


def test_distiller_trains_only_the_student(trained, data) -> None:
    x, y = data
    teacher_before = [w.copy() for w in trained.get_weights()]
    student = build_seed_cnn(width=0.125, num_classes=4, name="student")
    start = [w.copy() for w in student.get_weights()]
    history = C.train_student(student, dataset(x, y), epochs=1, teacher=trained)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(start, student.get_weights(), strict=True))
    for a, b in zip(teacher_before, trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert trained.trainable is True  # frozen only while teaching, then restored


# ----------------------------------------------------------------------------- reporting
def test_results_table_ratios(converted, trained, data) -> None:
    x, y = data
    rows = [C.evaluate_variant(name, tech, trained, converted[mode], x[:64], y[:64], latency_runs=3)
            for name, tech, mode in (("base", "baseline", "float32"), ("int8", "quantized", "int8"))]
    table = C.results_table(rows, baseline="base")
    assert table.loc["base", "compression ratio"] == 1.0
    assert table.loc["int8", "compression ratio"] == pytest.approx(
        rows[0]["gzip bytes"] / rows[1]["gzip bytes"])
    assert table.loc["int8", "compression ratio"] > 2.5
    assert table.loc["base", "parameters"] == trained.count_params()
    with pytest.raises(ValueError, match="baseline"):
        C.results_table(rows, baseline="missing")
    import matplotlib

    matplotlib.use("Agg")
    ax = C.plot_accuracy_vs_size(table)
    assert len(ax.collections) == 2


def test_pruning_callback_works_under_mirrored_strategy(data) -> None:
    """The masks are assigned to MirroredVariables (cross-replica) like any other update."""
    from utils import devices

    x, y = data
    strategy = tf.distribute.MirroredStrategy(devices.compute_devices()[:2],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        model = C.compile_for_finetuning(build_seed_cnn(width=0.25, num_classes=4))
    model.fit(dataset(x[:128], y[:128]), epochs=1, verbose=0, shuffle=False,
              callbacks=[C.MagnitudePruning(0.5, end_step=2, frequency=1)])
    assert isinstance(model.get_layer("conv2").kernel.value, tf.distribute.DistributedValues)
    assert C.model_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    # every replica holds the pruned weights, not only the primary copy
    for replica_value in model.get_layer("dense1").kernel.value.values:
        assert np.mean(replica_value.numpy() == 0) == pytest.approx(0.5, abs=1e-3)
