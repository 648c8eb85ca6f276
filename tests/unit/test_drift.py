"""The drift core: reference from a training run, PSI, the verdict, the score window and the cooldown
gate; and the scheduler's drift check with an injected reader and registry. No broker, no MLflow."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from anomaly.config import build_settings
from anomaly.drift import (PSI_FLOOR, Assessment, DriftBounds, DriftGate, LiveScore, Reference, ScoreWindow, assess,
                           bin_proportions, nominal_alarm_rate, parse_score_record, psi, reference_from_run)
from anomaly.errors import ConfigError
from anomaly.scheduler_metrics import SchedulerMetrics

# A validation distribution: exponential scores, median ln 2, p99 ln 100; threshold at p99.9.
METRICS = {"threshold": math.log(1000), "val_false_alarm_rate": 0.001, "val_score_p50": math.log(2),
           "val_score_p99": math.log(100)}


def reference() -> Reference:
    ref = reference_from_run("3", METRICS, {"threshold.method": "pot", "threshold.risk": "0.001"})
    assert ref is not None
    return ref


def test_reference_from_run_has_the_validation_cut_points():
    ref = reference()
    assert ref.values == pytest.approx((math.log(2), math.log(100), math.log(1000)))
    assert ref.cdf == pytest.approx((0.5, 0.99, 0.999))
    assert ref.expected == pytest.approx([0.5, 0.49, 0.009, 0.001])
    assert ref.threshold == pytest.approx(math.log(1000)) and ref.expected_alarm_rate == 0.001


def test_reference_falls_back_to_the_policys_nominal_rate_and_drops_disagreeing_points():
    # No validation rate recorded: the pot risk is the expected alarm rate.
    no_rate = {k: v for k, v in METRICS.items() if k != "val_false_alarm_rate"}
    ref = reference_from_run("1", no_rate, {"threshold.method": "pot", "threshold.risk": "0.002"})
    assert ref.expected_alarm_rate == 0.002 and ref.cdf[-1] == pytest.approx(0.998)
    # No validation window above the threshold: at most 1 / (n + 1) of the mass is above it (the nominal
    # 1 - q claimed mass the unchanged live scores then missed: a false "drift" at PSI ~0.3).
    ref = reference_from_run("1", {**METRICS, "val_false_alarm_rate": 0.0, "val_windows": 499.0},
                             {"threshold.method": "quantile", "threshold.q": "0.95"})
    assert ref.expected_alarm_rate == pytest.approx(0.002)
    assert reference_from_run("1", {**METRICS, "val_false_alarm_rate": 0.0}).expected_alarm_rate == PSI_FLOOR
    # A threshold below p99 with 5 % above it: consistent, all three points kept in order.
    low = reference_from_run("1", {**METRICS, "threshold": 2.0, "val_false_alarm_rate": 0.05})
    assert low.values == pytest.approx((math.log(2), 2.0, math.log(100))) and low.cdf == pytest.approx((0.5, 0.95, 0.99))
    # A threshold below p99 that claims fewer alarms than 1 %: p99 disagrees with it and is left out.
    odd = reference_from_run("1", {**METRICS, "threshold": 2.0})
    assert odd.values == pytest.approx((math.log(2), 2.0)) and odd.cdf == pytest.approx((0.5, 0.999))
    # Exactly 1 % (or 50 %) of validation above a threshold just under p99: p99 shares the threshold's
    # cdf and is left out (it crashed every drift check of that champion).
    tied = reference_from_run("1", {**METRICS, "threshold": math.log(100) - 1e-6, "val_false_alarm_rate": 0.01})
    assert tied.values == pytest.approx((math.log(2), math.log(100) - 1e-6)) and tied.cdf == pytest.approx((0.5, 0.99))
    half = reference_from_run("1", {**METRICS, "threshold": math.log(2) - 1e-6, "val_false_alarm_rate": 0.5})
    assert half.cdf == pytest.approx((0.5, 0.99)) and half.values[0] == pytest.approx(math.log(2) - 1e-6)
    assert reference_from_run("1", {"val_score_p50": 1.0}) is None  # no threshold: no reference
    assert nominal_alarm_rate({"threshold.method": "quantile", "threshold.q": "0.99"}) == pytest.approx(0.01)
    assert nominal_alarm_rate({"threshold.method": "mean_std"}) is None


def test_reference_at_the_ends_of_the_alarm_rate():
    # Every validation window above the threshold (a threshold.scale far under 1): the expected rate was
    # replaced by 1e-4, the opposite end, and live scores drawn as in validation were "drift" at every check.
    every = {"threshold": 1.0, "val_false_alarm_rate": 1.0, "val_windows": 499.0, "val_score_p50": 2.0,
             "val_score_p99": 3.0}
    ref = reference_from_run("7", every, {"threshold.method": "quantile", "threshold.q": "0.99"})
    assert ref.expected_alarm_rate == 1.0 and ref.cdf[0] == pytest.approx(1 / 500)
    live = np.random.default_rng(0).uniform(1.004, 3.0, 5000)  # as validation: all above 1, median 2, p99 3
    assert assess(live, ref, DriftBounds()).verdict == "ok"
    no_count = reference_from_run("7", {k: v for k, v in every.items() if k != "val_windows"})
    assert no_count.expected_alarm_rate == 1.0 and no_count.cdf[0] == PSI_FLOOR
    # A run without the validation rate and a pot risk of 1e-17 (accepted by the policy): 1 - risk is 1.0,
    # and building the reference raised at every drift check of that version.
    no_rate = {k: v for k, v in METRICS.items() if k != "val_false_alarm_rate"}
    tiny = reference_from_run("1", no_rate, {"threshold.method": "pot", "threshold.risk": "1e-17"})
    assert 0 < tiny.expected_alarm_rate < 1e-6 and tiny.cdf[-1] < 1


def test_reference_refuses_inconsistent_points():
    with pytest.raises(ValueError):
        Reference("1", (2.0, 1.0), (0.5, 0.9), 2.0, 0.1)
    with pytest.raises(ValueError):
        Reference("1", (1.0, 2.0), (0.9, 0.5), 2.0, 0.1)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    e = np.array([0.5, 0.49, 0.009, 0.001])
    assert psi(e, e) == pytest.approx(0.0)
    small = psi(np.array([0.45, 0.53, 0.019, 0.001]), e)
    large = psi(np.array([0.2, 0.7, 0.09, 0.01]), e)
    assert 0 < small < 0.1 < 0.25 < large
    # empty bins are floored, not infinite
    assert math.isfinite(psi(np.array([1.0, 0, 0, 0]), e))


def test_bin_proportions_are_right_closed():
    ref = Reference("1", (1.0, 2.0), (0.5, 0.9), 2.0, 0.1)
    assert bin_proportions(np.array([0.5, 1.0, 1.5, 2.0, 3.0]), ref).tolist() == [0.4, 0.4, 0.2]


def test_assess_in_distribution_scores_are_ok_and_shifted_ones_drift():
    rng = np.random.default_rng(0)
    bounds = DriftBounds(psi_threshold=0.25, max_alarm_rate=0.05, min_samples=500)
    same = rng.exponential(1.0, 5000)  # the reference's own distribution
    ok = assess(same, reference(), bounds)
    assert ok.verdict == "ok" and ok.psi < 0.05 and ok.alarm_rate < 0.01 and ok.samples == 5000
    shifted = assess(rng.exponential(2.0, 5000), reference(), bounds)  # scores doubled: a moved distribution
    assert shifted.drifted and shifted.psi >= 0.25 and "score distribution moved" in shifted.reason
    assert "alarm rate too high" not in shifted.reason  # doubled exp(1) rarely passes ln 1000
    # Only the alarm rate: 10 % of windows far above the threshold, the body unchanged.
    alarms = np.concatenate([rng.exponential(1.0, 4500), np.full(500, 50.0)])
    verdict = assess(alarms, reference(), DriftBounds(psi_threshold=5.0, max_alarm_rate=0.05, min_samples=500))
    assert verdict.drifted and "alarm rate too high" in verdict.reason and verdict.alarm_rate == pytest.approx(0.1, abs=0.005)


def test_assess_needs_min_samples_and_ignores_non_finite_scores():
    scores = np.concatenate([np.full(10, 100.0), [np.nan, np.inf]])
    result = assess(scores, reference(), DriftBounds(min_samples=11))
    assert result.verdict == "insufficient" and result.samples == 10 and result.psi is None
    assert assess(scores, reference(), DriftBounds(min_samples=10)).drifted


def test_parse_score_record():
    doc = {"entity": "p", "ts": 1.0, "start_ts": 0.0, "score": 0.5, "threshold": 1.0, "anomalous": False,
           "filled": 0, "model": {"name": "pump", "version": "7"}}
    assert parse_score_record(json.dumps(doc).encode()) == LiveScore("7", 0.5, "pump")
    assert parse_score_record(json.dumps({**doc, "score": None}).encode()) == LiveScore("7", None, "pump")
    assert parse_score_record(json.dumps({**doc, "model": {"version": 7}}).encode()) == LiveScore("7", 0.5)
    assert parse_score_record(json.dumps({**doc, "model": "pump"}).encode()) is None
    for bad in (b"", None, b"not json", b"[1]", json.dumps({"score": 1}).encode()):
        assert parse_score_record(bad) is None


def test_score_window_keeps_the_watched_versions_latest_scores():
    w = ScoreWindow(3)
    w.watch("1")
    for i in range(5):
        w.add(LiveScore("1", float(i)))
    w.add(LiveScore("0", 99.0))  # an older champion's score: not counted
    w.add(LiveScore("1", None))  # non-finite: not counted
    assert w.scores().tolist() == [2.0, 3.0, 4.0] and w.other_versions == 1
    w.watch("1")
    assert len(w) == 3  # same version: kept
    w.watch("2")
    assert len(w) == 0  # a promotion starts over


def test_score_window_of_a_model_leaves_out_another_asset_type_s_scores_of_the_same_version():
    """Two asset types' workers writing one scores topic: both models start at v1, and the turbines'
    scores counted as the pumps' (a turbine fault read as the pumps' model drifting)."""
    w = ScoreWindow(10, model_name="pumps")
    w.watch("1")
    w.add(LiveScore("1", 1.0, "pumps"))
    w.add(LiveScore("1", 50.0, "turbines"))
    w.add(LiveScore("1", 2.0))  # a record that names no model: counted, as before
    assert w.scores().tolist() == [1.0, 2.0] and w.other_models == 1 and w.other_versions == 0


def test_gate_cooldown_and_running_retrain():
    gate = DriftGate(cooldown_s=100)
    assert gate.blocked(0.0) is None
    gate.triggered(0.0)
    assert "cooldown" in gate.blocked(50.0)
    gate.retrain_started()
    assert gate.blocked(500.0) == "a retrain is running"
    gate.retrain_finished(500.0)
    assert "last retrain" in gate.blocked(550.0)
    assert gate.blocked(600.0) is None


def test_gate_hears_a_fast_runs_end_before_its_start_and_a_missed_run_ends_without_cooldown():
    # the scheduler gets EXECUTED before SUBMITTED for a quick skip; a flag set last blocked drift for a day
    gate = DriftGate(cooldown_s=0)
    gate.retrain_finished(10.0)
    gate.retrain_started()
    assert gate.blocked(20.0) is None
    gate = DriftGate(cooldown_s=100)
    gate.retrain_started()
    assert gate.blocked(0.0) == "a retrain is running"
    gate.retrain_missed()  # SUBMITTED then MISSED: nothing ran, nothing cools down
    assert gate.blocked(1.0) is None


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    ({"drift": {"enabled": True}}, "drift.enabled"),  # no scores topic
    ({"drift": {"window": 0}}, "drift.window"),
    ({"drift": {"window": 10, "min_samples": 11}}, "drift.min_samples"),
    ({"drift": {"psi_threshold": 0}}, "drift.psi_threshold"),
    ({"drift": {"max_alarm_rate": 0}}, "drift.max_alarm_rate"),
    ({"drift": {"cooldown_s": -1}}, "drift.cooldown_s"),
    ({"drift": {"check_interval_s": 0}}, "drift.check_interval_s"),
    ({"drift": {"group_id": ""}}, "drift.group_id"),
])
def test_bad_drift_settings_name_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        build_settings(raw)
    assert info.value.field == field


# --- the scheduler's drift check, I/O injected ---------------------------------------------------

class ListReader:
    def __init__(self, batches):
        self.batches = list(batches)
        self.closed = False

    def read(self, max_records, idle_s, timeout_s=60.0):
        return self.batches.pop(0) if self.batches else []

    def close(self):
        self.closed = True


def score_records(scores, version="3", name="anomaly-detector"):  # (mlflow.model_name's default)
    return [json.dumps({"score": float(s), "model": {"name": name, "version": version}}).encode() for s in scores]


def test_the_drift_check_reads_its_own_model_s_scores_only(caplog):
    """Another asset type's workers write the same scores topic, their model at the same version: a fault
    of theirs (scores far above) is not this model's drift."""
    from anomaly.scheduler import DriftMonitor

    settings = build_settings({"kafka": {"scores_topic": "scores"}, "mlflow": {"model_name": "pumps"},
                               "drift": {"enabled": True, "window": 2000, "min_samples": 1000}})
    rng = np.random.default_rng(1)
    reader = ListReader([score_records(rng.exponential(1.0, 1200), name="pumps")
                         + score_records([1e6] * 600, name="turbines")])
    monitor = DriftMonitor(settings, SchedulerMetrics(), reader=reader, resolver=lambda name, alias: "3",
                           reference_for=lambda name, version: reference())
    with caplog.at_level(logging.WARNING, logger="anomaly.scheduler"):
        result = monitor.check()
        monitor.check()  # said once
    assert result.verdict == "ok" and result.samples == 1200 and monitor.window.other_models == 600
    said = [r.getMessage() for r in caplog.records if "other models' scores" in r.getMessage()]
    assert len(said) == 1 and "its own drift.group_id" in said[0] and "anomaly-drift" in said[0]


