"""``pipelines.skab_tradeoff``'s pure parts on small hand-made arrays: no data set, no training."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from anomaly.evaluation import skab_binary_metrics
from pipelines.skab_tradeoff import (ADAPTIVE, EXTENT_TRIMS, adaptive_crossings, adaptive_rows, HOLDS, KS, base_label, exact, extent, extent_grid, flags_for, main, parse_base, parse_smooth, pareto,
                                     pick_rows, post, post_loop, reaching_target, smooth, smooth_label, sweep)


@pytest.mark.parametrize("shape", [(3, 200), (4, 3)])  # also series shorter than k
def test_post_equals_the_loop(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape) > 0.6
    for k, h in itertools.product([*KS, 4], [*HOLDS, 1]):
        got = post(x, k, h)
        assert got.shape == x.shape and got.dtype == bool
        for i in range(shape[0]):
            assert np.array_equal(got[i], post_loop(x[i], k, h)), (k, h, i)


def test_post_by_hand():
    x = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 0], bool)
    assert post(x[None], 3, 0)[0].astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    assert post(x[None], 3, 2)[0].astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert post(x[None], 1, 1)[0].astype(int).tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("how,m", [("mean", 3), ("mean", 20), ("median", 5), ("median", 10)])
def test_smooth_is_causal(how, m):
    rng = np.random.default_rng(1)
    x = rng.random(100)
    y = x.copy()
    y[60] += 100.0
    a, b = smooth(x, how, m), smooth(y, how, m)
    assert np.array_equal(a[:60], b[:60])
    assert a[60] != b[60]
    # trailing: the first rows use what exists so far
    assert a[0] == x[0] and a[1] == pytest.approx(np.mean(x[:2]) if how == "mean" else np.median(x[:2]))
    assert smooth(x, "none", 1) is x


def test_labels_round_trip():
    for how, m in [("none", 1), ("mean", 3), ("median", 20)]:
        assert parse_smooth(smooth_label(how, m)) == (how, m)
    for kind, p in [("q", 0.95), ("max", None), ("mstd", 3.0)]:
        assert parse_base(base_label(kind, p)) == (kind, p)


def _files() -> list[dict]:
    """Two files: normal rows score 0.1-0.3, anomalous rows 5-9; validation scores 0.1-1.0."""
    rng = np.random.default_rng(2)
    out = []
    for n, (a, b) in [(40, (15, 25)), (30, (5, 12))]:
        labels = np.zeros(n, bool)
        labels[a:b] = True
        scores = np.where(labels, rng.uniform(5, 9, n), rng.uniform(0.1, 0.3, n))
        scores[0] = np.nan  # no window yet
        out.append({"scores": scores, "labels": labels, "val": np.linspace(0.1, 1.0, 20)})
    return out


GRID = dict(smooths=[("none", 1), ("mean", 3)], bases=[("max", None), ("q", 0.5), ("mstd", 1.0)],
            scales=np.array([0.2, 1.0, 2.0]), ks=[1, 3], holds=[0, 4])


def test_sweep_finds_the_perfect_setting_and_matches_the_metric():
    files = _files()
    df = sweep(files, **GRID)
    assert list(df.columns) == ["smooth", "base", "scale", "k", "hold", "f1", "far", "mar"]
    assert len(df) == 2 * 3 * 3 * 2 * 2
    best = df.sort_values("f1", ascending=False).iloc[0]
    assert best.f1 == 1.0 and best.far == 0.0 and best.mar == 0.0
    # the obvious one: raw scores above the validation max, no delay, no hold
    hit = df[(df.smooth == "none") & (df.base == "max") & (df.scale == 1.0) & (df.k == 1) & (df.hold == 0)]
    assert hit.f1.tolist() == [1.0]
    for _, r in df.iterrows():
        e = exact(files, r)
        assert (e.f1, e.far, e.mar) == pytest.approx((r.f1, r.far, r.mar), abs=1e-12), r.to_dict()
    flags = flags_for(files, hit.iloc[0])
    assert all(np.array_equal(fl, f["labels"]) for fl, f in zip(flags, files))
    assert skab_binary_metrics([f["labels"] for f in files], flags).f1 == 1.0
    assert reaching_target(df) == int(((df.f1 >= 0.79) & (df.far <= 13.55) & (df.mar <= 28.02)).sum()) > 0


def test_picks_follow_the_constraints():
    df = pd.DataFrame({"smooth": "none", "base": "max", "scale": [1.0, 2.0, 3.0, 4.0], "k": 1, "hold": 0,
                       "f1": [0.9, 0.8, 0.7, 0.6], "far": [30.0, 12.0, 5.0, 1.0], "mar": [5.0, 20.0, 25.0, 40.0]})
    p = pick_rows(df)
    assert p["best F1, FAR<=13.55"].scale == 2.0
    assert p["best FAR, MAR<=28.02"].scale == 3.0
    assert p["best F1 overall"].scale == 1.0
    assert pick_rows(df.assign(far=50.0))["best F1, FAR<=13.55"] is None


def test_pareto_keeps_only_non_dominated_rows():
    df = pd.DataFrame({"far": [1.0, 2.0, 3.0, 2.0, 4.0, 1.0, 2.0], "mar": [5.0, 3.0, 4.0, 6.0, 1.0, 7.0, 3.0],
                       "tag": list("abcdefg")})
    kept = pareto(df)
    assert kept.tag.tolist() == ["a", "b", "e"]  # (2, 3) twice: kept once

    rng = np.random.default_rng(3)
    df = pd.DataFrame({"far": rng.integers(0, 30, 300).astype(float), "mar": rng.integers(0, 30, 300).astype(float)})
    front = pareto(df)
    pts = df[["far", "mar"]].to_numpy()
    for far, mar in front[["far", "mar"]].to_numpy():
        dominated = (pts[:, 0] <= far) & (pts[:, 1] <= mar) & ((pts[:, 0] < far) | (pts[:, 1] < mar))
        assert not dominated.any()
    kept_pts = front[["far", "mar"]].to_numpy()
    for far, mar in pts:  # every row is on the front or matched or beaten by a row of it
        assert ((kept_pts[:, 0] <= far) & (kept_pts[:, 1] <= mar)).any()
    assert len({tuple(p) for p in kept_pts}) == len(kept_pts)


def test_extent_by_hand():
    x = np.array([0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1], bool)  # runs: rows 1-5, 7-8, 10 (touching the end)
    assert extent(x, 0).tolist() == x.tolist()
    assert extent(x, 2).astype(int).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # 2-row runs vanish
    assert extent(x, 1, k=2).astype(int).tolist() == [0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]  # the 1-row run too short
    assert extent(x, 5).sum() == 0
    assert extent(np.zeros(0, bool), 3).shape == (0,)
    with pytest.raises(ValueError):
        extent(x, -1)


def test_extent_matches_skab_autoencoder_rule():
    """SKAB's notebooks: with windows indexed by their first row, row i is anomalous when windows
    i-W+1 .. i-1 all cross. Indexed by their LAST row (ours), that is windows ending at i .. i+W-2,
    i.e. runs trimmed by W-2 rows at the end (for rows where the notebook's loop runs)."""
    rng = np.random.default_rng(3)
    w = 6
    crossing_by_end = np.repeat(rng.random(40) > 0.4, 3)  # runs of various lengths
    n = len(crossing_by_end)
    by_start = crossing_by_end[w - 1:]  # the window starting at row s ends at row s+w-1
    notebook = np.zeros(n, bool)
    inner = range(w - 1, len(by_start) - w + 1)  # the notebook's loop over rows
    for i in inner:
        notebook[i] = np.all(by_start[i - w + 1:i])
    ours = extent(crossing_by_end, w - 2)
    inner = slice(inner.start, inner.stop)
    assert notebook[inner].any() and not notebook[inner].all()
    assert np.array_equal(ours[inner], notebook[inner])


def test_extent_grid_rows_and_figures():
    labels = np.array([0] * 10 + [1] * 10 + [0] * 10, bool)
    scores = np.where(labels, 5.0, 0.1)
    scores[20:24] = 5.0  # the error stays high 4 rows after the anomaly ends
    files = [{"scores": scores, "labels": labels, "val": np.linspace(0.0, 1.0, 50)}]
    grid = extent_grid(files, window=3)
    assert set(grid.trim) == set(EXTENT_TRIMS) and len(grid) == 3 * 5 * 3
    untrimmed = grid[(grid.trim == "0") & (grid.base == "q0.95") & (grid.scale == 1.0)].iloc[0]
    trimmed = grid[(grid.trim == "2W") & (grid.base == "q0.95") & (grid.scale == 1.0)].iloc[0]
    assert untrimmed.far > 0 and untrimmed.mar == 0
    # 2W = 6 rows off the 14-row run: rows 10-17 marked, 2 anomalous rows missed, no false alarm
    assert trimmed.far == 0 and trimmed.mar == pytest.approx(20.0)
    assert trimmed.f1 == pytest.approx(skab_binary_metrics([labels], [extent(scores > 0.95, 6)]).f1)


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "--runs" in capsys.readouterr().out


def test_adaptive_crossings_by_hand():
    """Bar = max(base, factor x median of the `rows` scores ending lag+1 rows before)."""
    scores = np.array([1, 1, 1, 1, 4, 4, 4, 4, 4, 4], dtype=float)
    # lag 0: t6 sees 1, 4, 4 -> median 4 -> bar 6 > 4; before that the median is 1 -> bar = base 2
    assert adaptive_crossings(scores, 2.0, rows=3, factor=1.5, quantile=0.5, lag=0).tolist() == [
        False, False, False, False, True, True, False, False, False, False]
    # lag 1: every bar comes one row later
    assert adaptive_crossings(scores, 2.0, rows=3, factor=1.5, quantile=0.5, lag=1).tolist() == [
        False, False, False, False, True, True, True, False, False, False]
    # too few rows for a history: the base alone decides; NaN never crosses
    with_nan = np.array([np.nan, 3.0, 3.0])
    assert adaptive_crossings(with_nan, 2.0, rows=5, factor=1.0, quantile=0.5, lag=0).tolist() == [False, True, True]


def test_adaptive_crossings_are_causal():
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=300)
    before = adaptive_crossings(scores, 3.0, rows=40, factor=2.0, quantile=0.5, lag=5)
    changed = scores.copy()
    changed[200:] = rng.gamma(2.0, size=100) * 10
    after = adaptive_crossings(changed, 3.0, rows=40, factor=2.0, quantile=0.5, lag=5)
    assert (before[:200] == after[:200]).all()
    assert before.any() and not (before == after).all()


