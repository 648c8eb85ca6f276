"""NAB: what each step of the score chain is worth, on one set of trained models.

    python -m pipelines.nab_ablation [--data-dir DIR] [--cache results/nab_ablation.pkl] [--json OUT] [--heldout]

Trains the NAB protocol's models once (``protocols.score_series`` with the NAB profile, one per file,
fitted on its probationary period; the per-file signals are pickled in ``--cache`` and reused), then
scores the same errors through each chain in ``CHAINS`` with NAB's own scorer at its oracle threshold
(``evaluation.nab_scores``), so the rows differ only in how errors become NAB scores:

- the window-mean reconstruction error through the anomaly likelihood (short 5, long 500): the first
  chain;
- the same, each alarm once (``calibration.suppress_repeats``, 100 rows);
- likelihood short 1, long 1000, each alarm once;
- the newest step's error instead of the window mean;
- and a value beyond the range seen so far scoring 1 (``calibration.beyond_seen_range_sides``, Numenta's
  tolerance 0.05; a new high and a new low each alarmed once): the chain shipped before the record ratio;
- the likelihood replaced by the record ratio (``calibration.record_ratio``: the error over the largest
  of its last 3,000);
- and the window novelty (``novelty.window_novelty``: distance to the nearest earlier window) through
  its own record ratio, the higher of the two: the chain shipped before the transition surprise;
- and the transition surprise (``transitions.transition_surprise``: how unlikely each change is after
  the change before it, learned online) through its own record ratio, the highest of the three: the
  shipped chain, ``protocols.nab_calibrated``;
- the chain before the transition surprise with new highs, new lows and the scores' alarms sharing one
  each-alarm-once span (``merged_range_finish``: the chain shipped before ``nab_finish`` gave each side
  its own);
- the window novelty without the model's errors, with the transition surprise and without the model's
  errors, the transition surprise without the window novelty, and the transition surprise alone;
- a baseline without a model: the absolute first difference |x_t - x_{t-1}| through the likelihood
  chain, and without the range rule; and the range rule alone.

With ``--heldout`` it also checks how much of the transition surprise's gain survives choosing its one
number, the bins (``HELDOUT_BINS``), on half of the files: over random halvings, both ways, the bins
that score best on one half are scored on the other, beside the shipped chain and the chain before
the transition surprise on the same halves (``heldout``).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anomaly import evaluation
from anomaly.calibration import anomaly_likelihood, beyond_seen_range, suppress_repeats
from anomaly.cli import default_data_dir
from anomaly.datasets import load_nab
from anomaly.protocols import (NAB_RANGE_TOLERANCE, NAB_REPEAT_ROWS, PROFILES, last_step_errors, nab_calibrate, nab_finish,
                               nab_novelty, nab_record_scores, nab_transitions, profile_settings, score_series)

log = logging.getLogger("nab_ablation")

Chain = Callable[[Mapping[str, Any]], np.ndarray]


LIKELIHOOD = {"short": 1, "long": 1000, "min_history": 50}  # the likelihood chain's windows, rows


def merged_range_finish(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``nab_finish`` as it was before each side of the range had its own each-alarm-once span: a
    row beyond the range seen so far scores 1, then one span over everything, so a new low within
    ``NAB_REPEAT_ROWS`` of a new high (or of a higher score) was dropped as a repeat."""
    return suppress_repeats(np.where(beyond_seen_range(values, NAB_RANGE_TOLERANCE), 1.0, scores), NAB_REPEAT_ROWS)


