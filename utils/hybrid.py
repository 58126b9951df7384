"""Hybrid (2-D) parallelism with DTensor: a CNN and a small transformer on a batch x model mesh.

Two models, both written as :class:`tf.Module` objects whose weights are DTensor
``DVariable`` objects (Keras 3 layers do not take DTensor layouts):

:class:`HybridCNN`
    The seed CNN with a widened dense head (:func:`widened_cnn`). The convolutional trunk is
    *data-parallel*: its weights are replicated on every device and its activations are
    split over the mesh dim ``"batch"``. The head is *tensor-parallel* over ``"model"``:
    ``dense1`` is column-parallel, ``output`` row-parallel
    (:class:`utils.tensor_parallel.ColumnParallelDense` / ``RowParallelDense``).

:class:`TransformerLM`
    A small decoder-only transformer (pre-norm blocks: causal multi-head attention and a
    GELU MLP, tied embeddings). On a mesh it is sharded the Megatron-LM way (Shoeybi et al.
    2019): attention heads are split over ``"model"`` (query/key/value projections
    column-parallel by head, the output projection row-parallel), the MLP is column- then
    row-parallel, so each block needs one all-reduce in its attention and one in its MLP.
    Without a mesh the same code runs unsharded on one device, optionally with
    ``tf.recompute_grad`` per block and a bfloat16/float16 compute dtype.
    :func:`keras_block` builds an independent Keras reference of one block
    (``keras.layers.MultiHeadAttention``) to prove the sharded block equal to it.

Also here: a DTensor-aware optimizer that reproduces Keras 3's SGD, momentum and Adam
updates (:class:`Optimizer`), training and evaluation loops, per-device byte accounting from
actual shard shapes, a pure data-parallel Keras reference (``MirroredStrategy``), a
download-free character corpus (docstrings of the Python standard library), and peak-memory
/ speed measurement of one training step (:func:`measure_step`).

On a CPU-only machine the mesh devices are logical CPUs that share the same cores, and all
of them share one allocator: the layouts and the numerics are real, the speed-ups are not.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow.experimental import dtensor

from utils import devices as _devices
from utils import memory as _memory
from utils import models as _models
from utils import tensor_parallel as tp
from utils import training as _training

BATCH_DIM = tp.BATCH_DIM
MODEL_DIM = tp.MODEL_DIM

__all__ = [
    "BATCH_DIM",
    "MODEL_DIM",
    "mesh_shapes",
    "hybrid_mesh",
    "widened_cnn",
    "HybridCNN",
    "Optimizer",
    "make_train_step",
    "make_grad_fn",
    "batch_to_mesh",
    "train",
    "evaluate",
    "predict_logits",
    "state_bytes",
    "mesh_comparison",
    "keras_data_parallel_steps",
    "hybrid_steps",
    "StepTrace",
    "TransformerConfig",
    "init_transformer_weights",
    "transformer_layouts",
    "TransformerLM",
    "keras_block",
    "block_weights_to_keras",
    "keras_block_variables",
    "compare_block",
    "relative_diff",
    "text_corpus",
    "CharTokenizer",
    "CORPUS_ALPHABET",
    "random_windows",
    "train_lm",
    "lm_loss",
    "StepStats",
    "memory_stats_available",
    "measure_step",
    "keras_grad_step",
    "compare_variants",
    "quiet_tf_logs",
]


# =============================================================================== meshes


def mesh_shapes(n_devices: int) -> list[tuple[int, int]]:
    """Every ``(batch, model)`` shape that uses exactly ``n_devices`` devices.

    >>> mesh_shapes(4)
    [(4, 1), (2, 2), (1, 4)]
    """
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a whole number >= 1, got {n_devices!r}.")
    return [(n_devices // m, m) for m in range(1, n_devices + 1) if n_devices % m == 0]


def hybrid_mesh(
    batch: int,
    model: int,
    devices: Sequence[str] | None = None,
    batch_dim: str = BATCH_DIM,
    model_dim: str = MODEL_DIM,
) -> dtensor.Mesh:
    """A 2-D DTensor mesh ``batch x model`` over all of ``devices``.

    Args:
        batch: devices along ``batch_dim`` (data parallelism).
        model: devices along ``model_dim`` (tensor parallelism).
        devices: device names; default :func:`utils.devices.compute_devices` (GPUs if
            present, else the logical CPUs).

    Raises:
        ValueError: if ``batch * model`` is not the number of devices; the message lists the
            shapes that fit.
    """
    for what, v in ((batch_dim, batch), (model_dim, model)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"Mesh dim {what!r} needs a whole-number size >= 1, got {v!r}.")
    chosen = list(_devices.compute_devices() if devices is None else devices)
    n = len(chosen)
    if batch * model != n:
        fits = ", ".join(f"{b}x{m}" for b, m in mesh_shapes(n)) if n else "none"
        raise ValueError(
            f"A {batch_dim}={batch} x {model_dim}={model} mesh needs {batch * model} devices, "
            f"but {n} are available. Shapes (batch x model) that fit {n} devices: {fits}. "
            "On a CPU-only machine you can instead restart the kernel with "
            f"`export SERIES_NUM_CPUS={batch * model}` before utils.devices.setup_devices()."
        )
    return tp.create_mesh([(batch_dim, int(batch)), (model_dim, int(model))], devices=chosen)


def _mesh_str(mesh: dtensor.Mesh) -> str:
    return " x ".join(f"{d}={mesh.dim_size(d)}" for d in mesh.dim_names)


def batch_to_mesh(
    mesh: dtensor.Mesh, *arrays: np.ndarray, batch_dim: str = BATCH_DIM
) -> tuple[tf.Tensor, ...]:
    """Shard each array on its first axis over ``batch_dim`` (replicated over other dims).

    Raises:
        ValueError: if a batch does not split evenly over ``batch_dim``.
    """
    out = []
    for a in arrays:
        a = np.asarray(a)
        out.append(tp.shard(a, tp.layout(mesh, batch_dim, *([None] * (a.ndim - 1)))))
    return tuple(out)


# ================================================================================= CNN

CONV_LAYERS = ("conv1", "conv2", "conv3")
HEAD_LAYERS = ("dense1", "output")


def widened_cnn(head_units: int = 1024, name: str = "widened_cnn") -> keras.Model:
    """The seed CNN (``utils.models.build_seed_cnn``) with ``dense1`` widened to ``head_units``.

    Only the head changes: the conv trunk keeps 32/64/128 filters. At 1,024 units the head
    holds about 2.1M of the model's 2.2M parameters: the part worth splitting.
    """
    if isinstance(head_units, bool) or not isinstance(head_units, int) or head_units < 1:
        raise ValueError(f"head_units must be a whole number >= 1, got {head_units!r}.")
    config = _models.build_seed_cnn().get_config()
    config["name"] = name
    for layer in config["layers"]:
        layer.pop("build_config", None)  # shapes change with the head; rebuild below
        if layer.get("config", {}).get("name") == "dense1":
            layer["config"]["units"] = head_units
    model = keras.Sequential.from_config(config)
    model.build((None, 32, 32, 3))
    return model


class HybridCNN(tf.Module):
    """The (widened) seed CNN on a ``batch x model`` mesh.

    Layouts (``b`` = ``batch_dim``, ``m`` = ``model_dim``):

    ================  =====================  ======================
    tensor            weights                activations
    ================  =====================  ======================
    conv1..conv3      replicated             ``[b, ., ., .]``
    dense1 (column)   kernel ``[., m]``      ``[b, m]``
    output (row)      kernel ``[m, .]``      ``[b, .]`` (all-reduce)
    ================  =====================  ======================

    Inputs are float images in [0, 1] with layout ``[b, ., ., .]``; the module returns
    logits (the Keras model's softmax is left to the loss).
    """

    def __init__(
        self,
        weights: Mapping[str, Sequence[np.ndarray]],
        mesh: dtensor.Mesh,
        *,
        batch_dim: str = BATCH_DIM,
        model_dim: str = MODEL_DIM,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        missing = [k for k in (*CONV_LAYERS, *HEAD_LAYERS) if k not in weights]
        if missing:
            raise ValueError(
                f"weights lacks layers {missing}; expected keys {CONV_LAYERS + HEAD_LAYERS}."
            )
        for dim in (batch_dim, model_dim):
            if dim not in mesh.dim_names:
                raise ValueError(
                    f"Mesh {_mesh_str(mesh)} has no dim {dim!r}; build it with hybrid_mesh()."
                )
        self.mesh = mesh
        self.batch_dim = batch_dim
        self.model_dim = model_dim
        self.convs: list[tuple[tf.Variable, tf.Variable]] = []
        with self.name_scope:
            for lname in CONV_LAYERS:
                k, b = (np.asarray(w, np.float32) for w in weights[lname])
                self.convs.append(
                    (
                        dtensor.DVariable(
                            tp.shard(k, tp.replicated(mesh, 4)), name=f"{lname}/kernel"
                        ),
                        dtensor.DVariable(
                            tp.shard(b, tp.replicated(mesh, 1)), name=f"{lname}/bias"
                        ),
                    )
                )
        common = {"model_dim": model_dim, "batch_dim": batch_dim}
        k1, b1 = weights["dense1"]
        k2, b2 = weights["output"]
        self.dense1 = tp.ColumnParallelDense(
            k1, b1, mesh, activation="relu", name="dense1", **common
        )
        self.output = tp.RowParallelDense(k2, b2, mesh, name="output", **common)
        self.head_units = self.dense1.units

    @classmethod
    def from_keras(cls, model: keras.Model, mesh: dtensor.Mesh, **kwargs: Any) -> HybridCNN:
        """Copy a built :func:`widened_cnn` (or seed CNN) onto ``mesh``."""
        names = {layer.name for layer in model.layers}
        missing = [n for n in (*CONV_LAYERS, *HEAD_LAYERS) if n not in names]
        if missing:
            raise ValueError(
                f"Model {model.name!r} lacks layers {missing}; use utils.hybrid.widened_cnn() "
                "or utils.models.build_seed_cnn()."
            )
        weights = {n: model.get_layer(n).get_weights() for n in (*CONV_LAYERS, *HEAD_LAYERS)}
        return cls(weights, mesh, **kwargs)

    @property
    def input_layout(self) -> dtensor.Layout:
        """``[batch, ., ., .]``: each batch row of the mesh gets its own images."""
        return tp.layout(self.mesh, self.batch_dim, None, None, None)

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """Logits ``[B, 10]`` with layout ``[batch, unsharded]``."""
        h = images
        for i, (k, b) in enumerate(self.convs):
            h = tf.nn.relu(tf.nn.conv2d(h, k, strides=1, padding="VALID") + b)
            if i < 2:
                h = tf.nn.max_pool2d(h, 2, 2, "VALID")
        h = tf.reshape(h, [tf.shape(h)[0], -1])
        return self.output(self.dense1(h))

    def activations(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """Every intermediate tensor of a forward pass, for layout tables."""
        out = {"input images": images}
        h = images
        for i, (k, b) in enumerate(self.convs):
            h = tf.nn.relu(tf.nn.conv2d(h, k, strides=1, padding="VALID") + b)
            out[f"{CONV_LAYERS[i]} output"] = h
            if i < 2:
                h = tf.nn.max_pool2d(h, 2, 2, "VALID")
        h = tf.reshape(h, [tf.shape(h)[0], -1])
        out["flatten"] = h
        hidden = self.dense1(h)
        out["dense1 output"] = hidden
        out["logits"] = self.output(hidden)
        return out

    def weights(self) -> dict[str, tf.Variable]:
        """All weights by name, in Keras order."""
        out: dict[str, tf.Variable] = {}
        for lname, (k, b) in zip(CONV_LAYERS, self.convs, strict=True):
            out[f"{lname}/kernel"] = k
            out[f"{lname}/bias"] = b
        out.update(self.dense1.weights())
        out.update(self.output.weights())
        return out

    def get_weights(self) -> list[np.ndarray]:
        """Gathered weights in Keras order (``model.set_weights`` accepts them)."""
        return [tp.to_numpy(v) for v in self.weights().values()]


# =========================================================================== optimizer


class Optimizer(tf.Module):
    """SGD, SGD with momentum, or Adam, with Keras 3's exact update rules, for DTensors.

    Every slot variable gets the layout of its weight, so a weight split over ``model``
    has its momentum/velocity split the same way (optimizer memory shrinks with it) and the
    update runs shard by shard with no communication. Ordinary variables work too.

    Keras 3 formulas (defaults as in Keras): SGD ``w -= lr g``; momentum
    ``m = mu m - lr g; w += m``; Adam ``m += (g - m)(1-b1); v += (g^2 - v)(1-b2);
    w -= lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps)``.
    """

    KINDS = ("sgd", "momentum", "adam")

    def __init__(
        self,
        kind: str = "adam",
        learning_rate: float = 1e-3,
        *,
        momentum: float = 0.9,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if kind not in self.KINDS:
            raise ValueError(f"Unknown optimizer {kind!r}; choose one of {self.KINDS}.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
        self.kind = kind
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.slots: dict[str, list[tf.Variable]] = {}
        self.iterations: tf.Variable | None = None
        self._built_for: tuple[int, ...] | None = None

    @property
    def slot_names(self) -> tuple[str, ...]:
        """``()`` for SGD, ``("momentum",)``, or ``("m", "v")`` for Adam."""
        return {"sgd": (), "momentum": ("momentum",), "adam": ("m", "v")}[self.kind]

    def build(self, variables: Sequence[tf.Variable]) -> None:
        """Create zeroed slots laid out like ``variables`` (call once, before training)."""
        ids = tuple(id(v) for v in variables)
        if self._built_for is not None:
            if ids != self._built_for:
                raise ValueError("This Optimizer was built for other variables; make a new one.")
            return
        self._built_for = ids
        mesh = None
        with self.name_scope:
            for slot in self.slot_names:
                self.slots[slot] = [
                    _zeros_like_var(v, f"{slot}_{i}") for i, v in enumerate(variables)
                ]
            for v in variables:
                if _is_dtensor(v):
                    mesh = dtensor.fetch_layout(v).mesh
                    break
            if mesh is not None:
                self.iterations = dtensor.DVariable(
                    tp.shard(np.zeros((), np.float32), tp.replicated(mesh, 0)), name="iterations"
                )
            else:
                with tf.device(variables[0].device if variables else None):
                    self.iterations = tf.Variable(0.0, name="iterations")

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        """One update of ``variables`` with ``grads`` (call inside ``tf.function``)."""
        if self.iterations is None:
            raise RuntimeError("Call optimizer.build(variables) before apply().")
        lr = self.learning_rate
        if self.kind == "adam":
            t = self.iterations + 1.0
            alpha = lr * tf.sqrt(1.0 - tf.pow(self.beta_2, t)) / (1.0 - tf.pow(self.beta_1, t))
        for i, (g, v) in enumerate(zip(grads, variables, strict=True)):
            if g is None:
                raise ValueError(f"No gradient for variable {v.name}; is it used by the loss?")
            if self.kind == "sgd":
                v.assign_sub(g * lr)
            elif self.kind == "momentum":
                # New slot values are computed as tensors and used directly: reading a
                # DVariable right after assigning it may see the old value.
                slot = self.slots["momentum"][i]
                m = slot * self.momentum - g * lr
                slot.assign(m)
                v.assign_add(m)
            else:
                m_slot, v_slot = self.slots["m"][i], self.slots["v"][i]
                m = m_slot + (g - m_slot) * (1.0 - self.beta_1)
                s = v_slot + (tf.square(g) - v_slot) * (1.0 - self.beta_2)
                m_slot.assign(m)
                v_slot.assign(s)
                v.assign_sub((m * alpha) / (tf.sqrt(s) + self.epsilon))
        self.iterations.assign_add(1.0)

    def slot_variables(self) -> dict[str, tf.Variable]:
        """Slots by name (``m_3``, ``v_3``, ...), for byte tables."""
        return {f"{slot}_{i}": v for slot, vs in self.slots.items() for i, v in enumerate(vs)}

    def to_keras(self) -> keras.optimizers.Optimizer:
        """The Keras optimizer with the same update rule and hyper-parameters."""
        if self.kind == "adam":
            return keras.optimizers.Adam(
                self.learning_rate, beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon
            )
        return keras.optimizers.SGD(
            self.learning_rate, momentum=self.momentum if self.kind == "momentum" else 0.0
        )


@contextlib.contextmanager
def quiet_tf_logs(level: str = "ERROR") -> Iterator[None]:
    """Raise TensorFlow's Python logger to ``level`` inside the block (restored after).

    Hides ``MirroredStrategy``'s INFO lines and the retracing warnings that comparing
    several freshly traced variants of one step triggers.
    """
    logger = tf.get_logger()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _is_dtensor(v: Any) -> bool:
    try:
        return bool(dtensor.is_dtensor(v.read_value() if isinstance(v, tf.Variable) else v))
    except Exception:  # noqa: BLE001 - dtensor raises for some non-tensors
        return False


def _zeros_like_var(v: tf.Variable, name: str) -> tf.Variable:
    zeros = np.zeros(v.shape.as_list(), v.dtype.as_numpy_dtype)
    if _is_dtensor(v):
        return dtensor.DVariable(tp.shard(zeros, dtensor.fetch_layout(v)), name=name)
    with tf.device(v.device):
        return tf.Variable(zeros, name=name)


# ============================================================================ training


def make_grad_fn(
    module: Callable[[tf.Tensor], tf.Tensor],
    variables: Sequence[tf.Variable],
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] = tp.sparse_cross_entropy,
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, list[tf.Tensor]]]:
    """A compiled ``fn(x, y) -> (loss, grads)``; every gradient has its weight's layout."""

    @tf.function
    def grad_fn(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = loss_fn(module(x), y)
        return loss, tape.gradient(loss, list(variables))

    return _quiet_first_call(grad_fn)


def _quiet_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with TensorFlow's logs quieted during its first call (the trace).

    Every model gets its own freshly traced step function, built from the same Python code;
    TensorFlow counts those traces together and warns about "retracing", which is expected
    here.
    """
    first = [True]

    def wrapper(*args: Any) -> Any:
        if first[0]:
            first[0] = False
            with quiet_tf_logs():
                return fn(*args)
        return fn(*args)

    wrapper.__doc__ = fn.__doc__
    return wrapper


def make_train_step(
    module: tf.Module,
    optimizer: Optimizer,
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] = tp.sparse_cross_entropy,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A compiled ``step(x, y) -> loss``: forward, backward, optimizer update.

    With DTensor inputs (:func:`batch_to_mesh`) the gradients of replicated weights are
    all-reduced over ``batch`` by DTensor itself (data parallelism), those of sharded weights
    stay sharded (tensor parallelism).
    """
    variables = list(module.trainable_variables)
    if not variables:
        raise ValueError(f"Module {module.name!r} has no trainable variables.")
    optimizer.build(variables)

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(module(x), y)
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return _quiet_first_call(step)


def _scale(images: np.ndarray) -> np.ndarray:
    return (
        images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    )


def _check_batch(batch_size: int, mesh: dtensor.Mesh, batch_dim: str) -> None:
    n = mesh.dim_size(batch_dim)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} does not split over {batch_dim}={n}; use a multiple of {n}."
        )


