"""The detector through a real MLflow SQLite tracking store and model registry."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from anomaly import registry, tracking
from anomaly.config import build_settings
from anomaly.preparation import prepare_training
from anomaly.train_job import run_training
from tests.fixtures import mlflow_store, normal_frame, with_fault

pytestmark = pytest.mark.integration


@pytest.fixture()
def settings(tmp_path):
    return build_settings({
        "mlflow": mlflow_store(tmp_path, "pump"),
        "model": {"window_size": 16, "hidden_size": 16, "latent_size": 4},
        "training": {"epochs": 4, "batch_size": 64, "device": "cpu"},
        "threshold": {"method": "pot", "risk": 0.01, "init_quantile": 0.9},
    })


def champion_and_copies(settings, copies: int):
    """A small model trained and promoted (v1), then ``copies`` more versions of it (v2 ..); the first
    training result, a registry client and the model's source."""
    first = run_training(prepare_training(normal_frame(600)), settings, source="synthetic", dataset="synthetic",
                         promote=True, progress=False)
    c = registry.client()
    source = c.get_model_version("pump", first.version).source
    for version in range(2, 2 + copies):
        assert str(c.create_model_version("pump", source, run_id=first.run_id).version) == str(version)
    return first, c, source


def test_register_load_promote_rollback(settings, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    prepared = prepare_training(normal_frame(1200))
    first = run_training(prepared, settings, source="synthetic", dataset="synthetic", promote=True, progress=False)
    assert first.version == "1" and first.promoted

    import mlflow

    run = mlflow.get_run(first.run_id)
    assert run.data.tags["dataset"] == "synthetic" and "code_version" in run.data.tags
    assert run.data.tags["data.start"].startswith("2026-01-01")
    # The sensors the version reads, on the run and on the version (what a replay must send: DESIGN §2).
    assert run.data.tags["data.sensors"] == ",".join(first.detector.sensors)
    version = mlflow.MlflowClient().get_model_version("pump", "1")
    assert version.tags["data.sensors"] == ",".join(first.detector.sensors)
    # The version's page says what a person compares versions by: its threshold and validation loss.
    assert f"threshold {first.detector.threshold.value:.4g} (pot)" in version.description
    assert f"Best validation loss {first.result.best_val_loss:.4g}" in version.description
    history = mlflow.MlflowClient().get_metric_history(first.run_id, "val_loss")
    assert len(history) == len(first.result.history) >= 1  # one point per epoch
    assert run.data.metrics["threshold"] == pytest.approx(first.detector.threshold.value)
    assert run.data.metrics["batch_size_used"] == 64.0  # as configured (training.fast would raise it)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/error_distribution.png", "plots/validation_overlay.png"} <= artifacts

    # Loaded back two ways (the pyfunc by alias with pickle loading disabled, and the detector),
    # the model gives identical scores.
    faulty, _ = with_fault(normal_frame(400, seed=3), start=200, length=50)
    values = faulty[list(first.detector.sensors)].to_numpy()
    expected = first.detector.score_values(values).scores
    pyfunc = mlflow.pyfunc.load_model("models:/pump@champion")
    out = pyfunc.predict(faulty[list(first.detector.sensors)].reset_index(drop=True))
    w = first.detector.window_size
    np.testing.assert_allclose(out["score"].to_numpy(dtype=float, na_value=np.nan)[w - 1:], expected, rtol=1e-6)
    assert out["score"].iloc[: w - 1].isna().all()
    assert out["top_sensor"].iloc[: w - 1].isna().all() and out["top_sensor"].iloc[w - 1] in first.detector.sensors
    # Served as JSON, a missing score is null, not the NaN strict parsers refuse.
    from mlflow.pyfunc.scoring_server import predictions_to_json
    import io
    import json as json_module

    body = io.StringIO()
    predictions_to_json(out.head(w), body)
    rows = json_module.loads(body.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON response"))
    assert rows["predictions"][0]["score"] is None and rows["predictions"][0]["top_sensor"] is None
    # A missing cell is filled as the worker fills it (the previous value): every window still gets a score.
    gappy = faulty[list(first.detector.sensors)].reset_index(drop=True).copy()
    gappy.iloc[100, 1] = np.nan
    ffilled = gappy.ffill()
    out_gappy = pyfunc.predict(gappy)
    assert out_gappy["score"].iloc[w - 1:].notna().all()
    np.testing.assert_allclose(out_gappy["score"].to_numpy(dtype=float, na_value=np.nan),
                               pyfunc.predict(ffilled)["score"].to_numpy(dtype=float, na_value=np.nan), rtol=1e-6)
    # A sensor missing longer than the worker fills from its last value takes its typical value, as there.
    dead = faulty[list(first.detector.sensors)].reset_index(drop=True).copy()
    dead.iloc[200:208, 1] = np.nan
    by_hand = dead.copy()
    by_hand.iloc[200:205, 1] = dead.iloc[199, 1]
    by_hand.iloc[205:208, 1] = first.detector.fill_values()[1]
    np.testing.assert_allclose(pyfunc.predict(dead)["score"].to_numpy(dtype=float, na_value=np.nan),
                               pyfunc.predict(by_hand)["score"].to_numpy(dtype=float, na_value=np.nan), rtol=1e-6)
    # ±inf is a missing reading there too (before, scored as a value: 4e32 and every window holding it flagged).
    infinite = gappy.copy()
    infinite.iloc[100, 1] = np.inf
    np.testing.assert_allclose(pyfunc.predict(infinite)["score"].to_numpy(dtype=float, na_value=np.nan),
                               out_gappy["score"].to_numpy(dtype=float, na_value=np.nan), rtol=1e-6)
    # So is a number too large to score (1e39 in two sensors gave NaN scores, never flagged, each blaming
    # a sensor that read normally).
    wild, blank = gappy.copy(), gappy.copy()
    wild.iloc[150, [0, 2]] = [1e39, -1e15]
    blank.iloc[150, [0, 2]] = np.nan
    out_wild = pyfunc.predict(wild)
    assert out_wild["score"].iloc[w - 1:].notna().all() and out_wild["top_sensor"].iloc[w - 1:].notna().all()
    np.testing.assert_allclose(out_wild["score"].to_numpy(dtype=float, na_value=np.nan),
                               pyfunc.predict(blank)["score"].to_numpy(dtype=float, na_value=np.nan), rtol=1e-6)
    # The package travels with the model (a server built from the model's environment can import it).
    local = mlflow.artifacts.download_artifacts("models:/pump@champion")
    assert (Path(local) / "code" / "anomaly" / "detector.py").exists()
    loaded, version = registry.load_detector("pump", "champion")
    assert version == "1"
    np.testing.assert_array_equal(loaded.score_values(values).scores, expected)
    assert loaded.threshold == first.detector.threshold and loaded.scaler == first.detector.scaler

    # A second version, promoted, then rolled back.
    second = run_training(prepared, settings, source="synthetic", dataset="synthetic", alias="challenger",
                          progress=False)
    assert second.version == "2"
    assert registry.alias_version("pump", "challenger") == "2"
    assert registry.promote("pump", "2", "champion", reason="test") == "1"
    assert registry.alias_version("pump", "champion") == "2"
    listed = {v.version: v for v in registry.list_versions("pump")}
    assert set(listed) == {"1", "2"} and "champion" in listed["2"].aliases
    assert listed["1"].metrics["threshold"] > 0
    since_before = listed["1"].tags["champion_since"]
    time.sleep(1.1)  # the tag has one-second resolution
    assert registry.rollback("pump", reason="v2 floods pump-3") == "1"
    assert registry.alias_version("pump", "champion") == "1"
    tags = {v.version: v.tags for v in registry.list_versions("pump")}
    assert tags["1"]["champion_since"] > since_before and tags["1"]["champion_reason"] == "rollback from v2: v2 floods pump-3"
    assert "champion_until" not in tags["1"]  # it holds @champion again
    assert tags["2"]["champion_until"] >= tags["2"]["champion_since"] and tags["2"]["champion_reason"] == "test"
    # The model's page says what it is, and the log keeps every move, the rollback included.
    model = registry.client().get_registered_model("pump")
    assert model.description == registry.MODEL_DESCRIPTION
    moves = json.loads(model.tags["champion_log"])
    assert [(m["from"], m["to"], m["reason"]) for m in moves] == [
        (None, "1", "promoted at training (--promote)"), ("1", "2", "test"), ("2", "1", "rollback from v2: v2 floods pump-3")]
    assert all(m["at"].endswith("Z") for m in moves)
    from anomaly.errors import RegistryError

    with pytest.raises(RegistryError):
        registry.rollback("pump")  # nothing earlier than v1
    with pytest.raises(RegistryError):
        registry.promote("pump", "99")
    # The retrain gate's promotion names the champion it compared with: a move by hand meanwhile wins.
    with pytest.raises(registry.AliasMoved, match="on v1 now, not v2"):
        registry.promote("pump", "2", "champion", expected_previous="2")
    assert registry.alias_version("pump", "champion") == "1"
    assert registry.promote("pump", "2", "champion", expected_previous="1") == "1"

    # The rollback stack is written before the alias moves: a failed write moves nothing (it used to
    # move the alias and leave the stack without v2, so a rollback went past it to v1) ...
    from mlflow import MlflowClient

    real = MlflowClient.set_registered_model_tag

    def refuse(key):
        def write(self, name, tag, value):
            if tag == key:
                raise RuntimeError("database is locked")
            return real(self, name, tag, value)
        return write

    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", refuse("champion_history"))
    with pytest.raises(RegistryError, match="not moved: database is locked"):
        registry.promote("pump", "1", "champion")
    assert registry.alias_version("pump", "champion") == "2"
    # ... and once it has moved, a failed write of its log is a warning, not "the promotion failed".
    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", refuse("champion_log"))
    assert registry.promote("pump", "1", "champion", reason="log store down") == "2"
    assert registry.alias_version("pump", "champion") == "1"
    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", real)
    assert registry.rollback("pump") == "2"  # back to the version before the last move


def test_a_rollback_goes_past_versions_deleted_since_they_held_the_alias(settings):
    # v1, v2, v3 promoted in turn, then v2 deleted: the rollback from v3 goes to v1. It used to try v2 on
    # every attempt ("not found"), and the emergency path stayed blocked for good.
    from anomaly.errors import RegistryError

    first, c, source = champion_and_copies(settings, 2)
    for version in ("2", "3"):
        registry.promote("pump", version, "champion", reason="test")
    c.delete_model_version("pump", "2")
    assert registry.rollback("pump") == "1" and registry.alias_version("pump", "champion") == "1"
    assert json.loads(c.get_registered_model("pump").tags["champion_history"]) == []
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("pump")
    registry.promote("pump", "3", "champion")
    c.delete_model_version("pump", "1")
    with pytest.raises(RegistryError, match=r"v1 held it, and have been deleted"):
        registry.rollback("pump")  # nothing left alive: said, and v3 keeps serving
    assert registry.alias_version("pump", "champion") == "3"
    # The serving version under a deleted one on the stack is passed over too: v3, v4, v3 again by hand
    # (stack [.., 3, 4]), v4 deleted: "rolled back" from v3 to v3 before.
    c.create_model_version("pump", source, run_id=first.run_id)  # v4
    registry.promote("pump", "4", "champion")
    registry.promote("pump", "3", "champion")
    c.delete_model_version("pump", "4")
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("pump")
    assert registry.alias_version("pump", "champion") == "3"


def test_a_rollback_after_the_alias_was_moved_in_the_mlflow_ui_returns_to_the_version_it_moved_from(settings):
    # v1 then v2 promoted by the tool, then an operator moves @champion to v3 in the MLflow UI: the
    # rollback went to v1 (the stack only knew the tool's moves), skipping v2, which served just before.
    champion_and_copies(settings, 3)
    c = registry.client()
    registry.promote("pump", "2", "champion")
    c.set_registered_model_alias("pump", "champion", "3")  # in the UI
    assert registry.rollback("pump", reason="v3 is bad") == "2"
    assert registry.rollback("pump") == "1"
    # a promotion after a move in the UI keeps both on the stack: back to v3, then to v2
    registry.promote("pump", "2", "champion")
    c.set_registered_model_alias("pump", "champion", "3")
    registry.promote("pump", "4", "champion")
    assert registry.rollback("pump") == "3" and registry.rollback("pump") == "2"
    # a history tag edited into something that is not a list reads as empty instead of blocking promotions
    c.set_registered_model_tag("pump", "champion_history", "5")
    assert registry.promote("pump", "4", "champion") == "2"


def test_a_rollback_whose_version_tags_could_not_be_written_is_not_undone_by_the_next(settings, monkeypatch):
    # v1 -> v2 -> v3 promoted; a rollback to v2 whose tag writes failed left the log's last holder at v3,
    # read as a move in the UI: the next rollback went back to v3, the version rolled away from.
    _, c, _ = champion_and_copies(settings, 2)
    for version in ("2", "3"):
        registry.promote("pump", version, "champion")
    failing = type(c)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(failing, "set_model_version_tag", refuse)
    assert registry.rollback("pump", reason="v3 is bad") == "2"  # warned: tags not written
    monkeypatch.undo()
    assert registry.alias_version("pump", "champion") == "2"
    assert registry.rollback("pump") == "1"


def test_a_promotion_by_hand_during_the_gates_move_waits_and_is_not_overridden(settings, monkeypatch):
    # The retrain gate moves @champion only if it still holds the version it compared with (v1). An
    # operator's `models promote 3` that landed between that check and the move was overridden by it:
    # @champion ended on v2 and v3 was not on the rollback stack. Now the hand promotion waits for the
    # gate's move (a lock per registry, model and alias), then wins.
    import threading

    _, c, _ = champion_and_copies(settings, 2)
    real_history, operator = registry._history, []

    def history_then_operator(name, alias, current):  # the gate has checked @champion is v1; the operator acts now
        if not operator:
            thread = threading.Thread(target=registry.promote, args=("pump", "3", "champion", "by hand"))
            operator.append(thread)
            thread.start()
            thread.join(1.0)
            assert thread.is_alive(), "the hand promotion went ahead in the middle of the gate's move"
        return real_history(name, alias, current)

    monkeypatch.setattr(registry, "_history", history_then_operator)
    assert registry.promote("pump", "2", "champion", "retrain gate", expected_previous="1") == "1"
    operator[0].join(30)
    assert registry.alias_version("pump", "champion") == "3"
    assert json.loads(c.get_registered_model("pump").tags["champion_history"]) == ["1", "2"]
    moves = json.loads(c.get_registered_model("pump").tags["champion_log"])
    assert [(m["from"], m["to"], m["reason"]) for m in moves[-2:]] == [("1", "2", "retrain gate"), ("2", "3", "by hand")]
    assert registry.rollback("pump") == "2"  # the stack holds every version that served


def test_unreachable_store_is_a_registry_error(tmp_path):
    from anomaly.errors import RegistryError

    tracking.configure("http://127.0.0.1:9")  # nothing listens on the discard port
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(RegistryError):
            registry.list_versions()
        # An outage is not "no champion": the worker and `anomaly score` used to say the model was missing.
        with pytest.raises(RegistryError, match="cannot read pump@champion"):
            registry.alias_version("pump", "champion")
        with pytest.raises(RegistryError, match="promotion history"):
            registry.rollback("pump")
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    tracking.configure(f"sqlite:///{tmp_path / 'empty.db'}")
    assert registry.alias_version("pump", "champion") is None  # no such model: None, not an error


def _promote_trained_with(settings, **threshold):
    """Train on normal data with these ``[threshold]`` fields set, register and promote; the outcome."""
    import dataclasses

    moved = build_settings({**{s: dataclasses.asdict(getattr(settings, s)) for s in ("mlflow", "model", "training")},
                            "threshold": {**dataclasses.asdict(settings.threshold), **threshold}})
    return run_training(prepare_training(normal_frame(1200)), moved, source="synthetic", dataset="synthetic",
                        promote=True, progress=False)


def _pyfunc_bars(loaded, frame):
    """The champion's pyfunc on ``frame``, checked to give the bar and flags ``series_bars`` gives; the
    output and the scores."""
    import mlflow

    out = mlflow.pyfunc.load_model("models:/pump@champion").predict(frame[list(loaded.sensors)].reset_index(drop=True))
    scores = out["score"].to_numpy(dtype=float, na_value=np.nan)
    np.testing.assert_allclose(out["threshold"].to_numpy(), loaded.threshold.series_bars(scores, window_size=loaded.window_size), rtol=1e-12)
    assert (out["is_anomaly"].to_numpy() == loaded.threshold.series_flags(scores, window_size=loaded.window_size)).all()
    return out, scores


def test_an_adaptive_rule_travels_with_the_registered_model(settings, tmp_path, monkeypatch):
    """Trained with ``[threshold] adaptive_*``: the rule is in the registered model's threshold.json, the
    run's parameters, and the pyfunc's per-row ``threshold`` (the bar in force), loaded without pickle."""
    import mlflow

    from anomaly.adaptive import AdaptiveRule

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    outcome = _promote_trained_with(settings, adaptive_rows=60, adaptive_factor=2.0, adaptive_lag=5)
    rule = AdaptiveRule(rows=60, factor=2.0, quantile=0.5, lag=5)
    assert outcome.detector.threshold.adaptive == rule
    assert mlflow.get_run(outcome.run_id).data.params["threshold.adaptive_rows"] == "60"
    listed = {v.version: v for v in registry.list_versions("pump")}
    assert listed[outcome.version].tags["threshold.adaptive"] == "60 rows, x2 q0.5, lag 5"  # seen in the registry UI
    loaded, _ = registry.load_detector("pump", "champion")
    assert loaded.threshold.adaptive == rule
    # a lasting change from row 150 on: the fixed threshold flags it to the end, the bar rises with it
    changed, _ = with_fault(normal_frame(400, seed=4), start=150, length=250)
    out, scores = _pyfunc_bars(loaded, changed)
    assert out["threshold"].max() > loaded.threshold.value  # the bar did rise
    fixed = np.nan_to_num(scores, nan=-np.inf) > loaded.threshold.value
    assert out["is_anomaly"].sum() < fixed.sum()


def test_an_episode_rule_travels_with_the_registered_model(settings, tmp_path, monkeypatch):
    """Trained with ``[threshold] episode_*``: the rule is in the registered model's threshold.json, the
    run's parameters and the registry tag, and the pyfunc's per-row ``threshold`` is the episode's bar,
    loaded without pickle."""
    import mlflow

    from anomaly.episodes import EpisodeRule

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    outcome = _promote_trained_with(settings, episode_drop=3.0, episode_settle=2.0, episode_k=10)
    rule = EpisodeRule(drop=3.0, settle=2.0, k=10)
    assert outcome.detector.threshold.episodes == rule and outcome.detector.threshold.adaptive is None
    assert mlflow.get_run(outcome.run_id).data.params["threshold.episode_drop"] == "3.0"
    listed = {v.version: v for v in registry.list_versions("pump")}
    assert listed[outcome.version].tags["threshold.adaptive"] == rule.describe()  # seen in the registry UI
    loaded, _ = registry.load_detector("pump", "champion")
    assert loaded.threshold.episodes == rule
    # a fault from row 150 to 250, then the rig settles a little above normal
    changed, _ = with_fault(normal_frame(400, seed=4), start=150, length=250, size=0.3)
    changed, _ = with_fault(changed, start=150, length=100, size=1.2)
    out, scores = _pyfunc_bars(loaded, changed)
    assert (out["threshold"].to_numpy()[~np.isnan(scores)] >= loaded.threshold.value).all()
    assert out["threshold"].iloc[-1] > loaded.threshold.value  # the settled bar after the fault


def test_a_run_stopped_by_ctrl_c_is_killed_and_one_that_raised_failed(tmp_path):
    import mlflow

    store = mlflow_store(tmp_path, "runs")
    tracking.configure(store["tracking_uri"])
    from anomaly.up import _Interrupted

    ids = {}
    # `up` stopped while it trained its first champion: that run ended FAILED
    for name, exc in (("killed", KeyboardInterrupt), ("failed", ValueError), ("finished", None),
                      ("up stopped", _Interrupted("SIGTERM"))):
        try:
            with tracking.Run("status-check", store["artifact_location"], run_name=name) as run:
                ids[name] = run.run_id
                if exc is not None:
                    raise exc
        except (KeyboardInterrupt, ValueError, _Interrupted):
            pass
    statuses = {name: mlflow.get_run(run_id).info.status for name, run_id in ids.items()}
    assert statuses == {"killed": "KILLED", "failed": "FAILED", "finished": "FINISHED", "up stopped": "KILLED"}


def test_a_threshold_on_few_validation_windows_is_said(settings, caplog):
    """A short file trains (the operator may want to look), but the log says the threshold is mostly
    chance before anyone promotes it."""
    prepared = prepare_training(normal_frame(300))
    with caplog.at_level("WARNING", logger="anomaly.train_job"):
        outcome = run_training(prepared, settings, source="synthetic", register=False, progress=False)
    assert outcome.metrics["val_windows"] < 100
    assert any("rests on only" in r.getMessage() and "validation windows" in r.getMessage() for r in caplog.records)


def test_models_list_reads_every_page_of_a_big_registry(settings):
    # MLflow hands registered models over 100 a page: the 101st and later were not listed
    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    names = [f"pump-{i:03d}" for i in range(105)]
    for name in names:
        c.create_registered_model(name)
    c.create_model_version("pump-104", "file:///nowhere", run_id=None)
    listed = registry.list_versions()
    assert [(v.name, v.version) for v in listed] == [("pump-104", "1")]
    assert sorted(m.name for m in registry._every_page(c.search_registered_models)) == names


def test_train_with_alias_champion_says_it_promoted(settings):
    """``--alias champion`` moves @champion as --promote does; its outcome said "promoted": false."""
    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    c.create_registered_model("pump")
    c.create_model_version("pump", "file:///nowhere", run_id=None)
    c.set_registered_model_alias("pump", "champion", "1")
    outcome = run_training(prepare_training(normal_frame(400)), settings, source="synthetic", alias="champion",
                           progress=False)
    assert outcome.version == "2" and outcome.promoted
    assert registry.alias_version("pump", "champion") == "2"
    assert registry._history("pump", "champion", "2") == ["1"]  # rollback goes back to the one it replaced


def test_loading_a_model_the_registry_does_not_hold_says_so_and_names_those_it_holds(settings):
    # "pump-x has no version with alias @champion" read as if pump-x existed without a champion
    from anomaly.errors import RegistryError

    champion_and_copies(settings, 0)
    with pytest.raises(RegistryError, match=r"no registered model 'pump-x' .*the registry holds pump$"):
        registry.load_detector("pump-x", "champion")
    with pytest.raises(RegistryError, match="pump has no version with alias @nope"):
        registry.load_detector("pump", "nope")


def test_a_rollback_with_the_alias_unset_says_so(settings):
    """The version holding @champion was deleted (MLflow drops the alias with it): the log said "rollback from vNone"."""
    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    c.create_registered_model("pump")
    for _ in range(3):
        c.create_model_version("pump", "file:///nowhere", run_id=None)
    registry.promote("pump", "1")
    registry.promote("pump", "2")
    c.delete_registered_model_alias("pump", "champion")
    assert registry.rollback("pump") == "1"
    log = json.loads(c.get_registered_model("pump").tags["champion_log"])
    assert log[-1]["from"] is None and log[-1]["to"] == "1" and log[-1]["reason"] == "rollback (@champion was unset)"


def test_alias_moves_lock_in_mlflow_lock_dir(settings, tmp_path):
    """Processes in separate containers share no temp folder: their alias moves lock in a shared folder."""
    shared = tmp_path / "locks"
    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri, lock_dir=str(shared))
    try:
        c = registry.client()
        c.create_registered_model("pump")
        c.create_model_version("pump", "file:///nowhere", run_id=None)
        registry.promote("pump", "1")
        assert [p.name[:13] for p in shared.iterdir()] == ["anomaly-alias"]
    finally:
        tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    assert tracking.lock_dir() != shared  # configure without it: the temp folder again


def test_models_list_with_a_config_file_naming_the_default_model_lists_that_model_only(settings, tmp_path, capsys):
    """A file naming mlflow.model_name narrows the list, as --help says, also when the name is the default one."""
    from anomaly.cli import main

    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    for name in ("anomaly-detector", "other-asset"):
        c.create_registered_model(name)
        c.create_model_version(name, "file:///nowhere", run_id=None)
    config = tmp_path / "a.toml"
    config.write_text(f'[mlflow]\ntracking_uri = "{settings.mlflow.tracking_uri}"\nmodel_name = "anomaly-detector"\n')
    assert main(["models", "list", "--config", str(config), "--json"]) == 0
    assert [v["name"] for v in json.loads(capsys.readouterr().out)] == ["anomaly-detector"]
    config.write_text(f'[mlflow]\ntracking_uri = "{settings.mlflow.tracking_uri}"\n')  # names none: every model
    assert main(["models", "list", "--config", str(config), "--json"]) == 0
    assert sorted(v["name"] for v in json.loads(capsys.readouterr().out)) == ["anomaly-detector", "other-asset"]
    # a version without the threshold.adaptive tag (registered by hand, or by a release from before it, whose
    # stored rule may well move the bar) was listed with the rule "off"
    assert main(["models", "list", "--config", str(config)]) == 0
    listed = capsys.readouterr().out.splitlines()[1:]
    assert len(listed) == 2 and all(line.endswith("not recorded") for line in listed)


def test_a_rollback_whose_log_could_not_be_written_is_not_undone_by_the_next(settings, monkeypatch):
    # v1 -> v2 -> v3; a rollback to v2 whose log write failed ("database is locked") left the log's last
    # holder at v3, read as a move in the UI: the next rollback went back to v3, the version rolled from.
    # The log is now written before the alias moves: a failed write moves nothing, and says so.
    from mlflow import MlflowClient

    from anomaly.errors import RegistryError

    _, c, _ = champion_and_copies(settings, 2)
    for version in ("2", "3"):
        registry.promote("pump", version, "champion")
    real = MlflowClient.set_registered_model_tag

    def refuse_log(self, name, tag, value):
        if tag == "champion_log":
            raise RuntimeError("database is locked")
        return real(self, name, tag, value)

    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", refuse_log)
    with pytest.raises(RegistryError, match="not moved: database is locked"):
        registry.rollback("pump")
    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", real)
    assert registry.alias_version("pump", "champion") == "3"
    assert registry.rollback("pump") == "2" and registry.rollback("pump") == "1"
    # An alias move that fails after the log was written takes its entry back out of the log.
    registry.promote("pump", "2", "champion")
    before = c.get_registered_model("pump").tags["champion_log"]

    def refuse_move(self, *args):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse_move)
    with pytest.raises(RegistryError, match="registry went away"):
        registry.rollback("pump")
    monkeypatch.undo()
    assert c.get_registered_model("pump").tags["champion_log"] == before
    assert registry.alias_version("pump", "champion") == "2" and registry.rollback("pump") == "1"


