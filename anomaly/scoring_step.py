"""The pure batch step of the streaming worker (DESIGN §3). No I/O: no Kafka, no MLflow, no clock.

``ScoringStep.process(records, now_s)`` takes one polled micro-batch and returns everything the
worker must do with it:

    decode (bad ⇒ dead letter) → per-entity window buffers (``window_state``) → every ready window of
    every entity stacked into ONE batched forward pass → scores and per-sensor errors → alert shaping
    (``alerts``) → events, dead letters, optional score records, and the offsets that may be
    committed once those outputs are delivered.

It never raises for bad records: each becomes a dead letter carrying the original bytes (undecodable,
not a reading, a sensor set that does not match the model's). The record key is not trusted for the
entity; the reading's ``entity`` field is. A failure of the model itself does raise; the step's state
is then undefined, so the caller commits nothing and restarts from the committed offsets (or calls
``reset()`` and seeks back). ``now_s`` is only used for latencies, dead-letter timestamps, refusing
readings from the future (``max_future_s``) and pacing a log line, so the same records always give
byte-identical events.

Entities silent for ``idle_timeout_s`` of stream time (their partition's newest reading, not a clock)
lose their window buffers, so they stop holding the partition's commit back. Their alert state goes
too, once their partition's stream time is ``idle_timeout_s`` past their last window: an open event is
then closed (a ``"closed"`` event at its last window above the threshold), so it does not stay open
downstream for ever. A reading that is a dead letter for its values (another sensor set than the
model's, a value that is not a number), its entity and time read, still moves its partition's stream
time on (``DecodedBatch.foreign``), though not its entity's: an entity whose every reading is such a
record (a champion that reads other sensors than the fleet sends) ages out like a silent one instead
of holding its partition's commit for ever.

Alert state and commits. An entity in a run, an open event or a cooldown holds its partition's commit
at the oldest reading of the window that started the run (``ReadyBatch.start_offset``), so a restart or
a rebalance replays from there, rebuilds that window, and re-derives the same ``event_id`` (re-emitting
``"open"`` is harmless: downstream upserts by id); without the hold the replay would start inside the
event and open it again under a new id, leaving the first one open for ever. A hold is released when
the state ends or starts afresh. Alert state never spans a boundary of the stream-time grid of
``AlertPolicy.max_event_s`` (an open event is cut there, ``continued``, and the anomaly goes on under a
new id): every entity starts afresh at the same stream times, so holds cannot chain from one entity's
run to another's across boundaries, and no hold pins its partition's commit much longer than a period.

``ScoringModel`` is the seam to the network: ``DetectorModel`` wraps a trained ``Detector``; tests use a
numpy fake. The worker swaps models between batches with ``swap_model``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from anomaly.adaptive import AdaptiveRule, TrailingBars
from anomaly.episodes import EpisodeBars, EpisodeRule
from anomaly.alerts import OPEN, AlertPolicy, AlertTracker
from anomaly.codec import DEAD_LETTER_MAX_KEY, DecodedBatch, decode_batch, encode_dead_letter, encode_event
from anomaly.detector import Detector
from anomaly.entity_filter import EntityFilter, only_served
from anomaly.errors import ModelError
from anomaly.listing import some
from anomaly.scoring import resolve_precision, sensor_contributions, traced_for_scoring
from anomaly.window_state import ACCEPTED, DUPLICATE, EMPTY, LATE, RESET, ReadyBatch, WindowPolicy, WindowStore

log = logging.getLogger(__name__)

COUNT_KEYS = ("consumed", "dead_letters", "windows_scored", "late", "duplicates", "resets", "events_opened",
              "events_closed", "accepted", "evicted", "nonfinite_scores", "adaptive_held", "replayed", "empty",
              "skipped")
# Windows per forward pass in the worker: measured on the 2-core CPU box (W=32, hidden 64), 128-512
# windows per pass score ≈ 15 % faster per window than 1024 and ≈ 40 % faster than 2048 (cache).
STREAM_SCORE_BATCH = 512
SILENT_CHECK_S = 60.0  # how often (the worker's clock) the step looks for sensors scored on their typical value
IDLE_TIMEOUT_S = 3600.0  # stream time after which a silent entity is dropped: it would pin its partition's commit
# The adaptive threshold's histories are pruned of entities silent for ``idle_timeout_s`` once they number
# more than this, or twice as many as after the last pruning (amortised: a fleet that churns stays bounded).
PRUNE_BARS_MIN = 1024


@runtime_checkable
class ScoringModel(Protocol):
    """What the step needs from a model. ``score`` takes windows (N, W, F) in original units, sensors
    in ``sensors`` order, and returns scores (N,), per-sensor errors (N, F) and the expected
    (reconstructed) last-step values (N, F) in original units. ``adaptive``: the threshold's adaptive
    rule (``anomaly.adaptive``), or None; a model may also carry ``episodes``, the threshold's
    alarm-episode rule (``anomaly.episodes``), or None. Neither: a fixed threshold. A model may also
    carry ``entity_thresholds`` (entity -> its own fitted value; the others are held to ``threshold``),
    the base a moving bar rises from, and ``ignored_sensors``: sensors a reading may carry besides
    ``sensors``, not read (those its training left out)."""

    name: str
    version: str
    sensors: tuple[str, ...]
    window_size: int
    period_s: float
    threshold: float
    adaptive: AdaptiveRule | None
    fill_values: tuple[float, ...]

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class DetectorModel:
    """A trained ``Detector`` as a ``ScoringModel``: one ``score`` call is one batched pass (split
    into chunks of ``batch_size`` windows only to bound device memory)."""

    def __init__(self, detector: Detector, name: str, version: str, device: str | torch.device = "cpu",
                 batch_size: int = STREAM_SCORE_BATCH, precision: str = "fp32", trace: bool = False) -> None:
        self.detector = detector
        self.name = name
        self.version = str(version)
        self.device = device
        self.batch_size = batch_size
        self.precision = resolve_precision(precision, device)  # fp32 or bf16, fixed for this model's life
        self.sensors: tuple[str, ...] = tuple(detector.sensors)
        self.ignored_sensors: tuple[str, ...] = detector.ignored_sensors
        self.window_size: int = int(detector.window_size)
        # A model saved without a period was trained on rows: one row per second is the convention.
        self.period_s: float = float(detector.period_s) if detector.period_s else 1.0
        self.threshold: float = float(detector.threshold.value)
        # entity -> its own fitted value (a model shared by a fleet); the others are held to ``threshold``
        self.entity_thresholds: dict[str, float] = dict(detector.threshold.per_entity)
        self.adaptive: AdaptiveRule | None = detector.threshold.adaptive
        self.episodes: EpisodeRule | None = detector.threshold.episodes
        self.fill_values: tuple[float, ...] = detector.fill_values()
        detector.model.to(device)
        # The module the forward passes run: a checked TorchScript trace on CPU when asked (see
        # scoring.traced_for_scoring), else the detector's own model.
        self.trace_tried = trace and torch.device(device).type == "cpu"
        self.forward_model = (traced_for_scoring(detector.model, self.window_size, len(self.sensors), device,
                                                 self.precision)
                              if self.trace_tried else detector.model)
        self.traced = self.forward_model is not detector.model

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        windows = np.asarray(windows, dtype=np.float64)  # (N, W, F) original units
        n, f = len(windows), len(self.sensors)
        if n == 0:
            return np.empty(0), np.empty((0, f)), np.empty((0, f))
        scaled = self.detector.scaler.transform(windows)  # (N, W, F) float32
        scored = self.detector.score_windows(scaled, windows[:, -1, :], np.arange(n), self.device, self.batch_size,
                                              self.precision, forward_model=self.forward_model)
        return (np.asarray(scored.scores, dtype=np.float64), np.asarray(scored.sensor_errors, dtype=np.float64),
                np.asarray(scored.expected, dtype=np.float64))


@dataclass(frozen=True)
class InputRecord:
    """One consumed record, as the Kafka adapter hands it over."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class PartitionBatch:
    """Consecutive consumed records of one topic-partition, column-wise (no object per record)."""

    topic: str
    partition: int
    offsets: list[int]
    keys: list[bytes | None] | None  # None: no keys kept (dead letters then carry a null key)
    values: list[bytes | None]


