"""The training program every worker of a multi-worker job runs (``python -m utils.worker_train``).

One copy runs per worker process, on one machine (started by :mod:`utils.cluster`) or on
many (Slurm, Kubernetes). Each reads its place in the cluster from ``TF_CONFIG`` (or from
Slurm through ``SlurmClusterResolver`` with ``--resolver slurm``), creates a
:class:`tf.distribute.MultiWorkerMirroredStrategy` and trains the seed CNN on CIFAR-10
(or synthetic data in smoke runs).

Modes (``--mode``):

``ctl`` (default)
    Keras 3 model and optimizer, custom training loop with ``strategy.run``. Works.
``fit-tf-keras``
    ``tf_keras`` (Keras 2) ``model.fit``; sets ``TF_USE_LEGACY_KERAS=1`` *before* importing
    TensorFlow, so ``tf.keras`` is ``tf_keras``. Works; uses ``BackupAndRestore``.
``fit-keras3``
    Keras 3 ``model.fit``: fails on TF 2.21 with "Attempt to convert a value
    (PerReplica...)" (keras-team/keras#20585). Kept to show that error.

What lands in ``--out-dir`` (shared by all workers, so on a real cluster a shared file system):

* ``history.jsonl``: one line per finished epoch, written by the chief only;
* ``ckpt/``: the chief's checkpoint after every epoch (model, optimizer, epoch counter);
  non-chief workers write theirs to a private temporary folder and delete it;
* ``seen/worker<i>_epoch<e>.npy``: the example indices worker ``i`` trained on in epoch ``e``;
* ``model.keras``: the final model, saved by the chief only;
* ``starts.log``: one line per (re)start of the chief.

Fault tolerance: after a crash, start the same job again with the same ``--out-dir``.
Every worker restores the last checkpoint, which holds the number of finished epochs;
training resumes with the next epoch, and the chief drops history lines of epochs the
checkpoint does not hold. Each epoch's shuffle depends only on ``--seed`` and the epoch,
so a resumed run sees exactly the data an uninterrupted run would: no epoch is lost or
repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from utils.cluster import BadTFConfigError, is_chief, validate_tf_config

MODES = ("ctl", "fit-tf-keras", "fit-keras3")
SHARD_POLICIES = ("DATA", "OFF", "AUTO", "FILE")

_T0 = time.monotonic()
_TAG = "[worker]"


def log(msg: str) -> None:
    """Print one log line with this worker's tag and the seconds since start."""
    print(f"{_TAG} {time.monotonic() - _T0:6.1f}s  {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``python -m utils.worker_train --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m utils.worker_train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out-dir",
        required=True,
        help="folder shared by all workers (checkpoints, history, model)",
    )
    p.add_argument("--mode", choices=MODES, default="ctl")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--steps-per-epoch", type=int, default=None, help="default: a full pass over the data"
    )
    p.add_argument(
        "--global-batch", type=int, default=128, help="batch size summed over all workers"
    )
    p.add_argument("--n-train", type=int, default=None, help="training images used (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="test images used (default: all)")
    p.add_argument(
        "--data",
        choices=("auto", "synthetic", "cifar10"),
        default="auto",
        help="auto: CIFAR-10 if found, synthetic in smoke mode; cifar10: real data or an error",
    )
    p.add_argument("--shard-policy", choices=SHARD_POLICIES, default="DATA")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the seed CNN")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-every", type=int, default=0, help="log every N steps (0: only epochs)")
    p.add_argument(
        "--step-delay", type=float, default=0.0, help="sleep per step in s (slow demos down)"
    )
    p.add_argument(
        "--threads", type=str, default=None, help="'INTRA,INTER' TensorFlow thread pools"
    )
    p.add_argument("--resolver", choices=("tf_config", "slurm"), default="tf_config")
    p.add_argument("--port-base", type=int, default=12345, help="first port with --resolver slurm")
    p.add_argument("--no-save", action="store_true", help="skip saving the final model")
    p.add_argument(
        "--no-determinism",
        action="store_true",
        help="skip tf.config.experimental.enable_op_determinism() (faster on GPUs; resumed "
        "runs then match uninterrupted ones only approximately)",
    )
    args = p.parse_args(argv)
    for name in ("epochs", "global_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        p.error("--steps-per-epoch must be >= 1")
    return args


# ------------------------------------------------------------------------------ cluster info
def cluster_info(args: argparse.Namespace) -> tuple[dict | None, int, int, bool]:
    """``(tf_config, index, num_workers, chief)`` from TF_CONFIG (validated) or Slurm."""
    if args.resolver == "slurm":
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        n = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
        return None, rank, n, rank == 0
    cfg = validate_tf_config(os.environ.get("TF_CONFIG"))
    n = sum(len(v) for k, v in cfg["cluster"].items() if k in ("chief", "worker"))
    return cfg, int(cfg["task"]["index"]), n, is_chief(cfg)


def slurm_resolver(port_base: int):  # -> tf.distribute.cluster_resolver.SlurmClusterResolver
    """A ``SlurmClusterResolver`` that also works on CPU-only nodes.

    With ``gpus_per_node=0`` the resolver's GPU arithmetic breaks (a zero step), and
    without the argument it calls ``nvidia-smi``; so on CPU nodes give every task a
    notional GPU slot and switch off ``CUDA_VISIBLE_DEVICES`` handling.
    """
    import tensorflow as tf

    from utils.cluster import gpu_count

    gpus = gpu_count()
    if gpus:
        return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base)
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", "1"))
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
        expand_tasks_per_node,
    )

    per_node = max(expand_tasks_per_node(tasks))
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=per_node, gpus_per_task=1, auto_set_gpu=False
    )


