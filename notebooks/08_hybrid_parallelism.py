# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Hybrid parallelism and very large models
#
# Data parallelism copies the whole model to every device; tensor parallelism splits each
# layer. Real large-model training does both at once, on a 2-D grid of devices: one axis
# splits the batch, the other splits the layers. This notebook builds that grid with
# DTensor, trains the CNN on it, shards a transformer block the way Megatron-LM does, and
# then steps back to count bytes: how much memory a 1-billion or 175-billion parameter
# model needs per device under each strategy, and what mixed precision and activation
# recomputation buy.
#
# **What you will learn**
#
# - how to lay devices out as a 2-D `batch × model` mesh, and what goes on each axis;
# - how to train the CNN with a data-parallel convolutional trunk and a tensor-parallel
#   dense head, and prove its first steps equal to plain data parallelism;
# - how per-device memory and throughput change across 4×1, 2×2 and 1×4 meshes;
# - how Megatron-LM shards a decoder-only transformer block (attention heads, then a
#   column- then row-parallel MLP) and how to prove it equal to an unsharded Keras block;
# - how to count parameter, gradient, optimizer and activation bytes under data, tensor and
#   pipeline parallelism and ZeRO 1–3, reproduce figure 1 of the ZeRO paper, and find the
#   smallest layout that fits a model on devices of a given size;
# - what mixed precision and `tf.recompute_grad` save in memory and cost in time, measured.
#
# **Run time**
#
# | mode  | 2-core CPU (4 logical CPUs)                          | GPU              |
# |-------|------------------------------------------------------|------------------|
# | full  | 7½ minutes on a busy shared machine (4½ min of CPU)  | not measured yet |
# | smoke | 1 minute on a busy shared machine (45 s of CPU)      | not measured yet |

# %% [markdown]
# ## Setup

# %%
import utils  # noqa: F401  (quiets TensorFlow's C++ start-up log)
from utils import config, data, devices, hybrid, memory, models, training
from utils import tensor_parallel as tp

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
print("mode:", config.get_mode())
S = config.sizes()
pd.set_option("display.width", 140)

# %%
cifar = data.load_cifar10(allow_synthetic=config.is_smoke(), n_train=S.n_train, n_test=S.n_test)
print(cifar.describe())

# %% [markdown]
# ## 1. A 2-D mesh: data parallel × tensor parallel
#
# A DTensor mesh names its axes. Here there are two: `batch` (devices that hold different
# examples, i.e. data parallelism) and `model` (devices that hold different slices of a
# layer, i.e. tensor parallelism). With 4 devices the possible shapes are 4×1 (pure data
# parallelism), 2×2 (both) and 1×4 (pure tensor parallelism). Every device of a `model`
# group sees the same examples; every device of a `batch` group holds the same slices.
#
# On this machine the 4 devices are logical CPUs that share the same 2 cores: you see the
# semantics of the layout (who holds what, what is communicated, whether the numbers
# match), not a speed-up. On a machine with GPUs the same code uses the GPUs.

