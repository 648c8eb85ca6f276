"""``anomaly up``: the whole local stack in one command, for a first look, demos and an end-to-end test.

Starts, in order, on 127.0.0.1: the local Kafka-protocol broker (Tansu) and the topics; the MLflow
tracking server and UI over the same SQLite store the other commands use (lean: one worker, no job
execution, DESIGN.md §5); a first champion trained on the fleet's normal readings (each
experiment's first 400 rows, with SKAB's profile) when the registry has none (a second ``anomaly up``
reuses the registry); the scoring worker and the retraining scheduler as child processes; a replay of
real SKAB water-pump experiments (with their real valve and rotor faults) as a small fleet of
entities, looped, each reading carrying exactly the sensors the champion reads; and a console view of
the anomaly events as they open and close.

Ctrl-C (or SIGTERM) stops everything in order: the replay, then the worker (it drains, flushes and
commits), the scheduler, the MLflow server (its whole process group) and the broker. Every child
runs in its own session with a parent-death signal, so none outlives ``anomaly up`` even when it is
killed. Ports in use, a missing dataset or a broken configuration stop it before anything starts,
with a message that says what to do.

Pure parts (``fleet_entities``, ``taken_ports``, ``mlflow_server_command``, ``banner``...) are unit
tested; ``run`` is the I/O, tested end to end in a subprocess (tests/e2e/test_up.py).
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from anomaly.config import ENV_PREFIX, MAX_INTERVAL_S, Settings, load_config, sqlite_file, to_toml
from anomaly.datasets import SKAB_FLEET
from anomaly.errors import AnomalyError, DataError
from anomaly.redaction import masked
from anomaly.stop_flag import STOP_SIGNALS, StopFlag

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# SKAB water-pump experiments recorded under one operating condition (flow ≈ 32 l/min), so one model
# fits the fleet; each ≈ 1,100 one-second readings with a valve fault from about row 560 on.
DEFAULT_FLEET = SKAB_FLEET  # valve1/0, valve1/1, valve2/0, valve2/1
ENTITY_STEM = "pump"
DEFAULT_UI_PORT = 5000
DEFAULT_SPEED = 10.0  # recorded spacing sped up 10x: a SKAB experiment replays in ≈ 2 minutes
DEFAULT_RETRAIN_EVERY_S = 900.0  # the scheduler's interval under `up` (the config's default is a day)
TOPIC_PARTITIONS = 4
MLFLOW_READY_S = 120.0  # lean server: healthy in 5-7 s on a quiet machine; slack for loaded ones
WORKER_READY_S = 240.0  # the worker imports torch and mlflow beside the scheduler doing the same: over 60 s seen
# The scheduler lets a retrain in progress finish on SIGTERM; past its grace it is told to abandon it
# (SCHEDULER_ABANDON_S), so its MLflow run ends KILLED, not RUNNING for ever.
STOP_GRACE_S = {"worker": 30.0, "scheduler": 180.0, "mlflow": 10.0}
SCHEDULER_ABANDON_S = 15.0  # after its grace (or a second Ctrl-C): the scheduler abandons its retrain, in this long
SUPERVISE_STEP_S = 0.5
REPLAY_STOP_S = 70.0  # the fleet replay's stop: its flush of queued readings (replay.FLUSH_TIMEOUT_S) and close
REPLAY_STOP_BROKER_GONE_S = 2.0  # ... when the broker is gone: nothing can be delivered, so it is not waited out
LOG_TAIL_CHARS = 1500


class UpError(AnomalyError):
    """``anomaly up`` cannot start or a part of the stack died; the message says what to do."""


@dataclass(frozen=True)
class UpOptions:
    """What ``anomaly up`` runs; the command line fills it."""

    data_dir: Path  # SKAB's directory (the one with data/ and README)
    fleet: tuple[str, ...] = DEFAULT_FLEET  # SKAB series replayed, one entity each
    speed: float = DEFAULT_SPEED  # replay speed-up over the recorded spacing
    loop: bool = True  # replay the fleet again when it ends
    ui_port: int = DEFAULT_UI_PORT  # MLflow UI port (when the tracking store is local)
    retrain_every_s: float = DEFAULT_RETRAIN_EVERY_S
    state_dir: Path = Path("mlruns/up")  # logs of the children and the effective config
    run_for_s: float | None = None  # stop by itself after this long (demos, tests)
    console: bool = True  # print events as they open and close
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.fleet:
            raise UpError("the fleet is empty: name at least one SKAB series (e.g. --fleet valve1/0)")
        if not self.speed > 0:
            raise UpError(f"--speed must be > 0, got {self.speed}")
        if not 0 < self.retrain_every_s <= MAX_INTERVAL_S:  # the scheduler's own bound, checked before any work
            raise UpError(f"--retrain-every-s must be > 0 and at most {MAX_INTERVAL_S:.0f} (a year, "
                          f"scheduler.interval_s's bound), got {self.retrain_every_s}")
        if not 0 < self.ui_port < 65536:
            raise UpError(f"--ui-port must be 1..65535, got {self.ui_port}")


# --- pure helpers --------------------------------------------------------------------------------

def fleet_entities(fleet: Sequence[str], stem: str = ENTITY_STEM) -> list[tuple[str, str]]:
    """``[(entity, series)]``: ``pump-1`` replays the first series, ``pump-2`` the second, ..."""
    return [(f"{stem}-{i}", series) for i, series in enumerate(fleet, start=1)]


def local_port(bootstrap_servers: str) -> int | None:
    """The port of a single bootstrap server on this machine (a broker ``up`` should start), else None."""
    servers = [s.strip() for s in bootstrap_servers.split(",") if s.strip()]
    if len(servers) != 1:
        return None
    host, _, port = servers[0].rpartition(":")
    if host in (HOST, "localhost") and port.isdigit():
        return int(port)
    return None


def mlflow_server_command(python: str, tracking_uri: str, artifact_root: str, port: int) -> list[str] | None:
    """The lean MLflow server over a local SQLite store, or None when the tracking URI is a server
    already (``http(s)://``: the UI is there) or a store ``up`` cannot serve."""
    db = sqlite_file(tracking_uri)
    if db is None:
        return None
    from anomaly.tracking import artifact_uri

    return [python, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db.resolve()}",
            "--default-artifact-root", artifact_uri(artifact_root), "--host", HOST, "--port", str(port),
            "--workers", "1"]


