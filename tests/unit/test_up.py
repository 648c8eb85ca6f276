"""The pure parts of ``anomaly up`` and its console view, and its refusals before anything starts."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly import up
from anomaly.cli import main
from anomaly.config import Settings, load_config, to_toml
from anomaly.datasets import LabelledSeries
from anomaly.errors import DataError
from anomaly.event_feed import EventFeed, format_event
from tests.fixtures import need_dataset, wait_for

EVENT = {"event_id": "e1", "entity": "pump-2", "status": "open", "start_ts": 1795255392.0, "end_ts": None,
         "peak_score": 4.21, "threshold": 0.93, "windows": 3, "model": {"name": "m", "version": "3"},
         "sensors": [{"sensor": "pressure", "share": 0.81, "actual": 1.41, "expected": 1.02},
                     {"sensor": "temp", "share": 0.12, "actual": 70.0, "expected": 71.5},
                     {"sensor": "flow", "share": 0.05, "actual": 3.0, "expected": 3.1},
                     {"sensor": "rpm", "share": 0.02, "actual": 1.0, "expected": 1.0}]}


def _series(name: str, rows: int = 20, fault: tuple[int, int] = (12, 15), train_rows: int = 8) -> LabelledSeries:
    index = pd.date_range("2026-01-01", periods=rows, freq="1s", tz="UTC", name="ts")
    labels = np.zeros(rows, bool)
    labels[fault[0]:fault[1]] = True
    frame = pd.DataFrame({"a": np.arange(rows, dtype=float), "b": np.ones(rows)}, index=index)
    return LabelledSeries(name=name, frame=frame, labels=labels, train_rows=train_rows)


def test_fleet_entities_name_one_pump_per_series():
    assert up.fleet_entities(["valve1/0", "other/3"]) == [("pump-1", "valve1/0"), ("pump-2", "other/3")]


@pytest.mark.parametrize("servers, port", [("127.0.0.1:9092", 9092), ("localhost:19092", 19092),
                                           ("kafka:9092", None), ("127.0.0.1:1,127.0.0.1:2", None)])
def test_only_a_single_local_bootstrap_server_gets_a_local_broker(servers, port):
    assert up.local_port(servers) == port


def test_mlflow_server_only_for_a_local_sqlite_store(tmp_path):
    cmd = up.mlflow_server_command("py", "sqlite:///mlruns/mlflow.db", str(tmp_path / "art"), 5123)
    assert cmd[:4] == ["py", "-m", "mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1].endswith("/mlruns/mlflow.db")
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("sqlite:////")  # made absolute
    assert cmd[cmd.index("--port") + 1] == "5123" and cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert up.mlflow_server_command("py", "http://mlflow:5000", "s3://b", 5000) is None
    assert up.ui_base("http://mlflow:5000/", 1) == "http://mlflow:5000"
    assert up.models_url("http://h:1", "my model") == "http://h:1/#/models/my%20model"


def test_taken_ports_names_what_is_in_the_way():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        taken = up.taken_ports({"MLflow UI": busy, "worker metrics": 0})
    assert taken == [f"MLflow UI (port {busy})"]
    assert "--ui-port" in up.port_hint(taken)


def test_taken_ports_checks_each_part_on_the_address_it_will_bind():
    """A metrics endpoint set to listen on another address is checked there (127.0.0.1 was free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        assert up.taken_ports({"worker metrics": busy}) == []  # nothing on 127.0.0.1
        taken = up.taken_ports({"worker metrics": busy}, hosts={"worker metrics": "127.0.0.2"})
    assert taken == [f"worker metrics (port {busy} on 127.0.0.2)"]
    # an address this machine lacks is not "in use": the part says so itself when it binds
    assert up.taken_ports({"worker metrics": busy}, hosts={"worker metrics": "192.0.2.1"}) == []


def test_labelled_intervals_are_runs_of_labelled_rows():
    index = pd.date_range("2026-01-01", periods=8, freq="2s")
    labels = np.array([0, 1, 1, 0, 0, 1, 1, 1], bool)
    assert up.labelled_intervals(index, labels) == [(2.0, 4.0), (10.0, 14.0)]
    assert up.labelled_intervals(index, None) == []


def test_ground_truth_marks_events_against_each_round():
    truth = up.GroundTruth([("pump-1", _series("valve1/0"))], slack_s=1.0)
    truth.add_round(1000.0)
    truth.add_round(2000.0)
    assert truth.faults("pump-1") == [(1012.0, 1014.0), (2012.0, 2014.0)]
    assert truth.on_fault("pump-1", 2013.0) and truth.on_fault("pump-1", 1015.0)  # inside; within slack
    assert not truth.on_fault("pump-1", 1500.0)
    assert truth.note({"entity": "pump-1", "start_ts": 1011.5}) == "SKAB valve1/0: labelled fault"
    assert truth.note({"entity": "pump-1", "start_ts": 1001.0}) == "SKAB valve1/0: no fault label"
    assert truth.note({"entity": "pump-9", "start_ts": 1012.0}) == ""
    manifest = truth.manifest()
    assert manifest["rounds"] == [1000.0, 2000.0] and manifest["entities"]["pump-1"]["series"] == "valve1/0"


def test_fleet_training_tables_hold_each_entitys_normal_part_for_prepare_fleet():
    from anomaly.preparation import prepare_fleet

    empty = LabelledSeries(name="c", frame=_series("c").frame, labels=np.zeros(20, bool), train_rows=0)
    tables = up.fleet_training_tables([("pump-1", _series("a")), ("pump-2", _series("b")), ("pump-3", empty)])
    assert list(tables) == ["pump-1", "pump-2"]  # an entity with no training rows is left out
    assert all(len(t) == 8 for t in tables.values())  # the 8 training rows each, faults (rows 12-14) excluded
    prepared = prepare_fleet(tables, window_size=2, validation_fraction=0.25)
    # heads then tails, a stand-in gap row between every two parts: no window joins two entities
    assert prepared.entities == ["pump-1", "pump-2"] and int(prepared.gaps.sum()) == 3
    assert set(prepared.entity_tails) == {"pump-1", "pump-2"}  # validation holds both entities' last rows
    assert up.fleet_span_s([("p", _series("a").frame)]) == 20.0
    slow = _series("a").frame.iloc[::5]  # every 5 s
    assert up.fleet_period_s([("p", _series("a").frame), ("q", slow)]) == 5.0  # a round's next start, at least


def test_fleet_frames_carry_exactly_the_serving_models_sensors():
    fleet = [("pump-1", _series("a")), ("pump-2", _series("b"))]
    frames = up.fleet_frames(fleet, ("b",))
    assert [e for e, _ in frames] == ["pump-1", "pump-2"]
    assert all(list(f.columns) == ["b"] and len(f) == 20 for _, f in frames)
    assert [list(f.columns) for _, f in up.fleet_frames(fleet, ("b", "a"))] == [["b", "a"], ["b", "a"]]
    with pytest.raises(DataError, match=r"reads sensors the fleet does not have: \['Temperature'\]"):
        up.fleet_frames(fleet, ("a", "Temperature"))


def test_fleet_stream_merges_entities_in_time_order():
    frames = [("pump-1", _series("a", rows=3).frame), ("pump-2", _series("b", rows=3).frame)]
    stream = list(up.fleet_stream(frames, start_ts=100.0))
    assert [(e, r.entity, r.ts) for e, r in stream] == [
        ("pump-1", "pump-1", 100.0), ("pump-2", "pump-2", 100.0), ("pump-1", "pump-1", 101.0),
        ("pump-2", "pump-2", 101.0), ("pump-1", "pump-1", 102.0), ("pump-2", "pump-2", 102.0)]


def test_banner_says_where_to_look():
    text = up.banner(bootstrap="127.0.0.1:9092", settings=Settings(), ui="http://127.0.0.1:5000",
                     fleet=[("pump-1", "valve1/0")], speed=10, state_dir=Path("mlruns/up"), champion="4",
                     retrain_every_s=900)
    assert "http://127.0.0.1:5000/#/models/anomaly-detector" in text
    assert "http://127.0.0.1:9108/metrics" in text and "/healthz" in text
    assert "sensors (readings)" in text and "anomalies (events)" in text and "v4" in text
    assert "anomalies.feedback (verdicts)" in text and "anomaly feedback normal ID" in text
    text = up.banner(bootstrap="127.0.0.1:9092", settings=Settings(), ui=None, fleet=[("pump-1", "valve1/0")],
                     speed=10, state_dir=Path("mlruns/up"), champion="4", retrain_every_s=1234567)
    assert "retrain every 1234567 s" in text  # not 1.23457e+06 (six digits: 3 s off)


def test_format_event_names_top_sensors_with_actual_and_expected():
    line = format_event(EVENT)
    assert "OPEN" in line and "pump-2" in line and "model v3, id e1  top:" in line
    long_id = format_event({**EVENT, "event_id": "5f0c3a1b9d2e4f60718293a4b5c6d7e8"})
    assert "model v3, id 5f0c3a1b  top:" in long_id  # what `anomaly feedback` takes
    assert "pressure 81% (1.41 vs 1.02)" in line and "flow" in line and "rpm" not in line  # top 3 only
    null = {**EVENT, "sensors": [{**EVENT["sensors"][0], "actual": None, "filled": True}]}
    assert "pressure 81% (null vs 1.02)" in format_event(null)  # the sensor sent no value there
    closed = format_event({**EVENT, "status": "closed", "end_ts": EVENT["start_ts"] + 150})
    assert "CLOSED" in closed and "lasted 2.5 min" in closed and "continues" not in closed
    cut = format_event({**EVENT, "status": "closed", "end_ts": EVENT["start_ts"] + 3599, "continued": True})
    assert "lasted 60.0 min, continues, peak" in cut  # cut at worker.max_event_s: a new event follows
    day = datetime.fromtimestamp(EVENT["start_ts"], tz=timezone.utc).strftime("%m-%d %H:%M:%S")
    assert line.startswith(day)  # the day too: an event can last days


def test_event_feed_says_when_an_event_is_reopened_within_its_cooldown():
    # A crossing within worker.cooldown_s of a close re-opens the same event id: the feed said OPEN at the
    # first opening's time again, read as a new fault that started in the past.
    lines = []
    feed = EventFeed("127.0.0.1:1", "t", on_line=lines.append)
    feed.handle(json.dumps(EVENT).encode())
    feed.handle(json.dumps({**EVENT, "status": "closed", "end_ts": EVENT["start_ts"] + 20}).encode())
    feed.handle(json.dumps({**EVENT, "windows": 9}).encode())
    day = datetime.fromtimestamp(EVENT["start_ts"], tz=timezone.utc).strftime("%m-%d %H:%M:%S")
    assert lines[0].startswith(f"{day}  OPEN   pump-2")
    assert lines[2].startswith(f"{day}  REOPEN pump-2") and "9 windows" in lines[2]
    assert feed.counts == {"open": 1, "closed": 1}  # still one event
    feed.handle(json.dumps({**EVENT, "event_id": "another"}).encode())
    assert lines[-1].startswith(f"{day}  OPEN ")  # an event never closed is no re-opening


def test_event_feed_shows_an_opening_re_sent_after_a_restart_as_the_opening():
    # a worker restarting from its commit re-sends a finished run's messages, byte for byte: not a re-opening
    lines = []
    feed = EventFeed("127.0.0.1:1", "t", on_line=lines.append)
    closed = {**EVENT, "status": "closed", "end_ts": EVENT["start_ts"] + 20}
    for event in (EVENT, closed, EVENT, closed, {**EVENT, "windows": 9}):
        feed.handle(json.dumps(event).encode())
    assert [line.split()[2] for line in lines] == ["OPEN", "CLOSED", "OPEN", "CLOSED", "REOPEN"]
    assert feed.counts == {"open": 1, "closed": 1}


def test_event_feed_counts_each_event_without_an_id_as_its_own():
    # the stand-in id was the dict's id(), reused once a dict is freed: 5 closes counted as 1, and an opening
    # shown as REOPEN
    lines = []
    feed = EventFeed("127.0.0.1:1", "t", on_line=lines.append)
    anonymous = {k: v for k, v in EVENT.items() if k != "event_id"}
    for _ in range(5):
        feed.handle(json.dumps({**anonymous, "status": "closed"}).encode())
        feed.handle(json.dumps(anonymous).encode())
    assert feed.counts == {"open": 5, "closed": 5}
    assert not any("REOPEN" in line for line in lines)


def test_event_feed_counts_and_annotates_and_skips_garbage():
    lines = []
    feed = EventFeed("127.0.0.1:1", "t", on_line=lines.append, annotate=lambda e: "note")
    feed.handle(json.dumps(EVENT).encode())
    feed.handle(b"not json")
    feed.handle(json.dumps({**EVENT, "status": "closed"}).encode())
    assert feed.counts == {"open": 1, "closed": 1} and feed.entities == {"pump-2": 1}
    assert len(lines) == 2 and lines[0].endswith("[note]")
    # Records that are JSON but not events we can show are skipped too: they used to end the feed's thread.
    nested = b'{"entity": "p", "status": "open", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # RecursionError
    for odd in (None, nested, json.dumps({**EVENT, "entity": None}).encode(), json.dumps({**EVENT, "entity": [1]}).encode(),
                json.dumps({**EVENT, "entity": ""}).encode(), json.dumps({**EVENT, "status": "maybe"}).encode(),
                json.dumps([EVENT]).encode(), json.dumps({**EVENT, "status": "closed", "end_ts": "later"}).encode()):
        feed.handle(odd)
    assert feed.counts == {"open": 1, "closed": 1} and feed.entities == {"pump-2": 1} and len(lines) == 2
    feed.handle(json.dumps(EVENT).encode())  # and the feed goes on; the same event again is shown, not counted
    assert feed.counts == {"open": 1, "closed": 1} and feed.entities == {"pump-2": 1}
    assert len(lines) == 3 and lines[-1].endswith("[note]")
    feed.handle(json.dumps({**EVENT, "event_id": "another"}).encode())
    assert feed.counts == {"open": 2, "closed": 1} and feed.entities == {"pump-2": 2}


def test_interrupting_start_up_is_a_stop_not_an_error():
    from anomaly.up import _Interrupted

    # Start-up code (MLflow's, the registry adapter's) catches Exception and wraps it: the signal's
    # exception must not be one, or Ctrl-C during start-up ends as "error: ... SIGINT", exit 2.
    assert issubclass(_Interrupted, BaseException) and not issubclass(_Interrupted, Exception)


def test_a_child_is_registered_before_it_starts(tmp_path):
    from anomaly.up import Child, _start

    children = {}

    class Boom(Child):
        def start(self):
            assert self.name in children  # an interrupt from here on still finds it in children
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _start(children, Boom("worker", ["true"], tmp_path / "w.log", {}))
    assert list(children) == ["worker"]


def test_settings_survive_the_toml_handed_to_children(tmp_path):
    settings = load_config(None, env={"ANOMALY_KAFKA__CLIENT_OPTIONS": '{"security_protocol": "SSL", "retries": 3}',
                                      "ANOMALY_DATA__SCALER": "robust", "ANOMALY_MODEL__WINDOW_SIZE": "10"})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(settings))
    assert load_config(path, env={}) == settings


