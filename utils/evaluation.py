"""Evaluate a trained classifier: accuracy, per-class table, confusion matrix, calibration.

Everything here works on NumPy arrays of labels and predicted probabilities, so it does
not care whether the predictions came from one device or from N replicas of a
:class:`tf.distribute.MirroredStrategy`. :func:`load_model` and :func:`evaluate_model`
produce those arrays, with or without a strategy, and :func:`compare_evaluations`
checks that both ways give the same answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import pipeline


# --------------------------------------------------------------------------- predictions
@dataclass
class EvalResult:
    """Predictions of one model on one split.

    Attributes:
        probs: ``(N, num_classes)`` predicted probabilities (float32).
        y_true: ``(N,)`` integer labels.
        loss, accuracy: from ``model.evaluate`` (Keras metrics, computed on the devices).
        replicas: how many replicas computed them (1 without a strategy).
    """

    probs: np.ndarray
    y_true: np.ndarray
    loss: float
    accuracy: float
    replicas: int = 1

    @property
    def y_pred(self) -> np.ndarray:
        """Predicted class per example (argmax of ``probs``)."""
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class per example."""
        return self.probs.max(axis=1)

    @property
    def accuracy_from_probs(self) -> float:
        """Accuracy recomputed on the host from ``probs`` (a cross-check of ``accuracy``)."""
        return float(np.mean(self.y_pred == self.y_true))


def load_model(path: str | Path, strategy: tf.distribute.Strategy | None = None) -> keras.Model:
    """Load a ``.keras`` model, inside ``strategy.scope()`` when a strategy is given.

    A model loaded under a strategy has mirrored variables and its ``evaluate``/``predict``
    split every batch over the strategy's replicas; without one it runs on one device.

    Raises:
        FileNotFoundError: with a hint to run notebook 04 first.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No saved model at {path.name!r} in its run folder. Run notebook 04 first, or use "
            "utils.training.load_or_train_cnn(...) which trains one when it is missing."
        )
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        return keras.models.load_model(path)


def replica_batch_size(batch_size: int, replicas: int) -> int:
    """``batch_size`` rounded down to a multiple of ``replicas`` (at least ``replicas``).

    Keras 3 under a :class:`tf.distribute.MirroredStrategy` needs every global batch,
    including the last partial one, to split *evenly* over the replicas.
    """
    if batch_size < 1 or replicas < 1:
        raise ValueError(f"batch_size and replicas must be >= 1, got {batch_size}, {replicas}")
    return max(replicas, (batch_size // replicas) * replicas)


def predict_probs(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model.predict`` over uint8 images, one row of probabilities per image, in order.

    Under a strategy, Keras's ``predict`` needs every batch to split *evenly* over the
    replicas (it stacks the per-replica outputs). So the global batch is rounded down to
    a multiple of the replica count and the images are padded with black images up to a
    multiple of it; the padded rows are dropped from the result. Padding cannot change the
    other rows: every image is scored independently.
    """
    strategy = getattr(model, "distribute_strategy", None)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    batch = replica_batch_size(batch_size, replicas)
    pad = (-len(x)) % replicas
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
    images = pipeline.make_dataset(x, np.zeros(len(x), np.int64), batch, training=False)
    probs = model.predict(images.map(lambda images, labels: images), verbose=0)
    return np.asarray(probs, dtype=np.float32)[: len(x) - pad]