def ui_base(tracking_uri: str, port: int) -> str | None:
    if sqlite_file(tracking_uri) is not None:
        return f"http://{HOST}:{port}"
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return None


def models_url(base: str, model_name: str) -> str:
    """The registry page of one model (the UI opens in GenAI mode at ``/``; the registry is ``#/models``)."""
    return f"{base}/#/models/{quote(model_name, safe='')}"


def taken_ports(ports: Mapping[str, int], hosts: Mapping[str, str] | None = None) -> list[str]:
    """``"what (port N)"`` for each port something already listens on, each tried on the address its part
    will bind (``hosts``, 127.0.0.1 for a part not named there; ``"what (port N on HOST)"`` for another)."""
    taken = []
    for what, port in ports.items():
        if port <= 0:
            continue
        host = (hosts or {}).get(what, HOST)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:  # only "in use": an address not of this machine is the part's own error
                if exc.errno != errno.EADDRINUSE:
                    continue
                taken.append(f"{what} (port {port})" if host == HOST else f"{what} (port {port} on {host})")
    return taken


def port_hint(taken: Sequence[str]) -> str:
    return ("ports in use: " + ", ".join(taken) + ". Is another `anomaly up` (or `anomaly broker`, `mlflow ui`, "
            "a worker) running? Stop it, or move ours: --ui-port, ANOMALY_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:PORT, "
            "ANOMALY_WORKER__METRICS_PORT, ANOMALY_SCHEDULER__METRICS_PORT (0 = any free port), and give a second "
            "session its own --state-dir.")


def with_free_metrics_ports(settings: Settings) -> Settings:
    """``settings`` with a metrics port of 0 ("any free port") made a free port now, so the banner can
    give its address and ``up`` can wait for the worker's health (the child would pick one nobody knew)."""
    from anomaly.broker import free_port

    w, s = settings.worker, settings.scheduler
    if w.metrics_port == 0:
        w = dataclasses.replace(w, metrics_port=free_port(w.metrics_host))
    if s.metrics_port == 0:
        port = free_port(s.metrics_host)
        while port == w.metrics_port:  # two picks apart may give one port twice
            port = free_port(s.metrics_host)
        s = dataclasses.replace(s, metrics_port=port)
    return dataclasses.replace(settings, worker=w, scheduler=s)


def clashing_ports(ports: Mapping[str, int]) -> list[str]:
    """The parts of ``ports`` asked to listen on the same fixed port (0 = any free one: never a clash)."""
    by_port: dict[int, list[str]] = {}
    for name, port in ports.items():
        if port > 0:
            by_port.setdefault(port, []).append(name)
    return [f"{' and '.join(names)} (port {port})" for port, names in sorted(by_port.items()) if len(names) > 1]


