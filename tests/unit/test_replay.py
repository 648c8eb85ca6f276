"""The replay plan, pacing and sending loop, without a broker (a fake producer and a fake clock)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from anomaly.codec import decode_reading
from anomaly.errors import DataError, TopicError
from anomaly.replay import MAX_SLEEP_S, frame_from_file, newest_stamp, replay, replay_plan, send_times

START = 1_800_000_000.0


def frame(rows: int = 5, period_s: float = 2.0) -> pd.DataFrame:
    index = pd.date_range("2026-01-01", periods=rows, freq=pd.Timedelta(seconds=period_s), tz="UTC", name="ts")
    return pd.DataFrame({"a": np.arange(rows, dtype=float), "b": 10.0 + np.arange(rows)}, index=index)


# --- plan ----------------------------------------------------------------------------------------

def test_single_copy_rebased_with_recorded_spacing_and_nan_as_none():
    f = frame(4)
    f.iloc[1, 0] = np.nan
    f.iloc[2, 1] = np.inf
    items = list(replay_plan(f, "pump", start_ts=START))
    assert [e for e, _ in items] == ["pump-0"] * 4
    assert [r.ts for _, r in items] == [START, START + 2, START + 4, START + 6]
    assert items[0][1].values == {"a": 0.0, "b": 10.0}
    assert items[1][1].values == {"a": None, "b": 11.0}
    assert items[2][1].values == {"a": 2.0, "b": None}
    assert all(r.entity == e for e, r in items)


def test_fleet_copies_are_delayed_by_offset_rows_and_merged_in_time_order():
    plan = replay_plan(frame(5), "pump", copies=3, offset_rows=2, start_ts=START)
    items = list(plan)
    assert len(plan) == len(items) == 15
    assert plan.entities == ("pump-0", "pump-1", "pump-2")
    ts = [r.ts for _, r in items]
    assert ts == sorted(ts)
    for i in range(3):
        mine = [r for e, r in items if e == f"pump-{i}"]
        # Copy i starts i * 2 rows * 2 s later, keeps the spacing, and carries the same values.
        assert [r.ts for r in mine] == [START + 4 * i + 2 * k for k in range(5)]
        assert [r.values["a"] for r in mine] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # Equal timestamps: copy order (pump-0 row 2 and pump-1 row 0 are both at START + 4).
    at_4 = [e for e, r in items if r.ts == START + 4]
    assert at_4 == ["pump-0", "pump-1"]
    assert plan.span_s == pytest.approx(8 + 8)


def test_lock_step_without_offset_and_plan_is_reiterable():
    plan = replay_plan(frame(3), "p", copies=2, start_ts=START)
    first = [(e, r.ts) for e, r in plan]
    assert first == [("p-0", START), ("p-1", START), ("p-0", START + 2), ("p-1", START + 2),
                     ("p-0", START + 4), ("p-1", START + 4)]
    assert [(e, r.ts) for e, r in plan] == first


def test_out_of_order_rows_are_replayed_in_time_order_and_start_defaults_to_now():
    f = frame(3).iloc[[2, 0, 1]]
    items = list(replay_plan(f, "p", clock=lambda: START))
    assert [r.values["a"] for _, r in items] == [0.0, 1.0, 2.0]
    assert [r.ts for _, r in items] == [START, START + 2, START + 4]


def test_irregular_spacing_kept_and_delay_uses_median_period():
    index = pd.DatetimeIndex(["2026-01-01 00:00:00", "2026-01-01 00:00:01", "2026-01-01 00:00:02.5",
                              "2026-01-01 00:00:03.5"], name="ts")  # naive: taken as UTC
    f = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}, index=index)
    items = list(replay_plan(f, "p", copies=2, offset_rows=1, start_ts=START))
    p0 = [r.ts - START for e, r in items if e == "p-0"]
    p1 = [r.ts - START for e, r in items if e == "p-1"]
    assert p0 == pytest.approx([0, 1, 2.5, 3.5])
    assert p1 == pytest.approx([1, 2, 3.5, 4.5])  # median spacing is 1 s


def test_the_span_of_a_limited_replay_is_that_of_the_readings_it_sends():
    from anomaly.replay import first_readings_span_s

    plan = replay_plan(frame(5), "p", copies=2, offset_rows=1, start_ts=START)  # p-1 two seconds behind p-0
    assert plan.span_s == 10.0
    assert [first_readings_span_s(plan, n) for n in (0, 1, 2, 3, 4, 10, 99)] == \
        [0.0, 0.0, 2.0, 2.0, 4.0, 10.0, 10.0]


def test_every_planned_reading_encodes_as_contract_json():
    from anomaly.codec import encode_reading

    f = frame(3)
    f.iloc[0, 1] = np.nan
    for entity, reading in replay_plan(f, "pump", copies=2, start_ts=START):
        back = decode_reading(encode_reading(reading))
        assert back == reading


@pytest.mark.parametrize("kwargs, error", [
    ({"copies": 0}, ValueError), ({"offset_rows": -1}, ValueError),
    # ids a worker dead-letters: refused before sending (a blank id in a table's entity column crashed
    # `anomaly replay` with a traceback; a 1100-character one went out as 100 % dead letters)
    ({"entity": " "}, DataError), ({"entity": "x" * 1100, "copies": 1, "names": ["x" * 1100]}, DataError),
    ({"entity": "p", "copies": 1, "names": ["a\u0000b"]}, DataError),
])
def test_bad_plan_arguments(kwargs, error):
    args = {"entity": "p", **kwargs}
    with pytest.raises(error):
        replay_plan(frame(), **args)


def test_frames_that_cannot_be_replayed():
    with pytest.raises(DataError, match="timestamps"):
        replay_plan(frame().reset_index(drop=True), "p")
    with pytest.raises(DataError, match="nothing to replay"):
        replay_plan(frame().iloc[:0], "p")
    f = frame()
    f["name"] = "x"
    with pytest.raises(DataError, match="name"):
        replay_plan(f, "p")


def test_frame_from_file_drops_labels(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("ts,temp,anomaly\n2026-01-01T00:00:00Z,1.5,0\n2026-01-01T00:00:01Z,,1\n")
    f = frame_from_file(path)
    assert list(f.columns) == ["temp"]
    items = list(replay_plan(f, "p", start_ts=START))
    assert [r.values for _, r in items] == [{"temp": 1.5}, {"temp": None}]


# --- pacing --------------------------------------------------------------------------------------

def test_send_times_fixed_rate_ignores_timestamps():
    assert list(send_times([5.0, 5.0, 100.0, 101.0], rate_per_s=4)) == [0.0, 0.25, 0.5, 0.75]


def test_send_times_speed_scales_recorded_spacing_and_never_goes_back():
    ts = [100.0, 101.0, 103.0, 102.0, 107.0]
    assert list(send_times(ts, speed=1.0)) == [0.0, 1.0, 3.0, 3.0, 7.0]
    assert list(send_times(ts, speed=2.0)) == [0.0, 0.5, 1.5, 1.5, 3.5]


def test_send_times_as_fast_as_possible_and_empty():
    assert list(send_times([1.0, 9.0, 30.0])) == [0.0, 0.0, 0.0]
    assert list(send_times([], speed=2.0)) == []


@pytest.mark.parametrize("kwargs", [{"rate_per_s": 1, "speed": 1}, {"rate_per_s": 0}, {"speed": -1},
                                    {"speed": math.inf}])
def test_send_times_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        send_times([1.0], **kwargs)


# --- the sending loop ----------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def add_errback(self, fn):
        if self.error is not None:
            fn(self.error)
        return self

    def add_callback(self, fn):
        if self.error is None:
            fn("record metadata")
        return self


class FakeProducer:
    def __init__(self, fail_every: int = 0) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.flushed = self.closed = False
        self.fail_every = fail_every

    def send(self, topic, value=None, key=None):
        self.sent.append((topic, key, value))
        failing = self.fail_every and len(self.sent) % self.fail_every == 0
        return FakeFuture(RuntimeError("not delivered") if failing else None)

    def flush(self, timeout=None):
        self.flushed = True

    def close(self, timeout=None):
        self.closed = True


def test_replay_keys_values_pacing_and_flush():
    producer, clock = FakeProducer(), FakeClock()
    plan = replay_plan(frame(4, period_s=2.0), "pump", copies=2, offset_rows=1, start_ts=START)
    stats = replay("b:9092", "sensors", plan, speed=2.0, progress=False, clock=clock,
                   producer_factory=lambda bootstrap, options: producer)
    assert stats.sent == 8 and producer.flushed and producer.closed
    assert {t for t, _, _ in producer.sent} == {"sensors"}
    decoded = [decode_reading(v) for _, _, v in producer.sent]
    assert [k.decode() for _, k, _ in producer.sent] == [r.entity for r in decoded]
    assert [r.ts for r in decoded] == sorted(r.ts for r in decoded)
    # The fleet spans 8 recorded seconds (6 s of data + a 2 s delay); at speed 2 that is 4 s of waiting.
    assert sum(clock.sleeps) == pytest.approx(4.0)
    assert stats.seconds == pytest.approx(4.0)


def test_replay_fast_never_sleeps_and_limit_stops_early():
    producer, clock = FakeProducer(), FakeClock()
    plan = replay_plan(frame(10), "p", copies=3, start_ts=START)
    stats = replay("b:9092", "t", plan, limit=7, progress=False, clock=clock,
                   producer_factory=lambda bootstrap, options: producer)
    assert stats.sent == 7 and len(producer.sent) == 7 and clock.sleeps == []


def test_replay_fixed_rate():
    producer, clock = FakeProducer(), FakeClock()
    plan = replay_plan(frame(5), "p", start_ts=START)
    replay("b:9092", "t", plan, rate_per_s=10, progress=False, clock=clock,
           producer_factory=lambda bootstrap, options: producer)
    assert clock.sleeps == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_undelivered_readings_fail_the_replay():
    producer = FakeProducer(fail_every=3)
    plan = replay_plan(frame(6), "p", start_ts=START)
    with pytest.raises(TopicError, match="2 of 6 readings were not delivered"):
        replay("b:9092", "t", plan, progress=False, clock=FakeClock(),
               producer_factory=lambda bootstrap, options: producer)
    assert producer.flushed and producer.closed


class GoneBroker(FakeProducer):
    """kafka-python's producer once the broker is gone: flush times out, and close (which flushes) too."""

    def flush(self, timeout=None):
        raise RuntimeError("KafkaTimeoutError: Timeout waiting for future")

    def close(self, timeout=None):
        self.closed = True
        raise RuntimeError("KafkaTimeoutError: Timeout waiting for future")


