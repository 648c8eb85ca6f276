"""Training loop for the autoencoder. torch and numpy; no MLflow, no files.

The loop reports through callbacks (``on_epoch_end``), so tracking (MLflow) and progress display
stay outside it. The whole training set lives on the device as one tensor and batches are index
slices of it: no DataLoader, no per-batch host copies.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from anomaly.errors import ConfigError, ModelError
from anomaly.model import LSTMAutoencoder, ModelConfig, build_model


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field has a default that works on SKAB-sized data on a CPU."""

    epochs: int = 60  # upper bound; early stopping usually ends sooner
    batch_size: int = 128  # windows per optimisation step
    learning_rate: float = 1e-3  # Adam step size
    weight_decay: float = 0.0  # Adam L2 penalty
    validation_fraction: float = 0.2  # last part of the windows (in time order) held out for early stopping and thresholds
    patience: int = 8  # epochs without validation improvement before stopping
    min_delta: float = 1e-5  # smallest validation-loss decrease that counts as an improvement
    grad_clip: float = 1.0  # max gradient norm (LSTMs can spike); 0 disables
    seed: int = 0  # seeds python, numpy and torch
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
    mixed_precision: bool = True  # bf16 autocast on CUDA; ignored on CPU
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "patience")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"training.{name}", f"must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError("training.learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError("training.validation_fraction", f"must be in (0, 1), got {self.validation_fraction}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError("training.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    seconds: float
    windows_per_s: float


class TrainCallback(Protocol):
    def on_epoch_end(self, stats: EpochStats) -> None: ...


@dataclass
class TrainResult:
    model: LSTMAutoencoder  # best weights (lowest validation loss), in eval mode, on CPU
    history: list[EpochStats]
    best_epoch: int
    best_val_loss: float
    device: str
    seconds: float
    n_train_windows: int
    n_val_windows: int
    val_windows: np.ndarray = field(repr=False)  # (Nv, W, F) scaled, for threshold fitting

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "epochs_run": len(self.history), "device": self.device,
                "train_seconds": round(self.seconds, 3),
                "n_train_windows": self.n_train_windows, "n_val_windows": self.n_val_windows}


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device", f"{name} asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_windows(windows: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Time-ordered split: the last fraction of windows validates. The last ``W-1`` training windows
    before the split are dropped so no training window shares a row with a validation window."""
    n = len(windows)
    if n < 4:
        raise ModelError(f"need at least 4 windows to train, got {n}")
    n_val = max(1, int(round(n * validation_fraction)))
    split = n - n_val
    gap = min(windows.shape[1] - 1, max(0, split - 2))
    return windows[: split - gap], windows[split:]


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def evaluate_loss(model: nn.Module, data: torch.Tensor, batch_size: int, device: torch.device,
                  mixed_precision: bool) -> float:
    """Mean squared reconstruction error over ``data`` (already on ``device``)."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode(), _autocast(device, mixed_precision):
        for start in range(0, len(data), batch_size):
            batch = data[start:start + batch_size]
            loss = torch.mean((model(batch).float() - batch) ** 2)
            total += float(loss) * len(batch)
            count += len(batch)
    return total / max(count, 1)


def train_autoencoder(windows: np.ndarray, model_config: ModelConfig, config: TrainConfig,
                      callbacks: Sequence[TrainCallback] = (),
                      progress_desc: str = "training") -> TrainResult:
    """Train on scaled windows (N, W, F) with a time-ordered validation split and early stopping.

    Returns the model with the best validation loss. Raises ``ModelError`` when the data is too small.
    """
    windows = np.ascontiguousarray(windows, dtype=np.float32)
    if windows.ndim != 3 or windows.shape[1:] != (model_config.window_size, model_config.n_features):
        raise ModelError(f"windows shape {windows.shape} does not match W={model_config.window_size}, "
                         f"F={model_config.n_features}")
    if not np.isfinite(windows).all():
        raise ModelError("training windows contain NaN or inf; fill gaps before training")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_np, val_np = split_windows(windows, config.validation_fraction)
    train = torch.from_numpy(train_np).to(device)
    val = torch.from_numpy(val_np).to(device)

    model = build_model(model_config).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    history: list[EpochStats] = []
    best_loss, best_epoch, best_state, waited = math.inf, 0, copy.deepcopy(model.state_dict()), 0
    started = time.perf_counter()
    bar = _progress(config.epochs, progress_desc, config.progress)
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(train), device=device, generator=generator)
            running, seen = torch.zeros((), device=device), 0
            for start in range(0, len(train), config.batch_size):
                batch = train[order[start:start + config.batch_size]]
                with _autocast(device, config.mixed_precision):
                    loss = torch.mean((model(batch).float() - batch) ** 2)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimiser.step()
                running += loss.detach() * len(batch)  # stays on the device: no sync per batch
                seen += len(batch)
            train_loss = float(running) / max(seen, 1)
            val_loss = evaluate_loss(model, val, config.batch_size * 4, device, config.mixed_precision)
            seconds = time.perf_counter() - t0
            stats = EpochStats(epoch, train_loss, val_loss, seconds, seen / max(seconds, 1e-9))
            history.append(stats)
            for cb in callbacks:
                cb.on_epoch_end(stats)
            if not math.isfinite(train_loss):
                raise ModelError(f"training diverged at epoch {epoch} (loss {train_loss})")
            if val_loss < best_loss - config.min_delta:
                best_loss, best_epoch, waited = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=best_epoch)
            if waited >= config.patience:
                break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    return TrainResult(model=model, history=history, best_epoch=best_epoch, best_val_loss=best_loss,
                       device=str(device), seconds=time.perf_counter() - started,
                       n_train_windows=len(train_np), n_val_windows=len(val_np), val_windows=val_np)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


class FunctionCallback:
    """Adapts a plain function ``fn(stats)`` to the callback protocol."""

    def __init__(self, fn: Callable[[EpochStats], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, stats: EpochStats) -> None:
        self.fn(stats)


def train_config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
