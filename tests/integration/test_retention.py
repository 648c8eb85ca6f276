"""The retrain's refused challengers leave a real SQLite MLflow registry: after each cycle beyond
``retrain.keep_challengers``, and by hand with ``anomaly models prune``; what serves, served, is pinned
or was trained by hand stays, and ``mlflow gc`` then frees the deleted versions' files."""

from __future__ import annotations

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
