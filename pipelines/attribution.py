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
    return {"errors": result.sensor_errors, "newest": newest, "flags": result.flags,
            "truth": truth if truth is not None else np.zeros(result.sensor_errors.shape, dtype=bool),
            "val_mean": validation.mean(axis=0), "val_std": validation.std(axis=0)}


def evaluate(machines: list[dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Each ranking's pooled HitRate@P%, NDCG@P% and flagged-rows HitRate over ``machines``' signals."""
    return {name: evaluation.aggregate_attribution(
        evaluation.attribution_counts(rank(m), m["truth"], flags=m["flags"]) for m in machines)
        for name, rank in RANKINGS.items()}


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    first = next(iter(rows.values()))
    lines = [f"{first['attribution_rows']} labelled rows ({first['attribution_flagged_rows']} of them flagged)", "",
             "| ranking | HitRate@100% | HitRate@150% | NDCG@100% | NDCG@150% | HitRate@100%, flagged rows |",
             "| --- | --- | --- | --- | --- | --- |"]

    def f(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for name, r in rows.items():
        lines.append(f"| {name} | {f(r['hit_rate_100'])} | {f(r['hit_rate_150'])} | {f(r['ndcg_100'])} | "
                     f"{f(r['ndcg_150'])} | {f(r['hit_rate_100_flagged'])} |")
    return "\n".join(lines)


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
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
