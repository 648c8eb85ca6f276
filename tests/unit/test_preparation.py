"""Training data preparation: ground truth keeps anomalous rows out of training (pure, no I/O)."""

import numpy as np
import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.preparation import leave_out_labelled, prepare_fleet, prepare_training
from anomaly.tables import truth_column
from tests.fixtures import normal_frame, with_fault


def test_labelled_rows_and_their_margin_become_gaps_the_scaler_and_windows_skip():
    faulty, labels = with_fault(normal_frame(400), sensor="pressure", start=100, length=50, size=100.0)
    plain = prepare_training(faulty)
    assert plain.gaps is None and plain.labelled_out == 0
    prepared = prepare_training(faulty, labels=labels, margin_rows=5)
    expected = np.zeros(400, bool)
    expected[95:155] = True
    np.testing.assert_array_equal(prepared.gaps, expected)
    assert prepared.labelled_out == 60 and prepared.report()["labelled_rows_left_out"] == 60
    # what training sees: no window touching the fault, and the fault's values out of the scaler's rows
    window = 10
    clean = ~prepared.gap_windows(window)
    assert clean.sum() == 400 - window + 1 - (60 + window - 1)
    assert prepared.values[~prepared.gaps][:, prepared.sensors.index("pressure")].max() < 50


def test_an_existing_gap_is_kept_beside_the_labelled_rows():
    frame = normal_frame(300)
    frame = frame.drop(frame.index[200:230])  # a 30-row hole the fill policy must not bridge
    labels = np.zeros(len(frame), bool)
    labels[10:12] = True
    prepared = prepare_training(frame, max_fill_steps=5, labels=labels, margin_rows=0)
    assert prepared.gaps[10:12].all() and prepared.gaps[200:230].all() and not prepared.gaps[12:200].any()
    assert prepared.labelled_out == 2


def test_a_label_between_grid_slots_lands_on_the_nearest_one():
    frame = normal_frame(100)
    frame.index = frame.index + pd.Timedelta(milliseconds=300)  # readings 0.3 s after the slot
    labels = np.zeros(100, bool)
    labels[40] = True
    prepared = prepare_training(frame, period_s=1.0, labels=labels)
    assert np.flatnonzero(prepared.gaps).tolist() == [40]


@pytest.mark.parametrize("period_ms", [100, 200, 500])
def test_a_label_half_way_between_slots_lands_where_its_reading_does(period_ms):
    """A reading exactly half-way goes to the later slot, its value and its label alike: the labels were
    placed in float seconds (2.1 s / 0.2 s = 10.4999...) and went to the earlier slot, so the anomalous
    reading was trained on and a normal one left out."""
    from anomaly.grid import to_grid
    from anomaly.preparation import labels_on_grid, prepare_scoring

    step = pd.Timedelta(milliseconds=period_ms)
    index = pd.DatetimeIndex([pd.Timestamp("2024-01-01", tz="UTC") + k * step for k in range(40)]
                             + [pd.Timestamp("2024-01-01", tz="UTC") + 40 * step + k * step + step / 2
                                for k in range(40)]).rename("ts")
    frame = pd.DataFrame({"a": np.arange(80.0), "b": np.sin(np.arange(80.0))}, index=index)
    grid = to_grid(frame, period=step)
    prepared = prepare_scoring(frame, ["a", "b"], period_s=period_ms / 1000)
    for k in range(40, 80):
        labels = np.zeros(80, dtype=bool)
        labels[k] = True
        observed = ~grid.missing["a"].to_numpy()
        slot = int(np.flatnonzero(observed & (grid.frame["a"].to_numpy() == float(k)))[0])  # where its value went
        assert np.flatnonzero(labels_on_grid(index, labels, prepared)).tolist() == [slot], k


def test_no_labelled_row_changes_nothing_and_all_labelled_is_refused():
    frame = normal_frame(100)
    assert prepare_training(frame, labels=np.zeros(100, bool), margin_rows=8).gaps is None
    with pytest.raises(DataError, match="no normal data to train on"):
        prepare_training(frame, labels=np.ones(100, bool))
    prepared = prepare_training(frame)
    assert leave_out_labelled(prepared, frame.index, np.zeros(100, bool), 3) is prepared


