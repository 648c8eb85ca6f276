import numpy as np
import pytest

from anomaly.calibration import (anomaly_likelihood, beyond_seen_range, beyond_seen_range_sides, record_ratio, score_z, suppress_repeats,
                                 z_to_unit)


def test_sudden_change_stands_out_slow_drift_does_not():
    rng = np.random.default_rng(0)
    n = 2000
    drift = np.linspace(1.0, 3.0, n) + rng.normal(0, 0.05, n)  # slow rise
    jump = drift.copy()
    jump[1500:1510] += 2.0  # sudden burst
    ld, lj = anomaly_likelihood(drift, long=300), anomaly_likelihood(jump, long=300)
    assert lj[1500:1510].max() > 0.9
    assert ld[400:].max() < 0.9  # the drift alone never looks like the burst


def test_uses_only_the_past():
    rng = np.random.default_rng(1)
    s = rng.normal(1, 0.1, 600)
    base = score_z(s)
    changed = s.copy()
    changed[400:] += 5  # the future changes
    np.testing.assert_array_equal(score_z(changed)[:400], base[:400])


def test_hand_computed_z():
    # history (before the last `short`=1 score) is [1, 2, 3]: mean 2, std 1; recent mean 5 -> z 3
    z = score_z(np.array([1.0, 2.0, 3.0, 5.0]), short=1, long=10, min_history=3)
    assert np.isnan(z[:3]).all()
    assert z[3] == pytest.approx(3.0)


def test_unit_map_is_monotonic_and_bounded():
    z = np.array([np.nan, -100, -1, 0, 1, 100, 1e6])
    u = z_to_unit(z)
    assert u[0] == 0.0
    assert np.all(np.diff(u[1:]) > 0)
    assert u.min() >= 0 and u.max() < 1
    assert u[3] == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError):
        score_z(np.ones(5), short=0)


def test_suppress_repeats_by_hand():
    s = np.array([0.1, 0.9, 0.95, 0.9, 0.2, 0.1, 0.1, 0.1, 0.8, 0.99])
    # rows=3: kept where higher than each of the 3 rows before (the first row has no past: kept)
    assert suppress_repeats(s, 3).tolist() == [0.1, 0.9, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.99]
    assert suppress_repeats(s, 1).tolist() == [0.1, 0.9, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.99]
    assert suppress_repeats(s, 20).tolist() == [0.1, 0.9, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.99]


def test_suppress_repeats_uses_only_the_past():
    rng = np.random.default_rng(5)
    s = rng.random(300)
    full = suppress_repeats(s, 25)
    for cut in (1, 40, 299):
        assert np.array_equal(suppress_repeats(s[:cut], 25), full[:cut])
    with pytest.raises(ValueError):
        suppress_repeats(s, 0)


def test_beyond_seen_range_by_hand():
    x = np.array([1.0, 3.0, 2.0, 3.05, 3.2, -1.0, np.nan, 5.0])
    # row 3: 3.05 is above the max 3 but within 5 % of the width 2; row 4: above 3.05 + 0.05 * 2.05
    assert beyond_seen_range(x, 0.05).tolist() == [False, False, False, False, True, True, False, True]
    assert beyond_seen_range(x, 0.0).tolist() == [False, False, False, True, True, True, False, True]
    two = np.column_stack([[0.0, 1.0, 0.5, 0.5], [0.0, 1.0, 0.5, 9.0]])
    assert beyond_seen_range(two, 0.05).tolist() == [False, False, False, True]  # any sensor


def test_beyond_seen_range_sides_by_hand():
    x = np.array([1.0, 3.0, 2.0, 3.05, 3.2, -1.0, np.nan, 5.0])
    above, below = beyond_seen_range_sides(x, 0.05)
    assert above.tolist() == [False, False, False, False, True, False, False, True]
    assert below.tolist() == [False, False, False, False, False, True, False, False]
    two = np.column_stack([[0.0, 1.0, 0.5, 0.5], [0.0, 1.0, 0.5, -9.0]])
    assert [a.tolist() for a in beyond_seen_range_sides(two, 0.05)] == [[False] * 4, [False, False, False, True]]
    with pytest.raises(ValueError):
        beyond_seen_range_sides(x, -0.1)


