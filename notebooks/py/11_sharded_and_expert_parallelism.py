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
# # 11 · Sharded data parallelism, sequence and expert parallelism, today's models
#
# Data parallelism keeps a whole copy of the weights, gradients and optimizer state on
# every device. The ZeRO paper (Rajbhandari et al. 2019) showed that this copy can be cut
# into pieces, one per device, with little extra communication: ZeRO-1 splits the
# optimizer state, ZeRO-2 also the gradients, ZeRO-3 (called FSDP in PyTorch) also the
# weights. This notebook writes all three with DTensor, trains them and proves each equal
# to plain data parallelism. It then splits a mixture-of-experts layer over devices
# (expert parallelism) and a transformer block along the sequence (sequence parallelism),
# interleaves pipeline stages, and extends the memory calculator of notebook 08 to the
# models people train today.
#
# **What you will learn**
#
# - how ZeRO-1, -2 and -3 are only *layouts* of the optimizer state, the gradients and
#   the weights on a `batch` mesh, and which collectives DTensor issues for each: counted
#   from the compiled step and set against the ZeRO paper;
# - how to read the bytes each device holds from the shard shapes, check them against
#   `utils.memory`, and train a model whose training state does not fit one device's budget;
# - how a mixture-of-experts layer routes tokens (top-1 gating, capacity factor, dropped
#   tokens, load-balancing loss) and how its experts live on different devices, with the
#   all-to-all written out;
# - how sequence parallelism splits a transformer block's layer-norm regions along the
#   sequence, proven equal to the unsharded block;
# - how interleaved 1F1B (virtual pipeline stages) shrinks the bubble, and what it costs;
# - how to count the parameters and training memory of Llama- and Mistral-style models
#   (SwiGLU MLP, grouped-query attention, untied embeddings) from their published
#   configurations;
# - where each technique of the series lives in Keras 3, PyTorch, DeepSpeed and Megatron-LM.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 8 s | not measured |
# | smoke (`SERIES_MODE=smoke`) | 9 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# DTensor can write the program it compiles for each step to a folder, one file after
# each compiler pass (the `TF_DUMP_GRAPH_PREFIX` and `TF_CPP_VMODULE` variables, read when
# TensorFlow starts): section 1 reads the collectives from there.

# %% tags=["device-check"]
import os
import tempfile

DUMP_DIR = tempfile.mkdtemp(prefix="dtensor_programs_")
os.environ["TF_DUMP_GRAPH_PREFIX"] = DUMP_DIR  # DTensor writes its compiled programs here,
os.environ["TF_CPP_VMODULE"] = "dtensor_mlir_passes=1"  # one file after each compiler pass
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # CPU allocator statistics (section 1)

import utils  # noqa: F401, E402  (quiets TensorFlow's C++ start-up log)
from utils import config, devices, memory
from utils.lessons.mirrored_strategy import max_abs_diff

import collections
import math

import matplotlib.pyplot as plt
import pandas as pd

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
print("mode:", config.get_mode())
pd.set_option("display.width", 140)

# %% [markdown]
# ## 1. ZeRO: the training state, cut into pieces
#
# Plain data parallelism with Adam keeps, on every device, the weights (Ψ values), the
# gradients (Ψ) and Adam's two moment buffers (2Ψ): in float32, 16 bytes per parameter,
# all of it repeated on every device. ZeRO removes the repetition stage by stage. With
# DTensor each stage is nothing but a choice of layout on a 1-D `batch` mesh:
#
# | stage | weights | gradient buffer | Adam moments |
# |---|---|---|---|
# | 0 (plain data parallelism) | replicated | replicated | replicated |
# | 1 | replicated | replicated | sharded by rows over `batch` |
# | 2 | replicated | sharded | sharded |
# | 3 (FSDP) | sharded, gathered just before use | sharded | sharded |
#
# The model is a small MLP written as a `tf.Module` (as in the TensorFlow DTensor
# tutorial). Its widths are multiples of the device count so that every weight splits
# into equal row blocks; the cell below says what it chose.

# %% tags=["device-check"]
#@save
import glob
import re

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from utils import devices
from utils.lessons import hybrid_parallelism as hp
from utils.lessons import tensor_parallelism as tp


def batch_mesh(n=None):
    """A 1-D mesh "batch" over the first `n` compute devices (all of them by default)."""
    return tp.create_mesh([("batch", n or len(devices.compute_devices()))])


def row_sharded(mesh, rank):
    """Rows (axis 0) split over "batch": each device keeps 1/n of the tensor."""
    return tp.layout(mesh, "batch", *[None] * (rank - 1))


def init_mlp(sizes, seed=0):
    """Glorot-uniform kernels w0, w1, ... and zero biases b0, b1, ... for widths `sizes`."""
    rng, out = np.random.default_rng(seed), {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        limit = np.sqrt(6.0 / (n_in + n_out))
        out[f"w{i}"] = rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32)
        out[f"b{i}"] = np.zeros(n_out, np.float32)
    return out


class ZeroMLP(tf.Module):
    """An MLP for ZeRO stage `stage` on a "batch" mesh; stage 3 stores its weights sharded."""

    def __init__(self, weights, mesh, stage, regather=False):
        super().__init__(name=f"zero{stage}_mlp")
        self.mesh, self.stage, self.regather = mesh, stage, regather
        store = row_sharded if stage == 3 else hp.replicated
        self.params = {name: dtensor.DVariable(tp.shard(w, store(mesh, w.ndim)), name=name)
                       for name, w in weights.items()}

    def weight(self, name):
        """A weight, whole. ZeRO-3: all-gathered here, just before use; its gradient then
        comes back reduce-scattered (the backward of an all-gather)."""
        w = self.params[name]
        return dtensor.relayout(w, hp.replicated(self.mesh, w.shape.rank)) if self.stage == 3 else w

    def __call__(self, x):
        n_layers = len(self.params) // 2
        for i in range(n_layers):
            def layer(h, i=i):
                h = tf.matmul(h, self.weight(f"w{i}")) + self.weight(f"b{i}")
                return tf.nn.relu(h) if i < n_layers - 1 else h
            # regather (FSDP): recompute the layer in the backward pass, so that its gathered
            # weights are dropped after the forward pass and gathered again when needed
            x = tf.recompute_grad(layer)(x) if self.regather else layer(x)
        return x


