"""The worker's pure batch step, with a numpy fake model and with a small real Detector. No Kafka."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest

from anomaly.adaptive import AdaptiveRule
from anomaly.episodes import EpisodeRule
from anomaly.alerts import AlertPolicy
from anomaly.codec import Reading, decode_dead_letter, decode_event, encode_reading, event_id
from anomaly.detector import fit_detector
from anomaly.errors import ModelError
from anomaly.scoring_step import BatchOutput, DetectorModel, InputRecord, ScoringModel, ScoringStep
from anomaly.thresholds import Threshold
from anomaly.training import TrainConfig
from anomaly.window_state import WindowPolicy
from tests.fixtures import SENSORS, normal_frame

T0 = 1_795_255_200.0  # 2026-11-21T10:00:00Z
CENTRE = (70.0, 1.0, 5.0)
TOPIC = "sensors"


class FakeModel:
    """score = mean |x - centre| over the window and sensors; expected = the centre. Counts calls."""

    def __init__(self, window_size: int = 4, threshold: float = 1.0, version: str = "1",
                 sensors: tuple[str, ...] = SENSORS, period_s: float = 1.0,
                 adaptive: AdaptiveRule | None = None, episodes: EpisodeRule | None = None) -> None:
        self.name, self.version, self.sensors = "pumps", version, sensors
        self.window_size, self.period_s, self.threshold = window_size, period_s, threshold
        self.adaptive, self.episodes = adaptive, episodes
        self.fill_values = CENTRE[: len(sensors)]
        self.calls: list[tuple[int, ...]] = []

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.calls.append(windows.shape)
        centre = np.asarray(self.fill_values)
        errors = np.abs(windows - centre).mean(axis=1)  # (N, F)
        return errors.mean(axis=1), errors, np.broadcast_to(centre, errors.shape).copy()


def reading_record(entity: str, slot: int, offset: int, partition: int = 0, values: dict | None = None,
                   key: bytes | None = None, topic: str = TOPIC) -> InputRecord:
    values = values if values is not None else dict(zip(SENSORS, CENTRE))
    raw = encode_reading(Reading(entity, T0 + slot, values))
    return InputRecord(topic, partition, offset, entity.encode() if key is None else key, raw, None)


def stream(entities: dict[str, int], slots: range, fault: tuple[str, range, str, float] | None = None,
           ) -> list[InputRecord]:
    """Readings of each entity (entity -> partition) at every slot, interleaved, offsets per partition."""
    offsets: dict[int, int] = {}
    records = []
    for slot in slots:
        for entity, partition in entities.items():
            values = dict(zip(SENSORS, CENTRE))
            values["temp"] += 0.05 * math.sin(slot)  # a little life, deterministic
            if fault and entity == fault[0] and slot in fault[1]:
                values[fault[2]] += fault[3]
            offset = offsets.get(partition, 0)
            offsets[partition] = offset + 1
            records.append(reading_record(entity, slot, offset, partition, values))
    return records


def step_for(model: ScoringModel, **alert: Any) -> ScoringStep:
    return ScoringStep(model, WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(**alert))


def run_batches(step: ScoringStep, records: list[InputRecord], size: int = 7) -> list[BatchOutput]:
    return [step.process(records[i:i + size], now_s=T0 + 1000) for i in range(0, len(records), size)]


def test_one_batched_forward_pass_per_batch_for_all_entities() -> None:
    model = FakeModel(window_size=4)
    assert isinstance(model, ScoringModel)
    step = step_for(model)
    out = step.process(stream({"a": 0, "b": 0, "c": 1}, range(10)), now_s=T0 + 12.0)
    assert model.calls == [(21, 4, 3)]  # 3 entities × 7 windows, one call
    assert out.counts["windows_scored"] == 21 and out.counts["consumed"] == 30
    assert sorted(out.latencies_s)[:3] == [3.0, 3.0, 3.0]  # windows ending at slot 9, scored at slot 12
    step.process(stream({"a": 0}, range(10, 12)), now_s=T0 + 13.0)
    assert model.calls[-1] == (2, 4, 3)
    step.process([InputRecord(TOPIC, 0, 99, None, b"junk", None)], now_s=T0)
    assert len(model.calls) == 2  # nothing ready: no forward pass at all


def test_a_fault_in_one_sensor_is_one_event_naming_that_sensor() -> None:
    model = FakeModel(window_size=4, threshold=1.0)
    step = step_for(model, min_duration_windows=3, recovery_windows=3, cooldown_s=0.0)
    records = stream({"pump-1": 0, "pump-2": 1, "pump-3": 0}, range(60),
                     fault=("pump-2", range(20, 35), "pressure", 5.0))
    outputs = run_batches(step, records)
    events = [(key, decode_event(value)) for out in outputs for key, value in out.events]
    assert [(k, e["status"]) for k, e in events] == [(b"pump-2", "open"), (b"pump-2", "closed")]
    opened, closed = events[0][1], events[1][1]
    # windows of 4 slots: the first above threshold (3 faulty slots: 3/4·5/3 = 1.25 > 1) ends at slot 22
    assert opened["start_ts"] == T0 + 22
    assert opened["event_id"] == closed["event_id"] == event_id("pump-2", "pumps", T0 + 22)
    assert opened["sensors"][0]["sensor"] == "pressure"
    assert opened["sensors"][0]["actual"] == pytest.approx(6.0) and opened["sensors"][0]["expected"] == 1.0
    assert closed["end_ts"] == T0 + 35 and closed["model"] == {"name": "pumps", "version": "1"}
    assert sum(out.counts["events_opened"] for out in outputs) == 1
    assert sum(out.counts["events_closed"] for out in outputs) == 1
    assert step.alerts.open_events() == []


BAD_RECORDS: list[tuple[bytes | None, str]] = [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"", "empty record"),
    (None, "tombstone"),
    (b'{"ts": 1795255200, "values": {"temp": 1, "pressure": 1, "flow": 1}}', "missing field"),
    (b'{"entity": "p", "ts": "yesterday", "values": {"temp": 1, "pressure": 1, "flow": 1}}', "RFC 3339"),
    (b'{"entity": "p", "ts": 1795255200, "values": {"temp": "hot", "pressure": 1, "flow": 1}}', "not a number"),
    (b'{"entity": "p", "ts": 1795255200, "values": {"temp": NaN, "pressure": 1, "flow": 1}}', "not finite"),
    (b'{"entity": "p", "ts": 1795255200, "values": {"temp": 1, "pressure": 1}}', "missing ['flow']"),
    (b'{"entity": "p", "ts": 1795255200, "values": {"temp": 1, "pressure": 1, "flow": 1, "rpm": 3}}',
     "unknown ['rpm']"),
]


def test_every_bad_record_kind_is_a_dead_letter_with_the_original_bytes() -> None:
    model = FakeModel()
    step = step_for(model)
    records = [InputRecord("in", 3, 100 + i, b"k%d" % i, raw, None) for i, (raw, _) in enumerate(BAD_RECORDS)]
    out = step.process(records, now_s=T0)
    assert out.counts["dead_letters"] == len(BAD_RECORDS) == out.counts["consumed"]
    for i, ((key, letter), (raw, reason)) in enumerate(zip(out.dead_letters, BAD_RECORDS)):
        doc = decode_dead_letter(letter)
        assert key == b"k%d" % i
        assert doc["original"] == raw
        assert (doc["source_topic"], doc["source_partition"], doc["source_offset"]) == ("in", 3, 100 + i)
        assert reason in doc["reason"], doc["reason"]
    assert out.commits == {("in", 3): 100 + len(BAD_RECORDS)}  # nothing kept: commit past them all
    assert model.calls == [] and out.events == []


def test_a_stray_str_value_is_a_dead_letter_even_with_a_lone_surrogate() -> None:
    """Kafka hands over bytes; another adapter may hand over a str. One that cannot be UTF-8 (a lone surrogate)
    raised out of ``process`` and failed the whole batch."""
    model = FakeModel()
    step = step_for(model)
    raws = ["not json", '{"entity": "\ud800"}']
    out = step.process([InputRecord("in", 0, i, b"k", raw, None) for i, raw in enumerate(raws)], now_s=T0)
    reasons = [decode_dead_letter(letter)["reason"] for _, letter in out.dead_letters]
    assert out.counts["dead_letters"] == 2 and "not JSON" in reasons[0] and "not UTF-8" in reasons[1], reasons
    assert out.commits == {("in", 0): 2}


def test_entity_field_wins_over_the_record_key() -> None:
    step = ScoringStep(FakeModel(window_size=2), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(),
                       emit_scores=True)
    out = step.process([reading_record("pump-9", s, s, key=b"someone-else") for s in range(3)], now_s=T0 + 3)
    assert [key for key, _ in out.scores] == [b"pump-9", b"pump-9"]
    assert step.windows.entities == 1 and "pump-9" in step.windows


def test_score_records_when_enabled() -> None:
    step = ScoringStep(FakeModel(window_size=2, version="7"), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(), emit_scores=True)
    hot = {"temp": 72.0, "pressure": 1.0, "flow": 5.0}
    out = step.process([reading_record("p", 0, 0), reading_record("p", 1, 1, values=hot)], now_s=T0 + 2)
    [(key, value)] = out.scores
    doc = json.loads(value)
    assert key == b"p"
    assert doc["entity"] == "p" and doc["ts"] == T0 + 1 and doc["start_ts"] == T0
    assert doc["threshold"] == 1.0 and doc["anomalous"] is False and doc["model"] == {"name": "pumps", "version": "7"}
    assert doc["score"] == pytest.approx(2.0 / 2 / 3) and doc["filled"] == 0  # temp off by 2 in one of 2 slots
    assert step_for(FakeModel(window_size=2)).process([reading_record("p", s, s) for s in range(2)], T0).scores == []


def test_commits_per_topic_partition_hold_back_what_windows_need() -> None:
    step = step_for(FakeModel(window_size=4))
    records = stream({"a": 0, "b": 1}, range(10))  # offsets = slots on both partitions
    records += [InputRecord("other", 0, 41, None, b"bad", None)]
    out = step.process(records, now_s=T0 + 10)
    # the next window ends at slot 10 and needs slots 7, 8, 9 (offsets 7, 8, 9)
    assert out.commits == {(TOPIC, 0): 7, (TOPIC, 1): 7, ("other", 0): 42}


def test_same_records_from_fresh_state_give_byte_identical_events() -> None:
    records = stream({"pump-1": 0, "pump-2": 1}, range(80), fault=("pump-1", range(30, 50), "flow", 9.0))
    records += [InputRecord(TOPIC, 0, 999, b"x", b"{oops", None)]

    def outputs() -> tuple[list, list, list]:
        step = ScoringStep(FakeModel(window_size=5), WindowPolicy(window_size=1, period_s=1.0, grace_slots=1),
                           AlertPolicy(min_duration_windows=2), emit_scores=True)
        outs = run_batches(step, records, size=11)
        return ([e for o in outs for e in o.events], [s for o in outs for s in o.scores],
                [d for o in outs for d in o.dead_letters])

    first, second = outputs(), outputs()
    assert first[0] and first == second


def test_late_duplicate_and_reset_are_counted() -> None:
    step = ScoringStep(FakeModel(window_size=2), WindowPolicy(window_size=1, period_s=1.0, max_fill_steps=1),
                       AlertPolicy())
    recs = [reading_record("p", s, i) for i, s in enumerate([0, 1, 1, 3, 2, 9])]
    out = step.process(recs, now_s=T0 + 10)
    assert {k: out.counts[k] for k in ("accepted", "duplicates", "late", "resets")} == {
        "accepted": 4, "duplicates": 1, "late": 1, "resets": 1}


def test_a_stride_longer_than_the_models_window_is_cut_to_it(caplog) -> None:
    # worker.stride 4 with a 2-slot window would score slots 3-4, 7-8, ...: half the readings in no window.
    step = ScoringStep(FakeModel(window_size=2), WindowPolicy(window_size=1, period_s=1.0, stride=4), AlertPolicy())
    assert step.window_policy.stride == 2 and "scoring every 2 slots" in caplog.text
    out = step.process([reading_record("p", s, s) for s in range(12)], now_s=T0 + 12)
    assert out.counts["windows_scored"] == 5  # slots 1-2, 3-4, ..., 9-10: every slot between in one
    assert step.swap_model(FakeModel(window_size=8, version="2")) is False and step.window_policy.stride == 4


def test_swap_model_keeps_state_when_compatible_and_resets_otherwise() -> None:
    step = step_for(FakeModel(window_size=3, version="1"))
    step.process([reading_record("p", s, s) for s in range(3)], now_s=T0 + 3)
    newer = FakeModel(window_size=3, version="2")
    assert step.swap_model(newer) is True and step.model is newer
    out = step.process([reading_record("p", 3, 3)], now_s=T0 + 4)
    assert out.counts["windows_scored"] == 1 and newer.calls == [(1, 3, 3)]  # the buffer carried over
    longer = FakeModel(window_size=5, version="3")
    assert step.swap_model(longer) is False
    assert step.windows.entities == 0 and step.window_policy.window_size == 5
    out = step.process([reading_record("p", s, s) for s in range(4, 8)], now_s=T0 + 8)
    assert out.counts["windows_scored"] == 0  # 4 slots into a fresh buffer of 5


def _scored(outs: list[BatchOutput], version: str) -> list[tuple[str, float, float]]:
    """(entity, window end, score) of every score record of ``version`` in ``outs``."""
    docs = [json.loads(v) for out in outs for _, v in out.scores]
    return sorted((d["entity"], d["ts"], d["score"]) for d in docs if d["model"]["version"] == version)


def _reread(records: list[InputRecord], replay_from: dict[tuple[str, int], int], upto: int) -> list[InputRecord]:
    """What the worker polls after seeking back: each partition's records from its replay offset on (the
    others from ``upto``, where the swap found them)."""
    return [r for r in records if r.offset >= replay_from.get((r.topic, r.partition), upto)]


def test_a_swap_the_buffers_do_not_survive_re_reads_and_scores_every_window_once() -> None:
    # v1 scores windows of 4 up to slot 19; v2's windows are 3 long. Seeking back, v2 scores exactly what
    # it would have scored had it served from the start, from slot 20 on: none twice, no slot left out.
    entities = {"a": 0, "b": 1, "c": 0}
    records = stream(entities, range(30), fault=("b", range(21, 24), "temp", 40.0))
    before = [r for r in records if r.value and json.loads(r.value)["ts"] < T0 + 20]
    policy = WindowPolicy(window_size=1, period_s=1.0)
    step = ScoringStep(FakeModel(window_size=4, version="1"), policy, AlertPolicy(), emit_scores=True)
    first = run_batches(step, before)
    assert _scored(first, "1")[-1][1] == T0 + 19
    assert step.swap_model(FakeModel(window_size=3, version="2"), replay=True) is False
    seek = step.replay_from
    assert seek == {(TOPIC, 0): 2 * 18, (TOPIC, 1): 18}  # slots 18, 19: the 2 before v2's first window ends
    again = run_batches(step, _reread(records, seek, 0))
    oracle = ScoringStep(FakeModel(window_size=3, version="2"), policy, AlertPolicy(), emit_scores=True)
    want = [w for w in _scored(run_batches(oracle, records), "2") if w[1] >= T0 + 20]
    assert _scored(again, "2") == want and len(want) == 3 * 10
    assert sum(o.counts["consumed"] for o in first + again) == len(records)  # each record counted once
    assert sum(o.counts["replayed"] for o in again) == 3 * 2
    events = [decode_event(v) for o in again for _, v in o.events]
    assert [(e["entity"], e["status"]) for e in events] == [("b", "open"), ("b", "closed")]
    assert not step.replaying  # caught up: an ordinary step again


def test_a_replay_sends_no_dead_letter_twice_and_commits_no_further_than_the_new_windows_need() -> None:
    records = stream({"a": 0}, range(12))
    records[9] = InputRecord(TOPIC, 0, 9, b"a", b"not json", None)  # slot 9: a dead letter when first read
    step = step_for(FakeModel(window_size=4, version="1"))
    first = step.process(records[:11], now_s=T0 + 11)
    assert len(first.dead_letters) == 1 and first.commits == {(TOPIC, 0): 8}
    assert step.swap_model(FakeModel(window_size=5, version="2"), replay=True) is False
    assert step.replay_from == {(TOPIC, 0): 7}  # as far back as v1's buffer reached (10 rows: 7, 8, 10)
    out = step.process(records[7:], now_s=T0 + 12)
    assert out.dead_letters == [] and out.counts["replayed"] == 4 and out.counts["consumed"] == 1
    # v2's first window is slots 7-11 (9 forward-filled), at once; without the replay it would end at 15
    assert out.counts["windows_scored"] == 1
    assert out.commits == {(TOPIC, 0): 8}  # the next window of 5 (slots 8-12) starts at offset 8


def test_a_replay_ends_though_some_entities_never_come_back_or_had_no_window_at_the_swap() -> None:
    """At a swap that restarts the buffers, "young" (2 readings: no window of the old model yet) goes on,
    "gone" stops for good. Their marks were never dropped: the replay never ended (``replaying`` aside, its
    set of marks carried into every later swap and grew with each, a worker's memory for good)."""
    step = ScoringStep(FakeModel(window_size=4, version="1"), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(),
                       idle_timeout_s=60.0)
    records, offset = [], 0
    for slot in range(20):
        for entity in ("a", "gone") + (("young",) if slot >= 18 else ()):
            records.append(reading_record(entity, slot, offset))
            offset += 1
    step.process(records, now_s=T0 + 20)
    assert step.swap_model(FakeModel(window_size=5, version="2"), replay=True) is False
    assert step._replay is not None and set(step._replay.scored) >= {"a", "gone", "young"}
    back = min(step.replay_from.values())
    later = [r for r in records if r.offset >= back]
    for slot in range(20, 200):  # "gone" silent: evicted after its idle minute
        for entity in ("a", "young"):
            later.append(reading_record(entity, slot, offset))
            offset += 1
    for k in range(0, len(later), 50):
        step.process(later[k:k + 50], now_s=T0 + 200)
    assert "gone" not in step.windows
    assert step._replay is None  # over: every mark dropped, by a window past it or by the entity leaving


def test_a_swap_to_a_coarser_grid_with_grace_scores_no_window_twice() -> None:
    """v1 scores every 1 s (W 8), v2 every 2 s (W 4), grace 2. A's readings run hot from 28 s; B's sparse
    ones pull the re-read back. The re-read ended before v2's window ending at 28 s was sealed, so it came
    out after v1's 29 s one, was scored again (its 28 s reading a duplicate of 27 s's slot), broke A's run,
    and the event opened two windows late, from 30 s, under another event id."""
    recs, offset = [], 0
    for slot in range(60):
        values = dict(zip(SENSORS, CENTRE), pressure=1.0 + 90.0 * (slot >= 28))
        recs.append(reading_record("A", slot, offset, values=values))
        offset += 1
        if slot >= 20 and slot % 4 == 0:
            recs.append(reading_record("B", slot, offset))
            offset += 1
    cut = next(i for i, rec in enumerate(recs) if rec.offset == 36)  # after A's reading at 31 s
    step = ScoringStep(FakeModel(window_size=8, period_s=1.0, version="1"), WindowPolicy(1, 1.0, grace_slots=2),
                       AlertPolicy(min_duration_windows=3, recovery_windows=3, cooldown_s=0), emit_scores=True)
    seen: list[tuple[str, float]] = []
    opened: list[float] = []

    def take(out: BatchOutput) -> None:
        seen.extend((d["model"]["version"], d["ts"] - T0) for d in (json.loads(v) for _, v in out.scores)
                    if d["entity"] == "A")
        opened.extend(e["start_ts"] - T0 for e in (decode_event(v) for _, v in out.events) if e["status"] == "open")

    take(step.process(recs[:cut], now_s=T0 + 100))
    newest_v1 = max(ts for version, ts in seen if version == "1")
    step.swap_model(FakeModel(window_size=4, period_s=2.0, version="2"), replay=True)
    start = step.replay_from[(TOPIC, 0)]
    for part in (recs[start:cut], recs[cut:]):  # the re-read, then what comes after, three records a poll
        for i in range(0, len(part), 3):
            take(step.process(part[i:i + 3], now_s=T0 + 100))
    assert newest_v1 == 29.0
    assert [ts for version, ts in seen if version == "2"][:3] == [30.0, 32.0, 34.0]  # none at or before 29 s
    assert opened == [28.0]  # v2's 30 s window goes on with v1's run: it opens the event at its 3rd window


def test_a_revoked_partition_stops_its_replay() -> None:
    records = stream({"a": 0, "b": 1}, range(10))
    step = step_for(FakeModel(window_size=4, version="1"))
    step.process(records, now_s=T0 + 10)
    step.swap_model(FakeModel(window_size=2, version="2"), replay=True)
    assert set(step.replay_from) == {(TOPIC, 0), (TOPIC, 1)}
    step.forget_partitions([(TOPIC, 1)])
    out = step.process([r for r in records if r.partition == 0 and r.offset >= 9], now_s=T0 + 11)
    assert out.counts["replayed"] == 1 and not step.replaying


def test_a_swap_without_replay_restarts_the_buffers_at_the_swap() -> None:
    records = stream({"a": 0}, range(20))
    step = step_for(FakeModel(window_size=4, version="1"))
    step.process(records[:10], now_s=T0 + 10)
    assert step.swap_model(FakeModel(window_size=3, version="2")) is False and step.replay_from == {}
    out = step.process(records[10:], now_s=T0 + 20)
    assert out.counts["windows_scored"] == 8 and out.counts["replayed"] == 0  # slots 12..19


def test_each_entity_is_held_to_its_own_threshold_where_the_model_has_one() -> None:
    # A fleet model: pump-a's own value is 0.5, pump-b's 4.0; pump-c has none and is held to the shared 1.0.
    model = FakeModel(window_size=1, threshold=1.0)
    model.entity_thresholds = {"pump-a": 0.5, "pump-b": 4.0}  # type: ignore[attr-defined]
    step = ScoringStep(model, WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(min_duration_windows=1),
                       emit_scores=True)
    mild = dict(zip(SENSORS, CENTRE), pressure=1.0 + 6.0)  # score 2.0: mean |x - centre| over 3 sensors
    records = [reading_record(e, 0, i, values=mild) for i, e in enumerate(("pump-a", "pump-b", "pump-c"))]
    out = step.process(records, now_s=T0 + 1)
    opened = {decode_event(v)["entity"]: decode_event(v)["threshold"] for _, v in out.events}
    assert opened == {"pump-a": 0.5, "pump-c": 1.0}  # 2.0 is under pump-b's own 4.0
    bars = {json.loads(v)["entity"]: (json.loads(v)["threshold"], json.loads(v)["anomalous"]) for _, v in out.scores}
    assert bars == {"pump-a": (0.5, True), "pump-b": (4.0, False), "pump-c": (1.0, True)}


@pytest.mark.parametrize("rule", ["adaptive", "episodes"])
def test_a_moving_bar_rises_from_each_entitys_own_threshold(rule: str) -> None:
    # As above, with a moving bar: each entity's bar starts at its own fitted value (not the shared one)
    # and the adaptive rule raises it with the entity's own history (pump-a: 2 x median 0.5 = 1.0).
    moving = ({"adaptive": AdaptiveRule(rows=3, factor=2.0, quantile=0.5, lag=0)} if rule == "adaptive"
              else {"episodes": EpisodeRule(drop=2.0, k=2)})
    model = FakeModel(window_size=1, threshold=1.0, **moving)
    model.entity_thresholds = {"pump-a": 0.5, "pump-b": 4.0}  # type: ignore[attr-defined]
    step = ScoringStep(model, WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(min_duration_windows=1),
                       emit_scores=True)

    def scored(pressure: dict[str, float], slot: int) -> list[InputRecord]:
        return [reading_record(e, slot, 10 * slot + i, values=dict(zip(SENSORS, CENTRE), pressure=1.0 + 3 * p))
                for i, (e, p) in enumerate(pressure.items())]  # score p (mean over 3 sensors)

    quiet = {"pump-a": 0.5, "pump-b": 0.1, "pump-c": 0.1}
    for slot in range(3):
        out = step.process(scored(quiet, slot), now_s=T0 + slot + 1)
        assert not out.events  # pump-a's 0.5 is at its own bar, not above it
    out = step.process(scored(dict.fromkeys(quiet, 2.0), 3), now_s=T0 + 4)
    bars = {json.loads(v)["entity"]: (json.loads(v)["threshold"], json.loads(v)["anomalous"]) for _, v in out.scores}
    floor_a = 1.0 if rule == "adaptive" else 0.5
    assert bars == {"pump-a": (floor_a, True), "pump-b": (4.0, False), "pump-c": (1.0, True)}
    assert {decode_event(v)["entity"] for _, v in out.events} == {"pump-a", "pump-c"}


@pytest.mark.parametrize("rule", [{}, {"adaptive_rows": 60}, {"episode_drop": 2.0, "episode_k": 10}])
def test_a_fleet_model_fits_each_entitys_own_threshold_under_any_rule(detector_model: DetectorModel,
                                                                    rule: dict) -> None:
    # Training (train_job.entity_thresholds): each entity with enough validation windows gets its own
    # value, a moving bar's base as much as a fixed threshold.
    from anomaly.config import build_settings
    from anomaly.preparation import prepare_fleet
    from anomaly.train_job import entity_thresholds

    detector = detector_model.detector
    settings = build_settings({"threshold": {"method": "quantile", "q": 0.99, "per_entity_min_windows": 50, **rule}})
    prepared = prepare_fleet({"a": normal_frame(400, seed=3), "b": normal_frame(400, seed=4), "c": normal_frame(60, seed=5)},
                             window_size=detector.window_size, validation_fraction=0.5)
    fitted = detector.threshold
    try:
        th = settings.threshold
        detector.threshold = fitted.with_adaptive(th.adaptive_rule()).with_episodes(th.episode_rule())
        assert detector.threshold.describe_rule() == th.rule_description()
        own = entity_thresholds(detector, prepared, settings)
    finally:
        detector.threshold = fitted
    assert sorted(own.per_entity) == ["a", "b"]  # c: 30 validation rows, under 50 windows
    assert own.value == fitted.value and all(v > 0 for v in own.per_entity.values())


def test_detector_model_carries_the_per_entity_values_of_its_threshold(detector_model: DetectorModel) -> None:
    detector = detector_model.detector
    fitted = detector.threshold
    try:
        detector.threshold = fitted.with_per_entity({"pump-a": 0.25})
        assert DetectorModel(detector, name="pumps", version="2").entity_thresholds == {"pump-a": 0.25}
    finally:
        detector.threshold = fitted
    assert detector_model.entity_thresholds == {}


def test_model_failures_raise_and_nonfinite_scores_never_become_events() -> None:
    class Broken(FakeModel):
        def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return np.zeros(1), np.zeros((1, 3)), np.zeros((1, 3))

    with pytest.raises(ModelError):
        step_for(Broken(window_size=1)).process([reading_record("p", s, s) for s in range(3)], now_s=T0)

    class NaNs(FakeModel):
        def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            n = len(windows)
            return np.full(n, np.nan), np.full((n, 3), np.nan), np.zeros((n, 3))

    step = ScoringStep(NaNs(window_size=1), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(min_duration_windows=1), emit_scores=True)
    out = step.process([reading_record("p", s, s) for s in range(3)], now_s=T0)
    assert out.counts["nonfinite_scores"] == 3 and out.events == []
    assert [json.loads(v)["score"] for _, v in out.scores] == [None, None, None]


def test_idle_entities_are_evicted_so_the_commit_moves_on() -> None:
    step = ScoringStep(FakeModel(window_size=3), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(),
                       idle_timeout_s=20.0)
    step.process([reading_record("gone", s, s) for s in range(3)], now_s=T0)
    out = step.process([reading_record("busy", s, 3 + i) for i, s in enumerate(range(3, 40))], now_s=T0 + 40)
    assert out.counts["evicted"] == 1 and "gone" not in step.windows
    assert out.commits == {(TOPIC, 0): 3 + 37 - 2}  # only busy's last two slots are needed


# --- with a real (small) Detector ------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector_model() -> DetectorModel:
    train = normal_frame(rows=500, seed=1).to_numpy()
    detector, _, _ = fit_detector(
        train, SENSORS, {"window_size": 8, "hidden_size": 16, "latent_size": 4},
        TrainConfig(epochs=2, batch_size=128, patience=5, seed=0, device="cpu", progress=False),
        threshold_method="quantile", threshold_params={"q": 0.99}, period_s=1.0)
    # Twice the fitted value, as a deployment's threshold scale would: healthy windows of this barely
    # trained model come close to the bare q99, the fault below scores ~100x above it.
    fitted = detector.threshold
    detector.threshold = Threshold(fitted.method, fitted.value * 2, {**fitted.params, "scale": 2.0})
    return DetectorModel(detector, name="pumps", version="1", device="cpu")


def frame_records(frame_values: np.ndarray, entity: str, partition: int) -> list[InputRecord]:
    return [InputRecord(TOPIC, partition, i, entity.encode(),
                        encode_reading(Reading(entity, T0 + i, dict(zip(SENSORS, map(float, row))))), None)
            for i, row in enumerate(frame_values)]


def test_detector_model_scores_streamed_windows_like_offline_scoring(detector_model: DetectorModel) -> None:
    assert isinstance(detector_model, ScoringModel)
    assert detector_model.sensors == SENSORS and detector_model.window_size == 8 and detector_model.period_s == 1.0
    assert detector_model.fill_values == pytest.approx(detector_model.detector.scaler.centre)
    calls = []
    original = detector_model.detector.score_windows

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    detector_model.detector.score_windows = counted  # type: ignore[method-assign]
    try:
        a = normal_frame(rows=60, seed=5).to_numpy()
        b = normal_frame(rows=60, seed=6).to_numpy()
        step = ScoringStep(detector_model, WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(), emit_scores=True)
        out = step.process(frame_records(a, "pump-a", 0) + frame_records(b, "pump-b", 1), now_s=T0 + 60)
    finally:
        del detector_model.detector.score_windows
    assert calls == [2 * (60 - 8 + 1)]  # one pass for both entities
    streamed: dict[bytes, list[float]] = {}
    for key, value in out.scores:
        doc = json.loads(value)
        streamed.setdefault(key, []).append(doc["score"])
    offline = detector_model.detector.score_values(a).scores
    np.testing.assert_allclose(streamed[b"pump-a"], offline, rtol=1e-5, atol=1e-7)


def test_a_wild_reading_over_a_tiny_scale_scores_huge_not_inf_and_opens_an_event(
        detector_model: DetectorModel) -> None:
    # The codec accepts |value| < 1e15 and a fitted scale may be as small as 1e-8: ~1e23 scaled, whose
    # square is inf in float32, and an inf score was never an event (a stuck sensor raised no alarm).
    import copy
    import dataclasses

    detector = copy.copy(detector_model.detector)
    flow = SENSORS.index("flow")
    scale = list(detector.scaler.scale)
    scale[flow] = 1e-8
    detector.scaler = dataclasses.replace(detector.scaler, scale=tuple(scale))
    model = DetectorModel(detector, name="pumps", version="1", device="cpu")
    values = normal_frame(rows=30, seed=5).to_numpy().copy()
    values[:, flow] = detector.scaler.centre[flow]  # healthy: at the fitted centre
    values[10:25, flow] = 9.9e14
    step = ScoringStep(model, WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(min_duration_windows=1))
    out = step.process(frame_records(values, "pump", 0), now_s=T0 + 40)
    assert out.counts["dead_letters"] == 0 and out.counts["nonfinite_scores"] == 0
    events = [decode_event(v) for _, v in out.events]
    assert [e["status"] for e in events] == ["open"] and events[0]["sensors"][0]["sensor"] == "flow"


def test_detector_model_in_bf16_flags_and_ranks_like_float32(detector_model: DetectorModel) -> None:
    from anomaly.scoring import cpu_runs_bf16

    if not cpu_runs_bf16():
        pytest.skip("this CPU cannot run the LSTM in bf16 (it scores in float32 instead: test_fast_paths)")
    bf16 = DetectorModel(detector_model.detector, name="pumps", version="1", device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and detector_model.precision == "fp32"
    values = normal_frame(rows=120, seed=9).to_numpy().copy()
    values[60:90, SENSORS.index("pressure")] += 2.0
    windows = np.lib.stride_tricks.sliding_window_view(values, 8, axis=0).transpose(0, 2, 1)  # (N, W, F)
    s32, e32, x32 = detector_model.score(windows)
    s16, e16, x16 = bf16.score(windows)
    np.testing.assert_allclose(s16, s32, rtol=2e-2)
    assert ((s16 > bf16.threshold) == (s32 > detector_model.threshold)).all()
    assert (e16.argmax(axis=1) == e32.argmax(axis=1)).all()
    np.testing.assert_allclose(x16, x32, rtol=2e-2, atol=2e-2)


def test_detector_model_fault_names_the_faulty_sensor(detector_model: DetectorModel) -> None:
    values = normal_frame(rows=120, seed=9).to_numpy().copy()
    values[60:90, SENSORS.index("pressure")] += 2.0  # ≈ 28 standard deviations of healthy pressure
    healthy = normal_frame(rows=120, seed=10).to_numpy()
    step = ScoringStep(detector_model, WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(min_duration_windows=3, recovery_windows=3))
    records = frame_records(values, "pump-x", 0) + frame_records(healthy, "pump-ok", 1)
    records.sort(key=lambda r: (r.offset, r.partition))  # interleave the two entities
    events = [decode_event(v) for out in run_batches(step, records, size=25) for _, v in out.events]
    opened = [e for e in events if e["status"] == "open"]
    assert len(opened) == 1 and opened[0]["entity"] == "pump-x"
    assert opened[0]["sensors"][0]["sensor"] == "pressure"
    assert T0 + 60 <= opened[0]["start_ts"] <= T0 + 70


def test_events_equal_alert_tracking_of_every_scored_window() -> None:
    """The step feeds AlertTracker only windows that can change it; the events are those of feeding all."""
    from anomaly.alerts import AlertTracker

    policy = AlertPolicy(min_duration_windows=2, recovery_windows=2, cooldown_s=5.0)
    records = stream({"a": 0, "b": 1, "c": 0}, range(120), fault=("b", range(30, 60), "flow", 6.0))
    records += stream({"a": 0, "b": 1, "c": 0}, range(120, 200), fault=("a", range(140, 150), "temp", 9.0))
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0, stride=2), policy,
                       emit_scores=True)
    outs = run_batches(step, records, size=37)
    reference, expected = AlertTracker(policy), []
    for out in outs:
        for key, value in out.scores:
            doc = json.loads(value)
            expected += [(key, e["event_id"], e["status"], e["start_ts"]) for e in reference.update(
                doc["entity"], doc["ts"], doc["score"], doc["threshold"], lambda: [], "pumps", "1")]
    got = [(k, e["event_id"], e["status"], e["start_ts"]) for k, e in
           ((k, decode_event(v)) for out in outs for k, v in out.events)]
    assert len(expected) >= 4 and sorted(got) == sorted(expected)


