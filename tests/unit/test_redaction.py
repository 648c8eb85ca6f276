"""Secrets are not printed: URIs' passwords and secret parameters masked in messages, errors, logs,
/healthz and the tracking-server check (which must still work with user info in the URI)."""

from __future__ import annotations

import logging

import pytest

from anomaly.errors import ConfigError, RegistryError
from anomaly.redaction import masked

SECRET = "S3cretPw"


@pytest.mark.parametrize("text, shown", [
    ("cannot reach http://alice:S3cretPw@mlflow:5000/api", "cannot reach http://alice:***@mlflow:5000/api"),
    ("store 'postgresql://alice:S3cretPw@db/mlflow\n'", "store 'postgresql://alice:***@db/mlflow\n'"),
    ("postgresql://:S3cretPw@db/x", "postgresql://:***@db/x"),
    ("host=db password='S3cretPw x' user=a", "host=db password=*** user=a"),
    ("https://acct.blob/c?sv=1&sig=S3cretPw&se=2", "https://acct.blob/c?sv=1&sig=***&se=2"),
    ("http://h/x?token=S3cretPw", "http://h/x?token=***"),
    ("https://b.s3/k?X-Amz-Security-Token=S3cretPw&X-Amz-Signature=S3cretPw",
     "https://b.s3/k?X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("a plain message, k = 3", "a plain message, k = 3"),
    ("pump@site 3 readings", "pump@site 3 readings"),
])
def test_masked(text, shown):
    assert masked(text) == shown


def test_errors_of_the_package_mask_the_uris_they_quote():
    err = RegistryError(f"cannot open experiment at http://alice:{SECRET}@mlflow:5000: refused")
    assert SECRET not in str(err) and "http://alice:***@mlflow:5000" in str(err)
    bad = ConfigError("mlflow.tracking_uri", f"starts or ends with a space: 'postgresql://a:{SECRET}@db\\n'")
    assert SECRET not in str(bad) and SECRET not in bad.message and bad.field == "mlflow.tracking_uri"


def test_client_options_given_as_text_are_refused_without_their_values():
    from anomaly.config import build_settings

    with pytest.raises(ConfigError) as err:
        build_settings({"kafka": {"client_options": f'{{"sasl_plain_password": "{SECRET}"}}'}})
    assert SECRET not in str(err.value) and "encoded twice" in str(err.value) and err.value.field == "kafka.client_options"


def test_health_detail_masks_the_tracking_uri():
    from anomaly.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.set_health("starting", detail=f"cannot check pump@champion: API request to http://a:{SECRET}@m/api failed")
    assert SECRET not in str(metrics.health())


def test_the_follower_s_trouble_masks_mlflow_s_error():
    from anomaly.model_follower import ModelFollower

    state = {"down": False}

    def resolve(name, alias):
        if state["down"]:
            raise ConnectionError(f"API request to http://alice:{SECRET}@mlflow/api/2.0 failed")
        return "1"

    follower = ModelFollower("pump", "champion", 0.0, lambda name, v: (f"det-{v}", v), resolver=resolve,
                             clock=lambda: 100.0)
    state["down"] = True
    assert follower.poll() is None
    assert follower.trouble and SECRET not in follower.trouble and "alice:***@mlflow" in follower.trouble


def test_log_lines_are_masked_by_the_command_s_handlers():
    from anomaly.cli import _MaskedSecrets

    record = logging.LogRecord("anomaly", logging.WARNING, __file__, 1, "%s=%s is not read", (
        "MLFLOW_TRACKING_URI", f"http://bob:{SECRET}@mlflow:5000"), None)
    assert _MaskedSecrets().filter(record)
    assert record.getMessage() == "MLFLOW_TRACKING_URI=http://bob:***@mlflow:5000 is not read"


def test_the_log_filter_masks_tracebacks_and_leaves_a_malformed_call_to_logging():
    from anomaly.cli import _MaskedSecrets

    try:
        raise ConnectionError(f"API request to http://alice:{SECRET}@mlflow/api failed")
    except ConnectionError:
        import sys

        record = logging.LogRecord("anomaly", logging.ERROR, __file__, 1, "retrain failed", (), sys.exc_info())
    assert _MaskedSecrets().filter(record)
    assert SECRET not in logging.Formatter().format(record) and "alice:***@mlflow" in record.exc_text
    bad = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s and %s", ("one",), None)
    assert _MaskedSecrets().filter(bad)  # no TypeError into the caller: logging reports it as before


def test_a_failed_retrain_s_reason_masks_the_tracking_uri(monkeypatch):
    from anomaly import retrain
    from anomaly.config import build_settings

    def boom(*args, **kwargs):
        raise ConnectionError(f"API request to http://alice:{SECRET}@mlflow/api/2.0 failed")

    monkeypatch.setattr(retrain, "_cycle", boom)
    result = retrain.run_cycle(build_settings({}))
    assert result.status == "failed" and SECRET not in result.reason and "alice:***@mlflow" in result.reason


def test_an_unreachable_tracking_server_s_password_is_not_shown():
    import socket

    from anomaly.tracking import require_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(RegistryError) as err:
        require_reachable(f"http://alice:{SECRET}@127.0.0.1:{dead}")
    assert SECRET not in str(err.value) and "does not answer" in str(err.value)
    with pytest.raises(RegistryError):  # not a bare ValueError
        require_reachable("http://[::1")
