"""`make gpu-check` (scripts/gpu_check.py) on a CPU machine: the refusal, the report
writer on made-up results, and the mixed_float16 check (which also runs on a CPU)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MACHINE = {
    "gpu": "NVIDIA H200", "memory": "143771 MiB", "gpu_count": 1, "driver": "570.86.15",
    "tensorflow": "2.21.0", "cuda": "12.5.1", "cudnn": "9", "physical_gpus": 1,
}  # fmt: skip
NOTEBOOKS = [
    {"notebook": "00_setup", "ok": True, "seconds": 12.34, "error": "", "logical_gpus": 0},
    {"notebook": "02_mirrored_strategy", "ok": True, "seconds": 40.0, "error": "", "logical_gpus": 4},
    {"notebook": "07_tensor_parallelism", "ok": False, "seconds": 8.5,
     "error": "ValueError: Cannot shard axis 0 | of size 4", "logical_gpus": 4},
]  # fmt: skip
MIXED = {
    "policy": "mixed_float16", "compute_dtype": "float16", "variable_dtype": "float32",
    "optimizer": "LossScaleOptimizer", "loss_scale": 32768.0, "losses": [2.31, 2.30],
    "finite": True, "device": "GPU",
}  # fmt: skip
BENCH = [
    {"section": "1. recipes", "measurement": "series recipe", "value": "9000", "unit": "img/s",
     "ratio": "3.456", "target": ">= 2.0", "met": "yes", "note": ""},
]  # fmt: skip


def test_report_holds_machine_notebooks_mixed_precision_and_ratios(gpu_check):
    text = gpu_check.render_report(MACHINE, NOTEBOOKS, MIXED, BENCH, date="2026-12-01")
    assert text.startswith("# GPU report\n") and "2026-12-01" in text
    for fact in ("NVIDIA H200", "570.86.15", "2.21.0", "CUDA 12.5.1", "cuDNN 9", "SERIES_NUM_GPUS=4"):
        assert fact in text, fact
    assert "| 00_setup | GPU | pass | 12.3 |" in text
    assert "| 02_mirrored_strategy | 4 logical GPUs | pass | 40.0 |" in text
    assert "| 07_tensor_parallelism | 4 logical GPUs | FAIL: ValueError: Cannot shard axis 0 \\| of size 4 | 8.5 |" in text
    assert "2 of 3 notebooks passed" in text
    assert "float16" in text and "LossScaleOptimizer" in text and "All finite: yes" in text
    assert "| 1. recipes | series recipe | 9000 | img/s | 3.46 | >= 2.0 | yes |" in text


def test_report_says_what_did_not_run(gpu_check):
    text = gpu_check.render_report(MACHINE, NOTEBOOKS[:1], {"error": "OOM"}, None, "skipped (--skip-bench)")
    assert "Not run: skipped (--skip-bench)." in text and "FAILED: OOM" in text
    assert "SERIES_NUM_GPUS" not in text and "1 of 1 notebooks passed" in text


def test_multi_device_notebooks_get_logical_gpus_on_one_gpu(gpu_check, monkeypatch):
    monkeypatch.setenv("SERIES_NUM_GPUS", "3")
    assert gpu_check.notebook_env("02_mirrored_strategy", 1, 4)["SERIES_NUM_GPUS"] == "4"
    assert "SERIES_NUM_GPUS" not in gpu_check.notebook_env("00_setup", 1, 4)
    assert "SERIES_NUM_GPUS" not in gpu_check.notebook_env("06_pipeline_parallelism", 2, 4)
    assert gpu_check.notebook_env("00_setup", 1, 4)["SERIES_MODE"] == "smoke"


def fake_nvidia_smi(folder: Path, output: str, code: int) -> None:
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho '{output}'\nexit {code}\n")
    tool.chmod(0o755)


def refuse(tmp_path: Path, path: str) -> tuple[subprocess.CompletedProcess[str], float]:
    out = tmp_path / "report.md"
    env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": ""}  # hide real GPUs from TF
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert not out.exists()
    return run, time.perf_counter() - start


def test_refuses_at_once_without_an_nvidia_driver(tmp_path):
    run, seconds = refuse(tmp_path, str(tmp_path))  # a PATH with no nvidia-smi on it
    assert run.returncode == 2, run.stderr
    assert "needs an NVIDIA GPU" in run.stderr and 'pip install "tensorflow[and-cuda]==2.21.0"' in run.stderr
    assert seconds < 10  # before anything slow: not even TensorFlow is imported


def test_refuses_when_the_driver_lists_no_gpu(tmp_path):
    fake_nvidia_smi(tmp_path, "No devices were found", 6)
    run, _ = refuse(tmp_path, str(tmp_path))
    assert run.returncode == 2 and "lists no GPU" in run.stderr


def test_refuses_when_tensorflow_sees_no_gpu(tmp_path):
    # nvidia-smi (faked) lists a GPU, but TensorFlow reaches none (here: no CUDA libraries,
    # or CUDA_VISIBLE_DEVICES hides the GPUs of a GPU machine).
    fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA Fake (UUID: GPU-0)", 0)
    run, _ = refuse(tmp_path, f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert run.returncode == 2 and "TensorFlow" in run.stderr and "sees none" in run.stderr


def test_mixed_float16_with_loss_scaling_trains(gpu_check):
    import keras

    before = keras.config.dtype_policy().name
    result = gpu_check.mixed_precision_check(steps=3)
    assert keras.config.dtype_policy().name == before  # the global policy is restored
    assert (result["compute_dtype"], result["variable_dtype"]) == ("float16", "float32")
    assert result["optimizer"] == "LossScaleOptimizer" and result["loss_scale"] > 1
    assert result["finite"] and all(math.isfinite(v) for v in result["losses"])


def test_run_notebook_reports_pass_fail_and_seconds(gpu_check, tmp_path):
    import nbformat

    for name, source in (("ok", "print('fine')"), ("bad", "raise ValueError('boom')")):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    env = gpu_check.notebook_env("02_x", 1, 2)
    ok = gpu_check.run_notebook(tmp_path / "ok.ipynb", tmp_path / "out", env, 120)
    bad = gpu_check.run_notebook(tmp_path / "bad.ipynb", tmp_path / "out", env, 120)
    assert ok["ok"] and ok["error"] == "" and ok["seconds"] > 0 and ok["logical_gpus"] == 2
    assert not bad["ok"] and "ValueError: boom" in bad["error"]
    assert "| ok | 2 logical GPUs | pass |" in gpu_check.render_report(MACHINE, [ok, bad], None, None)


def test_main_runs_every_notebook_and_writes_the_report(gpu_check, tmp_path, monkeypatch):
    # The whole command with the GPU-only steps replaced by made-up results.
    runs = []
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(gpu_check, "tf_info", lambda: {**MACHINE, "built_with_cuda": True})
    monkeypatch.setattr(gpu_check, "gpu_info", lambda: {k: MACHINE[k] for k in ("gpu", "driver", "memory", "gpu_count")})

    def fake_run(nb, out_dir, env, timeout):
        runs.append((nb.stem, env.get("SERIES_NUM_GPUS"), env["SERIES_MODE"]))
        return {"notebook": nb.stem, "ok": True, "seconds": 1.0, "error": "",
                "logical_gpus": int(env.get("SERIES_NUM_GPUS", 0))}  # fmt: skip

    monkeypatch.setattr(gpu_check, "run_notebook", fake_run)
    monkeypatch.setattr(gpu_check, "run_mixed_precision", lambda timeout: MIXED)
    monkeypatch.setattr(gpu_check, "BENCH_DIR", tmp_path / "bench-results")
    monkeypatch.setattr(gpu_check, "GPU_TIMES", tmp_path / "gpu_runtimes.csv")
    out = tmp_path / "gpu-report.md"
    assert gpu_check.main(["--out", str(out), "--skip-bench"]) == 0
    assert (tmp_path / "gpu_runtimes.csv").exists()  # never the committed docs/ file
    stems = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [r[0] for r in runs] == stems and {r[2] for r in runs} == {"smoke"}
    assert {r[0][:2] for r in runs if r[1] == "4"} == set(gpu_check.MULTI_DEVICE) & {s[:2] for s in stems}
    text = out.read_text()
    assert f"{len(stems)} of {len(stems)} notebooks passed" in text and "Not run: skipped" in text
    assert (tmp_path / "bench-results" / "gpu-check.json").is_file()


def test_gpu_times_feed_the_run_time_tables(gpu_check, tmp_path, monkeypatch):
    from utils import series

    path = tmp_path / "gpu_runtimes.csv"
    gpu_check.write_gpu_times([{"notebook": "02_x", "ok": True, "seconds": 12.34},
                               {"notebook": "03_y", "ok": False, "seconds": 5.0}], path)
    gpu_check.write_gpu_times([{"notebook": "06_z", "ok": True, "seconds": 61.0}], path)
    assert series.smoke_seconds(path) == {"02_x.ipynb": 12.3, "06_z.ipynb": 61.0}