# %%
# NBVAL_CHECK_OUTPUT
n_devices = len(devices.compute_devices())
shapes = hybrid.mesh_shapes(n_devices)
print("mesh shapes (batch x model) that use all", n_devices, "devices:", shapes)
batch_size_mesh, model_size_mesh = shapes[len(shapes) // 2]  # the most "square" one
mesh = hybrid.hybrid_mesh(batch_size_mesh, model_size_mesh)
print(tp.mesh_table(mesh).to_string(index=False))

# %% [markdown]
# A shape that does not use exactly the devices you have is refused with a message that
# lists the shapes that would fit:

# %%
# NBVAL_CHECK_OUTPUT
try:
    hybrid.hybrid_mesh(3, 2)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ### The CNN with a widened head
#
# The seed CNN has most of its parameters in `dense1`. Widen that layer from 128 to 1,024
# units (`hybrid.widened_cnn`) and the head holds almost all of the parameters while the
# convolutions still do most of the arithmetic: the classic case for splitting the head
# and replicating the trunk.

# %%
# NBVAL_CHECK_OUTPUT
wide = hybrid.widened_cnn(head_units=1024)
print("dense1 units: seed CNN", models.build_seed_cnn().get_layer("dense1").units,
      "-> widened", wide.get_layer("dense1").units)
table = models.layer_table(wide)
print(table[["layer", "output shape", "params", "FLOPs/image"]].to_string(index=False))
head_params = int(table.loc[table.layer.isin(["dense1", "output"]), "params"].sum())
print(f"\nhead (dense1 + output): {head_params:,} of {wide.count_params():,} parameters "
      f"({head_params / wide.count_params():.1%})")

# %% [markdown]
# `hybrid.HybridCNN` copies this Keras model onto the mesh. The convolution weights are
# replicated (DTensor rejects convolution filters split on output channels anyway), their
# activations are split on `batch`; `dense1` is column-parallel and `output` row-parallel
# over `model`, using the layers of `utils.tensor_parallel`. Read the layouts and the
# shapes each device actually holds:

# %%
# NBVAL_CHECK_OUTPUT
net = hybrid.HybridCNN.from_keras(wide, mesh)
print(tp.layout_table(net.weights())[["tensor", "global shape", "sharding", "shard shape"]].to_string(index=False))
(x_probe,) = hybrid.batch_to_mesh(mesh, cifar.x_train[:8].astype(np.float32) / 255)
acts = {k: v for k, v in net.activations(x_probe).items()}
print()
print(tp.layout_table(acts)[["tensor", "global shape", "sharding", "shard shape"]].to_string(index=False))

# %% [markdown]
# Each device runs the convolutions on its share of the batch (the batch is split over the
# `batch` axis only), and the devices of one `model` group compute the same convolutions on
# the same images. The head's hidden activations are split by units. The
# row-parallel output layer produces partial sums that DTensor all-reduces over `model`;
# the gradients of the replicated trunk are all-reduced over `batch`. Both collectives are
# inserted by DTensor from the layouts: the training step is ordinary TensorFlow code.
#
# ### Same first steps as pure data parallelism
#
# If the sharding is right, the mesh computes exactly what a plain data-parallel run
# computes. The reference here is independent code: Keras `model.fit` under
# `tf.distribute.MirroredStrategy` over the same devices, starting from the same weights,
# with Keras's own Adam. `hybrid.Optimizer` reproduces Keras 3's update rule on DTensors
# (its moment buffers get the layout of their weight).

# %%
eq_steps, eq_batch = 3, 128
reference = hybrid.keras_data_parallel_steps(
    wide, cifar.x_train, cifar.y_train, steps=eq_steps, batch_size=eq_batch,
    optimizer=hybrid.Optimizer("adam", 1e-3),
)
on_mesh = hybrid.hybrid_steps(
    hybrid.HybridCNN.from_keras(wide, mesh), cifar.x_train, cifar.y_train,
    steps=eq_steps, batch_size=eq_batch, optimizer=hybrid.Optimizer("adam", 1e-3),
)
loss_diff = on_mesh.max_loss_diff(reference)
weight_diffs = on_mesh.max_weight_diff(reference)
print("losses, MirroredStrategy:", np.round(reference.losses, 6))
print("losses, 2-D mesh:        ", np.round(on_mesh.losses, 6))
print(f"max |loss diff| = {loss_diff:.1e}")
print("max |weight diff| after each step:", ", ".join(f"{d:.1e}" for d in weight_diffs))

# %%
# NBVAL_CHECK_OUTPUT
TOL = 1e-5
print(f"{eq_steps} Adam steps, global batch {eq_batch}, {batch_size_mesh}x{model_size_mesh} mesh vs MirroredStrategy:")
print(f"losses of all {eq_steps} steps equal within {TOL}: {loss_diff <= TOL}")
print(f"weights after the first step equal within 1e-6: {weight_diffs[0] <= 1e-6}")

# %% [markdown]
# The two runs compute the same losses and, after one step, the same weights up to float
# rounding. Rounding differs because the sums are split differently (two partial sums per
# gradient on the mesh, four under `MirroredStrategy`), and the printed weight differences
# grow over the next steps: each step starts from very slightly different weights, and
# Adam divides every gradient by its own running magnitude, which magnifies the rounding
# of weights whose gradient is nearly zero. That is ordinary floating-point behaviour, not
# a sharding error: a wrong layout shows up as differences in the losses and in the very
# first step.

# %% [markdown]
# ### Train it on CIFAR-10
#
# Now train the hybrid model with Adam at batch 128 and check the test accuracy along the
# way (10% is chance).

# %%
train_steps = config.pick(smoke=8, full=800)
log_every = config.pick(smoke=4, full=160)
hybrid_net = hybrid.HybridCNN.from_keras(wide, mesh)
history = hybrid.train(
    hybrid_net, hybrid.Optimizer("adam", 1e-3), cifar.x_train, cifar.y_train,
    steps=train_steps, batch_size=128, log_every=log_every,
    eval_fn=lambda: hybrid.evaluate(hybrid_net, cifar.x_test, cifar.y_test),
)
print(history.round(3).to_string(index=False))
print(f"\n{train_steps} steps = {train_steps * 128 / len(cifar.x_train):.1f} epochs of "
      f"{len(cifar.x_train):,} images; final test accuracy on {len(cifar.x_test):,} "
      f"{cifar.label} test images: {history['test accuracy'].iloc[-1]:.1%}")

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].plot(history["step"], history["loss"], marker="o")
ax[0].set(xlabel="step", ylabel="training loss", title=f"Hybrid {batch_size_mesh}x{model_size_mesh} mesh")
ax[1].plot(history["step"], history["test accuracy"], marker="o", color="tab:green")
ax[1].axhline(0.1, ls="--", color="grey", label="chance")
ax[1].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title=cifar.label)
ax[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The model learns: the test accuracy, measured on the whole test set at every logged step,
# climbs far above the 10% of chance within the two epochs (last row above). More epochs
# would take it further; the point here is that the hybrid layout trains like any other.
#
# ### 4×1, 2×2, 1×4: memory and speed per mesh shape
#
# `hybrid.mesh_comparison` builds the model on each mesh, runs a step so every buffer
# exists, and adds up the bytes of the shards each device really holds: parameters,
# gradients and Adam's two moment buffers. Then it times training steps.

# %%
mesh_table = hybrid.mesh_comparison(
    wide, shapes, cifar.x_train, cifar.y_train, batch_size=128, bench_steps=S.bench_batches,
)
spec = memory.spec_from_keras(wide, tensor_parallel_layers=["dense1", "output"])
calc = [
    memory.estimate(spec, memory.Layout(dp=b, tp=m), memory.Training("adam", "fp32")).model_states
    for b, m in shapes
]
mesh_table["calculator bytes/device"] = [int(c) for c in calc]

# %%
# NBVAL_CHECK_OUTPUT
byte_cols = ["mesh (batch x model)", "params bytes/device", "grads bytes/device",
             "optimizer bytes/device", "total bytes/device"]
print(mesh_table[byte_cols].to_string(index=False))
rel = (mesh_table["calculator bytes/device"] - mesh_table["total bytes/device"]).abs() / mesh_table["total bytes/device"]
print("\nutils.memory agrees with the shard shapes within 0.1%:", bool((rel < 1e-3).all()))
replicated_total = mesh_table["total bytes/device"].iloc[0]
print("per-device state vs pure data parallelism:",
      ", ".join(f"{s}: {t / replicated_total:.2f}" for s, t in
                zip(mesh_table["mesh (batch x model)"], mesh_table["total bytes/device"])))

# %%
print(mesh_table[["mesh (batch x model)", "total bytes/device", "images/s"]].round(0).to_string(index=False))
fastest = mesh_table.loc[mesh_table["images/s"].idxmax(), "mesh (batch x model)"]
print(f"\nfastest here: {fastest}; 1x{n_devices} runs at "
      f"{mesh_table['images/s'].iloc[-1] / mesh_table['images/s'].iloc[0]:.2f}x the speed of {n_devices}x1")

# %% [markdown]
# Read the two tables together:
#
# - **Memory** follows the layouts exactly. The replicated trunk is small, so splitting the
#   head over `model` cuts the per-device state roughly by the `model` size. The calculator
#   in `utils.memory` predicts the same bytes (the only difference: the row-parallel output
#   bias is replicated, 10 numbers).
# - **Speed** on logical CPUs measures total work, because the 4 "devices" share 2 cores.
#   Every device in a `model` group repeats the trunk's convolutions on the same images,
#   so the 1×4 mesh does the convolutions four times over: it is clearly the slowest (the
#   printed ratio). The 4×1 mesh does the least total work, 2×2 repeats the trunk twice;
#   between those two, the printed difference is within the noise of a shared 2-core
#   machine where four logical devices compete for two cores. On real GPUs each device has
#   its own compute: data parallelism scales throughput, tensor parallelism adds an
#   all-reduce per split layer and is worth it when a layer's weights do not fit one device
#   or when the batch cannot grow further.
#
# ## 2. A decoder-only transformer block, sharded the Megatron way
#
# "Very large" today means transformers. A decoder block is layer norm → causal multi-head
# attention → residual → layer norm → MLP → residual. Megatron-LM (Shoeybi et al. 2019)
# splits it over `model` with two all-reduces per block in the forward pass:
#
# - **attention**: the query, key and value projections are split *by head* (each device
#   computes whole heads, attention needs no communication), the output projection is
#   row-parallel (partial sums, one all-reduce);
# - **MLP**: the first matrix is column-parallel, GELU works on the local slice, the second
#   is row-parallel (one all-reduce).
#
# The training text ships with Python: the docstrings of a few dozen standard-library
# modules (`hybrid.text_corpus`), modelled character by character. No download needed.

# %%
text = hybrid.text_corpus()
tokenizer = hybrid.CharTokenizer()  # printable ASCII, tab and newline
ids = tokenizer.encode(text)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
print(f"{len(text):,} characters; vocabulary: {tokenizer.vocab_size} characters")
print(repr(text[:300]))

# %%
lm_cfg = hybrid.TransformerConfig(
    vocab_size=tokenizer.vocab_size, seq_len=64, d_model=64, n_heads=4, d_ff=256, n_layers=2
)
lm_weights = hybrid.init_transformer_weights(lm_cfg, seed=0)
lm = hybrid.TransformerLM(lm_cfg, lm_weights, mesh)
print(f"parameters: {lm_cfg.n_params:,}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"config: d_model={lm_cfg.d_model}, heads={lm_cfg.n_heads} (head dim {lm_cfg.head_dim}), "
      f"d_ff={lm_cfg.d_ff}, layers={lm_cfg.n_layers}, seq_len={lm_cfg.seq_len}")
block0 = {n.split("/", 1)[1]: v for n, v in lm.params.items() if n.startswith("block0/")}
print(tp.layout_table(block0)[["tensor", "global shape", "sharding", "shard shape"]].to_string(index=False))

# %% [markdown]
# Each device holds 2 of the 4 heads' projections and half of the MLP. Now the proof: the
# reference is an independent Keras block (`keras.layers.MultiHeadAttention` with a causal
# mask, `LayerNormalization`, two `Dense` layers) loaded with the same weights. Compare the
# outputs and the gradients with respect to the input and every weight; then compare the
# whole sharded language model with the same model unsharded on one device.

# %%
rng = np.random.default_rng(0)
x_block = rng.normal(size=(8, lm_cfg.seq_len, lm_cfg.d_model)).astype(np.float32)
keras_ref = hybrid.keras_block(lm_cfg, {k: tp.to_numpy(v) for k, v in block0.items()})
block_diffs = hybrid.compare_block(lm, keras_ref, x_block, block=0)
print("relative differences, sharded block vs Keras block:", {k: f"{v:.1e}" for k, v in block_diffs.items()})

lm_single = hybrid.TransformerLM(lm_cfg, lm_weights)  # unsharded, one device
xt, yt = hybrid.random_windows(train_ids, 8, lm_cfg.seq_len, rng)
loss_sh, grads_sh = hybrid.make_grad_fn(lm, list(lm.params.values()), hybrid.lm_loss)(
    *hybrid.batch_to_mesh(mesh, xt, yt))
loss_1, grads_1 = hybrid.make_grad_fn(lm_single, list(lm_single.params.values()), hybrid.lm_loss)(
    tf.constant(xt), tf.constant(yt))
lm_loss_diff = abs(float(tp.to_numpy(loss_sh)) - float(loss_1))
lm_grad_diff = max(tp.max_abs_diff(a, b) for a, b in zip(grads_sh, grads_1)) / max(
    float(tf.reduce_max(tf.abs(g))) for g in grads_1)
print(f"language model: |loss diff| = {lm_loss_diff:.1e}, gradient diff / largest gradient = {lm_grad_diff:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("sharded block equals the Keras block (output, input and weight gradients) within 1e-5:",
      all(v <= 1e-5 for v in block_diffs.values()))
print("sharded language model equals the unsharded one (loss and all gradients) within 1e-5:",
      lm_loss_diff <= 1e-5 and lm_grad_diff <= 1e-5)

# %% [markdown]
# Train the sharded model for a while on the `batch × model` mesh (each step: 32 windows of
# 64 characters, Adam) and watch the validation loss, measured on text it never trains on.
# A model that only learned character frequencies would reach the unigram entropy printed
# below; a loss under it means the model uses context.

# %%
lm_steps = config.pick(smoke=6, full=600)
lm_history = hybrid.train_lm(
    lm, hybrid.Optimizer("adam", 3e-3), train_ids, val_ids,
    steps=lm_steps, batch_size=32, log_every=config.pick(smoke=3, full=100),
)
freq = np.bincount(train_ids, minlength=tokenizer.vocab_size) / len(train_ids)
unigram = float(-np.sum(np.log(freq[val_ids] + 1e-12)) / len(val_ids))
print(lm_history.round(3).to_string(index=False))
print(f"\nunigram (character frequency) loss on the validation text: {unigram:.3f} nats; "
      f"final validation loss: {lm_history['val loss'].iloc[-1]:.3f} nats")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.plot(lm_history["step"][1:], lm_history["train loss"][1:], marker="o", label="train")
ax.plot(lm_history["step"], lm_history["val loss"], marker="o", label="validation")
ax.axhline(unigram, ls="--", color="grey", label="unigram baseline")
ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="Sharded transformer on stdlib docstrings")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. How many bytes? A memory calculator
#
# Training memory has four parts per device: **parameters**, **gradients**, **optimizer
# states** and **activations**. `utils.memory` counts them for any layout:
#
# - bytes per parameter depend on the precision: with the mixed-precision recipe of the
#   ZeRO and Megatron papers, 2 (16-bit weights) + 2 (16-bit gradients) + *K* for the
#   optimizer, where Adam's *K* = 12 (fp32 master copy, momentum, variance);
# - data parallelism (`dp`) replicates all of it; tensor parallelism (`tp`) splits the
#   layers it covers; pipeline parallelism (`pp`) gives each stage a slice of the layers
#   but keeps several micro-batches' activations in flight;
# - ZeRO partitions, over the `dp` devices, the optimizer states (stage 1), also the
#   gradients (stage 2), also the parameters (stage 3);
# - activations come from per-layer sizes, the micro-batch and the recomputation policy.
#
# First, the check against the literature: figure 1 of the ZeRO paper (Rajbhandari et al.
# 2019), a 7.5B-parameter model with Adam in mixed precision on 64 devices.