def test_staging_the_next_batch_before_completing_this_one_changes_nothing() -> None:
    """The worker stages batch i+1 while batch i is scored: outputs and commits are the sequential ones."""
    records = stream({"p": 0, "q": 1}, range(90), fault=("q", range(40, 60), "pressure", 5.0))
    records.insert(50, InputRecord(TOPIC, 0, 500, b"k", b"junk", None))

    def new_step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=5), WindowPolicy(window_size=1, period_s=1.0, stride=3),
                           AlertPolicy(min_duration_windows=2), emit_scores=True)

    chunks = [records[i:i + 23] for i in range(0, len(records), 23)]
    empty = new_step().process([], T0)  # an empty batch is fine too: nothing out, nothing to commit
    assert (empty.events, empty.dead_letters, empty.commits, empty.counts["consumed"]) == ([], [], {}, 0)
    step = new_step()
    sequential = [step.process(chunk, now_s=T0 + 100) for chunk in chunks]
    step, overlapped, in_flight = new_step(), [], None
    for chunk in chunks:
        staged = step.stage(chunk, now_s=T0 + 100)
        if in_flight is not None:
            overlapped.append(step.complete(in_flight, step.score(in_flight)))
        in_flight = staged
    overlapped.append(step.complete(in_flight, step.score(in_flight)))
    for a, b in zip(sequential, overlapped, strict=True):
        assert (a.events, a.dead_letters, a.scores, a.commits, a.counts) == \
            (b.events, b.dead_letters, b.scores, b.commits, b.counts)
    assert any(o.events for o in sequential) and any(o.dead_letters for o in sequential)


