import json

import numpy as np
import pytest

from anomaly.errors import ConfigError
from anomaly.scaling import Scaler, fit_scaler


@pytest.mark.parametrize("method", ["standard", "robust", "minmax"])
def test_round_trip_and_inverse(method):
    rng = np.random.default_rng(0)
    x = rng.normal(5, 2, size=(200, 3))
    s = fit_scaler(x, ["a", "b", "c"], method)
    again = Scaler.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    np.testing.assert_allclose(s.inverse(s.transform(x)), x, rtol=1e-5, atol=1e-5)


def test_standard_scaler_values():
    x = np.array([[1.0, 10.0], [3.0, 10.0]])
    s = fit_scaler(x, ["a", "const"])
    assert s.centre == (2.0, 10.0)
    assert s.scale == (1.0, 1.0)  # std of [1,3] is 1; a constant sensor gets scale 1, not 0
    np.testing.assert_allclose(s.transform(x), [[-1, 0], [1, 0]])


def test_minmax_and_nan_ignored():
    x = np.array([[0.0], [np.nan], [4.0]])
    s = fit_scaler(x, ["a"], "minmax")
    assert s.centre == (0.0,) and s.scale == (4.0,)


def test_transform_does_not_mutate_input():
    x = np.ones((3, 1)) * 7
    fit_scaler(x, ["a"]).transform(x)
    assert (x == 7).all()


def test_unknown_method_names_field():
    with pytest.raises(ConfigError) as err:
        fit_scaler(np.zeros((2, 1)), ["a"], "zscore")
    assert err.value.field == "data.scaler"


def test_a_constant_sensor_at_a_large_level_gets_scale_one_whatever_the_rounding():
    # np.nanstd of a constant 123456.789 beside another column is ~1e-8, not 0: it slipped past an absolute
    # floor, and a 0.01 step then scored ~5e11.
    rng = np.random.default_rng(0)
    for level in (123456.789, 1e8 + 0.1, -98765.4321):
        values = np.column_stack([rng.normal(size=10007), np.full(10007, level)])
        for method in ("standard", "robust", "minmax"):
            scaler = fit_scaler(values, ["noisy", "constant"], method)
            assert scaler.scale[1] == 1.0, (level, method, scaler.scale)
            assert scaler.scale[0] != 1.0
    # A sensor that varies a little at a large level keeps its own scale.
    varying = np.column_stack([rng.normal(size=400), 1e5 + rng.normal(scale=0.5, size=400)])
    assert 0.3 < fit_scaler(varying, ["a", "b"], "standard").scale[1] < 0.7


def test_scale_warnings_name_a_quantised_sensor_and_a_fallback_scale_but_not_healthy_ones():
    from anomaly.scaling import scale_warnings

    rng = np.random.default_rng(0)
    healthy = rng.normal(10, 2, 1000)
    quantised = np.where(rng.random(1000) < 0.1, 33.0, 32.0) + np.r_[0.0, np.zeros(999)]  # quartiles coincide
    quantised[:500] += 0.0001 * np.arange(500) / 500  # a sliver of spread: the IQR is tiny, not zero
    small = np.where(rng.random(1000) < 0.2, 0.02, 0.0)  # IQR 0: robust scale falls back to 1
    values = np.c_[healthy, quantised, small, np.full(1000, 5.0)]
    scaler = fit_scaler(values, ["ok", "flow", "valve", "constant"], "robust")
    got = dict(scale_warnings(values, scaler))
    assert sorted(got) == ["flow", "valve"], got
    assert "under 0.01 x its standard deviation" in got["flow"] and "fell back to 1" in got["valve"]
    assert scale_warnings(values, fit_scaler(values, ["ok", "flow", "valve", "constant"], "standard")) == []


def test_a_sensor_read_in_small_units_keeps_its_own_spread():
    rng = np.random.default_rng(0)
    leak = 5e-9 + 1e-9 * rng.normal(size=500)  # a leakage current of nA, in amperes
    scaler = fit_scaler(np.c_[leak, 20 + rng.normal(size=500)], ["leak", "temp"])
    assert scaler.scale[0] == pytest.approx(leak.std(), rel=1e-9)  # it used to fall back to 1: faults invisible
    fault = scaler.transform(np.array([[5e-6, 20.0]]))  # x1000
    assert fault[0, 0] > 1000
    # still: a constant is scale 1, and so is a spread that is float rounding of the level
    flat = fit_scaler(np.c_[np.full(50, 123456.789), 123456.789 + np.r_[0.0, 1.5e-11, 0.0] .repeat(17)[:50]], ["a", "b"])
    assert flat.scale == (1.0, 1.0)


def test_the_largest_reading_the_codec_accepts_stays_finite_in_float32_over_the_smallest_scale():
    from anomaly.codec import MAX_ABS_VALUE
    from anomaly.scaling import MIN_SCALE

    scaler = fit_scaler(np.c_[np.r_[0.0, 2.2e-20].repeat(10)], ["tiny"])  # std 1.1e-20
    assert MIN_SCALE < scaler.scale[0] < 2 * MIN_SCALE  # about the smallest scale there is (under it: 1)
    assert np.isfinite(scaler.transform(np.array([[MAX_ABS_VALUE * 0.999], [-MAX_ABS_VALUE * 0.999]]))).all()


@pytest.mark.parametrize("method", ["standard", "minmax"])
def test_scale_warnings_name_a_scale_set_by_one_sentinel_reading(method):
    # one reading of 1e6 (a sentinel, a glitch) among pressures of ~1 bar: the standard scale 1.8e4, and a
    # fault of +0.4 bar moved the scaled error by nothing: 0 % of its windows flagged, and nothing said
    from anomaly.scaling import scale_warnings

    rng = np.random.default_rng(0)
    pressure, temp = 1.0 + 0.07 * rng.normal(size=1500), 70 + rng.normal(size=1500)
    pressure[700] = 1e6
    values = np.c_[pressure, temp]
    got = dict(scale_warnings(values, fit_scaler(values, ["pressure", "temp"], method)))
    assert list(got) == ["pressure"] and "set by 1 extreme reading(s)" in got["pressure"]
    assert "data.scaler = robust" in got["pressure"]
    assert scale_warnings(values, fit_scaler(values, ["pressure", "temp"], "robust")) == []  # the IQR ignores it
    values[700, 0] = 1.0
    assert scale_warnings(values, fit_scaler(values, ["pressure", "temp"], method)) == []
