"""The command line: every subcommand answers --help; bad input is a clear error, not a traceback."""

import os
from pathlib import Path

import pytest

from anomaly.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: anomaly " + command)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_bad_config_value_names_the_field(monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_MODEL__WINDOW_SIZE", "one")
    assert main(["config", "show"]) == 2
    assert "model.window_size" in capsys.readouterr().err


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope.csv"), "--no-register", "--quiet"])
    assert code == 2
    assert "nope.csv" in capsys.readouterr().err


@pytest.mark.parametrize("nohup,code", [(False, 129), (True, 0)])
def test_sighup_stops_a_command_unless_it_was_started_with_it_ignored(nohup, code) -> None:
    # `nohup anomaly train &` starts it with SIGHUP ignored so that a dropped session does not stop it:
    # a SIGHUP handler of ours must not undo that
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = ("import os, signal, sys, time\n"
              "from anomaly import cli\n"
              "def job(args):\n"
              "    os.kill(os.getpid(), signal.SIGHUP)\n"
              "    time.sleep(1)\n"
              "    return 0\n"
              "cli.cmd_config = job\n"
              "sys.exit(cli.main(['config', 'show']))\n")
    ignore = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], preexec_fn=ignore)
    assert proc.returncode == code, proc.stderr


def test_a_stop_flag_set_during_a_long_wait_ends_it_soon() -> None:
    # the worker waiting for a first model sleeps 5 s between looks at the registry: a SIGTERM meanwhile
    # (its handler sets the flag; the sleep resumes after it) was seen only when the sleep ended
    import signal
    import threading
    import time

    from anomaly.cli import StopFlag

    stop = StopFlag()
    threading.Timer(0.1, stop, args=(signal.SIGTERM, None)).start()
    started = time.monotonic()
    assert stop.wait(10.0) is True and time.monotonic() - started < 1.0


