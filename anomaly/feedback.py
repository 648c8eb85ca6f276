"""Operators' verdicts on anomaly events (pure: encoding, reading back, what a retrain makes of them).

An operator who looks at an event says what it was: ``normal`` (a false alarm: the asset was doing
something ordinary the model had not seen, e.g. a new operating point after maintenance) or ``anomaly``
(a real fault). A verdict may also name a period of an entity without an event (a fault the model
missed, a maintenance stop). Verdicts go to the feedback topic (``kafka.feedback_topic``), keyed by
their ``feedback_id``: the event's id, or a hash of entity and period; a later verdict with the same id
replaces the earlier one (``withdrawn`` takes it back).

The retrain reads them back (``retrain._cycle``) and labels the readings of the history they cover:
``normal`` readings are trained on even where the champion flags them (without the verdict, what the
champion raised a false alarm on was kept out of every challenger's training, so the false alarm came
back after every retrain), and the hold-out counts the champion's alarms there as the false alarms they
are; ``anomaly`` readings are kept out with ``retrain.exclude_margin_rows`` around them, as a
labelled reading is, though the champion did not flag them. A reading's own label
(``retrain.label_field``) wins over a verdict; where a ``normal`` and an ``anomaly`` verdict overlap,
``anomaly`` wins.

``maintenance`` names a period of an entity (planned work, a stop, a calibration; it may end in the future)
whose readings are neither normal nor a fault: the worker raises no event that starts in it
(``maintenance.Muter``), and the retrain leaves its readings out of training and of the comparison.

The message (UTF-8 JSON, sorted keys), key = ``feedback_id``::

    {"feedback_id": "5f0c…", "event_id": "5f0c…", "entity": "pump-7", "start_ts": 1795255392.0,
     "end_ts": 1795255540.0, "verdict": "normal", "note": "new impeller", "by": "alice", "ts": 1795260000.0}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from anomaly.codec import entity_problem
from anomaly.errors import DataError

VERDICTS = ("normal", "anomaly", "maintenance", "withdrawn")
MAX_NOTE_CHARS = 1024
MAX_BY_CHARS = 256
_ID_NAMESPACE = "anomaly.feedback.v1"

Period = tuple[float, float, bool]  # start_ts, end_ts (inclusive, epoch seconds), True = anomaly


@dataclass(frozen=True)
class Verdict:
    """One operator's verdict on an event or a period of an entity."""

    feedback_id: str
    entity: str
    start_ts: float
    end_ts: float
    verdict: str
    event_id: str | None = None
    note: str = ""
    by: str = ""
    ts: float = 0.0  # when it was given (epoch seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def period_id(entity: str, start_ts: float, end_ts: float) -> str:
    """The ``feedback_id`` of a verdict on a period without an event: the same period, the same id."""
    canonical = json.dumps([_ID_NAMESPACE, entity, repr(float(start_ts) + 0.0), repr(float(end_ts) + 0.0)],
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def make_verdict(entity: str, start_ts: float, end_ts: float, verdict: str, *, event_id: str | None = None,
                 note: str = "", by: str = "", ts: float = 0.0) -> Verdict:
    """A checked ``Verdict`` (``DataError`` naming what is wrong); its id is the event's, else the period's."""
    problem = verdict_problem(entity, start_ts, end_ts, verdict, event_id, note, by)
    if problem:
        raise DataError(problem)
    fid = event_id or period_id(entity, start_ts, end_ts)
    return Verdict(fid, entity, float(start_ts), float(end_ts), verdict, event_id, note, by, float(ts))


def withdrawn(feedback_id: str) -> Verdict:
    """What a tombstone (a record with a key and no value: compaction's delete) on the feedback topic says:
    the verdict of ``feedback_id`` is taken back (kept until the log cleaner removes it, it would hold)."""
    return Verdict(feedback_id, "", 0.0, 0.0, "withdrawn")


def verdict_problem(entity: Any, start_ts: Any, end_ts: Any, verdict: Any, event_id: Any = None, note: Any = "",
                    by: Any = "") -> str | None:
    """Why these fields make no verdict, or None."""
    problem = entity_problem(entity)
    if problem:
        return problem
    for name, value in (("start_ts", start_ts), ("end_ts", end_ts)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} is not a finite number of epoch seconds: {value!r}"
    if end_ts < start_ts:
        return f"end_ts ({end_ts}) is before start_ts ({start_ts})"
    if verdict not in VERDICTS:
        return f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}"
    if event_id is not None and (not isinstance(event_id, str) or not event_id.strip()):
        return f"event_id is not a non-empty string: {event_id!r}"
    for name, value, limit in (("note", note, MAX_NOTE_CHARS), ("by", by, MAX_BY_CHARS)):
        if not isinstance(value, str):
            return f"{name} is not a string: {value!r}"
        if len(value) > limit:
            return f"{name} is longer than {limit} characters ({len(value)})"
    return None