def test_a_fleets_labels_are_each_entitys_own():
    a = normal_frame(300)
    b = normal_frame(300, seed=3)
    truth_b = np.zeros(300, bool)
    truth_b[50:60] = True
    prepared = prepare_fleet({"a": a, "b": b}, window_size=10, validation_fraction=0.2,
                             labels={"b": truth_b}, margin_rows=2)
    assert prepared.labelled_out == 14
    # parts laid out as a's head, b's head, a's tail, b's tail with one stand-in row between parts:
    # b's head starts at row 240 + 1 (a's head is its first 240 rows)
    start_b = 241
    assert prepared.gaps[start_b + 48:start_b + 62].all() and not prepared.gaps[start_b + 62:start_b + 240].any()
    assert not prepared.gaps[:240].any()


@pytest.mark.parametrize("columns, field, expected", [
    (["Anomaly", "label"], "anomaly", "Anomaly"),
    (["label", "fault"], "fault", "fault"),
    (["label", "changepoint"], "anomaly", "label"),
    (["changepoint"], "anomaly", None),
    (["a", "b"], "fault", None),
])
def test_the_truth_column_is_the_label_field_else_anomaly_else_label(columns, field, expected):
    assert truth_column(columns, field) == expected


def _late_sensor(rows=300, late=100):
    """normal_frame with its 'flow' sensor silent (NaN) for the first ``late`` rows."""
    frame = normal_frame(rows)
    frame.iloc[:late, frame.columns.get_loc("flow")] = np.nan
    return frame


@pytest.mark.parametrize("fill", ["ffill", "linear"])
def test_rows_before_a_sensor_starts_reporting_do_not_train(fill, caplog):
    prepared = prepare_training(_late_sensor(), fill=fill)
    assert prepared.gaps is not None and prepared.gaps[:100].all() and not prepared.gaps[100:].any()
    assert "{'flow': 100}" in caplog.text
    # a fleet's entities alike: no back-filled stand-in trains the shared model
    fleet = prepare_fleet({"a": _late_sensor(), "b": normal_frame(300)}, window_size=10, validation_fraction=0.2,
                          fill=fill)
    assert fleet.gaps is not None and int(fleet.gaps.sum()) >= 100


def test_scoring_fills_a_sensor_before_its_first_reading_with_the_models_value():
    from anomaly.preparation import prepare_scoring

    frame = _late_sensor()
    sensors = list(frame.columns)
    typical = [0.0] * len(sensors)
    typical[sensors.index("flow")] = -123.0
    prepared = prepare_scoring(frame, sensors, fill_values=typical)
    flow = prepared.values[:, sensors.index("flow")]
    assert (flow[:100] == -123.0).all() and np.allclose(flow[100:], frame["flow"].to_numpy()[100:])
    assert prepared.gaps is None  # scored, as the worker scores them
    assert (prepare_scoring(frame, sensors).values[:100, sensors.index("flow")] == frame["flow"].iloc[100]).all()


def test_scoring_fills_a_silent_sensor_as_the_worker_and_leaves_only_outages_unscored(caplog):
    from anomaly.preparation import prepare_scoring

    frame = normal_frame(200)
    sensors = list(frame.columns)
    typical = [0.0] * len(sensors)
    flow = sensors.index("flow")
    typical[flow] = -123.0
    frame.iloc[60:80, flow] = np.nan  # flow silent for 20 slots while the others report
    frame = frame.drop(frame.index[120:140])  # 20 slots without any reading: an outage
    frame = frame.drop(frame.index[150:153])  # 3 slots without any reading: bridged
    prepared = prepare_scoring(frame, sensors, max_fill_steps=5, fill_values=typical)
    values = prepared.values[:, flow]
    assert (values[60:65] == frame["flow"].iloc[59]).all()  # its last value for max_fill_steps slots
    assert (values[65:80] == -123.0).all()  # then its typical one, as the worker fills it
    assert "typical value standing in" in caplog.text and "'flow': 15" in caplog.text  # and said (it was silent)
    expected = np.zeros(len(prepared.values), dtype=bool)
    expected[120:140] = True  # only the outage longer than max_fill_steps is a gap
    np.testing.assert_array_equal(prepared.gaps, expected)
    # training data (no model's values): a sensor's long silence stays a gap, never made up
    assert prepare_scoring(frame, sensors, max_fill_steps=5).gaps[60:80].all()


