"""The retraining scheduler: one per deployment, a persistent schedule, never two retrains at once.

- APScheduler 3.11 ``BackgroundScheduler`` with a SQLAlchemy job store in SQLite
  (``scheduler.job_store``, default ``mlruns/scheduler.db``): the schedule and the next run time
  survive a restart. One job, id ``JOB_ID``, a module-level function referenced by name, with
  ``coalesce=True`` (missed runs become one run), ``max_instances=1`` and ``misfire_grace_time``
  (a run missed by longer while the scheduler was down is skipped and counted, not run late).
- On start the stored job is kept when its function and trigger are unchanged (so a restart keeps
  its next run time and a missed run runs once); a changed trigger replaces it
  (``replace_existing=True``).
- Exactly one scheduler: a ``FileLock`` (``anomaly.locks``) takes an exclusive ``flock`` on ``<job_store>.lock`` for
  the scheduler's lifetime; a second scheduler on the same store exits with
  "another scheduler holds <lockfile> (pid N); exiting" (``Locked``, exit code 2). APScheduler
  itself would let two processes sharing a store both run every job (DESIGN §5).
- Never two retrains at once, even with ``anomaly retrain`` by hand: ``run_retrain`` (the path both
  take) holds ``<job_store>.retrain.lock`` while it runs; a busy lock is a logged skip.
- Job start, success, failure and misfire are logged by event listeners and counted in
  ``SchedulerMetrics`` (Prometheus).
- Drift (``[drift]``, off by default): a second, in-memory interval job (id ``DRIFT_JOB_ID``, its own
  executor thread, every ``drift.check_interval_s``) reads the new records of the worker's scores
  topic (``ScoreReader``: consumer group ``drift.group_id``, partitions assigned by hand, resuming from
  its committed offsets, at most ``drift.max_records_per_check`` records, stopping when idle; nothing
  asks the broker where the end is, DESIGN §5), keeps the latest ``drift.window`` scores of the
  current champion version and compares them with the champion's validation scores
  (``anomaly.drift``). On drift, outside the cooldown and while no retrain runs, it moves the stored
  retrain job's next run to now with ``trigger="drift: ..."``: the early retrain is the very same job
  (same lock, listener and metrics; one executor thread, so never two at once), and the interval
  schedule continues from it.

Must not: decide anything about retraining (``anomaly.retrain`` does) or about drift (``anomaly.drift``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from datetime import timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from apscheduler.triggers.base import BaseTrigger

from anomaly.config import SchedulerSettings, Settings, canonical_store_uri
from anomaly.crontab import cron_field_sets
from anomaly.drift import Assessment, DriftBounds, DriftGate, Reference, ScoreWindow, parse_score_record
from anomaly.errors import AnomalyError, ConfigError, TrainingAbandoned
from anomaly.locks import FileLock, Locked, lock_folder
from anomaly.scheduler_metrics import SchedulerMetrics

log = logging.getLogger(__name__)

JOB_ID = "anomaly-retrain"  # explicit, so a restart finds (and replaces) the same job
JOB_FUNC = "anomaly.scheduler:retrain_job"  # by reference: the store keeps the name, not the code
SHUTDOWN_POLL_S = 0.5  # how often the foreground loop looks at its stop event
DRIFT_JOB_ID = "anomaly-drift-check"  # in the memory store: its state (the score window) lives in this process
DRIFT_READ_TIMEOUT_S = 60.0  # longest a drift check spends reading, whatever the record bound


# --- locks (anomaly.locks) -----------------------------------------------------------------------

def lock_path(job_store: str | Path) -> Path:
    return Path(f"{job_store}.lock")


def retrain_lock_path(job_store: str | Path) -> Path:
    return Path(f"{job_store}.retrain.lock")


def registry_lock_path(settings: Settings) -> Path:
    """The retrain lock of one registered model (in ``mlflow.lock_dir``, by default the temp folder; beside
    the job store's own): a retrain by hand and a scheduler with another job store (``anomaly up``'s is its
    own) share it."""
    import hashlib

    uri = canonical_store_uri(settings.mlflow.registry_uri or settings.mlflow.tracking_uri)
    digest = hashlib.sha256(f"{uri}\n{settings.mlflow.model_name}".encode()).hexdigest()[:16]
    return lock_folder(settings.mlflow.lock_dir) / f"anomaly-retrain-{digest}.lock"


def last_run_path(job_store: str | Path) -> Path:
    """The last job's outcome and times, beside the job store, so metrics and health survive a restart."""
    return Path(f"{job_store}.last.json")


# --- the job -------------------------------------------------------------------------------------

