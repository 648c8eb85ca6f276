"""The message contracts of DESIGN §2 as bytes ⇄ Python values. No I/O, no Kafka.

Owns:
- input readings (``decode_reading`` / ``encode_reading``): JSON objects
  ``{"entity": str, "ts": RFC 3339 | epoch s | epoch ms, "values": {sensor: number | null}}``;
- dead letters (``encode_dead_letter`` / ``decode_dead_letter``): the original bytes, where they came
  from and why they were refused;
- anomaly events (``encode_event`` / ``decode_event``) and their deterministic ``event_id``.

Must not: read or write anything, import ``kafka``, or raise on bad input data. ``decode_reading``
turns every malformed record into a ``BadRecord`` with a human-readable reason (it becomes a dead
letter); only our own outputs (events, dead letters, readings we encode) raise ``DataError`` when they
cannot be represented, because that is a bug upstream, not bad data.

Timestamps. ``ts`` is read as:
- a string: RFC 3339 with a mandatory offset (``2026-11-21T10:00:00.250Z``, ``...+02:00``), any number
  of fractional digits; a leap second (``:60``) is read as the next second;
- a number: epoch **seconds** when ``ts < 1e11`` (1e11 s is the year 5138) and epoch **milliseconds**
  when ``1e11 <= ts < 1e14`` (1e11 ms is 1973-03-03, 1e14 ms is the year 5138 again). Larger numbers
  (micro/nanoseconds) and negative ones (before 1970) are refused rather than guessed.
The decoded ``Reading.ts`` is always float epoch seconds, UTC.

Batches. ``decode_batch`` decodes a whole poll column-wise for the worker (readings as arrays, no
``Reading`` per record). Its fast path parses with ``orjson`` and checks the common case (an object
with a non-blank ``entity``, a numeric ``ts`` and exactly the model's sensors as numbers or nulls) in
bulk; every record it does not accept goes through ``decode_reading``, which decides, so both give
the same readings and the same reasons (``tests/unit/test_codec.py`` checks this on mutated records).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from anomaly.errors import DataError

MS_THRESHOLD = 1e11  # epoch numbers at or above this are milliseconds: 1e11 s is the year 5138
MAX_EPOCH_MS = 1e14  # above this a number is probably micro/nanoseconds; refuse instead of guessing
# Largest |value| scored: the model works in float32 (max ~3.4e38); over the smallest scale a sensor can
# have (``scaling.MIN_SCALE``, 1e-20) it is at most ~2e35 scaled, and its error is clamped before it is
# squared (``scoring.MAX_ABS_ERROR``), so its score is huge, never inf.
MAX_ABS_VALUE = 1e15
# A dead letter keeps at most this many of the original's bytes (base64, ~4/3 of it): with the fields
# around it the dead letter stays under Kafka's default 1 MiB message limit. Longer originals are cut
# (``original_truncated``, ``original_size``); the whole record stays at its source offset.
DEAD_LETTER_MAX_ORIGINAL = 512 * 1024
DEAD_LETTER_MAX_UTF8 = 64 * 1024  # ``original_utf8`` (a readable copy) only for originals up to this size
# The most a whole dead letter (key and value) may take: under the producer's default max_request_size
# (1 MiB) with room for the record's framing. A record that would not fit keeps less of its original.
DEAD_LETTER_MAX_BYTES = 1_000_000
DEAD_LETTER_MAX_KEY = 64 * 1024  # a longer original key is left off the dead letter (``original_key_size``)
DEAD_LETTER_MAX_REASON = 1024  # characters of a reason (a reason names at most a few sensors anyway)
MAX_ENTITY_CHARS = 1024  # a longer entity id is a bad record: it is the key of every score and event record
_NAMES_SHOWN = 10  # sensor names listed in a reason; the rest are counted
_REPR_LIMIT = 60  # longest quoted bad value in a reason, so dead letters stay readable
EVENT_ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are not a concern at any event volume
_EVENT_ID_NAMESPACE = "anomaly-event/v1"  # bump only together with a documented id change


def too_large_to_score(values: np.ndarray) -> np.ndarray:
    """Where ``|value| >= MAX_ABS_VALUE``, ±inf included (NaN, a missing reading, never): the readings the
    worker dead-letters, and that tables and the pyfunc read as missing."""
    return np.abs(values) >= MAX_ABS_VALUE


@dataclass(frozen=True)
class Reading:
    """One decoded sensor reading.

    ``ts`` is epoch seconds (UTC); ``values`` maps sensor name to a finite float, or ``None`` when the
    sensor reported nothing (missing).
    """

    entity: str
    ts: float
    values: dict[str, float | None]


@dataclass(frozen=True)
class BadRecord:
    """A record that is not a valid reading; ``reason`` says why, for people (it goes to the DLQ).

    ``ts``: set once the record's entity and ``ts`` were read (its values are what is wrong: another
    sensor set than the model's, a value that is not a number...). Its time is real, so it still moves
    its partition's stream time on (an entity whose every reading is such a record then ages out like
    a silent one instead of holding its partition's commit, and its open event, for ever)."""

    reason: str
    ts: float | None = field(default=None, compare=False)


