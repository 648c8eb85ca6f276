"""Batched reconstruction and anomaly scores. torch and numpy; no I/O.

Score of a window = mean over sensors of the per-sensor error; per-sensor error = mean over the
window's steps of the squared difference between the scaled reading and its reconstruction. The
per-sensor errors say which sensors drove a flagged window; the reconstruction (unscaled) says what
the model expected them to read.

Scoring runs in ``torch.inference_mode`` in batches sized to the device (``score_batch_size``). The
errors and each window's last reconstructed step are computed on the device, batch by batch, so only
(N, F) results come back to the host; the (N, W, F) windows are never copied whole (a sliding-window
view stays a view) and the (N, W, F) reconstruction is never materialised.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

SCORE_BATCH = 0  # windows per forward pass; 0 = sized to the device by ``score_batch_size``
PRECISIONS = ("auto", "fp32", "bf16")  # forward-pass precision; auto = bf16 where the device runs it natively
CPU_BATCH_BYTES = 4 * 2**20  # CPU: one step's activations (B x W x H float32) kept within cache: larger batches got slower
CPU_BATCH_RANGE = (64, 4096)
CUDA_BATCH = 8192  # a GPU needs thousands of windows per pass to be busy; memory stays in the hundreds of MB
CUDA_RESIDENT_BYTES = 1 << 30  # windows up to this size are copied to the GPU in one transfer


@dataclass(frozen=True)
class WindowScores:
    scores: np.ndarray  # (N,) anomaly score per window
    sensor_errors: np.ndarray  # (N, F) mean squared error per sensor (scaled units)
    last_reconstruction: np.ndarray  # (N, F) reconstruction of each window's last step (scaled units)


def score_batch_size(model: nn.Module, window_size: int, n_features: int, device: torch.device | str) -> int:
    """Windows per forward pass for ``device``: on CPU the largest power of two whose per-step working set
    (B x W x max(H, F) floats) fits ``CPU_BATCH_BYTES``; on CUDA ``CUDA_BATCH``."""
    if torch.device(device).type == "cuda":
        return CUDA_BATCH
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 64) or 64)
    per_window = 4 * window_size * max(hidden, n_features)
    batch = 1 << max(0, int(CPU_BATCH_BYTES // max(per_window, 1)).bit_length() - 1)
    return int(min(max(batch, CPU_BATCH_RANGE[0]), CPU_BATCH_RANGE[1]))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX): bf16 is then faster than
    float32; without them it is emulated and slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def cpu_runs_bf16() -> bool:
    """Whether this CPU runs an LSTM under bf16 autocast at all: oneDNN emulates bf16 where it has no
    native kernels on AVX-512 CPUs, but has no bf16 LSTM for AVX2-only ones (it raises "could not
    create a primitive descriptor"). Probed once, on a two-step LSTM, whose weights are drawn from a
    generator of its own: from torch's global one, the first training of a process (which probes) drew
    other dropout masks than every later one with the same seed."""
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(2, 4, batch_first=True)(torch.zeros(1, 2, 2))
        return True
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _warn_no_cpu_bf16(what: str) -> None:
    log.warning("%s: this CPU cannot run the LSTM in bf16 (oneDNN has no bf16 LSTM without AVX-512): "
                "float32 instead", what)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for a forward pass on ``device``: ``auto`` is bf16 on CUDA and on CPUs with
    native bf16 (scores then move by about 0.01 % of their value), float32 elsewhere. ``bf16`` asked on a
    CPU that cannot run it (``cpu_runs_bf16``) is float32, with a warning, not a failing forward pass."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "bf16" and kind == "cpu" and not cpu_runs_bf16():
        _warn_no_cpu_bf16("precision bf16")
        return "fp32"
    if precision != "auto":
        return precision
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "fp32"


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch intra-op threads (0 = leave the setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if n > 0 and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def cpu_streams(device: torch.device | str, n_windows: int, batch_size: int) -> int:
    """Independent forward passes run side by side on CPU: one per torch thread, at most one per batch.
    Each runs on one thread, so the cores work on separate batches instead of splitting every small
    per-step matrix product between them (measured on 2 cores, 38 sensors x 100 steps, hidden 64:
    ≈ 1.4x the windows/s of one pass on two threads)."""
    if torch.device(device).type != "cpu" or batch_size <= 0:
        return 1
    return max(1, min(torch.get_num_threads(), n_windows // batch_size))


_IEEE_LOCK = threading.Lock()
_ieee_holders = 0  # passes inside ieee_float32 now, in any thread
_ieee_restore: Callable[[], None] | None = None  # puts torch's flags back when the last holder leaves


def _switch_off_tf32() -> Callable[[], None] | None:
    """Turn cuDNN's TF32 off for recurrent layers; returns how to undo it, None where it stays as it is."""
    cudnn = torch.backends.cudnn
    try:
        legacy = cudnn.allow_tf32
    except (AttributeError, RuntimeError):  # no legacy switch, or per-operator flags already differ
        legacy = None
    if legacy is True:
        cudnn.allow_tf32 = False  # conv and RNN alike: no mix of torch's two APIs (torch raises on a mix)
        return lambda: setattr(cudnn, "allow_tf32", True)
    rnn = getattr(cudnn, "rnn", None)
    if legacy is None and getattr(rnn, "fp32_precision", None) == "tf32":  # the newer API, flags set apart
        rnn.fp32_precision = "ieee"
        return lambda: setattr(rnn, "fp32_precision", "tf32")
    return None  # TF32 already off (or chosen at a level above cuDNN's operators: the process's choice)


@contextlib.contextmanager
def ieee_float32(device: torch.device | str):
    """float32 recurrent layers as IEEE float32 on CUDA, restoring torch's setting afterwards. By torch's
    default cuDNN rounds a float32 LSTM's inputs to TF32 (a 10-bit mantissa) on Ampere and newer GPUs:
    measured on an H200, a trained model's float32 scores then moved by up to 0.9 % from the CPU's.
    The setting is process-wide: threads share it, the first to enter sets it and the last to leave
    puts it back. Nothing changes on CPU."""
    global _ieee_holders, _ieee_restore
    if torch.device(device).type != "cuda":
        yield
        return
    with _IEEE_LOCK:
        if _ieee_holders == 0:
            _ieee_restore = _switch_off_tf32()
        _ieee_holders += 1
    try:
        yield
    finally:
        with _IEEE_LOCK:
            _ieee_holders -= 1
            if _ieee_holders == 0 and _ieee_restore is not None:
                _ieee_restore()
                _ieee_restore = None


FP16_SAFE_INPUT = 6.0e4  # |scaled reading| fed to a network under CUDA autocast (float16's largest is 65,504)


def network_input(batch: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """What the network reads. Under CUDA autocast torch's wrapper for cuDNN's LSTM casts its input to
    float16 whatever dtype was asked (aten/src/ATen/cudnn/AutocastRNN.cpp), so a wild scaled reading
    would turn inf there and the score NaN (never an alarm): it is clamped to float16's range first.
    The error is still taken against the reading itself, so it stays huge. Nothing changes elsewhere."""
    if device.type == "cuda" and precision == "bf16":
        return torch.clamp(batch, -FP16_SAFE_INPUT, FP16_SAFE_INPUT)
    return batch


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        with torch.autocast(device.type, enabled=False), ieee_float32(device):
            yield
        return
    if precision != "bf16":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def _rows_under(windows: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The (R, F) block of rows that sliding windows are views of, and the rows between window starts;
    None unless ``windows`` is such a view (``make_windows``: each window W consecutive rows of one
    C-ordered block, starts ``stride`` rows apart, stride <= W so the rows read are one contiguous span).
    Overlapping windows repeat each row up to W times: the block is the data without the repeats."""
    if windows.ndim != 3 or len(windows) < 2 or windows.shape[2] < 1:
        return None
    n, w, f = windows.shape
    item = windows.itemsize
    s0, s1, s2 = windows.strides
    if s2 != item or s1 != f * item or s0 <= 0 or s0 % s1 or s0 // s1 > w:
        return None
    stride = s0 // s1
    rows = (n - 1) * stride + w
    # Every byte of the span lies in some window (stride <= W), so this view reads only memory that
    # ``windows`` reads.
    return np.lib.stride_tricks.as_strided(windows, shape=(rows, f), strides=(s1, s2), writeable=False), stride


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor over ``array`` (no copy where it is float32, C-ordered and writable already:
    torch warns on a read-only array, and silencing that per call is not thread-safe)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def resident_windows(windows: np.ndarray, device: torch.device | str,
                     max_bytes: int | None = None) -> torch.Tensor | None:
    """All of ``windows`` as one (N, W, F) float32 tensor on ``device``, copied over in one transfer, or
    None where that would take more than ``max_bytes`` (None: no limit). Sliding windows go over as their
    rows (each row once, where the windows repeat it up to W times) and are rebuilt there as a strided
    view: index or slice it, and make a batch contiguous where a kernel needs it."""
    under = _rows_under(windows)
    if under is not None and under[1] < windows.shape[1] and (max_bytes is None or 4 * under[0].size <= max_bytes):
        block, stride = under  # overlapping windows (stride < W): their rows are less to send
        n, w, f = windows.shape
        return _host_tensor(block).to(device).as_strided((n, w, f), (stride * f, f, 1))
    if max_bytes is None or 4 * windows.size <= max_bytes:
        return _host_tensor(windows).to(device)
    return None


PAD_STEP = 64  # a forward pass of n windows runs at the next power of two up to this, then the next multiple of it


def padded_batch(n: int, batch_size: int) -> int:
    """The batch a forward pass of ``n`` windows runs at (``n`` or more, at most ``max(n, batch_size)``): the
    next power of two up to ``PAD_STEP``, then the next multiple of ``PAD_STEP``.

    Why: oneDNN, which runs the LSTM on CPU, keeps a primitive (with its scratch memory) for every input shape
    it has seen, up to 1,024 of them. A worker's batches come in every size up to ``STREAM_SCORE_BATCH``, so
    its scoring process grew for a day of stream time (measured, ``pipelines.bench_soak``: +206 MB a stream day
    at 500 entities; every size from 1 to 600 once took a process from 370 to 1,021 MB in bf16, 579 in
    float32). Padded, there are 14 sizes up to 512. The rows added are zeros and their outputs are dropped;
    a window's output does not depend on the others in its batch (no layer mixes windows): the same to the
    bit for the LSTM cell (tested, float32 and bf16), within about 1e-7 for the GRU and peephole cells,
    whose kernels differ with the batch size."""
    if n <= 0:
        return n
    size = 1 << (n - 1).bit_length() if n <= PAD_STEP else -(-n // PAD_STEP) * PAD_STEP
    return min(size, max(n, batch_size))


def _device_batches(windows: np.ndarray, batch_size: int, device: torch.device):
    """Yield (start, (B, W, F) contiguous float32 tensor on ``device``, n) over ``windows`` (any strides): the
    tensor's first ``n`` rows are ``windows[start:start + n]``, the rest zeros up to ``padded_batch(n)``."""
    n = len(windows)
    resident = resident_windows(windows, device, CUDA_RESIDENT_BYTES) if device.type == "cuda" else None
    if resident is not None:
        for start in range(0, n, batch_size):
            batch = resident[start:start + batch_size].contiguous()  # a copy on the device, if a view
            m = len(batch)
            size = padded_batch(m, batch_size)
            if size > m:
                batch = torch.cat([batch, batch.new_zeros((size - m, *batch.shape[1:]))])
            yield start, batch, m
        return
    for start in range(0, n, batch_size):
        part = windows[start:start + batch_size]
        m = len(part)
        size = padded_batch(m, batch_size)
        if size > m:  # one copy into the padded block
            block = np.zeros((size, *part.shape[1:]), dtype=np.float32)
            block[:m] = part
            tensor = torch.from_numpy(block)
        else:
            tensor = _host_tensor(part)  # copies this batch only
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        yield start, tensor, m


def _prepare(windows: np.ndarray, model: nn.Module, device, batch_size: int):
    windows = np.asarray(windows)
    if windows.ndim != 3:
        raise ValueError(f"windows must be (N, W, F), got shape {windows.shape}")
    device = torch.device(device)
    if batch_size <= 0:
        batch_size = score_batch_size(model, windows.shape[1], windows.shape[2], device)
    model.eval()
    return windows, device, batch_size


def reconstruct(model: nn.Module, windows: np.ndarray, device: torch.device | str = "cpu",
                batch_size: int = SCORE_BATCH, precision: str = "fp32") -> np.ndarray:
    """Reconstructions (N, W, F) of scaled windows (N, W, F), in float32."""
    windows, device, batch_size = _prepare(windows, model, device, batch_size)
    precision = resolve_precision(precision, device)
    out = np.empty(windows.shape, dtype=np.float32)
    with torch.inference_mode(), _autocast(device, precision):
        for start, batch, n in _device_batches(windows, batch_size, device):
            out[start:start + n] = model(network_input(batch, device, precision))[:n].float().cpu().numpy()
    return out


def reconstruction_errors(windows: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Per-window, per-sensor mean squared error (N, F)."""
    return np.mean((np.asarray(windows, np.float32) - reconstruction) ** 2, axis=1)


def window_scores(model: nn.Module, windows: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = SCORE_BATCH, precision: str = "fp32") -> WindowScores:
    """Score scaled windows (N, W, F) in batched forward passes on ``device``.

    ``batch_size`` 0 sizes batches to the device; ``precision`` "bf16" runs the forward pass under bf16
    autocast (faster on GPUs and on CPUs with native bf16; scores then differ from float32 by about
    0.01 % of their value), "auto" picks it where it is native (``resolve_precision``). On CPU with
    several torch threads the batches are scored in ``cpu_streams`` parallel one-thread passes (torch's
    thread count is set to 1 meanwhile, process-wide, and restored)."""
    windows, device, batch_size = _prepare(windows, model, device, batch_size)
    precision = resolve_precision(precision, device)
    n, _, f = windows.shape
    streams = cpu_streams(device, n, batch_size)
    if streams > 1:  # contiguous parts, cut at batch boundaries: the same batches as one pass
        batches = -(-n // batch_size)
        cuts = [min(n, batch_size * (batches * i // streams)) for i in range(streams + 1)]
        with torch_threads(1), ThreadPoolExecutor(streams, thread_name_prefix="anomaly-score-cpu") as pool:
            parts = list(pool.map(lambda i: _score_part(model, windows[cuts[i]:cuts[i + 1]], device, batch_size,
                                                        precision), range(streams)))
        errors = [e for part, _ in parts for e in part]
        last = [x for _, part in parts for x in part]
    else:
        errors, last = _score_part(model, windows, device, batch_size, precision)
    if n == 0:
        sensor_errors = np.empty((0, f), np.float32)
        last_reconstruction = np.empty((0, f), np.float32)
    else:  # one transfer of (N, F) results; on a GPU the only sync
        sensor_errors = torch.cat(errors).cpu().numpy()
        last_reconstruction = torch.cat(last).cpu().numpy()
    return WindowScores(scores=sensor_errors.mean(axis=1), sensor_errors=sensor_errors,
                        last_reconstruction=last_reconstruction)


def _score_part(model: nn.Module, windows: np.ndarray, device: torch.device, batch_size: int,
                precision: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-batch (B, F) errors and last reconstructed steps of ``windows``. Inference mode and autocast
    are per thread, so they are entered here, in the thread that runs the passes."""
    errors, last = [], []
    with torch.inference_mode(), _autocast(device, precision):
        for _, batch, n in _device_batches(windows, batch_size, device):
            recon = model(network_input(batch, device, precision))[:n].float()  # (n, W, F)
            diff = torch.clamp(recon - batch[:n], -MAX_ABS_ERROR, MAX_ABS_ERROR)  # a wild reading: huge, not inf
            errors.append(torch.mean(diff * diff, dim=1))  # (B, F), on the device
            last.append(recon[:, -1, :].clone())  # (B, F): a copy, so the whole reconstruction is not kept
    return errors, last


def sensor_contributions(sensor_errors: np.ndarray) -> np.ndarray:
    """Each sensor's share of its window's error (rows sum to 1)."""
    totals = sensor_errors.sum(axis=-1, keepdims=True)
    return np.divide(sensor_errors, totals, out=np.zeros_like(sensor_errors), where=totals > 0)


# Largest |scaled reading - reconstruction| squared into an error: in float32 the square of anything
# above ~1.8e19 is inf (and inf - inf in a window's mean is NaN, never an alarm). A reading the codec
# accepts (|value| < 1e15) over the smallest scale (``scaling.MIN_SCALE``, 1e-20) is up to ~2e35 in scaled
# units; clamped, its error (1e34, and the mean of up to 34,000 of them) stays finite and far above any
# threshold.
MAX_ABS_ERROR = 1e17

TRACE_CHECK_BATCHES = (4, 64)  # batch sizes a trace must reproduce the model on before it is used (padded sizes)


def traced_for_scoring(model: nn.Module, window_size: int, n_features: int, device: torch.device | str = "cpu",
                       precision: str = "fp32") -> nn.Module:
    """``model`` as a TorchScript trace for scoring, or ``model`` itself when the trace is not exact.

    Why: in the worker the forward pass runs in a scoring thread beside the Kafka loop, and every torch
    call made from Python takes Python's lock back; a traced module runs the whole pass in one call
    (measured: the worker +7 to +24 % msg/s over 4 paired runs on 2 cores). The trace is made on this
    device and precision and used only if it reproduces ``model``'s output exactly on
    ``TRACE_CHECK_BATCHES`` random batches (other sizes than the one traced); any failure keeps the
    model, with a log line."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    model.eval()
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode(), _autocast(device, precision), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shapes: the check below is what counts
            example = torch.randn(8, window_size, n_features, generator=generator).to(device)
            traced = torch.jit.trace(model, example, check_trace=False)
            for n in TRACE_CHECK_BATCHES:
                probe = torch.randn(n, window_size, n_features, generator=generator).to(device)
                if not torch.equal(traced(probe), model(probe)):
                    log.info("scoring: the traced model differs from the model on a batch of %d; scoring "
                             "without a trace", n)
                    return model
    except Exception as exc:  # a model torch cannot trace is scored as it is
        log.info("scoring: model not traced (%s: %s); scoring without a trace", type(exc).__name__, exc)
        return model
    return traced
