"""``pipelines.nab_ablation``'s pure parts on a hand-made file: no data set, no training."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.protocols import SeriesResult, nab_calibrated, nab_novelty
from pipelines.nab_ablation import CHAINS, evaluate, heldout, main, markdown


def _file(n=1200, jump_at=900):
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, n)
    values[jump_at:] += 8.0
    expected = values + rng.normal(0, 0.1, n)
    expected[jump_at:jump_at + 16] -= 8.0  # the model lags the jump for one window
    expected[:15] = np.nan
    last = np.nan_to_num((values - expected) ** 2, nan=0.0)
    return {"name": "f", "mean": last, "last": last, "diff": np.abs(np.diff(values, prepend=values[0])),
            "windows": [(jump_at - 40, jump_at + 40)], "values": values[:, None], "expected": expected,
            "novelty": nab_novelty(values[:, None], 180), "train_rows": 180}


def test_shipped_chain_is_the_protocols_chain():
    f = _file()
    n = len(f["values"])
    r = SeriesResult(name="f", timestamps=np.arange(n), values=f["values"], labels=np.zeros(n, bool),
                     scores=np.zeros(n), flags=np.zeros(n, bool), expected=f["expected"][:, None], threshold=0.0,
                     sensors=("value",), train_seconds=0.0)
    shipped = next(c for name, c in CHAINS.items() if "(shipped)" in name)
    assert np.array_equal(shipped(f), nab_calibrated(r, f["train_rows"]))


def test_every_chain_scores_the_jump():
    rows = evaluate([_file()])
    assert [r["chain"] for r in rows] == list(CHAINS)
    for r in rows:
        assert 0 < r["nab_standard"] <= 100, r  # found inside the window, above the null detector's 0
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "(shipped)" in table


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "NAB" in capsys.readouterr().out


def test_heldout_chooses_bins_on_one_half_and_scores_the_other():
    files = []
    for k in range(4):
        f = _file(jump_at=800 + 50 * k)
        f["name"] = f"f{k}"
        files.append(f)
    check = heldout(files, bins=(4, 16), halvings=2, seed=1)
    assert set(check["corpus_by_bins"]) == {4, 16}
    assert len(check["chosen"]) == 4 and set(check["chosen"]) <= {4, 16}
    for key in ("heldout_chosen", "heldout_shipped", "heldout_before"):
        assert 0 < check[key] <= 100, key  # every file's jump is found inside its window


def test_a_cache_is_reused_only_under_the_settings_it_was_made_with(tmp_path):
    import pickle

    from pipelines.nab_ablation import cached_files

    key = {"profile": {"model": {"window_size": 16}}, "data_dir": "/data/nab"}
    path = tmp_path / "c.pkl"
    assert cached_files(path, key) is None  # none yet
    path.write_bytes(pickle.dumps({"key": key, "files": [{"name": "a"}]}))
    assert cached_files(path, key) == [{"name": "a"}]
    assert cached_files(path, {**key, "profile": {"model": {"window_size": 32}}}) is None  # another profile
    path.write_bytes(pickle.dumps([{"name": "a"}]))  # an old cache, which did not say what it was made with
    assert cached_files(path, key) is None


def test_the_cache_key_holds_the_score_chains_constants_and_the_code_version(tmp_path, monkeypatch):
    # A changed protocols.NAB_NOVELTY (or any commit) reused the old signals beside live ones.
    from anomaly import protocols, tracking
    from pipelines.nab_ablation import cache_key

    key = cache_key(tmp_path)
    assert key["constants"]["NAB_NOVELTY"] == {"points": 64, "step": 3} and key["code"] == tracking.code_fingerprint()
    monkeypatch.setattr(protocols, "NAB_NOVELTY", {"points": 32, "step": 3})
    assert cache_key(tmp_path) != key
    monkeypatch.undo()
    monkeypatch.setattr(tracking, "code_fingerprint", lambda: "0.1.0+other")
    assert cache_key(tmp_path) != key

