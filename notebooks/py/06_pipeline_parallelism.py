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
# # Pipeline parallelism: one model across several devices
#
# So far every device held a full copy of the model. When the model itself is too big for
# one device, you have to cut it: put the first layers on one device, the next layers on
# another, and pass the activations along. This is *model parallelism*, and its most
# common form for deep networks is *pipeline parallelism*.
#
# TensorFlow 2.21 has no pipeline API, so this notebook writes one, in short functions you
# can read cell by cell: cutting the model into stages with `tf.device`, the GPipe and 1F1B
# schedules, a simulator that places their tasks in time, and the micro-batch loop that runs
# them with `tf.GradientTape`. Then it proves that the pipeline computes what the unsplit
# model computes, and compiles the whole step into one `tf.function`.
#
# **What you will learn**
#
# - How to cut a Keras model into stages, place each stage's variables on its own device
#   with `tf.device`, and check where every variable and every activation lives.
# - How GPipe and 1F1B order the work (warm-up, steady state, cool-down), what the *bubble*
#   $(p-1)/(m+p-1)$ is, and why 1F1B needs far less activation memory.
# - How the micro-batch loop stashes one tape per micro-batch and stage, accumulates
#   gradients over $m$ micro-batches and applies them once, and how to prove that the
#   gradients, the updated weights and a training run equal those of the unsplit model.
# - How to compile the pipelined step so that TensorFlow runs different stages at the same
#   time, and what logical CPUs on a 2-core machine can and cannot tell you about speed.
#
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 34 s | not measured |
# | smoke (`SERIES_MODE=smoke`) | 11 s | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# `setup_devices()` must run before any other TensorFlow code. On a machine without GPUs it
# splits the CPU into logical devices (4 unless you set `SERIES_NUM_CPUS`).

# %% tags=["device-check"]
import time

T_START = time.perf_counter()

import utils  # noqa: F401  (quiets TensorFlow's C++ log)
from utils import config, devices, models
from utils.data import load_for_mode, to_float
from utils.devices import short_device
from utils.lessons.mirrored_strategy import max_abs_diff

print("mode:", config.get_mode())
print(devices.setup_devices().to_string(index=False))

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf
from IPython.display import display

SEED = config.seed_everything()
S = config.sizes()
DEVICES = devices.compute_devices()
print(f"seed: {SEED}, device kind: {devices.device_kind()}")
print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")

# %% [markdown]
# Load CIFAR-10 (in smoke mode a small synthetic stand-in when no copy is available) and
# take one batch of the series' batch size, as floats in [0, 1].

# %% tags=["device-check"]
data = load_for_mode()
print(data.describe())

BATCH = S.batch_size
x_batch = tf.constant(to_float(data.x_train[:BATCH]))
y_batch = tf.constant(data.y_train[:BATCH])

# %% [markdown]
# ## 1. Cutting the model into stages
#
# Build the seed CNN and look at where its cost sits: FLOPs are in the convolutions,
# parameters in `dense1`.

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
model = models.build_seed_cnn()
print(models.layer_table(model)[["layer", "output shape", "params", "FLOPs/image"]].to_string(index=False))

# %% [markdown]
# The slowest stage sets the pace of a pipeline, so cut where the most expensive stage's
# forward FLOPs are smallest. `utils.memory.partition` is that small dynamic programme
# (notebook 08 uses it for its memory calculator): it returns the first layer of each stage.
#
# How many stages? The seed CNN has four layers with real work (three convolutions and
# `dense1`); a fifth stage would hold only a pooling or flatten layer. So this notebook cuts
# it into 4 stages and places them on the devices it finds. With fewer devices, neighbouring
# stages share a device: the arithmetic, schedules and proofs stay the same, but stages on
# one device share its compute.

