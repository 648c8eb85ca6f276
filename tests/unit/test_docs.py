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


def test_a_readme_without_its_markers_in_order_is_left_as_it_is(tmp_path):
    # without the end marker, everything after the start was cut off the README (2089 lines to 888); without
    # both, a second reference was appended
    for text in ("x\n<!-- config-reference:start -->\nold\ny\nthe rest\n", "x\nno markers\n",
                 "x\n<!-- config-reference:end -->\nold\n<!-- config-reference:start -->\ny\n"):
        readme = tmp_path / "README.md"
        readme.write_text(text)
        assert main(["--readme", str(readme)]) == 2 and main(["--check", "--readme", str(readme)]) == 2
        assert readme.read_text() == text
