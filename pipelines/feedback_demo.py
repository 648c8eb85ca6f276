"""Operators' verdicts, end to end, on real data: does a retrain learn what an operator calls normal?

    python -m pipelines.feedback_demo [--data-dir DIR] [--json OUT] [--keep DIR]

A champion is trained on SKAB's valve experiments (`anomaly train --dataset skab --promote`: the first 400
rows of valve1/0, valve1/1, valve2/0 and valve2/1, the SKAB profile). Three experiments are replayed into
a topic of a local broker: valve1/0 and valve1/1, and other/9, which runs the pump at another operating
point (its flow about four times the valves'). A worker scores them; the champion alarms on every row of
other/9, labelled normal or not. Then:

1. `anomaly retrain` with no verdicts: the champion's flags keep all of other/9 out of the challenger's
   training, so it cannot learn that operating point.
2. back to the first champion; an operator's verdicts with `anomaly feedback`: each closed event of the
   valves, `anomaly` where SKAB labels a fault in the rows its windows cover, else `normal` (by the start
   of its id, as `anomaly up` prints it); for other/9, whose one event never closes, its timeline: `normal`
   on the stretches SKAB labels normal, `anomaly` on its labelled fault.
3. `anomaly retrain` again: the challenger trains on other/9's normal stretches, not on its fault. The gate
   weighs the verdicts: fewer false alarms on readings called normal count as better, where the challenger
   still alarms in every period called an anomaly that the champion alarms in.
4. where that gate kept it for a missed period, the operator's trade: `anomaly retrain` once more with
   `retrain.max_found_decrease = 0.34` (one period in three may be missed).

Each challenger, and the champion, then score other/9 and valve1/0 (`anomaly score` on the files, FAR/MAR
and F1 against SKAB's labels). Every step is the `anomaly` command in a process of its own, against a real
broker (Tansu) and a real MLflow store (SQLite), as an operator would run them. About 3 minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


log = logging.getLogger("pipelines.feedback_demo")

SERIES = {"valve10": "valve1/0", "valve11": "valve1/1", "other9": "other/9"}  # replay --entity -> series
SCORED = ("other/9", "valve1/0")


def _anomaly(env: dict[str, str], *args: str, check: bool = True, timeout: float = 900) -> str:
    """One `anomaly` command in its own process; its stdout."""
    done = subprocess.run([sys.executable, "-m", "anomaly.cli", "--log-level", "WARNING", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"anomaly {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def skab_series(data_dir: Path) -> dict[str, Any]:
    """SKAB's labelled series by name (``datasets.load_skab``: labels per row, the file in ``meta["path"]``)."""
    from anomaly.datasets import load_skab

    return {s.name: s for s in load_skab(data_dir)}


def _json_tail(text: str) -> dict[str, Any]:
    return json.loads(text[text.index("{"):]) if "{" in text else {}


def give_verdicts(env: dict[str, str], skab: dict[str, Any], window: int) -> dict[str, int]:
    """The operator's verdicts (module docstring, step 2), sent with `anomaly feedback`; how many of each."""
    from anomaly import kafka_io
    from anomaly.codec import decode_event, epoch_seconds_of

    bootstrap = env["ANOMALY_KAFKA__BOOTSTRAP_SERVERS"]
    last: dict[str, dict[str, Any]] = {}
    for record in kafka_io.read_all(bootstrap, env["ANOMALY_KAFKA__EVENTS_TOPIC"], timeout_s=60, idle_s=2):
        event = decode_event(record.value)
        if event["event_id"] not in last or event["status"] == "closed":
            last[event["event_id"]] = event
    first: dict[str, float] = {}
    for record in kafka_io.read_all(bootstrap, env["ANOMALY_KAFKA__INPUT_TOPIC"], timeout_s=120, idle_s=2):
        doc = json.loads(record.value)
        first.setdefault(doc["entity"], float(epoch_seconds_of(doc["ts"])))
    given = {"normal": 0, "anomaly": 0}
    for event in last.values():
        entity = event["entity"]
        if event["status"] != "closed" or entity == "other9-0":
            continue
        labels = skab[SERIES[entity.rsplit("-", 1)[0]]].labels
        a = int(round(event["start_ts"] - first[entity])) - (window - 1)
        b = int(round(event["end_ts"] - first[entity]))
        verdict = "anomaly" if labels[max(a, 0):b + 1].any() else "normal"
        _anomaly(env, "feedback", verdict, event["event_id"][:8], "--by", "demo",
                 "--note", f"SKAB labels rows {max(a, 0)}-{b} of {SERIES[entity.rsplit('-', 1)[0]]}")
        given[verdict] += 1
    labels = skab["other/9"].labels
    t0 = first["other9-0"]
    edges = [0, *(i for i in range(1, len(labels)) if labels[i] != labels[i - 1]), len(labels)]
    for a, b in zip(edges, edges[1:]):
        verdict = "anomaly" if labels[a] else "normal"
        _anomaly(env, "feedback", verdict, "--entity", "other9-0", "--start", str(t0 + a), "--end",
                 str(t0 + b - 1), "--by", "demo", "--note", f"other/9 rows {a}-{b - 1}")
        given[verdict] += 1
    return given


def score(env: dict[str, str], skab: dict[str, Any], version: str) -> dict[str, dict[str, Any]]:
    out = {}
    for series in SCORED:
        doc = _json_tail(_anomaly(env, "score", "--data", skab[series].meta["path"],
                                  "--model-alias", version, "--quiet"))
        ev = doc.get("evaluation", {})
        out[series] = {k: ev.get(k) for k in ("far", "mar", "f1")}
    return out