# ------------------------------------------------------------------------------ data
def load_data(args: argparse.Namespace):
    """The same arrays on every worker: ``(x_train, y_train, x_test, y_test, source)``."""
    from utils import config, data

    if args.data == "synthetic":
        n_train, n_test = args.n_train or 2048, args.n_test or 512
        x_tr, y_tr, x_te, y_te, _ = data.make_synthetic(n_train, n_test, seed=0)
        return x_tr, y_tr, x_te, y_te, "synthetic"
    allow = args.data == "auto" and config.is_smoke()
    # download=False: inside the private network namespace there is no internet anyway;
    # the notebook (or you) fetch the data once beforehand.
    d = data.load_cifar10(
        allow_synthetic=allow, download=False, n_train=args.n_train, n_test=args.n_test
    )
    return d.x_train, d.y_train, d.x_test, d.y_test, d.source


def epoch_order(n: int, seed: int, epoch: int):
    """The order of the ``n`` training examples in ``epoch`` (1-based): a permutation that
    depends only on ``seed`` and ``epoch``, so a resumed run replays it exactly."""
    import numpy as np

    return np.random.default_rng(seed * 1000 + epoch - 1).permutation(n)


def make_dataset(
    tf,
    x,
    y,
    batch: int,
    *,
    order=None,
    shard_policy: str,
    with_index: bool = True,
    shuffle_seed=None,
):
    """Batched ``(image float32 in [0,1], label, index)`` dataset with a fixed shuffle and shard policy.

    ``order=None`` keeps the stored order (evaluation); else pass :func:`epoch_order`.
    ``shuffle_seed`` adds a ``shuffle`` that reshuffles on every pass (for ``fit`` with
    ``repeat()``); the same seed on every worker keeps the shards disjoint.
    """
    import numpy as np

    n = len(x)
    order = np.arange(n) if order is None else np.asarray(order)
    idx = order.astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order], idx))
    if shuffle_seed is not None:
        ds = ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(
        lambda a, b, i: (tf.cast(a, tf.float32) / 255.0, b, i), num_parallel_calls=tf.data.AUTOTUNE
    )
    if not with_index:
        ds = ds.map(lambda a, b, i: (a, b))
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = getattr(
        tf.data.experimental.AutoShardPolicy, shard_policy
    )
    opts.deterministic = True
    return ds.with_options(opts).prefetch(2)


