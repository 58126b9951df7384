"""Run a real multi-worker TensorFlow cluster on one machine, safely, and write configs for real ones.

**Local cluster.** :class:`LocalCluster` (and the one-call :func:`run_cluster`) starts ``k``
worker *processes*, each with its own ``TF_CONFIG`` naming ``127.0.0.1`` and a free port,
runs a training script in each (by default :mod:`utils.worker_train`), captures every
worker's output in its own log file, enforces timeouts and ends every process it started
when anything goes wrong (a failed worker, a timeout, a ``KeyboardInterrupt``, leaving a
``with`` block, interpreter exit, even the parent being killed).

**Security.** TensorFlow's distributed runtime (gRPC) listens on *every* network interface,
even when ``TF_CONFIG`` says ``127.0.0.1``, and does no authentication, authorisation or
encryption: anyone who can reach the port can run TensorFlow ops in the worker, which
includes reading and writing files. So on Linux the launcher starts the whole cluster inside
a private network namespace (``unshare -n`` as root, ``unshare -rn`` otherwise), brings its
loopback interface up (what ``ip link set lo up`` does) and starts all workers in there:
they talk to each other over that private loopback and nothing is reachable from the host's
network. When no namespace can be created (macOS, Windows, no ``unshare``, unprivileged user
namespaces switched off, a locked-down container), :func:`isolation_status` says why and the
launcher refuses to start, unless you opt in with ``SERIES_ALLOW_EXPOSED_CLUSTER=1``; then it
runs exposed and prints a prominent warning.

**Real clusters.** :func:`make_tf_config`, :func:`validate_tf_config`,
:func:`tf_config_exports`, :func:`slurm_script`, :func:`kubernetes_manifest`,
:func:`tfjob_manifest` and :func:`network_policy` write ready-to-use configuration.

This module never imports TensorFlow, so the launcher runs happily in a notebook whose
TensorFlow is already set up (each worker is its own fresh process).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXPOSED_ENV = "SERIES_ALLOW_EXPOSED_CLUSTER"
CLUSTER_ID_ENV = "SERIES_CLUSTER_ID"
WORKER_MODULE = "utils.worker_train"
LOCALHOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_FAILURE_GRACE_S = 30.0
_PROBE_TIMEOUT_S = 10.0
_POLL_S = 0.1
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


# =============================================================================== errors
class ClusterError(RuntimeError):
    """Base class of every error the launcher raises. ``logs`` holds log tails, if any."""

    def __init__(self, message: str, logs: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.logs = dict(logs or {})


class IsolationUnavailableError(ClusterError):
    """No private network namespace can be created here and exposed runs were not allowed."""


class PortBusyError(ClusterError):
    """A requested worker port is already in use."""


class BadTFConfigError(ClusterError, ValueError):
    """A ``TF_CONFIG`` is not valid JSON or does not describe a consistent cluster."""


class WorkerStartTimeout(ClusterError):
    """Some workers did not open their port within ``start_timeout`` seconds."""


class WorkerFailed(ClusterError):
    """A worker exited with a non-zero status (or was killed)."""

    def __init__(
        self,
        message: str,
        logs: Mapping[int, str] | None = None,
        result: ClusterResult | None = None,
    ) -> None:
        super().__init__(message, logs)
        self.result = result


class ClusterTimeout(ClusterError):
    """The cluster did not finish within ``timeout`` seconds."""


class ExposedClusterWarning(UserWarning):
    """The cluster runs without network isolation (opted in)."""


# =============================================================================== TF_CONFIG
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d+)$")
TASK_TYPES = ("chief", "worker", "ps", "evaluator")


def make_tf_config(
    workers: Sequence[str], index: int, task_type: str = "worker", chief: str | None = None
) -> dict:
    """Build the ``TF_CONFIG`` dict of one task of a multi-worker cluster.

    Args:
        workers: ``"host:port"`` of every worker, in the same order on every host.
        index: this task's position in its list (``workers`` or ``chief``).
        task_type: ``"worker"`` (default) or ``"chief"``.
        chief: optional ``"host:port"`` of a separate chief. Without one, worker 0 is the
            chief (it saves checkpoints and the model).

    Raises:
        BadTFConfigError: for an inconsistent request (index out of range, bad address).
    """
    cluster: dict[str, list[str]] = {"worker": list(workers)}
    if chief is not None:
        cluster = {"chief": [chief], **cluster}
    cfg = {"cluster": cluster, "task": {"type": task_type, "index": int(index)}}
    return validate_tf_config(cfg)


def validate_tf_config(tf_config: str | Mapping | None) -> dict:
    """Parse and check a ``TF_CONFIG`` (JSON text or dict); return it as a dict.

    Checks what makes TensorFlow hang or fail late: valid JSON, a ``cluster`` with known
    task types and non-empty lists of ``host:port`` strings with ports 1-65535, no address
    used twice, at most one chief, and a ``task`` whose type is in the cluster and whose
    index is in range.

    Raises:
        BadTFConfigError: with a message that names the problem and shows a valid example.
    """
    example = (
        'Example: {"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    if tf_config is None or (isinstance(tf_config, str) and not tf_config.strip()):
        raise BadTFConfigError(
            "TF_CONFIG is not set. Every process of a multi-worker job needs TF_CONFIG (a JSON "
            "string in the environment) that lists the cluster and says which task it is. "
            + example
        )
    if isinstance(tf_config, str):
        try:
            cfg = json.loads(tf_config)
        except json.JSONDecodeError as err:
            raise BadTFConfigError(f"TF_CONFIG is not valid JSON ({err}). {example}") from None
    else:
        cfg = json.loads(json.dumps(tf_config))  # deep copy; also rejects non-JSON values
    if not isinstance(cfg, dict):
        raise BadTFConfigError(
            f"TF_CONFIG must be a JSON object, got {type(cfg).__name__}. {example}"
        )
    cluster, task = cfg.get("cluster"), cfg.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise BadTFConfigError(f"TF_CONFIG has no 'cluster' object listing the tasks. {example}")
    seen: dict[str, str] = {}
    for ttype, addrs in cluster.items():
        if ttype not in TASK_TYPES:
            raise BadTFConfigError(
                f"TF_CONFIG cluster has an unknown task type {ttype!r}; use one of {TASK_TYPES}."
            )
        if not isinstance(addrs, list) or not addrs:
            raise BadTFConfigError(
                f"TF_CONFIG cluster[{ttype!r}] must be a non-empty list of 'host:port' strings."
            )
        for i, addr in enumerate(addrs):
            m = _HOSTPORT.match(addr) if isinstance(addr, str) else None
            if m is None:
                raise BadTFConfigError(
                    f"TF_CONFIG cluster[{ttype!r}][{i}] = {addr!r} is not 'host:port' "
                    "(e.g. '10.0.0.1:12345' or 'worker-0.train:12345')."
                )
            port = int(m["port"])
            if not 1 <= port <= 65535:
                raise BadTFConfigError(
                    f"TF_CONFIG cluster[{ttype!r}][{i}] = {addr!r}: port {port} is outside 1-65535."
                )
            if addr in seen:
                raise BadTFConfigError(
                    f"TF_CONFIG lists {addr!r} twice ({seen[addr]} and {ttype}[{i}]): "
                    "every task needs its own host:port."
                )
            seen[addr] = f"{ttype}[{i}]"
    if len(cluster.get("chief", [])) > 1:
        raise BadTFConfigError("TF_CONFIG may list at most one chief.")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise BadTFConfigError(
            "TF_CONFIG has no 'task' object with 'type' and 'index' (which task this process "
            f"is). {example}"
        )
    ttype, index = task["type"], task["index"]
    if ttype not in cluster:
        raise BadTFConfigError(
            f"TF_CONFIG task type {ttype!r} is not in the cluster (which has {sorted(cluster)})."
        )
    if isinstance(index, bool) or not isinstance(index, int):
        raise BadTFConfigError(f"TF_CONFIG task index must be an integer, got {index!r}.")
    if not 0 <= index < len(cluster[ttype]):
        raise BadTFConfigError(
            f"TF_CONFIG task index {index} is out of range: the cluster has "
            f"{len(cluster[ttype])} {ttype!r} task(s), so the index must be 0-{len(cluster[ttype]) - 1}."
        )
    return cfg


def is_chief(tf_config: Mapping) -> bool:
    """True for the task that saves: the ``chief`` if the cluster has one, else worker 0."""
    task = tf_config["task"]
    if "chief" in tf_config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


# =============================================================================== isolation
@dataclass(frozen=True)
class IsolationStatus:
    """Whether the launcher can put the cluster in a private network namespace.

    ``prefix`` is the command that creates the namespace (``["unshare", "-n"]``);
    ``method`` the same as text; ``reason`` says why not when ``available`` is False.
    """

    available: bool
    method: str
    reason: str
    prefix: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for notebooks and logs."""
        if self.available:
            return f"network isolation: available ({self.method}: private network namespace)"
        return f"network isolation: NOT available ({self.reason})"


