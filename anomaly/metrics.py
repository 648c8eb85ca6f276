"""The worker's Prometheus metrics and its health endpoint.

Owns: one ``WorkerMetrics`` object per worker, holding its own ``CollectorRegistry`` (so tests and
several workers in one process never collide on the global registry), the metric names and buckets,
and a small HTTP server (stdlib ``http.server`` in a daemon thread) that serves

- ``GET /metrics``  the Prometheus text exposition (OpenMetrics when the scraper asks for it);
- ``GET /healthz``  JSON ``{"status": "ok" | "degraded" | "starting" | "stalled" | "stopping", "model": {...},
  "last_batch_ts": ..., "last_batch_age_s": ..., "assigned_partitions": N, ...}`` with HTTP 200 for
  ``ok`` and ``degraded`` (the process works, keep it) and 503 otherwise (not ready, stuck, or draining).

Must not: decide anything about the worker. The worker tells it what happened (``record_batch``,
``set_model``, ``model_swapped``, ``set_health`` ...); this module only counts and serves. It is the
only module that imports ``prometheus_client``.

Metric names (all prefixed ``anomaly_``):

    counters    records_consumed_total, dead_letters_total, windows_scored_total,
                events_total{status="open"|"closed"}, late_readings_total, duplicate_readings_total,
                window_resets_total, readings_accepted_total, entities_evicted_total, events_muted_total,
                nonfinite_scores_total, adaptive_held_windows_total, records_replayed_total, model_swaps_total,
                model_load_failures_total
    histograms  batch_seconds, end_to_end_seconds
    gauges      model_version{model}, entities, silent_sensors, last_commit_timestamp_seconds,
                last_batch_timestamp_seconds, last_poll_timestamp_seconds
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from anomaly.errors import AnomalyError
from anomaly.redaction import masked

log = logging.getLogger(__name__)


def encode(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """``registry`` in the format the ``Accept`` header asks for: ``(body, content type)``. A header that
    prometheus_client cannot read (``version=abc``: a TypeError there, an empty reply and a traceback on
    stderr) gets the plain text format, as a header asking for none does."""
    try:
        encoder, content_type = choose_encoder(accept)
    except Exception:
        encoder, content_type = choose_encoder("")
    return encoder(registry), content_type

PREFIX = "anomaly"

# One micro-batch is decode + a batched forward pass + produce/flush/commit: milliseconds when idle,
# seconds under load or on a slow broker; past a minute something is wrong.
BATCH_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                      10.0, 30.0, 60.0)
# Reading timestamp → event produced. Includes the window fill, sensor clock skew and consumer lag,
# so it spans milliseconds (live, caught up) to many minutes (a backlog after a restart).
END_TO_END_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                           60.0, 120.0, 300.0, 600.0, 1800.0)

COUNT_KEYS: frozenset[str] = frozenset({"consumed", "dead_letters", "windows_scored", "late", "duplicates",
                                        "resets", "events_opened", "events_closed", "accepted", "evicted",
                                        "nonfinite_scores", "adaptive_held", "replayed", "empty", "skipped"})
"""The keys ``record_batch`` counts; a missing key counts as 0, an unknown one is ignored (with one
warning: a metrics mismatch must never stop the worker)."""

HEALTH_STATUSES: frozenset[str] = frozenset({"ok", "degraded", "starting", "stopping"})
_HEALTHY = frozenset({"ok", "degraded"})  # answered with HTTP 200; the others (and "stalled") with 503

HTTP_POLL_INTERVAL_S = 0.2  # stop_http returns within this; five idle wake-ups a second cost nothing
HTTP_JOIN_TIMEOUT_S = 5.0  # stop_http waits this long for the server thread; it is a daemon anyway


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every ``v`` in ``values``, counted per bucket in one numpy pass (a
    batch scores hundreds of windows; one ``observe`` each took ~3 % of the worker's main thread).
    Falls back to one ``observe`` per value if prometheus_client's histogram is laid out differently."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not values.size:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets) \
            or not hasattr(histogram, "_raise_if_not_observable"):
        for value in values.tolist():
            histogram.observe(value)
        return
    histogram._raise_if_not_observable()  # a labelled parent has no buckets of its own
    # observe() counts v in the first bucket whose bound is >= v; the last bound is +Inf.
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left"),
                         minlength=len(bounds))
    total.inc(float(values.sum()))
    for i in np.flatnonzero(counts[:len(bounds)]).tolist():
        buckets[i].inc(int(counts[i]))


class WorkerMetrics:
    """The metrics and health state of one worker, with their own registry and HTTP server.

    Thread-safe: the worker updates it from its loop while the HTTP thread reads it.
    ``clock`` gives wall-clock epoch seconds (for timestamps in ``/healthz``), ``monotonic`` the clock a loop
    round's age is measured on (a step of the wall clock, NTP's or a resumed VM's, is no stall).
    """

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock, self._monotonic = clock, monotonic
        self._round_at: float | None = None  # ``monotonic`` when the last loop round ended
        self._lock = threading.Lock()
        self._http = HttpEndpoint(self)
        self._stall_s = 0.0
        r = self.registry

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labelnames=tuple(labels), registry=r)

        self.records_consumed = counter("records_consumed_total", "Input records consumed (good and bad).")
        self.dead_letters = counter("dead_letters_total", "Records sent to the dead-letter topic.")
        self.windows_scored = counter("windows_scored_total", "Windows scored by the model.")
        self.events = counter("events_total", "Anomaly events produced, by status.", ("status",))
        self.late_readings = counter("late_readings_total", "Readings dropped as too late for their window.")
        self.duplicate_readings = counter("duplicate_readings_total", "Readings dropped as duplicates.")
        self.empty_readings = counter("empty_readings_total",
                                      "Readings with every sensor null: no reading, their slots missing.")
        self.window_resets = counter("window_resets_total", "Entity window buffers restarted after a gap.")
        self.readings_skipped = counter("readings_skipped_total",
                                        "Records of entities this worker does not serve (worker.entities): skipped.")
        self.readings_accepted = counter("readings_accepted_total", "Readings taken into an entity's window.")
        self.entities_evicted = counter("entities_evicted_total", "Entities dropped after being silent too long, or not active past worker.max_entities.")
        self.nonfinite_scores = counter("nonfinite_scores_total", "Windows whose score was NaN or infinite.")
        self.adaptive_held = counter("adaptive_held_windows_total",
                                     "Windows above the fitted threshold held back by their entity's moving bar "
                                     "(adaptive, or the bar an alarm episode settled at).")
        self.records_replayed = counter("records_replayed_total",
                                        "Records read again after a swap to a model with other sensors, window "
                                        "or period, to refill its windows (not counted as consumed again).")
        self.model_swaps = counter("model_swaps_total", "Times a newly promoted model version was swapped in.")
        self.events_muted = counter("events_muted_total",
                                    "Event records held back: their events started during their entity's maintenance "
                                    "(anomaly feedback maintenance).")
        self.model_load_failures = counter("model_load_failures_total",
                                           "Failed attempts to check the registry or load a model version.")
        self.batch_seconds = Histogram(f"{PREFIX}_batch_seconds", "Wall time of one micro-batch, poll to commit.",
                                       buckets=BATCH_BUCKETS_S, registry=r)
        self.end_to_end_seconds = Histogram(f"{PREFIX}_end_to_end_seconds",
                                            "A window's last reading timestamp to its outputs produced.",
                                            buckets=END_TO_END_BUCKETS_S, registry=r)
        self.model_version = Gauge(f"{PREFIX}_model_version", "Registry version of the model in use.",
                                   labelnames=("model",), registry=r)
        self.entities = Gauge(f"{PREFIX}_entities", "Entities with window state in this worker.", registry=r)
        self.silent_sensors = Gauge(f"{PREFIX}_silent_sensors",
                                    "Sensors (entity and sensor) that sent no value in more than worker.max_fill_steps "
                                    "slots in a row, scored on their typical value (checked once a minute).",
                                    registry=r)
        self.last_commit_ts = Gauge(f"{PREFIX}_last_commit_timestamp_seconds",
                                    "Epoch seconds of the last successful offset commit.", registry=r)
        self.last_batch_ts = Gauge(f"{PREFIX}_last_batch_timestamp_seconds",
                                   "Epoch seconds at which the last micro-batch finished.", registry=r)
        self.last_poll_ts = Gauge(f"{PREFIX}_last_poll_timestamp_seconds",
                                  "Epoch seconds of the poll loop's last round, with records or without (an idle "
                                  "worker's stays fresh; a hung batch's does not).", registry=r)

        # count key -> counter; labelling both event statuses here also makes a scrape show 0 before any event
        self._counters: dict[str, Any] = {
            "consumed": self.records_consumed, "dead_letters": self.dead_letters,
            "windows_scored": self.windows_scored, "late": self.late_readings,
            "duplicates": self.duplicate_readings, "resets": self.window_resets,
            "events_opened": self.events.labels(status="open"), "events_closed": self.events.labels(status="closed"),
            "accepted": self.readings_accepted, "evicted": self.entities_evicted,
            "nonfinite_scores": self.nonfinite_scores, "adaptive_held": self.adaptive_held,
            "replayed": self.records_replayed, "empty": self.empty_readings, "skipped": self.readings_skipped,
        }
        self._warned_keys: set[str] = set()
        self._health: dict[str, Any] = {"status": "starting", "detail": None, "model_name": None,
                                        "model_version": None, "assigned_partitions": 0,
                                        "last_batch_ts": None, "last_commit_ts": None}

    # --- what the worker reports ------------------------------------------------------------------

    def record_batch(self, counts: Mapping[str, int], batch_seconds: float, latencies_s: Iterable[float] = ()) -> None:
        """Count one finished micro-batch: ``counts`` (see ``COUNT_KEYS``), its wall time, and the
        end-to-end latency of each window it scored (last reading's timestamp → outputs produced).
        Non-finite or negative latencies (clock skew between sensor and worker) are counted as 0
        rather than dropped, so the histogram's count stays right."""
        for key, amount in counts.items():
            counter = self._counters.get(key)
            if counter is not None:
                if amount:
                    counter.inc(amount)
            elif key not in self._warned_keys:
                self._warned_keys.add(key)
                log.warning("record_batch: count %r has no metric; ignored (known: %s)", key, sorted(COUNT_KEYS))
        self.batch_seconds.observe(max(0.0, float(batch_seconds)))
        latencies = np.asarray(latencies_s if isinstance(latencies_s, np.ndarray)
                               else np.fromiter(latencies_s, dtype=np.float64), dtype=np.float64)
        observe_many(self.end_to_end_seconds, np.where(np.isfinite(latencies) & (latencies > 0), latencies, 0.0))
        now = self._clock()
        self.last_batch_ts.set(now)
        with self._lock:
            self._health["last_batch_ts"] = now
            self._round_at = self._monotonic()

    def set_model(self, name: str, version: str | int) -> None:
        """The model in use (at start); the version gauge is labelled with the model's name."""
        with self._lock:
            previous = self._health["model_name"]
            self._health["model_name"], self._health["model_version"] = name, str(version)
        if previous is not None and previous != name:
            try:
                self.model_version.remove(previous)
            except KeyError:
                pass
        self.model_version.labels(model=name).set(_version_number(version))

    def model_swapped(self, name: str, version: str | int) -> None:
        """A newly promoted version was swapped in between batches."""
        self.model_swaps.inc()
        self.set_model(name, version)

    def model_load_failed(self) -> None:
        """A registry check or a model load failed; the current model stays in use."""
        self.model_load_failures.inc()

    def set_entities(self, count: int) -> None:
        self.entities.set(count)

    def set_silent_sensors(self, count: int) -> None:
        self.silent_sensors.set(count)

    def set_last_commit(self, ts_s: float | None = None) -> None:
        """An offset commit succeeded at ``ts_s`` (default: now)."""
        now = self._clock() if ts_s is None else float(ts_s)
        self.last_commit_ts.set(now)
        with self._lock:
            self._health["last_commit_ts"] = now

    def set_stall_limit(self, stall_s: float) -> None:
        """While ok or degraded, ``/healthz`` reports ``stalled`` (503) once no loop round has finished
        (``last_batch_ts``) for more than ``stall_s`` seconds; 0 = never."""
        with self._lock:
            self._stall_s = float(stall_s)

    def set_health(self, status: str | None = None, *, detail: str | None = None, model_name: str | None = None,
                   model_version: str | int | None = None, assigned_partitions: int | None = None,
                   last_batch_ts: float | None = None) -> None:
        """Update what ``/healthz`` reports; arguments left ``None`` keep their value, except
        ``detail``, which is cleared whenever ``status`` is given without one (a stale reason would lie)."""
        if status is not None and status not in HEALTH_STATUSES:
            raise ValueError(f"health status must be one of {sorted(HEALTH_STATUSES)}, got {status!r}")
        if detail is not None:
            detail = masked(detail)  # it may quote the tracking URI, whose user info may hold a password
        with self._lock:
            h = self._health
            if status is not None:
                h["status"], h["detail"] = status, detail
            elif detail is not None:
                h["detail"] = detail
            if model_name is not None:
                h["model_name"] = model_name
            if model_version is not None:
                h["model_version"] = str(model_version)
            if assigned_partitions is not None:
                h["assigned_partitions"] = int(assigned_partitions)
            if last_batch_ts is not None:
                h["last_batch_ts"] = float(last_batch_ts)
                self.last_poll_ts.set(float(last_batch_ts))
                # on the monotonic clock, as long ago as the wall-clock stamp says (``now``: no time)
                self._round_at = self._monotonic() - max(0.0, self._clock() - float(last_batch_ts))

    # --- what is served ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` document. A loop that has not finished a round within the stall limit
        (``set_stall_limit``) is ``stalled``, whatever it last reported: stuck in a batch, a delivery or a call
        that does not return, so only a restart helps."""
        with self._lock:
            h = dict(self._health)
            stall_s, round_at = self._stall_s, self._round_at
        last = h["last_batch_ts"]
        age = None if round_at is None else max(0.0, self._monotonic() - round_at)
        status, detail = h["status"], h["detail"]
        if status in _HEALTHY and stall_s > 0 and age is not None and age > stall_s:
            status, detail = "stalled", (f"no loop round has finished for {age:.0f} s (worker.stall_s {stall_s:g}): "
                                         "stuck in a batch, a delivery or a registry call")
        return {"status": status, "detail": detail,
                "model": {"name": h["model_name"], "version": h["model_version"]},
                "last_batch_ts": last, "last_batch_age_s": age,
                "last_commit_ts": h["last_commit_ts"], "assigned_partitions": h["assigned_partitions"]}

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format the ``Accept`` header asks for: ``(body, content type)``."""
        return encode(self.registry, accept)

    def start_http(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Serve ``/metrics`` and ``/healthz`` on ``host:port`` from a daemon thread; the port actually
        bound (``port=0`` picks a free one). ``0.0.0.0`` by default so Prometheus on another host can
        scrape it. A port in use raises ``AnomalyError``; calling it again while serving is an error."""
        return self._http.start(host, port)

    def stop_http(self) -> None:
        """Stop the HTTP server and release its port; idempotent."""
        self._http.stop()

    @property
    def http_port(self) -> int | None:
        """The port being served, or ``None``."""
        return self._http.port


class _Server(ThreadingHTTPServer):
    """The endpoint's server: IPv4 or IPv6 as its host is (``address_family`` set per host: "::" was refused),
    and a request that fails says so in the log, not as a traceback on stderr (a probe that gives up and
    resets the connection: a line at debug level)."""

    def __init__(self, address: tuple[str, int], handler: Any, family: int) -> None:
        self.address_family = family  # read by the base class as it makes the socket
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("metrics endpoint: %s dropped the connection: %s", client_address, exc)
        else:
            log.warning("metrics endpoint: a request from %s failed: %r", client_address, exc)


class HttpEndpoint:
    """``GET /metrics`` and ``GET /healthz`` of ``target`` from a stdlib HTTP server in a daemon thread.

    ``target`` has ``exposition(accept) -> (body, content type)`` and ``health() -> dict`` whose
    ``status`` is one of ``HEALTH_STATUSES`` (or ``stalled``): 200 for ok/degraded, 503 for the others. Serves the
    worker's ``WorkerMetrics`` and the scheduler's ``SchedulerMetrics``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        if self._server is not None:
            raise AnomalyError(f"metrics server already running on port {self._server.server_address[1]}")
        try:
            family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server = _Server((host, int(port)), _handler_for(self.target), family)
        except OSError as exc:
            raise AnomalyError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        server.daemon_threads = True  # a slow scraper must not hold the process's exit
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": HTTP_POLL_INTERVAL_S},
                                  name=f"metrics-http-{server.server_address[1]}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        bound = int(server.server_address[1])
        log.info("serving /metrics and /healthz on http://%s:%d", host, bound)
        return bound

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(HTTP_JOIN_TIMEOUT_S)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])


def _version_number(version: str | int) -> float:
    """A registry version as the gauge's value (MLflow versions are integers); NaN if it is not one."""
    try:
        return float(int(str(version)))
    except ValueError:
        return math.nan


def _handler_for(metrics: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds an idle connection may hold its thread (scrapes and probes are quick)
        server_version = "anomaly-metrics"

        head = False  # a HEAD request: GET's status and headers, no body (HEAD-based monitors got 501)

        def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's naming
            self.head = True
            try:
                self.do_GET()
            finally:
                self.head = False  # the next request on a kept-alive connection may be a GET

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, content_type = metrics.exposition(self.headers.get("Accept", ""))
                self._send(HTTPStatus.OK, body, content_type)
            elif path == "/healthz":
                doc = metrics.health()
                code = HTTPStatus.OK if doc["status"] in _HEALTHY else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(code, json.dumps(doc).encode("utf-8"), "application/json")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

        def _send(self, code: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self.head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
            log.debug("metrics http: " + format, *args)  # scrapes every few seconds: not for INFO

    return Handler