def encode(verdict: Verdict) -> bytes:
    """A verdict as the feedback topic's UTF-8 JSON (sorted keys: the same verdict, the same bytes)."""
    return json.dumps(verdict.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")


def decode(raw: bytes | None) -> Verdict | str:
    """A feedback record's bytes as a ``Verdict``, or the reason they are none. Never raises."""
    if raw is None:
        return "no value (a tombstone)"
    try:
        doc = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        return f"not UTF-8 JSON: {exc}"
    if not isinstance(doc, dict):
        return f"not a JSON object: {type(doc).__name__}"
    missing = [k for k in ("feedback_id", "entity", "start_ts", "end_ts", "verdict") if k not in doc]
    if missing:
        return f"missing {', '.join(missing)}"
    fid = doc["feedback_id"]
    if not isinstance(fid, str) or not fid.strip():
        return f"feedback_id is not a non-empty string: {fid!r}"
    note, by, ts = doc.get("note") or "", doc.get("by") or "", doc.get("ts") or 0.0
    problem = verdict_problem(doc["entity"], doc["start_ts"], doc["end_ts"], doc["verdict"], doc.get("event_id"),
                              note, by)
    if problem:
        return problem
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return f"ts is not a finite number of epoch seconds: {ts!r}"
    return Verdict(fid, doc["entity"], float(doc["start_ts"]), float(doc["end_ts"]), doc["verdict"],
                   doc.get("event_id"), note, by, float(ts))


def latest(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """The verdict in force per ``feedback_id``: the last given (in the topic's order, which is the order
    of one id's records: one key, one partition), those ``withdrawn`` left out; in first-given order."""
    last: dict[str, Verdict] = {}
    for v in verdicts:
        last.pop(v.feedback_id, None)  # re-inserted: a changed mind moves to the end
        last[v.feedback_id] = v
    return [v for v in last.values() if v.verdict != "withdrawn"]


def periods(verdicts: Iterable[Verdict], pad_s: float = 0.0) -> dict[str, list[Period]]:
    """Per entity, the periods of the verdicts in force (``latest`` first): (start, end, is_anomaly), each
    widened by ``pad_s`` on both sides. An event's start and end are slot times, and a reading may be
    stamped up to half a period off its slot; a worker scoring every ``stride``-th window opened the event
    up to ``stride - 1`` slots after the first window the retrain (scoring every one) flags, and closed it
    as many before the last: unpadded, those windows stayed flagged and dropped the event's rows with
    their margin (``retrain._cycle`` pads by ``(worker.stride - 0.5)`` periods)."""
    out: dict[str, list[Period]] = {}
    for v in latest(verdicts):
        if v.verdict != "maintenance":
            out.setdefault(v.entity, []).append((v.start_ts - pad_s, v.end_ts + pad_s, v.verdict == "anomaly"))
    return out


def maintenance(verdicts: Iterable[Verdict], pad_s: float = 0.0) -> dict[str, list[tuple[float, float]]]:
    """Per entity, the ``maintenance`` periods in force (``latest``): (start, end), inclusive, each widened
    by ``pad_s`` on both sides, sorted."""
    out: dict[str, list[tuple[float, float]]] = {}
    for v in latest(verdicts):
        if v.verdict == "maintenance":
            out.setdefault(v.entity, []).append((v.start_ts - pad_s, v.end_ts + pad_s))
    return {entity: sorted(spans) for entity, spans in out.items()}


def within(ts: np.ndarray, spans: Sequence[tuple[float, float]]) -> np.ndarray:
    """Which of ``ts`` (epoch seconds) lie in one of ``spans`` (start, end, inclusive)."""
    ts = np.asarray(ts, dtype=np.float64)
    inside = np.zeros(len(ts), dtype=bool)
    for start, end in spans:
        inside |= (ts >= start) & (ts <= end)
    return inside


def labels_at(ts: np.ndarray, entity_periods: Sequence[Period]) -> np.ndarray:
    """The verdicts' labels of readings stamped ``ts`` (epoch seconds): 1.0 within an ``anomaly`` period,
    0.0 within only ``normal`` ones, NaN outside every period."""
    ts = np.asarray(ts, dtype=np.float64)
    out = np.full(len(ts), np.nan)
    for start, end, anomalous in sorted(entity_periods, key=lambda p: p[2]):  # anomaly last: it wins an overlap
        inside = (ts >= start) & (ts <= end)
        out[inside] = 1.0 if anomalous else 0.0
    return out


MIN_ID_PREFIX = 6  # the shortest start of an event id that `anomaly feedback` looks up (`up` shows 8)


def find_event(events: Iterable[Mapping[str, Any]], event_id: str) -> Mapping[str, Any] | None:
    """The event ``event_id`` among decoded event records (topic order: one event's records share a key,
    so a partition): its last record, ``closed`` with its end, or ``open`` (still open, or re-opened within
    its cooldown after a close: the earlier end is no longer its end). ``event_id`` may be the id's start
    (at least ``MIN_ID_PREFIX`` characters, as `anomaly up` shows ids) when one event's id starts so;
    ``DataError`` when several do."""
    found: dict[str, Mapping[str, Any]] = {}
    prefix = len(event_id) >= MIN_ID_PREFIX
    for event in events:
        eid = event.get("event_id")
        if not isinstance(eid, str) or not (eid == event_id or (prefix and eid.startswith(event_id))):
            continue
        found[eid] = event
    if event_id in found:
        return found[event_id]
    if len(found) > 1:
        raise DataError(f"{len(found)} events have ids starting with {event_id}: "
                        f"{', '.join(sorted(found)[:5])}{' ...' if len(found) > 5 else ''}; give more of it")
    return next(iter(found.values()), None)


def event_period(event: Mapping[str, Any]) -> tuple[str, float, float | None]:
    """An event record's entity, start and end (None while it is open); ``DataError`` if it lacks them."""
    entity, start, end = event.get("entity"), event.get("start_ts"), event.get("end_ts")
    if not isinstance(entity, str) or isinstance(start, bool) or not isinstance(start, (int, float)):
        raise DataError(f"event {event.get('event_id')!r} has no entity or start_ts: {dict(event)!r:.200}")
    if end is not None and (isinstance(end, bool) or not isinstance(end, (int, float))):
        raise DataError(f"event {event.get('event_id')!r} has an end_ts that is not a number: {end!r}")
    return entity, float(start), None if end is None else float(end)


def counts(verdicts: Sequence[Verdict]) -> Mapping[str, int]:
    """How many verdicts in force of each kind."""
    return {"normal": sum(v.verdict == "normal" for v in verdicts),
            "anomaly": sum(v.verdict == "anomaly" for v in verdicts),
            "maintenance": sum(v.verdict == "maintenance" for v in verdicts)}


def summary(verdicts: Sequence[Verdict]) -> str:
    """'3 verdicts (2 normal, 1 anomaly)', and ', 1 maintenance' where there are such."""
    n = counts(verdicts)
    more = f", {n['maintenance']} maintenance" if n["maintenance"] else ""
    return (f"{len(verdicts)} verdict{'s' if len(verdicts) != 1 else ''} ({n['normal']} normal, {n['anomaly']} "
            f"anomaly{more})")