def test_drift_monitor_checks_the_champions_scores_and_exports_the_statistic():
    from anomaly.scheduler import DriftMonitor

    settings = build_settings({"kafka": {"scores_topic": "scores"},
                               "drift": {"enabled": True, "window": 2000, "min_samples": 1000}})
    rng = np.random.default_rng(1)
    reader = ListReader([score_records(rng.exponential(1.0, 600)),
                         score_records(rng.exponential(1.0, 600)) + score_records([1e6] * 50, version="2"),
                         score_records(rng.exponential(3.0, 2000))])
    metrics = SchedulerMetrics()
    monitor = DriftMonitor(settings, metrics, reader=reader, resolver=lambda name, alias: "3",
                           reference_for=lambda name, version: reference())
    first = monitor.check()
    assert first.verdict == "insufficient" and first.samples == 600
    second = monitor.check()
    assert second.verdict == "ok" and second.samples == 1200  # version 2's records were not counted
    third = monitor.check()
    assert isinstance(third, Assessment) and third.drifted and third.samples == 2000
    assert metrics.value("anomaly_scheduler_drift_checks_total", {"result": "drift"}) == 1
    assert metrics.value("anomaly_scheduler_drift_checks_total", {"result": "insufficient"}) == 1
    assert metrics.value("anomaly_scheduler_drift_psi") == pytest.approx(third.psi)
    assert metrics.value("anomaly_scheduler_drift_records_read_total") == 600 + 650 + 2000
    monitor.close()
    assert reader.closed


