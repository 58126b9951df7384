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
# # Pipeline parallelism: one model across several devices
#
# So far every device held a full copy of the model. When the model itself is too big for
# one device, you have to cut it: put the first layers on one device, the next layers on
# another, and pass the activations along. This is *model parallelism*, and its most
# common form for deep networks is *pipeline parallelism*.
#
# TensorFlow 2.21 has no pipeline API, so this notebook uses a small one built on
# `tf.device` in `utils.parallel`, and proves that it computes what the unsplit model
# computes.
#
# **What you will learn**
#
# - How to cut a Keras model into stages, place each stage's variables on its own device
#   with `tf.device`, and check where every variable and every activation lives.
# - Why naive model parallelism keeps only one device busy at a time.
# - How GPipe splits a batch into micro-batches, accumulates gradients and applies them
#   once, and how to prove that the gradients, the updated weights and a training run
#   equal those of the unsplit model (and where float32 rounding comes in).
# - How GPipe and 1F1B schedules order the work, what the *bubble* $(p-1)/(m+p-1)$ is, and
#   why 1F1B needs far less activation memory.
# - How to feed measured per-stage times into a simulated timeline, and what logical CPUs
#   on a 2-core machine can and cannot tell you about real GPUs.
#
# **Run time**
#
# | mode | 2-core CPU | GPU |
# | --- | --- | --- |
# | full (`SERIES_MODE=full`, real CIFAR-10) | about 3 min | not measured yet |
# | smoke (`SERIES_MODE=smoke`) | about 30 s | not measured yet |
#
# The CPU times were measured on a 2-core machine that other jobs kept busy; a quiet
# machine is faster.
#
# The cell after the summary prints how long your run took.

# %% [markdown]
# ## Setup
#
# `setup_devices()` must run before any other TensorFlow code. On a machine without GPUs it
# splits the CPU into logical devices (4 unless you set `SERIES_NUM_CPUS`); this notebook
# cuts the model into 4 stages, one per device.

# %%
import time

T_START = time.perf_counter()

import utils  # noqa: F401  (quiets TensorFlow's C++ log)
from utils import config, devices, models, parallel
from utils.data import load_cifar10

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
print(f"mode: {config.get_mode()}, seed: {SEED}, device kind: {devices.device_kind()}")
print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")

# %% [markdown]
# Load CIFAR-10 (in smoke mode a small synthetic stand-in when no copy is available) and
# take one batch of the series' batch size. Images become floats in [0, 1], as the seed
# CNN expects.

# %%
data = load_cifar10(allow_synthetic=config.is_smoke(), n_train=S.n_train, n_test=S.n_test)
print(data.describe())

BATCH = S.batch_size
x_batch = data.x_train[:BATCH].astype("float32") / 255.0
y_batch = data.y_train[:BATCH]

# %% [markdown]
# ## 1. Naive model parallelism
#
# Build the seed CNN and look at where its cost sits: FLOPs are in the convolutions,
# parameters in `dense1`.

# %%
# NBVAL_CHECK_OUTPUT
model = models.build_seed_cnn()
print(models.layer_table(model)[["layer", "output shape", "params", "FLOPs/image"]].to_string(index=False))

# %% [markdown]
# `Pipeline.from_sequential` cuts the layer list into `N_STAGES` contiguous stages. With
# `balance="flops"` it minimises the forward FLOPs of the most expensive stage, because the
# slowest stage sets the pace of a pipeline. It then rebuilds each stage's layers under
# `with tf.device(stage_device):`, which is what makes their variables live there, and
# copies the model's weights into them. The original `model` is untouched: it stays on
# one device as the reference you compare against.
#
# If you have fewer devices than stages you get an error that says what to do. On GPUs with
# fewer than 4 cards, this notebook lets stages share cards instead (`allow_reuse=True`):
# the arithmetic is the same, there is just no overlap.