def test_adaptive_rows_cut_the_alarms_after_a_lasting_change():
    """A fault (labelled) followed by a changed but normal rig (not labelled): the adaptive bar keeps the
    fault's alarms and drops most of the later ones, which the plain threshold raises throughout."""
    scores = np.r_[np.full(600, 1.0), np.full(100, 10.0), np.full(600, 5.0)]
    labels = np.r_[np.zeros(600, bool), np.ones(100, bool), np.zeros(600, bool)]
    files = [{"scores": scores, "labels": labels, "threshold": 2.0}]
    plain = skab_binary_metrics([labels], [scores > 2.0])
    rows = adaptive_rows(files, fitted_scale=1.5)  # 2.0 is 1.5 x the validation quantile: 1.25 x it is 5/3
    assert [(r["scale"], r["rows"], r["factor"], r["quantile"], r["lag"]) for r in rows] == ADAPTIVE
    for r in rows:
        assert r["mar"] == pytest.approx(0.0)  # the fault's 100 rows all alarm
        assert r["far"] < plain.far / 2  # most of the changed rig's rows no longer do


def test_group_holdout_chooses_without_the_held_out_group():
    """Two groups that want different factors: each fold takes the other group's best, and scores it on
    the held-out group's files only."""
    from pipelines.skab_tradeoff import group_holdout, skab_group

    assert skab_group("valve1/3") == skab_group("valve1/12.csv") == "valve1"

    def file(name: str, anomaly: float, burst: float) -> dict:
        # baseline 1; a labelled 20-row anomaly at ``anomaly``; an unlabelled 10-row burst at ``burst``
        scores = np.ones(800)
        labels = np.zeros(800, bool)
        scores[600:620], labels[600:620] = anomaly, True
        scores[700:710] = burst
        return {"name": name, "scores": scores, "labels": labels, "threshold": 1.5, "window": 10}

    # group a: faint anomalies (2.5), no bursts -> factor 2 catches them, factor 3 misses them
    # group b: strong anomalies (5), bursts at 2.5 -> factor 3 keeps the bursts quiet, factor 2 does not
    files = [file("a/0", 2.5, 1.0), file("a/1", 2.5, 1.0), file("b/0", 5.0, 2.5)]
    out = group_holdout(files, grid=[(1.0, 120, 2.0, 30), (1.0, 120, 3.0, 30)], target={"far": 100.0, "mar": 100.0})
    by_group = {f["held_out"]: f for f in out["folds"]}
    assert (by_group["a"]["files"], by_group["b"]["files"]) == (2, 1)
    assert by_group["a"]["factor"] == 3.0 and by_group["b"]["factor"] == 2.0  # the other group's best
    assert by_group["a"]["held_out_figures"]["mar"] == pytest.approx(100.0)  # so a's faint anomalies are missed
    assert by_group["b"]["held_out_figures"]["far"] > 0  # and b's bursts alarm
    for fold in out["folds"]:
        held = [f for f in files if skab_group(f["name"]) == fold["held_out"]]
        flags = [adaptive_crossings(f["scores"], 1.5, fold["rows"], fold["factor"], 0.5, fold["lag"]) for f in held]
        m = skab_binary_metrics([f["labels"] for f in held], flags)
        assert fold["held_out_figures"] == pytest.approx({"f1": m.f1, "far": m.far, "mar": m.mar})