def test_drift_monitor_keeps_a_few_versions_references_not_one_per_promotion():
    """One reference per champion version the checks had seen, kept for good: a scheduler promoting daily
    for years grew it without end. A version's reference is read once while it is champion."""
    from anomaly.scheduler import DriftMonitor

    settings = build_settings({"kafka": {"scores_topic": "scores"}, "drift": {"enabled": True}})
    champion = ["1"]
    read: list[str] = []
    monitor = DriftMonitor(settings, SchedulerMetrics(), reader=ListReader([]),
                           resolver=lambda name, alias: champion[0],
                           reference_for=lambda name, version: read.append(version) or reference())
    for v in range(1, 101):
        champion[0] = str(v)
        monitor.check()
        monitor.check()
    assert read == [str(v) for v in range(1, 101)]  # once per version
    assert len(monitor._references) <= 8


def test_drift_monitor_without_a_reference_gives_no_verdict():
    from anomaly.scheduler import DriftMonitor

    settings = build_settings({"kafka": {"scores_topic": "scores"}, "drift": {"enabled": True}})
    metrics = SchedulerMetrics()
    monitor = DriftMonitor(settings, metrics, reader=ListReader([score_records([1.0])]),
                           resolver=lambda name, alias: "3", reference_for=lambda name, version: None)
    assert monitor.check() is None
    assert metrics.value("anomaly_scheduler_drift_checks_total", {"result": "no_reference"}) == 1
    none = DriftMonitor(settings, metrics, reader=ListReader([]), resolver=lambda name, alias: None,
                        reference_for=lambda name, version: reference())
    assert none.check() is None


