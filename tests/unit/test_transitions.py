"""Transition surprise (``anomaly.transitions``): hand-computed cases, a brute-force check, past-only."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.calibration import record_ratio
from anomaly.transitions import change_symbols, transition_probabilities, transition_surprise


def brute_force(symbols: np.ndarray, n_symbols: int, alpha: float = 0.5) -> np.ndarray:
    """The definition as a loop: score each row with the counts so far, then count its transition."""
    out = np.ones(symbols.shape)
    for j in range(symbols.shape[1]):
        counts = np.zeros((n_symbols, n_symbols))
        for t in range(1, len(symbols)):
            prev, cur = symbols[t - 1, j], symbols[t, j]
            out[t, j] = (counts[prev, cur] + alpha) / (counts[prev].sum() + alpha * n_symbols)
            counts[prev, cur] += 1
    return out


def test_change_symbols_by_hand():
    values = np.array([0.0, 0.2, 1.7, 0.2, 9.2, -10.8])
    # changes 0, 0.2, 1.5, -1.5, 9, -20; the first 4 rows' changes (0.2, 1.5, -1.5) span [-1.5, 1.5]:
    # 3 bins of width 1 (symbols 1-3), 0 below the span, 4 above it
    assert change_symbols(values, 4, 3)[:, 0].tolist() == [2, 2, 3, 1, 4, 0]


def test_change_symbols_of_a_flat_training_part():
    values = np.array([5.0, 5.0, 5.0, 5.0, 6.0, 4.0, 4.0])
    assert change_symbols(values, 4, 8)[:, 0].tolist() == [1, 1, 1, 1, 9, 0, 1]


def test_the_largest_training_change_recurring_with_rounding_stays_in_span():
    t = np.arange(400)
    values = np.sin(2 * np.pi * t / 100)
    symbols = change_symbols(values, 100, 16)[:, 0]
    assert set(symbols[100:]) <= set(symbols[1:100])  # a periodic series takes no new step


def test_transition_probabilities_by_hand():
    symbols = np.array([0, 1, 0, 1, 0, 0])
    p = transition_probabilities(symbols, 2)[:, 0]
    # t=1: 0->1 unseen, context 0 unseen: 0.5/1; t=2 the same for 1->0; t=3: 0->1 seen once of once:
    # 1.5/2; t=4 likewise; t=5: 0->0 unseen, context 0 seen twice: 0.5/3
    assert p.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.75, 0.75, 0.5 / 3])


def test_transition_probabilities_equal_the_definition_as_a_loop():
    rng = np.random.default_rng(0)
    for shape, k in (((300, 1), 3), ((500, 3), 6), ((50, 2), 18)):
        symbols = rng.integers(0, k, shape)
        symbols[100:130] = 0  # a run: one transition repeated
        assert np.allclose(transition_probabilities(symbols, k), brute_force(symbols, k))


def test_transition_surprise_is_past_only_and_takes_the_least_likely_sensor():
    rng = np.random.default_rng(1)
    values = np.cumsum(rng.normal(size=(600, 2)), axis=0)
    full = transition_surprise(values, 200)
    assert np.array_equal(transition_surprise(values[:350], 200), full[:350])
    per_sensor = [transition_surprise(values[:, j], 200) for j in range(2)]
    assert np.array_equal(full, np.maximum(*per_sensor))
    assert full[0] == 0.0


def test_a_recurring_pattern_stops_being_surprising_and_a_new_step_is():
    cycle = np.array([0.0, 1.0, 3.0, 2.0, 1.0])
    values = np.tile(cycle, 200)
    values[800] = 2.5  # a step into a bin never taken from there (3 -> 2.5 instead of 3 -> 2)
    s = transition_surprise(values, 100, 8)
    assert (s[600:800] < s[100:300]).all()  # the same steps (same phase), seen more often: less surprising
    assert s[800] > 2 * s[100:800].max()
    assert record_ratio(s, 3000)[800] > 0.65


def test_plain_noise_does_not_keep_setting_records():
    # The reason for surprisal (bits) rather than odds: an unseen step out of a context seen n times has
    # odds of about 2n, a record on plain noise whenever n has grown; its surprisal grows with log n.
    alarms_bits, alarms_odds = 0, 0
    for seed in range(5):
        v = np.random.default_rng(seed).uniform(-1, 1, 5000)
        bits = transition_surprise(v, 150)
        alarms_bits += int((record_ratio(bits, 3000)[150:] > 0.545).sum())
        alarms_odds += int((record_ratio(2.0 ** bits, 3000)[150:] > 0.545).sum())
    assert alarms_bits == 0
    assert alarms_odds >= 5


@pytest.mark.parametrize("call, message", [
    (lambda: change_symbols(np.zeros(10), 5, 0), "bins"),
    (lambda: change_symbols(np.zeros(10), 1, 4), "fit_rows"),
    (lambda: change_symbols(np.array([0.0, np.nan, 1.0]), 2, 4), "finite"),
    (lambda: change_symbols(np.zeros(1), 2, 4), "two rows"),
    (lambda: transition_probabilities(np.array([0, 3]), 3), "symbols"),
    (lambda: transition_probabilities(np.array([0, 1]), 2, alpha=0.0), "alpha"),
])
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