_ISOLATION_CACHE: IsolationStatus | None = None


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _namespace_hints() -> str:
    hints = []
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        hints.append(
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns=1, the default on Ubuntu 23.10+)"
        )
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        hints.append(
            "unprivileged user namespaces are switched off (kernel.unprivileged_userns_clone=0)"
        )
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        hints.append("user namespaces are switched off (user.max_user_namespaces=0)")
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        hints.append(
            "this runs in a container, whose default seccomp profile usually blocks unshare "
            "(run it with --cap-add SYS_ADMIN, or on the host)"
        )
    return "; ".join(hints)


def isolation_status(refresh: bool = False) -> IsolationStatus:
    """Find out (once, then cached) whether a private network namespace can be created.

    It really tries: it runs the namespace command with a tiny Python program that brings
    the namespace's loopback interface up and binds a socket to it.
    """
    global _ISOLATION_CACHE
    if _ISOLATION_CACHE is not None and not refresh:
        return _ISOLATION_CACHE
    _ISOLATION_CACHE = _probe_isolation()
    return _ISOLATION_CACHE


def _probe_isolation() -> IsolationStatus:
    if not sys.platform.startswith("linux"):
        return IsolationStatus(
            False,
            "none",
            f"network namespaces are a Linux feature and this is {sys.platform}",
        )
    unshare = shutil.which("unshare")
    if unshare is None:
        return IsolationStatus(
            False, "none", "the `unshare` command (package util-linux) is not installed"
        )
    candidates = [["-n"], ["-rn"]] if os.geteuid() == 0 else [["-rn"]]
    probe = (
        "import socket, utils.cluster as c; c.bring_loopback_up(); "
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print('ok')"
    )
    errors = []
    for flags in candidates:
        cmd = [unshare, *flags, sys.executable, "-c", probe]
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, env=_child_env()
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            errors.append(f"`unshare {' '.join(flags)}`: {err}")
            continue
        if out.returncode == 0 and out.stdout.strip().endswith("ok"):
            return IsolationStatus(True, f"unshare {' '.join(flags)}", "", (unshare, *flags))
        msg = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        errors.append(f"`unshare {' '.join(flags)}` failed: {msg}")
    hints = _namespace_hints()
    reason = "; ".join(errors) + (f" ({hints})" if hints else "")
    return IsolationStatus(False, "none", reason)


def bring_loopback_up() -> None:
    """Set the ``lo`` interface of the current network namespace up (``ip link set lo up``).

    A fresh namespace has ``lo`` down, so even 127.0.0.1 is unreachable until this runs.
    Uses the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls, so it needs no ``ip`` binary.
    """
    import fcntl  # POSIX only: imported here so that this module imports everywhere

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), siocgifflags, ifreq))[1]
        if not flags & iff_up:
            fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))


def exposed_allowed(value: str | None = None) -> bool:
    """Read the opt-in switch ``SERIES_ALLOW_EXPOSED_CLUSTER`` (``1``/``true``/``yes``).

    Raises:
        ValueError: for a value that is neither clearly on nor clearly off.
    """
    raw = os.environ.get(EXPOSED_ENV, "") if value is None else value
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(
        f"{EXPOSED_ENV}={raw!r} is not understood. Use {EXPOSED_ENV}=1 to allow a cluster "
        "without network isolation (only on a trusted network), or unset it."
    )


def exposed_warning(ports: Iterable[int] | None = None) -> str:
    """The banner printed when a cluster runs without network isolation."""
    where = f"ports {', '.join(map(str, ports))}" if ports else "the cluster's ports"
    bar = "!" * 78
    body = textwrap.fill(
        f"WARNING: this multi-worker cluster runs WITHOUT network isolation ({EXPOSED_ENV}=1). "
        f"TensorFlow's distributed runtime listens on ALL network interfaces ({where}), not "
        "just 127.0.0.1, and has no authentication or encryption: anyone who can reach this "
        "machine over the network (for example on shared Wi-Fi) can send work to these "
        "processes, including reading and writing your files, while they run. Only do this "
        "on a network you trust or behind a firewall that blocks those ports.",
        width=78,
    )
    return f"{bar}\n{body}\n{bar}"


