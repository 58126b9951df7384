"""The CIFAR-10 loader on a generated miniature in the official layout (no real data needed)."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from utils import data


@pytest.fixture()
def mini(tmp_path, monkeypatch):
    """A 60/20-image CIFAR-10 in the official folder layout, plus its .tar.gz.

    The archive's MD5 stands in for the official one (data.ARCHIVE_MD5) during the test.
    """
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    y_train = np.arange(60) % 10
    x_test = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y_test = np.arange(20) % 10
    folder = data.write_official_layout(tmp_path / "src", x_train, y_train, x_test, y_test)
    archive = data.write_archive(folder, tmp_path / data.ARCHIVE_NAME)
    monkeypatch.setattr(data, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    return folder, archive, (x_train, y_train, x_test, y_test)


@pytest.fixture(autouse=True)
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(data.CIFAR10_DIR_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))


def fail_download():
    raise OSError("offline (simulated)")


def test_official_pickle_layout_is_channel_first_rows(mini):
    folder, _, (x_train, y_train, *_) = mini
    raw = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    assert set(raw) >= {b"data", b"labels", b"filenames", b"batch_label"}
    first = x_train[0]
    assert np.array_equal(raw[b"data"][0][:1024], first[..., 0].reshape(-1))  # red plane first


@pytest.mark.parametrize("kind", ["folder", "parent", "archive"])
def test_loads_folder_parent_and_archive(mini, kind):
    folder, archive, (x_train, y_train, x_test, y_test) = mini
    path = {"folder": folder, "parent": folder.parent, "archive": archive}[kind]
    ds = data.load_cifar10(path, download=False)
    assert ds.source == ("local archive" if kind == "archive" else "local folder")
    assert np.array_equal(ds.x_train, x_train) and np.array_equal(ds.y_train, y_train)
    assert np.array_equal(ds.x_test, x_test) and np.array_equal(ds.y_test, y_test)
    assert ds.class_names == list(data.CLASS_NAMES)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert str(path) not in ds.describe()  # never print machine paths


def test_env_variable_and_subsets(mini, monkeypatch):
    folder, *_ = mini
    monkeypatch.setenv(data.CIFAR10_DIR_ENV, str(folder))
    ds = data.load_cifar10(n_train=10, n_test=5, download=False)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (5, 32, 32, 3)
    assert "$CIFAR10_DIR" in ds.describe() and "subset of 60 train / 20 test" in ds.describe()
    with pytest.raises(ValueError):
        data.load_cifar10(n_train=0)


def test_keras_cache_is_second(mini, monkeypatch, tmp_path):
    folder, *_ = mini
    home = tmp_path / "kh"
    cache = home / "datasets" / "cifar-10-batches-py-target"
    cache.mkdir(parents=True)
    (cache / data.FOLDER_NAME).symlink_to(folder)
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(data, "_download", fail_download)
    assert data.load_cifar10().source == "keras cache"


def test_download_is_third(monkeypatch):
    fake = data.make_synthetic(30, 10, seed=3)
    monkeypatch.setattr(data, "_download", lambda: fake)
    ds = data.load_cifar10()
    assert ds.source == "download" and len(ds.x_train) == 30


def test_offline_error_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setattr(data, "_download", fail_download)
    with pytest.raises(data.CifarUnavailableError, match=r"export CIFAR10_DIR=.*offline \(simulated\)|offline \(simulated\).*CIFAR10_DIR"):
        data.load_cifar10()


def test_synthetic_only_when_allowed_and_labelled(monkeypatch):
    monkeypatch.setattr(data, "_download", fail_download)
    ds = data.load_cifar10(allow_synthetic=True, n_train=200, n_test=50)
    assert ds.is_synthetic and ds.source == "synthetic"
    assert "synthetic" in ds.describe() and "synthetic" in ds.label
    assert ds.x_train.shape == (200, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert np.bincount(ds.y_train).tolist() == [20] * 10


def test_synthetic_classes_are_visually_distinct():
    # A nearest-class-mean classifier on raw pixels must beat chance by far:
    # the classes differ in what a learner can see, so a CNN can learn them.
    x_tr, y_tr, x_te, y_te, _ = data.make_synthetic(1000, 300, seed=0)
    feats = lambda x: x.reshape(len(x), -1, 3).mean(axis=1)  # noqa: E731 - mean colour
    means = np.stack([feats(x_tr[y_tr == k]).mean(0) for k in range(10)])
    pred = np.argmin(((feats(x_te)[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y_te).mean() > 0.6


def test_missing_file_is_named(mini):
    folder, *_ = mini
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(folder)
    assert "data_batch_3" in str(err.value)


def test_corrupt_pickle_is_named(mini):
    folder, *_ = mini
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(data.CifarFormatError, match="test_batch: not a readable CIFAR-10 pickle"):
        data.load_cifar10(folder)


def test_wrong_shape_is_named(mini):
    folder, *_ = mini
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad))
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(folder)
    assert "data_batch_2" in str(err.value)


def test_label_count_mismatch_and_missing_path(mini, tmp_path):
    folder, *_ = mini
    bad = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(bad))
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(folder)
    assert "data_batch_1" in str(err.value)
    with pytest.raises(data.CifarFormatError):
        data.load_cifar10(tmp_path / "nowhere")


def test_broken_archive_is_named(tmp_path):
    bad = tmp_path / data.ARCHIVE_NAME
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(bad)
    assert str(bad) in str(err.value)


def test_load_for_mode_uses_smoke_sizes(monkeypatch):
    monkeypatch.setenv("SERIES_MODE", "smoke")
    monkeypatch.setattr(data, "_download", fail_download)
    ds = data.load_for_mode()
    assert ds.is_synthetic and len(ds.x_train) == 2048 and len(ds.x_test) == 512
