"""Synthetic sensor data with known faults, shared by integration and end-to-end tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.synthetic import SENSORS, pump_values


def normal_frame(rows: int = 3000, seed: int = 0, start: str = "2026-01-01T00:00:00Z") -> pd.DataFrame:
    """Three correlated periodic sensors at 1 s, with noise: what a healthy pump looks like."""
    index = pd.date_range(start, periods=rows, freq="1s", name="ts")
    return pd.DataFrame(pump_values(rows, seed), columns=list(SENSORS), index=index)


def with_fault(frame: pd.DataFrame, sensor: str = "pressure", start: int = 1200, length: int = 150,
               size: float = 0.4) -> tuple[pd.DataFrame, np.ndarray]:
    """A copy of ``frame`` where ``sensor`` is offset by ``size`` over rows start..start+length-1;
    returns it and the row labels."""
    faulty = frame.copy()
    faulty.iloc[start:start + length, faulty.columns.get_loc(sensor)] += size
    labels = np.zeros(len(frame), bool)
    labels[start:start + length] = True
    return faulty, labels


def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    """Poll ``predicate`` every ``step_s`` until it holds or ``timeout_s`` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


# The worker's consumer options in the broker tests. kafka-python waits max_poll_interval_ms + 5 s for a
# JoinGroup answer (300 s unless set) and the worker renews a join stuck for that long plus a minute.
# Joins that seemed unanswered (minutes of a test run) were answered and thrown away by kafka-python
# (mended: kafka_io._keep_finished_joins); a minute still bounds a join that truly goes unanswered (a test
# worker never spends that long between polls).
WORKER_CLIENT_OPTIONS = {"max_poll_interval_ms": 60_000}


def mlflow_store(root: Path | str, model_name: str) -> dict[str, str]:
    """The ``[mlflow]`` section of a test's own SQLite tracking store and artifact folder under ``root``."""
    root = Path(root)
    return {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts"),
            "model_name": model_name}


# --- what the tests need from the machine --------------------------------------------------------

DATASETS = Path(os.environ.get("ANOMALY_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


def missing_requirement(what: str) -> None:
    """Skip a test whose requirement (a dataset, the local broker) is missing, on a developer's machine;
    under CI (``CI`` set) fail instead: there everything is installed and present, so a missing piece is
    a broken set-up, not a reason to report green."""
    import pytest

    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{what} (CI has everything installed: this is a broken set-up)")
    pytest.skip(what)


def need_dataset(name: str, inner: str = "") -> Path:
    """``DATASETS/name`` (``ANOMALY_DATASETS`` or ../shared/datasets), when it holds ``inner`` too."""
    path = DATASETS / name
    if not (path / inner).is_dir():
        missing_requirement(f"dataset {name} not found under {DATASETS} (set ANOMALY_DATASETS)")
    return path
