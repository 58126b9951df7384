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


def test_too_many_cpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(devices.NUM_CPUS_ENV, "1000")
    with pytest.raises(ValueError):
        devices.requested_num_cpus()
    assert devices.requested_num_cpus(devices.MAX_NUM_CPUS) == devices.MAX_NUM_CPUS
    assert devices.replica_threads(2, cores=128) == (64, 2)  # core counts are not capped


@pytest.mark.parametrize("bad", ["abc", "0", "5", "-1", "2.5"])
def test_bad_gpu_split_is_a_clear_error(bad, monkeypatch):
    monkeypatch.setenv(devices.NUM_GPUS_ENV, bad)
    with pytest.raises(ValueError):
        devices.requested_gpu_split()


def test_gpu_split_request(monkeypatch):
    monkeypatch.delenv(devices.NUM_GPUS_ENV, raising=False)
    assert devices.requested_gpu_split() == 1
    monkeypatch.setenv(devices.NUM_GPUS_ENV, " 3 ")
    assert devices.requested_gpu_split() == 3
    assert devices.requested_gpu_split(4) == 4


def test_plan_splits_only_a_single_gpu():
    assert devices.plan_gpus(0, None, 4).split == 0  # no GPU: logical CPUs
    assert devices.plan_gpus(1, 16000, 1).split == 0  # no request: memory growth as before
    several = devices.plan_gpus(2, 16000, 4)
    assert several.split == 0 and "only splits a single GPU" in several.note
    plan = devices.plan_gpus(1, 16000, 4)
    assert (plan.split, plan.memory_mb) == (4, 3600)
    assert plan.split * plan.memory_mb <= 16000 * devices.GPU_MEMORY_SHARE
    unknown = devices.plan_gpus(1, None, 2)
    assert unknown.memory_mb == int(devices.DEFAULT_GPU_MEMORY_MB * devices.GPU_MEMORY_SHARE / 2)


def test_all_reduce_choice_for_logical_gpus():
    gpu = [f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in range(3)]
    cpu = [f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(3)]
    assert devices.cross_device_ops_name(gpu, 3, 1) == "ReductionToOneDevice"  # one GPU split
    assert devices.cross_device_ops_name(gpu[:2], 4, 1) == "ReductionToOneDevice"  # a subset
    assert devices.cross_device_ops_name(gpu, 3, 3) is None  # real GPUs: NCCL (TF's default)
    assert devices.cross_device_ops_name(cpu, 0, 0) is None  # logical CPUs: unchanged
    assert hasattr(__import__("tensorflow").distribute, "ReductionToOneDevice")


def test_strategy_on_this_machine_keeps_the_default_ops():
    names = devices.compute_devices()[:2]
    strategy = devices.make_strategy(names)
    assert strategy.num_replicas_in_sync == len(names)


def test_gpu_split_value_is_checked_in_setup():
    out = run_py("from utils import devices\ndevices.setup_devices()", SERIES_NUM_GPUS="9")
    assert out.returncode != 0 and "SERIES_NUM_GPUS" in out.stderr