# %%
N_STAGES = 4
share = devices.device_kind() == "GPU" and len(DEVICES) < N_STAGES
pipe = parallel.Pipeline.from_sequential(model, N_STAGES, balance="flops", allow_reuse=share)

try:
    parallel.stage_devices(len(DEVICES) + 1)
except parallel.NotEnoughDevicesError as err:
    print(f"Asking for {len(DEVICES) + 1} stages:\n{err}")

# %%
# NBVAL_CHECK_OUTPUT
print(pipe.stage_table().to_string(index=False))

# %% [markdown]
# Now ask every variable where it lives. The device comes from the variable object itself
# (`variable.value.device`), not from what we intended.

# %%
# NBVAL_CHECK_OUTPUT
print(f"unsplit model: all {len(model.weights)} variables on "
      f"{sorted({v.value.device for v in model.weights})}")
for k, stage in enumerate(pipe.stages):
    print(f"stage {k} ({stage.name}):")
    for v in stage.weights:
        print(f"  {v.path:<22} {str(tuple(v.shape)):<18} {v.value.device}")

# %% [markdown]
# Run the batch through the stages and ask each stage's output where it was computed.
# Every stage first copies its input onto its own device (`tf.identity` under
# `tf.device`), so each boundary is one activation tensor crossing from one device to the
# next.

# %%
# NBVAL_CHECK_OUTPUT
outs = pipe.forward_trace(x_batch)
prev = "host (NumPy)"
for k, out in enumerate(outs):
    print(f"stage {k}: input from {prev:<13} -> output {str(tuple(out.shape)):<18} on {out.device}")
    prev = parallel.short_device(out.device)
crossing = [int(np.prod(o.shape)) * o.dtype.size for o in outs[:-1]]
print("bytes crossing each stage boundary, forward, per batch:", ", ".join(f"{b:,}" for b in crossing))

TOL_OUT = 1e-6
out_diff = parallel.max_abs_diff([model(x_batch)], [outs[-1]])
print(f"pipeline output equals the unsplit model's within {TOL_OUT:g}: {out_diff <= TOL_OUT}")

# %%
print(f"max |pipeline output - unsplit output| = {out_diff:.3g}")

# %% [markdown]
# That is model parallelism: the model is spread over four devices. But look at the order
# of work. Stage 1 cannot start before stage 0 has finished the batch, and in training the
# backward pass walks back through the stages in reverse. Below, the left chart is the
# schedule of one training step on 4 devices with one task per time slot; the right chart
# is the same step *measured* on this machine (`record=True` times every task).

# %%
# NBVAL_CHECK_OUTPUT
naive = parallel.pipeline_schedule(N_STAGES, 1, "gpipe")
print(naive.to_text())
print(f"bubble fraction: {naive.bubble_fraction:.2f} "
      f"(each device idle {naive.bubble_fraction:.0%} of the step)")

# %%
naive_run = pipe.compute_gradients(x_batch, y_batch, num_micro_batches=1, record=True)
fig, axes = plt.subplots(1, 2, figsize=(13, 2.8))
parallel.plot_gantt(naive, ax=axes[0], title="naive, 4 devices, ideal")
parallel.plot_gantt(naive_run.timeline, ax=axes[1], title="naive, measured here")
plt.tight_layout()
plt.show()

# %% [markdown]
# Only one device works at any moment; the other three wait. With $p$ stages each device is
# idle a fraction $(p-1)/p$ of the time (0.75 for 4 stages, printed above). Naive model
# parallelism lets you *fit* a bigger model, but it does not make it any faster than one
# device.

