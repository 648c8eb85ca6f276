"""The scheduler against its real SQLite job store: a job runs on schedule, a restart keeps the stored
job and runs a missed run once (coalesced), a run missed beyond the grace time is skipped and counted,
a second scheduler on the same store refuses to start (exit code 2 from the command), and the real
retrain job runs from the store. Stub jobs (module-level, referenced by name) keep it fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from anomaly.config import build_settings
from anomaly.locks import Locked
from anomaly.scheduler import JOB_FUNC, JOB_ID, RetrainScheduler, settings_dict
from tests.fixtures import mlflow_store, wait_for

pytestmark = pytest.mark.integration

STUB = "tests.integration.test_scheduler:stub_job"
REPO = Path(__file__).resolve().parents[2]


def stub_job(path: str = "") -> dict:
    """Appends one line per run to ``path`` (if given); returns what a retrain would (so the listener
    counts an outcome)."""
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.time()}\n")
    return {"status": "skipped", "reason": "stub"}


ARMED: list[bool] = []  # set by arming_job: the job store's writes then fail (see the test using it)


def arming_job() -> dict:
    ARMED.append(True)
    return {"status": "skipped", "reason": "stub"}


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def sched_settings(tmp_path, **values):
    return build_settings({"scheduler": {"job_store": str(tmp_path / "scheduler.db"), "metrics_port": -1,
                                         **values}}).scheduler



def test_job_runs_on_its_interval(tmp_path):
    out = tmp_path / "runs.txt"
    sched = RetrainScheduler(sched_settings(tmp_path, interval_s=1), {"path": str(out)}, func=STUB)
    assert sched.metrics.health()["status"] == "starting"
    sched.start()
    try:
        assert sched.metrics.health()["status"] == "ok"
        assert wait_for(lambda: runs(out) >= 2, 10), "two runs expected within 10 s at a 1 s interval"
    finally:
        sched.stop()
    m = sched.metrics
    assert m.health()["status"] == "stopping" and m.health()["next_run_ts"] > 0
    assert m.value("anomaly_scheduler_jobs_started_total") >= 2
    assert wait_for(lambda: m.value("anomaly_scheduler_jobs_finished_total", {"outcome": "skipped"}) >= 2, 2)
    assert m.value("anomaly_scheduler_next_run_timestamp_seconds") > 0
    assert not sched.lock.held


def _stop_with_next_run_in_the_past(settings, out: Path, seconds_ago: float) -> None:
    """Run a scheduler once, stop it, then pretend it was down for a while: move the stored next run
    time into the past by editing the job store directly (as the store would look after downtime)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    sched = RetrainScheduler(settings, {"path": str(out)}, func=STUB)
    sched.start()
    sched.stop()
    store = SQLAlchemyJobStore(url=f"sqlite:///{settings.job_store}")
    store.start(BackgroundScheduler(timezone="UTC"), "default")
    try:
        job = store.lookup_job(JOB_ID)
        job.next_run_time = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
        store.update_job(job)
    finally:
        store.shutdown()


def test_restart_keeps_the_job_and_runs_missed_runs_once(tmp_path):
    out = tmp_path / "runs.txt"
    settings = sched_settings(tmp_path, interval_s=60, misfire_grace_s=3600)
    first = RetrainScheduler(settings, {"path": str(out)}, func=STUB)
    first.start()
    stored = first.next_run_time()
    first.stop()
    second = RetrainScheduler(settings, {"path": str(out)}, func=STUB)
    second.start()
    try:
        assert second.next_run_time() == stored  # the schedule survived the restart unchanged
    finally:
        second.stop()
    # Down across three interval fires (130, 70 and 10 s ago): one run on restart, not three.
    _stop_with_next_run_in_the_past(settings, out, 130)
    third = RetrainScheduler(settings, {"path": str(out)}, func=STUB)
    third.start()
    try:
        assert wait_for(lambda: runs(out) >= 1, 5)
        time.sleep(1.0)
        assert runs(out) == 1
        assert third.next_run_time() > datetime.now(timezone.utc)
    finally:
        third.stop()