def test_non_finite_client_options_survive_the_toml(tmp_path):
    """kafka-python's own default for retries is inf: written as JSON's Infinity it was not TOML, and up
    stopped reading its own file back with an error that named no field. TOML has inf and nan."""
    settings = load_config(None, env={"ANOMALY_KAFKA__CLIENT_OPTIONS": '{"retries": Infinity, "x": -Infinity}'})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(settings), encoding="utf-8")
    assert load_config(path, env={}).kafka.client_options == {"retries": math.inf, "x": -math.inf}
    settings = load_config(None, env={"ANOMALY_KAFKA__CLIENT_OPTIONS": '{"request_timeout_ms": NaN}'})
    path.write_text(to_toml(settings), encoding="utf-8")
    assert math.isnan(load_config(path, env={}).kafka.client_options["request_timeout_ms"])  # the client refuses it


def test_any_unicode_and_null_client_options_survive_the_toml(tmp_path):
    settings = load_config(None, env={"ANOMALY_MLFLOW__EXPERIMENT": 'pumps 🚀 "north"\x7f\ttab',
                                      "ANOMALY_KAFKA__CLIENT_OPTIONS": '{"ssl_cafile": null, "retries": 3}'})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(settings), encoding="utf-8")
    back = load_config(path, env={})
    assert back.mlflow.experiment == settings.mlflow.experiment
    assert back.kafka.client_options == {"retries": 3}  # null: the client's default, as if left out


