# %% [markdown]
# # 09 · Multi-worker training on real processes
#
# So far every replica lived in one Python process. Real clusters run one TensorFlow
# *process* per machine (or per GPU), and the processes talk over the network. In this
# notebook you start such a cluster on your own machine: several worker processes, each
# with its own `TF_CONFIG`, training the seed CNN together with
# `tf.distribute.MultiWorkerMirroredStrategy`. You make it work on Keras 3 (where the
# textbook `model.fit` recipe breaks), see which examples each worker trains on, save the
# model once, kill a worker in the middle of training and resume without losing or
# repeating an epoch, and finally write the configuration for real clusters: plain hosts,
# Slurm and Kubernetes. Along the way you keep the cluster off the network, because
# TensorFlow's distributed runtime trusts anyone who can reach it.
#
# **What you will learn**
#
# - what `TF_CONFIG`, the *chief* and a *worker* are, and how a collective all-reduce
#   crosses process boundaries;
# - how to train with `MultiWorkerMirroredStrategy` on Keras 3 with a custom training loop,
#   why Keras 3 `model.fit` fails there (you will see the exact error), and how `tf_keras`
#   `fit` still works;
# - how `tf.data` auto-sharding splits the data between workers, shown by the example
#   indices each worker logged;
# - why only the chief saves, and how to reload and evaluate its model;
# - how to survive a crashed worker: checkpoint every epoch, restart, resume;
# - how to run the same script on several hosts, under Slurm and on Kubernetes, and what
#   changes on GPUs;
# - why the local cluster runs inside a private network namespace, and how to protect a real
#   cluster.
#
# **Run time**
#
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`) | about 4 CPU-minutes of work; 15 minutes wall on a busy machine | not measured yet |
# | smoke (`SERIES_MODE=smoke`) | about 1.4 CPU-minutes of work; 4 minutes wall on a busy machine | not measured yet |
#
# The committed outputs come from a full run on a 2-core machine that other jobs were
# using heavily at the same time, so the wall times above and the images per second
# printed below are pessimistic, and vary from epoch to epoch. On a quiet machine expect
# a fraction of those wall times. Most of a smoke run goes into starting worker
# processes: each one imports TensorFlow.

# %% [markdown]
# ## Setup
#
# The notebook process itself never joins the cluster: it only starts worker processes,
# reads their logs and results, and evaluates the saved model. Each worker is a fresh Python
# process that runs `python -m utils.worker_train`, the training script that ships with the
# series. The workers do not inherit this notebook's TensorFlow state: the logical CPUs
# that `setup_devices()` creates below exist only in this process, and a worker sees one
# CPU device (or its own GPU).
#
# The notebook loads CIFAR-10 once here, so that a download (if one is needed) happens
# before the workers start: they run without network access and read the same local copy.

# %%
from utils import cluster, config, data, devices
from utils import worker_train as wt

import json
import os
import tempfile
import textwrap
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf

print(devices.setup_devices().to_string(index=False))
config.seed_everything()
print("mode:", config.get_mode())

# %% [markdown]
# The sizes of the training runs. Full mode trains on part of CIFAR-10 for a few epochs,
# enough for curves that mean something while the whole notebook stays within minutes;
# smoke mode runs a handful of steps. The notebook loads exactly the images the workers
# will load.

# %%
RUN = config.pick(
    smoke=dict(n_train=512, n_test=256, epochs=2, global_batch=64, width=0.5, kill_epoch=2, step_delay=0.3, log_every=1),
    full=dict(n_train=20_000, n_test=10_000, epochs=4, global_batch=128, width=1.0, kill_epoch=3, step_delay=0.0, log_every=20),
)
WORKERS = 2
WORK = Path(tempfile.mkdtemp(prefix="nb09_"))  # logs, checkpoints and models of every run


def worker_args(out: str, mode: str = "ctl", **overrides) -> list[str]:
    """Command-line arguments of utils.worker_train for one run of this notebook."""
    opts = {**RUN, **overrides}
    return [
        "--out-dir", str(WORK / out), "--mode", mode, "--epochs", str(opts["epochs"]),
        "--global-batch", str(opts["global_batch"]), "--n-train", str(opts["n_train"]),
        "--n-test", str(opts["n_test"]), "--width", str(opts["width"]), "--log-every", str(opts["log_every"]),
        "--step-delay", str(opts["step_delay"]),
    ]  # fmt: skip


print({k: v for k, v in RUN.items() if k not in ("step_delay", "log_every")})
cifar = data.load_cifar10(allow_synthetic=config.is_smoke(), n_train=RUN["n_train"], n_test=RUN["n_test"])
print(cifar.describe())

# %% [markdown]
# ## 1. Cluster, chief, worker and `TF_CONFIG`
#
# A multi-worker job is a set of identical processes. Each must know two things: the
# addresses of **all** processes (the *cluster*), and which one **it** is (its *task*).
# TensorFlow reads both from the environment variable `TF_CONFIG`, a JSON string:
#
# - `cluster["worker"]` lists `host:port` of every worker, in the same order everywhere;
# - `task` says `{"type": "worker", "index": i}`: this process is worker `i`.
#
# Every worker trains. One of them, the **chief** (worker 0 unless the cluster has a
# separate `"chief"` task), also does the bookkeeping that must happen once: writing
# checkpoints, the training history and the final model.
#
# When a worker creates `MultiWorkerMirroredStrategy`, it starts a gRPC server on its own
# port and connects to the others. Each worker holds a full copy of the model (one replica
# per worker here; one per GPU on GPU machines). Every step, each worker computes gradients
# on *its* part of the global batch, then a **collective all-reduce** sums the gradients of
# all workers: on CPUs a *ring*, in which each worker sends a chunk to its neighbour over
# gRPC, adds what it receives and passes it on, until everyone holds the sum; on GPUs
# NCCL does the same over NVLink or InfiniBand. Every worker then applies the same summed
# gradient to its copy, so the copies stay identical without any parameter server.
#
# `utils.cluster.make_tf_config` builds a `TF_CONFIG`, and `validate_tf_config` checks one
# before TensorFlow sees it: TensorFlow itself often reacts to a wrong `TF_CONFIG` by waiting
# forever for a worker that does not exist.

# %%
# NBVAL_CHECK_OUTPUT
hosts = ["127.0.0.1:20000", "127.0.0.1:20001"]
for i in range(len(hosts)):
    cfg = cluster.make_tf_config(hosts, i)
    print(f"worker {i} (chief: {cluster.is_chief(cfg)}): TF_CONFIG={json.dumps(cfg)}")

bad = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 2}}
try:
    cluster.validate_tf_config(bad)
except cluster.BadTFConfigError as err:
    print("\nrejected:", err)

# %% [markdown]
# ## 2. Security first: the local cluster gets a private network
#
# TensorFlow's gRPC server listens on **every** network interface, even when `TF_CONFIG`
# says `127.0.0.1`, and it does no authentication, authorisation or encryption: it is
# built for trusted, private networks (see TensorFlow's security policy). Anyone who can
# reach a worker's port can send it TensorFlow operations to run, and those include
# reading and writing files. On a laptop on café or workshop Wi-Fi, a naive local cluster
# therefore opens your machine to the room for as long as it runs.
#
# So `utils.cluster.LocalCluster` starts the whole cluster inside a private **network
# namespace** (Linux): a separate network stack with only its own loopback interface. It
# runs `unshare -n` (as root) or `unshare -rn` (as an ordinary user, through a user
# namespace), brings the namespace's loopback up (`ip link set lo up`) and starts every
# worker in there. The workers reach each other over that private `127.0.0.1`; nothing
# outside the namespace, not even another program on your own machine, can connect.
#
# Where no namespace can be made (macOS, Windows, `unshare` missing, unprivileged user
# namespaces disabled as on recent Ubuntu, locked-down containers), the launcher stops with
# an explanation. It runs exposed only if you set `SERIES_ALLOW_EXPOSED_CLUSTER=1` before
# starting JupyterLab, and then prints a warning in the cell's output. Do that only on a
# network you trust.

# %%
status = cluster.isolation_status()
print(status.describe())

# %% [markdown]
# ## 3. Train with a custom training loop (Keras 3)
#
# Each worker runs `utils/worker_train.py` in its default mode, `ctl`. The core is a
# `strategy.run` step, essentially:
#
# ```python
# strategy = tf.distribute.MultiWorkerMirroredStrategy()   # reads TF_CONFIG, starts gRPC
# with strategy.scope():
#     model = build_seed_cnn(); optimizer = keras.optimizers.Adam(1e-3)
#
# @tf.function
# def train_step(batch):
#     def step_fn(x, y, idx):
#         with tf.GradientTape() as tape:
#             loss = tf.nn.compute_average_loss(loss_fn(y, model(x, training=True)),
#                                               global_batch_size=GLOBAL_BATCH)
#         grads = tape.gradient(loss, model.trainable_variables)
#         optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduce here
#         return loss
#     return strategy.reduce("SUM", strategy.run(step_fn, args=batch), axis=None)
# ```
#
# `compute_average_loss` divides by the **global** batch, so that summing the workers'
# gradients gives the gradient of the mean loss over the whole global batch.
#
# Start the cluster. `LocalCluster` picks free ports inside the namespace, gives each
# worker its `TF_CONFIG`, writes each worker's output to its own log, and returns from
# `start()` when every worker listens. Used in a `with` block, it ends every process when
# the block ends, whether the cell finishes, fails, is interrupted or times out. While the
# cluster runs, compare the listening sockets seen from inside the namespace (through a
# worker's `/proc/<pid>/net/tcp`) with those in this notebook's own network namespace.