# %%
# NBVAL_CHECK_OUTPUT
zero_model = memory.ModelSpec.from_params("7.5B", 7_500_000_000)
paper = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
print(f"K = {memory.optimizer_bytes_per_param('adam', 'mixed')} optimizer bytes per parameter (Adam, mixed precision)")
for stage, expected in paper.items():
    got = memory.estimate(zero_model, memory.Layout(dp=64, zero=stage), memory.Training("adam", "mixed")).total / memory.GB
    name = ["baseline (data parallel)", "ZeRO-1 (P_os)", "ZeRO-2 (P_os+g)", "ZeRO-3 (P_os+g+p)"][stage]
    print(f"{name:26s} {got:7.3f} GB per device -> {got:5.1f} GB; paper: {expected:5.1f} GB; match: {round(got, 1) == expected}")

# %% [markdown]
# Now the models of this series and two real large ones. The GPT shapes are those of the
# GPT-3 paper (Brown et al. 2020): "XL" has 1.3B parameters (24 layers, width 2,048), the
# largest 175B (96 layers, width 12,288), both with 2,048-token sequences. Activations per
# transformer block follow Korthikanti et al. 2022 (34·s·h + 5·a·s² bytes per sequence in
# 16-bit). Everything below: Adam, mixed precision, one device.

