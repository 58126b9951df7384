"""`make bench` helpers, and the benchmark command itself at smoke size (a check that it runs)."""

from __future__ import annotations

import csv
import json
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
siblings\t: 2
cpu cores\t: 2
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16
"""
# The AVX2 machine of the README's second table, as a hyperthreaded pair would describe it.
ZEN2_SMT = """vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse avx avx2 fma
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


def test_cpuinfo_names_bfloat16_support_and_hyperthreads():
    amd = bench.parse_cpuinfo(ZEN4, cores=2)
    assert amd.bf16_flags == ("avx512_bf16",) and amd.threads_per_core == 1
    zen2 = bench.parse_cpuinfo(ZEN2_SMT, cores=2)
    assert zen2.bf16_flags == () and zen2.threads_per_core == 2 and zen2.vector_bits == 256
    arm = bench.parse_cpuinfo("Features\t: fp asimd bf16 sve\n", cores=4)
    assert arm.bf16_flags == ("bf16",) and arm.threads_per_core is None


def test_readme_keeps_one_bench_table_per_kind_of_machine():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_docs", ROOT / "scripts" / "update_docs.py")
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    machine = {"cpu": "AMD EPYC", "cores": "2", "SIMD": "256-bit (256-bit datapath)", "gpu": "none",
               "bfloat16": "emulated (no bfloat16 instructions)"}  # fmt: skip
    avx2 = docs.machine_kind(machine)
    avx512 = docs.machine_kind({**machine, "SIMD": "512-bit (512-bit datapath)", "bfloat16": "native (avx512_bf16)"})
    assert avx2 != avx512 and "bfloat16 native" in avx512 and "bfloat16 emulated" in avx2
    block = docs.merge_machine_table("", avx2, "Machine: A\n\n| old |")
    block = docs.merge_machine_table(block, avx512, "Machine: B\n\n| b |")
    block = docs.merge_machine_table(block, avx2, "Machine: A\n\n| new |")  # a re-run replaces its own table
    assert block.count("#### ") == 2 and "| old |" not in block
    assert block.index(avx2) < block.index("| new |") < block.index(avx512) < block.index("| b |")


def test_thread_candidates_start_from_the_defaults_and_hold_the_formula():
    from utils import devices

    for n, cores in [(2, 2), (4, 2), (2, 8)]:
        cands = bench.thread_candidates(n, cores)
        assert cands[0] == (0, 0) and devices.replica_threads(n, cores) in cands
        assert len(cands) == len(set(cands)) and all(intra <= cores for intra, _ in cands)
    assert bench.threads_label((0, 0)) == "intra-op default, inter-op default"
    assert bench.threads_label((1, 4)) == "intra-op 1, inter-op 4"


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
    assert {"cpu", "cores", "SIMD", "bfloat16", "threads per core", "gpu", "tensorflow"} <= set(info)


SMOKE = {"n_train": 512, "n_test": 64, "steps": 2, "warmup": 1, "batch": 64}
KINDS = {
    "feeds": {"cpus": 1, "rounds": 1},
    "pp": {"cpus": 2, "stages": 2, "micro": 4},
    "tp": {"cpus": 4, "replicas": 4},
    "mesh": {"cpus": 4, "mesh": [2, 2]},
    "seed fit": {"kind": "fit", "recipe": "seed", "batch": 32, "cpus": 1, "replicas": 1},
    "fit, threads set": {"kind": "fit", "recipe": "series", "cpus": 2, "replicas": 2, "threads": [1, 3]},
}


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_of_measurement_runs_in_a_fresh_process(name, tmp_path):
    """What `make bench` runs, one child of each kind at toy size (the table itself is
    tested below with made-up results, so the suite does not run the whole benchmark)."""
    spec = {**SMOKE, "kind": name, "name": name, **KINDS[name]}
    if name == "pp":  # the pipeline child also reads the overlap from a profiler trace
        spec["trace"] = str(tmp_path / "trace")
    out = bench.run_in_fresh_process(spec, timeout=300)
    assert all(v > 0 for v in out.values() if isinstance(v, float)), out
    assert out, f"{name}: no result"
    if name == "pp":
        assert out["overlap"] > 0 and list((tmp_path / "trace").rglob("*.xplane.pb"))
    if "threads" in spec:  # the child's TensorFlow ran with the pools it was given
        assert out["threads"] == spec["threads"]