# ------------------------------------------------------------------------------ models
def build_legacy_seed_cnn(width: float = 1.0):
    """The seed CNN built with ``tf_keras`` (Keras 2), layer for layer as :func:`utils.models.build_seed_cnn`."""
    import tf_keras as tfk

    from utils.models import scaled

    L = tfk.layers
    return tfk.Sequential(
        [
            tfk.Input(shape=(32, 32, 3)),
            L.Conv2D(scaled(32, width), (3, 3), activation="relu", name="conv1"),
            L.MaxPooling2D((2, 2), name="pool1"),
            L.Conv2D(scaled(64, width), (3, 3), activation="relu", name="conv2"),
            L.MaxPooling2D((2, 2), name="pool2"),
            L.Conv2D(scaled(128, width), (3, 3), activation="relu", name="conv3"),
            L.Flatten(name="flatten"),
            L.Dense(scaled(128, width), activation="relu", name="dense1"),
            L.Dense(10, activation="softmax", dtype="float32", name="output"),
        ],
        name="seed_cnn_tf_keras",
    )


# ------------------------------------------------------------------------------ history
def read_history(out_dir: Path) -> list[dict]:
    """The chief's per-epoch records (empty if none yet)."""
    path = Path(out_dir) / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_history(out_dir: Path, keep_epochs: int) -> int:
    """Drop records of epochs the checkpoint does not hold; return how many were dropped."""
    rows = read_history(out_dir)
    kept = [r for r in rows if r["epoch"] <= keep_epochs]
    if len(kept) != len(rows):
        (Path(out_dir) / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


def _append_history(out_dir: Path, row: dict) -> None:
    with open(Path(out_dir) / "history.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    global _TAG
    args = parse_args(argv)
    try:
        tf_config, index, num_workers, chief = cluster_info(args)
    except BadTFConfigError as err:
        print(f"[worker ?] bad TF_CONFIG, not starting: {err}", flush=True)
        return 2
    _TAG = f"[w{index} {'chief' if chief else 'worker'}]"
    if args.global_batch % num_workers:
        log(
            f"--global-batch {args.global_batch} is not divisible by {num_workers} workers; stopping."
        )
        return 2
    # The Keras flavour must be chosen before TensorFlow is imported.
    if args.mode == "fit-tf-keras":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    else:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"starting: mode={args.mode}, {num_workers} workers, TF_USE_LEGACY_KERAS="
        f"{os.environ.get('TF_USE_LEGACY_KERAS', 'unset')}, network namespace: "
        f"{'private' if os.environ.get('SERIES_CLUSTER_ISOLATED') == '1' else 'host'}"
    )

    import tensorflow as tf

    cpus = os.cpu_count() or 1
    intra, inter = max(1, cpus // num_workers), 2
    if args.threads:
        intra, inter = (int(v) for v in args.threads.split(","))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    if not args.no_determinism:
        tf.config.experimental.enable_op_determinism()
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    tf.keras.utils.set_random_seed(args.seed)

    resolver = slurm_resolver(args.port_base) if args.resolver == "slurm" else None
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    log(
        f"strategy ready: {strategy.num_replicas_in_sync} replicas in sync, local devices "
        f"{list(strategy.extended.worker_devices)}, threads intra={intra} inter={inter}"
    )
    x_tr, y_tr, x_te, y_te, source = load_data(args)
    log(f"data: {source}, train {x_tr.shape}, test {x_te.shape}")
    if args.mode == "ctl":
        return train_ctl(
            tf, strategy, args, x_tr, y_tr, x_te, y_te, out_dir, index, num_workers, chief
        )
    return train_fit(tf, strategy, args, x_tr, y_tr, x_te, y_te, out_dir, index, num_workers, chief)


def _write_dir(out_dir: Path, what: str, chief: bool, index: int) -> Path:
    """Chief: ``out_dir/what``. Others: a private temp folder (deleted after writing)."""
    if chief:
        return out_dir / what
    return Path(tempfile.mkdtemp(prefix=f"{what}_worker{index}_"))


def train_ctl(
    tf, strategy, args, x_tr, y_tr, x_te, y_te, out_dir, index, num_workers, chief
) -> int:
    """Keras 3 model + custom training loop under MultiWorkerMirroredStrategy."""
    import keras
    import numpy as np

    from utils.models import build_seed_cnn

    gb = args.global_batch
    steps_full = len(x_tr) // gb
    steps = min(args.steps_per_epoch or steps_full, steps_full)
    if steps < 1:
        log(f"{len(x_tr)} training images are fewer than one global batch of {gb}; stopping.")
        return 2
    test_steps = len(x_te) // gb
    with strategy.scope():
        model = build_seed_cnn(width=args.width)
        optimizer = keras.optimizers.Adam(args.lr)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epochs_done=epoch_var)
    chief_ckpt_dir = out_dir / "ckpt"
    latest = tf.train.latest_checkpoint(str(chief_ckpt_dir))
    start_epoch = 0
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        start_epoch = int(epoch_var.numpy())
        log(
            f"restored checkpoint {Path(latest).name}: {start_epoch} epoch(s) done, resuming with epoch {start_epoch + 1}"
        )
    else:
        log("no checkpoint found: starting from scratch")
    if chief:
        dropped = _truncate_history(out_dir, start_epoch)
        if dropped:
            log(f"dropped {dropped} history line(s) of epochs not in the checkpoint")
        with open(out_dir / "starts.log", "a") as f:
            f.write(json.dumps({"start_epoch": start_epoch, "time": time.time()}) + "\n")
    starts = out_dir / "starts.log"
    attempt = len(starts.read_text().splitlines()) if chief and starts.exists() else 0
    write_dir = _write_dir(out_dir, "ckpt", chief, index)
    manager = tf.train.CheckpointManager(ckpt, str(write_dir), max_to_keep=2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    @tf.function
    def train_step(batch):
        def step_fn(x, y, idx):
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                per_example = loss_fn(y, probs)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=gb)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1), y), tf.float32))
            return loss, correct, idx

        loss, correct, idx = strategy.run(step_fn, args=batch)
        return (
            strategy.reduce("SUM", loss, axis=None),
            strategy.reduce("SUM", correct, axis=None),
            strategy.experimental_local_results(idx),
        )

    @tf.function
    def eval_step(batch):
        def step_fn(x, y, idx):
            probs = model(x, training=False)
            return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1), y), tf.float32))

        return strategy.reduce("SUM", strategy.run(step_fn, args=batch), axis=None)

    test_ds = strategy.experimental_distribute_dataset(
        make_dataset(tf, x_te, y_te, gb, shard_policy=args.shard_policy)
    )
    seen_dir = out_dir / "seen"
    seen_dir.mkdir(exist_ok=True)
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.monotonic()
        ds = strategy.experimental_distribute_dataset(
            make_dataset(
                tf,
                x_tr,
                y_tr,
                gb,
                order=epoch_order(len(x_tr), args.seed, epoch + 1),
                shard_policy=args.shard_policy,
            )
        )
        it = iter(ds)
        loss_sum, correct_sum, seen = 0.0, 0.0, []
        for step in range(steps):
            loss, correct, idx = train_step(next(it))
            loss_sum += float(loss)
            correct_sum += float(correct)
            seen.extend(np.concatenate([np.asarray(t) for t in idx]).tolist())
            if args.step_delay:
                time.sleep(args.step_delay)
            if args.log_every and (step + 1) % args.log_every == 0:
                log(
                    f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss {loss_sum / (step + 1):.4f}"
                )
        np.save(seen_dir / f"worker{index}_epoch{epoch + 1}.npy", np.asarray(seen, dtype=np.int64))
        correct_test = 0.0
        t_it = iter(test_ds)
        for _ in range(test_steps):
            correct_test += float(eval_step(next(t_it)))
        train_time = time.monotonic() - t_epoch
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / steps,
            "accuracy": correct_sum / (steps * gb),
            "test_accuracy": correct_test / (test_steps * gb) if test_steps else float("nan"),
            "images_per_s": steps * gb / train_time,
            "seconds": train_time,
            "attempt": attempt,
            "workers": num_workers,
        }
        if chief:
            _append_history(out_dir, row)  # before the checkpoint: see _truncate_history
        epoch_var.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
        log(
            f"epoch {epoch + 1}/{args.epochs} done: loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
            f"test_acc {row['test_accuracy']:.4f} ({row['images_per_s']:.0f} img/s, {len(seen)} examples seen "
            f"by this worker, first {seen[:4]}); checkpoint {'saved' if chief else 'written to a temp dir and deleted'}"
        )
    if not args.no_save:
        if chief:
            path = out_dir / "model.keras"
            model.save(path)
            log(f"saved the final model to {path.name} (chief only)")
        else:
            log("not saving the model: only the chief saves")
    log("finished")
    return 0