def train(
    net: HybridCNN,
    optimizer: Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    seed: int = 0,
    log_every: int = 50,
    eval_fn: Callable[[], float] | None = None,
) -> pd.DataFrame:
    """Train ``net`` for ``steps`` steps on shuffled mini-batches of ``(x, y)``.

    Returns one row per ``log_every`` steps: step, mean training loss since the last row,
    images/s over that span and, if given, ``eval_fn()`` (e.g. test accuracy).
    """
    _check_batch(batch_size, net.mesh, net.batch_dim)
    if len(x) < batch_size:
        raise ValueError(f"Need at least batch_size={batch_size} examples, got {len(x)}.")
    step_fn = make_train_step(net, optimizer)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    pos = 0
    rows = []
    losses: list[tf.Tensor] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        xb, yb = batch_to_mesh(
            net.mesh, _scale(x[idx]), y[idx].astype(np.int32), batch_dim=net.batch_dim
        )
        losses.append(step_fn(xb, yb))
        if step % log_every == 0 or step == steps:
            loss = float(np.mean([tp.to_numpy(v) for v in losses]))
            seconds = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "images/s": len(losses) * batch_size / seconds}
            if eval_fn is not None:
                row["test accuracy"] = eval_fn()
            rows.append(row)
            losses = []
            t0 = time.perf_counter()
    return pd.DataFrame(rows)


