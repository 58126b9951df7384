"""Training recipes, callbacks and run bookkeeping for the seed CNN.

Two recipes train the same model (:func:`utils.models.build_seed_cnn`):

:func:`seed_recipe`
    The seed article, kept exactly: NumPy arrays scaled to float64 by ``x / 255.0``,
    ``model.fit(x, y, epochs=10, validation_data=(x_test, y_test))`` with Keras's default
    batch size of 32, Adam, sparse categorical cross-entropy.

:func:`series_recipe`
    This series' recipe: the tuned ``tf.data`` pipeline (:mod:`utils.pipeline`), a global
    batch of 128 split over the replicas of a :class:`tf.distribute.MirroredStrategy` on
    :func:`utils.devices.compute_devices`, optional mixed precision (``mixed_bfloat16`` on
    CPU, ``mixed_float16`` on GPU), a warm-up + cosine learning-rate schedule, a held-out
    validation split, and the callbacks of :func:`make_callbacks`.

Both return a :class:`RecipeResult` with the wall time, test accuracy and history, so a
notebook can put them in one table (:func:`compare_results`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import devices, evaluation, models, pipeline

SEED_BATCH_SIZE = 32  # Keras's default batch size, which the seed article relies on
SEED_EPOCHS = 10
SERIES_BATCH_SIZE = 128  # global batch of the series' recipe
SERIES_BASE_LR = 2e-3  # Adam peak learning rate at global batch 128


# --------------------------------------------------------------------------- results
@dataclass
class RecipeResult:
    """What one training run produced.

    Attributes:
        name: a label for tables ("seed recipe", "series recipe", ...).
        model: the trained Keras model.
        history: one row per epoch (see :func:`history_frame`).
        wall_s: seconds spent in ``model.fit`` (training plus per-epoch validation).
        cpu_s: CPU seconds this process used during ``model.fit`` (all threads). Unlike the
            wall time it barely changes when other programs compete for the cores.
        test_loss, test_accuracy: on the test split, after training.
        images_per_s: training images per second, averaged over epochs after the first.
        settings: the recipe's knobs (batch size, precision, replicas, ...), for tables.
    """

    name: str
    model: keras.Model
    history: pd.DataFrame
    wall_s: float
    cpu_s: float
    test_loss: float
    test_accuracy: float
    images_per_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One row for :func:`compare_results`."""
        return {
            "recipe": self.name,
            **self.settings,
            "epochs run": len(self.history),
            "train images/s": round(self.images_per_s),
            "wall time (s)": round(self.wall_s, 1),
            "CPU time (s)": round(self.cpu_s, 1),
            "test accuracy": round(self.test_accuracy, 4),
        }


def compare_results(results: Sequence[RecipeResult]) -> pd.DataFrame:
    """A table with one row per recipe: settings, epochs, images/s, wall time, test accuracy."""
    if not results:
        raise ValueError("compare_results needs at least one RecipeResult")
    return pd.DataFrame([r.row() for r in results]).set_index("recipe")


# --------------------------------------------------------------------------- precision
def default_mixed_policy() -> str:
    """``"mixed_float16"`` on GPUs (tensor cores), ``"mixed_bfloat16"`` on CPUs."""
    return "mixed_float16" if devices.device_kind() == "GPU" else "mixed_bfloat16"