class ZeroAdam(hp.Adam):
    """Notebook 08's DTensor Adam with ZeRO layouts: moments sharded from stage 1, the
    gradient buffer from stage 2; the weights keep the layout the model gave them."""

    def __init__(self, stage, learning_rate=1e-3):
        super().__init__(learning_rate)
        self.stage = stage

    def build(self, variables):
        mesh = dtensor.fetch_layout(variables[0]).mesh
        layout = lambda w, sharded: (row_sharded if sharded else hp.replicated)(mesh, w.shape.rank)  # noqa: E731
        zeros = lambda w, lay: dtensor.DVariable(tp.shard(np.zeros(w.shape, np.float32), lay))  # noqa: E731
        # layouts are read here, eagerly: inside the compiled step they are fixed
        self.layouts = [(layout(w, self.stage >= 2), layout(w, self.stage >= 1), dtensor.fetch_layout(w))
                        for w in variables]  # (gradient buffer, moments, weight)
        self.grads = [zeros(w, g) for w, (g, _, _) in zip(variables, self.layouts)]
        self.m = [zeros(w, s) for w, (_, s, _) in zip(variables, self.layouts)]
        self.v = [zeros(w, s) for w, (_, s, _) in zip(variables, self.layouts)]
        self.iterations = dtensor.DVariable(tp.shard(np.float32(0), hp.replicated(mesh, 0)))

    def update(self, grads, variables):  # notebook 08's apply runs it under the name scope "update"
        t = self.iterations + 1.0
        alpha = self.lr * tf.sqrt(1.0 - tf.pow(self.beta_2, t)) / (1.0 - tf.pow(self.beta_1, t))
        for g, w, g_buf, m_slot, v_slot, (g_layout, slot_layout, w_layout) in zip(
                grads, variables, self.grads, self.m, self.v, self.layouts):
            # phase 1: the gradient, summed over "batch", in the buffer's layout
            # (sharded buffer: DTensor fuses the all-reduce and the slice into a reduce-scatter)
            g = dtensor.relayout(g, g_layout)
            g_buf.assign(g)
            # phase 2: Adam on the rows this device owns (a local slice when g is whole)
            g = dtensor.relayout(g, slot_layout)
            m = m_slot + (g - m_slot) * (1.0 - self.beta_1)
            v = v_slot + (tf.square(g) - v_slot) * (1.0 - self.beta_2)
            m_slot.assign(m)
            v_slot.assign(v)
            # phase 3: the update, all-gathered into replicated weights (stages 1-2)
            update = m * alpha / (tf.sqrt(v) + self.epsilon)
            w.assign_sub(dtensor.relayout(update, w_layout))
        self.iterations.assign_add(1.0)


def train_zero(stage, weights, batches, mesh, learning_rate=1e-3, regather=False):
    """Train a ZeroMLP at `stage` on `batches` [(x, y) DTensors]: (losses, model, optimizer, step)."""
    model, optimizer = ZeroMLP(weights, mesh, stage, regather), ZeroAdam(stage, learning_rate)
    step = hp.make_train_step(model, optimizer)
    losses = [float(step(x, y)) for x, y in batches]
    return losses, model, optimizer, step


def device_bytes(tensors):
    """Bytes the first device of the mesh stores for `tensors`, read from the shard shapes."""
    return sum(int(np.prod(tp.shard_shapes(t)[0][1])) * t.dtype.size for t in tensors)


COLLECTIVE = re.compile(r'"tf\.DTensor(AllReduce|ReduceScatter|AllGather|AllToAll)"\(.*?'
                        r':\s*\((tensor<[^>]*>)[^)]*\)\s*->\s*(tensor<[^>]*>)')


def _elements(tensor_type):
    """Number of values of an MLIR type such as tensor<48x24xf32> (scalar: 1)."""
    return int(np.prod([int(d) for d in tensor_type[7:-1].split("x")[:-1]] or [1]))


def collectives(function_name, dump_dir, after="DTensorSPMDExpansion"):
    """The collectives of a compiled function in the program DTensor wrote to `dump_dir`
    after compiler pass `after`: [(kind, values in, values out)]; [] if that pass left
    no program (one device: nothing to communicate)."""
    path = glob.glob(f"{dump_dir}/dtensor.*.after_{after}.{function_name}.mlir")
    text = open(path[0]).read() if path else ""
    return [(kind, _elements(a), _elements(b)) for kind, a, b in COLLECTIVE.findall(text)]

# %% [markdown]
# The widths and the batch must split evenly over the devices. The cell below takes them
# from the device count it finds and says why.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
n_devices = len(devices.compute_devices())
zero_mesh = batch_mesh(n_devices)
mlp_sizes = [hp.multiple_of(w, n_devices) for w in (48, 96, 96, 24)]  # in, hidden, hidden, classes
zero_batch = hp.multiple_of(96, n_devices)
print(f"{n_devices} device(s) on a 1-D 'batch' mesh; MLP widths {mlp_sizes} and batch {zero_batch}: "
      f"the multiples of {n_devices} nearest to 48, 96, 96, 24 and 96")
if n_devices == 1:
    print("1 device: nothing is split. Every stage below stores everything whole and "
          "communicates nothing; the checks only compare the code paths.")
mlp_weights = init_mlp(mlp_sizes, seed=0)
n_params = sum(w.size for w in mlp_weights.values())
print(f"parameters (Ψ): {n_params:,}")

# %% [markdown]
# The data is synthetic: inputs drawn at random and labels from a fixed random "teacher"
# network, so that the losses fall. Each stage trains from the same weights on the same
# batches; stage 0 (replicated everything) is the reference.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
zero_steps = config.pick(smoke=3, full=20)
rng = np.random.default_rng(1)
teacher = rng.normal(size=(mlp_sizes[0], mlp_sizes[-1])).astype(np.float32)
zero_batches = []
for _ in range(zero_steps):
    x = rng.normal(size=(zero_batch, mlp_sizes[0])).astype(np.float32)
    zero_batches.append(hp.batch_to_mesh(zero_mesh, x, np.argmax(x @ teacher, axis=1).astype(np.int32)))

runs = {stage: train_zero(stage, mlp_weights, zero_batches, zero_mesh) for stage in range(4)}
ZERO_TOL = 1e-5  # float32 sums in a different order
ref_losses, ref_model = runs[0][0], runs[0][1]


def gaps_to_reference(losses, model):
    """(largest loss gap over the steps, largest final-weight gap) against plain data parallelism."""
    weight_gap = max(max_abs_diff(tp.to_numpy(model.params[k]), tp.to_numpy(ref_model.params[k]))
                     for k in mlp_weights)
    return max_abs_diff(losses, ref_losses), weight_gap


zero_gaps = {stage: gaps_to_reference(runs[stage][0], runs[stage][1]) for stage in (1, 2, 3)}
for stage, (loss_gap, weight_gap) in zero_gaps.items():
    print(f"ZeRO-{stage} vs plain data parallelism (losses at every step, final weights) equal "
          f"within {ZERO_TOL:g}: {loss_gap <= ZERO_TOL and weight_gap <= ZERO_TOL}")

# %%
print(f"{zero_steps} steps; losses of plain data parallelism:", np.round(ref_losses, 4))
for stage, (loss_gap, weight_gap) in zero_gaps.items():
    print(f"ZeRO-{stage}: max |loss diff| = {loss_gap:.1e}, max |weight diff| = {weight_gap:.1e}")

# %% [markdown]
# ### Bytes per device, read from the shards
#
# Each device's share of the training state is read from the shapes of the blocks it
# actually stores (weights, the gradient buffer, Adam's two moments), and set against
# `utils.memory.estimate` for the same parameter count, Adam, float32 and `Layout(dp=n,
# zero=stage)`.
#
# What is measured, and how: the logical CPUs of this machine share one allocator, so
# `tf.config.experimental.get_memory_info` cannot tell one logical device from another
# (the cell after the table checks that it reports the same peak for each). The bytes below therefore come from the shard
# shapes. On GPUs, each device has its own allocator, and the cell after the table also
# reads each GPU's peak during a step.

