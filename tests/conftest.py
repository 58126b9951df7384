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
