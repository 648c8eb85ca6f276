"""The soak benchmark's pure parts: the fleet it plays (churn, faults) and the figures it draws from samples."""

from __future__ import annotations

import math

import pytest

from pipelines.bench_soak import Fleet, growth, parse_args, report, slope_per_hour, timeline


def test_fleet_replaces_the_longest_serving_ids_every_stream_hour() -> None:
    fleet = Fleet(10, hour_ticks=4, churn=0.2, faults=0.0)
    first = [e for e, _ in fleet.at(0)]
    assert first == [f"pump-{i:06d}" for i in range(10)]
    for k in range(1, 4):
        assert [e for e, _ in fleet.at(k)] == first  # no change within the hour
    second = [e for e, _ in fleet.at(4)]
    assert second == first[2:] + ["pump-000010", "pump-000011"]
    for k in range(5, 8):
        fleet.at(k)
    assert [e for e, _ in fleet.at(8)] == first[4:] + [f"pump-{i:06d}" for i in range(10, 14)]
    assert fleet.replaced == 4 and len(set(e for e, _ in fleet.at(9))) == 10


def test_fleet_faults_last_their_ticks_and_are_planned_each_hour() -> None:
    fleet = Fleet(50, hour_ticks=20, churn=0.0, faults=0.1, fault_ticks=3, seed=7)
    faulty_ticks: dict[str, list[int]] = {}
    for k in range(60):  # three stream hours
        for entity, faulty in fleet.at(k):
            if faulty:
                faulty_ticks.setdefault(entity, []).append(k)
    assert fleet.faulted == 15  # 5 a hour (10 % of 50), none lost to churn
    for ticks in faulty_ticks.values():  # each fault: 3 ticks in a row (an id may have had two), or cut by the end
        starts = [t for i, t in enumerate(ticks) if i == 0 or ticks[i - 1] != t - 1]
        for start in starts:
            assert [t for t in ticks if start <= t < start + 3] == list(range(start, min(start + 3, 60)))
        assert len(ticks) == sum(min(3, 60 - start) for start in starts)
    assert _play(Fleet(50, 20, 0.0, 0.1, 3, seed=7), 60) == _play(Fleet(50, 20, 0.0, 0.1, 3, seed=7), 60)
    assert _play(Fleet(50, 20, 0.0, 0.1, 3, seed=7), 60) != _play(Fleet(50, 20, 0.0, 0.1, 3, seed=8), 60)


def _play(fleet: Fleet, ticks: int) -> list[list[tuple[str, bool]]]:
    return [fleet.at(k) for k in range(ticks)]


def test_a_retired_id_takes_its_fault_with_it() -> None:
    fleet = Fleet(4, hour_ticks=2, churn=1.0, faults=1.0, fault_ticks=10, seed=1)
    assert any(faulty for _, faulty in fleet.at(0) + fleet.at(1))  # faults start in the first hour
    sent = fleet.at(2)  # every id replaced by a new one
    assert [e for e, _ in sent] == [f"pump-{i:06d}" for i in range(4, 8)]
    assert set(fleet.in_fault) <= {e for e, _ in sent}  # the old ids' faults went with them


def test_fleet_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Fleet(0, 10)
    with pytest.raises(ValueError):
        Fleet(10, 10, churn=1.5)


def test_slope_and_growth() -> None:
    t = [0.0, 1800.0, 3600.0]
    assert slope_per_hour(t, [100.0, 101.0, 102.0]) == pytest.approx(2.0)
    assert math.isnan(slope_per_hour([5.0], [1.0]))
    # 48 stream hours a wall hour: 1,000 readings of a 100-entity fleet at a 60 s period are 10 stream minutes
    samples = [{"t": 0.0, "consumed": 0, "batches": 0, "rss_kb": 50 * 1024},
               {"t": 1800.0, "consumed": 144_000, "batches": 500, "rss_kb": 100 * 1024},
               {"t": 3600.0, "consumed": 288_000, "batches": 1000, "rss_kb": 101 * 1024},
               {"t": 5400.0, "consumed": 432_000, "batches": 1500, "rss_kb": 103 * 1024, "scoring_rss_kb": None}]
    g = growth(samples, "rss_kb", 1800.0, stream_s_per_reading=60.0 / 100)
    assert g["first_mb"] == 100.0 and g["last_mb"] == 103.0 and g["peak_mb"] == 103.0 and g["samples"] == 3
    assert g["change_mb"] == 3.0 and g["mb_per_hour"] == pytest.approx(3.0)
    assert g["mb_per_stream_day"] == pytest.approx(1.5)  # 3 MB a wall hour, in which 48 stream hours pass
    assert g["mb_per_1000_batches"] == pytest.approx(3.0)
    assert growth(samples, "scoring_rss_kb", 0.0, 1.0)["samples"] == 0


def test_timeline_spreads_its_rows_and_keeps_the_last() -> None:
    samples = [{"t": float(i)} for i in range(100)]
    rows = timeline(samples, rows=12)
    assert len(rows) == 12 and rows[0]["t"] == 0.0 and rows[-1]["t"] == 99.0
    assert timeline(samples[:5], rows=12) == samples[:5]


def test_report_names_the_figures() -> None:
    sample = {"t": 60.0, "consumed": 6000, "entities": 110, "rss_kb": 371 * 1024, "scoring_rss_kb": 261 * 1024}
    g = {"first_mb": 371.0, "last_mb": 372.0, "peak_mb": 372.0, "mb_per_hour": 1.0, "mb_per_stream_day": 0.04,
         "mb_per_1000_batches": 0.5, "change_mb": 1.0, "samples": 10}
    text = report({"fleet": 100, "stream_period_s": 60.0, "achieved_rate": 1000.0, "speedup": 600.0, "wall_s": 60.0,
                   "stream_hours": 10.0, "sent": 60000, "windows_scored": 14000, "events": 50, "dead_letters": 0,
                   "ids_retired": 90, "evicted": 80, "faults": 20, "timeline": [sample], "steady_from_s": 30.0, "worker_rss": g,
                   "scoring_rss": {**g, "samples": 0}, "entities_min_steady": 110, "entities_max_steady": 120})
    assert "+1.00 MB per hour" in text and "600x the clock" in text and "110 to 120" in text
    assert "evicted 80" in text and "+0.500 MB per 1,000 batches" in text
    assert "     1.0      1.0 " in text  # 60 s of wall time; 6,000 readings of 100 entities a minute apart: 1 h
    assert "scoring child" not in text  # no samples of it: no line


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--churn", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--duration", "0"])
    assert parse_args(["--quick"]).quick

