"""Tests of utils.cluster (the local multi-worker launcher and its network isolation) and of
the worker program that notebook 09 writes with %%writefile.

The worker program is taken from the notebook itself (its %%writefile cells), never from a
copy. Real training runs use tiny models on synthetic data; the failure paths use a small
fake worker (no TensorFlow), so they take seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from utils import cluster as C

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "09_multi_worker.ipynb"
ON_LINUX = sys.platform.startswith("linux")
TINY = ["--data", "synthetic", "--n-train", "384", "--n-test", "96", "--width", "0.25", "--threads", "1,2"]


def notebook_files(folder: Path, notebook: Path = NOTEBOOK) -> dict[str, Path]:
    """Write the files that the notebook's ``%%writefile`` cells write (``-a`` appends) into
    ``folder``; return ``{file name: path}``. This is how tests get the worker program."""
    files: dict[str, Path] = {}
    for cell in json.loads(notebook.read_text())["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or not source.startswith("%%writefile"):
            continue
        magic, body = source.split("\n", 1)
        *options, target = shlex.split(magic)[1:]
        path = files.setdefault(Path(target).name, folder / Path(target).name)
        with open(path, "a" if "-a" in options else "w") as f:
            f.write(body if body.endswith("\n") else body + "\n")
    return files


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return notebook_files(tmp_path_factory.mktemp("programs"))


FAKE_WORKER = textwrap.dedent(
    """
    import json, os, socket, sys, time
    cfg = json.loads(os.environ["TF_CONFIG"])
    i = cfg["task"]["index"]
    port = int(cfg["cluster"]["worker"][i].rsplit(":", 1)[1])
    what = os.environ.get(f"BEHAVIOUR_{i}", "ok")
    print(f"fake worker {i} on port {port}: {what}", flush=True)
    if what == "nolisten":
        time.sleep(600)
    s = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port)); s.listen()
    if what == "hang":
        time.sleep(600)
    elif what == "fail":
        time.sleep(0.5)
        raise RuntimeError("worker failed on purpose")
    time.sleep(0.5)
    """
)
HANG = {"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "hang"}


@pytest.fixture(autouse=True)
def _temp_workdirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launcher work folders made without workdir= land in the test's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def fake_worker(tmp_path: Path) -> Path:
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return path


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of live processes whose environment holds ``key=value`` (the launcher tags every
    process it starts with ``SERIES_CLUSTER_ID``)."""
    needle, found = f"{key}={value}".encode(), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and needle in (d / "environ").read_bytes().split(b"\0"):
                found += [int(d.name)] if C._pid_alive(int(d.name)) else []
        except OSError:
            continue
    return found


