"""The single smoke/full switch, the sizes each mode implies, and seeding.

Every notebook and script reads one environment variable:

``SERIES_MODE``
    ``full`` (default): the real run whose outputs are committed.
    ``smoke``: a fast run (seconds per notebook) used by CI and on slow laptops. It uses
    tiny subsets, one epoch and few steps; it may fall back to synthetic data.

Any other value raises :class:`ValueError` naming the variable and the allowed values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

MODE_ENV = "SERIES_MODE"
MODES = ("full", "smoke")
DEFAULT_SEED = 42

T = TypeVar("T")


def get_mode() -> str:
    """Return ``"full"`` or ``"smoke"`` from ``$SERIES_MODE`` (default ``"full"``).

    Raises:
        ValueError: if the variable holds anything else (case and spaces are ignored).
    """
    raw = os.environ.get(MODE_ENV, "full")
    mode = raw.strip().lower()
    if mode not in MODES:
        raise ValueError(
            f"{MODE_ENV}={raw!r} is not a valid mode. Use {MODE_ENV}=full for the real run "
            f"or {MODE_ENV}=smoke for the fast CI check (e.g. `export {MODE_ENV}=smoke`), "
            "then restart the kernel."
        )
    return mode


def is_smoke() -> bool:
    """True when the series runs in smoke mode."""
    return get_mode() == "smoke"


def pick(smoke: T, full: T) -> T:
    """Return ``smoke`` in smoke mode and ``full`` in full mode.

    Use it for notebook-specific sizes: ``steps = config.pick(smoke=3, full=200)``.
    """
    return smoke if is_smoke() else full


@dataclass(frozen=True)
class Sizes:
    """Sizes a mode implies. Notebooks take what they need from here."""

    mode: str
    n_train: int  # training images used (CIFAR-10 has 50,000)
    n_test: int  # test images used (CIFAR-10 has 10,000)
    epochs: int  # epochs of a full training run
    batch_size: int  # global batch size of the series' recipe
    steps: int  # optimisation steps of short demos (equivalence runs, benchmarks)
    bench_batches: int  # batches timed per throughput measurement

    def as_dict(self) -> dict[str, int | str]:
        """The sizes as a plain dict (handy for a one-line print)."""
        return asdict(self)


_SIZES = {
    "smoke": Sizes("smoke", n_train=2048, n_test=512, epochs=1, batch_size=128, steps=3, bench_batches=4),
    "full": Sizes("full", n_train=50_000, n_test=10_000, epochs=10, batch_size=128, steps=20, bench_batches=40),
}


def sizes(mode: str | None = None) -> Sizes:
    """Return the :class:`Sizes` of ``mode`` (default: the current mode)."""
    mode = get_mode() if mode is None else mode
    if mode not in _SIZES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")
    return _SIZES[mode]


def seed_everything(seed: int = DEFAULT_SEED) -> int:
    """Seed Python, NumPy and TensorFlow/Keras so reruns start from the same weights.

    Returns the seed, so a notebook can print it.
    """
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import keras  # local import: config must stay importable without TensorFlow loaded

    keras.utils.set_random_seed(seed)
    return seed


REPO_ROOT = Path(__file__).resolve().parent.parent


def run_dir(name: str, *, fresh: bool = False) -> Path:
    """A folder for a notebook's artefacts (checkpoints, logs, saved models): ``runs/<name>``.

    ``runs/`` sits at the repository root and is git-ignored. With ``fresh=True`` the folder
    is emptied first, so "Restart and run all" twice in a row starts from the same state.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"run_dir name must be a plain folder name, got {name!r}")
    path = REPO_ROOT / "runs" / name
    if fresh and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def quiet_tf_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Raise TensorFlow's Python logger to ``level`` inside the block (restored after).

    Hides ``MirroredStrategy``'s INFO lines and the "triggered tf.function retracing"
    warnings that comparing several freshly built variants of one step triggers on purpose.
    """
    logger = logging.getLogger("tensorflow")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