def test_group_holdout_rescales_the_fitted_threshold():
    """A grid scale is a multiple of the validation quantile: at the fitted scale the file's own threshold,
    at another the same threshold rescaled; here 2 x q (4.0) lets a 3.0 anomaly through, 1 x q (2.0) not."""
    from pipelines.skab_tradeoff import group_holdout, rescaled

    assert rescaled(3.0, 1.5, 1.5) == 3.0 and rescaled(3.0, 1.0, 1.5) == pytest.approx(2.0)
    scores, labels = np.ones(400), np.zeros(400, bool)
    scores[300:320], labels[300:320] = 3.0, True
    files = [{"name": f"{g}/0", "scores": scores, "labels": labels, "threshold": 3.0, "window": 10} for g in ("a", "b")]
    low = group_holdout(files, grid=[(1.0, 120, 2.0, 30)], target={"far": 100.0, "mar": 100.0}, fitted_scale=1.5)
    high = group_holdout(files, grid=[(2.0, 120, 2.0, 30)], target={"far": 100.0, "mar": 100.0}, fitted_scale=1.5)
    assert low["pooled"]["mar"] == pytest.approx(0.0) and high["pooled"]["mar"] == pytest.approx(100.0)


def test_threshold_options_by_hand():
    """Scores 5, 3, 3, 1, NaN with labels 1, 0, 1, 0, 1: thresholds flag none, {5}, {5, 3, 3}, all scored;
    the NaN row is never flagged, so at least one miss remains; the tied 3s go together."""
    from pipelines.skab_tradeoff import threshold_options

    fp, fn = threshold_options(np.array([5.0, 3.0, 3.0, 1.0, np.nan]), np.array([1, 0, 1, 0, 1], bool))
    assert fp.tolist() == [0, 0, 1, 2]
    assert fn.tolist() == [3, 2, 1, 1]


