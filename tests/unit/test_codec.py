"""The message contracts of DESIGN §2: bad records become BadRecord (never an exception), good ones
parse, dead letters keep the exact original bytes, event ids are deterministic."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timezone

import numpy as np
import pytest

from anomaly.codec import (DEAD_LETTER_MAX_ORIGINAL, BadRecord, Reading, decode_batch, decode_dead_letter, decode_event, decode_reading,
                           encode_dead_letter, encode_event, encode_reading, event_id)
from anomaly.errors import DataError

T0 = datetime(2026, 11, 21, 10, 0, 0, 250000, tzinfo=timezone.utc).timestamp()


def reading_json(**fields: object) -> bytes:
    doc: dict[str, object] = {"entity": "pump-7", "ts": "2026-11-21T10:00:00.250Z",
                              "values": {"temp": 71.2, "pressure": 1.04, "flow": None}}
    for name, value in fields.items():
        if value is DROP:
            doc.pop(name)
        else:
            doc[name] = value
    return json.dumps(doc).encode()


DROP = object()


# --- good records --------------------------------------------------------------------------------

def test_contract_example_parses() -> None:
    got = decode_reading(reading_json())
    assert got == Reading(entity="pump-7", ts=T0, values={"temp": 71.2, "pressure": 1.04, "flow": None})


@pytest.mark.parametrize("ts", [
    "2026-11-21T10:00:00.250Z",
    "2026-11-21t10:00:00.250z",
    "2026-11-21 10:00:00.250Z",
    "2026-11-21T12:00:00.250+02:00",
    "2026-11-21T05:30:00.250-04:30",
    "2026-11-21T10:00:00.250000000Z",  # nanosecond digits
    T0,  # epoch seconds
    T0 * 1000,  # epoch milliseconds
    int(T0 * 1000),
])
def test_timestamps_in_every_accepted_form(ts: object) -> None:
    got = decode_reading(reading_json(ts=ts))
    assert isinstance(got, Reading), got
    assert got.ts == pytest.approx(T0, abs=1e-6)


def test_epoch_seconds_vs_milliseconds_by_magnitude() -> None:
    assert decode_reading(reading_json(ts=1_700_000_000)).ts == 1_700_000_000.0
    assert decode_reading(reading_json(ts=1_700_000_000_000)).ts == 1_700_000_000.0
    assert decode_reading(reading_json(ts=99_999_999_999)).ts == 99_999_999_999.0  # year 5138, seconds
    assert decode_reading(reading_json(ts=100_000_000_000)).ts == 100_000_000.0  # 1973 in ms
    assert decode_reading(reading_json(ts=0)).ts == 0.0


def test_rfc3339_without_fraction_and_leap_second() -> None:
    assert decode_reading(reading_json(ts="1970-01-01T00:00:10Z")).ts == 10.0
    assert decode_reading(reading_json(ts="2016-12-31T23:59:60Z")).ts == datetime(
        2017, 1, 1, tzinfo=timezone.utc).timestamp()
    # the same leap second written in another offset (RFC 3339's example: 15:59:60-08:00)
    assert decode_reading(reading_json(ts="1990-12-31T15:59:60-08:00")).ts == datetime(
        1991, 1, 1, tzinfo=timezone.utc).timestamp()
    assert decode_reading(reading_json(ts="2015-06-30T23:59:60.5Z")).ts == datetime(
        2015, 7, 1, tzinfo=timezone.utc).timestamp() + 0.5


@pytest.mark.parametrize("ts", ["2026-11-21T10:00:60Z", "2026-11-20T23:59:60Z", "1990-12-31T23:59:60-08:00"])
def test_a_second_60_anywhere_but_a_months_last_utc_second_is_refused(ts: str) -> None:
    """It used to be accepted at any minute, as the next minute's first second."""
    got = decode_reading(reading_json(ts=ts))
    assert isinstance(got, BadRecord) and "leap second" in got.reason and ts in got.reason


@pytest.mark.parametrize("ts, why", [
    ("9999-12-31T23:59:60Z", "after the year 5138"), ("9999-12-31T23:59:60-01:00", "after the year 5138"),
    ("0001-01-01T00:59:60+01:00", "before 1970"), ("0001-01-01T00:30:00+01:00", "before 1970")])