def train_fit(
    tf, strategy, args, x_tr, y_tr, x_te, y_te, out_dir, index, num_workers, chief
) -> int:
    """``model.fit`` under MultiWorkerMirroredStrategy: tf_keras works, Keras 3 fails."""
    gb = args.global_batch
    steps_full = len(x_tr) // gb
    steps = min(args.steps_per_epoch or steps_full, steps_full)
    if args.mode == "fit-tf-keras":
        import tf_keras as K

        assert tf.keras is K or tf.keras.__name__.startswith("tf_keras"), (
            "TF_USE_LEGACY_KERAS was set too late"
        )
        with strategy.scope():
            model = build_legacy_seed_cnn(args.width)
            model.compile(
                optimizer=K.optimizers.Adam(args.lr),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
        log(f"tf_keras {K.__version__} model: {model.count_params():,} parameters")
        backup = out_dir / "backup"

        class History(K.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                row = {
                    "epoch": epoch + 1,
                    "loss": float(logs["loss"]),
                    "accuracy": float(logs["accuracy"]),
                    "test_accuracy": float(logs.get("val_accuracy", float("nan"))),
                    "workers": num_workers,
                }
                if chief:
                    _append_history(out_dir, row)
                log(
                    f"epoch {epoch + 1}/{args.epochs} done: loss {row['loss']:.4f} acc {row['accuracy']:.4f} test_acc {row['test_accuracy']:.4f}"
                )

        callbacks = [K.callbacks.BackupAndRestore(backup_dir=str(backup)), History()]
    else:
        import keras

        from utils.models import build_seed_cnn

        with strategy.scope():
            model = build_seed_cnn(width=args.width)
            model.compile(
                optimizer=keras.optimizers.Adam(args.lr),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
        log(
            f"Keras {keras.__version__} model: {model.count_params():,} parameters; calling model.fit ..."
        )
        callbacks = []
    train = make_dataset(
        tf, x_tr, y_tr, gb, shard_policy=args.shard_policy, with_index=False, shuffle_seed=args.seed
    ).repeat()
    test = make_dataset(tf, x_te, y_te, gb, shard_policy=args.shard_policy, with_index=False)
    test_steps = len(x_te) // gb
    model.fit(
        train,
        epochs=args.epochs,
        steps_per_epoch=steps,
        validation_data=test if test_steps else None,
        validation_steps=test_steps or None,
        callbacks=callbacks,
        verbose=0,
    )
    if not args.no_save:
        # tf_keras saving may run collective ops, so every worker saves; only the chief's copy stays.
        target = (
            out_dir / "model_tf_keras.keras" if chief else Path(tempfile.mkdtemp()) / "model.keras"
        )
        model.save(target)
        if chief:
            log(f"saved the final model to {target.name} (chief only)")
        else:
            shutil.rmtree(target.parent, ignore_errors=True)
            log("saved to a temp dir and deleted it: only the chief's copy is kept")
    log("finished")
    return 0


def run() -> None:
    """Run :func:`main` and exit; a failure ends the process at once with status 1.

    When a peer dies, TensorFlow raises an error in the survivors, but their normal
    interpreter shutdown can then wait a long time for the lost peer. So after printing the
    traceback the worker leaves with ``os._exit(1)``.
    """
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        log("stopping this worker now (status 1)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)


if __name__ == "__main__":
    run()
