"""Evaluation metrics: the benchmarks' own published scores, and an event-wise view. No I/O.

This module owns the arithmetic that turns labels and predictions (or scores) into numbers. Callers
(``anomaly.protocols``) load the data, run the detector and track the results; nothing here reads a
file, imports torch or talks to MLflow. Everything is plain numpy.

- **SKAB outlier metric** (``skab_binary_metrics``): point-wise TP/FP/FN/TN summed over all files
  (micro), ``F1 = TP/(TP + (FN+FP)/2)``, ``FAR = FP/(FP+TN)·100``, ``MAR = FN/(FN+TP)·100``, as SKAB's
  ``chp_score(metric="binary")``. No point adjustment.
- **Event-wise metrics** (``label_events``, ``event_metrics``, ``aggregate_events``): an event is a
  maximal run of positive rows; event precision/recall/F1 and detection delay, micro over series.
  ``point_adjusted_f1`` is here only to be shown *beside* them: it inflates results.
- **NAB score** (``NAB_PROFILES``, ``NabFile``, ``nab_*``): Numenta's sweeper re-implemented from
  ``shared/datasets/SCORING.md`` (steps 1-7) and NAB's ``nab/sweeper.py``: sigmoid-weighted rows,
  probation dropped, only the earliest detection in a window counts, FP cost depending on the distance
  past the previous window, the (oracle) threshold sweep and the normalisation against the null
  detector.

Conventions: label/prediction arrays are 1-D, bool or 0/1 (any other value raises ``ValueError``);
row windows for NAB are ``(start, end)`` with ``end`` INCLUSIVE, as NAB's labels are; events from
``label_events`` are ``(start, end)`` with ``end`` EXCLUSIVE, as Python slices are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _as_bool(values: Any, what: str) -> np.ndarray:
    """A 1-D bool array from a bool or 0/1 array; anything else (2, NaN, strings) is an error."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{what} must be bool or 0/1, got dtype {arr.dtype}")
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        raise ValueError(f"{what} must hold only 0/1 (or bool), found {arr[~ok][0]!r}")
    return arr == 1


def _ratio(num: float, den: float) -> float:
    """``num/den``, or 0.0 when ``den`` is 0 (nothing to measure counts as 0, as sklearn's zero_division=0)."""
    return float(num) / float(den) if den else 0.0


def _elapsed_seconds(timestamps: Any, n_rows: int) -> np.ndarray:
    """Seconds since the first row, as float64, from datetime64 / DatetimeIndex / numeric epoch seconds, as
    the stream has seen time pass: a row stamped before an earlier one (a late reading; one NAB file has
    such rows) counts at the latest time seen so far, so no delay is negative. A missing time (NaT, NaN)
    is a ``ValueError`` naming its row (every delay would be NaN)."""
    secs = _seconds_since_first(timestamps, n_rows)
    missing = np.flatnonzero(np.isnan(secs))
    if len(missing):
        raise ValueError(f"timestamps: row {int(missing[0])} has no time (NaT or NaN)")
    return np.maximum.accumulate(secs) if len(secs) else secs


def _seconds_since_first(timestamps: Any, n_rows: int) -> np.ndarray:
    if getattr(timestamps, "tz", None) is not None:  # a tz-aware DatetimeIndex: its UTC instants, no warning
        timestamps = timestamps.tz_convert("UTC").tz_localize(None)
    arr = np.asarray(timestamps)
    if arr.ndim != 1 or len(arr) != n_rows:
        raise ValueError(f"timestamps must be 1-D with {n_rows} rows, got shape {arr.shape}")
    if n_rows == 0:
        return np.zeros(0, dtype=np.float64)
    if arr.dtype.kind in "iuf":
        secs = arr.astype(np.float64)
        return secs - secs[0]
    if arr.dtype.kind not in "mM":
        try:  # strings, datetime.datetime or pandas Timestamp objects (tz-aware ones as their UTC instants)
            import pandas as pd

            arr = pd.to_datetime(arr, utc=True).tz_localize(None).to_numpy(dtype="datetime64[ns]")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"timestamps must be datetime64 or numeric seconds, got dtype {arr.dtype}") from exc
    return (arr - arr[0]) / np.timedelta64(1, "s")