def test_a_leap_second_at_the_end_of_the_calendar_is_a_bad_record_not_a_crash(ts: str, why: str) -> None:
    """Its check stepped past year 9999 (or before year 1) and raised OverflowError: the batch failed,
    nothing was committed, and the worker crashed on the same record at every restart."""
    raw = reading_json(ts=ts)
    got = decode_reading(raw)
    assert isinstance(got, BadRecord) and why in got.reason and ts in got.reason
    batch = decode_batch([reading_json(ts=1_700_000_000), raw], ("temp", "pressure", "flow"))
    assert len(batch.entities) == 1 and [i for i, _ in batch.bad] == [1] and why in batch.bad[0][1]


def test_an_unforeseen_error_while_decoding_is_one_bad_record(monkeypatch) -> None:
    """Defence in depth: whatever raises inside the decoder dead-letters that record only."""
    from anomaly import codec

    def broken(text):
        raise OverflowError("date value out of range")

    monkeypatch.setattr(codec, "_rfc3339_seconds", broken)
    raw = reading_json(ts="2026-11-21T10:00:00Z")
    got = decode_reading(raw)
    assert isinstance(got, BadRecord) and "OverflowError: date value out of range" in got.reason
    batch = decode_batch([reading_json(ts=1_700_000_000), raw], ("temp", "pressure", "flow"))
    assert len(batch.entities) == 1 and [i for i, _ in batch.bad] == [1]
    assert "OverflowError" in batch.bad[0][1]

    def no_memory(text):
        raise MemoryError

    monkeypatch.setattr(codec, "_rfc3339_seconds", no_memory)  # the process's trouble: not a dead letter
    with pytest.raises(MemoryError):
        decode_reading(raw)


def test_nulls_are_missing_values_and_ints_become_floats() -> None:
    got = decode_reading(reading_json(values={"a": None, "b": 3, "c": -0.5}))
    assert isinstance(got, Reading)
    assert got.values == {"a": None, "b": 3.0, "c": -0.5}
    assert isinstance(got.values["b"], float)


def test_unknown_top_level_fields_are_ignored() -> None:
    got = decode_reading(reading_json(site="north", extra={"x": [1, 2]}, note=float("nan")))
    assert isinstance(got, Reading) and got.entity == "pump-7"


def test_expected_sensors_match_in_any_order() -> None:
    got = decode_reading(reading_json(), expected_sensors=["flow", "temp", "pressure"])
    assert isinstance(got, Reading)


def test_bytearray_and_memoryview_are_accepted() -> None:
    raw = reading_json()
    assert isinstance(decode_reading(bytearray(raw)), Reading)
    assert isinstance(decode_reading(memoryview(raw)), Reading)


# --- bad records ---------------------------------------------------------------------------------

