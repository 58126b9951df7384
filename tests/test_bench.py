"""`make bench` helpers, and the benchmark command itself at smoke size (a check that it runs)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils import bench, models

ROOT = Path(__file__).resolve().parent.parent

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 9R14
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16
"""
SKYLAKE = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family\t: 25", "cpu family\t: 6")


def test_parse_cpuinfo_and_datapath():
    amd = bench.parse_cpuinfo(ZEN4, cores=2)
    assert (amd.model, amd.cores, amd.mhz, amd.family) == ("AMD EPYC 9R14", 2, 2600.0, 25)
    assert amd.vector_bits == 512 and amd.datapath_bits == 256  # Zen 4 double-pumps AVX-512
    intel = bench.parse_cpuinfo(SKYLAKE, cores=4)
    assert intel.datapath_bits == 512
    plain = bench.parse_cpuinfo("flags : sse sse2\n", cores=1)
    assert plain.vector_bits == 128 and plain.model


def test_peak_flops_hand_count():
    # 2 cores x 2.6 GHz x 8 fp32 lanes (256 bits) x 2 (FMA) x 2 FMA units = 166.4 GFLOP/s
    assert bench.peak_flops(2, 2.6, 256) == pytest.approx(166.4e9)
    with pytest.raises(ValueError):
        bench.peak_flops(0, 2.6, 256)


def test_fit_throughput_times_only_after_warmup():
    model = models.build_seed_cnn(width=0.25)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.rand(64, 32, 32, 3).astype("float32")
    y = np.random.randint(0, 10, 64)
    assert bench.fit_throughput(model, x, y, batch_size=8, steps=4, warmup=3) > 0
    with pytest.raises(RuntimeError):  # every batch was a warm-up batch: nothing timed
        bench.fit_throughput(model, x, y, batch_size=8, steps=0, warmup=3)


def test_time_interleaved_runs_each_function_after_a_warmup():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    ms = bench.time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=3)
    assert calls == {"a": 4, "b": 4} and set(ms) == {"a", "b"} and min(ms.values()) >= 0


def test_machine_info_has_the_recorded_fields():
    info = bench.machine_info()
    assert {"cpu", "cores", "gpu", "tensorflow"} <= set(info)


def test_bench_command_runs_at_smoke_size(tmp_path):
    env = {**os.environ, "SERIES_MODE": "smoke", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("CIFAR10_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = ROOT / "bench-results"
    rows = list(csv.DictReader((out / "bench.csv").open()))
    sections = {r["section"] for r in rows}
    assert {"1. recipes", "2. input pipeline", "3. strategy overhead"} <= sections
    assert all(float(r["ratio"]) > 0 for r in rows if r["ratio"])
    assert (out / "bench.png").stat().st_size > 1000 and (out / "machine.json").exists()
    assert "machine:" in proc.stdout


def test_fresh_process_measurement_and_its_errors():
    spec = {"kind": "fit", "name": "t", "recipe": "series", "batch": 64, "cpus": 2, "replicas": 2,
            "tuned_threads": True, "n_train": 512, "n_test": 64, "steps": 2, "warmup": 1}  # fmt: skip
    out = bench.run_in_fresh_process(spec, timeout=300)
    assert out["images_per_s"] > 0 and out["synthetic"] in (True, False)
    with pytest.raises(RuntimeError, match="unknown kind"):
        bench.run_in_fresh_process({**spec, "kind": "nonsense"}, timeout=300)