# %%
# NBVAL_CHECK_OUTPUT
mlp_spec = memory.ModelSpec.from_params("MLP", n_params)
rows = []
for stage, (_, model, optimizer, _) in runs.items():
    measured = {"params": device_bytes(model.params.values()), "grads": device_bytes(optimizer.grads),
                "optimizer": device_bytes(optimizer.m + optimizer.v)}
    predicted = memory.estimate(mlp_spec, memory.Layout(dp=n_devices, zero=stage),
                                memory.Training("adam", "fp32"))
    rows.append({"stage": stage, **{f"{k} (B)": v for k, v in measured.items()},
                 "measured (B)": sum(measured.values()), "calculator (B)": round(predicted.model_states),
                 "within 1%": abs(sum(measured.values()) - predicted.model_states) <= 0.01 * predicted.model_states})
zero_bytes = pd.DataFrame(rows)
print(f"bytes on one device of {n_devices} (stage 0 = plain data parallelism):")
print(zero_bytes[["stage", "within 1%"]].to_string(index=False))

# %%
print(zero_bytes.to_string(index=False))
gpus = [d.name for d in tf.config.list_logical_devices("GPU")][:n_devices]
if gpus:
    for stage, (_, _, _, step) in runs.items():
        for g in gpus:
            tf.config.experimental.reset_memory_stats(g)
        float(step(*zero_batches[0]))
        peaks = [tf.config.experimental.get_memory_info(g)["peak"] for g in gpus]
        print(f"stage {stage}: allocator peak per GPU during a step (bytes): {peaks}")
else:
    float(runs[3][3](*zero_batches[0]))  # one more ZeRO-3 step, then the allocator's peaks
    peaks = [tf.config.experimental.get_memory_info(f"CPU:{i}")["peak"] for i in range(n_devices)]
    print("no GPU; get_memory_info gives the same peak for every logical CPU (one shared "
          f"allocator): {len(set(peaks)) == 1}")

# %% [markdown]
# ### Communication per step, counted from the compiled program
#
# The ZeRO paper counts the values each device sends per step, in units of Ψ: plain data
# parallelism all-reduces the gradients (an all-reduce is a reduce-scatter plus an
# all-gather: 2Ψ); ZeRO-1 and -2 reduce-scatter the gradients and all-gather the updated
# weights (Ψ + Ψ = 2Ψ, no more than data parallelism); ZeRO-3 all-gathers the weights in
# the forward pass, again in the backward pass, and reduce-scatters the gradients (3Ψ).
#
# The cell below reads the collectives from the program DTensor compiled for each step
# (the folder set in Setup), right after the pass that turns layouts into per-device code
# (`DTensorSPMDExpansion`), and adds up their sizes with the paper's rule: all-reduce 2×,
# reduce-scatter, all-gather and all-to-all 1× the size of the whole tensor. A later pass
# (`DTensorAllReduceScatterOptimization`) fuses an all-reduce followed by taking one's own
# rows into a reduce-scatter; the last columns count those and the volume after fusing.

# %% tags=["device-check"]
WEIGHT = {"AllReduce": 2, "ReduceScatter": 1, "AllGather": 1, "AllToAll": 1}
PAPER = {0: 2, 1: 2, 2: 2, 3: 3, "3, gathered again": 3}


def comm_row(stage, step):
    name = step.get_concrete_function(*zero_batches[0]).name.decode()
    found = [c for c in collectives(name, DUMP_DIR) if max(c[1:]) > 1]  # the scalar loss left out
    fused = [c for c in collectives(name, DUMP_DIR, "DTensorAllReduceScatterOptimization")
             if c[0] == "ReduceScatter"]
    volume = sum(WEIGHT[kind] * max(n_in, n_out) for kind, n_in, n_out in found) / n_params
    return {"stage": stage, **{kind: sum(c[0] == kind for c in found) for kind in WEIGHT if kind != "ReduceScatter"},
            "volume / Ψ": round(volume, 2), "fused to reduce-scatter": len(fused),
            "after fusing / Ψ": round(volume - sum(c[1] for c in fused) / n_params, 2),
            "ZeRO paper / Ψ": PAPER[stage]}


comm = pd.DataFrame([comm_row(stage, run[3]) for stage, run in runs.items()])
print("collectives of one training step (the scalar loss's all-reduce left out):")
print(comm.to_string(index=False))

# %% [markdown]
# ZeRO-3 as the paper and PyTorch's FSDP run it drops each gathered weight once the layer's
# forward pass is done and gathers it again for the backward pass, so that only one
# layer's whole weights exist at a time. With `regather=True` the model wraps each layer in
# `tf.recompute_grad` (notebook 08): the backward pass recomputes the layer, and with it
# the all-gather. The same losses and weights; the table after the check counts the gathers:

# %%
# NBVAL_CHECK_OUTPUT
fsdp_losses, fsdp_model, _, fsdp_step = train_zero(3, mlp_weights, zero_batches, zero_mesh, regather=True)
fsdp_loss_gap, fsdp_weight_gap = gaps_to_reference(fsdp_losses, fsdp_model)
print(f"ZeRO-3 gathering again in the backward pass vs plain data parallelism equal within {ZERO_TOL:g}:",
      fsdp_loss_gap <= ZERO_TOL and fsdp_weight_gap <= ZERO_TOL)

# %%
print(pd.DataFrame([comm_row(3, runs[3][3]), comm_row("3, gathered again", fsdp_step)]).to_string(index=False))

# %% [markdown]
# What the tables show:
#
# - **Equality.** Every stage trains to the same losses and weights as plain data
#   parallelism, within the stated float32 tolerance: ZeRO changes where the state lives,
#   not the arithmetic.
# - **Bytes.** The weights, gradient buffer and Adam moments that each device stores
#   shrink stage by stage exactly as the calculator predicts: stage 3 keeps 1/n of
#   everything.
# - **Communication.** Plain data parallelism all-reduces the gradients (2Ψ), as the paper
#   says. Our stage 1 keeps a whole gradient buffer, so DTensor all-reduces the gradients
#   and then all-gathers the updated rows: Ψ more than the paper's stage 1, which never
#   holds the whole gradient (that is our stage 2). In stages 2 and 3 DTensor fuses the
#   gradient all-reduce with the slice into reduce-scatters; in stage 2 it also issues
#   all-to-alls (it moves some gradients between shardings), which costs more than the
#   paper's 2Ψ. Stage 3 gathers each weight once per step and keeps it for the backward
#   pass, so it sends less than the paper's 3Ψ but holds the whole weights during the
#   step. Dropping them after use (as FSDP does) costs gathers in the backward pass: with
#   `tf.recompute_grad`, more of them than the one extra gather per weight that the paper
#   counts, as the last table shows. The volumes count the collectives as DTensor's
#   program states them, before it lowers them to the operations of this device type.
#
# ### A model that does not fit one device trains across all of them
#
# Suppose each device could hold only the budget below. The training state of the MLP
# (weights, gradients, Adam) does not fit it whole; with ZeRO-3 it does, on the devices of
# this mesh, and the training above ran it.