def test_stop_flag_is_set_by_its_signal() -> None:
    """The foreground commands' SIGTERM/SIGINT handler (a plain flag, not a threading.Event: see
    ``StopFlag``): unset, ``wait`` sleeps and says False; set, it returns True at once."""
    import signal
    import time

    from anomaly.cli import StopFlag

    stop = StopFlag()
    started = time.monotonic()
    assert stop.wait(0.05) is False and time.monotonic() - started >= 0.05
    stop(signal.SIGTERM, None)
    started = time.monotonic()
    assert stop.wait(10.0) is True and time.monotonic() - started < 1.0
    previous = signal.signal(signal.SIGUSR1, StopFlag())
    try:
        flag = signal.getsignal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        assert flag.is_set
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "--dataset", "skab", "--limit", "0"], "--limit: must be > 0"),
    (["replay", "--data", "x.csv", "--copies", "0"], "--copies: must be > 0"),
    (["replay", "--data", "x.csv", "--offset-rows", "-5"], "--offset-rows: must be >= 0"),
    (["replay", "--data", "x.csv", "--speed", "-1"], "--speed: must be > 0"),
    (["replay", "--data", "x.csv", "--rate", "nan"], "--rate: must be > 0"),
    (["train", "--data", "x.csv", "--epochs", "two"], "--epochs: not an integer"),
    (["broker", "--port", "99999"], "--port: must be a port, 1..65535"),
    (["up", "--ui-port", "0"], "--ui-port: must be > 0"),
])
def test_bad_numeric_arguments_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["models", "promote", "2", "--alias", ""], "--alias"),  # moved @champion
    (["models", "rollback", "--alias", " "], "--alias"),
    (["scheduler", "--cron", ""], "--cron"),  # ran every scheduler.interval_s instead
    (["replay", "--data", "x.csv", "--topic", ""], "--topic"),  # sent to kafka.input_topic
    (["train", "--data", "x.csv", "--tracking-uri", ""], "--tracking-uri"),
    (["train", "--data", "x.csv", "--alias", ""], "--alias"),
    (["score", "--data", "x.csv", "--model-alias", " "], "--model-alias"),
    (["score", "--data", "x.csv", "--model-name", "\n"], "--model-name"),
    (["train", "--dataset", "skab", "--series", ""], "--series"),
    (["models", "promote", ""], "version"),
])
def test_an_empty_option_is_a_usage_error_naming_it(argv, option, capsys):
    """``--alias "$ALIAS"`` with the variable unset: each command fell back on the default as if the
    option had not been given, where the same empty value in the config or a variable is refused."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"argument {option}: must not be empty" in capsys.readouterr().err


def test_a_broker_log_that_cannot_be_written_is_said_as_such(tmp_path, capsys):
    # It was "cannot run .../tansu: Is a directory", as if the binary were broken, or a bare "File exists".
    from anomaly.broker import free_port

    port = str(free_port())
    (tmp_path / "file").write_text("")
    for log_path in (tmp_path, tmp_path / "file" / "broker.log"):
        assert main(["broker", "--port", port, "--log", str(log_path)]) == 2
        assert f"cannot write the broker's log {log_path}" in capsys.readouterr().err


def test_evaluate_names_series_the_dataset_does_not_have(capsys):
    from tests.fixtures import need_dataset

    data = need_dataset("skab")
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(data), "--series", "valve1/0,valve1/nosuch",
                 "--no-track", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "valve1/nosuch" in err and "valve1/0" in err.split("named like")[1]


def test_evaluate_says_at_once_when_the_tracking_server_does_not_answer(tmp_path, monkeypatch, capsys):
    # It trained every series first, then spent minutes in the client's retries before failing.
    import socket
    import time

    from anomaly import protocols
    from tests.fixtures import need_dataset

    data = need_dataset("skab")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setattr(protocols, "run_protocol", lambda *a, **k: pytest.fail("trained before the check"))
    started = time.monotonic()
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(data), "--series", "valve1/0",
                 "--tracking-uri", f"http://127.0.0.1:{dead}", "--quiet"]) == 2
    assert "does not answer" in capsys.readouterr().err and time.monotonic() - started < 10


def test_evaluates_bar_counts_a_series_when_it_is_done_not_when_it_begins(tmp_path, monkeypatch):
    """The bar stood at 1/1 (100 %) before the one series had trained."""
    import anomaly.cli as cli
    from anomaly import protocols
    from tests.fixtures import need_dataset

    data = need_dataset("skab")
    seen: list[tuple[str, int]] = []

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

        def set_postfix_str(self, text):
            pass

        def close(self):
            seen.append(("closed", self.n))

    bar = Bar()
    monkeypatch.setattr(cli, "_bar", lambda *a, **k: bar)

    def protocol(dataset, series, settings, progress):
        for s in series:
            progress(s.name)
            seen.append((s.name, bar.n))  # training and scoring of s happen here
        raise SystemExit(0)

    monkeypatch.setattr(protocols, "run_protocol", protocol)
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "skab", "--data-dir", str(data), "--series", "valve1/0,valve1/1",
              "--no-track", "--quiet", "--report", str(tmp_path / "r.md")])
    assert seen == [("valve1/0", 0), ("valve1/1", 1)]


@pytest.mark.parametrize("alias, words", [("bad alias", "not usable"), ("latest", "reserved"), ("v2", "reserved"),
                                          ("1", "reserved")])  # score --model-alias 1 loads version 1
def test_train_refuses_an_unusable_alias_before_training(alias, words, tmp_path, capsys):
    # The data file does not exist: the alias is refused first, so nothing was trained for nothing.
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--alias", alias, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and "nope.csv" not in err and err.count("error:") == 1


def test_commands_refuse_arguments_they_would_ignore(tmp_path, capsys):
    """A flag that would be silently dropped is refused before anything runs (no file is read)."""
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--series", "valve1/0", "--quiet"]) == 2
    assert "--series picks a dataset's data" in capsys.readouterr().err
    assert main(["score", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["score", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "s.xlsx")]) == 2
    assert "unknown table format '.xlsx'; use .csv, .tsv or .parquet" in capsys.readouterr().err  # was CSV inside
    assert not (tmp_path / "s.xlsx").exists()
    for action in ("list", "rollback"):
        assert main(["models", action, "3", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
        assert f"models {action} takes no VERSION" in capsys.readouterr().err


def test_scheduler_start_up_mistakes_are_errors_not_tracebacks(tmp_path, capsys):
    assert main(["scheduler", "--job-store", str(tmp_path), "--run-for-s", "1"]) == 2
    assert "scheduler.job_store" in capsys.readouterr().err
    store = str(tmp_path / "jobs.db")
    assert main(["scheduler", "--job-store", store, "--job", "nomodule:nofunc", "--run-for-s", "1"]) == 2
    assert "--job 'nomodule:nofunc': not a callable" in capsys.readouterr().err
    assert not (tmp_path / "jobs.db").exists()  # refused before the store was opened


def test_train_refuses_promote_without_registering(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--no-register", "--promote", "--quiet"]) == 2
    assert "--no-register" in capsys.readouterr().err


def test_config_show_masks_secrets(monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_KAFKA__CLIENT_OPTIONS", '{"sasl_plain_password": "s3cret", "sasl_plain_username": "u"}')
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", "postgresql://bob:hunter2@db:5432/mlflow")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "hunter2" not in out
    assert '"sasl_plain_username": "u"' in out and "postgresql://bob:***@db:5432/mlflow" in out


def test_a_key_that_is_or_ends_in_key_is_masked():
    # the docstring said keys naming a key are masked; only private_key and ssl_key were
    from anomaly.cli import redacted

    doc = {"api_key": "k1", "ssl_key": "k2", "Key": "k3", "x-api-key": "k4", "apikey": "k5",
           "ssl_keyfile": "/etc/kafka/client.key", "key_count": 3, "monkey": "m"}
    assert redacted(doc) == {"api_key": "***", "ssl_key": "***", "Key": "***", "x-api-key": "***", "apikey": "***",
                             "ssl_keyfile": "/etc/kafka/client.key", "key_count": 3, "monkey": "m"}


def test_an_unknown_log_level_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_LOG_LEVEL", "bogus")
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--log-level" in err and "(from ANOMALY_LOG_LEVEL)" in err


def test_retrain_checks_its_data_file_first(tmp_path, capsys):
    assert main(["retrain", "--data", str(tmp_path / "nope.csv"), "--quiet"]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err
    assert main(["retrain", "--data", str(tmp_path), "--quiet"]) == 2  # as train and score say it
    assert f"--data {tmp_path}: a folder, not a table file" in capsys.readouterr().err


def test_tables_are_split_by_entity_keeping_labels_out(tmp_path, monkeypatch, capsys):
    from anomaly.cli import _labelled_entity_tables
    from anomaly.config import load_config

    path = tmp_path / "fleet.csv"
    path.write_text("ts,machine,temp,fault\n2026-01-01T00:00:00Z,2,40,0\n2026-01-01T00:00:01Z,1,41,1\n"
                    "2026-01-01T00:00:01Z,2,42,0\n")
    monkeypatch.setenv("ANOMALY_DATA__ENTITY_COLUMN", "machine")
    monkeypatch.setenv("ANOMALY_RETRAIN__LABEL_FIELD", "fault")
    fleet = _labelled_entity_tables(str(path), load_config())[0]
    assert list(fleet) == ["2", "1"] and [list(f) for f in fleet.values()] == [["temp"], ["temp"]]
    assert fleet["2"]["temp"].tolist() == [40, 42] and str(fleet["1"].index[0]) == "2026-01-01 00:00:01+00:00"
    # train and score take a fleet (tests/e2e/test_train_and_detect.py); these two are too short for any window
    assert main(["train", "--data", str(path), "--no-register", "--quiet"]) == 2
    assert "no entity has" in capsys.readouterr().err
    monkeypatch.delenv("ANOMALY_DATA__ENTITY_COLUMN")
    plain = _labelled_entity_tables(str(path), load_config())[0]
    assert list(plain) == [str(path)] and list(plain[str(path)]) == ["machine", "temp"]  # no label as a sensor
    named = tmp_path / "named.csv"  # a column named 'entity' needs no setting (train, score and replay read it so)
    named.write_text(path.read_text().replace("machine", "entity"))
    fleet = _labelled_entity_tables(str(named), load_config())[0]
    assert list(fleet) == ["2", "1"] and fleet["2"]["temp"].tolist() == [40, 42]


def test_replay_refuses_sensors_the_table_lacks(tmp_path, capsys):
    """``--sensors`` naming a column the file lacks, or none at all, is refused before any broker is
    contacted (what it sends: tests/integration/test_replay.py)."""
    table = tmp_path / "t.csv"
    table.write_text("ts,a,b\n2026-01-01T00:00:00Z,1,2\n2026-01-01T00:00:01Z,1,2\n")
    base = ["replay", "--data", str(table), "--bootstrap-servers", "127.0.0.1:1"]
    assert main([*base, "--sensors", "b,nosuch"]) != 0
    assert "['nosuch'] not found" in capsys.readouterr().err
    assert main([*base, "--sensors", " , "]) != 0
    assert "--sensors: no sensor named" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # was a ValueError traceback, exit 1
        main([*base, "--entity", " "])
    assert exit_.value.code == 2 and "argument --entity: must not be empty" in capsys.readouterr().err
    assert main([*base, "--series", "valve1/0"]) == 2  # a dataset's flags beside a file: ignored before
    assert "--series picks a dataset's data" in capsys.readouterr().err
    assert main([*base, "--data-dir", str(tmp_path)]) == 2
    assert "--data-dir picks a dataset's data" in capsys.readouterr().err


def test_a_sped_up_replay_warns_that_a_default_worker_would_dead_letter_it(tmp_path, monkeypatch, caplog):
    import logging

    from anomaly import replay

    table = tmp_path / "t.csv"
    rows = "\n".join(f"2026-01-01T00:{m:02d}:{s:02d}Z,1,2" for m in range(20) for s in range(60))
    table.write_text("ts,a,b\n" + rows + "\n")  # 1,200 s of readings
    sent = []
    monkeypatch.setattr(replay, "replay", lambda *a, **k: sent.append(a) or (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(replay, "resume_ts", lambda *a, **k: None)  # the topic holds nothing ahead of the clock
    with caplog.at_level(logging.WARNING, logger="anomaly"), pytest.raises(SystemExit):
        main(["replay", "--data", str(table), "--speed", "10", "--bootstrap-servers", "127.0.0.1:1"])
    assert sent and "up to 1079 s ahead of the clock" in caplog.text and "ANOMALY_WORKER__MAX_FUTURE_S=-1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly"), pytest.raises(SystemExit):
        main(["replay", "--data", str(table), "--speed", "1", "--bootstrap-servers", "127.0.0.1:1"])
    assert "ahead of the clock" not in caplog.text
    caplog.clear()
    # --limit 10 sends 9 s of readings: nothing to warn of (the whole file's 1079 s was said before)
    with caplog.at_level(logging.INFO, logger="anomaly"), pytest.raises(SystemExit):
        main(["replay", "--data", str(table), "--speed", "10", "--limit", "10", "--bootstrap-servers", "127.0.0.1:1"])
    assert "ahead of the clock" not in caplog.text and "the first 10 of 1200 readings" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly"), pytest.raises(SystemExit):
        main(["replay", "--data", str(table), "--speed", "10", "--limit", "1000", "--bootstrap-servers", "127.0.0.1:1"])
    assert "up to 899 s ahead of the clock" in caplog.text  # 999 s of readings sent in 99.9 s
    # The topic holds an earlier sped-up replay's readings, up to 600 s ahead: this one continues after them
    # (a worker would drop readings stamped behind them as late), and so runs further ahead still.
    import time

    newest = time.time() + 600
    monkeypatch.setattr(replay, "resume_ts", lambda bootstrap, topic, period_s, **k: newest + period_s)
    caplog.clear()
    sent.clear()
    with caplog.at_level(logging.INFO, logger="anomaly"), pytest.raises(SystemExit):
        main(["replay", "--data", str(table), "--speed", "10", "--bootstrap-servers", "127.0.0.1:1"])
    first = next(iter(sent[0][2]))[1]
    assert first.ts == pytest.approx(newest + 1.0, abs=1e-6)
    import re

    # (less the seconds the command took to get there)
    assert re.search(r"already holds readings stamped up to (600|599|598) s ahead", caplog.text)
    assert re.search(r"up to (1680|1679|1678) s ahead of the clock", caplog.text)  # 601 s more than the file's 1079


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_replay_stopped_by_sigterm_flushes_what_it_queued(tmp_path, monkeypatch, capsys, signame):
    # SIGTERM (and SIGHUP: its terminal closed) killed it outright (exit 143, 129), the readings queued in
    # the producer never sent; it now stops as Ctrl-C does: flushed, "interrupted", exit 130, and the
    # signal's handler is put back.
    import os
    import signal

    sig = getattr(signal, signame)

    from anomaly import replay

    class Producer:
        def __init__(self) -> None:
            self.sent, self.flushed = 0, False

        def send(self, topic, value=None, key=None):
            self.sent += 1
            if self.sent == 5:
                os.kill(os.getpid(), sig)
            return None

        def flush(self, timeout=None):
            self.flushed = True

        def close(self, timeout=None):
            pass

    producer = Producer()
    real = replay.replay
    monkeypatch.setattr(replay, "resume_ts", lambda *a, **k: None)
    monkeypatch.setattr(replay, "replay",
                        lambda *a, **k: real(*a, **k, producer_factory=lambda bootstrap, options: producer))
    table = tmp_path / "t.csv"
    table.write_text("ts,a\n" + "\n".join(f"2026-01-01T00:00:{s:02d}Z,{s}" for s in range(60)) + "\n")
    unhandled = []  # what the signal does outside the replay here (not kill the test session)
    guard = lambda *_: unhandled.append(True)  # noqa: E731
    before = signal.signal(sig, guard)
    try:
        assert main(["replay", "--data", str(table), "--quiet", "--bootstrap-servers", "127.0.0.1:1"]) == 130
        assert signal.getsignal(sig) is guard
    finally:
        signal.signal(sig, before)
    assert producer.flushed and 5 <= producer.sent < 60 and not unhandled
    assert "interrupted" in capsys.readouterr().err


def test_datasets_are_found_beside_the_checkout_from_any_folder(tmp_path, monkeypatch):
    import anomaly.cli as cli

    # A checkout at tmp/checkout with the datasets beside it, in tmp/shared/datasets.
    beside = tmp_path / "shared" / "datasets" / "skab"
    beside.mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "checkout" / "anomaly" / "cli.py"))
    monkeypatch.delenv("ANOMALY_DATASETS", raising=False)
    usual = Path("..") / "shared" / "datasets" / "skab"
    monkeypatch.chdir(tmp_path / "a" / "b")  # ../shared/datasets from here is not there: beside the checkout
    assert cli.default_data_dir("skab") == beside
    monkeypatch.chdir(tmp_path / "checkout")  # from here it is: the working folder's comes first
    assert cli.default_data_dir("skab") == usual
    beside.rmdir()
    monkeypatch.chdir(tmp_path / "a" / "b")  # nowhere: the usual path, for the error to name
    assert cli.default_data_dir("skab") == usual
    monkeypatch.setenv("ANOMALY_DATASETS", str(tmp_path))
    assert cli.default_data_dir("skab") == tmp_path / "skab"


def test_a_missing_dataset_says_where_to_point(tmp_path, capsys):
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(tmp_path), "--quiet", "--no-track"]) != 0
    assert "ANOMALY_DATASETS" in capsys.readouterr().err


def test_the_daemons_log_without_mlflow_progress_bars(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "x")  # so that teardown restores what was there
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    main(["train", "--data", str(tmp_path / "none.csv")])  # fails: no file; a command with a terminal
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    main(["worker", "--config", str(tmp_path / "none.toml")])  # fails at its config, after the set-up
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_score_quiet_turns_mlflows_download_bar_off(tmp_path, monkeypatch):
    # score had no --quiet: MLflow's "Downloading artifacts" bar wrote a line per file of the model
    import os

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "x")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    main(["score", "--data", str(tmp_path / "none.csv"), "--quiet"])  # fails: no file, after the set-up
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_a_config_file_overrides_a_dataset_profile_field_by_field(tmp_path, monkeypatch):
    """``train --dataset skab --config f.toml`` keeps the SKAB profile's sensors, shape and threshold for
    every field the file does not set (a file naming only the MLflow store must not swap the profile
    for the defaults); the file's fields, then the environment, then the flags win."""
    import argparse

    from anomaly.cli import _settings
    from anomaly.protocols import PROFILES, SKAB_PROFILE_SENSORS

    for key in [k for k in os.environ if k.startswith("ANOMALY_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "f.toml"
    config.write_text('[training]\nepochs = 1\n[threshold]\nscale = 1.5\n[mlflow]\nmodel_name = "pumps"\n')
    args = argparse.Namespace(config=str(config), epochs=None, device=None, tracking_uri=None, model_name=None)
    settings = _settings(args, base=PROFILES["skab"])
    assert settings.data.sensors == list(SKAB_PROFILE_SENSORS) and settings.data.scaler == "robust"
    assert (settings.model.window_size, settings.threshold.method, settings.threshold.q) == (10, "quantile", 0.95)
    assert (settings.training.epochs, settings.threshold.scale, settings.mlflow.model_name) == (1, 1.5, "pumps")
    monkeypatch.setenv("ANOMALY_TRAINING__EPOCHS", "3")
    assert _settings(args, base=PROFILES["skab"]).training.epochs == 3
    args.epochs = 5
    assert _settings(args, base=PROFILES["skab"]).training.epochs == 5



def test_data_mistakes_are_said_in_the_operators_words(tmp_path, capsys):
    """No internal names (to_grid, timestamp_col, SensorIssue(...)) in what a user reads."""
    (tmp_path / "header.csv").write_text("ts,a,b\n")
    (tmp_path / "flat.csv").write_text("ts,a\n" + "".join(f"2026-01-01T00:00:{i:02d}Z,1\n" for i in range(30)))
    (tmp_path / "nots.csv").write_text("when,a\nx,1\n")
    (tmp_path / "top.toml").write_text("window_size = 10\n")
    cases = [(["train", "--data", str(tmp_path)], "a folder, not a table file"),
             (["train", "--data", str(tmp_path / "header.csv")], "header.csv: no data rows (a header only)"),
             (["train", "--data", str(tmp_path / "flat.csv")], "a: constant"),
             (["train", "--data", str(tmp_path / "nots.csv")], "name it with data.timestamp_column"),
             (["config", "show", "--config", str(tmp_path / "top.toml")], "every setting belongs under its [section]")]
    for argv, words in cases:
        assert main([*argv, *(["--no-register", "--quiet"] if argv[0] == "train" else [])]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and "SensorIssue" not in err, (argv, err)


def test_a_worker_serving_an_alias_promotions_never_move_is_warned_about() -> None:
    from anomaly.cli import unfollowed_alias
    from anomaly.config import build_settings

    assert unfollowed_alias(build_settings({})) is None
    assert unfollowed_alias(build_settings({"worker": {"model_alias": "challenger"}})) is None  # a canary
    said = unfollowed_alias(build_settings({"mlflow": {"champion_alias": "prod"}}))
    assert said and "@champion" in said and "mlflow.champion_alias (@prod)" in said


def test_scored_rows_name_a_top_sensor_only_where_they_have_a_score(caplog):
    import logging

    import numpy as np
    import pandas as pd

    from anomaly.cli import _score_table
    from anomaly.config import build_settings
    from anomaly.detector import fit_detector
    from anomaly.training import TrainConfig
    from tests.fixtures import SENSORS, normal_frame

    detector, _, _ = fit_detector(normal_frame(300).to_numpy(), SENSORS, {"window_size": 8, "hidden_size": 8,
                                                                          "latent_size": 4},
                                  TrainConfig(epochs=1, batch_size=64, seed=0, device="cpu", progress=False),
                                  threshold_method="quantile", threshold_params={"q": 0.9}, period_s=1.0)
    frame = normal_frame(120, seed=3)
    frame.iloc[50:70] = np.nan  # an outage longer than max_fill_steps: the windows over it get no score
    frame.iloc[:30, frame.columns.get_loc("flow")] = np.nan  # flow starts late: its typical value stands in
    table = _score_table(detector, frame, build_settings({"data": {"max_fill_steps": 2}}), "pump").table
    no_score = table["score"].isna().to_numpy()
    assert no_score[50:77].all() and not no_score[7:50].any()  # rows 7-29 scored although flow was silent
    assert (table["top_sensor"][no_score] == "").all() and (table["top_sensor"][~no_score] != "").all()
    # data.max_fill_steps unset: the worker's (5 slots), as the stream of this file would be scored
    assert build_settings({}).worker.max_fill_steps == 5
    assert _score_table(detector, frame, build_settings({}), "pump").table["score"].isna().to_numpy()[50:77].all()
    short = normal_frame(120, seed=3)
    short.iloc[50:55] = np.nan  # a gap of 5 slots is bridged, as the worker bridges it
    assert not _score_table(detector, short, build_settings({}), "pump").table["score"].isna().to_numpy()[7:].any()
    assert "apart (median)" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="anomaly.cli"):
        _score_table(detector, frame.iloc[::2], build_settings({}), "pump")
    assert "pump: readings are 2 s apart (median) where the model's grid is 1 s: slots between readings are " \
           "filled, not read" in caplog.text
    assert "repeat an earlier" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="anomaly.cli"):
        _score_table(detector, pd.concat([frame, frame.iloc[[40, 45]]]), build_settings({}), "pump")
    assert "pump: 2 readings repeat an earlier one's timestamp and are left out: the first is scored" in caplog.text
    changed = frame.iloc[[40, 45]] + 1000.0  # a later reading of the same timestamp, far off: the first is scored
    assert _score_table(detector, pd.concat([frame, changed]), build_settings({}), "pump").table["score"].equals(
        _score_table(detector, frame, build_settings({}), "pump").table["score"])


def test_a_spans_sensor_null_in_the_file_at_its_peak_row_is_said_filled_not_shown_as_read():
    # `anomaly score` showed the value the grid carried over (or the typical one) as a sensor's `actual` at
    # the peak window's last row, where the file had none: say it as the worker's events do (actual null,
    # filled true), and a sensor read there keeps its reading with filled false.
    import numpy as np

    from anomaly.cli import _score_table
    from anomaly.config import build_settings
    from anomaly.detector import fit_detector
    from anomaly.training import TrainConfig
    from tests.fixtures import SENSORS, normal_frame

    detector, _, _ = fit_detector(normal_frame(300).to_numpy(), SENSORS, {"window_size": 8, "hidden_size": 8,
                                                                          "latent_size": 4},
                                  TrainConfig(epochs=1, batch_size=64, seed=0, device="cpu", progress=False),
                                  threshold_method="quantile", threshold_params={"q": 0.9}, period_s=1.0)
    frame = normal_frame(120, seed=3)
    pressure = frame.columns.get_loc("pressure")
    frame.iloc[60:66, pressure] += 5.0  # a pressure fault, then pressure silent (carried over, within max_fill_steps)
    frame.iloc[66:70, pressure] = np.nan
    part = _score_table(detector, frame, build_settings({}), "pump")
    ts = part.table["ts"].astype(str).tolist()
    span = next(s for s in part.spans if ts.index(s["start"]) <= 67 <= ts.index(s["end"]))
    start, end = ts.index(span["start"]), ts.index(span["end"]) + 1
    peak_row = start + int(np.argmax(part.table["score"].to_numpy()[start:end]))  # the row its peak window ends on
    by_sensor = {item["sensor"]: item for item in span["sensors"]}
    assert 66 <= peak_row < 70, peak_row  # the peak window ends where pressure was null in the file
    assert by_sensor["pressure"]["actual"] is None and by_sensor["pressure"]["filled"] is True
    assert by_sensor["pressure"]["expected"] is not None
    assert by_sensor["temp"]["filled"] is False  # read there: its reading, as before
    assert by_sensor["temp"]["actual"] == frame.iloc[peak_row, frame.columns.get_loc("temp")]


def test_a_file_sampled_otherwise_than_the_model_is_said():
    # A 2 s file on a 1 s model was scored with every other slot filled, and a 0.5 s one with half its
    # readings dropped, without a word (`_score_table` says it: test_scored_rows_name_a_top_sensor...).
    import numpy as np
    import pandas as pd

    from anomaly.grid import sampling_mismatch

    index = pd.date_range("2026-01-01", periods=50, freq="2s", tz="UTC")
    assert sampling_mismatch(index, 1.0) == 2.0 and sampling_mismatch(index, 4.0) == 2.0
    assert sampling_mismatch(index, 2.0) is None and sampling_mismatch(index, 2.4) is None  # within 25 %
    assert sampling_mismatch(index[:1], 1.0) is None and sampling_mismatch(index, None) is None
    jittered = index + pd.to_timedelta([0.1 * (i % 3) for i in range(50)], unit="s")
    assert sampling_mismatch(jittered.sort_values(), 2.0) is None
    # a sensor per row, 3 ms apart, every 2 s: sampled every 2 s, as training's grid reads it (not 3 ms)
    rows = index.append(index + pd.Timedelta(milliseconds=3)).sort_values()
    cells = pd.DataFrame({"a": [1.0, np.nan] * 50, "b": [np.nan, 2.0] * 50}, index=rows)
    assert sampling_mismatch(rows, 2.0, cells) is None and sampling_mismatch(rows, 2.0) is not None


def test_paths_that_cannot_be_made_are_errors_naming_them_not_tracebacks(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["scheduler", "--job-store", str(blocker / "s.db")]) == 2
    assert "scheduler.job_store: cannot make the lock file" in capsys.readouterr().err
    data = tmp_path / "d.csv"
    data.write_text("ts,x\n2020-01-01 00:00:00,1\n")
    assert main(["score", "--data", str(data), "--out", str(blocker / "s.csv")]) == 2
    assert "no folder" in capsys.readouterr().err


def test_a_password_holding_an_at_sign_is_masked_whole(monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_MLFLOW__REGISTRY_URI", "https://user:p@ss@mlflow.example.com/x")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "ss@" not in out.replace("user:***@mlflow", "") and "https://user:***@mlflow.example.com/x" in out


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://anomaly:s3cr/et@db:5432/mlflow", "postgresql://anomaly:***@db:5432/mlflow"),  # SQLAlchemy takes a /
    ("postgresql://db/mlflow?user=a&password=s3cr/et", "postgresql://db/mlflow?user=a&password=***"),  # libpq's form
    ("postgresql://db/mlflow?password=s3cr/et&sslmode=require", "postgresql://db/mlflow?password=***&sslmode=require"),
    ("postgresql://:s3cret@db/mlflow", "postgresql://:***@db/mlflow"),  # no user name
    ("host=db password='my s3cret' dbname=mlflow", "host=db password=*** dbname=mlflow"),  # quoted, with a space
    ("postgresql://db/mlflow?sslpassword=s3cret", "postgresql://db/mlflow?sslpassword=***"),
])
def test_config_show_masks_every_spelling_of_a_store_password(uri, shown, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", uri)
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "s3cr" not in out and shown in out


def test_evaluate_refuses_its_output_paths_before_reading_any_data(tmp_path, capsys):
    # No data folder at all: the path error must come first (it used to come after the whole protocol).
    missing = tmp_path / "no-data"
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(missing), "--report", str(tmp_path),
                 "--no-track", "--quiet"]) == 2
    assert f"--report {tmp_path} is a folder" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(missing), "--json", str(tmp_path),
                 "--report", str(tmp_path / "r.md"), "--no-track", "--quiet"]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