def lock_state(state: Path) -> int:
    """Hold ``state``'s ``up.lock`` for this session (released when the descriptor closes or the process
    ends); another session on the same folder is refused: it would overwrite the running one's config,
    which its scheduler re-reads at every retrain, and its logs."""
    import fcntl

    path = state / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UpError(f"another `anomaly up` (pid {holder}) runs with --state-dir {state}: stop it, or give this one "
                      f"its own --state-dir (and ports: see --help)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def banner(*, bootstrap: str, settings: Settings, ui: str | None, fleet: Sequence[tuple[str, str]], speed: float,
           state_dir: Path, champion: str, retrain_every_s: float, local_broker: bool = True) -> str:
    """What to look at, printed once everything runs. ``local_broker``: whether ``up`` started the broker
    (else the readings go to a Kafka cluster it was pointed at, and the banner says so)."""
    k, w, s = settings.kafka, settings.worker, settings.scheduler
    name = settings.mlflow.model_name
    if local_broker:
        lines = ["", "anomaly up: everything runs on this machine; Ctrl-C stops it all", ""]
    else:
        lines = ["", f"anomaly up: Kafka is the cluster at {bootstrap} (not started here: the demo fleet's readings go "
                     f"to its topic {k.input_topic}, and the worker joins its group {k.group_id}); the rest runs on "
                     "this machine; Ctrl-C stops what started here", ""]
    if ui:
        lines += [f"  model registry    {models_url(ui, name)}   (all models: {ui}/#/models)",
                  f"  experiments       {ui}/#/experiments"]
    else:
        lines.append(f"  tracking store    {settings.mlflow.tracking_uri} (start `mlflow ui` on it to browse)")
    lines.append(f"  serving           {name} v{champion} (@{w.model_alias}); retrain every {retrain_every_s:.15g} s")
    if w.metrics_port > 0:
        lines.append(f"  worker metrics    http://{w.metrics_host}:{w.metrics_port}/metrics   "
                     f"health: http://{w.metrics_host}:{w.metrics_port}/healthz")
    if s.metrics_port > 0:
        lines.append(f"  scheduler metrics http://{s.metrics_host}:{s.metrics_port}/metrics   "
                     f"health: http://{s.metrics_host}:{s.metrics_port}/healthz")
    lines.append(f"  Kafka             {bootstrap}   topics: {k.input_topic} (readings), {k.events_topic} (events), "
                 f"{k.dlq_topic} (dead letters)" + (f", {k.scores_topic} (scores)" if k.scores_topic else "")
                 + (f", {k.feedback_topic} (verdicts)" if k.feedback_topic else ""))
    if k.feedback_topic:
        lines.append("  verdicts          anomaly feedback normal ID (a false alarm) | anomaly ID (a fault), ID from an "
                     "event line below or `anomaly events` (each with its verdict); the next retrain learns from them")
    lines.append("  fleet             " + ", ".join(f"{e} = SKAB {series}" for e, series in fleet)
                 + f", at {speed:g}x recorded speed")
    lines.append(f"  logs              {state_dir}/ (broker, mlflow, worker, scheduler)")
    lines += ["", "events (stream time, UTC):"]
    return masked("\n".join(lines))  # a tracking URI's password, if it holds one, is not printed


# --- children ------------------------------------------------------------------------------------

class Child:
    """A child process in its own session (its own process group), output to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str],
                 abandon_s: float = 0.0) -> None:
        """``abandon_s`` > 0: a child that takes a second SIGTERM (and the SIGUSR1 it gets if this process
        dies) as "stop now" (the scheduler abandons its retrain): ``stop`` sends it one and waits this long
        before SIGKILL."""
        self.name, self.argv, self.log_path, self.env = name, list(argv), log_path, dict(env)
        self.abandon_s = abandon_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Child":
        from anomaly.broker import _PRCTL, _abandon_with_parent, _die_with_parent

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        on_parent_death = _abandon_with_parent if self.abandon_s > 0 else _die_with_parent
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True,
                                         preexec_fn=on_parent_death if _PRCTL is not None else None)
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float, hurry: Callable[[], bool] | None = None) -> int | None:
        """SIGTERM the whole process group and wait ``grace_s`` (or until ``hurry()``: a second Ctrl-C);
        a child with ``abandon_s`` then gets a second SIGTERM and that long; then SIGKILL. The exit code."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        code = self.proc.poll()
        if code is None:
            _killpg(pgid, signal.SIGTERM)
            code = self._wait(grace_s, hurry)
            if code is None and self.abandon_s > 0:
                log.warning("%s (pid %d) still stopping: told to stop now", self.name, pgid)
                _killpg(pgid, signal.SIGTERM)
                code = self._wait(self.abandon_s)
            if code is None:
                log.warning("%s (pid %d) did not stop within %.0f s; killing it", self.name, pgid,
                            grace_s + self.abandon_s)
                _killpg(pgid, signal.SIGKILL)
                code = self.proc.wait()
        _killpg(pgid, signal.SIGKILL)  # anything the child left in its group (e.g. server workers)
        return code

    def _wait(self, seconds: float, hurry: Callable[[], bool] | None = None) -> int | None:
        """The exit code once the child exits within ``seconds``; None if it has not (or ``hurry()``)."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self.proc.wait(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline or (hurry is not None and hurry()):
                    return None

    def tail(self) -> str:
        try:
            text = self.log_path.read_bytes()[-LOG_TAIL_CHARS:].decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f"\n--- {self.log_path} (tail) ---\n{text}" if text else ""


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own loopback URL
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_http(url: str, child: Child | None, timeout_s: float, what: str) -> None:
    """Block until ``url`` answers 2xx; ``UpError`` with the child's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise UpError(f"{what} exited during start (code {child.proc.returncode if child.proc else '?'})"
                          f"{child.tail()}")
        if _http_ok(url):
            return
        time.sleep(0.5)
    raise UpError(f"{what} did not answer {url} within {timeout_s:.0f} s{child.tail() if child else ''}")


# --- the fleet replay ----------------------------------------------------------------------------

class _Stopped(Exception):
    """Raised inside the replay's sleep when the stack stops."""