def test_a_reading_far_ahead_of_the_clock_is_a_dead_letter_and_its_partition_keeps_scoring() -> None:
    # One reading stamped 74 years ahead used to become its partition's newest: every other entity then
    # looked idle and was evicted every batch, the sender's real readings were late, and the commit stuck.
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(),
                       max_future_s=600.0)
    step.process(stream({"a": 0, "b": 0}, range(10)), now_s=T0 + 10)
    poison = reading_record("a", 74 * 365 * 86400, 20)
    soon = reading_record("b", 10 + 300, 21)  # 300 s ahead of the clock: a skewed clock, still accepted
    out = step.process([poison, soon], now_s=T0 + 10)
    assert out.counts["dead_letters"] == 1 and out.counts["evicted"] == 0
    letter = decode_dead_letter(out.dead_letters[0][1])
    assert letter["source_offset"] == 20 and "ahead of the worker's clock" in letter["reason"]
    assert "worker.max_future_s" in letter["reason"] and letter["original"] == poison.value
    later = [reading_record("a", slot, 30 + slot) for slot in range(10, 20)]
    out = step.process(later, now_s=T0 + 20)
    assert out.counts["windows_scored"] == 10 and out.counts["evicted"] == 0 and out.counts["late"] == 0
    # Off (None): the reading is accepted, as a replay running ahead of the clock needs.
    off = step_for(FakeModel(window_size=4))
    assert off.process([poison], now_s=T0).counts["dead_letters"] == 0


def test_with_max_future_off_a_lone_leap_is_a_dead_letter_and_a_replays_jump_is_kept() -> None:
    # anomaly up turns max_future_s off for its sped-up replay. One reading stamped in the year 4822 then
    # became its partition's stream time: every later reading late, the commit pinned, a restart no help.
    step = step_for(FakeModel(window_size=4))  # max_future_s off
    step.process(stream({"a": 0, "b": 0}, range(10)), now_s=T0 + 10)
    poison = reading_record("a", 90_000_000_000 - int(T0), 20)
    after = [reading_record(e, slot, 21 + 2 * (slot - 10) + i) for slot in range(10, 30) for i, e in enumerate("ab")]
    out = step.process([poison, *after[:10]], now_s=T0 + 12)
    assert out.counts["dead_letters"] == 1 and out.counts["late"] == 0
    letter = decode_dead_letter(out.dead_letters[0][1])
    assert letter["source_offset"] == 20 and "worker.max_future_s is off" in letter["reason"]
    out = step.process(after[10:], now_s=T0 + 30)
    assert out.counts["late"] == 0 and out.counts["windows_scored"] == 30  # every reading ends a window
    assert out.commits[(TOPIC, 0)] > 20  # the commit moves past the dead letter
    # A sped-up replay, hours ahead of the clock, over a recording with a 3-hour gap: every reading kept.
    replay = step_for(FakeModel(window_size=4))
    slots = [5 * 3600 + k for k in range(20)] + [8 * 3600 + 20 + k for k in range(20)]
    records = [reading_record("r", slot, i) for i, slot in enumerate(slots)]
    outs = [replay.process(records[i:i + 7], now_s=T0) for i in range(0, len(records), 7)]
    assert sum(o.counts["dead_letters"] for o in outs) == 0 and sum(o.counts["late"] for o in outs) == 0
    assert sum(o.counts["windows_scored"] for o in outs) == 17 + 17  # windows of 4; the gap restarts them


