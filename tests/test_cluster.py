"""Tests of utils.cluster (local multi-worker launcher, isolation, config generators) and
utils.worker_train (the training program the workers run).

The cluster runs use real TensorFlow workers on tiny models and synthetic data; the
failure paths use a small fake worker (no TensorFlow) so they take seconds.
"""

from __future__ import annotations

import json
import os
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
import yaml

from utils import cluster as C
from utils import worker_train as W

ON_LINUX = sys.platform.startswith("linux")
TINY = [
    "--data", "synthetic", "--n-train", "384", "--n-test", "96", "--width", "0.25",
    "--threads", "1,2",
]  # fmt: skip


# ------------------------------------------------------------------------------ helpers
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


@pytest.fixture(autouse=True)
def _temp_workdirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launcher work folders made without workdir= land in the test's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def fake_worker(tmp_path: Path) -> Path:
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return path


def assert_no_process_left(cluster: C.LocalCluster, within: float = 5.0) -> None:
    """No process tagged with the cluster's id is alive (checked through /proc)."""
    deadline = time.monotonic() + within
    while True:
        left = C.processes_with_env(C.CLUSTER_ID_ENV, cluster.cluster_id)
        if not left or time.monotonic() > deadline:
            break
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
    monkeypatch.setattr(C, "isolation_status", lambda refresh=False: fake)
    monkeypatch.delenv(C.EXPOSED_ENV, raising=False)


# ------------------------------------------------------------------------------ TF_CONFIG
def test_make_tf_config_roundtrip() -> None:
    cfg = C.make_tf_config(["a:1000", "b:1000"], 1)
    assert cfg == {
        "cluster": {"worker": ["a:1000", "b:1000"]},
        "task": {"type": "worker", "index": 1},
    }
    assert C.validate_tf_config(json.dumps(cfg)) == cfg
    assert C.is_chief(C.make_tf_config(["a:1", "b:1"], 0))
    assert not C.is_chief(C.make_tf_config(["a:1", "b:1"], 1))
    with_chief = C.make_tf_config(["a:1", "b:1"], 0, chief="c:1")
    assert not C.is_chief(with_chief)
    assert C.is_chief({**with_chief, "task": {"type": "chief", "index": 0}})


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        (None, "TF_CONFIG is not set"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"task": {"type": "worker", "index": 0}}, "no 'cluster'"),
        ({"cluster": {"boss": ["a:1"]}, "task": {"type": "boss", "index": 0}}, "unknown task type"),
        ({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}, "non-empty list"),
        (
            {"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}},
            "is not 'host:port'",
        ),
        (
            {"cluster": {"worker": ["a:70000"]}, "task": {"type": "worker", "index": 0}},
            "outside 1-65535",
        ),
        ({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}, "twice"),
        ({"cluster": {"worker": ["a:1"]}}, "no 'task'"),
        (
            {"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
            "not in the cluster",
        ),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}, "out of range"),
        (
            {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}},
            "must be an integer",
        ),
    ],
)
def test_validate_tf_config_rejects(tf_config: object, message: str) -> None:
    with pytest.raises(C.BadTFConfigError, match=message):
        C.validate_tf_config(tf_config)  # type: ignore[arg-type]


def test_worker_script_rejects_bad_tf_config_fast(tmp_path: Path) -> None:
    env = C._child_env(
        {
            "TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}'
        }
    )
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "utils.worker_train", "--out-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "bad TF_CONFIG" in out.stdout and "out of range" in out.stdout
    assert time.monotonic() - t0 < 30  # it stops before importing TensorFlow


# ------------------------------------------------------------------------------ generators
def test_tf_config_exports() -> None:
    lines = C.tf_config_exports(["node-a", "node-b"], port=2222)
    assert list(lines) == ["node-a", "node-b"]
    for i, line in enumerate(lines.values()):
        assert line.startswith("export TF_CONFIG=")
        cfg = C.validate_tf_config(json.loads(line.split("=", 1)[1].strip("'")))
        assert cfg["cluster"]["worker"] == ["node-a:2222", "node-b:2222"]
        assert cfg["task"]["index"] == i
    with pytest.raises(ValueError, match="at least one"):
        C.tf_config_exports([])