class _StoppableClock:
    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped()


def fleet_stream(frames: Sequence[tuple[str, Any]], start_ts: float) -> Iterator[tuple[str, Any]]:
    """Every entity's readings in time order, timestamps re-based to ``start_ts`` (pure)."""
    from anomaly.replay import replay_plan

    def renamed(entity: str, frame: Any) -> Iterator[tuple[str, Any]]:
        for _, reading in replay_plan(frame, entity, start_ts=start_ts):
            yield entity, dataclasses.replace(reading, entity=entity)

    yield from heapq.merge(*(renamed(e, f) for e, f in frames), key=lambda item: item[1].ts)


def fleet_span_s(frames: Sequence[tuple[str, Any]]) -> float:
    """Stream seconds one round of the fleet covers, plus one sampling period (pure)."""
    span = 0.0
    for _, frame in frames:
        index = frame.index
        if len(index) > 1:
            span = max(span, (index[-1] - index[0]).total_seconds() + _spacing_s(index))
    return span or 1.0


def fleet_period_s(frames: Sequence[tuple[str, Any]]) -> float:
    """The longest of the fleet's recorded sampling periods (their smallest spacing; 1 s without one)."""
    return max((_spacing_s(frame.index) for _, frame in frames if len(frame.index) > 1), default=1.0)


def _spacing_s(index: Any) -> float:
    gaps = (index[1:] - index[:-1]).total_seconds()
    return float(min(g for g in gaps if g > 0)) if (gaps > 0).any() else 1.0


class GroundTruth:
    """Where SKAB labels a fault, in stream time, for each replay round (pure but for its lock).

    ``anomaly up`` knows what it replays and when each round started, so it can say of every event
    whether it overlaps a labelled fault: the console marks each event, and ``fleet.json`` records the
    rounds so anyone can check the events topic against the labels.
    """

    def __init__(self, fleet: Sequence[tuple[str, Any]], slack_s: float = 0.0) -> None:
        self._intervals: dict[str, list[tuple[float, float]]] = {}
        self._series = {entity: series.name for entity, series in fleet}
        for entity, series in fleet:
            self._intervals[entity] = labelled_intervals(series.frame.index, series.labels)
        self.slack_s = slack_s
        self.rounds: list[float] = []
        self._lock = threading.Lock()

    def add_round(self, start_ts: float) -> None:
        with self._lock:
            self.rounds.append(float(start_ts))

    def faults(self, entity: str) -> list[tuple[float, float]]:
        """Labelled fault intervals of ``entity`` in stream time (epoch seconds), over all rounds so far."""
        with self._lock:
            rounds = list(self.rounds)
        return [(r + a, r + b) for r in rounds for a, b in self._intervals.get(entity, [])]

    def on_fault(self, entity: str, start_ts: float, end_ts: float | None = None) -> bool:
        end = start_ts if end_ts is None else end_ts
        return any(a - self.slack_s <= end and start_ts <= b + self.slack_s for a, b in self.faults(entity))

    def note(self, event: Mapping[str, Any]) -> str:
        try:
            start = float(event["start_ts"])
            end = float(event["end_ts"]) if event.get("end_ts") is not None else None
        except (KeyError, TypeError, ValueError):
            return ""
        entity = str(event.get("entity", ""))
        if entity not in self._intervals:
            return ""
        series = self._series[entity]
        return f"SKAB {series}: labelled fault" if self.on_fault(entity, start, end) else f"SKAB {series}: no fault label"

    def manifest(self) -> dict[str, Any]:
        with self._lock:
            rounds = list(self.rounds)
        return {"rounds": rounds, "entities": {e: {"series": self._series[e], "fault_offsets_s": self._intervals[e]}
                                                for e in self._intervals}}


def labelled_intervals(index: Any, labels: Any) -> list[tuple[float, float]]:
    """Runs of labelled rows as ``(first, last)`` seconds after the series' first reading (pure)."""
    import numpy as np

    if labels is None or not len(index):
        return []
    labels = np.asarray(labels, dtype=bool)
    offsets = (index - index[0]).total_seconds()
    out, start = [], None
    for i, flag in enumerate(labels):
        if flag and start is None:
            start = i
        if start is not None and (not flag or i == len(labels) - 1):
            last = i if flag else i - 1
            out.append((float(offsets[start]), float(offsets[last])))
            start = None
    return out


