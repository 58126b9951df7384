"""Tests for utils.evaluation: metrics against hand-computed values, plots, strategy equivalence."""

from __future__ import annotations

import keras
import matplotlib
import numpy as np
import pytest

from utils import evaluation as E
from utils import training

matplotlib.use("Agg")

NAMES = ["a", "b", "c"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_counts():
    cm = E.confusion_matrix(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert cm.sum() == len(Y_TRUE)


@pytest.mark.parametrize("y_true, y_pred", [([0, 3], [0, 1]), ([0, 1], [0, -1]), ([0, 1, 2], [0, 1])])
def test_confusion_matrix_rejects_bad_labels(y_true, y_pred):
    with pytest.raises(ValueError):
        E.confusion_matrix(np.array(y_true), np.array(y_pred), 3)


def test_classification_table_by_hand():
    table = E.classification_table(Y_TRUE, Y_PRED, NAMES)
    # a: precision 2/2, recall 2/3; b: 1/2, 1/2; c: 1/2, 1/1
    np.testing.assert_allclose(table.loc[NAMES, "precision"], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(table.loc[NAMES, "recall"], [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(table.loc["a", "f1"], 2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert table["support"].tolist() == [3, 2, 1, 6]
    np.testing.assert_allclose(table.loc["macro avg", "recall"], (2 / 3 + 0.5 + 1.0) / 3)


def test_classification_table_class_never_predicted():
    table = E.classification_table(np.array([0, 1]), np.array([0, 0]), ["x", "y"])
    assert table.loc["y", "precision"] == 0.0 and table.loc["y", "recall"] == 0.0


def test_top_confusions():
    cm = np.array([[5, 3, 0], [1, 5, 0], [0, 0, 5]])
    top = E.top_confusions(cm, NAMES, n=5)
    assert top[["true", "predicted", "count"]].values.tolist() == [["a", "b", 3], ["b", "a", 1]]


def test_reliability_table_and_ece():
    # 4 predictions at confidence 0.95 (3 right), 2 at 0.55 (1 right)
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2)
    y = np.array([0, 0, 0, 1, 0, 1])
    table = E.reliability_table(probs, y, n_bins=10)
    assert table["count"].sum() == 6
    top = table.iloc[9]
    assert top["count"] == 4 and top["accuracy"] == pytest.approx(0.75)
    assert top["confidence"] == pytest.approx(0.95) and top["gap"] == pytest.approx(0.2)
    mid = table.iloc[5]
    assert mid["count"] == 2 and mid["accuracy"] == pytest.approx(0.5)
    assert E.expected_calibration_error(probs, y) == pytest.approx((4 * 0.2 + 2 * 0.05) / 6)


def test_ece_zero_when_calibrated():
    probs = np.array([[1.0, 0.0]] * 5)
    assert E.expected_calibration_error(probs, np.zeros(5, int)) == pytest.approx(0.0)


def test_reliability_table_errors():
    with pytest.raises(ValueError):
        E.reliability_table(np.ones((3, 2)), np.zeros(4, int))
    with pytest.raises(ValueError):
        E.reliability_table(np.ones((3, 2)) / 2, np.zeros(3, int), n_bins=0)


def test_misclassified_indices_most_confident_first():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    y = np.array([0, 0, 0, 1])  # wrong: 1 (0.8), 2 (0.6), 3 (0.7)
    assert E.misclassified_indices(y, probs).tolist() == [1, 3, 2]
    assert E.misclassified_indices(y, probs, n=2, most_confident=False).tolist() == [2, 3]


def test_plots_return_figures():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=30)
    y = rng.integers(0, 3, 30)
    images = rng.integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)
    cm = E.confusion_matrix(y, probs.argmax(1), 3)
    assert E.plot_confusion_matrix(cm, NAMES) is not None
    assert len(E.plot_reliability(probs, y).axes) == 2
    fig = E.plot_misclassified(images, y, probs, NAMES, n=4)
    assert sum(ax.get_title() != "" for ax in fig.axes) == 4
    with pytest.raises(ValueError):
        E.plot_confusion_matrix(cm, ["only", "two"])
    with pytest.raises(ValueError, match="no mistakes"):
        E.plot_misclassified(images[:3], probs[:3].argmax(1), probs[:3], NAMES)


def _result(probs, y, loss=1.0, acc=0.5):
    return E.EvalResult(np.asarray(probs, np.float32), np.asarray(y), loss, acc)


def test_compare_evaluations_detects_differences():
    probs = np.array([[0.6, 0.4], [0.3, 0.7]])
    ref = _result(probs, [0, 1])
    same = E.compare_evaluations(ref, _result(probs + 1e-7, [0, 1]))
    assert same["equal"] and same["max_abs_prob_diff"] < 1e-5
    flipped = E.compare_evaluations(ref, _result([[0.4, 0.6], [0.3, 0.7]], [0, 1]))
    assert not flipped["equal"] and not flipped["same_predictions"] and not flipped["probs_close"]
    other_acc = E.compare_evaluations(ref, _result(probs, [0, 1], acc=0.6))
    assert not other_acc["equal"] and not other_acc["accuracy_equal"]
    text = E.equivalence_verdict(same, "2 replicas vs 1 device")
    assert text.startswith("2 replicas vs 1 device: probabilities equal within 1e-05: True")
    with pytest.raises(ValueError):
        E.compare_evaluations(ref, _result(probs[:1], [0]))
    with pytest.raises(ValueError, match="different labels"):
        E.compare_evaluations(ref, _result(probs, [1, 1]))


def test_load_model_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 04"):
        E.load_model(tmp_path / "nothing.keras")


def test_evaluate_under_strategy_equals_one_device(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (52, 32, 32, 3), dtype=np.uint8)  # 52 = 3 x 16 + 4: partial last batch
    y = rng.integers(0, 10, 52)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10, activation="softmax")])
    training.compile_seed_cnn(model)
    model.optimizer.build(model.trainable_variables)  # saved with its (empty) optimizer state
    path = tmp_path / "m.keras"
    model.save(path)
    one = E.evaluate_model(E.load_model(path), x, y, batch_size=16)
    strategy = training.make_strategy()
    many = E.evaluate_model(E.load_model(path, strategy), x, y, batch_size=16)
    assert one.replicas == 1 and many.replicas == strategy.num_replicas_in_sync
    assert one.probs.shape == many.probs.shape == (52, 10)
    # predict pads to a multiple of the replicas and trims: same rows as without a strategy
    np.testing.assert_allclose(E.predict_probs(E.load_model(path, strategy), x[:51]), one.probs[:51],
                               atol=1e-6)
    assert one.accuracy == pytest.approx(one.accuracy_from_probs, abs=1e-6)
    assert E.compare_evaluations(one, many)["equal"]
    with pytest.raises(ValueError):
        E.evaluate_model(model, x, y[:10])
    if strategy.num_replicas_in_sync > 1:
        with pytest.raises(ValueError, match="split evenly"):
            E.evaluate_model(E.load_model(path, strategy), x[:51], y[:51])


def test_replica_batch_size():
    assert E.replica_batch_size(256, 4) == 256
    assert E.replica_batch_size(250, 4) == 248
    assert E.replica_batch_size(2, 4) == 4
    with pytest.raises(ValueError):
        E.replica_batch_size(0, 4)