def test_fewest_equals_brute_force():
    """The knapsack over files' threshold options equals trying every combination, at every budget."""
    from pipelines.skab_tradeoff import fewest, threshold_options

    rng = np.random.default_rng(3)
    files = []
    for n in (7, 5, 6):
        labels = rng.random(n) > 0.5
        files.append(threshold_options(rng.integers(0, 4, n).astype(float) + labels, labels))
    for budget in range(0, 12):
        best = None
        for choice in itertools.product(*(range(len(fp)) for fp, _ in files)):
            fn = sum(int(files[i][1][c]) for i, c in enumerate(choice))
            fp = sum(int(files[i][0][c]) for i, c in enumerate(choice))
            if fn <= budget and (best is None or fp < best):
                best = fp
        assert fewest(files, budget) == best, budget


def test_oracle_bounds_on_two_files():
    """File a separates perfectly (no cost); file b has one normal row above its anomaly rows: with MAR
    <= 14.13 % (1 miss of 10 allowed) b must flag that row (FAR 1 of 10 = 10 %), and with FAR <= 2.56 %
    (no false alarm allowed) b flags nothing (5 misses of 10: MAR 50 %)."""
    from pipelines.skab_tradeoff import oracle_bounds

    a = {"scores": np.r_[np.full(5, 9.0), np.full(5, 1.0)], "labels": np.r_[np.ones(5, bool), np.zeros(5, bool)]}
    b = {"scores": np.r_[10.0, np.full(5, 9.0), np.full(4, 1.0)], "labels": np.r_[False, np.ones(5, bool), np.zeros(4, bool)]}
    out = oracle_bounds([a, b], mars=(60.0,))
    assert out["far_at_corner_mar"] == pytest.approx(10.0)
    assert out["mar_at_corner_far"] == pytest.approx(50.0)
    assert out["far_at"]["60.0"] == pytest.approx(0.0)


