"""Measurement helpers for ``make bench``: machine facts, peak FLOP/s, Keras throughput.

Absolute speeds vary from machine to machine, so the benchmark reports *ratios* measured
in one run on one machine, and records which machine that was.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

CPUINFO = Path("/proc/cpuinfo")
CHILD = Path(__file__).resolve().parent.parent / "scripts" / "bench_children.py"


@dataclass(frozen=True)
class CpuInfo:
    """What the benchmark needs to know about the CPU."""

    model: str
    vendor: str
    family: int | None
    cores: int
    mhz: float | None
    flags: frozenset[str]
    threads_per_core: int | None = None

    @property
    def bf16_flags(self) -> tuple[str, ...]:
        """The flags of instructions that compute bfloat16 (none: bfloat16 is emulated)."""
        from utils.lessons.training import BF16_FLAGS

        return tuple(f for f in BF16_FLAGS if f in self.flags)

    @property
    def vector_bits(self) -> int:
        """Widest SIMD instruction set: 512 (AVX-512), 256 (AVX2/AVX) or 128 (SSE/NEON)."""
        if "avx512f" in self.flags:
            return 512
        if "avx2" in self.flags or "avx" in self.flags:
            return 256
        return 128

    @property
    def datapath_bits(self) -> int:
        """Width the FMA units really execute per cycle.

        AMD Zen 2-4 (families 23 and 25) run AVX-512 as two 256-bit halves; Zen 5 (family
        26) and Intel AVX-512 parts execute 512 bits at once.
        """
        if self.vendor == "AuthenticAMD" and self.family in (23, 25):
            return min(self.vector_bits, 256)
        return self.vector_bits


def parse_cpuinfo(text: str, cores: int | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` text (Linux). ``cores`` defaults to ``os.cpu_count()``."""

    def field(name: str) -> str | None:
        m = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.M)
        return m.group(1).strip() if m else None

    family = field("cpu family")
    mhz = field("cpu MHz")
    siblings, per_socket = field("siblings"), field("cpu cores")  # logical / physical CPUs per socket
    smt = int(siblings) // int(per_socket) if siblings and per_socket and int(per_socket) else None
    return CpuInfo(
        model=field("model name") or platform.processor() or "unknown CPU",
        vendor=field("vendor_id") or "unknown",
        family=int(family) if family and family.isdigit() else None,
        cores=cores or os.cpu_count() or 1,
        mhz=float(mhz) if mhz else None,
        flags=frozenset((field("flags") or field("Features") or "").split()),
        threads_per_core=smt,
    )


def cpu_info() -> CpuInfo:
    """This machine's CPU (falls back to ``platform`` where ``/proc/cpuinfo`` is missing).

    Cores are those this process may use (``os.sched_getaffinity``), as containers limit them.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = CPUINFO.read_text() if CPUINFO.exists() else ""
    return parse_cpuinfo(text, cores)


def peak_flops(cores: int, ghz: float, datapath_bits: int, fma_units: int = 2, value_bits: int = 32) -> float:
    """Theoretical peak FLOP/s: cores x clock x lanes x 2 (an FMA is 2 FLOPs) x FMA units.

    ``fma_units=2`` holds for current x86 server and desktop cores (two FMA pipes).
    """
    if min(cores, ghz, datapath_bits, fma_units, value_bits) <= 0:
        raise ValueError("cores, ghz, datapath_bits, fma_units and value_bits must be > 0")
    lanes = datapath_bits // value_bits
    return cores * ghz * 1e9 * lanes * 2 * fma_units


def machine_info() -> dict[str, str]:
    """The facts a benchmark table is recorded with: CPU, cores, GPU, TensorFlow."""
    cpu = cpu_info()
    gpus = tf.config.list_physical_devices("GPU")
    gpu_names = []
    for g in gpus:
        try:
            gpu_names.append(tf.config.experimental.get_device_details(g).get("device_name", "GPU"))
        except (ValueError, RuntimeError):
            gpu_names.append("GPU")
    return {
        "cpu": cpu.model,
        "cores": str(cpu.cores),
        "clock (MHz)": f"{cpu.mhz:.0f}" if cpu.mhz else "unknown",
        "SIMD": f"{cpu.vector_bits}-bit ({cpu.datapath_bits}-bit datapath)",
        "bfloat16": f"native ({', '.join(cpu.bf16_flags)})" if cpu.bf16_flags else "emulated (no bfloat16 instructions)",
        # 2 threads per core: two "cores" of the machine are hyperthreads sharing one core's FMA units
        "threads per core": str(cpu.threads_per_core or "unknown"),
        "gpu": ", ".join(gpu_names) or "none",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def thread_candidates(num_replicas: int, cores: int) -> list[tuple[int, int]]:
    """(intra-op, inter-op) thread-pool settings worth measuring for N replicas on C cores.

    0 keeps TensorFlow's default. The candidates: the defaults, :func:`utils.devices.replica_threads`'s
    formula, one thread per op, all cores per op, and one thread per op with 2N ops at once.
    """
    from utils.devices import replica_threads

    n = num_replicas
    return list(dict.fromkeys([(0, 0), replica_threads(n, cores), (1, n), (cores, n), (1, 2 * n)]))


def threads_label(threads: tuple[int, int]) -> str:
    """``(1, 2)`` -> ``"intra-op 1, inter-op 2"``; 0 is TensorFlow's default."""
    return ", ".join(f"{k} {v or 'default'}" for k, v in zip(("intra-op", "inter-op"), threads, strict=True))