def test_a_failing_close_does_not_hide_why_the_replay_stopped():
    # close's own timeout replaced the TopicError (a traceback and exit 1, not "error: ..." and exit 2)
    producer = GoneBroker()
    with pytest.raises(TopicError, match="readings not confirmed by b:9092"):
        replay("b:9092", "t", replay_plan(frame(3), "p", start_ts=START), progress=False, clock=FakeClock(),
               producer_factory=lambda bootstrap, options: producer)
    assert producer.closed

    class Interrupted(FakeClock):  # Ctrl-C during a wait: still KeyboardInterrupt (exit 130), not close's error
        def sleep(self, seconds: float) -> None:
            raise KeyboardInterrupt

    producer = GoneBroker()
    with pytest.raises(KeyboardInterrupt):
        replay("b:9092", "t", replay_plan(frame(3), "p", start_ts=START), rate_per_s=1.0, progress=False,
               clock=Interrupted(), producer_factory=lambda bootstrap, options: producer)
    assert producer.closed


def test_a_wait_longer_than_a_sleep_can_take_is_slept_in_parts():
    # --rate 1e-10 (or one reading stamped decades ahead at --speed 1): time.sleep(1e10) raised OverflowError
    producer, clock = FakeProducer(), FakeClock()
    replay("b:9092", "t", replay_plan(frame(2), "p", start_ts=START), rate_per_s=1e-10, progress=False,
           clock=clock, producer_factory=lambda bootstrap, options: producer)
    assert len(producer.sent) == 2 and max(clock.sleeps) <= MAX_SLEEP_S
    assert sum(clock.sleeps) == pytest.approx(1e10)


