"""Batched reconstruction and anomaly scores. torch and numpy; no I/O.

Score of a window = mean over sensors of the per-sensor error; per-sensor error = mean over the
window's steps of the squared difference between the scaled reading and its reconstruction. The
per-sensor errors say which sensors drove a flagged window; the reconstruction (unscaled) says what
the model expected them to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SCORE_BATCH = 1024  # windows per forward pass when scoring: large enough to amortise, small for memory


@dataclass(frozen=True)
class WindowScores:
    scores: np.ndarray  # (N,) anomaly score per window
    sensor_errors: np.ndarray  # (N, F) mean squared error per sensor (scaled units)
    last_reconstruction: np.ndarray  # (N, F) reconstruction of each window's last step (scaled units)


def reconstruct(model: nn.Module, windows: np.ndarray, device: torch.device | str = "cpu",
                batch_size: int = SCORE_BATCH) -> np.ndarray:
    """Reconstructions (N, W, F) of scaled windows (N, W, F), in float32."""
    windows = np.ascontiguousarray(windows, dtype=np.float32)
    device = torch.device(device)
    out = np.empty_like(windows)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = torch.from_numpy(windows[start:start + batch_size]).to(device, non_blocking=True)
            out[start:start + len(batch)] = model(batch).float().cpu().numpy()
    return out


def reconstruction_errors(windows: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Per-window, per-sensor mean squared error (N, F)."""
    return np.mean((np.asarray(windows, np.float32) - reconstruction) ** 2, axis=1)


def window_scores(model: nn.Module, windows: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = SCORE_BATCH) -> WindowScores:
    """Score scaled windows (N, W, F) in batched forward passes."""
    recon = reconstruct(model, windows, device, batch_size)
    sensor_errors = reconstruction_errors(windows, recon)
    return WindowScores(scores=sensor_errors.mean(axis=1), sensor_errors=sensor_errors,
                        last_reconstruction=recon[:, -1, :])


def sensor_contributions(sensor_errors: np.ndarray) -> np.ndarray:
    """Each sensor's share of its window's error (rows sum to 1)."""
    totals = sensor_errors.sum(axis=-1, keepdims=True)
    return np.divide(sensor_errors, totals, out=np.zeros_like(sensor_errors), where=totals > 0)
