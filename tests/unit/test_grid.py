import numpy as np
import pandas as pd
import pytest

from anomaly.errors import ConfigError, DataError
from anomaly.grid import SensorIssue, infer_period, sensor_quality, to_grid, usable_sensors

T0 = pd.Timestamp("2024-01-01 00:00:00", tz="UTC")
NAN = np.nan


def _frame(seconds, **columns):
    index = pd.DatetimeIndex([T0 + pd.Timedelta(seconds=s) for s in seconds], name="ts")
    return pd.DataFrame({k: np.asarray(v, dtype=float) for k, v in columns.items()}, index=index)


def _grid_index(n, step_s=1.0):
    return pd.DatetimeIndex([T0 + pd.Timedelta(seconds=step_s * i) for i in range(n)], name="ts")


# --- infer_period --------------------------------------------------------------------------------

def test_infer_period_is_median_positive_gap():
    index = _frame([0, 1, 1, 2, 3, 10], x=range(6)).index  # gaps 1, 0, 1, 1, 7 -> positive median 1
    assert infer_period(index) == pd.Timedelta(seconds=1)
    assert infer_period(index[::-1]) == pd.Timedelta(seconds=1)  # order does not matter


def test_infer_period_of_an_even_count_is_a_gap_the_data_has():
    """100 rows 1 s apart, then 101 rows 2 s apart: np.median averaged the middle two gaps to 1.5 s, a
    spacing found nowhere, on which 33 readings collided with others and were dropped, without a word."""
    stamps = list(range(100)) + list(range(100, 302, 2))
    frame = _frame(stamps, x=np.arange(len(stamps), dtype=float))
    assert infer_period(frame.index) == pd.Timedelta(seconds=1)
    grid = to_grid(frame)
    assert int((~grid.missing["x"]).sum()) == len(stamps)  # every reading has a slot of its own


def test_each_sensor_on_its_own_row_is_gridded_at_the_sensors_period():
    """A historian's export: one row per sensor reading, the sensors of one second a few ms apart. The
    median gap was those 3 ms: a grid of 3 ms slots where every sensor was "99.7 % missing"."""
    seconds = np.arange(300.0)
    stamps = np.concatenate([seconds, seconds + 0.003, seconds + 0.006])
    cells = np.full((900, 3), NAN)
    for j in range(3):
        cells[j * 300:(j + 1) * 300, j] = np.sin(seconds / (5.0 + j))
    order = np.argsort(stamps, kind="stable")
    frame = _frame(stamps[order], a=cells[order, 0], b=cells[order, 1], c=cells[order, 2])
    assert infer_period(frame.index, frame) == pd.Timedelta(seconds=1)
    grid = to_grid(frame)
    assert grid.period == pd.Timedelta(seconds=1) and len(grid.frame) == 300
    assert not grid.missing.to_numpy().any()


def test_infer_period_needs_two_rows_and_two_times():
    with pytest.raises(DataError):
        infer_period(_frame([0], x=[1]).index)
    with pytest.raises(DataError):
        infer_period(_frame([5, 5], x=[1, 2]).index)


# --- to_grid: snapping, duplicates, order --------------------------------------------------------

def test_regular_input_is_unchanged():
    frame = _frame([0, 1, 2], a=[1, 2, 3], b=[4, 5, 6])
    g = to_grid(frame)
    assert g.period == pd.Timedelta(seconds=1)
    pd.testing.assert_frame_equal(g.frame, frame, check_freq=False)
    assert not g.missing.to_numpy().any()
    assert g.frame.index.name == "ts" and str(g.frame.index.tz) == "UTC"


def test_jitter_snaps_to_nearest_slot_and_half_way_goes_later():
    frame = _frame([0, 1.2, 1.5, 2.9], x=[10, 11, 12, 13])
    g = to_grid(frame, period=pd.Timedelta(seconds=1), fill="none")
    # slots 0:0.0  1:1.2  2:1.5 (half-way -> later)  3:2.9
    assert g.frame.index.equals(_grid_index(4))
    np.testing.assert_array_equal(g.frame["x"], [10, 11, 12, 13])


def test_duplicates_and_out_of_order_first_reading_wins():
    # as the streaming worker keeps a slot's first reading (training kept the last: not what it serves)
    # rows: t=2 (a=1), t=0 (a=5), t=2 (a=2, later row, same time), t=0.9 (a=7, lands in slot 1)
    frame = _frame([2, 0, 2, 0.9], a=[1, 5, 2, 7])
    g = to_grid(frame, period=pd.Timedelta(seconds=1), fill="none")
    np.testing.assert_array_equal(g.frame["a"], [5, 7, 1])
    # in one slot the earliest timestamp wins, whatever the row order
    frame = _frame([1.1, 0.9], a=[1, 2])
    g = to_grid(frame, period=pd.Timedelta(seconds=1))
    np.testing.assert_array_equal(g.frame["a"], [2])  # one slot; t=0.9 is earlier than t=1.1