# %% tags=["device-check"]
N_STAGES = 4
n_dev = len(DEVICES)
STAGE_DEVICES = [DEVICES[k * min(n_dev, N_STAGES) // N_STAGES] for k in range(N_STAGES)]
names = [short_device(d) for d in STAGE_DEVICES]
print(f"{n_dev} device(s) found; {N_STAGES} stages on {names}")
if n_dev == 1:
    print("Only one device: nothing is split across devices. All stages run on it; the "
          "schedules and the proofs below still hold, but the stages share its compute.")
elif n_dev < N_STAGES:
    print(f"Fewer devices than stages: neighbouring stages share a device ({n_dev} devices).")
elif n_dev > N_STAGES:
    print(f"{n_dev - N_STAGES} device(s) stay unused: more stages would hold no real work.")
else:
    print("One stage per device.")

# %% [markdown]
# Now the cut itself. `split_model` rebuilds each stage's layers under
# `with tf.device(stage_device):`, which is what makes their variables live there, and
# copies the model's weights into them. The original `model` is untouched: it stays on one
# device as the reference to compare against.

# %% tags=["device-check"]
#@save
import keras
import tensorflow as tf

from utils.memory import partition
from utils.models import layer_flops


def stage_starts(model, num_stages):
    """First layer of each stage, cutting the forward FLOPs as evenly as possible."""
    return partition([layer_flops(layer) for layer in model.layers], num_stages)


def split_model(model, starts, devices):
    """Cut a built keras.Sequential before the layers `starts`; stage k lives on devices[k]."""
    ends = starts[1:] + [len(model.layers)]
    stages, shape = [], model.inputs[0].shape[1:]
    for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
        with tf.device(devices[k]):  # variables created here live on this device
            layers = [type(layer).from_config(layer.get_config()) for layer in model.layers[a:b]]
            stage = keras.Sequential([keras.Input(shape), *layers], name=f"stage{k}")
        for new, old in zip(layers, model.layers[a:b], strict=True):
            new.set_weights(old.get_weights())
        stages.append(stage)
        shape = stage.outputs[0].shape[1:]
    return stages


# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
STARTS = stage_starts(model, N_STAGES)
stages = split_model(model, STARTS, STAGE_DEVICES)
print("first layer of each stage:", [model.layers[i].name for i in STARTS])
print(pd.DataFrame([
    {"stage": k, "layers": ", ".join(layer.name for layer in st.layers), "params": st.count_params(),
     "output shape": str(tuple(st.outputs[0].shape[1:]))}
    for k, st in enumerate(stages)
]).to_string(index=False))

# %% [markdown]
# Ask every variable where it lives. The device comes from the variable object itself
# (`variable.value.device`), not from what we intended.

# %%
print(f"unsplit model: all {len(model.weights)} variables on "
      f"{sorted({short_device(v.value.device) for v in model.weights})}")
for k, stage in enumerate(stages):
    print(f"stage {k}: " + ", ".join(f"{v.path} on {short_device(v.value.device)}" for v in stage.weights))
placed = all(short_device(v.value.device) == short_device(STAGE_DEVICES[k])
             for k, st in enumerate(stages) for v in st.weights)

# %% [markdown]
# Run the batch through the stages. Each stage first copies its input onto its own device
# (`tf.identity` under `tf.device`), so each boundary is one activation tensor crossing
# from one device to the next. This is *naive* model parallelism: the whole batch goes
# through stage 0, then stage 1, and so on.

# %%
h, prev, outs = x_batch, "host", []
for k, (stage, dev) in enumerate(zip(stages, STAGE_DEVICES, strict=True)):
    with tf.device(dev):
        h = stage(tf.identity(h))
    print(f"stage {k}: input from {prev:<5} -> output {str(tuple(h.shape)):<18} on {short_device(h.device)}")
    prev, outs = short_device(h.device), outs + [h]
crossing = [int(np.prod(o.shape)) * o.dtype.size for o in outs[:-1]]
print("bytes passed from each stage to the next, forward, per batch:", ", ".join(f"{b:,}" for b in crossing))
out_diff = max_abs_diff(model(x_batch), outs[-1])
print(f"max |pipeline output - unsplit output| = {out_diff:.3g}")

# %%
# NBVAL_CHECK_OUTPUT
TOL_OUT = 1e-6
print("every stage variable lives on its stage's device:", placed)
print("every stage output was computed on its stage's device:",
      all(short_device(o.device) == short_device(d) for o, d in zip(outs, STAGE_DEVICES, strict=True)))
print(f"pipeline output equals the unsplit model's within {TOL_OUT:g}: {out_diff <= TOL_OUT}")

# %% [markdown]
# ## 2. Schedules: who runs what, in which order
#
# In training each stage runs two kinds of tasks for each micro-batch $i$ (a slice of the
# batch): a forward `F(s, i)` and, later, a backward `B(s, i)`. The dependencies are fixed:
# `F(s, i)` needs the activation from `F(s-1, i)`; `B(s, i)` needs its own `F(s, i)` (the
# stashed activations) and the gradient from `B(s+1, i)`. A *schedule* only chooses the
# order in which each stage runs its $2m$ tasks.
#
# - **GPipe** (Huang et al., 2019), also called all-forward-all-backward: every stage runs
#   its $m$ forwards, then its $m$ backwards.
# - **1F1B** (PipeDream-Flush, Narayanan et al., 2021): stage $s$ runs $p-s-1$ warm-up
#   forwards, then alternates one forward and one backward, then drains the remaining
#   backwards. A micro-batch's backward starts as early as possible, so its stash is freed
#   early.
#
# A task is a tuple `(kind, stage, micro_batch)`.

# %% tags=["device-check"]
#@save
def gpipe_order(num_stages, num_micro_batches):
    """All forward, all backward: each stage runs its m forwards, then its m backwards."""
    p, m = num_stages, num_micro_batches
    return [[("F", s, i) for i in range(m)] + [("B", s, i) for i in range(m)] for s in range(p)]


def one_f_one_b_order(num_stages, num_micro_batches):
    """1F1B (PipeDream-Flush): warm-up forwards, then one forward + one backward, then drain."""
    p, m = num_stages, num_micro_batches
    order = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        tasks = [("F", s, i) for i in range(warmup)]  # warm-up: fill the pipe downstream
        for i in range(m - warmup):  # steady 1F1B: one forward, then the oldest backward
            tasks += [("F", s, warmup + i), ("B", s, i)]
        tasks += [("B", s, i) for i in range(m - warmup, m)]  # cool-down: drain the backwards
        order.append(tasks)
    return order


SCHEDULES = {"gpipe": gpipe_order, "1f1b": one_f_one_b_order}


# %% [markdown]
# Print both orders for 4 stages and 4 micro-batches:

# %%
# NBVAL_CHECK_OUTPUT
for kind, make_order in SCHEDULES.items():
    print(kind)
    for s, tasks in enumerate(make_order(4, 4)):
        print(f"  stage {s}: " + " ".join(f"{k}{i}" for k, _, i in tasks))

# %% [markdown]
# ## 3. The simulator: from an order to a timeline
#
# An order says nothing about time. `simulate` places the tasks: each device runs its tasks
# in its order, each task as soon as the device is free and the task's inputs have arrived
# (`depends_on`). With one time slot per task you get the textbook pictures; with measured
# per-stage times you get what $p$ independent devices would do with this model. From a
# timeline follow the *bubble* (the idle share of all devices) and, per stage, the most
# micro-batches whose activations it holds at once (from the start of `F(s, i)` to the end
# of `B(s, i)`).

# %% tags=["device-check"]
#@save
import numpy as np


def depends_on(task, num_stages):
    """The tasks whose results `task` needs."""
    kind, s, i = task
    if kind == "F":
        return [("F", s - 1, i)] if s > 0 else []  # the activation from the stage before
    return [("F", s, i)] + ([("B", s + 1, i)] if s < num_stages - 1 else [])  # stash + gradient


def simulate(order, forward=1.0, backward=None, comm=0.0):
    """Place each stage's tasks in time; forward/backward: one time per stage, or one number.

    A task starts when its device is free and its inputs have arrived (`comm` later when they
    come from another stage). Returns {task: (start, end)}.
    """
    p = len(order)
    fwd = list(np.broadcast_to(forward, p))
    bwd = fwd if backward is None else list(np.broadcast_to(backward, p))
    times, free, nxt = {}, [0.0] * p, [0] * p
    while any(nxt[s] < len(order[s]) for s in range(p)):
        for s in range(p):  # let every device run what it can, in its order
            while nxt[s] < len(order[s]):
                task = order[s][nxt[s]]
                deps = depends_on(task, p)
                if any(d not in times for d in deps):
                    break  # this device waits for another stage
                ready = max([times[d][1] + (comm if d[1] != s else 0.0) for d in deps], default=0.0)
                start = max(free[s], ready)
                free[s] = start + float(fwd[s] if task[0] == "F" else bwd[s])
                times[task], nxt[s] = (start, free[s]), nxt[s] + 1
    return times


def makespan(times):
    return max(end for _, end in times.values()) - min(start for start, _ in times.values())


def bubble_fraction(times, num_stages):
    """Idle share of the devices: 1 - busy time / (p * makespan)."""
    return 1.0 - sum(end - start for start, end in times.values()) / (num_stages * makespan(times))


def peak_in_flight(times, num_stages):
    """Per stage: the most micro-batches stashed at once (held from F's start to B's end)."""
    peaks = []
    for s in range(num_stages):
        events = sorted((t[0], 1) if k == "F" else (t[1], -1)
                        for (k, st, _), t in times.items() if st == s)
        levels = np.cumsum([delta for _, delta in events])  # at equal times, frees come first
        peaks.append(int(levels.max()))
    return peaks


def execution_order(order):
    """All tasks as one list that one thread can run: by start time in unit time, stage first."""
    times = simulate(order)
    return sorted(times, key=lambda task: (times[task][0], task[1]))


def ideal_bubble(num_stages, num_micro_batches):
    """(p - 1) / (m + p - 1): the bubble of GPipe and 1F1B with equal stages."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


# %% [markdown]
# Two small helpers show a timeline: as text (one column per time slot, `..` = idle) and as
# a Gantt chart.

# %%
def schedule_text(times, num_stages):
    """One row per stage, one column per unit time slot."""
    rows = [[".."] * int(makespan(times)) for _ in range(num_stages)]
    for (kind, s, i), (start, end) in times.items():
        for slot in range(int(start), int(end)):
            rows[s][slot] = f"{kind}{i}"
    return "\n".join(f"stage {s} | " + " ".join(row) for s, row in enumerate(rows))


def plot_gantt(times, num_stages, ax, title, unit="slot"):
    """Forward tasks blue, backward orange, the micro-batch number on each box."""
    t0 = min(start for start, _ in times.values())
    for (kind, s, i), (start, end) in times.items():
        ax.broken_barh([(start - t0, end - start)], (num_stages - 1 - s - 0.4, 0.8),
                       facecolors="#4C72B0" if kind == "F" else "#DD8452", edgecolor="white")
        if end - start > 0.025 * makespan(times):
            ax.text((start + end) / 2 - t0, num_stages - 1 - s, i, ha="center", va="center",
                    color="white", fontsize=8)
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in reversed(range(num_stages))])
    ax.set(xlim=(0, makespan(times)), xlabel=f"time ({unit})",
           title=f"{title} (bubble {bubble_fraction(times, num_stages):.0%})")


# %% [markdown]
# First the naive pipeline: one micro-batch ($m = 1$), 4 stages. Stage 1 cannot start
# before stage 0 has finished the batch, and the backward walks back through the stages.

# %%
# NBVAL_CHECK_OUTPUT
naive = simulate(gpipe_order(4, 1))
print(schedule_text(naive, 4))
print(f"bubble fraction: {bubble_fraction(naive, 4):.2f} (formula (p-1)/(m+p-1) = {ideal_bubble(4, 1):.2f})")

# %% [markdown]
# Only one device works at any moment. Naive model parallelism lets you *fit* a bigger
# model, but it is no faster than one device. Now 8 micro-batches with both schedules:

# %%
# NBVAL_CHECK_OUTPUT
P_DEMO, M_DEMO = 4, 8
demo = {kind: simulate(make_order(P_DEMO, M_DEMO)) for kind, make_order in SCHEDULES.items()}
for kind, times in demo.items():
    print(f"{kind}: makespan {makespan(times):g} slots, bubble {bubble_fraction(times, P_DEMO):.4f}, "
          f"formula {ideal_bubble(P_DEMO, M_DEMO):.4f}, peak in flight per stage "
          f"{peak_in_flight(times, P_DEMO)}")
    print(schedule_text(times, P_DEMO), "\n")

# %%
fig, axes = plt.subplots(3, 1, figsize=(12, 6.5))
plot_gantt(naive, 4, axes[0], "naive, p=4, m=1")
for ax, (kind, times) in zip(axes[1:], demo.items(), strict=True):
    plot_gantt(times, P_DEMO, ax, f"{kind}, p={P_DEMO}, m={M_DEMO}")
plt.tight_layout()
plt.show()

# %% [markdown]
# Both schedules take the same time, so they have the same bubble: the first stage waits
# $p-1$ slots for the backward to come back and the last stage idles $p-1$ slots at the
# start. With equal stage times the idle share is
#
# $$\text{bubble} = \frac{p-1}{m+p-1}.$$
#
# The table checks the simulator against the formula; more micro-batches shrink the bubble.
# The difference is memory: in GPipe every stage holds all $m$ micro-batches at once; in
# 1F1B stage $s$ holds at most $\min(p-s, m) \le p$, whatever $m$.

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for m in (1, 2, 4, 8, 16, 32):
    row = {"p": P_DEMO, "m": m, "formula": ideal_bubble(P_DEMO, m)}
    for kind, make_order in SCHEDULES.items():
        times = simulate(make_order(P_DEMO, m))
        row[f"bubble {kind}"] = bubble_fraction(times, P_DEMO)
        row[f"peak in flight {kind}"] = max(peak_in_flight(times, P_DEMO))
    rows.append(row)
table = pd.DataFrame(rows)
print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
print("simulated bubble == (p-1)/(m+p-1) for both schedules:",
      bool(np.allclose(table["bubble gpipe"], table["formula"])
           and np.allclose(table["bubble 1f1b"], table["formula"])))

# %% [markdown]
# ## 4. The micro-batch loop: GPipe on real tensors
#
# `pipeline_pass` runs the tasks of a schedule, one after another, as one thread issues
# them (`execution_order`):
#
# - `F(s, i)`: copy the incoming activation to the stage's device, run the stage under a
#   `tf.GradientTape`, send the output on, and **stash** the tape with its input and output;
# - `B(s, i)`: take the gradient that came back from stage $s+1$ (the last stage starts from
#   its loss), call `tape.gradient(output, variables + [input], output_gradients=...)`, add
#   the variable gradients to the stage's sums and send the input gradient back.
#
# Each task's ops get its name (`F0_1` is the forward of stage 0 on micro-batch 1) and,
# when the stage switches between forwards and backwards, wait for the tasks the stage ran
# before the switch; eagerly neither changes anything, section 5 shows why compiling needs
# them.
#
# The loss of micro-batch $i$ is $\sum_{\text{examples in } i} \ell / B$ with $B$ the whole
# batch size, so the micro-batch losses add up to the batch-mean loss and the summed
# gradients are those of the whole batch. The optimizer then updates the weights once per
# batch, exactly like the unsplit model. `unsplit_gradients` is the reference: the whole
# model on one device, on the whole batch, or accumulating the same micro-batches.

# %% tags=["device-check"]
#@save
import time


def pipeline_pass(stages, devices, x, y, tasks, log=None, strict=False):
    """Loss and summed gradients of one batch, running `tasks` (F and B of m micro-batches).

    log: a list that gets (task, start s, end s, micro-batches stashed on the stage) per task.
    strict: in a graph, every task waits for its stage's previous task, not only at switches.
    """
    p, m = len(stages), 1 + max(i for _, _, i in tasks)
    xs, ys, inv_batch = tf.split(x, m), tf.split(y, m), 1.0 / x.shape[0]
    inbox, stash, grads, losses = {}, {}, [None] * p, []
    # per stage: (kind of its current run of tasks, their results, the previous run's results)
    runs = [("", [], []) for _ in range(p)]
    for task in tasks:
        kind, s, i = task
        t0 = time.perf_counter()
        if runs[s][0] != kind or strict:  # the stage switches between forwards and backwards
            runs[s] = (kind, [], runs[s][1])
        # Run on the stage's device, name the ops after the task (F0_1: forward of stage 0 on
        # micro-batch 1, the profiler shows these names), and start only after the stage's
        # tasks before its last switch: in a graph that keeps the schedule's switches between
        # forwards and backwards; eagerly it changes nothing.
        with (tf.device(devices[s]), tf.name_scope(f"{kind}{s}_{i}"),
              tf.control_dependencies(runs[s][2])):
            if kind == "F":  # forward: receive, run under a tape, stash the tape, send on
                with tf.GradientTape() as tape:
                    h = tf.identity(xs[i] if s == 0 else inbox.pop(("F", s, i)))  # copy to this device
                    tape.watch(h)
                    out = stages[s](h, training=True)
                    if s == p - 1:  # the last stage ends in this micro-batch's share of the loss
                        ce = keras.losses.sparse_categorical_crossentropy(ys[i], out)
                        out = tf.reduce_sum(ce) * inv_batch
                        losses.append(out)
                stash[s, i] = (tape, h, out)
                if s < p - 1:
                    inbox["F", s + 1, i] = out
                runs[s][1].append(out)
            else:  # backward: gradient of the weights and of the input, from the gradient sent back
                tape, h, out = stash.pop((s, i))
                upstream = None if s == p - 1 else tf.identity(inbox.pop(("B", s, i)))
                n = len(stages[s].trainable_variables)
                sources = stages[s].trainable_variables + ([h] if s > 0 else [])
                g = tape.gradient(out, sources, output_gradients=upstream)
                grads[s] = g[:n] if grads[s] is None else [  # accumulate over the micro-batches
                    a + b for a, b in zip(grads[s], g[:n], strict=True)]
                if s > 0:
                    inbox["B", s - 1, i] = g[n]  # the input gradient goes back one stage
                runs[s][1].extend(g)
        if log is not None:
            log.append((task, t0, time.perf_counter(), sum(k[0] == s for k in stash)))
    return tf.add_n(losses), [g for stage_grads in grads for g in stage_grads]


def unsplit_gradients(model, x, y, num_micro_batches=1):
    """The reference: loss and gradients of the whole model on one device (summed over
    `num_micro_batches` micro-batches, with the pipeline's loss scaling)."""
    losses, grads, inv_batch = [], None, 1.0 / x.shape[0]
    for xi, yi in zip(tf.split(x, num_micro_batches), tf.split(y, num_micro_batches), strict=True):
        with tf.GradientTape() as tape:
            ce = keras.losses.sparse_categorical_crossentropy(yi, model(xi, training=True))
            loss = tf.reduce_sum(ce) * inv_batch
        g = tape.gradient(loss, model.trainable_variables)
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        losses.append(loss)
    return tf.add_n(losses), grads


# %% [markdown]
# Run it once with GPipe, $m = 4$, and a log, and look at what it did: which task ran on
# which device, and how many micro-batches the stage held stashed after it.

# %%
M = 4
log = []
loss, grads = pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch,
                            execution_order(gpipe_order(N_STAGES, M)), log=log)
for (kind, s, i), t0, t1, held in log[:6] + log[-3:]:
    print(f"{kind}({s},{i}) on {short_device(STAGE_DEVICES[s])}: {1e3 * (t1 - t0):6.2f} ms, "
          f"stage {s} now stashes {held} micro-batch(es)")
print(f"... {len(log)} tasks; loss {float(loss):.4f}; {len(grads)} gradients "
      f"(the model has {len(model.trainable_variables)} trainable variables)")

# %% [markdown]
# The proof: compare the loss and every gradient with the unsplit model on the same batch,
# for several $m$ and both schedules. `peak stashed` is counted by the loop itself.

# %% tags=["device-check"]
TOL_GRAD = 1e-6  # float32 sums in a different order; gradients here are ~1e-2
TOL_LOSS = 1e-5  # the loss is ~2.3, and one float32 step (ulp) at 2.3 is 2.4e-7
TOL_WEIGHT = 1e-5


def peaks_from(log):
    return [max(held for (_, st, _), *_, held in log if st == s) for s in range(N_STAGES)]


ref_loss, ref_grads = unsplit_gradients(model, x_batch, y_batch)
rows = []
for m in (1, 2, 4, 8):
    for kind, make_order in SCHEDULES.items():
        log = []
        loss, grads = pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch,
                                    execution_order(make_order(N_STAGES, m)), log=log)
        rows.append({"m": m, "schedule": kind, "|loss diff|": abs(float(loss) - float(ref_loss)),
                     "max |grad diff|": max_abs_diff(ref_grads, grads), "peak stashed": peaks_from(log)})
equiv = pd.DataFrame(rows)

# %% tags=["device-check"]
# NBVAL_CHECK_OUTPUT
for r in rows:
    print(f"m={r['m']} {r['schedule']:<5}: loss equal within {TOL_LOSS:g}: "
          f"{r['|loss diff|'] <= TOL_LOSS}, gradients equal within {TOL_GRAD:g}: "
          f"{r['max |grad diff|'] <= TOL_GRAD}, peak stashed per stage {r['peak stashed']}")

# %% [markdown]
# The raw differences (not checked by CI, they depend on the data and the machine):

# %%
largest_grad = max(float(tf.reduce_max(tf.abs(g))) for g in ref_grads)
print(f"batch loss {float(ref_loss):.4f}; largest |gradient| {largest_grad:.3g}")
display(equiv[["m", "schedule", "|loss diff|", "max |grad diff|"]])

# %% [markdown]
# Loss and gradients agree up to float32 rounding, for every $m$ and both schedules, and the
# loop stashed exactly what the simulator predicted: $m$ micro-batches per stage with GPipe,
# at most $p - s$ with 1F1B.
#
# Now update the weights with the summed gradients, once, and compare with the unsplit
# model after one update on the same batch. Both use Adam, which divides each gradient by a
# running root-mean-square, so tiny gradient differences can show up larger in the
# weights. A fresh copy of the model keeps `model` unchanged for later sections.

# %%
STAGE_VARS = [v for st in stages for v in st.trainable_variables]


def fresh_copy():
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def load_stages(source):
    """Copy an unsplit model's weights into the stages (same order)."""
    for v, w in zip(STAGE_VARS, source.trainable_variables, strict=True):
        v.assign(w)


def gpipe_tasks(m):
    return execution_order(gpipe_order(N_STAGES, m))


ref_model = fresh_copy()
load_stages(ref_model)
opt_ref, opt_pipe = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
_, g = unsplit_gradients(ref_model, x_batch, y_batch)
opt_ref.apply_gradients(zip(g, ref_model.trainable_variables, strict=True))
_, g = pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch, gpipe_tasks(M))
opt_pipe.apply_gradients(zip(g, STAGE_VARS, strict=True))
weight_diff = max_abs_diff(ref_model.trainable_variables, STAGE_VARS)
moved = max_abs_diff(model.trainable_variables, ref_model.trainable_variables)

