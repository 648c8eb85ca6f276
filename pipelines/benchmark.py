"""The accuracy benchmark: the full protocol on SKAB, NAB and the SMD subset, side by side with the
published numbers, written to results/benchmark.json and (with --update-readme) into README.md.

    python -m pipelines.benchmark [--datasets skab,nab,smd] [--json OUT] [--update-readme]

With ``--variants`` it compares the model variants (``VARIANTS``: ``FAMILIES`` of cell, depth, direction,
attention, and ``SIZES``, one network shape on every dataset) under one protocol instead: every variant gets each dataset's profile plus its own ``[model]``
overrides, and the same caps (``--max-epochs``, ``--smd-machines``); the table (accuracy, training
seconds, scoring windows/s) goes between the README's ``variants`` markers.

    python -m pipelines.benchmark --variants all [--max-epochs N] [--smd-machines N] [--threads N]
        [--json results/variants.json] [--resume] [--update-readme]
    python -m pipelines.benchmark --costs --threads 1 --json results/variant_costs.json   # cost per step, no data
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from anomaly import datasets, protocols
from anomaly.cli import default_data_dir, positive_int
from anomaly.config import Settings, TrainingSettings, build_settings

log = logging.getLogger("benchmark")

# Published numbers (SKAB README leaderboard, outlier problem; NAB README scoreboard).
SKAB_PUBLISHED = [("Conv-AE", 0.78, 13.55, 28.02), ("MSET", 0.78, 39.73, 14.13),
                  ("T-squared+Q (PCA-based)", 0.76, 26.62, 24.92), ("LSTM-AE (SKAB's)", 0.74, 29.96, 25.92),
                  ("T-squared", 0.66, 19.21, 42.6), ("LSTM-VAE", 0.56, 9.13, 55.03),
                  ("Vanilla LSTM", 0.54, 12.54, 59.53), ("Vanilla AE", 0.39, 2.59, 75.15),
                  ("MSCRED", 0.36, 49.94, 69.88), ("Isolation forest", 0.29, 2.56, 82.89),
                  ("All-anomalous (trivial)", 0.698, 100.0, 0.0)]
NAB_PUBLISHED = [("ARTime", 74.9, 65.1, 80.4), ("Numenta HTM", 70.5, 62.6, 75.2), ("CAD OSE", 69.9, 67.0, 73.2),
                 ("KNN CAD", 58.0, 43.4, 64.8), ("Random Cut Forest", 51.7, 38.4, 59.7), ("Random", 11.0, 1.2, 19.5)]


def run(names: list[str], limit: int | None) -> dict:
    out = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": platform.processor() or platform.machine()},
           "results": {}, "limit": limit}
    for name in names:
        series = datasets.load_dataset(name, default_data_dir(name))
        if limit is not None:
            series = series[:limit]
        log.info("%s: %d series", name, len(series))
        started = time.perf_counter()
        result = protocols.run_protocol(name, series, progress=lambda s: log.info("  %s", s))
        out["results"][name] = {**result.summary(), "seconds": round(time.perf_counter() - started, 1),
                                "settings": protocols.PROFILES[name]}
        if name == "skab":  # the trivial row, measured on the same test parts
            out["results"][name]["all_anomalous"] = protocols.all_anomalous(series)
        log.info("%s: %s", name, json.dumps(result.summary()))
    return out


# The model variants compared (README "Model variants"): [model] overrides on top of each dataset's profile.
FAMILIES: dict[str, dict[str, object]] = {
    "lstm": {},  # the default
    "lstm-2-layers": {"num_layers": 2, "dropout": 0.1},
    "bilstm": {"bidirectional": True},
    "gru": {"cell": "gru"},
    "peephole": {"cell": "peephole"},
    "lstm-attention": {"attention": True},
}
# Network sizes, the same on every dataset (README "Choosing the default network"): the old [model]
# default, two smaller ones, and the one that replaced it (SKAB's profile shape).
SIZES: dict[str, dict[str, object]] = {
    "size-w32-h64": {"window_size": 32, "hidden_size": 64, "latent_size": 16},
    "size-w32-h32": {"window_size": 32, "hidden_size": 32, "latent_size": 8},
    "size-w16-h32": {"window_size": 16, "hidden_size": 32, "latent_size": 8},
    "size-w10-h32": {"window_size": 10, "hidden_size": 32, "latent_size": 8},
}
VARIANTS: dict[str, dict[str, object]] = {**FAMILIES, **SIZES}


def variant_settings(dataset: str, overrides: dict[str, object], max_epochs: int | None,
                     seed: int | None = None) -> Settings:
    """The dataset's profile with the variant's [model] overrides and the protocol's epoch cap and seed."""
    raw = copy.deepcopy(protocols.PROFILES[dataset])
    raw["model"] = {**raw.get("model", {}), **overrides}
    if seed is not None:
        raw.setdefault("training", {})["seed"] = seed
    if max_epochs is not None:
        training = raw.setdefault("training", {})
        training["epochs"] = min(int(training.get("epochs", TrainingSettings().epochs)), max_epochs)
    return build_settings(raw)