def test_a_run_missed_beyond_the_grace_time_is_skipped_and_counted(tmp_path):
    out = tmp_path / "runs.txt"
    settings = sched_settings(tmp_path, interval_s=60, misfire_grace_s=5)
    _stop_with_next_run_in_the_past(settings, out, 130)  # last missed fire was 10 s ago > 5 s grace
    sched = RetrainScheduler(settings, {"path": str(out)}, func=STUB)
    sched.start()
    try:
        assert wait_for(lambda: sched.metrics.value("anomaly_scheduler_jobs_missed_total") == 1, 5)
        assert runs(out) == 0
        # the missed run ended its submission: not "running" for ever (it stayed 1, a false RetrainStuck alert)
        assert sched.metrics.value("anomaly_scheduler_job_running") == 0
        assert sched.metrics.health()["job_running"] is False
    finally:
        sched.stop()


def test_a_changed_trigger_replaces_the_stored_job(tmp_path):
    out = tmp_path / "runs.txt"
    sched = RetrainScheduler(sched_settings(tmp_path, interval_s=3600), {"path": str(out)}, func=STUB)
    sched.start()
    sched.stop()
    again = RetrainScheduler(sched_settings(tmp_path, trigger="cron", cron="0 4 * * *"), {"path": str(out)}, func=STUB)
    again.start()
    try:
        job = again.scheduler.get_job(JOB_ID)
        assert "cron 0 4 * * *" in job.name and again.next_run_time().hour == 4
        assert len(again.scheduler.get_jobs()) == 1
    finally:
        again.stop()


