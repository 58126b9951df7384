"""Find the devices to train on: real GPUs when present, else N logical CPUs.

On a CPU-only machine the series splits the one physical CPU into ``N`` *logical*
devices (``/device:CPU:0`` … ``CPU:N-1``) with
:func:`tf.config.set_logical_device_configuration`. They share the same cores: they show
the *semantics* of multi-device training (placement, replication, communication), not a
speed-up.

``SERIES_NUM_CPUS`` sets N (default 4). It must be set before TensorFlow creates its
devices, i.e. before the first op runs; changing it afterwards needs a kernel restart.
"""

from __future__ import annotations

import os

import pandas as pd
import tensorflow as tf

NUM_CPUS_ENV = "SERIES_NUM_CPUS"
DEFAULT_NUM_CPUS = 4

RESTART_HINT = (
    "TensorFlow has already created its devices in this process, so the number of logical "
    "CPUs can no longer change. Restart the kernel (Kernel > Restart Kernel) and call "
    "utils.devices.setup_devices() in the first cells, before any other TensorFlow code."
)


def parse_num_cpus(value: object) -> int:
    """Validate a logical-CPU count given as an int or a string such as ``"4"``.

    Raises:
        ValueError: for anything that is not a whole number >= 1 (``"abc"``, ``0``, ``-2``).
    """
    text = str(value).strip()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(
            f"Number of logical CPUs must be a whole number >= 1, got {value!r}. "
            f"Example: `export {NUM_CPUS_ENV}=4`."
        ) from None
    if n < 1:
        raise ValueError(
            f"Number of logical CPUs must be >= 1, got {n}. Example: `export {NUM_CPUS_ENV}=4`."
        )
    return n


def requested_num_cpus(num_cpus: int | str | None = None) -> int:
    """The logical-CPU count to use: the argument, else ``$SERIES_NUM_CPUS``, else 4."""
    if num_cpus is None:
        num_cpus = os.environ.get(NUM_CPUS_ENV, DEFAULT_NUM_CPUS)
    return parse_num_cpus(num_cpus)


def short_device(name: str) -> str:
    """``'/job:localhost/replica:0/task:0/device:CPU:1'`` -> ``'CPU:1'`` (``''`` stays ``''``)."""
    return name.rsplit("device:", 1)[-1] if name else ""


_KEY_BASES: dict[tuple[str, ...], int] = {}
_KEY_SPACING = 100_000


def make_strategy(names: list[str] | None = None) -> tf.distribute.MirroredStrategy:
    """A ``MirroredStrategy`` with one replica per device (default: :func:`compute_devices`).

    Every ``MirroredStrategy`` numbers its collective groups from 1, so a 2-device strategy
    created after a 4-device one in the same process fails with "Device ... is joining a
    group with size 2, but that group has size 4". TensorFlow's own tests avoid this by
    shifting the (private) class attribute ``_collective_key_base``; so do we, one key range
    per device set, never the default range that DTensor uses.
    """
    names = list(compute_devices() if names is None else names)
    known = {short_device(d.name): d.name for d in tf.config.list_logical_devices()}
    unknown = [n for n in names if short_device(n) not in known]
    if not names or unknown:
        raise ValueError(
            f"Unknown or no device(s) {unknown or names}. This process has "
            f"{sorted(known.values())}: pick from utils.devices.compute_devices()."
        )
    chosen = [known[short_device(n)] for n in names]
    base = _KEY_BASES.setdefault(tuple(chosen), _KEY_SPACING * (len(_KEY_BASES) + 1))
    cls = tf.distribute.MirroredStrategy
    previous = cls._collective_key_base
    cls._collective_key_base = base
    try:
        return cls(chosen)
    finally:
        cls._collective_key_base = previous


def gpus() -> list[tf.config.PhysicalDevice]:
    """The physical GPUs TensorFlow can see (the CUDA driver probe's log line silenced)."""
    from utils import silenced_stderr

    with silenced_stderr():
        return tf.config.list_physical_devices("GPU")


def setup_devices(num_cpus: int | str | None = None) -> pd.DataFrame:
    """Configure devices once and return a table describing them.

    * With GPUs: turn on memory growth (so several notebooks can share a GPU) and use them.
    * Without: split the CPU into ``num_cpus`` logical devices (argument, else
      ``$SERIES_NUM_CPUS``, else 4).

    Calling it again with the same request is safe and returns the same table. It also
    sets TensorFlow's Python logger to WARNING, so INFO lines such as "Using
    MirroredStrategy with devices ..." do not clutter notebook outputs.

    Raises:
        ValueError: for a bad count (``"abc"``, ``0``).
        RuntimeError: if TensorFlow already initialised its devices with another
            configuration; the message says to restart the kernel.
    """
    tf.get_logger().setLevel("WARNING")
    physical_gpus = gpus()
    if physical_gpus:
        for gpu in physical_gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # already initialised: memory growth is a nicety, not a requirement
        return device_table()

    n = requested_num_cpus(num_cpus)
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return device_table()
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as err:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing == n:
            return device_table()
        raise RuntimeError(
            f"Cannot create {n} logical CPUs: TensorFlow already runs with {existing}. "
            f"{RESTART_HINT}"
        ) from err
    return device_table()


def compute_devices() -> list[str]:
    """Names of the devices to spread work over: all GPUs if any, else all logical CPUs."""
    logical_gpus = tf.config.list_logical_devices("GPU")
    chosen = logical_gpus or tf.config.list_logical_devices("CPU")
    return [d.name for d in chosen]


def device_kind() -> str:
    """``"GPU"`` when the series runs on real GPUs, else ``"CPU (logical)"``."""
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU (logical)"


def device_table() -> pd.DataFrame:
    """One row per logical device: name, type and what physical device backs it."""
    rows = []
    for d in tf.config.list_logical_devices():
        if d.device_type not in ("CPU", "GPU"):
            continue
        if d.device_type == "GPU":
            idx = int(d.name.rsplit(":", 1)[1])
            try:
                details = tf.config.experimental.get_device_details(gpus()[idx])
                backing = details.get("device_name", "GPU")
            except (IndexError, ValueError):
                backing = "GPU"
        else:
            backing = f"physical CPU ({os.cpu_count()} cores, shared)"
        rows.append({"device": d.name, "type": d.device_type, "backed by": backing})
    return pd.DataFrame(rows)


def set_threads(intra_op: int | None, inter_op: int | None) -> None:
    """Set TensorFlow's intra-/inter-op thread pools (must run before TF's first op).

    Raises:
        RuntimeError: if TensorFlow is already initialised (restart the kernel).
    """
    try:
        if intra_op is not None:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op is not None:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as err:
        raise RuntimeError(f"Thread pools are fixed once TensorFlow runs. {RESTART_HINT}") from err


def usable_cores() -> int:
    """CPU cores this process may run on (respects container and affinity limits)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def replica_threads(num_replicas: int, cores: int | None = None) -> tuple[int, int]:
    """Thread pools for ``num_replicas`` logical-CPU replicas sharing ``cores`` cores.

    With TensorFlow's defaults every op of every replica may use all cores (intra-op pool)
    while the replicas also run side by side (inter-op pool): N replicas on C cores ask for
    about N x C threads, which then wait for each other at every op and at the all-reduce.
    Giving each op ``cores // N`` threads (at least 1) and running up to ``N`` ops at once
    keeps the total near the core count.

    Returns:
        ``(intra_op, inter_op)`` for :func:`set_threads`.
    """
    n = parse_num_cpus(num_replicas)
    cores = usable_cores() if cores is None else parse_num_cpus(cores)
    return max(1, cores // n), max(2, n)
