"""The NAB calibration chain of ``anomaly.protocols`` on hand-made series (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.protocols import (NAB_OWN_LEVEL, NAB_REPEAT_ROWS, SeriesResult, last_step_errors, nab_calibrate,
                               nab_calibrated, nab_novelty, nab_transitions)


def result(values: np.ndarray, expected: np.ndarray) -> SeriesResult:
    n = len(values)
    return SeriesResult(name="s", timestamps=np.arange(n), values=values, labels=np.zeros(n, bool),
                        scores=np.zeros(n), flags=np.zeros(n, bool), expected=expected, threshold=0.0,
                        sensors=tuple(f"x{i}" for i in range(values.shape[1])), train_seconds=0.0)


def test_last_step_errors_by_hand():
    values = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 0.0]])
    expected = np.array([[np.nan, np.nan], [1.0, 1.0], [1.0, 2.0]])  # no window ends on the first row
    assert last_step_errors(result(values, expected)).tolist() == [0.0, 0.5, 4.0]


def test_nab_calibrated_flags_a_jump_once_and_uses_only_the_past():
    rng = np.random.default_rng(0)
    n = 1500
    values = rng.uniform(-1, 1, (n, 1))  # bounded: no new extremes after the first rows (range rule quiet)
    expected = values + rng.normal(0, 0.1, (n, 1))
    expected[:15] = np.nan
    expected[1000:1010] += 3.0  # ten rows the model gets badly wrong
    scores = nab_calibrated(result(values, expected), 150)
    assert scores.shape == (n,) and ((scores >= 0) & (scores <= 1)).all()
    high = np.flatnonzero(scores[100:] > NAB_OWN_LEVEL) + 100  # the first rows still set the range
    assert high.tolist() == [1000]  # reported at once, and once: the noise never beats its own record by 20 %
    assert scores[1000] > 0.98  # the error is dozens of times the largest of the 3,000 rows before it
    cut = 1005
    assert np.array_equal(nab_calibrated(result(values[:cut], expected[:cut]), 150), scores[:cut])


def test_nab_calibrated_scores_a_new_level_one_even_when_the_model_follows_it():
    rng = np.random.default_rng(3)
    n = 1500
    values = rng.uniform(-1, 1, (n, 1))
    values[1200:] += 5.0  # a level never seen before, and the model reconstructs it perfectly
    expected = values.copy()
    expected[:15] = np.nan
    scores = nab_calibrated(result(values, expected), 150)
    assert scores[1200] == 1.0  # beyond the range seen so far
    assert (scores[1201:1200 + NAB_REPEAT_ROWS] < 1.0).all()  # once
    assert (scores[100:1200] < 1.0).all()


def test_nab_calibrated_reports_a_new_low_soon_after_a_new_high():
    rng = np.random.default_rng(5)
    n = 1500
    values = rng.uniform(-1, 1, (n, 1))
    values[1200] = 5.0  # a new high ...
    values[1230] = -5.0  # ... and, within the each-alarm-once span, a new low: a different event
    values[1240] = 6.0  # a higher high within the span of the first: the same event
    expected = values.copy()
    expected[:15] = np.nan
    scores = nab_calibrated(result(values, expected), 150)
    assert scores[1200] == 1.0 and scores[1230] == 1.0
    assert scores[1240] < 1.0
    assert np.flatnonzero(scores[100:] == 1.0).tolist() == [1100, 1130]


def test_nab_calibrated_scores_a_shape_never_seen_before_even_when_the_model_follows_it():
    n, period = 3000, 100
    t = np.arange(n)
    # Noise that recurs with the cycle: every step recurs too, so neither the steps' transitions nor the
    # windows are new until the skipped cycle (with fresh noise, a jump 1 % above every training jump
    # is a step never taken before, which the transition surprise rightly reports).
    noise = np.tile(np.random.default_rng(4).normal(0, 0.02, period), n // period)
    values = (np.where(t % period < 50, 1.0, 0.0) + noise)[:, None]
    values[2000:2050] = 0.0  # one cycle skips its high half: no new level, only a new shape
    expected = values.copy()  # a model that reconstructs everything perfectly: errors are all 0
    expected[:15] = np.nan
    scores = nab_calibrated(result(values, expected), 450)
    novelty = nab_novelty(values, 450)
    assert np.isnan(novelty[:2 * 190 - 1]).all() and np.isfinite(novelty[2 * 190 - 1:]).all()
    high = np.flatnonzero(scores[100:] > NAB_OWN_LEVEL) + 100  # the first rows still set the range
    assert len(high) == 1 and 2000 <= high[0] < 2060  # found in the skipped cycle, once
    assert scores[100:2000].max() < NAB_OWN_LEVEL


def test_nab_calibrated_scores_a_step_never_taken_in_its_context_even_when_the_model_follows_it():
    n, period = 2000, 100
    t = np.arange(n)
    noise = np.tile(np.random.default_rng(6).normal(0, 0.02, period), n // period)  # every step recurs ...
    values = np.sin(2 * np.pi * t / period) + noise
    values[1500] += 0.3  # ... until one reading jumps, well inside the range seen so far
    values = values[:, None]
    expected = values.copy()  # a model that follows it perfectly: errors are all 0
    expected[:15] = np.nan
    scores = nab_calibrated(result(values, expected), 300)
    high = np.flatnonzero(scores[300:] > NAB_OWN_LEVEL) + 300
    assert high.tolist() == [1500]
    # The transition surprise finds it on its own (no errors, no novelty), at once and once.
    alone = nab_calibrate(np.zeros(n), values, transitions=nab_transitions(values, 300))
    assert (np.flatnonzero(alone[300:] > NAB_OWN_LEVEL) + 300).tolist() == [1500]
    assert alone[1500] > 0.6  # far above the most surprising step of the 3,000 rows before it


def _series(rng: np.random.Generator, n: int = 300) -> "LabelledSeries":
    import pandas as pd

    from anomaly.datasets import LabelledSeries

    frame = pd.DataFrame(rng.normal(0, 1, (n, 3)), columns=["a", "b", "drift"],
                         index=pd.date_range("2024-01-01", periods=n, freq="1s", tz="UTC", name="ts"))
    frame["drift"] = np.linspace(0, 50, n)  # a sensor that only ever climbs
    return LabelledSeries("s", frame, np.zeros(n, bool), train_rows=200)


def _tiny(**data):
    from anomaly.config import build_settings

    return build_settings({"data": data, "model": {"window_size": 5, "hidden_size": 4, "latent_size": 2},
                           "training": {"epochs": 2, "batch_size": 16, "patience": 2, "cpu_threads": 1}})


def test_score_series_trains_and_scores_only_the_named_sensors_in_their_order():
    from anomaly.protocols import score_series

    series = _series(np.random.default_rng(0))
    every = score_series(series, _tiny())
    named = score_series(series, _tiny(sensors=["b", "a"]))
    assert every.sensors == ("a", "b", "drift") and every.values.shape[1] == 3
    assert named.sensors == ("b", "a") and named.values.shape == (100, 2)
    assert np.array_equal(named.values, series.frame[["b", "a"]].to_numpy()[200:])
    assert named.expected.shape == (100, 2)


def test_score_series_names_the_field_when_a_named_sensor_is_missing():
    import pytest

    from anomaly.errors import DataError
    from anomaly.protocols import score_series

    with pytest.raises(DataError, match=r"sensors not in s \(data.sensors\): \['nosuch'\]"):
        score_series(_series(np.random.default_rng(1)), _tiny(sensors=["a", "nosuch"]))


def test_score_series_names_the_series_it_cannot_train_on():
    # In a 34- or 58-file run, "need at least 4 windows ... got 0" did not say which file.
    import dataclasses

    import pytest

    from anomaly.errors import DataError
    from anomaly.protocols import score_series

    short = dataclasses.replace(_series(np.random.default_rng(2)), name="valve1/3", train_rows=5)
    with pytest.raises(DataError, match=r"valve1/3: cannot train on its 5 training rows: need at least"):
        score_series(short, _tiny())
    empty = dataclasses.replace(short, train_rows=0)
    with pytest.raises(DataError, match=r"valve1/3: cannot train on its 0 training rows"):
        score_series(empty, _tiny())  # a ValueError from the scaler before, with a traceback


def test_the_skab_profile_leaves_out_the_thermal_sensors():
    from anomaly.datasets import SKAB_SENSORS
    from anomaly.protocols import PROFILES, SKAB_THERMAL, profile_settings

    sensors = profile_settings("skab").data.sensors
    assert sensors == PROFILES["skab"]["data"]["sensors"] == [s for s in SKAB_SENSORS if s not in SKAB_THERMAL]
    assert set(SKAB_THERMAL) <= set(SKAB_SENSORS) and not set(SKAB_THERMAL) & set(sensors)
    assert profile_settings("skab").threshold.adaptive_rows == 0  # a fixed threshold: no warm-up, no moving bar


def test_markdown_report_names_the_sensors_read():
    from anomaly.protocols import ProtocolResult, markdown_report, score_series

    series = _series(np.random.default_rng(2))
    settings = _tiny(sensors=["b", "a"])
    result = ProtocolResult("skab", {"f1": 0.5}, [score_series(series, settings)], 1.0)
    report = markdown_report(result, settings)
    import re

    row = next(line for line in report.splitlines() if line.startswith("| s |"))
    assert re.fullmatch(r"\| s \| 100 \| 0 \| \d+ \| [^|]+ \| 2 \| [\d.]+ \|", row), row  # two sensors of three
    assert "sensors=['b', 'a']" in report


def test_best_f1_never_flags_an_unscored_row():
    """NaN became -inf, still a cut: flagging the unscored row too gave 1.0 where 0.667 is the best."""
    from anomaly.protocols import best_f1

    f1, _ = best_f1(np.array([True, True]), np.array([np.nan, 0.5]))
    assert f1 == pytest.approx(2 / 3)
    assert best_f1(np.array([True, False]), np.array([np.nan, np.nan]))[0] == 0.0


def _faulted(rng: np.random.Generator, n: int = 400) -> "LabelledSeries":
    """Three smooth sensors; in the test rows 300..319 sensor ``b`` jumps, labelled as the one to blame."""
    import pandas as pd

    from anomaly.datasets import LabelledSeries

    t = np.arange(n)
    frame = pd.DataFrame({"a": np.sin(t / 7), "b": np.cos(t / 5), "c": np.sin(t / 11)}, index=pd.date_range(
        "2024-01-01", periods=n, freq="1s", tz="UTC", name="ts")) + rng.normal(0, 0.02, (n, 3))
    frame.iloc[300:320, 1] += 4.0
    labels = np.zeros(n, bool)
    labels[300:320] = True
    return LabelledSeries("s", frame, labels, train_rows=250, meta={"interpretation": [(300, 320, [1])]})


def test_attribution_names_the_sensor_labelled_responsible():
    from anomaly.protocols import attribution, score_series

    series = _faulted(np.random.default_rng(4))
    every = score_series(series, _tiny())
    assert every.sensor_errors.shape == (150, 3)
    got = attribution([series], [every])
    assert got["attribution_rows"] == 20 and got["attribution_flagged_rows"] > 10
    assert got["hit_rate_100"] > 0.9 and got["hit_rate_100_flagged"] > 0.9 and got["ndcg_100"] > 0.9
    assert every.blamed.shape == (150, 3) and every.blamed.sum() == 20 and every.blamed[50:70, 1].all()  # for the map
    # a model that does not read the labelled sensor can never name it (the rows still count)
    blind = score_series(series, _tiny(sensors=["c", "a"]))
    got = attribution([series], [blind])
    assert got["attribution_rows"] == 20 and got["hit_rate_150"] == 0.0
    # no series with labelled sensors: nothing to report
    assert attribution([_series(np.random.default_rng(0))], [every]) == {}