def test_evaluate_reads_its_settings_before_the_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANOMALY_MODEL__WINDOW_SIZE", "-5")
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(tmp_path / "no-data"), "--no-track"]) == 2
    assert "model.window_size" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_training_device_the_machine_lacks_is_refused_before_the_data_is_read(tmp_path, capsys):
    data = tmp_path / "nope.csv"  # not there: the device is said first
    assert main(["train", "--data", str(data), "--device", "cuda", "--no-register", "--quiet"]) == 2
    assert "training.device: cuda asked for but CUDA is not available" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "skab", "--data-dir", str(tmp_path), "--device", "cuda", "--no-track"]) == 2
    assert "training.device" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_up_refuses_a_device_the_machine_lacks_before_anything_starts(tmp_path, capsys, monkeypatch):
    from anomaly import up

    started = []
    monkeypatch.setattr(up, "run", lambda *a, **kw: started.append(a) or 0)
    state = ["--state-dir", str(tmp_path / "state"), "--data-dir", str(tmp_path)]
    assert main(["up", "--device", "cuda", *state]) == 2  # with a champion it ran, and every retrain failed
    assert "training.device: cuda asked for but CUDA is not available" in capsys.readouterr().err
    monkeypatch.setenv("ANOMALY_WORKER__DEVICE", "cuda:1")
    assert main(["up", *state]) == 2
    assert "worker.device: cuda:1 asked for but CUDA is not available" in capsys.readouterr().err
    assert started == []


