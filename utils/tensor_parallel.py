"""Tensor parallelism with ``tf.experimental.dtensor``: meshes, sharded layers, checks.

Keras 3 layers do not accept DTensor layouts, and ``keras.distribution`` does not shard on
the TensorFlow backend, so the sharded layers here are small :class:`tf.Module` objects
whose weights are :class:`dtensor.DVariable` objects.

Vocabulary
    *mesh*: the devices arranged as a named grid, e.g. ``model=4`` (1-D) or
    ``batch=2 x model=2`` (2-D). Build one with :func:`create_mesh` or :func:`model_mesh`.
    *sharding spec*: for one tensor axis, the mesh dim it is split over, or
    ``dtensor.UNSHARDED`` (every device holds the whole axis).
    *layout*: a mesh plus one sharding spec per tensor axis. Build one with :func:`layout`.

Megatron-style MLP (Shoeybi et al., 2019)
    :class:`ColumnParallelDense` splits the kernel's *output* columns over the ``model``
    dim: every device computes a slice of the hidden units, no communication.
    :class:`RowParallelDense` splits the kernel's *input* rows the same way, so it consumes
    the column-parallel output in place; each device produces a partial sum of the full
    output and DTensor inserts the one all-reduce (sum) that completes it.
    :class:`ShardedMLP` chains the two.

Convolutions
    DTensor rejects a conv filter sharded on output channels ("Filter for convolution must
    have fully replicated layout"), so :class:`ChannelShardedConv2D` shards by hand: one
    filter slice per device under ``tf.device``, then a concatenation.

DTensor set-up
    In *local mode* (one process, its own CPUs or GPUs) a mesh only needs its devices to
    exist: call :func:`utils.devices.setup_devices` first. ``dtensor.initialize_accelerator_system``
    is not needed there (verified on TF 2.21 CPU; on CPU it would only re-create the logical
    CPUs, which ``setup_devices`` already did). Multi-host meshes need it, before any other
    TensorFlow op.

Compute gradients inside ``tf.function`` (see :func:`make_sgd_step`): in eager mode DTensor
cannot seed the tape with a plain tensor and, given an explicit seed, returns replicated
gradients for sharded weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow.experimental import dtensor

from utils import devices as _devices

MODEL_DIM = "model"
BATCH_DIM = "batch"
UNSHARDED = dtensor.UNSHARDED

ArrayLike = Any  # np.ndarray, tf.Tensor, DTensor or DVariable
Activation = str | Callable[[tf.Tensor], tf.Tensor] | None

__all__ = [
    "MODEL_DIM",
    "BATCH_DIM",
    "UNSHARDED",
    "create_mesh",
    "model_mesh",
    "mesh_table",
    "layout",
    "replicated",
    "check_divisible",
    "shard",
    "to_numpy",
    "spec_string",
    "shard_shapes",
    "layout_table",
    "bytes_per_device",
    "max_abs_diff",
    "max_rel_diff",
    "ColumnParallelDense",
    "RowParallelDense",
    "ShardedMLP",
    "ChannelShardedConv2D",
    "make_sgd_step",
    "compare_sgd_training",
    "sparse_cross_entropy",
]


# --------------------------------------------------------------------------- meshes


def _short(device: str) -> str:
    """``/job:localhost/replica:0/task:0/device:CPU:1`` -> ``CPU:1``."""
    spec = tf.DeviceSpec.from_string(device)
    return f"{spec.device_type}:{spec.device_index}" if spec.device_type else device


def create_mesh(
    dims: Sequence[tuple[str, int]] | Mapping[str, int],
    devices: Sequence[str] | None = None,
) -> dtensor.Mesh:
    """Build a DTensor mesh with named dims, e.g. ``[("batch", 2), ("model", 2)]``.

    Args:
        dims: ``(name, size)`` pairs (or a dict), outermost first. Names must be unique,
            non-empty strings; sizes whole numbers >= 1.
        devices: device names to lay out row-major over the mesh. ``None`` takes the first
            ``prod(sizes)`` of :func:`utils.devices.compute_devices` (GPUs if present, else
            the logical CPUs). An explicit list must have exactly ``prod(sizes)`` entries.

    Raises:
        ValueError: bad names or sizes, or a mesh shape that does not fit the devices
            (the message says how many are needed, how many exist and what to change).
    """
    pairs = list(dims.items()) if isinstance(dims, Mapping) else [tuple(d) for d in dims]
    if not pairs:
        raise ValueError('A mesh needs at least one dim, e.g. [("model", 4)].')
    names: list[str] = []
    sizes: list[int] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"Each mesh dim must be a (name, size) pair, got {pair!r}.")
        name, size = pair
        if not isinstance(name, str) or not name or name == UNSHARDED:
            raise ValueError(f"Mesh dim names must be non-empty strings, got {name!r}.")
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"Mesh dim {name!r} needs a whole-number size >= 1, got {size!r}.")
        names.append(name)
        sizes.append(int(size))
    if len(set(names)) != len(names):
        raise ValueError(f"Mesh dim names must be unique, got {names}.")
    needed = math.prod(sizes)
    shape = " x ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
    if devices is None:
        available = _devices.compute_devices()
        if needed > len(available):
            raise ValueError(
                f"Mesh {shape} needs {needed} devices but only {len(available)} are available "
                f"({', '.join(_short(d) for d in available)}). Choose dim sizes whose product "
                f"is at most {len(available)}, e.g. [('model', {len(available)})]; on a CPU-only "
                "machine you can instead restart the kernel with more logical CPUs "
                f"(export SERIES_NUM_CPUS={needed}) before utils.devices.setup_devices()."
            )
        chosen = list(available[:needed])
    else:
        chosen = list(devices)
        if len(chosen) != needed:
            raise ValueError(
                f"Mesh {shape} needs exactly {needed} devices, but {len(chosen)} were given "
                f"({', '.join(_short(d) for d in chosen)}). Pass {needed} device names or "
                "devices=None to take the first ones available."
            )
    kinds = {tf.DeviceSpec.from_string(d).device_type for d in chosen}
    if len(kinds) != 1:
        raise ValueError(f"All mesh devices must have one type, got {sorted(map(str, kinds))}.")
    return dtensor.create_mesh(list(zip(names, sizes, strict=True)), devices=chosen)


def model_mesh(
    num_devices: int | None = None,
    devices: Sequence[str] | None = None,
    model_dim: str = MODEL_DIM,
) -> dtensor.Mesh:
    """A 1-D mesh ``model=N``: one row of N devices that all hold slices of each layer.

    ``num_devices=None`` uses every device in ``devices`` (default:
    :func:`utils.devices.compute_devices`). ``num_devices=2`` on a 4-CPU process takes the
    first two.
    """
    if num_devices is None:
        num_devices = len(devices) if devices is not None else len(_devices.compute_devices())
    if devices is not None and len(devices) != num_devices:
        devices = list(devices)[:num_devices] if len(devices) > num_devices else devices
    return create_mesh([(model_dim, num_devices)], devices=devices)


def mesh_table(mesh: dtensor.Mesh) -> pd.DataFrame:
    """One row per device of ``mesh``: its short name and its coordinate on every dim."""
    rows = []
    for device, location in zip(mesh.local_devices(), mesh.local_device_locations(), strict=True):
        row = {"device": _short(device)}
        row.update({f"{name} index": location[name] for name in mesh.dim_names})
        rows.append(row)
    return pd.DataFrame(rows)


def _check_dim(mesh: dtensor.Mesh, name: str | None, role: str) -> None:
    if name is not None and name not in mesh.dim_names:
        raise ValueError(
            f"{role} {name!r} is not a dim of this mesh; its dims are {list(mesh.dim_names)}. "
            "Build the mesh with that name (create_mesh([(name, size), ...])) or pass one of "
            "the existing names."
        )


def layout(mesh: dtensor.Mesh, *specs: str | None) -> dtensor.Layout:
    """A layout from one spec per tensor axis: a mesh dim name, or ``None`` for unsharded.

    ``layout(mesh, None, "model")`` is a matrix whose columns are split over ``model``.

    Raises:
        ValueError: a name that is not a dim of ``mesh``, or a dim used twice.
    """
    clean = []
    for spec in specs:
        if spec is None or spec == UNSHARDED:
            clean.append(UNSHARDED)
            continue
        _check_dim(mesh, spec, "Sharding spec")
        clean.append(spec)
    used = [s for s in clean if s != UNSHARDED]
    if len(set(used)) != len(used):
        raise ValueError(f"A mesh dim can shard only one tensor axis, got specs {list(specs)}.")
    return dtensor.Layout(clean, mesh)


def replicated(mesh: dtensor.Mesh, rank: int) -> dtensor.Layout:
    """The fully replicated layout of a rank-``rank`` tensor: every device holds all of it."""
    return dtensor.Layout.replicated(mesh, rank)


def check_divisible(size: int, mesh: dtensor.Mesh, dim: str, what: str) -> None:
    """Raise a clear ``ValueError`` unless ``size`` splits evenly over mesh dim ``dim``.

    DTensor (and this module) only support even shards. The fix is a mesh size that
    divides ``size`` or padding ``size`` up to the next multiple (zero weights, then slice
    the padding off the output).
    """
    _check_dim(mesh, dim, "Mesh dim")
    n = mesh.dim_size(dim)
    if size % n:
        divisors = [d for d in range(1, min(size, 64) + 1) if size % d == 0]
        padded = -(-size // n) * n
        raise ValueError(
            f"Cannot shard {what} over mesh dim {dim!r} of size {n}: {size} is not divisible "
            f"by {n}, and DTensor needs equal shards. Use a {dim!r} size that divides {size} "
            f"(one of {divisors}), or pad to {padded} with zeros and slice the padding off "
            "the output."
        )


# --------------------------------------------------------------------------- conversion


def _as_tensor(t: ArrayLike) -> tf.Tensor:
    """A DVariable's value, or the tensor itself."""
    if isinstance(t, tf.Variable):
        return t.read_value()
    return t


