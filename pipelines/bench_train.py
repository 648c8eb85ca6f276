"""Training and scoring speed: our trainer and scorer beside a plain PyTorch loop, on CPU and GPU.

    python -m pipelines.bench_train [--json OUT] [--update-readme] [--quick] [--sizes skab,smd] [--devices cpu,cuda]

In one process, on the same windows, split and model size, for each size and device:

- **reference**: the loop as it is usually written, defined in this file: an ``nn.LSTM`` encoder/decoder of
  the same shape as ``anomaly.model``, Adam, a ``DataLoader`` over CPU tensors (batch 128, shuffled),
  float32, each batch moved to the device, torch's default thread count; scoring one batch of 128 at a
  time under ``torch.no_grad``. It trains ``ref_epochs`` epochs; its best validation loss is the target.
- **ours**: ``anomaly.training.train_autoencoder`` with ``fast_train_config`` (larger batch, sqrt-scaled
  learning rate with warm-up, bf16 autocast on CUDA and on CPUs with native bf16, ``--cpu-threads``
  threads on CPU, by default torch's own count like the reference), trained until its validation loss
  reaches the target (or a cap of epochs and time), and ``anomaly.scoring.window_scores`` (device-sized
  batches, ``inference_mode``, at the worker's default precision: bf16 on CUDA and on CPUs with native
  bf16, float32 elsewhere; the float32 rate and the scores' deviation from float32 are reported too).

Figures: training windows/s (optimisation passes only), time to the target validation loss (wall clock
from the call, set-up included), the float32 validation MSE of each final model measured the same way,
scoring windows/s (best of ``--repeats`` interleaved passes), peak host RSS (the kernel's high-water mark,
reset before each phase) and on CUDA ``torch.cuda.max_memory_allocated``; each with ours/reference. On CPU
the reference is also timed at our thread count, so the gain from threads and the gain from code are
told apart. Timings on a shared machine are noisy: run it twice.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from anomaly import datasets
from anomaly.cli import default_data_dir, non_negative_int, positive_int
from anomaly.model import ModelConfig
from anomaly.preparation import fill_rows
from anomaly.protocols import PROFILES
from anomaly.scaling import fit_scaler
from anomaly.config import WorkerSettings
from anomaly.scoring import ieee_float32, resolve_precision, score_batch_size, window_scores
from anomaly.training import (EpochStats, StopTraining, TrainConfig, fast_train_config, split_windows,
                              torch_threads, train_autoencoder)
from anomaly.windowing import make_windows

log = logging.getLogger("bench_train")

REF_BATCH = 128  # the reference's batch size, for training and scoring
REF_LR = 1e-3
MARKER = "bench-train"  # README section: <!-- bench-train:start --> ... <!-- bench-train:end -->
GPU_MARKER = "bench-train-gpu"  # figures with a CUDA device: a machine of their own, a section of their own


# --- the plain reference ----------------------------------------------------------------------------

class PlainAutoencoder(nn.Module):
    """The same network as ``anomaly.model.LSTMAutoencoder`` (one layer, no dropout), written plainly."""

    def __init__(self, n_features: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.LSTM(n_features, hidden, batch_first=True)
        self.to_latent = nn.Linear(hidden, latent)
        self.decoder = nn.LSTM(latent, hidden, batch_first=True)
        self.to_output = nn.Linear(hidden, n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, W, F) -> (B, W, F)
        _, (h, _) = self.encoder(x)
        z = torch.tanh(self.to_latent(h[-1]))  # (B, L)
        out, _ = self.decoder(z.unsqueeze(1).expand(-1, x.shape[1], -1))  # (B, W, H)
        return self.to_output(out)


def plain_val_loss(model: nn.Module, val: torch.Tensor, device: torch.device) -> float:
    """Mean squared error over a CPU tensor of windows, batch by batch (the reference's validation), in
    IEEE float32 as ours is measured (``ieee_float32``: on CUDA cuDNN's TF32 default would otherwise set
    the target in another precision than the one ours is held to)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), ieee_float32(device):
        for (batch,) in DataLoader(TensorDataset(val), batch_size=REF_BATCH):
            batch = batch.to(device)
            total += float(torch.mean((model(batch) - batch) ** 2)) * len(batch)
            count += len(batch)
    return total / max(count, 1)


