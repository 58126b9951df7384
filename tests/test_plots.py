"""Plot helpers: what is drawn (titles, colours, lines) and clear errors for bad input."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from utils import plots

NAMES = ["cat", "dog", "ship"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def images(n: int, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return x if dtype == np.uint8 else x.astype(np.float32) / 255.0


def drawn_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_image_grid_titles_are_class_names():
    fig = plots.image_grid(images(5), [0, 1, 2, 1, 0], NAMES, ncols=3, title="samples")
    axes = drawn_axes(fig)
    assert len(fig.axes) == 6 and len(axes) == 5  # 2x3 grid, one empty cell
    assert [ax.get_title() for ax in axes] == ["cat", "dog", "ship", "dog", "cat"]
    assert fig._suptitle.get_text() == "samples"


def test_image_grid_marks_wrong_predictions_red():
    fig = plots.image_grid(images(3, np.float32), [0, 1, 2], NAMES, predictions=[0, 2, 2])
    axes = drawn_axes(fig)
    assert axes[1].get_title() == "dog\n/ ship"
    colors = [matplotlib.colors.to_hex(ax.title.get_color()) for ax in axes]
    red = matplotlib.colors.to_hex(plots.WRONG_COLOR)
    assert colors[1] == red and colors[0] != red and colors[2] != red


def test_image_grid_bad_input():
    with pytest.raises(ValueError):
        plots.image_grid(images(3), [0, 1], NAMES)  # fewer labels than images
    with pytest.raises(ValueError):
        plots.image_grid(images(3, np.float32) * 255, [0, 1, 2], NAMES)  # floats outside [0, 1]
    with pytest.raises(ValueError):
        plots.image_grid(np.zeros((3, 8, 8, 2)), [0, 1, 2], NAMES)  # not 1 or 3 channels


def test_training_curves_from_dict_and_frame():
    hist = {"loss": [2.0, 1.5, 1.2], "val_loss": [2.1, 1.7, 1.4], "accuracy": [0.3, 0.5, 0.6]}
    fig = plots.training_curves(hist)
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.lines) == 2 and len(acc_ax.lines) == 1  # no val_accuracy given
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [2.1, 1.7, 1.4])
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 2, 3])
    frame = pd.DataFrame(hist).assign(epoch=[5, 6, 7])
    fig2 = plots.training_curves(frame, metrics=("loss",))
    np.testing.assert_array_equal(fig2.axes[0].lines[0].get_xdata(), [5, 6, 7])


def test_training_curves_missing_metric():
    with pytest.raises(ValueError):
        plots.training_curves({"loss": [1.0]}, metrics=("accuracy",))


def test_bar_chart():
    fig = plots.bar_chart({"a": 10.0, "b": 30.0}, reference=25.0, xlabel="images/s")
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == [10.0, 30.0]
    assert len(ax.lines) == 1  # the reference line


def test_confusion_matrix_plot_normalises_rows():
    cm = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 5]])
    fig = plots.confusion_matrix_plot(cm, NAMES)
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown.sum(axis=1), [1, 1, 1])
    assert shown[0, 0] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        plots.confusion_matrix_plot(np.ones((2, 2)), NAMES)


def test_reliability_diagram_draws_the_bins():
    bins = pd.DataFrame({"lower": [0.0, 0.5], "upper": [0.5, 1.0], "count": [0, 4],
                         "confidence": [np.nan, 0.8], "accuracy": [np.nan, 0.75]})
    fig = plots.reliability_diagram(bins, title="calibration")
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [0.0, 0.75]  # an empty bin draws no bar
    assert [p.get_width() for p in ax.patches] == [0.5, 0.5]
    assert ax.get_title() == "calibration"