# --------------------------------------------------------------------------------------------------
# SKAB: point-wise outlier metric
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryMetrics:
    """SKAB's outlier-detection metric over all files. Counts are summed over files (micro).

    ``f1``, ``far`` and ``mar`` are unrounded; SKAB's ``chp_score`` returns them rounded to 2 decimals
    (F1 0.70 where this gives 0.6984), which is what its leaderboard lists, so ``round(x, 2)`` gives
    SKAB's figure. ``far`` and ``mar`` are percentages.
    """

    tp: int
    fp: int
    fn: int
    tn: int
    f1: float
    far: float  # false alarm rate, % of normal rows flagged
    mar: float  # missing alarm rate, % of anomalous rows not flagged

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def skab_binary_metrics(y_true: Sequence[np.ndarray], y_pred: Sequence[np.ndarray]) -> BinaryMetrics:
    """SKAB's ``chp_score(metric="binary")``: confusion counts summed over files, then
    ``F1 = TP/(TP + (FN+FP)/2)``, ``FAR = FP/(FP+TN)·100``, ``MAR = FN/(FN+TP)·100``.

    One array per file (bool or 0/1, row-aligned). A ratio whose denominator is 0 is 0.0 (e.g. F1 when
    there is neither an anomalous row nor a flag). Raises ``ValueError`` naming the file index when a
    file's label and prediction lengths differ.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} label arrays but {len(y_pred)} prediction arrays")
    tp = fp = fn = tn = 0
    for i, (t_raw, p_raw) in enumerate(zip(y_true, y_pred)):
        t = _as_bool(t_raw, f"y_true[{i}]")
        p = _as_bool(p_raw, f"y_pred[{i}]")
        if len(t) != len(p):
            raise ValueError(f"file {i}: {len(t)} labels but {len(p)} predictions")
        tp += int(np.count_nonzero(t & p))
        fp += int(np.count_nonzero(~t & p))
        fn += int(np.count_nonzero(t & ~p))
        tn += int(np.count_nonzero(~t & ~p))
    return BinaryMetrics(tp=tp, fp=fp, fn=fn, tn=tn,
                         f1=_ratio(tp, tp + (fn + fp) / 2),
                         far=100.0 * _ratio(fp, fp + tn),
                         mar=100.0 * _ratio(fn, fn + tp))


# --------------------------------------------------------------------------------------------------
# Event-wise metrics
# --------------------------------------------------------------------------------------------------


def true_runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (exclusive) ends of the maximal runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def label_events(labels: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of positive rows as ``(start, end)``, ``end`` EXCLUSIVE (``labels[start:end]``)."""
    starts, ends = true_runs(_as_bool(labels, "labels"))
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


@dataclass(frozen=True)
class EventCounts:
    """Event counts of one series; add them up over series with ``aggregate_events``."""

    n_true: int  # labelled events
    n_detected: int  # labelled events with at least one predicted row inside
    n_pred: int  # predicted events (maximal runs of predicted rows)
    n_pred_correct: int  # predicted events overlapping at least one labelled event
    delays: list[float] = field(default_factory=list)  # one per detected event: seconds, or rows without timestamps


def event_metrics(y_true: np.ndarray, y_pred: np.ndarray, timestamps: Any = None) -> EventCounts:
    """Event counts of one series.

    - Labelled and predicted events are the maximal runs of positive rows (``label_events``).
    - A predicted event is correct if it overlaps any labelled event (one predicted event spanning two
      labelled events is one correct prediction and detects both).
    - A labelled event is detected if at least one predicted row lies inside it; its delay is the time
      from its first row to the first predicted row inside it: seconds when ``timestamps`` is given
      (datetime64 array, DatetimeIndex, or numeric epoch seconds), else rows. A predicted run that
      starts before the event and runs into it gives delay 0.
    """
    t = _as_bool(y_true, "y_true")
    p = _as_bool(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"{len(t)} labels but {len(p)} predictions")
    elapsed = None if timestamps is None else _elapsed_seconds(timestamps, len(t))
    true_starts, true_ends = true_runs(t)
    pred_starts, pred_ends = true_runs(p)
    # Cumulative counts answer "any positive in [s, e)?" for every run at once.
    true_csum = np.concatenate(([0], np.cumsum(t, dtype=np.int64)))
    pred_csum = np.concatenate(([0], np.cumsum(p, dtype=np.int64)))
    n_pred_correct = int(np.count_nonzero(true_csum[pred_ends] - true_csum[pred_starts] > 0))
    detected = pred_csum[true_ends] - pred_csum[true_starts] > 0
    pred_rows = np.flatnonzero(p)
    first_hit = pred_rows[np.searchsorted(pred_rows, true_starts[detected], side="left")]
    starts = true_starts[detected]
    if elapsed is None:
        delays = (first_hit - starts).astype(np.float64)
    else:
        delays = elapsed[first_hit] - elapsed[starts]
    return EventCounts(n_true=len(true_starts), n_detected=int(np.count_nonzero(detected)),
                       n_pred=len(pred_starts), n_pred_correct=n_pred_correct,
                       delays=[float(d) for d in delays])