# %%
# NBVAL_CHECK_OUTPUT
BUDGET = 100_000  # bytes of training state one (pretend) device may hold
full_state = int(zero_bytes.loc[0, "measured (B)"])
print(f"per-device budget: {BUDGET:,} bytes; the whole training state (stage 0): {full_state:,} bytes "
      f"-> fits one device: {full_state <= BUDGET}")
for _, row in zero_bytes.iterrows():
    print(f"ZeRO-{row['stage']} on {n_devices} device(s): {row['measured (B)']:,} bytes per device "
          f"-> fits: {row['measured (B)'] <= BUDGET}")

# %% [markdown]
# ## 2. Expert parallelism: a mixture of experts over devices
#
# A mixture-of-experts (MoE) layer replaces one MLP with `E` expert MLPs and a router
# (Shazeer et al. 2017, GShard, Switch Transformer). Each token goes to the expert its
# router scores highest (top-1, as in Switch), weighted by that score. Each expert takes at
# most `capacity = capacity factor × tokens / E` tokens per batch; the rest are
# **dropped** (they skip the layer through the residual connection). An auxiliary loss,
# `E · Σ_e f_e · P_e` (fraction of tokens sent to expert e times its mean router
# probability), pushes the router to spread the load.
#
# With expert parallelism each expert lives on its own device. The tokens are split over
# devices as in data parallelism; each device routes its own tokens and packs one buffer
# per expert, the buffers travel to the experts' devices (an **all-to-all**), each expert
# runs once on everything it received, and the results travel back (a second all-to-all)
# to be combined with the gate weights.

# %%
#@save
def route(x, router, num_experts, capacity):
    """Top-1 routing of tokens x [T, d]: dispatch [T, E, C] (0/1), combine (gate-weighted),
    the load-balancing loss, and kept [T, E] (1 where a token went to an expert)."""
    # phase 1: router probabilities and each token's expert
    probs = tf.nn.softmax(tf.matmul(x, router), axis=-1)
    onehot = tf.one_hot(tf.argmax(probs, axis=-1), num_experts)
    # phase 2: each token's place in its expert's queue; past the capacity it is dropped
    position = tf.reduce_sum(tf.cumsum(onehot, axis=0, exclusive=True) * onehot, axis=-1)
    kept = onehot * tf.cast(position < capacity, tf.float32)[:, None]
    dispatch = kept[:, :, None] * tf.one_hot(tf.cast(position, tf.int32), capacity)[:, None, :]
    combine = dispatch * tf.reduce_sum(probs * onehot, axis=-1)[:, None, None]
    # phase 3: Switch Transformer's loss: E * sum_e (share of tokens to e) * (mean prob of e)
    aux = num_experts * tf.reduce_sum(tf.reduce_mean(onehot, 0) * tf.reduce_mean(probs, 0))
    return dispatch, combine, aux, kept


def expert_mlp(x, w1, w2):
    return tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2)


def moe_expert_parallel(x_shards, router, experts, token_devices, expert_devices, capacity):
    """MoE layer: token shard s on token_devices[s], expert e (w1, w2) on expert_devices[e].
    Returns (output per shard, mean load-balancing loss, tokens kept per expert)."""
    num_experts, sends, routes = len(experts), [], []
    # phase 1: each device routes its tokens and packs one [C, d] buffer per expert
    for x, device in zip(x_shards, token_devices):
        with tf.device(device):
            dispatch, combine, aux, kept = route(x, router, num_experts, capacity)
            sends.append(tf.einsum("tec,td->ecd", dispatch, x))
            routes.append((combine, aux, tf.reduce_sum(kept, 0)))
    # phase 2: all-to-all; each expert runs once on the buffers of every shard
    results = []
    for e, ((w1, w2), device) in enumerate(zip(experts, expert_devices)):
        with tf.device(device):
            received = tf.concat([buffers[e] for buffers in sends], axis=0)
            results.append(tf.split(expert_mlp(received, w1, w2), len(x_shards)))
    # phase 3: all-to-all back; each shard combines its tokens' results with the gates
    outputs = []
    for s, ((combine, _, _), device) in enumerate(zip(routes, token_devices)):
        with tf.device(device):
            outputs.append(tf.einsum("tec,ecd->td", combine, tf.stack([r[s] for r in results])))
    aux = tf.add_n([r[1] for r in routes]) / len(routes)
    return outputs, aux, tf.add_n([r[2] for r in routes])


def moe_reference(x_shards, router, experts, capacity):
    """The same routing on one device without dispatch: every expert runs on every token and
    each token keeps its own expert's output times its gate (zero if dropped)."""
    outputs = []
    for x in x_shards:
        _, combine, _, _ = route(x, router, len(experts), capacity)
        every = tf.stack([expert_mlp(x, w1, w2) for w1, w2 in experts], axis=1)  # [T, E, d]
        outputs.append(tf.einsum("te,ted->td", tf.reduce_sum(combine, -1), every))
    return outputs


# %% [markdown]
# Four experts, spread over the devices this kernel has (expert `e` on device `e mod n`),
# the tokens split into one shard per device. The reference computes the same routing on
# one device; the two must agree.

# %%
# NBVAL_CHECK_OUTPUT
compute = devices.compute_devices()
NUM_EXPERTS, D_MOE, D_EXPERT, TOKENS_PER_SHARD, CAPACITY_FACTOR = 4, 32, 64, 64, 1.25
moe_capacity = math.ceil(CAPACITY_FACTOR * TOKENS_PER_SHARD / NUM_EXPERTS)
expert_devices = [compute[e % len(compute)] for e in range(NUM_EXPERTS)]
print(f"{NUM_EXPERTS} experts on {len(compute)} device(s): "
      f"{[devices.short_device(d) for d in expert_devices]}; capacity {moe_capacity} tokens per "
      f"expert and shard (factor {CAPACITY_FACTOR})")
rng = np.random.default_rng(2)
moe_router = tf.constant(rng.normal(0, 0.5, (D_MOE, NUM_EXPERTS)).astype(np.float32))
moe_experts = []
for device in expert_devices:
    with tf.device(device):
        moe_experts.append((tf.Variable(rng.normal(0, 0.2, (D_MOE, D_EXPERT)).astype(np.float32)),
                            tf.Variable(rng.normal(0, 0.2, (D_EXPERT, D_MOE)).astype(np.float32))))
x_shards = []
for device in compute:
    with tf.device(device):
        x_shards.append(tf.constant(rng.normal(size=(TOKENS_PER_SHARD, D_MOE)).astype(np.float32)))
moe_out, moe_aux, moe_tokens = moe_expert_parallel(x_shards, moe_router, moe_experts, compute,
                                                   expert_devices, moe_capacity)
with tf.device(compute[0]):
    ref_out = moe_reference(x_shards, moe_router, moe_experts, moe_capacity)
MOE_TOL = 1e-5
print(f"expert-parallel MoE equals the one-device reference within {MOE_TOL:g}:",
      max_abs_diff(moe_out, ref_out) <= MOE_TOL)
