"""Metrics on tiny hand-built arrays with exact, hand-computed expectations.

NAB identity used in the hand computations: scaledSigmoid(y) = 2·σ(−5y) − 1 = tanh(−5y/2), so
maxTP = tanh(2.5) and a detection at relative position y in a window earns tanh(−5y/2)/tanh(2.5).
"""

import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from anomaly.evaluation import (
    NAB_MAX_TP,
    NAB_NO_DETECTION_THRESHOLD,
    NAB_PROFILES,
    EventCounts,
    NabFile,
    aggregate_events,
    event_metrics,
    label_events,
    nab_normalized,
    nab_optimize,
    nab_probation_rows,
    nab_raw_score,
    nab_row_weights,
    nab_scaled_sigmoid,
    nab_scores,
    nab_window_count,
    nab_windows_to_rows,
    point_adjusted_f1,
    skab_binary_metrics,
    unmeasured,
)

STANDARD = NAB_PROFILES["standard"]
LOW_FP = NAB_PROFILES["reward_low_FP_rate"]
LOW_FN = NAB_PROFILES["reward_low_FN_rate"]
T25 = math.tanh(2.5)  # maxTP


# ------------------------------------------------------------------------------------------------ SKAB


def test_skab_counts_are_summed_over_files():
    # file 0: true 1 1 0 0 / pred 1 0 1 0 -> TP 1, FN 1, FP 1, TN 1
    # file 1: true 0 1     / pred 1 1     -> TP 1, FP 1
    # total TP 2, FP 2, FN 1, TN 1: F1 = 2/(2 + 3/2) = 4/7, FAR = 2/3·100, MAR = 1/3·100
    m = skab_binary_metrics([np.array([1, 1, 0, 0]), np.array([0, 1])],
                            [np.array([1, 0, 1, 0]), np.array([1, 1])])
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 2, 1, 1)
    assert m.f1 == pytest.approx(4 / 7)
    assert m.far == pytest.approx(200 / 3)
    assert m.mar == pytest.approx(100 / 3)
    assert json.loads(json.dumps(m.to_dict())) == m.to_dict()


def test_skab_is_micro_not_macro():
    # file 0: 1 TP of 1 label; file 1: 0 TP, 9 FN. Micro F1 = 1/(1 + 9/2) = 2/11; a per-file mean would be 0.5.
    m = skab_binary_metrics([np.ones(1), np.ones(9)], [np.ones(1), np.zeros(9)])
    assert m.f1 == pytest.approx(2 / 11)


def test_skab_accepts_bool_and_float_labels_alike():
    t, p = [1.0, 0.0, 1.0], [1, 1, 0]
    a = skab_binary_metrics([np.array(t)], [np.array(p)])
    b = skab_binary_metrics([np.array(t, bool)], [np.array(p, bool)])
    assert a == b


def test_skab_all_anomalous_detector_is_the_trivial_baseline():
    # SKAB test parts: 23,801 rows, 12,771 anomalous. Flag everything: F1 = TP/(TP + FP/2) = 0.698.
    labels = np.zeros(23801, bool)
    labels[:12771] = True
    m = skab_binary_metrics([labels], [np.ones_like(labels)])
    assert m.f1 == pytest.approx(12771 / (12771 + 11030 / 2))
    assert round(m.f1, 3) == 0.698
    assert (m.far, m.mar) == (100.0, 0.0)


def test_skab_zero_divisions_give_zero():
    m = skab_binary_metrics([np.zeros(5)], [np.zeros(5)])  # no labels, no flags
    assert (m.f1, m.far, m.mar, m.tn) == (0.0, 0.0, 0.0, 5)
    m = skab_binary_metrics([np.ones(3)], [np.ones(3)])  # no normal rows
    assert (m.f1, m.far, m.mar) == (1.0, 0.0, 0.0)
    m = skab_binary_metrics([], [])
    assert (m.tp, m.f1) == (0, 0.0)


def test_skab_length_mismatch_names_the_file():
    with pytest.raises(ValueError, match="file 1"):
        skab_binary_metrics([np.zeros(3), np.zeros(4)], [np.zeros(3), np.zeros(5)])
    with pytest.raises(ValueError):
        skab_binary_metrics([np.zeros(3)], [])
    with pytest.raises(ValueError, match="0/1"):
        skab_binary_metrics([np.array([0, 2])], [np.array([0, 1])])


# ------------------------------------------------------------------------------------------------ events


def test_label_events_end_is_exclusive():
    assert label_events(np.array([0, 1, 1, 0, 1])) == [(1, 3), (4, 5)]
    assert label_events(np.array([1, 1, 1], bool)) == [(0, 3)]
    assert label_events(np.zeros(4)) == []
    assert label_events(np.array([])) == []


