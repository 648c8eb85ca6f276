"""The LSTM autoencoder and its configuration. torch only; no I/O.

The encoder reads a window of W steps x F sensors and compresses its last hidden state into a
latent vector; the decoder unrolls that vector over W steps and maps each step back to F sensors.
A window the model has learned to reconstruct well is "normal"; a large reconstruction error is
the anomaly signal.

The model is rebuilt from ``ModelConfig`` alone (plain JSON), so a saved model is a ``state_dict``
plus that JSON: nothing is unpickled on load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from anomaly.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network."""

    n_features: int  # F: sensors per reading
    window_size: int  # W: steps per window
    hidden_size: int = 64  # LSTM hidden units in encoder and decoder
    latent_size: int = 32  # size of the bottleneck vector
    num_layers: int = 1  # stacked LSTM layers in encoder and decoder
    dropout: float = 0.0  # dropout between stacked layers (needs num_layers > 1) and on the latent

    def __post_init__(self) -> None:
        for name in ("n_features", "window_size", "hidden_size", "latent_size", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("model", f"unknown fields {sorted(unknown)}")
        return cls(**data)


class LSTMAutoencoder(nn.Module):
    """Sequence-to-sequence LSTM autoencoder over windows of shape (B, W, F)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        inter_layer_dropout = c.dropout if c.num_layers > 1 else 0.0
        self.encoder = nn.LSTM(c.n_features, c.hidden_size, num_layers=c.num_layers,
                               batch_first=True, dropout=inter_layer_dropout)
        self.to_latent = nn.Linear(c.hidden_size, c.latent_size)
        self.latent_dropout = nn.Dropout(c.dropout)
        self.decoder = nn.LSTM(c.latent_size, c.hidden_size, num_layers=c.num_layers,
                               batch_first=True, dropout=inter_layer_dropout)
        self.to_output = nn.Linear(c.hidden_size, c.n_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) -> (B, L) latent vectors."""
        _, (h, _) = self.encoder(x)  # h: (num_layers, B, H)
        return self.latent_dropout(torch.tanh(self.to_latent(h[-1])))  # (B, L)

    def decode(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """(B, L) -> (B, W, F) reconstruction."""
        z_seq = z.unsqueeze(1).expand(-1, steps, -1)  # (B, W, L): the latent repeated at every step
        out, _ = self.decoder(z_seq)  # (B, W, H)
        return self.to_output(out)  # (B, W, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) -> (B, W, F) reconstruction of the input windows."""
        return self.decode(self.encode(x), x.shape[1])


def build_model(config: ModelConfig) -> LSTMAutoencoder:
    """The network for ``config``, freshly initialised (seed torch first for reproducibility)."""
    return LSTMAutoencoder(config)