def run(data_dir: Path, state: Path) -> dict[str, Any]:
    from anomaly.broker import LocalBroker
    from anomaly.protocols import PROFILES

    skab = skab_series(data_dir)
    env = {**os.environ, "ANOMALY_MLFLOW__TRACKING_URI": f"sqlite:///{state}/mlflow.db",
           "ANOMALY_MLFLOW__ARTIFACT_LOCATION": str(state / "artifacts"), "ANOMALY_MLFLOW__LOCK_DIR": str(state / "locks"),
           "ANOMALY_SCHEDULER__JOB_STORE": str(state / "scheduler.db"), "ANOMALY_WORKER__MAX_FUTURE_S": "-1",
           "ANOMALY_WORKER__METRICS_PORT": "-1", "ANOMALY_KAFKA__INPUT_TOPIC": "demo.sensors",
           "ANOMALY_KAFKA__EVENTS_TOPIC": "demo.events", "ANOMALY_KAFKA__DLQ_TOPIC": "demo.dlq",
           "ANOMALY_KAFKA__FEEDBACK_TOPIC": "demo.feedback", "ANOMALY_DATASETS": str(data_dir.parent),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    started = time.monotonic()
    with LocalBroker(log_path=state / "broker.log") as broker:
        env["ANOMALY_KAFKA__BOOTSTRAP_SERVERS"] = broker.bootstrap
        log.info("training the champion on SKAB's valve experiments")
        champion = _json_tail(_anomaly(env, "train", "--dataset", "skab", "--data-dir", str(data_dir), "--promote",
                                       "--quiet"))["version"]
        for entity, series in SERIES.items():
            _anomaly(env, "replay", "--dataset", "skab", "--data-dir", str(data_dir), "--series", series,
                     "--entity", entity, "--quiet")
        log.info("scoring the replayed readings with a worker")
        _anomaly(env, "worker", "--idle-stop-s", "20", timeout=900)
        log.info("retrain without verdicts")
        without = _json_tail(_anomaly(env, "retrain", "--quiet", check=False))
        _anomaly(env, "models", "promote", str(champion), "--reason", "demo: back to the first champion")
        log.info("the operator's verdicts")
        given = give_verdicts(env, skab, int(PROFILES["skab"]["model"]["window_size"]))
        log.info("retrain with verdicts: %s", given)
        with_verdicts = _json_tail(_anomaly(env, "retrain", "--quiet", check=False))
        outcomes = [("without_verdicts", without), ("with_verdicts", with_verdicts)]
        if with_verdicts.get("status") == "kept" and "finds fewer labelled anomalies" in str(with_verdicts.get("reason")):
            log.info("retrain with verdicts, one missed period in three accepted (retrain.max_found_decrease 0.34)")
            outcomes.append(("missed_period_accepted", _json_tail(_anomaly(
                {**env, "ANOMALY_RETRAIN__MAX_FOUND_DECREASE": "0.34"}, "retrain", "--quiet", check=False))))
        results: dict[str, Any] = {"verdicts_given": given, "champion": {"version": champion,
                                                                           "scores": score(env, skab, champion)}}
        for name, outcome in outcomes:
            keys = ("rows", "rows_excluded", "flagged_windows", "train_rows", "labelled_rows", "verdicts_normal",
                    "verdicts_anomaly", "verdict_normal_readings", "verdict_anomaly_readings")
            entry: dict[str, Any] = {"status": outcome.get("status"), "reason": outcome.get("reason"),
                                     "data": {k: v for k, v in (outcome.get("data") or {}).items() if k in keys},
                                     "metrics": outcome.get("metrics")}
            if outcome.get("challenger_version"):
                entry["version"] = outcome["challenger_version"]
                entry["scores"] = score(env, skab, outcome["challenger_version"])
            results[name] = entry
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def table(results: dict[str, Any]) -> str:
    rows = ["| model | trained on other/9 rows | other/9 FAR % | other/9 MAR % | other/9 F1 | valve1/0 FAR % | valve1/0 MAR % | valve1/0 F1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, label in (("champion", "champion (valves only)"), ("without_verdicts", "challenger, no verdicts"),
                        ("with_verdicts", "challenger, with verdicts"),
                        ("missed_period_accepted", "challenger, with verdicts, a missed period accepted")):
        if name == "missed_period_accepted" and name not in results:
            continue
        entry = results.get(name) or {}
        s = entry.get("scores")
        if not s:
            rows.append(f"| {label} | | {entry.get('status')}: {entry.get('reason')} | | | | | |")
            continue
        trained = {"champion": "none", "without_verdicts": "none (all flagged)",
                   "with_verdicts": "its normal stretches", "missed_period_accepted": "its normal stretches"}[name]
        o, v = s["other/9"], s["valve1/0"]
        rows.append(f"| {label} v{entry['version']} | {trained} | {o['far']:.1f} | {o['mar']:.1f} | {o['f1']:.3f} | "
                    f"{v['far']:.1f} | {v['mar']:.1f} | {v['f1']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from anomaly.cli import default_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="SKAB's directory (default $ANOMALY_DATASETS/skab or ../shared/datasets/skab)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--keep", help="keep the MLflow store, broker log and artifacts in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir("skab")
    if args.keep:
        state = Path(args.keep)
        state.mkdir(parents=True, exist_ok=True)
        results = run(data_dir, state)
    else:
        with tempfile.TemporaryDirectory(prefix="feedback-demo-") as tmp:
            results = run(data_dir, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    for name in ("without_verdicts", "with_verdicts", "missed_period_accepted"):
        if name not in results:
            continue
        entry = results[name]
        print(f"\nretrain {name.replace('_', ' ')}: {entry['status']}: {entry['reason']}\n  {entry['data']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
