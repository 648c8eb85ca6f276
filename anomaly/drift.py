"""Score drift: has the champion's live score distribution moved away from what it was fitted on? No I/O.

The reference is the champion's own validation errors, as its training run recorded them: the median
(``val_score_p50``), the 99th percentile (``val_score_p99``), the alarm threshold and the fraction of
validation windows above it (``val_false_alarm_rate``; when that is 0, the threshold policy's nominal
rate: ``risk`` for pot, ``1 - q`` for quantile). These points cut the score axis into bins whose
expected probabilities are known (e.g. 0.5 below p50, 0.49 between p50 and p99, ...).

A recent window of live per-window scores of the same model version (from the worker's scores topic)
is compared with it by two statistics:

    psi         population stability index over those bins, Σ (o - e) · ln(o / e) with each
                proportion floored at ``PSI_FLOOR``; 0.1 is a small shift, 0.25 a large one
    alarm rate  the fraction of live scores above the threshold, against ``max_alarm_rate``
                (the expected, validation rate is reported beside it)

``assess`` gives a verdict only with at least ``min_samples`` scores; ``DriftGate`` adds the cooldown
that keeps a persistent drift from retraining in a loop. ``ScoreWindow`` keeps the recent scores of
one model version (a promotion starts it over: the old model's scores say nothing about the new one).

The scheduler (``anomaly.scheduler``) does the I/O: reading the scores topic, asking the registry for
the reference, running the retrain when the gate says so.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_RATE = 1e-12  # the least expected alarm rate kept: 1 - it is still under 1.0 in a float
PSI_FLOOR = 1e-4  # an empty bin would make ln(o/e) infinite; the usual PSI smoothing


# --- the reference (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """Cut points of the champion's validation score distribution.

    ``values`` ascend strictly; ``cdf[i]`` is the fraction of validation scores at or below
    ``values[i]`` (ascending, in (0, 1)). The bins are ``(-inf, v0], (v0, v1], ..., (v_last, inf)``.
    """

    version: str
    values: tuple[float, ...]
    cdf: tuple[float, ...]
    threshold: float
    expected_alarm_rate: float

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.cdf):
            raise ValueError("a reference needs at least one cut point, with one cdf value each")
        if any(b <= a for a, b in zip(self.values, self.values[1:])):
            raise ValueError(f"reference values must ascend strictly: {self.values}")
        if any(not 0 < c < 1 for c in self.cdf) or any(b <= a for a, b in zip(self.cdf, self.cdf[1:])):
            raise ValueError(f"reference cdf must ascend strictly inside (0, 1): {self.cdf}")
        if not math.isfinite(self.threshold) or not 0 <= self.expected_alarm_rate <= 1:
            raise ValueError(f"bad threshold {self.threshold} or expected alarm rate {self.expected_alarm_rate}")

    @property
    def expected(self) -> np.ndarray:
        """Expected probability of each bin (sums to 1)."""
        cdf = np.concatenate(([0.0], self.cdf, [1.0]))
        return np.diff(cdf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nominal_alarm_rate(params: Mapping[str, Any]) -> float | None:
    """The false-alarm rate a threshold policy aims at, from the training run's parameters
    (``threshold.method``, ``threshold.risk``, ``threshold.q``); None when the policy names none."""
    method = str(params.get("threshold.method", ""))
    try:
        if method == "pot":
            return float(params["threshold.risk"])
        if method == "quantile":
            return 1.0 - float(params["threshold.q"])
    except (KeyError, ValueError):
        return None
    return None


def reference_from_run(version: str, metrics: Mapping[str, float], params: Mapping[str, Any] | None = None
                       ) -> Reference | None:
    """The reference of a model version from its training run's metrics (``threshold``,
    ``val_score_p50``, ``val_score_p99``, ``val_false_alarm_rate``) and parameters; None when the run
    lacks the threshold (a version not trained by ``anomaly train``/retraining)."""
    threshold = _finite(metrics.get("threshold"))
    if threshold is None:
        return None
    val_far = _finite(metrics.get("val_false_alarm_rate"))
    n_val = _finite(metrics.get("val_windows"))
    below = None  # the mass below the threshold, where it is not 1 - expected
    if val_far is not None and val_far >= 1:
        # Every validation window above the threshold (a threshold.scale far under 1): all alarm, and the
        # mass below it is under 1 / (n + 1), the mirror of the case below (it was PSI_FLOOR above it, and
        # live scores drawn as in validation were "drift" at every check).
        expected = 1.0
        below = 1.0 / (n_val + 1.0) if n_val is not None and n_val >= 1 else PSI_FLOOR
    elif val_far is not None and val_far > 0:
        expected = val_far
    elif val_far is not None:
        # No validation window was above the threshold (e.g. a scaled one): the mass above it is below
        # 1 / (n + 1), not the policy's nominal rate, which the unchanged live scores would then miss
        # by a PSI of ~0.3, a false "drift".
        expected = 1.0 / (n_val + 1.0) if n_val is not None and n_val >= 1 else PSI_FLOOR
    else:
        expected = nominal_alarm_rate(params or {})  # a run that did not record its validation rate
    if expected is None or not 0 < expected <= 1:
        expected = PSI_FLOOR
    expected = max(expected, MIN_RATE)  # a pot risk of 1e-17: 1 - risk is 1.0, no cdf inside (0, 1)
    # The threshold is authoritative (it decides alarms); a validation quantile that disagrees with it
    # (a scaled threshold can sit below p99), or with the quantile before it, or that shares its cdf (a
    # validation false-alarm rate of exactly 1 % or 50 %) is left out.
    thr_cdf = 1.0 - expected if below is None else below
    kept: list[tuple[float, float]] = []
    for value, cdf in ((_finite(metrics.get("val_score_p50")), 0.5), (_finite(metrics.get("val_score_p99")), 0.99)):
        if value is None or (value < threshold) != (cdf < thr_cdf) or value == threshold or cdf == thr_cdf:
            continue
        if kept and (value <= kept[-1][0] or cdf <= kept[-1][1]):
            continue
        kept.append((value, cdf))
    kept = sorted([*kept, (threshold, thr_cdf)])
    return Reference(version=str(version), values=tuple(v for v, _ in kept), cdf=tuple(c for _, c in kept),
                     threshold=threshold, expected_alarm_rate=float(expected))


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --- statistics (pure) ---------------------------------------------------------------------------

def psi(observed: np.ndarray, expected: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """Population stability index of observed vs expected bin proportions (each floored at ``floor``)."""
    o = np.maximum(np.asarray(observed, dtype=np.float64), floor)
    e = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    return float(np.sum((o - e) * np.log(o / e)))


def bin_proportions(scores: np.ndarray, reference: Reference) -> np.ndarray:
    """Fraction of ``scores`` in each of the reference's bins (right-closed, like the cdf)."""
    scores = np.asarray(scores, dtype=np.float64)
    idx = np.searchsorted(np.asarray(reference.values), scores, side="left")
    counts = np.bincount(idx, minlength=len(reference.values) + 1)
    return counts / max(len(scores), 1)