def test_unchanged_scores_are_not_drift_when_validation_had_no_alarm():
    rng = np.random.default_rng(3)
    val = rng.gamma(2.0, 0.1, size=98)  # SKAB-sized validation
    threshold = float(val.max() * 1.05)  # scaled above every validation window
    metrics = {"threshold": threshold, "val_false_alarm_rate": float(np.mean(val > threshold)),
               "val_score_p50": float(np.median(val)), "val_score_p99": float(np.quantile(val, 0.99)),
               "val_windows": float(len(val))}
    assert metrics["val_false_alarm_rate"] == 0.0
    ref = reference_from_run("1", metrics, {"threshold.method": "quantile", "threshold.q": "0.95"})
    live = rng.choice(val, size=5000)
    verdict = assess(live, ref, DriftBounds(psi_threshold=0.25, max_alarm_rate=0.05, min_samples=1000))
    assert verdict.verdict == "ok", verdict


def test_a_stop_during_a_drifting_check_returns_and_triggers_no_retrain(tmp_path):
    """SIGTERM while a check that will find drift is reading: its trigger moved the retrain job under
    APScheduler's store lock, which shutdown holds while it waits for the check's thread (a deadlock)."""
    import threading

    from anomaly.config import load_config
    from anomaly.drift import Reference
    from anomaly.scheduler import DriftMonitor, RetrainScheduler

    settings = load_config(None, env={}, overrides={
        "scheduler": {"job_store": str(tmp_path / "s.db"), "interval_s": 86400},
        "kafka": {"scores_topic": "scores"}, "drift": {"enabled": True, "window": 100, "min_samples": 10}})
    reading, release = threading.Event(), threading.Event()

    class SlowReader:
        interrupted = False

        def read(self, max_records, idle_s, timeout_s=60.0):
            reading.set()
            release.wait(30)  # a check reading its batch (up to 60 s)
            return [json.dumps({"score": 9.0, "model": {"name": "m", "version": "1"}}).encode()] * 100

        def interrupt(self):
            self.interrupted = True
            release.set()

        def close(self):
            pass

    reader = SlowReader()
    monitor = DriftMonitor(settings, reader=reader, resolver=lambda name, alias: "1",
                           reference_for=lambda name, version: Reference("1", (1.0,), (0.99,), 1.0, 0.01))
    scheduler = RetrainScheduler(settings.scheduler, {}, func="time:time", drift=monitor, drift_interval_s=0.2)
    scheduler.start()
    assert reading.wait(10)
    stopping = threading.Thread(target=scheduler.stop, kwargs={"wait": True}, daemon=True)
    stopping.start()
    stopping.join(15)
    assert not stopping.is_alive(), "stop() hung"
    assert reader.interrupted  # the read was cut short, not waited out
    assert scheduler.metrics.value("anomaly_scheduler_drift_triggers_total") == 0