@dataclass(frozen=True)
class EventMetrics:
    """Event-wise metrics, micro-aggregated over series (counts summed before dividing).

    ``mean_delay_s`` is the mean over every detected event of every series, in seconds (in rows for
    series scored without timestamps); ``None`` when no event was detected, so ``to_dict`` stays
    JSON-serialisable (NaN is not valid JSON).
    """

    precision: float
    recall: float
    f1: float
    mean_delay_s: float | None
    n_true: int
    n_detected: int
    n_pred: int
    n_pred_correct: int

    def to_dict(self) -> dict[str, float | None]:
        return {"event_precision": self.precision, "event_recall": self.recall, "event_f1": self.f1,
                "mean_delay_s": self.mean_delay_s}


def aggregate_events(counts: Iterable[EventCounts]) -> EventMetrics:
    """Micro-aggregate ``event_metrics`` over series: precision = Σcorrect/Σpredicted,
    recall = Σdetected/Σlabelled, F1 their harmonic mean; a ratio with a zero denominator is 0.0."""
    n_true = n_detected = n_pred = n_pred_correct = 0
    delays: list[float] = []
    for c in counts:
        n_true += c.n_true
        n_detected += c.n_detected
        n_pred += c.n_pred
        n_pred_correct += c.n_pred_correct
        delays.extend(c.delays)
    precision = _ratio(n_pred_correct, n_pred)
    recall = _ratio(n_detected, n_true)
    f1 = _ratio(2 * precision * recall, precision + recall)
    mean_delay = float(np.mean(delays)) if delays else None
    return EventMetrics(precision=precision, recall=recall, f1=f1, mean_delay_s=mean_delay, n_true=n_true,
                        n_detected=n_detected, n_pred=n_pred, n_pred_correct=n_pred_correct)


