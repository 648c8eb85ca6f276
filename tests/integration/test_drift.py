"""The drift trigger against the real broker (Tansu) and a real SQLite MLflow store: the scheduler's
drift check reads per-window score records from the scores topic with its own consumer group;
scores drawn from the champion's validation distribution start no retrain, scores shifted upwards
start one early (the stored retrain job, told ``trigger="drift: ..."``), and the cooldown keeps a
persisting drift from starting another. A stub job stands in for the retrain (the real one is
covered by test_retrain.py and test_scheduler_worker.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from anomaly import kafka_io, tracking
from anomaly.config import build_settings
from anomaly.preparation import prepare_training
from anomaly.scheduler import DriftMonitor, RetrainScheduler, ScoreReader, reference_for_version
from anomaly.train_job import run_training
from tests.fixtures import mlflow_store, normal_frame, wait_for

pytestmark = pytest.mark.integration

STUB = "tests.integration.test_drift:stub_job"
NAME = "pump"


def stub_job(path: str = "", trigger: str = "schedule") -> dict:
    """One JSON line per run with the trigger it was given."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"trigger": trigger}) + "\n")
    return {"status": "skipped", "reason": "stub", "seconds": 0.0}


def runs(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(settings, champion version) of a small detector registered as pump@champion."""
    root = tmp_path_factory.mktemp("drift")
    settings = build_settings({
        "mlflow": mlflow_store(root, NAME),
        "model": {"window_size": 8, "hidden_size": 16, "latent_size": 4},
        "training": {"epochs": 3, "batch_size": 64, "device": "cpu"},
        "threshold": {"method": "quantile", "q": 0.99},
    })
    outcome = run_training(prepare_training(normal_frame(800, seed=1)), settings, source="synthetic",
                           dataset="synthetic", promote=True, progress=False)
    return settings, outcome.version


def in_distribution(reference, n: int, rng) -> np.ndarray:
    """Scores with the reference's bin proportions (uniform inside each bin)."""
    edges = [reference.values[0] / 2, *reference.values, reference.values[-1] * 1.5]
    bins = rng.choice(len(reference.expected), size=n, p=reference.expected)
    return rng.uniform(np.take(edges, bins), np.take(edges, bins + 1))


def publish_scores(bootstrap, topic, scores, version) -> None:
    producer = kafka_io.make_producer(bootstrap)
    for i, score in enumerate(scores):
        doc = {"entity": f"pump-{i % 4}", "ts": 1_790_000_000.0 + i, "start_ts": 0.0, "score": float(score),
               "threshold": 1.0, "anomalous": False, "filled": 0, "model": {"name": NAME, "version": version}}
        producer.send(topic, key=doc["entity"].encode(), value=json.dumps(doc).encode())
    producer.flush()
    producer.close()


def drift_scheduler(settings, tmp_path, kafka_broker, topic):
    full = build_settings({
        "mlflow": {"tracking_uri": settings.mlflow.tracking_uri, "model_name": NAME},
        "kafka": {"bootstrap_servers": kafka_broker, "scores_topic": topic},
        "scheduler": {"job_store": str(tmp_path / "scheduler.db"), "interval_s": 3600, "metrics_port": -1},
        "drift": {"enabled": True, "check_interval_s": 1, "window": 2000, "min_samples": 1000,
                  "psi_threshold": 0.25, "max_alarm_rate": 0.05, "cooldown_s": 3600,
                  "group_id": f"{topic}.drift", "read_idle_s": 0.5},
    })
    out = tmp_path / "runs.jsonl"
    sched = RetrainScheduler(full.scheduler, {"path": str(out)}, func=STUB, drift=DriftMonitor(full),
                             pass_trigger=True)
    return sched, out


def test_in_distribution_scores_start_no_retrain(store, kafka_broker, topic_name, tmp_path):
    settings, version = store
    tracking.configure(settings.mlflow.tracking_uri)
    reference = reference_for_version(NAME, version)
    assert reference is not None and len(reference.values) >= 2  # p50 and the threshold at least
    kafka_io.ensure_topics(kafka_broker, {topic_name: 4})
    publish_scores(kafka_broker, topic_name, in_distribution(reference, 1500, np.random.default_rng(0)), version)
    sched, out = drift_scheduler(settings, tmp_path, kafka_broker, topic_name)
    sched.start()
    try:
        m = sched.metrics
        assert wait_for(lambda: (m.value("anomaly_scheduler_drift_checks_total", {"result": "ok"}) or 0) >= 2, 30)
        assert m.value("anomaly_scheduler_drift_samples") == 1500
        assert m.value("anomaly_scheduler_drift_psi") < 0.1
        assert m.value("anomaly_scheduler_drift_triggers_total") == 0
        assert runs(out) == []
    finally:
        sched.stop()
    assert not sched.lock.held


def test_drifted_scores_start_a_retrain_early_once(store, kafka_broker, topic_name, tmp_path):
    settings, version = store
    tracking.configure(settings.mlflow.tracking_uri)
    reference = reference_for_version(NAME, version)
    kafka_io.ensure_topics(kafka_broker, {topic_name: 4})
    rng = np.random.default_rng(1)
    # An older champion's scores are ignored; the champion's own scores have tripled.
    publish_scores(kafka_broker, topic_name, np.full(500, 1e3), "0")
    publish_scores(kafka_broker, topic_name, 3 * in_distribution(reference, 1500, rng), version)
    sched, out = drift_scheduler(settings, tmp_path, kafka_broker, topic_name)
    sched.start()
    try:
        assert wait_for(lambda: len(runs(out)) >= 1, 30), "drift should have started the retrain job early"
        assert runs(out)[0]["trigger"].startswith("drift: ")
        m = sched.metrics
        assert m.value("anomaly_scheduler_drift_triggers_total") == 1
        assert m.value("anomaly_scheduler_drift_psi") >= 0.25
        assert sched.last_assessment is not None and sched.last_assessment.samples == 1500
        # Still drifted: new scores fill the (cleared) window again, but the cooldown holds the next retrain.
        publish_scores(kafka_broker, topic_name, 3 * in_distribution(reference, 1500, rng), version)
        assert wait_for(lambda: (m.value("anomaly_scheduler_drift_checks_total", {"result": "drift"}) or 0) >= 2, 30)
        time.sleep(1.5)
        assert len(runs(out)) == 1 and m.value("anomaly_scheduler_drift_triggers_total") == 1
        # The stored job went back to its plain arguments: the next scheduled run says "schedule".
        assert sched.scheduler.get_job("anomaly-retrain").kwargs == {"path": str(out)}
    finally:
        sched.stop()
    # What the check read is committed for its group: a new reader of the group finds nothing new.
    reader = ScoreReader(kafka_broker, topic_name, f"{topic_name}.drift")
    try:
        assert reader.read(10_000, idle_s=1.0) == []
    finally:
        reader.close()