def predict_logits(net: HybridCNN, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits for all of ``x``, computed on the mesh batch by batch (last batch padded)."""
    n_batch = net.mesh.dim_size(net.batch_dim)
    batch_size = max(n_batch, batch_size - batch_size % n_batch)
    fn = tf.function(net.__call__)
    outs = []
    for start in range(0, len(x), batch_size):
        xb = _scale(x[start : start + batch_size])
        n = len(xb)
        pad = (-n) % n_batch
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), np.float32)])
        (xd,) = batch_to_mesh(net.mesh, xb, batch_dim=net.batch_dim)
        outs.append(tp.to_numpy(fn(xd))[:n])
    return np.concatenate(outs)


def evaluate(net: HybridCNN, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Accuracy of ``net`` on ``(x, y)``."""
    return float(np.mean(np.argmax(predict_logits(net, x, batch_size), axis=1) == y))


def state_bytes(
    variables: Mapping[str, Any],
    grads: Sequence[tf.Tensor],
    optimizer: Optimizer,
) -> pd.DataFrame:
    """Bytes each device stores for parameters, gradients and optimizer slots.

    Counted from the shapes of the shards actually held on each device
    (:func:`utils.tensor_parallel.shard_shapes`), one row per device.
    """

    def per_device(tensors: Sequence[Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in tensors:
            size = tf.as_dtype(t.dtype).size
            for device, shape in tp.shard_shapes(t):
                out[device] = out.get(device, 0) + math.prod(shape) * size
        return out

    params = per_device(list(variables.values()))
    grad_b = per_device(list(grads))
    opt_b = per_device(list(optimizer.slot_variables().values()))
    rows = []
    for device in params:
        p, g, o = params[device], grad_b.get(device, 0), opt_b.get(device, 0)
        rows.append({"device": device, "params": p, "grads": g, "optimizer": o, "total": p + g + o})
    return pd.DataFrame(rows)


def mesh_comparison(
    model: keras.Model,
    shapes: Sequence[tuple[int, int]],
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 128,
    bench_steps: int = 20,
    optimizer: Callable[[], Optimizer] = lambda: Optimizer("adam", 1e-3),
    devices: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-device state bytes (from shard shapes) and measured images/s for each mesh shape.

    For every ``(batch, model)`` shape: shard ``model`` onto the mesh, run one gradient
    computation and one optimizer step to create every buffer, read the bytes of each
    device's parameter, gradient and optimizer shards (the table reports the fullest
    device), then time ``bench_steps`` training steps on pre-sharded batches (the input
    pipeline is not timed).
    """
    if isinstance(bench_steps, bool) or not isinstance(bench_steps, int) or bench_steps < 1:
        raise ValueError(f"bench_steps must be a whole number >= 1, got {bench_steps!r}.")
    rows = []
    for b, m in shapes:
        mesh = hybrid_mesh(b, m, devices)
        _check_batch(batch_size, mesh, BATCH_DIM)
        net = HybridCNN.from_keras(model, mesh)
        opt = optimizer()
        step = make_train_step(net, opt)
        batches = [
            batch_to_mesh(mesh, _scale(x[i * batch_size : (i + 1) * batch_size]),
                          y[i * batch_size : (i + 1) * batch_size].astype(np.int32))
            for i in range(min(4, max(1, len(x) // batch_size)))
        ]  # fmt: skip
        _, grads = make_grad_fn(net, list(net.trainable_variables))(*batches[0])
        step(*batches[0])  # traces; creates every buffer
        table = state_bytes(net.weights(), grads, opt)
        fullest = table.loc[table["total"].idxmax()]
        tp.to_numpy(step(*batches[0]))
        t0 = time.perf_counter()
        loss = None
        for i in range(bench_steps):
            loss = step(*batches[i % len(batches)])
        tp.to_numpy(loss)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "mesh (batch x model)": f"{b}x{m}",
                "params bytes/device": int(fullest["params"]),
                "grads bytes/device": int(fullest["grads"]),
                "optimizer bytes/device": int(fullest["optimizer"]),
                "total bytes/device": int(fullest["total"]),
                "images/s": bench_steps * batch_size / seconds,
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class StepTrace:
    """Losses and weights of the first steps of a run: ``weights[k]`` is after step ``k+1``."""

    losses: list[float]
    weights: list[list[np.ndarray]]

    def max_weight_diff(self, other: StepTrace) -> list[float]:
        """Largest absolute weight difference to ``other`` after each step."""
        return [
            max(float(np.max(np.abs(a - b))) for a, b in zip(wa, wb, strict=True))
            for wa, wb in zip(self.weights, other.weights, strict=True)
        ]

    def max_loss_diff(self, other: StepTrace) -> float:
        """Largest absolute difference of the per-step losses."""
        return max(abs(a - b) for a, b in zip(self.losses, other.losses, strict=True))


def keras_data_parallel_steps(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    optimizer: Optimizer,
    devices: Sequence[str] | None = None,
) -> StepTrace:
    """Pure data parallelism, the Keras way: ``MirroredStrategy`` and ``model.fit``.

    Copies ``model`` (same weights) under a ``MirroredStrategy`` over ``devices``
    (default: all compute devices), compiles it with ``optimizer.to_keras()`` and sparse
    cross-entropy, and runs ``steps`` steps on the consecutive batches
    ``x[i*batch_size:(i+1)*batch_size]``. Returns each step's loss and the weights after
    each step. ``model`` itself is not changed. On CPUs the replicas' gradients are summed
    with ``ReductionToOneDevice`` (see :func:`utils.training.make_strategy`).
    """
    n = steps * batch_size
    if len(x) < n:
        raise ValueError(f"{steps} steps of {batch_size} need {n} examples, got {len(x)}.")
    running: list[float] = []
    weights: list[list[np.ndarray]] = []

    def record(batch: int, logs: Mapping[str, Any]) -> None:
        running.append(float(logs["loss"]))
        weights.append(ref.get_weights())

    with quiet_tf_logs():
        # make_strategy combines CPU replicas with ReductionToOneDevice: collective
        # all-reduces would clash with the collective groups DTensor created in this process.
        strategy = _training.make_strategy(devices)
        with strategy.scope():
            ref = keras.models.clone_model(model)
            ref.build((None, *model.input_shape[1:]))
            ref.set_weights(model.get_weights())
            ref.compile(optimizer=optimizer.to_keras(), loss="sparse_categorical_crossentropy")
        callback = keras.callbacks.LambdaCallback(on_train_batch_end=record)
        ref.fit(_scale(x[:n]), y[:n], batch_size=batch_size, epochs=1, shuffle=False,
                verbose=0, callbacks=[callback])  # fmt: skip
    # Keras logs the running mean over the epoch; recover each step's own loss from it.
    losses = [running[0]] + [
        (k + 1) * running[k] - k * running[k - 1] for k in range(1, len(running))
    ]
    return StepTrace(losses, weights)


def hybrid_steps(
    net: HybridCNN,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    optimizer: Optimizer,
) -> StepTrace:
    """The same ``steps`` consecutive batches as :func:`keras_data_parallel_steps`, on the mesh."""
    _check_batch(batch_size, net.mesh, net.batch_dim)
    step = make_train_step(net, optimizer)
    losses, weights = [], []
    for i in range(steps):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        xb, yb = batch_to_mesh(
            net.mesh, _scale(x[sl]), y[sl].astype(np.int32), batch_dim=net.batch_dim
        )
        losses.append(float(tp.to_numpy(step(xb, yb))))
        weights.append(net.get_weights())
    return StepTrace(losses, weights)


# ========================================================================= transformer


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of :class:`TransformerLM` (a GPT-style decoder-only model)."""

    vocab_size: int
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 2
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for what in ("vocab_size", "seq_len", "d_model", "n_heads", "d_ff", "n_layers"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"TransformerConfig.{what} must be a whole number >= 1, got {v!r}."
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                "(each head gets d_model / n_heads dims)."
            )

    @property
    def head_dim(self) -> int:
        """Dimensions per attention head."""
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Trainable parameters (token and position embeddings, blocks, final norm)."""
        return self.memory_spec().n_params

    def check_mesh(self, mesh: dtensor.Mesh, model_dim: str = MODEL_DIM) -> None:
        """Raise a clear error unless heads and MLP units split evenly over ``model_dim``."""
        tp.check_divisible(self.n_heads, mesh, model_dim, "the attention heads")
        tp.check_divisible(self.d_ff, mesh, model_dim, "the MLP hidden units (d_ff)")

    def memory_spec(self, name: str = "notebook transformer") -> _memory.ModelSpec:
        """This model for :mod:`utils.memory` (same parameter count)."""
        return _memory.transformer_spec(
            name,
            self.n_layers,
            self.d_model,
            self.n_heads,
            self.seq_len,
            self.vocab_size,
            self.d_ff,
        )


def _block_names(i: int) -> list[str]:
    p = f"block{i}/"
    return [p + n for n in (
        "ln1_gamma", "ln1_beta", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
        "ln2_gamma", "ln2_beta", "w1", "b1", "w2", "b2",
    )]  # fmt: skip


def init_transformer_weights(cfg: TransformerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2-style initial weights (normal, std 0.02; zeros/ones for biases and norms).

    Shapes follow ``keras.layers.MultiHeadAttention``: ``wq``/``wk``/``wv`` are
    ``[d_model, n_heads, head_dim]``, ``wo`` is ``[n_heads, head_dim, d_model]``.
    """
    rng = np.random.default_rng(seed)
    d, h, k, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, np.float32)

    w: dict[str, np.ndarray] = {
        "tok_emb": normal(cfg.vocab_size, d),
        "pos_emb": normal(cfg.seq_len, d, std=0.01),
    }
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual projections scaled down
    for i in range(cfg.n_layers):
        p = f"block{i}/"
        w.update(
            {
                p + "ln1_gamma": np.ones(d, np.float32), p + "ln1_beta": zeros(d),
                p + "wq": normal(d, h, k), p + "bq": zeros(h, k),
                p + "wk": normal(d, h, k), p + "bk": zeros(h, k),
                p + "wv": normal(d, h, k), p + "bv": zeros(h, k),
                p + "wo": normal(h, k, d, std=out_std), p + "bo": zeros(d),
                p + "ln2_gamma": np.ones(d, np.float32), p + "ln2_beta": zeros(d),
                p + "w1": normal(d, f), p + "b1": zeros(f),
                p + "w2": normal(f, d, std=out_std), p + "b2": zeros(d),
            }
        )  # fmt: skip
    w["ln_f_gamma"] = np.ones(d, np.float32)
    w["ln_f_beta"] = zeros(d)
    return w


_MEGATRON_SPECS: dict[str, tuple[str | None, ...]] = {
    "wq": (None, "model", None),  # heads split: column-parallel
    "wk": (None, "model", None),
    "wv": (None, "model", None),
    "bq": ("model", None),
    "bk": ("model", None),
    "bv": ("model", None),
    "wo": ("model", None, None),  # row-parallel: partial sums, one all-reduce
    "w1": (None, "model"),  # MLP column-parallel
    "b1": ("model",),
    "w2": ("model", None),  # MLP row-parallel: one all-reduce
}


def transformer_layouts(
    weights: Mapping[str, np.ndarray], mesh: dtensor.Mesh, model_dim: str = MODEL_DIM
) -> dict[str, dtensor.Layout]:
    """Megatron layouts for every weight: sharded as in the module docstring, else replicated."""
    out = {}
    for name, value in weights.items():
        short = name.rsplit("/", 1)[-1]
        specs = _MEGATRON_SPECS.get(short)
        if specs is None:
            out[name] = tp.replicated(mesh, np.ndim(value))
        else:
            out[name] = tp.layout(mesh, *(model_dim if s == "model" else s for s in specs))
    return out


def _layer_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, eps: float) -> tf.Tensor:
    """Layer norm over the last axis, computed in float32 whatever the input dtype."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    y = (x - mean) * tf.math.rsqrt(var + eps) * gamma + beta
    return tf.cast(y, dtype)


class TransformerLM(tf.Module):
    """A decoder-only transformer language model, unsharded or Megatron-sharded.

    Args:
        cfg: sizes.
        weights: from :func:`init_transformer_weights` (or gathered from another model).
        mesh: ``None`` for an ordinary single-device model (variables on ``device``), or a
            mesh with ``batch_dim``/``model_dim`` dims for the Megatron-sharded model.
        recompute: wrap every block in ``tf.recompute_grad`` (keeps only block inputs for
            backward and recomputes the rest).
        compute_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: matmuls and
            attention run in it; weights stay float32, layer norms, softmax and logits run
            in float32 (Keras's ``mixed_*`` policies do the same).
        device: where an unsharded model's variables live (default: first compute device).

    Raises:
        ValueError: heads or MLP units that do not split over ``model_dim``; missing
            weights; an unknown ``compute_dtype``.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        weights: Mapping[str, np.ndarray],
        mesh: dtensor.Mesh | None = None,
        *,
        recompute: bool = False,
        compute_dtype: str = "float32",
        batch_dim: str = BATCH_DIM,
        model_dim: str = MODEL_DIM,
        device: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype!r}."
            )
        expected = ["tok_emb", "pos_emb", "ln_f_gamma", "ln_f_beta"]
        for i in range(cfg.n_layers):
            expected += _block_names(i)
        missing = [n for n in expected if n not in weights]
        if missing:
            raise ValueError(f"weights lacks {missing[:5]}{'...' if len(missing) > 5 else ''}.")
        self.cfg = cfg
        self.mesh = mesh
        self.recompute = recompute
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.batch_dim = batch_dim
        self.model_dim = model_dim
        self.params: dict[str, tf.Variable] = {}
        with self.name_scope:
            if mesh is not None:
                for dim in (batch_dim, model_dim):
                    if dim not in mesh.dim_names:
                        raise ValueError(f"Mesh {_mesh_str(mesh)} has no dim {dim!r}.")
                cfg.check_mesh(mesh, model_dim)
                layouts = transformer_layouts({n: weights[n] for n in expected}, mesh, model_dim)
                for n in expected:
                    value = np.asarray(weights[n], np.float32)
                    self.params[n] = dtensor.DVariable(
                        tp.shard(value, layouts[n]), name=n.replace("/", "_")
                    )
            else:
                device = device or _devices.compute_devices()[0]
                with tf.device(device):
                    for n in expected:
                        self.params[n] = tf.Variable(
                            np.asarray(weights[n], np.float32), name=n.replace("/", "_")
                        )

    # -- pieces -------------------------------------------------------------------------
    def _w(self, name: str) -> tf.Tensor:
        v = self.params[name]
        return v if self.compute_dtype == tf.float32 else tf.cast(v, self.compute_dtype)

    def _causal_bias(self, s: int) -> tf.Tensor:
        mask = tf.linalg.band_part(tf.ones((s, s), tf.float32), -1, 0)
        return (1.0 - mask) * -1e9

    def attention(self, i: int, x: tf.Tensor) -> tf.Tensor:
        """``x + attention(layer_norm(x))`` for block ``i`` (heads sharded on a mesh)."""
        p = f"block{i}/"
        eps = self.cfg.layer_norm_epsilon
        h = _layer_norm(x, self.params[p + "ln1_gamma"], self.params[p + "ln1_beta"], eps)
        q = tf.einsum("bsd,dhk->bshk", h, self._w(p + "wq")) + self._w(p + "bq")
        k = tf.einsum("bsd,dhk->bshk", h, self._w(p + "wk")) + self._w(p + "bk")
        v = tf.einsum("bsd,dhk->bshk", h, self._w(p + "wv")) + self._w(p + "bv")
        q = q * tf.cast(1.0 / math.sqrt(self.cfg.head_dim), q.dtype)
        scores = tf.einsum("bqhk,bshk->bhqs", q, k)
        scores = tf.cast(scores, tf.float32) + self._causal_bias(int(x.shape[1]))
        probs = tf.cast(tf.nn.softmax(scores, axis=-1), x.dtype)
        ctx = tf.einsum("bhqs,bshk->bqhk", probs, v)
        out = tf.einsum("bqhk,hkd->bqd", ctx, self._w(p + "wo")) + self._w(p + "bo")
        return x + out

    def mlp(self, i: int, x: tf.Tensor) -> tf.Tensor:
        """``x + W2 gelu(W1 layer_norm(x))`` for block ``i`` (column- then row-parallel)."""
        p = f"block{i}/"
        eps = self.cfg.layer_norm_epsilon
        h = _layer_norm(x, self.params[p + "ln2_gamma"], self.params[p + "ln2_beta"], eps)
        u = tf.nn.gelu(tf.einsum("bsd,df->bsf", h, self._w(p + "w1")) + self._w(p + "b1"))
        return x + tf.einsum("bsf,fd->bsd", u, self._w(p + "w2")) + self._w(p + "b2")

    def block(self, i: int, x: tf.Tensor) -> tf.Tensor:
        """Block ``i``: attention then MLP, each with a residual connection."""
        return self.mlp(i, self.attention(i, x))

    def _block_fn(self, i: int) -> Callable[[tf.Tensor], tf.Tensor]:
        """Block ``i`` as a one-argument function (what ``tf.recompute_grad`` wraps)."""

        def fn(x: tf.Tensor) -> tf.Tensor:
            return self.block(i, x)

        return fn

    def embed(self, tokens: tf.Tensor) -> tf.Tensor:
        """Token plus position embeddings, ``[B, S, d_model]`` in the compute dtype."""
        s = int(tokens.shape[1])
        x = tf.gather(self.params["tok_emb"], tokens) + self.params["pos_emb"][:s]
        return tf.cast(x, self.compute_dtype)

    def hidden(self, tokens: tf.Tensor) -> tf.Tensor:
        """Final hidden states (after the last layer norm), float32."""
        x = self.embed(tokens)
        for i in range(self.cfg.n_layers):
            fn = self._block_fn(i)
            x = tf.recompute_grad(fn)(x) if self.recompute else fn(x)
        x = tf.cast(x, tf.float32)
        return _layer_norm(
            x, self.params["ln_f_gamma"], self.params["ln_f_beta"], self.cfg.layer_norm_epsilon
        )

    def __call__(self, tokens: tf.Tensor) -> tf.Tensor:
        """Logits ``[B, S, vocab]`` (float32); the LM head is the tied token embedding."""
        if self.mesh is not None:
            with dtensor.default_mesh(self.mesh):
                return tf.einsum("bsd,vd->bsv", self.hidden(tokens), self.params["tok_emb"])
        return tf.einsum("bsd,vd->bsv", self.hidden(tokens), self.params["tok_emb"])

    def get_weights(self) -> dict[str, np.ndarray]:
        """Gathered weights by name (load them into another TransformerLM)."""
        return {n: tp.to_numpy(v) for n, v in self.params.items()}