def test_with_max_future_off_a_leap_that_ends_its_poll_is_held_and_judged_with_the_next_readings() -> None:
    # A leap arriving last in its partition's poll (the usual case for a slow stream: one reading per poll)
    # was kept as the stream time: every later reading of the partition counted late, nothing scored,
    # until a restart. Now it waits, its commit held at it, for the partition's next readings.
    step = step_for(FakeModel(window_size=4))  # max_future_s off
    step.process(stream({"a": 0, "b": 0}, range(10)), now_s=T0 + 10)
    poison = reading_record("a", 90_000_000_000 - int(T0), 20)
    out = step.process([poison], now_s=T0 + 11)
    assert out.counts["dead_letters"] == 0 and out.counts["consumed"] == 1 and out.counts["accepted"] == 0
    assert out.commits[(TOPIC, 0)] <= 20  # not past the held reading
    after = [reading_record(e, slot, 21 + 2 * (slot - 10) + i) for slot in range(10, 30) for i, e in enumerate("ab")]
    outs = [step.process(after[i:i + 10], now_s=T0 + 12 + i) for i in range(0, 40, 10)]
    assert [o.counts["late"] for o in outs] == [0, 0, 0, 0]
    assert outs[0].counts["dead_letters"] == 1 and outs[0].counts["consumed"] == 10  # not counted twice
    letter = decode_dead_letter(outs[0].dead_letters[0][1])
    assert letter["source_offset"] == 20 and letter["original"] == poison.value
    assert "worker.max_future_s is off" in letter["reason"]
    assert sum(o.counts["windows_scored"] for o in outs) == 40 and outs[-1].commits[(TOPIC, 0)] > 20
    # A replay's jump over a recording gap, alone in its poll: held one poll, then kept with what follows.
    replay = step_for(FakeModel(window_size=4))
    slots = [5 * 3600 + k for k in range(10)] + [8 * 3600 + 10 + k for k in range(10)]
    records = [reading_record("r", slot, i) for i, slot in enumerate(slots)]
    outs = [replay.process(records[:10], now_s=T0), replay.process(records[10:11], now_s=T0),
            replay.process(records[11:], now_s=T0)]
    assert outs[1].counts["accepted"] == 0 and outs[1].commits[(TOPIC, 0)] <= 10
    assert [o.counts["dead_letters"] for o in outs] == [0, 0, 0] and sum(o.counts["late"] for o in outs) == 0
    assert sum(o.counts["accepted"] for o in outs) == 20 and sum(o.counts["consumed"] for o in outs) == 20
    assert sum(o.counts["windows_scored"] for o in outs) == 7 + 7  # windows of 4; the gap restarts them


def test_a_held_leap_waits_for_its_own_partition_and_goes_with_a_reset_or_revocation() -> None:
    step = step_for(FakeModel(window_size=4))
    step.process(stream({"a": 0, "b": 1}, range(10)), now_s=T0 + 10)
    out = step.process([reading_record("a", 90_000_000_000 - int(T0), 10)], now_s=T0 + 11)
    assert out.commits[(TOPIC, 0)] <= 10
    # partition 1 goes on; partition 0 brings nothing: its reading stays held
    out = step.process([reading_record("b", slot, slot, partition=1) for slot in range(10, 14)], now_s=T0 + 12)
    assert out.counts["windows_scored"] == 4 and (TOPIC, 0) not in out.commits
    out = step.process([reading_record("a", 10, 11)], now_s=T0 + 13)  # goes on from before the leap
    assert out.counts["dead_letters"] == 1 and out.counts["accepted"] == 1 and out.counts["late"] == 0
    # held, then the partition revoked (its new owner reads from the commit, at or before it): let go
    step.process([reading_record("a", 90_000_000_000 - int(T0), 12)], now_s=T0 + 14)
    step.forget_partitions([(TOPIC, 0)])
    out = step.process([reading_record("a", 11, 13)], now_s=T0 + 15)
    assert out.counts["dead_letters"] == 0 and out.counts["consumed"] == 1
    # held, then a reset (a failed batch; the worker seeks back to the commits): let go, read again
    step.process([reading_record("a", 90_000_000_000 - int(T0), 14)], now_s=T0 + 16)
    step.reset()
    out = step.process([reading_record("a", 90_000_000_000 - int(T0), 14), reading_record("a", 12, 15)],
                       now_s=T0 + 17)
    assert out.counts["dead_letters"] == 1 and out.counts["consumed"] == 2


def test_a_held_leap_read_again_after_a_swap_is_judged_once_and_its_dead_letter_sent() -> None:
    step = step_for(FakeModel(window_size=4, version="1"))
    records = stream({"a": 0}, range(10))
    step.process(records, now_s=T0 + 10)
    poison = reading_record("a", 90_000_000_000 - int(T0), 10)
    assert step.process([poison], now_s=T0 + 11).counts["dead_letters"] == 0  # held
    assert step.swap_model(FakeModel(window_size=3, version="2"), replay=True) is False
    seek = step.replay_from[(TOPIC, 0)]
    assert seek < 10  # the re-read brings the held reading again: not put in twice, not taken for replayed
    again = [r for r in [*records, poison] if r.offset >= seek] + [reading_record("a", 10, 11)]
    out = step.process(again, now_s=T0 + 12)
    assert out.counts["dead_letters"] == 1 and decode_dead_letter(out.dead_letters[0][1])["source_offset"] == 10
    assert out.counts["consumed"] == 1 and out.counts["late"] == 0  # only the new reading is new


def test_a_held_jump_waits_for_a_swap_s_re_read_to_reach_it_and_a_judged_leap_is_not_dead_lettered_twice() -> None:
    # A replay's jump, held, then a swap whose re-read comes back in polls that end before it: it was put
    # in front of the older records, taken for a lone leap and dead-lettered, then read again and kept.
    step = step_for(FakeModel(window_size=4, version="1"))
    records = stream({"a": 0}, range(10))
    step.process(records, now_s=T0 + 10)
    jump = [reading_record("a", 8 * 3600 + k, 10 + k) for k in range(5)]  # going on from the jump
    assert step.process(jump[:1], now_s=T0 + 11).counts["accepted"] == 0  # held
    step.swap_model(FakeModel(window_size=3, version="2"), replay=True)
    seek = step.replay_from[(TOPIC, 0)]
    first = step.process([r for r in records if r.offset >= seek], now_s=T0 + 12)  # the re-read, up to 9
    assert first.dead_letters == [] and first.commits[(TOPIC, 0)] <= 10
    then = step.process(jump, now_s=T0 + 13)
    assert then.dead_letters == [] and then.counts["accepted"] == 5 and then.counts["consumed"] == 4
    # A lone leap dead-lettered before a swap, whose re-read ends on it: held again, and judged as read again
    step = step_for(FakeModel(window_size=4, version="1"))
    step.process(records, now_s=T0 + 10)
    poison = reading_record("a", 90_000_000_000 - int(T0), 10)
    after = [reading_record("a", 10 + k, 11 + k) for k in range(4)]
    step.process([poison], now_s=T0 + 11)
    assert len(step.process(after[:1], now_s=T0 + 12).dead_letters) == 1
    step.swap_model(FakeModel(window_size=3, version="2"), replay=True)
    seek = step.replay_from[(TOPIC, 0)]
    every = [*records, poison, *after]
    outs = [step.process([r for r in every if seek <= r.offset <= 10], now_s=T0 + 13),
            step.process([r for r in every if r.offset >= 11], now_s=T0 + 14)]
    assert [len(o.dead_letters) for o in outs] == [0, 0]  # sent the first time it was read


def test_a_held_jump_is_not_replaced_by_a_re_read_record_that_ends_its_poll() -> None:
    # a sped-up replay hours ahead of the clock: after a swap the new buffers know no stream time, so a
    # re-read record alone in its poll looked like a leap of its own and took the held one's place
    step = step_for(FakeModel(window_size=4, version="1"))
    records = [reading_record("r", 5 * 3600 + k, k) for k in range(10)]
    step.process(records, now_s=T0)
    jump = [reading_record("r", 8 * 3600 + k, 10 + k) for k in range(5)]
    assert step.process(jump[:1], now_s=T0).counts["accepted"] == 0  # held
    step.swap_model(FakeModel(window_size=3, version="2"), replay=True)
    seek = step.replay_from[(TOPIC, 0)]
    outs = [step.process([r], now_s=T0) for r in records[seek:]]  # the re-read, one record a poll
    assert all(o.commits[(TOPIC, 0)] <= 10 for o in outs)  # the held jump still pins its partition
    last = step.process(jump, now_s=T0)
    assert last.dead_letters == [] and last.counts["accepted"] == 5 and last.commits[(TOPIC, 0)] > 10


# --- alert state and commits ---------------------------------------------------------------------

def _fault_records() -> list[InputRecord]:
    """pump: 60 readings on partition 0, offsets 0..59, pressure +5 on slots 20..39."""
    return stream({"pump": 0}, range(60), fault=("pump", range(20, 40), "pressure", 5.0))


def _events_of(outputs: list[BatchOutput]) -> list[tuple[str, str, float]]:
    return [(e["status"], e["event_id"], e["start_ts"] - T0)
            for out in outputs for _, value in out.events for e in [decode_event(value)]]


def _policy() -> AlertPolicy:
    return AlertPolicy(min_duration_windows=3, recovery_windows=3, cooldown_s=0.0)


def test_a_restart_inside_an_event_replays_it_under_the_same_id() -> None:
    # DESIGN §2/§3: same input => same event_id, so re-delivery after a crash is idempotent. The commit used
    # to pass the start of the open event: the replay then opened it again under a new id, and the first
    # one was never closed.
    records = _fault_records()
    continuous = _events_of(run_batches(ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0),
                                                    _policy()), records, size=10))
    assert [status for status, _, _ in continuous] == ["open", "closed"]
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    before = run_batches(step, records[:30], size=10)  # delivered and committed, then the worker dies
    committed = before[-1].commits[(TOPIC, 0)]
    assert _events_of(before) == continuous[:1]
    # The run's first window ends at slot 22 (W 4: slots 19..22): the commit stays at its oldest reading.
    assert committed == 19 and step.alert_holds == {"pump": ((TOPIC, 0), 19)}
    restarted = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    replayed = _events_of(run_batches(restarted, records[committed:], size=10))
    assert replayed == continuous  # "open" again (a duplicate, upserted by id), then the close
    assert restarted.alert_holds == {}  # the event closed: nothing held any more


def _null_pressure_fault_records() -> list[InputRecord]:
    """pump, offsets = slots 0..59: pressure 1.9 up to slot 16, null from 17 to 44, then 1.0; temp +5 on
    slots 20..34 (the fault)."""
    records = []
    for slot in range(60):
        values = dict(zip(SENSORS, CENTRE), pressure=1.9 if slot < 17 else None if slot < 45 else 1.0)
        if 20 <= slot < 35:
            values["temp"] += 5.0
        records.append(reading_record("pump", slot, slot, values=values))
    return records


def test_a_restart_inside_an_event_whose_first_window_carries_a_null_sensor_keeps_its_id() -> None:
    # pressure is null from slot 17 on: the run's first window carries its last value (1.9, slot 16)
    # forward. The commit held at the window's oldest reading only: a replay from there filled pressure
    # with its typical value, the window scored otherwise, the run began at another window, and the
    # event came back under another id, the first never closed.
    records = _null_pressure_fault_records()
    policy = WindowPolicy(window_size=1, period_s=1.0)
    continuous = _events_of(run_batches(ScoringStep(FakeModel(4), policy, _policy()), records, size=10))
    assert [status for status, _, _ in continuous] == ["open", "closed"]
    step = ScoringStep(FakeModel(4), policy, _policy())
    before = run_batches(step, records[:30], size=10)  # delivered and committed, then the worker dies
    committed = before[-1].commits[(TOPIC, 0)]
    assert _events_of(before) == continuous[:1] and committed <= 16  # the reading pressure's value came from
    replayed = _events_of(run_batches(ScoringStep(FakeModel(4), policy, _policy()), records[committed:], size=10))
    assert replayed == continuous


def test_a_sensor_null_in_the_reading_an_event_s_peak_window_ends_on_is_said_filled_not_shown_as_read() -> None:
    # pressure null from slot 17 on, in every reading of the fault (temp +5, slots 20..34): its `actual`
    # used to be the carried-over 1.9, then (past max_fill_steps) its typical value, beside `expected`
    records = _null_pressure_fault_records()
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    events = [decode_event(v) for out in run_batches(step, records, size=10) for _, v in out.events]
    assert [e["status"] for e in events] == ["open", "closed"]
    for event in events:
        by_name = {s["sensor"]: s for s in event["sensors"]}
        assert by_name["pressure"]["actual"] is None and by_name["pressure"]["filled"] is True
        assert by_name["temp"]["actual"] == 75.0 and by_name["temp"]["filled"] is False
    # the bulk path (every sensor in every reading): nothing filled
    clean = [decode_event(v) for out in run_batches(ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0),
                                                                _policy()), _fault_records(), size=10)
             for _, v in out.events]
    assert clean and all(s["filled"] is False and s["actual"] is not None for e in clean for s in e["sensors"])