# %%
with cluster.LocalCluster(WORKERS, worker_args("ctl", step_delay=0.0), workdir=WORK / "logs_ctl", timeout=900) as c:
    inside = c.namespace_sockets()
    exposed = c.host_exposed_ports()
    ctl = c.wait()
print("inside the cluster's namespace:", ", ".join(sorted(str(s) for s in inside)))
print("in this notebook's namespace:  ", ", ".join(str(s) for s in exposed) or "nothing")
print(f"run took {ctl.duration_s:.0f} s")

# %%
# NBVAL_CHECK_OUTPUT
print("isolated in a private network namespace:", ctl.isolated)
print("cluster ports listening inside the namespace:", len(inside), "of", WORKERS,
      "(all interfaces of that namespace:", all(s.all_interfaces for s in inside), ")")
print("cluster ports listening in this notebook's namespace:", len(exposed))
print(pd.DataFrame(ctl.table()).drop(columns="port").to_string(index=False))

# %% [markdown]
# Inside the namespace TensorFlow listens on all interfaces, as it always does (`[::]` or
# `0.0.0.0`), but that namespace has nothing except its own loopback; outside it, the
# ports do not exist. Here are the workers' logs (TensorFlow's C++ start-up lines are
# hidden; `show_logs(noise=True)` shows everything). Note the local devices: one CPU per
# worker, not the logical CPUs of this notebook.

