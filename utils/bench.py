"""Measurement helpers for ``make bench``: machine facts, peak FLOP/s, Keras throughput.

Absolute speeds vary from machine to machine, so the benchmark reports *ratios* measured
in one run on one machine, and records which machine that was.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    """What the benchmark needs to know about the CPU."""

    model: str
    vendor: str
    family: int | None
    cores: int
    mhz: float | None
    flags: frozenset[str]

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
    return CpuInfo(
        model=field("model name") or platform.processor() or "unknown CPU",
        vendor=field("vendor_id") or "unknown",
        family=int(family) if family and family.isdigit() else None,
        cores=cores or os.cpu_count() or 1,
        mhz=float(mhz) if mhz else None,
        flags=frozenset((field("flags") or "").split()),
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
        "gpu": ", ".join(gpu_names) or "none",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


class ThroughputCallback(keras.callbacks.Callback):
    """Images/s of ``model.fit`` after ``warmup`` batches (tracing and cache fill excluded)."""

    def __init__(self, batch_size: int, warmup: int = 5) -> None:
        super().__init__()
        self.batch_size, self.warmup = batch_size, warmup
        self.seen = 0
        self.start: float | None = None
        self.end: float | None = None
        self.timed_batches = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seen += 1
        if self.seen == self.warmup:
            self.start = time.perf_counter()
        elif self.seen > self.warmup:
            self.timed_batches += 1
            self.end = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        if self.start is None or self.end is None or self.timed_batches == 0:
            raise RuntimeError(
                f"ThroughputCallback saw {self.seen} batches; it needs more than warmup={self.warmup}."
            )
        return self.timed_batches * self.batch_size / (self.end - self.start)


def fit_throughput(
    model: keras.Model,
    x: np.ndarray | tf.data.Dataset,
    y: np.ndarray | None,
    *,
    batch_size: int,
    steps: int,
    warmup: int = 5,
) -> float:
    """Images/s of ``model.fit`` for ``steps`` timed batches after ``warmup`` (one epoch).

    ``x`` is a dataset of global batches (then ``y`` is ``None``) or NumPy arrays.
    """
    cb = ThroughputCallback(batch_size, warmup)
    total = steps + warmup
    if isinstance(x, tf.data.Dataset):
        model.fit(x.repeat().take(total), epochs=1, verbose=0, callbacks=[cb])
    else:
        n = min(len(x), total * batch_size)
        model.fit(x[:n], y[:n], batch_size=batch_size, epochs=1, verbose=0, callbacks=[cb], shuffle=True)
    return cb.images_per_s
