# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,jupyter,-all
#     formats: ipynb,py//py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Evaluating the trained CNN, on one device or many
#
# Notebook 04 trained the seed CNN under a `MirroredStrategy` and saved it as a `.keras`
# file. A saved model does not remember the strategy it was trained under: here you reload
# it on one device and under strategies with a different number of replicas, check that all
# of them give the same answer, and then look past the single accuracy number: which
# classes the model gets right, which it confuses, what its worst mistakes look like, and
# whether its confidence can be trusted.
#
# **What you will learn**
#
# - how to reload a `.keras` model outside any strategy, and inside a strategy with a
#   different number of replicas than it was trained with;
# - why evaluation under a strategy gives the same result as on one device, and how to check it;
# - how to read a per-class precision/recall table and a confusion matrix;
# - how to find the model's most confident mistakes;
# - how to read a reliability diagram and the expected calibration error (ECE).
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 1.2 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 22 s | not measured |
# <!-- runtime:end -->
#
# Without a model saved by notebook 04 in the same mode, this notebook first trains one
# (the table's full time assumes notebook 04's model is there).

# %% [markdown]
# ## Setup
#
# As in every notebook, `setup_devices()` runs first: without GPUs it splits the CPU into 4
# logical devices, which share the same 2 cores (semantics, not speed).

# %% tags=["device-check"]
import time

import matplotlib.pyplot as plt

from utils import config, devices

print("mode:", config.get_mode())
NOTEBOOK_START = time.perf_counter()
devices.setup_devices()
print(devices.device_table().to_string(index=False))

# %% tags=["device-check"]
import keras
import numpy as np
import pandas as pd

from utils import data as cifar
from utils import plots
from utils.lessons.cifar10_pipeline import make_dataset
from utils.lessons.mirrored_strategy import max_abs_diff
from utils.lessons.training import load_or_train_cnn, model_path, saved_info

print(f"seed: {config.seed_everything()}")
data = cifar.load_for_mode()
print(data.describe())

# %% [markdown]
# ## Reload the model on one device
#
# `load_or_train_cnn` (written in notebook 04) loads the model that notebook 04 saved in
# `runs/04_training/`, if it was trained in the current mode on the same kind of data. If it
# is missing (you opened this notebook first, or CI runs it on a clean clone), it trains a
# small one with the series' recipe at the current mode's size and saves it, and says so.

# %% tags=["device-check"]
path = model_path()
model, note = load_or_train_cnn(data, path)
print(note)
info = saved_info(path)
print(f"trained with: {info.get('replicas')} replicas, precision {info.get('precision')}, "
      f"{info.get('epochs')} epochs")

# %% [markdown]
# Loaded outside any `strategy.scope()`, the model is an ordinary single-device model:
# its variables are plain variables, and the strategy it was trained under is gone. What the
# file keeps is the architecture, the weights, the optimizer state and each layer's dtype
# policy (the one notebook 04's `choose_precision` picked for the machine that trained it).

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
print(f"parameters: {model.count_params():,}")
print(f"input: {model.input_shape}, output: {model.output_shape}")
print(f"distribution strategy: {type(model.distribute_strategy).__name__}")
print(f"kernel of conv1 is a {type(model.trainable_variables[0].value).__name__}")

# %% [markdown]
# ## Evaluate: the loss and accuracy, and every probability
#
# `evaluate` feeds the test split through the same `tf.data` pipeline as training, without
# shuffling or augmentation, and runs both `model.evaluate` (loss and accuracy computed by
# Keras's metrics) and `model.predict` (the probabilities, kept for the analyses below).
#
# Under a strategy Keras 3 splits every batch over the replicas, and every batch, the last
# one included, must split *evenly*: so the global batch is rounded down to a multiple of
# the replica count, and a number of images that no batch size can split is refused with a
# message that says what to do.