# %%
# NBVAL_CHECK_OUTPUT
gpt_1b = memory.transformer_spec("GPT-3 XL (1.3B)", 24, 2048, 16, 2048, 50257)
gpt_175b = memory.transformer_spec("GPT-3 175B", 96, 12288, 96, 2048, 50257)
cnn_spec = memory.spec_from_keras(models.build_seed_cnn(), "seed CNN", ["dense1", "output"])
lm_spec = lm_cfg.memory_spec()
print("calculator's parameter count equals the notebook transformer's:", lm_spec.n_params == sum(int(np.prod(v.shape)) for v in lm_weights.values()))
cases = [
    ("seed CNN, batch 128", cnn_spec, memory.Layout(), memory.Training("adam", "mixed", micro_batch=128)),
    ("notebook transformer, batch 32", lm_spec, memory.Layout(), memory.Training("adam", "mixed", micro_batch=32)),
    ("1.3B, 1 sequence", gpt_1b, memory.Layout(), memory.Training("adam", "mixed", micro_batch=1)),
    ("175B, 1 sequence", gpt_175b, memory.Layout(), memory.Training("adam", "mixed", micro_batch=1)),
]
one_device = memory.breakdown_table(cases)
one_device["parameters"] = one_device["parameters"].map(lambda p: f"{p:,}")
gb_cols = ["params", "grads", "optimizer", "activations", "total"]
one_device = one_device.drop(columns=["layout"]).rename(columns={c: f"{c} GB" for c in gb_cols})
print(one_device.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

# %% [markdown]
# (GB = 10⁹ bytes.) The two models of this notebook fit anywhere; the 1.3B model needs
# 2.6 + 2.6 + 15.8 GB of model states (2 + 2 + 12 bytes per parameter) before any
# activation; the 175B model needs terabytes. How does each strategy bring that down? The plot shows memory per
# device as the number of devices grows, with each strategy used alone.

# %%
counts = [2**i for i in range(0, 11)]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, spec_ in zip(axes, [gpt_1b, gpt_175b]):
    sweep = memory.strategy_sweep(spec_, counts, memory.Training("adam", "mixed", micro_batch=1))
    for strategy, part in sweep.groupby("strategy", sort=False):
        ax.plot(part["devices"], part["memory"], marker="o", ms=3, label=strategy)
    for gb, style in [(80, "--"), (16, ":")]:
        ax.axhline(gb, color="grey", ls=style, lw=1)
        ax.text(1, gb * 1.08, f"{gb} GB", color="grey", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="devices", ylabel="GB per device", title=spec_.name)
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What the curves say:
#
# - **data** parallelism is flat: every device holds everything;
# - **ZeRO-1/2** flatten out at the part they do not partition (16-bit parameters, and for
#   ZeRO-1 the gradients) plus activations; **ZeRO-3** keeps falling until activations
#   dominate;
# - **tensor** parallelism stops at the number of heads (here also a practical limit: its
#   all-reduces want the fast links inside one node, typically 8 GPUs);
# - **pipeline** parallelism stops at the number of layers, and its first stage keeps
#   activations of `pp` micro-batches in flight, so it flattens too.
#
# No single strategy gets the 175B model under 80 GB with few devices; combinations do.
# `memory.smallest_layout` searches `dp × tp × pp`, ZeRO stage and recomputation for the
# fewest devices (powers of two) that fit, preferring among equals no recomputation, no
# ZeRO-3, fewer pipeline stages and smaller `tp` (each costs time). It returns the layout
# and its breakdown.

# %%
# NBVAL_CHECK_OUTPUT
questions = [
    ("seed CNN (batch 128) on a 4 GB device", cnn_spec, 4, 128),
    ("1.3B on 80 GB devices", gpt_1b, 80, 1),
    ("1.3B on 16 GB devices", gpt_1b, 16, 1),
    ("1.3B on 16 GB devices, micro-batch 8", gpt_1b, 16, 8),
    ("175B on 80 GB devices", gpt_175b, 80, 1),
    ("175B on 40 GB devices", gpt_175b, 40, 1),
]
for label, spec_, gb, mb in questions:
    fit = memory.smallest_layout(spec_, gb, memory.Training("adam", "mixed", micro_batch=mb))
    parts = fit.breakdown.as_dict()
    print(f"{label:40s} -> {fit}")
    print(f"{'':40s}    params {parts['params']:.2f} + grads {parts['grads']:.2f} + optimizer "
          f"{parts['optimizer']:.2f} + activations {parts['activations']:.2f} GB")

# %% [markdown]
# Read a few answers. The 1.3B model fits one 80 GB device outright: 16 bytes per
# parameter of model states plus the activations of one sequence. On 16 GB devices two
# devices suffice, but only with ZeRO-1 (the optimizer states split over both) and
# recomputation; with a micro-batch of 8 the activations grow and the search switches to
# tensor parallelism, which splits the activations as well as the weights. The 175B model
# needs 64 devices of 80 GB: tensor parallelism inside a node of 8, two pipeline stages,
# ZeRO-2 over the 4 data-parallel replicas, and recomputation; on 40 GB devices, twice as
# many. The calculator leaves out temporary buffers and fragmentation, so in practice pass
# `usable_fraction=0.8` or so.
#
# ## 4. Mixed precision and activation recomputation, measured
#
# Two levers reduce the activation part without more devices:
#
# - **mixed precision** computes in 16-bit (`bfloat16` on CPUs, `float16` on GPUs with
#   tensor cores) while keeping float32 weights: activations take half the bytes;
# - **recomputation** (Chen et al. 2016; `tf.recompute_grad`) keeps only the input of each
#   wrapped segment and recomputes the segment during the backward pass: less memory, about
#   one extra forward pass of compute.
#
# `hybrid.compare_variants` runs one forward + backward step per variant on one device,
# reads the allocator's peak with `tf.config.experimental.get_memory_info` (it works on
# CPUs in TensorFlow 2.21; all logical CPUs share one allocator, so the peak is
# process-wide; it also skips small allocations, so the peak is a lower bound), times the
# variants round-robin, and compares losses and gradients with the
# float32 run. The calculator's activation estimate is printed next to it. Where a device
# reports no memory statistics, the peak columns are left out and the calculator's
# estimate is all you have.
#
# The CNN is cut into 3 recomputed segments (about √8 for its 8 layers, the rule of Chen et
# al.); the transformer recomputes each block.

# %%
policy = training.default_mixed_policy()
measure_device = devices.compute_devices()[0]
print("memory stats available on", measure_device, ":", hybrid.memory_stats_available(measure_device))
print("mixed policy on this hardware:", policy)
cnn_batch = config.pick(smoke=128, full=512)
repeats = config.pick(smoke=1, full=7)
with tf.device(measure_device):
    cnn32 = models.build_seed_cnn(name="cnn_fp32")
    with training.precision_policy(policy):
        cnn16 = models.build_seed_cnn(name="cnn_mixed")
    cnn16.set_weights(cnn32.get_weights())
xc = tf.constant(cifar.x_train[:cnn_batch].astype(np.float32) / 255)
yc = tf.constant(cifar.y_train[:cnn_batch])
segments = 3  # about sqrt(8 layers), as Chen et al. suggest
cnn_variants = {
    "float32": hybrid.keras_grad_step(cnn32),
    policy: hybrid.keras_grad_step(cnn16),
    "float32 + recompute": hybrid.keras_grad_step(cnn32, recompute_segments=segments),
    f"{policy} + recompute": hybrid.keras_grad_step(cnn16, recompute_segments=segments),
}
cnn_pred = {
    name: memory.estimate(cnn_spec, training=memory.Training(
        "sgd", "fp32" if name.startswith("float32") else "keras_mixed", micro_batch=cnn_batch,
        recompute=segments if "recompute" in name else "none")).activations
    for name in cnn_variants
}
cnn_table, cnn_diffs = hybrid.compare_variants(
    cnn_variants, xc, yc, device=measure_device, repeats=repeats, predicted_bytes=cnn_pred)
print(f"seed CNN, one training step on {cnn_batch} images:")
print(cnn_table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))