def test_event_metrics_counts_and_delay_in_rows():
    #          0  1  2  3  4  5  6  7  8  9
    y_true = [0, 1, 1, 1, 0, 0, 1, 1, 0, 0]  # events (1,4) and (6,8)
    y_pred = [0, 0, 1, 0, 0, 1, 0, 0, 0, 1]  # events (2,3) (5,6) (9,10)
    # (2,3) overlaps (1,4): 1 correct of 3. (1,4) detected at row 2: delay 1 row; (6,8) missed.
    c = event_metrics(np.array(y_true), np.array(y_pred))
    assert c == EventCounts(n_true=2, n_detected=1, n_pred=3, n_pred_correct=1, delays=[1.0])


def test_event_delay_in_seconds_from_timestamps():
    y_true = np.array([0, 1, 1, 1, 0])
    y_pred = np.array([0, 0, 0, 1, 0])  # first flag inside (1,4) is row 3: 2 rows after its start
    stamps = pd.date_range("2024-01-01", periods=5, freq="30s")
    assert event_metrics(y_true, y_pred, timestamps=stamps).delays == [60.0]
    assert event_metrics(y_true, y_pred, timestamps=np.asarray(stamps)).delays == [60.0]
    # epoch seconds: event starts at row 1 (5.0 s), first flag at row 3 (12.5 s) -> 7.5 s
    assert event_metrics(y_true, y_pred, timestamps=np.array([0.0, 5.0, 7.5, 12.5, 20.0])).delays == [7.5]


def test_a_late_stamped_row_gives_no_negative_delay_and_a_missing_time_is_refused():
    y_true = np.array([0, 0, 1, 1, 1, 0])
    y_pred = np.array([0, 0, 0, 1, 0, 0])  # event rows 2..4, first flagged at row 3
    stamps = pd.date_range("2020-01-01", periods=6, freq="10s", tz="UTC")
    assert event_metrics(y_true, y_pred, stamps).delays == [10.0]
    # row 3 stamped before row 2 (a late reading): it happened, as the stream saw it, at row 2's time
    assert event_metrics(y_true, y_pred, stamps[[0, 1, 3, 2, 4, 5]]).delays == [0.0]  # was -10 s
    with pytest.raises(ValueError, match="row 0 has no time"):  # every delay was NaN, and the JSON invalid
        event_metrics(y_true, y_pred, pd.DatetimeIndex([pd.NaT, *stamps[1:]]))
    with pytest.raises(ValueError, match="row 4 has no time"):
        event_metrics(y_true, y_pred, np.array([0.0, 1, 2, 3, np.nan, 5]))


def test_one_prediction_spanning_two_events_and_one_starting_early():
    # pred (0,3) overlaps both (0,1) and (2,3): one correct prediction, both detected with delay 0
    c = event_metrics(np.array([1, 0, 1]), np.array([1, 1, 1]))
    assert (c.n_true, c.n_detected, c.n_pred, c.n_pred_correct, c.delays) == (2, 2, 1, 1, [0.0, 0.0])
    # pred (1,3) starts before the event (2,4): detected at its first row, delay 0
    c = event_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0]))
    assert (c.n_detected, c.n_pred_correct, c.delays) == (1, 1, [0.0])


def test_event_metrics_edge_cases():
    assert event_metrics(np.zeros(4), np.zeros(4)) == EventCounts(0, 0, 0, 0, [])
    assert event_metrics(np.zeros(4), np.ones(4)) == EventCounts(0, 0, 1, 0, [])
    assert event_metrics(np.ones(4), np.zeros(4)) == EventCounts(1, 0, 0, 0, [])
    assert event_metrics(np.ones(4), np.ones(4)) == EventCounts(1, 1, 1, 1, [0.0])
    with pytest.raises(ValueError):
        event_metrics(np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError):
        event_metrics(np.zeros(3), np.zeros(3), timestamps=np.zeros(2))


def test_aggregate_events_is_micro():
    # Σcorrect/Σpred = (1+1)/(3+1) = 0.5; Σdetected/Σtrue = (1+1)/(2+1) = 2/3;
    # F1 = 2·0.5·(2/3)/(0.5 + 2/3) = 4/7; mean delay = (1 + 4)/2 = 2.5
    m = aggregate_events([EventCounts(2, 1, 3, 1, [1.0]), EventCounts(1, 1, 1, 1, [4.0])])
    assert (m.precision, m.recall) == (0.5, pytest.approx(2 / 3))
    assert m.f1 == pytest.approx(4 / 7)
    assert m.mean_delay_s == 2.5
    assert m.to_dict() == {"event_precision": 0.5, "event_recall": pytest.approx(2 / 3),
                           "event_f1": pytest.approx(4 / 7), "mean_delay_s": 2.5}


def test_aggregate_events_with_nothing_detected_is_json_serialisable():
    m = aggregate_events([EventCounts(2, 0, 0, 0, [])])
    assert m.to_dict() == {"event_precision": 0.0, "event_recall": 0.0, "event_f1": 0.0, "mean_delay_s": None}
    json.dumps(m.to_dict(), allow_nan=False)
    assert aggregate_events([]).mean_delay_s is None


