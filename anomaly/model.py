"""The recurrent autoencoder and its configuration. torch only; no I/O.

The encoder reads a window of W steps x F sensors and compresses its last hidden state into a
latent vector; the decoder unrolls that vector over W steps and maps each step back to F sensors.
A window the model has learned to reconstruct well is "normal"; a large reconstruction error is
the anomaly signal.

Variants, all options of ``ModelConfig`` (every combination is valid):

- ``num_layers`` / ``dropout``: stacked recurrent layers, dropout between them and on the latent.
- ``cell``: ``lstm`` (default; PyTorch's fused ``nn.LSTM``), ``gru`` (``nn.GRU``) or ``peephole``
  (an LSTM whose gates also see the cell state, Gers et al.; written out below as a cell and a loop
  over time, as no fused kernel exists).
- ``bidirectional``: the encoder reads the window both ways; the latent is taken from both final
  states. The decoder always runs forwards in time.
- ``attention``: each decoder output attends (scaled dot product, Luong style) over all encoder
  outputs, and the context is mixed into what is mapped back to sensors. This opens a path around
  the bottleneck: with enough capacity the model can copy its input, which lowers every error,
  anomalous or not (README "Model variants" measures what that costs).

The model is rebuilt from ``ModelConfig`` alone (plain JSON), so a saved model is a ``state_dict``
plus that JSON: nothing is unpickled on load. The default configuration builds exactly the modules
(and ``state_dict`` keys) it always has; a config saved before the variant fields existed loads as
the default variant.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from anomaly.errors import ConfigError

CELLS = ("lstm", "gru", "peephole")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network."""

    n_features: int  # F: sensors per reading
    window_size: int  # W: steps per window
    hidden_size: int = 64  # H: recurrent hidden units in encoder and decoder (per direction)
    latent_size: int = 32  # L: size of the bottleneck vector
    num_layers: int = 1  # stacked recurrent layers in encoder and decoder
    dropout: float = 0.0  # dropout between stacked layers (needs num_layers > 1) and on the latent
    cell: str = "lstm"  # recurrent cell: lstm, gru or peephole
    bidirectional: bool = False  # encoder reads both ways (D = 2); the decoder stays forward-only
    attention: bool = False  # decoder outputs attend over all encoder outputs

    def __post_init__(self) -> None:
        for name in ("n_features", "window_size", "hidden_size", "latent_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"model.{name}", f"must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer would not go into model.json
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.cell not in CELLS:
            raise ConfigError("model.cell", f"must be one of {', '.join(CELLS)}; got {self.cell!r}")
        for name in ("bidirectional", "attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}", f"must be true or false, got {getattr(self, name)!r}")

    @property
    def directions(self) -> int:
        """D: 2 for a bidirectional encoder, else 1."""
        return 2 if self.bidirectional else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config from its JSON form; fields missing from older saved models take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("model", f"unknown fields {sorted(unknown)}")
        missing = [f.name for f in fields(cls) if f.name in ("n_features", "window_size") and f.name not in data]
        if missing:
            raise ConfigError("model", f"a saved model config without {', '.join(missing)}")
        return cls(**data)


class PeepholeLSTMCell(nn.Module):
    """One step of an LSTM with peephole connections (Gers, Schraudolph & Schmidhuber, 2002).

        i_t = sigmoid(W_xi x_t + W_hi h_{t-1} + p_i * c_{t-1} + b_i)   input gate sees c_{t-1}
        f_t = sigmoid(W_xf x_t + W_hf h_{t-1} + p_f * c_{t-1} + b_f)   forget gate sees c_{t-1}
        g_t = tanh(W_xg x_t + W_hg h_{t-1} + b_g)                      candidate
        c_t = f_t * c_{t-1} + i_t * g_t
        o_t = sigmoid(W_xo x_t + W_ho h_{t-1} + p_o * c_t + b_o)       output gate sees c_t
        h_t = o_t * tanh(c_t)

    The peephole weights p_* are diagonal (one per unit), as in the paper. Gate blocks in the
    projections are ordered i, f, g, o, as in ``nn.LSTM``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)  # W_x* and b_*
        self.hidden_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)  # W_h*
        self.peep_i = nn.Parameter(torch.empty(hidden_size))
        self.peep_f = nn.Parameter(torch.empty(hidden_size))
        self.peep_o = nn.Parameter(torch.empty(hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from the already projected input ``x_proj`` = input_proj(x_t): (B, 4H), h, c: (B, H)."""
        gi, gf, gg, go = (x_proj + self.hidden_proj(h)).chunk(4, dim=-1)  # each (B, H)
        i = torch.sigmoid(gi + self.peep_i * c)
        f = torch.sigmoid(gf + self.peep_f * c)
        c = f * c + i * torch.tanh(gg)  # c_t
        o = torch.sigmoid(go + self.peep_o * c)
        return o * torch.tanh(c), c  # h_t, c_t: (B, H) each

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, I), state (h, c): (B, H) each -> (h_t, c_t)."""
        return self.step(self.input_proj(x), *state)


class PeepholeLSTM(nn.Module):
    """Stacked (optionally bidirectional) peephole LSTM with ``nn.LSTM``'s batch-first interface:
    (B, W, I) -> output (B, W, D*H), (h_n, c_n) each (num_layers*D, B, H), layer-major."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.directions = 2 if bidirectional else 1
        self.cells = nn.ModuleList(
            PeepholeLSTMCell(input_size if layer == 0 else self.directions * hidden_size, hidden_size)
            for layer in range(num_layers) for _ in range(self.directions))  # index layer * D + direction
        self.inter_layer_dropout = nn.Dropout(dropout)

    def _run(self, cell: PeepholeLSTMCell, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One direction of one layer: x (B, W, I) -> outputs (B, W, H), h_n, c_n (B, H)."""
        B, W, _ = x.shape
        x_proj = cell.input_proj(x)  # (B, W, 4H): the input side of every step in one matmul
        h = x.new_zeros(B, self.hidden_size)
        c = x.new_zeros(B, self.hidden_size)
        outputs: list[torch.Tensor] = []
        for t in (range(W - 1, -1, -1) if reverse else range(W)):
            h, c = cell.step(x_proj[:, t], h, c)  # (B, H) each
            outputs.append(h)
        if reverse:
            outputs.reverse()  # back in time order
        return torch.stack(outputs, dim=1), h, c  # (B, W, H)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0:
                x = self.inter_layer_dropout(x)  # between layers only, as nn.LSTM
            outs = []
            for d in range(self.directions):
                out, h, c = self._run(self.cells[layer * self.directions + d], x, reverse=d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1)  # (B, W, D*H)
        return x, (torch.stack(h_n), torch.stack(c_n))  # (B, W, D*H), (num_layers*D, B, H) x 2


def recurrent_layer(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                    bidirectional: bool) -> nn.Module:
    """A batch-first recurrent stack of ``cell``: (B, W, I) -> (B, W, D*H), final state (h_n[, c_n])."""
    inter_layer_dropout = dropout if num_layers > 1 else 0.0
    if cell == "peephole":
        return PeepholeLSTM(input_size, hidden_size, num_layers, inter_layer_dropout, bidirectional)
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
    return rnn(input_size, hidden_size, num_layers=num_layers, batch_first=True, dropout=inter_layer_dropout,
               bidirectional=bidirectional)


class DecoderAttention(nn.Module):
    """Scaled dot-product attention of each decoder output over all encoder outputs (Luong et al.
    2015, "general" score): score(t, s) = dec_t . (K enc_s) / sqrt(H); the context (weighted mean of
    encoder outputs) and dec_t are mixed into tanh(C [dec_t; context_t])."""

    def __init__(self, hidden_size: int, encoder_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(encoder_size, hidden_size, bias=False)  # K: encoder outputs -> decoder space
        self.combine = nn.Linear(hidden_size + encoder_size, hidden_size)  # C

    def forward(self, dec: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """dec: (B, W, H) decoder outputs, enc: (B, W, D*H) encoder outputs -> (B, W, H)."""
        keys = self.key(enc)  # (B, W, H)
        scores = dec @ keys.transpose(1, 2) / math.sqrt(dec.shape[-1])  # (B, W_dec, W_enc)
        context = torch.softmax(scores, dim=-1) @ enc  # (B, W, D*H)
        return torch.tanh(self.combine(torch.cat([dec, context], dim=-1)))  # (B, W, H)


class LSTMAutoencoder(nn.Module):
    """Sequence-to-sequence recurrent autoencoder over windows of shape (B, W, F); the cell type,
    encoder direction and attention follow ``config`` (the name stays for the default cell)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        D = c.directions
        self.encoder = recurrent_layer(c.cell, c.n_features, c.hidden_size, c.num_layers, c.dropout, c.bidirectional)
        self.to_latent = nn.Linear(D * c.hidden_size, c.latent_size)
        self.latent_dropout = nn.Dropout(c.dropout)
        self.decoder = recurrent_layer(c.cell, c.latent_size, c.hidden_size, c.num_layers, c.dropout, False)
        if c.attention:
            self.attention = DecoderAttention(c.hidden_size, D * c.hidden_size)
        self.to_output = nn.Linear(c.hidden_size, c.n_features)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, F) -> latent (B, L) and encoder outputs (B, W, D*H)."""
        out, state = self.encoder(x)  # out: (B, W, D*H); state: h_n or (h_n, c_n), h_n: (num_layers*D, B, H)
        h = state[0] if isinstance(state, tuple) else state
        D = self.config.directions
        last = h[-D:].transpose(0, 1).reshape(x.shape[0], -1)  # (B, D*H): the last layer's final state(s)
        return self.latent_dropout(torch.tanh(self.to_latent(last))), out  # (B, L), (B, W, D*H)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) -> (B, L) latent vectors."""
        return self._encode(x)[0]

    def decode(self, z: torch.Tensor, steps: int, encoder_outputs: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) -> (B, W, F) reconstruction; with attention, ``encoder_outputs`` (B, W, D*H) are needed."""
        z_seq = z.unsqueeze(1).expand(-1, steps, -1)  # (B, W, L): the latent repeated at every step
        out, _ = self.decoder(z_seq)  # (B, W, H), forward in time
        if self.config.attention:
            if encoder_outputs is None:
                raise ValueError("an attention decoder needs the encoder outputs")
            out = self.attention(out, encoder_outputs)  # (B, W, H)
        return self.to_output(out)  # (B, W, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) -> (B, W, F) reconstruction of the input windows."""
        z, enc = self._encode(x)
        return self.decode(z, x.shape[1], enc)


def build_model(config: ModelConfig) -> LSTMAutoencoder:
    """The network for ``config``, freshly initialised (seed torch first for reproducibility)."""
    return LSTMAutoencoder(config)
