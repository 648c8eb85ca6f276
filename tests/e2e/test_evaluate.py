"""``anomaly evaluate`` on small copies of the datasets in their own layout: the protocol runs end to
end and writes the JSON figures and the Markdown report."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from anomaly.cli import main
from tests.fixtures import missing_requirement

pytestmark = pytest.mark.e2e

DATASETS = Path(os.environ.get("ANOMALY_DATASETS", Path(__file__).resolve().parents[3] / "shared" / "datasets"))


@pytest.fixture()
def small_skab(tmp_path):
    src = DATASETS / "skab" / "data"
    if not src.is_dir():
        missing_requirement(f"SKAB not found at {src}")
    for name in ("valve1/1.csv", "valve2/1.csv", "other/9.csv"):
        frame = pd.read_csv(src / name, sep=";")
        out = tmp_path / "skab" / "data" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.iloc[:900].to_csv(out, sep=";", index=False)
    return tmp_path / "skab"


def test_evaluate_skab_copy_writes_figures_and_report(small_skab, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("ANOMALY_MLFLOW__ARTIFACT_LOCATION", str(tmp_path / "artifacts"))
    code = main(["evaluate", "--dataset", "skab", "--data-dir", str(small_skab), "--json", "out.json",
                 "--report", "report.md", "--epochs", "3", "--quiet"])
    assert code == 0
    figures = json.loads((tmp_path / "out.json").read_text())
    for key in ("f1", "far", "mar", "event_precision", "event_recall", "event_f1", "mean_delay_s"):
        assert key in figures
    assert figures["files"] == 3 and figures["test_rows"] == 3 * 500
    assert 0 <= figures["f1"] <= 1 and 0 <= figures["far"] <= 100 and 0 <= figures["mar"] <= 100
    # The faults are found at all (a chain that flags nothing, or everything, fails here).
    assert figures["event_recall"] > 0 and figures["mar"] < 100 and figures["far"] < 100
    report = (tmp_path / "report.md").read_text()
    assert "valve1/1" in report and "valve2/1" in report and "other/9" in report
    assert "| 6 |" in report and "'Volume Flow RateRMS'" in report and "Thermocouple" not in report  # the profile's six

    import mlflow

    runs = mlflow.search_runs(experiment_names=["anomaly"])
    assert len(runs) == 1 and runs.iloc[0]["metrics.f1"] == pytest.approx(figures["f1"])
    plotted = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"], "plots")}
    assert "plots/score_distribution.png" in plotted and any(p.startswith("plots/overlay-") for p in plotted)
    assert any(p.startswith("plots/contributions-") for p in plotted)  # which sensors drove the error


@pytest.fixture()
def small_nab(tmp_path):
    src = DATASETS / "nab"
    if not (src / "labels" / "combined_windows.json").is_file():
        missing_requirement(f"NAB not found at {src}")
    names = ["artificialWithAnomaly/art_daily_jumpsup.csv", "artificialNoAnomaly/art_daily_small_noise.csv"]
    windows = json.loads((src / "labels" / "combined_windows.json").read_text())
    for name in names:
        out = tmp_path / "nab" / "data" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes((src / "data" / name).read_bytes())
    (tmp_path / "nab" / "labels").mkdir(parents=True)
    (tmp_path / "nab" / "labels" / "combined_windows.json").write_text(json.dumps({n: windows[n] for n in names}))
    return tmp_path / "nab"


def test_evaluate_nab_copy_scores_the_jump(small_nab, tmp_path, monkeypatch):
    """The NAB chain (newest-step error, trailing likelihood, each alarm once) finds the level jump of
    art_daily_jumpsup inside its window: the oracle score beats the null detector's 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("ANOMALY_MLFLOW__ARTIFACT_LOCATION", str(tmp_path / "artifacts"))
    code = main(["evaluate", "--dataset", "nab", "--data-dir", str(small_nab), "--json", "out.json",
                 "--epochs", "5", "--quiet"])
    assert code == 0
    figures = json.loads((tmp_path / "out.json").read_text())
    for key in ("nab_standard", "nab_low_fp", "nab_low_fn", "nab_standard_own_threshold", "event_f1"):
        assert key in figures
    assert figures["files"] == 2
    assert 0 < figures["nab_standard"] <= 100