# %%
ctl.show_logs(tail=None)

# %% [markdown]
# The chief wrote one line per epoch to `history.jsonl`. The loss and accuracy are those
# of the whole global batch (summed over workers with `strategy.reduce`); the test accuracy
# is measured on the test images, also split between the workers.

# %%
hist = pd.DataFrame(wt.read_history(WORK / "ctl"))
print(hist[["epoch", "loss", "accuracy", "test_accuracy", "images_per_s"]].round(4).to_string(index=False))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(hist["epoch"], hist["loss"], "o-")
ax1.set(xlabel="epoch", ylabel="training loss", title="Loss, 2 workers")
ax2.plot(hist["epoch"], hist["accuracy"], "o-", label="train")
ax2.plot(hist["epoch"], hist["test_accuracy"], "s--", label="test")
ax2.set(xlabel="epoch", ylabel="accuracy", title=f"Accuracy on {cifar.label}")
ax2.legend()
for ax in (ax1, ax2):
    ax.set_xticks(hist["epoch"])
plt.tight_layout()
plt.show()

# %% [markdown]
# The two workers share the same CPU cores of this machine (the device table at the top
# shows how many), so this is not faster than one process on those cores: it shows the
# *mechanics* of a multi-worker job, and the images per second above measure this
# laptop-sized setting only. On real machines each worker brings its own cores or GPUs,
# and the all-reduce crosses a real network.
#
# ## 4. `model.fit`: Keras 3 fails, `tf_keras` works
#
# The usual tutorial recipe is `model.fit` inside `strategy.scope()`. With Keras 3 on
# TensorFlow 2.21 it fails under `MultiWorkerMirroredStrategy`. The strategy would have to
# run in this notebook's process to show that, and a strategy here would clash with the
# logical devices this notebook already set up, so the failing call runs inside the
# workers (mode `fit-keras3`). The launcher raises `WorkerFailed`; catch it and read the
# error the chief reported:

# %%
try:
    cluster.run_cluster(
        WORKERS, worker_args("fit_keras3", mode="fit-keras3", epochs=1), workdir=WORK / "logs_keras3",
        timeout=600, failure_grace=30, quiet=True,
    )  # fmt: skip
except cluster.WorkerFailed as err:
    failed = err.result
print("exit statuses:", failed.returncodes)

# %%
# NBVAL_CHECK_OUTPUT
keras3_error = cluster.exception_summary(failed.log(0))
print("every worker failed:", not any(rc == 0 for rc in failed.returncodes))
print(textwrap.fill(keras3_error, 100))