def test_nan_does_not_overwrite_an_observed_value_in_a_slot():
    frame = _frame([0, 0, 1], a=[1, NAN, 3], b=[NAN, 2, 4])
    g = to_grid(frame, fill="none")
    np.testing.assert_array_equal(g.frame["a"], [1, 3])
    np.testing.assert_array_equal(g.frame["b"], [2, 4])
    assert not g.missing.to_numpy().any()


def test_input_is_not_modified():
    frame = _frame([0, 2], a=[1, 3])
    before = frame.copy()
    to_grid(frame, period=pd.Timedelta(seconds=1), fill="linear")
    pd.testing.assert_frame_equal(frame, before)


# --- to_grid: fill policies ----------------------------------------------------------------------

GAPPY = dict(seconds=[0, 1, 4, 5], a=[NAN, 2, 8, NAN], b=[1, NAN, 4, 5])
# on the 1 s grid (6 slots):  a = [nan, 2, -, -, 8, nan]   b = [1, nan, -, -, 4, 5]
MISSING_A = [True, False, True, True, False, True]
MISSING_B = [False, True, True, True, False, False]


@pytest.mark.parametrize("fill, a, b", [
    ("ffill", [2, 2, 2, 2, 8, 8], [1, 1, 1, 1, 4, 5]),  # leading gap of a back-filled
    ("linear", [2, 2, 4, 6, 8, 8], [1, 1.75, 2.5, 3.25, 4, 5]),  # edges held, interior linear in time
    ("zero", [0, 2, 0, 0, 8, 0], [1, 0, 0, 0, 4, 5]),
    ("none", [NAN, 2, NAN, NAN, 8, NAN], [1, NAN, NAN, NAN, 4, 5]),
])
def test_fill_policies(fill, a, b):
    seconds = GAPPY["seconds"]
    g = to_grid(_frame(seconds, a=GAPPY["a"], b=GAPPY["b"]), fill=fill)
    assert g.frame.index.equals(_grid_index(6))
    np.testing.assert_array_equal(g.frame["a"], a)
    np.testing.assert_array_equal(g.frame["b"], b)
    np.testing.assert_array_equal(g.missing["a"], MISSING_A)  # the mask does not depend on the policy
    np.testing.assert_array_equal(g.missing["b"], MISSING_B)
    assert g.missing.dtypes.eq(bool).all()


def test_max_fill_steps_leaves_long_gaps_entirely_unfilled():
    frame = _frame([0, 2, 6], x=[1, 3, 7])  # gaps: one slot (1), three slots (3, 4, 5)
    g = to_grid(frame, period=pd.Timedelta(seconds=1), fill="ffill", max_fill_steps=2)
    np.testing.assert_array_equal(g.frame["x"], [1, 1, 3, NAN, NAN, NAN, 7])
    g = to_grid(frame, period=pd.Timedelta(seconds=1), fill="linear", max_fill_steps=3)
    np.testing.assert_array_equal(g.frame["x"], [1, 2, 3, 4, 5, 6, 7])
    g = to_grid(frame, period=pd.Timedelta(seconds=1), fill="zero", max_fill_steps=0)
    np.testing.assert_array_equal(g.frame["x"], [1, NAN, 3, NAN, NAN, NAN, 7])
    np.testing.assert_array_equal(g.missing["x"], [False, True, False, True, True, True, False])


def test_unknown_fill_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        to_grid(_frame([0, 1], x=[1, 2]), fill="cubic")
    assert info.value.field == "data.fill"


def test_bad_inputs_are_data_errors():
    with pytest.raises(DataError):
        to_grid(pd.DataFrame({"x": [1.0, 2.0]}))  # no DatetimeIndex
    with pytest.raises(DataError):
        to_grid(_frame([], x=[]))
    frame = _frame([0, 1], x=[1, 2])
    frame["entity"] = ["a", "b"]
    with pytest.raises(DataError, match="'entity'"):
        to_grid(frame)
    with pytest.raises(ConfigError):
        to_grid(_frame([0, 1], x=[1, 2]), period=pd.Timedelta(0))


def test_stray_timestamp_does_not_allocate_a_huge_grid():
    frame = _frame([0, 1, 10 ** 9], x=[1, 2, 3])  # ~32 years at 1 s
    with pytest.raises(DataError, match="slots"):
        to_grid(frame, period=pd.Timedelta(seconds=1))


# --- sensor_quality ------------------------------------------------------------------------------