# %%
lm_batch = 64
lm_variants = {}
for name, kw in [("float32", {}), (policy, {"compute_dtype": policy.split("_")[1]}),
                 ("float32 + recompute", {"recompute": True}),
                 (f"{policy} + recompute", {"recompute": True, "compute_dtype": policy.split("_")[1]})]:
    model_ = hybrid.TransformerLM(lm_cfg, lm_weights, device=measure_device, **kw)
    lm_variants[name] = hybrid.make_grad_fn(model_, list(model_.params.values()), hybrid.lm_loss)
xl, yl = (tf.constant(a) for a in hybrid.random_windows(train_ids, lm_batch, lm_cfg.seq_len, np.random.default_rng(1)))
lm_pred = {
    name: memory.estimate(lm_spec, training=memory.Training(
        "sgd", "fp32" if name.startswith("float32") else "keras_mixed", micro_batch=lm_batch,
        recompute="full" if "recompute" in name else "none")).activations
    for name in lm_variants
}
lm_table, lm_diffs = hybrid.compare_variants(
    lm_variants, xl, yl, device=measure_device, repeats=repeats, predicted_bytes=lm_pred)
print(f"notebook transformer, one training step on {lm_batch} x {lm_cfg.seq_len} tokens:")
print(lm_table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))

# %%
# NBVAL_CHECK_OUTPUT
for model_name, diffs in [("seed CNN", cnn_diffs), ("transformer", lm_diffs)]:
    for name, d in diffs.items():
        if name == "float32":
            continue
        if name == "float32 + recompute":
            ok = d["loss"] <= 1e-6 and d["gradients"] <= 1e-5
            print(f"{model_name}, {name}: same loss and gradients as float32 (within 1e-6 / 1e-5): {ok}")
        else:
            ok = d["loss"] <= 1e-2 and d["cosine"] >= 0.99
            print(f"{model_name}, {name}: loss within 1% of float32, gradient cosine similarity >= 0.99: {ok}")