def test_a_version_written_as_mlflow_reads_it_is_logged_as_its_number(settings):
    # `models promote +2` moved the alias to v2 (MLflow reads the number with int()) and logged "+2":
    # read as a move in the UI, it went on the stack, and every rollback "returned" to v2 for good.
    _, c, _ = champion_and_copies(settings, 1)
    for written in ("+2", "\u0662"):  # an Arabic-Indic two
        registry.promote("pump", "1", "champion")
        assert registry.promote("pump", written, "champion") == "1"
        assert registry.alias_version("pump", "champion") == "2"
        assert json.loads(c.get_registered_model("pump").tags["champion_log"])[-1]["to"] == "2"
        assert registry.rollback("pump") == "1"


def test_removing_an_alias_keeps_its_log_whole_json(settings):
    # the log was cut at 5,000 characters mid-string; the next move could not read it and started it over
    _, c, _ = champion_and_copies(settings, 1)
    for i in range(20):
        registry.promote("pump", str(1 + i % 2), "challenger", reason="x" * 200)
    registry.remove_alias("pump", "challenger", reason="z" * 200)
    log = json.loads(c.get_registered_model("pump").tags["challenger_log"])
    assert log[-1]["to"] is None and log[-1]["reason"] == "z" * 200 and len(log) >= 10
    registry.promote("pump", "1", "challenger", reason="again")
    assert len(json.loads(c.get_registered_model("pump").tags["challenger_log"])) >= 10