def test_kubernetes_manifest_is_consistent() -> None:
    docs = list(yaml.safe_load_all(C.kubernetes_manifest("demo", 3, port=3333, namespace="ml")))
    kinds = [d["kind"] for d in docs]
    assert (
        kinds.count("Job") == 3
        and kinds.count("Service") == 3
        and kinds.count("NetworkPolicy") == 1
    )
    jobs = [d for d in docs if d["kind"] == "Job"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for i, job in enumerate(jobs):
        pod = job["spec"]["template"]
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        cfg = C.validate_tf_config(env["TF_CONFIG"])
        assert cfg["task"]["index"] == i
        # Each worker address resolves to a Service that selects exactly that worker's pod.
        host = cfg["cluster"]["worker"][i].split(".")[0]
        assert services[host]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert services[host]["spec"]["clusterIP"] == "None"
    policy = docs[-1]
    sel = policy["spec"]["podSelector"]["matchLabels"]
    assert all(sel.items() <= j["spec"]["template"]["metadata"]["labels"].items() for j in jobs)
    rule = policy["spec"]["ingress"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": 3333}]
    assert rule["from"] == [{"podSelector": {"matchLabels": sel}}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    with pytest.raises(ValueError, match="DNS label"):
        C.kubernetes_manifest("Bad_Name")


def test_tfjob_manifest_and_policy() -> None:
    job, policy = yaml.safe_load_all(C.tfjob_manifest("demo", 4, port=2222))
    assert job["kind"] == "TFJob" and job["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 4
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "training.kubeflow.org/job-name": "demo"
    }
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == 2222


def test_slurm_script() -> None:
    text = C.slurm_script(4, port_base=20000, gpus_per_node=2)
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --gres=gpu:2" in text
    assert "srun python -m utils.worker_train --resolver slurm --port-base 20000" in text
    with pytest.raises(ValueError):
        C.slurm_script(0)


def test_tensorboard_listens_on_localhost_only() -> None:
    cmd = C.tensorboard_command("logs", port=6007)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--bind_all" not in cmd and "0.0.0.0" not in cmd
    with pytest.raises(ValueError):
        C.tensorboard_command("logs", port=0)


def test_slurm_resolver_and_legacy_model_in_tensorflow() -> None:
    """SlurmClusterResolver on a fake 2-node Slurm step; tf_keras seed CNN == Keras 3 one."""
    code = textwrap.dedent(
        """
        import os
        from utils import worker_train as W
        r = W.slurm_resolver(23456)
        print(r.cluster_spec().as_dict(), r.task_type, r.task_id)
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
        from utils.models import build_seed_cnn
        print(W.build_legacy_seed_cnn().count_params(), build_seed_cnn().count_params())
        """
    )
    env = C._child_env(
        {
            "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        }
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    spec, counts = out.stdout.strip().splitlines()[-2:]
    assert spec == "{'worker': ['node07:23456', 'node08:23456']} worker 1"
    assert counts == "356810 356810"


# ------------------------------------------------------------------------------ isolation
def test_exposed_switch_parsing() -> None:
    assert C.exposed_allowed("1") and C.exposed_allowed("yes") and C.exposed_allowed(" TRUE ")
    assert not C.exposed_allowed("") and not C.exposed_allowed("0")
    with pytest.raises(ValueError, match=C.EXPOSED_ENV):
        C.exposed_allowed("maybe")


def test_listening_sockets_sees_a_listener() -> None:
    """Positive control for the /proc/net parser used by the isolation checks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = [x for x in C.listening_sockets() if x.port == port]
        assert found and found[0].address == "127.0.0.1" and not found[0].all_interfaces
    assert port not in C.listening_ports()
    with pytest.raises(RuntimeError, match="needs Linux"):
        C.listening_sockets(pid=2**30)  # no such process: the check says so instead of "nothing"


def test_isolation_detected_on_this_machine() -> None:
    status = isolation_required()
    assert status.method in ("unshare -n", "unshare -rn")
    assert "available" in status.describe()


def test_refuses_without_isolation_and_without_opt_in(
    no_isolation: None, fake_worker: Path
) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, start_timeout=10)
    with pytest.raises(C.IsolationUnavailableError) as err:
        cluster.start()
    text = str(err.value)
    assert "simulated: unprivileged user namespaces are disabled" in text
    assert C.EXPOSED_ENV in text and "ALL network interfaces" in text
    assert cluster.all_pids() == []  # nothing was started
    assert C.processes_with_env(C.CLUSTER_ID_ENV, cluster.cluster_id) == []
    with pytest.raises(C.IsolationUnavailableError, match="isolate=False"):
        C.LocalCluster(2, script=fake_worker, isolate=False).start()


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc")
def test_exposed_with_opt_in_warns_and_is_really_exposed(
    no_isolation: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Opted in: the banner is printed, and TensorFlow's server does listen on all interfaces."""
    monkeypatch.setenv(C.EXPOSED_ENV, "1")
    script = tmp_path / "tf_server.py"
    script.write_text(
        "import time, tensorflow as tf\n"
        "s = tf.distribute.MultiWorkerMirroredStrategy()\n"
        "print('strategy ready', flush=True)\ntime.sleep(600)\n"
    )
    cluster = C.LocalCluster(2, script=script, start_timeout=120, timeout=150, quiet=True)
    with pytest.warns(C.ExposedClusterWarning):
        cluster.start()
    try:
        out = capsys.readouterr().out
        assert "WARNING: this multi-worker cluster runs WITHOUT network isolation" in out
        exposed = cluster.host_exposed_ports()
        assert {s.port for s in exposed} == set(cluster.ports)  # TF_CONFIG said 127.0.0.1 ...
        assert all(s.all_interfaces for s in exposed)  # ... yet it listens on 0.0.0.0 / [::]
    finally:
        cluster.close()
    assert_no_process_left(cluster)


# ------------------------------------------------------------------------------ failure paths
def test_busy_port_fails_fast(fake_worker: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        free = C.free_ports(1)[0]
        cluster = C.LocalCluster(
            2, script=fake_worker, ports=[busy, free], isolate=False, allow_exposed=True, quiet=True
        )
        t0 = time.monotonic()
        with (
            pytest.raises(C.PortBusyError, match=f"{busy}.*already in use"),
            pytest.warns(C.ExposedClusterWarning),
        ):
            cluster.start()
        assert time.monotonic() - t0 < 15
    assert_no_process_left(cluster)
    with pytest.raises(C.PortBusyError, match="same port twice"):
        C.LocalCluster(2, script=fake_worker, ports=[free, free])


def test_worker_that_never_starts_times_out(fake_worker: Path) -> None:
    cluster = C.LocalCluster(
        2,
        script=fake_worker,
        start_timeout=4,
        env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "nolisten"},
        allow_exposed=True,
        quiet=True,
    )
    t0 = time.monotonic()
    with pytest.raises(C.WorkerStartTimeout) as err:
        cluster.start()
    assert time.monotonic() - t0 < 20
    assert "Worker(s) [1] did not open their port within 4 s" in str(err.value)
    assert "fake worker 1" in str(err.value)  # its log tail is shown
    assert_no_process_left(cluster)


def test_bad_tf_config_fails_before_any_worker_starts(fake_worker: Path) -> None:
    cluster = C.LocalCluster(
        2, script=fake_worker, worker_env={1: {"TF_CONFIG": "{oops"}}, allow_exposed=True
    )
    t0 = time.monotonic()
    with pytest.raises(C.BadTFConfigError, match="Worker 1: TF_CONFIG is not valid JSON"):
        cluster.start()
    assert time.monotonic() - t0 < 15
    assert all(p is None for p in cluster.pids)
    assert_no_process_left(cluster)
    other = json.dumps(C.make_tf_config(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], 1))
    cluster = C.LocalCluster(
        2, script=fake_worker, worker_env={1: {"TF_CONFIG": other}}, allow_exposed=True
    )
    with pytest.raises(C.BadTFConfigError, match="different clusters"):
        cluster.start()
    assert_no_process_left(cluster)


def test_failed_worker_ends_the_others(fake_worker: Path) -> None:
    cluster = C.LocalCluster(
        2, script=fake_worker, env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "fail"},
        failure_grace=1, allow_exposed=True, quiet=True,
    )  # fmt: skip
    with cluster:
        with pytest.raises(C.WorkerFailed) as err:
            cluster.wait(timeout=30)
    result = err.value.result
    assert result is not None and result.returncodes[1] == 1
    assert result.stopped_by_launcher == [True, False]
    assert "RuntimeError: worker failed on purpose" in str(err.value)
    assert_no_process_left(cluster)


def test_timeout_ends_everything(fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "hang"},
                             timeout=3, allow_exposed=True, quiet=True)  # fmt: skip
    cluster.start()
    t0 = time.monotonic()
    with pytest.raises(C.ClusterTimeout, match="did not finish within 3 s"):
        cluster.wait()
    assert time.monotonic() - t0 < 15
    assert_no_process_left(cluster)


def test_interrupt_ends_everything(fake_worker: Path) -> None:
    cluster = C.LocalCluster(2, script=fake_worker, env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "hang"},
                             allow_exposed=True, quiet=True)  # fmt: skip
    cluster.start()
    timer = threading.Timer(
        1.0, os.kill, (os.getpid(), signal.SIGINT)
    )  # like Jupyter's "interrupt"
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        cluster.wait(timeout=60)
    timer.join()
    assert_no_process_left(cluster)
    with pytest.raises(ValueError, match="a failing cell"):  # an error inside `with` ends it too
        with C.LocalCluster(2, script=fake_worker, env={"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "hang"},
                            allow_exposed=True, quiet=True) as c2:  # fmt: skip
            raise ValueError("a failing cell")
    assert_no_process_left(c2)


def test_killed_launcher_takes_its_workers_along(fake_worker: Path, tmp_path: Path) -> None:
    """Even SIGKILL of the launching process (no atexit, no finally) leaves nothing behind."""
    code = textwrap.dedent(
        f"""
        import json, utils.cluster as C
        c = C.LocalCluster(2, script={str(fake_worker)!r}, env={{"BEHAVIOUR_0": "hang", "BEHAVIOUR_1": "hang"}},
                           allow_exposed=True, quiet=True, workdir={str(tmp_path / "w")!r}).start()
        print(json.dumps({{"id": c.cluster_id, "pids": c.all_pids()}}), flush=True)
        import time; time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=C._child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert len(info["pids"]) == 3
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while C.processes_with_env(C.CLUSTER_ID_ENV, info["id"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert C.processes_with_env(C.CLUSTER_ID_ENV, info["id"]) == []
    finally:
        proc.kill()


# ------------------------------------------------------------------------------ real training
def _history(out: Path) -> list[dict]:
    return W.read_history(out)


def test_two_workers_isolated_train_and_no_port_in_host_namespace(tmp_path: Path) -> None:
    isolation_required()
    out = tmp_path / "out"
    args = [
        "--out-dir",
        str(out),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--global-batch",
        "32",
        *TINY,
    ]
    cluster = C.LocalCluster(2, args, workdir=tmp_path / "logs", timeout=240, quiet=True)
    with cluster:
        assert cluster.isolated and cluster.ready
        # Inside the namespace both ports listen (seen through a worker's /proc entry) ...
        inside = {s.port for s in cluster.namespace_sockets()}
        assert inside == set(cluster.ports)
        # ... and in the host's namespace none does: check /proc/net/tcp and tcp6 directly.
        host_listening = set()
        for fam in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{fam}").read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A":
                    host_listening.add(int(f[1].rsplit(":", 1)[1], 16))
        assert not host_listening & set(cluster.ports)
        assert cluster.host_exposed_ports() == []
        result = cluster.wait()
    assert result.ok and result.isolated
    assert [r["epoch"] for r in _history(out)] == [1, 2]
    assert (out / "model.keras").is_file()
    assert "saved the final model to model.keras (chief only)" in result.log(0)
    assert "only the chief saves" in result.log(1)
    a, b = (np.load(out / "seen" / f"worker{i}_epoch1.npy") for i in (0, 1))
    assert len(a) == len(b) == 3 * 16  # 3 steps x 16 examples per worker
    assert not set(a) & set(b)  # DATA auto-sharding: no example seen twice
    assert_no_process_left(cluster)


def test_three_workers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "--out-dir",
        str(out),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--global-batch",
        "48",
        *TINY,
    ]
    result = C.run_cluster(
        3, args, workdir=tmp_path / "logs", timeout=300, allow_exposed=False, quiet=True
    )
    assert result.ok and len(result.returncodes) == 3
    assert "3 replicas in sync" in result.log(2)
    seen = [set(np.load(out / "seen" / f"worker{i}_epoch1.npy").tolist()) for i in range(3)]
    assert [len(s) for s in seen] == [32, 32, 32]
    assert len(seen[0] | seen[1] | seen[2]) == 96
    assert [r["workers"] for r in _history(out)] == [3]


def test_kill_and_resume_loses_and_repeats_no_epoch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--out-dir", str(out), "--epochs", "3", "--steps-per-epoch", "3", "--global-batch", "32",
            "--log-every", "1", "--step-delay", "0.3", *TINY]  # fmt: skip
    cluster = C.LocalCluster(
        2, args, workdir=tmp_path / "run1", timeout=240, failure_grace=60, quiet=True
    )
    with cluster:
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
    assert [r["epoch"] for r in _history(out)] == [1]

    second = C.run_cluster(2, args, workdir=tmp_path / "run2", timeout=240, quiet=True)
    assert "1 epoch(s) done, resuming with epoch 2" in second.log(0)
    assert "1 epoch(s) done, resuming with epoch 2" in second.log(1)
    rows = _history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # none lost, none repeated
    assert [r["attempt"] for r in rows] == [1, 2, 2]
    for epoch in (2, 3):
        assert (out / "seen" / f"worker0_epoch{epoch}.npy").is_file()
