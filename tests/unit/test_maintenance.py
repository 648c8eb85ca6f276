"""``anomaly.maintenance``: which event records a worker holds back for an entity in maintenance."""

from __future__ import annotations

import json
import logging

from anomaly.maintenance import MaintenanceWatch, Muter


def event(eid: str, entity: str, start: float, status: str = "open") -> dict:
    return {"event_id": eid, "entity": entity, "start_ts": start, "status": status}


def encoded(*events: dict) -> list[tuple[bytes, bytes]]:
    return [(e["entity"].encode(), json.dumps(e).encode()) for e in events]


def test_an_event_starting_in_maintenance_is_held_back_whole_and_others_go_out():
    m = Muter()
    m.update({"pump-7": [(100.0, 200.0)]})
    kept, muted = m.keep(encoded(event("a", "pump-7", 150.0), event("b", "pump-8", 150.0),
                                 event("c", "pump-7", 90.0), event("d", "pump-7", 250.0)))
    assert [json.loads(v)["event_id"] for _, v in kept] == ["b", "c", "d"] and muted == [("pump-7", "open")]
    kept, muted = m.keep(encoded(event("a", "pump-7", 150.0, "closed"), event("c", "pump-7", 90.0, "closed")))
    assert [json.loads(v)["event_id"] for _, v in kept] == ["c"]  # begun before it: closes as it opened
    assert m.muted == 2


def test_the_decision_holds_for_an_event_s_life_whatever_the_periods_do_meanwhile():
    m = Muter()
    m.update({"pump-7": [(100.0, 200.0)]})
    assert m.mutes(event("a", "pump-7", 150.0))
    assert not m.mutes(event("b", "pump-7", 50.0))
    m.update({"pump-7": [(0.0, 1000.0)]})  # a period given while b is open: b still closes
    assert not m.mutes(event("b", "pump-7", 50.0, "closed"))
    m.update({})  # withdrawn while a is open: its close stays held back, as its open was
    assert m.mutes(event("a", "pump-7", 150.0, "closed"))
    m.update({"pump-7": [(100.0, 200.0)]})
    assert not m.mutes(event("z", "pump-7", 150.0, "closed"))  # its open not seen here (a restart): sent


def test_an_open_let_through_before_any_period_gets_its_close_out_when_one_is_given_meanwhile():
    """`anomaly feedback maintenance EVENT_ID` on an event still open: the period starts at its start. The
    close was held back (no period was in force at its open, so the open was not noted): an event that never
    closed downstream."""
    m = Muter()
    kept, _ = m.keep(encoded(event("e1", "pump-1", 100.0)))
    assert len(kept) == 1
    m.update({"pump-1": [(100.0, 1000.0)]})
    kept, muted = m.keep(encoded(event("e1", "pump-1", 100.0, "closed"), event("e2", "pump-1", 500.0)))
    assert [json.loads(v)["event_id"] for _, v in kept] == ["e1"] and muted == [("pump-1", "open")]


def test_events_whose_close_never_comes_here_are_forgotten():
    m = Muter(max_age_s=100.0)
    m.keep(encoded(*(event(f"e{i}", "pump-1", float(i)) for i in range(1001))), now_s=1050.0)
    assert len(m._open) == 51  # those started in the last 100 s are kept


def test_without_maintenance_every_event_goes_out_untouched():
    m = Muter()
    events = encoded(event("a", "pump-7", 150.0)) + [(b"k", b"not json")]
    assert m.keep(events) == (events, [])
    m.update({"pump-7": [(100.0, 200.0)]})
    assert m.keep([(b"k", b"not json")]) == ([(b"k", b"not json")], [])  # not ours to judge: sent


def test_the_watch_keeps_the_periods_it_knows_through_a_failed_read(caplog):
    got = []
    answers = [{"pump-7": [(1.0, 2.0)]}, ConnectionError("broker down"), ConnectionError("still"), {}]

    def read():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = MaintenanceWatch(read, got.append, every_s=60)
    with caplog.at_level(logging.INFO, logger="anomaly.maintenance"):
        assert watch.refresh() and not watch.refresh() and not watch.refresh() and watch.refresh()
    assert got == [{"pump-7": [(1.0, 2.0)]}, {}] and watch.reads == 2
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "cannot read the maintenance periods (broker down)" in said[0]
    assert said[1] == "maintenance periods read again"


def test_the_version_moves_only_when_the_periods_change():
    """The worker passes the periods on to its scoring step (a message to the child) when the version moves;
    a re-read every minute that finds the same periods sent them again each time."""
    m = Muter()
    m.update({"pump-7": [(100.0, 200.0)]})
    assert m.version == 1
    m.update({"pump-7": [(100.0, 200.0)], "pump-8": []})
    assert m.version == 1
    m.update({"pump-7": [(100.0, 250.0)]})
    assert m.version == 2 and m.spans == {"pump-7": ((100.0, 250.0),)}