# %%
# NBVAL_CHECK_OUTPUT
print(f"GPipe with m={M}: updated weights equal the unsplit model's within {TOL_WEIGHT:g}: "
      f"{weight_diff <= TOL_WEIGHT}")
print(f"the update really moved the weights (by more than {10 * TOL_WEIGHT:g}): {moved > 10 * TOL_WEIGHT}")
slots = opt_pipe.variables[2:]  # Adam: a momentum and a velocity per variable, in order
print("every Adam slot lives on its variable's device:",
      all(mom.value.device == var.value.device and vel.value.device == var.value.device
          for mom, vel, var in zip(slots[0::2], slots[1::2], STAGE_VARS, strict=True)))

# %%
print(f"max |weight diff| after one step = {weight_diff:.3g} (the step itself moved weights by up to {moved:.3g})")

# %% [markdown]
# ### A short training run, step for step
#
# Train the unsplit model and the pipeline side by side on the same batches of images, from
# the same weights, each with its own Adam optimizer. Three pairs:
#
# 1. the naive pipeline ($m = 1$) against the unsplit model on whole batches;
# 2. GPipe with $m = 4$ against the unsplit model *accumulating the same 4 micro-batches*
#    on one device: the same arithmetic in the same order, without the split into devices;
# 3. GPipe with $m = 4$ against the unsplit model on whole batches.