# %% [markdown]
# Keras 3's `fit` builds its own training function around `strategy.run`, and under the
# multi-worker strategy the distributed dataset hands it a `PerReplica` value, a container
# of per-replica tensors, where Keras expects a plain tensor. It cannot convert one, so
# training stops before the first step (keras-team/keras#20585). Two ways out:
#
# - a **custom training loop**, as in section 3: you call `strategy.run` yourself;
# - **`tf_keras`** (Keras 2, the `tf-keras` package), whose `fit` still supports
#   `MultiWorkerMirroredStrategy`. Set `TF_USE_LEGACY_KERAS=1` **before TensorFlow is
#   imported**, so that `tf.keras` *is* `tf_keras`; setting it later has no effect. The worker
#   does exactly that in mode `fit-tf-keras`, and builds the same seed CNN with `tf_keras`
#   layers. Its `fit` also takes the `BackupAndRestore` callback for fault tolerance.

# %%
legacy = cluster.run_cluster(
    WORKERS, worker_args("fit_tf_keras", mode="fit-tf-keras", epochs=1), workdir=WORK / "logs_tf_keras",
    timeout=900, quiet=True,
)  # fmt: skip
legacy.show_logs(grep=r"^\[w", tail=None)
print(pd.DataFrame(wt.read_history(WORK / "fit_tf_keras")).round(4).to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
print("tf_keras fit finished on every worker:", legacy.ok)
print("each worker ran with TF_USE_LEGACY_KERAS=1:",
      all("TF_USE_LEGACY_KERAS=1" in legacy.log(i) for i in range(WORKERS)))
print("model saved by the chief only:", sorted(p.name for p in (WORK / "fit_tf_keras").glob("*.keras")))

# %% [markdown]
# ## 5. Who saw which examples: auto-sharding
#
# Every worker builds the *same* `tf.data` pipeline: all training images, shuffled with a
# seed that depends only on the epoch, batched to the **global** batch. When
# `strategy.experimental_distribute_dataset` distributes it, TensorFlow rewrites the
# pipeline on each worker according to the dataset's *auto-shard policy*:
#
# | policy | what each worker reads | use it for |
# |---|---|---|
# | `FILE` | its own subset of the input **files** | many files (TFRecord shards), at least as many as workers |
# | `DATA` | the whole pipeline, then keeps only its share of the elements | in-memory data, few files |
# | `AUTO` (default) | `FILE` if the source is files, else `DATA` | |
# | `OFF` | everything | each worker must see all data (rarely what you want) |
#
# The data here is an in-memory array, so the worker sets `DATA` explicitly. Each global
# batch is then split: every worker takes a different slice of it, of size
# global batch ÷ workers. The workers saved the indices of every example they trained on,
# per epoch; compare them.

# %%
seen = {i: np.load(WORK / "ctl" / "seen" / f"worker{i}_epoch1.npy") for i in range(WORKERS)}
gb, per_worker = RUN["global_batch"], RUN["global_batch"] // WORKERS
steps = RUN["n_train"] // gb
order = wt.epoch_order(RUN["n_train"], seed=42, epoch=1)  # the shuffle every worker used in epoch 1
for i, idx in seen.items():
    print(f"worker {i}: {len(idx):,} examples in epoch 1, the first 8: {idx[:8].tolist()}")
print("first global batch, first 4 slots of each half:", order[:4].tolist(), order[per_worker:per_worker + 4].tolist())

# %%
# NBVAL_CHECK_OUTPUT
sets = [set(v.tolist()) for v in seen.values()]
print("examples per worker per epoch == steps x global batch / workers:",
      all(len(v) == steps * per_worker for v in seen.values()))
print("examples seen by both workers:", len(sets[0] & sets[1]))
print("together, every example of the epoch's shuffled batches exactly once:",
      sorted(np.concatenate(list(seen.values())).tolist()) == sorted(order[: steps * gb].tolist()))
print("worker 0 takes the first half of every global batch:",
      all(np.array_equal(seen[0][s * per_worker:(s + 1) * per_worker], order[s * gb:s * gb + per_worker]) for s in range(steps)))

# %% [markdown]
# No example was seen twice, none was skipped (apart from the last incomplete batch, which
# `drop_remainder=True` drops), and worker 0 always took the first half of each global
# batch. Exercise 1 switches sharding off to see what goes wrong then.
#
# ## 6. Save once, on the chief
#
# Every worker holds an identical copy of the model, so saving it once is enough, and
# several processes writing the same file would corrupt it. The chief saves; the other
# workers skip saving the final model. Checkpoints are different: in TensorFlow's
# multi-worker recipe *every* worker writes its checkpoint (saving can involve collective
# operations that need all workers), but only the chief's goes to the real folder; the
# others write to a temporary folder and delete it. The worker logs said so:

# %%
ctl.show_logs(grep=r"saved|saving|only the chief|temp dir", tail=3)
print("\nfiles in the run folder:", sorted(p.name for p in (WORK / "ctl").iterdir()))
print("checkpoints:", sorted(p.name for p in (WORK / "ctl" / "ckpt").iterdir()))

# %% [markdown]
# Reload the chief's model here, in the notebook, and evaluate it on the same test images
# the workers evaluated on (the first whole global batches of the test set). Its accuracy
# should match the last test accuracy the chief recorded.

# %%
model = keras.models.load_model(WORK / "ctl" / "model.keras")
n_eval = (RUN["n_test"] // gb) * gb
probs = model.predict(cifar.x_test[:n_eval].astype("float32") / 255.0, batch_size=256, verbose=0)
reloaded_acc = float(np.mean(probs.argmax(-1) == cifar.y_test[:n_eval]))
print(f"reloaded model: test accuracy {reloaded_acc:.4f} on {n_eval:,} images; "
      f"chief's last epoch: {hist['test_accuracy'].iloc[-1]:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
print("model.keras files written:", len(list((WORK / "ctl").glob("*.keras"))))
print("reloaded layers:", [layer.name for layer in model.layers])
print("reloaded accuracy matches the chief's record within 0.1 points:",
      abs(reloaded_acc - hist["test_accuracy"].iloc[-1]) <= 0.001)

# %% [markdown]
# ## 7. Fault tolerance: kill a worker, restart, resume
#
# `MultiWorkerMirroredStrategy` is synchronous: every step needs every worker. If one
# dies, the others cannot finish their all-reduce, and TensorFlow stops them with an error;
# the job is over. The remedy is not to keep running but to **restart and resume**:
#
# 1. at the end of every epoch, save a checkpoint with the model, the optimizer state and
#    the number of finished epochs (`tf.train.CheckpointManager`);
# 2. on start, every worker restores the newest checkpoint and continues with the next
#    epoch;
# 3. the data order of an epoch depends only on the seed and the epoch number, so the
#    resumed epochs see exactly the batches an uninterrupted run would see;
# 4. the chief writes the epoch's history line before the checkpoint, and on restart drops
#    lines of epochs the checkpoint does not hold: an epoch killed half-way is redone once
#    and recorded once.
#
# Run the same job as in section 3 again in a fresh folder, and kill worker 1 with
# `SIGKILL` (no clean-up, like a crashed machine) part-way through epoch `kill_epoch`:

# %%
kill_epoch = RUN["kill_epoch"]
with cluster.LocalCluster(WORKERS, worker_args("ft"), workdir=WORK / "logs_ft_1", timeout=900, failure_grace=60) as c:
    c.wait_for_log(0, rf"epoch {kill_epoch}/{RUN['epochs']} step {RUN['log_every']}/", timeout=800)
    c.kill_worker(1)
    crashed = c.wait(check=False)
print(pd.DataFrame(crashed.table()).drop(columns="port").to_string(index=False))
print("\nworker 0's error:", cluster.exception_summary(crashed.log(0), max_chars=300))
crashed.show_logs(grep=r"^\[w", tail=4)

# %% [markdown]
# Worker 1 died from the signal. Nobody killed worker 0: its next all-reduce failed because
# the peer was gone (TensorFlow reports a reset connection, or a peer that stopped sending
# heartbeats), the error above ended its training loop, and the worker exited with status 1.
# (It leaves with `os._exit` right after printing the error: TensorFlow's normal shutdown
# can otherwise wait a long time for the lost peer, and the launcher would have to end it
# after `failure_grace` seconds.) This is the whole job stopping, as TensorFlow intends.
# The chief's history holds only the epochs whose checkpoint was written. Now restart the
# cluster with the same command:

# %%
resumed = cluster.run_cluster(WORKERS, worker_args("ft"), workdir=WORK / "logs_ft_2", timeout=900, quiet=True)
resumed.show_logs(grep=r"^\[w0", tail=None)
ft = pd.DataFrame(wt.read_history(WORK / "ft"))
print(ft[["epoch", "attempt", "loss", "accuracy", "test_accuracy"]].round(4).to_string(index=False))

# %%
ref_w = keras.models.load_model(WORK / "ctl" / "model.keras").get_weights()
ft_w = keras.models.load_model(WORK / "ft" / "model.keras").get_weights()
max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref_w, ft_w, strict=True))
print(f"max |weight difference| between the resumed and the uninterrupted run: {max_diff:.3g}")

# %%
# NBVAL_CHECK_OUTPUT
print("every epoch recorded exactly once:", ft["epoch"].tolist() == list(range(1, RUN["epochs"] + 1)))
print("epochs before the kill come from attempt 1, the rest from attempt 2:",
      ft["attempt"].tolist() == [1] * (kill_epoch - 1) + [2] * (RUN["epochs"] - kill_epoch + 1))
print("both workers resumed right after the last checkpoint:",
      all(f"{kill_epoch - 1} epoch(s) done, resuming with epoch {kill_epoch}" in resumed.log(i) for i in range(WORKERS)))
print("final weights equal the uninterrupted run's within 1e-6:", max_diff <= 1e-6)
print("per-epoch losses equal the uninterrupted run's within 1e-6:",
      np.allclose(ft["loss"], hist["loss"], rtol=0, atol=1e-6))

# %% [markdown]
# The resumed run is the uninterrupted run: same losses epoch by epoch, and final weights
# that agree to the printed difference (the workers enable TensorFlow's op determinism, so
# the arithmetic is repeatable). The curves show it: attempt 2 starts from the state the
# checkpoint saved after the last finished epoch of attempt 1, redoes the epoch that was
# interrupted, and both lie on the uninterrupted run's line.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
before, after = ft[ft["attempt"] == 1], ft[ft["epoch"] >= kill_epoch - 1]  # attempt 2 starts from the checkpoint
for ax, col, name in zip(axes, ["loss", "test_accuracy"], ["training loss", "test accuracy"], strict=True):
    ax.plot(hist["epoch"], hist[col], "-", color="0.8", lw=7, label="uninterrupted run")
    ax.plot(before["epoch"], before[col], "o-", label="attempt 1 (killed)")
    ax.plot(after["epoch"], after[col], "s--", mfc="none", ms=9, label="attempt 2 (resumed from the checkpoint)")
    ax.axvspan(kill_epoch - 1, kill_epoch, color="red", alpha=0.08, label=f"epoch {kill_epoch}: worker 1 killed, epoch redone")
    ax.set(xlabel="epoch", ylabel=name, xticks=hist["epoch"])
axes[0].set_title("Kill, restart, resume: loss")
axes[1].set_title("Kill, restart, resume: test accuracy")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What a checkpoint costs: one write per epoch here. On long epochs, checkpoint every N
# steps instead and keep the step counter and the data iterator's position in it
# (`tf.train.Checkpoint` can hold a `tf.data` iterator); `tf_keras`'s `BackupAndRestore`
# callback does this for `fit` with `save_freq`. Keep at most a few checkpoints
# (`max_to_keep`), and put them on storage every worker can read.
#
# ## 8. From one machine to a real cluster
#
# The worker script does not change; only `TF_CONFIG` (or its source) does.
#
# **Plain hosts.** Start one process per machine, each with a `TF_CONFIG` naming every
# host. `tf_config_exports` writes the lines to paste on each host:

# %%
# NBVAL_CHECK_OUTPUT
for host, line in cluster.tf_config_exports(["10.0.0.11", "10.0.0.12", "10.0.0.13"], port=12345).items():
    print(f"# on {host}:\n{line}")
print("python -m utils.worker_train --out-dir /shared/run --epochs 10")

# %% [markdown]
# **Slurm.** `SlurmClusterResolver` builds the cluster from Slurm's variables
# (`SLURM_PROCID`, `SLURM_STEP_NODELIST`, `SLURM_STEP_TASKS_PER_NODE`) instead of
# `TF_CONFIG`; pass it to the strategy:
# `MultiWorkerMirroredStrategy(cluster_resolver=SlurmClusterResolver(port_base=12345))`.
# `slurm_script` writes an `sbatch` file that runs the worker with `--resolver slurm`. Below,
# fake Slurm variables show what the resolver makes of a 2-node step; the resolver only
# computes addresses, so it is safe to run here. (On CPU nodes pass `gpus_per_node` and
# `gpus_per_task` yourself, as here: left alone, the resolver asks `nvidia-smi`, and with
# zero GPUs its arithmetic breaks. `utils.worker_train.slurm_resolver` does this for you.)

# %%
# NBVAL_CHECK_OUTPUT
print(cluster.slurm_script(2, port_base=12345))
fake_slurm = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
              "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
saved_env = {k: os.environ.get(k) for k in fake_slurm}
os.environ.update(fake_slurm)
try:
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=12345, gpus_per_node=1, gpus_per_task=1, auto_set_gpu=False
    )
    print("cluster:", resolver.cluster_spec().as_dict(), "| this task:", resolver.task_type, resolver.task_id)