def test_warm_rows_give_the_rule_earlier_history():
    """History 0 is ``adaptive_rows`` itself. A short rule (40 rows, lag 10) acts long before a fault 100
    rows in, so history changes nothing; a long one (400 rows) never acts within a 300-row fault at the
    start of the test part, but with 200 rows of history before it (a worker already running) it does."""
    from pipelines.skab_tradeoff import fault_ends, warm_rows

    scores = np.r_[np.ones(100), np.full(300, 10.0), np.ones(100)]
    labels = np.r_[np.zeros(100, bool), np.ones(300, bool), np.zeros(100, bool)]
    files = [{"scores": scores, "labels": labels, "threshold": 2.0, "pre_scores": np.ones(200)}]
    rule = [(1.0, 40, 2.0, 0.5, 10)]
    cold, warm = warm_rows(files, 1.0, rule, warm=(0, 200))
    assert (cold["history"], warm["history"]) == (0, 200)
    same = adaptive_rows(files, 1.0, rule)[0]
    assert (cold["f1"], cold["far"], cold["mar"]) == (same["f1"], same["far"], same["mar"])
    # the bar rises to the fault's level ~30 rows in either way: the history before it is the same level (1)
    assert warm["mar"] == pytest.approx(cold["mar"])
    # a fault at the very start: without history nothing holds it; with history the bar acts at once
    early = [{"scores": np.r_[np.full(300, 10.0), np.ones(100)], "labels": np.r_[np.ones(300, bool), np.zeros(100, bool)],
              "threshold": 2.0, "pre_scores": np.ones(200)}]
    cold, warm = warm_rows(early, 1.0, [(1.0, 400, 2.0, 0.5, 10)], warm=(0, 200))
    assert cold["mar"] == pytest.approx(0.0)  # 410 rows of warm-up: the bar never acts on the 400 rows
    # with 200 rows before, it acts from test row 211 on a span of 200 ones and 200 tens (median 5.5, bar 11):
    # the fault's last 90 rows are held
    assert warm["mar"] == pytest.approx(100 * 90 / 300)
    assert fault_ends(files) == [400] and fault_ends(early) == [300]


