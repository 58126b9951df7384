"""Run the code cells tagged ``device-check`` of some notebooks, in order, in one process.

    SERIES_NUM_CPUS=3 python tests/tagged_cells.py 02_mirrored_strategy 07_tensor_parallelism

Each notebook gets a fresh IPython namespace (magics work); the device count is the
process's, so one process checks one count. A failing cell stops that notebook (the next one still runs) and prints the
notebook's name, the cell's first line and the error; exit status 1 if any failed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from IPython.core.interactiveshell import InteractiveShell

ROOT = Path(__file__).resolve().parent.parent
TAG = "device-check"


def tagged_sources(name: str) -> list[str]:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and TAG in c.metadata.get("tags", [])]


def run(names: list[str]) -> int:
    shell = InteractiveShell.instance()
    failed = []
    for name in names:
        shell.reset(new_session=False)
        t0 = time.perf_counter()
        sources = tagged_sources(name)
        slow = []
        for source in sources:
            t_cell = time.perf_counter()
            result = shell.run_cell(source, store_history=False)
            if time.perf_counter() - t_cell > 3:
                slow.append(f"{time.perf_counter() - t_cell:.0f} s {source.strip().splitlines()[0][:40]!r}")
            if not result.success:
                first = source.strip().splitlines()[0] if source.strip() else ""
                print(f"FAILED {name}, cell starting {first!r}: {result.error_in_exec or result.error_before_exec!r}")
                failed.append(name)
                break
        else:
            print(f"== {name}: {len(sources)} tagged cells ran in {time.perf_counter() - t0:.1f} s"
                  + (f" (slowest: {'; '.join(slow)})" if slow else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
