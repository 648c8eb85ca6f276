"""Replay against the real broker (the session ``kafka_broker``): a small frame as a fleet of three
entities, read back with ``kafka_io.read_all``."""

from __future__ import annotations

import time

import numpy as np
import pytest

from anomaly.codec import Reading, decode_reading
from anomaly.kafka_io import ensure_topics, read_all
from anomaly.replay import replay, replay_plan
from tests.fixtures import missing_requirement, normal_frame

pytestmark = pytest.mark.integration

START = 1_800_000_000.0


def test_fleet_replay_reads_back_keyed_ordered_and_spaced_as_recorded(kafka_broker: str, topic_name: str) -> None:
    frame = normal_frame(40)  # 1 s spacing
    frame.iloc[5, frame.columns.get_loc("flow")] = np.nan
    ensure_topics(kafka_broker, {topic_name: 2})
    plan = replay_plan(frame, "pump", copies=3, offset_rows=4, start_ts=START)

    confirmed: list[int] = []
    stats = replay(kafka_broker, topic_name, plan, rate_per_s=2000, progress=False,
                   on_delivered=lambda: confirmed.append(1))

    assert stats.sent == 120 and stats.seconds > 0 and len(confirmed) == 120
    records = read_all(kafka_broker, topic_name, timeout_s=15, idle_s=1.0)
    assert len(records) == 120
    by_entity: dict[str, list[tuple[int, int, Reading]]] = {}
    for record in records:
        reading = decode_reading(record.value)
        assert isinstance(reading, Reading), reading
        assert record.key.decode("utf-8") == reading.entity
        by_entity.setdefault(reading.entity, []).append((record.partition, record.offset, reading))
    assert sorted(by_entity) == ["pump-0", "pump-1", "pump-2"]
    for i, (entity, items) in enumerate(sorted(by_entity.items())):
        assert len({partition for partition, _, _ in items}) == 1  # keyed: one partition per entity
        items.sort(key=lambda item: item[1])  # offset order = the order they were sent
        readings = [reading for _, _, reading in items]
        ts = np.array([r.ts for r in readings])
        assert ts[0] == pytest.approx(START + 4 * i, abs=1e-6)  # copy i is delayed by 4 rows of 1 s
        np.testing.assert_allclose(np.diff(ts), 1.0)  # in order, spaced as recorded
        assert readings[5].values["flow"] is None  # NaN went out as null
        np.testing.assert_allclose([r.values["temp"] for r in readings], frame["temp"].to_numpy())


# --- the command line ----------------------------------------------------------------------------

def test_replay_command_sends_a_file_as_a_fleet(kafka_broker: str, topic_name: str, tmp_path, capsys) -> None:
    import json

    from anomaly.cli import main

    path = tmp_path / "readings.csv"
    frame = normal_frame(10)
    frame.assign(anomaly=0).reset_index().to_csv(path, index=False)
    code = main(["replay", "--data", str(path), "--copies", "2", "--offset-rows", "3", "--entity", "fan",
                 "--bootstrap-servers", kafka_broker, "--topic", topic_name, "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sent"] == 20 and summary["entities"] == ["fan-0", "fan-1"]
    readings = [decode_reading(r.value) for r in read_all(kafka_broker, topic_name, timeout_s=15, idle_s=1.0)]
    assert len(readings) == 20
    assert all(set(r.values) == {"temp", "pressure", "flow"} for r in readings)  # the label column stays home

    # --sensors: only those, in that order (a model that reads some of the table's sensors).
    other = f"{topic_name}-some"
    assert main(["replay", "--data", str(path), "--sensors", "flow,temp", "--bootstrap-servers", kafka_broker,
                 "--topic", other, "--quiet"]) == 0
    capsys.readouterr()
    some = [decode_reading(r.value) for r in read_all(kafka_broker, other, timeout_s=15, idle_s=1.0)]
    assert len(some) == 10 and all(list(r.values) == ["flow", "temp"] for r in some)
    np.testing.assert_allclose([r.values["temp"] for r in some], frame["temp"].to_numpy())


def test_a_second_replay_continues_after_stamps_an_earlier_sped_up_one_left_ahead_of_the_clock(
        kafka_broker: str, topic_name: str, tmp_path, capsys) -> None:
    # A replay stamps from now with the recorded spacing; sent faster than recorded, its last stamps run
    # ahead of the clock. A second replay stamped from now again was behind them: a worker dropped most of
    # its readings as late (README recipe run twice: 78 % of the second run unscored).
    import json

    from anomaly.cli import main
    from anomaly.kafka_io import read_tail
    from anomaly.replay import resume_ts

    path = tmp_path / "readings.csv"
    normal_frame(600).reset_index().to_csv(path, index=False)  # 10 minutes at 1 s
    ensure_topics(kafka_broker, {topic_name: 2})
    assert resume_ts(kafka_broker, topic_name, 1.0) is None  # an empty topic: from now
    args = ["replay", "--data", str(path), "--entity", "fan", "--copies", "2", "--bootstrap-servers", kafka_broker,
            "--topic", topic_name, "--quiet"]
    assert main(args) == 0  # as fast as it can: stamps up to 10 minutes ahead
    capsys.readouterr()
    records = read_all(kafka_broker, topic_name, timeout_s=15, idle_s=1.0)
    first = [decode_reading(r.value) for r in records]
    sent_before = {r.partition: r.offset for r in records}  # each partition's last offset (sorted by offset)
    newest = max(r.ts for r in first)
    assert len(first) == 1200 and newest > time.time() + 500

    tail = read_tail(kafka_broker, topic_name)
    assert {r.partition for r in tail} == {r.partition for r in read_all(kafka_broker, topic_name, idle_s=0.5)}
    assert max(decode_reading(r.value).ts for r in tail) == newest  # the newest reading is in the tail
    assert resume_ts(kafka_broker, topic_name, 1.0) == newest + 1.0

    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["sent"] == 1200
    second = [decode_reading(r.value) for r in read_all(kafka_broker, topic_name, timeout_s=15, idle_s=1.0)
              if r.offset > sent_before.get(r.partition, -1)]
    assert len(second) == 1200 and min(r.ts for r in second) == pytest.approx(newest + 1.0, abs=1e-3)
    assert read_tail(kafka_broker, f"{topic_name}-none") == []  # a missing topic: nothing, and not created


def test_broker_command_on_a_port_in_use_exits_2(kafka_broker: str, capsys) -> None:
    from anomaly.cli import main

    port = kafka_broker.rsplit(":", 1)[1]
    assert main(["broker", "--port", port]) == 2
    assert f"port {port}" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_broker_command_runs_until_sigterm_or_its_terminal_closes(sig: str) -> None:
    # SIGHUP (the terminal closed) killed it outright: tansu died with it, but its temporary log was left behind
    import glob
    import signal
    import subprocess
    import sys
    import tempfile

    from anomaly.broker import BrokerError, free_port, tansu_binary

    try:
        tansu_binary()
    except BrokerError as exc:
        missing_requirement(f"the broker command needs the local broker: {exc}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "anomaly.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"127.0.0.1:{port}"  # printed once it answers
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=15) == 0
        assert glob.glob(f"{tempfile.gettempdir()}/anomaly-broker-{port}-*.log") == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