class FleetReplay:
    """Replays the fleet into the input topic in a thread, again and again while ``loop``."""

    def __init__(self, bootstrap: str, topic: str, frames: Sequence[tuple[str, Any]], speed: float, loop: bool,
                 client_options: Mapping[str, Any], on_round: Any = None, not_before: float = 0.0) -> None:
        self.on_round = on_round  # called with each round's stream start (epoch seconds)
        self.not_before = not_before  # the first round's stamps start no earlier (the topic's newest + a period)
        self.bootstrap, self.topic, self.frames = bootstrap, topic, list(frames)
        self.speed, self.loop, self.client_options = speed, loop, dict(client_options)
        self.rounds, self.delivered = 0, 0  # readings the broker confirmed, over all rounds
        self._count_lock = threading.Lock()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-replay", daemon=True)

    def start(self) -> "FleetReplay":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = REPLAY_STOP_S) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _count_delivered(self) -> None:
        """One reading confirmed by the broker (called on the producer's thread)."""
        with self._count_lock:
            self.delivered += 1

    def _run(self) -> None:
        from anomaly.replay import replay

        try:
            next_start = self.not_before
            while not self._stop.is_set():
                # Each round continues the stream's clock: a round starting "now" would be behind the
                # last one at any speed-up, and its readings would all be late.
                start = max(time.time(), next_start)
                next_start = start + fleet_span_s(self.frames)
                if self.on_round is not None:
                    self.on_round(start)
                stream = fleet_stream(self.frames, start_ts=start)
                self.rounds += 1  # rounds begun: the one a stop cuts short counts too
                stats = replay(self.bootstrap, self.topic, stream, speed=self.speed,
                               client_options=self.client_options, progress=False, clock=_StoppableClock(self._stop),
                               on_delivered=self._count_delivered)
                log.info("fleet replay round %d done: %d readings", self.rounds, stats.sent)
                if not self.loop:
                    break
        except _Stopped:
            pass
        except Exception as exc:
            self.error = exc
            if self._stop.is_set():  # the stack is stopping (a dead broker makes the last flush fail)
                log.info("fleet replay ended while stopping: %s", exc)
            else:
                log.error("fleet replay failed: %s", exc)


# --- the stack -----------------------------------------------------------------------------------

def load_fleet(data_dir: Path, fleet: Sequence[str]) -> list[tuple[str, Any]]:
    """``[(entity, LabelledSeries)]`` for the fleet; a missing dataset or series is a ``DataError`` that says where."""
    from anomaly import datasets

    # load_skab takes the dataset folder or its data/ folder; a folder that is neither is said with where
    # datasets are looked for (--data-dir, ANOMALY_DATASETS): said once, not twice
    by_name = {s.name: s for s in datasets.load_skab(data_dir)}
    missing = [name for name in fleet if name not in by_name]
    if missing:
        raise DataError(f"no SKAB series {', '.join(missing)} in {data_dir}; e.g. {', '.join(sorted(by_name)[:6])}")
    return [(entity, by_name[name]) for entity, name in fleet_entities(fleet)]


def fleet_frames(fleet: Sequence[tuple[str, Any]], sensors: Sequence[str]) -> list[tuple[str, Any]]:
    """``[(entity, frame)]`` with each series' columns limited to ``sensors``, the serving model's, in its
    order (pure): a reading must carry exactly its model's sensors (DESIGN §2), so the replay sends those."""
    missing = sorted({name for _, series in fleet for name in sensors if name not in series.frame.columns})
    if missing:
        raise DataError(f"the serving model reads sensors the fleet does not have: {missing}; the fleet's are "
                        f"{list(fleet[0][1].frame.columns) if fleet else []}")
    return [(entity, series.frame[list(sensors)]) for entity, series in fleet]


def champion_sensors(model_name: str, version: str) -> tuple[str, ...]:
    """The sensors the registered version reads, from its own model.json."""
    from anomaly import registry

    detector, _ = registry.load_detector(model_name, version)
    return tuple(detector.sensors)


