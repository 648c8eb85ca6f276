"""The pure helpers of the MLflow adapter and the figures it logs (no tracking store)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from anomaly import plots  # noqa: E402
from anomaly.tracking import finite_metrics  # noqa: E402


def test_finite_metrics_keeps_numpy_numbers_and_drops_what_mlflow_would_mangle():
    got = finite_metrics({"a": np.float32(0.5), "b": np.int64(3), "c": 2, "d": 1.5, "nan": math.nan,
                          "inf": np.inf, "flag": True, "npflag": np.bool_(True), "none": None, "text": "x"})
    assert got == {"a": 0.5, "b": 3.0, "c": 2.0, "d": 1.5} and all(type(v) is float for v in got.values())


def test_figures_cope_with_empty_non_finite_and_nan_flags():
    before = len(plt.get_fignums())
    for scores in ([], [0.0, 0.0], [1e-12], [1.0, np.nan, np.inf]):
        plots.close(plots.error_distribution(np.asarray(scores, dtype=float), 0.5))
    # A NaN in a float flag array is "not flagged", not a red span.
    fig = plots.anomaly_overlay(np.arange(10.0), np.arange(10.0)[:, None], ["x"], np.arange(10.0), 5.0,
                                flags=np.array([np.nan] * 5 + [0.0] * 5))
    spans = [p for ax in fig.axes for p in ax.patches]
    plots.close(fig)
    assert not spans
    assert len(plt.get_fignums()) == before


def test_the_overlay_draws_the_sensors_asked_first_and_says_so():
    values = np.arange(60.0).reshape(10, 6)
    fig = plots.anomaly_overlay(np.arange(10.0), values, list("abcdef"), np.arange(10.0), 5.0, order=[5, 2, 0, 1, 3, 4],
                                marker=(4.0, " validation"))
    labels = [ax.get_ylabel() for ax in fig.axes]
    title = fig._suptitle.get_text()
    lines = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    plots.close(fig)
    assert labels == ["f", "c", "a", "b", "score"]  # four sensors, in the order given, then the score
    assert "orange" not in title and "the 4 of 6 sensors with the largest error" in title
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [4.0, 4.0]
    fig = plots.anomaly_overlay(np.arange(10.0), values[:, :2], ["a", "b"], np.arange(10.0), 5.0,
                                labels=np.zeros(10, bool))
    assert [ax.get_ylabel() for ax in fig.axes] == ["a", "b", "score"] and "orange: labelled" in fig._suptitle.get_text()
    plots.close(fig)


def test_code_version_names_the_commit_and_says_when_tracked_files_differ_from_it(tmp_path):
    import subprocess

    from anomaly import __version__
    from anomaly.tracking import code_version, code_version_string

    assert code_version(tmp_path) == __version__  # not a checkout: the package version alone
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == f"{__version__}+{sha}"
    (tmp_path / "notes.txt").write_text("untracked files do not count")
    assert code_version(tmp_path) == f"{__version__}+{sha}"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"{__version__}+{sha}.dirty"
    assert code_version_string("0.1.0", "", True) == "0.1.0"
    # a cache's key: two different sets of uncommitted edits (and untracked Python files) differ
    from anomaly.tracking import code_fingerprint

    first = code_fingerprint(tmp_path)
    assert first.startswith(f"{__version__}+{sha}.dirty.") and code_fingerprint(tmp_path) == first
    (tmp_path / "a.py").write_text("x = 3\n")
    second = code_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "b.py").write_text("y = 1\n")
    third = code_fingerprint(tmp_path)
    assert third != second and code_fingerprint(tmp_path) == third
    # Asked from a sub-folder (the package's own, as by default): git names new files relative to it,
    # which were read from the top and not found, so the key was a fresh timestamp on every call.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "c.py").write_text("z = 1\n")
    fourth = code_fingerprint(tmp_path / "pkg")
    assert fourth != third and code_fingerprint(tmp_path / "pkg") == fourth == code_fingerprint(tmp_path)
    (tmp_path / "pkg" / "c.py").unlink()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").unlink()
    assert code_fingerprint(tmp_path) == f"{__version__}+{sha}"  # clean: the commit alone


def test_an_mlflow_server_that_does_not_answer_is_said_at_once():
    import base64
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import pytest

    from anomaly.errors import RegistryError
    from anomaly.tracking import require_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RegistryError, match=rf"MLflow server http://127.0.0.1:{dead} does not answer"):
        require_reachable(f"http://127.0.0.1:{dead}", None)
    assert time.monotonic() - started < 5  # not the client's four minutes of retries

    seen: list[str | None] = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        require_reachable(f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{server.server_port}/x")
        require_reachable("sqlite:///mlruns/mlflow.db", "file:///tmp/x")  # files are not checked
        # user info, which MLflow sends as basic auth (urllib took it for a host name: "not known")
        del seen[:]
        require_reachable(f"http://alice:pw%40x@127.0.0.1:{server.server_port}/")
        assert seen == ["Basic " + base64.b64encode(b"alice:pw@x").decode()]
    finally:
        server.shutdown()


def test_mlflows_own_store_variables_are_said_to_be_unread(tmp_path, monkeypatch, caplog):
    """MLFLOW_TRACKING_URI naming another store was passed over in silence (train made a new local store)."""
    import logging

    from anomaly import tracking

    monkeypatch.setattr(tracking, "_said_unread", set())
    monkeypatch.setattr(tracking, "_set_by_us", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING, logger="anomaly.tracking"):
        tracking.configure(uri)
        tracking.configure(uri)  # said once
    said = [r.getMessage() for r in caplog.records if "is not read" in r.getMessage()]
    assert said == [f"MLFLOW_TRACKING_URI=http://mlflow.example:5000 is not read: the store is mlflow.tracking_uri "
                    f"({uri}); set ANOMALY_MLFLOW__TRACKING_URI (or --config) to use another"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same store: nothing to say
    caplog.clear()
    tracking.configure(uri)
    other = f"sqlite:///{tmp_path / 'other.db'}"  # a second store in one process: mlflow's own setting of the
    tracking.configure(other)  # variables for the first is not the user's
    assert not caplog.records


def test_an_experiment_created_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    # Two first runs on a new store at once: both looked the experiment up (none), both created it, and
    # the second failed on the store's unique name ("RegistryError: cannot open experiment ... already
    # exists"). Against a real SQLite store, the look-up made to miss once, as the loser of that race sees it.
    import mlflow

    from anomaly import tracking

    tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")
    winner = mlflow.create_experiment("anomaly", artifact_location=(tmp_path / "art").as_uri())
    real, calls = mlflow.get_experiment_by_name, []

    def late_lookup(name):
        calls.append(name)
        return None if len(calls) == 1 else real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", late_lookup)
    assert tracking.ensure_experiment("anomaly", str(tmp_path / "art")) == winner
    assert len(calls) == 2


def test_a_sqlite_uri_with_sqlalchemy_options_names_its_file(tmp_path):
    # MLflow reads sqlite:////path/mlflow.db?timeout=30; the read-only commands looked for a file named
    # "mlflow.db?timeout=30" and refused the store.
    import mlflow

    from anomaly import tracking
    from anomaly.config import canonical_store_uri

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.configure(uri)
    mlflow.search_experiments()  # the store made
    tracking.configure(uri + "?timeout=30", create=False)  # it exists: no error
    assert canonical_store_uri("sqlite:///rel/m.db?timeout=30").endswith("/rel/m.db?timeout=30")
    assert canonical_store_uri("sqlite:///rel/m.db?timeout=30").startswith("sqlite:////")


def test_a_sqlite_uri_naming_a_folder_says_so(tmp_path):
    """sqlite:////tmp: the read-only commands said "the file does not exist", the others failed in MLflow."""
    import pytest

    from anomaly import tracking
    from anomaly.errors import ConfigError

    for create in (True, False):
        with pytest.raises(ConfigError, match=f"mlflow.tracking_uri: {tmp_path} is a folder: name the store's SQLite file"):
            tracking.configure(f"sqlite:///{tmp_path}", create=create)


