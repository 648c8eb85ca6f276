"""The anomaly events on the events topic, one line each, with the verdict operators gave: `anomaly events`.

An operator giving a verdict (`anomaly feedback normal EVENT_ID`) needed the event's id, and nothing
listed them outside `anomaly up`'s console: the events topic held them as open and closed records of
JSON. ``fold`` keeps each event's last record (its state now: closed with its end, or open), ``select``
narrows them (an entity, a time, the open ones, the newest N) and joins the verdict in force on each
(``verdict_for``), and ``line`` renders them as `anomaly up` does, with the verdict, or a note that an
open event has had no record for longer than ``worker.max_event_s`` (stale: README, "message formats").
Pure: reading the topics is ``feedback_topic.read_events``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anomaly.event_feed import duration, format_event
from anomaly.feedback import Verdict


@dataclass(frozen=True)
class Folded:
    """An event's last record, when it was written (epoch seconds, the Kafka record's timestamp; None if
    unknown) and whether it was closed before it was open again (re-opened within its cooldown)."""

    event: Mapping[str, Any]
    written_s: float | None
    reopened: bool = False


@dataclass(frozen=True)
class Listed:
    """One event as listed: its fold, the verdict in force on it, and whether it is stale."""

    folded: Folded
    verdict: Verdict | None
    stale: bool

    def to_dict(self) -> dict[str, Any]:
        """The event's last record, with ``verdict`` (the verdict's fields, or null), ``stale``,
        ``reopened`` and ``written_ts`` (when the record was written) added."""
        return {**self.folded.event, "verdict": None if self.verdict is None else self.verdict.to_dict(),
                "stale": self.stale, "reopened": self.folded.reopened, "written_ts": self.folded.written_s}


class Folder:
    """Each event's last record by id, as records are read (``add``: topic order within a partition, where
    one event's records are); ``events`` holds them. Records without a string ``event_id`` are passed over."""

    def __init__(self) -> None:
        self.events: dict[str, Folded] = {}

    def add(self, event: Mapping[str, Any], written_s: float | None) -> None:
        eid = event.get("event_id")
        if not isinstance(eid, str):
            return
        before = self.events.get(eid)
        reopened = before is not None and (before.reopened or before.event.get("status") == "closed") \
            and event.get("status") == "open"
        self.events[eid] = Folded(event, written_s, reopened)


def fold(records: Iterable[tuple[Mapping[str, Any], float | None]]) -> dict[str, Folded]:
    """``Folder`` over ``records`` at once: each event's last record, by id."""
    folder = Folder()
    for event, written_s in records:
        folder.add(event, written_s)
    return folder.events


def _span(event: Mapping[str, Any]) -> tuple[float | None, float]:
    """Start and end (inf while open) of an event record; a start that is not a number is None."""
    start = _number(event.get("start_ts"))
    end = _number(event.get("end_ts"))
    return start, (math.inf if end is None or event.get("status") == "open" else end)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def verdict_for(event: Mapping[str, Any], in_force: Sequence[Verdict]) -> Verdict | None:
    """The verdict in force on ``event``: one given on it (by its id), else one on a period of its entity
    that overlaps it (the latest given, of those: ``in_force`` is in the order they were given)."""
    eid = event.get("event_id")
    for v in reversed(in_force):
        if v.event_id is not None and v.event_id == eid:
            return v
    start, end = _span(event)
    if start is None:
        return None
    for v in reversed(in_force):
        if v.event_id is None and v.entity == event.get("entity") and v.start_ts <= end and v.end_ts >= start:
            return v
    return None


def select(folded: Mapping[str, Folded], in_force: Sequence[Verdict], *, now_s: float, stale_after_s: float,
           entity: str | None = None, since_s: float | None = None, open_only: bool = False,
           limit: int = 20) -> list[Listed]:
    """The events to list, oldest first: of ``entity``; still going at or after ``since_s`` (open, or
    ending then or later); only the open ones; the newest ``limit`` by start (0: every one). An open
    event whose last record was written more than ``stale_after_s`` before ``now_s`` is stale."""
    chosen: list[Folded] = []
    for f in folded.values():
        start, end = _span(f.event)
        if start is None or (entity is not None and f.event.get("entity") != entity):
            continue
        if since_s is not None and end < since_s:
            continue
        if open_only and f.event.get("status") != "open":
            continue
        chosen.append(f)
    chosen.sort(key=lambda f: (_span(f.event)[0], str(f.event.get("event_id"))))
    if limit > 0:
        chosen = chosen[-limit:]
    return [Listed(f, verdict_for(f.event, in_force),
                   f.event.get("status") == "open" and f.written_s is not None and now_s - f.written_s > stale_after_s)
            for f in chosen]


def line(listed: Listed, now_s: float, top: int = 3) -> str:
    """``format_event``'s line (as `anomaly up` prints it), then the verdict in force, or that it is stale."""
    f = listed.folded
    text = format_event(f.event, top=top, reopened=f.reopened)
    notes = []
    if listed.stale and f.written_s is not None:
        notes.append(f"stale: no record for {duration(now_s - f.written_s)}")
    v = listed.verdict
    if v is not None:
        said = f"{v.verdict}" + (" (period)" if v.event_id is None else "") + (f" by {v.by}" if v.by else "")
        notes.append(said + (f": {v.note}" if v.note else ""))
    return text + (f"  [{'; '.join(notes)}]" if notes else "")
