"""`anomaly events`' pure side (anomaly.event_list): folding records, choosing, joining verdicts, lines."""

import json

from anomaly.event_list import Folded, Folder, fold, line, select, verdicts_for
from anomaly.feedback import make_verdict

T0 = 1_795_255_392.0


def ev(eid, status, start, end=None, entity="pump-7", **extra):
    return {"event_id": eid, "entity": entity, "status": status, "start_ts": start, "end_ts": end,
            "peak_score": 4.2, "threshold": 0.9, "windows": 12, "model": {"name": "m", "version": "3"},
            "sensors": [{"sensor": "pressure", "share": 0.81, "actual": 1.41, "expected": 1.02, "filled": False}],
            **extra}


def test_fold_keeps_each_events_last_record_and_notices_a_reopen():
    records = [(ev("a" * 16, "open", T0), 1.0), (ev("b" * 16, "open", T0 + 5), 2.0),
               (ev("a" * 16, "closed", T0, T0 + 60), 3.0), (ev("a" * 16, "open", T0, windows=20), 4.0),
               ({"no": "id"}, 5.0), ({"event_id": 7}, 6.0)]
    folded = fold(records)
    assert set(folded) == {"a" * 16, "b" * 16}
    a = folded["a" * 16]
    assert a.event["status"] == "open" and a.written_s == 4.0 and a.reopened
    assert not folded["b" * 16].reopened
    # an event whose records went to two partitions (partitions added while it was open): the record
    # written last holds, whichever partition was read first
    late = fold([(ev("c" * 16, "closed", T0, T0 + 60), 9.0), (ev("c" * 16, "open", T0), 8.0)])
    assert late["c" * 16].event["status"] == "closed" and not late["c" * 16].reopened
    only = Folder("fan-1")
    for event, written_s in records + [(ev("d" * 16, "open", T0, entity="fan-1"), 1.0)]:
        only.add(event, written_s)
    assert list(only.events) == ["d" * 16]  # another entity's events are not kept
    held = Folder()
    record = json.dumps(ev("e" * 16, "closed", T0, T0 + 60)).encode()
    held.add(json.loads(record), 1.0, record)  # the bytes are held, and decoded when shown
    f = held.events["e" * 16]
    assert f.record == record and f.event == json.loads(record) and (f.status, f.start_ts, f.end_ts) == ("closed", T0, T0 + 60)


def test_a_record_sent_again_by_a_restarted_workers_replay_leaves_the_event_as_it_was():
    """A worker that restarts re-reads from its committed offsets and sends the same records again (an event's
    records are the same bytes every time): a closed event whose open record comes again is still closed,
    not re-opened; a real re-open (a crossing within the cooldown: more windows) still shows."""
    first, close = ev("a" * 16, "open", T0), ev("a" * 16, "closed", T0, T0 + 60)
    again = ev("a" * 16, "open", T0, windows=20)
    for raw in (False, True):
        folder = Folder()

        def add(event, written_s):
            folder.add(event, written_s, json.dumps(event, sort_keys=True).encode() if raw else None)

        for written_s, event in enumerate([first, close, first, close, first]):  # replayed twice, cut the 2nd time
            add(event, float(written_s))
        a = folder.events["a" * 16]
        assert a.status == "closed" and not a.reopened and a.written_s == 1.0
        add(again, 5.0)
        assert folder.events["a" * 16].status == "open" and folder.events["a" * 16].reopened
        add(first, 6.0)  # a replay from before the re-open: the re-open stands until its own record
        assert folder.events["a" * 16].reopened and folder.events["a" * 16].written_s == 5.0