def test_a_restart_from_a_commit_another_entity_holds_inside_a_finished_event_keeps_its_id() -> None:
    # A's fault (slots 3-5) opens and closes; B's, from slot 5, is open and holds the commit at its first
    # window's oldest reading, which lies inside A's finished run. A restart from there used to rebuild
    # A's tail only and report it as a new event (start 6, another id): a phantom incident.
    model = FakeModel(window_size=2)
    records, offset = [], 0
    for slot in range(12):
        for entity, hot in (("A", slot in (3, 4, 5)), ("B", slot >= 5)):
            values = dict(zip(SENSORS, CENTRE), pressure=1.0 + (9.0 if hot else 0.0))
            records.append(reading_record(entity, slot, offset, values=values))
            offset += 1
    policy = AlertPolicy(min_duration_windows=1, recovery_windows=1, cooldown_s=0.0)
    first = ScoringStep(model, WindowPolicy(window_size=1, period_s=1.0), policy)
    out = first.process(records, now_s=T0 + 12)
    ids = {(decode_event(v)["entity"], decode_event(v)["status"]): decode_event(v)["event_id"] for _, v in out.events}
    assert set(ids) == {("A", "open"), ("A", "closed"), ("B", "open")}
    committed = out.commits[(TOPIC, 0)]
    assert committed <= 4  # at A's run's first window (slots 2-3), not at B's (offset 9, inside A's run)
    again = ScoringStep(model, WindowPolicy(window_size=1, period_s=1.0), policy)
    replayed = again.process([r for r in records if r.offset >= committed], now_s=T0 + 12)
    assert {(decode_event(v)["entity"], decode_event(v)["status"]): decode_event(v)["event_id"]
            for _, v in replayed.events} == ids
    # Once the commit is past A's run (B's event over, both runs behind it), A's hold is released.
    calm = [reading_record(e, slot, offset + 2 * (slot - 12) + k) for slot in range(12, 20) for k, e in enumerate("AB")]
    out = first.process(calm, now_s=T0 + 20)
    assert first.alert_holds == {} and out.commits[(TOPIC, 0)] > 24


def test_a_restart_from_any_commit_reports_only_the_events_of_the_uninterrupted_run() -> None:
    # A alarms at slots 3-12 and again at 16-30; B at 10-15, pinning the commit inside A's first run. Each
    # run has its own hold (a second run used to inherit the first's, and its 20 s "very long event"
    # release then unpinned the second run midway: a restart reported it under a new id).
    hot = {"A": set(range(3, 13)) | set(range(16, 31)), "B": set(range(10, 16))}
    records, offset = [], 0
    for slot in range(40):
        for entity in "AB":
            values = dict(zip(SENSORS, CENTRE), pressure=1.0 + (9.0 if slot in hot[entity] else 0.0))
            records.append(reading_record(entity, slot, offset, values=values))
            offset += 1
    policy = AlertPolicy(min_duration_windows=1, recovery_windows=1, cooldown_s=0.0)

    def step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=1), WindowPolicy(window_size=1, period_s=1.0), policy,
                           idle_timeout_s=20.0)

    first, seen, commits = step(), set(), []
    for slot in range(40):
        out = first.process(records[2 * slot:2 * slot + 2], now_s=T0 + 100)
        seen |= {(decode_event(v)["event_id"], decode_event(v)["start_ts"]) for _, v in out.events}
        commits.append(out.commits[(TOPIC, 0)])
    assert len(seen) == 3
    for slot, committed in enumerate(commits):  # the worker dies after this slot's batch
        replayed = step().process([r for r in records if r.offset >= committed], now_s=T0 + 100)
        ids = {(decode_event(v)["event_id"], decode_event(v)["start_ts"]) for _, v in replayed.events}
        assert ids <= seen, f"restart after slot {slot} from offset {committed}: {ids - seen}"
    assert commits[-1] > 60 and first.alert_holds == {}  # all over: nothing pinned


def test_a_restart_inside_an_event_closed_by_idle_expiry_reports_no_new_id() -> None:
    # X alarms at slots 10-14 and goes silent for good: its event is closed when it has been idle 20 s.
    # Y's long event (12-69) pins the commit inside X's run. The expired run's hold was dropped, not kept
    # as a finished run's is: a restart rebuilt X's tail alone and reported it under a new id.
    hot = {"X": set(range(10, 15)), "Y": set(range(12, 70))}
    records, offset, batches = [], 0, []
    for slot in range(90):
        batch = []
        for entity in ("X", "Y") if slot < 15 else ("Y",):
            values = dict(zip(SENSORS, CENTRE), pressure=1.0 + (9.0 if slot in hot[entity] else 0.0))
            batch.append(reading_record(entity, slot, offset, values=values))
            offset += 1
        records += batch
        batches.append(batch)
    policy = AlertPolicy(min_duration_windows=1, recovery_windows=1, cooldown_s=0.0, max_event_s=3600.0)

    def step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=1), WindowPolicy(window_size=1, period_s=1.0), policy,
                           idle_timeout_s=20.0)

    first = step()
    outs = [first.process(batch, now_s=T0 + 1000) for batch in batches]
    continuous = [decode_event(v) for out in outs for _, v in out.events]
    assert [(e["entity"], e["status"]) for e in continuous] == [("X", "open"), ("Y", "open"), ("X", "closed"),
                                                                 ("Y", "closed")]
    seen = {e["event_id"] for e in continuous}
    for slot, out in enumerate(outs):  # the worker dies after this slot's batch
        committed = out.commits[(TOPIC, 0)]
        replayed = step().process([r for r in records if r.offset >= committed], now_s=T0 + 1000)
        ids = {decode_event(v)["event_id"] for _, v in replayed.events}
        assert ids <= seen, f"restart after slot {slot} from offset {committed}: a new id"
    assert outs[-1].commits[(TOPIC, 0)] > 90 and first.alert_holds == {}  # all over: nothing pinned


def test_an_entity_back_after_the_idle_timeout_gets_the_same_events_however_the_batches_fall() -> None:
    # X alarms at 0-4, is silent, and alarms again at 40-44; Y reads every slot. Idle expiry was checked
    # only at a batch's end: read one slot at a time, the first event closed in the silence and a second
    # opened at 40; read at once, the first event went on to 44 (one event, another close).
    records, offset = [], 0
    for slot in range(60):
        readings = [("Y", False)] + ([("X", slot < 5 or 40 <= slot < 45)] if slot < 5 or slot >= 40 else [])
        for entity, hot in readings:
            values = dict(zip(SENSORS, CENTRE), pressure=1.0 + (9.0 if hot else 0.0))
            records.append(reading_record(entity, slot, offset, values=values))
            offset += 1

    def events(size: int) -> list[tuple[Any, ...]]:
        step = ScoringStep(FakeModel(window_size=1), WindowPolicy(window_size=1, period_s=1.0),
                           AlertPolicy(min_duration_windows=1, recovery_windows=3, cooldown_s=0.0),
                           idle_timeout_s=20.0)
        outs = [step.process(records[i:i + size], now_s=T0 + 1000) for i in range(0, len(records), size)]
        return [(e["entity"], e["status"], e["event_id"], e["start_ts"] - T0, e["end_ts"] and e["end_ts"] - T0)
                for out in outs for _, v in out.events for e in [decode_event(v)]]

    one_by_one = events(1)
    assert [(e[0], e[1], e[3]) for e in one_by_one] == [("X", "open", 0), ("X", "closed", 0),
                                                        ("X", "open", 40), ("X", "closed", 40)]
    assert events(500) == events(7) == one_by_one


def test_a_reading_placed_out_of_order_keeps_a_finished_runs_hold_until_the_commit_is_past_it() -> None:
    # grace 1: A's slot 8 (offset 7) comes before its hot slot 7 (offset 9); B's fault, from offset 8, pins the
    # commit there. A's finished run was released once the commit passed the OLDEST reading of its last window
    # above (7): a restart from 8 read slot 7 without slot 8, filled slot 8 from it, and reported a window
    # ending at 9 as a new event under another id. The hold now lasts until the commit passes the newest (9).
    records: list[InputRecord] = []

    def add(entity: str, slot: int, hot: bool) -> None:
        values = dict(zip(SENSORS, CENTRE), pressure=1.0 + (9.0 if hot else 0.0))
        records.append(reading_record(entity, slot, len(records), values=values))

    for slot in range(7):
        add("A", slot, slot in (5, 6))
    add("A", 8, False)
    add("B", 7, True)
    add("A", 7, True)
    for slot in range(8, 40):
        add("B", slot, True)
        if slot >= 9:
            add("A", slot, False)

    def step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=2), WindowPolicy(1, 1.0, grace_slots=1),
                           AlertPolicy(min_duration_windows=1, recovery_windows=1, cooldown_s=0.0))

    first = step()
    outs = [first.process(records[i:i + 5], now_s=T0 + 100) for i in range(0, len(records), 5)]
    seen = {decode_event(v)["event_id"] for out in outs for _, v in out.events}
    for k, out in enumerate(outs):  # the worker dies after batch k
        committed = out.commits[(TOPIC, 0)]
        again = step()
        replayed = [again.process(records[i:i + 5], now_s=T0 + 100) for i in range(committed, len(records), 5)]
        ids = {decode_event(v)["event_id"] for out in replayed for _, v in out.events}
        assert ids <= seen, f"restart after batch {k} from offset {committed}: a new id"


@pytest.mark.parametrize("hot, window, grid, min_duration, slots", [
    # A's fault 290 slots, B's short one inside A's second period: B pins the commit inside A's event.
    ({"A": range(20, 310), "B": range(150, 170)}, 4, 100.0, 3, 360),
    # Two long faults that start apart (a review's counterexample): with cuts per event, A's and B's
    # holds chained across cuts, the commit stayed at A's first reading, and once that hold aged out a
    # restart reported A's tail under a new id (43 of 160 restarts).
    ({"A": range(0, 130), "B": range(30, 130)}, 1, 60.0, 1, 160),
    ({"A": range(0, 250), "B": range(30, 250), "C": range(70, 120)}, 4, 60.0, 3, 280),
])
def test_long_faults_get_every_event_closed_whenever_the_worker_dies(hot, window, grid, min_duration, slots) -> None:
    # Events are cut at each boundary of a stream-time grid (closed, continued) and go on under new ids.
    # An event open past the idle timeout used to release its hold: a restart after that opened the
    # fault's continuation under a new id, and the first id never got its ``closed``.
    entities = sorted(hot)
    records, offset = [], 0
    for slot in range(slots):
        for entity in entities:
            values = dict(zip(SENSORS, CENTRE), pressure=1.0 + (9.0 if slot in hot[entity] else 0.0))
            records.append(reading_record(entity, slot, offset, values=values))
            offset += 1
    policy = AlertPolicy(min_duration_windows=min_duration, recovery_windows=min_duration, cooldown_s=0.0,
                         max_event_s=grid)

    def step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=window), WindowPolicy(window_size=1, period_s=1.0), policy,
                           idle_timeout_s=20.0)

    def events(outs: list[BatchOutput]) -> list[dict[str, Any]]:
        return [decode_event(v) for out in outs for _, v in out.events]

    n = len(entities)
    first = step()
    outs = [first.process(records[n * slot:n * slot + n], now_s=T0 + 1000) for slot in range(slots)]
    continuous = events(outs)
    cut = [e for e in continuous if e["continued"]]
    assert cut and all((e["end_ts"] - T0 + 1) % grid == 0 for e in cut)  # cut at the grid's boundaries
    seen = {e["event_id"] for e in continuous}
    lag = []
    for slot, out in enumerate(outs):  # the worker dies after this slot's batch, and restarts from its commit
        committed = out.commits[(TOPIC, 0)]
        lag.append(slot - committed // n)
        before = events(outs[:slot + 1])
        replayed = events([step().process([r for r in records if r.offset >= committed], now_s=T0 + 1000)])
        assert {e["event_id"] for e in replayed} <= seen, f"restart after slot {slot}: a new id"
        closed = {e["event_id"] for e in before + replayed if e["status"] == "closed"}
        assert {e["event_id"] for e in before if e["status"] == "open"} <= closed, f"restart after slot {slot}"
    # The commit stays within about one period and a window of the stream, never at the first reading.
    assert max(lag) <= grid + window + 2 and lag[-1] <= window + 2, max(lag)


def test_a_fault_on_a_grid_cut_keeps_its_events_as_one_chain() -> None:
    hot = set(range(20, 310))
    records = [reading_record("A", slot, slot, values=dict(zip(SENSORS, CENTRE), pressure=1.0 + 9.0 * (slot in hot)))
               for slot in range(360)]
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(min_duration_windows=3, recovery_windows=3, cooldown_s=0.0, max_event_s=100.0))
    events = [decode_event(v) for out in run_batches(step, records) for _, v in out.events]
    # (W 4: the first window above ends at slot 21, with two hot readings; T0 is on the 100 s grid)
    assert [(e["status"], e["continued"], e["start_ts"] - T0, e["end_ts"] and e["end_ts"] - T0) for e in events] == [
        ("open", False, 21, None), ("closed", True, 21, 99), ("open", False, 100, None), ("closed", True, 100, 199),
        ("open", False, 200, None), ("closed", True, 200, 299), ("open", False, 300, None),
        ("closed", False, 300, 311)]


