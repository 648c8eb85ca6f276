"""``pipelines.bench_train`` runs end to end on tiny sizes and writes every figure. Not a timed test:
it checks the JSON's shape and plausibility, never the speed targets (the README table judges those)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import re
from pathlib import Path

import pytest

from anomaly.cli import default_data_dir
from tests.fixtures import missing_requirement

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    data = (ROOT / default_data_dir("skab")).resolve().parent
    if not (data / "skab").is_dir() or not (data / "smd").is_dir():
        missing_requirement(f"needs the SKAB and SMD datasets under {data}")
    out = tmp_path_factory.mktemp("bench") / "bench_train.json"
    readme = tmp_path_factory.mktemp("readme") / "README.md"
    readme.write_text("# x\n\n<!-- bench-train:start -->\nold\n<!-- bench-train:end -->\n\nafter\n")
    done = subprocess.run([sys.executable, "-m", "pipelines.bench_train", "--quick", "--devices", "cpu",
                           "--repeats", "1", "--data-dir", str(data), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from pipelines.bench_train import MARKER, markdown
    from pipelines.benchmark import update_readme
    data_out = json.loads(out.read_text())
    update_readme(markdown(data_out), readme, marker=MARKER)
    return data_out, done.stdout, readme.read_text()


def test_quick_run_writes_every_figure(quick):
    data, stdout, _ = quick
    m = data["machine"]
    assert m["torch"] and m["cpu_count"] >= 1 and m["torch_threads"] >= 1 and "cuda_available" in m
    assert set(data["results"]) == {"skab/cpu", "smd/cpu"}
    for key, r in data["results"].items():
        assert (r["n_features"], r["window_size"]) == ((8, 10) if key.startswith("skab") else (38, 100))
        for side in ("reference", "ours"):
            s = r[side]
            for figure in ("train_windows_per_s", "score_windows_per_s", "val_loss"):
                assert _positive(s[figure]), (key, side, figure, s[figure])
            assert s["train_memory"]["rss_peak_mb"] > 50  # a process holding torch
        assert _positive(r["reference"]["time_to_target_s"]) and _positive(r["target_val_loss"])
        assert r["target_val_loss"] == pytest.approx(min(h["val_loss"] for h in r["reference"]["history"]))
        if r["ours"]["reached_target"]:
            assert r["ours"]["history"][-1]["val_loss"] <= r["target_val_loss"]
        ratios = r["ratios"]
        assert ratios["train_windows_per_s"] == pytest.approx(r["ours"]["train_windows_per_s"]
                                                              / r["reference"]["train_windows_per_s"])
        assert ratios["score_windows_per_s"] == pytest.approx(r["ours"]["score_windows_per_s"]
                                                              / r["reference"]["score_windows_per_s"])
        # Both scorers compute the same scores on the same model.
        assert r["ours"]["score_max_rel_diff_vs_reference_scorer"] < 1e-4
    assert "training, windows/s" in stdout and re.search(r"— (met|\*\*not met\*\*)", stdout), stdout


def test_quick_run_renders_into_the_readme_markers(quick):
    _, _, readme = quick
    assert "old" not in readme and readme.endswith("after\n")
    assert "| SKAB 8×10, CPU | training, windows/s |" in readme
    assert readme.count("<!-- bench-train:start -->") == 1 and "ours / ref" in readme


def test_gpu_figures_go_to_their_own_section_and_a_ratio_to_nothing_is_not_shown(quick):
    import copy

    from pipelines.bench_train import GPU_MARKER, MARKER, markdown, readme_section

    data, _, _ = quick
    assert readme_section(data) == MARKER
    gpu = copy.deepcopy(data)
    gpu["machine"]["gpu"] = "a GPU"
    r = gpu["results"].pop("smd/cpu")
    for side, peak in (("reference", 188.0), ("ours", 2783.0)):
        r[side]["train_memory"].update(rss_growth_mb=0.0 if side == "reference" else 427.0, cuda_peak_mb=peak)
    r["ratios"].update(train_rss_growth_mb=2135.5, train_cuda_peak_mb=2783.0 / 188.0)
    gpu["results"]["smd/cuda"] = r
    assert readme_section(gpu) == GPU_MARKER
    text = markdown(gpu)
    assert "deploy/gpu-check.sh run" in text and ", GPU a GPU," in text
    assert "| training peak RSS growth, MiB | 0 | 427 | n/a |" in text and "2135" not in text
    assert "| training peak CUDA memory, MiB | 188 | 2,783 | 14.80× |" in text


def test_the_reference_loop_returns_its_best_epochs_model():
    # Its "val loss" row was its last epoch's model against our best one; the target is its best epoch's.
    import numpy as np
    import torch

    import pipelines.bench_train as bench
    from anomaly.model import ModelConfig
    from anomaly.windowing import make_windows

    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=(600, 4)), axis=0).astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    windows = torch.from_numpy(make_windows(x, 8).copy())
    train, val = windows[:450], windows[450:]
    losses = []
    original = bench.REF_LR
    bench.REF_LR = 0.3  # a loss that wanders: the last epoch is not the best
    try:
        model = bench.plain_train(train, val, ModelConfig(n_features=4, window_size=8, hidden_size=16, latent_size=4),
                                  torch.device("cpu"), 5, on_epoch=lambda e, ts, vl, el: losses.append(vl))
    finally:
        bench.REF_LR = original
    assert losses[-1] != min(losses)  # the case the test is about
    assert bench.plain_val_loss(model, val, torch.device("cpu")) == pytest.approx(min(losses), rel=1e-6)


def test_the_reference_at_our_thread_count_leaves_its_warm_up_epoch_out(monkeypatch):
    """Its throughput was two epochs, the first (allocator and kernel set-up) counted in."""
    import torch

    import pipelines.bench_train as bench

    def fake_train(train, val, dims, device, epochs, on_epoch=lambda *a: None, seed=0):
        for epoch, seconds in enumerate([9.0, 1.0, 1.0, 1.0][:epochs]):  # a slow first epoch, then 1 s each
            on_epoch(epoch, seconds, 0.1, 0.0)
        return torch.nn.Identity()

    monkeypatch.setattr(bench, "plain_train", fake_train)
    monkeypatch.setattr(bench, "plain_scores", lambda model, windows, device: None)
    train = torch.zeros(100, 4, 2)
    out = bench._reference_at_threads(train, train, train, None, torch.device("cpu"), 1, 1, 200.0, 1.0)
    assert out["train_windows_per_s"] == pytest.approx(100.0)  # 100 windows a second once warm
    assert out["ratios"]["train_windows_per_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("module, argv", [
    ("pipelines.bench_train", ["--sizes", "foo"]), ("pipelines.bench_train", ["--repeats", "0"]),
    ("pipelines.bench_train", ["--devices", "tpu"]), ("pipelines.benchmark", ["--threads", "-1"]),
    ("pipelines.fleet", ["--threads", "-1"]), ("pipelines.bench_stream", ["--adaptive-rows", "-1"]),
    ("pipelines.skab_tradeoff", ["--threads", "-1"]),
])
def test_a_bad_option_of_a_benchmark_is_a_usage_error_before_any_work(module, argv, capsys):
    # they were tracebacks: torch's RuntimeError, a KeyError, min() of nothing after all the training
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_a_run_that_measured_nothing_leaves_the_readme_as_it_is(tmp_path, monkeypatch):
    """--devices cuda on a machine without CUDA measures nothing: --update-readme wrote an empty table into
    this machine's section, over its CPU rows."""
    import torch

    from pipelines import bench_train

    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- {bench_train.MARKER}:start -->\nCPU rows\n<!-- {bench_train.MARKER}:end -->\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"nothing measured \(cuda \(no CUDA device\)\)"):
        bench_train.main(["--devices", "cuda", "--update-readme", "--json", str(tmp_path / "b.json")])
    assert "CPU rows" in readme.read_text()
