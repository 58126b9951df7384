"""Run a real multi-worker TensorFlow cluster on one machine, isolated from the network.

:class:`LocalCluster` (and the one-call :func:`run_cluster`) starts ``k`` worker
*processes* of a training script, each with its own ``TF_CONFIG`` naming ``127.0.0.1`` and
a free port, writes every worker's output to its own log, enforces timeouts and ends every
process it started when anything goes wrong (a failed worker, a timeout, a
``KeyboardInterrupt``, leaving a ``with`` block, interpreter exit, even the parent being
killed: a supervisor process ties the workers' lives to the launcher's).

**Security.** TensorFlow's distributed runtime (gRPC) listens on *every* network interface,
even when ``TF_CONFIG`` says ``127.0.0.1``, and does no authentication, authorisation or
encryption: anyone who can reach the port can run TensorFlow ops in the worker, which
includes reading and writing files. So on Linux the launcher starts the whole cluster inside
a private network namespace (``unshare -n`` as root, ``unshare -rn`` otherwise), brings its
loopback interface up and starts all workers in there: they talk over that private loopback
and nothing is reachable from the host's network. When no namespace can be created (macOS,
Windows, no ``unshare``, unprivileged user namespaces switched off, a locked-down
container), :func:`isolation_status` says why and the launcher refuses to start, unless you
opt in with ``SERIES_ALLOW_EXPOSED_CLUSTER=1``; then it runs exposed and prints a warning.

This module imports neither TensorFlow nor the rest of ``utils``: the supervisor and the
isolation probe run it as a plain script (``python utils/cluster.py``), which starts fast.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import json
import os
import re
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
from dataclasses import dataclass
from pathlib import Path

EXPOSED_ENV = "SERIES_ALLOW_EXPOSED_CLUSTER"
CLUSTER_ID_ENV = "SERIES_CLUSTER_ID"
LOCALHOST = "127.0.0.1"
_POLL_S = 0.1
_REPO = str(Path(__file__).resolve().parent.parent)


# =============================================================================== errors
class ClusterError(RuntimeError):
    """Base class of every error the launcher raises. ``logs`` holds log tails, if any."""

    def __init__(self, message: str, result: LocalCluster | None = None):
        super().__init__(message)
        self.result = result  # the cluster, for its logs and exit statuses


class IsolationUnavailableError(ClusterError):
    """No private network namespace can be created here and exposed runs were not allowed."""


class PortBusyError(ClusterError):
    """A requested worker port is already in use."""


class WorkerStartTimeout(ClusterError):
    """Some workers did not open their port within ``start_timeout`` seconds."""


class WorkerFailed(ClusterError):
    """A worker exited with a non-zero status (or was killed); ``result`` says which."""


class ClusterTimeout(ClusterError):
    """The cluster did not finish within ``timeout`` seconds."""


class ExposedClusterWarning(UserWarning):
    """The cluster runs without network isolation (opted in)."""


# =============================================================================== isolation
@dataclass(frozen=True)
class IsolationStatus:
    """Whether the launcher can put the cluster in a private network namespace.

    ``prefix`` is the command that creates the namespace (``("unshare", "-n")``); ``reason``
    says why not when ``available`` is False.
    """

    available: bool
    method: str
    reason: str
    prefix: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for notebooks and logs."""
        what = f"available ({self.method}: private network namespace)" if self.available else "NOT available"
        return f"network isolation: {what}" + ("" if self.available else f" ({self.reason})")


def _read(path: str | Path) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text(errors="replace")
    return ""


