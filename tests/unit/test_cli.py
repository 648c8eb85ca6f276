"""The command line: every subcommand answers --help; bad input is a clear error, not a traceback."""

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