def test_unreachable_broker_is_a_topic_error():
    def refuse(bootstrap, options):
        raise OSError("connection refused")

    with pytest.raises(TopicError, match="is the broker running"):
        replay("b:9092", "t", replay_plan(frame(2), "p", start_ts=START), progress=False, producer_factory=refuse)


def test_a_bad_client_option_is_said_as_such_not_as_an_unreachable_broker():
    from anomaly.errors import ConfigError
    from anomaly.kafka_io import make_producer

    with pytest.raises(ConfigError) as err:
        replay("b:9092", "t", replay_plan(frame(2), "p", start_ts=START), progress=False,
               client_options={"bad_option_xyz": 3}, producer_factory=make_producer)
    assert err.value.field == "kafka.client_options" and "is the broker running" not in str(err.value)


def test_bad_pacing_is_refused_before_connecting():
    def never(bootstrap, options):
        raise AssertionError("must not connect")

    with pytest.raises(ValueError):
        replay("b:9092", "t", replay_plan(frame(2), "p", start_ts=START), rate_per_s=1, speed=1,
               producer_factory=never)


def test_interrupt_flushes_what_was_queued_and_propagates():
    producer = FakeProducer()

    def plan():
        yield from replay_plan(frame(3), "p", start_ts=START)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replay("b:9092", "t", plan(), progress=False, clock=FakeClock(),
               producer_factory=lambda bootstrap, options: producer)
    assert len(producer.sent) == 3 and producer.flushed and producer.closed


def test_on_delivered_counts_what_the_broker_confirms_not_what_was_sent():
    delivered = []
    producer = FakeProducer(fail_every=3)
    with pytest.raises(TopicError, match="2 of 7 readings were not delivered"):
        replay("b:9092", "t", replay_plan(frame(7), "p", start_ts=START), progress=False, clock=FakeClock(),
               producer_factory=lambda bootstrap, options: producer, on_delivered=lambda: delivered.append(1))
    assert len(producer.sent) == 7 and len(delivered) == 5


