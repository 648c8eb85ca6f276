"""Transition surprise: how unlikely each reading's change is, given the change before it, under a
model the series teaches itself as it goes. No I/O.

A model fitted on a series' first rows knows what it saw then; a detector that keeps learning on every
row can also say "this step is surprising *here*, after that step" (the idea behind HTM's sequence
memory and CAD OSE's contexts, in their simplest form). Here each sensor's change from its previous
reading is put in one of a few bins spanning the changes seen in the training rows (plus one bin below
and one above that span), and the probability of the new change's bin given the previous change's
bin is read off the counts of every earlier transition of that sensor, smoothed with the
Krichevsky–Trofimov estimator (add one half), *then* the transition is counted. So each row's number
depends on rows up to it alone (a stream gets the same numbers), a pattern that keeps recurring stops
being surprising, and a step never taken after the step before it, in a context seen often, is very
surprising. The memory is a (bins + 2)² table of counts per sensor, so unlike the window novelty this
costs the same on every row.

``transition_surprise`` reports the surprisal of the least likely sensor's transition, ``-log2 p`` (bits
of information): "this step says 10 % more than the most surprising step of the recent past" is what
``calibration.record_ratio`` compares. Surprisal, not the odds ``1 / p``: an unseen transition out of a
context seen ``n`` times has odds of about ``2n``, which keep setting records on plain noise as ``n``
grows; its surprisal grows with ``log n`` only (on uniform noise with 16 bins, no record 20 % above the
last 3,000 rows' in 20 streams of 5,000 rows; with the odds, about five a stream).
"""

from __future__ import annotations

import numpy as np

KT_ALPHA = 0.5  # Krichevsky–Trofimov: add one half to every count
SPAN_SLACK = 1e-9  # the training span is widened by this fraction of itself, so that the largest training
# change recurring with a rounding difference (sin(2πt/P) at t and t + P, say) is not "beyond the span"


def change_symbols(values: np.ndarray, fit_rows: int, bins: int) -> np.ndarray:
    """Per row and sensor, the bin of the change from the previous reading (the first row's change is 0).

    ``values``: (T,) or (T, F), finite. The ``bins`` equal bins span the smallest to the largest change
    within the first ``fit_rows`` rows (widened by ``SPAN_SLACK``: rounding only); symbol 0 is a change
    below that span, ``bins + 1`` one above it, 1..``bins`` the bins themselves. A sensor whose training
    changes are all equal has that change in one bin and every other change out of span. Returns (T, F)
    integers in ``[0, bins + 2)``."""
    if bins < 1:
        raise ValueError("bins >= 1 is required")
    if fit_rows < 2:
        raise ValueError("fit_rows >= 2 is required (a change needs two readings)")
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (fill gaps before computing transitions)")
    changes = np.diff(x, axis=0, prepend=x[:1])
    fitted = changes[1:min(fit_rows, len(x))]
    if not len(fitted):
        raise ValueError("the series needs at least two rows")
    lo, hi = fitted.min(axis=0), fitted.max(axis=0)
    slack = SPAN_SLACK * np.maximum(hi - lo, np.maximum(np.abs(lo), np.abs(hi)))  # rounding, not a tolerance
    lo, hi = lo - slack, hi + slack
    width = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.floor((changes - lo) / np.where(width > 0, width, 1.0) * bins)
    inner = np.where(width > 0, np.clip(inner, 0, bins - 1), 0).astype(np.int64) + 1
    return np.where(changes < lo, 0, np.where(changes > hi, bins + 1, inner))


def _earlier_equal(keys: np.ndarray) -> np.ndarray:
    """Per position, how many earlier positions hold the same key (a running count per key)."""
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    starts = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = np.arange(len(keys)) - run_start
    return out


def transition_probabilities(symbols: np.ndarray, n_symbols: int, alpha: float = KT_ALPHA) -> np.ndarray:
    """Per row and sensor, the probability of the row's symbol given the previous row's, learned online:
    ``(c + alpha) / (n + alpha · n_symbols)`` with ``c`` the earlier occurrences of this (previous,
    current) pair and ``n`` those of the previous symbol as a context, both counted over the rows before
    this one. The first row has no context: probability 1. Past only. ``symbols``: (T,) or (T, F)
    integers in ``[0, n_symbols)``; returns (T, F)."""
    if n_symbols < 1 or alpha <= 0:
        raise ValueError("n_symbols >= 1 and alpha > 0 are required")
    q = np.asarray(symbols)
    q = q.reshape(q.shape[0], -1).astype(np.int64)
    if q.size and (q.min() < 0 or q.max() >= n_symbols):
        raise ValueError(f"symbols must lie in [0, {n_symbols})")
    out = np.ones(q.shape, dtype=np.float64)
    if len(q) < 2:
        return out
    for j in range(q.shape[1]):
        context, current = q[:-1, j], q[1:, j]
        pair = _earlier_equal(context * n_symbols + current)
        seen = _earlier_equal(context)
        out[1:, j] = (pair + alpha) / (seen + alpha * n_symbols)
    return out


def transition_surprise(values: np.ndarray, fit_rows: int, bins: int = 16, alpha: float = KT_ALPHA) -> np.ndarray:
    """Per row, the surprisal in bits (``-log2 p``) of the least likely sensor's transition
    (``change_symbols`` with ``bins`` bins fitted on the first ``fit_rows`` rows, then
    ``transition_probabilities``): small where every sensor did what it usually does, large where one
    took a step it never took in that context. 0 on the first row. Past only, apart from the bins'
    span, which the training rows fix."""
    symbols = change_symbols(values, fit_rows, bins)
    return -np.log2(transition_probabilities(symbols, bins + 2, alpha).min(axis=1))
