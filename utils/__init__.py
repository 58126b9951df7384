"""Shared infrastructure for the notebook series *Training models too large for one device*.

The package is installed into the project's virtual environment in editable mode
(``pip install -e .``, done by ``make lab`` / ``make test``), so ``import utils`` works
from every notebook, from nbval and from pytest, wherever JupyterLab was started.

``utils`` holds what the notebooks should not spend cells on: modes (``config``), devices,
CIFAR-10 loading (``data``), the seed model (``models``), plots, the memory calculator
(``memory``), the local cluster launcher (``cluster``), benchmark helpers (``bench``,
``throughput``), LiteRT conversion and file sizes (``compression``) and the run-time tables
(``series``). The algorithms live in the notebooks; what a later
notebook reuses is exported from them into ``utils.lessons`` (generated, never edited).

Importing ``utils`` first also keeps TensorFlow's start-up log out of the notebooks: it sets
``TF_CPP_MIN_LOG_LEVEL=2`` and imports TensorFlow with the process's standard error
silenced, because a few lines (absl's "All log messages before absl::InitializeLog()", the
CUDA driver probe on a machine without GPU) ignore that variable. Set ``SERIES_TF_LOGS=1``
to see them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def silenced_stderr() -> Iterator[None]:
    """Send file descriptor 2 (C++ logging included) to /dev/null inside the block.

    Python exceptions still propagate; only what is written to standard error is lost.
    Does nothing when ``SERIES_TF_LOGS=1``.
    """
    if os.environ.get("SERIES_TF_LOGS") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


if "tensorflow" not in sys.modules:
    with silenced_stderr():
        import tensorflow  # noqa: F401