print("every token is kept or dropped, none twice:",
      int(tf.reduce_sum(moe_tokens)) <= len(compute) * TOKENS_PER_SHARD)

# %%
total_tokens = len(compute) * TOKENS_PER_SHARD
print(f"max |difference| = {max_abs_diff(moe_out, ref_out):.1e}")
print(f"tokens kept per expert: {moe_tokens.numpy().astype(int).tolist()}; dropped: "
      f"{total_tokens - int(tf.reduce_sum(moe_tokens))} of {total_tokens}; "
      f"load-balancing loss {float(moe_aux):.3f} (1.0 = perfectly even)")

# %% [markdown]
# ### Training a small character model with the MoE layer
#
# A character model small enough for this laptop: each position sees the embeddings of
# its character and the two before it, an MoE layer (with a residual connection) mixes
# them, and a dense layer predicts the next character. The text is the docstrings of a few
# standard-library modules (notebook 08 uses the same idea). The loss is the
# cross-entropy plus `0.01 ×` the load-balancing loss; the plot follows how many tokens each
# expert keeps. An expert on the dashed line is full: the tokens routed to it beyond its
# capacity are dropped (the `dropped` column).

# %%
import functools
import inspect
import itertools
import json
import string
import textwrap

ALPHABET = "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))
corpus = "\n\n".join(inspect.getdoc(m) for m in (collections, functools, itertools, json, textwrap, string))
char_ids = np.array([ALPHABET.index(c) if c in ALPHABET else ALPHABET.index("?") for c in corpus], np.int32)
V = len(ALPHABET)
init = lambda *shape: tf.Variable(rng.normal(0, 0.1, shape).astype(np.float32))  # noqa: E731
with tf.device(compute[0]):
    char_emb = [init(V, D_MOE) for _ in range(3)]  # this char, the one before, the one before that
    lm_router, lm_out = init(D_MOE, NUM_EXPERTS), init(D_MOE, V)
lm_experts = []
for device in expert_devices:
    with tf.device(device):
        lm_experts.append((init(D_MOE, D_EXPERT), init(D_EXPERT, D_MOE)))
lm_vars = char_emb + [lm_router, lm_out] + [w for pair in lm_experts for w in pair]
lm_opt = tf.keras.optimizers.Adam(3e-3)


@tf.function
def moe_lm_step(windows):
    """windows [shards, T, 4]: three characters of context and the target."""
    with tf.GradientTape() as tape:
        hidden = [tf.add_n([tf.gather(char_emb[k], windows[s, :, 2 - k]) for k in range(3)])
                  for s in range(len(compute))]
        mixed, aux, tokens = moe_expert_parallel(hidden, lm_router, lm_experts, compute,
                                                 expert_devices, moe_capacity)
        logits = tf.concat([tf.matmul(h + m, lm_out) for h, m in zip(hidden, mixed)], axis=0)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.reshape(windows[:, :, 3], [-1]), logits))
        loss = ce + 0.01 * aux
    lm_opt.apply_gradients(zip(tape.gradient(loss, lm_vars), lm_vars))
    return ce, aux, tokens


lm_steps = config.pick(smoke=15, full=300)
history = []
for _ in range(lm_steps):
    starts = rng.integers(0, len(char_ids) - 4, size=(len(compute), TOKENS_PER_SHARD))
    ce, aux, tokens = moe_lm_step(tf.constant(char_ids[starts[..., None] + np.arange(4)]))
    history.append([float(ce), float(aux), *tokens.numpy()])
history = pd.DataFrame(history, columns=["loss", "aux", *[f"expert {e}" for e in range(NUM_EXPERTS)]])
history["dropped"] = len(compute) * TOKENS_PER_SHARD - history.filter(like="expert").sum(axis=1)
print(f"{lm_steps} steps of {len(compute) * TOKENS_PER_SHARD} tokens; first and last rows:")
print(history.iloc[[0, -1]].round(3).to_string())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
history[[f"expert {e}" for e in range(NUM_EXPERTS)]].plot(ax=ax1)
ax1.axhline(moe_capacity * len(compute), ls="--", color="grey", label="capacity (all shards)")
ax1.legend(fontsize=8)
ax1.set(xlabel="step", ylabel="tokens kept", title="Tokens per expert")
history[["loss"]].plot(ax=ax2)
ax2.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="MoE character model")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Sequence parallelism
#
# Tensor parallelism (notebooks 07 and 08) splits the attention heads and the MLP over the
# `model` axis, but leaves the layer norms, the residual additions and dropout whole on
# every device: in Korthikanti et al. (2022)'s count, `5sh` of the `34sh` bytes per token a
# block keeps are repeated on every device. Sequence parallelism splits those regions
# along the **sequence**, since each position is normalized on its own. Where the
# tensor-parallel block all-reduces the partial sums of the row-parallel layers, the
# sequence-parallel one reduce-scatters them along the sequence, and all-gathers the
# sequence again before the next column-parallel layer: an all-reduce is exactly a
# reduce-scatter plus an all-gather, so the communication volume stays the same.
#
# The block below uses the weights of notebook 08's Megatron-sharded `TransformerLM`
# (heads and MLP split over `model`) and writes the two layouts of its activations:
# `[unsharded, model, unsharded]` (batch, sequence split, features) in the layer-norm and
# residual regions, whole inside attention and the MLP.

# %%
#@save
def sequence_parallel_block(lm, i, x):
    """Block `i` of a Megatron-sharded `hp.TransformerLM` with sequence parallelism: `x`
    [b, s, d] arrives split along s over "model". Returns the output (split the same way)
    and the tensors of the sequence regions, by name."""
    p, cfg, w = f"block{i}/", lm.cfg, lm.params
    whole, by_seq = hp.replicated(lm.mesh, 3), tp.layout(lm.mesh, None, "model", None)
    kept = {"block input": x}
    # attention: layer norm on this device's positions, then all-gather the sequence
    h = kept["ln1 output"] = hp.layer_norm(x, w[p + "ln1_gamma"], w[p + "ln1_beta"], cfg.layer_norm_epsilon)
    h = dtensor.relayout(h, whole)
    heads = tp.layout(lm.mesh, None, None, "model", None)  # [b, s, heads split, head dim]
    q, k, v = (dtensor.relayout(tf.einsum("bsd,dhk->bshk", h, w[p + "w" + c]) + w[p + "b" + c], heads)
               for c in "qkv")
    scores = tf.einsum("bqhk,bshk->bhqs", q * cfg.head_dim ** -0.5, k)
    causal = tf.linalg.band_part(tf.ones((x.shape[1], x.shape[1])), -1, 0)
    probs = tf.nn.softmax(scores + (1.0 - causal) * -1e9, axis=-1)
    ctx = dtensor.relayout(tf.einsum("bhqs,bshk->bqhk", probs, v), heads)
    # row-parallel projection: partial sums over heads, reduce-scattered along the sequence
    out = dtensor.relayout(tf.einsum("bqhk,hkd->bqd", ctx, w[p + "wo"]), by_seq)
    x = kept["attention residual"] = x + out + w[p + "bo"]
    # MLP: the same pattern around the column- and row-parallel layers
    h = kept["ln2 output"] = hp.layer_norm(x, w[p + "ln2_gamma"], w[p + "ln2_beta"], cfg.layer_norm_epsilon)
    h = dtensor.relayout(h, whole)
    u = tf.nn.gelu(tf.einsum("bsd,df->bsf", h, w[p + "w1"]) + w[p + "b1"])
    out = dtensor.relayout(tf.einsum("bsf,fd->bsd", u, w[p + "w2"]), by_seq)
    return x + out + w[p + "b2"], kept


