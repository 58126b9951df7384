"""Find the devices to train on: real GPUs when present, else N logical CPUs.

On a CPU-only machine the series splits the one physical CPU into ``N`` *logical*
devices (``/device:CPU:0`` … ``CPU:N-1``) with
:func:`tf.config.set_logical_device_configuration`. They share the same cores: they show
the *semantics* of multi-device training (placement, replication, communication), not a
speed-up.

``SERIES_NUM_CPUS`` sets N (default 4, at most 64). On a machine with exactly one GPU,
``SERIES_NUM_GPUS=N`` (2-4) splits that GPU into ``N`` logical GPUs with a memory limit
each, so the multi-device notebooks have several devices there too. Both must be set
before TensorFlow creates its devices, i.e. before the first op runs; changing them
afterwards needs a kernel restart.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass

import pandas as pd
import tensorflow as tf

NUM_CPUS_ENV = "SERIES_NUM_CPUS"
DEFAULT_NUM_CPUS = 4
MAX_NUM_CPUS = 64  # beyond this the logical CPUs only multiply threads on the same cores
NUM_GPUS_ENV = "SERIES_NUM_GPUS"
MAX_GPU_SPLIT = 4
GPU_MEMORY_SHARE = 0.9  # of the GPU's memory, split evenly; the rest is left to CUDA itself
DEFAULT_GPU_MEMORY_MB = 8192  # assumed when nvidia-smi cannot tell the GPU's memory

_RESTART = (
    "Restart the kernel (Kernel > Restart Kernel) and call "
    "utils.devices.setup_devices() in the first cells, before any other TensorFlow code."
)
RESTART_HINT = (
    "TensorFlow has already created its devices in this process, so the number of logical "
    f"CPUs can no longer change. {_RESTART}"
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
    """The logical-CPU count to use: the argument, else ``$SERIES_NUM_CPUS``, else 4.

    Raises:
        ValueError: for a bad count or one above :data:`MAX_NUM_CPUS`.
    """
    if num_cpus is None:
        num_cpus = os.environ.get(NUM_CPUS_ENV, DEFAULT_NUM_CPUS)
    n = parse_num_cpus(num_cpus)
    if n <= MAX_NUM_CPUS:
        return n
    raise ValueError(
        f"Number of logical CPUs must be at most {MAX_NUM_CPUS}, got {n}: logical CPUs share "
        f"the same cores, so more only adds threads and memory. Example: `export {NUM_CPUS_ENV}=4`."
    )


def requested_gpu_split(value: int | str | None = None) -> int:
    """Logical GPUs to carve from one GPU: the argument, else ``$SERIES_NUM_GPUS``; 1 = no split.

    Raises:
        ValueError: for anything but a whole number from 1 to :data:`MAX_GPU_SPLIT`.
    """
    if value is None:
        value = os.environ.get(NUM_GPUS_ENV, "").strip() or 1
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_GPU_SPLIT:
        raise ValueError(
            f"Number of logical GPUs must be a whole number from 1 to {MAX_GPU_SPLIT}, got "
            f"{value!r}. Example: `export {NUM_GPUS_ENV}=2` splits one GPU into two; unset it "
            "to use the GPUs as they are."
        )
    return int(text)


@dataclass(frozen=True)
class GpuPlan:
    """What :func:`setup_devices` does with the GPUs (see :func:`plan_gpus`)."""

    split: int  # logical GPUs carved from the one physical GPU; 0: no split (memory growth)
    memory_mb: int  # memory limit of each logical GPU (0 without a split)
    note: str  # one line saying what was chosen and why


def plan_gpus(num_physical: int, memory_mb: int | None, request: int) -> GpuPlan:
    """Decide, without touching TensorFlow, how to configure ``num_physical`` GPUs.

    A split is made only for ``request`` >= 2 on exactly one GPU: each logical GPU gets an
    equal share of :data:`GPU_MEMORY_SHARE` of ``memory_mb`` (:data:`DEFAULT_GPU_MEMORY_MB`
    when unknown). Several physical GPUs are used as they are, with memory growth.
    """
    if num_physical == 0:
        return GpuPlan(0, 0, "no GPU: logical CPUs instead")
    if request <= 1:
        return GpuPlan(0, 0, f"{num_physical} GPU(s) as they are, memory growth on")
    if num_physical > 1:
        return GpuPlan(
            0, 0, f"{num_physical} GPUs as they are, memory growth on "
            f"(${NUM_GPUS_ENV}={request} only splits a single GPU)"
        )  # fmt: skip
    total = memory_mb or DEFAULT_GPU_MEMORY_MB
    each = int(total * GPU_MEMORY_SHARE / request)
    return GpuPlan(request, each, f"1 GPU split into {request} logical GPUs of {each} MB each")


def gpu_memory_mb() -> int | None:
    """Total memory of the first GPU in MB as ``nvidia-smi`` reports it; None if it cannot."""
    cmd = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
        return int(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cross_device_ops_name(names: list[str], num_logical_gpus: int, num_physical_gpus: int) -> str | None:
    """The ``tf.distribute`` all-reduce class to use for ``names``; None: TensorFlow's choice.

    NCCL, TensorFlow's default for GPUs, needs distinct physical GPUs: on logical GPUs carved
    from one GPU it fails ("Duplicate GPU detected"), and TensorFlow itself then falls back
    to ``ReductionToOneDevice`` with a warning. We pick it explicitly: every logical GPU's
    gradients are summed on one of them, which on a single physical GPU is a copy inside
    the same memory. ``HierarchicalCopyAllReduce`` is no alternative: it splits the devices
    into two equal halves for the DGX-1's 8-GPU topology and leaves one out for 3 devices.
    """
    uses_gpus = any("GPU" in short_device(n).upper() for n in names)
    if uses_gpus and num_logical_gpus > num_physical_gpus:
        return "ReductionToOneDevice"
    return None


def short_device(name: str) -> str:
    """``'/job:localhost/replica:0/task:0/device:CPU:1'`` -> ``'CPU:1'`` (``''`` stays ``''``)."""
    return name.rsplit("device:", 1)[-1] if name else ""


_STRATEGY_NUMBERS = itertools.count(1)  # each strategy gets the next key range
_KEY_SPACING = 100_000


def make_strategy(names: list[str] | None = None) -> tf.distribute.MirroredStrategy:
    """A ``MirroredStrategy`` with one replica per device (default: :func:`compute_devices`).

    Every ``MirroredStrategy`` numbers its collective groups from 1, so a 2-device strategy
    created after a 4-device one in the same process fails with "Device ... is joining a
    group with size 2, but that group has size 4", and two strategies over the same devices
    that reduce different models mix up their collective instances ("Shape mismatch in the
    collective instance"). TensorFlow's own tests avoid this by shifting the (private) class
    attribute ``_collective_key_base``; so do we: one key range per strategy, never the
    default range that DTensor uses.
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
    base = _KEY_SPACING * next(_STRATEGY_NUMBERS)
    ops = cross_device_ops_name(chosen, len(tf.config.list_logical_devices("GPU")), len(gpus()))
    cls = tf.distribute.MirroredStrategy
    previous = cls._collective_key_base
    cls._collective_key_base = base
    try:
        return cls(chosen, cross_device_ops=getattr(tf.distribute, ops)() if ops else None)
    finally:
        cls._collective_key_base = previous


def gpus() -> list[tf.config.PhysicalDevice]:
    """The physical GPUs TensorFlow can see (the CUDA driver probe's log line silenced)."""
    from utils import silenced_stderr

    with silenced_stderr():
        return tf.config.list_physical_devices("GPU")


def setup_devices(num_cpus: int | str | None = None) -> pd.DataFrame:
    """Configure devices once and return a table describing them.

    * With GPUs: turn on memory growth (so several notebooks can share a GPU) and use them;
      with exactly one GPU and ``$SERIES_NUM_GPUS`` = 2-4, split it into that many logical
      GPUs with a memory limit each (:func:`plan_gpus`).
    * Without: split the CPU into ``num_cpus`` logical devices (argument, else
      ``$SERIES_NUM_CPUS``, else 4).

    Calling it again with the same request is safe and returns the same table. It also
    sets TensorFlow's Python logger to WARNING, so INFO lines such as "Using
    MirroredStrategy with devices ..." do not clutter notebook outputs.

    Raises:
        ValueError: for a bad count (``"abc"``, ``0``, 1000 CPUs, 5 logical GPUs).
        RuntimeError: if TensorFlow already initialised its devices with another
            configuration; the message says to restart the kernel.
    """
    tf.get_logger().setLevel("WARNING")
    physical_gpus = gpus()
    request = requested_gpu_split()  # checked on every machine, so a typo fails everywhere
    if physical_gpus:
        memory = gpu_memory_mb() if len(physical_gpus) == 1 and request > 1 else None
        plan = plan_gpus(len(physical_gpus), memory, request)
        if plan.split:
            _split_gpu(physical_gpus[0], plan)
        for gpu in physical_gpus if not plan.split else []:
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


def _split_gpu(gpu: tf.config.PhysicalDevice, plan: GpuPlan) -> None:
    """Carve ``plan.split`` logical GPUs with ``plan.memory_mb`` each from ``gpu``."""
    configs = [tf.config.LogicalDeviceConfiguration(memory_limit=plan.memory_mb)] * plan.split
    try:
        tf.config.set_logical_device_configuration(gpu, configs)
    except RuntimeError as err:
        existing = len(tf.config.list_logical_devices("GPU"))
        if existing != plan.split:
            raise RuntimeError(
                f"Cannot split the GPU into {plan.split} logical GPUs: TensorFlow already runs "
                f"with {existing}. {_RESTART}"
            ) from err


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
            physical = gpus()
            shared = len(physical) == 1 and len(tf.config.list_logical_devices("GPU")) > 1
            idx = 0 if shared else int(d.name.rsplit(":", 1)[1])
            try:
                details = tf.config.experimental.get_device_details(physical[idx])
                backing = details.get("device_name", "GPU")
            except (IndexError, ValueError):
                backing = "GPU"
            backing += " (one GPU, shared)" if shared else ""
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