def test_an_entity_with_no_sensor_fit_to_train_on_is_left_out_of_the_fleet(caplog):
    offline = normal_frame(300, seed=5) * 0.0 + 1.0  # every sensor constant: a pump switched off all along
    fleet = prepare_fleet({"a": normal_frame(300, seed=1), "off": offline, "b": normal_frame(300, seed=2)},
                          window_size=10, validation_fraction=0.2)
    assert fleet.entities == ["a", "b"] and "entity off: no usable sensor" in caplog.text
    with pytest.raises(DataError, match="fit to train on; entity off: no usable sensor"):
        prepare_fleet({"off": offline}, window_size=10, validation_fraction=0.2)


def _repeated(rows: int = 40) -> pd.DataFrame:
    ts = pd.date_range("2024-01-01", periods=rows, freq="s", tz="UTC")
    frame = pd.DataFrame({"a": np.sin(np.arange(rows) / 3.0), "b": np.cos(np.arange(rows) / 5.0)}, index=ts)
    copy = frame.iloc[[3]].copy()
    copy["a"] = 99.0  # a second reading stamped as row 3
    return pd.concat([frame.iloc[:4], copy, frame.iloc[4:]])


def test_a_repeated_timestamp_trains_on_the_first_reading_as_the_worker_keeps_it(caplog):
    """Training kept the last of two readings stamped alike (the grid's "last wins"), while score, retrain
    and the worker keep the first; and it said nothing, though many repeats mean several assets in one series."""
    frame = _repeated()
    prepared = prepare_training(frame)
    assert prepared.values[3, 0] == pytest.approx(frame["a"].iloc[3])
    assert "1 reading repeats an earlier one's timestamp" in caplog.text
    fleet = prepare_fleet({"p1": frame, "p2": _repeated()}, window_size=5, validation_fraction=0.2)
    assert 99.0 not in fleet.values


def test_many_repeated_timestamps_point_at_an_entity_column(caplog):
    ts = pd.date_range("2024-01-01", periods=30, freq="s", tz="UTC")
    two_assets = pd.DataFrame({"a": np.r_[np.arange(30.0), np.arange(30.0) * 2]}, index=ts.append(ts))
    prepare_training(two_assets)
    assert "data.entity_column" in caplog.text


def test_an_outage_longer_than_outage_steps_does_not_train_as_a_flat_line():
    """Filled by the policy, a stoppage of every sensor trained as hours of flat line; the worker restarts
    its window after one, so those windows never exist in the stream."""
    ts = pd.DatetimeIndex(pd.to_datetime(list(range(0, 300)) + list(range(1300, 1600)), unit="s", utc=True))
    frame = pd.DataFrame({"a": np.sin(np.arange(600) / 3.0), "b": np.cos(np.arange(600) / 4.0)}, index=ts)
    filled = prepare_training(frame)  # no limit: the outage is filled
    assert filled.gaps is None and len(filled.values) == 1600
    prepared = prepare_training(frame, outage_steps=5)
    assert prepared.gaps is not None and prepared.gaps[300:1300].all() and not prepared.gaps[:300].any()
    assert not prepared.gaps[1300:].any()
    fleet = prepare_fleet({"p1": frame, "p2": frame}, window_size=10, validation_fraction=0.2, outage_steps=5)
    assert fleet.gaps is not None and fleet.gaps.sum() >= 2 * 1000


def test_a_fleets_period_is_one_of_its_entities_and_the_others_are_named(caplog):
    """Two pumps at 1 s and 10 s shared a 5.5 s grid, which neither is sampled on, and nothing was said."""
    fast = pd.DataFrame({"a": np.sin(np.arange(600) / 7.0), "b": np.cos(np.arange(600) / 9.0)},
                        index=pd.date_range("2024-01-01", periods=600, freq="1s", tz="UTC"))
    slow = pd.DataFrame({"a": np.sin(np.arange(600) / 7.0), "b": np.cos(np.arange(600) / 9.0)},
                        index=pd.date_range("2024-01-01", periods=600, freq="10s", tz="UTC"))
    fleet = prepare_fleet({"fast": fast, "slow": slow}, window_size=10, validation_fraction=0.2)
    assert fleet.period_s == 1.0
    assert "slow" in caplog.text and "sampled every 10 s" in caplog.text


