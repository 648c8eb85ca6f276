"""A retraining cycle against a real broker (Tansu) and a real SQLite MLflow store: a better challenger
is promoted, a worse one is registered but kept out, a failure leaves the champion serving, too little
data is a skip, and ``anomaly retrain`` runs the same cycle from the command line.

The store holds two tiny champions trained up front: ``weak`` (1 epoch) and ``strong`` (many epochs);
each test first gives @champion to the one it needs, so tests do not depend on each other's order.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from anomaly import registry, replay, tracking
from anomaly.config import build_settings
from anomaly.preparation import prepare_training
from anomaly.retrain import run_cycle
from anomaly.train_job import run_training
from tests.fixtures import mlflow_store, normal_frame, wait_for, with_fault

pytestmark = pytest.mark.integration

NAME = "pump"
ROWS = 1500


def settings_for(root, bootstrap="127.0.0.1:1", topic="sensors", epochs=12, **retrain):
    return build_settings({
        "mlflow": mlflow_store(root, NAME),
        "model": {"window_size": 8, "hidden_size": 16, "latent_size": 4},
        "training": {"epochs": epochs, "batch_size": 64, "device": "cpu", "patience": 4},
        "threshold": {"method": "quantile", "q": 0.99},
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topic},
        "retrain": {"min_rows": 300, "read_idle_s": 1.0, "read_timeout_s": 30.0, "exclude_margin_rows": 8,
                    "holdout_fraction": 0.25, "min_improvement": 0.05, "max_false_alarm_increase": 0.02,
                    **retrain},
        "scheduler": {"job_store": str(root / "scheduler.db")},
    })


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(root, weak version, strong version)."""
    root = tmp_path_factory.mktemp("retrain")
    prepared = prepare_training(normal_frame(800, seed=1))
    weak = run_training(prepared, settings_for(root, epochs=1), source="synthetic", dataset="synthetic",
                        promote=True, progress=False)
    strong = run_training(prepare_training(normal_frame(ROWS, seed=2)), settings_for(root, epochs=6),
                          source="synthetic", dataset="synthetic", progress=False)
    yield root, weak.version, strong.version
    tracking.configure(settings_for(root).mlflow.tracking_uri)


@pytest.fixture(scope="module")
def normal_topic(kafka_broker, tmp_path_factory):
    """A topic holding ROWS normal readings of pump-0 with a fault in the middle."""
    topic = f"retrain-normal-{np.random.default_rng().integers(1 << 30)}"
    frame, _ = with_fault(normal_frame(ROWS, seed=3), start=600, length=60, size=0.5)
    plan = replay.replay_plan(frame, "pump", start_ts=1_790_000_000.0)
    replay.replay(kafka_broker, topic, plan, progress=False)
    return topic


def champion_version(settings) -> str | None:
    tracking.configure(settings.mlflow.tracking_uri)
    return registry.alias_version(NAME, "champion")


def give_champion(settings, version) -> None:
    tracking.configure(settings.mlflow.tracking_uri)
    registry.promote(NAME, version, "champion", reason="test setup")


def comparison_run(settings, run_id):
    from mlflow import MlflowClient

    tracking.configure(settings.mlflow.tracking_uri)
    return MlflowClient().get_run(run_id)


def write_config(path, settings, epochs: int = 4):
    """The test settings as the TOML file an operator would write."""
    ml, k = settings.mlflow, settings.kafka
    path.write_text("\n".join([
        "[mlflow]", f'tracking_uri = "{ml.tracking_uri}"', f'artifact_location = "{ml.artifact_location}"',
        f'model_name = "{NAME}"',
        "[model]", "window_size = 8", "hidden_size = 16", "latent_size = 4",
        "[training]", 'device = "cpu"', "batch_size = 64", "patience = 4", f"epochs = {epochs}",
        "[threshold]", 'method = "quantile"', "q = 0.99",
        "[kafka]", f'bootstrap_servers = "{k.bootstrap_servers}"', f'input_topic = "{k.input_topic}"',
        "[retrain]", "min_rows = 300", "read_idle_s = 1.0", "holdout_fraction = 0.25", "exclude_margin_rows = 8",
        "max_false_alarm_increase = 0.02",
        "[scheduler]", f'job_store = "{settings.scheduler.job_store}"', ""]))
    return path