finally:
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v

# %% [markdown]
# **Kubernetes.** Two common shapes:
#
# - **a Job per worker**: each worker gets a headless Service (a stable DNS name) and a Job
#   whose pod carries that worker's `TF_CONFIG`. `kubernetes_manifest` writes it, with a
#   shared volume claim for checkpoints, so that a pod restarted after a failure resumes;
# - **a `TFJob`** of the Kubeflow Training Operator (`tfjob_manifest`), which creates the
#   pods and services and writes every pod's `TF_CONFIG` itself.
#
# Both come with a **NetworkPolicy** that lets only the job's own pods reach its gRPC port
# and rejects all other traffic to those pods (it needs a network plugin that enforces
# policies, such as Calico or Cilium). Here is a 2-worker manifest:

# %%
# NBVAL_CHECK_OUTPUT
print(cluster.kubernetes_manifest("cifar-mwms", 2, image="registry.example.org/series:1.0",
                                  shared_claim="cifar-mwms-shared"))

# %% [markdown]
# And the `TFJob` version, with its policy (the operator labels its pods with
# `training.kubeflow.org/job-name`):

# %%
print(cluster.tfjob_manifest("cifar-mwms", 2, image="registry.example.org/series:1.0"))

# %% [markdown]
# **On GPUs.** The same script runs unchanged; what differs:
#
# - **NCCL** does the all-reduce between GPUs (`CommunicationImplementation.AUTO` picks it
#   on GPUs; on CPUs it picks the ring over gRPC you used here), over NVLink inside a
#   machine and InfiniBand or Ethernet between machines;
# - **one process per host** with all its GPUs (each process then has several replicas,
#   `num_replicas_in_sync` = workers × GPUs per worker) is the usual layout; **one process
#   per GPU** also works, with each process seeing only its GPU (`CUDA_VISIBLE_DEVICES`).
#   `LocalCluster` does the latter on a multi-GPU machine when there is a GPU for every
#   worker (two NCCL ranks cannot share one GPU); with fewer GPUs it runs the workers on
#   the CPU;
# - scale the global batch with the number of replicas and adjust the learning rate
#   (Goyal et al.); keep the per-replica batch large enough to keep a GPU busy.
#
# **Security on real clusters.** TensorFlow's runtime trusts its network, everywhere.
# Never expose worker ports to the internet or to a shared network: run workers on a
# private network (a VPC subnet, a cluster-internal network), allow the ports only between
# the job's machines (firewall rules, cloud security groups, the NetworkPolicy above), and
# remember that anyone who can reach a port can read and write the files the worker
# process can. On your own machine the series keeps everything local: the local cluster
# runs in its private namespace, JupyterLab (started by `make lab`) listens on 127.0.0.1 with
# a token, and TensorBoard, if you start it, should too:

