"""Model compression for Keras 3 models: pruning, quantization (LiteRT), QAT, distillation.

Every helper here *measures*; none assumes. The pieces:

Magnitude pruning (Zhu & Gupta, 2017), written for Keras 3
    :func:`magnitude_masks` keeps the largest ``1 - sparsity`` of each kernel's weights;
    :class:`MagnitudePruning` is a callback that raises the sparsity along a cubic schedule
    during fine-tuning and re-applies the masks after every optimizer step, so pruned
    weights stay exactly zero; :func:`prune_and_finetune` wraps both. (The
    ``tensorflow-model-optimization`` package only works with ``tf_keras``: given a Keras 3
    model it silently leaves the weights dense.) :func:`sparsity_table` reads the
    sparsity back from the final weights.

Size
    :func:`gzip_size` (deterministic gzip, level 9) and :func:`saved_weights_size` (the
    ``.weights.h5`` file Keras writes, raw and gzipped). Zeros only shrink a file once it is
    compressed: a pruned model has the same raw size as the dense one.

Post-training quantization with :class:`tf.lite.TFLiteConverter`
    :func:`to_tflite` with ``"float32"``, ``"dynamic"`` (int8 weights, float activations),
    ``"float16"`` (fp16 weights) or ``"int8"`` (weights *and* activations, calibrated on a
    representative dataset, integer-only ops and int8 input/output).
    :class:`LiteRTModel` runs the result on the LiteRT interpreter
    (``ai_edge_litert.interpreter.Interpreter``, which replaces the deprecated
    ``tf.lite.Interpreter``): batched :meth:`~LiteRTModel.predict` with the input
    (de)quantization done for you, :meth:`~LiteRTModel.latency_ms` at batch 1, and
    :meth:`~LiteRTModel.op_types`.

Quantization-aware training (QAT), written for Keras 3
    :func:`quantize_aware_model` rebuilds a Sequential CNN with fake-quantized weights
    (:class:`QuantConv2D` per output channel, :class:`QuantDense` per tensor) and
    activations (:class:`FakeQuant`, moving-average ranges), so fine-tuning sees int8
    rounding. The ``FakeQuant`` ops carry the ranges into the converter:
    ``to_tflite(qat_model, "qat")`` gives an integer model without a representative
    dataset.

Knowledge distillation (Hinton et al., 2015)
    :func:`distillation_loss` and :class:`Distiller` (a ``keras.Model`` whose
    ``compute_loss`` mixes the label loss and the temperature-softened teacher/student KL
    divergence). The series' models end in a softmax, so logits are recovered as
    log-probabilities (exact up to a constant, which softmax ignores).

Reporting
    :func:`keras_accuracy` (eager, no tracing), :func:`evaluate_variant` (parameters, non-zeros, bytes, gzip bytes, LiteRT accuracy and
    latency for one model), :func:`results_table` (adds compression ratios) and
    :func:`plot_accuracy_vs_size`.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

PRUNABLE_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
TFLITE_MODES = ("float32", "dynamic", "float16", "int8", "qat")


# --------------------------------------------------------------------------- helpers
def _check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not isinstance(sparsity, int | float) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), e.g. 0.75 for 75%, got {sparsity!r}")
    return float(sparsity)


def _check_built(model: keras.Model) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built yet: call it on a batch or give it an Input first")


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what the converter prints at the C++ level (stdout/stderr file descriptors).

    ``TFLiteConverter`` writes progress lines ("Saved artifact at ...", "fully_quantize: 0,
    ...") that would clutter notebook outputs. Python-level warnings of the converter are
    silenced too. Errors still raise normally (their message is in the exception).
    """
    import logging
    import sys

    tf_logger = tf.get_logger()
    old_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # "Assets written to <temp folder>" and similar INFO lines
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover - no /dev/null: just run
        try:
            yield
        finally:
            tf_logger.setLevel(old_level)
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                pass
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
        tf_logger.setLevel(old_level)


# --------------------------------------------------------------------------- sparsity
def prunable_kernels(model: keras.Model) -> list[tuple[str, keras.Variable]]:
    """``(layer name, kernel variable)`` for every Conv2D and Dense layer (biases excluded).

    Nested models are searched too (``model._flatten_layers``), so a wrapper such as
    :class:`Distiller` is not needed to reach a student's layers.
    """
    _check_built(model)
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, PRUNABLE_LAYERS) and getattr(layer, "kernel", None) is not None:
            out.append((layer.name, layer.kernel))
    return out