def lm_loss(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Mean next-token cross-entropy (nats) over all positions."""
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    return tf.reduce_mean(losses)


def keras_block(
    cfg: TransformerConfig, block_weights: Mapping[str, np.ndarray] | None = None
) -> keras.Model:
    """One pre-norm decoder block built from Keras layers: the unsharded reference.

    ``LayerNormalization -> MultiHeadAttention(causal) -> add -> LayerNormalization ->
    Dense(d_ff, gelu) -> Dense(d_model) -> add``. Input and output ``[B, seq_len, d_model]``.
    ``block_weights`` (keys without the ``block{i}/`` prefix) are loaded if given.
    """
    inp = keras.Input((cfg.seq_len, cfg.d_model), name="x")
    h = keras.layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="ln1")(inp)
    mha = keras.layers.MultiHeadAttention(cfg.n_heads, cfg.head_dim, name="attention")
    a = mha(h, h, use_causal_mask=True)
    x = keras.layers.Add(name="residual1")([inp, a])
    h = keras.layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="ln2")(x)
    h = keras.layers.Dense(cfg.d_ff, activation="gelu", name="mlp_in")(h)
    h = keras.layers.Dense(cfg.d_model, name="mlp_out")(h)
    out = keras.layers.Add(name="residual2")([x, h])
    model = keras.Model(inp, out, name="keras_block")
    if block_weights is not None:
        block_weights_to_keras(block_weights, model)
    return model


def block_weights_to_keras(block_weights: Mapping[str, np.ndarray], model: keras.Model) -> None:
    """Load one block's weights (``wq``, ``bq``, ... without prefix) into :func:`keras_block`."""
    w = {k.rsplit("/", 1)[-1]: np.asarray(v) for k, v in block_weights.items()}
    model.get_layer("ln1").set_weights([w["ln1_gamma"], w["ln1_beta"]])
    model.get_layer("ln2").set_weights([w["ln2_gamma"], w["ln2_beta"]])
    mha = model.get_layer("attention")
    by_path = {
        "query": (w["wq"], w["bq"]),
        "key": (w["wk"], w["bk"]),
        "value": (w["wv"], w["bv"]),
        "attention_output": (w["wo"], w["bo"]),
    }
    for sub in (mha.query_dense, mha.key_dense, mha.value_dense, mha.output_dense):
        sub.set_weights(list(by_path[sub.name]))
    model.get_layer("mlp_in").set_weights([w["w1"], w["b1"]])
    model.get_layer("mlp_out").set_weights([w["w2"], w["b2"]])


def keras_block_variables(model: keras.Model) -> dict[str, Any]:
    """The variables of a :func:`keras_block` under this module's short names (``wq``, ...)."""
    mha = model.get_layer("attention")
    pairs = {
        "ln1": model.get_layer("ln1"),
        "q": mha.query_dense,
        "k": mha.key_dense,
        "v": mha.value_dense,
        "o": mha.output_dense,
        "ln2": model.get_layer("ln2"),
        "1": model.get_layer("mlp_in"),
        "2": model.get_layer("mlp_out"),
    }
    out: dict[str, Any] = {}
    for key, layer in pairs.items():
        if key.startswith("ln"):
            out[f"{key}_gamma"], out[f"{key}_beta"] = layer.gamma, layer.beta
        else:
            out[f"w{key}"], out[f"b{key}"] = layer.kernel, layer.bias
    return out


def compare_block(
    lm: TransformerLM, reference: keras.Model, x: np.ndarray, block: int = 0, seed: int = 0
) -> dict[str, float]:
    """Largest relative differences between block ``block`` of ``lm`` and a Keras block.

    Runs both on the same input ``x`` (``[B, seq_len, d_model]``), compares the outputs, and
    the gradients of ``sum(output * r)`` (``r`` fixed random) with respect to the input and
    to every weight, as :func:`relative_diff` (weights: the largest difference over the
    largest gradient of any weight). ``lm`` may be sharded (the shards are gathered).
    """
    x = np.asarray(x, np.float32)
    r = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    names = [n.split("/", 1)[1] for n in _block_names(block)]
    ours = [lm.params[f"block{block}/{n}"] for n in names]
    kvars = keras_block_variables(reference)
    theirs = [kvars[n] for n in names]
    xt, rt = _to_model(lm, x, r)

    @tf.function
    def sharded(x_in: tf.Tensor, r_in: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            tape.watch(x_in)
            if lm.mesh is not None:
                with dtensor.default_mesh(lm.mesh):
                    y = lm.block(block, x_in)
            else:
                y = lm.block(block, x_in)
            loss = tf.reduce_sum(y * r_in)
        return y, tape.gradient(loss, [x_in, *ours])

    y1, g1 = sharded(xt, rt)
    xk = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xk)
        y2 = reference(xk)
        loss = tf.reduce_sum(y2 * r)
    g2 = tape.gradient(loss, [xk, *theirs])
    return {
        "output": relative_diff(y1, y2.numpy()),
        "input gradient": relative_diff(g1[0], g2[0].numpy()),
        # one scale for all weights: the key bias has a zero gradient (softmax ignores a
        # shift shared by all keys), so a per-tensor relative error would divide noise by 0
        "weight gradients": max(
            tp.max_abs_diff(a, np.asarray(b)) for a, b in zip(g1[1:], g2[1:], strict=True)
        )
        / max(float(np.max(np.abs(np.asarray(b)))) for b in g2[1:]),
    }


def relative_diff(a: Any, b: Any) -> float:
    """``max|a - b| / max|b|`` after gathering both (0 when both are all zeros)."""
    scale = float(np.max(np.abs(tp.to_numpy(b)))) if np.size(tp.to_numpy(b)) else 0.0
    diff = tp.max_abs_diff(a, b)
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------- text data

CORPUS_MODULES = (
    "collections", "functools", "itertools", "json", "textwrap", "string", "re", "pathlib",
    "random", "statistics", "datetime", "decimal", "fractions", "heapq", "bisect",
    "contextlib", "dataclasses", "enum", "argparse", "logging", "csv", "difflib", "shutil",
    "tempfile", "threading", "queue", "inspect", "copy", "pprint", "operator", "zipfile",
    "tarfile", "calendar", "urllib.parse", "email.message", "unittest.case",
)  # fmt: skip


CORPUS_ALPHABET = "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))


def text_corpus(modules: Sequence[str] = CORPUS_MODULES, max_chars: int | None = None) -> str:
    """English text that ships with Python: docstrings of standard-library modules.

    Module docstrings and those of their public classes and functions, in a fixed order,
    restricted to printable ASCII (other characters become ``?``). No download needed.
    """
    allowed = set(CORPUS_ALPHABET)
    parts: list[str] = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        docs = [inspect.getdoc(mod) or ""]
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            if doc.strip():
                parts.append("".join(c if c in allowed else "?" for c in doc.strip()))
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


class CharTokenizer:
    """Characters <-> integer ids over a fixed alphabet.

    The default alphabet, :data:`CORPUS_ALPHABET` (printable ASCII, tab and newline: 97
    characters), covers everything :func:`text_corpus` returns, so the vocabulary and the
    model size do not depend on the Python version's docstrings.
    """

    def __init__(self, alphabet: str = "") -> None:
        alphabet = alphabet or CORPUS_ALPHABET
        self.chars = sorted(set(alphabet))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` (unknown characters raise ``KeyError`` naming them)."""
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise KeyError(f"Characters not in the vocabulary: {unknown[:10]}")
        return np.array([self.index[c] for c in text], np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)


def random_windows(
    ids: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows: inputs ``ids[i:i+S]`` and targets ``ids[i+1:i+S+1]``."""
    if len(ids) <= seq_len + 1:
        raise ValueError(f"Text of {len(ids)} tokens is too short for windows of {seq_len} + 1.")
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win = ids[idx]
    return win[:, :-1].astype(np.int32), win[:, 1:].astype(np.int32)


def _to_model(lm: TransformerLM, *arrays: np.ndarray) -> tuple[tf.Tensor, ...]:
    if lm.mesh is None:
        return tuple(tf.constant(a) for a in arrays)
    return batch_to_mesh(lm.mesh, *arrays, batch_dim=lm.batch_dim)


def train_lm(
    lm: TransformerLM,
    optimizer: Optimizer,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    *,
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
    log_every: int = 50,
    val_batches: int = 4,
) -> pd.DataFrame:
    """Train ``lm`` on random windows of ``train_ids``; log train and validation loss.

    The validation loss is the mean over ``val_batches`` fixed random windows of
    ``val_ids`` (the same windows at every log row).
    """
    if lm.mesh is not None:
        _check_batch(batch_size, lm.mesh, lm.batch_dim)
    step_fn = make_train_step(lm, optimizer, lm_loss)
    eval_fn = tf.function(lambda x, y: lm_loss(lm(x), y))
    rng = np.random.default_rng(seed)
    val_rng = np.random.default_rng(seed + 1)
    val = [
        _to_model(lm, *random_windows(val_ids, batch_size, lm.cfg.seq_len, val_rng))
        for _ in range(val_batches)
    ]

    def val_loss() -> float:
        return float(np.mean([tp.to_numpy(eval_fn(x, y)) for x, y in val]))

    rows = [
        {"step": 0, "train loss": float("nan"), "val loss": val_loss(), "tokens/s": float("nan")}
    ]
    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = _to_model(lm, *random_windows(train_ids, batch_size, lm.cfg.seq_len, rng))
        losses.append(step_fn(x, y))
        if step % log_every == 0 or step == steps:
            seconds = time.perf_counter() - t0
            train_loss = float(np.mean([tp.to_numpy(v) for v in losses]))
            tokens = len(losses) * batch_size * lm.cfg.seq_len / seconds
            rows.append(
                {"step": step, "train loss": train_loss, "val loss": val_loss(), "tokens/s": tokens}
            )
            losses = []
            t0 = time.perf_counter()
    return pd.DataFrame(rows)


# ======================================================================== measurement


@dataclass(frozen=True)
class StepStats:
    """Peak extra memory of one step (bytes; ``None`` if unavailable) and seconds per step."""

    peak_bytes: int | None
    seconds: float
    source: str


def memory_stats_available(device: str | None = None) -> bool:
    """Whether ``tf.config.experimental.get_memory_info`` works for ``device``."""
    device = device or _devices.compute_devices()[0]
    try:
        tf.config.experimental.get_memory_info(_short_device(device))
        return True
    except (ValueError, RuntimeError, tf.errors.OpError):
        return False


def _short_device(device: str) -> str:
    spec = tf.DeviceSpec.from_string(device)
    return f"{spec.device_type}:{spec.device_index}" if spec.device_type else device


def _block(result: Any) -> None:
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor):
            t.numpy()


def measure_step(
    fn: Callable[..., Any], *args: Any, device: str | None = None, repeats: int = 3
) -> StepStats:
    """Peak memory and time of ``fn(*args)``, run on ``device``.

    The first call traces and warms up. Then the allocator's peak counter is reset and one
    call measures the peak *above* what was allocated before it (weights, inputs, optimizer
    state are not counted: only what the step itself allocates: activations, gradients,
    temporaries). ``repeats`` further calls give the median time.

    On CPUs (TensorFlow 2.21) all logical CPUs share one allocator, so the peak is
    process-wide, and that allocator only tracks allocations above a size threshold (a few
    hundred KB are counted, tens of KB are not): the peak is a lower bound, and a tiny model
    can read 0. On GPUs every allocation is counted.
    """
    device = device or _devices.compute_devices()[0]
    short = _short_device(device)
    with tf.device(device):
        _block(fn(*args))
        peak = None
        source = "not available"
        if memory_stats_available(device):
            tf.config.experimental.reset_memory_stats(short)
            before = tf.config.experimental.get_memory_info(short)["current"]
            _block(fn(*args))
            peak = int(tf.config.experimental.get_memory_info(short)["peak"] - before)
            source = f"tf.config.experimental.get_memory_info('{short}')"
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            _block(fn(*args))
            times.append(time.perf_counter() - t0)
    return StepStats(peak, float(np.median(times)), source)


def keras_grad_step(
    model: keras.Model, recompute_segments: int = 0
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, list[tf.Tensor]]]:
    """A compiled ``fn(x, y) -> (loss, grads)`` for a Keras classifier with softmax output.

    ``recompute_segments > 0`` splits ``model.layers`` into that many contiguous segments
    and wraps each in ``tf.recompute_grad``: only segment inputs are kept for backward.
    """
    layers = list(model.layers)
    variables = list(model.trainable_variables)
    if recompute_segments < 0 or recompute_segments > len(layers):
        raise ValueError(
            f"recompute_segments must be in 0..{len(layers)}, got {recompute_segments}."
        )
    bounds = (
        [round(i * len(layers) / recompute_segments) for i in range(recompute_segments + 1)]
        if recompute_segments
        else [0, len(layers)]
    )
    segments = [layers[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def segment_fn(seg: Sequence[keras.layers.Layer]) -> Callable[[tf.Tensor], tf.Tensor]:
        def run(h: tf.Tensor) -> tf.Tensor:
            for layer in seg:
                h = layer(h, training=True)
            return h

        return run

    @tf.function
    def grad_fn(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            h = x
            for seg in segments:
                f = segment_fn(seg)
                h = tf.recompute_grad(f)(h) if recompute_segments else f(h)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, h))
        return loss, tape.gradient(loss, variables)

    return grad_fn


def compare_variants(
    fns: Mapping[str, Callable[..., tuple[tf.Tensor, Sequence[tf.Tensor]]]],
    *args: Any,
    device: str | None = None,
    repeats: int = 5,
    predicted_bytes: Mapping[str, float] | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Measure variants of one ``(loss, grads)`` step against the first one.

    Each ``fns[name](*args)`` must return ``(loss, grads)`` for the same weights and data
    (e.g. float32, mixed precision, recomputation). For each variant the table gives the
    peak extra memory (:func:`measure_step`), its ratio to the first variant, the median
    seconds per step and the slow-down, and optionally the calculator's prediction
    (``predicted_bytes``). Timing runs the variants round-robin, ``repeats`` rounds, so a
    busy machine slows all of them alike. The second return value holds, per variant, what
    "equal results" means: ``loss`` (difference relative to the first variant's loss),
    ``gradients`` (``|g - g_first| / |g_first|`` over all gradients as one vector) and
    ``cosine`` (cosine similarity of the two gradient vectors).
    """
    if not fns:
        raise ValueError("compare_variants needs at least one variant.")
    device = device or _devices.compute_devices()[0]
    peaks: dict[str, int | None] = {}
    results: dict[str, tuple[float, np.ndarray]] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with quiet_tf_logs(), tf.device(device):
        for name, fn in fns.items():
            peaks[name] = measure_step(fn, *args, device=device, repeats=1).peak_bytes
            loss, grads = fn(*args)
            vec = np.concatenate([tp.to_numpy(g).astype(np.float64).ravel() for g in grads])
            results[name] = (float(tp.to_numpy(loss)), vec)
        for _ in range(max(1, repeats)):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                _block(fn(*args))
                times[name].append(time.perf_counter() - t0)
    first = next(iter(fns))
    ref_loss, ref_vec = results[first]
    ref_norm = float(np.linalg.norm(ref_vec))
    ref_time = float(np.median(times[first]))
    rows, diffs = [], {}
    for name in fns:
        loss_v, vec = results[name]
        diffs[name] = {
            "loss": abs(loss_v - ref_loss) / abs(ref_loss),
            "gradients": float(np.linalg.norm(vec - ref_vec)) / ref_norm,
            "cosine": float(vec @ ref_vec) / (float(np.linalg.norm(vec)) * ref_norm),
        }
        seconds = float(np.median(times[name]))
        row: dict[str, Any] = {"variant": name}
        if peaks[name] is not None and peaks[first]:
            row["peak MB"] = peaks[name] / 1e6
            row["peak vs first"] = peaks[name] / peaks[first]
        if predicted_bytes is not None and name in predicted_bytes:
            row["calculator activations MB"] = predicted_bytes[name] / 1e6
        row["ms/step"] = seconds * 1e3
        row["time vs first"] = seconds / ref_time
        row["loss rel. diff"] = diffs[name]["loss"]
        row["grad rel. diff"] = diffs[name]["gradients"]
        row["grad cosine"] = diffs[name]["cosine"]
        rows.append(row)
    return pd.DataFrame(rows), diffs
