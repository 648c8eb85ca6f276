"""`anomaly events`' pure side (anomaly.event_list): folding records, choosing, joining verdicts, lines."""

from anomaly.event_list import Folded, fold, line, select, verdict_for
from anomaly.feedback import make_verdict

T0 = 1_795_255_392.0


def ev(eid, status, start, end=None, entity="pump-7", **extra):
    return {"event_id": eid, "entity": entity, "status": status, "start_ts": start, "end_ts": end,
            "peak_score": 4.2, "threshold": 0.9, "windows": 12, "model": {"name": "m", "version": "3"},
            "sensors": [{"sensor": "pressure", "share": 0.81, "actual": 1.41, "expected": 1.02, "filled": False}],
            **extra}


def test_fold_keeps_each_events_last_record_and_notices_a_reopen():
    records = [(ev("a" * 16, "open", T0), 1.0), (ev("b" * 16, "open", T0 + 5), 2.0),
               (ev("a" * 16, "closed", T0, T0 + 60), 3.0), (ev("a" * 16, "open", T0), 4.0),
               ({"no": "id"}, 5.0), ({"event_id": 7}, 6.0)]
    folded = fold(records)
    assert set(folded) == {"a" * 16, "b" * 16}
    a = folded["a" * 16]
    assert a.event["status"] == "open" and a.written_s == 4.0 and a.reopened
    assert not folded["b" * 16].reopened


def test_select_narrows_by_entity_time_status_and_keeps_the_newest_oldest_first():
    folded = fold([(ev("e1", "closed", T0, T0 + 10), 1.0), (ev("e2", "closed", T0 + 100, T0 + 110, entity="fan-1"), 1.0),
                   (ev("e3", "open", T0 + 200), 1.0), (ev("e4", "closed", T0 + 300, T0 + 400), 1.0),
                   ({"event_id": "bad", "start_ts": "x"}, 1.0)])
    ids = lambda listed: [item.folded.event["event_id"] for item in listed]  # noqa: E731
    every = dict(now_s=T0, stale_after_s=3600.0)
    assert ids(select(folded, [], **every)) == ["e1", "e2", "e3", "e4"]  # a record without a start is left out
    assert ids(select(folded, [], **every, limit=2)) == ["e3", "e4"]
    assert ids(select(folded, [], **every, limit=0)) == ["e1", "e2", "e3", "e4"]
    assert ids(select(folded, [], **every, entity="fan-1")) == ["e2"]
    assert ids(select(folded, [], **every, since_s=T0 + 110)) == ["e2", "e3", "e4"]  # e2 ends then; e3 is open
    assert ids(select(folded, [], **every, since_s=T0 + 111)) == ["e3", "e4"]
    assert ids(select(folded, [], **every, open_only=True)) == ["e3"]


def test_an_open_event_without_a_record_for_longer_than_max_event_s_is_stale():
    folded = fold([(ev("old", "open", T0), 1000.0), (ev("new", "open", T0 + 1), 4000.0),
                   (ev("shut", "closed", T0, T0 + 5), 1000.0), (ev("nots", "open", T0 + 2), None)])
    listed = {item.folded.event["event_id"]: item for item in select(folded, [], now_s=4700.0, stale_after_s=3600.0)}
    assert listed["old"].stale and not listed["new"].stale
    assert not listed["shut"].stale and not listed["nots"].stale  # closed, and no record time known
    assert "[stale: no record for 61.7 min]" in line(listed["old"], now_s=4700.0)


def test_the_verdict_on_an_event_is_the_one_given_on_it_else_a_period_of_its_entity_that_overlaps_it():
    e = ev("e1", "closed", T0, T0 + 60)
    on_it = make_verdict("pump-7", T0, T0 + 60, "normal", event_id="e1", note="new impeller", by="alice")
    period = make_verdict("pump-7", T0 + 50, T0 + 500, "maintenance", by="bob")
    other_entity = make_verdict("fan-1", T0, T0 + 60, "anomaly")
    before = make_verdict("pump-7", T0 - 100, T0 - 1, "anomaly")
    assert verdict_for(e, [period, on_it, other_entity]) == on_it  # given on it wins over a period
    assert verdict_for(e, [period, other_entity, before]) == period
    assert verdict_for(e, [other_entity, before]) is None
    later = make_verdict("pump-7", T0 + 10, T0 + 20, "anomaly")
    assert verdict_for(e, [period, later]) == later  # the latest given of the periods
    assert verdict_for(ev("e9", "open", T0 + 400), [period]) == period  # an open one reaches on


def test_a_line_is_the_consoles_with_the_verdict_and_json_carries_it():
    e = ev("5f0c3a1b2c3d4e5f", "closed", T0, T0 + 150)
    v = make_verdict("pump-7", T0, T0 + 150, "normal", event_id=e["event_id"], note="new impeller", by="alice")
    [item] = select({e["event_id"]: Folded(e, 5.0)}, [v], now_s=10.0, stale_after_s=3600.0)
    text = line(item, now_s=10.0)
    assert "CLOSED pump-7" in text and "lasted 2.5 min" in text and "id 5f0c3a1b" in text
    assert "pressure 81% (1.41 vs 1.02)" in text
    assert text.endswith("[normal by alice: new impeller]")
    period = make_verdict("pump-7", T0, T0 + 150, "anomaly")
    [item] = select({e["event_id"]: Folded(e, 5.0)}, [period], now_s=10.0, stale_after_s=3600.0)
    assert line(item, now_s=10.0).endswith("[anomaly (period)]")
    d = item.to_dict()
    assert d["verdict"]["verdict"] == "anomaly" and d["stale"] is False and d["written_ts"] == 5.0
    assert d["event_id"] == e["event_id"] and d["reopened"] is False