def test_the_drift_cooldown_holds_over_a_scheduler_restart(tmp_path):
    """The gate lived in memory only: a scheduler restarted after a drift retrain (one its retrain got killed,
    say) retrained again at its first drifting check, with no drift.cooldown_s between."""
    import time

    from anomaly.config import load_config
    from anomaly.drift import Reference
    from anomaly.scheduler import DriftMonitor, RetrainScheduler, last_run_path

    settings = load_config(None, env={}, overrides={
        "scheduler": {"job_store": str(tmp_path / "s.db"), "interval_s": 86400},
        "kafka": {"scores_topic": "scores"},
        "drift": {"enabled": True, "window": 100, "min_samples": 10, "cooldown_s": 3600}})
    drifting = [json.dumps({"score": 9.0, "model": {"name": "anomaly-detector", "version": "1"}}).encode()] * 100

    def scheduler_with(reader):
        monitor = DriftMonitor(settings, reader=reader, resolver=lambda name, alias: "1",
                               reference_for=lambda name, version: Reference("1", (1.0,), (0.99,), 1.0, 0.01))
        return RetrainScheduler(settings.scheduler, {}, func="time:time", drift=monitor, drift_interval_s=0.2)

    first = scheduler_with(ListReader([drifting]))
    first.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and first.metrics.value("anomaly_scheduler_drift_triggers_total") < 1:
        time.sleep(0.05)
    first.stop(wait=True)
    assert first.metrics.value("anomaly_scheduler_drift_triggers_total") == 1
    assert json.loads(last_run_path(settings.scheduler.job_store).read_text())["drift_trigger_ts"] > 0

    second = scheduler_with(ListReader([drifting] * 5))  # drift again, at once
    second.start()
    try:
        assert "cooldown: last drift trigger" in second.drift.gate.blocked(time.monotonic())
        time.sleep(1.0)  # a few checks: each finds drift, none may trigger
        assert second.metrics.value("anomaly_scheduler_drift_triggers_total") == 0
    finally:
        second.stop(wait=True)


