import numpy as np
import pytest
import torch

from anomaly.errors import ConfigError, ModelError
from anomaly.model import ModelConfig, build_model
from anomaly.training import TrainConfig, split_windows, train_autoencoder
from anomaly.windowing import make_windows


def test_shapes_and_gradients():
    cfg = ModelConfig(n_features=3, window_size=7, hidden_size=8, latent_size=4, num_layers=2, dropout=0.1)
    model = build_model(cfg)
    x = torch.randn(5, 7, 3)
    y = model(x)
    assert y.shape == (5, 7, 3)
    y.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_config_round_trip_and_validation():
    cfg = ModelConfig(n_features=2, window_size=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as err:
        ModelConfig(n_features=2, window_size=0)
    assert err.value.field == "model.window_size"
    with pytest.raises(ConfigError):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_split_windows_leaves_no_shared_rows():
    windows = make_windows(np.arange(100, dtype=float)[:, None], 10)  # window i covers rows i..i+9
    train, val = split_windows(windows, 0.2)
    assert train[-1, -1, 0] < val[0, 0, 0]  # last training row is before the first validation row


def test_a_validation_fraction_that_leaves_no_training_window_is_refused():
    # 0.998 of 200 windows validated: nothing was trained, a random network registered with loss 0.0
    windows = make_windows(np.arange(210, dtype=float)[:, None], 11)
    with pytest.raises(ModelError, match=r"validation_fraction 0.998 leaves no training window of 200"):
        split_windows(windows, 0.998)
    train, _ = split_windows(windows, 0.9)
    assert len(train) >= 1


def test_a_wild_validation_reading_does_not_hand_back_the_untrained_network():
    # One validation reading ~1e25 in scaled units: its squared error was inf in float32, no epoch was
    # "better" than inf, and training returned the initial weights (then the model could not be saved).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2)).astype(np.float32)
    x[380, 0] = 1e25  # in the validation part
    windows = make_windows(x, 8)
    cfg = ModelConfig(n_features=2, window_size=8, hidden_size=8, latent_size=4)
    result = train_autoencoder(windows, cfg, TrainConfig(epochs=2, batch_size=64, patience=5, seed=0, device="cpu",
                                                         progress=False))
    # best_epoch 0 meant the initial weights came back
    assert all(np.isfinite(h.val_loss) for h in result.history) and result.best_epoch >= 1


def test_training_learns_a_sine_and_is_reproducible():
    t = np.arange(1500)
    x = np.stack([np.sin(t / 10), np.cos(t / 10)], axis=1).astype(np.float32)
    windows = make_windows(x, 16)
    cfg = ModelConfig(n_features=2, window_size=16, hidden_size=24, latent_size=8)
    tc = TrainConfig(epochs=6, batch_size=64, patience=10, seed=1, device="cpu", progress=False)
    a = train_autoencoder(windows, cfg, tc)
    b = train_autoencoder(windows, cfg, tc)
    assert a.history[-1].train_loss < a.history[0].train_loss * 0.5
    assert a.best_val_loss == pytest.approx(b.best_val_loss)  # same seed, same result
    assert a.best_epoch >= 1 and len(a.val_windows) > 0


def test_nan_windows_rejected():
    windows = np.zeros((20, 4, 1), np.float32)
    windows[3, 1, 0] = np.nan
    with pytest.raises(ModelError):
        train_autoencoder(windows, ModelConfig(n_features=1, window_size=4), TrainConfig(progress=False, device="cpu"))


def test_cuda_asked_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError):
        train_autoencoder(np.zeros((20, 4, 1), np.float32), ModelConfig(n_features=1, window_size=4),
                          TrainConfig(progress=False, device="cuda"))


def test_a_device_the_machine_lacks_is_a_config_error_naming_the_field(monkeypatch):
    import torch

    from anomaly.errors import ConfigError
    from anomaly.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"worker\.device: cuda asked for but CUDA is not available"):
        resolve_device("cuda", "worker.device")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"training\.device: cuda:3 .* 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_numpy_sizes_become_plain_ints_and_a_saved_config_without_its_shape_is_a_config_error():
    import json

    import numpy as np

    from anomaly.errors import ConfigError
    from anomaly.model import ModelConfig

    cfg = ModelConfig(n_features=np.int64(3), window_size=np.int32(8))
    assert type(cfg.n_features) is int and json.loads(json.dumps(cfg.to_dict()))["window_size"] == 8
    with pytest.raises(ConfigError, match="without window_size"):
        ModelConfig.from_dict({"n_features": 3})