def fit_throughput(model: keras.Model, x, y, *, batch_size: int, steps: int, warmup: int = 5) -> float:
    """Images/s of ``model.fit`` for ``steps`` timed batches after ``warmup`` (one epoch).

    ``x`` is a dataset of global batches (then ``y`` is ``None``) or NumPy arrays. Timed by
    the series' ``ThroughputCallback`` (notebook 04).
    """
    from utils.lessons.training import ThroughputCallback

    cb = ThroughputCallback(batch_size, warmup)
    total = steps + warmup
    if isinstance(x, tf.data.Dataset):
        model.fit(x.repeat().take(total), epochs=1, verbose=0, callbacks=[cb])
    else:
        n = min(len(x), total * batch_size)
        model.fit(x[:n], y[:n], batch_size=batch_size, epochs=1, verbose=0, callbacks=[cb], shuffle=True)
    return cb.images_per_s


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Fastest wall-clock milliseconds of each function, timed in turns (a, b, a, b, ...).

    Interleaving makes the comparison fair on a shared machine whose load changes; the
    fastest run is the one least disturbed by other programs. Each function runs once
    untimed first (warm-up). GPUs run ops asynchronously, so they are synchronised after
    each call.
    """
    gpus = bool(tf.config.list_logical_devices("GPU"))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if gpus:
                tf.test.experimental.sync_devices()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(v) for name, v in samples.items()}


class ChildFailed(RuntimeError):
    """A measurement's process failed; ``returncode`` < 0 means a signal killed it."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_in_fresh_process(spec: dict, timeout: float = 900) -> dict:
    """Run one measurement in a new Python process (``scripts/bench_children.py``); its result.

    ``spec`` keys: ``kind`` ("fit", "tta", "feeds", "pp", "tp"), ``name``, ``n_train``,
    ``n_test``, ``batch``, ``steps``, ``warmup``, ``cpus`` (logical CPUs to create),
    ``replicas`` (MirroredStrategy over that many devices; absent: no strategy),
    ``tuned_threads`` (thread pools from :func:`utils.devices.replica_threads`), ``threads``
    (``[intra_op, inter_op]``, 0 for TensorFlow's default), ``policy``
    (Keras dtype policy), ``recipe`` ("seed" or "series"), and kind-specific keys.

    Raises:
        ChildFailed: with the child's last stderr lines and its exit code, if it fails.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(CHILD), json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("  ["):
            print(line, flush=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise ChildFailed(f"benchmark {spec['name']!r} failed ({how}):\n{tail}", proc.returncode)
    return json.loads(results[-1][len("RESULT ") :])