def shard(value: ArrayLike, layout_: dtensor.Layout) -> tf.Tensor:
    """Turn an ordinary tensor or array into a DTensor with ``layout_``.

    Each device receives only its own slice (cut on the host, then packed), so a sharded
    weight never needs a full copy on any device.

    Raises:
        ValueError: rank mismatch, or a sharded axis that does not split evenly.
    """
    value = tf.convert_to_tensor(value)
    specs = layout_.sharding_specs
    if value.shape.rank != len(specs):
        raise ValueError(
            f"Layout has {len(specs)} sharding specs but the value has rank {value.shape.rank} "
            f"(shape {value.shape.as_list()})."
        )
    mesh = layout_.mesh
    for axis, spec in enumerate(specs):
        if spec != UNSHARDED:
            check_divisible(
                int(value.shape[axis]),
                mesh,
                spec,
                f"axis {axis} (size {value.shape[axis]}) of a tensor",
            )
    components = []
    with tf.device("/device:CPU:0"):
        for location in mesh.local_device_locations():
            piece = value
            for axis, spec in enumerate(specs):
                if spec == UNSHARDED:
                    continue
                n = mesh.dim_size(spec)
                step = int(value.shape[axis]) // n
                begin = [0] * len(specs)
                size = [-1] * len(specs)
                begin[axis] = location[spec] * step
                size[axis] = step
                piece = tf.slice(piece, begin, size)
            components.append(piece)
    return dtensor.pack(components, layout_)


