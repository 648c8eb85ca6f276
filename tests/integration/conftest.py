"""Fixtures for the streaming tests: a small detector trained on synthetic pump data and registered
as @champion in a real SQLite MLflow registry (trained once per session)."""

from __future__ import annotations

import pytest

from anomaly.config import build_settings
from tests.fixtures import mlflow_store


@pytest.fixture(scope="session")
def registry_settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return build_settings({
        "mlflow": mlflow_store(root, "pump"),
        "model": {"window_size": 16, "hidden_size": 24, "latent_size": 8},
        "training": {"epochs": 20, "batch_size": 64, "device": "cpu"},
        "threshold": {"method": "pot", "risk": 0.002, "init_quantile": 0.95},
    })


@pytest.fixture(scope="session")
def champion(registry_settings):
    """(settings, outcome) of a detector registered as pump@champion."""
    from anomaly.preparation import prepare_training
    from anomaly.train_job import run_training
    from tests.fixtures import normal_frame

    prepared = prepare_training(normal_frame(2500))
    outcome = run_training(prepared, registry_settings, source="synthetic", dataset="synthetic", promote=True,
                           progress=False)
    return registry_settings, outcome