def test_a_fleet_entity_too_short_on_the_shared_grid_is_left_out(caplog):
    """50 readings at 1 s are 6 rows on a 10 s shared grid: counted on its own period (50 >= 2 windows of
    10) it was kept, and the fleet's rows came out negative ("negative dimensions are not allowed")."""
    def pump(period: str, n: int) -> pd.DataFrame:
        return pd.DataFrame({"a": np.sin(np.arange(n) / 7.0), "b": np.cos(np.arange(n) / 9.0)},
                            index=pd.date_range("2024-01-01", periods=n, freq=period, tz="UTC"))

    fleet = prepare_fleet({"A": pump("1s", 50), "B": pump("10s", 300), "C": pump("10s", 300)},
                          window_size=10, validation_fraction=0.2)
    assert fleet.period_s == 10.0 and sorted(fleet.entity_tails) == ["B", "C"]
    assert "entity A: 6 rows on the shared grid of 10 s, fewer than 2 windows of 10; left out" in caplog.text


def test_sensors_on_rows_of_their_own_at_one_timestamp_are_merged_not_dropped(caplog):
    """A reading written a sensor per row, the rows stamped alike: keeping the first row kept sensor a
    alone and dropped b and c as "no observed value", with a hint at data.entity_column."""
    ts = pd.date_range("2024-01-01", periods=200, freq="s", tz="UTC")
    rows = []
    for j, name in enumerate("abc"):
        rows.append(pd.DataFrame({s: (np.sin(np.arange(200) / (3.0 + j)) if s == name else np.nan) for s in "abc"},
                                 index=ts))
    frame = pd.concat(rows).sort_index(kind="stable")
    prepared = prepare_training(frame)
    assert prepared.sensors == ["a", "b", "c"] and len(prepared.values) == 200
    assert "repeat" not in caplog.text  # nothing was left out: each sensor's value is its reading's