def test_a_version_is_one_however_it_is_written(settings):
    """`models promote 01` moved the alias to v1 but logged "01": promoting v1 again was not a no-op."""
    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    c.create_registered_model("pump")
    c.create_model_version("pump", "file:///nowhere", run_id=None)
    assert registry.promote("pump", "01") is None
    assert registry.promote("pump", "v1") == "1"  # already there: nothing moved, nothing stacked
    assert registry._history("pump", "champion", "1") == []
    log = json.loads(c.get_registered_model("pump").tags["champion_log"])
    assert [entry["to"] for entry in log] == ["1"]
    assert registry.version_number(" v07 ") == "7" and registry.version_number("champion") is None
    assert registry.version_number("\u0663") is None  # an Arabic-Indic three is no version number


def test_models_list_reads_models_whose_names_hold_quotes(settings):
    """One model named with a ' broke every listing of the registry (its filter string ended early)."""
    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    names = ["o'brien", 'say"hi', "both'\"", "back\\slash", "pump"]
    for name in names:
        c.create_registered_model(name)
        c.create_model_version(name, "file:///nowhere", run_id=None)
    c.create_model_version("pump", "file:///nowhere", run_id=None)
    assert sorted((v.name, v.version) for v in registry.list_versions()) == sorted(
        [(n, "1") for n in names] + [("pump", "2")])
    for name in names:
        assert {v.name for v in registry.list_versions(name)} == {name}
    assert registry.version_filter("o'brien") == 'name="o\'brien"' and registry.version_filter("both'\"") is None


