"""The training job shared by ``anomaly train``, ``pipelines/train.py`` and retraining: prepared
data -> fitted detector -> an MLflow run with parameters, per-epoch losses, data range, threshold,
figures -> a registered model version (optionally promoted to ``@champion``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from anomaly import plots, registry, tracking
from anomaly.config import Settings
from anomaly.detector import Detector, fit_detector
from anomaly.errors import ModelError, RegistryError
from anomaly.listing import some
from anomaly.model import ModelConfig
from anomaly.preparation import Prepared
from anomaly.training import TrainConfig, TrainResult
from anomaly.scaling import scale_warnings
from anomaly.thresholds import GROSS_GAP, GROSS_MADS, Threshold, fit_entity_values, no_spread
from anomaly.windowing import rows_from_windows, windows_touching

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    detector: Detector
    result: TrainResult
    run_id: str
    model_uri: str
    version: str | None
    promoted: bool
    metrics: dict[str, float] = field(default_factory=dict)


def train_config(settings: Settings, progress: bool = True) -> TrainConfig:
    t = settings.training
    return TrainConfig(epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                       weight_decay=t.weight_decay, validation_fraction=t.validation_fraction,
                       patience=t.patience, seed=t.seed, device=t.device, mixed_precision=t.mixed_precision,
                       cpu_threads=t.cpu_threads, progress=progress)


SENSORS_TAG_CHARS = 4000  # below MLflow's tag value limits (5,000 for a model version's)


def _listing_tag(names: Sequence[str], what: str, where: str) -> str:
    """``names`` comma-separated, cut to fit a tag (``SENSORS_TAG_CHARS``) with a note of how many and
    where the whole list is."""
    text = ",".join(names)
    if len(text) <= SENSORS_TAG_CHARS:
        return text
    suffix = f",... ({len(names)} {what}; {where} lists them all)"
    return text[: SENSORS_TAG_CHARS - len(suffix)].rsplit(",", 1)[0] + suffix


def sensors_tag(sensors: Sequence[str]) -> str:
    """The sensors a model reads, comma-separated, for the run's and the version's ``data.sensors`` tag;
    cut short (saying how many there are) where the list would not fit a tag."""
    return _listing_tag(sensors, "sensors", "model.json")


def fit_values(values: np.ndarray, sensors, settings: Settings, *, period_s: float | None = None, callbacks=(),
               progress: bool = False, progress_desc: str = "training",
               gaps: np.ndarray | None = None, val_from_row: int | None = None) -> tuple[Detector, TrainResult, np.ndarray]:
    """Fit a detector on gap-free readings (T, F) with the settings' data, model, training and
    threshold sections (``threshold.scale`` applied); ``gaps`` (T,) marks stand-in rows no window may
    touch (``Prepared.gaps``); ``val_from_row``: where validation starts (``fit_detector``)."""
    th = settings.threshold
    config = train_config(settings, progress)
    if settings.training.fast:
        from anomaly.training import fast_train_config

        n_windows = max(0, (len(values) - settings.model.window_size) // settings.training.stride + 1)
        config = fast_train_config(config, None, n_windows, ModelConfig(n_features=len(sensors),
                                                                         **settings.model.model_params()))
    detector, result, val_scores = fit_detector(
        values, sensors, settings.model.model_params(), config,
        threshold_method=th.method, threshold_params=th.policy_params(), scaler_method=settings.data.scaler,
        stride=settings.training.stride, callbacks=callbacks, period_s=period_s, progress_desc=progress_desc,
        gaps=gaps, val_from_row=val_from_row)
    screened = detector.threshold.params.get("screened")
    if screened:
        log.warning("%d validation windows scored more than %.4g (over %g robust standard deviations above the median "
                    "error and %g times every other: a glitch in the validation rows?) were left out of the threshold's "
                    "fit", int(screened), detector.threshold.params["screened_above"], GROSS_MADS, GROSS_GAP)
    if len(val_scores) and no_spread(val_scores):
        log.warning("the validation windows score alike (fewer than 1 %% of %d above their median %.4g): the "
                    "validation rows (the last %.0f %% of the data) look like a machine at standby, and the threshold "
                    "(%.4g) is that one score, so normal running will alarm. Train on data whose last part is normal "
                    "running", len(val_scores), float(np.median(val_scores)), 100 * settings.training.validation_fraction,
                    detector.threshold.value)
    if th.scale != 1.0:
        detector.threshold = type(detector.threshold)(detector.threshold.method, detector.threshold.value * th.scale,
                                                      {**detector.threshold.params, "scale": th.scale})
    rule = th.adaptive_rule()
    if rule.enabled:
        detector.threshold = detector.threshold.with_adaptive(rule)
    episodes = th.episode_rule()
    if episodes.enabled:
        detector.threshold = detector.threshold.with_episodes(episodes)
    return detector, result, val_scores


def validation_row(prepared: Prepared) -> int | None:
    """Where a fleet's validation starts: the first row of its entities' recent parts (``entity_tails``),
    laid after every entity's training part, so each entity trains on its own older rows and validates
    on its recent ones; None for one series (the last ``validation_fraction`` of its windows)."""
    spans = [a for parts in prepared.entity_tails.values() for a, _ in parts]
    return min(spans) if spans else None


def fit(prepared: Prepared, settings: Settings, callbacks=(), progress: bool = True,
        progress_desc: str = "training") -> tuple[Detector, TrainResult, np.ndarray]:
    """Fit a detector on prepared data (see ``fit_values``); for a fleet, with each entity's own
    threshold where it has enough validation windows (``entity_thresholds``)."""
    try:
        detector, result, val_scores = fit_values(prepared.values, prepared.sensors, settings,
                                                  period_s=prepared.period_s, callbacks=callbacks, progress=progress,
                                                  progress_desc=progress_desc, gaps=prepared.gaps,
                                                  val_from_row=validation_row(prepared))
    except (MemoryError, RuntimeError) as exc:  # torch's "can't allocate memory", CUDA's out of memory
        if not isinstance(exc, MemoryError) and "memory" not in str(exc).lower():
            raise
        m, t = settings.model, settings.training
        raise ModelError(f"the model does not fit in memory (model.hidden_size {m.hidden_size}, model.latent_size "
                         f"{m.latent_size}, model.num_layers {m.num_layers}, model.window_size {m.window_size}, "
                         f"training.batch_size {t.batch_size}, {len(prepared.sensors)} sensors, device "
                         f"{t.device}): make it smaller ({str(exc).splitlines()[0][:200]})") from None
    detector.threshold = entity_thresholds(detector, prepared, settings, result.val_start_row)
    return detector, result, val_scores


def entity_thresholds(detector: Detector, prepared: Prepared, settings: Settings,
                      val_start_row: int | None = None) -> Threshold:
    """``detector``'s threshold with per-entity values: the threshold's policy fitted on each entity's
    validation rows (``Prepared.entity_tails``; windows touching a gap left out, and windows starting
    before ``val_start_row``, the first validation window's row (``TrainResult.val_start_row``): the
    network trained on those, where the time-ordered split fell inside the entities' validation
    parts), times ``threshold.scale``, for entities with at least ``threshold.per_entity_min_windows``
    windows there. Unchanged for one series or with the setting at 0. With a moving bar (adaptive or
    episodes) an entity's own value is the base its bar rises from, as the shared one is for the
    others."""
    th, threshold = settings.threshold, detector.threshold
    if not prepared.entity_tails or th.per_entity_min_windows == 0:
        return threshold
    w = detector.window_size
    errors = {}
    for entity, ranges in prepared.entity_tails.items():
        parts = []
        for a, b in ranges:
            if b - a < w:
                continue
            scores = np.asarray(detector.score_values(prepared.values[a:b]).scores, dtype=np.float64)
            keep = np.arange(a, a + len(scores)) >= (val_start_row or 0)  # window i starts on row a + i
            if prepared.gaps is not None:
                keep &= ~windows_touching(prepared.gaps[a:b], w)
            scores = scores[keep]
            parts.append(scores)
        if parts:
            errors[entity] = np.concatenate(parts)
    alike = sorted(entity for entity, e in errors.items() if no_spread(e[np.isfinite(e)]))
    if alike:  # its own threshold would be that one score: held to the shared one, which running data set
        log.warning("%d entities' validation windows score alike (a machine at standby?) and are held to the shared "
                    "threshold instead of their own: %s", len(alike), some(alike, quoted=True))
        errors = {entity: e for entity, e in errors.items() if entity not in alike}
    values = fit_entity_values(errors, th.method, th.policy_params(), th.scale, th.per_entity_min_windows)
    if values:
        spread = np.array(list(values.values())) / threshold.value
        log.info("per-entity thresholds for %d of %d entities: %.3g to %.3g x the shared %.4g (the rest: "
                 "fewer than %d validation windows)", len(values), len(prepared.entity_tails), spread.min(),
                 spread.max(), threshold.value, th.per_entity_min_windows)
    return threshold.with_per_entity(values)


FEW_VALIDATION_WINDOWS = 100  # fewer, and a fitted threshold is mostly chance: said at training


def run_training(prepared: Prepared, settings: Settings, *, source: str, dataset: str = "custom",
                 register: bool = True, promote: bool = False, alias: str | None = None,
                 extra_tags: Mapping[str, Any] | None = None, run_name: str | None = None,
                 progress: bool = True, keep_dir: str | Path | None = None) -> TrainOutcome:
    """Train, log everything to MLflow, register a version; ``promote`` moves ``@champion`` to it,
    ``alias`` sets another alias (e.g. ``challenger``) instead.

    ``keep_dir``: the trained model is kept in a folder under it (``keep_trained``) as soon as it is
    fitted, and removed once it is registered: a tracking server gone during the run (its retries took
    8 minutes, then the model was lost with the run) leaves it there, and the error names the folder,
    which ``register_kept`` (``anomaly models register DIR``) registers later."""
    ml = settings.mlflow
    tracking.configure_from(ml)
    start, end = prepared.timestamps.min(), prepared.timestamps.max()  # a retrain's rows are per entity, not in time order
    data_tags = {"dataset": dataset, "data.source": source, "data.start": start.isoformat(),
                 "data.end": end.isoformat(), "data.rows": len(prepared.values), "code_version": tracking.code_version(),
                 "threshold.adaptive": settings.threshold.rule_description(), "data.sensors": sensors_tag(prepared.sensors)}
    if prepared.entities:
        data_tags["data.entities"] = _listing_tag(prepared.entities, "entities", "data_report.json")
    if prepared.labelled_out:  # ground truth kept these rows (anomalies and their margin) out of training
        data_tags["data.labelled_rows_left_out"] = prepared.labelled_out
    data_tags.update(extra_tags or {})
    # What the run list shows: a name saying what trained, a kind to filter on (as evaluation and
    # retrain-comparison runs have), and a description on the run's page.
    what = f"{len(prepared.entities)} entities of {source}" if prepared.entities else source
    run_tags = {"kind": "train", "mlflow.note.content":
                f"LSTM autoencoder trained on {dataset} data ({what}): {len(prepared.values)} rows of "
                f"{len(prepared.sensors)} sensors, {start.isoformat()} .. {end.isoformat()}.", **data_tags}
    params = {**tracking.flat_params("model", asdict(settings.model)),
              **tracking.flat_params("training", asdict(settings.training)),
              **tracking.flat_params("threshold", asdict(settings.threshold)),
              **tracking.flat_params("data", {k: v for k, v in asdict(settings.data).items()}),
              "data.n_sensors": str(len(prepared.sensors))}
    with tracking.Run(ml.experiment, ml.artifact_location, run_name=run_name or f"train-{dataset}",
                      tags=run_tags) as run:
        run.log_params(params)
        run.log_dict(prepared.report(), "data_report.json")
        run.log_input(prepared.values, prepared.sensors, name=f"{dataset}: {len(prepared.values)} rows", source=source)
        detector, result, val_scores = fit(prepared, settings, callbacks=[tracking.MlflowEpochLogger()],
                                           progress=progress)
        detector.meta = _meta(dataset, source, start, end, len(prepared.values), run.run_id, prepared, result)
        metrics = _metrics(detector, result, val_scores)
        example = registry.input_example(detector, prepared.values)
        kept = None
        if keep_dir is not None:
            aliases = ([alias] if alias else []) + ([ml.champion_alias] if promote and alias != ml.champion_alias
                                                    else [])
            try:
                kept = keep_trained(keep_dir, detector, example, {
                    "dataset": dataset, "source": source, "run_id": run.run_id, "tags": data_tags,
                    "description": version_description(detector, result, dataset, source, start, end,
                                                       len(prepared.values)),
                    "aliases": aliases if register else [], "register": register, "metrics": metrics,
                    "params": params})
            except OSError as exc:  # a read-only folder: the training is not lost for it, only the spare copy
                log.warning("the trained model could not be kept in mlflow.keep_dir (%s): %s; registering it "
                            "without a copy", keep_dir, exc)
        try:
            return _log_and_register(run, settings, prepared, detector, result, val_scores, metrics, example,
                                     dataset, source, start, end, data_tags, register, promote, alias, kept)
        except Exception as exc:
            if kept is None or not kept.exists():  # registered already: the error says what is left to do
                raise
            what = ("registers it once the registry answers" if register else
                    "registers it, should you want it after all (it was trained with --no-register)")
            raise RegistryError(f"{exc}; the trained model is kept in {kept}: `anomaly models register {kept}` "
                                f"{what}") from exc


def _metrics(detector: Detector, result: TrainResult, val_scores: np.ndarray) -> dict[str, float]:
    """The training run's metrics (the drift reference of a version is read from its run's ``val_*``)."""
    metrics = {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
               "batch_size_used": float(result.batch_size),
               "threshold": detector.threshold.value, "train_seconds": result.seconds,
               "val_false_alarm_rate": float(np.mean(val_scores > detector.threshold.value)),
               "val_windows": float(len(val_scores)),
               "val_score_p50": float(np.median(val_scores)), "val_score_p99": float(np.quantile(val_scores, 0.99))}
    if detector.threshold.per_entity:
        metrics["per_entity_thresholds"] = float(len(detector.threshold.per_entity))
    return metrics


def _meta(dataset: str, source: str, start: pd.Timestamp, end: pd.Timestamp, rows: int, run_id: str | None,
          prepared: Prepared, result: TrainResult) -> dict[str, Any]:
    return {"dataset": dataset, "source": source, "data_start": start.isoformat(), "data_end": end.isoformat(),
            "rows": rows, "run_id": run_id, "dropped_sensors": prepared.dropped, **result.summary()}


KEPT_INFO = "registration.json"  # beside a kept model's files: what registering it needs
KEPT_EXAMPLE = "input_example.json"


def keep_trained(keep_dir: str | Path, detector: Detector, example: pd.DataFrame, info: Mapping[str, Any]) -> Path:
    """``detector`` saved in a new folder under ``keep_dir`` (``<dataset>-<UTC time>``), with its input
    example and ``info`` (dataset, source, run id, the version's tags, description and aliases, the run's
    parameters and metrics): what ``register_kept`` needs to register it as the training run would have."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    Path(keep_dir).mkdir(parents=True, exist_ok=True)
    n = 1
    while True:  # a folder of its own, made here: two trainings in the same second do not share one
        folder = Path(keep_dir) / (f"{info.get('dataset', 'model')}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            folder.mkdir()
            break
        except FileExistsError:
            n += 1
    detector.save(folder)
    # plain doubles, as the sensors are: read back by pandas' JSON reader, whole numbers turned into ints
    # and the signature logged from them refused the model's own float input
    (folder / KEPT_EXAMPLE).write_text(json.dumps({"columns": [str(c) for c in example.columns],
                                                   "data": np.asarray(example, dtype=np.float64).tolist()}))
    (folder / KEPT_INFO).write_text(json.dumps(dict(info), indent=2, default=str))
    return folder


def register_kept(folder: str | Path, settings: Settings, alias: str | None = None,
                  reason: str | None = None) -> tuple[str, str]:
    """Register a model ``keep_trained`` kept (a training whose registry went away): logged in a new run
    (tag ``kept_from_run``: the run it was trained in; the training's parameters and metrics, so its
    drift reference is the one the training would have logged), registered with the version tags and
    description it would have had, and given ``alias`` (else the aliases asked of the training:
    ``--promote``, ``--alias``). The folder is removed as soon as the version is registered (an alias
    move that fails then says which version to promote). Returns (version, run id)."""
    folder = Path(folder)
    if not (folder / KEPT_INFO).is_file():
        raise ModelError(f"{folder} holds no model kept by `anomaly train` (no {KEPT_INFO})")
    if not (folder / KEPT_EXAMPLE).is_file():
        raise ModelError(f"{folder} is incomplete: no {KEPT_EXAMPLE} (the input example logged beside the model)")
    detector = Detector.load(folder)
    info = json.loads((folder / KEPT_INFO).read_text())
    doc = json.loads((folder / KEPT_EXAMPLE).read_text())
    example = pd.DataFrame(np.asarray(doc["data"], dtype=np.float64).reshape(-1, len(doc["columns"])),
                           columns=doc["columns"])
    ml = settings.mlflow
    tracking.configure_from(ml)
    aliases = [alias] if alias else [a for a in info.get("aliases") or [] if a]
    tags = {str(k): v for k, v in (info.get("tags") or {}).items()}
    run_tags = {"kind": "train", "kept_from_run": str(info.get("run_id") or ""), **tags,
                "mlflow.note.content": f"registered from {folder}, kept when the registry did not answer at the end "
                                       f"of training run {info.get('run_id')}"}
    with tracking.Run(ml.experiment, ml.artifact_location, run_name=f"register-kept-{info.get('dataset', 'model')}",
                      tags=run_tags) as run:
        if info.get("params"):
            run.log_params(info["params"])
        run.log_metrics(info.get("metrics") or {"threshold": detector.threshold.value})
        run.log_dict(detector.threshold.to_dict(), "threshold.json")
        model_uri = registry.log_detector(detector, example)
        version = str(registry.register(model_uri, ml.model_name, tags=tags,
                                        description=str(info.get("description", ""))))
        shutil.rmtree(folder, ignore_errors=True)  # in the registry: a second `models register` must not add it again
        _move_aliases(ml.model_name, version,
                      [(name, reason or f"registered from a kept folder ({folder.name})") for name in aliases],
                      where=f" from {folder} (the folder is removed)")
        return version, run.run_id or ""


def _move_aliases(model_name: str, version: str, moves: Sequence[tuple[str, str]], where: str = "") -> None:
    """Move each (alias, reason) of ``moves`` to ``version``, just registered: a move that fails says so and
    which version to promote by hand (the version stays registered)."""
    for name, why in moves:
        try:
            registry.promote(model_name, version, name, reason=why)
        except Exception as exc:
            raise RegistryError(f"registered {model_name} v{version}{where}, but moving @{name} failed: {exc}; "
                                f"`anomaly models promote {version} --alias {name}` moves it") from exc


def _log_and_register(run: tracking.Run, settings: Settings, prepared: Prepared, detector: Detector,
                      result: TrainResult, val_scores: np.ndarray, metrics: dict[str, float],
                      example: pd.DataFrame, dataset: str, source: str, start: pd.Timestamp, end: pd.Timestamp,
                      data_tags: Mapping[str, Any], register: bool, promote: bool, alias: str | None,
                      kept: Path | None) -> TrainOutcome:
    """What ``run_training`` does with a fitted detector: log it, its figures and metrics, and register it."""
    ml = settings.mlflow
    if len(val_scores) < FEW_VALIDATION_WINDOWS:
        log.warning("the threshold (%s) rests on only %d validation windows (%d rows, window %d): train on "
                    "more data before promoting this model", settings.threshold.method, len(val_scores),
                    len(prepared.values), settings.model.window_size)
    fitted_on = prepared.values if prepared.gaps is None else prepared.values[~prepared.gaps]
    scale_issues = scale_warnings(fitted_on, detector.scaler)
    for sensor, detail in scale_issues:
        log.warning("sensor %s: %s", sensor, detail)
    if scale_issues:
        run.set_tags({"data.scale_warnings": ", ".join(sensor for sensor, _ in scale_issues)})
        run.log_dict([{"sensor": sensor, "detail": detail} for sensor, detail in scale_issues],
                     "scale_warnings.json")
    run.log_metrics(metrics)
    run.set_tags({"threshold.method": detector.threshold.method, "device": result.device})
    run.log_dict(detector.threshold.to_dict(), "threshold.json")
    _log_figures(run, detector, result, val_scores, prepared)
    model_uri = registry.log_detector(detector, example)
    version = None
    promoted = False
    if register:
        version = registry.register(model_uri, ml.model_name, tags=data_tags,
                                    description=version_description(detector, result, dataset, source,
                                                                    start, end, len(prepared.values)))
        if kept is not None:  # in the registry: `models register` must not add it a second time
            shutil.rmtree(kept, ignore_errors=True)
        _move_aliases(ml.model_name, version,
                      ([(alias, "set at training")] if alias and not (promote and alias == ml.champion_alias)
                       else []) + ([(ml.champion_alias, "promoted at training (--promote)")] if promote else []))
        promoted = promote or alias == ml.champion_alias  # --alias champion promotes too
    log.info("run %s: val loss %.4g, threshold %.4g (%s), registered %s", run.run_id, result.best_val_loss,
             detector.threshold.value, detector.threshold.method,
             f"{ml.model_name} v{version}" if version else "no")
    if kept is not None:
        shutil.rmtree(kept, ignore_errors=True)  # registered (or logged, --no-register): not needed any more
    return TrainOutcome(detector, result, run.run_id or "", model_uri, version, promoted, metrics)


def version_description(detector: Detector, result: TrainResult, dataset: str, source: str,
                        start: pd.Timestamp, end: pd.Timestamp, rows: int) -> str:
    """What a model version's page in the registry says about it: data, shape and the figures a person
    compares versions by (the validation loss and the threshold the worker will hold windows to)."""
    th = detector.threshold
    entities = f"; its own threshold for {len(th.per_entity)} entities" if th.per_entity else ""
    return (f"LSTM autoencoder on {dataset} ({source}), {start.isoformat()} .. {end.isoformat()}: {rows} rows of "
            f"{len(detector.sensors)} sensors, window {detector.window_size}. Best validation loss "
            f"{result.best_val_loss:.4g} (epoch {result.best_epoch}); threshold {th.value:.4g} "
            f"({th.method}){entities}.")


def _log_figures(run: tracking.Run, detector: Detector, result: TrainResult, val_scores: np.ndarray,
                 prepared: Prepared) -> None:
    run.log_figure(plots.loss_curves([h.train_loss for h in result.history], [h.val_loss for h in result.history],
                                     result.best_epoch), "loss_curves.png")
    run.log_figure(plots.error_distribution(val_scores, detector.threshold.value, method=detector.threshold.method),
                   "error_distribution.png")
    # Overlay on the validation tail of the training series: what "normal" reconstruction looks like.
    w = detector.window_size
    most = max(w * 20, 2000)  # rows shown at most
    end = len(prepared.values)
    start = max(0, end - most)
    entity = None
    if prepared.entities and prepared.entity_tails:
        # A fleet: its last entity's own validation rows alone (after a gap in them, a labelled stretch or an
        # outage, where enough rows follow it), held to that entity's own threshold as the worker holds it.
        # Cut only after the last gap of all, a gap at the very end showed the last 2,000 rows: the other
        # entities' rows among them, drawn against this one's bar under its name.
        entity = max(prepared.entity_tails, key=lambda e: prepared.entity_tails[e][-1][1])
        a, end = prepared.entity_tails[entity][-1]
        start = max(a, end - most)
        inside = np.flatnonzero(prepared.gaps[start:end]) if prepared.gaps is not None else np.empty(0, int)
        if len(inside) and end - (start + int(inside[-1]) + 1) >= 2 * w:
            start += int(inside[-1]) + 1
        if end - start < w:
            log.info("validation overlay left out: %s has %d validation rows, under a window", entity, end - start)
            return
    values = prepared.values[start:end]
    scored = detector.score_values(values)
    n = len(values)
    scores = rows_from_windows(scored.scores, n, w)
    expected = rows_from_windows(scored.expected, n, w)
    bars = (detector.threshold.for_entity(entity) if entity is not None else detector.threshold).series_bars(
        scores, window_size=w)
    flags = scores > bars
    stamps = np.asarray(prepared.timestamps[start:end])
    # The sensors that carry the most error first (the one a bad model gets wrong is the one to see), and
    # about where validation starts when the tail reaches back into training rows.
    order = np.argsort(-np.asarray(scored.sensor_errors, dtype=np.float64).mean(axis=0), kind="stable")
    first_val = (result.val_start_row or 0) - start  # rows left out (labelled, gaps) count
    marker = (stamps[first_val], " validation") if 0 < first_val < n else None
    run.log_figure(plots.anomaly_overlay(stamps, values, detector.sensors, scores, bars,
                                         flags=flags, expected=expected, order=order.tolist(), marker=marker,
                                         subject=entity), "validation_overlay.png")