def sparsity_table(model: keras.Model) -> pd.DataFrame:
    """Sparsity read from the model's current weights, one row per layer plus totals.

    Columns: ``layer``, ``kernel weights``, ``zeros``, ``sparsity`` (zeros / weights).
    The ``TOTAL kernels`` row covers the prunable kernels; ``TOTAL all params`` counts
    every weight of the model (biases included), the number that decides file size.
    """
    rows = []
    for name, var in prunable_kernels(model):
        w = np.asarray(keras.ops.convert_to_numpy(var))
        rows.append({"layer": name, "kernel weights": w.size, "zeros": int(np.sum(w == 0))})
    if not rows:
        raise ValueError(f"model {model.name!r} has no Conv2D or Dense kernels to measure")
    table = pd.DataFrame(rows)
    total_k = {"layer": "TOTAL kernels", "kernel weights": int(table["kernel weights"].sum()),
               "zeros": int(table["zeros"].sum())}
    all_w = [np.asarray(w) for w in model.get_weights()]
    total_a = {"layer": "TOTAL all params", "kernel weights": int(sum(w.size for w in all_w)),
               "zeros": int(sum(np.sum(w == 0) for w in all_w))}
    table = pd.concat([table, pd.DataFrame([total_k, total_a])], ignore_index=True)
    table["sparsity"] = table["zeros"] / table["kernel weights"]
    return table


def model_sparsity(model: keras.Model, kernels_only: bool = True) -> float:
    """Fraction of exactly-zero weights: over the prunable kernels, or over all parameters."""
    table = sparsity_table(model).set_index("layer")
    return float(table.loc["TOTAL kernels" if kernels_only else "TOTAL all params", "sparsity"])


def count_nonzero(model: keras.Model) -> int:
    """Number of non-zero parameters (all weights, biases included)."""
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