# %%
for model_name, table_ in [("seed CNN", cnn_table), ("transformer", lm_table)]:
    rows = table_.set_index("variant")
    for name in rows.index[1:]:
        peak = f"peak {rows.loc[name, 'peak vs first']:.2f}x, " if "peak vs first" in rows else ""
        print(f"{model_name:12s} {name:28s} {peak}time {rows.loc[name, 'time vs first']:.2f}x of float32")

# %% [markdown]
# What the measurements show on this machine (tables and summary lines above):
#
# - **Recomputation** gives the same loss and gradients as the plain float32 step, up to
#   float rounding (check cell). For the transformer it cuts the peak a lot: every block is
#   alike, and only the block inputs stay in memory. For this CNN it saves little or
#   nothing: the first convolution's output (30×30×32 values per image, the largest in the
#   layer table of section 1) must be in memory while its segment's backward pass runs,
#   recomputed or not. The calculator agrees: with checkpoints its CNN estimate goes *up*.
#   The price is time, an extra forward pass of every recomputed segment.
# - **Mixed precision** changes the numbers slightly (16-bit rounding: the loss within the
#   printed tolerance, gradients pointing the same way) and shrinks the peak for both
#   models. Its speed depends on the hardware: this CPU has native `bfloat16` instructions
#   (AVX-512 BF16); CPUs without them emulate it and run slower; GPUs with tensor cores run
#   16-bit matmuls several times faster than float32. Read the time column for what
#   happened on this machine.
# - The calculator counts only the activations each layer outputs. The measured peak also
#   holds what TensorFlow keeps for the backward pass of each op (inputs of convolutions,
#   pre-activation values, softmax outputs) and the gradients being built, so it is larger:
#   use the calculator for orders of magnitude and for comparing layouts, and measure
#   before you commit to a batch size.
#
# ## Summary
#
# - A 2-D `batch × model` mesh combines data and tensor parallelism in one program: layouts
#   say which tensors are split on which axis, DTensor inserts the all-reduces.
# - The hybrid CNN (replicated trunk, split head) computes the same losses and the same
#   first update as Keras's `MirroredStrategy`, up to float rounding, and learns CIFAR-10
#   on the mesh.
# - Per-device state bytes follow the shard shapes; `utils.memory` predicts them. Logical
#   CPUs show layouts and correctness, not speed.
# - A Megatron-sharded transformer block (heads split, MLP column- then row-parallel)
#   equals an unsharded Keras block in outputs and gradients, and trains on text that
#   ships with Python.
# - The calculator reproduces the ZeRO paper's figure 1 and answers "smallest layout that
#   fits": for a 175B model, tens of 80 GB devices with tensor parallelism, ZeRO and
#   recomputation.
# - Recomputation trades compute for activation memory with identical results, and pays
#   off when activations are spread over many similar layers (transformers), not when one
#   layer dominates (this CNN); mixed precision halves activation bytes at a small
#   numerical cost.
#
# ## Exercises
#
# 1. GPT-3 13B has 40 layers of width 5,120 and 40 heads. Find the smallest layout that
#    fits it on 40 GB devices with a micro-batch of 1, then with a micro-batch of 4. Which
#    part of the memory grows?

