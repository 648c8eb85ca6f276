"""Every registered version carries its own copy of ``anomaly/mlflow_model.py`` (the "models from code"
pyfunc) and runs it against the ``anomaly`` package installed now. The copies every past release registered
(tests/data/pyfunc_history, verbatim) must still predict with today's package, as the copy of today does:
aa454e0 made ``Threshold.series_bars`` ask for ``window_size``, and every version registered before it
failed each predict with a TypeError once the package was upgraded (`mlflow models serve` of an old champion)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from anomaly.detector import fit_detector
from anomaly.episodes import EpisodeRule
from anomaly.training import TrainConfig
from tests.fixtures import normal_frame, with_fault

# kept as text (.py.txt): data, not code of this package
HISTORY = sorted((Path(__file__).resolve().parents[1] / "data" / "pyfunc_history").glob("mlflow_model_*.py.txt"))
CURRENT = Path(__file__).resolve().parents[2] / "anomaly" / "mlflow_model.py"


def _pyfunc(path: Path, detector_dir: Path):
    name = f"pyfunc_{path.name.split('.')[0]}"
    spec = importlib.util.spec_from_file_location(name, path, loader=importlib.machinery.SourceFileLoader(name, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # as MLflow loads it: by path, its set_model() at the end
    model = module.DetectorModel()
    model.load_context(SimpleNamespace(artifacts={"detector": str(detector_dir)}))
    return model


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    """A plain detector and one with an alarm-episode rule, saved as a registered version's artifact."""
    frame = normal_frame(900, seed=3)
    sensors = list(frame.columns)
    detector, _, _ = fit_detector(frame.to_numpy(), sensors, {"window_size": 8, "hidden_size": 8, "latent_size": 2},
                                  TrainConfig(epochs=2, batch_size=64, device="cpu"), threshold_method="quantile")
    out = {}
    for name, rule in (("plain", None), ("episodes", EpisodeRule(drop=2.0, k=10, settle=1.5))):
        detector.threshold = detector.threshold.with_episodes(rule)
        out[name] = detector.save(tmp_path_factory.mktemp(name))
    faulty, _ = with_fault(normal_frame(300, seed=4), start=150, length=40, size=0.5)
    return out, faulty[sensors].reset_index(drop=True)


def test_the_history_holds_every_past_copy_and_todays():
    # a change to anomaly/mlflow_model.py is a new copy that versions registered from now on carry for ever:
    # add it here (its first two lines say which commit registered it)
    bodies = {path.read_text(encoding="utf-8").split("\n", 2)[2] for path in HISTORY}
    assert len(HISTORY) >= 12 and CURRENT.read_text(encoding="utf-8") in bodies


@pytest.mark.parametrize("path", HISTORY, ids=[p.name.split(".")[0].split("_")[-1] for p in HISTORY])
@pytest.mark.parametrize("kind", ["plain", "episodes"])
def test_a_past_releases_pyfunc_predicts_with_todays_package(path: Path, kind: str, detectors) -> None:
    saved, frame = detectors
    now = _pyfunc(CURRENT, saved[kind]).predict(None, frame)
    then = _pyfunc(path, saved[kind]).predict(None, frame)
    assert len(then) == len(frame) and then["score"].notna().sum() == len(frame) - 7
    scored = now["score"].notna().to_numpy()
    np.testing.assert_allclose(then["score"].to_numpy(dtype=float)[scored], now["score"].to_numpy(dtype=float)[scored])
    if kind == "plain":  # a fixed bar: the same flags then as now
        assert (then["is_anomaly"].to_numpy(dtype=bool) == now["is_anomaly"].to_numpy(dtype=bool)).all()
    assert then["is_anomaly"].to_numpy(dtype=bool)[150:200].any()  # the fault is flagged
