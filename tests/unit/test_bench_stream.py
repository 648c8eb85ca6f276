"""bench_stream's pieces that need no broker (the whole job: tests/integration/test_bench_stream.py)."""

from __future__ import annotations

import pytest


def test_the_bare_consumer_gets_the_workers_client_options(monkeypatch):
    # --client-options reached the worker's consumer only: the ratio then compared different consumers.
    from anomaly import kafka_io
    from pipelines import bench_stream

    made = []

    class Stop(Exception):
        pass

    def consumer(bootstrap, group, topics, client_options=None, **kwargs):
        made.append((group, client_options))
        raise Stop

    monkeypatch.setattr(kafka_io, "make_consumer", consumer)
    for round_ in (0, 1):  # a group of its own each round (auto-commit on began round 2 at the end)
        with pytest.raises(Stop):
            bench_stream.raw_consume("127.0.0.1:1", "t", 10, 500, 1.0, {"fetch_max_wait_ms": 10}, round_)
    assert made == [("t.raw.0", {"fetch_max_wait_ms": 10}), ("t.raw.1", {"fetch_max_wait_ms": 10})]