# %%
TRAIN_STEPS = config.pick(smoke=S.steps, full=50)
TOL_TRAIN = 1e-6
batches = [(tf.constant(to_float(data.x_train[i * BATCH:(i + 1) * BATCH])),
            tf.constant(data.y_train[i * BATCH:(i + 1) * BATCH])) for i in range(TRAIN_STEPS)]


def train_side_by_side(m, m_reference):
    """Both start from `model`'s weights; one row per step: losses and largest weight gap."""
    ref = fresh_copy()
    load_stages(ref)
    opt_ref, opt_pipe, rows = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3), []
    for step, (x, y) in enumerate(batches):
        loss_ref, g = unsplit_gradients(ref, x, y, m_reference)
        opt_ref.apply_gradients(zip(g, ref.trainable_variables, strict=True))
        loss_pipe, g = pipeline_pass(stages, STAGE_DEVICES, x, y, gpipe_tasks(m))
        opt_pipe.apply_gradients(zip(g, STAGE_VARS, strict=True))
        rows.append({"step": step, "loss unsplit": float(loss_ref), "loss pipeline": float(loss_pipe),
                     "|loss diff|": abs(float(loss_ref) - float(loss_pipe)),
                     "max |weight diff|": max_abs_diff(ref.trainable_variables, STAGE_VARS)})
    return pd.DataFrame(rows)


runs = {
    "naive pipeline (m=1) vs unsplit, whole batches": train_side_by_side(1, 1),
    f"GPipe (m={M}) vs unsplit, accumulating the same {M} micro-batches": train_side_by_side(M, M),
    f"GPipe (m={M}) vs unsplit, whole batches": train_side_by_side(M, 1),
}

# %%
# NBVAL_CHECK_OUTPUT
for name, hist in list(runs.items())[:2]:
    print(f"{name}:\n  losses equal at every step within {TOL_TRAIN:g}: "
          f"{hist['|loss diff|'].max() <= TOL_TRAIN}; weights equal after every step within "
          f"{TOL_TRAIN:g}: {hist['max |weight diff|'].max() <= TOL_TRAIN}")
name, hist = list(runs.items())[2]
print(f"{name}:\n  loss of the first step equal within {TOL_LOSS:g}: "
      f"{hist['|loss diff|'].iloc[0] <= TOL_LOSS}; weights after it equal within {TOL_WEIGHT:g}: "
      f"{hist['max |weight diff|'].iloc[0] <= TOL_WEIGHT}")

# %%
whole = runs[f"GPipe (m={M}) vs unsplit, whole batches"]
print(f"{TRAIN_STEPS} steps; training loss {whole['loss unsplit'].iloc[0]:.4f} -> "
      f"{whole['loss unsplit'].iloc[-1]:.4f}")
display(pd.DataFrame([
    {"run": name, "largest |loss diff|": h["|loss diff|"].max(),
     "largest |weight diff|": h["max |weight diff|"].max(),
     "|weight diff| after step 1": h["max |weight diff|"].iloc[0],
     "|weight diff| at the end": h["max |weight diff|"].iloc[-1]}
    for name, h in runs.items()
]))

fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
axes[0].plot(whole["step"], whole["loss unsplit"], lw=3, alpha=0.5, label="unsplit, whole batches")
axes[0].plot(whole["step"], whole["loss pipeline"], "k--", lw=1, label=f"pipeline, GPipe m={M}")
axes[0].set(xlabel="step", ylabel="training loss", title=f"Training on {data.label}")
axes[0].legend()
FLOOR = 1e-10  # exact zeros drawn here on the log scale
for (name, h), style, width in zip(runs.items(), ["-", "--", "-"], [4, 1.5, 1.5], strict=True):
    axes[1].plot(h["step"], h["max |weight diff|"].clip(lower=FLOOR), style, lw=width, label=name)
axes[1].set(xlabel="step", ylabel="max |weight diff|", yscale="log", ylim=(FLOOR / 3, 1),
            title="pipeline vs unsplit (exact 0 drawn at 1e-10)")