# %% jupyter={"source_hidden": true}
# Solution
gpt_13b = memory.transformer_spec("GPT-3 13B", 40, 5120, 40, 2048, 50257)
for mb in (1, 4):
    fit = memory.smallest_layout(gpt_13b, 40, memory.Training("adam", "mixed", micro_batch=mb))
    print(f"micro-batch {mb}: {fit}")
    print("   ", {k: round(v, 2) for k, v in fit.breakdown.as_dict().items()})
# The activations grow with the micro-batch (4x); model states do not change.

# %% [markdown]
# 2. Repeat the equivalence check of section 1 on a different mesh shape (for example
#    1×4: pure tensor parallelism of the head, with the trunk repeated on every device).
#    Do the first steps still match the `MirroredStrategy` run?

# %% jupyter={"source_hidden": true}
# Solution
other = shapes[-1]
trace_other = hybrid.hybrid_steps(
    hybrid.HybridCNN.from_keras(wide, hybrid.hybrid_mesh(*other)), cifar.x_train, cifar.y_train,
    steps=eq_steps, batch_size=eq_batch, optimizer=hybrid.Optimizer("adam", 1e-3),
)
print(f"{other[0]}x{other[1]} mesh vs MirroredStrategy: max |loss diff| = {trace_other.max_loss_diff(reference):.1e}, "
      f"max |weight diff| after step 1 = {trace_other.max_weight_diff(reference)[0]:.1e}")