def evaluate_model(
    model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256
) -> EvalResult:
    """Run ``model.evaluate`` and ``model.predict`` over uint8 images ``x`` with labels ``y``.

    Images are normalised by :func:`utils.pipeline.make_dataset` (no shuffling, no
    augmentation, the last partial batch kept), so every example is scored exactly once.
    ``batch_size`` is the global batch; under a strategy it is rounded down to a multiple
    of the replica count so that every batch splits evenly (see :func:`replica_batch_size`).

    Raises:
        ValueError: for mismatched lengths, an empty split, or (under a strategy) a number
            of images that does not split evenly over the replicas.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty split")
    strategy = getattr(model, "distribute_strategy", None)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if len(x) % replicas:
        raise ValueError(
            f"{len(x)} images do not split evenly over {replicas} replicas, which Keras's "
            f"evaluate under a strategy requires; evaluate the first {len(x) - len(x) % replicas} "
            "images, or use a replica count that divides the number of images"
        )
    eval_batch = replica_batch_size(batch_size, replicas)
    ds = pipeline.make_dataset(x, y, eval_batch, training=False)
    loss, acc = model.evaluate(ds, verbose=0)
    probs = predict_probs(model, x, batch_size)
    return EvalResult(np.asarray(probs, dtype=np.float32), np.asarray(y), float(loss), float(acc), replicas)


def compare_evaluations(reference: EvalResult, other: EvalResult, tol: float = 1e-5) -> dict[str, Any]:
    """Compare two evaluations of the same model on the same data.

    Returns a dict with ``max_abs_prob_diff`` (raw number), ``probs_close`` (``<= tol``),
    ``same_predictions`` (identical argmax for every example), ``accuracy_equal`` (the two
    ``model.evaluate`` accuracies match to 1e-6), ``loss_close`` (relative ``<= 1e-4``) and
    ``equal`` (all of them).

    Raises:
        ValueError: if the two results are for different numbers of examples or labels.
    """
    if reference.probs.shape != other.probs.shape:
        raise ValueError(f"shapes differ: {reference.probs.shape} vs {other.probs.shape}")
    if not np.array_equal(reference.y_true, other.y_true):
        raise ValueError("the two evaluations used different labels; evaluate the same split")
    diff = float(np.max(np.abs(reference.probs.astype(np.float64) - other.probs)))
    out = {
        "max_abs_prob_diff": diff,
        "tolerance": tol,
        "probs_close": diff <= tol,
        "same_predictions": bool(np.array_equal(reference.y_pred, other.y_pred)),
        "accuracy_equal": abs(reference.accuracy - other.accuracy) <= 1e-6,
        "loss_close": abs(reference.loss - other.loss) <= 1e-4 * max(1.0, abs(reference.loss)),
    }
    out["equal"] = all(out[k] for k in ("probs_close", "same_predictions", "accuracy_equal", "loss_close"))
    return out


def equivalence_verdict(comparison: dict[str, Any], what: str = "") -> str:
    """Deterministic text for a :func:`compare_evaluations` result (no raw numbers)."""
    prefix = f"{what}: " if what else ""
    return (
        f"{prefix}probabilities equal within {comparison['tolerance']:g}: {comparison['probs_close']}; "
        f"same predicted class for every image: {comparison['same_predictions']}; "
        f"same accuracy: {comparison['accuracy_equal']}; same loss: {comparison['loss_close']}"
    )


# --------------------------------------------------------------------------- per-class metrics
def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape[0]} true labels but {y_pred.shape[0]} predictions")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` counts: row = true class, column = predicted class."""
    y_true, y_pred = _check_labels(y_true, y_pred, num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_table(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support, plus a ``macro avg`` row.

    Precision of class *c*: of the images predicted *c*, the share that are *c* (0 when
    nothing was predicted *c*). Recall: of the images of class *c*, the share predicted *c*.
    The ``macro avg`` row averages the classes equally; its support is the total.
    """
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    table = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support},
        index=pd.Index(list(class_names), name="class"),
    )
    table.loc["macro avg"] = [precision.mean(), recall.mean(), f1.mean(), support.sum()]
    table["support"] = table["support"].astype(int)
    return table


def top_confusions(cm: np.ndarray, class_names: Sequence[str], n: int = 5) -> pd.DataFrame:
    """The ``n`` largest off-diagonal cells: which true class is most often taken for which."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    rows = []
    for flat in order:
        i, j = np.unravel_index(flat, off.shape)
        if off[i, j] == 0:
            break
        rows.append({"true": class_names[i], "predicted": class_names[j], "count": int(off[i, j]),
                     "share of true class": off[i, j] / max(cm[i].sum(), 1)})
    return pd.DataFrame(rows, columns=["true", "predicted", "count", "share of true class"])


# --------------------------------------------------------------------------- calibration
def calibration_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Bin predictions by confidence into ``n_bins`` equal-width bins on [0, 1].

    Columns: ``bin`` (e.g. ``"0.9-1.0"``), ``lower``, ``upper``, ``count``, ``confidence``
    (mean confidence in the bin), ``accuracy`` (share correct in the bin), ``gap``
    (confidence - accuracy; positive = over-confident). Empty bins have NaN means.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=float).reshape(-1)
    correct = np.asarray(correct).astype(bool).reshape(-1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        mean_conf = float(conf[mask].mean()) if count else float("nan")
        acc = float(correct[mask].mean()) if count else float("nan")
        rows.append({"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "lower": edges[b], "upper": edges[b + 1],
                     "count": count, "confidence": mean_conf, "accuracy": acc, "gap": mean_conf - acc})
    return pd.DataFrame(rows)


def calibration_error(bins: pd.DataFrame) -> float:
    """ECE (Guo et al., 2017) of a :func:`calibration_bins` table: the count-weighted mean
    of |confidence - accuracy| over the bins."""
    filled = bins[bins["count"] > 0]
    return float((filled["count"] * filled["gap"].abs()).sum() / bins["count"].sum())


def reliability_table(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """:func:`calibration_bins` of a classifier's predictions: confidence = max probability,
    correct = argmax equals the label."""
    probs = np.asarray(probs)
    y_true = np.asarray(y_true).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (N, classes) with N = {y_true.shape[0]}, got {probs.shape}")
    return calibration_bins(probs.max(axis=1), probs.argmax(axis=1) == y_true, n_bins)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> float:
    """ECE (Guo et al., 2017): the count-weighted mean of |confidence - accuracy| over bins."""
    return calibration_error(reliability_table(probs, y_true, n_bins))


# --------------------------------------------------------------------------- plots
def plot_confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str], normalize: bool = True, ax: Any = None, title: str = ""
) -> Any:
    """Heat map of a confusion matrix (rows normalised to recall when ``normalize``):
    :func:`utils.plots.confusion_matrix_plot`. Returns the matplotlib figure."""
    from utils import plots

    return plots.confusion_matrix_plot(cm, class_names, normalize=normalize, title=title or None, ax=ax)


def misclassified_indices(
    y_true: np.ndarray, probs: np.ndarray, n: int = 16, most_confident: bool = True
) -> np.ndarray:
    """Indices of up to ``n`` wrong predictions, the most confident mistakes first."""
    probs = np.asarray(probs)
    y_true = np.asarray(y_true).reshape(-1)
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    conf = probs.max(axis=1)[wrong]
    order = np.argsort(-conf if most_confident else conf, kind="stable")
    return wrong[order][:n]


def plot_image_grid(
    images: np.ndarray, titles: Sequence[str], ncols: int = 8, title: str = "", colors: Sequence[str] | None = None
) -> Any:
    """Show uint8 (or [0, 1] float) images in a grid with a small title over each.

    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("no images to show")
    if len(titles) != n:
        raise ValueError(f"{n} images but {len(titles)} titles")
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.9 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k])
            ax.set_title(titles[k], fontsize=7, color=colors[k] if colors else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_misclassified(
    images: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    n: int = 16,
    ncols: int = 8,
) -> Any:
    """Grid of the ``n`` most confident mistakes: "true -> predicted (confidence)"."""
    idx = misclassified_indices(y_true, probs, n)
    if len(idx) == 0:
        raise ValueError("the model made no mistakes on these images: nothing to show")
    probs = np.asarray(probs)
    titles = [
        f"{class_names[int(y_true[i])]}\n-> {class_names[int(probs[i].argmax())]} ({probs[i].max():.2f})"
        for i in idx
    ]
    return plot_image_grid(images[idx], titles, ncols=ncols, colors=["firebrick"] * len(idx),
                           title="Most confident mistakes: true -> predicted (confidence)")


def plot_reliability(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> Any:
    """Reliability diagram (accuracy vs confidence per bin) and confidence histogram.

    Left: bars of accuracy per confidence bin against the diagonal of perfect calibration
    (bars below the diagonal: over-confident). Right: how many predictions fall in each
    bin, split into correct and wrong. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    table = reliability_table(probs, y_true, n_bins)
    ece = expected_calibration_error(probs, y_true, n_bins)
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true).reshape(-1)
    width = 1.0 / n_bins
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    centers = (table["lower"] + table["upper"]) / 2
    ax1.bar(centers, table["accuracy"].fillna(0), width=width * 0.95, color="C0", label="accuracy in bin")
    ax1.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax1.plot(centers, table["confidence"], "o", color="C3", markersize=4, label="mean confidence in bin")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax1.set_xlabel("confidence (max probability)")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"Reliability diagram (ECE = {ece:.3f})")
    ax1.legend(fontsize=8, loc="upper left")
    edges = np.linspace(0, 1, n_bins + 1)
    ax2.hist([conf[correct], conf[~correct]], bins=edges, stacked=True, color=["C2", "C3"],
             label=["correct", "wrong"])
    ax2.set_xlabel("confidence (max probability)")
    ax2.set_ylabel("test images")
    ax2.set_title("Confidence histogram")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
