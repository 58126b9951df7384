"""Every entry of docs/troubleshooting.md is triggered here, and its quote must match.

Entries carry `<!-- check: ID -->` followed by a `> quoted message`. `…` in a quote stands
for text that varies; the fragments between must appear in the real message, in order.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"


def documented() -> dict[str, str]:
    text = DOC.read_text()
    entries = {}
    for m in re.finditer(r"<!-- check: ([\w-]+) -->\n((?:> .*\n?)+)", text):
        entries[m.group(1)] = " ".join(line[2:].strip() for line in m.group(2).splitlines())
    return entries


def matches(quote: str, message: str) -> bool:
    pos = 0
    for fragment in (f.strip() for f in quote.split("…")):
        if not fragment:
            continue
        found = message.find(fragment, pos)
        if found < 0:
            return False
        pos = found + len(fragment)
    return True


def run_py(code: str, **env: str) -> str:
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    return out.stdout + out.stderr


def devices_after_init() -> str:
    return run_py(
        "import tensorflow as tf\ntf.constant(1) + 1\nfrom utils import devices\n"
        "try:\n    devices.setup_devices(3)\nexcept RuntimeError as e:\n    print(e)"
    )


def bad_num_cpus() -> str:
    return run_py("from utils import devices\ndevices.setup_devices()", SERIES_NUM_CPUS="abc")


def oom() -> str:
    return run_py(
        "import tensorflow as tf\n"
        "try:\n    tf.zeros([2**22, 2**22])\nexcept tf.errors.ResourceExhaustedError as e:\n    print(e)"
    )


def bad_mode() -> str:
    return run_py("from utils import config\nconfig.get_mode()", SERIES_MODE="fast")


def cifar_offline(tmp: Path) -> str:
    code = (
        "from utils import data\n"
        "def offline():\n    raise OSError('simulated: no network')\n"
        "data._download = offline\n"
        "data.load_cifar10()"
    )
    return run_py(code, KERAS_HOME=str(tmp), CIFAR10_DIR="")


def cifar_corrupt(tmp: Path) -> str:
    from utils import data

    x, y, xt, yt, _ = data.make_synthetic(20, 10)
    folder = data.write_official_layout(tmp, x, y, xt, yt)
    (folder / "data_batch_1").write_bytes(b"truncated")
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(folder)
    return str(err.value)


def jupyter_root(tmp: Path) -> str:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("only reproducible when running as root")
    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run(
        [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0",
         f"--ServerApp.root_dir={tmp}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp)},
    )  # fmt: skip
    return out.stdout + out.stderr


def keras3_multiworker_fit(tmp: Path) -> str:
    from test_cluster import notebook_files

    from utils import cluster

    args = ["--out-dir", str(tmp / "out"), "--epochs", "1", "--global-batch", "32",
            "--n-train", "128", "--n-test", "32", "--data", "synthetic", "--width", "0.25"]  # fmt: skip
    with pytest.raises(cluster.WorkerFailed) as err:
        cluster.run_cluster(2, args, script=notebook_files(tmp)["worker_fit.py"], workdir=tmp / "logs",
                            timeout=300, failure_grace=30, quiet=True)  # fmt: skip
    return err.value.result.log(0)


def busy_port(tmp: Path) -> str:
    import socket

    from test_cluster import notebook_files

    from utils import cluster

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        launcher = cluster.LocalCluster(
            2, ["--help"], script=notebook_files(tmp)["worker.py"], ports=[busy, cluster.free_ports(1)[0]],
            isolate=False, allow_exposed=True, quiet=True, workdir=tmp,
        )  # fmt: skip
        with pytest.raises(cluster.PortBusyError) as err, pytest.warns(cluster.ExposedClusterWarning):
            launcher.start()
        launcher.close()
    return str(err.value)


def too_many_cpus() -> str:
    return run_py("from utils import devices\ndevices.setup_devices()", SERIES_NUM_CPUS="1000")


def bad_num_gpus() -> str:
    return run_py("from utils import devices\ndevices.setup_devices()", SERIES_NUM_GPUS="9")


def gpu_check_no_gpu(tmp: Path) -> str:
    env = {**os.environ, "PATH": str(tmp), "CUDA_VISIBLE_DEVICES": ""}  # no nvidia-smi on PATH
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp / "r.md")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    return out.stdout + out.stderr


class Trap:
    """Pickles to a call of exec(): what a booby-trapped CIFAR-10 file would do."""

    def __reduce__(self):
        return builtins.exec, ("raise SystemExit('the trap ran')",)


def cifar_refused(tmp: Path) -> str:
    from utils import data

    x, y, xt, yt, _ = data.make_synthetic(20, 10)
    folder = data.write_official_layout(tmp, x, y, xt, yt)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"labels": [0], b"data": Trap()}, protocol=4))
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(folder)
    return str(err.value)


def cifar_checksum(tmp: Path) -> str:
    from utils import data

    x, y, xt, yt, _ = data.make_synthetic(20, 10)
    archive = data.write_archive(data.write_official_layout(tmp, x, y, xt, yt), tmp / data.ARCHIVE_NAME)
    archive.write_bytes(archive.read_bytes()[:1000])  # a truncated download
    with pytest.raises(data.CifarFormatError) as err:
        data.load_cifar10(archive)
    return str(err.value)


TRIGGERS: dict[str, Callable[..., str]] = {
    "too-many-cpus": too_many_cpus,
    "bad-num-gpus": bad_num_gpus,
    "gpu-check-no-gpu": gpu_check_no_gpu,
    "cifar-refused": cifar_refused,
    "cifar-checksum": cifar_checksum,
    "keras3-multiworker-fit": keras3_multiworker_fit,
    "busy-port": busy_port,
    "devices-after-init": devices_after_init,
    "bad-num-cpus": bad_num_cpus,
    "oom": oom,
    "bad-mode": bad_mode,
    "cifar-offline": cifar_offline,
    "cifar-corrupt": cifar_corrupt,
    "jupyter-root": jupyter_root,
}


def test_every_entry_has_a_trigger_and_back():
    assert set(documented()) == set(TRIGGERS)


@pytest.mark.parametrize("entry", sorted(TRIGGERS))
def test_quoted_message_is_the_real_one(entry, tmp_path):
    trigger = TRIGGERS[entry]
    message = trigger(tmp_path) if trigger.__code__.co_argcount else trigger()
    quote = documented()[entry]
    assert matches(quote, message), f"{entry}: the docs quote\n{quote}\nbut the code printed\n{message[-1500:]}"


def test_matcher_rejects_a_wrong_quote():
    assert matches("a … c", "a b c") and not matches("a … d", "a b c") and not matches("c … a", "a b c")
