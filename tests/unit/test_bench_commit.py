"""The commit benchmark runs and measures both sides (not a timed test)."""

from __future__ import annotations

import pytest


def test_commit_benchmark_measures_both_sides() -> None:
    from pipelines.bench_commit import main, measure

    work, commit = measure(entities=30, batch=20, rounds=3)
    assert work > 0 and commit > 0
    assert main(["--entities", "5", "--batch", "5", "--rounds", "1"]) == 0
    with pytest.raises(SystemExit):
        main(["--entities", "0"])
