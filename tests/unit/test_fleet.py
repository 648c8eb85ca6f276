"""``preparation.prepare_fleet``: one model's training rows from several entities' tables (pure)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.preparation import prepare_fleet
from anomaly.windowing import windows_touching
from tests.fixtures import SENSORS, normal_frame


def _fleet() -> dict[str, pd.DataFrame]:
    a = normal_frame(100, seed=1)
    b = normal_frame(60, seed=2, start="2026-03-01T00:00:00Z")
    b["flow"] = 5.0  # constant in b: not fit to train on there
    return {"a": a, "b": b}


def test_entities_lie_heads_first_then_tails_with_a_stand_in_between_every_two_parts() -> None:
    frames = _fleet()
    prepared = prepare_fleet(frames, window_size=5, validation_fraction=0.2)
    assert prepared.entities == ["a", "b"] and prepared.sensors == ["temp", "pressure"]
    assert prepared.dropped == ["flow"] and [(i.sensor, i.kind) for i in prepared.issues] == [("flow", "constant")]
    assert prepared.issues[0].detail.startswith("b: ")
    # a: 100 rows -> 80 + 20; b: 60 rows -> 48 + 12; 3 stand-ins
    assert len(prepared.values) == 80 + 48 + 20 + 12 + 3
    stand_ins = np.flatnonzero(prepared.gaps)
    assert stand_ins.tolist() == [80, 80 + 1 + 48, 80 + 1 + 48 + 1 + 20]
    a, b = (frames[e][["temp", "pressure"]].to_numpy() for e in "ab")
    expected = np.vstack([a[:80], a[79:80], b[:48], b[47:48], a[80:], a[99:], b[48:]])
    np.testing.assert_array_equal(prepared.values, expected)
    assert prepared.missing[stand_ins].all() and not np.delete(prepared.missing, stand_ins, axis=0).any()
    # No window that may train or validate spans two parts.
    usable = np.flatnonzero(~windows_touching(prepared.gaps, 5))
    for start in usable:
        assert not prepared.gaps[start:start + 5].any()
    assert prepared.entity_tails == {"a": [(130, 150)], "b": [(151, 163)]}
    np.testing.assert_array_equal(prepared.values[130:150], a[80:])
    np.testing.assert_array_equal(prepared.values[151:163], b[48:])
    assert prepared.timestamps[-1] == frames["b"].index[-1] and prepared.period_s == 1.0
    assert prepared.report()["entities"] == ["a", "b"]


def test_a_common_period_and_short_entities_left_out() -> None:
    slow = normal_frame(80, seed=3).iloc[::2]  # every 2 s
    frames = {"fast": normal_frame(90, seed=4), "slow": slow, "tiny": normal_frame(9, seed=5)}
    prepared = prepare_fleet(frames, window_size=5, validation_fraction=0.25, period_s=2.0)
    assert prepared.entities == ["fast", "slow"] and prepared.period_s == 2.0
    assert prepared.sensors == list(SENSORS)
    # fast regridded on 2 s (46 slots: 0 .. 90 s), slow 40 rows; 3 stand-ins
    assert len(prepared.values) == 46 + 40 + 3
    assert np.flatnonzero(prepared.gaps).tolist() == [34, 34 + 1 + 30, 34 + 1 + 30 + 1 + 12]
    with pytest.raises(DataError, match="no entity has 10 rows"):
        prepare_fleet({"tiny": normal_frame(9)}, window_size=5, validation_fraction=0.2)
    with pytest.raises(DataError, match="no entity to train on"):
        prepare_fleet({}, window_size=5, validation_fraction=0.2)


def test_a_sensor_unfit_everywhere_between_entities_is_refused_by_name() -> None:
    a, b = normal_frame(50, seed=1)[["temp", "pressure"]], normal_frame(50, seed=2)[["temp", "pressure"]]
    a["temp"], b["pressure"] = 1.0, 2.0
    with pytest.raises(DataError, match="no sensor is fit to train on in every entity: a: .*pressure.*; b: .*temp"):
        prepare_fleet({"a": a, "b": b}, window_size=5, validation_fraction=0.2)