def test_fresh_process_measurement_and_its_errors():
    spec = {"kind": "fit", "name": "t", "recipe": "series", "batch": 64, "cpus": 2, "replicas": 2,
            "tuned_threads": True, "n_train": 512, "n_test": 64, "steps": 2, "warmup": 1}  # fmt: skip
    out = bench.run_in_fresh_process(spec, timeout=300)
    assert out["images_per_s"] > 0 and out["synthetic"] in (True, False)
    with pytest.raises(RuntimeError, match="unknown kind"):
        bench.run_in_fresh_process({**spec, "kind": "nonsense"}, timeout=300)


def bench_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CRASHING_CHILD = """
import json, os, signal, sys, pathlib
spec = json.loads(sys.argv[1])
marker = pathlib.Path(spec["marker"])
if spec["crash"] == "always" or (spec["crash"] == "once" and not marker.exists()):
    marker.touch()
    os.kill(os.getpid(), signal.SIGSEGV)
print("RESULT " + json.dumps({"images_per_s": 100.0}))
"""


def test_a_child_killed_by_a_signal_runs_once_more_then_counts_as_failed(tmp_path, monkeypatch):
    child = tmp_path / "child.py"
    child.write_text(CRASHING_CHILD)
    monkeypatch.setattr(bench, "CHILD", child)
    script, sink = bench_script(), tmp_path / "results.jsonl"
    once = script.measure({"name": "once", "crash": "once", "marker": str(tmp_path / "a")}, 60, sink)
    always = script.measure({"name": "always", "crash": "always", "marker": str(tmp_path / "b")}, 60, sink)
    assert once == {"images_per_s": 100.0}
    assert "killed by signal 11" in always["failed"]
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["once", "always"]  # written as soon as known


def test_one_failed_measurement_still_gives_the_table(tmp_path, monkeypatch):
    """The whole `make bench` table, with one child that a signal killed twice."""
    def fake(spec, timeout):
        if spec["name"].startswith("Mirrored 4 CPUs, default"):
            raise bench.ChildFailed(f"benchmark {spec['name']!r} failed (killed by signal 11):", -11)
        if spec["kind"] == "feeds":
            return {"tuned / ceiling": 0.96, "tuned / naive": 1.1}
        if spec["kind"] in ("pp", "tp", "mesh"):
            return {"images_per_s": 900.0, "baseline_images_per_s": 1000.0,
                    **({"overlap": 1.4} if "trace" in spec else {})}
        return {"images_per_s": 1000.0 + spec["batch"], "synthetic": True}

    monkeypatch.setattr(bench, "run_in_fresh_process", fake)
    script = bench_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    monkeypatch.setenv("SERIES_MODE", "smoke")
    assert script.main() == 0
    with (tmp_path / "bench.csv").open() as f:
        rows = {r["measurement"]: r for r in csv.DictReader(f)}
    dead = rows["Mirrored 4 CPUs, default threads"]
    assert dead["value"] == "failed" and "signal 11" in dead["note"] and dead["met"] == ""
    assert rows["Mirrored 2 CPUs, default threads"]["met"] == "yes"  # the others are all there
    assert rows["tuned tf.data / in-memory ceiling"]["ratio"] == "0.96"
    assert rows["DTensor mesh 2x2 vs Mirrored, 4 CPUs"]["target"] == ">= 0.7"
    assert rows["pipeline, 2 stages on 2 CPUs, m=4: overlap (profiler)"]["met"] == "yes"
    best = rows["Mirrored 2 CPUs, threads measured best"]
    assert best["met"] == "yes" and "fastest of" in best["note"] and "measured again" in best["note"]
    sweeps = sum(len(bench.thread_candidates(n, bench.cpu_info().cores)) + 1 for n in (2, 4))
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 16 + sweeps  # 9 fits, feeds, 3 pp, tp,
    # 2 meshes, and per replica count every thread setting plus the winner's re-run
