"""The fast training and scoring paths give the results of the plain ones (CPU; tests/unit/test_gpu.py
checks the same on CUDA)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from anomaly import scoring
from anomaly.errors import ConfigError
from anomaly.model import ModelConfig, build_model
from anomaly.scoring import (CPU_BATCH_RANGE, cpu_streams, padded_batch, reconstruct, reconstruction_errors,
                             resolve_precision, score_batch_size, window_scores)
from anomaly.training import (FAST_MIN_STEPS, StopTraining, TrainConfig, cpu_has_native_bf16, cpu_runs_bf16,
                              fast_train_config, torch_threads, train_autoencoder)
from anomaly.windowing import make_windows


def _series(n: int = 1200, f: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return (np.sin(t / (6 + 3 * np.arange(f))) + 0.05 * rng.standard_normal((n, f))).astype(np.float32)


def _model(f: int = 3, w: int = 12, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(n_features=f, window_size=w, hidden_size=16, latent_size=4))


def _naive_scores(model: torch.nn.Module, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One window at a time, float64 arithmetic on the errors: the definition, slowly."""
    model.eval()
    errors, last = [], []
    with torch.no_grad():
        for window in np.array(windows, dtype=np.float32):  # a writable copy
            recon = model(torch.from_numpy(window)[None])[0].double().numpy()
            errors.append(np.mean((window.astype(np.float64) - recon) ** 2, axis=0))
            last.append(recon[-1])
    errors = np.array(errors)
    return errors.mean(axis=1), errors, np.array(last)


@pytest.mark.parametrize("batch_size", [0, 1, 7, 64, 10_000])
def test_fast_scorer_matches_a_naive_per_window_loop(batch_size):
    windows = make_windows(_series(300), 12)  # a strided view: the scorer must not need a copy
    model = _model()
    fast = window_scores(model, windows, "cpu", batch_size=batch_size)
    scores, errors, last = _naive_scores(model, windows)
    np.testing.assert_allclose(fast.scores, scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fast.sensor_errors, errors, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fast.last_reconstruction, last, rtol=1e-5, atol=1e-6)
    assert fast.scores.shape == (len(windows),) and fast.sensor_errors.shape == (len(windows), 3)


def test_padded_batch_sizes():
    assert [padded_batch(n, 512) for n in (0, 1, 2, 3, 5, 33, 64, 65, 129, 500, 512)] == \
        [0, 1, 2, 4, 8, 64, 64, 128, 192, 512, 512]
    assert {padded_batch(n, 512) for n in range(1, 513)} == {1, 2, 4, 8, 16, 32, 64, *range(128, 513, 64)}
    assert padded_batch(70, 100) == 100 and padded_batch(100, 100) == 100  # never past the batch size asked
    assert padded_batch(3000, 10_000) == 3008


