"""Operators' verdicts (pure): the message both ways, which verdict is in force, what each labels, the
event a verdict is about; and what the retrain's history and data preparation make of them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from anomaly import feedback
from anomaly.codec import Reading
from anomaly.errors import DataError
from anomaly.retrain import LABEL_COLUMN, History


def test_a_verdict_goes_out_and_comes_back_the_same():
    v = feedback.make_verdict("pump-7", 100.0, 160.0, "normal", event_id="5f0c", note="new impeller ✓", by="alice",
                              ts=200.0)
    assert v.feedback_id == "5f0c"  # an event's verdict is keyed by the event
    raw = feedback.encode(v)
    assert json.loads(raw)["verdict"] == "normal" and "✓" in raw.decode("utf-8")
    assert feedback.decode(raw) == v
    assert feedback.encode(feedback.decode(raw)) == raw  # sorted keys: the same verdict, the same bytes


def test_a_period_s_verdict_has_the_period_s_id():
    a = feedback.make_verdict("pump-7", 100, 160, "anomaly")
    assert a.event_id is None and a.feedback_id == feedback.period_id("pump-7", 100.0, 160.0)
    assert feedback.make_verdict("pump-7", 100, 160, "withdrawn").feedback_id == a.feedback_id  # it can be taken back
    assert feedback.make_verdict("pump-8", 100, 160, "anomaly").feedback_id != a.feedback_id
    assert feedback.make_verdict("pump-7", 100, 161, "anomaly").feedback_id != a.feedback_id


@pytest.mark.parametrize("fields, says", [
    (("", 1.0, 2.0, "normal"), "entity"),
    (("pump\n7", 1.0, 2.0, "normal"), "entity"),
    (("pump-7", 2.0, 1.0, "normal"), "before start_ts"),
    (("pump-7", math.nan, 1.0, "normal"), "start_ts"),
    (("pump-7", 1.0, True, "normal"), "end_ts"),
    (("pump-7", 1.0, 2.0, "false alarm"), "verdict must be one of normal, anomaly, maintenance, withdrawn"),
])
def test_a_verdict_that_makes_no_sense_is_refused_saying_why(fields, says):
    with pytest.raises(DataError, match=says):
        feedback.make_verdict(*fields)
    with pytest.raises(DataError, match="note is longer than 1024"):
        feedback.make_verdict("pump-7", 1.0, 2.0, "normal", note="x" * 1025)


@pytest.mark.parametrize("raw, says", [
    (None, "tombstone"), (b"\xff", "not UTF-8 JSON"), (b"[1]", "not a JSON object"),
    (b'{"entity": "p", "start_ts": 1, "end_ts": 2, "verdict": "normal"}', "missing feedback_id"),
    (b'{"feedback_id": "x", "entity": "p", "start_ts": 1, "end_ts": 2, "verdict": "maybe"}', "verdict must be"),
    (b'{"feedback_id": "x", "entity": "p", "start_ts": 1, "end_ts": 2, "verdict": "normal", "ts": "now"}', "ts is not"),
])
def test_a_record_that_is_no_verdict_decodes_to_the_reason(raw, says):
    out = feedback.decode(raw)
    assert isinstance(out, str) and says in out


def test_the_last_verdict_on_an_event_or_period_is_the_one_in_force():
    first = feedback.make_verdict("pump-7", 100, 160, "anomaly", event_id="e1")
    changed = feedback.make_verdict("pump-7", 100, 160, "normal", event_id="e1", note="it was the new impeller")
    other = feedback.make_verdict("pump-8", 10, 20, "anomaly")
    withdrawn = feedback.make_verdict("pump-8", 10, 20, "withdrawn")
    assert feedback.latest([first, other, changed]) == [other, changed]
    assert feedback.latest([first, other, changed, withdrawn]) == [changed]
    again = feedback.make_verdict("pump-8", 10, 20, "anomaly", note="after all")
    assert feedback.latest([other, withdrawn, again]) == [again]  # given again after being taken back
    assert feedback.periods([first, other, changed, withdrawn]) == {"pump-7": [(100.0, 160.0, False)]}
    assert feedback.counts(feedback.latest([first, other])) == {"normal": 0, "anomaly": 2, "maintenance": 0}
    assert feedback.summary(feedback.latest([first, other, changed])) == "2 verdicts (1 normal, 1 anomaly)"


def test_periods_are_widened_by_the_padding_asked():
    v = feedback.make_verdict("pump-7", 100.0, 160.0, "normal")
    assert feedback.periods([v], pad_s=3.5) == {"pump-7": [(96.5, 163.5, False)]}


def test_a_tombstone_on_the_feedback_topic_takes_its_key_s_verdict_back(monkeypatch):
    """Compaction's delete: a record with the verdict's key and no value. It held until the log cleaner ran."""
    from anomaly import feedback_topic, kafka_io

    given = feedback.make_verdict("pump-7", 100.0, 160.0, "normal", event_id="e1")
    other = feedback.make_verdict("pump-8", 1.0, 2.0, "anomaly")
    records = [SimpleNamespace(partition=0, offset=0, key=b"e1", value=feedback.encode(given)),
               SimpleNamespace(partition=0, offset=1, key=other.feedback_id.encode(), value=feedback.encode(other)),
               SimpleNamespace(partition=0, offset=2, key=b"e1", value=None),
               SimpleNamespace(partition=0, offset=3, key=None, value=None)]  # no key: nothing to take back
    monkeypatch.setattr(kafka_io, "read_all", lambda *a, **k: records)
    verdicts, bad = feedback_topic.read_verdicts("k:9092", "anomalies.feedback")
    assert feedback.latest(verdicts) == [other] and len(bad) == 1 and "tombstone" in bad[0]


def test_labels_at_marks_the_readings_each_period_covers_and_an_anomaly_wins_an_overlap():
    ts = np.arange(0.0, 10.0)
    out = feedback.labels_at(ts, [(5.0, 8.0, True), (2.0, 6.0, False)])
    assert np.isnan(out[[0, 1, 9]]).all()
    assert out[2:5].tolist() == [0.0, 0.0, 0.0]  # normal, both ends inclusive
    assert out[5:9].tolist() == [1.0, 1.0, 1.0, 1.0]  # the overlap (5, 6) is an anomaly
    assert np.isnan(feedback.labels_at(ts, [])).all()


def test_find_event_prefers_the_event_s_closed_record():
    opened = {"event_id": "e1", "status": "open", "entity": "p", "start_ts": 10.0, "end_ts": None}
    closed = {**opened, "status": "closed", "end_ts": 40.0}
    other = {**closed, "event_id": "e2"}
    assert feedback.find_event([opened, other, closed], "e1") == closed
    assert feedback.find_event([opened, closed, opened, closed], "e1") == closed  # re-delivered after a restart
    # re-opened within its cooldown after the close (the same id): open again, its earlier end is not its end
    assert feedback.find_event([opened, closed, opened], "e1") == opened
    assert feedback.find_event([opened], "e1") == opened
    assert feedback.find_event([other], "e1") is None
    assert feedback.find_event([opened], "e") is None  # too short a start to look up
    assert feedback.event_period(closed) == ("p", 10.0, 40.0)
    assert feedback.event_period(opened) == ("p", 10.0, None)
    with pytest.raises(DataError, match="no entity or start_ts"):
        feedback.event_period({"event_id": "e3"})


def reading(entity, ts, **values):
    return Reading(entity, ts, values or {"a": 1.0, "b": 2.0})


def test_history_labels_the_readings_a_verdict_covers_unless_they_carry_their_own():
    h = History(max_readings=100, lookback_s=1000)
    for t in range(10):
        h.add(reading("e", float(t)), label=True if t == 3 else None)
        h.add(reading("f", float(t)))
    periods = {"e": [(2.0, 4.0, False)], "f": [(7.0, 20.0, True)], "gone": [(0.0, 9.0, True)]}
    frames = h.frames(["a", "b"], periods)
    e = frames["e"][LABEL_COLUMN].tolist()
    assert np.isnan(e[:2]).all() and e[2:5] == [0.0, 1.0, 0.0] and np.isnan(e[5:]).all()  # its own label wins at 3
    f = frames["f"][LABEL_COLUMN].tolist()
    assert np.isnan(f[:7]).all() and f[7:] == [1.0, 1.0, 1.0]
    assert h.verdict_readings == {"normal": 2, "anomaly": 3}
    assert LABEL_COLUMN not in h.frames(["a", "b"])["f"]  # no verdicts, no labels
    assert h.verdict_readings == {"normal": 0, "anomaly": 0}


class FlaggingChampion:
    """What _prepare asks of the champion: flags every window ending on a row where ``a`` is above 5."""

    sensors, window_size, period_s = ("a", "b"), 5, 60.0

    def score_values(self, values):
        end_rows = np.arange(self.window_size - 1, len(values))
        return SimpleNamespace(scores=values[end_rows, 0], end_rows=end_rows)

    class threshold:
        @staticmethod
        def series_flags(scores, window_size):
            return np.asarray(scores) > 5.0

        @classmethod
        def for_entity(cls, entity):
            return cls


def test_a_normal_verdict_puts_what_the_champion_flagged_into_training_and_an_anomaly_one_keeps_rows_out():
    """Rows 400-459 run at a new level the champion flags: left out of training, every retrain (so the
    false alarm came back after each one). With an operator's `normal` verdict on them they train; an
    `anomaly` verdict on rows 100-119, which the champion does not flag, keeps them and the margin out."""
    from anomaly.config import build_settings
    from anomaly.retrain import _prepare

    def history():
        h = History(max_readings=10_000, lookback_s=1e9)
        for i in range(1000):
            h.add(reading("pump", 60.0 * i, a=9.0 if 400 <= i < 460 else float(i % 3), b=float(i)))
        return h

    settings = build_settings({"retrain": {"holdout_fraction": 0.2, "exclude_margin_rows": 4}})
    before = _prepare(history(), FlaggingChampion(), settings)
    trained = set(before.train_values[:, 1][~before.gaps if before.gaps is not None else slice(None)])
    assert not trained & set(range(396, 464)) and before.facts["flagged_windows"] == 60

    verdicts = {"pump": [(60.0 * 400, 60.0 * 459, False), (60.0 * 100, 60.0 * 119, True)]}
    after = _prepare(history(), FlaggingChampion(), settings, verdicts)
    trained = set(after.train_values[:, 1][~after.gaps if after.gaps is not None else slice(None)])
    assert set(range(400, 460)) <= trained  # the new normal trains
    assert not trained & set(range(96, 124))  # the fault and its margin do not
    assert after.facts["flagged_windows"] == 0
    assert after.facts["verdict_normal_readings"] == 60 and after.facts["verdict_anomaly_readings"] == 20
    assert after.facts["labelled_rows"] == 20


def test_find_event_takes_the_start_of_an_id_as_up_shows_it_and_refuses_an_ambiguous_one():
    a = {"event_id": "5f0c3a1b9d2e", "status": "closed", "entity": "p", "start_ts": 1.0, "end_ts": 2.0}
    b = {**a, "event_id": "5f0c3a77aa00"}
    assert feedback.find_event([a, b], "5f0c3a1b") == a
    assert feedback.find_event([a, b], "5f0c3a1b9d2e") == a
    with pytest.raises(DataError, match="2 events have ids starting with 5f0c3a: 5f0c3a1b9d2e, 5f0c3a77aa00"):
        feedback.find_event([a, b], "5f0c3a")
    exact = {**a, "event_id": "5f0c3a"}  # an id that is also the start of others: itself
    assert feedback.find_event([a, exact, b], "5f0c3a") == exact


def test_the_feedback_demo_s_table_shows_each_model_and_a_retrain_that_made_none():
    from pipelines.feedback_demo import table

    scores = {"other/9": {"far": 98.84, "mar": 0.0, "f1": 0.5223}, "valve1/0": {"far": 0.128, "mar": 92.86, "f1": 0.133}}
    text = table({"champion": {"version": "1", "scores": scores},
                  "without_verdicts": {"status": "skipped", "reason": "too little clean data"},
                  "with_verdicts": {"version": "3", "status": "kept", "scores": scores}})
    lines = text.splitlines()
    assert lines[2] == "| champion (valves only) v1 | none | 98.8 | 0.0 | 0.522 | 0.1 | 92.9 | 0.133 |"
    assert "skipped: too little clean data" in lines[3]
    assert lines[4].startswith("| challenger, with verdicts v3 | its normal stretches | 98.8")
    assert len(lines) == 5  # no fourth retrain: no row for it
    text = table({"champion": {"version": "1", "scores": scores}, "with_verdicts": {"version": "3", "scores": scores},
                  "missed_period_accepted": {"version": "4", "status": "promoted", "scores": scores}})
    assert text.splitlines()[5].startswith("| challenger, with verdicts, a missed period accepted v4 | its normal")


def test_readings_stamped_off_their_slot_at_an_event_s_edges_are_covered_by_the_widened_period():
    """An event's start and end are slot times; a reading stamped up to half a period early is still its
    slot's. Unwidened, the first reading escaped the verdict, its window stayed flagged and dropped the
    event's rows with their margin."""
    from anomaly.config import build_settings
    from anomaly.retrain import _prepare

    def history():
        h = History(max_readings=10_000, lookback_s=1e9)
        for i in range(1000):
            h.add(reading("pump", 60.0 * i - 24.0, a=9.0 if 400 <= i < 460 else float(i % 3), b=float(i)))
        return h

    settings = build_settings({"retrain": {"holdout_fraction": 0.2, "exclude_margin_rows": 4}})
    event = feedback.make_verdict("pump", 60.0 * 400, 60.0 * 459, "normal")
    tight = _prepare(history(), FlaggingChampion(), settings, feedback.periods([event]))
    assert tight.facts["flagged_windows"] >= 1 and tight.facts["rows_excluded"] > 0
    widened = _prepare(history(), FlaggingChampion(), settings, feedback.periods([event], pad_s=0.5 * 60.0))
    assert widened.facts["flagged_windows"] == 0 and widened.facts["rows_excluded"] == 0