def test_beyond_seen_range_uses_only_the_past():
    x = np.random.default_rng(2).normal(0, 1, (300, 2))
    full = beyond_seen_range(x, 0.05)
    for cut in (1, 2, 50, 299):
        assert np.array_equal(beyond_seen_range(x[:cut], 0.05), full[:cut])
    with pytest.raises(ValueError):
        beyond_seen_range(x, -0.1)


def test_record_ratio_by_hand():
    # rows 2, min_history 1: each score over the larger of the two before it, r / (1 + r)
    got = record_ratio(np.array([np.nan, 1.0, 2.0, 1.0, 4.0, 0.0]), rows=2, min_history=1)
    np.testing.assert_allclose(got, [0.0, 0.0, 2 / 3, 1 / 3, 2 / 3, 0.0])  # no history for the first two
    # a positive score after nothing but zeros is a record; a zero after zeros is not
    assert record_ratio(np.array([0.0, 0.0, 0.0, 3.0, 1.0]), rows=3, min_history=2).tolist() == [0, 0, 0, 1, 0.25]


def test_record_ratio_needs_history_ignores_nan_and_is_scale_free():
    s = np.random.default_rng(2).gamma(0.5, 1.0, 500)
    s[100:140] = np.nan
    got = record_ratio(s, rows=50, min_history=10)
    assert (got[:10] == 0).all() and (got[100:140] == 0).all() and (got[10:100] > 0).all()
    np.testing.assert_allclose(record_ratio(1e6 * s, rows=50, min_history=10), got)  # units do not matter
    # past only
    np.testing.assert_array_equal(record_ratio(s[:300], rows=50, min_history=10), got[:300])
    with pytest.raises(ValueError):
        record_ratio(s, rows=0)


def test_edges_short_windows_an_infinite_score_and_no_rows():
    from anomaly.calibration import beyond_seen_range, record_ratio, score_z

    scores = np.array([0.0, 2.0, 1.0, np.inf, 1.0, 5.0, 0.2])
    out = record_ratio(scores, rows=3, min_history=50)  # a window shorter than the history asked for
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
    assert out[3] == 1.0  # an infinite score is a record, not NaN (NaN is never an alarm)
    assert len(score_z(np.arange(30.0), short=1, long=20)) == 30
    for side in (beyond_seen_range(np.empty((0, 2)), 0.05), beyond_seen_range(np.array([]), 0.05)):
        assert side.shape == (0,) and side.dtype == bool


def test_a_huge_score_leaves_no_trace_once_it_has_left_the_history():
    # pandas' rolling sums add and take away: ten scores of 2.5e33 left their rounding behind, and normal
    # scores a thousand rows later had |z| ~ 4-6 (likelihood > 0.8 on every one of 1400 normal rows)
    import pandas as pd

    from anomaly.calibration import anomaly_likelihood, score_z

    rng = np.random.default_rng(0)
    s = 1.0 + 0.1 * rng.standard_normal(3000)
    clean = score_z(s, 5, 500, 50)
    past = pd.Series(s).shift(5)  # the clean series: the same as the rolling statistics give
    want = ((pd.Series(s).rolling(5, min_periods=1).mean() - past.rolling(500, min_periods=50).mean())
            / past.rolling(500, min_periods=50).std()).to_numpy()
    np.testing.assert_allclose(clean, want, rtol=1e-9, equal_nan=True)
    s[1000:1010] = 2.5e33
    later = slice(1600, 3000)  # the spike left the 500 rows of history at row 1515
    np.testing.assert_allclose(score_z(s, 5, 500, 50)[later], clean[later], rtol=1e-9)
    assert (anomaly_likelihood(s)[later] > 0.8).sum() <= 2


def test_score_z_of_a_series_shorter_than_its_windows():
    from anomaly.calibration import score_z

    assert np.isnan(score_z(np.array([1.0, 2.0, 3.0]), short=5, long=10, min_history=2)).all()
    assert score_z(np.array([]), 5, 10, 2).shape == (0,)