def test_anomaly_retrain_promotes_a_better_challenger(store, kafka_broker, normal_topic, tmp_path, capsys):
    """``anomaly retrain`` (the scheduler's job runs the same ``run_retrain``) on replayed normal data
    with a fault in it: the weak champion flags the fault, it is kept out, the challenger wins."""
    from anomaly.cli import main

    root, weak, _ = store
    settings = settings_for(root, kafka_broker, normal_topic)
    give_champion(settings, weak)
    rc = main(["retrain", "--config", str(write_config(tmp_path / "anomaly.toml", settings)), "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0, result
    assert result["status"] == "promoted", result["reason"]
    assert result["champion_version"] == weak
    assert champion_version(settings) == result["challenger_version"]
    assert registry.alias_version(NAME, "challenger") == result["challenger_version"]
    # the fault in the middle was flagged by the champion and kept out of training
    assert result["data"]["flagged_windows"] > 0 and result["data"]["rows_excluded"] > 0
    assert result["data"]["entities"] == "pump-0"
    assert result["metrics"]["challenger.mean_error"] < result["metrics"]["champion.mean_error"]
    run = comparison_run(settings, result["comparison_run_id"])
    assert run.data.tags["decision"] == "promoted"
    assert "champion.mean_error" in run.data.metrics and "challenger.false_alarm_rate" in run.data.metrics
    # what ran, on which stretch: every retrain setting, the code, where the hold-out lies
    assert run.data.params["retrain.lookback_s"] == "604800.0" and run.data.tags["code_version"]
    tags = run.data.tags
    assert tags["data.history_start"] < tags["data.holdout_start"] < tags["data.holdout_end"] <= tags["data.history_end"]
    assert tags["data.holdout_overlaps_champion_data"] == "False"  # the champion trained on January's data
    version = registry.client().get_model_version(NAME, result["challenger_version"])
    assert version.tags["retrain.decision"] == "promoted"
    assert version.tags["retrain.champion_version"] == weak  # what it was trained against, and on what data
    assert int(version.tags["retrain.train_rows"]) >= 300 and version.tags["retrain.origin"] == f"kafka:{normal_topic}"


def shuffle_rows(values: np.ndarray) -> np.ndarray:
    """Corrupt training data: same marginal distribution (same scaler), no temporal structure."""
    return np.random.default_rng(0).permutation(values, axis=0)


def test_worse_challenger_is_registered_but_not_promoted(store, kafka_broker, normal_topic):
    root, _, strong = store
    settings = settings_for(root, kafka_broker, normal_topic, epochs=2)
    give_champion(settings, strong)
    result = run_cycle(settings, data_transform=shuffle_rows)
    assert result.status == "kept", result.reason
    assert result.challenger_version is not None
    assert champion_version(settings) == strong
    assert registry.alias_version(NAME, "challenger") == result.challenger_version
    run = comparison_run(settings, result.comparison_run_id)
    assert run.data.tags["decision"] == "kept"
    assert run.data.tags["challenger.version"] == result.challenger_version
    assert registry.client().get_model_version(NAME, result.challenger_version).tags["retrain.decision"] == "kept"


def test_a_promotion_by_hand_while_the_gate_logs_is_not_overridden(store, kafka_broker, normal_topic, monkeypatch):
    """The gate would promote (a better challenger than the weak champion), but an operator moves
    @champion to another version after the gate's check: the gate's own promotion re-checks and keeps out."""
    root, weak, strong = store
    settings = settings_for(root, kafka_broker, normal_topic)
    give_champion(settings, weak)
    real = registry.promote

    def operator_moves_it_first(name, version, alias="champion", reason="", **kwargs):
        if reason.startswith("retrain gate"):
            real(NAME, strong, "champion", reason="by hand")
        return real(name, version, alias, reason=reason, **kwargs)

    monkeypatch.setattr(registry, "promote", operator_moves_it_first)
    result = run_cycle(settings)
    assert result.status == "kept" and "not moving it" in result.reason, result.reason
    assert champion_version(settings) == strong  # the operator's choice stands
    run = comparison_run(settings, result.comparison_run_id)
    assert run.data.tags["decision"] == "kept"
    assert registry.client().get_model_version(NAME, result.challenger_version).tags["retrain.decision"] == "kept"


def test_a_failed_promotion_is_recorded_as_failed_not_promoted(store, kafka_broker, normal_topic, monkeypatch):
    """The registry fails at the gate's move: the run, the version tag and the result say "failed" (they
    said "promoted", with v(weak) still serving) and still name the challenger and the comparison run."""
    from anomaly.errors import RegistryError

    root, weak, _ = store
    settings = settings_for(root, kafka_broker, normal_topic)
    give_champion(settings, weak)

    real = registry.promote

    def registry_down(name, version, alias="champion", reason="", **kwargs):
        if reason.startswith("retrain gate"):
            raise RegistryError("cannot record the promotion history: database is locked")
        return real(name, version, alias, reason=reason, **kwargs)  # the challenger's alias at training

    monkeypatch.setattr(registry, "promote", registry_down)
    result = run_cycle(settings)
    assert result.status == "failed" and "but the promotion failed: cannot record" in result.reason, result.reason
    assert champion_version(settings) == weak and result.challenger_version and result.comparison_run_id
    run = comparison_run(settings, result.comparison_run_id)
    assert run.data.tags["decision"] == "failed" and run.data.metrics["promoted"] == 0.0
    assert run.data.tags["mlflow.runName"] == "retrain-compare-failed"
    assert registry.client().get_model_version(NAME, result.challenger_version).tags["retrain.decision"] == "failed"


def test_bad_data_fails_and_leaves_the_champion(store, kafka_broker, normal_topic):
    root, weak, _ = store
    settings = settings_for(root, kafka_broker, normal_topic, epochs=1)
    give_champion(settings, weak)

    def broken(values):
        raise ValueError("corrupt training data")

    result = run_cycle(settings, data_transform=broken)
    assert result.status == "failed" and "corrupt training data" in result.reason
    assert result.challenger_version is None
    assert champion_version(settings) == weak


def test_unreachable_store_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = settings_for(tmp_path)
    settings = dataclasses.replace(settings, mlflow=dataclasses.replace(settings.mlflow,
                                                                        tracking_uri="http://127.0.0.1:9"))
    result = run_cycle(settings)
    assert result.status == "failed"
    assert "registry" in result.reason


def test_too_little_data_is_a_skip(store, kafka_broker, topic_name):
    root, weak, _ = store
    frame = normal_frame(100, seed=4)
    replay.replay(kafka_broker, topic_name, replay.replay_plan(frame, "pump", start_ts=1_790_000_000.0),
                  progress=False)
    settings = settings_for(root, kafka_broker, topic_name)
    give_champion(settings, weak)
    result = run_cycle(settings)
    assert result.status == "skipped" and "too little clean data" in result.reason
    assert result.challenger_version is None and champion_version(settings) == weak


def test_readings_from_the_topic_with_a_sensor_more_than_the_champion_reads_are_not_trained_on(
        store, kafka_broker, topic_name):
    """The worker dead-letters a reading whose sensor set is not its model's, extra sensors included:
    retraining on the topic leaves them out as well (it kept them, and trained on readings never scored)."""
    root, weak, _ = store
    frame = normal_frame(300, seed=4)
    frame["added_later"] = 1.0
    replay.replay(kafka_broker, topic_name, replay.replay_plan(frame, "pump", start_ts=1_790_000_000.0),
                  progress=False)
    settings = settings_for(root, kafka_broker, topic_name)
    give_champion(settings, weak)
    result = run_cycle(settings)
    assert result.status == "skipped" and "300 of 300 readings read do not carry exactly the champion's sensors" \
        in result.reason, result.reason
    assert result.data["readings_ignored"] == 300 and champion_version(settings) == weak


def test_a_missing_input_topic_is_a_skip_that_names_it(store, kafka_broker, topic_name):
    """The topic was never created (a typo in kafka.input_topic): the skip names it, on the real broker
    (it used to read as "too little clean data")."""
    root, weak, _ = store
    settings = settings_for(root, kafka_broker, topic_name, read_idle_s=0.2)
    give_champion(settings, weak)
    result = run_cycle(settings)
    assert result.status == "skipped" and repr(topic_name) in result.reason and "no partitions" in result.reason
    assert result.challenger_version is None and champion_version(settings) == weak


def test_too_few_windows_for_the_challenger_is_a_skip_not_a_failure(store, tmp_path):
    """Enough rows for retrain.min_rows and a hold-out, too few for a challenger with a long window:
    a skip that says so (it used to fail inside training, reported as a failed retrain)."""
    result, settings, weak = _cycle_with_window(store, tmp_path, 60, normal_frame(100, seed=4), min_rows=10)
    assert result.status == "skipped" and "training windows of 60 (need 4)" in result.reason, result.reason
    assert result.challenger_version is None and champion_version(settings) == weak


def _cycle_with_window(store, tmp_path, window: int, history, **retrain):
    """One retrain cycle of a challenger of ``window`` rows over ``history`` (a file), the weak champion
    serving: (result, settings, the champion's version)."""
    root, weak, _ = store
    base = settings_for(root, **retrain)
    settings = dataclasses.replace(base, model=dataclasses.replace(base.model, window_size=window))
    give_champion(settings, weak)
    path = tmp_path / "history.csv"
    history.to_csv(path, index_label="ts")
    return run_cycle(settings, data_path=str(path)), settings, weak


def test_a_hold_out_inside_the_champion_s_training_data_is_said(store, tmp_path):
    """A retrain on the champion's own training file: the hold-out is data the champion early-stopped and
    fitted its threshold on, which leans the gate its way. The cycle says so (tags and result)."""
    result, settings, weak = _cycle_with_window(store, tmp_path, 8, normal_frame(800, seed=1), min_rows=100)
    assert result.data["holdout_overlaps_champion_data"] is True, result.data
    assert result.data["holdout_start"] <= result.data["champion_data_end"], result.data
    version = registry.client().get_model_version(NAME, result.challenger_version)
    assert version.tags["retrain.holdout_overlaps_champion_data"] == "True"
    give_champion(settings, weak)


def test_a_retrain_on_a_file_reads_its_rows_whatever_worker_entities_says(store, tmp_path):
    """worker.entities names the entities the workers serve on the topic; a file's entity is the file's
    name (no entity column), which the patterns do not match: every row was ignored, a skip."""
    root, weak, _ = store
    base = settings_for(root, min_rows=100)
    settings = dataclasses.replace(base, worker=dataclasses.replace(base.worker, entities=["pump-*"]))
    give_champion(settings, weak)
    path = tmp_path / "history.csv"
    normal_frame(800, seed=5).to_csv(path, index_label="ts")
    result = run_cycle(settings, data_path=str(path))
    assert result.status in ("promoted", "kept"), result.reason
    assert result.data["readings_ignored"] == 0 and result.data["rows"] == 800
    give_champion(settings, weak)


def test_a_hold_out_too_short_for_the_challengers_window_is_a_skip_before_training(store, tmp_path):
    """The hold-out compares both models on windows the longer window reaches. A recent clean stretch
    shorter than the challenger's window (32 here, the champion's 8) gave 0 windows to compare: the cycle
    trained and registered a challenger anyway, and kept the champion "as challenger scores are not
    finite". Now it is a skip, before any training, that says why."""
    result, settings, weak = _cycle_with_window(store, tmp_path, 32, normal_frame(1500, seed=3),
                                                holdout_fraction=0.015)
    assert result.status == "skipped" and "0 hold-out windows of 32 (need 1)" in result.reason, result.reason
    assert result.challenger_version is None and champion_version(settings) == weak


def test_history_read_ends_under_live_traffic(kafka_broker, topic_name):
    """A producer keeps writing while the retrain reads (the input topic of a running plant): the read
    ends once every partition is read up to the records written after it began, not at read_timeout_s."""
    import threading
    import time

    from anomaly import codec, kafka_io
    from anomaly.retrain import topic_readings

    frame = normal_frame(300, seed=4)
    replay.replay(kafka_broker, topic_name, replay.replay_plan(frame, "pump", start_ts=1_790_000_000.0),
                  progress=False)
    stop = threading.Event()
    sent = [0]

    def live() -> None:
        producer = kafka_io.make_producer(kafka_broker)
        while not stop.is_set():
            reading = codec.Reading("pump", 1_800_000_000.0 + sent[0], {"temp": 70.0, "pressure": 1.0, "flow": 5.0})
            producer.send(topic_name, key=b"pump", value=codec.encode_reading(reading))
            producer.flush()
            sent[0] += 1
            time.sleep(0.02)
        producer.close()

    writer = threading.Thread(target=live, daemon=True)
    writer.start()
    try:
        assert wait_for(lambda: sent[0] >= 10, 60)  # live records on the topic before the read starts
        stats: dict[str, int] = {}
        started = time.monotonic()
        got = list(topic_readings(kafka_broker, topic_name, idle_s=3.0, timeout_s=40.0, stats=stats))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        writer.join(timeout=5)
    assert elapsed < 15.0, f"read for {elapsed:.1f} s: live traffic kept it going"
    assert "truncated" not in stats and len(got) >= 300 + 10


def test_a_history_read_cut_by_its_timeout_skips_the_cycle(store, kafka_broker, normal_topic, monkeypatch):
    """What a read stopped by read_timeout_s holds is the topic's oldest part: the cycle skips, saying
    why, instead of training and comparing on stale readings."""
    from anomaly import retrain

    root, weak, _ = store
    settings = settings_for(root, kafka_broker, normal_topic)
    give_champion(settings, weak)
    real = retrain.topic_readings

    def cut(*args, **kwargs):
        yield from real(*args, **kwargs)
        args[5]["truncated"] = 1  # stats: as if read_timeout_s had stopped it

    monkeypatch.setattr(retrain, "topic_readings", cut)
    result = run_cycle(settings)
    assert result.status == "skipped" and "not read to its end" in result.reason, result.reason
    assert result.challenger_version is None and champion_version(settings) == weak


def test_a_skip_says_which_readings_did_not_count(store, tmp_path):
    """Readings without the champion's sensors, or stamped far ahead of the clock, are left out of the
    history; a skip for too little data says so instead of only "0 training rows"."""
    from anomaly.codec import Reading

    root, weak, _ = store
    settings = settings_for(root)
    give_champion(settings, weak)
    path = tmp_path / "other.csv"
    normal_frame(200, seed=4).rename(columns=lambda c: f"other_{c}").to_csv(path, index_label="ts")
    result = run_cycle(settings, data_path=str(path))
    assert result.status == "skipped" and "200 of 200 readings read do not carry all of the champion's sensors" \
        in result.reason, result.reason
    assert result.data["readings_ignored"] == 200
    # one reading stamped ten years ahead (worker.max_future_s = 600 by default) no longer pushes every
    # real one out of the lookback
    frame = normal_frame(200, seed=4)
    good = [Reading("pump-1", ts.timestamp() + 0.0, dict(zip(frame.columns, map(float, row))))
            for ts, row in zip(frame.index, frame.to_numpy())]
    future = Reading("pump-9", time.time() + 10 * 365 * 86400.0, dict.fromkeys(frame.columns, 1.0))
    result = run_cycle(settings, source=lambda: iter(good + [future]))
    import re

    rows = re.search(r"too little clean data: (\d+) training rows", result.reason)
    assert result.status == "skipped" and rows and int(rows.group(1)) >= 100, result.reason  # 0 before
    assert "1 readings are stamped further ahead of the clock" in result.reason and result.data["readings_future"] == 1


def test_labelled_file_puts_event_f1_into_the_gate(store, tmp_path):
    """``anomaly retrain --data`` with an ``anomaly`` column: labelled rows are kept out of training
    (instead of the champion's flags), and both models' event F1 on the labelled hold-out tail is logged
    and part of the decision."""
    root, weak, _ = store
    settings = settings_for(root, epochs=6)
    give_champion(settings, weak)
    frame, labels = with_fault(normal_frame(ROWS, seed=5), start=1300, length=60, size=0.8)
    frame = frame.copy()
    frame["anomaly"] = labels.astype(int)
    path = tmp_path / "labelled.csv"
    frame.to_csv(path, index_label="ts")
    result = run_cycle(settings, data_path=str(path))
    # Seeded and deterministic: the challenger wins on error by far more than min_improvement, and both
    # models find the one labelled event (recall 1), but the challenger raises more false events: its
    # lower event F1 keeps the champion.
    assert result.status == "kept" and result.reason.startswith("worse event F1"), result.reason
    assert result.data["labelled_entities"] == 1 and result.data["labelled_rows"] == 60
    assert result.data["flagged_windows"] == 0  # labels replaced the champion's flags
    assert result.data["origin"] == f"file:{path}" and result.data["trigger"] == "manual"
    m = result.metrics
    assert m["champion.labelled_events"] == 1 == m["challenger.labelled_events"]
    assert m["champion.event_recall"] == 1.0 == m["challenger.event_recall"]
    assert m["relative_improvement"] > 0.3  # error alone would have promoted it
    assert m["champion.event_f1"] == pytest.approx(0.4) and m["challenger.event_f1"] < 0.4
    assert f"event F1 {m['challenger.event_f1']:.3f} vs 0.400" in result.reason
    run = comparison_run(settings, result.comparison_run_id)
    assert "challenger.event_f1" in run.data.metrics and run.data.tags["trigger"] == "manual"


def test_a_fleet_retrain_gives_the_challenger_each_entity_s_own_threshold(store, tmp_path):
    """A fleet file (``data.entity_column``): the challenger is fitted on every pump and carries each
    pump's own threshold (fitted on that pump's validation rows). That the gate then holds each pump's
    hold-out to its own value: tests/unit/test_retrain.py."""
    import pandas as pd

    root, weak, _ = store
    base = settings_for(root, epochs=6)
    settings = dataclasses.replace(base, data=dataclasses.replace(base.data, entity_column="pump"),
                                   threshold=dataclasses.replace(base.threshold, per_entity_min_windows=50))
    give_champion(settings, weak)
    quiet = normal_frame(2000, seed=6)
    loud = normal_frame(2000, seed=7)
    loud[["temp", "pressure", "flow"]] += np.random.default_rng(7).normal(0, 0.03, (2000, 3))  # a noisier pump
    path = tmp_path / "fleet.csv"
    pd.concat([quiet.assign(pump="quiet").reset_index(), loud.assign(pump="loud").reset_index()]).to_csv(path, index=False)
    result = run_cycle(settings, data_path=str(path))
    assert result.challenger_version and result.data["entities"] == "loud,quiet", result.data
    challenger, _ = registry.load_detector(NAME, result.challenger_version)
    own = challenger.threshold.per_entity
    assert sorted(own) == ["loud", "quiet"] and own["loud"] > own["quiet"], (own, result.data)  # measured 0.457, 0.396
    assert challenger.threshold.value != own["loud"] and challenger.threshold.value != own["quiet"]


def test_a_fleet_champion_s_pump_missing_from_the_history_is_a_skip_not_a_shared_threshold(store, tmp_path):
    """A fleet champion holds each pump to its own threshold; a history without the loud pump (offline
    longer than the lookback) fits a challenger whose only threshold is the quiet pump's: it held the
    loud pump's normal readings to it (false-alarm rate 1.000 measured) and the gate, judging only the
    pumps in the hold-out, promoted it. Now a skip that names the pump; leaving the pump out of
    retrain.entities says the challenger may go without it."""
    import pandas as pd

    from anomaly.preparation import prepare_fleet

    root, weak, _ = store
    base = settings_for(root, epochs=1)
    settings = dataclasses.replace(base, data=dataclasses.replace(base.data, entity_column="pump"),
                                   threshold=dataclasses.replace(base.threshold, per_entity_min_windows=50))
    quiet, loud = normal_frame(2000, seed=6), normal_frame(2000, seed=7)
    loud[["temp", "pressure", "flow"]] += np.random.default_rng(7).normal(0, 0.3, (2000, 3))
    fleet = run_training(prepare_fleet({"quiet": quiet.iloc[:1000], "loud": loud.iloc[:1000]}, 8,
                                       settings.training.validation_fraction),
                         settings, source="synthetic", dataset="synthetic", promote=True, progress=False)
    try:
        assert sorted(fleet.detector.threshold.per_entity) == ["loud", "quiet"]
        path = tmp_path / "only_quiet.csv"
        quiet.iloc[1000:].assign(pump="quiet").reset_index().to_csv(path, index=False)
        result = run_cycle(settings, data_path=str(path))
        assert result.status == "skipped" and not result.challenger_version, result
        assert "(loud)" in result.reason and "retrain.entities" in result.reason, result.reason
        assert champion_version(settings) == fleet.version
        chosen = dataclasses.replace(settings, retrain=dataclasses.replace(settings.retrain, entities=["quiet"]))
        result = run_cycle(chosen, data_path=str(path))
        assert result.status in ("promoted", "kept") and result.challenger_version, result
        give_champion(settings, fleet.version)
        # the loud pump back, but with too few readings for a threshold of its own: trained, not promoted
        both = tmp_path / "loud_barely.csv"
        pd.concat([quiet.iloc[1000:].assign(pump="quiet").reset_index(),
                   loud.iloc[1000:1200].assign(pump="loud").reset_index()]).to_csv(both, index=False)
        result = run_cycle(settings, data_path=str(both))
        assert result.challenger_version and result.status == "kept", result
        assert "(loud) to the shared one" in result.reason and "per_entity_min_windows" in result.reason, result.reason
        assert champion_version(settings) == fleet.version
    finally:
        give_champion(settings, weak)


def test_a_read_holding_more_entities_than_retrain_max_entities_skips_when_a_real_one_had_to_go(store, tmp_path):
    """More pumps with a window's worth of readings than retrain.max_entities: the read keeps memory bounded
    by letting the ones with the fewest readings go, and a challenger trained on part of the fleet is not
    what anyone asked for: a skip that says so."""
    import pandas as pd

    root, weak, _ = store
    base = settings_for(root, max_entities=3, min_rows=100)
    settings = dataclasses.replace(base, data=dataclasses.replace(base.data, entity_column="pump"))
    give_champion(settings, weak)
    path = tmp_path / "fleet.csv"
    pd.concat([normal_frame(200, seed=10 + i).assign(pump=f"pump-{i}").reset_index() for i in range(5)]).to_csv(
        path, index=False)
    result = run_cycle(settings, data_path=str(path))
    assert result.status == "skipped" and "retrain.max_entities (3)" in result.reason, result.reason
    assert result.data["entities_evicted"] >= 2 and not result.challenger_version


def test_operators_verdicts_given_with_anomaly_feedback_steer_the_next_retrain(
        store, kafka_broker, normal_topic, capsys, monkeypatch):
    """The weak champion flags the fault in the middle of the topic (rows 600-659), so every retrain left
    it out. An operator calls that event normal (`anomaly feedback normal EVENT_ID`, looked up on the
    events topic) and a stretch the champion does not flag a fault (`--entity --start --end`): the next
    cycle reads both from the feedback topic and labels the readings they cover, trains on the first and
    keeps the second out. `feedback list` shows the verdicts in force; `withdraw` takes one back."""
    from anomaly import codec, kafka_io
    from anomaly.cli import main

    root, weak, _ = store
    suffix = np.random.default_rng().integers(1 << 30)
    events_topic, feedback_topic = f"events-{suffix}", f"feedback-{suffix}"
    base = settings_for(root, kafka_broker, normal_topic)
    settings = dataclasses.replace(base, kafka=dataclasses.replace(base.kafka, feedback_topic=feedback_topic,
                                                                   events_topic=events_topic))
    give_champion(settings, weak)
    before = run_cycle(settings)  # no verdicts yet (the feedback topic does not exist)
    assert before.status in ("promoted", "kept"), before.reason
    assert before.data["flagged_windows"] > 0 and "verdicts_normal" not in before.data

    t0 = 1_790_000_000.0
    event = {"event_id": codec.event_id("pump-0", NAME, t0 + 600), "entity": "pump-0", "status": "closed",
             "start_ts": t0 + 600, "end_ts": t0 + 659, "peak_score": 3.0, "threshold": 1.0,
             "model": {"name": NAME, "version": weak}}
    producer = kafka_io.make_producer(kafka_broker)
    producer.send(events_topic, key=b"pump-0", value=codec.encode_event({**event, "status": "open", "end_ts": None}))
    producer.send(events_topic, key=b"pump-0", value=codec.encode_event(event))
    producer.flush(10)
    producer.close()
    for name, value in (("BOOTSTRAP_SERVERS", kafka_broker), ("EVENTS_TOPIC", events_topic),
                        ("FEEDBACK_TOPIC", feedback_topic)):
        monkeypatch.setenv(f"ANOMALY_KAFKA__{name}", value)
    capsys.readouterr()
    assert main(["feedback", "normal", event["event_id"], "--note", "new operating point", "--by", "op"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert (given["entity"], given["start_ts"], given["end_ts"], given["verdict"]) == ("pump-0", t0 + 600, t0 + 659,
                                                                                      "normal")
    assert main(["feedback", "anomaly", "--entity", "pump-0", "--start", "2026-09-21T14:16:40Z",
                 "--end", str(t0 + 219)]) == 0  # 2026-09-21T14:16:40Z = t0 + 200
    fault = json.loads(capsys.readouterr().out)
    assert (fault["start_ts"], fault["end_ts"], fault["event_id"]) == (t0 + 200, t0 + 219, None)
    assert main(["feedback", "list", "--json"]) == 0
    assert [v["verdict"] for v in json.loads(capsys.readouterr().out)] == ["normal", "anomaly"]

    give_champion(settings, weak)
    after = run_cycle(settings)
    assert after.status in ("promoted", "kept"), after.reason
    assert after.data["verdicts_normal"] == 1 and after.data["verdicts_anomaly"] == 1
    # each period widened by 3.5 s (worker.stride 4 less half a period: readings off their slot, windows the
    # worker's stride left out around the event)
    assert after.data["verdict_normal_readings"] == 66 and after.data["verdict_anomaly_readings"] == 26
    assert after.data["flagged_windows"] < before.data["flagged_windows"]  # the fault's windows are normal now
    assert after.data["labelled_rows"] == 26
    # the gate checks both models on the period called an anomaly (the retrain left it out of training)
    assert after.metrics["champion.labelled_anomaly_periods"] == after.metrics["challenger.labelled_anomaly_periods"] == 1
    assert "labelled anomaly periods found" in after.reason
    compared = comparison_run(settings, after.comparison_run_id).data.tags  # as on the challenger
    assert compared["retrain.verdicts_normal"] == "1" and compared["retrain.verdict_anomaly_readings"] == "26"
    import mlflow  # which verdicts, by whom: an artifact of the comparison run

    said = mlflow.artifacts.load_dict(f"runs:/{after.comparison_run_id}/verdicts.json")["verdicts"]
    assert [(v["verdict"], v["by"], v["note"]) for v in said] == [("normal", "op", "new operating point"),
                                                                  ("anomaly", said[1]["by"], "")]

    assert main(["feedback", "withdraw", "--entity", "pump-0", "--start", str(t0 + 200), "--end", str(t0 + 219)]) == 0
    capsys.readouterr()
    assert main(["feedback", "list", "--entity", "pump-0"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and "normal" in listed[1] and "new operating point" in listed[1]
    # a mistyped event id is said, and nothing is sent
    assert main(["feedback", "normal", "nosuchevent"]) == 2
    assert f"error: no event nosuchevent on {events_topic}" in capsys.readouterr().err
    assert main(["feedback", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    # a maintenance period: its readings are left out of training and of the comparison, and label nothing
    assert main(["feedback", "maintenance", "--entity", "pump-0", "--start", str(t0 + 1000),
                 "--end", str(t0 + 1099), "--note", "seal swap"]) == 0
    capsys.readouterr()
    give_champion(settings, weak)
    serviced = run_cycle(settings)
    assert serviced.data["verdicts_maintenance"] == 1 and serviced.data["labelled_rows"] == 0
    assert serviced.data["verdict_maintenance_readings"] == 106  # 100 readings, the period widened by 3.5 s a side


def test_a_sensor_the_champions_training_left_out_is_read_past_and_stays_left_out(store, kafka_broker):
    """The champion trained where flow was constant, so flow was left out (and said); the producers still
    send it. The retrain ignored every reading ("do not carry exactly the champion's sensors") and skipped
    forever; now it reads past flow, as the worker does, and the challenger leaves it out too."""
    root, weak, _ = store
    frame = normal_frame(800, seed=4)
    frame["flow"] = 5.0
    prepared = prepare_training(frame)
    assert prepared.sensors == ["temp", "pressure"] and prepared.dropped == ["flow"]
    run_training(prepared, settings_for(root, epochs=1), source="synthetic", dataset="synthetic", promote=True,
                 progress=False)
    topic = f"retrain-left-out-{np.random.default_rng().integers(1 << 30)}"
    replay.replay(kafka_broker, topic, replay.replay_plan(normal_frame(ROWS, seed=5), "pump",
                                                          start_ts=1_790_000_000.0), progress=False)
    from anomaly.kafka_io import make_producer

    producer = make_producer(kafka_broker)  # then the stuck sensor reads "n/a": the worker reads past it too
    for i in range(100):
        producer.send(topic, key=b"pump-0", value=json.dumps({"entity": "pump-0", "ts": 1_790_000_000.0 + ROWS + i,
                                                              "values": {"temp": 70.0, "pressure": 1.0,
                                                                         "flow": "n/a"}}).encode())
    producer.flush(timeout=30)
    producer.close()
    settings = settings_for(root, kafka_broker, topic, epochs=1)
    try:
        result = run_cycle(settings)
        assert result.status in ("promoted", "kept"), result.reason
        assert result.data["readings_ignored"] == 0 and result.data["readings_seen"] == ROWS + 100
        assert result.data["bad_records"] == 0
        challenger, _ = registry.load_detector(NAME, result.challenger_version)
        assert challenger.sensors == ("temp", "pressure") and challenger.ignored_sensors == ("flow",)
    finally:
        give_champion(settings, weak)


def test_with_partial_readings_a_producer_sending_one_sensor_a_message_is_retrained_on(store, kafka_broker):
    """worker.partial_readings: the worker scores a slot sent one sensor a message; the retrain refused
    every such reading and skipped ("do not carry exactly the champion's sensors: the worker dead-letters
    others", which it did not)."""
    from anomaly.codec import Reading, encode_reading
    from anomaly.kafka_io import make_producer

    root, weak, _ = store
    give_champion(settings_for(root), weak)
    topic = f"retrain-partial-{np.random.default_rng().integers(1 << 30)}"
    frame = normal_frame(ROWS, seed=6)
    producer = make_producer(kafka_broker)
    try:
        for i, (ts, row) in enumerate(frame.iterrows()):
            stamp = 1_790_000_000.0 + i
            for sensor, value in row.items():
                producer.send(topic, key=b"pump-0", value=encode_reading(Reading("pump-0", stamp, {sensor: float(value)})))
        producer.flush(timeout=30)
    finally:
        producer.close()
    settings = settings_for(root, kafka_broker, topic, epochs=1)
    strict = run_cycle(settings)
    assert strict.status == "skipped" and "carry exactly the champion's sensors" in strict.reason
    settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker, partial_readings=True))
    result = run_cycle(settings)
    assert result.status in ("promoted", "kept"), result.reason
    assert result.data["readings_ignored"] == 0 and result.data["readings_seen"] == 3 * ROWS
    assert result.data["train_rows"] >= 300
    give_champion(settings, weak)


def test_a_fleet_moving_to_another_sensor_set_is_said_not_silently_trained_around(store, kafka_broker, caplog):
    """A firmware update adds a vibration sensor to pump-0 at 60 % of the history: the worker dead-letters
    its readings from then on, and the retrain trained on the older ones and said nothing for up to
    retrain.lookback_s; now its log and the version's tags name the entity and the change."""
    root, weak, _ = store
    give_champion(settings_for(root), weak)
    topic = f"retrain-new-set-{np.random.default_rng().integers(1 << 30)}"
    plan = replay.replay_plan(normal_frame(ROWS, seed=7), "pump", start_ts=1_790_000_000.0)
    plan = [(e, r if i < 0.6 * ROWS else dataclasses.replace(r, values={**r.values, "vibration": 0.1}))
            for i, (e, r) in enumerate(plan)]
    replay.replay(kafka_broker, topic, plan, progress=False)
    settings = settings_for(root, kafka_broker, topic, epochs=1)
    with caplog.at_level("WARNING", logger="anomaly.retrain"):
        result = run_cycle(settings)
    assert result.data["sensor_set_changed"] == "pump-0 (+vibration)"
    assert any("1 entities send another sensor set than the champion's" in r.getMessage() for r in caplog.records)
    assert result.challenger_version, result.reason  # trained on the 900 readings of the old set, and tagged
    version = registry.client().get_model_version(NAME, result.challenger_version)
    assert version.tags["retrain.sensor_set_changed"] == "pump-0 (+vibration)"
    give_champion(settings, weak)