def run_retrain(settings: Settings, **kwargs: Any) -> Any:
    """One retraining cycle under the retrain lock: what ``anomaly retrain`` and the scheduled job run.
    Returns the ``RetrainResult``; a busy lock gives status ``skipped``."""
    from anomaly.retrain import RetrainResult, run_cycle

    locks = [FileLock(retrain_lock_path(settings.scheduler.job_store), what="retrain"),
             # 0o666, as the alias locks: in a folder every user shares, the first user's 0o644 shut out the rest
             FileLock(registry_lock_path(settings), what=f"retrain of {settings.mlflow.model_name}",
                      field="mlflow.lock_dir", mode=0o666)]
    held: list[FileLock] = []
    try:
        for lock in locks:
            try:
                held.append(lock.acquire())
            except Locked as exc:
                log.warning("retrain skipped: %s", exc)
                return RetrainResult("skipped", f"a retrain is already running ({exc})")
        result = run_cycle(settings, **kwargs)
        prune_after(settings, result)
        return result
    finally:
        for lock in reversed(held):
            lock.release()


def prune_after(settings: Settings, result: Any) -> None:
    """After a cycle that registered a challenger, the refused challengers beyond
    ``retrain.keep_challengers`` leave the registry (``registry.prune``); how many goes into the result's
    data (``versions_pruned``; ``versions_left``: those an error left). A failure is a warning: the
    cycle's outcome stands."""
    from anomaly import registry

    keep = settings.retrain.keep_challengers
    if keep < 0 or not result.challenger_version:
        return
    try:
        pruned = registry.prune(settings.mlflow.model_name, keep, unserved_alias(settings))
    except Exception as exc:
        log.warning("retrain: the refused challengers beyond retrain.keep_challengers = %d could not be deleted: %s",
                    keep, exc)
        return
    result.data["versions_pruned"] = len(pruned.deleted)
    if pruned.failed:
        result.data["versions_left"] = len(pruned.failed)
    for version, why in pruned.skipped.items():
        log.log(logging.WARNING if version in pruned.failed else logging.INFO, "retrain: %s v%s left: %s",
                settings.mlflow.model_name, version, why)


def unserved_alias(settings: Settings) -> str | None:
    """The alias whose holders did not serve for it (``retention``): the challenger's, unless workers
    follow it (``worker.model_alias``, a canary fleet): then None, and having held it is having served."""
    challenger = settings.mlflow.challenger_alias
    return None if settings.worker.model_alias == challenger else challenger


def retrain_job(config: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                trigger: str = "schedule") -> dict[str, Any]:
    """The scheduled job (module level, referenced by ``JOB_FUNC``). The configuration is read when
    the job runs: the TOML file ``config``, the ``ANOMALY_*`` environment of the scheduler process,
    then ``overrides`` (the command line's). The store keeps only these plain values: no code objects,
    and no secrets from the file or the environment. ``trigger``: schedule, or ``drift: <why>`` when
    the drift check moved the run forward."""
    from anomaly.config import load_config

    return run_retrain(load_config(config, overrides=overrides), trigger=trigger).to_dict()


def settings_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    """Settings as the plain nested dict the job store keeps (``build_settings`` reads it back)."""
    return {section.name: dataclasses.asdict(getattr(settings, section.name))
            for section in dataclasses.fields(settings)}


# --- drift: the I/O around anomaly.drift ---------------------------------------------------------

class ScoreReader:
    """New records of the scores topic for one consumer group, read in bounded steps.

    Partitions are assigned by hand (no group join, no rebalance); the group's committed offsets say
    where the previous check stopped (a new group starts at the oldest record). After each read the
    positions are committed, so a restarted scheduler does not read the same scores again. Used from
    one thread only (kafka-python's consumer is not thread safe).
    """

    def __init__(self, bootstrap_servers: str, topic: str, group_id: str,
                 client_options: Mapping[str, Any] | None = None) -> None:
        self.bootstrap_servers, self.topic, self.group_id = bootstrap_servers, topic, group_id
        self.client_options = dict(client_options or {})
        self._consumer: Any = None
        self._interrupted = threading.Event()

    def read(self, max_records: int, idle_s: float, timeout_s: float = DRIFT_READ_TIMEOUT_S) -> list[bytes]:
        """Values of up to ``max_records`` new records; stops after ``idle_s`` without one. ``[]`` while
        the topic does not exist (it is never created here)."""
        from anomaly import kafka_io

        if self._consumer is None:
            options = kafka_io.consumer_options(self.bootstrap_servers, self.group_id,
                                                client_options=self.client_options)
            options.update(enable_auto_commit=False, allow_auto_create_topics=False)
            kafka_io.check_tls_files(options)
            # on a helper thread: a stop (``interrupt``) waits no longer for kafka-python's bootstrap retries
            self._consumer = kafka_io.unless_stopped(self._interrupted, kafka_io.KafkaConsumer, **options)
        consumer = self._consumer
        partitions = consumer.partitions_for_topic(self.topic)
        assigned = {tp.partition for tp in consumer.assignment()}
        if not partitions and not assigned:
            consumer.topics()  # refresh metadata: the topic may appear by the next check
            return []
        if partitions and set(partitions) - assigned:  # partitions added to the topic since: read them too
            consumer.assign([kafka_io.TopicPartition(self.topic, p) for p in sorted(set(partitions) | assigned)])
        try:
            return self._read(consumer, max_records, idle_s, timeout_s)
        except Exception:
            # The consumer's positions moved past records now lost with this read: a fresh consumer starts
            # from the group's commit, so the next check reads them (they were skipped until a restart).
            self._drop_consumer()
            raise

    def _read(self, consumer: Any, max_records: int, idle_s: float, timeout_s: float) -> list[bytes]:
        from anomaly import kafka_io

        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        # The idle clock starts once the read is where the topic ended as it began: a slow first fetch
        # does not pass for a topic with nothing new (the check would find nothing to judge, this time).
        tps = list(consumer.assignment())
        try:
            ends = consumer.end_offsets(tps, timeout_ms=int(min(timeout_s, 10.0) * 1000)) if tps else {}
        except Exception as exc:  # not known: the idle clock starts at once, as it did
            log.debug("drift: the scores topic's end offsets could not be read: %s", exc)
            ends = {}
        behind = kafka_io.still_behind(consumer, ends)
        last = time.monotonic()
        while len(values) < max_records and not self._interrupted.is_set():
            now = time.monotonic()
            if now >= deadline or (not behind and now - last >= idle_s):
                break
            batch = consumer.poll(timeout_ms=int(min(200, idle_s * 1000)) or 1,
                                  max_records=min(5000, max_records - len(values)))
            for records in batch.values():
                if records:
                    last = time.monotonic()
                values.extend(r.value for r in records)
            if behind:
                behind = kafka_io.still_behind(consumer, behind)
                if not behind:
                    last = time.monotonic()
        if values:
            consumer.commit()
        return values

    def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        try:
            if consumer is not None:
                consumer.close(autocommit=False)
        except Exception:
            log.debug("closing the drift reader's consumer failed", exc_info=True)

    def interrupt(self) -> None:
        """End a read in progress within one poll (the scheduler is stopping); thread safe."""
        self._interrupted.set()

    def close(self) -> None:
        self._interrupted.clear()  # a reader opened again reads again
        self._drop_consumer()


