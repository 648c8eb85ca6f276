"""Scheduler pieces without a store or a broker: the lock, the metrics, triggers, settings round trip,
and the [retrain]/[scheduler] configuration rules."""

from __future__ import annotations

import os

import pytest

from anomaly.config import Settings, build_settings
from anomaly.errors import ConfigError
from anomaly.locks import FileLock, Locked
from anomaly.scheduler import lock_path, retrain_lock_path, settings_dict, trigger_for
from anomaly.scheduler_metrics import SchedulerMetrics


def test_file_lock_is_exclusive_and_names_the_holder(tmp_path):
    path = tmp_path / "store.db.lock"
    first = FileLock(path).acquire()
    try:
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(Locked) as info:
            FileLock(path).acquire()
        assert str(info.value) == f"another scheduler holds {path} (pid {os.getpid()})"
        assert info.value.pid == os.getpid()
    finally:
        first.release()
    with FileLock(path) as again:  # released: free to take
        assert again.held
    assert not again.held


def test_lock_paths_sit_beside_the_store():
    assert str(lock_path("mlruns/scheduler.db")) == "mlruns/scheduler.db.lock"
    assert str(retrain_lock_path("mlruns/scheduler.db")) == "mlruns/scheduler.db.retrain.lock"


def test_a_retrain_by_hand_waits_for_none_but_skips_while_the_same_model_retrains_under_another_store(tmp_path,
                                                                                                      monkeypatch):
    # anomaly up's scheduler keeps its own job store; a retrain by hand (another store) of the same model
    # must still not run beside its job
    from anomaly.scheduler import registry_lock_path, run_retrain

    monkeypatch.chdir(tmp_path)
    ran = []
    from anomaly.retrain import RetrainResult

    monkeypatch.setattr("anomaly.retrain.run_cycle",
                        lambda settings, **kw: ran.append(settings) or RetrainResult("skipped", "ran"))
    mine = build_settings({"scheduler": {"job_store": str(tmp_path / "mine.db")},
                           "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "model_name": "pumps"}})
    ups = build_settings({"scheduler": {"job_store": str(tmp_path / "up" / "scheduler.db")},
                          "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "model_name": "pumps"}})
    assert registry_lock_path(mine) == registry_lock_path(ups)  # one registry file, named two ways
    other = build_settings({"mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "model_name": "fans"}})
    assert registry_lock_path(other) != registry_lock_path(mine)
    with FileLock(registry_lock_path(ups), what="retrain"):
        result = run_retrain(mine)
    assert result.status == "skipped" and "already running" in result.reason and ran == []
    assert "exiting" not in result.reason  # a skipped retrain does not exit anything
    assert run_retrain(mine).reason == "ran" and len(ran) == 1
    with FileLock(registry_lock_path(mine)) as free, FileLock(f"{tmp_path}/mine.db.retrain.lock") as store:
        assert free.held and store.held  # both released after the run


def test_the_retrain_lock_of_a_model_sits_in_mlflow_lock_dir_and_opens_to_every_user(tmp_path, monkeypatch):
    """In the shared temp folder it was made 0o644: a second user's retrain then failed (not skipped)."""
    import os
    import stat

    from anomaly.scheduler import registry_lock_path, run_retrain

    monkeypatch.chdir(tmp_path)
    from anomaly.retrain import RetrainResult

    monkeypatch.setattr("anomaly.retrain.run_cycle", lambda settings, **kw: RetrainResult("skipped", "ran"))
    shared = tmp_path / "locks"
    settings = build_settings({"scheduler": {"job_store": str(tmp_path / "jobs.db")},
                               "mlflow": {"model_name": "pumps", "lock_dir": str(shared)}})
    assert registry_lock_path(settings).parent == shared
    old = os.umask(0o022)
    try:
        assert run_retrain(settings).reason == "ran"
    finally:
        os.umask(old)
    assert stat.S_IMODE(registry_lock_path(settings).stat().st_mode) == 0o666


def test_metrics_count_outcomes():
    now = [100.0]
    m = SchedulerMetrics(clock=lambda: now[0])
    m.job_started()
    assert m.value("anomaly_scheduler_job_running") == 1
    now[0] = 103.0
    m.job_finished("promoted", duration_s=3.0)
    assert m.value("anomaly_scheduler_last_run_duration_seconds") == 3.0
    assert m.value("anomaly_scheduler_job_running") == 0
    m.job_finished("skipped")  # a fast job: finished reported before submitted
    m.job_started()
    assert m.value("anomaly_scheduler_job_running") == 0
    m.job_started()
    m.job_finished("failed")
    m.job_started()
    assert m.value("anomaly_scheduler_job_running") == 1
    m.job_missed()  # a submitted run missed past its grace ends so: it stayed "running" for ever
    assert m.value("anomaly_scheduler_job_running") == 0 and m.health()["job_running"] is False
    assert m.value("anomaly_scheduler_jobs_started_total") == 4
    assert m.value("anomaly_scheduler_jobs_finished_total", {"outcome": "promoted"}) == 1
    assert m.value("anomaly_scheduler_jobs_finished_total", {"outcome": "failed"}) == 1
    assert m.value("anomaly_scheduler_jobs_finished_total", {"outcome": "kept"}) == 0
    assert m.value("anomaly_scheduler_jobs_missed_total") == 1
    assert m.value("anomaly_scheduler_last_success_timestamp_seconds") == 103.0
    assert b"anomaly_scheduler_jobs_finished_total" in m.exposition()[0]


def test_metrics_http_endpoint():
    import json
    import urllib.error
    import urllib.request

    m = SchedulerMetrics(clock=lambda: 200.0)
    port = m.start_http("127.0.0.1", 0)

    def health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"anomaly_scheduler_jobs_started_total" in body
        assert health() == (503, {"status": "starting", "job_running": False, "last_outcome": None,
                                  "last_run_ts": None, "last_success_ts": None, "next_run_ts": None})
        m.set_status("ok")
        m.set_next_run(300.0)
        m.job_started()
        code, doc = health()
        assert code == 200 and doc["status"] == "ok" and doc["job_running"] and doc["next_run_ts"] == 300.0
        m.job_finished("failed")
        code, doc = health()  # a failed retrain: degraded, still 200 (restarting the scheduler fixes nothing)
        assert (code, doc["status"], doc["last_outcome"], doc["job_running"]) == (200, "degraded", "failed", False)
        assert doc["last_run_ts"] == 200.0 and doc["last_success_ts"] is None
        m.job_started()
        m.job_finished("kept")
        assert health()[1]["status"] == "ok" and health()[1]["last_success_ts"] == 200.0
        m.set_status("stopping")
        assert health()[0] == 503
        with pytest.raises(ValueError):
            m.set_status("fine")
    finally:
        m.stop_http()


def test_triggers_and_fingerprints():
    interval, fp = trigger_for(build_settings({"scheduler": {"interval_s": 2}}).scheduler)
    assert fp == "every 2 s" and interval.interval.total_seconds() == 2
    cron, fp = trigger_for(build_settings({"scheduler": {"trigger": "cron", "cron": "*/5 * * * *"}}).scheduler)
    assert fp == ("cron */5 * * * * UTC (crontab days, fixed times once in a repeated hour, no day lost when the "
                  "clocks go forward)") and "minute='*/5'" in str(cron)


@pytest.mark.parametrize("cron, days", [
    ("0 3 */2 * mon", ["Mon 09 Mar", "Mon 23 Mar", "Mon 13 Apr"]),  # a day field from *: odd days AND Mondays
    ("0 3 1 * */3", ["Sun 01 Mar", "Wed 01 Apr", "Wed 01 Jul"]),  # the 1st AND a Sunday, Wednesday or Saturday
])
def test_a_day_field_starting_with_a_star_restricts_nothing_to_or_with(cron, days):
    assert _next_times(cron, (2026, 2, 28), 3, "%a %d %b") == days


def _next_times(cron: str, start: tuple[int, int, int], count: int, shown: str) -> list[str]:
    """The next ``count`` times of ``cron`` (UTC) from midnight of ``start``, as ``shown`` (strftime)."""
    from datetime import datetime, timedelta, timezone

    trigger, _ = trigger_for(build_settings({"scheduler": {"trigger": "cron", "cron": cron}}).scheduler)
    fired, now = [], datetime(*start, tzinfo=timezone.utc)
    for _ in range(count):
        now = trigger.get_next_fire_time(None, now + timedelta(seconds=1))
        fired.append(now.strftime(shown))
    return fired


@pytest.mark.parametrize("cron, times", [
    # a step after a month name: APScheduler dropped it (monthly; "jan/3" yearly)
    ("0 3 1 jan-dec/3 *", ["01 Jan 03:00", "01 Apr 03:00", "01 Jul 03:00", "01 Oct 03:00"]),
    ("0 3 1 jan/3 *", ["01 Jan 03:00", "01 Apr 03:00", "01 Jul 03:00", "01 Oct 03:00"]),
    ("0 3 1 Feb,AUG *", ["01 Feb 03:00", "01 Aug 03:00", "01 Feb 03:00", "01 Aug 03:00"]),
    # a step wider than its range is its first value, as crontab runs it (APScheduler refused these)
    ("0 3 10-12/4 1 *", ["10 Jan 03:00", "10 Jan 03:00", "10 Jan 03:00", "10 Jan 03:00"]),
    ("0 3 30/3 1,2,3 *", ["30 Jan 03:00", "30 Mar 03:00", "30 Jan 03:00", "30 Mar 03:00"]),
    ("*/60 0 1 1 *", ["01 Jan 00:00", "01 Jan 00:00", "01 Jan 00:00", "01 Jan 00:00"]),
])
def test_cron_months_and_steps_mean_what_crontab_means(cron, times):
    assert _next_times(cron, (2026, 12, 31), 4, "%d %b %H:%M") == times


def test_a_day_of_the_month_and_a_weekday_mean_either_as_in_crontab():
    # "0 3 1 * mon": every 1st and every Monday (APScheduler's one trigger: only Mondays that are a 1st)
    assert _next_times("0 3 1 * mon", (2026, 3, 1), 7, "%a %d %b %H:%M") == [
        "Sun 01 Mar 03:00", "Mon 02 Mar 03:00", "Mon 09 Mar 03:00", "Mon 16 Mar 03:00",
        "Mon 23 Mar 03:00", "Mon 30 Mar 03:00", "Wed 01 Apr 03:00"]


@pytest.mark.parametrize("weekday, days", [
    ("0", ["Sun"]), ("7", ["Sun"]), ("1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]), ("0,6", ["Sat", "Sun"]),
    ("sat,sun", ["Sat", "Sun"]), ("*/2", ["Sun", "Tue", "Thu", "Sat"]), ("1-5/2", ["Mon", "Wed", "Fri"]),
    ("5-7", ["Fri", "Sat", "Sun"]), ("1/2", ["Mon", "Wed", "Fri", "Sun"]), ("7/1", ["Sun"]), ("MON-wed", ["Mon", "Tue", "Wed"]), ("*", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]),
])
def test_cron_weekdays_mean_what_crontab_means(weekday, days):
    # APScheduler's from_crontab reads 0 as Monday: "0 3 * * 0" fired on Mondays, "1-5" Tuesday to Saturday.
    from datetime import datetime, timedelta, timezone

    trigger, _ = trigger_for(build_settings({"scheduler": {"trigger": "cron", "cron": f"0 3 * * {weekday}"}}).scheduler)
    fired, now = [], datetime(2026, 11, 30, tzinfo=timezone.utc)  # a Monday
    for _ in range(7 * 3):
        now = trigger.get_next_fire_time(None, now + timedelta(seconds=1))
        fired.append(now)
    assert sorted({t.strftime("%a") for t in fired}, key=lambda d: ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].index(d)) \
        == sorted(days, key=lambda d: ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].index(d))
    assert all(t.hour == 3 and t.minute == 0 for t in fired)


def test_settings_round_trip_through_the_job_store_dict():
    settings = build_settings({"retrain": {"entities": ["pump-0"], "min_rows": 10},
                               "kafka": {"client_options": {"request_timeout_ms": 5000}}})
    assert build_settings(settings_dict(settings)) == settings
    assert build_settings(settings_dict(Settings())) == Settings()


@pytest.mark.parametrize("raw, field", [
    ({"retrain": {"max_readings": 0}}, "retrain.max_readings"),
    ({"retrain": {"holdout_fraction": 1.0}}, "retrain.holdout_fraction"),
    ({"retrain": {"lookback_s": 0}}, "retrain.lookback_s"),
    ({"retrain": {"exclude_margin_rows": -1}}, "retrain.exclude_margin_rows"),
    ({"retrain": {"min_event_f1_improvement": 0}}, "retrain.min_event_f1_improvement"),
    ({"retrain": {"max_event_f1_decrease": -0.1}}, "retrain.max_event_f1_decrease"),
    ({"retrain": {"label_field": ""}}, "retrain.label_field"),
    ({"scheduler": {"trigger": "weekly"}}, "scheduler.trigger"),
    ({"scheduler": {"cron": "0 3 * *"}}, "scheduler.cron"),
    ({"scheduler": {"interval_s": 0}}, "scheduler.interval_s"),
    ({"scheduler": {"interval_s": float("inf")}}, "scheduler.interval_s"),
    ({"scheduler": {"cron": "61 * * * *"}}, "scheduler.cron"),
    ({"scheduler": {"cron": "0 3 * * 8"}}, "scheduler.cron"),
    ({"scheduler": {"cron": "0 3 * * 5-1"}}, "scheduler.cron"),
    ({"scheduler": {"timezone": "Mars/Olympus"}}, "scheduler.timezone"),
    ({"training": {"learning_rate": float("nan")}}, "training.learning_rate"),
    ({"drift": {"psi_threshold": float("inf")}}, "drift.psi_threshold"),
    ({"worker": {"poll_timeout_s": float("nan")}}, "worker.poll_timeout_s"),
    ({"worker": {"stall_s": 60}}, "worker.stall_s"),
    ({"worker": {"stall_s": float("nan")}}, "worker.stall_s"),
    ({"training": {"weight_decay": -1.0}}, "training.weight_decay"),
    ({"training": {"seed": -5}}, "training.seed"),
    ({"training": {"seed": 2**32}}, "training.seed"),
    ({"threshold": {"k": -1.0}}, "threshold.k"),
    ({"worker": {"model_check_interval_s": 0.0}}, "worker.model_check_interval_s"),
    ({"kafka": {"input_topic": ""}}, "kafka.input_topic"),
    ({"kafka": {"bootstrap_servers": " "}}, "kafka.bootstrap_servers"),
    ({"mlflow": {"model_name": ""}}, "mlflow.model_name"),
    ({"kafka": {"dlq_topic": "sensors"}}, "kafka.dlq_topic"),
    ({"kafka": {"events_topic": "sensors"}}, "kafka.events_topic"),
    ({"kafka": {"scores_topic": "anomalies"}}, "kafka.scores_topic"),
])
def test_bad_retrain_and_scheduler_settings_name_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        build_settings(raw)
    assert info.value.field == field


def test_a_restart_applies_a_changed_misfire_grace_to_the_kept_job(tmp_path):
    from anomaly.config import SchedulerSettings
    from anomaly.scheduler import JOB_ID, RetrainScheduler

    seen = []
    for grace in (3600, 10):
        settings = SchedulerSettings(job_store=str(tmp_path / "s.db"), misfire_grace_s=grace, metrics_port=-1)
        scheduler = RetrainScheduler(settings, {"config": None})
        scheduler.start()
        try:
            job = scheduler.scheduler.get_job(JOB_ID)
            seen.append((job.misfire_grace_time, job.next_run_time))
        finally:
            scheduler.stop()
    assert [grace for grace, _ in seen] == [3600, 10]
    assert seen[0][1] == seen[1][1]  # the same job, kept: its stored next run time too
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600  # its job's kwargs may hold a tracking URI's password


def test_the_last_run_survives_a_restart(tmp_path):
    # A restarted scheduler used to report no success ever: "no successful retraining run for 3 days"
    # fired after the first failed run following any restart.
    from anomaly.config import SchedulerSettings
    from anomaly.scheduler import RetrainScheduler, last_run_path

    settings = SchedulerSettings(job_store=str(tmp_path / "s.db"), metrics_port=-1)
    first = RetrainScheduler(settings, {"config": None}, metrics=SchedulerMetrics(clock=lambda: 1_000.0))
    first.start()
    try:
        first.metrics.job_started()
        first.metrics.job_finished("kept")
        first._save_last_run()
    finally:
        first.stop()
    assert last_run_path(settings.job_store).exists()
    second = RetrainScheduler(settings, {"config": None}, metrics=SchedulerMetrics(clock=lambda: 5_000.0))
    second.start()
    try:
        health = second.metrics.health()
        assert health["last_success_ts"] == 1_000.0 and health["last_outcome"] == "kept"
        second.metrics.job_started()
        second.metrics.job_finished("failed")
        health = second.metrics.health()
        assert health["last_success_ts"] == 1_000.0 and health["last_run_ts"] == 5_000.0
        assert health["status"] == "degraded"
    finally:
        second.stop()
    last_run_path(settings.job_store).write_text("not json")
    third = RetrainScheduler(settings, {"config": None})
    third.start()  # a damaged file is ignored, not fatal: no last run is known
    try:
        health = third.metrics.health()
        assert health["last_success_ts"] is None and health["last_outcome"] is None
    finally:
        third.stop()


@pytest.mark.parametrize("content", [b"garbage" * 100, b"SQLite format 3\x00garbage"], ids=["random", "truncated"])
def test_an_unreadable_job_store_is_an_error_naming_the_field(tmp_path, content):
    from anomaly.config import SchedulerSettings
    from anomaly.errors import ConfigError
    from anomaly.scheduler import RetrainScheduler

    store = tmp_path / "s.db"
    store.write_bytes(content)
    scheduler = RetrainScheduler(SchedulerSettings(job_store=str(store), metrics_port=-1), {"config": None})
    with pytest.raises(ConfigError, match=r"scheduler.job_store: .* is not a readable SQLite job store .*move it aside"):
        scheduler.start()  # a traceback and exit 1 before
    assert store.read_bytes() == content  # left as it was, for the operator to look at


def test_a_time_the_clocks_pass_twice_fires_once():
    # daylight saving ends in Berlin on 2026-10-25: 02:30 comes at +02:00 and again at +01:00
    import pickle
    from datetime import datetime, timezone

    settings = build_settings({"scheduler": {"trigger": "cron", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}})
    trigger, _ = trigger_for(settings.scheduler)
    trigger = pickle.loads(pickle.dumps(trigger))  # as the job store keeps it
    fired, previous, now = [], None, datetime(2026, 10, 24, 12, tzinfo=timezone.utc)
    for _ in range(3):
        previous = now = trigger.get_next_fire_time(previous, now)
        fired.append(now.isoformat())
    assert fired == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"]


@pytest.mark.parametrize("cron, times", [
    # several fixed times in the repeated hour: each once (the second pass of each was run too)
    ("0,30 2 * * *", ["25 02:00+0200", "25 02:30+0200", "26 02:00+0100", "26 02:30+0100"]),
    ("15 1-3 * * *", ["25 01:15+0200", "25 02:15+0200", "25 03:15+0100", "26 01:15+0100"]),
    # a wildcard minute or hour runs in both passes, as crontab runs its wildcard jobs
    ("*/30 2 * * *", ["25 02:00+0200", "25 02:30+0200", "25 02:00+0100", "25 02:30+0100"]),
    ("45 * * * *", ["25 00:45+0200", "25 01:45+0200", "25 02:45+0200", "25 02:45+0100"]),
])
def test_fixed_times_in_the_repeated_hour_fire_once_and_wildcards_twice(cron, times):
    from datetime import datetime, timezone

    trigger, _ = trigger_for(build_settings({"scheduler": {"trigger": "cron", "cron": cron,
                                                           "timezone": "Europe/Berlin"}}).scheduler)
    fired, previous, now = [], None, datetime(2026, 10, 24, 22, tzinfo=timezone.utc)  # 00:00 in Berlin
    for _ in range(4):
        previous = now = trigger.get_next_fire_time(previous, now)
        fired.append(now.strftime("%d %H:%M%z"))
    assert fired == times


def _fired(cron: str, zone: str, start: str, count: int) -> list[str]:
    import pickle
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    trigger, _ = trigger_for(build_settings({"scheduler": {"trigger": "cron", "cron": cron, "timezone": zone}}).scheduler)
    trigger = pickle.loads(pickle.dumps(trigger))  # as the job store keeps it
    fired, previous, now = [], None, datetime.fromisoformat(start).replace(tzinfo=ZoneInfo(zone))
    for _ in range(count):
        previous = trigger.get_next_fire_time(previous, now)
        now = previous + timedelta(seconds=2)  # as APScheduler asks: the last run time, now just after it
        fired.append(previous.strftime("%m-%d %H:%M%z"))
    return fired


@pytest.mark.parametrize("cron, zone, start, times", [
    # the clocks go forward at 02:00 on 2024-03-31 in Berlin: APScheduler's own trigger went from 03-31 to 04-02
    ("0 0 * * *", "Europe/Berlin", "2024-03-30 12:00", ["03-31 00:00+0100", "04-01 00:00+0200", "04-02 00:00+0200"]),
    ("0 0 * * mon", "Europe/Berlin", "2024-03-20 12:00", ["03-25 00:00+0100", "04-01 00:00+0200", "04-08 00:00+0200"]),
    ("0 0 1 * *", "Europe/Berlin", "2024-02-15 12:00", ["03-01 00:00+0100", "04-01 00:00+0200", "05-01 00:00+0200"]),
    ("45 0 * * 1-5", "America/New_York", "2024-03-08 12:00", ["03-11 00:45-0400", "03-12 00:45-0400", "03-13 00:45-0400"]),
    # a time the clocks skip runs just after the change, as crontab runs it
    ("30 2 * * *", "Europe/Berlin", "2024-03-30 12:00", ["03-31 03:30+0200", "04-01 02:30+0200", "04-02 02:30+0200"]),
    # in Santiago the clocks go from 00:00 to 01:00 on 2024-09-08: midnight that day is 01:00
    ("0 0 * * *", "America/Santiago", "2024-09-06 12:00", ["09-07 00:00-0400", "09-08 01:00-0300", "09-09 00:00-0300"]),
])
def test_no_day_is_lost_when_the_clocks_go_forward(cron, zone, start, times):
    assert _fired(cron, zone, start, 3) == times


def test_an_alias_lock_is_one_lock_however_the_registry_file_is_named(tmp_path, monkeypatch):
    """A relative and an absolute sqlite URI of one file guard the same alias moves (the lock was keyed
    on the raw tracking URI, so a scheduler run from the project folder and `anomaly models promote` with
    the absolute path could move one alias at once)."""
    import mlflow

    from anomaly import registry
    from anomaly.errors import RegistryError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "ALIAS_LOCK_WAIT_S", 0.1)
    try:
        mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
        mlflow.set_registry_uri("sqlite:///mlruns/mlflow.db")
        with registry.alias_lock("pumps", "champion"):
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
            mlflow.set_registry_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
            with pytest.raises(RegistryError, match="has been moving pumps@champion"):
                with registry.alias_lock("pumps", "champion"):
                    pass
            with registry.alias_lock("pumps", "challenger"):  # another alias: its own lock
                pass
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_the_running_mark_is_cleared_by_a_missed_run_and_not_left_by_a_start_that_comes_after_its_end(tmp_path):
    # APScheduler sends SUBMITTED then MISSED for a run found too late, and a quick run's EXECUTED (the
    # executor's thread) can come before its SUBMITTED (the scheduler's): either left "running_since" in
    # last.json, and the next restart counted a run that never died as killed (an error).
    import json
    from types import SimpleNamespace

    from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED

    from anomaly.config import SchedulerSettings
    from anomaly.scheduler import JOB_ID, RetrainScheduler, last_run_path

    settings = SchedulerSettings(job_store=str(tmp_path / "s.db"), metrics_port=-1)
    scheduler = RetrainScheduler(settings, {"config": None})
    scheduler.start()

    def event(code):
        return SimpleNamespace(code=code, job_id=JOB_ID, scheduled_run_times=[], scheduled_run_time=None,
                               retval={"status": "skipped", "reason": "test"}, exception=None)

    def mark():
        return "running_since" in json.loads(last_run_path(settings.job_store).read_text())

    try:
        scheduler._on_event(event(EVENT_JOB_SUBMITTED))
        assert mark()
        scheduler._on_event(event(EVENT_JOB_MISSED))
        assert not mark()
        scheduler._on_event(event(EVENT_JOB_EXECUTED))  # a quick run's end first ...
        scheduler._on_event(event(EVENT_JOB_SUBMITTED))  # ... then its start
        assert not mark()
        scheduler._on_event(event(EVENT_JOB_SUBMITTED))  # the next run, in order
        assert mark()
        scheduler._on_event(event(EVENT_JOB_EXECUTED))
        assert not mark()
    finally:
        scheduler.stop()


def test_an_abandoned_run_is_counted_as_such_neither_a_success_nor_a_failure():
    now = [100.0]
    m = SchedulerMetrics(clock=lambda: now[0])
    m.set_status("ok")
    m.job_started()
    m.job_finished("kept")
    now[0] = 200.0
    m.job_started()
    m.job_finished("abandoned")
    assert m.value("anomaly_scheduler_jobs_finished_total", {"outcome": "abandoned"}) == 1
    assert m.value("anomaly_scheduler_jobs_finished_total", {"outcome": "error"}) == 0
    assert m.value("anomaly_scheduler_last_success_timestamp_seconds") == 100.0
    assert m.health()["status"] == "ok" and m.health()["last_outcome"] == "abandoned"


def test_after_a_cycle_that_registered_a_challenger_the_registry_is_pruned_and_a_failure_is_only_said(
        monkeypatch, caplog):
    from anomaly import registry
    from anomaly.retention import Plan
    from anomaly.retrain import RetrainResult
    from anomaly.scheduler import prune_after

    calls = []

    def prune(name, keep, challenger_alias, dry_run=False):
        calls.append((name, keep, challenger_alias))
        return registry.Pruned(Plan(("2", "3", "4"), {}), ("2", "3"), {"4": "not deleted: 503"})

    monkeypatch.setattr(registry, "prune", prune)
    settings = build_settings({"retrain": {"keep_challengers": 4}, "mlflow": {"model_name": "pump"}})
    skipped = RetrainResult("skipped", "too little data")
    prune_after(settings, skipped)  # registered nothing: nothing to prune
    assert calls == [] and "versions_pruned" not in skipped.data
    kept = RetrainResult("kept", "worse", champion_version="1", challenger_version="5")
    prune_after(settings, kept)
    assert calls == [("pump", 4, "challenger")] and kept.data["versions_pruned"] == 2
    assert kept.data["versions_left"] == 1
    canary = build_settings({"retrain": {"keep_challengers": 4}, "mlflow": {"model_name": "pump"},
                             "worker": {"model_alias": "challenger"}})
    prune_after(canary, kept)  # the workers serve @challenger: having held it is having served
    assert calls[-1] == ("pump", 4, None)
    prune_after(build_settings({"retrain": {"keep_challengers": -1}}), kept)  # off
    assert len(calls) == 2

    def down(*args, **kwargs):
        raise registry.RegistryError("the registry does not answer")

    monkeypatch.setattr(registry, "prune", down)
    promoted = RetrainResult("promoted", "better", champion_version="1", challenger_version="6")
    with caplog.at_level("WARNING", logger="anomaly.scheduler"):
        prune_after(settings, promoted)
    assert promoted.status == "promoted" and "versions_pruned" not in promoted.data
    assert "could not be deleted: the registry does not answer" in caplog.text