def test_episode_grid_scores_every_setting_through_the_shipped_rule():
    """Each grid row is SKAB's metric over the files flagged by ``anomaly.episodes`` at that setting, the
    base rescaled from the fitted scale; the warm start runs the same rule from the history first."""
    from anomaly.episodes import EpisodeRule, episode_flags
    from pipelines.skab_tradeoff import episode_grid, episode_warm

    rng = np.random.default_rng(4)
    files = []
    for i in range(3):
        scores = rng.gamma(2.0, size=300)
        labels = np.zeros(300, bool)
        scores[100:160] += 15.0
        scores[160:] += 3.0  # the rig settles higher after the fault
        labels[100:160] = True
        files.append({"scores": scores, "labels": labels, "threshold": 6.0, "pre_scores": rng.gamma(2.0, size=50),
                      "window": 4})
    grid = [(1.0, 2.0, 2.0, 5), (2.0, 1.5, 3.0, 10)]
    df = episode_grid(files, fitted_scale=2.0, grid=grid)
    assert len(df) == 2
    for (scale, drop, settle, k), row in zip(grid, df.itertuples()):
        flags = [episode_flags(f["scores"], 6.0 * scale / 2.0, EpisodeRule(drop, settle, k), window_size=4)
                 for f in files]
        m = skab_binary_metrics([f["labels"] for f in files], flags)
        assert (row.f1, row.far, row.mar) == pytest.approx((m.f1, m.far, m.mar))
    warm = episode_warm(files, df.iloc[1], fitted_scale=2.0, history=50)
    assert warm["history"] == 50 and warm["mar"] == pytest.approx(0.0)


def test_runs_use_every_sensor_unless_they_name_the_profiles_six():
    from pipelines.skab_tradeoff import RUNS, run_config
    from anomaly.protocols import SKAB_PROFILE_SENSORS

    assert "sensors" not in run_config(RUNS["default"], 1)["data"]  # all eight, as the README's older tables
    assert run_config(RUNS["w60"], 1)["data"].get("sensors") is None
    for name in ("six", "six-seed1", "six-seed2"):
        assert run_config(RUNS[name], 1)["data"]["sensors"] == list(SKAB_PROFILE_SENSORS)


def test_a_skab_tradeoff_cache_from_another_data_folder_or_code_is_not_reused(tmp_path, monkeypatch):
    import pickle

    from anomaly import tracking
    from pipelines import skab_tradeoff

    raw = {"model": {"window_size": 10}}
    runs = []

    def fresh(name, raw_, series):
        runs.append(name)
        return {"name": name, "raw": raw_, "files": [{"pre_scores": [], "window": 10}], "seconds": 1.0,
                "metrics": {"f1": 0.5, "far": 1.0, "mar": 2.0}}

    monkeypatch.setattr(skab_tradeoff, "protocol_run", fresh)
    cache = tmp_path / "cache"
    skab_tradeoff.load_or_run("r", raw, cache, lambda: [], tmp_path / "a")
    skab_tradeoff.load_or_run("r", raw, cache, lambda: [], tmp_path / "a")
    assert runs == ["r"]  # the same data and code: reused
    skab_tradeoff.load_or_run("r", raw, cache, lambda: [], tmp_path / "b")
    assert runs == ["r", "r"]  # another folder: run again
    monkeypatch.setattr(tracking, "code_fingerprint", lambda: "0.1.0+other")
    skab_tradeoff.load_or_run("r", raw, cache, lambda: [], tmp_path / "b")
    assert runs == ["r", "r", "r"] and pickle.loads((cache / "r.pkl").read_bytes())["origin"]["code"] == "0.1.0+other"


def test_a_file_with_no_finite_score_has_one_option_flag_nothing():
    from pipelines.skab_tradeoff import threshold_options

    fp, fn = threshold_options(np.array([np.nan, np.nan]), np.array([True, False]))
    assert fp.tolist() == [0] and fn.tolist() == [1]
