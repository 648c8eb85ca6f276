"""The anomaly events on the events topic, one line each, with the verdict operators gave: `anomaly events`.

An operator giving a verdict (`anomaly feedback normal EVENT_ID`) needed the event's id, and nothing
listed them outside `anomaly up`'s console: the events topic held them as open and closed records of
JSON. ``fold`` keeps each event's last record (its state now: closed with its end, or open), ``select``
narrows them (an entity, a time, the open ones, the newest N) and joins the verdict in force on each
(``verdicts_for``), and ``line`` renders them as `anomaly up` does, with the verdicts, or a note that an
open event has had no record for longer than ``worker.max_event_s`` (its entity went silent mid-event, its
model's alert grid is longer, or its worker died while it was open: README, "message formats").
Pure: reading the topics is ``feedback_topic.read_events``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anomaly.codec import decode_event, encode_event
from anomaly.errors import DataError
from anomaly.event_feed import duration, format_event
from anomaly.feedback import Verdict


@dataclass(frozen=True)
class Folded:
    """An event's last record (decoded, or its bytes, decoded again when shown: folded as decoded records,
    45,000 events took about 4 KB each, as bytes about 1.6 KB, and ``Folder`` about 170 B more per event for
    the hashes of its records), when it was written (epoch seconds, the Kafka record's
    timestamp; None if unknown), whether it was closed before it was open again (re-opened within its
    cooldown), and what choosing it reads: its status, entity, start and end (inf while open)."""

    record: Mapping[str, Any] | bytes
    written_s: float | None
    reopened: bool
    status: Any
    entity: Any
    start_ts: float | None
    end_ts: float

    @classmethod
    def of(cls, event: Mapping[str, Any], written_s: float | None, reopened: bool = False,
           raw: bytes | None = None) -> "Folded":
        start, end = _span(event)
        return cls(event if raw is None else raw, written_s, reopened, event.get("status"), event.get("entity"),
                   start, end)

    @property
    def event(self) -> Mapping[str, Any]:
        return decode_event(self.record) if isinstance(self.record, bytes) else self.record


@dataclass(frozen=True)
class Listed:
    """One event as listed: its fold, the verdicts in force on it (in the order given), and whether it is
    stale (open, and no record for longer than ``worker.max_event_s``)."""

    folded: Folded
    verdicts: tuple[Verdict, ...]
    stale: bool

    def to_dict(self) -> dict[str, Any]:
        """The event's last record, with ``verdicts`` (each verdict's fields), ``stale``, ``reopened`` and
        ``written_ts`` (when the record was written) added."""
        return {**self.folded.event, "verdicts": [v.to_dict() for v in self.verdicts],
                "stale": self.stale, "reopened": self.folded.reopened, "written_ts": self.folded.written_s}


class Folder:
    """Each event's last record by id, as records are read (``add``: topic order within a partition, where
    one event's records are); ``events`` holds them, of ``entity`` only when given (the others are not
    kept). Records without a string ``event_id`` are passed over, and so is a record
    written before the one held (an event whose records went to two partitions, the topic's partitions
    added while it was open), and one the same as a record of its event read before: a restarted worker
    re-reads from its committed offsets and sends an event's records again, the same bytes each time (its
    open record again after its close made a closed event look re-opened until the close came again)."""

    def __init__(self, entity: str | None = None) -> None:
        self.events: dict[str, Folded] = {}
        self.entity = entity
        self._seen: dict[str, tuple[int, ...]] = {}  # event id -> hashes of its records read so far

    def add(self, event: Mapping[str, Any], written_s: float | None, raw: bytes | None = None) -> None:
        """Fold in one record (``raw``: its bytes, held instead of the decoded ``event``)."""
        eid = event.get("event_id")
        if not isinstance(eid, str) or (self.entity is not None and event.get("entity") != self.entity):
            return
        try:
            key = hash(raw if raw is not None else encode_event(event))
        except DataError:  # (not JSON: not a record a worker sent)
            key = None
        seen = self._seen.get(eid, ())
        if key is not None:
            if key in seen:
                return  # sent again (a replay): the event stands as its later records left it
            self._seen[eid] = (*seen, key)
        before = self.events.get(eid)
        if before is not None and written_s is not None and before.written_s is not None \
                and written_s < before.written_s:
            return
        reopened = before is not None and (before.reopened or before.status == "closed") \
            and event.get("status") == "open"
        self.events[eid] = Folded.of(event, written_s, reopened, raw)


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


def verdicts_for(event: Mapping[str, Any], in_force: Sequence[Verdict]) -> tuple[Verdict, ...]:
    """The verdicts in force on ``event``, in the order given: the one given on it (by its id) and those on
    periods of its entity that overlap it. The retrain applies them all to the readings each covers
    (``anomaly`` over ``normal``; ``maintenance`` leaves them out)."""
    eid = event.get("event_id")
    start, end = _span(event)
    return tuple(v for v in in_force
                 if (v.event_id is not None and v.event_id == eid)
                 or (v.event_id is None and start is not None and v.entity == event.get("entity")
                     and v.start_ts <= end and v.end_ts >= start))


def select(folded: Mapping[str, Folded], in_force: Sequence[Verdict], *, now_s: float, stale_after_s: float,
           entity: str | None = None, since_s: float | None = None, open_only: bool = False) -> list[Listed]:
    """The events to list, oldest first by start (stream time): of ``entity``; still going at or after
    ``since_s`` (open, or ending then or later, in stream time); only the open ones. An open event whose
    last record was written more than ``stale_after_s`` before ``now_s`` (wall clock) is stale."""
    chosen: list[tuple[float, str, Folded]] = []
    for eid, f in folded.items():
        if f.start_ts is None or (entity is not None and f.entity != entity):
            continue
        if since_s is not None and f.end_ts < since_s:
            continue
        if open_only and f.status != "open":
            continue
        chosen.append((f.start_ts, eid, f))
    chosen.sort(key=lambda item: item[:2])
    return [Listed(f, verdicts_for(f.event, in_force),
                   f.status == "open" and f.written_s is not None and now_s - f.written_s > stale_after_s)
            for _, _, f in chosen]


def line(listed: Listed, now_s: float, top: int = 3) -> str:
    """``format_event``'s line (as `anomaly up` prints it), then the verdicts in force, or that an open
    event has had no record for long."""
    f = listed.folded
    text = format_event(f.event, top=top, reopened=f.reopened)
    notes = []
    if listed.stale and f.written_s is not None:
        notes.append(f"no record for {duration(now_s - f.written_s)}")
    for v in listed.verdicts:
        said = f"{v.verdict}" + (" (period)" if v.event_id is None else "") + (f" by {v.by}" if v.by else "")
        notes.append(said + (f": {v.note}" if v.note else ""))
    return text + (f"  [{'; '.join(notes)}]" if notes else "")
