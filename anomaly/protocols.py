"""The datasets' own evaluation protocols: train on each series' normal part, score the rest, and
compute the metrics the published tables use. No Kafka, no MLflow (callers track the results).

- SKAB: one model per file, trained on its first 400 rows; rows 401..end are scored; point-wise
  F1/FAR/MAR micro-aggregated over the 34 files exactly as SKAB's ``chp_score(metric="binary")``.
- NAB: one model per file, trained on its probationary period; every row gets a score in [0, 1];
  the NAB score (three profiles) at NAB's oracle threshold, and at our own fitted threshold.
- SMD: one model per machine, trained on ``train``, ``test`` scored; point-wise F1 without point
  adjustment at our fitted threshold, plus the best-F1 over thresholds (oracle, for comparison with
  published tables only).
Every dataset also gets event-wise precision/recall/F1 and mean detection delay.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from anomaly import evaluation
from anomaly.calibration import beyond_seen_range_sides, record_ratio, suppress_repeats
from anomaly.novelty import window_novelty
from anomaly.transitions import transition_surprise
from anomaly.config import Settings, build_settings
from anomaly.datasets import SKAB_SENSORS, LabelledSeries
from anomaly.errors import AnomalyError, DataError
from anomaly.detector import Detector
from anomaly.train_job import fit_values
from anomaly.training import TrainResult
from anomaly.preparation import fill_rows_split, select_sensors
from anomaly.scaling import fit_scaler
from anomaly.windowing import rows_from_windows

log = logging.getLogger(__name__)

# SKAB's sensors without its two thermal ones (Temperature, Thermocouple). They drift with the rig's heat
# over a run, further than 400 training rows show, and stay changed after a fault ends: with them the fixed
# threshold raised 35.9 % false alarms, most of them after the faults (README "SKAB: six sensors").
SKAB_THERMAL = ("Temperature", "Thermocouple")
SKAB_PROFILE_SENSORS = tuple(s for s in SKAB_SENSORS if s not in SKAB_THERMAL)

# Per-dataset settings (see README "Benchmarks" for how they were chosen). A --config file, ANOMALY_* and flags override the fields they set.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "skab": {"data": {"scaler": "robust", "sensors": list(SKAB_PROFILE_SENSORS)},
             "model": {"window_size": 10, "hidden_size": 32, "latent_size": 8},
             "training": {"epochs": 80, "batch_size": 32, "patience": 10, "validation_fraction": 0.25},
             "threshold": {"method": "quantile", "q": 0.95, "scale": 1.25}},
    "nab": {"model": {"window_size": 16, "hidden_size": 32, "latent_size": 8},
            "training": {"epochs": 40, "batch_size": 64, "patience": 6, "validation_fraction": 0.2},
            "threshold": {"method": "quantile", "q": 0.99, "scale": 1.0}},
    "smd": {"model": {"window_size": 32, "hidden_size": 64, "latent_size": 16},
            "training": {"epochs": 20, "batch_size": 256, "patience": 4, "validation_fraction": 0.2, "stride": 2},
            "threshold": {"method": "pot", "risk": 0.005, "init_quantile": 0.95}},
}


def profile_settings(dataset: str) -> Settings:
    return build_settings(PROFILES[dataset])


@dataclass
class SeriesResult:
    """Row-aligned results of one series' test part."""

    name: str
    timestamps: np.ndarray
    values: np.ndarray  # (T, F) test rows, original units
    labels: np.ndarray  # (T,) bool
    scores: np.ndarray  # (T,) score of the window ending at each row (NaN where none)
    flags: np.ndarray  # (T,) bool
    expected: np.ndarray  # (T, F) reconstruction of each row (NaN where none)
    threshold: float
    sensors: tuple[str, ...]
    train_seconds: float
    score_seconds: float = 0.0  # wall time of ``Detector.score_values`` over the whole series
    windows_scored: int = 0  # windows in that call
    validation_scores: np.ndarray | None = None  # window scores of the training rows' validation split
    best_epoch: int | None = None  # the epoch whose weights were kept (early stopping)
    bars: np.ndarray | None = None  # (T,) the bar each row's flag was held to (None: ``threshold`` throughout)
    sensor_errors: np.ndarray | None = None  # (T, F) per-sensor error of the window ending at each row (scaled units)
    blamed: np.ndarray | None = None  # (T, F) bool: the sensors labelled to blame at each row (SMD), None: not labelled


@dataclass
class ProtocolResult:
    dataset: str
    metrics: dict[str, Any]
    series: list[SeriesResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.dataset, **self.metrics, "seconds": round(self.seconds, 1)}


