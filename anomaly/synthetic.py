"""Synthetic healthy pump readings for demos, tests and benchmarks. No I/O.

Three correlated periodic sensors (``temp``, ``pressure``, ``flow``) with noise, at one reading per
step: what a healthy pump looks like to the model.
"""

from __future__ import annotations

import numpy as np

SENSORS = ("temp", "pressure", "flow")


def pump_values(rows: int, seed: int = 0) -> np.ndarray:
    """(rows, 3) readings in ``SENSORS`` order."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    phase = 2 * np.pi * t / 50
    temp = 70 + 2 * np.sin(phase) + rng.normal(0, 0.1, rows)
    pressure = 1.0 + 0.1 * np.cos(phase) + rng.normal(0, 0.005, rows)
    flow = 5 + 0.5 * np.sin(phase + 0.5) + rng.normal(0, 0.03, rows)
    return np.stack([temp, pressure, flow], axis=1)
