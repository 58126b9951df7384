"""Data parallelism with :class:`tf.distribute.MirroredStrategy`: build it, step it, prove it.

Data parallelism keeps a **full copy of the model on every device** (a *replica*) and
splits each *global* batch of ``B`` examples into ``N`` per-replica batches of ``B / N``.
Every replica computes gradients on its own slice; an **all-reduce** sums them, so every
copy applies the same update and the copies never drift apart. Nothing of the model is
split: that is what model parallelism (later notebooks) does.

What this module gives the notebooks:

* :func:`make_strategy`, :func:`strategy_table`: a ``MirroredStrategy`` over
  :func:`utils.devices.compute_devices` (or a subset) and what it runs on.
* :func:`per_replica_batch_size`, :func:`scaled_learning_rate`: batch and learning-rate
  arithmetic.
* :func:`ring_allreduce_bytes`, :func:`allreduce_table`: what the all-reduce moves.
* :func:`make_train_step`: one custom-training-loop step with ``strategy.run`` and
  :func:`tf.nn.compute_average_loss` (or, for the demo, the *wrong* per-replica mean).
* :func:`compare_one_step`, :func:`scaling_table`: one step on ``N`` replicas versus one
  step on one device with the same global batch; the maximum absolute difference of the
  updated weights and the ratio of the update sizes.
* :func:`replica_batches`, :func:`input_pipelines`, :func:`auto_shard_preview`: what each
  replica (and each worker of a multi-worker job) receives from a dataset.

The code runs unchanged on GPUs: it only ever uses the device names it is given.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from utils.devices import compute_devices

SCALINGS = ("global", "per_replica_mean")
DISTRIBUTE_METHODS = ("experimental_distribute_dataset", "distribute_datasets_from_function")
OPTIMIZERS = ("sgd", "adam")
SHARD_POLICIES = ("AUTO", "FILE", "DATA", "OFF")
DEFAULT_TOLERANCE = 1e-5

ModelFn = Callable[[], keras.Model]


# --------------------------------------------------------------------------- strategy


def _device_key(name: str) -> tuple[str, int]:
    try:
        spec = tf.DeviceSpec.from_string(name)
    except ValueError:
        spec = tf.DeviceSpec()
    if spec.device_type is None or spec.device_index is None:
        raise ValueError(
            f"{name!r} is not a device name. Use names such as '/device:CPU:0' or "
            "'/device:GPU:1', as returned by utils.devices.compute_devices()."
        )
    return spec.device_type.upper(), int(spec.device_index)


def make_strategy(devices: Sequence[str] | None = None) -> tf.distribute.MirroredStrategy:
    """A ``MirroredStrategy`` with one replica per device.

    Args:
        devices: device names (default: :func:`utils.devices.compute_devices`, i.e. all
            GPUs, else all logical CPUs). Pass a subset, e.g. ``compute_devices()[:2]``,
            for fewer replicas.

    Raises:
        ValueError: for an empty list, a duplicate, or a name TensorFlow does not know
            (the message lists the devices that exist).
    """
    names = list(compute_devices() if devices is None else devices)
    if not names:
        raise ValueError(
            "make_strategy needs at least one device. Call utils.devices.setup_devices() "
            "first, or pass devices=utils.devices.compute_devices()."
        )
    keys = [_device_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Each device may appear once, got {names}.")
    known = {_device_key(d.name): d.name for d in tf.config.list_logical_devices()}
    unknown = [n for n, k in zip(names, keys, strict=True) if k not in known]
    if unknown:
        raise ValueError(
            f"Unknown device(s) {unknown}. This process has {sorted(known.values())}. "
            "Create logical CPUs with utils.devices.setup_devices(num_cpus=...) before any "
            "other TensorFlow code (restart the kernel to change their number)."
        )
    chosen = [known[k] for k in keys]
    return _mirrored_with_own_keys(chosen)


_KEY_BASES: dict[tuple[str, ...], int] = {}
_KEY_SPACING = 100_000


def _mirrored_with_own_keys(names: list[str]) -> tf.distribute.MirroredStrategy:
    """``MirroredStrategy(names)`` whose collective group keys do not clash with those of a
    strategy over another set of devices in this process.

    Every ``MirroredStrategy`` numbers its collective groups from 1, so a 2-device strategy
    created after a 4-device one fails with "Device ... is joining a group with size 2, but
    that group has size 4". TensorFlow's own tests avoid this by shifting the (private)
    class attribute ``_collective_key_base``; we do the same, one key range per device set.
    """
    # Start at one spacing, never 0: plain MirroredStrategy and DTensor in the same process
    # use the default range from key 1.
    base = _KEY_BASES.setdefault(tuple(names), _KEY_SPACING * (len(_KEY_BASES) + 1))
    cls = tf.distribute.MirroredStrategy
    if not hasattr(cls, "_collective_key_base"):  # pragma: no cover - depends on the TF version
        return cls(names)
    previous = cls._collective_key_base
    cls._collective_key_base = base
    try:
        return cls(names)
    finally:
        cls._collective_key_base = previous


def cross_device_ops_name(strategy: tf.distribute.Strategy) -> str:
    """Class name of the all-reduce implementation the strategy picked.

    TensorFlow 2.21 picks ``CollectiveAllReduce`` for logical CPUs and ``NcclAllReduce``
    for several GPUs. (Read from a private attribute; ``"unknown"`` if that ever moves.)
    """
    ops = getattr(strategy.extended, "_cross_device_ops", None)
    return type(ops).__name__ if ops is not None else "unknown"


def strategy_table(strategy: tf.distribute.Strategy) -> pd.DataFrame:
    """One row per replica: replica id, device, and the all-reduce implementation."""
    workers = list(strategy.extended.worker_devices)
    reduce_name = cross_device_ops_name(strategy)
    return pd.DataFrame(
        {
            "replica": range(len(workers)),
            "device": [tf.DeviceSpec.from_string(d).to_string().split("/")[-1] for d in workers],
            "all-reduce": [reduce_name] * len(workers),
        }
    )


def per_replica_batch_size(global_batch_size: int, num_replicas: int) -> int:
    """``global_batch_size / num_replicas``, which must be a whole number.

    Raises:
        ValueError: for non-positive values or a global batch that does not split evenly
            (the message suggests the nearest global batch sizes that do).
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % num_replicas:
        lower = max(num_replicas, global_batch_size // num_replicas * num_replicas)
        raise ValueError(
            f"A global batch of {global_batch_size} does not split evenly over "
            f"{num_replicas} replicas. Use a multiple of {num_replicas}, e.g. {lower} or "
            f"{lower + num_replicas}."
        )
    return global_batch_size // num_replicas


def scaled_learning_rate(
    base_lr: float, base_batch_size: int, global_batch_size: int, rule: str = "linear"
) -> float:
    """Learning rate for a larger global batch.

    ``linear`` (Goyal et al., 2017): ``lr = base_lr * global / base``; ``sqrt``: ``lr =
    base_lr * sqrt(global / base)`` (often used with Adam). Both need a warm-up when the
    factor is large.

    Raises:
        ValueError: for non-positive inputs or an unknown rule.
    """
    if base_lr <= 0 or base_batch_size < 1 or global_batch_size < 1:
        raise ValueError(
            "base_lr must be > 0 and batch sizes >= 1, got "
            f"base_lr={base_lr}, base_batch_size={base_batch_size}, "
            f"global_batch_size={global_batch_size}"
        )
    factor = global_batch_size / base_batch_size
    if rule == "linear":
        return base_lr * factor
    if rule == "sqrt":
        return base_lr * math.sqrt(factor)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")


# --------------------------------------------------------------------------- all-reduce


def ring_allreduce_bytes(n_bytes: float, num_devices: int) -> float:
    """Bytes each device sends (and receives) in a ring all-reduce of ``n_bytes``.

    A ring all-reduce is a reduce-scatter followed by an all-gather, each of ``N - 1``
    steps moving ``n_bytes / N``: ``2 (N - 1) / N * n_bytes`` per device, nearly
    independent of ``N`` (Patarasuk & Yuan, 2009).

    Raises:
        ValueError: for negative bytes or fewer than one device.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
    return 2.0 * (num_devices - 1) / num_devices * n_bytes


def allreduce_table(
    n_params: int,
    device_counts: Sequence[int] = (1, 2, 4, 8, 16),
    bytes_per_value: int = 4,
    link_gb_per_s: float | None = None,
) -> pd.DataFrame:
    """Gradient traffic per training step for ``n_params`` parameters.

    Columns: devices ``N``; gradient MB; the ring factor ``2(N-1)/N``; MB each device sends
    in a ring all-reduce; MB the busiest device moves if all gradients go through one
    device and back ("reduce to one": ``2 (N-1) x`` gradient bytes); and, given
    ``link_gb_per_s``, the ring's time per step in ms at that bandwidth.
    """
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    if bytes_per_value < 1:
        raise ValueError(f"bytes_per_value must be >= 1, got {bytes_per_value}")
    grad = n_params * bytes_per_value
    rows = []
    for n in device_counts:
        ring = ring_allreduce_bytes(grad, n)
        row = {
            "devices N": n,
            "gradient MB": grad / 1e6,
            "ring factor 2(N-1)/N": 2 * (n - 1) / n,
            "ring: MB sent per device": ring / 1e6,
            "reduce-to-one: MB at busiest device": 2 * (n - 1) * grad / 1e6,
        }
        if link_gb_per_s is not None:
            if link_gb_per_s <= 0:
                raise ValueError(f"link_gb_per_s must be > 0, got {link_gb_per_s}")
            row[f"ring ms at {link_gb_per_s:g} GB/s"] = ring / (link_gb_per_s * 1e9) * 1e3
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- training step


def per_example_loss(labels: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """Sparse categorical cross-entropy per example (shape ``(batch,)``), no reduction."""
    return keras.losses.sparse_categorical_crossentropy(labels, probs)


def replica_loss(per_example: tf.Tensor, global_batch_size: int, scaling: str = "global") -> tf.Tensor:
    """The loss one replica differentiates.

    ``global`` (correct): ``sum(per_example) / global_batch_size`` via
    :func:`tf.nn.compute_average_loss`; summing the replicas' gradients then gives the
    gradient of the global-batch mean. ``per_replica_mean`` (wrong): the mean over the
    replica's own examples; the summed gradient is then ``N`` times too large.
    """
    if scaling == "global":
        return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
    if scaling == "per_replica_mean":
        return tf.reduce_mean(per_example)
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def make_train_step(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    global_batch_size: int,
    *,
    scaling: str = "global",
) -> Callable[[tuple[object, object]], tf.Tensor]:
    """A compiled step for a custom training loop under ``strategy``.

    The returned function takes one element of ``strategy.experimental_distribute_dataset``
    (a pair of per-replica images and labels), runs the forward and backward pass on every
    replica with ``strategy.run``, lets the optimizer all-reduce (sum) the gradients and
    update every copy, and returns the loss summed over replicas, which is the global-batch
    mean for ``scaling="global"``.

    ``model`` and ``optimizer`` must have been created under ``strategy.scope()``.

    Raises:
        ValueError: for an unknown ``scaling``, a non-positive batch size, or a model
            created outside the strategy's scope.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    for v in model.trainable_variables:
        if not strategy.extended.variable_created_in_scope(getattr(v, "value", v)):
            raise ValueError(
                f"Variable {v.path!r} was not created under this strategy's scope. Build "
                "the model and optimizer inside `with strategy.scope():`."
            )
    with strategy.scope():
        optimizer.build(model.trainable_variables)  # optimizer slots live in the scope too

    def step_fn(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = replica_loss(per_example_loss(y, probs), global_batch_size, scaling)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(batch: tuple[object, object]) -> tf.Tensor:
        x, y = batch
        per_replica = strategy.run(step_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """``keras.optimizers.SGD`` or ``Adam`` by name (``"sgd"``, ``"adam"``)."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def time_train_steps(
    strategy: tf.distribute.Strategy,
    model_fn: ModelFn,
    x: np.ndarray,
    y: np.ndarray,
    global_batch_size: int,
    steps: int,
    *,
    warmup: int = 2,
    learning_rate: float = 1e-3,
) -> float:
    """Images/s of :func:`make_train_step` under ``strategy`` (Adam, in-memory batches).

    The input is batched and normalised before timing starts, so only the distributed
    step itself is measured. Use it to compare 1 replica with ``N`` at the same global
    batch.

    Raises:
        ValueError: when ``x`` holds fewer than one global batch, or ``steps < 1``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    if len(x) < global_batch_size:
        raise ValueError(f"Need at least one global batch ({global_batch_size}) of images, got {len(x)}.")
    n = len(x) // global_batch_size * global_batch_size
    ds = tf.data.Dataset.from_tensor_slices((_as_float_images(x[:n]), np.asarray(y[:n]).astype(np.int64)))
    ds = ds.batch(global_batch_size, drop_remainder=True).cache().repeat()
    with quiet_retracing_warning():
        with strategy.scope():
            model = model_fn()
            opt = keras.optimizers.Adam(learning_rate)
        step = make_train_step(strategy, model, opt, global_batch_size)
        batches = iter(strategy.experimental_distribute_dataset(ds))
        for _ in range(warmup):
            float(step(next(batches)))
        start = time.perf_counter()
        loss = None
        for _ in range(steps):
            loss = step(next(batches))
        float(loss)
    return steps * global_batch_size / (time.perf_counter() - start)


# --------------------------------------------------------------------------- one-step proof


@contextlib.contextmanager
def quiet_retracing_warning() -> Iterator[None]:
    """Silence TensorFlow's "triggered tf.function retracing" warning inside the block.

    Each comparison builds a fresh model and a fresh compiled step on purpose; that is
    not the accidental retracing the warning is about.
    """
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class StepComparison:
    """One step on ``num_replicas`` replicas versus one step on one device."""

    method: str  # "custom loop" or "model.fit"
    scaling: str
    optimizer: str
    num_replicas: int
    global_batch_size: int
    max_abs_diff: float  # max |w_replicas - w_one_device| over all updated weights
    tolerance: float
    update_ratio: float  # ||w_replicas - w0|| / ||w_one_device - w0||
    loss_one_device: float  # mean loss of the global batch
    loss_reported: float  # the loss the distributed step returns (summed over replicas)

    @property
    def equal(self) -> bool:
        """True when the updated weights agree within the tolerance."""
        return bool(self.max_abs_diff <= self.tolerance)

    def verdict(self) -> str:
        """Deterministic one-line verdict (no measured numbers): safe for a check cell."""
        return (
            f"{self.method}, {self.scaling} loss scaling, {self.optimizer}: "
            f"{self.num_replicas} replicas x {self.global_batch_size // self.num_replicas} "
            f"vs 1 device x {self.global_batch_size}: updated weights equal within "
            f"{self.tolerance:g}: {self.equal}"
        )


def _as_float_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def _flat(weights: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(w).astype(np.float64) for w in weights])


def _one_device_step(
    model_fn: ModelFn, w0: list[np.ndarray], x: np.ndarray, y: np.ndarray, optimizer: str,
    learning_rate: float, device: str,
) -> tuple[list[np.ndarray], float]:
    with tf.device(device):
        model = model_fn()
        model.set_weights(w0)
        opt = make_optimizer(optimizer, learning_rate)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return model.get_weights(), float(loss)


def compare_one_step(
    model_fn: ModelFn,
    x: np.ndarray,
    y: np.ndarray,
    strategy: tf.distribute.Strategy | None = None,
    *,
    method: str = "custom loop",
    scaling: str = "global",
    optimizer: str = "sgd",
    learning_rate: float = 0.1,
    tolerance: float = DEFAULT_TOLERANCE,
) -> StepComparison:
    """One training step on all replicas of ``strategy`` versus one step on one device.

    Both start from the same weights and see the same global batch ``(x, y)`` (all of it:
    ``len(x)`` is the global batch size ``B``; the strategy hands ``B / N`` examples to
    each replica). With the correct loss scaling the updated weights agree up to float32
    round-off.

    Args:
        model_fn: builds a fresh model (e.g. ``utils.models.build_seed_cnn``); called once
            on one device and once under the strategy's scope. No dropout or other random
            layers, so the forward passes are comparable.
        x, y: the global batch; uint8 images are scaled to [0, 1].
        strategy: default :func:`make_strategy` over all compute devices.
        method: ``"custom loop"`` (:func:`make_train_step`) or ``"model.fit"`` (Keras does
            the loss scaling itself; only ``scaling="global"``).
        scaling: ``"global"`` (correct) or ``"per_replica_mean"`` (the classic bug).
        optimizer: ``"sgd"`` (update proportional to the gradient, so scaling errors show
            one to one) or ``"adam"``.
        tolerance: the maximum absolute weight difference still called equal.

    Raises:
        ValueError: for mismatched or empty inputs, fewer examples than replicas, or an
            unknown method/scaling/optimizer.
    """
    if method not in ("custom loop", "model.fit"):
        raise ValueError(f"method must be 'custom loop' or 'model.fit', got {method!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if method == "model.fit" and scaling != "global":
        raise ValueError("model.fit always scales the loss itself; use method='custom loop'.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    x = _as_float_images(x)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"Need the same non-zero number of images and labels, got {len(x)} and {len(y)}.")
    strategy = make_strategy() if strategy is None else strategy
    n = strategy.num_replicas_in_sync
    batch = len(x)
    if batch < n:
        raise ValueError(f"The global batch ({batch}) must have at least one example per replica ({n}).")

    with quiet_retracing_warning():
        reference = model_fn()
        w0 = reference.get_weights()
        first_device = strategy.extended.worker_devices[0]
        w_one, loss_one = _one_device_step(model_fn, w0, x, y, optimizer, learning_rate, first_device)

        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        with strategy.scope():
            model = model_fn()
            model.set_weights(w0)
            opt = make_optimizer(optimizer, learning_rate)
        if method == "custom loop":
            step = make_train_step(strategy, model, opt, batch, scaling=scaling)
            dist = iter(strategy.experimental_distribute_dataset(dataset))
            loss_reported = float(step(next(dist)))
        else:
            with strategy.scope():
                model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
            hist = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
            loss_reported = float(hist.history["loss"][-1])
        w_n = model.get_weights()

    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_n, w_one, strict=True))
    start = _flat(w0)
    moved_one = np.linalg.norm(_flat(w_one) - start)
    ratio = float(np.linalg.norm(_flat(w_n) - start) / moved_one) if moved_one > 0 else float("nan")
    return StepComparison(
        method=method,
        scaling=scaling,
        optimizer=optimizer,
        num_replicas=n,
        global_batch_size=batch,
        max_abs_diff=diff,
        tolerance=tolerance,
        update_ratio=ratio,
        loss_one_device=loss_one,
        loss_reported=loss_reported,
    )


def comparisons_table(results: Sequence[StepComparison]) -> pd.DataFrame:
    """The measured numbers of several :class:`StepComparison`, one row each."""
    return pd.DataFrame(
        [
            {
                "method": r.method,
                "loss scaling": r.scaling,
                "optimizer": r.optimizer,
                "replicas": r.num_replicas,
                "global batch": r.global_batch_size,
                "max |w_N - w_1|": r.max_abs_diff,
                "tolerance": r.tolerance,
                "equal": r.equal,
                "update size / one device": r.update_ratio,
                "loss (1 device)": r.loss_one_device,
                "loss reported (N replicas)": r.loss_reported,
            }
            for r in results
        ]
    )


def scaling_table(
    model_fn: ModelFn,
    x: np.ndarray,
    y: np.ndarray,
    strategy: tf.distribute.Strategy | None = None,
    *,
    optimizers: Sequence[str] = OPTIMIZERS,
    learning_rates: dict[str, float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[pd.DataFrame, list[StepComparison]]:
    """Correct versus wrong loss scaling, for each optimizer: the table and the results.

    With SGD the wrong scaling makes the update exactly ``N`` times too large (an ``N``
    times larger learning rate, silently). Adam divides by the gradient's running RMS, so
    its first step barely changes; the reported loss is still ``N`` times too large.
    """
    strategy = make_strategy() if strategy is None else strategy
    lrs = {"sgd": 0.1, "adam": 1e-3, **(learning_rates or {})}
    results = [
        compare_one_step(
            model_fn, x, y, strategy, scaling=s, optimizer=o, learning_rate=lrs[o], tolerance=tolerance
        )
        for o in optimizers
        for s in SCALINGS
    ]
    return comparisons_table(results), results


# --------------------------------------------------------------------------- data to replicas


def _ids(values: tf.Tensor) -> str:
    arr = np.asarray(values).reshape(-1)
    return " ".join(str(int(v)) for v in arr) if arr.size else "(empty)"


def replica_batches(
    strategy: tf.distribute.Strategy,
    n_examples: int,
    global_batch_size: int,
    *,
    method: str = "experimental_distribute_dataset",
    drop_remainder: bool = False,
    max_steps: int | None = None,
) -> pd.DataFrame:
    """What each replica receives, shown with a dataset of example ids ``0 .. n-1``.

    ``experimental_distribute_dataset`` takes a dataset batched by the *global* batch size
    and splits every batch over the replicas. ``distribute_datasets_from_function`` calls
    your function once per input pipeline (once per worker) with a
    :class:`tf.distribute.InputContext`; the function batches by the *per-replica* size and
    the strategy deals consecutive batches to the replicas.

    Returns:
        One row per (step, replica): step, replica, device, batch size and example ids.

    Raises:
        ValueError: for an unknown method or non-positive sizes.
    """
    if method not in DISTRIBUTE_METHODS:
        raise ValueError(f"method must be one of {DISTRIBUTE_METHODS}, got {method!r}")
    if n_examples < 1 or global_batch_size < 1:
        raise ValueError(
            f"n_examples and global_batch_size must be >= 1, got {n_examples} and {global_batch_size}"
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    if method == "experimental_distribute_dataset":
        ds = tf.data.Dataset.range(n_examples).batch(global_batch_size, drop_remainder=drop_remainder)
        dist = strategy.experimental_distribute_dataset(ds.with_options(options))
    else:

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            ds = tf.data.Dataset.range(n_examples).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
            return ds.batch(per_replica, drop_remainder=drop_remainder).with_options(options)

        dist = strategy.distribute_datasets_from_function(dataset_fn)

    devices = [tf.DeviceSpec.from_string(d).to_string().split("/")[-1] for d in strategy.extended.worker_devices]
    rows = []
    for step, per_replica in enumerate(dist):
        if max_steps is not None and step >= max_steps:
            break
        for replica, values in enumerate(strategy.experimental_local_results(per_replica)):
            rows.append(
                {
                    "step": step,
                    "replica": replica,
                    "device": devices[replica],
                    "batch size": int(np.asarray(values).size),
                    "example ids": _ids(values),
                }
            )
    return pd.DataFrame(rows)


def input_pipelines(
    num_workers: int, replicas_per_worker: int, n_examples: int, global_batch_size: int
) -> pd.DataFrame:
    """What ``distribute_datasets_from_function`` hands each worker of a multi-worker job.

    Builds the :class:`tf.distribute.InputContext` each worker's function receives and
    applies the usual recipe (``shard(num_input_pipelines, input_pipeline_id)``, then batch
    by ``get_per_replica_batch_size``). Nothing multi-worker runs: this is the public
    contract, evaluated here.
    """
    for what, v in (("num_workers", num_workers), ("replicas_per_worker", replicas_per_worker)):
        if v < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    total = num_workers * replicas_per_worker
    per_replica_batch_size(global_batch_size, total)
    rows = []
    for worker in range(num_workers):
        ctx = tf.distribute.InputContext(
            num_input_pipelines=num_workers, input_pipeline_id=worker, num_replicas_in_sync=total
        )
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        ds = tf.data.Dataset.range(n_examples).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        batches = [_ids(b) for b in ds.batch(per_replica)]
        rows.append(
            {
                "worker (input_pipeline_id)": worker,
                "per-replica batch": per_replica,
                "examples this worker reads": len(list(ds)),
                "first batches": " | ".join(batches[:replicas_per_worker]),
            }
        )
    return pd.DataFrame(rows)


def write_id_files(folder: str | os.PathLike[str], n_files: int, per_file: int) -> list[str]:
    """Write ``n_files`` TFRecord files of int64 example ids (file ``f`` holds
    ``f*per_file .. (f+1)*per_file-1``) for the auto-shard demo. Returns their paths."""
    if n_files < 1 or per_file < 1:
        raise ValueError(f"n_files and per_file must be >= 1, got {n_files} and {per_file}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        path = folder / f"ids-{f:03d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i in range(f * per_file, (f + 1) * per_file):
                feature = {"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        paths.append(str(path))
    return paths


def id_file_dataset(paths: Sequence[str]) -> tf.data.Dataset:
    """A dataset of the ids in files written by :func:`write_id_files` (files in order)."""
    spec = {"id": tf.io.FixedLenFeature([], tf.int64)}
    return tf.data.TFRecordDataset(list(paths)).map(lambda r: tf.io.parse_single_example(r, spec)["id"])


def _first_sentence(message: str) -> str:
    text = re.sub(r"\{\{.*?\}\}\s*", "", str(message)).strip()
    text = text.split("\n")[0].replace(": goo.gle/debugonly", "")
    return text.split(". ")[0].strip()


def auto_shard_preview(
    dataset: tf.data.Dataset, policy: str, num_workers: int, *, num_replicas: int | None = None
) -> pd.DataFrame:
    """What each worker of a ``num_workers`` job would read under an auto-shard policy.

    Applies the same graph rewrite that ``MultiWorkerMirroredStrategy`` applies to a
    dataset passed to ``experimental_distribute_dataset`` (TensorFlow's private
    ``_AutoShardDataset``), in this one process. ``FILE`` gives each worker whole files and
    fails for a dataset that does not read files; ``DATA`` lets every worker read
    everything and keep every ``num_workers``-th element; ``AUTO`` tries ``FILE`` and falls
    back to ``DATA``; ``OFF`` gives every worker everything (duplicates!).

    Returns:
        One row per worker: worker, number of elements and the elements (or the error).
    """
    policy = policy.upper()
    if policy not in SHARD_POLICIES:
        raise ValueError(f"policy must be one of {SHARD_POLICIES}, got {policy!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    try:
        from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset
    except ImportError as err:  # pragma: no cover - depends on the TF version
        raise RuntimeError(
            "This TensorFlow version no longer exposes _AutoShardDataset; run the dataset "
            "under a real MultiWorkerMirroredStrategy instead (see notebook 08)."
        ) from err
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(
        tf.data.experimental.AutoShardPolicy, policy
    )
    rows = []
    for worker in range(num_workers):
        try:
            sharded = _AutoShardDataset(dataset.with_options(options), num_workers, worker, num_replicas)
            got = [_ids(e) for e in sharded]
            ids = " ".join(got) if got else "(none)"
            rows.append({"policy": policy, "worker": worker, "elements": len(got), "ids": ids})
        except tf.errors.OpError as err:
            reason = _first_sentence(err.message)
            rows.append({"policy": policy, "worker": worker, "elements": 0, "ids": f"error: {reason}"})
    return pd.DataFrame(rows)