# =============================================================================== ports
def _port_free(port: int) -> bool:
    """True if ``port`` can be bound on all interfaces (what TensorFlow's server does)."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for fam, host in families:
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
        except OSError as err:
            if fam == socket.AF_INET6 and err.errno in (97, 99):  # no IPv6 here
                continue
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class ListeningSocket:
    """One listening TCP socket read from ``/proc/net/tcp`` or ``tcp6``."""

    address: str
    port: int
    family: str  # "tcp" or "tcp6"

    @property
    def all_interfaces(self) -> bool:
        """True for 0.0.0.0 / [::] (reachable from every interface)."""
        return self.address in ("0.0.0.0", "::")

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def _decode_proc_addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets(pid: int | str = "self") -> list[ListeningSocket]:
    """Listening TCP sockets in the network namespace of process ``pid`` (default: this one).

    Reads ``/proc/<pid>/net/tcp`` and ``tcp6`` (state ``0A`` = LISTEN). Looking at a worker's
    pid shows the view from *inside* its namespace; ``"self"`` shows the host's view.
    """
    out, readable = [], 0
    for fam in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{fam}")
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        readable += 1
        for line in lines:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "0A":
                continue
            addr, port = parts[1].rsplit(":", 1)
            out.append(ListeningSocket(_decode_proc_addr(addr), int(port, 16), fam))
    if not readable:
        raise RuntimeError(
            f"Cannot read /proc/{pid}/net/tcp: listing sockets this way needs Linux (and a "
            "running process). Elsewhere use `lsof -iTCP -sTCP:LISTEN` or `netstat -an`."
        )
    return out


def listening_ports(pid: int | str = "self") -> set[int]:
    """The set of TCP ports in LISTEN state in the namespace of ``pid`` (see :func:`listening_sockets`)."""
    return {s.port for s in listening_sockets(pid)}


# =============================================================================== processes
def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for children: this one, plus the repo on PYTHONPATH so ``utils`` imports."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo not in parts:
        env["PYTHONPATH"] = os.pathsep.join([repo, *parts])
    env.update(extra or {})
    return env


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of live processes whose environment has ``key=value`` (Linux; own processes).

    The launcher tags every process it starts with ``SERIES_CLUSTER_ID``, so this finds any
    that might have escaped (the tests use it to prove none did).
    """
    needle = f"{key}={value}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _pid_alive(int(d.name)):
            found.append(int(d.name))
    return found


def gpu_count() -> int:
    """Number of NVIDIA GPUs ``nvidia-smi -L`` reports (0 without the tool or a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def gpu_assignment(num_workers: int, num_gpus: int | None = None) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` per worker: one GPU each when there are enough, else none.

    Two NCCL ranks cannot share one GPU, so with fewer GPUs than workers every worker runs
    on the CPU (``""``). ``None`` means "leave the variable alone" (no GPUs at all).
    """
    n = gpu_count() if num_gpus is None else num_gpus
    if n == 0:
        return [None] * num_workers
    if n >= num_workers:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(n)]
        return [ids[i] for i in range(num_workers)]
    return [""] * num_workers


_LIVE: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.close()


def close_all_clusters() -> int:
    """Close every cluster this process started and has not closed yet; return how many."""
    clusters = list(_LIVE)
    for c in clusters:
        c.close()
    return len(clusters)


_PATH_SUBS: list[tuple[str, str]] = []


def sanitize_paths(text: str) -> str:
    """Replace machine-specific paths (venv, repo, temp, home) with short placeholders."""
    if not _PATH_SUBS:
        repo = str(Path(__file__).resolve().parent.parent)
        subs = [
            (sys.prefix, "<venv>"),
            (repo, "<repo>"),
            (tempfile.gettempdir(), "<tmp>"),
            (str(Path.home()), "~"),
        ]
        _PATH_SUBS.extend(sorted({s for s in subs if len(s[0]) > 1}, key=lambda s: -len(s[0])))
    for old, new in _PATH_SUBS:
        text = text.replace(old, new)
    return text


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)\b.*")
# TensorFlow's C++ start-up chatter (absl log lines); hidden from log displays by default.
_NOISE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl"
    r"|To enable the following instructions:)"
)


def last_exception(log: str) -> str | None:
    """The last ``SomeError: message`` line of a log (a Python traceback's final line)."""
    lines = [ln for ln in log.splitlines() if _EXC_LINE.match(ln.strip())]
    return lines[-1].strip() if lines else None


_WORKER_LINE = re.compile(r"^\[w\d+ (chief|worker)\]")  # utils.worker_train's own log lines
_PYTHON_LINE = re.compile(r"^(Traceback \(most recent call last\)|  File \")")


def _drop_noise(lines: list[str]) -> list[str]:
    """Remove TensorFlow's C++ log records, including their continuation lines.

    A record starts with a line such as ``E0000 00:00:... file.cc:12] ...`` and may run over
    several lines; it ends at the next line of the worker's own log, a Python traceback or
    exception line, or another record.
    """
    out, in_record = [], False
    for ln in lines:
        if _NOISE.match(ln):
            in_record = True
            continue
        if in_record and not (
            _WORKER_LINE.match(ln) or _PYTHON_LINE.match(ln) or _EXC_LINE.match(ln.strip())
        ):
            continue
        in_record = False
        out.append(ln)
    return out


