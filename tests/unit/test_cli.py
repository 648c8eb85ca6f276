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
