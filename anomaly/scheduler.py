"""The retraining scheduler: one per deployment, a persistent schedule, never two retrains at once.

- APScheduler 3.11 ``BackgroundScheduler`` with a SQLAlchemy job store in SQLite
  (``scheduler.job_store``, default ``mlruns/scheduler.db``): the schedule and the next run time
  survive a restart. One job, id ``JOB_ID``, a module-level function referenced by name, with
  ``coalesce=True`` (missed runs become one run), ``max_instances=1`` and ``misfire_grace_time``
  (a run missed by longer while the scheduler was down is skipped and counted, not run late).
- On start the stored job is kept when its function and trigger are unchanged (so a restart keeps
  its next run time and a missed run runs once); a changed trigger replaces it
  (``replace_existing=True``).
- Exactly one scheduler: ``SchedulerLock`` takes an exclusive ``flock`` on ``<job_store>.lock`` for
  the scheduler's lifetime; a second scheduler on the same store exits with
  "another scheduler holds <lockfile> (pid N); exiting" (``SchedulerLocked``, exit code 2). APScheduler
  itself would let two processes sharing a store both run every job (DESIGN §5).
- Never two retrains at once, even with ``anomaly retrain`` by hand: ``run_retrain`` (the path both
  take) holds ``<job_store>.retrain.lock`` while it runs; a busy lock is a logged skip.
- Job start, success, failure and misfire are logged by event listeners and counted in
  ``SchedulerMetrics`` (Prometheus).

Must not: decide anything about retraining (``anomaly.retrain`` does).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from anomaly.config import SchedulerSettings, Settings
from anomaly.errors import AnomalyError
from anomaly.scheduler_metrics import SchedulerMetrics

log = logging.getLogger(__name__)

JOB_ID = "anomaly-retrain"  # explicit, so a restart finds (and replaces) the same job
JOB_FUNC = "anomaly.scheduler:retrain_job"  # by reference: the store keeps the name, not the code
SHUTDOWN_POLL_S = 0.5  # how often the foreground loop looks at its stop event


class SchedulerLocked(AnomalyError):
    """Another process holds the lock (another scheduler, or a retrain in progress)."""

    def __init__(self, path: Path, pid: int | None, what: str = "scheduler") -> None:
        self.path, self.pid = path, pid
        super().__init__(f"another {what} holds {path} (pid {pid if pid is not None else '?'}); exiting")


# --- locks ---------------------------------------------------------------------------------------

class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path`` holding the owner's pid.

    The kernel drops the lock when the process dies, so a crashed scheduler never leaves a stale lock.
    """

    def __init__(self, path: str | Path, what: str = "scheduler") -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise SchedulerLocked(self.path, pid, self.what) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def lock_path(job_store: str | Path) -> Path:
    return Path(f"{job_store}.lock")


def retrain_lock_path(job_store: str | Path) -> Path:
    return Path(f"{job_store}.retrain.lock")


# --- the job -------------------------------------------------------------------------------------

def run_retrain(settings: Settings, **kwargs: Any) -> Any:
    """One retraining cycle under the retrain lock: what ``anomaly retrain`` and the scheduled job run.
    Returns the ``RetrainResult``; a busy lock gives status ``skipped``."""
    from anomaly.retrain import RetrainResult, run_cycle

    lock = FileLock(retrain_lock_path(settings.scheduler.job_store), what="retrain")
    try:
        lock.acquire()
    except SchedulerLocked as exc:
        log.warning("retrain skipped: %s", exc)
        return RetrainResult("skipped", f"a retrain is already running ({exc})")
    try:
        return run_cycle(settings, **kwargs)
    finally:
        lock.release()


