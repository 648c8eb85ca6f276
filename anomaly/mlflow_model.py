"""The MLflow pyfunc for a registered detector, logged as "models from code".

MLflow loads this file by path and calls ``set_model``; the model's only artifact is the detector
directory (``state_dict`` + JSON, see ``anomaly.detector``), so loading by
``models:/<name>@<alias>`` works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

predict(DataFrame of readings, one column per sensor, rows in time order on the model's grid)
-> DataFrame row-aligned with the input: ``score`` (of the window ending at that row; missing, a null
in JSON, before the first full window), ``threshold`` (the bar in force at that row: the fitted value,
or with an adaptive rule the higher of it and the trailing level, the input's rows being one entity's
history), ``is_anomaly``, ``top_sensor`` (null where there is no score). A missing cell (NaN, JSON null)
is filled as the streaming worker fills it (at its default ``worker.max_fill_steps``): the sensor's previous
value for up to 5 missing rows in a row, then (and before its first value) its typical value. A row with
every sensor missing is no reading: more than 5 of them in a row are an outage, and the windows over one
get no score (the worker restarts its window there, and `anomaly score` puts such a file on its grid so).
An optional ``entity`` column makes the input a fleet's rows: each entity's rows (in time order) are
scored as a series of their own and held to that entity's threshold where the model fitted one
(``Threshold.per_entity``), else the shared one.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from anomaly.codec import too_large_to_score
from anomaly.grid import outage_rows
from anomaly.windowing import windows_touching


class DetectorModel(PythonModel):
    def load_context(self, context) -> None:
        from anomaly.detector import Detector

        self.detector = Detector.load(context.artifacts["detector"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        det = self.detector
        missing = [s for s in det.sensors if s not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks sensors {missing}; the model needs {list(det.sensors)}")
        n = len(model_input)
        score = np.full(n, np.nan)
        bars = np.full(n, np.nan)
        top = np.full(n, None, dtype=object)
        if ENTITY_COLUMN in model_input.columns and ENTITY_COLUMN not in det.sensors:
            # A fleet's rows: each entity's own windows, held to its own threshold where the model has one.
            ids = model_input[ENTITY_COLUMN].to_numpy(dtype=object)
            for entity, rows in pd.Series(range(n)).groupby(ids, sort=False, dropna=False).indices.items():
                name = "" if pd.isna(entity) else str(entity)
                score[rows], bars[rows], top[rows] = _score_rows(det, model_input.iloc[rows], det.threshold.for_entity(name))
        else:
            score, bars, top = _score_rows(det, model_input, det.threshold)
        # Nullable dtypes whose missing value is <NA>: null in MLflow's JSON responses, not the NaN that
        # strict JSON parsers refuse (pandas' default string dtype would turn None into NaN).
        return pd.DataFrame({"score": pd.array(score, dtype="Float64"), "threshold": bars,
                             "is_anomaly": score > bars,
                             "top_sensor": pd.array(top, dtype=pd.StringDtype("python", na_value=pd.NA))},
                            index=model_input.index)


ENTITY_COLUMN = "entity"  # as anomaly.tables names it; optional in the logged signature
SENSOR_FILL_ROWS = 5  # a missing cell takes its sensor's previous value this many rows in a row at most:
# the worker's default max_fill_steps (anomaly.window_state), which the model does not carry


def _score_rows(det, frame: pd.DataFrame, threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One entity's rows (in time order): each row's window score, the bar in force, the top sensor."""
    values = frame[list(det.sensors)].to_numpy(dtype=np.float64)
    # ±inf, or a number too large to score (|value| >= 1e15, ``codec.MAX_ABS_VALUE``), is a missing reading,
    # as `anomaly score` reads it (the worker dead-letters it); scored as a value, inf gave scores of 1e32
    # and flagged every window holding it, and 1e39 in two sensors a NaN score (never flagged).
    values = np.where(too_large_to_score(values), np.nan, values)
    # A row with no sensor at all is no reading (the worker's "empty"): more than 5 in a row are an outage,
    # and no window over one is scored, as `anomaly score` and the worker (a restarted window) give none.
    no_reading = np.isnan(values).all(axis=1) if len(det.sensors) else np.zeros(len(values), dtype=bool)
    outage = outage_rows(no_reading, SENSOR_FILL_ROWS)
    if np.isnan(values).any():  # as the worker does: forward-fill (so far), then the sensor's typical value
        filled = pd.DataFrame(values).ffill(limit=SENSOR_FILL_ROWS).to_numpy()
        values = np.where(np.isnan(filled), np.asarray(det.fill_values()), filled)
    n = len(values)
    score = np.full(n, np.nan)
    top = np.full(n, None, dtype=object)
    if n >= det.window_size:
        scored = det.score_values(values)
        scores = np.asarray(scored.scores, dtype=np.float64).copy()
        if outage.any():
            scores[windows_touching(outage, det.window_size)] = np.nan
        score[scored.end_rows] = scores
        top[scored.end_rows] = [det.sensors[j] if np.isfinite(v) else None  # no score, no sensor to blame
                                for j, v in zip(scored.sensor_errors.argmax(axis=1), scores)]
    return score, threshold.series_bars(score, window_size=det.window_size), top  # the bar: fitted, moved by an adaptive or episode rule


mlflow.models.set_model(DetectorModel())
