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
