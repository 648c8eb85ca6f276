"""Every model variant through the real MLflow SQLite registry: trained, registered, loaded back by
``models:/<name>@<alias>`` with pickle loading disabled, scoring exactly as the in-memory model."""

import numpy as np
import pytest

from anomaly import registry
from anomaly.config import build_settings
from anomaly.preparation import prepare_training
from anomaly.train_job import run_training
from tests.fixtures import mlflow_store, normal_frame, with_fault

pytestmark = pytest.mark.integration

VARIANTS = {
    "stacked": {"num_layers": 2, "dropout": 0.1},
    "bidirectional": {"bidirectional": True},
    "gru": {"cell": "gru"},
    "peephole": {"cell": "peephole"},
    "attention": {"attention": True},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("variants")  # one store for every variant


@pytest.fixture(scope="module")
def prepared():
    return prepare_training(normal_frame(600))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_round_trip_through_the_registry(variant, store, prepared, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    name = f"pump-{variant}"
    settings = build_settings({
        "mlflow": mlflow_store(store, name),
        "model": {"window_size": 8, "hidden_size": 8, "latent_size": 4, **VARIANTS[variant]},
        "training": {"epochs": 2, "batch_size": 64, "device": "cpu"},
        "threshold": {"method": "quantile", "q": 0.99},
    })
    outcome = run_training(prepared, settings, source="synthetic", dataset="synthetic", promote=True, progress=False)
    assert outcome.promoted and outcome.version == "1"
    for key, value in VARIANTS[variant].items():  # the saved model records its variant
        assert getattr(outcome.detector.config, key) == value

    import mlflow

    faulty, _ = with_fault(normal_frame(120, seed=3), start=60, length=20)
    frame = faulty[list(outcome.detector.sensors)]
    values = frame.to_numpy()
    expected = outcome.detector.score_values(values).scores
    w = outcome.detector.window_size

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = pyfunc.predict(frame.reset_index(drop=True))
    np.testing.assert_allclose(out["score"].to_numpy(dtype=float, na_value=np.nan)[w - 1:], expected, rtol=1e-6)

    loaded, version = registry.load_detector(name, "champion")  # what the worker serves
    assert version == "1"
    assert loaded.config == outcome.detector.config
    np.testing.assert_array_equal(loaded.score_values(values).scores, expected)
    params = mlflow.get_run(outcome.run_id).data.params
    assert params["model.cell"] == outcome.detector.config.cell  # the run's parameters name the variant too
