"""Shared pytest setup: smoke mode, and the logical CPUs every TF test in this process uses."""

from __future__ import annotations

import os

import pytest

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
# Each notebook runs in its own kernel, so only a shared test process is affected: the
# DTensor test modules run first, together.
DTENSOR_MODULES = ("test_tensor_parallel.py", "test_hybrid.py", "test_sharded.py")
# Notebook 05 reads the model notebook 04 saves: never at the same time.
TOGETHER = {"04_training.ipynb": "notebooks 04+05", "05_evaluation.ipynb": "notebooks 04+05"}


def _group(nodeid: str) -> str:
    """What `make test`'s two pytest-xdist workers never split: a notebook (its cells run in
    order in one kernel), 04 with 05, the DTensor modules. Other tests are spread one by one."""
    name = nodeid.split("::")[0].rsplit("/", 1)[-1]
    if name in DTENSOR_MODULES:
        return "dtensor"
    if name.endswith(".ipynb"):
        return TOGETHER.get(name, name)
    return nodeid


def _order(item) -> int:
    """DTensor first (see above), then the longest units, so that both workers finish together."""
    if item.path.name in DTENSOR_MODULES:
        return 0
    if item.path.name == "test_device_counts.py":
        return 1
    return 2 if item.path.suffix == ".ipynb" else 3


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_order)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Schedule by `_group`, in collection order. (xdist's own `--dist loadgroup` loses its
    groups on pytest 9.2: pytest-dev/pytest-xdist#1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SeriesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep the order above
    return SeriesScheduling(config, log)


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
