"""`make gpu-check`: prove the series on an NVIDIA GPU and write docs/gpu-report.md.

On a machine with an NVIDIA GPU and the CUDA build of TensorFlow it

1. records the GPU model, driver and TensorFlow build (CUDA, cuDNN);
2. runs every notebook in smoke mode, each in its own kernel (`jupyter nbconvert`);
   on a machine with one GPU the multi-device notebooks get ``SERIES_NUM_GPUS`` logical
   GPUs carved from it (``--split``, default 4, as many as the logical CPUs elsewhere);
3. trains a few steps under ``mixed_float16`` with a ``LossScaleOptimizer`` and checks
   the loss stays finite;
4. runs ``scripts/bench.py`` in smoke mode and copies its ratios;
5. writes the report (``--out``, default docs/gpu-report.md) and the raw results as
   bench-results/gpu-check.json.

Without a GPU it stops at once, before anything slow, with exit code 2. Everything runs
in child processes: this process never initialises TensorFlow, so it holds no GPU memory
while the notebooks run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "gpu-report.md"
BENCH_DIR = ROOT / "bench-results"
PIP_CUDA = 'pip install "tensorflow[and-cuda]==2.21.0"'
MULTI_DEVICE = ("02", "06", "07", "08")  # notebooks that need several devices
NEEDS = (
    "It needs an NVIDIA GPU with its driver (`nvidia-smi` lists the GPU) and the CUDA build "
    f"of TensorFlow in the project's environment: `.venv/bin/{PIP_CUDA}` (Linux, NVIDIA "
    "driver >= 525). Nothing was run and no report was written."
)


# --------------------------------------------------------------------------- probes
def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None: nvidia-smi lists a GPU). Fast: no TF."""
    if shutil.which("nvidia-smi") is None:
        return "`nvidia-smi` is not on PATH, so there is no NVIDIA driver here"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"`nvidia-smi -L` failed ({err})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return f"`nvidia-smi -L` lists no GPU ({(out.stdout + out.stderr).strip()[:200]})"
    return None


TF_PROBE = """
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
build = tf.sysconfig.get_build_info()
gpus = tf.config.list_physical_devices("GPU")
print(json.dumps({
    "tensorflow": tf.__version__, "built_with_cuda": tf.test.is_built_with_cuda(),
    "cuda": build.get("cuda_version", ""), "cudnn": build.get("cudnn_version", ""),
    "physical_gpus": len(gpus),
    "compute_capability": [
        tf.config.experimental.get_device_details(g).get("compute_capability") for g in gpus],
}))
"""


def tf_info() -> dict:
    """TensorFlow's version and CUDA build, and the GPUs it sees (in a child process)."""
    out = subprocess.run([sys.executable, "-c", TF_PROBE], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)  # fmt: skip
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or ["no output"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_info() -> dict:
    """GPU model, driver and memory from nvidia-smi (first GPU), and the GPU count."""
    query = "--query-gpu=name,driver_version,memory.total"
    out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines()]
    name, driver, memory = (rows[0] + ["?"] * 3)[:3] if rows else ("?", "?", "?")
    return {"gpu": name, "driver": driver, "memory": memory, "gpu_count": len(rows)}


# --------------------------------------------------------------------------- the runs
def notebook_env(stem: str, physical_gpus: int, split: int) -> dict[str, str]:
    """Smoke mode; logical GPUs for the multi-device notebooks on a one-GPU machine."""
    env = {**os.environ, "SERIES_MODE": "smoke"}
    env.pop("SERIES_NUM_GPUS", None)
    if physical_gpus == 1 and split > 1 and stem[:2] in MULTI_DEVICE:
        env["SERIES_NUM_GPUS"] = str(split)
    return env