# %% tags=["device-check"]
def evaluate(model, x, y, batch_size=256):
    """``model.evaluate`` and ``model.predict`` over uint8 images, with or without a strategy."""
    # 1. batches that split evenly over the replicas
    replicas = model.distribute_strategy.num_replicas_in_sync
    if len(x) % replicas:
        raise ValueError(f"{len(x)} images do not split evenly over {replicas} replicas; "
                         f"evaluate the first {len(x) - len(x) % replicas} images")
    ds = make_dataset(x, y, batch_size - batch_size % replicas, training=False)
    # 2. metrics (sums and counts reduced over replicas) and probabilities (gathered in order)
    loss, accuracy = model.evaluate(ds, verbose=0)
    probs = model.predict(ds.map(lambda images, labels: images), verbose=0)
    return {"replicas": replicas, "loss": loss, "accuracy": accuracy,
            "probs": np.asarray(probs, np.float32), "y": np.asarray(y)}


# %% tags=["device-check"]
one = evaluate(model, data.x_test, data.y_test)
y_pred = one["probs"].argmax(axis=1)
print(f"test images: {len(one['y']):,}")
print(f"test accuracy (model.evaluate): {one['accuracy']:.4f}; test loss: {one['loss']:.4f}")
print(f"test accuracy recomputed from the probabilities: {np.mean(y_pred == one['y']):.4f}")

# %% [markdown]
# ## Evaluation under a strategy equals evaluation on one device
#
# Load the same file inside `strategy.scope()` and the model's `evaluate` and `predict` split
# every batch of 256 over the replicas, each replica scores its share with its own copy of the
# weights, and the results are gathered: the metrics' totals and counts are summed over
# replicas (an all-reduce), the predictions are concatenated in order. The strategy need not
# match the one used for training (its replica count is printed above): below you use 2
# replicas and all the logical CPUs, and compare both with the single device.
#
# Every image's prediction depends only on that image and the weights, so the numbers must
# not change.

# %% tags=["device-check"]
def load_under(strategy):
    """The saved model, loaded inside ``strategy.scope()``: mirrored variables."""
    with strategy.scope():
        return keras.models.load_model(path)