def test_the_overlay_marks_where_validation_starts_when_labelled_rows_are_left_out(settings, monkeypatch):
    # The last 200 of 500 readings are labelled anomalous and left out: validation ends at row 299, so it
    # starts well before 80 % of the series (row 400, where the marker was put from the fraction alone).
    from anomaly import plots

    markers = []
    overlay = plots.anomaly_overlay
    monkeypatch.setattr(plots, "anomaly_overlay",
                        lambda stamps, *a, **kw: markers.append(kw.get("marker")) or overlay(stamps, *a, **kw))
    labels = np.zeros(500, dtype=bool)
    labels[300:] = True
    prepared = prepare_training(normal_frame(500), labels=labels)
    out = run_training(prepared, settings, source="synthetic", register=False, progress=False)
    start = out.result.val_start_row
    assert start < 300
    assert len(markers) == 1 and markers[0] is not None
    assert markers[0][0] == prepared.timestamps[start]


def test_a_mistyped_alias_can_be_removed_and_the_served_alias_cannot(settings, tmp_path, capsys, caplog):
    """``models promote 2 --alias Champion`` made @Champion (with a warning) and no command took it off."""
    from anomaly.cli import main

    tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
    c = registry.client()
    c.create_registered_model("pump")
    for _ in range(2):
        c.create_model_version("pump", "file:///nowhere", run_id=None)
    registry.promote("pump", "1")
    common = ["--tracking-uri", settings.mlflow.tracking_uri, "--name", "pump"]
    assert main(["models", "promote", "2", "--alias", "Champion", *common]) == 0
    assert "models unalias --alias Champion" in caplog.text and registry.alias_version("pump", "Champion") == "2"
    assert main(["models", "unalias", "--alias", "Champion", "--reason", "typo", *common]) == 0
    assert "pump@Champion removed (it was on v2)" in capsys.readouterr().out
    assert registry.alias_version("pump", "Champion") is None and registry.alias_version("pump", "champion") == "1"
    moves = json.loads(c.get_registered_model("pump").tags["Champion_log"])
    assert moves[-1]["from"] == "2" and moves[-1]["to"] is None and moves[-1]["reason"] == "typo"
    assert "Champion_until" in c.get_model_version("pump", "2").tags
    assert main(["models", "unalias", "--alias", "Champion", *common]) == 2  # gone: says so
    assert "pump has no alias @Champion: nothing to remove" in capsys.readouterr().err
    assert main(["models", "unalias", "--alias", "champion", *common]) == 2  # the served alias stays
    assert main(["models", "unalias", *common]) == 2
    assert registry.alias_version("pump", "champion") == "1"


