# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# **Run time** (measured on the machine that produced the stored outputs)
#
# | mode | 2-core CPU (4 logical CPUs) | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10, model from notebook 04) | 0.2 min (last cell), plus about a minute to start the kernel and load the data | not measured yet |
# | smoke (`SERIES_MODE=smoke`, CI) | 14 s under nbval, with notebook 04's smoke model present | not measured yet |
#
# Without a model from notebook 04 in the same mode, the notebook first trains one
# (full mode: 10 epochs, several minutes; smoke mode: seconds).

# %% [markdown]
# ## Setup
#
# As in every notebook, `setup_devices()` runs first: without GPUs it splits the CPU into 4
# logical devices, which share the same 2 cores (semantics, not speed).

# %%
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

from utils import config, devices

NOTEBOOK_START = time.perf_counter()
devices.setup_devices()
print(devices.device_table().to_string(index=False))

# %%
import tensorflow as tf

from utils import data as cifar
from utils import evaluation, training

tf.get_logger().setLevel("ERROR")  # hide MirroredStrategy's per-call INFO lines and retracing notes
warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed")  # tf.data shuffles itself
print(f"mode: {config.get_mode()}; seed: {config.seed_everything()}")
data = cifar.load_for_mode()
print(data.describe())

# %% [markdown]
# ## Reload the model on one device
#
# `load_or_train_cnn` loads the model that notebook 04 saved in `runs/04_training/`, if it
# was trained in the current mode on the same kind of data. If it is missing (you opened
# this notebook first, or CI runs it on a clean clone), it trains a small one with the series'
# recipe at the current mode's size and saves it, and says so.

# %%
path = training.model_path()
model, note = training.load_or_train_cnn(data, path)
print(note)
info = training.saved_info(path)
print(f"trained with: {info.get('replicas')} replicas, precision {info.get('precision')}, "
      f"{info.get('epochs')} epochs")

# %% [markdown]
# Loaded outside any `strategy.scope()`, the model is an ordinary single-device model:
# its variables are plain variables, and the strategy it was trained under is gone. What the
# file keeps is the architecture, the weights, the optimizer state and each layer's dtype
# policy (`mixed_bfloat16` on this CPU: the layers still compute in bfloat16).

# %%
# NBVAL_CHECK_OUTPUT
print(f"parameters: {model.count_params():,}")
print(f"input: {model.input_shape}, output: {model.output_shape}")
print(f"layer policies: {sorted({layer.dtype_policy.name for layer in model.layers})}")
print(f"distribution strategy: {type(model.distribute_strategy).__name__}")
print(f"kernel of conv1 is a {type(model.trainable_variables[0].value).__name__}")

# %% [markdown]
# ## Test accuracy
#
# `evaluate_model` runs `model.evaluate` (loss and accuracy computed by Keras's metrics) and
# `model.predict` (the probabilities, kept for the analyses below) over the test split fed by
# the same `tf.data` pipeline as training, without shuffling or augmentation.

# %%
one = evaluation.evaluate_model(model, data.x_test, data.y_test)
print(f"test images: {len(one.y_true):,}")
print(f"test accuracy (model.evaluate): {one.accuracy:.4f}; test loss: {one.loss:.4f}")
print(f"test accuracy recomputed from the probabilities: {one.accuracy_from_probs:.4f}")

# %% [markdown]
# ## Evaluation under a strategy equals evaluation on one device
#
# Load the same file inside `strategy.scope()` and the model's `evaluate` and `predict` split
# every batch of 256 over the replicas, each replica scores its share with its own copy of the
# weights, and the results are gathered: the metrics' totals and counts are summed over
# replicas (an all-reduce), the predictions are concatenated in order. The strategy need not
# match the one used for training (its replica count is printed above): below you use 2
# replicas and all 4 logical CPUs, and compare both with the single device.
#
# Every image's prediction depends only on that image and the weights, so the numbers must
# not change. One requirement comes from Keras 3: under a strategy every batch, the last one
# included, must split *evenly* over the replicas (10,000 test images over 2 or 4 replicas
# do). `evaluate_model` refuses a split that does not, with a message that says what to do.