BAD = [
    # (raw bytes, words the reason must contain)
    (b"\xff\xfe{}", ["not UTF-8", "0xff", "position 0"]),
    (b"", ["empty"]),
    (b"   \n", ["empty"]),
    (b"{\"entity\": ", ["not JSON"]),
    (b"hello", ["not JSON"]),
    (b"[1, 2]", ["not a JSON object", "array"]),
    (b"42", ["not a JSON object", "number"]),
    (b"null", ["not a JSON object", "null"]),
    (b"\"text\"", ["not a JSON object", "string"]),
    (reading_json(entity=DROP), ["missing field", "entity"]),
    (reading_json(ts=DROP), ["missing field", "ts"]),
    (reading_json(values=DROP), ["missing field", "values"]),
    (reading_json(entity=DROP, ts=DROP), ["missing fields", "entity, ts"]),
    (reading_json(entity=""), ["entity is not a non-empty string"]),
    (reading_json(entity="  "), ["entity is not a non-empty string"]),
    (reading_json(entity=7), ["entity is not a non-empty string", "number 7"]),
    (reading_json(entity=None), ["entity is not a non-empty string", "null"]),
    (reading_json(ts="yesterday"), ["ts is not an RFC 3339 timestamp", "'yesterday'"]),
    (reading_json(ts="2026-11-21T10:00:00"), ["ts is not an RFC 3339 timestamp with an offset"]),  # naive
    (reading_json(ts="2026-11-21"), ["ts is not an RFC 3339"]),
    (reading_json(ts="1700000000"), ["ts is not an RFC 3339"]),  # a number as a string
    (reading_json(ts="2026-13-01T00:00:00Z"), ["ts is not a valid date/time", "month"]),
    (reading_json(ts="2026-02-30T00:00:00Z"), ["ts is not a valid date/time"]),
    (reading_json(ts="2026-11-21T10:00:00+25:00"), ["ts is not a valid date/time"]),
    (reading_json(ts="1969-12-31T23:59:59Z"), ["before 1970"]),
    (reading_json(ts=True), ["ts is neither", "true"]),
    (reading_json(ts=None), ["ts is neither", "null"]),
    (reading_json(ts=[1]), ["ts is neither", "array"]),
    (reading_json(ts=-5), ["ts is negative"]),
    (reading_json(ts=1.7e15), ["ts is too large", "micro/nanoseconds"]),
    (reading_json(values=[1, 2]), ["values is not an object", "array"]),
    (reading_json(values="x"), ["values is not an object", "string"]),
    (reading_json(values={}), ["values is empty"]),
    (reading_json(values={"": 1.0}), ["empty name"]),
    (reading_json(values={"temp": "abc"}), ["values.temp is not a number: 'abc'"]),
    (reading_json(values={"temp": "71.2"}), ["values.temp is not a number: '71.2'"]),
    (reading_json(values={"temp": True}), ["values.temp is not a number: true"]),
    (reading_json(values={"temp": [1.0]}), ["values.temp is not a number"]),
    (reading_json(values={"temp": {"v": 1}}), ["values.temp is not a number"]),
    (b'{"entity": "p", "ts": 1, "values": {"temp": NaN}}', ["values.temp is not finite: NaN"]),
    (b'{"entity": "p", "ts": 1, "values": {"temp": Infinity}}', ["values.temp is not finite: Infinity"]),
    (b'{"entity": "p", "ts": 1, "values": {"temp": -Infinity}}', ["values.temp is not finite: -Infinity"]),
    # beyond a float (1e999, 400 digits) is finite as written: too large, not "not finite"
    (b'{"entity": "p", "ts": 1, "values": {"temp": 1e999}}', ["values.temp is too large to score", "inf"]),
    (b'{"entity": "p", "ts": 1, "values": {"temp": -1' + b"0" * 400 + b"}}", ["values.temp is too large to score"]),
    (b'{"entity": "p", "ts": NaN, "values": {"temp": 1}}', ["ts is not finite: NaN"]),
    (b'{"entity": "p", "ts": 1e999, "values": {"temp": 1}}', ["ts is too large for epoch seconds"]),
    (b'{"entity": "p", "ts": -1' + b"0" * 400 + b', "values": {"temp": 1}}', ["ts is negative"]),
    (b'{"entity": "p", "ts": 1, "values": {"temp": 1' + b"0" * 5000 + b"}}", ["not usable JSON"]),
    (b"[" * 100_000 + b"]" * 100_000, ["JSON"]),  # absurd nesting
    (b"\xef\xbb\xbf" + reading_json(), ["not JSON"]),  # a UTF-8 byte-order mark
    (reading_json(ts="9999-12-31T23:59:59-01:00"), ["ts is after the year 5138"]),  # > the largest epoch number
    (reading_json(values={"temp": 1e15}), ["values.temp is too large to score", "1e+15"]),  # float32 squares overflow
    (reading_json(values={"temp": -2e20}), ["values.temp is too large to score"]),
    (b'{"entity": "\\ud800", "ts": 1, "values": {"temp": 1}}', ["entity is not Unicode text", "'\\ud800'"]),
    (b'{"entity": "p", "ts": 1, "values": {"t\\udc00": 1}}', ["sensor name that is not Unicode text"]),
    # a name that would forge a log line or move the terminal cursor: refused, shown escaped
    (reading_json(values={"temp\nERROR forged": "x"}), ["sensor name that has a control or line-break",
                                                        "'temp\\nERROR forged'"]),
    (reading_json(values={"\x1b[2Jtemp": 1.0}), ["sensor name that has a control", "'\\x1b[2Jtemp'"]),
    (reading_json(entity="pump\r\n1"), ["entity has a control or line-break character", "'pump\\r\\n1'"]),
    (reading_json(entity="pump\u20281"), ["entity has a control or line-break character"]),
]


