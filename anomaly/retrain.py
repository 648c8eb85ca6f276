"""One retraining cycle with an evaluation gate: the challenger must beat the champion before it serves.

    collect  recent readings of the model's entities from the input topic (bounded per entity by
             ``retrain.max_readings`` and by ``retrain.lookback_s`` on the readings' own ``ts``);
    clean    grid them like the worker does, score them with the champion and drop every flagged
             window plus ``retrain.exclude_margin_rows`` rows on each side (anomalies must not
             become "normal");
    split    the most recent ``retrain.holdout_fraction`` of each entity's clean rows is the hold-out,
             the rest trains;
    train    a challenger with the same job as ``anomaly train`` (``train_job.run_training``), tagged
             with the data it saw, registered with alias ``@challenger``;
    compare  champion and challenger on the same hold-out: mean reconstruction error and the
             false-alarm rate at each one's own threshold (the hold-out is clean, normal data);
    decide   promote only if the challenger's mean error is lower by ``retrain.min_improvement``
             (relative) and its false-alarm rate is not higher by more than
             ``retrain.max_false_alarm_increase``; log both sides, the decision and a plot in an
             MLflow run (tag ``decision=promoted|kept``) and tag the challenger version.

Any failure returns a ``RetrainResult`` with status ``failed`` (the champion alias is moved last, so
it keeps serving); too little data is status ``skipped`` with the reason. Nothing raises out of
``run_cycle`` except KeyboardInterrupt/SystemExit.

The pure parts (``History``, ``exclusion_mask``, ``split_segments``, ``decide``) do no I/O.
Kafka is reached through ``anomaly.kafka_io``, MLflow through ``registry``/``tracking``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from anomaly.codec import BadRecord, Reading
from anomaly.config import Settings

log = logging.getLogger(__name__)

DataTransform = Callable[[np.ndarray], np.ndarray]
HistorySource = Callable[[], Iterable[Reading]]

_POLL_STEP_MS = 200  # short polls, so the idle and total deadlines are kept


# --- result --------------------------------------------------------------------------------------

@dataclass
class RetrainResult:
    """What one cycle did. ``status``: promoted, kept, skipped or failed; ``reason`` says why."""

    status: str
    reason: str
    champion_version: str | None = None
    challenger_version: str | None = None
    comparison_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- history (pure) ------------------------------------------------------------------------------

class History:
    """Recent readings per entity, bounded in memory while a topic streams through.

    Keeps at most ``max_readings`` readings per entity (the latest seen, in arrival order, which is
    offset order within an entity's partition) and drops readings older than ``lookback_s`` before
    the newest ``ts`` seen so far. ``entities`` (when given) limits which entities are kept;
    ``sensors`` (when given) keeps only readings that carry every one of them.
    """

    def __init__(self, max_readings: int, lookback_s: float, entities: Iterable[str] | None = None,
                 sensors: Iterable[str] | None = None) -> None:
        if max_readings < 1 or lookback_s <= 0:
            raise ValueError(f"max_readings must be >= 1 and lookback_s > 0, got {max_readings}, {lookback_s}")
        self.max_readings, self.lookback_s = int(max_readings), float(lookback_s)
        self.entities = frozenset(entities) if entities else None
        self.sensors = tuple(sensors) if sensors else None
        self._by_entity: dict[str, deque[Reading]] = {}
        self.newest_ts = -math.inf
        self.seen = 0  # readings offered
        self.ignored = 0  # readings of other entities / sensor sets

    def add(self, reading: Reading) -> bool:
        """Offer one reading; True if it was kept (for now)."""
        self.seen += 1
        if (self.entities is not None and reading.entity not in self.entities) or (
                self.sensors is not None and not all(s in reading.values for s in self.sensors)):
            self.ignored += 1
            return False
        self.newest_ts = max(self.newest_ts, reading.ts)
        buf = self._by_entity.get(reading.entity)
        if buf is None:
            buf = self._by_entity[reading.entity] = deque(maxlen=self.max_readings)
        buf.append(reading)
        cutoff = self.newest_ts - self.lookback_s
        while buf and buf[0].ts < cutoff:  # cheap pruning at the left; ``frames`` filters exactly
            buf.popleft()
        return reading.ts >= cutoff

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_entity.values())

    def frames(self, sensors: Sequence[str]) -> dict[str, pd.DataFrame]:
        """Per entity: a frame indexed by UTC time (sorted, duplicate ``ts`` keep the last reading),
        one column per sensor (missing values NaN), only readings within ``lookback_s`` of the newest."""
        cutoff = self.newest_ts - self.lookback_s
        out: dict[str, pd.DataFrame] = {}
        for entity in sorted(self._by_entity):
            kept = [r for r in self._by_entity[entity] if r.ts >= cutoff]
            if not kept:
                continue
            index = pd.to_datetime(np.array([r.ts for r in kept], dtype=np.float64), unit="s", utc=True)
            data = np.array([[np.nan if r.values.get(s) is None else r.values[s] for s in sensors] for r in kept],
                            dtype=np.float64).reshape(len(kept), len(sensors))
            frame = pd.DataFrame(data, index=pd.DatetimeIndex(index, name="ts"), columns=list(sensors))
            frame = frame[~frame.index.duplicated(keep="last")].sort_index()
            out[entity] = frame
        return out


# --- anomaly exclusion and hold-out split (pure) -------------------------------------------------

def exclusion_mask(n_rows: int, flagged_end_rows: Sequence[int] | np.ndarray, window_size: int,
                   margin_rows: int) -> np.ndarray:
    """Rows to drop (True) around flagged windows: window ``end - W + 1 .. end`` plus ``margin_rows``
    on each side, clipped to ``0 .. n_rows - 1``."""
    drop = np.zeros(n_rows + 1, dtype=np.int64)
    ends = np.asarray(flagged_end_rows, dtype=np.int64)
    if len(ends) and n_rows:
        starts = np.clip(ends - window_size + 1 - margin_rows, 0, n_rows)
        stops = np.clip(ends + 1 + margin_rows, 0, n_rows)
        np.add.at(drop, starts, 1)
        np.add.at(drop, stops, -1)
    return np.cumsum(drop[:n_rows]) > 0


def runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as ``(start, end)``, end exclusive."""
    edges = np.diff(np.concatenate(([0], np.asarray(keep, dtype=np.int8), [0])))
    return [(int(s), int(e)) for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def split_segments(keep: np.ndarray, holdout_fraction: float,
                   min_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training and hold-out segments of the kept rows: the hold-out is the most recent
    ``holdout_fraction`` of kept rows (a segment crossing the cut is split there); segments shorter
    than ``min_len`` (one window) are left out of both."""
    keep = np.asarray(keep, dtype=bool)
    total = int(keep.sum())
    n_hold = int(math.ceil(total * holdout_fraction))
    if total == 0:
        return [], []
    # The cut is the row at which the last n_hold kept rows begin.
    kept_rows = np.flatnonzero(keep)
    cut = int(kept_rows[total - n_hold]) if n_hold else len(keep)
    train, hold = [], []
    for s, e in runs(keep):
        for a, b, out in ((s, min(e, cut), train), (max(s, cut), e, hold)):
            if b - a >= min_len:
                out.append((a, b))
    return train, hold


# --- the promotion rule (pure) -------------------------------------------------------------------

@dataclass(frozen=True)
class HoldoutMetrics:
    """How one model does on the hold-out (clean, normal data)."""

    mean_error: float  # mean window score (reconstruction error)
    false_alarm_rate: float  # fraction of hold-out windows above the model's own threshold
    p99_error: float
    windows: int

    def to_dict(self) -> dict[str, float]:
        return {"mean_error": self.mean_error, "false_alarm_rate": self.false_alarm_rate,
                "p99_error": self.p99_error, "windows": float(self.windows)}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    relative_improvement: float


def holdout_metrics(scores: np.ndarray, threshold: float) -> HoldoutMetrics:
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    if len(finite) == 0:
        return HoldoutMetrics(math.inf, 1.0, math.inf, len(scores))
    # A non-finite score counts as an alarm: a model that produces them is not better.
    alarms = np.count_nonzero(finite > threshold) + (len(scores) - len(finite))
    return HoldoutMetrics(float(finite.mean()), alarms / len(scores), float(np.quantile(finite, 0.99)), len(scores))


def decide(champion: HoldoutMetrics, challenger: HoldoutMetrics, min_improvement: float,
           max_false_alarm_increase: float) -> Decision:
    """Promote iff the challenger's mean error is lower by at least ``min_improvement`` (relative to
    the champion's) and its false-alarm rate exceeds the champion's by at most
    ``max_false_alarm_increase`` (absolute)."""
    if not math.isfinite(challenger.mean_error):
        return Decision(False, "challenger scores are not finite", -math.inf)
    if not math.isfinite(champion.mean_error) or champion.mean_error <= 0:
        improvement = math.inf if math.isfinite(challenger.mean_error) else 0.0
    else:
        improvement = (champion.mean_error - challenger.mean_error) / champion.mean_error
    far_delta = challenger.false_alarm_rate - champion.false_alarm_rate
    facts = (f"mean error {challenger.mean_error:.4g} vs {champion.mean_error:.4g} "
             f"({improvement:+.1%}, need >= {min_improvement:+.1%}); false alarms {challenger.false_alarm_rate:.4f} "
             f"vs {champion.false_alarm_rate:.4f} (+{max_false_alarm_increase:.4f} allowed)")
    if improvement < min_improvement:
        return Decision(False, f"not better enough: {facts}", improvement)
    if far_delta > max_false_alarm_increase:
        return Decision(False, f"more false alarms: {facts}", improvement)
    return Decision(True, f"better: {facts}", improvement)


# --- reading the input topic ---------------------------------------------------------------------

def topic_readings(bootstrap_servers: str, topic: str, idle_s: float, timeout_s: float,
                   client_options: Mapping[str, Any] | None = None, stats: dict[str, int] | None = None
                   ) -> Iterator[Reading]:
    """Every decodable reading of ``topic`` from the beginning, streamed (nothing is held here).

    No consumer group (assign + seek_to_beginning), nothing committed, the topic is never created.
    Stops after ``idle_s`` without a record or ``timeout_s`` in all: it does not ask the broker where
    the end is (Tansu's end offsets are wrong, DESIGN §5), so it works the same on Apache Kafka.
    Bad records are counted in ``stats["bad"]`` and skipped (the worker dead-letters them).
    """
    from anomaly import codec, kafka_io

    options = kafka_io.consumer_options(bootstrap_servers, None, client_options=client_options)
    options.update(group_id=None, enable_auto_commit=False, allow_auto_create_topics=False)
    stats = stats if stats is not None else {}
    stats.setdefault("records", 0)
    stats.setdefault("bad", 0)
    deadline = time.monotonic() + timeout_s
    consumer = kafka_io.KafkaConsumer(**options)
    try:
        partitions = consumer.partitions_for_topic(topic)
        metadata_deadline = min(deadline, time.monotonic() + max(idle_s, 5.0))  # metadata may lag a moment
        while not partitions and time.monotonic() < metadata_deadline:
            time.sleep(0.1)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            log.warning("topic %s has no partitions (does it exist?)", topic)
            return
        tps = [kafka_io.TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                log.warning("stopped reading %s after %.0f s (retrain.read_timeout_s)", topic, timeout_s)
                break
            if now - last >= idle_s:
                break
            batch = consumer.poll(timeout_ms=int(min(_POLL_STEP_MS, idle_s * 1000)) or 1)
            for records in batch.values():
                if records:
                    last = time.monotonic()
                for record in records:
                    stats["records"] += 1
                    reading = codec.decode_reading(record.value)
                    if isinstance(reading, BadRecord):
                        stats["bad"] += 1
                        continue
                    yield reading
    finally:
        consumer.close(autocommit=False)


# --- the cycle -----------------------------------------------------------------------------------

@dataclass
class _Data:
    """Prepared retraining data: training values and the hold-out segments, per entity."""

    train_values: np.ndarray
    train_timestamps: pd.DatetimeIndex
    holdout: list[np.ndarray]
    facts: dict[str, Any]


def run_cycle(settings: Settings, *, source: HistorySource | None = None, data_transform: DataTransform | None = None,
              progress: bool = False) -> RetrainResult:
    """One retraining cycle (module docstring). ``source`` yields readings (default: the input topic);
    ``data_transform`` is applied to the training values only (tests use it to make a worse challenger)."""
    started = time.monotonic()
    try:
        result = _cycle(settings, source, data_transform, progress)
    except Exception as exc:  # the scheduler must survive anything; the champion was not touched
        log.exception("retrain failed; the champion keeps serving")
        result = RetrainResult("failed", f"{type(exc).__name__}: {exc}")
    result.seconds = round(time.monotonic() - started, 3)
    log.info("retrain %s: %s", result.status, result.reason)
    return result


def _cycle(settings: Settings, source: HistorySource | None, data_transform: DataTransform | None,
           progress: bool) -> RetrainResult:
    from anomaly import registry, tracking

    ml, rt = settings.mlflow, settings.retrain
    tracking.configure(ml.tracking_uri, ml.registry_uri)
    _check_registry()  # an unreachable store is a failure, not "no champion"
    champion_version = registry.alias_version(ml.model_name, ml.champion_alias)
    if champion_version is None:
        return RetrainResult("skipped", f"{ml.model_name} has no @{ml.champion_alias} to compare with; "
                                        "train one first (anomaly train --promote)")
    champion, champion_version = registry.load_detector(ml.model_name, champion_version)
    stats: dict[str, int] = {}
    if source is None:
        k = settings.kafka
        readings: Iterable[Reading] = topic_readings(k.bootstrap_servers, k.input_topic, rt.read_idle_s,
                                                     rt.read_timeout_s, k.client_options, stats)
        origin = f"kafka:{k.input_topic}"
    else:
        readings, origin = source(), "source"
    history = History(rt.max_readings, rt.lookback_s, rt.entities, champion.sensors)
    for reading in readings:
        history.add(reading)
    data = _prepare(history, champion, settings)
    data.facts.update({"readings_seen": history.seen, "bad_records": stats.get("bad", 0), "origin": origin})
    rows, hold_windows = len(data.train_values), sum(len(h) - champion.window_size + 1 for h in data.holdout)
    if rows < rt.min_rows or hold_windows < 1:
        return RetrainResult("skipped", f"too little clean data: {rows} training rows (need {rt.min_rows}), "
                                        f"{max(hold_windows, 0)} hold-out windows (need 1)",
                             champion_version=champion_version, data=data.facts)
    train_values = data.train_values
    if data_transform is not None:
        train_values = np.asarray(data_transform(train_values.copy()), dtype=np.float64)
    from anomaly.preparation import Prepared
    from anomaly.train_job import run_training

    prepared = Prepared(timestamps=data.train_timestamps, values=train_values, sensors=list(champion.sensors),
                        missing=np.zeros(train_values.shape, dtype=bool),
                        period_s=float(champion.period_s or data.facts["period_s"]))
    tags = {"retrain": "true", "retrain.champion_version": champion_version, "retrain.origin": origin,
            **{f"retrain.{k}": v for k, v in data.facts.items() if k != "origin"}}
    outcome = run_training(prepared, settings, source=origin, dataset="retrain", alias=ml.challenger_alias,
                           extra_tags=tags, run_name="retrain-challenger", progress=progress)
    challenger, challenger_version = outcome.detector, outcome.version
    champ = holdout_metrics(_scores(champion, data.holdout), champion.threshold.value)
    chall = holdout_metrics(_scores(challenger, data.holdout), challenger.threshold.value)
    decision = decide(champ, chall, rt.min_improvement, rt.max_false_alarm_increase)
    current = registry.alias_version(ml.model_name, ml.champion_alias)
    if decision.promote and current != champion_version:
        decision = Decision(False, f"@{ml.champion_alias} moved to v{current} during the retrain; not overriding it",
                            decision.relative_improvement)
    metrics = {**{f"champion.{k}": v for k, v in champ.to_dict().items()},
               **{f"challenger.{k}": v for k, v in chall.to_dict().items()},
               "relative_improvement": decision.relative_improvement}
    status = "promoted" if decision.promote else "kept"
    run_id = _log_comparison(settings, champion_version, challenger_version, outcome.run_id, champ, chall,
                             decision, status, data.facts)
    if challenger_version:
        _tag_version(ml.model_name, challenger_version, {"retrain.decision": status,
                                                         "retrain.reason": decision.reason,
                                                         "retrain.comparison_run_id": run_id,
                                                         "retrain.compared_with": champion_version})
        if decision.promote:
            registry.promote(ml.model_name, challenger_version, ml.champion_alias,
                             reason=f"retrain gate: {decision.reason}")
    return RetrainResult(status, decision.reason, champion_version=champion_version,
                         challenger_version=challenger_version, comparison_run_id=run_id,
                         metrics=tracking.finite_metrics(metrics), data=data.facts)


def _prepare(history: History, champion: Any, settings: Settings) -> _Data:
    """Grid each entity's history on the champion's period, drop what the champion flags (plus the
    margin), and split the clean rows into training values and hold-out segments."""
    from anomaly.preparation import prepare_scoring

    rt, w = settings.retrain, champion.window_size
    train_parts: list[np.ndarray] = []
    train_times: list[pd.DatetimeIndex] = []
    holdout: list[np.ndarray] = []
    facts: dict[str, Any] = {"entities": [], "rows": 0, "rows_excluded": 0, "flagged_windows": 0,
                             "train_rows": 0, "holdout_rows": 0, "period_s": champion.period_s}
    starts, ends = [], []
    for entity, frame in history.frames(champion.sensors).items():
        if len(frame) < w:
            log.info("retrain: %s has only %d readings; left out", entity, len(frame))
            continue
        prepared = prepare_scoring(frame, champion.sensors, period_s=champion.period_s, fill=settings.data.fill,
                                   max_fill_steps=settings.data.max_fill_steps)
        values = prepared.values
        scored = champion.score_values(values)
        flagged = scored.end_rows[np.asarray(scored.flags, dtype=bool)]
        drop = exclusion_mask(len(values), flagged, w, rt.exclude_margin_rows)
        train_segs, hold_segs = split_segments(~drop, rt.holdout_fraction, w)
        for a, b in train_segs:
            train_parts.append(values[a:b])
            train_times.append(prepared.timestamps[a:b])
        holdout.extend(values[a:b] for a, b in hold_segs)
        facts["entities"].append(entity)
        facts["rows"] += len(values)
        facts["rows_excluded"] += int(drop.sum())
        facts["flagged_windows"] += len(flagged)
        facts["train_rows"] += sum(b - a for a, b in train_segs)
        facts["holdout_rows"] += sum(b - a for a, b in hold_segs)
        facts["period_s"] = facts["period_s"] or prepared.period_s
        starts.append(prepared.timestamps[0])
        ends.append(prepared.timestamps[-1])
    if starts:
        facts["history_start"], facts["history_end"] = min(starts).isoformat(), max(ends).isoformat()
    facts["entities"] = ",".join(facts["entities"])
    n_features = len(champion.sensors)
    values = np.concatenate(train_parts) if train_parts else np.empty((0, n_features))
    # Segments are concatenated (entities, gaps): the W-1 windows across each seam are a small, known blur.
    times = train_times[0].append(train_times[1:]) if train_times else pd.DatetimeIndex([], tz="UTC")
    return _Data(values, pd.DatetimeIndex(times), holdout, facts)


def _scores(detector: Any, segments: Sequence[np.ndarray]) -> np.ndarray:
    parts = [detector.score_values(seg).scores for seg in segments if len(seg) >= detector.window_size]
    return np.concatenate(parts) if parts else np.empty(0)


def _log_comparison(settings: Settings, champion_version: str, challenger_version: str | None,
                    challenger_run_id: str, champ: HoldoutMetrics, chall: HoldoutMetrics, decision: Decision,
                    status: str, facts: Mapping[str, Any]) -> str:
    """An MLflow run holding both sides, the decision (tag ``decision``) and a comparison plot."""
    from anomaly import plots, tracking

    ml = settings.mlflow
    tags = {"retrain": "true", "kind": "retrain-comparison", "decision": status, "decision.reason": decision.reason,
            "champion.version": champion_version, "challenger.version": challenger_version or "",
            "challenger.run_id": challenger_run_id, "model_name": ml.model_name}
    with tracking.Run(ml.experiment, ml.artifact_location, run_name=f"retrain-compare-{status}", tags=tags) as run:
        run.log_params({"retrain.min_improvement": settings.retrain.min_improvement,
                        "retrain.max_false_alarm_increase": settings.retrain.max_false_alarm_increase,
                        "retrain.holdout_fraction": settings.retrain.holdout_fraction,
                        "retrain.exclude_margin_rows": settings.retrain.exclude_margin_rows})
        run.log_metrics({**{f"champion.{k}": v for k, v in champ.to_dict().items()},
                         **{f"challenger.{k}": v for k, v in chall.to_dict().items()},
                         "relative_improvement": decision.relative_improvement, "promoted": float(decision.promote)})
        shown = ("mean_error", "false_alarm_rate", "p99_error")
        bars = {f"champion v{champion_version}": {k: champ.to_dict()[k] for k in shown},
                f"challenger v{challenger_version}": {k: chall.to_dict()[k] for k in shown}}
        run.log_figure(plots.comparison_bars(bars, f"hold-out comparison: {status}"), "comparison.png")
        run.log_dict({"decision": status, "reason": decision.reason, "champion": champ.to_dict(),
                      "challenger": chall.to_dict(), "data": dict(facts)}, "comparison.json")
        return run.run_id or ""


def _check_registry() -> None:
    from anomaly import registry
    from anomaly.errors import RegistryError

    try:
        registry.client().search_registered_models(max_results=1)
    except Exception as exc:
        raise RegistryError(f"cannot reach the model registry: {exc}") from exc


def _tag_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    from anomaly import registry

    c = registry.client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value)[:5000])