# %% [markdown]
# ## 2. Pipelining with micro-batches (GPipe)
#
# GPipe (Huang et al., 2019) splits each batch into $m$ micro-batches. Stage 0 sends
# micro-batch 0 on to stage 1 and immediately starts on micro-batch 1, so several stages
# work at once. Each stage runs two kinds of tasks per micro-batch:
#
# - `F(s, i)`: copy the input to the stage's device, run the stage under a
#   `tf.GradientTape`, send the output on, and keep (stash) the tape;
# - `B(s, i)`: take the gradient arriving from stage $s+1$, call
#   `tape.gradient(output, variables + [input], output_gradients=...)`, add the variable
#   gradients to the stage's accumulators and send the input gradient back.
#
# The loss of micro-batch $i$ is $\sum_{\text{examples in } i} \ell / B$ with $B$ the whole
# batch size, so the micro-batch losses add up to the batch-mean loss and the accumulated
# gradients are those of the whole batch. Only then does the optimizer update the weights,
# once per batch, exactly like the unsplit model.
#
# The proof: compare the loss and every gradient with the unsplit model on the same batch,
# for several $m$ and both schedules (the second schedule, 1F1B, comes in section 3).
# `peak in flight` counts, while the runner works, how many micro-batches each stage holds
# stashed at once.

# %%
TOL_GRAD = 1e-6  # float32 sums in a different order; gradients here are ~1e-2
TOL_LOSS = 1e-5  # the loss is ~2.3, and one float32 step (ulp) at 2.3 is 2.4e-7
TOL_WEIGHT = 1e-5

ref_loss, ref_grads = parallel.reference_gradients(model, x_batch, y_batch)
rows = []
for m in (1, 2, 4, 8):
    for kind in parallel.SCHEDULES:
        res = pipe.compute_gradients(x_batch, y_batch, num_micro_batches=m, schedule=kind)
        rows.append({
            "m": m, "schedule": kind,
            "|loss diff|": abs(float(res.loss) - float(ref_loss)),
            "max |grad diff|": parallel.max_abs_diff(ref_grads, res.flat_gradients),
            "peak in flight": res.peak_in_flight,
            "bytes between stages": res.bytes_between_stages,
        })
equiv = pd.DataFrame(rows)

# %%
# NBVAL_CHECK_OUTPUT
for r in rows:
    print(f"m={r['m']} {r['schedule']:<5}: loss equal within {TOL_LOSS:g}: "
          f"{r['|loss diff|'] <= TOL_LOSS}, gradients equal within {TOL_GRAD:g}: "
          f"{r['max |grad diff|'] <= TOL_GRAD}, peak in flight per stage {r['peak in flight']}, "
          f"bytes between stages {r['bytes between stages']:,}")

# %% [markdown]
# The raw differences (not checked by CI, they depend on the data and the machine):

# %%
largest_grad = max(float(tf.reduce_max(tf.abs(g))) for g in ref_grads)
print(f"batch loss {float(ref_loss):.4f}; largest |gradient| {largest_grad:.3g}")
display(equiv[["m", "schedule", "|loss diff|", "max |grad diff|"]])

# %% [markdown]
# Loss and gradients agree up to float32 rounding, for every $m$ and both schedules. The
# data crossing between stages per step does not depend on $m$: each example's activation
# goes forward once and its gradient comes back once.
#
# Now update the weights with the accumulated gradients, once, and compare with the
# unsplit model after one update on the same batch. Both use Adam, which divides each
# gradient by a running root-mean-square, so tiny gradient differences can show up larger
# in the weights. A fresh copy of the model keeps `model` unchanged for later sections.

# %%
M = 4
ref_model = keras.models.clone_model(model)
ref_model.set_weights(model.get_weights())
pipe.copy_weights_from(ref_model)

opt_ref, opt_pipe = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
parallel.reference_train_step(ref_model, opt_ref, x_batch, y_batch)
pipe.train_step(opt_pipe, x_batch, y_batch, num_micro_batches=M, schedule="gpipe")
weight_diff = parallel.max_abs_diff(ref_model.trainable_variables, pipe.trainable_variables)
moved = parallel.max_abs_diff(model.trainable_variables, ref_model.trainable_variables)

# %%
# NBVAL_CHECK_OUTPUT
print(f"GPipe with m={M}: updated weights equal the unsplit model's within {TOL_WEIGHT:g}: "
      f"{weight_diff <= TOL_WEIGHT}")
