"""Alert shaping: per-window scores in, anomaly events out, so one anomaly is one event. No I/O.

Owns the per-entity state machine between window scores and the events of DESIGN §2. It reads no
clock: time is each window's ``end_ts`` (stream time), so the same scores always give the same
events with the same ids.

Per entity, windows arrive in time order with a score and the threshold in force; a window is
*above* when ``score > threshold`` (as ``Threshold.flags``).

- **Open.** ``min_duration_windows`` consecutive windows above open an event: an ``"open"`` event is
  emitted with ``event_id = codec.event_id(entity, model_name, start_ts)``, where ``start_ts`` is the
  ``end_ts`` of the first window of that run. A shorter run opens nothing (its windows are forgotten
  at the first window at or below the threshold).
- **Close.** While open, ``recovery_windows`` consecutive windows at or below the threshold close it:
  a ``"closed"`` event is emitted with the same id. ``end``/``end_ts`` is the end of the last window
  above the threshold (the anomaly's extent, not the moment recovery was confirmed); ``windows`` counts
  the scored windows from the first above to that last above, inclusive.
- **Cooldown.** After a close, a new run above whose first window ends within ``cooldown_s`` of the
  close (the ``end_ts`` of the window that completed recovery) re-opens the SAME event, once that run
  too has lasted ``min_duration_windows``: an ``"open"`` event with the same id, ``start`` and peak so
  far, and later one more ``"closed"``. Why: a flapping sensor is one incident for the people paged,
  and downstream consumers upsert by ``event_id``, so the event's record simply reopens. A run that
  starts after the cooldown gets a new id.
- **Stream-time periods.** Alert state never spans a boundary of the stream-time grid of
  ``max_event_s`` (epoch-aligned: with an hour, the top of every hour; widened to ``MIN_SPLIT_WINDOWS``
  of the entity's window spacing, ``spacing_s``, where that is longer, so a slow grid does not cut at
  every window). An entity's first window past a boundary starts its state afresh: an open event is
  closed there (a ``"closed"`` event ending at its last window above, with ``continued: true`` when
  this window is above too: the anomaly goes on), a run or a cooldown is dropped, and this window is
  handled as for an entity at rest (an anomaly going on opens its continuation under a new id once
  it has lasted ``min_duration_windows``). Because every entity starts afresh at the same stream times,
  the state an open event rests on reaches back at most one period and a window, for every entity of
  a partition at once: a restart replays at most that much to re-derive every id.
- **Maintenance.** The end of an entity's maintenance period (``maintenance``: entity -> its periods,
  set by the worker from ``anomaly feedback maintenance``) is a boundary too, for a state anchored in
  the period: an anomaly that began during the work (whose events the worker holds back) and goes on
  after it is closed at the first window past its end and continues as a new event, which the worker
  raises (an hour could pass before the grid's next boundary).
- **Peak.** ``peak_score`` is the highest score of the event (a re-opened event keeps its earlier
  peak if higher). Scores of two model versions are on two scales, so across a model swap the window
  that is further over its own bar (``score / threshold``) is the higher (``_outranks``). ``sensors``
  (the ``top_k`` sensors by share of the reconstruction error, with actual and expected values),
  ``threshold``, ``peak_ts`` and ``model`` all describe that peak window. ``sensors_detail`` is called
  only when a window becomes the peak of a run, so windows below the threshold cost one comparison.

State is one small record per entity that is in a run, open, or in cooldown; entities at rest hold
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from anomaly.codec import event_id
from anomaly.errors import ConfigError

OPEN = "open"
CLOSED = "closed"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_SPLIT_WINDOWS = 60  # the grid's period is at least this many window spacings (``AlertTracker.spacing_s``)


@dataclass(frozen=True)
class AlertPolicy:
    """How window scores become events (see the module docstring)."""

    min_duration_windows: int = 3  # consecutive windows above the threshold before an event opens
    recovery_windows: int = 3  # consecutive windows at/below the threshold before it closes
    cooldown_s: float = 60.0  # a run starting within this long after a close re-opens the same event
    top_k: int = 3  # sensors listed in an event
    max_event_s: float = 3600.0  # period of the stream-time grid whose boundaries alert state never spans

    def __post_init__(self) -> None:
        for name in ("min_duration_windows", "recovery_windows", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"alerts.{name}", f"must be >= 1, got {getattr(self, name)!r}")
        if not (math.isfinite(self.cooldown_s) and self.cooldown_s >= 0):
            raise ConfigError("alerts.cooldown_s", f"must be a finite number >= 0, got {self.cooldown_s!r}")
        if not (math.isfinite(self.max_event_s) and self.max_event_s > 0):
            raise ConfigError("alerts.max_event_s", f"must be a finite number > 0, got {self.max_event_s!r}")


def rfc3339(ts: float) -> str:
    """Epoch seconds as an RFC 3339 UTC string with milliseconds, e.g. ``2026-11-21T10:00:00.250Z``."""
    ms = round(ts * 1000)
    moment = _EPOCH + timedelta(milliseconds=ms)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


@dataclass
class _Peak:
    score: float
    end_ts: float
    threshold: float
    model_name: str
    model_version: str
    sensors: list[dict[str, Any]]


@dataclass
class _Run:
    """A run of consecutive windows above the threshold that has not opened an event (yet)."""

    start_ts: float
    count: int
    peak: _Peak


@dataclass
class _Event:
    """An open event, or a closed one still inside its cooldown."""

    event_id: str
    start_ts: float
    is_open: bool
    seen: int  # windows scored since start_ts, inclusive
    windows: int  # ``seen`` at the last window above the threshold
    last_above_ts: float
    below: int  # consecutive windows at/below the threshold while open
    closed_ts: float  # end_ts of the window that closed it (meaningful when not open)
    peak: _Peak


def _outranks(score: float, threshold: float, model_name: str, model_version: str, peak: _Peak) -> bool:
    """Whether a window scoring ``score`` against ``threshold`` is a higher peak than ``peak``: by score
    under the same model version, by margin over the bar (``score / threshold``) across two versions,
    whose scores are on two scales (a smaller-scaled new champion could otherwise never name the
    sensors of a fault that starts after the swap)."""
    if peak.score == -math.inf:
        return True
    if (model_name, model_version) == (peak.model_name, peak.model_version) or not (threshold > 0 and peak.threshold > 0):
        return score > peak.score
    return score / threshold > peak.score / peak.threshold


class AlertTracker:
    """Per-entity alert state; ``update`` once per scored window, in time order per entity."""

    def __init__(self, policy: AlertPolicy, spacing_s: float = 0.0) -> None:
        self.policy = policy
        self.spacing_s = spacing_s  # stream seconds between two of an entity's windows (stride x period)
        self._runs: dict[str, _Run] = {}
        self._events: dict[str, _Event] = {}
        self.maintenance: dict[str, tuple[tuple[float, float], ...]] = {}  # entity -> its periods (start, end)

    def period_s(self) -> float:
        """The period of the stream-time grid: ``max_event_s``, or ``MIN_SPLIT_WINDOWS`` window spacings."""
        return max(self.policy.max_event_s, MIN_SPLIT_WINDOWS * self.spacing_s)

    def _period(self, ts: float) -> int:
        return math.floor(ts / self.period_s())

    def update(self, entity: str, end_ts: float, score: float, threshold: float,
               sensors_detail: Callable[[], list[dict[str, Any]]], model_name: str,
               model_version: str) -> list[dict[str, Any]]:
        """Feed one scored window; returns the events to emit now (``[]``, one ``open`` or one ``closed``, or,
        at a boundary of the grid with ``min_duration_windows`` 1, the cut event's ``closed`` and its
        continuation's ``open``).

        ``sensors_detail()`` returns the window's sensors ranked by share of the error, as dicts
        ``{"sensor", "share", "actual", "expected", "filled"}``; it is only called when this window becomes a peak.
        """
        policy = self.policy
        above = score > threshold
        event = self._events.get(entity)
        anchor = self.anchor_ts(entity)
        if anchor is not None and (self._period(anchor) != self._period(end_ts) or (
                entity in self.maintenance and any(start <= anchor <= end < end_ts
                                                   for start, end in self.maintenance[entity]))):
            # The first window past a boundary of the grid: the entity's state starts afresh here.
            self._runs.pop(entity, None)
            self._events.pop(entity, None)
            cut: list[dict[str, Any]] = []
            if event is not None and event.is_open:
                event.is_open = False
                event.closed_ts = end_ts
                cut.append(self._render(entity, event, continued=above))
            if not above:
                return cut
            return cut + self._grow_run(entity, None, end_ts, score, threshold, sensors_detail, model_name,
                                        model_version)

        if event is not None and event.is_open:
            event.seen += 1
            if above:
                event.below = 0
                event.windows = event.seen
                event.last_above_ts = end_ts
                if _outranks(score, threshold, model_name, model_version, event.peak):
                    event.peak = _Peak(score, end_ts, threshold, model_name, model_version, sensors_detail())
                return []
            event.below += 1
            if event.below < policy.recovery_windows:
                return []
            event.is_open = False
            event.closed_ts = end_ts
            return [self._render(entity, event)]

        # No open event: maybe one in cooldown, maybe a run building up.
        if event is not None:
            event.seen += 1
        run = self._runs.get(entity)
        if not above:
            if run is not None:
                del self._runs[entity]
            if event is not None and end_ts - event.closed_ts > policy.cooldown_s:
                del self._events[entity]
            return []
        if run is None and event is not None and end_ts - event.closed_ts > policy.cooldown_s:
            del self._events[entity]  # past its cooldown: the run starts afresh
            event = None
        return self._grow_run(entity, event, end_ts, score, threshold, sensors_detail, model_name, model_version)

    def _grow_run(self, entity: str, event: _Event | None, end_ts: float, score: float, threshold: float,
                  sensors_detail: Callable[[], list[dict[str, Any]]], model_name: str,
                  model_version: str) -> list[dict[str, Any]]:
        """A window above the threshold for an entity with no open event (``event``: one in cooldown,
        or None): it starts or extends the entity's run, which opens (or re-opens ``event``) once it has
        lasted ``min_duration_windows``."""
        policy = self.policy
        run = self._runs.get(entity)
        if run is None:
            run = self._runs[entity] = _Run(end_ts, 0, _Peak(-math.inf, end_ts, threshold, model_name,
                                                             model_version, []))
        run.count += 1
        if _outranks(score, threshold, model_name, model_version, run.peak):
            run.peak = _Peak(score, end_ts, threshold, model_name, model_version, sensors_detail())
        if run.count < policy.min_duration_windows:
            return []
        del self._runs[entity]
        if event is not None:  # the run started within the cooldown: re-open the same event
            event.is_open = True
            event.below = 0
            event.windows = event.seen
            event.last_above_ts = end_ts
            if _outranks(run.peak.score, run.peak.threshold, run.peak.model_name, run.peak.model_version, event.peak):
                event.peak = run.peak
        else:
            event = self._events[entity] = _Event(
                event_id=event_id(entity, model_name, run.start_ts), start_ts=run.start_ts, is_open=True,
                seen=run.count, windows=run.count, last_above_ts=end_ts, below=0, closed_ts=math.nan,
                peak=run.peak)
        return [self._render(entity, event)]

    def anchor_ts(self, entity: str) -> float | None:
        """The ``end_ts`` of the window the entity's alert state starts from (its event's first window, or
        its run's when it has no event), None at rest. A replay from that window's oldest reading derives
        the same state, so it moves on only when the state starts afresh (a new run, or the first window
        past a boundary of the grid)."""
        event = self._events.get(entity)
        if event is not None:
            return event.start_ts
        run = self._runs.get(entity)
        return None if run is None else run.start_ts

    def open_events(self) -> list[dict[str, Any]]:
        """The events open now, as they would be emitted (status ``open``), ordered by entity."""
        return [self._render(entity, event) for entity, event in sorted(self._events.items()) if event.is_open]

    def forget(self, entity: str | None = None) -> None:
        """Drop one entity's alert state, or everyone's (an open event then never gets its close)."""
        if entity is None:
            self._runs.clear()
            self._events.clear()
        else:
            self._runs.pop(entity, None)
            self._events.pop(entity, None)

    def expire(self, entity: str) -> list[dict[str, Any]]:
        """Drop ``entity``'s alert state (it went silent); an open event is closed first, at its last
        window above the threshold, and that ``"closed"`` event is returned, so it does not stay open
        downstream for ever."""
        self._runs.pop(entity, None)
        event = self._events.pop(entity, None)
        if event is None or not event.is_open:
            return []
        event.is_open = False
        event.closed_ts = event.last_above_ts
        return [self._render(entity, event)]

    def active_entities(self) -> set[str]:
        """Entities holding alert state (in a run, open, or in cooldown). For any other entity a window
        at or below the threshold changes nothing, so callers may skip ``update`` for it."""
        return self._runs.keys() | self._events.keys()

    @property
    def entities(self) -> int:
        """How many entities hold alert state (in a run, open, or in cooldown)."""
        return len(self._runs.keys() | self._events.keys())

    def _render(self, entity: str, event: _Event, continued: bool = False) -> dict[str, Any]:
        peak = event.peak
        closed = not event.is_open
        return {
            "event_id": event.event_id,
            "entity": entity,
            "status": CLOSED if closed else OPEN,
            "start": rfc3339(event.start_ts),
            "end": rfc3339(event.last_above_ts) if closed else None,
            "start_ts": float(event.start_ts),
            "end_ts": float(event.last_above_ts) if closed else None,
            "peak_score": float(peak.score),
            "peak_ts": float(peak.end_ts),
            "threshold": float(peak.threshold),
            "model": {"name": peak.model_name, "version": peak.model_version},
            "sensors": [dict(item) for item in peak.sensors[: self.policy.top_k]],
            "windows": int(event.windows),
            "continued": continued,
        }