def point_adjusted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Point-wise F1 after point adjustment: a labelled event with any predicted row inside counts as
    predicted on all its rows.

    INFLATED: one lucky flag in a long event turns the whole event into true positives, so random
    scores reach a high PA-F1 (about 0.76 on SMD, Garg et al. 2021). Only show it beside the
    unadjusted and event-wise numbers, never alone.
    """
    t = _as_bool(y_true, "y_true")
    p = _as_bool(y_pred, "y_pred").copy()
    if len(t) != len(p):
        raise ValueError(f"{len(t)} labels but {len(p)} predictions")
    for s, e in zip(*true_runs(t)):
        if p[s:e].any():
            p[s:e] = True
    tp = int(np.count_nonzero(t & p))
    return _ratio(2 * tp, 2 * tp + int(np.count_nonzero(~t & p)) + int(np.count_nonzero(t & ~p)))


def labelled_report(y_true: Sequence[np.ndarray], y_pred: Sequence[np.ndarray],
                    timestamps: Sequence[Any] | None = None) -> dict[str, float | int | None]:
    """A labelled file's figures for ``anomaly score``: point-wise precision, recall, F1, FAR and MAR
    (SKAB's arithmetic, counts summed over series: one per entity) beside event-wise precision, recall,
    F1 and mean detection delay (seconds when ``timestamps`` are given), and the counts behind them."""
    point = skab_binary_metrics(y_true, y_pred)
    if timestamps is None:
        events = aggregate_events(event_metrics(t, p) for t, p in zip(y_true, y_pred))
    else:
        events = aggregate_events(event_metrics(t, p, ts) for t, p, ts in zip(y_true, y_pred, timestamps))
    out: dict[str, float | int | None] = {
        "precision": _ratio(point.tp, point.tp + point.fp), "recall": _ratio(point.tp, point.tp + point.fn),
        "f1": point.f1, "far": point.far, "mar": point.mar, **events.to_dict(),
        "labelled_rows": point.tp + point.fn, "flagged_rows": point.tp + point.fp,
        "labelled_events": events.n_true, "detected_events": events.n_detected}
    out = unmeasured(out, point, events)
    out["fc1"] = composite_f1(out["precision"], out["event_recall"])
    return out


def composite_f1(point_precision: float | None, event_recall: float | None) -> float | None:
    """Fc1 (Garg et al. 2021): the harmonic mean of point-wise precision and event-wise recall. Event F1
    alone rewards flagging everything (every event found, one long correct run: 1.0); Fc1 charges the
    false rows through precision. None when either is undefined, except with nothing flagged (no precision)
    and no event found: 0.0, as F1 and event F1 are; 0.0 when both are 0."""
    if point_precision is None and event_recall == 0.0:
        return 0.0
    if point_precision is None or event_recall is None:
        return None
    total = point_precision + event_recall
    return 2.0 * point_precision * event_recall / total if total > 0 else 0.0


def unmeasured(metrics: Mapping[str, Any], point: BinaryMetrics | None = None,
               events: EventMetrics | None = None) -> dict[str, Any]:
    """``metrics`` with each figure that had nothing to measure set to None, not to a 0 that reads as a
    result: nothing labelled (no recall to have, not a recall of 0): recall, MAR and their event-wise
    kin, and F1 unless something was flagged (then every flag is a false alarm and F1 is 0, as SKAB's
    ``chp_score`` gives it); no normal row: FAR; nothing flagged: precision; no predicted event: event
    precision. Only keys already in ``metrics`` are touched."""
    out = dict(metrics)
    gone: list[str] = []
    if point is not None:
        if not point.tp + point.fn:
            gone += ["recall", "mar"] + ([] if point.fp else ["f1"])
        if not point.fp + point.tn:
            gone += ["far"]
        if not point.tp + point.fp:
            gone += ["precision"]
    if events is not None:
        if not events.n_true:
            gone += ["event_recall", "mean_delay_s"] + ([] if events.n_pred else ["event_f1"])
        if not events.n_pred:
            gone += ["event_precision"]
    out.update({k: None for k in gone if k in out})
    return out


# --------------------------------------------------------------------------------------------------
# NAB score
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NabProfile:
    """One NAB application profile (``config/profiles.json``). All weights are positive magnitudes,
    as NAB stores them: a detection in a window earns up to ``a_tp``, a missed window costs ``a_fn``,
    a detection outside windows costs up to ``a_fp``."""

    name: str
    a_tp: float  # tpWeight
    a_fp: float  # fpWeight
    a_fn: float  # fnWeight


NAB_PROFILES: dict[str, NabProfile] = {
    "standard": NabProfile("standard", a_tp=1.0, a_fp=0.11, a_fn=1.0),
    "reward_low_FP_rate": NabProfile("reward_low_FP_rate", a_tp=1.0, a_fp=0.22, a_fn=1.0),
    "reward_low_FN_rate": NabProfile("reward_low_FN_rate", a_tp=1.0, a_fp=0.11, a_fn=2.0),
}
# Keys of nab_scores() for each profile.
NAB_SCORE_KEYS: dict[str, str] = {"standard": "nab_standard", "reward_low_FP_rate": "nab_low_fp",
                                  "reward_low_FN_rate": "nab_low_fn"}

NAB_PROBATION_FRACTION = 0.15  # NAB runner.probationaryPercent
NAB_PROBATION_CAP_ROWS = 5000  # probation never exceeds 0.15 * 5000 = 750 rows (util.getProbationPeriod)
NAB_NO_DETECTION_THRESHOLD = 1.1  # above every score in [0, 1]: NAB's sweep starts here (nothing detected)


def nab_scaled_sigmoid(position: float | np.ndarray) -> float | np.ndarray:
    """NAB's ``scaledSigmoid``: ``2·σ(−5·position) − 1``, and exactly −1 for ``position >= 3``
    (``nab/sweeper.py``; NAB's older ``scorer.py`` had ``> 3``: 6.7e-8 of A_FP apart at exactly 3).

    −1 is a window's left edge (0.98661), 0 its right edge (0.0), positive values lie past it.
    Vectorised; returns a float for a scalar input.
    """
    x = np.asarray(position, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp(5x) overflows only where x > 3, which is replaced by -1
        val = 2.0 * (1.0 / (1.0 + np.exp(5.0 * x))) - 1.0
    out = np.where(x >= 3.0, -1.0, val)
    return float(out) if out.ndim == 0 else out


NAB_MAX_TP: float = float(nab_scaled_sigmoid(-1.0))  # 0.98661: the raw left-edge value, scaled so the left edge earns A_TP


def nab_probation_rows(n_rows: int) -> int:
    """Rows at the start of a file that NAB does not score: ``min(floor(0.15·n), 0.15·5000 = 750)``,
    computed in floating point exactly as ``util.getProbationPeriod``. Rows with index < this are dropped."""
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    return int(min(math.floor(NAB_PROBATION_FRACTION * n_rows), NAB_PROBATION_FRACTION * NAB_PROBATION_CAP_ROWS))


@dataclass(frozen=True, eq=False)
class NabFile:
    """One NAB data file as the scorer sees it.

    ``scores``: the detector's anomaly score in [0, 1] for every row (probation rows included; they are
    dropped when scoring). ``windows``: labelled windows as ``(start_row, end_row)``, both INCLUSIVE,
    sorted and disjoint (``nab_windows_to_rows`` maps NAB's timestamp labels to these).
    """

    name: str
    scores: np.ndarray
    windows: list[tuple[int, int]]

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.ndim != 1:
            raise ValueError(f"{self.name}: scores must be 1-D, got shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError(f"{self.name}: scores must be finite (NaN or inf found)")
        if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
            raise ValueError(f"{self.name}: NAB scores must lie in [0, 1], got [{scores.min()}, {scores.max()}]")
        windows = [(int(s), int(e)) for s, e in self.windows]
        prev_end = -1
        for s, e in windows:
            if not 0 <= s <= e < len(scores):
                raise ValueError(f"{self.name}: window ({s}, {e}) is not inside rows 0..{len(scores) - 1}")
            if s <= prev_end:
                raise ValueError(f"{self.name}: windows must be sorted and disjoint; ({s}, {e}) starts at or "
                                 f"before the previous window's end {prev_end}")
            prev_end = e
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "windows", windows)


def nab_row_weights(n_rows: int, windows: Sequence[tuple[int, int]], profile: NabProfile) -> np.ndarray:
    """The weight a detection on each row earns (``Sweeper.calcSweepScore``'s ``sweepScore``).

    - Row ``i`` inside window ``l..r`` (width ``W = r−l+1``):
      ``scaledSigmoid(−(r−i+1)/W) · A_TP / maxTP``; the left edge earns exactly ``A_TP``, the right
      edge ``scaledSigmoid(−1/W)/maxTP·A_TP``.
    - Row ``i`` outside windows, before any window has ended: ``−A_FP``.
    - Row ``i`` outside windows after window ``l'..r'`` (width ``W'``) ended:
      ``scaledSigmoid((i−r')/(W'−1)) · A_FP``: a small cost right after the window, ``−A_FP`` from
      3·(W'−1) rows past it. For ``W' = 1`` NAB would divide by zero; we take the limit (``−A_FP``).

    Probation rows get a weight too (windows inside probation still set "the previous window"); the
    scorer drops them.
    """
    rows = np.arange(n_rows)
    weights = np.empty(n_rows, dtype=np.float64)
    inside = np.zeros(n_rows, dtype=bool)
    for s, e in windows:
        width = e - s + 1
        position = -(e - rows[s:e + 1] + 1) / width
        weights[s:e + 1] = nab_scaled_sigmoid(position) * profile.a_tp / NAB_MAX_TP
        inside[s:e + 1] = True
    out_rows = rows[~inside]
    ends = np.array([e for _, e in windows], dtype=np.int64)
    widths = np.array([e - s + 1 for s, e in windows], dtype=np.int64)
    prev = np.searchsorted(ends, out_rows, side="left") - 1  # last window ending before the row; -1: none
    has_prev = prev >= 0
    unweighted = np.full(len(out_rows), -1.0)
    if has_prev.any():
        past = out_rows[has_prev] - ends[prev[has_prev]]
        span = (widths[prev[has_prev]] - 1).astype(np.float64)
        with np.errstate(divide="ignore"):
            position = np.where(span > 0, past / np.maximum(span, 1.0), np.inf)
        unweighted[has_prev] = nab_scaled_sigmoid(position)
    weights[~inside] = unweighted * profile.a_fp
    return weights


@dataclass(frozen=True)
class _ScoredRows:
    """The rows NAB scores (probation dropped), pooled over files, for one profile."""

    scores: np.ndarray  # (N,) detector scores
    weights: np.ndarray  # (N,) nab_row_weights of each row
    window: np.ndarray  # (N,) corpus-wide window id, -1 outside windows
    n_windows: int  # windows with at least one scored row (only these earn or cost anything)


def _scored_rows(files: Sequence[NabFile], profile: NabProfile) -> _ScoredRows:
    scores, weights, window = [], [], []
    next_id = 0
    for f in files:
        n = len(f.scores)
        first = nab_probation_rows(n)
        ids = np.full(n, -1, dtype=np.int64)
        for k, (s, e) in enumerate(f.windows):
            ids[s:e + 1] = next_id + k
        next_id += len(f.windows)
        scores.append(f.scores[first:])
        weights.append(nab_row_weights(n, f.windows, profile)[first:])
        window.append(ids[first:])
    if not scores:
        empty = np.zeros(0)
        return _ScoredRows(empty, empty, np.zeros(0, dtype=np.int64), 0)
    pooled_window = np.concatenate(window)
    # A window entirely inside probation has no scored row: NAB leaves it out of the score
    # (NAB's labeller deletes such windows anyway, so on NAB's own labels this never happens).
    window_ids = np.unique(pooled_window[pooled_window >= 0])
    remap = np.full(next_id + 1, -1, dtype=np.int64)  # one spare slot: remap[-1] stays -1 (outside)
    remap[window_ids] = np.arange(len(window_ids))
    return _ScoredRows(np.concatenate(scores), np.concatenate(weights), remap[pooled_window],
                       len(window_ids))


def _raw_at(rows: _ScoredRows, threshold: float, profile: NabProfile) -> float:
    detected = rows.scores >= threshold
    outside = rows.window < 0
    fp_total = float(rows.weights[detected & outside].sum())
    # Each window earns its best detection (its earliest: weights fall across a window) or costs A_FN.
    best = np.full(rows.n_windows, -profile.a_fn)
    hit = detected & ~outside
    np.maximum.at(best, rows.window[hit], rows.weights[hit])
    return float(best.sum()) + fp_total


def nab_window_count(files: Iterable[NabFile]) -> int:
    """Windows NAB scores: those with at least one row after probation (all of NAB's 116)."""
    return sum(1 for f in files for _, e in f.windows if e >= nab_probation_rows(len(f.scores)))


def nab_raw_score(files: Iterable[NabFile], threshold: float, profile: NabProfile) -> float:
    """NAB raw score at ``threshold``, summed over files (``Sweeper.calcScoreByThreshold``).

    Detections are scored rows (row index ≥ ``nab_probation_rows``) with ``score >= threshold``.
    Each window earns the weight of its best (= earliest) detection, or costs ``−A_FN`` when it has
    none; later detections in the same window neither help nor hurt. Each detection outside windows
    adds its (negative) weight from ``nab_row_weights``.
    """
    return _raw_at(_scored_rows(list(files), profile), float(threshold), profile)


def nab_optimize(files: Iterable[NabFile], profile: NabProfile) -> tuple[float, float]:
    """The threshold that maximises the corpus raw score, and that score: ``(threshold, raw)``.

    ORACLE: the threshold is chosen on the labels, as NAB does (``optimizer.optimizeThreshold``).
    Like NAB's ``Sweeper`` (NAB's first optimiser was a "twiddle" hill climb from 0.5), we sweep every
    distinct score exactly, so the optimum is the true maximum. O(N log N): rows of all files are sorted
    by score, descending, and the score change of admitting each row is accumulated, as
    ``Sweeper.calcScoreByThreshold`` does. Ties go to the highest threshold (fewest detections);
    when detecting nothing is best, the threshold is ``NAB_NO_DETECTION_THRESHOLD`` (1.1).
    The returned raw score is recomputed at the chosen threshold with ``nab_raw_score``'s arithmetic.
    """
    rows = _scored_rows(list(files), profile)
    null_raw = -profile.a_fn * rows.n_windows
    if len(rows.scores) == 0:
        return NAB_NO_DETECTION_THRESHOLD, float(null_raw)
    order = np.argsort(-rows.scores, kind="stable")
    s_sorted = rows.scores[order]
    w_sorted = rows.weights[order]
    win_sorted = rows.window[order]

    change = np.where(win_sorted < 0, w_sorted, 0.0)  # each FP adds its own weight
    # In a window, admitting a row changes the window's value from its best so far (−A_FN at first)
    # to the running maximum of the weights admitted so far.
    in_pos = np.flatnonzero(win_sorted >= 0)
    by_window = in_pos[np.argsort(win_sorted[in_pos], kind="stable")]  # grouped by window, sweep order kept
    bounds = np.flatnonzero(np.diff(win_sorted[by_window])) + 1
    for group in np.split(by_window, bounds):
        if len(group) == 0:
            continue
        best = np.maximum.accumulate(np.maximum(w_sorted[group], -profile.a_fn))
        change[group] = best - np.concatenate(([-profile.a_fn], best[:-1]))

    totals = null_raw + np.cumsum(change)
    # A threshold admits every row with score >= it, so only the last row of a run of equal scores
    # gives a score that some threshold actually reaches.
    last_of_tie = np.concatenate((s_sorted[1:] != s_sorted[:-1], [True]))
    candidates = np.concatenate(([null_raw], totals[last_of_tie]))
    thresholds = np.concatenate(([NAB_NO_DETECTION_THRESHOLD], s_sorted[last_of_tie]))
    best_i = int(np.argmax(candidates))  # first maximum: the highest threshold among ties
    best_threshold = float(thresholds[best_i])
    return best_threshold, _raw_at(rows, best_threshold, profile)


def nab_normalized(raw: float, n_windows: int, profile: NabProfile, null_raw: float | None = None) -> float:
    """NAB's final score (``runner.normalize``): ``100·(raw − S_null)/(S_perfect − S_null)`` with
    ``S_perfect = A_TP·n_windows`` (every labelled window) and ``S_null`` the null detector's raw score
    (``nab_null_raw``; by default ``−A_FN·n_windows``, what it is on any corpus where detecting nothing
    beats flagging every row, NAB's own included). Perfect detection gives 100, the null detector 0, and
    many false positives go negative."""
    if n_windows <= 0:
        raise ValueError(f"the NAB score needs at least one labelled window, got {n_windows}")
    perfect = profile.a_tp * n_windows
    null = -profile.a_fn * n_windows if null_raw is None else float(null_raw)
    if perfect <= null:
        raise ValueError(f"the null detector scores {null:g}, as much as a perfect one ({perfect:g}): "
                         "the NAB score is undefined")
    return 100.0 * (raw - null) / (perfect - null)


NAB_NULL_SCORE = 0.5  # what NAB's null detector gives every row (``detectors/null/null_detector.py``)


def nab_null_raw(files: Iterable[NabFile], profile: NabProfile) -> float:
    """The raw score of NAB's null detector on these files: every row scored 0.5, at its own best
    threshold (so the better of flagging nothing and flagging every scored row), as NAB's
    ``runner.normalize`` takes it from the null detector's optimised results. On a file that is mostly
    window, flagging every row beats flagging nothing."""
    nulls = [NabFile(f.name, np.full(len(f.scores), NAB_NULL_SCORE), f.windows) for f in files]
    return nab_optimize(nulls, profile)[1]


def nab_scores(files: Iterable[NabFile], threshold: float | None = None) -> dict[str, float | int | None]:
    """Normalised NAB scores for the three profiles.

    With ``threshold=None`` each profile is scored at its own oracle threshold (``nab_optimize``), as
    NAB's published tables are; otherwise every profile is scored at ``threshold``.

    Keys: ``nab_standard``, ``nab_low_fp``, ``nab_low_fn`` (normalised; ``None`` when no file has a
    scored window, where the NAB score is undefined), ``<key>_threshold`` (the threshold used),
    ``<key>_raw`` (the raw score) and ``nab_windows`` (labelled windows, as the normalisation counts
    them). The null detector's score is computed on these files (``nab_null_raw``).
    """
    files = list(files)
    out: dict[str, float | int | None] = {}
    scored_windows = nab_window_count(files)
    n_windows = sum(len(f.windows) for f in files)  # S_perfect counts every labelled window, as NAB's does
    for name, key in NAB_SCORE_KEYS.items():
        profile = NAB_PROFILES[name]
        if threshold is None:
            used, raw = nab_optimize(files, profile)
        else:
            used, raw = float(threshold), nab_raw_score(files, threshold, profile)
        null = nab_null_raw(files, profile) if scored_windows else None
        defined = null is not None and profile.a_tp * n_windows > null  # else no score separates the two
        out[key] = nab_normalized(raw, n_windows, profile, null) if defined else None
        out[f"{key}_threshold"] = used
        out[f"{key}_raw"] = raw
    out["nab_windows"] = n_windows
    return out


def _as_times(values: Any) -> np.ndarray:
    """Timestamps as comparable values: datetime64[ns] for dates (strings, datetimes, DatetimeIndex),
    float64 for numeric times."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iuf":
        return arr.astype(np.float64)
    try:
        return arr.astype("datetime64[ns]")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot read timestamps of dtype {arr.dtype}: {exc}") from exc


def nab_windows_to_rows(timestamps: Any, windows_ts: Iterable[Sequence[Any]]) -> list[tuple[int, int]]:
    """Map NAB's ``[start, end]`` timestamp windows (``labels/combined_windows.json``) to INCLUSIVE row
    indices. Each window timestamp must equal a row timestamp exactly (the first such row is used, as
    NAB's ``timestamps.index``); raises ``ValueError`` otherwise."""
    ts = _as_times(timestamps)
    if ts.ndim != 1:
        raise ValueError(f"timestamps must be 1-D, got shape {ts.shape}")
    values, first_row = np.unique(ts, return_index=True)  # sorted distinct timestamps, first occurrence

    def row_of(t: Any) -> int:
        key = _as_times([t]).astype(ts.dtype)[0]
        i = int(np.searchsorted(values, key))
        if i == len(values) or values[i] != key:
            raise ValueError(f"window timestamp {t!r} matches no row timestamp")
        return int(first_row[i])

    rows = []
    for window in windows_ts:
        if len(window) != 2:
            raise ValueError(f"a window must be [start, end], got {window!r}")
        start, end = row_of(window[0]), row_of(window[1])
        if end < start:
            raise ValueError(f"window {window!r} ends before it starts")
        rows.append((start, end))
    return rows


# --------------------------------------------------------------------------------------------------
# Attribution: which sensors an alarm names, against the sensors labelled responsible
# --------------------------------------------------------------------------------------------------


ATTRIBUTION_PS = (100, 150)


def interpretation_matrix(segments: Iterable[tuple[int, int, Sequence[int]]], n_rows: int, n_cols: int,
                          offset: int = 0) -> np.ndarray:
    """(n_rows, n_cols) bool: the sensors labelled responsible at each row, from ``(start, end, columns)``
    segments (``end`` EXCLUSIVE, 0-based columns, as ``datasets.load_smd`` gives SMD's
    ``interpretation_label``) shifted by ``-offset`` rows; rows named by two segments get the union, and
    segment rows outside ``0..n_rows-1`` are dropped."""
    truth = np.zeros((n_rows, n_cols), dtype=bool)
    for start, end, columns in segments:
        a, b = max(0, start - offset), min(n_rows, end - offset)
        if a < b:
            truth[a:b, list(columns)] = True
    return truth


@dataclass(frozen=True)
class AttributionCounts:
    """Per-row attribution figures of one series, summed (``aggregate_attribution`` divides): over the
    rows with a labelled sensor, and over those of them the detector flagged."""

    rows: int
    hits: dict[int, float]  # P -> sum over rows of HitRate@P%
    ndcg: dict[int, float]  # P -> sum over rows of NDCG@P%
    flagged_rows: int = 0
    flagged_hits: dict[int, float] = field(default_factory=dict)


def attribution_counts(sensor_scores: np.ndarray, truth: np.ndarray, flags: np.ndarray | None = None,
                       ps: Sequence[int] = ATTRIBUTION_PS) -> AttributionCounts:
    """HitRate@P% and NDCG@P% (Su et al. 2019, OmniAnomaly; computed as TranAD's ``diagnosis.py`` does)
    of ranking each row's sensors by ``sensor_scores`` (T, F; larger = more to blame), against ``truth``
    (T, F bool, ``interpretation_matrix``), at every row with at least one sensor labelled.

    - The top ``k = round(P% × |labelled|)`` sensors are taken (Python's rounding, half to even: 1
      labelled sensor gives 2 at 150 %, 3 give 4), at most F; ties rank the lower column first.
    - HitRate@P% of a row: the share of its labelled sensors among those k.
    - NDCG@P% of a row: binary relevance, DCG of the top k (1/log2(rank+1) for each labelled sensor among
      them) over the DCG of the labelled sensors ranked first.
    - A row with a non-finite score (no window ends there) ranks nothing: 0 for both.
    ``flags`` (T,) bool: also sums HitRate over the labelled rows the detector flagged (what an alarm's
    event would have named)."""
    scores = np.asarray(sensor_scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if scores.shape != truth.shape or scores.ndim != 2:
        raise ValueError(f"sensor scores {scores.shape} and labelled sensors {truth.shape} must be the same (T, F)")
    if any(p <= 0 for p in ps):
        raise ValueError(f"P must be positive, got {list(ps)}")
    rows = np.flatnonzero(truth.any(axis=1))
    s, g = scores[rows], truth[rows]
    n_cols = scores.shape[1]
    ranked = np.isfinite(s).all(axis=1)
    order = np.argsort(-np.where(np.isfinite(s), s, 0.0), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n_cols)[None, :].repeat(len(rows), axis=0), axis=1)
    n_true = g.sum(axis=1)
    gain = 1.0 / np.log2(np.arange(n_cols) + 2.0)  # rank 0 -> 1, rank 1 -> 1/log2(3), ...
    ideal = np.r_[0.0, np.cumsum(gain)]  # ideal[m]: DCG of m relevant sensors ranked first
    picked = flags is not None
    if picked:
        flags = _as_bool(flags, "flags")
        if len(flags) != len(scores):
            raise ValueError(f"{len(flags)} flags but {len(scores)} rows of sensor scores")
        flagged = flags[rows]
    hits: dict[int, float] = {}
    ndcg: dict[int, float] = {}
    flagged_hits: dict[int, float] = {}
    for p in ps:
        k = np.minimum(np.array([round(p * int(n) / 100) for n in n_true], dtype=np.int64), n_cols)
        top = g & (rank < k[:, None])
        hit = np.where(ranked, top.sum(axis=1) / n_true, 0.0)
        dcg = np.where(top, gain[rank], 0.0).sum(axis=1)
        best = ideal[np.minimum(k, n_true)]
        ndcg_rows = np.where(ranked & (best > 0), dcg / np.where(best > 0, best, 1.0), 0.0)
        hits[p], ndcg[p] = float(hit.sum()), float(ndcg_rows.sum())
        if picked:
            flagged_hits[p] = float(hit[flagged].sum())
    return AttributionCounts(rows=len(rows), hits=hits, ndcg=ndcg,
                             flagged_rows=int(flagged.sum()) if picked else 0, flagged_hits=flagged_hits)


def aggregate_attribution(counts: Iterable[AttributionCounts], ps: Sequence[int] = ATTRIBUTION_PS) -> dict[str, Any]:
    """Pool ``attribution_counts`` over series (a mean over every labelled row, as TranAD's per-row mean):
    ``hit_rate_<P>``, ``ndcg_<P>``, ``hit_rate_<P>_flagged`` (over the labelled rows flagged), None where no
    row counts, and the row counts ``attribution_rows``, ``attribution_flagged_rows``."""
    counts = list(counts)
    rows = sum(c.rows for c in counts)
    flagged = sum(c.flagged_rows for c in counts)
    out: dict[str, Any] = {}
    for p in ps:
        out[f"hit_rate_{p}"] = sum(c.hits[p] for c in counts) / rows if rows else None
        out[f"ndcg_{p}"] = sum(c.ndcg[p] for c in counts) / rows if rows else None
    for p in ps:
        out[f"hit_rate_{p}_flagged"] = sum(c.flagged_hits.get(p, 0.0) for c in counts) / flagged if flagged else None
    out["attribution_rows"], out["attribution_flagged_rows"] = rows, flagged
    return out