def fleet_training_tables(fleet: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """entity -> its series' protocol training part (SKAB: the rows before any fault), for
    ``prepare_fleet``: each entity gridded and split on its own, so no window joins two experiments and
    validation holds every entity's recent rows (pure). Entities with no training rows are left out."""
    return {entity: series.train for entity, series in fleet if not series.train.empty}


def train_first_champion(settings: Settings, fleet: Sequence[tuple[str, Any]], data_dir: Path) -> str:
    """Train on the fleet's normal readings, register and promote; the new version."""
    w_alias = settings.worker.model_alias
    from anomaly.preparation import prepare_fleet
    from anomaly.train_job import run_training

    tables = fleet_training_tables(fleet)
    if not tables:
        raise UpError("no training rows in the fleet's series")
    d = settings.data
    prepared = prepare_fleet(tables, settings.model.window_size, settings.training.validation_fraction,
                             sensors=d.sensors, period_s=d.period_s, fill=d.fill, max_fill_steps=d.max_fill_steps,
                             max_missing_fraction=d.max_missing_fraction, outage_steps=settings.worker.max_fill_steps)
    names = ", ".join(series.name for _, series in fleet)
    rows = sorted({len(table) for table in tables.values()})
    print(f"no champion in the registry at {masked(settings.mlflow.tracking_uri)} yet: training one on the fleet's normal "
          f"readings (SKAB {names}: {sum(len(t) for t in tables.values())} readings x {len(prepared.sensors)} "
          "sensors) ...", flush=True)
    first = str(rows[0]) if len(rows) == 1 else f"{rows[0]}-{rows[-1]}"
    outcome = run_training(prepared, settings, source=f"{data_dir}: first {first} rows of {names}", dataset="skab",
                           register=True, promote=True, progress=True,
                           # the alias the worker serves too, where it is not mlflow.champion_alias
                           alias=None if w_alias == settings.mlflow.champion_alias else w_alias)
    print(f"trained and promoted {settings.mlflow.model_name} v{outcome.version} "
          f"(best validation loss {outcome.result.best_val_loss:.4g})", flush=True)
    return str(outcome.version)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for the stack's children, less the ``ANOMALY_<SECTION>__<FIELD>``
    settings: the children read the effective settings from ``up``'s TOML file, which holds them already,
    and a variable read again would undo what ``up`` sets on purpose (``worker.max_future_s = -1``, its
    own scheduler job store)."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith(ENV_PREFIX) and "__" in k)}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C/SIGTERM/SIGHUP during start-up. Not an ``Exception``, so start-up code that catches those
    (MLflow's, the registry adapter's) cannot turn a stop into an error; a ``KeyboardInterrupt``, so the
    first champion's training run, stopped, ends KILLED (it ended FAILED)."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def run(settings: Settings, options: UpOptions) -> int:
    """Start the stack, supervise it until Ctrl-C/SIGTERM/SIGHUP (or ``run_for_s``), stop it; the exit code."""
    from anomaly import tracking

    k, w, s, m = settings.kafka, settings.worker, settings.scheduler, settings.mlflow
    fleet = load_fleet(options.data_dir, options.fleet)  # a missing dataset stops us before anything starts
    broker_port = local_port(k.bootstrap_servers)
    server_cmd = mlflow_server_command(sys.executable, m.tracking_uri, m.artifact_location, options.ui_port)
    ports = {"Kafka broker": broker_port or 0, "MLflow UI": options.ui_port if server_cmd else 0,
             "worker metrics": w.metrics_port, "scheduler metrics": s.metrics_port}
    clashes = clashing_ports(ports)
    if clashes:
        raise UpError(f"one port for two parts: {', '.join(clashes)}; give each its own (the metrics ports also "
                      "take 0: any free port)")
    taken = taken_ports(ports, hosts={"worker metrics": w.metrics_host, "scheduler metrics": s.metrics_host})
    if taken:
        raise UpError(port_hint(taken))
    settings = with_free_metrics_ports(settings)
    if m.tracking_uri.startswith(("http://", "https://")):  # said now, not after ~4 minutes of client retries
        tracking.require_reachable(m.tracking_uri, m.registry_uri)

    state = options.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpError(f"--state-dir {state}: cannot make it: {exc.strerror or exc}") from None
    lock_fd = lock_state(state)  # before the first write into it
    try:
        return _run_locked(settings, options, fleet, state, server_cmd, broker_port)
    finally:
        os.close(lock_fd)


def _run_locked(settings: Settings, options: UpOptions, fleet: Sequence[tuple[str, Any]], state: Path,
                server_cmd: list[str] | None, broker_port: int | None) -> int:
    """``run`` once the state folder is this session's."""
    from anomaly import kafka_io, registry, tracking
    from anomaly.broker import LocalBroker
    from anomaly.event_feed import EventFeed

    k, w, m = settings.kafka, settings.worker, settings.mlflow
    config_path = state / "anomaly.toml"
    # The fleet replay runs the stream's clock `speed` times faster than the wall clock, on purpose; the
    # scheduler's job store is this session's, beside its logs (not an operator's shared one under mlruns/).
    settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker, max_future_s=-1.0),
                                   scheduler=dataclasses.replace(settings.scheduler,
                                                                 job_store=str(state / "scheduler.db")))
    for stale in ("summary.json", "fleet.json"):  # a failed session must not leave the last one's
        (state / stale).unlink(missing_ok=True)
    write_private(config_path, to_toml(settings))  # it holds kafka.client_options: SASL passwords too
    load_config(config_path, env={})  # as the children will read it: a field it cannot hold stops us here
    env = child_env()
    python_cli = [sys.executable, "-m", "anomaly.cli", "--log-level", options.log_level]

    # SIGHUP (the terminal closed) stops in order too: else the children outlive us
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    broker: LocalBroker | None = None
    children: dict[str, Child] = {}
    feed: EventFeed | None = None
    fleet_replay: FleetReplay | None = None
    tally: _Tally | None = None
    code = 0
    try:
        bootstrap = k.bootstrap_servers
        if broker_port is not None:
            kafka_log = logging.getLogger("kafka")
            level = kafka_log.level
            kafka_log.setLevel(logging.CRITICAL)  # the readiness probe's refused connections are expected
            try:
                broker = LocalBroker(broker_port, log_path=state / "broker.log").start()
            finally:
                kafka_log.setLevel(level)
            bootstrap = broker.bootstrap
            print(f"broker: Tansu on {bootstrap} (memory storage)", flush=True)
        # the dead-letter topic with one partition, as the worker makes it (it warned of 4 where 1 was asked)
        kafka_io.ensure_topics(bootstrap, {**{t: TOPIC_PARTITIONS for t in (k.input_topic, k.events_topic,
                                                                            k.scores_topic) if t}, k.dlq_topic: 1},
                               k.client_options)
        ui = ui_base(m.tracking_uri, options.ui_port)
        # Open (and on first use create) the store here, before the server: two processes creating
        # one fresh SQLite schema at once collide in its migrations.
        tracking.configure_from(m)
        champion = registry.alias_version(m.model_name, w.model_alias)
        if server_cmd is not None:
            _start(children, Child("mlflow", server_cmd, state / "mlflow.log",
                                   child_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})))
            if champion is None and ui:  # a first training takes minutes: its run can be watched meanwhile
                print(f"MLflow UI: {ui} (starting; the training run shows there as it goes)", flush=True)
        if champion is None:
            champion = train_first_champion(settings, fleet, options.data_dir)
        else:
            print(f"registry: {m.model_name} v{champion} is @{w.model_alias}; reusing it", flush=True)
        sensors = champion_sensors(m.model_name, champion)
        frames = fleet_frames(fleet, sensors)
        print(f"fleet readings carry the sensors v{champion} reads ({len(sensors)}): {', '.join(sensors)}", flush=True)
        if "mlflow" in children and ui:
            wait_http(f"{ui}/health", children["mlflow"], MLFLOW_READY_S, "the MLflow server")

        _start(children, Child("worker", [*python_cli, "worker", "--config", str(config_path)],
                               state / "worker.log", env))
        _start(children, Child("scheduler", [*python_cli, "scheduler", "--config", str(config_path),
                                             "--interval-s", repr(float(options.retrain_every_s))],
                               state / "scheduler.log", env, abandon_s=SCHEDULER_ABANDON_S))
        if w.metrics_port > 0:
            wait_http(f"http://{w.metrics_host}:{w.metrics_port}/healthz", children["worker"], WORKER_READY_S,
                      "the worker")
        truth = GroundTruth(fleet, slack_s=settings.model.window_size * (settings.data.period_s or 1.0))
        tally = _Tally(truth)

        def on_round(start_ts: float) -> None:
            truth.add_round(start_ts)
            _write_json(state / "fleet.json", {"bootstrap": bootstrap, "events_topic": k.events_topic, **truth.manifest()})

        feed = EventFeed(bootstrap, k.events_topic, client_options=k.client_options, annotate=tally.note,
                         on_line=(lambda line: print(line, flush=True)) if options.console else (lambda line: None),
                         from_end=broker is None,  # a broker we did not start holds earlier sessions' events
                         ).start()
        not_before = 0.0
        if broker is None:  # a broker we did not start may hold an earlier session's readings, stamped ahead
            from anomaly.replay import resume_ts

            not_before = resume_ts(bootstrap, k.input_topic, fleet_period_s(frames), k.client_options) or 0.0
        fleet_replay = FleetReplay(bootstrap, k.input_topic, frames, options.speed,
                                   options.loop, k.client_options, on_round=on_round, not_before=not_before).start()
        print(banner(bootstrap=bootstrap, settings=settings, ui=ui, fleet=fleet_entities(options.fleet),
                     speed=options.speed, state_dir=state, champion=str(champion),
                     retrain_every_s=options.retrain_every_s, local_broker=broker is not None), flush=True)
        from anomaly.scheduler import last_run_path

        code = _supervise(children, fleet_replay, broker, options.run_for_s, feed,
                          last_run=last_run_path(state / "scheduler.db"), scheduler_log=state / "scheduler.log")
    except _Interrupted as exc:
        _say(f"\n{exc}: stopping ...")
    except KeyboardInterrupt:
        _say("\ninterrupted: stopping ...")
    except UpError as exc:  # said now: the orderly stop can take a minute (the worker drains, the replay flushes)
        _say(f"\n{str(exc).splitlines()[0]}: stopping ... (details below once stopped)")
        raise
    finally:
        hurry = StopFlag()  # a second Ctrl-C does not cut the orderly stop short: it abandons a retrain only
        for sig in previous:
            signal.signal(sig, hurry)
        try:
            _stop_all(children, fleet_replay, feed, broker, lambda: hurry.is_set)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if feed is not None and tally is not None:  # a session that failed gets its summary too
                summary = {"events": dict(feed.counts), "opened_on_labelled_faults": tally.on_fault,
                           "opened_without_fault_label": tally.off_fault, "entities_with_events": sorted(feed.entities),
                           "replay_rounds": fleet_replay.rounds if fleet_replay else 0,
                           "readings_replayed": fleet_replay.delivered if fleet_replay else 0}
                try:
                    _write_json(state / "summary.json", summary)
                except OSError as exc:  # a full disk must not replace the session's own error, or its exit code
                    _say(f"summary.json not written: {exc}")
                _say(f"stopped. events opened: {tally.on_fault} on labelled faults, {tally.off_fault} elsewhere; "
                     f"readings replayed (confirmed by the broker): {summary['readings_replayed']} "
                     f"(summary in {state / 'summary.json'})")
    return code