print(f"the update really moved the weights (by more than {10 * TOL_WEIGHT:g}): {moved > 10 * TOL_WEIGHT}")
slots = opt_pipe.variables[2:]  # Adam: a momentum and a velocity per variable, in order
print("every Adam slot lives on its variable's device:",
      all(mom.value.device == var.value.device and vel.value.device == var.value.device
          for mom, vel, var in zip(slots[0::2], slots[1::2], pipe.trainable_variables, strict=True)))
counts = pd.Series([parallel.short_device(s.value.device) for s in slots]).value_counts().sort_index()
print("Adam slots per device:", ", ".join(f"{dev}: {int(n)}" for dev, n in counts.items()))

# %%
print(f"max |weight diff| after one step = {weight_diff:.3g} (the step itself moved weights by up to {moved:.3g})")

# %% [markdown]
# ### A short training run, step for step
#
# `compare_training` trains the unsplit model and the pipeline side by side on the same
# batches of real images, from the same weights, each with its own Adam optimizer. Three
# pairs:
#
# 1. the naive pipeline ($m = 1$) against the unsplit model on whole batches;
# 2. GPipe with $m = 4$ against the unsplit model *accumulating the same 4 micro-batches*
#    on one device (`reference_micro_batches=4`): the same arithmetic in the same order,
#    without the split into devices;
# 3. GPipe with $m = 4$ against the unsplit model on whole batches.

# %%
TRAIN_STEPS = config.pick(smoke=S.steps, full=50)
TOL_TRAIN = 1e-6
batches = [
    (data.x_train[i * BATCH:(i + 1) * BATCH].astype("float32") / 255.0,
     data.y_train[i * BATCH:(i + 1) * BATCH])
    for i in range(TRAIN_STEPS)
]


def fresh_copy():
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def adam():
    return keras.optimizers.Adam(1e-3)