# --------------------------------------------------------------------------- pruning
def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A 0/1 mask of ``weights``'s shape that zeroes the ``sparsity`` fraction of smallest |w|.

    Exactly ``round(sparsity * size)`` entries are zero (ties broken by position, so the
    count is exact even when many weights are already zero).
    """
    sparsity = _check_sparsity(sparsity)
    w = np.asarray(weights)
    k = int(round(sparsity * w.size))
    mask = np.ones(w.size, dtype=w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32)
    if k > 0:
        order = np.argsort(np.abs(w).ravel(), kind="stable")
        mask[order[:k]] = 0
    return mask.reshape(w.shape)


def magnitude_masks(model: keras.Model, sparsity: float) -> dict[str, np.ndarray]:
    """One mask per prunable kernel (layer name -> mask), each at ``sparsity`` (layer-wise)."""
    return {name: magnitude_mask(keras.ops.convert_to_numpy(var), sparsity)
            for name, var in prunable_kernels(model)}


def apply_masks(model: keras.Model, masks: dict[str, np.ndarray]) -> None:
    """Multiply each kernel by its mask in place (pruned weights become exactly 0).

    Raises:
        KeyError: if a mask names a layer the model does not have.
        ValueError: if a mask's shape differs from its kernel's.
    """
    kernels = dict(prunable_kernels(model))
    for name, mask in masks.items():
        if name not in kernels:
            raise KeyError(f"mask for {name!r}, but the model's prunable layers are {sorted(kernels)}")
        var = kernels[name]
        if tuple(mask.shape) != tuple(var.shape):
            raise ValueError(f"mask for {name!r} has shape {mask.shape}, kernel has {tuple(var.shape)}")
        var.assign(var * keras.ops.cast(mask, var.dtype))


def polynomial_sparsity(
    step: int, target: float, end_step: int, begin_step: int = 0, initial: float = 0.0, power: int = 3
) -> float:
    """Zhu & Gupta's schedule: ``target + (initial - target) * (1 - progress) ** power``.

    ``progress`` runs from 0 at ``begin_step`` to 1 at ``end_step`` (clipped), so the
    sparsity rises fast at first, while redundant weights are plentiful, then levels off.
    """
    target = _check_sparsity(target, "target")
    initial = _check_sparsity(initial, "initial")
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must be > begin_step ({begin_step})")
    progress = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
    return float(target + (initial - target) * (1.0 - progress) ** power)


class MagnitudePruning(keras.callbacks.Callback):
    """Gradual magnitude pruning during ``fit`` (Keras 3, any backend).

    Every ``frequency`` steps the masks are recomputed from the current weights at the
    scheduled sparsity (:func:`polynomial_sparsity`); after *every* optimizer step the
    masks are re-applied, so a pruned weight stays exactly zero even though the optimizer
    (Adam's momentum) would move it. At the end of training the target sparsity is
    enforced once more, so the final weights carry it exactly.

    Args:
        target: final sparsity of every prunable kernel (0.75 = 75% zeros).
        end_step: optimizer step at which the target is reached (then held).
        begin_step: step at which pruning starts.
        frequency: steps between mask updates.
        initial: sparsity at ``begin_step``.
    """

    def __init__(
        self, target: float, end_step: int, begin_step: int = 0, frequency: int = 10, initial: float = 0.0
    ) -> None:
        super().__init__()
        self.target = _check_sparsity(target, "target")
        if end_step <= begin_step or begin_step < 0:
            raise ValueError(f"need 0 <= begin_step < end_step, got begin_step={begin_step}, end_step={end_step}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        self.end_step, self.begin_step, self.frequency, self.initial = end_step, begin_step, frequency, initial
        self.step = 0
        self.masks: dict[str, np.ndarray] = {}
        self.current = 0.0
        self.log: list[tuple[int, float]] = []

    def _update(self, sparsity: float) -> None:
        self.current = sparsity
        self.masks = magnitude_masks(self.model, sparsity)
        self.log.append((self.step, sparsity))

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = 0
        if self.begin_step == 0:
            self._update(polynomial_sparsity(0, self.target, self.end_step, 0, self.initial))
            apply_masks(self.model, self.masks)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        if self.step >= self.begin_step and (self.step - self.begin_step) % self.frequency == 0:
            self._update(polynomial_sparsity(self.step, self.target, self.end_step,
                                             self.begin_step, self.initial))
        if self.masks:
            apply_masks(self.model, self.masks)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._update(self.target)
        apply_masks(self.model, self.masks)


def clone_float32(model: keras.Model, name: str | None = None) -> keras.Model:
    """A float32 copy of ``model`` (same architecture and weights, no mixed-precision policy).

    Notebook 04 may save its CNN under ``mixed_bfloat16``; converters and pruning masks want
    plain float32 layers. The variables of a mixed-precision model are float32 already, so
    the weights copy over exactly.
    """
    _check_built(model)
    config = model.get_config()

    def is_mixed(value: Any) -> bool:
        if isinstance(value, str):
            return value.startswith("mixed")
        if isinstance(value, dict):
            return str(value.get("config", {}).get("name", "")).startswith("mixed")
        return False

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: "float32" if k == "dtype" and is_mixed(v) else strip(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    clone = model.__class__.from_config(strip(config))
    clone.set_weights(model.get_weights())
    if name:
        clone.name = name
    return clone


def compile_for_finetuning(model: keras.Model, learning_rate: float = 5e-4) -> keras.Model:
    """Adam + sparse categorical cross-entropy + accuracy (the seed's loss, a smaller rate)."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def prune_and_finetune(
    base: keras.Model,
    sparsity: float,
    train_ds: tf.data.Dataset,
    epochs: int,
    *,
    learning_rate: float = 5e-4,
    ramp_fraction: float = 0.6,
    frequency: int | None = None,
    verbose: int | str = 0,
) -> tuple[keras.Model, keras.callbacks.History]:
    """Prune a float32 copy of ``base`` to ``sparsity`` while fine-tuning it on ``train_ds``.

    The sparsity ramps up over the first ``ramp_fraction`` of the steps, then the rest of
    fine-tuning recovers accuracy with the masks held. ``base`` is not modified.

    Returns:
        ``(pruned model, history)``; the pruned model's kernels are exactly ``sparsity``
        zeros per layer (check with :func:`sparsity_table`).
    """
    sparsity = _check_sparsity(sparsity)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 < ramp_fraction <= 1:
        raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction}")
    steps_per_epoch = int(train_ds.cardinality())
    if steps_per_epoch < 1:
        raise ValueError("train_ds must have a known, non-zero number of batches (no .repeat())")
    total = steps_per_epoch * epochs
    end_step = max(1, int(total * ramp_fraction))
    frequency = frequency or max(1, end_step // 10)
    model = compile_for_finetuning(clone_float32(base, name=f"pruned_{int(round(sparsity * 100))}"),
                                   learning_rate)
    callback = MagnitudePruning(sparsity, end_step=end_step, frequency=frequency)
    # shuffle=False: the dataset shuffles itself (Keras 3.15 warns that it ignores shuffle=True)
    history = model.fit(train_ds, epochs=epochs, callbacks=[callback], verbose=verbose, shuffle=False)
    return model, history


def keras_accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of a Keras model, computed with plain eager calls (no ``evaluate``).

    ``images`` are uint8 (divided by 255) or floats in [0, 1]. Eager calls avoid tracing a
    new ``tf.function`` per model, which dominates short runs.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    correct = 0
    for start in range(0, len(images), batch_size):
        x = np.asarray(images[start : start + batch_size])
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        pred = np.argmax(keras.ops.convert_to_numpy(model(x, training=False)), axis=-1)
        correct += int(np.sum(pred == np.asarray(labels[start : start + batch_size])))
    return correct / len(images)


# --------------------------------------------------------------------------- size
def gzip_size(data: bytes | str | os.PathLike[str], level: int = 9) -> int:
    """Bytes after gzip (level 9, fixed timestamp, so the same input gives the same size).

    ``data`` is the bytes themselves or the path of a file to read.
    """
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"gzip_size: no file at {path}")
        data = path.read_bytes()
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"gzip_size needs bytes or a file path, got {type(data).__name__}")
    return len(gzip.compress(bytes(data), compresslevel=level, mtime=0))