def to_numpy(t: ArrayLike) -> np.ndarray:
    """Gather any tensor (DTensor, DVariable, sharded by hand or ordinary) into one array.

    For a DTensor the shards are copied to the host and put back in place by their mesh
    coordinates; no device ever holds the full tensor.
    """
    if isinstance(t, list | tuple):  # shards made by hand (ChannelShardedConv2D)
        raise TypeError("to_numpy takes one tensor; concatenate hand-made shards yourself.")
    t = _as_tensor(t)
    if not (isinstance(t, tf.Tensor) and dtensor.is_dtensor(t)):
        return np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    lay = dtensor.fetch_layout(t)
    mesh = lay.mesh
    specs = lay.sharding_specs
    out = np.empty(t.shape.as_list(), dtype=t.dtype.as_numpy_dtype)
    for piece, location in zip(dtensor.unpack(t), mesh.local_device_locations(), strict=True):
        index = []
        for axis, spec in enumerate(specs):
            if spec == UNSHARDED:
                index.append(slice(None))
            else:
                step = out.shape[axis] // mesh.dim_size(spec)
                index.append(slice(location[spec] * step, (location[spec] + 1) * step))
        out[tuple(index)] = piece.numpy()
    return out


def spec_string(t: ArrayLike) -> str:
    """The sharding spec of a DTensor as ``[unsharded, model]``; ``ordinary tensor`` if not."""
    t = _as_tensor(t)
    if not dtensor.is_dtensor(t):
        return "ordinary tensor"
    return "[" + ", ".join(dtensor.fetch_layout(t).sharding_specs) + "]"


def shard_shapes(t: ArrayLike | Sequence[tf.Variable]) -> list[tuple[str, tuple[int, ...]]]:
    """``(device, shape)`` of every shard actually stored.

    Accepts a DTensor/DVariable (its components), a list of per-device variables (shards
    made by hand, as in :class:`ChannelShardedConv2D`) or an ordinary tensor (one entry).
    """
    if isinstance(t, list | tuple):
        return [(_short(v.device), tuple(v.shape.as_list())) for v in t]
    t = _as_tensor(t)
    if dtensor.is_dtensor(t):
        return [(_short(p.device), tuple(p.shape.as_list())) for p in dtensor.unpack(t)]
    return [(_short(getattr(t, "device", "") or "host"), tuple(t.shape.as_list()))]


def _dtype_size(t: ArrayLike | Sequence[tf.Variable]) -> int:
    first = t[0] if isinstance(t, list | tuple) else t
    return tf.as_dtype(first.dtype).size


def _global_shape(t: ArrayLike | Sequence[tf.Variable], concat_axis: int = -1) -> tuple[int, ...]:
    if isinstance(t, list | tuple):
        shape = list(t[0].shape.as_list())
        shape[concat_axis] = sum(v.shape[concat_axis] for v in t)
        return tuple(shape)
    return tuple(_as_tensor(t).shape.as_list())


def layout_table(named: Mapping[str, ArrayLike | Sequence[tf.Variable]]) -> pd.DataFrame:
    """One row per named tensor: global shape, sharding spec, shard shape(s), devices."""
    rows = []
    for name, t in named.items():
        shards = shard_shapes(t)
        shapes = sorted({s for _, s in shards})
        rows.append(
            {
                "tensor": name,
                "global shape": str(_global_shape(t)),
                "sharding": "split by hand (last axis)"
                if isinstance(t, list | tuple)
                else spec_string(t),
                "shard shape": str(shapes[0]) if len(shapes) == 1 else str(shapes),
                "devices": ", ".join(d for d, _ in shards),
            }
        )
    return pd.DataFrame(rows)


def bytes_per_device(named: Mapping[str, ArrayLike | Sequence[tf.Variable]]) -> pd.DataFrame:
    """Bytes each device stores for each named weight, from the actual shard shapes.

    Columns: ``weight``, ``global shape``, ``sharding``, one column per device, ``total``
    (bytes of the unsharded weight) and ``per device / total`` (largest shard over total:
    ``1/N`` for a weight split N ways, 1 for a replicated one). A ``TOTAL`` row sums them.
    """
    rows = []
    device_order: list[str] = []
    for name, t in named.items():
        size = _dtype_size(t)
        per_device: dict[str, int] = {}
        for device, shape in shard_shapes(t):
            per_device[device] = per_device.get(device, 0) + math.prod(shape) * size
            if device not in device_order:
                device_order.append(device)
        total = math.prod(_global_shape(t)) * size
        row = {
            "weight": name,
            "global shape": str(_global_shape(t)),
            "sharding": "split by hand (last axis)"
            if isinstance(t, list | tuple)
            else spec_string(t),
        }
        row.update(per_device)
        row["total"] = total
        row["per device / total"] = f"{max(per_device.values()) / total:.3f}"
        rows.append(row)
    table = pd.DataFrame(rows)
    for device in device_order:
        table[device] = table[device].fillna(0).astype("int64")
    total_row: dict[str, Any] = {"weight": "TOTAL", "global shape": "", "sharding": ""}
    total_row.update({d: int(table[d].sum()) for d in device_order})
    total_row["total"] = int(table["total"].sum())
    total_row["per device / total"] = (
        f"{max(total_row[d] for d in device_order) / total_row['total']:.3f}"
    )
    table = pd.concat([table, pd.DataFrame([total_row])], ignore_index=True)
    return table[
        ["weight", "global shape", "sharding", *device_order, "total", "per device / total"]
    ]