def test_children_read_the_settings_from_ups_file_not_from_the_environment(monkeypatch):
    monkeypatch.setenv("ANOMALY_WORKER__MAX_FUTURE_S", "600")  # would undo up's -1 in its children
    monkeypatch.setenv("ANOMALY_DATASETS", "/data")
    env = up.child_env({"X": "1"})
    assert "ANOMALY_WORKER__MAX_FUTURE_S" not in env
    assert env["ANOMALY_DATASETS"] == "/data" and env["X"] == "1"
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


def test_up_options_are_checked():
    with pytest.raises(up.UpError, match="fleet"):
        up.UpOptions(data_dir=Path("."), fleet=())
    with pytest.raises(up.UpError, match="speed"):
        up.UpOptions(data_dir=Path("."), speed=0)
    # past the scheduler's bound: refused here, not after the stack had trained and promoted a champion
    with pytest.raises(up.UpError, match="--retrain-every-s must be > 0 and at most 31622400"):
        up.UpOptions(data_dir=Path("."), retrain_every_s=1e9)
    assert up.UpOptions(data_dir=Path("."), retrain_every_s=31622400).retrain_every_s == 31622400


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a SKAB folder.*point --data-dir at the dataset's folder, or set "
                                        "ANOMALY_DATASETS") as error:
        up.load_fleet(tmp_path, ["valve1/0"])
    assert str(error.value).count("ANOMALY_DATASETS") == 1  # the advice was given twice


