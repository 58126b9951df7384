"""Tests for utils.training: recipes, callbacks, resume, logs, load-or-train."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from utils import data as D
from utils import devices, training


@pytest.fixture(scope="module")
def tiny_data() -> D.Cifar10:
    x, y, xt, yt, names = D.make_synthetic(256, 64, seed=1)
    return D.Cifar10(x, y, xt, yt, names, source="synthetic")


def dense_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    return training.compile_seed_cnn(model)


def xy(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n)


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    "arg, expected",
    [(None, "float32"), (False, "float32"), ("float32", "float32"),
     ("mixed_bfloat16", "mixed_bfloat16"), ("mixed_float16", "mixed_float16")],
)
def test_resolve_policy(arg, expected):
    assert training.resolve_policy(arg) == expected


def test_resolve_policy_auto_follows_device_kind():
    want = "mixed_float16" if devices.device_kind() == "GPU" else "mixed_bfloat16"
    assert training.resolve_policy("auto") == want == training.resolve_policy(True)


def test_resolve_policy_rejects_unknown():
    with pytest.raises(ValueError, match="precision must be"):
        training.resolve_policy("float8")


def test_precision_policy_restores_after_error():
    before = keras.mixed_precision.global_policy().name
    with pytest.raises(RuntimeError):
        with training.precision_policy("mixed_bfloat16"):
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == before


# --------------------------------------------------------------------------- schedule
def test_warmup_cosine_shape():
    sched = training.warmup_cosine(1e-3, epochs=10, warmup_epochs=2, min_fraction=0.1)
    lrs = [sched(e) for e in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3)  # warm-up, then the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # strictly decaying afterwards
    assert lrs[-1] == pytest.approx(1e-4)  # ends at min_fraction * base_lr


def test_warmup_cosine_single_epoch_and_errors():
    assert training.warmup_cosine(1e-3, epochs=1, warmup_epochs=0)(0) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        training.warmup_cosine(0.0, epochs=5)
    with pytest.raises(ValueError):
        training.warmup_cosine(1e-3, epochs=5, warmup_epochs=-1)
    short = training.warmup_cosine(1e-3, epochs=2, warmup_epochs=5)  # warm-up clamped to 1 epoch
    assert short(0) == pytest.approx(5e-4) and short(1) == pytest.approx(1e-3)


# --------------------------------------------------------------------------- callbacks
def test_interrupt_at_step_stops_mid_epoch():
    x, y = xy(40)
    model = dense_model()
    ledger = training.EpochLedger()
    with pytest.raises(training.TrainingInterrupted, match="epoch 3, batch 5"):
        model.fit(x, y, batch_size=4, epochs=5, verbose=0,
                  callbacks=[ledger, training.InterruptAtStep(25)])
    frame = ledger.frame()
    assert frame["epoch"].tolist() == [1, 2, 3]
    assert frame["batches"].tolist() == [10, 10, 5]
    assert frame["finished"].tolist() == [True, True, False]
    assert int(model.optimizer.iterations.numpy()) == 25


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3"])
def test_interrupt_at_step_rejects_bad_step(bad):
    with pytest.raises(ValueError, match="whole number"):
        training.InterruptAtStep(bad)


def test_throughput_callback_logs_rate():
    x, y = xy(40)
    model = dense_model()
    timer = training.ThroughputCallback(batch_size=8)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[timer])
    assert [r["steps"] for r in timer.records] == [5, 5]
    assert all(r["images_per_s"] > 0 for r in timer.records)
    assert history.history["images_per_s"] == [r["images_per_s"] for r in timer.records]
    assert timer.mean_images_per_s() == pytest.approx(timer.records[1]["images_per_s"])
    with pytest.raises(ValueError):
        training.ThroughputCallback(0)


def test_backup_and_restore_resumes_without_loss_or_repeat(tmp_path):
    """Crash mid-epoch 3 of 5, resume: epochs 3-5 run once more, 5 x 10 optimizer steps total."""
    x, y = xy(40)
    keras.utils.set_random_seed(0)
    model = dense_model()
    ledger = training.EpochLedger()
    cbs = training.make_callbacks(tmp_path, batch_size=4, checkpoint=False, tensorboard=False,
                                  early_stopping_patience=None, throughput=False)
    with pytest.raises(training.TrainingInterrupted):
        model.fit(x, y, batch_size=4, epochs=5, verbose=0,
                  callbacks=cbs + [ledger.label("first"), training.InterruptAtStep(25)])
    after_epoch_2 = [w.copy() for w in model.get_weights()]  # noqa: F841  (state is on disk)
    fresh = dense_model()
    cbs = training.make_callbacks(tmp_path, batch_size=4, checkpoint=False, tensorboard=False,
                                  early_stopping_patience=None, throughput=False)
    history = fresh.fit(x, y, batch_size=4, epochs=5, verbose=0, callbacks=cbs + [ledger.label("resumed")])
    assert history.epoch == [2, 3, 4]
    frame = ledger.frame()
    resumed = frame[frame["run"] == "resumed"]
    assert resumed["epoch"].tolist() == [3, 4, 5]
    # the resumed run starts from the optimizer state at the end of epoch 2 (20 steps)
    assert resumed["optimizer steps"].tolist() == [30, 40, 50]
    finished = frame[frame["finished"]]
    assert sorted(finished["epoch"]) == [1, 2, 3, 4, 5]  # every epoch completed exactly once
    assert not (tmp_path / "backup").exists()  # deleted after a completed fit


def test_make_callbacks_contents_and_errors(tmp_path):
    cbs = training.make_callbacks(tmp_path, batch_size=32, lr_schedule=training.warmup_cosine(1e-3, 3))
    kinds = [type(cb).__name__ for cb in cbs]
    assert kinds[0] == "ThroughputCallback"
    for name in ("LearningRateScheduler", "ModelCheckpoint", "BackupAndRestore", "EarlyStopping"):
        assert name in kinds
    assert ("TensorBoard" in kinds) or ("TensorBoardScalars" in kinds)
    with pytest.raises(ValueError):
        training.make_callbacks(tmp_path, batch_size=0)
    with pytest.raises(ValueError):
        training.make_callbacks(tmp_path, batch_size=8, early_stopping_patience=0)


def test_tensorboard_scalars_round_trip(tmp_path):
    x, y = xy(40)
    model = dense_model()
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, validation_data=(x, y),
                        callbacks=[training.TensorBoardScalars(tmp_path / "logs")])
    scalars = training.read_scalars(tmp_path / "logs")
    loss = scalars[(scalars["split"] == "train") & (scalars["tag"] == "epoch_loss")]
    assert loss["step"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(loss["value"], history.history["loss"], rtol=1e-6)
    val = scalars[(scalars["split"] == "validation") & (scalars["tag"] == "epoch_accuracy")]
    np.testing.assert_allclose(val["value"], history.history["val_accuracy"], rtol=1e-6)
    assert set(scalars["tag"]) >= {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}


# --------------------------------------------------------------------------- history
def test_history_frame_numbers_resumed_epochs():
    h = keras.callbacks.History()
    h.epoch = [3, 4]
    h.history = {"loss": [0.5, 0.4], "val_loss": [0.6, 0.5]}
    frame = training.history_frame(h, run="resumed")
    assert frame["epoch"].tolist() == [4, 5]
    assert frame["run"].unique().tolist() == ["resumed"]
    assert training.history_frame({"loss": [1.0, 0.5]})["epoch"].tolist() == [1, 2]
    with pytest.raises(TypeError):
        training.history_frame([1, 2, 3])


def test_plot_history_checks_columns():
    import matplotlib

    matplotlib.use("Agg")
    frame = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [1.1, 0.7],
                          "accuracy": [0.3, 0.5], "val_accuracy": [0.3, 0.4]})
    fig = training.plot_history(frame)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="no column"):
        training.plot_history(frame, metrics=("auc",))


# --------------------------------------------------------------------------- strategy, recipes
def test_make_strategy_defaults_and_errors():
    strategy = training.make_strategy()
    assert strategy.num_replicas_in_sync == len(devices.compute_devices())
    with pytest.raises(ValueError, match="Unknown device"):
        training.make_strategy(["/job:localhost/replica:0/task:0/device:TPU:7"])
    with pytest.raises(ValueError):
        training.make_strategy([])


def test_series_recipe_tiny(tiny_data, tmp_path):
    result = training.series_recipe(tiny_data, epochs=1, batch_size=32, run_dir=tmp_path, verbose=0)
    assert result.settings["replicas"] == len(devices.compute_devices())
    assert result.settings["precision"] == training.default_mixed_policy()
    assert result.history["epoch"].tolist() == [1]
    assert 0.0 <= result.test_accuracy <= 1.0 and result.wall_s > 0 and result.images_per_s > 0
    assert (tmp_path / "checkpoints" / "best.keras").exists()
    assert keras.mixed_precision.global_policy().name == "float32"  # policy restored
    table = training.compare_results([result])
    assert table.loc["series recipe", "epochs run"] == 1


def test_series_recipe_rejects_uneven_batch(tiny_data):
    n = len(devices.compute_devices())
    if n == 1:
        pytest.skip("needs more than one replica")
    with pytest.raises(ValueError, match="split evenly"):
        training.series_recipe(tiny_data, epochs=1, batch_size=n * 8 + 1, verbose=0)


def test_seed_recipe_tiny(tiny_data):
    result = training.seed_recipe(tiny_data, epochs=1, batch_size=64, verbose=0)
    assert result.settings == {"input": "NumPy float64", "batch": 64, "precision": "float32",
                               "replicas": 1, "validation": "test split"}
    assert len(result.history) == 1
    assert result.model.dtype_policy.name == "float32"
    # the reported test accuracy is the model's, recomputed here on the same arrays
    probs = result.model.predict(tiny_data.x_test / 255.0, verbose=0)
    assert result.test_accuracy == pytest.approx(np.mean(probs.argmax(1) == tiny_data.y_test), abs=1e-6)


def test_recipes_reject_bad_data():
    with pytest.raises(TypeError, match="x_train"):
        training.seed_recipe(object())


def test_split_validation():
    x, y = np.arange(10), np.arange(10)
    xt, yt, xv, yv = training.split_validation(x, y, 3)
    assert xv.tolist() == [7, 8, 9] and len(xt) == 7
    with pytest.raises(ValueError):
        training.split_validation(x, y, 10)


def test_load_or_train_cnn(tiny_data, tmp_path):
    path = tmp_path / "model.keras"
    model, note = training.load_or_train_cnn(tiny_data, path, epochs=1)
    assert note.startswith("Trained a new model") and "has not saved" in note
    assert path.exists() and training.saved_info(path)["mode"] == "smoke"
    again, note2 = training.load_or_train_cnn(tiny_data, path)
    assert note2.startswith("Loaded")
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # a model saved in another mode is not reused
    path.with_suffix(".json").write_text(json.dumps({"mode": "full", "synthetic": True}))
    _, note3 = training.load_or_train_cnn(tiny_data, path, epochs=1)
    assert note3.startswith("Trained") and "mode='full'" in note3


def test_save_model_requires_keras_suffix(tmp_path):
    with pytest.raises(ValueError, match=".keras"):
        training.save_model(dense_model(), tmp_path / "m.h5")


def test_compare_results_needs_input():
    with pytest.raises(ValueError):
        training.compare_results([])


def test_find_callback():
    cbs = [keras.callbacks.History(), training.ThroughputCallback(4)]
    assert isinstance(training.find_callback(cbs, training.ThroughputCallback), training.ThroughputCallback)
    assert training.find_callback(cbs, tf.keras.callbacks.EarlyStopping) is None


def test_model_path_is_per_mode():
    assert training.model_path().name == "seed_cnn_smoke.keras"
    assert training.model_path(mode="full").name == "seed_cnn_full.keras"
    assert training.model_path().parent.name == "04_training"
    with pytest.raises(ValueError):
        training.model_path(mode="fast")