def max_abs_diff(a: ArrayLike, b: ArrayLike) -> float:
    """Largest absolute element-wise difference after gathering both to the host.

    Raises:
        ValueError: if the shapes differ.
    """
    x = to_numpy(a).astype(np.float64)
    y = to_numpy(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"Shapes differ: {x.shape} vs {y.shape}.")
    return float(np.max(np.abs(x - y))) if x.size else 0.0


def max_rel_diff(a: ArrayLike, reference: ArrayLike) -> float:
    """``max|a - reference| / max|reference|``: the largest difference relative to the scale.

    Use it for tolerances that do not depend on the magnitude of the values compared
    (gradients of a mean loss are small, logits may be large). Returns the absolute
    difference when ``reference`` is all zeros.
    """
    diff = max_abs_diff(a, reference)
    scale = float(np.max(np.abs(to_numpy(reference).astype(np.float64)), initial=0.0))
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------- layers


_ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "linear": tf.identity,
    "relu": tf.nn.relu,
    "gelu": tf.nn.gelu,
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
}


def _float_dtype(dtype: tf.DType | str) -> tf.DType:
    """A floating TensorFlow dtype from a name or dtype, or a clear error."""
    try:
        out = tf.as_dtype(dtype)
    except TypeError:
        raise ValueError(f"Unknown dtype {dtype!r}; use 'float32', 'float64', ...") from None
    if not out.is_floating:
        raise ValueError(f"Weights need a floating dtype, got {out.name}.")
    return out


def _activation(activation: Activation) -> tuple[str, Callable[[tf.Tensor], tf.Tensor]]:
    if activation is None:
        return "linear", tf.identity
    if callable(activation):
        return getattr(activation, "__name__", "custom"), activation
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}, None, or an "
            "element-wise callable (column-parallel outputs are sharded, so it must not mix units)."
        )
    return activation, _ACTIVATIONS[activation]


def _keras_activation_raw(layer: keras.layers.Layer) -> str:
    name = keras.activations.serialize(layer.activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name", "custom"))
    return str(name)


def _keras_activation_name(layer: keras.layers.Layer) -> str:
    name = _keras_activation_raw(layer)
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Layer {layer.name!r} uses activation {name!r}, which this module does not map; "
            f"supported: {sorted(_ACTIVATIONS)}."
        )
    return name


def _glorot(
    fan_in: int, fan_out: int, shape: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=tuple(shape)).astype(np.float32)


def _check_kernel(kernel: np.ndarray, bias: np.ndarray | None, what: str) -> None:
    if kernel.ndim != 2:
        raise ValueError(f"{what} kernel must be 2-D (in_features, units), got {kernel.shape}.")
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise ValueError(
            f"{what} bias must have shape ({kernel.shape[1]},) to match the kernel, got {bias.shape}."
        )


def _check_keras_dense(layer: keras.layers.Layer) -> None:
    if not isinstance(layer, keras.layers.Dense):
        raise TypeError(f"Expected a keras.layers.Dense, got {type(layer).__name__}.")
    if not layer.built:
        raise ValueError(
            f"Dense layer {layer.name!r} is not built yet; call it on an input (or build the "
            "model) before converting it."
        )