def variant_row(result: protocols.ProtocolResult) -> dict:
    """Accuracy plus cost of one variant on one dataset: training seconds (summed over the dataset's
    models) and scoring throughput (windows over seconds inside ``Detector.score_values``)."""
    train_s = sum(r.train_seconds for r in result.series)
    score_s = sum(r.score_seconds for r in result.series)
    windows = sum(r.windows_scored for r in result.series)
    return {**result.summary(), "train_seconds": round(train_s, 1), "windows_scored": windows,
            "score_seconds": round(score_s, 3), "windows_per_s": round(windows / score_s, 1) if score_s > 0 else None}


def run_variants(names: list[str], datasets_: list[str], *, max_epochs: int | None, smd_machines: int | None,
                 limit: int | None, out_path: Path, resume: bool, seed: int | None = None) -> dict:
    """Every (dataset, variant) pair under the same protocol; the JSON is rewritten after each pair,
    so a long run can be watched, and ``resume`` skips pairs already in it."""
    data = json.loads(out_path.read_text()) if resume and out_path.exists() else {}
    protocol = {"datasets": datasets_, "max_epochs": max_epochs, "smd_machines": smd_machines, "limit": limit,
                "torch_threads": torch.get_num_threads(), **({"seed": seed} if seed is not None else {}),
                # the profiles too: rows made under other settings (sensors, threshold rule) must not be mixed in
                "profiles": json.loads(json.dumps({d: protocols.PROFILES[d] for d in datasets_}))}
    if data and data.get("protocol") != protocol:
        raise SystemExit(f"{out_path} was made under another protocol ({data.get('protocol')}); not resuming")
    data = data or {"machine": _machine(), "protocol": protocol, "variants": {}, "results": {}}
    data["variants"].update({n: VARIANTS[n] for n in names})
    for name in datasets_:  # dataset-major: a cut-short run still compares every variant on the first datasets
        series = datasets.load_dataset(name, default_data_dir(name))
        if name == "smd" and smd_machines is not None:
            series = series[:smd_machines]
        if limit is not None:
            series = series[:limit]
        for variant in names:
            if name in data["results"].get(variant, {}):
                continue
            log.info("%s / %s: %d series", variant, name, len(series))
            settings = variant_settings(name, VARIANTS[variant], max_epochs, seed)
            started = time.perf_counter()
            result = protocols.run_protocol(name, series, settings, progress=lambda s: log.info("  %s", s))
            row = {**variant_row(result), "seconds": round(time.perf_counter() - started, 1),
                   "series": [s.name for s in series]}
            data["results"].setdefault(variant, {})[name] = row
            log.info("%s / %s: %s", variant, name, json.dumps({k: v for k, v in row.items() if k != "series"}))
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data


def _cost(row: dict | None) -> tuple[str, str]:
    if row is None:
        return "n/a", "n/a"
    wps = row.get("windows_per_s")
    return f"{row['train_seconds']:.0f}", "n/a" if wps is None else f"{wps:,.0f}"