@dataclass
class FittedSeries:
    """A series' detector, fitted on its training rows, and the readings it reads (gap-filled)."""

    detector: Detector
    values: np.ndarray  # (T, F) every row, the sensors read, filled (no test value fills a training row)
    sensors: tuple[str, ...]
    fitted: TrainResult
    validation_scores: np.ndarray
    train_seconds: float


def fit_series(series: LabelledSeries, settings: Settings) -> FittedSeries:
    """Fit a detector on ``series``' training rows (the sensors ``data.sensors`` names, in that order);
    a series it cannot train on raises ``DataError`` naming it."""
    frame = select_sensors(series.frame, settings.data.sensors, source=f"{series.name} (data.sensors)")
    values = fill_rows_split(frame.to_numpy(dtype=np.float64), series.train_rows)  # no test value fills a training row
    sensors = tuple(str(c) for c in frame.columns)
    started = time.perf_counter()
    try:
        detector, fitted, validation_scores = fit_values(values[: series.train_rows], sensors, settings)
    except (AnomalyError, ValueError) as exc:  # which of 34 or 58 files it was
        raise DataError(f"{series.name}: cannot train on its {series.train_rows} training rows: {exc}") from exc
    return FittedSeries(detector, values, sensors, fitted, np.asarray(validation_scores), time.perf_counter() - started)


def score_series(series: LabelledSeries, settings: Settings, score_from: int | None = None) -> SeriesResult:
    """Fit on ``series``' training rows, score every window, return the rows from ``score_from``
    (default: the first test row); ``fit_series`` then ``score_fitted``."""
    return score_fitted(series, fit_series(series, settings), score_from)


def score_fitted(series: LabelledSeries, fit: FittedSeries, score_from: int | None = None) -> SeriesResult:
    """Score every window of ``series`` with its fitted detector, return the rows from ``score_from``
    (default: the first test row). Windows may reach back into training rows: a stream has that past.
    Flags are the threshold's ``series_flags`` over the returned rows, so an adaptive rule's history
    starts there, as a worker's would when the model is deployed."""
    detector, values, sensors, fitted = fit.detector, fit.values, fit.sensors, fit.fitted
    started = time.perf_counter()
    scored = detector.score_values(values)
    score_seconds = time.perf_counter() - started
    n, w = len(values), detector.window_size
    scores = rows_from_windows(scored.scores, n, w)
    expected = rows_from_windows(scored.expected, n, w)
    sensor_errors = rows_from_windows(scored.sensor_errors, n, w)
    first = series.train_rows if score_from is None else score_from
    labels = np.zeros(n, bool) if series.labels is None else np.asarray(series.labels, bool)
    thr = detector.threshold.value
    bars = detector.threshold.series_bars(scores[first:], window_size=w)
    return SeriesResult(name=series.name, timestamps=np.asarray(series.frame.index)[first:], values=values[first:],
                        labels=labels[first:], scores=scores[first:],
                        flags=scores[first:] > bars, bars=bars, expected=expected[first:],
                        threshold=thr, sensors=sensors, train_seconds=fit.train_seconds, score_seconds=score_seconds,
                        windows_scored=len(scored.scores), validation_scores=fit.validation_scores,
                        best_epoch=fitted.best_epoch, sensor_errors=sensor_errors[first:])


def _events(results: Sequence[SeriesResult]) -> dict[str, Any]:
    """Event-wise figures over ``results``; None for those with nothing to measure."""
    counts = [evaluation.event_metrics(r.labels, r.flags, timestamps=r.timestamps) for r in results]
    events = evaluation.aggregate_events(counts)
    return evaluation.unmeasured(events.to_dict(), events=events)


def _score_all(series: Sequence[LabelledSeries], settings: Settings, progress: Callable[[str], None]) -> list[SeriesResult]:
    results = []
    for s in series:
        progress(s.name)
        results.append(score_series(s, settings))
    return results


def run_skab(series: Sequence[LabelledSeries], settings: Settings, progress: Callable[[str], None] = lambda s: None) -> ProtocolResult:
    started = time.perf_counter()
    results = _score_all(series, settings, progress)
    binary = evaluation.skab_binary_metrics([r.labels for r in results], [r.flags for r in results])
    metrics = evaluation.unmeasured({"f1": binary.f1, "far": binary.far, "mar": binary.mar,
                                     "precision": binary.tp / max(binary.tp + binary.fp, 1)}, binary)
    metrics.update({**_events(results), "files": len(results), "test_rows": int(sum(len(r.labels) for r in results))})
    metrics["fc1"] = evaluation.composite_f1(metrics.pop("precision"), metrics["event_recall"])
    return ProtocolResult("skab", metrics, results, time.perf_counter() - started)


