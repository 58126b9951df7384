"""Shared helpers for the notebook series *Training models too large for one device*.

The package is installed into the project's virtual environment in editable mode
(``pip install -e .``, done by ``make lab`` / ``make test``), so ``import utils`` works
from every notebook, from nbval and from pytest, wherever JupyterLab was started.

Importing it quiets TensorFlow's C++ warnings (``TF_CPP_MIN_LOG_LEVEL=2``) unless you set
that variable yourself; import ``utils`` before ``tensorflow`` for that to take effect. A
few lines TensorFlow prints while it starts (oneDNN, CUDA drivers) still appear.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = [
    "bench",
    "cluster",
    "compression",
    "config",
    "data",
    "devices",
    "distribute",
    "evaluation",
    "hybrid",
    "memory",
    "models",
    "parallel",
    "pipeline",
    "plots",
    "series",
    "tensor_parallel",
    "throughput",
    "training",
]
