"""The whole retraining loop, live: a worker scores a stream while the scheduler's real retrain job
trains a challenger on that stream, finds it better than the (weak) champion and promotes it; the
running worker picks the new version up between batches, and every window is still scored exactly
once (nothing lost across the swap). Real broker (Tansu), real SQLite MLflow store."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from anomaly import kafka_io, registry, replay, tracking
from anomaly.alerts import AlertPolicy
from anomaly.config import build_settings
from anomaly.model_follower import ModelFollower
from anomaly.preparation import prepare_training
from anomaly.scheduler import JOB_FUNC, JOB_ID, RetrainScheduler, settings_dict
from anomaly.train_job import run_training
from anomaly.window_state import WindowPolicy
from anomaly.worker import Worker, WorkerOptions
from tests.fixtures import WORKER_CLIENT_OPTIONS, mlflow_store, normal_frame, wait_for

pytestmark = pytest.mark.integration

START_TS = 1_790_000_000.0
NAME = "pump"
W = 8


def plan_for(frame, entity, start_ts):
    return [(entity, dataclasses.replace(r, entity=entity))
            for _, r in replay.replay_plan(frame, entity, start_ts=start_ts)]



def test_worker_serves_the_version_the_scheduler_promotes(kafka_broker, topic_name, tmp_path):
    prefix = topic_name
    settings = build_settings({
        "mlflow": mlflow_store(tmp_path, NAME),
        "model": {"window_size": W, "hidden_size": 16, "latent_size": 4},
        "training": {"epochs": 1, "batch_size": 64, "device": "cpu", "patience": 4},
        "threshold": {"method": "quantile", "q": 0.99},
        "kafka": {"bootstrap_servers": kafka_broker, "input_topic": f"{prefix}.in",
                  "scores_topic": f"{prefix}.scores"},
        "retrain": {"min_rows": 300, "read_idle_s": 1.0, "read_timeout_s": 30.0, "exclude_margin_rows": 8,
                    "holdout_fraction": 0.25, "min_improvement": 0.05, "max_false_alarm_increase": 0.02},
        "scheduler": {"job_store": str(tmp_path / "scheduler.db"), "interval_s": 2, "metrics_port": -1},
    })
    # A weak champion (1 epoch): a challenger trained for longer on the live stream beats it.
    weak = run_training(prepare_training(normal_frame(800, seed=1)), settings, source="synthetic",
                        dataset="synthetic", promote=True, progress=False)
    job_settings = build_settings({**settings_dict(settings), "training": {
        **settings_dict(settings)["training"], "epochs": 8}})

    opts = WorkerOptions(bootstrap_servers=kafka_broker, input_topic=f"{prefix}.in", events_topic=f"{prefix}.events",
                         dlq_topic=f"{prefix}.dlq", scores_topic=f"{prefix}.scores", group_id=f"{prefix}.group",
                         client_options=dict(WORKER_CLIENT_OPTIONS), window_policy=WindowPolicy(window_size=2, period_s=1.0, stride=1),
                         alert_policy=AlertPolicy(min_duration_windows=3, recovery_windows=5, cooldown_s=30),
                         poll_timeout_s=0.5, input_partitions=4, device="cpu")
    kafka_io.ensure_topics(kafka_broker, {opts.input_topic: 4})
    first = normal_frame(1500, seed=3)
    replay.replay(kafka_broker, opts.input_topic, plan_for(first, "pump-0", START_TS), progress=False)

    tracking.configure(settings.mlflow.tracking_uri)
    worker = Worker(opts, ModelFollower(NAME, "champion", check_interval_s=0.5))
    outcome: dict = {}

    def run_worker():
        try:
            outcome["stats"] = worker.run()
        except BaseException as exc:  # surfaced below
            outcome["error"] = exc

    thread = threading.Thread(target=run_worker, daemon=True)
    thread.start()
    # the first stretch scored by the weak champion before the scheduler starts (a busy machine could
    # otherwise let the retrain promote before the worker has its partitions)
    assert wait_for(lambda: worker.stats.consumed >= len(first), 60)
    sched = RetrainScheduler(settings.scheduler, {"config": None, "overrides": settings_dict(job_settings)},
                             func=JOB_FUNC)
    sched.start()
    try:
        # One scheduled run is enough: pause the job once it has started (the run in hand goes on).
        assert wait_for(lambda: (sched.metrics.value("anomaly_scheduler_jobs_started_total") or 0) >= 1, 20)
        sched.scheduler.pause_job(JOB_ID)
        assert wait_for(lambda: sum(sched.metrics.value("anomaly_scheduler_jobs_finished_total", {"outcome": o}) or 0
                                    for o in ("promoted", "kept", "skipped", "failed", "error")) >= 1, 240)
    finally:
        sched.stop()
    assert sched.metrics.value("anomaly_scheduler_jobs_finished_total", {"outcome": "promoted"}) == 1
    tracking.configure(settings.mlflow.tracking_uri)
    new_version = registry.alias_version(NAME, "champion")
    assert new_version is not None and new_version != weak.version
    tags = registry.client().get_model_version(NAME, new_version).tags
    assert tags["retrain.decision"] == "promoted" and tags["retrain.trigger"] == "schedule"

    assert wait_for(lambda: worker.stats.model_swaps >= 1, 20), "the running worker did not follow @champion"
    second = normal_frame(300, seed=4)
    replay.replay(kafka_broker, opts.input_topic, plan_for(second, "pump-0", START_TS + len(first)), progress=False)
    total = len(first) + len(second)
    assert wait_for(lambda: worker.stats.consumed >= total, 30)
    worker.stop()
    thread.join(30)
    assert not thread.is_alive(), "the worker did not stop within 30 s"
    assert "error" not in outcome, outcome.get("error")
    docs = [json.loads(r.value) for r in kafka_io.read_all(kafka_broker, opts.scores_topic, timeout_s=30, idle_s=2)]
    ends = sorted(d["ts"] for d in docs)
    assert ends == [START_TS + i for i in range(W - 1, total)], "every window scored exactly once across the swap"
    late = [d for d in docs if d["ts"] >= START_TS + len(first)]
    assert late and {d["model"]["version"] for d in late} == {new_version}
    early = [d for d in docs if d["ts"] < START_TS + 200]
    assert {d["model"]["version"] for d in early} == {weak.version}
