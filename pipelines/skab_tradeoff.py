"""SKAB: how far post-processing alone moves F1 / FAR / MAR, without retraining.

    python -m pipelines.skab_tradeoff [--runs default,seed1,seed2,standard,w5,w20,w60,...] [--data-dir DIR] [--cache DIR]
        [--json OUT] [--threads 1]

For each named run (``RUNS``: overrides of ``PROFILES["skab"]``, with all eight sensors unless the run names
``data.sensors``) the SKAB protocol runs once, as
``anomaly.protocols.run_skab`` does: a detector fitted on the first ``train_rows`` of each file scores all
its rows; the test part's row scores, labels, the validation scores and the threshold are kept, pickled in
``--cache`` (a rerun reuses them instead of retraining). Then a post-hoc sweep over global, causal choices:

- trailing smoothing of the row scores (past rows only; the same smoothing is applied to the validation
  scores the threshold is fitted on): ``SMOOTH``;
- the threshold: a base from the validation scores (``BASES``: quantile, max, mean + p·std) × a global
  scale (``SCALES``);
- an alarm after ``k`` consecutive crossings (``KS``), held for ``hold`` rows after an alarm row (``HOLDS``).

Sweep counts are vectorised; every reported figure is recomputed with
``anomaly.evaluation.skab_binary_metrics``. For each run it prints the protocol as is and three picks (best
F1 with FAR <= 13.55, lowest FAR with MAR <= 28.02, best F1 overall), and how many settings reach the
target (Conv-AE's published row, F1 >= 0.79, FAR <= 13.55, MAR <= 28.02). The Pareto front (FAR, MAR)
goes to ``<cache>/pareto_<run>.csv``.

Each run is also scored with a causal threshold that adapts to the file's own recent scores
(``adaptive_crossings``, the ``ADAPTIVE`` settings), and the rule's choice is checked by fault group
(``group_holdout``): the threshold scale, trailing rows, factor and lag (``ADAPTIVE_GRID``) chosen on two of
SKAB's three groups (valve1, valve2, other), scored on the third.

The adaptive rule again with score history before the test part (``warm_rows``: a worker already running
when the fault comes), and a rule with no warm-up at all (alarm episodes, ``anomaly.episodes``: an alarm
lasts while its scores stay above the episode's own level / drop, and the level the rig then settles at
sets the next bar), over ``EPISODE_GRID``.

And a bound (``oracle_bounds``): the best that per-file thresholds could do with the run's scores, each
file's threshold read off its labels (an exact knapsack over the files' (false alarm, miss) options): the
lowest FAR with MAR <= 14.13 and the lowest MAR with FAR <= 2.56, the leaderboard's best MAR and FAR
(``EVERY_ENTRY``), which beating every entry with FAR and MAR no worse than each would need at once.

Beside the causal sweep, an offline one (``extent_grid``): the crossings' runs read as anomaly intervals
whose ends are trimmed (``extent``), as SKAB's own Conv-AE and LSTM-AE notebooks do. It needs each run's
end, so it is not what a stream sees at the moment; it is how the leaderboard's autoencoders were scored.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from anomaly import evaluation
from anomaly.adaptive import PARAM_KEYS as ADAPTIVE_KEYS
from anomaly.adaptive import AdaptiveRule, adaptive_flags
from anomaly.episodes import PARAM_KEYS as EPISODE_KEYS
from anomaly.episodes import EpisodeRule, episode_flags
from anomaly.cli import default_data_dir, non_negative_int
from anomaly.protocols import PROFILES, SKAB_PROFILE_SENSORS

log = logging.getLogger("skab_tradeoff")

RUNS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "seed1": {"training": {"seed": 1}},
    "seed2": {"training": {"seed": 2}},
    "standard": {"data": {"scaler": "standard"}},
    "w5": {"model": {"window_size": 5}},
    "w20": {"model": {"window_size": 20}},
    "w60": {"model": {"window_size": 60}},
    "w60-seed1": {"model": {"window_size": 60}, "training": {"seed": 1}},
    "w60-seed2": {"model": {"window_size": 60}, "training": {"seed": 2}},
    "six": {"data": {"sensors": list(SKAB_PROFILE_SENSORS)}},
    "six-seed1": {"data": {"sensors": list(SKAB_PROFILE_SENSORS)}, "training": {"seed": 1}},
    "six-seed2": {"data": {"sensors": list(SKAB_PROFILE_SENSORS)}, "training": {"seed": 2}},
}
TARGET = {"f1": 0.79, "far": 13.55, "mar": 28.02}  # Conv-AE on SKAB's leaderboard (F1 0.78 -> beat it)

SMOOTH: list[tuple[str, int]] = [("none", 1), ("mean", 3), ("mean", 5), ("mean", 10), ("mean", 20), ("median", 5),
                                 ("median", 10), ("median", 20)]
BASES: list[tuple[str, float | None]] = [("q", 0.9), ("q", 0.95), ("q", 0.99), ("max", None), ("mstd", 3.0)]
SCALES: np.ndarray = np.round(np.exp(np.linspace(np.log(0.7), np.log(6.0), 70)), 4)
KS: list[int] = [1, 2, 3, 5, 10]
HOLDS: list[int] = [0, 5, 10, 20, 50]

COLUMNS = ["smooth", "base", "scale", "k", "hold", "f1", "far", "mar"]

# The offline extent grid (``extent_grid``): threshold base x scale x end trim (in windows: 0, 1 and 2
# window lengths; 1 is the window geometry, see ``extent``).
EXTENT_BASES: list[tuple[str, float | None]] = [("q", 0.95), ("q", 0.99), ("mstd", 3.0)]
EXTENT_SCALES: list[float] = [1.0, 1.25, 1.5, 1.75, 2.0]
EXTENT_TRIMS: list[str] = ["0", "W-1", "2W"]

# A threshold that adapts to the file's own recent scores (``adaptive_crossings``; README "A threshold
# that adapts"): (scale, rows, factor, quantile, lag), ``scale`` x the validation q0.95 being the fitted
# threshold under it. Picked from small grids on SKAB's test rows, after looking: the first is the SKAB
# profile's rule, the second the best of a search over lag and scale too, whose bar starts acting where
# SKAB's faults end (README "What the adaptive rule's SKAB figures rest on"; not shipped).
ADAPTIVE: list[tuple[float, int, float, float, int]] = [(1.25, 480, 4.0, 0.5, 30), (1.5, 480, 4.0, 0.5, 90)]
# Score history before the test part given to the adaptive rule (``warm_rows``): 0 is the protocol (the rule
# starts with the test part, as a worker does after a deploy); more is a worker that was already running.
WARM: list[int] = [0, 200, 400]
# The group hold-out's choices: scale x trailing rows x factor x lag (median throughout).
ADAPTIVE_GRID: list[tuple[float, int, float, int]] = list(itertools.product(
    [1.0, 1.25, 1.5, 2.0], [240, 480, 960], [2.0, 3.0, 4.0, 6.0], [30, 60, 90, 120]))
# Alarm episodes (``anomaly.episodes``): an alarm that ends when its fault clears, whatever the time since
# the deploy: (scale of the validation q0.95, drop, settle, k), chosen from this grid on SKAB's test rows.
EPISODE_GRID: list[tuple[float, float, float, int]] = list(itertools.product(
    [1.5, 2.0, 2.5], [1.5, 2.0, 3.0], [1.5, 2.0, 3.0], [15, 30, 60]))
# The leaderboard's best FAR and best MAR (Isolation forest's 2.56 %, MSET's 14.13 %): beating every entry
# on F1 with FAR and MAR no worse than each one's means both at once (``oracle_bounds``).
EVERY_ENTRY = {"far": 2.56, "mar": 14.13}


# --- post-processing (pure) -------------------------------------------------------------------------

def smooth(x: np.ndarray, how: str, m: int) -> np.ndarray:
    """Trailing rolling ``mean`` or ``median`` over the last ``m`` rows (fewer at the start); ``m == 1``: ``x``."""
    if m == 1:
        return x
    r = pd.Series(x).rolling(m, min_periods=1)
    return (r.mean() if how == "mean" else r.median()).to_numpy()


def base_thr(val: np.ndarray, kind: str, p: float | None) -> float:
    """Threshold base from validation scores: ``q`` (quantile ``p``), ``max``, or ``mstd`` (mean + p·std)."""
    if kind == "q":
        return float(np.quantile(val, p))
    if kind == "max":
        return float(val.max())
    return float(val.mean() + p * val.std())


def _trailing_count(x: np.ndarray, n: int) -> np.ndarray:
    """Number of True in the last ``n`` entries (the current one included) along the last axis."""
    t = x.shape[-1]
    c = np.cumsum(x, axis=-1, dtype=np.int32)
    c = np.concatenate([np.zeros(x.shape[:-1] + (1,), np.int32), c], axis=-1)  # c[..., j] = sum of x[..., :j]
    lo = np.maximum(np.arange(t) + 1 - n, 0)
    return c[..., 1:] - c[..., lo]


def post(x: np.ndarray, k: int, h: int) -> np.ndarray:
    """Crossings (..., T) bool -> alarms: a row alarms after ``k`` consecutive crossings ending at it, and
    stays alarmed ``h`` rows after an alarm row. Causal; vectorised along the last axis."""
    x = np.asarray(x, bool)
    if k > 1:
        x = _trailing_count(x, k) >= k
    if h > 0:
        x = _trailing_count(x, h + 1) > 0
    return x


def extent(x: np.ndarray, trim: int, k: int = 1) -> np.ndarray:
    """Crossings (T,) bool -> the rows inside the anomaly intervals an offline reader of the events would
    mark: each run of at least ``k`` consecutive crossings becomes an interval from its first row to its
    last row minus ``trim`` rows; a run of ``trim`` rows or fewer marks nothing.

    NOT causal: a row's mark depends on where its run ends, up to a run's length later. It is what
    SKAB's own autoencoder notebooks do (Conv-AE, LSTM-AE: row i is anomalous when the W-1 windows
    starting before it all cross, i.e. a run of window crossings trimmed by W-2 rows at its end). Why a
    trim: the window ending at row t covers rows t-W+1..t, so after an anomaly ends its windows keep
    crossing for up to W-1 rows; ``trim = W-1`` undoes that geometry, a larger trim also the model's
    slower return to normal errors."""
    x = np.asarray(x, bool)
    if trim < 0 or k < 1:
        raise ValueError("trim >= 0 and k >= 1 are required")
    out = np.zeros(len(x), bool)
    for start, stop in zip(*(ends.tolist() for ends in evaluation.true_runs(x))):
        if stop - start >= k:  # stop: one past the run's last row
            out[start:max(start, stop - trim)] = True
    return out


def adaptive_crossings(scores: np.ndarray, base: float, rows: int, factor: float, quantile: float,
                       lag: int) -> np.ndarray:
    """Rows whose score exceeds both ``base`` and ``factor`` x the ``quantile`` of the ``rows`` scores
    that end ``lag + 1`` rows before it (no adaptive part until that many rows exist): the shipped rule,
    ``anomaly.adaptive.adaptive_flags`` at stride 1 (a row per window), as ``[threshold] adaptive_*``
    configures it. Causal. After a long stretch of raised scores (a rig that stays changed after a
    fault) the bar rises with them."""
    return adaptive_flags(scores, base, AdaptiveRule(rows, factor, quantile, lag))


def rescaled(threshold: float, scale: float, fitted_scale: float) -> float:
    """A file's threshold at ``scale`` x its validation quantile, from the one fitted at ``fitted_scale`` x it
    (the run's ``threshold.scale``); ``scale == fitted_scale`` gives the fitted value itself."""
    return threshold if scale == fitted_scale else threshold * scale / fitted_scale


def adaptive_rows(files: Sequence[Mapping[str, Any]], fitted_scale: float = 1.0,
                  settings: Sequence[tuple[float, int, float, float, int]] = ADAPTIVE) -> list[dict[str, Any]]:
    """SKAB figures of ``adaptive_crossings`` for each ``settings`` entry (``ADAPTIVE``), on each file's own
    threshold rescaled to the entry's scale (``rescaled``; the files' thresholds were fitted at
    ``fitted_scale``)."""
    labels = [f["labels"] for f in files]
    out = []
    for scale, rows, factor, quantile, lag in settings:
        flags = [adaptive_crossings(f["scores"], rescaled(f["threshold"], scale, fitted_scale), rows, factor, quantile,
                                    lag) for f in files]
        m = evaluation.skab_binary_metrics(labels, flags)
        out.append({"scale": scale, "rows": rows, "factor": factor, "quantile": quantile, "lag": lag,
                    "f1": m.f1, "far": m.far, "mar": m.mar})
    return out


def with_history(f: Mapping[str, Any], history: int) -> tuple[np.ndarray, int]:
    """A file's test-part scores with the scores of its last ``history`` training rows (``pre_scores``)
    first, and how many were put first (fewer where the file has fewer)."""
    pre = np.asarray(f["pre_scores"], dtype=np.float64)
    pre = pre[len(pre) - min(history, len(pre)):]
    return np.r_[pre, np.asarray(f["scores"], dtype=np.float64)], len(pre)


def warm_rows(files: Sequence[Mapping[str, Any]], fitted_scale: float = 1.0,
              settings: Sequence[tuple[float, int, float, float, int]] = ADAPTIVE,
              warm: Sequence[int] = WARM) -> list[dict[str, Any]]:
    """SKAB figures of each ``settings`` rule when its history starts ``h`` rows before the test part (for
    each ``h`` in ``warm``): the scores of the file's last ``h`` training rows (``pre_scores``) come first,
    the flags of the test part are scored. ``h = 0`` is ``adaptive_rows``. With no history the bar acts
    from test row ``lag + rows + 1``; with ``h`` rows, ``h`` rows sooner."""
    labels = [f["labels"] for f in files]
    out = []
    for scale, rows, factor, quantile, lag in settings:
        for h in warm:
            flags = []
            for f in files:
                both, first = with_history(f, h)
                flags.append(adaptive_crossings(both, rescaled(f["threshold"], scale, fitted_scale), rows, factor,
                                                quantile, lag)[first:])
            m = evaluation.skab_binary_metrics(labels, flags)
            out.append({"scale": scale, "rows": rows, "factor": factor, "quantile": quantile, "lag": lag,
                        "history": h, "f1": m.f1, "far": m.far, "mar": m.mar})
    return out


def episode_grid(files: Sequence[Mapping[str, Any]], fitted_scale: float = 1.0,
                 grid: Sequence[tuple[float, float, float, int]] = EPISODE_GRID) -> pd.DataFrame:
    """SKAB figures of alarm episodes (``anomaly.episodes``, ``[threshold] episode_*``) for every ``grid``
    setting (scale, drop, settle, k), the base being each file's threshold rescaled to ``scale`` x its
    validation quantile; one row per setting."""
    labels = [f["labels"] for f in files]
    rows = []
    for setting in grid:
        scale, drop, settle, k = setting
        flags = [rule_flags("episodes", f["scores"], rescaled(f["threshold"], scale, fitted_scale), setting,
                            f["window"]) for f in files]
        m = evaluation.skab_binary_metrics(labels, flags)
        rows.append({"scale": scale, "drop": drop, "settle": settle, "k": k, "f1": m.f1, "far": m.far, "mar": m.mar})
    return pd.DataFrame(rows)


def episode_warm(files: Sequence[Mapping[str, Any]], setting: Mapping[str, Any], fitted_scale: float = 1.0,
                 history: int = 400) -> dict[str, float]:
    """One episode setting run from ``history`` rows before the test part (``pre_scores``), the test part
    scored: a rule with no warm-up should barely move."""
    chosen = (float(setting["scale"]), float(setting["drop"]), float(setting["settle"]), int(setting["k"]))
    flags = []
    for f in files:
        both, first = with_history(f, history)
        flags.append(rule_flags("episodes", both, rescaled(f["threshold"], chosen[0], fitted_scale), chosen,
                                f["window"])[first:])
    m = evaluation.skab_binary_metrics([f["labels"] for f in files], flags)
    return {"history": history, "f1": m.f1, "far": m.far, "mar": m.mar}


def episodes_summary(files: Sequence[Mapping[str, Any]], fitted_scale: float = 1.0) -> dict[str, Any]:
    """``episode_grid``'s picks (best F1; best F1 with FAR <= Conv-AE's) and the best-F1 setting's warm start."""
    df = episode_grid(files, fitted_scale).sort_values("f1", ascending=False)
    picks_ = []
    for label, d in (("episodes, best F1", df), (f"episodes, FAR<={TARGET['far']}", df[df.far <= TARGET["far"]])):
        picks_.append({"label": label, **(d.iloc[0].to_dict() if len(d) else {})})
    return {"settings": len(df), "picks": picks_, "warm": episode_warm(files, df.iloc[0], fitted_scale)}


def fault_ends(files: Sequence[Mapping[str, Any]]) -> list[int]:
    """Each file's last labelled row, counted from the first test row as 1 (files without a label: left out)."""
    return [int(np.flatnonzero(np.asarray(f["labels"], bool))[-1]) + 1 for f in files if np.any(f["labels"])]


def skab_group(name: str) -> str:
    """A SKAB file's fault group: the folder of ``valve1/3.csv`` (``other`` for ``other/...``)."""
    return name.replace("\\", "/").split("/")[0]


# What each kind of rule's settings are called (the order of a grid entry) and how a file is flagged.
HOLDOUT_KINDS: dict[str, tuple[str, ...]] = {"adaptive": ("scale", "rows", "factor", "lag"),
                                             "episodes": ("scale", "drop", "settle", "k")}


def rule_flags(kind: str, scores: np.ndarray, base: float, setting: tuple, window_size: int) -> np.ndarray:
    """One file's flags under a ``HOLDOUT_KINDS`` rule at ``setting`` (named as there; its scale is already
    in ``base``); ``scores``: one per row, each its window's (``window_size`` rows) ending there."""
    if kind == "adaptive":
        _, rows, factor, lag = setting
        return adaptive_crossings(scores, base, rows, factor, 0.5, lag)
    _, drop, settle, k = setting
    return episode_flags(scores, base, EpisodeRule(drop, settle, k), window_size=window_size)


def group_holdout(files: Sequence[Mapping[str, Any]], grid: Sequence[tuple] = ADAPTIVE_GRID,
                  target: Mapping[str, float] = TARGET, fitted_scale: float = 1.0,
                  kind: str = "adaptive") -> dict[str, Any]:
    """Leave one fault group out: on the other groups' files choose the ``grid`` setting with the best F1
    among those inside ``target``'s FAR and MAR (the best F1 of all when none is), score it on the
    held-out group's files. ``kind``: the rule the grid sets (``HOLDOUT_KINDS``): the adaptive bar
    (scale, rows, factor, lag; the median throughout) or alarm episodes (scale, drop, settle, k); scale is
    a multiple of each file's validation quantile, its threshold having been fitted at ``fitted_scale``.
    ``folds``: one per group, with the choice (its named settings), its figures where chosen and where
    held out; ``pooled``: every file flagged by the rule chosen without it (F1 / FAR / MAR)."""
    names = HOLDOUT_KINDS[kind]
    cache: dict[tuple[int, tuple], np.ndarray] = {}

    def flags(i: int, setting: tuple) -> np.ndarray:
        if (i, setting) not in cache:
            base = rescaled(files[i]["threshold"], setting[0], fitted_scale)
            cache[(i, setting)] = rule_flags(kind, files[i]["scores"], base, setting, files[i]["window"])
        return cache[(i, setting)]

    def metrics(idx: Sequence[int], setting: tuple) -> evaluation.BinaryMetrics:
        return evaluation.skab_binary_metrics([files[i]["labels"] for i in idx], [flags(i, setting) for i in idx])

    groups = sorted({skab_group(f["name"]) for f in files})
    folds, pooled_flags, pooled_labels = [], [], []
    for group in groups:
        held = [i for i, f in enumerate(files) if skab_group(f["name"]) == group]
        rest = [i for i, f in enumerate(files) if skab_group(f["name"]) != group]
        scored = [(tuple(setting), metrics(rest, tuple(setting))) for setting in grid]
        inside = [x for x in scored if x[1].far <= target["far"] and x[1].mar <= target["mar"]]
        setting, chosen = max(inside or scored, key=lambda x: x[1].f1)
        out = metrics(held, setting)
        folds.append({"held_out": group, "files": len(held), **dict(zip(names, setting)),
                      "chosen_on": {"f1": chosen.f1, "far": chosen.far, "mar": chosen.mar},
                      "held_out_figures": {"f1": out.f1, "far": out.far, "mar": out.mar}})
        pooled_flags += [flags(i, setting) for i in held]
        pooled_labels += [files[i]["labels"] for i in held]
    pooled = evaluation.skab_binary_metrics(pooled_labels, pooled_flags)
    return {"kind": kind, "folds": folds, "pooled": {"f1": pooled.f1, "far": pooled.far, "mar": pooled.mar}}


# --- what the best per-file thresholds could do (an oracle, read off the labels) ---------------------

def threshold_options(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every threshold one file could have, as (false alarms, missed rows) pairs: flag the rows scoring
    above it (NaN: never), from flagging none to flagging all scored rows; tied scores go together."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, bool)
    scored = np.isfinite(s)
    if not scored.any():  # nothing can be flagged: the one option is to flag nothing
        return np.zeros(1, dtype=np.int64), np.array([int(y.sum())], dtype=np.int64)
    order = np.argsort(-s[scored], kind="stable")
    ranked, hits = s[scored][order], y[scored][order]
    last = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # the last row of each run of equal scores
    fp = np.r_[0, np.cumsum(~hits)[last]]
    fn = int(y.sum()) - np.r_[0, np.cumsum(hits)[last]]
    return fp.astype(np.int64), fn.astype(np.int64)


def fewest(options: Sequence[tuple[np.ndarray, np.ndarray]], budget: int) -> int | None:
    """The smallest total of the first counts over one option per file, with the second counts summing to
    at most ``budget`` (exact: a knapsack over the budget); None when no choice fits."""
    big = np.iinfo(np.int64).max // 4
    best = np.full(budget + 1, big, np.int64)  # best[b]: fewest first counts with second counts summing to b
    best[0] = 0
    for first, second in options:
        nxt = np.full_like(best, big)
        for a, b in zip(first.tolist(), second.tolist()):
            if b <= budget:
                np.minimum(nxt[b:], best[:budget + 1 - b] + a, out=nxt[b:])
        best = nxt
    low = int(best.min())
    return None if low >= big else low


def oracle_bounds(files: Sequence[Mapping[str, Any]], corner: Mapping[str, float] = EVERY_ENTRY,
                  mars: Sequence[float] = (10.0, 20.0, 25.0, 30.0)) -> dict[str, Any]:
    """What thresholds alone could do with these scores, each file's threshold chosen on its labels
    (``threshold_options``, ``fewest``): the lowest FAR with MAR <= ``corner["mar"]`` (and at each of
    ``mars``), and the lowest MAR with FAR <= ``corner["far"]``. Not a detector; a bound on every
    per-file threshold, the fitted ones included."""
    options = [threshold_options(f["scores"], f["labels"]) for f in files]
    pos = int(sum(np.asarray(f["labels"], bool).sum() for f in files))
    neg = int(sum((~np.asarray(f["labels"], bool)).sum() for f in files))
    swapped = [(fn, fp) for fp, fn in options]

    def far_at(mar: float) -> float | None:
        fp = fewest(options, int(np.floor(mar / 100 * pos + 1e-9)))
        return None if fp is None else 100.0 * fp / neg

    fn = fewest(swapped, int(np.floor(corner["far"] / 100 * neg + 1e-9)))
    return {"corner": dict(corner), "far_at_corner_mar": far_at(corner["mar"]),
            "mar_at_corner_far": None if fn is None else 100.0 * fn / pos,
            "far_at": {str(m): far_at(m) for m in mars}}


def trim_rows(label: str, window: int) -> int:
    """An ``EXTENT_TRIMS`` label in rows for windows of ``window`` rows."""
    return {"0": 0, "W-1": window - 1, "2W": 2 * window}[label]


def extent_grid(files: Sequence[Mapping[str, Any]], window: int) -> pd.DataFrame:
    """SKAB figures of ``extent`` over ``EXTENT_BASES`` x ``EXTENT_SCALES`` x ``EXTENT_TRIMS`` (k = 1), through
    ``evaluation.skab_binary_metrics``; one row per setting: base, scale, trim (label), trim_rows, f1, far, mar."""
    labels = [f["labels"] for f in files]
    rows = []
    for (kind, p), scale in itertools.product(EXTENT_BASES, EXTENT_SCALES):
        crossings = [np.nan_to_num(f["scores"], nan=-np.inf) > base_thr(f["val"], kind, p) * scale for f in files]
        for trim in EXTENT_TRIMS:
            n = trim_rows(trim, window)
            m = evaluation.skab_binary_metrics(labels, [extent(c, n) for c in crossings])
            rows.append({"base": base_label(kind, p), "scale": scale, "trim": trim, "trim_rows": n,
                         "f1": m.f1, "far": m.far, "mar": m.mar})
    return pd.DataFrame(rows)


def post_loop(x: np.ndarray, k: int, h: int) -> np.ndarray:
    """``post`` for one series, written as the plain loop (the reference ``post`` is checked against)."""
    out = np.zeros(len(x), bool)
    run, last = 0, -10**9
    for t, v in enumerate(x):
        run = run + 1 if v else 0
        if run >= k:
            last = t
        out[t] = (t - last) <= h
    return out


def smooth_label(how: str, m: int) -> str:
    return f"{how}{m}" if m > 1 else "none"


def base_label(kind: str, p: float | None) -> str:
    return f"{kind}{p}" if p is not None else kind


def parse_smooth(label: str) -> tuple[str, int]:
    """Inverse of ``smooth_label``: ``"none"`` -> ``("none", 1)``, ``"median10"`` -> ``("median", 10)``."""
    if label == "none":
        return "none", 1
    how, m = re.fullmatch(r"([a-z]+?)(\d+)", label).groups()
    return how, int(m)


def parse_base(label: str) -> tuple[str, float | None]:
    """Inverse of ``base_label``: ``"max"``, ``"q0.95"`` -> ``("q", 0.95)``, ``"mstd3.0"`` -> ``("mstd", 3.0)``."""
    if label == "max":
        return "max", None
    kind = "mstd" if label.startswith("mstd") else "q"
    return kind, float(label[len(kind):])


def _ratio(num: np.ndarray, den: np.ndarray, factor: float = 1) -> np.ndarray:
    """``factor * num / den`` element-wise, 0.0 where ``den`` is 0 (as ``skab_binary_metrics``)."""
    return np.divide(factor * num, den, out=np.zeros(np.shape(den)), where=den != 0)


def sweep(files: Sequence[Mapping[str, Any]], smooths: Sequence[tuple[str, int]] = SMOOTH,
          bases: Sequence[tuple[str, float | None]] = BASES, scales: np.ndarray = SCALES,
          ks: Sequence[int] = KS, holds: Sequence[int] = HOLDS) -> pd.DataFrame:
    """F1 / FAR / MAR (counts summed over files) of every setting; one row per setting, ``COLUMNS``.

    ``files``: mappings with ``scores`` (test rows, NaN = no score yet, taken as 0), ``labels`` (bool) and
    ``val`` (validation scores). Rows come in the order smoothing x base, then k x hold, then scale.
    """
    scales = np.asarray(scales, dtype=np.float64)
    rows: list[dict[str, Any]] = []
    for (how, m), (kind, p) in itertools.product(smooths, bases):
        prepared = []
        for f in files:
            sc = smooth(np.nan_to_num(f["scores"], nan=0.0), how, m)
            thr = base_thr(smooth(f["val"], how, m), kind, p)
            prepared.append((sc[None, :] > (thr * scales)[:, None], np.asarray(f["labels"], bool)))
        for k, h in itertools.product(ks, holds):
            tp = fp = fn = tn = 0
            for cross, y in prepared:
                a = post(cross, k, h)
                tp = tp + (a & y).sum(1)
                fp = fp + (a & ~y).sum(1)
                fn = fn + (~a & y).sum(1)
                tn = tn + (~a & ~y).sum(1)
            f1 = _ratio(tp, tp + (fn + fp) / 2)
            far = _ratio(fp, fp + tn, 100)
            mar = _ratio(fn, fn + tp, 100)
            for i, s in enumerate(scales):
                rows.append({"smooth": smooth_label(how, m), "base": base_label(kind, p), "scale": float(s), "k": k,
                             "hold": h, "f1": f1[i], "far": far[i], "mar": mar[i]})
    return pd.DataFrame(rows, columns=COLUMNS)


def flags_for(files: Sequence[Mapping[str, Any]], setting: Mapping[str, Any]) -> list[np.ndarray]:
    """Each file's alarms under one setting (a sweep row), through the loop version of ``post``."""
    how, m = parse_smooth(setting["smooth"])
    kind, p = parse_base(setting["base"])
    out = []
    for f in files:
        sc = smooth(np.nan_to_num(f["scores"], nan=0.0), how, m)
        thr = base_thr(smooth(f["val"], how, m), kind, p) * setting["scale"]
        out.append(post_loop(sc > thr, int(setting["k"]), int(setting["hold"])))
    return out


def exact(files: Sequence[Mapping[str, Any]], setting: Mapping[str, Any]) -> evaluation.BinaryMetrics:
    """Figures of one setting through the project's metric function."""
    return evaluation.skab_binary_metrics([f["labels"] for f in files], flags_for(files, setting))


def pareto(df: pd.DataFrame) -> pd.DataFrame:
    """The rows no other row beats on both FAR and MAR (lower is better), by FAR; ties kept once."""
    d = df.sort_values(["far", "mar"]).reset_index(drop=True)
    keep, best = [], np.inf
    for i, mar in enumerate(d["mar"].to_numpy()):
        if mar < best - 1e-9:
            keep.append(i)
            best = mar
    return d.loc[keep]


def reaching_target(df: pd.DataFrame, target: Mapping[str, float] = TARGET) -> int:
    """How many settings reach ``F1 >= target, FAR <= target, MAR <= target``."""
    return int(((df.f1 >= target["f1"]) & (df.far <= target["far"]) & (df.mar <= target["mar"])).sum())


def pick_rows(df: pd.DataFrame, target: Mapping[str, float] = TARGET) -> dict[str, pd.Series | None]:
    """The settings reported: best F1 with FAR <= target, lowest FAR with MAR <= target, best F1 overall
    (None where no setting qualifies)."""
    def first(d: pd.DataFrame) -> pd.Series | None:
        return d.iloc[0] if len(d) else None

    return {f"best F1, FAR<={target['far']}": first(df[df.far <= target["far"]].sort_values("f1", ascending=False)),
            f"best FAR, MAR<={target['mar']}": first(df[df.mar <= target["mar"]].sort_values("far")),
            "best F1 overall": first(df.sort_values("f1", ascending=False))}


def picks(files: Sequence[Mapping[str, Any]], df: pd.DataFrame,
          target: Mapping[str, float] = TARGET) -> list[dict[str, Any]]:
    """``pick_rows`` with exact figures: label, setting, counts, f1, far, mar (setting None where none)."""
    out = []
    for label, r in pick_rows(df, target).items():
        if r is None:
            out.append({"label": label, "setting": None})
            continue
        e = exact(files, r)
        if abs(e.f1 - r.f1) > 1e-9 or abs(e.far - r.far) > 1e-9 or abs(e.mar - r.mar) > 1e-9:
            log.warning("%s: sweep figures %s differ from the exact ones %s", label, r.to_dict(), e)
        out.append({"label": label, "setting": {"smooth": r.smooth, "base": r.base, "scale": float(r.scale),
                                                 "k": int(r.k), "hold": int(r.hold)}, **e.to_dict()})
    return out


# --- the protocol runs (training, cache) ------------------------------------------------------------

def run_config(overrides: Mapping[str, Mapping[str, Any]], threads: int) -> dict[str, dict[str, Any]]:
    """``PROFILES["skab"]`` with each section updated by ``overrides``; ``training.cpu_threads = threads``.
    The profile's moving bar (adaptive or episodes) is left out: this job studies what post-processing does
    to the fixed threshold's crossings, and scores those rules on its own (``ADAPTIVE``, ``EPISODE_GRID``).
    Every run uses all eight sensors unless it names ``data.sensors`` (the ``six`` runs: the profile's own
    choice), so the runs measured before the profile dropped the thermal sensors still reproduce."""
    raw = copy.deepcopy(PROFILES["skab"])
    raw.get("data", {}).pop("sensors", None)
    for key in (*ADAPTIVE_KEYS, *EPISODE_KEYS):
        raw.get("threshold", {}).pop(key, None)
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    raw.setdefault("training", {})["cpu_threads"] = threads
    return raw


def protocol_run(name: str, raw: dict[str, dict[str, Any]], series: Sequence[Any]) -> dict[str, Any]:
    """One SKAB protocol run with the settings ``raw`` (``protocols.score_series`` per file), keeping per file
    the test part's row scores and labels, the validation scores, the threshold and the best epoch;
    ``metrics``: the protocol's own flags."""
    from anomaly.config import build_settings
    from anomaly.protocols import score_series

    settings = build_settings(raw)
    started = time.perf_counter()
    files = []
    for i, s in enumerate(series, 1):
        log.info("%s: %d/%d %s", name, i, len(series), s.name)
        r = score_series(s, settings, score_from=0)  # every row; the test part is split off below
        t = s.train_rows
        files.append({"name": s.name, "scores": r.scores[t:], "labels": r.labels[t:], "pre_scores": r.scores[:t],
                      "val": r.validation_scores, "threshold": r.threshold, "best_epoch": r.best_epoch,
                      "window": settings.model.window_size})
    seconds = time.perf_counter() - started
    flags = [np.nan_to_num(f["scores"], nan=-np.inf) > f["threshold"] for f in files]
    m = evaluation.skab_binary_metrics([f["labels"] for f in files], flags)
    return {"name": name, "raw": raw, "files": files, "seconds": seconds, "metrics": m.to_dict()}


def _same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal settings, the training thread count aside (it does not change what is learnt)."""
    def strip(raw: Mapping[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(dict(raw))
        raw.get("training", {}).pop("cpu_threads", None)
        return raw

    return strip(a) == strip(b)


def load_or_run(name: str, raw: dict[str, dict[str, Any]], cache: Path,
                load_series: Callable[[], Sequence[Any]], data_dir: Path | None = None) -> dict[str, Any]:
    """The cached run ``<cache>/<name>.pkl`` when it was made with the same settings, from the same data
    folder and code (``tracking.code_fingerprint``: a commit and any uncommitted changes), else a fresh one (cached)."""
    from anomaly import tracking

    origin = {"data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
              "code": tracking.code_fingerprint()}
    path = cache / f"{name}.pkl"
    if path.exists():
        with path.open("rb") as fh:
            data = pickle.load(fh)
        if _same_config(data.get("raw", {}), raw) and all("pre_scores" in f and "window" in f for f in data["files"]) \
                and data.get("origin") == origin:
            log.info("%s: cached run %s (%.0f s of training)", name, path, data["seconds"])
            return data
        log.info("%s: %s was made with other settings, data or code (%s), or an older format; retraining", name,
                 path, data.get("origin"))
    data = {**protocol_run(name, raw, load_series()), "origin": origin}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pkl.tmp")
    with tmp.open("wb") as fh:
        pickle.dump(data, fh)
    os.replace(tmp, path)
    log.info("%s: protocol run %.0f s, F1 %.4f FAR %.2f MAR %.2f -> %s", name, data["seconds"], data["metrics"]["f1"],
             data["metrics"]["far"], data["metrics"]["mar"], path)
    return data


# --- report -----------------------------------------------------------------------------------------

def episode_label(setting: Mapping[str, Any]) -> str:
    """An episode setting for the report: ``x1.5, 60 rows <= level/3, settle x1.5``."""
    return (f"x{setting['scale']:g}, {int(setting['k'])} rows <= level/{setting['drop']:g}, "
            f"settle x{setting['settle']:g}")


def as_is_label(raw: Mapping[str, Mapping[str, Any]]) -> str:
    th = raw.get("threshold", {})
    if th.get("method") == "quantile":
        return f"as is (q{th.get('q')} x{th.get('scale', 1.0)})"
    return "as is"


def report(name: str, result: Mapping[str, Any]) -> str:
    """The run's lines: the protocol as is, the picks with exact figures, the settings reaching the target."""
    lines = [f"== {name}  (full protocol run {result['seconds']:.0f} s)"]
    m = result["as_is"]
    lines.append(f"  {result['as_is_label']:22s} {'':55s} F1 {m['f1']:.3f} FAR {m['far']:5.1f} MAR {m['mar']:5.1f}")
    for p in result["picks"]:
        s = p["setting"]
        if s is None:
            lines.append(f"  {p['label']:22s} no setting qualifies")
            continue
        shown = f"{s['smooth']} thr={s['base']}x{s['scale']} k={s['k']} hold={s['hold']}"
        lines.append(f"  {p['label']:22s} {shown:55s} F1 {p['f1']:.3f} FAR {p['far']:5.1f} MAR {p['mar']:5.1f}")
    lines.append(f"  {result['settings']} settings, {result['reaching_target']} reach the target "
                 f"(F1 >= {TARGET['f1']}, FAR <= {TARGET['far']}, MAR <= {TARGET['mar']})")
    ext = result.get("extent")
    if ext:
        lines.append(f"  offline extent (NOT causal; window {ext['window']}):")
        for p in ext["picks"]:
            if "f1" not in p:
                lines.append(f"  {p['label']:22s} no setting qualifies")
                continue
            shown = f"thr={p['base']}x{p['scale']} end trim={p['trim']} ({p['trim_rows']} rows)"
            lines.append(f"  {p['label']:22s} {shown:55s} F1 {p['f1']:.3f} FAR {p['far']:5.1f} MAR {p['mar']:5.1f}")
        lines.append(f"  {ext['settings']} extent settings, {ext['reaching_target']} reach the target")
    for a in result.get("adaptive", []):
        shown = (f"adaptive: > q0.95 x{a['scale']:g} and > {a['factor']:g} x q{a['quantile']:g} of {a['rows']} rows "
                 f"(lag {a['lag']})")
        lines.append(f"  {'causal, adaptive':22s} {shown:55s} F1 {a['f1']:.3f} FAR {a['far']:5.1f} MAR {a['mar']:5.1f}")
    ends = result.get("fault_ends")
    if ends:
        lines.append(f"  (a bar acts from test row lag + rows + 1; the faults end at test rows {min(ends)}-{max(ends)}, "
                     f"median {int(np.median(ends))})")
    for a in result.get("warm", []):
        shown = f"lag {a['lag']}, q0.95 x{a['scale']:g}, with {a['history']} rows of history before the test part"
        lines.append(f"  {'adaptive, warm start':22s} {shown:55s} F1 {a['f1']:.3f} FAR {a['far']:5.1f} MAR {a['mar']:5.1f}")
    for e in result.get("episodes", {}).get("picks", []):
        if "f1" not in e:
            lines.append(f"  {e['label']:22s} no setting qualifies")
            continue
        shown = f"episodes: > q0.95 {episode_label(e)}"
        lines.append(f"  {e['label']:22s} {shown:55s} F1 {e['f1']:.3f} FAR {e['far']:5.1f} MAR {e['mar']:5.1f}")
    warm_episode = result.get("episodes", {}).get("warm")
    if warm_episode:
        w = warm_episode
        shown = f"best F1 setting, {w['history']} rows of history first"
        lines.append(f"  {'episodes, warm start':22s} {shown:55s} "
                     f"F1 {w['f1']:.3f} FAR {w['far']:5.1f} MAR {w['mar']:5.1f}")
    for key, label in (("group_holdout", "adaptive, held out"), ("episode_holdout", "episodes, held out")):
        holdout = result.get(key)
        if not holdout:
            continue
        for fold in holdout["folds"]:
            h = fold["held_out_figures"]
            if holdout.get("kind", "adaptive") == "adaptive":
                chosen = f"x{fold['scale']:g}, {fold['rows']} rows x{fold['factor']:g}, lag {fold['lag']}"
            else:
                chosen = episode_label(fold)
            shown = f"{chosen}, without {fold['held_out']} ({fold['files']})"
            lines.append(f"  {label:22s} {shown:55s} F1 {h['f1']:.3f} FAR {h['far']:5.1f} MAR {h['mar']:5.1f}")
        p = holdout["pooled"]
        lines.append(f"  {label:22s} {'pooled over the three groups':55s} F1 {p['f1']:.3f} "
                     f"FAR {p['far']:5.1f} MAR {p['mar']:5.1f}")
    bounds = result.get("oracle_bounds")
    if bounds:
        c = bounds["corner"]

        def pct(v: float | None) -> str:
            return "none fits" if v is None else f"{v:.2f}"

        lines.append("  per-file oracle thresholds (read off the labels; a bound, not a detector):")
        lines.append(f"    lowest FAR with MAR <= {c['mar']}: {pct(bounds['far_at_corner_mar'])}; lowest MAR with "
                     f"FAR <= {c['far']}: {pct(bounds['mar_at_corner_far'])}")
        lines.append("    lowest FAR at MAR <= " + ", ".join(f"{m}: {pct(v)}" for m, v in bounds["far_at"].items()))
    return "\n".join(lines)


def run(names: Sequence[str], data_dir: Path, cache: Path, threads: int) -> dict[str, dict[str, Any]]:
    """Every named run: protocol (or cache), sweep, picks. ``{run: {seconds, as_is, as_is_label, picks,
    reaching_target, settings}}``; writes ``<cache>/pareto_<run>.csv``."""
    loaded: list[Any] = []

    def load_series() -> Sequence[Any]:
        if not loaded:
            from anomaly.datasets import load_skab

            loaded.extend(load_skab(data_dir))
        return loaded

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        data = load_or_run(name, run_config(RUNS[name], threads), cache, load_series, data_dir)
        t0 = time.perf_counter()
        df = sweep(data["files"])
        log.info("%s: swept %d settings in %.0f s", name, len(df), time.perf_counter() - t0)
        cache.mkdir(parents=True, exist_ok=True)
        pareto(df).to_csv(cache / f"pareto_{name}.csv", index=False)
        window = int(data["raw"]["model"]["window_size"])
        fitted = float(data["raw"].get("threshold", {}).get("scale", 1.0))
        ext = extent_grid(data["files"], window)
        out[name] = {"seconds": data["seconds"], "as_is": data["metrics"], "as_is_label": as_is_label(data["raw"]),
                     "picks": picks(data["files"], df), "reaching_target": reaching_target(df), "settings": len(df),
                     "extent": {"window": window, "settings": len(ext), "reaching_target": reaching_target(ext),
                                "picks": [{"label": label, **(r.to_dict() if r is not None else {"setting": None})}
                                          for label, r in pick_rows(ext).items()]},
                     "adaptive": adaptive_rows(data["files"], fitted), "fault_ends": fault_ends(data["files"]),
                     "warm": warm_rows(data["files"], fitted),
                     "group_holdout": group_holdout(data["files"], fitted_scale=fitted),
                     "oracle_bounds": oracle_bounds(data["files"]),
                     "episodes": episodes_summary(data["files"], fitted),
                     "episode_holdout": group_holdout(data["files"], EPISODE_GRID, fitted_scale=fitted, kind="episodes")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.skab_tradeoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated of {', '.join(RUNS)}")
    parser.add_argument("--data-dir", help="the SKAB folder (default $ANOMALY_DATASETS/skab or ../shared/datasets/skab)")
    parser.add_argument("--cache", default="results/skab_tradeoff",
                        help="where protocol runs are pickled (and reused) and the Pareto CSVs go")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--threads", type=non_negative_int, default=1, help="torch threads (training.cpu_threads); 0 = torch's own")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir("skab")
    results = run(names, data_dir, Path(args.cache), args.threads)
    for name, result in results.items():
        print(report(name, result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