class _DenseBase(tf.Module):
    """Shared code of the column- and row-parallel dense layers."""

    kernel_axis: int  # axis of the kernel split over ``model_dim``

    def __init__(
        self,
        kernel: ArrayLike,
        bias: ArrayLike | None,
        mesh: dtensor.Mesh,
        *,
        model_dim: str = MODEL_DIM,
        batch_dim: str | None = None,
        activation: Activation = None,
        dtype: tf.DType | str = tf.float32,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.dtype = _float_dtype(dtype)
        _check_dim(mesh, model_dim, "model_dim")
        _check_dim(mesh, batch_dim, "batch_dim")
        if batch_dim is not None and batch_dim == model_dim:
            raise ValueError("batch_dim and model_dim must be different mesh dims.")
        np_dtype = self.dtype.as_numpy_dtype
        kernel_np = to_numpy(kernel).astype(np_dtype)
        bias_np = None if bias is None else to_numpy(bias).astype(np_dtype)
        what = type(self).__name__
        _check_kernel(kernel_np, bias_np, what)
        size = kernel_np.shape[self.kernel_axis]
        sharded = (
            "output units (kernel columns)"
            if self.kernel_axis == 1
            else "input features (kernel rows)"
        )
        label = f" {name!r}" if name else ""
        check_divisible(size, mesh, model_dim, f"the {size} {sharded} of {what}{label}")
        self.mesh = mesh
        self.model_dim = model_dim
        self.batch_dim = batch_dim
        self.in_features, self.units = kernel_np.shape
        self.activation_name, self._activation = _activation(activation)
        specs = [None, None]
        specs[self.kernel_axis] = model_dim
        with self.name_scope:
            self.kernel = dtensor.DVariable(shard(kernel_np, layout(mesh, *specs)), name="kernel")
            self.bias = (
                None
                if bias_np is None
                else dtensor.DVariable(shard(bias_np, self._bias_layout()), name="bias")
            )

    def _bias_layout(self) -> dtensor.Layout:
        raise NotImplementedError

    @property
    def input_layout(self) -> dtensor.Layout:
        raise NotImplementedError

    @property
    def output_layout(self) -> dtensor.Layout:
        raise NotImplementedError

    @classmethod
    def create(
        cls,
        in_features: int,
        units: int,
        mesh: dtensor.Mesh,
        *,
        seed: int = 0,
        use_bias: bool = True,
        **kwargs: Any,
    ):
        """A new layer with Glorot-uniform kernel and zero bias, drawn on the host.

        The global weights depend only on ``seed`` and the shapes, not on the mesh, so the
        same seed gives the same layer on 1, 2 or N devices. ``kwargs`` go to the
        constructor (``model_dim``, ``batch_dim``, ``activation``, ``dtype``, ``name``).
        """
        rng = np.random.default_rng(seed)
        kernel = _glorot(in_features, units, (in_features, units), rng)
        bias = np.zeros(units, np.float32) if use_bias else None
        return cls(kernel, bias, mesh, **kwargs)

    @classmethod
    def from_keras(cls, layer: keras.layers.Dense, mesh: dtensor.Mesh, **kwargs: Any):
        """Shard a built Keras ``Dense`` layer's weights (its activation and dtype are kept)."""
        _check_keras_dense(layer)
        kwargs.setdefault("activation", _keras_activation_name(layer))
        kwargs.setdefault("dtype", layer.kernel.dtype)
        kwargs.setdefault("name", layer.name)
        bias = layer.bias.numpy() if layer.use_bias else None
        return cls(layer.kernel.numpy(), bias, mesh, **kwargs)

    def get_weights(self) -> list[np.ndarray]:
        """The full (gathered) weights in Keras order: ``[kernel, bias]``."""
        return [to_numpy(self.kernel)] + ([] if self.bias is None else [to_numpy(self.bias)])

    def set_weights(self, weights: Sequence[ArrayLike]) -> None:
        """Load full weights (Keras order), re-sharding them onto the mesh."""
        expected = 1 if self.bias is None else 2
        if len(weights) != expected:
            raise ValueError(f"Expected {expected} arrays [kernel(, bias)], got {len(weights)}.")
        np_dtype = self.dtype.as_numpy_dtype
        self.kernel.assign(
            shard(np.asarray(weights[0], np_dtype), dtensor.fetch_layout(self.kernel))
        )
        if self.bias is not None:
            self.bias.assign(
                shard(np.asarray(weights[1], np_dtype), dtensor.fetch_layout(self.bias))
            )

    def to_keras(self, layer: keras.layers.Dense) -> keras.layers.Dense:
        """Copy the gathered weights into a built Keras ``Dense`` layer; returns it."""
        _check_keras_dense(layer)
        layer.set_weights(self.get_weights())
        return layer

    def weights(self) -> dict[str, tf.Variable]:
        """``{"<name>/kernel": ..., "<name>/bias": ...}`` for tables."""
        out = {f"{self.name}/kernel": self.kernel}
        if self.bias is not None:
            out[f"{self.name}/bias"] = self.bias
        return out

    def _prepare(self, x: ArrayLike) -> tf.Tensor:
        """Cast to the layer's dtype; shard an ordinary eager input with :attr:`input_layout`.

        DTensors (and symbolic tensors inside ``tf.function``) keep their layout.
        """
        if isinstance(x, np.ndarray) or (
            tf.executing_eagerly() and isinstance(x, tf.Tensor) and not dtensor.is_dtensor(x)
        ):
            return shard(tf.cast(x, self.dtype), self.input_layout)
        return x if x.dtype == self.dtype else tf.cast(x, self.dtype)


class ColumnParallelDense(_DenseBase):
    """Dense layer whose kernel columns (output units) are split over ``model_dim``.

    Layouts (``b`` = ``batch_dim`` or unsharded, ``m`` = ``model_dim``):
    kernel ``[unsharded, m]``, bias ``[m]``, input ``[b, unsharded]``, output ``[b, m]``.
    Each device computes ``units / N`` output units from the whole input: no communication
    in the forward pass. In the backward pass the input gradient is a sum over all units,
    i.e. one all-reduce (DTensor inserts it).
    """

    kernel_axis = 1

    def _bias_layout(self) -> dtensor.Layout:
        return layout(self.mesh, self.model_dim)

    @property
    def input_layout(self) -> dtensor.Layout:
        return layout(self.mesh, self.batch_dim, None)

    @property
    def output_layout(self) -> dtensor.Layout:
        return layout(self.mesh, self.batch_dim, self.model_dim)

    def __call__(self, x: ArrayLike) -> tf.Tensor:
        """``activation(x @ kernel + bias)``; ``x`` may be an ordinary eager tensor."""
        y = tf.matmul(self._prepare(x), self.kernel)
        if self.bias is not None:
            y = y + self.bias
        return self._activation(y)


class RowParallelDense(_DenseBase):
    """Dense layer whose kernel rows (input features) are split over ``model_dim``.

    Layouts: kernel ``[m, unsharded]``, bias ``[unsharded]`` (replicated), input ``[b, m]``
    (exactly what :class:`ColumnParallelDense` outputs), output ``[b, unsharded]``.
    Each device multiplies its input slice by its kernel rows, giving a *partial sum* of the
    full output; DTensor's SPMD expansion of the matmul adds one all-reduce (sum over
    ``model_dim``) to complete it. The bias is added once, after the all-reduce.
    """

    kernel_axis = 0

    def _bias_layout(self) -> dtensor.Layout:
        return layout(self.mesh, None)

    @property
    def input_layout(self) -> dtensor.Layout:
        return layout(self.mesh, self.batch_dim, self.model_dim)

    @property
    def output_layout(self) -> dtensor.Layout:
        return layout(self.mesh, self.batch_dim, None)

    def partial_sums(self, x: ArrayLike) -> list[tf.Tensor]:
        """The all-reduce done by hand: each device's ``x_shard @ kernel_shard``.

        Returns one ordinary tensor per mesh device (on that device). Each is a *partial*
        sum of the output (no bias); on a 1-D mesh their sum is the full matmul output,
        which is exactly what the all-reduce in :meth:`__call__` computes. (On a 2-D mesh,
        sum the devices that share a ``batch_dim`` coordinate.)
        """
        x = self._prepare(x)
        xs = dtensor.unpack(x)
        ks = dtensor.unpack(self.kernel.read_value())
        outs = []
        for xi, ki, device in zip(xs, ks, self.mesh.local_devices(), strict=True):
            with tf.device(device):
                outs.append(tf.matmul(xi, ki))
        return outs

    def __call__(self, x: ArrayLike) -> tf.Tensor:
        """``activation(all_reduce(x_shard @ kernel_shard) + bias)``."""
        y = tf.matmul(self._prepare(x), self.kernel)
        # Pin the all-reduced result to the replicated-over-model layout.
        y = dtensor.relayout(y, self.output_layout)
        if self.bias is not None:
            y = y + self.bias
        return self._activation(y)


class ShardedMLP(tf.Module):
    """Megatron MLP: column-parallel dense, element-wise activation, row-parallel dense.

    The hidden activations stay sharded between the two layers, so the forward pass has
    exactly one all-reduce (inside the row-parallel matmul) and the backward pass one more
    (the gradient of the column-parallel input).
    """

    def __init__(self, column: ColumnParallelDense, row: RowParallelDense, name: str | None = None):
        super().__init__(name=name)
        if column.mesh != row.mesh or column.model_dim != row.model_dim:
            raise ValueError("Both layers must use the same mesh and model_dim.")
        if column.batch_dim != row.batch_dim:
            raise ValueError("Both layers must use the same batch_dim.")
        if column.dtype != row.dtype:
            raise ValueError(
                f"Both layers must have one dtype, got {column.dtype.name} and {row.dtype.name}."
            )
        if column.units != row.in_features:
            raise ValueError(
                f"Column layer has {column.units} units but the row layer expects "
                f"{row.in_features} input features."
            )
        self.column = column
        self.row = row
        self.mesh = column.mesh
        self.model_dim = column.model_dim
        self.batch_dim = column.batch_dim
        self.dtype = column.dtype

    @classmethod
    def create(
        cls,
        in_features: int,
        hidden: int,
        out_features: int,
        mesh: dtensor.Mesh,
        *,
        model_dim: str = MODEL_DIM,
        batch_dim: str | None = None,
        activation: Activation = "relu",
        seed: int = 0,
        dtype: tf.DType | str = tf.float32,
        name: str | None = None,
    ) -> ShardedMLP:
        """New MLP ``in -> hidden (activation) -> out``; same weights for any mesh size."""
        common = {"model_dim": model_dim, "batch_dim": batch_dim, "dtype": dtype}
        column = ColumnParallelDense.create(
            in_features, hidden, mesh, seed=seed, activation=activation, name="dense1", **common
        )
        row = RowParallelDense.create(
            hidden, out_features, mesh, seed=seed + 1, name="output", **common
        )
        return cls(column, row, name=name)

    @classmethod
    def from_keras(
        cls,
        dense1: keras.layers.Dense,
        dense2: keras.layers.Dense,
        mesh: dtensor.Mesh,
        *,
        model_dim: str = MODEL_DIM,
        batch_dim: str | None = None,
        dtype: tf.DType | str | None = None,
        name: str | None = None,
    ) -> ShardedMLP:
        """Shard two built Keras ``Dense`` layers (first column-, second row-parallel).

        The second layer must have a linear activation (softmax would need the full row
        *after* the all-reduce; apply it yourself or use a loss ``from_logits``).
        ``dtype=None`` keeps the layers' variable dtype; ``"float64"`` makes a float64 copy.
        """
        _check_keras_dense(dense2)
        if _keras_activation_raw(dense2) != "linear":
            raise ValueError(
                f"The row-parallel layer {dense2.name!r} must be linear (got "
                f"{_keras_activation_raw(dense2)!r}): its output only exists after the "
                "all-reduce. Use logits and a from_logits loss, or apply softmax yourself."
            )
        common: dict[str, Any] = {"model_dim": model_dim, "batch_dim": batch_dim}
        if dtype is not None:
            common["dtype"] = dtype
        column = ColumnParallelDense.from_keras(dense1, mesh, **common)
        row = RowParallelDense.from_keras(dense2, mesh, **common)
        return cls(column, row, name=name)

    def to_keras(self, dense1: keras.layers.Dense, dense2: keras.layers.Dense) -> None:
        """Copy the gathered weights back into two built Keras ``Dense`` layers."""
        self.column.to_keras(dense1)
        self.row.to_keras(dense2)

    @property
    def input_layout(self) -> dtensor.Layout:
        return self.column.input_layout

    def __call__(self, x: ArrayLike) -> tf.Tensor:
        """Logits with layout ``[batch_dim, unsharded]``."""
        return self.row(self.column(x))

    def activations(self, x: ArrayLike) -> dict[str, tf.Tensor]:
        """Every intermediate tensor of a forward pass, for layout tables."""
        x = self.column._prepare(x)
        pre = tf.matmul(x, self.column.kernel) + self.column.bias
        hidden = self.column._activation(pre)
        partial = tf.matmul(hidden, self.row.kernel)
        out = self.row(hidden)
        return {
            "input x": x,
            "dense1 pre-activation": pre,
            "dense1 output (hidden)": hidden,
            "output matmul (after all-reduce)": partial,
            "logits": out,
        }

    def weights(self) -> dict[str, tf.Variable]:
        """All weights by name (``dense1/kernel``, ``dense1/bias``, ``output/kernel``, ...)."""
        return {**self.column.weights(), **self.row.weights()}

    def get_weights(self) -> list[np.ndarray]:
        """Gathered weights, Keras order for ``[dense1, dense2]``."""
        return self.column.get_weights() + self.row.get_weights()


# --------------------------------------------------------------------------- convolution


class ChannelShardedConv2D(tf.Module):
    """2-D convolution split over output channels by hand, one filter slice per device.

    DTensor refuses a conv filter sharded on its output channels, so each device holds an
    ordinary ``tf.Variable`` slice ``[kh, kw, c_in, c_out/N]`` (and its bias slice) under
    ``tf.device``; the input is copied to every device, each computes its channels, and the
    slices are concatenated on ``output_device``. Gradients flow through ordinary autodiff.

    Raises:
        ValueError: if ``c_out`` is not divisible by the number of devices.
    """

    def __init__(
        self,
        kernel: ArrayLike,
        bias: ArrayLike | None,
        devices: Sequence[str],
        *,
        strides: int | tuple[int, int] = 1,
        padding: str = "VALID",
        activation: Activation = None,
        output_device: str | None = None,
        dtype: tf.DType | str = tf.float32,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.dtype = _float_dtype(dtype)
        devices = list(devices)
        if not devices:
            raise ValueError("ChannelShardedConv2D needs at least one device.")
        kernel_np = to_numpy(kernel).astype(self.dtype.as_numpy_dtype)
        if kernel_np.ndim != 4:
            raise ValueError(
                f"Conv kernel must be 4-D (kh, kw, c_in, c_out), got {kernel_np.shape}."
            )
        c_out = kernel_np.shape[-1]
        bias_np = None if bias is None else to_numpy(bias).astype(self.dtype.as_numpy_dtype)
        if bias_np is not None and bias_np.shape != (c_out,):
            raise ValueError(f"Conv bias must have shape ({c_out},), got {bias_np.shape}.")
        n = len(devices)
        if c_out % n:
            divisors = [d for d in range(1, c_out + 1) if c_out % d == 0]
            raise ValueError(
                f"Cannot split {c_out} output channels over {n} devices: {c_out} is not "
                f"divisible by {n}. Use a device count in {divisors}, or pad the filter with "
                f"zero channels up to {-(-c_out // n) * n} and drop them from the output."
            )
        if padding.upper() not in ("VALID", "SAME"):
            raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}.")
        self.devices = devices
        self.output_device = output_device or devices[0]
        self.strides = strides
        self.padding = padding.upper()
        self.activation_name, self._activation = _activation(activation)
        self.filters = c_out
        step = c_out // n
        self.kernels: list[tf.Variable] = []
        self.biases: list[tf.Variable] = []
        with self.name_scope:
            for i, device in enumerate(devices):
                with tf.device(device):
                    self.kernels.append(
                        tf.Variable(kernel_np[..., i * step : (i + 1) * step], name=f"kernel_{i}")
                    )
                    if bias_np is not None:
                        self.biases.append(
                            tf.Variable(bias_np[i * step : (i + 1) * step], name=f"bias_{i}")
                        )

    @classmethod
    def from_keras(cls, layer: keras.layers.Conv2D, devices: Sequence[str], **kwargs: Any):
        """Split a built Keras ``Conv2D`` (groups=1, dilation 1, channels_last)."""
        if not isinstance(layer, keras.layers.Conv2D):
            raise TypeError(f"Expected a keras.layers.Conv2D, got {type(layer).__name__}.")
        if not layer.built:
            raise ValueError(f"Conv2D layer {layer.name!r} is not built yet; call it first.")
        if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1):
            raise ValueError("Only groups=1 and dilation_rate=1 convolutions are supported.")
        if layer.data_format != "channels_last":
            raise ValueError("Only channels_last convolutions are supported.")
        kwargs.setdefault("strides", tuple(layer.strides))
        kwargs.setdefault("padding", layer.padding)
        kwargs.setdefault("activation", _keras_activation_name(layer))
        kwargs.setdefault("dtype", layer.kernel.dtype)
        kwargs.setdefault("name", layer.name)
        bias = layer.bias.numpy() if layer.use_bias else None
        return cls(layer.kernel.numpy(), bias, devices, **kwargs)

    def partial_outputs(self, x: ArrayLike) -> list[tf.Tensor]:
        """Each device's output channels (before concatenation), one tensor per device."""
        x = tf.cast(x, self.dtype)
        outs = []
        for i, device in enumerate(self.devices):
            with tf.device(device):
                y = tf.nn.conv2d(x, self.kernels[i], strides=self.strides, padding=self.padding)
                if self.biases:
                    y = y + self.biases[i]
                outs.append(self._activation(y))
        return outs

    def __call__(self, x: ArrayLike) -> tf.Tensor:
        """The full output (all channels), gathered on ``output_device``."""
        parts = self.partial_outputs(x)
        with tf.device(self.output_device):
            return tf.concat(parts, axis=-1)

    def get_weights(self) -> list[np.ndarray]:
        """Gathered ``[kernel, bias]`` in Keras order."""
        kernel = np.concatenate([k.numpy() for k in self.kernels], axis=-1)
        if not self.biases:
            return [kernel]
        return [kernel, np.concatenate([b.numpy() for b in self.biases])]

    def to_keras(self, layer: keras.layers.Conv2D) -> keras.layers.Conv2D:
        """Copy the gathered weights into a built Keras ``Conv2D``; returns it."""
        layer.set_weights(self.get_weights())
        return layer

    def weights(self) -> dict[str, list[tf.Variable]]:
        """``{"<name>/kernel": [per-device slices], "<name>/bias": [...]}`` for tables."""
        out: dict[str, list[tf.Variable]] = {f"{self.name}/kernel": list(self.kernels)}
        if self.biases:
            out[f"{self.name}/bias"] = list(self.biases)
        return out