def test_point_adjusted_f1_inflates():
    y_true = np.array([0, 1, 1, 1, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 0, 0, 0, 0, 0])
    # adjusted pred: rows 1..3 -> TP 3, FP 0, FN 2: F1 = 6/(6+2) = 0.75; unadjusted: 2/(2+4) = 1/3
    assert point_adjusted_f1(y_true, y_pred) == pytest.approx(0.75)
    assert skab_binary_metrics([y_true], [y_pred]).f1 == pytest.approx(1 / 3)
    assert point_adjusted_f1(np.zeros(3), np.zeros(3)) == 0.0
    assert point_adjusted_f1(y_true, y_pred) >= skab_binary_metrics([y_true], [y_pred]).f1


# ------------------------------------------------------------------------------------------------ NAB


def test_nab_constants_and_profiles():
    assert NAB_MAX_TP == pytest.approx(0.98661, abs=1e-5)
    assert NAB_MAX_TP == pytest.approx(T25, rel=1e-12)
    assert nab_scaled_sigmoid(0.0) == 0.0
    assert nab_scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab_scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    # ">= 3" -> exactly -1, as numenta/NAB nab/sweeper.py (03ef06a) has it (its older scorer.py had "> 3")
    assert nab_scaled_sigmoid(3.0) == -1.0 and nab_scaled_sigmoid(2.9999) == pytest.approx(-math.tanh(7.49975))
    assert nab_scaled_sigmoid(3.0001) == -1.0
    np.testing.assert_allclose(nab_scaled_sigmoid(np.array([-1.0, 50.0])), [T25, -1.0])
    assert [(p.a_tp, p.a_fp, p.a_fn) for p in (STANDARD, LOW_FP, LOW_FN)] == [
        (1.0, 0.11, 1.0), (1.0, 0.22, 1.0), (1.0, 0.11, 2.0)]


def test_nab_probation_rows():
    assert nab_probation_rows(0) == 0
    assert nab_probation_rows(7) == 1  # floor(1.05)
    assert nab_probation_rows(40) == 6
    assert nab_probation_rows(4032) == 604  # floor(604.8)
    assert nab_probation_rows(5000) == 750
    assert nab_probation_rows(22695) == 750  # capped at 0.15·5000


def test_nab_row_weights_by_hand():
    # 40 rows, one window rows 10..14 (W = 5); standard profile (A_TP 1, A_FP 0.11)
    w = nab_row_weights(40, [(10, 14)], STANDARD)
    assert w[10] == 1.0  # left edge: position -1 earns exactly A_TP
    assert w[11] == pytest.approx(math.tanh(2.0) / T25)  # position -(14-11+1)/5 = -0.8
    assert w[14] == pytest.approx(math.tanh(0.5) / T25)  # right edge: position -1/5
    assert np.all(np.diff(w[10:15]) < 0)  # earlier is better
    np.testing.assert_array_equal(w[:10], -0.11)  # before any window: -A_FP
    assert w[15] == pytest.approx(0.11 * math.tanh(-0.625))  # (15-14)/(5-1) = 0.25 past the window
    assert w[26] == pytest.approx(0.11 * math.tanh(-7.5))  # 12/4 = 3: not yet the cap
    assert w[27] == -0.11  # 13/4 = 3.25 > 3: -A_FP
    assert np.all(np.diff(w[15:]) <= 0)  # further from the window costs more


def test_nab_fp_weight_depends_on_the_previous_window():
    # windows 2..5 (W 4) and 20..29 (W 10): row 12 is 7 rows past the first -> 7/3 = 2.33;
    # row 31 is 2 rows past the second -> 2/9.
    w = nab_row_weights(40, [(2, 5), (20, 29)], LOW_FP)
    assert w[12] == pytest.approx(0.22 * math.tanh(-2.5 * 7 / 3))
    assert w[31] == pytest.approx(0.22 * math.tanh(-2.5 * 2 / 9))
    assert w[20] == 1.0


def _file(n, windows, flagged, name="f"):
    scores = np.zeros(n)
    scores[list(flagged)] = 1.0
    return NabFile(name, scores, windows)


def test_nab_raw_score_by_hand():
    # 40 rows, probation floor(0.15·40) = 6 rows, window 10..14 (W 5).
    # flagged 3 (probation, ignored), 7 (before any window: -0.11), 11 and 13 (only 11 counts:
    # tanh(2)/tanh(2.5)), 15 (0.25 past: 0.11·tanh(-0.625)), 35 (21/4 > 3: -0.11)
    f = _file(40, [(10, 14)], [3, 7, 11, 13, 15, 35])
    expected = -0.11 + math.tanh(2.0) / T25 + 0.11 * math.tanh(-0.625) - 0.11
    assert nab_raw_score([f], 0.5, STANDARD) == pytest.approx(expected)
    # low FN: the same, A_FN unused as the window is detected; low FP: the FP terms double
    assert nab_raw_score([f], 0.5, LOW_FN) == pytest.approx(expected)
    assert nab_raw_score([f], 0.5, LOW_FP) == pytest.approx(2 * expected - math.tanh(2.0) / T25)