def test_a_version_whose_files_cannot_be_read_says_where_they_are(settings):
    # a version trained with artifacts on another machine's disk (a tracking server, artifact_location left a
    # local path) failed to load elsewhere with "holds no detector artifact" and no word of where they were
    import shutil

    from anomaly.errors import RegistryError

    champion_and_copies(settings, 0)
    shutil.rmtree(settings.mlflow.artifact_location)  # out of this machine's reach
    with pytest.raises(RegistryError, match=r"models:/pump/1.*\(its files are at file://.*artifacts.*\)"):
        registry.load_detector("pump", "champion")


def test_a_missing_version_and_a_url_that_is_no_mlflow_server_are_told_apart(settings, tmp_path):
    # a promotion against a plain web server (a wrong port) said "anomaly-detector has no version 2: ... 404
    # ... <!DOCTYPE HTML>", as if the registry had answered
    import http.server
    import threading

    from anomaly.errors import RegistryError

    champion_and_copies(settings, 0)
    with pytest.raises(RegistryError, match=r"^pump has no version 7: "):
        registry.promote("pump", "7", "champion", "test")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.configure(f"http://127.0.0.1:{server.server_port}")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        with pytest.raises(RegistryError, match=rf"^cannot read pump v2 from the registry at http://127.0.0.1:"):
            registry.promote("pump", "2", "champion", "test")
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        server.shutdown()
        tracking.configure(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)