# %%
# NBVAL_CHECK_OUTPUT
print(" ".join(cluster.tensorboard_command("logs")))

# %% [markdown]
# ## Summary
#
# - A multi-worker job is a set of identical processes; `TF_CONFIG` tells each one the
#   cluster and its own task, and worker 0 (or a separate chief) does the one-time work.
# - `MultiWorkerMirroredStrategy` keeps one model copy per worker in sync by all-reducing
#   gradients every step; on Keras 3, train it with a custom training loop, because Keras 3
#   `model.fit` fails with the `PerReplica` error you saw; `tf_keras` `fit` works when
#   `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is imported.
# - Auto-sharding with the `DATA` policy split every global batch between the workers:
#   no example was trained on twice, none was skipped.
# - Only the chief saves the model; the reloaded model reproduced the chief's accuracy.
# - A killed worker stops the whole job. Checkpointing every epoch with the epoch counter,
#   and an epoch-seeded data order, made the restarted job continue exactly where the last
#   checkpoint left it, with the same result as an uninterrupted run.
# - TensorFlow's distributed runtime has no authentication: the local cluster ran in a
#   private network namespace, and real clusters need private networks, firewalls and
#   NetworkPolicies.
#
# ## Exercises
#
# 1. **No sharding.** Run a short 2-worker job with `--shard-policy OFF` and count how many
#    examples both workers trained on. What does that do to the effective data per epoch?
# 2. **A separate chief.** Write the `TF_CONFIG`s of a cluster with one chief and three
#    workers on four hosts, check them with `validate_tf_config`, and find which task saves.
#    Then break one on purpose (a port out of range) and read the error.
# 3. **Kubernetes for GPUs.** Generate a manifest for 4 workers with one GPU each and check
#    with `yaml.safe_load_all` that every pod requests a GPU and that the NetworkPolicy's
#    selector matches every worker pod.