def saved_weights_size(model: keras.Model, folder: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Save ``model``'s weights (``.weights.h5``) and return ``{"bytes": raw, "gzip bytes": gz}``.

    Only the model's own weights are saved: Keras 3's ``save_weights`` also writes a
    compiled model's optimizer state (Adam's two moments triple the file), so the weights
    are copied into an uncompiled copy first (rebuilt with ``from_config``, which
    Sequential and functional models support). With ``folder=None`` a temporary folder is
    used and removed afterwards.
    """
    _check_built(model)
    clean = model
    if getattr(model, "optimizer", None) is not None:
        # from_config, not keras.models.clone_model: in Keras 3.15 the latter keeps the
        # compile state, optimizer included.
        clean = model.__class__.from_config(model.get_config())
        clean.set_weights(model.get_weights())
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
        path = Path(folder) / f"{model.name}.weights.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        clean.save_weights(path)
        return {"bytes": path.stat().st_size, "gzip bytes": gzip_size(path)}


# --------------------------------------------------------------------------- conversion
def representative_dataset(images: np.ndarray, n: int = 200) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A calibration generator for int8 conversion: ``n`` single images as float32 [0, 1].

    ``images`` may be uint8 (divided by 255) or float already in [0, 1].
    """
    x = np.asarray(images)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"representative images must be a non-empty (N, H, W, C) array, got shape {x.shape}")
    x = x[: max(1, n)]  # slice first: converting a whole training set to float32 is wasteful
    x = (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)

    def gen() -> Iterator[list[np.ndarray]]:
        for i in range(len(x)):
            yield [x[i : i + 1]]

    return gen