# %% [markdown]
# The proof: the same input and weights through the unsharded block of notebook 08 on one
# device, and through the sequence-parallel block on the `model` mesh; the outputs, the
# gradient of the input and the gradients of every weight must agree. The sizes must
# split over the devices (heads, MLP width and sequence); the cell says what it chose.

# %%
# NBVAL_CHECK_OUTPUT
sp_heads = hp.multiple_of(4, n_devices)
sp_cfg = hp.TransformerConfig(vocab_size=16, seq_len=hp.multiple_of(32, n_devices), d_model=16 * sp_heads,
                              n_heads=sp_heads, d_ff=hp.multiple_of(128, n_devices), n_layers=1)
print(f"'model' mesh of {n_devices} device(s); heads {sp_cfg.n_heads}, sequence {sp_cfg.seq_len}, "
      f"MLP width {sp_cfg.d_ff}: multiples of {n_devices} nearest to 4, 32 and 128")
sp_mesh = tp.create_mesh([("model", n_devices)])
sp_weights = hp.init_transformer_weights(sp_cfg, seed=3)
block_names = [n for n in sp_weights if n.startswith("block0/")]
sp_lm, ref_lm = hp.TransformerLM(sp_cfg, sp_weights, sp_mesh), hp.TransformerLM(sp_cfg, sp_weights)
rng = np.random.default_rng(4)
x_np = rng.normal(size=(2, sp_cfg.seq_len, sp_cfg.d_model)).astype(np.float32)
r_np = rng.normal(size=x_np.shape).astype(np.float32)  # loss = sum(output * r)
by_seq = tp.layout(sp_mesh, None, "model", None)


@tf.function
def sp_step(x, r):
    with tf.GradientTape() as tape:
        tape.watch(x)
        with dtensor.default_mesh(sp_mesh):
            out, kept = sequence_parallel_block(sp_lm, 0, x)
        loss = tf.reduce_sum(out * r)
    return out, tape.gradient(loss, [x] + [sp_lm.params[n] for n in block_names]), kept


with tf.device(compute[0]):
    x_ref = tf.constant(x_np)
    with tf.GradientTape() as tape:
        tape.watch(x_ref)
        ref_out = ref_lm.block(0, x_ref)
        ref_loss = tf.reduce_sum(ref_out * r_np)
    ref_grads = tape.gradient(ref_loss, [x_ref] + [ref_lm.params[n] for n in block_names])
sp_args = (tp.shard(x_np, by_seq), tp.shard(r_np, by_seq))
sp_out, sp_grads, sp_kept = sp_step(*sp_args)
SP_TOL = 1e-5
print("output split along the sequence:", tp.spec_string(sp_out))
print(f"sequence-parallel block equals the unsharded block within {SP_TOL:g}:")
print("  outputs:", max_abs_diff(tp.to_numpy(sp_out), ref_out.numpy()) <= SP_TOL)
print("  input gradient:", max_abs_diff(tp.to_numpy(sp_grads[0]), ref_grads[0].numpy()) <= SP_TOL)
print(f"  gradients of the {len(block_names)} weights:",
      max(max_abs_diff(tp.to_numpy(a), b.numpy()) for a, b in zip(sp_grads[1:], ref_grads[1:])) <= SP_TOL)

# %% [markdown]
# The collectives DTensor issued for the block (forward and backward), read from its
# compiled program as in section 1, and the bytes that the sequence-region tensors take
# on one device against what they would take whole, which is the calculator's `5sh` term
# split by `tp` (this block has no dropout, so only part of that term exists here).

# %%
sp_name = sp_step.get_concrete_function(*sp_args).name.decode()
sp_found = [c[0] for c in collectives(sp_name, DUMP_DIR) if max(c[1:]) > 1]
sp_fused = [c[0] for c in collectives(sp_name, DUMP_DIR, "DTensorAllReduceScatterOptimization")]
print("collectives as written:", dict(sorted(collections.Counter(sp_found).items())))
print("reduce-scatters after fusing:", sp_fused.count("ReduceScatter"))
region = pd.DataFrame([{"tensor": name, "shard shape": str(tp.shard_shapes(t)[0][1]),
                        "bytes on one device": sh_bytes, "bytes if whole": t.shape.num_elements() * 4}
                       for name, t in sp_kept.items()
                       for sh_bytes in [int(np.prod(tp.shard_shapes(t)[0][1])) * 4]])
print(region.to_string(index=False))
block_spec = sp_cfg.memory_spec().layers[1]
calc = block_spec.activations_per_device(n_devices, sp=True) - (block_spec.activations - block_spec.replicated_activations) / n_devices
print(f"measured share per device: {region['bytes on one device'].sum() / region['bytes if whole'].sum():.4f}; "
      f"calculator's 5sh term per device / 5sh: {calc / block_spec.replicated_activations:.4f}")

# %% [markdown]
# The equality holds, and the sequence-region tensors take `1/tp` of their whole size on
# each device, the share by which the calculator divides its `5sh` term under
# `Layout(sp=True)`. The collectives are another matter: the ideal sequence-parallel block
# issues two all-gathers and two reduce-scatters in the forward pass (and the same in the
# backward pass). DTensor compiled more, as the counts above show: its layout propagation
# moves tensors between the sequence and head shardings with all-to-alls and sums the
# weight gradients with all-reduces. The layouts guarantee the result, not the cheapest
# communication; reading the compiled program is how you find out what it costs.

# %% [markdown]
# ## 4. Interleaved 1F1B: virtual pipeline stages
#
# With `p` pipeline stages and `m` micro-batches, GPipe and 1F1B leave the devices idle for
# a share `(p-1)/(m+p-1)` of the step (notebook 06). Narayanan et al. (2021) give each
# device `v` smaller chunks of layers instead of one block: device `d` holds chunks `d`,
# `d+p`, `d+2p`, ... of a model cut into `p·v` virtual stages. A chunk takes `1/v` of the
# time of a whole stage, so the pipe fills and drains `v` times faster: the bubble,
# relative to the useful work, falls from `(p-1)/m` to `(p-1)/(v·m)`, at the price of `v`
# times more point-to-point messages and more micro-batches in flight.
#
# Tasks are keyed as in notebook 06, `(kind, virtual stage, micro-batch)`. Notebook 06's
# simulator gives each stage its own device, so the adapter below runs the same
# dependencies (`depends_on` over `p·v` virtual stages) on `p` devices.

# %%
#@save
from utils.lessons import pipeline_parallelism as pipe