# %%
results = {}
for n in (2, len(devices.compute_devices())):
    strategy = training.make_strategy(devices.compute_devices()[:n])
    distributed = evaluation.load_model(path, strategy)
    results[n] = evaluation.evaluate_model(distributed, data.x_test, data.y_test)
    print(f"{n} replicas: kernel of conv1 is a {type(distributed.trainable_variables[0].value).__name__}; "
          f"test accuracy {results[n].accuracy:.4f}, loss {results[n].loss:.4f}")

# %% [markdown]
# The raw differences (not part of the check below: they are measured numbers):

# %%
comparisons = {n: evaluation.compare_evaluations(one, r, tol=1e-5) for n, r in results.items()}
for n, c in comparisons.items():
    print(f"{n} replicas vs one device: max |probability diff| = {c['max_abs_prob_diff']:.3g}, "
          f"accuracy diff = {abs(results[n].accuracy - one.accuracy):.3g}, "
          f"loss diff = {abs(results[n].loss - one.loss):.3g}")

# %%
# NBVAL_CHECK_OUTPUT
for n, c in comparisons.items():
    print(evaluation.equivalence_verdict(c, f"{results[n].replicas} replicas vs 1 device"))

# %% [markdown]
# ## Per-class precision and recall
#
# Accuracy averages over all classes. For one class *c*:
#
# - **precision**: of the images the model *called* c, the share that really are c;
# - **recall**: of the images that *are* c, the share the model found;
# - **F1**: their harmonic mean; **support**: how many test images are c.
#
# The last row averages the classes with equal weight (CIFAR-10's test split is balanced,
# so macro recall equals accuracy).

# %%
report = evaluation.classification_table(one.y_true, one.y_pred, data.class_names)
report.round(3)

# %%
by_recall = report.drop(index="macro avg").sort_values("recall")
print(f"hardest class (lowest recall): {by_recall.index[0]} ({by_recall['recall'].iloc[0]:.3f}); "
      f"easiest: {by_recall.index[-1]} ({by_recall['recall'].iloc[-1]:.3f})")

# %% [markdown]
# ## Confusion matrix
#
# Row *i*, column *j*: the share of class-*i* test images predicted as class *j*. The
# diagonal is each class's recall; the bright off-diagonal cells are the systematic confusions.

# %%
cm = evaluation.confusion_matrix(one.y_true, one.y_pred, len(data.class_names))
evaluation.plot_confusion_matrix(cm, data.class_names, title=f"Confusion matrix on {data.label} (test)")
plt.show()

# %%
evaluation.top_confusions(cm, data.class_names, n=6).round(3)

# %% [markdown]
# In the stored run the largest confusions are cat and dog, in both directions (186 cats
# called dogs, 162 dogs called cats), then truck taken for automobile and deer for horse:
# classes that look alike at 32x32 pixels. Cat is also the class with the lowest recall.
#
# ## The most confident mistakes
#
# Title: true class, then the predicted class and the model's confidence in it. Confident
# mistakes are worth a look: some are genuinely ambiguous images, some are labelling
# oddities, some show what the model relies on (colour, background).

# %%
evaluation.plot_misclassified(data.x_test, one.y_true, one.probs, data.class_names, n=16)
plt.show()

# %% [markdown]
# ## Can the confidence be trusted?
#
# A model is *calibrated* when, among the predictions it makes with confidence around 0.8,
# about 80% are right. The reliability diagram bins the test predictions by confidence and
# plots each bin's accuracy: bars below the diagonal mean over-confidence, above it
# under-confidence. The expected calibration error (ECE) is the average gap, weighted by how
# many predictions fall in each bin. The histogram shows where the predictions fall.

# %%
evaluation.plot_reliability(one.probs, one.y_true, n_bins=10)
plt.show()