print("equal within the same tolerances:",
      trace_other.max_loss_diff(reference) <= TOL and trace_other.max_weight_diff(reference)[0] <= 1e-6)

# %% [markdown]
# 3. With the calculator, find the largest micro-batch of the 1.3B model that fits 24 GB
#    devices on 8 devices with ZeRO-2 (`Layout(dp=8, zero=2)`), without and with full
#    recomputation.

# %% jupyter={"source_hidden": true}
# Solution
for rc in ("none", "full"):
    best = 0
    for mb in range(1, 257):
        b = memory.estimate(gpt_1b, memory.Layout(dp=8, zero=2), memory.Training("adam", "mixed", micro_batch=mb, recompute=rc))
        if b.total > 24 * memory.GB:
            break
        best = mb
    print(f"recompute={rc}: largest micro-batch that fits 24 GB = {best}")

# %% [markdown]
# ## Further reading
#
# - S. Rajbhandari, J. Rasley, O. Ruwase, Y. He. *ZeRO: Memory Optimizations Toward
#   Training Trillion Parameter Models*, 2019. [arXiv:1910.02054](https://arxiv.org/abs/1910.02054)
# - M. Shoeybi et al. *Megatron-LM: Training Multi-Billion Parameter Language Models Using
#   Model Parallelism*, 2019. [arXiv:1909.08053](https://arxiv.org/abs/1909.08053)
# - D. Narayanan et al. *Efficient Large-Scale Language Model Training on GPU Clusters
#   Using Megatron-LM*, 2021 (combining data, tensor and pipeline parallelism).
#   [arXiv:2104.04473](https://arxiv.org/abs/2104.04473)
# - V. Korthikanti et al. *Reducing Activation Recomputation in Large Transformer Models*,
#   2022 (activation memory per block). [arXiv:2205.05198](https://arxiv.org/abs/2205.05198)
# - T. Chen, B. Xu, C. Zhang, C. Guestrin. *Training Deep Nets with Sublinear Memory
#   Cost*, 2016. [arXiv:1604.06174](https://arxiv.org/abs/1604.06174)
# - P. Micikevicius et al. *Mixed Precision Training*, 2017.
#   [arXiv:1710.03740](https://arxiv.org/abs/1710.03740)
# - T. Brown et al. *Language Models are Few-Shot Learners* (GPT-3 model sizes), 2020.
#   [arXiv:2005.14165](https://arxiv.org/abs/2005.14165)
# - TensorFlow guides: [DTensor concepts](https://www.tensorflow.org/guide/dtensor_overview),
#   [Distributed training with DTensors](https://www.tensorflow.org/tutorials/distribute/dtensor_ml_tutorial),
#   [Mixed precision](https://www.tensorflow.org/guide/mixed_precision),
#   [`tf.recompute_grad`](https://www.tensorflow.org/api_docs/python/tf/recompute_grad).