def reference_for_version(model_name: str, version: str) -> Reference | None:
    """The drift reference of a registered version, from its training run's metrics and parameters."""
    from anomaly import registry
    from anomaly.drift import reference_from_run

    c = registry.client()
    mv = c.get_model_version(model_name, str(version))
    if not mv.run_id:
        return None
    run = c.get_run(mv.run_id)
    return reference_from_run(str(version), dict(run.data.metrics), dict(run.data.params))


class DriftMonitor:
    """One drift check at a time: champion version → new live scores → verdict → metrics and logs.

    ``check()`` returns the ``Assessment`` (or None when there is no champion or no reference); the
    scheduler asks ``gate`` whether a drift verdict may start a retrain. ``reader``, ``resolver``
    (name, alias → version) and ``reference_for`` (name, version → Reference) are injectable.
    """

    def __init__(self, settings: Settings, metrics: SchedulerMetrics | None = None, *, reader: Any = None,
                 resolver: Any = None, reference_for: Any = None) -> None:
        d, k = settings.drift, settings.kafka
        if not k.scores_topic:
            raise AnomalyError("the drift check needs kafka.scores_topic (the workers' per-window scores)")
        self.settings = settings
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        self.bounds = DriftBounds(psi_threshold=d.psi_threshold, max_alarm_rate=d.max_alarm_rate,
                                  min_samples=d.min_samples)
        self.window = ScoreWindow(d.window, model_name=settings.mlflow.model_name)
        self.gate = DriftGate(d.cooldown_s)
        self.reader = reader if reader is not None else ScoreReader(k.bootstrap_servers, k.scores_topic, d.group_id,
                                                                   k.client_options)
        self._resolver = resolver
        self._reference_for = reference_for if reference_for is not None else reference_for_version
        self._references: dict[str, Reference | None] = {}
        self._records_seen = 0
        self._warned_empty = False
        self._warned_shared = False  # another model's scores seen in the topic: said once

    def _champion_version(self) -> str | None:
        ml = self.settings.mlflow
        if self._resolver is not None:
            return self._resolver(ml.model_name, ml.champion_alias)
        from anomaly import registry, tracking

        tracking.configure_from(ml)
        return registry.alias_version(ml.model_name, ml.champion_alias)

    def _reference(self, version: str) -> Reference | None:
        if version not in self._references:  # a version's training run never changes: once per version
            if len(self._references) >= 8:  # the champion's, and a few it was rolled from: not one per promotion
                del self._references[next(iter(self._references))]
            self._references[version] = self._reference_for(self.settings.mlflow.model_name, version)
        return self._references[version]

    def check(self) -> Assessment | None:
        d, ml = self.settings.drift, self.settings.mlflow
        version = self._champion_version()
        if version is None:
            log.warning("drift: %s has no @%s; nothing to check", ml.model_name, ml.champion_alias)
            self.metrics.drift_checked("no_reference", 0)
            return None
        self.window.watch(version)
        values = self.reader.read(d.max_records_per_check, d.read_idle_s)
        for value in values:
            record = parse_score_record(value)
            if record is not None:
                self.window.add(record)
        self._records_seen += len(values)
        if len(values) >= d.max_records_per_check:
            log.warning("drift: read the bound of %d score records in one check; the check is behind the "
                        "workers (raise drift.max_records_per_check or check more often)", d.max_records_per_check)
        if self.window.other_models and not self._warned_shared:
            self._warned_shared = True
            log.warning("drift: the scores topic %s also holds other models' scores (%d so far; another asset type's "
                        "workers): this check counts %s's only, but a check of another model in the same consumer "
                        "group (drift.group_id = %s) splits the records with this one: give each model's scheduler "
                        "its own drift.group_id (README \"Several asset types\")", self.settings.kafka.scores_topic,
                        self.window.other_models, ml.model_name, d.group_id)
        if self._records_seen == 0 and not self._warned_empty:
            log.warning("drift: no records in the scores topic %s yet; is kafka.scores_topic set for the workers?",
                        self.settings.kafka.scores_topic)
            self._warned_empty = True
        reference = self._reference(version)
        if reference is None:
            log.warning("drift: %s v%s has no validation scores in its training run; no drift check for it",
                        ml.model_name, version)
            self.metrics.drift_checked("no_reference", len(self.window), records=len(values))
            return None
        from anomaly.drift import assess

        result = assess(self.window.scores(), reference, self.bounds)
        self.metrics.drift_checked(result.verdict, result.samples, result.psi, result.alarm_rate,
                                   result.expected_alarm_rate, records=len(values))
        level = logging.WARNING if result.drifted else logging.INFO
        log.log(level, "drift check: %s (%s; %d new score records)", result.verdict, result.reason, len(values))
        return result

    def interrupt(self) -> None:
        """Cut a read in progress short (a reader without ``interrupt`` finishes its read)."""
        interrupt = getattr(self.reader, "interrupt", None)
        if interrupt is not None:
            interrupt()

    def close(self) -> None:
        self.reader.close()