def resolve_policy(precision: str | bool | None) -> str:
    """Turn a recipe's ``precision`` argument into a Keras dtype-policy name.

    ``"auto"``/``True`` -> :func:`default_mixed_policy`; ``None``/``False``/``"float32"`` ->
    ``"float32"``; ``"mixed_bfloat16"``/``"mixed_float16"`` are kept.

    Raises:
        ValueError: for anything else.
    """
    if precision in (None, False, "float32"):
        return "float32"
    if precision in (True, "auto", "mixed"):
        return default_mixed_policy()
    if precision in ("mixed_bfloat16", "mixed_float16"):
        return str(precision)
    raise ValueError(
        f"precision must be 'auto', 'float32', 'mixed_bfloat16' or 'mixed_float16', "
        f"got {precision!r}"
    )


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[str]:
    """Set Keras's global dtype policy inside the block and restore the previous one after.

    Models *built* inside the block keep the policy (it is saved with them in ``.keras``).
    """
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield name
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --------------------------------------------------------------------------- strategy
def make_strategy(device_names: Sequence[str] | None = None) -> tf.distribute.MirroredStrategy:
    """A :class:`tf.distribute.MirroredStrategy` over ``device_names``.

    Defaults to :func:`utils.devices.compute_devices` (all GPUs, else all logical CPUs).
    On CPUs the replicas are combined with ``ReductionToOneDevice`` (NCCL needs GPUs).

    Raises:
        ValueError: for an empty list or names TensorFlow does not know.
    """
    names = list(device_names) if device_names is not None else devices.compute_devices()
    if not names:
        raise ValueError("make_strategy needs at least one device name")
    known = {d.name for d in tf.config.list_logical_devices()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Unknown device(s) {unknown}. Known devices: {sorted(known)}. "
            "Call utils.devices.setup_devices() first and pick from compute_devices()."
        )
    cross = None
    if not any("GPU" in n for n in names):
        cross = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(names, cross_device_ops=cross)


# --------------------------------------------------------------------------- callbacks
class TrainingInterrupted(RuntimeError):
    """Raised by :class:`InterruptAtStep` to simulate a crash or a pre-empted machine."""


class InterruptAtStep(keras.callbacks.Callback):
    """Raise :class:`TrainingInterrupted` after ``step`` training batches of this ``fit`` call.

    Steps are counted across epochs from the start of the ``fit`` call (1-based), so
    ``InterruptAtStep(25)`` with 10 batches per epoch stops in the middle of the third
    epoch, after its fifth batch. Put it *last* in the callback list so that other
    callbacks (checkpoints, logs) see the batch before the "crash".
    """

    def __init__(self, step: int) -> None:
        super().__init__()
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a whole number >= 1, got {step!r}")
        self.step = step
        self.seen = 0
        self.epoch = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.seen = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seen += 1
        if self.seen >= self.step:
            raise TrainingInterrupted(
                f"simulated crash after {self.seen} training steps "
                f"(epoch {self.epoch + 1}, batch {batch + 1})"
            )


