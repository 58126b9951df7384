"""Run every notebook in smoke mode (on a temporary copy) and record its wall time.

Writes docs/smoke_runtimes.csv, which notebook 00 and the instructor guide read.
Usage: make timings   (or: SERIES_MODE=smoke python scripts/measure_smoke.py [--twice] [NB ...])

--twice runs every notebook two times in a row, each in a fresh kernel ("Restart and run
all" twice): the second run must not trip over files the first one left behind. The
recorded time is the second run's.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.series import SMOKE_TIMES, notebook_paths, smoke_seconds  # noqa: E402


def main(argv: list[str]) -> int:
    os.environ["SERIES_MODE"] = "smoke"
    runs = 2 if "--twice" in argv else 1
    paths = [Path(a) for a in argv if a != "--twice"] or notebook_paths()
    times = smoke_seconds()
    for path in paths:
        for run in range(1, runs + 1):
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
            times[path.name] = round(time.perf_counter() - start, 1)
            print(f"{path.name} (run {run} of {runs}): {times[path.name]} s", flush=True)
    SMOKE_TIMES.parent.mkdir(exist_ok=True)
    with SMOKE_TIMES.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["notebook", "smoke_seconds"])
        for name in sorted(times):
            w.writerow([name, times[name]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