def last_error_line(text: str) -> str:
    """The most telling line of a failed nbconvert run (the exception, if one is printed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # tracebacks come coloured
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return ((errors or lines or ["failed without output"])[-1])[:300]


def run_notebook(nb: Path, out_dir: Path, env: dict[str, str], timeout: float) -> dict:
    """Execute ``nb`` in its own kernel into ``out_dir``; the committed file is not touched."""
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
           str(nb), "--output-dir", str(out_dir), f"--ExecutePreprocessor.timeout={int(timeout)}"]  # fmt: skip
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                             cwd=ROOT)  # fmt: skip
        ok, error = out.returncode == 0, "" if out.returncode == 0 else last_error_line(out.stderr)
    except subprocess.TimeoutExpired:
        ok, error = False, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    return {"notebook": nb.stem, "ok": ok, "seconds": round(seconds, 1), "error": error,
            "logical_gpus": int(env.get("SERIES_NUM_GPUS", 0))}  # fmt: skip


def mixed_precision_check(steps: int = 5) -> dict:
    """A few training steps under ``mixed_float16`` with loss scaling; is the loss finite?

    Runs on whatever device TensorFlow picks (the GPU in ``make gpu-check``; a CPU in the
    unit test). The global dtype policy is restored afterwards.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
            keras.layers.Activation("linear", dtype="float32"),  # logits back in float32
        ])  # fmt: skip
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
        rng = np.random.default_rng(0)
        x = rng.random((64, 32, 32, 3), dtype=np.float32)
        y = rng.integers(0, 10, 64)
        losses = [float(np.ravel(model.train_on_batch(x, y))[0]) for _ in range(steps)]
        conv = model.layers[0]
        return {
            "policy": "mixed_float16", "compute_dtype": conv.compute_dtype,
            "variable_dtype": conv.variable_dtype, "optimizer": type(model.optimizer).__name__,
            "loss_scale": float(optimizer.dynamic_scale.numpy()), "losses": losses,
            "finite": all(math.isfinite(v) for v in losses),
            "device": "GPU" if tf.config.list_logical_devices("GPU") else "CPU",
        }  # fmt: skip
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def run_mixed_precision(timeout: float) -> dict:
    """:func:`mixed_precision_check` in a child process (its own TensorFlow, its own GPU)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mixed-precision-child"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": last_error_line(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(timeout: float) -> tuple[list[dict] | None, str]:
    """``scripts/bench.py`` in smoke mode; its rows from bench-results/bench.csv, or why not."""
    start = time.time()
    env = {**os.environ, "SERIES_MODE": "smoke"}
    try:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py")], env=env,
                             capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip
        status = "" if out.returncode == 0 else f"exit code {out.returncode}: {last_error_line(out.stderr)}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    table = BENCH_DIR / "bench.csv"
    if not table.is_file() or table.stat().st_mtime < start:
        return None, status or "bench.py wrote no bench-results/bench.csv"
    with open(table, newline="") as f:
        return list(csv.DictReader(f)), status


# --------------------------------------------------------------------------- the report
def _fmt_ratio(value: object) -> str:
    try:
        return f"{float(value):.2f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value or "")


def render_report(
    machine: dict, notebooks: list[dict], mixed: dict | None,
    bench: list[dict] | None, bench_status: str = "", date: str = "",
) -> str:  # fmt: skip
    """The markdown of docs/gpu-report.md from the results (a pure function: no I/O)."""
    passed = sum(r["ok"] for r in notebooks)
    split = max((r.get("logical_gpus", 0) for r in notebooks), default=0)
    lines = [
        "# GPU report",
        "",
        f"Written by `make gpu-check` (`scripts/gpu_check.py`){' on ' + date if date else ''}. "
        "Smoke mode: tiny data and few steps. It shows that the series runs on a GPU; the "
        "times are smoke-size, not the full run's.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| GPU | {machine.get('gpu', '?')} ({machine.get('memory', '?')}) "
        f"x {machine.get('gpu_count', '?')} |",
        f"| driver | {machine.get('driver', '?')} |",
        f"| TensorFlow | {machine.get('tensorflow', '?')}, CUDA {machine.get('cuda') or '?'}, "
        f"cuDNN {machine.get('cudnn') or '?'} |",
        f"| GPUs TensorFlow sees | {machine.get('physical_gpus', '?')} |",
    ]
    if split:
        lines.append(f"| multi-device notebooks | one GPU split into {split} logical GPUs "
                     f"(`SERIES_NUM_GPUS={split}`) |")  # fmt: skip
    lines += ["", "## Notebooks (smoke mode, each in its own kernel)", "",
              "| notebook | devices | result | seconds |", "|---|---|---|---:|"]  # fmt: skip
    for r in notebooks:
        devices = f"{r['logical_gpus']} logical GPUs" if r.get("logical_gpus") else "GPU"
        result = "pass" if r["ok"] else f"FAIL: {r['error']}".replace("|", "\\|")
        lines.append(f"| {r['notebook']} | {devices} | {result} | {r['seconds']:.1f} |")
    total = sum(r["seconds"] for r in notebooks)
    lines += ["", f"{passed} of {len(notebooks)} notebooks passed, {total:.0f} s in all.", ""]

    lines += ["## Mixed precision: `mixed_float16` with loss scaling", ""]
    if not mixed:
        lines.append("Not run.")
    elif "error" in mixed:
        lines.append(f"FAILED: {mixed['error']}")
    else:
        losses = ", ".join(f"{v:.4f}" for v in mixed["losses"])
        lines += [
            f"{len(mixed['losses'])} training steps on {mixed['device']}: layers compute in "
            f"{mixed['compute_dtype']} with {mixed['variable_dtype']} variables, optimizer "
            f"{mixed['optimizer']} (loss scale {mixed['loss_scale']:g}).",
            f"Losses: {losses}. All finite: {'yes' if mixed['finite'] else 'NO'}.",
        ]
    lines += ["", "## Benchmark (`scripts/bench.py`, smoke size)", ""]
    if bench is None:
        lines.append(f"Not run: {bench_status or 'no results'}.")
    else:
        if bench_status:
            lines += [f"bench.py reported a problem: {bench_status}.", ""]
        lines += ["| section | measurement | value | unit | ratio | target | met |",
                  "|---|---|---:|---|---:|---|---|"]  # fmt: skip
        for row in bench:
            lines.append(
                f"| {row.get('section', '')} | {row.get('measurement', '')} | "
                f"{row.get('value', '')} | {row.get('unit', '')} | {_fmt_ratio(row.get('ratio'))} | "
                f"{row.get('target', '')} | {row.get('met', '')} |"
            )
        lines += ["", "Ratios travel between machines; smoke-size images/s do not."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
GPU_TIMES = ROOT / "docs" / "gpu_runtimes.csv"


def write_gpu_times(results: list[dict], path: Path | None = None) -> None:
    """The GPU column of the run-time tables (`make docs-tables` reads it): smoke seconds of
    every notebook that passed, merged with what an earlier `--only` run recorded."""
    import csv

    path = path or GPU_TIMES
    times = {}
    if path.exists():
        with path.open() as f:
            times = {row["notebook"]: row["smoke_seconds"] for row in csv.DictReader(f)}
    times.update({f"{r['notebook']}.ipynb": round(r["seconds"], 1) for r in results if r["ok"]})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["notebook", "smoke_seconds"])
        writer.writerows(sorted(times.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPORT, help="report path")
    parser.add_argument("--split", type=int, default=4, help="logical GPUs from one GPU (1-4)")
    parser.add_argument("--only", nargs="*", default=None, help="notebook numbers, e.g. 00 02")
    parser.add_argument("--skip-bench", action="store_true", help="do not run scripts/bench.py")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per notebook")
    parser.add_argument("--mixed-precision-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mixed_precision_child:
        sys.path.insert(0, str(ROOT))
        import utils  # noqa: F401 - quiet TensorFlow start-up

        print(json.dumps(mixed_precision_check()))
        return 0

    reason = no_gpu_reason()
    machine = {} if reason else tf_info()
    if not reason and not machine.get("built_with_cuda"):
        reason = f"this TensorFlow ({machine.get('tensorflow', '?')}) is not the CUDA build"
    if not reason and not machine.get("physical_gpus"):  # e.g. the CUDA libraries are missing
        reason = f"nvidia-smi lists a GPU but TensorFlow {machine.get('tensorflow', '?')} sees none"
    if reason:
        print(f"make gpu-check needs an NVIDIA GPU: {reason}.\n{NEEDS}", file=sys.stderr)
        return 2
    machine.update(gpu_info())
    print(f"GPU: {machine['gpu']}, driver {machine['driver']}, TensorFlow "
          f"{machine['tensorflow']} (CUDA {machine['cuda']}, cuDNN {machine['cudnn']})", flush=True)  # fmt: skip

    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    nbs = [nb for nb in nbs if args.only is None or nb.stem[:2] in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out_dir:
        for nb in nbs:
            env = notebook_env(nb.stem, machine["physical_gpus"], args.split)
            results.append(run_notebook(nb, Path(out_dir), env, args.timeout))
            r = results[-1]
            print(f"  {r['notebook']}: {'pass' if r['ok'] else 'FAIL'} in {r['seconds']:.0f} s "
                  f"{r['error']}", flush=True)  # fmt: skip
    mixed = run_mixed_precision(600)
    print(f"  mixed_float16: {mixed}", flush=True)
    bench, bench_status = (None, "skipped (--skip-bench)") if args.skip_bench else run_bench(1800)
    date = dt.date.today().isoformat()
    args.out.write_text(render_report(machine, results, mixed, bench, bench_status, date))
    BENCH_DIR.mkdir(exist_ok=True)
    raw = {"machine": machine, "notebooks": results, "mixed_precision": mixed, "date": date}
    (BENCH_DIR / "gpu-check.json").write_text(json.dumps(raw, indent=1))
    write_gpu_times(results)
    print(f"wrote {args.out}, docs/gpu_runtimes.csv and {BENCH_DIR.name}/gpu-check.json", flush=True)
    ok = all(r["ok"] for r in results) and mixed.get("finite", False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
