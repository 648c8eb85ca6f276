import numpy as np
import pytest

from anomaly.windowing import make_windows, n_windows, rows_from_windows, window_end_rows, windows_touching


def test_windows_cover_rows_in_order():
    values = np.arange(12, dtype=float).reshape(6, 2)  # rows 0..5, two sensors
    w = make_windows(values, window_size=3, stride=1)
    assert w.shape == (4, 3, 2)
    np.testing.assert_array_equal(w[0], values[0:3])
    np.testing.assert_array_equal(w[3], values[3:6])
    np.testing.assert_array_equal(window_end_rows(6, 3), [2, 3, 4, 5])


def test_stride_skips_windows_and_ends_match():
    values = np.arange(10, dtype=float)[:, None]
    w = make_windows(values, window_size=4, stride=3)
    assert n_windows(10, 4, 3) == 3 == len(w)
    np.testing.assert_array_equal(w[:, -1, 0], window_end_rows(10, 4, 3))  # value == row index


def test_too_short_gives_no_windows():
    assert make_windows(np.zeros((2, 3)), 5).shape == (0, 5, 3)
    assert len(window_end_rows(2, 5)) == 0


def test_windows_are_views_not_copies():
    values = np.zeros((100, 3))
    w = make_windows(values, 10)
    assert np.shares_memory(w, values)


def test_rows_from_windows_is_causal():
    # windows of 3 rows, stride 2 over 8 rows end at rows 2, 4, 6
    out = rows_from_windows(np.array([10.0, 20.0, 30.0]), n_rows=8, window_size=3, stride=2)
    np.testing.assert_array_equal(out[:2], [np.nan, np.nan])
    np.testing.assert_array_equal(out[2:], [10, 10, 20, 20, 30, 30])


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        make_windows(np.zeros(5), 2)
    with pytest.raises(ValueError):
        n_windows(5, 0)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_windows_touching_marks_exactly_the_windows_that_cover_a_marked_row(stride):
    rng = np.random.default_rng(stride)
    rows = rng.random(40) < 0.1
    got = windows_touching(rows, 5, stride)
    want = [rows[i * stride:i * stride + 5].any() for i in range(n_windows(40, 5, stride))]
    assert got.tolist() == want and len(got) == len(make_windows(np.zeros((40, 1)), 5, stride))
