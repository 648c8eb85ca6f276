"""Alert shaping: one anomaly is one event, with deterministic ids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from anomaly.alerts import AlertPolicy, AlertTracker, rfc3339
from anomaly.codec import event_id
from anomaly.errors import ConfigError

THRESHOLD = 1.0
T0 = 1_700_000_000.0


def detail(name: str = "temp") -> list[dict[str, Any]]:
    return [{"sensor": name, "share": 0.7, "actual": 9.0, "expected": 1.0},
            {"sensor": "flow", "share": 0.2, "actual": 2.0, "expected": 2.1},
            {"sensor": "pressure", "share": 0.1, "actual": 1.0, "expected": 1.0},
            {"sensor": "rpm", "share": 0.0, "actual": 5.0, "expected": 5.0}]


def run(tracker: AlertTracker, scores: Sequence[float], entity: str = "pump-1", t0: float = T0,
        model: str = "pumps") -> list[dict[str, Any]]:
    """Feed one window per second; returns every event emitted, in order."""
    events: list[dict[str, Any]] = []
    for i, score in enumerate(scores):
        events += tracker.update(entity, t0 + i, score, THRESHOLD, detail, model, "3")
    return events


def test_short_spike_opens_nothing() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=3))
    assert run(tracker, [0.1, 5.0, 5.0, 0.1, 5.0, 0.2, 0.1]) == []
    assert tracker.open_events() == [] and tracker.entities == 0


def test_long_spike_is_one_event_opened_and_closed_once() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=3, recovery_windows=3, top_k=2))
    scores = [0.1, 2.0, 3.0, 9.0, 4.0, 0.5, 2.5, 0.2, 0.3, 0.4, 0.1, 0.1]
    events = run(tracker, scores)
    assert [e["status"] for e in events] == ["open", "closed"]
    opened, closed = events
    start = T0 + 1
    assert opened["event_id"] == closed["event_id"] == event_id("pump-1", "pumps", start)
    assert opened["start_ts"] == start and opened["start"] == rfc3339(start)
    assert opened["end"] is None and opened["end_ts"] is None
    assert opened["peak_score"] == 9.0 and opened["windows"] == 3  # opened at the third window above
    assert closed["end_ts"] == T0 + 6  # the last window above, not the window that confirmed recovery
    assert closed["end"] == rfc3339(T0 + 6)
    assert closed["windows"] == 6  # windows 1..6 (one dip below in between)
    assert closed["peak_score"] == 9.0 and closed["peak_ts"] == T0 + 3
    assert closed["threshold"] == THRESHOLD and closed["model"] == {"name": "pumps", "version": "3"}
    assert [s["sensor"] for s in closed["sensors"]] == ["temp", "flow"]  # top_k = 2
    assert tracker.open_events() == []


def test_open_events_lists_what_is_open() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=2))
    run(tracker, [5.0, 5.0, 5.0], entity="b")
    run(tracker, [5.0], entity="a")  # a run, not an event
    [event] = tracker.open_events()
    assert event["entity"] == "b" and event["status"] == "open" and event["windows"] == 3


def test_cooldown_reopens_the_same_event_and_later_runs_get_a_new_id() -> None:
    policy = AlertPolicy(min_duration_windows=2, recovery_windows=2, cooldown_s=10.0)
    tracker = AlertTracker(policy)
    # windows at T0+0..: open at 1, closed at 4 (recovery at 3, 4); a new run starts at 6 (2 s after close)
    first = run(tracker, [5, 5, 0, 0, 0, 0, 7, 7, 0, 0])
    assert [e["status"] for e in first] == ["open", "closed", "open", "closed"]
    assert len({e["event_id"] for e in first}) == 1
    reopened, last_close = first[2], first[3]
    assert reopened["start_ts"] == T0 and reopened["peak_score"] == 7.0
    assert last_close["end_ts"] == T0 + 7 and last_close["windows"] == 8
    # far beyond the cooldown: a new event with a new id
    later = run(tracker, [6, 6], t0=T0 + 100)
    assert [e["status"] for e in later] == ["open"]
    assert later[0]["event_id"] == event_id("pump-1", "pumps", T0 + 100) != first[0]["event_id"]


def test_short_spike_in_cooldown_does_not_reopen() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=3, recovery_windows=1, cooldown_s=60.0))
    events = run(tracker, [5, 5, 5, 0, 5, 0, 5, 5, 0])
    assert [e["status"] for e in events] == ["open", "closed"]


def test_ids_are_deterministic_across_fresh_trackers() -> None:
    scores = [0, 3, 3, 3, 0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0]
    a = run(AlertTracker(AlertPolicy(cooldown_s=0.0)), scores)
    b = run(AlertTracker(AlertPolicy(cooldown_s=0.0)), scores)
    assert a == b and len(a) == 4
    assert a[0]["event_id"] != a[2]["event_id"]


def test_entities_are_independent() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=2))
    events = []
    for i in range(4):
        events += tracker.update("a", T0 + i, 5.0, THRESHOLD, detail, "m", "1")
        events += tracker.update("b", T0 + i, 0.0, THRESHOLD, detail, "m", "1")
    assert [(e["entity"], e["status"]) for e in events] == [("a", "open")]


def test_sensor_detail_is_only_called_for_new_peaks() -> None:
    calls = []

    def counted() -> list[dict[str, Any]]:
        calls.append(1)
        return detail()

    tracker = AlertTracker(AlertPolicy(min_duration_windows=2))
    for i, score in enumerate([0.1] * 100 + [2.0, 3.0, 2.5, 4.0, 1.5] + [0.1] * 10):
        tracker.update("e", T0 + i, score, THRESHOLD, counted, "m", "1")
    assert len(calls) == 3  # 2.0, 3.0, 4.0


def test_score_equal_to_threshold_is_not_above() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=1))
    assert run(tracker, [THRESHOLD] * 5) == []


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_795_255_200.25) == "2026-11-21T10:00:00.250Z"


def test_bad_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        AlertPolicy(min_duration_windows=0)
    with pytest.raises(ConfigError):
        AlertPolicy(cooldown_s=-1.0)


def test_active_entities_are_those_a_quiet_window_can_change() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=2, recovery_windows=1, cooldown_s=10.0))
    detail = lambda: []  # noqa: E731
    tracker.update("calm", 0.0, 0.1, 1.0, detail, "m", "1")
    assert tracker.active_entities() == set()  # at rest: nothing held
    tracker.update("hot", 0.0, 2.0, 1.0, detail, "m", "1")  # a run building up
    assert tracker.active_entities() == {"hot"}
    tracker.update("hot", 1.0, 2.0, 1.0, detail, "m", "1")  # open
    tracker.update("hot", 2.0, 0.1, 1.0, detail, "m", "1")  # closed, in cooldown: still held
    assert tracker.active_entities() == {"hot"}
    tracker.update("hot", 20.0, 0.1, 1.0, detail, "m", "1")  # cooldown over
    assert tracker.active_entities() == set()


def test_across_a_model_swap_the_peak_is_the_window_furthest_over_its_own_bar() -> None:
    tracker = AlertTracker(AlertPolicy(min_duration_windows=1, recovery_windows=2))
    # Version 3 scores on a scale of tens (bar 10), its successor 4 on a scale of tenths (bar 0.1).
    tracker.update("pump-1", T0, 20.0, 10.0, lambda: detail("temp"), "pumps", "3")
    tracker.update("pump-1", T0 + 1, 0.15, 0.1, lambda: detail("pressure"), "pumps", "4")  # 1.5x: not higher
    assert tracker.open_events()[0]["sensors"][0]["sensor"] == "temp"
    tracker.update("pump-1", T0 + 2, 2.2, 0.1, lambda: detail("flow"), "pumps", "4")  # 22x its bar: the peak
    tracker.update("pump-1", T0 + 3, 1.0, 0.1, lambda: detail("flow"), "pumps", "4")  # lower, same version
    closed = [e for t in (4, 5) for e in tracker.update("pump-1", T0 + t, 0.01, 0.1, detail, "pumps", "4")]
    assert [e["status"] for e in closed] == ["closed"]
    event = closed[0]
    assert (event["peak_score"], event["threshold"], event["peak_ts"]) == (2.2, 0.1, T0 + 2)
    assert event["model"] == {"name": "pumps", "version": "4"} and event["sensors"][0]["sensor"] == "flow"


def test_an_event_is_cut_at_each_boundary_of_the_stream_time_grid_and_goes_on_under_a_new_id() -> None:
    # A fault above the bar for 250 windows (one a second), a grid of 100 s (T0 is on it): the event is
    # closed at the first window past each boundary with ``continued: true``, ending at its last window
    # above, and the anomaly goes on as a new event from that window (its own run, its own id). Before,
    # an event stayed open as long as the fault, and a restart an hour in left its id open for ever.
    tracker = AlertTracker(AlertPolicy(min_duration_windows=3, recovery_windows=3, max_event_s=100.0))
    events = run(tracker, [0.1] * 5 + [5.0] * 250 + [0.1] * 5)
    assert [(e["status"], e["continued"]) for e in events] == [
        ("open", False), ("closed", True), ("open", False), ("closed", True), ("open", False), ("closed", False)]
    first, second, third = events[0]["event_id"], events[2]["event_id"], events[4]["event_id"]
    assert len({first, second, third}) == 3
    assert events[1]["event_id"] == first and events[3]["event_id"] == second and events[5]["event_id"] == third
    assert events[1]["start_ts"] == T0 + 5 and events[1]["end_ts"] == T0 + 99  # the window before the boundary
    assert events[2]["start_ts"] == T0 + 100 == events[3]["end_ts"] - 99  # the continuation starts on it
    assert second == event_id("pump-1", "pumps", T0 + 100)
    assert events[4]["start_ts"] == T0 + 200 and events[5]["end_ts"] == T0 + 254 and tracker.open_events() == []


def test_the_grid_spans_at_least_sixty_windows() -> None:
    # One window an hour (a slow grid): an hour-long grid would cut the event at every window; with the
    # entity's window spacing known it spans 60 of them.
    tracker = AlertTracker(AlertPolicy(min_duration_windows=1, recovery_windows=1, max_event_s=3600.0),
                           spacing_s=3600.0)
    assert tracker.period_s() == 216_000.0
    t0 = 216_000.0 * 8000  # on the grid
    events: list[dict[str, Any]] = []
    for i in range(70):
        events += tracker.update("pump-1", t0 + 3600.0 * i, 5.0, THRESHOLD, detail, "pumps", "3")
    # With min_duration 1 the window past the boundary closes the old event and opens the new one.
    assert [(e["status"], e["continued"]) for e in events] == [("open", False), ("closed", True), ("open", False)]
    assert events[1]["windows"] == 60 and events[2]["start_ts"] == t0 + 3600.0 * 60


def test_no_alert_state_crosses_a_boundary() -> None:
    policy = AlertPolicy(min_duration_windows=2, recovery_windows=2, cooldown_s=30.0, max_event_s=100.0)
    # An event recovering at the boundary is closed there, not continued: the anomaly is ending.
    tracker = AlertTracker(policy)
    events = run(tracker, [0.1] * 90 + [5.0] * 9 + [0.1] * 10)
    assert [(e["status"], e["continued"], e["end_ts"]) for e in events] == [
        ("open", False, None), ("closed", False, T0 + 98)]
    # A run inside the cooldown of an event from the period before starts a new event instead of re-opening it.
    tracker = AlertTracker(policy)
    events = run(tracker, [0.1] * 90 + [5.0] * 5 + [0.1] * 10 + [5.0] * 3 + [0.1] * 5)
    assert [e["status"] for e in events] == ["open", "closed", "open", "closed"]
    assert events[0]["event_id"] != events[2]["event_id"] and events[2]["start_ts"] == T0 + 105
    # Within one period the same run re-opens the same event (the cooldown's rule).
    tracker = AlertTracker(policy)
    events = run(tracker, [0.1] * 10 + [5.0] * 5 + [0.1] * 10 + [5.0] * 3 + [0.1] * 5)
    assert [e["event_id"] for e in events] == [events[0]["event_id"]] * 4
    # A run that had not yet opened an event starts again from the boundary.
    tracker = AlertTracker(AlertPolicy(min_duration_windows=3, max_event_s=100.0))
    assert run(tracker, [0.1] * 98 + [5.0] * 4 + [0.1] * 5) == []  # 98-99, then 100-101: two runs of 2
    assert [e["start_ts"] for e in run(tracker, [5.0] * 3, t0=T0 + 200)] == [T0 + 200]


def test_max_event_s_must_be_positive_and_finite() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="max_event_s"):
            AlertPolicy(max_event_s=bad)


def test_an_anomaly_that_began_in_maintenance_and_goes_on_after_it_is_a_new_event_at_its_end() -> None:
    """The worker holds back an event that starts in its entity's maintenance; one that went on after the
    work (a seal fitted wrong) was held back with it until the grid's next boundary, up to an hour."""
    tracker = AlertTracker(AlertPolicy(min_duration_windows=3, recovery_windows=3, max_event_s=3600.0))
    tracker.maintenance = {"pump-1": ((T0 + 0.0, T0 + 40.0),), "pump-2": ((T0 + 0.0, T0 + 40.0),),
                           "pump-3": ((T0 + 10.0, T0 + 40.0),)}
    events = run(tracker, [0.1] * 5 + [5.0] * 60 + [0.1] * 5)  # above from T0 + 5 to T0 + 64
    assert [(e["status"], e["continued"], e["start_ts"]) for e in events] == [
        ("open", False, T0 + 5), ("closed", True, T0 + 5), ("open", False, T0 + 41), ("closed", False, T0 + 41)]
    assert events[1]["end_ts"] == T0 + 40  # the last window of the work
    # an anomaly that began before the period (at T0 + 1) is not cut at its end; one that ends in it is not either
    assert [e["status"] for e in run(tracker, [0.1] * 1 + [5.0] * 60 + [0.1] * 5, entity="pump-3")] == ["open", "closed"]
    assert [e["start_ts"] for e in run(tracker, [5.0] * 10 + [0.1] * 60, entity="pump-2", t0=T0 + 20)] == [T0 + 20] * 2