class _Shapes(torch.nn.Module):
    """A model that notes the batch size of every forward pass."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_passes_run_at_few_batch_sizes_with_the_same_scores(precision, monkeypatch):
    """A worker's batches come in every size: each distinct one cost oneDNN a cached primitive for good (its
    scoring process grew for a day). Passes run padded to one of 14 sizes up to 512, and every window's
    score is what the unpadded pass gives it, to the bit."""
    model = _Shapes(_model())
    windows = make_windows(_series(700), 12)
    for n in (1, 3, 37, 64, 65, 300, 511, 600, 689):
        model.sizes.clear()
        fast = window_scores(model, windows[:n], "cpu", batch_size=512, precision=precision)
        assert set(model.sizes) <= {1, 2, 4, 8, 16, 32, 64, *range(128, 513, 64)}, (n, model.sizes)
        whole = reconstruct(model, windows[:n], "cpu", batch_size=512, precision=precision)
        assert whole.shape == (n, 12, 3)
        with monkeypatch.context() as m:
            m.setattr(scoring, "padded_batch", lambda n, batch_size: n)
            model.sizes.clear()
            plain = window_scores(model, windows[:n], "cpu", batch_size=512, precision=precision)
            assert model.sizes == [min(512, n - start) for start in range(0, n, 512)]  # (padding off, really)
            plain_whole = reconstruct(model.inner, windows[:n], "cpu", batch_size=512, precision=precision)
        np.testing.assert_array_equal(fast.scores, plain.scores)
        np.testing.assert_array_equal(fast.sensor_errors, plain.sensor_errors)
        np.testing.assert_array_equal(fast.last_reconstruction, plain.last_reconstruction)
        np.testing.assert_array_equal(whole, plain_whole)


def test_scorer_agrees_with_full_reconstruction_and_does_not_touch_input():
    windows = np.ascontiguousarray(make_windows(_series(200), 12))
    before = windows.copy()
    model = _model()
    ws = window_scores(model, windows)
    recon = reconstruct(model, windows, batch_size=33)
    np.testing.assert_allclose(ws.sensor_errors, reconstruction_errors(windows, recon), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ws.last_reconstruction, recon[:, -1, :])
    np.testing.assert_array_equal(windows, before)


def test_scorer_handles_empty_input_and_float64():
    model = _model()
    empty = window_scores(model, np.empty((0, 12, 3)))
    assert empty.scores.shape == (0,) and empty.sensor_errors.shape == (0, 3)
    windows = make_windows(_series(100).astype(np.float64), 12)
    np.testing.assert_allclose(window_scores(model, windows).scores,
                               window_scores(model, windows.astype(np.float32)).scores, rtol=1e-6)
    with pytest.raises(ValueError):
        window_scores(model, np.zeros((4, 12)))


def test_bf16_scoring_stays_close_and_ranks_alike():
    if not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU (bf16 is opt-in and meant for CPUs that have it)")
    windows = make_windows(_series(600), 12)
    model = _model()
    fp32 = window_scores(model, windows).scores
    bf16 = window_scores(model, windows, precision="bf16").scores
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.99
    with pytest.raises(ValueError):
        window_scores(model, windows, precision="fp8")


def test_score_batch_is_sized_to_the_device():
    small = _model(f=8, w=10)
    big = build_model(ModelConfig(n_features=38, window_size=100, hidden_size=64, latent_size=16))
    small_batch = score_batch_size(small, 10, 8, "cpu")
    big_batch = score_batch_size(big, 100, 38, "cpu")
    assert CPU_BATCH_RANGE[0] <= big_batch < small_batch <= CPU_BATCH_RANGE[1]
    assert big_batch & (big_batch - 1) == 0  # a power of two
    assert score_batch_size(big, 100, 38, "cuda") > big_batch


def _sine_windows(n: int = 1200) -> np.ndarray:
    return make_windows(_series(n, f=2), 16)


CFG = ModelConfig(n_features=2, window_size=16, hidden_size=24, latent_size=8)


def test_fast_options_reach_a_similar_loss_on_a_tiny_problem():
    windows = _sine_windows()
    plain = TrainConfig(epochs=6, batch_size=32, patience=20, device="cpu", progress=False, cpu_threads=1)
    fast = fast_train_config(plain, "cpu", n_windows=len(windows))
    assert fast.batch_size > plain.batch_size and fast.lr_base_batch == 32 and fast.warmup_steps > 0
    assert fast.peak_learning_rate == pytest.approx(plain.learning_rate * (fast.batch_size / 32) ** 0.5)
    fast = replace(fast, epochs=18)  # about as many optimisation steps as the plain run: larger ones, fewer per epoch
    a = train_autoencoder(windows, CFG, plain)
    b = train_autoencoder(windows, CFG, fast)
    assert a.best_val_loss < a.history[0].val_loss * 0.5  # the problem is learnable
    assert b.best_val_loss < 1.25 * a.best_val_loss  # and the fast run learns it as well


def test_fast_config_keeps_enough_steps_per_epoch_and_validates():
    cfg = fast_train_config(TrainConfig(batch_size=128, device="cpu"), "cpu", n_windows=1000)
    assert cfg.batch_size == 128  # 800 training windows: a larger batch would leave < FAST_MIN_STEPS steps
    cfg = fast_train_config(TrainConfig(batch_size=32, device="cpu"), "cpu", n_windows=100_000)
    assert cfg.batch_size * FAST_MIN_STEPS <= 80_000 and cfg.batch_size > 32
    assert cfg.cpu_bf16 == cpu_has_native_bf16()
    # On CPU the batch grows only until a step's recurrent work (B x W x H) reaches FAST_CPU_STEP_WORK.
    small = ModelConfig(n_features=8, window_size=10, hidden_size=32, latent_size=8)
    large = ModelConfig(n_features=38, window_size=100, hidden_size=64, latent_size=16)
    base = TrainConfig(batch_size=128, device="cpu")
    assert fast_train_config(base, "cpu", 100_000, small).batch_size == 512  # 2**18 // 320 -> 512
    assert fast_train_config(base, "cpu", 100_000, large).batch_size == 128  # never below the configured batch
    assert fast_train_config(base, "cpu", 100_000, large).lr_base_batch == 128
    for field in ("lr_base_batch", "warmup_steps", "cpu_threads"):
        with pytest.raises(ConfigError) as err:
            TrainConfig(**{field: -1})
        assert err.value.field == f"training.{field}"


def test_warmup_ramps_the_learning_rate_and_threads_are_restored():
    windows = _sine_windows(500)
    seen_lr = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            seen_lr.append(self.param_groups[0]["lr"])
            return super().step(closure)

    before = torch.get_num_threads()
    original = torch.optim.Adam
    torch.optim.Adam = Spy
    try:
        cfg = TrainConfig(epochs=2, batch_size=64, lr_base_batch=16, warmup_steps=5, device="cpu", progress=False,
                          cpu_threads=1)
        train_autoencoder(windows, CFG, cfg)
    finally:
        torch.optim.Adam = original
    peak = cfg.peak_learning_rate
    assert peak == pytest.approx(1e-3 * 2)
    assert seen_lr[:5] == pytest.approx([peak * k / 5 for k in range(1, 6)])
    assert seen_lr[5:] == pytest.approx([peak] * (len(seen_lr) - 5))
    assert torch.get_num_threads() == before


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_bf16_training_on_cpu_learns_like_float32():
    if not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    windows = _sine_windows()
    base = TrainConfig(epochs=6, batch_size=32, patience=20, device="cpu", progress=False, cpu_threads=1)
    fp32 = train_autoencoder(windows, CFG, base)
    bf16 = train_autoencoder(windows, CFG, replace(base, cpu_bf16=True))
    assert bf16.best_val_loss < 1.25 * fp32.best_val_loss
    assert bf16.best_val_loss < bf16.history[0].val_loss * 0.5


def test_a_callback_can_stop_training_and_the_best_weights_come_back():
    windows = _sine_windows(500)

    class StopAfter:
        def __init__(self, n: int) -> None:
            self.n, self.calls = n, 0

        def on_epoch_end(self, stats) -> None:
            self.calls += 1
            assert stats.train_seconds > 0 and stats.train_seconds <= stats.seconds
            if stats.epoch >= self.n:
                raise StopTraining

    stop, logger = StopAfter(2), StopAfter(99)  # a logger after the stopper still sees the last epoch
    result = train_autoencoder(windows, CFG, TrainConfig(epochs=10, patience=10, device="cpu", progress=False,
                                                         cpu_threads=1),
                               callbacks=[stop, logger])
    assert stop.calls == 2 and len(result.history) == 2 and logger.calls == 2
    assert result.best_val_loss == min(h.val_loss for h in result.history)


def test_training_fast_setting_reaches_the_trainer(monkeypatch):
    """``training.fast`` in the config switches the trainer to the fast path (bigger batch, sqrt LR rule)."""
    from anomaly import train_job
    from anomaly.config import load_config

    seen = {}

    def fake_fit(values, sensors, model_params, config, **kw):
        seen["config"] = config
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_job, "fit_detector", fake_fit)
    values = np.random.default_rng(0).normal(size=(5000, 3))
    small = {"ANOMALY_MODEL__WINDOW_SIZE": "10", "ANOMALY_MODEL__HIDDEN_SIZE": "32", "ANOMALY_TRAINING__DEVICE": "cpu"}
    for fast, env in ((False, small), (True, {**small, "ANOMALY_TRAINING__FAST": "true"})):
        settings = load_config(None, env=env)
        with pytest.raises(RuntimeError):
            train_job.fit_values(values, ["a", "b", "c"], settings)
        config = seen["config"]
        if fast:
            assert config.batch_size > settings.training.batch_size and config.lr_base_batch == settings.training.batch_size
            assert config.warmup_steps > 0
        else:
            assert config.batch_size == settings.training.batch_size and config.lr_base_batch == 0


def test_scoring_precision_auto_is_bf16_only_where_it_is_native():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == ("bf16" if cpu_runs_bf16() else "fp32")
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_bf16_and_auto_scoring_stay_within_a_tight_tolerance_of_float32():
    if not cpu_runs_bf16():  # both would score in float32 here: the comparison would hold by construction
        pytest.skip("this CPU cannot run the LSTM in bf16 (the float32 fallback: test_bf16_asked_of_a_cpu...)")
    windows = make_windows(_series(), 12, 1)
    model = _model()
    fp32 = window_scores(model, windows, "cpu", batch_size=0, precision="fp32")
    for precision in ("bf16", "auto"):
        other = window_scores(model, windows, "cpu", batch_size=0, precision=precision)
        rel = np.abs(other.scores - fp32.scores) / fp32.scores
        assert np.median(rel) < 1e-3 and rel.max() < 2e-2, precision
        np.testing.assert_allclose(other.last_reconstruction, fp32.last_reconstruction, atol=2e-2)


def test_parallel_cpu_streams_score_like_one_pass_and_restore_the_thread_count(monkeypatch):
    import threading

    from anomaly import scoring

    parts = []
    real = scoring._score_part

    def recorded(model, windows, *args):  # type: ignore[no-untyped-def]
        parts.append((len(windows), threading.current_thread().name, torch.get_num_threads()))
        return real(model, windows, *args)

    monkeypatch.setattr(scoring, "_score_part", recorded)
    windows = make_windows(_series(3000), 12, 1)  # 2,989 windows: 24 batches of 128
    model = _model()
    with torch_threads(1):
        assert cpu_streams("cpu", len(windows), 128) == 1
        one = window_scores(model, windows, "cpu", batch_size=128)
    with torch_threads(2):
        assert cpu_streams("cpu", len(windows), 128) == 2
        assert cpu_streams("cpu", 100, 128) == 1 and cpu_streams("cuda", len(windows), 128) == 1
        parts.clear()
        window_scores(model, windows, "cpu", batch_size=128)
        assert sorted(n for n, _, _ in parts) == [1453, 1536]  # batches 0-11 and 12-23: cut at a batch edge
        assert all(name.startswith("anomaly-score-cpu") and threads == 1 for _, name, threads in parts)
        for precision in ("fp32", "bf16"):
            ref = one if precision == "fp32" else window_scores(model, windows, "cpu", batch_size=len(windows),
                                                                precision="bf16")
            two = window_scores(model, windows, "cpu", batch_size=128, precision=precision)
            assert torch.get_num_threads() == 2  # restored after the one-thread streams
            tol = 1e-5 if precision == "fp32" else 2e-2
            np.testing.assert_allclose(two.scores, ref.scores, rtol=tol)
            np.testing.assert_allclose(two.sensor_errors, ref.sensor_errors, rtol=tol, atol=1e-7)
            np.testing.assert_allclose(two.last_reconstruction, ref.last_reconstruction, atol=tol)


def test_cpu_training_streams_split_each_batch_and_learn_like_one_pass(monkeypatch):
    import threading

    from anomaly import training

    calls = []

    def recording(real):  # type: ignore[no-untyped-def]
        def recorded(model, batch, total, *args):  # type: ignore[no-untyped-def]
            calls.append((len(batch), total, threading.current_thread().name, torch.get_num_threads()))
            return real(model, batch, total, *args)
        return recorded

    # A whole batch goes through _loss_backward, a thread's part of one through _part_gradients.
    monkeypatch.setattr(training, "_loss_backward", recording(training._loss_backward))
    monkeypatch.setattr(training, "_part_gradients", recording(training._part_gradients))
    windows = _sine_windows()
    config = TrainConfig(epochs=4, batch_size=64, patience=20, device="cpu", progress=False, seed=3)
    one = train_autoencoder(windows, CFG, replace(config, cpu_threads=1))
    assert {(n, total) for n, total, _, _ in calls} >= {(64, 64)} and all(t == 1 for *_, t in calls)
    calls.clear()
    with torch_threads(2):
        two = train_autoencoder(windows, CFG, replace(config, cpu_threads=2))
        assert torch.get_num_threads() == 2
    parts = [c for c in calls if c[1] == 64]
    assert parts and all(n == 32 and name.startswith("anomaly-train-cpu") and threads == 1
                         for n, _, name, threads in parts)
    assert len(calls) == 2 * len(one.history) * -(-one.n_train_windows // 64)  # every batch, in two parts
    for a, b in zip(one.history, two.history):  # the same gradients up to rounding: the same curve
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-3)
    assert two.best_val_loss < two.history[0].val_loss * 0.7


@pytest.mark.parametrize("variant", [{}, {"cell": "gru"}, {"cell": "peephole"}, {"attention": True},
                                     {"bidirectional": True, "num_layers": 2, "dropout": 0.1}])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_traced_scoring_gives_the_models_scores(variant, precision):
    """The TorchScript trace the worker scores through (CPU) gives exactly the eager model's scores, for
    every model variant, at batch sizes other than the traced one."""
    from anomaly.scoring import traced_for_scoring

    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    torch.manual_seed(1)
    model = build_model(ModelConfig(n_features=3, window_size=12, hidden_size=16, latent_size=4, **variant))
    traced = traced_for_scoring(model, 12, 3, "cpu", precision)
    assert isinstance(traced, torch.jit.ScriptModule), "the trace was refused"
    windows = make_windows(_series(300), 12)
    for batch_size in (1, 5, 64):
        eager = window_scores(model, windows, "cpu", batch_size=batch_size, precision=precision)
        fast = window_scores(traced, windows, "cpu", batch_size=batch_size, precision=precision)
        np.testing.assert_array_equal(fast.scores, eager.scores)
        np.testing.assert_array_equal(fast.sensor_errors, eager.sensor_errors)
        np.testing.assert_array_equal(fast.last_reconstruction, eager.last_reconstruction)


def test_a_trace_that_fails_or_differs_keeps_the_model(monkeypatch, caplog):
    from anomaly import scoring

    model = _model()
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("untraceable")))
    with caplog.at_level("INFO", logger="anomaly.scoring"):
        assert scoring.traced_for_scoring(model, 12, 3) is model
    assert "untraceable" in caplog.text

    class Wrong(torch.nn.Module):  # a "trace" that answers differently from the model
        def forward(self, x):
            return model(x) + 1.0

    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: Wrong())
    caplog.clear()
    with caplog.at_level("INFO", logger="anomaly.scoring"):
        assert scoring.traced_for_scoring(model, 12, 3) is model
    assert "differs" in caplog.text


def test_detector_model_scores_alike_with_and_without_the_trace():
    from anomaly.detector import fit_detector
    from anomaly.scoring_step import DetectorModel

    values = _series(400).astype(np.float64)
    detector, _, _ = fit_detector(values, ("a", "b", "c"), {"window_size": 12, "hidden_size": 16, "latent_size": 4},
                                  TrainConfig(epochs=1, device="cpu", progress=False))
    plain = DetectorModel(detector, "m", "1", "cpu", trace=False)
    traced = DetectorModel(detector, "m", "1", "cpu", trace=True)
    assert traced.traced and not plain.traced and plain.forward_model is detector.model
    assert traced.trace_tried and not plain.trace_tried  # what the worker's log line says
    windows = np.stack([values[i:i + 12] for i in range(0, 300, 3)])
    for a, b in zip(plain.score(windows), traced.score(windows)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_train", [129, 131])
def test_split_cpu_batches_train_when_the_last_batch_is_shorter_than_the_threads(n_train):
    # 4 threads split a batch of 128 into 4 parts; an epoch's last batch of 1 or 3 windows must not
    # leave an empty part (a 0-window forward pass used to raise).
    n = next(n for n in range(n_train, 2 * n_train)  # windows in all: the split validates 20 % and drops W-1
             if n - max(1, round(0.2 * n)) - 15 == n_train)
    windows = make_windows(_series(n + 15, f=2), 16)
    config = TrainConfig(epochs=1, batch_size=128, device="cpu", progress=False, cpu_threads=4)
    result = train_autoencoder(windows, CFG, config)
    assert result.n_train_windows == n_train
    assert np.isfinite(result.history[0].train_loss)


def test_split_cpu_training_is_reproducible_from_its_seed_on_four_threads():
    # The parts' gradients are added in part order, not as threads finish: the same seed gives the same
    # weights on every run with four threads (no dropout).
    windows = _sine_windows(400)
    config = TrainConfig(epochs=2, batch_size=128, device="cpu", progress=False, cpu_threads=4)
    a, b = (train_autoencoder(windows, CFG, config).model.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_with_dropout_is_reproducible_from_its_seed_on_several_threads():
    # Split parts would draw dropout masks from torch's one generator in thread order (four runs gave four
    # models): with dropout a batch is one pass, still on every thread.
    windows = _sine_windows(400)
    dropped = replace(CFG, num_layers=2, dropout=0.3)
    config = TrainConfig(epochs=2, batch_size=128, device="cpu", progress=False, cpu_threads=4)
    a, b, c = (train_autoencoder(windows, dropped, config).model.state_dict() for _ in range(3))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_probing_the_cpu_for_bf16_draws_nothing_from_torchs_generator():
    """The probe ran at the first training of a process with cpu_bf16 (after the model was made, before
    its dropout masks): its LSTM's weights came from torch's generator, so that first training drew other
    masks than every later one of the same seed."""
    cpu_runs_bf16.cache_clear()
    torch.manual_seed(5)
    cpu_runs_bf16()
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_probe, torch.rand(3))


@pytest.mark.parametrize("stride", [1, 3, 16])
def test_sliding_windows_are_recognised_as_views_of_their_rows(stride):
    from anomaly.scoring import _rows_under

    values = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    windows = make_windows(values, 16, stride)
    block, found = _rows_under(windows)
    assert found == stride
    assert block.shape == ((len(windows) - 1) * stride + 16, 5) and not block.flags.writeable
    rebuilt = torch.from_numpy(block.copy()).as_strided(windows.shape, (stride * 5, 5, 1))
    np.testing.assert_array_equal(rebuilt.numpy(), windows)  # the device path rebuilds them this way
    # A copy is one window after another: its own rows, W apart.
    assert _rows_under(np.ascontiguousarray(windows))[1] == 16


def test_windows_that_are_not_a_sliding_view_are_left_as_they_are():
    from anomaly.scoring import _rows_under

    values = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    assert _rows_under(make_windows(values, 16, 17)) is None  # gaps between windows: memory not theirs
    assert _rows_under(make_windows(values, 16)[::-1]) is None  # starts running backwards
    assert _rows_under(make_windows(values, 16)[:1]) is None  # one window: nothing to gain
    sensors_apart = np.ascontiguousarray(make_windows(values, 16).transpose(0, 2, 1)).transpose(0, 2, 1)
    assert _rows_under(sensors_apart) is None  # a window's sensors are not adjacent
    assert _rows_under(make_windows(values[:, ::2], 16)) is None  # rows with gaps between sensors


def test_resident_windows_are_rebuilt_from_their_rows_on_the_device(monkeypatch):
    import anomaly.scoring as scoring

    values = np.random.default_rng(1).normal(size=(300, 4))  # float64: converted once, as rows
    cpu = torch.device("cpu")  # the function is the CUDA path's; it runs on any device
    for windows in (make_windows(values, 20, 2), np.ascontiguousarray(make_windows(values, 20).transpose(0, 2, 1))
                    .transpose(0, 2, 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a read-only view must not warn on its way to torch
            resident = scoring.resident_windows(windows, cpu, scoring.CUDA_RESIDENT_BYTES)
        assert resident.dtype == torch.float32 and resident.shape == windows.shape
        np.testing.assert_array_equal(resident.numpy(), windows.astype(np.float32))
    monkeypatch.setattr(scoring, "CUDA_RESIDENT_BYTES", 4 * 300 * 4 - 1)  # not even the rows fit
    assert scoring.resident_windows(make_windows(values, 20), cpu, scoring.CUDA_RESIDENT_BYTES) is None


def test_float32_scoring_on_cuda_asks_cudnn_for_ieee_float32_and_puts_the_setting_back():
    from anomaly.scoring import ieee_float32

    cudnn = torch.backends.cudnn
    assert cudnn.allow_tf32 and cudnn.rnn.fp32_precision == "tf32"  # torch's default
    with ieee_float32("cpu"):
        assert cudnn.allow_tf32  # nothing to change on CPU
    with pytest.raises(RuntimeError, match="a failed pass"), ieee_float32("cuda"):  # flags only: no GPU needed
        assert not cudnn.allow_tf32 and cudnn.rnn.fp32_precision != "tf32"
        raise RuntimeError("a failed pass")
    assert cudnn.allow_tf32 and cudnn.rnn.fp32_precision == "tf32"


def test_float32_scoring_with_torchs_newer_per_operator_flags_turns_the_rnn_one_off():
    from anomaly.scoring import ieee_float32

    cudnn = torch.backends.cudnn
    cudnn.conv.fp32_precision = "ieee"  # torch's newer API, one operator only: the legacy switch is unreadable
    try:
        with ieee_float32("cuda"):
            assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("ieee", "ieee")
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("ieee", "tf32")
    finally:
        cudnn.conv.fp32_precision = "tf32"
    assert cudnn.allow_tf32


def test_the_tf32_switch_is_shared_by_threads_and_put_back_by_the_last_to_leave():
    import threading

    from anomaly.scoring import ieee_float32

    cudnn = torch.backends.cudnn
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with ieee_float32("cuda"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with ieee_float32("cuda"):
            b_in.set()
            a_out.wait(5)
            seen["b after a left"] = cudnn.allow_tf32  # still inside b's pass: still off
        seen["after both"] = cudnn.allow_tf32

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"b after a left": False, "after both": True}


def test_a_wild_reading_is_clamped_for_the_network_only_under_cuda_autocast():
    from anomaly.scoring import FP16_SAFE_INPUT, network_input

    batch = torch.tensor([[[1e9, -1e9, 0.5]]])
    assert torch.equal(network_input(batch, torch.device("cpu"), "bf16"), batch)  # CPU bf16 keeps float32's range
    cuda = torch.device("cuda")  # a device object only: nothing is moved
    assert torch.equal(network_input(batch, cuda, "fp32"), batch)
    assert network_input(batch, cuda, "bf16").tolist() == [[[FP16_SAFE_INPUT, -FP16_SAFE_INPUT, 0.5]]]
    assert FP16_SAFE_INPUT < torch.finfo(torch.float16).max


def test_bf16_asked_of_a_cpu_that_cannot_run_the_lstm_in_it_is_float32_with_a_warning(monkeypatch, caplog):
    """On an AVX2-only CPU oneDNN has no bf16 LSTM: ``worker.precision = "bf16"`` failed every forward
    pass ("could not create a primitive descriptor"), as did training with ``cpu_bf16``."""
    from anomaly import scoring, training

    monkeypatch.setattr(scoring, "cpu_runs_bf16", lambda: False)
    monkeypatch.setattr(training, "cpu_runs_bf16", lambda: False)
    scoring._warn_no_cpu_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="anomaly.scoring"):
        assert resolve_precision("bf16", "cpu") == "fp32" and resolve_precision("bf16", "cuda") == "bf16"
        assert resolve_precision("bf16", "cpu") == "fp32"
        assert not training.uses_bf16(TrainConfig(cpu_bf16=True), torch.device("cpu"))
        assert training.uses_bf16(TrainConfig(mixed_precision=True), torch.device("cuda"))
    warned = [r.getMessage() for r in caplog.records if "cannot run the LSTM in bf16" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("precision bf16") and warned[1].startswith("training cpu_bf16")
    scoring._warn_no_cpu_bf16.cache_clear()


def test_the_bf16_probe_says_what_a_bf16_forward_pass_does_here():
    model = _model()
    windows = make_windows(_series(), 12, 1)
    if cpu_runs_bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.tensor(windows[:4]))
    else:
        with pytest.raises(RuntimeError), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.tensor(windows[:4]))


def test_abandoned_training_stops_at_its_next_batch_as_a_keyboard_interrupt():
    from anomaly import training
    from anomaly.errors import TrainingAbandoned

    class AbandonAfterFirstEpoch:
        def on_epoch_end(self, stats):
            training.abandon_training()

    config = TrainConfig(epochs=50, batch_size=64, patience=50, device="cpu", progress=False)
    try:
        with pytest.raises(TrainingAbandoned, match="training abandoned at epoch 2") as caught:
            train_autoencoder(_sine_windows(), CFG, config, callbacks=[AbandonAfterFirstEpoch()])
        assert isinstance(caught.value, KeyboardInterrupt) and not isinstance(caught.value, Exception)
    finally:
        training._ABANDONED.clear()
    assert len(train_autoencoder(_sine_windows(), CFG, replace(config, epochs=2)).history) == 2


def test_parallel_passes_are_padded_too(monkeypatch):
    """With two torch threads the batches are scored in two one-thread passes side by side: each padded,
    the scores those of the unpadded passes."""
    model = _Shapes(_model())
    windows = make_windows(_series(400), 12)[:301]
    with torch_threads(2):
        assert cpu_streams("cpu", 301, 64) == 2
        fast = window_scores(model, windows, "cpu", batch_size=64)
        assert set(model.sizes) == {64}  # 4 full batches and one of 45, padded
        assert len(model.sizes) == 5
        with monkeypatch.context() as m:
            m.setattr(scoring, "padded_batch", lambda n, batch_size: n)
            plain = window_scores(model.inner, windows, "cpu", batch_size=64)
    np.testing.assert_array_equal(fast.scores, plain.scores)
    np.testing.assert_array_equal(fast.last_reconstruction, plain.last_reconstruction)
