"""CIFAR-10 loading that works online, offline and in CI.

:func:`load_cifar10` looks for the data in this order and stops at the first hit:

1. ``data_dir`` (argument) or ``$CIFAR10_DIR``: an extracted ``cifar-10-batches-py``
   folder, or the official ``cifar-10-python.tar.gz`` archive (read without extracting);
2. Keras's cache (``~/.keras/datasets/`` or ``$KERAS_HOME/datasets/``), filled by an
   earlier download;
3. a download through :func:`keras.datasets.cifar10.load_data` (fills the cache);
4. if that fails (offline): an error that says how to point at a local copy, unless the
   caller passed ``allow_synthetic=True``. Then a small generated CIFAR-shaped dataset
   with visually distinct classes is returned, labelled ``synthetic`` everywhere.

Bad files get a :class:`CifarFormatError` that names the file. Paths are never printed in
:meth:`Cifar10.describe`, so notebook outputs stay free of machine-specific paths.

Data files are not trusted. The pickles are read by :class:`CifarUnpickler`, which builds
only what the official files hold (dicts, lists, bytes, strings, numbers, NumPy arrays)
and refuses anything else before it is created, so a crafted file cannot run code. An
archive must match the official MD5, and every member's path is checked (no absolute
paths, no ``..``, no links or devices); members are read in memory, never extracted.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

CIFAR10_DIR_ENV = "CIFAR10_DIR"
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on OFFICIAL_URL; None: no check
DOWNLOAD_TIMEOUT_S = 30.0


class CifarFormatError(ValueError):
    """A CIFAR-10 file is missing, unreadable or has the wrong layout. The message names it."""


class CifarUnavailableError(RuntimeError):
    """No CIFAR-10 copy was found and the download failed."""


@dataclass
class Cifar10:
    """CIFAR-10 (or its synthetic stand-in) as NumPy arrays.

    Images are ``uint8`` of shape ``(N, 32, 32, 3)`` (channels last); labels are ``int64``
    of shape ``(N,)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    source: str  # "local folder", "local archive", "keras cache", "download" or "synthetic"
    origin: str = ""  # how the source was found, e.g. "via $CIFAR10_DIR" (never a path)
    full_sizes: tuple[int, int] = field(default=(0, 0))  # train/test sizes before subsetting

    @property
    def is_synthetic(self) -> bool:
        """True for the generated stand-in, never for real CIFAR-10."""
        return self.source == "synthetic"

    @property
    def label(self) -> str:
        """``"CIFAR-10"`` or ``"synthetic CIFAR-shaped data"``: use it in titles and prints."""
        return "synthetic CIFAR-shaped data" if self.is_synthetic else "CIFAR-10"

    def counts_table(self) -> pd.DataFrame:
        """Images per class in the train and test splits."""
        k = len(self.class_names)
        train, test = (np.bincount(y, minlength=k) for y in (self.y_train, self.y_test))
        return pd.DataFrame({"class": self.class_names, "train": train, "test": test})

    def describe(self) -> str:
        """A few lines on where the data came from, shapes and class balance (no paths)."""
        how = f" ({self.origin})" if self.origin else ""
        counts = self.counts_table()
        lines = [
            f"Data: {self.label}; source: {self.source}{how}",
            f"train: {self.x_train.shape} {self.x_train.dtype}, labels {self.y_train.shape}",
            f"test:  {self.x_test.shape} {self.x_test.dtype}, labels {self.y_test.shape}",
            f"classes ({len(self.class_names)}): {', '.join(self.class_names)}",
            f"per class: train {counts['train'].min()}-{counts['train'].max()}, "
            f"test {counts['test'].min()}-{counts['test'].max()}",
        ]
        if self.full_sizes != (len(self.x_train), len(self.x_test)) and self.full_sizes != (0, 0):
            lines.append(
                f"subset of {self.full_sizes[0]:,} train / {self.full_sizes[1]:,} test images"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading files

def to_float(images: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """uint8 pixels in [0, 255] -> floats in [0, 1], the scaling the seed CNN expects.

    Floating-point input is only cast to ``dtype`` (it is taken as already scaled).
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(dtype) / np.asarray(255.0, dtype)
    return images.astype(dtype)


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the official CIFAR-10 files contain.

    Dicts, lists, bytes, strings and numbers need no class. NumPy arrays need the three
    names below (``numpy.core`` in the official files, ``numpy._core`` when written by
    NumPy 2). Any other class or function, the way a crafted pickle runs code, is refused
    in :meth:`find_class`, i.e. before it is looked up, let alone called.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(Exception):
    """Raised by :class:`CifarUnpickler` for a name no CIFAR-10 file contains."""


def safe_unpickle(raw: bytes, name: str) -> object:
    """Unpickle ``raw`` (read from the file ``name``) with :class:`CifarUnpickler`.

    Raises:
        CifarFormatError: naming ``name``, for a refused pickle or a corrupt one.
    """
    try:
        return CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as err:
        raise CifarFormatError(
            f"{name}: refused to load: the file asks for {err}, which no CIFAR-10 file contains "
            "(only dicts, lists, bytes, numbers and NumPy arrays are loaded, so nothing in it "
            f"ran). Do not use this copy: download CIFAR-10 again from {OFFICIAL_URL}."
        ) from None
    except Exception as err:  # pickle raises many types for corrupt input
        raise CifarFormatError(
            f"{name}: not a readable CIFAR-10 pickle ({type(err).__name__}: {err}). "
            "The file is corrupt or incomplete: download it again."
        ) from None


def parse_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pickled CIFAR-10 batch (official "python version" layout).

    Returns ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``.

    Raises:
        CifarFormatError: naming ``name`` if the pickle is refused, corrupt or the layout
            is wrong.
    """
    batch = safe_unpickle(raw, name)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch)[:5] if isinstance(batch, dict) else type(batch).__name__
        raise CifarFormatError(
            f"{name}: expected a dict with keys b'data' and b'labels', got {keys}. "
            "Is this the 'python version' of CIFAR-10?"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise CifarFormatError(
            f"{name}: b'data' has shape {data.shape}, expected (N, 3072) "
            "(32x32 pixels x 3 channel planes)."
        )
    if data.dtype != np.uint8:
        raise CifarFormatError(f"{name}: b'data' has dtype {data.dtype}, expected uint8.")
    if labels.shape != (data.shape[0],):
        raise CifarFormatError(
            f"{name}: {labels.shape[0]} labels for {data.shape[0]} images."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CifarFormatError(f"{name}: labels outside 0-9.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def parse_meta(raw: bytes, name: str) -> list[str]:
    """Decode ``batches.meta`` and return the class names."""
    meta = safe_unpickle(raw, name)
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except Exception as err:
        raise CifarFormatError(
            f"{name}: cannot read the class names ({type(err).__name__}: {err})."
        ) from None
    if len(names) != 10:
        raise CifarFormatError(f"{name}: expected 10 class names, got {len(names)}.")
    return names


def _assemble(read: Callable[[str], bytes], where: str) -> tuple[np.ndarray, ...]:
    """Read all batches through ``read(filename)`` and stack them."""
    parts = [parse_batch(read(f), f"{where}/{f}") for f in TRAIN_FILES]
    x_test, y_test = parse_batch(read(TEST_FILE), f"{where}/{TEST_FILE}")
    names = parse_meta(read(META_FILE), f"{where}/{META_FILE}")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test, names


def read_folder(folder: Path) -> tuple[np.ndarray, ...]:
    """Read an extracted ``cifar-10-batches-py`` folder (or its parent)."""
    folder = Path(folder)
    if (folder / FOLDER_NAME).is_dir():
        folder = folder / FOLDER_NAME

    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise CifarFormatError(
                f"{path}: file missing. A complete CIFAR-10 folder holds "
                f"{', '.join(TRAIN_FILES)}, {TEST_FILE} and {META_FILE}."
            )
        return path.read_bytes()

    return _assemble(read, str(folder))


def check_md5(archive: Path) -> None:
    """Compare the archive's MD5 with the official one (:data:`ARCHIVE_MD5`)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if ARCHIVE_MD5 is not None and digest.hexdigest() != ARCHIVE_MD5:
        raise CifarFormatError(
            f"{archive}: MD5 checksum {digest.hexdigest()} is not the official {ARCHIVE_NAME}'s "
            f"{ARCHIVE_MD5}: the file is incomplete or was altered. Download it again from "
            f"{OFFICIAL_URL}, or point {CIFAR10_DIR_ENV} at an extracted '{FOLDER_NAME}' folder."
        )


_BROKEN = (tarfile.TarError, OSError, EOFError, zlib.error)  # what a damaged .tar.gz raises


def read_archive(archive: Path) -> tuple[np.ndarray, ...]:
    """Read the official ``cifar-10-python.tar.gz`` in memory, never extracting it to disk.

    The checksum comes first; then every member must pass :func:`tarfile.data_filter`
    (what ``extractall(filter="data")`` checks), so nothing would land outside a target.
    """
    archive = Path(archive)
    check_md5(archive)
    try:
        tar = tarfile.open(archive, "r:gz")
        with tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for m in tar.getmembers():
                _check_member(m, archive)

            def read(name: str) -> bytes:
                if name not in members:
                    raise CifarFormatError(
                        f"{archive}: archive has no file {name!r}; it is not the official "
                        f"{ARCHIVE_NAME}. Download it again from {OFFICIAL_URL}."
                    )
                return tar.extractfile(members[name]).read()  # type: ignore[union-attr]

            return _assemble(read, str(archive))
    except _BROKEN as err:
        raise CifarFormatError(
            f"{archive}: not a readable .tar.gz ({type(err).__name__}: {err}). The file is "
            f"corrupt or incomplete: download it again from {OFFICIAL_URL}."
        ) from None


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse absolute paths and ``..`` (which the data filter would only strip), links
    pointing outside, devices and other special files."""
    bad = member.name.startswith(("/", "\\")) or ".." in Path(member.name).parts
    problem = "absolute path or '..'" if bad else ""
    try:
        tarfile.data_filter(member, "/nonexistent-target")
    except tarfile.FilterError as err:
        problem = str(err)
    if problem:
        raise CifarFormatError(
            f"{archive}: refused: member {member.name!r} is unsafe ({problem}). The official "
            f"archive has no such member: download it again from {OFFICIAL_URL}."
        )


def read_local(path: Path) -> tuple[tuple[np.ndarray, ...], str]:
    """Read a folder or an archive; return the arrays and ``"local folder"``/``"local archive"``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_folder(path), "local folder"
    if path.is_file():
        return read_archive(path), "local archive"
    raise CifarFormatError(
        f"{path}: no such file or folder. Point {CIFAR10_DIR_ENV} (or data_dir) at the "
        f"extracted '{FOLDER_NAME}' folder or at '{ARCHIVE_NAME}'."
    )


def keras_cache_candidates() -> list[Path]:
    """Places where Keras leaves CIFAR-10 after a download (newest layout first)."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    base = home / "datasets"
    return [base / f"{FOLDER_NAME}-target" / FOLDER_NAME, base / FOLDER_NAME]


def _download() -> tuple[np.ndarray, ...]:
    """Download through Keras (with a socket timeout so offline machines fail fast)."""
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    finally:
        socket.setdefaulttimeout(previous)
    flat = (y_train.reshape(-1).astype(np.int64), y_test.reshape(-1).astype(np.int64))
    return x_train, flat[0], x_test, flat[1], list(CLASS_NAMES)


# --------------------------------------------------------------------------- synthetic data
def make_synthetic(n_train: int = 2048, n_test: int = 512, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Generate CIFAR-shaped data that a CNN can learn: 10 visually distinct classes.

    Each class has its own colour and stripe orientation; position, phase, brightness and
    pixel noise vary per image. Classes are balanced (round robin), then shuffled.
    """
    rng = np.random.default_rng(seed)
    palette = np.array(
        [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
         [145, 30, 180], [70, 240, 240], [240, 50, 230], [170, 110, 40], [128, 128, 128]],
        dtype=np.float32,
    )  # fmt: skip
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
        theta = labels * (np.pi / 10)
        phase = rng.uniform(0, 2 * np.pi, n)
        freq = rng.uniform(0.18, 0.26, n)
        proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
        stripes = 0.5 + 0.5 * np.sin(freq[:, None, None] * 2 * np.pi * proj / 2 + phase[:, None, None])
        colour = palette[labels] * rng.uniform(0.7, 1.0, (n, 1))
        img = stripes[..., None] * colour[:, None, None, :] + (1 - stripes[..., None]) * 30
        img += rng.normal(0, 12, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), labels

    x_train, y_train = images(n_train)
    x_test, y_test = images(n_test)
    return x_train, y_train, x_test, y_test, list(CLASS_NAMES)


# --------------------------------------------------------------------------- writing files
def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    """Write one batch in the official pickle layout (bytes keys, channel-first rows)."""
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": rows.astype(np.uint8),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
    }
    Path(path).write_bytes(pickle.dumps(batch, protocol=4))


def write_official_layout(
    folder: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
    y_test: np.ndarray, class_names: list[str] | tuple[str, ...] = CLASS_NAMES,
) -> Path:  # fmt: skip
    """Write arrays as a ``cifar-10-batches-py`` folder inside ``folder``; return its path.

    Used by the tests (a miniature archive) and handy for making offline copies.
    """
    target = Path(folder) / FOLDER_NAME
    target.mkdir(parents=True, exist_ok=True)
    for i, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5), strict=True), 1):
        write_batch(target / f"data_batch_{i}", xs, ys, f"training batch {i} of 5")
    write_batch(target / TEST_FILE, x_test, y_test, "testing batch 1 of 1")
    meta = {b"label_names": [n.encode() for n in class_names], b"num_cases_per_batch": len(y_test)}
    (target / META_FILE).write_bytes(pickle.dumps(meta, protocol=4))
    return target


def write_archive(folder: Path, archive: Path) -> Path:
    """Pack a ``cifar-10-batches-py`` folder into a ``.tar.gz`` laid out like the official one.

    Its MD5 is not the official one, so :func:`load_cifar10` refuses it unless
    :data:`ARCHIVE_MD5` is changed (the tests do); share offline copies as folders.
    """
    archive = Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=FOLDER_NAME)
    return archive


# --------------------------------------------------------------------------- the loader
def _subset(arrays: tuple[np.ndarray, ...], n_train: int | None, n_test: int | None) -> tuple:
    x_train, y_train, x_test, y_test, names = arrays
    for n, what in ((n_train, "n_train"), (n_test, "n_test")):
        if n is not None and n < 1:
            raise ValueError(f"{what} must be >= 1 or None (all), got {n}.")
    return (x_train[:n_train], y_train[:n_train], x_test[:n_test], y_test[:n_test], names)


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    allow_synthetic: bool = False,
    download: bool = True,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> Cifar10:
    """Load CIFAR-10 from the first place that has it (see the module docstring).

    Args:
        data_dir: a ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz``. Defaults
            to ``$CIFAR10_DIR``. If given, it must be valid: no silent fallback.
        allow_synthetic: return generated data when no real copy can be had.
        download: try ``keras.datasets.cifar10.load_data()`` when no local copy exists.
        n_train, n_test: keep only the first images of each split (``None``: all).
        seed: seed of the synthetic generator.

    Raises:
        CifarFormatError: a given file or folder is missing, corrupt or of the wrong shape.
        CifarUnavailableError: no copy found, the download failed, synthetic not allowed.
    """
    origin = ""
    arrays: tuple[np.ndarray, ...] | None = None
    source = ""
    if data_dir is None and os.environ.get(CIFAR10_DIR_ENV):
        data_dir, origin = os.environ[CIFAR10_DIR_ENV], f"via ${CIFAR10_DIR_ENV}"
    elif data_dir is not None:
        origin = "via the data_dir argument"

    if data_dir is not None:
        arrays, source = read_local(Path(data_dir))
    else:
        for candidate in keras_cache_candidates():
            if candidate.is_dir():
                arrays, source, origin = read_folder(candidate), "keras cache", ""
                break

    failure = ""
    if arrays is None and download:
        try:
            arrays, source = _download(), "download"
        except Exception as err:  # network errors come in many types
            failure = f"The download failed ({type(err).__name__}: {err}). "
    elif arrays is None:
        failure = "Download was switched off (download=False). "

    if arrays is None:
        if not allow_synthetic:
            raise CifarUnavailableError(
                f"CIFAR-10 is not available. {failure}To work offline, fetch "
                f"'{ARCHIVE_NAME}' from {OFFICIAL_URL} on a machine with internet, copy it "
                f"(or its extracted '{FOLDER_NAME}' folder) here, and run "
                f"`export {CIFAR10_DIR_ENV}=/path/to/{FOLDER_NAME}` before starting "
                "JupyterLab, or pass data_dir=... to load_cifar10()."
            )
        sizes = (n_train or 2048, n_test or 512)
        arrays, source, origin = make_synthetic(*sizes, seed=seed), "synthetic", "no real copy could be found or downloaded"

    full_sizes = (len(arrays[0]), len(arrays[2]))
    x_train, y_train, x_test, y_test, names = _subset(arrays, n_train, n_test)
    return Cifar10(x_train, y_train, x_test, y_test, list(names), source, origin, full_sizes)


def load_for_mode(**kwargs: object) -> Cifar10:
    """Load CIFAR-10 at the current mode's sizes; smoke mode may fall back to synthetic data.

    A shortcut for ``load_cifar10(allow_synthetic=config.is_smoke(), n_train=S.n_train,
    n_test=S.n_test)``; keyword arguments override those defaults.
    """
    from utils import config

    s = config.sizes()
    opts: dict[str, object] = {
        "allow_synthetic": config.is_smoke(),
        "n_train": s.n_train,
        "n_test": s.n_test,
    }
    opts.update(kwargs)
    return load_cifar10(**opts)  # type: ignore[arg-type]
