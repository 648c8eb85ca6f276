"""worker.entities: the entities a worker serves, and what the scoring step and the retrain's history do
with another asset type's readings on the same topic (skipped: not scored, not dead-lettered)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.alerts import AlertPolicy
from anomaly.codec import Reading, decode_dead_letter, encode_reading
from anomaly.entity_filter import EntityFilter, only_served
from anomaly.retrain import History
from anomaly.scoring_step import InputRecord, ScoringStep
from anomaly.window_state import WindowPolicy
from tests.unit.test_scoring_step import CENTRE, SENSORS, T0, TOPIC, FakeModel


def test_patterns_match_entity_ids_as_globs_case_sensitively():
    served = EntityFilter(["pump-*", "station-?/[ab]"])
    assert served("pump-7") and served("pump-") and served("station-1/a")
    assert not served("Pump-7") and not served("turbine-1") and not served("station-12/a")
    assert not served("xpump-7")  # the whole id, not a part of it
    with pytest.raises(ValueError):
        EntityFilter([])


def record(entity, slot, offset, sensors=SENSORS, raw=None, key=None):
    values = dict(zip(sensors, CENTRE)) if sensors == SENSORS else {s: 1.0 for s in sensors}
    raw = raw if raw is not None else encode_reading(Reading(entity, T0 + slot, values))
    return InputRecord(TOPIC, 0, offset, entity.encode() if key is None else key, raw, None)


def test_a_worker_of_one_asset_type_skips_the_other_s_readings_on_a_shared_topic():
    """Pumps and turbines in one input topic (one partition): the pumps' worker scores the pumps' windows,
    dead-letters the pumps' bad records only, skips the turbines' readings and bad records alike, and its
    commit passes them all."""
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(),
                       entities=["pump-*"])
    records, offset = [], 0
    for slot in range(10):
        for entity, sensors in (("pump-1", SENSORS), ("turbine-1", ("rpm", "vibration"))):
            records.append(record(entity, slot, offset, sensors))
            offset += 1
    records.append(record("turbine-2", 10, offset, raw=b"not json"))  # the turbines' own dead letter
    records.append(record("pump-1", 10, offset + 1, raw=b"not json either"))
    records.append(InputRecord(TOPIC, 0, offset + 2, None, b"no key, no entity", None))
    out = step.process(records, now_s=T0 + 20)
    assert out.counts["windows_scored"] == 7  # pump-1's slots 3..9: no turbine window
    assert out.counts["skipped"] == 11 and out.counts["consumed"] == 23
    letters = [decode_dead_letter(raw) for _, raw in out.dead_letters]
    assert [d["source_offset"] for d in letters] == [offset + 1, offset + 2]
    # the turbines' readings count as stream time but pin nothing: the commit holds back pump-1's window only
    assert out.commits == {(TOPIC, 0): 14}


def test_without_patterns_every_entity_is_served_as_before():
    step = ScoringStep(FakeModel(window_size=4), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy())
    out = step.process([record("turbine-1", 0, 0, ("rpm",))], now_s=T0)
    assert out.counts["dead_letters"] == 1 and out.counts.get("skipped", 0) == 0


def test_only_served_keeps_a_keyless_or_undecodable_keyed_bad_record():
    from anomaly.codec import decode_batch

    raws = [b"bad", b"bad", b"bad"]
    decoded = decode_batch(raws, list(SENSORS))
    out, skipped = only_served(decoded, [None, b"\xff\xfe", b"turbine-1"].__getitem__, EntityFilter(["pump-*"]))
    assert [i for i, _ in out.bad] == [0, 1] and skipped == [2]


def test_the_retrain_reads_only_the_served_entities_from_a_shared_topic():
    h = History(max_readings=100, lookback_s=1e9, served=EntityFilter(["pump-*"]))
    h.add(Reading("pump-1", 1.0, {"a": 1.0}))
    h.add(Reading("turbine-1", 1.0, {"a": 1.0}))
    assert list(h.frames(["a"])) == ["pump-1"] and h.ignored == 1
