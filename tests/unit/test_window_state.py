"""Window buffers on the sampling grid: every semantic on tiny hand-built cases, and commit offsets."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from anomaly.codec import Reading
from anomaly.errors import ConfigError
from anomaly import window_state
from anomaly.window_state import ReadyWindow, WindowPolicy, WindowStore

FILL = 100.0  # fill value of sensor "x": easy to spot in expected arrays


def store(w: int = 3, **kw: int) -> WindowStore:
    return WindowStore(WindowPolicy(window_size=w, period_s=1.0, **kw), ["x"], [FILL])


def r(ts: float, x: float | None, entity: str = "e") -> Reading:
    return Reading(entity=entity, ts=ts, values={"x": x})


def feed(s: WindowStore, slots: list[int], entity: str = "e", partition: int = 0,
         first_offset: int = 0) -> list[str]:
    """Readings whose value is their slot number, offsets counting up from ``first_offset``."""
    return [s.add(entity, r(slot, float(slot), entity), partition, first_offset + i) for i, slot in enumerate(slots)]


def ends(windows: list[ReadyWindow]) -> list[float]:
    return [w.end_ts for w in windows]


def col(window: ReadyWindow) -> list[float]:
    return window.values[:, 0].tolist()


# --- placing readings -------------------------------------------------------------------------------

@pytest.mark.parametrize("period_s, after_ms", [(0.1, 50), (0.2, 100), (0.5, 250), (0.001, 0.5)])
def test_a_reading_exactly_half_way_goes_to_the_later_slot_every_time(period_s, after_ms):
    """In floats x.x50 s / 0.1 s fell just under the half for one reading in five, which went to the
    slot before it and was dropped there as a duplicate (its own slot forward-filled)."""
    from anomaly.window_state import grid_slots

    policy = WindowPolicy(window_size=4, period_s=period_s)
    first = 1_700_000_000_000  # ms: readings of a 10 Hz source, stamped in ms as JSON carries them
    step_ms = round(period_s * 1000, 6)
    ts = np.array([(first + k * step_ms + after_ms) / 1000 for k in range(1000)])
    want = np.arange(1000) + round(first / 1000 / period_s) + 1
    assert grid_slots(ts, period_s).tolist() == want.tolist()
    assert [policy.slot(float(t)) for t in ts] == want.tolist()
    s = WindowStore(policy, ["x"], [FILL])
    outcomes = Counter(s.add("e", r(float(t), 1.0), 0, k) for k, t in enumerate(ts))
    assert outcomes == {"accepted": 1000}
    bulk = WindowStore(policy, ["x"], [FILL])
    bulk.add_many(["e"] * 1000, ts, np.ones((1000, 1)), np.zeros(1000, dtype=np.int64), np.arange(1000))
    assert [w.end_ts for w in bulk.ready()] == [w.end_ts for w in s.ready()]


def test_a_period_of_no_whole_microseconds_is_placed_in_floats():
    from anomaly.window_state import grid_slots

    # 1/3 s is 333,333.33 us: rounded to whole microseconds, slot k would sit k/3 us early, ~1,700 s off at
    # today's epoch slots (5.1e9). Each reading must land on its own slot, 5,100,000,000 + k.
    third = 1 / 3
    ts = np.array([1_700_000_000.0 + k * third for k in range(30)])
    assert grid_slots(ts, third).tolist() == [5_100_000_000 + k for k in range(30)]

def test_in_order_readings_give_every_window_once() -> None:
    s = store(w=3)
    assert feed(s, [0, 1, 2, 3, 4], partition=2, first_offset=10) == ["accepted"] * 5
    windows = s.ready()
    assert ends(windows) == [2.0, 3.0, 4.0]
    assert [col(w) for w in windows] == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    first = windows[0]
    assert (first.entity, first.start_ts, first.partition, first.end_offset, first.filled) == ("e", 0.0, 2, 12, 0)
    assert first.values.shape == (3, 1) and first.values.dtype == np.float64
    assert not first.values.flags.writeable
    assert s.ready() == []  # handed out once


@pytest.mark.parametrize("grace", [0, 2])
def test_each_window_carries_the_time_stamped_on_its_last_reading(grace) -> None:
    # End-to-end latency is measured from it: from the slot's time it was up to half a period off (a
    # 60 s grid's readings at +40 s read 5 s early, counted as 0).
    period = 60.0
    one = WindowStore(WindowPolicy(window_size=3, period_s=period, grace_slots=grace), ["x"], [FILL])
    bulk = WindowStore(WindowPolicy(window_size=3, period_s=period, grace_slots=grace), ["x"], [FILL])
    stamps = [k * period + 20.0 for k in range(40)]  # every reading 20 s after its slot
    for i, ts in enumerate(stamps):
        one.add("e", r(ts, float(i)), 0, i)
    bulk.add_many(["e"] * len(stamps), np.array(stamps), np.arange(len(stamps), dtype=float)[:, None],
                  np.zeros(len(stamps), dtype=np.int64), np.arange(len(stamps), dtype=np.int64))
    for s in (one, bulk):
        ready = s.ready_batch()
        assert len(ready) == 40 - 2 - (grace + 1 if grace else 0)  # the newest grace + 1 slots unsealed
        np.testing.assert_array_equal(ready.reading_ts, ready.end_ts + 20.0)


def test_slot_is_the_nearest_grid_point() -> None:
    s = WindowStore(WindowPolicy(window_size=2, period_s=0.5), ["x"], [0.0])
    s.add("e", r(10.26, 1.0), 0, 0)  # slot 21 (10.5 s)
    s.add("e", r(10.74, 2.0), 0, 1)  # slot 21 too: duplicate
    assert s.add("e", r(10.74, 2.0), 0, 1) == "duplicate"
    s.add("e", r(10.9, 3.0), 0, 2)  # slot 22 (11.0 s)
    [window] = s.ready()
    assert (window.start_ts, window.end_ts) == (10.5, 11.0)
    assert col(window) == [1.0, 3.0]
    assert WindowPolicy(window_size=1, period_s=1.0).slot(2.5) == 3  # halves round up


def test_duplicate_keeps_the_first_reading() -> None:
    s = store(w=2)
    assert s.add("e", r(0, 1.0), 0, 0) == "accepted"
    assert s.add("e", r(0, 9.0), 0, 1) == "duplicate"
    assert s.add("e", r(1, 2.0), 0, 2) == "accepted"
    assert s.add("e", r(0.2, 7.0), 0, 3) == "duplicate"  # same slot, still in the buffer: duplicate, not late
    [window] = s.ready()
    assert col(window) == [1.0, 2.0]


def test_out_of_order_within_grace_is_placed_in_its_slot() -> None:
    s = store(w=3, grace_slots=1)
    assert feed(s, [0, 2, 1, 3]) == ["accepted"] * 4  # slot 1: one slot behind the newest, within grace
    assert s.ready() == []  # max slot 3 seals slots <= 1 only
    feed(s, [4], first_offset=4)  # seals slot 2
    [window] = s.ready()
    assert (window.end_ts, col(window)) == (2.0, [0, 1, 2])
    assert window.end_offset == 1  # the reading of slot 2 was the second one consumed


def test_a_reading_grace_slots_behind_the_newest_is_placed() -> None:
    # grace_slots = 1 took no reading one slot behind (sealed at once, as with 0): it only added latency
    s = store(w=3, grace_slots=1)
    feed(s, [0, 1, 3])
    assert s.add("e", r(2, 2.0), 0, 3) == "accepted"
    feed(s, [4], first_offset=4)  # seals 2
    [window] = s.ready()
    assert (window.end_ts, col(window), window.filled) == (2.0, [0.0, 1.0, 2.0], 0)
    s3 = store(w=3, grace_slots=3)
    feed(s3, [0, 1, 5])
    assert [s3.add("e", r(slot, float(slot)), 0, 3 + i) for i, slot in enumerate([2, 3, 4])] == ["accepted"] * 3


def test_late_beyond_grace_is_dropped() -> None:
    s = store(w=3, grace_slots=1)
    feed(s, [0, 1, 3, 4])  # seals 0..2; slot 2 is sealed with no reading
    assert s.add("e", r(2, 2.0), 0, 4) == "late"
    feed(s, [5], first_offset=5)  # seals 3: slot 2 is forward-filled from slot 1
    windows = s.ready()
    assert ends(windows) == [3.0]
    assert col(windows[0]) == [1.0, 1.0, 3.0] and windows[0].filled == 1


def test_short_gap_is_forward_filled_and_filled_slots_end_no_window() -> None:
    s = store(w=3, max_fill_steps=2)
    assert feed(s, [0, 1, 4]) == ["accepted"] * 3
    [window] = s.ready()
    assert (window.end_ts, col(window), window.filled) == (4.0, [1.0, 1.0, 4.0], 2)


def test_long_gap_restarts_the_window() -> None:
    s = store(w=3, max_fill_steps=2)
    assert feed(s, [0, 1, 2]) == ["accepted"] * 3
    assert s.add("e", r(6, 6.0), 0, 3) == "reset"  # 3 missing slots > 2
    assert feed(s, [7, 8], first_offset=4) == ["accepted"] * 2
    windows = s.ready()
    assert ends(windows) == [2.0, 8.0]
    assert col(windows[1]) == [6.0, 7.0, 8.0]


def test_long_gap_seen_through_sealed_empty_slots_restarts_with_grace() -> None:
    s = store(w=2, grace_slots=2, max_fill_steps=1)
    assert feed(s, [0, 1]) == ["accepted"] * 2
    # slot 6 seals slots <= 3: slots 2 and 3 are sealed and empty, a gap of 2 > 1
    assert s.add("e", r(6, 6.0), 0, 2) == "reset"
    assert ends(s.ready()) == [1.0]  # slot 1 was sealed by the same reading: its window comes first
    feed(s, [7, 8, 9, 10], first_offset=3)  # seals up to 7
    assert ends(s.ready()) == [7.0]


def test_missing_sensor_is_filled_from_previous_slot_or_fill_values() -> None:
    s = WindowStore(WindowPolicy(window_size=3, period_s=1.0), ["a", "b"], [10.0, 20.0])
    s.add("e", Reading("e", 0, {"a": 1.0, "b": None}), 0, 0)  # b: no previous slot -> fill value 20
    s.add("e", Reading("e", 1, {"a": None, "b": 5.0}), 0, 1)  # a: previous slot's 1.0
    s.add("e", Reading("e", 2, {"a": None, "b": 6.0}), 0, 2)
    [window] = s.ready()
    np.testing.assert_array_equal(window.values, [[1.0, 20.0], [1.0, 5.0], [1.0, 6.0]])
    assert window.filled == 3


def test_a_sensor_missing_longer_than_max_fill_steps_takes_its_typical_value_until_it_reports() -> None:
    s = WindowStore(WindowPolicy(window_size=3, period_s=1.0, max_fill_steps=2), ["a", "b"], [10.0, 20.0])
    b = [7.0, None, None, None, None, 8.0, None]  # b dies after 7.0 (a fault level, say), later comes back
    for slot, value in enumerate(b):
        s.add("e", Reading("e", slot, {"a": float(slot), "b": value}), 0, slot)
    last = {round(w.end_ts): w.values[-1, 1] for w in s.ready()}
    # 2 readings of its last value, then its typical value (20) until it reports; the run starts again.
    assert [last[t] for t in range(2, 7)] == [7.0, 20.0, 20.0, 8.0, 8.0]
    # the bulk path (every sensor present) ends a run as well
    t = WindowStore(WindowPolicy(window_size=3, period_s=1.0, max_fill_steps=1), ["a", "b"], [10.0, 20.0])
    for slot, value in enumerate([1.0, None, 2.0, None, None]):
        t.add("e", Reading("e", slot, {"a": 0.0, "b": value}), 0, slot)
    t.add_many(["e"] * 2, np.array([5.0, 6.0]), np.array([[0.0, 3.0], [0.0, 4.0]]), np.array([0, 0]), np.array([5, 6]))
    t.add("e", Reading("e", 7, {"a": 0.0, "b": None}), 0, 7)
    assert {round(w.end_ts): w.values[-1, 1] for w in t.ready()}[7] == 4.0  # one None after 4.0: its last value


def test_a_gap_slot_counts_in_every_sensors_run_of_missing_slots_as_a_files_grid_counts_it() -> None:
    """b None in slots 2-3, no reading in 4-5, None again in 6-7 (max_fill_steps 3): slots 2-4 hold its last
    value, 5 on its typical one, as `anomaly score` fills the same readings (preparation's slots). Counted
    in readings the gap did not count, and b kept 7.0 up to slot 7: the worker scored other values."""
    from anomaly.preparation import prepare_scoring
    import pandas as pd

    s = WindowStore(WindowPolicy(window_size=2, period_s=1.0, max_fill_steps=3), ["a", "b"], [10.0, 20.0])
    rows = {0: 7.0, 1: 7.0, 2: None, 3: None, 6: None, 7: None, 8: 9.0}
    for slot, value in rows.items():
        s.add("e", Reading("e", slot, {"a": float(slot), "b": value}), 0, slot)
    windows = {round(w.end_ts): w.values for w in s.ready()}
    assert windows[7][:, 1].tolist() == [20.0, 20.0]  # slots 6, 7: past 3 missing slots (2, 3, 4)
    assert windows[3][:, 1].tolist() == [7.0, 7.0]
    assert windows[6][:, 1].tolist() == [20.0, 20.0]  # slot 5, a gap slot, already past the cap
    frame = pd.DataFrame({"a": [float(t) for t in rows], "b": [np.nan if v is None else v for v in rows.values()]},
                         index=pd.to_datetime(list(rows), unit="s", utc=True))
    prepared = prepare_scoring(frame, ["a", "b"], period_s=1.0, fill="ffill", max_fill_steps=3, fill_values=[10.0, 20.0])
    assert prepared.values[:, 1].tolist() == [7.0, 7.0, 7.0, 7.0, 7.0, 20.0, 20.0, 20.0, 9.0]


def test_a_reading_with_every_sensor_null_is_no_reading() -> None:
    """Its slot is missing: a short run of them is a filled gap (no window ends on it), a long one restarts
    the window, as a file's blank rows are on its grid; an entity that sent only such readings holds no
    state. The one-by-one path and add_many agree."""
    def fresh() -> WindowStore:
        return WindowStore(WindowPolicy(window_size=3, period_s=1.0, max_fill_steps=2), ["a", "b"], [10.0, 20.0])

    rows = [(1.0, 2.0)] * 4 + [(None, None)] * 2 + [(1.0, 2.0)] * 3 + [(None, None)] * 3 + [(1.0, 2.0)] * 4
    one = fresh()
    outcomes = [one.add("e", Reading("e", t, {"a": a, "b": b}), 0, t) for t, (a, b) in enumerate(rows)]
    assert outcomes.count("empty") == 5  # (the 3-slot run restarts the window as its time passes)
    assert one.add("ghost", Reading("ghost", 20, {"a": None, "b": None}), 0, 20) == "empty"
    assert one.entities == 1
    ends_one = ends(one.ready())
    assert ends_one == [2.0, 3.0, 6.0, 7.0, 8.0, 14.0, 15.0]  # none on 4-5 (filled); none until 3 slots after 12
    many = fresh()
    values = np.array([[np.nan if v is None else v for v in row] for row in rows])
    counts = many.add_many(["e"] * len(rows), np.arange(len(rows), dtype=float), values, np.zeros(len(rows), int),
                           np.arange(len(rows)))
    assert counts["empty"] == 5
    assert many.add_many(["ghost"], np.array([20.0]), np.full((1, 2), np.nan), np.zeros(1, int), np.array([20]))["empty"] == 1
    assert many.entities == 1 and ends(many.ready()) == ends_one


def test_empty_readings_pass_time_for_an_entity_with_grace() -> None:
    """grace 1: an entity's readings wait a slot to be sealed. Its sensors all go null: the empty readings
    still seal the last real ones (their windows come out, the commit moves on), as readings would; they
    waited for the idle timeout."""
    for bulk in (False, True):
        s = WindowStore(WindowPolicy(window_size=3, period_s=1.0, grace_slots=1), ["a", "b"], [10.0, 20.0])
        if bulk:
            values = np.array([[1.0, 2.0]] * 4 + [[np.nan, np.nan]] * 36)
            s.add_many(["e"] * 4, np.arange(4, dtype=float), values[:4], np.zeros(4, int), np.arange(4))
            s.add_many(["e"] * 36, np.arange(4, 40, dtype=float), values[4:], np.zeros(36, int), np.arange(4, 40))
        else:
            for t in range(40):
                s.add("e", Reading("e", t, {"a": 1.0 if t < 4 else None, "b": 2.0 if t < 4 else None}), 0, t)
        assert ends(s.ready()) == [2.0, 3.0]
        assert s.commit_offsets({0: 39}) == {0: 40}


def test_stride_scores_slots_aligned_to_the_stride() -> None:
    s = store(w=3, stride=2)
    feed(s, list(range(8)))
    assert ends(s.ready()) == [2.0, 4.0, 6.0]
    s2 = store(w=3, stride=2)
    feed(s2, list(range(1, 8)))  # alignment is absolute, not relative to the first reading
    assert ends(s2.ready()) == [4.0, 6.0]


def test_entities_are_independent_and_resettable() -> None:
    s = store(w=2)
    feed(s, [0, 1], entity="a")
    feed(s, [5, 6], entity="b")
    assert s.entities == 2
    assert sorted((w.entity, w.end_ts) for w in s.ready()) == [("a", 1.0), ("b", 6.0)]
    s.reset("a")
    assert s.entities == 1 and "a" not in s
    s.reset()
    assert s.entities == 0


def test_past_a_cap_entities_that_are_not_active_are_evicted_first() -> None:
    s = store(w=3)
    for slot in range(10, 20):  # "a" and "b" report every slot: active
        feed(s, [slot], "a", first_offset=slot)
        feed(s, [slot], "b", first_offset=100 + slot)
    for k, name in enumerate(["x", "y", "z"]):  # one reading each, never a window: x oldest
        s.add(name, r(15 + k, 1.0, name), 0, 200 + k)
    s.add("new", r(18, 1.0, "new"), 0, 300)  # heard from one slot ago: still fresh
    assert s.evict_excess(6) == 0 and s.entities == 6
    assert s.evict_excess(4) == 2 and {n for n in ("a", "b", "x", "y", "z", "new") if n in s} == {"a", "b", "z", "new"}
    assert s.evict_excess(1) == 1 and "z" not in s  # the active and the fresh stay, over the cap
    assert s.entities == 3 and "a" in s and "b" in s and "new" in s


def test_memory_stays_bounded() -> None:
    s = store(w=4, grace_slots=1)  # the newest 2 slots unsealed
    for i in range(1000):
        s.add("e", r(i, float(i)), 0, i)
    state = s._entities["e"]
    assert state.n <= 4 - 1 + 8 and len(state.pending) <= 2
    assert len(s.ready()) == 1000 - 4 + 1 - 2  # the last 2 slots are not sealed yet


def test_evict_idle_drops_silent_entities_and_releases_their_commit() -> None:
    s = store(w=2, grace_slots=1)
    feed(s, [0, 1], entity="quiet", first_offset=0)
    feed(s, list(range(2, 30)), entity="busy", first_offset=2)
    s.ready()
    assert s.commit_offsets({0: 29})[0] == 0  # "quiet" pins the partition
    assert s.evict_idle(max_idle_slots=10) == ["quiet"]
    assert "quiet" not in s
    assert ends(s.ready()) == [1.0]  # its unsealed slot was sealed and scored before it was dropped
    assert s.commit_offsets({0: 29})[0] == 27  # busy: slots 27 (needed) and 28, 29 (unsealed)


def test_eviction_scans_skipped_while_nothing_moved_still_find_what_a_scan_would() -> None:
    # Both scans walked every entity every batch (3.5 ms a batch with 20,000 held); they are now skipped
    # while no partition's newest slot moved and no entity came in. What only those can change must still
    # be found: a newcomer already far behind, and candidates a scan left for a later excess.
    s = store(w=2, grace_slots=1)
    feed(s, list(range(0, 30)), entity="busy", first_offset=0)
    assert s.evict_idle(max_idle_slots=10) == []
    assert s.evict_idle(max_idle_slots=10) == []  # skipped: nothing moved
    s.add("stale", r(5, 1.0, "stale"), 0, 30)  # comes in 24 slots behind its partition's newest
    assert s.evict_idle(max_idle_slots=10) == ["stale"]
    assert s.evict_idle(max_idle_slots=5) == []  # another bar: scanned again, none that far behind
    feed(s, [29], entity="late", first_offset=40)  # a newcomer at the partition's newest slot: not idle
    assert s.evict_idle(max_idle_slots=10) == []
    feed(s, list(range(30, 45)), entity="busy", first_offset=50)  # the partition moves on: "late" is idle now
    assert s.evict_idle(max_idle_slots=10) == ["late"]

    s = store(w=3)
    for slot in range(10, 20):  # "a" reports every slot: active
        feed(s, [slot], "a", first_offset=slot)
    for k, name in enumerate(["x", "y", "z"]):  # one reading each, long ago: not active
        s.add(name, r(11 + k, 1.0, name), 0, 200 + k)
    assert s.evict_excess(3) == 1 and "x" not in s  # y, z left as candidates
    s.add("fresh", r(19, 1.0, "fresh"), 0, 300)  # a newcomer, active: the excess is back, y goes
    assert s.evict_excess(3) == 1 and "y" not in s and "fresh" in s
    assert s.evict_excess(1) == 1 and "z" not in s  # candidates left: scanned again, nothing moved
    assert s.evict_excess(1) == 0 and s.entities == 2  # only the active left, over the cap: nothing to drop


def test_eviction_scans_see_an_entity_that_moves_partition_or_restarts_its_run() -> None:
    # Neither moves a partition's newest slot nor brings an entity in, yet both can make one idle or
    # inactive at once: the skipped scans missed them until the next slot.
    s = WindowStore(WindowPolicy(window_size=3, period_s=1.0), ["x"], [0.0])
    for k in range(100):
        s.add("busy", Reading("busy", float(k), {"x": 1.0}), 1, k)  # partition 1 at slot 99
    for k in range(40, 50):
        s.add("m", Reading("m", float(k), {"x": 1.0}), 0, 1000 + k)  # partition 0 at slot 49
    assert s.evict_idle(10) == []
    s.add("m", Reading("m", 50.0, {"x": 1.0}), 1, 2000)  # its next reading comes through partition 1: 49 behind
    assert s.evict_idle(10) == ["m"]

    s = WindowStore(WindowPolicy(window_size=3, period_s=1.0, max_fill_steps=0), ["x"], [0.0])
    for k in range(20):
        s.add("a", Reading("a", float(k), {"x": 1.0}), 0, k)  # partition 0 at slot 19
    for k in range(11, 16):
        s.add("b", Reading("b", float(k), {"x": 1.0}), 0, 100 + k)  # a window's rows, 4 slots behind: active
    assert s.evict_excess(1) == 0
    s.add("b", Reading("b", 17.0, {"x": 1.0}), 0, 200)  # slot 16 missed, no fill allowed: its run restarts
    assert s.evict_excess(1) == 1 and "b" not in s


def test_bad_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        WindowPolicy(window_size=0, period_s=1.0)
    with pytest.raises(ConfigError):
        WindowPolicy(window_size=3, period_s=0.0)
    with pytest.raises(ConfigError):
        WindowPolicy(window_size=3, period_s=1.0, grace_slots=-1)
    with pytest.raises(ConfigError):
        WindowStore(WindowPolicy(window_size=3, period_s=1.0), ["a", "b"], [0.0])


# --- commit offsets -----------------------------------------------------------------------------------

def test_commit_offsets_over_two_partitions_and_several_entities() -> None:
    s = store(w=3)
    # partition 0: A and B interleaved; partition 1: C.
    s.add("A", r(0, 0.0, "A"), 0, 0)
    s.add("B", r(0, 0.0, "B"), 0, 1)
    s.add("A", r(1, 1.0, "A"), 0, 2)
    s.add("B", r(1, 1.0, "B"), 0, 3)
    s.add("A", r(2, 2.0, "A"), 0, 4)
    s.add("A", r(3, 3.0, "A"), 0, 5)
    for i, slot in enumerate([0, 1, 2]):
        s.add("C", r(slot, float(slot), "C"), 1, 10 + i)
    # Before ready(): A's window ending at slot 2 (offsets 0, 2, 4) is not handed out yet.
    assert s.commit_offsets({0: 5, 1: 12}) == {0: 0, 1: 10}
    s.ready()
    # A: next window ends at 4, needs slots 2, 3 -> offsets 4, 5.  B: its first window (slots 0..2)
    # needs slots 0, 1 -> offsets 1, 3.  Partition 0: min(4, 1) = 1.
    # C: next window ends at 3, needs slots 1, 2 -> offsets 11, 12.
    # Partition 2 had only records nobody keeps (dead letters): last + 1.
    assert s.commit_offsets({0: 5, 1: 12, 2: 7}) == {0: 1, 1: 11, 2: 8}
    s.reset("B")
    assert s.commit_offsets({0: 5}) == {0: 4}


def test_commit_offsets_keep_unsealed_slots_and_fill_sources() -> None:
    s = store(w=3, grace_slots=1, max_fill_steps=2)
    feed(s, [0, 1, 4, 5, 6])  # offsets 0 .. 4: slots 2, 3 filled from slot 1 (offset 1); 5, 6 unsealed
    s.ready()  # window ending at 4: slots 2, 3, 4
    # next window ends at 5 and needs slots 3 (filled from offset 1), 4 (offset 2), 5 (unsealed, offset 3)
    assert s.commit_offsets({0: 4}) == {0: 1}
    feed(s, [7, 8], first_offset=5)
    s.ready()
    assert s.commit_offsets({0: 6}) == {0: 3}  # next window ends at 7: slots 5 (3), 6 (4), 7 (unsealed, 5)


def test_commit_offsets_with_stride_and_window_of_one() -> None:
    s = store(w=3, stride=4)
    feed(s, list(range(6)))  # offsets = slots; window at 4 handed out; next window ends at 8
    s.ready()
    assert s.commit_offsets({0: 5}) == {0: 5}  # needs slots 6, 7, 8: only slot 5... is not needed
    s1 = store(w=1)
    feed(s1, [0, 1, 2])
    s1.ready()
    assert s1.commit_offsets({0: 2}) == {0: 3}  # a window of one slot needs nothing already read


def test_commit_never_goes_beyond_what_a_future_window_needs() -> None:
    """Restart from the committed offsets at random points: the replay rebuilds every window the
    uninterrupted run had not handed out yet, with the same values."""
    rng = random.Random(7)
    for trial in range(200):
        policy = WindowPolicy(window_size=rng.randint(1, 5), period_s=1.0, stride=rng.randint(1, 3),
                              grace_slots=rng.randint(0, 3), max_fill_steps=rng.randint(0, 3))
        records = _random_stream(rng, policy)
        cut = rng.randint(1, len(records) - 1)
        original = WindowStore(policy, ["x"], [0.0])
        for partition, offset, entity, reading in records[:cut]:
            original.add(entity, reading, partition, offset)
        if rng.random() < 0.7:
            original.ready()  # else the windows still queued must be rebuilt as well
        last = {p: max(o for pp, o, _, _ in records[:cut] if pp == p) for p in {p for p, *_ in records[:cut]}}
        commits = original.commit_offsets(last)
        for partition, offset, entity, reading in records[cut:]:
            original.add(entity, reading, partition, offset)
        still_to_score = {(w.entity, w.end_ts): col(w) for w in original.ready()}

        replay = WindowStore(policy, ["x"], [0.0])
        for partition, offset, entity, reading in records:
            if offset >= commits.get(partition, 0):
                replay.add(entity, reading, partition, offset)
        rebuilt = {(w.entity, w.end_ts): col(w) for w in replay.ready()}
        for key, values in still_to_score.items():
            assert rebuilt.get(key) == values, (trial, policy, key)


def test_a_restart_rebuilds_windows_whose_null_sensors_carry_a_value_from_before_the_commit() -> None:
    """As above, two sensors, each None in a fifth of the readings: a None sensor carries the value of
    the last reading that had it, so that reading is needed too. The commit used to pass it: the replay
    filled the sensor from fill_values, the window scored otherwise, and an event open across the
    restart came back under another id (its first never closed)."""
    rng = random.Random(11)
    for trial in range(300):
        policy = WindowPolicy(window_size=rng.randint(2, 5), period_s=1.0, stride=rng.randint(1, 2),
                              grace_slots=rng.randint(0, 3), max_fill_steps=rng.randint(1, 5))
        records = []
        for partition, offset, entity, reading in _random_stream(rng, policy):
            own = random.Random(f"{trial} {entity} {reading.ts}")  # a re-delivered reading is the same reading
            x, y = reading.values["x"], float(own.randint(0, 9))
            x, y = (None if own.random() < 0.2 else x), (None if own.random() < 0.2 else y)
            values = {"x": x if x is not None or y is not None else 1.0, "y": y}
            records.append((partition, offset, entity, Reading(entity, reading.ts, values)))
        cut = rng.randint(1, len(records) - 1)
        original = WindowStore(policy, ["x", "y"], [-1.0, -1.0])
        for partition, offset, entity, reading in records[:cut]:
            original.add(entity, reading, partition, offset)
        if rng.random() < 0.7:
            original.ready()
        last = {p: max(o for pp, o, _, _ in records[:cut] if pp == p) for p in {p for p, *_ in records[:cut]}}
        commits = original.commit_offsets(last)
        for partition, offset, entity, reading in records[cut:]:
            original.add(entity, reading, partition, offset)
        still_to_score = {(w.entity, w.end_ts): w.values.tolist() for w in original.ready()}
        replay = WindowStore(policy, ["x", "y"], [-1.0, -1.0])
        for partition, offset, entity, reading in records:
            if offset >= commits.get(partition, 0):
                replay.add(entity, reading, partition, offset)
        rebuilt = {(w.entity, w.end_ts): w.values.tolist() for w in replay.ready()}
        for key, values in still_to_score.items():
            assert rebuilt.get(key) == values, (trial, policy, key)


def _random_stream(rng: random.Random, policy: WindowPolicy) -> list[tuple[int, int, str, Reading]]:
    """Interleaved readings of 4 entities on 2 partitions, with gaps, duplicates and some disorder
    within the grace period; (partition, offset, entity, reading) in consumption order."""
    per_entity: dict[str, list[Reading]] = {}
    for e in "abcd":
        slot, readings = rng.randint(0, 5), []
        for _ in range(rng.randint(5, 40)):
            slot += 1 if rng.random() < 0.8 else rng.randint(2, 6)  # short and long gaps
            readings.append(Reading(e, float(slot), {"x": float(rng.randint(0, 9))}))
            if rng.random() < 0.1:
                readings.append(readings[-1])  # a re-delivered duplicate
        # disorder: swap neighbours, never by more than the grace period
        for i in range(len(readings) - 1):
            close = abs(readings[i + 1].ts - readings[i].ts) <= policy.grace_slots
            if policy.grace_slots and close and rng.random() < 0.2:
                readings[i], readings[i + 1] = readings[i + 1], readings[i]
        per_entity[e] = readings
    partition_of = {"a": 0, "b": 0, "c": 1, "d": 1}
    out, offsets = [], {0: 0, 1: 0}
    cursors = {e: 0 for e in per_entity}
    while any(cursors[e] < len(per_entity[e]) for e in per_entity):
        e = rng.choice([e for e in per_entity if cursors[e] < len(per_entity[e])])
        p = partition_of[e]
        out.append((p, offsets[p], e, per_entity[e][cursors[e]]))
        offsets[p] += 1
        cursors[e] += 1
    return out


# --- add_many: the worker's bulk path ---------------------------------------------------------------

def _state_of(s: WindowStore) -> dict:
    """Everything observable about a store's entities (held rows, seals, pending readings)."""
    out = {}
    for name, e in s._entities.items():
        out[name] = (e.n, e.run_end if e.n else None, e.max_slot, e.last_partition, e.mixed,
                     e.values[:e.n].tolist(), e.filled[:e.n].tolist(), e.from_reading[:e.n].tolist(),
                     e.part[:e.n].tolist(), e.off[:e.n].tolist(), sorted(e.pending.items()))
    return out


def _window_tuples(windows: list[ReadyWindow]) -> list[tuple]:
    return sorted((w.entity, w.end_ts, w.start_ts, w.partition, w.end_offset, w.filled, w.start_offset,
                   w.values.tolist()) for w in windows)


@pytest.mark.parametrize("seed", range(40))
def test_add_many_is_add_one_by_one(seed: int) -> None:
    """Bulk placement gives the same outcomes, windows, commit offsets and buffers as ``add`` per
    reading, on streams with runs, gaps, duplicates, disorder, missing sensors and mixed partitions."""
    rng = random.Random(seed)
    policy = WindowPolicy(window_size=rng.choice([1, 2, 4, 7]), period_s=rng.choice([1.0, 0.5]),
                          stride=rng.choice([1, 2, 3, 5]), grace_slots=rng.choice([0, 0, 0, 1, 2]),
                          max_fill_steps=rng.randint(0, 3))
    sensors = ["x", "y"]
    records = []  # (partition, offset, entity, ts, values)
    offsets = {0: 0, 1: 0, 2: 0}
    slots = {e: rng.randint(0, 3) for e in "abcdef"}
    for _ in range(rng.randint(50, 400)):
        e = rng.choice("abcdef") if rng.random() < 0.3 else rng.choice("ab")  # long runs for a and b
        r = rng.random()
        slots[e] += 1 if r < 0.85 else (0 if r < 0.9 else (-rng.randint(1, 3) if r < 0.95 else rng.randint(2, 6)))
        partition = {"a": 0, "b": 1}.get(e, 2) if rng.random() < 0.97 else rng.randint(0, 2)
        values = [float(rng.randint(0, 9)), None if rng.random() < 0.05 else float(rng.randint(0, 9))]
        if rng.random() < 0.03:
            values = [None, None]  # an empty reading: no reading (its entity not held for it alone)
        records.append((partition, offsets[partition], e, slots[e] * policy.period_s + rng.uniform(-0.2, 0.2)
                        * policy.period_s, values))
        offsets[partition] += 1

    one, many = WindowStore(policy, sensors, [5.0, 6.0]), WindowStore(policy, sensors, [5.0, 6.0])
    one_windows, many_windows, one_counts = [], [], Counter()
    many_counts: Counter = Counter()
    i = 0
    while i < len(records):
        batch = records[i:i + rng.randint(1, 120)]
        i += len(batch)
        for p, o, e, ts, v in batch:
            one_counts[one.add(e, Reading(e, ts, dict(zip(sensors, v))), p, o)] += 1
        many_counts.update(many.add_many(
            [e for _, _, e, _, _ in batch], np.array([ts for *_, ts, _ in batch]),
            np.array([[np.nan if x is None else x for x in v] for *_, v in batch]),
            np.array([p for p, *_ in batch]), np.array([o for _, o, *_ in batch])))
        last = {}
        for p, o, *_ in batch:
            last[p] = max(last.get(p, -1), o)
        if rng.random() < 0.7:
            one_windows += one.ready()
            many_windows += many.ready()
        assert one.commit_offsets(last) == many.commit_offsets(last)
        assert _state_of(one) == _state_of(many)
    one_windows += one.ready()
    many_windows += many.ready()
    assert _window_tuples(one_windows) == _window_tuples(many_windows)
    assert +one_counts == +many_counts
    assert one_windows, "the stream should produce windows"


def test_ready_batch_stacks_the_windows_ready_would_hand_out() -> None:
    s = store(w=3, stride=2)
    s.add_many(["e"] * 8 + ["f"] * 3, np.array([*range(8), *range(3)], dtype=float), np.arange(11.0)[:, None],
               np.zeros(11, dtype=np.int64), np.arange(11))
    batch = s.ready_batch()
    assert batch.entities == ["e", "e", "e", "f"] and batch.values.shape == (4, 3, 1)
    assert batch.end_ts.tolist() == [2.0, 4.0, 6.0, 2.0] and batch.start_ts.tolist() == [0.0, 2.0, 4.0, 0.0]
    assert batch.values[1, :, 0].tolist() == [2.0, 3.0, 4.0] and batch.end_offset.tolist() == [2, 4, 6, 10]
    assert len(s.ready_batch()) == 0


def test_a_window_knows_the_oldest_offset_a_replay_must_start_from_to_rebuild_it() -> None:
    # Readings at offsets 10.., one slot each: the window ending at slot 5 (W 4) holds slots 2..5, offsets 12..15.
    s = store(w=4)
    for slot in range(6):
        s.add("e", r(slot, 1.0), 0, 10 + slot)
    windows = s.ready()
    assert [(w.end_offset, w.start_offset) for w in windows] == [(13, 10), (14, 11), (15, 12)]
    # The same in bulk (add_many), and a gap slot filled from the reading before it keeps that reading's offset.
    bulk = store(w=4, max_fill_steps=2)
    bulk.add_many(["e"] * 5, np.array([0.0, 1.0, 3.0, 4.0, 5.0]), np.zeros((5, 1)), np.zeros(5, dtype=np.int64),
                  np.arange(20, 25))
    assert [(w.end_offset, w.start_offset) for w in bulk.ready()] == [(22, 20), (23, 21), (24, 21)]


# --- a slot's sensors sent in more than one reading ----------------------------------------------
def two(grace: int = 1, w: int = 2) -> WindowStore:
    return WindowStore(WindowPolicy(window_size=w, period_s=1.0, grace_slots=grace), ["a", "b"], [10.0, 20.0])


def ab(ts: float, a: float | None, b: float | None) -> Reading:
    return Reading("e", ts, {"a": a, "b": b})


def test_parts_of_one_slot_are_merged_while_it_is_unsealed_first_value_per_sensor_winning() -> None:
    s = two(grace=1)
    assert s.add("e", ab(0, 1.0, None), 0, 0) == "accepted"
    assert s.add("e", ab(0, None, 2.0), 0, 1) == "accepted"  # brings b: merged into slot 0, not dropped
    assert s.add("e", ab(0, 9.0, 9.0), 0, 2) == "duplicate"  # nothing new: the first of each sensor stays
    assert s.add("e", ab(1, 3.0, None), 0, 3) == "accepted"
    assert s.add("e", ab(1.1, 8.0, 4.0), 0, 4) == "accepted"  # b merged; a stays 3.0 (the grid's rule too)
    assert s.commit_offsets({0: 4}) == {0: 0}  # slot 0's reading, first of its parts, is still needed
    s.add("e", ab(2, 5.0, 6.0), 0, 5)
    s.add("e", ab(3, 5.0, 6.0), 0, 6)  # seals slot 1
    [window] = s.ready()
    np.testing.assert_array_equal(window.values, [[1.0, 2.0], [3.0, 4.0]])
    assert window.filled == 0  # every cell was read
    assert (window.end_offset, window.start_offset) == (3, 0)
    assert s.take_split() == []  # nothing was lost: no warning due


def test_parts_on_another_partition_are_not_merged() -> None:
    """A replay of the first part's partition would not bring the other part back: the window would differ."""
    s = two(grace=1)
    s.add("e", ab(0, 1.0, None), 0, 0)
    assert s.add("e", ab(0, None, 2.0), 1, 0) == "duplicate"


def test_a_part_for_a_sealed_slot_is_a_duplicate_and_names_its_entity_once_a_copy_is_not_named() -> None:
    s = two(grace=0)
    assert s.add("e", ab(0, 1.0, None), 0, 0) == "accepted"  # without grace a reading seals its own slot
    assert s.add("e", ab(0, 1.0, None), 0, 1) == "duplicate"  # a re-delivered copy: nothing new
    assert s.take_split() == []
    assert s.add("e", ab(0, None, 2.0), 0, 2) == "duplicate"  # b came too late to be merged
    assert s.add("e", ab(0, None, 2.0), 0, 3) == "duplicate"
    assert s.take_split() == ["e"]
    assert s.take_split() == []
    s.add("e", ab(1, 3.0, 4.0), 0, 4)
    [window] = s.ready()
    np.testing.assert_array_equal(window.values, [[1.0, 20.0], [3.0, 4.0]])  # b of slot 0 was never read


def test_bulk_placing_merges_parts_as_one_by_one_does() -> None:
    rows = [(0, 1.0, np.nan), (0, np.nan, 2.0), (1, 3.0, np.nan), (1, np.nan, 4.0), (2, 5.0, 6.0), (3, 7.0, 8.0),
            (4, 9.0, np.nan), (4, np.nan, 1.0), (5, 2.0, 3.0), (6, 4.0, 5.0)]
    one, bulk = two(grace=1), two(grace=1)
    for i, (ts, a, b) in enumerate(rows):
        one.add("e", ab(ts, None if a != a else a, None if b != b else b), 0, i)
    counts = bulk.add_many(["e"] * len(rows), np.array([t for t, _, _ in rows], dtype=float),
                           np.array([[a, b] for _, a, b in rows]), np.zeros(len(rows), dtype=np.int64),
                           np.arange(len(rows)))
    assert counts["accepted"] == len(rows)
    want, got = one.ready(), bulk.ready()
    assert len(want) == len(got) == 4
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x.values, y.values)
        assert x.filled == y.filled == 0


