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