def test_a_second_scheduler_on_the_same_store_refuses_to_start(tmp_path):
    out = tmp_path / "runs.txt"
    settings = sched_settings(tmp_path, interval_s=3600)
    first = RetrainScheduler(settings, {"path": str(out)}, func=STUB)
    first.start()
    try:
        with pytest.raises(Locked):
            RetrainScheduler(settings, {"path": str(out)}, func=STUB).start()
        proc = subprocess.run([sys.executable, "-m", "anomaly.cli", "scheduler", "--job-store", settings.job_store,
                               "--metrics-port", "-1", "--job", STUB, "--run-for-s", "5"],
                              capture_output=True, text=True, timeout=60, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 2, proc.stderr
        assert f"another scheduler holds {settings.job_store}.lock (pid {os.getpid()}); exiting" in proc.stderr
        assert first.scheduler.running and first.lock.held  # the first one is untouched
    finally:
        first.stop()


def test_a_job_store_that_cannot_be_written_after_a_run_stops_the_command(tmp_path, monkeypatch, capsys, caplog):
    # APScheduler's thread died on an error writing its store after a run (a full or read-only volume): the
    # process lived on, scheduled nothing more, and /healthz said ok. It now exits 2 saying why.
    import sqlite3

    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from sqlalchemy.exc import OperationalError

    from anomaly.cli import main

    real = SQLAlchemyJobStore.update_job

    def update_job(self, job):
        if ARMED:
            raise OperationalError("UPDATE apscheduler_jobs", {},
                                   sqlite3.OperationalError("attempt to write a readonly database"))
        return real(self, job)

    monkeypatch.setattr(SQLAlchemyJobStore, "update_job", update_job)
    ARMED.clear()
    started = time.monotonic()
    code = main(["scheduler", "--job-store", str(tmp_path / "scheduler.db"), "--metrics-port", "-1",
                 "--interval-s", "1", "--job", "tests.integration.test_scheduler:arming_job", "--run-for-s", "60"])
    assert ARMED, "the job never ran"
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "the scheduling thread stopped (OperationalError" in err and "exiting for a restart" in err
    assert "readonly database" in err
    assert "if it started one" in caplog.text  # a retrain it may have started unseen is waited for, and said


def test_the_real_retrain_job_runs_from_the_store(tmp_path):
    """JOB_FUNC with its configuration (here all as overrides) kept in the store; an empty registry makes
    it a quick skip."""
    settings = build_settings({
        "mlflow": mlflow_store(tmp_path, "nothing-here"),
        "scheduler": {"job_store": str(tmp_path / "scheduler.db"), "interval_s": 1, "metrics_port": -1},
    })
    sched = RetrainScheduler(settings.scheduler, {"config": None, "overrides": settings_dict(settings)},
                             func=JOB_FUNC)
    sched.start()
    try:
        assert wait_for(lambda: (sched.metrics.value("anomaly_scheduler_jobs_finished_total",
                                                     {"outcome": "skipped"}) or 0) >= 1, 180)
    finally:
        sched.stop()
    assert sched.metrics.value("anomaly_scheduler_jobs_finished_total", {"outcome": "error"}) == 0


def blocking_job(path: str = "") -> dict:
    """Says it started (``path``.started), then runs until ``path``.release exists (at most 30 s)."""
    Path(path + ".started").touch()
    deadline = time.time() + 30
    while not Path(path + ".release").exists() and time.time() < deadline:
        time.sleep(0.05)
    return {"status": "skipped", "reason": "blocking stub"}


def test_a_stop_while_a_job_runs_waits_for_it_and_returns(tmp_path, caplog):
    """A SIGTERM mid-retrain: APScheduler's shutdown holds its job-store lock while it waits for the
    running job, and the job-end listener used to read that store on the job's thread: a deadlock, and
    the scheduler never stopped. And a run due meanwhile is not submitted to the executors being shut
    down (an ERROR with a traceback, "cannot schedule new futures after shutdown", at every such stop)."""
    import logging
    import threading

    base = str(tmp_path / "job")
    sched = RetrainScheduler(sched_settings(tmp_path, interval_s=1), {"path": base},
                             func="tests.integration.test_scheduler:blocking_job")
    sched.start()
    assert wait_for(lambda: Path(base + ".started").exists(), 30), "the job never started"
    stopper = threading.Thread(target=sched.stop, kwargs={"wait": True}, daemon=True)
    stopper.start()
    time.sleep(0.5)  # the shutdown now holds the store's lock and waits for the job
    assert stopper.is_alive()  # it waits for the running job, as it should
    with caplog.at_level(logging.INFO, logger="apscheduler"):
        time.sleep(1.5)  # a run falls due while the job runs (interval 1 s)
        Path(base + ".release").touch()
        stopper.join(20)
        time.sleep(0.5)
    assert not stopper.is_alive(), "stop() never returned: the job's end deadlocked the shutdown"
    assert sched.metrics.value("anomaly_scheduler_jobs_finished_total", {"outcome": "skipped"}) == 1
    assert "Error submitting job" not in caplog.text


def test_a_run_whose_process_was_killed_is_counted_as_an_error_after_the_restart(tmp_path):
    # APScheduler moves the job's next run on as it starts one; a retrain killed mid-run (out of memory,
    # SIGKILL after a stop's grace) left no trace: not failed, not missed, and "overdue" never fired when no
    # run had ever ended. The scheduler now marks a run as running when it starts it.
    import json
    import shutil

    from anomaly.scheduler import last_run_path

    base = str(tmp_path / "job")
    settings = sched_settings(tmp_path, interval_s=1)
    sched = RetrainScheduler(settings, {"path": base}, func="tests.integration.test_scheduler:blocking_job")
    sched.start()
    try:
        assert wait_for(lambda: Path(base + ".started").exists(), 30), "the job never started"

        def marked() -> bool:  # the start is told (SUBMITTED) on the scheduler's thread, as the job runs
            path = last_run_path(settings.job_store)
            return path.exists() and "running_since" in json.loads(path.read_text())

        assert wait_for(marked, 10), "no running mark while the job runs"
        last = json.loads(last_run_path(settings.job_store).read_text())
        assert last["running_since"] > time.time() - 60
        killed = tmp_path / "at-the-kill.json"  # what a killed process leaves behind
        shutil.copy(last_run_path(settings.job_store), killed)
    finally:
        Path(base + ".release").touch()
        sched.stop()
    assert "running_since" not in json.loads(last_run_path(settings.job_store).read_text())  # ended: cleared
    shutil.copy(killed, last_run_path(settings.job_store))
    again = RetrainScheduler(sched_settings(tmp_path, interval_s=3600), {"path": base}, func=STUB)
    again.start()
    try:
        health = again.metrics.health()
        assert health["last_outcome"] == "error" and health["last_run_ts"] == pytest.approx(last["running_since"], abs=1e-3)
        assert again.metrics.value("anomaly_scheduler_jobs_finished_total", {"outcome": "error"}) == 1
        assert "running_since" not in json.loads(last_run_path(settings.job_store).read_text())  # said once
    finally:
        again.stop()


def blocking_job_at_env() -> dict:
    """``blocking_job`` at the path in $ANOMALY_TEST_JOB (the command passes no arguments to a --job)."""
    return blocking_job(os.environ["ANOMALY_TEST_JOB"])


def test_a_second_sigterm_while_the_command_waits_for_its_run_exits_at_once(tmp_path):
    import json
    import signal

    from anomaly.scheduler import last_run_path

    base = str(tmp_path / "job")
    store = str(tmp_path / "scheduler.db")
    proc = subprocess.Popen([sys.executable, "-m", "anomaly.cli", "scheduler", "--job-store", store,
                             "--metrics-port", "-1", "--interval-s", "1",
                             "--job", "tests.integration.test_scheduler:blocking_job_at_env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ANOMALY_TEST_JOB": base})
    try:
        assert wait_for(lambda: Path(base + ".started").exists(), 30), "the job never started"
        assert wait_for(lambda: last_run_path(store).exists()
                        and "running_since" in json.loads(last_run_path(store).read_text()), 10)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert proc.poll() is None  # the first one waits for the run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        Path(base + ".release").touch()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopping once the retrain in progress ends" in err
    assert "SIGTERM while stopping: abandoning the retrain" in err and "exiting now, without waiting" in err
    assert "running_since" in json.loads(last_run_path(store).read_text())  # not a training: the next start counts it


def training_job_at_env() -> dict:
    """Trains a small model for ever inside an MLflow run of the store at $ANOMALY_TEST_MLFLOW, once it
    has written its run id to $ANOMALY_TEST_JOB.started."""
    import numpy as np

    from anomaly import tracking
    from anomaly.model import ModelConfig
    from anomaly.training import TrainConfig, train_autoencoder

    tracking.configure(os.environ["ANOMALY_TEST_MLFLOW"])
    windows = np.random.default_rng(0).normal(size=(512, 8, 2)).astype(np.float32)
    with tracking.Run("abandon", os.environ["ANOMALY_TEST_ARTIFACTS"], run_name="forever") as run:
        Path(os.environ["ANOMALY_TEST_JOB"] + ".started").write_text(run.run_id or "")
        train_autoencoder(windows, ModelConfig(n_features=2, window_size=8, hidden_size=8, latent_size=4),
                          TrainConfig(epochs=1_000_000, patience=1_000_000, device="cpu",
                                      progress=False))
    return {"status": "promoted"}


@pytest.mark.parametrize("how", ["second SIGTERM", "SIGUSR1"])
def test_a_retrain_told_to_stop_now_ends_its_run_killed_and_the_scheduler_counts_it_abandoned(tmp_path, how):
    """`anomaly up` gave a retrain 180 s, then SIGKILLed the scheduler: its MLflow run stayed RUNNING
    for ever and the next start counted an error. Training now stops at its next batch."""
    import json
    import signal

    import mlflow

    from anomaly.scheduler import last_run_path

    base = str(tmp_path / "job")
    store = str(tmp_path / "scheduler.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "anomaly.cli", "scheduler", "--job-store", store,
                             "--metrics-port", "-1", "--interval-s", "1",
                             "--job", "tests.integration.test_scheduler:training_job_at_env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ANOMALY_TEST_JOB": base,
                                 "ANOMALY_TEST_MLFLOW": uri, "ANOMALY_TEST_ARTIFACTS": str(tmp_path / "artifacts")})
    try:
        assert wait_for(lambda: Path(base + ".started").exists() and Path(base + ".started").read_text(), 60), \
            "the job never started"
        time.sleep(1.0)  # training under way
        if how == "SIGUSR1":
            proc.send_signal(signal.SIGUSR1)
        else:
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            assert proc.poll() is None  # the first one waits for the run
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    signum = signal.SIGUSR1 if how == "SIGUSR1" else signal.SIGTERM
    assert proc.returncode == 128 + signum, err
    assert "abandoned (training abandoned at epoch" in err and "exiting now" not in err
    last = json.loads(last_run_path(store).read_text())
    assert "running_since" not in last and last["last_outcome"] == "abandoned"
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(Path(base + ".started").read_text())
    assert run.info.status == "KILLED"