def test_one_windows_replay_offsets_in_plain_python_match_the_stacked_ones() -> None:
    # A window queued a reading at a time computes its replay offsets in plain Python (numpy's calls were
    # most of the cost with thousands of entities): the same answer as the stacked numpy form, whatever
    # the offsets' order (readings placed out of order within grace) and the partitions of the rows.
    from anomaly.window_state import _replay_offsets, _replay_offsets_one

    rng = random.Random(11)
    for _ in range(3000):
        w = rng.randint(1, 12)
        off = [rng.randint(0, 60) for _ in range(w)]
        part = [rng.choice((0, 0, 0, 1)) for _ in range(w)] if rng.random() < 0.5 else None
        mine = None if part is None else np.array([[p == 0 for p in part]])
        oldest, through = _replay_offsets(np.array([off]), mine)
        assert _replay_offsets_one(off, part, 0) == (int(oldest[0]), int(through[0])), (off, part)


def test_silent_sensors_are_those_past_max_fill_steps_on_their_typical_value() -> None:
    s = WindowStore(WindowPolicy(window_size=3, period_s=1.0, max_fill_steps=2), ["x", "y"], [FILL, 7.0])
    for slot in range(3):
        s.add("e", Reading("e", slot, {"x": 1.0, "y": 1.0}), 0, slot)
        s.add("f", Reading("f", slot, {"x": 1.0, "y": 1.0}), 0, 100 + slot)
    for slot in range(3, 6):  # y null in 3 slots in a row, past max_fill_steps (2): on its typical value
        s.add("e", Reading("e", slot, {"x": 1.0, "y": None}), 0, slot)
        s.add("f", Reading("f", slot, {"x": 1.0, "y": None if slot < 5 else 2.0}), 0, 100 + slot)  # two: carried
    s.add("e", Reading("e", 6, {"x": 1.0, "y": None}), 0, 6)  # seals slot 5
    s.add("f", Reading("f", 6, {"x": 1.0, "y": 2.0}), 0, 106)
    assert s.silent_sensors() == {"e": ("y",)}
    last = {w.entity: w for w in s.ready()}
    assert last["e"].values[-1].tolist() == [1.0, 7.0]  # its typical value stands in
    assert last["f"].values[-1].tolist() == [1.0, 2.0]
    s.add("e", Reading("e", 7, {"x": 1.0, "y": 3.0}), 0, 7)
    s.add("e", Reading("e", 8, {"x": 1.0, "y": 3.0}), 0, 8)  # seals slot 7: y reported again
    assert s.silent_sensors() == {}