def assert_no_process_left(cluster: C.LocalCluster, within: float = 5.0) -> None:
    """No process tagged with the cluster's id is alive (checked through /proc)."""
    deadline = time.monotonic() + within
    while (left := processes_with_env(C.CLUSTER_ID_ENV, cluster.cluster_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"processes left over: {left}"
    assert not any(C._pid_alive(p) for p in cluster.all_pids())


def isolation_required() -> C.IsolationStatus:
    status = C.isolation_status()
    if not status.available:
        if ON_LINUX and os.geteuid() == 0:
            pytest.fail(f"isolation must work as root on Linux (CI): {status.reason}")
        pytest.skip(f"no network namespace here: {status.reason}")
    return status


@pytest.fixture
def no_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine where no network namespace can be created."""
    fake = C.IsolationStatus(False, "none", "simulated: unprivileged user namespaces are disabled")
    monkeypatch.setattr(C, "isolation_status", lambda: fake)
    monkeypatch.delenv(C.EXPOSED_ENV, raising=False)


# ------------------------------------------------------------------------------ the notebook's programs
def test_notebook_writes_the_worker_programs(programs: dict[str, Path]) -> None:
    assert sorted(programs) == ["worker.py", "worker_fit.py"]
    text = programs["worker.py"].read_text()
    for phase in range(1, 8):
        assert f"# Phase {phase}:" in text
    for path in programs.values():
        compile(path.read_text(), str(path), "exec")


def test_both_keras_flavours_build_the_seed_cnn(programs: dict[str, Path]) -> None:
    code = (
        "import keras, tf_keras, worker_fit as f\n"
        "from utils.models import SEED_CNN_PARAMS\n"
        "print(f.seed_cnn(keras, 1.0).count_params(), f.seed_cnn(tf_keras, 1.0).count_params(), SEED_CNN_PARAMS)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=programs["worker.py"].parent, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    a, b, want = out.stdout.split()[-3:]
    assert a == b == want


# ------------------------------------------------------------------------------ isolation and sockets
def test_exposed_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, allowed in (("1", True), (" yes ", True), ("0", False), ("", False)):
        monkeypatch.setenv(C.EXPOSED_ENV, value)
        assert C.exposed_allowed() is allowed


def test_listening_sockets_sees_a_listener() -> None:
    """Positive control for the /proc/net parser used by the isolation checks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = [x for x in C.listening_sockets() if x.port == port]
        assert found and found[0].address == "127.0.0.1" and not found[0].all_interfaces
        assert found[0].inode in C.socket_inodes([os.getpid()])
    with pytest.raises(RuntimeError):
        C.listening_sockets(pid=2**30)  # no such process: the check says so instead of "nothing"


def test_sockets_are_attributed_by_owner_in_simulated_proc(tmp_path: Path) -> None:
    """Two listeners on port 12345 (hex 3039): only the one whose inode a cluster process holds counts."""
    net = tmp_path / "self" / "net"
    net.mkdir(parents=True)
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = "   {n}: {addr}:3039 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n"
    (net / "tcp").write_text(header + row.format(n=0, addr="0100007F", inode=111) + row.format(n=1, addr="00000000", inode=222))
    (net / "tcp6").write_text(header)
    fds = tmp_path / "4242" / "fd"
    fds.mkdir(parents=True)
    (fds / "3").symlink_to("socket:[222]")
    (fds / "4").symlink_to("/dev/null")
    sockets = C.listening_sockets("self", proc=str(tmp_path))
    assert [(str(s), s.inode) for s in sockets] == [("127.0.0.1:12345", 111), ("0.0.0.0:12345", 222)]
    mine = C.socket_inodes([4242, 999999], proc=str(tmp_path))  # 999999: a process that is gone
    assert [str(s) for s in sockets if s.inode in mine] == ["0.0.0.0:12345"]


def test_unrelated_listener_on_a_cluster_port_number_is_not_the_cluster(fake_worker: Path) -> None:
    """An isolated cluster's port numbers may be in use by someone else outside its namespace."""
    isolation_required()
    with C.LocalCluster(2, script=fake_worker, env=HANG, quiet=True) as cluster, socket.socket() as other:
        other.bind(("0.0.0.0", cluster.ports[0]))  # free here: the cluster's port is in its own namespace
        other.listen()
        assert cluster.ports[0] in {s.port for s in C.listening_sockets("self")}  # same number, listening ...
        assert cluster.host_exposed_ports() == []  # ... but not the cluster's
        assert {s.port for s in cluster.namespace_sockets()} == set(cluster.ports)
    assert_no_process_left(cluster)


def test_isolation_detected_on_this_machine() -> None:
    status = isolation_required()
    assert status.method in ("unshare -n", "unshare -rn")
    assert "available" in status.describe()


def test_refuses_without_isolation_and_without_opt_in(no_isolation: None, fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, start_timeout=10)
    with pytest.raises(C.IsolationUnavailableError) as err:
        cluster.start()
    text = str(err.value)
    assert "simulated: unprivileged user namespaces are disabled" in text
    assert C.EXPOSED_ENV in text and "ALL network interfaces" in text
    assert cluster.all_pids() == []  # nothing was started
    with pytest.raises(C.IsolationUnavailableError):
        C.LocalCluster(2, script=fake_worker, isolate=False).start()


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc")
def test_exposed_with_opt_in_warns_and_is_really_exposed(
    no_isolation: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_worker: Path
) -> None:
    """Opted in: the banner is printed, and the workers' ports listen in this namespace."""
    monkeypatch.setenv(C.EXPOSED_ENV, "1")
    cluster = C.LocalCluster(2, script=fake_worker, env=HANG, quiet=True)
    with pytest.warns(C.ExposedClusterWarning):
        cluster.start()
    with cluster:
        assert "WARNING: this multi-worker cluster runs WITHOUT network isolation" in capsys.readouterr().out
        exposed = cluster.host_exposed_ports()
        assert {s.port for s in exposed} == set(cluster.ports) and all(s.all_interfaces for s in exposed)
    assert_no_process_left(cluster)


# ------------------------------------------------------------------------------ failure paths
def test_busy_port_fails_fast(fake_worker: Path) -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        cluster = C.LocalCluster(2, script=fake_worker, ports=[busy, C.free_ports(1)[0]], isolate=False,
                                 allow_exposed=True, quiet=True)  # fmt: skip
        t0 = time.monotonic()
        with pytest.raises(C.PortBusyError, match=f"{busy}.*already in use"), pytest.warns(C.ExposedClusterWarning):
            cluster.start()
        assert time.monotonic() - t0 < 15
    assert_no_process_left(cluster)


def test_worker_that_never_starts_times_out(fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, start_timeout=4, env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "nolisten"},
                             allow_exposed=True, quiet=True)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(C.WorkerStartTimeout) as err:
        cluster.start()
    assert time.monotonic() - t0 < 20
    assert "Worker(s) [1] did not open their port within 4 s" in str(err.value)
    assert "fake worker 1" in str(err.value)  # its log tail is shown
    assert_no_process_left(cluster)


def test_failed_worker_ends_the_others(fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "fail"},
                             failure_grace=1, allow_exposed=True, quiet=True)  # fmt: skip
    with cluster, pytest.raises(C.WorkerFailed) as err:
        cluster.wait(timeout=30)
    result = err.value.result
    assert result is cluster and result.returncodes[1] == 1
    assert result.stopped_by_launcher == [True, False]
    assert "RuntimeError: worker failed on purpose" in str(err.value)
    assert_no_process_left(cluster)