# --- readings ------------------------------------------------------------------------------------

class _NonFinite:
    """Stands in for the JSON tokens NaN/Infinity/-Infinity, which Python's json accepts.

    Returning a marker (instead of failing the whole parse) lets the reason name the field.
    """

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token

    def __repr__(self) -> str:
        return self.token


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # digits 0-9 only: \d alone also matches other scripts' digits
)


def _short(value: Any) -> str:
    """A bounded ``repr`` of a bad value for a reason string (JSON spelling for null/true/false)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _name(name: str) -> str:
    """A sensor name as a reason shows it: cut, like ``_short``, when it is long."""
    return name if len(name) <= _REPR_LIMIT else name[: _REPR_LIMIT - 3] + "..."


def _names(names: Iterable[str]) -> str:
    """Sorted sensor names for a reason: the first ``_NAMES_SHOWN``, each cut, then how many more."""
    ordered = sorted(names)
    shown = [_name(n) for n in ordered[:_NAMES_SHOWN]]
    more = len(ordered) - len(shown)
    return f"{shown}" + (f" and {more} more" if more else "")


def _describe(value: Any) -> str:
    """Type and value of a bad value, e.g. ``number 7``, ``string ''``, ``null``."""
    if value is None or isinstance(value, bool):
        return _short(value)
    return f"{_type_name(value)} {_short(value)}"


def _type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, _NonFinite)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _finite_float(value: Any) -> float | None:
    """``value`` as a finite float if it is a JSON number (bool is not), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer literal too large for a float
        return None
    return number if math.isfinite(number) else None


def _rfc3339_seconds(text: str) -> float | str:
    """Epoch seconds of an RFC 3339 timestamp, or the reason it is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return f"ts is not an RFC 3339 timestamp with an offset: {_short(text)}"
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction, zulu, sign, off_h, off_m = match.group(7, 8, 9, 10, 11)
    # Out of range whatever the offset, said before any date arithmetic: a leap second's check at the
    # calendar's ends (9999-12-31T23:59:60Z) stepped past year 9999 and raised OverflowError.
    if year < 1969:
        return f"ts is before 1970: {_short(text)}"
    if year > 5138:
        return f"ts is after the year 5138: {_short(text)}"
    leap = second == 60  # RFC 3339 allows a leap second; datetime does not
    try:
        if zulu:
            tz = timezone.utc
        else:
            if int(off_h) > 23 or int(off_m) > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            tz = timezone(-offset if sign == "-" else offset)
        moment = datetime(year, month, day, hour, minute, 59 if leap else second, tzinfo=tz)
    except ValueError as exc:
        return f"ts is not a valid date/time: {_short(text)} ({exc})"
    if leap:  # only the last second of a UTC month's last day (RFC 3339 5.7), whatever the offset
        utc = moment.astimezone(timezone.utc)
        if (utc.hour, utc.minute) != (23, 59) or (utc + timedelta(days=1)).day != 1:
            return f"ts is not a valid date/time: {_short(text)} (second 60, a leap second, only at 23:59:60 UTC " \
                   f"on a month's last day)"
    seconds = moment.timestamp() + (1.0 if leap else 0.0)
    if fraction:
        seconds += float(fraction)
    return seconds


def epoch_seconds_of(ts: Any) -> float | str:
    """A reading's ``ts`` (RFC 3339 string or epoch s/ms number) as epoch seconds, or the reason it is bad,
    as the input topic's contract reads it (for other places that take a time the same way)."""
    return _epoch_seconds(ts)


