"""A trained detector: network, scaler, threshold and sensor list, and how to save and load it.

On disk a detector is a directory of plain files, so loading never unpickles code:

    model.json      format version, kind, ModelConfig, sensors, sampling period
    weights.pt      the network's state_dict (read with ``torch.load(weights_only=True)``)
    scaler.json     per-sensor centre and scale
    threshold.json  the fitted threshold (method, value, parameters)
    meta.json       free-form facts: training data range and source, metrics

Pure logic plus local-file save/load; no Kafka, no MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anomaly.errors import ModelError
from anomaly.model import LSTMAutoencoder, ModelConfig, build_model
from anomaly.scaling import Scaler, fit_scaler
from anomaly.scoring import SCORE_BATCH, sensor_contributions, window_scores
from anomaly.thresholds import Threshold, fit_threshold
from anomaly.training import TrainCallback, TrainConfig, TrainResult, train_autoencoder
from anomaly.windowing import make_windows, window_end_rows, windows_touching

FORMAT_VERSION = 1
FILES = ("model.json", "weights.pt", "scaler.json", "threshold.json", "meta.json")


# Scaled value that stands for "typical" when a missing sensor has no earlier reading: the centre of
# a standard/robust scaler, the middle of a minmax one (whose centre is the training minimum).
_TYPICAL_SCALED = {"standard": 0.0, "robust": 0.0, "minmax": 0.5}

@dataclass(frozen=True)
class ScoredSeries:
    """Scores of every window of a series; window ``i`` ends at row ``end_rows[i]``."""

    end_rows: np.ndarray  # (N,) last row of each window
    scores: np.ndarray  # (N,) anomaly score
    sensor_errors: np.ndarray  # (N, F) per-sensor error (scaled units)
    actual: np.ndarray  # (N, F) reading at each window's last row (original units)
    expected: np.ndarray  # (N, F) reconstruction of that reading (original units)
    flags: np.ndarray  # (N,) bool: score above the threshold
    # (N, F) bool: the sensor was not read at the window's last row (``actual`` there is a filled stand-in);
    # None: every one was read
    last_missing: np.ndarray | None = None

    def top_sensors(self, i: int, sensors: Sequence[str], k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` sensors with the largest share of window ``i``'s error, with actual vs expected; a
        sensor not read at the window's last row has ``"actual": None, "filled": True`` (as the worker's
        events say it), not its filled value shown as if read."""
        shares = sensor_contributions(self.sensor_errors[i:i + 1])[0]
        order = np.argsort(-shares, kind="stable")[:k]
        null = [False] * len(sensors) if self.last_missing is None else self.last_missing[i].tolist()
        return [{"sensor": sensors[j], "share": float(shares[j]),
                 "actual": None if null[j] else float(self.actual[i, j]),
                 "expected": float(self.expected[i, j]), "filled": bool(null[j])} for j in order]


