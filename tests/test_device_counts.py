"""The multi-device notebooks run on every device count they accept (smoke mode).

`SERIES_NUM_CPUS` takes any whole number from 1 to 64, and a workshop laptop may give 1, 2,
3 or 8 logical CPUs (or GPUs). Each multi-device notebook adapts: it picks a mesh, stage
count, batch and layer sizes that divide the count and prints what it chose (on one device,
that nothing is split). The default count (4) runs every cell under nbval; here each other
count runs the cells tagged ``device-check`` (Setup, the cells that choose sizes from the
device count, and the first proofs) of every multi-device notebook in one fresh process,
and fails on any error. Notebook 09's workers are separate processes that each see one
CPU device, so the count does not apply to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tagged_cells import TAG, tagged_sources

ROOT = Path(__file__).resolve().parent.parent
MULTI_DEVICE = [name for name in ("02_mirrored_strategy", "05_evaluation", "06_pipeline_parallelism",
                                  "07_tensor_parallelism", "08_hybrid_parallelism",
                                  "11_sharded_and_expert_parallelism")
                if (ROOT / "notebooks" / f"{name}.ipynb").exists()]  # fmt: skip
COUNTS = [int(n) for n in os.environ.get("SERIES_DEVICE_COUNTS", "1 2 3 8").split()]


@pytest.mark.parametrize("name", MULTI_DEVICE)
def test_each_multi_device_notebook_tags_its_setup_and_device_choices(name):
    sources = tagged_sources(name)
    assert len(sources) >= 3, f"{name}: tag its Setup and device-dependent cells with {TAG!r}"
    assert "setup_devices(" in sources[0], f"{name}: the first {TAG!r} cell must be the Setup cell"


@pytest.mark.parametrize("count", COUNTS)
def test_multi_device_notebooks_run_on_this_device_count(count):
    env = {**os.environ, "SERIES_MODE": "smoke", "SERIES_NUM_CPUS": str(count), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "tagged_cells.py"), *MULTI_DEVICE],
                         cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=900)
    ran = [line for line in out.stdout.splitlines() if line.startswith(("== ", "FAILED"))]
    print(f"{count} device(s):", *ran, sep="\n  ")
    assert out.returncode == 0, f"on {count} device(s):\n" + "\n".join(ran) + "\n" + out.stderr[-3000:]
    assert len(ran) == len(MULTI_DEVICE)