def _epoch_seconds(ts: Any) -> float | str:
    """``ts`` (RFC 3339 string or epoch s/ms number) as epoch seconds, or the reason it is bad. Never
    raises: a ts this code did not foresee is one bad record, not a batch that fails at every restart."""
    try:
        return _epoch_seconds_unguarded(ts)
    except MemoryError:  # the process's trouble, not the record's
        raise
    except Exception as exc:
        return f"ts cannot be read: {_short(ts)} ({type(exc).__name__}: {str(exc)[:_REPR_LIMIT]})"


def _epoch_seconds_unguarded(ts: Any) -> float | str:
    if isinstance(ts, str):
        seconds = _rfc3339_seconds(ts)
        if isinstance(seconds, float) and seconds < 0:
            return f"ts is before 1970: {_short(ts)}"
        if isinstance(seconds, float) and seconds >= MS_THRESHOLD:
            return f"ts is after the year 5138: {_short(ts)}"
        return seconds
    if isinstance(ts, _NonFinite):
        return f"ts is not finite: {ts.token}"
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return f"ts is neither an RFC 3339 string nor epoch seconds/milliseconds: {_describe(ts)}"
    number = _finite_float(ts)
    if number is None:  # a literal beyond a float (1e400, 400 digits): finite as written, too large
        if isinstance(ts, float) and math.isnan(ts):
            return f"ts is not finite: {_short(ts)}"
        number = math.inf if ts > 0 else -math.inf
    if number < 0:
        return f"ts is negative (before 1970): {_short(ts)}"
    if number < MS_THRESHOLD:
        return number
    if number < MAX_EPOCH_MS:
        return number / 1000.0
    return f"ts is too large for epoch seconds or milliseconds (micro/nanoseconds are not accepted): {_short(ts)}"


def _reject_constant(token: str) -> _NonFinite:
    return _NonFinite(token)


def entity_problem(entity: Any) -> str | None:
    """Why ``entity`` is not a usable entity id (the reason a reading carrying it is a dead letter), or None."""
    if not isinstance(entity, str) or not entity.strip():
        return f"entity is not a non-empty string: {_describe(entity)}"
    problem = _name_problem(entity)
    if problem:
        return f"entity {problem}: {_short(entity)}"
    if len(entity) > MAX_ENTITY_CHARS:
        return f"entity is longer than {MAX_ENTITY_CHARS} characters ({len(entity)}): {_short(entity)}"
    return None


def decode_reading(raw: bytes, expected_sensors: Collection[str] | None = None, *,
                   partial: bool = False, ignored: Collection[str] = ()) -> Reading | BadRecord:
    """One input record's bytes as a ``Reading``, or a ``BadRecord`` saying why not. Never raises.

    ``expected_sensors``: when given, the reading's sensor names must be exactly this set (the
    entity's model was trained on it); the reason names the missing and the unknown ones. With
    ``partial``, some of them will do (the absent ones are missing, as ``null`` is: a producer sending
    a slot's sensors one message each); an unknown one is still refused. ``ignored``: sensors a reading
    may also carry, left out of it unread and unchecked (those the model's training left out: constant,
    flat or mostly missing in its data, ``Detector.ignored_sensors``); one that carries nothing else is
    refused, or with ``partial`` is a reading of no sensor (a part of a slot sent a sensor a message).
    Unknown extra top-level fields are ignored; JSON duplicate keys keep the last value, as json does.
    """
    try:
        return _decode_reading(raw, expected_sensors, partial, ignored)
    except MemoryError:  # the process's trouble, not the record's: a good reading must not be dead-lettered
        raise
    except Exception as exc:  # an input this code did not foresee: one dead letter, not a failed batch
        return BadRecord(f"cannot decode: {type(exc).__name__}: {str(exc)[:_REPR_LIMIT]}")