class _Tally:
    """Counts opened events by whether they overlap a labelled fault (for the console and summary.json)."""

    def __init__(self, truth: GroundTruth) -> None:
        self.truth, self.on_fault, self.off_fault = truth, 0, 0
        self._seen: set[str] = set()

    def note(self, event: Mapping[str, Any]) -> str:
        text = self.truth.note(event)
        key = str(event.get("event_id"))
        if event.get("status") == "open" and text and key not in self._seen:
            self._seen.add(key)
            if text.endswith("labelled fault"):
                self.on_fault += 1
            else:
                self.off_fault += 1
        return text


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600, an existing file's mode too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def retrain_line(last: Mapping[str, Any], seen_ts: float | None, log_path: Path) -> str | None:
    """The console line for the scheduler's last retrain (its ``last.json``) when it finished after
    ``seen_ts``, else None: promotions showed on the console only as event lines whose model version
    changed, and what the retrain did only in the scheduler's log."""
    ts, outcome = last.get("last_run_ts"), last.get("last_outcome")
    if not isinstance(ts, (int, float)) or not isinstance(outcome, str) or (seen_ts is not None and ts <= seen_ts):
        return None
    when = time.strftime("%H:%M:%S", time.localtime(ts))
    return f"retrain at {when} (local time): {outcome}; why, and the verdicts it read: {log_path}"