def all_anomalous(series: Sequence[LabelledSeries]) -> dict[str, Any]:
    """What the trivial detector that flags every test row scores under the SKAB protocol (pure): the
    floor every figure is to be read against (SKAB's README: F1 0.698, FAR 100, MAR 0). Its event F1
    is 1.0 (one correct run over each file finds every event at once), which is why Fc1 is shown."""
    labels = [np.asarray(s.labels, bool)[s.train_rows:] for s in series]
    flags = [np.ones(len(t), bool) for t in labels]
    binary = evaluation.skab_binary_metrics(labels, flags)
    counts = [evaluation.event_metrics(t, p, timestamps=np.asarray(s.frame.index)[s.train_rows:])
              for s, t, p in zip(series, labels, flags)]
    events = evaluation.aggregate_events(counts)
    out = evaluation.unmeasured({"f1": binary.f1, "far": binary.far, "mar": binary.mar, **events.to_dict()},
                                binary, events)
    out["fc1"] = evaluation.composite_f1(binary.tp / max(binary.tp + binary.fp, 1), out["event_recall"])
    return out


NAB_ERROR_HISTORY = 3000  # rows: the newest-step error against the largest of its last 3,000 (record_ratio)
NAB_NOVELTY = {"points": 64, "step": 3}  # window_novelty: 64 readings 3 rows apart (a 190-row window)
NAB_NOVELTY_HISTORY = 1000  # rows: the window novelty against the largest of its last 1,000
NAB_TRANSITION_BINS = 16  # transition_surprise: bins of a change, chosen on NAB (4-32 tried: 67.0-71.0, README)
NAB_TRANSITION_HISTORY = 3000  # rows: the transition surprise against the largest of its last 3,000 (as the error)
NAB_RANGE_TOLERANCE = 0.05  # Numenta's spatial-anomaly tolerance, taken as published (not tuned here)
NAB_REPEAT_ROWS = 100  # an alarm is reported again only when higher than every score of the last 100 rows
NAB_OWN_RATIO = 1.2  # our own alarm level on NAB: 20 % above the largest of the trailing history
NAB_OWN_LEVEL = NAB_OWN_RATIO / (1.0 + NAB_OWN_RATIO)  # the same on record_ratio's [0, 1] scale


def last_step_errors(result: SeriesResult) -> np.ndarray:
    """Per row, the squared error of the newest step of the window ending there (mean over sensors;
    0 before the first window): the part of a window's error that reacts at once."""
    squared = (result.values - result.expected) ** 2  # rows before the first window: NaN (no reconstruction)
    return np.nan_to_num(squared.mean(axis=1), nan=0.0)


def nab_novelty(values: np.ndarray, scale_rows: int) -> np.ndarray:
    """``window_novelty`` (``NAB_NOVELTY``) of ``values`` (T, F), each sensor first standardised by
    the mean and spread of its first ``scale_rows`` rows (the training part: past only; ``fit_scaler``'s
    ``standard`` method, kept in float64)."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        return np.full(0, np.nan)
    x = x.reshape(len(x), -1)
    scaler = fit_scaler(x[:max(1, scale_rows)], [str(j) for j in range(x.shape[1])], "standard")
    return window_novelty((x - np.asarray(scaler.centre)) / np.asarray(scaler.scale), **NAB_NOVELTY)


def nab_transitions(values: np.ndarray, fit_rows: int, bins: int = NAB_TRANSITION_BINS) -> np.ndarray:
    """``transition_surprise`` (``bins`` bins, ``NAB_TRANSITION_BINS`` as shipped) of ``values`` (T, F),
    the bins fitted on the first ``fit_rows`` rows (the training part); all zeros (no surprise, as on a
    first row) for a series too short to have a change."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return np.zeros(len(x))
    return transition_surprise(x, max(2, fit_rows), bins)


def nab_calibrate(errors: np.ndarray, values: np.ndarray | None = None,
                  novelty: np.ndarray | None = None, transitions: np.ndarray | None = None) -> np.ndarray:
    """Per-row signals -> NAB scores in [0, 1]: the errors against the largest of their own trailing
    history (``record_ratio``, ``NAB_ERROR_HISTORY`` rows); with ``novelty`` and ``transitions``, the
    highest of that and each one's own record ratio (``nab_record_scores``); with ``values`` (T, F), a
    row whose value is beyond the range seen so far scores 1; each alarm once (both ``nab_finish``).
    Past only throughout."""
    return nab_finish(nab_record_scores(errors, novelty, transitions), values)


