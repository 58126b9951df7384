"""Issue 19: no code runs from a data file, unsafe archive members are refused, and
damaged archives get the project's own error naming the file.

Each booby trap is first shown to work with the standard unpickler (it creates its marker
file), then shown to do nothing through utils.data.
"""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from utils import data


class Trap:
    """Pickles to a call of exec() that creates ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def trapped_batch(marker) -> bytes:
    return pickle.dumps({b"labels": [0], b"data": Trap(marker)}, protocol=4)


@pytest.fixture()
def folder(tmp_path):
    x, y, xt, yt, _ = data.make_synthetic(20, 10)
    return data.write_official_layout(tmp_path / "copy", x, y, xt, yt)


def use_as_official(monkeypatch, archive):
    """Let ``archive`` pass the checksum, so the checks after it are what is tested."""
    monkeypatch.setattr(data, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())


def test_the_trap_works_with_the_standard_unpickler(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(trapped_batch(marker))
    assert marker.exists()


@pytest.mark.parametrize("victim", ["data_batch_1", "test_batch", "batches.meta"])
def test_booby_trapped_pickle_never_runs(folder, tmp_path, victim):
    marker = tmp_path / "ran"
    (folder / victim).write_bytes(trapped_batch(marker))
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(folder, download=False)
    assert not marker.exists()
    message = str(err.value)
    assert f"{folder / victim}:" in message and "builtins.exec, which no CIFAR-10 file contains" in message


def test_booby_trapped_pickle_inside_an_archive(folder, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (folder / "data_batch_2").write_bytes(trapped_batch(marker))
    archive = data.write_archive(folder, tmp_path / data.ARCHIVE_NAME)
    use_as_official(monkeypatch, archive)
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(archive, download=False)
    assert not marker.exists() and f"{archive}/data_batch_2" in str(err.value)


def test_only_the_official_names_are_admitted():
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    legacy = pickle.dumps(arr, protocol=3).replace(b"numpy._core.", b"numpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in legacy  # how the official files say it
    assert np.array_equal(data.safe_unpickle(legacy, "x"), arr)
    assert data.safe_unpickle(pickle.dumps({b"a": [1, 2.5, "s", b"b"]}), "x") == {b"a": [1, 2.5, "s", b"b"]}
    for other in (io.BytesIO(b""), collections.OrderedDict(a=1), complex(1, 2)):
        with pytest.raises(data.CifarFormatError):
            data.safe_unpickle(pickle.dumps(other), "x")


def archive_with(tmp_path, folder, name: str, kind=tarfile.REGTYPE, linkname: str = "") -> str:
    """The mini copy as a .tar.gz plus one extra member ``name`` (a file or a link)."""
    archive = tmp_path / data.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=data.FOLDER_NAME)
        info = tarfile.TarInfo(name)
        info.type, info.linkname, payload = kind, linkname, b"owned"
        info.size = len(payload) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    return archive


@pytest.mark.parametrize(
    "name, kind, link",
    [
        ("../evil.txt", tarfile.REGTYPE, ""),
        (f"{data.FOLDER_NAME}/../../evil.txt", tarfile.REGTYPE, ""),
        ("/tmp/h20-evil-absolute.txt", tarfile.REGTYPE, ""),
        (f"{data.FOLDER_NAME}/data_batch_1", tarfile.SYMTYPE, "/etc/passwd"),
        (f"{data.FOLDER_NAME}/escape", tarfile.SYMTYPE, "../../.."),
    ],
)
def test_malicious_tar_member_is_refused(folder, tmp_path, monkeypatch, name, kind, link):
    work = tmp_path / "work"
    work.mkdir()
    archive = archive_with(tmp_path, folder, name, kind, link)
    use_as_official(monkeypatch, archive)
    monkeypatch.chdir(work)
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(archive, download=False)
    assert str(archive) in str(err.value) and repr(name) in str(err.value)
    assert not list(tmp_path.glob("evil*")) and not (tmp_path.parent / "evil.txt").exists()
    assert not list(work.iterdir())


def test_an_archive_that_is_not_the_official_one_is_refused(folder, tmp_path):
    archive = data.write_archive(folder, tmp_path / data.ARCHIVE_NAME)
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(archive, download=False)
    assert str(archive) in str(err.value) and data.ARCHIVE_MD5 in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "plain tar", "missing member"])
def test_broken_archives_get_the_projects_error(folder, tmp_path, monkeypatch, damage):
    archive = data.write_archive(folder, tmp_path / data.ARCHIVE_NAME)
    raw = archive.read_bytes()
    if damage == "truncated":
        archive.write_bytes(raw[: len(raw) // 2])
    elif damage == "not gzip":
        archive.write_bytes(b"<html>404 Not Found</html>")
    elif damage == "plain tar":
        with tarfile.open(archive, "w") as tar:
            tar.add(folder, arcname=data.FOLDER_NAME)
    else:
        (folder / "data_batch_3").unlink()
        data.write_archive(folder, archive)
    for official in (False, True):  # the checksum catches it; without it, the reader does
        if official:
            use_as_official(monkeypatch, archive)
        with pytest.raises(data.CifarFormatError) as err:
            data.load_cifar10(archive, download=False)
        assert str(archive) in str(err.value) and "download it again" in str(err.value).lower()
