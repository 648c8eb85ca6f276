"""SMD: which way of ranking a row's sensors best names the sensors labelled responsible.

    python -m pipelines.attribution [--data-dir DIR] [--machines machine-1-2,...] [--json OUT]

Trains the SMD protocol's model for each machine once (``protocols.fit_series`` with the SMD profile,
on ``train``) and ranks each test row's sensors several ways, scored with SMD's
``interpretation_label`` by HitRate@P% and NDCG@P% (``evaluation.attribution_counts``, pooled over
every labelled row of every machine, as ``anomaly evaluate --dataset smd`` reports them), so the rows
differ only in the ranking:

- **window error** (shipped): each sensor's mean squared reconstruction error over the window ending at
  the row, in scaled units; events rank sensors by their share of it;
- **newest step**: the squared error of the row itself (the window's last step) only;
- **over validation mean**: the window error divided by that sensor's mean window error on the
  validation rows (the last ``training.validation_fraction`` of ``train``): each sensor against its own
  usual error, so a sensor the model always reconstructs poorly stops crowding the others out;
- **validation z-score**: (window error - validation mean) / validation standard deviation.

Then per event, as a worker names them: each run of flagged rows at least ``worker.min_duration_windows``
long (shorter ones never open an event) that overlaps labelled rows is one row, its truth the sensors
labelled anywhere in the run, and its sensors ranked four ways (``EVENT_RANKINGS``):

- **at open**: the window errors of the highest-scoring of the run's first ``min_duration_windows``
  windows (what the event's ``open`` record names);
- **peak window** (shipped): those of the run's highest-scoring window (what its ``close`` record names);
- **whole event, mean share**: each sensor's share of its window's error, averaged over the run's windows;
- **whole event, summed error**: each sensor's window error summed over the run's windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from anomaly import evaluation
from anomaly.cli import default_data_dir
from anomaly.datasets import LabelledSeries, load_smd
from anomaly.protocols import FittedSeries, blamed, fit_series, profile_settings, score_fitted

log = logging.getLogger(__name__)

_EPS = 1e-12


def _window(rows: dict[str, np.ndarray]) -> np.ndarray:
    return rows["errors"]


def _newest(rows: dict[str, np.ndarray]) -> np.ndarray:
    return rows["newest"]


def _over_mean(rows: dict[str, np.ndarray]) -> np.ndarray:
    return rows["errors"] / (rows["val_mean"] + _EPS)


def _z(rows: dict[str, np.ndarray]) -> np.ndarray:
    return (rows["errors"] - rows["val_mean"]) / (rows["val_std"] + _EPS)


RANKINGS: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "window error (shipped)": _window, "newest step": _newest, "over validation mean": _over_mean,
    "validation z-score": _z}


def signals(series: LabelledSeries, fit: FittedSeries, validation_fraction: float) -> dict[str, np.ndarray]:
    """The test rows' per-sensor window errors and newest-step errors (scaled units), the flags, the
    labelled sensors (the protocol's: ``protocols.score_fitted``, ``protocols.blamed``), and each sensor's
    validation mean and standard deviation of its window error."""
    if list(fit.sensors) != [str(c) for c in series.frame.columns]:
        raise ValueError(f"{series.name}: the ablation ranks every sensor; the profile reads {len(fit.sensors)}")
    result = score_fitted(series, fit)
    scale = fit.detector.scaler
    # the reading and its reconstruction at the last step of the window ending on each row (NaN: none ends there)
    newest = (scale.transform(result.values).astype(np.float64) - scale.transform(result.expected)) ** 2
    training = fit.detector.score_values(fit.values[:series.train_rows]).sensor_errors
    validation = training[int(len(training) * (1 - validation_fraction)):]
    truth = blamed(series, result)
    return {"errors": result.sensor_errors, "newest": newest, "flags": result.flags, "scores": result.scores,
            "truth": truth if truth is not None else np.zeros(result.sensor_errors.shape, dtype=bool),
            "val_mean": validation.mean(axis=0), "val_std": validation.std(axis=0)}


def _at_open(errors: np.ndarray, scores: np.ndarray, opened: int) -> np.ndarray:
    return errors[int(np.argmax(scores[:opened]))]


def _peak(errors: np.ndarray, scores: np.ndarray, opened: int) -> np.ndarray:
    return errors[int(np.argmax(scores))]


def _mean_share(errors: np.ndarray, scores: np.ndarray, opened: int) -> np.ndarray:
    return (errors / np.maximum(errors.sum(axis=1, keepdims=True), _EPS)).mean(axis=0)


def _summed(errors: np.ndarray, scores: np.ndarray, opened: int) -> np.ndarray:
    return errors.sum(axis=0)


EVENT_RANKINGS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "at open": _at_open, "peak window (shipped)": _peak, "whole event, mean share": _mean_share,
    "whole event, summed error": _summed}


def event_rows(m: dict[str, np.ndarray], min_duration: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per ranking, the (events, F) sensor scores and truth of the machine's events (module docstring):
    runs of ``m["flags"]`` at least ``min_duration`` rows long that hold a labelled sensor."""
    starts, ends = evaluation.true_runs(m["flags"])
    chosen = [(a, b) for a, b in zip(starts, ends) if b - a >= min_duration and m["truth"][a:b].any()]
    n_cols = m["truth"].shape[1]
    truth = np.array([m["truth"][a:b].any(axis=0) for a, b in chosen], dtype=bool).reshape(-1, n_cols)
    return {name: (np.array([rank(m["errors"][a:b], m["scores"][a:b], min_duration) for a, b in chosen],
                            dtype=np.float64).reshape(-1, n_cols), truth)
            for name, rank in EVENT_RANKINGS.items()}


def evaluate_events(machines: list[dict[str, np.ndarray]], min_duration: int) -> dict[str, dict[str, Any]]:
    """Each event ranking's HitRate@P% and NDCG@P%, a mean over every event holding a labelled sensor."""
    rows = [event_rows(m, min_duration) for m in machines]
    return {name: evaluation.aggregate_attribution(evaluation.attribution_counts(*r[name]) for r in rows)
            for name in EVENT_RANKINGS}


def evaluate(machines: list[dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Each ranking's pooled HitRate@P%, NDCG@P% and flagged-rows HitRate over ``machines``' signals."""
    return {name: evaluation.aggregate_attribution(
        evaluation.attribution_counts(rank(m), m["truth"], flags=m["flags"]) for m in machines)
        for name, rank in RANKINGS.items()}


_COLUMNS = {"hit_rate_100": "HitRate@100%", "hit_rate_150": "HitRate@150%", "ndcg_100": "NDCG@100%",
            "ndcg_150": "NDCG@150%", "hit_rate_100_flagged": "HitRate@100%, flagged rows"}


def _table(title: str, rows: dict[str, dict[str, Any]], keys: list[str]) -> str:
    lines = [title, "", "| ranking | " + " | ".join(_COLUMNS[k] for k in keys) + " |",
             "| --- |" + " --- |" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if r[k] is None else f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    first = next(iter(rows.values()))
    return _table(f"{first['attribution_rows']} labelled rows ({first['attribution_flagged_rows']} of them flagged)",
                  rows, list(_COLUMNS))


def markdown_events(rows: dict[str, dict[str, Any]], min_duration: int) -> str:
    first = next(iter(rows.values()))
    return _table(f"{first['attribution_rows']} events (runs of at least {min_duration} flagged rows) holding a "
                  "labelled sensor", rows, list(_COLUMNS)[:4])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.attribution", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="the SMD folder (default $ANOMALY_DATASETS/smd or ../shared/datasets/smd)")
    parser.add_argument("--machines", help="comma-separated machines (default: every one with an interpretation_label)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    smd_dir = Path(args.data_dir) if args.data_dir else default_data_dir("smd")
    series = [s for s in load_smd(smd_dir, args.machines.split(",") if args.machines else None)
              if s.meta.get("interpretation")]
    if not series:
        parser.error(f"{smd_dir}: no machine with an interpretation_label file")
    settings = profile_settings("smd")
    machines = []
    for s in series:
        started = time.perf_counter()
        machines.append(signals(s, fit_series(s, settings), settings.training.validation_fraction))
        log.info("%s: trained and scored in %.0f s", s.name, time.perf_counter() - started)
    rows = evaluate(machines)
    min_duration = settings.worker.min_duration_windows
    events = evaluate_events(machines, min_duration)
    print(markdown(rows) + "\n\nPer event:\n\n" + markdown_events(events, min_duration))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "events": events}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
