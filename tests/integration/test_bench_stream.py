"""The streaming benchmark script runs end to end in its --quick configuration and reports sane numbers.

Not a timed test: it checks the shape and plausibility of the JSON, never the targets (the benchmark
prints PASS/FAIL beside them; on a busy CI machine they may well fail).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomaly.broker import BrokerError, tansu_binary
from tests.fixtures import missing_requirement
from pipelines.bench_stream import START_TS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    try:
        tansu_binary()
    except BrokerError as exc:
        missing_requirement(f"the benchmark needs the local broker: {exc}")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pipelines.bench_stream", "--quick", "--decompose", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_figure(quick_result):
    r, stdout = quick_result
    for key in ("raw_msgs_per_s", "worker_msgs_per_s", "ratio", "p50_ms", "p99_ms", "load_msgs_per_s"):
        assert _positive(r[key]), (key, r[key])
    assert r["ratio"] == pytest.approx(r["worker_msgs_per_s"] / r["raw_msgs_per_s"])
    rounds = r["throughput_detail"]["rounds"]
    assert r["ratio_median_round"] == pytest.approx(np.median([x["worker_msgs_per_s"] / x["raw_msgs_per_s"]
                                                               for x in rounds]))
    assert r["p50_ms"] <= r["p99_ms"]
    # Context the numbers cannot be read without.
    assert r["messages"] == 20_000 and r["entities"] == 100 and r["offered_rate"] == 1000
    assert r["stride"] >= 1 and r["cpu_count"] >= 1 and r["torch"] and r["device"] in ("cpu", "cuda")
    assert r["latency_target_ms"] == pytest.approx(100 + r["stride"] * r["period_s"] * 1000)
    # The worker really scored: every reading consumed, a window at each stride-aligned slot after the
    # first W-1 of each entity (100 entities × 200 readings on consecutive slots).
    detail = r["throughput_detail"]
    k = np.arange(200)
    slots = np.floor((START_TS + k * r["period_s"]) / r["period_s"] + 0.5).astype(np.int64)
    per_entity = int(((k >= r["window_size"] - 1) & (slots % r["stride"] == 0)).sum())
    assert detail["windows_scored"] == 100 * per_entity > 0
    assert len(detail["rounds"]) >= 1 and r["raw_msgs_per_s"] == max(x["raw_msgs_per_s"] for x in detail["rounds"])
    assert r["latency_detail"]["windows"] > 0
    # --decompose: the same worker with a GIL-free stand-in of the forward pass and with no model.
    d = r["decomposition"]
    assert _positive(d["forward_us_per_window"]) and d["forward_us_per_window"] == r["forward_us_per_window"]
    for kind in ("busy", "none"):
        assert _positive(d[f"worker_{kind}_msgs_per_s"])
        assert d[f"ratio_{kind}"] == pytest.approx(d[f"worker_{kind}_msgs_per_s"] / r["raw_msgs_per_s"])
        assert all(_positive(x[f"worker_{kind}_msgs_per_s"]) for x in detail["rounds"])
    assert "no model" in stdout
    # Human table with the targets judged, never asserted.
    assert "ratio worker/raw" in stdout and ("PASS" in stdout or "FAIL" in stdout)


def test_quick_run_reports_peak_memory_per_entity_count(quick_result):
    r, _ = quick_result
    peaks, baselines = r["peak_rss_mb"], r["rss_baseline_mb"]
    assert set(peaks) == {"1", "10", "100"}
    for count, peak in peaks.items():
        # A worker process holds Python, torch and kafka-python: tens to hundreds of MB, never GBs,
        # and its peak is at least what it held before consuming.
        assert 50 < peak < 4000, (count, peak)
        assert peak >= baselines[count] - 1
        assert r["memory_detail"][count]["entities_held"] == int(count)


def test_quick_run_counts_the_scoring_child_in_peak_memory(quick_result):
    from anomaly.step_runner import usable_cpus

    r, _ = quick_result
    for count, detail in r["memory_detail"].items():
        if count == "readings_per_entity":
            continue
        if usable_cpus() < 2:  # the worker scores in its own process: nothing to add
            assert detail["scoring_peak_mb"] is None
            continue
        # Both processes' peaks, added: the child holds the model and the window buffers.
        assert 50 < detail["scoring_peak_mb"] < 4000
        assert r["peak_rss_mb"][count] == pytest.approx(detail["main_peak_mb"] + detail["scoring_peak_mb"], abs=0.2)
        assert 0 < detail["pss_at_end_mb"] < r["peak_rss_mb"][count]


def test_a_round_that_dead_lettered_or_scored_nothing_is_refused():
    from types import SimpleNamespace

    from pipelines.bench_stream import check_scored

    check_scored(SimpleNamespace(dead_letters=0, windows_scored=120), 500)
    with pytest.raises(RuntimeError, match="dead-lettered 500 of 500 readings"):
        check_scored(SimpleNamespace(dead_letters=500, windows_scored=0), 500)
    with pytest.raises(RuntimeError, match="scored 0 windows"):
        check_scored(SimpleNamespace(dead_letters=0, windows_scored=0), 500)