def test_at_a_stride_only_the_windows_sharing_rows_with_validation_are_dropped():
    """W-1 windows were dropped before the split whatever the stride: at stride 25 of W=50, 49 windows
    (1,225 rows) where one was needed; about 60 % of the training windows were thrown away."""
    stride, w = 25, 50
    windows = make_windows(np.arange(5000, dtype=float)[:, None], w, stride)
    starts = np.arange(len(windows)) * stride
    train, val = split_windows(windows, 0.2, starts=starts)
    assert train[-1, -1, 0] < val[0, 0, 0]  # no shared row
    assert val[0, 0, 0] - train[-1, -1, 0] <= stride  # and no more dropped than must be
    assert len(train) + len(val) >= len(windows) - 1


def test_a_fleets_validation_starts_where_its_tails_start():
    """``val_from_row``: every window from that row validates, every one before it that ends before it
    trains. By fraction, the split took the last entities' training rows too (an entity trained on nothing)."""
    windows = make_windows(np.arange(300, dtype=float)[:, None], 10)
    train, val = split_windows(windows, 0.5, val_from_row=250)
    assert val[0, 0, 0] == 250 and len(val) == len(windows) - 250
    assert train[-1, -1, 0] == 249 and len(train) == 241


def test_a_fleet_trains_on_every_entity_and_validates_on_their_recent_rows():
    from anomaly.detector import fit_detector
    from anomaly.preparation import prepare_fleet
    from tests.fixtures import normal_frame

    frames = {f"pump-{i}": normal_frame(200, seed=i) for i in range(12)}
    prepared = prepare_fleet(frames, window_size=10, validation_fraction=0.2)
    first_tail = min(a for spans in prepared.entity_tails.values() for a, _ in spans)
    config = TrainConfig(epochs=1, patience=1, device="cpu", progress=False, validation_fraction=0.2)
    _, result, _ = fit_detector(prepared.values, prepared.sensors, {"window_size": 10, "hidden_size": 4, "latent_size": 2},
                                config, threshold_method="quantile", threshold_params={"q": 0.9}, gaps=prepared.gaps,
                                val_from_row=first_tail)
    assert result.val_start_row == first_tail


def test_too_few_windows_for_a_disjoint_split_keep_two_and_say_so(caplog):
    windows = make_windows(np.arange(11, dtype=float)[:, None], 8)  # 4 windows
    train, val = split_windows(windows, 0.2)
    assert len(train) == 2 and len(val) == 1 and "share rows with the validation windows" in caplog.text


def test_windows_touching_a_gap_are_left_out_without_copying_the_windows():
    """A boolean selection of the sliding windows copied them whole (W times the rows' memory: about 15 GB
    at SMD's scale with one gap row); the kept ones are gathered as they train, to the same weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2)).astype(np.float32)
    cfg = ModelConfig(n_features=2, window_size=8, hidden_size=8, latent_size=2)
    train = TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False, seed=3)
    windows = make_windows(x, 8)
    kept = np.ones(len(windows), dtype=bool)
    kept[100:108] = kept[300:308] = False  # two gap rows' windows
    gathered = train_autoencoder(windows, cfg, train, kept=kept)
    assert np.shares_memory(gathered.val_windows, x)  # a view, not a copy
    copied = train_autoencoder(windows[kept], cfg, train, starts=np.flatnonzero(kept))
    assert gathered.n_val_windows == copied.n_val_windows and gathered.n_train_windows == copied.n_train_windows
    assert gathered.best_val_loss == copied.best_val_loss
    for name, value in copied.model.state_dict().items():
        assert torch.equal(value, gathered.model.state_dict()[name])
    val = gathered.val_windows if gathered.val_index is None else gathered.val_windows[gathered.val_index]
    assert np.array_equal(val, copied.val_windows)
    kept[380:388] = False  # a gap among the validation windows too
    gathered, copied = train_autoencoder(windows, cfg, train, kept=kept), train_autoencoder(
        windows[kept], cfg, train, starts=np.flatnonzero(kept))
    assert gathered.val_index is not None and gathered.best_val_loss == copied.best_val_loss
    assert np.array_equal(gathered.val_windows[gathered.val_index], copied.val_windows)


def test_a_scaled_loss_trains_to_the_same_weights(monkeypatch):
    """Under CUDA autocast the LSTM runs in float16 and its gradients are scaled (``grad_scaler``); the
    scaling is by powers of two and undone before clipping and stepping, so in float32 it changes
    nothing. Forced on here, on CPU, to check the plumbing (unscaled before the clip, stepped by the scaler)."""
    import anomaly.training as training

    rng = np.random.default_rng(0)
    windows = make_windows(rng.normal(size=(300, 2)).astype(np.float32), 8)
    cfg = ModelConfig(n_features=2, window_size=8, hidden_size=8, latent_size=2)
    train = TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False, seed=1, grad_clip=0.05)
    plain = train_autoencoder(windows, cfg, train)
    monkeypatch.setattr(training, "grad_scaler", lambda device, bf16: torch.amp.GradScaler("cpu", enabled=True))
    scaled = train_autoencoder(windows, cfg, train)
    for name, value in plain.model.state_dict().items():
        assert torch.allclose(value, scaled.model.state_dict()[name], atol=1e-6), name