@functools.cache
def isolation_status() -> IsolationStatus:
    """Find out (once, then cached) whether a private network namespace can be created.

    It really tries: it runs the namespace command with this file as a probe that brings
    the namespace's loopback interface up and listens on it.
    """
    unshare = shutil.which("unshare") if sys.platform.startswith("linux") else None
    if unshare is None:
        return IsolationStatus(False, "none", f"no `unshare` command: network namespaces need Linux (this is "
                               f"{sys.platform}) and util-linux")  # fmt: skip
    errors = []
    for flags in (["-n"], ["-rn"]) if os.geteuid() == 0 else (["-rn"],):
        cmd = [unshare, *flags, sys.executable, "-I", __file__, "--probe"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip() == "ok":
                return IsolationStatus(True, f"unshare {' '.join(flags)}", "", (unshare, *flags))
            errors.append(f"`unshare {' '.join(flags)}` failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        except (OSError, subprocess.TimeoutExpired) as err:
            errors.append(f"`unshare {' '.join(flags)}`: {err}")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").strip() == "1":
        errors.append("AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_"
                      "userns=1, the default on Ubuntu 23.10+)")  # fmt: skip
    return IsolationStatus(False, "none", "; ".join(errors))


def bring_loopback_up() -> None:
    """Set the ``lo`` interface of the current network namespace up (``ip link set lo up``).

    A fresh namespace has ``lo`` down, so even 127.0.0.1 is unreachable until this runs.
    Uses the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls, so it needs no ``ip`` binary.
    """
    import fcntl  # POSIX only: imported here so that this module imports everywhere

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sh14x", b"lo", 0)))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sh14x", b"lo", flags | 0x1))  # IFF_UP


def exposed_allowed() -> bool:
    """Read the opt-in switch ``SERIES_ALLOW_EXPOSED_CLUSTER`` (``1``/``true``/``yes``/``on``)."""
    return os.environ.get(EXPOSED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def exposed_warning(ports: Iterable[int] | None = None) -> str:
    """The banner printed when a cluster runs without network isolation."""
    where = f"ports {', '.join(map(str, ports))}" if ports else "the cluster's ports"
    body = textwrap.fill(
        f"WARNING: this multi-worker cluster runs WITHOUT network isolation ({EXPOSED_ENV}=1). TensorFlow's "
        f"distributed runtime listens on ALL network interfaces ({where}), not just 127.0.0.1, and has no "
        "authentication or encryption: anyone who can reach this machine over the network (for example on "
        "shared Wi-Fi) can send work to these processes, including reading and writing your files, while they "
        "run. Only do this on a network you trust or behind a firewall that blocks those ports.", width=78)  # fmt: skip
    return f"{'!' * 78}\n{body}\n{'!' * 78}"


# =============================================================================== sockets
def _port_free(port: int) -> bool:
    """True if ``port`` can be bound on all interfaces (what TensorFlow's server does)."""
    with contextlib.suppress(OSError), socket.socket() as s:
        s.bind(("0.0.0.0", port))
        return True
    return False


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (the OS picks them)."""
    socks = [socket.create_server(("", 0)) for _ in range(n)]  # all open at once: n distinct ports
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass(frozen=True)
class ListeningSocket:
    """One listening TCP socket read from ``/proc/<pid>/net/tcp`` or ``tcp6``."""

    address: str
    port: int
    inode: int = 0  # the kernel's socket inode: who holds it shows in /proc/<pid>/fd

    @property
    def all_interfaces(self) -> bool:
        """True for 0.0.0.0 / [::] (reachable from every interface)."""
        return self.address in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def _decode_proc_addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)  # the kernel prints each 32-bit word in little-endian order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def listening_sockets(pid: int | str = "self", proc: str = "/proc") -> list[ListeningSocket]:
    """Listening TCP sockets in the network namespace of process ``pid`` (default: this one).

    Reads ``/proc/<pid>/net/tcp`` and ``tcp6`` (state ``0A`` = LISTEN). Looking at a worker's
    pid shows the view from *inside* its namespace; ``"self"`` shows this process's view.
    """
    out, tables = [], [Path(proc, str(pid), "net", fam) for fam in ("tcp", "tcp6")]
    if not any(t.exists() for t in tables):
        raise RuntimeError(f"Cannot read /proc/{pid}/net/tcp: this needs Linux and a running process. "
                           "Elsewhere use `lsof -iTCP -sTCP:LISTEN`.")  # fmt: skip
    for table in tables:
        for line in _read(table).splitlines()[1:]:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":
                addr, port = f[1].rsplit(":", 1)
                out.append(ListeningSocket(_decode_proc_addr(addr), int(port, 16), int(f[9])))
    return out


def socket_inodes(pids: Iterable[int], proc: str = "/proc") -> set[int]:
    """Inodes of the sockets that processes ``pids`` hold open (``/proc/<pid>/fd`` -> ``socket:[N]``)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(proc, str(pid), "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
    return inodes


# =============================================================================== logs
_PATH_SUBS = sorted({(p, s) for p, s in [(sys.prefix, "<venv>"), (_REPO, "<repo>"), (tempfile.gettempdir(), "<tmp>"),
                                          (str(Path.home()), "~")] if len(p) > 1}, key=lambda ps: -len(ps[0]))  # fmt: skip
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)\b.*")
# TensorFlow's C++ log records (absl lines); hidden from log displays by default.
_NOISE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl"
                    r"|To enable the following instructions:)")  # fmt: skip