def test_sensor_quality_kinds_and_usable_sensors():
    n = 10
    frame = _frame(range(n),
                   good=np.arange(n),
                   const=[3.0] * n,
                   flat=1000.0 + np.r_[0, 1e-7].repeat(5),
                   holey=[1, 2, 3, 4] + [NAN] * 6,
                   zero_mean=np.r_[-1e-12, 1e-12].repeat(5))  # tiny but not flat: relative to its own scale
    issues = sensor_quality(frame)
    assert [(i.sensor, i.kind) for i in issues] == [("const", "constant"), ("flat", "flat"),
                                                     ("holey", "mostly_missing")]
    assert all(isinstance(i, SensorIssue) and i.detail for i in issues)
    assert usable_sensors(frame, issues) == ["good", "zero_mean"]


def test_sensor_quality_judges_observed_values_only():
    grid = to_grid(_frame(range(10), x=[1, NAN, NAN, 1, NAN, NAN, NAN, NAN, NAN, 2], y=[4] * 10),
                   period=pd.Timedelta(seconds=1))
    issues = sensor_quality(grid.frame, grid.missing)  # x: 7 of 10 slots filled
    kinds = {(i.sensor, i.kind) for i in issues}
    assert kinds == {("x", "mostly_missing"), ("y", "constant")}
    # without the mask, the filled frame looks complete
    assert {(i.sensor, i.kind) for i in sensor_quality(grid.frame)} == {("y", "constant")}
    assert sensor_quality(grid.frame, grid.missing, max_missing_fraction=0.8) == [
        SensorIssue("y", "constant", issues[-1].detail)]


def test_an_outage_of_every_sensor_makes_no_sensor_mostly_missing():
    """Two hours of readings a day apart: every sensor was "92 % missing" and training refused the table
    (in a fleet, the asset was left out), blaming the sensors for the plant's stoppage."""
    ts = list(range(0, 600)) + list(range(3000, 3600))
    grid = to_grid(_frame(ts, x=np.sin(np.arange(1200.0)), y=np.cos(np.arange(1200.0))), period=pd.Timedelta(seconds=1))
    assert sensor_quality(grid.frame, grid.missing) == []
    holey = to_grid(_frame(ts, x=np.sin(np.arange(1200.0)), y=np.where(np.arange(1200) % 3, NAN, 1.0 * np.arange(1200))),
                    period=pd.Timedelta(seconds=1))
    assert [(i.sensor, i.kind) for i in sensor_quality(holey.frame, holey.missing)] == [("y", "mostly_missing")]


def test_sensor_with_no_observation_is_mostly_missing():
    frame = _frame([0, 1], x=[NAN, NAN], y=[1, 2])
    issues = sensor_quality(frame, max_missing_fraction=1.0)
    assert [(i.sensor, i.kind) for i in issues] == [("x", "mostly_missing")]


# --- prepared data: gaps the fill policy does not bridge -------------------------------------------

def test_a_gap_longer_than_max_fill_steps_is_marked_and_no_window_touching_it_trains():
    """prepare_training used to forward-fill every gap after the grid (a 10-slot outage became a flat
    line the model trained on), so max_fill_steps and fill = "none" did nothing there."""
    from anomaly.detector import fit_detector
    from anomaly.preparation import prepare_scoring, prepare_training
    from anomaly.training import TrainConfig

    rng = np.random.default_rng(0)
    seconds = [s for s in range(200) if not 100 <= s < 110]  # a 10-slot outage
    frame = _frame(seconds, a=rng.normal(size=190), b=rng.normal(size=190))
    prepared = prepare_training(frame, period_s=1.0, max_fill_steps=2)
    assert np.isfinite(prepared.values).all()  # arrays stay gap-free (stand-ins) ...
    np.testing.assert_array_equal(np.flatnonzero(prepared.gaps), np.arange(100, 110))  # ... the gap is marked
    gap_windows = prepared.gap_windows(8)
    assert gap_windows.sum() == 10 + 8 - 1 and gap_windows[93] and not gap_windows[92] and not gap_windows[110]
    short = prepare_training(frame, period_s=1.0, max_fill_steps=20)  # bridged: no gap
    assert short.gaps is None and not short.gap_windows(8).any()
    assert prepare_scoring(frame, ["a", "b"], period_s=1.0, fill="none").gaps.sum() == 10

    seen = []
    import anomaly.detector as detector_module
    real = detector_module.train_autoencoder

    def spy(windows, *args, **kwargs):
        kept = kwargs.get("kept")
        seen.append(windows.copy() if kept is None else windows[kept])  # the windows that may train
        return real(windows, *args, **kwargs)

    detector_module.train_autoencoder = spy
    try:
        stand_in = prepared.values.copy()
        stand_in[prepared.gaps] = 1e6  # whatever stands in for the gap must not matter
        config = TrainConfig(epochs=1, batch_size=32, device="cpu", progress=False, cpu_threads=1)
        det, _, _ = fit_detector(stand_in, prepared.sensors, {"window_size": 8, "hidden_size": 4, "latent_size": 2},
                                 config, threshold_method="quantile", threshold_params={"q": 0.9}, gaps=prepared.gaps)
    finally:
        detector_module.train_autoencoder = real
    assert len(seen[0]) == (200 - 8 + 1) - (10 + 8 - 1)  # every window but those touching the gap
    assert np.abs(seen[0]).max() < 10  # no stand-in reached the network, and the scaler ignored them
    assert max(abs(c) for c in det.scaler.centre) < 1