def test_nab_only_the_earliest_detection_in_a_window_counts():
    one = nab_raw_score([_file(40, [(10, 14)], [10])], 0.5, STANDARD)
    many = nab_raw_score([_file(40, [(10, 14)], [10, 11, 12, 13, 14])], 0.5, STANDARD)
    assert one == many == 1.0


def test_nab_left_edge_beats_right_edge():
    left = nab_raw_score([_file(40, [(10, 14)], [10])], 0.5, STANDARD)
    right = nab_raw_score([_file(40, [(10, 14)], [14])], 0.5, STANDARD)
    assert left == 1.0
    assert right == pytest.approx(math.tanh(0.5) / T25)  # 0.468
    assert right < left


def test_nab_fp_near_the_window_costs_less_than_far_away():
    base = nab_raw_score([_file(40, [(10, 14)], [10])], 0.5, STANDARD)
    near = nab_raw_score([_file(40, [(10, 14)], [10, 15])], 0.5, STANDARD) - base
    far = nab_raw_score([_file(40, [(10, 14)], [10, 35])], 0.5, STANDARD) - base
    assert near == pytest.approx(0.11 * math.tanh(-0.625))  # -0.061
    assert far == pytest.approx(-0.11)
    assert far < near < 0


def test_nab_probation_rows_are_not_scored():
    # A flag during probation costs nothing; a window that starts in probation still counts,
    # scored with its full width; a window entirely in probation is left out.
    assert nab_raw_score([_file(40, [(10, 14)], [0, 5])], 0.5, STANDARD) == -1.0
    straddling = _file(40, [(4, 8)], [6])  # rows 4, 5 dropped; row 6 at -(8-6+1)/5 = -0.6
    assert nab_raw_score([straddling], 0.5, STANDARD) == pytest.approx(math.tanh(1.5) / T25)
    assert nab_raw_score([_file(40, [(4, 8)], [])], 0.5, STANDARD) == -1.0
    hidden = _file(40, [(1, 3)], [7])  # window in probation; row 7 is (7-3)/2 = 2 past it
    assert nab_window_count([hidden]) == 0
    assert nab_raw_score([hidden], 0.5, STANDARD) == pytest.approx(0.11 * math.tanh(-5.0))


def _perfect_and_null_corpus():
    spec = [(300, [(60, 79), (150, 169)]), (120, []), (500, [(100, 139)]), (80, [(20, 21)])]
    perfect = [_file(n, w, [s for s, _ in w], name=f"f{i}") for i, (n, w) in enumerate(spec)]
    null = [_file(n, w, [], name=f"f{i}") for i, (n, w) in enumerate(spec)]
    return perfect, null


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_nab_perfect_detector_scores_100_and_null_detector_0(threshold):
    perfect, null = _perfect_and_null_corpus()
    assert nab_window_count(perfect) == 4
    good = nab_scores(perfect, threshold=threshold)
    bad = nab_scores(null, threshold=threshold)
    for key in ("nab_standard", "nab_low_fp", "nab_low_fn"):
        assert good[key] == pytest.approx(100.0)
        assert bad[key] == pytest.approx(0.0)
    assert bad["nab_low_fn_raw"] == -8.0  # 4 missed windows at A_FN = 2
    assert good["nab_windows"] == 4
    json.dumps(good, allow_nan=False)
    if threshold is None:
        assert good["nab_standard_threshold"] == 1.0
        assert bad["nab_standard_threshold"] == NAB_NO_DETECTION_THRESHOLD  # detecting nothing is best


def test_nab_scores_without_windows_is_none():
    out = nab_scores([_file(50, [], [30])])
    assert out["nab_standard"] is None and out["nab_windows"] == 0
    assert out["nab_standard_raw"] == 0.0  # the oracle detects nothing: no FP


def test_nab_normalized_matches_published_numenta_scores():
    # SCORING.md: Numenta raw 46.634 / 30.431 / 26.634 over 116 windows -> 70.10 / 63.12 / 74.32
    assert round(nab_normalized(46.634, 116, STANDARD), 2) == 70.10
    assert round(nab_normalized(30.431, 116, LOW_FP), 2) == 63.12
    assert round(nab_normalized(26.634, 116, LOW_FN), 2) == 74.32
    with pytest.raises(ValueError):
        nab_normalized(0.0, 0, STANDARD)