def _decode_reading(raw: bytes, expected_sensors: Collection[str] | None, partial: bool,
                    ignored: Collection[str] = ()) -> Reading | BadRecord:
    if raw is None:
        return BadRecord("empty record: the value is null (a tombstone), not a reading")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return BadRecord(f"record value is {type(raw).__name__}, not bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(f"not UTF-8: invalid byte {raw[exc.start]:#04x} at position {exc.start}")
    if not text.strip():
        return BadRecord("empty record: no JSON in the value")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return BadRecord(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError as exc:  # deep nesting: json's limit depends on the caller's stack, orjson's is fixed
        try:  # (1,024 levels, as on decode_batch's fast path), so the same bytes always get the same outcome
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            return BadRecord(f"not usable JSON: {_short(str(exc))}")
    except ValueError as exc:  # e.g. an integer with > 4300 digits
        return BadRecord(f"not usable JSON: {_short(str(exc))}")
    if not isinstance(doc, dict):
        return BadRecord(f"not a JSON object: got {_type_name(doc)}")

    missing = [name for name in ("entity", "ts", "values") if name not in doc]
    if missing:
        return BadRecord(f"missing field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")

    entity = doc["entity"]
    problem = entity_problem(entity)
    if problem:
        return BadRecord(problem)

    ts = _epoch_seconds(doc["ts"])
    if isinstance(ts, str):
        return BadRecord(ts)

    # From here on the reading's time is known: a bad record still moves its partition's stream time.
    raw_values = doc["values"]
    if not isinstance(raw_values, dict):
        return BadRecord(f"values is not an object: got {_type_name(raw_values)}", ts=ts)
    if not raw_values:
        return BadRecord("values is empty: no sensor readings", ts=ts)
    if ignored and raw_values.keys() <= set(ignored):
        if partial:  # a part of a slot sent one sensor a message: this sensor's part, read past (no sensor of it)
            return Reading(entity=entity, ts=ts, values={})
        return BadRecord(f"values holds only sensors the model does not read ({_names(raw_values.keys())})", ts=ts)
    values: dict[str, float | None] = {}
    for name, value in raw_values.items():
        if name in ignored:
            continue
        if not name:
            return BadRecord("values has a sensor with an empty name", ts=ts)
        problem = _name_problem(name)
        if problem:
            return BadRecord(f"values has a sensor name that {problem}: {_short(name)}", ts=ts)
        if value is None:
            values[name] = None
            continue
        if isinstance(value, _NonFinite):
            return BadRecord(f"values.{_name(name)} is not finite: {value.token}", ts=ts)
        number = _finite_float(value)
        if number is None:
            if isinstance(value, float) and math.isnan(value):
                return BadRecord(f"values.{_name(name)} is not finite: {_short(value)}", ts=ts)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return BadRecord(f"values.{_name(name)} is not a number: {_short(value)}", ts=ts)
            number = math.inf  # a literal beyond a float (1e400, 400 digits): finite as written, too large
        if abs(number) >= MAX_ABS_VALUE:
            return BadRecord(f"values.{_name(name)} is too large to score (|value| >= {MAX_ABS_VALUE:.0e}): "
                             f"{_short(value)}", ts=ts)
        values[name] = number

    if expected_sensors is not None:
        expected = set(expected_sensors)
        got = set(values)
        if got != expected and not (partial and got <= expected):
            parts = []
            if expected - got and not partial:
                parts.append(f"missing {_names(expected - got)}")
            if got - expected:
                parts.append(f"unknown {_names(got - expected)}")
            hint = "" if partial or not got <= expected else " (worker.partial_readings = true accepts a reading of some)"
            if not got & expected:  # not one sensor in common: most likely another asset type's reading
                hint = (" (no sensor in common: another asset type's reading? each type's workers need a "
                        "kafka.group_id of their own, and an input topic of their own or worker.entities)")
            return BadRecord(f"sensor set does not match the entity's model: {'; '.join(parts)}{hint}", ts=ts)

    return Reading(entity=entity, ts=ts, values=values)


@dataclass(frozen=True)
class DecodedBatch:
    """The readings of a batch of records, column-wise (``decode_batch``), in input order."""

    index: np.ndarray  # (n,) int64: position in the input of each good reading
    entities: list[str]  # (n,) entity of each good reading
    ts: np.ndarray  # (n,) float64 epoch seconds
    values: np.ndarray  # (n, F) float64 in the sensor order asked; NaN = missing (null)
    bad: list[tuple[int, str]]  # (position, reason) of every bad record, in input order
    # (position, epoch seconds) of the bad records that are well-formed readings of another sensor set
    # (``BadRecord.ts``), in input order: dead letters whose time still counts as stream time
    foreign: list[tuple[int, float]] = field(default_factory=list)


_NUMBER_TYPES = frozenset({float, int})  # exact types: bool is not a number here
_VALUE_TYPES = frozenset({float, int, type(None)})


def decode_batch(raws: Sequence[bytes | None], sensors: Sequence[str], *, partial: bool = False,
                 ignored: Collection[str] = ()) -> DecodedBatch:
    """Decode many records at once; the same outcome per record as ``decode_reading(raw, sensors,
    partial=partial, ignored=ignored)`` (a reading with some of the sensors takes the slower way).

    Good readings come back as arrays (values in ``sensors`` order, NaN where the reading had null);
    bad ones as ``(position, reason)``. Never raises for bad input.
    """
    sensors = tuple(sensors)
    f = len(sensors)
    ignored = frozenset(ignored) - set(sensors)
    wanted = frozenset(sensors)
    index: list[int] = []
    entities: list[str] = []
    stamps: list[Any] = []
    cells: list[Any] = []
    slow: list[int] = []
    if f and all(sensors) and len(set(sensors)) == f:
        loads = orjson.loads
        fields = itemgetter("entity", "ts", "values")
        row_of = itemgetter(*sensors) if f > 1 else (lambda values: (values[sensors[0]],))
        add_entity, add_stamp, add_cells = entities.append, stamps.append, cells.extend
        for i, raw in enumerate(raws):
            try:
                if type(raw) is not bytes:
                    raise TypeError
                entity, ts, values = fields(loads(raw))  # not JSON, not an object, a field missing: raises
                if type(entity) is not str or type(values) is not dict or not entity \
                        or entity.isspace() or len(entity) > MAX_ENTITY_CHARS or not entity.isprintable():
                    raise TypeError
                if len(values) != f and not (ignored and values.keys() - wanted <= ignored):
                    raise TypeError
                row = row_of(values)  # KeyError: not the model's sensor set
            except Exception:  # decode_reading says why (or accepts it: bytearray, memoryview)
                slow.append(i)
                continue
            add_entity(entity)
            add_stamp(ts)
            add_cells(row)
        if slow:
            index = np.delete(np.arange(len(raws)), slow).tolist()
        else:
            index = list(range(len(raws)))
    else:
        slow = list(range(len(raws)))

    # Types in bulk: in the usual batch every ts is a number and every value a number or null.
    texts: list[bool] | None = None  # which ts were RFC 3339 strings (already epoch seconds)
    if not (_NUMBER_TYPES.issuperset(map(type, stamps)) and _VALUE_TYPES.issuperset(map(type, cells))):
        keep, texts = [], []
        for j, ts in enumerate(stamps):
            row = cells[j * f:(j + 1) * f]
            text = type(ts) is str
            if text:
                seconds = _epoch_seconds(ts)
                if isinstance(seconds, str):
                    keep.append(False)
                    continue
                stamps[j] = seconds
            ok = type(stamps[j]) in _NUMBER_TYPES and _VALUE_TYPES.issuperset(map(type, row))
            keep.append(ok)
            if ok:
                texts.append(text)
        if not all(keep):
            slow.extend(index[j] for j, ok in enumerate(keep) if not ok)
            index = [i for i, ok in zip(index, keep) if ok]
            entities = [e for e, ok in zip(entities, keep) if ok]
            stamps = [t for t, ok in zip(stamps, keep) if ok]
            cells = [c for j, ok in enumerate(keep) if ok for c in cells[j * f:(j + 1) * f]]
    n = len(index)
    ts_arr = np.array(stamps, dtype=np.float64).reshape(n)
    val_arr = np.array(cells, dtype=np.float64).reshape(n, f)  # null -> NaN
    # Numbers are epoch seconds or milliseconds by magnitude; anything else (negative, too large, not
    # finite) and a value that is not finite (orjson refuses NaN/Infinity and overflows, so none
    # should be) are left to decode_reading for the reason. RFC 3339 strings were converted above.
    numeric = np.ones(n, dtype=bool) if texts is None else ~np.array(texts, dtype=bool).reshape(n)
    millis = numeric & (ts_arr >= MS_THRESHOLD)
    refused = (numeric & (~np.isfinite(ts_arr) | (ts_arr < 0) | (ts_arr >= MAX_EPOCH_MS))) \
        | too_large_to_score(val_arr).any(axis=1)
    if millis.any():
        ts_arr = np.where(millis, ts_arr / 1000.0, ts_arr)
    if refused.any():
        slow.extend(index[j] for j in np.flatnonzero(refused))
        kept = np.flatnonzero(~refused)
        index = [index[j] for j in kept]
        entities = [entities[j] for j in kept]
        ts_arr, val_arr = ts_arr[kept], val_arr[kept]

    bad: list[tuple[int, str]] = []
    foreign: list[tuple[int, float]] = []
    if slow:
        expected = frozenset(sensors)
        extra_index, extra_entities, extra_ts, extra_values = [], [], [], []
        for i in sorted(slow):
            reading = decode_reading(raws[i], expected, partial=partial, ignored=ignored)  # type: ignore[arg-type]
            if isinstance(reading, BadRecord):
                bad.append((i, reading.reason))
                if reading.ts is not None:
                    foreign.append((i, reading.ts))
            else:
                extra_index.append(i)
                extra_entities.append(reading.entity)
                extra_ts.append(reading.ts)
                extra_values.append([reading.values.get(name) for name in sensors])
        if extra_index:
            order = np.argsort(np.array(index + extra_index, dtype=np.int64), kind="stable")
            merged_entities = entities + extra_entities
            index = [(index + extra_index)[j] for j in order]
            entities = [merged_entities[j] for j in order]
            ts_arr = np.concatenate([ts_arr, np.array(extra_ts, dtype=np.float64)])[order]
            val_arr = np.concatenate([val_arr, np.array(extra_values, dtype=np.float64).reshape(-1, f)])[order]
    return DecodedBatch(np.array(index, dtype=np.int64), entities, ts_arr, val_arr, bad, foreign)


def encode_reading(reading: Reading) -> bytes:
    """A reading as contract JSON (for replay): ``ts`` as epoch seconds, so it round-trips exactly.

    A NaN value is written as ``null`` (missing), the way pandas marks gaps; ±inf raises ``DataError``.
    ``reading.ts`` must be epoch seconds below ``MS_THRESHOLD`` or it would be read back as ms.
    """
    if not math.isfinite(reading.ts) or not 0 <= reading.ts < MS_THRESHOLD:
        raise DataError(f"reading ts must be epoch seconds in [0, {MS_THRESHOLD:.0e}), got {reading.ts!r}")
    values: dict[str, float | None] = {}
    for name, value in reading.values.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            values[name] = None
        elif isinstance(value, bool) or not math.isfinite(value):
            raise DataError(f"reading {reading.entity!r} values.{name} is not a finite number: {value!r}")
        else:
            values[name] = float(value)
    doc = {"entity": reading.entity, "ts": float(reading.ts), "values": values}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")


# --- dead letters --------------------------------------------------------------------------------

def encode_dead_letter(raw: bytes | None, topic: str, partition: int, offset: int, reason: str,
                       ts_s: float, key_size: int = 0, dropped_key_size: int | None = None) -> bytes:
    """A dead letter: the exact original bytes (base64), where they came from, why, and when (``ts_s``).

    ``original_utf8`` is added when the bytes are valid UTF-8 and at most ``DEAD_LETTER_MAX_UTF8`` long,
    so people can read them; consumers must use ``original_b64`` (it is exact, even for bytes that are not
    text). A null value gives nulls. An original longer than ``DEAD_LETTER_MAX_ORIGINAL`` keeps its first
    that many bytes, with ``original_truncated: true`` and ``original_size``; the reason is cut at
    ``DEAD_LETTER_MAX_REASON`` characters. With the record's key (``key_size`` bytes) the dead letter
    stays within ``DEAD_LETTER_MAX_BYTES``, under Kafka's default message size: where it would not, the
    readable copy goes and then the original keeps fewer bytes (a dead letter too large to send failed
    its batch, and the worker stopped at that record on every restart). ``dropped_key_size``: the
    original key was longer than ``DEAD_LETTER_MAX_KEY`` and is left off (``original_key_size``). The
    whole record is still at its source offset.
    """
    original = None if raw is None else bytes(raw)
    if len(reason) > DEAD_LETTER_MAX_REASON:
        reason = reason[: DEAD_LETTER_MAX_REASON - 40] + f"... ({len(reason)} characters in all)"
    doc: dict[str, Any] = {
        "reason": _printable(reason),
        "source_topic": topic,
        "source_partition": int(partition),
        "source_offset": int(offset),
        "ts": float(ts_s),
        "original_b64": None,
    }
    if dropped_key_size is not None:
        doc["original_key_size"] = int(dropped_key_size)
    if original is None:
        return _dumps_sorted(doc, what="dead letter")
    keep = min(len(original), DEAD_LETTER_MAX_ORIGINAL)
    readable = len(original) <= DEAD_LETTER_MAX_UTF8
    while True:
        if keep < len(original):
            doc["original_truncated"] = True
            doc["original_size"] = len(original)
        doc["original_b64"] = base64.b64encode(original[:keep]).decode("ascii")
        doc.pop("original_utf8", None)
        if readable:
            try:
                text = original.decode("utf-8")
            except UnicodeDecodeError:
                readable = False
            else:
                # control characters are written \u0000 in JSON, six bytes each: a record of them made a dead
                # letter seven times its size (64 KiB -> 470 KB), and no person reads it; the b64 is exact
                if 5 * (len(text) - len(text.translate(_CONTROLS))) > len(text):
                    readable = False
                else:
                    doc["original_utf8"] = _printable(text)
        out = _dumps_sorted(doc, what="dead letter")
        over = len(out) + key_size - DEAD_LETTER_MAX_BYTES
        if over <= 0 or keep == 0:
            return out
        if readable:  # the copy for people goes first
            readable = False
            continue
        keep = max(0, keep - (over * 3) // 4 - 4)  # base64: 4 characters for every 3 bytes


def decode_dead_letter(raw: bytes) -> dict[str, Any]:
    """A dead letter's fields, plus ``original``: the exact original bytes (``None`` for a null value)."""
    doc = _loads_object(raw, what="dead letter")
    b64 = doc.get("original_b64")
    try:
        doc["original"] = None if b64 is None else base64.b64decode(b64, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise DataError(f"dead letter original_b64 is not base64: {exc}") from exc
    return doc


# --- events --------------------------------------------------------------------------------------

def encode_event(event: Mapping[str, Any]) -> bytes:
    """An anomaly event as UTF-8 JSON with sorted keys, so the same event is always the same bytes."""
    return _dumps_sorted(dict(event), what="event")


def decode_event(raw: bytes) -> dict[str, Any]:
    """An anomaly event's fields."""
    return _loads_object(raw, what="event")


def event_id(entity: str, model_name: str, start_ts: float) -> str:
    """The deterministic id of the event of ``entity`` scored by ``model_name`` that starts at ``start_ts``.

    Same input ⇒ same id, so a re-delivered event after a crash is a duplicate downstream, not a new
    event. ``start_ts`` is normalised to a float (``1700000000`` and ``1700000000.0`` give one id).
    """
    start = float(start_ts) + 0.0  # + 0.0 folds -0.0 into 0.0
    if not math.isfinite(start):
        raise DataError(f"event start_ts must be finite, got {start_ts!r}")
    canonical = json.dumps([_EVENT_ID_NAMESPACE, entity, model_name, repr(start)], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:EVENT_ID_HEX_CHARS]


# --- helpers -------------------------------------------------------------------------------------

def _is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's ``\\ud800`` escapes decode to lone surrogates,
    which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: in an entity or sensor
# name they would forge or break log lines, metrics and reasons wherever the name is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _name_problem(text: str) -> str | None:
    """Why ``text`` cannot name an entity or a sensor (None: it can): a lone surrogate escape (not
    writable as UTF-8), or a control or line-break character. Printable text, the usual case, is
    passed by one call."""
    if text.isprintable():
        return None
    if not _is_unicode(text):
        return "is not Unicode text (a lone surrogate escape)"
    if _CONTROL.search(text):
        return "has a control or line-break character"
    return None


_CONTROLS = {c: None for c in range(0x20) if chr(c) not in "\t\n\r"}  # str.translate: delete them


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot hold (lone surrogates) written as backslash escapes."""
    return text if _is_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _dumps_sorted(doc: Mapping[str, Any], what: str) -> bytes:
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not JSON-serialisable: {exc}") from exc
    return text.encode("utf-8")


def _loads_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise DataError(f"{what} is not UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{what} is not a JSON object: got {_type_name(doc)}")
    return doc
