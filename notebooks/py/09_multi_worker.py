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
# **Run time** of this notebook, measured (generated from the recorded runs by
# `make docs-tables`, never typed):
#
# <!-- runtime:start -->
# | mode | 2-core CPU | GPU |
# |---|---|---|
# | full (`SERIES_MODE=full`, real CIFAR-10) | 9.6 min | not measured |
# | smoke (`SERIES_MODE=smoke`) | 1.6 min | not measured |
# <!-- runtime:end -->

# %% [markdown]
# ## Setup
#
# The notebook process itself never joins the cluster: it writes the worker program,
# starts worker processes, reads their logs and results, and evaluates the saved model.
# Each worker is a fresh Python process that runs the file you write below. The workers do
# not inherit this notebook's TensorFlow state: the logical CPUs that `setup_devices()`
# creates below exist only in this process, and a worker sees one CPU device (or its own
# GPU).
#
# The notebook loads CIFAR-10 once here, so that a download (if one is needed) happens
# before the workers start: they run without network access and read the same local copy.
# Everything the runs write goes to `runs/09_multi_worker/` (emptied first, so that every
# run of this notebook starts from the same state).

# %%
from utils import cluster, config, data, devices

import json
import os
import shlex
import sys
import textwrap

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

# ruff: noqa: F811  (the %%writefile cells below are files of their own, with their own imports)

print("mode:", config.get_mode())
print(devices.setup_devices().to_string(index=False))
config.seed_everything()
WORK = config.run_dir("09_multi_worker", fresh=True)  # ../runs/09_multi_worker, seen from this notebook

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


def worker_args(out: str, **overrides) -> list[str]:
    """Command-line arguments of the worker program for one run of this notebook."""
    opts = {**RUN, **overrides}
    names = ["epochs", "global_batch", "n_train", "n_test", "width", "log_every", "step_delay"]
    return ["--out-dir", str(WORK / out)] + [f"--{n.replace('_', '-')}={opts[n]}" for n in names]


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
# Here is how a `TF_CONFIG` is built, and a check for the mistakes that TensorFlow itself
# often answers by waiting forever for a worker that does not exist:

# %%
def make_tf_config(workers, index, task_type="worker", chief=None):
    """The TF_CONFIG of one task: every task's host:port, and which task this process is."""
    cluster_ = {"worker": list(workers)} if chief is None else {"chief": [chief], "worker": list(workers)}
    return {"cluster": cluster_, "task": {"type": task_type, "index": index}}


def is_chief(tf_config):
    """The task that saves: the "chief" task if the cluster has one, else worker 0."""
    task = tf_config["task"]
    return task["type"] == "chief" or ("chief" not in tf_config["cluster"] and task["index"] == 0)


def check_tf_config(tf_config):
    """Raise ValueError for a task outside the cluster, a bad port or an address used twice."""
    cluster_, task = tf_config["cluster"], tf_config["task"]
    addresses = [a for hosts in cluster_.values() for a in hosts]
    for address in addresses:
        if not 1 <= int(address.rsplit(":", 1)[1]) <= 65535:
            raise ValueError(f"{address}: the port must be in 1-65535")
    if len(set(addresses)) < len(addresses):
        raise ValueError(f"an address is listed twice in {addresses}: every task needs its own")
    size = len(cluster_.get(task["type"], []))
    if not 0 <= task["index"] < size:
        raise ValueError(f"task {task} is not in the cluster, which has {size} {task['type']!r} task(s)")


# %%
# NBVAL_CHECK_OUTPUT
hosts = ["127.0.0.1:20000", "127.0.0.1:20001"]
for i in range(len(hosts)):
    cfg = make_tf_config(hosts, i)
    check_tf_config(cfg)
    print(f"worker {i} (chief: {is_chief(cfg)}): TF_CONFIG={json.dumps(cfg)}")
try:
    check_tf_config(make_tf_config(hosts, 2))
except ValueError as err:
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
# So the series' launcher, `utils.cluster.LocalCluster`, starts the whole cluster inside a
# private **network namespace** (Linux): a separate network stack with only its own
# loopback interface. It runs `unshare -n` (as root) or `unshare -rn` (as an ordinary user,
# through a user namespace), brings the namespace's loopback up (`ip link set lo up`) and
# starts every worker in there, each with its own `TF_CONFIG`. The workers reach each
# other over that private `127.0.0.1`; nothing outside the namespace, not even another
# program on your own machine, can connect.
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
# ## 3. The worker program
#
# Every worker runs the same Python file. You write it here, in four cells: `%%writefile`
# saves a cell to a file instead of running it (`-a` appends). The program goes through
# the phases its comments name: who am I (`TF_CONFIG`), join the cluster, build the data,
# build the model and its steps, restore the last checkpoint, train epoch by epoch, save
# once. It trains with a **custom training loop** (`strategy.run`), because Keras 3's
# `model.fit` fails under `MultiWorkerMirroredStrategy` (section 4 shows how).
#
# First the command line and the cluster: the worker reads `TF_CONFIG` (or, under Slurm,
# Slurm's variables), and creating the strategy starts its gRPC server and waits for the
# others.

# %%
# %%writefile ../runs/09_multi_worker/worker.py
"""One worker of a multi-worker job:  python worker.py --out-dir DIR [options]

Every worker runs this same file. It reads its place in the cluster from TF_CONFIG, joins
the others through MultiWorkerMirroredStrategy and trains the seed CNN with a custom
training loop. After every epoch it writes a checkpoint; started again with the same
--out-dir, it resumes after the last one.
"""
import argparse
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

