"""Threshold policies: one list of contract checks over every policy, then exact tests per policy on
tiny hand-built arrays, then statistical tests of the POT tail fit. Everything is seeded."""

import json
import math

import numpy as np
import pytest

from anomaly import thresholds
from anomaly.adaptive import AdaptiveRule
from anomaly.config import ThresholdSettings
from anomaly.errors import ConfigError
from anomaly.thresholds import (
    FALLBACK_FEW_PEAKS, FALLBACK_NONE, FALLBACK_NOT_IN_TAIL, GPD_EXPONENTIAL, GPD_MLE, GPD_MOMENTS, POLICIES,
    MeanStdThreshold, PotThreshold, QuantileThreshold, Threshold, fit_entity_values, fit_threshold,
    fit_thresholds_per_entity, gpd_excess_quantile, gpd_fit, make_policy,
)

# Every policy, with its fallback paths as separate cases so they pass the same contract.
CASES = [
    QuantileThreshold(),
    QuantileThreshold(q=0.5),
    MeanStdThreshold(),
    PotThreshold(),
    PotThreshold(min_peaks=10**6),  # always "too few peaks"
    PotThreshold(risk=0.05),  # risk·n/N_t = 2.5: "not in the tail"
]
CASE_IDS = [f"{p.name}-{i}" for i, p in enumerate(CASES)]


def training_errors(n: int = 5000, seed: int = 0) -> np.ndarray:
    """Skewed, positive, like reconstruction errors."""
    return np.random.default_rng(seed).gamma(2.0, 1.0, size=n)


# ---------------------------------------------------------------------------------------------------
# Contract: every policy


def test_every_policy_is_in_the_contract_list():
    assert {type(p) for p in CASES} == set(POLICIES.values())
    assert all(POLICIES[name].name == name for name in POLICIES)


@pytest.mark.parametrize("policy", CASES, ids=CASE_IDS)
def test_fit_then_classify(policy):
    errors = training_errors()
    th = policy.fit(errors)
    assert isinstance(th, Threshold) and th.method == policy.name
    far = errors.max() * 10 + 1
    np.testing.assert_array_equal(th.flags(np.array([np.median(errors), far])), [False, True])
    assert th.flags(errors).dtype == bool


@pytest.mark.parametrize("policy", CASES, ids=CASE_IDS)
def test_serialisation_round_trip(policy):
    th = policy.fit(training_errors())
    text = json.dumps(th.to_dict(), allow_nan=False)  # plain, finite JSON
    again = Threshold.from_dict(json.loads(text))
    assert again == th
    assert type(again.value) is float and all(type(v) is float for v in again.params.values())
    assert again.flags(np.array([th.value, np.nextafter(th.value, np.inf)])).tolist() == [False, True]


@pytest.mark.parametrize("policy", CASES, ids=CASE_IDS)
def test_monotonic_in_error(policy):
    errors = training_errors()
    th = policy.fit(errors)
    scores = np.sort(np.concatenate([np.linspace(errors.min() - 1, errors.max() * 2, 2001),
                                     [th.value, np.nextafter(th.value, -np.inf), np.nextafter(th.value, np.inf)]]))
    flags = th.flags(scores).astype(int)
    assert (np.diff(flags) >= 0).all()  # once flagged, every larger score is flagged
    assert flags[0] == 0 and flags[-1] == 1


@pytest.mark.parametrize("policy", CASES, ids=CASE_IDS)
def test_inputs_not_mutated(policy):
    errors = training_errors()
    errors.setflags(write=False)  # any in-place write would raise
    before = errors.copy()
    th = policy.fit(errors)
    th.flags(errors)
    np.testing.assert_array_equal(errors, before)


@pytest.mark.parametrize("policy", CASES, ids=CASE_IDS)
def test_deterministic_and_order_free(policy):
    errors = training_errors()
    assert policy.fit(errors) == policy.fit(errors.copy())
    shuffled = np.random.default_rng(1).permutation(errors)
    assert policy.fit(shuffled).value == pytest.approx(policy.fit(errors).value, rel=1e-9)


