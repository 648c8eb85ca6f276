"""Alarm thresholds fitted on validation reconstruction errors, and how they classify scores. No I/O.

A *policy* (``QuantileThreshold``, ``MeanStdThreshold``, ``PotThreshold``) is a frozen dataclass of
parameters with ``fit(errors) -> Threshold``. A ``Threshold`` is plain data — a method name, a value
and a flat ``params`` dict of floats (the policy's parameters plus fitted diagnostics) — so it
serialises to JSON and loads without unpickling anything. A score is anomalous when ``score > value``.

``pot`` is peaks-over-threshold after Siffer et al., KDD 2017 ("SPOT"): take the ``init_quantile``
quantile ``t`` of the errors, fit a Generalized Pareto distribution (shape γ, scale σ) to the excesses
over ``t`` by maximum likelihood, and solve for the score exceeded with probability ``risk``:

    z = t + σ/γ · ((risk·n/N_t)^(−γ) − 1)        (γ ≠ 0)
    z = t − σ · ln(risk·n/N_t)                    (γ = 0, exponential tail)

with ``n`` errors of which ``N_t`` exceed ``t``. ``params["fallback"]`` says when the empirical
``1 − risk`` quantile was used instead (see ``FALLBACK_REASONS``); ``params["gpd_fit"]`` says how the
tail was fitted (see ``GPD_FIT_METHODS``).

Only numpy and scipy; no torch, no mlflow, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize_scalar

from anomaly.adaptive import PARAM_KEYS as ADAPTIVE_KEYS
from anomaly.adaptive import AdaptiveRule, adaptive_bars
from anomaly.episodes import PARAM_KEYS as EPISODE_KEYS
from anomaly.episodes import EpisodeRule, episode_bars
from anomaly.errors import ConfigError

# Codes stored in ``Threshold.params["fallback"]`` by the pot policy (params hold floats only).
FALLBACK_NONE = 0.0
FALLBACK_NOT_IN_TAIL = 1.0
FALLBACK_FEW_PEAKS = 2.0
FALLBACK_REASONS = {
    FALLBACK_NONE: "none: threshold from the fitted GPD tail",
    FALLBACK_NOT_IN_TAIL: "risk·n/N_t >= 1: the target lies below the tail; empirical 1-risk quantile used",
    FALLBACK_FEW_PEAKS: "fewer than min_peaks errors above t: empirical 1-risk quantile used",
}

# Codes stored in ``Threshold.params["gpd_fit"]``.
GPD_MLE = 0.0
GPD_MOMENTS = 1.0
GPD_EXPONENTIAL = 2.0
GPD_FIT_METHODS = {GPD_MLE: "maximum likelihood", GPD_MOMENTS: "method of moments",
                   GPD_EXPONENTIAL: "exponential (shape 0, scale = mean excess)"}

GAMMA_ZERO = 1e-12  # |γ| below this uses the exponential-tail formula; expm1 keeps small γ accurate above it
GAMMA_MIN = -1.0  # below −1 the GPD likelihood is unbounded at the sample maximum: no MLE exists there


# --------------------------------------------------------------------------------------------------
# The fitted threshold


@dataclass(frozen=True)
class Threshold:
    """A fitted alarm threshold: ``flags(scores)`` is ``scores > value``.

    ``params`` holds the policy's parameters and fitted diagnostics, all floats (counts included), so
    the whole object is JSON-safe. It is left out of the hash, so thresholds can be hashed.

    ``per_entity``: entity -> its own value, fitted with the same policy on that entity's validation
    errors (a model shared by a fleet; ``fit_entity_values``); an entity not in it is held to ``value``.
    """

    method: str
    value: float
    params: dict[str, float] = field(default_factory=dict, hash=False)
    per_entity: dict[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        value = float(self.value)
        if not math.isfinite(value):
            raise ValueError(f"threshold value must be finite, got {self.value!r}")
        params = {str(k): float(v) for k, v in dict(self.params).items()}
        bad = [k for k, v in params.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"threshold params must be finite; not: {', '.join(bad)}")
        per_entity = {str(k): float(v) for k, v in dict(self.per_entity).items()}
        bad = [k for k, v in per_entity.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"per-entity threshold values must be finite; not: {', '.join(bad)}")
        object.__setattr__(self, "method", str(self.method))
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "params", params)  # a copy: the caller's dict is not shared
        object.__setattr__(self, "per_entity", per_entity)

    def value_for(self, entity: str) -> float:
        """The fitted value ``entity`` is held to: its own, else the model's."""
        return self.per_entity.get(entity, self.value)

    def values_for(self, entities: Sequence[str]) -> np.ndarray:
        """``value_for`` of each of ``entities`` (one per scored window), as floats."""
        per, value = self.per_entity, self.value
        return np.fromiter((per.get(e, value) for e in entities), dtype=np.float64, count=len(entities))

    def for_entity(self, entity: str) -> "Threshold":
        """This threshold as ``entity`` is held to it: its own value (if any) as ``value``, its rule kept."""
        return Threshold(self.method, self.value_for(entity), self.params)

    def with_per_entity(self, values: Mapping[str, float]) -> "Threshold":
        """This threshold with ``values`` as its per-entity values (empty: none)."""
        return Threshold(self.method, self.value, self.params, dict(values))

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """Boolean array, same shape as ``scores``: True where the score is above the fitted value.
        NaN scores are never flagged. The adaptive part (if any) needs time order: ``series_flags``."""
        return np.asarray(scores, dtype=np.float64) > self.value

    @property
    def adaptive(self) -> AdaptiveRule | None:
        """The adaptive rule stored with this threshold (``anomaly.adaptive``), or None."""
        return AdaptiveRule.from_params(self.params)

    def with_adaptive(self, rule: AdaptiveRule | None) -> "Threshold":
        """This threshold with ``rule`` stored in its params (an off or None rule removes one)."""
        params = {k: v for k, v in self.params.items() if k not in ADAPTIVE_KEYS}
        if rule is not None:
            params.update(rule.to_params())
        return Threshold(self.method, self.value, params, self.per_entity)

    @property
    def episodes(self) -> EpisodeRule | None:
        """The alarm-episode rule stored with this threshold (``anomaly.episodes``), or None."""
        return EpisodeRule.from_params(self.params)

    def with_episodes(self, rule: EpisodeRule | None) -> "Threshold":
        """This threshold with ``rule`` stored in its params (an off or None rule removes one)."""
        params = {k: v for k, v in self.params.items() if k not in EPISODE_KEYS}
        if rule is not None:
            params.update(rule.to_params())
        return Threshold(self.method, self.value, params, self.per_entity)

    def describe_rule(self) -> str:
        """How the bar moves, for people (tags, listings): the adaptive rule's or the episodes' line, or
        ``off`` for a fixed threshold."""
        rule = self.episodes or self.adaptive
        return "off" if rule is None else rule.describe()

    def series_bars(self, scores: np.ndarray, stride: int = 1, *, window_size: int | None = None) -> np.ndarray:
        """The bar in force at each window of ONE entity's scores in time order (windows of
        ``window_size`` readings, ``stride`` apart): the fitted value, moved
        by the alarm-episode rule (``episode_bars``) or the adaptive rule (``adaptive_bars``) if one is
        stored (at most one is: ``ThresholdSettings`` refuses both).

        ``window_size`` None: the registered pyfunc of a version from before it was asked for (its own copy of
        ``anomaly/mlflow_model.py`` calls ``series_bars(score)``: a TypeError on every predict once the
        package was upgraded); an episode rule then settles as it did then, on windows of one reading."""
        episodes = self.episodes
        if episodes is not None:
            return episode_bars(scores, self.value, episodes, stride, window_size=window_size or 1)
        return adaptive_bars(scores, self.value, self.adaptive, stride)

    def series_flags(self, scores: np.ndarray, stride: int = 1, *, window_size: int | None = None) -> np.ndarray:
        """Flags of ONE entity's window scores in time order: above the bar in force (``series_bars``;
        causal). NaN: never flagged."""
        x = np.asarray(scores, dtype=np.float64)
        return x > self.series_bars(x, stride, window_size=window_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe types only; ``Threshold.from_dict(t.to_dict()) == t``."""
        out: dict[str, Any] = {"method": self.method, "value": self.value, "params": dict(self.params)}
        if self.per_entity:
            out["per_entity"] = dict(self.per_entity)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Threshold":
        missing = {"method", "value"} - set(data)
        if missing:
            raise ValueError(f"threshold dict lacks {', '.join(sorted(missing))}")
        return cls(method=str(data["method"]), value=float(data["value"]),
                   params={str(k): float(v) for k, v in dict(data.get("params", {})).items()},
                   per_entity={str(k): float(v) for k, v in dict(data.get("per_entity", {})).items()})


# --------------------------------------------------------------------------------------------------
# Input and parameter checks


def _as_errors(errors: np.ndarray) -> np.ndarray:
    """A non-empty 1-D finite float64 array (maybe the caller's own array: never written to)."""
    try:
        arr = np.asarray(errors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"errors must be numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"errors must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("cannot fit a threshold on zero errors")
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"errors must be finite; {int((~finite).sum())} of {arr.size} are NaN or infinite")
    return arr


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"threshold.{name}", f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"threshold.{name}", f"must be finite, got {value}")
    return value


def _open_unit(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"threshold.{name}", f"must be in (0, 1), got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Policies


@dataclass(frozen=True)
class QuantileThreshold:
    """Threshold = the ``q`` quantile of the errors (linear interpolation, numpy's default), a glitch's
    errors left out first (as ``PotThreshold`` does)."""

    name: ClassVar[str] = "quantile"
    q: float = 0.99  # quantile of validation errors, in (0, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", _open_unit("q", self.q))

    def fit(self, errors: np.ndarray) -> Threshold:
        e, screened = _screened(_as_errors(errors))
        return Threshold(self.name, float(np.quantile(e, self.q)), {"q": self.q, "n": float(e.size), **screened})


@dataclass(frozen=True)
class MeanStdThreshold:
    """Threshold = mean + ``k`` · standard deviation of the errors (population std, ddof=0), a glitch's
    errors left out first (as ``PotThreshold`` does)."""

    name: ClassVar[str] = "mean_std"
    k: float = 3.0  # number of standard deviations above the mean, >= 0

    def __post_init__(self) -> None:
        k = _number("k", self.k)
        if k < 0:
            raise ConfigError("threshold.k", f"must be >= 0, got {k}")
        object.__setattr__(self, "k", k)

    def fit(self, errors: np.ndarray) -> Threshold:
        e, screened = _screened(_as_errors(errors))
        mean, std = float(e.mean()), float(e.std())
        return Threshold(self.name, mean + self.k * std,
                         {"k": self.k, "mean": mean, "std": std, "n": float(e.size), **screened})


@dataclass(frozen=True)
class PotThreshold:
    """Peaks over threshold with a Generalized Pareto tail (SPOT, Siffer et al. 2017).

    A glitch's errors (more than ``GROSS_MADS`` robust standard deviations above the median and more
    than ``GROSS_GAP`` times every error below them) are left out of the fit first, counted in
    ``params["screened"]``.

    Fallbacks, both to the empirical ``1 − risk`` quantile (the largest error when there are fewer than
    ``1 / risk`` of them), recorded in ``params["fallback"]``:
    fewer than ``min_peaks`` errors strictly above ``t`` (too little tail to fit), or
    ``risk·n/N_t >= 1`` (the target is not in the tail, e.g. ``risk >= 1 − init_quantile``).
    When ``risk < 1 − init_quantile`` the value is never below ``t``.
    """

    name: ClassVar[str] = "pot"
    risk: float = 1e-3  # target false-alarm probability per scored window, in (0, 1)
    init_quantile: float = 0.98  # quantile of the errors where the tail starts (t), in (0, 1)
    min_peaks: int = 10  # fewest errors above t to fit the tail; >= 3 for a two-parameter fit

    def __post_init__(self) -> None:
        object.__setattr__(self, "risk", _open_unit("risk", self.risk))
        object.__setattr__(self, "init_quantile", _open_unit("init_quantile", self.init_quantile))
        min_peaks = _number("min_peaks", self.min_peaks)
        if min_peaks != int(min_peaks) or min_peaks < 3:
            raise ConfigError("threshold.min_peaks", f"must be an integer >= 3, got {self.min_peaks!r}")
        object.__setattr__(self, "min_peaks", int(min_peaks))

    def fit(self, errors: np.ndarray) -> Threshold:
        e, screened = _screened(_as_errors(errors))
        n = e.size
        t = float(np.quantile(e, self.init_quantile))
        peaks = np.sort(e[e > t] - t)  # in one order whatever the errors': the fit's sums round alike (order-free)
        n_peaks = peaks.size
        params = {"risk": self.risk, "init_quantile": self.init_quantile, "min_peaks": float(self.min_peaks),
                  "t": t, "n": float(n), "n_peaks": float(n_peaks)}
        ratio = self.risk * n / n_peaks if n_peaks else math.inf
        if n_peaks < self.min_peaks or ratio >= 1.0:
            params["fallback"] = FALLBACK_FEW_PEAKS if n_peaks < self.min_peaks else FALLBACK_NOT_IN_TAIL
            # Fewer than 1/risk errors cannot place the 1 - risk quantile: interpolating would put it below
            # the largest validation error, which would then already be a false alarm. Their largest it is.
            value = float(np.quantile(e, 1.0 - self.risk)) if n * self.risk >= 1.0 else float(e.max())
        else:
            gamma, sigma, how = gpd_fit(peaks)
            params.update(fallback=FALLBACK_NONE, gamma=gamma, sigma=sigma, gpd_fit=how)
            try:
                value = t + gpd_excess_quantile(gamma, sigma, ratio)
            except OverflowError:  # a heavy tail (γ 15) and a tiny risk (1e-30): past any float
                value = math.inf
            if not math.isfinite(value):
                raise ValueError(f"the POT threshold for threshold.risk {self.risk:g} lies beyond any float on "
                                 f"this tail (shape γ {gamma:.3g}); a larger risk places it")
        if self.risk < 1.0 - self.init_quantile:
            value = max(value, t)  # guard only: the formula already gives > t when ratio < 1 and σ > 0
        return Threshold(self.name, value, {**params, **screened})


GROSS_MADS = 100.0  # an error this many robust standard deviations (1.4826 MAD) above the median ...
GROSS_GAP = 10.0  # ... and this many times every error below it is a glitch's, not the tail's


def _screened(e: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """``_screen_gross``'s errors kept, and the threshold params that say what went (none: ``{}``). Every
    policy screens: one wild reading in the validation rows touches a window's worth of windows, over 1 %
    of a thousand, and the 0.99 quantile, or a mean plus 3 std, landed on its errors (a model that never
    alarmed)."""
    kept, n_out, cut = _screen_gross(e)
    return kept, ({"screened": float(n_out), "screened_above": cut} if n_out else {})


def no_spread(errors: np.ndarray) -> bool:
    """Whether ``errors`` (validation errors, finite) leave no tail to fit a threshold on: the errors above
    their median are under 1 % of them (a validation stretch of a machine on standby scores every window
    alike). Any threshold fitted there is that one value, and normal running after it alarms at once."""
    e = np.asarray(errors, dtype=np.float64)
    return e.size > 0 and float(np.quantile(e, 0.99)) <= float(np.median(e))


def _screen_gross(e: np.ndarray) -> tuple[np.ndarray, int, float]:
    """``e`` without a glitch's errors (the windows of one wild reading in the validation rows: a tail
    fitted through them put the threshold thousands of times higher, a model that never alarms), how
    many went and the cut. A glitch's errors stand apart: all more than ``GROSS_MADS`` robust standard
    deviations above the median, and more than ``GROSS_GAP`` times every other error (a heavy tail mostly
    rises without such a gap; a Pareto tail of index 1-1.5 has one at its top now and then, 4-11 % of
    draws of 5,000, and loses those errors). A glitch whose windows taper off smoothly has no such gap
    and is fitted whole, as before. All of ``e`` when none goes, when its spread is zero, or when too few
    would be left to fit."""
    median = float(np.median(e))
    spread = 1.4826 * float(np.median(np.abs(e - median)))
    if spread <= 0.0 or not math.isfinite(spread):
        return e, 0, math.inf
    far = e > median + GROSS_MADS * spread
    top = np.sort(e[far])[::-1]  # the candidates, largest first
    if not top.size or top.size * 2 > e.size:
        return e, 0, math.inf
    below = np.r_[top[1:], e[~far].max(initial=0.0)]  # each one's next lower error
    gaps = np.flatnonzero(top > GROSS_GAP * below)
    if not gaps.size:
        return e, 0, math.inf
    n_out = int(gaps[-1]) + 1  # everything above the lowest such gap
    cut = float(below[gaps[-1]])
    return e[e <= cut], n_out, cut


POLICIES: dict[str, type] = {p.name: p for p in (QuantileThreshold, MeanStdThreshold, PotThreshold)}


def make_policy(method: str, **params: Any):
    """The policy called ``method`` with ``params``; ConfigError for an unknown method or parameter,
    or a value out of range (the field is ``threshold.<param>``)."""
    if method not in POLICIES:
        raise ConfigError("threshold.method", f"unknown method {method!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[method]
    known = [f.name for f in fields(cls)]
    for key in params:
        if key not in known:
            raise ConfigError(f"threshold.{key}", f"unknown parameter for method {method!r}; "
                                                  f"it takes {', '.join(known)}")
    return cls(**params)


def fit_threshold(errors: np.ndarray, method: str = "pot", **params: Any) -> Threshold:
    """Fit the ``method`` policy with ``params`` on a 1-D array of validation errors."""
    return make_policy(method, **params).fit(errors)


def fit_thresholds_per_entity(errors_by_entity: Mapping[str, np.ndarray], method: str = "pot",
                              **params: Any) -> dict[str, Threshold]:
    """One threshold per entity, same policy for all, in the mapping's order. Parameters are checked
    even when the mapping is empty; a bad error array raises ValueError naming its entity."""
    policy = make_policy(method, **params)
    out: dict[str, Threshold] = {}
    for entity, errors in errors_by_entity.items():
        try:
            out[entity] = policy.fit(errors)
        except ValueError as exc:
            raise ValueError(f"entity {entity!r}: {exc}") from exc
    return out


def fit_entity_values(errors_by_entity: Mapping[str, np.ndarray], method: str, params: Mapping[str, Any],
                      scale: float = 1.0, min_windows: int = 200) -> dict[str, float]:
    """Per-entity threshold values for a model shared by a fleet: the ``method`` policy fitted on each
    entity's own validation errors, times ``scale`` (as the shared value is), for every entity with at
    least ``min_windows`` finite errors (fewer: it is held to the shared value, so it is left out)."""
    if min_windows < 1:
        raise ValueError(f"min_windows must be >= 1, got {min_windows}")
    enough = {e: np.asarray(x, dtype=np.float64) for e, x in errors_by_entity.items()}
    enough = {e: x[np.isfinite(x)] for e, x in enough.items()}
    enough = {e: x for e, x in enough.items() if x.size >= min_windows}
    return {e: t.value * scale for e, t in fit_thresholds_per_entity(enough, method, **params).items()}


# --------------------------------------------------------------------------------------------------
# Generalized Pareto tail


def gpd_excess_quantile(gamma: float, sigma: float, ratio: float) -> float:
    """The excess over t with tail probability ``ratio`` (= risk·n/N_t) under GPD(γ, σ)."""
    log_ratio = math.log(ratio)
    if abs(gamma) < GAMMA_ZERO:
        return -sigma * log_ratio
    return sigma / gamma * math.expm1(-gamma * log_ratio)


# Grid over u = θ·max(y) for the profile likelihood (θ = γ/σ, Grimshaw's reduction). Negative u is
# bounded by −1 (1 + θy > 0); fine near both 0 and −1, where optima sit for light/bounded tails.
_U_GRID = np.unique(np.concatenate([
    -np.logspace(-6, 0, 121)[:-1],            # −1e-6 .. −0.89
    -1.0 + np.logspace(-12, -1, 45),          # −(1 − 1e-12) .. −0.9
    [0.0],                                    # exponential
    np.logspace(-6, 8, 281),                  # 1e-6 .. 1e8 (very heavy tails)
]))
_U_EXTEND_DECADES = 4  # while the best u is the grid's last, the grid goes on by this many decades ...
_U_EXTEND_MAX = 1e40  # ... up to here: one excess far above the rest (a glitch) puts the optimum past 1e8


def _profile_loglik(u: float, y: np.ndarray, y_max: float) -> tuple[float, float, float]:
    """(log-likelihood, γ, σ) of GPD excesses ``y`` maximised over σ for θ = u / y_max.

    For fixed θ the MLE of γ is mean(log(1 + θy)) and σ = γ/θ, leaving
    ℓ(θ) = −N·ln σ − N·(1 + γ). u = 0 is the exponential limit (γ = 0, σ = mean y).
    """
    n = y.size
    if u == 0.0:
        sigma = float(y.mean())
        return -n * math.log(sigma) - n, 0.0, sigma
    theta = u / y_max
    gamma = float(np.log1p(theta * y).mean())
    sigma = gamma / theta
    if not (math.isfinite(gamma) and gamma >= GAMMA_MIN and sigma > 0 and math.isfinite(sigma)):
        return -math.inf, gamma, sigma
    return -n * math.log(sigma) - n * (1.0 + gamma), gamma, sigma


def gpd_fit(peaks: np.ndarray) -> tuple[float, float, float]:
    """Fit GPD(γ, σ), location 0, to positive excesses. Returns (γ, σ, how) with ``how`` one of
    ``GPD_FIT_METHODS``.

    Maximum likelihood by Grimshaw's reduction to one variable θ = γ/σ (as SPOT does): the profile
    likelihood is scanned on a fixed grid, then refined between the best point's neighbours, so the
    fit is deterministic and finds the global optimum of that curve rather than a local root, among
    γ >= −1. The boundary γ = −1 itself (a uniform tail ending at the largest excess, σ = its value)
    is not a candidate, though its likelihood can be higher on a flat tail: its 1 − risk quantile lies
    below the largest excess, so the threshold would flag validation windows. If that fails, method of
    moments; if that fails too (e.g. all excesses equal), exponential.
    """
    y = np.asarray(peaks, dtype=np.float64)
    y_max = float(y.max())
    if y.size >= 2 and y_max > 0:
        grid = _U_GRID
        scores = [_profile_loglik(float(u), y, y_max)[0] for u in grid]
        best = int(np.argmax(scores))
        # The grid is in units of the largest excess; when one excess is ~1e8 times the typical one the
        # optimum lies beyond it (the fit stopped at the edge: a threshold 168x the MLE's was measured).
        while best == grid.size - 1 and math.isfinite(scores[best]) and grid[-1] < _U_EXTEND_MAX:
            more = np.logspace(math.log10(grid[-1]), math.log10(grid[-1]) + _U_EXTEND_DECADES,
                               20 * _U_EXTEND_DECADES + 1)[1:]
            grid = np.concatenate([grid, more])
            scores += [_profile_loglik(float(u), y, y_max)[0] for u in more]
            best = int(np.argmax(scores))
        if math.isfinite(scores[best]):
            best_u, best_ll = float(grid[best]), scores[best]
            lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
            if hi > lo:
                res = minimize_scalar(lambda u: -_profile_loglik(u, y, y_max)[0], bounds=(lo, hi),
                                      method="bounded", options={"xatol": (hi - lo) * 1e-6})
                if res.success and -res.fun > best_ll:
                    best_u = float(res.x)
            ll, gamma, sigma = _profile_loglik(best_u, y, y_max)
            if math.isfinite(ll):
                return gamma, sigma, GPD_MLE
    mean = float(y.mean())
    var = float(y.var(ddof=1)) if y.size >= 2 else 0.0
    if var > 0 and mean > 0:
        ratio = mean * mean / var
        gamma, sigma = 0.5 * (1.0 - ratio), 0.5 * mean * (ratio + 1.0)
        if math.isfinite(gamma) and math.isfinite(sigma) and sigma > 0:
            return gamma, sigma, GPD_MOMENTS
    return 0.0, max(mean, np.finfo(float).tiny), GPD_EXPONENTIAL