def likelihood_chain(errors: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """The chain shipped before the record ratio: the errors through the anomaly likelihood
    (``LIKELIHOOD``); with ``values``, the range rule; each alarm once. Past only."""
    return nab_finish(anomaly_likelihood(errors, **LIKELIHOOD), values)


def _transitions(f: Mapping[str, Any]) -> np.ndarray:
    """The shipped transition surprise of a cached file (cheap: not cached)."""
    return nab_transitions(f["values"], f["train_rows"])


CHAINS: dict[str, Chain] = {
    "window-mean error, likelihood 5/500 (the first chain)": lambda f: anomaly_likelihood(f["mean"], 5, 500, 50),
    "+ each alarm once (100 rows)": lambda f: suppress_repeats(anomaly_likelihood(f["mean"], 5, 500, 50), 100),
    "likelihood 1/1000, each alarm once": lambda f: likelihood_chain(f["mean"]),
    "newest-step error, likelihood 1/1000, each alarm once": lambda f: likelihood_chain(f["last"]),
    "+ a value beyond the range seen so far scores 1": lambda f: likelihood_chain(f["last"], f["values"]),
    "the likelihood replaced by the record ratio (error over the largest of its last 3,000)":
        lambda f: nab_calibrate(f["last"], f["values"]),
    "+ window novelty through its own record ratio, the higher of the two (shipped before)":
        lambda f: nab_calibrate(f["last"], f["values"], f["novelty"]),
    "+ transition surprise through its own record ratio, the highest of the three (shipped)":
        lambda f: nab_calibrate(f["last"], f["values"], f["novelty"], _transitions(f)),
    "the chain before the transition surprise, new highs, new lows and the scores' alarms sharing one "
    "each-alarm-once span (before that)":
        lambda f: merged_range_finish(nab_record_scores(f["last"], f["novelty"]), f["values"]),
    "window novelty alone (no model errors), record ratio, range rule":
        lambda f: nab_calibrate(np.zeros(len(f["last"])), f["values"], f["novelty"]),
    "window novelty and transition surprise (no model errors)":
        lambda f: nab_calibrate(np.zeros(len(f["last"])), f["values"], f["novelty"], _transitions(f)),
    "the model's errors and the transition surprise (no window novelty)":
        lambda f: nab_calibrate(f["last"], f["values"], transitions=_transitions(f)),
    "transition surprise alone (no model errors, no novelty), record ratio, range rule":
        lambda f: nab_calibrate(np.zeros(len(f["last"])), f["values"], transitions=_transitions(f)),
    "no model: the absolute first difference, the likelihood chain": lambda f: likelihood_chain(f["diff"], f["values"]),
    "the same without the range rule": lambda f: likelihood_chain(f["diff"]),
    "the range rule alone (no model, no likelihood)": lambda f: likelihood_chain(np.zeros(len(f["last"])), f["values"]),
}


def collect(series: Sequence[Any], settings: Any) -> list[dict[str, Any]]:
    """Per file: ``mean`` (window-mean error per row), ``last`` (newest-step error), ``diff`` (|first
    difference| of the first sensor), all 0 where no window ends yet, ``values`` (T, F), ``novelty``
    (``protocols.nab_novelty``, NaN where no earlier window exists yet), ``train_rows`` and NAB's ``windows``."""
    files = []
    for i, s in enumerate(series, 1):
        log.info("%d/%d %s", i, len(series), s.name)
        r = score_series(s, settings, score_from=0)
        first = r.values[:, 0]
        files.append({"name": s.name, "mean": np.nan_to_num(r.scores, nan=0.0), "last": last_step_errors(r),
                      "diff": np.abs(np.diff(first, prepend=first[0])), "values": r.values,
                      "novelty": nab_novelty(r.values, s.train_rows), "train_rows": s.train_rows,
                      "windows": list(s.meta["windows"])})
    return files


def evaluate(files: Sequence[Mapping[str, Any]], chains: Mapping[str, Chain] = CHAINS) -> list[dict[str, Any]]:
    """NAB scores (three profiles, oracle threshold) of every chain over ``files``."""
    rows = []
    for name, chain in chains.items():
        nab = [evaluation.NabFile(name=f["name"], scores=chain(f), windows=f["windows"]) for f in files]
        r = evaluation.nab_scores(nab)
        rows.append({"chain": name, "nab_standard": r["nab_standard"], "nab_low_fp": r["nab_low_fp"],
                     "nab_low_fn": r["nab_low_fn"]})
    return rows


HELDOUT_BINS = (4, 6, 8, 10, 12, 16, 20, 24, 32)  # the transition surprise's bins tried (shipped: 16)


def _standard(outputs: Sequence[np.ndarray], files: Sequence[Mapping[str, Any]], subset: Sequence[int]) -> float:
    nab = [evaluation.NabFile(name=files[i]["name"], scores=outputs[i], windows=files[i]["windows"]) for i in subset]
    return float(evaluation.nab_scores(nab)["nab_standard"])


def heldout(files: Sequence[Mapping[str, Any]], bins: Sequence[int] = HELDOUT_BINS, halvings: int = 5,
            seed: int = 0) -> dict[str, Any]:
    """Choose the transition surprise's bins on half of the files, score the other half. For each of
    ``halvings`` random splits, both ways: the bins with the best NAB standard score on one half, that
    choice's score on the other, and on the same other half the shipped chain and the chain before the
    transition surprise. Returns the per-bins corpus scores, the choices, and the three means."""
    before = [nab_calibrate(f["last"], f["values"], f["novelty"]) for f in files]
    by_bins = {b: [nab_calibrate(f["last"], f["values"], f["novelty"], nab_transitions(f["values"], f["train_rows"], b))
                   for f in files] for b in bins}
    everything = range(len(files))
    shipped = [CHAINS[next(n for n in CHAINS if "(shipped)" in n)](f) for f in files]
    rng = np.random.default_rng(seed)
    chosen, held, held_shipped, held_before = [], [], [], []
    for _ in range(halvings):
        order = rng.permutation(len(files))
        half = len(files) // 2
        for pick, score_on in ((order[:half], order[half:]), (order[half:], order[:half])):
            best = max(bins, key=lambda b: _standard(by_bins[b], files, pick))
            chosen.append(best)
            held.append(_standard(by_bins[best], files, score_on))
            held_shipped.append(_standard(shipped, files, score_on))
            held_before.append(_standard(before, files, score_on))
    return {"corpus_by_bins": {b: _standard(by_bins[b], files, everything) for b in bins}, "chosen": chosen,
            "heldout_chosen": float(np.mean(held)), "heldout_shipped": float(np.mean(held_shipped)),
            "heldout_before": float(np.mean(held_before))}


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| how errors become NAB scores | standard | reward low FP | reward low FN |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['chain']} | {r['nab_standard']:.1f} | {r['nab_low_fp']:.1f} | {r['nab_low_fn']:.1f} |")
    return "\n".join(lines)