@dataclass(frozen=True)
class DriftBounds:
    """When a window of live scores counts as drifted (config ``[drift]``)."""

    psi_threshold: float = 0.25
    max_alarm_rate: float = 0.05
    min_samples: int = 1000


@dataclass(frozen=True)
class Assessment:
    """One comparison of live scores with the reference. ``verdict``: drift, ok or insufficient."""

    verdict: str
    reason: str
    samples: int
    psi: float | None = None
    alarm_rate: float | None = None
    expected_alarm_rate: float | None = None
    version: str | None = None

    @property
    def drifted(self) -> bool:
        return self.verdict == "drift"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ALARM_RATE_SE = 3.0  # standard errors above a model's expected alarm rate that the live rate may reach unflagged


def alarm_bound(max_alarm_rate: float, expected: float, n: int) -> float:
    """The alarm rate above which ``n`` live scores drift: ``max_alarm_rate``, or the model's own validation
    rate plus ``ALARM_RATE_SE`` binomial standard errors where that is higher (a quantile threshold at
    q <= 0.95, a scale under 1; a rate just under the bound, whose noise alone would cross it). An
    unchanged model of rate 0.07 was "drifted" at every check against 0.05, and retrained every cooldown
    for ever (its challenger fitted alike) (pure)."""
    e = min(max(float(expected), 0.0), 1.0)
    return max(float(max_alarm_rate), e + ALARM_RATE_SE * math.sqrt(e * (1.0 - e) / max(n, 1)))


