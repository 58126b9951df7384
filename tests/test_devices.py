"""Device set-up. Reconfiguration errors are checked in fresh subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from utils import devices


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "2.5", ""])
def test_bad_counts_are_clear_errors(bad):
    with pytest.raises(ValueError, match="whole number >= 1|must be >= 1"):
        devices.parse_num_cpus(bad)


def test_env_variable_sets_the_count(monkeypatch):
    monkeypatch.setenv(devices.NUM_CPUS_ENV, "3")
    assert devices.requested_num_cpus() == 3
    monkeypatch.delenv(devices.NUM_CPUS_ENV)
    assert devices.requested_num_cpus() == devices.DEFAULT_NUM_CPUS
    assert devices.requested_num_cpus(2) == 2


def test_setup_is_idempotent_in_this_process():
    first = devices.setup_devices()
    again = devices.setup_devices()
    assert first.equals(again)
    if devices.device_kind() == "CPU (logical)":
        assert len(devices.compute_devices()) == devices.requested_num_cpus()


def run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    full_env.pop(devices.NUM_CPUS_ENV, None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_changing_the_count_after_init_says_restart():
    code = (
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1\n"  # TF creates its devices here (1 CPU)
        "from utils import devices\n"
        "try:\n"
        "    devices.setup_devices(3)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = run_py(code)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "Restart the kernel" in out.stdout


def test_fresh_process_gets_the_requested_cpus():
    out = run_py(
        "from utils import devices\n"
        "devices.setup_devices(); devices.setup_devices()\n"
        "print(len(devices.compute_devices()), devices.device_kind())",
        SERIES_NUM_CPUS="3",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "3" or "GPU" in out.stdout


def test_bad_env_value_fails_clearly_in_setup():
    out = run_py("from utils import devices\ndevices.setup_devices()", SERIES_NUM_CPUS="abc")
    assert out.returncode != 0 and "whole number >= 1" in out.stderr


def test_replica_threads_keep_the_total_near_the_cores():
    assert devices.replica_threads(2, cores=2) == (1, 2)
    assert devices.replica_threads(4, cores=2) == (1, 4)
    assert devices.replica_threads(2, cores=8) == (4, 2)
    assert devices.replica_threads(1, cores=2) == (2, 2)
    with pytest.raises(ValueError):
        devices.replica_threads(0)