# --- the scheduler -------------------------------------------------------------------------------

REPEATED_TIMES = 1440  # second-pass times skipped in a row, at most (a minute-by-minute job over a repeated day)


class OnceAWallClockTime(BaseTrigger):
    """A cron trigger with crontab's meaning on the days the clocks change.

    - A wall-clock time the clocks pass twice (the hour repeated when daylight saving ends) fires once:
      APScheduler's cron trigger fires at 02:30 summer time and again at 02:30 winter time, crontab once.
      As in crontab (Vixie cron, cronie), a job whose minute or hour field starts with ``*``
      (``wildcard``) runs in both passes, as it runs every hour.
    - No day is lost when the clocks go forward: APScheduler (3.11) steps its fields by adding wall-clock
      differences to the real time, so after a spring change midnight in Berlin came out as 01:00, did
      not match, and ``0 0 * * *`` skipped a day (``0 0 1 * *`` a month). ``wall`` is the same trigger
      read on the wall clock (its fields in UTC, which never changes); its next time, put in ``zone``, is
      taken where it comes first. A time the clocks skip (02:30 on the spring day) fires just after the
      change (03:30 summer time), as crontab runs it.

    Picklable (the job store keeps it)."""

    def __init__(self, inner: Any, wildcard: bool = False, wall: Any = None, zone: Any = None) -> None:
        self.inner = inner
        self.wildcard = wildcard
        self.wall, self.zone = wall, zone

    def get_next_fire_time(self, previous_fire_time: Any, now: Any) -> Any:
        fire = self.inner.get_next_fire_time(previous_fire_time, now)
        if not getattr(self, "wildcard", False):
            for _ in range(REPEATED_TIMES):  # the second pass skipped as if it had fired
                if fire is None or not second_pass(fire):
                    break
                fire = self.inner.get_next_fire_time(fire, fire)
        wall = self._on_the_wall_clock(previous_fire_time, now)
        if wall is not None and (fire is None or wall < fire):
            return wall
        zone = getattr(self, "zone", None)
        # APScheduler's time in a skipped hour reads 02:30+01:00; the same moment as the clocks show it: 03:30+02:00
        return fire if fire is None or zone is None else fire.astimezone(timezone.utc).astimezone(zone)

    def _on_the_wall_clock(self, previous_fire_time: Any, now: Any) -> Any:
        """The next time by ``wall`` (None without one, or where it lands at or before the previous fire:
        a wall time of the first pass, asked from the second)."""
        wall, zone = getattr(self, "wall", None), getattr(self, "zone", None)
        if wall is None or zone is None:
            return None

        def on_wall(moment: Any) -> Any:
            return None if moment is None else moment.astimezone(zone).replace(tzinfo=timezone.utc)

        found = wall.get_next_fire_time(on_wall(previous_fire_time), on_wall(now))
        if found is None:
            return None
        fire = found.replace(tzinfo=zone).astimezone(timezone.utc).astimezone(zone)  # a skipped time: just after
        if previous_fire_time is not None and fire <= previous_fire_time:
            return None
        return fire

    def __str__(self) -> str:
        return str(self.inner)

    def __repr__(self) -> str:
        return f"OnceAWallClockTime({self.inner!r})"


def second_pass(moment: Any) -> bool:
    """Whether ``moment`` (zone-aware) is the second time its zone's clocks show its wall-clock time (the
    hour repeated when daylight saving ends)."""
    return bool(getattr(moment, "fold", 0)) and moment.replace(fold=0).utcoffset() != moment.utcoffset()


