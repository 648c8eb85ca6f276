"""Figures people would rather look at than read: loss curves, the error distribution with its
threshold, a reading/score overlay with flagged and labelled spans, and which sensors drove the error. Returns matplotlib figures;
writes nothing (the tracking adapter logs them to MLflow).
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def loss_curves(train_loss: Sequence[float], val_loss: Sequence[float], best_epoch: int | None = None) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, len(train_loss) + 1)
    marker = "o" if len(epochs) <= 30 else None  # a one-epoch run is a point: without a marker, nothing shows
    ax.plot(epochs, train_loss, label="train", marker=marker, markersize=3)
    ax.plot(epochs, val_loss, label="validation", marker=marker, markersize=3)
    ax.set_xlim(0.5, max(len(epochs), 1) + 0.5)
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction MSE (scaled units)")
    ax.set_title("Loss curves")
    ax.legend()
    fig.tight_layout()
    return fig


def error_distribution(val_scores: np.ndarray, threshold: float, test_scores: np.ndarray | None = None,
                       method: str = "", *, names: tuple[str, str] = ("validation (normal)", "scored data"),
                       xlabel: str = "window anomaly score", title: str = "Reconstruction error distribution") -> Figure:
    """Histograms of ``val_scores`` (and ``test_scores``) on log-spaced bins, each bar the fraction of
    its group's scores in that bin (not a density: on log bins a density shrinks the high bins, where
    the threshold and the anomalies are, to nothing), with the threshold as a red line. ``names``: the
    two groups' legend entries."""
    fig, ax = plt.subplots(figsize=(7, 4))
    val_scores = np.asarray(val_scores, dtype=np.float64)
    val_scores = val_scores[np.isfinite(val_scores)]
    if test_scores is not None:
        test_scores = np.asarray(test_scores, dtype=np.float64)
        test_scores = test_scores[np.isfinite(test_scores)]
    all_scores = np.concatenate([val_scores] + ([test_scores] if test_scores is not None else []))
    positive = all_scores[all_scores > 0]
    lo = max(positive.min() if len(positive) else 1e-6, 1e-8)
    top = all_scores.max() if len(all_scores) else lo
    hi = max(top, threshold if np.isfinite(threshold) else top, lo * 10) * 1.05  # never at or under lo
    bins = np.logspace(np.log10(lo), np.log10(hi), 60)
    for scores, name, alpha in ((val_scores, names[0], 0.7), (test_scores, names[1], 0.5)):
        if scores is not None and len(scores):
            ax.hist(np.clip(scores, lo, None), bins=bins, alpha=alpha, label=f"{name}: {len(scores):,}",
                    weights=np.full(len(scores), 1.0 / len(scores)))
    ax.axvline(threshold, color="red", label=f"threshold {threshold:.4g} {method}".strip())
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of windows in the bin")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def anomaly_overlay(timestamps: np.ndarray, values: np.ndarray, sensors: Sequence[str], scores: np.ndarray,
                    threshold: float | np.ndarray, flags: np.ndarray | None = None, labels: np.ndarray | None = None,
                    expected: np.ndarray | None = None, max_sensors: int = 4,
                    order: Sequence[int] | None = None, marker: tuple[Any, str] | None = None,
                    subject: str | None = None) -> Figure:
    """Readings (rows, F) with their reconstructions, and the score with threshold; flagged spans in
    red, labelled anomalies in orange. ``scores``/``flags``/``labels`` are row-aligned (NaN allowed).
    ``threshold``: one bar, or the bar in force at each row (row-aligned, as a per-entity or moving bar
    flags them), drawn as a dashed line. A flagged or labelled row is shaded up to the next row.
    ``order``: the sensors (column indices) to draw first, e.g. by their share of the error (default:
    the largest error first where ``expected`` is given, see ``error_order``; else column order);
    ``max_sensors`` of them are drawn. ``marker``: (x, text), a dashed vertical line. ``subject``: whose
    rows these are (an entity of a fleet), named in the title."""
    if order is None and expected is not None:
        order = error_order(values, expected, flags)
    shown = list(order if order is not None else range(values.shape[1]))[:max_sensors]
    k = len(shown)
    fig, axes = plt.subplots(k + 1, 1, figsize=(10, 1.8 * (k + 1)), sharex=True)
    axes = np.atleast_1d(axes)
    x = np.asarray(timestamps)
    for n, i in enumerate(shown):
        ax = axes[n]
        ax.plot(x, values[:, i], lw=0.8, label="actual")
        if expected is not None:
            ax.plot(x, expected[:, i], lw=0.8, alpha=0.8, label="expected")
        ax.set_ylabel(_label(str(sensors[i])), fontsize=8)
        _shade(ax, x, labels, "orange")
        _shade(ax, x, flags, "red")
    axes[0].legend(loc="upper right", fontsize=7)
    ax = axes[-1]
    ax.plot(x, scores, lw=0.8, color="black")
    bars = np.asarray(threshold, dtype=np.float64)
    if bars.ndim == 0:
        ax.axhline(float(bars), color="red", ls="--", lw=0.8)
    else:  # NaN where no window has been scored yet: a gap in the line
        ax.plot(x, bars, color="red", ls="--", lw=0.8, drawstyle="steps-post")
    ax.set_yscale("log")
    ax.set_ylabel("score", fontsize=8)
    _shade(ax, x, labels, "orange")
    _shade(ax, x, flags, "red")
    if marker is not None:
        for ax in axes:
            ax.axvline(marker[0], color="grey", ls=":", lw=1.0)
        axes[0].annotate(marker[1], (marker[0], 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                         ha="left", va="bottom", color="grey")
    keys = ["red: flagged"] + (["orange: labelled"] if labels is not None else [])
    more = (f"; the {k} of {values.shape[1]} sensors with the largest error" if order is not None else
            f"; the first {k} of {values.shape[1]} sensors") if k < values.shape[1] else ""
    whose = f"{subject}: r" if subject else "R"
    fig.suptitle(f"{whose}eadings, reconstruction and anomaly score ({', '.join(keys)}{more})", fontsize=9)
    fig.tight_layout()
    return fig


def contribution_map(timestamps: np.ndarray, shares: np.ndarray, sensors: Sequence[str],
                     flags: np.ndarray | None = None, blamed: np.ndarray | None = None, max_sensors: int = 20,
                     subject: str | None = None) -> Figure:
    """Which sensors drove the error, row by row: each sensor's share of its window's reconstruction error
    (rows, F; what an event lists) as a heat map, the flagged rows in a red strip above it, and, where the
    data says which sensors were to blame (``blamed``, rows x F bool: SMD's ``interpretation_label``), black
    marks on those cells. The ``max_sensors`` sensors shown are those with the largest share over the
    flagged rows (all rows where none is), and every blamed one, in that order."""
    shares = np.asarray(shares, dtype=np.float64)
    x = np.asarray(timestamps)
    n, f = shares.shape
    flagged = None if flags is None else np.nan_to_num(np.asarray(flags, dtype=np.float64), nan=0.0) != 0
    rows = flagged if flagged is not None and flagged.any() else np.ones(n, dtype=bool)
    weight = np.nansum(shares[rows], axis=0)
    if blamed is not None:
        weight = weight + np.where(np.asarray(blamed, dtype=bool).any(axis=0), np.inf, 0.0)  # blamed ones first
    shown = np.argsort(-weight, kind="stable")[:max_sensors].tolist()
    fig, (strip, ax) = plt.subplots(2, 1, figsize=(10, 1.2 + 0.22 * len(shown)), sharex=True,
                                    gridspec_kw={"height_ratios": [1, max(len(shown), 1) / 2]})
    strip.set_yticks([])
    strip.set_ylabel("flagged", fontsize=7, rotation=0, ha="right", va="center")
    strip.plot(x, np.zeros(n), lw=0)  # sets the x range (and units) for the shading
    _shade(strip, x, flagged, "red")
    xs = np.asarray(ax.convert_xunits(list(x)), dtype=np.float64) if n else np.zeros(0)
    step = float(np.median(np.diff(xs))) if n > 1 else 1.0
    image = ax.imshow(shares[:, shown].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                      vmax=1.0, extent=(xs[0] - step / 2, xs[-1] + step / 2, len(shown) - 0.5, -0.5) if n else None)
    ax.set_yticks(range(len(shown)), [_label(str(sensors[i]), 20) for i in shown], fontsize=6)
    if blamed is not None:
        cells = np.asarray(blamed, dtype=bool)[:, shown]
        r, c = np.nonzero(cells)
        if len(r) > 4000:  # a mark every few rows is as plain, and draws in a fraction of the time
            keep = np.linspace(0, len(r) - 1, 4000).round().astype(np.int64)
            r, c = r[keep], c[keep]
        ax.scatter(xs[r], c, s=2, marker="s", color="black", linewidths=0, label="labelled to blame")
        if len(r):
            ax.legend(loc="upper right", fontsize=7, markerscale=3)
    fig.colorbar(image, ax=[strip, ax], fraction=0.03, pad=0.01, label="share of the error")
    if np.issubdtype(x.dtype, np.datetime64):
        fig.autofmt_xdate()  # dates slanted: they overlapped
    whose = f"{subject}: w" if subject else "W"
    more = f" (the {len(shown)} of {f} with the largest share{', the blamed ones first' if blamed is not None else ''})" \
        if len(shown) < f else ""
    fig.suptitle(f"{whose}hich sensors drove each window's error{more}", fontsize=9)
    return fig


def error_order(values: np.ndarray, expected: np.ndarray, flags: np.ndarray | None = None) -> list[int]:
    """Sensors (column indices) by how badly they are reconstructed, worst first: the mean squared gap
    between reading and reconstruction in units of the sensor's own spread, over the flagged rows (all
    rows where none is flagged). A sensor with no gap to measure comes last; ties keep column order."""
    values, expected = np.asarray(values, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if values.ndim != 2 or values.shape != expected.shape or not values.size:
        return list(range(values.shape[1] if values.ndim == 2 else 0))
    rows = np.ones(len(values), dtype=bool)
    if flags is not None:
        flagged = np.nan_to_num(np.asarray(flags, dtype=np.float64), nan=0.0) != 0
        if flagged.any():
            rows = flagged
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: measured as no gap, below
        spread = np.nanstd(values, axis=0)
        spread = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
        error = np.nanmean(((values[rows] - expected[rows]) / spread) ** 2, axis=0)
    return np.argsort(-np.nan_to_num(error, nan=-1.0), kind="stable").tolist()


def _label(name: str, width: int = 14) -> str:
    """A sensor name on at most two lines of about ``width`` characters (an axis label has little room)."""
    lines = textwrap.wrap(name, width) or [name]
    return "\n".join(lines[:2]) + ("…" if len(lines) > 2 else "")


def comparison_bars(metrics: dict[str, dict[str, float]], title: str,
                    limits: dict[str, tuple[float, str]] | None = None) -> Figure:
    """``metrics[model][metric]`` (used to compare champion and challenger): one panel a metric, each
    on its own scale (a false-alarm rate beside an error in the thousands drew as nothing), its bars
    labelled with their values. ``limits[metric]``: (value, text), a dashed line, e.g. the gate's bar."""
    models = list(metrics)
    names = sorted({m for v in metrics.values() for m in v})
    limits = limits or {}
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(2.6 * max(len(names), 1) + 1, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], names):
        heights = [metrics[model].get(name, np.nan) for model in models]
        bars = ax.bar(np.arange(len(models)), heights, 0.7, color=[colors[i % len(colors)] for i in range(len(models))])
        ax.bar_label(bars, labels=[f"{h:.4g}" if np.isfinite(h) else "n/a" for h in heights], fontsize=7)
        if name in limits and np.isfinite(limits[name][0]):
            ax.axhline(limits[name][0], color="grey", ls="--", lw=0.9, label=limits[name][1])
            ax.legend(fontsize=6, loc="lower center")
        ax.set_xticks(np.arange(len(models)), models, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.margins(y=0.15)
    for ax in axes[0][len(names):]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _shade(ax, x: np.ndarray, mask: np.ndarray | None, color: str) -> None:
    if mask is None:
        return
    mask = np.nan_to_num(np.asarray(mask, dtype=np.float64), nan=0.0) != 0  # NaN: not flagged (bool() says True)
    if not mask.any():
        return
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    n = len(x)
    spans = []
    for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        # Row i spans x[i] to x[i + 1]: a run of one row has a width, and the last row takes the step before it.
        stop = x[end] if end < n else (x[-1] + (x[-1] - x[-2]) if n > 1 else None)
        if stop is None:
            ax.axvline(x[start], color=color, alpha=0.5, lw=2)
        else:
            spans.append((x[start], stop))
    if spans:
        # One artist for every run, spanning the axes' height (an axvspan each took 30 s and 400 MB for a
        # score flickering around its bar 5,000 times); x in the axis' units (dates too)
        lo = np.asarray(ax.convert_xunits([a for a, _ in spans]), dtype=np.float64)
        hi = np.asarray(ax.convert_xunits([b for _, b in spans]), dtype=np.float64)
        verts = [((a, 0.0), (a, 1.0), (b, 1.0), (b, 0.0)) for a, b in zip(lo.tolist(), hi.tolist())]
        ax.add_collection(PolyCollection(verts, facecolors=color, alpha=0.25, linewidths=0,
                                         transform=ax.get_xaxis_transform()), autolim=False)


def close(fig: Figure) -> None:
    plt.close(fig)