# %% jupyter={"source_hidden": true}
# Solution 1
off = cluster.run_cluster(
    WORKERS, worker_args("shard_off", epochs=1, n_train=256, n_test=64, step_delay=0.0) + ["--shard-policy", "OFF", "--no-save"],
    workdir=WORK / "logs_off", timeout=600, quiet=True,
)  # fmt: skip
seen_off = [set(np.load(WORK / "shard_off" / "seen" / f"worker{i}_epoch1.npy").tolist()) for i in range(WORKERS)]
steps_off = 256 // RUN["global_batch"]
print("examples per worker:", [len(s) for s in seen_off], "| seen by both:", len(seen_off[0] & seen_off[1]))
print(f"distinct examples trained on: {len(seen_off[0] | seen_off[1])} of the {steps_off * RUN['global_batch']} "
      "that the same steps cover with DATA sharding")

# %% jupyter={"source_hidden": true}
# Solution 2
workers4 = [f"10.0.0.{i}:12345" for i in (21, 22, 23)]
chief = "10.0.0.20:12345"
configs = [cluster.make_tf_config(workers4, 0, task_type="chief", chief=chief)]
configs += [cluster.make_tf_config(workers4, i, chief=chief) for i in range(3)]
for cfg in configs:
    cluster.validate_tf_config(cfg)
    print(cfg["task"], "saves:", cluster.is_chief(cfg))