def test_blips_that_open_no_event_leave_no_hold_behind() -> None:
    # pump-a blips every 6 slots, never long enough to open an event: nothing to replay, so the commit
    # stays within a window or so of the stream (a finished run's hold is kept only for an event; each
    # blip's used to keep the first one's offset, and the commit fell an idle timeout behind).
    step = ScoringStep(FakeModel(window_size=8, threshold=3.0), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(), idle_timeout_s=100.0)
    lag, offset = [], 0
    for slot in range(200):
        batch = []
        for entity in ("pump-a", "pump-b"):
            blip = entity == "pump-a" and slot % 6 == 0 and slot > 0
            batch.append(reading_record(entity, slot, offset, values=dict(zip(SENSORS, CENTRE),
                                                                          pressure=1.0 + (40.0 if blip else 0.0))))
            offset += 1
        out = step.process(batch, now_s=T0 + 300)
        assert not out.events
        lag.append((offset - out.commits[(TOPIC, 0)]) // 2)
    assert max(lag) <= 10


def test_a_batch_without_windows_keeps_the_hold() -> None:
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    run_batches(step, _fault_records()[:30], size=10)
    out = step.process([InputRecord(TOPIC, 0, 30, None, b"junk", None)], now_s=T0)  # a dead letter only
    assert out.counts["dead_letters"] == 1 and out.commits[(TOPIC, 0)] == 19


def test_a_revoked_partition_takes_its_alert_state_and_the_new_owner_keeps_the_id() -> None:
    records = _fault_records()
    first = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    opened = _events_of(run_batches(first, records[:30], size=10))
    first.forget_partitions([(TOPIC, 0)])
    assert first.alerts.entities == 0 and first.alert_holds == {}
    second = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    carried = _events_of(run_batches(second, records[19:], size=10))
    assert [e[1] for e in carried] == [opened[0][1]] * 2 and carried[-1][0] == "closed"


@pytest.mark.parametrize("rule", [{"episodes": EpisodeRule(drop=2.0, k=3)},
                                  {"adaptive": AdaptiveRule(rows=5, factor=2.0, quantile=0.5, lag=2)}],
                         ids=["episodes", "adaptive"])
def test_a_partition_revoked_and_assigned_back_re_reads_its_run_under_the_same_event_id(rule) -> None:
    # An eager rebalance hands a partition back to the worker that had it, which re-reads from the commit
    # the alert hold kept (the run's first window). Its moving bars must go with the rest of the
    # partition's state: a bar its own fault windows had raised opened the event later, under another id,
    # and the first id was never closed downstream. (Bars of revoked partitions were also never pruned.)
    records = [reading_record("pump", slot, slot, values=dict(
        zip(SENSORS, CENTRE), pressure=1.0 + 3 * (0.1 if slot < 20 or slot >= 50 else 1.5 * 1.15 ** (slot - 20))))
        for slot in range(80)]  # a fault that ramps up from slot 20 to 49
    policy = AlertPolicy(min_duration_windows=3, recovery_windows=3, cooldown_s=0)

    def step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=1, threshold=1.0, **rule), WindowPolicy(window_size=1, period_s=1.0),
                           policy)

    worker = step()
    outs = run_batches(worker, records[:40], size=5)
    opened, commit = _events_of(outs), outs[-1].commits[(TOPIC, 0)]
    assert [(s, ts) for s, _, ts in opened] == [("open", 20)] and commit == 20  # held at the run's first window
    worker.forget_partitions([(TOPIC, 0)])
    assert worker._bars[1].entities == 0  # the revoked partition's entity left the moving bars too
    again = _events_of(run_batches(worker, records[commit:], size=5))  # assigned back: from the commit
    fresh = _events_of(run_batches(step(), records[commit:], size=5))  # as a new owner would
    assert again == fresh and [(s, e) for s, e, _ in again] == [("open", opened[0][1]), ("closed", opened[0][1])]


def test_on_a_slow_grid_an_entity_between_two_of_its_windows_is_not_silent() -> None:
    # 15-minute readings, stride 4: one window an hour per entity. With a neighbour one slot ahead on its
    # partition, an hour of stream time passed between two windows of one fault: its alert state expired
    # and the fault became ten events under new ids.
    period = 900.0
    step = ScoringStep(FakeModel(window_size=8, period_s=period, threshold=1.0), WindowPolicy(1, 1.0, stride=4),
                       AlertPolicy(min_duration_windows=1, recovery_windows=3, cooldown_s=60))
    offset, events = 0, []
    for slot in range(60):
        for entity, at, temp in (("B", slot + 1, 70.0), ("A", slot, 90.0 if slot >= 16 else 70.0)):
            record = InputRecord(TOPIC, 0, offset, entity.encode(), json.dumps(
                {"entity": entity, "ts": T0 + at * period, "values": {"temp": temp, "pressure": 1.0, "flow": 5.0}}
            ).encode(), None)
            offset += 1
            out = step.process([record], now_s=T0 + 100 * period)
            events += [decode_event(v)["status"] for k, v in out.events if k == b"A"]
    assert events == ["open"]


def test_a_producer_sending_a_new_entity_id_with_every_reading_cannot_grow_the_step_past_its_cap(caplog) -> None:
    # 50 pumps report every slot beside 100 new ids a slot, under a cap of 100: the step stays near the cap
    # and every pump window is still scored (the pumps were evicted every batch at first: nothing scored).
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy(), emit_scores=True,
                       max_entities=100)
    offset, scored, held = 0, Counter(), []
    for slot in range(40):
        records = [reading_record(f"pump-{p}", slot, offset + p) for p in range(50)]
        records += [reading_record(f"once-{slot}-{k}", slot, offset + 50 + k) for k in range(100)]
        offset += 150
        out = step.process(records, now_s=T0 + 1000)
        held.append(step.windows.entities)
        scored.update(json.loads(v)["entity"] for _, v in out.scores if json.loads(v)["entity"].startswith("pump"))
    assert max(held) <= 250 and held[-1] <= 250  # at most one batch of new ids above the cap, not 4,050
    assert all(scored[f"pump-{p}"] == 40 - 3 for p in range(50))  # every window from slot 3 on, once
    assert "more than worker.max_entities (100)" in caplog.text and caplog.text.count("max_entities") == 1


def test_latency_runs_from_the_time_stamped_on_each_windows_last_reading() -> None:
    # Not from its slot's time, up to half a period away (60 s grid, readings at +40 s: 5 s early, then 0).
    period = 60.0
    step = ScoringStep(FakeModel(window_size=2, period_s=period), WindowPolicy(1, 1.0), _policy())
    records = [InputRecord(TOPIC, 0, i, b"p", json.dumps({"entity": "p", "ts": T0 + i * period + 40.0, "values": {
        "temp": 70.0, "pressure": 1.0, "flow": 5.0}}).encode(), None) for i in range(5)]
    out = step.process(records, now_s=T0 + 4 * period + 55.0)
    # windows end on readings 1..4, stamped at T0 + 60 i + 40
    assert out.latencies_s == pytest.approx([(4 - i) * period + 15.0 for i in (1, 2, 3, 4)])


def test_a_fleet_bigger_than_the_cap_is_still_scored_and_said_so(caplog) -> None:
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy(), max_entities=100)
    windows = 0
    for slot in range(20):
        out = step.process([reading_record(f"pump-{p}", slot, slot * 150 + p) for p in range(150)], now_s=T0 + 60 * slot)
        windows += out.counts["windows_scored"]
    assert windows == 150 * (20 - 3) and step.windows.entities == 150
    assert "the active ones alone are more than the cap: raise it, or add workers" in caplog.text


def test_new_entity_ids_alone_are_evicted_down_to_the_cap(caplog) -> None:
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy(), max_entities=100)
    outs = [step.process([reading_record(f"once-{i}-{k}", i, i * 50 + k) for k in range(50)], now_s=T0 + 1000)
            for i in range(10)]
    assert step.windows.entities <= 100 and sum(o.counts["evicted"] for o in outs) >= 400
    assert "more than worker.max_entities (100)" in caplog.text


def test_alert_state_of_a_silent_entity_is_expired_and_its_open_event_closed() -> None:
    step = ScoringStep(FakeModel(window_size=1), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(min_duration_windows=2, recovery_windows=3), idle_timeout_s=60.0)
    hot = dict(zip(SENSORS, CENTRE), pressure=6.0)
    offset = 0
    for k in range(50):  # 50 entities with one spike each, then silence: short runs, never an event
        step.process([reading_record(f"tmp-{k}", k, offset, values=hot)], now_s=T0)
        offset += 1
    out = step.process([reading_record("pump", 50 + s, offset + s, values=hot) for s in range(3)], now_s=T0)
    opened = [decode_event(v) for _, v in out.events]
    assert [e["status"] for e in opened] == ["open"] and step.alerts.entities == 51
    offset += 3
    outs = [step.process([reading_record("steady", 100 + s, offset + i)], now_s=T0)
            for i, s in enumerate(range(0, 600, 30))]  # stream time moves on 10 minutes
    closed = [decode_event(v) for out in outs for _, v in out.events]
    assert [(e["status"], e["event_id"]) for e in closed] == [("closed", opened[0]["event_id"])]
    assert closed[0]["end_ts"] == T0 + 52  # its last window above the threshold
    assert step.alerts.entities == 0 and step.alert_holds == {}
    assert sum(out.counts["events_closed"] for out in outs) == 1


def test_readings_of_another_sensor_set_age_their_entity_out_and_release_its_commit() -> None:
    # A champion that reads other sensors than the fleet sends: every reading is a dead letter. Their time
    # still moves the partition's stream time, so the entity ages out like a silent one: its open event is
    # closed and its commit hold released. Before, stream time stood still and the hold pinned the commit.
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy(), idle_timeout_s=60.0)
    records = _fault_records()[:30]  # the fault starts at slot 20: an event is open
    opened = _events_of(run_batches(step, records, size=10))
    assert [status for status, _, _ in opened] == ["open"] and step.alert_holds == {"pump": ((TOPIC, 0), 19)}
    other = {"temp": 70.0, "rpm": 1500.0}  # not the model's sensors
    outs = [step.process([reading_record("pump", 30 + s, 30 + s, values=other)], now_s=T0 + 1000)
            for s in range(0, 100, 10)]
    assert all(out.counts["dead_letters"] == 1 for out in outs)
    assert [out.commits[(TOPIC, 0)] for out in outs[:3]] == [19, 19, 19]  # within idle_timeout_s: held
    closed = [(s, e) for s, e, _ in _events_of(outs)]
    assert closed == [("closed", opened[0][1])] and step.alert_holds == {} and "pump" not in step.windows
    assert outs[-1].commits[(TOPIC, 0)] == 30 + 90 + 1  # past the dead letters, which went out first
    assert step.windows.stream_time(0) == T0 + 120


def test_readings_of_another_sensor_set_stamped_ahead_do_not_move_stream_time() -> None:
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy(), idle_timeout_s=60.0,
                       max_future_s=5.0)
    step.process(_fault_records()[:30], now_s=T0 + 30)
    out = step.process([reading_record("pump", 3600, 30, values={"rpm": 1.0})], now_s=T0 + 30)
    assert out.counts["dead_letters"] == 1 and step.windows.stream_time(0) == T0 + 29
    assert step.alert_holds == {"pump": ((TOPIC, 0), 19)}


def test_a_lagging_partition_is_measured_by_its_own_stream_time() -> None:
    # 'pump' on partition 1 is two hours behind 'fan' on partition 0 (a backlog being worked through); its
    # long fault is ONE event, held, not expired as "silent" by the other partition's clock every batch.
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    hot, ok = dict(zip(SENSORS, CENTRE), pressure=6.0), dict(zip(SENSORS, CENTRE))
    outputs = []
    for b in range(6):
        records = []
        for s in range(10):
            slot = b * 10 + s
            records.append(reading_record("pump", slot, slot, partition=1, values=hot))
            records.append(reading_record("fan", 7200 + slot, slot, partition=0, values=ok))
        outputs.append(step.process(records, now_s=T0 + 10_000))
    assert [status for status, _, _ in _events_of(outputs)] == ["open"]
    assert step.alert_holds == {"pump": ((TOPIC, 1), 0)} and outputs[-1].commits[(TOPIC, 1)] == 0


def test_a_batch_in_flight_at_a_revocation_does_not_bring_the_alert_state_back() -> None:
    # The worker stages batch k, the group revokes the partition, then batch k completes: its alert state
    # for the revoked partition must not survive (a stale hold would later drag a commit backwards).
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    records = _fault_records()
    run_batches(step, records[:20], size=10)
    staged = step.stage(records[20:30], now_s=T0 + 1000)
    step.forget_partitions([(TOPIC, 0)])
    out = step.complete(staged, step.score(staged))
    assert [e for _, e, _ in _events_of([out])] and step.alert_holds == {} and step.alerts.entities == 0
    # Back on this worker later: commits go on from the new records, no hold drags them to offset 19.
    later = step.process(stream({"pump": 0}, range(100, 110)), now_s=T0 + 1000)
    assert later.commits[(TOPIC, 0)] >= 7


