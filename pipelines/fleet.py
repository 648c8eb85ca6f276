"""A dataset's series as one fleet: one model shared by every series, each held to the shared threshold
or to its own.

    python -m pipelines.fleet [--dataset smd] [--data-dir DIR] [--json OUT] [--threads N]
        [--min-windows 200]

What ``anomaly train --data`` does with a table of several entities, on a labelled dataset: every
series' training part (its ``train_rows``) goes through ``preparation.prepare_fleet`` (each series gridded
and screened on its own, the sensors fit in every series kept, every series' head then every series'
tail) and ``train_job.fit`` with the dataset's profile (``protocols.PROFILES``), which also fits each
series' own threshold on its validation rows (``threshold.per_entity_min_windows``). Each series' test
part is then scored by that one model and flagged twice: against the shared threshold, and against the
series' own. Figures as the dataset's per-series protocol reports them (SMD: point-wise pooled F1,
precision and recall, per-series F1, the oracle best F1's mean, event-wise F1), beside the per-series
protocol's row from ``results/benchmark.json`` when it is there (one model per series).

No MLflow: the model is not registered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomaly.cli import non_negative_int

log = logging.getLogger("pipelines.fleet")

DATASETS = ("smd",)  # the ones whose series are entities of one asset type (SKAB's files are runs of one rig)


def flag_metrics(labels: Sequence[np.ndarray], flags: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                 timestamps: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Point-wise pooled F1 / precision / recall, each series' F1, the mean of each series' oracle best
    F1 (``protocols.best_f1``) and the event-wise figures (``evaluation``) of ``flags`` against
    ``labels`` (one array per series)."""
    from anomaly import evaluation
    from anomaly.protocols import best_f1

    binary = evaluation.skab_binary_metrics(list(labels), list(flags))
    precision = binary.tp / max(binary.tp + binary.fp, 1)
    recall = binary.tp / max(binary.tp + binary.fn, 1)
    per_series = []
    for y, f in zip(labels, flags):
        tp, fp, fn = int((y & f).sum()), int((~y & f).sum()), int((y & ~f).sum())
        per_series.append(2 * tp / max(2 * tp + fp + fn, 1))
    stamps = timestamps if timestamps is not None else [None] * len(labels)
    events = evaluation.aggregate_events([evaluation.event_metrics(y, f, timestamps=t)
                                          for y, f, t in zip(labels, flags, stamps)]).to_dict()
    return {"f1": 2 * precision * recall / max(precision + recall, 1e-12), "precision": precision, "recall": recall,
            "per_series_f1": per_series, "f1_best_mean": float(np.mean([best_f1(y, s)[0]
                                                                        for y, s in zip(labels, scores)])),
            **events}


