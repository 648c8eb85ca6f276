"""Window novelty: how far the recent stretch of a series is from every earlier stretch of it. No I/O.

A model fitted on a series' first rows scores how well it reconstructs what it saw then; a stream
that keeps changing also needs "has this shape ever happened before?". ``window_novelty`` answers
that with the distance from the window ending at each row to its nearest earlier window (the
nearest-neighbour novelty of KNN-CAD and matrix-profile discords, past only): a daily pattern
that skips its jump, a plateau where there never was one, a burst of a new shape all sit far from
everything seen so far, while a pattern that has happened before, however unusual once, is near
its earlier occurrence. The memory grows with the stream, so what recurs stops being novel.

A window here is ``points`` readings ``step`` rows apart, ending at the row it is reported on (the
newest reading is always in it); its "earlier windows" are those that end before it begins, so a
window is never compared with itself shifted by a row. Distances are Euclidean over all sensors'
readings of the window: scale the sensors first (the caller's job) when they have different units.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCK_ELEMENTS = 1 << 23  # distance-matrix cells per block: 64 MB of float64


def window_novelty(values: np.ndarray, points: int, step: int = 1,
                   block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> np.ndarray:
    """Per row, the Euclidean distance from the window ending there to its nearest earlier window.

    ``values``: (T,) or (T, F), NaN-free (fill gaps first). Window ending at row ``t``: rows
    ``t - (points-1)·step, ..., t - step, t``, all sensors, flattened. Its earlier windows: those
    ending at rows ``s <= t - span`` (``span = (points-1)·step + 1`` rows, the window's own length),
    so the two share no row. NaN where no such window exists yet (the first ``2·span - 1`` rows).
    Past only: row ``t``'s value depends on rows ``<= t`` alone, so a stream gets the same numbers.
    Cost: T²/2 distances of ``points·F`` values, computed in blocks of at most ``block_elements``
    cells (time and memory scale with the square of the series' length: a one-off over a file, not
    a worker's per-reading path)."""
    if points < 1 or step < 1:
        raise ValueError("points >= 1 and step >= 1 are required")
    if block_elements < 1:
        raise ValueError("block_elements >= 1 is required")
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # (T,) or (T, F, ...) -> (T, F)
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (fill gaps before computing novelty)")
    x = x - x[:1]  # distances do not move; the first row (past for every row) as origin keeps rounding small
    n_rows = len(x)
    span = (points - 1) * step + 1
    out = np.full(n_rows, np.nan)
    n_windows = n_rows - span + 1
    if n_windows <= span:  # no window has an earlier, disjoint one
        return out
    # Window k ends at row k + span - 1 and holds rows k, k + step, ..., k + span - 1.
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=0)[:, :, ::step]  # (n_windows, F, points)
    windows = np.ascontiguousarray(windows.reshape(n_windows, -1))
    sq = np.einsum("ij,ij->i", windows, windows)
    first = span  # the first window with an earlier disjoint one (window 0 ends where window span begins)
    rows_per_block = max(1, block_elements // max(n_windows, 1))
    for lo in range(first, n_windows, rows_per_block):
        hi = min(lo + rows_per_block, n_windows)
        reach = hi - span  # earlier windows of this block's queries: indices < reach (the last query's)
        queries = windows[lo:hi]
        d2 = sq[lo:hi, None] + sq[None, :reach] - 2.0 * (queries @ windows[:reach].T)
        # query k may use earlier windows j <= k - span: mask the rest of the shared block
        j = np.arange(reach)[None, :]
        k = np.arange(lo, hi)[:, None]
        d2 = np.where(j <= k - span, d2, np.inf)
        nearest = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        out[lo + span - 1:hi + span - 1] = nearest
    return out