# %% [markdown]
# In the stored run this model is well calibrated: an ECE of 0.0115, and every bin with more
# than 800 predictions lies within 0.05 of the diagonal (table below). Augmentation and a
# decaying learning rate keep it from memorising the training set; a model that overfits,
# like the seed recipe's in notebook 04 (its validation loss rose for six epochs), tends to
# become over-confident.

# %%
ece = evaluation.expected_calibration_error(one.probs, one.y_true, n_bins=10)
print(f"expected calibration error: {ece:.4f}")
evaluation.reliability_table(one.probs, one.y_true, n_bins=10).drop(columns=["lower", "upper"]).round(3)

# %% [markdown]
# ## Summary
#
# - A `.keras` file carries no strategy: load it plainly for one device, or inside any
#   strategy's scope to evaluate with N replicas, whatever N was during training.
# - Evaluation under 2 and 4 replicas gave the same probabilities, predictions, accuracy and
#   loss as one device (the check cell above), because each image is scored independently
#   and the metrics' sums and counts are reduced over replicas. The one Keras 3 requirement:
#   batches that split evenly over the replicas.
# - The per-class table and the confusion matrix show where the model's accuracy comes from
#   and which classes it mixes up; the misclassified grid shows examples.
# - The reliability diagram and the ECE tell you how far to trust the model's confidence.
#
# ## Exercises
#
# 1. **Three replicas.** Try `evaluate_model` under a strategy with 3 replicas on the full test
#    split. What happens, and why? Then evaluate the first 9,999 images (divisible by 3)
#    under 3 replicas and on one device, and compare.

# %% jupyter={"source_hidden": true}
# Solution
three = training.make_strategy(devices.compute_devices()[:3])
model3 = evaluation.load_model(path, three)
try:
    evaluation.evaluate_model(model3, data.x_test, data.y_test)
except ValueError as err:
    print(f"refused: {err}")
n3 = len(data.x_test) - len(data.x_test) % 3
r3 = evaluation.evaluate_model(model3, data.x_test[:n3], data.y_test[:n3])
r1 = evaluation.evaluate_model(model, data.x_test[:n3], data.y_test[:n3])
print(evaluation.equivalence_verdict(evaluation.compare_evaluations(r1, r3), f"3 replicas on {n3} images"))

# %% [markdown]
# 2. **Top-2 accuracy.** How often is the true class among the model's two most probable
#    classes? Which class gains the most from a second guess?

# %% jupyter={"source_hidden": true}
# Solution
top2 = np.argsort(one.probs, axis=1)[:, -2:]
hit2 = (top2 == one.y_true[:, None]).any(axis=1)
print(f"top-1 accuracy {one.accuracy_from_probs:.4f}, top-2 accuracy {hit2.mean():.4f}")
gain = {name: hit2[one.y_true == k].mean() - (one.y_pred == k)[one.y_true == k].mean()
        for k, name in enumerate(data.class_names)}
best = max(gain, key=gain.get)
print(f"largest gain from a second guess: {best} (+{gain[best]:.3f})")

# %% [markdown]
# 3. **Temperature scaling** (Guo et al., 2017). Divide the logits by a temperature *T*
#    before the softmax: *T* > 1 softens over-confident predictions without changing any
#    predicted class. Find the *T* in 0.5 ... 3 that minimises the ECE. (To do it properly,
#    choose *T* on held-out training images, not on the test split.)

# %% jupyter={"source_hidden": true}
# Solution
logits = np.log(np.clip(one.probs.astype(np.float64), 1e-12, 1.0))  # softmax(log p) = p
best_t, best_ece = 1.0, ece
for t in np.arange(0.5, 3.01, 0.1):
    scaled = np.exp(logits / t)
    scaled /= scaled.sum(axis=1, keepdims=True)
    e = evaluation.expected_calibration_error(scaled, one.y_true)
    if e < best_ece:
        best_t, best_ece = float(t), e
print(f"ECE at T=1: {ece:.4f}; best T = {best_t:.1f} with ECE {best_ece:.4f}")

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