def test_select_narrows_by_entity_time_status_and_keeps_the_newest_oldest_first():
    folded = fold([(ev("e1", "closed", T0, T0 + 10), 1.0), (ev("e2", "closed", T0 + 100, T0 + 110, entity="fan-1"), 1.0),
                   (ev("e3", "open", T0 + 200), 1.0), (ev("e4", "closed", T0 + 300, T0 + 400), 1.0),
                   ({"event_id": "bad", "start_ts": "x"}, 1.0)])
    ids = lambda listed: [item.folded.event["event_id"] for item in listed]  # noqa: E731
    every = dict(now_s=T0, stale_after_s=3600.0)
    assert ids(select(folded, [], **every)) == ["e1", "e2", "e3", "e4"]  # a record without a start is left out
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
    assert "[no record for 61.7 min]" in line(listed["old"], now_s=4700.0)


def test_the_verdicts_on_an_event_are_the_one_given_on_it_and_the_periods_of_its_entity_that_overlap_it():
    """All of them, in the order given: the retrain applies each to the readings it covers."""
    e = ev("e1", "closed", T0, T0 + 60)
    on_it = make_verdict("pump-7", T0, T0 + 60, "normal", event_id="e1", note="new impeller", by="alice")
    period = make_verdict("pump-7", T0 + 50, T0 + 500, "maintenance", by="bob")
    other_entity = make_verdict("fan-1", T0, T0 + 60, "anomaly")
    before = make_verdict("pump-7", T0 - 100, T0 - 1, "anomaly")
    other_event = make_verdict("pump-7", T0, T0 + 60, "anomaly", event_id="e2")
    assert verdicts_for(e, [period, on_it, other_entity, before, other_event]) == (period, on_it)
    assert verdicts_for(e, [other_entity, before]) == ()
    assert verdicts_for(ev("e9", "open", T0 + 400), [period]) == (period,)  # an open one reaches on


def test_a_line_is_the_consoles_with_the_verdict_and_json_carries_it():
    e = ev("5f0c3a1b2c3d4e5f", "closed", T0, T0 + 150)
    v = make_verdict("pump-7", T0, T0 + 150, "normal", event_id=e["event_id"], note="new impeller", by="alice")
    [item] = select({e["event_id"]: Folded.of(e, 5.0)}, [v], now_s=10.0, stale_after_s=3600.0)
    text = line(item, now_s=10.0)
    assert "CLOSED pump-7" in text and "lasted 2.5 min" in text and "id 5f0c3a1b" in text
    assert "pressure 81% (1.41 vs 1.02)" in text
    assert text.endswith("[normal by alice: new impeller]")
    period = make_verdict("pump-7", T0, T0 + 150, "anomaly")
    [item] = select({e["event_id"]: Folded.of(e, 5.0)}, [v, period], now_s=10.0, stale_after_s=3600.0)
    assert line(item, now_s=10.0).endswith("[normal by alice: new impeller; anomaly (period)]")
    d = item.to_dict()
    assert [x["verdict"] for x in d["verdicts"]] == ["normal", "anomaly"] and d["stale"] is False
    assert d["written_ts"] == 5.0
    assert d["event_id"] == e["event_id"] and d["reopened"] is False


def test_read_events_gives_each_records_kafka_time_in_seconds_and_passes_over_what_is_not_an_event(monkeypatch):
    import json
    from types import SimpleNamespace

    from anomaly import feedback_topic, kafka_io

    def read_all(bootstrap_servers, topic, **kwargs):
        kwargs["on_records"]([SimpleNamespace(value=json.dumps(ev("a1", "open", T0)).encode(), timestamp=1_795_255_400_250),
                              SimpleNamespace(value=b"not json", timestamp=1),
                              SimpleNamespace(value=None, timestamp=2),
                              SimpleNamespace(value=json.dumps(ev("a2", "open", T0)).encode(), timestamp=-1)])
        assert kwargs["strict"] is True
        return []

    monkeypatch.setattr(kafka_io, "read_all", read_all)
    got = []
    feedback_topic.read_events("x:1", "anomalies", strict=True,
                               on_event=lambda event, written, raw: got.append((event["event_id"], written, raw[:14])))
    assert got == [("a1", 1_795_255_400.25, b'{"event_id": "'), ("a2", None, b'{"event_id": "')]