def test_a_model_whose_own_alarm_rate_reaches_the_bound_is_not_drifted_while_unchanged():
    """A quantile threshold at q = 0.93 alarms on 7 % of validation windows: against max_alarm_rate 0.05 every
    check of the unchanged model said "alarm rate too high", and it was retrained every cooldown."""
    from anomaly.drift import alarm_bound

    rng = np.random.default_rng(5)
    val = rng.gamma(2.0, 1.0, size=4000)
    threshold = float(np.quantile(val, 0.93))
    metrics = {"threshold": threshold, "val_false_alarm_rate": float(np.mean(val > threshold)),
               "val_score_p50": float(np.median(val)), "val_score_p99": float(np.quantile(val, 0.99)),
               "val_windows": float(len(val))}
    ref = reference_from_run("7", metrics, {"threshold.method": "quantile", "threshold.q": "0.93"})
    bounds = DriftBounds(psi_threshold=0.25, max_alarm_rate=0.05, min_samples=1000)
    same = assess(rng.gamma(2.0, 1.0, size=5000), ref, bounds)
    assert same.verdict == "ok", same.reason
    assert "above drift.max_alarm_rate" in same.reason
    worse = assess(np.r_[rng.gamma(2.0, 1.0, size=4250), np.full(750, threshold * 2)], ref, bounds)  # +15 %
    assert worse.drifted and "alarm rate too high" in worse.reason
    assert alarm_bound(0.05, 0.01, 2000) == 0.05  # a model well under the bound keeps it
    assert alarm_bound(0.05, 0.045, 1000) == pytest.approx(0.045 + 3 * math.sqrt(0.045 * 0.955 / 1000))  # noise
    assert alarm_bound(0.05, 0.07, 5000) == pytest.approx(0.07 + 3 * math.sqrt(0.07 * 0.93 / 5000))


class ScoresConsumer:
    """A fake group consumer of the scores topic for ``ScoreReader``: partition 0, nothing to read, an
    empty topic (end offset 0); tests override what they need."""

    def __init__(self, **options):
        self.assigned: list = []
        self.closed = False

    def partitions_for_topic(self, topic):
        return {0}

    def assignment(self):
        return set(self.assigned)

    def assign(self, tps):
        self.assigned = list(tps)

    def poll(self, timeout_ms, max_records):
        return {}

    def end_offsets(self, tps, timeout_ms=None):
        return {tp: 0 for tp in tps}

    def position(self, tp, timeout_ms=None):
        return 0

    def commit(self):
        pass

    def topics(self):
        return set()

    def close(self, autocommit=False):
        self.closed = True


def test_the_score_reader_reads_partitions_added_to_the_topic(monkeypatch):
    """It took the partition list once: partitions added later were never read until a restart."""
    from collections import namedtuple

    from anomaly import kafka_io
    from anomaly.scheduler import ScoreReader

    TP = namedtuple("TP", "topic partition")

    class Consumer(ScoresConsumer):
        partitions = {0, 1}

        def partitions_for_topic(self, topic):
            return set(self.partitions)

    monkeypatch.setattr(kafka_io, "KafkaConsumer", Consumer)
    monkeypatch.setattr(kafka_io, "TopicPartition", TP)
    reader = ScoreReader("b:9092", "scores", "drift")
    assert reader.read(10, idle_s=0.01) == []
    assert sorted(tp.partition for tp in reader._consumer.assignment()) == [0, 1]
    Consumer.partitions = {0, 1, 2, 3}  # kafka-topics.sh --alter --partitions 4
    reader.read(10, idle_s=0.01)
    assert sorted(tp.partition for tp in reader._consumer.assignment()) == [0, 1, 2, 3]