def _running_run(client, experiment_id: str, start_s: float | None = None, **tags: str) -> str:
    """A run left RUNNING, as a process killed inside it leaves it."""
    start = None if start_s is None else int(start_s * 1000)
    return client.create_run(experiment_id, start_time=start, tags=tags).info.run_id


def test_the_runs_a_killed_scheduled_retrain_left_running_are_ended_failed(tmp_path):
    # a retrain killed by SIGKILL or out of memory left its MLflow runs RUNNING for ever (the UI shows them
    # running); its scheduler, restarted, knew it had died and said so, but left them
    import mlflow
    from mlflow.tracking import MlflowClient

    from anomaly import tracking
    from anomaly.retrain import end_dead_runs

    settings = build_settings({"mlflow": mlflow_store(tmp_path, "pump")})
    tracking.configure_from(settings.mlflow)
    experiment = tracking.ensure_experiment(settings.mlflow.experiment, settings.mlflow.artifact_location)
    client = MlflowClient()
    started = time.time()
    before = _running_run(client, experiment, started - 60, retrain="true", **{"retrain.trigger": "schedule"})
    challenger = _running_run(client, experiment, retrain="true", **{"retrain.trigger": "drift: psi 0.4"})
    compare = _running_run(client, experiment, retrain="true", trigger="schedule", kind="retrain-comparison")
    manual = _running_run(client, experiment, retrain="true", **{"retrain.trigger": "manual"})
    training = _running_run(client, experiment)  # an `anomaly train`: not the retrain's
    done = _running_run(client, experiment, retrain="true", **{"retrain.trigger": "schedule"})
    client.set_terminated(done, "FINISHED")
    # another asset type's scheduler, sharing the experiment, retraining now: its runs are not ours to end
    turbines = _running_run(client, experiment, retrain="true", model_name="turbines",
                            **{"retrain.trigger": "schedule"})
    ours = _running_run(client, experiment, retrain="true", model_name="pump", **{"retrain.trigger": "schedule"})
    assert sorted(end_dead_runs(settings, started)) == sorted([challenger, compare, ours])
    status = {run: client.get_run(run).info.status
              for run in (before, challenger, compare, manual, training, done, turbines, ours)}
    assert status == {before: "RUNNING", challenger: "FAILED", compare: "FAILED", manual: "RUNNING",
                      training: "RUNNING", done: "FINISHED", turbines: "RUNNING", ours: "FAILED"}
    # before: another process's, a minute earlier
    assert "its process was killed" in client.get_run(challenger).data.tags["anomaly.ended"]
    assert end_dead_runs(settings, started) == []  # once
    mlflow.set_tracking_uri(None)