def test_a_model_the_registry_did_not_take_is_kept_and_registered_later(settings, tmp_path, monkeypatch, caplog):
    # A tracking server gone at the end of a training run lost the trained model with the run (after 8
    # minutes of the client's retries). It is kept from the moment it is fitted, the error names the folder,
    # and `anomaly models register FOLDER` registers it as the training would have, alias included.
    from anomaly.cli import main
    from anomaly.errors import RegistryError

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    prepared = prepare_training(normal_frame(1200))
    keep = tmp_path / "unregistered"
    real_register = registry.register

    def gone(*args, **kwargs):
        raise RegistryError("cannot reach the model registry: Connection refused")

    monkeypatch.setattr(registry, "register", gone)
    with pytest.raises(RegistryError) as err:
        run_training(prepared, settings, source="synthetic", dataset="synthetic", promote=True, progress=False,
                     keep_dir=keep)
    (folder,) = keep.iterdir()
    assert f"the trained model is kept in {folder}" in str(err.value)
    assert f"anomaly models register {folder}" in str(err.value)
    monkeypatch.setattr(registry, "register", real_register)
    assert list(registry.client().search_model_versions("name='pump'")) == []  # nothing registered

    from anomaly.detector import Detector

    kept = Detector.load(folder)
    values = with_fault(normal_frame(400), start=200, length=60)[0].to_numpy()
    env = {f"ANOMALY_MLFLOW__{k.upper()}": str(v) for k, v in settings.mlflow.__dict__.items()
           if v is not None and k in ("tracking_uri", "artifact_location", "experiment", "model_name", "lock_dir")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["models", "register", str(folder)]) == 0
    assert not folder.exists()  # registered: the folder goes
    loaded, version = registry.load_detector("pump", "champion")  # --promote was asked of the training
    assert version == "1"
    assert np.array_equal(loaded.score_values(values).scores, kept.score_values(values).scores)
    v = registry.client().get_model_version("pump", "1")
    assert v.tags["dataset"] == "synthetic" and "threshold" in v.description
    import mlflow

    run = mlflow.get_run(registry.client().get_model_version("pump", "1").run_id)
    assert run.data.tags["kept_from_run"] and run.data.tags["kind"] == "train"
    # the training's metrics and parameters: a version's drift reference is read from its run's val_* figures
    assert {"val_score_p50", "val_score_p99", "val_false_alarm_rate", "val_windows"} <= set(run.data.metrics)
    assert run.data.params["threshold.method"] == "pot"
    # the input example as the sensors are, doubles (read back by pandas, whole numbers became ints and the
    # signature refused the model's own float input)
    from mlflow.models import get_model_info

    info = get_model_info("models:/pump/1")
    assert {i["type"] for i in info.signature.inputs.to_dict() if i["name"] in loaded.sensors} == {"double"}
    # registered, then an alias move fails: the folder goes with the registration (a second `models register`
    # added the model again), and the error says which version to promote
    def refused(*args, **kwargs):
        raise RegistryError("cannot make the lock file")

    monkeypatch.setattr(registry, "promote", refused)
    with pytest.raises(RegistryError, match=r"registered pump v2, but moving @challenger failed.*"
                                            r"`anomaly models promote 2 --alias challenger`"):
        run_training(prepared, settings, source="synthetic", dataset="synthetic", alias="challenger", progress=False,
                     keep_dir=keep)
    assert list(keep.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    # a successful training leaves nothing behind
    run_training(prepared, settings, source="synthetic", dataset="synthetic", progress=False, keep_dir=keep)
    assert list(keep.iterdir()) == []
    # a folder it cannot write to costs the spare copy, not the training
    (tmp_path / "a-file").write_text("")
    with caplog.at_level("WARNING"):
        out = run_training(prepared, settings, source="synthetic", dataset="synthetic", progress=False,
                           keep_dir=tmp_path / "a-file" / "below")
    assert out.version == "4" and any("could not be kept" in r.message for r in caplog.records)
    assert main(["models", "register", str(tmp_path / "nothing")]) == 2



def _mlflow_server(db: Path, artifacts: Path, port: int):
    """A real `mlflow server` over a SQLite file, answering /health; the process."""
    import subprocess
    import sys
    import urllib.request

    from anomaly import up

    proc = subprocess.Popen(up.mlflow_server_command(sys.executable, f"sqlite:///{db}", str(artifacts), port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "the MLflow server exited during start"
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the MLflow server did not answer within 90 s")


def _stop(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_a_tracking_server_killed_mid_training_leaves_the_model_kept_and_registered_once_it_is_back(
        tmp_path, monkeypatch):
    # The whole story against a real tracking server: it dies after the second epoch; the training goes on
    # (the epochs are no longer logged), the model is kept, the error names the folder; the server comes
    # back on the same store, and `anomaly models register FOLDER` puts the model in the registry.
    import socket

    from anomaly.cli import main
    from anomaly.errors import RegistryError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db, artifacts, keep = tmp_path / "mlflow.db", tmp_path / "artifacts", tmp_path / "unregistered"
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}.items():
        monkeypatch.setenv(name, value)  # a refused server fails at once, not after the client's retries
    uri = f"http://127.0.0.1:{port}"
    settings = build_settings({"mlflow": {"tracking_uri": uri, "artifact_location": str(artifacts),
                                          "model_name": "pump", "lock_dir": str(tmp_path / "locks")},
                               "model": {"window_size": 16, "hidden_size": 16, "latent_size": 4},
                               "training": {"epochs": 4, "batch_size": 64, "device": "cpu", "patience": 10},
                               "threshold": {"method": "pot", "risk": 0.01, "init_quantile": 0.9}})
    server = _mlflow_server(db, artifacts, port)
    epochs = []
    original = tracking.MlflowEpochLogger.on_epoch_end

    def then_die(self, stats):
        original(self, stats)
        epochs.append(stats.epoch)
        if stats.epoch == 2:
            _stop(server)

    monkeypatch.setattr(tracking.MlflowEpochLogger, "on_epoch_end", then_die)
    try:
        with pytest.raises(RegistryError, match="the trained model is kept in"):
            run_training(prepare_training(normal_frame(1200)), settings, source="synthetic", dataset="synthetic",
                         alias="challenger", progress=False, keep_dir=keep)
        assert epochs == [1, 2, 3, 4]  # trained to the end
        (folder,) = keep.iterdir()
        server = _mlflow_server(db, artifacts, port)  # back, on the same store
        monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", uri)
        monkeypatch.setenv("ANOMALY_MLFLOW__ARTIFACT_LOCATION", str(artifacts))
        monkeypatch.setenv("ANOMALY_MLFLOW__MODEL_NAME", "pump")
        monkeypatch.setenv("ANOMALY_MLFLOW__LOCK_DIR", str(tmp_path / "locks"))
        assert main(["models", "register", str(folder)]) == 0
        assert not folder.exists()
        tracking.configure_from(settings.mlflow)
        assert registry.alias_version("pump", "challenger") == "1"  # the alias asked of the training
        import mlflow

        trained_in = mlflow.get_run(registry.client().get_model_version("pump", "1").run_id).data.tags["kept_from_run"]
        history = mlflow.MlflowClient().get_metric_history(trained_in, "val_loss")
        assert [m.step for m in history] == [1, 2]  # the epochs logged before the server went
    finally:
        _stop(server)