def _reference_raw(files, threshold, profile):
    """NAB raw score row by row, written from SCORING.md steps 2-4: slow but plainly right."""
    def ss(y):
        return -1.0 if y >= 3 else 2 / (1 + math.exp(5 * y)) - 1
    max_tp = ss(-1.0)
    total = 0.0
    for f in files:
        n = len(f.scores)
        probation = min(math.floor(0.15 * n), 750)
        value = {}  # window -> best so far (-A_FN until a detection)
        prev = None  # (right edge, width) of the last window that ended
        for i in range(n):
            k = next((k for k, (l, r) in enumerate(f.windows) if l <= i <= r), None)
            if k is not None:
                l, r = f.windows[k]
                w = ss(-(r - i + 1) / (r - l + 1)) * profile.a_tp / max_tp
            elif prev is None:
                w = -profile.a_fp
            else:
                w = ss((i - prev[0]) / (prev[1] - 1)) * profile.a_fp
            if i >= probation:
                if k is not None:
                    value.setdefault(k, -profile.a_fn)
                    if f.scores[i] >= threshold:
                        value[k] = max(value[k], w)
                elif f.scores[i] >= threshold:
                    total += w
            if k is not None and i == f.windows[k][1]:
                prev = (i, f.windows[k][1] - f.windows[k][0] + 1)
        total += sum(value.values())
    return total