def trigger_for(s: SchedulerSettings) -> tuple[Any, str]:
    """The APScheduler trigger and a fingerprint of it (stored as the job's name)."""
    if s.trigger == "cron":
        from apscheduler.triggers.combining import OrTrigger
        from apscheduler.triggers.cron import CronTrigger

        # "crontab days" in the fingerprint: jobs stored before the days were read as crontab reads them
        # (from_crontab's 0 = Monday; a day of the month AND a weekday) are replaced, not kept.
        field_sets = cron_field_sets(s.cron)
        triggers = [CronTrigger(**fields, timezone=s.timezone) for fields in field_sets]
        on_wall = [CronTrigger(**fields, timezone="UTC") for fields in field_sets]
        minute, hour = s.cron.split()[:2]
        return (OnceAWallClockTime(triggers[0] if len(triggers) == 1 else OrTrigger(triggers),
                                   wildcard=minute.startswith("*") or hour.startswith("*"),
                                   wall=on_wall[0] if len(on_wall) == 1 else OrTrigger(on_wall),
                                   zone=triggers[0].timezone),
                f"cron {s.cron} {s.timezone} (crontab days, fixed times once in a repeated hour, "
                "no day lost when the clocks go forward)")
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(seconds=s.interval_s, timezone=s.timezone), f"every {s.interval_s:g} s"


DEAD_RUN_JOIN_S = 10.0  # a stop waits this long at most for the killed run's leftovers to be ended