import utils  # noqa: F401  (first: keeps TensorFlow's start-up lines out of the log)
import keras
import tensorflow as tf
from utils import config, data
from utils.models import build_seed_cnn

T0, TAG = time.monotonic(), "[worker]"


def log(msg):
    print(f"{TAG} {time.monotonic() - T0:6.1f}s  {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="One worker of a multi-worker job.")
    p.add_argument("--out-dir", required=True, help="folder all workers share: checkpoints, history, model")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the data")
    p.add_argument("--global-batch", type=int, default=128, help="batch size summed over all workers")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--data", choices=("auto", "synthetic"), default="auto")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the seed CNN")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--shard-policy", choices=("DATA", "OFF", "AUTO", "FILE"), default="DATA")
    p.add_argument("--log-every", type=int, default=0, help="log every N steps (0: epochs only)")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step, to slow a demo down")
    p.add_argument("--threads", default=None, help="'INTRA,INTER' TensorFlow thread pools")
    p.add_argument("--resolver", choices=("tf_config", "slurm"), default="tf_config")
    p.add_argument("--port-base", type=int, default=12345, help="gRPC port with --resolver slurm")
    p.add_argument("--no-save", action="store_true", help="do not save the final model")
    return p.parse_args(argv)


# Phase 1: who am I? TF_CONFIG lists every worker (the cluster) and names this one (the task).
def where_am_i(args):
    """(index, number of workers, chief?) from TF_CONFIG, or from Slurm's variables."""
    if args.resolver == "slurm":
        rank = int(os.environ["SLURM_PROCID"])
        return rank, int(os.environ["SLURM_STEP_NUM_TASKS"]), rank == 0
    tf_config = json.loads(os.environ["TF_CONFIG"])
    cluster, task = tf_config["cluster"], tf_config["task"]
    num_workers = len(cluster["worker"]) + len(cluster.get("chief", []))
    # The chief does the one-time work: the "chief" task if there is one, else worker 0.
    chief = task["type"] == "chief" or ("chief" not in cluster and task["index"] == 0)
    return task["index"], num_workers, chief


# Phase 2: join the cluster. Creating the strategy starts this worker's gRPC server.
def join_cluster(args, num_workers):
    intra = max(1, (os.cpu_count() or 1) // num_workers)
    intra, inter = (int(v) for v in args.threads.split(",")) if args.threads else (intra, 2)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    tf.config.experimental.enable_op_determinism()  # a resumed run then equals an uninterrupted one
    keras.utils.set_random_seed(args.seed)
    resolver = None
    if args.resolver == "slurm":  # one task per node; on CPU nodes give each task a notional GPU slot
        gpus = max(1, len(tf.config.list_physical_devices("GPU")))
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=args.port_base, gpus_per_node=gpus, gpus_per_task=gpus, auto_set_gpu=False)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    log(f"strategy ready: {strategy.num_replicas_in_sync} replicas in sync, local devices "
        f"{list(strategy.extended.worker_devices)}, threads intra={intra} inter={inter}")
    return strategy


# %% [markdown]
# The data. Every worker builds the **same** pipeline over the same arrays: the
# shuffle of each epoch depends only on the seed and the epoch number, and the strategy
# hands each worker its share of every global batch (section 5 shows which). The pipeline
# is built once for the whole run: it gathers each batch's rows from the images, which
# enter TensorFlow once, and the test pass gets its own pipeline, also built once.


# %%
# %%writefile -a ../runs/09_multi_worker/worker.py
# Phase 3: the data. Every worker builds the SAME pipeline; the strategy gives each its share.
def load_data(args):
    """The same arrays on every worker: CIFAR-10 (synthetic images only in smoke runs)."""
    if args.data == "synthetic":
        x, y, xt, yt, _ = data.make_synthetic(args.n_train or 2048, args.n_test or 512, seed=0)
        return x, y, xt, yt, "synthetic"
    # download=False: the private network namespace has no internet; the notebook fetched it.
    d = data.load_cifar10(allow_synthetic=config.is_smoke(), download=False,
                          n_train=args.n_train, n_test=args.n_test)
    return d.x_train, d.y_train, d.x_test, d.y_test, d.source


def epoch_order(n, seed, epoch):
    """Epoch `epoch`'s shuffle (1-based): it depends only on seed and epoch, so a resumed
    run replays exactly the batches an uninterrupted run would see."""
    return np.random.default_rng(seed * 1000 + epoch - 1).permutation(n)


def make_dataset(x, y, indices, global_batch, shard_policy):
    """Global batches of (images in [0, 1], labels, example indices), in the order `indices`.

    Built ONCE per run, for all its epochs: the images enter the input graph once and every
    batch gathers its rows. (Rebuilding a dataset of copied images every epoch stalled each
    epoch boundary for longer and longer.)
    """
    images, labels = tf.constant(x), tf.constant(y)
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
    ds = ds.batch(global_batch, drop_remainder=True).map(
        lambda i: (tf.cast(tf.gather(images, i), tf.float32) / 255.0, tf.gather(labels, i), i))
    options = tf.data.Options()
    # DATA: every worker reads the whole pipeline and keeps its own slice of each batch.
    options.experimental_distribute.auto_shard_policy = getattr(
        tf.data.experimental.AutoShardPolicy, shard_policy)
    options.deterministic = True
    return ds.with_options(options).prefetch(2)


