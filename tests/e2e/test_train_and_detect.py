"""End to end through the CLI: train on normal data, register and promote, then score data with an
injected fault; the fault is flagged, the right sensor is blamed, normal stretches stay quiet."""

import json

import numpy as np
import pandas as pd
import pytest

from anomaly.cli import main
from tests.fixtures import normal_frame, with_fault

pytestmark = pytest.mark.e2e


def local_mlflow(tmp_path, monkeypatch) -> None:
    """Work in ``tmp_path`` with its own MLflow SQLite store and artifacts, pickle loading refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    monkeypatch.setenv("ANOMALY_MLFLOW__ARTIFACT_LOCATION", str(tmp_path / "mlruns" / "artifacts"))


def test_train_then_flag_injected_fault(tmp_path, monkeypatch, capsys, caplog):
    local_mlflow(tmp_path, monkeypatch)
    config = tmp_path / "small.toml"
    config.write_text("[model]\nwindow_size = 20\nhidden_size = 24\nlatent_size = 8\n"
                      "[training]\nepochs = 25\nbatch_size = 64\ndevice = \"cpu\"\n"
                      "[threshold]\nmethod = \"pot\"\nrisk = 0.002\ninit_quantile = 0.95\n")
    normal_frame(3000).reset_index().to_csv(tmp_path / "normal.csv", index=False)
    assert main(["train", "--data", "normal.csv", "--config", str(config), "--promote", "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["version"] == "1" and trained["promoted"]

    faulty, labels = with_fault(normal_frame(1500, seed=7, start="2026-02-01T00:00:00Z"),
                                sensor="pressure", start=800, length=200, size=0.3)
    faulty.reset_index().to_csv(tmp_path / "faulty.csv", index=False)
    assert main(["score", "--data", "faulty.csv", "--config", str(config), "--out", "scores.csv"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = pd.read_csv(tmp_path / "scores.csv")
    flags = rows["is_anomaly"].to_numpy(bool)

    assert flags[labels].mean() > 0.8, "most of the fault is flagged"
    # Windows ending up to W-1 rows after the fault still hold faulty rows: not "normal" yet.
    normal = ~labels
    normal[1000:1000 + 20 - 1] = False
    assert flags[normal].mean() < 0.01, "normal stretches stay quiet"
    biggest = max(summary["spans"], key=lambda s: pd.Timestamp(s["end"]) - pd.Timestamp(s["start"]))
    assert biggest["sensors"][0]["sensor"] == "pressure", "the faulty sensor is ranked first"
    assert biggest["sensors"][0]["actual"] > biggest["sensors"][0]["expected"] + 0.15  # offset +0.3 seen

    # The same file with its ground truth: the same flags, the figures against the labels, and with
    # --record an evaluation run and eval.* tags on the version.
    faulty.assign(anomaly=labels.astype(int)).reset_index().to_csv(tmp_path / "labelled.csv", index=False)
    assert main(["score", "--data", "labelled.csv", "--config", str(config), "--out", "labelled_scores.parquet",
                 "--record"]) == 0
    labelled = json.loads(capsys.readouterr().out)
    scored = pd.read_parquet(tmp_path / "labelled_scores.parquet")  # a .parquet name: Parquet, not CSV
    np.testing.assert_array_equal(scored["is_anomaly"].to_numpy(bool), flags)
    np.testing.assert_array_equal(scored["label"].to_numpy(bool), labels)
    figures = labelled["evaluation"]
    tp, fp = int((flags & labels).sum()), int((flags & ~labels).sum())
    assert figures["labelled_rows"] == 200 and figures["flagged_rows"] == tp + fp
    assert figures["recall"] == pytest.approx(tp / 200) and figures["precision"] == pytest.approx(tp / (tp + fp))
    assert figures["mar"] == pytest.approx(100 * (200 - tp) / 200)
    assert figures["labelled_events"] == figures["detected_events"] == 1 and figures["event_recall"] == 1.0
    assert figures["mean_delay_s"] >= 0

    from anomaly import tracking
    from anomaly.registry import client

    tracking.configure(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    version = client().get_model_version("anomaly-detector", "1")
    assert version.tags["eval.f1"] == f"{figures['f1']:.4g}" and version.tags["eval.run_id"] == labelled["evaluation_run_id"]
    assert version.tags["eval.data"] == "labelled.csv"
    run = client().get_run(labelled["evaluation_run_id"])
    assert run.data.tags["kind"] == "evaluation" and run.data.tags["model.version"] == "1"
    assert run.data.metrics["event_f1"] == pytest.approx(figures["event_f1"])
    assert [a.path for a in client().list_artifacts(run.info.run_id, "plots")] == ["plots/overlay-labelled.png"]
    # --record without labels is refused before anything is scored or logged
    assert main(["score", "--data", "faulty.csv", "--config", str(config), "--record"]) == 2
    assert "--record needs ground truth" in capsys.readouterr().err
    assert labelled["scored_rows"] == 1500 - 20 + 1  # every row from the first full window on
    # A file too short for one window is an error, not "nothing flagged"
    faulty.iloc[:5].reset_index().to_csv(tmp_path / "short.csv", index=False)
    assert main(["score", "--data", "short.csv", "--config", str(config)]) == 2
    assert "no row could be scored: a score needs 20 readings" in capsys.readouterr().err
    # A sensor column of text alone is named with its first cell (it was said to be absent from the file)
    offline = faulty.iloc[:50].reset_index()
    offline[offline.columns[1]] = "offline"
    offline.to_csv(tmp_path / "offline.csv", index=False)
    assert main(["score", "--data", "offline.csv", "--config", str(config)]) == 2
    assert f"column '{offline.columns[1]}' is not numeric (e.g. 'offline' at data row" in capsys.readouterr().err
    # A column the model does not read is no reason to refuse the file (its bad cell was)
    extra = faulty.iloc[:50].reset_index().assign(note=["1.5"] * 49 + ["oops"])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    assert main(["score", "--data", "extra.csv", "--config", str(config)]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["scored_rows"] == 50 - 20 + 1

    assert main(["models", "list", "--config", str(config), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["aliases"] == ["champion"] and listed[0]["tags"]["eval.event_f1"] == f"{figures['event_f1']:.4g}"
    assert main(["models", "list", "--config", str(config)]) == 0
    assert f"{figures['f1']:.4g}/{figures['event_f1']:.4g}" in capsys.readouterr().out
    # aliases are case-sensitive: a new one made by a slip of the shift key is said
    assert main(["models", "promote", "1", "--alias", "Champion", "--config", str(config)]) == 0
    assert "did you mean @champion?" in caplog.text
    capsys.readouterr()


def test_a_labelled_training_file_does_not_learn_its_anomalies(tmp_path, monkeypatch, capsys):
    """``train --data`` on a file whose ``anomaly`` column marks a fault: the fault's rows (and
    ``retrain.exclude_margin_rows`` on each side) do not train, the scaler never sees them, and the
    version says how many rows were left out; the model then flags that fault."""
    from anomaly import tracking
    from anomaly.registry import client, load_detector

    local_mlflow(tmp_path, monkeypatch)
    config = tmp_path / "small.toml"
    config.write_text("[model]\nwindow_size = 10\nhidden_size = 16\nlatent_size = 4\n"
                      "[training]\nepochs = 8\nbatch_size = 64\ndevice = \"cpu\"\n"
                      "[retrain]\nexclude_margin_rows = 5\n")
    faulty, labels = with_fault(normal_frame(2000), sensor="pressure", start=600, length=300, size=5.0)
    faulty.assign(anomaly=labels.astype(int)).reset_index().to_csv(tmp_path / "labelled.csv", index=False)
    assert main(["train", "--data", "labelled.csv", "--config", str(config), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    tracking.configure(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert client().get_model_version("anomaly-detector", "1").tags["data.labelled_rows_left_out"] == "310"
    detector, _ = load_detector("anomaly-detector", "1")
    kept = np.ones(2000, bool)
    kept[595:905] = False
    pressure = faulty["pressure"].to_numpy()
    at = detector.scaler.sensors.index("pressure")
    assert detector.scaler.centre[at] == pytest.approx(pressure[kept].mean(), rel=1e-6)  # 0.75 off with the fault
    assert detector.scaler.scale[at] == pytest.approx(pressure[kept].std(), rel=1e-3)
    assert main(["score", "--data", "labelled.csv", "--config", str(config), "--model-alias", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluation"]["recall"] > 0.8


def test_a_fleet_table_trains_one_shared_model_that_flags_a_faulty_pump(tmp_path, monkeypatch, capsys):
    """``train --data`` on a table of several pumps (``data.entity_column``): one model for the fleet,
    each pump gridded on its own; a sensor flat in one pump is left out for all; the run and the version
    say which entities trained it and each has its own threshold; ``score`` on a fleet table holds each
    pump to its own threshold (the shared one for a pump the model never saw) and flags the faulty one."""
    from anomaly import tracking
    from anomaly.registry import client

    local_mlflow(tmp_path, monkeypatch)
    monkeypatch.setenv("ANOMALY_DATA__ENTITY_COLUMN", "pump")
    config = tmp_path / "small.toml"
    config.write_text("[model]\nwindow_size = 20\nhidden_size = 24\nlatent_size = 8\n"
                      "[training]\nepochs = 25\nbatch_size = 64\ndevice = \"cpu\"\n"
                      "[threshold]\nmethod = \"pot\"\nrisk = 0.002\ninit_quantile = 0.95\n")
    parts = []
    for i in range(3):  # same hours for every pump: rows of one timestamp belong to several pumps
        frame = normal_frame(1200, seed=20 + i)
        frame["rpm"] = 1500.0 + np.random.default_rng(i).normal(0, 5, len(frame))
        if i == 1:
            frame["rpm"] = 1500.0  # pump-1's rpm sensor is stuck
        parts.append(frame.assign(pump=f"pump-{i}").reset_index())
    pd.concat(parts).sort_values("ts", kind="stable").to_csv(tmp_path / "fleet.csv", index=False)
    assert main(["train", "--data", "fleet.csv", "--config", str(config), "--promote", "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["version"] == "1" and trained["promoted"]

    tracking.configure(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    version = client().get_model_version("anomaly-detector", "1")
    assert version.tags["data.entities"] == "pump-0,pump-1,pump-2"
    assert version.tags["data.sensors"] == "temp,pressure,flow"  # rpm left out for the whole fleet
    assert version.tags["data.rows"] == str(3 * 1200 + 5)  # every row of every pump, and 5 stand-ins
    # Each pump's own threshold (POT on its 221 validation windows, >= per_entity_min_windows = 200).
    from anomaly.registry import load_detector

    detector, _ = load_detector("anomaly-detector", "champion")
    own = detector.threshold.per_entity
    assert sorted(own) == ["pump-0", "pump-1", "pump-2"] and len(set(own.values())) == 3
    run = client().get_run(version.run_id)
    assert run.data.metrics["per_entity_thresholds"] == 3.0
    assert run.info.run_name == "train-custom" and run.data.tags["kind"] == "train"
    inputs = run.inputs.dataset_inputs  # the UI's Datasets column
    assert len(inputs) == 1 and inputs[0].dataset.name == "custom: 3605 rows" and inputs[0].dataset.digest
    assert [t.value for t in inputs[0].tags if t.key == "mlflow.data.context"] == ["training"]
    assert run.data.tags["mlflow.note.content"].startswith("LSTM autoencoder trained on custom data (3 entities of fleet.csv): 3605 rows of 3 sensors")

    # The fleet scored in one file: pump-b has the fault; each pump's rows are scored on their own.
    faulty, labels = with_fault(normal_frame(1500, seed=7, start="2026-02-01T00:00:00Z"),
                                sensor="pressure", start=800, length=200, size=0.3)
    healthy = normal_frame(1500, seed=8, start="2026-02-01T00:00:00Z")
    pd.concat([healthy.assign(pump="pump-0").reset_index(), faulty.assign(pump="pump-9").reset_index()]) \
        .sort_values("ts", kind="stable").to_csv(tmp_path / "faulty.csv", index=False)
    assert main(["score", "--data", "faulty.csv", "--config", str(config), "--out", "scores.csv"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entities"] == ["pump-0", "pump-9"] and summary["rows"] == 3000
    faulty_spans = [span for span in summary["spans"] if span["entity"] == "pump-9"]
    assert faulty_spans and all(span["entity"] in ("pump-0", "pump-9") for span in summary["spans"])
    rows = pd.read_csv(tmp_path / "scores.csv")
    assert list(rows.columns) == ["entity", "ts", "score", "threshold", "is_anomaly", "top_sensor"]
    pump_a, pump_b = (rows[rows["entity"] == e] for e in ("pump-0", "pump-9"))
    # pump-0 is held to its own threshold; pump-9, which the model never saw, to the shared one
    assert pump_a["threshold"].to_numpy() == pytest.approx(np.full(1500, own["pump-0"]))
    assert pump_b["threshold"].to_numpy() == pytest.approx(np.full(1500, detector.threshold.value))
    flags = pump_b["is_anomaly"].to_numpy(bool)
    assert flags[labels].mean() > 0.8, "most of the fault is flagged"
    normal = ~labels
    normal[1000:1000 + 20 - 1] = False
    assert flags[normal].mean() < 0.02, "normal stretches stay quiet"
    # The healthy pump grazes the threshold at most (measured: 1.1 % of its rows, all within 20 % of it),
    # far under the fault (its lowest score over the fault is 25 x the healthy pump's highest).
    assert pump_a["is_anomaly"].mean() < 0.02
    assert pump_b["score"].to_numpy()[labels].min() > 10 * pump_a["score"].max()

    # The registry's pyfunc takes the same fleet rows with an `entity` column (optional in its signature,
    # kept through MLflow's schema check): each pump scored on its own windows, held to its own threshold.
    import mlflow

    fleet_rows = pd.read_csv(tmp_path / "faulty.csv").rename(columns={"pump": "entity"})
    pyfunc = mlflow.pyfunc.load_model("models:/anomaly-detector@champion")
    out = pyfunc.predict(fleet_rows[["entity", "temp", "pressure", "flow"]])
    assert len(out) == 3000 and (out.index == fleet_rows.index).all()
    by_pump = {e: out[fleet_rows["entity"].to_numpy() == e] for e in ("pump-0", "pump-9")}
    assert by_pump["pump-0"]["threshold"].to_numpy() == pytest.approx(np.full(1500, own["pump-0"]))
    assert by_pump["pump-9"]["threshold"].to_numpy() == pytest.approx(np.full(1500, detector.threshold.value))
    np.testing.assert_allclose(by_pump["pump-9"]["score"].to_numpy(dtype=float, na_value=np.nan),
                               pump_b["score"].to_numpy(), rtol=1e-5)  # as `anomaly score` scored it
    assert by_pump["pump-9"]["is_anomaly"].to_numpy(bool)[labels].mean() > 0.8
    # numeric ids are ids too (an id the model never saw is held to the shared threshold)
    numbered = pyfunc.predict(fleet_rows[["entity", "temp", "pressure", "flow"]].assign(
        entity=fleet_rows["entity"].map({"pump-0": 0, "pump-9": 9})))
    assert (numbered["threshold"] == detector.threshold.value).all() and len(numbered) == 3000
    # without the column, one series held to the shared threshold, as before
    plain = pyfunc.predict(fleet_rows[["temp", "pressure", "flow"]])
    assert (plain["threshold"] == detector.threshold.value).all()

    # The fleet file with its ground truth: the total, and each pump's own figures beside it.
    truth = np.zeros(3000, dtype=int)
    truth[1500:][labels] = 1  # pump-9's rows come second in the file written above
    pd.concat([healthy.assign(pump="pump-0").reset_index(), faulty.assign(pump="pump-9").reset_index()]) \
        .assign(anomaly=truth).sort_values("ts", kind="stable").to_csv(tmp_path / "labelled.csv", index=False)
    assert main(["score", "--data", "labelled.csv", "--config", str(config)]) == 0
    labelled = json.loads(capsys.readouterr().out)
    each = labelled["evaluation_by_entity"]
    assert sorted(each) == ["pump-0", "pump-9"] and each["pump-0"]["labelled_rows"] == 0
    assert each["pump-0"]["flagged_rows"] == int(pump_a["is_anomaly"].sum())
    assert each["pump-9"]["labelled_rows"] == 200 and each["pump-9"]["recall"] == pytest.approx(flags[labels].mean())
    assert labelled["evaluation"]["flagged_rows"] == each["pump-0"]["flagged_rows"] + each["pump-9"]["flagged_rows"]