def exception_summary(log: str, max_chars: int = 400) -> str | None:
    """The last exception of a log, message included, shortened in the middle if long.

    TensorFlow messages can span hundreds of lines (a ``PerReplica`` repr prints tensors);
    this keeps the first and the last line of the message, which carry the meaning. The
    message ends where the worker's own log lines resume.
    """
    lines = _drop_noise(log.splitlines())
    starts = [i for i, ln in enumerate(lines) if _EXC_LINE.match(ln.strip())]
    if not starts:
        return None
    body = []
    for ln in lines[starts[-1] :]:
        if _WORKER_LINE.match(ln):
            break
        if ln.strip():
            body.append(ln.rstrip())
    if len(body) > 2:
        body = [body[0], "...", body[-1]]
    text = " ".join(ln.strip() for ln in body)
    if len(text) > max_chars:
        text = text[: max_chars // 2] + " ... " + text[-max_chars // 2 :]
    return sanitize_paths(text)


@dataclass
class ClusterResult:
    """What a finished (or stopped) cluster run left behind.

    ``returncodes[i]`` is worker ``i``'s exit status (negative: killed by that signal;
    ``None``: never started). ``stopped_by_launcher[i]`` is True where the launcher ended
    the worker (after a failure elsewhere, a timeout or an interrupt).
    """

    num_workers: int
    isolated: bool
    method: str
    ports: list[int]
    returncodes: list[int | None]
    stopped_by_launcher: list[bool]
    duration_s: float
    workdir: Path
    killed_on_request: list[bool] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every worker exited with status 0."""
        return all(rc == 0 for rc in self.returncodes)

    def log(self, index: int) -> str:
        """Worker ``index``'s full log."""
        return _read(self.workdir / f"worker_{index}.log")

    def table(self) -> list[dict]:
        """One row per worker: index, role, port, exit status and how it ended."""
        rows = []
        for i, rc in enumerate(self.returncodes):
            if self.killed_on_request and self.killed_on_request[i]:
                how = "killed on request"
            elif self.stopped_by_launcher[i]:
                how = "stopped by the launcher"
            elif rc is None:
                how = "never started"
            elif rc == 0:
                how = "finished"
            elif rc < 0:
                how = f"killed by {signal.Signals(-rc).name}"
            else:
                how = "failed"
            rows.append(
                {
                    "worker": i,
                    "role": "chief" if i == 0 else "worker",
                    "port": self.ports[i] if i < len(self.ports) else None,
                    "exit status": rc,
                    "ended": how,
                }
            )
        return rows

    def show_logs(
        self,
        tail: int | None = 15,
        grep: str | None = None,
        workers: Iterable[int] | None = None,
        noise: bool = False,
    ) -> None:
        """Print each worker's log (see :func:`format_logs` for the options)."""
        ws = range(self.num_workers) if workers is None else workers
        print(format_logs(self.workdir, ws, tail=tail, grep=grep, noise=noise))


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def format_logs(
    workdir: Path,
    workers: Iterable[int],
    tail: int | None = 15,
    grep: str | None = None,
    noise: bool = False,
) -> str:
    """Worker logs from ``workdir`` as one text block, with paths sanitised.

    ``tail``: last lines per worker (``None``: all); ``grep``: keep lines matching this
    regex; ``noise=True`` keeps TensorFlow's C++ start-up lines (hidden by default).
    """
    pattern = re.compile(grep) if grep else None
    blocks = []
    for i in workers:
        lines = _read(Path(workdir) / f"worker_{i}.log").splitlines()
        if not noise:
            lines = _drop_noise(lines)
        if pattern is not None:
            lines = [ln for ln in lines if pattern.search(ln)]
        shown = lines[-tail:] if tail else lines
        head = f"----- worker {i} ({'chief' if i == 0 else 'worker'}) log"
        if tail and len(lines) > tail:
            head += f", last {tail} of {len(lines)} lines"
        blocks.append(head + " -----\n" + sanitize_paths("\n".join(shown)))
    return "\n".join(blocks)


class LocalCluster:
    """``k`` TensorFlow worker processes on this machine, isolated from the network.

    Use it as a context manager (every process ends when the block ends)::

        with LocalCluster(2, args=["--out-dir", "run1", "--epochs", "3"]) as cluster:
            cluster.wait_for_log(0, r"epoch 2/3 done")
            cluster.kill_worker(1)                     # simulate a crash
            result = cluster.wait(check=False)
        result.show_logs()

    or call :func:`run_cluster`. ``start()`` returns once every worker listens on its port.

    Args:
        num_workers: number of worker processes (>= 1). Worker 0 is the chief.
        args: command-line arguments for the worker program.
        module: Python module each worker runs with ``python -m`` (default
            :mod:`utils.worker_train`). Alternatively ``script`` (a ``.py`` path).
        workdir: folder for logs and the launcher's bookkeeping (default: a new temp folder).
        isolate: ``None`` (default) isolates when possible, else needs the opt-in;
            ``True`` insists on isolation; ``False`` runs exposed (needs the opt-in).
        allow_exposed: overrides ``$SERIES_ALLOW_EXPOSED_CLUSTER``.
        ports: explicit ports (default: free ones picked inside the namespace).
        start_timeout: seconds for all workers to open their ports.
        timeout: seconds for the whole run, from ``start()``.
        failure_grace: after a worker fails, seconds the others get to stop on their own
            (as TensorFlow's own failure detection makes them) before the launcher ends them.
        env: extra environment for every worker; ``worker_env[i]`` for worker ``i`` only
            (a ``TF_CONFIG`` there replaces the generated one; it is validated first).
        num_gpus: GPUs to share out (default: ask ``nvidia-smi``); see :func:`gpu_assignment`.
        quiet: do not print the one-line start message.
    """

    def __init__(
        self,
        num_workers: int = 2,
        args: Sequence[str] = (),
        *,
        module: str | None = WORKER_MODULE,
        script: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        isolate: bool | None = None,
        allow_exposed: bool | None = None,
        ports: Sequence[int] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        failure_grace: float = DEFAULT_FAILURE_GRACE_S,
        env: Mapping[str, str] | None = None,
        worker_env: Mapping[int, Mapping[str, str]] | None = None,
        num_gpus: int | None = None,
        quiet: bool = False,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a whole number >= 1, got {num_workers!r}.")
        if ports is not None:
            ports = [int(p) for p in ports]
            if len(ports) != num_workers:
                raise ValueError(f"ports has {len(ports)} entries for {num_workers} workers.")
            if len(set(ports)) != len(ports):
                raise PortBusyError(
                    f"ports {ports} use the same port twice; give each worker its own."
                )
            bad = [p for p in ports if not 1 <= p <= 65535]
            if bad:
                raise ValueError(f"ports must be in 1-65535, got {bad}.")
        for name, value in (("start_timeout", start_timeout), ("failure_grace", failure_grace)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}.")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}.")
        if script is not None:
            script = Path(script)
            if not script.is_file():
                raise FileNotFoundError(f"Worker script {script} does not exist.")
            self._program = [sys.executable, "-u", str(script.resolve())]
        elif module:
            self._program = [sys.executable, "-u", "-m", module]
        else:
            raise ValueError("Give the worker program as module=... or script=....")
        for i in worker_env or {}:
            if not 0 <= int(i) < num_workers:
                raise ValueError(
                    f"worker_env has an entry for worker {i}, but workers are 0-{num_workers - 1}."
                )
        self.num_workers = num_workers
        self.args = [str(a) for a in args]
        self.requested_ports = ports
        self.start_timeout = float(start_timeout)
        self.timeout = None if timeout is None else float(timeout)
        self.failure_grace = float(failure_grace)
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.worker_env = {
            int(i): {k: str(v) for k, v in e.items()} for i, e in (worker_env or {}).items()
        }
        self.quiet = quiet
        self.cluster_id = uuid.uuid4().hex[:12]
        self.workdir = (
            Path(workdir)
            if workdir is not None
            else Path(tempfile.mkdtemp(prefix="series_cluster_"))
        )
        self._isolate_req = isolate
        self._allow_exposed = allow_exposed
        self._num_gpus = num_gpus
        self.isolated = False
        self.method = "none"
        self.ports: list[int] = []
        self.pids: list[int | None] = [None] * num_workers
        self.returncodes: list[int | None] = [None] * num_workers
        self.ready = False
        self._stopped_by_launcher = [False] * num_workers
        self._killed_on_request = [False] * num_workers
        self._supervisor: subprocess.Popen | None = None
        self._events_pos = 0
        self._events_buf = ""
        self._t0 = 0.0
        self._closed = False
        self._supervisor_done = False
        self._fatal: dict | None = None
        self._listening_set: set[int] = set()

    # ------------------------------------------------------------------ set-up
    def _decide_isolation(self) -> IsolationStatus | None:
        """Return the namespace to use, or None for an (allowed) exposed run; else raise."""
        allowed = exposed_allowed() if self._allow_exposed is None else bool(self._allow_exposed)
        if self._isolate_req is False:
            if not allowed:
                raise IsolationUnavailableError(
                    "isolate=False asks for a cluster without network isolation, which exposes "
                    "TensorFlow's unauthenticated runtime on every network interface. Set "
                    f"{EXPOSED_ENV}=1 (or pass allow_exposed=True) if you really mean it."
                )
            return None
        status = isolation_status()
        if status.available:
            return status
        if self._isolate_req is True or not allowed:
            raise IsolationUnavailableError(
                "Cannot start the local cluster in a private network namespace: "
                f"{status.reason}.\n"
                "Without one, TensorFlow's distributed runtime would listen on ALL network "
                "interfaces with no authentication or encryption, so anyone on your network "
                "could send work to these processes (including reading and writing files).\n"
                "Options: run on Linux with `unshare` available (as root, or with unprivileged "
                "user namespaces enabled, e.g. `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0` "
                "on Ubuntu); or, only on a network you trust or behind a firewall, set "
                f"{EXPOSED_ENV}=1 before starting JupyterLab to run exposed."
            )
        return None

    def start(self, wait_ready: bool = True) -> LocalCluster:
        """Start the supervisor and the workers; by default wait until all listen.

        Raises:
            IsolationUnavailableError, PortBusyError, BadTFConfigError, WorkerFailed,
            WorkerStartTimeout: each after ending every process started so far.
        """
        if self._supervisor is not None:
            raise RuntimeError("This LocalCluster was already started; create a new one.")
        if os.name != "posix":
            raise ClusterError(
                "The local cluster launcher needs a POSIX system (Linux, or macOS with "
                f"{EXPOSED_ENV}=1). On Windows, run the series inside WSL2."
            )
        ns = self._decide_isolation()
        self.isolated = ns is not None
        self.method = ns.method if ns is not None else "none (exposed)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        for old in self.workdir.glob("worker_*.log"):
            old.unlink()
        events = self.workdir / "events.jsonl"
        events.write_text("")
        gpus = gpu_assignment(self.num_workers, self._num_gpus)
        base_env = {k: v for k, v in _child_env().items() if k != "TF_CONFIG"}
        base_env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                CLUSTER_ID_ENV: self.cluster_id,
                "SERIES_CLUSTER_NUM_WORKERS": str(self.num_workers),
                "SERIES_CLUSTER_ISOLATED": "1" if self.isolated else "0",
                # The notebook's matplotlib backend means nothing in a worker.
                "MPLBACKEND": "Agg",
            }
        )
        base_env.pop("TF_USE_LEGACY_KERAS", None)  # each worker mode sets it itself
        base_env.update(self.env)
        spec = {
            "num_workers": self.num_workers,
            "ports": self.requested_ports,
            "program": self._program + self.args,
            "env": base_env,
            "worker_env": {str(i): e for i, e in self.worker_env.items()},
            "gpus": gpus,
            "workdir": str(self.workdir.resolve()),
            "events": str(events.resolve()),
            "parent_pid": os.getpid(),
            "isolated": self.isolated,
        }
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [
            *(ns.prefix if ns else ()),
            sys.executable,
            "-u",
            "-m",
            "utils.cluster",
            "--supervise",
            str(spec_path.resolve()),
        ]
        self._t0 = time.monotonic()
        with open(self.workdir / "supervisor.log", "wb") as sup_log:
            self._supervisor = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sup_log,
                stderr=subprocess.STDOUT,
                env=_child_env({CLUSTER_ID_ENV: self.cluster_id}),
                start_new_session=True,  # own process group: one killpg ends everything
                cwd=os.getcwd(),
            )
        _LIVE.add(self)
        if not self.isolated:
            banner = exposed_warning(self.requested_ports)
            print(banner, flush=True)
            warnings.warn(
                "Multi-worker cluster running without network isolation.",
                ExposedClusterWarning,
                stacklevel=2,
            )
        if wait_ready:
            try:
                self._wait_ready()
            except BaseException:
                self.close()
                raise
            if not self.quiet:
                where = (
                    "inside a private network namespace"
                    if self.isolated
                    else "EXPOSED on all interfaces"
                )
                print(
                    f"Cluster of {self.num_workers} workers ready in {time.monotonic() - self._t0:.1f} s, "
                    f"{where} ({self.method}); ports {self.ports}.",
                    flush=True,
                )
        return self

    # ------------------------------------------------------------------ events
    def _poll_events(self) -> list[dict]:
        path = self.workdir / "events.jsonl"
        try:
            with open(path) as f:
                f.seek(self._events_pos)
                chunk = f.read()
                self._events_pos = f.tell()
        except OSError:
            chunk = ""
        self._events_buf += chunk
        lines = self._events_buf.split("\n")
        self._events_buf = lines.pop()
        events = []
        for line in lines:
            if not line.strip():
                continue
            ev = json.loads(line)
            events.append(ev)
            kind = ev["event"]
            if kind == "ports":
                self.ports = ev["ports"]
            elif kind == "spawned":
                self.pids[ev["index"]] = ev["pid"]
            elif kind == "listening":
                self._listening_set.add(ev["index"])
            elif kind == "ready":
                self.ready = True
            elif kind == "exit":
                self.returncodes[ev["index"]] = ev["returncode"]
            elif kind == "error":
                self._fatal = ev
            elif kind == "done":
                self._supervisor_done = True
        sup = self._supervisor
        if sup is not None and not self._supervisor_done and chunk == "" and sup.poll() is not None:
            # The supervisor is gone without a "done" event: it was killed or crashed.
            self._supervisor_done = True
            if self._fatal is None and not self._closed:
                self._fatal = {
                    "kind": "supervisor",
                    "message": f"The cluster supervisor exited unexpectedly (status {sup.returncode}):\n"
                    + sanitize_paths(_tail(_read(self.workdir / "supervisor.log"), 20)),
                }
        return events

    def _raise_fatal(self) -> None:
        ev = self._fatal or {}
        kind, msg = ev.get("kind"), ev.get("message", "unknown error")
        self.close()
        if kind == "port_busy":
            raise PortBusyError(msg)
        if kind == "bad_tf_config":
            raise BadTFConfigError(msg)
        raise ClusterError(msg)

    def _wait_ready(self) -> None:
        deadline = self._t0 + self.start_timeout
        while True:
            self._poll_events()
            if self._fatal is not None:
                self._raise_fatal()
            if self.ready:
                return
            exited = [i for i, rc in enumerate(self.returncodes) if rc is not None]
            if exited:
                time.sleep(0.3)  # let the log flush
                i = exited[0]
                log = _read(self.workdir / f"worker_{i}.log")
                self.close()
                raise WorkerFailed(
                    f"Worker {i} exited with status {self.returncodes[i]} before the cluster "
                    f"formed.{_hint(log)}\n{format_logs(self.workdir, [i], tail=20)}",
                    {i: log},
                )
            if time.monotonic() > deadline:
                missing = [i for i in range(self.num_workers) if not self._listening(i)]
                logs = {i: _read(self.workdir / f"worker_{i}.log") for i in missing}
                self.close()
                raise WorkerStartTimeout(
                    f"Worker(s) {missing} did not open their port within {self.start_timeout:.0f} s "
                    "(start_timeout), so the cluster could not form and the others would wait "
                    "forever. All workers were stopped. Their logs end with:\n"
                    + format_logs(self.workdir, missing, tail=10)
                    + "\nIf the machine is just slow, raise start_timeout.",
                    logs,
                )
            time.sleep(_POLL_S)

    def _listening(self, i: int) -> bool:
        return i in self._listening_set

    # ------------------------------------------------------------------ control
    def log(self, index: int) -> str:
        """Worker ``index``'s log so far."""
        return _read(self.workdir / f"worker_{index}.log")

    def wait_for_log(self, index: int, pattern: str, timeout: float = 300.0) -> re.Match:
        """Block until worker ``index``'s log matches regex ``pattern``; return the match.

        Raises:
            ClusterError: if the cluster ends first; ClusterTimeout after ``timeout`` s.
                Either way every process is ended first.
        """
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        try:
            while True:
                m = rx.search(self.log(index))
                if m:
                    return m
                self._poll_events()
                if self._fatal is not None:
                    self._raise_fatal()
                if self.returncodes[index] is not None or self._supervisor_done:
                    time.sleep(0.3)
                    m = rx.search(self.log(index))
                    if m:
                        return m
                    self.close()
                    raise ClusterError(
                        f"Worker {index} ended (status {self.returncodes[index]}) before its log "
                        f"matched {pattern!r}.\n" + format_logs(self.workdir, [index], tail=15)
                    )
                if time.monotonic() > deadline:
                    self.close()
                    raise ClusterTimeout(
                        f"Worker {index}'s log did not match {pattern!r} within {timeout:.0f} s; "
                        "all workers were stopped.\n" + format_logs(self.workdir, [index], tail=15)
                    )
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            self.close()
            raise

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: a crash, no clean-up) to worker ``index``."""
        pid = self.pids[index]
        if pid is None:
            raise ClusterError(f"Worker {index} has not been started.")
        self._killed_on_request[index] = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def wait(self, timeout: float | None = None, check: bool = True) -> ClusterResult:
        """Wait until every worker has exited; end the cluster; return a :class:`ClusterResult`.

        After a worker fails (or is killed), the others get ``failure_grace`` seconds to
        stop on their own, then the launcher ends them.

        Args:
            timeout: seconds from now (default: what is left of the cluster's ``timeout``).
            check: raise :class:`WorkerFailed` if any worker did not exit with status 0
                (a worker you killed with :meth:`kill_worker` counts as failed too).

        Raises:
            ClusterTimeout: the run took too long (every process is ended first).
            WorkerFailed: with ``check=True``, when a worker failed.
            KeyboardInterrupt: re-raised after ending every process.
        """
        if self._supervisor is None:
            raise RuntimeError("Call start() first.")
        if timeout is not None:
            deadline = time.monotonic() + timeout
        elif self.timeout is not None:
            deadline = self._t0 + self.timeout
        else:
            deadline = float("inf")
        failed_at: float | None = None
        try:
            while True:
                self._poll_events()
                if self._fatal is not None:
                    self._raise_fatal()
                if self._supervisor_done or all(rc is not None for rc in self.returncodes):
                    break
                if failed_at is None and any(rc not in (None, 0) for rc in self.returncodes):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() - failed_at > self.failure_grace:
                    for i, rc in enumerate(self.returncodes):
                        if rc is None:
                            self._stopped_by_launcher[i] = True
                    break
                if time.monotonic() > deadline:
                    for i, rc in enumerate(self.returncodes):
                        if rc is None:
                            self._stopped_by_launcher[i] = True
                    self.close()
                    limit = timeout if timeout is not None else self.timeout
                    raise ClusterTimeout(
                        f"The cluster did not finish within {limit:.0f} s; all workers were "
                        "stopped. Their logs end with:\n"
                        + format_logs(self.workdir, range(self.num_workers), tail=8)
                    )
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            self.close()
            raise
        self.close()
        result = self.result()
        if check and not result.ok:
            bad = [i for i, rc in enumerate(result.returncodes) if rc != 0]
            first = next((i for i in bad if not result.stopped_by_launcher[i]), bad[0])
            log = result.log(first)
            exc = exception_summary(log)
            raise WorkerFailed(
                f"Worker(s) {bad} did not finish cleanly (exit statuses "
                f"{[result.returncodes[i] for i in bad]}). Worker {first} reported: "
                f"{exc or 'no Python exception'}{_hint(log)}\n"
                + format_logs(self.workdir, [first], tail=12),
                {i: result.log(i) for i in bad},
                result,
            )
        return result

    def result(self) -> ClusterResult:
        """The current state as a :class:`ClusterResult`."""
        return ClusterResult(
            num_workers=self.num_workers,
            isolated=self.isolated,
            method=self.method,
            ports=list(self.ports),
            returncodes=list(self.returncodes),
            stopped_by_launcher=list(self._stopped_by_launcher),
            duration_s=time.monotonic() - self._t0 if self._t0 else 0.0,
            workdir=self.workdir,
            killed_on_request=list(self._killed_on_request),
        )

    def host_exposed_ports(self) -> list[ListeningSocket]:
        """Cluster ports that listen in *this* process's network namespace (want: none)."""
        return [s for s in listening_sockets("self") if s.port in set(self.ports)]

    def namespace_sockets(self) -> list[ListeningSocket]:
        """Cluster ports listening as seen from inside the cluster's namespace (via worker 0)."""
        pid = next((p for p in self.pids if p is not None and _pid_alive(p)), None)
        if pid is None:
            return []
        return [s for s in listening_sockets(pid) if s.port in set(self.ports)]

    def all_pids(self) -> list[int]:
        """The supervisor's and every worker's pid (for checks)."""
        pids = [p for p in self.pids if p is not None]
        if self._supervisor is not None:
            pids.append(self._supervisor.pid)
        return pids

    def close(self, grace: float = 3.0) -> None:
        """End every process of the cluster (SIGTERM, then SIGKILL after ``grace`` s). Idempotent."""
        if self._closed or self._supervisor is None:
            self._closed = True
            return
        self._closed = True
        sup = self._supervisor
        pgid = sup.pid
        alive = [p for p in self.pids if p is not None and _pid_alive(p)]
        if sup.poll() is None or alive:
            for i, p in enumerate(self.pids):
                if p is not None and _pid_alive(p) and self.returncodes[i] is None:
                    self._stopped_by_launcher[i] = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and (
                sup.poll() is None or any(_pid_alive(p) for p in alive)
            ):
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        try:
            sup.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        end = time.monotonic() + 5
        while time.monotonic() < end and any(_pid_alive(p) for p in alive):
            time.sleep(0.05)
        self._poll_events()
        _LIVE.discard(self)

    def __enter__(self) -> LocalCluster:
        if self._supervisor is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


def _tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def _hint(log: str) -> str:
    """An extra sentence for errors TensorFlow reports cryptically."""
    low = log.lower()
    if (
        "address already in use" in low
        or "failed to add port" in low
        or "could not start grpc server" in low
    ):
        return " Hint: a worker's port is already in use; let the launcher pick free ports (ports=None)."
    if "tf_config" in low and "badtfconfigerror" in low:
        return " Hint: the TF_CONFIG given to the worker is invalid (see its log)."
    if "attempt to convert a value (perreplica" in low:
        return (
            " Hint: Keras 3 model.fit does not support MultiWorkerMirroredStrategy "
            "(keras-team/keras#20585); use a custom training loop or tf_keras."
        )
    return ""


def run_cluster(
    num_workers: int = 2, args: Sequence[str] = (), *, check: bool = True, **kwargs: object
) -> ClusterResult:
    """Start a :class:`LocalCluster`, wait for it to finish, end it; return the result.

    Keyword arguments go to :class:`LocalCluster`. With ``check=True`` a failed worker
    raises :class:`WorkerFailed` (after every process has ended).
    """
    cluster = LocalCluster(num_workers, args, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        return cluster.wait(check=check)
    finally:
        cluster.close()


# =============================================================================== supervisor
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _supervise(spec_path: str) -> int:
    """Run inside the (possibly private) namespace: ports, TF_CONFIGs, workers, events.

    Single-threaded on purpose: workers get PDEATHSIG=SIGKILL tied to this thread.
    """
    spec = json.loads(Path(spec_path).read_text())
    n = spec["num_workers"]
    workdir = Path(spec["workdir"])
    parent = spec["parent_pid"]
    events = open(spec["events"], "a", buffering=1)

    def emit(event: str, **kw: object) -> None:
        events.write(json.dumps({"event": event, "t": round(time.time(), 3), **kw}) + "\n")
        events.flush()

    if os.getppid() != parent:
        emit("error", kind="orphan", message="The launcher exited before the cluster started.")
        return 1
    procs: list[subprocess.Popen | None] = [None] * n

    def stop_all(*_: object) -> None:
        for p in procs:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)

    if spec["isolated"]:
        try:
            bring_loopback_up()
        except OSError as err:
            emit(
                "error",
                kind="namespace",
                message=f"Could not bring up the namespace's loopback interface: {err}",
            )
            return 1
    # Ports: requested ones must be free here; otherwise let the OS pick.
    ports = spec["ports"]
    if ports:
        busy = [p for p in ports if not _port_free(p)]
        if busy:
            where = (
                "inside the cluster's network namespace" if spec["isolated"] else "on this machine"
            )
            emit(
                "error",
                kind="port_busy",
                message=f"Port(s) {busy} are already in use {where}. Another program (or an earlier "
                "cluster that is still running) holds them. Pick other ports, stop that program "
                "(`ss -ltnp` shows who listens), or pass ports=None to let the launcher choose free ones.",
            )
            return 3
    else:
        ports = free_ports(n)
    emit("ports", ports=ports)
    hosts = [f"{LOCALHOST}:{p}" for p in ports]
    configs = []
    for i in range(n):
        override = spec["worker_env"].get(str(i), {})
        try:
            cfg = validate_tf_config(override.get("TF_CONFIG") or make_tf_config(hosts, i))
        except BadTFConfigError as err:
            emit("error", kind="bad_tf_config", message=f"Worker {i}: {err}")
            return 4
        configs.append(cfg)
    clusters = {json.dumps(c["cluster"], sort_keys=True) for c in configs}
    if len(clusters) > 1:
        emit(
            "error",
            kind="bad_tf_config",
            message="The workers' TF_CONFIGs describe different clusters; every task must get the "
            "same 'cluster' and differ only in 'task'.",
        )
        return 4
    tasks = [(c["task"]["type"], c["task"]["index"]) for c in configs]
    if len(set(tasks)) != len(tasks):
        emit(
            "error", kind="bad_tf_config", message=f"Two workers were given the same task: {tasks}."
        )
        return 4
    total = sum(len(v) for v in configs[0]["cluster"].values())
    if total != n:
        emit(
            "error",
            kind="bad_tf_config",
            message=f"TF_CONFIG's cluster lists {total} tasks but {n} workers are started: "
            "the job would wait forever for the missing ones.",
        )
        return 4
    for i in range(n):
        env = dict(spec["env"])
        env.update(spec["worker_env"].get(str(i), {}))
        env["TF_CONFIG"] = json.dumps(configs[i])
        if spec["gpus"][i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec["gpus"][i]
        log = open(workdir / f"worker_{i}.log", "wb")
        procs[i] = subprocess.Popen(
            spec["program"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_set_pdeathsig,
        )
        log.close()
        emit("spawned", index=i, pid=procs[i].pid, port=ports[i])
    listening = [False] * n
    done = [False] * n
    while not all(done):
        if os.getppid() != parent:  # the launcher died: take everything down with us
            stop_all()
        for i, p in enumerate(procs):
            assert p is not None
            if not listening[i] and not done[i]:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((LOCALHOST, ports[i]), timeout=0.2),
                ):
                    listening[i] = True
                    emit("listening", index=i)
                    if all(listening):
                        emit("ready")
            rc = p.poll()
            if rc is not None and not done[i]:
                done[i] = True
                emit("exit", index=i, returncode=rc)
        time.sleep(_POLL_S)
    emit("done")
    return 0


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "--supervise":
        return _supervise(argv[1])
    print(
        "usage: python -m utils.cluster --supervise SPEC.json  (internal; use LocalCluster "
        "or run_cluster from Python)",
        file=sys.stderr,
    )
    return 2


# =============================================================================== generators
def tf_config_exports(
    hosts: Sequence[str], port: int = 12345, chief: str | None = None
) -> dict[str, str]:
    """One ``export TF_CONFIG=...`` line per host, for a cluster of one worker per host.

    Returns ``{host: shell line}``; run each line on its host before the training script.
    Every host gets the same cluster and its own task index.
    """
    if not hosts:
        raise ValueError("hosts must name at least one machine.")
    workers = [f"{h}:{port}" for h in hosts]
    out = {}
    for i, h in enumerate(hosts):
        cfg = make_tf_config(workers, i, chief=chief)
        out[h] = f"export TF_CONFIG={shlex.quote(json.dumps(cfg))}"
    return out


def slurm_script(
    nodes: int,
    *,
    job_name: str = "series-mwms",
    port_base: int = 12345,
    time_limit: str = "01:00:00",
    gpus_per_node: int = 0,
    train_args: Sequence[str] = ("--epochs", "10", "--out-dir", "$SLURM_SUBMIT_DIR/run"),
    venv: str = ".venv",
) -> str:
    """An ``sbatch`` script that runs :mod:`utils.worker_train` on ``nodes`` nodes, one task each.

    The workers build their cluster with ``tf.distribute.cluster_resolver.SlurmClusterResolver``
    (``--resolver slurm``), which reads ``SLURM_PROCID``, ``SLURM_STEP_NODELIST`` and
    ``SLURM_STEP_TASKS_PER_NODE`` instead of ``TF_CONFIG``.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}.")
    if not 1024 <= port_base <= 65535:
        raise ValueError(f"port_base must be in 1024-65535, got {port_base}.")
    gres = f"#SBATCH --gres=gpu:{gpus_per_node}\n" if gpus_per_node else ""
    args = " ".join(a if a.startswith("$") else shlex.quote(a) for a in train_args)
    return (
        "#!/bin/bash\n"
        f"#SBATCH --job-name={job_name}\n"
        f"#SBATCH --nodes={nodes}\n"
        "#SBATCH --ntasks-per-node=1\n"
        f"{gres}"
        f"#SBATCH --time={time_limit}\n"
        "#SBATCH --output=%x-%j.out\n"
        "# TensorFlow's gRPC runtime has no authentication: the nodes must be on a private\n"
        f"# network, and port {port_base} must be closed to everything outside the job.\n"
        "set -euo pipefail\n"
        f"source {venv}/bin/activate\n"
        f"srun python -m {WORKER_MODULE} --resolver slurm --port-base {port_base} {args}\n"
    )


def _k8s_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "series-mwms", "series/job": name}


def kubernetes_manifest(
    name: str = "series-mwms",
    num_workers: int = 2,
    *,
    image: str = "example.org/series:latest",
    port: int = 12345,
    namespace: str = "default",
    train_args: Sequence[str] = ("--epochs", "10", "--out-dir", "/shared/run"),
    gpus_per_worker: int = 0,
    shared_claim: str | None = None,
    include_network_policy: bool = True,
) -> str:
    """A Kubernetes manifest: per worker a headless Service and a Job, plus a NetworkPolicy.

    Each worker's ``TF_CONFIG`` names the others by their Service DNS names
    (``<name>-worker-<i>.<namespace>.svc:<port>``). The NetworkPolicy only lets pods of this
    job reach the gRPC port. ``shared_claim`` names a ReadWriteMany PersistentVolumeClaim
    mounted at ``/shared`` in every worker, so that checkpoints survive a restarted pod and
    every worker can restore them (without it, add such a volume yourself).
    """
    import yaml

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        raise ValueError(
            f"name {name!r} must be a DNS label: lowercase letters, digits and '-', at most 40 chars."
        )
    hosts = [f"{name}-worker-{i}.{namespace}.svc:{port}" for i in range(num_workers)]
    labels = _k8s_labels(name)
    docs: list[dict] = []
    for i in range(num_workers):
        pod_labels = {**labels, "series/worker": str(i)}
        cfg = make_tf_config(hosts, i)
        resources = {"limits": {"nvidia.com/gpu": gpus_per_worker}} if gpus_per_worker else {}
        container = {
            "name": "worker",
            "image": image,
            "command": ["python", "-m", WORKER_MODULE, *train_args],
            "env": [{"name": "TF_CONFIG", "value": json.dumps(cfg)}],
            "ports": [{"containerPort": port, "name": "grpc"}],
        }
        if resources:
            container["resources"] = resources
        pod_spec: dict = {"restartPolicy": "OnFailure", "containers": [container]}
        if shared_claim:
            container["volumeMounts"] = [{"name": "shared", "mountPath": "/shared"}]
            pod_spec["volumes"] = [
                {"name": "shared", "persistentVolumeClaim": {"claimName": shared_claim}}
            ]
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": f"{name}-worker-{i}",
                    "namespace": namespace,
                    "labels": labels,
                },
                "spec": {
                    "clusterIP": "None",
                    # workers must find each other while they start, before they are "ready"
                    "publishNotReadyAddresses": True,
                    "selector": pod_labels,
                    "ports": [{"port": port, "name": "grpc"}],
                },
            }
        )
        docs.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": f"{name}-worker-{i}",
                    "namespace": namespace,
                    "labels": labels,
                },
                "spec": {
                    "backoffLimit": 3,
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec,
                    },
                },
            }
        )
    if include_network_policy:
        docs.append(
            network_policy(name, port=port, namespace=namespace, pod_labels=labels, as_dict=True)
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def tfjob_manifest(
    name: str = "series-mwms",
    num_workers: int = 2,
    *,
    image: str = "example.org/series:latest",
    port: int = 2222,
    namespace: str = "default",
    train_args: Sequence[str] = ("--epochs", "10", "--out-dir", "/shared/run"),
    include_network_policy: bool = True,
) -> str:
    """A Kubeflow Training Operator ``TFJob`` (it writes each pod's ``TF_CONFIG`` itself),
    plus a NetworkPolicy for its pods (label ``training.kubeflow.org/job-name``)."""
    import yaml

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running"},
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": num_workers,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "tensorflow",
                                    "image": image,
                                    "command": ["python", "-m", WORKER_MODULE, *train_args],
                                    "ports": [{"containerPort": port, "name": "tfjob-port"}],
                                }
                            ]
                        }
                    },
                }
            },
        },
    }
    docs = [job]
    if include_network_policy:
        docs.append(
            network_policy(
                name,
                port=port,
                namespace=namespace,
                pod_labels={"training.kubeflow.org/job-name": name},
                as_dict=True,
            )
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def network_policy(
    name: str,
    *,
    port: int = 12345,
    namespace: str = "default",
    pod_labels: Mapping[str, str] | None = None,
    as_dict: bool = False,
) -> str | dict:
    """A NetworkPolicy that lets only the job's own pods reach its gRPC port.

    All other ingress to the pods is denied (the policy selects them and allows nothing
    else); egress stays open. It takes effect only on clusters whose network plugin
    enforces NetworkPolicies (Calico, Cilium, ...).
    """
    labels = dict(pod_labels or _k8s_labels(name))
    doc = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-grpc-only-from-job", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": dict(labels)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": dict(labels)}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }
    if as_dict:
        return doc
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


# =============================================================================== TensorBoard
def tensorboard_command(logdir: str | os.PathLike[str], port: int = 6006) -> list[str]:
    """The command line to start TensorBoard on ``logdir``, listening on 127.0.0.1 only.

    TensorBoard's ``--bind_all`` (or ``--host 0.0.0.0``) would serve your logs to the whole
    network; this always passes ``--host 127.0.0.1``. In a notebook use
    ``%tensorboard --logdir LOGDIR --host 127.0.0.1``.
    """
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be in 1-65535, got {port}.")
    return ["tensorboard", "--logdir", str(logdir), "--host", LOCALHOST, "--port", str(int(port))]


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
