"""The pure parts of retraining: bounded history, anomaly exclusion with a neighbourhood, the hold-out
split and the promotion rule. No broker, no MLflow."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaly.codec import Reading
from anomaly.retrain import (Decision, History, HoldoutMetrics, decide, exclusion_mask, holdout_metrics,
                             split_segments)


def reading(entity: str, ts: float, **values: float | None) -> Reading:
    return Reading(entity, ts, values or {"a": ts, "b": 1.0})


# --- History -------------------------------------------------------------------------------------

def test_history_keeps_the_latest_max_readings_per_entity():
    h = History(max_readings=3, lookback_s=1e9)
    for t in range(10):
        h.add(reading("e1", float(t)))
        h.add(reading("e2", float(t)))
    assert len(h) == 6
    frames = h.frames(["a", "b"])
    assert list(frames) == ["e1", "e2"]
    assert frames["e1"]["a"].tolist() == [7.0, 8.0, 9.0]
    assert h.seen == 20


def test_history_lookback_is_measured_on_the_readings_own_ts():
    h = History(max_readings=100, lookback_s=5)
    for t in (0, 1, 2, 10, 11, 12):
        h.add(reading("e", float(t)))
    late = reading("e", 6.0)  # out of order but within 5 s of the newest (12)? no: 12 - 5 = 7
    assert h.add(late) is False
    assert h.frames(["a"])["e"]["a"].tolist() == [10.0, 11.0, 12.0]
    # another entity's newer readings move the cut-off for everyone
    h.add(reading("f", 100.0))
    assert list(h.frames(["a"])) == ["f"]


def test_history_filters_entities_and_sensor_sets():
    h = History(max_readings=10, lookback_s=100, entities=["pump-1"], sensors=["a", "b"])
    assert h.add(reading("pump-1", 1.0))
    assert not h.add(reading("pump-2", 1.0))
    assert not h.add(Reading("pump-1", 2.0, {"a": 1.0}))  # lacks sensor b
    assert h.ignored == 2 and len(h) == 1


def test_history_frames_sort_dedupe_and_keep_missing_values():
    h = History(max_readings=10, lookback_s=100)
    h.add(Reading("e", 2.0, {"a": 2.0, "b": None}))
    h.add(Reading("e", 1.0, {"a": 1.0, "b": 1.0}))
    h.add(Reading("e", 2.0, {"a": 2.5, "b": 2.5}))  # duplicate ts: the last one wins
    frame = h.frames(["a", "b"])["e"]
    assert frame["a"].tolist() == [1.0, 2.5]
    assert str(frame.index.tz) == "UTC"
    h2 = History(max_readings=10, lookback_s=100)
    h2.add(Reading("e", 1.0, {"a": 1.0, "b": None}))
    assert math.isnan(h2.frames(["a", "b"])["e"]["b"].iloc[0])


def test_history_refuses_bad_bounds():
    with pytest.raises(ValueError):
        History(max_readings=0, lookback_s=1)
    with pytest.raises(ValueError):
        History(max_readings=1, lookback_s=0)


# --- exclusion -----------------------------------------------------------------------------------

def test_exclusion_mask_drops_the_window_and_its_neighbourhood():
    # window size 4, flagged window ends at row 10 -> rows 7..10, margin 2 -> rows 5..12
    mask = exclusion_mask(20, [10], window_size=4, margin_rows=2)
    assert np.flatnonzero(mask).tolist() == list(range(5, 13))


def test_exclusion_mask_clips_and_merges_overlaps():
    mask = exclusion_mask(10, [1, 2, 9], window_size=3, margin_rows=1)
    # [0..3] from ends 1,2 (clipped at 0) and [6..9] from end 9 (clipped at 9)
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert not exclusion_mask(5, [], window_size=3, margin_rows=2).any()
    assert exclusion_mask(0, [], 3, 1).shape == (0,)


def test_split_segments_holds_out_the_most_recent_clean_rows():
    keep = np.ones(100, bool)
    train, hold = split_segments(keep, 0.2, min_len=5)
    assert train == [(0, 80)] and hold == [(80, 100)]


def test_split_segments_counts_only_kept_rows_and_drops_short_pieces():
    keep = np.ones(100, bool)
    keep[90:] = False  # an anomaly at the end: the hold-out moves before it
    keep[40:43] = False
    train, hold = split_segments(keep, 0.25, min_len=5)
    hold_rows = sum(b - a for a, b in hold)
    assert hold == [(68, 90)]  # ceil(87 * 0.25) = 22 most recent kept rows
    assert train == [(0, 40), (43, 68)]
    assert hold_rows == 22
    # a piece shorter than one window is left out of both
    keep2 = np.zeros(20, bool)
    keep2[:3] = True
    keep2[5:20] = True
    assert split_segments(keep2, 0.2, min_len=4) == ([(5, 16)], [(16, 20)])
    assert split_segments(np.zeros(5, bool), 0.2, 2) == ([], [])


# --- the promotion rule --------------------------------------------------------------------------

def metrics(err: float, far: float) -> HoldoutMetrics:
    return HoldoutMetrics(err, far, err * 2, 100)


@pytest.mark.parametrize("champ, chall, promote, why", [
    (metrics(1.0, 0.01), metrics(0.90, 0.01), True, "better"),
    (metrics(1.0, 0.01), metrics(0.96, 0.00), False, "not better enough"),  # 4% < 5%
    (metrics(1.0, 0.01), metrics(0.95, 0.01), True, "better"),  # exactly the margin
    (metrics(1.0, 0.01), metrics(0.50, 0.05), False, "more false alarms"),
    (metrics(1.0, 0.01), metrics(0.50, 0.011), True, "better"),  # within the tolerance
    (metrics(1.0, 0.01), metrics(1.20, 0.0), False, "not better enough"),
    (metrics(1.0, 0.01), metrics(math.inf, 0.0), False, "not finite"),
])
def test_decide(champ, chall, promote, why):
    d = decide(champ, chall, min_improvement=0.05, max_false_alarm_increase=0.001)
    assert isinstance(d, Decision)
    assert d.promote is promote
    assert why in d.reason


def test_decide_reports_the_relative_improvement():
    d = decide(metrics(2.0, 0.0), metrics(1.0, 0.0), 0.1, 0.0)
    assert d.relative_improvement == pytest.approx(0.5)


def test_holdout_metrics_at_the_models_own_threshold():
    m = holdout_metrics(np.array([0.1, 0.2, 0.3, 5.0]), threshold=1.0)
    assert m.mean_error == pytest.approx(1.4)
    assert m.false_alarm_rate == pytest.approx(0.25)
    assert m.windows == 4
    nan = holdout_metrics(np.array([0.1, np.nan]), threshold=1.0)  # a NaN score counts as an alarm
    assert nan.false_alarm_rate == pytest.approx(0.5) and nan.mean_error == pytest.approx(0.1)
    assert holdout_metrics(np.array([np.nan]), 1.0).mean_error == math.inf
