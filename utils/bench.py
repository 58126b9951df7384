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


def run_measurement(spec: dict) -> dict:
    """Run one measurement described by ``spec`` in *this* process; return its result.

    Call it in a fresh process (see :func:`run_in_fresh_process`): it fixes thread pools and
    logical devices, which TensorFlow allows only before its first op.
    """
    from utils import config, data, devices, models, pipeline

    if spec.get("tuned_threads"):
        devices.set_threads(*devices.replica_threads(spec["replicas"]))
    devices.setup_devices(spec.get("cpus", 1))
    import keras
    import numpy as np
    import tensorflow as tf

    config.seed_everything(0)
    ds = data.load_cifar10(allow_synthetic=True, n_train=spec["n_train"], n_test=spec.get("n_test"))
    keras.mixed_precision.set_global_policy(spec.get("policy", "float32"))
    kind = spec["kind"]

    if kind == "feeds":
        from utils import throughput

        results = throughput.measure_feeds(
            ds.x_train, ds.y_train, batch_size=spec["batch"], n_batches=spec["steps"], rounds=spec.get("rounds", 3)
        )
        return {**throughput.pipeline_ratios(results), "synthetic": ds.is_synthetic}

    if kind == "pp":  # pipeline runner: p stages on p devices vs the same runner with 1 stage
        from utils import parallel

        model = models.build_seed_cnn()
        x = tf.constant(ds.x_train[: spec["batch"]].astype("float32") / 255.0)
        y = tf.constant(ds.y_train[: spec["batch"]])
        split = parallel.Pipeline.from_sequential(model, spec["stages"])
        whole = parallel.Pipeline.from_sequential(model, 1)
        opt_a, opt_b = keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01)
        ms = parallel.time_interleaved(
            {
                "split": lambda: split.train_step(opt_a, x, y, num_micro_batches=spec["micro"]),
                "whole": lambda: whole.train_step(opt_b, x, y, num_micro_batches=1),
            },
            repeats=spec["steps"],
            stat="min",
        )
        return {"images_per_s": spec["batch"] / ms["split"] * 1e3,
                "baseline_images_per_s": spec["batch"] / ms["whole"] * 1e3, "synthetic": ds.is_synthetic}  # fmt: skip

    if kind == "tp":  # Megatron MLP head: sharded over N devices vs the same module on 1 device
        from utils import parallel
        from utils import tensor_parallel as tp

        feats = np.random.default_rng(0).normal(size=(spec["batch"], 2048)).astype("float32")
        labels = ds.y_train[: spec["batch"]].astype("int32")
        steps = {}
        for label, n in (("sharded", spec["replicas"]), ("one", 1)):
            mesh = tp.model_mesh(n)
            mlp = tp.ShardedMLP.create(2048, 1024, 10, mesh, seed=0)
            xd = tp.shard(feats, tp.replicated(mesh, 2))
            yd = tp.shard(labels, tp.replicated(mesh, 1))
            step = tp.make_sgd_step(mlp, 0.05)
            steps[label] = (lambda step=step, xd=xd, yd=yd: step(xd, yd).numpy())
        ms = parallel.time_interleaved(steps, repeats=spec["steps"], stat="min")
        return {"images_per_s": spec["batch"] / ms["sharded"] * 1e3,
                "baseline_images_per_s": spec["batch"] / ms["one"] * 1e3, "synthetic": ds.is_synthetic}  # fmt: skip

    names = devices.compute_devices()
    strategy = (
        tf.distribute.MirroredStrategy(names[: spec["replicas"]])
        if spec.get("replicas")
        else tf.distribute.get_strategy()
    )

    def build() -> keras.Model:
        with strategy.scope():
            model = models.build_seed_cnn()
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    seed_recipe = spec["recipe"] == "seed"
    if seed_recipe:  # the article: float64 NumPy arrays, batch 32
        x, y = ds.x_train / 255.0, ds.y_train
        x_test = ds.x_test / 255.0
    else:
        x = pipeline.make_dataset(ds.x_train, ds.y_train, spec["batch"], training=True)
        y = None
        x_test = ds.x_test.astype("float32") / 255.0

    if kind == "fit":
        model = build()
        ips = fit_throughput(model, x, y, batch_size=spec["batch"], steps=spec["steps"], warmup=spec["warmup"])
        return {"images_per_s": ips, "synthetic": ds.is_synthetic}

    if kind == "tta":  # time to target test accuracy, training time only
        model = build()
        elapsed, acc, epoch = 0.0, 0.0, 0
        for epoch in range(1, spec["max_epochs"] + 1):
            start = time.perf_counter()
            if seed_recipe:
                model.fit(x, y, batch_size=spec["batch"], epochs=1, verbose=0)
            else:
                model.fit(x, epochs=1, verbose=0)
            elapsed += time.perf_counter() - start
            acc = float(model.evaluate(x_test, ds.y_test, batch_size=500, verbose=0)[1])
            print(f"  [{spec['name']}] epoch {epoch}: test accuracy {acc:.3f} after {elapsed:.0f} s", flush=True)
            if acc >= spec["target"]:
                break
        return {"seconds": elapsed, "accuracy": acc, "epochs": epoch, "reached": acc >= spec["target"],
                "synthetic": ds.is_synthetic}  # fmt: skip
    raise ValueError(f"unknown kind {kind!r}")


def run_in_fresh_process(spec: dict, timeout: float = 900) -> dict:
    """Run :func:`run_measurement` in a new Python process and return its result.

    ``spec`` keys: ``kind`` ("fit", "tta", "feeds", "pp", "tp"), ``name``, ``n_train``,
    ``n_test``, ``batch``, ``steps``, ``warmup``, ``cpus`` (logical CPUs to create),
    ``replicas`` (MirroredStrategy over that many devices; absent: no strategy),
    ``tuned_threads`` (thread pools from :func:`utils.devices.replica_threads`), ``policy``
    (Keras dtype policy), ``recipe`` ("seed" or "series"), and kind-specific keys.

    Raises:
        RuntimeError: with the child's last stderr lines, if it fails.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "utils.bench", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("  ["):
            print(line, flush=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark {spec['name']!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(results[-1][len("RESULT ") :])


if __name__ == "__main__":  # python -m utils.bench '<spec as JSON>'
    print("RESULT " + json.dumps(run_measurement(json.loads(sys.argv[1]))), flush=True)
