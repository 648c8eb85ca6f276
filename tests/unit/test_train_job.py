"""train_job's own refusals (the training itself is tested through real MLflow in tests/integration)."""
from __future__ import annotations

import pytest

from anomaly import train_job
from anomaly.config import build_settings
from anomaly.errors import ModelError
from anomaly.preparation import prepare_training
from tests.fixtures import normal_frame


def test_a_model_too_large_for_memory_names_its_shape(monkeypatch):
    # [model] hidden_size = 10000000 ended in torch's "can't allocate memory" traceback, exit 1
    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1600000000000000 bytes.")

    monkeypatch.setattr(train_job, "fit_values", allocate)
    settings = build_settings({"model": {"hidden_size": 10_000_000}})
    with pytest.raises(ModelError, match=r"does not fit in memory \(model.hidden_size 10000000.*make it smaller"):
        train_job.fit(prepare_training(normal_frame(200)), settings, progress=False)


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(train_job, "fit_values", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train_job.fit(prepare_training(normal_frame(200)), build_settings({}), progress=False)


def test_a_validation_stretch_that_scores_every_window_alike_is_said(caplog):
    # the last 20 % of the data a machine on standby (readings frozen at their typical values): every
    # validation window scores alike, the threshold is that one score, and normal running alarms at once
    frame = normal_frame(1200, seed=0)
    frame.iloc[900:] = frame.iloc[:900].mean().to_numpy()
    settings = build_settings({"model": {"window_size": 8, "hidden_size": 8, "latent_size": 2},
                               "training": {"epochs": 1, "device": "cpu"}})
    detector, _, val_scores = train_job.fit(prepare_training(frame), settings, progress=False)
    assert "the validation windows score alike" in caplog.text and "last 20 % of the data" in caplog.text
    caplog.clear()
    train_job.fit(prepare_training(normal_frame(1200, seed=0)), settings, progress=False)
    assert "score alike" not in caplog.text
