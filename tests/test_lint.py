"""ruff is clean on the package, the tests, the scripts and the notebooks (.ipynb and .py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run(
        [str(ruff), "check", "utils", "tests", "scripts", "notebooks"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