def test_an_entity_on_two_partitions_holds_each_commit_with_its_own_offsets() -> None:
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy())
    hot = dict(zip(SENSORS, CENTRE), pressure=6.0)
    records = [reading_record("pump", slot, (slot // 2) + (5000 if slot % 2 else 0), partition=slot % 2,
                              values=hot if slot >= 21 else None) for slot in range(40)]  # first hot window ends on P1
    outputs = run_batches(step, records, size=10)
    assert step.alert_holds == {"pump": ((TOPIC, 1), 5010)}  # the run's first window ends on P1: P1's own offset
    for out in outputs:
        assert out.commits.get((TOPIC, 1), 5000) >= 5000 and out.commits.get((TOPIC, 0), 0) < 5000


def _coverage(outs: list[BatchOutput]) -> tuple[dict[str, set[float]], list[tuple[str, float]]]:
    """Per entity the slot times in some scored window, and the (entity, end) pairs scored more than once."""
    covered: dict[str, set[float]] = {}
    ends = []
    for out in outs:
        for _, v in out.scores:
            d = json.loads(v)
            covered.setdefault(d["entity"], set()).update(np.arange(d["start_ts"], d["ts"] + 0.5, 1.0).tolist())
            ends.append((d["entity"], d["ts"]))
    return covered, [e for e in set(ends) if ends.count(e) > 1]


@pytest.mark.parametrize("stride", [1, 8])
def test_a_replay_scores_what_the_old_model_never_did_whatever_the_strides(stride: int) -> None:
    # "n" appears 5 slots before the swap (no window of 8 yet); with worker.stride 8 the old model's last
    # window ends at slot 23 and the new one's (window 4, so stride 4) at multiples of 4: no slot left out
    records = stream({"a": 0}, range(40))
    late_comer = [reading_record("n", s, 100 + s, partition=1) for s in range(20, 40)]
    records = sorted(records + late_comer, key=lambda r: (json.loads(r.value)["ts"], r.partition))
    step = ScoringStep(FakeModel(window_size=8, version="1"), WindowPolicy(window_size=1, period_s=1.0, stride=stride),
                       AlertPolicy(), emit_scores=True)
    before = [r for r in records if json.loads(r.value)["ts"] < T0 + 26]
    outs = run_batches(step, before)
    step.swap_model(FakeModel(window_size=4, version="2"), replay=True)
    after = [r for r in records if r.offset >= step.replay_from.get((r.topic, r.partition), r.offset + 1)
             or r not in before]
    outs += run_batches(step, after)
    covered, twice = _coverage(outs)
    assert twice == []
    # from n's first window on (stride 4: the first ends at 24), up to the last window end before 40
    first, last = (20, 39) if stride == 1 else (21, 36)
    assert {T0 + s for s in range(first, last + 1)} <= covered["n"]
    assert {T0 + s for s in range(0 if stride == 1 else 1, last + 1)} <= covered["a"]


def test_commits_during_a_replay_stay_at_or_above_the_commit_before_the_swap() -> None:
    records = stream({"a": 0}, range(40))
    step = step_for(FakeModel(window_size=4, version="1"))
    before = step.process(records[:30], now_s=T0 + 30)
    floor = before.commits[(TOPIC, 0)]
    step.swap_model(FakeModel(window_size=8, version="2"), replay=True)  # reaches further back than v1 held
    seek = step.replay_from[(TOPIC, 0)]
    commits = [step.process(records[i:i + 3], now_s=T0 + 40).commits[(TOPIC, 0)] for i in range(seek, 40, 3)]
    assert seek < floor and min(commits) >= floor  # a crash now re-reads no more than before the swap
    assert commits[-1] == 40 - 7  # past the floor: the new buffers' own needs again


def test_a_second_swap_during_a_replay_keeps_what_the_first_has_still_to_re_read() -> None:
    records = stream({"a": 0, "b": 1}, range(35))
    step = ScoringStep(FakeModel(window_size=6, version="1"), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(), emit_scores=True)
    outs = run_batches(step, records[:2 * 25])
    step.swap_model(FakeModel(window_size=4, version="2"), replay=True)
    position = {tp: offset for tp, offset in step.replay_from.items()}
    on_0 = [r for r in records[:2 * 25] if r.partition == 0 and r.offset >= position[(TOPIC, 0)]]
    outs.append(step.process(on_0[:1], now_s=T0 + 40))  # partition 0 re-read a little, partition 1 not yet
    position[(TOPIC, 0)] = on_0[0].offset + 1
    step.swap_model(FakeModel(window_size=3, version="3"), replay=True)
    position.update(step.replay_from)
    rest = [r for r in records if r.offset >= position[(r.topic, r.partition)]]
    outs += run_batches(step, rest)
    covered, twice = _coverage(outs)
    assert twice == [] and sum(o.counts["consumed"] for o in outs) == len(records)
    assert all({T0 + s for s in range(35)} <= covered[e] for e in ("a", "b"))


def test_an_entity_sending_far_behind_its_partition_is_named_not_silently_dropped(caplog) -> None:
    # a clock 2 h late (local time sent as UTC): each reading is evicted as idle in the batch that brings
    # it, so the entity is never scored; before, only the evicted count moved
    step = ScoringStep(FakeModel(4), WindowPolicy(window_size=1, period_s=1.0), _policy(), emit_scores=True)
    offset, scored, evicted, late = 0, Counter(), 0, 0
    for slot in range(7300, 7400):
        out = step.process([reading_record("good", slot, offset), reading_record("late", slot - 7200, offset + 1)],
                           now_s=T0 + slot)
        offset += 2
        scored.update(json.loads(v)["entity"] for _, v in out.scores)
        evicted += out.counts["evicted"]
        late += out.counts["late"]
    assert scored["late"] == 0 and scored["good"] == 100 - 3 and (evicted, late) == (0, 100)  # late as they come
    warned = [r.getMessage() for r in caplog.records if "behind their partition" in r.getMessage()]
    assert len(warned) == 2 and "'late'" in warned[0] and "'good'" not in warned[0]  # once a minute of now_s


def _overlapped(step: ScoringStep, chunks: list[list[InputRecord]], now_s: float) -> list[BatchOutput]:
    """The worker's order: batch i+1 staged before batch i completes."""
    outs, in_flight = [], None
    for chunk in chunks:
        staged = step.stage(chunk, now_s=now_s)
        if in_flight is not None:
            outs.append(step.complete(in_flight, step.score(in_flight)))
        in_flight = staged
    outs.append(step.complete(in_flight, step.score(in_flight)))
    return outs


def test_a_backlog_staged_ahead_does_not_close_an_event_mid_fault() -> None:
    """A poll covering more than the idle timeout of stream time (5,000 readings at 1 s: over an hour)
    made an entity in its fault look silent when completing the batch before it: its event was closed,
    its commit hold dropped, and the rest of the fault opened a second event under a new id."""
    records = stream({"q": 0}, range(400), fault=("q", range(50, 350), "pressure", 5.0))
    chunks = [records[i:i + 100] for i in range(0, len(records), 100)]

    def new_step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0),
                           AlertPolicy(max_event_s=10**9), idle_timeout_s=30.0)

    step = new_step()
    sequential = [step.process(chunk, now_s=T0 + 1000) for chunk in chunks]
    overlapped = _overlapped(new_step(), chunks, T0 + 1000)
    events = [decode_event(v) for o in overlapped for _, v in o.events]
    assert [e["status"] for e in events] == ["open", "closed"]
    assert [(o.events, o.commits) for o in sequential] == [(o.events, o.commits) for o in overlapped]


def test_an_entity_stamping_far_behind_its_partition_is_never_scored(caplog) -> None:
    """Local time sent as UTC (3 h behind the partition's newest): a poll bringing a window's worth of its
    readings scored them before the entity was evicted, so a fault opened an event, closed it at once, and
    opened another under a new id at every poll. Its readings are late as they come, and said so."""
    step = step_for(FakeModel(window_size=4))
    offset, outs = 0, []
    for b in range(3):
        batch = []
        for k in range(20):
            slot = b * 20 + k
            batch.append(reading_record("pump-a", 10800 + slot, offset))
            faulty = dict(zip(SENSORS, CENTRE))
            faulty["pressure"] += 5.0
            batch.append(reading_record("pump-b", slot, offset + 1, values=faulty))
            offset += 2
        outs.append(step.process(batch, now_s=T0 + 10900))
    assert [decode_event(v) for o in outs for _, v in o.events] == []
    assert sum(o.counts["late"] for o in outs) == 60
    assert all(o.counts["windows_scored"] > 0 for o in outs[1:])  # pump-a is scored
    assert "'pump-b'" in caplog.text and "behind their partition's newest" in caplog.text


def test_an_entity_whose_readings_never_fall_on_a_stride_slot_is_named(caplog) -> None:
    """At stride 4 only slots with slot % 4 == 0 end a window; a device read every 2 s at an odd phase
    on a 1 s model never has a reading there: all its readings were "accepted", no window was ever
    scored, and nothing said so."""
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0, stride=4), AlertPolicy())
    records = [reading_record("odd", 2 * k + 1, k) for k in range(60)]
    outs = [step.process(records[i:i + 10], now_s=T0 + 200) for i in range(0, 60, 10)]
    assert sum(o.counts["windows_scored"] for o in outs) == 0
    assert "'odd'" in caplog.text and "worker.stride" in caplog.text
    caplog.clear()
    even = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0, stride=4), AlertPolicy())
    outs = [even.process([reading_record("even", 2 * k, k) for k in range(i, i + 10)], now_s=T0 + 200)
            for i in range(0, 60, 10)]
    assert sum(o.counts["windows_scored"] for o in outs) > 0 and "worker.stride" not in caplog.text


def test_entities_missing_the_stride_slots_are_named_every_minute_while_it_lasts(caplog) -> None:
    """A name that came in the minute after a warning was lost, and an entity was named only once."""
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0, stride=4), AlertPolicy())
    offset = 0
    for second in range(0, 300, 10):
        batch = []
        for name, phase in (("odd-a", 1), ("odd-b", 3)):
            for k in range(second, second + 10, 2):
                batch.append(reading_record(name, k + phase, offset))
                offset += 1
        step.process(batch, now_s=T0 + second)
    warned = [r.getMessage() for r in caplog.records if "worker.stride" in r.getMessage()]
    assert len(warned) >= 4 and all("'odd-a'" in w and "'odd-b'" in w for w in warned[1:])


def test_readings_read_again_after_a_swap_are_not_counted_late_twice() -> None:
    step = step_for(FakeModel(window_size=4))
    records, offset = [], 0
    for i in range(40):
        records += [reading_record("good", 7300 + i, offset), reading_record("late", 100 + i, offset + 1)]
        offset += 2
    first = sum(step.process(records[i:i + 10], now_s=T0 + 7400).counts["late"] for i in range(0, 80, 10))
    step.swap_model(FakeModel(window_size=6, version="2"), replay=True)
    again = records[next(iter(step.replay_from.values())):]
    outs = [step.process(again[i:i + 10], now_s=T0 + 7400) for i in range(0, len(again), 10)]
    assert first == 40 and sum(o.counts["replayed"] for o in outs) == len(again) > 0
    assert sum(o.counts["late"] for o in outs) == 0  # counted the first time they were read


def test_readings_before_another_sensor_sets_later_stamps_in_one_poll_are_not_behind() -> None:
    """A poll held a pump's readings, then its readings of another sensor set stamped 100 minutes later
    (dead letters whose time counts): their stamps moved the clock before the readings were judged, and
    every reading was dropped as far behind (no event; the worker's integration test caught it)."""
    step = step_for(FakeModel(window_size=4))
    batch = []
    for slot in range(60):
        values = dict(zip(SENSORS, CENTRE))
        if slot >= 30:
            values["pressure"] += 5.0
        batch.append(reading_record("pump", slot, slot, values=values))
    for k in range(1, 11):
        raw = encode_reading(Reading("pump", T0 + 60 + 600 * k, {"a": 1.0, "b": 1.0}))
        batch.append(InputRecord(TOPIC, 0, 59 + k, b"pump", raw, None))
    out = step.process(batch, now_s=T0 + 7000)
    assert out.counts["late"] == 0 and out.counts["dead_letters"] == 10
    assert [decode_event(v)["status"] for _, v in out.events][:1] == ["open"]


def test_a_fleet_models_validation_overlay_shows_its_last_entitys_rows_alone(detector_model: DetectorModel,
                                                                            monkeypatch) -> None:
    """The last entity's final readings labelled (a gap, with its margin, at the very end): the cut after
    the last gap left too few rows, and the overlay fell back to the last 2,000 rows, the other entity's
    training and validation rows among them, drawn against the last one's threshold under its name."""
    from anomaly import plots
    from anomaly.preparation import prepare_fleet
    from anomaly.train_job import _log_figures
    from types import SimpleNamespace

    from anomaly.training import EpochStats

    detector = detector_model.detector
    frames = {"a": normal_frame(1500, seed=3), "b": normal_frame(1500, seed=4)}
    labels = {"a": np.zeros(1500, bool), "b": np.r_[np.zeros(1497, bool), np.ones(3, bool)]}
    prepared = prepare_fleet(frames, window_size=detector.window_size, validation_fraction=0.2, labels=labels)
    a, b = prepared.entity_tails["b"][-1]
    shown: dict[str, object] = {}

    def overlay(stamps, values, sensors, scores, bars, **kw):
        shown.update(stamps=np.asarray(stamps), rows=len(values), subject=kw.get("subject"))
        return None

    monkeypatch.setattr(plots, "anomaly_overlay", overlay)

    class Run:
        def log_figure(self, fig, name):
            pass

    result = SimpleNamespace(history=[EpochStats(1, 0.5, 0.6, 1.0, 100.0)], best_epoch=1, val_start_row=None)
    _log_figures(Run(), detector, result, np.ones(10), prepared)
    assert shown["subject"] == "b"
    own = set(np.asarray(prepared.timestamps[a:b]).tolist())
    assert 2 * detector.window_size <= shown["rows"] <= b - a
    assert set(shown["stamps"].tolist()) <= own  # none of a's rows, nor b's training rows


def test_a_fleet_models_validation_overlay_holds_its_last_entity_to_that_entitys_own_threshold(
        detector_model: DetectorModel) -> None:
    """The overlay shows the last entity's validation rows; it drew the shared bar, while the worker,
    ``score`` and the pyfunc hold that entity to its own."""
    from anomaly import plots
    from anomaly.preparation import prepare_fleet
    from anomaly.train_job import _log_figures
    from types import SimpleNamespace

    from anomaly.training import EpochStats

    detector = detector_model.detector
    prepared = prepare_fleet({"a": normal_frame(400, seed=3), "b": normal_frame(400, seed=4)},
                             window_size=detector.window_size, validation_fraction=0.5)
    last = max(prepared.entity_tails, key=lambda e: prepared.entity_tails[e][-1][1])
    figures: dict[str, object] = {}

    class Run:
        def log_figure(self, fig, name):
            figures[name] = fig

    fitted = detector.threshold
    try:
        detector.threshold = fitted.with_per_entity({last: fitted.value * 7, "other": fitted.value / 7})
        result = SimpleNamespace(history=[EpochStats(1, 0.5, 0.6, 1.0, 100.0)], best_epoch=1, val_start_row=None)
        _log_figures(Run(), detector, result, np.ones(10), prepared)
    finally:
        detector.threshold = fitted
    fig = figures["validation_overlay.png"]
    (bar,) = [line for line in fig.axes[-1].lines if line.get_linestyle() == "--"]
    assert np.nanmax(bar.get_ydata()) == pytest.approx(fitted.value * 7)
    assert fig._suptitle.get_text().startswith(f"{last}: readings")
    for f in figures.values():
        plots.close(f)


