"""Worker metrics: counters move, each instance has its own registry, /metrics and /healthz are served."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from anomaly.errors import AnomalyError
from anomaly.metrics import COUNT_KEYS, WorkerMetrics, observe_many

COUNTS = {"consumed": 10, "dead_letters": 1, "windows_scored": 7, "late": 2, "duplicates": 3, "resets": 1,
          "events_opened": 2, "events_closed": 1}


def value(m: WorkerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels or None)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def metrics():
    m = WorkerMetrics(clock=lambda: 1_000.0, monotonic=lambda: 50.0)  # time stands still
    yield m
    m.stop_http()


def test_record_batch_moves_every_counter(metrics):
    metrics.record_batch(COUNTS, 0.2, [0.05, 3.0])
    metrics.record_batch({"consumed": 5}, 0.01, [])
    assert value(metrics, "anomaly_records_consumed_total") == 15
    assert value(metrics, "anomaly_dead_letters_total") == 1
    assert value(metrics, "anomaly_windows_scored_total") == 7
    assert value(metrics, "anomaly_late_readings_total") == 2
    assert value(metrics, "anomaly_duplicate_readings_total") == 3
    assert value(metrics, "anomaly_window_resets_total") == 1
    assert value(metrics, "anomaly_events_total", status="open") == 2
    assert value(metrics, "anomaly_events_total", status="closed") == 1
    assert value(metrics, "anomaly_batch_seconds_count") == 2
    assert value(metrics, "anomaly_batch_seconds_sum") == pytest.approx(0.21)
    assert value(metrics, "anomaly_end_to_end_seconds_count") == 2
    assert value(metrics, "anomaly_end_to_end_seconds_bucket", le="0.05") == 1
    assert value(metrics, "anomaly_last_batch_timestamp_seconds") == 1_000.0


def test_step_extras_are_counted_too(metrics):
    assert set(metrics._counters) == COUNT_KEYS  # every documented key has its counter
    metrics.record_batch({"accepted": 8, "evicted": 2, "nonfinite_scores": 1}, 0.1, [])
    assert value(metrics, "anomaly_readings_accepted_total") == 8
    assert value(metrics, "anomaly_entities_evicted_total") == 2
    assert value(metrics, "anomaly_nonfinite_scores_total") == 1


def test_negative_latency_is_counted_as_zero_and_unknown_keys_warn_once(metrics, caplog):
    metrics.record_batch({}, 0.0, [-2.0, float("nan")])
    assert value(metrics, "anomaly_end_to_end_seconds_bucket", le="0.005") == 2
    with caplog.at_level(logging.WARNING, logger="anomaly.metrics"):
        metrics.record_batch({"consumd": 1, "consumed": 2}, 0.1, [])
        metrics.record_batch({"consumd": 1}, 0.1, [])
    assert [r.getMessage().count("consumd") for r in caplog.records] == [1]  # warned once, not raised
    assert value(metrics, "anomaly_records_consumed_total") == 2


def test_observe_many_matches_one_observe_per_value():
    """Bucket edges (a value equal to a bound counts in that bucket), +Inf, zero, negatives, NaN."""
    bounds = (0.01, 0.1, 1.0)
    values = np.array([0.0, 0.01, 0.010001, 0.05, 0.1, 1.0, 5.0, 1e9, -2.0, 0.3, 0.3, np.nan])
    expositions = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        h = Histogram("lat_seconds", "x", buckets=bounds, registry=registry)
        for chunk in (values[:5], values[5:], values[:0]):
            if bulk:
                observe_many(h, chunk)
            else:
                for v in chunk.tolist():
                    h.observe(v)
        expositions.append("\n".join(line for line in generate_latest(registry).decode().splitlines()
                                     if "_created" not in line))
    assert expositions[0] == expositions[1]
    assert 'lat_seconds_bucket{le="0.01"} 3.0' in expositions[1]  # 0.0, 0.01 and -2.0
    assert 'lat_seconds_count 11.0' in expositions[1]  # NaN is in no bucket, as with observe()


def test_record_batch_takes_an_array_of_latencies(metrics):
    metrics.record_batch({"consumed": 3}, 0.2, np.array([0.05, np.inf, -1.0]))
    assert value(metrics, "anomaly_end_to_end_seconds_count") == 3
    assert value(metrics, "anomaly_end_to_end_seconds_sum") == pytest.approx(0.05)


def test_model_gauges_and_counters(metrics):
    metrics.set_model("pump", "3")
    metrics.model_swapped("pump", "4")
    metrics.model_load_failed()
    metrics.set_entities(12)
    metrics.set_last_commit(1234.5)
    assert value(metrics, "anomaly_model_version", model="pump") == 4
    assert value(metrics, "anomaly_model_swaps_total") == 1
    assert value(metrics, "anomaly_model_load_failures_total") == 1
    assert value(metrics, "anomaly_entities") == 12
    assert value(metrics, "anomaly_last_commit_timestamp_seconds") == 1234.5
    metrics.set_model("fan", "1")  # another model: the old series goes away
    assert value(metrics, "anomaly_model_version", model="pump") is None
    assert value(metrics, "anomaly_model_version", model="fan") == 1


def test_instances_do_not_share_a_registry():
    a, b = WorkerMetrics(), WorkerMetrics()
    a.record_batch({"consumed": 3}, 0.1, [])
    assert value(a, "anomaly_records_consumed_total") == 3
    assert value(b, "anomaly_records_consumed_total") == 0


def test_health_document(metrics):
    assert metrics.health()["status"] == "starting"
    metrics.set_health("ok", model_name="pump", model_version=2, assigned_partitions=4)
    metrics.record_batch({"consumed": 1}, 0.1, [])
    doc = metrics.health()
    assert doc == {"status": "ok", "detail": None, "model": {"name": "pump", "version": "2"},
                   "last_batch_ts": 1_000.0, "last_batch_age_s": 0.0, "last_commit_ts": None,
                   "assigned_partitions": 4}
    metrics.set_health("degraded", detail="registry unreachable")
    assert metrics.health()["detail"] == "registry unreachable"
    metrics.set_health("ok")
    assert metrics.health()["detail"] is None
    with pytest.raises(ValueError):
        metrics.set_health("fine")


def stalling_metrics(status: str, stall_s: float, detail: str | None = None) -> tuple[WorkerMetrics, list[float]]:
    """Metrics on a hand-moved clock (``now[0]``, from 1000 s) whose last loop round ended at 1000 s."""
    now = [1000.0]
    metrics = WorkerMetrics(clock=lambda: now[0], monotonic=lambda: now[0])
    metrics.set_stall_limit(stall_s)
    metrics.set_health(status, detail=detail, last_batch_ts=1000.0)
    return metrics, now


def test_a_loop_that_has_not_finished_a_round_within_the_stall_limit_is_stalled():
    metrics, now = stalling_metrics("degraded", 300, detail="registry unreachable")
    now[0] = 1300.0
    assert metrics.health()["status"] == "degraded"  # at the limit: not yet
    now[0] = 1301.0
    doc = metrics.health()
    assert doc["status"] == "stalled" and doc["last_batch_age_s"] == 301.0
    assert "301 s (worker.stall_s 300)" in doc["detail"]
    metrics.set_health("ok", last_batch_ts=1301.0)  # a round finishes: healthy again
    assert metrics.health()["status"] == "ok"
    now[0] = 9999.0
    metrics.set_health("stopping", detail="stopped")
    assert metrics.health()["status"] == "stopping"  # only a running loop stalls
    metrics.set_stall_limit(0)
    metrics.set_health("ok")
    assert metrics.health()["status"] == "ok"  # 0: never


def test_a_step_of_the_wall_clock_is_no_stall():
    """The age was wall-clock: an NTP step or a resumed VM made a healthy worker 'stalled', and the watchdog
    killed it."""
    wall, steady = [1000.0], [50.0]
    metrics = WorkerMetrics(clock=lambda: wall[0], monotonic=lambda: steady[0])
    metrics.set_stall_limit(300)
    metrics.set_health("ok", last_batch_ts=wall[0])
    wall[0] += 3600  # the wall clock jumps an hour; 2 s pass
    steady[0] += 2
    doc = metrics.health()
    assert doc["status"] == "ok" and doc["last_batch_age_s"] == 2.0
    steady[0] += 400  # a real stall
    assert metrics.health()["status"] == "stalled"


def test_http_serves_metrics_and_health_on_an_ephemeral_port(metrics):
    port = metrics.start_http("127.0.0.1", 0)
    assert port > 0 and metrics.http_port == port
    metrics.record_batch(COUNTS, 0.2, [0.5])
    base = f"http://127.0.0.1:{port}"

    code, content_type, body = get(f"{base}/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    assert "anomaly_records_consumed_total 10.0" in body
    assert 'anomaly_events_total{status="open"} 2.0' in body
    assert "# TYPE anomaly_end_to_end_seconds histogram" in body

    code, content_type, body = get(f"{base}/healthz")
    assert code == 503 and content_type == "application/json"  # still starting: not ready
    assert json.loads(body)["status"] == "starting"
    metrics.set_health("degraded", model_name="pump", model_version="7", assigned_partitions=2)
    code, _, body = get(f"{base}/healthz")
    doc = json.loads(body)
    assert code == 200 and doc["model"] == {"name": "pump", "version": "7"} and doc["assigned_partitions"] == 2
    metrics.set_stall_limit(30)
    metrics.set_health(last_batch_ts=1_000.0 - 60)  # the loop's last round finished a minute ago (clock: 1000)
    code, _, body = get(f"{base}/healthz")
    assert code == 503 and json.loads(body)["status"] == "stalled"

    assert get(f"{base}/nope")[0] == 404
    with pytest.raises(AnomalyError, match="already running"):
        metrics.start_http("127.0.0.1", 0)


def test_head_requests_get_the_status_and_headers_without_a_body(metrics):
    """HEAD-based monitors got 501 (no do_HEAD)."""
    port = metrics.start_http("127.0.0.1", 0)
    metrics.set_health("ok", last_batch_ts=1_000.0)
    for path, code in (("/healthz", 200), ("/metrics", 200), ("/nope", 404)):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, length, body = response.status, int(response.headers["Content-Length"]), response.read()
        except urllib.error.HTTPError as exc:
            status, length, body = exc.code, int(exc.headers["Content-Length"]), exc.read()
        assert (status, body) == (code, b"") and length > 0, path


def test_port_in_use_is_a_clear_error_and_stop_releases_it(metrics):
    port = metrics.start_http("127.0.0.1", 0)
    other = WorkerMetrics()
    with pytest.raises(AnomalyError, match=f"127.0.0.1:{port}"):
        other.start_http("127.0.0.1", port)
    metrics.stop_http()
    metrics.stop_http()  # idempotent
    assert metrics.http_port is None
    assert other.start_http("127.0.0.1", port) == port
    other.stop_http()


def test_every_round_of_the_poll_loop_moves_the_poll_gauge_not_the_batch_one(metrics):
    # an idle worker (quiet partitions) commits nothing: the not-committing alert tells it from a hung
    # one by this gauge, which only a turning loop keeps fresh
    metrics.set_health("ok", assigned_partitions=2, last_batch_ts=1_500.0)
    assert value(metrics, "anomaly_last_poll_timestamp_seconds") == 1_500.0
    assert value(metrics, "anomaly_last_batch_timestamp_seconds") == 0.0
    metrics.set_health("degraded")  # no round: the gauge keeps its time
    assert value(metrics, "anomaly_last_poll_timestamp_seconds") == 1_500.0


def test_an_accept_header_prometheus_client_cannot_read_gets_the_plain_text_format(metrics):
    # "version=abc" raised a TypeError in the handler: an empty reply, and a traceback on stderr
    port = metrics.start_http("127.0.0.1", 0)
    for accept in ("application/openmetrics-text; version=abc", "text/plain;version=x.y"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            assert b"anomaly_" in response.read()


def test_the_endpoint_serves_on_an_ipv6_host(metrics):
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        port = metrics.start_http("::1", 0)
    except AnomalyError as exc:
        if "Cannot assign" in str(exc) or "not available" in str(exc):
            pytest.skip(f"no IPv6 loopback here: {exc}")
        raise
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as err:  # 503 while starting: answered all the same
        status = err.code
    assert status in (200, 503)