@dataclass
class BatchOutput:
    """What one batch produced; the worker produces, flushes, then commits ``commits``."""

    events: list[tuple[bytes, bytes]] = field(default_factory=list)  # (entity, encode_event(...))
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (original key, dead letter)
    dead_letter_reasons: list[str] = field(default_factory=list)  # the reason of each dead letter, in order
    dead_letter_keys: list[str | None] = field(default_factory=list)  # its record's key as text (the entity id), or None
    scores: list[tuple[bytes, bytes]] = field(default_factory=list)  # (entity, score record), when enabled
    commits: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> next offset
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    latencies_s: list[float] = field(default_factory=list)  # now_s - end_ts per scored window
    # sensors (entity, sensor) scored on their typical value, past worker.max_fill_steps slots without a value;
    # None: not checked in this batch (``SILENT_CHECK_S``)
    silent_sensors: int | None = None


@dataclass(frozen=True)
class ModelScores:
    """What the model said about a staged batch's windows."""

    scores: np.ndarray  # (N,)
    errors: np.ndarray  # (N, F) per-sensor errors
    expected: np.ndarray  # (N, F) reconstructed last step, original units


@dataclass(frozen=True)
class StagedBatch:
    """A batch decoded and windowed (``ScoringStep.stage``), waiting for its forward pass."""

    out: BatchOutput  # dead letters, commits and counts so far; completed in place
    windows: ReadyBatch  # the windows to score, stacked
    model: ScoringModel  # the model the windows were built for (a swap applies to the next batch)
    now_s: float
    seq: int = 0  # staging order (``ScoringStep`` applies revocations to alert state after the batches before them)
    # stream id -> its stream time once this batch was placed: what its completion measures silence by (the
    # store's own may be a later batch's already, staged ahead: a backlog would make an entity look silent)
    clocks: dict[int, float] = field(default_factory=dict)


_BYTES_ONLY = frozenset({bytes, type(None)})


def window_shape(model: Any) -> tuple[tuple[str, ...], int, float]:
    """What a model's window buffers are built for: its sensors, window size and sampling period (a
    ``ScoringModel`` or a ``Detector``, whose period may be unknown: 1 s, as ``DetectorModel`` reads it)."""
    period = getattr(model, "period_s", None)
    return tuple(model.sensors), int(model.window_size), float(period) if period else 1.0