@dataclass
class Detector:
    model: LSTMAutoencoder
    scaler: Scaler
    threshold: Threshold
    period_s: float | None = None  # sampling period of the grid the model was trained on
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def sensors(self) -> tuple[str, ...]:
        return self.scaler.sensors

    @property
    def ignored_sensors(self) -> tuple[str, ...]:
        """Sensors its training left out (constant, flat or mostly missing in the training data:
        ``meta["dropped_sensors"]``): readings may still carry them, and they are not read."""
        return tuple(str(s) for s in self.meta.get("dropped_sensors") or () if s not in self.sensors)

    def fill_values(self) -> tuple[float, ...]:
        """Per sensor, in original units, the value that stands in for a missing reading with no earlier
        one: "typical" for the scaler (the centre of a standard/robust one, the middle of a minmax one,
        whose centre is the training minimum)."""
        typical = _TYPICAL_SCALED.get(self.scaler.method, 0.0)
        return tuple(float(v) for v in self.scaler.inverse(np.full(len(self.sensors), typical)))

    @property
    def window_size(self) -> int:
        return self.config.window_size

    def score_values(self, values: np.ndarray, stride: int = 1, device: str | torch.device = "cpu",
                     batch_size: int = SCORE_BATCH, missing: np.ndarray | None = None) -> ScoredSeries:
        """Score every window of a (T, F) array of readings in original units, columns in
        ``self.sensors`` order, without gaps (fill them first). ``missing`` (T, F) bool: the cells that
        were filled, not read (``Prepared.missing``); each window's last row of it is ``last_missing``."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(self.sensors):
            raise ModelError(f"expected (rows, {len(self.sensors)}) readings, got shape {values.shape}")
        scaled = self.scaler.transform(values)
        windows = make_windows(scaled, self.window_size, stride)
        ends = window_end_rows(len(values), self.window_size, stride)
        scored = self.score_windows(windows, values[ends], ends, device, batch_size)
        return scored if missing is None else replace(scored, last_missing=np.asarray(missing, dtype=bool)[ends])

    def score_windows(self, windows: np.ndarray, actual: np.ndarray, end_rows: np.ndarray,
                      device: str | torch.device = "cpu", batch_size: int = SCORE_BATCH,
                      precision: str = "fp32", forward_model: torch.nn.Module | None = None) -> ScoredSeries:
        """Score scaled windows (N, W, F); ``actual`` is each window's last reading in original units.
        ``precision``: see ``anomaly.scoring.window_scores``. ``forward_model``: the module that runs the
        forward passes instead of ``self.model`` (the worker's checked TorchScript trace of it)."""
        model = (self.model if forward_model is None else forward_model).to(device)
        ws = window_scores(model, windows, device, batch_size, precision)
        expected = self.scaler.inverse(ws.last_reconstruction)
        return ScoredSeries(end_rows=np.asarray(end_rows), scores=ws.scores, sensor_errors=ws.sensor_errors,
                            actual=np.asarray(actual, dtype=np.float64), expected=expected,
                            flags=self.threshold.flags(ws.scores))

    # --- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_doc = {"format_version": FORMAT_VERSION, "kind": "lstm_autoencoder",
                     "model_config": self.config.to_dict(), "sensors": list(self.sensors),
                     "period_s": self.period_s}
        _write_json(directory / "model.json", model_doc)
        torch.save(self.model.state_dict(), directory / "weights.pt")
        _write_json(directory / "scaler.json", self.scaler.to_dict())
        _write_json(directory / "threshold.json", self.threshold.to_dict())
        _write_json(directory / "meta.json", self.meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Detector":
        directory = Path(directory)
        missing = [name for name in FILES if not (directory / name).is_file()]
        if missing:
            raise ModelError(f"{directory} is not a saved detector: missing {', '.join(missing)}")
        model_doc = _read_json(directory / "model.json")
        if model_doc.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{directory}: unsupported format_version {model_doc.get('format_version')!r}")
        config = ModelConfig.from_dict(model_doc["model_config"])
        model = build_model(config)
        state = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        scaler = Scaler.from_dict(_read_json(directory / "scaler.json"))
        if list(scaler.sensors) != list(model_doc["sensors"]):
            raise ModelError(f"{directory}: scaler sensors do not match model sensors")
        return cls(model=model, scaler=scaler, threshold=Threshold.from_dict(_read_json(directory / "threshold.json")),
                   period_s=model_doc.get("period_s"), meta=_read_json(directory / "meta.json"))


def fit_detector(train_values: np.ndarray, sensors: Sequence[str], model_params: dict[str, Any],
                 train_config: TrainConfig, threshold_method: str = "pot",
                 threshold_params: dict[str, Any] | None = None, scaler_method: str = "standard",
                 stride: int = 1, callbacks: Sequence[TrainCallback] = (), period_s: float | None = None,
                 progress_desc: str = "training", gaps: np.ndarray | None = None,
                 val_from_row: int | None = None) -> tuple[Detector, TrainResult, np.ndarray]:
    """Fit scaler, network and threshold on gap-free training readings (T, F) in original units.

    ``model_params`` are the ModelConfig fields other than ``n_features`` (``window_size`` required).
    ``gaps`` (T,) bool marks rows that only stand in for a gap (``Prepared.gaps``): the scaler ignores
    them and no window touching one trains or validates. ``val_from_row``: the windows starting there or
    later validate (a fleet's recent parts), instead of the last ``validation_fraction`` of them.
    Returns the detector, the training result and the validation window scores the threshold was
    fitted on.
    """
    train_values = np.asarray(train_values, dtype=np.float64)
    gaps = None if gaps is None or not np.any(gaps) else np.asarray(gaps, dtype=bool)
    scaler = fit_scaler(train_values if gaps is None else train_values[~gaps], list(sensors), scaler_method)
    config = ModelConfig(n_features=len(sensors), **model_params)
    windows = make_windows(scaler.transform(train_values), config.window_size, stride)
    starts = np.arange(len(windows), dtype=np.int64) * stride  # each window's first row
    # the windows touching a gap neither train nor validate (selected there, not here: ``windows[kept]``
    # would copy the sliding view, W times the memory of its rows)
    kept = None if gaps is None else ~windows_touching(gaps, config.window_size, stride)
    result = train_autoencoder(windows, config, train_config, callbacks, progress_desc, starts=starts,
                               val_from_row=val_from_row, kept=kept)
    kept_starts = starts if kept is None else starts[kept]
    result.val_start_row = int(kept_starts[len(kept_starts) - result.n_val_windows])
    val_scores = window_scores(result.model, result.val_windows).scores
    if result.val_index is not None:
        val_scores = val_scores[result.val_index]
    threshold = fit_threshold(val_scores, threshold_method, **(threshold_params or {}))
    detector = Detector(model=result.model, scaler=scaler, threshold=threshold, period_s=period_s)
    return detector, result, val_scores


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