def test_a_trigger_time_saved_ahead_of_the_clock_does_not_stretch_the_cooldown(tmp_path):
    import time

    from anomaly.config import load_config
    from anomaly.drift import Reference
    from anomaly.scheduler import DriftMonitor, RetrainScheduler, last_run_path

    settings = load_config(None, env={}, overrides={
        "scheduler": {"job_store": str(tmp_path / "s.db"), "interval_s": 86400},
        "kafka": {"scores_topic": "scores"}, "drift": {"enabled": True, "cooldown_s": 3600}})
    last_run_path(settings.scheduler.job_store).write_text(json.dumps({"drift_trigger_ts": time.time() + 5000}))
    monitor = DriftMonitor(settings, reader=ListReader([]), resolver=lambda name, alias: "1",
                           reference_for=lambda name, version: Reference("1", (1.0,), (0.99,), 1.0, 0.01))
    scheduler = RetrainScheduler(settings.scheduler, {}, func="time:time", drift=monitor, drift_interval_s=3600)
    scheduler.start()
    try:
        assert monitor.gate.last_trigger <= time.monotonic()  # at most now: the cooldown runs from now, no longer
        assert "cooldown: last drift trigger 0 s ago" in monitor.gate.blocked(time.monotonic())
    finally:
        scheduler.stop()


def test_a_failed_score_read_starts_the_next_one_from_the_groups_commit(monkeypatch):
    """Positions had moved past the records of a read that then failed: those scores were skipped until a
    restart. The consumer is dropped, so the next read starts again from the commit."""
    from collections import namedtuple

    from anomaly import kafka_io
    from anomaly.scheduler import ScoreReader

    TP = namedtuple("TP", "topic partition")
    Record = namedtuple("Record", "value")
    made = []

    class Consumer(ScoresConsumer):
        def __init__(self, **options):
            super().__init__()
            self.polls = 0
            made.append(self)

        def poll(self, timeout_ms, max_records):
            self.polls += 1
            if len(made) == 1 and self.polls == 2:
                raise RuntimeError("the broker went away mid-read")
            return {TP("scores", 0): [Record(b"s")]} if self.polls == 1 else {}

    monkeypatch.setattr(kafka_io, "KafkaConsumer", Consumer)
    monkeypatch.setattr(kafka_io, "TopicPartition", TP)
    reader = ScoreReader("b:9092", "scores", "drift")
    with pytest.raises(RuntimeError):
        reader.read(10, idle_s=0.05)
    assert made[0].closed and reader._consumer is None
    assert reader.read(10, idle_s=0.05) == [b"s"] and len(made) == 2  # read again, from the commit


def test_a_score_read_whose_first_fetch_is_slow_waits_for_the_scores_already_there(monkeypatch):
    """The idle clock started before the first fetch: on a loaded box a check found "nothing new" in a
    topic holding scores (read at the next check instead)."""
    import time
    from collections import namedtuple

    from anomaly import kafka_io
    from anomaly.scheduler import ScoreReader

    TP = namedtuple("TP", "topic partition")
    Record = namedtuple("Record", "value")

    class SlowConsumer(ScoresConsumer):
        def __init__(self, **options):
            super().__init__()
            self.next, self.ready_at = 0, time.monotonic() + 0.5

        def end_offsets(self, tps, timeout_ms=None):
            return {tp: 3 for tp in tps}

        def position(self, tp, timeout_ms=None):
            return self.next

        def poll(self, timeout_ms, max_records):
            if time.monotonic() < self.ready_at or self.next:
                time.sleep(timeout_ms / 1000)
                return {}
            self.next = 3
            return {TP("scores", 0): [Record(b"a"), Record(b"b"), Record(b"c")]}

    monkeypatch.setattr(kafka_io, "KafkaConsumer", SlowConsumer)
    monkeypatch.setattr(kafka_io, "TopicPartition", TP)
    assert ScoreReader("b:9092", "scores", "drift").read(10, idle_s=0.1) == [b"a", b"b", b"c"]