def interleaved_one_f_one_b_order(p, m, v):
    """Per-device task order of Megatron-LM's interleaved 1F1B: device d holds virtual
    stages d, d+p, ...; micro-batches go in groups of p (m must be a multiple of p)."""
    def task(kind, d, k):  # the k-th forward (or backward) of device d
        chunk = (k // p) % v
        chunk = v - 1 - chunk if kind == "B" else chunk
        return (kind, chunk * p + d, (k // (p * v)) * p + k % p)

    order = []
    for d in range(p):
        warmup = p - d - 1 if v == 1 else (p - d - 1) * 2 + (v - 1) * p
        total, warmup = m * v, min(warmup, m * v)
        tasks = [task("F", d, k) for k in range(warmup)]  # warm-up: fill every chunk
        for k in range(total - warmup):  # steady state: one forward, one backward
            tasks += [task("F", d, warmup + k), task("B", d, k)]
        tasks += [task("B", d, k) for k in range(total - warmup, total)]  # cool-down
        order.append(tasks)
    return order


def simulate_devices(order, num_virtual, chunk_time=1.0):
    """Notebook 06's simulator for several virtual stages per device: order[d] runs on
    device d; a task starts when device d is free and its inputs exist. {task: (start, end)}."""
    p, times, free, nxt = len(order), {}, [0.0] * len(order), [0] * len(order)
    while any(nxt[d] < len(order[d]) for d in range(p)):
        progress = False
        for d in range(p):
            while nxt[d] < len(order[d]):
                task = order[d][nxt[d]]
                deps = pipe.depends_on(task, num_virtual)
                if any(t not in times for t in deps):
                    break
                start = max([free[d], *(times[t][1] for t in deps)])
                free[d] = start + chunk_time
                times[task], nxt[d], progress = (start, free[d]), nxt[d] + 1, True
        assert progress, "the order deadlocks"
    return times


# %% [markdown]
# The check: every task runs once, no task starts before its inputs exist, and the
# simulated bubble equals the formula, for 1F1B (`v = 1`, notebook 06's order) and
# interleaved schedules (chunks take `1/v` of a stage's time).

# %%
# NBVAL_CHECK_OUTPUT
P, M = 4, 8
rows = []
for v in (1, 2, 4):
    order = interleaved_one_f_one_b_order(P, M, v)
    times = simulate_devices(order, P * v, chunk_time=1.0 / v)
    tasks = [t for device in order for t in device]
    complete = sorted(tasks) == sorted((k, s, i) for k in "FB" for s in range(P * v) for i in range(M))
    respected = all(times[d][1] <= times[t][0] for t in tasks for d in pipe.depends_on(t, P * v))
    busy = sum(end - start for start, end in times.values())
    bubble = 1 - busy / (P * pipe.makespan(times))
    formula = (P - 1) / (v * M + P - 1)  # idle share; idle / useful work = (p-1)/(v m)
    events = sorted((t[0], 1) if k == "F" else (t[1], -1) for (k, s, _), t in times.items() if s % P == 0)
    in_flight = int(np.cumsum([e for _, e in events]).max()) / v  # chunks held on device 0, in stages
    rows.append({"v": v, "every task once": complete, "dependencies respected": respected,
                 "bubble (simulated)": round(bubble, 4), "(p-1)/(v m + p - 1)": round(formula, 4),
                 "equal": abs(bubble - formula) < 1e-9, "stage-activations in flight (device 0)": in_flight})
sched = pd.DataFrame(rows)
print(f"p = {P} devices, m = {M} micro-batches")
print(sched.to_string(index=False))
print("1F1B (v = 1) same order as notebook 06:",
      interleaved_one_f_one_b_order(P, M, 1) == pipe.one_f_one_b_order(P, M))

# %% [markdown]
# The bubble shrinks with `v` exactly as the formula says. The last column is the most
# activations device 0 keeps at once, in units of one whole stage's activations for one
# micro-batch (each chunk holds `1/v` of them): compare it across `v` in the table for the
# memory cost of interleaving, which comes on top of `v` times more sends between devices.
#
# ## 5. The calculator for today's models
#
# Models trained today differ from GPT-3 in ways that change the counts: a gated MLP
# (SwiGLU: three matrices instead of two), grouped-query attention (fewer key-value heads
# than query heads), no biases, RMS norms, rotary positions (no position table) and untied
# input and output embeddings. `utils.memory.transformer_spec` takes these from a published
# configuration. The cell below reproduces the parameter counts published for three open
# models from their configuration files (hidden size, layers, heads, key-value heads, MLP
# size, vocabulary).

# %%
# NBVAL_CHECK_OUTPUT
LLAMA_STYLE = dict(gated_mlp=True, biases=False, rms_norm=True, learned_positions=False, tied_embeddings=False)
open_models = {  # name: (layers, hidden, heads, kv heads, MLP size, vocabulary, published total)
    "Llama-2-7B": (32, 4096, 32, 32, 11008, 32000, "6.74B"),
    "Llama-3-8B": (32, 4096, 32, 8, 14336, 128256, "8.03B"),
    "Mistral-7B": (32, 4096, 32, 8, 14336, 32000, "7.24B"),
}
specs = {}
for name, (layers, hidden, heads, kv, ff, vocab, published) in open_models.items():
    specs[name] = memory.transformer_spec(name, layers, hidden, heads, 4096, vocab, ff,
                                          n_kv_heads=kv, **LLAMA_STYLE)
    counted = f"{specs[name].n_params / 1e9:.2f}B"
    print(f"{name}: {specs[name].n_params:,} parameters = {counted}; published {published}: {counted == published}")

# %% [markdown]
# And their training memory per device: Adam in mixed precision with float32 gradient
# accumulation (Megatron-LM's default), a micro-batch of 1 sequence of 4,096 tokens, full
# recomputation, on 8 devices as tensor parallelism with and without sequence parallelism,
# and as ZeRO-3 data parallelism.

# %%
train = memory.Training("adam", "mixed", micro_batch=1, recompute="full", fp32_grads=True)
rows = [(f"{name}, {label}", spec, layout, train) for name, spec in specs.items()
        for label, layout in [("tp=8", memory.Layout(tp=8)), ("tp=8 + sp", memory.Layout(tp=8, sp=True)),
                              ("ZeRO-3 dp=8", memory.Layout(dp=8, zero=3))]]
print(memory.breakdown_table(rows).round(2).drop(columns=["model"]).to_string(index=False))

# %% [markdown]
# ## 6. Where this lives elsewhere
#
# | technique (notebook) | Keras 3 `keras.distribution` (JAX backend) | PyTorch | DeepSpeed / Megatron-LM |
# |---|---|---|---|
# | data parallelism (02–05) | `DataParallel` | `DistributedDataParallel` | DeepSpeed engine, ZeRO stage 0; Megatron `--data-parallel` (implicit) |
# | pipeline parallelism, GPipe / 1F1B (06) | — | `torch.distributed.pipelining` (`ScheduleGPipe`, `Schedule1F1B`) | DeepSpeed `PipelineModule`; Megatron `--pipeline-model-parallel-size` |
# | interleaved 1F1B (11) | — | `ScheduleInterleaved1F1B` | Megatron `--num-layers-per-virtual-pipeline-stage` |
# | tensor parallelism (07) | `ModelParallel` + `LayoutMap` | `torch.distributed.tensor.parallel` (`ColwiseParallel`, `RowwiseParallel`) | Megatron `--tensor-model-parallel-size` |
# | 2-D hybrid mesh (08) | `DeviceMesh` with `batch` and `model` axes | `init_device_mesh` (DTensor) | Megatron 3-D parallelism |
# | multi-worker (09) | `keras.distribution.initialize` | `torchrun`, `init_process_group` | `deepspeed` launcher |
# | ZeRO-1 / -2 (11) | — | `ZeroRedundancyOptimizer` (stage 1); FSDP `SHARD_GRAD_OP` (stage 2) | ZeRO stage 1 / 2; Megatron `--use-distributed-optimizer` |
# | ZeRO-3 / FSDP (11) | `ModelParallel` with weights sharded on the batch axis | `FullyShardedDataParallel`, `fully_shard` (FSDP2) | ZeRO stage 3 |
# | sequence parallelism (11) | — | `SequenceParallel` (tensor parallel plan) | Megatron `--sequence-parallel` |
# | expert parallelism (11) | — | no core API (Megatron Core, torchtitan build it on DTensor) | DeepSpeed-MoE; Megatron `--expert-model-parallel-size` |
# | recomputation (08) | `keras.RematScope` | `torch.utils.checkpoint` | `--recompute-activations`, DeepSpeed activation checkpointing |
# | mixed precision (04, 08) | `keras.mixed_precision` | `torch.autocast` | `--bf16` / `--fp16`, DeepSpeed `bf16` |
#
# Names change between releases: check the documentation of the version you use.
#
# ## Summary
#
# - ZeRO-1, -2 and -3 are layouts of the optimizer state, the gradients and the weights on
#   the data-parallel axis. Written with DTensor, each trains to the same losses and
#   weights as plain data parallelism, and each device's bytes match the calculator.
# - The collectives are read from the program DTensor compiles, not assumed; where they
#   differ from the paper's count, the notebook says why (a whole gradient buffer in our
#   stage 1, all-to-alls in stage 2, gathered weights kept for the backward pass in stage 3
#   unless `tf.recompute_grad` drops and gathers them again).
# - A mixture-of-experts layer routes each token to one expert within a capacity, drops
#   the overflow, and balances the load with an auxiliary loss; placing the experts on
#   different devices makes the dispatch and combine two all-to-alls, and the result equals
#   a one-device computation of the same routing.
# - Interleaving `v` virtual stages per device divides the pipeline bubble by `v`, as the
#   simulator confirms, and keeps more activations in flight.
# - The calculator now counts Llama- and Mistral-style models from their configurations
#   and reproduces their published sizes.
# - Sequence parallelism splits the layer-norm and residual regions of a transformer block
#   along the sequence; the block equals the unsharded one in outputs and gradients, and
#   those regions take `1/tp` of the bytes per device, as the calculator's `sp` flag says.
#
# ## Exercises
#
# 1. With the calculator, compute the activation bytes of Llama-2-7B per device with
#    `tp=8`, without and with sequence parallelism (`sp=True`). Which term shrinks?

# %%
# Try it: memory.estimate(specs["Llama-2-7B"], memory.Layout(tp=8, sp=...), train)
print(memory.estimate(specs["Llama-2-7B"], memory.Layout(tp=8), train).activations / memory.GB)  # TODO: sp=True

# %% jupyter={"source_hidden": true}
# Solution
for sp in (False, True):
    acts = memory.estimate(specs["Llama-2-7B"], memory.Layout(tp=8, sp=sp), train).activations
    print(f"sp={sp}: activations {acts / memory.GB:.3f} GB per device")
# The 5sh values per block that tensor parallelism leaves whole are split over tp as well.

# %% [markdown]
# 2. Raise the capacity factor of the MoE layer to 2.0, then lower it to 0.5. How many
#    tokens are dropped, and does the expert-parallel layer still equal the reference?

# %%
# Try it: change the factor and rerun the routing.
factor = CAPACITY_FACTOR  # TODO: try 2.0 and 0.5
cap = math.ceil(factor * TOKENS_PER_SHARD / NUM_EXPERTS)
print("capacity:", cap)

# %% jupyter={"source_hidden": true}
# Solution
for factor in (2.0, 0.5):
    cap = math.ceil(factor * TOKENS_PER_SHARD / NUM_EXPERTS)
    out, _, kept = moe_expert_parallel(x_shards, moe_router, moe_experts, compute, expert_devices, cap)
    dropped = len(compute) * TOKENS_PER_SHARD - int(tf.reduce_sum(kept))
    print(f"factor {factor}: capacity {cap}, dropped {dropped}, equal to the reference: "
          f"{max_abs_diff(out, moe_reference(x_shards, moe_router, moe_experts, cap)) <= MOE_TOL}")

# %% [markdown]
# 3. Which ZeRO stage is the smallest that fits the MLP's training state in a budget of
#    150,000 bytes per device on this mesh?

# %%
# Try it: compare zero_bytes["measured (B)"] with the budget.
budget = BUDGET  # TODO: 150_000
print(zero_bytes[["stage", "measured (B)"]].to_string(index=False))

# %% jupyter={"source_hidden": true}
# Solution
fits = zero_bytes[zero_bytes["measured (B)"] <= 150_000]
print("smallest stage that fits:", int(fits["stage"].min()) if len(fits) else "none")

# %% [markdown]
# ## Further reading
#
# - S. Rajbhandari, J. Rasley, O. Ruwase, Y. He. *ZeRO: Memory Optimizations Toward
#   Training Trillion Parameter Models*, 2019. [arXiv:1910.02054](https://arxiv.org/abs/1910.02054)
# - Y. Zhao et al. *PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel*,
#   2023. [arXiv:2304.11277](https://arxiv.org/abs/2304.11277)
# - V. Korthikanti et al. *Reducing Activation Recomputation in Large Transformer Models*,
#   2022 (sequence parallelism). [arXiv:2205.05198](https://arxiv.org/abs/2205.05198)
# - D. Lepikhin et al. *GShard*, 2020. [arXiv:2006.16668](https://arxiv.org/abs/2006.16668);
#   W. Fedus, B. Zoph, N. Shazeer. *Switch Transformers*, 2021.
#   [arXiv:2101.03961](https://arxiv.org/abs/2101.03961)
# - D. Narayanan et al. *Efficient Large-Scale Language Model Training on GPU Clusters
#   Using Megatron-LM*, 2021 (interleaved 1F1B). [arXiv:2104.04473](https://arxiv.org/abs/2104.04473)
# - Hugging Face. *The Ultra-Scale Playbook: Training LLMs on GPU Clusters*, 2025.
#   [huggingface.co/spaces/nanotron/ultrascale-playbook](https://huggingface.co/spaces/nanotron/ultrascale-playbook)
# - TensorFlow: [DTensor concepts](https://www.tensorflow.org/guide/dtensor_overview).