class ThroughputCallback(keras.callbacks.Callback):
    """Time every epoch and report training images per second.

    Adds ``epoch_s`` (wall seconds of the epoch, validation included) and ``images_per_s``
    (training images / training seconds, validation excluded) to the epoch logs, so they
    appear in ``History`` and in the TensorBoard logs.

    Args:
        batch_size: the *global* batch size (images per step over all replicas).
        verbose: print one line per epoch.
    """

    def __init__(self, batch_size: int, verbose: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.verbose = verbose
        self.records: list[dict[str, float]] = []
        self._t0 = 0.0
        self._train_end = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()
        self._train_end = 0.0
        self._steps = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._steps += 1
        self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        train_s = max((self._train_end or now) - self._t0, 1e-9)
        rate = self._steps * self.batch_size / train_s
        record = {"epoch": epoch + 1, "steps": self._steps, "epoch_s": now - self._t0, "images_per_s": rate}
        self.records.append(record)
        if logs is not None:
            logs["epoch_s"] = record["epoch_s"]
            logs["images_per_s"] = rate
        if self.verbose:
            print(f"epoch {epoch + 1}: {rate:,.0f} images/s ({record['epoch_s']:.1f} s)")

    def mean_images_per_s(self, skip_first: bool = True) -> float:
        """Average images/s over the recorded epochs (the first one warms up and is skipped)."""
        rates = [r["images_per_s"] for r in self.records]
        if skip_first and len(rates) > 1:
            rates = rates[1:]
        return float(np.mean(rates)) if rates else float("nan")


class EpochLedger(keras.callbacks.Callback):
    """Record, for each ``fit`` call labelled ``run``, which epochs ran and how far.

    One row per epoch *started*: the run label, the 1-based epoch number, the batches it
    completed, whether it finished, and the optimizer's step counter at its end (or at the
    crash). Used to show that a resumed run neither skips nor repeats an epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.run = "run 1"

    def label(self, run: str) -> EpochLedger:
        """Set the label for the next ``fit`` call; returns ``self`` for chaining."""
        self.run = run
        return self

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.rows.append({"run": self.run, "epoch": epoch + 1, "batches": 0, "finished": False,
                          "optimizer steps": self._iterations()})

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.rows:
            self.rows[-1]["batches"] = batch + 1
            self.rows[-1]["optimizer steps"] = self._iterations()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.rows:
            self.rows[-1]["finished"] = True
            self.rows[-1]["optimizer steps"] = self._iterations()

    def _iterations(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def frame(self) -> pd.DataFrame:
        """The ledger as a DataFrame."""
        return pd.DataFrame(self.rows, columns=["run", "epoch", "batches", "finished", "optimizer steps"])


def tensorboard_installed() -> bool:
    """True when the ``tensorboard`` package (needed by ``keras.callbacks.TensorBoard``) imports."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


_SCALARS_METADATA = None


def _scalars_metadata() -> Any:
    global _SCALARS_METADATA
    if _SCALARS_METADATA is None:
        meta = tf.compat.v1.SummaryMetadata
        _SCALARS_METADATA = meta(plugin_data=meta.PluginData(plugin_name="scalars"))
    return _SCALARS_METADATA


class TensorBoardScalars(keras.callbacks.Callback):
    """Write per-epoch scalars as TensorBoard event files, with core TensorFlow only.

    Same layout and tags as :class:`keras.callbacks.TensorBoard` (``<log_dir>/train`` and
    ``<log_dir>/validation``, tags ``epoch_loss``, ``epoch_accuracy``, ...) plus
    ``epoch_learning_rate``, but it does not need the ``tensorboard`` package, which
    ``keras.callbacks.TensorBoard`` imports for every scalar. Epochs are the step axis, so
    a resumed run continues the same curves.
    """

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self._writers: dict[str, Any] = {}

    def _writer(self, split: str) -> Any:
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(str(self.log_dir / split))
        return self._writers[split]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is not None:
            logs.setdefault("learning_rate", float(keras.ops.convert_to_numpy(lr)))
        for key, value in logs.items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with self._writer(split).as_default():
                tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch,
                                 metadata=_scalars_metadata())
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def read_scalars(log_dir: str | Path) -> pd.DataFrame:
    """Read the scalars of TensorBoard event files under ``log_dir`` into a long DataFrame.

    Columns: ``split`` (sub-folder, e.g. ``train``), ``tag``, ``step``, ``value``; sorted.
    Handy to check what a run logged without starting TensorBoard.
    """
    rows = []
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        split = path.parent.relative_to(log_dir).as_posix()
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = float(value.simple_value)
                rows.append({"split": split, "tag": value.tag, "step": int(event.step), "value": number})
    frame = pd.DataFrame(rows, columns=["split", "tag", "step", "value"])
    return frame.sort_values(["split", "tag", "step"]).reset_index(drop=True)


def warmup_cosine(
    base_lr: float, epochs: int, warmup_epochs: int = 1, min_fraction: float = 0.05
) -> Callable[[int, float], float]:
    """A per-epoch schedule for :class:`keras.callbacks.LearningRateScheduler`.

    Linear warm-up from ``base_lr / (warmup_epochs + 1)`` to ``base_lr`` over
    ``warmup_epochs`` epochs, then cosine decay to ``min_fraction * base_lr`` at the last
    epoch. It depends only on the epoch index, so a resumed run gets the same rates. A run
    shorter than the warm-up gets ``epochs - 1`` warm-up epochs (a 1-epoch run: none).

    Raises:
        ValueError: for a non-positive ``base_lr`` or ``epochs``, or a negative warm-up.
    """
    if base_lr <= 0 or epochs < 1:
        raise ValueError(f"need base_lr > 0 and epochs >= 1, got {base_lr}, {epochs}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    warmup_epochs = min(warmup_epochs, epochs - 1)

    def schedule(epoch: int, lr: float = base_lr) -> float:
        if epoch < warmup_epochs:
            return base_lr * (epoch + 1) / (warmup_epochs + 1)
        span = max(epochs - 1 - warmup_epochs, 1)
        progress = min((epoch - warmup_epochs) / span, 1.0)
        return float(base_lr * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))))

    return schedule


