"""ModelFollower against a real MLflow SQLite registry: two tiny trained versions, a broken one, and an
unreachable tracking server. The clock is faked, so no test waits for a check interval."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from anomaly import registry, tracking
from anomaly.config import build_settings
from anomaly.errors import RegistryError
from anomaly.model_follower import ModelFollower
from anomaly.preparation import prepare_training
from anomaly.train_job import run_training
from tests.fixtures import mlflow_store, normal_frame

pytestmark = pytest.mark.integration

NAME = "pump"
INTERVAL_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Versions 1 and 2 trained (1 epoch, window 8) and v3 registered with no detector in it."""
    tmp = tmp_path_factory.mktemp("follower")
    settings = build_settings({
        "mlflow": mlflow_store(tmp, NAME),
        "model": {"window_size": 8, "hidden_size": 8, "latent_size": 2},
        "training": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "threshold": {"method": "quantile", "q": 0.95},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        prepared = prepare_training(normal_frame(300))
        first = run_training(prepared, settings, source="synthetic", dataset="synthetic", promote=True,
                             progress=False)
        # Another seed: v2's weights differ from v1's, so scoring "like v2" shows v2's weights were loaded.
        reseeded = dataclasses.replace(settings, training=dataclasses.replace(settings.training, seed=1))
        second = run_training(prepared, reseeded, source="synthetic", dataset="synthetic", alias="challenger",
                              progress=False)
        empty = tmp / "empty-model"
        empty.mkdir()
        broken = registry.client().create_model_version(NAME, source=str(empty))
        assert (first.version, second.version, str(broken.version)) == ("1", "2", "3")
        yield settings, first, second
        tracking.configure(settings.mlflow.tracking_uri)


def use_store(settings, champion: str) -> None:
    tracking.configure(settings.mlflow.tracking_uri)
    registry.promote(NAME, champion, "champion", reason="test setup")


def counting_loader(calls: list[str]):
    def load(name: str, version: str):
        calls.append(version)
        return registry.load_detector(name, version)

    return load


def test_poll_returns_a_newly_promoted_version(store):
    settings, first, second = store
    use_store(settings, "1")
    clock = Clock()
    follower = ModelFollower(NAME, "champion", INTERVAL_S, clock=clock)
    detector, version = follower.current()
    assert version == "1" and detector.sensors == first.detector.sensors

    registry.promote(NAME, "2", "champion", reason="test")
    assert follower.poll() is None  # not yet time to check
    clock.now += INTERVAL_S
    swapped = follower.poll()
    assert swapped is not None and swapped[1] == "2" and follower.current()[1] == "2"
    values = normal_frame(40, seed=5)[list(second.detector.sensors)].to_numpy()
    assert not np.array_equal(first.detector.score_values(values).scores, second.detector.score_values(values).scores)
    np.testing.assert_array_equal(swapped[0].score_values(values).scores,
                                  second.detector.score_values(values).scores)
    clock.now += INTERVAL_S
    assert follower.poll() is None  # nothing moved


def test_broken_version_leaves_current_model_and_backs_off(store):
    settings, _, _ = store
    use_store(settings, "2")
    clock, calls = Clock(), []
    follower = ModelFollower(NAME, "champion", INTERVAL_S, counting_loader(calls), clock=clock)

    registry.promote(NAME, "3", "champion", reason="a broken version")
    clock.now += INTERVAL_S
    assert follower.poll() is None
    assert follower.current()[1] == "2" and follower.failures == 1 and calls == ["2", "3"]
    clock.now += INTERVAL_S
    assert follower.poll() is None and calls == ["2", "3"]  # backing off: not retried at this check
    clock.now += INTERVAL_S
    assert follower.poll() is None and calls == ["2", "3", "3"] and follower.failures == 2

    registry.promote(NAME, "1", "champion", reason="fix forward")
    clock.now += INTERVAL_S
    swapped = follower.poll()
    assert swapped is not None and swapped[1] == "1"


def test_unreachable_registry_leaves_current_model(store, monkeypatch):
    settings, _, _ = store
    use_store(settings, "2")
    clock = Clock()
    follower = ModelFollower(NAME, "champion", INTERVAL_S, clock=clock)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracking.configure("http://127.0.0.1:9")  # nothing listens on the discard port
    try:
        clock.now += INTERVAL_S
        assert follower.poll() is None
        assert follower.current()[1] == "2" and follower.failures == 1
        with pytest.raises(RegistryError):
            ModelFollower(NAME, "champion", INTERVAL_S, clock=clock)  # a worker cannot start without a model
    finally:
        tracking.configure(settings.mlflow.tracking_uri)
    clock.now += INTERVAL_S
    assert follower.poll() is None and follower.failures == 1  # reachable again, alias unchanged