def test_models_usage_is_checked_before_the_store_is_reached_or_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["models", "promote", "--tracking-uri", "http://127.0.0.1:1"]) == 2  # nothing answers there
    assert "models promote needs a VERSION" in capsys.readouterr().err
    assert main(["models", "promote"]) == 2
    assert not (tmp_path / "mlruns").exists()


def test_models_prune_usage_is_checked_before_the_store_is_reached_or_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    down = ["--tracking-uri", "http://127.0.0.1:1"]  # nothing answers there
    assert main(["models", "prune", "--keep", "-2", *down]) == 2
    assert "--keep: is -2: pruning is off; give how many refused challengers to keep" in capsys.readouterr().err
    monkeypatch.setenv("ANOMALY_RETRAIN__KEEP_CHALLENGERS", "-1")
    assert main(["models", "prune", *down]) == 2
    assert "retrain.keep_challengers: is -1: pruning is off (give --keep N)" in capsys.readouterr().err
    assert main(["models", "list", "--keep", "3", *down]) == 2
    assert "models list does not take --keep; --keep and --dry-run are for prune" in capsys.readouterr().err
    assert main(["models", "rollback", "--dry-run", *down]) == 2
    assert "--keep and --dry-run are for prune" in capsys.readouterr().err
    assert main(["models", "prune", "--json", "--keep", "1", *down]) == 2
    assert "models prune does not take --json; --json is for list" in capsys.readouterr().err
    assert main(["models", "prune", "3", "--keep", "1", *down]) == 2
    assert "--dry-run names them" in capsys.readouterr().err
    monkeypatch.setenv("ANOMALY_RETRAIN__KEEP_CHALLENGERS", "-2")
    assert main(["models", "list", *down]) == 2
    assert "retrain.keep_challengers" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()


