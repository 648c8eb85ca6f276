"""The retrain's refused challengers leave a real SQLite MLflow registry: after each cycle beyond
``retrain.keep_challengers``, and by hand with ``anomaly models prune``; what serves, served, is pinned
or was trained by hand stays, and ``mlflow gc`` then frees the deleted versions' files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from anomaly import registry, tracking
from anomaly.preparation import prepare_training
from anomaly.scheduler import run_retrain
from anomaly.train_job import run_training
from tests.fixtures import normal_frame
from tests.integration.test_retrain import NAME, ROWS, settings_for, shuffle_rows

pytestmark = pytest.mark.integration


def exists(c, version: str) -> bool:
    return registry._version_exists(c, NAME, version)


def logged_model_id(c, version: str) -> str:
    source = c.get_model_version(NAME, version).source
    assert source.startswith("models:/m-"), source
    return source[len("models:/"):]


def files(folder) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def logged_model_alive(c, model_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_logged_model(model_id)
        return True
    except MlflowException as exc:
        assert exc.error_code == "RESOURCE_DOES_NOT_EXIST"
        return False


def test_refused_challengers_beyond_keep_leave_the_registry_and_the_rest_stays(tmp_path, capsys):
    from anomaly.cli import main

    settings = settings_for(tmp_path, epochs=2, keep_challengers=0)
    champion = run_training(prepare_training(normal_frame(ROWS, seed=2)), settings_for(tmp_path, epochs=6),
                            source="synthetic", dataset="synthetic", promote=True, progress=False)
    assert champion.version == "1"
    history = tmp_path / "history.csv"
    normal_frame(ROWS, seed=3).to_csv(history, index_label="ts")

    first = run_retrain(settings, data_path=str(history), data_transform=shuffle_rows)
    assert first.status == "kept" and first.challenger_version == "2", first.reason
    assert first.data["versions_pruned"] == 0  # v2 holds @challenger
    c = registry.client()
    first_model = logged_model_id(c, "2")
    first_files = tmp_path / "artifacts" / "models" / first_model
    assert files(first_files) > 0

    second = run_retrain(settings, data_path=str(history), data_transform=shuffle_rows)
    assert second.status == "kept" and second.challenger_version == "3", second.reason
    assert second.data["versions_pruned"] == 1
    assert not exists(c, "2") and exists(c, "3") and exists(c, "1")
    assert registry.alias_version(NAME, "champion") == "1" and registry.alias_version(NAME, "challenger") == "3"
    assert not logged_model_alive(c, first_model)  # deleted with its version ...
    assert files(first_files) > 0  # ... its files wait for mlflow gc (below)

    # By hand: versions a retrain made (tag retrain=true) that share v3's files, one pinned, one made by a
    # person; v3 then served as champion a while.
    source = c.get_model_version(NAME, "3").source
    for tags in ({"retrain": "true"}, {"retrain": "true", "keep": "true"}, {}, {"retrain": "true"},
                 {"retrain": "true"}):
        c.create_model_version(NAME, source, tags=tags)  # v4 .. v8
    registry.promote(NAME, "3", "champion", reason="test: served a while")
    registry.promote(NAME, "1", "champion", reason="test: back")
    registry.promote(NAME, "8", "challenger", reason="test: the latest candidate")
    # v3 held @champion, and is on its rollback stack: it stays whatever its age
    capsys.readouterr()
    assert main(["models", "prune", "--keep", "1", "--dry-run", "--tracking-uri", settings.mlflow.tracking_uri,
                 "--model-name", NAME]) == 0
    said = capsys.readouterr().out
    assert "would delete 1 version(s): v4" in said, said
    assert exists(c, "4")  # a dry run deletes nothing
    assert main(["models", "prune", "--keep", "0", "--tracking-uri", settings.mlflow.tracking_uri,
                 "--model-name", NAME]) == 0
    said = capsys.readouterr().out
    assert "deleted 2 version(s): v4, v7" in said, said
    assert [v for v in map(str, range(1, 9)) if exists(c, v)] == ["1", "3", "5", "6", "8"]
    assert logged_model_alive(c, logged_model_id(c, "3"))  # the versions deleted shared it with kept ones

    # mlflow gc frees the files of the logged model deleted with v2
    tracking_uri = settings.mlflow.tracking_uri
    done = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", tracking_uri],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert files(first_files) == 0  # (an empty folder is left)
    assert files(tmp_path / "artifacts" / "models" / logged_model_id(c, "3")) > 0
    assert registry.load_detector(NAME, "champion")[1] == "1"  # the champion still loads
    tracking.configure(tracking_uri)


def test_what_another_model_uses_a_failed_delete_and_a_champion_moved_in_the_ui_are_kept(tmp_path, capsys,
                                                                                            monkeypatch):
    """v2's logged model is registered in another model too, v3 was copied into another, v5 shares v4's
    logged model and its delete fails, v6 held @champion by a move in the MLflow UI (no tag of ours) and
    was rolled back from: the prune deletes v2 and v4 and no logged model anyone uses, says v5 failed
    (exit 1), and the next prune takes v5 and then v4's logged model."""
    from mlflow import MlflowClient

    from anomaly.cli import main
    from anomaly.locks import FileLock
    from anomaly.scheduler import registry_lock_path

    settings = settings_for(tmp_path, epochs=1)
    prepared = prepare_training(normal_frame(300, seed=2))
    assert run_training(prepared, settings, source="s", dataset="s", promote=True, progress=False).version == "1"
    for _ in range(3):  # v2, v3, v4: challengers a retrain made, each with its own logged model
        run_training(prepared, settings, source="s", dataset="s", extra_tags={"retrain": "true"}, progress=False)
    c = registry.client()
    v4_model = logged_model_id(c, "4")
    c.create_model_version(NAME, f"models:/{v4_model}", tags={"retrain": "true"})  # v5, on v4's files
    v2_model = logged_model_id(c, "2")
    registry.register(f"models:/{v2_model}", "pump-prod")
    c.copy_model_version(f"models:/{NAME}/3", "pump-copy")
    run_training(prepared, settings, source="s", dataset="s", extra_tags={"retrain": "true"}, progress=False)  # v6
    run_training(prepared, settings, source="s", dataset="s", alias="challenger", extra_tags={"retrain": "true"},
                 progress=False)  # v7
    c.set_registered_model_alias(NAME, "champion", "6")  # in the MLflow UI: no tag of ours on v6
    assert registry.rollback(NAME, reason="v6 floods pump-3") == "1"

    down = MlflowClient.delete_model_version

    def fail_v5(self, name, version):
        if (name, str(version)) == (NAME, "5"):
            raise RuntimeError("simulated 503 from the tracking server")
        return down(self, name, version)

    monkeypatch.setattr(MlflowClient, "delete_model_version", fail_v5)
    uri = ["--tracking-uri", settings.mlflow.tracking_uri, "--model-name", NAME]
    capsys.readouterr()
    with FileLock(registry_lock_path(settings)):  # a retrain of the model runs: not beside it
        assert main(["models", "prune", "--keep", "0", *uri]) == 2
    assert "a retrain of pump is running" in capsys.readouterr().err
    assert main(["models", "prune", "--keep", "0", *uri]) == 1
    said = capsys.readouterr().out
    assert "deleted 2 version(s): v2, v4" in said, said
    assert "v3 left: kept: the source of pump-copy v1" in said and "v5 left: not deleted: simulated 503" in said
    assert [v for v in map(str, range(1, 8)) if exists(c, v)] == ["1", "3", "5", "6", "7"]
    assert logged_model_alive(c, v2_model) and logged_model_alive(c, v4_model)  # pump-prod's, and v5's
    assert registry.load_detector("pump-prod", "1")[1] == "1" and registry.load_detector("pump-copy", "1")[1] == "1"
    plan = registry.prune(NAME, 0, dry_run=True).plan
    assert plan.delete == ("3", "5")  # the plan does not look for copies; the delete of each does
    assert plan.kept["6"] == "served: held @champion"

    monkeypatch.setattr(MlflowClient, "delete_model_version", down)
    logged_down = MlflowClient.delete_logged_model

    def fail_logged(self, model_id):
        raise RuntimeError("simulated 503 from the tracking server")

    monkeypatch.setattr(MlflowClient, "delete_logged_model", fail_logged)
    assert main(["models", "prune", "--keep", "0", *uri]) == 0
    said = capsys.readouterr().out
    assert "deleted 1 version(s): v5" in said and "v3 left: kept: the source of pump-copy v1" in said, said
    assert logged_model_alive(c, v4_model)  # its delete failed: the log names it, and the next prune tries again
    monkeypatch.setattr(MlflowClient, "delete_logged_model", logged_down)
    assert main(["models", "prune", "--keep", "0", *uri]) == 0
    said = capsys.readouterr().out
    assert "deleted 0 version(s)" in said and f"--logged-model-ids {v4_model}" in said, said
    assert not logged_model_alive(c, v4_model)  # no live version uses it now
    log = json.loads(c.get_registered_model(NAME).tags["pruned_log"])
    assert [entry["deleted"] for entry in log] == [["2", "4"], ["5"], []]
    assert log[1]["logged_models_left"] == [v4_model] and "logged_models_left" not in log[2]
    assert main(["models", "prune", "--keep", "0", *uri]) == 0  # nothing left to do: nothing logged
    assert len(json.loads(c.get_registered_model(NAME).tags["pruned_log"])) == 3
    # a version of another model registered from a logged model's folder (its source names no model)
    v8 = run_training(prepared, settings, source="s", dataset="s", extra_tags={"retrain": "true"}, progress=False)
    v8_model = logged_model_id(c, v8.version)
    c.create_registered_model("pump-loc")
    c.create_model_version("pump-loc", c.get_logged_model(v8_model).artifact_location)
    assert main(["models", "prune", "--keep", "0", *uri]) == 0
    assert f"deleted 1 version(s): v{v8.version}" in capsys.readouterr().out
    assert logged_model_alive(c, v8_model)  # pump-loc v1 reads its files
    assert registry.load_detector("pump-loc", "1")[1] == "1"
    tracking.configure(settings.mlflow.tracking_uri)