def test_timeout_ends_everything(fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, env=HANG, timeout=3, allow_exposed=True, quiet=True).start()
    t0 = time.monotonic()
    with pytest.raises(C.ClusterTimeout):
        cluster.wait()
    assert time.monotonic() - t0 < 15
    assert_no_process_left(cluster)


def test_interrupt_ends_everything(fake_worker: Path) -> None:
    # A shell that starts the tests in the background ignores SIGINT for them: restore Python's
    # handler so the interrupt below arrives as KeyboardInterrupt, as in a Jupyter kernel.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_ends_everything(fake_worker)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_ends_everything(fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, env=HANG, allow_exposed=True, quiet=True).start()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # like Jupyter's "interrupt"
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        cluster.wait(timeout=60)
    timer.join()
    assert_no_process_left(cluster)
    with pytest.raises(ValueError), C.LocalCluster(2, script=fake_worker, env=HANG, allow_exposed=True, quiet=True) as c2:
        raise ValueError("a failing cell")  # an error inside `with` ends it too
    assert_no_process_left(c2)


def test_killed_launcher_takes_its_workers_along(fake_worker: Path, tmp_path: Path) -> None:
    """Even SIGKILL of the launching process (no atexit, no finally) leaves nothing behind."""
    code = textwrap.dedent(
        f"""
        import json, utils.cluster as C
        c = C.LocalCluster(2, script={str(fake_worker)!r}, env={HANG!r}, allow_exposed=True, quiet=True,
                           workdir={str(tmp_path / "w")!r}).start()
        print(json.dumps({{"id": c.cluster_id, "pids": c.all_pids()}}), flush=True)
        import time; time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert len(info["pids"]) == 3
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while processes_with_env(C.CLUSTER_ID_ENV, info["id"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with_env(C.CLUSTER_ID_ENV, info["id"]) == []
    finally:
        proc.kill()


# ------------------------------------------------------------------------------ real training
def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_two_workers_isolated_train_and_no_port_in_host_namespace(tmp_path: Path, programs: dict) -> None:
    isolation_required()
    out = tmp_path / "out"
    args = ["--out-dir", out, "--epochs", "2", "--steps-per-epoch", "3", "--global-batch", "32", *TINY]
    with C.LocalCluster(2, args, script=programs["worker.py"], workdir=tmp_path / "logs", timeout=240, quiet=True) as c:
        assert c.isolated
        assert {s.port for s in c.namespace_sockets()} == set(c.ports)  # inside the namespace both listen ...
        host_listening = {s.port for s in C.listening_sockets("self")}
        assert not host_listening & set(c.ports) and c.host_exposed_ports() == []  # ... here none does
        result = c.wait()
    assert result.ok and result.isolated
    assert [r["epoch"] for r in history(out)] == [1, 2]
    assert all(r["train_s"] > 0 and r["eval_s"] > 0 for r in history(out))  # timed apart
    assert (out / "model.keras").is_file()
    assert "saved the final model to model.keras (chief only)" in result.log(0)
    assert "only the chief saves" in result.log(1)
    assert '"task": {"type": "worker", "index": 1}' in result.log(1)  # the TF_CONFIG it read
    a, b = (np.load(out / "seen" / f"worker{i}_epoch1.npy") for i in (0, 1))
    assert len(a) == len(b) == 3 * 16  # 3 steps x 16 examples per worker
    assert not set(a) & set(b)  # DATA auto-sharding: no example seen twice
    assert_no_process_left(c)


def test_three_workers(tmp_path: Path, programs: dict) -> None:
    out = tmp_path / "out"
    args = ["--out-dir", out, "--epochs", "1", "--steps-per-epoch", "2", "--global-batch", "48", *TINY]
    result = C.run_cluster(3, args, script=programs["worker.py"], workdir=tmp_path / "logs", timeout=300,
                           allow_exposed=False, quiet=True)  # fmt: skip
    assert result.ok and len(result.returncodes) == 3
    assert "3 replicas in sync" in result.log(2)
    seen = [set(np.load(out / "seen" / f"worker{i}_epoch1.npy").tolist()) for i in range(3)]
    assert [len(s) for s in seen] == [32, 32, 32]
    assert len(seen[0] | seen[1] | seen[2]) == 96
    assert [r["workers"] for r in history(out)] == [3]


def test_kill_and_resume_loses_and_repeats_no_epoch(tmp_path: Path, programs: dict) -> None:
    out = tmp_path / "out"
    args = ["--out-dir", out, "--epochs", "3", "--steps-per-epoch", "3", "--global-batch", "32",
            "--log-every", "1", "--step-delay", "0.3", *TINY]  # fmt: skip
    worker = programs["worker.py"]
    with C.LocalCluster(2, args, script=worker, workdir=tmp_path / "run1", timeout=240, failure_grace=60,
                        quiet=True) as cluster:  # fmt: skip
        cluster.wait_for_log(0, r"epoch 2/3 step 1/3", timeout=200)
        cluster.kill_worker(1)
        t0 = time.monotonic()
        first = cluster.wait(check=False)
    # TensorFlow notices the lost peer and raises in the survivor, which then exits by itself.
    assert first.returncodes[1] == -signal.SIGKILL and first.killed_on_request[1]
    assert first.returncodes[0] == 1 and not first.stopped_by_launcher[0]
    assert "stopping this worker now (status 1)" in first.log(0)
    assert time.monotonic() - t0 < 60
    assert_no_process_left(cluster)
    assert [r["epoch"] for r in history(out)] == [1]

    second = C.run_cluster(2, args, script=worker, workdir=tmp_path / "run2", timeout=240, quiet=True)
    assert "1 epoch(s) done, resuming with epoch 2" in second.log(0)
    assert "1 epoch(s) done, resuming with epoch 2" in second.log(1)
    rows = history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # none lost, none repeated
    assert [r["attempt"] for r in rows] == [1, 2, 2]
    for epoch in (2, 3):
        assert (out / "seen" / f"worker0_epoch{epoch}.npy").is_file()
