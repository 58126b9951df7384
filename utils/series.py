"""Facts about the series itself: its notebooks, their titles and measured run times."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import pandas as pd

from utils.config import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
SMOKE_TIMES = REPO_ROOT / "docs" / "smoke_runtimes.csv"
# Written by `make gpu-check` on a machine with an NVIDIA GPU (smoke mode there).
GPU_TIMES = REPO_ROOT / "docs" / "gpu_runtimes.csv"
RUNTIME_START, RUNTIME_END = "<!-- runtime:start -->", "<!-- runtime:end -->"


def notebook_paths(folder: Path = NOTEBOOKS) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``), in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def title(nb: dict) -> str:
    """The notebook's H1 (first line starting with ``# `` in a markdown cell)."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "(untitled)"


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def recorded_seconds(nb: dict) -> float | None:
    """Wall time of the stored run: first cell's start to last cell's reply.

    Jupyter (nbclient) records ``metadata.execution`` timestamps in every executed cell;
    returns ``None`` when the notebook carries none (never executed, or stripped).
    """
    starts, ends = [], []
    for cell in nb.get("cells", []):
        ex = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            starts.append(_stamp(ex["iopub.execute_input"]))
            ends.append(_stamp(ex["shell.execute_reply"]))
    if not starts:
        return None
    return (max(ends) - min(starts)).total_seconds()


def smoke_seconds(path: Path = SMOKE_TIMES) -> dict[str, float]:
    """Smoke-mode run times from the last ``make timings`` (notebook file name -> seconds);
    with ``path=GPU_TIMES``, those of the last ``make gpu-check``."""
    if not path.exists():
        return {}
    with path.open() as f:
        return {row["notebook"]: float(row["smoke_seconds"]) for row in csv.DictReader(f)}


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def runtime_table(folder: Path = NOTEBOOKS, exclude: str = "") -> pd.DataFrame:
    """One row per notebook: title, full-mode and smoke-mode wall time on a 2-core CPU, and
    smoke mode on a GPU where ``make gpu-check`` has run. ``exclude``: a notebook file name
    to leave out (notebook 00 cannot know its own time while it runs)."""
    smoke, gpu = smoke_seconds(), smoke_seconds(GPU_TIMES)
    rows = []
    for path in notebook_paths(folder):
        if path.name == exclude:
            continue
        nb = json.loads(path.read_text())
        rows.append(
            {
                "notebook": path.name,
                "title": title(nb),
                "full (2-core CPU)": _minutes(recorded_seconds(nb)),
                "smoke (2-core CPU)": _minutes(smoke.get(path.name)),
                "smoke (GPU)": _minutes(gpu.get(path.name)),
            }
        )
    return pd.DataFrame(rows)


def runtime_block(path: Path) -> str:
    """The run-time table a notebook shows under its "Run time" heading, from its recorded
    full run (cell timestamps), the last ``make timings`` and the last ``make gpu-check``."""
    nb = json.loads(path.read_text())
    smoke = _minutes(smoke_seconds().get(path.name))
    gpu = _minutes(smoke_seconds(GPU_TIMES).get(path.name))
    return (
        f"{RUNTIME_START}\n"
        "| mode | 2-core CPU | GPU |\n|---|---|---|\n"
        f"| full (`SERIES_MODE=full`, real CIFAR-10) | {_minutes(recorded_seconds(nb))} | not measured |\n"
        f"| smoke (`SERIES_MODE=smoke`) | {smoke} | {gpu} |\n"
        f"{RUNTIME_END}"
    )