broken = json.loads(json.dumps(configs[1]))
broken["cluster"]["worker"][2] = "10.0.0.23:99999"
try:
    cluster.validate_tf_config(broken)
except cluster.BadTFConfigError as err:
    print("rejected:", err)

# %% jupyter={"source_hidden": true}
# Solution 3
import yaml

docs = list(yaml.safe_load_all(cluster.kubernetes_manifest("gpu-mwms", 4, gpus_per_worker=1)))
pods = [d["spec"]["template"] for d in docs if d["kind"] == "Job"]
policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
selector = policy["spec"]["podSelector"]["matchLabels"]
print("pods:", len(pods))
print("every pod requests one GPU:",
      all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for p in pods))
print("policy selects every worker pod:", all(selector.items() <= p["metadata"]["labels"].items() for p in pods))

# %% [markdown]
# ## Further reading
#
# - TensorFlow tutorials: [Multi-worker training with Keras](https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras),
#   [Custom training loop with MultiWorkerMirroredStrategy](https://www.tensorflow.org/tutorials/distribute/multi_worker_with_ctl)
#   and [Distributed input](https://www.tensorflow.org/tutorials/distribute/input) (auto-shard policies);
#   the [distributed training guide](https://www.tensorflow.org/guide/distributed_training).
# - keras-team/keras#20585: Keras 3 `model.fit` with `MultiWorkerMirroredStrategy`
#   ("Attempt to convert a value (PerReplica...)").
# - TensorFlow's [security policy](https://github.com/tensorflow/tensorflow/blob/master/SECURITY.md)
#   (the distributed runtime is for trusted networks only) and tensorflow/tensorflow#11689
#   (no authentication in the gRPC runtime).
# - P. Patarasuk and X. Yuan, *Bandwidth optimal all-reduce algorithms for clusters of
#   workstations*, J. Parallel Distrib. Comput. 69(2), 2009: the ring all-reduce.
# - A. Sergeev and M. Del Balso, *Horovod: fast and easy distributed deep learning in
#   TensorFlow*, 2018, [arXiv:1802.05799](https://arxiv.org/abs/1802.05799).
# - P. Goyal et al., *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour*, 2017,
#   [arXiv:1706.02677](https://arxiv.org/abs/1706.02677): scaling the batch and the learning
#   rate with the number of workers.
# - Linux manual pages `unshare(1)` and `network_namespaces(7)`; Kubernetes
#   [Network Policies](https://kubernetes.io/docs/concepts/services-networking/network-policies/);
#   Kubeflow [TFJob](https://www.kubeflow.org/docs/components/trainer/legacy-v1/user-guides/tensorflow/);
#   [`SlurmClusterResolver`](https://www.tensorflow.org/api_docs/python/tf/distribute/cluster_resolver/SlurmClusterResolver).