def nab_record_scores(errors: np.ndarray, novelty: np.ndarray | None = None,
                      transitions: np.ndarray | None = None) -> np.ndarray:
    """The first step of NAB's chain: the errors' record ratio (``NAB_ERROR_HISTORY`` rows); with
    ``novelty``, the higher of that and the novelty's record ratio (``NAB_NOVELTY_HISTORY``); with
    ``transitions`` (``nab_transitions``), also their record ratio (``NAB_TRANSITION_HISTORY``). Past only."""
    scores = record_ratio(errors, NAB_ERROR_HISTORY)
    if novelty is not None:
        scores = np.maximum(scores, record_ratio(novelty, NAB_NOVELTY_HISTORY))
    if transitions is not None:
        scores = np.maximum(scores, record_ratio(transitions, NAB_TRANSITION_HISTORY))
    return scores


def nab_finish(scores: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """The last steps of NAB's chain, whatever calibrated ``scores`` in [0, 1]: each alarm once
    (``suppress_repeats``, ``NAB_REPEAT_ROWS``); with ``values`` (T, F), a row beyond the range seen
    so far (``beyond_seen_range_sides``, ``NAB_RANGE_TOLERANCE``) scores 1, each side once per the same
    span on its own: a new low soon after a new high (or after a score's alarm) is a new event, not a
    repeat of it. Past only."""
    out = suppress_repeats(scores, NAB_REPEAT_ROWS)
    if values is not None:
        for side in beyond_seen_range_sides(values, NAB_RANGE_TOLERANCE):
            out = np.maximum(out, suppress_repeats(side.astype(np.float64), NAB_REPEAT_ROWS))
    return out


def nab_calibrated(result: SeriesResult, scale_rows: int) -> np.ndarray:
    """NAB's per-row score in [0, 1]: the newest-step errors (``last_step_errors``), the window novelty
    of the readings (``nab_novelty``, scaled on the first ``scale_rows`` rows), their transition surprise
    (``nab_transitions``, bins fitted on the same rows) and the readings themselves through
    ``nab_calibrate``."""
    return nab_calibrate(last_step_errors(result), result.values, nab_novelty(result.values, scale_rows),
                         nab_transitions(result.values, scale_rows))


def run_nab(series: Sequence[LabelledSeries], settings: Settings, progress: Callable[[str], None] = lambda s: None) -> ProtocolResult:
    """NAB is a streaming benchmark over long, drifting series: a model fitted on the probationary
    period alone would flag every later drift. Its errors are therefore calibrated against their own
    trailing history (``nab_calibrated``: newest-step error and window novelty against the largest of
    their recent past, a value beyond the range seen so far, each alarm once; past only) before NAB
    scores them."""
    started = time.perf_counter()
    results, files = [], []
    own_level = NAB_OWN_LEVEL
    for s in series:
        progress(s.name)
        r = score_series(s, settings, score_from=0)
        calibrated = nab_calibrated(r, s.train_rows)
        r = replace(r, scores=calibrated, flags=calibrated >= own_level, threshold=own_level, bars=None)
        results.append(r)
        files.append(evaluation.NabFile(name=s.name, scores=calibrated, windows=list(s.meta["windows"])))
    oracle = evaluation.nab_scores(files)
    own = evaluation.nab_scores(files, threshold=own_level)
    # Event metrics on the scored part only (after probation), as NAB scores it.
    scored = []
    for s, r in zip(series, results):
        p = s.train_rows
        scored.append(replace(r, timestamps=r.timestamps[p:], values=r.values[p:], labels=r.labels[p:],
                              scores=r.scores[p:], flags=r.flags[p:], expected=r.expected[p:],
                              bars=None if r.bars is None else r.bars[p:],
                              sensor_errors=None if r.sensor_errors is None else r.sensor_errors[p:]))
    metrics = {"nab_standard": oracle["nab_standard"], "nab_low_fp": oracle["nab_low_fp"],
               "nab_low_fn": oracle["nab_low_fn"], "nab_standard_own_threshold": own["nab_standard"],
               "nab_low_fp_own_threshold": own["nab_low_fp"], "nab_low_fn_own_threshold": own["nab_low_fn"],
               **_events(scored), "files": len(results)}
    return ProtocolResult("nab", metrics, scored, time.perf_counter() - started)


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Point-wise F1 at the best threshold over all scores (oracle; for published-table comparison). A row
    without a score (NaN) is never flagged: labelled, it is missed at every threshold. (0.0, inf) when no
    row has a score."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    scored = np.isfinite(scores)
    s = scores[scored]
    if not s.size:
        return 0.0, math.inf
    order = np.argsort(-s, kind="stable")
    y = labels[scored][order].astype(np.int64)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    fn = int(labels.sum()) - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    # Only cut between distinct scores.
    distinct = np.r_[s[order][1:] != s[order][:-1], True]
    f1 = np.where(distinct, f1, -1)
    i = int(np.argmax(f1))
    return float(f1[i]), float(s[order][i])


def attribution(series: Sequence[LabelledSeries], results: Sequence[SeriesResult]) -> dict[str, Any]:
    """How well each row's sensors, ranked by their share of the error (what an event lists), name the
    sensors labelled responsible (SMD's ``interpretation_label``): HitRate@P% and NDCG@P% over every
    labelled row, and HitRate over the labelled rows flagged (``evaluation.attribution_counts``).
    Empty when no series carries such labels."""
    counts = []
    for s, r in zip(series, results):
        truth = blamed(s, r)
        if truth is None or r.sensor_errors is None:
            continue
        # a labelled sensor the model does not read (data.sensors) ranks last: it can never be named
        read = [[str(c) for c in s.frame.columns].index(name) for name in r.sensors]
        scores = np.full(truth.shape, -1.0)
        scores[:, read] = r.sensor_errors
        counts.append(evaluation.attribution_counts(scores, truth, flags=r.flags))
        r.blamed = truth[:, read]  # for the contribution map (evaluation_job)
    return evaluation.aggregate_attribution(counts) if counts else {}


def blamed(series: LabelledSeries, result: SeriesResult) -> np.ndarray | None:
    """(rows of ``result``, every column of ``series.frame``) bool: the sensors SMD's ``interpretation_label``
    blames at each of ``result``'s rows (its last rows of the series); None where the series has none."""
    segments = series.meta.get("interpretation") or []
    if not segments:
        return None
    first = len(series.frame) - len(result.labels)  # the full-frame row of result's first row
    return evaluation.interpretation_matrix(segments, len(result.labels), len(series.frame.columns), offset=first)


def run_smd(series: Sequence[LabelledSeries], settings: Settings, progress: Callable[[str], None] = lambda s: None) -> ProtocolResult:
    started = time.perf_counter()
    results = _score_all(series, settings, progress)
    binary = evaluation.skab_binary_metrics([r.labels for r in results], [r.flags for r in results])
    per_machine_best = [best_f1(r.labels, r.scores)[0] for r in results]
    precision = binary.tp / max(binary.tp + binary.fp, 1)
    recall = binary.tp / max(binary.tp + binary.fn, 1)
    metrics = evaluation.unmeasured({"f1": 2 * precision * recall / max(precision + recall, 1e-12),
                                     "precision": precision, "recall": recall}, binary)
    metrics.update({"f1_best_mean": float(np.mean(per_machine_best)), **_events(results), "machines": len(results)})
    metrics["fc1"] = evaluation.composite_f1(metrics["precision"], metrics["event_recall"])
    metrics.update(attribution(series, results))
    return ProtocolResult("smd", metrics, results, time.perf_counter() - started)


RUNNERS = {"skab": run_skab, "nab": run_nab, "smd": run_smd}


def run_protocol(dataset: str, series: Sequence[LabelledSeries], settings: Settings | None = None,
                 progress: Callable[[str], None] = lambda s: None) -> ProtocolResult:
    return RUNNERS[dataset](series, settings or profile_settings(dataset), progress)


def markdown_report(result: ProtocolResult, settings: Settings) -> str:
    m = result.metrics
    lines = [f"# Evaluation: {result.dataset.upper()}", "",
             f"{len(result.series)} series, {result.seconds:.0f} s.", "", "| metric | value |", "| --- | --- |"]
    for key, value in m.items():
        shown = f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))
        lines.append(f"| `{key}` | {shown} |")
    lines += ["", "## Per series", "", "| series | rows | labelled | flagged | threshold | sensors | train s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.series:
        lines.append(f"| {r.name} | {len(r.labels)} | {int(r.labels.sum())} | {int(r.flags.sum())} | "
                     f"{r.threshold:.4g} | {len(r.sensors)} | {r.train_seconds:.1f} |")
    lines += ["", "## Settings", "", "```", repr(settings.data), repr(settings.model), repr(settings.training),
              repr(settings.threshold), "```", ""]
    return "\n".join(lines)
