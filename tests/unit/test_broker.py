"""The local broker's start-failure messages, with a stand-in binary (the real broker's behaviour:
tests/integration/test_kafka_io.py)."""

from __future__ import annotations

import pytest

from anomaly.broker import BrokerError, LocalBroker


def _failing_binary(tmp_path):
    script = tmp_path / "tansu"
    script.write_text("#!/bin/sh\necho 'storage engine refused: disk full'\nexit 3\n")
    script.chmod(0o755)
    return script


def test_a_failed_start_quotes_the_output_of_a_temporary_log_without_its_deleted_path(tmp_path):
    broker = LocalBroker(binary=_failing_binary(tmp_path), ready_timeout_s=20)
    with pytest.raises(BrokerError) as error:
        broker.start()
    text = str(error.value)
    assert "exited with code 3" in text and "storage engine refused: disk full" in text
    assert "--- broker output (tail) ---" in text and "anomaly-broker-" not in text  # the file is gone
    assert broker.log_path is None


def test_a_failed_start_names_a_log_it_was_given(tmp_path):
    log_path = tmp_path / "broker.log"
    with pytest.raises(BrokerError, match=f"--- broker log {log_path} \\(tail\\) ---"):
        LocalBroker(binary=_failing_binary(tmp_path), log_path=log_path, ready_timeout_s=20).start()
    assert "disk full" in log_path.read_text()