_WORKER_LINE = re.compile(r"^\[w\d+ (chief|worker)\]")  # the worker program's own log lines
_PYTHON_LINE = re.compile(r"^(Traceback \(most recent call last\)|  File \")")


def sanitize_paths(text: str) -> str:
    """Replace machine-specific paths (venv, repo, temp, home) with short placeholders."""
    for old, new in _PATH_SUBS:
        text = text.replace(old, new)
    return text


def _drop_noise(lines: list[str]) -> list[str]:
    """Remove TensorFlow's C++ log records, including their continuation lines (up to the
    next worker log line, Python traceback or exception line)."""
    out, in_record = [], False
    for ln in lines:
        if _NOISE.match(ln):
            in_record = True
        elif not in_record or _WORKER_LINE.match(ln) or _PYTHON_LINE.match(ln) or _EXC_LINE.match(ln.strip()):
            in_record = False
            out.append(ln)
    return out


def exception_summary(log: str, max_chars: int = 400) -> str | None:
    """The last exception of a log, message included, shortened in the middle if long.

    TensorFlow messages can span hundreds of lines (a ``PerReplica`` repr prints tensors);
    this keeps the first and the last line of the message, which carry the meaning.
    """
    lines = _drop_noise(log.splitlines())
    starts = [i for i, ln in enumerate(lines) if _EXC_LINE.match(ln.strip())]
    if not starts:
        return None
    body = []
    for ln in lines[starts[-1] :]:
        if _WORKER_LINE.match(ln):
            break
        body += [ln.strip()] if ln.strip() else []
    text = " ".join(body if len(body) <= 2 else [body[0], "...", body[-1]])
    if len(text) > max_chars:
        text = text[: max_chars // 2] + " ... " + text[-max_chars // 2 :]
    return sanitize_paths(text)


def format_logs(workdir: Path, workers: Iterable[int], tail: int | None = 15, grep: str | None = None,
                noise: bool = False) -> str:  # fmt: skip
    """Worker logs from ``workdir`` as one text block, with paths sanitised.

    ``tail``: last lines per worker (``None``: all); ``grep``: keep lines matching this
    regex; ``noise=True`` keeps TensorFlow's C++ log lines (hidden by default).
    """
    blocks = []
    for i in workers:
        lines = _read(Path(workdir) / f"worker_{i}.log").splitlines()
        lines = lines if noise else _drop_noise(lines)
        lines = [ln for ln in lines if re.search(grep, ln)] if grep else lines
        head = f"----- worker {i} ({'chief' if i == 0 else 'worker'}) log"
        head += f", last {tail} of {len(lines)} lines" if tail and len(lines) > tail else ""
        blocks.append(head + " -----\n" + sanitize_paths("\n".join(lines[-tail:] if tail else lines)))
    return "\n".join(blocks)


# =============================================================================== launcher
def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (Linux: reads ``/proc/<pid>/stat``)."""
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def gpu_assignment(num_workers: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` per worker: one GPU each when there are enough, else none.

    Two NCCL ranks cannot share one GPU, so with fewer GPUs than workers every worker runs
    on the CPU (``""``). ``None`` leaves the variable alone (no GPU at all).
    """
    smi = shutil.which("nvidia-smi")
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout if smi else ""
    gpus = [str(i) for i in range(sum(line.startswith("GPU ") for line in listing.splitlines()))]
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(gpus)).split(",") if g] if gpus else []
    return gpus[:num_workers] if len(gpus) >= num_workers else [None if not gpus else ""] * num_workers