def test_a_restarted_scheduler_ends_its_killed_retrains_runs(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from anomaly import tracking
    from anomaly.scheduler import last_run_path

    ml = mlflow_store(tmp_path, "pump")
    settings = build_settings({"mlflow": ml})
    tracking.configure_from(settings.mlflow)
    experiment = tracking.ensure_experiment(settings.mlflow.experiment, settings.mlflow.artifact_location)
    client = MlflowClient()
    started = time.time()
    left = _running_run(client, experiment, retrain="true", **{"retrain.trigger": "schedule"})
    store = tmp_path / "scheduler.db"
    last_run_path(str(store)).write_text(json.dumps({"running_since": started}))  # what the killed one left
    env = {**os.environ, "PYTHONPATH": str(REPO), "ANOMALY_MLFLOW__TRACKING_URI": ml["tracking_uri"],
           "ANOMALY_MLFLOW__ARTIFACT_LOCATION": ml["artifact_location"], "ANOMALY_MLFLOW__MODEL_NAME": "pump"}
    done = subprocess.run([sys.executable, "-m", "anomaly.cli", "scheduler", "--job-store", str(store),
                           "--metrics-port", "-1", "--interval-s", "3600", "--run-for-s", "4"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "never finished" in done.stderr
    assert f"ended 1 MLflow run(s) the killed retrain left running as FAILED: {left}" in done.stderr
    assert client.get_run(left).info.status == "FAILED"


def test_a_dead_runs_leftovers_that_could_not_be_ended_are_tried_again_at_the_next_start(tmp_path, caplog):
    import json

    from anomaly.scheduler import last_run_path

    settings = sched_settings(tmp_path, interval_s=3600)
    started = time.time() - 30
    last_run_path(settings.job_store).write_text(json.dumps({"running_since": started}))
    calls: list[float] = []

    def mlflow_down(when: float) -> None:
        calls.append(when)
        raise ConnectionError("tracking server unreachable")

    first = RetrainScheduler(settings, {}, func=STUB, on_dead_run=mlflow_down)
    first.start()
    first.stop()
    assert calls == [started] and "tried again at the next start" in caplog.text
    last = json.loads(last_run_path(settings.job_store).read_text())
    assert "running_since" not in last and last["dead_since"] == started  # counted once, its leftovers kept
    second = RetrainScheduler(settings, {}, func=STUB, on_dead_run=calls.append)
    second.start()
    second.stop()
    assert calls == [started, started]
    assert "dead_since" not in json.loads(last_run_path(settings.job_store).read_text())  # ended: forgotten
    assert second.metrics.value("anomaly_scheduler_jobs_finished_total", {"outcome": "error"}) in (None, 0)


def test_a_run_killed_while_an_older_ones_leftovers_wait_ends_both(tmp_path):
    import json

    from anomaly.scheduler import last_run_path

    settings = sched_settings(tmp_path, interval_s=3600)
    older, newer = time.time() - 600, time.time() - 30
    last_run_path(settings.job_store).write_text(json.dumps({"dead_since": older, "running_since": newer}))
    def mlflow_down(when: float) -> None:
        raise ConnectionError("tracking server unreachable")

    first = RetrainScheduler(settings, {}, func=STUB, on_dead_run=mlflow_down)
    first.start()
    first.stop()
    # not ended: kept from the older start (the newer one alone was saved, and the older runs never ended)
    assert json.loads(last_run_path(settings.job_store).read_text())["dead_since"] == older
    calls: list[float] = []
    sched = RetrainScheduler(settings, {}, func=STUB, on_dead_run=calls.append)
    sched.start()
    sched.stop()
    assert calls == [older]  # runs started from the older one's start on: both retrains' leftovers
    last = json.loads(last_run_path(settings.job_store).read_text())
    assert "dead_since" not in last and "running_since" not in last