axes[1].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the right-hand chart together with the checks above.
#
# - The first two runs are *identical*: their differences sit on the floor of the chart
#   (raw values in the table). With the same micro-batches, the pipeline does exactly the
#   unsplit model's arithmetic, in the same order, only on several devices.
# - The third run agrees after the first step to the tolerance above, and the two loss
#   curves (left) start out on top of each other. But its weight difference grows from step
#   to step (table). This drift is not caused by the pipeline: run 2 shows that the unsplit
#   model fed the same micro-batches follows the pipeline exactly. It is caused by
#   micro-batching, which adds the float32 gradients in a different order. Training feeds
#   every step's weights into the next step, and a ReLU input or a max-pool window that sits
#   on a near-tie can tip the other way, so last-bit differences grow over many steps.

# %% [markdown]
# What does stashing cost? The tape keeps each layer's output for the backward pass.
# `models.layer_table` gives those sizes per image; a micro-batch holds $B/m$ images.

# %%
# NBVAL_CHECK_OUTPUT
act = models.layer_table(model).set_index("layer")["activation bytes/image"]
stage_act = [int(sum(act[layer.name] for layer in st.layers)) for st in stages]
m_mem = 8
per_mb = BATCH // m_mem
print(f"batch {BATCH}, m={m_mem} -> {per_mb} images per micro-batch")
for kind, make_order in SCHEDULES.items():
    peaks = peak_in_flight(simulate(make_order(N_STAGES, m_mem)), N_STAGES)
    mib = [peak * per_mb * a / 2**20 for peak, a in zip(peaks, stage_act, strict=True)]
    print(f"{kind:<5}: peak micro-batches {peaks}, stashed layer outputs per stage (MiB) "
          + ", ".join(f"{v:.2f}" for v in mib))

# %% [markdown]
# Stage 0 (the first convolution, with the largest feature maps) holds the most. With 1F1B
# its count no longer grows with $m$, so you can raise $m$ to shrink the bubble without
# running out of memory.

# %% [markdown]
# ## 5. Compiling the step
#
# The loop above issues one task after another from Python. On a CPU each eager op has
# finished when its call returns, so the stages can never overlap there. Wrapped in
# `tf.function`, the same loop is traced once into one graph: every task's ops keep their
# stage's `tf.device`, and TensorFlow's executor runs any ops whose inputs are ready at the
# same time, so `F(1, 0)` can run while `F(0, 1)` runs. `make_pipeline_step` builds that
# step from a schedule's order (GPipe by default); `make_unsplit_step` compiles the unsplit
# model the same way, for a fair comparison. Given an optimizer, a step also applies the
# gradients once.
#
# A graph keeps only what the data needs, not the order in which Python created the ops:
# without more, GPipe and 1F1B would compile to the same graph and the executor would start
# every micro-batch's forward at once. What makes a schedule is where each stage switches
# between forwards and backwards: GPipe's stage runs all its forwards before any backward,
# 1F1B's runs a backward before each new forward, so its early backwards free memory. So in
# `pipeline_pass`, at each switch, the new task waits for all the tasks the stage ran since
# its previous switch (`tf.control_dependencies`). Inside a run of forwards (or of
# backwards) the micro-batches may overlap, as on a device that runs several kernels at
# once. A stricter chain, each task after the stage's previous one, keeps the order inside
# the runs too, but on CPUs whose cores the small micro-batches do not fill it leaves
# cores idle: exercise 4 measures both.

# %%
#@save
def compile_step(gradients_fn, variables, optimizer=None):
    """Trace gradients_fn(x, y) -> (loss, gradients) once; apply them when given an optimizer."""
    @tf.function
    def step(x, y):
        loss, grads = gradients_fn(x, y)
        if optimizer is not None:
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss, grads

    return step


def make_pipeline_step(stages, devices, num_micro_batches, kind="gpipe", optimizer=None, strict=False):
    """The pipelined step of `kind`'s order as one tf.function: step(x, y) -> (loss, gradients)."""
    tasks = execution_order(SCHEDULES[kind](len(stages), num_micro_batches))
    variables = [v for stage in stages for v in stage.trainable_variables]
    return compile_step(lambda x, y: pipeline_pass(stages, devices, x, y, tasks, strict=strict), variables,
                        optimizer)


def make_unsplit_step(model, optimizer=None):
    """The unsplit model's step, compiled the same way."""
    return compile_step(lambda x, y: unsplit_gradients(model, x, y), model.trainable_variables, optimizer)


# %% [markdown]
# First the proof that compiling changes nothing but speed:

# %%
# NBVAL_CHECK_OUTPUT
load_stages(model)  # the stages were trained above; start from the model's weights again
pipe_steps = {kind: make_pipeline_step(stages, STAGE_DEVICES, M, kind) for kind in SCHEDULES}
pipe_step = pipe_steps["gpipe"]
unsplit_step = make_unsplit_step(model)
ref_loss, ref_grads = unsplit_gradients(model, x_batch, y_batch)
verdicts = []
for kind, label in [("gpipe", "GPipe"), ("1f1b", "1F1B")]:
    c_loss, c_grads = pipe_steps[kind](x_batch, y_batch)
    verdicts.append(f"compiled {label} step (m={M}): loss equal within {TOL_LOSS:g}: "
                    f"{abs(float(c_loss) - float(ref_loss)) <= TOL_LOSS}, gradients equal within "
                    f"{TOL_GRAD:g}: {max_abs_diff(ref_grads, c_grads) <= TOL_GRAD}")
compiled_devices = {short_device(op.device) for op in
                    pipe_step.get_concrete_function(x_batch, y_batch).graph.get_operations() if op.device}
print("\n".join(verdicts))
print("devices the compiled graph places ops on:", sorted(compiled_devices))

# %% [markdown]
# Now time five steps in turns, so that all see the same load, and keep the fastest of
# several rounds (the least disturbed one): the unsplit model and the pipeline, each eager
# and compiled. The compiled pipeline is timed with $m = 4$ (GPipe and 1F1B) and with
# $m = 1$: with one micro-batch no two stages can ever work at once, so the gap between the
# $m = 4$ and $m = 1$ rows is what overlapping bought in this run, and the gap between $m = 1$ and the unsplit model is what
# the split itself costs (copies between devices, more ops).