def make_callbacks(
    run_dir: str | Path,
    *,
    batch_size: int,
    checkpoint: bool = True,
    backup: bool = True,
    backup_freq: str | int = "epoch",
    tensorboard: bool = True,
    lr_schedule: Callable[[int, float], float] | None = None,
    early_stopping_patience: int | None = 3,
    monitor: str = "val_loss",
    throughput: bool = True,
) -> list[keras.callbacks.Callback]:
    """The series' callbacks, in the order they should run.

    * :class:`ThroughputCallback` (images/s into the logs; first so later callbacks see it);
    * :class:`keras.callbacks.LearningRateScheduler` with ``lr_schedule``;
    * :class:`keras.callbacks.ModelCheckpoint`: the best model (by ``monitor``) as
      ``<run_dir>/checkpoints/best.keras``;
    * :class:`keras.callbacks.BackupAndRestore` in ``<run_dir>/backup`` (``backup_freq``:
      ``"epoch"`` or every N batches): a re-run of ``fit`` after a crash resumes there;
    * TensorBoard logs in ``<run_dir>/logs``: :class:`keras.callbacks.TensorBoard` (no
      profiler) when the ``tensorboard`` package is installed, else the equivalent
      :class:`TensorBoardScalars`. View them with
      ``tensorboard --logdir runs/<name>/logs --host 127.0.0.1``;
    * :class:`keras.callbacks.EarlyStopping` on ``monitor`` (restores the best weights).

    Raises:
        ValueError: for a bad batch size or patience.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if early_stopping_patience is not None and early_stopping_patience < 1:
        raise ValueError(f"early_stopping_patience must be >= 1 or None, got {early_stopping_patience}")
    run_dir = Path(run_dir)
    cbs: list[keras.callbacks.Callback] = []
    if throughput:
        cbs.append(ThroughputCallback(batch_size))
    if lr_schedule is not None:
        cbs.append(keras.callbacks.LearningRateScheduler(lr_schedule))
    if checkpoint:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        cbs.append(
            keras.callbacks.ModelCheckpoint(
                str(run_dir / "checkpoints" / "best.keras"), monitor=monitor, save_best_only=True
            )
        )
    if backup:
        cbs.append(keras.callbacks.BackupAndRestore(str(run_dir / "backup"), save_freq=backup_freq))
    if tensorboard:
        if tensorboard_installed():
            cbs.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), profile_batch=0,
                                                   write_graph=False))
        else:
            cbs.append(TensorBoardScalars(run_dir / "logs"))
    if early_stopping_patience is not None:
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=early_stopping_patience, restore_best_weights=True
            )
        )
    return cbs


def find_callback(callbacks: Sequence[keras.callbacks.Callback], kind: type) -> Any:
    """The first callback of type ``kind`` in ``callbacks`` (``None`` if absent)."""
    return next((cb for cb in callbacks if isinstance(cb, kind)), None)


# --------------------------------------------------------------------------- history
def history_frame(
    history: keras.callbacks.History | dict[str, list[float]], run: str | None = None
) -> pd.DataFrame:
    """A ``History`` (or its ``.history`` dict) as a DataFrame with a 1-based ``epoch`` column.

    Epoch numbers come from ``history.epoch``, so a run resumed at epoch 4 is numbered
    4, 5, ... rather than 1, 2, .... ``run`` adds a column naming the run.
    """
    if isinstance(history, keras.callbacks.History):
        data, epochs = history.history, list(history.epoch)
    elif isinstance(history, dict):
        data = history
        n = len(next(iter(data.values()))) if data else 0
        epochs = list(range(n))
    else:
        raise TypeError(f"expected a keras History or a dict of lists, got {type(history).__name__}")
    frame = pd.DataFrame({k: list(v) for k, v in data.items()})
    frame.insert(0, "epoch", [e + 1 for e in epochs][: len(frame)])
    if run is not None:
        frame.insert(0, "run", run)
    return frame.reset_index(drop=True)


def plot_history(
    frame: pd.DataFrame,
    metrics: Sequence[str] = ("loss", "accuracy"),
    title: str = "",
    axes: Sequence[Any] | None = None,
    label: str = "",
    mark_runs: bool = True,
) -> Any:
    """Plot train vs validation curves (one panel per metric) against the epoch number.

    Validation columns are ``val_<metric>``. With a ``run`` column (several ``fit`` calls
    joined) each run gets its own marker and a dashed line marks where a run resumed.
    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    missing = [m for m in metrics if m not in frame]
    if missing:
        raise ValueError(f"history has no column(s) {missing}; it has {list(frame.columns)}")
    if axes is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5))
        axes = np.atleast_1d(axes)
    fig = axes[0].figure
    prefix = f"{label} " if label else ""
    runs = list(dict.fromkeys(frame["run"])) if "run" in frame and mark_runs else [None]
    markers = ["o", "s", "^", "D"]
    for ax, metric in zip(axes, metrics, strict=False):
        for i, run in enumerate(runs):
            part = frame if run is None else frame[frame["run"] == run]
            tag = "" if run is None else f" ({run})"
            m = markers[i % len(markers)]
            ax.plot(part["epoch"], part[metric], marker=m, color="C0", label=f"{prefix}train{tag}")
            if f"val_{metric}" in part:
                ax.plot(part["epoch"], part[f"val_{metric}"], marker=m, color="C1", linestyle="--",
                        label=f"{prefix}validation{tag}")
            if run is not None and i > 0:
                ax.axvline(part["epoch"].min() - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- recipes
def compile_seed_cnn(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Compile like the seed: Adam, sparse categorical cross-entropy, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def test_metrics(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
    """Test loss (mean cross-entropy) and accuracy, computed on the host from ``predict``.

    Both recipes are scored by this one function, on the same uint8 images normalised the
    same way, so their accuracies are comparable. It works with or without a strategy and
    for any number of images (see :func:`utils.evaluation.predict_probs`).
    """
    probs = evaluation.predict_probs(model, x, batch_size).astype(np.float64)
    y = np.asarray(y).reshape(-1)
    picked = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(picked).mean()), float(np.mean(probs.argmax(axis=1) == y))


def _check_data(data: Any) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(data, name):
            raise TypeError(
                f"data must look like utils.data.Cifar10 (x_train, y_train, x_test, y_test); "
                f"missing {name!r} on {type(data).__name__}"
            )
    if len(data.x_train) == 0 or len(data.x_test) == 0:
        raise ValueError("data has an empty train or test split")


def _recipe_result(
    name: str,
    model: keras.Model,
    history: keras.callbacks.History,
    wall: float,
    cpu: float,
    data: Any,
    timer: ThroughputCallback,
    settings: dict,
) -> RecipeResult:
    """Score a trained recipe on the test split the same way for every recipe."""
    test_loss, test_acc = test_metrics(model, data.x_test, data.y_test)
    return RecipeResult(
        name=name,
        model=model,
        history=history_frame(history),
        wall_s=wall,
        cpu_s=cpu,
        test_loss=float(test_loss),
        test_accuracy=float(test_acc),
        images_per_s=timer.mean_images_per_s(),
        settings=settings,
    )


def seed_recipe(
    data: Any,
    *,
    epochs: int = SEED_EPOCHS,
    batch_size: int = SEED_BATCH_SIZE,
    verbose: int | str = 2,
) -> RecipeResult:
    """Train the seed CNN exactly as the seed article does.

    ``x / 255.0`` on uint8 NumPy arrays gives float64 arrays (Keras casts every batch to
    float32 on the way in); ``model.fit(x, y, epochs=10, validation_data=(x_test, y_test))``
    with the default batch of 32, on the default device, no strategy, float32.

    Args:
        data: a :class:`utils.data.Cifar10` (or anything with ``x_train``, ``y_train``,
            ``x_test``, ``y_test``).
        epochs, batch_size: the seed's 10 and 32 unless overridden (smoke mode).
        verbose: passed to ``model.fit`` (2: one line per epoch).
    """
    _check_data(data)
    x_train = data.x_train / 255.0  # float64, as in the seed article
    x_test = data.x_test / 255.0
    with precision_policy("float32"):
        model = compile_seed_cnn(models.build_seed_cnn(name="seed_recipe_cnn"))
    timer = ThroughputCallback(batch_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(
        x_train, data.y_train, epochs=epochs, batch_size=batch_size,
        validation_data=(x_test, data.y_test), callbacks=[timer], verbose=verbose,
    )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return _recipe_result(
        "seed recipe", model, history, wall, cpu, data, timer,
        {"input": "NumPy float64", "batch": batch_size, "precision": "float32",
         "replicas": 1, "validation": "test split"},
    )


def split_validation(
    x: np.ndarray, y: np.ndarray, n_val: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out the *last* ``n_val`` training examples for validation.

    Returns ``(x_train, y_train, x_val, y_val)``.

    Raises:
        ValueError: if ``n_val`` is not in ``[1, len(x) - 1]``.
    """
    if not 0 < n_val < len(x):
        raise ValueError(f"n_val must be between 1 and {len(x) - 1}, got {n_val}")
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


def series_recipe(
    data: Any,
    *,
    epochs: int = SEED_EPOCHS,
    batch_size: int = SERIES_BATCH_SIZE,
    precision: str | bool | None = "auto",
    strategy: tf.distribute.Strategy | None = None,
    run_dir: str | Path | None = None,
    base_lr: float = SERIES_BASE_LR,
    val_fraction: float = 0.1,
    augment: bool = True,
    early_stopping_patience: int | None = 3,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = 2,
    seed: int = 0,
) -> RecipeResult:
    """Train the seed CNN with this series' recipe (see the module docstring).

    Args:
        data: a :class:`utils.data.Cifar10`.
        epochs: maximum epochs (early stopping may end sooner).
        batch_size: the *global* batch; each of the N replicas gets ``batch_size / N``.
        precision: ``"auto"`` (bf16 on CPU, fp16 on GPU), ``"float32"``, or a policy name.
        strategy: defaults to :func:`make_strategy` over all compute devices.
        run_dir: folder for checkpoints, backups and TensorBoard logs (``None``: no
            checkpoint/backup/log callbacks, only throughput, schedule, early stopping).
        base_lr: Adam's peak learning rate (warm-up + cosine schedule).
        val_fraction: share of the training images held out for validation (early
            stopping and checkpoints watch it; the test split is only used at the end).
        augment: random pad-and-crop and flips in the pipeline.
        early_stopping_patience: epochs without ``val_loss`` improvement before stopping.
        extra_callbacks: appended after the standard ones (e.g. :class:`InterruptAtStep`).
        verbose: passed to ``model.fit``.
        seed: shuffle/augmentation seed of the pipeline.

    Raises:
        ValueError: if the global batch does not split evenly over the replicas, or
            ``val_fraction`` leaves no training or validation data.
    """
    _check_data(data)
    policy = resolve_policy(precision)
    strategy = strategy or make_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"global batch {batch_size} does not split evenly over {replicas} replicas; "
            f"use a multiple of {replicas}"
        )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    # a multiple of the replica count, so every validation batch splits evenly
    n_val = max(replicas, int(round(len(data.x_train) * val_fraction / replicas)) * replicas)
    x_tr, y_tr, x_val, y_val = split_validation(data.x_train, data.y_train, n_val)
    if len(x_tr) < batch_size:
        raise ValueError(f"{len(x_tr)} training images is fewer than one batch of {batch_size}")
    train_ds = pipeline.make_dataset(x_tr, y_tr, batch_size, training=True, augment=augment, seed=seed)
    val_ds = pipeline.make_dataset(x_val, y_val, batch_size, training=False)

    with precision_policy(policy), strategy.scope():
        model = compile_seed_cnn(models.build_seed_cnn(name="seed_cnn"), learning_rate=base_lr)
    schedule = warmup_cosine(base_lr, epochs, warmup_epochs=1)
    if run_dir is not None:
        cbs = make_callbacks(run_dir, batch_size=batch_size, lr_schedule=schedule,
                             early_stopping_patience=early_stopping_patience)
    else:
        cbs = make_callbacks(".", batch_size=batch_size, lr_schedule=schedule, checkpoint=False,
                             backup=False, tensorboard=False,
                             early_stopping_patience=early_stopping_patience)
    cbs += list(extra_callbacks)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(train_ds, epochs=epochs, validation_data=val_ds, callbacks=cbs, verbose=verbose)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return _recipe_result(
        "series recipe", model, history, wall, cpu, data, find_callback(cbs, ThroughputCallback),
        {"input": "tf.data pipeline", "batch": batch_size, "precision": policy,
         "replicas": replicas, "validation": f"{n_val:,} held-out train images"},
    )


# --------------------------------------------------------------------------- saved model
def model_path(run_name: str = "04_training", mode: str | None = None) -> Path:
    """Where notebook 04 saves the trained CNN: ``runs/<run_name>/seed_cnn_<mode>.keras``.

    The file name carries the mode (``full``/``smoke``), so a quick smoke run never
    overwrites the model of a full run that notebooks 05 and 10 reload.
    """
    from utils import config

    mode = config.get_mode() if mode is None else mode
    if mode not in config.MODES:
        raise ValueError(f"mode must be one of {config.MODES}, got {mode!r}")
    return config.run_dir(run_name) / f"seed_cnn_{mode}.keras"


def save_model(model: keras.Model, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as ``.keras`` plus a ``<name>.json`` sidecar with ``info`` (mode, accuracy)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"save as a .keras file, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps(info or {}, indent=2, default=str))
    return path


def saved_info(path: str | Path) -> dict[str, Any]:
    """The sidecar written by :func:`save_model` (empty dict if there is none)."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


def load_or_train_cnn(
    data: Any,
    path: str | Path | None = None,
    *,
    strategy: tf.distribute.Strategy | None = None,
    epochs: int | None = None,
    verbose: int | str = 0,
) -> tuple[keras.Model, str]:
    """Load notebook 04's trained CNN, or train a small one if it is missing or mismatched.

    The saved model is used when it exists *and* was trained in the current mode
    (``SERIES_MODE``) on the same kind of data (real or synthetic), according to the
    sidecar written by :func:`save_model`. Otherwise this trains the series' recipe for
    ``epochs`` (default: the mode's ``sizes().epochs``) without callbacks, saves it at
    ``path`` for the next notebook, and says so.

    Args:
        data: the :class:`utils.data.Cifar10` the caller will evaluate on (used for
            training if needed, and to check the saved model matches the data kind).
        path: the ``.keras`` file (default :func:`model_path`).
        strategy: load or build the model inside this strategy's scope, so its
            ``evaluate``/``predict`` run distributed; ``None``: no strategy (one device).
        epochs: epochs if training is needed.
        verbose: passed to ``fit`` if training is needed.

    Returns:
        ``(model, note)``; ``note`` says which happened and is meant to be printed.
    """
    from utils import config

    path = Path(path) if path is not None else model_path()
    info = saved_info(path)
    want = {"mode": config.get_mode(), "synthetic": bool(getattr(data, "is_synthetic", False))}
    if path.exists() and all(info.get(k) == v for k, v in want.items()):
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            model = keras.models.load_model(path)
        acc = info.get("test_accuracy")
        acc_txt = f", test accuracy {acc:.4f} when saved" if isinstance(acc, float) else ""
        return model, f"Loaded the model saved by notebook 04 ({path.name}{acc_txt})."
    if path.exists():
        why = (f"the saved model was trained in mode={info.get('mode')!r} on "
               f"{'synthetic' if info.get('synthetic') else 'real'} data, not "
               f"mode={want['mode']!r} on {'synthetic' if want['synthetic'] else 'real'} data")
    else:
        why = "notebook 04 has not saved a model yet"
    n_epochs = epochs if epochs is not None else config.sizes().epochs
    result = series_recipe(data, epochs=n_epochs, strategy=strategy or make_strategy(),
                           early_stopping_patience=None, verbose=verbose)
    save_model(result.model, path, {**want, "test_accuracy": result.test_accuracy, "recipe": "series",
                                    "epochs": n_epochs, "precision": result.settings["precision"],
                                    "replicas": result.settings["replicas"],
                                    "trained_by": "load_or_train_cnn"})
    model = result.model
    if strategy is None:
        model = keras.models.load_model(path)  # a copy that is not tied to the training strategy
    return model, (f"Trained a new model for {n_epochs} epoch(s) because {why}; saved it as "
                   f"{path.name} (test accuracy {result.test_accuracy:.4f}).")