def _compatible(a: ScoringModel, b: ScoringModel) -> bool:
    """Whether window buffers built for ``a`` are valid input for ``b``."""
    return window_shape(a) == window_shape(b)


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class ScoringStep:
    """The worker's batch step. ``window_policy``'s ``window_size`` and ``period_s`` are replaced by
    the model's (the grid is the model's); its stride, grace and fill settings are kept."""

    def __init__(self, model: ScoringModel, window_policy: WindowPolicy, alert_policy: AlertPolicy,
                 emit_scores: bool = False, idle_timeout_s: float | None = IDLE_TIMEOUT_S,
                 max_future_s: float | None = None, max_entities: int | None = None,
                 partial_readings: bool = False, entities: Sequence[str] | None = None) -> None:
        self._model = model
        # worker.entities: the entities served; another's readings are skipped (None: every entity)
        self._served = EntityFilter(entities) if entities else None
        self.partial_readings = partial_readings  # a reading may carry some of the model's sensors (the rest missing)
        self.max_future_s = max_future_s  # readings stamped further ahead of now_s are dead letters; None = off
        self.max_entities = max_entities  # most entities held; past it those not active go
        self._cap_logged_s = -math.inf  # when the cap's warning was last logged (now_s)
        self._behind = _Roll()  # entities sending far behind their partition's newest reading
        self._unaligned = _Roll()  # entities whose readings miss the stride slots
        self._split = _Roll()  # entities whose readings' parts (sensors sent one message each) came too late
        self._silent: dict[str, tuple[str, ...]] = {}  # entity -> its sensors on their typical value, as last checked
        self._silent_checked_s = -math.inf
        self._base_policy = window_policy
        self.alert_policy = alert_policy
        self.emit_scores = emit_scores
        self.idle_timeout_s = idle_timeout_s
        self._alerts = AlertTracker(alert_policy)
        self._streams: dict[tuple[str, int], int] = {}  # (topic, partition) -> WindowStore partition id
        self._stream_keys: list[tuple[str, int]] = []
        self._store = self._new_store(model)
        self._bars = self._new_bars(model)
        # the moving bars of the model before the last swap, for batches staged with it that complete after
        self._retired_bars: tuple[ScoringModel | None, TrailingBars | EpisodeBars | None] = (None, None)
        self._prune_bars_at = PRUNE_BARS_MIN
        self._holds: dict[str, _Hold] = {}  # entity in alert state -> where its run's first window starts
        self._finished: list[tuple[str, _Hold]] = []  # runs over that opened an event, still pinning (``through``)
        # Alert state is complete()'s, which may run on another thread than stage() and forget_partitions()
        # (the scoring child's finisher): one lock; and a revocation reaches alert state only after every
        # batch staged before it has completed (else a batch in flight would bring the state back).
        self._alert_lock = threading.Lock()
        self._staged_seq = 0
        self._completed_seq = 0
        self._revoked: list[tuple[int, set[int]]] = []  # (staged_seq at the revocation, stream ids)
        self._next_offset: dict[int, int] = {}  # stream id -> the offset after the last one staged
        self._committed: dict[int, int] = {}  # stream id -> the commit of the last batch completed
        self._replay: _Replay | None = None  # re-reading after a swap the window buffers did not survive
        self._replay_prune = False  # partitions revoked since: the replay's marks of entities gone to be dropped
        self._replay_from: dict[tuple[str, int], int] = {}
        # stream id -> (offset, key, value, judged) of a reading held back: its partition's last, leaping far
        # ahead with worker.max_future_s off; judged with the partition's next readings (_refuse_leaps).
        # judged: it was read again after a swap (its dead letter, if any, was sent the first time)
        self._held: dict[int, tuple[int, bytes | None, Any, bool]] = {}

    # --- model --------------------------------------------------------------------------------
    @property
    def model(self) -> ScoringModel:
        return self._model

    @property
    def window_policy(self) -> WindowPolicy:
        return self._store.policy

    @property
    def windows(self) -> WindowStore:
        """The window buffers (for inspection and rebalance handling)."""
        return self._store

    @property
    def alerts(self) -> AlertTracker:
        return self._alerts

    def _stride(self, model: ScoringModel) -> int:
        """The scoring stride for ``model``: ``worker.stride``, at most the model's window size (a larger
        stride would leave slots in no scored window: readings never looked at)."""
        stride, w = self._base_policy.stride, int(model.window_size)
        if stride > w:
            log.warning("worker.stride %d is more than model %s v%s's window of %d slots: scoring every %d "
                        "slots instead, so every reading is in a scored window", stride, model.name,
                        model.version, w, w)
        return min(stride, w)

    def _new_store(self, model: ScoringModel) -> WindowStore:
        policy = replace(self._base_policy, window_size=int(model.window_size), period_s=float(model.period_s),
                         stride=self._stride(model))
        if len(model.fill_values) != len(model.sensors):
            raise ModelError(f"model {model.name} v{model.version}: {len(model.fill_values)} fill values "
                             f"for {len(model.sensors)} sensors")
        self._model_sensors = tuple(model.sensors)
        self._ignored_sensors = tuple(getattr(model, "ignored_sensors", ()))
        self._silent, self._silent_checked_s = {}, -math.inf  # new buffers: checked again at the next batch
        self._alerts.spacing_s = policy.stride * policy.period_s  # the alert grid spans >= 60 windows
        return WindowStore(policy, model.sensors, model.fill_values)

    def _new_bars(self, model: ScoringModel) -> tuple[ScoringModel, TrailingBars | EpisodeBars | None]:
        """The per-entity state of a moving bar for ``model``'s scores: alarm episodes' or the adaptive
        threshold's history (None: a fixed threshold). Paired with its model: a batch staged for another
        model (completing after a swap) never reads or feeds it."""
        episodes = getattr(model, "episodes", None)
        if episodes is not None and episodes.enabled:
            return model, EpisodeBars(episodes, min(self._base_policy.stride, int(model.window_size)),
                                      window_size=int(model.window_size))
        rule = getattr(model, "adaptive", None)
        enabled = rule is not None and rule.enabled
        return model, (TrailingBars(rule, min(self._base_policy.stride, int(model.window_size))) if enabled else None)

    @property
    def adaptive_entities(self) -> int:
        """Entities with a moving bar's state held (adaptive history or episode state; 0 with a fixed
        threshold)."""
        bars = self._bars[1]
        return 0 if bars is None else bars.entities

    def adaptive_history(self, entity: str) -> np.ndarray:
        """The scores the adaptive bar of ``entity`` is computed from, oldest first (empty: none, a
        fixed threshold, or alarm episodes, which keep no history)."""
        bars = self._bars[1]
        return bars.history(entity) if isinstance(bars, TrailingBars) else np.empty(0)

    def open_episodes(self) -> list[str]:
        """Entities with an alarm episode open now (empty without the episode rule)."""
        bars = self._bars[1]
        return bars.open_entities() if isinstance(bars, EpisodeBars) else []

    def swap_model(self, model: ScoringModel, replay: bool = False) -> bool:
        """Use ``model`` from the next batch on. Window buffers are kept when its sensors, window size and
        period match the current model's, else they restart empty; open events are kept either way
        (their ids do not depend on the version). The adaptive threshold's history restarts (the new
        model's scores are on its own scale). Returns whether the window buffers were kept.

        ``replay`` (buffers that restart, every batch staged so far completed): the caller seeks each
        partition in ``replay_from`` back to its offset, and the records read again until the offset
        where the swap found each partition refill the new buffers only: they are not counted as
        consumed again (``replayed``), their dead letters were sent already, and a window ending at or
        before the old model's newest window for its entity is not scored again. So the new model
        scores every window ending after the old one's last (an entity still filling its first window:
        all of them), whatever the two strides, at once instead of ``window_size`` slots after the swap
        (as far back as the old buffers reached: ``window_size - 1`` slots of the old model at least).
        While re-reading, commits stay at or above each partition's commit before the swap. A second
        swap during a replay keeps what the first has still to re-read."""
        kept = _compatible(self._model, model)
        self._replay_from = {}
        if kept:
            self._store.set_fill_values(model.fill_values)  # buffers kept; only future fills change
            self._model_sensors = tuple(model.sensors)
            self._ignored_sensors = tuple(getattr(model, "ignored_sensors", ()))
        else:
            if replay:
                history_s = (int(model.window_size) - 1) * float(model.period_s)
                seek, scored = self._store.replay_plan(history_s, float(model.period_s))
                seek = {s: offset for s, offset in seek.items()
                        if s in self._next_offset and offset < self._next_offset[s]}
                until = {s: self._next_offset[s] for s in seek}
                previous = self._replay
                if previous is not None:  # a swap during a replay: what the first one has still to re-read stays
                    for stream, offset in previous.until.items():
                        until[stream] = max(until.get(stream, offset), offset)
                    for entity, end in previous.scored.items():
                        scored[entity] = max(scored.get(entity, end), end)
                if until:
                    floor = {s: self._committed[s] for s in until if s in self._committed}
                    if previous is not None:
                        floor = {**previous.floor, **floor}
                    self._replay = _Replay(until, scored, floor)
                    self._replay_from = {self._stream_keys[s]: offset for s, offset in seek.items()}
                else:
                    self._replay = None
            self._store = self._new_store(model)
        self._model = model
        bars = self._new_bars(model)
        with self._alert_lock:  # complete() (maybe on another thread) reads and clears the retired pair
            self._retired_bars = self._bars
            self._bars = bars
        return kept

    @property
    def replay_from(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> offset to seek back to, after ``swap_model(..., replay=True)`` restarted
        the buffers (empty: nothing to re-read)."""
        return dict(self._replay_from)

    @property
    def replaying(self) -> bool:
        """Whether records before where the last swap found their partition are still to be read again."""
        return self._replay is not None and bool(self._replay.until)

    def reset(self) -> None:
        """Forget every window buffer, alert state and adaptive history (after a failed batch, before
        seeking back)."""
        self._store.reset()
        self._replay, self._replay_from = None, {}
        self._held.clear()  # the caller seeks back to the commits, which held readings kept at or before them
        with self._alert_lock:
            self._alerts.forget()
            self._holds.clear()
            self._finished.clear()
            self._revoked.clear()
            self._completed_seq = self._staged_seq
            self._bars = self._new_bars(self._model)
            self._retired_bars = (None, None)

    def forget_partitions(self, partitions: Sequence[tuple[str, int]]) -> int:
        """Drop the window, alert and moving-bar state of entities last seen on these (revoked) partitions; returns
        how many entities' windows went. Their new owner replays from the committed offset, which the
        alert holds kept at each run's first window, and carries their events on under the same ids."""
        ids = [self._streams[tp] for tp in partitions if tp in self._streams]
        for stream in ids:  # its commit stayed at or before it: the new owner reads it
            self._held.pop(stream, None)
        if self._replay is not None:  # the new owner reads them from the committed offset
            self._replay.done(ids, floors=True)
            self._replay_prune = True
            if self._replay.over:
                self._replay = None
        with self._alert_lock:
            self._revoked.append((self._staged_seq, set(ids)))
            self._apply_revoked()
        return self._store.forget_partitions(ids)

    def _apply_revoked(self) -> None:
        """Drop the alert state and moving bars of revoked streams once every batch staged before the
        revocation has completed (call with ``_alert_lock`` held)."""
        while self._revoked and self._revoked[0][0] <= self._completed_seq:
            _, revoked = self._revoked.pop(0)
            for entity in [e for e, hold in self._holds.items() if hold.stream in revoked]:
                del self._holds[entity]
                self._alerts.forget(entity)
            self._finished = [(e, hold) for e, hold in self._finished if hold.stream not in revoked]
            # and their moving bars: a re-read of the run held to a bar its own windows already raised
            # would open the event later, under another id (and a revoked stream's entities were never
            # pruned: it has no stream time left)
            for _, bars in (self._bars, self._retired_bars):
                if bars is not None and revoked:
                    bars.prune({stream: math.inf for stream in revoked})

    @property
    def alert_holds(self) -> dict[str, tuple[tuple[str, int], int]]:
        """Entity -> ((topic, partition), offset) of the commits its alert state holds."""
        return {e: (self._stream_keys[h.stream], h.offset) for e, h in self._holds.items()}

    # --- the batch ----------------------------------------------------------------------------
    def process(self, records: Sequence[InputRecord] | Sequence[PartitionBatch], now_s: float) -> BatchOutput:
        """One micro-batch in, every output and commit position out (see the module docstring)."""
        staged = self.stage(records, now_s)
        return self.complete(staged, self.score(staged))

    def stage(self, records: Sequence[InputRecord] | Sequence[PartitionBatch], now_s: float) -> StagedBatch:
        """The batch up to the forward pass: decode, dead letters, window buffers, evictions, the
        windows to score and the offsets that may be committed once the batch's outputs are delivered.

        ``score`` then ``complete`` finish it; the worker may stage the next batch before completing
        this one (the windows are copies and the commit positions are this batch's)."""
        batches = _as_partition_batches(records)
        again: dict[int, bool] = {}  # input position of each held reading judged now -> judged before
        if self._held:
            batches, again = self._with_held(batches)
        store = self._store
        out = BatchOutput()
        counts = out.counts
        raws: list[Any] = []
        streams: list[int] = []
        offsets: list[int] = []
        last: dict[int, int] = {}
        for batch in batches:
            stream = self._stream_id(batch.topic, batch.partition)
            raws.extend(batch.values)
            offsets.extend(batch.offsets)
            streams.append(stream)
            if batch.offsets:
                top = max(batch.offsets)
                if top > last.get(stream, -1):
                    last[stream] = top
        for stream, top in last.items():
            if top >= self._next_offset.get(stream, -1):
                self._next_offset[stream] = top + 1
        stream_of = np.repeat(np.asarray(streams, dtype=np.int64), [len(b.values) for b in batches])
        replayed = self._replayed(stream_of, offsets)  # None: no record of this batch is read again
        if again:  # a held reading: counted when first read; read again after a swap as it was then
            if replayed is None:
                replayed = np.zeros(len(raws), dtype=bool)
            for i, before in again.items():
                replayed[i] = before
            replayed = replayed if replayed.any() else None
        n_replayed = 0 if replayed is None else int(np.count_nonzero(replayed))
        counts["consumed"] = len(raws) - n_replayed - sum(1 for before in again.values() if not before)
        counts["replayed"] = n_replayed
        if not _BYTES_ONLY.issuperset(map(type, raws)):
            raws = [raw if raw is None or isinstance(raw, (bytes, bytearray, memoryview))
                    else str(raw).encode("utf-8", "surrogatepass")  # a lone surrogate: "not UTF-8"
                    for raw in raws]  # adapters hand over bytes; never crash on a stray str
        decoded = decode_batch(raws, self._model_sensors, partial=self.partial_readings, ignored=self._ignored_sensors)
        if self.max_future_s is not None:
            decoded = _refuse_future(decoded, now_s, self.max_future_s)
        else:  # off (a sped-up replay): still no leap that would stall the partition
            idle_s = self._idle_s()
            decoded, trailing = _refuse_leaps(decoded, stream_of, store, now_s,
                                              (idle_s if idle_s is not None else LEAP_S) + store.policy.period_s,
                                              holding=set(self._held))
            for i in trailing:  # judged with the partition's next readings; its commit stays at it
                b, j = _record_at(batches, i)
                self._held[int(stream_of[i])] = (b.offsets[j], b.keys[j] if b.keys is not None else None, raws[i],
                                                 replayed is not None and bool(replayed[i]))
        if self._served is not None:  # another asset type's readings (a shared input topic): not ours to score
            decoded, skipped = only_served(decoded, lambda i: _key_at(batches, i), self._served)
            counts["skipped"] = len(skipped) if replayed is None else int((~replayed[skipped]).sum())
        if decoded.bad:
            run_of = np.repeat(np.arange(len(batches)), [len(b.values) for b in batches])
            run_start = np.cumsum([0] + [len(b.values) for b in batches])
            for i, reason in decoded.bad:
                if replayed is not None and replayed[i]:
                    continue  # sent the first time it was read
                b = batches[int(run_of[i])]
                j = i - int(run_start[run_of[i]])
                key = b.keys[j] if b.keys is not None else None
                out.dead_letter_keys.append(_key_text(key))
                dropped = None
                if key is not None and len(key) > DEAD_LETTER_MAX_KEY:  # the dead letter must fit a message
                    key, dropped = None, len(key)
                out.dead_letters.append((key, encode_dead_letter(
                    raws[i], b.topic, b.partition, b.offsets[j], reason, now_s,
                    key_size=0 if key is None else len(key), dropped_key_size=dropped)))
                out.dead_letter_reasons.append(reason)
        counts["dead_letters"] = len(out.dead_letters)
        idle_s = self._idle_s()
        behind: list[str] = []  # entities of readings stamped so far behind their partition that they are late
        late = None
        if len(decoded.index) and idle_s is not None:  # before the foreign stamps move the clocks: in arrival order
            late = _behind(decoded, stream_of, store, idle_s + store.policy.period_s)
        if decoded.foreign:  # another sensor set: dead letters, but their time passes on their partition
            where, stamps = _foreign_stamps(decoded)
            store.observe(stamps, stream_of[where])
        if late is not None:
            fresh = late if replayed is None else late & ~replayed[decoded.index]  # counted the first time
            behind = [decoded.entities[j] for j in np.flatnonzero(fresh).tolist()]
            keep = np.flatnonzero(~late)
            decoded = replace(decoded, index=decoded.index[keep], entities=[decoded.entities[j] for j in keep.tolist()],
                              ts=decoded.ts[keep], values=decoded.values[keep])
        if len(decoded.index):
            index, entities, ts, values = decoded.index, decoded.entities, decoded.ts, decoded.values
            offsets_of = np.asarray(offsets, dtype=np.int64)
            if replayed is not None and replayed[index].any():
                # read again after a swap: into the new buffers first (each partition's older offsets), and
                # counted already (as accepted, late or duplicate) the first time
                again = replayed[index]
                where = np.flatnonzero(again)
                store.add_many([entities[j] for j in where.tolist()], ts[where], values[where],
                               stream_of[index[where]], offsets_of[index[where]])
                where = np.flatnonzero(~again)
                index, entities, ts, values = index[where], [entities[j] for j in where.tolist()], ts[where], values[where]
            outcomes = store.add_many(entities, ts, values, stream_of[index], offsets_of[index])
            counts["duplicates"] = outcomes[DUPLICATE]
            counts["late"] = outcomes[LATE]
            counts["resets"] = outcomes[RESET]
            counts["accepted"] = outcomes[ACCEPTED] + outcomes[RESET]
            counts["empty"] = outcomes[EMPTY]
        counts["late"] += len(behind)
        unaligned = store.take_unaligned()
        if unaligned:
            self._warn_unaligned(unaligned, now_s)
        split = store.take_split()
        if split:
            self._warn_split(split, now_s)
        if idle_s is not None:
            evicted = store.evict_idle(math.ceil(idle_s / store.policy.period_s))
            counts["evicted"] = len(evicted)
            if behind or (evicted and decoded.entities):
                self._warn_behind(set(behind).union(set(evicted).intersection(decoded.entities)), idle_s, now_s)
        if self.max_entities is not None and store.entities > self.max_entities:
            held = store.entities
            dropped = store.evict_excess(int(self.max_entities * 0.9))
            counts["evicted"] += dropped
            if now_s - self._cap_logged_s >= 60.0:  # once a minute at most
                self._cap_logged_s = now_s
                log.warning("%d entities held, more than worker.max_entities (%d): %d that were not active (no "
                            "whole window, or silent for a window) evicted, %d left%s", held, self.max_entities,
                            dropped, store.entities,
                            "; the active ones alone are more than the cap: raise it, or add workers"
                            if store.entities > self.max_entities else
                            " (a producer sending a new entity id with every reading?)")
        if now_s - self._silent_checked_s >= SILENT_CHECK_S:
            self._silent_checked_s = now_s
            out.silent_sensors = self._check_silent(store.silent_sensors())
        ready = store.ready_batch()
        commits = store.commit_offsets(last)
        replay = self._replay
        if replay is not None:
            ready = replay.unscored(ready)
            rereading = bool(replay.until)
            replay.done([stream for stream, top in last.items() if top + 1 >= replay.until.get(stream, 0)])
            replay.hold(commits)
            if replay.scored and not replay.until and (rereading or counts.get("evicted") or self._replay_prune):
                # the re-read just ended, or entities left the store (silent, over the cap, revoked): the marks of
                # those it does not hold go (they were kept for ever, and the replay never ended)
                replay.keep_only(store)
                self._replay_prune = False
            if replay.over:
                self._replay = None
        for stream, offset in commits.items():
            held = self._held.get(stream)
            out.commits[self._stream_keys[stream]] = offset if held is None else min(offset, held[0])
        self._staged_seq += 1
        clocks = {p: t for p in range(len(self._stream_keys)) if (t := store.stream_time(p)) is not None}
        return StagedBatch(out, ready, self._model, now_s, self._staged_seq, clocks)

    def score(self, staged: StagedBatch) -> ModelScores | None:
        """The one forward pass of a staged batch (no state of the step is touched: the worker may run
        it in another thread while it stages the next batch)."""
        ready = staged.windows
        if not len(ready):
            return None
        model = staged.model
        scores, errors, expected = model.score(ready.values)
        scores = np.asarray(scores, dtype=np.float64)
        errors = np.asarray(errors, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        n, f = ready.values.shape[0], ready.values.shape[2]
        if scores.shape != (n,) or errors.shape != (n, f) or expected.shape != (n, f):
            raise ModelError(f"model {model.name} v{model.version} returned shapes {scores.shape}, {errors.shape}, "
                             f"{expected.shape} for {n} windows of {f} sensors")
        return ModelScores(scores, errors, expected)

    def complete(self, staged: StagedBatch, scored: ModelScores | None) -> BatchOutput:
        """Alert shaping and outputs of a staged and scored batch (batches complete in staging order)."""
        with self._alert_lock:
            out = self._complete(staged, scored)
            self._completed_seq = max(self._completed_seq, staged.seq)
            self._apply_revoked()
            for key, offset in out.commits.items():
                self._committed[self._streams[key]] = offset
        return out

    def _complete(self, staged: StagedBatch, scored: ModelScores | None) -> BatchOutput:
        out = staged.out
        ready = staged.windows
        if scored is None:
            self._apply_holds(out, staged.clocks)
            return out
        model, now_s = staged.model, staged.now_s
        scores, errors, expected = scored.scores, scored.errors, scored.expected
        counts, sensors, threshold = out.counts, model.sensors, float(model.threshold)
        name, version = model.name, model.version
        n = len(ready)
        entities = ready.entities
        counts["windows_scored"] += n
        # from the time stamped on each window's last reading (its slot's time is up to half a period off)
        out.latencies_s.extend((now_s - (ready.end_ts if ready.reading_ts is None else ready.reading_ts)).tolist())
        finite = np.isfinite(scores)
        counts["nonfinite_scores"] += int(n - finite.sum())
        # The bar each window is held to: the fitted threshold (the entity's own where the model fitted
        # one), raised per entity by the adaptive rule or the alarm episode's. Adaptive bars are looked up
        # only where they decide something (above the fitted value; every window for the scores topic);
        # every finite score feeds its entity's state.
        bars_model, trailing = self._bars
        if bars_model is not model:  # staged before a swap: the old model's bars (its scores' scale)
            bars_model, trailing = self._retired_bars
        elif self._retired_bars[0] is not None:
            self._retired_bars = (None, None)  # the new model's batches have begun: the old state can go
        bars: np.ndarray | None = None
        own = getattr(model, "entity_thresholds", None)  # entity -> its own fitted value
        if own:
            bars = np.fromiter((own.get(e, threshold) for e in entities), dtype=np.float64, count=n)
        over = scores > (threshold if bars is None else bars)  # NaN: False
        if trailing is not None and bars_model is model:
            bars = trailing.bars(entities, scores, threshold if bars is None else bars,
                                 None if self.emit_scores else over, ready.end_ts, ready.partition)
            if self.idle_timeout_s is not None and trailing.entities > self._prune_bars_at:
                # each entity against its own partition's stream time: a partition replaying a backlog
                # is behind the others, and its entities are not silent
                idle_s = self._idle_s()
                trailing.prune({p: t - idle_s for p, t in staged.clocks.items()})
                self._prune_bars_at = max(PRUNE_BARS_MIN, 2 * trailing.entities)
        if self.emit_scores:
            for i, (entity, end_ts, start_ts, filled) in enumerate(zip(
                    entities, ready.end_ts.tolist(), ready.start_ts.tolist(), ready.filled.tolist())):
                score = float(scores[i])
                bar = threshold if bars is None else float(bars[i])
                out.scores.append((entity.encode("utf-8"), _score_record(
                    entity, end_ts, start_ts, score if finite[i] else None, bar, name, version, filled)))
        # Alert state changes only for entities with a window above the threshold or state already
        # (AlertTracker.update of a window at or below it, for an entity at rest, does nothing).
        if bars is None:
            above = over
        else:
            above = scores > bars
            counts["adaptive_held"] += int(np.count_nonzero(over & ~above))
        involved = self._alerts.active_entities()
        if above.any():
            involved |= {entities[i] for i in np.flatnonzero(above).tolist()}
        if not involved:
            self._apply_holds(out, staged.clocks)
            return out
        values, end_ts_list, last_missing = ready.values, ready.end_ts.tolist(), ready.last_missing
        holds = self._holds
        top_k = self.alert_policy.top_k
        idle_s = self._idle_s()
        for i, entity in enumerate(entities):
            if entity not in involved or not finite[i]:  # a non-finite score is never an event
                continue

            def detail(i: int = i) -> list[dict[str, Any]]:
                shares = sensor_contributions(errors[i:i + 1])[0]
                order = np.argsort(-shares, kind="stable")[:top_k]
                actual = values[i, -1]
                # a sensor null in the window's last reading: its value there is carried over (or typical),
                # not read; it is said (filled), not shown as a reading
                null = last_missing[i].tolist() if last_missing is not None else [False] * len(sensors)
                return [{"sensor": sensors[j], "share": _finite_or_none(shares[j]),
                         "actual": None if null[j] else _finite_or_none(actual[j]),
                         "expected": _finite_or_none(expected[i, j]), "filled": null[j]}
                        for j in order]

            if idle_s is not None and entity in holds and end_ts_list[i] - holds[entity].last_ts > idle_s:
                # silent past the idle timeout before this window: expired first, as a batch that ended
                # in the silence would have (else the same records gave other events in other batches)
                self._expire(entity, out)
            bar = threshold if bars is None else float(bars[i])
            opened = False
            for event in self._alerts.update(entity, end_ts_list[i], float(scores[i]), bar, detail, name,
                                             version):
                out.events.append((entity.encode("utf-8"), encode_event(event)))
                opened = opened or event["status"] == OPEN
                counts["events_opened" if event["status"] == OPEN else "events_closed"] += 1
            hold = holds.get(entity)
            anchor = self._alerts.anchor_ts(entity)
            if hold is not None and anchor != hold.start_ts:
                # The entity's alert state ended, or started afresh at this window (a new run after a
                # cooldown; the first window past a boundary of the alert grid): the old hold is over.
                del holds[entity]
                if hold.opened and hold.through is not None:
                    # A run that opened an event is over. Its hold stays, apart from the entity's next
                    # run's, while the commit would fall at or before the oldest reading of the run's last
                    # window above its bar (``through``; or its newest placed out of order, which a replay
                    # from between them tears apart): a replay from there (held by another entity)
                    # would rebuild that window without the run's start, and report the tail as a new
                    # event, under another id. A replay from any later offset rebuilds none of the run's
                    # windows above (its first window ends past them), so nothing of the run is reported.
                    hold.last_ts = end_ts_list[i]
                    self._finished.append((entity, hold))
                hold = None
            if hold is None:
                if anchor is not None:  # this window started a run: hold at its oldest reading
                    hold = holds[entity] = _Hold(int(ready.partition[i]), int(ready.start_offset[i]),
                                                 end_ts_list[i], end_ts_list[i], opened=opened)
            else:
                hold.last_ts = end_ts_list[i]
                hold.opened = hold.opened or opened
            if hold is not None and above[i] and int(ready.partition[i]) == hold.stream:
                # past its oldest reading when one of its readings lies past a later slot's (placed out of
                # order within grace): a replay from between them filled that slot from it, and rebuilt the
                # run's tail as another window above, under a new id
                hold.through = int((ready.start_offset if ready.through_offset is None else ready.through_offset)[i])
        self._apply_holds(out, staged.clocks)
        return out

    def _warn_behind(self, names: set[str], idle_s: float, now_s: float) -> None:
        """Say (once a minute at most) which entities send readings stamped so far behind their partition's
        newest reading (a clock running late, local time sent as UTC) that each is late as it comes (or its
        entity evicted as idle in the batch that brought it) and never makes a window."""
        behind = self._behind.due(names, now_s)
        if behind:
            log.warning("%d entities sending readings more than %.0f s of stream time behind their partition's "
                        "newest are late as they come and not scored (a clock running late, or local time sent as "
                        "UTC?): %s", len(behind), idle_s, some(behind, quoted=True))

    def _warn_unaligned(self, names: Sequence[str], now_s: float) -> None:
        """Say (once a minute at most, naming every one heard of since the last time) which entities'
        readings keep missing the slots that end a window (``slot % worker.stride == 0``): sampled more
        slowly than the model's period, at another phase."""
        named = self._unaligned.due(names, now_s)
        if named:
            p = self._store.policy
            log.warning("%d entities send readings that keep missing the slots that end a window (every %d-th slot "
                        "of the model's %g s grid: worker.stride) and are not scored; they are sampled more slowly "
                        "than the model's period (set worker.stride = 1, or train a model on their own period): %s",
                        len(named), p.stride, p.period_s, some(named, quoted=True))

    def _warn_split(self, names: Sequence[str], now_s: float) -> None:
        """Say (once a minute at most, naming every one heard of since the last time) which entities send a
        slot's sensors in more than one reading with parts coming after the slot was sealed: those parts are
        dropped as duplicates, and their sensors carried over or filled."""
        named = self._split.due(names, now_s)
        if named:
            grace = self._store.policy.grace_slots
            log.warning("%d entities send a slot's sensors in more than one reading, and parts came after the slot "
                        "was sealed (worker.grace_slots = %d): they were dropped as duplicates and their sensors "
                        "filled. Send each slot's sensors in one reading, or set worker.grace_slots to %s so the "
                        "parts are merged: %s", len(named), grace, "1 or more" if grace == 0 else "more",
                        some(named, quoted=True))

    def set_maintenance(self, spans: Mapping[str, Sequence[tuple[float, float]]]) -> None:
        """The maintenance periods in force (entity -> (start, end)): an alert state anchored in one starts
        afresh at its end (``AlertTracker.maintenance``), so what goes on after the work is a new event."""
        self._alerts.maintenance = {entity: tuple(periods) for entity, periods in spans.items() if periods}

    def _check_silent(self, silent: dict[str, tuple[str, ...]]) -> int:
        """Say which sensors went silent since the last check (a warning) and how many came back (info);
        returns how many (entity, sensor) pairs are silent now. A sensor that stops sending (unplugged, dead)
        is scored on its typical value for as long as it is silent: its entity looks more normal than it may
        be, and nothing else says so."""
        before, self._silent = self._silent, silent
        new = {e: tuple(s for s in sensors if s not in before.get(e, ())) for e, sensors in silent.items()}
        new = {e: sensors for e, sensors in new.items() if sensors}
        back = sum(len(set(sensors) - set(silent.get(e, ()))) for e, sensors in before.items())
        if new:
            cap = self._store.policy.max_fill_steps
            log.warning("%d sensors of %d entities sent no value (null or absent) in more than worker.max_fill_steps "
                        "(%d) slots in a row: each is scored on its typical value (the model's training centre) "
                        "until it reports again, so its entity looks more normal than it may be: %s",
                        sum(map(len, new.values())), len(new), cap,
                        _entities_sensors(new))
        if back:
            log.info("%d sensors that had gone silent report again, or their entity left this worker; %d still "
                     "silent", back, sum(map(len, silent.values())))
        return sum(map(len, silent.values()))

    def _idle_s(self) -> float | None:
        """Stream seconds of silence after which an entity counts as gone: ``idle_timeout_s``, plus the
        slots the windowing itself may leave between two of an entity's windows (stride, grace, a gap it
        fills). With an hour alone, a 15-minute grid's entity one slot behind a neighbour lost its alert
        state between two windows of one fault (an event storm under new ids), and a 30-minute grid's
        short gap was evicted before it could be filled."""
        if self.idle_timeout_s is None:
            return None
        p = self._store.policy
        return self.idle_timeout_s + (p.stride + p.seal_lag + p.max_fill_steps + 1) * p.period_s

    def _expire(self, entity: str, out: BatchOutput) -> None:
        """``entity`` has been silent past the idle timeout: close its open event, end its hold."""
        hold = self._holds.pop(entity)
        for event in self._alerts.expire(entity):
            out.events.append((entity.encode("utf-8"), encode_event(event)))
            out.counts["events_closed"] += 1
        if hold.opened and hold.through is not None:
            # a run that opened an event, over: held as any finished run is (dropped, a replay from a
            # commit another entity holds inside it reported its tail under a new id)
            self._finished.append((entity, hold))

    def _apply_holds(self, out: BatchOutput, clocks: Mapping[int, float]) -> None:
        """Expire the alert state of entities silent for ``idle_timeout_s`` of their partition's stream time
        as the batch left it (``clocks``; closing open events; a lagging partition is measured by its own
        clock, not the batch's), release
        holds older than that, and keep this batch's commits at or before every remaining hold. A finished
        run's hold (``_finished``) pins the commit only while the commit would otherwise fall at or before
        its ``through`` (inside the run); once it is past, the hold is released."""
        holds, finished = self._holds, self._finished
        if not holds and not finished:
            return
        idle = self._idle_s()
        for entity, hold in list(holds.items()):
            newest = clocks.get(hold.stream) if idle is not None else None
            if newest is not None and newest - hold.last_ts > idle:
                self._expire(entity, out)
                continue
            key = self._stream_keys[hold.stream]
            if key in out.commits and hold.offset < out.commits[key]:
                out.commits[key] = hold.offset
        if not finished:
            return
        # Finished runs, after the live ones: a run pins the commit where it would fall inside it; pinning
        # only lowers commits, so repeat until no more runs are caught; the rest are released.
        kept: list[tuple[str, _Hold]] = []
        waiting: dict[Any, list[tuple[str, _Hold]]] = {}
        # (Never released by age: one released while it still pins would let a replay start inside its run;
        # the alert grid bounds how long a run can be caught.)
        for entity, hold in finished:
            key = self._stream_keys[hold.stream]
            if key in out.commits:
                waiting.setdefault(key, []).append((entity, hold))
            else:
                kept.append((entity, hold))  # no commit there: kept as is
        # Per stream, the runs reaching furthest first: each one the commit falls inside lowers it, and the
        # first it passes ends the stream's catch (the rest end earlier still). What repeating over them all
        # until none is caught gives, in one sorted pass: that was quadratic in the runs, 58 ms a batch
        # with 20,000 entities' runs held after a fleet-wide alarm.
        for key, runs_ in waiting.items():
            runs_.sort(key=lambda item: item[1].through, reverse=True)
            commit = out.commits[key]
            for item in runs_:
                if commit > item[1].through:
                    break
                commit = min(commit, item[1].offset)
                kept.append(item)
            out.commits[key] = commit
        self._finished = kept  # the waiting ones left: the commit is past their run, a replay sees none of it

    def _with_held(self, batches: list[PartitionBatch]) -> tuple[list[PartitionBatch], dict[int, bool]]:
        """``batches`` with each held reading put back in front of its partition's first run where the
        batch brings that partition from past it (else it stays held: a seek back is re-reading older
        records, which it must not come before), and the input positions of the held readings judged now,
        each with whether it was judged before (read again after a swap): those put back, and one read
        again after a seek back (judged where it is, not put in twice)."""
        runs: dict[int, list[int]] = {}
        for k, b in enumerate(batches):
            runs.setdefault(self._stream_id(b.topic, b.partition), []).append(k)
        out = list(batches)
        judged: dict[int, tuple[int, bool]] = {}  # run -> (the offset of the held reading judged in it, before)
        for stream in [s for s in self._held if s in runs]:
            offset, key, value, before = self._held[stream]
            where = [k for k in runs[stream] if offset in out[k].offsets]
            if where:  # read again (a seek back): judged there
                del self._held[stream]
                judged[where[0]] = (offset, before)
                continue
            if min(min(out[k].offsets) for k in runs[stream]) < offset:
                continue  # older records read again first: held until the re-read reaches it
            del self._held[stream]
            k = runs[stream][0]
            b = out[k]
            keys = None if b.keys is None and key is None else [key, *(b.keys or [None] * len(b.values))]
            out[k] = PartitionBatch(b.topic, b.partition, [offset, *b.offsets], keys, [value, *b.values])
            judged[k] = (offset, before)
        again: dict[int, bool] = {}
        position = 0
        for k, b in enumerate(out):
            if k in judged:
                offset, before = judged[k]
                again[position + b.offsets.index(offset)] = before
            position += len(b.values)
        return out, again

    def _replayed(self, stream_of: np.ndarray, offsets: Sequence[int]) -> np.ndarray | None:
        """Per record of a batch, whether it is read again after a swap (``swap_model(replay=True)``)."""
        replay = self._replay
        if replay is None or not replay.until or not len(stream_of):
            return None
        until = np.fromiter((replay.until.get(s, -1) for s in range(len(self._stream_keys))), dtype=np.int64,
                            count=len(self._stream_keys))
        replayed = np.asarray(offsets, dtype=np.int64) < until[stream_of]
        return replayed if replayed.any() else None

    def _stream_id(self, topic: str, partition: int) -> int:
        key = (topic, int(partition))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = len(self._stream_keys)
            self._stream_keys.append(key)
        return stream


@dataclass
class _Replay:
    """Re-reading partitions after a swap the window buffers did not survive (``swap_model(replay=True)``)."""

    until: dict[int, int]  # stream id -> the offset where the swap found it: records before it are read again
    scored: dict[str, float]  # entity -> end time of the old model's newest window for it (-inf: none)
    floor: dict[int, int] = field(default_factory=dict)  # stream id -> its commit before the swap

    @property
    def over(self) -> bool:
        """Nothing left to re-read, every commit past its floor, and every entity's new windows past the old
        model's newest."""
        return not self.until and not self.floor and not self.scored

    def done(self, streams: Sequence[int], floors: bool = False) -> None:
        """``streams`` re-read to where the swap found them (with ``floors``: revoked, floors gone too).
        ``scored`` stays: with grace, a window of the new grid ending before the old newest may be sealed
        only after the re-read is over (it was scored a second time, and broke the entity's alert run)."""
        for stream in streams:
            self.until.pop(stream, None)
            if floors:
                self.floor.pop(stream, None)

    def hold(self, commits: dict[int, int]) -> None:
        """Keep ``commits`` (stream id -> offset) at or above each stream's commit before the swap, until the
        new buffers' own pass it: a crash then re-reads no more than it would have (the holds of finished
        alert runs were released against that commit)."""
        for stream, offset in commits.items():
            floor = self.floor.get(stream)
            if floor is not None:
                if offset >= floor:
                    del self.floor[stream]
                else:
                    commits[stream] = floor

    def keep_only(self, held: Any) -> None:
        """Drop the marks of entities ``held`` (the window store) holds no more: evicted or revoked, their
        windows, if they come back, end after the old model's newest."""
        for entity in [e for e in self.scored if e not in held]:
            del self.scored[entity]

    def unscored(self, ready: ReadyBatch) -> ReadyBatch:
        """``ready`` less the windows the old model scored (ending at or before its newest for the entity)."""
        if not len(ready) or not self.scored:
            return ready
        scored = self.scored
        marks = np.fromiter((scored.get(e, -math.inf) for e in ready.entities), dtype=np.float64, count=len(ready))
        keep = marks < ready.end_ts
        for j in np.flatnonzero(keep).tolist():  # past the old newest (or none): the new model's from now on
            scored.pop(ready.entities[j], None)  # (an entity's windows come out in time order)
        if keep.all():
            return ready
        where = np.flatnonzero(keep)
        return ReadyBatch([ready.entities[j] for j in where.tolist()], ready.values[where], ready.end_ts[where],
                          ready.start_ts[where], ready.partition[where], ready.end_offset[where],
                          ready.filled[where], ready.start_offset[where],
                          None if ready.reading_ts is None else ready.reading_ts[where],
                          None if ready.through_offset is None else ready.through_offset[where],
                          None if ready.last_missing is None else ready.last_missing[where])


@dataclass
class _Hold:
    """Where an entity's alert state holds its partition's commit."""

    stream: int  # the store's id of the (topic, partition) of the run's first window
    offset: int  # oldest reading of that window
    start_ts: float  # end_ts of that window
    last_ts: float  # end_ts of the entity's newest scored window while in alert state
    opened: bool = False  # the run opened an event (a run that never did leaves nothing to replay)
    through: int | None = None  # the run's last window above its bar: ``ReadyBatch.through_offset`` (on ``stream``)


ROLL_NAMES_MAX = 10_000  # entities kept for the next warning that names them


class _Roll:
    """Entities to name in a warning logged once a minute at most: every one heard of since the last one."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._logged_s = -math.inf
        self._names: set[str] = set()

    def due(self, names: Iterable[str], now_s: float) -> list[str]:
        """Note ``names`` (up to ``ROLL_NAMES_MAX`` kept); the names to log now, sorted (empty: not due yet)."""
        if len(self._names) < ROLL_NAMES_MAX:
            self._names.update(names)
        if not self._names or now_s - self._logged_s < self.every_s:
            return []
        self._logged_s = now_s
        named, self._names = sorted(self._names), set()
        return named


def _key_text(key: bytes | None) -> str | None:
    """A record key as text for the log (the entity id, by the input contract; its first 256 bytes), None if absent."""
    return None if key is None else bytes(key[:256]).decode("utf-8", errors="replace")


def _entities_sensors(named: Mapping[str, Sequence[str]], shown: int = 10) -> str:
    """``pump-1: flow; pump-7: temp, flow`` for the first ``shown`` entities (sorted), then how many more."""
    items = sorted(named.items())
    text = "; ".join(f"{entity}: {', '.join(sensors)}" for entity, sensors in items[:shown])
    return text + (f"; and {len(items) - shown} more entities" if len(items) > shown else "")


def _foreign_stamps(decoded: DecodedBatch) -> tuple[np.ndarray, np.ndarray]:
    """The input positions and stamps of ``decoded``'s readings of another sensor set (dead letters whose
    time still counts as their partition's stream time)."""
    if not decoded.foreign:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    where, stamps = zip(*decoded.foreign)
    return np.asarray(where, dtype=np.int64), np.asarray(stamps, dtype=np.float64)


def _all_stamps(decoded: DecodedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Input positions and stamps of ``decoded``'s readings, then of its readings of another sensor set."""
    where, stamps = _foreign_stamps(decoded)
    return np.r_[decoded.index, where], np.r_[decoded.ts, stamps]


def _by_partition(positions: np.ndarray, streams: np.ndarray) -> list[np.ndarray]:
    """Indices into ``positions``, one array per partition (``streams``), each in arrival order."""
    order = np.lexsort((positions, streams))
    return np.split(order, np.flatnonzero(np.diff(streams[order])) + 1)


def _behind(decoded: DecodedBatch, stream_of: np.ndarray, store: WindowStore, limit_s: float) -> np.ndarray | None:
    """(n,) of ``decoded``'s readings, those stamped more than ``limit_s`` behind their partition's newest
    as they arrive (the partition's stream time before the batch, then the batch's readings before them,
    those of another sensor set too, which count as stream time): their entity would be evicted as idle,
    but a poll bringing a window of them would have scored it first. None: none."""
    n = len(decoded.index)
    if not n:
        return None
    positions, ts = _all_stamps(decoded)
    streams = stream_of[positions]
    ids = np.unique(streams).tolist()
    clocks = [t for p in ids if (t := store.stream_time(int(p))) is not None]
    if decoded.ts.min() >= max([float(ts.max()), *clocks]) - limit_s:  # none that far behind: the usual poll
        return None
    out: np.ndarray | None = None
    for where in _by_partition(positions, streams):
        stamps = ts[where]
        before = store.stream_time(int(streams[where[0]]))
        newest = np.maximum.accumulate(np.r_[-np.inf if before is None else before, stamps])[:-1]
        late = (newest - stamps > limit_s) & (where < n)  # only the readings are judged
        if late.any():
            if out is None:
                out = np.zeros(n, dtype=bool)
            out[where[late]] = True
    return out


def _refuse_future(decoded: DecodedBatch, now_s: float, max_future_s: float) -> DecodedBatch:
    """``decoded`` with readings stamped more than ``max_future_s`` ahead of ``now_s`` moved to its bad
    records: one such reading would otherwise make its entity's real readings late and, as its
    partition's newest, every other entity of the partition look idle."""
    limit = now_s + max_future_s
    foreign = [(i, ts) for i, ts in decoded.foreign if ts <= limit]  # dead letters either way; not stream time
    ahead = decoded.ts > limit
    if not ahead.any():
        return replace(decoded, foreign=foreign) if len(foreign) < len(decoded.foreign) else decoded
    keep = np.flatnonzero(~ahead)
    bad = decoded.bad + [(int(decoded.index[j]), f"ts is {decoded.ts[j] - now_s:.0f} s ahead of the worker's clock "
                          f"(more than worker.max_future_s = {max_future_s:g})") for j in np.flatnonzero(ahead)]
    return DecodedBatch(decoded.index[keep], [decoded.entities[j] for j in keep], decoded.ts[keep],
                        decoded.values[keep], sorted(bad), foreign)


LEAP_S = 3600.0  # with idle eviction off, how far a reading may leap ahead (see _refuse_leaps)


def _refuse_leaps(decoded: DecodedBatch, stream_of: np.ndarray, store: WindowStore, now_s: float,
                  limit_s: float, holding: set[int] = frozenset()) -> tuple[DecodedBatch, list[int]]:
    """``decoded`` without the lone leaps, for ``worker.max_future_s`` off: a reading stamped more than
    ``limit_s`` ahead of both ``now_s`` and the newest reading of its partition before it (its stream
    time, then the batch's readings in arrival order), after which the partition's readings in the batch
    go on from the old time (one of them more than ``limit_s`` behind it), goes to the bad records. One
    reading stamped years ahead (a producer's bug) became its partition's stream time: every later
    reading there late, its commit pinned, a restart no help. A sped-up replay's stamps run ahead of the
    clock, and jump where its recording has a gap, but go on from where they jumped: kept. Readings of
    another sensor set that leap are left out of the stream time (dead letters either way).

    A leap that is its partition's last stamp in the batch cannot be told from a jump yet: it is left
    out too, and its input position returned, for the caller to hold back and judge with the
    partition's next readings (a leap kept as the stream time made every later reading late until a
    restart). One of another sensor set is only left out of the stream time. Not on a partition in
    ``holding`` (one held already waits there for a re-read to reach it: the batch's are older records)."""
    n = len(decoded.index)
    positions, ts = _all_stamps(decoded)
    if not len(ts) or float(ts.max()) <= now_s + limit_s:  # the usual poll: nothing that far ahead
        return decoded, []
    streams = stream_of[positions]
    leaps = np.zeros(len(ts), dtype=bool)
    newest_before = np.full(len(ts), now_s)
    trailing = np.zeros(len(ts), dtype=bool)
    for part in _by_partition(positions, streams):
        before = store.stream_time(int(streams[part[0]]))
        start = now_s if before is None else max(now_s, before)
        leaps[part], newest_before[part] = lone_leaps(ts[part], start, limit_s)
        last, earlier = part[-1], part[:-1][~leaps[part[:-1]]]
        if int(streams[last]) in holding:
            continue
        if ts[last] > max(start, float(ts[earlier].max()) if len(earlier) else start) + limit_s:
            trailing[last] = not leaps[last]
    if not leaps.any() and not trailing.any():
        return decoded, []
    bad = list(decoded.bad) + [
        (int(positions[k]), f"ts is {ts[k] - now_s:.0f} s ahead of the worker's clock and {ts[k] - newest_before[k]:.0f} s "
                            f"ahead of its partition's newest reading, which the readings after it go on from (more "
                            f"than {limit_s:.0f} s; worker.max_future_s is off): it would make them all late")
        for k in np.flatnonzero(leaps[:n]).tolist()]
    held = [int(positions[k]) for k in np.flatnonzero(trailing[:n]).tolist()]
    keep = np.flatnonzero(~(leaps[:n] | trailing[:n]))
    out = leaps[n:] | trailing[n:]
    foreign = [item for item, leap in zip(decoded.foreign, out.tolist()) if not leap]
    return DecodedBatch(decoded.index[keep], [decoded.entities[j] for j in keep], decoded.ts[keep],
                        decoded.values[keep], sorted(bad), foreign), held


def _record_at(batches: Sequence[PartitionBatch], position: int) -> tuple[PartitionBatch, int]:
    """The run holding a batch's input ``position``, and the position within it."""
    for b in batches:
        if position < len(b.values):
            return b, position
        position -= len(b.values)
    raise IndexError(position)


def _key_at(batches: Sequence[PartitionBatch], position: int) -> bytes | None:
    """The key of the record at a batch's input ``position`` (None: a record without one)."""
    b, j = _record_at(batches, position)
    return b.keys[j] if b.keys is not None else None


def lone_leaps(stamps: np.ndarray, start: float, limit_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Which of one partition's ``stamps`` (in arrival order, after a stream time ``start``) are lone
    leaps: more than ``limit_s`` past the newest stamp before them (``start`` included), with a later
    stamp more than ``limit_s`` behind them (the partition goes on from before the leap). Also the newest
    stamp before each (leaps not counted). Pure; see ``_refuse_leaps``."""
    stamps = np.asarray(stamps, dtype=np.float64)
    leaps = np.zeros(len(stamps), dtype=bool)
    newest_before = np.full(len(stamps), float(start))
    # the lowest stamp after each reading: whether the partition goes on from before a leap
    after = np.r_[np.minimum.accumulate(stamps[::-1])[::-1][1:], np.inf]
    reach = np.maximum.accumulate(np.r_[start, stamps])[:-1]
    if not ((stamps > reach + limit_s) & (after < stamps - limit_s)).any():
        return leaps, newest_before  # no lone leap, even past those that rose with it: the usual sped-up poll
    newest = float(start)
    for k, (t, low) in enumerate(zip(stamps.tolist(), after.tolist())):
        newest_before[k] = newest
        if t > newest + limit_s and low < t - limit_s:  # a leap, and the stream goes on from before it
            leaps[k] = True
        elif t > newest:
            newest = t
    return leaps, newest_before


def _as_partition_batches(records: Sequence[InputRecord] | Sequence[PartitionBatch]) -> list[PartitionBatch]:
    """Records as runs of one topic-partition, in the order given (adapters hand over batches)."""
    if not records or isinstance(records[0], PartitionBatch):
        return list(records)  # type: ignore[arg-type]
    runs: list[PartitionBatch] = []
    current: tuple[str, int] | None = None
    for record in records:  # type: ignore[assignment]
        key = (record.topic, record.partition)
        if key != current:
            runs.append(PartitionBatch(record.topic, record.partition, [], [], []))
            current = key
        run = runs[-1]
        run.offsets.append(record.offset)
        run.keys.append(record.key)  # type: ignore[union-attr]
        run.values.append(record.value)
    return runs


def _score_record(entity: str, end_ts: float, start_ts: float, score: float | None, threshold: float,
                  name: str, version: str, filled: int) -> bytes:
    """One per-window score record for the optional scores topic (sorted-key JSON, like events)."""
    doc = {"entity": entity, "ts": end_ts, "start_ts": start_ts, "score": score, "threshold": threshold,
           "anomalous": score is not None and score > threshold, "filled": filled,
           "model": {"name": name, "version": version}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")
