"""Training loop for the autoencoder. torch and numpy; no MLflow, no files.

The loop reports through callbacks (``on_epoch_end``), so tracking (MLflow) and progress display
stay outside it; a callback may raise ``StopTraining`` to end the run early. The whole training set
lives on the device as one tensor and batches are index slices of it: no DataLoader, no per-batch
host copies, no device sync inside an epoch.

Fast paths (``pipelines/bench_train.py`` measures them against a plain PyTorch loop): on CUDA the
fused cuDNN LSTM, bf16 autocast and a fused Adam step; large batches with the learning rate scaled
by sqrt(batch / base batch) and a linear warm-up (``lr_base_batch``, ``warmup_steps``); on CPU bf16
autocast (``cpu_bf16``, fast where the CPU has native bf16) and a thread count (``cpu_threads``).
Those that change results are opt-in; ``fast_train_config`` switches them on together. Validation
always runs in float32, the precision scores are computed in.

On CPU with several torch threads each batch is split into parts whose forward and backward passes
run side by side, one thread each (``anomaly.scoring.cpu_streams``: as many parts as threads, as long
as the configured batch gives each at least ``MIN_STREAM_WINDOWS`` windows; never an empty part);
the parts' gradients, weighted by their share of the batch, are added in part order, so the
sum does not depend on which thread finishes first. Only rounding differs from one pass over the batch.
Dropout would draw from torch's one shared generator in whichever order the threads reach it, so a model
with dropout trains on one stream (its passes still use every thread): the same seed, the same model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from anomaly.errors import ConfigError, ModelError, TrainingAbandoned
from anomaly.model import LSTMAutoencoder, ModelConfig, build_model
from anomaly.scoring import (MAX_ABS_ERROR, _rows_under, _warn_no_cpu_bf16, cpu_has_native_bf16, cpu_runs_bf16,
                             cpu_streams, ieee_float32, network_input, resident_windows, torch_threads)

log = logging.getLogger(__name__)


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
    mixed_precision: bool = True  # bf16 autocast on CUDA; ignored on CPU (see cpu_bf16)
    progress: bool = True  # show a progress bar
    lr_base_batch: int = 0  # > 0: learning_rate is meant for this batch size; scaled by sqrt(batch_size / lr_base_batch)
    warmup_steps: int = 0  # linear learning-rate warm-up over the first N optimisation steps (large batches)
    cpu_bf16: bool = False  # bf16 autocast when training on CPU (fast with AVX512-BF16/AMX; changes results slightly)
    cpu_threads: int = 0  # torch intra-op threads while training on CPU, restored afterwards; 0 = leave as set

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "patience")
        for name in ("lr_base_batch", "warmup_steps", "cpu_threads"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"training.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"training.{name}", f"must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError("training.learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError("training.validation_fraction", f"must be in (0, 1), got {self.validation_fraction}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError("training.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def peak_learning_rate(self) -> float:
        """The learning rate after warm-up: ``learning_rate``, sqrt-scaled when ``lr_base_batch`` is set."""
        if self.lr_base_batch > 0:
            return self.learning_rate * math.sqrt(self.batch_size / self.lr_base_batch)
        return self.learning_rate


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    seconds: float  # the whole epoch: optimisation pass and validation
    windows_per_s: float  # training windows / seconds
    train_seconds: float = 0.0  # the optimisation pass alone (device synchronised)


class StopTraining(Exception):
    """Raised by a callback's ``on_epoch_end`` to end training after that epoch (a target reached,
    a time budget spent); the best weights so far are returned as usual."""


_ABANDONED = threading.Event()


def abandon_training() -> None:
    """Make every training in this process, running or to come, stop at its next batch with
    ``TrainingAbandoned``: for a process on its way out (it is not undone)."""
    _ABANDONED.set()


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
    # (Nv, W, F) scaled, for threshold fitting; with ``val_index``, a span of windows of which those are validation
    val_windows: np.ndarray = field(repr=False)
    batch_size: int = 0  # windows per step actually used (training.fast may raise the configured one)
    val_start_row: int | None = None  # row of the training values the first validation window starts on (fit_detector)
    val_index: np.ndarray | None = None  # the validation windows' positions in ``val_windows`` (None: all of them)

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "epochs_run": len(self.history), "device": self.device,
                "train_seconds": round(self.seconds, 3),
                "n_train_windows": self.n_train_windows, "n_val_windows": self.n_val_windows,
                "batch_size_used": self.batch_size}


def resolve_device(name: str, field: str = "training.device") -> torch.device:
    """``auto`` means CUDA when available, else CPU; asking for CUDA without it, or for a GPU the machine
    does not have (``cuda:3`` on two), is a ``ConfigError`` naming ``field``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{name} asked for but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(field, f"{name} asked for but this machine has {torch.cuda.device_count()} CUDA "
                                     f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


MIN_TRAIN_WINDOWS = 4  # fewest windows a model trains on (training and validation together)


def split_windows(windows: np.ndarray, validation_fraction: float, starts: np.ndarray | None = None,
                  val_from_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Time-ordered split: the last fraction of windows validates, or, with ``val_from_row``, every window
    starting at or after that row (a fleet's: where its entities' recent parts begin). Training windows
    that share a row with the first validation window are dropped (where that would leave fewer than two,
    two are kept, with a warning). ``starts``: each window's first row, ascending (default: one row apart)."""
    n_train, split = split_counts(len(windows), windows.shape[1], validation_fraction, starts, val_from_row)
    return windows[:n_train], windows[split:]


def split_counts(n: int, w: int, validation_fraction: float, starts: np.ndarray | None = None,
                 val_from_row: int | None = None) -> tuple[int, int]:
    """``split_windows`` of ``n`` windows of ``w`` rows as counts: the first ``n_train`` train, those from
    ``split`` on validate."""
    if n < MIN_TRAIN_WINDOWS:
        raise ModelError(f"need at least {MIN_TRAIN_WINDOWS} windows of {w} readings to train, got {n}: train on more "
                         f"rows, or set a smaller model.window_size")
    starts = np.arange(n, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    if val_from_row is not None:
        split = int(np.searchsorted(starts, val_from_row, side="left"))
        n_val = n - split
        if n_val < 1:
            raise ModelError(f"no training window starts at or after row {val_from_row}: nothing to validate on")
    else:
        n_val = max(1, int(round(n * validation_fraction)))
        split = n - n_val
    disjoint = int(np.searchsorted(starts, starts[split] - w + 1, side="left"))  # ends before it
    n_train = min(split, max(disjoint, 2))
    if n_train < 1:  # e.g. validation_fraction 0.998: nothing trained, a random network registered
        raise ModelError(f"training.validation_fraction {validation_fraction:g} leaves no training window of {n} "
                         f"({n_val} validate): lower it, or train on more rows")
    if n_train > disjoint:
        log.warning("only %d windows before validation: %d of them share rows with the validation windows (the "
                    "threshold is fitted partly on rows the model trained on); train on more rows", split,
                    n_train - disjoint)
    return n_train, split


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether training on ``device`` runs under bf16 autocast (on a CPU that cannot run the LSTM in
    bf16, ``cpu_runs_bf16``, not: float32, with a warning)."""
    if device.type == "cuda":
        return config.mixed_precision
    if config.cpu_bf16 and not cpu_runs_bf16():
        _warn_no_cpu_bf16("training cpu_bf16")
        return False
    return config.cpu_bf16


MIN_STREAM_WINDOWS = 32  # fewest windows in one thread's part of a CPU training batch


def _loss_backward(model: nn.Module, batch: torch.Tensor, batch_total: int, device: torch.device,
                   bf16: bool, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Backward pass of ``batch``'s share of the mean squared error over ``batch_total`` windows (a
    whole batch, or one thread's part of it); that share, detached. Autocast is per thread: entered here.
    ``scaler``: the loss is scaled before the backward pass (``grad_scaler``)."""
    with _autocast(device, bf16):
        recon = model(network_input(batch, device, "bf16" if bf16 else "fp32")).float()
        loss = torch.mean((recon - batch) ** 2) * (len(batch) / batch_total)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach()


def grad_scaler(device: torch.device, bf16: bool) -> torch.amp.GradScaler:
    """The loss scaler of a training step: on under CUDA autocast, where the cuDNN LSTM runs in float16
    whatever dtype autocast was given (aten/src/ATen/cudnn/AutocastRNN.cpp; ``scoring.network_input``),
    so small gradients would underflow to 0 unscaled; off elsewhere (a pass-through: the same step)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and bf16)


def _part_gradients(model: nn.Module, part: torch.Tensor, batch_total: int, device: torch.device,
                    bf16: bool) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """``part``'s share of the batch loss (detached) and its gradients, returned rather than
    accumulated into ``.grad``, so the caller adds the parts in a fixed order."""
    with _autocast(device, bf16):
        recon = model(network_input(part, device, "bf16" if bf16 else "fp32")).float()
        loss = torch.mean((recon - part) ** 2) * (len(part) / batch_total)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def _split_backward(model: nn.Module, batch: torch.Tensor, streams: int, pool: ThreadPoolExecutor,
                    device: torch.device, bf16: bool) -> torch.Tensor:
    """Backward pass of ``batch`` split into ``streams`` parts run side by side on ``pool`` (fewer
    when the batch, an epoch's short last one, has fewer windows than that: no part is empty); the
    batch's loss, detached. The parts' gradients are summed in part order, so the result does not
    depend on which thread finishes first."""
    n_parts = min(streams, len(batch))
    if n_parts <= 1:
        return _loss_backward(model, batch, len(batch), device, bf16)
    results = list(pool.map(lambda part: _part_gradients(model, part, len(batch), device, bf16),
                            torch.tensor_split(batch, n_parts)))
    params = [p for p in model.parameters() if p.requires_grad]
    for i, param in enumerate(params):
        grads = [grads[i] for _, grads in results if grads[i] is not None]
        param.grad = None if not grads else sum(grads[1:], grads[0])
    return sum((loss for loss, _ in results[1:]), results[0][0])


def evaluate_loss(model: nn.Module, data: torch.Tensor, batch_size: int, device: torch.device,
                  mixed_precision: bool = False, index: torch.Tensor | None = None) -> float:
    """Mean squared reconstruction error over ``data`` (already on ``device``; with ``index``, over those
    of its windows); float32 (IEEE float32 on CUDA too, as scoring: ``ieee_float32``) unless
    ``mixed_precision`` (bf16 autocast). One host sync at the end, none per batch."""
    n = len(data) if index is None else len(index)
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    precision = "bf16" if mixed_precision else "fp32"
    full = contextlib.nullcontext() if mixed_precision else ieee_float32(device)
    with torch.inference_mode(), _autocast(device, mixed_precision), full:
        for start in range(0, n, batch_size):
            # a copy where ``data`` is a strided view
            batch = (data[start:start + batch_size] if index is None else data[index[start:start + batch_size]]).contiguous()
            # float32 batch mean, weighted in float64: the same figures as a per-batch float() would give;
            # the error clamped as scoring clamps it (a wild validation reading: huge, not inf)
            diff = torch.clamp(model(network_input(batch, device, precision)).float() - batch,
                               -MAX_ABS_ERROR, MAX_ABS_ERROR)
            total += torch.mean(diff * diff).double() * len(batch)
    return float(total) / max(n, 1)


def train_autoencoder(windows: np.ndarray, model_config: ModelConfig, config: TrainConfig,
                      callbacks: Sequence[TrainCallback] = (),
                      progress_desc: str = "training", starts: np.ndarray | None = None,
                      val_from_row: int | None = None, kept: np.ndarray | None = None) -> TrainResult:
    """Train on scaled windows (N, W, F) with a time-ordered validation split (``split_windows``, with
    ``starts`` and ``val_from_row``) and early stopping. ``kept`` (N,) bool: the windows that may train
    or validate (the others touch a gap); the windows stay a view of their rows, and training gathers
    the kept ones (a boolean selection would copy them: W times the memory of the rows).

    Returns the model with the best validation loss. Raises ``ModelError`` when the data is too small.
    """
    windows = np.asarray(windows)  # sliding windows stay a view: they go to the device as their rows
    if windows.ndim != 3 or windows.shape[1:] != (model_config.window_size, model_config.n_features):
        raise ModelError(f"windows shape {windows.shape} does not match W={model_config.window_size}, "
                         f"F={model_config.n_features}")
    under = _rows_under(windows)
    if not np.isfinite(windows if under is None else under[0]).all():
        raise ModelError("training windows contain NaN or inf; fill gaps before training")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_np, val_np, train_sel, val_sel = _split(windows, config.validation_fraction, starts, val_from_row, kept)
    with torch_threads(config.cpu_threads if device.type == "cpu" else 0):
        model, history, best_epoch, best_loss, started = _fit(train_np, val_np, model_config, config, device,
                                                              callbacks, progress_desc, train_sel, val_sel)
    model = model.cpu().eval()
    return TrainResult(model=model, history=history, best_epoch=best_epoch, best_val_loss=best_loss,
                       device=str(device), seconds=time.perf_counter() - started,
                       n_train_windows=len(train_np) if train_sel is None else len(train_sel),
                       n_val_windows=len(val_np) if val_sel is None else len(val_sel), val_windows=val_np,
                       batch_size=config.batch_size, val_index=val_sel)


def _split(windows: np.ndarray, validation_fraction: float, starts: np.ndarray | None, val_from_row: int | None,
           kept: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(training span, validation span, the training windows' positions in their span, the validation
    windows'): spans are slices of ``windows`` (views stay views); a position array is None where the
    span is all of them."""
    idx = np.arange(len(windows)) if kept is None else np.flatnonzero(kept)
    all_starts = np.arange(len(windows), dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    n_train, split = split_counts(len(idx), windows.shape[1], validation_fraction, all_starts[idx], val_from_row)

    def span(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        first, last = int(chosen[0]), int(chosen[-1])
        return windows[first:last + 1], None if last - first + 1 == len(chosen) else chosen - first

    (train, train_sel), (val, val_sel) = span(idx[:n_train]), span(idx[split:])
    return train, val, train_sel, val_sel


def _fit(train_np: np.ndarray, val_np: np.ndarray, model_config: ModelConfig, config: TrainConfig,
         device: torch.device, callbacks: Sequence[TrainCallback], progress_desc: str,
         train_sel: np.ndarray | None = None,
         val_sel: np.ndarray | None = None) -> tuple[nn.Module, list[EpochStats], int, float, float]:
    started = time.perf_counter()
    # (N, W, F): the whole set on the device, once; sliding windows as their rows, a strided view there
    # (W times less memory; a batch gathered from it is contiguous). ``*_sel``: the windows of the span
    # that train (validate); the others touch a gap.
    train = resident_windows(train_np, device)
    val = resident_windows(val_np, device)
    train_index = None if train_sel is None else torch.as_tensor(train_sel, dtype=torch.long, device=device)
    val_index = None if val_sel is None else torch.as_tensor(val_sel, dtype=torch.long, device=device)
    n_train = len(train) if train_index is None else len(train_index)
    model = build_model(model_config).to(device)  # .to() re-flattens LSTM weights: the fused cuDNN path
    peak_lr = config.peak_learning_rate
    # fused Adam: one kernel for all parameters on CUDA (same update, different rounding order).
    optimiser = torch.optim.Adam(model.parameters(), lr=peak_lr, weight_decay=config.weight_decay,
                                 fused=True if device.type == "cuda" else None)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    bf16 = uses_bf16(config, device)
    cuda = device.type == "cuda"

    history: list[EpochStats] = []
    best_loss, best_epoch, best_state, waited, step = math.inf, 0, copy.deepcopy(model.state_dict()), 0, 0
    # Parts side by side would draw dropout masks in thread order: a model with dropout runs one stream,
    # so its seed reproduces it (see the module docstring).
    scaler = grad_scaler(device, bf16)
    streams = 1 if model_config.dropout > 0 or scaler.is_enabled() else cpu_streams(device, config.batch_size,
                                                                                     MIN_STREAM_WINDOWS)
    pool = ThreadPoolExecutor(streams, thread_name_prefix="anomaly-train-cpu") if streams > 1 else None
    bar = _progress(config.epochs, progress_desc, config.progress)
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(n_train, device=device, generator=generator)
            if train_index is not None:
                order = train_index[order]
            running, seen = torch.zeros((), device=device), 0
            with torch_threads(1 if pool else 0):
                for start in range(0, n_train, config.batch_size):
                    if _ABANDONED.is_set():
                        raise TrainingAbandoned(f"training abandoned at epoch {epoch}: the process is stopping")
                    if step < config.warmup_steps:
                        for group in optimiser.param_groups:
                            group["lr"] = peak_lr * (step + 1) / config.warmup_steps
                    batch = train[order[start:start + config.batch_size]]  # (B, W, F) gathered on the device
                    optimiser.zero_grad(set_to_none=True)
                    if pool:
                        loss = _split_backward(model, batch, streams, pool, device, bf16)
                    else:
                        loss = _loss_backward(model, batch, len(batch), device, bf16, scaler)
                    if config.grad_clip > 0:
                        scaler.unscale_(optimiser)  # clip the true gradients (a no-op when the scaler is off)
                        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    scaler.step(optimiser)  # skipped where a scaled gradient overflowed (the scale then drops)
                    scaler.update()
                    running += loss * len(batch)  # stays on the device: no sync per batch
                    seen += len(batch)
                    step += 1
            train_loss = float(running) / max(seen, 1)  # the epoch's one sync
            train_seconds = time.perf_counter() - t0
            val_loss = evaluate_loss(model, val, config.batch_size * 4, device, index=val_index)
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            stats = EpochStats(epoch, train_loss, val_loss, seconds, seen / max(seconds, 1e-9), train_seconds)
            history.append(stats)
            stop = False
            for cb in callbacks:  # every one sees the epoch, whichever asks to stop (a logger after a stopper)
                try:
                    cb.on_epoch_end(stats)
                except StopTraining:
                    stop = True
            if not math.isfinite(train_loss):
                raise ModelError(f"training diverged at epoch {epoch} (loss {train_loss})")
            if not math.isfinite(val_loss):  # else no epoch is ever "better" and the untrained weights come back
                raise ModelError(f"validation loss is {val_loss} at epoch {epoch}: the validation windows hold values "
                                 "too large to score once scaled; check the data for wild readings, or the scaler")
            if val_loss < best_loss - config.min_delta:
                best_loss, best_epoch, waited = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=best_epoch)
            if stop or waited >= config.patience:
                break
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    model.load_state_dict(best_state)
    return model, history, best_epoch, best_loss, started


FAST_BATCH = {"cpu": 1024, "cuda": 1024}  # most windows per step: a GPU wants many; on CPU see FAST_CPU_STEP_WORK
# On CPU a step costs a fixed overhead plus work in proportion to B x W x H (the recurrent matrix products).
# A batch is grown until that work reaches this size and no further: past it a larger batch ran barely
# faster and needed more epochs (measured on SMD, 38 x 100 with H 64: batch 256 ran 10 % faster per window
# than 128 but reached the reference's validation loss in twice the epochs; on SKAB, 8 x 10 with H 32,
# batch 512 ran 2-3x faster per window than 128).
FAST_CPU_STEP_WORK = 2**18
FAST_MIN_STEPS = 8  # never so large a batch that an epoch has fewer optimisation steps than this
FAST_WARMUP_STEPS = 50  # the sqrt-scaled learning rate is reached over at most this many steps (at most one epoch)


def fast_train_config(config: TrainConfig, device: str | torch.device | None = None,
                      n_windows: int | None = None, model: ModelConfig | None = None) -> TrainConfig:
    """``config`` with the fast paths that change results switched on for ``device`` (default: the
    config's own): a larger batch (``FAST_BATCH``; on CPU, when ``model`` is given, only as large as
    ``FAST_CPU_STEP_WORK`` asks; never so large that an epoch has fewer than ``FAST_MIN_STEPS`` steps
    when ``n_windows`` is known) with the learning rate sqrt-scaled from ``config.batch_size`` and a
    linear warm-up; bf16 autocast on CUDA, and on CPU where it has native bf16. ``cpu_threads`` is left
    as given."""
    kind = resolve_device(str(device) if device is not None else config.device).type
    batch = FAST_BATCH.get(kind, config.batch_size)
    if kind == "cpu" and model is not None:
        work = model.window_size * model.hidden_size * model.directions * model.num_layers
        batch = min(batch, 1 << max(0, (FAST_CPU_STEP_WORK // max(work, 1)).bit_length() - 1))
    if n_windows is not None:
        n_train = int(n_windows * (1 - config.validation_fraction))
        batch = min(batch, max(1, n_train // FAST_MIN_STEPS))
    batch = max(batch, config.batch_size)
    steps_per_epoch = max(1, math.ceil(int(n_windows * (1 - config.validation_fraction)) / batch)) if n_windows else None
    warmup = 0
    if batch > config.batch_size:
        warmup = min(FAST_WARMUP_STEPS, steps_per_epoch) if steps_per_epoch else FAST_WARMUP_STEPS
    return replace(config, batch_size=batch, lr_base_batch=config.lr_base_batch or config.batch_size,
                   warmup_steps=config.warmup_steps or warmup,
                   mixed_precision=True if kind == "cuda" else config.mixed_precision,
                   cpu_bf16=config.cpu_bf16 or (kind == "cpu" and cpu_has_native_bf16()))


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