def assess(scores: Iterable[float], reference: Reference, bounds: DriftBounds) -> Assessment:
    """Compare live scores (finite ones only) with the reference: drift when PSI reaches
    ``psi_threshold`` or the alarm rate exceeds ``max_alarm_rate``; no verdict under ``min_samples``."""
    arr = np.asarray(list(scores), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = len(arr)
    if n < bounds.min_samples:
        return Assessment("insufficient", f"{n} live scores of v{reference.version}, need {bounds.min_samples}",
                          n, version=reference.version, expected_alarm_rate=reference.expected_alarm_rate)
    value = psi(bin_proportions(arr, reference), reference.expected)
    alarm_rate = float(np.count_nonzero(arr > reference.threshold) / n)
    bound = alarm_bound(bounds.max_alarm_rate, reference.expected_alarm_rate, n)
    said_bound = f"{bound:g}" if bound == bounds.max_alarm_rate else \
        f"{bound:.4f}: the expected rate and {ALARM_RATE_SE:g} standard errors, above drift.max_alarm_rate"
    facts = (f"PSI {value:.3f} (bound {bounds.psi_threshold:g}), alarm rate {alarm_rate:.4f} "
             f"(bound {said_bound}, expected {reference.expected_alarm_rate:.4f}) over {n} scores "
             f"of v{reference.version}")
    drifted = []
    if value >= bounds.psi_threshold:
        drifted.append("score distribution moved")
    if alarm_rate > bound:
        drifted.append("alarm rate too high")
    verdict = "drift" if drifted else "ok"
    reason = f"{' and '.join(drifted)}: {facts}" if drifted else facts
    return Assessment(verdict, reason, n, value, alarm_rate, reference.expected_alarm_rate, reference.version)


# --- live scores (pure) --------------------------------------------------------------------------

@dataclass(frozen=True)
class LiveScore:
    """One per-window score record of the worker's scores topic (only what drift needs)."""

    model_version: str
    score: float | None  # None: the window scored NaN/inf
    model_name: str | None = None  # the registered model that scored it (None: a record that does not say)


def parse_score_record(value: bytes | None) -> LiveScore | None:
    """A scores-topic record (``{"score": .., "model": {"name": .., "version": ..}, ...}``), or None
    when it is not one."""
    if not value:
        return None
    try:
        doc = json.loads(value)
        model = doc["model"]
        score = doc["score"]
        version = str(model["version"])
        name = model.get("name")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return LiveScore(version, _finite(score), name if isinstance(name, str) else None)


class ScoreWindow:
    """The latest ``size`` finite scores of one model version; scores of another version start it over
    when that version is the one being watched (``watch``). With ``model_name``, only that registered
    model's scores count: two asset types' workers may share one scores topic, and their models' version
    numbers match (both start at v1), so the other type's scores counted as this one's (a fault on a
    turbine read as drift of the pumps' model, and its retrain's cooldown hid the pumps' own drift)."""

    def __init__(self, size: int, model_name: str | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.version: str | None = None
        self.model_name = model_name
        self._scores: deque[float] = deque(maxlen=size)
        self.other_versions = 0  # records of versions not watched (older champions, lagging workers)
        self.other_models = 0  # records of other registered models (another asset type's workers)

    def watch(self, version: str) -> None:
        """Keep scores of ``version`` from now on (a different version than before clears the window)."""
        if version != self.version:
            self.version = version
            self._scores.clear()

    def add(self, record: LiveScore) -> None:
        if self.model_name is not None and record.model_name is not None and record.model_name != self.model_name:
            self.other_models += 1
        elif record.model_version != self.version:
            self.other_versions += 1
        elif record.score is not None:
            self._scores.append(record.score)

    def clear(self) -> None:
        self._scores.clear()

    def scores(self) -> np.ndarray:
        return np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))

    def __len__(self) -> int:
        return len(self._scores)


class DriftGate:
    """Whether a drift verdict may start a retrain now: not while one runs, and not within
    ``cooldown_s`` of the last retrain (whatever started it) or the last trigger. ``clock``: monotonic s."""

    def __init__(self, cooldown_s: float) -> None:
        self.cooldown_s = float(cooldown_s)
        self.last_trigger: float | None = None
        self.last_retrain_end: float | None = None
        # Started minus ended, not a flag: the scheduler hears a fast run's end before its start (two threads),
        # and a flag set last would block drift triggers until the next retrain long enough to clear it.
        self._running = 0

    @property
    def retrain_running(self) -> bool:
        return self._running > 0

    def blocked(self, now: float) -> str | None:
        """Why a trigger is not allowed at ``now``, or None when it is."""
        if self.retrain_running:
            return "a retrain is running"
        for what, at in (("drift trigger", self.last_trigger), ("retrain", self.last_retrain_end)):
            if at is not None and now - at < self.cooldown_s:
                return f"cooldown: last {what} {now - at:.0f} s ago (drift.cooldown_s = {self.cooldown_s:g})"
        return None

    def triggered(self, now: float) -> None:
        self.last_trigger = now

    def retrain_started(self) -> None:
        self._running += 1

    def retrain_finished(self, now: float) -> None:
        """A retrain ran (whatever its outcome): the cooldown starts at ``now``."""
        self._running -= 1
        self.last_retrain_end = now

    def retrain_missed(self) -> None:
        """A started run was missed (past its misfire grace): it ends without running, so no cooldown."""
        self._running -= 1