def variants_markdown(data: dict, json_path: Path | str = "results/variants.json") -> str:
    """One table: a row per variant, accuracy on each dataset with its training seconds and scoring speed;
    the caption's command writes ``json_path``."""
    p, r = data["protocol"], data["results"]
    caps = []
    for name in p["datasets"]:  # what each dataset's protocol covered, from the rows themselves
        covered = next((rows[name]["series"] for rows in r.values() if name in rows), None)
        if covered is None:
            continue
        if name == "smd":
            caps.append(f"SMD: {len(covered)} machine(s) ({', '.join(covered)})"
                        + (f", the first {p['smd_machines']} of the 6 in the subset" if p.get("smd_machines") else ""))
        else:
            caps.append(f"{name.upper()}: {len(covered)} files")
    caps.append(f"epochs capped at {p['max_epochs']}" if p.get("max_epochs") else "the profiles' epochs and early stopping")
    if p.get("limit"):
        caps.append(f"only the first {p['limit']} series of each dataset")
    names = "all" if list(data["variants"]) == list(VARIANTS) else ",".join(data["variants"])
    command = [f"python -m pipelines.benchmark --variants {names}"]
    if p["datasets"] != ["skab", "nab", "smd"]:
        command.append("--datasets " + ",".join(p["datasets"]))
    if p.get("max_epochs"):
        command.append(f"--max-epochs {p['max_epochs']}")
    if p.get("smd_machines"):
        command.append(f"--smd-machines {p['smd_machines']}")
    if p.get("limit"):
        command.append(f"--limit {p['limit']}")
    if p.get("seed") is not None:
        command.append(f"--seed {p['seed']}")
    command.append(f"--threads {p['torch_threads']} --json {json_path} --update-readme")
    lines = [f"Every variant under one protocol: each dataset's profile (`PROFILES` in `anomaly/protocols.py`) "
             f"with the variant's `[model]` overrides; {'; '.join(caps)}; one training seed ({p.get('seed', 0)}); "
             f"{p['torch_threads']} torch thread(s) on {data['machine']['device'].upper()} "
             f"(torch {data['machine']['torch']}), a 2-core machine shared with other jobs, so seconds are rough. "
             f"Reproduce with `{' '.join(command)}`.", "",
             "Training s: all of a dataset's models together (one per SKAB or NAB file, one per SMD machine). "
             "Scoring: windows/s through `Detector.score_values` (batched forward pass and per-sensor errors). "
             "NAB: standard profile at NAB's *oracle* threshold; SMD F1 at our own threshold, best F1 *oracle*.", "",
             "| variant | `[model]` overrides | SKAB F1 | SKAB FAR, % | SKAB MAR, % | SKAB event F1 | NAB score | SMD F1 | SMD best F1 | "
             "train s (SKAB / NAB / SMD) | scoring windows/s (SKAB / NAB / SMD) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, overrides in data["variants"].items():
        rows = r.get(variant, {})
        skab, nab, smd = rows.get("skab"), rows.get("nab"), rows.get("smd")
        shown = ", ".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items()) or "(none: the profile's own)"
        costs = [_cost(rows.get(d)) for d in ("skab", "nab", "smd")]
        lines.append(
            f"| {variant} | {shown} | {_f(skab and skab['f1'], 3)} | {_f(skab and skab['far'])} | {_f(skab and skab['mar'])} | "
            f"{_f(skab and skab['event_f1'])} | {_f(nab and nab['nab_standard'], 1)} | {_f(smd and smd['f1'], 3)} | {_f(smd and smd['f1_best_mean'], 3)} | "
            f"{' / '.join(c[0] for c in costs)} | {' / '.join(c[1] for c in costs)} |")
    missing = [f"{v}/{d}" for v in data["variants"] for d in p["datasets"] if d not in r.get(v, {})]
    if missing:
        lines += ["", f"Not measured (run cut short): {', '.join(missing)}."]
    return "\n".join(lines)


COST_SHAPES = {"skab": (8, 10, 32, 8), "smd": (38, 32, 64, 16)}  # F, W, H, L: SKAB's 8 sensors (its profile reads 6), SMD's 38


