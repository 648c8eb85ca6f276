"""Raw anomaly scores turned into calibrated, drift-tolerant scores against their own recent past.
No I/O.

``anomaly_likelihood`` follows the "anomaly likelihood" of Ahmad et al. (Neurocomputing 2017, the
method behind Numenta's NAB results): the mean of the last ``short`` scores is compared with the
mean and spread of the ``long`` scores before them. A slow drift moves both and stays quiet; a
sudden change stands out. ``record_ratio`` compares a score with the largest of its recent past
instead, which assumes nothing of the scores' distribution (NAB's chain uses it, see
``protocols.nab_calibrate``). Only past scores are used, so both run the same way on a stream.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

Z_SCALE = 1.0  # z of 1 maps to 0.75; keeps the map strictly monotonic (no float saturation at 1.0)


def score_z(scores: np.ndarray, short: int = 5, long: int = 500, min_history: int = 50) -> np.ndarray:
    """z-score of the recent mean against the trailing history, per position (NaN before
    ``min_history`` past scores exist). NaN inputs are ignored in the statistics."""
    if short < 1 or long < 2 or min_history < 2:
        raise ValueError("short >= 1, long >= 2 and min_history >= 2 are required")
    s = np.asarray(scores, dtype=np.float64)
    recent, _ = _trailing_mean_std(s, short, 1)
    past = np.concatenate([np.full(min(short, len(s)), np.nan), s[:max(len(s) - short, 0)]])  # before the recent ones
    mean, std = _trailing_mean_std(past, long, min(min_history, long))
    floor = np.maximum(1e-3 * np.abs(mean), 1e-9)  # a flat history still has a finite spread
    return (recent - mean) / np.maximum(std, floor)


def _trailing_mean_std(x: np.ndarray, rows: int, min_count: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the mean and standard deviation (ddof 1) of the last ``rows`` values of ``x`` up to it
    (NaNs skipped; NaN where fewer than ``min_count`` are numbers), each window summed afresh. pandas'
    rolling sums add and take away as the window moves: a score of 2.5e33 that left the window long before
    left its rounding behind, and every later normal score's z was off by several (likelihood > 0.8 on
    1400 of 1400 normal rows)."""
    n = len(x)
    mean, std = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return mean, std
    padded = np.concatenate([np.full(rows - 1, np.nan), x])
    windows = np.lib.stride_tricks.sliding_window_view(padded, rows)  # (n, rows), a view
    for a in range(0, n, chunk):
        w = windows[a:a + chunk]
        present = ~np.isnan(w)
        count = present.sum(axis=1)
        ok = count >= max(min_count, 1)
        total = np.where(present, w, 0.0).sum(axis=1)
        m = np.divide(total, count, out=np.full(len(w), np.nan), where=count > 0)
        dev = np.where(present, w - m[:, None], 0.0)
        var = np.divide((dev * dev).sum(axis=1), count - 1, out=np.full(len(w), np.nan), where=count > 1)
        mean[a:a + chunk] = np.where(ok, m, np.nan)
        std[a:a + chunk] = np.where(ok, np.sqrt(var), np.nan)
    return mean, std


def z_to_unit(z: np.ndarray) -> np.ndarray:
    """Monotonic map of z to (0, 1): 0.5 at z = 0; NaN (no history yet) maps to 0."""
    z = np.asarray(z, dtype=np.float64) / Z_SCALE
    out = 0.5 + 0.5 * z / (1.0 + np.abs(z))
    return np.where(np.isfinite(out), out, 0.0)


def anomaly_likelihood(scores: np.ndarray, short: int = 5, long: int = 500, min_history: int = 50) -> np.ndarray:
    """Calibrated scores in [0, 1] (see module doc)."""
    return z_to_unit(score_z(scores, short, long, min_history))


def _max_before(scores: np.ndarray, rows: int, min_history: int) -> np.ndarray:
    """Per position, the largest of the ``rows`` scores before it (NaNs skipped); NaN where fewer than
    ``min_history`` of them are scores (at most ``rows``: a window shorter than the history asked for
    asks for all of it)."""
    return pd.Series(scores).shift(1).rolling(rows, min_periods=min(min_history, rows)).max().to_numpy()


def record_ratio(scores: np.ndarray, rows: int, min_history: int = 50) -> np.ndarray:
    """Calibrated scores in [0, 1]: ``r / (1 + r)`` with ``r`` = the score over the largest of the
    ``rows`` scores before it, so 0.5 is "level with the highest of the recent past" and anything
    above it a new record. It assumes nothing of the scores' distribution (the likelihood's z-score
    needs spikes dozens of standard deviations high when errors are heavy-tailed) nor of their
    scale, so one threshold means the same on every series. Past only. NaN scores are "none yet":
    they score 0 and are left out of the history; 0 until ``min_history`` earlier scores exist. A
    positive score after a history of zeros scores 1."""
    if rows < 1 or min_history < 1:
        raise ValueError("rows >= 1 and min_history >= 1 are required")
    s = np.asarray(scores, dtype=np.float64)
    before = _max_before(s, rows, min_history)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = s / before
        out = np.where(before > 0, np.where(np.isinf(r), 1.0, r / (1.0 + r)), np.where(s > 0, 1.0, 0.0))
    return np.where(np.isnan(before) | np.isnan(s), 0.0, out)


def suppress_repeats(scores: np.ndarray, rows: int) -> np.ndarray:
    """Each alarm once: a score is kept only where it is higher than every score of the ``rows`` rows
    before it, else it becomes 0. Past only, like the worker's alert shaping, which turns a sustained
    crossing into one event: a benchmark that counts every alarm row (NAB) would otherwise charge a
    long excursion as dozens of false alarms. A new, higher peak inside the span still gets through."""
    if rows < 1:
        raise ValueError("rows >= 1 is required")
    s = np.asarray(scores, dtype=np.float64)
    before = _max_before(s, rows, 1)
    return np.where(np.isnan(before) | (s > before), s, 0.0)


def beyond_seen_range(values: np.ndarray, tolerance: float) -> np.ndarray:
    """Per row, whether any sensor's value lies outside the range of that sensor's earlier values
    widened by ``tolerance`` × its width: a level never reached before, which a model of the recent
    past may reconstruct well enough to miss (Numenta's "spatial anomaly" rule, which NAB's HTM
    detector adds to its scores with a tolerance of 0.05). Past only; False until a sensor has two
    distinct earlier values; NaN values are neither flagged nor counted in the range."""
    above, below = beyond_seen_range_sides(values, tolerance)
    return above | below


def beyond_seen_range_sides(values: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """``beyond_seen_range`` split by side: per row, whether any sensor is above its widened earlier
    range (a new high), and whether any is below it (a new low). A new high and a new low are
    different events, which an each-alarm-once rule should not merge."""
    if tolerance < 0:
        raise ValueError("tolerance >= 0 is required")
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    x2 = x.reshape(len(x), -1)
    lo = np.fmin.accumulate(x2, axis=0)  # NaN-skipping running min/max (all-NaN so far stays NaN)
    hi = np.fmax.accumulate(x2, axis=0)
    pad = np.full((1, x2.shape[1]), np.nan)
    lo, hi = np.vstack([pad, lo[:-1]]), np.vstack([pad, hi[:-1]])  # the rows before each row
    width = hi - lo
    with np.errstate(invalid="ignore"):
        above = (width > 0) & (x2 > hi + tolerance * width)
        below = (width > 0) & (x2 < lo - tolerance * width)
    return above.any(axis=1), below.any(axis=1)