def to_tflite(
    model: keras.Model,
    mode: str = "float32",
    representative: np.ndarray | None = None,
    *,
    n_calibration: int = 200,
    int8_io: bool = True,
) -> bytes:
    """Convert a Keras 3 model to a LiteRT (TFLite) flatbuffer with ``TFLiteConverter``.

    Modes:
        ``"float32"``: no optimisation (the reference).
        ``"dynamic"``: dynamic-range quantization: int8 weights, float activations.
        ``"float16"``: float16 weights (dequantized to float32 at load on CPU).
        ``"int8"``: full integer quantization: weights and activations int8, ranges from
        ``representative`` (``n_calibration`` images), integer-only ops; input/output
        int8 when ``int8_io`` (else float, with (de)quantize ops at the edges).
        ``"qat"``: a model from :func:`quantize_aware_model`: the ranges come from its
        ``FakeQuant`` ops, no representative data needed.

    Raises:
        ValueError: unknown mode, or ``"int8"`` without representative images.
    """
    if mode not in TFLITE_MODES:
        raise ValueError(f"mode must be one of {TFLITE_MODES}, got {mode!r}")
    if mode == "int8" and representative is None:
        raise ValueError(
            "full int8 quantization needs representative images to calibrate activation "
            "ranges: pass representative=x_train[:200] (uint8 or float in [0, 1])"
        )
    _check_built(model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        converter.representative_dataset = representative_dataset(representative, n_calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if mode in ("int8", "qat") and int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with quiet_native_output():
        return converter.convert()


class LiteRTModel:
    """A converted model on the LiteRT interpreter (``ai_edge_litert``).

    Args:
        model_content: the flatbuffer bytes from :func:`to_tflite` (or a ``.tflite`` path).
        num_threads: interpreter threads (``None``: LiteRT's default).
    """

    def __init__(self, model_content: bytes | str | os.PathLike[str], num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(model_content, str | os.PathLike):
            model_content = Path(model_content).read_bytes()
        if not isinstance(model_content, bytes | bytearray) or len(model_content) == 0:
            raise ValueError("model_content must be the non-empty bytes of a .tflite flatbuffer")
        self.content = bytes(model_content)
        self.num_threads = num_threads
        self._interpreter_cls = Interpreter
        self.interpreter = self._new_interpreter()
        self._batch = 1
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in inp["shape"][1:])
        self.input_dtype = np.dtype(inp["dtype"])
        self.output_dtype = np.dtype(out["dtype"])
        self.input_quant = inp["quantization"]  # (scale, zero_point); (0.0, 0) when float
        self.output_quant = out["quantization"]

    def _new_interpreter(self) -> Any:
        with quiet_native_output():
            interp = self._interpreter_cls(model_content=self.content, num_threads=self.num_threads)
            interp.allocate_tensors()
        return interp

    @property
    def size_bytes(self) -> int:
        """Size of the flatbuffer (what a ``.tflite`` file on disk holds)."""
        return len(self.content)

    def op_types(self) -> list[str]:
        """The operators of the graph, in order (e.g. ``QUANTIZE``, ``CONV_2D``, ...).

        ``DELEGATE`` nodes (the XNNPACK CPU delegate taking over parts of the graph at run
        time) are left out, so the list describes the model, not the machine.
        """
        return [op["op_name"] for op in self.interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]

    def tensor_dtypes(self) -> dict[str, int]:
        """How many tensors of each dtype the graph holds (``int8``, ``float32``, ...)."""
        counts: dict[str, int] = {}
        for t in self.interpreter.get_tensor_details():
            name = np.dtype(t["dtype"]).name
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        if self.input_dtype == np.float32:
            return x.astype(np.float32)
        scale, zero = self.input_quant
        info = np.iinfo(self.input_dtype)
        q = np.round(x / scale + zero)
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def _dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if self.output_dtype == np.float32:
            return y.astype(np.float32)
        scale, zero = self.output_quant
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            idx = self.interpreter.get_input_details()[0]["index"]
            self.interpreter.resize_tensor_input(idx, [batch, *self.input_shape])
            self.interpreter.allocate_tensors()
            self._batch = batch

    def _run(self, xq: np.ndarray) -> np.ndarray:
        interp = self.interpreter
        interp.set_tensor(interp.get_input_details()[0]["index"], xq)
        interp.invoke()
        return interp.get_tensor(interp.get_output_details()[0]["index"])

    def predict(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        """Class probabilities (float32, dequantized) for ``images`` (uint8 or float [0, 1]).

        The last partial batch is padded, so the interpreter is resized at most once.
        """
        x = np.asarray(images)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch = min(batch_size, len(x))
        self._resize(batch)
        outs = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
            outs.append(self._dequantize_output(self._run(self._quantize_input(chunk)))[:n])
        return np.concatenate(outs)

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 250) -> float:
        """Top-1 accuracy on ``images``/``labels``."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return float(np.mean(np.argmax(self.predict(images, batch_size), axis=-1) == np.asarray(labels)))

    def latency_ms(self, images: np.ndarray, n: int = 200, warmup: int = 20) -> np.ndarray:
        """Per-image latency at batch 1 in milliseconds (``n`` timed runs after ``warmup``).

        Each timing covers setting the input, ``invoke()`` and reading the output, on a
        separate interpreter kept at batch 1. Report the median: a shared machine adds
        outliers.
        """
        if n < 1 or warmup < 0:
            raise ValueError(f"need n >= 1 and warmup >= 0, got n={n}, warmup={warmup}")
        single = LiteRTModel(self.content, self.num_threads)
        x = np.asarray(images)
        xq = single._quantize_input(x[: min(len(x), n + warmup)])
        times = []
        for i in range(n + warmup):
            one = xq[i % len(xq)][None]
            t0 = time.perf_counter()
            single._run(one)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt * 1e3)
        return np.asarray(times)


# --------------------------------------------------------------------------- QAT
def fake_quant_weights(kernel: tf.Tensor, per_channel: bool) -> tf.Tensor:
    """Symmetric int8 fake quantization of a kernel (narrow range [-127, 127]).

    Per output channel (last axis) for convolutions, per tensor for dense kernels (the
    LiteRT converter needs a per-tensor scale where it transposes a dense kernel).
    Gradients pass straight through inside the range.
    """
    if per_channel:
        bound = tf.reduce_max(tf.abs(kernel), axis=list(range(len(kernel.shape) - 1)))
        bound = tf.maximum(bound, 1e-8)
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            kernel, -bound, bound, num_bits=8, narrow_range=True)
    bound = tf.maximum(tf.reduce_max(tf.abs(kernel)), 1e-8)
    return tf.quantization.fake_quant_with_min_max_vars(kernel, -bound, bound, num_bits=8, narrow_range=True)


@keras.saving.register_keras_serializable(package="compression")
class FakeQuant(keras.layers.Layer):
    """8-bit fake quantization of activations with moving-average min/max (TensorFlow backend).

    In training the range follows an exponential moving average of each batch's min/max
    (initialised from the first batch, always containing 0); at inference the stored range
    is used. The converter turns these ops into the int8 scales of the LiteRT model.
    """

    def __init__(self, momentum: float = 0.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def build(self, input_shape: Any) -> None:
        self.range_min = self.add_weight(shape=(), initializer="zeros", trainable=False, name="range_min")
        self.range_max = self.add_weight(shape=(), initializer="ones", trainable=False, name="range_max")
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if training:
            bmin = tf.minimum(tf.reduce_min(x), 0.0)
            bmax = tf.maximum(tf.reduce_max(x), 0.0)
            first = tf.equal(self.seen, 0.0)
            m = self.momentum
            self.range_min.assign(tf.where(first, bmin, m * self.range_min + (1 - m) * bmin))
            self.range_max.assign(tf.where(first, bmax, m * self.range_max + (1 - m) * bmax))
            self.seen.assign(1.0)
        return tf.quantization.fake_quant_with_min_max_vars(x, self.range_min, self.range_max, num_bits=8)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "momentum": self.momentum}


@keras.saving.register_keras_serializable(package="compression")
class QuantConv2D(keras.layers.Conv2D):
    """``Conv2D`` whose kernel is int8 fake-quantized per output channel in every call."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        outputs = self.convolution_op(inputs, fake_quant_weights(self.kernel, per_channel=True))
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs) if self.activation is not None else outputs


@keras.saving.register_keras_serializable(package="compression")
class QuantDense(keras.layers.Dense):
    """``Dense`` whose kernel is int8 fake-quantized per tensor in every call."""

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        x = keras.ops.matmul(inputs, fake_quant_weights(self.kernel, per_channel=False))
        if self.use_bias:
            x = x + self.bias
        return self.activation(x) if self.activation is not None else x


def quantize_aware_model(model: keras.Model, name: str | None = None) -> keras.Model:
    """A QAT copy of a Sequential CNN (Conv2D / MaxPooling2D / Flatten / Dense), weights copied.

    Inserts :class:`FakeQuant` on the input and after every Conv2D/Dense (after its ReLU),
    swaps Conv2D/Dense for :class:`QuantConv2D`/:class:`QuantDense`, and splits a softmax
    output into a linear layer, its fake quantization, and a ``Softmax`` layer (LiteRT
    quantizes the logits, then runs an int8 softmax). Before fine-tuning, its predictions
    equal the float model's up to int8 rounding.

    Raises:
        ValueError: for a layer type it does not know how to quantize.
    """
    _check_built(model)
    if not isinstance(model, keras.Sequential):
        raise ValueError("quantize_aware_model supports keras.Sequential CNNs such as utils.models.build_seed_cnn")
    float_model = clone_float32(model)
    x = inputs = keras.Input(shape=float_model.input_shape[1:], name="image")
    x = FakeQuant(name="quant_input")(x)
    for layer in float_model.layers:
        cfg = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
            new = QuantConv2D.from_config(cfg)
        elif isinstance(layer, keras.layers.Dense) and type(layer) is keras.layers.Dense:
            softmax = cfg.get("activation") == "softmax"
            if softmax:
                cfg = {**cfg, "activation": "linear"}
            new = QuantDense.from_config(cfg)
        elif isinstance(layer, keras.layers.MaxPooling2D | keras.layers.Flatten):
            new = layer.__class__.from_config(cfg)
        else:
            raise ValueError(
                f"quantize_aware_model does not know layer {layer.name!r} of type "
                f"{type(layer).__name__}; supported: Conv2D, Dense, MaxPooling2D, Flatten"
            )
        x = new(x)
        if isinstance(new, QuantConv2D | QuantDense):
            new.set_weights(layer.get_weights())
            x = FakeQuant(name=f"quant_{layer.name}")(x)
            if isinstance(new, QuantDense) and softmax:
                x = keras.layers.Softmax(name=f"{layer.name}_softmax")(x)
    return keras.Model(inputs, x, name=name or f"{model.name}_qat")


def calibrate_fake_quant(model: keras.Model, images: np.ndarray, batch_size: int = 128) -> None:
    """Set every :class:`FakeQuant` range from ``images`` before fine-tuning (no weight update).

    Runs forward passes in training mode, so the moving-average ranges start from data.
    Keras layers without batch statistics (this CNN has none) are unaffected.
    """
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size], training=True)