def test_select_sensors_sends_exactly_the_named_ones_in_order():
    from anomaly.errors import DataError
    from anomaly.preparation import select_sensors

    frame = pd.DataFrame({"a": [1.0], "b": [2.0], "c": [3.0]})
    assert list(select_sensors(frame, ["c", "a"]).columns) == ["c", "a"]
    assert select_sensors(frame, None) is frame and select_sensors(frame, []) is frame
    with pytest.raises(DataError, match=r"sensors not in the data: \['Temperature'\]"):
        select_sensors(frame, ["a", "Temperature"])


def test_sensors_tag_names_every_sensor_or_says_how_many():
    from anomaly.train_job import SENSORS_TAG_CHARS, sensors_tag

    assert sensors_tag(["a", "b"]) == "a,b"
    many = [f"sensor_{i:05d}" for i in range(1000)]
    tag = sensors_tag(many)
    assert len(tag) <= SENSORS_TAG_CHARS and tag.endswith("(1000 sensors; model.json lists them all)")
    assert tag.startswith("sensor_00000,sensor_00001,") and ",,..." not in tag


def test_seconds_ahead_of_the_clock_for_each_pace():
    from anomaly.replay import seconds_ahead

    assert seconds_ahead(1200.0, 1200, speed=10) == pytest.approx(1080.0)  # 1,200 s of readings sent in 120 s
    assert seconds_ahead(1200.0, 1200, speed=1) == 0.0  # real time: never ahead
    assert seconds_ahead(1200.0, 1200, rate_per_s=100) == pytest.approx(1188.0)
    assert seconds_ahead(1200.0, 1200, rate_per_s=0.5) == 0.0  # slower than recorded: behind, not ahead
    assert seconds_ahead(1200.0, 1200) == 1200.0  # as fast as possible


def test_a_table_with_an_entity_column_is_replayed_entity_by_entity_without_its_labels(tmp_path, monkeypatch):
    # `replay --data` ignored data.entity_column and retrain.label_field: both assets became one entity
    # with the id column sent as a sensor, and the label as one more; every reading was a dead letter.
    import json

    from anomaly import cli, replay as replay_module
    from anomaly.codec import encode_reading

    table = tmp_path / "fleet.csv"
    rows = ["ts,asset,temp,fault"]
    for i in range(3):
        rows += [f"2026-01-01T00:00:0{i}Z,101,{10 + i},0", f"2026-01-01T00:00:0{i}Z,0202,{50 + i},{int(i == 2)}"]
    table.write_text("\n".join(rows) + "\n")
    config = tmp_path / "a.toml"
    config.write_text('[data]\nentity_column = "asset"\n[retrain]\nlabel_field = "fault"\n')
    sent = []

    def send_all(bootstrap, topic, plan, **kwargs):  # what replay() would produce: key and value
        sent.extend((entity.encode(), json.loads(encode_reading(reading))) for entity, reading in plan)
        return replay_module.ReplayStats(len(sent), 1.0)

    monkeypatch.setattr(replay_module, "replay", send_all)
    monkeypatch.setattr(replay_module, "resume_ts", lambda *args, **kwargs: None)  # (an empty topic)
    assert cli.main(["replay", "--data", str(table), "--config", str(config), "--quiet"]) == 0
    assert [k for k, _ in sent] == [b"101", b"0202"] * 3  # ids as written, in time order
    assert all(set(doc["values"]) == {"temp"} for _, doc in sent)
    assert [doc["values"]["temp"] for _, doc in sent] == [10, 50, 11, 51, 12, 52]
    assert sent[0][1]["ts"] == sent[1][1]["ts"] and sent[2][1]["ts"] - sent[0][1]["ts"] == pytest.approx(1.0)


def test_newest_stamp_reads_readings_and_dead_letters_whose_ts_was_read() -> None:
    # Where a replay continues when the topic already holds stamps ahead of the clock (resume_ts).
    good = b'{"entity": "a", "ts": 1800000010.5, "values": {"x": 1.0}}'
    older = b'{"entity": "b", "ts": 1800000003, "values": {"x": 1.0}}'
    bad_values = b'{"entity": "c", "ts": 1800000020, "values": {"x": "hot"}}'  # a dead letter, its time real
    assert newest_stamp([older, None, b"not json", good]) == 1800000010.5
    assert newest_stamp([good, bad_values]) == 1800000020.0
    assert newest_stamp([None, b"{}", b'{"entity": "a", "values": {}}']) is None
    assert newest_stamp([]) is None


def test_a_plan_knows_its_recorded_spacing() -> None:
    frame = pd.DataFrame({"x": np.arange(5.0)}, index=pd.date_range("2026-01-01", periods=5, freq="10s"))
    assert replay_plan(frame, "e", start_ts=0.0).period_s == 10.0
