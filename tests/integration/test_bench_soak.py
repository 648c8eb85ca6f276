"""The soak benchmark runs end to end on a short play and reports what the worker did with the fleet.

Not a timed test and not a memory target: it checks that the worker consumed every reading, scored, raised
events for the faults, and let go of the ids that stopped sending (held entities stay near the fleet's size
while ids are retired every stream hour), and that the memory figures are there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.broker import BrokerError, tansu_binary
from tests.fixtures import missing_requirement

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_keeps_up_scores_and_evicts_retired_ids(tmp_path):
    try:
        tansu_binary()
    except BrokerError as exc:
        missing_requirement(f"the benchmark needs the local broker: {exc}")
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "pipelines.bench_soak", "--duration", "45", "--fleet", "50",
                           "--rate", "500", "--stream-period", "60", "--churn", "0.2", "--faults", "0.1",
                           "--sample-s", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["consumed"] == r["sent"] > 0 and r["dead_letters"] == 0
    assert r["stream_hours"] >= 5  # 45 s at 600x the clock: 7.5 h, whatever the producer achieved in rate
    assert r["windows_scored"] > 0 and r["faults"] > 0 and r["events"] > 0
    assert r["ids_retired"] >= 40  # 10 an hour
    # the worker evicted the retired ids silent for an hour of its partition's stream time (those retired in
    # the last hour or so of the 7.5 are still held)
    assert r["evicted"] >= 40
    # Retired ids are evicted after an hour of silence: held entities stay within the fleet plus about an
    # hour's retirees (plus those whose last window is still to seal), never the ~90 ids ever seen.
    assert 50 <= r["entities_max_steady"] <= 50 + 2 * 10
    assert max(s["entities"] for s in r["samples"]) < 50 + r["ids_retired"]
    assert r["worker_rss"]["samples"] >= 3 and r["worker_rss"]["last_mb"] > 100
    assert r["scoring_rss"]["samples"] >= 3  # the scoring child's memory is followed too
    assert "MB per stream day" in done.stdout
