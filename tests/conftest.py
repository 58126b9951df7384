"""Shared pytest setup: smoke mode, and the logical CPUs every TF test in this process uses."""

from __future__ import annotations

import os

os.environ.setdefault("SERIES_MODE", "smoke")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_sessionstart(session):
    """Create the logical CPUs before any test touches TensorFlow (they are fixed per process).

    Every TF test in this process therefore sees the same devices: 4 logical CPUs (or
    ``$SERIES_NUM_CPUS``), or the real GPUs.
    """
    from utils import devices

    devices.setup_devices()


# DTensor and MirroredStrategy share TensorFlow's collective group keys in one process: a
# DTensor all-reduce over 4 devices that runs after a 2-device MirroredStrategy has claimed
# group key 1 aborts with "... is joining a group with size2, but that group has size 4".
# Each notebook runs in its own kernel, so only this shared test process is affected: run
# the DTensor test modules first.
DTENSOR_MODULES = ("test_tensor_parallel.py", "test_hybrid.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: 0 if item.path.name in DTENSOR_MODULES else 1)


def pytest_sessionfinish(session, exitstatus):
    """With SERIES_SMOKE_TIMES=path set, write each notebook's nbval wall time (kernel start
    and every cell, smoke mode) to that CSV: `make timings` without running the notebooks a
    second time (copy it to docs/smoke_runtimes.csv, then `make docs-tables`)."""
    target = os.environ.get("SERIES_SMOKE_TIMES")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not target or reporter is None:
        return
    import csv
    from collections import defaultdict
    from pathlib import Path

    seconds: dict[str, float] = defaultdict(float)
    for reports in reporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", "")
            if nodeid.startswith("notebooks/") and hasattr(report, "duration"):
                seconds[nodeid.split("::")[0].split("/")[-1]] += report.duration
    with Path(target).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["notebook", "smoke_seconds"])
        for name in sorted(seconds):
            writer.writerow([name, round(seconds[name], 1)])
