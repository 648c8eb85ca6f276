"""Logs an evaluation (``anomaly evaluate`` or the benchmark) to MLflow: its metrics, the Markdown
report, an overlay figure of the series with the most labelled anomalies, and the test scores (as a
share of their threshold) of rows labelled normal and anomalous."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from anomaly import plots, tracking
from anomaly.config import Settings
from anomaly.protocols import ProtocolResult, SeriesResult
from anomaly.scoring import sensor_contributions


DISTRIBUTION_SCORES = 200_000  # the score-distribution figure draws at most this many


def relative_scores(series: Sequence[SeriesResult]) -> tuple[np.ndarray, np.ndarray]:
    """Each scored test row's score over the bar its flag was held to (1: the bar; each series has its
    own model, so raw scores of two series are not on one scale), split by its label: (normal, labelled)."""
    normal, labelled = [np.empty(0)], [np.empty(0)]
    for s in series:
        bars = np.full(len(s.scores), s.threshold) if s.bars is None else np.asarray(s.bars, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.asarray(s.scores, dtype=np.float64) / bars
        kept = np.isfinite(ratio) & (bars > 0)
        normal.append(ratio[kept & ~s.labels])
        labelled.append(ratio[kept & s.labels])
    return np.concatenate(normal), np.concatenate(labelled)


def spread_sample(values: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` of ``values``, evenly spaced over all of them (every series of a corpus has its
    share; the first ``most`` were only the first series')."""
    if len(values) <= most:
        return values
    return values[np.linspace(0, len(values) - 1, most).round().astype(np.int64)]


def track_evaluation(result: ProtocolResult, settings: Settings, report_path: Path | None = None,
                     source: str = "") -> str:
    ml = settings.mlflow
    tracking.configure_from(ml)
    tags = {"kind": "evaluation", "dataset": result.dataset, "data.source": source,
            "code_version": tracking.code_version()}
    with tracking.Run(ml.experiment, ml.artifact_location, run_name=f"evaluate-{result.dataset}", tags=tags) as run:
        run.log_params({**tracking.flat_params("model", asdict(settings.model)),
                        **tracking.flat_params("training", asdict(settings.training)),
                        **tracking.flat_params("threshold", asdict(settings.threshold))})
        run.log_metrics(result.metrics)
        if report_path is not None:
            run.log_artifact(report_path)
        shown = [r for r in result.series if r.labels.any()] or result.series
        if shown:
            r = max(shown, key=lambda s: int(s.labels.sum()))
            run.log_figure(plots.anomaly_overlay(r.timestamps, r.values, r.sensors, r.scores,
                                                 r.threshold if r.bars is None else r.bars,
                                                 flags=r.flags, labels=r.labels, expected=r.expected),
                           f"overlay-{r.name.replace('/', '_')}.png")
            if r.sensor_errors is not None:
                run.log_figure(plots.contribution_map(r.timestamps, sensor_contributions(r.sensor_errors), r.sensors,
                                                      flags=r.flags, blamed=r.blamed, subject=r.name),
                               f"contributions-{r.name.replace('/', '_')}.png")
            normal, labelled = relative_scores(result.series)
            run.log_figure(plots.error_distribution(
                spread_sample(normal, DISTRIBUTION_SCORES), 1.0, spread_sample(labelled, DISTRIBUTION_SCORES),
                "(each series' own)", names=("rows labelled normal", "rows labelled anomalous"),
                xlabel="score / its series' threshold (above 1: flagged)",
                title="Test scores against their threshold"), "score_distribution.png")
        return run.run_id or ""