def run(dataset: str, data_dir: Path, min_windows: int, progress: bool = True) -> dict[str, Any]:
    """Train the fleet model and score every series (see the module docstring); the figures as a dict."""
    from anomaly import datasets
    from anomaly.preparation import fill_rows_split, prepare_fleet
    from anomaly.protocols import profile_settings
    from anomaly.train_job import fit
    from anomaly.windowing import rows_from_windows

    series = datasets.load_dataset(dataset, data_dir)
    settings = profile_settings(dataset)
    settings = dataclasses.replace(settings, threshold=dataclasses.replace(settings.threshold,
                                                                           per_entity_min_windows=min_windows))
    d = settings.data
    frames = {s.name: s.frame.iloc[: s.train_rows] for s in series}
    prepared = prepare_fleet(frames, settings.model.window_size, settings.training.validation_fraction,
                             sensors=d.sensors, period_s=d.period_s, fill=d.fill, max_fill_steps=d.max_fill_steps,
                             max_missing_fraction=d.max_missing_fraction, outage_steps=settings.worker.max_fill_steps)
    started = time.perf_counter()
    detector, result, _ = fit(prepared, settings, progress=progress, progress_desc=f"{dataset} fleet")
    train_seconds = time.perf_counter() - started
    threshold = detector.threshold
    labels, shared, own, scores, stamps = [], [], [], [], []
    w = detector.window_size
    for s in series:
        frame = s.frame[list(detector.sensors)]
        values = fill_rows_split(frame.to_numpy(dtype=np.float64), s.train_rows)  # no test value fills a training row
        rows = rows_from_windows(detector.score_values(values).scores, len(values), w)[s.train_rows:]
        y = np.asarray(s.labels, dtype=bool)[s.train_rows:]
        finite = np.nan_to_num(rows, nan=-np.inf)
        labels.append(y)
        scores.append(rows)
        stamps.append(np.asarray(s.frame.index)[s.train_rows:])
        shared.append(finite > threshold.value)
        own.append(finite > threshold.value_for(s.name))
    return {"dataset": dataset, "series": [s.name for s in series], "sensors": list(detector.sensors),
            "dropped_sensors": prepared.dropped, "train_rows": len(prepared.values),
            "train_seconds": round(train_seconds, 1), "best_epoch": result.best_epoch,
            "threshold": threshold.value, "own_thresholds": dict(threshold.per_entity),
            "shared": flag_metrics(labels, shared, scores, stamps), "own": flag_metrics(labels, own, scores, stamps)}


def comparable_row(row: dict[str, Any] | None, series: int, where: Path) -> dict[str, Any] | None:
    """The benchmark's per-series row when it covers as many series as this run (a ``--limit`` benchmark
    covers fewer: printed as "the benchmark table's row" it compared different corpora); else None, said."""
    if row is None:
        return None
    covered = row.get("machines", row.get("files"))
    if covered is not None and int(covered) != series:
        log.warning("%s covers %s series, this run %d: its per-series row is not shown beside these", where,
                    covered, series)
        return None
    return row


def table(out: dict[str, Any], per_series_model: dict[str, Any] | None) -> str:
    """The figures as a Markdown table, with the per-series protocol's row when given."""
    lines = ["| model | threshold | F1 | precision | recall | best F1 (*oracle*, mean) | event F1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, what in (("own", "each series' own"), ("shared", "shared")):
        m = out[key]
        lines.append(f"| one for the fleet | {what} | {m['f1']:.3f} | {m['precision']:.2f} | {m['recall']:.2f} | "
                     f"{m['f1_best_mean']:.2f} | {m['event_f1']:.2f} |")
    if per_series_model:
        m = per_series_model
        lines.append(f"| one per series (the benchmark table's row) | its own | {m['f1']:.3f} | {m['precision']:.2f} | "
                     f"{m['recall']:.2f} | {m['f1_best_mean']:.2f} | {m['event_f1']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="smd")
    parser.add_argument("--data-dir", help="the dataset's folder (default $ANOMALY_DATASETS/<name> or "
                                           "../shared/datasets/<name>)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--min-windows", type=int, default=200,
                        help="threshold.per_entity_min_windows: fewest validation windows for a series' own threshold")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from anomaly.cli import default_data_dir
    from anomaly.errors import AnomalyError

    if args.min_windows < 1:
        parser.error("--min-windows: must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        out = run(args.dataset, Path(args.data_dir) if args.data_dir else default_data_dir(args.dataset),
                  args.min_windows, progress=not args.quiet)
    except AnomalyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench = Path("results/benchmark.json")
    per_series = comparable_row(json.loads(bench.read_text()).get("results", {}).get(args.dataset)
                                if bench.is_file() else None, len(out["series"]), bench)
    print(table(out, per_series))
    print(f"\n{len(out['series'])} series, {len(out['sensors'])} sensors ({len(out['dropped_sensors'])} left out: not "
          f"fit to train on in every series), trained in {out['train_seconds']} s; shared threshold "
          f"{out['threshold']:.4g}, own {min(out['own_thresholds'].values(), default=float('nan')):.4g} to "
          f"{max(out['own_thresholds'].values(), default=float('nan')):.4g}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