def test_benchmark_protocols_never_fill_a_training_row_from_a_test_row():
    from anomaly.preparation import fill_rows_split

    values = np.array([[NAN, 1.0], [NAN, 2.0], [NAN, NAN], [555.0, 4.0], [NAN, 5.0]])
    out = fill_rows_split(values, train_rows=3)
    np.testing.assert_array_equal(out[:3], [[0.0, 1.0], [0.0, 2.0], [0.0, 2.0]])  # no 555 back-filled into training
    np.testing.assert_array_equal(out[3:], [[555.0, 4.0], [555.0, 5.0]])
    moved = values.copy()
    moved[3, 0] = -1e6  # a test value changes nothing before it
    np.testing.assert_array_equal(fill_rows_split(moved, 3)[:3], out[:3])
    full = np.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(fill_rows_split(full, 3), full)
    np.testing.assert_array_equal(fill_rows_split(values, 0)[3:], [[555.0, 4.0], [555.0, 5.0]])


def test_a_grid_too_large_in_cells_or_out_of_range_is_a_data_error(tmp_path):
    from anomaly import tables

    wide = _frame([0, 5_000_000], **{f"s{i}": [1.0, 2.0] for i in range(50)})  # 5M slots x 50 sensors
    with pytest.raises(DataError, match="5000001 slots of .* x 50 sensors"):
        to_grid(wide, period=pd.Timedelta(seconds=1))
    late = pd.DataFrame({"x": [1.0, 2.0]}, index=pd.DatetimeIndex(
        [pd.Timestamp("2026-01-01", tz="UTC"), pd.Timestamp("9999-12-31", tz="UTC")], name="ts").as_unit("us"))
    with pytest.raises(DataError, match="out of range"):
        to_grid(late, period=pd.Timedelta(seconds=1))
    path = tmp_path / "us.csv"
    path.write_text("ts,x\n1767225600000000,1\n1767225601000000,2\n")  # epoch microseconds
    with pytest.raises(DataError, match="neither seconds nor milliseconds"):
        tables.read_table(path)


def test_bool_and_non_string_columns_are_sensors_and_text_columns_are_reported(caplog):
    from anomaly.preparation import prepare_training

    rng = np.random.default_rng(0)
    index = _grid_index(300)
    frame = pd.DataFrame({0: rng.normal(size=300), "valve": rng.random(300) > 0.5, "site": ["a"] * 300}, index=index)
    with caplog.at_level("WARNING", logger="anomaly.preparation"):
        prepared = prepare_training(frame, period_s=1.0)
    assert prepared.sensors == ["0", "valve"]  # an int column name used to raise KeyError; bools were dropped silently
    assert set(np.unique(prepared.values[:, 1])) <= {0.0, 1.0}
    assert any("not numbers: ['site']" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("period, jitter", [(1.0, 0.005), (0.1, 0.002), (1.0005, 0.005), (60.0, 0.5)])
def test_infer_period_of_jittered_stamps_is_the_logger_s_period_not_one_gap_s(period, jitter):
    """Stamped in µs with jitter, the median of one gap was off by about the jitter over the square root of
    the count (1.000039 s for 1 s ± 5 ms): 20,000 readings drifted 0.8 s over the grid and 73 collided."""
    rng = np.random.default_rng(3)
    n = 20_000
    ts = 1_700_000_000.0 + np.arange(n) * period + rng.normal(0, jitter, n)
    index = pd.DatetimeIndex(pd.to_datetime(np.round(np.sort(ts) * 1e6), unit="us", utc=True))
    inferred = infer_period(index).total_seconds()
    assert abs(inferred - period) * n < 0.1 * period, inferred  # drift over the span under a tenth of a period
    grid = to_grid(pd.DataFrame({"a": np.ones(n)}, index=index), fill="ffill")
    assert len(grid.frame) == n and not grid.missing["a"].any()  # no reading collides, no slot missing


def test_infer_period_keeps_the_median_on_a_clean_clock_with_some_odd_gaps():
    # NAB's series: 5-minute stamps with a few shorter or longer gaps; the mean of the near gaps is not it
    minutes = np.cumsum(np.r_[0, np.full(999, 300), 240, 360, np.full(998, 300)])
    index = pd.DatetimeIndex(pd.to_datetime(1_400_000_000 + minutes, unit="s", utc=True))
    assert infer_period(index) == pd.Timedelta(seconds=300)