def test_a_runs_tags_are_cut_to_what_every_store_takes_from_the_start(tmp_path):
    # a fleet retrain's retrain.entities (700 pumps: 8,800 characters) went to start_run uncut; MLflow checks
    # no length there, and Postgres's varchar(8000) refused it: every retrain failed to start its run
    from anomaly.tracking import TAG_CHARS, Run

    run = Run("e", str(tmp_path), tags={"retrain.entities": ",".join(f"pump-{i:05d}" for i in range(700)),
                                        "short": 7})
    assert len(run.tags["retrain.entities"]) == TAG_CHARS == 5000 and run.tags["short"] == "7"


# --- an MLflow tracking server and where the artifacts go ------------------------------------------------
def test_a_servers_experiment_with_artifacts_on_this_machine_is_said_once(caplog):
    # with mlflow.tracking_uri at a server and the default artifact_location (a local path), runs and versions
    # were recorded on the server and their files here: a worker elsewhere could not load the model
    from anomaly import tracking

    tracking._said_artifacts.clear()
    tracking._say_local_artifacts("anomaly", "http://mlflow:5000", "file:///srv/anomaly/mlruns/artifacts")
    tracking._say_local_artifacts("anomaly", "http://mlflow:5000", "file:///srv/anomaly/mlruns/artifacts")
    warned = [r.getMessage() for r in caplog.records if "a path on this machine" in r.getMessage()]
    assert len(warned) == 1 and 'mlflow.artifact_location = "mlflow-artifacts:/anomaly"' in warned[0]
    caplog.clear()
    tracking._say_local_artifacts("other", "http://mlflow:5000", "mlflow-artifacts:/other")  # through the server
    tracking._say_local_artifacts("other", "sqlite:///mlruns/mlflow.db", "file:///srv/mlruns/artifacts")  # all here
    assert "a path on this machine" not in caplog.text


