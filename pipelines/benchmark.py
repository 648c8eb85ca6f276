"""The accuracy benchmark: the full protocol on SKAB, NAB and the SMD subset, side by side with the
published numbers, written to results/benchmark.json and (with --update-readme) into README.md.

    python -m pipelines.benchmark [--datasets skab,nab,smd] [--json OUT] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from anomaly import datasets, protocols
from anomaly.cli import default_data_dir

log = logging.getLogger("benchmark")

# Published numbers (SKAB README leaderboard, outlier problem; NAB README scoreboard).
SKAB_PUBLISHED = [("Conv-AE", 0.78, 13.55, 28.02), ("MSET", 0.78, 39.73, 14.13),
                  ("T-squared+Q (PCA-based)", 0.76, 26.62, 24.92), ("LSTM-AE (SKAB's)", 0.74, 29.96, 25.92),
                  ("T-squared", 0.66, 19.21, 42.6), ("LSTM-VAE", 0.56, 9.13, 55.03),
                  ("All-anomalous (trivial)", 0.698, 100.0, 0.0)]
NAB_PUBLISHED = [("ARTime", 74.9, 65.1, 80.4), ("Numenta HTM", 70.5, 62.6, 75.2), ("CAD OSE", 69.9, 67.0, 73.2),
                 ("KNN CAD", 58.0, 43.4, 64.8), ("Random Cut Forest", 51.7, 38.4, 59.7), ("Random", 11.0, 1.2, 19.5)]


def run(names: list[str], limit: int | None) -> dict:
    out = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": platform.processor() or platform.machine()},
           "results": {}}
    for name in names:
        series = datasets.load_dataset(name, default_data_dir(name))
        if limit:
            series = series[:limit]
        log.info("%s: %d series", name, len(series))
        started = time.perf_counter()
        result = protocols.run_protocol(name, series, progress=lambda s: log.info("  %s", s))
        out["results"][name] = {**result.summary(), "seconds": round(time.perf_counter() - started, 1),
                                "settings": protocols.PROFILES[name]}
        log.info("%s: %s", name, json.dumps(result.summary()))
    return out


def _f(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(data: dict) -> str:
    r = data["results"]
    lines = ["Reproduce with `python -m pipelines.benchmark --update-readme` (or `make benchmark`); "
             f"measured on {data['machine']['device'].upper()}, torch {data['machine']['torch']}. "
             "Our thresholds are fitted on each series' own training data unless marked *oracle*.", ""]
    if "skab" in r:
        s = r["skab"]
        lines += ["**SKAB** (34 files; train on the first 400 rows of each, score the rest; point-wise, "
                  "micro-aggregated, as SKAB's `chp_score(metric=\"binary\")`)", "",
                  "| detector | F1 | FAR, % | MAR, % | event F1 | mean delay, s |", "| --- | --- | --- | --- | --- | --- |",
                  f"| **anomaly (ours)** | **{_f(s['f1'])}** | **{_f(s['far'])}** | **{_f(s['mar'])}** | "
                  f"{_f(s['event_f1'])} | {_f(s['mean_delay_s'], 1)} |"]
        lines += [f"| {n} | {f1} | {far} | {mar} | | |" for n, f1, far, mar in SKAB_PUBLISHED]
        lines.append("")
    if "nab" in r:
        s = r["nab"]
        lines += ["**NAB** v1.1 (58 files; train on each file's probationary period, score every row; "
                  "NAB's threshold is an *oracle* chosen on the labels, as in NAB's own scoreboard)", "",
                  "| detector | standard | reward low FP | reward low FN |", "| --- | --- | --- | --- |",
                  f"| **anomaly (ours), oracle threshold** | **{_f(s['nab_standard'], 1)}** | **{_f(s['nab_low_fp'], 1)}** | "
                  f"**{_f(s['nab_low_fn'], 1)}** |",
                  f"| anomaly (ours), own fitted threshold | {_f(s['nab_standard_own_threshold'], 1)} | "
                  f"{_f(s['nab_low_fp_own_threshold'], 1)} | {_f(s['nab_low_fn_own_threshold'], 1)} |"]
        lines += [f"| {n} | {a} | {b} | {c} |" for n, a, b, c in NAB_PUBLISHED]
        lines += ["", f"Event-wise (after probation): precision {_f(s['event_precision'])}, recall "
                  f"{_f(s['event_recall'])}, F1 {_f(s['event_f1'])}, mean delay {_f(s['mean_delay_s'], 0)} s.", ""]
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
    missing = [name.upper() for name in ("skab", "nab", "smd") if name not in r]
    if missing:
        lines += [f"Not measured in this run: {', '.join(missing)} (`python -m pipelines.benchmark --datasets "
                  f"{','.join(m.lower() for m in missing)}`).", ""]
    lines += ["The per-dataset settings (`PROFILES` in `anomaly/protocols.py`) were chosen on these benchmarks "
              "themselves, as leaderboard entries usually are; the NAB row calibrates our reconstruction errors "
              "against their own trailing history (`anomaly/calibration.py`), past only.", ""]
    seconds = {k: v["seconds"] for k, v in r.items()}
    lines.append(f"Run time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}.")
    return "\n".join(lines)


def update_readme(text: str, readme: Path = Path("README.md")) -> None:
    start, end = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
    content = readme.read_text(encoding="utf-8")
    head, _, rest = content.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="skab,nab,smd", help="comma-separated: skab, nab, smd")
    parser.add_argument("--json", default="results/benchmark.json", help="where to write the figures")
    parser.add_argument("--limit", type=int, help="only the first N series of each dataset (a quick look)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's benchmark section")
    parser.add_argument("--from-json", help="do not run; render the README section from this results file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = run(args.datasets.split(","), args.limit)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
    text = markdown(data)
    print(text)
    if args.update_readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