def test_maintenance_periods_are_their_own_kind_not_labels():
    given = [feedback.make_verdict("pump-7", 100.0, 200.0, "maintenance", note="bearing swap"),
             feedback.make_verdict("pump-7", 50.0, 60.0, "normal"),
             feedback.make_verdict("pump-7", 300.0, 400.0, "maintenance")]
    assert feedback.periods(given) == {"pump-7": [(50.0, 60.0, False)]}  # no label from maintenance
    assert feedback.maintenance(given, pad_s=1.0) == {"pump-7": [(99.0, 201.0), (299.0, 401.0)]}
    assert feedback.maintenance([*given, feedback.withdrawn(given[0].feedback_id)]) == {"pump-7": [(300.0, 400.0)]}
    assert feedback.within(np.array([99.0, 100.0, 250.0, 400.0]), [(100.0, 200.0), (300.0, 400.0)]).tolist() == [
        False, True, False, True]
    assert feedback.summary(feedback.latest(given)) == "3 verdicts (1 normal, 0 anomaly, 2 maintenance)"
    assert feedback.decode(feedback.encode(given[0])) == given[0]


def test_maintenance_readings_are_left_out_of_training_and_of_the_comparison():
    """Readings taken during maintenance (a pump stopped, sensors being swapped) are neither normal nor a
    fault: an `anomaly` verdict kept them out of training but made the gate count them as a period to find."""
    from anomaly.config import build_settings
    from anomaly.retrain import _prepare

    h = History(max_readings=10_000, lookback_s=1e9)
    for i in range(1000):
        h.add(reading("pump", 60.0 * i, a=9.0 if 400 <= i < 460 else float(i % 3), b=float(i)))
    settings = build_settings({"retrain": {"holdout_fraction": 0.2, "exclude_margin_rows": 4}})
    data = _prepare(h, FlaggingChampion(), settings, None, {"pump": [(60.0 * 400, 60.0 * 459)]})
    trained = set(data.train_values[:, 1][~data.gaps if data.gaps is not None else slice(None)])
    assert not trained & set(range(400, 460)) and len(trained) > 700
    assert data.facts["flagged_windows"] == 0  # not there to flag: no margin lost around it either
    assert data.facts["verdict_maintenance_readings"] == 60 and data.facts["labelled_rows"] == 0