# --------------------------------------------------------------------------- training


def sparse_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of integer ``labels``; works on DTensors and tensors."""
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_mean(losses)


def make_sgd_step(
    module: tf.Module,
    learning_rate: float,
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] = sparse_cross_entropy,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A compiled step ``step(x, y) -> loss`` doing plain SGD on ``module``'s variables.

    Works for DTensor modules (pass ``x``/``y`` as DTensors laid out on the module's mesh;
    every gradient gets the layout of its weight, so ``w -= lr * g`` runs shard by shard)
    and for ordinary modules such as :class:`ChannelShardedConv2D`.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    variables = module.trainable_variables
    if not variables:
        raise ValueError(f"Module {module.name!r} has no trainable variables.")

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(module(x), y)
        grads = tape.gradient(loss, variables)
        for var, grad in zip(variables, grads, strict=True):
            var.assign_sub(learning_rate * grad)
        return loss

    return step


def compare_sgd_training(
    model: keras.Model,
    module: ShardedMLP,
    batches: Iterable[tuple[ArrayLike, ArrayLike]],
    learning_rate: float,
) -> pd.DataFrame:
    """Train a Keras model and its sharded copy side by side with plain SGD; one row per step.

    ``model`` (uncompiled or compiled; it is re-compiled here) runs ``train_on_batch`` on
    one device with ``keras.optimizers.SGD(learning_rate)`` and a from-logits sparse
    cross-entropy in the model's dtype; ``module`` runs :func:`make_sgd_step`. Both must
    start from the same weights (``module.get_weights()`` in ``model.get_weights()`` order).

    Columns: ``step``, ``loss one device``, ``loss sharded``, ``|loss diff|``, ``weights
    rel diff`` (:func:`max_rel_diff` over all weights after the step), ``s one device`` and
    ``s sharded`` (wall time of the step).

    Keras reports its loss through a float32 metric, so ``|loss diff|`` cannot go below
    float32 rounding even for float64 models; compare weights for tighter checks.

    Raises:
        ValueError: weights that differ at the start, or, for non-float32 models, a learning
            rate that float32 cannot represent exactly (Keras stores it as float32, which
            alone makes float64 runs differ by about 1e-8).
    """
    dtype = tf.as_dtype(model.layers[-1].kernel.dtype)
    if dtype != tf.float32 and float(np.float32(learning_rate)) != learning_rate:
        raise ValueError(
            f"learning_rate {learning_rate!r} is not exactly representable in float32 (Keras "
            f"stores it as {float(np.float32(learning_rate))!r}); pick one that is, e.g. 0.0625."
        )
    start = max(
        (
            max_rel_diff(a, b)
            for a, b in zip(module.get_weights(), model.get_weights(), strict=True)
        ),
        default=0.0,
    )
    if start > 0:
        raise ValueError(
            f"The two models start from different weights (relative diff {start:.2e})."
        )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype.name),
        jit_compile=False,
    )
    step_fn = make_sgd_step(module, learning_rate)
    label_layout = layout(module.mesh, module.batch_dim)
    rows = []
    for i, (x, y) in enumerate(batches):
        x = np.asarray(x, dtype.as_numpy_dtype)
        y = np.asarray(y, np.int32)
        t0 = time.perf_counter()
        ref_loss = float(model.train_on_batch(x, y))
        t1 = time.perf_counter()
        loss = step_fn(shard(x, module.input_layout), shard(y, label_layout))
        sharded_loss = float(to_numpy(loss))
        t2 = time.perf_counter()
        diff = max(
            max_rel_diff(a, b)
            for a, b in zip(module.get_weights(), model.get_weights(), strict=True)
        )
        rows.append(
            {
                "step": i,
                "loss one device": ref_loss,
                "loss sharded": sharded_loss,
                "|loss diff|": abs(sharded_loss - ref_loss),
                "weights rel diff": diff,
                "s one device": t1 - t0,
                "s sharded": t2 - t1,
            }
        )
    if not rows:
        raise ValueError("No batches given.")
    return pd.DataFrame(rows)
