"""Infrastructure for notebook 10 (model compression): file sizes, LiteRT conversion and running.

The compression algorithms themselves (magnitude pruning, fake quantization for QAT,
distillation) are written in ``notebooks/10_model_compression`` and exported to
``utils.lessons.model_compression``. What stays here is plumbing the notebook should not
spend cells on:

- :func:`gzip_size` and :func:`weights_size`: bytes of a model, raw and gzip-compressed
  (zeros only shrink a file once it is compressed);
- :func:`to_tflite`: ``TFLiteConverter`` with the float32, dynamic-range, float16, full int8
  and QAT recipes;
- :class:`LiteRTModel`: a flatbuffer on the LiteRT interpreter of ``ai-edge-litert`` (the
  replacement for the deprecated ``tf.lite.Interpreter``), with input quantization, batched
  prediction, accuracy, batch-1 latency and a look at the graph's ops and dtypes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import tempfile
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from utils import config, silenced_stderr
from utils.data import to_float


def gzip_size(content: bytes) -> int:
    """Bytes after gzip (level 9, fixed timestamp: the same input always gives the same size)."""
    return len(gzip.compress(bytes(content), compresslevel=9, mtime=0))


def weights_size(model: keras.Model) -> dict[str, int]:
    """Bytes of the model's ``.weights.h5`` file, raw and gzipped (optimizer state left out)."""
    clean = model.__class__.from_config(model.get_config())  # uncompiled: no Adam moments in the file
    clean.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.weights.h5"
        clean.save_weights(path)
        content = path.read_bytes()
    return {"bytes": len(content), "gzip bytes": gzip_size(content)}


def to_tflite(model: keras.Model, mode: str = "float32", representative: np.ndarray | None = None) -> bytes:
    """Convert a Keras model to a LiteRT flatbuffer.

    ``mode``: ``"float32"`` (no optimization), ``"dynamic"`` (int8 weights, float
    activations), ``"float16"`` (float16 weights), ``"int8"`` (weights and activations,
    ranges calibrated on the ``representative`` images, int8 input and output) or ``"qat"``
    (a model with fake-quantization ops: the ranges come from them, int8 input and output).
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        images = to_float(representative)
        converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if mode in ("int8", "qat"):
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    # the converter prints progress lines from Python and from C++: keep them out of the notebook
    with config.quiet_tf_logs(), silenced_stderr(), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Statistics for quantized inputs were expected" (int8 I/O)
        return converter.convert()


class LiteRTModel:
    """A converted model on the LiteRT interpreter; inputs are uint8 images or floats in [0, 1]."""

    def __init__(self, content: bytes, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.content, self.num_threads = content, num_threads
        with silenced_stderr():  # the XNNPACK delegate announces itself on stderr
            self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
            self.interpreter.allocate_tensors()
        self.input, self.output = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        self.input_dtype, self.output_dtype = np.dtype(self.input["dtype"]), np.dtype(self.output["dtype"])
        self.batch = int(self.input["shape"][0])

    def op_types(self) -> list[str]:
        """The graph's operators in order (``DELEGATE`` nodes, added at run time, left out)."""
        ops = self.interpreter._get_ops_details()
        return [op["op_name"] for op in ops if op["op_name"] != "DELEGATE"]

    def tensor_dtypes(self) -> set[str]:
        """The dtypes of the graph's tensors (``{"int8", "int32"}`` for an integer-only model)."""
        return {np.dtype(t["dtype"]).name for t in self.interpreter.get_tensor_details()}

    def quantize_input(self, images: np.ndarray) -> np.ndarray:
        x = to_float(images)
        if self.input_dtype == np.float32:
            return x
        scale, zero = self.input["quantization"]
        return np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)

    def run(self, xq: np.ndarray) -> np.ndarray:
        """One ``invoke`` on an already quantized batch; returns float32 outputs."""
        if len(xq) != self.batch:
            self.interpreter.resize_tensor_input(self.input["index"], list(xq.shape))
            self.interpreter.allocate_tensors()
            self.batch = len(xq)
        self.interpreter.set_tensor(self.input["index"], xq)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"]).astype(np.float32)
        if self.output_dtype == np.float32:
            return y
        scale, zero = self.output["quantization"]
        return (y - zero) * scale

    def predict(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        """Class probabilities for ``images`` (the last partial batch is padded, not resized)."""
        outs = []
        for start in range(0, len(images), batch_size):
            chunk = self.quantize_input(images[start : start + batch_size])
            n = len(chunk)
            if start and n < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
            outs.append(self.run(chunk)[:n])
        return np.concatenate(outs)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Top-1 accuracy."""
        return float(np.mean(np.argmax(self.predict(images), axis=-1) == np.asarray(labels)))

    def latency_ms(self, images: np.ndarray, runs: int = 200, warmup: int = 20) -> float:
        """Median milliseconds per image at batch 1, on a fresh interpreter (set input, invoke, read)."""
        single = LiteRTModel(self.content, self.num_threads)
        xq = single.quantize_input(images[: runs + warmup])
        times = []
        for i in range(runs + warmup):
            t0 = time.perf_counter()
            single.run(xq[i % len(xq)][None])
            times.append(1e3 * (time.perf_counter() - t0))
        return float(np.median(times[warmup:]))
