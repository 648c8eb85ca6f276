"""Sliding windows over a regular multivariate series. No I/O.

A window is ``window_size`` consecutive rows of a (T, F) array. Windows are views (no copy) so that
windowing a long series costs nothing until the windows are stacked into a batch.
"""

from __future__ import annotations

import numpy as np


def n_windows(n_rows: int, window_size: int, stride: int = 1) -> int:
    """How many full windows of ``window_size`` rows, ``stride`` rows apart, fit in ``n_rows``."""
    if window_size < 1 or stride < 1:
        raise ValueError(f"window_size and stride must be >= 1, got {window_size}, {stride}")
    if n_rows < window_size:
        return 0
    return (n_rows - window_size) // stride + 1


def make_windows(values: np.ndarray, window_size: int, stride: int = 1) -> np.ndarray:
    """Windows of a (T, F) array as a read-only (N, W, F) view, the first starting at row 0.

    Window ``i`` covers rows ``i*stride .. i*stride + window_size - 1``; ``window_end_rows`` gives the
    last row of each, which is the row a window's score is attached to (scores are causal).
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (rows, sensors), got shape {values.shape}")
    count = n_windows(values.shape[0], window_size, stride)
    if count == 0:
        return np.empty((0, window_size, values.shape[1]), dtype=values.dtype)
    # sliding_window_view gives (T-W+1, F, W); move the window axis before the sensor axis.
    view = np.lib.stride_tricks.sliding_window_view(values, window_size, axis=0)
    return view[::stride].transpose(0, 2, 1)[:count]


def window_end_rows(n_rows: int, window_size: int, stride: int = 1) -> np.ndarray:
    """Index of the last row of every window that ``make_windows`` returns."""
    count = n_windows(n_rows, window_size, stride)
    return np.arange(count, dtype=np.int64) * stride + window_size - 1


def windows_touching(rows: np.ndarray, window_size: int, stride: int = 1) -> np.ndarray:
    """For every window ``make_windows`` returns over ``len(rows)`` rows, whether it covers a row marked
    True in ``rows`` (T,) bool."""
    rows = np.asarray(rows, dtype=bool)
    starts = np.arange(n_windows(len(rows), window_size, stride), dtype=np.int64) * stride
    marked = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # marked rows before each row
    return marked[starts + window_size] - marked[starts] > 0


def rows_from_windows(window_values: np.ndarray, n_rows: int, window_size: int, stride: int = 1,
                      fill: float = np.nan) -> np.ndarray:
    """Spread per-window values onto rows: each row takes the value of the latest window ending at
    or before it (causal, as a stream would see it). Rows before the first window get ``fill``."""
    window_values = np.asarray(window_values)
    out = np.full((n_rows,) + window_values.shape[1:], fill, dtype=np.result_type(window_values, float))
    ends = window_end_rows(n_rows, window_size, stride)
    if len(ends) == 0:
        return out
    if len(ends) != len(window_values):
        raise ValueError(f"{len(window_values)} window values for {len(ends)} windows")
    # For every row from the first window end on, the index of the latest window ending at or before it.
    rows = np.arange(ends[0], n_rows)
    idx = np.searchsorted(ends, rows, side="right") - 1
    out[ends[0]:] = window_values[idx]
    return out


def exclusion_mask(n_rows: int, flagged_end_rows: np.ndarray | list[int], window_size: int,
                   margin_rows: int) -> np.ndarray:
    """Rows to drop (True) around flagged windows: window ``end - W + 1 .. end`` plus ``margin_rows``
    on each side, clipped to ``0 .. n_rows - 1``."""
    drop = np.zeros(n_rows + 1, dtype=np.int64)
    ends = np.asarray(flagged_end_rows, dtype=np.int64)
    if len(ends) and n_rows:
        # a margin or window past the series reaches its ends either way; clipped first, no int64 overflow
        margin, width = min(int(margin_rows), n_rows), min(int(window_size), n_rows + 1)
        starts = np.clip(ends - width + 1 - margin, 0, n_rows)
        stops = np.clip(ends + 1 + margin, 0, n_rows)
        np.add.at(drop, starts, 1)
        np.add.at(drop, stops, -1)
    return np.cumsum(drop[:n_rows]) > 0