@pytest.mark.parametrize("case", ["null_gap", "all_null"])
def test_the_worker_the_score_command_and_the_pyfunc_give_one_score_per_slot(detector_model: DetectorModel,
                                                                             case: str) -> None:
    """The same readings through the worker (stride 1), `anomaly score`'s table and the pyfunc's rows.
    null_gap: a sensor null in 3 readings, 3 slots with no reading, null in 3 more: the worker counted the
    null run in readings (the gap's slots left out), the file in slots, and the worker's scores came out
    20-35 % higher for six slots. all_null: 10 readings with every sensor null: the file's grid has no
    reading there (an outage, no window over it scored) while the worker and the pyfunc scored 17 windows
    of made-up values. Slots the worker does not score (a window never ends on a gap slot) aside, the
    three give the same scores."""
    import pandas as pd

    from anomaly.cli import _score_table
    from anomaly.config import build_settings
    from anomaly.mlflow_model import _score_rows

    det = detector_model.detector
    f = normal_frame(120, seed=3, start="2026-02-01T00:00:00Z")
    if case == "null_gap":
        f.iloc[50:53, 1] = np.nan
        f.iloc[56:59, 1] = np.nan
        f = f.drop(f.index[53:56])
    else:
        f.iloc[50:60, :] = np.nan
    t0 = f.index[0].timestamp()
    offline = _score_table(det, f, build_settings({}), "pump").table
    by_slot = {round(ts.timestamp() - t0): s for ts, s in zip(offline.ts, offline.score)}
    step = ScoringStep(detector_model, WindowPolicy(8, 1.0, stride=1, max_fill_steps=5), AlertPolicy(cooldown_s=0.0),
                       emit_scores=True, idle_timeout_s=None, max_future_s=None)
    records = [InputRecord(TOPIC, 0, i, b"pump", encode_reading(Reading(
        "pump", t.timestamp(), {s: (None if pd.isna(v) else float(v)) for s, v in zip(SENSORS, row)})), None)
        for i, (t, row) in enumerate(zip(f.index, f.to_numpy()))]
    worker: dict[int, float] = {}
    for a in range(0, len(records), 40):
        for _, raw in step.process(records[a:a + 40], now_s=2e9).scores:
            d = json.loads(raw)
            worker[round(d["ts"] - t0)] = d["score"]
    assert worker and all(np.isfinite(by_slot[s]) for s in worker)
    np.testing.assert_allclose([worker[s] for s in sorted(worker)], [by_slot[s] for s in sorted(worker)], rtol=1e-5)
    unscored = sorted(s for s, v in by_slot.items() if not np.isfinite(v))
    if case == "all_null":
        assert unscored == list(range(7)) + list(range(50, 67))  # the first window, and every one over the stretch
        pyfunc, _, _ = _score_rows(det, f.reset_index(drop=True), det.threshold)
        np.testing.assert_allclose(pyfunc, offline.score.to_numpy(), rtol=1e-5)
    else:
        assert set(range(53, 56)) <= set(by_slot) - set(worker)  # the gap's slots: filled, not scored by the worker


def _sensor_by_sensor(slots: range) -> list[InputRecord]:
    """A producer sending each slot's sensors one message each (the others null), as many gateways do."""
    records, offset = [], 0
    for slot in slots:
        for name, value in zip(SENSORS, CENTRE):
            parts = {other: (value + 0.01 * slot if other == name else None) for other in SENSORS}
            records.append(reading_record("p", slot, offset, values=parts))
            offset += 1
    return records


@pytest.mark.parametrize("grace", [0, 1])
def test_a_producer_sending_sensor_by_sensor_is_merged_with_grace_and_named_without(grace, caplog) -> None:
    step = ScoringStep(FakeModel(2), WindowPolicy(window_size=2, period_s=1.0, grace_slots=grace), _policy(),
                       emit_scores=True)
    outs = run_batches(step, _sensor_by_sensor(range(40)), size=5)
    scores = [json.loads(v) for o in outs for _, v in o.scores]
    duplicates = sum(o.counts["duplicates"] for o in outs)
    warned = [r.getMessage() for r in caplog.records if "more than one reading" in r.getMessage()]
    assert len(scores) >= 35
    if grace:  # every sensor's own value reached the window: nothing filled, nothing dropped, no warning
        assert duplicates == 0 and warned == [] and all(s["filled"] == 0 for s in scores)
    else:  # each slot's second and third parts were dropped: said once (a minute of now_s), naming the entity
        assert duplicates == 2 * 40 and len(warned) == 1 and "'p'" in warned[0] and "grace_slots to 1" in warned[0]
        assert all(s["filled"] > 0 for s in scores)


def test_a_restart_from_the_commit_rebuilds_merged_slots_as_they_were() -> None:
    # a merged slot keeps its first part's offset: the commit holds there, and a replay from it reads the
    # later parts again, so every window after a restart scores the same values as without one
    def fresh() -> ScoringStep:
        return ScoringStep(FakeModel(3), WindowPolicy(window_size=3, period_s=1.0, grace_slots=1), _policy(),
                           emit_scores=True)

    def scored(outs: list[BatchOutput]) -> dict[float, float]:
        return {s["ts"]: (s["score"], s["filled"]) for s in (json.loads(v) for o in outs for _, v in o.scores)}

    records = _sensor_by_sensor(range(30))
    continuous = scored(run_batches(fresh(), records, size=4))
    for cut in (4, 8, 16, 44, 60):
        before = run_batches(fresh(), records[:cut], size=4)
        committed = before[-1].commits[(TOPIC, 0)]
        after = scored(run_batches(fresh(), records[committed:], size=4))
        assert {**scored(before), **after} == continuous, cut
        assert set(after) >= set(continuous) - set(scored(before)), cut


def _sensor_by_sensor_alone(slots: range) -> list[InputRecord]:
    """Each sensor in a message of its own, the others absent (not null): what most gateways send."""
    records, offset = [], 0
    for slot in slots:
        for name, value in zip(SENSORS, CENTRE):
            records.append(reading_record("p", slot, offset, values={name: value + 0.01 * slot}))
            offset += 1
    return records


@pytest.mark.parametrize("partial", [False, True])
def test_readings_of_one_sensor_each_are_dead_letters_unless_partial_readings_are_on(partial) -> None:
    step = ScoringStep(FakeModel(2), WindowPolicy(window_size=2, period_s=1.0, grace_slots=1), _policy(),
                       emit_scores=True, partial_readings=partial)
    outs = run_batches(step, _sensor_by_sensor_alone(range(20)), size=6)
    dead = [decode_dead_letter(v) for o in outs for _, v in o.dead_letters]
    scores = [json.loads(v) for o in outs for _, v in o.scores]
    if partial:  # merged in their slots: every window of read values
        assert dead == [] and len(scores) >= 17 and all(s["filled"] == 0 for s in scores)
    else:
        assert len(dead) == 60 and scores == []
        assert "worker.partial_readings = true accepts" in dead[0]["reason"]


def test_finished_runs_pin_the_commit_as_repeating_until_none_is_caught_would() -> None:
    # The catch was a repeat-until-stable loop with list.remove: quadratic in the finished runs held, 58 ms a
    # batch with 20,000 after a fleet-wide alarm. One sorted pass per stream must give the same commits and
    # keep the same runs, whatever the runs' offsets and reach.
    import random

    from anomaly.scoring_step import BatchOutput, ScoringStep, _Hold

    def by_fixpoint(commits: dict, runs: list) -> tuple[dict, set]:
        commits, waiting, kept = dict(commits), list(runs), set()
        caught = True
        while caught:
            caught = False
            for entity, hold in list(waiting):
                key = ("in", hold.stream)
                if key in commits and commits[key] <= hold.through:
                    commits[key] = min(commits[key], hold.offset)
                    waiting.remove((entity, hold))
                    kept.add(entity)
                    caught = True
        return commits, kept | {e for e, h in runs if ("in", h.stream) not in commits}

    rng = random.Random(7)
    for _ in range(300):
        runs = []
        for k in range(rng.randint(0, 30)):
            offset = rng.randint(0, 200)
            runs.append((f"e{k}", _Hold(stream=rng.randint(0, 2), offset=offset, start_ts=0.0, last_ts=0.0,
                                        opened=True, through=offset + rng.randint(0, 40))))
        commits = {("in", s): rng.randint(0, 260) for s in (0, 1)}  # stream 2: no commit this batch
        step = ScoringStep.__new__(ScoringStep)
        step._holds, step._finished, step.idle_timeout_s = {}, list(runs), None
        step._stream_keys = {s: ("in", s) for s in range(3)}
        out = BatchOutput(commits=dict(commits))
        step._apply_holds(out, {})
        expected_commits, expected_kept = by_fixpoint(commits, runs)
        assert out.commits == expected_commits
        assert {e for e, _ in step._finished} == expected_kept


def test_a_sensor_the_models_training_left_out_is_read_past_not_dead_lettered() -> None:
    """`anomaly train` leaves out a sensor constant in its data (here flow) and says so; the producers keep
    sending it. The worker used to dead-letter every reading for it ("unknown ['flow']") once that model
    was promoted: the whole fleet went unscored."""
    train = normal_frame(rows=300, seed=2)[["temp", "pressure"]].to_numpy()
    detector, _, _ = fit_detector(
        train, ("temp", "pressure"), {"window_size": 4, "hidden_size": 8, "latent_size": 2},
        TrainConfig(epochs=1, batch_size=64, patience=2, seed=0, device="cpu", progress=False),
        threshold_method="quantile", threshold_params={"q": 0.99}, period_s=1.0)
    detector.meta = {"dropped_sensors": ["flow"]}  # as train_job writes it
    model = DetectorModel(detector, name="pumps", version="2", device="cpu")
    assert model.sensors == ("temp", "pressure") and model.ignored_sensors == ("flow",)
    step = step_for(model)
    outs = run_batches(step, stream({"p1": 0, "p2": 1}, range(20)))  # readings carry temp, pressure and flow
    assert sum(o.counts["dead_letters"] for o in outs) == 0
    assert sum(o.counts["windows_scored"] for o in outs) == 2 * (20 - 3)
    # a sensor it never heard of is still a dead letter, naming it
    rpm = reading_record("p1", 30, 100, values={"temp": 70.0, "pressure": 1.0, "flow": 5.0, "rpm": 3.0})
    out = step.process([rpm], now_s=T0 + 1000)
    assert out.counts["dead_letters"] == 1 and "unknown ['rpm']" in decode_dead_letter(out.dead_letters[0][1])["reason"]
    step.swap_model(FakeModel(window_size=4))  # a model without such a list (v1 reads all three): nothing is left out
    out = step.process([reading_record("p1", 31, 101)], now_s=T0 + 1000)
    assert out.counts["dead_letters"] == 0


def test_a_sensor_gone_silent_is_named_once_and_counted_for_the_gauge(caplog) -> None:
    """A sensor that stops sending (null, or absent with partial readings) is scored on its typical value
    after worker.max_fill_steps slots; nothing said so, and the asset scored lower (looked healthier)."""
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0, max_fill_steps=3),
                       AlertPolicy())
    values = dict(zip(SENSORS, CENTRE))
    dead = {**values, "flow": None}
    records = [reading_record(e, slot, slot, p, values if e == "p2" or slot < 10 else dead)
               for slot in range(30) for e, p in (("p1", 0), ("p2", 1))]
    with caplog.at_level("INFO", logger="anomaly.scoring_step"):
        first = step.process(records[:20], now_s=T0)  # slots 0-9: every sensor reports
        assert first.silent_sensors == 0
        assert step.process(records[20:40], now_s=T0 + 30).silent_sensors is None  # checked once a minute
        out = step.process(records[40:], now_s=T0 + 60)  # p1's flow null in slots 10-29
        assert out.silent_sensors == 1
        assert step.process([], now_s=T0 + 120).silent_sensors == 1  # still silent: counted, not said again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1 sensors of 1 entities sent no value" in warnings[0]
    assert warnings[0].endswith("so its entity looks more normal than it may be: p1: flow")
    back = [reading_record("p1", slot, slot, 0) for slot in range(30, 33)]
    with caplog.at_level("INFO", logger="anomaly.scoring_step"):
        assert step.process(back, now_s=T0 + 180).silent_sensors == 0
    assert "1 sensors that had gone silent report again" in caplog.records[-1].getMessage()


def test_each_dead_letter_reason_comes_with_its_records_key_for_the_log() -> None:
    step = step_for(FakeModel())
    records = [reading_record("p1", 0, 0, values={"temp": 1.0, "pressure": 1.0, "flow": 1.0, "rpm": 2.0}),
               InputRecord(TOPIC, 0, 1, None, b"not json", None),
               reading_record("p2", 0, 2),
               InputRecord(TOPIC, 0, 3, b"\xff\xfe", b"{}", None)]
    out = step.process(records, now_s=T0 + 1000)
    assert len(out.dead_letter_reasons) == 3 and out.dead_letter_keys == ["p1", None, "\ufffd\ufffd"]
    assert "unknown ['rpm']" in out.dead_letter_reasons[0]