def test_the_fleet_loads_from_the_skab_folder_or_its_data_folder():
    skab = need_dataset("skab", "data")
    assert [e for e, _ in up.load_fleet(skab / "data", ["valve1/0"])] == [e for e, _ in up.load_fleet(skab, ["valve1/0"])]


def test_up_refuses_ports_in_use_before_starting_anything(tmp_path, monkeypatch, capsys):
    skab = need_dataset("skab", "data")
    monkeypatch.chdir(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        monkeypatch.setenv("ANOMALY_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{busy}")
        code = main(["up", "--data-dir", str(skab), "--state-dir", str(tmp_path / "s"),
                     "--fleet", "valve1/0"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"Kafka broker (port {busy})" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists(), "nothing started, nothing written"


def test_up_names_a_broken_config_field(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_WORKER__STRIDE", "zero")
    assert main(["up", "--data-dir", str(tmp_path)]) == 2
    assert "worker.stride" in capsys.readouterr().err


def test_artifact_locations_with_a_scheme_are_kept():
    from anomaly.tracking import artifact_uri

    assert artifact_uri("mlflow-artifacts:/anomaly") == "mlflow-artifacts:/anomaly"
    assert artifact_uri("s3://bucket/x") == "s3://bucket/x"


def test_the_effective_config_is_written_for_its_owner_only(tmp_path):
    # It holds kafka.client_options, SASL passwords included; it was written 0644.
    import stat

    path = tmp_path / "anomaly.toml"
    path.write_text("old")
    path.chmod(0o644)
    up.write_private(path, 'x = "secret"\n')
    assert path.read_text() == 'x = "secret"\n' and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_parts_asked_for_one_fixed_port_is_a_clash_any_free_port_is_not():
    assert up.clashing_ports({"MLflow UI": 9108, "worker metrics": 9108, "broker": 0, "scheduler metrics": 0}) == [
        "MLflow UI and worker metrics (port 9108)"]
    assert up.clashing_ports({"a": 1, "b": 2, "c": 0, "d": 0}) == []


def test_a_second_session_on_one_state_folder_is_refused_until_the_first_ends(tmp_path):
    fd = up.lock_state(tmp_path)
    try:
        with pytest.raises(up.UpError, match=f"pid {os.getpid()}.*--state-dir {tmp_path}"):
            up.lock_state(tmp_path)
    finally:
        os.close(fd)
    os.close(up.lock_state(tmp_path))  # free again once the first one's descriptor is closed


def test_the_banner_says_when_kafka_is_a_cluster_up_did_not_start():
    text = up.banner(bootstrap="kafka.internal:9092", settings=Settings(), ui=None, fleet=[("pump-1", "valve1/0")],
                     speed=10, state_dir=Path("mlruns/up"), champion="1", retrain_every_s=900, local_broker=False)
    assert "everything runs on this machine" not in text
    assert "Kafka is the cluster at kafka.internal:9092 (not started here" in text and "group anomaly-worker" in text


def test_supervision_stops_the_session_when_the_console_feed_dies(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(up, "SUPERVISE_STEP_S", 0.01)
    child = SimpleNamespace(name="worker", alive=lambda: True)
    replay = SimpleNamespace(error=None)
    assert up._supervise({"worker": child}, replay, None, 0.05, SimpleNamespace(error=None)) == 0
    with pytest.raises(up.UpError, match="event feed stopped: NoBrokersAvailable"):
        up._supervise({"worker": child}, replay, None, 5.0, SimpleNamespace(error=RuntimeError("NoBrokersAvailable")))


class _Broker:
    def __init__(self, running: bool) -> None:
        self.running, self.stopped = running, False

    def is_running(self) -> bool:
        return self.running

    def stop(self) -> None:
        self.stopped = True


def test_a_stop_after_the_broker_died_does_not_wait_out_the_replays_flush(monkeypatch, caplog):
    """The replay's last flush waits 60 s for a broker that is gone (and kafka-python logs every failed
    reconnect meanwhile): `up` took 70 s to stop. Its thread is left to end with the process."""
    import logging
    import threading

    from anomaly import replay
    from anomaly.errors import TopicError

    flushing, release = threading.Event(), threading.Event()

    def stuck_flush(*args, **kwargs):  # sends, then waits on the flush as a dead broker makes it wait
        flushing.set()
        release.wait(30)
        raise TopicError("readings not confirmed within 60 s")

    monkeypatch.setattr(replay, "replay", stuck_flush)
    kafka_logger = logging.getLogger("kafka")
    monkeypatch.setattr(kafka_logger, "level", kafka_logger.level)  # put back after the test
    frames = [("pump-0", _series("s").frame)]
    fleet = up.FleetReplay("127.0.0.1:1", "readings", frames, speed=10.0, loop=False, client_options={}).start()
    assert flushing.wait(10)
    broker = _Broker(running=False)
    with caplog.at_level(logging.INFO, logger="anomaly.up"):
        up._stop_all({}, fleet, None, broker)
        assert fleet.alive() and broker.stopped  # not waited for
        assert kafka_logger.level == logging.CRITICAL  # the dead broker's reconnect errors are not shown
        release.set()
        fleet._thread.join(10)
    assert not fleet.alive()
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "fleet replay" in r.getMessage()]
    assert said == [(logging.INFO, "fleet replay ended while stopping: readings not confirmed within 60 s")]


class _GoneConsole(io.TextIOBase):
    """A console that is gone: the terminal closed (EIO), or a `| tee` ended by the same Ctrl-C (EPIPE)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


class _Child:
    def __init__(self, fail: bool = False) -> None:
        self.stopped, self.fail = False, fail

    def alive(self) -> bool:
        return not self.stopped

    def stop(self, grace_s: float, hurry=None) -> int:
        self.stopped = True
        if self.fail:
            raise OSError("cannot signal it")
        return 0


def test_a_console_that_is_gone_does_not_cut_the_orderly_stop_short(monkeypatch):
    # the scheduler's "stopping ..." line raised, and the scheduler, MLflow and the broker were left to die
    # with the process (a retrain abandoned), and `up` exited 1 with a traceback
    monkeypatch.setattr(sys, "stdout", _GoneConsole())
    children = {name: _Child() for name in ("worker", "scheduler", "mlflow")}
    broker = _Broker(running=True)
    up._stop_all(children, None, None, broker, lambda: False)
    assert all(child.stopped for child in children.values()) and broker.stopped
    up._say("stopped.")  # said to a console that is gone: nothing raised


def test_a_part_that_fails_to_stop_does_not_keep_the_rest_running():
    children = {"worker": _Child(fail=True), "scheduler": _Child(), "mlflow": _Child()}
    broker = _Broker(running=True)
    with pytest.raises(OSError, match="cannot signal it"):
        up._stop_all(children, None, None, broker, lambda: False)
    assert all(child.stopped for child in children.values()) and broker.stopped


def test_a_stop_with_the_broker_running_lets_the_replay_flush(monkeypatch):
    import threading

    from anomaly import replay

    flushing, flushed = threading.Event(), []

    def slow_flush(*args, **kwargs):
        flushing.set()
        time.sleep(0.5)
        flushed.append(True)
        return replay.ReplayStats(sent=0, seconds=0.5)

    monkeypatch.setattr(replay, "replay", slow_flush)
    fleet = up.FleetReplay("127.0.0.1:1", "readings", [("pump-0", _series("s").frame)], speed=10.0, loop=False,
                           client_options={}).start()
    assert flushing.wait(10)
    up._stop_all({}, fleet, None, _Broker(running=True))
    assert flushed == [True] and not fleet.alive()


def test_the_fleet_replay_counts_readings_the_broker_confirmed(monkeypatch):
    """summary.json's readings_replayed: confirmed deliveries, not readings taken to send."""
    from anomaly import replay
    from tests.unit.test_replay import FakeProducer

    producer = FakeProducer(fail_every=2)  # the broker confirms every other reading
    real = replay.replay
    monkeypatch.setattr(replay, "replay",
                        lambda *a, **k: real(*a, **k, producer_factory=lambda bootstrap, options: producer))
    frame = _series("s").frame.iloc[:10]
    fleet = up.FleetReplay("127.0.0.1:1", "readings", [("pump-0", frame)], speed=1e9, loop=False,
                           client_options={}).start()
    fleet._thread.join(10)
    assert len(producer.sent) == 10 and fleet.delivered == 5
    assert fleet.error is not None and "5 of 10 readings were not delivered" in str(fleet.error)


def test_the_event_feed_remembers_a_bounded_number_of_events(monkeypatch):
    """Every (event_id, status) was kept for the life of `anomaly up`: a set that only grew."""
    import anomaly.event_feed as event_feed

    monkeypatch.setattr(event_feed, "COUNTED_MAX", 50)
    feed = EventFeed("127.0.0.1:1", "t", on_line=lambda line: None)
    for i in range(200):
        feed.handle(json.dumps({**EVENT, "event_id": f"e{i}"}).encode())
    assert feed.counts == {"open": 200} and len(feed._counted) <= 50
    feed.handle(json.dumps({**EVENT, "event_id": "e199"}).encode())  # a recent one again: not counted twice
    assert feed.counts == {"open": 200}


_STOPPABLE = """
import pathlib, signal, sys, time
out, seen = pathlib.Path(sys.argv[1]), []
def handler(signum, frame):
    seen.append(signal.Signals(signum).name)
    out.write_text(" ".join(seen))
    if signum == signal.SIGUSR1 or len(seen) >= 2:  # as the scheduler: the first SIGTERM waits, the next stops now
        sys.exit(128 + signum)
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGUSR1, handler)
out.write_text("ready")
while True:
    time.sleep(0.05)
"""


def _stoppable(tmp_path: Path, abandon_s: float) -> tuple[up.Child, Path]:
    import sys

    script, out = tmp_path / "child.py", tmp_path / "seen.txt"
    script.write_text(_STOPPABLE)
    child = up.Child("scheduler", [sys.executable, str(script), str(out)], tmp_path / "child.log", dict(os.environ),
                     abandon_s=abandon_s).start()
    assert wait_for(lambda: out.exists(), 20)
    return child, out


def test_a_second_ctrl_c_tells_the_scheduler_to_stop_now_instead_of_waiting_out_its_grace(tmp_path):
    """A retrain outlasting the 180 s grace was SIGKILLed, its MLflow run left RUNNING; a second Ctrl-C
    was ignored."""
    import signal
    import threading

    child, out = _stoppable(tmp_path, abandon_s=10)
    started = time.monotonic()
    hurry = threading.Event()
    threading.Timer(1.0, hurry.set).start()  # the second Ctrl-C, a second into the stop
    assert child.stop(180, hurry.is_set) == 128 + signal.SIGTERM
    assert out.read_text() == "SIGTERM SIGTERM" and time.monotonic() - started < 30


def test_a_scheduler_past_its_grace_is_told_to_stop_now_before_it_is_killed(tmp_path):
    import signal

    child, out = _stoppable(tmp_path, abandon_s=10)
    assert child.stop(0.5) == 128 + signal.SIGTERM and out.read_text() == "SIGTERM SIGTERM"
    (tmp_path / "plain").mkdir()
    plain, out = _stoppable(tmp_path / "plain", abandon_s=0)
    assert plain.stop(0.5) == -signal.SIGKILL and out.read_text() == "SIGTERM"  # no second chance: killed


def test_a_scheduler_outliving_up_is_told_to_stop_now(tmp_path):
    """``kill -9`` of ``anomaly up``: the scheduler got SIGTERM, waited for its retrain with the broker
    gone, and held its metrics port against the next start."""
    import subprocess
    import sys

    out = tmp_path / "seen.txt"
    (tmp_path / "child.py").write_text(_STOPPABLE)
    parent = subprocess.Popen([sys.executable, "-c",
                               "import os, sys, time; from anomaly import up; "
                               f"up.Child('scheduler', [sys.executable, {str(tmp_path / 'child.py')!r}, {str(out)!r}], "
                               f"up.Path({str(tmp_path / 'child.log')!r}), dict(os.environ), abandon_s=5).start(); "
                               "time.sleep(600)"], cwd=Path(__file__).resolve().parents[2])
    try:
        assert wait_for(lambda: out.exists() and out.read_text() == "ready", 30)
        parent.kill()
        parent.wait()
        assert wait_for(lambda: out.read_text() == "SIGUSR1", 10), out.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_dataset_folder_that_does_not_exist_is_said_so(tmp_path):
    """A fresh clone not beside shared/: "not a SKAB folder" read as if the folder held something else."""
    with pytest.raises(DataError, match=r"skab: no such folder; expected .*point --data-dir"):
        up.load_fleet(tmp_path / "skab", ["valve1/0"])


def test_clashing_ports_advise_0_only_where_it_is_taken(tmp_path, monkeypatch, capsys):
    """`--ui-port 9092` was told "(0 = any free port)", which --ui-port refuses."""
    skab = need_dataset("skab", "data")
    monkeypatch.chdir(tmp_path)
    assert main(["up", "--data-dir", str(skab), "--state-dir", str(tmp_path / "s"), "--fleet", "valve1/0",
                 "--ui-port", "9092"]) == 2
    err = capsys.readouterr().err
    assert "one port for two parts" in err and "the metrics ports also take 0" in err
    assert "(0 = any free port)" not in err


def test_metrics_ports_of_0_become_free_ports_the_banner_can_give():
    """Set to 0 as the port-in-use advice says, the ports were the children's secret: no metrics or health
    line in the banner, and no wait for the worker's health."""
    from anomaly.config import build_settings

    settings = up.with_free_metrics_ports(build_settings({"worker": {"metrics_port": 0}, "scheduler": {"metrics_port": 0}}))
    w, s = settings.worker.metrics_port, settings.scheduler.metrics_port
    assert w > 0 and s > 0 and w != s
    text = up.banner(bootstrap="127.0.0.1:9092", settings=settings, ui=None, fleet=[("pump-1", "valve1/0")], speed=10,
                     state_dir=Path("mlruns/up"), champion="1", retrain_every_s=900, local_broker=True)
    assert f":{w}/healthz" in text and f":{s}/healthz" in text
    off = up.with_free_metrics_ports(build_settings({"worker": {"metrics_port": -1}, "scheduler": {"metrics_port": 9109}}))
    assert (off.worker.metrics_port, off.scheduler.metrics_port) == (-1, 9109)


def test_free_ports_are_distinct():
    """The end-to-end test took four ports one by one; two alike gave "one port for two parts" at once."""
    from anomaly.broker import free_ports

    ports = free_ports(32)
    assert len(set(ports)) == 32 and all(port > 0 for port in ports)


def test_each_retrain_the_scheduler_finishes_gets_a_console_line(tmp_path):
    # a promotion showed on the console only as event lines whose model version changed
    log_path = tmp_path / "scheduler.log"
    last = {"last_run_ts": 1796628276.0, "last_success_ts": 1796628276.0, "last_outcome": "promoted"}
    line = up.retrain_line(last, None, log_path)
    assert line.startswith("retrain at ") and "promoted" in line and str(log_path) in line
    assert up.retrain_line(last, 1796628276.0, log_path) is None  # seen already
    assert up.retrain_line({"last_run_ts": 1.0}, None, log_path) is None  # no outcome yet (a run marked running)
    assert up.retrain_line({}, None, log_path) is None
    path = tmp_path / "scheduler.db.last.json"
    assert up._read_last(path) == {} and up._read_last(None) == {}
    path.write_text("{not json")
    assert up._read_last(path) == {}
