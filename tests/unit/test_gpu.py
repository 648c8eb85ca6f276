"""CUDA training and scoring; skipped cleanly where there is no CUDA (CI never has one)."""

import numpy as np
import pytest
import torch

from anomaly.detector import fit_detector
from anomaly.scoring import window_scores
from anomaly.training import TrainConfig
from anomaly.windowing import make_windows
from tests.fixtures import normal_frame

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_trains_on_cuda_with_bf16_and_scores_like_cpu():
    values = normal_frame(1500).to_numpy()
    cfg = TrainConfig(epochs=5, batch_size=128, device="cuda", mixed_precision=True, progress=False)
    detector, result, _ = fit_detector(values, ["temp", "pressure", "flow"], {"window_size": 16, "hidden_size": 32,
                                       "latent_size": 8}, cfg)
    assert result.device.startswith("cuda")
    assert result.history[-1].train_loss < result.history[0].train_loss
    windows = make_windows(detector.scaler.transform(values), 16)
    on_cpu = window_scores(detector.model.cpu(), windows, "cpu").scores
    on_gpu = window_scores(detector.model.cuda(), windows, "cuda").scores
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-5)


def _sine_windows(n: int = 3000, w: int = 16) -> np.ndarray:
    t = np.arange(n)[:, None]
    x = np.sin(t / (6 + 3 * np.arange(3))).astype(np.float32)
    return make_windows(x, w)


def test_fast_scorer_on_cuda_matches_cpu_and_a_per_window_loop(monkeypatch):
    import anomaly.scoring as scoring
    from anomaly.model import ModelConfig, build_model
    from anomaly.scoring import ieee_float32, reconstruct

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=3, window_size=16, hidden_size=32, latent_size=8))
    windows = _sine_windows()
    on_cpu = window_scores(model.cpu(), windows, "cpu")
    on_gpu = window_scores(model.cuda(), windows, "cuda")  # batch sized to the GPU, resident windows
    small = window_scores(model, windows, "cuda", batch_size=100)  # small batches of the resident rows
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "CUDA_RESIDENT_BYTES", 0)  # too big to hold: per-batch pinned transfers
        pinned = window_scores(model, windows, "cuda", batch_size=100)
    for fast in (on_gpu, small, pinned):
        np.testing.assert_allclose(fast.scores, on_cpu.scores, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(fast.sensor_errors, on_cpu.sensor_errors, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(fast.last_reconstruction, on_cpu.last_reconstruction, rtol=1e-3, atol=1e-5)
    # Windows that are no sliding view of their rows go over as they are, resident or batch by batch.
    apart = np.ascontiguousarray(windows.transpose(0, 2, 1)).transpose(0, 2, 1)
    for batch_size in (0, 100):
        other = window_scores(model, apart, "cuda", batch_size=batch_size)
        np.testing.assert_allclose(other.scores, on_cpu.scores, rtol=1e-3, atol=1e-6)
    assert torch.backends.cudnn.allow_tf32  # float32 scoring put torch's setting back
    recon = reconstruct(model, windows[:50], "cuda")
    with ieee_float32("cuda"):  # float32 as the scorer runs it
        naive = np.stack([model(torch.from_numpy(np.array(w))[None].cuda())[0].detach().cpu().numpy()
                          for w in windows[:50]])
    np.testing.assert_allclose(recon, naive, rtol=1e-3, atol=1e-5)
    bf16 = window_scores(model, windows, "cuda", precision="bf16").scores
    np.testing.assert_allclose(bf16, on_cpu.scores, rtol=0.1, atol=1e-4)
    assert np.corrcoef(bf16, on_cpu.scores)[0, 1] > 0.99


def test_fast_training_on_cuda_reaches_the_plain_loss():
    from dataclasses import replace

    from anomaly.model import ModelConfig
    from anomaly.training import fast_train_config, train_autoencoder

    windows = _sine_windows(6000)
    cfg = ModelConfig(n_features=3, window_size=16, hidden_size=32, latent_size=8)
    plain = TrainConfig(epochs=6, batch_size=32, patience=20, device="cuda", mixed_precision=False, progress=False)
    fast = replace(fast_train_config(plain, "cuda", n_windows=len(windows)), epochs=30)
    assert fast.batch_size > 32 and fast.mixed_precision and fast.warmup_steps > 0
    a = train_autoencoder(windows, cfg, plain)
    b = train_autoencoder(windows, cfg, fast)
    assert a.device.startswith("cuda") and b.device.startswith("cuda")
    assert a.best_val_loss < a.history[0].val_loss * 0.5
    assert b.best_val_loss < 1.25 * a.best_val_loss
    assert all(h.train_seconds > 0 for h in b.history)
    # The returned model is on the CPU and scores there like on the GPU: float32 is IEEE float32 there
    # too (with cuDNN's default TF32 these scores moved by up to 0.9 % on an H200).
    cpu_scores = window_scores(b.model, windows, "cpu").scores
    gpu_scores = window_scores(b.model.cuda(), windows, "cuda").scores
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-3, atol=1e-6)
    auto = window_scores(b.model, windows, "cuda", precision="auto").scores  # bf16, the worker's default
    assert np.median(np.abs(auto - cpu_scores) / cpu_scores) < 5e-3


def test_bench_train_quick_on_cuda(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pipelines.bench_train", "--quick", "--devices", "cuda",
                           "--sizes", "skab", "--repeats", "1", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())["results"]["skab/cuda"]
    assert r["ours"]["train_memory"]["cuda_peak_mb"] > 0 and r["reference"]["train_memory"]["cuda_peak_mb"] > 0
    assert r["ours"]["score_max_rel_diff_vs_reference_scorer"] < 1e-3


def test_a_wild_reading_scores_huge_and_finite_at_the_workers_default_precision_on_cuda():
    from anomaly.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=3, window_size=16, hidden_size=32, latent_size=8)).cuda()
    windows = np.array(_sine_windows(200))
    windows[50:60, 15, 0] = 1e9  # scaled: far beyond float16's range, which cuDNN's LSTM may be fed in
    scores = window_scores(model, windows, "cuda", precision="auto").scores
    assert np.isfinite(scores).all()
    assert scores[50:60].min() > 1e15 and np.median(scores) < 10
    assert np.allclose(scores[:50], window_scores(model, windows[:50], "cpu").scores, rtol=0.1, atol=1e-4)