def _fresh_commits(s: WindowStore, last: dict[int, int]) -> dict[int, int]:
    """The commit offsets of the module docstring, worked out afresh from every entity held (no cache)."""
    needed: dict[int, int] = {}

    def merge(other: dict[int, int]) -> None:
        for partition, offset in other.items():
            needed[partition] = min(needed.get(partition, offset), offset)

    for state in s._entities.values():
        merge(s._needs(state))
        if state.queued_needs is not None:
            merge(state.queued_needs)
    merge(s._orphan_needs)
    return {p: min(needed.get(p, o + 1), o + 1) for p, o in last.items()}


@pytest.mark.parametrize("seed", range(60))
def test_commit_offsets_are_those_of_a_fresh_walk_of_every_entity(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """commit_offsets keeps what each entity needs between batches (only the entities a batch touched are
    worked out again, in heaps or by a walk): on streams with runs, gaps, duplicates, disorder, empty and
    partial readings, mixed partitions, evictions, resets and revoked partitions, it gives what a walk of
    every entity, worked out afresh, gives."""
    rng = random.Random(seed)
    # heaps from the first call (seeds 0, 3, ...), walks only (1, 4, ...), or now one now the other
    ratio = rng.choice([1, 2, 4])
    monkeypatch.setattr(window_state, "_HEAP_MIN_ENTITIES", [0, 10**9, 0][seed % 3])
    monkeypatch.setattr(window_state, "_HEAP_MIN_RATIO", [0, 0, ratio][seed % 3])
    monkeypatch.setattr(window_state, "_HEAP_DROP_RATIO", [0, 0, rng.choice([ratio, ratio / 2])][seed % 3])
    monkeypatch.setattr(window_state, "_HEAP_AFTER", [1, 1, rng.choice([1, 2])][seed % 3])
    monkeypatch.setattr(window_state, "_HEAP_SLACK", rng.choice([0, 5, 1024]))  # dead entries: rebuilt often
    policy = WindowPolicy(window_size=rng.choice([1, 2, 4, 7]), period_s=1.0, stride=rng.choice([1, 2, 3]),
                          grace_slots=rng.choice([0, 0, 1, 2]), max_fill_steps=rng.randint(0, 3))
    sensors = ["x", "y"]
    s = WindowStore(policy, sensors, [5.0, 6.0])
    names = [f"e{i}" for i in range(rng.choice([3, 12, 40]))]
    slots = {e: rng.randint(0, 3) for e in names}
    offsets = {0: 0, 1: 0, 2: 0}
    checked = 0
    for _ in range(rng.randint(20, 60)):
        batch = []
        for _ in range(rng.randint(1, 60)):
            e = rng.choice(names[:3]) if rng.random() < 0.5 else rng.choice(names)
            u = rng.random()
            slots[e] += 1 if u < 0.8 else (0 if u < 0.85 else (-rng.randint(1, 3) if u < 0.92 else rng.randint(2, 6)))
            partition = names.index(e) % 3 if rng.random() < 0.95 else rng.randint(0, 2)
            v = rng.random()
            values = ([np.nan, np.nan] if v < 0.04 else
                      [float(rng.randint(0, 9)), np.nan if v < 0.15 else float(rng.randint(0, 9))])
            batch.append((partition, offsets[partition], e, float(slots[e]) + rng.uniform(-0.2, 0.2), values))
            offsets[partition] += 1
        if rng.random() < 0.5:
            s.add_many([e for _, _, e, _, _ in batch], np.array([ts for *_, ts, _ in batch]),
                       np.array([v for *_, v in batch]), np.array([p for p, *_ in batch]),
                       np.array([o for _, o, *_ in batch]))
        else:
            for p, o, e, ts, v in batch:
                s.add(e, Reading(e, ts, {k: x for k, x in zip(sensors, v) if x == x}), p, o)
        u = rng.random()
        if u < 0.1:
            s.evict_idle(rng.randint(1, 6))
        elif u < 0.15:
            s.evict_excess(rng.randint(0, len(names)))
        elif u < 0.2:
            s.reset(rng.choice(names))
        elif u < 0.23:
            s.forget_partitions([rng.randint(0, 2)])
        elif u < 0.25:
            s.reset()
        if rng.random() < 0.7:
            s.ready_batch()
        last = {p: o - 1 for p, o in offsets.items() if o > 0}
        assert s.commit_offsets(last) == _fresh_commits(s, last)
        checked += 1
    assert checked >= 20


def test_add_many_holds_no_state_for_an_entity_until_its_first_reading_with_a_sensor() -> None:
    """An empty reading (every sensor null) of an entity not held is no reading (``add`` keeps no state for
    it): its time must not pass for the entity, or a real reading at an earlier slot in the same batch would
    be dropped as late, and the commit would move past it."""
    one, many = store(w=2), store(w=2)
    assert [one.add("e", Reading("e", 5.0, {}), 0, 0), one.add("e", r(3.0, 1.0), 0, 1)] == ["empty", "accepted"]
    counts = many.add_many(["e", "e"], np.array([5.0, 3.0]), np.array([[np.nan], [1.0]]), np.array([0, 0]),
                           np.array([0, 1]))
    assert counts["empty"] == 1 and counts["accepted"] == 1 and counts["late"] == 0
    assert one.commit_offsets({0: 1}) == many.commit_offsets({0: 1}) == {0: 1}


def test_commit_heaps_are_not_built_again_and_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entities whose readings come on several partitions (a producer not keying by entity) need several
    entries each: the heaps are still built once, not at every call (a build costs about two walks); and
    calls that go back and forth about the walk's line do not build them each time either."""
    builds = []
    build = WindowStore._build_heaps
    monkeypatch.setattr(WindowStore, "_build_heaps", lambda self: builds.append(1) or build(self))
    s = WindowStore(WindowPolicy(window_size=4, period_s=1.0), ["x"], [0.0])
    n, offset = 3000, 0
    for slot in range(6):  # every entity's readings spread over 4 partitions
        names = [f"e{e}" for e in range(n)]
        s.add_many(names, np.full(n, float(slot)), np.ones((n, 1)), (np.arange(n) + slot) % 4,
                   np.arange(offset, offset + n))
        offset += n
    s.ready_batch()
    last = {p: offset for p in range(4)}
    s.commit_offsets(last)
    for k in range(30):  # 50 entities a batch, on their next slot
        names = [f"e{(50 * k + e) % n}" for e in range(50)]
        s.add_many(names, np.full(50, 6.0 + (50 * k) // n), np.ones((50, 1)), np.arange(50) % 4,
                   np.arange(offset, offset + 50))
        offset += 50
        s.ready_batch()
        assert s.commit_offsets(last) == _fresh_commits(s, last)
    assert len(builds) == 1 and s._heaps is not None
    for k in range(10):  # now 1,000 entities changed a batch (a walk would do), now 50 (heaps would)
        count = 1000 if k % 2 else 50
        names = [f"e{e}" for e in range(count)]
        s.add_many(names, np.full(count, 7.0 + k), np.ones((count, 1)), np.arange(count) % 4,
                   np.arange(offset, offset + count))
        offset += count
        s.ready_batch()
        assert s.commit_offsets(last) == _fresh_commits(s, last)
    assert len(builds) == 1
