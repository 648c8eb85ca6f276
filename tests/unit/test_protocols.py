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
    values = rng.normal(0, 1, (n, 1))
    expected = values + rng.normal(0, 0.1, (n, 1))
    expected[:15] = np.nan
    expected[1000:1010] += 3.0  # ten rows the model gets badly wrong
    scores = nab_calibrated(result(values, expected))
    assert scores.shape == (n,) and ((scores >= 0) & (scores <= 1)).all()
    high = np.flatnonzero(scores > 0.99)  # z > 99
    assert high.min() == 1000 and len(high) <= 3  # reported at once, and not again for the next rows
    assert (scores[1010:1000 + NAB_REPEAT_ROWS] < 0.99).all()
    cut = 1005
    assert np.array_equal(nab_calibrated(result(values[:cut], expected[:cut])), scores[:cut])