def _initial_state(n: int) -> dict:
    """What the supervisor tells the launcher (in ``state.json``), before anything happened."""
    return {"ports": [], "pids": [None] * n, "listening": [False] * n, "returncodes": [None] * n,
            "error": None, "done": False}  # fmt: skip


_LIVE: weakref.WeakSet[LocalCluster] = weakref.WeakSet()
atexit.register(lambda: [c.close() for c in list(_LIVE)])


class LocalCluster:
    """``k`` TensorFlow worker processes on this machine, isolated from the network.

    Use it as a context manager (every process ends when the block ends)::

        with LocalCluster(2, ["--out-dir", "run1"], script="worker.py") as cluster:
            cluster.wait_for_log(0, r"epoch 2/3 done")
            cluster.kill_worker(1)                     # simulate a crash
            result = cluster.wait(check=False)
        result.show_logs()

    or call :func:`run_cluster`. Entering the block (or ``start()``) returns once every
    worker listens on its port. Worker ``i`` gets ``TF_CONFIG`` naming every worker's
    ``127.0.0.1:<port>`` and ``{"type": "worker", "index": i}``; worker 0 is the chief.

    Args:
        num_workers: number of worker processes.
        args: command-line arguments for the worker program.
        script: the worker program (a ``.py`` file), or ``module`` to run with ``python -m``.
        workdir: folder for logs and the launcher's bookkeeping (default: a new temp folder).
        isolate: ``None`` (default) isolates when possible, else needs the opt-in;
            ``True`` insists on isolation; ``False`` runs exposed (needs the opt-in).
        allow_exposed: overrides ``$SERIES_ALLOW_EXPOSED_CLUSTER``.
        ports: explicit ports (default: free ones picked inside the namespace).
        start_timeout: seconds for all workers to open their ports.
        timeout: seconds for the whole run, from ``start()``.
        failure_grace: after a worker fails, seconds the others get to stop on their own
            (as TensorFlow's own failure detection makes them) before the launcher ends them.
        env: extra environment for every worker.
        quiet: do not print the one-line start message.
    """

    def __init__(self, num_workers: int = 2, args: Sequence[str] = (), *, script: str | os.PathLike[str] | None = None,
                 module: str | None = None, workdir: str | os.PathLike[str] | None = None, isolate: bool | None = None,
                 allow_exposed: bool | None = None, ports: Sequence[int] | None = None, start_timeout: float = 120.0,
                 timeout: float | None = 1800.0, failure_grace: float = 30.0, env: Mapping[str, str] | None = None,
                 quiet: bool = False) -> None:  # fmt: skip
        target = ["-m", module] if module else [str(Path(script).resolve())]  # type: ignore[arg-type]
        self._program = [sys.executable, "-u", *target, *map(str, args)]
        self.num_workers, self.requested_ports, self.env, self.quiet = num_workers, ports, dict(env or {}), quiet
        self.start_timeout, self.timeout, self.failure_grace = start_timeout, timeout, failure_grace
        self._isolate, self._allow_exposed = isolate, allow_exposed
        self.cluster_id = uuid.uuid4().hex[:12]
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="series_cluster_"))
        self.isolated, self.method = False, "none"
        self.state = _initial_state(num_workers)
        self.stopped_by_launcher, self.killed_on_request = [False] * num_workers, [False] * num_workers
        self._supervisor: subprocess.Popen | None = None
        self._t0, self._closed, self.duration_s = 0.0, False, 0.0

    ports = property(lambda self: self.state["ports"], doc="the workers' ports")
    pids = property(lambda self: self.state["pids"], doc="the workers' process ids")
    returncodes = property(lambda self: self.state["returncodes"], doc="exit statuses (None: running)")

    def _namespace(self) -> IsolationStatus | None:
        """The namespace to use, or None for an (allowed) exposed run; else raise."""
        allowed = exposed_allowed() if self._allow_exposed is None else bool(self._allow_exposed)
        status = IsolationStatus(False, "none", "you passed isolate=False")
        status = isolation_status() if self._isolate is not False else status
        if status.available or (allowed and not self._isolate):
            return status if status.available else None
        raise IsolationUnavailableError(
            f"Cannot start the local cluster in a private network namespace: {status.reason}.\nWithout one, "
            "TensorFlow's distributed runtime would listen on ALL network interfaces with no authentication or "
            "encryption, so anyone on your network could send work to these processes (including reading and "
            "writing files).\nOptions: run on Linux with `unshare` available (as root, or with unprivileged user "
            "namespaces enabled, e.g. `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu); "
            f"or, only on a network you trust or behind a firewall, set {EXPOSED_ENV}=1 before starting "
            "JupyterLab to run exposed.")  # fmt: skip

    def start(self) -> LocalCluster:
        """Start the supervisor and the workers; return when all listen.

        Raises:
            IsolationUnavailableError, PortBusyError, WorkerFailed, WorkerStartTimeout:
                each after ending every process started so far.
        """
        ns = self._namespace()
        self.isolated, self.method = ns is not None, ns.method if ns else "none (exposed)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        for old in [*self.workdir.glob("worker_*.log"), *self.workdir.glob("state.json")]:
            old.unlink()
        # The workers' environment: this one, with the repository on PYTHONPATH (for `import utils`).
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TF_USE_LEGACY_KERAS")}
        env.update({"PYTHONPATH": os.pathsep.join([_REPO, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
                    "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                    CLUSTER_ID_ENV: self.cluster_id, "MPLBACKEND": "Agg", **self.env})  # fmt: skip
        spec = {"num_workers": self.num_workers, "ports": self.requested_ports, "program": self._program,
                "env": env, "gpus": gpu_assignment(self.num_workers), "workdir": str(self.workdir.resolve()),
                "parent_pid": os.getpid(), "isolated": self.isolated}  # fmt: skip
        (self.workdir / "spec.json").write_text(json.dumps(spec))
        self._t0 = time.monotonic()
        with open(self.workdir / "supervisor.log", "wb") as sup_log:
            self._supervisor = subprocess.Popen(
                [*(ns.prefix if ns else ()), sys.executable, "-I", "-u", __file__, str(self.workdir / "spec.json")],
                stdin=subprocess.DEVNULL, stdout=sup_log, stderr=subprocess.STDOUT,
                env={**os.environ, CLUSTER_ID_ENV: self.cluster_id},
                start_new_session=True,  # its own process group: one killpg ends every process
            )  # fmt: skip
        _LIVE.add(self)
        if not self.isolated:
            print(exposed_warning(self.requested_ports), flush=True)
            warnings.warn("Multi-worker cluster running without network isolation.", ExposedClusterWarning, stacklevel=2)
        with self._closing_on_error():
            self._wait_ready()
        if not self.quiet:
            where = "inside a private network namespace" if self.isolated else "EXPOSED on all interfaces"
            print(f"Cluster of {self.num_workers} workers ready in {time.monotonic() - self._t0:.1f} s, "
                  f"{where} ({self.method}); ports {self.ports}.", flush=True)  # fmt: skip
        return self

    def _poll(self) -> None:
        """Read the supervisor's latest state; raise (after ending everything) on an error."""
        # Ask whether the supervisor is gone BEFORE reading: the state read then holds its last word.
        gone = self._supervisor.poll() is not None  # type: ignore[union-attr]
        with contextlib.suppress(OSError, ValueError):
            self.state = json.loads((self.workdir / "state.json").read_text())
        if gone and not self.state["done"] and not self._closed:
            tail = "\n".join(_read(self.workdir / "supervisor.log").splitlines()[-20:])
            self.state.update(done=True, error={"kind": "supervisor", "message": "The cluster supervisor exited "
                              f"unexpectedly:\n{sanitize_paths(tail)}"})  # fmt: skip
        if self.state["error"]:
            self.close()
            kind, message = self.state["error"]["kind"], self.state["error"]["message"]
            raise (PortBusyError if kind == "port_busy" else ClusterError)(message)

    def _wait_ready(self) -> None:
        deadline = self._t0 + self.start_timeout
        while not all(self.state["listening"]):
            self._poll()
            exited = [i for i, rc in enumerate(self.returncodes) if rc is not None]
            if exited:
                time.sleep(0.3)  # let the log flush
                i = exited[0]
                raise WorkerFailed(f"Worker {i} exited with status {self.returncodes[i]} before the cluster "
                                   f"formed.\n{format_logs(self.workdir, [i], tail=20)}", self)  # fmt: skip
            if time.monotonic() > deadline:
                missing = [i for i, up in enumerate(self.state["listening"]) if not up]
                raise WorkerStartTimeout(f"Worker(s) {missing} did not open their port within {self.start_timeout:.0f} s "
                                         "(start_timeout; raise it if the machine is just slow), so the cluster could "
                                         "not form. All workers were stopped. Their logs end with:\n"
                                         + format_logs(self.workdir, missing, tail=10), self)  # fmt: skip
            time.sleep(_POLL_S)

    @contextlib.contextmanager
    def _closing_on_error(self):  # noqa: ANN202
        try:
            yield
        except BaseException:
            self.close()
            raise

    def log(self, index: int) -> str:
        """Worker ``index``'s log so far."""
        return _read(self.workdir / f"worker_{index}.log")

    def wait_for_log(self, index: int, pattern: str, timeout: float = 300.0) -> re.Match:
        """Block until worker ``index``'s log matches regex ``pattern``; return the match.

        Raises:
            ClusterTimeout: the worker ended, or ``timeout`` s passed, first (every process is
                ended first).
        """
        deadline = time.monotonic() + timeout
        with self._closing_on_error():
            while not (m := re.search(pattern, self.log(index), re.MULTILINE)):
                self._poll()
                if self.returncodes[index] is not None or time.monotonic() > deadline:
                    time.sleep(0.3)  # a last look, once the log is flushed
                    if m := re.search(pattern, self.log(index), re.MULTILINE):
                        break
                    raise ClusterTimeout(f"Worker {index}'s log did not match {pattern!r} (exit status "
                                         f"{self.returncodes[index]}, {timeout:.0f} s at most); all workers were "
                                         "stopped.\n" + format_logs(self.workdir, [index], tail=15))  # fmt: skip
                time.sleep(_POLL_S)
        return m

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: a crash, no clean-up) to worker ``index``."""
        self.killed_on_request[index] = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pids[index], sig)

    def wait(self, timeout: float | None = None, check: bool = True) -> LocalCluster:
        """Wait until every worker has exited; end the cluster; return a :class:`LocalCluster`.

        After a worker fails (or is killed), the others get ``failure_grace`` seconds to
        stop on their own, then the launcher ends them.

        Raises:
            ClusterTimeout: the run took too long (every process is ended first).
            WorkerFailed: with ``check=True``, when a worker did not exit with status 0.
        """
        limit = timeout if timeout is not None else self.timeout
        deadline = (time.monotonic() if timeout is not None else self._t0) + (limit or float("inf"))
        failed_at = None
        with self._closing_on_error():
            while not (self.state["done"] or all(rc is not None for rc in self.returncodes)):
                self._poll()
                if any(rc not in (None, 0) for rc in self.returncodes):  # one failed: the others get a grace
                    failed_at = failed_at or time.monotonic()
                    if time.monotonic() - failed_at > self.failure_grace:
                        break
                if time.monotonic() > deadline:
                    raise ClusterTimeout(
                        f"The cluster did not finish within {limit:.0f} s; all workers were stopped. "
                        "Their logs end with:\n" + format_logs(self.workdir, range(self.num_workers), tail=8))
                time.sleep(_POLL_S)
        self.close()
        if check and not self.ok:
            bad = [i for i, rc in enumerate(self.returncodes) if rc != 0]
            first = next((i for i in bad if not self.stopped_by_launcher[i]), bad[0])
            log = self.log(first)
            raise WorkerFailed(
                f"Worker(s) {bad} did not finish cleanly (exit statuses {[self.returncodes[i] for i in bad]}). "
                f"Worker {first} reported: {exception_summary(log) or 'no Python exception'}\n"
                + format_logs(self.workdir, [first], tail=12), self)  # fmt: skip
        return self

    @property
    def ok(self) -> bool:
        """True when every worker exited with status 0."""
        return all(rc == 0 for rc in self.returncodes)

    def table(self) -> list[dict]:
        """One row per worker: index, role, exit status and how it ended."""
        rows = []
        for i, rc in enumerate(self.returncodes):
            how = ("killed on request" if self.killed_on_request[i] else "stopped by the launcher"
                   if self.stopped_by_launcher[i] else "never started" if rc is None else "finished"
                   if rc == 0 else f"killed by {signal.Signals(-rc).name}" if rc < 0 else "failed")  # fmt: skip
            rows.append({"worker": i, "role": "chief" if i == 0 else "worker", "exit status": rc, "ended": how})
        return rows

    def show_logs(self, tail: int | None = 15, grep: str | None = None, noise: bool = False) -> None:
        """Print each worker's log (see :func:`format_logs` for the options)."""
        print(format_logs(self.workdir, range(self.num_workers), tail, grep, noise))

    def all_pids(self) -> list[int]:
        """The supervisor's and every worker's pid."""
        return [p for p in self.pids if p is not None] + ([self._supervisor.pid] if self._supervisor else [])

    def host_exposed_ports(self) -> list[ListeningSocket]:
        """Sockets of the cluster's own processes that listen in *this* process's network
        namespace (want: none). A socket counts by its owner (its inode is among the open
        files of the supervisor or a worker), never by its port number alone: an unrelated
        program may listen on the same number."""
        mine = socket_inodes(self.all_pids())
        return [s for s in listening_sockets("self") if s.inode in mine]

    def namespace_sockets(self) -> list[ListeningSocket]:
        """The cluster's listening sockets as seen from inside its namespace (through a worker)."""
        pid = next((p for p in self.pids if p is not None and _pid_alive(p)), None)
        mine = socket_inodes(self.all_pids())
        return [s for s in listening_sockets(pid) if s.inode in mine] if pid else []

    def close(self, grace: float = 3.0) -> None:
        """End every process of the cluster (SIGTERM, then SIGKILL after ``grace`` s). Idempotent."""
        sup = self._supervisor
        if self._closed or sup is None:
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(ClusterError):
            self._poll()  # the latest exit statuses
        alive = [p for p in self.pids if p is not None and _pid_alive(p)]
        self.stopped_by_launcher = [s or (p in alive) for s, p in zip(self.stopped_by_launcher, self.pids, strict=True)]
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the workers share the supervisor's process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sup.pid, sig)
            end = time.monotonic() + grace
            while time.monotonic() < end and (sup.poll() is None or any(map(_pid_alive, alive))):
                time.sleep(0.05)
        self.duration_s = time.monotonic() - self._t0
        _LIVE.discard(self)

    def __enter__(self) -> LocalCluster:
        return self if self._supervisor is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_cluster(num_workers: int = 2, args: Sequence[str] = (), *, check: bool = True, **kwargs: object) -> LocalCluster:
    """Start a :class:`LocalCluster`, wait for it to finish, end it; return the result.

    Keyword arguments go to :class:`LocalCluster`. With ``check=True`` a failed worker
    raises :class:`WorkerFailed` (after every process has ended).
    """
    with LocalCluster(num_workers, args, **kwargs) as cluster:  # type: ignore[arg-type]
        return cluster.wait(check=check)


def tensorboard_command(logdir: str | os.PathLike[str], port: int = 6006) -> list[str]:
    """The command line that starts TensorBoard on ``logdir``, listening on 127.0.0.1 only.

    TensorBoard's ``--bind_all`` (or ``--host 0.0.0.0``) would serve your logs to the whole
    network. In a notebook use ``%tensorboard --logdir LOGDIR --host 127.0.0.1``.
    """
    return ["tensorboard", "--logdir", str(logdir), "--host", LOCALHOST, "--port", str(int(port))]


# =============================================================================== supervisor
def _supervise(spec_path: str) -> int:
    """Run inside the (possibly private) namespace: ports, TF_CONFIGs, workers, state.

    Single-threaded on purpose: each worker gets PDEATHSIG=SIGKILL, tied to this thread, so
    the workers die with it; it watches the launcher and ends everything if that dies.
    """
    spec = json.loads(Path(spec_path).read_text())
    n, workdir = spec["num_workers"], Path(spec["workdir"])
    state = _initial_state(n)
    procs: list[subprocess.Popen] = []

    def publish(**changes: object) -> None:  # atomic: the launcher never reads half a file
        state.update(changes)
        (workdir / "state.tmp").write_text(json.dumps(state))
        os.replace(workdir / "state.tmp", workdir / "state.json")

    def stop_all(*_: object) -> None:
        for p in procs:
            p.kill()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop_all)
    if spec["isolated"]:
        bring_loopback_up()
    busy = [p for p in spec["ports"] or [] if not _port_free(p)]
    if busy:
        where = "inside the cluster's network namespace" if spec["isolated"] else "on this machine"
        publish(done=True, error={"kind": "port_busy", "message": f"Port(s) {busy} are already in use {where}. "
                "Another program (or an earlier cluster that is still running) holds them. Pick other ports, "
                "stop that program (`ss -ltnp` shows who listens), or pass ports=None to let the launcher "
                "choose free ones."})  # fmt: skip
        return 3
    ports = spec["ports"] or free_ports(n)
    hosts = [f"{LOCALHOST}:{p}" for p in ports]
    for i in range(n):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
        env = {**spec["env"], "TF_CONFIG": json.dumps(tf_config)}
        if spec["gpus"][i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec["gpus"][i]
        with open(workdir / f"worker_{i}.log", "wb") as log:
            procs.append(subprocess.Popen(spec["program"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=env, preexec_fn=_die_with_parent))  # fmt: skip
    publish(ports=ports, pids=[p.pid for p in procs])
    while None in state["returncodes"]:
        if os.getppid() != spec["parent_pid"]:  # the launcher died: take everything down with us
            stop_all()
        listening = [up or _accepts(port) for up, port in zip(state["listening"], ports, strict=True)]
        returncodes = [p.poll() for p in procs]
        if (listening, returncodes) != (state["listening"], state["returncodes"]):
            publish(listening=listening, returncodes=returncodes)
        time.sleep(_POLL_S)
    publish(done=True)
    return 0


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), timeout=0.2):
        return True
    return False


def _die_with_parent() -> None:
    """In a worker, before it starts: ask the kernel for SIGKILL when the supervisor dies."""
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _probe() -> int:
    """Bring the loopback up and listen on it: proves a namespace works (see :func:`isolation_status`)."""
    bring_loopback_up()
    socket.create_server((LOCALHOST, 0)).close()
    return print("ok") or 0


if __name__ == "__main__":
    sys.exit(_probe() if sys.argv[1] == "--probe" else _supervise(sys.argv[1]))