def retrain_job(config: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The scheduled job (module level, referenced by ``JOB_FUNC``). The configuration is read when
    the job runs: the TOML file ``config``, the ``ANOMALY_*`` environment of the scheduler process,
    then ``overrides`` (the command line's). The store keeps only these plain values: no code objects,
    and no secrets from the file or the environment."""
    from anomaly.config import load_config

    return run_retrain(load_config(config, overrides=overrides)).to_dict()


def settings_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    """Settings as the plain nested dict the job store keeps (``build_settings`` reads it back)."""
    return {section.name: dataclasses.asdict(getattr(settings, section.name))
            for section in dataclasses.fields(settings)}


# --- the scheduler -------------------------------------------------------------------------------

def trigger_for(s: SchedulerSettings) -> tuple[Any, str]:
    """The APScheduler trigger and a fingerprint of it (stored as the job's name)."""
    if s.trigger == "cron":
        from apscheduler.triggers.cron import CronTrigger

        return CronTrigger.from_crontab(s.cron, timezone=s.timezone), f"cron {s.cron} {s.timezone}"
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(seconds=s.interval_s, timezone=s.timezone), f"every {s.interval_s:g} s"


class RetrainScheduler:
    """Holds the lock, the APScheduler instance and the metrics. ``start`` / ``stop``, or ``run``."""

    def __init__(self, settings: SchedulerSettings, job_kwargs: Mapping[str, Any], *, func: str = JOB_FUNC,
                 metrics: SchedulerMetrics | None = None) -> None:
        self.settings, self.job_kwargs, self.func = settings, dict(job_kwargs), func
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        self.lock = FileLock(lock_path(settings.job_store))
        self.scheduler: Any = None
        self._lock_guard = threading.Lock()

    def start(self) -> None:
        """Take the lock (``SchedulerLocked`` if another scheduler has it), open the store, make sure the
        job is there, and start running it."""
        from apscheduler.events import (EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES,
                                        EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED)
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        self.lock.acquire()
        try:
            store = Path(self.settings.job_store)
            store.parent.mkdir(parents=True, exist_ok=True)
            self.scheduler = BackgroundScheduler(
                jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{store}")},
                executors={"default": ThreadPoolExecutor(1)},  # one worker thread: one retrain at a time
                job_defaults={"coalesce": True, "max_instances": 1,
                              "misfire_grace_time": self.settings.misfire_grace_s},
                timezone=self.settings.timezone)
            self.scheduler.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
                                        | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
            self.scheduler.start(paused=True)
            self._ensure_job()
            self.scheduler.resume()
        except BaseException:
            self._shutdown(wait=False)
            raise

    def _ensure_job(self) -> None:
        trigger, fingerprint = trigger_for(self.settings)
        name = f"{self.func} {fingerprint}"
        job = self.scheduler.get_job(JOB_ID)
        existed = job is not None
        if job is not None and job.name == name:
            # Same function and trigger: keep the stored next run time (a missed run still runs, once).
            job = self.scheduler.modify_job(JOB_ID, kwargs=self.job_kwargs)
            log.info("scheduler: kept stored job %s (%s), next run %s", JOB_ID, fingerprint, job.next_run_time)
        else:
            job = self.scheduler.add_job(self.func, trigger, id=JOB_ID, name=name, kwargs=self.job_kwargs,
                                         replace_existing=True, coalesce=True, max_instances=1,
                                         misfire_grace_time=self.settings.misfire_grace_s)
            log.info("scheduler: %s job %s (%s), next run %s", "replaced" if existed else "added", JOB_ID, fingerprint,
                     job.next_run_time)
        self._update_next_run()

    def _update_next_run(self) -> None:
        job = self.scheduler.get_job(JOB_ID) if self.scheduler is not None else None
        if job is not None and job.next_run_time is not None:
            self.metrics.set_next_run(job.next_run_time.timestamp())

    def _on_event(self, event: Any) -> None:
        from apscheduler.events import (EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES,
                                        EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED)

        code = event.code
        if code == EVENT_JOB_SUBMITTED:
            log.info("scheduler: job %s started (scheduled for %s)", event.job_id, _first(event.scheduled_run_times))
            self.metrics.job_started()
        elif code == EVENT_JOB_EXECUTED:
            retval = event.retval if isinstance(event.retval, dict) else {}
            status, reason = str(retval.get("status", "ok")), retval.get("reason", "")
            outcome = status if status in ("promoted", "kept", "skipped", "failed") else "ok"
            if status == "failed":
                log.error("scheduler: job %s failed: %s", event.job_id, reason)
            else:
                log.info("scheduler: job %s finished: %s %s", event.job_id, status, reason)
            seconds = retval.get("seconds")
            self.metrics.job_finished(outcome, seconds if isinstance(seconds, (int, float)) else None)
        elif code == EVENT_JOB_ERROR:
            log.error("scheduler: job %s raised %r", event.job_id, event.exception)
            self.metrics.job_finished("error")
        elif code == EVENT_JOB_MISSED:
            log.warning("scheduler: job %s missed its run at %s (over misfire_grace_s=%s); skipped",
                        event.job_id, event.scheduled_run_time, self.settings.misfire_grace_s)
            self.metrics.job_missed()
        elif code == EVENT_JOB_MAX_INSTANCES:
            log.warning("scheduler: job %s still running; this run is skipped", event.job_id)
        try:
            self._update_next_run()
        except Exception:  # never let metrics bookkeeping disturb the scheduler
            log.debug("could not read the next run time", exc_info=True)

    def next_run_time(self) -> Any:
        job = self.scheduler.get_job(JOB_ID)
        return job.next_run_time if job is not None else None

    def stop(self, wait: bool = True) -> None:
        """Stop scheduling (a running job finishes when ``wait``), close the store, drop the lock."""
        self._shutdown(wait)

    def _shutdown(self, wait: bool) -> None:
        with self._lock_guard:
            try:
                if self.scheduler is not None and self.scheduler.running:
                    self.scheduler.shutdown(wait=wait)
            finally:
                self.scheduler = None
                self.lock.release()

    def run(self, stop: threading.Event, run_for_s: float | None = None) -> None:
        """``start``, then wait until ``stop`` is set (or ``run_for_s`` passed), then ``stop``."""
        self.start()
        deadline = None if run_for_s is None else time.monotonic() + run_for_s
        try:
            while not stop.wait(SHUTDOWN_POLL_S):
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            self.stop(wait=True)


def _first(items: Any) -> Any:
    return items[0] if items else None
