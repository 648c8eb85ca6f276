"""The README's generated parts are current."""

from pathlib import Path

from pipelines.docs import main, render

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == render(readme), "README.md is stale: run python -m pipelines.docs"


def test_check_mode_detects_staleness(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text("x\n<!-- config-reference:start -->\nold\n<!-- config-reference:end -->\ny\n")
    assert main(["--check", "--readme", str(stale)]) == 1
    assert main(["--readme", str(stale)]) == 0
    assert main(["--check", "--readme", str(stale)]) == 0
    assert "`window_size`" in stale.read_text()