def _random_corpus(seed, n_files=6):
    rng = np.random.default_rng(seed)
    files = []
    for j in range(n_files):
        n = int(rng.integers(20, 250))
        windows, start = [], int(rng.integers(0, n // 3))
        while True:
            width = int(rng.integers(2, 25))
            if start + width > n:
                break
            if rng.random() < 0.6:
                windows.append((start, start + width - 1))
            start += width + int(rng.integers(1, 40))
        scores = np.round(rng.random(n) ** 3, 2)  # rounded: many ties, as real detectors have
        files.append(NabFile(f"f{j}", scores, windows))
    return files


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nab_raw_score_matches_row_by_row_reference(seed):
    files = _random_corpus(seed)
    for profile in (STANDARD, LOW_FP, LOW_FN):
        for threshold in (0.0, 0.05, 0.3, 0.9, 1.0, 1.1):
            assert nab_raw_score(files, threshold, profile) == pytest.approx(
                _reference_raw(files, threshold, profile), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nab_optimize_matches_brute_force_sweep(seed):
    files = _random_corpus(seed, n_files=8)
    candidates = np.append(np.unique(np.concatenate([f.scores for f in files])), NAB_NO_DETECTION_THRESHOLD)
    for profile in (STANDARD, LOW_FP, LOW_FN):
        brute = max(nab_raw_score(files, t, profile) for t in candidates)
        threshold, raw = nab_optimize(files, profile)
        assert raw == pytest.approx(brute, abs=1e-9)
        assert nab_raw_score(files, threshold, profile) == raw


def test_nab_optimize_is_fast_at_nab_size():
    # 58 files, 365,558 rows in all (NAB's corpus size): an exact sweep must stay well under a second each.
    rng = np.random.default_rng(7)
    files = []
    for j in range(58):
        n = 6303
        files.append(NabFile(f"f{j}", rng.random(n), [(2000, 2299), (4500, 4799)]))
    started = time.process_time()  # this process's CPU time: a loaded box does not stretch it
    out = nab_scores(files)
    assert time.process_time() - started < 4.0
    assert out["nab_windows"] == 116
    assert out["nab_standard"] >= 0.0  # the oracle can always fall back to detecting nothing


def test_nab_file_validation():
    with pytest.raises(ValueError, match="disjoint"):
        NabFile("x", np.zeros(20), [(2, 6), (6, 9)])
    with pytest.raises(ValueError, match="inside"):
        NabFile("x", np.zeros(20), [(15, 20)])
    with pytest.raises(ValueError, match="finite"):
        NabFile("x", np.array([0.1, np.nan]), [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NabFile("x", np.array([0.1, 1.5]), [])
    f = NabFile("x", [0.0, 0.5], [[0, 1]])
    assert f.windows == [(0, 1)] and f.scores.dtype == np.float64


def test_nab_windows_to_rows():
    stamps = pd.date_range("2014-02-14 14:30:00", periods=12, freq="5min")
    windows = [["2014-02-14 14:40:00.000000", "2014-02-14 14:50:00.000000"],
               ["2014-02-14 15:15:00.000000", "2014-02-14 15:25:00.000000"]]
    assert nab_windows_to_rows(stamps, windows) == [(2, 4), (9, 11)]
    assert nab_windows_to_rows(np.asarray(stamps), [[stamps[0], stamps[1]]]) == [(0, 1)]
    with pytest.raises(ValueError, match="matches no row"):
        nab_windows_to_rows(stamps, [["2014-02-14 14:41:00.000000", "2014-02-14 14:50:00.000000"]])
    with pytest.raises(ValueError, match="ends before"):
        nab_windows_to_rows(stamps, [[stamps[3], stamps[1]]])


def test_tz_aware_timestamps_as_an_object_array_give_seconds_without_a_warning():
    import warnings

    import pandas as pd

    from anomaly.evaluation import _elapsed_seconds

    index = pd.date_range("2026-03-29T00:59:58", periods=4, freq="1s", tz="Europe/Berlin")  # across a DST change
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "no explicit representation of timezones" was one
        assert _elapsed_seconds(np.asarray(index), 4).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_labelled_report_sums_point_counts_over_entities_and_times_events():
    from anomaly.evaluation import labelled_report

    # entity a: event rows 2-4, flags 3-5 (tp 2, fp 1, fn 1); entity b: no event, one false flag at 0
    truth = [np.array([0, 0, 1, 1, 1, 0, 0, 0], bool), np.array([0, 0, 0, 0], bool)]
    flags = [np.array([0, 0, 0, 1, 1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)]
    stamps = [pd.date_range("2026-01-01", periods=8, freq="10s"), pd.date_range("2026-01-01", periods=4, freq="10s")]
    out = labelled_report(truth, flags, stamps)
    assert (out["labelled_rows"], out["flagged_rows"]) == (3, 4)
    assert out["precision"] == pytest.approx(2 / 4) and out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / (2 + (1 + 2) / 2))  # SKAB's F1: tp / (tp + (fn + fp) / 2)
    assert out["far"] == pytest.approx(100 * 2 / 9) and out["mar"] == pytest.approx(100 / 3)
    # events: one labelled, detected 10 s in; two predicted, one of them on it
    assert (out["labelled_events"], out["detected_events"]) == (1, 1)
    assert out["event_precision"] == 0.5 and out["event_recall"] == 1.0 and out["mean_delay_s"] == 10.0
    assert labelled_report(truth, flags)["mean_delay_s"] == 1.0  # rows without timestamps


def test_labelled_report_says_none_where_there_is_nothing_to_divide():
    from anomaly.evaluation import labelled_report

    quiet = labelled_report([np.zeros(5, bool)], [np.zeros(5, bool)])
    assert quiet["f1"] is None and quiet["recall"] is None and quiet["event_f1"] is None and quiet["far"] == 0.0
    assert quiet["precision"] is None and quiet["event_precision"] is None
    noisy = labelled_report([np.zeros(5, bool)], [np.array([0, 1, 0, 0, 0], bool)])
    assert noisy["precision"] == 0.0 and noisy["event_precision"] == 0.0 and noisy["far"] == 20.0
    # every row labelled: no normal row, so no false-alarm rate (it read 0.0, "no false alarms")
    full = labelled_report([np.ones(5, bool)], [np.array([1, 1, 0, 0, 0], bool)])
    assert full["far"] is None and full["mar"] == 60.0 and full["recall"] == 0.4


def test_protocol_summaries_say_none_where_there_is_nothing_to_measure(monkeypatch):
    # A NAB file without anomalies or a SKAB file whose test part is empty read event recall 0 and
    # MAR 0 ("missed all", "missed none"); the summaries now follow labelled_report's rules.
    import pandas as pd

    from anomaly.protocols import SeriesResult, _events, run_skab

    n = 50
    quiet = SeriesResult(name="q", timestamps=np.asarray(pd.date_range("2024-01-01", periods=n, freq="1s")),
                         values=np.zeros((n, 1)), labels=np.zeros(n, bool), scores=np.zeros(n),
                         flags=np.zeros(n, bool), expected=np.zeros((n, 1)), threshold=1.0, sensors=("a",),
                         train_seconds=0.0, score_seconds=0.0, windows_scored=n,
                         validation_scores=np.zeros(3), best_epoch=1)
    events = _events([quiet])
    assert events["event_recall"] is None and events["event_f1"] is None and events["event_precision"] is None
    import anomaly.protocols as protocols

    monkeypatch.setattr(protocols, "_score_all", lambda series, settings, progress: [quiet])
    summary = run_skab([], None).metrics
    assert summary["f1"] is None and summary["mar"] is None and summary["far"] == 0.0



def test_composite_f1_charges_the_false_rows_event_f1_does_not():
    from anomaly.evaluation import composite_f1, labelled_report

    assert composite_f1(0.5, 1.0) == pytest.approx(2 / 3) and composite_f1(0.0, 0.0) == 0.0
    assert composite_f1(None, 1.0) is None and composite_f1(0.5, None) is None
    # nothing flagged (no precision) and events labelled: Fc1 0, as F1 and event F1 are (it was None,
    # so a detector that flags nothing lost its Fc1 in MLflow and read n/a, not the worst score)
    assert composite_f1(None, 0.0) == 0.0
    truth = np.zeros(100, bool)
    truth[40:50] = True
    everything = labelled_report([truth], [np.ones(100, bool)])
    assert everything["event_f1"] == 1.0 and everything["fc1"] == pytest.approx(2 * 0.1 / 1.1)
    exact = labelled_report([truth], [truth.copy()])
    assert exact["event_f1"] == 1.0 and exact["fc1"] == 1.0


def test_the_all_anomalous_detector_scores_what_skab_says():
    import pandas as pd

    from anomaly.datasets import LabelledSeries
    from anomaly.protocols import all_anomalous

    def series(n, fault):
        labels = np.zeros(n, bool)
        labels[fault[0]:fault[1]] = True
        frame = pd.DataFrame({"a": np.zeros(n)}, index=pd.date_range("2024-01-01", periods=n, freq="1s", tz="UTC"))
        return LabelledSeries("s", frame, labels, train_rows=10)

    out = all_anomalous([series(30, (20, 25)), series(40, (30, 40))])
    # test parts: 20 rows (5 labelled) and 30 rows (10 labelled): precision 15/50, recall 1
    assert out["far"] == 100.0 and out["mar"] == 0.0 and out["f1"] == pytest.approx(2 * 15 / (2 * 15 + 35))
    assert out["event_f1"] == 1.0 and out["mean_delay_s"] == 0.0
    assert out["fc1"] == pytest.approx(2 * 0.3 / 1.3)


def test_the_nab_null_score_is_the_null_detectors_own_on_the_files_scored():
    # NAB normalises by the null detector's optimised score (every row 0.5), not by -A_FN per window. On a
    # file that is mostly window, flagging every row beats flagging nothing: one file of 20 rows, window
    # rows 5..14, one detection at row 14. NAB gives 0.0 / 33.59 / 0.0; assuming -A_FN per window gave
    # 71.7 / 62.41 / 81.13.
    scores = np.zeros(20)
    scores[14] = 1.0
    out = nab_scores([NabFile("f", scores, [(5, 14)])])
    assert out["nab_standard"] == pytest.approx(0.0, abs=1e-9)
    assert out["nab_low_fp"] == pytest.approx(33.5865, abs=1e-3)
    assert out["nab_low_fn"] == pytest.approx(0.0, abs=1e-9)
    # Where detecting nothing is the null detector's best (NAB's corpus), nothing changes.
    assert nab_normalized(46.634, 116, STANDARD, null_raw=-116.0) == nab_normalized(46.634, 116, STANDARD)


def test_nothing_labelled_but_something_flagged_is_an_f1_of_zero_not_unmeasured():
    # SKAB's chp_score: F1 = TP / (TP + (FN + FP) / 2) = 0 with a false alarm and no anomalous row; only
    # MAR (and recall) have nothing to measure.
    point = skab_binary_metrics([np.zeros(5, dtype=bool)], [np.array([0, 1, 0, 0, 0], dtype=bool)])
    out = unmeasured({"f1": point.f1, "far": point.far, "mar": point.mar, "recall": 0.0}, point)
    assert out == {"f1": 0.0, "far": 20.0, "mar": None, "recall": None}
    quiet = skab_binary_metrics([np.zeros(5, dtype=bool)], [np.zeros(5, dtype=bool)])
    assert unmeasured({"f1": quiet.f1}, quiet) == {"f1": None}  # nothing labelled, nothing flagged
    events = aggregate_events([event_metrics(np.zeros(10, dtype=bool), np.eye(10, dtype=bool)[3])])
    assert unmeasured({"event_f1": events.f1, "event_recall": events.recall}, events=events) == {
        "event_f1": 0.0, "event_recall": None}


def test_the_score_distribution_sample_spans_every_series():
    from anomaly.evaluation_job import spread_sample

    values = np.concatenate([np.zeros(900), np.ones(100)])  # a long first series, a short last one
    sample = spread_sample(values, 100)
    assert len(sample) == 100 and sample[0] == 0 and sample[-1] == 1 and 5 <= sample.sum() <= 15
    small = np.arange(5.0)
    assert spread_sample(small, 100) is small


def test_the_score_distribution_puts_each_series_on_its_own_bar_and_splits_rows_by_label():
    """Two series with models ten times apart: as a share of their own bar, the labelled rows sit above
    1 and the rest below (raw scores pooled under one median bar mixed them, all called validation)."""
    from anomaly.evaluation_job import relative_scores
    from anomaly.protocols import SeriesResult

    def series(scale, bars=None):
        scores = scale * np.array([np.nan, 0.5, 0.5, 2.0, 3.0])
        return SeriesResult(name="s", timestamps=np.arange(5.0), values=np.zeros((5, 1)),
                            labels=np.array([False, False, False, True, True]), scores=scores,
                            flags=scores > scale, expected=np.zeros((5, 1)), threshold=scale, sensors=("x",),
                            train_seconds=0.0, bars=bars)

    normal, labelled = relative_scores([series(1.0), series(10.0), series(10.0, bars=np.full(5, 20.0))])
    np.testing.assert_allclose(normal, [0.5, 0.5, 0.5, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(labelled, [2.0, 3.0, 2.0, 3.0, 1.0, 1.5])


# ---------------------------------------------------------------- attribution (HitRate@P%, NDCG@P%)

from anomaly.evaluation import aggregate_attribution, attribution_counts, interpretation_matrix  # noqa: E402


def _one_row(scores, labelled, ps=(100, 150)):
    truth = np.zeros((1, len(scores)), bool)
    truth[0, labelled] = True
    return attribution_counts(np.array([scores], float), truth, ps=ps)


def test_attribution_both_labelled_sensors_ranked_first_score_one():
    c = _one_row([0.1, 0.9, 0.5, 0.2], [1, 2])
    assert c.rows == 1 and c.hits == {100: 1.0, 150: 1.0}
    assert c.ndcg[100] == pytest.approx(1.0) and c.ndcg[150] == pytest.approx(1.0)


def test_attribution_labelled_sensor_ranked_last_scores_zero():
    c = _one_row([0.1, 0.9, 0.5, 0.2], [0])
    assert c.hits == {100: 0.0, 150: 0.0} and c.ndcg == {100: 0.0, 150: 0.0}


def test_attribution_hand_computed_partial_hit():
    # ranks: col1 0, col2 1, col3 2, col0 3; labelled {2, 3}
    c = _one_row([0.1, 0.9, 0.5, 0.2], [2, 3])
    assert c.hits[100] == pytest.approx(0.5)  # k = 2: col1, col2
    assert c.hits[150] == pytest.approx(1.0)  # k = 3: col1, col2, col3
    ideal = 1 + 1 / math.log2(3)
    assert c.ndcg[100] == pytest.approx((1 / math.log2(3)) / ideal)  # 0.3869
    assert c.ndcg[150] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / ideal)  # 0.6934


def test_attribution_top_k_rounds_half_to_even_as_tranad():
    # one labelled sensor at 150 %: round(1.5) = 2 sensors taken (floor would take 1 and miss)
    assert _one_row([6, 5, 4, 3, 2, 1], [1], ps=(150,)).hits[150] == 1.0
    # three labelled sensors at 150 %: round(4.5) = 4 taken (ceil would take 5 and find all three)
    assert _one_row([6, 5, 4, 3, 2, 1], [1, 2, 4], ps=(150,)).hits[150] == pytest.approx(2 / 3)


def test_attribution_ties_rank_the_lower_column_first():
    assert _one_row([0.5, 0.5, 0.1], [1], ps=(100,)).hits[100] == 0.0
    assert _one_row([0.5, 0.5, 0.1], [0], ps=(100,)).hits[100] == 1.0


def test_attribution_row_without_a_score_is_a_miss_and_unlabelled_rows_do_not_count():
    scores = np.array([[np.nan, 1.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    truth = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    c = attribution_counts(scores, truth, ps=(100,))
    assert c.rows == 2 and c.hits[100] == 1.0 and c.ndcg[100] == 1.0


def test_attribution_matches_sklearn_ndcg_without_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    scores = rng.random((200, 12))
    truth = rng.random((200, 12)) < 0.2
    truth[:, 0] |= ~truth.any(axis=1)
    c = attribution_counts(scores, truth, ps=(100, 150))
    for p in (100, 150):
        want = np.mean([sklearn_metrics.ndcg_score(t[None].astype(int), s[None], k=round(p * int(t.sum()) / 100))
                        for s, t in zip(scores, truth)])
        assert c.ndcg[p] / c.rows == pytest.approx(want)
        hit = np.mean([len(set(np.argsort(-s)[:round(p * int(t.sum()) / 100)]) & set(np.flatnonzero(t))) / t.sum()
                       for s, t in zip(scores, truth)])
        assert c.hits[p] / c.rows == pytest.approx(hit)


def test_attribution_flagged_rows_counted_apart_and_pooled_per_row():
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    truth = np.array([[1, 0], [1, 0], [0, 0]], bool)
    a = attribution_counts(scores, truth, flags=np.array([True, False, True]), ps=(100,))
    assert (a.rows, a.hits[100], a.flagged_rows, a.flagged_hits[100]) == (2, 1.0, 1, 1.0)
    b = attribution_counts(np.array([[0.0, 1.0]]), np.array([[1, 0]], bool), flags=np.array([True]), ps=(100,))
    out = aggregate_attribution([a, b], ps=(100,))
    assert out["hit_rate_100"] == pytest.approx(1 / 3)  # 1 hit over 3 labelled rows
    assert out["hit_rate_100_flagged"] == pytest.approx(1 / 2)  # 1 hit over 2 flagged labelled rows
    assert (out["attribution_rows"], out["attribution_flagged_rows"]) == (3, 2)
    assert aggregate_attribution([], ps=(100,))["hit_rate_100"] is None


def test_attribution_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        attribution_counts(np.zeros((3, 2)), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="flags"):
        attribution_counts(np.zeros((3, 2)), np.ones((3, 2), bool), flags=np.ones(2, bool))


def test_interpretation_matrix_shifts_clips_and_unites_segments():
    m = interpretation_matrix([(10, 13, [0]), (12, 14, [2]), (3, 11, [1])], n_rows=4, n_cols=3, offset=10)
    assert m.tolist() == [[True, True, False], [True, False, False], [True, False, True], [False, False, True]]