def same_evaluation(a, b, tol=1e-5):
    """Verdicts (no raw numbers) that two evaluations of one model on one split agree."""
    return {"probabilities within tol": max_abs_diff(a["probs"], b["probs"]) <= tol,
            "same predicted classes": bool(np.array_equal(a["probs"].argmax(1), b["probs"].argmax(1))),
            "same accuracy": abs(a["accuracy"] - b["accuracy"]) <= 1e-6,
            "same loss": abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"]))}


N = len(devices.compute_devices())
if N == 1:
    print("1 device: a strategy over it has one replica, nothing is split")
results = {}
with config.quiet_tf_logs():  # other image counts retrace the step functions: expected
    for n in sorted({min(2, N), N}):
        keep = len(data.x_test) // n * n  # every replica scores the same number of images
        if keep < len(data.x_test):
            print(f"{len(data.x_test)} images do not split over {n} replicas: comparing the first {keep}")
        reference = one if keep == len(data.x_test) else evaluate(model, data.x_test[:keep], data.y_test[:keep])
        distributed = load_under(devices.make_strategy(devices.compute_devices()[:n]))
        results[n] = (reference, evaluate(distributed, data.x_test[:keep], data.y_test[:keep]))
        print(f"{n} replicas: kernel of conv1 is a {type(distributed.trainable_variables[0].value).__name__}; "
              f"test accuracy {results[n][1]['accuracy']:.4f}, loss {results[n][1]['loss']:.4f}; "
              f"max |probability diff| vs one device {max_abs_diff(reference['probs'], results[n][1]['probs']):.3g}")

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
for reference, r in results.values():
    print(f"{r['replicas']} replicas vs 1 device (tolerance 1e-05): {same_evaluation(reference, r)}")

# %% [markdown]
# ## Per-class precision and recall
#
# Accuracy averages over all classes. For one class *c*:
#
# - **precision**: of the images the model *called* c, the share that really are c;
# - **recall**: of the images that *are* c, the share the model found;
# - **F1**: their harmonic mean; **support**: how many test images are c.
#
# All of them come from the **confusion matrix**: row *i*, column *j* counts the class-*i*
# images predicted as class *j*. Its diagonal holds the correct predictions; a column sum
# is how often a class was predicted, a row sum how often it occurs.

# %%
def confusion_matrix(y_true, y_pred, num_classes):
    """Counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_table(cm, class_names):
    """Per-class precision, recall, F1 and support, plus a ``macro avg`` row."""
    # 1. correct predictions, predictions made, images present: diagonal, columns, rows
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    # 2. the ratios (0 where a class was never predicted)
    precision = np.divide(tp, predicted, out=np.zeros(len(cm)), where=predicted > 0)
    recall = tp / support
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(cm)),
                   where=precision + recall > 0)
    table = pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "support": support},
                         index=pd.Index(class_names, name="class"))
    # 3. the macro average weighs every class equally
    table.loc["macro avg"] = [precision.mean(), recall.mean(), f1.mean(), support.sum()]
    return table.astype({"support": int})


# %%
# NBVAL_CHECK_OUTPUT
toy = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
print(toy)
print(classification_table(toy, ["a", "b", "c"]).round(3).to_string())

# %% [markdown]
# On the toy labels above: class *a* was predicted twice and right once (precision 0.5), and
# found once in two images (recall 0.5); *c* was never predicted, so its precision is 0.
# Now on the test split:

# %%
cm = confusion_matrix(one["y"], y_pred, len(data.class_names))
report = classification_table(cm, data.class_names)
report.round(3)

# %%
by_recall = report.drop(index="macro avg").sort_values("recall")
print(f"hardest class (lowest recall): {by_recall.index[0]} ({by_recall['recall'].iloc[0]:.3f}); "
      f"easiest: {by_recall.index[-1]} ({by_recall['recall'].iloc[-1]:.3f})")

# %% [markdown]
# The matrix itself, with rows normalised to shares (the diagonal is each class's recall);
# the bright off-diagonal cells are the systematic confusions, listed below it.

# %%
plots.confusion_matrix_plot(cm, data.class_names, title=f"Confusion matrix on {data.label} (test)")
plt.show()

# %%
off = cm.copy()
np.fill_diagonal(off, 0)
worst = np.argsort(off, axis=None)[::-1][:6]
pd.DataFrame([{"true": data.class_names[i], "predicted": data.class_names[j], "count": off[i, j],
               "share of true class": round(off[i, j] / cm[i].sum(), 3)}
              for i, j in zip(*np.unravel_index(worst, off.shape), strict=True) if off[i, j]])

# %% [markdown]
# On real CIFAR-10 the largest confusions are between classes that look alike at 32x32
# pixels (the table above lists them for this run).
#
# ## The most confident mistakes
#
# Title: true class, then the predicted class (in red). Confident mistakes are worth a look:
# some are genuinely ambiguous images, some are labelling oddities, some show what the model
# relies on (colour, background).

# %%
confidence = one["probs"].max(axis=1)
wrong = np.flatnonzero(y_pred != one["y"])
shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:16]
print(f"mistakes: {len(wrong)}; confidence of the {len(shown)} shown: {np.round(confidence[shown], 2)}")
if len(shown):
    plots.image_grid(data.x_test[shown], one["y"][shown], data.class_names, predictions=y_pred[shown],
                     title="Most confident mistakes: true / predicted")
    plt.show()

# %% [markdown]
# ## Can the confidence be trusted?
#
# A model is *calibrated* when its confidence matches its accuracy: among the predictions
# it makes with confidence near *p*, a share *p* is right. Bin the test predictions by confidence (the largest probability) and
# compare, in each bin, the mean confidence with the accuracy. The expected calibration
# error (ECE) is the average gap, weighted by how many predictions fall in each bin.

# %%
def calibration_bins(probs, y_true, n_bins=10):
    """One row per equal-width confidence bin: count, mean confidence, accuracy, gap."""
    # 1. confidence = the largest probability; correct = its class is the label
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    # 2. put each prediction in its bin (a confidence of exactly 1.0 goes in the last one)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = which == b
        rows.append({"lower": edges[b], "upper": edges[b + 1], "count": int(inside.sum()),
                     "confidence": confidence[inside].mean() if inside.any() else np.nan,
                     "accuracy": correct[inside].mean() if inside.any() else np.nan})
    bins = pd.DataFrame(rows)
    bins["gap"] = bins["confidence"] - bins["accuracy"]  # > 0: over-confident
    return bins


def expected_calibration_error(bins):
    """ECE (Guo et al., 2017): the count-weighted mean of |confidence - accuracy|."""
    filled = bins[bins["count"] > 0]
    return float((filled["count"] * filled["gap"].abs()).sum() / filled["count"].sum())


# %%
# NBVAL_CHECK_OUTPUT
toy_probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
toy_bins = calibration_bins(toy_probs, np.array([0, 0, 0, 1]))
print(toy_bins[toy_bins["count"] > 0].round(3).to_string(index=False))
print(f"ECE of the toy predictions: {expected_calibration_error(toy_bins):.3f}")

# %% [markdown]
# Two right answers at confidence 0.95 (gap -0.05: under-confident), one right and one
# wrong at 0.55 (gap 0.05: over-confident): an ECE of 0.05. Now the model. In the reliability
# diagram, bars below the diagonal mean over-confidence, above it under-confidence.

# %%
bins = calibration_bins(one["probs"], one["y"])
ece = expected_calibration_error(bins)
print(f"expected calibration error: {ece:.4f}")
plots.reliability_diagram(bins, title=f"Reliability diagram (ECE = {ece:.3f})")
plt.show()
bins.round(3)

# %% [markdown]
# Read the table with the diagram: the bins with most predictions decide the ECE. A model
# that overfits, like the seed recipe's in notebook 04 without augmentation, tends to become
# over-confident; augmentation and a decaying learning rate work against it.
#
# ## Summary
#
# - A `.keras` file carries no strategy: load it plainly for one device, or inside any
#   strategy's scope to evaluate with N replicas, whatever N was during training.
# - Evaluation under 2 and 4 replicas gave the same probabilities, predictions, accuracy and
#   loss as one device (the check cell above), because each image is scored independently
#   and the metrics' sums and counts are reduced over replicas. The one Keras 3 requirement:
#   batches that split evenly over the replicas.
# - The confusion matrix gives the per-class precision and recall and shows which classes the
#   model mixes up; the misclassified grid shows examples.
# - The reliability diagram and the ECE tell you how far to trust the model's confidence.
#
# ## Exercises
#
# 1. **Three replicas.** Try `evaluate` under a strategy with 3 replicas on the full test
#    split. What happens, and why? Then evaluate the first images that 3 divides evenly
#    under 3 replicas and on one device, and compare.

# %%
# Try it: change N_REPLICAS to 3 (this machine has enough logical CPUs).
N_REPLICAS = 2  # TODO: 3
model_n = load_under(devices.make_strategy(devices.compute_devices()[:N_REPLICAS]))
print(f"{N_REPLICAS} replicas: accuracy {evaluate(model_n, data.x_test, data.y_test)['accuracy']:.4f}")

# %% jupyter={"source_hidden": true}
# Solution
model3 = load_under(devices.make_strategy(devices.compute_devices()[:3]))
try:
    evaluate(model3, data.x_test, data.y_test)
except ValueError as err:
    print(f"refused: {err}")
n3 = len(data.x_test) - len(data.x_test) % 3
with config.quiet_tf_logs():  # new shapes retrace the step functions: expected here
    r3 = evaluate(model3, data.x_test[:n3], data.y_test[:n3])
    r1 = evaluate(model, data.x_test[:n3], data.y_test[:n3])
print(f"3 replicas vs 1 device on {n3} images: {same_evaluation(r1, r3)}")

# %% [markdown]
# 2. **Top-2 accuracy.** How often is the true class among the model's two most probable
#    classes? Which class gains the most from a second guess?

# %%
# Try it: np.argsort(one["probs"], axis=1)[:, -K:] holds the K most probable classes.
K = 1  # TODO: 2
top_k = np.argsort(one["probs"], axis=1)[:, -K:]
print(f"top-{K} accuracy: {(top_k == one['y'][:, None]).any(axis=1).mean():.4f}")

# %% jupyter={"source_hidden": true}
# Solution
top2 = np.argsort(one["probs"], axis=1)[:, -2:]
hit2 = (top2 == one["y"][:, None]).any(axis=1)
print(f"top-1 accuracy {np.mean(y_pred == one['y']):.4f}, top-2 accuracy {hit2.mean():.4f}")
gain = {name: hit2[one["y"] == k].mean() - (y_pred == k)[one["y"] == k].mean()
        for k, name in enumerate(data.class_names)}
best = max(gain, key=gain.get)
print(f"largest gain from a second guess: {best} (+{gain[best]:.3f})")

# %% [markdown]
# 3. **Temperature scaling** (Guo et al., 2017). Divide the logits by a temperature *T*
#    before the softmax: *T* > 1 softens over-confident predictions without changing any
#    predicted class. Choose the *T* in 0.5 ... 3 that minimises the ECE on a **validation
#    split** (the last tenth of the training images, which notebook 04's recipe held out and
#    never trained on), then report the test ECE before and after. Choosing *T* on the test
#    split would make the test ECE optimistic.

# %%
# Try it: scale the validation probabilities with T and compare ECEs.
def with_temperature(probs, t):
    """softmax(log(p) / t): the same predicted class, softer (t > 1) or sharper (t < 1)."""
    scaled = np.exp(np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / t)
    return scaled / scaled.sum(axis=1, keepdims=True)


T = 1.0  # TODO: try several values
print(f"test ECE at T={T}: {expected_calibration_error(calibration_bins(with_temperature(one['probs'], T), one['y'])):.4f}")

# %% jupyter={"source_hidden": true}
# Solution
n_val = len(data.x_train) // 10  # notebook 04's held-out validation images
with config.quiet_tf_logs():
    val = evaluate(model, data.x_train[-n_val:], data.y_train[-n_val:])


def val_ece(t):
    return expected_calibration_error(calibration_bins(with_temperature(val["probs"], t), val["y"]))


best_t = min(np.arange(0.5, 3.01, 0.1), key=val_ece)  # chosen on validation only
test_after = expected_calibration_error(calibration_bins(with_temperature(one["probs"], best_t), one["y"]))
print(f"T chosen on {n_val} validation images: {best_t:.1f} (validation ECE {val_ece(1.0):.4f} -> {val_ece(best_t):.4f})")
print(f"test ECE: {ece:.4f} at T=1 -> {test_after:.4f} at T={best_t:.1f}")

# %% [markdown]
# ## Run time of this notebook

# %%
print(f"notebook run time: {(time.perf_counter() - NOTEBOOK_START) / 60:.1f} min "
      f"({config.get_mode()} mode, {devices.device_kind()})")

# %% [markdown]
# ## Further reading
#
# - TensorFlow guide, [Distributed training with Keras](https://www.tensorflow.org/tutorials/distribute/keras)
#   (evaluating and saving under a strategy) and
#   [Save and load models](https://www.tensorflow.org/tutorials/keras/save_and_load).
# - Keras guide, [Saving, serialization and exporting](https://keras.io/guides/serialization_and_saving/).
# - C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, *On Calibration of Modern Neural Networks*,
#   ICML 2017 (reliability diagrams, ECE, temperature scaling). arXiv:1706.04599.
# - M. P. Naeini, G. Cooper, M. Hauskrecht, *Obtaining Well Calibrated Probabilities Using
#   Bayesian Binning*, AAAI 2015 (the expected calibration error).
# - A. Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009 (CIFAR-10).
