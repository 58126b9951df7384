from __future__ import annotations

import pytest

from utils import config


def test_default_mode_is_full(monkeypatch):
    monkeypatch.delenv(config.MODE_ENV, raising=False)
    assert config.get_mode() == "full"
    assert not config.is_smoke()


@pytest.mark.parametrize("raw", ["smoke", " SMOKE ", "Smoke"])
def test_smoke_mode_ignores_case_and_spaces(monkeypatch, raw):
    monkeypatch.setenv(config.MODE_ENV, raw)
    assert config.is_smoke()
    assert config.pick(smoke=1, full=2) == 1


@pytest.mark.parametrize("raw", ["fast", "1", "", "ful"])
def test_bad_mode_is_a_clear_error(monkeypatch, raw):
    monkeypatch.setenv(config.MODE_ENV, raw)
    with pytest.raises(ValueError, match=r"SERIES_MODE=.*full.*smoke"):
        config.get_mode()


def test_sizes_per_mode():
    smoke, full = config.sizes("smoke"), config.sizes("full")
    assert full.n_train == 50_000 and full.n_test == 10_000 and full.epochs == 10
    assert smoke.n_train < full.n_train and smoke.epochs <= full.epochs
    assert smoke.batch_size == full.batch_size  # same recipe, smaller run
    with pytest.raises(ValueError):
        config.sizes("medium")


def test_seed_everything_repeats_random_numbers():
    import numpy as np
    import tensorflow as tf

    config.seed_everything(7)
    a = (np.random.rand(), float(tf.random.uniform(())))
    config.seed_everything(7)
    b = (np.random.rand(), float(tf.random.uniform(())))
    assert a == b


def test_run_dir_fresh_empties(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    d = config.run_dir("demo")
    (d / "x").write_text("1")
    assert (config.run_dir("demo") / "x").exists()
    assert not (config.run_dir("demo", fresh=True) / "x").exists()
    with pytest.raises(ValueError):
        config.run_dir("../escape")