# %%
def time_ms(fns, repeats):
    """Fastest wall-clock ms of each function over `repeats` interleaved rounds (after a warm-up)."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            float(fn()[0])  # reading the loss waits for the step to finish
            samples[name].append(1e3 * (time.perf_counter() - t0))
    return {name: min(v) for name, v in samples.items()}


REPEATS = config.pick(smoke=3, full=20)
pipe_step_1 = make_pipeline_step(stages, STAGE_DEVICES, 1)
step_ms = time_ms({
    "unsplit, eager": lambda: unsplit_gradients(model, x_batch, y_batch),
    f"pipeline m={M}, eager": lambda: pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch, gpipe_tasks(M)),
    "unsplit, compiled": lambda: unsplit_step(x_batch, y_batch),
    f"pipeline m={M}, compiled": lambda: pipe_step(x_batch, y_batch),
    f"pipeline m={M} 1F1B, compiled": lambda: pipe_steps["1f1b"](x_batch, y_batch),
    "pipeline m=1, compiled": lambda: pipe_step_1(x_batch, y_batch),
}, REPEATS)
timing = pd.DataFrame({"ms per step": step_ms})
timing["vs unsplit, compiled"] = timing["ms per step"] / step_ms["unsplit, compiled"]
display(timing.round(2))
print(f"compiled pipeline (m={M}) / compiled unsplit model: "
      f"{step_ms[f'pipeline m={M}, compiled'] / step_ms['unsplit, compiled']:.2f}x the time "
      f"({N_STAGES} stages on {len(set(STAGE_DEVICES))} {devices.device_kind()} device(s))")

# %% [markdown]
# What would $p$ independent devices do? Take each stage's forward and backward time from a
# logged eager pass (the median over its micro-batches) and feed them to the simulator. The
# speed-up that matters is against the unsplit model on one device, not against the same
# micro-batch tasks run one by one.

# %%
logs = []
for _ in range(REPEATS):
    logs.append([])
    pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch, gpipe_tasks(M), log=logs[-1])
task_ms = pd.DataFrame([{"stage": s, "kind": k, "ms": 1e3 * (t1 - t0)}
                        for log in logs[1:] for (k, s, _), t0, t1, _ in log])
stage_ms = task_ms.groupby(["stage", "kind"])["ms"].median().unstack()
display(stage_ms.round(2))
sims = {kind: simulate(make_order(N_STAGES, M), stage_ms["F"].to_numpy(), stage_ms["B"].to_numpy())
        for kind, make_order in SCHEDULES.items()}
work_ms = M * float(stage_ms.to_numpy().sum())
print(f"sum of the {2 * M * N_STAGES} micro-batch tasks: {work_ms:.1f} ms, "
      f"{work_ms / step_ms['unsplit, eager']:.2f}x the unsplit model's eager step "
      f"({step_ms['unsplit, eager']:.1f} ms)")
for kind, times in sims.items():
    print(f"simulated {kind} on {N_STAGES} independent devices: {makespan(times):.1f} ms, "
          f"speed-up over the unsplit model {step_ms['unsplit, eager'] / makespan(times):.2f}x, "
          f"bubble {bubble_fraction(times, N_STAGES):.0%} (equal stages: {ideal_bubble(N_STAGES, M):.0%})")

# %%
fig, axes = plt.subplots(2, 1, figsize=(12, 4.6))
t_first = logs[-1][0][1]
measured = {task: (1e3 * (t0 - t_first), 1e3 * (t1 - t_first)) for task, t0, t1, _ in logs[-1]}
plot_gantt(measured, N_STAGES, axes[0], f"measured here, eager GPipe, m={M}", unit="ms")
plot_gantt(sims["gpipe"], N_STAGES, axes[1], "simulated with these stage times", unit="ms")
for ax in axes:
    ax.set_xlim(0, max(makespan(measured), makespan(sims["gpipe"])))
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the timing table and the charts together.
#
# **What small micro-batches cost.** Each micro-batch task is a smaller piece of work: every
# task adds Python, copy and launch overhead, and a kernel on $B/m$ images keeps wide
# hardware (a GPU, many cores) less busy than one on $B$ images (on a small CPU, a smaller
# micro-batch may instead fit its caches better). The line "sum of the ... micro-batch
# tasks" above compares them with the unsplit model's step in this run. Whatever they cost,
# a pipeline has to win it back by overlapping stages before it gains anything; the
# simulated speed-ups above are counted against the unsplit model, so they include it.
#
# **What this machine shows.** The eager chart (top) has exactly one task running at any
# time: one Python thread issues the tasks, and each eager CPU op has finished when its call
# returns. Compiled, the executor can run ops of different stages at once. But the logical
# CPUs are one physical CPU with 2 cores under several names: stages that run "at the same
# time" share those cores, and the unsplit model's kernels already use both. So the
# compiled ratio in the table above says how well TensorFlow's executor schedules this
# graph on 2 busy cores (other programs share them, and the ratio moves from run to run),
# not what separate devices would gain.
#
# **What changes on real GPUs.** On $p$ GPUs each stage's kernels run on its own GPU, and
# the compiled step overlaps them as in the simulated chart, with two costs the simulation
# leaves out: activations and gradients crossing PCIe or NVLink (`comm` in `simulate`) and
# per-task launch overhead. The slowest stage sets the pace (compare the stage times), so
# the bubble is larger than the equal-stage formula. This code runs unchanged there, but it
# has not been measured on GPUs yet (see the run-time table).
#
# Everything except speed the logical devices *do* show: where variables and activations
# live, which tensors cross which boundary, the order of the tasks, how many micro-batches
# each stage stashes, and that the results equal the unsplit model's.

# %% [markdown]
# ### What really ran: a timeline from the profiler
#
# The chart above is drawn from eager task times measured one by one. To see what the
# compiled step did, ask TensorFlow's profiler. `tf.profiler.experimental.start(logdir)`
# records every op the runtime executes until `stop()`, then writes the trace to
# `logdir/plugins/profile/<date>/<host>.xplane.pb`: an `XSpace` protocol buffer, the file
# TensorBoard's profile view reads. TensorFlow ships its schema as
# `tensorflow.tsl.profiler.protobuf.xplane_pb2`, and parsing a protocol buffer only reads
# data (no code from the file runs, unlike unpickling).
#
# An `XSpace` holds *planes* (one per host or accelerator), a plane holds *lines* (one per
# thread), a line holds *events*: a name, a start and a duration. An op's event is named
# `op name:op type`. On a CPU every op lands in the `/host:CPU` plane, on the threads of
# TensorFlow's executor; the trace has no plane and no field per logical CPU. The op names
# tell us instead: `pipeline_pass` named every task's ops after the task (`F1_2/stage1_1/...`)
# and TensorFlow names a gradient op after its forward op (`gradient_tape/F1_2/stage1_1/...`).
# So each op maps to its task, its stage, and through `STAGE_DEVICES` to its device. The few
# ops outside any task (splitting the batch, summing the losses and some of the gradient
# sums, which the graph optimizer renames) are left out.
#
# `busy_and_overlap` then measures, for each stage, the time when at least one of its ops
# was running (the union of their intervals), and the *overlap*: the sum of those busy times
# divided by the wall time of the step. One stage at a time gives 1; $p$ stages always busy
# give $p$. The bubble read from the trace is $1 - \text{overlap}/p$, the simulator's
# definition.

# %%
#@save
import glob
import shutil

import pandas as pd
from tensorflow.tsl.profiler.protobuf import xplane_pb2


def capture_trace(step, x, y, logdir):
    """Run step(x, y) once to warm up, then once more under the profiler; the trace goes to logdir."""
    float(step(x, y)[0])  # traced and run once: the captured step is a steady-state step
    shutil.rmtree(logdir, ignore_errors=True)  # one trace per folder
    tf.profiler.experimental.start(str(logdir))
    float(step(x, y)[0])  # reading the loss waits for the whole step
    tf.profiler.experimental.stop()
    return logdir


def read_trace(trace_dir):
    """Every op in the newest trace under trace_dir, times in ms from the first op.

    Returns DataFrame(thread, name, type, start_ms, end_ms), one row per op run.
    """
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    rows = []
    for plane in space.planes:
        for line in plane.lines:  # one line per thread
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if meta.display_name:  # an op: its display name is its type
                    start_ps = line.timestamp_ns * 1000 + event.offset_ps
                    rows.append({"thread": line.name, "name": meta.name.split(":")[0], "type": meta.display_name,
                                 "start_ps": start_ps, "end_ps": start_ps + event.duration_ps})
    ops = pd.DataFrame(rows)
    t0 = ops["start_ps"].min()
    ops["start_ms"], ops["end_ms"] = (ops["start_ps"] - t0) / 1e9, (ops["end_ps"] - t0) / 1e9
    return ops.drop(columns=["start_ps", "end_ps"]).sort_values("start_ms", ignore_index=True)


TASK_OP = r"^(gradient_tape/)?([FB])(\d+)_(\d+)/"  # F1_2/... or gradient_tape/F1_2/...


def op_intervals(trace_dir):
    """The ops of every task in the newest trace under trace_dir, times in ms from the first.

    Returns DataFrame(stage, kind, micro_batch, name, start_ms, end_ms), one row per op run.
    """
    ops = read_trace(trace_dir)
    task = ops["name"].str.extract(TASK_OP)  # the groups of TASK_OP; NaN where not a task's op
    ops = ops[task[1].notna()].assign(stage=task[2].astype("Int64"), micro_batch=task[3].astype("Int64"),
                                      kind=task[1].where(task[0].isna(), "B"))  # gradient_tape/...: a backward
    ops[["start_ms", "end_ms"]] -= ops["start_ms"].min()
    return ops[["stage", "kind", "micro_batch", "name", "start_ms", "end_ms"]].astype(
        {"stage": int, "micro_batch": int}).reset_index(drop=True)


def busy_and_overlap(intervals):
    """Busy and idle ms per stage, the wall ms from the first op to the last, and the overlap.

    busy = the time when at least one of the stage's ops runs; overlap = sum of busy / wall.
    Returns (DataFrame indexed by stage, wall_ms, overlap).
    """
    t0, t1 = intervals["start_ms"].min(), intervals["end_ms"].max()
    rows = {}
    for s, ops in intervals.groupby("stage"):
        spans = []  # the union of the ops' intervals, as disjoint [start, end] spans
        for start, end in sorted(zip(ops["start_ms"], ops["end_ms"], strict=True)):
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        edges = [t0, *(t for span in spans for t in span), t1]
        gaps = [b - a for a, b in zip(edges[::2], edges[1::2], strict=True)]  # before, between, after
        rows[s] = {"busy ms": sum(end - start for start, end in spans), "idle ms": sum(gaps),
                   "longest idle gap ms": max(gaps)}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("stage")
    return table, t1 - t0, table["busy ms"].sum() / (t1 - t0)


# %% [markdown]
# Capture one compiled step of each schedule (each after a warm-up step) into
# `runs/06_pipeline_parallelism/profile/<schedule>` (`runs/` is ignored by git), and look at
# the longest ops of the GPipe trace:

# %%
PROFILE_DIR = config.run_dir("06_pipeline_parallelism") / "profile"
traces = {}
for kind, step in pipe_steps.items():
    with config.quiet_tf_logs():
        capture_trace(step, x_batch, y_batch, PROFILE_DIR / kind)
    traces[kind] = op_intervals(PROFILE_DIR / kind)
    print(f"{kind}: {len(traces[kind])} ops of {traces[kind].groupby(['stage', 'kind', 'micro_batch']).ngroups} "
          f"tasks read from {PROFILE_DIR.relative_to(config.REPO_ROOT)}/{kind}")
longest_ops = traces["gpipe"].assign(ms=traces["gpipe"]["end_ms"] - traces["gpipe"]["start_ms"])
print(longest_ops.nlargest(6, "ms")[["stage", "kind", "micro_batch", "ms", "name"]].to_string(
    index=False, float_format=lambda v: f"{v:.2f}"))

# %% [markdown]
# Now each schedule's trace: busy and idle time per stage, the overlap, and the bubble next
# to the simulator's and the formula's. The simulator gets each stage's forward and
# backward time from the same trace (its busy time in forward or backward ops, divided by
# $m$): it says what $p$ independent devices would do with exactly these op times.

# %%
def plot_ops(ops, num_stages, ax, title):
    """What ran: each op on its stage's row (forwards blue, backwards orange), micro-batch numbers."""
    for (s, kind), group in ops.groupby(["stage", "kind"]):
        ax.broken_barh(list(zip(group["start_ms"], group["end_ms"] - group["start_ms"], strict=True)),
                       (num_stages - 1 - s - 0.4, 0.8), facecolors="#4C72B0" if kind == "F" else "#DD8452")
    for (s, _, i), group in ops.groupby(["stage", "kind", "micro_batch"]):
        longest = group.loc[(group["end_ms"] - group["start_ms"]).idxmax()]  # label the task's longest op
        ax.text((longest["start_ms"] + longest["end_ms"]) / 2, num_stages - 1 - s, i,
                ha="center", va="center", color="white", fontsize=8)
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in reversed(range(num_stages))])
    ax.set(xlabel="time (ms)", title=title)