def variant_costs(repeats: int = 5, batch: int = 256, score_windows: int = 4096) -> dict:
    """Per-variant cost on the profiles' model shapes, without data or early stopping: milliseconds per
    training step (forward, backward, Adam) on one batch and scoring windows/s in inference mode. The
    variants are measured interleaved and the best of ``repeats`` kept, so other load on the machine
    biases them alike."""
    from anomaly.model import ModelConfig, build_model

    out: dict = {}
    for shape, (F, W, H, L) in COST_SHAPES.items():
        models, best = {}, {}
        for name, overrides in FAMILIES.items():  # each at the profile's size
            torch.manual_seed(0)
            models[name] = build_model(ModelConfig(n_features=F, window_size=W, hidden_size=H, latent_size=L,
                                                   **overrides))  # type: ignore[arg-type]
            best[name] = [math.inf, math.inf]
        x_train, x_score = torch.randn(batch, W, F), torch.randn(score_windows, W, F)
        for _ in range(repeats):
            for name, model in models.items():
                opt = torch.optim.Adam(model.parameters())
                model.train()
                started = time.perf_counter()
                for _ in range(3):
                    opt.zero_grad()
                    (model(x_train) - x_train).pow(2).mean().backward()
                    opt.step()
                best[name][0] = min(best[name][0], (time.perf_counter() - started) / 3)
                model.eval()
                with torch.inference_mode():
                    started = time.perf_counter()
                    model(x_score)
                    best[name][1] = min(best[name][1], time.perf_counter() - started)
        out[shape] = {name: {"train_step_ms": round(1e3 * t, 2), "score_windows_per_s": round(score_windows / s)}
                      for name, (t, s) in best.items()}
    return out


def costs_markdown(costs: dict) -> str:
    shapes = list(costs)
    head = " | ".join(f"{s.upper()} shape ({'×'.join(map(str, COST_SHAPES[s][:2]))}, hidden {COST_SHAPES[s][2]}): "
                      f"train step, ms | scoring, windows/s" for s in shapes)
    lines = [f"| variant | {head} |", "| --- |" + " --- | --- |" * len(shapes)]
    for name in FAMILIES:
        cells = " | ".join(f"{costs[s][name]['train_step_ms']:.1f} | {costs[s][name]['score_windows_per_s']:,}"
                           for s in shapes)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": platform.processor() or platform.machine()}


