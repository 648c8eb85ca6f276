"""Per-sensor scaling fitted on training data only, saved with the model as JSON. No I/O.

Scalers are plain data (a method name and per-sensor centre and scale), so they serialise to JSON
and load without unpickling anything.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomaly.errors import ConfigError

# A constant sensor (max == min) gets scale 1, not a division by zero. Below that, a spread under
# SCALE_FLOOR times the sensor's level is float64 rounding, not variation (scale 1 too). Purely relative:
# a sensor read in small units (a leakage current of nA in amperes) keeps its own spread, however small.
SCALE_FLOOR = 1e-12
# And no scale under this, in any units: a reading the codec accepts (|value| < 1e15) stays inside
# float32 once scaled (2e15 / 1e-20 = 2e35 < 3.4e38), so a wild reading scores huge, never inf.
MIN_SCALE = 1e-20
METHODS = ("standard", "robust", "minmax")


@dataclass(frozen=True)
class Scaler:
    """``(x - centre) / scale`` per sensor. ``method`` records how centre and scale were fitted."""

    method: str
    sensors: tuple[str, ...]
    centre: tuple[float, ...]
    scale: tuple[float, ...]

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale a (..., F) array; returns float32, a new array."""
        return ((np.asarray(values, dtype=np.float64) - self._centre) / self._scale).astype(np.float32)

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        """Undo ``transform`` on a (..., F) array; returns float64."""
        return np.asarray(scaled, dtype=np.float64) * self._scale + self._centre

    @property
    def _centre(self) -> np.ndarray:
        return np.asarray(self.centre, dtype=np.float64)

    @property
    def _scale(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sensors": list(self.sensors),
                "centre": list(self.centre), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scaler":
        return cls(method=str(data["method"]), sensors=tuple(data["sensors"]),
                   centre=tuple(float(v) for v in data["centre"]),
                   scale=tuple(float(v) for v in data["scale"]))


def fit_scaler(values: np.ndarray, sensors: list[str] | tuple[str, ...], method: str = "standard") -> Scaler:
    """Fit a scaler on training values (T, F), ignoring NaNs.

    - ``standard``: mean and standard deviation.
    - ``robust``: median and inter-quartile range (outliers in training data move it less).
    - ``minmax``: minimum and range, to [0, 1].
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(sensors):
        raise ValueError(f"values shape {values.shape} does not match {len(sensors)} sensors")
    if values.shape[0] == 0:
        raise ValueError("cannot fit a scaler on zero rows")
    if method == "standard":
        centre, scale = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    elif method == "robust":
        q25, centre, q75 = np.nanpercentile(values, [25, 50, 75], axis=0)
        scale = q75 - q25
    elif method == "minmax":
        lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        centre, scale = lo, hi - lo
    else:
        raise ConfigError("data.scaler", f"unknown scaler {method!r}; choose one of {', '.join(METHODS)}")
    centre = np.where(np.isfinite(centre), centre, 0.0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its scale is 1 below
        constant = ~(np.nanmax(values, axis=0) > np.nanmin(values, axis=0))
    floor = np.maximum(SCALE_FLOOR * np.abs(centre), MIN_SCALE)
    scale = np.where(np.isfinite(scale) & (scale > floor) & ~constant, scale, 1.0)
    return Scaler(method=method, sensors=tuple(sensors),
                  centre=tuple(float(v) for v in centre), scale=tuple(float(v) for v in scale))


# A reading more than EXTREME_SPREADS typical spreads (IQR / 1.349) from its sensor's median is extreme; when
# such readings are a handful (EXTREME_FEW, or EXTREME_FRACTION of the rows: a sentinel value, a glitch; not a
# quantised sensor's other level, nor a spiky metric's spikes, 0.4-0.8 % of SMD's m08) and the standard or
# min-max scale is over WIDE_SCALE times what the rest would give, they set it
EXTREME_SPREADS = 100.0
EXTREME_FEW = 5
EXTREME_FRACTION = 0.001
WIDE_SCALE = 10.0


def _extremes(column: np.ndarray, median: float, typical: float) -> tuple[int, np.ndarray]:
    """How many of ``column``'s readings are extreme, and the others, when they are few (a sentinel value, a
    glitch); ``(0, column)`` otherwise (none, or so many that they are the sensor's own: a quantised one)."""
    column = column[np.isfinite(column)]
    if not typical > 0:
        return 0, column
    extreme = np.abs(column - median) > EXTREME_SPREADS * typical
    n = int(extreme.sum())
    if n == 0 or n > max(EXTREME_FEW, EXTREME_FRACTION * column.size):
        return 0, column
    return n, column[~extreme]


def _set_by_extremes(n: int, rest: np.ndarray, method: str, scale: float, median: float) -> str | None:
    """What to say when ``n`` extreme readings set a standard or min-max ``scale`` (``rest``: the other
    readings; None: they did not)."""
    if method == "robust" or n == 0:
        return None
    without = float(np.std(rest)) if method == "standard" else float(np.ptp(rest))
    if not scale > WIDE_SCALE * without > 0:
        return None
    return (f"{method} scale {scale:.3g} was set by {n} extreme reading(s), more than {EXTREME_SPREADS:g} typical "
            f"spreads from its median {median:.6g} (a sentinel value or glitch?); without them it is {without:.3g}. "
            "A fault of this sensor will barely move its scaled error: remove those rows, or set data.scaler = robust")


def scale_warnings(values: np.ndarray, scaler: Scaler, ratio: float = 0.01) -> list[tuple[str, str]]:
    """Sensors whose fitted scale misstates how they vary in ``values`` (the training rows): a robust or
    min-max scale under ``ratio`` of the standard deviation (a quantised sensor whose quartiles coincide
    while it still jumps: its jumps become huge scaled errors and can swamp the rest), one that fell
    back to 1 while the sensor does vary (its variation is then weighted by its units, not its spread),
    or a standard or min-max scale set by a few extreme readings (``WIDE_SCALE``: one sentinel value or
    glitch in the training rows, and the sensor's normal variation, and a fault of it, barely move its
    scaled error: the model is blind to it). ``(sensor, detail)`` each; the scale is kept as fitted, this
    only says so."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column
        std = np.nanstd(values, axis=0)
        constant = ~(np.nanmax(values, axis=0) > np.nanmin(values, axis=0))  # as fit_scaler tells it
        q25, median, q75 = np.nanpercentile(values, [25, 50, 75], axis=0)
    typical = (q75 - q25) / 1.349  # the standard deviation of a normal sensor, whatever its outliers
    out = []
    for j, (sensor, scale, spread, flat) in enumerate(zip(scaler.sensors, scaler.scale, std, constant)):
        if flat or not np.isfinite(spread):
            continue  # constant: scale 1 is right
        n_extreme, rest = _extremes(values[:, j], median[j], typical[j])
        wide = _set_by_extremes(n_extreme, rest, scaler.method, scale, median[j])
        if n_extreme:
            spread = float(np.std(rest))  # a glitch's jumps are not the sensor's own
        if wide:
            out.append((sensor, wide))
        elif scale < ratio * spread:
            out.append((sensor, f"{scaler.method} scale {scale:.3g} is under {ratio:g} x its standard deviation "
                                f"{spread:.3g}: its jumps become large scaled errors"))
        elif scale == 1.0 and not 0.1 <= spread <= 10.0:
            out.append((sensor, f"{scaler.method} scale fell back to 1 (no spread between its quartiles), its "
                                f"standard deviation is {spread:.3g}"))
    return out
