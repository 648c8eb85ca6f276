"""The NAB calibration chain of ``anomaly.protocols`` on hand-made series (no training)."""

from __future__ import annotations

import numpy as np

from anomaly.protocols import NAB_REPEAT_ROWS, SeriesResult, last_step_errors, nab_calibrated


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
    scores = nab_calibrated(result(values, expected))
    assert scores.shape == (n,) and ((scores >= 0) & (scores <= 1)).all()
    high = np.flatnonzero(scores[100:] > 0.99) + 100  # z > 99 (the first rows still set the range)
    assert high.min() == 1000 and len(high) <= 3  # reported at once, and not again for the next rows
    assert (scores[1010:1000 + NAB_REPEAT_ROWS] < 0.99).all()
    cut = 1005
    assert np.array_equal(nab_calibrated(result(values[:cut], expected[:cut])), scores[:cut])


def test_nab_calibrated_scores_a_new_level_one_even_when_the_model_follows_it():
    rng = np.random.default_rng(3)
    n = 1500
    values = rng.uniform(-1, 1, (n, 1))
    values[1200:] += 5.0  # a level never seen before, and the model reconstructs it perfectly
    expected = values.copy()
    expected[:15] = np.nan
    scores = nab_calibrated(result(values, expected))
    assert scores[1200] == 1.0  # beyond the range seen so far
    assert (scores[1201:1200 + NAB_REPEAT_ROWS] < 1.0).all()  # once
    assert (scores[100:1200] < 1.0).all()