# --------------------------------------------------------------------------- distillation
def _log_probs(probs: tf.Tensor) -> tf.Tensor:
    return tf.math.log(tf.clip_by_value(tf.cast(probs, tf.float32), 1e-12, 1.0))


def distillation_loss(
    y_true: tf.Tensor,
    student_probs: tf.Tensor,
    teacher_probs: tf.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.1,
) -> tf.Tensor:
    """Hinton et al.'s loss for models that output softmax probabilities.

    ``alpha * CE(y, student) + (1 - alpha) * T**2 * KL(softmax(z_t/T) || softmax(z_s/T))``,
    where ``z = log(probs)`` (a model's logits up to a constant per example, which softmax
    ignores). ``T**2`` keeps the soft-target gradients on the scale of the hard-label ones.

    Raises:
        ValueError: for ``temperature <= 0`` or ``alpha`` outside [0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    hard = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_true, student_probs))
    t_soft = tf.nn.softmax(_log_probs(teacher_probs) / temperature)
    s_log_soft = tf.nn.log_softmax(_log_probs(student_probs) / temperature)
    kl = tf.reduce_sum(t_soft * (tf.math.log(tf.clip_by_value(t_soft, 1e-12, 1.0)) - s_log_soft), axis=-1)
    return alpha * hard + (1.0 - alpha) * temperature**2 * tf.reduce_mean(kl)


class Distiller(keras.Model):
    """Train ``student`` against labels and a frozen ``teacher`` (see :func:`distillation_loss`).

    ``compile`` it with an optimizer and metrics (they see the student's predictions), then
    ``fit`` on ``(images, labels)``. Only the student's weights change. Keras 3.15 also ships
    ``keras.distillation.Distiller``, whose logits loss expects logit outputs; the series'
    models end in a softmax, hence this small class.
    """

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 4.0,
                 alpha: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"need temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = temperature
        self.alpha = alpha

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.student(x, training=training)

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None,
                     sample_weight: Any = None, training: bool = True) -> tf.Tensor:
        teacher_probs = tf.stop_gradient(self.teacher(x, training=False))
        return distillation_loss(y, y_pred, teacher_probs, self.temperature, self.alpha)


def train_student(
    student: keras.Model,
    train_ds: tf.data.Dataset,
    epochs: int,
    *,
    teacher: keras.Model | None = None,
    temperature: float = 4.0,
    alpha: float = 0.1,
    learning_rate: float = 2e-3,
    verbose: int | str = 0,
) -> keras.callbacks.History:
    """Train ``student`` in place for ``epochs``: with ``teacher`` by distillation, else on labels.

    Both variants use the same optimizer, learning rate, data and epochs, so the only
    difference is the loss. The teacher is frozen during distillation and its
    ``trainable`` flag restored afterwards; its weights never change.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    optimizer = keras.optimizers.Adam(learning_rate)
    if teacher is None:
        student.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return student.fit(train_ds, epochs=epochs, verbose=verbose, shuffle=False)
    was_trainable = teacher.trainable
    try:
        distiller = Distiller(student, teacher, temperature=temperature, alpha=alpha)
        distiller.compile(optimizer=optimizer, metrics=["accuracy"])
        return distiller.fit(train_ds, epochs=epochs, verbose=verbose, shuffle=False)
    finally:
        teacher.trainable = was_trainable  # the teacher is frozen only while it teaches


# --------------------------------------------------------------------------- reporting
def evaluate_variant(
    name: str,
    technique: str,
    model: keras.Model,
    tflite: bytes,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    latency_images: np.ndarray | None = None,
    latency_runs: int = 200,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Measure one compressed variant: one row for :func:`results_table`.

    ``model`` is the Keras model the flatbuffer ``tflite`` came from (parameters and
    non-zeros are counted there); accuracy and latency come from the LiteRT interpreter.
    """
    runner = LiteRTModel(tflite, num_threads=num_threads)
    acc = runner.accuracy(x_test, y_test)
    lat_x = x_test if latency_images is None else latency_images
    lat = runner.latency_ms(lat_x, n=latency_runs, warmup=min(20, latency_runs))
    return {
        "model": name,
        "technique": technique,
        "parameters": int(model.count_params()),
        "non-zero parameters": count_nonzero(model),
        "bytes on disk": len(tflite),
        "gzip bytes": gzip_size(tflite),
        "test accuracy": acc,
        "latency ms/image": float(np.median(lat)),
    }


def results_table(rows: Sequence[dict[str, Any]], baseline: str) -> pd.DataFrame:
    """Rows from :func:`evaluate_variant` as a table with compression ratios vs ``baseline``.

    ``compression ratio`` = baseline gzip bytes / this model's gzip bytes (what a download
    or an over-the-air update costs); ``file ratio`` uses the raw bytes on disk.

    Raises:
        ValueError: if ``baseline`` is not one of the rows' names.
    """
    if not rows:
        raise ValueError("results_table needs at least one row")
    table = pd.DataFrame(list(rows)).set_index("model")
    if baseline not in table.index:
        raise ValueError(f"baseline {baseline!r} is not among the rows {list(table.index)}")
    base = table.loc[baseline]
    table["file ratio"] = base["bytes on disk"] / table["bytes on disk"]
    table["compression ratio"] = base["gzip bytes"] / table["gzip bytes"]
    table["accuracy change (points)"] = 100 * (table["test accuracy"] - base["test accuracy"])
    cols = ["technique", "parameters", "non-zero parameters", "bytes on disk", "gzip bytes",
            "file ratio", "compression ratio", "test accuracy", "accuracy change (points)",
            "latency ms/image"]
    return table[[c for c in cols if c in table.columns]]


def plot_accuracy_vs_size(table: pd.DataFrame, size_column: str = "gzip bytes", ax: Any = None) -> Any:
    """Scatter of test accuracy against size (log scale), one labelled point per model."""
    import matplotlib.pyplot as plt

    if size_column not in table.columns or "test accuracy" not in table.columns:
        raise ValueError(f"table needs columns {size_column!r} and 'test accuracy'")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    techniques = list(dict.fromkeys(table["technique"])) if "technique" in table else [None]
    for i, tech in enumerate(techniques):
        part = table if tech is None else table[table["technique"] == tech]
        ax.scatter(part[size_column] / 1024, 100 * part["test accuracy"], s=60, color=f"C{i}", label=tech)
        for name, row in part.iterrows():
            ax.annotate(str(name), (row[size_column] / 1024, 100 * row["test accuracy"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"{size_column} (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    if techniques != [None]:
        ax.legend(fontsize=8)
    ax.set_title("Accuracy against size")
    return ax