fig, axes = plt.subplots(4, 1, figsize=(12, 9))
x_max = 0.0
for row, (kind, ops) in enumerate(traces.items()):
    busy, wall, overlap = busy_and_overlap(ops)
    stage_busy = {k: busy_and_overlap(ops[ops["kind"] == k])[0]["busy ms"] / M for k in "FB"}
    sim = simulate(SCHEDULES[kind](N_STAGES, M), stage_busy["F"].to_numpy(), stage_busy["B"].to_numpy())
    print(f"{kind}, m={M}, {N_STAGES} stages on {len(set(STAGE_DEVICES))} device(s): "
          f"wall {wall:.1f} ms, overlap {overlap:.2f}, bubble from the trace {1 - overlap / N_STAGES:.0%}, "
          f"simulated {bubble_fraction(sim, N_STAGES):.0%} ({makespan(sim):.1f} ms), "
          f"formula (p-1)/(m+p-1) {ideal_bubble(N_STAGES, M):.0%}")
    display(busy.round(2))
    plot_ops(ops, N_STAGES, axes[2 * row], f"what ran: compiled {kind}, profiler trace "
             f"(overlap {overlap:.2f}, bubble {1 - overlap / N_STAGES:.0%})")
    plot_gantt(sim, N_STAGES, axes[2 * row + 1], f"simulated {kind} with the trace's stage times", unit="ms")
    x_max = max(x_max, wall, makespan(sim))
for ax in axes:
    ax.set_xlim(0, x_max)  # one time scale for all four charts
plt.tight_layout()
plt.show()

# %% [markdown]
# Read each pair of rows together, top (what ran) against bottom (independent devices).
#
# - **Order.** In the traces every stage keeps its schedule: GPipe's stages run all their
#   forwards, then all their backwards; with 1F1B the later stages run backwards between
#   their forwards. That is the control dependency at each switch at work; inside a run,
#   forwards of different micro-batches of one stage may overlap.
# - **Overlap.** An overlap above 1, when the prints show it, means ops of different stages
#   were running at the same moment. Here that does not mean more hardware at work: the
#   logical CPUs are one CPU with 2 cores, and all of them share TensorFlow's thread pools,
#   so the executor runs independent ops of different stages at once even when every stage
#   sits on one logical device (try `SERIES_NUM_CPUS=1`). An op's interval includes waiting
#   for the shared cores, so two stages that run "at once" each run slower, and recording
#   the trace adds a little time to every op. So compare the trace's wall time with the
#   unsplit model's compiled step in the timing table, not with the sum of the busy times.
# - **Bubble.** The bubble read from the trace counts every moment a stage has no op
#   running. It is larger than the formula's when the stages are unequal (the slowest stage
#   sets the pace, see the busy times) and when the shared cores stretch the ops. The
#   simulation with the same op times shows what $p$ separate devices would leave idle.
#
# On GPUs the same functions read the same file; each GPU then has its own plane in the
# trace (`/device:GPU:0`, ...) whose kernels would give the busy time of each device directly.

# %% [markdown]
# ### The same trace in TensorBoard
#
# TensorBoard's profile view draws these traces interactively (zoom into any op, see its
# thread). It needs the `tensorboard` and `tensorboard-plugin-profile` packages; the cell
# below says whether this environment has them. In a terminal, from the repository root:
#
# ```bash
# tensorboard --logdir runs/06_pipeline_parallelism/profile --host 127.0.0.1
# ```
#
# Open http://127.0.0.1:6006 (`--host 127.0.0.1` keeps it off the network), choose
# **PROFILE** (in the drop-down menu at the top right if it is not in the tab bar), pick the
# run on the left (`gpipe` or `1f1b`, one capture each) and, under **Tools**,
# `trace_viewer`. The `/host:CPU` process shows one row per thread; the executor's threads
# (`tf_Compute`) hold the ops. Click an op to see its full name, `F1_2/stage1_1/...` or
# `gradient_tape/F1_2/...`: the same names `op_intervals` read.

# %%
import importlib.util

for package in ("tensorboard", "tensorboard_plugin_profile"):
    print(f"{package} installed: {importlib.util.find_spec(package) is not None}")

# %% [markdown]
# ## Summary
#
# - `tf.device` decides where variables are created and where ops run. Building each stage
#   under its device placed every variable there, and each stage output was computed there;
#   we printed both from the objects themselves.
# - A schedule is only an order per stage: GPipe runs all forwards then all backwards; 1F1B
#   warms up, alternates one forward and one backward, then cools down. A simulator places
#   the tasks in time; both have the bubble $(p-1)/(m+p-1)$ with equal stages, but GPipe
#   stashes $m$ micro-batches per stage and 1F1B at most $p$.
# - The micro-batch loop stashes one tape per stage and micro-batch, sums the gradients and
#   applies them once. Its loss, gradients and updated weights matched the unsplit model
#   within the printed tolerances; in training it was identical, step for step, to the
#   unsplit model fed the same micro-batches.
# - Compiled into one `tf.function`, the same loop gives the same gradients and lets
#   TensorFlow overlap the stages. Speed-ups count against the unsplit model, so they
#   include what splitting the batch into small micro-batches costs per image. On logical
#   CPUs that share 2 cores the timings show the executor at work, not a gain from more
#   hardware; the simulation with measured stage times estimates what separate devices
#   could gain.
# - At each switch between forwards and backwards a stage waits for the tasks before it (a
#   control dependency), so the compiled GPipe and 1F1B steps keep their schedules. The
#   profiler's trace (`tf.profiler.experimental`, an
#   `XSpace` protocol buffer under `runs/`) shows what really ran: we read each op's interval,
#   mapped it to its stage by the task name it carries, and measured busy time, overlap and
#   bubble against the simulator and the formula. TensorBoard's profile view opens the same
#   files.