def _read_last(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet, or written as it is read
        return {}
    return data if isinstance(data, dict) else {}


def _supervise(children: Mapping[str, Child], fleet_replay: FleetReplay, broker: Any, run_for_s: float | None,
               feed: Any = None, last_run: Path | None = None, scheduler_log: Path | None = None) -> int:
    """Watch the stack; return 0 at the deadline, raise ``UpError`` when a part dies (the event feed too:
    a quiet console and a partial summary would pass for a quiet fleet). Each retrain the scheduler
    finishes (``last_run``: its ``last.json``) gets a console line."""
    deadline = None if run_for_s is None else time.monotonic() + run_for_s
    seen = _read_last(last_run).get("last_run_ts")  # an earlier session's last run: not news
    seen = seen if isinstance(seen, (int, float)) else -math.inf
    while deadline is None or time.monotonic() < deadline:
        time.sleep(SUPERVISE_STEP_S)
        if last_run is not None:
            last = _read_last(last_run)
            line = retrain_line(last, seen, scheduler_log or last_run)
            if line is not None:
                seen = last["last_run_ts"]
                _say(line)
        for child in children.values():
            if not child.alive():
                raise UpError(f"{child.name} exited unexpectedly (code {child.proc.returncode if child.proc else '?'})"
                              f"{child.tail()}")
        if broker is not None and not broker.is_running():
            raise UpError(f"the broker exited unexpectedly; see {broker.log_path}{broker._log_tail()}")
        if fleet_replay.error is not None:
            raise UpError(f"the fleet replay failed: {fleet_replay.error}")
        if feed is not None and feed.error is not None:
            raise UpError(f"the console's event feed stopped: {feed.error}")
    return 0


def _start(children: dict[str, Child], child: Child) -> None:
    """Register ``child`` before starting it, so a Ctrl-C that lands in between still stops it in order."""
    children[child.name] = child
    child.start()


def _stop_all(children: dict[str, Child], fleet_replay: FleetReplay | None, feed: Any, broker: Any,
              hurry: Callable[[], bool] | None = None) -> None:
    """Stop in dependency order: readings first, then the worker (drains and commits), the rest after."""
    failed: list[Exception] = []  # a part that fails to stop does not keep the rest running: said at the end

    def stop(name: str, part: Callable[[], Any]) -> None:
        try:
            part()
        except Exception as exc:
            log.error("stopping %s failed: %s", name, exc)
            failed.append(exc)

    if fleet_replay is not None:
        if broker is not None and not broker.is_running():
            # The replay's flush would wait 60 s for a broker that is gone, with kafka-python logging every
            # failed reconnect meanwhile: its thread (a daemon) is left to end with the process.
            logging.getLogger("kafka").setLevel(logging.CRITICAL)
            stop("the fleet replay", lambda: fleet_replay.stop(REPLAY_STOP_BROKER_GONE_S))
        else:
            stop("the fleet replay", fleet_replay.stop)
    for name in ("worker", "scheduler", "mlflow"):
        child = children.get(name)
        if child is not None:
            def stop_child(name: str = name, child: Child = child) -> None:
                if name == "scheduler" and child.alive():
                    _say(f"stopping the scheduler (a retrain in progress may finish first: up to "
                         f"{STOP_GRACE_S[name]:.0f} s; Ctrl-C again abandons it)")
                code = child.stop(STOP_GRACE_S[name], hurry if name == "scheduler" else None)
                log.info("%s stopped (exit code %s)", name, code)

            stop(name, stop_child)
    if feed is not None:
        stop("the event feed", feed.stop)
    if broker is not None:
        stop("the broker", broker.stop)
    if failed:
        raise failed[0]


def _say(text: str) -> None:
    """Print ``text`` on the console. A console that is gone (the terminal closed: EIO; a ``| tee`` that the
    same Ctrl-C ended: EPIPE) must not cut the orderly stop short: the rest goes to /dev/null."""
    try:
        print(text, flush=True)
    except OSError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # not a file (io.UnsupportedOperation is both)
            pass