def test_a_fleets_warnings_name_their_entity_once(caplog):
    """Each gap warning of a fleet came twice (screening, then gridding) and named no entity."""
    frames = {}
    for name in ("p1", "p2"):
        frame = normal_frame(300, seed=len(name))
        frame.iloc[100:120] = np.nan  # an outage longer than max_fill_steps
        frames[name] = frame
    prepare_fleet(frames, window_size=10, validation_fraction=0.2, max_fill_steps=3)
    said = [r.getMessage() for r in caplog.records if "lie in gaps" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("entity p1: ") and said[1].startswith("entity p2: ")


def test_training_on_a_grid_finer_than_the_readings_says_so(caplog):
    """data.period_s = 0.1 on 1 s readings failed with "need at least 4 windows ... set a smaller
    model.window_size", with no word of the grid."""
    prepare_training(normal_frame(100), period_s=0.1, max_fill_steps=20)
    assert "readings are 1 s apart (median) where data.period_s is 0.1 s" in caplog.text
    caplog.clear()
    prepare_training(normal_frame(100), period_s=1.0)
    assert "apart (median)" not in caplog.text


def test_scoring_says_which_sensors_are_silent_from_the_start(caplog):
    from anomaly.preparation import prepare_scoring

    frame = normal_frame(100)
    frame.iloc[:40, 0] = np.nan
    prepare_scoring(frame, list(frame.columns), max_fill_steps=5, fill_values=[0.0, 0.0, 0.0])
    assert "silent from the start" in caplog.text and f"'{frame.columns[0]}': 40" in caplog.text


def test_a_fleet_entity_on_another_period_than_the_shared_grid_has_its_gaps_said(caplog):
    fast = [normal_frame(600, seed=i) for i in (1, 2)]
    slow = normal_frame(600, seed=3)
    slow.index = pd.date_range("2026-01-01", periods=600, freq="5s", tz="UTC", name="ts")
    prepare_fleet({"e1": fast[0], "e2": fast[1], "e3": slow}, window_size=10, validation_fraction=0.2,
                  max_fill_steps=2)
    assert any(r.getMessage().startswith("entity e3: ") and "lie in gaps" in r.getMessage() for r in caplog.records)


def test_a_missing_timestamp_is_an_error_even_beside_a_repeated_one():
    # without a repeat it was refused; with one, merging the repeats dropped the NaT row without a word
    index = pd.DatetimeIndex(["2026-01-01 00:00:00", "2026-01-01 00:00:01", "2026-01-01 00:00:01", None,
                              "2026-01-01 00:00:02", "2026-01-01 00:00:03"], name="ts")
    frame = pd.DataFrame({"a": [1.0, 2.0, 2.5, 3.0, 4.0, 5.0], "b": [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]}, index=index)
    with pytest.raises(DataError, match="missing timestamp"):
        prepare_training(frame)
    with pytest.raises(DataError, match="missing timestamp"):
        prepare_training(frame[~frame.index.duplicated(keep="last")])


def test_a_sensor_that_moves_only_in_labelled_faults_is_reported_and_left_out():
    # it passed the screening of every row, then trained constant (scale 1, errors in raw units)
    rng = np.random.default_rng(0)
    index = pd.date_range("2024-01-01", periods=400, freq="1s", name="ts")
    labels = np.zeros(400, dtype=bool)
    labels[300:340] = True
    valve = np.where(labels, 1.0, 0.0)
    frame = pd.DataFrame({"ok": rng.normal(size=400), "valve": valve, "other": rng.normal(size=400)}, index=index)
    prepared = prepare_training(frame, labels=labels, margin_rows=2)
    assert prepared.sensors == ["ok", "other"] and prepared.dropped == ["valve"]
    assert [(i.sensor, i.kind) for i in prepared.issues] == [("valve", "constant")]
    assert "on the rows that train" in prepared.issues[0].detail
    fleet = prepare_fleet({"p1": frame, "p2": frame.copy()}, window_size=8, validation_fraction=0.2,
                          labels={"p1": labels, "p2": labels}, margin_rows=2)
    assert fleet.sensors == ["ok", "other"] and "valve" in fleet.dropped
    with pytest.raises(DataError, match="no usable sensor on the rows that train"):
        prepare_training(frame[["valve"]].assign(v2=valve * 3), labels=labels)


def test_an_outage_of_every_kept_sensor_is_one_though_a_dropped_sensor_reports_through_it():
    # the outage test read the dropped sensors too: a constant one reporting on hid the outage, and
    # training learnt the filled-in flat line as normal
    rng = np.random.default_rng(1)
    index = pd.date_range("2024-01-01", periods=300, freq="1s", name="ts")
    a, b = rng.normal(size=300), rng.normal(size=300)
    a[100:140] = np.nan
    b[100:140] = np.nan
    frame = pd.DataFrame({"a": a, "b": b, "stuck": 5.0}, index=index)
    prepared = prepare_training(frame, max_fill_steps=100, outage_steps=10)
    assert prepared.dropped == ["stuck"] and prepared.gaps is not None
    assert prepared.gaps[100:140].all() and prepared.gaps.sum() == 40


def test_labelled_rows_already_in_a_gap_are_not_counted_as_left_out_by_the_labels():
    index = pd.date_range("2024-01-01", periods=200, freq="1s", name="ts")
    rng = np.random.default_rng(2)
    values = rng.normal(size=(200, 2))
    values[50:70] = np.nan  # a 20-slot outage, beyond max_fill_steps: a gap
    frame = pd.DataFrame(values, index=index, columns=["a", "b"])
    labels = np.zeros(200, dtype=bool)
    labels[60:80] = True  # half in the gap
    prepared = prepare_training(frame, max_fill_steps=5, labels=labels)
    assert prepared.labelled_out == 10


def test_a_sensor_with_no_reading_on_the_rows_that_train_is_left_out():
    # b reports only inside the labelled fault: on the rows that train it is its held value alone, and it
    # was kept (scale 1, error in raw units), as "nothing observed" was not one of the second screening's
    rng = np.random.default_rng(0)
    n = 400
    index = pd.date_range("2024-01-01", periods=n, freq="s", tz="UTC", name="ts")
    b = np.full(n, np.nan)
    b[100:340] = rng.normal(50, 5, size=240)
    labels = np.zeros(n, bool)
    labels[100:340] = True
    prepared = prepare_training(pd.DataFrame({"a": rng.normal(size=n), "b": b}, index=index), period_s=1.0,
                                labels=labels)
    assert prepared.sensors == ["a"] and "b" in prepared.dropped
    assert any(i.sensor == "b" and i.kind == "mostly_missing" and "rows that train" in i.detail
               for i in prepared.issues)