def test_events_usage_is_checked_before_the_broker_is_reached(capsys):
    down = ["--bootstrap-servers", "127.0.0.1:1"]  # nothing answers there
    assert main(["events", "--limit", "-1", *down]) == 2
    assert "--limit must be >= 0 (0 lists every event), got -1" in capsys.readouterr().err
    assert main(["events", "--since", "yesterday", *down]) == 2
    assert "--since: " in capsys.readouterr().err


@pytest.mark.parametrize("command", [["worker"], ["replay", "--data", "x.csv"]])
def test_bootstrap_servers_from_the_command_line_are_checked_like_the_configs(command, capsys):
    assert main([*command, "--bootstrap-servers", "localhost:abc"]) == 2
    assert "kafka.bootstrap_servers" in capsys.readouterr().err


def test_retrain_refuses_a_folder_as_its_job_store_as_the_scheduler_does(tmp_path, capsys):
    assert main(["retrain", "--job-store", str(tmp_path), "--quiet"]) == 2
    assert "scheduler.job_store" in capsys.readouterr().err


def test_reading_commands_refuse_a_store_file_that_does_not_exist(tmp_path, capsys):
    """`models list` on a mistyped sqlite URI made an empty store there and listed nothing, exit 0;
    `score` made one before failing on the missing model. Now both name the field and make nothing."""
    typo = tmp_path / "mlrnus" / "mlflow.db"
    assert main(["models", "list", "--tracking-uri", f"sqlite:///{typo}"]) == 2
    err = capsys.readouterr().err
    assert f"mlflow.tracking_uri: no MLflow store at {typo}: the file does not exist" in err
    data = tmp_path / "d.csv"
    data.write_text("ts,x\n2020-01-01 00:00:00,1\n2020-01-01 00:00:01,2\n")
    assert main(["score", "--data", str(data), "--tracking-uri", f"sqlite:///{typo}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not typo.parent.exists()


@pytest.mark.parametrize("signame,code,says", [("SIGTERM", 143, "terminated"), ("SIGHUP", 129, "hung up")])
def test_a_one_shot_command_stopped_by_sigterm_unwinds_as_ctrl_c_and_exits_143(monkeypatch, capsys, signame,
                                                                                 code, says):
    # SIGTERM (docker stop, a Kubernetes Job's deadline, `timeout`) killed `anomaly train` outright: its
    # MLflow run stayed RUNNING for ever. It now unwinds as Ctrl-C does (tracking.Run ends it KILLED).
    # SIGHUP too (its terminal closed, an SSH session dropped): exit 129.
    import os
    import signal
    import time

    from anomaly import cli

    sig = getattr(signal, signame)
    unwound = []

    def long_job(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        except KeyboardInterrupt:  # what tracking.Run.__exit__ sees: KILLED
            unwound.append("KILLED")
            raise
        return 0

    monkeypatch.setattr(cli, "cmd_config", long_job)
    guard = lambda *_: None  # noqa: E731
    before = signal.signal(sig, guard)
    try:
        started = time.monotonic()
        assert cli.main(["config", "show"]) == code
        assert time.monotonic() - started < 4 and unwound == ["KILLED"]
        assert signal.getsignal(sig) is guard  # put back
    finally:
        signal.signal(sig, before)
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("command", [["worker"], ["scheduler"]])
def test_a_daemon_stopped_before_its_own_handlers_are_in_exits_at_once(monkeypatch, capsys, command):
    # In a container without an init the command is PID 1, and the kernel drops a signal PID 1 has no
    # handler for: a worker sent SIGTERM while it imported torch went on consuming until SIGKILL. The
    # daemons' start now stops on SIGTERM as the one-shot commands do (exit 143).
    import os
    import signal
    import time

    from anomaly import cli

    def starting(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, f"cmd_{command[0]}", starting)
    guard = lambda *_: None  # noqa: E731  (as PID 1 with no handler: the signal goes nowhere)
    before = signal.signal(signal.SIGTERM, guard)
    try:
        started = time.monotonic()
        assert cli.main(command) == 143
        assert time.monotonic() - started < 4
        assert signal.getsignal(signal.SIGTERM) is guard
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "terminated" in capsys.readouterr().err


def test_a_worker_stopped_while_it_is_being_built_exits_0(tmp_path, monkeypatch, caplog):
    # The wait's SIGTERM handler was put back before the worker was built, and the worker's own came after:
    # a SIGTERM in between (building connects nothing, but traces the model) killed it with 143, not exit 0.
    import logging
    import os
    import signal

    from anomaly import model_follower, worker

    class Follower:
        model_name, version = "pump", "1"

    class Worker:
        ran = False

        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # the operator stops it now

        def install_signal_handlers(self):
            pass

        def run(self, **kwargs):
            Worker.ran = True

    monkeypatch.setattr(model_follower, "wait_for_follower", lambda *a, **k: Follower())
    monkeypatch.setattr(worker, "Worker", Worker)
    config = tmp_path / "a.toml"
    config.write_text(f'[mlflow]\ntracking_uri = "sqlite:///{tmp_path}/mlflow.db"\n[worker]\nmetrics_port = -1\n')
    unhandled = []
    guard = lambda *_: unhandled.append(True)  # noqa: E731
    before = signal.signal(signal.SIGTERM, guard)
    try:
        with caplog.at_level(logging.INFO, logger="anomaly"):
            assert main(["worker", "--config", str(config)]) == 0
        assert signal.getsignal(signal.SIGTERM) is guard
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not Worker.ran and not unhandled and "worker: stopped while starting" in caplog.text


@pytest.mark.parametrize("command", [["evaluate", "--dataset", "skab", "--model-name", "m"],
                                     ["replay", "--dataset", "skab", "--tracking-uri", "sqlite:///x.db"],
                                     ["broker", "--model-name", "m"]])
def test_mlflow_flags_a_command_does_not_use_are_refused(command, capsys):
    # evaluate registers nothing, replay and the broker touch no MLflow store: the flags did nothing
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_train_with_promote_refuses_an_unusable_lock_folder_before_training(tmp_path, monkeypatch, capsys):
    # the version was trained and registered, then the promotion failed on the lock file
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ANOMALY_MLFLOW__LOCK_DIR", str(blocker / "locks"))
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    import anomaly.train_job as train_job

    monkeypatch.setattr(train_job, "run_training", lambda *a, **k: pytest.fail("must not train"))
    data = tmp_path / "d.csv"
    data.write_text("timestamp,a\n2024-01-01 00:00:00,1\n")
    assert main(["train", "--data", str(data), "--promote"]) == 2
    assert "mlflow.lock_dir" in capsys.readouterr().err


@pytest.mark.parametrize("command, said", [
    (["models", "list", "--alias", "champion"], "models list does not take --alias"),
    (["models", "list", "--reason", "why"], "does not take --reason"),
    (["models", "rollback", "--json"], "models rollback does not take --json"),
    (["config", "example", "--config", "/nonexistent.toml"], "config example shows the defaults"),
    (["config", "reference", "--model-name", "m"], "does not take --model-name"),
])
def test_flags_a_command_would_ignore_are_refused(command, said, tmp_path, monkeypatch, capsys):
    # each was taken and ignored: an alias that moved nothing, a config file never read (exit 0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANOMALY_MLFLOW__TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "x.csv").write_text("timestamp,a\n2024-01-01 00:00:00,1\n")
    assert main(command) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store was made


def test_kafka_pythons_slow_task_notes_are_dropped_and_its_other_warnings_kept(caplog, capsys):
    import logging

    assert main(["config", "example"]) == 0
    selector = logging.getLogger("kafka.net.selector")
    with caplog.at_level(logging.WARNING):
        selector.warning("Task <kafka.net.selector.Task object> ran for 1.244s (>0.100s threshold). It is blocking "
                         "the event loop -- likely a tight sync loop inside a coroutine.")
        selector.warning("Wakeup socket returned empty. Rebuilding.")
    assert "blocking the event loop" not in caplog.text and "Wakeup socket returned empty" in caplog.text
    assert main(["config", "example"]) == 0 and len(selector.filters) == 1  # one filter however often main runs


def test_a_consumer_s_offset_reset_is_logged_as_a_warning_saying_what_it_skipped(caplog):
    """kafka-python says at INFO that a fetch offset is out of range (retention deleted what was not read
    yet, or the topic was made again) and that it reset the position: the CLI kept the kafka loggers at
    WARNING, so the skip left no trace. Now the first is a warning that says so, the second passes at INFO,
    and the fetcher's other INFO lines stay out."""
    import logging

    assert main(["config", "example"]) == 0
    fetcher = logging.getLogger("kafka.consumer.fetcher")
    with caplog.at_level(logging.INFO):
        fetcher.info("Fetch offset %s is out of range for topic-partition %s", 300, "sensors-0")
        fetcher.info("Resetting offset for partition %s to offset %s.", "sensors-0", 0)
        fetcher.info("Adding fetch request for partition %s at offset %d", "sensors-0", 0)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "kafka.consumer.fetcher"]
    assert said[0][0] == "WARNING" and said[0][1].startswith("Fetch offset 300 is out of range for topic-partition "
                                                             "sensors-0: the position is not in the partition")
    assert "records it skips are not scored" in said[0][1]
    assert said[1:] == [("INFO", "Resetting offset for partition sensors-0 to offset 0.")]
    assert main(["config", "example"]) == 0 and len(fetcher.filters) == 1
    caplog.clear()  # a reader starting from the beginning resets every partition: noise, not news
    with caplog.at_level(logging.INFO):
        fetcher.info("Resetting offset for partition %s to offset %s.", "sensors-1", 0)
        fetcher.info("Resetting offset for partition %s to offset %s.", "sensors-0", 0)  # said once already
    assert not [r for r in caplog.records if r.name == "kafka.consumer.fetcher"]
    caplog.clear()  # --log-level WARNING: the warning, not the INFO line after it
    assert main(["--log-level", "WARNING", "config", "example"]) == 0
    fetcher.info("Fetch offset %s is out of range for topic-partition %s", 300, "sensors-0")
    fetcher.info("Resetting offset for partition %s to offset %s.", "sensors-0", 0)
    assert [r.levelname for r in caplog.records if r.name == "kafka.consumer.fetcher"] == ["WARNING"]
    fetcher.info("Resetting offset for partition %s to offset %s.", "sensors-0", 0)  # (clears its mark)
    caplog.clear()  # --log-level ERROR: neither (set here: basicConfig leaves pytest's root logger as it is)
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        assert main(["--log-level", "ERROR", "config", "example"]) == 0
        fetcher.info("Fetch offset %s is out of range for topic-partition %s", 300, "sensors-0")
    finally:
        root.setLevel(before)
        fetcher.setLevel(logging.INFO)
    assert not [r for r in caplog.records if r.name == "kafka.consumer.fetcher"]


def test_commands_read_tables_in_data_timezone(tmp_path, monkeypatch):
    import pandas as pd

    from anomaly.cli import _labelled_entity_tables
    from anomaly.config import load_config

    path = tmp_path / "local.csv"
    path.write_text("ts,temp\n2024-10-27 02:30:00,1\n2024-10-27 02:30:00,2\n2024-10-27 03:00:00,3\n")
    monkeypatch.setenv("ANOMALY_DATA__TIMEZONE", "Europe/Berlin")
    fleet = _labelled_entity_tables(str(path), load_config())[0]
    (frame,) = fleet.values()
    assert frame.index.tolist() == [pd.Timestamp("2024-10-27T00:30:00Z"), pd.Timestamp("2024-10-27T01:30:00Z"),
                                    pd.Timestamp("2024-10-27T02:00:00Z")]  # the repeated hour, both passes


def test_an_mlflow_error_mid_command_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    # the tracking server going away mid-command (its retries spent): `anomaly train` ended in 250 lines of
    # chained tracebacks, exit 1
    from mlflow.exceptions import MlflowException

    from anomaly import registry

    def gone(*args, **kwargs):
        raise MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/registered-models/search failed "
                              "with exception HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded")

    monkeypatch.setattr(registry, "list_versions", gone)
    from anomaly import tracking

    store = tmp_path / "mlflow.db"
    tracking.configure(f"sqlite:///{store}")
    tracking.ensure_experiment("anomaly", str(tmp_path / "art"))  # a store that exists
    assert main(["models", "list", "--tracking-uri", f"sqlite:///{store}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: MLflow: API request to http://mlflow:5000") and \
        "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["feedback", "normal"], "feedback normal needs an EVENT_ID"),
    (["feedback", "anomaly", "--entity", "pump-7", "--start", "0"], "or --entity, --start and --end"),
    (["feedback", "normal", "e1", "--entity", "pump-7"], "not both (got --entity"),
    (["feedback", "list", "e1"], "feedback list does not take EVENT_ID"),
    (["feedback", "normal", "e1", "--json"], "--json is for feedback list"),
    (["feedback", "anomaly", "--entity", "pump-7", "--start", "yesterday", "--end", "0"], "--start: "),
    (["feedback", "anomaly", "--entity", "pump-7", "--start", "10", "--end", "5"], "end_ts (5.0) is before start_ts"),
    (["feedback", "anomaly", "--entity", "pump\n7", "--start", "1", "--end", "5"], "entity"),
])
def test_feedback_usage_and_bad_verdicts_are_said_before_the_broker_is_reached(argv, says, capsys):
    assert main([*argv, "--bootstrap-servers", "127.0.0.1:1"]) == 2  # nothing answers there
    assert says in capsys.readouterr().err