# %%
print(f"This notebook ran in {time.perf_counter() - T_START:.0f} s ({config.get_mode()} mode, "
      f"{devices.device_kind()}).")

# %% [markdown]
# ## Exercises
#
# **1. More micro-batches, less memory.** Compute the gradients with 1F1B and $m = 16$
# (micro-batches of 8 images). Check that they still equal the unsplit model's, and print
# the peak number of micro-batches each stage stashed.

# %%
# Try it: set the schedule and m, run the loop with a log, compare with ref_grads.
kind, m = "gpipe", 2  # TODO: 1F1B with m=16
my_log = []
_, my_grads = pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch,
                            execution_order(SCHEDULES[kind](N_STAGES, m)), log=my_log)
print("max |grad diff|:", max_abs_diff(ref_grads, my_grads), "peak stashed:", peaks_from(my_log))

# %% jupyter={"source_hidden": true}
# Solution
log16 = []
_, grads16 = pipeline_pass(stages, STAGE_DEVICES, x_batch, y_batch,
                           execution_order(one_f_one_b_order(N_STAGES, 16)), log=log16)
print("gradients equal within 1e-6:", max_abs_diff(ref_grads, grads16) <= 1e-6)
print("peak stashed per stage:", peaks_from(log16), "(GPipe would hold 16 on every stage)")

# %% [markdown]
# **2. Balance the stages.** Cut the model by parameter count instead of FLOPs
# (`partition([layer.count_params() for layer in model.layers], N_STAGES)`). Simulate GPipe
# with $m = 4$ for both cuts, with task times proportional to each stage's FLOPs (backward =
# twice the forward, a common rule of thumb). Which cut has the smaller makespan, and why?

# %%
# Try it: the FLOP cut is given; add the parameter cut (`partition` was imported above).
flops = np.array([models.layer_flops(layer) for layer in model.layers], float)
cuts = {"FLOPs": STARTS}  # TODO: add "params": partition([...], N_STAGES)
for name, starts in cuts.items():
    units = np.add.reduceat(flops, starts) / flops.sum()  # each stage's share of the FLOPs
    print(name, starts, f"makespan {makespan(simulate(gpipe_order(N_STAGES, 4), units, 2 * units)):.2f}")

# %% jupyter={"source_hidden": true}
# Solution
cuts = {"FLOPs": STARTS, "params": partition([layer.count_params() for layer in model.layers], N_STAGES)}
for name, starts in cuts.items():
    units = np.add.reduceat(flops, starts) / flops.sum()
    span = makespan(simulate(gpipe_order(N_STAGES, 4), units, 2 * units))
    print(f"cut by {name:<6}: stages start at {[model.layers[i].name for i in starts]}, "
          f"FLOP shares {np.round(units, 2).tolist()}, makespan {span:.2f} (1 = the model's forward)")
print("Time follows FLOPs, not parameters: dense1 holds most parameters but little work, so the "
      "params cut packs most of the work into one stage, the bottleneck.")

# %% [markdown]
# **3. Communication.** Suppose each stage boundary costs a fixed delay per transfer, say
# a fifth of the mean task time. Simulate GPipe for $m \in \{1, 4, 16\}$ with and without that
# `comm`. How do the makespan and the bubble change?

# %%
# Try it: change comm and watch the makespan.
fwd_ms, bwd_ms = stage_ms["F"].to_numpy(), stage_ms["B"].to_numpy()
comm = 0.0  # TODO: a fifth of the mean task time
times = simulate(gpipe_order(N_STAGES, 4), fwd_ms, bwd_ms, comm=comm)
print(f"makespan {makespan(times):.1f} ms, bubble {bubble_fraction(times, N_STAGES):.0%}")

# %% jupyter={"source_hidden": true}
# Solution
comm = 0.2 * float(np.mean(np.r_[fwd_ms, bwd_ms]))
for m in (1, 4, 16):
    a = simulate(gpipe_order(N_STAGES, m), fwd_ms, bwd_ms)
    b = simulate(gpipe_order(N_STAGES, m), fwd_ms, bwd_ms, comm=comm)
    print(f"m={m:>2}: makespan {makespan(a):7.1f} -> {makespan(b):7.1f} ms, "
          f"bubble {bubble_fraction(a, N_STAGES):.0%} -> {bubble_fraction(b, N_STAGES):.0%}")
print("Transfers lengthen the fill and drain of the pipeline (2(p-1) crossings on the critical "
      "path), so their share shrinks as m grows.")

# %% [markdown]
# **4. A strict chain.** `make_pipeline_step(..., strict=True)` makes every task wait for
# its stage's previous task, so the micro-batches of a run of forwards can no longer
# overlap. Check that its gradients still equal the default step's, and time it against
# the default GPipe step and the unsplit compiled step (use `time_ms`). Where does the
# difference come from?

# %%
# Try it: build the strict GPipe step and compare its gradients and its time.
strict_step = make_pipeline_step(stages, STAGE_DEVICES, M, strict=False)  # TODO: strict=True
print("max |grad diff|:", max_abs_diff(pipe_step(x_batch, y_batch)[1], strict_step(x_batch, y_batch)[1]))

# %% jupyter={"source_hidden": true}
# Solution
strict_step = make_pipeline_step(stages, STAGE_DEVICES, M, strict=True)
print("gradients equal within 1e-6:",
      max_abs_diff(pipe_step(x_batch, y_batch)[1], strict_step(x_batch, y_batch)[1]) <= 1e-6)
chain_ms = time_ms({"unsplit, compiled": lambda: unsplit_step(x_batch, y_batch),
                    "GPipe, waits at switches": lambda: pipe_step(x_batch, y_batch),
                    "GPipe, strict chain": lambda: strict_step(x_batch, y_batch)}, REPEATS)
for name, ms in chain_ms.items():
    print(f"{name:26s} {ms:6.2f} ms  {ms / chain_ms['unsplit, compiled']:.2f}x the unsplit step's time")
ratio = chain_ms["GPipe, strict chain"] / chain_ms["GPipe, waits at switches"]
print(f"strict chain / waits at switches: {ratio:.2f}x the time. Same arithmetic, fewer chances to "
      f"overlap: a strict chain runs one micro-batch per stage at a time, which costs time wherever a "
      f"micro-batch of {len(x_batch) // M} images leaves cores idle (above all while the pipeline fills "
      f"and drains); on a GPU, which runs a device's kernels one after another on its stream anyway, it costs little.")

# %% [markdown]
# ## Further reading
#
# - Y. Huang et al., *GPipe: Efficient Training of Giant Neural Networks using Pipeline
#   Parallelism*, NeurIPS 2019. [arXiv:1811.06965](https://arxiv.org/abs/1811.06965)
# - D. Narayanan et al., *PipeDream: Generalized Pipeline Parallelism for DNN Training*,
#   SOSP 2019. [doi:10.1145/3341301.3359646](https://doi.org/10.1145/3341301.3359646)
# - D. Narayanan et al., *Memory-Efficient Pipeline-Parallel DNN Training* (PipeDream-2BW
#   and PipeDream-Flush, the 1F1B schedule used here), ICML 2021.
#   [arXiv:2006.09503](https://arxiv.org/abs/2006.09503)
# - D. Narayanan et al., *Efficient Large-Scale Language Model Training on GPU Clusters
#   Using Megatron-LM*, SC 2021 (bubble analysis, interleaved 1F1B).
#   [arXiv:2104.04473](https://arxiv.org/abs/2104.04473)
# - picotron (Hugging Face): a minimal 4-D parallelism code base whose
#   `pipeline_parallel.py` writes the AFAB and 1F1B schedules in the same style.
#   [github.com/huggingface/picotron](https://github.com/huggingface/picotron)
# - TensorFlow guides: [Use a GPU (manual device placement, logical
#   devices)](https://www.tensorflow.org/guide/gpu) and
#   [`tf.GradientTape`](https://www.tensorflow.org/api_docs/python/tf/GradientTape)
#   (`output_gradients`, used by each stage's backward).