# %% [markdown]
# The model and its two steps. `strategy.scope()` makes every variable a mirrored one;
# `strategy.run` runs `replica_step` on this worker's slice of the batch, and
# `apply_gradients` all-reduces the gradients across the workers before it updates.
# `compute_average_loss` divides by the **global** batch, so that summing the workers'
# gradients gives the gradient of the mean loss over the whole global batch. The
# checkpoint holds the model, the optimizer state and the number of finished epochs.


# %%
# %%writefile -a ../runs/09_multi_worker/worker.py
# Phase 4: one replica of the model per worker, and its train and evaluation steps.
def build_model(strategy, args):
    """Model, optimizer and a checkpoint that also counts the finished epochs."""
    with strategy.scope():  # variables created here are mirrored on every worker
        model = build_seed_cnn(width=args.width)
        optimizer = keras.optimizers.Adam(args.lr)
        optimizer.build(model.trainable_variables)
        epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
    return model, optimizer, tf.train.Checkpoint(model=model, optimizer=optimizer, epochs_done=epochs_done)


def make_steps(strategy, model, optimizer, global_batch):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def hits(y, probs):
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1), y), tf.float32))

    def replica_step(x, y, idx):  # runs on each worker, on its slice of the global batch
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            # Divide by the GLOBAL batch: summing the workers' gradients gives the mean's gradient.
            loss = tf.nn.compute_average_loss(loss_fn(y, probs), global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduce happens here
        return loss, hits(y, probs), idx

    @tf.function
    def train_step(batch):
        loss, right, idx = strategy.run(replica_step, args=batch)
        return (strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", right, axis=None),
                strategy.experimental_local_results(idx))

    @tf.function
    def eval_step(batch):
        right = strategy.run(lambda x, y, idx: hits(y, model(x, training=False)), args=batch)
        return strategy.reduce("SUM", right, axis=None)

    return train_step, eval_step


# Phase 5: fault tolerance. Restore the newest checkpoint; save one after every epoch.
def restore(checkpoint, out_dir):
    """Restore the newest checkpoint, if any; return the number of finished epochs."""
    latest = tf.train.latest_checkpoint(out_dir / "ckpt")
    if latest is None:
        log("no checkpoint found: starting from scratch")
        return 0
    checkpoint.restore(latest).assert_existing_objects_matched()
    done = int(checkpoint.epochs_done.numpy())
    log(f"restored checkpoint {Path(latest).name}: {done} epoch(s) done, resuming with epoch {done + 1}")
    return done


def save_checkpoint(checkpoint, out_dir, epoch, chief):
    """Every worker saves (saving can run collective ops), but only the chief's copy stays."""
    checkpoint.epochs_done.assign(epoch)
    folder = out_dir / "ckpt" if chief else Path(tempfile.mkdtemp(prefix="ckpt_"))
    tf.train.CheckpointManager(checkpoint, str(folder), max_to_keep=2).save(checkpoint_number=epoch)
    if not chief:
        shutil.rmtree(folder, ignore_errors=True)


def history(out_dir, keep_epochs=None, row=None):
    """The chief's history.jsonl: drop epochs past `keep_epochs`, append `row`; return the rows."""
    path = out_dir / "history.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if keep_epochs is not None:  # an epoch killed half-way is redone, and recorded once
        rows = [r for r in rows if r["epoch"] <= keep_epochs]
    rows += [row] if row else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# %% [markdown]
# Finally the loop. Each epoch trains for a fixed number of steps, then evaluates on the
# test images; the two are timed apart, so the images per second count training alone.
# The chief writes the epoch's line of `history.jsonl`, then every worker saves the
# checkpoint. `run` ends the process at once after an error: when a peer dies, the
# survivors' normal shutdown can wait a long time for it.


# %%
# %%writefile -a ../runs/09_multi_worker/worker.py
# Phase 6: the training loop. Training time and evaluation time are measured apart.
def train_epoch(train_step, batches, steps, epoch, args):
    """`steps` training steps; return (mean loss, accuracy, example indices seen here, seconds)."""
    t0, loss_sum, right, seen = time.monotonic(), 0.0, 0.0, []
    for step in range(steps):
        loss, hits, idx = train_step(next(batches))
        loss_sum, right = loss_sum + float(loss), right + float(hits)
        seen.append(np.concatenate([t.numpy() for t in idx]))
        time.sleep(args.step_delay)
        if args.log_every and (step + 1) % args.log_every == 0:
            log(f"epoch {epoch}/{args.epochs} step {step + 1}/{steps} loss {loss_sum / (step + 1):.4f}")
    return loss_sum / steps, right / (steps * args.global_batch), np.concatenate(seen), time.monotonic() - t0


def evaluate(eval_step, batches, steps, global_batch):
    """Test accuracy over `steps` global batches; return (accuracy, seconds)."""
    t0 = time.monotonic()
    right = sum(float(eval_step(next(batches))) for _ in range(steps))
    return right / max(1, steps * global_batch), time.monotonic() - t0


def train(args, strategy, arrays, out_dir, index, num_workers, chief):
    x, y, x_test, y_test = arrays
    gb = args.global_batch
    steps = min(args.steps_per_epoch or len(x) // gb, len(x) // gb)
    test_steps = len(x_test) // gb
    model, optimizer, checkpoint = build_model(strategy, args)
    train_step, eval_step = make_steps(strategy, model, optimizer, gb)
    start = restore(checkpoint, out_dir)
    attempt = 0
    if chief:
        history(out_dir, keep_epochs=start)
        with open(out_dir / "starts.log", "a") as f:
            f.write(f"{start}\n")
        attempt = len((out_dir / "starts.log").read_text().splitlines())
    # One input pipeline per run: the remaining epochs' shuffles, one after the other.
    order = np.concatenate([epoch_order(len(x), args.seed, e)[: steps * gb] for e in range(start + 1, args.epochs + 1)])
    batches = iter(strategy.experimental_distribute_dataset(make_dataset(x, y, order, gb, args.shard_policy)))
    test_order = np.tile(np.arange(test_steps * gb), args.epochs - start)
    test_batches = iter(strategy.experimental_distribute_dataset(
        make_dataset(x_test, y_test, test_order, gb, args.shard_policy)))
    for epoch in range(start + 1, args.epochs + 1):
        loss, acc, seen, seconds = train_epoch(train_step, batches, steps, epoch, args)
        np.save(out_dir / "seen" / f"worker{index}_epoch{epoch}.npy", seen)
        test_acc, eval_seconds = evaluate(eval_step, test_batches, test_steps, gb)
        row = dict(epoch=epoch, loss=loss, accuracy=acc, test_accuracy=test_acc, images_per_s=steps * gb / seconds,
                   train_s=seconds, eval_s=eval_seconds, attempt=attempt, workers=num_workers)
        if chief:
            history(out_dir, row=row)  # before the checkpoint: a restart drops it if the checkpoint is missing
        save_checkpoint(checkpoint, out_dir, epoch, chief)
        log(f"epoch {epoch}/{args.epochs} done: loss {loss:.4f} acc {acc:.4f} test_acc {test_acc:.4f} "
            f"({row['images_per_s']:.0f} img/s; train {seconds:.1f} s, test {eval_seconds:.1f} s); "
            f"{len(seen)} examples seen by this worker, first {seen[:4].tolist()}; "
            f"checkpoint {'saved' if chief else 'written to a temp dir and deleted'}")
    return model


# Phase 7: save the final model once, on the chief.
def main(argv=None):
    global TAG
    args = parse_args(argv)
    index, num_workers, chief = where_am_i(args)
    TAG = f"[w{index} {'chief' if chief else 'worker'}]"
    out_dir = Path(args.out_dir)
    (out_dir / "seen").mkdir(parents=True, exist_ok=True)
    log(f"starting: {num_workers} workers, TF_CONFIG={os.environ.get('TF_CONFIG', '(Slurm)')}")
    strategy = join_cluster(args, num_workers)
    *arrays, source = load_data(args)
    log(f"data: {source}, train {arrays[0].shape}, test {arrays[2].shape}")
    model = train(args, strategy, arrays, out_dir, index, num_workers, chief)
    if chief and not args.no_save:
        model.save(out_dir / "model.keras")
        log("saved the final model to model.keras (chief only)")
    elif not chief:
        log("not saving the model: only the chief saves")
    log("finished")


def run(main):
    """Run `main`; on any error print it and leave AT ONCE with status 1.

    When a peer dies, TensorFlow raises in the survivors, but their normal shutdown can then
    wait a long time for the lost peer: os._exit skips it.
    """
    try:
        main()
    except Exception:
        traceback.print_exc()
        log("stopping this worker now (status 1)")
        os._exit(1)


if __name__ == "__main__":
    run(main)


# %% [markdown]
# Start the cluster. `LocalCluster` picks free ports inside the namespace, gives each
# worker its `TF_CONFIG`, writes each worker's output to its own log, and returns from
# `start()` when every worker listens. Used in a `with` block, it ends every process when
# the block ends, whether the cell finishes, fails, is interrupted or times out. While the
# cluster runs, compare the listening sockets seen from inside the namespace (through a
# worker's `/proc/<pid>/net/tcp`) with those in this notebook's own network namespace. A
# socket counts as the cluster's only if one of the cluster's own processes holds it open
# (its inode is among their `/proc/<pid>/fd` entries), not because of its port number.

# %%
WORKER = WORK / "worker.py"
with cluster.LocalCluster(WORKERS, worker_args("ctl", step_delay=0.0), script=WORKER, workdir=WORK / "logs_ctl",
                          timeout=900) as c:  # fmt: skip
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
print(pd.DataFrame(ctl.table()).to_string(index=False))

# %% [markdown]
# Inside the namespace TensorFlow listens on all interfaces, as it always does (`[::]` or
# `0.0.0.0`), but that namespace has nothing except its own loopback; outside it, the
# ports do not exist. Here are the workers' logs (TensorFlow's C++ log lines are hidden;
# `show_logs(noise=True)` shows everything). Each worker printed the `TF_CONFIG` it read:
# the same cluster, a different index. Note the local devices: one CPU per worker, not the
# logical CPUs of this notebook.

# %%
ctl.show_logs(tail=None)

# %% [markdown]
# The chief wrote one line per epoch to `history.jsonl`. The loss and accuracy are those
# of the whole global batch (summed over workers with `strategy.reduce`); the test accuracy
# is measured on the test images, also split between the workers. `train_s` is the time of
# the training steps alone and `images_per_s` is computed from it; `eval_s` is the test
# pass.

# %%
hist = pd.read_json(WORK / "ctl" / "history.jsonl", lines=True)
print(hist[["epoch", "loss", "accuracy", "test_accuracy", "images_per_s", "train_s", "eval_s"]].round(4).to_string(index=False))
later = hist["images_per_s"].iloc[1:]  # the first epoch also traces the step functions
print(f"epochs after the first, slowest / fastest in images per second: {later.min() / later.max():.2f}")

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
# The first epoch also traces the step functions; the later ones do the same work, and
# the ratio printed above compares their speeds. An earlier version of this worker built a
# new input pipeline, with a fresh copy of the shuffled images, at the start of every
# epoch, and a new iterator over the test set for every evaluation; in one long-running
# process those rebuilds took longer and longer. `train` builds each pipeline once per run.
#
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
# logical devices this notebook already set up, so the failing call runs inside workers.
# A second, short program does it: it reuses `worker.py`'s functions and calls
# `model.fit`, with Keras 3 by default or with `tf_keras` (Keras 2) when given
# `--tf-keras`. The Keras flavour must be chosen before TensorFlow is imported, so that
# choice is the file's first phase.

# %%
# %%writefile ../runs/09_multi_worker/worker_fit.py
"""model.fit under MultiWorkerMirroredStrategy:  python worker_fit.py [--tf-keras] --out-dir DIR ...

Keras 3 (the default) fails there (keras-team/keras#20585); with --tf-keras the same
model is built and fitted with tf_keras (Keras 2), which works.
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Phase 0: choose Keras BEFORE TensorFlow is imported. With TF_USE_LEGACY_KERAS=1, tf.keras
# is tf_keras (Keras 2); set later, the variable has no effect.
LEGACY = "--tf-keras" in sys.argv
if LEGACY:
    sys.argv.remove("--tf-keras")
os.environ["TF_USE_LEGACY_KERAS"] = "1" if LEGACY else "0"

import numpy as np  # noqa: E402

import worker as w  # noqa: E402  (worker.py, next to this file: arguments, cluster, data)


def seed_cnn(K, width):
    """The seed CNN, written once for both Keras flavours (`K` is keras or tf_keras)."""
    n = lambda c: max(1, round(c * width))  # noqa: E731
    L = K.layers
    return K.Sequential([
        K.Input(shape=(32, 32, 3)),
        L.Conv2D(n(32), 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(n(64), 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(n(128), 3, activation="relu"), L.Flatten(),
        L.Dense(n(128), activation="relu"), L.Dense(10, activation="softmax"),
    ])  # fmt: skip


def main():
    args = w.parse_args()
    index, num_workers, chief = w.where_am_i(args)
    w.TAG = f"[w{index} {'chief' if chief else 'worker'}]"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if LEGACY:
        import tf_keras as K
    else:
        import keras as K
    w.log(f"starting: model.fit with {K.__name__} {K.__version__}, TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']}")
    strategy = w.join_cluster(args, num_workers)
    x, y, x_test, y_test, _ = w.load_data(args)
    gb, steps = args.global_batch, len(x) // args.global_batch
    order = np.concatenate([w.epoch_order(len(x), args.seed, e)[: steps * gb] for e in range(1, args.epochs + 1)])
    train_ds = w.make_dataset(x, y, order, gb, args.shard_policy).map(lambda a, b, i: (a, b))
    test_ds = w.make_dataset(x_test, y_test, np.arange(len(x_test)), gb, args.shard_policy).map(lambda a, b, i: (a, b))
    with strategy.scope():
        model = seed_cnn(K, args.width)
        model.compile(optimizer=K.optimizers.Adam(args.lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class History(K.callbacks.Callback):  # the chief records each epoch, as worker.py does
        def on_epoch_end(self, epoch, logs=None):
            row = dict(epoch=epoch + 1, loss=logs["loss"], accuracy=logs["accuracy"],
                       test_accuracy=logs["val_accuracy"], workers=num_workers)
            if chief:
                w.history(out_dir, row=row)
            w.log(f"epoch {epoch + 1}/{args.epochs} done: loss {row['loss']:.4f} acc {row['accuracy']:.4f}")

    # BackupAndRestore: tf_keras's fault tolerance for fit (a checkpoint every epoch).
    callbacks = [K.callbacks.BackupAndRestore(str(out_dir / "backup")), History()] if LEGACY else []
    w.log("calling model.fit ...")
    model.fit(train_ds, epochs=args.epochs, steps_per_epoch=steps, validation_data=test_ds,
              callbacks=callbacks, verbose=0)
    # Saving may run collective ops, so every worker saves; only the chief's copy stays.
    path = out_dir / "model_tf_keras.keras" if chief else Path(tempfile.mkdtemp()) / "model.keras"
    model.save(path)
    w.log("saved the final model (chief only)" if chief else "saved to a temp dir and deleted it: only the chief's copy is kept")
    if not chief:
        shutil.rmtree(path.parent)
    w.log("finished")


if __name__ == "__main__":
    w.run(main)


# %% [markdown]
# Run it with Keras 3. The launcher raises `WorkerFailed`; catch it and read the error the
# chief reported:

# %%
FIT = WORK / "worker_fit.py"
try:
    cluster.run_cluster(WORKERS, worker_args("fit_keras3", epochs=1), script=FIT, workdir=WORK / "logs_keras3",
                        timeout=600, failure_grace=30, quiet=True)  # fmt: skip
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
# - a **custom training loop**, as in `worker.py`: you call `strategy.run` yourself;
# - **`tf_keras`** (Keras 2, the `tf-keras` package), whose `fit` still supports
#   `MultiWorkerMirroredStrategy`. `TF_USE_LEGACY_KERAS=1` set **before TensorFlow is
#   imported** makes `tf.keras` *be* `tf_keras`; set later, it has no effect. Its `fit` also
#   takes the `BackupAndRestore` callback for fault tolerance.

# %%
legacy = cluster.run_cluster(WORKERS, worker_args("fit_tf_keras", epochs=1) + ["--tf-keras"], script=FIT,
                             workdir=WORK / "logs_tf_keras", timeout=900, quiet=True)  # fmt: skip
legacy.show_logs(grep=r"^\[w", tail=None)
print(pd.read_json(WORK / "fit_tf_keras" / "history.jsonl", lines=True).round(4).to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
print("tf_keras fit finished on every worker:", legacy.ok)
print("each worker ran with TF_USE_LEGACY_KERAS=1:",
      all("TF_USE_LEGACY_KERAS=1" in legacy.log(i) for i in range(WORKERS)))
print("model saved by the chief only:", sorted(p.name for p in (WORK / "fit_tf_keras").glob("*.keras")))

# %% [markdown]
# ## 5. Who saw which examples: auto-sharding
#
# Every worker builds the *same* `tf.data` pipeline: all training images, in an order
# that depends only on the seed and the epoch, batched to the **global** batch. When
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
# per epoch; compare them with the order `epoch_order` gives, imported from the worker
# file itself.

# %%
sys.path.insert(0, str(WORK))
import worker  # the file written above: importing it runs none of its phases

seen = {i: np.load(WORK / "ctl" / "seen" / f"worker{i}_epoch1.npy") for i in range(WORKERS)}
gb, per_worker = RUN["global_batch"], RUN["global_batch"] // WORKERS
steps = RUN["n_train"] // gb
order = worker.epoch_order(RUN["n_train"], seed=42, epoch=1)  # the order every worker used in epoch 1
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
# others write to a temporary folder and delete it (`save_checkpoint` above). The worker
# logs said so:

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
probs = model.predict(data.to_float(cifar.x_test[:n_eval]), batch_size=256, verbose=0)
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
# the job is over. The remedy is not to keep running but to **restart and resume**, which
# is what phases 5 and 6 of `worker.py` do:
#
# 1. at the end of every epoch, save a checkpoint with the model, the optimizer state and
#    the number of finished epochs;
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
with cluster.LocalCluster(WORKERS, worker_args("ft"), script=WORKER, workdir=WORK / "logs_ft_1", timeout=900,
                          failure_grace=60) as c:  # fmt: skip
    c.wait_for_log(0, rf"epoch {kill_epoch}/{RUN['epochs']} step {RUN['log_every']}/", timeout=800)
    c.kill_worker(1)
    crashed = c.wait(check=False)
print(pd.DataFrame(crashed.table()).to_string(index=False))
print("\nworker 0's error:", cluster.exception_summary(crashed.log(0), max_chars=300))
crashed.show_logs(grep=r"^\[w", tail=4)

# %% [markdown]
# Worker 1 died from the signal. Nobody killed worker 0: its next all-reduce failed because
# the peer was gone (TensorFlow reports a reset connection, or a peer that stopped sending
# heartbeats), the error above ended its training loop, and `run` ended the process with
# status 1. This is the whole job stopping, as TensorFlow intends. The chief's history
# holds only the epochs whose checkpoint was written. Now restart the cluster with the
# same command:

# %%
resumed = cluster.run_cluster(WORKERS, worker_args("ft", step_delay=0.0), script=WORKER, workdir=WORK / "logs_ft_2",
                              timeout=900, quiet=True)  # fmt: skip
resumed.show_logs(grep=r"^\[w0", tail=None)
ft = pd.read_json(WORK / "ft" / "history.jsonl", lines=True)
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
# The worker program does not change; only `TF_CONFIG` (or its source) does. Copy
# `worker.py` (and the series' `utils`, which it imports for the data and the seed CNN) to
# every machine, or into the container image.
#
# **Plain hosts.** Start one process per machine, each with a `TF_CONFIG` naming every
# host. These are the lines to paste on each host:

# %%
# NBVAL_CHECK_OUTPUT
hosts3 = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
for i, host in enumerate(hosts3):
    tf_config = make_tf_config([f"{h}:12345" for h in hosts3], i)
    print(f"# on {host}:\nexport TF_CONFIG={shlex.quote(json.dumps(tf_config))}")
print("python worker.py --out-dir /shared/run --epochs 10")

# %% [markdown]
# **Slurm.** `SlurmClusterResolver` builds the cluster from Slurm's variables
# (`SLURM_PROCID`, `SLURM_STEP_NODELIST`, `SLURM_STEP_TASKS_PER_NODE`) instead of
# `TF_CONFIG`; `worker.py --resolver slurm` passes it to the strategy. Here is an `sbatch`
# file that starts one worker per node. Below it, fake Slurm variables show what the
# resolver makes of a 2-node step; the resolver only computes addresses, so it is safe to
# run here. (On CPU nodes pass `gpus_per_node` and `gpus_per_task` yourself, as here and in
# `join_cluster`: left alone, the resolver asks `nvidia-smi`, and with zero GPUs its
# arithmetic breaks.)

# %%
def slurm_script(nodes, port_base=12345, args=("--epochs", "10", "--out-dir", "$SLURM_SUBMIT_DIR/run")):
    """An sbatch file that runs worker.py on `nodes` nodes, one task each."""
    return "\n".join([
        "#!/bin/bash", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=01:00:00",
        "# TensorFlow's gRPC runtime has no authentication: the nodes must be on a private",
        f"# network, and port {port_base} must be closed to everything outside the job.",
        "source .venv/bin/activate",
        f"srun python worker.py --resolver slurm --port-base {port_base} {' '.join(args)}",
    ])  # fmt: skip


# %%
# NBVAL_CHECK_OUTPUT
print(slurm_script(2))
fake_slurm = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
              "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
saved_env = {k: os.environ.get(k) for k in fake_slurm}
os.environ.update(fake_slurm)
try:
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=12345, gpus_per_node=1, gpus_per_task=1, auto_set_gpu=False
    )
    print("\ncluster:", resolver.cluster_spec().as_dict(), "| this task:", resolver.task_type, resolver.task_id)
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
#   whose pod carries that worker's `TF_CONFIG`;
# - **a `TFJob`** of the Kubeflow Training Operator, which creates the pods and services
#   and writes every pod's `TF_CONFIG` itself.
#
# In both, the pods restart after a failure (`restartPolicy: OnFailure`), and a restarted
# pod resumes only if it finds the checkpoints: so both mount a shared volume claim at
# `/shared`, where `--out-dir /shared/run` points. Both come with a **NetworkPolicy** that
# lets only the job's own pods reach the gRPC port and rejects all other traffic to those
# pods (it needs a network plugin that enforces policies, such as Calico or Cilium).

# %%
TRAIN_ARGS = ["--epochs", "10", "--out-dir", "/shared/run"]


def pod_spec(image, port, claim, container="worker", gpus=0, env=()):
    """A pod that runs worker.py, with `claim` (a ReadWriteMany volume claim) at /shared."""
    c = {"name": container, "image": image, "command": ["python", "worker.py", *TRAIN_ARGS],
         "ports": [{"containerPort": port, "name": "grpc"}],
         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}  # fmt: skip
    if env:
        c["env"] = list(env)
    if gpus:
        c["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    volume = {"name": "shared", "persistentVolumeClaim": {"claimName": claim}}
    return {"restartPolicy": "OnFailure", "containers": [c], "volumes": [volume]}


def network_policy(name, pod_labels, port):
    """Only pods with `pod_labels` may reach `port` of pods with `pod_labels`; nothing else gets in."""
    select = {"matchLabels": pod_labels}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": f"{name}-grpc-only-from-job"},
            "spec": {"podSelector": select, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": select}], "ports": [{"protocol": "TCP", "port": port}]}]}}  # fmt: skip


def kubernetes_manifest(name, num_workers, image, claim, port=12345, gpus=0):
    """Per worker a headless Service and a Job carrying its TF_CONFIG, plus the NetworkPolicy."""
    hosts = [f"{name}-worker-{i}:{port}" for i in range(num_workers)]  # the Services' DNS names
    labels, docs = {"job": name}, []
    for i in range(num_workers):
        meta, pod_labels = {"name": f"{name}-worker-{i}", "labels": labels}, {**labels, "worker": str(i)}
        env = [{"name": "TF_CONFIG", "value": json.dumps(make_tf_config(hosts, i))}]
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": meta,  # workers find each other while starting:
                     "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": pod_labels,
                              "ports": [{"port": port, "name": "grpc"}]}})  # fmt: skip
        docs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                     "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": pod_labels},
                                                              "spec": pod_spec(image, port, claim, gpus=gpus, env=env)}}})  # fmt: skip
    return yaml.safe_dump_all([*docs, network_policy(name, labels, port)], sort_keys=False)


def tfjob_manifest(name, num_workers, image, claim, port=2222):
    """A Kubeflow TFJob (the operator writes each pod's TF_CONFIG), plus the NetworkPolicy."""
    pod = pod_spec(image, port, claim, container="tensorflow")  # the operator wants this container name
    job = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": name},
           "spec": {"runPolicy": {"cleanPodPolicy": "Running"}, "tfReplicaSpecs": {"Worker": {
               "replicas": num_workers, "restartPolicy": "OnFailure", "template": {"spec": pod}}}}}  # fmt: skip
    return yaml.safe_dump_all([job, network_policy(name, {"training.kubeflow.org/job-name": name}, port)], sort_keys=False)


# %% [markdown]
# Here is a 2-worker manifest of the first shape:

# %%
# NBVAL_CHECK_OUTPUT
manifest = kubernetes_manifest("cifar-mwms", 2, image="registry.example.org/series:1.0", claim="cifar-mwms-shared")
print(manifest)

# %% [markdown]
# And the `TFJob` version, with its policy (the operator labels its pods with
# `training.kubeflow.org/job-name`). Then check both: every pod mounts the claim where
# `--out-dir` points, and each policy selects exactly the job's pods.

# %%
tfjob = tfjob_manifest("cifar-mwms", 2, image="registry.example.org/series:1.0", claim="cifar-mwms-shared")
print(tfjob)

# %%
# NBVAL_CHECK_OUTPUT
jobs = [d for d in yaml.safe_load_all(manifest) if d["kind"] == "Job"]
tfjob_docs = list(yaml.safe_load_all(tfjob))
pods = [j["spec"]["template"]["spec"] for j in jobs] + [tfjob_docs[0]["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]]
print("pod templates:", len(pods))
print("every pod mounts the shared claim at /shared, where --out-dir points:",
      all(p["containers"][0]["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]
          and p["volumes"][0]["persistentVolumeClaim"]["claimName"] == "cifar-mwms-shared" for p in pods))
policy = next(d for d in yaml.safe_load_all(manifest) if d["kind"] == "NetworkPolicy")
print("the Job policy selects every worker pod:",
      all(policy["spec"]["podSelector"]["matchLabels"].items() <= j["spec"]["template"]["metadata"]["labels"].items() for j in jobs))

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
# - The worker program you wrote reads `TF_CONFIG`, joins the cluster, builds its input
#   pipeline once, and trains with a custom training loop: `MultiWorkerMirroredStrategy`
#   keeps one model copy per worker in sync by all-reducing gradients every step. Keras 3
#   `model.fit` fails there with the `PerReplica` error you saw; `tf_keras` `fit` works
#   when `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is imported.
# - Auto-sharding with the `DATA` policy split every global batch between the workers:
#   no example was trained on twice, none was skipped.
# - Only the chief saves the model; the reloaded model reproduced the chief's accuracy.
# - A killed worker stops the whole job. Checkpointing every epoch with the epoch counter,
#   and an epoch-seeded data order, made the restarted job continue exactly where the last
#   checkpoint left it, with the same result as an uninterrupted run.
# - TensorFlow's distributed runtime has no authentication: the local cluster ran in a
#   private network namespace, and real clusters need private networks, firewalls and
#   NetworkPolicies; on Kubernetes, a shared volume keeps the checkpoints across restarts.
#
# ## Exercises
#
# **1. No sharding.** Run a short 2-worker job with `--shard-policy OFF` and count how many
# examples both workers trained on. What does that do to the effective data per epoch?

# %%
# Try it: set policy to "OFF", run, and count the examples both workers saw in epoch 1.
policy = "DATA"  # TODO: "OFF"
print("worker.py would run with:", " ".join(worker_args("shard_try", epochs=1)[2:] + ["--shard-policy", policy]))

# %% jupyter={"source_hidden": true}
# Solution 1
off = cluster.run_cluster(
    WORKERS, worker_args("shard_off", epochs=1, n_train=256, n_test=64, step_delay=0.0) + ["--shard-policy", "OFF", "--no-save"],
    script=WORKER, workdir=WORK / "logs_off", timeout=600, quiet=True,
)  # fmt: skip
seen_off = [set(np.load(WORK / "shard_off" / "seen" / f"worker{i}_epoch1.npy").tolist()) for i in range(WORKERS)]
steps_off = 256 // RUN["global_batch"]
print("examples per worker:", [len(s) for s in seen_off], "| seen by both:", len(seen_off[0] & seen_off[1]))
print(f"distinct examples trained on: {len(seen_off[0] | seen_off[1])} of the {steps_off * RUN['global_batch']} "
      "that the same steps cover with DATA sharding")

# %% [markdown]
# **2. A separate chief.** Write the `TF_CONFIG`s of a cluster with one chief and three
# workers on four hosts, check them with `check_tf_config`, and find which task saves.
# Then break one on purpose (a port out of range) and read the error.

# %%
# Try it: build the four TF_CONFIGs with make_tf_config(..., chief=...), check them, print is_chief.
workers4 = [f"10.0.0.{i}:12345" for i in (21, 22, 23)]
chief = "10.0.0.20:12345"
configs = []  # TODO: one with task_type="chief", three workers
for cfg in configs:
    check_tf_config(cfg)
    print(cfg["task"], "saves:", is_chief(cfg))

# %% jupyter={"source_hidden": true}
# Solution 2
configs = [make_tf_config(workers4, 0, task_type="chief", chief=chief)]
configs += [make_tf_config(workers4, i, chief=chief) for i in range(3)]
for cfg in configs:
    check_tf_config(cfg)
    print(cfg["task"], "saves:", is_chief(cfg))
broken = json.loads(json.dumps(configs[1]))
broken["cluster"]["worker"][2] = "10.0.0.23:99999"
try:
    check_tf_config(broken)
except ValueError as err:
    print("rejected:", err)

# %% [markdown]
# **3. Kubernetes for GPUs.** Generate a manifest for 4 workers with one GPU each and check
# with `yaml.safe_load_all` that every pod requests a GPU and that the NetworkPolicy's
# selector matches every worker pod.

# %%
# Try it: kubernetes_manifest(..., gpus=1) for 4 workers, then load it and look at the pods.
gpu_manifest = kubernetes_manifest("gpu-mwms", 4, image="registry.example.org/series:1.0", claim="gpu-mwms-shared")  # TODO: gpus=1
print([d["kind"] for d in yaml.safe_load_all(gpu_manifest)])

# %% jupyter={"source_hidden": true}
# Solution 3
docs = list(yaml.safe_load_all(kubernetes_manifest("gpu-mwms", 4, image="registry.example.org/series:1.0",
                                                   claim="gpu-mwms-shared", gpus=1)))  # fmt: skip
gpu_pods = [d["spec"]["template"] for d in docs if d["kind"] == "Job"]
selector = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
print("pods:", len(gpu_pods))
print("every pod requests one GPU:",
      all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for p in gpu_pods))
print("policy selects every worker pod:", all(selector.items() <= p["metadata"]["labels"].items() for p in gpu_pods))

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