def test_feedback_with_the_feedback_topic_off_names_the_field(monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_KAFKA__FEEDBACK_TOPIC", "")
    assert main(["feedback", "list"]) == 2
    assert "kafka.feedback_topic" in capsys.readouterr().err


def test_feedback_on_an_open_event_needs_an_end_and_takes_one(monkeypatch, capsys):
    """The event is looked up (here: a stand-in for the events topic); one still open has no end to give."""
    import json

    from anomaly import feedback_topic

    opened = {"event_id": "5f0c3a1b9d2e", "entity": "pump-7", "status": "open", "start_ts": 100.0, "end_ts": None}
    sent = []
    monkeypatch.setattr(feedback_topic, "find_event", lambda *a, **k: opened)
    monkeypatch.setattr(feedback_topic, "send", lambda bootstrap, topic, verdict, *a, **k: sent.append((topic, verdict)))
    assert main(["feedback", "normal", "5f0c3a1b"]) == 2
    assert "event 5f0c3a1b9d2e of pump-7 is still open (no end yet): give --end" in capsys.readouterr().err
    assert sent == []
    assert main(["feedback", "anomaly", "5f0c3a1b", "--end", "1970-01-01T00:03:20Z", "--note", "bearing"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert (given["entity"], given["start_ts"], given["end_ts"], given["verdict"]) == ("pump-7", 100.0, 200.0, "anomaly")
    assert given["feedback_id"] == given["event_id"] == "5f0c3a1b9d2e"  # the whole id, from the event
    assert sent[0][0] == "anomalies.feedback" and sent[0][1].note == "bearing"
    assert main(["feedback", "withdraw", "5f0c3a1b"]) == 0  # taken back by id: the open event needs no end
    assert sent[1][1].feedback_id == "5f0c3a1b9d2e" and sent[1][1].verdict == "withdrawn"


def test_a_verdict_on_an_event_gone_from_the_events_topic_is_found_on_the_feedback_topic(monkeypatch, capsys):
    """The events topic's retention took the event: withdrawing its verdict by id still works (a period
    verdict made instead has another id, and the first stayed in force)."""
    import json

    from anomaly import feedback, feedback_topic

    given = feedback.make_verdict("pump-7", 100.0, 160.0, "normal", event_id="5f0c3a1b9d2e")
    sent = []
    monkeypatch.setattr(feedback_topic, "find_event", lambda *a, **k: None)
    monkeypatch.setattr(feedback_topic, "read_verdicts", lambda *a, **k: ([given], []))
    monkeypatch.setattr(feedback_topic, "send", lambda bootstrap, topic, verdict, *a, **k: sent.append(verdict))
    assert main(["feedback", "withdraw", "5f0c3a1b"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feedback_id"] == given.feedback_id and out["verdict"] == "withdrawn"
    assert feedback.latest([given, *sent]) == []
    monkeypatch.setattr(feedback_topic, "read_verdicts", lambda *a, **k: ([], []))
    assert main(["feedback", "withdraw", "5f0c3a1b"]) == 2
    assert "nor a verdict on one in anomalies.feedback" in capsys.readouterr().err
    assert main(["feedback", "withdraw", "5f0c"]) == 2  # too short a start to be looked up: said
    assert "an id is matched by its first 6 characters or more" in capsys.readouterr().err


def test_every_command_caps_onednns_primitive_cache_unless_told(monkeypatch, capsys):
    """A scheduler retraining in one process met new input shapes every cycle and kept oneDNN's primitive
    for each (up to 1,024): main caps the cache where the environment does not set it already."""
    import os

    from anomaly.cli import ONEDNN_CACHE_CAPACITY

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "x")  # so that teardown restores what was there
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("ANOMALY_MODEL__WINDOW_SIZE", "one")  # config show fails at its config, after the set-up
    assert main(["config", "show"]) == 2
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY) == "128"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    assert main(["config", "show"]) == 2
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"  # an operator's own setting stands
