"""The retraining scheduler's Prometheus metrics and its /metrics and /healthz endpoint.

Owns: one ``SchedulerMetrics`` object per scheduler with its own ``CollectorRegistry`` (tests and a
worker in the same process never collide on the global registry). Besides ``anomaly/metrics.py``
(the worker's), this is the only module that imports ``prometheus_client``. It only counts; the
scheduler tells it what happened.

Metric names (all prefixed ``anomaly_scheduler_``):

    counters  jobs_started_total,
              jobs_finished_total{outcome="promoted"|"kept"|"skipped"|"failed"|"error"|"abandoned"|"ok"},
              jobs_missed_total
    gauges    job_running, last_run_timestamp_seconds, last_success_timestamp_seconds,
              last_run_duration_seconds, next_run_timestamp_seconds

    drift     drift_checks_total{result="drift"|"ok"|"insufficient"|"no_reference"|"error"},
              drift_triggers_total (retrains started early by drift),
              drift_psi, drift_alarm_rate, drift_expected_alarm_rate, drift_samples (of the last
              check with a verdict; samples of every check), drift_last_check_timestamp_seconds,
              drift_records_read_total

``GET /healthz`` (served by ``anomaly.metrics.HttpEndpoint``, as the worker's): JSON ``{"status":
"starting" | "ok" | "degraded" | "stopping", "job_running": ..., "last_outcome": ..., "last_run_ts": ...,
"last_success_ts": ..., "next_run_ts": ...}``, HTTP 200 for ok and degraded (the last job failed: the
scheduler still runs, a restart would not help), 503 before it runs and while it stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from anomaly.metrics import HEALTH_STATUSES, HttpEndpoint, encode

log = logging.getLogger(__name__)

PREFIX = "anomaly_scheduler"
# A retrain's status; "error": the job raised; "ok": a job that returns no retrain result finished.
OUTCOMES = ("promoted", "kept", "skipped", "failed", "error", "abandoned", "ok")
DRIFT_RESULTS = ("drift", "ok", "insufficient", "no_reference", "error")


class SchedulerMetrics:
    """Counters and gauges of one scheduler; ``start_http`` serves them."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._http = HttpEndpoint(self)
        self._status = "starting"  # "ok" once the scheduler runs, "stopping" once it stops (set_status)
        self._last_outcome: str | None = None
        r = self.registry
        self.started = Counter(f"{PREFIX}_jobs_started_total",
                               "Retraining runs due and handed to the executor (one then found past misfire_grace_s "
                               "counts in jobs_missed_total too: started = finished + missed + running).", registry=r)
        self.finished = Counter(f"{PREFIX}_jobs_finished_total", "Retraining jobs finished, by outcome.",
                                labelnames=("outcome",), registry=r)
        self.missed = Counter(f"{PREFIX}_jobs_missed_total",
                              "Runs skipped because they were missed by more than the misfire grace time.", registry=r)
        self.running = Gauge(f"{PREFIX}_job_running", "1 while a retraining job runs.", registry=r)
        self.last_run_ts = Gauge(f"{PREFIX}_last_run_timestamp_seconds", "Epoch seconds the last job finished.",
                                 registry=r)
        self.last_success_ts = Gauge(f"{PREFIX}_last_success_timestamp_seconds",
                                     "Epoch seconds the last job finished promoted, kept, skipped or ok "
                                     "(not failed, error or abandoned).", registry=r)
        self.last_duration = Gauge(f"{PREFIX}_last_run_duration_seconds", "Wall time of the last job.", registry=r)
        self.next_run_ts = Gauge(f"{PREFIX}_next_run_timestamp_seconds", "Epoch seconds of the next scheduled run.",
                                 registry=r)
        for outcome in OUTCOMES:  # so a scrape shows 0 before the first job
            self.finished.labels(outcome=outcome)
        self.drift_checks = Counter(f"{PREFIX}_drift_checks_total", "Drift checks, by result.",
                                    labelnames=("result",), registry=r)
        for result in DRIFT_RESULTS:
            self.drift_checks.labels(result=result)
        self.drift_triggers = Counter(f"{PREFIX}_drift_triggers_total", "Retrains started early because of drift.",
                                      registry=r)
        self.drift_records = Counter(f"{PREFIX}_drift_records_read_total", "Score records read by drift checks.",
                                     registry=r)
        self.drift_psi = Gauge(f"{PREFIX}_drift_psi", "PSI of live vs validation scores (last verdict).", registry=r)
        self.drift_alarm_rate = Gauge(f"{PREFIX}_drift_alarm_rate",
                                      "Fraction of live scores above the threshold (last verdict).", registry=r)
        self.drift_expected_alarm_rate = Gauge(f"{PREFIX}_drift_expected_alarm_rate",
                                               "The champion's validation false-alarm rate.", registry=r)
        self.drift_samples = Gauge(f"{PREFIX}_drift_samples", "Live scores of the champion in the drift window.",
                                   registry=r)
        self.drift_last_check_ts = Gauge(f"{PREFIX}_drift_last_check_timestamp_seconds",
                                         "Epoch seconds of the last drift check.", registry=r)
        # Submitted minus finished or missed. A fast job's "finished" event can arrive before its "submitted"
        # event (they come from two threads), so this may dip below 0 for a moment.
        self._pending = 0

    def job_started(self) -> None:
        self.started.inc()
        self._pending += 1
        self.running.set(1 if self._pending > 0 else 0)

    @property
    def job_running(self) -> bool:
        """Whether more runs have started than ended (a quick run's end may be told before its start)."""
        return self._pending > 0

    def job_finished(self, outcome: str, duration_s: float | None = None) -> None:
        """``duration_s``: the job's own measure of its wall time, when it reports one."""
        now = self._clock()
        self.finished.labels(outcome=outcome if outcome in OUTCOMES else "error").inc()
        self._pending -= 1
        self._last_outcome = outcome if outcome in OUTCOMES else "error"
        self.running.set(1 if self._pending > 0 else 0)
        self.last_run_ts.set(now)
        if outcome not in ("failed", "error", "abandoned"):
            self.last_success_ts.set(now)
        if duration_s is not None:
            self.last_duration.set(max(float(duration_s), 0.0))

    def restore(self, last: Mapping[str, Any]) -> None:
        """Carry the last run's outcome and times over a restart (``last``: what ``last_run`` gave, as the
        scheduler saved it), so "no successful run for 3 days" and ``/healthz`` do not start from zero."""
        for name, gauge in (("last_run_ts", self.last_run_ts), ("last_success_ts", self.last_success_ts)):
            value = last.get(name)
            if isinstance(value, (int, float)) and value > 0:
                gauge.set(float(value))
        if last.get("last_outcome") in OUTCOMES:
            self._last_outcome = last["last_outcome"]

    def interrupted(self, started_ts: float) -> None:
        """A run that started at ``started_ts`` (epoch s) and never ended: its process was killed (out of
        memory, SIGKILL after a stop's grace). Counted as an ``error`` that ran then (after a restart,
        whose counters start from zero)."""
        self.finished.labels(outcome="error").inc()
        self._last_outcome = "error"
        self.last_run_ts.set(max(float(started_ts), self.value(f"{PREFIX}_last_run_timestamp_seconds") or 0.0))

    def last_run(self) -> dict[str, Any]:
        """The last run's outcome and times, for ``restore`` after a restart."""
        return {"last_run_ts": self.value(f"{PREFIX}_last_run_timestamp_seconds"),
                "last_success_ts": self.value(f"{PREFIX}_last_success_timestamp_seconds"),
                "last_outcome": self._last_outcome}

    def job_missed(self) -> None:
        """A submitted run was missed (past its misfire grace): with ``coalesce`` it ends so, in place of
        ``job_finished`` (the job is not running any more)."""
        self.missed.inc()
        self._pending -= 1
        self.running.set(1 if self._pending > 0 else 0)

    def drift_checked(self, result: str, samples: int, psi: float | None = None, alarm_rate: float | None = None,
                      expected_alarm_rate: float | None = None, records: int = 0) -> None:
        """One drift check: its result, the window's size and, with a verdict, its statistics."""
        self.drift_checks.labels(result=result if result in DRIFT_RESULTS else "error").inc()
        self.drift_samples.set(samples)
        self.drift_records.inc(max(records, 0))
        self.drift_last_check_ts.set(self._clock())
        if psi is not None:
            self.drift_psi.set(psi)
        if alarm_rate is not None:
            self.drift_alarm_rate.set(alarm_rate)
        if expected_alarm_rate is not None:
            self.drift_expected_alarm_rate.set(expected_alarm_rate)

    def drift_triggered(self) -> None:
        self.drift_triggers.inc()

    def set_next_run(self, ts_s: float | None) -> None:
        if ts_s is not None:
            self.next_run_ts.set(ts_s)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value (tests, logs)."""
        return self.registry.get_sample_value(name, labels or {})

    def set_status(self, status: str) -> None:
        """What ``/healthz`` says of the scheduler: starting, ok or stopping (``degraded`` is derived)."""
        if status not in HEALTH_STATUSES:
            raise ValueError(f"health status must be one of {sorted(HEALTH_STATUSES)}, got {status!r}")
        self._status = status

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` document: ``degraded`` (still HTTP 200: the scheduler runs, restarting it
        fixes nothing) while the last finished job failed or raised."""
        status = self._status
        if status == "ok" and self._last_outcome in ("failed", "error"):
            status = "degraded"

        def ts(name: str) -> float | None:
            return self.value(f"{PREFIX}_{name}_timestamp_seconds") or None  # a gauge never set reads 0

        return {"status": status, "job_running": bool(self.value(f"{PREFIX}_job_running")),
                "last_outcome": self._last_outcome, "last_run_ts": ts("last_run"),
                "last_success_ts": ts("last_success"), "next_run_ts": ts("next_run")}

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format the ``Accept`` header asks for: ``(body, content type)``."""
        return encode(self.registry, accept)

    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve ``/metrics`` and ``/healthz`` in a daemon thread; the port it listens on."""
        return self._http.start(host, port)

    def stop_http(self) -> None:
        self._http.stop()