@pytest.mark.parametrize("raw, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_records_give_a_clear_reason(raw: bytes, words: list[str]) -> None:
    got = decode_reading(raw)
    assert isinstance(got, BadRecord), got
    for word in words:
        assert word in got.reason, (word, got.reason)
    assert len(got.reason) < 300  # readable in a dead-letter viewer


def test_how_deep_an_ignored_field_may_nest_does_not_depend_on_the_path_or_the_callers_stack() -> None:
    """orjson (the batch's fast path) nests to 1,024 levels; json.loads to the recursion limit less the caller's
    own stack. A reading nested 1,000 deep was scored by the worker and refused by ``decode_reading``, and a
    record off the fast path (a no-break space in its entity) flipped with the depth of the caller's stack."""
    def record(depth: int, entity: str = "pump-7") -> bytes:
        return (b'{"entity": ' + json.dumps(entity).encode() + b', "ts": 1700000000, "values": {"temp": 1.5},'
                b' "meta": ' + b"[" * depth + b"]" * depth + b"}")

    def deeper(frames: int, fn, *args):  # called from a caller's stack ``frames`` frames deep
        return fn(*args) if frames == 0 else deeper(frames - 1, fn, *args)

    for raw in (record(1000), record(960, "Pumpe\u00a0Süd")):
        for frames in (0, 100):
            got = deeper(frames, decode_reading, raw, ["temp"])
            assert isinstance(got, Reading) and got.values == {"temp": 1.5}, (frames, got)
            assert deeper(frames, decode_batch, [raw], ["temp"]).bad == [], frames
    too_deep = record(5000)
    got = decode_reading(too_deep, ["temp"])
    assert isinstance(got, BadRecord) and "JSON" in got.reason
    assert [reason for _, reason in decode_batch([too_deep], ["temp"]).bad] == [got.reason]


def test_names_that_are_printable_or_merely_unusual_are_kept() -> None:
    """Spaces, non-ASCII letters and a no-break space are names; only controls and line breaks are not."""
    got = decode_reading(reading_json(entity="Pumpe Süd 1", values={"temp\u00a0°C": 1.0, "ﾎﾟﾝﾌﾟ": 2.0}))
    assert not isinstance(got, BadRecord), got
    assert got.entity == "Pumpe Süd 1" and set(got.values) == {"temp\u00a0°C", "ﾎﾟﾝﾌﾟ"}


def test_sensor_set_mismatch_names_missing_and_unknown() -> None:
    got = decode_reading(reading_json(values={"temp": 1.0, "vibration": 2.0}),
                         expected_sensors={"temp", "pressure", "flow"})
    assert isinstance(got, BadRecord)
    assert "missing ['flow', 'pressure']" in got.reason
    assert "unknown ['vibration']" in got.reason
    only_missing = decode_reading(reading_json(values={"temp": 1.0}), expected_sensors=["temp", "flow"])
    assert isinstance(only_missing, BadRecord) and "unknown" not in only_missing.reason


def test_null_value_and_wrong_type_never_raise() -> None:
    assert isinstance(decode_reading(None), BadRecord)  # type: ignore[arg-type]  # a Kafka tombstone
    assert isinstance(decode_reading("{}"), BadRecord)  # type: ignore[arg-type]


def test_long_bad_values_are_truncated_in_the_reason() -> None:
    got = decode_reading(reading_json(values={"temp": "x" * 10_000}))
    assert isinstance(got, BadRecord) and got.reason.endswith("...") and len(got.reason) < 120


def test_random_bytes_and_mutations_never_raise() -> None:
    rng = random.Random(7)
    good = reading_json()
    for _ in range(3000):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        got = decode_reading(bytes(raw), expected_sensors=["temp", "pressure", "flow"])
        assert isinstance(got, (Reading, BadRecord))
    for _ in range(500):
        got = decode_reading(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
        assert isinstance(got, BadRecord)


def test_a_reading_with_no_sensor_in_common_is_said_to_be_perhaps_another_asset_type_s() -> None:
    # two asset types in one consumer group, or on one input topic: every reading of the other type is a
    # dead letter, and its reason said only "sensor set does not match"
    sensors = ["temp", "pressure", "flow"]
    turbine = decode_reading(reading_json(values={"rpm": 3000, "vibration": 0.1}), sensors)
    assert isinstance(turbine, BadRecord) and "no sensor in common: another asset type's reading?" in turbine.reason
    assert "kafka.group_id" in turbine.reason and "worker.entities" in turbine.reason
    batch = decode_batch([reading_json(values={"rpm": 3000, "vibration": 0.1})], sensors)
    assert "another asset type" in batch.bad[0][1]
    one_more = decode_reading(reading_json(values={"temp": 1, "pressure": 1, "flow": 1, "rpm": 2}), sensors)
    assert isinstance(one_more, BadRecord) and "asset type" not in one_more.reason  # a sensor added: not that


def test_a_bad_reading_whose_entity_and_time_were_read_keeps_its_time() -> None:
    # Its time still moves its partition's stream time: a producer sending "temp": "71.2" for good used
    # to pin its partition's commit, and its entity's open event, for ever.
    sensors = ["temp", "pressure", "flow"]
    other = decode_reading(reading_json(values={"temp": 1, "rpm": 2}), sensors)
    assert isinstance(other, BadRecord) and other.reason.startswith("sensor set does not match")
    assert other.ts == T0
    for raw in (reading_json(values={"temp": "hot", "pressure": 1, "flow": 1}), reading_json(values={}),
                reading_json(values=[1, 2])):
        bad = decode_reading(raw, sensors)
        assert isinstance(bad, BadRecord) and bad.ts == T0, bad
    for raw in (reading_json(ts=-1), reading_json(entity=""), b"junk"):  # no time to keep
        bad = decode_reading(raw, sensors)
        assert isinstance(bad, BadRecord) and bad.ts is None
    batch = decode_batch([reading_json(), reading_json(values={"temp": 1}), b"junk",
                          reading_json(values={"temp": "71.2", "pressure": 1, "flow": 1})], sensors)
    assert [i for i, _ in batch.bad] == [1, 2, 3] and batch.foreign == [(1, T0), (3, T0)]


def test_reasons_and_dead_letters_stay_small_whatever_the_record() -> None:
    # A record under 1 MiB made a dead letter over it (every unknown sensor named in the reason, or a
    # 600 KB sensor name): the producer refused it, the batch failed, and the worker stopped at that
    # record on every restart.
    import json as json_module

    from anomaly.codec import DEAD_LETTER_MAX_BYTES, MAX_ENTITY_CHARS

    sensors = ["temp", "pressure", "flow"]
    many = reading_json(values={f"sensor_{i:05d}_with_a_long_name": 1.0 for i in range(30_000)})
    bad = decode_reading(many, sensors)
    assert isinstance(bad, BadRecord) and "and 29990 more" in bad.reason and len(bad.reason) < 1000
    long_name = reading_json(values={"x" * 600_000: "text"})
    bad = decode_reading(long_name, sensors)
    assert isinstance(bad, BadRecord) and len(bad.reason) < 200 and bad.reason.startswith("values.xxx")
    huge = decode_reading(reading_json(entity="e" * (MAX_ENTITY_CHARS + 1)), sensors)
    assert isinstance(huge, BadRecord) and "longer than 1024 characters" in huge.reason
    assert decode_batch([reading_json(entity="e" * (MAX_ENTITY_CHARS + 1))], sensors).bad[0][1] == huge.reason
    for raw, key_size in ((many, 0), (b"\x01" * 60_000 + b"x" * 900_000, 0), (b"y" * 300_000, 500_000)):
        letter = encode_dead_letter(raw, "t", 0, 1, "r" * 5_000_000, T0, key_size=key_size)
        assert len(letter) + key_size <= DEAD_LETTER_MAX_BYTES
        doc = decode_dead_letter(letter)
        assert raw.startswith(doc["original"]) and len(doc["reason"]) <= 1024
        if len(doc["original"]) < len(raw):
            assert doc["original_truncated"] and doc["original_size"] == len(raw)
    assert json_module.loads(encode_dead_letter(b"{}", "t", 0, 1, "r", T0, dropped_key_size=70_000))[
        "original_key_size"] == 70_000


def _batch_as_readings(raws: list, sensors: tuple[str, ...], ignored: tuple[str, ...] = ()) -> list[Reading | BadRecord]:
    """``decode_batch``'s outcome, one ``Reading``/``BadRecord`` per input, for comparison."""
    got = decode_batch(raws, sensors, ignored=ignored)
    out: list[Reading | BadRecord | None] = [None] * len(raws)
    stamps = dict(got.foreign)
    assert len(stamps) == len(got.foreign) and sorted(stamps) == [i for i, _ in got.foreign]
    for i, reason in got.bad:
        out[i] = BadRecord(reason, ts=stamps.pop(i, None))
    assert not stamps, "a foreign stamp on a record that is not bad"
    assert got.values.shape == (len(got.index), len(sensors)) and got.values.dtype == np.float64
    for j, i in enumerate(got.index.tolist()):
        assert out[i] is None, "a record was both good and bad"
        values = {name: (None if math.isnan(v) else v) for name, v in zip(sensors, got.values[j].tolist())}
        out[i] = Reading(got.entities[j], float(got.ts[j]), values)
    assert all(item is not None for item in out), "a record was lost"
    return out  # type: ignore[return-value]


def test_decode_batch_agrees_with_decode_reading_record_by_record() -> None:
    """The worker's batch decoder (orjson fast path) gives exactly decode_reading's readings and reasons."""
    sensors = ("temp", "pressure", "flow")
    rng = random.Random(11)
    good = reading_json()
    raws: list = [good, reading_json(ts=T0), reading_json(ts=T0 * 1000), reading_json(ts=int(T0)),
                  reading_json(ts="2026-11-21T12:00:00.250+02:00"), reading_json(ts="9999-12-31T23:59:59Z"),
                  reading_json(values={"temp": 1, "pressure": 2**64 - 1, "flow": 10**30}),
                  reading_json(values={"temp": True, "pressure": 1, "flow": 1}),
                  reading_json(values={"temp": 1, "pressure": 1, "flow": 1, "rpm": 2}),
                  reading_json(values={"temp": 1, "pressure": 1}), reading_json(entity="  "),
                  reading_json(entity=""), reading_json(entity=7), reading_json(ts=-1), reading_json(ts=1e14),
                  reading_json(ts=True), reading_json(ts=None), reading_json(values=[1, 2, 3]),
                  bytearray(good), memoryview(good), "{}", None, b"", b"  ", b"[]", b'"x"',
                  b'{"entity": "p", "ts": 1, "values": {"temp": 1, "pressure": 1, "flow": NaN}}',
                  b'{"entity": "p", "ts": 1, "values": {"temp": 1, "pressure": 1, "flow": 1e999}}',
                  b'{"entity": "p", "entity": "q", "ts": 1, "values": {"temp": 1, "pressure": 2, "flow": 3}}',
                  b'{"entity": "\\ud800", "ts": 1, "values": {"temp": 1, "pressure": 2, "flow": 3}}',
                  b'{"entity": "p", "ts": 1, "values": {"temp": 1, "pressure": 2, "\\udc00": 3}}',
                  reading_json(values={"temp": 1, "pressure": 9.99e14, "flow": -1e15}),
                  reading_json(ts="2026-11-21T10:00:00Z", values={"temp": 1, "pressure": 1, "flow": 1e16}),
                  b"\xef\xbb\xbf" + good] + [raw for raw, _ in BAD]
    for _ in range(3000):  # byte mutations of a good record
        raw = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raws.append(bytes(raw))
    batch, single = _batch_as_readings(raws, sensors), [decode_reading(r, sensors) for r in raws]
    assert batch == single
    # BadRecord.ts is left out of ==: the foreign stamps must agree too (and exist: the list has some).
    stamped = [(b.ts, s.ts) for b, s in zip(batch, single) if isinstance(s, BadRecord) and s.ts is not None]
    assert len(stamped) >= 2 and all(b == s for b, s in stamped)
    assert all(b.ts is None for b, s in zip(batch, single) if isinstance(s, BadRecord) and s.ts is None)
    # A batch of only good records, and an empty batch.
    assert _batch_as_readings([good] * 3, sensors) == [decode_reading(good, sensors)] * 3
    assert decode_batch([], sensors).values.shape == (0, 3)


def test_sensors_the_model_left_out_are_read_past_not_dead_lettered() -> None:
    """A sensor its training left out (constant in the training data) still comes in every reading: it is
    dropped unread, whatever its value, in both decoders; any other extra sensor is still refused."""
    sensors, ignored = ("temp", "pressure"), ("flow",)
    carried = reading_json(values={"temp": 1.5, "pressure": 2, "flow": 5})
    reading = decode_reading(carried, sensors, ignored=ignored)
    assert isinstance(reading, Reading) and reading.values == {"temp": 1.5, "pressure": 2.0}
    assert isinstance(decode_reading(carried, sensors), BadRecord)  # without: "unknown ['flow']", as before
    odd = reading_json(values={"temp": 1, "pressure": 2, "flow": "stuck"})  # not checked: not read
    assert isinstance(decode_reading(odd, sensors, ignored=ignored), Reading)
    other = reading_json(values={"temp": 1, "pressure": 2, "flow": 5, "rpm": 3})
    assert "unknown ['rpm']" in decode_reading(other, sensors, ignored=ignored).reason
    only = reading_json(values={"flow": 5})
    only_ts = decode_reading(carried).ts
    assert "only sensors the model does not read (['flow'])" in decode_reading(only, sensors, ignored=ignored).reason
    missing = reading_json(values={"temp": 1, "flow": 5})
    assert "missing ['pressure']" in decode_reading(missing, sensors, ignored=ignored).reason
    assert isinstance(decode_reading(missing, sensors, ignored=ignored, partial=True), Reading)
    assert isinstance(decode_reading(reading_json(values={"temp": 1, "pressure": 2}), sensors, ignored=ignored),
                      Reading)  # a reading without it is as good
    raws = [carried, odd, other, only, missing, reading_json(values={"temp": 1, "pressure": 2}),
            reading_json(values={"pressure": 2, "temp": 1, "flow": None}), b"{}"]
    assert _batch_as_readings(raws, sensors, ignored) == [decode_reading(r, sensors, ignored=ignored) for r in raws]
    fast = decode_batch([carried] * 3, sensors, ignored=ignored)  # the fast path reads past it too
    assert fast.values.tolist() == [[1.5, 2.0]] * 3 and not fast.bad
    # a slot sent one sensor a message (partial readings): the part of the left-out sensor is a reading of none
    # (an empty reading, its slot's other parts merged as ever), not 1 dead letter in F + 1
    assert decode_reading(only, sensors, ignored=ignored, partial=True) == Reading("pump-7", only_ts, {})
    parts = decode_batch([only, reading_json(values={"temp": 1})], sensors, ignored=ignored, partial=True)
    assert not parts.bad and np.isnan(parts.values[0]).all() and parts.values[1].tolist()[0] == 1.0


# --- encoding readings ---------------------------------------------------------------------------

def test_encode_reading_round_trips_exactly() -> None:
    reading = Reading(entity="pump-7", ts=1_763_719_200.123456, values={"temp": 71.2, "flow": None, "p": 0.1 + 0.2})
    assert decode_reading(encode_reading(reading)) == reading


def test_encode_reading_writes_nan_as_null_and_refuses_inf() -> None:
    reading = Reading(entity="e", ts=1.0, values={"a": float("nan"), "b": 2.0})
    assert json.loads(encode_reading(reading))["values"] == {"a": None, "b": 2.0}
    with pytest.raises(DataError, match="values.a"):
        encode_reading(Reading(entity="e", ts=1.0, values={"a": float("inf")}))
    with pytest.raises(DataError, match="epoch seconds"):
        encode_reading(Reading(entity="e", ts=1.7e12, values={"a": 1.0}))  # ms would be misread


# --- dead letters --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8 \x00", b'{"entity": 1}', b"", "caf\u00e9".encode()])
def test_dead_letter_round_trip_keeps_exact_bytes(raw: bytes) -> None:
    reason = decode_reading(raw)
    assert isinstance(reason, BadRecord)
    letter = encode_dead_letter(raw, "sensors", 3, 12345, reason.reason, ts_s=1_763_719_200.5)
    doc = decode_dead_letter(letter)
    assert doc["original"] == raw
    assert doc["source_topic"] == "sensors" and doc["source_partition"] == 3 and doc["source_offset"] == 12345
    assert doc["reason"] == reason.reason and doc["ts"] == 1_763_719_200.5
    json.loads(letter.decode("utf-8"))  # the letter itself is valid UTF-8 JSON


def test_dead_letter_has_readable_text_only_when_utf8() -> None:
    assert decode_dead_letter(encode_dead_letter(b'{"a":1}', "t", 0, 0, "r", 0.0))["original_utf8"] == '{"a":1}'
    assert "original_utf8" not in decode_dead_letter(encode_dead_letter(b"\xff", "t", 0, 0, "r", 0.0))


def test_dead_letter_of_a_large_original_fits_kafkas_default_message_size() -> None:
    small = b"x" * DEAD_LETTER_MAX_ORIGINAL
    doc = decode_dead_letter(encode_dead_letter(small, "t", 0, 0, "r", 0.0))
    assert doc["original"] == small and "original_truncated" not in doc and "original_utf8" not in doc
    big = bytes(range(256)) * 4000  # 1,024,000 bytes: the most a default Kafka topic takes
    letter = encode_dead_letter(big, "t", 0, 9, "not UTF-8", 0.0)
    assert len(letter) < 1024 * 1024
    doc = decode_dead_letter(letter)
    assert doc["original_truncated"] is True and doc["original_size"] == len(big)
    assert doc["original"] == big[:DEAD_LETTER_MAX_ORIGINAL]  # the head, exact; the whole stays at offset 9


def test_dead_letter_of_a_reason_quoting_a_lone_surrogate_is_still_utf8() -> None:
    letter = encode_dead_letter(b"{}", "t", 0, 0, "values.t\udc00 is not a number", 0.0)  # a real surrogate
    assert decode_dead_letter(letter)["reason"] == "values.t\\udc00 is not a number"  # written as an escape


def test_dead_letter_of_a_null_value() -> None:
    doc = decode_dead_letter(encode_dead_letter(None, "t", 0, 7, "tombstone", 0.0))
    assert doc["original"] is None and doc["original_b64"] is None


def test_decode_dead_letter_refuses_garbage() -> None:
    with pytest.raises(DataError):
        decode_dead_letter(b"not json")
    with pytest.raises(DataError):
        decode_dead_letter(b'{"original_b64": "!!"}')


# --- events --------------------------------------------------------------------------------------

def test_event_bytes_are_deterministic_and_round_trip() -> None:
    event = {"status": "open", "entity": "pump-7", "score": 3.5, "sensors": [{"name": "temp", "share": 0.9}]}
    reordered = dict(reversed(list(event.items())))
    assert encode_event(event) == encode_event(reordered)
    assert decode_event(encode_event(event)) == event


def test_encode_event_refuses_nan_and_unserialisable() -> None:
    with pytest.raises(DataError):
        encode_event({"score": float("nan")})
    with pytest.raises(DataError):
        encode_event({"when": datetime.now()})


def test_decode_event_refuses_non_objects() -> None:
    with pytest.raises(DataError):
        decode_event(b"[1]")


def test_event_ids_are_deterministic_and_distinct() -> None:
    first = event_id("pump-7", "pumps", 1_763_719_200.25)
    # Pinned: ids must not change across processes, restarts or upgrades (downstream upserts by id). This
    # value was written down once; a change to the namespace, the canonical form or the hash breaks it.
    assert first == "8d10d44672f2bd66fa17ac1efded599c"
    assert first == event_id("pump-7", "pumps", 1_763_719_200.25)
    assert event_id("pump-7", "pumps", 1_763_719_200) == event_id("pump-7", "pumps", 1_763_719_200.0)
    others = {
        event_id("pump-8", "pumps", 1_763_719_200.25),
        event_id("pump-7", "fans", 1_763_719_200.25),
        event_id("pump-7", "pumps", 1_763_719_200.5),
        event_id("pump-7", "pumps", 1_763_719_200.250001),
        event_id("pump-7pumps", "", 1_763_719_200.25),  # no ambiguity from concatenation
    }
    assert first not in others and len(others) == 5
    with pytest.raises(DataError):
        event_id("pump-7", "pumps", float("nan"))



def test_a_dead_letter_of_control_characters_has_no_readable_copy():
    # each is six bytes as JSON (\u0000): 64 KiB of them made a dead letter of about 470 KB
    from anomaly.codec import encode_dead_letter

    nuls = b"\x00" * 65536
    letter = encode_dead_letter(nuls, "sensors", 0, 7, "not JSON", 1.0)
    doc = decode_dead_letter(letter)
    assert "original_utf8" not in doc and doc["original"] == nuls and len(letter) < 100_000
    text = b'{"entity": "pump-1",\n\t"ts": "soon"}'
    assert decode_dead_letter(encode_dead_letter(text, "sensors", 0, 8, "bad ts", 1.0))["original_utf8"] == text.decode()


def test_a_reading_with_some_of_the_models_sensors_is_refused_unless_partial_readings_are_on():
    from anomaly.codec import BadRecord, decode_batch, decode_reading

    raw = b'{"entity": "p", "ts": 1790000000, "values": {"temp": 71.2}}'
    strict = decode_reading(raw, {"temp", "pressure"})
    assert isinstance(strict, BadRecord) and "missing ['pressure']" in strict.reason
    reading = decode_reading(raw, {"temp", "pressure"}, partial=True)
    assert reading.values == {"temp": 71.2}  # pressure: absent, so missing
    unknown = decode_reading(b'{"entity": "p", "ts": 1790000000, "values": {"tmp": 71.2}}', {"temp", "pressure"},
                             partial=True)
    assert isinstance(unknown, BadRecord) and "unknown ['tmp']" in unknown.reason and "missing" not in unknown.reason
    whole = b'{"entity": "p", "ts": 1790000001, "values": {"temp": 70.0, "pressure": 1.0}}'
    batch = decode_batch([raw, whole, b"{}"], ["temp", "pressure"], partial=True)
    assert batch.index.tolist() == [0, 1] and [i for i, _ in batch.bad] == [2]
    np.testing.assert_array_equal(batch.values, [[71.2, np.nan], [70.0, 1.0]])
    assert [i for i, _ in decode_batch([raw, whole], ["temp", "pressure"]).bad] == [0]