def plain_train(train: torch.Tensor, val: torch.Tensor, dims: ModelConfig, device: torch.device, epochs: int,
                on_epoch: Callable[[int, float, float, float], None] = lambda *a: None,
                seed: int = 0) -> nn.Module:
    """The reference loop; ``on_epoch(epoch, train_seconds, val_loss, elapsed_s)`` after each epoch. Returns
    the model at its best epoch's weights (as ours keeps early stopping's best): the target is that
    epoch's loss, and the "val loss" row compares it with ours."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = PlainAutoencoder(dims.n_features, dims.hidden_size, dims.latent_size).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=REF_LR)
    loader = DataLoader(TensorDataset(train), batch_size=REF_BATCH, shuffle=True)
    best_loss, best_state = math.inf, None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for (batch,) in loader:
            batch = batch.to(device)
            loss = torch.mean((model(batch) - batch) ** 2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        _sync(device)
        train_seconds = time.perf_counter() - t0
        val_loss = plain_val_loss(model, val, device)
        on_epoch(epoch, train_seconds, val_loss, time.perf_counter() - started)
        if val_loss < best_loss:
            best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def plain_scores(model: nn.Module, windows: torch.Tensor, device: torch.device) -> np.ndarray:
    """Per-window score (mean squared error over steps and sensors), one batch of 128 at a time."""
    model.eval()
    out = []
    with torch.no_grad():
        for (batch,) in DataLoader(TensorDataset(windows), batch_size=REF_BATCH):
            batch = batch.to(device)
            out.append(torch.mean((model(batch) - batch) ** 2, dim=(1, 2)).cpu())
    return torch.cat(out).numpy()


# --- measuring --------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak host RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) and peak CUDA allocation over a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_start_mb = self.rss_peak_mb = self.cuda_peak_mb = None

    def __enter__(self) -> "PeakMemory":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current RSS
        except OSError:
            pass
        self.rss_start_mb = _rss_mb("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.rss_peak_mb = _rss_mb("VmHWM")
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def figures(self) -> dict[str, float | None]:
        grown = None if self.rss_peak_mb is None or self.rss_start_mb is None else self.rss_peak_mb - self.rss_start_mb
        return {"rss_peak_mb": _round(self.rss_peak_mb), "rss_growth_mb": _round(grown),
                "cuda_peak_mb": _round(self.cuda_peak_mb)}


def _round(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(float(v), digits)


def _throughput(n_windows: int, train_seconds: list[float]) -> float:
    """Windows per second of optimisation, leaving out the first epoch (warm-up) when there are three or more."""
    timed = train_seconds[1:] if len(train_seconds) >= 3 else train_seconds
    return n_windows * len(timed) / max(sum(timed), 1e-9)


# --- data -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    name: str
    dims: ModelConfig
    validation_fraction: float
    ref_epochs: int
    rows: int | None  # training rows used (None = all)
    stride: int
    source: str


def sizes(quick: bool, device: str) -> dict[str, Size]:
    """SKAB: the SKAB profile's model on SKAB's anomaly-free run; SMD: 38 sensors x 100 steps on machine-1-2."""
    skab_m, smd_m = PROFILES["skab"]["model"], PROFILES["smd"]["model"]
    gpu = device == "cuda"
    skab = Size("skab", ModelConfig(n_features=8, window_size=skab_m["window_size"], hidden_size=skab_m["hidden_size"],
                                    latent_size=skab_m["latent_size"]),
                PROFILES["skab"]["training"]["validation_fraction"], ref_epochs=2 if quick else 15,
                rows=1000 if quick else None, stride=1, source="skab/data/anomaly-free/anomaly-free.csv")
    smd = Size("smd", ModelConfig(n_features=38, window_size=100, hidden_size=smd_m["hidden_size"],
                                  latent_size=smd_m["latent_size"]),
               PROFILES["smd"]["training"]["validation_fraction"], ref_epochs=2 if quick else (10 if gpu else 4),
               rows=400 if quick else (None if gpu else 12_000), stride=1,
               source="smd/train/machine-1-2.txt")
    return {"skab": skab, "smd": smd}


def load_windows(size: Size, data_root: Path) -> np.ndarray:
    """Scaled windows (N, W, F) of real data (a read-only sliding-window view)."""
    if size.name == "skab":
        frame = datasets.load_skab_anomaly_free(data_root / "skab")
        scaler_method = PROFILES["skab"]["data"]["scaler"]
    else:
        frame = datasets.load_smd(data_root / "smd", ["machine-1-2"])[0].train
        scaler_method = "standard"
    values = fill_rows(frame.to_numpy(dtype=np.float64)[: size.rows])
    sensors = [str(c) for c in frame.columns]
    scaled = fit_scaler(values, sensors, scaler_method).transform(values)
    return make_windows(np.asarray(scaled, dtype=np.float32), size.dims.window_size, size.stride)


# --- one size on one device -------------------------------------------------------------------------

def run_size(size: Size, windows: np.ndarray, device: torch.device, cpu_threads: int, repeats: int) -> dict[str, Any]:
    dims = size.dims
    train_np, val_np = split_windows(np.ascontiguousarray(windows), size.validation_fraction)
    train_t, val_t = torch.from_numpy(train_np), torch.from_numpy(val_np)
    all_t = torch.from_numpy(np.ascontiguousarray(windows))
    _warm_up(dims, device)
    out: dict[str, Any] = {"windows": len(windows), "train_windows": len(train_np), "val_windows": len(val_np),
                           "window_size": dims.window_size, "n_features": dims.n_features,
                           "hidden_size": dims.hidden_size, "latent_size": dims.latent_size, "source": size.source,
                           "rows": size.rows, "stride": size.stride, "ref_epochs": size.ref_epochs,
                           "ref_threads": torch.get_num_threads()}

    # Reference training: its best validation loss is the target.
    ref_epochs: list[dict[str, float]] = []
    with PeakMemory(device) as ref_mem:
        ref_model = plain_train(train_t, val_t, dims, device, size.ref_epochs,
                                on_epoch=lambda e, ts, vl, el: ref_epochs.append(
                                    {"epoch": e, "train_seconds": ts, "val_loss": vl, "elapsed_s": el}))
    target = min(r["val_loss"] for r in ref_epochs)
    ref_time = next(r["elapsed_s"] for r in ref_epochs if r["val_loss"] <= target)
    log.info("%s/%s reference: target %.5g at %.1f s", size.name, device.type, target, ref_time)

    # Ours: train until the target (or the caps).
    base = TrainConfig(batch_size=REF_BATCH, learning_rate=REF_LR, validation_fraction=size.validation_fraction,
                       epochs=3 * size.ref_epochs, patience=3 * size.ref_epochs, device=str(device), progress=False,
                       cpu_threads=cpu_threads if device.type == "cpu" else 0)
    config = fast_train_config(base, device, n_windows=len(windows), model=dims)
    time_cap = 2 * ref_epochs[-1]["elapsed_s"] + 5  # twice the reference's whole run
    watch = _TargetWatch(target, time_cap)
    with PeakMemory(device) as ours_mem:
        watch.start()
        result = train_autoencoder(windows, dims, config, callbacks=[watch])
    ours_model = result.model.to(device)
    log.info("%s/%s ours: %s", size.name, device.type, watch.summary())

    ref_tp = _throughput(len(train_np), [r["train_seconds"] for r in ref_epochs])
    ours_tp = _throughput(result.n_train_windows, [h.train_seconds for h in result.history])
    ref_val = plain_val_loss(ref_model, val_t, device)
    ours_val = plain_val_loss(ours_model, val_t, device)

    # Scoring, interleaved: reference, ours (the worker's default precision), ours in float32; best of each.
    ours_batch = score_batch_size(ours_model, dims.window_size, dims.n_features, device)
    precision = resolve_precision(WorkerSettings().precision, device)
    timings: dict[str, list[float]] = {"ref": [], "ours": [], "ours_fp32": []}
    mems: dict[str, PeakMemory] = {}
    for _ in range(repeats):
        with PeakMemory(device) as mems["ref"]:
            timings["ref"].append(_timed(lambda: plain_scores(ref_model, all_t, device), device))
        with torch_threads(cpu_threads if device.type == "cpu" else 0):
            with PeakMemory(device) as mems["ours"]:
                timings["ours"].append(_timed(lambda: window_scores(ours_model, windows, device,
                                                                    precision=precision), device))
            if precision != "fp32":
                timings["ours_fp32"].append(_timed(lambda: window_scores(ours_model, windows, device), device))
    fp32_scores = window_scores(ours_model, windows, device).scores
    with ieee_float32(device):  # at the precision of ours in float32 (IEEE on CUDA too): they must agree
        same_model_ref = plain_scores(ours_model, all_t, device)  # the reference scorer on our model
    agreement = float(np.max(np.abs(fp32_scores - same_model_ref) / np.maximum(np.abs(same_model_ref), 1e-12)))
    shipped = window_scores(ours_model, windows, device, precision=precision).scores
    deviation = np.abs(shipped - fp32_scores) / np.maximum(fp32_scores, 1e-12)
    n = len(windows)
    ref_score_tp = n / min(timings["ref"])
    ours_score_tp = n / min(timings["ours"])

    out.update({
        "target_val_loss": target,
        "reference": {"train_windows_per_s": ref_tp, "time_to_target_s": ref_time, "epochs": len(ref_epochs),
                      "val_loss": ref_val, "score_windows_per_s": ref_score_tp, "batch_size": REF_BATCH,
                      "train_memory": ref_mem.figures(), "score_memory": mems["ref"].figures(),
                      "history": ref_epochs},
        "ours": {"train_windows_per_s": ours_tp, "time_to_target_s": watch.reached_s, "reached_target": watch.reached_s is not None,
                 "epochs": len(result.history), "val_loss": ours_val, "score_windows_per_s": ours_score_tp,
                 "score_precision": precision,
                 "score_fp32_windows_per_s": n / min(timings["ours_fp32"]) if timings["ours_fp32"] else ours_score_tp,
                 "score_median_rel_dev_vs_fp32": float(np.median(deviation)),
                 "score_max_rel_dev_vs_fp32": float(np.max(deviation)), "score_batch_size": ours_batch,
                 "score_max_rel_diff_vs_reference_scorer": agreement,
                 "train_memory": ours_mem.figures(), "score_memory": mems["ours"].figures(),
                 "config": {k: getattr(config, k) for k in ("batch_size", "learning_rate", "lr_base_batch",
                                                             "warmup_steps", "mixed_precision", "cpu_bf16",
                                                             "cpu_threads", "grad_clip")},
                 "peak_learning_rate": config.peak_learning_rate,
                 "history": [{"epoch": h.epoch, "train_seconds": h.train_seconds, "val_loss": h.val_loss,
                              "elapsed_s": e} for h, e in zip(result.history, watch.elapsed)]},
    })
    out["ratios"] = _ratios(out["reference"], out["ours"], device)

    if device.type == "cpu" and cpu_threads > 0 and cpu_threads != torch.get_num_threads():
        out["reference_same_threads"] = _reference_at_threads(train_t, val_t, all_t, dims, device, cpu_threads,
                                                              repeats, ours_tp, ours_score_tp)
    return out


def _ratios(ref: dict[str, Any], ours: dict[str, Any], device: torch.device) -> dict[str, float | None]:
    def ratio(a, b):
        return None if a is None or b is None or not b else a / b
    r = {"train_windows_per_s": ratio(ours["train_windows_per_s"], ref["train_windows_per_s"]),
         "score_windows_per_s": ratio(ours["score_windows_per_s"], ref["score_windows_per_s"]),
         "time_to_target_s": ratio(ours["time_to_target_s"], ref["time_to_target_s"]),
         "val_loss": ratio(ours["val_loss"], ref["val_loss"]),
         "train_rss_growth_mb": ratio(ours["train_memory"]["rss_growth_mb"], ref["train_memory"]["rss_growth_mb"]),
         "train_rss_peak_mb": ratio(ours["train_memory"]["rss_peak_mb"], ref["train_memory"]["rss_peak_mb"])}
    if device.type == "cuda":
        r["train_cuda_peak_mb"] = ratio(ours["train_memory"]["cuda_peak_mb"], ref["train_memory"]["cuda_peak_mb"])
        r["score_cuda_peak_mb"] = ratio(ours["score_memory"]["cuda_peak_mb"], ref["score_memory"]["cuda_peak_mb"])
    return r


def _reference_at_threads(train_t, val_t, all_t, dims, device, threads, repeats, ours_tp, ours_score_tp) -> dict[str, Any]:
    """The reference's throughput at our thread count (three epochs, the first left out as warm-up by
    ``_throughput``; scoring best of ``repeats``)."""
    with torch_threads(threads):
        seconds: list[float] = []
        model = plain_train(train_t, val_t, dims, device, 3, on_epoch=lambda e, ts, vl, el: seconds.append(ts))
        score_s = min(_timed(lambda: plain_scores(model, all_t, device), device) for _ in range(repeats))
    train_tp = _throughput(len(train_t), seconds)
    score_tp = len(all_t) / score_s
    return {"threads": threads, "train_windows_per_s": train_tp, "score_windows_per_s": score_tp,
            "ratios": {"train_windows_per_s": ours_tp / train_tp, "score_windows_per_s": ours_score_tp / score_tp}}


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _warm_up(dims: ModelConfig, device: torch.device) -> None:
    """One forward/backward pass, so CUDA context and cuDNN/cuBLAS set-up fall outside every timing."""
    model = PlainAutoencoder(dims.n_features, dims.hidden_size, dims.latent_size).to(device)
    x = torch.randn(8, dims.window_size, dims.n_features, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model(x).float().pow(2).mean().backward()
    _sync(device)


class _TargetWatch:
    """Callback: records elapsed time per epoch; stops training at the target validation loss or the time cap."""

    def __init__(self, target: float, time_cap_s: float) -> None:
        self.target, self.time_cap_s = target, time_cap_s
        self.started = time.perf_counter()
        self.elapsed: list[float] = []
        self.reached_s: float | None = None
        self.best = math.inf

    def start(self) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, stats: EpochStats) -> None:
        elapsed = time.perf_counter() - self.started
        self.elapsed.append(elapsed)
        self.best = min(self.best, stats.val_loss)
        if stats.val_loss <= self.target:
            self.reached_s = elapsed
            raise StopTraining
        if elapsed > self.time_cap_s:
            raise StopTraining

    def summary(self) -> str:
        reached = f"target reached at {self.reached_s:.1f} s" if self.reached_s is not None else "target not reached"
        return f"{reached}, {len(self.elapsed)} epochs, best val {self.best:.5g}"


# --- the whole run, the table -----------------------------------------------------------------------

def machine(devices: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda_available": torch.cuda.is_available(), "devices": devices,
                            "load_avg": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(size_names: list[str], devices: list[str], quick: bool, cpu_threads: int, repeats: int,
        data_root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(devices), "cpu_threads_ours": cpu_threads, "quick": quick,
                           "results": {}, "not_measured": []}
    started = time.perf_counter()
    for device_name in devices:
        if device_name == "cuda" and not torch.cuda.is_available():
            out["not_measured"].append("cuda (no CUDA device)")
            continue
        device = torch.device(device_name)
        for name in size_names:
            size = sizes(quick, device_name)[name]
            windows = load_windows(size, data_root)
            log.info("%s on %s: %d windows of %d x %d", name, device_name, len(windows), size.dims.window_size,
                     size.dims.n_features)
            out["results"][f"{name}/{device_name}"] = run_size(size, windows, device, cpu_threads, repeats)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


TARGETS = {"cpu": {"train": 1.5, "score": 1.5}, "cuda": {"train": 5.0, "score": 10.0}}


def readme_section(data: dict[str, Any]) -> str:
    """The README section for these figures: the GPU machine's (with its CPU rows) apart from this one's.
    Figures with no rows at all (``--devices cuda`` without CUDA) go nowhere: they would empty the
    section this machine's rows are in."""
    if not data["results"]:
        raise SystemExit(f"nothing measured ({', '.join(data.get('not_measured', [])) or 'no sizes'}): "
                         "the README is left as it is")
    return GPU_MARKER if any(key.endswith("/cuda") for key in data["results"]) else MARKER