@pytest.mark.parametrize("policy", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("bad", [np.array([]), np.ones((10, 2)), np.array([1.0, np.nan, 2.0]),
                                 np.array([1.0, np.inf]), np.array(["a", "b"])],
                         ids=["empty", "2d", "nan", "inf", "text"])
def test_rejects_unusable_errors(policy, bad):
    with pytest.raises(ValueError, match="errors"):
        policy.fit(bad)


# ---------------------------------------------------------------------------------------------------
# Threshold data


def test_threshold_flags_nan_never_and_keeps_shape():
    th = Threshold("quantile", 1.0, {})
    np.testing.assert_array_equal(th.flags(np.array([[np.nan, 1.0], [1.5, 0.0]])), [[False, False], [True, False]])


def test_threshold_coerces_params_and_copies_them():
    params = {"scale": 2, "n": np.float64(3)}
    th = Threshold("pot", np.float32(1.5), params)  # positional, as train_job rebuilds a scaled one
    assert th.params == {"scale": 2.0, "n": 3.0} and type(th.value) is float
    params["scale"] = 99
    assert th.params["scale"] == 2.0
    assert hash(th) == hash(Threshold("pot", 1.5, {"other": 1.0}))  # params are left out of the hash


def test_threshold_rejects_non_finite_and_incomplete():
    with pytest.raises(ValueError, match="finite"):
        Threshold("quantile", math.nan, {})
    with pytest.raises(ValueError, match="finite"):
        Threshold("quantile", 1.0, {"t": math.inf})
    with pytest.raises(ValueError, match="value"):
        Threshold.from_dict({"method": "pot"})


# ---------------------------------------------------------------------------------------------------
# Exact, per policy


def test_quantile_of_0_to_100():
    errors = np.arange(101, dtype=float)
    th = QuantileThreshold(q=0.99).fit(errors)
    assert th.value == 99.0 and th.params == {"q": 0.99, "n": 101.0}
    assert QuantileThreshold(q=0.5).fit(errors).value == 50.0
    assert QuantileThreshold(q=0.995).fit(errors).value == pytest.approx(99.5)  # linear interpolation
    assert th.flags(np.array([99.0, 99.0001])).tolist() == [False, True]  # strictly above


def test_mean_std_on_one_to_five():
    th = MeanStdThreshold(k=2.0).fit(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert th.value == pytest.approx(3.0 + 2.0 * math.sqrt(2.0))  # population std of 1..5 is sqrt(2)
    assert th.params["mean"] == 3.0 and th.params["std"] == pytest.approx(math.sqrt(2.0))
    assert MeanStdThreshold(k=0).fit(np.array([1.0, 2.0, 3.0, 4.0, 5.0])).value == 3.0


def test_mean_std_constant_errors():
    th = MeanStdThreshold().fit(np.full(10, 4.0))
    assert th.value == 4.0 and th.flags(np.array([4.0, 4.1])).tolist() == [False, True]


def test_gpd_excess_quantile_closed_forms():
    assert gpd_excess_quantile(0.0, 2.0, 0.25) == pytest.approx(-2.0 * math.log(0.25))
    assert gpd_excess_quantile(0.5, 2.0, 0.25) == pytest.approx(4.0)  # 2/0.5 · (0.25^-0.5 − 1)
    assert gpd_excess_quantile(-0.5, 2.0, 0.25) == pytest.approx(2.0)  # 2/−0.5 · (0.25^0.5 − 1)
    assert gpd_excess_quantile(1e-9, 2.0, 0.25) == pytest.approx(gpd_excess_quantile(0.0, 2.0, 0.25), rel=1e-8)


def test_pot_few_peaks_falls_back_to_empirical_quantile():
    errors = np.arange(100, dtype=float)  # t = 97.02: only 98 and 99 are above it
    th = PotThreshold(risk=1e-3, init_quantile=0.98).fit(errors)
    assert th.params["fallback"] == FALLBACK_FEW_PEAKS and th.params["n_peaks"] == 2.0
    # 100 errors cannot place the 0.999 quantile: their largest, so no validation error is a false alarm
    # (the interpolated quantile, 98.9, flagged the 99).
    assert th.value == 99.0 and not th.flags(errors).any()
    assert th.value >= th.params["t"]
    assert "gamma" not in th.params  # no tail was fitted
    # With at least 1/risk errors the empirical quantile stands.
    many = np.arange(2000, dtype=float)
    th = PotThreshold(risk=1e-3, init_quantile=0.998).fit(many)
    assert th.params["fallback"] == FALLBACK_FEW_PEAKS and th.value == np.quantile(many, 0.999)


def test_pot_past_any_float_is_a_value_error_naming_the_entity():
    """A heavy tail (γ about 15) and a tiny but allowed risk: math.expm1 overflowed, an OverflowError that
    the per-entity fit (which names the entity of a ValueError) let through unnamed."""
    errors = np.r_[np.random.default_rng(0).chisquare(3, 2000) / 3, 5 * 10.0 ** np.arange(1, 21)]
    with pytest.raises(ValueError, match="POT threshold for threshold.risk 1e-30 lies beyond any float"):
        fit_threshold(errors, "pot", risk=1e-30, init_quantile=0.98)
    with pytest.raises(ValueError, match="pump-2"):
        fit_thresholds_per_entity({"pump-1": errors[:2000], "pump-2": errors}, "pot", risk=1e-30, init_quantile=0.98)


def test_pot_constant_errors_have_no_tail():
    th = PotThreshold().fit(np.full(1000, 0.5))
    assert th.params["fallback"] == FALLBACK_FEW_PEAKS and th.params["n_peaks"] == 0.0
    assert th.value == 0.5 and not th.flags(np.array([0.5]))[0]


def test_pot_target_not_in_tail_falls_back():
    errors = np.random.default_rng(2).normal(size=10_000)
    th = PotThreshold(risk=0.05, init_quantile=0.98).fit(errors)  # risk·n/N_t = 0.05/0.02 = 2.5 >= 1
    assert th.params["fallback"] == FALLBACK_NOT_IN_TAIL
    assert th.value == np.quantile(errors, 0.95)


def test_pot_never_below_t_when_risk_is_in_the_tail():
    rng = np.random.default_rng(3)
    samples = {"uniform": rng.uniform(size=20_000),  # bounded tail, γ < 0
               "exponential": rng.exponential(size=20_000), "lomax": rng.pareto(2.0, size=20_000),
               "ties": np.round(rng.exponential(size=20_000), 1)}
    for name, errors in samples.items():
        for risk in (0.019, 1e-3, 1e-6):
            th = PotThreshold(risk=risk, init_quantile=0.98).fit(errors)
            assert th.value >= th.params["t"], (name, risk)


def test_pot_bounded_tail_stays_near_the_endpoint():
    errors = np.random.default_rng(4).uniform(size=50_000)
    th = PotThreshold(risk=1e-3).fit(errors)
    assert th.params["gamma"] < -0.5  # uniform excesses are GPD with γ = −1
    assert th.value == pytest.approx(0.999, abs=0.002)


# ---------------------------------------------------------------------------------------------------
# GPD fit


def test_gpd_fit_recovers_known_parameters_and_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(5)
    for gamma, sigma in [(0.3, 2.0), (-0.2, 0.5), (0.0, 1.0)]:
        u = rng.uniform(size=4000)
        y = -sigma * np.log1p(-u) if gamma == 0 else sigma / gamma * ((1 - u) ** -gamma - 1)
        g, s, how = gpd_fit(y)
        assert how == GPD_MLE
        assert g == pytest.approx(gamma, abs=0.08) and s == pytest.approx(sigma, rel=0.08)
        c, _, scale = stats.genpareto.fit(y, floc=0)
        ours, theirs = (stats.genpareto.logpdf(y, g, scale=s).sum(), stats.genpareto.logpdf(y, c, scale=scale).sum())
        assert ours >= theirs - 1e-6  # at least as likely as scipy's optimum


def test_gpd_fit_falls_back_to_moments_then_exponential(monkeypatch):
    monkeypatch.setattr(thresholds, "_profile_loglik", lambda u, y, y_max: (-math.inf, math.nan, math.nan))
    g, s, how = gpd_fit(np.array([1.0, 2.0, 3.0, 4.0]))  # mean 2.5, var 5/3, mean²/var = 3.75
    assert how == GPD_MOMENTS
    assert g == pytest.approx(0.5 * (1 - 3.75)) and s == pytest.approx(0.5 * 2.5 * 4.75)
    assert gpd_fit(np.full(5, 2.0)) == (0.0, 2.0, GPD_EXPONENTIAL)  # zero variance: moments undefined


def test_gpd_fit_keeps_shape_where_the_likelihood_is_bounded():
    # Below γ = −1 the likelihood grows without bound at the sample maximum; an unrestricted search
    # on three points runs off to γ ≈ −9.
    g, s, how = gpd_fit(np.array([1.0, 2.0, 3.0]))
    assert how == GPD_MLE and -1.0 <= g < 0 and s > 0


def test_gpd_fit_single_excess_is_exponential():
    assert gpd_fit(np.array([3.0])) == (0.0, 3.0, GPD_EXPONENTIAL)


# ---------------------------------------------------------------------------------------------------
# POT, statistically


def test_pot_on_exponential_hits_the_true_quantile():
    errors = np.random.default_rng(6).exponential(size=100_000)
    th = PotThreshold(risk=1e-3, init_quantile=0.98).fit(errors)
    assert th.params["fallback"] == FALLBACK_NONE and th.params["n_peaks"] == 2000.0
    assert th.params["t"] == pytest.approx(-math.log(0.02), rel=0.05)
    assert abs(th.params["gamma"]) < 0.1 and th.params["sigma"] == pytest.approx(1.0, rel=0.1)
    assert th.value == pytest.approx(-math.log(1e-3), rel=0.10)  # 6.91


@pytest.mark.parametrize("draw", [lambda r, n: r.normal(size=n), lambda r, n: r.pareto(2.0, size=n)],
                         ids=["gaussian", "lomax"])
def test_pot_false_alarm_rate_on_fresh_data(draw):
    rng = np.random.default_rng(7)
    risk = 1e-3
    th = PotThreshold(risk=risk).fit(draw(rng, 50_000))
    rate = th.flags(draw(rng, 200_000)).mean()  # ~200 expected alarms
    assert risk / 2 <= rate <= risk * 2, rate


def test_pot_is_tighter_than_the_plain_quantile_would_be_with_few_samples():
    # With 2000 errors the empirical 1e-4 quantile is just the sample maximum; POT extrapolates past it.
    errors = np.random.default_rng(8).exponential(size=2000)
    th = PotThreshold(risk=1e-4, init_quantile=0.95).fit(errors)
    assert th.params["fallback"] == FALLBACK_NONE
    assert th.value > errors.max()
    assert th.value == pytest.approx(-math.log(1e-4), rel=0.25)  # 9.21


# ---------------------------------------------------------------------------------------------------
# Parameters and factories


@pytest.mark.parametrize("method, params, field", [
    ("quantile", {"q": 0.0}, "threshold.q"), ("quantile", {"q": 1.0}, "threshold.q"),
    ("quantile", {"q": "0.9"}, "threshold.q"), ("quantile", {"q": True}, "threshold.q"),
    ("quantile", {"q": math.nan}, "threshold.q"), ("mean_std", {"k": -1.0}, "threshold.k"),
    ("mean_std", {"k": math.inf}, "threshold.k"), ("pot", {"risk": 0.0}, "threshold.risk"),
    ("pot", {"risk": 1.0}, "threshold.risk"), ("pot", {"init_quantile": 1.0}, "threshold.init_quantile"),
    ("pot", {"min_peaks": 2}, "threshold.min_peaks"), ("pot", {"min_peaks": 12.5}, "threshold.min_peaks"),
])
def test_bad_parameters_name_their_field(method, params, field):
    with pytest.raises(ConfigError) as info:
        make_policy(method, **params)
    assert info.value.field == field


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        make_policy("zscore")
    assert info.value.field == "threshold.method"
    assert all(name in info.value.message for name in ("quantile", "mean_std", "pot"))


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError) as info:
        make_policy("quantile", k=3.0)
    assert info.value.field == "threshold.k" and "quantile" in info.value.message


def test_make_policy_coerces_numbers():
    policy = make_policy("pot", risk=np.float32(0.01), min_peaks=20.0)
    assert policy == PotThreshold(risk=float(np.float32(0.01)), min_peaks=20)
    assert type(policy.min_peaks) is int and type(policy.risk) is float


@pytest.mark.parametrize("method", list(POLICIES))
def test_config_policy_params_are_accepted(method):
    policy = make_policy(method, **ThresholdSettings(method=method).policy_params())
    assert policy.name == method


def test_fit_threshold_defaults_to_pot():
    errors = training_errors()
    assert fit_threshold(errors) == PotThreshold().fit(errors)
    assert fit_threshold(errors, "quantile", q=0.9) == QuantileThreshold(0.9).fit(errors)


def test_per_entity_thresholds():
    rng = np.random.default_rng(9)
    by_entity = {"pump-2": rng.exponential(size=5000) * 10, "pump-1": rng.exponential(size=5000)}
    out = fit_thresholds_per_entity(by_entity, "pot", risk=1e-2)
    assert list(out) == ["pump-2", "pump-1"]  # mapping order kept
    for entity, errors in by_entity.items():
        assert out[entity] == fit_threshold(errors, "pot", risk=1e-2)
    assert out["pump-2"].value > 5 * out["pump-1"].value


def test_per_entity_names_the_bad_entity_and_checks_params_first():
    with pytest.raises(ValueError, match="'pump-9'"):
        fit_thresholds_per_entity({"pump-1": np.ones(10), "pump-9": np.array([np.nan])}, "quantile")
    with pytest.raises(ConfigError):
        fit_thresholds_per_entity({}, "quantile", q=2.0)
    assert fit_thresholds_per_entity({}, "mean_std") == {}


def test_entity_values_are_fitted_where_an_entity_has_enough_windows_and_scaled():
    by_entity = {"a": np.arange(1, 301, dtype=float), "b": np.r_[np.arange(1, 101, dtype=float), [np.nan] * 250],
                 "c": np.arange(1, 11, dtype=float) * 100}
    values = fit_entity_values(by_entity, "quantile", {"q": 0.5}, scale=2.0, min_windows=100)
    assert values == {"a": pytest.approx(2 * 150.5), "b": pytest.approx(2 * 50.5)}  # c: 10 windows, NaNs not counted
    with pytest.raises(ValueError, match="min_windows"):
        fit_entity_values(by_entity, "quantile", {"q": 0.5}, min_windows=0)


def test_a_threshold_holds_each_entity_to_its_own_value_and_round_trips():
    t = Threshold("pot", 2.0, {"risk": 0.01}).with_per_entity({"pump-1": 3.5, "pump-2": 1.25})
    assert t.value_for("pump-1") == 3.5 and t.value_for("unseen") == 2.0
    assert t.values_for(["pump-2", "unseen", "pump-1"]).tolist() == [1.25, 2.0, 3.5]
    assert t.for_entity("pump-2") == Threshold("pot", 1.25, {"risk": 0.01})
    assert t.for_entity("unseen") == Threshold("pot", 2.0, {"risk": 0.01})
    assert Threshold.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert "per_entity" not in Threshold("pot", 2.0).to_dict()  # a model without them saves as before
    kept = t.with_adaptive(AdaptiveRule(rows=10))
    assert kept.per_entity == t.per_entity and kept.adaptive == AdaptiveRule(rows=10)
    with pytest.raises(ValueError, match="pump-9"):
        Threshold("pot", 2.0, per_entity={"pump-9": float("inf")})


@pytest.mark.parametrize("glitch", [1e6, 1e9, 1e12, 1e30])
def test_one_excess_far_above_the_rest_still_gets_the_maximum_likelihood_tail(glitch):
    import scipy.stats as st

    from anomaly.thresholds import gpd_fit

    y = 1e-3 * np.random.default_rng(0).exponential(size=250)
    y[0] = glitch  # one glitch reading's error among well-fitted ones
    gamma, sigma, _ = gpd_fit(y)
    c, _, scale = st.genpareto.fit(y, floc=0)
    ours, theirs = st.genpareto.logpdf(y, gamma, 0, sigma).sum(), st.genpareto.logpdf(y, c, 0, scale).sum()
    assert ours >= theirs - 0.5  # the fit stopped at its grid's edge, far below the optimum (e.g. 1305 vs 1396)


def test_pot_leaves_out_a_glitchs_windows_far_above_every_other_error():
    """One wild validation reading touches W windows; the tail fit took them for the tail and put the
    threshold 13,000 times higher (a model that never alarms)."""
    rng = np.random.default_rng(0)
    errors = rng.gamma(2.0, 0.05, 2000)
    clean = fit_threshold(errors, "pot", risk=1e-3, init_quantile=0.95)
    for wild in (10.0, 1e3, 1e6):
        glitched = errors.copy()
        glitched[1000:1010] = wild
        fitted = fit_threshold(glitched, "pot", risk=1e-3, init_quantile=0.95)
        assert fitted.value == pytest.approx(clean.value, rel=0.1)
        assert fitted.params["screened"] == 10.0
    assert "screened" not in clean.params  # an ordinary tail is fitted whole


@pytest.mark.parametrize("method, params", [("quantile", {"q": 0.99}), ("mean_std", {"k": 3.0})])
def test_quantile_and_mean_std_leave_out_a_glitchs_windows_as_pot_does(method, params):
    """The windows of one wild validation reading are 1 % of 1,000: the 0.99 quantile landed on them, and
    mean + 3 std was pulled up to them (1e6 times too high: a model that never alarms)."""
    rng = np.random.default_rng(0)
    errors = rng.gamma(2.0, 0.05, 1000)
    clean = fit_threshold(errors, method, **params)
    for wild in (10.0, 1e3, 1e6):
        glitched = errors.copy()
        glitched[500:510] = wild
        fitted = fit_threshold(glitched, method, **params)
        assert fitted.value == pytest.approx(clean.value, rel=0.1), wild
        assert fitted.params["screened"] == 10.0 and fitted.params["screened_above"] < 1.0
        assert fitted.params["n"] == 990.0
    assert "screened" not in clean.params


def test_no_spread_tells_a_standby_stretch_from_ordinary_errors():
    rng = np.random.default_rng(0)
    running = rng.gamma(2.0, 0.05, 1000)
    assert thresholds.no_spread(np.full(800, 0.0067))  # every window alike
    assert thresholds.no_spread(np.r_[np.full(995, 0.0067), running[:5]])  # 5 of 1,000 above the median
    assert not thresholds.no_spread(running)
    assert not thresholds.no_spread(np.r_[np.full(500, 0.0067), running[:500] + 0.01])  # half standby, half running


def test_pot_keeps_a_heavy_but_ordinary_tail():
    rng = np.random.default_rng(1)
    errors = rng.lognormal(0.0, 1.0, 5000)
    assert "screened" not in fit_threshold(errors, "pot", risk=1e-3, init_quantile=0.95).params


@pytest.mark.parametrize("draw", ["lognormal", "pareto"])
def test_pot_keeps_every_error_of_a_heavy_tail_with_no_gap(draw):
    """A tail screened at 100 MADs alone lost its top 0.5-0.8 % (lognormal sigma 2, Pareto 1.2): the
    threshold fell 5 times and validation exceeded it 5-9 times more often than risk promises."""
    rng = np.random.default_rng(2)
    errors = rng.lognormal(0.0, 2.0, 20000) if draw == "lognormal" else rng.pareto(1.2, 20000) + 1.0
    assert "screened" not in fit_threshold(errors, "pot", risk=1e-3, init_quantile=0.95).params
