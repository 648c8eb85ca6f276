"""``anomaly.novelty.window_novelty``: hand-computed cases, a brute-force reference, past only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaly.novelty import window_novelty


def brute_force(values: np.ndarray, points: int, step: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    span = (points - 1) * step + 1
    out = np.full(len(x), np.nan)
    for t in range(len(x)):
        if t - span + 1 < 0:
            continue
        window = x[t - span + 1:t + 1:step].ravel()
        earlier = [np.linalg.norm(window - x[s - span + 1:s + 1:step].ravel())
                   for s in range(span - 1, t - span + 1)]  # earlier windows end before this one begins
        if earlier:
            out[t] = min(earlier)
    return out


def test_one_point_windows_by_hand():
    # each row against every earlier row
    got = window_novelty(np.array([0.0, 1.0, 0.0, 3.0, 1.5]), points=1)
    assert np.isnan(got[0]) and got[1:].tolist() == [1.0, 0.0, 2.0, 0.5]


def test_two_point_windows_by_hand():
    # windows (x[t-1], x[t]); the earlier ones end before the current one begins
    got = window_novelty(np.array([0.0, 1.0, 0.0, 1.0, 5.0, 1.0]), points=2)
    assert np.isnan(got[:3]).all()  # (0,1) at row 1 and (1,0) at row 2 have no disjoint earlier window
    assert got[3] == 0.0  # (0,1) again: seen at row 1
    assert got[4] == pytest.approx(math.sqrt(17))  # (1,5): nearest (0,1) at row 1 (|(1,4)|), not (1,0) (5)
    assert got[5] == pytest.approx(math.sqrt(17))  # (5,1): (1,0) at row 2 gives |(4,1)|


def test_strided_windows_by_hand():
    # points 2, step 2: the window ending at t is (x[t-2], x[t]); span 3
    x = np.array([0.0, 9.0, 1.0, 9.0, 0.0, 9.0, 1.0, 7.0])
    got = window_novelty(x, points=2, step=2)
    # windows: (0,1) at row 2, (9,9) at 3, (1,0) at 4, (9,9) at 5, (0,1) at 6, (9,7) at 7
    assert np.isnan(got[:5]).all()
    assert got[5] == pytest.approx(math.sqrt(145))  # (9,9): only (0,1) at row 2 ends 3 rows back
    assert got[6] == 0.0  # (0,1) again
    assert got[7] == pytest.approx(2.0)  # (9,7): nearest (9,9) at row 3


@pytest.mark.parametrize("points,step", [(1, 1), (3, 1), (4, 3), (8, 2)])
def test_matches_brute_force_in_any_number_of_blocks(points, step):
    rng = np.random.default_rng(points * 10 + step)
    x = rng.normal(0, 1, (150, 2)).cumsum(axis=0)  # two sensors, drifting
    want = brute_force(x, points, step)
    for block in (1, 37, 1 << 20):  # one query a block, uneven blocks, one block
        np.testing.assert_allclose(window_novelty(x, points, step, block_elements=block), want,
                                   rtol=1e-9, atol=1e-9, equal_nan=True)


def test_past_only():
    x = np.random.default_rng(5).normal(0, 1, 400)
    full = window_novelty(x, 8, 2)
    for cut in (50, 201, 333):
        np.testing.assert_array_equal(window_novelty(x[:cut], 8, 2), full[:cut])


def test_a_recurring_shape_is_not_novel_a_new_one_is():
    t = np.arange(1200)
    x = np.sin(2 * np.pi * t / 100)
    x[900:950] = 0.0  # half a cycle flattened
    got = window_novelty(x, 16, 2)
    assert np.nanmax(got[300:900]) < 1e-6  # after one cycle every window has happened before
    assert got[925] > 1.0  # the flattened stretch has not
    assert np.nanmax(got[1150:]) < 1e-6  # a clean cycle again (its windows no longer reach the flat part)


def test_short_series_and_bad_arguments():
    assert np.isnan(window_novelty(np.zeros(5), 3)).all()  # no window has a disjoint earlier one
    assert window_novelty(np.zeros((0, 2)), 3).shape == (0,)
    with pytest.raises(ValueError, match="points >= 1"):
        window_novelty(np.zeros(10), 0)
    with pytest.raises(ValueError, match="step >= 1"):
        window_novelty(np.zeros(10), 2, step=0)
    with pytest.raises(ValueError, match="finite"):
        window_novelty(np.array([0.0, np.nan, 1.0]), 1)