def _memory_ratio(ref_mb: float | None, ratio: float | None) -> str:
    """ours / reference for a memory figure; n/a where the reference grew by under 1 MB (a ratio to
    nothing says nothing)."""
    return "n/a" if ref_mb is None or ref_mb < 1.0 else _x(ratio)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    threads = data["cpu_threads_ours"] or m["torch_threads"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    command = ("`bash deploy/gpu-check.sh run` on the GPU machine, then here `python -m pipelines.bench_train "
               "--from-json results/bench_train_gpu.json --update-readme`" if readme_section(data) == GPU_MARKER else
               "`python -m pipelines.bench_train --json results/bench_train.json --update-readme`")
    where = "on that machine" if readme_section(data) == GPU_MARKER else "here"
    quick = ("**A `--quick` run (tiny data, few epochs): it checks the plumbing; its figures are not the "
             "benchmark's.** " if data.get("quick") else "")
    lines = [f"{quick}{command} "
             f"(about {max(1, round(data['seconds'] / 60))} minute(s) {where}). Measured on {m['cpu']} ({m['cpu_count']} "
             f"cores){gpu}, torch {m['torch']}, load average {m.get('load_avg', 'n/a')} at the start. The reference is a plain loop written in the benchmark "
             f"(DataLoader over CPU tensors, batch {REF_BATCH}, Adam {REF_LR:g}, float32, torch's default "
             f"{m['torch_threads']} threads); ours is `train_autoencoder` with `fast_train_config` and `window_scores` "
             f"at the worker's default precision (`worker.precision = \"auto\"`: bf16 where the device runs it "
             f"natively), with {threads} torch thread(s) on CPU. Ratios are ours / reference.", "",
             "| size, device | figure | reference | ours | ours / ref | target |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, r in data["results"].items():
        name, dev = key.split("/")
        ref, ours, ratio = r["reference"], r["ours"], r["ratios"]
        label = f"{name.upper()} {r['n_features']}×{r['window_size']}, {dev.upper()}"
        t = TARGETS[dev]
        reached = "" if ours["reached_target"] else " (not reached)"
        rows = [("training, windows/s", _f(ref["train_windows_per_s"]), _f(ours["train_windows_per_s"]),
                 _x(ratio["train_windows_per_s"]), _judge(ratio["train_windows_per_s"], t["train"])),
                (f"time to val loss {r['target_val_loss']:.4g}, s", _f(ref["time_to_target_s"], 1),
                 _f(ours["time_to_target_s"], 1) + reached, _x(ratio["time_to_target_s"]), ""),
                ("val loss (float32, same data)", f"{ref['val_loss']:.4g}", f"{ours['val_loss']:.4g}",
                 _x(ratio["val_loss"]), "quality kept" if ratio["val_loss"] <= 1.05 else "**worse**"),
                ("scoring, windows/s", _f(ref["score_windows_per_s"]), _f(ours["score_windows_per_s"]),
                 _x(ratio["score_windows_per_s"]), _judge(ratio["score_windows_per_s"], t["score"])),
                ("training peak RSS growth, MiB", _f(ref["train_memory"]["rss_growth_mb"]),
                 _f(ours["train_memory"]["rss_growth_mb"]),
                 _memory_ratio(ref["train_memory"]["rss_growth_mb"], ratio["train_rss_growth_mb"]), "")]
        if dev == "cuda":
            rows.append(("training peak CUDA memory, MiB", _f(ref["train_memory"]["cuda_peak_mb"]),
                         _f(ours["train_memory"]["cuda_peak_mb"]),
                         _memory_ratio(ref["train_memory"]["cuda_peak_mb"], ratio["train_cuda_peak_mb"]), ""))
        same = r.get("reference_same_threads")
        if same:
            rows.append((f"reference at {same['threads']} thread(s): training / scoring windows/s",
                         f"{_f(same['train_windows_per_s'])} / {_f(same['score_windows_per_s'])}", "",
                         f"{_x(same['ratios']['train_windows_per_s'])} / {_x(same['ratios']['score_windows_per_s'])}",
                         "code alone"))
        for i, (fig, a, b, c, d) in enumerate(rows):
            lines.append(f"| {label if i == 0 else ''} | {fig} | {a} | {b} | {c} | {d} |")
    lines.append("")
    for key, r in data["results"].items():
        c = r["ours"]["config"]
        stride = "" if r["stride"] == 1 else f", stride {r['stride']}"
        lines.append(f"- {key}: {r['windows']:,} windows ({r['train_windows']:,} train, {r['val_windows']:,} val) "
                     f"of {r['source']}{stride}; reference "
                     f"{r['reference']['epochs']} epochs; ours batch {c['batch_size']}, lr "
                     f"{r['ours']['peak_learning_rate']:.2g} after {c['warmup_steps']} warm-up steps, "
                     f"{'bf16' if (c['cpu_bf16'] if key.endswith('cpu') else c['mixed_precision']) else 'float32'} "
                     f"training, {r['ours']['epochs']} epochs; scoring batch {r['ours']['score_batch_size']}, "
                     + _precision_note(r["ours"]) + ".")
    for item in data["not_measured"]:
        lines.append(f"- Not measured: {item}.")
    return "\n".join(lines)


def _precision_note(ours: dict[str, Any]) -> str:
    if "score_precision" not in ours:  # results written before the scoring precision was recorded
        return "float32"
    if ours["score_precision"] == "fp32":
        return "float32"
    return (f"{ours['score_precision']} (float32: {_f(ours['score_fp32_windows_per_s'])} windows/s; scores move by "
            f"{100 * ours['score_median_rel_dev_vs_fp32']:.3f} % median, {100 * ours['score_max_rel_dev_vs_fp32']:.2f} % "
            f"at most)")


def _judge(ratio: float | None, target: float) -> str:
    if ratio is None:
        return f"≥ {target:g}×"
    return f"≥ {target:g}× — {'met' if ratio >= target else '**not met**'}"


def _names(*known: str):
    """An argparse type: a comma-separated list of ``known`` names (an unknown one failed after the work)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in known for n in names):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(known)}, got {text!r}")
        return names
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/bench_train.json", help="where to write the figures")
    parser.add_argument("--sizes", type=_names("skab", "smd"), default="skab,smd", help="comma-separated: skab, smd")
    parser.add_argument("--devices", type=_names("cpu", "cuda"), default="cpu,cuda", help="comma-separated: cpu, cuda (skipped without CUDA)")
    parser.add_argument("--cpu-threads", type=non_negative_int, default=0,
                        help="torch threads for ours on CPU (default 0 = torch's default, the reference's count)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved scoring passes; the best counts")
    parser.add_argument("--quick", action="store_true", help="tiny data and few epochs: checks the plumbing only")
    parser.add_argument("--data-dir", help="the datasets folder (default $ANOMALY_DATASETS or ../shared/datasets)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's bench-train section")
    parser.add_argument("--from-json", help="do not run; render the README section from this results file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from pipelines.benchmark import report

    data_root = Path(args.data_dir) if args.data_dir else default_data_dir("skab").parent
    return report(args, lambda: run(args.sizes, args.devices, args.quick, args.cpu_threads,
                                    args.repeats, data_root), markdown, marker=readme_section)


if __name__ == "__main__":
    sys.exit(main())
