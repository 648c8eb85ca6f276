"""One retraining cycle with an evaluation gate: the challenger must beat the champion before it serves.

    collect  recent readings of the model's entities from the input topic (bounded per entity by
             ``retrain.max_readings`` and by ``retrain.lookback_s`` on the readings' own ``ts``);
    clean    grid them like the worker does, score them with the champion and drop every flagged
             window plus ``retrain.exclude_margin_rows`` rows on each side (anomalies must not
             become "normal"); an entity whose readings carry ground truth (``retrain.label_field``,
             in the topic's JSON or a ``--data`` file's column) drops its labelled rows plus the
             margin instead: the truth replaces the champion's opinion; operators' verdicts on events
             and periods (``kafka.feedback_topic``, ``anomaly.feedback``) label the readings they cover
             the same way (``normal``: trained on, though the champion flagged it);
    split    the most recent ``retrain.holdout_fraction`` of each entity's clean rows is the hold-out,
             the rest trains;
    train    a challenger with the same job as ``anomaly train`` (``train_job.run_training``), tagged
             with the data it saw, registered with alias ``@challenger``;
    compare  champion and challenger on the same hold-out: mean reconstruction error in ONE unit
             (each model's per-sensor errors converted to the champion's scaler units, so a
             challenger fitted with another scaler is not favoured or penalised by its own
             scaling), the false-alarm rate at each one's own threshold (the hold-out is clean,
             normal data) and, where labels exist, event-wise precision/recall/F1 of each one's
             window flags over the whole labelled hold-out tail (anomalies included);
    decide   ``decide``: keep unless the challenger is better (mean error lower by
             ``retrain.min_improvement``, relative, or, with labelled events in the hold-out,
             event F1 higher by ``retrain.min_event_f1_improvement``, or, with periods labelled an
             anomaly in the history, false alarms on the windows labelled normal fewer by
             ``retrain.min_false_alarm_reduction``), its false-alarm rate is not higher by more than
             ``retrain.max_false_alarm_increase``, its event F1 is not lower by more than
             ``retrain.max_event_f1_decrease`` and its share of the periods labelled an anomaly found
             not by more than ``retrain.max_found_decrease``; log both sides, the decision and a plot
             in an MLflow run (tags ``decision=promoted|kept``, ``trigger``) and tag the challenger.

Any failure returns a ``RetrainResult`` with status ``failed`` (the champion alias is moved last, so
it keeps serving); too little data is status ``skipped`` with the reason. Nothing raises out of
``run_cycle`` except KeyboardInterrupt/SystemExit.

The pure parts (``History``, ``split_segments``, ``decide``; ``windowing.exclusion_mask``) do no I/O.
Kafka is reached through ``anomaly.kafka_io``, MLflow through ``registry``/``tracking``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import heapq
import math
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from anomaly import feedback
from anomaly.codec import BadRecord, Reading
from anomaly.listing import added_removed, some
from anomaly.config import RetrainSettings, Settings
from anomaly.entity_filter import EntityFilter
from anomaly.evaluation import EventMetrics, aggregate_events, event_metrics
from anomaly.preparation import epoch_seconds, labels_on_grid
from anomaly.redaction import masked
from anomaly.tables import parse_label  # ground truth of records and table cells alike
from anomaly.windowing import exclusion_mask, windows_touching

log = logging.getLogger(__name__)

DataTransform = Callable[[np.ndarray], np.ndarray]
Labelled = tuple[Reading, "bool | None"]  # a reading and its ground truth (None: not labelled)
HistorySource = Callable[[], Iterable["Reading | Labelled"]]

LABEL_COLUMN = "__label__"  # the ground-truth column ``History.frames`` adds for labelled entities

_POLL_STEP_MS = 200  # short polls, so the idle and total deadlines are kept
FIRST_RECORD_WAIT_S = 10.0  # the idle allowance before the first record (retrain.read_idle_s after it)


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

_COMPACT_AT = 4096  # readings let go at the left of a buffer before its arrays are shifted down
OTHER_SETS_KEPT = 10_000  # entities whose readings of another sensor set are remembered (``sensor_set_changes``)


class _Buffer:
    """One entity's readings in arrival order, compact: each ``ts`` and value a double in a flat array
    (NaN for a value left null), each label a byte (-1 none, 0 normal, 1 anomaly): 8 x (1 + sensors) + 1
    bytes a reading, where ``Reading`` objects held 763 (a 2,000-asset fleet at ``max_readings``
    50,000 would have needed 71 GiB). ``columns``: the sensors kept, in order; None (a ``History`` not
    told its sensors): each reading's values dict is kept instead. At most ``maxlen`` readings (the
    latest); those let go at the left are dropped from the arrays in bulk."""

    __slots__ = ("ts", "labels", "values", "columns", "maxlen", "start")

    def __init__(self, maxlen: int, columns: tuple[str, ...] | None) -> None:
        self.ts, self.labels = array("d"), array("b")
        self.values: array | list[Mapping[str, Any]] = array("d") if columns is not None else []
        self.columns, self.maxlen, self.start = columns, maxlen, 0

    def __len__(self) -> int:
        return len(self.ts) - self.start

    @property
    def last_ts(self) -> float:
        return self.ts[-1] if len(self) else -math.inf

    def append(self, reading: Reading, label: bool | None) -> None:
        self.ts.append(reading.ts)
        self.labels.append(-1 if label is None else int(bool(label)))
        if self.columns is None:
            self.values.append(reading.values)  # type: ignore[arg-type]
        else:
            got = reading.values
            self.values.extend([math.nan if got.get(c) is None else got[c] for c in self.columns])  # type: ignore[arg-type]
        if len(self) > self.maxlen:
            self.start += 1
        self._compact()

    def prune(self, cutoff: float) -> None:
        """Let go of the readings at the left stamped before ``cutoff`` (up to the first one that is not)."""
        while self.start < len(self.ts) and self.ts[self.start] < cutoff:
            self.start += 1
        self._compact()

    def _compact(self) -> None:
        k = self.start
        if k >= _COMPACT_AT and 2 * k >= len(self.ts):
            del self.ts[:k]
            del self.labels[:k]
            del self.values[:k * len(self.columns) if self.columns is not None else k]
            self.start = 0

    def readings(self, cutoff: float) -> tuple[np.ndarray, np.ndarray | list[Mapping[str, Any]], np.ndarray]:
        """Those stamped at ``cutoff`` or later: their ``ts``, values ((n, len(columns)) doubles, or the
        values dicts) and labels (NaN none, 0.0 normal, 1.0 anomaly)."""
        ts = np.array(self.ts[self.start:], dtype=np.float64)
        keep = ts >= cutoff
        labels = np.array(self.labels[self.start:], dtype=np.float64)
        labels[labels < 0] = np.nan
        if self.columns is None:
            values: np.ndarray | list[Mapping[str, Any]] = [v for v, k in zip(self.values[self.start:], keep) if k]
        else:
            width = len(self.columns)
            flat = np.array(self.values[self.start * width:], dtype=np.float64)
            values = flat.reshape(len(ts), width)[keep]
        return ts[keep], values, labels[keep]


class History:
    """Recent readings per entity, bounded in memory while a topic streams through.

    Keeps at most ``max_readings`` readings per entity (the latest seen, in arrival order, which is
    offset order within an entity's partition) and drops readings older than ``lookback_s`` before
    the newest ``ts`` seen so far. ``entities`` (when given) limits which entities are kept, and so does
    ``served`` (a predicate: ``worker.entities``);
    ``sensors`` (when given) keeps only readings that carry exactly those (the worker dead-letters a
    reading with any other sensor set, so a model is not retrained on readings it never scored), or,
    with ``exact_sensors=False`` (a table's rows, not a stream), every one of them and maybe more;
    ``ignored_sensors``: sensors a reading may carry besides them, not read (those the champion's training
    left out, ``Detector.ignored_sensors``, as the worker leaves them out). ``partial``
    (``worker.partial_readings``): a reading of some of them will do, as the worker scores it (the others
    missing, as null is), and readings stamped alike are merged in ``frames`` (each sensor's first value),
    as a producer sending a slot's sensors one message each means them.
    ``max_ts`` (when given) leaves out readings stamped after it (the clock plus ``worker.max_future_s``, as the worker
    dead-letters them): one reading stamped years ahead would otherwise put every real one outside the
    lookback.
    """

    def __init__(self, max_readings: int, lookback_s: float, entities: Iterable[str] | None = None,
                 sensors: Iterable[str] | None = None, max_ts: float | None = None,
                 exact_sensors: bool = True, max_entities: int | None = None, window: int = 1,
                 served: Callable[[str], bool] | None = None, ignored_sensors: Iterable[str] = (),
                 partial: bool = False) -> None:
        if max_readings < 1 or lookback_s <= 0:
            raise ValueError(f"max_readings must be >= 1 and lookback_s > 0, got {max_readings}, {lookback_s}")
        self.max_readings, self.lookback_s = int(max_readings), float(lookback_s)
        self.entities = frozenset(entities) if entities else None
        self.served = served  # worker.entities: the entities the workers serve (another asset type's: ignored)
        self.sensors = frozenset(sensors) if sensors else None
        self._columns = tuple(sorted(self.sensors)) if self.sensors is not None else None  # as each buffer keeps them
        self.exact_sensors = exact_sensors
        self.ignored_sensors = frozenset(ignored_sensors) - (self.sensors or frozenset())
        self.partial = bool(partial)
        # entity -> (ts, sensors) of its newest reading of another sensor set (a stream's; bounded)
        self._other_sets: dict[str, tuple[float, frozenset[str]]] = {}
        self.max_ts = max_ts
        self._by_entity: dict[str, _Buffer] = {}
        self.newest_ts = -math.inf
        self.seen = 0  # readings offered
        self.ignored = 0  # readings of other entities / sensor sets
        self.future = 0  # readings stamped after ``max_ts``
        # with no ``entities`` list: past ``max_entities`` held, those with the fewest readings in the lookback go
        # (then the longest silent, then the first seen) down to 90 % of it; ``window``: readings that can train
        self.max_entities = None if self.entities is not None else max_entities
        self.window = int(window)
        self.evicted_entities = 0
        self.evicted_readings = 0
        self.evicted_windowed = 0  # of them, entities that held a window's worth of readings
        self.verdict_readings = {"normal": 0, "anomaly": 0}  # readings operators' verdicts labelled (``frames``)
        self.maintenance_readings = 0  # readings left out for their entity's maintenance (``frames``)

    def add(self, reading: Reading, label: bool | None = None) -> bool:
        """Offer one reading (with its ground truth, if known); True if it was kept (for now)."""
        self.seen += 1
        if (self.entities is not None and reading.entity not in self.entities) or (
                self.served is not None and not self.served(reading.entity)):
            self.ignored += 1
            return False
        if self.sensors is not None and not self._carries(reading):
            if self.partial and not reading.values.keys() - self.ignored_sensors:
                return False  # a part of a slot carrying only a sensor read past: nothing of it to keep
            self.ignored += 1
            if self.exact_sensors and (self.max_ts is None or reading.ts <= self.max_ts) \
                    and reading.ts >= self.newest_ts - self.lookback_s:
                seen = self._other_sets.get(reading.entity)
                if (seen is None and len(self._other_sets) < OTHER_SETS_KEPT) or (seen is not None and reading.ts >= seen[0]):
                    self._other_sets[reading.entity] = (reading.ts, frozenset(reading.values))
            return False
        if self.max_ts is not None and reading.ts > self.max_ts:
            self.future += 1
            return False
        self.newest_ts = max(self.newest_ts, reading.ts)
        cutoff = self.newest_ts - self.lookback_s
        if reading.ts < cutoff:  # late and already outside the lookback: it must not push a kept one out
            return False
        buf = self._by_entity.get(reading.entity)
        if buf is None:
            if self.max_entities is not None and len(self._by_entity) >= self.max_entities:
                self._evict(cutoff)
            buf = self._by_entity[reading.entity] = _Buffer(self.max_readings, self._columns)
        buf.append(reading, label)
        buf.prune(cutoff)  # cheap pruning at the left; ``frames`` filters exactly
        return True

    def _evict(self, cutoff: float) -> None:
        """Down to 90 % of ``max_entities``: the entities with the fewest readings in the lookback first (a
        junk id's one), then the longest silent, then the first seen (dicts keep insertion order)."""
        keep = max(int(self.max_entities * 0.9), 1) - 1  # room for the entity about to come in
        excess = len(self._by_entity) - keep
        if excess <= 0:
            return

        def key(item: tuple[int, tuple[str, _Buffer]]) -> tuple[int, float, int]:
            order, (_, buf) = item
            live = len(buf) if buf.last_ts >= cutoff else 0
            return live, buf.last_ts, order

        gone = heapq.nsmallest(excess, enumerate(self._by_entity.items()), key=key)
        for _, (entity, buf) in gone:
            del self._by_entity[entity]
            self.evicted_entities += 1
            self.evicted_readings += len(buf)
            self.evicted_windowed += len(buf) >= self.window and bool(len(buf)) and buf.last_ts >= cutoff
        if self.evicted_entities == len(gone):  # once a read: the count goes into the cycle's facts
            log.warning("the retrain's read holds more than retrain.max_entities (%d) entities: those with the "
                        "fewest readings let go (a producer sending a new entity id with every reading?)",
                        self.max_entities)

    def sensor_set_changes(self) -> dict[str, tuple[list[str], list[str]]]:
        """Entities whose newest reading (a stream's) carries another sensor set than the one read, newer
        than every reading of theirs kept: entity -> (sensors added, sensors missing), sorted. What their
        producers send now the worker dead-letters, and the retrain cannot follow (it keeps the champion's
        sensors)."""
        out = {}
        cutoff = self.newest_ts - self.lookback_s
        for entity, (ts, keys) in sorted(self._other_sets.items()):
            buf = self._by_entity.get(entity)
            if ts < cutoff or (buf is not None and buf.last_ts >= ts):
                continue  # gone with the lookback, or back on the model's sensors since (or beside it)
            added = sorted(keys - (self.sensors or frozenset()) - self.ignored_sensors)
            missing = [] if self.partial else sorted((self.sensors or frozenset()) - keys)
            if added or missing:
                out[entity] = (added, missing)
        return out

    def _carries(self, reading: Reading) -> bool:
        keys = reading.values.keys()
        if self.ignored_sensors and self.exact_sensors:
            keys = keys - self.ignored_sensors
        if self.partial and self.exact_sensors:
            return bool(keys) and keys <= self.sensors  # type: ignore[operator]
        return keys == self.sensors if self.exact_sensors else keys >= self.sensors  # type: ignore[operator]

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_entity.values())

    def frames(self, sensors: Sequence[str], verdicts: Mapping[str, Sequence[feedback.Period]] | None = None,
               maintenance: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> dict[str, pd.DataFrame]:
        """Per entity: a frame indexed by UTC time (sorted, a repeated ``ts`` keeps its first reading),
        one column per sensor (missing values NaN), only readings within ``lookback_s`` of the newest.
        An entity with at least one labelled reading also gets ``LABEL_COLUMN`` (1.0 anomalous, 0.0
        normal, NaN for a reading without a label). ``verdicts`` (entity -> operators' periods,
        ``feedback.periods``) label the readings they cover that carry no label of their own; how many
        of each kind they labelled is left in ``verdict_readings``. ``maintenance`` (entity -> its periods,
        ``feedback.maintenance``): readings in them are left out (neither normal nor a fault: their slots
        are gaps), counted in ``maintenance_readings``."""
        if self._columns is not None and not set(sensors) <= set(self._columns):
            raise ValueError(f"the history keeps only the sensors it was given ({', '.join(self._columns)}), "
                             f"not {', '.join(sorted(set(sensors) - set(self._columns)))}")
        cutoff = self.newest_ts - self.lookback_s
        out: dict[str, pd.DataFrame] = {}
        self.verdict_readings = {"normal": 0, "anomaly": 0}
        self.maintenance_readings = 0
        for entity in sorted(self._by_entity):
            ts, values, labels = self._by_entity[entity].readings(cutoff)
            if maintenance and maintenance.get(entity):
                out_of = feedback.within(ts, maintenance[entity])
                if out_of.any():
                    self.maintenance_readings += int(out_of.sum())
                    keep = ~out_of
                    ts, labels = ts[keep], labels[keep]
                    values = values[keep] if isinstance(values, np.ndarray) else [v for v, k in zip(values, keep) if k]
            if not len(ts):
                continue
            if verdicts and verdicts.get(entity):
                said = feedback.labels_at(ts, verdicts[entity])
                newly = np.isnan(labels) & ~np.isnan(said)  # a reading's own label stands
                labels[newly] = said[newly]
                self.verdict_readings["anomaly"] += int(np.count_nonzero(labels[newly] > 0))
                self.verdict_readings["normal"] += int(np.count_nonzero(labels[newly] == 0))
            # whole microseconds, as the worker and the tables round them (through floats to ns, a reading
            # half-way between two slots could land on either)
            micros = np.round(ts * 1e6).astype(np.int64)
            index = pd.to_datetime(micros, unit="us", utc=True)
            if isinstance(values, np.ndarray):
                where = {c: k for k, c in enumerate(self._columns or ())}
                data = values[:, [where[sensor] for sensor in sensors]]
            else:
                data = np.array([[np.nan if v.get(s) is None else v[s] for s in sensors] for v in values],
                                dtype=np.float64).reshape(len(ts), len(sensors))
            frame = pd.DataFrame(data, index=pd.DatetimeIndex(index, name="ts"), columns=list(sensors))
            if not np.isnan(labels).all():
                # a label on any reading of a repeated ts marks it, as `anomaly score` counts them
                frame[LABEL_COLUMN] = pd.Series(labels, index=frame.index).groupby(level=0).transform("max").to_numpy()
            if self.partial:  # a slot's sensors sent one message each: one reading, each sensor's first value
                frame = frame.groupby(level=0, sort=True).first()
            else:  # a repeated ts keeps the first reading, as the worker does (a later one is a late duplicate)
                frame = frame[~frame.index.duplicated(keep="first")].sort_index()
            out[entity] = frame
        return out


# --- anomaly exclusion and hold-out split (pure) -------------------------------------------------

def runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as ``(start, end)``, end exclusive."""
    edges = np.diff(np.concatenate(([0], np.asarray(keep, dtype=np.int8), [0])))
    return [(int(s), int(e)) for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def holdout_cut(keep: np.ndarray, holdout_fraction: float) -> int | None:
    """The row at which the most recent ``holdout_fraction`` of kept rows begins (``len(keep)`` when
    that is no row); None when no row is kept."""
    keep = np.asarray(keep, dtype=bool)
    total = int(keep.sum())
    if total == 0:
        return None
    n_hold = int(math.ceil(total * holdout_fraction))
    kept_rows = np.flatnonzero(keep)
    return int(kept_rows[total - n_hold]) if n_hold else len(keep)


def split_segments(keep: np.ndarray, holdout_fraction: float,
                   min_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training and hold-out segments of the kept rows: the hold-out is the most recent
    ``holdout_fraction`` of kept rows (a segment crossing the cut is split there); segments shorter
    than ``min_len`` (one window) are left out of both."""
    keep = np.asarray(keep, dtype=bool)
    cut = holdout_cut(keep, holdout_fraction)
    if cut is None:
        return [], []
    train, hold = [], []
    for s, e in runs(keep):
        for a, b, out in ((s, min(e, cut), train), (max(s, cut), e, hold)):
            if b - a >= min_len:
                out.append((a, b))
    return train, hold


def split_rows(segments: Sequence[tuple[int, int]], tail_fraction: float,
               min_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``segments`` (in time order) cut where the last ``tail_fraction`` of their rows begins: the
    segments before that point and those after it. A segment crossing it is split there, unless a piece
    would be shorter than ``min_len`` (one window): then it goes whole to the side that keeps more of it,
    so no row is lost to the cut. Segments shorter than ``min_len`` are left out."""
    total = sum(b - a for a, b in segments)
    cut_at = total - int(math.ceil(total * tail_fraction))  # rows before the cut, counted over the segments
    head, tail, seen = [], [], 0
    for a, b in segments:
        cut = a + min(max(cut_at - seen, 0), b - a)
        seen += b - a
        if a < cut < b and (cut - a < min_len or b - cut < min_len):
            cut = b if cut - a >= b - cut else a  # too short to split: whole, to the larger side
        for lo, hi, out in ((a, cut, head), (cut, b, tail)):
            if hi - lo >= min_len:
                out.append((lo, hi))
    return head, tail


# --- the promotion rule (pure) -------------------------------------------------------------------

@dataclass(frozen=True)
class HoldoutMetrics:
    """How one model does on the hold-out: alarms over all of its stretch, errors where neither model alarms."""

    mean_error: float  # mean window score (reconstruction error), in the comparison's common unit
    false_alarm_rate: float  # fraction of hold-out windows above the model's own threshold
    p99_error: float
    windows: int

    def to_dict(self) -> dict[str, float]:
        return {"mean_error": self.mean_error, "false_alarm_rate": self.false_alarm_rate,
                "p99_error": self.p99_error, "windows": float(self.windows)}


@dataclass(frozen=True)
class LabelledMetrics:
    """How one model does on readings labelled by operators' verdicts or ``retrain.label_field``: its
    alarms on the windows of the hold-out's stretch that end on a reading labelled normal (the champion's
    alarms there are the false alarms operators said they are), and how many of the history's periods
    labelled an anomaly it alarms on at all (a window ending inside one above its threshold)."""

    false_alarm_rate: float  # of the windows ending on a reading labelled normal; NaN: no such window
    normal_windows: int
    found_rate: float  # of the periods labelled an anomaly; NaN: no such period
    anomaly_periods: int

    def to_dict(self) -> dict[str, float]:
        return {"labelled_normal_false_alarm_rate": self.false_alarm_rate,
                "labelled_normal_windows": float(self.normal_windows),
                "labelled_anomalies_found": self.found_rate,
                "labelled_anomaly_periods": float(self.anomaly_periods)}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    relative_improvement: float


def holdout_metrics(scores: np.ndarray, threshold: float | np.ndarray,
                    comparable: np.ndarray | None = None) -> HoldoutMetrics:
    """``scores`` in the model's own units decide its false alarms (against its own ``threshold``: one
    value, or the bar in force at each window for a threshold with an adaptive rule); ``comparable``
    (the same windows' errors in the comparison's common unit, default ``scores``) give the mean and p99
    error."""
    scores = np.asarray(scores, dtype=np.float64)
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), scores.shape)
    comparable = scores if comparable is None else np.asarray(comparable, dtype=np.float64)
    if comparable.shape != scores.shape:
        raise ValueError(f"comparable errors {comparable.shape} do not match scores {scores.shape}")
    finite = np.isfinite(scores) & np.isfinite(comparable)
    if not finite.any():
        return HoldoutMetrics(math.inf, 1.0, math.inf, len(scores))
    # A non-finite score counts as an alarm: a model that produces them is not better.
    alarms = np.count_nonzero(scores[finite] > threshold[finite]) + int(np.count_nonzero(~finite))
    kept = comparable[finite]
    return HoldoutMetrics(float(kept.mean()), alarms / len(scores), float(np.quantile(kept, 0.99)), len(scores))


def common_unit_errors(sensor_errors: np.ndarray, scale: Sequence[float], reference_scale: Sequence[float]
                       ) -> np.ndarray:
    """Window scores (N,) from per-sensor errors (N, F) measured in a model's scaled units (``scale``),
    re-expressed in another scaler's units (``reference_scale``): the error of sensor f is a mean
    squared difference of values divided by ``scale[f]**2``, so it converts by ``(scale /
    reference_scale)**2``. With equal scales this is the model's own score."""
    factor = (np.asarray(scale, dtype=np.float64) / np.asarray(reference_scale, dtype=np.float64)) ** 2
    return (np.asarray(sensor_errors, dtype=np.float64) * factor).mean(axis=1)


TOLERANCE = 1e-12  # the gate's float slack: +0.005 computed as 0.025 - 0.02 is 0.005000000000000001


def decide(champion: HoldoutMetrics, challenger: HoldoutMetrics, min_improvement: float,
           max_false_alarm_increase: float, *, champion_events: EventMetrics | None = None,
           challenger_events: EventMetrics | None = None, min_event_f1_improvement: float = 0.05,
           max_event_f1_decrease: float = 0.0, champion_labelled: LabelledMetrics | None = None,
           challenger_labelled: LabelledMetrics | None = None, min_false_alarm_reduction: float = 0.5,
           max_found_decrease: float = 0.0) -> Decision:
    """The promotion rule.

    Without labels: promote iff the challenger's mean error is lower by at least ``min_improvement``
    (relative to the champion's) and its false-alarm rate exceeds the champion's by at most
    ``max_false_alarm_increase`` (absolute).

    With event metrics of both (the hold-out held at least one labelled event): "better" is a mean
    error lower by ``min_improvement`` OR an event F1 higher by at least ``min_event_f1_improvement``
    (absolute); and besides the false-alarm bound, the challenger's event F1 may be lower than the
    champion's by at most ``max_event_f1_decrease``: a model that reconstructs better but finds fewer
    of the labelled anomalies is not promoted.

    With labelled readings (``LabelledMetrics`` of both: operators' verdicts, or the label field): where
    the history holds periods labelled an anomaly, the challenger must alarm on a share of them lower
    than the champion's by at most ``max_found_decrease``; and there, alarming on fewer of the hold-out's
    windows labelled normal, by at least ``min_false_alarm_reduction`` of the champion's rate (relative),
    also counts as better. A challenger that learnt an operating point operators called normal
    reconstructs in coarser units, so its mean error alone never showed it better; fewer false alarms
    alone would also favour a model that alarms on nothing, which the labelled anomalies rule out.
    """
    if not math.isfinite(challenger.mean_error):
        return Decision(False, "challenger scores are not finite", -math.inf)
    if not math.isfinite(champion.mean_error):
        improvement = math.inf  # any finite challenger is better
    elif champion.mean_error <= 0:  # a perfect champion: only as perfect a challenger matches it, none beats it
        improvement = 0.0 if challenger.mean_error <= champion.mean_error else -math.inf
    else:
        improvement = (champion.mean_error - challenger.mean_error) / champion.mean_error
    far_delta = challenger.false_alarm_rate - champion.false_alarm_rate
    facts = (f"mean error {challenger.mean_error:.4g} vs {champion.mean_error:.4g} "
             f"({improvement:+.1%}, need >= {min_improvement:+.1%}); false alarms {challenger.false_alarm_rate:.4f} "
             f"vs {champion.false_alarm_rate:.4f} (+{max_false_alarm_increase:.4f} allowed)")
    labelled = champion_events is not None and challenger_events is not None
    f1_delta = challenger_events.f1 - champion_events.f1 if labelled else 0.0  # type: ignore[union-attr]
    if labelled:
        facts += (f"; event F1 {challenger_events.f1:.3f} vs {champion_events.f1:.3f} "  # type: ignore[union-attr]
                  f"(better at >= +{min_event_f1_improvement:.3f}, -{max_event_f1_decrease:.3f} allowed)")
    # each bound includes its own value; TOLERANCE absorbs the rounding of the subtractions that reach it
    champ_lab, chall_lab = champion_labelled, challenger_labelled
    periods = champ_lab is not None and chall_lab is not None and champ_lab.anomaly_periods > 0
    found_delta = chall_lab.found_rate - champ_lab.found_rate if periods else 0.0  # type: ignore[union-attr]
    fewer_false = False
    if (champ_lab is not None and chall_lab is not None and champ_lab.normal_windows > 0
            and champ_lab.false_alarm_rate > 0):
        reduction = (champ_lab.false_alarm_rate - chall_lab.false_alarm_rate) / champ_lab.false_alarm_rate
        fewer_false = periods and reduction >= min_false_alarm_reduction - TOLERANCE
        facts += (f"; false alarms on readings labelled normal {chall_lab.false_alarm_rate:.4f} vs "
                  f"{champ_lab.false_alarm_rate:.4f} ({-reduction:+.1%}, better at <= {-min_false_alarm_reduction:+.1%}"
                  + ("" if periods else ", only where the history holds periods labelled an anomaly to show the "
                                        "challenger still finds them") + ")")
    if periods:
        facts += (f"; labelled anomaly periods found {chall_lab.found_rate:.3f} vs {champ_lab.found_rate:.3f} "  # type: ignore[union-attr]
                  f"of {champ_lab.anomaly_periods} (-{max_found_decrease:.3f} allowed)")  # type: ignore[union-attr]
    better_error = improvement >= min_improvement - TOLERANCE
    better_f1 = labelled and f1_delta >= min_event_f1_improvement - TOLERANCE
    if not (better_error or better_f1 or fewer_false):
        return Decision(False, f"not better enough: {facts}", improvement)
    if far_delta > max_false_alarm_increase + TOLERANCE:
        return Decision(False, f"more false alarms: {facts}", improvement)
    if labelled and f1_delta < -max_event_f1_decrease - TOLERANCE:
        return Decision(False, f"worse event F1: {facts}", improvement)
    if periods and found_delta < -max_found_decrease - TOLERANCE:
        return Decision(False, f"finds fewer labelled anomalies: {facts}", improvement)
    why = "error" if better_error else "event F1" if better_f1 else "fewer false alarms on readings labelled normal"
    return Decision(True, f"better ({why}): {facts}", improvement)


# --- reading the input topic ---------------------------------------------------------------------

def record_label(value: bytes | None, label_field: str | None) -> bool | None:
    """The ``label_field`` of a JSON reading's top level (the codec ignores extra fields), or None.
    The bytes are searched first (for the name as UTF-8 and as JSON's ``\\u`` escapes write it), so
    unlabelled streams pay no second parse."""
    if not value or not label_field or not any(needle in value for needle in _label_needles(label_field)):
        return None
    import json

    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):  # nested too deep: the worker dead-letters it
        return None
    return parse_label(doc.get(label_field)) if isinstance(doc, dict) else None


@functools.lru_cache(maxsize=8)
def _label_needles(label_field: str) -> tuple[bytes, ...]:
    """The label field's name as it may stand in a record's bytes: raw UTF-8, and ASCII-escaped (Python's
    ``json.dumps`` writes ``störung`` as ``st\\u00f6rung``)."""
    import json

    return tuple({f'"{label_field}"'.encode(), json.dumps(label_field).encode()})


def topic_readings(bootstrap_servers: str, topic: str, idle_s: float, timeout_s: float,
                   client_options: Mapping[str, Any] | None = None, stats: dict[str, int] | None = None,
                   label_field: str | None = None, leap_s: float | None = None,
                   ignored: Collection[str] = (), partial: bool = False) -> Iterator[Reading | Labelled]:
    """Every decodable reading of ``topic`` from the beginning, streamed (nothing is held here); a
    reading whose JSON carries ``label_field`` comes as ``(reading, label)``; ``ignored``: sensors read past
    unread and unchecked, as the worker reads past them (``Detector.ignored_sensors``: a dead sensor's
    ``NaN`` or text must not cost the reading).

    No consumer group (assign + seek_to_beginning), nothing committed, the topic is never created.
    It does not ask the broker where the end is (Tansu's end offsets are wrong, DESIGN §5), so it works
    the same on Apache Kafka. A partition is read up to now once one of its records was written after
    the read began (record timestamp, producer's or broker's, at or after the start): it is paused then,
    so live traffic does not keep the read going. Stops when every partition is read up to now, after
    ``idle_s`` without a record (``FIRST_RECORD_WAIT_S`` before the first, if longer) unless a partition
    is known to hold more (its position short of the high watermark of the last fetch, or no fetch of it
    answered yet: a stalled fetch does not end the read), or at ``timeout_s`` in all; then, if a
    partition is still short of its high watermark or its end is unknown, ``stats["truncated"]`` is 1:
    what was read is the topic's OLDEST part, not its recent history (``run_cycle`` skips such a cycle).
    A topic without partitions (it does not exist) sets ``stats["no_topic"]``. Bad records are counted
    in ``stats["bad"]`` and skipped (the worker dead-letters them). With ``leap_s`` (``worker.max_future_s``
    off), a lone leap is left out as the worker dead-letters it (``scoring_step.lone_leaps``: a reading
    more than ``leap_s`` past the clock and its partition's newest, after which the partition goes on from
    before it), counted in ``stats["leaps"]``: one reading stamped years ahead would otherwise put every
    real one outside ``retrain.lookback_s``.
    """
    from anomaly import codec, kafka_io

    options = kafka_io.consumer_options(bootstrap_servers, None, client_options=client_options)
    options.update(group_id=None, enable_auto_commit=False, allow_auto_create_topics=False)
    stats = stats if stats is not None else {}
    stats.setdefault("records", 0)
    stats.setdefault("bad", 0)
    deadline = time.monotonic() + timeout_s
    kafka_io.check_tls_files(options)
    consumer = kafka_io.KafkaConsumer(**options)
    try:
        partitions = consumer.partitions_for_topic(topic)
        metadata_deadline = min(deadline, time.monotonic() + max(idle_s, 5.0))  # metadata may lag a moment
        while not partitions and time.monotonic() < metadata_deadline:
            time.sleep(0.1)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            log.warning("topic %s has no partitions (does it exist?)", topic)
            stats["no_topic"] = 1
            return
        tps = [kafka_io.TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        start_ms = time.time() * 1000.0
        current: set[int] = set()  # partitions read up to a record written after the start
        last = time.monotonic()
        # Before the first record, the first fetch (connections, offset lookups) may take longer than
        # the idle allowance on a loaded box or a far cluster: a retrain that stopped then would skip
        # for "too little data" with a full topic.
        allowance = max(idle_s, FIRST_RECORD_WAIT_S)
        waiting = False  # idle, yet a partition is known to hold more: reading on until the deadline
        newest: dict[int, float] = {}  # per partition, its newest reading's ts (with leap_s)
        held: dict[int, list[tuple[Any, Reading]]] = {}  # per partition, a last reading that leapt, until more come

        def emit(pairs: list[tuple[Any, Reading]]) -> Iterator[Reading | Labelled]:
            for record, reading in pairs:
                label = record_label(record.value, label_field)
                if label is None:
                    yield reading
                else:
                    stats["labelled"] = stats.get("labelled", 0) + 1
                    yield reading, label

        def pending() -> list[Any]:  # partitions not yet read up to a record written after the start
            return [tp for tp in tps if tp.partition not in current]

        while True:
            now = time.monotonic()
            if now >= deadline:
                behind = _behind(consumer, pending())
                if behind:
                    stats["truncated"] = 1
                    log.warning("stopped reading %s after %.0f s (retrain.read_timeout_s) with partitions %s "
                                "behind their end or not fetched: what was read is the topic's oldest part",
                                topic, timeout_s, ",".join(map(str, behind)))
                else:
                    log.info("stopped reading %s after %.0f s (retrain.read_timeout_s), every partition at "
                             "its end as last fetched", topic, timeout_s)
                break
            if len(current) == len(tps):
                break
            if now - last >= allowance:
                behind = _behind(consumer, pending())
                if not behind:
                    break
                if not waiting:
                    waiting = True
                    log.warning("no record of %s for %.0f s, yet partitions %s are behind their end or not "
                                "fetched: reading on until retrain.read_timeout_s", topic, now - last,
                                ",".join(map(str, behind)))
            batch = consumer.poll(timeout_ms=int(min(_POLL_STEP_MS, idle_s * 1000)) or 1)
            for tp, records in batch.items():
                if records:
                    last = time.monotonic()
                    allowance = idle_s
                    if records[-1].timestamp >= start_ms and tp.partition not in current:
                        current.add(tp.partition)
                        consumer.pause(tp)
                decoded = []
                for record in records:
                    stats["records"] += 1
                    reading = codec.decode_reading(record.value, ignored=ignored, partial=partial)
                    if isinstance(reading, BadRecord):
                        stats["bad"] += 1
                    else:
                        decoded.append((record, reading))
                if leap_s is not None:
                    decoded = _without_leaps(held.pop(tp.partition, []) + decoded, tp.partition, newest, held,
                                             leap_s, stats)
                yield from emit(decoded)
        for pairs in held.values():  # a leap with nothing after it cannot be told from a jump: kept, as the worker keeps it
            yield from emit(pairs)
    finally:
        consumer.close(autocommit=False)


def _without_leaps(pairs: list[tuple[Any, Reading]], partition: int, newest: dict[int, float],
                   held: dict[int, list[tuple[Any, Reading]]], leap_s: float, stats: dict[str, int]
                   ) -> list[tuple[Any, Reading]]:
    """One partition's decoded records of a poll (a reading held from its last poll first) without the
    lone leaps (``scoring_step.lone_leaps``, from the clock or the partition's ``newest``, which this
    moves on). A last reading that leaps is ``held`` for the partition's next records: they tell whether
    it is a lone leap or a replay's jump they go on from."""
    from anomaly.scoring_step import lone_leaps

    if not pairs:
        return pairs
    start = max(time.time(), newest.get(partition, -math.inf))
    stamps = np.array([reading.ts for _, reading in pairs], dtype=np.float64)
    leaps, newest_before = lone_leaps(stamps, start, leap_s)
    if leaps.any():
        stats["leaps"] = stats.get("leaps", 0) + int(leaps.sum())
        log.warning("left out %d reading(s) of partition %d stamped more than %.0f s ahead of the clock and the "
                    "partition's newest reading, which the readings after them go on from (the worker "
                    "dead-letters them; worker.max_future_s is off)", int(leaps.sum()), partition, leap_s)
        keep = ~leaps
        pairs, stamps, newest_before = [p for p, k in zip(pairs, keep.tolist()) if k], stamps[keep], newest_before[keep]
    if len(stamps) and stamps[-1] > max(newest_before[-1], start) + leap_s:
        held[partition] = [pairs[-1]]
        pairs, stamps = pairs[:-1], stamps[:-1]
    if len(stamps):
        newest[partition] = max(newest.get(partition, -math.inf), float(stamps.max()))
    return pairs


def _behind(consumer: Any, tps: Sequence[Any]) -> list[int]:
    """Partitions of ``tps`` whose position is short of the high watermark the last fetch reported, or
    whose high watermark is not known (no fetch of it answered: a leader that does not respond may hold
    the whole recent history). One read to its known end is not behind, though not paused: a producer
    whose record timestamps lag the clock keeps its partition from being paused."""
    out = []
    for tp in tps:
        high = consumer.highwater(tp)
        if high is None or consumer.position(tp) < high:
            out.append(tp.partition)
    return out


@dataclass(frozen=True)
class _FileSource:
    """A ``HistorySource`` reading a file (``file_readings``), named ``file:<path>`` in tags."""

    path: str
    settings: Settings

    @property
    def origin(self) -> str:
        return f"file:{self.path}"

    def __call__(self) -> Iterator[Reading | Labelled]:
        return file_readings(self.path, self.settings)


def file_readings(path: str, settings: Settings) -> Iterator[Reading | Labelled]:
    """The rows of a CSV/Parquet wide table as readings, with the file's label column (``retrain.label_field``,
    else ``anomaly``, else ``label``: ``tables.truth_column``) as ground truth. Entities come from ``data.entity_column``; without it every row
    belongs to one entity named after the file."""
    from pathlib import Path

    from anomaly import tables

    d, label_field = settings.data, settings.retrain.label_field
    frame = tables.read_table(path, timestamp_col=d.timestamp_column, entity_col=d.entity_column,
                              labels=(label_field,), timezone=d.timezone)
    label_col = tables.truth_column(frame.columns, label_field)
    readings, _ = tables.split_labels(frame, (*tables.LABEL_COLUMNS, label_field))
    sensors = [c for c in readings.columns if c != tables.ENTITY_COLUMN]
    entities = (readings[tables.ENTITY_COLUMN].to_numpy() if tables.ENTITY_COLUMN in readings.columns
                else np.full(len(readings), Path(path).stem))
    ts = epoch_seconds(readings.index)
    values = readings[sensors].to_numpy(dtype=np.float64)
    labels = frame[label_col].to_numpy() if label_col is not None else None
    for i in range(len(readings)):
        reading = Reading(str(entities[i]), float(ts[i]),
                          {s: (None if not math.isfinite(v) else float(v)) for s, v in zip(sensors, values[i])})
        label = parse_label(labels[i]) if labels is not None else None
        yield (reading, label) if labels is not None else reading


# --- the cycle -----------------------------------------------------------------------------------

@dataclass
class _Data:
    """Prepared retraining data: training values and the hold-out segments, per entity."""

    train_values: np.ndarray
    train_timestamps: pd.DatetimeIndex
    holdout: list[np.ndarray]
    facts: dict[str, Any]
    labelled_tails: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (values, labels) per entity
    holdout_entities: list[str] = field(default_factory=list)  # the entity of each hold-out segment
    tail_entities: list[str] = field(default_factory=list)  # the entity of each labelled tail
    # entity -> row ranges of ``train_values`` holding its validation rows (its own threshold is fitted there)
    entity_tails: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # (T,) bool: the stand-in rows between two parts of ``train_values`` (no window may touch one); None: none
    gaps: np.ndarray | None = None
    # Each entity's rows from the hold-out cut on, what the champion flagged included (outages and labelled
    # anomalies out), and their entities: both models' alarm rates are measured there (``_compare``)
    recent: list[np.ndarray] = field(default_factory=list)
    recent_entities: list[str] = field(default_factory=list)
    # per segment of ``recent``: its rows labelled normal (an operator's verdict, the label field)
    recent_normal: list[np.ndarray] = field(default_factory=list)
    # (values, rows labelled an anomaly, entity) of each entity with such rows, its whole history
    labelled_anomalies: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)

    @property
    def train_rows(self) -> int:
        """Rows of real readings in ``train_values`` (the stand-ins between parts not counted)."""
        return len(self.train_values) - (0 if self.gaps is None else int(self.gaps.sum()))


def run_cycle(settings: Settings, *, source: HistorySource | None = None, data_transform: DataTransform | None = None,
              progress: bool = False, trigger: str = "manual", data_path: str | None = None) -> RetrainResult:
    """One retraining cycle (module docstring). ``source`` yields readings or ``(reading, label)``
    pairs (default: the input topic; ``data_path``: a CSV/Parquet file instead, see ``file_readings``);
    ``data_transform`` is applied to the training values only (tests
    use it to make a worse challenger); ``trigger`` (manual, schedule, drift: ...) is recorded in the
    result, the comparison run and the challenger's tags."""
    started = time.monotonic()
    try:
        if data_path is not None and source is None:
            source = _FileSource(data_path, settings)
        result = _cycle(settings, source, data_transform, progress, trigger)
    except Exception as exc:  # the scheduler must survive anything; the champion was not touched
        log.exception("retrain failed; the champion keeps serving")
        # an MLflow error quotes the tracking URI, user info included: printed by anomaly retrain, logged, tagged
        result = RetrainResult("failed", masked(f"{type(exc).__name__}: {exc}"))
    result.seconds = round(time.monotonic() - started, 3)
    result.data.setdefault("trigger", trigger)
    log.info("retrain (%s) %s: %s", trigger, result.status, result.reason)
    return result


def entities_losing_own_threshold(own: Mapping[str, float] | Iterable[str], fitted: Mapping[str, Any] | Iterable[str],
                                  chosen: Sequence[str] | None) -> list[str]:
    """The entities the champion holds to thresholds of their own (``own``) that a challenger would not
    fit again: not among ``fitted`` (the entities with validation rows in the history, or with a
    threshold of their own in the trained challenger), and among ``chosen`` (``retrain.entities``) when
    that is set (empty: every entity), since leaving an entity out of it says the challenger may go
    without it. Sorted. Pure."""
    fitted = set(fitted)  # one alone: the shared threshold, fitted on its validation rows, is its own
    wanted = set(own) if not chosen else set(own) & set(chosen)
    return sorted(wanted - fitted)


def _left_out(history: History, rt: Any, champion: Any, leaps: int = 0) -> str:
    """What of the readings read did not count, for a skip's reason ('' when all did)."""
    parts = []
    if history.ignored:
        sensors = ", ".join(champion.sensors)
        if history.ignored_sensors:
            sensors += f", besides {', '.join(sorted(history.ignored_sensors))}, which it does not read"
        what = (f"carry exactly the champion's sensors ({sensors}: the worker dead-letters others)"
                if history.exact_sensors and not history.partial else
                f"carry some of the champion's sensors and no other ({sensors}: the worker dead-letters others)"
                if history.exact_sensors else f"carry all of the champion's sensors ({sensors})")
        if rt.entities:
            what += f" or are not of retrain.entities ({', '.join(sorted(rt.entities))})"
        parts.append(f"{history.ignored} of {history.seen} readings read do not {what}")
    if history.future:
        parts.append(f"{history.future} readings are stamped further ahead of the clock than "
                     f"worker.max_future_s and were left out")
    if leaps:
        parts.append(f"{leaps} readings leapt far ahead of their partition, which went on from before them, and "
                     f"were left out (as the worker dead-letters them)")
    return "; " + "; ".join(parts) if parts else ""


def _cycle(settings: Settings, source: HistorySource | None, data_transform: DataTransform | None,
           progress: bool, trigger: str) -> RetrainResult:
    from anomaly import registry, tracking
    from anomaly.errors import RegistryError

    ml, rt = settings.mlflow, settings.retrain
    tracking.configure_from(ml)
    _check_registry()  # an unreachable store is a failure, not "no champion"
    champion_version = registry.alias_version(ml.model_name, ml.champion_alias)
    if champion_version is None:
        return RetrainResult("skipped", f"{ml.model_name} has no @{ml.champion_alias} to compare with; "
                                        "train one first (anomaly train --promote)")
    champion, champion_version = registry.load_detector(ml.model_name, champion_version)
    stats: dict[str, int] = {}
    ahead = settings.worker.max_future_s
    clock_bound = ahead is not None and ahead >= 0
    if source is None:
        from anomaly.scoring_step import LEAP_S

        k = settings.kafka
        readings: Iterable[Reading | Labelled] = topic_readings(
            k.bootstrap_servers, k.input_topic, rt.read_idle_s, rt.read_timeout_s, k.client_options, stats,
            label_field=rt.label_field, leap_s=None if clock_bound else LEAP_S,  # without a clock bound: as the worker
            ignored=getattr(champion, "ignored_sensors", ()), partial=settings.worker.partial_readings)
        origin = f"kafka:{k.input_topic}"
    else:
        readings, origin = source(), str(getattr(source, "origin", "source"))
    history = History(rt.max_readings, rt.lookback_s, rt.entities, champion.sensors,
                      max_ts=time.time() + ahead if clock_bound else None,
                      exact_sensors=source is None,  # a file's other columns are not the champion's: not read
                      max_entities=rt.max_entities, window=champion.window_size,
                      # the workers' entities, on the topic they read (a file's entities are the file's)
                      served=EntityFilter(settings.worker.entities) if settings.worker.entities and source is None
                      else None, ignored_sensors=getattr(champion, "ignored_sensors", ()),
                      partial=settings.worker.partial_readings and source is None)
    for item in readings:
        if isinstance(item, tuple):
            history.add(*item)
        else:
            history.add(item)
    changes = history.sensor_set_changes()
    if changes:
        said = [f"{entity} ({added_removed(added, missing)})" for entity, (added, missing) in changes.items()]
        log.warning("%d entities send another sensor set than the champion's (%s) since their last reading of it: "
                    "the worker dead-letters those readings and a retrain keeps the champion's sensors, so it "
                    "cannot follow them; train a model on their new set (anomaly train --data) and promote it: %s",
                    len(changes), ", ".join(champion.sensors), some(said))
    given = _verdicts(settings) if source is None and not stats.get("no_topic") else []
    pad_s = (max(settings.worker.stride, 1) - 0.5) * float(champion.period_s or 0.0)
    data = _prepare(history, champion, settings, feedback.periods(given, pad_s) if given else None,
                    feedback.maintenance(given, pad_s) if given else None)
    if changes:
        data.facts["sensor_set_changed"] = some(said, 20)
    if given:
        data.facts.update({f"verdicts_{kind}": n for kind, n in feedback.counts(given).items()})
    trained_to = (getattr(champion, "meta", None) or {}).get("data_end")
    if trained_to and "holdout_start" in data.facts:
        # A hold-out inside the champion's own training data (a retrain on the file it was trained on, or on
        # recent readings it was trained on): the champion early-stopped and fitted its threshold there, the
        # challenger did not, so the gate leans to the champion. Said, not refused.
        try:
            overlaps = bool(pd.Timestamp(data.facts["holdout_start"]) <= pd.Timestamp(trained_to))
        except (ValueError, TypeError):  # a champion's meta not written by this package: not said
            pass
        else:
            data.facts["champion_data_end"] = str(trained_to)
            data.facts["holdout_overlaps_champion_data"] = overlaps
    if history.evicted_entities:
        data.facts.update({"entities_evicted": history.evicted_entities, "readings_evicted": history.evicted_readings})
    data.facts.update({"readings_seen": history.seen, "readings_ignored": history.ignored,
                       "readings_future": history.future + stats.get("leaps", 0), "bad_records": stats.get("bad", 0),
                       "origin": origin,
                       "trigger": trigger})
    if stats.get("no_topic"):
        return RetrainResult("skipped", f"the input topic {settings.kafka.input_topic!r} has no partitions on "
                                        f"{settings.kafka.bootstrap_servers} (does it exist? kafka.input_topic "
                                        "names it)", champion_version=champion_version, data=data.facts)
    if stats.get("truncated"):
        return RetrainResult("skipped", f"the input topic was not read to its end within retrain.read_timeout_s "
                                        f"({rt.read_timeout_s:g} s, {history.seen} readings): what was read is "
                                        "its oldest part, not the recent history; raise read_timeout_s or "
                                        "shorten the topic's retention", champion_version=champion_version,
                             data=data.facts)
    if history.evicted_windowed:
        return RetrainResult("skipped", f"more than retrain.max_entities ({rt.max_entities}) entities hold readings: "
                                        f"{history.evicted_windowed} with a window's worth of them had to be let go "
                                        f"(of {history.evicted_entities}), so a challenger would train on part of "
                                        "the fleet: raise it, or name the fleet in retrain.entities",
                             champion_version=champion_version, data=data.facts)
    # The hold-out compares both models on windows ending on the same rows, those the longer window reaches
    # (``_compare``): a segment shorter than it gives no window to compare, so the cycle skips before it
    # trains a challenger that nothing could judge.
    w = settings.model.window_size
    compared = max(champion.window_size, w)
    rows, hold_windows = data.train_rows, sum(max(0, len(h) - compared + 1) for h in data.holdout)
    # the challenger's windows (its own window size) that touch no gap: what it could train on
    from anomaly.training import MIN_TRAIN_WINDOWS

    gaps = data.gaps if data.gaps is not None else np.zeros(len(data.train_values), dtype=bool)
    train_windows = (int(np.count_nonzero(~windows_touching(gaps, w, settings.training.stride)))
                     if len(gaps) >= w else 0)
    if rows < rt.min_rows or hold_windows < 1 or train_windows < MIN_TRAIN_WINDOWS:
        return RetrainResult("skipped", f"too little clean data: {rows} training rows (need {rt.min_rows}), "
                                        f"{train_windows} training windows of {w} (need {MIN_TRAIN_WINDOWS}), "
                                        f"{hold_windows} hold-out windows of {compared} (need 1)"
                                        + _left_out(history, rt, champion, stats.get("leaps", 0)),
                             champion_version=champion_version, data=data.facts)
    unjudged = entities_losing_own_threshold(champion.threshold.per_entity, data.entity_tails, rt.entities)
    if unjudged:
        return RetrainResult("skipped", f"the champion holds {len(unjudged)} entities to thresholds of their own "
                                        f"({some(unjudged)}) that the history has too few clean readings of to fit again "
                                        f"(offline longer than retrain.lookback_s?): a challenger would hold them "
                                        f"to the threshold fitted on the others, and the gate could not judge it "
                                        f"on them. An asset gone for good: leave it out of retrain.entities",
                             champion_version=champion_version, data=data.facts)
    train_values = data.train_values
    if data_transform is not None:
        train_values = np.asarray(data_transform(train_values.copy()), dtype=np.float64)
    from anomaly.preparation import Prepared
    from anomaly.train_job import run_training

    prepared = Prepared(timestamps=data.train_timestamps, values=train_values, sensors=list(champion.sensors),
                        missing=np.zeros(train_values.shape, dtype=bool), gaps=data.gaps,
                        dropped=list(getattr(champion, "ignored_sensors", ())),  # still not read by the challenger
                        period_s=float(champion.period_s or data.facts["period_s"]),
                        entities=list(data.entity_tails) if len(data.entity_tails) > 1 else [],
                        entity_tails=data.entity_tails if len(data.entity_tails) > 1 else {})
    tags = {"retrain": "true", "model_name": ml.model_name, "retrain.champion_version": champion_version,
            "retrain.origin": origin,
            **{f"retrain.{k}": v for k, v in data.facts.items() if k != "origin"}}
    outcome = run_training(prepared, settings, source=origin, dataset="retrain", alias=ml.challenger_alias,
                           extra_tags=tags, run_name="retrain-challenger", progress=progress)
    challenger, challenger_version = outcome.detector, outcome.version
    unit = champion.scaler.scale  # the common unit of the error comparison: the champion's scaler
    window = compared  # both on windows ending on the same rows (the challenger's window is the settings' w)
    # the hold-out's stretch, scored once by both: their alarm rates there (_compare), and on its readings
    # labelled normal (_labelled)
    recent = _joint((champion, challenger), data.recent, data.recent_entities, unit,
                    max(window, champion.window_size, challenger.window_size))
    champ, chall = _compare(champion, challenger, data, unit, window, recent=recent)
    champ_events = _events(champion, data.labelled_tails, data.tail_entities, window)
    chall_events = _events(challenger, data.labelled_tails, data.tail_entities, window)
    labelled = champ_events is not None and champ_events.n_true > 0
    if not labelled:
        champ_events = chall_events = None
    champ_lab, chall_lab = _labelled((champion, challenger), data, unit, window, recent=recent) or (None, None)
    decision = decide(champ, chall, rt.min_improvement, rt.max_false_alarm_increase,
                      champion_events=champ_events, challenger_events=chall_events,
                      min_event_f1_improvement=rt.min_event_f1_improvement,
                      max_event_f1_decrease=rt.max_event_f1_decrease, champion_labelled=champ_lab,
                      challenger_labelled=chall_lab, min_false_alarm_reduction=rt.min_false_alarm_reduction,
                      max_found_decrease=rt.max_found_decrease)
    # Fitted again in the end? An entity with validation rows but fewer windows there than
    # threshold.per_entity_min_windows gets no threshold of its own (one alone: the shared one is its own).
    refitted = set(challenger.threshold.per_entity) | (set(data.entity_tails) if len(data.entity_tails) == 1 else set())
    unjudged = entities_losing_own_threshold(champion.threshold.per_entity, refitted, rt.entities)
    if unjudged:  # said whatever the gate found: it judged only what the hold-out holds
        decision = Decision(False, f"the challenger holds {len(unjudged)} entities the champion holds to thresholds "
                                   f"of their own ({some(unjudged)}) to the shared one: too few of their windows in the "
                                   f"history's validation part (threshold.per_entity_min_windows = "
                                   f"{settings.threshold.per_entity_min_windows}); {decision.reason}",
                            decision.relative_improvement)
    current = registry.alias_version(ml.model_name, ml.champion_alias)
    if decision.promote and current != champion_version:
        decision = Decision(False, f"@{ml.champion_alias} moved to v{current} during the retrain; not overriding it",
                            decision.relative_improvement)
    status = "promoted" if decision.promote else "kept"
    if decision.promote and challenger_version:
        # Moved before the comparison is logged, so the run and the version's tags say what happened.
        # Checked again at the move itself, under the alias's lock: a promotion by hand since the check
        # above is not overridden, and one during the move waits for it (registry.alias_lock).
        try:
            registry.promote(ml.model_name, challenger_version, ml.champion_alias,
                             reason=f"retrain gate: {decision.reason}", expected_previous=champion_version)
        except registry.AliasMoved as exc:
            decision, status = Decision(False, str(exc), decision.relative_improvement), "kept"
            log.warning("retrain: %s", exc)
        except RegistryError as exc:
            decision = Decision(False, f"the gate would promote v{challenger_version} ({decision.reason}), "
                                       f"but the promotion failed: {exc}", decision.relative_improvement)
            status = "failed"
            log.error("retrain: %s", decision.reason)
    metrics = _comparison_metrics(champ, chall, champ_events, chall_events, decision, champ_lab, chall_lab)
    try:
        run_id = _log_comparison(settings, champion_version, challenger_version, outcome.run_id, metrics,
                                 decision, status, data.facts, verdicts=given)
        if challenger_version:
            _tag_version(ml.model_name, challenger_version, {"retrain.decision": status, "retrain.trigger": trigger,
                                                             "retrain.reason": decision.reason,
                                                             "retrain.comparison_run_id": run_id,
                                                             "retrain.compared_with": champion_version})
    except Exception as exc:
        if status != "promoted":
            raise
        # the move, which the workers follow, happened: saying the retrain failed would be wrong
        log.warning("retrain: promoted v%s, but its comparison could not be logged: %s", challenger_version, exc)
        run_id = ""
    return RetrainResult(status, decision.reason, champion_version=champion_version,
                         challenger_version=challenger_version, comparison_run_id=run_id,
                         metrics=tracking.finite_metrics(metrics), data=data.facts)


def _verdicts(settings: Settings) -> list[feedback.Verdict]:
    """The operators' verdicts in force on ``kafka.feedback_topic`` (none when it is off or does not exist)."""
    from anomaly import feedback_topic

    k = settings.kafka
    if not k.feedback_topic:
        return []
    given, _ = feedback_topic.read_verdicts(k.bootstrap_servers, k.feedback_topic, k.client_options)
    in_force = feedback.latest(given)
    if in_force:
        log.info("retrain: %s from %s label the readings they cover", feedback.summary(in_force), k.feedback_topic)
    return in_force


def _prepare(history: History, champion: Any, settings: Settings,
             verdicts: Mapping[str, Sequence[feedback.Period]] | None = None,
             maintenance: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> _Data:
    """Grid each entity's history on the champion's period, drop what the champion flags (or, for a
    labelled entity, what is labelled) plus the margin, and split the clean rows into training values
    and hold-out segments; a labelled entity's whole tail from the hold-out cut on (anomalies
    included) is kept with its labels for the event-wise comparison. ``verdicts``: operators' periods
    per entity, ``maintenance``: their maintenance periods, left out (``History.frames``)."""
    from anomaly.preparation import prepare_scoring

    rt, w = settings.retrain, champion.window_size
    # Each entity's training rows in two parts: the first (1 - validation_fraction), then the rest. All
    # entities' first parts come before all their last parts, so the time-ordered validation split of
    # the concatenation (train_job) validates on the recent rows of every entity, not of the last one.
    train_parts: list[tuple[np.ndarray, pd.DatetimeIndex]] = []
    val_parts: list[tuple[np.ndarray, pd.DatetimeIndex]] = []
    val_owners: list[str] = []
    holdout: list[np.ndarray] = []
    holdout_entities: list[str] = []
    tails: list[tuple[np.ndarray, np.ndarray]] = []
    tail_entities: list[str] = []
    recent: list[np.ndarray] = []
    recent_entities: list[str] = []
    recent_normal: list[np.ndarray] = []
    labelled_anomalies: list[tuple[np.ndarray, np.ndarray, str]] = []
    facts: dict[str, Any] = {"entities": [], "rows": 0, "rows_excluded": 0, "flagged_windows": 0,
                             "labelled_entities": 0, "labelled_rows": 0, "train_rows": 0, "holdout_rows": 0,
                             "period_s": champion.period_s}
    starts, ends, hold_starts, hold_ends = [], [], [], []
    for entity, frame in history.frames(champion.sensors, verdicts, maintenance).items():
        if len(frame) < w:
            log.info("retrain: %s has only %d readings; left out", entity, len(frame))
            continue
        raw_labels = frame.pop(LABEL_COLUMN) if LABEL_COLUMN in frame.columns else None
        # filled as the worker fills a null (the last value, up to its limit), whatever data.fill says for files
        prepared = prepare_scoring(frame, champion.sensors, period_s=champion.period_s, fill="ffill",
                                   max_fill_steps=settings.stream_max_fill_steps, late_as_gaps=True)
        values = prepared.values
        gaps = prepared.gaps if prepared.gaps is not None else np.zeros(len(values), dtype=bool)
        truth = raw_labels.to_numpy(dtype=np.float64) if raw_labels is not None else None
        unlabelled = None  # grid rows no labelled reading speaks for (None: every row has its truth)
        if truth is not None:
            labels = labels_on_grid(frame.index, truth > 0, prepared)
            drop = exclusion_mask(len(values), np.flatnonzero(labels), 1, rt.exclude_margin_rows)
            facts["labelled_entities"] += 1
            facts["labelled_rows"] += int(labels.sum())
            if np.isnan(truth).any():  # some readings carry no label: the champion's opinion stands there
                unlabelled = ~labels_on_grid(frame.index, ~np.isnan(truth), prepared)
        else:
            drop = np.zeros(len(values), dtype=bool)
            unlabelled = np.ones(len(values), dtype=bool)
        known_faults = drop.copy()  # labelled anomalies and their margin: no false alarm can be raised there
        called_normal = np.zeros(len(values), dtype=bool)  # rows whose readings are labelled normal
        if truth is not None:
            called_normal = ~labels if unlabelled is None else ~labels & ~unlabelled
            if labels.any():
                labelled_anomalies.append((values, labels, entity))
        if unlabelled is not None and unlabelled.any():
            scored = champion.score_values(values)
            # what the champion alarmed on (a level its adaptive rule accepted as the new normal is kept)
            flagged = scored.end_rows[champion.threshold.for_entity(entity).series_flags(
                scored.scores, window_size=champion.window_size)]
            flagged = flagged[unlabelled[flagged]]  # a window ending on a labelled row: its truth decided
            drop |= exclusion_mask(len(values), flagged, w, rt.exclude_margin_rows)
            facts["flagged_windows"] += len(flagged)
        drop = drop | gaps  # stand-ins for outages the fill policy does not bridge: neither train nor hold out
        train_segs, hold_segs = split_segments(~drop, rt.holdout_fraction, w)
        heads, tails_of_entity = split_rows(train_segs, settings.training.validation_fraction, w)
        for parts, segs in ((train_parts, heads), (val_parts, tails_of_entity)):
            for a, b in segs:
                parts.append((values[a:b], prepared.timestamps[a:b]))
        val_owners.extend([entity] * len(tails_of_entity))
        holdout.extend(values[a:b] for a, b in hold_segs)
        holdout_entities.extend([entity] * len(hold_segs))
        cut = holdout_cut(~drop, rt.holdout_fraction)
        if cut is not None:  # the same stretch of time as the hold-out, only outages and labelled faults out
            for a, b in runs(~(gaps | known_faults)[cut:]):
                if b - a >= w:
                    recent.append(values[cut + a:cut + b])
                    recent_entities.append(entity)
                    recent_normal.append(called_normal[cut + a:cut + b])
        if truth is not None and unlabelled is None and cut is not None and len(values) - cut >= w:
            tails.append((values[cut:], labels[cut:]))
            tail_entities.append(entity)
        facts["entities"].append(entity)
        facts["rows"] += len(values)
        facts["rows_excluded"] += int(drop.sum())
        facts["train_rows"] += sum(b - a for a, b in train_segs)
        facts["holdout_rows"] += sum(b - a for a, b in hold_segs)
        facts["period_s"] = facts["period_s"] or prepared.period_s
        starts.append(prepared.timestamps[0])
        ends.append(prepared.timestamps[-1])
        if hold_segs:  # where the hold-out lies (a dead sensor's outage pushes it back from the newest readings)
            hold_starts.append(prepared.timestamps[hold_segs[0][0]])
            hold_ends.append(prepared.timestamps[hold_segs[-1][1] - 1])
    if starts:
        facts["history_start"], facts["history_end"] = min(starts).isoformat(), max(ends).isoformat()
    if hold_starts:
        facts["holdout_start"], facts["holdout_end"] = min(hold_starts).isoformat(), max(hold_ends).isoformat()
    facts["entities"] = ",".join(facts["entities"])
    if verdicts:
        facts.update({f"verdict_{kind}_readings": n for kind, n in history.verdict_readings.items()})
    if maintenance:
        facts["verdict_maintenance_readings"] = history.maintenance_readings
    # The parts (entities, the clean stretches between flagged ones) laid end to end with a stand-in row
    # marked as a gap between every two, as prepare_fleet does: no window joins two of them (a window
    # across a seam scores far above any real one, and would set the challenger's threshold).
    n_features = len(champion.sensors)
    chunks: list[np.ndarray] = []
    stamps: list[pd.DatetimeIndex] = []
    seams: list[int] = []
    entity_tails: dict[str, list[tuple[int, int]]] = {}
    row = 0
    owners = [None] * len(train_parts) + val_owners
    for owner, (part, stamp) in zip(owners, train_parts + val_parts):
        if not len(part):
            continue
        if chunks:
            chunks.append(chunks[-1][-1:])
            stamps.append(stamps[-1][-1:])
            seams.append(row)
            row += 1
        if owner is not None:
            entity_tails.setdefault(owner, []).append((row, row + len(part)))
        chunks.append(part)
        stamps.append(stamp)
        row += len(part)
    values = np.concatenate(chunks) if chunks else np.empty((0, n_features))
    times = stamps[0].append(stamps[1:]) if stamps else pd.DatetimeIndex([], tz="UTC")
    gaps = None
    if seams:
        gaps = np.zeros(len(values), dtype=bool)
        gaps[seams] = True
    return _Data(values, pd.DatetimeIndex(times), holdout, facts, tails, holdout_entities, tail_entities,
                 entity_tails, gaps, recent, recent_entities, recent_normal, labelled_anomalies)


def _compare(champion: Any, challenger: Any, data: "_Data", unit: Sequence[float], window: int,
             recent: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
             ) -> tuple[HoldoutMetrics, HoldoutMetrics]:
    """Both models' hold-out metrics on the same windows: each one's false-alarm rate (its alarms at
    its own threshold, in its own units) over every window of the hold-out's stretch of time
    (``data.recent``: what the champion flagged included; outages and labelled anomalies out), and
    its mean and p99 error in the common ``unit`` over the hold-out's windows (``data.holdout``: what
    the champion did not flag) that the challenger does not flag either. Only windows ending at row
    ``window - 1`` or later of a segment count (``window``: the longer of the two models' windows), so
    two models of different window sizes are compared on windows ending on the same rows. Every
    hold-out segment lies inside one of ``data.recent`` (the hold-out is that stretch less what the
    champion flagged), so a hold-out window has a stretch to count alarms over.

    Why: on the champion-clean hold-out alone the champion's false-alarm rate was 0 by construction and
    its worst windows were left out of its error, while the challenger's were not: a challenger as good
    as the champion was measured worse, and one with a quantile threshold (alarming on its top 1 % by
    design) was never promoted.

    ``recent``: ``_joint`` of both over ``data.recent`` at the longer window, when the caller has it."""
    window = max(window, champion.window_size, challenger.window_size)
    models = (champion, challenger)
    if recent is None:
        recent = _joint(models, data.recent, data.recent_entities, unit, window)
    held = _joint(models, data.holdout, data.holdout_entities, unit, window)
    if held is None or recent is None:  # (recent is None only where held is)
        empty = holdout_metrics(np.empty(0), 0.0)
        return empty, empty
    flagged = np.zeros(len(held[0][0]), dtype=bool)
    for scores, bars, _ in held:
        with np.errstate(invalid="ignore"):
            flagged |= ~(scores <= bars)  # above its bar, or not finite
    result = []
    for k, (scores, bars, common) in enumerate(held):
        every = holdout_metrics(*recent[k])
        normal = holdout_metrics(scores[~flagged], bars[~flagged], common[~flagged]) if (~flagged).any() \
            else holdout_metrics(scores, bars, common)
        result.append(HoldoutMetrics(normal.mean_error, every.false_alarm_rate, normal.p99_error, every.windows))
    return result[0], result[1]


def _joint(models: Sequence[Any], segments: Sequence[np.ndarray], entities: Sequence[str], unit: Sequence[float],
           window: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Per model, over the windows of ``segments`` ending at row ``window - 1`` or later (the same rows
    for every model): its scores, the bar in force at each (its own threshold, each entity's where it
    has one, its adaptive rule with each segment one series) and its errors in the common ``unit``.
    A window a model did not score is NaN (non-finite: counted as an alarm). None: no such window."""
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in models]
    for k, seg in enumerate(segments):
        if len(seg) < window:
            continue
        for model, out in zip(models, parts):
            scored = model.score_values(seg)
            rows = np.asarray(scored.end_rows)
            threshold = model.threshold.for_entity(entities[k]) if entities else model.threshold
            scores = np.asarray(scored.scores, dtype=np.float64)
            full = np.full((3, len(seg)), np.nan)  # by end row
            full[0, rows] = scores
            full[1, rows] = np.broadcast_to(threshold.series_bars(scores, window_size=model.window_size), scores.shape)
            full[2, rows] = common_unit_errors(scored.sensor_errors, model.scaler.scale, unit)
            out.append((full[0, window - 1:], full[1, window - 1:], full[2, window - 1:]))
    if not parts[0]:
        return None
    return [tuple(np.concatenate([p[i] for p in model_parts]) for i in range(3)) for model_parts in parts]


def _labelled(models: Sequence[Any], data: "_Data", unit: Sequence[float], window: int,
              recent: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> list[LabelledMetrics] | None:
    """Each model's ``LabelledMetrics``: its alarms on the windows of the hold-out's stretch
    (``data.recent``) ending on a reading labelled normal, and the share of the periods labelled an
    anomaly in each entity's history (runs of labelled rows) with at least one window ending inside them
    above its threshold (each entity's where it has one). Both models count windows ending at row
    ``window - 1`` or later (the longer of their windows) of a segment, as in ``_compare``. Neither was
    trained on those periods: the retrain leaves them out, with their margin. None: no such window and
    no such period. ``recent``: ``_joint`` of the models over ``data.recent`` at the longer window, when
    the caller has it (``_compare`` scores the same)."""
    window = max(window, *(m.window_size for m in models))
    # the rows of _joint's windows: each segment's from row window - 1 on, segments shorter than a window out
    normal_rows = [mask[window - 1:] for mask in data.recent_normal if len(mask) >= window]
    ends = np.concatenate(normal_rows) if normal_rows else np.zeros(0, dtype=bool)
    normal = [(math.nan, 0)] * len(models)
    labelled_normal = bool(ends.any())
    if labelled_normal:
        if recent is None:
            recent = _joint(models, data.recent, data.recent_entities, unit, window)
        normal = []
        for scores, bars, _ in recent:  # type: ignore[union-attr]
            with np.errstate(invalid="ignore"):
                alarms = ~(scores[ends] <= bars[ends])  # above its bar, or not scored/not finite
            normal.append((float(alarms.mean()), int(ends.sum())))
    found, periods = [0] * len(models), 0
    for values, labels, entity in data.labelled_anomalies:
        judged = [(a, b) for a, b in runs(labels) if b >= window]  # a window of both ends inside it
        if not judged:
            continue
        periods += len(judged)
        for i, model in enumerate(models):
            flagged = _flagged_rows(model, values, model.threshold.for_entity(entity))
            found[i] += sum(bool(flagged[max(a, window - 1):b].any()) for a, b in judged)
    if not labelled_normal and not periods:
        return None
    return [LabelledMetrics(rate, n, found[i] / periods if periods else math.nan, periods)
            for i, (rate, n) in enumerate(normal)]


def _flagged_rows(model: Any, values: np.ndarray, threshold: Any) -> np.ndarray:
    """(len(values),) bool: the rows a window of ``model`` over ``values`` flagged at ``threshold`` ends on
    (a flagged window marks its last row, as in the worker, before alert shaping)."""
    scored = model.score_values(values)
    flagged = np.zeros(len(values), dtype=bool)
    flagged[np.asarray(scored.end_rows)[threshold.series_flags(scored.scores, window_size=model.window_size)]] = True
    return flagged


def _events(detector: Any, tails: Sequence[tuple[np.ndarray, np.ndarray]],
            entities: Sequence[str] = (), window: int | None = None) -> EventMetrics | None:
    """Event-wise metrics of ``detector``'s window flags (a flagged window marks its last row, as in
    the worker, before alert shaping) against the labels of each labelled hold-out tail (``entities``:
    each tail's entity, held to its own threshold where the model has one). Flags and labels count
    from row ``window - 1`` of each tail (``window``: the longer of the two models' windows), as in
    ``_compare``: a fault in the first rows, which only the shorter window reaches, would count for
    one model alone."""
    if not tails:
        return None
    window = max(window or 0, detector.window_size)
    counts = []
    for k, (values, labels) in enumerate(tails):
        if len(values) < window:
            continue
        threshold = detector.threshold.for_entity(entities[k]) if entities else detector.threshold
        predicted = _flagged_rows(detector, values, threshold)
        counts.append(event_metrics(np.asarray(labels)[window - 1:], predicted[window - 1:]))
    return aggregate_events(counts) if counts else None


def _comparison_metrics(champ: HoldoutMetrics, chall: HoldoutMetrics, champ_events: EventMetrics | None,
                        chall_events: EventMetrics | None, decision: Decision,
                        champ_labelled: LabelledMetrics | None = None,
                        chall_labelled: LabelledMetrics | None = None) -> dict[str, float]:
    out: dict[str, float] = {**{f"champion.{k}": v for k, v in champ.to_dict().items()},
                             **{f"challenger.{k}": v for k, v in chall.to_dict().items()},
                             "relative_improvement": decision.relative_improvement,
                             "promoted": float(decision.promote)}
    for side, ev in (("champion", champ_events), ("challenger", chall_events)):
        if ev is not None:
            out.update({f"{side}.event_precision": ev.precision, f"{side}.event_recall": ev.recall,
                        f"{side}.event_f1": ev.f1, f"{side}.labelled_events": float(ev.n_true)})
    for side, lab in (("champion", champ_labelled), ("challenger", chall_labelled)):
        if lab is not None:
            out.update({f"{side}.{k}": v for k, v in lab.to_dict().items()})
    return out


def gate_limits(metrics: Mapping[str, float], rt: RetrainSettings) -> dict[str, tuple[float, str]]:
    """The bars ``decide`` holds the challenger to, from the champion's hold-out figures, for the
    comparison plot: (value, text) for the metrics that have one."""
    limits: dict[str, tuple[float, str]] = {}
    error, far, f1 = (metrics.get(f"champion.{k}") for k in ("mean_error", "false_alarm_rate", "event_f1"))
    if error is not None and math.isfinite(error) and error > 0:
        limits["mean_error"] = (error * (1 - rt.min_improvement), f"better at or below ({rt.min_improvement:+.0%})")
    if far is not None and math.isfinite(far):
        limits["false_alarm_rate"] = (far + rt.max_false_alarm_increase, "allowed up to")
    if f1 is not None and math.isfinite(f1):
        limits["event_f1"] = (f1 - rt.max_event_f1_decrease, "allowed down to")
    normal_far, found = (metrics.get(f"champion.{k}") for k in ("labelled_normal_false_alarm_rate",
                                                                "labelled_anomalies_found"))
    # fewer false alarms on readings labelled normal count only beside periods labelled an anomaly
    if normal_far is not None and math.isfinite(normal_far) and normal_far > 0 and found is not None \
            and math.isfinite(found):
        limits["labelled_normal_false_alarm_rate"] = (normal_far * (1 - rt.min_false_alarm_reduction),
                                                      f"better at or below (-{rt.min_false_alarm_reduction:.0%})")
    if found is not None and math.isfinite(found):
        limits["labelled_anomalies_found"] = (found - rt.max_found_decrease, "allowed down to")
    return limits


def end_dead_runs(settings: Settings, started_ts: float) -> list[str]:
    """The MLflow runs that a scheduled retrain started at ``started_ts`` (epoch s) left RUNNING when its
    process was killed, ended FAILED (tag ``anomaly.ended`` says why); their ids. A manual retrain's runs
    (trigger ``manual``) are left alone: one may be running now, elsewhere; so are another registered
    model's (tag ``model_name``: another asset type's scheduler, sharing the experiment, retraining now).
    A run without the tag (written before it was) is taken as this model's."""
    from anomaly import tracking

    tracking.configure_from(settings.mlflow)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_ts))
    name = settings.mlflow.model_name
    return tracking.end_dead_runs(
        settings.mlflow.experiment, started_ts - DEAD_RUN_MARGIN_S, {"retrain": "true"},
        f"its process was killed: the scheduler, restarted, found that the retrain it started at {when} never "
        "finished (out of memory, or SIGKILL after a stop's grace)",
        unless=lambda tags: (tags.get("retrain.trigger", tags.get("trigger")) == "manual"
                             or tags.get("model_name", name) != name))


DEAD_RUN_MARGIN_S = 5.0  # a scheduled retrain's runs start after its job does: this much clock skew allowed


def _log_comparison(settings: Settings, champion_version: str, challenger_version: str | None,
                    challenger_run_id: str, metrics: Mapping[str, float], decision: Decision,
                    status: str, facts: Mapping[str, Any], verdicts: Sequence[feedback.Verdict] = ()) -> str:
    """An MLflow run holding both sides, the decision (tag ``decision``) and a comparison plot; with
    ``verdicts``, the operators' verdicts the cycle used (``verdicts.json``: who said what, of which
    period), so a data scientist sees what shaped the challenger."""
    from anomaly import plots, tracking

    ml, rt = settings.mlflow, settings.retrain
    tags = {"retrain": "true", "kind": "retrain-comparison", "decision": status, "decision.reason": decision.reason,
            "champion.version": champion_version, "challenger.version": challenger_version or "",
            "challenger.run_id": challenger_run_id, "model_name": ml.model_name,
            "trigger": str(facts.get("trigger", "manual"))[:5000],
            "comparison.unit": f"champion v{champion_version} scaler", "code_version": tracking.code_version(),
            **{f"data.{k}": str(facts[k]) for k in ("history_start", "history_end", "holdout_start", "holdout_end",
                                                     "champion_data_end", "holdout_overlaps_champion_data")
               if k in facts},
            # the operators' verdicts the cycle used, as on the challenger
            **{f"retrain.{k}": str(v) for k, v in facts.items() if k.startswith(("verdicts_", "verdict_"))}}
    with tracking.Run(ml.experiment, ml.artifact_location, run_name=f"retrain-compare-{status}", tags=tags) as run:
        run.log_params(tracking.flat_params("retrain", dataclasses.asdict(rt)))  # every setting of the cycle
        run.log_metrics(tracking.finite_metrics(metrics))
        shown = ("mean_error", "false_alarm_rate", "p99_error", "event_f1", "labelled_normal_false_alarm_rate",
                 "labelled_anomalies_found")
        bars = {f"{side} v{version}": {k: metrics[f"{side}.{k}"] for k in shown if f"{side}.{k}" in metrics}
                for side, version in (("champion", champion_version), ("challenger", challenger_version))}
        run.log_figure(plots.comparison_bars(bars, f"hold-out comparison: {status}", gate_limits(metrics, rt)),
                       "comparison.png")
        run.log_dict({"decision": status, "reason": decision.reason, "metrics": dict(metrics),
                      "data": dict(facts)}, "comparison.json")
        if verdicts:
            run.log_dict({"verdicts": [v.to_dict() for v in verdicts]}, "verdicts.json")
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