def cache_key(nab_dir: Path) -> dict:
    """What the cached per-file signals depend on: the NAB profile, the data folder, the score chain's
    constants (``protocols.NAB_*``) and the code version (``tracking.code_fingerprint``: a commit, or
    uncommitted changes, may change them)."""
    from anomaly import protocols, tracking

    constants = {name: getattr(protocols, name) for name in dir(protocols) if name.startswith("NAB_")
                 and isinstance(getattr(protocols, name), (int, float, str, dict, tuple))}
    return {"profile": json.loads(json.dumps(PROFILES["nab"])), "data_dir": str(nab_dir.resolve()),
            "constants": json.loads(json.dumps(constants, default=str)), "code": tracking.code_fingerprint()}


def cached_files(cache: Path, key: dict) -> list[dict] | None:
    """The per-file results pickled in ``cache`` when they were made under ``key`` (``cache_key``),
    else None: a cache made under other settings, or before caches recorded theirs, would
    reproduce old numbers without a word, so it is trained again (and said so)."""
    if not cache.is_file():
        return None
    with cache.open("rb") as fh:
        cached = pickle.load(fh)
    if isinstance(cached, dict) and cached.get("key") == key:
        return cached["files"]
    log.warning("%s was made under other settings or data (%s); training again", cache,
                cached.get("key") if isinstance(cached, dict) else "no record of them")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.nab_ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="the NAB folder (default $ANOMALY_DATASETS/nab or ../shared/datasets/nab)")
    parser.add_argument("--cache", default="results/nab_ablation.pkl", help="per-file signals, reused when present")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--heldout", action="store_true",
                        help="also choose the transition surprise's bins on half the files and score the other half")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cache = Path(args.cache)
    nab_dir = Path(args.data_dir) if args.data_dir else default_data_dir("nab")
    key = cache_key(nab_dir)
    files = cached_files(cache, key)
    if files is not None:  # written by collect under this key: every field is there
        log.info("reusing %s (%d files)", cache, len(files))
    else:
        started = time.perf_counter()
        files = collect(load_nab(nab_dir), profile_settings("nab"))
        log.info("trained and scored %d files in %.0f s", len(files), time.perf_counter() - started)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("wb") as fh:
            pickle.dump({"key": key, "files": files}, fh)
    rows = evaluate(files)
    print(markdown(rows))
    out: Any = rows
    if args.heldout:
        check = heldout(files)
        print("\nTransition surprise by bins (NAB standard, all files): "
              + ", ".join(f"{b}: {v:.1f}" for b, v in check["corpus_by_bins"].items()))
        print(f"Bins chosen on half the files: {check['chosen']}; on the other halves "
              f"{check['heldout_chosen']:.1f}, against {check['heldout_shipped']:.1f} for the shipped bins and "
              f"{check['heldout_before']:.1f} for the chain before the transition surprise")
        out = {"chains": rows, "heldout": check}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
