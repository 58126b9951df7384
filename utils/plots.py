"""Small plotting helpers shared by the notebooks (matplotlib only), one of each kind.

Every function returns its matplotlib figure. In a notebook, assign the result
(``fig = plots.image_grid(...)``) and the inline backend shows it once; in scripts and
tests, save or close it.

* :func:`image_grid`: images with their class names (and predictions, wrong ones in red).
* :func:`training_curves`: train vs validation loss/accuracy from a Keras history.
* :func:`bar_chart`: labelled horizontal bars, e.g. images/s per feed.
* :func:`confusion_matrix_plot`: a confusion matrix with class names.
* :func:`reliability_diagram`: accuracy vs confidence per bin, from a table of bins.

Nothing here computes a metric: the notebooks compute them and pass the results in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

CORRECT_COLOR = "black"
WRONG_COLOR = "tab:red"


def _display_images(images: np.ndarray) -> np.ndarray:
    """uint8 images as they are; float images must lie in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (N, H, W, 3) or (N, H, W, 1), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        raise ValueError("float images must lie in [0, 1]: pass uint8 images, or divide by 255 first")
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _finish(fig: Figure, title: str | None) -> Figure:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    predictions: Sequence[int] | np.ndarray | None = None,
    ncols: int = 8,
    title: str | None = None,
    cell_size: float = 1.4,
) -> Figure:
    """A grid of images, each titled with its class name.

    Args:
        images: ``(N, H, W, 3)`` uint8, or floats in [0, 1].
        labels: ``N`` integer labels.
        class_names: name of each class index.
        predictions: optional ``N`` predicted labels; titles become ``true / predicted``
            and wrong predictions are drawn in red.
        ncols: images per row.
        title: figure title.
        cell_size: inches per image.
    """
    imgs = _display_images(images)
    labels = np.asarray(labels).astype(int).reshape(-1)
    n = len(imgs)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    extra = 0.3 if predictions is not None else 0.15
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * cell_size, nrows * (cell_size + extra) + (0.4 if title else 0)),
        squeeze=False,
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        gray = imgs[i].shape[-1] == 1
        ax.imshow(imgs[i][..., 0] if gray else imgs[i], cmap="gray" if gray else None)
        true_name = class_names[labels[i]]
        if predictions is None:
            ax.set_title(true_name, fontsize=8)
        else:
            pred = int(predictions[i])
            color = WRONG_COLOR if pred != labels[i] else CORRECT_COLOR
            ax.set_title(f"{true_name}\n/ {class_names[pred]}", fontsize=7, color=color)
    return _finish(fig, title)


def training_curves(
    history: pd.DataFrame | Mapping[str, Sequence[float]] | object,
    metrics: Sequence[str] = ("loss", "accuracy"),
    *,
    title: str | None = None,
    epoch_column: str = "epoch",
) -> Figure:
    """Train vs validation curves, one panel per metric.

    Args:
        history: a ``keras.callbacks.History``, its ``.history`` dict, or a DataFrame
            with columns such as ``loss``, ``val_loss``, ``accuracy``, ``val_accuracy``.
            The x axis is column ``epoch_column`` if present, else epochs 1, 2, ...
        metrics: base metric names; ``val_<name>`` is drawn too when present.
    """
    if hasattr(history, "history") and isinstance(history.history, Mapping):  # keras History
        history = history.history
    df = pd.DataFrame(dict(history)) if isinstance(history, Mapping) else history
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"metric(s) {missing} not in history; available: {list(df.columns)}")
    x = df[epoch_column].to_numpy() if epoch_column in df.columns else np.arange(1, len(df) + 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=True):
        ax.plot(x, df[metric], marker="o", label=f"train {metric}")
        if f"val_{metric}" in df.columns:
            ax.plot(x, df[f"val_{metric}"], marker="s", label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _finish(fig, title)


def bar_chart(
    values: Mapping[str, float] | pd.Series,
    *,
    xlabel: str = "",
    title: str | None = None,
    reference: float | None = None,
    reference_label: str = "reference",
    fmt: str = "{:,.0f}",
) -> Figure:
    """Horizontal bars with their values written at the end (e.g. images/s per feed).

    ``reference`` draws a dashed vertical line (e.g. the compute ceiling).
    """
    series = pd.Series(values, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(series) + 1.2))
    ax.barh([str(i) for i in series.index], series.to_numpy(), color="tab:blue")
    ax.invert_yaxis()
    for i, v in enumerate(series.to_numpy()):
        ax.text(v, i, " " + fmt.format(v), va="center")
    if reference is not None:
        ax.axvline(reference, color="tab:gray", linestyle="--", label=reference_label)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(series.max(), reference or 0) * 1.2)
    return _finish(fig, title)


def confusion_matrix_plot(
    matrix: np.ndarray,
    class_names: Sequence[str],
    *,
    normalize: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class) with its values.

    With ``normalize=True`` each row is divided by its total (recall on the diagonal).
    Draws into ``ax`` when given, else into a new figure; returns the figure.
    """
    cm = np.asarray(matrix, dtype=float)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"matrix must be {k}x{k} to match {k} class names, got shape {cm.shape}")
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, label="share of true class" if normalize else "count")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            text = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > threshold else "black")
    ax.set_title(title or ("Confusion matrix (rows: recall)" if normalize else "Confusion matrix"))
    ax.figure.tight_layout()
    return ax.figure


def reliability_diagram(bins: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration.

    ``bins`` has one row per equal-width bin with columns ``lower``, ``upper``,
    ``confidence`` (mean confidence in the bin) and ``accuracy`` (NaN for an empty bin).
    Bars below the diagonal: over-confident predictions.
    """
    centers = (bins["lower"] + bins["upper"]) / 2
    width = float((bins["upper"] - bins["lower"]).iloc[0])
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.bar(centers, bins["accuracy"].fillna(0), width=width, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(centers, bins["confidence"], "o", color="tab:red", markersize=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="tab:gray", label="perfect calibration")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "Reliability diagram")
    fig.tight_layout()
    return fig