runs = {
    "naive pipeline (m=1) vs unsplit, whole batches":
        parallel.compare_training(fresh_copy(), pipe, batches, adam, num_micro_batches=1),
    f"GPipe (m={M}) vs unsplit, accumulating the same {M} micro-batches":
        parallel.compare_training(fresh_copy(), pipe, batches, adam, num_micro_batches=M,
                                  reference_micro_batches=M),
    f"GPipe (m={M}) vs unsplit, whole batches":
        parallel.compare_training(fresh_copy(), pipe, batches, adam, num_micro_batches=M),
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
#   unsplit model's arithmetic, in the same order, only on four devices.
# - The third run agrees after the first step to the tolerance of section 2, and the two
#   loss curves (left) start out on top of each other. But its weight difference grows from
#   step to step (table), and after enough steps the loss curves visibly part. This drift
#   is not caused by the pipeline: run 2 shows that the unsplit model fed the same
#   micro-batches follows the pipeline exactly. It is caused by micro-batching, which adds
#   the float32 gradients in a different order. Training feeds every step's weights into
#   the next step, and a ReLU input or a max-pool window that sits on a near-tie can tip the
#   other way, so last-bit differences grow over many steps. Any change of summation order
#   (another batch split, another kernel) does the same; it is why "equal" for a whole
#   training run means "equal given the same arithmetic", as in runs 1 and 2.

# %% [markdown]
# ## 3. Schedules: GPipe and 1F1B
#
# A *schedule* says in which order each device runs its `F` and `B` tasks.
# `parallel.schedule_order(p, m, kind)` produces it for any $p$ and $m$, and
# `parallel.simulate` places the tasks in time: each device takes its next task as soon as
# the device is free and the task's inputs have arrived.
#
# - **GPipe**: all forwards, then all backwards.
# - **1F1B** (PipeDream-Flush, Narayanan et al., 2021): stage $s$ runs $p-s-1$ warm-up
#   forwards, then alternates one forward and one backward. A micro-batch's backward starts
#   as soon as possible, so its stash is freed early.
#
# With one time slot per task, for $p = 4$ and $m = 8$:

# %%
# NBVAL_CHECK_OUTPUT
P_DEMO, M_DEMO = 4, 8
for kind in parallel.SCHEDULES:
    tl = parallel.pipeline_schedule(P_DEMO, M_DEMO, kind)
    print(f"{tl.label}: makespan {tl.makespan:g} slots, bubble {tl.bubble_fraction:.4f}, "
          f"formula {parallel.ideal_bubble_fraction(P_DEMO, M_DEMO):.4f}, "
          f"peak in flight per stage {tl.peak_in_flight()}, rule violations {len(tl.violations())}")
    print(tl.to_text(), "\n")

# %%
fig, axes = plt.subplots(2, 1, figsize=(12, 5))
for ax, kind in zip(axes, parallel.SCHEDULES, strict=True):
    parallel.plot_gantt(parallel.pipeline_schedule(P_DEMO, M_DEMO, kind), ax=ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# Both schedules take the same time, so they have the same bubble: the first stage waits
# $p-1$ slots for the backward to come back and the last stage idles $p-1$ slots at the
# start. With equal stage times the idle share is
#
# $$\text{bubble} = \frac{p-1}{m+p-1},$$
#
# which the table below computes from the simulated schedules and compares with the
# formula. More micro-batches shrink the bubble.
#
# The difference is memory. A stage must keep what its backward needs (the stashed
# activations) from `F(s, i)` until `B(s, i)` ends. In GPipe every stage holds all $m$
# micro-batches at once; in 1F1B stage $s$ holds at most $\min(p-s, m) \le p$, whatever
# $m$. The runner counted the same numbers while it computed real gradients in section 2.

# %%
# NBVAL_CHECK_OUTPUT
table = parallel.bubble_table([P_DEMO], [1, 2, 4, 8, 16, 32])
print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
print("simulated bubble == (p-1)/(m+p-1) for both schedules:",
      bool(np.allclose(table["bubble gpipe"], table["formula"])
           and np.allclose(table["bubble 1f1b"], table["formula"])))

# %%
ms = np.arange(1, 33)
fig, ax = plt.subplots(figsize=(7, 3.8))
for p in (2, 4, 8):
    ax.plot(ms, [parallel.ideal_bubble_fraction(p, int(m)) for m in ms], label=f"formula, p={p}")
    sim = [parallel.pipeline_schedule(p, int(m), "1f1b").bubble_fraction for m in ms[::3]]
    ax.plot(ms[::3], sim, "o", color=ax.lines[-1].get_color(), ms=4)
ax.set(xlabel="micro-batches m", ylabel="bubble fraction",
       title="Bubble vs m (lines: formula, dots: simulated 1F1B)")
ax.legend()
plt.show()

# %% [markdown]
# What does "holding $k$ micro-batches" cost here? A rough estimate: the tape keeps each
# layer's output for the backward pass. `models.layer_table` gives those sizes per image;
# a micro-batch of the batch below has $B/m$ images.

# %%
# NBVAL_CHECK_OUTPUT
act = models.layer_table(model).set_index("layer")["activation bytes/image"]
stage_act = [int(sum(act[layer.name] for layer in s.layers)) for s in pipe.stages]
m_mem = 8
per_mb = BATCH // m_mem
print(f"batch {BATCH}, m={m_mem} -> {per_mb} images per micro-batch")
for kind in parallel.SCHEDULES:
    peaks = parallel.pipeline_schedule(N_STAGES, m_mem, kind).peak_in_flight()
    mib = [peak * per_mb * a / 2**20 for peak, a in zip(peaks, stage_act, strict=True)]
    print(f"{kind:<5}: peak micro-batches {peaks}, stashed layer outputs per stage (MiB) "
          + ", ".join(f"{v:.2f}" for v in mib))

# %% [markdown]
# Stage 0 (the first convolution, with the largest feature maps) holds the most. With 1F1B
# it still holds 4 micro-batches, but that number no longer grows with $m$, so you can
# raise $m$ to shrink the bubble without running out of memory.

# %% [markdown]
# ## 4. Measured vs ideal
#
# The schedules above assumed equal stages. Real stages are not equal. Time three things
# on this machine, in turns so that all three see the same load: the unsplit model's
# forward and backward pass on the whole batch, the pipelined pass (GPipe, $m=4$), and the
# same pipelined pass with `record=True`, which times every task. Other programs on a
# shared machine change the speed from second to second, so keep the fastest of several
# runs (the least disturbed one), and take the per-stage times from the fastest recorded
# pass.

# %%
REPEATS = config.pick(smoke=2, full=10)
recorded = []
step_ms = parallel.time_interleaved({
    "unsplit": lambda: parallel.reference_gradients(model, x_batch, y_batch),
    "pipelined": lambda: pipe.compute_gradients(x_batch, y_batch, M, "gpipe"),
    "recorded": lambda: recorded.append(
        pipe.compute_gradients(x_batch, y_batch, M, "gpipe", record=True)),
}, repeats=REPEATS, stat="min")
best = min(recorded[1:], key=lambda r: r.timeline.makespan)  # [1:]: drop the warm-up pass
stage_times = parallel.stage_times_from(pipe, [best])
display(stage_times)

# %% [markdown]
# Feed the per-stage times into the simulator: this is what 4 independent devices would do
# with this model's stages. Compare with what this machine did.

# %%
fwd_ms, bwd_ms = stage_times["forward ms"].to_numpy(), stage_times["backward ms"].to_numpy()
sims = {kind: parallel.pipeline_schedule(N_STAGES, M, kind, fwd_ms, bwd_ms) for kind in parallel.SCHEDULES}
for tl in sims.values():
    tl.unit = "ms"
rec_wall, rec_busy = best.timeline.makespan, sum(best.timeline.busy())
work_ms = M * float(fwd_ms.sum() + bwd_ms.sum())  # the same tasks, one after another

summary = pd.DataFrame([
    {"what": "unsplit model, whole batch, one device (measured)", "ms": step_ms["unsplit"]},
    {"what": f"pipelined pass, {N_STAGES} logical devices, m={M} (measured)", "ms": step_ms["pipelined"]},
    {"what": "fastest recorded pipelined pass (measured)", "ms": rec_wall},
    {"what": "sum of its F and B task times (measured per task)", "ms": rec_busy},
    {"what": f"GPipe makespan on {N_STAGES} independent devices (simulated)", "ms": sims["gpipe"].makespan},
    {"what": f"1F1B makespan on {N_STAGES} independent devices (simulated)", "ms": sims["1f1b"].makespan},
])
display(summary.round(1))
print(f"fastest recorded pass: wall time / sum of its task times = {rec_wall / rec_busy:.2f}")
print(f"pipelined pass / unsplit pass: {step_ms['pipelined'] / step_ms['unsplit']:.2f}")
print(f"simulated speed-up of 4 devices over running the same tasks one by one: "
      f"{work_ms / sims['gpipe'].makespan:.2f}x (GPipe bubble {sims['gpipe'].bubble_fraction:.0%}; "
      f"equal stages would give {parallel.ideal_bubble_fraction(N_STAGES, M):.0%})")
slowest = int(np.argmax(fwd_ms + bwd_ms))
print(f"slowest stage: {slowest} ({fwd_ms[slowest] + bwd_ms[slowest]:.2f} ms per micro-batch, "
      f"{(fwd_ms[slowest] + bwd_ms[slowest]) / (fwd_ms + bwd_ms).mean():.2f}x the mean stage)")

# %%
fig, axes = plt.subplots(3, 1, figsize=(12, 7))
measured_tl = best.timeline
parallel.plot_gantt(measured_tl, ax=axes[0], title=f"measured here: GPipe, m={M}")
parallel.plot_gantt(sims["gpipe"], ax=axes[1], title=f"simulated with measured stage times: GPipe, m={M}")
parallel.plot_gantt(sims["1f1b"], ax=axes[2], title=f"simulated with measured stage times: 1F1B, m={M}")
for ax in axes:
    ax.set_xlim(0, max(measured_tl.makespan, sims["gpipe"].makespan))
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the three charts from top to bottom.
#
# **What this machine shows.** The measured chart (top) has exactly one task running at
# any time, across all four "devices", and the recorded pass takes about as long as the
# sum of its task times (ratio printed above). Its bubble is therefore $1 - 1/p$ = 75%
# whatever $m$ is. That is expected here, for two reasons. The four
# logical CPUs are one physical CPU with 2 cores under four names: every op of every stage
# runs on the same cores, so there is nothing to overlap with. And the runner issues the
# tasks one after another from one Python thread, and on the CPU each eager op has
# finished when its call returns. The pipelined pass is also slower than the unsplit model
# (ratio printed above): each micro-batch task is a smaller, less efficient piece of work,
# and every task adds Python and copy overhead.
#
# What the logical devices *do* show is everything except speed: where variables and
# activations live, which tensors cross which boundary and how many bytes, the order of the
# tasks, how many micro-batches each stage stashes, and that the results equal the unsplit
# model's.
#
# **What changes on real GPUs.** On $p$ GPUs each stage's kernels run on its own GPU. Eager
# TensorFlow hands GPU kernels to the GPU and returns before they finish (that is why
# `record=True` synchronises the GPU after every task), so while the Python thread issues
# `F(1, 0)` for GPU 1, GPU 0 can still be busy with `F(0, 1)`. The middle and bottom charts
# show what perfect overlap would give with this model's measured stage times, and they
# show the other cost: the slowest stage (printed above) sets the pace and the others wait
# for it, so the bubble is larger than the equal-stage formula. With unequal stages the
# two schedules also no longer take the same time (compare their makespans in the table). The simulation leaves out
# two costs: activations and gradients crossing PCIe or NVLink (`comm_time` in
# `parallel.simulate`; the bytes per step are printed in section 2) and per-task launch
# overhead. How close real GPUs come to the simulated chart is for a GPU run to measure:
# this notebook's code runs unchanged there (with fewer than 4 GPUs the stages share
# cards), but we have not measured it yet (see the run-time table). Because `record=True`
# serialises the GPUs, use it to measure stage times, not to time whole steps.

# %% [markdown]
# ## Summary
#
# - `tf.device` decides where variables are created and where ops run. Building each stage
#   under its device placed every variable there, and each stage output was computed there;
#   we printed both from the objects themselves.
# - Naive model parallelism fits a bigger model, but only one device works at a time: the
#   bubble is $(p-1)/p$.
# - GPipe splits the batch into $m$ micro-batches, accumulates gradients and applies them
#   once. Its loss, gradients and updated weights matched the unsplit model within the
#   printed tolerances. In training it was identical, step for step, to the unsplit model
#   fed the same micro-batches; against whole-batch training it drifts apart over tens of
#   steps, because micro-batching changes the order of float32 sums, not because of the
#   split.
# - GPipe and 1F1B have the same bubble, $(p-1)/(m+p-1)$ with equal stages, but GPipe stashes
#   $m$ micro-batches per stage and 1F1B at most $p$.
# - Unequal stages make the bubble bigger. On logical CPUs that share 2 cores the pipeline
#   is not faster; the simulation with measured stage times shows what separate devices
#   would gain.

# %%
print(f"This notebook ran in {time.perf_counter() - T_START:.0f} s ({config.get_mode()} mode, "
      f"{devices.device_kind()}).")

# %% [markdown]
# ## Exercises
#
# **1. More micro-batches, less memory.** Compute the gradients with 1F1B and $m = 16$
# (micro-batches of 8 images). Check that they still equal the unsplit model's, and print
# the peak number of micro-batches each stage held.

# %% jupyter={"source_hidden": true}
# Solution
pipe.copy_weights_from(model)  # the pipeline was trained above; start from the model again
res16 = pipe.compute_gradients(x_batch, y_batch, num_micro_batches=16, schedule="1f1b")
_, grads_now = parallel.reference_gradients(model, x_batch, y_batch)
print("gradients equal within 1e-6:", parallel.max_abs_diff(grads_now, res16.flat_gradients) <= 1e-6)
print("peak in flight per stage:", res16.peak_in_flight, "(GPipe would hold 16 on every stage)")

# %% [markdown]
# **2. Balance the stages.** Cut the model by parameter count instead of FLOPs
# (`balance="params"`). Simulate GPipe with $m = 4$ for both splits, first with task
# times proportional to each stage's FLOPs (backward = 2x forward, a common rule of thumb),
# then with measured stage times. Which split has the smaller makespan, and why?

# %% jupyter={"source_hidden": true}
# Solution
pipe_params = parallel.Pipeline.from_sequential(model, N_STAGES, balance="params", allow_reuse=share)
print(pipe_params.stage_table()[["stage", "layers", "params"]].to_string(index=False))
flops = models.layer_table(model).set_index("layer")["FLOPs/image"]
for name, pl in (("FLOPs", pipe), ("params", pipe_params)):
    stage_flops = np.array([sum(flops[layer.name] for layer in st.layers) for st in pl.stages], float)
    units = stage_flops / stage_flops.sum()  # share of the model's forward FLOPs per stage
    model_tl = parallel.pipeline_schedule(N_STAGES, M, "gpipe", units, 2 * units)
    t = parallel.measure_stage_times(pl, x_batch, y_batch, M, repeats=REPEATS)
    sim_tl = parallel.pipeline_schedule(N_STAGES, M, "gpipe", t["forward ms"], t["backward ms"])
    print(f"split by {name:<6}: stage FLOP shares {np.round(units, 2).tolist()}; makespan "
          f"{model_tl.makespan:.2f} (FLOP model, 1 = forward of the whole model), "
          f"{sim_tl.makespan:.1f} ms (measured stage times)")
print("Time follows FLOPs, not parameters: dense1 holds most parameters but little work, so the "
      "params split packs conv1 and conv2 (most of the work) into one stage, the bottleneck.")

# %% [markdown]
# **3. Communication.** Suppose each stage boundary costs a fixed delay per transfer, say
# 20% of the mean task time. Simulate GPipe for $m \in \{1, 4, 16\}$ with and without that
# `comm_time`. How do the makespan and the bubble change?

# %% jupyter={"source_hidden": true}
# Solution
comm = 0.2 * float(np.mean(np.r_[fwd_ms, bwd_ms]))
for m in (1, 4, 16):
    a = parallel.pipeline_schedule(N_STAGES, m, "gpipe", fwd_ms, bwd_ms)
    b = parallel.pipeline_schedule(N_STAGES, m, "gpipe", fwd_ms, bwd_ms, comm_time=comm)
    print(f"m={m:>2}: makespan {a.makespan:7.1f} -> {b.makespan:7.1f} ms, "
          f"bubble {a.bubble_fraction:.0%} -> {b.bubble_fraction:.0%}")
print("Transfers lengthen the fill and drain of the pipeline (2(p-1) crossings on the critical "
      "path), so their share shrinks as m grows.")

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
# - C. Kim et al., *torchgpipe: On-the-fly Pipeline Parallelism for Training Giant Models*,
#   2020. [arXiv:2004.09910](https://arxiv.org/abs/2004.09910)
# - TensorFlow guides: [Use a GPU (manual device placement, logical
#   devices)](https://www.tensorflow.org/guide/gpu) and
#   [`tf.GradientTape`](https://www.tensorflow.org/api_docs/python/tf/GradientTape)
#   (`output_gradients`, used by each stage's backward).