def test_an_experiments_artifact_root_set_at_creation_is_said_when_the_setting_differs(tmp_path, caplog):
    # MLflow fixes an experiment's artifact root when it creates it: a changed mlflow.artifact_location was
    # silently ignored for it (the fix for the warning above did not stick)
    import mlflow

    from anomaly import tracking

    tracking._said_artifacts.clear()
    tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")
    tracking.ensure_experiment("anomaly", str(tmp_path / "first"))
    tracking.ensure_experiment("anomaly", str(tmp_path / "first"))
    assert "applies to new experiments only" not in caplog.text
    tracking.ensure_experiment("anomaly", "mlflow-artifacts:/anomaly")
    assert "keeps the artifact location it was created with" in caplog.text and "first" in caplog.text
    mlflow.set_tracking_uri(None)


def test_a_run_whose_end_fails_while_an_error_is_in_flight_reports_that_error(tmp_path, monkeypatch, caplog):
    import mlflow
    import pytest

    from anomaly import tracking

    tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")

    def server_gone(status="FINISHED"):
        raise ConnectionError("tracking server gone")

    with pytest.raises(ValueError, match="the training's own error"):
        with tracking.Run("anomaly", str(tmp_path / "art")):
            monkeypatch.setattr(mlflow, "end_run", server_gone)
            raise ValueError("the training's own error")
    assert "could not be ended FAILED: tracking server gone" in caplog.text
    monkeypatch.undo()
    mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_a_tracking_server_that_stops_answering_mid_training_stops_the_epoch_logging_not_the_training(
        monkeypatch, caplog):
    import mlflow

    from anomaly.tracking import MlflowEpochLogger
    from anomaly.training import EpochStats

    calls = []

    def refused(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(mlflow, "log_metrics", refused)
    logger = MlflowEpochLogger()
    with caplog.at_level("WARNING"):
        for epoch in range(1, 4):
            logger.on_epoch_end(EpochStats(epoch=epoch, train_loss=1.0, val_loss=1.0, seconds=1.0, windows_per_s=10.0))
    assert len(calls) == 1 and logger.failed == "Connection refused"  # tried once, then left alone
    assert sum("training goes on" in r.message for r in caplog.records) == 1