class RetrainScheduler:
    """Holds the lock, the APScheduler instance and the metrics. ``start`` / ``stop``, or ``run``."""

    def __init__(self, settings: SchedulerSettings, job_kwargs: Mapping[str, Any], *, func: str = JOB_FUNC,
                 metrics: SchedulerMetrics | None = None, drift: DriftMonitor | None = None,
                 drift_interval_s: float | None = None, pass_trigger: bool | None = None,
                 on_dead_run: Callable[[float], None] | None = None) -> None:
        """``drift`` (with ``drift_interval_s``, default its settings' ``check_interval_s``) adds the drift
        check; ``pass_trigger`` (default: ``func`` is the real job) hands the job a ``trigger`` argument;
        ``on_dead_run(started_ts)`` is called, on a thread of its own, when ``start`` finds that a run started
        then never ended (its process killed): to end what it left behind (its MLflow runs)."""
        self.settings, self.job_kwargs, self.func = settings, dict(job_kwargs), func
        self.on_dead_run = on_dead_run
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        self.lock = FileLock(lock_path(settings.job_store))
        self.scheduler: Any = None
        self._lock_guard = threading.Lock()
        self.drift = drift
        if drift is not None:
            drift.metrics = self.metrics
        self.drift_interval_s = drift_interval_s or (drift.settings.drift.check_interval_s if drift else None)
        self.pass_trigger = (func == JOB_FUNC) if pass_trigger is None else pass_trigger
        self.last_assessment: Assessment | None = None
        self._drift_trigger_ts: float | None = None  # wall clock of the last drift trigger (kept over restarts)
        self._stopping = threading.Event()
        self._drift_busy = threading.Lock()  # held by a drift check, so a stop can wait for it (see _shutdown)
        self._trigger_guard = threading.Lock()  # a trigger and the stop flag: a stop comes before or after it
        self._save_guard = threading.Lock()  # last.json is written from the drift thread and the executor's
        # A run's start (SUBMITTED) and end (EXECUTED, ERROR, MISSED) come on two threads, a quick run's end
        # sometimes first: the running mark in last.json is written, or cleared, under this lock, from the
        # metrics' count of runs started and not ended (``job_running``)
        self._runs_guard = threading.Lock()
        self.failure: str | None = None  # why the scheduling thread ended, had it to (``_watch_main_loop``)
        # a killed run's start whose leftovers ``on_dead_run`` has not yet ended (kept in last.json till it has)
        self._dead_since: float | None = None
        self._dead_run_thread: threading.Thread | None = None
        self._running_mark: float | None = None  # when the run in progress started (last.json's running_since)

    def start(self) -> None:
        """Take the lock (``Locked`` if another scheduler has it), open the store, make sure the
        job is there, and start running it."""
        from apscheduler.events import (EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES,
                                        EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED)
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        self.lock.acquire()
        self._stopping.clear()  # a scheduler started again after a stop checks drift again
        try:
            store = Path(self.settings.job_store)
            store.parent.mkdir(parents=True, exist_ok=True)
            self._restore_last_run()
            self.scheduler = BackgroundScheduler(
                jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{store}"), "memory": MemoryJobStore()},
                executors={"default": ThreadPoolExecutor(1),  # one worker thread: one retrain at a time
                           "drift": ThreadPoolExecutor(1)},  # checks go on while a retrain runs
                job_defaults={"coalesce": True, "max_instances": 1,
                              "misfire_grace_time": self.settings.misfire_grace_s},
                timezone=self.settings.timezone)
            self._watch_main_loop(self.scheduler)
            logging.getLogger("apscheduler.scheduler").addFilter(self._late_submission)
            self.scheduler.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
                                        | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
            self.scheduler.start(paused=True)
            try:  # the stored job's kwargs (a --tracking-uri given by hand) may hold a password
                os.chmod(store, 0o600)
            except OSError:  # not ours to change (another user's store we may write): as it is
                pass
            self._ensure_job()
            self._add_drift_job()
            self.scheduler.resume()
            self.metrics.set_status("ok")
        except BaseException as exc:
            self._shutdown(wait=False)
            from sqlalchemy.exc import DatabaseError

            if isinstance(exc, DatabaseError):  # random bytes, a truncated file: not a readable SQLite store
                raise ConfigError("scheduler.job_store", f"{self.settings.job_store} is not a readable SQLite job "
                                  f"store ({exc.orig or exc}); move it aside to start with a fresh "
                                  "schedule") from exc
            raise

    def _late_submission(self, record: logging.LogRecord) -> bool:
        """A filter on APScheduler's log: a run that fell due while the shutdown waited for the one in progress
        is handed to the executors already shut down, which APScheduler logs as an ERROR with a traceback
        ("cannot schedule new futures after shutdown") at every such stop. Said as what it is instead."""
        if (self._stopping.is_set() and record.getMessage().startswith("Error submitting job")
                and record.exc_info and isinstance(record.exc_info[1], RuntimeError)):
            log.info("scheduler: a run fell due while stopping; not started (the next start runs a missed one)")
            return False
        return True

    def _watch_main_loop(self, scheduler: Any) -> None:
        """Note why APScheduler's scheduling thread ended, should it end by an error. It does not catch one
        writing its store after a run (a full or read-only volume): the thread died, the process lived on,
        scheduled nothing more and said ok. ``failure`` says it; ``anomaly scheduler`` then exits non-zero
        for its supervisor to restart it. (``_main_loop`` of the pinned APScheduler 3.11.3: the thread's
        target, read when it starts.)"""
        loop = scheduler._main_loop
        self.failure = None

        def main_loop() -> None:
            try:
                loop()
            except BaseException as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                log.error("scheduler: the scheduling thread stopped: %s", self.failure, exc_info=True)

        scheduler._main_loop = main_loop

    def _ensure_job(self) -> None:
        trigger, fingerprint = trigger_for(self.settings)
        name = f"{self.func} {fingerprint}"
        job = self.scheduler.get_job(JOB_ID)
        existed = job is not None
        if job is not None and job.name == name:
            # Same function and trigger: keep the stored next run time (a missed run still runs, once).
            job = self.scheduler.modify_job(JOB_ID, kwargs=self.job_kwargs,
                                            misfire_grace_time=self.settings.misfire_grace_s)
            log.info("scheduler: kept stored job %s (%s), next run %s", JOB_ID, fingerprint, job.next_run_time)
        else:
            job = self.scheduler.add_job(self.func, trigger, id=JOB_ID, name=name, kwargs=self.job_kwargs,
                                         replace_existing=True, coalesce=True, max_instances=1,
                                         misfire_grace_time=self.settings.misfire_grace_s)
            log.info("scheduler: %s job %s (%s), next run %s", "replaced" if existed else "added", JOB_ID, fingerprint,
                     job.next_run_time)
        self._update_next_run()

    def _add_drift_job(self) -> None:
        if self.drift is None:
            log.info("scheduler: drift trigger off (drift.enabled = false)")
            return
        from apscheduler.triggers.interval import IntervalTrigger

        s = self.drift.settings
        self.scheduler.add_job(self._drift_check, IntervalTrigger(seconds=self.drift_interval_s), id=DRIFT_JOB_ID,
                               name="drift check", jobstore="memory", executor="drift", replace_existing=True,
                               coalesce=True, max_instances=1, misfire_grace_time=max(int(self.drift_interval_s), 1))
        log.info("scheduler: drift trigger on: scores topic %s, every %g s, window %d (min %d), PSI >= %g or alarm "
                 "rate > %g, cooldown %g s", s.kafka.scores_topic, self.drift_interval_s, s.drift.window,
                 s.drift.min_samples, s.drift.psi_threshold, s.drift.max_alarm_rate, s.drift.cooldown_s)

    def _drift_check(self) -> None:
        """The drift job: one check; on drift (gate permitting) the retrain job runs now."""
        assert self.drift is not None
        with self._drift_busy:
            self._drift_check_locked()

    def _drift_check_locked(self) -> None:
        assert self.drift is not None
        if self._stopping.is_set():
            return
        try:
            result = self.drift.check()
        except Exception as exc:  # a broker or registry hiccup must not stop the checks
            from anomaly.kafka_io import Abandoned

            if isinstance(exc, Abandoned) and self._stopping.is_set():
                log.info("drift check: %s", exc)
                return
            log.warning("drift check failed: %s: %s", type(exc).__name__, exc)
            self.metrics.drift_checked("error", len(self.drift.window))
            return
        self.last_assessment = result
        if result is None or not result.drifted:
            return
        with self._trigger_guard:
            if self._stopping.is_set():
                log.info("drift detected while stopping: no retrain now (%s)", result.reason)
                return
            blocked = self.drift.gate.blocked(time.monotonic())
            if blocked:
                log.info("drift detected, no retrain now: %s", blocked)
                return
            self.drift.gate.triggered(time.monotonic())
            self._drift_trigger_ts = time.time()
            self._save_last_run()  # before the run: a retrain that kills the process must not lose the cooldown
            self.metrics.drift_triggered()
            self.trigger_now(f"drift: {result.reason}")

    def trigger_now(self, reason: str) -> None:
        """Run the stored retrain job now (recorded as ``trigger=reason``); its schedule continues from it."""
        from datetime import datetime, timezone

        changes: dict[str, Any] = {"next_run_time": datetime.now(timezone.utc)}
        if self.pass_trigger:
            changes["kwargs"] = {**self.job_kwargs, "trigger": reason}
        log.warning("scheduler: retraining now (%s)", reason)
        self.scheduler.modify_job(JOB_ID, **changes)

    def _update_next_run(self) -> None:
        job = self.scheduler.get_job(JOB_ID) if self.scheduler is not None else None
        if job is not None and job.next_run_time is not None:
            self.metrics.set_next_run(job.next_run_time.timestamp())

    def _save_last_run(self, running_since: float | None = None) -> None:
        """Write the last run's outcome and times (``last.json``); ``running_since``: a run started then
        and has not ended (a restart that finds it there counts it as interrupted)."""
        path = last_run_path(self.settings.job_store)
        try:
            with self._save_guard:
                tmp = path.with_name(path.name + ".tmp")
                last = self.metrics.last_run()
                if self._drift_trigger_ts is not None:
                    last["drift_trigger_ts"] = self._drift_trigger_ts
                if self._dead_since is not None:
                    last["dead_since"] = self._dead_since
                if running_since is not None:
                    last["running_since"] = running_since
                tmp.write_text(json.dumps(last), encoding="utf-8")
                tmp.replace(path)
        except OSError as exc:  # bookkeeping: never let it disturb the scheduler
            log.warning("scheduler: could not save the last run to %s: %s", path, exc)

    def _restore_last_run(self) -> None:
        path = last_run_path(self.settings.job_store)
        try:
            last = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("scheduler: ignoring %s: %s", path, exc)
            return
        if isinstance(last, dict):
            self.metrics.restore(last)
            self._restore_cooldown(last)
            started = _saved_time(last, "running_since")
            if started is not None:
                # APScheduler moved the job's next run on when it started this one; nothing else says it died
                log.error("scheduler: the retrain started at %s never finished (its process was killed: out of "
                          "memory, or a stop's grace ran out); counted as an error",
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)))
                self.metrics.interrupted(started)
                if self.on_dead_run is not None:
                    self._dead_since = started
            dead = _saved_time(last, "dead_since")  # one a start before this could not end (MLflow down): again
            if self.on_dead_run is not None and dead is not None:  # (a run killed since too: from the older start)
                self._dead_since = min(dead, self._dead_since or math.inf)
            if started is not None:  # said once; saved with the older dead run's start, should this one not end
                self._save_last_run()
            if self._dead_since is not None:  # MLflow may be slow or down: the schedule does not wait for it
                self._dead_run_thread = threading.Thread(target=self._end_dead_run, args=(self._dead_since,),
                                                         name="scheduler-dead-run", daemon=True)
                self._dead_run_thread.start()

    def _end_dead_run(self, started: float) -> None:
        """``on_dead_run(started)``; once it has succeeded, last.json forgets the dead run."""
        try:
            self.on_dead_run(started)
        except Exception as exc:  # bookkeeping: never let it disturb the scheduler; the next start tries again
            log.warning("scheduler: could not end what the killed retrain left behind (tried again at the next "
                        "start): %s: %s", type(exc).__name__, exc)
            return
        self._dead_since = None
        with self._runs_guard:  # the running mark, if a run is on, stays as the executor's events left it
            self._save_last_run(running_since=self._running_mark)

    def _restore_cooldown(self, last: Mapping[str, Any]) -> None:
        """The drift gate's cooldown over a restart: the last trigger and the last retrain's end (wall clock,
        as saved) on this process's monotonic clock. Without it a restarted scheduler (one killed by its own
        retrain, say) retrained on the first drifting check, with no drift.cooldown_s between."""
        now = time.time()  # a time saved while the clock ran ahead must not stretch the cooldown past it
        trigger, ended = (min(float(v), now) if isinstance(v, (int, float)) else None
                          for v in (last.get("drift_trigger_ts"), last.get("last_run_ts")))
        if trigger is not None and trigger > 0:
            self._drift_trigger_ts = trigger
        if self.drift is None:
            return
        offset = now - time.monotonic()  # a saved wall time minus this is the same moment, monotonic
        if trigger is not None and trigger > 0:
            self.drift.gate.last_trigger = trigger - offset
        if ended is not None and ended > 0:
            self.drift.gate.last_retrain_end = ended - offset

    def _on_event(self, event: Any) -> None:
        from apscheduler.events import (EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES,
                                        EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED)

        code = event.code
        if event.job_id == DRIFT_JOB_ID:
            if code == EVENT_JOB_ERROR:
                log.error("scheduler: drift check raised %r", event.exception)
            elif code == EVENT_JOB_MISSED:
                log.info("scheduler: a drift check was skipped (the previous one was still running)")
            return
        if code == EVENT_JOB_SUBMITTED:
            if self.drift is not None:
                self.drift.gate.retrain_started()
            self._restore_job_kwargs()
            log.info("scheduler: job %s started (scheduled for %s)", event.job_id, _first(event.scheduled_run_times))
            with self._runs_guard:
                self.metrics.job_started()
                if self.metrics.job_running:
                    self._running_mark = time.time()
                    self._save_last_run(running_since=self._running_mark)
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
            self._retrain_finished()
        elif code == EVENT_JOB_ERROR:
            if isinstance(event.exception, TrainingAbandoned):  # told to stop now: not a failure of the run
                log.warning("scheduler: job %s abandoned (%s); its MLflow run ends KILLED", event.job_id,
                            event.exception)
                self.metrics.job_finished("abandoned")
            else:
                log.error("scheduler: job %s raised %r", event.job_id, event.exception)
                self.metrics.job_finished("error")
            self._retrain_finished()
        elif code == EVENT_JOB_MISSED:
            log.warning("scheduler: job %s missed its run at %s (over misfire_grace_s=%s); skipped",
                        event.job_id, event.scheduled_run_time, self.settings.misfire_grace_s)
            self.metrics.job_missed()  # a missed run ends its submission: nothing runs any more
            if self.drift is not None:
                self.drift.gate.retrain_missed()
        elif code == EVENT_JOB_MAX_INSTANCES:
            log.warning("scheduler: job %s still running; this run is skipped", event.job_id)
        if code in (EVENT_JOB_EXECUTED, EVENT_JOB_ERROR, EVENT_JOB_MISSED):
            with self._runs_guard:  # saved without the running mark its start left (a missed run's too)
                self._running_mark = None
                self._save_last_run()
            # These come on the executor's thread, as the job ends (a missed run: as the executor finds it
            # too late). APScheduler's shutdown holds its job-store lock while it waits for that thread, so
            # reading the store here would deadlock a stop that comes while a job runs (a SIGTERM
            # mid-retrain hung): read it on a helper thread instead.
            threading.Thread(target=self._update_next_run_quietly, name="scheduler-next-run", daemon=True).start()
        else:  # on the scheduler's own thread, which holds that (re-entrant) lock already
            self._update_next_run_quietly()

    def _update_next_run_quietly(self) -> None:
        try:
            self._update_next_run()
        except Exception:  # never let metrics bookkeeping disturb the scheduler
            log.debug("could not read the next run time", exc_info=True)

    def _restore_job_kwargs(self) -> None:
        """After a drift-triggered run was handed to the executor (which keeps its own copy), the
        stored job goes back to its plain arguments, so the next scheduled run says ``schedule``."""
        try:
            job = self.scheduler.get_job(JOB_ID) if self.scheduler is not None else None
            if job is not None and dict(job.kwargs) != self.job_kwargs:
                self.scheduler.modify_job(JOB_ID, kwargs=self.job_kwargs)
        except Exception:
            log.warning("could not reset the retrain job's arguments", exc_info=True)

    def _retrain_finished(self) -> None:
        """A retrain ended: the cooldown starts, and the drift window starts over (fresh evidence only)."""
        if self.drift is not None:
            self.drift.gate.retrain_finished(time.monotonic())
            self.drift.window.clear()

    def next_run_time(self) -> Any:
        job = self.scheduler.get_job(JOB_ID)
        return job.next_run_time if job is not None else None

    def stop(self, wait: bool = True) -> None:
        """Stop scheduling (a running job finishes when ``wait``), close the store, drop the lock."""
        self._shutdown(wait)

    def _shutdown(self, wait: bool) -> None:
        with self._lock_guard:
            self.metrics.set_status("stopping")
            with self._trigger_guard:  # a trigger under way completes first; none starts after
                self._stopping.set()
            try:
                if self.scheduler is not None and self.scheduler.running:
                    if wait and self.drift is not None:
                        # A check that triggers moves the retrain job in the store, under APScheduler's store
                        # lock, which its shutdown holds while it waits for the check's thread: a stop during
                        # a drifting check hung. So the check is cut short and waited for first (it then
                        # triggers nothing: _stopping is set).
                        self.drift.interrupt()
                        with self._drift_busy:
                            pass
                    self.scheduler.shutdown(wait=wait)
            finally:
                self.scheduler = None
                logging.getLogger("apscheduler.scheduler").removeFilter(self._late_submission)
                if self._dead_run_thread is not None:  # a little while to end a dead run's leftovers; else next start
                    self._dead_run_thread.join(DEAD_RUN_JOIN_S)
                if self.drift is not None:
                    try:
                        self.drift.close()
                    except Exception:
                        log.debug("closing the drift reader failed", exc_info=True)
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


def _saved_time(last: Mapping[str, Any], key: str) -> float | None:
    """``last[key]`` when it is an epoch time (a positive number, not a bool), else None."""
    value = last.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _first(items: Any) -> Any:
    return items[0] if items else None