def _f(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(data: dict) -> str:
    r = data["results"]
    lines = ["Reproduce with `python -m pipelines.benchmark --update-readme` (or `make benchmark`); "
             f"measured on {data['machine']['device'].upper()}, torch {data['machine']['torch']}. "
             "Our thresholds are fitted on each series' own training data unless marked *oracle* (NAB's own row: one "
             "fixed level for every file).", ""]
    if "skab" in r:
        s = r["skab"]
        lines += ["**SKAB** (34 files; train on the first 400 rows of each, score the rest; point-wise, "
                  "micro-aggregated, as SKAB's `chp_score(metric=\"binary\")`)", "",
                  "| detector | F1 | FAR, % | MAR, % | event F1 | Fc1 | mean delay, s |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| **anomaly (ours)** | **{_f(s['f1'])}** | **{_f(s['far'])}** | **{_f(s['mar'])}** | "
                  f"{_f(s['event_f1'])} | {_f(s.get('fc1'))} | {_f(s['mean_delay_s'], 1)} |"]
        trivial = s.get("all_anomalous")
        lines += [f"| {n} | {f1} | {far} | {mar} | | | |" for n, f1, far, mar in SKAB_PUBLISHED
                  if not (trivial and n.startswith("All-anomalous"))]
        if trivial:
            lines += [f"| All-anomalous (trivial), measured | {_f(trivial['f1'], 3)} | {_f(trivial['far'])} | "
                      f"{_f(trivial['mar'])} | {_f(trivial['event_f1'])} | {_f(trivial['fc1'])} | "
                      f"{_f(trivial['mean_delay_s'], 1)} |", "",
                      "Event F1 counts an event found when a flagged run overlaps it, so flagging every row scores "
                      "1.00 on it; Fc1 (Garg et al. 2021: the harmonic mean of point precision and event recall) "
                      "charges the false rows. The published entries report point figures only."]
        sensors = s.get("settings", {}).get("data", {}).get("sensors")
        if sensors:
            from anomaly.datasets import SKAB_SENSORS

            th = s["settings"].get("threshold", {})
            left = [x for x in SKAB_SENSORS if x not in sensors]
            fixed = not (th.get("adaptive_rows") or th.get("episode_drop"))
            lines += ["", f"Our SKAB model reads {len(sensors)} of SKAB's {len(SKAB_SENSORS)} sensors (the SKAB profile's "
                      f"`[data] sensors`: {', '.join(f'`{x}`' for x in sensors)}; left out: "
                      f"{', '.join(f'`{x}`' for x in left) or 'none'}, a choice made on SKAB itself)"
                      + (f" and flags a row above its validation threshold (q{th.get('q')} × {th.get('scale')}), "
                         "fixed: causal, no warm-up, whenever the fault comes" if fixed else "")
                      + " (README \"SKAB: six sensors\")."]
        adaptive = s.get("settings", {}).get("threshold", {}).get("adaptive_rows")
        if adaptive:
            th = s["settings"]["threshold"]
            lines += ["", f"Our SKAB threshold adapts to each file's own recent scores (the SKAB profile's "
                      f"`[threshold] adaptive_rows = {adaptive}`, factor {th.get('adaptive_factor')}, lag "
                      f"{th.get('adaptive_lag')}: a row alarms above both the validation threshold and "
                      f"{th.get('adaptive_factor')} × the median of its file's scores {th.get('adaptive_lag') + 1} to "
                      f"{th.get('adaptive_lag') + adaptive} rows back; causal). Those three numbers were chosen on "
                      "SKAB's test rows, and the rule does not carry to SMD (see \"A threshold that adapts\" below). "
                      f"The row also rests on SKAB's layout: the bar first acts {th.get('adaptive_lag') + adaptive} rows "
                      "after the deploy, close to where SKAB's faults end (test row 571, median); a worker that was "
                      "already running when a fault began would hold the fault's late rows too (`python -m "
                      "pipelines.skab_tradeoff`, the lines `adaptive, warm start`; README \"What the adaptive rule's "
                      "SKAB figures rest on\")."]
        lines.append("")
    if "nab" in r:
        s = r["nab"]
        lines += ["**NAB** v1.1 (58 files; train on each file's probationary period, score every row; "
                  "NAB's threshold is an *oracle* chosen on the labels, as in NAB's own scoreboard)", "",
                  "| detector | standard | reward low FP | reward low FN |", "| --- | --- | --- | --- |",
                  f"| **anomaly (ours), oracle threshold** | **{_f(s['nab_standard'], 1)}** | **{_f(s['nab_low_fp'], 1)}** | "
                  f"**{_f(s['nab_low_fn'], 1)}** |",
                  f"| anomaly (ours), own fixed level (1.2 × the record) | {_f(s['nab_standard_own_threshold'], 1)} | "
                  f"{_f(s['nab_low_fp_own_threshold'], 1)} | {_f(s['nab_low_fn_own_threshold'], 1)} |"]
        lines += [f"| {n} | {a} | {b} | {c} |" for n, a, b, c in NAB_PUBLISHED]
        lines += ["", f"Event-wise (after probation): precision {_f(s['event_precision'])}, recall "
                  f"{_f(s['event_recall'])}, F1 {_f(s['event_f1'])}, mean delay {_f(s['mean_delay_s'], 0)} s (from each "
                  "labelled window's start: NAB's windows open a median 16.5 h before the anomaly they are "
                  "labelled for).", ""]
    if "smd" in r:
        s = r["smd"]
        lines += [f"**SMD subset** (machines 1-2 … 1-7, {s.get('machines')} machines; train on `train`, score `test`; "
                  "point-wise, no point adjustment, pooled counts)", "",
                  "| detector | F1 (own threshold) | precision | recall | best F1 (*oracle*, mean over machines) | event F1 |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| **anomaly (ours)** | **{_f(s['f1'])}** | {_f(s['precision'])} | {_f(s['recall'])} | "
                  f"{_f(s['f1_best_mean'])} | {_f(s['event_f1'])} |",
                  "| LSTM-AE, Garg et al. 2021 (all 28 machines, oracle threshold) | | | | 0.43–0.46 | |", "",
                  "The published SMD figure covers 28 machines; ours covers 6 (anomaly rates 0.4–15.7 %): not directly comparable.", ""]
        if s.get("hit_rate_100") is not None:
            lines += attribution_markdown(s)
    missing = [name.upper() for name in ("skab", "nab", "smd") if name not in r]
    if missing:
        lines += [f"Not measured in this run: {', '.join(missing)} (`python -m pipelines.benchmark --datasets "
                  f"{','.join(m.lower() for m in missing)}`).", ""]
    lines += ["The per-dataset settings (`PROFILES` in `anomaly/protocols.py`) were chosen on these benchmarks "
              "themselves, as leaderboard entries usually are. The NAB row scores each row by the highest of three "
              "signals, each against the largest of its own recent past (`calibration.record_ratio`): the error of "
              "the newest step of the model's window, how far the last 190 rows lie from every earlier stretch "
              "of the file (`novelty.window_novelty`, nearest-neighbour distance), and how surprising the newest "
              "change is after the change before it, under counts of the file's own earlier changes "
              "(`transitions.transition_surprise`, learned online); a value beyond the range seen so far scores 1 "
              "(Numenta's rule, tolerance 0.05); each excursion, and each new high or new low, is reported once "
              "(`protocols.nab_calibrated`), past only. What each part is worth, and how much survives choosing "
              "the transition surprise's bins on half of the files: `python -m pipelines.nab_ablation --heldout` "
              "(README \"NAB: what each step of the score chain is worth\").", ""]
    seconds = {k: v["seconds"] for k, v in r.items()}
    lines.append(f"Run time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}.")
    return "\n".join(lines)


# TranAD's diagnosis table (Tuli et al., PVLDB 15(6) 2022), its own code's protocol: machine-1-1 only, every
# labelled row, k = round(P% x labelled).
ATTRIBUTION_PUBLISHED = [("TranAD (machine-1-1; Tuli et al. 2022, as quoted, unchecked)", "0.50", "0.64", "0.49", "0.62")]


def attribution_markdown(s: dict) -> list[str]:
    """The SMD attribution table: which sensors the events would name, against ``interpretation_label``."""
    lines = ["Which sensors an event names (SMD's `interpretation_label`: the sensors labelled responsible for "
             f"each anomaly; {s['attribution_rows']} labelled rows): each row's sensors ranked by their share of "
             "the window's reconstruction error, as events list them; HitRate@P% is the share of the labelled "
             "sensors among the top round(P% × labelled), NDCG@P% weighs them by rank (TranAD's `diagnosis.py`).",
             "", "| detector | HitRate@100% | HitRate@150% | NDCG@100% | NDCG@150% | HitRate@100%, flagged rows only |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| **anomaly (ours)** | **{_f(s['hit_rate_100'])}** | **{_f(s['hit_rate_150'])}** | {_f(s['ndcg_100'])} | "
             f"{_f(s['ndcg_150'])} | {_f(s['hit_rate_100_flagged'])} ({s['attribution_flagged_rows']} rows) |"]
    lines += [f"| {n} | {a} | {b} | {c} | {d} | |" for n, a, b, c, d in ATTRIBUTION_PUBLISHED]
    lines += ["", "TranAD's figures are as quoted from its paper's diagnosis table (secondary sources; the paper itself "
              "was not at hand), on the one machine its code reads (1-1, not in our subset): not directly comparable. OmniAnomaly's and InterFusion's \"interpretation accuracy\" "
              "(0.87-0.89) counts only the rows they detected and takes floor(P% × labelled): another measure.", ""]
    return lines


def update_readme(text: str, readme: Path = Path("README.md"), marker: str = "benchmark") -> None:
    """Replace what lies between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = readme.read_text(encoding="utf-8")
    if start not in content or end not in content:
        raise SystemExit(f"{readme} lacks the markers {start} ... {end}")
    head, _, rest = content.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")


def report(args: argparse.Namespace, measure: Callable[[], dict], render: Callable[[dict], str],
           marker: str | Callable[[dict], str] = "benchmark") -> int:
    """The benchmarks' common ending: the figures from ``--from-json`` or from ``measure()`` (then written
    to ``--json``), rendered, printed, and with ``--update-readme`` put between the README's ``marker``s
    (``marker`` may be a function of the figures: which section they belong in)."""
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = measure()
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
    text = render(data)
    print(text)
    if args.update_readme:
        update_readme(text, marker=marker(data) if callable(marker) else marker)
    return 0


VARIANT_ONLY = ("max_epochs", "smd_machines", "seed", "resume")  # flags that mean something with --variants only
NOT_WITH_COSTS = ("limit", "update_readme", "from_json", "variants", *VARIANT_ONLY)


DATASETS = ("skab", "nab", "smd")  # what the README's benchmark section holds, every one of them


def _check_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags the chosen mode would ignore (silently running something else than asked)."""
    given = [name for name in NOT_WITH_COSTS if getattr(args, name) not in (None, False)]
    if args.costs and (given or args.datasets != parser.get_default("datasets")):
        parser.error(f"--costs times the profiles' shapes without data; it does not take "
                     f"{', '.join('--' + n.replace('_', '-') for n in given) or '--datasets'}")
    stray = [name for name in VARIANT_ONLY if getattr(args, name) not in (None, False)]
    if not args.costs and not args.variants and stray:
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in stray)} only apply with --variants (the "
                     "accuracy benchmark runs each dataset's profile as it is)")
    if args.limit is not None and args.update_readme and not args.variants:
        parser.error("--limit with --update-readme would put a partial run under the full corpus's caption; "
                     "write it with --json and look at it instead")
    if args.update_readme and not args.variants and not args.from_json \
            and set(args.datasets.split(",")) != set(DATASETS):
        parser.error(f"--update-readme rewrites the whole section, every dataset's table: --datasets "
                     f"{args.datasets} would drop the others'; run all of {','.join(DATASETS)}, or write --json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="skab,nab,smd", help="comma-separated: skab, nab, smd")
    parser.add_argument("--json", default="results/benchmark.json", help="where to write the figures")
    parser.add_argument("--limit", type=positive_int, help="only the first N series of each dataset (a quick look)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's benchmark section")
    parser.add_argument("--from-json", help="do not run; render the README section from this results file")
    parser.add_argument("--variants", help=f"compare model variants instead: 'all' or comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--max-epochs", type=positive_int, help="variants: cap every profile's epochs at N")
    parser.add_argument("--smd-machines", type=positive_int, help="variants: only the first N SMD machines")
    parser.add_argument("--costs", action="store_true",
                        help="only time each variant's training step and scoring on the profiles' shapes (no data)")
    parser.add_argument("--seed", type=int, help="variants: training seed for every model (default: the profiles')")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--resume", action="store_true", help="variants: keep the pairs already in --json, run the rest")
    args = parser.parse_args(argv)
    _check_modes(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.costs:
        costs = {"machine": _machine(), "torch_threads": torch.get_num_threads(), "shapes": variant_costs()}
        out = Path(args.json if args.json != parser.get_default("json") else "results/variant_costs.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(costs, indent=2) + "\n")
        print(costs_markdown(costs["shapes"]))
        return 0
    if args.variants:
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        out_path = Path(args.json if args.json != parser.get_default("json") else "results/variants.json")
        if args.from_json:
            data = json.loads(Path(args.from_json).read_text())
        else:
            if out_path.exists() and not args.resume:  # the first pair's write would replace a whole earlier run
                parser.error(f"{out_path} holds an earlier variants run: --resume continues it; to start over, "
                             "remove it or give another --json")
            data = run_variants(names, args.datasets.split(","), max_epochs=args.max_epochs,
                                smd_machines=args.smd_machines, limit=args.limit, out_path=out_path, resume=args.resume,
                                seed=args.seed)
        text = variants_markdown(data, json_path=args.from_json or out_path)
        print(text)
        if args.update_readme:
            update_readme(text, marker="variants")
        return 0
    if args.from_json and args.update_readme:
        unfit = unpublishable(json.loads(Path(args.from_json).read_text()))
        if unfit:
            parser.error(f"--from-json {args.from_json} with --update-readme: {unfit}")
    return report(args, lambda: run(args.datasets.split(","), args.limit), markdown)


def unpublishable(data: dict) -> str | None:
    """Why a results file cannot be the README's benchmark section (None: it can): a run of some of the
    datasets (the section would lose the others' tables), or of the first N series only (``--limit``)."""
    missing = [name for name in DATASETS if name not in data.get("results", {})]
    if missing:
        return f"it holds no {', '.join(missing)} results (the section would lose their tables)"
    if data.get("limit") is not None:
        return f"it is a --limit {data['limit']} run (a partial run under the full corpus's caption)"
    return None


if __name__ == "__main__":
    sys.exit(main())
